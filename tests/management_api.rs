//! The management API (`/v1/…` on the admin port), driven in-process: CRUD, pagination, key
//! generation and its effect on the data path's index, authentication, file objects,
//! bad input, body limits and failing stores.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tower::ServiceExt;

use tollgate::admin::{self, ApiAuth};
use tollgate::consumer::index::Refusal;
use tollgate::consumer::service::Consumers;
use tollgate::consumer::{
    hash_key, ApiKey, ApiProduct, App, AppStatus, KeyStatus, Operation, Origin,
};
use tollgate::kvm::{KvmEntry, Kvms};
use tollgate::ratelimit::{Ask, Decision};
use tollgate::store::backend::{Keep, Visit};
use tollgate::store::{Backend, Change, Cond, Put, Store, StoreError, Table, Write};

const TOKEN: &str = "mgmt-token-for-tests";
const FILE_KEY: &str = "file-app-secret-key";

fn file_product() -> ApiProduct {
    ApiProduct {
        name: "file-gold".into(),
        description: "from a file".into(),
        operations: vec![Operation {
            path: "/file/**".into(),
            methods: vec![],
            models: vec![],
            ..Default::default()
        }],
        quota: None,
        llm_token_quota: None,
        approval_type: Default::default(),
        attributes: Default::default(),
        origin: Origin::File,
        revision: 0,
    }
}

fn file_app() -> App {
    App {
        name: "file-app".into(),
        developer_email: "ops@example.com".into(),
        status: AppStatus::Approved,
        products: vec!["file-gold".into()],
        keys: vec![ApiKey {
            id: "key_file".into(),
            hash: hash_key(FILE_KEY),
            status: KeyStatus::Approved,
            expires_at: None,
            created_at: 0,
        }],
        attributes: Default::default(),
        origin: Origin::File,
        revision: 0,
    }
}

struct Env {
    router: Router,
    consumers: Arc<Consumers>,
}

async fn env_with(store: Store, auth: ApiAuth) -> Env {
    let consumers = Consumers::new(store);
    consumers.set_file_objects(vec![file_product()], vec![file_app()]);
    let _ = consumers.resync().await;
    consumers.spawn_follower();
    // Merged beside an unauthenticated route, as the admin router's /healthz.
    let base = Router::new().route("/healthz", get(|| async { "ok\n" }));
    let router = admin::with_api(base, consumers.clone(), auth.clone());
    let kvms = Arc::new(Kvms::default());
    let mut files = std::collections::BTreeMap::new();
    let mut creds = std::collections::BTreeMap::new();
    creds.insert(
        "file-key".to_owned(),
        KvmEntry {
            value: "fv".into(),
            secret: false,
        },
    );
    creds.insert(
        "file-secret".to_owned(),
        KvmEntry {
            value: "file-hunter2".into(),
            secret: true,
        },
    );
    files.insert("creds".to_owned(), creds);
    kvms.set_files(Arc::new(files));
    let router = admin::with_kvm_api(router, consumers.clone(), kvms, auth);
    Env { router, consumers }
}

async fn env() -> Env {
    env_with(Store::memory(), ApiAuth::Bearer(TOKEN.into())).await
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    fn field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

async fn send(
    router: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        text,
        body,
    }
}

/// An authenticated call; `body` is sent as JSON when given.
async fn call(env: &Env, method: Method, uri: &str, body: Option<Value>) -> Reply {
    let (ct, bytes) = match body {
        Some(v) => (Some("application/json"), serde_json::to_vec(&v).unwrap()),
        None => (None, Vec::new()),
    };
    send(&env.router, method, uri, Some(TOKEN), ct, bytes).await
}

/// An authenticated call with a raw JSON body.
async fn call_raw(env: &Env, method: Method, uri: &str, raw: &str) -> Reply {
    send(
        &env.router,
        method,
        uri,
        Some(TOKEN),
        Some("application/json"),
        raw.as_bytes().to_vec(),
    )
    .await
}

fn product_json(name: &str, approval: &str) -> Value {
    json!({
        "name": name,
        "description": "test product",
        "operations": [{"path": "/v1/**", "methods": ["GET", "POST"]}],
        "quota": {"limit": 100, "timeUnit": "minute"},
        "approvalType": approval,
        "attributes": {"tier": "gold"},
    })
}

fn app_json(name: &str, products: &[&str]) -> Value {
    json!({
        "name": name,
        "developerEmail": "dev@example.com",
        "products": products,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Polls the data path's index for up to 2 s until `key` verifies as `want`.
async fn index_says(consumers: &Consumers, key: &str, want: Result<(), Refusal>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got;
    loop {
        got = consumers
            .index()
            .verify(key, "GET", "/v1/items", None, now_ms())
            .map(|v| {
                assert!(!v.app.name.is_empty());
            });
        if got == want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got, want, "index verdict for the key");
}

fn assert_error(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.code(), code, "{r:?}");
    assert!(!r.message().is_empty(), "{r:?}");
    assert_eq!(
        r.headers.get(header::CONTENT_TYPE).unwrap(),
        "application/json",
        "{r:?}"
    );
}

#[tokio::test]
async fn product_crud() {
    let env = env().await;
    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("gold", "auto")),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(
        r.headers.get(header::LOCATION).unwrap(),
        "/v1/products/gold"
    );
    assert_eq!(r.body["origin"], "api");
    assert_eq!(r.body["quota"]["interval"], 1);

    let r = call(&env, Method::GET, "/v1/products/gold", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["description"], "test product");
    assert_eq!(r.body["attributes"]["tier"], "gold");

    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("gold", "auto")),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "AlreadyExists");

    // PUT replaces; the name may be left out of the body.
    let r = call(
        &env,
        Method::PUT,
        "/v1/products/gold",
        Some(json!({"description": "changed", "operations": [{"path": "/v2/*"}]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["name"], "gold");
    assert!(r.body.get("quota").is_none());
    let r = call(&env, Method::GET, "/v1/products/gold", None).await;
    assert_eq!(r.body["description"], "changed");

    let r = call(
        &env,
        Method::PUT,
        "/v1/products/gold",
        Some(product_json("silver", "auto")),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "name");

    let r = call(
        &env,
        Method::PUT,
        "/v1/products/nope",
        Some(product_json("nope", "auto")),
    )
    .await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");

    let r = call(&env, Method::GET, "/v1/products/file-gold", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["origin"], "file");

    let r = call(&env, Method::DELETE, "/v1/products/gold", None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.text.is_empty());
    let r = call(&env, Method::GET, "/v1/products/gold", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = call(&env, Method::DELETE, "/v1/products/gold", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
}

#[tokio::test]
async fn app_crud_keeps_keys_on_put() {
    let env = env().await;
    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("gold", "auto")),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["gold", "file-gold"])),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.headers.get(header::LOCATION).unwrap(), "/v1/apps/shop");
    assert_eq!(r.body["keys"], json!([]));
    assert_eq!(r.body["status"], "approved");
    assert_eq!(r.body["origin"], "api");

    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["gold"])),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "AlreadyExists");

    let key = call(&env, Method::POST, "/v1/apps/shop/keys", None).await;
    assert_eq!(key.status, StatusCode::CREATED, "{key:?}");
    let id = key.body["id"].as_str().unwrap().to_owned();

    let r = call(
        &env,
        Method::PUT,
        "/v1/apps/shop",
        Some(
            json!({"developerEmail": "new@example.com", "products": ["gold"], "status": "revoked"}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["developerEmail"], "new@example.com");
    assert_eq!(r.body["status"], "revoked");
    assert_eq!(r.body["keys"][0]["id"], id.as_str(), "PUT keeps the keys");

    let r = call(&env, Method::GET, "/v1/apps/shop", None).await;
    assert_eq!(r.body["keys"].as_array().unwrap().len(), 1);
    assert!(
        !r.text.contains("sha256:"),
        "no hash in responses: {}",
        r.text
    );
    assert!(r.body["keys"][0].get("hash").is_none());
    assert!(r.body["keys"][0].get("key").is_none());

    // Keys never come in with an app body.
    let mut with_keys = app_json("shop", &["gold"]);
    with_keys["keys"] = json!([{"id": "key_x", "hash": hash_key("mine")}]);
    let r = call(&env, Method::PUT, "/v1/apps/shop", Some(with_keys.clone())).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "keys");
    with_keys["name"] = json!("other");
    let r = call(&env, Method::POST, "/v1/apps", Some(with_keys)).await;
    assert_eq!(r.field(), "keys");

    let r = call(
        &env,
        Method::PUT,
        "/v1/apps/ghost",
        Some(app_json("ghost", &[])),
    )
    .await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");

    // A product in use cannot be deleted.
    let r = call(&env, Method::DELETE, "/v1/products/gold", None).await;
    assert_error(&r, StatusCode::CONFLICT, "FailedPrecondition");
    assert!(r.message().contains("shop"), "{r:?}");

    let r = call(&env, Method::DELETE, "/v1/apps/shop", None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = call(&env, Method::GET, "/v1/apps/shop", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = call(&env, Method::DELETE, "/v1/products/gold", None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

async fn list_all(env: &Env, base: &str, page_size: usize) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &token {
            Some(t) => format!("{base}?pageSize={page_size}&pageToken={t}"),
            None => format!("{base}?pageSize={page_size}"),
        };
        let r = call(env, Method::GET, &uri, None).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        pages += 1;
        let page = r.body["items"].as_array().unwrap().clone();
        assert!(page.len() <= page_size);
        items.extend(page);
        match r.body.get("nextPageToken").and_then(Value::as_str) {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
        assert!(pages < 100, "pagination does not end");
    }
    (items, pages)
}

#[tokio::test]
async fn lists_paginate_and_include_file_objects() {
    let env = env().await;
    for i in (0..25).rev() {
        let r = call(
            &env,
            Method::POST,
            "/v1/products",
            Some(product_json(&format!("p{i:02}"), "auto")),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let (items, pages) = list_all(&env, "/v1/products", 10).await;
    assert_eq!(pages, 3);
    let names: Vec<&str> = items.iter().map(|p| p["name"].as_str().unwrap()).collect();
    let mut expected: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    expected.push("file-gold".into());
    expected.sort();
    assert_eq!(names, expected);
    for p in &items {
        let want = if p["name"] == "file-gold" {
            "file"
        } else {
            "api"
        };
        assert_eq!(p["origin"], want);
    }

    // Exactly one page: no token.
    let (items, pages) = list_all(&env, "/v1/products", 26).await;
    assert_eq!((items.len(), pages), (26, 1));
    // Default page size covers it too.
    let r = call(&env, Method::GET, "/v1/products", None).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 26);
    assert!(r.body.get("nextPageToken").is_none());

    for i in 0..5 {
        let r = call(
            &env,
            Method::POST,
            "/v1/apps",
            Some(app_json(&format!("app-{i}"), &["p00"])),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let (apps, pages) = list_all(&env, "/v1/apps", 2).await;
    assert_eq!(pages, 3);
    let names: Vec<&str> = apps.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["app-0", "app-1", "app-2", "app-3", "app-4", "file-app"]
    );
    assert_eq!(apps[5]["origin"], "file");
    assert!(!serde_json::to_string(&apps).unwrap().contains("sha256:"));

    for _ in 0..3 {
        let r = call(&env, Method::POST, "/v1/apps/app-0/keys", None).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let (keys, pages) = list_all(&env, "/v1/apps/app-0/keys", 2).await;
    assert_eq!((keys.len(), pages), (3, 2));

    for bad in [
        "/v1/products?pageSize=abc",
        "/v1/products?pageSize=-1",
        "/v1/products?pageToken=%%%",
        "/v1/products?color=red",
    ] {
        let r = call(&env, Method::GET, bad, None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    }
    // Oversized pages are lowered to the maximum, not refused.
    let r = call(&env, Method::GET, "/v1/products?pageSize=100000", None).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn keys_reach_the_index_and_their_lifecycle_takes_effect() {
    let env = env().await;
    call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("gold", "auto")),
    )
    .await;
    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["gold"])),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = call(&env, Method::POST, "/v1/apps/shop/keys", None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tg_") && key.len() == 3 + 43, "{key}");
    assert!(key[3..]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert!(id.starts_with("key_") && id.len() == 20, "{id}");
    assert!(id[4..]
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(r.body["status"], "approved");
    assert_eq!(r.body["expiresAt"], Value::Null);
    assert!(r.body.get("hash").is_none());
    assert_eq!(
        r.headers.get(header::LOCATION).unwrap(),
        format!("/v1/apps/shop/keys/{id}").as_str()
    );

    // The store holds only the hash.
    let stored = env
        .consumers
        .store()
        .get_app("shop")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.keys.len(), 1);
    assert_eq!(stored.keys[0].hash, hash_key(&key));
    assert!(!serde_json::to_string(&stored).unwrap().contains(&key));

    // Shown in clear once: never again.
    let r = call(&env, Method::GET, &format!("/v1/apps/shop/keys/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["id"], id.as_str());
    assert!(r.body.get("key").is_none() && r.body.get("hash").is_none());
    assert!(!r.text.contains(&key));
    let r = call(&env, Method::GET, "/v1/apps/shop/keys", None).await;
    assert!(!r.text.contains(&key) && !r.text.contains("sha256:"));

    index_says(&env.consumers, &key, Ok(())).await;

    let base = format!("/v1/apps/shop/keys/{id}");
    let r = call(&env, Method::POST, &format!("{base}/revoke"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["status"], "revoked");
    index_says(&env.consumers, &key, Err(Refusal::KeyRevoked)).await;

    let r = call(&env, Method::POST, &format!("{base}/approve"), None).await;
    assert_eq!(r.body["status"], "approved");
    index_says(&env.consumers, &key, Ok(())).await;

    let r = call(&env, Method::POST, &format!("{base}/expire"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["expiresAt"].as_i64().unwrap() <= now_ms());
    index_says(&env.consumers, &key, Err(Refusal::KeyExpired)).await;

    let r = call(&env, Method::DELETE, &base, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    index_says(&env.consumers, &key, Err(Refusal::UnknownKey)).await;
    let r = call(&env, Method::GET, &base, None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = call(&env, Method::POST, &format!("{base}/revoke"), None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = call(&env, Method::POST, "/v1/apps/ghost/keys", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");

    // Expiry options.
    let before = now_ms();
    let r = call(
        &env,
        Method::POST,
        "/v1/apps/shop/keys",
        Some(json!({"expiresInSeconds": 3600})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let at = r.body["expiresAt"].as_i64().unwrap();
    assert!(at >= before + 3_600_000 && at <= now_ms() + 3_600_000);
    let timed = r.body["key"].as_str().unwrap().to_owned();
    index_says(&env.consumers, &timed, Ok(())).await;

    let at = now_ms() + 60_000;
    let r = call(
        &env,
        Method::POST,
        "/v1/apps/shop/keys",
        Some(json!({"expiresAt": at})),
    )
    .await;
    assert_eq!(r.body["expiresAt"], at);

    for bad in [
        json!({"expiresAt": 1000}),
        json!({"expiresInSeconds": 0}),
        json!({"expiresInSeconds": 10, "expiresAt": at}),
        json!({"expiresInSeconds": "soon"}),
        json!({"ttl": 5}),
    ] {
        let r = call(&env, Method::POST, "/v1/apps/shop/keys", Some(bad)).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    }
}

#[tokio::test]
async fn manual_products_make_pending_keys() {
    let env = env().await;
    call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("auto-p", "auto")),
    )
    .await;
    call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("manual-p", "manual")),
    )
    .await;
    call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["auto-p", "manual-p"])),
    )
    .await;
    let r = call(&env, Method::POST, "/v1/apps/shop/keys", None).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["status"], "pending");
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_str().unwrap().to_owned();
    index_says(&env.consumers, &key, Err(Refusal::KeyPending)).await;
    let r = call(
        &env,
        Method::POST,
        &format!("/v1/apps/shop/keys/{id}/approve"),
        None,
    )
    .await;
    assert_eq!(r.body["status"], "approved");
    index_says(&env.consumers, &key, Ok(())).await;
}

#[tokio::test]
async fn authentication() {
    let env = env().await;
    let none = send(&env.router, Method::GET, "/v1/products", None, None, vec![]).await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "Unauthenticated");
    assert_eq!(
        none.headers.get(header::WWW_AUTHENTICATE).unwrap(),
        "Bearer"
    );

    let huge = "x".repeat(64 * 1024);
    for token in [
        "wrong",
        "mgmt-token-for-test",
        "mgmt-token-for-tests-",
        &huge,
    ] {
        let r = send(
            &env.router,
            Method::GET,
            "/v1/products",
            Some(token),
            None,
            vec![],
        )
        .await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "Unauthenticated");
        assert_eq!(r.headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    }
    // Writes too, and unknown routes: nothing is revealed without the token.
    let r = send(
        &env.router,
        Method::POST,
        "/v1/products",
        None,
        Some("application/json"),
        serde_json::to_vec(&product_json("gold", "auto")).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(env
        .consumers
        .store()
        .get_product("gold")
        .await
        .unwrap()
        .is_none());
    let r = send(&env.router, Method::GET, "/v1/nothing", None, None, vec![]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Other schemes are refused.
    let req = Request::get("/v1/products")
        .header(header::AUTHORIZATION, format!("Basic {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let resp = env.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let ok = send(
        &env.router,
        Method::GET,
        "/v1/products",
        Some(TOKEN),
        None,
        vec![],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    // The admin routes beside it are not guarded.
    let r = send(&env.router, Method::GET, "/healthz", None, None, vec![]).await;
    assert_eq!(r.status, StatusCode::OK);

    // Unknown routes and methods under /v1 answer in the API's error shape.
    let r = call(&env, Method::GET, "/v1/nothing/here", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = call(&env, Method::PATCH, "/v1/products/gold", None).await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed");
    assert_eq!(r.headers.get(header::ALLOW).unwrap(), "GET,HEAD,PUT,DELETE");

    let open = env_with(Store::memory(), ApiAuth::Insecure).await;
    let r = send(
        &open.router,
        Method::GET,
        "/v1/products",
        None,
        None,
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn file_objects_cannot_be_written() {
    let env = env().await;
    let checks = [
        (
            Method::POST,
            "/v1/products".to_owned(),
            Some(product_json("file-gold", "auto")),
        ),
        (
            Method::PUT,
            "/v1/products/file-gold".to_owned(),
            Some(product_json("file-gold", "auto")),
        ),
        (Method::DELETE, "/v1/products/file-gold".to_owned(), None),
        (
            Method::POST,
            "/v1/apps".to_owned(),
            Some(app_json("file-app", &["file-gold"])),
        ),
        (
            Method::PUT,
            "/v1/apps/file-app".to_owned(),
            Some(app_json("file-app", &["file-gold"])),
        ),
        (Method::DELETE, "/v1/apps/file-app".to_owned(), None),
        (Method::POST, "/v1/apps/file-app/keys".to_owned(), None),
        (
            Method::POST,
            "/v1/apps/file-app/keys/key_file/revoke".to_owned(),
            None,
        ),
        (
            Method::POST,
            "/v1/apps/file-app/keys/key_file/expire".to_owned(),
            None,
        ),
        (
            Method::DELETE,
            "/v1/apps/file-app/keys/key_file".to_owned(),
            None,
        ),
    ];
    for (method, uri, body) in checks {
        let r = call(&env, method.clone(), &uri, body).await;
        assert_error(&r, StatusCode::CONFLICT, "FileDefined");
        assert!(r.message().contains("configuration file"), "{r:?}");
    }
    let snapshot = env.consumers.store().snapshot().await.unwrap();
    assert!(snapshot.products.is_empty() && snapshot.apps.is_empty());
    // The file key still works.
    index_says(
        &env.consumers,
        FILE_KEY,
        Err(Refusal::NoProductForOperation),
    )
    .await;
    assert!(env
        .consumers
        .index()
        .verify(FILE_KEY, "GET", "/file/x", None, now_ms())
        .is_ok());

    // Readable, without hashes.
    let r = call(&env, Method::GET, "/v1/apps/file-app", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["origin"], "file");
    assert_eq!(r.body["keys"][0]["id"], "key_file");
    assert!(!r.text.contains("sha256:"));
    let r = call(&env, Method::GET, "/v1/apps/file-app/keys/key_file", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status"], "approved");
    assert!(r.body.get("hash").is_none());

    // A store app may reference a file product.
    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("mine", &["file-gold"])),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn bad_input_is_a_clear_400() {
    let env = env().await;

    // Unknown fields, at the top and nested.
    let mut p = product_json("gold", "auto");
    p["bogus"] = json!(1);
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert!(r.message().contains("unknown field `bogus`"), "{r:?}");
    assert_eq!(r.field(), "bogus");
    let mut p = product_json("gold", "auto");
    p["quota"]["burst"] = json!(5);
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "quota.burst", "{r:?}");

    // Wrong types.
    let mut p = product_json("gold", "auto");
    p["quota"]["limit"] = json!("lots");
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "quota.limit");
    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(json!({"name": "a", "developerEmail": "d@example.com", "products": "gold"})),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "products");
    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(json!({"name": 42})),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "name");
    let mut p = product_json("gold", "auto");
    p["approvalType"] = json!("sometimes");
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_eq!(r.field(), "approvalType");

    // Missing required fields.
    let r = call(&env, Method::POST, "/v1/apps", Some(json!({"name": "a"}))).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert!(r.message().contains("developerEmail"), "{r:?}");
    assert_eq!(r.field(), "developerEmail");
    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(json!({"name": "gold", "quota": {"limit": 5}})),
    )
    .await;
    assert_eq!(r.field(), "quota.timeUnit", "{r:?}");

    // Broken JSON, duplicate fields, not an object, no body.
    for raw in [
        "{\"name\": \"gold\"",
        "{\"name\": gold}",
        "not json",
        "{\"name\":\"a\"} {}",
        "{\"name\":\"a\",\"name\":\"b\"}",
        "[]",
        "null",
        "",
    ] {
        let r = call_raw(&env, Method::POST, "/v1/products", raw).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    }
    let r = call_raw(&env, Method::POST, "/v1/products", "{\"name\": \"gold\"").await;
    assert!(r.message().contains("malformed JSON"), "{r:?}");
    let r = call_raw(
        &env,
        Method::POST,
        "/v1/products",
        "{\"name\":\"a\",\"name\":\"b\"}",
    )
    .await;
    assert!(r.message().contains("duplicate field"), "{r:?}");
    assert_eq!(r.field(), "name");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = call_raw(&env, Method::POST, "/v1/products", &deep).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");

    // Not JSON at all.
    let r = send(
        &env.router,
        Method::POST,
        "/v1/products",
        Some(TOKEN),
        Some("text/plain"),
        b"name=gold".to_vec(),
    )
    .await;
    assert_error(
        &r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
    );

    // Names: bad characters, control characters, too long, empty.
    let long = "n".repeat(254);
    for name in ["a b", "a/b", "a\u{1}b", "tab\there", "", long.as_str(), "é"] {
        let r = call(
            &env,
            Method::POST,
            "/v1/products",
            Some(product_json(name, "auto")),
        )
        .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
        assert_eq!(r.field(), "name", "{name:?}: {r:?}");
        assert!(r.message().len() < 400, "messages stay short");
        let r = call(&env, Method::POST, "/v1/apps", Some(app_json(name, &[]))).await;
        assert_eq!(r.field(), "name", "{name:?}: {r:?}");
    }
    let ok = "n".repeat(253);
    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json(&ok, "auto")),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);

    // Names in paths.
    let huge = "k".repeat(10_000);
    for uri in [
        "/v1/products/a%0Ab".to_owned(),
        "/v1/products/a%00b".to_owned(),
        format!("/v1/products/{huge}"),
        format!("/v1/apps/{huge}"),
        format!("/v1/apps/file-app/keys/{huge}"),
        "/v1/apps/file-app/keys/key%01x".to_owned(),
        "/v1/apps/%FF".to_owned(),
    ] {
        let r = call(&env, Method::GET, &uri, None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    }

    // References and values.
    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["file-gold", "no-such-product"])),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "products[1]");
    assert!(r.message().contains("no-such-product"));
    let mut a = app_json("shop", &[]);
    a["developerEmail"] = json!("not-an-email");
    let r = call(&env, Method::POST, "/v1/apps", Some(a)).await;
    assert_eq!(r.field(), "developerEmail");
    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["file-gold", "file-gold"])),
    )
    .await;
    assert_eq!(r.field(), "products[1]");
    let mut a = app_json("shop", &[]);
    a["origin"] = json!("file");
    let r = call(&env, Method::POST, "/v1/apps", Some(a)).await;
    assert_eq!(r.field(), "origin");

    let mut p = product_json("gold", "auto");
    p["quota"]["limit"] = json!(0);
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "quota.limit");
    let mut p = product_json("gold", "auto");
    p["llmTokenQuota"] = json!({"limit": 0, "timeUnit": "day"});
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_eq!(r.field(), "llmTokenQuota.limit");
    let mut p = product_json("gold", "auto");
    p["quota"]["limit"] = json!(-5);
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_eq!(r.field(), "quota.limit");
    for (path, field) in [
        ("no-slash", "operations[1].path"),
        ("/a/**/b", "operations[1].path"),
        ("/{open", "operations[1].path"),
        ("/a\nb", "operations[1].path"),
    ] {
        let mut p = product_json("gold", "auto");
        p["operations"]
            .as_array_mut()
            .unwrap()
            .push(json!({"path": path}));
        let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
        assert_eq!(r.field(), field, "{path:?}: {r:?}");
    }
    let mut p = product_json("gold", "auto");
    p["operations"][0]["methods"] = json!(["GET", "NOT A METHOD"]);
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_eq!(r.field(), "operations[0].methods[1]");

    // Nothing of the above was stored.
    let names: Vec<String> = env
        .consumers
        .store()
        .snapshot()
        .await
        .unwrap()
        .products
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, [ok]);
}

#[tokio::test]
async fn huge_bodies_are_413() {
    let env = env().await;
    let mut p = product_json("gold", "auto");
    p["description"] = json!("x".repeat(2 << 20));
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    let r = call_raw(&env, Method::POST, "/v1/apps/x/keys", &" ".repeat(2 << 20)).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    // Under the limit but over the field's own bound: 400.
    let mut p = product_json("gold", "auto");
    p["description"] = json!("x".repeat(100_000));
    let r = call(&env, Method::POST, "/v1/products", Some(p)).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "description");
}

/// A store that fails every call, as a Redis that is down (or holds corrupt data) would.
#[derive(Debug)]
struct BrokenStore {
    corrupt: bool,
    changes: broadcast::Sender<Change>,
}

impl BrokenStore {
    fn new(corrupt: bool) -> Self {
        Self {
            corrupt,
            changes: broadcast::channel(8).0,
        }
    }

    fn fail(&self) -> StoreError {
        if self.corrupt {
            StoreError::Corrupt {
                kind: "app",
                name: "x".into(),
                message: "unexpected bytes".into(),
            }
        } else {
            StoreError::Unavailable("connection refused".into())
        }
    }
}

#[async_trait]
impl Backend for BrokenStore {
    fn kind(&self) -> &'static str {
        "broken"
    }
    async fn get(&self, _: Table<'_>, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Err(self.fail())
    }
    async fn scan(&self, _: &[Table<'_>], _: Visit) -> Result<(), StoreError> {
        Err(self.fail())
    }
    async fn put(&self, _: Table<'_>, _: &str, _: Vec<u8>, _: Cond) -> Result<Put, StoreError> {
        Err(self.fail())
    }
    async fn delete(&self, _: Table<'_>, _: &str) -> Result<bool, StoreError> {
        Err(self.fail())
    }
    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
    async fn announce(&self, _: Change) {}
    async fn count(&self, _: &[Ask]) -> Result<Vec<Option<Decision>>, StoreError> {
        Err(self.fail())
    }
    async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        Err(self.fail())
    }
    async fn save_counters(&self, _: Vec<(u128, Vec<u8>)>, _: Keep) -> Result<(), StoreError> {
        Err(self.fail())
    }
    async fn cache_get(&self, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Err(self.fail())
    }
    async fn cache_put(&self, _: &str, _: Vec<u8>, _: Duration) -> Result<(), StoreError> {
        Err(self.fail())
    }

    async fn tally_add(
        &self,
        _: &[tollgate::store::TallyAdd],
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(self.fail())
    }

    async fn tally_read(&self, _: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        Err(self.fail())
    }
}

#[tokio::test]
async fn a_failing_store_is_503_and_corrupt_data_500() {
    let env = env_with(
        Store::new(Arc::new(BrokenStore::new(false))),
        ApiAuth::Bearer(TOKEN.into()),
    )
    .await;
    let requests = [
        (Method::GET, "/v1/products", None),
        (Method::GET, "/v1/products/gold", None),
        (
            Method::POST,
            "/v1/products",
            Some(product_json("gold", "auto")),
        ),
        (
            Method::PUT,
            "/v1/products/gold",
            Some(product_json("gold", "auto")),
        ),
        (Method::DELETE, "/v1/products/gold", None),
        (Method::GET, "/v1/apps", None),
        (Method::GET, "/v1/apps/shop", None),
        (
            Method::POST,
            "/v1/apps",
            Some(app_json("shop", &["file-gold"])),
        ),
        (Method::POST, "/v1/apps/shop/keys", None),
        (Method::POST, "/v1/apps/shop/keys/key_1/revoke", None),
    ];
    for (method, uri, body) in requests {
        let r = call(&env, method.clone(), uri, body).await;
        assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "Unavailable");
        assert!(r.message().contains("unavailable"), "{method} {uri}: {r:?}");
        assert_eq!(r.headers.get(header::RETRY_AFTER).unwrap(), "1");
    }
    // File objects are still readable without the store.
    let r = call(&env, Method::GET, "/v1/apps/file-app", None).await;
    assert_eq!(r.status, StatusCode::OK);

    let env = env_with(
        Store::new(Arc::new(BrokenStore::new(true))),
        ApiAuth::Bearer(TOKEN.into()),
    )
    .await;
    let r = call(&env, Method::GET, "/v1/apps/shop", None).await;
    assert_error(&r, StatusCode::INTERNAL_SERVER_ERROR, "Internal");
    assert!(r.message().contains("unreadable"), "{r:?}");
}

#[tokio::test]
async fn kvm_entries_crud_secrets_file_entries_and_odd_keys() {
    let env = env().await;
    let base = "/v1/kvms/creds/entries";
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "api key/ü", "value": "v1"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(
        r.headers.get(header::LOCATION).unwrap(),
        "/v1/kvms/creds/entries/api%20key%2F%C3%BC"
    );
    assert_eq!(r.body["origin"], "api");
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "api key/ü", "value": "v2"})),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "AlreadyExists");
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "file-key", "value": "x"})),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "FileDefined");
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "token", "value": "hunter2", "secret": true})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["value"], Value::Null, "secrets are never returned");
    assert_eq!(r.body["secret"], true);

    let r = call(&env, Method::GET, base, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let keys: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["api key/ü", "file-key", "file-secret", "token"]);
    assert!(!r.text.contains("hunter2"), "{}", r.text);
    let r = call(&env, Method::GET, &format!("{base}?pageSize=3"), None).await;
    let token = r.body["nextPageToken"].as_str().unwrap().to_owned();
    let r = call(
        &env,
        Method::GET,
        &format!("{base}?pageSize=3&pageToken={token}"),
        None,
    )
    .await;
    assert_eq!(r.body["items"][0]["key"], "token");
    assert!(r.body.get("nextPageToken").is_none());

    let r = call(
        &env,
        Method::GET,
        &format!("{base}/api%20key%2F%C3%BC"),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["value"].as_str()),
        (StatusCode::OK, Some("v1"))
    );
    let r = call(&env, Method::GET, &format!("{base}/file-secret"), None).await;
    assert_eq!(r.body["value"], Value::Null);
    assert_eq!(r.body["origin"], "file");
    let r = call(
        &env,
        Method::PUT,
        &format!("{base}/new"),
        Some(json!({"value": "n"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &env,
        Method::PUT,
        &format!("{base}/new"),
        Some(json!({"value": "n2"})),
    )
    .await;
    assert_eq!(r.body["value"], "n2");
    let r = call(
        &env,
        Method::PUT,
        &format!("{base}/file-key"),
        Some(json!({"value": "x"})),
    )
    .await;
    assert_error(&r, StatusCode::CONFLICT, "FileDefined");
    let r = call(&env, Method::DELETE, &format!("{base}/file-key"), None).await;
    assert_error(&r, StatusCode::CONFLICT, "FileDefined");
    let r = call(&env, Method::DELETE, &format!("{base}/new"), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = call(&env, Method::DELETE, &format!("{base}/new"), None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");

    // Bad names, keys and bodies.
    let r = call(&env, Method::GET, "/v1/kvms/bad%2Fname/entries", None).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "map");
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "a\nb", "value": "x"})),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "key");
    let r = call(
        &env,
        Method::GET,
        &format!("{base}/{}", "k".repeat(600)),
        None,
    )
    .await;
    assert_eq!(r.field(), "key");
    // Values over 64 KiB: 400 naming the field and the limit, on create and on put.
    let big = "v".repeat(tollgate::kvm::MAX_VALUE_BYTES + 1);
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "big", "value": big})),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "value");
    assert!(r.text.contains("at most 65536 bytes"), "{}", r.text);
    let r = call(
        &env,
        Method::PUT,
        &format!("{base}/big"),
        Some(json!({"value": big})),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    assert_eq!(r.field(), "value");
    let r = call(&env, Method::GET, &format!("{base}/big"), None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = call(
        &env,
        Method::POST,
        base,
        Some(json!({"key": "k", "value": "x", "extra": 1})),
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "InvalidArgument");
    let r = call(&env, Method::PATCH, base, None).await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed");
    let r = send(&env.router, Method::GET, base, None, None, Vec::new()).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "Unauthenticated");

    // A failing store is 503; file entries stay readable.
    let env = env_with(
        Store::new(Arc::new(BrokenStore::new(false))),
        ApiAuth::Bearer(TOKEN.into()),
    )
    .await;
    let r = call(&env, Method::GET, base, None).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "Unavailable");
    let r = call(&env, Method::GET, &format!("{base}/file-key"), None).await;
    assert_eq!(r.body["value"], "fv");
}

#[tokio::test]
async fn a_store_object_shadowed_by_a_file_can_be_deleted() {
    let env = env().await;
    // Made through the API before a configuration file defined the same names.
    let mut p = file_product();
    p.description = "older, from the API".into();
    p.origin = Origin::Api;
    let mut a = file_app();
    a.keys.clear();
    a.origin = Origin::Api;
    env.consumers
        .store()
        .put_product(&p, Write::Create)
        .await
        .unwrap();
    env.consumers
        .store()
        .put_app(&a, Write::Create)
        .await
        .unwrap();
    let r = call(&env, Method::GET, "/v1/products/file-gold", None).await;
    assert_eq!(r.body["origin"], "file", "the file's wins: {r:?}");

    // What the shadowing warning tells the operator to do works: the store's copy goes,
    // the file's stays and keeps serving.
    for (uri, kind) in [
        ("/v1/apps/file-app", "apps"),
        ("/v1/products/file-gold", "products"),
    ] {
        let r = call(&env, Method::DELETE, uri, None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{kind}: {r:?}");
        let r = call(&env, Method::GET, uri, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["origin"], "file");
        // Nothing left to delete but the file's: 409 as before.
        let r = call(&env, Method::DELETE, uri, None).await;
        assert_error(&r, StatusCode::CONFLICT, "FileDefined");
    }
    let snapshot = env.consumers.store().snapshot().await.unwrap();
    assert!(snapshot.products.is_empty() && snapshot.apps.is_empty());
    assert!(env
        .consumers
        .index()
        .verify(FILE_KEY, "GET", "/file/x", None, now_ms())
        .is_ok());
}

#[tokio::test]
async fn products_and_apps_show_their_revision() {
    let env = env().await;
    let r = call(
        &env,
        Method::POST,
        "/v1/products",
        Some(product_json("gold", "auto")),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["revision"], 0, "{r:?}");
    let r = call(
        &env,
        Method::PUT,
        "/v1/products/gold",
        Some(product_json("gold", "auto")),
    )
    .await;
    assert_eq!(r.body["revision"], 1, "{r:?}");
    assert_eq!(
        call(&env, Method::GET, "/v1/products/gold", None)
            .await
            .body["revision"],
        1
    );

    let r = call(
        &env,
        Method::POST,
        "/v1/apps",
        Some(app_json("shop", &["gold"])),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["revision"], 0, "{r:?}");
    let r = call(
        &env,
        Method::PUT,
        "/v1/apps/shop",
        Some(app_json("shop", &["gold"])),
    )
    .await;
    assert_eq!(r.body["revision"], 1, "the app as written: {r:?}");
    let r = call(&env, Method::POST, "/v1/apps/shop/keys", None).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = call(&env, Method::GET, "/v1/apps/shop", None).await;
    assert_eq!(r.body["revision"], 2, "{r:?}");
    let (items, _) = list_all(&env, "/v1/apps", 10).await;
    let shop = items.iter().find(|a| a["name"] == "shop").unwrap();
    assert_eq!(shop["revision"], 2);
    let file = items.iter().find(|a| a["name"] == "file-app").unwrap();
    assert_eq!(file["revision"], 0);
}
