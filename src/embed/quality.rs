//! The built-in embedder measured on `tests/data/semantic/paraphrases.jsonl`.
//!
//! Rows: `{"a", "b", "label", "kind"}` with `label` one of
//! - `paraphrase`: the same question asked differently; a cache should hit;
//! - `near_miss`: close wording, different question (`kind`: number, entity, negation,
//!   product, direction, other); a hit would be a wrong answer;
//! - `scope`: the same question under another app or model (`kind`: app, model). Text alone
//!   cannot tell these apart (their similarity is about 1): they are here for the cache's
//!   scope tests and are only reported.
//!
//! The test prints recall and false-hit rates over thresholds, for cosine alone and for
//! cosine plus [`super::specifics`], and fails when, at [`DEFAULT_THRESHOLD`], the
//! near-miss false-hit rate is above 1 % or recall falls below [`MIN_RECALL`].

use super::specifics::Specifics;
use super::tests::load;
use super::{Embedding, DEFAULT_THRESHOLD};

/// The recall floor at the default threshold (measured value minus a margin, so that a
/// regression of the embedder or the check fails here).
const MIN_RECALL: f64 = 0.75;
/// The bar.
const MAX_FALSE_HIT_RATE: f64 = 0.01;

#[derive(serde::Deserialize)]
struct Row {
    a: String,
    b: String,
    label: String,
    kind: String,
}

struct Scored {
    label: String,
    kind: String,
    cos: f32,
    compatible: bool,
    a: String,
    b: String,
}

#[test]
fn paraphrase_set_meets_the_false_hit_bar() {
    let Some(e) = load() else { return };
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/semantic/paraphrases.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Row =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("line {}: {err}", i + 1));
        assert!(
            matches!(r.label.as_str(), "paraphrase" | "near_miss" | "scope"),
            "line {}: label {}",
            i + 1,
            r.label
        );
        let (va, vb): (Embedding, Embedding) =
            (e.embed_sync(&r.a).unwrap(), e.embed_sync(&r.b).unwrap());
        rows.push(Scored {
            cos: va.cosine(&vb),
            compatible: Specifics::of(&r.a).mismatch(&Specifics::of(&r.b)).is_none(),
            label: r.label,
            kind: r.kind,
            a: r.a,
            b: r.b,
        });
    }
    let count = |l: &str| rows.iter().filter(|r| r.label == l).count();
    let (np, nn, ns) = (count("paraphrase"), count("near_miss"), count("scope"));
    assert!(np + nn + ns >= 200, "the set has {} pairs", np + nn + ns);
    assert!(np >= 100 && nn >= 100, "{np} paraphrases, {nn} near-misses");

    // Unrelated questions: every paraphrase row's first text against the other rows' second.
    let para: Vec<&Scored> = rows.iter().filter(|r| r.label == "paraphrase").collect();
    let mut unrelated = Vec::new();
    for (i, x) in para.iter().enumerate() {
        for (j, y) in para.iter().enumerate() {
            if i != j && x.a != y.a {
                let (vx, vy) = (e.embed_sync(&x.a).unwrap(), e.embed_sync(&y.b).unwrap());
                let ok = Specifics::of(&x.a).mismatch(&Specifics::of(&y.b)).is_none();
                unrelated.push((vx.cosine(&vy), ok));
            }
        }
    }
    let unrelated_rate = |t: f32| {
        unrelated.iter().filter(|(c, ok)| *c >= t && *ok).count() as f64 / unrelated.len() as f64
    };
    let rates = |t: f32, with_check: bool| {
        let hit = |r: &Scored| r.cos >= t && (!with_check || r.compatible);
        let rec = rows
            .iter()
            .filter(|r| r.label == "paraphrase" && hit(r))
            .count() as f64
            / np as f64;
        let fh = rows
            .iter()
            .filter(|r| r.label == "near_miss" && hit(r))
            .count() as f64
            / nn as f64;
        (rec, fh)
    };
    eprintln!("{np} paraphrases, {nn} near-misses, {ns} scope rows");
    eprintln!(
        "threshold | cosine only: recall  false-hits | + specifics: recall  false-hits  unrelated"
    );
    let mut t = 0.60f32;
    while t < 0.991 {
        let (r0, f0) = rates(t, false);
        let (r1, f1) = rates(t, true);
        eprintln!(
            "  {t:.2}    |        {:5.1} %   {:5.1} %   |        {:5.1} %   {:5.1} %   {:5.2} %",
            r0 * 100.0,
            f0 * 100.0,
            r1 * 100.0,
            f1 * 100.0,
            unrelated_rate(t) * 100.0
        );
        t += 0.02;
    }
    let (recall, false_hits) = rates(DEFAULT_THRESHOLD, true);
    for r in rows
        .iter()
        .filter(|r| r.label == "near_miss" && r.cos >= DEFAULT_THRESHOLD && r.compatible)
    {
        eprintln!(
            "FALSE HIT ({}, {:.3}): {:?} ~ {:?}",
            r.kind, r.cos, r.a, r.b
        );
    }
    for r in rows
        .iter()
        .filter(|r| r.label == "paraphrase" && !(r.cos >= DEFAULT_THRESHOLD && r.compatible))
    {
        eprintln!(
            "miss ({:.3}, compatible {}): {:?} ~ {:?}",
            r.cos, r.compatible, r.a, r.b
        );
    }
    let scope_min = rows
        .iter()
        .filter(|r| r.label == "scope")
        .map(|r| r.cos)
        .fold(1.0f32, f32::min);
    eprintln!(
        "scope rows: lowest similarity {scope_min:.3} (only the cache's scope keeps them apart)"
    );
    eprintln!(
        "at the default threshold {DEFAULT_THRESHOLD}: recall {:.1} %, near-miss false hits {:.1} %",
        recall * 100.0,
        false_hits * 100.0
    );
    let unrelated_hits = unrelated_rate(DEFAULT_THRESHOLD);
    eprintln!(
        "unrelated pairs ({}): {:.2} % hit at the default threshold",
        unrelated.len(),
        unrelated_hits * 100.0
    );
    assert!(
        unrelated_hits <= MAX_FALSE_HIT_RATE,
        "unrelated hit rate {unrelated_hits}"
    );
    assert!(
        false_hits <= MAX_FALSE_HIT_RATE,
        "false-hit rate {false_hits} above {MAX_FALSE_HIT_RATE}"
    );
    assert!(recall >= MIN_RECALL, "recall {recall} below {MIN_RECALL}");
}
