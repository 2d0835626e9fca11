//! The management API under `/v1/` on the admin port: API products, apps and their keys.
//!
//! Every route requires `Authorization: Bearer <token>` (compared in constant time) unless the
//! server was started with an explicit insecure flag. Bodies are JSON (1 MiB at most), parsed
//! strictly: unknown fields, duplicate fields and wrong types are refused with a 400 naming
//! the field. Config-file objects are listed beside store objects but can never be written
//! through the API (409 `FileDefined`). Every write goes through the [`Store`](crate::store::Store)
//! and is answered only once the store acknowledged it. Keys are generated here, shown in
//! clear once (in the 201 of their creation), and stored only as their hash.
//!
//! `docs/management-api.yaml` describes these routes (OpenAPI 3.1).
//!
//! One module per resource (`products`, `apps`, `keys`, `kvm`), over what they share:
//! `auth` (the bearer guard), `errors` (every failure and its answer), `request` (strict
//! JSON, path parameters, name and text checks), `response` (pages, 201s) and `state` (the
//! handlers' state: lookups and read-modify-write of products and apps).

mod apps;
mod auth;
mod errors;
mod keys;
pub mod kvm;
mod products;
mod request;
mod response;
mod state;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{any, get, post};
use axum::Router;
use tokio::sync::Mutex;

pub use auth::ApiAuth;
pub use errors::ApiError;
pub use request::BODY_LIMIT;
pub use response::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

use crate::consumer::service::Consumers;
use apps::{create_app, delete_app, get_app, list_apps, put_app};
use auth::{authenticate, Guard};
use errors::wrong_method;
use keys::{approve_key, create_key, delete_key, expire_key, get_key, list_keys, revoke_key};
use products::{create_product, delete_product, get_product, list_products, put_product};
use state::Api;

/// The management API's routes (all under `/v1/`), state included, ready to be merged into
/// the admin router.
pub fn router(consumers: Arc<Consumers>, auth: ApiAuth) -> Router {
    let guard = Arc::new(Guard::new(&auth));
    let state = Api {
        consumers,
        write: Arc::new(Mutex::new(())),
    };
    Router::new()
        .route("/v1/products", get(list_products).post(create_product))
        .route(
            "/v1/products/{name}",
            get(get_product).put(put_product).delete(delete_product),
        )
        .route("/v1/apps", get(list_apps).post(create_app))
        .route(
            "/v1/apps/{name}",
            get(get_app).put(put_app).delete(delete_app),
        )
        .route("/v1/apps/{name}/keys", get(list_keys).post(create_key))
        .route("/v1/apps/{name}/keys/{id}", get(get_key).delete(delete_key))
        .route("/v1/apps/{name}/keys/{id}/revoke", post(revoke_key))
        .route("/v1/apps/{name}/keys/{id}/approve", post(approve_key))
        .route("/v1/apps/{name}/keys/{id}/expire", post(expire_key))
        .method_not_allowed_fallback(wrong_method)
        .route("/v1", any(unknown_route))
        .route("/v1/", any(unknown_route))
        .route("/v1/{*rest}", any(unknown_route))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(guard, authenticate))
        .with_state(state)
}

/// The `/v1/` routes when no token was given: every call is refused with a 404 that says
/// how to open the API, so a script against a closed API fails clearly, not with an empty
/// 404 that looks like a wrong URL.
pub fn closed_router() -> Router {
    async fn closed() -> ApiError {
        ApiError::NotFound(
            "the management API is closed: start tollgate with --admin-token-file or --admin-token-env (or --admin-insecure)".into(),
        )
    }
    Router::new()
        .route("/v1", any(closed))
        .route("/v1/", any(closed))
        .route("/v1/{*rest}", any(closed))
}

async fn unknown_route() -> ApiError {
    ApiError::NotFound("no such management API route".into())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::StatusCode;
    use serde_json::Value;

    use super::errors::WRITE_ATTEMPTS;
    use super::*;
    use crate::consumer::{hash_key, ApiKey, ApiProduct, App, AppStatus, KeyStatus, Origin};
    use crate::store::{StoreError, Write};

    /// A memory store where another replica updates the app (revoking its first key) right
    /// before each of this replica's next `interfere` app updates lands.
    #[derive(Debug)]
    struct Interfering {
        inner: crate::store::memory::MemoryStore,
        interfere: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::store::Store for Interfering {
        fn kind(&self) -> &'static str {
            "memory"
        }
        async fn snapshot(&self) -> Result<crate::store::Contents, StoreError> {
            self.inner.snapshot().await
        }
        async fn get_product(&self, name: &str) -> Result<Option<ApiProduct>, StoreError> {
            self.inner.get_product(name).await
        }
        async fn put_product(&self, p: &ApiProduct, mode: Write) -> Result<(), StoreError> {
            self.inner.put_product(p, mode).await
        }
        async fn delete_product(&self, name: &str) -> Result<(), StoreError> {
            self.inner.delete_product(name).await
        }
        async fn get_app(&self, name: &str) -> Result<Option<App>, StoreError> {
            self.inner.get_app(name).await
        }
        async fn put_app(&self, app: &App, mode: Write) -> Result<(), StoreError> {
            use std::sync::atomic::Ordering;
            if mode == Write::Update
                && self
                    .interfere
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                let mut other = self.inner.get_app(&app.name).await?.expect("app");
                other.keys[0].status = KeyStatus::Revoked;
                other
                    .attributes
                    .insert("other-writes".into(), format!("{}", other.revision + 1));
                self.inner.put_app(&other, Write::Update).await?;
            }
            self.inner.put_app(app, mode).await
        }
        async fn delete_app(&self, name: &str) -> Result<(), StoreError> {
            self.inner.delete_app(name).await
        }
        fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::store::Change> {
            self.inner.subscribe()
        }
        async fn get_kvm_entry(
            &self,
            map: &str,
            key: &str,
        ) -> Result<Option<crate::kvm::KvmEntry>, StoreError> {
            self.inner.get_kvm_entry(map, key).await
        }
        async fn put_kvm_entry(
            &self,
            map: &str,
            key: &str,
            entry: &crate::kvm::KvmEntry,
            mode: Option<Write>,
        ) -> Result<(), StoreError> {
            self.inner.put_kvm_entry(map, key, entry, mode).await
        }
        async fn delete_kvm_entry(&self, map: &str, key: &str) -> Result<(), StoreError> {
            self.inner.delete_kvm_entry(map, key).await
        }
        async fn list_kvm_entries(
            &self,
            map: &str,
        ) -> Result<BTreeMap<String, crate::kvm::KvmEntry>, StoreError> {
            self.inner.list_kvm_entries(map).await
        }
    }

    async fn interfered(times: usize) -> (Arc<Interfering>, Router) {
        use crate::store::Store as _;
        let store = Arc::new(Interfering {
            inner: Default::default(),
            interfere: Default::default(),
        });
        let app = App {
            name: "a".into(),
            developer_email: "dev@example.com".into(),
            status: AppStatus::Approved,
            products: vec![],
            keys: vec![ApiKey {
                id: "key_first".into(),
                hash: hash_key("first-key-0123456789"),
                status: KeyStatus::Approved,
                expires_at: None,
                created_at: 0,
            }],
            attributes: Default::default(),
            origin: Origin::Api,
            revision: 0,
        };
        store.put_app(&app, Write::Create).await.unwrap();
        store
            .interfere
            .store(times, std::sync::atomic::Ordering::SeqCst);
        let consumers = Consumers::new(store.clone());
        (store, router(consumers, ApiAuth::Insecure))
    }

    async fn create_key_on(router: Router) -> (StatusCode, Value) {
        use tower::ServiceExt;
        let resp = router
            .oneshot(
                axum::http::Request::post("/v1/apps/a/keys")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// Another replica revokes a key while this one adds a key: the add is redone on the
    /// fresh app, so the revocation stays (it used to be overwritten by the stale copy).
    #[tokio::test]
    async fn a_concurrent_write_is_kept_not_overwritten() {
        use crate::store::Store as _;
        let (store, router) = interfered(2).await;
        let (status, body) = create_key_on(router).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let app = store.get_app("a").await.unwrap().unwrap();
        assert_eq!(app.keys.len(), 2);
        assert_eq!(app.keys[0].status, KeyStatus::Revoked);
        assert_eq!(app.keys[1].id, body["id"].as_str().unwrap());
        assert_eq!(app.attributes["other-writes"], "2");
        assert_eq!(app.revision, 3);
    }

    /// A write that loses every round answers 409 and changes nothing of its own.
    #[tokio::test]
    async fn a_write_that_keeps_losing_is_a_409() {
        use crate::store::Store as _;
        let (store, router) = interfered(usize::MAX).await;
        let (status, body) = create_key_on(router).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "FailedPrecondition");
        let app = store.get_app("a").await.unwrap().unwrap();
        assert_eq!(app.keys.len(), 1);
        assert_eq!(app.revision, WRITE_ATTEMPTS as u64);
    }
}
