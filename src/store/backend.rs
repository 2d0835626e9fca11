//! The one narrow interface every storage backend implements: keyed records with
//! conditional writes, a change feed, quota counters with checkpoints, and expiring cache
//! entries, all as bytes. The typed façades ([`super::Store`] for objects,
//! [`crate::ratelimit::Counters`] for counters, [`crate::cache::SharedTier`] for cache
//! entries) encode and decode; a backend only keeps bytes and enforces the conditions
//! atomically. Adding a backend is one module implementing this trait, plus one line in
//! `tests/store.rs`'s `store_suite!` list and in [`super::open`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Change, StoreError};
use crate::counters::table::{MemoryCounters, DEFAULT_MAX_KEYS};
use crate::counters::{Adjust, Ask, Decision};

/// A collection of records, each keyed by a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table<'a> {
    Products,
    Apps,
    /// The entries of one key-value map.
    Kvm(&'a str),
}

impl Table<'_> {
    /// The same table, owning its map name (to move onto another thread).
    pub fn to_owned_table(&self) -> OwnedTable {
        match self {
            Table::Products => OwnedTable::Products,
            Table::Apps => OwnedTable::Apps,
            Table::Kvm(map) => OwnedTable::Kvm((*map).to_owned()),
        }
    }

    /// The table's name in messages and in the memory backend.
    pub fn id(&self) -> String {
        match self {
            Table::Products => "products".into(),
            Table::Apps => "apps".into(),
            Table::Kvm(map) => format!("kvm:{map}"),
        }
    }
}

/// A [`Table`] that owns its map name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedTable {
    Products,
    Apps,
    Kvm(String),
}

impl OwnedTable {
    pub fn as_table(&self) -> Table<'_> {
        match self {
            OwnedTable::Products => Table::Products,
            OwnedTable::Apps => Table::Apps,
            OwnedTable::Kvm(map) => Table::Kvm(map),
        }
    }
}

/// When a [`Backend::put`] may write. The check and the write are one atomic step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Whether or not the key exists.
    Any,
    /// Only when the key is absent.
    Absent,
    /// Only when the key exists.
    Present,
    /// Only when the key exists and its stored JSON's `revision` (0 when missing or
    /// unreadable) is this one.
    Revision(u64),
}

/// What a conditional put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Written,
    /// `Cond::Absent`, and the key exists.
    Exists,
    /// `Cond::Present` or `Cond::Revision`, and the key is absent.
    Missing,
    /// `Cond::Revision`, and another revision is stored.
    Stale,
}

/// Receives scanned records: the table's index, the key, the stored bytes.
pub type Visit = Box<dyn FnMut(usize, &str, &[u8]) + Send>;

/// Keeps checkpoint rows for which this returns true (the others have expired).
pub type Keep = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// A storage backend. Writes are durable when they return `Ok` (for the durable backends).
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// `memory`, `embedded` or `redis`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Checks that the backend answers (a shared backend's liveness probe).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    // --- records -------------------------------------------------------------------------

    async fn get(&self, table: Table<'_>, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Hands every record of each table to `visit` (with the table's index in `tables`),
    /// in one read where the backend can (so products and apps come from the same commit).
    /// Records are visited as they are read, not gathered first: a large store is decoded
    /// without holding all of its bytes at once.
    async fn scan(&self, tables: &[Table<'_>], visit: Visit) -> Result<(), StoreError>;
    async fn put(
        &self,
        table: Table<'_>,
        key: &str,
        value: Vec<u8>,
        cond: Cond,
    ) -> Result<Put, StoreError>;
    /// False when there was nothing to delete.
    async fn delete(&self, table: Table<'_>, key: &str) -> Result<bool, StoreError>;

    // --- change feed ---------------------------------------------------------------------

    /// Changes announced through this and (for shared backends) every other replica.
    fn subscribe(&self) -> broadcast::Receiver<Change>;
    /// Tells every subscriber (every replica, for shared backends) about a change. The
    /// write succeeded already, so a failure is logged, not returned.
    async fn announce(&self, change: Change);

    // --- counters ------------------------------------------------------------------------

    /// Decides each ask atomically on the counters this backend holds (for a shared backend,
    /// every replica's), in one round trip where it can. An error means none was counted;
    /// `None` for one ask means its answer could not be read.
    async fn count(&self, asks: &[Ask]) -> Result<Vec<Option<Decision>>, StoreError>;
    /// Adjusts what reservations counted (see [`Adjust`]), each atomically: `Some(count)`
    /// after the adjustment, `None` when its window has passed (moot). A count of 0 asked
    /// through [`Backend::count`] (count-only, weight 0) reads a counter without changing it.
    /// Every backend tollgate opens implements it; the default (for test doubles that hold
    /// no counters) refuses.
    async fn adjust(&self, adjusts: &[Adjust]) -> Result<Vec<Option<u64>>, StoreError> {
        let _ = adjusts;
        Err(StoreError::Unavailable(format!(
            "the {} backend holds no counters",
            self.kind()
        )))
    }
    /// Counter checkpoint rows (key, encoded window) written by [`Backend::save_counters`].
    async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError>;
    /// Writes `rows` and drops every stored row `keep` refuses, in one durable step.
    async fn save_counters(&self, rows: Vec<(u128, Vec<u8>)>, keep: Keep)
        -> Result<(), StoreError>;

    // --- cache entries -------------------------------------------------------------------

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores an entry that disappears after `ttl`.
    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError>;

    // --- usage tallies -------------------------------------------------------------------

    /// Adds each delta to its bucket's field (every replica's adds land in the same
    /// bucket); a bucket disappears `ttl` after its last add. See [`crate::usage`].
    async fn tally_add(&self, adds: &[TallyAdd], ttl: Duration) -> Result<(), StoreError>;
    /// Every field of each bucket with its total, in the order asked (empty when the bucket
    /// has none or expired).
    async fn tally_read(&self, buckets: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError>;
}

/// One addition to a usage tally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TallyAdd {
    pub bucket: String,
    pub field: String,
    pub delta: i64,
}

/// Usage tallies kept in process (the memory backend's, and the embedded one's own table
/// is written through the same shape): bucket → (field → total), with each bucket's expiry.
#[derive(Debug, Default)]
pub(super) struct Tallies(parking_lot::Mutex<BTreeMap<String, Bucket>>);

/// One bucket's fields and when it expires.
type Bucket = (BTreeMap<String, i64>, Instant);

impl Tallies {
    pub fn add(&self, adds: &[TallyAdd], ttl: Duration) {
        let now = Instant::now();
        let until = now.checked_add(ttl).unwrap_or(now);
        let mut t = self.0.lock();
        t.retain(|_, (_, exp)| *exp > now);
        for a in adds {
            let (fields, exp) = t
                .entry(a.bucket.clone())
                .or_insert_with(|| (BTreeMap::new(), until));
            *exp = until;
            let v = fields.entry(a.field.clone()).or_insert(0);
            *v = v.saturating_add(a.delta);
        }
    }

    pub fn read(&self, buckets: &[String]) -> Vec<Vec<(String, i64)>> {
        let now = Instant::now();
        let t = self.0.lock();
        buckets
            .iter()
            .map(|b| match t.get(b) {
                Some((fields, exp)) if *exp > now => {
                    fields.iter().map(|(k, v)| (k.clone(), *v)).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }
}

/// What the in-process backends (memory, embedded) keep in memory beside their records:
/// counters decided in this process and cache entries (a cache need not survive a restart).
#[derive(Debug)]
pub(super) struct InProcess {
    pub counters: MemoryCounters,
    pub cache: moka::sync::Cache<String, (Arc<Vec<u8>>, Instant)>,
}

/// Each in-process cache entry lives until its own deadline.
struct UntilDeadline;

impl moka::Expiry<String, (Arc<Vec<u8>>, Instant)> for UntilDeadline {
    fn expire_after_create(
        &self,
        _: &String,
        v: &(Arc<Vec<u8>>, Instant),
        now: Instant,
    ) -> Option<Duration> {
        Some(v.1.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &(Arc<Vec<u8>>, Instant),
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.1.saturating_duration_since(now))
    }
}

/// Bytes of cache entries an in-process backend keeps.
const IN_PROCESS_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for InProcess {
    fn default() -> Self {
        Self {
            counters: MemoryCounters::new(DEFAULT_MAX_KEYS),
            cache: moka::sync::Cache::builder()
                .max_capacity(IN_PROCESS_CACHE_BYTES)
                .weigher(|k: &String, v: &(Arc<Vec<u8>>, Instant)| {
                    u32::try_from(k.len() + v.0.len()).unwrap_or(u32::MAX)
                })
                .expire_after(UntilDeadline)
                .build(),
        }
    }
}

impl InProcess {
    pub fn count(&self, asks: &[Ask]) -> Vec<Option<Decision>> {
        asks.iter().map(|a| Some(self.counters.apply(a))).collect()
    }

    pub fn adjust(&self, adjusts: &[Adjust]) -> Vec<Option<u64>> {
        adjusts.iter().map(|a| self.counters.adjust(a)).collect()
    }

    pub fn cache_get(&self, key: &str) -> Option<Vec<u8>> {
        self.cache
            .get(key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(v, _)| v.to_vec())
    }

    pub fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) {
        let Some(until) = Instant::now().checked_add(ttl) else {
            return;
        };
        self.cache.insert(key.to_owned(), (Arc::new(value), until));
    }
}
