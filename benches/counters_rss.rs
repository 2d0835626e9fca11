//! Memory of the in-memory counters under a flood of distinct identifiers: one million
//! identifiers (by default) each go through a SpikeArrest and a day Quota keyed by
//! `x-user` (two counters per identifier), then the process's RSS is printed. Exits 1 when
//! the RSS exceeds the limit (256 MB by default).
//!
//!     cargo run --release --example counters_rss -- [identifiers] [limit MB]

use std::sync::Arc;

use tollgate::pipeline::{Direction, Hook, Outcome, Policy};
use tollgate::policies::{builder, BuildContext};
use tollgate::services::Services;
use tollgate::vars::Exchange;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn build(services: &Services, name: &str, kind: &str, yaml: &str) -> Arc<dyn Policy> {
    let ctx = BuildContext {
        name: name.into(),
        config_dir: None,
        services: services.clone(),
    };
    let spec = serde_norway::from_str(yaml).expect("valid YAML");
    builder(kind).expect("registered")(&ctx, spec).expect("valid spec")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let limit_mb: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let services = Services::default();
    let spike = build(
        &services,
        "spike",
        "SpikeArrest",
        "{rate: 10ps, identifier: '{request.header.x-user}'}",
    );
    let quota = build(
        &services,
        "quota",
        "Quota",
        "{allow: 100, timeUnit: day, identifier: '{request.header.x-user}'}",
    );
    let before = rss_kb();
    let started = std::time::Instant::now();
    for i in 0..n {
        let mut ex = Exchange::default();
        ex.request
            .headers
            .push("x-user".into(), format!("user-{i:012}"));
        for p in [&spike, &quota] {
            match p.run(&mut ex, Direction::Request) {
                Hook::Ready(Outcome::Continue) => {}
                Hook::Ready(o) => panic!("refused: {o:?}"),
                Hook::Pending(_) => panic!("memory counters decide at once"),
            }
        }
    }
    let after = rss_kb();
    println!(
        "identifiers={n} counters={} elapsed={:.2}s rss_before={}MB rss_after={}MB limit={}MB",
        services.counters.local.len(),
        started.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024,
        limit_mb
    );
    if after / 1024 > limit_mb {
        eprintln!("RSS over the limit");
        std::process::exit(1);
    }
}
