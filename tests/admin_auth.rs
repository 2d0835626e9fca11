//! How the real `tollgate serve` opens its management API: closed (a clear 404) without a
//! token flag, guarded by the token of `--admin-token-file` or `--admin-token-env`, and
//! refusing to start with a token shorter than 16 characters.

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
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate started with {extra:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
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
