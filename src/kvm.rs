//! Key-value maps: named maps of string entries, from configuration files (`KeyValueMap`
//! documents) and from the management API (`/v1/kvms/...`, kept in the [`Store`]). The
//! `KeyValueMap` policy reads and writes them; entries marked `secret` are never logged and
//! never returned in clear by the API, but templates can use them (an upstream credential
//! set by `AssignMessage` from `{kvm.creds.token}`).
//!
//! [`Store`]: crate::store::Store

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// Longest key (bytes). Keys are any UTF-8 without control characters.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value (bytes).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// One entry. `Debug` never shows a secret value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KvmEntry {
    pub value: String,
    #[serde(default)]
    pub secret: bool,
}

impl fmt::Debug for KvmEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if self.secret {
            &"<secret>"
        } else {
            &self.value
        };
        f.debug_struct("KvmEntry")
            .field("value", value)
            .field("secret", &self.secret)
            .finish()
    }
}

/// A map name: 1-253 letters, digits, `-`, `_`, `.` (as every object name).
pub fn check_map_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("a map name must be 1-253 characters of letters, digits, `-`, `_`, `.`".into())
    }
}

/// A key: 1-512 bytes of UTF-8 without control characters (CR, LF, NUL, ...).
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!("a key must be 1-{MAX_KEY_BYTES} bytes long"));
    }
    if key.chars().any(char::is_control) {
        return Err("a key must not contain control characters".into());
    }
    Ok(())
}

pub fn check_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("a value must be at most {MAX_VALUE_BYTES} bytes"));
    }
    Ok(())
}

/// A key as one URL path segment (everything but unreserved characters percent-encoded).
pub fn encode_path_segment(key: &str) -> String {
    let mut s = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Maps defined in configuration files: map → key → entry.
pub type FileMaps = BTreeMap<String, BTreeMap<String, KvmEntry>>;

/// The file-defined maps of the running configuration, for the management API (their
/// entries cannot be changed through it).
#[derive(Debug, Default)]
pub struct Kvms {
    files: ArcSwap<FileMaps>,
}

impl Kvms {
    pub fn set_files(&self, maps: Arc<FileMaps>) {
        self.files.store(maps);
    }

    pub fn files(&self) -> Arc<FileMaps> {
        self.files.load_full()
    }

    pub fn file_entry(&self, map: &str, key: &str) -> Option<KvmEntry> {
        self.files.load().get(map).and_then(|m| m.get(key)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_and_secrets() {
        assert!(check_map_name("creds.v1").is_ok());
        assert!(check_map_name("bad/name").is_err());
        assert!(check_map_name("").is_err());
        assert!(check_key("tenant-1__token é/ü ?#%").is_ok());
        assert!(check_key("a\nb").is_err());
        assert!(check_key("\0").is_err());
        assert!(check_key(&"k".repeat(513)).is_err());
        assert!(check_value(&"v".repeat(MAX_VALUE_BYTES + 1)).is_err());
        let e = KvmEntry {
            value: "hunter2".into(),
            secret: true,
        };
        assert!(!format!("{e:?}").contains("hunter2"));
    }
}
