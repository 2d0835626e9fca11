//! Operations knobs: `tollgate version`, `--worker-threads` (default from the CPUs the
//! process may use), the build-info metric, and the log filter changed at run time through
//! the management API.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{
    ext_proc, free_port, http_blocking, metric, serve_command, tollgate_bin, ServeProcess,
};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: deny}
spec: {type: RaiseFault, status: 403, errorCode: ops.Denied, message: denied}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: all}
spec:
  default: true
  request: [{policy: deny}]
"#;

const TOKEN: &str = "ops-test-token-0123456789";

fn start(extra: &[&str], stderr: Option<std::fs::File>) -> ServeProcess {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut c = serve_command(dir.path(), CONFIG, grpc, admin);
    c.arg("--admin-token-file").arg(&token).args(extra);
    c.env("RUST_LOG", "info").stdout(Stdio::null());
    match stderr {
        Some(f) => c.stderr(f),
        None => c.stderr(Stdio::null()),
    };
    ServeProcess::ready(&mut c, dir, grpc, admin)
}

fn scrape(p: &ServeProcess) -> String {
    let (status, body) = http_blocking(p.admin, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    body
}

#[test]
fn version_prints_version_commit_and_target() {
    let out = Command::new(tollgate_bin())
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("tollgate {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let out = Command::new(tollgate_bin())
        .args(["version", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["commit"].is_string() && v["target"].is_string(), "{v}");
}

#[test]
fn worker_threads_flag_default_and_build_info() {
    let p = start(&["--worker-threads", "3"], None);
    let text = scrape(&p);
    assert_eq!(
        metric(&text, "tollgate_worker_threads"),
        Some(3.0),
        "{text}"
    );
    let info = text
        .lines()
        .find(|l| l.starts_with("tollgate_build_info{"))
        .unwrap_or_else(|| panic!("no build info in\n{text}"));
    assert!(
        info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && info.contains("commit=")
            && info.ends_with(" 1"),
        "{info}"
    );
    drop(p);

    // Default: the CPUs this process may use (same cgroup and affinity as the child).
    let p = start(&[], None);
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert_eq!(metric(&scrape(&p), "tollgate_worker_threads"), Some(cpus));

    // Out of range is refused at start.
    let out = Command::new(tollgate_bin())
        .args(["serve", "--worker-threads", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--worker-threads"));
}

async fn send_rejected(p: &ServeProcess) {
    let client = ext_proc::connect(format!("127.0.0.1:{}", p.grpc)).await;
    let answer = ext_proc::ask_once(
        &client,
        ext_proc::request_headers(&[(":method", "GET"), (":path", "/x")], true),
    )
    .await;
    assert_eq!(ext_proc::status_of(answer), 403);
}

fn log_has(path: &std::path::Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_filter_changes_at_run_time() {
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("stderr.log");
    let p = start(&[], Some(std::fs::File::create(&log).unwrap()));
    let admin = p.admin;
    let call =
        move |method: &'static str, body: Option<&'static str>, bearer: Option<&'static str>| {
            tokio::task::spawn_blocking(move || {
                http_blocking(admin, method, "/v1/logging", bearer, body)
            })
        };

    // Guarded like the rest of the management API.
    assert_eq!(call("GET", None, None).await.unwrap().0, 401);
    let (status, body) = call("GET", None, Some(TOKEN)).await.unwrap();
    assert_eq!((status, body.trim()), (200, r#"{"filter":"info"}"#));

    // At `info` the rejection's debug line is not written.
    send_rejected(&p).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!log_has(&log, "rejected"), "debug line at info level");

    // A filter that does not parse is refused and the old one stays.
    let (status, body) = call(
        "PUT",
        Some(r#"{"filter":"tollgate=notalevel"}"#),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("filter"), "{body}");
    let (_, body) = call("GET", None, Some(TOKEN)).await.unwrap();
    assert!(body.contains(r#""info""#), "{body}");

    // Raised to debug for tollgate: the same rejection is now logged.
    let (status, body) = call(
        "PUT",
        Some(r#"{"filter":"info,tollgate=debug"}"#),
        Some(TOKEN),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body.trim()),
        (200, r#"{"filter":"info,tollgate=debug"}"#)
    );
    send_rejected(&p).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log_has(&log, "rejected") {
        assert!(
            Instant::now() < deadline,
            "no debug line after raising the filter"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
