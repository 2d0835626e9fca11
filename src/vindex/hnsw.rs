//! A compact HNSW graph (Malkov & Yashunin, "Efficient and robust approximate nearest
//! neighbor search using Hierarchical Navigable Small World graphs", 2016) over unit vectors,
//! similarity = dot product. The graph holds only links; the vectors are the caller's
//! ([`Vectors`]), addressed by node number `0..len`. Nodes are never removed: the caller
//! filters dead ones out of results (`accept`) and rebuilds the graph when they pile up.
//!
//! Level 0 links live in one flat array (`M0` slots per node), the upper levels (one node in
//! `M` has any) in per-node vectors. Neighbours are chosen with the paper's heuristic
//! (algorithm 4), which keeps links between clusters and matters for clustered data such as
//! text embeddings.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Links per node on the upper levels.
pub const M: usize = 16;
/// Links per node on level 0 (the paper's recommended 2·M).
pub const M0: usize = 2 * M;
/// Candidates kept while inserting.
pub const EF_CONSTRUCTION: usize = 100;
/// Candidates kept while searching (at least `k`). Chosen by the recall test
/// (`vindex::tests::hnsw_recall`): see the module documentation of `vindex`.
pub const EF_SEARCH: usize = 64;
/// No level above this (2^-64 odds at M = 16 anyway).
const MAX_LEVEL: usize = 16;

/// The vectors the graph's node numbers refer to.
pub trait Vectors {
    fn vector(&self, node: u32) -> &[f32];
}

/// Dot product with eight independent accumulators so the compiler can vectorise it.
/// Vectors of different lengths compare as 0 (never similar).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for ((s, xi), yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A candidate: similarity to the query and node. Ordered by similarity (total order, so a
/// NaN can never break a heap), then node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cand {
    pub sim: f32,
    pub node: u32,
}

impl Eq for Cand {}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.sim
            .total_cmp(&other.sim)
            .then(other.node.cmp(&self.node))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

thread_local! {
    /// Visited marks for searches on this thread: `stamp[node] == epoch` means visited.
    /// Reused between searches (no allocation per search); shared by every graph, as a
    /// thread runs one search at a time.
    static VISITED: RefCell<(Vec<u32>, u32)> = const { RefCell::new((Vec::new(), 0)) };
}

/// Runs `f` with a fresh visited set for `n` nodes.
fn with_visited<R>(n: usize, f: impl FnOnce(&mut dyn FnMut(u32) -> bool) -> R) -> R {
    VISITED.with(|cell| {
        // A search never calls another search on the same thread, but if it ever did, fall
        // back to a private set rather than panic on the borrow.
        let Ok(mut guard) = cell.try_borrow_mut() else {
            let mut seen = vec![false; n];
            let mut visit = |i: u32| match seen.get_mut(i as usize) {
                Some(s) if !*s => {
                    *s = true;
                    true
                }
                _ => false,
            };
            return f(&mut visit);
        };
        let (stamps, epoch) = &mut *guard;
        if stamps.len() < n {
            stamps.resize(n, 0);
        }
        *epoch = epoch.wrapping_add(1);
        if *epoch == 0 {
            stamps.iter_mut().for_each(|s| *s = 0);
            *epoch = 1;
        }
        let e = *epoch;
        let mut visit = |i: u32| match stamps.get_mut(i as usize) {
            Some(s) if *s != e => {
                *s = e;
                true
            }
            _ => false,
        };
        f(&mut visit)
    })
}

#[derive(Debug, Clone)]
pub struct Graph {
    /// Level of each node.
    levels: Vec<u8>,
    /// Level-0 links: node `i` at `i * M0 .. i * M0 + count0[i]`.
    links0: Vec<u32>,
    count0: Vec<u8>,
    /// Upper-level links of each node: `upper[i][l - 1]` for level `l` (empty for most).
    upper: Vec<Vec<Vec<u32>>>,
    entry: Option<u32>,
    top: usize,
    rng: u64,
}

impl Graph {
    pub fn new(seed: u64) -> Self {
        Self {
            levels: Vec::new(),
            links0: Vec::new(),
            count0: Vec::new(),
            upper: Vec::new(),
            entry: None,
            top: 0,
            rng: seed | 1,
        }
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    /// Bytes of links held (for the memory figures in the docs).
    #[cfg(test)]
    pub fn link_bytes(&self) -> usize {
        self.links0.len() * 4
            + self.count0.len()
            + self.levels.len()
            + self
                .upper
                .iter()
                .map(|u| 24 + u.iter().map(|l| 24 + l.len() * 4).sum::<usize>())
                .sum::<usize>()
    }

    /// splitmix64: deterministic levels for a given seed (reproducible tests).
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn random_level(&mut self) -> usize {
        // u in (0, 1]; level = floor(-ln(u) / ln(M)).
        let u = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let l = (-u.ln() / (M as f64).ln()).floor();
        if l.is_finite() && l > 0.0 {
            (l as usize).min(MAX_LEVEL)
        } else {
            0
        }
    }

    fn links(&self, node: u32, level: usize) -> &[u32] {
        let i = node as usize;
        if level == 0 {
            let n = self.count0.get(i).copied().unwrap_or(0) as usize;
            self.links0.get(i * M0..i * M0 + n).unwrap_or(&[])
        } else {
            self.upper
                .get(i)
                .and_then(|u| u.get(level - 1))
                .map_or(&[], Vec::as_slice)
        }
    }

    fn set_links(&mut self, node: u32, level: usize, links: &[u32]) {
        let i = node as usize;
        if level == 0 {
            let n = links.len().min(M0);
            if let Some(slots) = self.links0.get_mut(i * M0..i * M0 + n) {
                slots.copy_from_slice(&links[..n]);
                if let Some(c) = self.count0.get_mut(i) {
                    *c = n as u8;
                }
            }
        } else if let Some(l) = self.upper.get_mut(i).and_then(|u| u.get_mut(level - 1)) {
            l.clear();
            l.extend_from_slice(&links[..links.len().min(M)]);
        }
    }

    /// Adds node `len()` (its vector must already be in `vecs`).
    pub fn insert(&mut self, vecs: &impl Vectors) {
        let Ok(node) = u32::try_from(self.len()) else {
            return;
        };
        let level = self.random_level();
        self.levels.push(level as u8);
        self.links0.extend(std::iter::repeat_n(0, M0));
        self.count0.push(0);
        self.upper.push(vec![Vec::new(); level]);
        let Some(mut ep) = self.entry else {
            self.entry = Some(node);
            self.top = level;
            return;
        };
        let q = vecs.vector(node);
        for l in (level + 1..=self.top).rev() {
            ep = self.greedy(vecs, q, ep, l);
        }
        for l in (0..=level.min(self.top)).rev() {
            let found = self.search_level(vecs, q, &[ep], EF_CONSTRUCTION, l, None);
            let max = if l == 0 { M0 } else { M };
            let chosen = select(vecs, &found, M);
            let links: Vec<u32> = chosen.iter().map(|c| c.node).collect();
            self.set_links(node, l, &links);
            for c in &chosen {
                self.link_back(vecs, c.node, node, l, max);
            }
            if let Some(best) = found.first() {
                ep = best.node;
            }
        }
        if level > self.top {
            self.top = level;
            self.entry = Some(node);
        }
    }

    /// Adds `node` to `to`'s links on `level`, pruning with the heuristic when full.
    fn link_back(&mut self, vecs: &impl Vectors, to: u32, node: u32, level: usize, max: usize) {
        let current = self.links(to, level);
        if current.contains(&node) {
            return;
        }
        if current.len() < max {
            let mut l = current.to_vec();
            l.push(node);
            self.set_links(to, level, &l);
            return;
        }
        let base = vecs.vector(to);
        let mut cands: Vec<Cand> = current
            .iter()
            .chain(std::iter::once(&node))
            .map(|&n| Cand {
                sim: dot(base, vecs.vector(n)),
                node: n,
            })
            .collect();
        cands.sort_by(|a, b| b.cmp(a));
        let kept: Vec<u32> = select(vecs, &cands, max).iter().map(|c| c.node).collect();
        self.set_links(to, level, &kept);
    }

    /// Greedy walk on `level` towards `q`.
    fn greedy(&self, vecs: &impl Vectors, q: &[f32], mut ep: u32, level: usize) -> u32 {
        let mut best = dot(q, vecs.vector(ep));
        loop {
            let mut moved = false;
            for &n in self.links(ep, level) {
                let s = dot(q, vecs.vector(n));
                if s > best {
                    best = s;
                    ep = n;
                    moved = true;
                }
            }
            if !moved {
                return ep;
            }
        }
    }

    /// The paper's SEARCH-LAYER: up to `ef` nearest accepted nodes, best first. Nodes that
    /// `accept` refuses are walked through but not returned.
    fn search_level(
        &self,
        vecs: &impl Vectors,
        q: &[f32],
        eps: &[u32],
        ef: usize,
        level: usize,
        accept: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<Cand> {
        let ok = |n: u32| accept.is_none_or(|a| a(n));
        with_visited(self.len(), |visit| {
            let mut cands: BinaryHeap<Cand> = BinaryHeap::new();
            // Min-heap of the best `ef` accepted so far.
            let mut best: BinaryHeap<Reverse<Cand>> = BinaryHeap::new();
            for &e in eps {
                if !visit(e) {
                    continue;
                }
                let c = Cand {
                    sim: dot(q, vecs.vector(e)),
                    node: e,
                };
                cands.push(c);
                if ok(e) {
                    best.push(Reverse(c));
                }
            }
            while let Some(c) = cands.pop() {
                if best.len() >= ef {
                    if let Some(Reverse(worst)) = best.peek() {
                        if c.sim < worst.sim {
                            break;
                        }
                    }
                }
                for &n in self.links(c.node, level) {
                    if !visit(n) {
                        continue;
                    }
                    let s = dot(q, vecs.vector(n));
                    let full = best.len() >= ef;
                    let worst = best.peek().map_or(f32::NEG_INFINITY, |r| r.0.sim);
                    if !full || s > worst {
                        let nc = Cand { sim: s, node: n };
                        cands.push(nc);
                        if ok(n) {
                            best.push(Reverse(nc));
                            if best.len() > ef {
                                best.pop();
                            }
                        }
                    }
                }
            }
            let mut out: Vec<Cand> = best.into_iter().map(|r| r.0).collect();
            out.sort_by(|a, b| b.cmp(a));
            out
        })
    }

    /// Up to `ef.max(k)` nearest nodes to `q` that `accept` takes, best first.
    pub fn search(
        &self,
        vecs: &impl Vectors,
        q: &[f32],
        ef: usize,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<Cand> {
        let Some(mut ep) = self.entry else {
            return Vec::new();
        };
        for l in (1..=self.top).rev() {
            ep = self.greedy(vecs, q, ep, l);
        }
        self.search_level(vecs, q, &[ep], ef, 0, Some(accept))
    }
}

/// The paper's heuristic (algorithm 4): from candidates sorted best first, keep one only if
/// it is closer to the base than to every one already kept, so links reach out in several
/// directions instead of all into the nearest cluster.
fn select(vecs: &impl Vectors, sorted: &[Cand], m: usize) -> Vec<Cand> {
    let mut kept: Vec<Cand> = Vec::with_capacity(m);
    for c in sorted {
        if kept.len() >= m {
            break;
        }
        let v = vecs.vector(c.node);
        if kept.iter().all(|k| dot(v, vecs.vector(k.node)) < c.sim) {
            kept.push(*c);
        }
    }
    kept
}
