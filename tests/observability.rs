//! The dashboards and alerts in `deploy/observability/` against the real thing: promtool
//! checks and unit-tests the alert rules; a running tollgate (Redis store, every kind of
//! policy the panels chart) is scraped, the scrape passes `promtool check metrics`, every
//! metric a panel or rule names is in it, and a real Prometheus scraping that tollgate loads
//! the rules (healthy) and accepts every panel's query.
//!
//! promtool and prometheus come from Debian's `prometheus` package, unpacked into
//! `.tools/prometheus/` by scripts/setup.sh.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_stream::StreamExt;

mod support;

use support::redis::RedisServer;
use support::{
    eventually, ext_proc, free_port, http_blocking, repo_root, tollgate_bin, Proc, ServeProcess,
    Upstream,
};

fn tool(name: &str) -> PathBuf {
    let p = repo_root().join(".tools/prometheus").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it unpacks Debian's prometheus package there)",
        p.display()
    );
    p
}

fn observability(file: &str) -> PathBuf {
    repo_root().join("deploy/observability").join(file)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let out = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(observability("alerts.yaml")),
    );
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    // alerts-test.yaml: each alert fires on the series it is about, with its labels and
    // rendered annotations, and stays quiet where it should.
    let out = run_ok(
        Command::new(tool("promtool"))
            .args(["test", "rules"])
            .arg(observability("alerts-test.yaml"))
            .current_dir(observability("")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every PromQL expression of the dashboard's panels, with Grafana's variables filled in
/// the way Grafana would ($__rate_interval ≥ 4 scrape intervals; every replica).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(observability("grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate panel id"
        );
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("title").to_owned();
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "unfilled variable in {expr}");
            out.push((title.clone(), expr));
        }
    }
    out
}

fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(observability("alerts.yaml")).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            out.push((
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// The metric names an expression reads (`tollgate_*`, `gen_ai_*`), histogram series
/// suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Label lists (`by (…)`, `without (…)`) name labels, not metrics.
    let mut expr = expr.to_owned();
    for kw in ["by (", "without ("] {
        while let Some(i) = expr.find(kw) {
            let end = expr[i..].find(')').map_or(expr.len(), |j| i + j + 1);
            expr.replace_range(i..end, "");
        }
    }
    let expr = expr.as_str();
    let mut names = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("tollgate_") || rest.starts_with("gen_ai_"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if starts {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

const KEY: &str = "observability-key-0123456789";

fn config(callout: std::net::SocketAddr) -> String {
    let key_hash = {
        use sha2::Digest;
        sha2::Sha256::digest(KEY.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: quota}}
spec: {{type: Quota, allow: 1000, interval: 1, timeUnit: minute}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: cache}}
spec: {{type: ResponseCache, ttlSeconds: 60}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: authz}}
spec:
  type: ServiceCallout
  request: {{url: "http://{callout}/authz"}}
  timeoutMs: 1000
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: deny}}
spec: {{type: RaiseFault, status: 403, errorCode: ops.Denied, message: denied}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: verify-key}}
spec: {{type: VerifyApiKey, keyFrom: [{{preset: llm-sdks}}]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: tokens}}
spec: {{type: LlmTokenQuota, allow: 100000, interval: 1, timeUnit: minute, identifier: "{{client_id}}"}}
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
  prices: [{{model: "gpt-*", input: 1.0, output: 2.0}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: llm}}
spec:
  match: {{pathPrefixes: [/v1/chat]}}
  request: [{{policy: verify-key}}, {{policy: tokens}}, {{policy: budget}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {{name: gold}}
spec: {{operations: [{{path: "/**"}}]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {{name: shop}}
spec:
  developerEmail: dev@shop.example
  products: [gold]
  keys: [{{id: k1, hash: "sha256:{key_hash}"}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: api}}
spec:
  default: true
  request:
    - {{policy: deny, condition: "request.path.startsWith('/deny')"}}
    - {{policy: quota}}
    - {{policy: authz}}
    - {{policy: cache}}
"#
    )
}

/// One streamed chat completion through the LLM flow (key, token quota, budget), as Envoy
/// sends it: buffered request body, streamed response with a usage chunk.
async fn llm_stream(grpc: u16) {
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::ProtocolConfiguration;
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
        response_body_mode: BodySendMode::Streamed as i32,
        ..Default::default()
    });
    let chunk = |text: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
        )
    };
    let usage = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\ndata: [DONE]\n\n";
    let msgs = vec![
        first,
        ext_proc::body(
            false,
            br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":"hello"}]}"#,
            true,
        ),
        ext_proc::response_headers(&[(":status", "200"), ("content-type", "text/event-stream")], false),
        ext_proc::body(true, chunk("Hel").as_bytes(), false),
        ext_proc::body(true, chunk("lo there").as_bytes(), false),
        ext_proc::body(true, usage.as_bytes(), true),
    ];
    let client = ext_proc::connect(format!("127.0.0.1:{grpc}")).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = client
        .clone()
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    for m in msgs {
        tx.send(m).await.unwrap();
        // Chunks a step holds back get no answer of their own: read what comes.
        while let Ok(next) = tokio::time::timeout(Duration::from_millis(300), answers.next()).await
        {
            let Some(Ok(a)) = next else { break };
            assert!(
                !matches!(a.response, Some(Response::ImmediateResponse(_))),
                "the LLM exchange was refused: {a:?}"
            );
        }
    }
    drop(tx);
    drop(answers);
}

/// `GET` on a loopback port, path and query percent-encoded by the caller.
fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = http_blocking(port, "GET", path, None, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    let body = dechunk(&body);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// The body of a `transfer-encoding: chunked` answer (Prometheus's API uses it); other
/// bodies unchanged.
fn dechunk(body: &str) -> String {
    if body.starts_with('{') {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_prometheus(dir: &Path, admin: u16) -> (Proc, u16) {
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: tollgate\n    static_configs: [{{targets: ['127.0.0.1:{admin}']}}]\n",
            observability("alerts.yaml").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(tool("prometheus"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null());
    (
        Proc::spawn("prometheus", cmd, dir.join("prometheus.log")),
        port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_read_metrics_a_real_tollgate_exports() {
    let redis = RedisServer::start();
    let callout = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admin) = (free_port(), free_port());
    std::fs::write(dir.path().join("c.yaml"), config(callout.addr)).unwrap();
    let mut c = Command::new(tollgate_bin());
    c.arg("serve")
        .arg("--config")
        .arg(dir.path())
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--store", "redis", "--redis-url", &redis.url()])
        .arg("--analytics")
        .arg(dir.path().join("analytics.jsonl"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let p = ServeProcess::ready(&mut c, dir, grpc, admin);

    // Traffic through every policy: allowed (quota, callout, cache lookup) and denied.
    let client = ext_proc::connect(format!("127.0.0.1:{grpc}")).await;
    for path in ["/a", "/b", "/deny"] {
        let answer = ext_proc::ask_once(
            &client,
            ext_proc::request_headers(&[(":method", "GET"), (":path", path)], true),
        )
        .await;
        let want = if path == "/deny" { 403 } else { 200 };
        assert_eq!(ext_proc::status_of(answer), want, "{path}");
    }

    llm_stream(grpc).await;
    // The exchange's end settles its reservations and prices its cost.
    eventually(
        Duration::from_secs(10),
        "the LLM exchange settled",
        || async move {
            let (_, text) = tokio::task::spawn_blocking(move || {
                http_blocking(admin, "GET", "/metrics", None, None)
            })
            .await
            .unwrap();
            (support::metric(&text, "tollgate_llm_reservations_outstanding") == Some(0.0))
                .then_some(())
        },
    )
    .await;

    let scrape =
        tokio::task::spawn_blocking(move || http_blocking(admin, "GET", "/metrics", None, None))
            .await
            .unwrap();
    assert_eq!(scrape.0, 200);
    let scrape = scrape.1;
    let present: BTreeSet<String> = scrape
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect();

    // The exposition is lint-clean (names, units, help texts).
    let mut lint = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        lint.stdin
            .take()
            .unwrap()
            .write_all(scrape.as_bytes())
            .unwrap();
    }
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric a panel or an alert reads is exported (with at least one series).
    let panels = dashboard_queries();
    let alerts = alert_exprs();
    assert!(panels.len() >= 20, "{} panel queries", panels.len());
    for (what, expr) in panels.iter().chain(alerts.iter()) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: no tollgate metric in {expr}");
        for n in names {
            assert!(
                present.contains(&n),
                "{what} reads {n}, which tollgate does not export:\n{expr}\nLLM series exported:\n{}",
                scrape
                    .lines()
                    .filter(|l| l.contains("llm") || l.contains("gen_ai"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            assert!(
                scrape
                    .lines()
                    .any(|l| l.starts_with(&n) && !l.starts_with('#')),
                "{what} reads {n}, which has no series yet"
            );
        }
    }

    // A real Prometheus scraping this tollgate: rules load and are healthy, the target is
    // up, and every panel query is valid PromQL that returns data.
    let prom_dir = tempfile::tempdir().unwrap();
    let (mut prom, port) = start_prometheus(prom_dir.path(), admin);
    tokio::task::spawn_blocking(move || {
        wait_for(
            "prometheus to scrape tollgate",
            Duration::from_secs(60),
            || {
                let (s, b) = http_blocking(
                    port,
                    "GET",
                    &format!("/api/v1/query?query={}", encode("tollgate_build_info")),
                    None,
                    None,
                );
                s == 200 && b.contains("\"version\"")
            },
        );
        let rules = get_json(port, "/api/v1/rules");
        let loaded: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(loaded.len(), alerts.len(), "{rules}");
        // Two rule evaluations after a couple of scrapes.
        std::thread::sleep(Duration::from_secs(3));
        let rules = get_json(port, "/api/v1/rules");
        for g in rules["data"]["groups"].as_array().unwrap() {
            for r in g["rules"].as_array().unwrap() {
                assert_eq!(r["health"], "ok", "rule {} is not healthy: {r}", r["name"]);
            }
        }
        for (title, expr) in &panels {
            let v = get_json(port, &format!("/api/v1/query?query={}", encode(expr)));
            assert_eq!(v["status"], "success", "panel {title}: {expr}: {v}");
            // Plain selectors and sums over them have data now; ratios of rates may not
            // have two samples yet, which is fine.
            if !expr.contains("rate(") && !expr.contains("increase(") {
                assert!(
                    !v["data"]["result"].as_array().unwrap().is_empty(),
                    "panel {title} has no data: {expr}: {v}"
                );
            }
        }
    })
    .await
    .unwrap();
    prom.check_alive();
    drop(p);
}
