//! ModelRouter through a real Envoy 1.40 with the official `openai` client:
//!
//! ```text
//! clients.py (openai) ──▶ Envoy ── ext_proc (request body BUFFERED) ──▶ tollgate flow `llm`
//!                           │  set_metadata tollgate-flow: llm-attempt
//!                           │  route: x-tollgate-route == b ──▶ cluster b (upstream B)
//!                           │         else ──▶ cluster a (upstream A), retries on 429 and 5xx
//!                           └─ router ── upstream ext_proc (per attempt) ──▶ tollgate flow `llm-attempt`
//! ```
//!
//! Proves: a routed request reaches the model its rule names, with a content-length that
//! matches the rewritten body; a routing header makes Envoy pick another cluster (and a
//! client's own routing header does not); a 429 or 5xx from the routed model makes Envoy's
//! retries reach the next models of the fallback order; a paraphrase of a labelled example
//! is routed by similarity.

mod support;

use serde_json::{json, Value};
use support::llm_upstream::{LlmUpstream, Sdks};
use support::{free_port, repo_root, Envoy, Tollgate};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: route}
spec:
  type: ModelRouter
  embedder: {kind: static}
  responseHeader: x-tollgate-route
  rules:
  - name: code
    when: {keywords: [traceback, stack trace]}
    route: {model: coder-large}
  - name: pool-b
    when: {keywords: [second pool]}
    route: {model: model-b, header: b}
  - name: flaky
    when: {keywords: [flaky]}
    route: {model: flaky-model}
  - name: refunds
    when:
      similarTo:
        examples: ["How do I get a refund for my order?", "I want my money back for this purchase"]
        threshold: 0.7
    route: {model: support-model}
  default: {model: small-model}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: fallback}
spec:
  type: ModelRouter
  stage: attempt
  fallbacks:
  - {model: flaky-model, then: [steady-model, last-resort]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: llm}
spec:
  match: {pathPrefixes: [/v1/]}
  errorFormat: openai
  request: [{policy: route}]
---
# Selected by name only: Envoy's set_metadata filter names it for the upstream ext_proc.
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: llm-attempt}
spec:
  request: [{policy: fallback}]
"#;

fn cluster(name: &str, port: u16, h2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        }}]}]}
    });
    if h2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
    }
    c
}

/// The Envoy set-up the README documents for routing and fallbacks.
pub fn bootstrap(listen: u16, admin: u16, grpc: u16, a: u16, b: u16, body_mode: &str) -> Value {
    let ext_proc = |mode: Value, extra: Value| {
        let mut v = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "tollgate"}},
            "failure_mode_allow": false,
            "message_timeout": "2s",
            "processing_mode": mode
        });
        if let (Some(v), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(e.clone());
        }
        v
    };
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "envoy.reloadable_features.ext_proc_graceful_grpc_close": true
        }}]},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress_http",
                        "route_config": {"virtual_hosts": [{
                            "name": "llm",
                            "domains": ["*"],
                            // The router sets x-envoy-attempt-count on every attempt
                            // (overwriting a client's): the attempt stage reads it.
                            "include_request_attempt_count": true,
                            "routes": [
                                {
                                    "match": {"prefix": "/", "headers": [
                                        {"name": "x-tollgate-route", "string_match": {"exact": "b"}}
                                    ]},
                                    "route": {"cluster": "b", "timeout": "0s"}
                                },
                                {
                                    "match": {"prefix": "/"},
                                    "route": {
                                        "cluster": "a",
                                        "timeout": "0s",
                                        "retry_policy": {
                                            "retry_on": "5xx,retriable-status-codes",
                                            "retriable_status_codes": [429],
                                            "num_retries": 2,
                                            "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.05s"}
                                        }
                                    }
                                }
                            ]
                        }]},
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.ext_proc",
                                "typed_config": ext_proc(json!({
                                    "request_header_mode": "SEND",
                                    "response_header_mode": "SEND",
                                    "request_body_mode": body_mode,
                                    "response_body_mode": body_mode,
                                    "request_trailer_mode": "SEND",
                                    "response_trailer_mode": "SEND"
                                }), json!({"allow_mode_override": true}))
                            },
                            {
                                // Names the flow the upstream ext_proc runs (this filter runs
                                // after the first ext_proc, which does not forward it).
                                "name": "envoy.filters.http.set_metadata",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                                    "metadata": [{"metadata_namespace": "tollgate.attempt",
                                                  "value": {"tollgate-flow": "llm-attempt"}}]
                                }
                            },
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                    "upstream_http_filters": [
                                        {
                                            "name": "envoy.filters.http.ext_proc",
                                            "typed_config": ext_proc(json!({
                                                "request_header_mode": "SEND",
                                                "request_body_mode": "BUFFERED",
                                                "response_header_mode": "SKIP",
                                                "response_body_mode": "NONE"
                                            }), json!({"metadata_options": {"forwarding_namespaces": {"untyped": ["tollgate.attempt"]}}}))
                                        },
                                        {
                                            "name": "envoy.filters.http.upstream_codec",
                                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}
                                        }
                                    ]
                                }
                            }
                        ]
                    }
                }]}]
            }],
            "clusters": [cluster("tollgate", grpc, true), cluster("a", a, false), cluster("b", b, false)]
        }
    })
}

struct Bed {
    envoy: Envoy,
    tollgate: Tollgate,
    a: LlmUpstream,
    b: LlmUpstream,
    _tmp: tempfile::TempDir,
}

impl Bed {
    async fn start(config: &str, body_mode: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-model-router-")
            .tempdir()
            .expect("temp dir");
        let config_dir = tmp.path().join("config");
        std::fs::create_dir(&config_dir).expect("config dir");
        std::fs::write(config_dir.join("flows.yaml"), config).expect("flows.yaml");
        let a_dir = tmp.path().join("a");
        let b_dir = tmp.path().join("b");
        std::fs::create_dir(&a_dir).expect("a");
        std::fs::create_dir(&b_dir).expect("b");
        let a = LlmUpstream::start(&a_dir).await;
        let b = LlmUpstream::start(&b_dir).await;
        let model = repo_root().join(".tools/embed-model");
        let model = model.to_string_lossy().into_owned();
        let tollgate =
            Tollgate::start(&config_dir, tmp.path(), &["--embedder-model-dir", &model]).await;
        let (listen, admin) = (free_port(), free_port());
        let boot = bootstrap(
            listen,
            admin,
            tollgate.grpc.port(),
            a.addr.port(),
            b.addr.port(),
            body_mode,
        );
        let envoy = Envoy::start_bootstrap(tmp.path(), &boot, listen, admin).await;
        Bed {
            envoy,
            tollgate,
            a,
            b,
            _tmp: tmp,
        }
    }

    fn root(&self) -> String {
        format!("http://{}", self.envoy.listen)
    }

    fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "──── tollgate ────\n{}\n──── envoy ────\n{}",
            tail(self.tollgate.log()),
            tail(self.envoy.log())
        )
    }
}

/// What an upstream received: (model in the body, content-length header, body length,
/// attempt header, routing header). A chunked body (Envoy drops `content-length` after a
/// FULL_DUPLEX_STREAMED body mutation) counts as its own length.
fn seen(r: &Value) -> (String, Option<usize>, usize, Option<String>, Option<String>) {
    let body = r["body"].as_str().unwrap_or_default();
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let h = &r["headers"];
    let chunked = h["transfer-encoding"].as_str() == Some("chunked");
    (
        v["model"].as_str().unwrap_or_default().to_owned(),
        h["content-length"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .or(chunked.then_some(body.len())),
        body.len(),
        h["x-envoy-attempt-count"].as_str().map(str::to_owned),
        h["x-tollgate-route"].as_str().map(str::to_owned),
    )
}

async fn chat_to(upstream: &LlmUpstream) -> Vec<Value> {
    upstream.requests_to("/v1/chat/completions").await
}

/// The request body BUFFERED: header changes go in the body's answer, with
/// `clear_route_cache`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_rewrites_picks_clusters_and_falls_back_through_envoy() {
    scenario("BUFFERED").await;
}

/// FULL_DUPLEX_STREAMED (as GKE's routing extension sends it): the headers answer is held
/// until the body is decided and leaves with `clear_route_cache`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_in_full_duplex_streamed() {
    scenario("FULL_DUPLEX_STREAMED").await;
}

async fn scenario(body_mode: &str) {
    let sdks = match Sdks::find() {
        Ok(s) if s.has("openai.chat") => s,
        Ok(_) => return eprintln!("skipped: the openai SDK is not installed (scripts/setup.sh)"),
        Err(e) => return eprintln!("skipped: {e}"),
    };
    let bed = Bed::start(CONFIG, body_mode).await;
    let root = bed.root();
    let run = |cases: &'static [&'static str],
               prompt: &'static str,
               headers: &'static [(&'static str, &'static str)]| {
        let (sdks, root) = (&sdks, root.clone());
        async move {
            sdks.run_many_with(cases, &root, "k", headers, Some(prompt), Some("gpt-4o"))
                .await
        }
    };

    // 1. A keyword rule rewrites the model: upstream A gets coder-large with a
    // content-length that fits the new body, streamed and not; the client's own routing
    // header neither routes nor reaches the upstream; the response names the rule.
    let out = run(
        &["openai.chat", "openai.chat.stream"],
        "Why does this traceback say KeyError?",
        &[("x-tollgate-route", "b")],
    )
    .await;
    for o in &out {
        assert_eq!(o["ok"], true, "{o}\n{}", bed.logs());
        assert_eq!(o["headers"]["x-tollgate-route"], "code", "{o}");
    }
    let a = chat_to(&bed.a).await;
    assert_eq!(a.len(), 2, "{a:?}");
    for r in &a {
        let (model, length, body_len, _, route) = seen(r);
        assert_eq!(model, "coder-large", "{r}");
        assert_eq!(
            length,
            Some(body_len),
            "content-length matches the rewritten body: {r}"
        );
        assert_eq!(route, None, "the client's routing header was removed: {r}");
        if body_mode == "BUFFERED" {
            // Envoy still held the headers: tollgate set the new length itself.
            assert!(r["headers"]["content-length"].is_string(), "{r}");
        }
        assert!(r["body"].as_str().unwrap().contains("traceback"), "{r}");
    }
    assert!(chat_to(&bed.b).await.is_empty());

    // 2. A routing header makes Envoy match its routes again: cluster b, the other
    // upstream, with the model the rule names.
    let out = run(&["openai.chat"], "Send this to the second pool please", &[]).await;
    assert_eq!(out[0]["ok"], true, "{}\n{}", out[0], bed.logs());
    assert_eq!(out[0]["headers"]["x-tollgate-route"], "pool-b");
    let b = chat_to(&bed.b).await;
    assert_eq!(b.len(), 1, "{b:?}\n{}", bed.logs());
    let (model, length, body_len, _, route) = seen(&b[0]);
    assert_eq!(
        (model.as_str(), route.as_deref()),
        ("model-b", Some("b")),
        "{}",
        b[0]
    );
    assert_eq!(length, Some(body_len));
    assert_eq!(chat_to(&bed.a).await.len(), 2, "nothing more reached A");

    // 3. Fallbacks. A client's own attempt count cannot pick a fallback: the router
    // overwrites it, and the first attempt keeps the routed model.
    let out = run(
        &["openai.chat"],
        "A flaky question, first try",
        &[("x-envoy-attempt-count", "3")],
    )
    .await;
    assert_eq!(out[0]["ok"], true, "{}\n{}", out[0], bed.logs());
    let a = chat_to(&bed.a).await;
    let (model, _, _, attempt, _) = seen(&a[2]);
    assert_eq!(
        (model.as_str(), attempt.as_deref()),
        ("flaky-model", Some("1"))
    );
    // The routed model answers 429, Envoy retries, and the attempt stage rewrites the
    // second attempt to the next model of the order.
    let out = run(
        &["openai.chat"],
        "This flaky question",
        &[("x-test-fault-model", "flaky-model:429")],
    )
    .await;
    assert_eq!(out[0]["ok"], true, "{}\n{}", out[0], bed.logs());
    let a = chat_to(&bed.a).await;
    let attempts: Vec<_> = a[3..].iter().map(seen).collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].0, "flaky-model");
    assert_eq!(attempts[0].3.as_deref(), Some("1"));
    assert_eq!(attempts[1].0, "steady-model");
    assert_eq!(attempts[1].3.as_deref(), Some("2"));
    for (_, length, body_len, _, _) in &attempts {
        assert_eq!(*length, Some(*body_len), "{attempts:?}");
    }
    // 5xx from the first two models: the third attempt gets the last one (streaming).
    let out = run(
        &["openai.chat.stream"],
        "Another flaky one",
        &[("x-test-fault-model", "flaky-model:503,steady-model:500")],
    )
    .await;
    assert_eq!(out[0]["ok"], true, "{}\n{}", out[0], bed.logs());
    let a = chat_to(&bed.a).await;
    let models: Vec<_> = a[5..].iter().map(|r| seen(r).0).collect();
    assert_eq!(models, ["flaky-model", "steady-model", "last-resort"]);

    // 4. Similarity: a paraphrase of a labelled example, no keyword in common with a rule.
    let have_model = repo_root()
        .join(".tools/embed-model/model.safetensors")
        .is_file();
    if have_model {
        let out = run(
            &["openai.chat"],
            "how can I get my money back for the order I placed",
            &[],
        )
        .await;
        assert_eq!(out[0]["ok"], true, "{}", out[0]);
        assert_eq!(
            out[0]["headers"]["x-tollgate-route"], "refunds",
            "{}",
            out[0]
        );
        let a = chat_to(&bed.a).await;
        assert_eq!(seen(a.last().unwrap()).0, "support-model");
        // Unrelated: the default.
        let out = run(&["openai.chat"], "Write a haiku about autumn leaves", &[]).await;
        assert_eq!(
            out[0]["headers"]["x-tollgate-route"], "default",
            "{}",
            out[0]
        );
        let a = chat_to(&bed.a).await;
        assert_eq!(seen(a.last().unwrap()).0, "small-model");
    } else {
        eprintln!("similarity part skipped: no built-in model (scripts/setup.sh)");
    }

    // Decisions by rule and configured model; the client's model is never a label.
    let m = bed.tollgate.metrics().await;
    let series = |rule: &str, model: &str, policy: &str| {
        support::metric(
            &m,
            &format!(
                "tollgate_model_router_decisions_total{{model=\"{model}\",policy=\"{policy}\",rule=\"{rule}\"}}"
            ),
        )
    };
    assert_eq!(series("code", "coder-large", "route"), Some(2.0), "{m}");
    assert_eq!(series("pool-b", "model-b", "route"), Some(1.0));
    assert_eq!(series("flaky", "flaky-model", "route"), Some(3.0));
    assert_eq!(series("fallback", "steady-model", "fallback"), Some(2.0));
    assert_eq!(series("fallback", "last-resort", "fallback"), Some(1.0));
    assert!(
        !m.contains("gpt-4o\""),
        "the requested model is not a label"
    );
}
