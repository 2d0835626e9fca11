//! The admin HTTP server: liveness, readiness and metrics, and the management API under
//! `/v1/` ([`api`]).

pub mod api;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::consumer::service::Consumers;
use crate::server::Shared;
use crate::telemetry::METRICS;

pub use api::ApiAuth;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Adds the management API (`/v1/…`, guarded by `auth`) to an admin router.
pub fn with_api(router: Router, consumers: Arc<Consumers>, auth: ApiAuth) -> Router {
    router.merge(api::router(consumers, auth))
}

/// Adds the refusal of a closed management API (no token given) to an admin router.
pub fn with_closed_api(router: Router) -> Router {
    router.merge(api::closed_router())
}

/// Adds the key-value map routes of the management API (`/v1/kvms/…`, guarded by `auth`).
pub fn with_kvm_api(
    router: Router,
    consumers: Arc<Consumers>,
    kvms: Arc<crate::kvm::Kvms>,
    auth: ApiAuth,
) -> Router {
    router.merge(api::kvm::router(consumers, kvms, auth))
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.is_ready() {
        (
            StatusCode::OK,
            format!(
                "ready: configuration generation {}\n",
                s.config.generation()
            ),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        METRICS.render(),
    )
}
