//! The developer portal's defences, tried from outside: the real portal router and the
//! management API's developer routes over a real (in-memory) store, requests as a browser
//! or an attacker would send them.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

use tollgate::consumer::service::Consumers;
use tollgate::consumer::{ApiProduct, ApprovalType, Operation, Origin};
use tollgate::portal::accounts::ThrottleLimits;
use tollgate::portal::{Portal, PortalOptions};
use tollgate::store::Store;

struct Site {
    portal: Router,
    admin: Router,
    store: Store,
    _dir: tempfile::TempDir,
}

const SPEC: &str = r#"{"openapi":"3.0.3","info":{"title":"Evil API","version":"1"},
"paths":{"/v1/things":{"get":{"summary":"List <img src=x onerror=alert(1)>",
"responses":{"200":{"description":"ok","content":{"application/json":{
"example":{"name":"<script>alert('example')</script>"}}}}}}}}}"#;

fn product(name: &str, access: &str, description: &str) -> ApiProduct {
    ApiProduct {
        name: name.into(),
        description: description.into(),
        operations: vec![Operation {
            path: "/v1/**".into(),
            ..Default::default()
        }],
        quota: None,
        llm_token_quota: None,
        approval_type: ApprovalType::Auto,
        attributes: [
            ("access".to_owned(), access.to_owned()),
            ("openapiSpec".to_owned(), "evil.json".to_owned()),
        ]
        .into(),
        origin: Origin::File,
        revision: 0,
    }
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("evil.json"), SPEC).unwrap();
    let store = Store::memory();
    let consumers = Consumers::new(store.clone());
    consumers.set_file_objects(
        vec![
            product(
                "widgets",
                "public",
                "Widgets <script>alert('description')</script>",
            ),
            product("secret", "private", "granted only"),
        ],
        vec![],
    );
    consumers.spawn_follower();
    let portal = Portal::new(
        consumers,
        None,
        PortalOptions {
            spec_dir: Some(dir.path().to_owned()),
            throttle: ThrottleLimits {
                per_account: 3,
                per_address: 6,
                window_ms: 600_000,
            },
            ..Default::default()
        },
    );
    let admin = tollgate::portal::manage::guarded_router(
        portal.accounts().clone(),
        &tollgate::admin::ApiAuth::Bearer("admin-token".into()),
    );
    Site {
        portal: tollgate::portal::router(portal),
        admin,
        store,
        _dir: dir,
    }
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(r: &Router, req: Request<Body>) -> Resp {
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(Body::empty()).unwrap()
}

fn post(path: &str, cookie: Option<&str>, form: &str) -> Request<Body> {
    let mut b =
        Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(Body::from(form.to_owned())).unwrap()
}

fn from(addr: &str, mut req: Request<Body>) -> Request<Body> {
    let a: SocketAddr = addr.parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(a));
    req
}

fn csrf_in(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..at + 64].to_owned()
}

fn set_cookie(r: &Resp, name: &str) -> Option<String> {
    r.headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A signed-out form's CSRF cookie and field.
async fn anon(site: &Site, path: &str) -> (String, String) {
    let r = send(&site.portal, get(path, None)).await;
    assert_eq!(r.status, StatusCode::OK);
    let c = set_cookie(&r, "tg_portal_csrf").expect("csrf cookie");
    let cookie = c.split(';').next().unwrap().to_owned();
    (cookie, csrf_in(&r.body))
}

async fn signup(site: &Site, email: &str, password: &str) -> Resp {
    let (cookie, csrf) = anon(site, "/signup").await;
    send(
        &site.portal,
        post(
            "/signup",
            Some(&cookie),
            &format!(
                "csrf={csrf}&name=Dev&email={}&password={}",
                enc(email),
                enc(password)
            ),
        ),
    )
    .await
}

async fn approve(site: &Site, email: &str) {
    let r = send(
        &site.admin,
        Request::post(format!("/v1/developers/{email}/approve"))
            .header(header::AUTHORIZATION, "Bearer admin-token")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

async fn signin_from(site: &Site, addr: &str, email: &str, password: &str) -> Resp {
    let (cookie, csrf) = anon(site, "/signin").await;
    send(
        &site.portal,
        from(
            addr,
            post(
                "/signin",
                Some(&cookie),
                &format!(
                    "csrf={csrf}&email={}&password={}",
                    enc(email),
                    enc(password)
                ),
            ),
        ),
    )
    .await
}

/// Signs a developer up, approves and signs them in: their session cookie and CSRF token.
async fn developer(site: &Site, email: &str) -> (String, String) {
    let r = signup(site, email, "a long enough password").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    approve(site, email).await;
    let r = signin_from(site, "10.0.0.1:1000", email, "a long enough password").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let cookie = set_cookie(&r, "tg_portal").unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let apps = send(&site.portal, get("/apps", Some(&cookie))).await;
    assert_eq!(apps.status, StatusCode::OK);
    (cookie.clone(), csrf_in(&apps.body))
}

async fn create_app(site: &Site, session: &(String, String), name: &str) -> String {
    let r = send(
        &site.portal,
        post(
            "/apps",
            Some(&session.0),
            &format!("csrf={}&name={name}", session.1),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let loc = r.headers[header::LOCATION].to_str().unwrap();
    loc.strip_prefix("/apps/").unwrap().to_owned()
}

#[tokio::test]
async fn session_cookie_flags() {
    let site = site();
    signup(&site, "flags@example.com", "a long enough password").await;
    approve(&site, "flags@example.com").await;
    let r = signin_from(
        &site,
        "10.0.0.9:1",
        "flags@example.com",
        "a long enough password",
    )
    .await;
    let c = set_cookie(&r, "tg_portal").expect("session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(c.contains(flag), "{flag} missing in {c}");
    }
    let token = c
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("tg_portal=")
        .unwrap();
    assert_eq!(token.len(), 64);
    // The signed-out forms' cookie carries the same flags.
    let r = send(&site.portal, get("/signin", None)).await;
    let c = set_cookie(&r, "tg_portal_csrf").unwrap();
    assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
    // Pages forbid framing and any script.
    let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && !csp.contains("script-src"));
}

#[tokio::test]
async fn csrf_token_missing_or_wrong_is_refused() {
    let site = site();
    // Signed out: sign-up without the cookie, without the field, with a wrong field.
    let (cookie, csrf) = anon(&site, "/signup").await;
    let body = "name=x&email=x%40example.com&password=a+long+enough+password";
    for (c, f) in [
        (None, format!("csrf={csrf}&{body}")),
        (Some(cookie.as_str()), body.to_owned()),
        (
            Some(cookie.as_str()),
            format!("csrf={}&{body}", "0".repeat(64)),
        ),
    ] {
        let r = send(&site.portal, post("/signup", c, &f)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    }
    // Signed in: every action needs the session's token.
    let dev = developer(&site, "csrf@example.com").await;
    let app = create_app(&site, &dev, "mine").await;
    let other = developer(&site, "other@example.com").await;
    for path in [
        "/apps".to_owned(),
        format!("/apps/{app}/keys"),
        format!("/apps/{app}/subscribe"),
        "/signout".to_owned(),
    ] {
        for form in [
            "name=x&product=widgets".to_owned(),
            format!("csrf={}&name=x&product=widgets", "f".repeat(64)),
            // Another session's (valid) token is not this session's.
            format!("csrf={}&name=x&product=widgets", other.1),
        ] {
            let r = send(&site.portal, post(&path, Some(&dev.0), &form)).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} {form}: {}", r.body);
        }
    }
    let stored = site.store.get_app(&app).await.unwrap().unwrap();
    assert!(stored.keys.is_empty() && stored.products.is_empty());
    // With the right token, the same request works.
    let r = send(
        &site.portal,
        post(
            &format!("/apps/{app}/keys"),
            Some(&dev.0),
            &format!("csrf={}", dev.1),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("id=\"new-key\""));
}

#[tokio::test]
async fn another_developers_app_is_not_found() {
    let site = site();
    let alice = developer(&site, "alice@example.com").await;
    let mallory = developer(&site, "mallory@example.com").await;
    let app = create_app(&site, &alice, "alices").await;
    let r = send(
        &site.portal,
        post(
            &format!("/apps/{app}/keys"),
            Some(&alice.0),
            &format!("csrf={}", alice.1),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let key_id = site.store.get_app(&app).await.unwrap().unwrap().keys[0]
        .id
        .clone();

    let r = send(&site.portal, get(&format!("/apps/{app}"), Some(&mallory.0))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!r.body.contains(&key_id));
    let missing = send(&site.portal, get("/apps/no-such-app", Some(&mallory.0))).await;
    assert_eq!(missing.body, r.body, "same answer as a missing app");
    let c = format!("csrf={}&product=widgets", mallory.1);
    for path in [
        format!("/apps/{app}/keys"),
        format!("/apps/{app}/keys/{key_id}/revoke"),
        format!("/apps/{app}/keys/{key_id}/rotate"),
        format!("/apps/{app}/subscribe"),
    ] {
        let r = send(&site.portal, post(&path, Some(&mallory.0), &c)).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
    let r = send(
        &site.portal,
        post(
            "/subscribe",
            Some(&mallory.0),
            &format!("csrf={}&app={app}&product=widgets", mallory.1),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let stored = site.store.get_app(&app).await.unwrap().unwrap();
    assert_eq!(stored.keys.len(), 1);
    assert_eq!(
        stored.keys[0].status,
        tollgate::consumer::KeyStatus::Approved
    );
    assert!(stored.products.is_empty());
    // Mallory's list does not show it; signed out, app pages send to sign-in.
    let list = send(&site.portal, get("/apps", Some(&mallory.0))).await;
    assert!(!list.body.contains(&app));
    let r = send(&site.portal, get(&format!("/apps/{app}"), None)).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn script_in_description_and_openapi_example_is_escaped() {
    let site = site();
    let catalog = send(&site.portal, get("/", None)).await;
    assert_eq!(catalog.status, StatusCode::OK);
    assert!(!catalog.body.contains("<script>"));
    assert!(catalog
        .body
        .contains("&lt;script&gt;alert(&#39;description&#39;)"));
    assert!(
        !catalog.body.contains("/products/secret"),
        "private product hidden"
    );
    let page = send(&site.portal, get("/products/widgets", None)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("<script>") && !page.body.contains("<img"));
    assert!(page.body.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert!(page
        .body
        .contains("&lt;script&gt;alert(&#39;example&#39;)&lt;/script&gt;"));
    assert!(page.body.contains("<code>/v1/things</code>"));
    let hidden = send(&site.portal, get("/products/secret", None)).await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sign_in_flooding_is_throttled_per_account_and_per_address() {
    let site = site();
    signup(&site, "target@example.com", "the right password!").await;
    approve(&site, "target@example.com").await;
    // Three failures lock the account out, even with the right password, from anywhere.
    for i in 0..3 {
        let r = signin_from(
            &site,
            &format!("10.1.0.{i}:1"),
            "target@example.com",
            "wrong",
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }
    let r = signin_from(
        &site,
        "10.1.9.9:1",
        "target@example.com",
        "the right password!",
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(set_cookie(&r, "tg_portal").is_none());
    // One address spraying many accounts is stopped after six failures.
    for i in 0..6 {
        let r = signin_from(&site, "10.2.0.1:1", &format!("u{i}@example.com"), "wrong").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "attempt {i}");
    }
    let r = signin_from(&site, "10.2.0.1:1", "fresh@example.com", "wrong").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Another address and account still get through.
    signup(&site, "ok@example.com", "the right password!").await;
    approve(&site, "ok@example.com").await;
    let r = signin_from(&site, "10.3.0.1:1", "ok@example.com", "the right password!").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn pending_developers_cannot_sign_in_and_management_api_needs_the_token() {
    let site = site();
    signup(&site, "wait@example.com", "a long enough password").await;
    let r = signin_from(
        &site,
        "10.4.0.1:1",
        "wait@example.com",
        "a long enough password",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("waits for approval"));
    let r = send(
        &site.admin,
        Request::post("/v1/developers/wait@example.com/approve")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let list = send(
        &site.admin,
        Request::get("/v1/developers")
            .header(header::AUTHORIZATION, "Bearer admin-token")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(list.body.contains("wait@example.com") && !list.body.contains("argon2"));
    // A private product appears once granted.
    let dev = developer(&site, "granted@example.com").await;
    let before = send(&site.portal, get("/", Some(&dev.0))).await;
    assert!(!before.body.contains("/products/secret"));
    let r = send(
        &site.admin,
        Request::put("/v1/developers/granted@example.com/products")
            .header(header::AUTHORIZATION, "Bearer admin-token")
            .body(Body::from(r#"{"products":["secret"]}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let after = send(&site.portal, get("/", Some(&dev.0))).await;
    assert!(after.body.contains("/products/secret"));
}
