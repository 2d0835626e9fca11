//! API keys across process boundaries, with the real binary: a key created through the
//! management API on the embedded store survives `kill -9` and a restart; with two
//! replicas on one real `redis-server`, a key created (and then revoked) through one
//! replica takes effect on the other within 2 s.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;

mod support;

use support::redis::RedisServer;
use support::{ext_proc, free_port};

/// (status, body) of a request to the (insecure) management API.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    support::http_blocking(port, method, path, None, body)
}

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: chat}
spec:
  operations: [{path: /v1/chat/completions, methods: [POST]}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: verify}
spec: {type: VerifyApiKey}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  default: true
  request: [{policy: verify}]
"#;

struct Proc {
    child: Child,
    grpc: u16,
    admin: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config_dir: &Path, store_args: &[&str]) -> Proc {
    let (grpc, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .arg("--config")
        .arg(config_dir)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .arg("--admin-insecure")
        .args(store_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut p = Proc { child, grpc, admin };
    let deadline = Instant::now() + Duration::from_secs(15);
    while http(p.admin, "GET", "/readyz", None).0 != 200 {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("tollgate exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "tollgate did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// Creates app `name` for product `chat` and a key; returns (key id, clear key).
fn create_app_and_key(p: &Proc, name: &str) -> (String, String) {
    let (code, body) = http(
        p.admin,
        "POST",
        "/v1/apps",
        Some(&format!(
            r#"{{"name":"{name}","developerEmail":"dev@example.com","products":["chat"]}}"#
        )),
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = http(
        p.admin,
        "POST",
        &format!("/v1/apps/{name}/keys"),
        Some("{}"),
    );
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

/// Asks tollgate (over ext_proc) about a request carrying `key`: true when it lets it on.
async fn admitted(p: &Proc, key: &str) -> bool {
    let client = ext_proc::connect(format!("127.0.0.1:{}", p.grpc)).await;
    let msg = ext_proc::request_headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "a"),
            ("x-api-key", key),
        ],
        true,
    );
    match ext_proc::ask_once(&client, msg).await.response {
        Some(Response::RequestHeaders(_)) => true,
        Some(Response::ImmediateResponse(i)) => {
            assert_eq!(i.status.unwrap().code, 401);
            false
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

async fn eventually(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("c.yaml"), CONFIG).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_key_survives_kill_9_on_the_embedded_store() {
    let cfg = config_dir();
    let data = tempfile::tempdir().unwrap();
    let store_args = [
        "--store",
        "embedded",
        "--data-dir",
        data.path().to_str().unwrap(),
    ];
    let mut p = start(cfg.path(), &store_args);
    let (id, key) = create_app_and_key(&p, "durable-app");
    // kill -9 right after the 201: no chance for a clean shutdown.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    drop(p);

    let p = start(cfg.path(), &store_args);
    let (code, body) = http(p.admin, "GET", "/v1/apps/durable-app/keys", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&id), "{body}");
    assert!(
        !body.contains(&key),
        "the clear key must never be listed: {body}"
    );
    assert!(admitted(&p, &key).await);
    assert!(!admitted(&p, "tg_not_a_real_key_000000000").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_see_each_others_keys_within_two_seconds() {
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let cfg = config_dir();
    let a = start(cfg.path(), &["--store", "redis", "--redis-url", &url]);
    let b = start(cfg.path(), &["--store", "redis", "--redis-url", &url]);

    let (id, key) = create_app_and_key(&a, "shared-app");
    eventually(
        "the key reaching replica b",
        Duration::from_secs(2),
        async || admitted(&b, &key).await,
    )
    .await;

    let (code, body) = http(
        a.admin,
        "POST",
        &format!("/v1/apps/shared-app/keys/{id}/revoke"),
        Some("{}"),
    );
    assert_eq!(code, 200, "{body}");
    eventually(
        "the revocation reaching replica b",
        Duration::from_secs(2),
        async || !admitted(&b, &key).await,
    )
    .await;
    assert!(!admitted(&a, &key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_the_api_answers_503_and_the_data_plane_keeps_serving() {
    let mut redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let cfg = config_dir();
    let a = start(cfg.path(), &["--store", "redis", "--redis-url", &url]);
    let (_, key) = create_app_and_key(&a, "resilient-app");
    eventually(
        "the key reaching the index",
        Duration::from_secs(2),
        async || admitted(&a, &key).await,
    )
    .await;

    redis.kill();
    let started = Instant::now();
    let (code, body) = http(a.admin, "GET", "/v1/apps/resilient-app", None);
    assert_eq!(code, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the API hung on a dead Redis"
    );
    let (code, _) = http(
        a.admin,
        "POST",
        "/v1/apps",
        Some(r#"{"name":"new-app","developerEmail":"dev@example.com","products":["chat"]}"#),
    );
    assert_eq!(code, 503);
    // The data plane answers from its in-memory index.
    assert!(admitted(&a, &key).await);
    assert!(!admitted(&a, "tg_unknown_key_0000000000000").await);
    assert_eq!(http(a.admin, "GET", "/readyz", None).0, 200);
}
