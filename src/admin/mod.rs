//! The admin HTTP server: liveness, readiness and metrics, and the management API under
//! `/v1/` ([`api`]).

pub mod api;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::consumer::service::Consumers;
use crate::telemetry::METRICS;

pub use api::ApiAuth;

/// Bounds of the admin (and metrics) HTTP server, so a slow or greedy client cannot starve
/// the health checks and the management API.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A connection whose request headers have not all arrived within this is closed.
    pub header_read_timeout: Duration,
    /// Connections served at once; one more is answered 503 and closed at once.
    pub max_connections: usize,
    /// A connection open longer is asked to close after its current request, and dropped
    /// `header_read_timeout` later (bounds slow bodies and idle keep-alive connections).
    pub max_connection_age: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 128,
            max_connection_age: Duration::from_secs(60),
        }
    }
}

/// What a connection past the cap gets before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 38\r\nconnection: close\r\n\r\ntoo many admin connections; try again\n";

/// Serves `router` over HTTP/1.1 on `listener` within `limits` until `stop` turns true.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HttpLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|v| *v).await; } => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Refused without waiting on the client: a non-blocking write into an empty
            // socket buffer, then close.
            let _ = tcp.try_write(OVER_CAPACITY);
            tracing::debug!(
                max = limits.max_connections,
                "admin connection refused: cap reached"
            );
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = tokio::time::sleep(limits.max_connection_age) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_read_timeout, conn).await;
        });
    }
}

/// What `/readyz` reports: whether the process serves, and which configuration.
pub trait Readiness: Send + Sync + 'static {
    fn is_ready(&self) -> bool;
    /// The running configuration's generation.
    fn generation(&self) -> u64;
}

/// What the management API and the admin page read of the running configuration.
pub trait ConfigView: Send + Sync + 'static {
    /// Every flow, described (`config::snapshot::Flow::describe`).
    fn flows(&self) -> Vec<serde_json::Value>;
    fn generation(&self) -> u64;
}

/// Adds `GET /v1/usage` (guarded by `auth`) to an admin router.
pub fn with_usage_api(router: Router, ledger: Arc<crate::usage::Ledger>, auth: ApiAuth) -> Router {
    router.merge(api::usage::router(ledger, auth))
}

/// Adds `GET /v1/flows` (guarded by `auth`) to an admin router.
pub fn with_flows_api(router: Router, view: Arc<dyn ConfigView>, auth: ApiAuth) -> Router {
    router.merge(api::flows::router(view, auth))
}

/// The admin page: one self-contained HTML document (no external assets) that reads the
/// management API from the browser with the token the user gives it.
const UI_PAGE: &str = include_str!("ui/index.html");

async fn ui_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing outside this origin: scripts and styles are inline, data comes from /v1/.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        UI_PAGE,
    )
}

/// Liveness, readiness and metrics.
pub fn router(readiness: Arc<dyn Readiness>) -> Router {
    Router::new()
        .route("/ui", get(ui_page))
        .route("/ui/", get(ui_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

/// Adds the management API (`/v1/…`, guarded by `auth`) to an admin router.
pub fn with_api(router: Router, consumers: Arc<Consumers>, auth: ApiAuth) -> Router {
    router.merge(api::router(consumers, auth))
}

/// Adds the refusal of a closed management API (no token given) to an admin router.
pub fn with_closed_api(router: Router) -> Router {
    router.merge(api::closed_router())
}

/// Adds the monetization routes of the management API (rate plans, accounts, ledgers,
/// statements, subscriptions; guarded by `auth`).
pub fn with_mint_api(
    router: Router,
    services: &crate::services::Services,
    auth: ApiAuth,
) -> Router {
    router.merge(api::mint::router(
        services.consumers.clone(),
        services.monetization.clone(),
        services.counters.clone(),
        auth,
    ))
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

async fn readyz(State(s): State<Arc<dyn Readiness>>) -> impl IntoResponse {
    if s.is_ready() {
        (
            StatusCode::OK,
            format!("ready: configuration generation {}\n", s.generation()),
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
