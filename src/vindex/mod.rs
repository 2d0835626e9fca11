//! Vector search for the semantic cache (issue 16, item 3): an in-memory index of
//! [`Embedding`]s with a value each, partitioned by [`Scope`], bounded in bytes and by a TTL.
//!
//! - **Scopes.** Every entry belongs to the caller's [`Scope`] (a hash of model, app, system
//!   prompt…); a search only ever sees its own scope. Inside a scope, entries are further
//!   split by vector length: a query is only compared with vectors of its own dimensions, so
//!   an entry from another embedder never matches.
//! - **Exact, then approximate.** A partition is scanned exactly up to
//!   [`IndexConfig::exact_up_to`] live entries; past it, an HNSW graph ([`hnsw`], written
//!   here: see "Why our own HNSW") answers. The graph is built off the lock on a thread of
//!   its own (at most [`MAX_BUILDS`] at once per index); searches go on exactly meanwhile.
//!   Below half the switch point the graph is dropped again (hysteresis, so a partition at
//!   the limit does not flap).
//! - **TTL.** Each entry expires [`IndexConfig::ttl`] after its insert (or sooner:
//!   [`VectorIndex::insert_with_ttl`], for entries that arrive from another replica with part
//!   of their life spent). A search never returns an expired entry. Expired entries are
//!   reclaimed by a sweep done inside [`VectorIndex::insert`] and [`VectorIndex::search`]
//!   (up to [`SWEEP_PER_CALL`] per call, soonest expiry first; a search that finds nothing
//!   expired pays one atomic load) and by [`VectorIndex::sweep`], which a caller may run
//!   periodically so an index nobody calls gives its memory back.
//! - **Bytes.** Each entry counts `4 × dims` (its vector), plus the caller's `bytes` (its
//!   value), plus [`ENTRY_OVERHEAD`] (bookkeeping and graph links). While the whole index is over
//!   [`IndexConfig::max_bytes`], the oldest entries (by insert, across every scope) are
//!   evicted. An entry larger than the whole bound is not stored.
//! - **Removal.** A removed, expired or evicted entry's value is dropped at once; in a
//!   partition with a graph its node stays as a tombstone (walked through, never returned)
//!   until tombstones outnumber live entries, when the graph is rebuilt over the live ones
//!   (off the lock, as above). Without a graph, tombstones are compacted away.
//!
//! Concurrency: the index is `Send + Sync`, shared as an `Arc`; every method is synchronous
//! and holds its locks (parking_lot) only for the call. A partition's searches share a read
//! lock; an insert takes that partition's write lock for one graph insert (tens of
//! microseconds). The global ledger (age and expiry order, byte total) has its own mutex,
//! never held together with a partition's lock.
//!
//! ## Why our own HNSW
//!
//! Crates checked (`cargo info`, December 2026): `instant-distance` builds a graph once, with
//! no insert or delete afterwards; `hnsw` (rust-cv) inserts but cannot delete; `hnsw_rs` has
//! no deletion and brings rayon, mmap and a SIMD dependency tree; `hnswlib-rs` (a port of
//! hnswlib, with deletion) sizes its graph up front (`max_nodes`), fixes the dimension per
//! index and brings its own kernel crate. The index needs incremental insert, tombstones with
//! a rebuild that does not stall searches, and one vector store shared with the exact scan;
//! the algorithm fits in ~400 lines ([`hnsw`]), with no dependency and no `unsafe`.
//!
//! ## Switch point, parameters, memory (measured)
//!
//! Measured on the shared 2-core machine (load 2–5), release build of this module, vectors
//! clustered like text embeddings (the tests' and bench's generator: a shared direction,
//! topics, wide spread; a fresh question's nearest stored one at cosine ~0.72), k = 1:
//!
//! | live entries | exact p50, 64 dims | HNSW p50, 64 dims | exact p50, 384 dims | HNSW p50, 384 dims |
//! |---:|---:|---:|---:|---:|
//! | 1,024 | 16 µs | 35 µs | 42 µs | 62 µs |
//! | 2,048 | 24 µs | 33 µs | 83 µs | 78 µs |
//! | 4,096 | 56 µs | 45 µs | 165 µs | 91 µs |
//! | 8,192 | 96 µs | 38 µs | 339 µs | 126 µs |
//! | 16,384 | 195 µs | 45 µs | 975 µs | 163 µs |
//!
//! So [`DEFAULT_EXACT_UP_TO`] = 2,048: the crossover for 384-dim vectors, and within 10 µs
//! of the graph for the built-in 64-dim model (whose crossover is near 3,000), while exact
//! search is exact (recall 1) and costs no graph memory or build CPU. Past it the scan grows
//! linearly and the graph barely moves.
//!
//! Criterion (`benches/vindex.rs`, `--quick`, same build): search among 100,000 entries of
//! one scope **131 µs** (64 dims) and **341 µs** (384 dims), against the 1 ms
//! target; exact among 2,048: 20 µs / 83 µs. Insert into a full 100,000-entry scope (graph
//! insert + eviction of the oldest) 202 µs; into an exact partition 0.45 µs. A graph
//! build runs on its own thread: 100,000 × 64 dims took 17 s there (62 s at 384 dims) while
//! searches went on exactly.
//!
//! Recall@1 against exact search (`tests::hnsw_recall_at_1_is_at_least_095`, threshold
//! 0.95): 20,000 vectors, 64 dims: 1.000 on paraphrase-like queries, 0.998 on fresh
//! questions; 100,000 vectors: 0.998 (64 dims), 1.000 (384 dims). Parameters: M = 16
//! (32 links on level 0), ef_construction = 100, ef_search = max(64, k).
//!
//! Memory per entry: the vector (4 × dims, in contiguous chunks), the node (48 bytes: id,
//! value handle, two instants), the id map (~24), the ledger's two ordered maps (~80), and
//! with a graph ~160 bytes of links (measured: 159 on 10,000 entries): [`ENTRY_OVERHEAD`] =
//! 384 covers all but the vector and the caller's value. Tombstones keep their vector and
//! links until the rebuild (at most as many as live entries), so the real footprint of a
//! graph partition can reach twice its vectors just before a rebuild.

mod hnsw;
mod part;
pub mod shared;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::embed::Embedding;
use part::{Node, Part};

/// The caller's partition key (hash of model, app, system prompt…). Entries of two scopes
/// never meet.
pub type Scope = u128;

/// Bytes counted per entry besides its vector and the caller's `bytes`: the node (id, value
/// handle, two instants), the id map, the ledger's two ordered maps and the graph's links
/// (~160 bytes), rounded up. Measured: see the module documentation.
pub const ENTRY_OVERHEAD: u64 = 384;

/// Expired entries reclaimed by one insert or search at most (the rest by later calls or
/// [`VectorIndex::sweep`]), so one call never pays for a whole expired generation.
pub const SWEEP_PER_CALL: usize = 64;

/// Graph builds running at once per index, at most (each on a thread of its own); a
/// partition that needs one past this waits for its next change.
pub const MAX_BUILDS: usize = 2;

/// The switch point the semantic cache uses by default: partitions up to this many live
/// entries are scanned exactly (see the module documentation for the measurement).
pub const DEFAULT_EXACT_UP_TO: usize = 2_048;

#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Whole index, counting vectors + the caller's `bytes` per entry (+ [`ENTRY_OVERHEAD`]).
    pub max_bytes: u64,
    /// An entry older than this is never returned, and is swept.
    pub ttl: Duration,
    /// Per scope: exact scan up to this many live entries; an approximate index (HNSW) past
    /// it.
    pub exact_up_to: usize,
}

/// Where "now" comes from: the real monotonic clock, or a test's.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// [`Instant::now`].
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (tests of TTL without sleeping).
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }
}

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        let mut o = self.offset.lock();
        *o = o.saturating_add(d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        let o = *self.offset.lock();
        self.start.checked_add(o).unwrap_or(self.start)
    }
}

/// An entry's handle, unique within one index for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryId(u64);

pub struct Hit<V> {
    pub id: EntryId,
    pub similarity: f32,
    pub value: Arc<V>,
    /// Time since the entry was inserted (in this index).
    pub age: Duration,
}

impl<V> std::fmt::Debug for Hit<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hit")
            .field("id", &self.id)
            .field("similarity", &self.similarity)
            .field("age", &self.age)
            .finish_non_exhaustive()
    }
}

/// A partition: one scope's vectors of one length.
type PartKey = (Scope, usize);

/// What the ledger knows of an entry.
#[derive(Debug, Clone, Copy)]
struct Rec {
    part: PartKey,
    cost: u64,
    expires: Instant,
}

/// Every entry in insert order (ids grow) and in expiry order, and the byte total.
#[derive(Default)]
struct Ledger {
    by_age: BTreeMap<u64, Rec>,
    by_expiry: BTreeSet<(Instant, u64)>,
    bytes: u64,
}

impl Ledger {
    fn take(&mut self, id: u64) -> Option<Rec> {
        let rec = self.by_age.remove(&id)?;
        self.by_expiry.remove(&(rec.expires, id));
        self.bytes = self.bytes.saturating_sub(rec.cost);
        Some(rec)
    }

    /// Takes up to `max` entries expired at `now`, soonest expiry first.
    fn take_expired(&mut self, now: Instant, max: usize, out: &mut Vec<(u64, Rec)>) {
        while out.len() < max {
            let Some(&(at, id)) = self.by_expiry.first() else {
                return;
            };
            if at > now {
                return;
            }
            match self.take(id) {
                Some(rec) => out.push((id, rec)),
                None => {
                    self.by_expiry.pop_first();
                }
            }
        }
    }
}

/// Graph builds running, so [`VectorIndex::settle`] can wait for them.
#[derive(Default)]
struct Builds {
    running: Mutex<usize>,
    idle: Condvar,
}

/// Decrements the running count however the build ends.
struct BuildGuard(Arc<Builds>);

impl Drop for BuildGuard {
    fn drop(&mut self) {
        let mut n = self.0.running.lock();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The index. `Send + Sync`; share it as an `Arc`.
pub struct VectorIndex<V: Send + Sync + 'static> {
    cfg: IndexConfig,
    clock: Arc<dyn Clock>,
    parts: RwLock<HashMap<PartKey, Arc<RwLock<Part<V>>>>>,
    ledger: Mutex<Ledger>,
    /// Inserts and removals hold it shared, [`VectorIndex::clear`] exclusively: a clear never
    /// lands between an insert's partition write and its ledger record.
    gate: RwLock<()>,
    next_id: AtomicU64,
    len: AtomicUsize,
    bytes: AtomicU64,
    /// The soonest expiry in the ledger, in nanoseconds after `epoch` (`u64::MAX`: none), so
    /// a search knows with one atomic load whether there is anything to sweep.
    next_expiry: AtomicU64,
    epoch: Instant,
    builds: Arc<Builds>,
}

impl<V: Send + Sync + 'static> std::fmt::Debug for VectorIndex<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("cfg", &self.cfg)
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl<V: Send + Sync + 'static> Drop for VectorIndex<V> {
    /// Running graph builds stop at their next check instead of finishing for nothing.
    fn drop(&mut self) {
        for p in self.parts.get_mut().values() {
            p.write().retired = true;
        }
    }
}

/// Bytes an entry counts for.
pub fn entry_cost(dims: usize, bytes: usize) -> u64 {
    (dims as u64)
        .saturating_mul(4)
        .saturating_add(bytes as u64)
        .saturating_add(ENTRY_OVERHEAD)
}

/// A partition's graph seed, from its key: reproducible graphs for a given insert order.
fn seed_of(key: PartKey) -> u64 {
    (key.0 as u64) ^ ((key.0 >> 64) as u64) ^ (key.1 as u64).rotate_left(32)
}

impl<V: Send + Sync + 'static> VectorIndex<V> {
    pub fn new(cfg: IndexConfig) -> Self {
        Self::with_clock(cfg, Arc::new(SystemClock))
    }

    /// An index reading time from `clock` (tests: [`ManualClock`]).
    pub fn with_clock(cfg: IndexConfig, clock: Arc<dyn Clock>) -> Self {
        let epoch = clock.now();
        Self {
            cfg,
            clock,
            next_expiry: AtomicU64::new(u64::MAX),
            epoch,
            parts: RwLock::new(HashMap::new()),
            ledger: Mutex::new(Ledger::default()),
            gate: RwLock::new(()),
            next_id: AtomicU64::new(1),
            len: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            builds: Arc::new(Builds::default()),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    /// Adds an entry; evicts the oldest entries (whole index) while over max_bytes. `bytes` is
    /// the caller's size of `value`.
    pub fn insert(
        &self,
        scope: Scope,
        embedding: Embedding,
        value: Arc<V>,
        bytes: usize,
    ) -> EntryId {
        self.insert_with_ttl(scope, embedding, value, bytes, self.cfg.ttl)
    }

    /// [`VectorIndex::insert`] for an entry that expires after `ttl` (at most the index's
    /// TTL): an entry from another replica that has lived part of its life already.
    pub fn insert_with_ttl(
        &self,
        scope: Scope,
        embedding: Embedding,
        value: Arc<V>,
        bytes: usize,
        ttl: Duration,
    ) -> EntryId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dims = embedding.dims();
        let cost = entry_cost(dims, bytes);
        let ttl = ttl.min(self.cfg.ttl);
        if cost > self.cfg.max_bytes || ttl.is_zero() || dims == 0 {
            // Never stored: the id is simply never found.
            return EntryId(id);
        }
        let _gate = self.gate.read();
        let now = self.clock.now();
        // Far enough for any TTL a configuration can hold.
        let expires = now
            .checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let key = (scope, dims);
        let node = Node {
            id,
            value: Some(value),
            stored: now,
            expires,
        };
        let (part, job) = self.add_to_part(key, node, embedding.as_slice());
        if let Some(job) = job {
            self.spawn_build(part, job);
        }
        let mut victims = Vec::new();
        {
            let mut l = self.ledger.lock();
            l.by_age.insert(
                id,
                Rec {
                    part: key,
                    cost,
                    expires,
                },
            );
            l.by_expiry.insert((expires, id));
            l.bytes = l.bytes.saturating_add(cost);
            l.take_expired(now, SWEEP_PER_CALL, &mut victims);
            while l.bytes > self.cfg.max_bytes {
                let Some((&old, _)) = l.by_age.first_key_value() else {
                    break;
                };
                if let Some(rec) = l.take(old) {
                    victims.push((old, rec));
                }
            }
            self.publish_totals(&l);
        }
        for (vid, rec) in victims {
            self.kill(vid, rec.part);
        }
        EntryId(id)
    }

    /// Adds `node` to its partition (created if need be); the partition and any graph build
    /// it asks for.
    fn add_to_part(
        &self,
        key: PartKey,
        node: Node<V>,
        vector: &[f32],
    ) -> (Arc<RwLock<Part<V>>>, Option<part::Job>) {
        loop {
            let found = self.parts.read().get(&key).cloned();
            let part = match found {
                Some(p) => p,
                None => self
                    .parts
                    .write()
                    .entry(key)
                    .or_insert_with(|| {
                        Arc::new(RwLock::new(Part::new(
                            key.1,
                            self.cfg.exact_up_to,
                            seed_of(key),
                        )))
                    })
                    .clone(),
            };
            let mut p = part.write();
            if p.retired {
                drop(p);
                let mut map = self.parts.write();
                if map.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, &part)) {
                    map.remove(&key);
                }
                continue;
            }
            let job = p.add(node, vector, self.may_build());
            drop(p);
            return (part, job);
        }
    }

    /// Tombstones entry `id` in its partition (already taken out of the ledger); a partition
    /// left empty leaves the map.
    fn kill(&self, id: u64, key: PartKey) {
        let Some(part) = self.parts.read().get(&key).cloned() else {
            return;
        };
        let mut p = part.write();
        let (_, job) = p.kill(id, self.may_build());
        let empty = p.is_idle_and_empty();
        if empty {
            p.retired = true;
        }
        drop(p);
        if empty {
            let mut map = self.parts.write();
            if map.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, &part)) {
                map.remove(&key);
            }
        } else if let Some(job) = job {
            self.spawn_build(part, job);
        }
    }

    fn may_build(&self) -> bool {
        *self.builds.running.lock() < MAX_BUILDS
    }

    fn spawn_build(&self, part: Arc<RwLock<Part<V>>>, job: part::Job) {
        *self.builds.running.lock() += 1;
        let guard = BuildGuard(self.builds.clone());
        let p = part.clone();
        let spawned = std::thread::Builder::new()
            .name("vindex-build".into())
            .spawn(move || {
                let _guard = guard;
                part::build(&p, job);
            });
        if let Err(e) = spawned {
            // No thread: stay exact (or on the old graph); the next change asks again.
            tracing::warn!(error = %e, "vector index: cannot start a graph build");
            part.write().abandon_build();
        }
    }

    fn publish_totals(&self, l: &Ledger) {
        self.len.store(l.by_age.len(), Ordering::Relaxed);
        self.bytes.store(l.bytes, Ordering::Relaxed);
        let next = l
            .by_expiry
            .first()
            .map_or(u64::MAX, |(at, _)| self.nanos(*at));
        self.next_expiry.store(next, Ordering::Relaxed);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Up to `k` live entries of `scope` with cosine similarity >= min_similarity, best first.
    pub fn search(
        &self,
        scope: Scope,
        query: &Embedding,
        min_similarity: f32,
        k: usize,
    ) -> Vec<Hit<V>> {
        if k == 0 || min_similarity.is_nan() {
            return Vec::new();
        }
        let now = self.clock.now();
        if self.nanos(now) >= self.next_expiry.load(Ordering::Relaxed) {
            // Something expired: reclaim a few now (before taking the partition's lock).
            self.sweep_up_to(now, SWEEP_PER_CALL);
        }
        let Some(part) = self.parts.read().get(&(scope, query.dims())).cloned() else {
            return Vec::new();
        };
        let found = part.read().search(query.as_slice(), min_similarity, k, now);
        found
            .into_iter()
            .map(|f| Hit {
                id: EntryId(f.id),
                similarity: f.similarity,
                value: f.value,
                age: f.age,
            })
            .collect()
    }

    pub fn remove(&self, id: EntryId) -> bool {
        let _gate = self.gate.read();
        let rec = {
            let mut l = self.ledger.lock();
            let rec = l.take(id.0);
            self.publish_totals(&l);
            rec
        };
        match rec {
            Some(rec) => {
                self.kill(id.0, rec.part);
                true
            }
            None => false,
        }
    }

    /// Reclaims every expired entry now; returns how many. Inserts reclaim a few each (see
    /// [`SWEEP_PER_CALL`]); call this periodically to give an idle index's memory back.
    pub fn sweep(&self) -> usize {
        self.sweep_up_to(self.clock.now(), usize::MAX)
    }

    fn sweep_up_to(&self, now: Instant, max: usize) -> usize {
        let _gate = self.gate.read();
        let mut victims = Vec::new();
        {
            let mut l = self.ledger.lock();
            l.take_expired(now, max, &mut victims);
            self.publish_totals(&l);
        }
        let n = victims.len();
        for (id, rec) in victims {
            self.kill(id, rec.part);
        }
        n
    }

    /// Live entries (including expired ones not swept yet).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes counted (see [`entry_cost`]).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn clear(&self) {
        let _gate = self.gate.write();
        let parts = std::mem::take(&mut *self.parts.write());
        for p in parts.values() {
            p.write().retired = true;
        }
        let mut l = self.ledger.lock();
        *l = Ledger::default();
        self.publish_totals(&l);
    }

    /// Waits until no graph build is running (tests, benchmarks, and a start-up that wants
    /// its graphs ready before serving).
    pub fn settle(&self) {
        let mut n = self.builds.running.lock();
        while *n > 0 {
            self.builds.idle.wait(&mut n);
        }
    }

    #[cfg(test)]
    fn part(&self, scope: Scope, dims: usize) -> Option<Arc<RwLock<Part<V>>>> {
        self.parts.read().get(&(scope, dims)).cloned()
    }
}
