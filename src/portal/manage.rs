//! The portal's management API routes on the admin port (behind the management API's bearer
//! token): `GET /v1/developers[/{email}]`, `POST /v1/developers/{email}/approve` and
//! `/suspend`, `PUT /v1/developers/{email}/products` (`{"products": [...]}`: the private
//! products this developer may see). Password hashes are never shown.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use super::accounts::{AccountError, Accounts, Developer, DeveloperStatus};

fn view(d: &Developer) -> serde_json::Value {
    json!({
        "email": d.email,
        "name": d.name,
        "status": d.status,
        "products": d.products,
        "createdAt": d.created_at,
        "revision": d.revision,
        "signIn": if d.password_hash.is_some() { "password" } else { "oidc" },
    })
}

fn error(e: AccountError) -> Response {
    let (status, code) = match &e {
        AccountError::NotFound => (StatusCode::NOT_FOUND, "NotFound"),
        AccountError::Exists => (StatusCode::CONFLICT, "AlreadyExists"),
        AccountError::Conflict => (StatusCode::CONFLICT, "FailedPrecondition"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
    };
    (
        status,
        Json(json!({"error": {"code": code, "message": e.to_string()}})),
    )
        .into_response()
}

fn invalid(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"code": "InvalidArgument", "message": msg}})),
    )
        .into_response()
}

async fn list(State(a): State<Accounts>) -> Response {
    match a.developers().await {
        Ok(v) => {
            Json(json!({"developers": v.iter().map(view).collect::<Vec<_>>()})).into_response()
        }
        Err(e) => error(e),
    }
}

async fn one(State(a): State<Accounts>, Path(email): Path<String>) -> Response {
    match a.developer(&email).await {
        Ok(Some(d)) => Json(view(&d)).into_response(),
        Ok(None) => error(AccountError::NotFound),
        Err(e) => error(e),
    }
}

async fn set_status(a: &Accounts, email: &str, status: DeveloperStatus) -> Response {
    match a.update(email, |d| d.status = status).await {
        Ok(d) => {
            tracing::info!(developer = %d.email, ?status, "developer status changed through the management API");
            Json(view(&d)).into_response()
        }
        Err(e) => error(e),
    }
}

async fn approve(State(a): State<Accounts>, Path(email): Path<String>) -> Response {
    set_status(&a, &email, DeveloperStatus::Active).await
}

async fn suspend(State(a): State<Accounts>, Path(email): Path<String>) -> Response {
    set_status(&a, &email, DeveloperStatus::Suspended).await
}

async fn grant(State(a): State<Accounts>, Path(email): Path<String>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        products: Vec<String>,
    }
    let Ok(b) = serde_json::from_slice::<Body>(&body) else {
        return invalid("expected {\"products\": [\"name\", ...]}");
    };
    if b.products.len() > 10_000 || b.products.iter().any(|p| p.is_empty() || p.len() > 253) {
        return invalid("products: 1-253 character names, at most 10000");
    }
    match a.update(&email, |d| d.products = b.products.clone()).await {
        Ok(d) => Json(view(&d)).into_response(),
        Err(e) => error(e),
    }
}

/// The routes, unguarded: mount them with [`crate::admin::api::guarded`].
pub fn router(accounts: Accounts) -> Router {
    Router::new()
        .route("/v1/developers", get(list))
        .route("/v1/developers/{email}", get(one))
        .route("/v1/developers/{email}/approve", post(approve))
        .route("/v1/developers/{email}/suspend", post(suspend))
        .route("/v1/developers/{email}/products", put(grant))
        .with_state(accounts)
}

/// The management routes guarded by the management API's token.
pub fn guarded_router(accounts: Accounts, auth: &crate::admin::ApiAuth) -> Router {
    crate::admin::api::guarded(router(accounts), auth)
}
