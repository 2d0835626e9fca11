//! `tollgate import` over the look-alike Apigee bundles in `tests/data/apigee-bundles/`
//! (written for the repo in the shapes of the public samples; `scripts/fetch-apigee-samples.sh`
//! runs the importer over the real ones when the network allows). For every bundle of
//! `manifest.json`: the binary converts it, `tollgate validate` accepts what it wrote, the
//! report's outcome is the one expected, and its not-convertible elements are exactly the
//! ones listed (file and element path). Also: `--check` writes nothing, the text and JSON
//! reports agree, and the share converted / approximated / refused is printed.
//! Run with `cargo test --test import_corpus`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{exit_within, repo_root, tollgate_bin};

fn corpus() -> PathBuf {
    repo_root().join("tests/data/apigee-bundles")
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(corpus().join("manifest.json")).expect("manifest.json");
    serde_json::from_str::<Value>(&text)
        .expect("manifest.json is JSON")
        .as_array()
        .expect("a list")
        .clone()
}

/// Runs `tollgate import ARGS`: (exit code, stdout, stderr).
fn import(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(tollgate_bin())
        .arg("import")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate import");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let reader = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (o, e) = (reader(Box::new(out)), reader(Box::new(err)));
    let status = exit_within(&mut child, Duration::from_secs(30), || {
        format!("tollgate import {args:?} did not finish within 30 s")
    });
    (
        status.code().unwrap_or(-1),
        o.join().unwrap_or_default(),
        e.join().unwrap_or_default(),
    )
}

fn validate(dir: &Path) -> (i32, String, String) {
    support::validate(dir)
}

#[test]
fn every_bundle_converts_to_a_valid_configuration_or_names_what_it_cannot() {
    let entries = manifest();
    assert!(entries.len() >= 20, "the corpus has at least 20 bundles");
    let tmp = tempfile::tempdir().expect("temp dir");
    let (mut conv, mut approx, mut refused) = (0usize, 0usize, 0usize);
    let (mut el_c, mut el_a, mut el_n) = (0usize, 0usize, 0usize);
    let mut listed = BTreeSet::new();
    for e in &entries {
        let name = e["bundle"].as_str().expect("bundle");
        listed.insert(name.to_owned());
        let bundle = corpus().join(name);
        let out = tmp.path().join(name.replace('.', "_"));
        let (code, stdout, stderr) =
            import(&[bundle.to_str().expect("path"), out.to_str().expect("path")]);
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("import/report.json"))
                .unwrap_or_else(|e| panic!("{name}: no report.json ({e}); stderr: {stderr}")),
        )
        .expect("report.json is JSON");
        let outcome = report["outcome"].as_str().unwrap_or_default();
        let expected = e["outcome"].as_str().expect("outcome");
        let refusals: BTreeSet<String> = report["elements"]
            .as_array()
            .expect("elements")
            .iter()
            .filter(|i| i["status"] == "notConvertible")
            .map(|i| {
                format!(
                    "{}: {}",
                    i["file"].as_str().unwrap_or_default(),
                    i["element"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let want: BTreeSet<String> = e["notConvertible"]
            .as_array()
            .expect("notConvertible")
            .iter()
            .map(|v| v.as_str().expect("string").to_owned())
            .collect();
        assert_eq!(
            refusals, want,
            "{name}: the not-convertible elements differ from the manifest\n{stdout}"
        );
        assert_eq!(outcome, expected, "{name}: outcome\n{stdout}");
        // Exit 2 exactly when something could not be converted; the output is written anyway.
        assert_eq!(
            code,
            if want.is_empty() { 0 } else { 2 },
            "{name}: exit code\n{stdout}{stderr}"
        );
        // Every element is in the report, and the text report says the same.
        let c = &report["counts"];
        let n = |k: &str| usize::try_from(c[k].as_u64().unwrap_or(0)).unwrap_or(0);
        assert_eq!(
            n("converted") + n("approximated") + n("notConvertible"),
            report["elements"].as_array().map_or(0, Vec::len)
        );
        let text = std::fs::read_to_string(out.join("import/report.txt")).expect("report.txt");
        assert_eq!(
            text, stdout,
            "{name}: the printed report is the written one"
        );
        for r in &refusals {
            let element = r.split_once(": ").map_or(r.as_str(), |(_, el)| el);
            assert!(
                text.contains(element),
                "{name}: the text report names {element}"
            );
        }
        // What was written is a configuration tollgate accepts.
        let (vcode, vout, verr) = validate(&out);
        assert_eq!(
            vcode, 0,
            "{name}: tollgate validate refused the output:\n{verr}{vout}"
        );
        match outcome {
            "converted" => conv += 1,
            "approximated" => approx += 1,
            _ => refused += 1,
        }
        el_c += n("converted");
        el_a += n("approximated");
        el_n += n("notConvertible");
    }
    // Every bundle in the folder is in the manifest.
    let on_disk: BTreeSet<String> = std::fs::read_dir(corpus())
        .expect("corpus")
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .collect();
    assert_eq!(on_disk, listed, "bundles on disk and in manifest.json");
    let total = entries.len();
    let pct = |k: usize, of: usize| 100.0 * k as f64 / of.max(1) as f64;
    let elements = el_c + el_a + el_n;
    println!(
        "corpus: {total} bundles: {conv} converted ({:.0} %), {approx} approximated ({:.0} %), {refused} with elements not convertible ({:.0} %); \
         {elements} elements: {el_c} converted ({:.0} %), {el_a} approximated ({:.0} %), {el_n} not convertible ({:.0} %)",
        pct(conv, total),
        pct(approx, total),
        pct(refused, total),
        pct(el_c, elements),
        pct(el_a, elements),
        pct(el_n, elements),
    );
}

/// `--check` reports and writes nothing; `--json` prints the JSON report.
#[test]
fn check_writes_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("out");
    let bundle = corpus().join("oauth-proxy");
    let (code, stdout, _) = import(&[
        "--check",
        "--json",
        bundle.to_str().expect("path"),
        out.to_str().expect("path"),
    ]);
    assert_eq!(code, 2, "{stdout}");
    assert!(!out.exists(), "--check wrote {}", out.display());
    let report: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(report["outcome"], "notConvertible");
    assert_eq!(report["name"], "oauth-proxy");
    // Without OUT_DIR, --check alone is enough.
    let (code, stdout, _) = import(&["--check", bundle.to_str().expect("path")]);
    assert_eq!(code, 2);
    assert!(stdout.contains("NOT CONVERTIBLE:"), "{stdout}");
    assert!(
        stdout.contains("OAuthV2[OA-VerifyToken]/Operation"),
        "{stdout}"
    );
}

/// A step whose policy could not be converted fails closed: the converted flow answers its
/// requests 500 `tollgate.NotConverted` rather than letting them through.
#[test]
fn unconvertible_steps_fail_closed_in_the_output() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("out");
    let bundle = corpus().join("oauth-proxy");
    let (code, _, _) = import(&[bundle.to_str().expect("path"), out.to_str().expect("path")]);
    assert_eq!(code, 2);
    let yaml = std::fs::read_to_string(out.join("oauth-proxy.yaml")).expect("yaml");
    let docs: Vec<Value> = yaml
        .split("\n---\n")
        .filter_map(|d| serde_norway::from_str::<Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let placeholder = docs
        .iter()
        .find(|d| d["kind"] == "Policy" && d["metadata"]["name"] == "OA-VerifyToken")
        .expect("the OAuthV2 step's policy");
    assert_eq!(placeholder["spec"]["type"], "RaiseFault", "{yaml}");
    assert_eq!(placeholder["spec"]["status"], 500);
    assert_eq!(placeholder["spec"]["errorCode"], "tollgate.NotConverted");
    let flow = docs.iter().find(|d| d["kind"] == "Flow").expect("flow");
    assert_eq!(
        flow["spec"]["request"][0]["policy"], "OA-VerifyToken",
        "{yaml}"
    );
    assert_eq!(flow["spec"]["match"]["pathPrefixes"][0], "/oauth");
    assert_eq!(
        flow["metadata"]["annotations"]["apigee.import/target-url"],
        "https://backend.example/api"
    );
}

/// Not a bundle: exit 1 with a message, nothing written.
#[test]
fn not_a_bundle_is_an_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("out");
    let (code, _, stderr) = import(&[
        tmp.path().to_str().expect("path"),
        out.to_str().expect("path"),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("neither an Apigee proxy"), "{stderr}");
    assert!(!out.exists());
}

/// Copies `from` (a directory tree) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        let q = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &q);
        } else {
            std::fs::copy(&p, &q).expect("copy");
        }
    }
}

fn xml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            xml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "xml") {
            out.push(p);
        }
    }
}

/// The importer never panics on a damaged bundle: every XML file of every directory
/// bundle, cut short at several points or with one line dropped, either converts (to a
/// consistent report and a configuration that validates) or is refused with an error.
#[test]
fn damaged_bundles_are_refused_or_converted_never_a_panic() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut tried = 0;
    for e in manifest() {
        let name = e["bundle"].as_str().expect("bundle");
        let src = corpus().join(name);
        if !src.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        xml_files(&src, &mut files);
        for f in files {
            let rel = f.strip_prefix(&src).expect("below").to_owned();
            let text = std::fs::read_to_string(&f).expect("read");
            let lines: Vec<&str> = text.lines().collect();
            let mut variants: Vec<String> = [3, 2, 1]
                .iter()
                .map(|d| text.chars().take(text.chars().count() * d / 4).collect())
                .collect();
            for drop in [1, lines.len() / 2, lines.len().saturating_sub(2)] {
                let kept: Vec<&str> = lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != drop)
                    .map(|(_, l)| *l)
                    .collect();
                variants.push(kept.join("\n"));
            }
            for v in variants {
                let dir = tmp.path().join(format!("v{tried}"));
                copy_tree(&src, &dir);
                std::fs::write(dir.join(&rel), v).expect("write");
                if let Ok(done) = tollgate::import::convert(&dir) {
                    let c = &done.report.counts;
                    assert_eq!(
                        c.converted + c.approximated + c.not_convertible,
                        done.report.elements.len()
                    );
                    // And what it writes is still a configuration tollgate accepts.
                    let out = tmp.path().join(format!("o{tried}"));
                    tollgate::import::write(&done, &out).expect("write");
                    if let Err(e) = tollgate::import::validate_dir(&out) {
                        panic!("{name} with {} damaged: {e}", rel.display());
                    }
                    let _ = std::fs::remove_dir_all(&out);
                }
                let _ = std::fs::remove_dir_all(&dir);
                tried += 1;
            }
        }
    }
    assert!(tried > 300, "{tried} damaged bundles");
}
