//! Criterion benchmarks of `tollgate::embed` (issue 16):
//! - the built-in static embedder on a 1 KB prompt (tokenize, look up, average, normalise);
//! - the specifics check's extraction on the same prompt (a cache runs it per lookup);
//! - one cosine between two vectors of the model's size.
//!
//! Needs the model: `scripts/setup.sh` links it at `.tools/embed-model`, or set
//! `TOLLGATE_EMBED_MODEL_DIR`. Without it the benchmark says so and measures nothing.
//!
//! `cargo bench --bench embed` (`-- --quick` for a short run)

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::embed::specifics::Specifics;
use tollgate::embed::StaticEmbedder;

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A 1 KB chat prompt: a question with context, as users send them.
fn prompt_1k() -> String {
    let base = "I am building a small web service in Rust that proxies requests to an LLM \
        provider. Each request carries an API key; I want to count tokens per key, refuse \
        requests once a daily quota of 100000 tokens is spent, and cache answers for \
        questions that were already asked. How should I structure the quota store so that \
        two replicas do not overshoot the limit, and what should happen when the store is \
        unreachable? Please answer with a short design and a code sketch. ";
    let mut s = String::new();
    while s.len() < 1024 {
        s.push_str(base);
    }
    s.truncate(1024);
    s
}

fn model_dir() -> Option<PathBuf> {
    std::env::var_os("TOLLGATE_EMBED_MODEL_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/embed-model")])
        .find(|d| d.join("model.safetensors").is_file())
}

fn bench(c: &mut Criterion) {
    let Some(dir) = model_dir() else {
        eprintln!(
            "embed bench SKIPPED: no model (run scripts/setup.sh or set TOLLGATE_EMBED_MODEL_DIR)"
        );
        return;
    };
    let e = StaticEmbedder::load(&dir).unwrap_or_else(|err| panic!("{err}"));
    let prompt = prompt_1k();
    let v = e.embed_sync(&prompt).unwrap_or_else(|err| panic!("{err}"));
    let w = e
        .embed_sync("How should two replicas share a token quota store?")
        .unwrap_or_else(|err| panic!("{err}"));

    let mut g = c.benchmark_group("embed");
    g.throughput(Throughput::Bytes(prompt.len() as u64));
    g.bench_function("static_1k_prompt", |b| {
        b.iter(|| e.embed_sync(black_box(&prompt)))
    });
    g.bench_function("specifics_1k_prompt", |b| {
        b.iter(|| Specifics::of(black_box(&prompt)))
    });
    g.finish();
    c.bench_function("embed/cosine_64", |b| {
        b.iter(|| black_box(&v).cosine(black_box(&w)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
