//! One partition of the index: the entries of one scope whose vectors have one length.
//! Searched exactly up to `exact_up_to` live entries, through an HNSW graph past it.
//!
//! Removal leaves a tombstone (the node stays in the graph for navigation, its value is
//! dropped at once); when tombstones outnumber live entries the graph is rebuilt over the live
//! ones. Graphs are built off the lock, on a thread of their own ([`build`]): searches and
//! inserts go on meanwhile (exactly, or on the old graph), and what changed during the build is
//! replayed onto the new graph under the lock before it replaces the old one.
//!
//! Vectors are copied into a [`Store`]: contiguous chunks of [`CHUNK`] vectors, so a distance
//! costs one cache miss (not two, through a node and an `Arc`), an exact scan reads memory in
//! order, and a build's snapshot is a clone of the chunk handles (full chunks never change).

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::hnsw::{self, Cand, Graph, Vectors};
/// Vectors per chunk of a [`Store`].
const CHUNK: usize = 1024;

/// Vectors of one length, numbered from 0, in chunks of [`CHUNK`]. Cloning shares the
/// chunks; a push into a shared last chunk copies that chunk only.
#[derive(Clone)]
pub(super) struct Store {
    dims: usize,
    chunks: Vec<Arc<Vec<f32>>>,
    len: usize,
}

impl Store {
    pub fn new(dims: usize) -> Self {
        Self {
            dims,
            chunks: Vec::new(),
            len: 0,
        }
    }

    pub fn push(&mut self, v: &[f32]) {
        if v.len() != self.dims {
            // The partition key includes the length: cannot happen. Keep numbering aligned.
            let zeros = vec![0.0; self.dims];
            return self.push(&zeros);
        }
        if self.len.is_multiple_of(CHUNK) {
            self.chunks
                .push(Arc::new(Vec::with_capacity(CHUNK * self.dims)));
        }
        if let Some(last) = self.chunks.last_mut() {
            Arc::make_mut(last).extend_from_slice(v);
            self.len += 1;
        }
    }

    pub fn get(&self, i: u32) -> &[f32] {
        let i = i as usize;
        let off = (i % CHUNK) * self.dims;
        self.chunks
            .get(i / CHUNK)
            .and_then(|c| c.get(off..off + self.dims))
            .unwrap_or(&[])
    }

    /// Only these vectors, in this order.
    fn select(&self, keep: impl Iterator<Item = u32>) -> Self {
        let mut s = Self::new(self.dims);
        for i in keep {
            s.push(self.get(i));
        }
        s
    }
}

impl Vectors for Store {
    fn vector(&self, node: u32) -> &[f32] {
        self.get(node)
    }
}

pub(super) struct Node<V> {
    pub id: u64,
    /// `None`: removed (a tombstone, kept while a graph links to it).
    pub value: Option<Arc<V>>,
    pub stored: Instant,
    pub expires: Instant,
}

impl<V> Clone for Node<V> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            value: self.value.clone(),
            stored: self.stored,
            expires: self.expires,
        }
    }
}

/// A search result inside a partition.
pub(super) struct Found<V> {
    pub id: u64,
    pub similarity: f32,
    pub value: Arc<V>,
    pub age: Duration,
}

/// A graph to build off the lock: the partition's vectors when it was asked for, the live
/// nodes' numbers then, and how many nodes the partition had.
pub(super) struct Job {
    store: Store,
    live: Vec<u32>,
    upto: usize,
    seed: u64,
}

pub(super) struct Part<V> {
    nodes: Vec<Node<V>>,
    /// `nodes[i]`'s vector is `store.get(i)`.
    store: Store,
    /// Live entries only.
    by_id: HashMap<u64, u32>,
    graph: Option<Graph>,
    /// A graph is being built for this partition ([`build`]): node numbers stay put (no
    /// compaction) until it is installed.
    building: bool,
    /// Taken out of the index (emptied or cleared): an insert that finds it so starts over.
    pub retired: bool,
    exact_up_to: usize,
    seed: u64,
}

impl<V> Part<V> {
    pub fn new(dims: usize, exact_up_to: usize, seed: u64) -> Self {
        Self {
            nodes: Vec::new(),
            store: Store::new(dims),
            by_id: HashMap::new(),
            graph: None,
            building: false,
            retired: false,
            exact_up_to,
            seed,
        }
    }

    pub fn live(&self) -> usize {
        self.by_id.len()
    }

    #[cfg(test)]
    pub fn has_graph(&self) -> bool {
        self.graph.is_some()
    }

    #[cfg(test)]
    pub fn link_bytes(&self) -> usize {
        self.graph.as_ref().map_or(0, Graph::link_bytes)
    }

    /// The build thread could not start: searches stay exact (or on the old graph) and the
    /// next change asks again.
    pub fn abandon_build(&mut self) {
        self.building = false;
    }

    pub fn is_idle_and_empty(&self) -> bool {
        self.by_id.is_empty() && !self.building
    }

    /// Adds an entry; `may_build`: a graph build may start (the index's cap on concurrent
    /// builds is not reached; otherwise a later change asks again).
    pub fn add(&mut self, node: Node<V>, vector: &[f32], may_build: bool) -> Option<Job> {
        let Ok(i) = u32::try_from(self.nodes.len()) else {
            // Four billion nodes in one partition: the byte bound makes this unreachable.
            return None;
        };
        self.by_id.insert(node.id, i);
        self.nodes.push(node);
        self.store.push(vector);
        if let Some(g) = self.graph.as_mut() {
            g.insert(&self.store);
        }
        self.maintain(may_build)
    }

    /// Removes entry `id` (a tombstone); false if it is not here.
    pub fn kill(&mut self, id: u64, may_build: bool) -> (bool, Option<Job>) {
        let Some(i) = self.by_id.remove(&id) else {
            return (false, None);
        };
        if let Some(n) = self.nodes.get_mut(i as usize) {
            n.value = None;
        }
        (true, self.maintain(may_build))
    }

    /// Compacts, drops or asks for a graph as the live count and tombstones require.
    fn maintain(&mut self, may_build: bool) -> Option<Job> {
        if self.building {
            return None;
        }
        let live = self.live();
        let dead = self.nodes.len() - live;
        match self.graph {
            None if live > self.exact_up_to => may_build.then(|| self.job()),
            None if dead > live.max(32) => {
                self.compact();
                None
            }
            None => None,
            Some(_) if live <= self.exact_up_to / 2 => {
                self.graph = None;
                self.compact();
                None
            }
            Some(_) if dead > live.max(64) => may_build.then(|| self.job()),
            Some(_) => None,
        }
    }

    fn job(&mut self) -> Job {
        self.building = true;
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let live = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.value.is_some())
            .map(|(i, _)| i as u32)
            .collect();
        Job {
            store: self.store.clone(),
            live,
            upto: self.nodes.len(),
            seed: self.seed,
        }
    }

    /// Drops tombstones (no graph: node numbers are free to change).
    fn compact(&mut self) {
        let live = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.value.is_some())
            .map(|(i, _)| i as u32);
        self.store = self.store.select(live);
        self.nodes.retain(|n| n.value.is_some());
        self.reindex();
    }

    fn reindex(&mut self) {
        self.by_id = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.value.is_some())
            .map(|(i, n)| (n.id, i as u32))
            .collect();
    }

    /// Up to `k` live entries with similarity >= `min`, best first.
    pub fn search(&self, q: &[f32], min: f32, k: usize, now: Instant) -> Vec<Found<V>> {
        let k = k.min(self.live());
        if k == 0 {
            return Vec::new();
        }
        let alive = |i: u32| {
            self.nodes
                .get(i as usize)
                .is_some_and(|n| n.value.is_some() && n.expires > now)
        };
        let cands: Vec<Cand> = match &self.graph {
            Some(g) => g.search(&self.store, q, hnsw::EF_SEARCH.max(k), &alive),
            None => self.scan(q, min, k, now),
        };
        cands
            .into_iter()
            .filter(|c| c.sim >= min)
            .take(k)
            .filter_map(|c| {
                let n = self.nodes.get(c.node as usize)?;
                Some(Found {
                    id: n.id,
                    similarity: c.sim,
                    value: n.value.clone()?,
                    age: now.saturating_duration_since(n.stored),
                })
            })
            .collect()
    }

    /// Exact: every live node, the best `k` at or above `min`, best first.
    fn scan(&self, q: &[f32], min: f32, k: usize, now: Instant) -> Vec<Cand> {
        let mut best: BinaryHeap<std::cmp::Reverse<Cand>> = BinaryHeap::with_capacity(k + 1);
        for (i, n) in self.nodes.iter().enumerate() {
            if n.value.is_none() || n.expires <= now {
                continue;
            }
            let sim = hnsw::dot(q, self.store.get(i as u32));
            if sim < min {
                continue;
            }
            if best.len() == k && best.peek().is_some_and(|w| sim <= w.0.sim) {
                continue;
            }
            best.push(std::cmp::Reverse(Cand {
                sim,
                node: i as u32,
            }));
            if best.len() > k {
                best.pop();
            }
        }
        let mut out: Vec<Cand> = best.into_iter().map(|r| r.0).collect();
        out.sort_by(|a, b| b.cmp(a));
        out
    }

    /// Replaces the nodes with those the new graph `g` was built over (`built[i]` is graph
    /// node `i`'s number here, `store` their vectors in graph order), replays what was added
    /// since `upto`, and installs `g`.
    fn install(
        &mut self,
        mut g: Graph,
        mut store: Store,
        built: &[u32],
        upto: usize,
    ) -> Option<Job> {
        let fresh = self.nodes.len().saturating_sub(upto);
        let mut nodes: Vec<Node<V>> = Vec::with_capacity(built.len() + fresh);
        for &i in built {
            match self.nodes.get(i as usize) {
                Some(n) => nodes.push(n.clone()),
                // Cannot happen (no compaction while building); stop rather than misalign.
                None => {
                    self.building = false;
                    return None;
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate().skip(upto) {
            if n.value.is_some() {
                nodes.push(n.clone());
                store.push(self.store.get(i as u32));
                g.insert(&store);
            }
        }
        self.nodes = nodes;
        self.store = store;
        self.reindex();
        self.graph = Some(g);
        self.building = false;
        // Any next build runs on this same thread.
        self.maintain(true)
    }
}

/// Builds the graph `job` asks for, off the lock, and installs it. Inserts that arrive
/// meanwhile are added to the graph off the lock too, in rounds, until few enough are left
/// to replay under the lock (or after a few rounds, when inserts outpace the build).
pub(super) fn build<V>(part: &RwLock<Part<V>>, mut job: Job) {
    const REPLAY_UNDER_LOCK: usize = 64;
    const ROUNDS: usize = 8;
    loop {
        let mut g = Graph::new(job.seed);
        // The live vectors in graph order, copied here rather than under the lock.
        let mut store = Store::new(job.store.dims);
        let mut round = 0;
        let next = loop {
            while let Some(&i) = job.live.get(g.len()) {
                store.push(job.store.get(i));
                g.insert(&store);
                // Cleared or dropped meanwhile: stop early rather than finish for nothing.
                if g.len().is_multiple_of(CHUNK) && part.read().retired {
                    part.write().building = false;
                    return;
                }
            }
            let mut p = part.write();
            if p.retired {
                p.building = false;
                return;
            }
            let fresh = p.nodes.get(job.upto..).unwrap_or(&[]);
            let waiting = fresh.iter().filter(|n| n.value.is_some()).count();
            if waiting <= REPLAY_UNDER_LOCK || round >= ROUNDS {
                break p.install(g, store, &job.live, job.upto);
            }
            let more: Vec<u32> = fresh
                .iter()
                .enumerate()
                .filter(|(_, n)| n.value.is_some())
                .map(|(i, _)| (job.upto + i) as u32)
                .collect();
            job.live.extend(more);
            job.store = p.store.clone();
            job.upto = p.nodes.len();
            round += 1;
        };
        match next {
            Some(j) => job = j,
            None => return,
        }
    }
}
