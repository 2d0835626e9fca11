//! SemanticCache through a real Envoy 1.40 with the official SDKs, against the local LLM
//! upstream (which records what reaches it):
//!
//! - a repeated question is answered from the cache, as JSON and as a stream the SDK reads
//!   as a normal one, and the upstream sees it once; a paraphrase hits too;
//! - another app's identical question is not served from the first app's entry;
//! - every API's SDK (OpenAI chat, completions, Responses with its stream helper, Anthropic
//!   with its stream helper, Gemini) reads a hit as a normal answer;
//! - a failed answer is not stored; the metrics count hits, misses and stored entries.
//!
//! Run with `cargo test --test semantic_cache` (skips when the SDKs or the built-in model
//! are not installed: run scripts/setup.sh).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::llm_upstream::{LlmBed, Sdks};
use support::{repo_root, within};

const LIMIT: Duration = Duration::from_secs(240);
const KEY_A: &str = "tg_semantic_test_key_app_a";
const KEY_B: &str = "tg_semantic_test_key_app_b";

fn model_dir() -> Option<PathBuf> {
    let d = repo_root().join(".tools/embed-model");
    d.join("model.safetensors").exists().then_some(d)
}

fn ready(test: &str, families: &[&str]) -> Option<(Sdks, PathBuf)> {
    let Some(dir) = model_dir() else {
        eprintln!("SKIPPED {test}: no built-in model in .tools/embed-model; run scripts/setup.sh");
        return None;
    };
    match Sdks::find() {
        Ok(s) if families.iter().all(|f| s.has(f)) => Some((s, dir)),
        Ok(s) => {
            eprintln!("SKIPPED {test}: SDKs missing ({})", s.have);
            None
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}; run scripts/setup.sh");
            None
        }
    }
}

fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn config(model_dir: &std::path::Path) -> String {
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
metadata: {{name: app-a}}
spec:
  developerEmail: a@example.com
  products: [llm]
  keys: [{{id: ka, hash: "sha256:{a}"}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {{name: app-b}}
spec:
  developerEmail: b@example.com
  products: [llm]
  keys: [{{id: kb, hash: "sha256:{b}"}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: key}}
spec:
  type: VerifyApiKey
  keyFrom: [{{preset: llm-sdks}}]
  stripKey: true
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: answers}}
spec:
  type: SemanticCache
  embedder: {{kind: static, modelDir: "{dir}"}}
  ttlSeconds: 600
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: llm}}
spec:
  match: {{pathPrefixes: [/v1, /v1beta]}}
  errorFormat: auto
  request: [{{policy: key}}, {{policy: answers}}]
"#,
        a = hash(KEY_A),
        b = hash(KEY_B),
        dir = model_dir.display()
    )
}

fn status(r: &serde_json::Value) -> &str {
    r["headers"]["x-tollgate-semantic-cache"]
        .as_str()
        .unwrap_or("")
}

async fn run(
    sdk: &Sdks,
    bed: &LlmBed,
    case: &str,
    key: &str,
    prompt: &str,
    reply: &str,
) -> serde_json::Value {
    let mut r = sdk
        .run_many_prompt(
            &[case],
            &bed.root(),
            key,
            &[("x-test-reply", reply)],
            Some(prompt),
        )
        .await;
    let r = r.pop().expect("one line");
    assert_eq!(r["ok"], true, "{case}: {r}\n{}", bed.logs());
    r
}

/// Waits for the after-exchange populate (spawned once the answer left) to land.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_paraphrased_questions_are_answered_once_per_app() {
    let Some((sdk, dir)) = ready("semantic_cache", &["openai"]) else {
        return;
    };
    within(LIMIT, async {
        for mode in ["FULL_DUPLEX_STREAMED", "BUFFERED"] {
            let bed = LlmBed::start("semantic", &config(&dir), mode).await;
            let q = "What is the capital of Australia?";
            let answer = "Canberra is the capital of Australia.";
            let first = run(&sdk, &bed, "openai.chat", KEY_A, q, answer).await;
            assert_eq!(first["text"], answer);
            assert_eq!(status(&first), "miss", "{mode}: {first}\n{}", bed.logs());
            settle().await;
            assert_eq!(bed.upstream.requests_to("/v1/").await.len(), 1);

            // The same question again, then streamed, then in other words: all from the
            // cache, the upstream still saw one request; the streamed hit reads as a stream.
            let again = run(&sdk, &bed, "openai.chat", KEY_A, q, "WRONG").await;
            assert_eq!(again["text"], answer, "{mode}: {again}");
            assert_eq!(status(&again), "hit; exact");
            let streamed = run(&sdk, &bed, "openai.chat.stream", KEY_A, q, "WRONG").await;
            assert_eq!(streamed["text"], answer, "{mode}: {streamed}");
            assert!(streamed["events"].as_u64().unwrap_or(0) >= 3, "{streamed}");
            let para = run(
                &sdk,
                &bed,
                "openai.chat.stream",
                KEY_A,
                "What's Australia's capital city?",
                "WRONG",
            )
            .await;
            assert_eq!(para["text"], answer, "{mode}: {para}");
            assert!(status(&para).starts_with("hit; similarity=0."), "{para}");
            assert_eq!(
                bed.upstream.requests_to("/v1/").await.len(),
                1,
                "{mode}: the upstream saw the question once"
            );

            // Another app, the very same words: not the first app's entry.
            let other = run(&sdk, &bed, "openai.chat", KEY_B, q, "Canberra (app b).").await;
            assert_eq!(other["text"], "Canberra (app b).", "{mode}: {other}");
            assert_eq!(status(&other), "miss");
            // A near-miss in app A (another country): not served Australia's answer.
            let near = run(
                &sdk,
                &bed,
                "openai.chat",
                KEY_A,
                "What is the capital of Austria?",
                "Vienna.",
            )
            .await;
            assert_eq!(near["text"], "Vienna.", "{mode}: {near}");
            assert_eq!(bed.upstream.requests_to("/v1/").await.len(), 3);

            // A failed answer is not stored: asked again, it goes upstream again.
            let fail_q = "Why is the sky blue?";
            let mut failed = sdk
                .run_many_prompt(
                    &["openai.chat"],
                    &bed.root(),
                    KEY_A,
                    &[("x-test-fault", "500")],
                    Some(fail_q),
                )
                .await;
            assert_eq!(failed.pop().expect("line")["ok"], false);
            settle().await;
            let ok = run(
                &sdk,
                &bed,
                "openai.chat",
                KEY_A,
                fail_q,
                "Rayleigh scattering.",
            )
            .await;
            assert_eq!(ok["text"], "Rayleigh scattering.");
            assert_eq!(status(&ok), "miss");

            let metrics = bed.tollgate.metrics().await;
            for needle in [
                r#"tollgate_semantic_cache_lookups_total{policy="answers",result="hit_exact"} 2"#,
                r#"tollgate_semantic_cache_lookups_total{policy="answers",result="hit_similar"} 1"#,
                r#"tollgate_semantic_cache_stored_total{policy="answers"} 4"#,
            ] {
                assert!(metrics.contains(needle), "{mode}: {needle} in\n{metrics}");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_sdk_reads_a_hit_as_a_normal_answer() {
    let Some((sdk, dir)) = ready(
        "semantic_cache every api",
        &["openai", "anthropic", "gemini"],
    ) else {
        return;
    };
    within(LIMIT, async {
        let bed = LlmBed::start("semantic-apis", &config(&dir), "FULL_DUPLEX_STREAMED").await;
        let cases = [
            ("openai.completions", "openai.completions.stream"),
            ("openai.responses", "openai.responses.stream"),
            ("openai.responses", "openai.responses.stream_helper"),
            ("anthropic.messages", "anthropic.messages.stream"),
            ("anthropic.messages", "anthropic.messages.stream_helper"),
            ("gemini.generate", "gemini.stream"),
        ];
        for (i, (plain, streamed)) in cases.iter().enumerate() {
            let q = format!("Explain how a hash map works, part {i}.");
            let answer = format!("A hash map stores pairs by the hash of their key ({i}).");
            let before = bed.upstream.requests().await.len();
            let first = run(&sdk, &bed, plain, KEY_A, &q, &answer).await;
            assert_eq!(first["text"], answer.as_str(), "{plain}: {first}");
            settle().await;
            let hit = run(&sdk, &bed, plain, KEY_A, &q, "WRONG").await;
            assert_eq!(
                hit["text"],
                answer.as_str(),
                "{plain} hit: {hit}\n{}",
                bed.logs()
            );
            let hit = run(&sdk, &bed, streamed, KEY_A, &q, "WRONG").await;
            assert_eq!(
                hit["text"],
                answer.as_str(),
                "{streamed} hit: {hit}\n{}",
                bed.logs()
            );
            assert_eq!(
                bed.upstream.requests().await.len(),
                before + 1,
                "{plain}/{streamed}: one request upstream"
            );
        }
    })
    .await;
}

/// Two replicas (each its own Envoy, tollgate and upstream) sharing entries through one
/// Redis: what one stored, the other serves without calling its upstream; another app still
/// misses on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_entries_through_redis() {
    let Some((sdk, dir)) = ready("semantic_cache replicas", &["openai"]) else {
        return;
    };
    within(LIMIT, async {
        let redis = support::redis::RedisServer::start();
        let shared = config(&dir).replace(
            "  ttlSeconds: 600\n",
            &format!(
                "  ttlSeconds: 600\n  shared: {{redis: \"{}\", timeoutMs: 200}}\n",
                redis.url()
            ),
        );
        let one = LlmBed::start("semantic-r1", &shared, "FULL_DUPLEX_STREAMED").await;
        let two = LlmBed::start("semantic-r2", &shared, "FULL_DUPLEX_STREAMED").await;
        let q = "How do I reset my password?";
        let answer = "Use the reset link on the sign-in page.";
        let first = run(&sdk, &one, "openai.chat", KEY_A, q, answer).await;
        assert_eq!(status(&first), "miss", "{first}");
        // Stored after the exchange on replica one, published, followed by replica two.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let hit = loop {
            let r = run(&sdk, &two, "openai.chat", KEY_A, q, "WRONG").await;
            if r["text"] == answer || std::time::Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(hit["text"], answer, "{hit}\n{}", two.logs());
        assert!(status(&hit).starts_with("hit"), "{hit}");
        // Replica two's upstream saw only the misses before the entry arrived, never after.
        let misses = two.upstream.requests_to("/v1/").await.len();
        let again = run(
            &sdk,
            &two,
            "openai.chat.stream",
            KEY_A,
            "I forgot my password, how can I reset it?",
            "WRONG",
        )
        .await;
        assert_eq!(again["text"], answer, "{again}");
        assert_eq!(two.upstream.requests_to("/v1/").await.len(), misses);
        let other = run(&sdk, &two, "openai.chat", KEY_B, q, "For app b.").await;
        assert_eq!(other["text"], "For app b.", "{other}");
    })
    .await;
}
