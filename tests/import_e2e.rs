//! A converted Apigee bundle served by tollgate behind a real Envoy 1.40: the GKE
//! extension-processor shape (`tests/data/apigee-bundles/gke-extension`: a targetless proxy
//! with VerifyAPIKey, a Quota of 3, OAS validation and AssignMessage's Google access token)
//! imported with `tollgate::import`, plus an API product and an app, answers as the
//! bundle's policies define: a missing key 401 with Apigee's fault body, a good key 200 with
//! the upstream seeing `Authorization: Bearer <token>` minted by a local metadata server, a
//! body the spec refuses 400, and the fourth admitted call 429 `QuotaViolation`.
//! Run with `cargo test --test import_e2e`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sha2::Digest;
use support::{within, Envoy, EnvoyOptions, HttpClient, Tollgate, Upstream};

const LIMIT: Duration = Duration::from_secs(90);
const KEY: &str = "import-e2e-key-0001";
const TOKEN: &str = "ya29.import-e2e";

/// The consumers the bundle's VerifyAPIKey checks against (Apigee keeps them outside
/// bundles, so the import does not write them).
fn consumers() -> String {
    consumers_for("/v1/**")
}

/// [`consumers`] with the product's one operation on `path`.
fn consumers_for(path: &str) -> String {
    let hash = hex(&sha2::Sha256::digest(KEY.as_bytes()));
    format!(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {{name: inference}}
spec:
  operations:
  - {{path: "{path}", methods: [GET, POST]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {{name: import-app}}
spec:
  developerEmail: dev@example.com
  products: [inference]
  keys:
  - id: import-key
    hash: "sha256:{hash}"
"#
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Default)]
struct Metadata {
    calls: AtomicUsize,
    scopes: parking_lot::Mutex<String>,
}

/// The GCE metadata server's token endpoint, as Google runs it (refuses requests without
/// `Metadata-Flavor: Google`).
async fn token(State(m): State<Arc<Metadata>>, h: HeaderMap, uri: Uri) -> Response {
    if h.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header",
        )
            .into_response();
    }
    m.calls.fetch_add(1, Ordering::SeqCst);
    let q = uri.query().unwrap_or_default();
    *m.scopes.lock() = q.to_owned();
    (
        [
            ("content-type", "application/json"),
            ("metadata-flavor", "Google"),
        ],
        json!({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}).to_string(),
    )
        .into_response()
}

async fn metadata_server() -> (SocketAddr, Arc<Metadata>) {
    let m = Arc::new(Metadata::default());
    let app = Router::new()
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/token",
            get(token),
        )
        .with_state(m.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gke_extension_bundle_answers_as_its_policies_define() {
    within(LIMIT, async {
        let (md, meta) = metadata_server().await;
        let tmp = tempfile::tempdir().expect("temp dir");
        let config = tmp.path().join("config");
        let bundle = support::repo_root().join("tests/data/apigee-bundles/gke-extension");
        let imported = tollgate::import::convert(&bundle).expect("import");
        assert_eq!(
            imported.report.counts.not_convertible,
            0,
            "{}",
            imported.report.text()
        );
        tollgate::import::write(&imported, &config).expect("write");
        std::fs::write(config.join("consumers.yaml"), consumers()).expect("consumers");

        let upstream = Upstream::start();
        let md_host = md.to_string();
        let tollgate = Tollgate::start_with_env(
            &config,
            tmp.path(),
            &[],
            &[("GCE_METADATA_HOST", md_host.as_str())],
        )
        .await;
        let envoy = Envoy::start(
            tmp.path(),
            &EnvoyOptions::default(),
            tollgate.grpc,
            upstream.addr,
        )
        .await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{p}", envoy.listen);

        // No key: 401 with Apigee's fault body; nothing reaches the upstream.
        let r = client.get(&url("/v1/health"), &[]).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({"fault": {"faultstring": "Failed to resolve API Key variable",
                             "detail": {"errorcode": "oauth.v2.FailedToResolveAPIKey"}}})
        );
        // An unknown key: 401 InvalidApiKey.
        let r = client
            .get(&url("/v1/health"), &[("x-api-key", "not-a-key")])
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "oauth.v2.InvalidApiKey"
        );
        assert!(
            upstream.seen().is_empty(),
            "refused calls reached the upstream"
        );

        // A good key (quota 1 of 3): the upstream sees the Google token the bundle's
        // AssignMessage injects, and the key itself (Apigee leaves it in the request).
        let r = client.get(&url("/v1/health"), &[("x-api-key", KEY)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("authorization").as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(r.echoed_header("x-api-key").as_deref(), Some(KEY));
        assert!(meta.calls.load(Ordering::SeqCst) >= 1);
        assert!(
            meta.scopes.lock().contains("cloud-platform"),
            "the token was asked for the bundle's scope: {}",
            meta.scopes.lock()
        );
        // A client's own Authorization never reaches the upstream: the step owns it.
        // (quota 2 of 3) A body the OpenAPI description refuses: 400 from OASValidation.
        let r = client
            .send(
                "POST",
                &url("/v1/models/gemini-pro:generateContent"),
                &[
                    ("x-api-key", KEY),
                    ("content-type", "application/json"),
                    ("authorization", "Bearer client-forged"),
                ],
                r#"{"prompt":"no contents"}"#,
            )
            .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "policies.oasvalidation.Failed"
        );
        // (quota 3 of 3) A valid body goes through, token injected over the client's.
        let r = client
            .send(
                "POST",
                &url("/v1/models/gemini-pro:generateContent"),
                &[
                    ("x-api-key", KEY),
                    ("content-type", "application/json"),
                    ("authorization", "Bearer client-forged"),
                ],
                r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("authorization").as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        // The fourth: 429 with Apigee's quota fault.
        let r = client.get(&url("/v1/health"), &[("x-api-key", KEY)]).await;
        assert_eq!(r.status, 429, "{}", r.text());
        let body = r.json();
        assert_eq!(
            body["fault"]["detail"]["errorcode"],
            "policies.ratelimit.QuotaViolation"
        );
        assert!(
            body["fault"]["faultstring"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Rate limit quota violation. Quota limit  exceeded. Identifier : "),
            "{body}"
        );
        assert_eq!(
            upstream.seen().len(),
            2,
            "only the two admitted calls went upstream"
        );
        drop(envoy);
        drop(tollgate);
    })
    .await;
}

/// Three more converted bundles in one configuration, behind Envoy: Apigee's first-match
/// conditional flows with MatchesPath and JavaRegex below a base path (and the catch-all
/// flow's RaiseFault 404 with the bundle's payload), a RaiseFault on a header condition (403,
/// its payload and header), and AssignMessage on both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_flows_raise_fault_and_assign_message_bundles() {
    within(LIMIT, async {
        let tmp = tempfile::tempdir().expect("temp dir");
        let config = tmp.path().join("config");
        for b in ["conditional-flows", "raise-fault", "assign-headers"] {
            let bundle = support::repo_root()
                .join("tests/data/apigee-bundles")
                .join(b);
            let imported = tollgate::import::convert(&bundle).expect("import");
            assert_eq!(
                imported.report.counts.not_convertible,
                0,
                "{}",
                imported.report.text()
            );
            tollgate::import::write(&imported, &config).expect("write");
        }
        let upstream = Upstream::start();
        let tollgate = Tollgate::start(&config, tmp.path(), &[]).await;
        let envoy = Envoy::start(
            tmp.path(),
            &EnvoyOptions::default(),
            tollgate.grpc,
            upstream.addr,
        )
        .await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{p}", envoy.listen);

        // conditional-flows: the first flow that matches runs, and only it.
        let r = client.get(&url("/v1/shop/orders"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-operation").as_deref(), Some("list"));
        let r = client.get(&url("/v1/shop/orders/42"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-operation").as_deref(), Some("get"));
        // The flow is chosen once, as in Apigee: its first step removes the header its
        // condition reads, and its second step still runs (and no later flow does).
        let r = client
            .get(&url("/v1/shop/orders"), &[("x-tag", "yes")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-operation").as_deref(), Some("tagged"));
        assert_eq!(r.echoed_header("x-tag"), None);
        // A verb no flow takes falls to the catch-all flow: the bundle's 404 and payload.
        for (method, path) in [
            ("POST", "/v1/shop/orders"),
            ("GET", "/v1/shop/orders/x1"),
            ("GET", "/v1/shop/carts"),
        ] {
            let r = client.send(method, &url(path), &[], "").await;
            assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
            assert_eq!(r.json(), json!({"error": "no such resource"}));
            assert_eq!(r.header("content-type"), Some("application/json"));
        }

        // raise-fault: only the condition's requests are refused, with the bundle's answer.
        let r = client
            .get(&url("/guarded/a"), &[("x-client", "banned")])
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json(), json!({"error": "blocked", "path": "/guarded/a"}));
        assert_eq!(r.header("x-blocked-by"), Some("gateway"));
        let r = client
            .get(&url("/guarded/a"), &[("x-client", "partner")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());

        // assign-headers: request headers removed / set / added, a variable on the way back.
        let r = client
            .get(
                &url("/assign/x"),
                &[("x-debug", "1"), ("x-request-path", "forged")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-debug"), None);
        assert_eq!(
            r.echoed_header("x-request-path").as_deref(),
            Some("/assign/x")
        );
        assert_eq!(r.echoed_header("x-via").as_deref(), Some("tollgate"));
        assert_eq!(r.header("x-tier"), Some("gold"));
        drop(envoy);
        drop(tollgate);
    })
    .await;
}

/// The fault-rules bundle converted: its FaultRule (on `fault.name = "InvalidApiKey"`) and
/// its DefaultFaultRule (AlwaysEnforce) shape the key refusals with the bundle's payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rules_bundle_shapes_the_refusals() {
    within(LIMIT, async {
        let tmp = tempfile::tempdir().expect("temp dir");
        let config = tmp.path().join("config");
        let bundle = support::repo_root().join("tests/data/apigee-bundles/fault-rules");
        let imported = tollgate::import::convert(&bundle).expect("import");
        assert_eq!(
            imported.report.counts.not_convertible,
            0,
            "{}",
            imported.report.text()
        );
        tollgate::import::write(&imported, &config).expect("write");
        std::fs::write(config.join("consumers.yaml"), consumers_for("/faulty/**"))
            .expect("consumers");
        let upstream = Upstream::start();
        let tollgate = Tollgate::start(&config, tmp.path(), &[]).await;
        let envoy = Envoy::start(
            tmp.path(),
            &EnvoyOptions::default(),
            tollgate.grpc,
            upstream.addr,
        )
        .await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{p}", envoy.listen);
        for key in [None, Some("not-a-key")] {
            let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            let r = client.get(&url("/faulty/a"), &headers).await;
            assert_eq!(r.status, 401, "{key:?}: {}", r.text());
            assert_eq!(r.json(), json!({"error": "invalid key"}), "{key:?}");
        }
        let r = client.get(&url("/faulty/a"), &[("x-api-key", KEY)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(upstream.seen().len(), 1);
        drop(envoy);
        drop(tollgate);
    })
    .await;
}

/// The edge-guard bundle converted (CORS, JSONThreatProtection, ExtractVariables and an
/// AssignMessage using what was extracted): a preflight is answered by tollgate itself, a
/// JSON body over a limit is refused with Apigee's fault, and variables extracted from the
/// path, a header and the JSON body reach the upstream as headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_guard_bundle_answers_preflights_refuses_threats_and_extracts() {
    within(LIMIT, async {
        let tmp = tempfile::tempdir().expect("temp dir");
        let config = tmp.path().join("config");
        let bundle = support::repo_root().join("tests/data/apigee-bundles/edge-guard");
        let imported = tollgate::import::convert(&bundle).expect("import");
        assert_eq!(
            imported.report.counts.not_convertible,
            0,
            "{}",
            imported.report.text()
        );
        tollgate::import::write(&imported, &config).expect("write");
        let upstream = Upstream::start();
        let tollgate = Tollgate::start(&config, tmp.path(), &[]).await;
        let envoy = Envoy::start(
            tmp.path(),
            &EnvoyOptions::default(),
            tollgate.grpc,
            upstream.addr,
        )
        .await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{p}", envoy.listen);
        const ORIGIN: &str = "https://app.example.test";

        // A preflight from an allowed origin: answered here with the bundle's CORS settings.
        let r = client
            .send(
                "OPTIONS",
                &url("/edge/orders/42"),
                &[
                    ("origin", ORIGIN),
                    ("access-control-request-method", "POST"),
                ],
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("origin, content-type, x-client-id")
        );
        assert_eq!(r.header("access-control-max-age"), Some("600"));
        // From an origin not listed: still answered, without CORS headers.
        let r = client
            .send(
                "OPTIONS",
                &url("/edge/orders/42"),
                &[
                    ("origin", "https://evil.example.test"),
                    ("access-control-request-method", "POST"),
                ],
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert!(upstream.seen().is_empty(), "preflights reached the upstream");

        // A string longer than StringValueLength (24): Apigee's JSONThreatProtection fault.
        let r = client
            .send(
                "POST",
                &url("/edge/orders/42"),
                &[("origin", ORIGIN), ("content-type", "application/json")],
                r#"{"customer":{"id":"c-9"},"note":"this note is far longer than twenty-four characters"}"#,
            )
            .await;
        assert_eq!(r.status, 500, "{}", r.text());
        let body = r.json();
        assert_eq!(
            body["fault"]["detail"]["errorcode"],
            "steps.jsonthreatprotection.ExecutionFailed",
            "{body}"
        );
        assert!(
            body["fault"]["faultstring"]
                .as_str()
                .unwrap_or_default()
                .starts_with("JSONThreatProtection[JTP-Body]: Execution failed. reason: "),
            "{body}"
        );
        // Five containers deep (ContainerDepth 4) is refused the same way.
        let r = client
            .send(
                "POST",
                &url("/edge/orders/42"),
                &[("content-type", "application/json")],
                r#"{"customer":{"id":"c-9"},"a":{"b":{"c":{"d":{"e":1}}}}}"#,
            )
            .await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "steps.jsonthreatprotection.ExecutionFailed"
        );
        assert!(upstream.seen().is_empty(), "refused bodies reached the upstream");

        // Within limits: the flow's ExtractVariables reads the path, the header (its pattern
        // ignores case) and the JSON body; AssignMessage sends them upstream; the response
        // carries the CORS headers.
        let r = client
            .send(
                "POST",
                &url("/edge/orders/42"),
                &[
                    ("origin", ORIGIN),
                    ("content-type", "application/json"),
                    ("x-client-id", "CLIENT-77"),
                ],
                r#"{"customer":{"id":"c-9"},"items":[1,2,3]}"#,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-order-id").as_deref(), Some("42"));
        assert_eq!(r.echoed_header("x-customer").as_deref(), Some("c-9"));
        assert_eq!(r.echoed_header("x-client-ref").as_deref(), Some("77"));
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(r.header("access-control-expose-headers"), Some("x-order-ref"));
        assert_eq!(upstream.seen().len(), 1);
        drop(envoy);
        drop(tollgate);
    })
    .await;
}
