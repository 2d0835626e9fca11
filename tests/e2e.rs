//! End-to-end tests: a real Envoy 1.40 (ext_proc filter) in front of the real `tollgate`
//! binary and a local upstream. Envoy comes from `scripts/setup.sh`
//! (`.tools/envoy/envoy`, or `ENVOY_BIN`). Run with `cargo test --test e2e`.
//!
//! Every test starts its own processes on its own ports and is bounded by [`LIMIT`].

mod support;

use std::time::{Duration, Instant};

use support::{
    metric, metric_sum, validate, within, BedOptions, Mode, RouteSpec, TestBed, Tollgate,
};

const LIMIT: Duration = Duration::from_secs(20);

// ───────────────────────────── a. header mutations ─────────────────────────────

const HEADERS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag-request}
spec:
  type: AssignMessage
  remove:
    headers: [x-secret]
  add:
    headers:
      x-multi: added
  set:
    headers:
      x-tollgate-flow: "{flow.name}"
      x-seen-path: "{request.path}"
      x-copied: "{request.header.x-source}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag-response}
spec:
  type: AssignMessage
  remove:
    headers: [x-upstream]
  set:
    headers:
      x-served-by: tollgate
      x-response-flow: "{flow.name}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: tag-request
  response:
  - policy: tag-response
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_mutations_reach_upstream_and_client() {
    within(LIMIT, async {
        let bed = TestBed::start(HEADERS).await;
        let r = bed
            .get(
                "/echo?q=1",
                &[
                    ("x-secret", "s3cr3t"),
                    ("x-source", "from-client"),
                    ("x-multi", "original"),
                    ("x-tollgate-flow", "spoofed"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.json();
        let h = &echo["headers"];
        assert_eq!(echo["path"], "/echo");
        assert_eq!(
            echo["uri"], "/echo?q=1",
            "the query string reaches the upstream"
        );
        // set: added, and overwrites what the client sent.
        assert_eq!(h["x-tollgate-flow"], "api", "{echo}");
        assert_eq!(h["x-seen-path"], "/echo", "{echo}");
        assert_eq!(h["x-copied"], "from-client", "{echo}");
        // add: keeps what the client sent.
        assert_eq!(h["x-multi"], "original, added", "{echo}");
        // remove: gone.
        assert!(
            h.get("x-secret").is_none(),
            "x-secret reached the upstream: {echo}"
        );
        // Response step: set on the way back, upstream's header removed.
        assert_eq!(r.header("x-served-by"), Some("tollgate"));
        assert_eq!(r.header("x-response-flow"), Some("api"));
        assert_eq!(
            r.header("x-upstream"),
            None,
            "the response step removes x-upstream"
        );

        // A POST with a body on a headers-only route passes through untouched.
        let r = bed
            .post("/echo", &[("content-type", "text/plain")], "hello body")
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["body"], "hello body");
        assert_eq!(r.json()["method"], "POST");
        assert_eq!(r.echoed_header("x-tollgate-flow").as_deref(), Some("api"));
    })
    .await;
}

/// `add` must keep the values already there. Envoy 1.40's ext_proc ignores
/// `HeaderValueOption.append_action` and reads only the deprecated `append` BoolValue
/// (unset = overwrite), so tollgate sets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2_assign_message_add_appends_to_existing_header() {
    within(LIMIT, async {
        let bed = TestBed::start(HEADERS).await;
        let r = bed.get("/echo", &[("x-multi", "original")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("x-multi").as_deref(),
            Some("original, added")
        );
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.echoed_header("x-multi").as_deref(), Some("added"));
    })
    .await;
}

// ───────────────────────────── b. RaiseFault ─────────────────────────────

const FAULTS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: deny}
spec:
  type: RaiseFault
  status: 403
  errorCode: access.Denied
  message: "{request.path} is closed"
  headers:
    x-reason: closed
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: teapot}
spec:
  type: RaiseFault
  status: 418
  errorCode: brew.Refused
  body: '{"short":"stout"}'
  contentType: application/json
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: apigee}
spec:
  default: true
  request:
  - policy: deny
    condition: "request.headers['x-deny'] == 'yes'"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: llm}
spec:
  match: {pathPrefixes: [/openai]}
  errorFormat: openai
  request:
  - policy: deny
    condition: "request.headers['x-deny'] == 'yes'"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: problems}
spec:
  match: {pathPrefixes: [/problem]}
  errorFormat: problem
  request:
  - policy: deny
    condition: "request.headers['x-deny'] == 'yes'"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: tea}
spec:
  match: {pathPrefixes: [/tea], methods: [POST]}
  errorFormat: openai
  request:
  - policy: teapot
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_raise_fault_formats_and_upstream_never_sees_rejected_request() {
    within(LIMIT, async {
        let bed = TestBed::start(FAULTS).await;
        let deny = [("x-deny", "yes")];

        // Condition false: passes.
        let ok = bed.get("/apigee/open", &[("x-deny", "no")]).await;
        assert_eq!(ok.status, 200, "{}", ok.text());

        // Apigee (default format).
        let r = bed.get("/apigee/closed", &deny).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-reason"), Some("closed"));
        let b = r.json();
        assert_eq!(b["fault"]["faultstring"], "/apigee/closed is closed", "{b}");
        assert_eq!(b["fault"]["detail"]["errorcode"], "access.Denied", "{b}");

        // OpenAI.
        let r = bed.get("/openai/v1/models", &deny).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let b = r.json();
        assert_eq!(b["error"]["message"], "/openai/v1/models is closed", "{b}");
        assert_eq!(b["error"]["type"], "permission_error", "{b}");
        assert_eq!(b["error"]["code"], "access.Denied", "{b}");

        // RFC 9457.
        let r = bed.post("/problem/items", &deny, "{\"a\":1}").await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let b = r.json();
        assert_eq!(b["status"], 403, "{b}");
        assert_eq!(b["title"], "Forbidden", "{b}");
        assert_eq!(b["detail"], "/problem/items is closed", "{b}");

        // A RaiseFault with its own body keeps it, whatever the flow's format.
        let r = bed.post("/tea/pot", &[], "{}").await;
        assert_eq!(r.status, 418, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.text(), r#"{"short":"stout"}"#);

        // The upstream saw the allowed request and none of the rejected ones.
        assert_eq!(bed.upstream.seen_with_prefix("/apigee/open").len(), 1);
        for p in ["/apigee/closed", "/openai", "/problem", "/tea"] {
            let seen = bed.upstream.seen_with_prefix(p);
            assert!(seen.is_empty(), "upstream saw rejected {p}: {seen:?}");
        }
        let m = bed.tollgate.metrics().await;
        assert_eq!(
            metric(
                &m,
                r#"tollgate_rejections_total{code="access.Denied",flow="llm",policy="deny"}"#
            ),
            Some(1.0),
            "{m}"
        );
    })
    .await;
}

// ───────────────────────────── c. SSE through FULL_DUPLEX_STREAMED ─────────────────────────────

const SSE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag-request}
spec:
  type: AssignMessage
  set:
    headers:
      x-tollgate-flow: "{flow.name}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag-response}
spec:
  type: AssignMessage
  set:
    headers:
      x-served-by: tollgate
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: stream}
spec:
  default: true
  request:
  - policy: tag-request
  response:
  - policy: tag-response
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_sse_streams_through_full_duplex() {
    within(LIMIT, async {
        let bed = TestBed::start(SSE).await;
        let s = bed
            .client
            .stream("GET", &bed.url("/sse?n=5&delay_ms=300"), &[("accept", "text/event-stream")], "")
            .await;
        assert_eq!(s.status, 200);
        assert_eq!(s.header("content-type"), Some("text/event-stream"));
        assert_eq!(s.header("x-served-by"), Some("tollgate"), "response header mutation in FULL_DUPLEX");

        let body = String::from_utf8(s.body()).expect("UTF-8 body");
        let expected: String = (0..5)
            .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
            .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
            .collect();
        assert_eq!(body, expected, "events intact and in order");

        let first = s.chunks.first().expect("at least one chunk").at;
        let timeline: Vec<_> = s.chunks.iter().map(|c| (c.at.as_millis(), c.data.len())).collect();
        assert!(
            s.total >= Duration::from_millis(1400),
            "upstream takes 1.5 s; total {:?}",
            s.total
        );
        assert!(
            first + Duration::from_millis(600) < s.total,
            "first event at {first:?} should come well before the end at {:?}: chunks (ms, bytes) {timeline:?}",
            s.total
        );
        assert!(s.chunks.len() >= 3, "events should arrive spread out, got {timeline:?}");

        // The body really went through tollgate (FULL_DUPLEX, not bypassed).
        let m = bed.tollgate.metrics().await;
        let body_msgs = metric(&m, r#"tollgate_phase_duration_seconds_count{phase="response_body"}"#).unwrap_or(0.0);
        assert!(body_msgs >= 2.0, "tollgate saw {body_msgs} response_body messages\n{m}");
        assert_eq!(metric_sum(&m, "tollgate_protocol_errors_total"), 0.0, "{m}");
    })
    .await;
}

/// The LLM shape of the reference bootstrap: the prompt BUFFERED, the answer streamed
/// FULL_DUPLEX on the same route (per-route override).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2_buffered_prompt_and_full_duplex_answer_on_one_route() {
    within(LIMIT, async {
        let mut opts = BedOptions::new(SSE);
        opts.envoy.routes[0] = RouteSpec::new("/sse").timeout("0s").mode(Mode {
            request_body_mode: Some("BUFFERED"),
            ..Mode::duplex_response()
        });
        let bed = TestBed::start_with(opts).await;
        let prompt = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let s = bed
            .client
            .stream(
                "POST",
                &bed.url("/sse?n=4&delay_ms=250"),
                &[("content-type", "application/json")],
                prompt,
            )
            .await;
        assert_eq!(s.status, 200);
        assert_eq!(s.header("x-served-by"), Some("tollgate"));
        let body = String::from_utf8(s.body()).unwrap();
        assert!(
            body.starts_with("data: {\"i\":0}\n\n") && body.ends_with("data: [DONE]\n\n"),
            "{body:?}"
        );
        assert_eq!(body.matches("data: ").count(), 5, "{body:?}");
        let first = s.chunks[0].at;
        assert!(
            first + Duration::from_millis(500) < s.total,
            "first {first:?}, total {:?}",
            s.total
        );

        let seen = bed.upstream.seen_with_prefix("/sse");
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].headers.get("x-tollgate-flow").map(String::as_str),
            Some("stream")
        );
        let m = bed.tollgate.metrics().await;
        assert_eq!(
            metric(
                &m,
                r#"tollgate_phase_duration_seconds_count{phase="request_body"}"#
            ),
            Some(1.0),
            "{m}"
        );
        assert!(
            metric(
                &m,
                r#"tollgate_phase_duration_seconds_count{phase="response_body"}"#
            )
            .unwrap_or(0.0)
                >= 2.0,
            "{m}"
        );
        assert_eq!(metric_sum(&m, "tollgate_protocol_errors_total"), 0.0, "{m}");
    })
    .await;
}

// ───────────────────────────── d/e. hot reload ─────────────────────────────

fn versioned(v: &str) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: version-request}}
spec:
  type: AssignMessage
  set:
    headers:
      x-version: "{v}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: version-response}}
spec:
  type: AssignMessage
  set:
    headers:
      x-version-response: "{v}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: versioned}}
spec:
  default: true
  request:
  - policy: version-request
  response:
  - policy: version-response
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_hot_reload_keeps_in_flight_requests_on_their_snapshot() {
    within(LIMIT, async {
        let bed = TestBed::start(&versioned("one")).await;
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("one"));
        assert_eq!(
            bed.tollgate.metric("tollgate_config_generation").await,
            Some(1.0)
        );

        // A slow request, in flight across the reload.
        let client = bed.client.clone();
        let slow_url = bed.url("/slow?ms=1500");
        let started = Instant::now();
        let slow = tokio::spawn(async move { client.get(&slow_url, &[]).await });
        support::eventually(
            Duration::from_secs(5),
            "the slow request to reach the upstream",
            || async { (!bed.upstream.seen_with_prefix("/slow").is_empty()).then_some(()) },
        )
        .await;

        bed.write_config("flows.yaml", &versioned("two"));
        bed.tollgate
            .wait_metric("tollgate_config_generation", 2.0, Duration::from_secs(5))
            .await;
        assert!(
            !slow.is_finished(),
            "the reload should land while the slow request is in flight (took {:?})",
            started.elapsed()
        );
        assert_eq!(
            bed.tollgate.metric("tollgate_config_synchronized").await,
            Some(1.0)
        );

        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("two"));
        assert_eq!(r.header("x-version-response"), Some("two"));

        let r = slow.await.expect("slow request task");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("one"));
        // Its response phase ran after the reload, on the snapshot the stream started with.
        assert_eq!(r.header("x-version-response"), Some("one"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_bad_edit_keeps_running_config() {
    within(LIMIT, async {
        let bed = TestBed::start(&versioned("one")).await;
        assert_eq!(
            bed.tollgate.metric("tollgate_config_synchronized").await,
            Some(1.0)
        );

        bed.write_config(
            "flows.yaml",
            "apiVersion: tollgate.dev/v1alpha1\nkind: [Flow\n  metadata: {name:\n",
        );
        bed.tollgate
            .wait_metric("tollgate_config_synchronized", 0.0, Duration::from_secs(5))
            .await;
        assert_eq!(
            bed.tollgate.metric("tollgate_config_generation").await,
            Some(1.0)
        );
        let m = bed.tollgate.metrics().await;
        assert!(
            metric(&m, r#"tollgate_config_reloads_total{result="failure"}"#).unwrap_or(0.0) >= 1.0,
            "{m}"
        );
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("one"));
        let (status, _) = bed.tollgate.get("/readyz").await;
        assert_eq!(
            status, 200,
            "a refused reload does not make tollgate unready"
        );

        // A fixed file is picked up again.
        bed.write_config("flows.yaml", &versioned("two"));
        bed.tollgate
            .wait_metric("tollgate_config_generation", 2.0, Duration::from_secs(5))
            .await;
        assert_eq!(
            bed.tollgate.metric("tollgate_config_synchronized").await,
            Some(1.0)
        );
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("two"));
    })
    .await;
}

// ───────────────────────────── f. ConfigMap symlink swap ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_configmap_symlink_swap_triggers_reload() {
    within(LIMIT, async {
        let mut opts = BedOptions::new(&versioned("one"));
        opts.configmap = Some("2026_01".to_owned());
        // No periodic re-read: only the directory watch can notice the swaps.
        opts.tollgate_args = vec!["--reload-interval".into(), "1h".into()];
        let bed = TestBed::start_with(opts).await;
        let cm = bed.configmap.as_ref().unwrap();
        assert!(std::fs::symlink_metadata(cm.dir.join("flows.yaml"))
            .unwrap()
            .file_type()
            .is_symlink());

        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("one"));

        cm.swap("2026_02", &[("flows.yaml", &versioned("two"))]);
        bed.tollgate
            .wait_metric("tollgate_config_generation", 2.0, Duration::from_secs(5))
            .await;
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("two"));

        // The watch survives the swap: a second one is seen too.
        cm.swap("2026_03", &[("flows.yaml", &versioned("three"))]);
        bed.tollgate
            .wait_metric("tollgate_config_generation", 3.0, Duration::from_secs(5))
            .await;
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.echoed_header("x-version").as_deref(), Some("three"));
    })
    .await;
}

// ───────────────────────────── g. BUFFERED request body ─────────────────────────────

const CHAT: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set:
    headers:
      x-tollgate-flow: "{flow.name}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  match: {pathPrefixes: [/v1/chat/completions], methods: [POST]}
  errorFormat: openai
  maxBodyBytes: 1048576
  request:
  - policy: tag
  response:
  - policy: tag
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_buffered_request_body_reaches_upstream_intact() {
    within(LIMIT, async {
        let bed = TestBed::start(CHAT).await;
        let filler = "lorem ipsum dolor sit amet ".repeat(2000);
        let body = serde_json::json!({
            "model": "gemma-3",
            "stream": false,
            "messages": [
                {"role": "system", "content": "Be brief. ünïcødé ✓"},
                {"role": "user", "content": filler},
            ],
        })
        .to_string();
        assert!(body.len() > 50_000);
        let r = bed
            .post(
                "/v1/chat/completions",
                &[("content-type", "application/json")],
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.json();
        assert_eq!(echo["method"], "POST");
        assert_eq!(
            echo["body"].as_str(),
            Some(body.as_str()),
            "body reached the upstream intact"
        );
        assert_eq!(echo["headers"]["x-tollgate-flow"], "chat");
        assert_eq!(r.header("x-tollgate-flow"), Some("chat"));
        assert_eq!(
            echo["headers"]["content-length"].as_str(),
            Some(body.len().to_string().as_str()),
            "content-length kept when the body is not changed"
        );

        // The body went through tollgate (BUFFERED: one request_body message).
        let m = bed.tollgate.metrics().await;
        assert_eq!(
            metric(
                &m,
                r#"tollgate_phase_duration_seconds_count{phase="request_body"}"#
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(metric_sum(&m, "tollgate_protocol_errors_total"), 0.0, "{m}");
    })
    .await;
}

// ───────────────────────────── h. validate and health ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_validate_and_health() {
    within(LIMIT, async {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        std::fs::create_dir(&good).unwrap();
        std::fs::write(good.join("flows.yaml"), HEADERS).unwrap();
        std::fs::write(good.join("notes.txt"), "not configuration: ignored").unwrap();
        let (code, out, err) = validate(&good);
        assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
        assert!(out.contains("valid"), "{out}");

        // The shipped examples are valid too.
        let (code, out, err) = validate(&support::repo_root().join("policies"));
        assert_eq!(code, 0, "policies/: stdout: {out}\nstderr: {err}");

        let bad = tmp.path().join("bad");
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("ok.yaml"), SSE).unwrap();
        std::fs::write(
            bad.join("broken.yaml"),
            "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec:\n  requets: []\n",
        )
        .unwrap();
        let (code, out, err) = validate(&bad);
        assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
        assert!(err.contains("broken.yaml"), "the error names the file: {err}");
        assert!(err.contains("requets"), "the error names the field: {err}");
        assert!(!err.contains("ok.yaml"), "only the broken file is blamed: {err}");

        // Health endpoints of a running server (no Envoy needed).
        let tg = Tollgate::start(&good, tmp.path(), &[]).await;
        let (status, _) = tg.get("/healthz").await;
        assert_eq!(status, 200);
        let (status, body) = tg.get("/readyz").await;
        assert_eq!(status, 200, "{body}");
        let m = tg.metrics().await;
        assert_eq!(metric(&m, "tollgate_config_generation"), Some(1.0), "{m}");
        assert_eq!(metric(&m, "tollgate_config_synchronized"), Some(1.0), "{m}");
    })
    .await;
}

// ───────────────────────────── i. API keys ─────────────────────────────

/// VerifyApiKey through Envoy: the key header and query parameter are stripped before the
/// upstream (the query one by rewriting `:path`), identity headers arrive, refusals reach
/// the client with Apigee codes and the upstream never sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_verify_api_key_through_envoy() {
    within(LIMIT, async {
        let config = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/api-keys.yaml"),
        )
        .unwrap();
        let bed = TestBed::start(&config).await;
        let key = "tg_demo_key_rotate_me_0001";

        let r = bed.get("/v1/models", &[("x-api-key", key)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("x-tollgate-app").as_deref(),
            Some("demo-app")
        );
        assert_eq!(
            r.echoed_header("x-api-key"),
            None,
            "the key reached the upstream"
        );

        let r = bed
            .get(&format!("/v1/models/m1?x=1&apikey={key}"), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["uri"], "/v1/models/m1?x=1", "{}", r.text());

        let r = bed.get("/v1/models", &[("x-api-key", "wrong-key")]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["code"], "oauth.v2.InvalidApiKey");
        let r = bed.get("/v1/models", &[]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["code"], "oauth.v2.FailedToResolveAPIKey");
    })
    .await;
}
