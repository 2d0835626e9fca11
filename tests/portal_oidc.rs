//! The portal's OpenID Connect sign-in against a small OpenID provider written here
//! (discovery, token endpoint, JWKS over real HTTP on loopback; ES256 ID tokens): the
//! authorization-code flow signs a developer in (after approval, as a sign-up), and a wrong
//! `state`, a replayed or foreign `nonce`, another audience or a bad client secret are refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tower::ServiceExt;

use tollgate::consumer::service::Consumers;
use tollgate::portal::oidc::OidcOptions;
use tollgate::portal::{Portal, PortalOptions};
use tollgate::store::Store;

const SECRET: &str = "client-secret-123";

struct Provider {
    issuer: String,
    enc: EncodingKey,
    jwk: Value,
    /// code → claims the token endpoint signs for it.
    codes: Mutex<HashMap<String, Value>>,
}

async fn discovery(State(p): State<Arc<Provider>>) -> Json<Value> {
    Json(json!({
        "issuer": p.issuer,
        "authorization_endpoint": format!("{}/authorize", p.issuer),
        "token_endpoint": format!("{}/token", p.issuer),
        "jwks_uri": format!("{}/jwks", p.issuer),
    }))
}

async fn jwks(State(p): State<Arc<Provider>>) -> Json<Value> {
    Json(json!({"keys": [p.jwk]}))
}

async fn token(State(p): State<Arc<Provider>>, body: Bytes) -> (StatusCode, Json<Value>) {
    let f: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if f.get("client_secret").map(String::as_str) != Some(SECRET)
        || f.get("grant_type").map(String::as_str) != Some("authorization_code")
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        );
    }
    let Some(claims) = f.get("code").and_then(|c| p.codes.lock().remove(c)) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        );
    };
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    let t = encode(&h, &claims, &p.enc).unwrap();
    (
        StatusCode::OK,
        Json(json!({"id_token": t, "token_type": "Bearer"})),
    )
}

async fn provider() -> Arc<Provider> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let p = Arc::new(Provider {
        issuer: format!("http://{addr}"),
        enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "kid": "k1", "crv": "P-256", "alg": "ES256", "use": "sig",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
        codes: Mutex::default(),
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/token", post(token))
        .with_state(p.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    p
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(r: &Router, req: Request<Body>) -> Resp {
    let resp = r.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn cookie_of(r: &Resp, name: &str) -> Option<String> {
    r.headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// Starts a flow: the provider URL's `state` and `nonce`, and the flow cookie.
async fn start(portal: &Router, issuer: &str) -> (String, String, String) {
    let r = send(
        portal,
        Request::get("/oidc/start").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let loc = r.headers[header::LOCATION].to_str().unwrap().to_owned();
    assert!(
        loc.starts_with(&format!("{issuer}/authorize?response_type=code")),
        "{loc}"
    );
    let q: HashMap<String, String> =
        form_urlencoded::parse(loc.split_once('?').unwrap().1.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(q["client_id"], "portal");
    assert_eq!(q["redirect_uri"], "http://localhost:1/oidc/callback");
    assert!(q["scope"].contains("openid"));
    let c = cookie_of(&r, "tg_portal_oidc").unwrap();
    assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax"), "{c}");
    let cookie = c.split(';').next().unwrap().to_owned();
    (q["state"].clone(), q["nonce"].clone(), cookie)
}

async fn callback(portal: &Router, code: &str, state: &str, cookie: &str) -> Resp {
    send(
        portal,
        Request::get(format!("/oidc/callback?code={code}&state={state}"))
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_flow_signs_a_developer_in_and_refuses_forgeries() {
    let p = provider().await;
    let consumers = Consumers::new(Store::memory());
    let portal = Portal::new(
        consumers,
        None,
        PortalOptions {
            oidc: Some(OidcOptions {
                issuer: p.issuer.clone(),
                client_id: "portal".into(),
                client_secret: SECRET.into(),
                redirect_url: "http://localhost:1/oidc/callback".into(),
            }),
            ..Default::default()
        },
    );
    let accounts = portal.accounts().clone();
    let router = tollgate::portal::router(portal);
    let claims = |nonce: &str, aud: &str| {
        json!({"iss": p.issuer, "aud": aud, "sub": "u-1", "email": "Grace@Example.com",
            "email_verified": true, "name": "Grace", "nonce": nonce,
            "iat": now(), "exp": now() + 300})
    };

    // The sign-in page offers it.
    let page = send(
        &router,
        Request::get("/signin").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(page.body.contains("href=\"/oidc/start\""));

    // First sign-in: the account is created, pending approval.
    let (state, nonce, cookie) = start(&router, &p.issuer).await;
    p.codes.lock().insert("c1".into(), claims(&nonce, "portal"));
    let r = callback(&router, "c1", &state, &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("waits for approval"));
    let dev = accounts
        .developer("grace@example.com")
        .await
        .unwrap()
        .unwrap();
    assert!(dev.password_hash.is_none());
    accounts
        .update("grace@example.com", |d| {
            d.status = tollgate::portal::accounts::DeveloperStatus::Active
        })
        .await
        .unwrap();

    // Approved: a session.
    let (state, nonce, cookie) = start(&router, &p.issuer).await;
    p.codes.lock().insert("c2".into(), claims(&nonce, "portal"));
    let r = callback(&router, "c2", &state, &cookie).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let session = cookie_of(&r, "tg_portal").expect("a session cookie");
    assert!(session.contains("HttpOnly") && session.contains("SameSite=Strict"));
    let session = session.split(';').next().unwrap().to_owned();
    let apps = send(
        &router,
        Request::get("/apps")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(apps.status, StatusCode::OK);
    assert!(apps.body.contains("grace@example.com"));

    // A wrong or missing state (a forged callback) is refused before any token exchange.
    let (_, nonce, cookie) = start(&router, &p.issuer).await;
    p.codes.lock().insert("c3".into(), claims(&nonce, "portal"));
    let r = callback(&router, "c3", &"0".repeat(64), &cookie).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = callback(&router, "c3", &"0".repeat(64), "x=y").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        p.codes.lock().contains_key("c3"),
        "the code was never redeemed"
    );

    // A token for another flow's nonce, or for another client, is refused.
    let (state, _, cookie) = start(&router, &p.issuer).await;
    p.codes
        .lock()
        .insert("c4".into(), claims("someone-elses-nonce", "portal"));
    let r = callback(&router, "c4", &state, &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(cookie_of(&r, "tg_portal").is_none());
    let (state, nonce, cookie) = start(&router, &p.issuer).await;
    p.codes
        .lock()
        .insert("c5".into(), claims(&nonce, "another-client"));
    let r = callback(&router, "c5", &state, &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // An unverified email is refused.
    let (state, nonce, cookie) = start(&router, &p.issuer).await;
    let mut c = claims(&nonce, "portal");
    c["email_verified"] = json!(false);
    p.codes.lock().insert("c6".into(), c);
    let r = callback(&router, "c6", &state, &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A code the provider does not know (replayed) is refused.
    let (state, _, cookie) = start(&router, &p.issuer).await;
    let r = callback(&router, "c2", &state, &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}
