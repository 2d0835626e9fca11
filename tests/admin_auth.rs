//! How the real `tollgate serve` opens its management API: closed (a clear 404) without a
//! token flag, guarded by the token of `--admin-token-file` or `--admin-token-env`, and
//! refusing to start with a token shorter than 16 characters; and how the admin port holds
//! up under abuse (slow clients cut off, a connection cap) and can be split from `/metrics`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{free_port, http_blocking, serve_command, ServeProcess};

/// (status, body) of a GET with an optional bearer token.
fn get(port: u16, path: &str, bearer: Option<&str>) -> (u16, String) {
    http_blocking(port, "GET", path, bearer, None)
}

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec: {type: AssignMessage, set: {headers: {x-flow: "{flow.name}"}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: all}
spec:
  default: true
  request: [{policy: tag}]
"#;

const TOKEN: &str = "a-token-of-24-characters";

fn command(dir: &tempfile::TempDir, grpc: u16, admin: u16, extra: &[&str]) -> Command {
    let mut c = serve_command(dir.path(), CONFIG, grpc, admin);
    c.args(extra)
        .env_remove("TOLLGATE_ADMIN_TOKEN_FILE")
        .stdout(Stdio::null());
    c
}

fn start(extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let mut c = command(&dir, grpc, admin, extra);
    c.envs(env.iter().copied()).stderr(Stdio::null());
    ServeProcess::ready(&mut c, dir, grpc, admin)
}

#[test]
fn without_a_token_flag_the_api_is_closed_and_says_so() {
    let p = start(&[], &[]);
    for path in ["/v1/products", "/v1/apps/x/keys", "/v1/kvms"] {
        let (status, body) = get(p.admin, path, Some(TOKEN));
        assert_eq!(status, 404, "{path}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "NotFound");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("--admin-token-file"), "{message}");
    }
    // The rest of the admin port serves as usual.
    assert_eq!(get(p.admin, "/healthz", None).0, 200);
}

#[test]
fn a_token_file_guards_the_api() {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("token");
    // A Kubernetes Secret file often ends with a newline: it is not part of the token.
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let p = start(&["--admin-token-file", file.to_str().unwrap()], &[]);
    let (status, body) = get(p.admin, "/v1/products", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Unauthenticated"), "{body}");
    assert_eq!(
        get(p.admin, "/v1/products", Some("wrong-token-wrong-token")).0,
        401
    );
    let (status, body) = get(p.admin, "/v1/products", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v.is_object(), "{body}");
}

#[test]
fn a_token_env_guards_the_api() {
    let p = start(
        &["--admin-token-env", "MY_ADMIN_TOKEN"],
        &[("MY_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(get(p.admin, "/v1/apps", None).0, 401);
    assert_eq!(get(p.admin, "/v1/apps", Some(TOKEN)).0, 200);
}

/// Exits with an error, and its stderr, when tollgate refuses to start.
fn refused(extra: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(&dir, free_port(), free_port(), extra)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = support::exit_within(&mut child, Duration::from_secs(10), || {
        format!("tollgate started with {extra:?}")
    });
    assert!(!status.success());
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[test]
fn short_or_missing_tokens_refuse_to_start() {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("token");
    std::fs::write(&file, "fifteen-chars!!\n").unwrap();
    let err = refused(&["--admin-token-file", file.to_str().unwrap()], &[]);
    assert!(err.contains("at least 16 characters"), "{err}");
    let err = refused(
        &["--admin-token-env", "MY_ADMIN_TOKEN"],
        &[("MY_ADMIN_TOKEN", "short")],
    );
    assert!(err.contains("at least 16 characters"), "{err}");
    let err = refused(&["--admin-token-env", "UNSET_ADMIN_TOKEN_VAR"], &[]);
    assert!(err.contains("UNSET_ADMIN_TOKEN_VAR"), "{err}");
    let missing = secrets.path().join("absent");
    let err = refused(&["--admin-token-file", missing.to_str().unwrap()], &[]);
    assert!(err.contains("--admin-token-file"), "{err}");
}

/// Whether the server closed `s` (read returns end of stream or an error other than a
/// timeout) within `limit`, while the client keeps trickling header bytes.
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> bool {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        // A slowloris: one more header byte every 200 ms, never the end of the headers.
        if s.write_all(b"x").is_err() {
            return true;
        }
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn a_slow_client_is_cut_off_and_connections_past_the_cap_are_refused() {
    use std::io::{Read, Write};
    let p = start(
        &[
            "--admin-header-read-timeout",
            "1s",
            "--admin-max-connections",
            "4",
        ],
        &[],
    );
    // Slowloris: headers that never end are cut off after the header-read timeout.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", p.admin)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)),
        "a client trickling its headers was not cut off"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "cut off too early"
    );
    drop(slow);
    std::thread::sleep(Duration::from_millis(200));

    // The cap: four connections holding the port, the fifth is answered 503 and closed.
    let held: Vec<_> = (0..4)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", p.admin)).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", p.admin)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "past the cap: {answer:?}"
    );
    // The held connections are cut off by the header timeout, and the port serves again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(p.admin, "/healthz", None).0 != 200 {
        assert!(Instant::now() < deadline, "the admin port did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn held_connections_are_released_by_the_header_timeout() {
    use std::io::Write;
    let p = start(
        &[
            "--admin-header-read-timeout",
            "1s",
            "--admin-max-connections",
            "2",
        ],
        &[],
    );
    // Two clients that connect and never finish (kept open by the test): after the
    // header-read timeout their slots are free again.
    let _held: Vec<_> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", p.admin)).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(p.admin, "/healthz", None).0, 200);
}

#[test]
fn metrics_can_be_served_apart_from_the_admin_port() {
    let metrics = free_port();
    let addr = format!("127.0.0.1:{metrics}");
    let p = start(&["--metrics-addr", &addr, "--admin-insecure"], &[]);
    let (status, body) = get(metrics, "/metrics", None);
    assert_eq!(status, 200);
    assert!(body.contains("tollgate_config_synchronized 1"), "{body}");
    assert_eq!(get(metrics, "/readyz", None).0, 200);
    assert_eq!(get(metrics, "/healthz", None).0, 200);
    // The management API is on the admin port only.
    assert_eq!(get(metrics, "/v1/products", None).0, 404);
    assert_eq!(get(p.admin, "/v1/products", None).0, 200);
}
