//! Criterion benchmarks of `tollgate::vindex` (issue 16: lookup among 100,000 entries,
//! target under 1 ms p50):
//! - search among 100,000 entries of one scope (HNSW), 64 dims (the built-in embedder) and
//!   384 dims (MiniLM-sized remote embedders);
//! - search among 2,048 entries (exact scan, the default switch point), for comparison;
//! - insert into a full 100,000-entry scope (graph insert + eviction of the oldest);
//! - insert below the switch point (exact partition).
//!
//! Vectors are clustered like text embeddings (a shared direction, topics, wide spread).
//!
//! `cargo bench --bench vindex` (`-- --quick` for a short run). Building the two 100,000
//! graphs takes a while before the first figure.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate::embed::Embedding;
use tollgate::vindex::{entry_cost, IndexConfig, VectorIndex, DEFAULT_EXACT_UP_TO};

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn gauss(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Same shape as the recall test's vectors (`vindex::tests::Clustered`).
struct Clustered {
    common: Vec<f32>,
    centers: Vec<Vec<f32>>,
    rng: StdRng,
}

impl Clustered {
    fn new(seed: u64, dims: usize, clusters: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let common = (0..dims).map(|_| gauss(&mut rng)).collect();
        let centers = (0..clusters)
            .map(|_| (0..dims).map(|_| gauss(&mut rng)).collect())
            .collect();
        Self {
            common,
            centers,
            rng,
        }
    }

    fn next(&mut self) -> Embedding {
        let c = self.rng.gen_range(0..self.centers.len());
        let center = &self.centers[c];
        let v = self
            .common
            .iter()
            .zip(center)
            .map(|(g, c)| 0.6 * g + c + gauss(&mut self.rng))
            .collect();
        Embedding::normalized(v).expect("non-zero")
    }
}

const PAYLOAD: usize = 2_000;

fn filled(n: usize, dims: usize, exact_up_to: usize) -> (VectorIndex<()>, Clustered) {
    let mut gen = Clustered::new(1, dims, 1_000);
    let idx = VectorIndex::new(IndexConfig {
        // Room for exactly `n`: inserting more evicts the oldest (steady state).
        max_bytes: entry_cost(dims, PAYLOAD) * n as u64,
        ttl: Duration::from_secs(3600),
        exact_up_to,
    });
    for _ in 0..n {
        idx.insert(1, gen.next(), Arc::new(()), PAYLOAD);
    }
    idx.settle();
    (idx, gen)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("vindex");
    g.sample_size(50);
    // `cargo test --all-targets` runs each benchmark once, unoptimised: building 100,000
    // entries' graphs there would take many minutes for nothing measured. Criterion is
    // given `--bench` only when it measures (the graph itself is tested in src/vindex).
    let measuring = std::env::args().any(|a| a == "--bench");
    let large = if measuring { 100_000 } else { 1_000 };
    for dims in [64, 384] {
        let (idx, mut gen) = filled(large, dims, DEFAULT_EXACT_UP_TO);
        let queries: Vec<Embedding> = (0..1024).map(|_| gen.next()).collect();
        let mut i = 0;
        g.bench_function(format!("search_100k_{dims}d"), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                black_box(idx.search(1, &queries[i], 0.75, 1))
            })
        });
        if dims == 64 {
            g.bench_function("insert_100k_64d_full", |b| {
                b.iter_batched(
                    || gen.next(),
                    |e| idx.insert(1, e, Arc::new(()), PAYLOAD),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    for dims in [64, 384] {
        let (idx, mut gen) = filled(DEFAULT_EXACT_UP_TO, dims, DEFAULT_EXACT_UP_TO);
        let queries: Vec<Embedding> = (0..1024).map(|_| gen.next()).collect();
        let mut i = 0;
        g.bench_function(format!("search_exact_2048_{dims}d"), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                black_box(idx.search(1, &queries[i], 0.75, 1))
            })
        });
    }
    let (idx, mut gen) = filled(1_000, 64, DEFAULT_EXACT_UP_TO);
    g.bench_function("insert_exact_64d_full", |b| {
        b.iter_batched(
            || gen.next(),
            |e| idx.insert(1, e, Arc::new(()), PAYLOAD),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
