//! `GET /v1/usage`: requests, errors, tokens and cost per app, product or developer per hour
//! or day, added up over every replica (see `crate::usage`). JSON, or CSV with
//! `format=csv` or `Accept: text/csv`.
//!
//! Query: `by` = app (default), product or developer; `granularity` = hour (default) or
//! day; `from` / `to` = RFC 3339 times or Unix seconds (default: the last 24 hours, or the
//! last 30 days by day); `name` = one app, product or developer.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::auth::{authenticate, Guard};
use super::errors::{wrong_method, ApiError, ApiResult};
use super::request::BODY_LIMIT;
use crate::admin::ApiAuth;
use crate::usage::{Dim, Granularity, Ledger, Query, ReportError};

pub fn router(ledger: Arc<Ledger>, auth: ApiAuth) -> Router {
    let guard = Arc::new(Guard::new(&auth));
    Router::new()
        .route("/v1/usage", get(usage))
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(guard, authenticate))
        .with_state(ledger)
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::InvalidArgument {
        message,
        field: Some(field.to_owned()),
    }
}

/// An RFC 3339 time or Unix seconds, as Unix milliseconds.
fn time(field: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(secs) = v.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| invalid(field, format!("`{field}` is out of range")));
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            invalid(
                field,
                format!(
                    "`{field}` must be an RFC 3339 time (2026-12-07T14:00:00Z) or Unix seconds"
                ),
            )
        })
}

async fn usage(
    State(ledger): State<Arc<Ledger>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let mut by = Dim::App;
    let mut granularity = Granularity::Hour;
    let (mut from, mut to, mut name, mut csv) = (None, None, None, false);
    for (k, v) in crate::vars::query_pairs(q.as_deref().unwrap_or("")) {
        match k.as_str() {
            "by" => {
                by = Dim::parse(&v)
                    .ok_or_else(|| invalid("by", "`by` must be app, product or developer".into()))?
            }
            "granularity" => {
                granularity = Granularity::parse(&v).ok_or_else(|| {
                    invalid("granularity", "`granularity` must be hour or day".into())
                })?
            }
            "from" => from = Some(time("from", &v)?),
            "to" => to = Some(time("to", &v)?),
            "name" => name = Some(v),
            "format" => match v.as_str() {
                "csv" => csv = true,
                "json" => csv = false,
                _ => return Err(invalid("format", "`format` must be json or csv".into())),
            },
            other => {
                return Err(invalid(
                    other,
                    format!(
                    "unknown query parameter `{other}` (by, granularity, from, to, name, format)"
                ),
                ))
            }
        }
    }
    let now = chrono::Utc::now().timestamp_millis();
    let to = to.unwrap_or(now);
    let span = match granularity {
        Granularity::Hour => 23 * 3_600_000,
        Granularity::Day => 29 * 86_400_000,
    };
    let from = from.unwrap_or(to.saturating_sub(span));
    let report = ledger
        .report(&Query {
            by,
            granularity,
            from_ms: from,
            to_ms: to,
            name,
        })
        .await
        .map_err(|e| match e {
            ReportError::Range(m) => invalid("from", m),
            ReportError::Store(e) => ApiError::from(e),
        })?;
    let wants_csv = csv
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/csv"));
    if wants_csv {
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"tollgate-usage.csv\"",
                ),
            ],
            report.to_csv(),
        )
            .into_response());
    }
    Ok(Json(report).into_response())
}
