//! Every example configuration under `policies/` loads and behaves as its comments say.
//! A new example file without scenarios here fails `every_example_has_scenarios`.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, processing_response::Response, HttpHeaders, ProcessingRequest,
    ProcessingResponse,
};
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::config::{read_dir, SourceFile};
use tollgate::server::stream::StreamState;
use tollgate::server::{NoMatch, Shared};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// What one request should get: the headers sent upstream, or an immediate answer.
enum Expect {
    Upstream(&'static [(&'static str, &'static str)]),
    Immediate {
        status: i32,
        body_contains: &'static str,
    },
}

struct Scenario {
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    expect: Expect,
}

/// Scenarios per example file.
fn scenarios(file: &str) -> Option<Vec<Scenario>> {
    match file {
        "quickstart.yaml" => Some(vec![
            Scenario {
                method: "GET",
                path: "/anything",
                headers: &[("x-internal-debug", "1")],
                expect: Expect::Upstream(&[("x-tollgate-flow", "api")]),
            },
            Scenario {
                method: "GET",
                path: "/admin/users",
                headers: &[],
                expect: Expect::Immediate {
                    status: 403,
                    body_contains: r#""errorcode":"access.Forbidden""#,
                },
            },
            Scenario {
                method: "POST",
                path: "/v1/chat/completions",
                headers: &[],
                expect: Expect::Upstream(&[("x-tollgate-flow", "chat")]),
            },
            Scenario {
                method: "POST",
                path: "/v1/chat/completions",
                headers: &[("x-block", "yes")],
                expect: Expect::Immediate {
                    status: 403,
                    body_contains: r#""type":"permission_error""#,
                },
            },
        ]),
        "api-keys.yaml" => Some(vec![
            Scenario {
                method: "GET",
                path: "/v1/models",
                headers: &[],
                expect: Expect::Immediate {
                    status: 401,
                    body_contains: "oauth.v2.FailedToResolveAPIKey",
                },
            },
            Scenario {
                method: "GET",
                path: "/v1/models",
                headers: &[("x-api-key", "wrong")],
                expect: Expect::Immediate {
                    status: 401,
                    body_contains: r#""code":"oauth.v2.InvalidApiKey""#,
                },
            },
            Scenario {
                method: "GET",
                path: "/v1/models",
                headers: &[("x-api-key", "tg_demo_key_rotate_me_0001")],
                expect: Expect::Upstream(&[
                    ("x-tollgate-app", "demo-app"),
                    ("x-tollgate-client-id", "demo"),
                    ("x-tollgate-tier", "free"),
                ]),
            },
            Scenario {
                method: "GET",
                path: "/v1/models/gpt?apikey=tg_demo_key_rotate_me_0001",
                headers: &[],
                expect: Expect::Upstream(&[("x-tollgate-app", "demo-app")]),
            },
            Scenario {
                method: "DELETE",
                path: "/v1/models/m",
                headers: &[("x-api-key", "tg_demo_key_rotate_me_0001")],
                expect: Expect::Immediate {
                    status: 401,
                    body_contains: "oauth.v2.InvalidApiKeyForGivenResource",
                },
            },
        ]),
        // Scenarios run in order on one process: the counters carry over.
        "rate-limits.yaml" => {
            const KEY: &[(&str, &str)] = &[("x-api-key", "tg_limits_demo_key_0001")];
            Some(vec![
                Scenario {
                    method: "GET",
                    path: "/limited/a",
                    headers: KEY,
                    expect: Expect::Upstream(&[
                        ("x-tollgate-app", "limits-demo-app"),
                        ("x-quota-remaining", "1"),
                    ]),
                },
                Scenario {
                    method: "GET",
                    path: "/limited/a",
                    headers: KEY,
                    expect: Expect::Upstream(&[("x-quota-remaining", "0")]),
                },
                Scenario {
                    method: "GET",
                    path: "/limited/a",
                    headers: KEY,
                    expect: Expect::Immediate {
                        status: 429,
                        body_contains: "policies.ratelimit.QuotaViolation",
                    },
                },
                Scenario {
                    method: "GET",
                    path: "/limited/a",
                    headers: &[],
                    expect: Expect::Immediate {
                        status: 401,
                        body_contains: "oauth.v2.FailedToResolveAPIKey",
                    },
                },
                Scenario {
                    method: "GET",
                    path: "/weighted",
                    headers: &[("x-user", "u1"), ("x-weight", "4")],
                    expect: Expect::Upstream(&[("x-quota-remaining", "1")]),
                },
                Scenario {
                    method: "GET",
                    path: "/weighted",
                    headers: &[("x-user", "u1"), ("x-weight", "2")],
                    expect: Expect::Immediate {
                        status: 429,
                        body_contains: "Identifier : u1",
                    },
                },
                Scenario {
                    method: "GET",
                    path: "/weighted",
                    headers: &[("x-user", "u2"), ("x-weight", "2")],
                    expect: Expect::Upstream(&[("x-quota-remaining", "3")]),
                },
                Scenario {
                    method: "GET",
                    path: "/weighted",
                    headers: &[("x-user", "u1"), ("x-weight", "abc")],
                    expect: Expect::Immediate {
                        status: 500,
                        body_contains: "policies.ratelimit.InvalidMessageWeight",
                    },
                },
            ])
        }
        _ => None,
    }
}

fn headers_msg(method: &str, path: &str, extra: &[(&str, &str)]) -> ProcessingRequest {
    let hv = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    let mut headers = vec![
        hv(":method", method),
        hv(":path", path),
        hv(":authority", "localhost:10000"),
        hv(":scheme", "http"),
    ];
    headers.extend(extra.iter().map(|(k, v)| hv(k, v)));
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn run(shared: &std::sync::Arc<Shared>, s: &Scenario) -> ProcessingResponse {
    let mut st = StreamState::new(shared.clone());
    let mut out = Vec::new();
    st.on_message(headers_msg(s.method, s.path, s.headers), &mut out)
        .await
        .expect("no protocol error");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

#[tokio::test]
async fn every_example_has_scenarios() {
    let files = read_dir(&policies_dir()).expect("policies/ readable");
    assert!(!files.is_empty());
    for f in &files {
        let name = Path::new(&f.name)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            scenarios(&name).is_some(),
            "policies/{name} has no scenarios in tests/examples.rs"
        );
    }
}

#[tokio::test]
async fn examples_load_and_behave() {
    let files = read_dir(&policies_dir()).expect("policies/ readable");
    // The whole directory compiles together, as `tollgate serve --config policies` does.
    tollgate::config::load_dir(&policies_dir()).expect("policies/ is a valid configuration");
    for f in files {
        let name = Path::new(&f.name)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let cm = ConfigManager::load(ConfigSource::Embedded(vec![SourceFile {
            name: f.name.clone(),
            text: f.text.clone(),
        }]))
        .unwrap_or_else(|e| panic!("policies/{name} does not load on its own:\n{e}"));
        let shared = Shared::new(cm, NoMatch::Continue);
        for s in scenarios(&name).unwrap_or_default() {
            let r = run(&shared, &s).await;
            let what = format!("policies/{name}: {} {}", s.method, s.path);
            match (&s.expect, r.response.as_ref()) {
                (Expect::Upstream(want), Some(Response::RequestHeaders(h))) => {
                    let set: Vec<(String, String)> = h
                        .response
                        .as_ref()
                        .and_then(|c| c.header_mutation.as_ref())
                        .map(|m| {
                            m.set_headers
                                .iter()
                                .filter_map(|o| o.header.as_ref())
                                .map(|h| {
                                    (
                                        h.key.clone(),
                                        String::from_utf8_lossy(&h.raw_value).into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    for (k, v) in *want {
                        assert!(
                            set.iter().any(|(sk, sv)| sk == k && sv == v),
                            "{what}: expected {k}: {v} upstream, got {set:?}"
                        );
                    }
                }
                (
                    Expect::Immediate {
                        status,
                        body_contains,
                    },
                    Some(Response::ImmediateResponse(i)),
                ) => {
                    assert_eq!(i.status.as_ref().map(|s| s.code), Some(*status), "{what}");
                    let body = String::from_utf8_lossy(&i.body);
                    assert!(body.contains(body_contains), "{what}: body {body}");
                }
                (_, other) => panic!("{what}: unexpected answer {other:?}"),
            }
        }
    }
}

#[test]
fn bench_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs");
    tollgate::config::load_dir(&dir).expect("benches/configs is a valid configuration");
}
