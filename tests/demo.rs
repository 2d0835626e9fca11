//! The README's first command, as a newcomer meets it: `scripts/demo.sh --try` starts tollgate
//! on policies/ behind a real Envoy with the demo upstream and callout service, runs every
//! command the demo prints and every command shown in the comments of policies/*.yaml, and
//! compares each answer with what the text says. Run twice in a row, both runs must agree
//! with the text and print the same answers (issue 20: the demo keeps no state between runs).
//!
//! The demo listens on fixed ports (10000, 9901, 9002, 9003, 8080, 8081): when one is busy the
//! test is skipped with the demo's own message naming it.

mod support;

use std::process::{Command, Stdio};

/// The demo's output without what differs between runs by design (its temporary directory).
fn run_demo() -> Option<(bool, String)> {
    let out = Command::new("bash")
        .arg(support::repo_root().join("scripts/demo.sh"))
        .arg("--try")
        .env("TOLLGATE_BIN", support::tollgate_bin())
        .env("ENVOY_BIN", support::envoy_bin())
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if stderr.contains(") is in use") {
        eprintln!("SKIPPED: a demo port is busy:\n{stdout}{stderr}");
        return None;
    }
    let text: String = stdout
        .lines()
        .filter(|l| !l.starts_with("demo: stopped (logs were in"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        out.status.success(),
        "demo --try failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Some((
        text.contains("0 command(s) answered otherwise than their text says"),
        text,
    ))
}

#[test]
fn the_demo_runs_twice_with_the_same_answers() {
    let Some((ok1, first)) = run_demo() else {
        return;
    };
    assert!(ok1, "first run: some command answered otherwise:\n{first}");
    // Every example file with commands in its comments was exercised.
    for file in ["policies/service-callout.yaml", "policies/jwt.yaml"] {
        assert!(first.contains(file), "{file} not exercised:\n{first}");
    }
    let Some((ok2, second)) = run_demo() else {
        return;
    };
    assert!(
        ok2,
        "second run: some command answered otherwise:\n{second}"
    );
    assert_eq!(first, second, "the second run printed other answers");
}
