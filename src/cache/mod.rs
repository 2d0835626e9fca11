//! Response cache storage: entries, keys, the byte-bounded in-memory tier kept across
//! reloads ([`Caches`]) and the optional shared tier in a storage backend ([`SharedTier`]).
//! The `ResponseCache` policy (`crate::policies::response_cache`) decides what to look up
//! and store; this module keeps it.
//!
//! A key is a SHA-256 over length-prefixed parts ([`KeyHasher`]): hostile input never reaches
//! the cache's key space as is.

mod rules;
mod shared;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

pub use rules::{
    accepts_encoding, all_values, freshness, hex, is_event_stream, shareable_with_credentials,
    stored_header, unhex, Freshness,
};
pub use shared::SharedTier;

/// A cache key: SHA-256 of its parts.
pub type Key = [u8; 32];

/// Builds a [`Key`] from parts, each length-prefixed so no two part lists collide.
#[derive(Debug, Clone, Default)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn part(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_be_bytes());
        self.0.update(b);
    }

    pub fn finish(self) -> Key {
        self.0.finalize().into()
    }
}

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub content_type: String,
    pub body: Vec<u8>,
    pub stored: Instant,
    /// When it stops being served: the TTL, capped by the upstream's `s-maxage`/`max-age`,
    /// and kept when the entry travels through the shared tier.
    pub expires: Instant,
    /// Request headers the response varies on (`Vary`, but `accept-encoding`) with the
    /// values it was stored for: only a request with the same values is served it.
    pub vary: Vec<(String, Option<String>)>,
}

/// One policy's in-memory tier: bounded by stored bytes, each entry expiring on its own.
pub type LocalCache = moka::sync::Cache<Key, Arc<Entry>>;

/// moka's per-entry expiry: each entry lives until its own `expires`.
struct UntilExpires;

impl moka::Expiry<Key, Arc<Entry>> for UntilExpires {
    fn expire_after_create(&self, _: &Key, e: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(e.expires.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        e: &Arc<Entry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.expires.saturating_duration_since(now))
    }
}

/// Every policy's cache, by policy name and settings, shared across reloads so a reload
/// does not empty them. The map holds weak references: a configuration that no longer uses
/// a cache (a policy renamed, removed or resized) drops it with its last policy, and its
/// slot is pruned on the next build.
#[derive(Debug, Default)]
pub struct Caches {
    by_policy: Mutex<HashMap<String, Weak<LocalCache>>>,
}

impl Caches {
    /// The cache `id` names, made with `max_bytes` if no live policy holds it.
    pub fn get(&self, id: String, max_bytes: u64) -> Arc<LocalCache> {
        let mut map = self.by_policy.lock();
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(store) = map.get(&id).and_then(Weak::upgrade) {
            return store;
        }
        let store = Arc::new(
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &Key, e: &Arc<Entry>| {
                    let bytes = k.len()
                        + e.body.len()
                        + e.content_type.len()
                        + e.headers
                            .iter()
                            .map(|(n, v)| n.len() + v.len())
                            .sum::<usize>();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .expire_after(UntilExpires)
                .build(),
        );
        map.insert(id, Arc::downgrade(&store));
        store
    }

    /// Caches some policy still uses (the rest are pruned first).
    pub fn live(&self) -> usize {
        let mut map = self.by_policy.lock();
        map.retain(|_, w| w.strong_count() > 0);
        map.len()
    }

    /// Slots held, dead ones included (they are pruned by [`Caches::get`] and
    /// [`Caches::live`]).
    pub fn slots(&self) -> usize {
        self.by_policy.lock().len()
    }
}
