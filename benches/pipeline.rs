//! Criterion micro-benchmarks of tollgate's own work per exchange, without gRPC: one
//! headers-only exchange (request headers + response headers) through the stream state
//! machine, on the flows of `benches/configs/bench.yaml` that `benches/grpc-compare.sh`
//! drives (empty, three AssignMessage steps with a condition, VerifyApiKey with and without
//! its header work, the limits flows, one JavaScript step); and single policy runs: one
//! JavaScript step, one VerifyJwt (RS256) of a token it has verified before (the
//! verified-token cache hit, the common case).
//!
//! `cargo bench --bench pipeline`
//!
//! With `--exchanges N PATH` it instead runs N exchanges on PATH and exits, for
//! instruction counts: `valgrind --tool=callgrind target/release/deps/pipeline-* --exchanges
//! 20000 /verify/x`.

use std::sync::Arc;

use criterion::{criterion_group, Criterion};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpHeaders, ProcessingRequest,
};
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::expr::{Condition, Template};
use tollgate::server::stream::StreamState;
use tollgate::server::{NoMatch, Shared};
use tollgate::vars::{Exchange, Headers, RequestInfo};

// As in the `tollgate` binary.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
                    h("x-api-key", "tg_bench_key_0000000000000000"),
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

fn shared() -> Arc<Shared> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs");
    let cm = ConfigManager::load(ConfigSource::Dir(dir)).expect("valid bench config");
    Shared::new(cm, NoMatch::Continue)
}

/// One headers-only exchange; panics if the flow answered the client itself.
async fn exchange(shared: &Arc<Shared>, path: &str) -> usize {
    let mut st = StreamState::new(shared.clone());
    let mut out = Vec::with_capacity(2);
    st.on_message(headers(path), &mut out).await.expect("ok");
    st.on_message(response(), &mut out).await.expect("ok");
    assert_eq!(
        out.len(),
        2,
        "an exchange on {path} was answered immediately"
    );
    out.len()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let shared = shared();
    for (name, path) in [
        ("exchange/empty_flow", "/empty/x"),
        ("exchange/three_assign_and_condition", "/three/x"),
        ("exchange/verify_api_key", "/verify/v1/chat/completions"),
        (
            "exchange/verify_api_key_bare",
            "/verify-bare/v1/chat/completions",
        ),
        ("exchange/limits", "/limits/v1/chat/completions"),
        ("exchange/limits_full", "/limits-full/v1/chat/completions"),
        ("exchange/javascript_set_header", "/js/x"),
    ] {
        c.bench_function(name, |b| b.iter(|| rt.block_on(exchange(&shared, path))));
    }
    policy_runs(c);

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

/// One step of a policy on a ready exchange, without the stream machinery.
fn policy_runs(c: &mut Criterion) {
    use tollgate::pipeline::{Direction, Hook, Policy};
    use tollgate::policies::{builder, BuildContext};
    let build = |ty: &str, yaml: &str| -> Arc<dyn Policy> {
        builder(ty).expect("policy type")(
            &BuildContext {
                name: "p".into(),
                ..Default::default()
            },
            serde_norway::from_str(yaml).expect("yaml"),
        )
        .expect("valid policy")
    };
    let run = |p: &Arc<dyn Policy>, ex: &mut Exchange| match p.run(ex, Direction::Request) {
        Hook::Ready(o) => o
            .into_result()
            .map(|a| assert!(a.is_none(), "unexpected answer"))
            .expect("step passes"),
        Hook::Pending(_) => panic!("a benchmarked step must answer at once"),
    };
    let fresh = |auth: &str| {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), "/v1/chat".into());
        h.push("authorization".into(), auth.to_owned());
        Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    };

    let js = build(
        "JavaScript",
        r#"{source: "request.setHeader('x-js', 'yes');"}"#,
    );
    c.bench_function("policy/javascript_set_header", |b| {
        b.iter(|| {
            let mut ex = fresh("");
            run(&js, &mut ex);
            ex
        })
    });
    let js_vars = build(
        "JavaScript",
        r#"{source: "var t = context.getVariable('request.header.authorization'); context.setVariable('seen', t); request.setHeader('x-t', String(t.length));"}"#,
    );
    c.bench_function("policy/javascript_get_set_variable_and_header", |b| {
        b.iter(|| {
            let mut ex = fresh("Bearer x");
            run(&js_vars, &mut ex);
            ex
        })
    });

    use base64::Engine as _;
    use rsa::pkcs8::EncodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa key");
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({"kty": "RSA", "kid": "k", "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be())});
    let jwt = build(
        "VerifyJwt",
        &format!("{{algorithms: [RS256], keys: {{jwks: {{keys: [{jwk}]}}}}, issuer: iss, audience: aud}}"),
    );
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k".into());
    let now = jsonwebtoken::get_current_timestamp();
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": "iss", "aud": "aud", "sub": "s", "iat": now, "exp": now + 86_400}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(
            key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).expect("pem").as_bytes(),
        )
        .expect("key"),
    )
    .expect("token");
    let auth = format!("Bearer {token}");
    c.bench_function("policy/verify_jwt_rs256_cached_token", |b| {
        b.iter(|| {
            let mut ex = fresh(&auth);
            run(&jwt, &mut ex);
            ex
        })
    });
    // Twice as many distinct tokens as the verified-token cache holds, cycled: every run
    // parses the token and checks its RS256 signature.
    let signer = jsonwebtoken::EncodingKey::from_rsa_pem(
        key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .expect("pem")
            .as_bytes(),
    )
    .expect("key");
    let fresh_auths: Vec<String> = (0..8192)
        .map(|i| {
            let claims = serde_json::json!({"iss": "iss", "aud": "aud", "sub": format!("s{i}"),
                "iat": now, "exp": now + 86_400});
            format!(
                "Bearer {}",
                jsonwebtoken::encode(&header, &claims, &signer).expect("token")
            )
        })
        .collect();
    let mut next = 0usize;
    c.bench_function("policy/verify_jwt_rs256_fresh_token", |b| {
        b.iter(|| {
            next = (next + 1) % fresh_auths.len();
            let mut ex = fresh(&fresh_auths[next]);
            run(&jwt, &mut ex);
            ex
        })
    });
}

criterion_group!(benches, bench);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--exchanges") {
        let n: usize = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("--exchanges N PATH");
        let path = args.get(i + 2).expect("--exchanges N PATH");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let shared = shared();
        for _ in 0..n {
            rt.block_on(exchange(&shared, path));
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
