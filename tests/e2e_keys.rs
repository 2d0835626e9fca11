//! Keys as the LLM SDKs send them, models per product operation and the endpoint picker's
//! headers, through a real Envoy 1.40 and the `tollgate` binary, asserting what the
//! upstream (an echo) received. The configuration is `policies/inference-gateway.yaml`,
//! plus a flow whose InferenceObjective step never runs. Run with
//! `cargo test --test e2e_keys`.

mod support;

use std::time::Duration;

use support::{within, BedOptions, Mode, Reply, RouteSpec, TestBed};

const LIMIT: Duration = Duration::from_secs(60);
const CHAT_KEY: &str = "tg_demo_chat_key_0001";
const BATCH_KEY: &str = "tg_demo_batch_key_0001";
const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

/// The step is skipped by its condition: the client's values of its headers are removed
/// all the same.
const SKIPPED: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: skipped-priority}
spec:
  match: {pathPrefixes: [/skipped]}
  request:
  - policy: inference-priority
    condition: "1 == 2"
"#;

/// What a client forges: a latency-critical objective, another tenant's fairness id, SLOs,
/// a model name and a model rewrite — plus the picker's destination header, which tollgate
/// must leave alone (the picker overwrites it; tollgate never names it).
const FORGED: &[(&str, &str)] = &[
    ("x-llm-d-inference-objective", "latency-critical"),
    ("x-gateway-inference-objective", "latency-critical"),
    ("x-llm-d-inference-fairness-id", "chat-app"),
    ("x-gateway-inference-fairness-id", "chat-app"),
    ("x-llm-d-slo-ttft-ms", "1"),
    ("x-llm-d-slo-tpot-ms", "1"),
    ("x-gateway-model-name", "gpt-4o"),
    ("x-llm-d-model-name-rewrite", "gpt-4o"),
    ("x-gateway-model-name-rewrite", "gpt-4o"),
    ("x-gateway-destination-endpoint", "10.9.8.7:8000"),
];

async fn bed() -> TestBed {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/inference-gateway.yaml"),
    )
    .expect("example");
    let mut opts = BedOptions::new(&example);
    opts.files
        .push(("skipped.yaml".to_owned(), SKIPPED.to_owned()));
    TestBed::start_with(opts).await
}

fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more).copied().collect()
}

fn ok(r: &Reply) -> serde_json::Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The key credentials the upstream must never see.
fn assert_no_key(echo: &serde_json::Value) {
    let h = &echo["headers"];
    for name in ["authorization", "x-api-key", "x-goog-api-key"] {
        assert!(h.get(name).is_none(), "{name} reached the upstream: {echo}");
    }
    let uri = echo["uri"].as_str().unwrap_or_default();
    assert!(!uri.contains("key="), "the key reached the upstream: {uri}");
    assert!(!uri.contains(CHAT_KEY) && !uri.contains(BATCH_KEY), "{uri}");
}

/// The key in each of the four places the SDKs send it works and is stripped; the
/// headers come from the product and app, the model from the body or the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_every_sdk_place_and_the_pickers_headers() {
    within(LIMIT, async {
        let bed = bed().await;

        // OpenAI SDK: Authorization: Bearer (any case).
        let bearer = format!("bearer {CHAT_KEY}");
        let r = bed
            .post(
                "/inference/v1/chat/completions",
                &[
                    ("authorization", bearer.as_str()),
                    ("content-type", "application/json"),
                ],
                CHAT,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        let h = &echo["headers"];
        assert_eq!(h["x-llm-d-inference-objective"], "latency-critical", "{echo}");
        assert_eq!(h["x-gateway-inference-objective"], "latency-critical", "{echo}");
        assert_eq!(h["x-llm-d-inference-fairness-id"], "chat-app", "{echo}");
        assert_eq!(h["x-gateway-inference-fairness-id"], "chat-app", "{echo}");
        assert_eq!(h["x-llm-d-slo-ttft-ms"], "500", "{echo}");
        assert_eq!(h["x-llm-d-slo-tpot-ms"], "50", "{echo}");
        assert_eq!(h["x-gateway-model-name"], "gpt-4o", "{echo}");
        assert_eq!(h["x-tollgate-app"], "chat-app", "{echo}");
        assert_eq!(echo["body"], CHAT, "the body passes unchanged");

        // Anthropic SDK: x-api-key.
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = bed
            .post(
                "/inference/v1/messages",
                &[("x-api-key", CHAT_KEY), ("anthropic-version", "2023-06-01")],
                body,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        assert_eq!(echo["headers"]["x-gateway-model-name"], "claude-sonnet-4-5");
        assert_eq!(echo["headers"]["anthropic-version"], "2023-06-01");

        // Gemini SDK: x-goog-api-key; the model from the path.
        let gemini = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;
        let r = bed
            .post(
                "/inference/v1beta/models/gemini-2.0-flash:generateContent",
                &[("x-goog-api-key", CHAT_KEY)],
                gemini,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        assert_eq!(echo["headers"]["x-gateway-model-name"], "gemini-2.0-flash");

        // Gemini REST: ?key=, cut out of the path; other parameters stay.
        let r = bed
            .post(
                &format!(
                    "/inference/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key={CHAT_KEY}"
                ),
                &[],
                gemini,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        assert_eq!(
            echo["uri"],
            "/inference/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(echo["headers"]["x-llm-d-inference-objective"], "latency-critical");

        // Another scheme in Authorization is not the key (the key in x-api-key decides),
        // but with stripKey no key header reaches the upstream, whatever it holds.
        let r = bed
            .post(
                "/inference/v1/chat/completions",
                &[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", CHAT_KEY)],
                CHAT,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
    })
    .await;
}

/// Refusals: a model the key's products do not list for the operation, two different keys,
/// no key. The upstream sees none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_models_and_conflicting_keys_are_refused() {
    within(LIMIT, async {
        let bed = bed().await;
        let batch = format!("Bearer {BATCH_KEY}");
        // gpt-4o is the interactive product's, not the batch one's.
        let r = bed
            .post(
                "/inference/v1/chat/completions",
                &[("authorization", batch.as_str())],
                CHAT,
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(
            r.text().contains("oauth.v2.InvalidApiKeyForGivenResource"),
            "{}",
            r.text()
        );
        // Gemini: a model in the path the product does not list.
        let r = bed
            .post(
                "/inference/v1beta/models/gemini-2.5-pro:generateContent",
                &[("x-goog-api-key", CHAT_KEY)],
                "{}",
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.text().contains("oauth.v2.InvalidApiKeyForGivenResource"));
        // The same key twice is fine; two different keys are refused, naming both places.
        let r = bed
            .post(
                &format!("/inference/v1/chat/completions?key={CHAT_KEY}"),
                &[("x-api-key", CHAT_KEY)],
                CHAT,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        let r = bed
            .post(
                &format!("/inference/v1/chat/completions?key={BATCH_KEY}"),
                &[("x-api-key", CHAT_KEY)],
                CHAT,
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.text().contains("oauth.v2.InvalidApiKey"), "{}", r.text());
        assert!(
            r.text()
                .contains("different API keys sent in x-api-key and ?key="),
            "{}",
            r.text()
        );
        let r = bed.post("/inference/v1/chat/completions", &[], CHAT).await;
        assert_eq!(r.status, 401);
        assert!(r.text().contains("oauth.v2.FailedToResolveAPIKey"));
        // Only the one request with the same key twice got through.
        let seen = bed.upstream.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
    })
    .await;
}

/// A client's forged objective, fairness id, SLOs, model name and rewrite never reach the
/// picker: replaced by the app's and product's, or removed where they have none, also when
/// the step does not run. The picker's destination header is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_picker_headers_are_removed_and_the_destination_is_left_alone() {
    within(LIMIT, async {
        let bed = bed().await;
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let headers = with(&[("x-api-key", BATCH_KEY)], FORGED);
        let r = bed
            .post("/inference/v1/chat/completions", &headers, body)
            .await;
        let echo = ok(&r);
        let h = &echo["headers"];
        assert_eq!(h["x-llm-d-inference-objective"], "sheddable", "{echo}");
        assert_eq!(h["x-gateway-inference-objective"], "sheddable", "{echo}");
        assert_eq!(h["x-llm-d-inference-fairness-id"], "tenant-b", "{echo}");
        assert_eq!(h["x-gateway-inference-fairness-id"], "tenant-b", "{echo}");
        assert_eq!(h["x-gateway-model-name"], "gpt-4o-mini", "{echo}");
        // The batch product has no SLOs: the client's are gone, none set.
        for gone in [
            "x-llm-d-slo-ttft-ms",
            "x-llm-d-slo-tpot-ms",
            "x-llm-d-model-name-rewrite",
            "x-gateway-model-name-rewrite",
        ] {
            assert!(h.get(gone).is_none(), "{gone} reached the upstream: {echo}");
        }
        assert_eq!(
            h["x-gateway-destination-endpoint"], "10.9.8.7:8000",
            "{echo}"
        );

        // The step skipped by its condition: every forged value removed all the same.
        let r = bed.post("/skipped", FORGED, "{}").await;
        let echo = ok(&r);
        let h = &echo["headers"];
        for (name, _) in FORGED {
            if name.starts_with("x-gateway-destination-endpoint") {
                continue;
            }
            assert!(
                h.get(*name).is_none(),
                "{name} reached the upstream: {echo}"
            );
        }
        assert_eq!(
            h["x-gateway-destination-endpoint"], "10.9.8.7:8000",
            "{echo}"
        );
    })
    .await;
}

/// GKE's `llm` extension chain sends both bodies FULL_DUPLEX_STREAMED (with trailers). The
/// key and model are checked on the request body, so the headers answer waits for the
/// body: the key is stripped and the picker's headers are set before anything after
/// tollgate (the endpoint picker, then the upstream) sees the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_streamed_as_on_gke() {
    within(LIMIT, async {
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("policies/inference-gateway.yaml"),
        )
        .expect("example");
        let mut opts = BedOptions::new(&example);
        let duplex = Mode {
            request_body_mode: Some("FULL_DUPLEX_STREAMED"),
            request_trailer_mode: Some("SEND"),
            ..Mode::duplex_response()
        };
        opts.envoy.mode = duplex.clone();
        opts.envoy.allow_mode_override = false;
        opts.envoy.routes = vec![RouteSpec::new("/").timeout("0s").mode(duplex)];
        let bed = TestBed::start_with(opts).await;

        let bearer = format!("Bearer {CHAT_KEY}");
        let headers = with(&[("authorization", bearer.as_str())], FORGED);
        let r = bed
            .post("/inference/v1/chat/completions", &headers, CHAT)
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        let h = &echo["headers"];
        assert_eq!(
            h["x-llm-d-inference-objective"], "latency-critical",
            "{echo}"
        );
        assert_eq!(h["x-llm-d-inference-fairness-id"], "chat-app", "{echo}");
        assert_eq!(h["x-gateway-model-name"], "gpt-4o", "{echo}");
        assert!(h.get("x-llm-d-model-name-rewrite").is_none(), "{echo}");
        assert_eq!(
            h["x-gateway-destination-endpoint"], "10.9.8.7:8000",
            "{echo}"
        );
        assert_eq!(echo["body"], CHAT);

        // Gemini's ?key= is cut out of the path in this mode too.
        let r = bed
            .post(
                &format!(
                    "/inference/v1beta/models/gemini-2.0-flash:generateContent?key={CHAT_KEY}"
                ),
                &[],
                r#"{"contents":[]}"#,
            )
            .await;
        let echo = ok(&r);
        assert_no_key(&echo);
        assert_eq!(echo["headers"]["x-gateway-model-name"], "gemini-2.0-flash");

        // A refusal still answers at once.
        let batch = format!("Bearer {BATCH_KEY}");
        let r = bed
            .post(
                "/inference/v1/chat/completions",
                &[("authorization", batch.as_str())],
                CHAT,
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(bed.upstream.seen().len(), 2);
    })
    .await;
}
