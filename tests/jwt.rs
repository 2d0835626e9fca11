//! `VerifyJwt` against a real local JWKS server (axum over TCP): every algorithm family
//! with keys generated here, caching by `Cache-Control`, key rotation, refetch storms,
//! a JWKS endpoint that is down or hangs, algorithm confusion, and the Google preset.
// Faults are returned by value, as the library does (see its lib.rs).
#![allow(clippy::result_large_err)]

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use tollgate::fault::Fault;
use tollgate::pipeline::{Direction, Hook, Outcome, Policy};
use tollgate::policies::BuildContext;
use tollgate::services::Services;
use tollgate::vars::{Exchange, Headers, RequestInfo};

mod support;

use support::policy::run;

// ───────────────────────────── keys ─────────────────────────────

struct Signer {
    kid: String,
    alg: Algorithm,
    enc: EncodingKey,
    jwk: Value,
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn rsa_signer(kid: &str, alg: Algorithm) -> Signer {
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig",
        "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())});
    Signer {
        kid: kid.into(),
        alg,
        enc: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        jwk,
    }
}

fn ec_signer(kid: &str) -> Signer {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw(); // 0x04 || x || y
    let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
    Signer {
        kid: kid.into(),
        alg: Algorithm::ES256,
        enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwk,
    }
}

fn ed_signer(kid: &str) -> Signer {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let jwk = json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(kp.public_key_raw())});
    Signer {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        enc: EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwk,
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims() -> Value {
    json!({"iss": "https://issuer.test", "aud": "api", "sub": "user-1", "exp": now() + 300,
           "iat": now(), "email": "u@example.com"})
}

impl Signer {
    fn token(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        encode(&h, claims, &self.enc).unwrap()
    }
}

// ───────────────────────────── JWKS server ─────────────────────────────

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Serve,
    Fail,
    Hang,
}

struct Jwks {
    keys: Mutex<Vec<Value>>,
    hits: AtomicUsize,
    mode: Mutex<Mode>,
    cache_control: Mutex<Option<String>>,
}

async fn jwks(State(s): State<Arc<Jwks>>) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let mode = *s.mode.lock();
    match mode {
        Mode::Fail => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                HeaderMap::new(),
                String::new(),
            )
        }
        Mode::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
        Mode::Serve => {}
    }
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(cc) = s.cache_control.lock().clone() {
        h.insert("cache-control", HeaderValue::from_str(&cc).unwrap());
    }
    let body = json!({"keys": *s.keys.lock()}).to_string();
    (StatusCode::OK, h, body)
}

async fn serve_jwks(keys: Vec<Value>) -> (SocketAddr, Arc<Jwks>) {
    let state = Arc::new(Jwks {
        keys: Mutex::new(keys),
        hits: AtomicUsize::new(0),
        mode: Mutex::new(Mode::Serve),
        cache_control: Mutex::new(Some("public, max-age=3600".into())),
    });
    let app = Router::new()
        .route("/jwks", get(jwks))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, state)
}

// ───────────────────────────── helpers ─────────────────────────────

fn policy(services: &Services, yaml: &str) -> Arc<dyn Policy> {
    let ctx = BuildContext {
        name: "auth".into(),
        config_dir: None,
        services: services.clone(),
    };
    support::policy::build("VerifyJwt", &ctx, yaml).unwrap_or_else(|e| panic!("spec: {e}"))
}

fn exchange(token: &str) -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "GET".into());
    h.push(":path".into(), "/x".into());
    h.push("authorization".into(), format!("Bearer {token}"));
    Exchange {
        request: RequestInfo::from_headers(h),
        ..Default::default()
    }
}

async fn verify(p: &Arc<dyn Policy>, token: &str) -> Result<Exchange, Fault> {
    let mut ex = exchange(token);
    run(p, &mut ex).await.map(|()| ex)
}

fn spec(addr: SocketAddr, algs: &str, extra: &str) -> String {
    format!(
        "algorithms: [{algs}]\njwks: {{url: 'http://{addr}/jwks', minRefreshSeconds: 30, timeoutMs: 500}}\nissuer: https://issuer.test\naudience: api\n{extra}"
    )
}

// ───────────────────────────── tests ─────────────────────────────

#[tokio::test]
async fn every_algorithm_family_verifies_from_a_jwks_url() {
    let signers = vec![
        rsa_signer("rs", Algorithm::RS256),
        rsa_signer("ps", Algorithm::PS256),
        ec_signer("es"),
        ed_signer("ed"),
    ];
    let (addr, server) = serve_jwks(signers.iter().map(|s| s.jwk.clone()).collect()).await;
    let services = Services::default();
    let p = policy(
        &services,
        &spec(
            addr,
            "RS256, PS256, ES256, EdDSA",
            "requiredClaims: [email]",
        ),
    );
    for s in &signers {
        let ex = verify(&p, &s.token(&claims()))
            .await
            .unwrap_or_else(|f| panic!("{:?}: {f:?}", s.alg));
        assert_eq!(ex.lookup("jwt.auth.claim.sub").as_deref(), Some("user-1"));
        assert_eq!(
            ex.lookup("jwt.auth.header.kid").as_deref(),
            Some(s.kid.as_str())
        );
    }
    // The set was fetched once (prefetch or first request) and then served from cache.
    for s in &signers {
        verify(&p, &s.token(&claims())).await.unwrap();
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    // A policy pinned to RS256 refuses the others, even with a valid signature.
    let rs_only = policy(&services, &spec(addr, "RS256", ""));
    for s in &signers[1..] {
        let f = verify(&rs_only, &s.token(&claims())).await.unwrap_err();
        assert_eq!(f.code, "steps.jwt.AlgorithmMismatch", "{:?}", s.alg);
        assert_eq!(f.status, 401);
        let challenge = &f
            .headers
            .iter()
            .find(|(n, _)| n == "www-authenticate")
            .unwrap()
            .1;
        assert!(
            challenge.starts_with("Bearer realm=\"tollgate\", error=\"invalid_token\""),
            "{challenge}"
        );
    }
    // The JWKS is shared by URL: the second policy did not fetch again.
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_clear_codes() {
    let rs = rsa_signer("rs", Algorithm::RS256);
    let other = rsa_signer("rs", Algorithm::RS256); // same kid, different key
    let (addr, _server) = serve_jwks(vec![rs.jwk.clone()]).await;
    let services = Services::default();
    let p = policy(&services, &spec(addr, "RS256", "leewaySeconds: 5"));
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        rs.token(&c)
    };
    let cases = [
        (other.token(&claims()), "steps.jwt.InvalidToken"),
        (with("exp", json!(now() - 60)), "steps.jwt.TokenExpired"),
        (with("nbf", json!(now() + 60)), "steps.jwt.TokenNotYetValid"),
        (with("iat", json!(now() + 60)), "steps.jwt.TokenNotYetValid"),
        (
            with("iss", json!("https://evil.test")),
            "steps.jwt.JwtIssuerMismatch",
        ),
        (
            with("aud", json!("someone-else")),
            "steps.jwt.JwtAudienceMismatch",
        ),
        ("x".repeat(20_000), "steps.jwt.InvalidToken"),
        ("not-a-jwt".into(), "steps.jwt.FailedToDecode"),
    ];
    for (token, code) in cases {
        let f = verify(&p, &token).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (401, code));
    }
    // Algorithm confusion: an HS256 token "signed" with the RSA public key as secret.
    let public = serde_json::to_vec(&rs.jwk).unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rs".into());
    let confused = encode(&h, &claims(), &EncodingKey::from_secret(&public)).unwrap();
    let f = verify(&p, &confused).await.unwrap_err();
    assert_eq!(f.code, "steps.jwt.AlgorithmMismatch");
    // Missing token: a bare challenge.
    let mut ex = Exchange::default();
    let f = run(&p, &mut ex).await.unwrap_err();
    assert_eq!(f.code, "steps.jwt.FailedToResolveVariable");
    assert!(f.headers.contains(&(
        "www-authenticate".into(),
        "Bearer realm=\"tollgate\"".into()
    )));
}

#[tokio::test]
async fn rotation_refetches_once_and_unknown_kid_storms_do_not() {
    let old = rsa_signer("k1", Algorithm::RS256);
    let (addr, server) = serve_jwks(vec![old.jwk.clone()]).await;
    let services = Services::default();
    let p = policy(&services, &spec(addr, "RS256", ""));
    verify(&p, &old.token(&claims())).await.unwrap();
    let hits = server.hits.load(Ordering::SeqCst);
    assert_eq!(hits, 1);

    // The issuer rotates in a new key: the first token with the new kid refetches.
    let new = rsa_signer("k2", Algorithm::RS256);
    server.keys.lock().push(new.jwk.clone());
    // Many concurrent requests with the new kid share one fetch.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let p = p.clone();
        let t = new.token(&claims());
        tasks.push(tokio::spawn(
            async move { verify(&p, &t).await.map(|_| ()) },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        2,
        "one refetch for the rotation"
    );

    // A storm of tokens with made-up kids: unknown-kid refetches are rate limited
    // (minRefresh 30 s, and the rotation just used it), so none reaches the JWKS server;
    // each gets a clear 401.
    for i in 0..200 {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(format!("made-up-{i}"));
        let t = encode(&h, &claims(), &old.enc).unwrap();
        let f = verify(&p, &t).await.unwrap_err();
        assert_eq!(f.code, "steps.jwt.NoMatchingPublicKey");
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    // Known keys still verify at once.
    verify(&p, &old.token(&claims())).await.unwrap();
}

#[tokio::test]
async fn jwks_down_or_hanging_gives_503_without_stalling() {
    let rs = rsa_signer("k1", Algorithm::RS256);
    let (addr, server) = serve_jwks(vec![rs.jwk.clone()]).await;
    *server.mode.lock() = Mode::Fail;
    let services = Services::default();
    let p = policy(&services, &spec(addr, "RS256", ""));
    let f = verify(&p, &rs.token(&claims())).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (503, "steps.jwt.JwksUnavailable")
    );

    // A hanging endpoint: the fetch gives up at the policy's timeout (500 ms); concurrent
    // requests wait for that one fetch, not one each.
    let (addr2, hanging) = serve_jwks(vec![rs.jwk.clone()]).await;
    *hanging.mode.lock() = Mode::Hang;
    let p2 = policy(&services, &spec(addr2, "RS256", ""));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let p2 = p2.clone();
        let t = rs.token(&claims());
        tasks.push(tokio::spawn(
            async move { verify(&p2, &t).await.map(|_| ()) },
        ));
    }
    for t in tasks {
        let f = t.await.unwrap().unwrap_err();
        assert_eq!(f.status, 503);
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(
        hanging.hits.load(Ordering::SeqCst) <= 2,
        "fetches: {}",
        hanging.hits.load(Ordering::SeqCst)
    );
}

/// Moves tokio's clock (the one the key-set cache reads) forward without waiting.
async fn skip(secs: u64) {
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(secs)).await;
    tokio::time::resume();
}

/// Verifies `token` `n` times, each answered at once (no request waits for a fetch).
fn verify_at_once(p: &Arc<dyn Policy>, token: &str, n: usize) {
    for _ in 0..n {
        let mut ex = exchange(token);
        assert!(
            matches!(
                p.run(&mut ex, Direction::Request),
                Hook::Ready(Outcome::Continue)
            ),
            "answered from the cached set"
        );
    }
}

/// Waits (bounded) until the JWKS server has been asked `n` times.
async fn wait_hits(server: &Jwks, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.hits.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "JWKS fetch {n} did not happen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cached_sets_expire_with_max_age_and_refresh_in_the_background() {
    let rs = rsa_signer("k1", Algorithm::RS256);
    let (addr, server) = serve_jwks(vec![rs.jwk.clone()]).await;
    *server.cache_control.lock() = Some("max-age=120".into());
    let services = Services::default();
    let p = policy(&services, &spec(addr, "RS256", ""));
    let token = rs.token(&claims());
    verify(&p, &token).await.unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    // Fresh for max-age: no fetch.
    skip(110).await;
    verify_at_once(&p, &token, 5);
    tokio::task::yield_now().await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    // Stale: still used at once, while exactly one background fetch replaces it.
    skip(20).await;
    verify_at_once(&p, &token, 20);
    wait_hits(&server, 2).await;
    verify_at_once(&p, &token, 20);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 2, "one refetch for all");

    // max-age under a minute counts as a minute (a JWKS server cannot cause a fetch per
    // request); over a day as a day. (A new timeoutMs: a set of its own, fetched anew.)
    let (addr, server) = serve_jwks(vec![rs.jwk.clone()]).await;
    *server.cache_control.lock() = Some("max-age=5".into());
    let p = policy(&services, &spec(addr, "RS256", ""));
    verify(&p, &token).await.unwrap();
    skip(30).await;
    verify_at_once(&p, &token, 5);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "5 s counts as 60 s");
    skip(31).await;
    verify_at_once(&p, &token, 5);
    wait_hits(&server, 2).await;

    *server.cache_control.lock() = Some("max-age=172800".into());
    let p = policy(&services, &spec(addr, "RS256", "").replace("500}", "501}"));
    verify(&p, &token).await.unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
    skip(24 * 3600 + 10).await;
    verify_at_once(&p, &token, 5);
    wait_hits(&server, 4).await;
}

/// Options are per policy: a reload that edits `cacheSeconds` (or the timeout, or the
/// refresh interval) for a URL takes effect, instead of the first policy's options
/// staying for the life of the process.
#[tokio::test]
async fn edited_jwks_options_take_effect() {
    let rs = rsa_signer("k1", Algorithm::RS256);
    let (addr, server) = serve_jwks(vec![rs.jwk.clone()]).await;
    // No max-age: the policy's cacheSeconds decides.
    *server.cache_control.lock() = None;
    let services = Services::default();
    let with = |cache: u64| {
        format!(
            "algorithms: [RS256]\njwks: {{url: 'http://{addr}/jwks', cacheSeconds: {cache}}}\nissuer: https://issuer.test\naudience: api\n"
        )
    };
    let token = rs.token(&claims());
    let first = policy(&services, &with(3600));
    verify(&first, &token).await.unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    drop(first);
    // The edited configuration: 120 s.
    let edited = policy(&services, &with(120));
    verify(&edited, &token).await.unwrap();
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    skip(130).await;
    verify_at_once(&edited, &token, 5);
    wait_hits(&server, 3).await;
    // The same options again share the set: no fetch.
    let again = policy(&services, &with(120));
    verify_at_once(&again, &token, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn inline_keys_and_google_preset() {
    let rs = rsa_signer("g1", Algorithm::RS256);
    let (addr, _server) = serve_jwks(vec![rs.jwk.clone()]).await;
    let services = Services::default();
    // Google preset: Google's issuers and RS256 by default; the JWKS URL is overridden
    // here to a local server speaking the same JWKS format.
    let p = policy(
        &services,
        &format!("preset: google\naudience: https://svc.example.com\njwks: {{url: 'http://{addr}/jwks'}}\nrequiredClaims: [email]\nmatchClaims: {{email_verified: 'true'}}"),
    );
    let mut c = json!({"iss": "https://accounts.google.com", "aud": "https://svc.example.com",
        "sub": "1234", "email": "sa@project.iam.gserviceaccount.com", "email_verified": true,
        "iat": now(), "exp": now() + 3600});
    let ex = verify(&p, &rs.token(&c)).await.unwrap();
    assert_eq!(
        ex.lookup("jwt.auth.claim.email").as_deref(),
        Some("sa@project.iam.gserviceaccount.com")
    );
    c["iss"] = json!("accounts.google.com");
    verify(&p, &rs.token(&c)).await.unwrap();
    c["iss"] = json!("https://issuer.test");
    assert_eq!(
        verify(&p, &rs.token(&c)).await.unwrap_err().code,
        "steps.jwt.JwtIssuerMismatch"
    );

    // Inline JWKS: no server involved, answers at once.
    let inline = policy(
        &services,
        &format!(
            "algorithms: [RS256]\nkeys: {{jwks: {{keys: [{}]}}}}\naudience: api",
            rs.jwk
        ),
    );
    let mut ex = exchange(&rs.token(&claims()));
    assert!(matches!(
        inline.run(&mut ex, Direction::Request),
        Hook::Ready(Outcome::Continue)
    ));
}
