//! How the durable backends encode objects: JSON of the model types, keyed by name.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;
use crate::consumer::{ApiProduct, App};

/// An object a store keeps under its name.
pub(super) trait Stored: Serialize + DeserializeOwned + Send + 'static {
    /// For messages (`product`, `app`), as in [`StoreError`].
    const KIND: &'static str;
    fn name(&self) -> &str;
}

impl Stored for ApiProduct {
    const KIND: &'static str = "product";
    fn name(&self) -> &str {
        &self.name
    }
}

impl Stored for App {
    const KIND: &'static str = "app";
    fn name(&self) -> &str {
        &self.name
    }
}

pub(super) fn encode<T: Stored>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| {
        StoreError::Unavailable(format!("cannot encode {} `{}`: {e}", T::KIND, value.name()))
    })
}

/// Decodes the value stored under `name`. Anything that does not decode, or that names another
/// object, is [`StoreError::Corrupt`].
pub(super) fn decode<T: Stored>(name: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        kind: T::KIND,
        name: name.to_owned(),
        message,
    };
    let value: T = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if value.name() != name {
        return Err(corrupt(format!(
            "the stored object is named `{}`",
            value.name()
        )));
    }
    Ok(value)
}

/// Decodes every entry of a collection for a snapshot. An entry that does not decode is logged
/// and left out: one damaged object must not keep every other one from loading (the data path
/// fails closed for the missing object; reading it by name reports `Corrupt`).
pub(super) fn decode_all<'a, T: Stored>(
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Vec<T> {
    entries
        .into_iter()
        .filter_map(|(name, bytes)| match decode(name, bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, "skipping an unreadable stored object");
                None
            }
        })
        .collect()
}
