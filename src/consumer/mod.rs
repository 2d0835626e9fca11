//! The consumer model: API products, apps and their API keys. Objects come from the
//! configuration files (`ApiProduct` and `App` documents) and from the management API (kept
//! in a [`crate::store::Store`]); both meet in one in-memory index the data path reads.

pub mod index;
pub mod service;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where an object was defined. File objects cannot be changed through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    File,
    #[default]
    Api,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalType {
    #[default]
    Auto,
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

impl TimeUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Second => "second",
            TimeUnit::Minute => "minute",
            TimeUnit::Hour => "hour",
            TimeUnit::Day => "day",
            TimeUnit::Week => "week",
            TimeUnit::Month => "month",
        }
    }
}

/// A quota as products carry it: `limit` per `interval` `time_unit`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QuotaSettings {
    pub limit: u64,
    #[serde(default = "one")]
    pub interval: u32,
    pub time_unit: TimeUnit,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

/// An operation a product allows: a path template (`/v1/models/{model}:predict`, `*` and
/// `**` wildcards), methods (empty: any), and LLM model names (empty: any). An operation
/// may carry its own `quota` / `llmTokenQuota` (Apigee's per-operation quota in an
/// APIOperationSet): a Quota or LlmTokenQuota with `useProduct` then takes the limits of
/// the operation the request matched, counted apart from the product's other operations,
/// and the product's own limits for operations without any. Operations naming the same
/// `group` (an APIOperationSet's operation group: several operations under one quota) share
/// one count; they must carry the same limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_token_quota: Option<QuotaSettings>,
}

impl Operation {
    /// The counter key part of an operation with its own limits: what it matches, so
    /// reordering a product's operations keeps each one's count.
    pub fn counter_name(&self) -> String {
        if !self.group.is_empty() {
            // A group counts once for all its operations, whatever they match.
            return format!("group {}", self.group);
        }
        format!(
            "{} {} {}",
            self.methods.join(","),
            self.path,
            self.models.join(",")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiProduct {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub operations: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_token_quota: Option<QuotaSettings>,
    #[serde(default)]
    pub approval_type: ApprovalType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub origin: Origin,
    /// Store revision, raised by one on every update: an update carries the revision it
    /// read and the store refuses it when another write came in between (optimistic
    /// concurrency across replicas). 0 for file objects and new ones. Always written, so
    /// the management API shows it (as the README promises) even at 0.
    #[serde(default)]
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppStatus {
    #[default]
    Approved,
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    #[default]
    Approved,
    Revoked,
    Pending,
}

/// An API key as stored: never the key itself, only its SHA-256 (keys are long random
/// strings, so a fast hash is enough) and a short public id for management.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiKey {
    /// Public identifier (`key_…`), used to address the key in the API and in logs.
    pub id: String,
    /// `sha256:<hex>` of the key.
    pub hash: String,
    #[serde(default)]
    pub status: KeyStatus,
    /// Unix milliseconds; `None` never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct App {
    pub name: String,
    pub developer_email: String,
    #[serde(default)]
    pub status: AppStatus,
    #[serde(default)]
    pub products: Vec<String>,
    #[serde(default)]
    pub keys: Vec<ApiKey>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub origin: Origin,
    /// Store revision, raised by one on every update: an update carries the revision it
    /// read and the store refuses it when another write came in between (optimistic
    /// concurrency across replicas). 0 for file objects and new ones.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
}

/// A key's SHA-256 digest: what the in-memory index is keyed by.
pub type KeyDigest = [u8; 32];

pub fn key_digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The digest a stored `sha256:<hex>` hash stands for; `None` when malformed.
pub fn digest_of_hash(h: &str) -> Option<KeyDigest> {
    let hex = h.strip_prefix("sha256:")?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// `sha256:<hex>` of a key, as stored.
pub fn hash_key(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = key_digest(key);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// Checks a stored hash's form: `sha256:` and 64 lower-case hex digits.
pub fn valid_hash(h: &str) -> bool {
    h.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing() {
        let h = hash_key("abc");
        assert!(valid_hash(&h));
        assert_eq!(
            h,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(digest_of_hash(&h), Some(key_digest("abc")));
        assert_eq!(digest_of_hash("sha256:xyz"), None);
        assert_eq!(digest_of_hash(&h.to_uppercase()), None);
        assert!(!valid_hash("sha256:xyz"));
        assert!(!valid_hash("md5:00"));
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let p: ApiProduct = serde_json::from_str(
            r#"{"name":"gold","operations":[{"path":"/v1/models/{model}:predict","methods":["POST"]}],
                "quota":{"limit":100,"timeUnit":"minute"},"approvalType":"manual"}"#,
        )
        .unwrap();
        assert_eq!(p.quota.as_ref().unwrap().interval, 1);
        assert_eq!(p.origin, Origin::Api);
        let back: ApiProduct = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(
            serde_json::from_str::<App>(r#"{"name":"a","developerEmail":"d@x","bogus":1}"#)
                .is_err()
        );
    }
}
