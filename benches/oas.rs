//! Criterion benchmarks of the issue-5 policies:
//! - OasValidation of a typical chat-completion POST (path match, parameters, JSON parse and
//!   schema validation of the body) against the public OpenAI description, OpenAPI 3.1 and
//!   3.0 forms, read from `../shared/data/` (never copied into the repository): a short
//!   (~600 B) and a 4 KB body (tools, tool calls, content parts);
//! - `jsonschema` alone on the 4 KB body against `CreateChatCompletionRequest`: one validator
//!   built once and reused (what OasValidation does) against one built per request;
//! - a ResponseCache hit through the stream state machine (request headers answered from
//!   the cache) beside the empty flow's exchange (request + response headers).
//!
//! `cargo bench --bench oas`

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpHeaders, ProcessingRequest,
};
use jsonschema::{Draft, Registry};
use serde_json::json;
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::config::SourceFile;
use tollgate::pipeline::{Direction, Hook, Policy};
use tollgate::policies::{builder, BuildContext};
use tollgate::server::stream::StreamState;
use tollgate::server::{NoMatch, Shared};
use tollgate::vars::{Exchange, Headers, RequestInfo};

// As in the `tollgate` binary.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CHAT: &str = r#"{
  "model": "gpt-4o-mini",
  "messages": [
    {"role": "system", "content": "You are a helpful assistant that answers briefly."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}
  ],
  "temperature": 0.2,
  "top_p": 1,
  "max_tokens": 64,
  "n": 1,
  "stream": true,
  "stream_options": {"include_usage": true},
  "user": "bench-user-42"
}"#;

/// A 4 KB chat completion: a conversation with a tool call and its result, two tools with
/// JSON-schema parameters, JSON output, streaming with usage.
fn chat_4k() -> String {
    let filler = "The quarterly revenue grew in every region except the north-east, where a \
                  supplier delay pushed two large orders into the next quarter. ";
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a careful financial analyst. Answer with short, sourced bullet points and call tools when figures are needed."},
            {"role": "user", "content": [{"type": "text", "text": format!("Here is the summary of the report: {}", filler.repeat(9))}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_revenue", "arguments": "{\"region\":\"north-east\",\"quarter\":\"2026-Q3\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"region\":\"north-east\",\"quarter\":\"2026-Q3\",\"revenue\":1234567.89,\"currency\":\"EUR\"}"},
            {"role": "assistant", "content": format!("North-east revenue for 2026-Q3 was EUR 1.23 M. {}", filler.repeat(3))},
            {"role": "user", "content": "List the three main risks and suggest next steps for each, in JSON."}
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_revenue", "description": "Revenue of one region in one quarter.",
                "parameters": {"type": "object", "properties": {
                    "region": {"type": "string", "enum": ["north-east", "north-west", "south"]},
                    "quarter": {"type": "string", "pattern": "^[0-9]{4}-Q[1-4]$"}},
                    "required": ["region", "quarter"], "additionalProperties": false}, "strict": true}},
            {"type": "function", "function": {"name": "get_orders", "description": "Open orders of one customer.",
                "parameters": {"type": "object", "properties": {"customer": {"type": "string"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100}}, "required": ["customer"]}}}
        ],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "temperature": 0.2, "top_p": 1, "max_completion_tokens": 800, "n": 1,
        "presence_penalty": 0, "frequency_penalty": 0.1, "seed": 42,
        "stream": true, "stream_options": {"include_usage": true},
        "metadata": {"team": "finance", "ticket": "FIN-1234"},
        "user": "bench-user-42"
    });
    let text = serde_json::to_string_pretty(&body).expect("serialises");
    assert!(
        (3900..4400).contains(&text.len()),
        "about 4 KB: {}",
        text.len()
    );
    text
}

/// `$TOLLGATE_SHARED_DATA/<file>`, else `../shared/data/<file>` beside the checkout.
fn spec_path(file: &str) -> PathBuf {
    std::env::var_os("TOLLGATE_SHARED_DATA")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
        .join(file)
}

fn oas(file: &str) -> Arc<dyn Policy> {
    let spec = format!("spec: {}\n", spec_path(file).display());
    let build = builder("OasValidation").expect("registered");
    build(
        &BuildContext::default(),
        serde_norway::from_str(&spec).expect("yaml"),
    )
    .expect("the OpenAI description loads")
}

fn chat_exchange(body: &str) -> Exchange {
    let mut h = Headers::new();
    for (k, v) in [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "api.example.com"),
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-bench"),
        ("user-agent", "bench/1.0"),
    ] {
        h.push(k.into(), v.into());
    }
    Exchange {
        request: RequestInfo::from_headers(h),
        request_body: Some(body.as_bytes().to_vec()),
        ..Default::default()
    }
}

const CACHE_CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec: {type: ResponseCache, ttlSeconds: 3600}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: cache}
spec:
  match: {pathPrefixes: [/cache]}
  request: [{policy: cache}]
  response: [{policy: cache}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: empty}
spec:
  match: {pathPrefixes: [/empty]}
"#;

fn msg(request: Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..Default::default()
    }
}

fn hv(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    }
}

fn get(path: &str) -> ProcessingRequest {
    msg(Request::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![
                hv(":method", "GET"),
                hv(":path", path),
                hv(":authority", "api.example.com"),
                hv(":scheme", "https"),
                hv("user-agent", "bench/1.0"),
            ],
        }),
        end_of_stream: true,
        ..Default::default()
    }))
}

fn response() -> ProcessingRequest {
    msg(Request::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![hv(":status", "200"), hv("content-type", "application/json")],
        }),
        end_of_stream: true,
        ..Default::default()
    }))
}

/// `jsonschema` alone: the 3.1 description as one resource, a validator for the chat request
/// schema built once and reused, against one built for every body (the registry, which
/// indexes the whole description, is prepared once in both).
fn bench_validator_reuse(c: &mut Criterion, body: &str) {
    let doc = tollgate::openapi::read_document(&spec_path("openai-openapi-3.1.yaml"))
        .expect("the OpenAI description reads");
    let uri = "urn:openai-spec";
    let registry = Registry::new()
        .draft(Draft::Draft202012)
        .extend([(uri, Draft::Draft202012.create_resource(doc))])
        .and_then(|b| b.prepare())
        .expect("registry");
    let target = json!({"$ref": format!("{uri}#/components/schemas/CreateChatCompletionRequest")});
    let build = || {
        jsonschema::options()
            .with_draft(Draft::Draft202012)
            .with_registry(&registry)
            .should_validate_formats(true)
            .build(&target)
            .expect("compiles")
    };
    let instance: serde_json::Value = serde_json::from_str(body).expect("json");
    let reused = build();
    assert!(
        reused.is_valid(&instance),
        "the 4 KB body is a valid chat request"
    );
    c.bench_function("jsonschema/chat_4k/validator_reused", |b| {
        b.iter(|| assert!(reused.is_valid(&instance)))
    });
    c.bench_function("jsonschema/chat_4k/validator_rebuilt", |b| {
        b.iter(|| assert!(build().is_valid(&instance)))
    });
}

fn bench(c: &mut Criterion) {
    let big = chat_4k();
    for (name, file, body) in [
        (
            "oas/openai_3.1/chat_completion",
            "openai-openapi-3.1.yaml",
            CHAT,
        ),
        (
            "oas/openai_3.0/chat_completion",
            "openai-openapi-3.0.yaml",
            CHAT,
        ),
        (
            "oas/openai_3.1/chat_completion_4k",
            "openai-openapi-3.1.yaml",
            big.as_str(),
        ),
        (
            "oas/openai_3.0/chat_completion_4k",
            "openai-openapi-3.0.yaml",
            big.as_str(),
        ),
    ] {
        if !spec_path(file).is_file() {
            eprintln!(
                "skipping {name}: {} is missing (the public OpenAI description, read from \
                 ../shared/data/ or $TOLLGATE_SHARED_DATA)",
                spec_path(file).display()
            );
            continue;
        }
        let p = oas(file);
        let template = chat_exchange(body);
        c.bench_function(name, |b| {
            b.iter_batched(
                || Exchange {
                    request: template.request.clone(),
                    request_body: template.request_body.clone(),
                    ..Default::default()
                },
                |mut ex| match p.run(&mut ex, Direction::Request) {
                    Hook::Ready(o) => o
                        .into_result()
                        .map(|a| assert!(a.is_none(), "unexpected answer"))
                        .expect("the body is valid"),
                    Hook::Pending(_) => unreachable!("OasValidation never waits"),
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }

    if spec_path("openai-openapi-3.1.yaml").is_file() {
        bench_validator_reuse(c, &big);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let cm = ConfigManager::load(ConfigSource::Embedded(vec![SourceFile {
        name: "bench.yaml".into(),
        text: CACHE_CONFIG.into(),
    }]))
    .expect("valid bench config");
    let shared = Shared::new(cm, NoMatch::Continue);
    // Populate the cache once (a miss whose response headers end the exchange).
    rt.block_on(async {
        let mut st = StreamState::new(shared.clone());
        let mut out = Vec::new();
        st.on_message(get("/cache/models"), &mut out)
            .await
            .expect("ok");
        st.on_message(response(), &mut out).await.expect("ok");
    });
    c.bench_function("exchange/response_cache_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut st = StreamState::new(shared.clone());
                let mut out = Vec::with_capacity(1);
                st.on_message(get("/cache/models"), &mut out)
                    .await
                    .expect("ok");
                assert!(out.len() == 1);
                out
            })
        })
    });
    c.bench_function("exchange/empty_flow_get", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut st = StreamState::new(shared.clone());
                let mut out = Vec::with_capacity(2);
                st.on_message(get("/empty/models"), &mut out)
                    .await
                    .expect("ok");
                st.on_message(response(), &mut out).await.expect("ok");
                out
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
