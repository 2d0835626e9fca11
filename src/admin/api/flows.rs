//! `GET /v1/flows`: the running configuration's flows as tollgate compiled them (match,
//! steps in order with their policy types and conditions) and its generation, read-only.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::auth::{authenticate, Guard};
use super::errors::{wrong_method, ApiResult};
use super::request::BODY_LIMIT;
use crate::admin::{ApiAuth, ConfigView};

pub fn router(view: Arc<dyn ConfigView>, auth: ApiAuth) -> Router {
    let guard = Arc::new(Guard::new(&auth));
    Router::new()
        .route("/v1/flows", get(list_flows))
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(guard, authenticate))
        .with_state(view)
}

async fn list_flows(State(view): State<Arc<dyn ConfigView>>) -> ApiResult {
    Ok(Json(serde_json::json!({
        "generation": view.generation(),
        "flows": view.flows(),
    }))
    .into_response())
}
