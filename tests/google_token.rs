//! `AssignMessage.googleToken` against local servers speaking Google's real protocols: a
//! metadata server (refusing requests without `Metadata-Flavor: Google`) and an OAuth token
//! endpoint that verifies the service account's signed JWT-bearer assertion with the
//! public half of a key generated here.
// Faults are returned by value, as the library does (see its lib.rs).
#![allow(clippy::result_large_err)]

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::Uri;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use jsonwebtoken::{decode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
use serde_json::{json, Value};
use tollgate::fault::Fault;
use tollgate::pipeline::{Direction, Hook, Outcome, Policy};
use tollgate::policies::BuildContext;
use tollgate::services::Services;
use tollgate::vars::Exchange;

mod support;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An ID token as Google would issue it (signed by "Google", here any key).
fn id_token(aud: &str, life: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "https://accounts.google.com", "aud": aud, "exp": now() + life, "iat": now()}),
        &EncodingKey::from_secret(b"google-signs-its-own-tokens-here"),
    )
    .unwrap()
}

#[derive(Default)]
struct Google {
    token_calls: AtomicUsize,
    identity_calls: AtomicUsize,
    refused: AtomicUsize,
    /// Seconds of life of minted access tokens.
    life: Mutex<u64>,
    last_scopes: Mutex<String>,
    /// PEM of the service account's public key, for the token endpoint.
    sa_public: Mutex<Option<String>>,
    assertions: Mutex<Vec<Value>>,
    delay_ms: Mutex<u64>,
}

async fn md_token(State(g): State<Arc<Google>>, h: HeaderMap, uri: Uri) -> Response {
    let q = url_decode_form(uri.query().unwrap_or_default());
    if h.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        g.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header",
        )
            .into_response();
    }
    let n = g.token_calls.fetch_add(1, Ordering::SeqCst);
    let delay = *g.delay_ms.lock();
    tokio::time::sleep(Duration::from_millis(delay)).await;
    *g.last_scopes.lock() = q.get("scopes").cloned().unwrap_or_default();
    let life = *g.life.lock();
    (
        [
            ("metadata-flavor", "Google"),
            ("content-type", "application/json"),
        ],
        json!({"access_token": format!("ya29.md-{n}"), "expires_in": life, "token_type": "Bearer"})
            .to_string(),
    )
        .into_response()
}

async fn md_identity(State(g): State<Arc<Google>>, h: HeaderMap, uri: Uri) -> Response {
    let q = url_decode_form(uri.query().unwrap_or_default());
    if h.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        g.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header",
        )
            .into_response();
    }
    g.identity_calls.fetch_add(1, Ordering::SeqCst);
    let Some(aud) = q.get("audience") else {
        return (
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required",
        )
            .into_response();
    };
    ([("metadata-flavor", "Google")], id_token(aud, 3600)).into_response()
}

/// Google's OAuth token endpoint: `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`,
/// assertion RS256-signed by the service account, `aud` = this endpoint.
async fn oauth_token(State(g): State<Arc<Google>>, body: String) -> Response {
    g.token_calls.fetch_add(1, Ordering::SeqCst);
    let form: HashMap<String, String> = url_decode_form(&body);
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}).to_string(),
        )
            .into_response();
    }
    let Some(assertion) = form.get("assertion") else {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request"}).to_string(),
        )
            .into_response();
    };
    let pem = g.sa_public.lock().clone().unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[TOKEN_AUD.lock().clone()]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = match decode::<Value>(
        assertion,
        &DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        &v,
    ) {
        Ok(d) => d.claims,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": e.to_string()}).to_string(),
            )
                .into_response()
        }
    };
    g.assertions.lock().push(claims.clone());
    let answer = if let Some(aud) = claims.get("target_audience").and_then(Value::as_str) {
        json!({"id_token": id_token(aud, 3600)})
    } else {
        json!({"access_token": "ya29.sa-token", "expires_in": 3599, "token_type": "Bearer"})
    };
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

static TOKEN_AUD: Mutex<String> = Mutex::new(String::new());

fn url_decode_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                tollgate::vars::percent_decode(k).into_owned(),
                tollgate::vars::percent_decode(v).into_owned(),
            )
        })
        .collect()
}

async fn serve() -> (SocketAddr, Arc<Google>) {
    let g = Arc::new(Google {
        life: Mutex::new(3599),
        ..Default::default()
    });
    let app = Router::new()
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/token",
            get(md_token),
        )
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/identity",
            get(md_identity),
        )
        .route("/token", post(oauth_token))
        .with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, g)
}

fn assign(services: &Services, dir: Option<&std::path::Path>, yaml: &str) -> Arc<dyn Policy> {
    let ctx = BuildContext {
        name: "google".into(),
        config_dir: dir.map(|d| d.to_path_buf()),
        services: services.clone(),
    };
    support::policy::build("AssignMessage", &ctx, yaml).unwrap_or_else(|e| panic!("{e}"))
}

async fn run(p: &Arc<dyn Policy>) -> Result<Exchange, Fault> {
    let mut ex = Exchange::default();
    support::policy::run(p, &mut ex).await.map(|()| ex)
}

fn header(ex: &mut Exchange, name: &str) -> Option<String> {
    ex.take_mutations(Direction::Request)
        .set
        .into_iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, v, _)| v)
}

#[tokio::test]
async fn metadata_access_token_is_minted_once_for_concurrent_requests() {
    let (addr, g) = serve().await;
    *g.delay_ms.lock() = 200;
    let services = Services::default();
    let p = assign(
        &services,
        None,
        &format!("googleToken: {{accessToken: {{scopes: [https://www.googleapis.com/auth/cloud-platform, email]}}, metadataHost: '{addr}'}}"),
    );
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move { run(&p).await }));
    }
    for t in tasks {
        let mut ex = t.await.unwrap().unwrap();
        assert_eq!(
            header(&mut ex, "authorization").as_deref(),
            Some("Bearer ya29.md-0")
        );
    }
    assert_eq!(g.token_calls.load(Ordering::SeqCst), 1, "one fetch for all");
    assert_eq!(g.refused.load(Ordering::SeqCst), 0);
    assert_eq!(
        *g.last_scopes.lock(),
        "https://www.googleapis.com/auth/cloud-platform,email"
    );
    // Cached: answered without waiting.
    let mut ex = Exchange::default();
    assert!(matches!(
        p.run(&mut ex, Direction::Request),
        Hook::Ready(Outcome::Continue)
    ));
}

#[tokio::test]
async fn tokens_are_refreshed_before_expiry() {
    let (addr, g) = serve().await;
    // A token living 20 s is inside the 30 s safety margin at once: the next request does
    // not use it but fetches a new one.
    *g.life.lock() = 20;
    let services = Services::default();
    let p = assign(
        &services,
        None,
        &format!("googleToken: {{accessToken: {{scopes: [s1]}}, header: x-goog-token, metadataHost: '{addr}'}}"),
    );
    let mut ex = run(&p).await.unwrap();
    assert_eq!(
        header(&mut ex, "x-goog-token").as_deref(),
        Some("Bearer ya29.md-0")
    );
    *g.life.lock() = 3600;
    let mut ex = run(&p).await.unwrap();
    assert_eq!(
        header(&mut ex, "x-goog-token").as_deref(),
        Some("Bearer ya29.md-1")
    );
    assert_eq!(g.token_calls.load(Ordering::SeqCst), 2);
    for _ in 0..10 {
        run(&p).await.unwrap();
    }
    assert_eq!(g.token_calls.load(Ordering::SeqCst), 2);
}

/// Past half its life (here: its last 5 minutes) a token is still used, and one background
/// fetch replaces it: no request waits for the refresh. The clock is tokio's, advanced by
/// the test rather than waited for.
#[tokio::test]
async fn tokens_are_refreshed_in_the_background_past_half_their_life() {
    let (addr, g) = serve().await;
    *g.life.lock() = 3600;
    let services = Services::default();
    let p = assign(
        &services,
        None,
        &format!("googleToken: {{accessToken: {{scopes: [s1]}}, metadataHost: '{addr}'}}"),
    );
    let mut ex = run(&p).await.unwrap();
    assert_eq!(
        header(&mut ex, "authorization").as_deref(),
        Some("Bearer ya29.md-0")
    );
    // Before the refresh point: cached, no fetch.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3000)).await;
    tokio::time::resume();
    for _ in 0..5 {
        let mut ex = Exchange::default();
        assert!(matches!(
            p.run(&mut ex, Direction::Request),
            Hook::Ready(Outcome::Continue)
        ));
    }
    assert_eq!(g.token_calls.load(Ordering::SeqCst), 1);
    // Past it (3300 s of 3600): requests are answered at once with the old token while
    // one background fetch runs.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(400)).await;
    tokio::time::resume();
    for _ in 0..20 {
        let mut ex = Exchange::default();
        assert!(
            matches!(
                p.run(&mut ex, Direction::Request),
                Hook::Ready(Outcome::Continue)
            ),
            "no request waits for the refresh"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.token_calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no background refresh");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ex = run(&p).await.unwrap();
    assert_eq!(
        header(&mut ex, "authorization").as_deref(),
        Some("Bearer ya29.md-1")
    );
    assert_eq!(
        g.token_calls.load(Ordering::SeqCst),
        2,
        "one refresh for all"
    );
}

#[tokio::test]
async fn metadata_id_token_for_an_audience() {
    let (addr, g) = serve().await;
    let services = Services::default();
    let p = assign(
        &services,
        None,
        &format!("googleToken: {{idToken: {{audience: 'https://svc-abc.a.run.app'}}, header: x-serverless-authorization, metadataHost: '{addr}'}}\nset: {{headers: {{x-a: b}}}}"),
    );
    let mut ex = run(&p).await.unwrap();
    let v = header(&mut ex, "x-serverless-authorization").unwrap();
    let jwt = v.strip_prefix("Bearer ").unwrap();
    let payload: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            jwt.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["aud"], "https://svc-abc.a.run.app");
    assert_eq!(g.identity_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn service_account_key_file_signs_a_jwt_bearer_assertion() {
    let (addr, g) = serve().await;
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let private = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string();
    let public = key
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    *g.sa_public.lock() = Some(public);
    let token_uri = format!("http://{addr}/token");
    *TOKEN_AUD.lock() = token_uri.clone();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(
        dir.path().join("keys/sa.key"),
        json!({"type": "service_account", "client_email": "gw@proj.iam.gserviceaccount.com",
               "private_key_id": "kid-1", "private_key": private, "token_uri": token_uri})
        .to_string(),
    )
    .unwrap();
    let services = Services::default();
    let access = assign(
        &services,
        Some(dir.path()),
        "googleToken: {accessToken: {scopes: [https://www.googleapis.com/auth/cloud-platform]}, serviceAccountKeyFile: keys/sa.key}",
    );
    let mut ex = run(&access).await.unwrap();
    assert_eq!(
        header(&mut ex, "authorization").as_deref(),
        Some("Bearer ya29.sa-token")
    );
    let id = assign(
        &services,
        Some(dir.path()),
        "googleToken: {idToken: {audience: 'https://svc.example.com'}, serviceAccountKeyFile: keys/sa.key}",
    );
    let mut ex = run(&id).await.unwrap();
    assert!(header(&mut ex, "authorization")
        .unwrap()
        .starts_with("Bearer ey"));
    let a = g.assertions.lock().clone();
    assert_eq!(a.len(), 2, "both assertions verified with the public key");
    assert_eq!(a[0]["iss"], "gw@proj.iam.gserviceaccount.com");
    assert_eq!(
        a[0]["scope"],
        "https://www.googleapis.com/auth/cloud-platform"
    );
    assert_eq!(a[1]["target_audience"], "https://svc.example.com");

    // A key the endpoint does not know: its assertion is refused, the step answers 503.
    let other = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    std::fs::write(
        dir.path().join("keys/other.key"),
        json!({"client_email": "x@proj.iam.gserviceaccount.com",
               "private_key": other.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap().to_string(),
               "token_uri": format!("http://{addr}/token")})
        .to_string(),
    )
    .unwrap();
    let bad = assign(
        &services,
        Some(dir.path()),
        "googleToken: {accessToken: {scopes: [s]}, serviceAccountKeyFile: keys/other.key}",
    );
    let f = run(&bad).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (503, "steps.googletoken.TokenUnavailable")
    );

    // The key file is rotated in place: same email, new key (the endpoint now knows only
    // the new public half). The rebuilt policy signs with the new key at once, rather
    // than serving the old key's cached token until a restart.
    let rotated = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    *g.sa_public.lock() = Some(
        rotated
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap(),
    );
    std::fs::write(
        dir.path().join("keys/sa.key"),
        json!({"type": "service_account", "client_email": "gw@proj.iam.gserviceaccount.com",
               "private_key_id": "kid-2",
               "private_key": rotated.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap().to_string(),
               "token_uri": token_uri})
        .to_string(),
    )
    .unwrap();
    let calls = g.token_calls.load(Ordering::SeqCst);
    let access = assign(
        &services,
        Some(dir.path()),
        "googleToken: {accessToken: {scopes: [https://www.googleapis.com/auth/cloud-platform]}, serviceAccountKeyFile: keys/sa.key}",
    );
    let mut ex = run(&access).await.unwrap();
    assert_eq!(
        header(&mut ex, "authorization").as_deref(),
        Some("Bearer ya29.sa-token")
    );
    assert_eq!(
        g.token_calls.load(Ordering::SeqCst),
        calls + 1,
        "a new token, minted with the rotated key"
    );
    assert_eq!(g.assertions.lock().len(), 3);
}

#[tokio::test]
async fn metadata_server_down_fails_fast() {
    // Nothing listens on this port.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let services = Services::default();
    let p = assign(
        &services,
        None,
        &format!("googleToken: {{accessToken: {{scopes: [s]}}, metadataHost: '{addr}'}}"),
    );
    let start = Instant::now();
    let f = run(&p).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (503, "steps.googletoken.TokenUnavailable")
    );
    // Right after a failure, requests fail at once without piling up new attempts.
    for _ in 0..100 {
        let mut ex = Exchange::default();
        match p.run(&mut ex, Direction::Request) {
            Hook::Ready(Outcome::Reject(f)) => assert_eq!(f.status, 503),
            Hook::Ready(_) => panic!("no token can exist"),
            Hook::Pending(fut) => {
                assert_eq!(fut.await.into_result().unwrap_err().status, 503)
            }
        };
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
