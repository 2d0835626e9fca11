//! Criterion micro-benchmarks of tollgate's own work per exchange, without gRPC: one
//! headers-only exchange (request headers + response headers) through the stream state
//! machine, for an empty flow and for a flow with three AssignMessage steps and a condition.
//!
//! `cargo bench --bench pipeline`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpHeaders, ProcessingRequest,
};
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::config::SourceFile;
use tollgate::expr::{Condition, Template};
use tollgate::server::stream::StreamState;
use tollgate::server::{NoMatch, Shared};
use tollgate::vars::{Exchange, Headers, RequestInfo};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: a1}
spec: {type: AssignMessage, set: {headers: {x-flow: "{flow.name}"}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: a2}
spec: {type: AssignMessage, set: {headers: {x-path: "{request.path}", x-client: "{client.ip}"}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: a3}
spec: {type: AssignMessage, remove: {headers: [x-debug]}, add: {headers: {x-req: "{request.header.x-request-id}"}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: three}
spec:
  match: {pathPrefixes: [/three]}
  request:
  - {policy: a1}
  - {policy: a2, condition: "request.method == 'POST' && request.headers['content-type'] == 'application/json'"}
  - {policy: a3}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: empty}
spec:
  match: {pathPrefixes: [/empty]}
"#;

fn headers(path: &str) -> ProcessingRequest {
    let h = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    h(":method", "POST"),
                    h(":path", path),
                    h(":authority", "api.example.com"),
                    h(":scheme", "https"),
                    h("content-type", "application/json"),
                    h("user-agent", "bench/1.0"),
                    h("x-request-id", "3f2c1b9e-1111-2222-3333-444455556666"),
                    h("x-forwarded-for", "10.0.0.1"),
                ],
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn response() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: ":status".into(),
                    value: String::new(),
                    raw_value: b"200".to_vec(),
                }],
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cm = ConfigManager::load(ConfigSource::Embedded(vec![SourceFile {
        name: "bench.yaml".into(),
        text: CONFIG.into(),
    }]))
    .expect("valid bench config");
    let shared = Shared::new(cm, NoMatch::Continue);
    for (name, path) in [
        ("exchange/empty_flow", "/empty/x"),
        ("exchange/three_assign_and_condition", "/three/x"),
    ] {
        let shared = Arc::clone(&shared);
        c.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut st = StreamState::new(shared.clone());
                    let mut out = Vec::with_capacity(2);
                    st.on_message(headers(path), &mut out).await.expect("ok");
                    st.on_message(response(), &mut out).await.expect("ok");
                    out
                })
            })
        });
    }

    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), "/v1/chat".into());
    h.push("content-type".into(), "application/json".into());
    let ex = Exchange {
        flow: "f".into(),
        request: RequestInfo::from_headers(h),
        ..Default::default()
    };
    let cond = Condition::compile(
        "request.method == 'POST' && request.headers['content-type'] == 'application/json'",
    )
    .expect("valid");
    c.bench_function("condition/cel_two_clauses", |b| b.iter(|| cond.eval(&ex)));
    for src in ["1 == 1", "flow.name == 'f'", "request.method == 'POST'"] {
        let c1 = Condition::compile(src).unwrap();
        c.bench_function(&format!("condition/{src}"), |b| b.iter(|| c1.eval(&ex)));
    }
    let t = Template::compile("{flow.name}:{request.path}:{request.header.content-type}")
        .expect("valid");
    c.bench_function("template/three_vars", |b| b.iter(|| t.render(&ex)));
}

criterion_group!(benches, bench);
criterion_main!(benches);
