//! Issue 15, Proof 1: precision and recall per category over the labelled set
//! (`tests/data/guard/labelled.jsonl`, written for tollgate by `generate.py` beside it).
//! Rows with `cuts` are also fed to the [`StreamScanner`] split there, and the stream's
//! findings are what is scored for them.
//!
//! Scored per text: a category is predicted when any finding has it. Thresholds (the
//! closing note states the same):
//! - structured data (email, payment_card, iban, us_ssn, aws_key, gcp_key, private_key, jwt,
//!   api_key): recall ≥ 0.95 and precision ≥ 0.95;
//! - phone, ip_address: recall ≥ 0.90, precision ≥ 0.90 (formats vary by country);
//! - prompt_injection: recall ≥ 0.85, precision ≥ 0.95; jailbreak: recall ≥ 0.80,
//!   precision ≥ 0.90 (phrasing is open-ended; the set holds phrasings the detectors miss);
//! - high_entropy_token: recall ≥ 0.80, precision ≥ 0.80;
//! - clean rows with any finding: at most 3%.
//!
//! `cargo test --lib guard::quality -- --nocapture` prints the table.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Action, Detector, GuardSpec, StreamScanner};

const DATA: &str = include_str!("../../tests/data/guard/labelled.jsonl");

#[derive(serde::Deserialize)]
struct Row {
    text: String,
    categories: Vec<String>,
    kind: String,
    #[serde(default)]
    cuts: Vec<usize>,
}

fn thresholds(cat: &str) -> (f64, f64) {
    match cat {
        "email" | "payment_card" | "iban" | "us_ssn" | "aws_key" | "gcp_key" | "private_key"
        | "jwt" | "api_key" => (0.95, 0.95),
        "phone" | "ip_address" => (0.90, 0.90),
        "prompt_injection" => (0.95, 0.85),
        "jailbreak" => (0.90, 0.80),
        "high_entropy_token" => (0.80, 0.80),
        _ => (1.0, 1.0),
    }
}

fn stream_categories(d: &Arc<Detector>, text: &str, cuts: &[usize]) -> Vec<String> {
    let mut s = StreamScanner::new(d.clone());
    let mut out = Vec::new();
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&text.len())) {
        let Some(delta) = text.get(at..c) else {
            panic!("cut {c} is not on a character boundary");
        };
        out.extend(s.push(delta).findings);
        at = c;
    }
    out.extend(s.finish().findings);
    out.iter().map(|f| f.category.to_string()).collect()
}

#[test]
fn precision_and_recall_per_category() {
    let d =
        Arc::new(Detector::compile(&GuardSpec::all(Action::Log)).unwrap_or_else(|e| panic!("{e}")));
    // category -> (tp, fp, fn)
    let mut score: BTreeMap<String, (u32, u32, u32)> = BTreeMap::new();
    let (mut clean, mut clean_hit) = (0u32, 0u32);
    let mut misses = Vec::new();
    let mut rows = 0;
    for line in DATA.lines().filter(|l| !l.trim().is_empty()) {
        let row: Row = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        rows += 1;
        let mut got: Vec<String> = if row.cuts.is_empty() {
            d.scan(&row.text)
                .iter()
                .map(|f| f.category.to_string())
                .collect()
        } else {
            stream_categories(&d, &row.text, &row.cuts)
        };
        got.sort();
        got.dedup();
        if row.kind == "clean" {
            clean += 1;
            if !got.is_empty() {
                clean_hit += 1;
            }
        }
        for c in &got {
            let e = score.entry(c.clone()).or_default();
            if row.categories.contains(c) {
                e.0 += 1;
            } else {
                e.1 += 1;
                misses.push(format!("FP {c}: {:?}", row.text));
            }
        }
        for c in &row.categories {
            if !got.contains(c) {
                score.entry(c.clone()).or_default().2 += 1;
                misses.push(format!("FN {c}: {:?}", row.text));
            }
        }
    }
    assert!(rows >= 300, "the labelled set has {rows} rows");
    let mut failures = Vec::new();
    println!(
        "{:<20} {:>4} {:>4} {:>4} {:>9} {:>7}",
        "category", "tp", "fp", "fn", "precision", "recall"
    );
    for (cat, (tp, fp, fne)) in &score {
        let p = f64::from(*tp) / f64::from((tp + fp).max(1));
        let r = f64::from(*tp) / f64::from((tp + fne).max(1));
        println!("{cat:<20} {tp:>4} {fp:>4} {fne:>4} {p:>9.3} {r:>7.3}");
        let (pmin, rmin) = thresholds(cat);
        if p < pmin || r < rmin {
            failures.push(format!(
                "{cat}: precision {p:.3} (min {pmin}), recall {r:.3} (min {rmin})"
            ));
        }
    }
    let rate = f64::from(clean_hit) / f64::from(clean.max(1));
    println!("clean rows with a finding: {clean_hit}/{clean} ({rate:.3})");
    for m in &misses {
        println!("{m}");
    }
    if rate > 0.03 {
        failures.push(format!("clean rows flagged: {rate:.3} (max 0.03)"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
