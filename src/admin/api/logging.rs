//! `/v1/logging`: the log filter in force, read and changed at run time (`RUST_LOG` syntax,
//! e.g. `info,tollgate::store=debug`). A change applies to this replica only and lasts until
//! it restarts; the filter it starts with is still `RUST_LOG`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::errors::{ApiError, ApiResult};
use super::request::{decode, required_object};
use crate::telemetry::{self, LogFilterError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    filter: String,
}

pub(super) async fn get_logging() -> ApiResult {
    let filter = telemetry::log_filter().ok_or_else(not_installed)?;
    Ok(Json(serde_json::json!({ "filter": filter })).into_response())
}

pub(super) async fn put_logging(
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: Body = decode(required_object(&headers, body)?)?;
    telemetry::set_log_filter(&body.filter).map_err(|e| match e {
        LogFilterError::Invalid(..) => ApiError::InvalidArgument {
            message: e.to_string(),
            field: Some("filter".into()),
        },
        LogFilterError::NotInstalled => not_installed(),
    })?;
    get_logging().await
}

fn not_installed() -> ApiError {
    ApiError::FailedPrecondition("this process did not install its own logging".into())
}
