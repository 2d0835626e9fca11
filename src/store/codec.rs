//! How the durable backends encode objects: JSON of the model types, keyed by name.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::backend::Table;
use super::{kvm_name, StoreError, KVM_KIND};
use crate::consumer::{ApiProduct, App};
use crate::kvm::KvmEntry;

/// An object a store keeps under its name.
pub(super) trait Stored: Serialize + DeserializeOwned + Send + 'static {
    /// For messages (`product`, `app`), as in [`StoreError`].
    const KIND: &'static str;
    /// Where the backends keep it.
    const TABLE: Table<'static>;
    fn name(&self) -> &str;
    /// The revision (see [`crate::consumer::App::revision`]).
    fn revision(&self) -> u64;
    fn with_revision(&self, revision: u64) -> Self;
}

impl Stored for ApiProduct {
    const KIND: &'static str = "product";
    const TABLE: Table<'static> = Table::Products;
    fn name(&self) -> &str {
        &self.name
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn with_revision(&self, revision: u64) -> Self {
        Self {
            revision,
            ..self.clone()
        }
    }
}

impl Stored for App {
    const KIND: &'static str = "app";
    const TABLE: Table<'static> = Table::Apps;
    fn name(&self) -> &str {
        &self.name
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn with_revision(&self, revision: u64) -> Self {
        Self {
            revision,
            ..self.clone()
        }
    }
}

/// What an update writes: `value` one revision past the one it was read at (the store
/// checks that the stored revision still is `value.revision()`).
pub(super) fn encode_update<T: Stored>(value: &T) -> Result<Vec<u8>, StoreError> {
    encode(&value.with_revision(value.revision().saturating_add(1)))
}

/// The revision of a stored object, read without decoding the rest: 0 when absent, and
/// also when the stored value does not decode, so a damaged object can be replaced by an
/// update (as the Redis script does).
pub(super) fn stored_revision(bytes: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Rev {
        #[serde(default)]
        revision: u64,
    }
    serde_json::from_slice::<Rev>(bytes).map_or(0, |r| r.revision)
}

/// The error for an update whose revision is no longer the stored one.
pub(super) fn conflict<T: Stored>(value: &T) -> StoreError {
    StoreError::Conflict {
        kind: T::KIND,
        name: value.name().to_owned(),
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

/// Decodes one entry of a collection for a snapshot. An entry that does not decode is
/// logged and left out: one damaged object must not keep every other one from loading (the
/// data path fails closed for the missing object; reading it by name reports `Corrupt`).
pub(super) fn decode_or_skip<T: Stored>(name: &str, bytes: &[u8]) -> Option<T> {
    match decode(name, bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "skipping an unreadable stored object");
            None
        }
    }
}

pub(super) fn encode_entry(map: &str, key: &str, e: &KvmEntry) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(e).map_err(|err| {
        StoreError::Unavailable(format!(
            "cannot encode kvm entry `{}`: {err}",
            kvm_name(map, key)
        ))
    })
}

pub(super) fn decode_entry(map: &str, key: &str, bytes: &[u8]) -> Result<KvmEntry, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        kind: KVM_KIND,
        name: kvm_name(map, key),
        message: err.to_string(),
    })
}
