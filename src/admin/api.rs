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
//! One module per resource (`products`, `apps`, `keys`, `kvm`, `spend`: cost-budget
//! counters), over what they share:
//! `auth` (the bearer guard), `errors` (every failure and its answer), `request` (strict
//! JSON, path parameters, name and text checks), `response` (pages, 201s) and `state` (the
//! handlers' state: lookups and read-modify-write of products and apps).

mod apps;
mod auth;
mod errors;
pub mod flows;
mod keys;
pub mod kvm;
mod logging;
pub mod mint;
mod products;
mod request;
mod response;
mod spend;
mod state;
pub mod usage;

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
use spend::{app_spend, product_spend};
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
        .route("/v1/apps/{name}/spend", get(app_spend))
        .route("/v1/products/{name}/spend", get(product_spend))
        .route("/v1/apps/{name}/keys", get(list_keys).post(create_key))
        .route("/v1/apps/{name}/keys/{id}", get(get_key).delete(delete_key))
        .route("/v1/apps/{name}/keys/{id}/revoke", post(revoke_key))
        .route("/v1/apps/{name}/keys/{id}/approve", post(approve_key))
        .route("/v1/apps/{name}/keys/{id}/expire", post(expire_key))
        .route(
            "/v1/logging",
            get(logging::get_logging).put(logging::put_logging),
        )
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

    use axum::http::StatusCode;
    use serde_json::Value;

    use super::errors::WRITE_ATTEMPTS;
    use super::*;
    use crate::consumer::{hash_key, ApiKey, App, AppStatus, KeyStatus, Origin};
    use crate::store::Table;
    use crate::store::{StoreError, Write};

    /// A memory backend where another replica updates the app (revoking its first key)
    /// right before each of this replica's next `interfere` app updates lands.
    #[derive(Debug)]
    struct Interfering {
        inner: crate::store::Store,
        interfere: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::store::Backend for Interfering {
        fn kind(&self) -> &'static str {
            "memory"
        }
        async fn get(&self, t: Table<'_>, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.backend().get(t, k).await
        }
        async fn scan(
            &self,
            ts: &[Table<'_>],
            v: crate::store::backend::Visit,
        ) -> Result<(), StoreError> {
            self.inner.backend().scan(ts, v).await
        }
        async fn put(
            &self,
            t: Table<'_>,
            k: &str,
            v: Vec<u8>,
            c: crate::store::Cond,
        ) -> Result<crate::store::Put, StoreError> {
            use std::sync::atomic::Ordering;
            if t == Table::Apps
                && matches!(c, crate::store::Cond::Revision(_))
                && self
                    .interfere
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                let mut other = self.inner.get_app(k).await?.expect("app");
                other.keys[0].status = KeyStatus::Revoked;
                other
                    .attributes
                    .insert("other-writes".into(), format!("{}", other.revision + 1));
                self.inner.put_app(&other, Write::Update).await?;
            }
            self.inner.backend().put(t, k, v, c).await
        }
        async fn delete(&self, t: Table<'_>, k: &str) -> Result<bool, StoreError> {
            self.inner.backend().delete(t, k).await
        }
        fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::store::Change> {
            self.inner.subscribe()
        }
        async fn announce(&self, c: crate::store::Change) {
            self.inner.backend().announce(c).await
        }
        async fn count(
            &self,
            a: &[crate::ratelimit::Ask],
        ) -> Result<Vec<Option<crate::ratelimit::Decision>>, StoreError> {
            self.inner.backend().count(a).await
        }
        async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
            self.inner.backend().load_counters().await
        }
        async fn save_counters(
            &self,
            r: Vec<(u128, Vec<u8>)>,
            k: crate::store::backend::Keep,
        ) -> Result<(), StoreError> {
            self.inner.backend().save_counters(r, k).await
        }
        async fn cache_get(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.backend().cache_get(k).await
        }
        async fn cache_put(
            &self,
            k: &str,
            v: Vec<u8>,
            ttl: std::time::Duration,
        ) -> Result<(), StoreError> {
            self.inner.backend().cache_put(k, v, ttl).await
        }

        async fn tally_add(
            &self,
            adds: &[crate::store::TallyAdd],
            ttl: std::time::Duration,
        ) -> Result<(), StoreError> {
            self.inner.backend().tally_add(adds, ttl).await
        }

        async fn tally_read(&self, b: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
            self.inner.backend().tally_read(b).await
        }
    }

    async fn interfered(times: usize) -> (crate::store::Store, Router) {
        let backend = Arc::new(Interfering {
            inner: crate::store::Store::memory(),
            interfere: Default::default(),
        });
        let store = crate::store::Store::new(backend.clone());
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
        backend
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
        let (store, router) = interfered(usize::MAX).await;
        let (status, body) = create_key_on(router).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "FailedPrecondition");
        let app = store.get_app("a").await.unwrap().unwrap();
        assert_eq!(app.keys.len(), 1);
        assert_eq!(app.revision, WRITE_ATTEMPTS as u64);
    }
}
