//! The fuzz targets' smoke mode, on stable Rust: every target (`tollgate::fuzz_entry`) runs
//! over its committed corpus (`fuzz/corpus/<target>/`), its regressions (inputs that once
//! crashed or stalled, `fuzz/regressions/<target>/`) and a bounded number of seeded
//! mutations of them. The real fuzzer is `cargo +nightly fuzz run <target>` (README, Tests).
//!
//! `TOLLGATE_FUZZ_SMOKE_ITERS` sets the mutations per target (default 400) and
//! `TOLLGATE_FUZZ_SMOKE_SECS` caps each target's mutation time (default 8 s);
//! `TOLLGATE_FUZZ_SMOKE_SEED` changes the seed. A failing input is written to
//! `target/fuzz-smoke-failures/<target>-<hash>` so it can be replayed and kept as a regression.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tollgate::fuzz_entry::TARGETS;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    out.sort();
    out
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few libFuzzer-style mutations of `base`, spliced with `other` at times.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u8] = &[
        0, 1, 0x7f, 0x80, 0xff, b'{', b'}', b'/', b'%', b'.', 0xc3, 0xe2,
    ];
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = rng.below(v.len() - i).min(16) + 1;
                v.drain(i..i + n);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            4 if !other.is_empty() => {
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if !v.is_empty() => {
                // Repeat a slice: long runs are what find super-linear paths.
                let i = rng.below(v.len());
                let n = rng.below(v.len() - i).min(8) + 1;
                let chunk = v[i..i + n].to_vec();
                for _ in 0..rng.below(32) {
                    v.splice(i..i, chunk.iter().copied());
                }
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v.truncate(4096);
    v
}

/// Runs `f` on `input`, keeping the input on a panic so it can be replayed.
/// A stack overflow aborts the process before any panic handler runs: the input about to
/// run is written first, as `<target>-last`.
fn run_one(name: &str, f: fn(&[u8]), input: &[u8], what: &str) {
    let dir = root().join("target/fuzz-smoke-failures");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}-last")), input);
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_ok() {
        return;
    }
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    panic!(
        "fuzz target {name} failed on {what}; input kept in {}",
        path.display()
    );
}

fn smoke(name: &str) {
    let f = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a known target");
    let fuzz = root().join("fuzz");
    let regressions = files(&fuzz.join("regressions").join(name));
    let corpus = files(&fuzz.join("corpus").join(name));
    for (path, input) in regressions.iter().chain(&corpus) {
        run_one(name, f, input, &path.display().to_string());
    }
    let seeds: Vec<&[u8]> = regressions
        .iter()
        .chain(&corpus)
        .map(|(_, b)| b.as_slice())
        .collect();
    assert!(
        !seeds.is_empty(),
        "fuzz/corpus/{name}/ holds the target's seeds"
    );
    let iters = env_num("TOLLGATE_FUZZ_SMOKE_ITERS", 400);
    let budget = Duration::from_secs(env_num("TOLLGATE_FUZZ_SMOKE_SECS", 8));
    let seed = env_num("TOLLGATE_FUZZ_SMOKE_SEED", 0x7011_6a7e);
    let mut rng = Rng(seed
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        | 1);
    let start = Instant::now();
    for i in 0..iters {
        if start.elapsed() > budget {
            break;
        }
        let base = seeds[rng.below(seeds.len())];
        let other = seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, base, other);
        run_one(name, f, &input, &format!("mutation {i} (seed {seed:#x})"));
    }
}

#[test]
fn fuzz_smoke_stream() {
    smoke("stream");
}

#[test]
fn fuzz_smoke_config() {
    smoke("config");
}

#[test]
fn fuzz_smoke_template() {
    smoke("template");
}

#[test]
fn fuzz_smoke_path_template() {
    smoke("path_template");
}

#[test]
fn fuzz_smoke_oas() {
    smoke("oas");
}

/// Every target has a corpus directory, and every directory a target.
#[test]
fn fuzz_dirs_match_targets() {
    let fuzz = root().join("fuzz");
    for (name, _) in TARGETS {
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs drives the target"
        );
    }
    for sub in ["corpus", "regressions"] {
        for e in std::fs::read_dir(fuzz.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().into_string().unwrap_or_default();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == n),
                "fuzz/{sub}/{n} belongs to no target"
            );
        }
    }
}
