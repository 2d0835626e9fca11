//! Usage reports and analytics records from real exchanges: two tollgate processes sharing
//! one redis-server are charged per app, product and developer, and `GET /v1/usage` on
//! either one adds both up (JSON and CSV), LLM tokens included; every exchange gets one
//! JSON line in the analytics file with who, what, the status, the deciding policy and the
//! tokens, and never the key.

use std::process::{Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProtocolConfiguration};

mod support;

use support::redis::RedisServer;
use support::{eventually, ext_proc, free_port, http_blocking, tollgate_bin, ServeProcess};

const KEY: &str = "usage-test-key-0123456789abcdef";

fn config() -> String {
    let hash = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(KEY.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: verify-key}}
spec: {{type: VerifyApiKey, keyFrom: [{{preset: llm-sdks}}]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: deny}}
spec: {{type: RaiseFault, status: 403, errorCode: access.Denied, message: denied}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: budget}}
spec:
  type: LlmCostBudget
  currency: USD
  budget: 10
  per: app
  interval: 1
  timeUnit: month
  prices: [{{model: gpt-4o-mini, input: 1.0, output: 2.0}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: llm}}
spec:
  match: {{pathPrefixes: [/v1/chat]}}
  request:
    - {{policy: verify-key}}
    - {{policy: budget}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: api}}
spec:
  default: true
  request:
    - {{policy: verify-key}}
    - {{policy: deny, condition: "request.path.startsWith('/deny')"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {{name: gold}}
spec:
  operations: [{{path: "/**"}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {{name: shop}}
spec:
  developerEmail: dev@shop.example
  products: [gold]
  keys: [{{id: k1, hash: "sha256:{hash}"}}]
"#
    )
}

fn start(redis_url: &str, analytics: &std::path::Path) -> ServeProcess {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), config()).unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let mut c = Command::new(tollgate_bin());
    c.arg("serve")
        .arg("--config")
        .arg(dir.path())
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--store", "redis", "--redis-url", redis_url])
        .arg("--admin-insecure")
        .arg("--analytics")
        .arg(analytics)
        .args(["--analytics-sample-ratio", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ServeProcess::ready(&mut c, dir, grpc, admin)
}

/// Sends `msgs` as one stream and reads one answer per message.
async fn exchange(grpc: u16, msgs: Vec<ProcessingRequest>) -> Vec<u32> {
    let client = ext_proc::connect(format!("127.0.0.1:{grpc}")).await;
    let n = msgs.len();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = client
        .clone()
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut statuses = Vec::new();
    for m in msgs.into_iter().take(n) {
        tx.send(m).await.unwrap();
        let a = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("an answer")
            .unwrap()
            .expect("an answer");
        use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
        let immediate = matches!(a.response, Some(Response::ImmediateResponse(_)));
        statuses.push(if immediate {
            ext_proc::status_of(a)
        } else {
            200
        });
        if immediate {
            break;
        }
    }
    drop(tx);
    statuses
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_blocking(port, "GET", path, None, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_report_usage_together_and_write_analytics() {
    let redis = RedisServer::start();
    let files = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (files.path().join("a.jsonl"), files.path().join("b.jsonl"));
    let url = redis.url();
    let a = tokio::task::spawn_blocking({
        let (log, url) = (log_a.clone(), url.clone());
        move || start(&url, &log)
    })
    .await
    .unwrap();
    let b = tokio::task::spawn_blocking({
        let (log, url) = (log_b.clone(), url.clone());
        move || start(&url, &log)
    })
    .await
    .unwrap();

    let plain = |path: &str, key: &str| {
        vec![
            ext_proc::request_headers(
                &[
                    (":method", "GET"),
                    (":path", path),
                    ("x-api-key", key),
                    ("x-request-id", "r-1"),
                ],
                true,
            ),
            ext_proc::response_headers(&[(":status", "200"), ("content-length", "42")], true),
        ]
    };
    // On a: one allowed exchange and one denied by a policy. On b: one allowed, one with a
    // wrong key (no app: not charged to anyone), and one LLM exchange with usage.
    assert_eq!(
        exchange(a.grpc, plain("/items?page=2", KEY)).await,
        [200, 200]
    );
    assert_eq!(exchange(a.grpc, plain("/deny", KEY)).await, [403]);
    assert_eq!(exchange(b.grpc, plain("/items", KEY)).await, [200, 200]);
    assert_eq!(exchange(b.grpc, plain("/items", "wrong-key")).await, [401]);
    let chat = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#;
    let answer = br#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;
    // As Envoy sends it with both bodies BUFFERED.
    let mut first = ext_proc::request_headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("authorization", &format!("Bearer {KEY}")),
            ("content-type", "application/json"),
        ],
        false,
    );
    first.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: BodySendMode::Buffered as i32,
        response_body_mode: BodySendMode::Buffered as i32,
        ..Default::default()
    });
    let llm = vec![
        first,
        ext_proc::body(false, chat, true),
        ext_proc::response_headers(
            &[(":status", "200"), ("content-type", "application/json")],
            false,
        ),
        ext_proc::body(true, answer, true),
    ];
    assert_eq!(exchange(b.grpc, llm).await, [200, 200, 200, 200]);

    // Either replica reports both (each flushes its own pending adds when asked; the other
    // one's are in the store after its next flush, within 5 s).
    let admin_a = a.admin;
    let report = eventually(
        Duration::from_secs(15),
        "both replicas' usage in the report",
        || async move {
            let (status, body) =
                tokio::task::spawn_blocking(move || get(admin_a, "/v1/usage?by=app"))
                    .await
                    .unwrap();
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let total: i64 = v["series"][0]["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["requests"].as_i64().unwrap())
                .sum();
            (total == 4).then_some(v)
        },
    )
    .await;
    assert_eq!(report["series"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["series"][0]["name"], "shop");
    let sum = |field: &str| -> i64 {
        report["series"][0]["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[field].as_i64().unwrap())
            .sum()
    };
    assert_eq!(sum("errors"), 1, "the 403");
    assert_eq!(sum("inputTokens"), 11);
    assert_eq!(sum("outputTokens"), 7);
    assert_eq!(sum("totalTokens"), 18);
    // 11 input tokens at 1.0 and 7 output tokens at 2.0 per million.
    let cost: f64 = report["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["cost"].as_f64().unwrap())
        .sum();
    assert!((cost - 0.000025).abs() < 1e-9, "cost {cost}");

    let admin_b = b.admin;
    let (by_dev, csv) = tokio::task::spawn_blocking(move || {
        (
            get(admin_b, "/v1/usage?by=developer&granularity=day"),
            get(admin_b, "/v1/usage?by=product&format=csv"),
        )
    })
    .await
    .unwrap();
    assert_eq!(by_dev.0, 200);
    let v: serde_json::Value = serde_json::from_str(&by_dev.1).unwrap();
    assert_eq!(v["granularity"], "day");
    assert_eq!(v["series"][0]["name"], "dev@shop.example");
    assert_eq!(csv.0, 200);
    assert!(
        csv.1
            .starts_with("start,by,name,requests,errors,input_tokens"),
        "{}",
        csv.1
    );
    assert!(
        csv.1
            .lines()
            .any(|l| l.contains(",product,gold,4,1,11,7,18,")),
        "{}",
        csv.1
    );
    let (bad, body) = tokio::task::spawn_blocking(move || get(admin_b, "/v1/usage?by=planet"))
        .await
        .unwrap();
    assert_eq!(bad, 400, "{body}");

    // Analytics: one line per exchange on the replica that served it.
    let lines = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (log_a2, log_b2) = (log_a.clone(), log_b.clone());
    eventually(Duration::from_secs(10), "analytics records written", || {
        let (a, b) = (lines(&log_a2), lines(&log_b2));
        async move { (a.len() == 2 && b.len() == 3).then_some(()) }
    })
    .await;
    // Records are written as streams end, which need not be the order they started in.
    let find = |lines: &[serde_json::Value], path: &str, status: i64| -> serde_json::Value {
        lines
            .iter()
            .find(|l| l["path"] == path && l["status"] == status)
            .unwrap_or_else(|| panic!("no record for {path} {status} in {lines:?}"))
            .clone()
    };
    let a_lines = lines(&log_a);
    let ok = &find(&a_lines, "/items", 200);
    assert_eq!(ok["flow"], "api");
    assert_eq!(ok["app"], "shop");
    assert_eq!(ok["developer"], "dev@shop.example");
    assert_eq!(ok["product"], "gold");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["outcome"], "completed");
    assert_eq!(ok["path"], "/items", "no query in the record");
    assert_eq!(ok["requestId"], "r-1");
    assert_eq!(ok["responseBytes"], 42);
    assert!(ok["latencyMs"].as_f64().unwrap() >= 0.0);
    let denied = &find(&a_lines, "/deny", 403);
    assert_eq!(
        (
            denied["status"].as_i64(),
            denied["policy"].as_str(),
            denied["fault"].as_str()
        ),
        (Some(403), Some("deny"), Some("access.Denied"))
    );
    let b_lines = lines(&log_b);
    let unknown = &find(&b_lines, "/items", 401);
    assert_eq!(unknown["status"], 401);
    assert!(unknown.get("app").is_none());
    let chat_line = &find(&b_lines, "/v1/chat/completions", 200);
    assert_eq!(chat_line["api"], "openai.chat_completions");
    assert_eq!(chat_line["model"], "gpt-4o-mini");
    assert_eq!(
        (
            chat_line["inputTokens"].as_i64(),
            chat_line["outputTokens"].as_i64()
        ),
        (Some(11), Some(7))
    );
    assert!(
        (chat_line["cost"].as_f64().unwrap() - 0.000025).abs() < 1e-9,
        "{chat_line}"
    );
    for text in [
        std::fs::read_to_string(&log_a).unwrap(),
        std::fs::read_to_string(&log_b).unwrap(),
    ] {
        assert!(!text.contains(KEY), "a key in the analytics records");
        assert!(!text.contains("wrong-key"));
    }
    drop((a, b));
}
