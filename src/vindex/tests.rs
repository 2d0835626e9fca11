use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::embed::Embedding;

fn cfg(exact_up_to: usize) -> IndexConfig {
    IndexConfig {
        max_bytes: u64::MAX,
        ttl: Duration::from_secs(3600),
        exact_up_to,
    }
}

fn gauss(rng: &mut StdRng) -> f32 {
    // Box–Muller (rand 0.8 without rand_distr).
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn random(rng: &mut StdRng, dims: usize) -> Embedding {
    Embedding::normalized((0..dims).map(|_| gauss(rng)).collect()).expect("non-zero")
}

/// Vectors shaped like text embeddings: all share a common direction (embeddings of one
/// model are anisotropic), fall into topics (clusters), and vary widely around their topic:
/// a fresh question's nearest stored one is at cosine ~0.73 on average (20,000 entries, 64
/// dims), about the semantic cache's threshold, so the graph must tell close competitors
/// apart.
pub(super) struct Clustered {
    common: Vec<f32>,
    centers: Vec<Vec<f32>>,
    rng: StdRng,
    dims: usize,
}

impl Clustered {
    pub fn new(seed: u64, dims: usize, clusters: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let common = (0..dims).map(|_| gauss(&mut rng)).collect();
        let centers = (0..clusters)
            .map(|_| (0..dims).map(|_| gauss(&mut rng)).collect())
            .collect();
        Self {
            common,
            centers,
            rng,
            dims,
        }
    }

    pub fn next(&mut self) -> Embedding {
        let c = self.rng.gen_range(0..self.centers.len());
        let v = (0..self.dims)
            .map(|i| 0.6 * self.common[i] + self.centers[c][i] + gauss(&mut self.rng))
            .collect();
        Embedding::normalized(v).expect("non-zero")
    }

    /// A paraphrase of `e`: close to it, not equal.
    pub fn near(&mut self, e: &Embedding) -> Embedding {
        let v = e
            .as_slice()
            .iter()
            .map(|x| x + 0.03 * gauss(&mut self.rng))
            .collect();
        Embedding::normalized(v).expect("non-zero")
    }
}

/// Brute force: every (similarity, index) best first.
fn truth(all: &[Embedding], q: &Embedding) -> Vec<(f32, usize)> {
    let mut v: Vec<(f32, usize)> = all
        .iter()
        .enumerate()
        .map(|(i, e)| (e.cosine(q), i))
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    v
}

#[test]
fn exact_search_returns_the_true_top_k() {
    let mut rng = StdRng::seed_from_u64(1);
    let idx: VectorIndex<usize> = VectorIndex::new(cfg(10_000));
    let all: Vec<Embedding> = (0..600).map(|_| random(&mut rng, 64)).collect();
    for (i, e) in all.iter().enumerate() {
        idx.insert(7, e.clone(), Arc::new(i), 0);
    }
    for _ in 0..50 {
        let q = random(&mut rng, 64);
        let want = truth(&all, &q);
        let hits = idx.search(7, &q, -1.0, 10);
        let got: Vec<usize> = hits.iter().map(|h| *h.value).collect();
        let expect: Vec<usize> = want.iter().take(10).map(|w| w.1).collect();
        assert_eq!(got, expect);
        for (h, w) in hits.iter().zip(&want) {
            assert!((h.similarity - w.0).abs() < 1e-5);
        }
        // The threshold cuts, and never lets a lower one through.
        let min = (want[3].0 + want[4].0) / 2.0;
        let hits = idx.search(7, &q, min, 10);
        assert_eq!(hits.len(), 4);
        assert!(hits.iter().all(|h| h.similarity >= min));
    }
}

/// recall@1 of the HNSW graph against exact search, on 20,000 clustered 64-dim vectors
/// (paraphrase-like queries near stored entries, and fresh questions from the same topics).
/// Threshold: 0.95.
#[test]
fn hnsw_recall_at_1_is_at_least_095() {
    const N: usize = 20_000;
    const THRESHOLD: f64 = 0.95;
    let mut gen = Clustered::new(42, 64, 200);
    let idx: VectorIndex<usize> = VectorIndex::new(cfg(1_000));
    let all: Vec<Embedding> = (0..N).map(|_| gen.next()).collect();
    for (i, e) in all.iter().enumerate() {
        idx.insert(1, e.clone(), Arc::new(i), 0);
    }
    idx.settle();
    assert!(idx.part(1, 64).expect("partition").read().has_graph());
    let mut rng = StdRng::seed_from_u64(7);
    let (mut hit_near, mut hit_fresh) = (0usize, 0usize);
    const Q: usize = 300;
    for _ in 0..Q {
        let near = gen.near(&all[rng.gen_range(0..N)]);
        let fresh = gen.next();
        for (q, hits) in [(&near, &mut hit_near), (&fresh, &mut hit_fresh)] {
            let best = truth(&all, q)[0];
            let got = idx.search(1, q, -1.0, 1);
            if got.first().is_some_and(|h| *h.value == best.1) {
                *hits += 1;
            }
        }
    }
    let near = hit_near as f64 / Q as f64;
    let fresh = hit_fresh as f64 / Q as f64;
    eprintln!("hnsw recall@1 on {N} clustered vectors: near {near:.3}, fresh {fresh:.3}");
    assert!(near >= THRESHOLD, "recall@1 (paraphrases) {near}");
    assert!(fresh >= THRESHOLD, "recall@1 (fresh questions) {fresh}");
}

#[test]
fn ttl_hides_then_sweeps() {
    let clock = Arc::new(ManualClock::default());
    let idx: VectorIndex<&str> = VectorIndex::with_clock(
        IndexConfig {
            max_bytes: u64::MAX,
            ttl: Duration::from_secs(60),
            exact_up_to: 100,
        },
        clock.clone(),
    );
    let mut rng = StdRng::seed_from_u64(3);
    let a = random(&mut rng, 64);
    let b = random(&mut rng, 64);
    idx.insert(1, a.clone(), Arc::new("a"), 10);
    clock.advance(Duration::from_secs(59));
    let hits = idx.search(1, &a, 0.9, 1);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].age, Duration::from_secs(59));
    clock.advance(Duration::from_secs(1));
    assert_eq!(idx.len(), 1, "nothing reclaimed yet");
    // An insert reclaims what expired.
    idx.insert(1, b.clone(), Arc::new("b"), 10);
    assert_eq!(idx.len(), 1);
    assert_eq!(idx.bytes(), entry_cost(64, 10));
    assert!(idx.search(1, &a, -1.0, 5).iter().all(|h| *h.value == "b"));
    // A shorter TTL (an entry from another replica) is honoured; a longer one is capped.
    idx.insert_with_ttl(1, a.clone(), Arc::new("a2"), 10, Duration::from_secs(5));
    idx.insert_with_ttl(
        2,
        a.clone(),
        Arc::new("long"),
        10,
        Duration::from_secs(1_000),
    );
    assert_eq!(idx.len(), 3);
    clock.advance(Duration::from_secs(5));
    // A search never returns an expired entry, and reclaims it.
    assert!(idx.search(1, &a, 0.99, 1).is_empty(), "expired at its TTL");
    assert_eq!(idx.len(), 2);
    assert_eq!(idx.search(1, &b, 0.99, 1).len(), 1);
    clock.advance(Duration::from_secs(55));
    // Nothing called since: the sweep reclaims both (`long` capped at the index's TTL).
    assert_eq!(idx.sweep(), 2);
    assert!(idx.search(2, &a, -1.0, 1).is_empty());
    assert_eq!((idx.len(), idx.bytes()), (0, 0));
    // A zero TTL is never stored.
    let id = idx.insert_with_ttl(1, a.clone(), Arc::new("z"), 1, Duration::ZERO);
    assert!(idx.is_empty());
    assert!(!idx.remove(id));
}

#[test]
fn ttl_in_a_graph_partition() {
    let clock = Arc::new(ManualClock::default());
    let idx: VectorIndex<usize> = VectorIndex::with_clock(
        IndexConfig {
            max_bytes: u64::MAX,
            ttl: Duration::from_secs(10),
            exact_up_to: 64,
        },
        clock.clone(),
    );
    let mut gen = Clustered::new(5, 32, 10);
    let old: Vec<Embedding> = (0..300).map(|_| gen.next()).collect();
    for (i, e) in old.iter().enumerate() {
        idx.insert(1, e.clone(), Arc::new(i), 0);
    }
    clock.advance(Duration::from_secs(6));
    let new: Vec<Embedding> = (0..300).map(|_| gen.next()).collect();
    for (i, e) in new.iter().enumerate() {
        idx.insert(1, e.clone(), Arc::new(1000 + i), 0);
    }
    idx.settle();
    clock.advance(Duration::from_secs(5));
    for e in &old {
        for h in idx.search(1, e, -1.0, 5) {
            assert!(*h.value >= 1000, "an expired entry came back");
        }
    }
    idx.sweep();
    assert_eq!(idx.len(), 300);
    idx.settle();
    let found = new
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            idx.search(1, e, 0.999, 1)
                .first()
                .is_some_and(|h| *h.value == 1000 + i)
        })
        .count();
    assert!(
        found >= 297,
        "{found} of 300 found after the sweep and rebuild"
    );
}

#[test]
fn bytes_are_bounded_oldest_first() {
    let cost = entry_cost(64, 100);
    let idx: VectorIndex<usize> = VectorIndex::new(IndexConfig {
        max_bytes: cost * 10,
        ttl: Duration::from_secs(3600),
        exact_up_to: 4,
    });
    let mut rng = StdRng::seed_from_u64(9);
    let all: Vec<Embedding> = (0..25).map(|_| random(&mut rng, 64)).collect();
    for (i, e) in all.iter().enumerate() {
        // Two scopes: the bound and the age order are the whole index's.
        idx.insert((i % 2) as u128, e.clone(), Arc::new(i), 100);
        assert!(idx.bytes() <= cost * 10);
    }
    idx.settle();
    assert_eq!(idx.len(), 10);
    assert_eq!(idx.bytes(), cost * 10);
    for (i, e) in all.iter().enumerate() {
        let hits = idx.search((i % 2) as u128, e, 0.999, 1);
        let present = hits.first().is_some_and(|h| *h.value == i);
        assert_eq!(present, i >= 15, "entry {i}");
    }
    // Bigger than the whole bound: not stored, nothing evicted for it.
    let id = idx.insert(0, all[0].clone(), Arc::new(99), (cost * 10) as usize);
    assert_eq!(idx.len(), 10);
    assert!(!idx.remove(id));
    // A larger entry evicts as many old ones as it needs.
    idx.insert(0, all[0].clone(), Arc::new(100), 100 + 2 * cost as usize);
    assert_eq!(idx.len(), 8);
    assert!(idx.bytes() <= cost * 10);
}

#[test]
fn scopes_never_meet() {
    let mut rng = StdRng::seed_from_u64(11);
    for exact_up_to in [1000, 8] {
        let idx: VectorIndex<u128> = VectorIndex::new(cfg(exact_up_to));
        let shared = random(&mut rng, 64);
        for scope in [1u128, 2, u128::MAX] {
            idx.insert(scope, shared.clone(), Arc::new(scope), 0);
            for _ in 0..30 {
                idx.insert(scope, random(&mut rng, 64), Arc::new(scope), 0);
            }
        }
        idx.settle();
        for scope in [1u128, 2, u128::MAX] {
            let hits = idx.search(scope, &shared, -1.0, 100);
            assert_eq!(hits.len(), 31);
            assert!(hits.iter().all(|h| *h.value == scope));
            assert!(hits[0].similarity > 0.999);
        }
        assert!(idx.search(3, &shared, -1.0, 100).is_empty());
    }
}

#[test]
fn other_dimensions_never_match() {
    let mut rng = StdRng::seed_from_u64(12);
    let idx: VectorIndex<&str> = VectorIndex::new(cfg(1000));
    let v64 = random(&mut rng, 64);
    idx.insert(1, v64.clone(), Arc::new("64"), 0);
    // The first 32 dims of the same vector: as close as a prefix can be.
    let v32 = Embedding::normalized(v64.as_slice()[..32].to_vec()).unwrap();
    assert!(idx.search(1, &v32, -1.0, 10).is_empty());
    idx.insert(1, v32.clone(), Arc::new("32"), 0);
    let hits = idx.search(1, &v64, -1.0, 10);
    assert_eq!(hits.len(), 1);
    assert_eq!(*hits[0].value, "64");
    let hits = idx.search(1, &v32, -1.0, 10);
    assert_eq!(hits.len(), 1);
    assert_eq!(*hits[0].value, "32");
    assert_eq!(idx.len(), 2);
}

#[test]
fn removal_tombstones_rebuild_and_fall_back_to_exact() {
    let mut gen = Clustered::new(13, 32, 20);
    let idx: VectorIndex<usize> = VectorIndex::new(cfg(500));
    let all: Vec<Embedding> = (0..3000).map(|_| gen.next()).collect();
    let ids: Vec<EntryId> = all
        .iter()
        .enumerate()
        .map(|(i, e)| idx.insert(1, e.clone(), Arc::new(i), 0))
        .collect();
    idx.settle();
    assert!(idx.part(1, 32).unwrap().read().has_graph());
    for id in &ids[..2000] {
        assert!(idx.remove(*id));
        assert!(!idx.remove(*id), "removed twice");
    }
    idx.settle();
    assert_eq!(idx.len(), 1000);
    let part = idx.part(1, 32).unwrap();
    assert!(part.read().has_graph());
    assert!(part.read().live() == 1000);
    for (i, e) in all.iter().enumerate() {
        for h in idx.search(1, e, -1.0, 3) {
            assert!(*h.value >= 2000, "entry {} was removed", h.value);
        }
        if i >= 2000 {
            let h = idx.search(1, e, 0.999, 1);
            assert!(h.first().is_some_and(|h| *h.value == i), "entry {i}");
        }
    }
    for id in &ids[2000..2800] {
        assert!(idx.remove(*id));
    }
    idx.settle();
    assert!(!part.read().has_graph(), "200 live: exact again");
    for (i, e) in all.iter().enumerate().skip(2800) {
        let h = idx.search(1, e, 0.999, 1);
        assert!(h.first().is_some_and(|h| *h.value == i));
    }
    for id in &ids[2800..] {
        assert!(idx.remove(*id));
    }
    assert!(
        idx.part(1, 32).is_none(),
        "an empty partition leaves the map"
    );
    assert_eq!((idx.len(), idx.bytes()), (0, 0));
}

#[test]
fn odd_inputs_never_panic() {
    let mut rng = StdRng::seed_from_u64(14);
    let idx: VectorIndex<()> = VectorIndex::new(cfg(2));
    let e = random(&mut rng, 8);
    assert!(idx.search(0, &e, 0.0, 5).is_empty());
    for _ in 0..10 {
        idx.insert(0, random(&mut rng, 8), Arc::new(()), usize::MAX / 2);
        idx.insert(0, random(&mut rng, 8), Arc::new(()), 0);
    }
    idx.settle();
    assert!(idx.search(0, &e, 0.0, 0).is_empty());
    assert_eq!(idx.search(0, &e, -1.0, usize::MAX).len(), 20);
    assert_eq!(idx.search(0, &e, f32::NEG_INFINITY, 3).len(), 3);
    assert!(idx.search(0, &e, f32::NAN, 3).is_empty());
    assert!(idx.search(0, &e, 1.5, 3).is_empty());
    assert!(!idx.remove(EntryId(u64::MAX)));
    let one = Embedding::normalized(vec![1.0]).unwrap();
    idx.insert(0, one.clone(), Arc::new(()), 0);
    assert_eq!(idx.search(0, &one, 0.99, 3).len(), 1);
    idx.clear();
    assert_eq!((idx.len(), idx.bytes()), (0, 0));
    assert!(idx.search(0, &e, -1.0, 5).is_empty());
    idx.insert(0, e.clone(), Arc::new(()), 0);
    assert_eq!(idx.search(0, &e, 0.99, 5).len(), 1);
    // No room at all.
    let none: VectorIndex<()> = VectorIndex::new(IndexConfig {
        max_bytes: 0,
        ttl: Duration::MAX,
        exact_up_to: 0,
    });
    none.insert(0, e.clone(), Arc::new(()), 0);
    assert!(none.is_empty());
    let huge_ttl: VectorIndex<()> = VectorIndex::new(IndexConfig {
        max_bytes: u64::MAX,
        ttl: Duration::MAX,
        exact_up_to: 0,
    });
    huge_ttl.insert(0, e.clone(), Arc::new(()), 0);
    huge_ttl.settle();
    assert_eq!(huge_ttl.search(0, &e, 0.99, 1).len(), 1);
}

#[test]
fn concurrent_inserts_and_searches() {
    const THREADS: usize = 4;
    const EACH: usize = 1500;
    let idx: Arc<VectorIndex<(u128, usize)>> = Arc::new(VectorIndex::new(cfg(200)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut searchers = Vec::new();
    for t in 0..3u64 {
        let idx = idx.clone();
        let stop = stop.clone();
        searchers.push(std::thread::spawn(move || {
            let mut gen = Clustered::new(100 + t, 32, 10);
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let scope = (n % 2) as u128;
                let q = gen.next();
                let hits = idx.search(scope, &q, 0.2, 5);
                assert!(hits.len() <= 5);
                for w in hits.windows(2) {
                    assert!(w[0].similarity >= w[1].similarity);
                }
                for h in &hits {
                    assert_eq!(h.value.0, scope, "another scope's entry");
                    assert!(h.similarity >= 0.2);
                }
                n += 1;
            }
            n
        }));
    }
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let idx = idx.clone();
            std::thread::spawn(move || {
                let mut gen = Clustered::new(t as u64, 32, 10);
                let mut mine = Vec::new();
                for i in 0..EACH {
                    let scope = (i % 2) as u128;
                    let e = gen.next();
                    let id = idx.insert(scope, e.clone(), Arc::new((scope, t * EACH + i)), 0);
                    // Some removals too, so tombstones and rebuilds race with the rest.
                    if i % 7 == 0 {
                        assert!(idx.remove(id));
                    } else {
                        mine.push((scope, t * EACH + i, e));
                    }
                }
                mine
            })
        })
        .collect();
    let kept: Vec<(u128, usize, Embedding)> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in searchers {
        assert!(s.join().expect("searcher") > 0);
    }
    idx.settle();
    assert_eq!(idx.len(), kept.len());
    let found = kept
        .iter()
        .filter(|(scope, n, e)| {
            idx.search(*scope, e, 0.999, 1)
                .first()
                .is_some_and(|h| h.value.1 == *n)
        })
        .count();
    assert!(
        found * 100 >= kept.len() * 99,
        "{found} of {} found by their own vector",
        kept.len()
    );
}

/// Memory per entry: what the graph's links take (printed for the module documentation).
#[test]
fn memory_per_entry() {
    let mut gen = Clustered::new(21, 64, 50);
    let idx: VectorIndex<()> = VectorIndex::new(cfg(100));
    const N: usize = 3_000;
    for _ in 0..N {
        idx.insert(1, gen.next(), Arc::new(()), 0);
    }
    idx.settle();
    let links = idx.part(1, 64).unwrap().read().link_bytes();
    eprintln!(
        "graph links: {} bytes per entry; node {} bytes",
        links / N,
        std::mem::size_of::<part::Node<()>>()
    );
    assert!((links / N) as u64 + 100 < ENTRY_OVERHEAD);
}
