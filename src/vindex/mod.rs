//! PLACEHOLDER (exact scan only) until the vindex branch lands; same API.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::embed::Embedding;

pub struct IndexConfig {
    pub max_bytes: u64,
    pub ttl: Duration,
    pub exact_up_to: usize,
}
pub type Scope = u128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryId(u64);

pub struct Hit<V> {
    pub id: EntryId,
    pub similarity: f32,
    pub value: Arc<V>,
    pub age: Duration,
}

struct E<V> {
    id: EntryId,
    scope: Scope,
    emb: Embedding,
    value: Arc<V>,
    bytes: u64,
    at: Instant,
}

pub struct VectorIndex<V: Send + Sync + 'static> {
    cfg: IndexConfig,
    next: AtomicU64,
    entries: RwLock<Vec<E<V>>>,
}

impl<V: Send + Sync + 'static> std::fmt::Debug for VectorIndex<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VectorIndex")
    }
}

impl<V: Send + Sync + 'static> VectorIndex<V> {
    pub fn new(cfg: IndexConfig) -> Self {
        Self {
            cfg,
            next: AtomicU64::new(1),
            entries: RwLock::default(),
        }
    }
    pub fn insert(
        &self,
        scope: Scope,
        embedding: Embedding,
        value: Arc<V>,
        bytes: usize,
    ) -> EntryId {
        let id = EntryId(self.next.fetch_add(1, Ordering::Relaxed));
        let mut es = self.entries.write();
        es.push(E {
            id,
            scope,
            bytes: bytes as u64 + embedding.dims() as u64 * 4,
            emb: embedding,
            value,
            at: Instant::now(),
        });
        while es.iter().map(|e| e.bytes).sum::<u64>() > self.cfg.max_bytes && !es.is_empty() {
            es.remove(0);
        }
        id
    }
    pub fn search(
        &self,
        scope: Scope,
        query: &Embedding,
        min_similarity: f32,
        k: usize,
    ) -> Vec<Hit<V>> {
        let es = self.entries.read();
        let mut hits: Vec<Hit<V>> = es
            .iter()
            .filter(|e| e.scope == scope && e.at.elapsed() < self.cfg.ttl)
            .map(|e| Hit {
                id: e.id,
                similarity: e.emb.cosine(query),
                value: e.value.clone(),
                age: e.at.elapsed(),
            })
            .filter(|h| h.similarity >= min_similarity)
            .collect();
        hits.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        hits.truncate(k);
        hits
    }
    pub fn remove(&self, id: EntryId) -> bool {
        let mut es = self.entries.write();
        let n = es.len();
        es.retain(|e| e.id != id);
        es.len() != n
    }
    pub fn len(&self) -> usize {
        self.entries.read().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> u64 {
        self.entries.read().iter().map(|e| e.bytes).sum()
    }
    pub fn clear(&self) {
        self.entries.write().clear();
    }
}

pub mod shared {
    //! PLACEHOLDER until the vindex branch lands.
    use std::time::Duration;

    use super::Scope;
    use crate::embed::Embedding;

    #[derive(Debug, thiserror::Error)]
    #[error("shared semantic index not built yet")]
    pub struct SharedError;

    #[derive(Debug)]
    pub struct SharedIndex;

    impl SharedIndex {
        pub fn connect(_url: &str, _ns: &str, _t: Duration) -> Result<Self, SharedError> {
            Err(SharedError)
        }
        pub fn publish(&self, _s: Scope, _e: &Embedding, _p: bytes::Bytes, _ttl: Duration) {}
        pub fn follow(
            &self,
            _f: impl Fn(Scope, Embedding, bytes::Bytes, Duration) + Send + Sync + 'static,
        ) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async {})
        }
    }
}
