//! Criterion benchmarks of the issue-5 policies:
//! - OasValidation of a typical chat-completion POST (path match, parameters, JSON parse and
//!   schema validation of the body) against the public OpenAI description, OpenAPI 3.1 and
//!   3.0 forms, read from `../shared/data/` (never copied into the repository);
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
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::config::SourceFile;
use tollgate::pipeline::{Direction, Outcome, Policy};
use tollgate::policies::{builder, BuildContext};
use tollgate::server::stream::StreamState;
use tollgate::server::{NoMatch, Shared};
use tollgate::vars::{Exchange, Headers, RequestInfo};

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

fn oas(file: &str) -> Arc<dyn Policy> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(file);
    let spec = format!("spec: {}\n", path.display());
    let build = builder("OasValidation").expect("registered");
    build(
        &BuildContext::default(),
        serde_norway::from_str(&spec).expect("yaml"),
    )
    .expect("the OpenAI description loads")
}

fn chat_exchange() -> Exchange {
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
        request_body: Some(CHAT.as_bytes().to_vec()),
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

fn bench(c: &mut Criterion) {
    for (name, file) in [
        ("oas/openai_3.1/chat_completion", "openai-openapi-3.1.yaml"),
        ("oas/openai_3.0/chat_completion", "openai-openapi-3.0.yaml"),
    ] {
        let p = oas(file);
        let template = chat_exchange();
        c.bench_function(name, |b| {
            b.iter_batched(
                || Exchange {
                    request: template.request.clone(),
                    request_body: template.request_body.clone(),
                    ..Default::default()
                },
                |mut ex| match p.run(&mut ex, Direction::Request) {
                    Outcome::Ready(r) => r.expect("the body is valid"),
                    Outcome::Pending(_) => unreachable!("OasValidation never waits"),
                },
                criterion::BatchSize::SmallInput,
            )
        });
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
