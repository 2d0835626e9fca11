//! The shared tier: cache entries in a storage backend ([`Backend::cache_get`] and
//! [`Backend::cache_put`]; Redis keys `tollgate:cache:<policy>:<hex key>`), so replicas
//! share what any of them fetched. Connected on first use; a lookup or store never waits
//! longer than its timeout, and an unreachable backend is a miss, never an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{hex, Entry, Key};
use crate::store::{self, Backend, OpenOptions, StoreSpec};

/// An entry as stored in the backend.
#[derive(Serialize, Deserialize)]
struct Wire {
    status: u16,
    headers: Vec<(String, String)>,
    content_type: String,
    /// Base64 (standard) of the body.
    body: String,
    /// When it was stored, Unix ms (for `age`).
    stored_ms: u64,
    /// When it stops being served, Unix ms (0 in entries written before this field:
    /// `stored_ms` + the TTL).
    #[serde(default)]
    expires_ms: u64,
    #[serde(default)]
    vary: Vec<(String, Option<String>)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub struct SharedTier {
    /// What to open on first use (when not given open).
    spec: StoreSpec,
    backend: tokio::sync::OnceCell<Arc<dyn Backend>>,
    /// `<policy>:`, before each key's hex.
    prefix: String,
    timeout: Duration,
    ttl: Duration,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedTier {
    /// The tier of policy `policy` in the Redis at `url` (checked now, connected on first
    /// use). `ttl` is the policy's, for entries stored without an expiry.
    pub fn redis(
        url: &str,
        policy: &str,
        timeout: Duration,
        ttl: Duration,
    ) -> Result<Self, String> {
        store::redis_store::check_url(url)?;
        Ok(Self {
            spec: StoreSpec::Redis(url.to_owned()),
            backend: tokio::sync::OnceCell::new(),
            prefix: format!("{policy}:"),
            timeout,
            ttl,
        })
    }

    /// The tier of policy `policy` in an open `backend`.
    pub fn new(backend: Arc<dyn Backend>, policy: &str, timeout: Duration, ttl: Duration) -> Self {
        Self {
            spec: StoreSpec::Memory,
            backend: tokio::sync::OnceCell::new_with(Some(backend)),
            prefix: format!("{policy}:"),
            timeout,
            ttl,
        }
    }

    async fn backend(&self) -> Option<Arc<dyn Backend>> {
        let opts = OpenOptions {
            change_feed: false,
            timeout: Some(self.timeout),
        };
        let connect = self
            .backend
            .get_or_try_init(|| store::open_with(&self.spec, opts));
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(b)) => Some(b.clone()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "shared response cache unreachable");
                None
            }
            Err(_) => None,
        }
    }

    fn key(&self, key: &Key) -> String {
        format!("{}{}", self.prefix, hex(key))
    }

    /// The entry stored under `key`, if any and still fresh.
    pub async fn get(&self, key: &Key) -> Option<Entry> {
        use base64::Engine as _;
        let backend = self.backend().await?;
        let raw = match tokio::time::timeout(self.timeout, backend.cache_get(&self.key(key))).await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "shared response cache read failed");
                None
            }
            Err(_) => None,
        };
        let w: Wire = serde_json::from_slice(&raw?).ok()?;
        let body = base64::engine::general_purpose::STANDARD
            .decode(w.body)
            .ok()?;
        let now = now_ms();
        let age = Duration::from_millis(now.saturating_sub(w.stored_ms));
        // The entry keeps the expiry it was stored with: a replica reading it late must not
        // serve it for a fresh TTL of its own.
        let left = match w.expires_ms {
            0 => self.ttl.saturating_sub(age),
            at => Duration::from_millis(at.saturating_sub(now)),
        };
        if left.is_zero() {
            return None;
        }
        let now = Instant::now();
        Some(Entry {
            status: w.status,
            headers: w.headers,
            content_type: w.content_type,
            body,
            stored: now.checked_sub(age).unwrap_or(now),
            expires: now + left,
            vary: w.vary,
        })
    }

    /// Stores `e` in the background, for as long as it has left.
    pub fn put(self: &Arc<Self>, key: Key, e: &Entry) {
        use base64::Engine as _;
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let left = e.expires.saturating_duration_since(Instant::now());
        let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
        if left_ms == 0 {
            return;
        }
        let now = now_ms();
        let w = Wire {
            status: e.status,
            headers: e.headers.clone(),
            content_type: e.content_type.clone(),
            body: base64::engine::general_purpose::STANDARD.encode(&e.body),
            stored_ms: now,
            expires_ms: now.saturating_add(left_ms),
            vary: e.vary.clone(),
        };
        let Ok(bytes) = serde_json::to_vec(&w) else {
            return;
        };
        let this = self.clone();
        handle.spawn(async move {
            let Some(backend) = this.backend().await else {
                return;
            };
            let name = this.key(&key);
            let write = backend.cache_put(&name, bytes, Duration::from_millis(left_ms));
            let r = tokio::time::timeout(this.timeout * 4, write).await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::debug!("shared response cache write failed or timed out");
            }
        });
    }
}
