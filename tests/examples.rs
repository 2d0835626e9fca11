//! Every example configuration under `policies/` loads and behaves as its comments say.
//! A new example file without scenarios here fails `every_example_has_scenarios`.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, processing_response::Response, HttpHeaders, ProcessingRequest,
    ProcessingResponse,
};
use tollgate::config::read_dir;
use tollgate::config::reload::{ConfigManager, ConfigSource};
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
        "jwt.yaml" => Some(vec![
            Scenario {
                method: "GET",
                path: "/jwt/hello",
                headers: &[],
                expect: Expect::Immediate {
                    status: 401,
                    body_contains: "steps.jwt.FailedToResolveVariable",
                },
            },
            Scenario {
                method: "GET",
                path: "/jwt/hello",
                headers: &[("authorization", "Bearer @jwt-valid")],
                expect: Expect::Upstream(&[
                    ("x-tollgate-subject", "user-1"),
                    ("x-tollgate-tier", "gold"),
                ]),
            },
            Scenario {
                method: "GET",
                path: "/jwt/hello",
                headers: &[("authorization", "Bearer @jwt-expired")],
                expect: Expect::Immediate {
                    status: 401,
                    body_contains: "steps.jwt.TokenExpired",
                },
            },
            Scenario {
                method: "GET",
                path: "/jwt/hello",
                headers: &[("authorization", "Bearer @jwt-other-audience")],
                expect: Expect::Immediate {
                    status: 401,
                    body_contains: "steps.jwt.JwtAudienceMismatch",
                },
            },
        ]),
        "javascript.yaml" => Some(vec![
            Scenario {
                method: "GET",
                path: "/js/x",
                headers: &[("x-tier", "pro")],
                expect: Expect::Upstream(&[
                    ("x-tollgate-model", "large"),
                    ("x-tollgate-stamp", "GET /js/x -> large"),
                ]),
            },
            Scenario {
                method: "GET",
                path: "/js/x",
                headers: &[],
                expect: Expect::Upstream(&[("x-tollgate-model", "small")]),
            },
            Scenario {
                method: "GET",
                path: "/js/x",
                headers: &[("x-tier", "gold")],
                expect: Expect::Immediate {
                    status: 400,
                    body_contains: "custom.UnknownTier",
                },
            },
        ]),
        "service-callout.yaml" => Some(vec![
            Scenario {
                method: "GET",
                path: "/callout/a",
                headers: &[("x-user", "alice")],
                expect: Expect::Upstream(&[("x-tollgate-tier", "gold")]),
            },
            Scenario {
                method: "GET",
                path: "/callout/a",
                headers: &[("x-user", "mallory")],
                expect: Expect::Immediate {
                    status: 403,
                    body_contains: "authz.Denied",
                },
            },
            Scenario {
                method: "GET",
                path: "/callout/a",
                headers: &[("x-user", "slowpoke")],
                expect: Expect::Immediate {
                    status: 504,
                    body_contains: "steps.servicecallout.ExecutionFailed",
                },
            },
        ]),
        _ => None,
    }
}

/// The demo secret of `policies/jwt.yaml`; tokens are minted here, at test time.
const JWT_DEMO_SECRET: &str = "tollgate-demo-secret-rotate-me-0123456789";

/// Replaces `@jwt-*` placeholders in a header value with a freshly minted token.
fn expand(value: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({"iss": "https://issuer.example.com", "aud": "tollgate-demo",
        "sub": "user-1", "tier": "gold", "iat": now, "exp": now + 300});
    let token = |c: &serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            c,
            &jsonwebtoken::EncodingKey::from_secret(JWT_DEMO_SECRET.as_bytes()),
        )
        .unwrap()
    };
    if value.contains("@jwt-valid") {
        return value.replace("@jwt-valid", &token(&claims));
    }
    if value.contains("@jwt-expired") {
        claims["exp"] = (now - 3600).into();
        return value.replace("@jwt-expired", &token(&claims));
    }
    if value.contains("@jwt-other-audience") {
        claims["aud"] = "someone-else".into();
        return value.replace("@jwt-other-audience", &token(&claims));
    }
    value.to_owned()
}

/// The authorization service `policies/service-callout.yaml` calls, on a local port:
/// alice is allowed (tier gold), mallory refused, slowpoke never answered in time.
async fn start_authz() -> std::net::SocketAddr {
    use axum::extract::RawQuery;
    async fn check(RawQuery(q): RawQuery) -> axum::response::Response {
        use axum::response::IntoResponse;
        let q = q.unwrap_or_default();
        if q.contains("user=slowpoke") {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
        let allowed = q.contains("user=alice");
        (
            [("content-type", "application/json")],
            serde_json::json!({"allowed": allowed, "tier": if allowed { "gold" } else { "none" }})
                .to_string(),
        )
            .into_response()
    }
    let app = axum::Router::new().route("/check", axum::routing::get(check));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// An example file as the test loads it: the callout example calls the local service.
fn prepare(name: &str, text: &str, authz: std::net::SocketAddr) -> String {
    if name == "service-callout.yaml" {
        return text.replace("authz.example.internal:8080", &authz.to_string());
    }
    text.to_owned()
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
    headers.extend(extra.iter().map(|(k, v)| hv(k, &expand(v))));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_load_and_behave() {
    let files = read_dir(&policies_dir()).expect("policies/ readable");
    // The whole directory compiles together, as `tollgate serve --config policies` does.
    tollgate::config::load_dir(&policies_dir()).expect("policies/ is a valid configuration");
    let authz = start_authz().await;
    for f in files {
        let name = Path::new(&f.name)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // Each file on its own, in a directory of its own that also holds the files
        // examples refer to (subdirectories of policies/, e.g. scripts/).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(&name), prepare(&name, &f.text, authz)).unwrap();
        for entry in std::fs::read_dir(policies_dir()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name()))
                    .unwrap();
            }
        }
        let cm = ConfigManager::load(ConfigSource::Dir(dir.path().to_path_buf()))
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
