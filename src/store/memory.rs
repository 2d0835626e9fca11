//! The in-memory backend: for tests and for `--store memory` (nothing survives a restart).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::backend::{Backend, Cond, InProcess, Keep, Put, Table, Tallies, TallyAdd, Visit};
use super::codec;
use super::{Change, StoreError};
use crate::counters::{Adjust, Ask, Decision};

#[derive(Debug)]
pub struct MemoryBackend {
    /// Records by table id ([`Table::id`]), then key.
    tables: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
    checkpoints: Mutex<BTreeMap<u128, Vec<u8>>>,
    local: InProcess,
    tallies: Tallies,
    changes: broadcast::Sender<Change>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self {
            tables: Mutex::default(),
            checkpoints: Mutex::default(),
            local: InProcess::default(),
            tallies: Tallies::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The conditional write every in-process backend makes (the caller holds the lock or the
/// write transaction, so the check and the write are one step).
pub(super) fn judge(stored: Option<&[u8]>, cond: Cond) -> Put {
    match (cond, stored) {
        (Cond::Absent, Some(_)) => Put::Exists,
        (Cond::Present | Cond::Revision(_), None) => Put::Missing,
        (Cond::Revision(r), Some(v)) if codec::stored_revision(v) != r => Put::Stale,
        _ => Put::Written,
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, table: Table<'_>, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tables
            .lock()
            .get(&table.id())
            .and_then(|t| t.get(key))
            .cloned())
    }

    async fn scan(&self, tables: &[Table<'_>], mut visit: Visit) -> Result<(), StoreError> {
        let g = self.tables.lock();
        for (i, t) in tables.iter().enumerate() {
            for (k, v) in g.get(&t.id()).into_iter().flatten() {
                visit(i, k, v);
            }
        }
        Ok(())
    }

    async fn put(
        &self,
        table: Table<'_>,
        key: &str,
        value: Vec<u8>,
        cond: Cond,
    ) -> Result<Put, StoreError> {
        let mut g = self.tables.lock();
        let t = g.entry(table.id()).or_default();
        let outcome = judge(t.get(key).map(Vec::as_slice), cond);
        if outcome == Put::Written {
            t.insert(key.to_owned(), value);
        }
        Ok(outcome)
    }

    async fn delete(&self, table: Table<'_>, key: &str) -> Result<bool, StoreError> {
        Ok(self
            .tables
            .lock()
            .get_mut(&table.id())
            .and_then(|t| t.remove(key))
            .is_some())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn announce(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    async fn count(&self, asks: &[Ask]) -> Result<Vec<Option<Decision>>, StoreError> {
        Ok(self.local.count(asks))
    }

    async fn adjust(&self, adjusts: &[Adjust]) -> Result<Vec<Option<u64>>, StoreError> {
        Ok(self.local.adjust(adjusts))
    }

    async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        Ok(self
            .checkpoints
            .lock()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    async fn save_counters(
        &self,
        rows: Vec<(u128, Vec<u8>)>,
        keep: Keep,
    ) -> Result<(), StoreError> {
        let mut g = self.checkpoints.lock();
        g.extend(rows);
        g.retain(|_, v| keep(v));
        Ok(())
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.local.cache_get(key))
    }

    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        self.local.cache_put(key, value, ttl);
        Ok(())
    }

    async fn tally_add(&self, adds: &[TallyAdd], ttl: Duration) -> Result<(), StoreError> {
        self.tallies.add(adds, ttl);
        Ok(())
    }

    async fn tally_read(&self, buckets: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        Ok(self.tallies.read(buckets))
    }
}
