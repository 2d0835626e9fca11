//! Issue 14, end to end with the official clients: the `openai`, `anthropic` and
//! `google-genai` Python SDKs (PyPI, installed by scripts/setup.sh into .tools/venv) talk to a
//! real Envoy 1.40 with tollgate as its ext_proc, in front of the local LLM upstream
//! (scripts/llm_upstream.py), with the body phases FULL_DUPLEX_STREAMED and BUFFERED.
//!
//! - answers, streamed and not, reach the SDK intact: text and usage as the upstream sent
//!   them, also when every event is cut across TCP writes, with CRLF lines, `data:` split
//!   over two lines and keep-alive comments;
//! - a 429 from tollgate (Quota; LlmTokenQuota with `x-ratelimit-*-tokens`) reaches each SDK
//!   as its own rate-limit exception with tollgate's message, fault code and `Retry-After`
//!   (errorFormat `auto`);
//! - tokens recorded (gen_ai metrics, LlmTokenQuota's reconciled count) equal the upstream's
//!   usage exactly;
//! - the SDKs' own auth headers pass VerifyApiKey; a wrong key is the SDK's authentication
//!   exception;
//! - upstream 429s pass through untouched; an upstream reset mid-stream is an SDK error, never
//!   a stream that looks complete.
//!
//! Each test skips (saying so) only when the SDK packages are not installed.
//! Run with `cargo test --test llm_sdk`.

mod support;

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::llm_upstream::{LlmBed, Sdks};
use support::within;

const LIMIT: Duration = Duration::from_secs(240);
const REPLY: &str = "Hello from the tollgate test upstream.";

/// The ext_proc body modes under test (both bodies in the same mode).
#[derive(Clone, Copy, Debug)]
enum Bodies {
    Duplex,
    Buffered,
}

type Bed = LlmBed;

impl Bodies {
    fn mode(self) -> &'static str {
        match self {
            Bodies::Duplex => "FULL_DUPLEX_STREAMED",
            Bodies::Buffered => "BUFFERED",
        }
    }
}

/// The SDKs, or `None` (the test then skips with the reason).
fn sdks(test: &str) -> Option<Sdks> {
    match Sdks::find() {
        Ok(s) if s.has("openai") && s.has("anthropic") => Some(s),
        Ok(s) => {
            eprintln!(
                "SKIPPED {test}: the openai and anthropic SDKs are not both installed ({}); run scripts/setup.sh",
                s.have
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}; run scripts/setup.sh");
            None
        }
    }
}

/// Pass-through flows: every LLM path, no policy, errors in the API's own format.
const PASS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: llm}
spec:
  match: {pathPrefixes: [/v1, /v1beta]}
  errorFormat: auto
"#;

/// The usage the upstream reports (`x-test-usage`), and what each SDK shows for it.
const USAGE: &str = "prompt=17,completion=9,cached=4,cache_creation=3";

fn assert_usage(case: &str, usage: &Value) {
    let want: &[(&str, i64)] = if case.starts_with("anthropic") {
        &[
            ("input_tokens", 17),
            ("output_tokens", 9),
            ("cache_read_input_tokens", 4),
            ("cache_creation_input_tokens", 3),
        ]
    } else if case.starts_with("openai.responses") {
        &[
            ("input_tokens", 17),
            ("output_tokens", 9),
            ("total_tokens", 26),
        ]
    } else if case == "openai.embeddings" {
        &[("prompt_tokens", 17), ("total_tokens", 17)]
    } else if case.starts_with("gemini") {
        &[
            ("prompt_token_count", 17),
            ("candidates_token_count", 9),
            ("total_token_count", 26),
            ("cached_content_token_count", 4),
        ]
    } else {
        &[
            ("prompt_tokens", 17),
            ("completion_tokens", 9),
            ("total_tokens", 26),
        ]
    };
    for (field, n) in want {
        assert_eq!(
            usage[field].as_i64(),
            Some(*n),
            "{case}: usage.{field} in {usage}"
        );
    }
}

/// Every case the SDKs run: the answer and the usage the upstream sent arrive intact.
async fn answers_intact(bodies: Bodies, test: &str) {
    let Some(sdk) = sdks(test) else { return };
    let bed = LlmBed::start("llm-sdk", PASS, bodies.mode()).await;
    let mut cases = vec![
        "openai.chat",
        "openai.chat.stream",
        "openai.responses",
        "openai.responses.stream",
        "openai.completions.stream",
        "openai.embeddings",
        "anthropic.messages",
        "anthropic.messages.stream",
        "anthropic.messages.stream_helper",
    ];
    if sdk.has("gemini") {
        cases.extend(["gemini.generate", "gemini.stream"]);
    } else {
        eprintln!("{test}: google-genai is not installed; the Gemini cases are skipped");
    }
    // Streams twice: plainly, then with every SSE hazard the upstream can make.
    let hazards: &[(&str, &str)] = &[
        ("x-test-usage", USAGE),
        ("x-test-split", "5"),
        ("x-test-crlf", "1"),
        ("x-test-multiline", "1"),
        ("x-test-comments", "1"),
    ];
    // google-genai reads SSE line by line and fails on `:` comment lines (which Google's
    // servers do not send): its streams get every other hazard.
    let gemini_hazards = &hazards[..4];
    let plain: &[(&str, &str)] = &[("x-test-usage", USAGE)];
    let streams: Vec<&str> = cases
        .iter()
        .copied()
        .filter(|c| c.contains("stream"))
        .collect();
    let gemini_streams: Vec<&str> = streams
        .iter()
        .copied()
        .filter(|c| c.starts_with("gemini"))
        .collect();
    let other_streams: Vec<&str> = streams
        .iter()
        .copied()
        .filter(|c| !c.starts_with("gemini"))
        .collect();
    for (batch, headers) in [
        (&cases, plain),
        (&other_streams, hazards),
        (&gemini_streams, gemini_hazards),
    ] {
        if batch.is_empty() {
            continue;
        }
        let lines = sdk.run_many(batch, &bed.root(), "test-key", headers).await;
        for (case, r) in batch.iter().copied().zip(lines) {
            assert_eq!(
                r["ok"],
                true,
                "{case} {headers:?} ({bodies:?}): {r}\n{}",
                bed.logs()
            );
            if case != "openai.embeddings" {
                assert_eq!(r["text"], REPLY, "{case} {headers:?}: {r}");
            } else {
                assert_eq!(r["dims"], 8, "{case}: {r}");
            }
            if case == "anthropic.messages.stream_helper" {
                assert_eq!(r["final_text"], REPLY, "{case}: {r}");
            }
            if case == "openai.responses.stream" {
                assert_eq!(r["last_event"], "response.completed", "{case}: {r}");
            }
            assert_usage(case, &r["usage"]);
        }
    }
    // What the SDKs sent reached the upstream: their own auth headers and JSON bodies.
    let seen = bed.upstream.requests().await;
    let chat = seen
        .iter()
        .find(|r| r["path"] == "/v1/chat/completions")
        .expect("a chat request");
    assert_eq!(chat["headers"]["authorization"], "Bearer test-key");
    let body: Value = serde_json::from_str(chat["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["model"], "test-model");
    let msg = seen
        .iter()
        .find(|r| r["path"] == "/v1/messages")
        .expect("a messages request");
    // The Anthropic SDK 2.x sends its key as a bearer token, not `x-api-key`.
    assert_eq!(msg["headers"]["authorization"], "Bearer test-key");
    assert!(msg["headers"]["anthropic-version"].is_string(), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_answers_intact_full_duplex() {
    within(
        LIMIT,
        answers_intact(Bodies::Duplex, "sdk_answers_intact_full_duplex"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_answers_intact_buffered() {
    within(
        LIMIT,
        answers_intact(Bodies::Buffered, "sdk_answers_intact_buffered"),
    )
    .await;
}

/// A request quota of 1 per API family, errors in the API's own format.
const QUOTA: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: q-openai}
spec: {type: Quota, allow: 1, timeUnit: hour, rateLimitHeaders: both}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: q-anthropic}
spec: {type: Quota, allow: 1, timeUnit: hour, rateLimitHeaders: both}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: q-gemini}
spec: {type: Quota, allow: 1, timeUnit: hour, rateLimitHeaders: both}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: openai}
spec:
  match: {pathPrefixes: [/v1/chat, /v1/responses]}
  errorFormat: auto
  request: [{policy: q-openai}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: anthropic}
spec:
  match: {pathPrefixes: [/v1/messages]}
  errorFormat: auto
  request: [{policy: q-anthropic}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: gemini}
spec:
  match: {pathPrefixes: [/v1beta]}
  errorFormat: auto
  request: [{policy: q-gemini}]
"#;

/// What every SDK shows for tollgate's quota refusal.
fn assert_quota_429(case: &str, r: &Value) {
    assert_eq!(r["ok"], false, "{case}: {r}");
    assert_eq!(r["status"], 429, "{case}: {r}");
    let message = r["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Rate limit quota violation"),
        "{case}: tollgate's message in the exception: {r}"
    );
    let retry: u64 = r["headers"]["retry-after"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{case}: Retry-After: {r}"));
    assert!((1..=3600).contains(&retry), "{case}: {r}");
    assert_eq!(r["headers"]["x-ratelimit-limit"], "1", "{case}: {r}");
    assert_eq!(r["headers"]["x-ratelimit-remaining"], "0", "{case}: {r}");
    let code = "policies.ratelimit.QuotaViolation";
    match case.split('.').next() {
        Some("openai") => {
            assert_eq!(r["error"], "RateLimitError", "{case}: {r}");
            // The OpenAI SDK keeps `error` as the body.
            assert_eq!(r["body"]["type"], "rate_limit_error", "{case}: {r}");
            assert_eq!(r["body"]["code"], code, "{case}: {r}");
        }
        Some("anthropic") => {
            assert_eq!(r["error"], "RateLimitError", "{case}: {r}");
            assert_eq!(r["body"]["type"], "error", "{case}: {r}");
            assert_eq!(
                r["body"]["error"]["type"], "rate_limit_error",
                "{case}: {r}"
            );
            assert_eq!(r["body"]["error"]["code"], code, "{case}: {r}");
        }
        _ => {
            assert_eq!(r["error"], "ClientError", "{case}: {r}");
            assert_eq!(
                r["body"]["error"]["status"], "RESOURCE_EXHAUSTED",
                "{case}: {r}"
            );
            assert_eq!(
                r["body"]["error"]["details"][0]["reason"], code,
                "{case}: {r}"
            );
        }
    }
}

/// Tollgate's 429 (Quota, one request an hour) reaches each SDK as its own rate-limit
/// exception, streamed or not, with tollgate's message, code and `Retry-After`; the refused
/// requests never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_rate_limit_error_from_quota() {
    within(LIMIT, async {
        let Some(sdk) = sdks("sdk_rate_limit_error_from_quota") else {
            return;
        };
        let bed = LlmBed::start("llm-sdk", QUOTA, Bodies::Duplex.mode()).await;
        let mut families = vec![
            (
                "openai.chat",
                "openai.chat.stream",
                "openai.responses.stream",
                "/v1/chat",
            ),
            (
                "anthropic.messages",
                "anthropic.messages.stream",
                "anthropic.messages.stream_helper",
                "/v1/messages",
            ),
        ];
        if sdk.has("gemini") {
            families.push((
                "gemini.generate",
                "gemini.stream",
                "gemini.generate",
                "/v1beta",
            ));
        }
        for (first, stream, other, prefix) in families {
            let batch = [first, stream, first, other];
            let mut lines = sdk.run_many(&batch, &bed.root(), "k", &[]).await;
            let r = lines.remove(0);
            assert_eq!(r["ok"], true, "{first}: {r}\n{}", bed.logs());
            for (case, r) in batch[1..].iter().copied().zip(lines) {
                if case == "anthropic.messages.stream_helper" {
                    // The helper raises the same exception; its line has no response headers.
                    assert_eq!(r["error"], "RateLimitError", "{case}: {r}");
                    assert_eq!(r["status"], 429, "{case}: {r}");
                    continue;
                }
                assert_quota_429(case, &r);
            }
            let reached = bed.upstream.requests_to(prefix).await.len();
            assert_eq!(
                reached, 1,
                "{prefix}: only the allowed request is forwarded"
            );
        }
    })
    .await;
}

const APP_KEY: &str = "tg_llm_sdk_test_key_0001";

/// An app whose key is [`APP_KEY`], one flow per API family (`/v1` OpenAI and Anthropic,
/// `/v1beta` Gemini), each with VerifyApiKey reading the key from `key_from`.
fn keys_config(key_from: &str) -> String {
    let hash: String = Sha256::digest(APP_KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {{name: llm}}
spec:
  operations:
  - {{path: "/v1/**", methods: [POST]}}
  - {{path: "/v1beta/**", methods: [POST]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {{name: llm-app}}
spec:
  developerEmail: llm@example.com
  products: [llm]
  keys:
  - {{id: k1, hash: "sha256:{hash}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: key}}
spec:
  type: VerifyApiKey
  keyFrom: {key_from}
  stripKey: true
  identityHeaders: {{app: x-tollgate-app}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: llm}}
spec:
  match: {{pathPrefixes: [/v1, /v1beta]}}
  errorFormat: auto
  request: [{{policy: key}}]
"#
    )
}

/// Runs each case with the app's key (answered, the key stripped before the upstream, the
/// app named to it) and with a wrong key (the SDK's authentication exception carrying
/// tollgate's message and code).
async fn keys_work(sdk: &Sdks, bed: &Bed, cases: &[(&str, &str, &str)]) {
    for &(case, prefix, header) in cases {
        let r = sdk.run(case, &bed.root(), APP_KEY, &[]).await;
        assert_eq!(r["ok"], true, "{case}: {r}\n{}", bed.logs());
        assert_eq!(r["text"], REPLY, "{case}: {r}");
        let seen = bed.upstream.requests_to(prefix).await;
        let last = seen.last().expect("forwarded");
        assert!(
            last["headers"].get(header).is_none(),
            "{case}: {header} stripped: {last}"
        );
        assert_eq!(
            last["headers"]["x-tollgate-app"], "llm-app",
            "{case}: {last}"
        );

        let r = sdk.run(case, &bed.root(), "wrong-key", &[]).await;
        assert_eq!(r["ok"], false, "{case}: {r}");
        assert_eq!(r["status"], 401, "{case}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("Invalid ApiKey"),
            "{case}: tollgate's message in the exception: {r}"
        );
        match case.split('.').next() {
            Some("openai") => {
                assert_eq!(r["error"], "AuthenticationError", "{case}: {r}");
                assert_eq!(r["body"]["type"], "authentication_error", "{case}: {r}");
                assert_eq!(r["body"]["code"], "oauth.v2.InvalidApiKey", "{case}: {r}");
            }
            Some("anthropic") => {
                assert_eq!(r["error"], "AuthenticationError", "{case}: {r}");
                assert_eq!(r["body"]["error"]["type"], "authentication_error", "{r}");
                assert_eq!(r["body"]["error"]["code"], "oauth.v2.InvalidApiKey", "{r}");
            }
            _ => {
                assert_eq!(r["error"], "ClientError", "{case}: {r}");
                assert_eq!(r["body"]["error"]["status"], "UNAUTHENTICATED", "{r}");
                assert_eq!(
                    r["body"]["error"]["details"][0]["reason"], "oauth.v2.InvalidApiKey",
                    "{r}"
                );
            }
        }
    }
}

/// google-genai's own key header (`x-goog-api-key`) passes VerifyApiKey today.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_gemini_key_passes_verify_api_key() {
    within(LIMIT, async {
        let Some(sdk) = sdks("sdk_gemini_key_passes_verify_api_key") else {
            return;
        };
        if !sdk.has("gemini") {
            eprintln!("SKIPPED sdk_gemini_key_passes_verify_api_key: google-genai is not installed; run scripts/setup.sh");
            return;
        }
        let bed = LlmBed::start("llm-sdk", &keys_config("[{header: x-goog-api-key}, {query: key}]"), Bodies::Duplex.mode())
        .await;
        let cases = [
            ("gemini.generate", "/v1beta", "x-goog-api-key"),
            ("gemini.stream", "/v1beta", "x-goog-api-key"),
        ];
        keys_work(&sdk, &bed, &cases).await;
    })
    .await;
}

/// Every SDK's own key header passes VerifyApiKey: the OpenAI SDK and the Anthropic SDK (2.x)
/// send `Authorization: Bearer`, google-genai `x-goog-api-key`: VerifyApiKey's `llm-sdks`
/// key preset reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_own_key_headers_pass_verify_api_key() {
    within(LIMIT, async {
        let Some(sdk) = sdks("sdk_own_key_headers_pass_verify_api_key") else {
            return;
        };
        for bodies in [Bodies::Duplex, Bodies::Buffered] {
            let bed = LlmBed::start(
                "llm-sdk",
                &keys_config("[{preset: llm-sdks}]"),
                bodies.mode(),
            )
            .await;
            let mut cases = vec![
                ("openai.chat", "/v1/chat", "authorization"),
                ("openai.chat.stream", "/v1/chat", "authorization"),
                ("openai.responses.stream", "/v1/responses", "authorization"),
                ("anthropic.messages", "/v1/messages", "authorization"),
                ("anthropic.messages.stream", "/v1/messages", "authorization"),
            ];
            if sdk.has("gemini") {
                cases.push(("gemini.generate", "/v1beta", "x-goog-api-key"));
            }
            keys_work(&sdk, &bed, &cases).await;
        }
    })
    .await;
}

/// The upstream's own 429 (with its `retry-after` and `x-ratelimit-*`) reaches the SDK as it
/// was sent, and an upstream reset mid-stream is an SDK error, never a stream that looks
/// complete; in both body modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_upstream_faults_pass_through() {
    within(LIMIT, async {
        let Some(sdk) = sdks("sdk_upstream_faults_pass_through") else {
            return;
        };
        for bodies in [Bodies::Duplex, Bodies::Buffered] {
            let bed = LlmBed::start("llm-sdk", PASS, bodies.mode()).await;
            let batch = ["openai.chat", "anthropic.messages.stream"];
            let lines = sdk
                .run_many(&batch, &bed.root(), "k", &[("x-test-fault", "429")])
                .await;
            for (case, r) in batch.iter().zip(lines) {
                assert_eq!(r["error"], "RateLimitError", "{case} {bodies:?}: {r}");
                assert_eq!(r["headers"]["retry-after"], "7", "{case}: {r}");
                assert_eq!(r["headers"]["x-ratelimit-remaining-requests"], "0", "{r}");
                assert!(
                    r["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("rate limited on purpose"),
                    "{case}: {r}"
                );
            }
            let batch = [
                "openai.chat.stream",
                "anthropic.messages.stream",
                "openai.responses.stream",
            ];
            let lines = sdk
                .run_many(
                    &batch,
                    &bed.root(),
                    "k",
                    &[("x-test-fault", "reset"), ("x-test-split", "9")],
                )
                .await;
            for (case, r) in batch.iter().zip(lines) {
                assert_eq!(
                    r["ok"], false,
                    "{case} {bodies:?}: a cut stream must fail: {r}"
                );
            }
        }
    })
    .await;
}

/// Sums of one gen_ai histogram's samples on `/metrics` whose labels include all `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Tokens recorded equal the upstream's usage exactly, for every SDK, streamed or not, in
/// both body modes: the gen_ai token histograms on tollgate's `/metrics` add up to what the
/// upstream reported (Anthropic's cache reads and writes counted as input, as billed). With
/// `llm: {includeUsage: true}` an OpenAI stream that did not ask for usage is still counted
/// exactly (tollgate asked the upstream for it) and the SDK sees no usage chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_tokens_recorded_equal_upstream_usage() {
    within(LIMIT, async {
        let Some(sdk) = sdks("sdk_tokens_recorded_equal_upstream_usage") else {
            return;
        };
        let config = format!("{PASS}  llm: {{includeUsage: true}}\n");
        for bodies in [Bodies::Duplex, Bodies::Buffered] {
            let bed = LlmBed::start("llm-sdk", &config, bodies.mode()).await;
            // provider label, cases, x-test-usage, billed input and output per call
            let mut plan = vec![
                (
                    "openai",
                    vec![
                        "openai.chat",
                        "openai.chat.stream",
                        "openai.chat.stream.nousage",
                        "openai.responses",
                        "openai.responses.stream",
                    ],
                    "prompt=11,completion=5,cached=3",
                    11.0,
                    5.0,
                ),
                (
                    "anthropic",
                    vec!["anthropic.messages", "anthropic.messages.stream"],
                    "prompt=13,completion=7,cached=2,cache_creation=1",
                    16.0,
                    7.0,
                ),
            ];
            if sdk.has("gemini") {
                plan.push((
                    "gcp.gemini",
                    vec!["gemini.generate", "gemini.stream"],
                    "prompt=19,completion=3",
                    19.0,
                    3.0,
                ));
            }
            for (_, cases, usage, _, _) in &plan {
                let lines = sdk
                    .run_many(cases, &bed.root(), "k", &[("x-test-usage", usage)])
                    .await;
                for (case, r) in cases.iter().zip(lines) {
                    assert_eq!(r["ok"], true, "{case} ({bodies:?}): {r}\n{}", bed.logs());
                    assert_eq!(r["text"], REPLY, "{case}: {r}");
                    if *case == "openai.chat.stream.nousage" {
                        assert!(r["usage"].is_null(), "{case}: usage chunk dropped: {r}");
                    }
                }
            }
            // tollgate asked the upstream for the usage the client did not ask for.
            let streams: Vec<Value> = bed
                .upstream
                .requests_to("/v1/chat/completions")
                .await
                .into_iter()
                .filter_map(|r| serde_json::from_str(r["body"].as_str()?).ok())
                .filter(|b: &Value| b["stream"] == true)
                .collect();
            assert_eq!(streams.len(), 2, "{streams:?}");
            for b in &streams {
                assert_eq!(b["stream_options"]["include_usage"], true, "{b}");
            }
            for (provider, cases, _, input, output) in &plan {
                let n = cases.len() as f64;
                let provider = format!(r#"gen_ai_provider_name="{provider}""#);
                let text = support::eventually(
                    Duration::from_secs(10),
                    &format!("{provider}: {n} calls recorded"),
                    || async {
                        let text = bed.tollgate.metrics().await;
                        let count = series(
                            &text,
                            "gen_ai_client_token_usage_count",
                            &[&provider, r#"gen_ai_token_type="output""#],
                        );
                        (count >= n).then_some(text)
                    },
                )
                .await;
                for (kind, per_call) in [("input", input), ("output", output)] {
                    let labels = [provider.as_str(), &format!(r#"gen_ai_token_type="{kind}""#)];
                    assert_eq!(
                        series(&text, "gen_ai_client_token_usage_count", &labels),
                        n,
                        "{provider} {kind} ({bodies:?}): one record per call"
                    );
                    assert_eq!(
                        series(&text, "gen_ai_client_token_usage_sum", &labels),
                        n * per_call,
                        "{provider} {kind} ({bodies:?}): the upstream's usage exactly"
                    );
                }
            }
        }
    })
    .await;
}

/// An LLM token quota of 100 tokens an hour, reserved before and reconciled after.
const TOKEN_QUOTA: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tokens}
spec:
  type: LlmTokenQuota
  allow: 100
  timeUnit: hour
  defaultOutputTokens: 60
  rateLimitHeaders: x-ratelimit
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: llm}
spec:
  match: {pathPrefixes: [/v1, /v1beta]}
  errorFormat: auto
  request: [{policy: tokens}]
"#;

/// LlmTokenQuota's 429 reaches each SDK as its rate-limit exception with tollgate's message,
/// `Retry-After` and OpenAI's `x-ratelimit-*-tokens`; and the first call was reconciled to
/// the upstream's usage exactly: 100 allowed, the upstream reported 40 + 50, 10 remain.
/// (The first call reserves its estimate, about 60 + the prompt, within 100; a second
/// estimate cannot fit beside either the reservation or the usage, so every later call is
/// refused whether or not the reconciling already ran; the refusals are repeated until it
/// has, which the remaining count shows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_rate_limit_error_from_llm_token_quota() {
    within(LIMIT, async {
        let Some(sdk) = sdks("sdk_rate_limit_error_from_llm_token_quota") else {
            return;
        };
        for bodies in [Bodies::Duplex, Bodies::Buffered] {
            let bed = LlmBed::start("llm-sdk", TOKEN_QUOTA, bodies.mode()).await;
            let r = sdk
                .run(
                    "openai.chat.stream",
                    &bed.root(),
                    "k",
                    &[("x-test-usage", "prompt=40,completion=50")],
                )
                .await;
            assert_eq!(r["ok"], true, "({bodies:?}): {r}\n{}", bed.logs());
            assert_eq!(r["usage"]["total_tokens"], 90, "{r}");
            let mut refused = Vec::new();
            for _ in 0..20 {
                let batch = [
                    "openai.chat",
                    "anthropic.messages.stream",
                    "openai.responses",
                ];
                refused = sdk.run_many(&batch, &bed.root(), "k", &[]).await;
                if refused
                    .iter()
                    .all(|r| r["headers"]["x-ratelimit-remaining-tokens"] == "10")
                {
                    break;
                }
            }
            for r in &refused {
                let case = r["case"].as_str().unwrap_or_default();
                assert_eq!(r["ok"], false, "{case} ({bodies:?}): {r}");
                assert_eq!(r["status"], 429, "{case}: {r}");
                assert_eq!(r["error"], "RateLimitError", "{case}: {r}");
                assert!(
                    r["message"]
                        .as_str()
                        .unwrap_or_default()
                        .to_ascii_lowercase()
                        .contains("token"),
                    "{case}: tollgate's message: {r}"
                );
                let code = if case.starts_with("anthropic") {
                    &r["body"]["error"]["code"]
                } else {
                    &r["body"]["code"]
                };
                assert_eq!(code, "policies.llmtokenquota.LLMTokenQuotaViolation", "{r}");
                let h = &r["headers"];
                assert!(h["retry-after"].as_str().is_some(), "{case}: {r}");
                assert_eq!(h["x-ratelimit-limit-tokens"], "100", "{case}: {r}");
                assert_eq!(
                    h["x-ratelimit-remaining-tokens"], "10",
                    "{case}: the first call reconciled to 40 + 50 exactly: {r}"
                );
                assert!(
                    h["x-ratelimit-reset-tokens"].as_str().is_some(),
                    "{case}: {r}"
                );
            }
            // Only the first call reached the upstream.
            assert_eq!(bed.upstream.requests().await.len(), 1);
        }
    })
    .await;
}
