//! Monetization through the management API (same bearer auth, strict JSON and errors as the
//! rest of `/v1/`): rate plans (read; they are `RatePlan` documents), developer accounts and
//! balances, top-ups and adjustments (each a ledger entry), the ledger, monthly statements
//! (JSON or CSV) and subscriptions of apps to plans. Amounts travel as decimal strings
//! (`"12.50"`, at most 6 decimals), never floats.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::auth::{authenticate, ApiAuth, Guard};
use super::errors::{wrong_method, ApiError, ApiResult};
use super::request::{decode, path_param, required_object, BODY_LIMIT};
use super::state::Api;
use crate::consumer::service::Consumers;
use crate::monetization::{money, Billing, EntryKind, MintError, Monetization};
use crate::ratelimit::Counters;

#[derive(Clone)]
struct MintApi {
    api: Api,
    mint: Arc<Monetization>,
    counters: Counters,
}

impl From<MintError> for ApiError {
    fn from(e: MintError) -> Self {
        match e {
            MintError::NotFound(m) => ApiError::NotFound(m),
            MintError::Invalid(m) => ApiError::InvalidArgument {
                message: m,
                field: None,
            },
            MintError::Conflict(m) => ApiError::FailedPrecondition(m),
            MintError::Store(e) => e.into(),
            MintError::Counters(m) => ApiError::Unavailable(m),
        }
    }
}

/// The monetization routes, guarded by `auth`.
pub fn router(
    consumers: Arc<Consumers>,
    mint: Arc<Monetization>,
    counters: Counters,
    auth: ApiAuth,
) -> Router {
    let guard = Arc::new(Guard::new(&auth));
    let state = MintApi {
        api: Api {
            consumers,
            write: Arc::default(),
        },
        mint,
        counters,
    };
    Router::new()
        .route("/v1/rateplans", get(list_plans))
        .route("/v1/rateplans/{name}", get(get_plan))
        .route(
            "/v1/developers/{developer}/account",
            get(balance).put(put_account),
        )
        .route("/v1/developers/{developer}/balance", get(balance))
        .route("/v1/developers/{developer}/topups", post(top_up))
        .route("/v1/developers/{developer}/adjustments", post(adjust))
        .route("/v1/developers/{developer}/ledger", get(ledger))
        .route("/v1/developers/{developer}/statement", get(statement))
        .route("/v1/subscriptions", post(subscribe))
        .route("/v1/subscriptions/{id}/cancel", post(cancel))
        .route("/v1/apps/{name}/subscriptions", get(app_subscriptions))
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(guard, authenticate))
        .with_state(state)
}

fn developer(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let d = path_param(p)?;
    if !d.contains('@') || d.len() > 254 || d.chars().any(char::is_control) {
        return Err(ApiError::invalid("developer", "not an email address"));
    }
    Ok(d)
}

fn amount(field: &str, v: &serde_json::Value) -> Result<i64, ApiError> {
    money::parse_value(v).map_err(|m| ApiError::invalid(field, m))
}

async fn list_plans(State(s): State<MintApi>, RawQuery(q): RawQuery) -> ApiResult {
    let mut product = None;
    for (k, v) in crate::vars::query_pairs(q.as_deref().unwrap_or("")) {
        match k.as_str() {
            "product" => product = Some(v),
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter `{other}` (product)"),
                ))
            }
        }
    }
    let plans: Vec<serde_json::Value> = s
        .mint
        .plans()
        .0
        .iter()
        .filter(|p| product.as_ref().is_none_or(|x| *x == p.product))
        .map(|p| p.view())
        .collect();
    Ok(Json(serde_json::json!({ "ratePlans": plans })).into_response())
}

async fn get_plan(
    State(s): State<MintApi>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    let plans = s.mint.plans();
    let p = plans
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no rate plan `{name}`")))?;
    Ok(Json(p.view()).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AccountBody {
    currency: String,
    billing: Billing,
    #[serde(default)]
    credit_limit: Option<serde_json::Value>,
}

async fn put_account(
    State(s): State<MintApi>,
    d: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let d = developer(d)?;
    let b: AccountBody = decode(required_object(&headers, body)?)?;
    let limit = match &b.credit_limit {
        Some(v) => amount("creditLimit", v)?,
        None => 0,
    };
    s.mint
        .put_account(&d, &b.currency, b.billing, limit, s.counters.now())
        .await?;
    Ok(Json(s.mint.balance(&s.counters, &d).await?).into_response())
}

async fn balance(State(s): State<MintApi>, d: Result<Path<String>, PathRejection>) -> ApiResult {
    let d = developer(d)?;
    Ok(Json(s.mint.balance(&s.counters, &d).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryBody {
    amount: serde_json::Value,
    #[serde(default)]
    reference: String,
}

async fn entry(
    s: MintApi,
    d: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: EntryKind,
) -> ApiResult {
    let d = developer(d)?;
    let b: EntryBody = decode(required_object(&headers, body)?)?;
    let a = amount("amount", &b.amount)?;
    if kind == EntryKind::TopUp && a <= 0 {
        return Err(ApiError::invalid("amount", "a top-up is a positive amount"));
    }
    if a == 0 {
        return Err(ApiError::invalid("amount", "an adjustment is not zero"));
    }
    if b.reference.len() > 500 || b.reference.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "reference",
            "at most 500 characters, no control characters",
        ));
    }
    let e = s
        .mint
        .add_entry(&d, kind, a, &b.reference, s.counters.now())
        .await?;
    tracing::info!(developer = %d, kind = ?kind, amount = %money::format(a), "ledger entry added through the management API");
    Ok((StatusCode::CREATED, Json(e)).into_response())
}

async fn top_up(
    State(s): State<MintApi>,
    d: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    entry(s, d, headers, body, EntryKind::TopUp).await
}

async fn adjust(
    State(s): State<MintApi>,
    d: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    entry(s, d, headers, body, EntryKind::Adjustment).await
}

async fn ledger(State(s): State<MintApi>, d: Result<Path<String>, PathRejection>) -> ApiResult {
    let d = developer(d)?;
    Ok(Json(s.mint.ledger(&s.counters, &d).await?).into_response())
}

async fn statement(
    State(s): State<MintApi>,
    d: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let d = developer(d)?;
    let mut period = None;
    let mut csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    for (k, v) in crate::vars::query_pairs(q.as_deref().unwrap_or("")) {
        match k.as_str() {
            "period" => {
                period = Some(crate::monetization::parse_month(&v).ok_or_else(|| {
                    ApiError::invalid("period", "`period` must be a month, YYYY-MM")
                })?)
            }
            "format" => match v.as_str() {
                "csv" => csv = true,
                "json" => csv = false,
                _ => return Err(ApiError::invalid("format", "`format` must be json or csv")),
            },
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter `{other}` (period, format)"),
                ))
            }
        }
    }
    let start = period.map_or_else(|| s.counters.now(), |p| p.0);
    let st = s.mint.statement(&d, start).await?;
    if csv {
        Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            st.to_csv(),
        )
            .into_response())
    } else {
        Ok(Json(st).into_response())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubscribeBody {
    app: String,
    plan: String,
    #[serde(default)]
    start_date: Option<String>,
}

async fn subscribe(
    State(s): State<MintApi>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let b: SubscribeBody = decode(required_object(&headers, body)?)?;
    let start = b
        .start_date
        .as_deref()
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.timestamp_millis())
                .map_err(|_| ApiError::invalid("startDate", "an RFC 3339 time"))
        })
        .transpose()?;
    let app = s
        .api
        .app(&b.app)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no app named `{}`", b.app)))?;
    let sub = s
        .mint
        .subscribe(
            &app.name,
            &app.developer_email,
            &app.products,
            &b.plan,
            start,
            s.counters.now(),
        )
        .await?;
    tracing::info!(app = %sub.app, plan = %sub.plan, "subscription created through the management API");
    Ok((StatusCode::CREATED, Json(sub)).into_response())
}

async fn cancel(State(s): State<MintApi>, id: Result<Path<String>, PathRejection>) -> ApiResult {
    let id = path_param(id)?;
    Ok(Json(s.mint.cancel(&id, s.counters.now()).await?).into_response())
}

async fn app_subscriptions(
    State(s): State<MintApi>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    s.mint.reload_subscriptions().await?;
    let subs = s.mint.subscriptions(&name).await?;
    Ok(Json(serde_json::json!({ "subscriptions": subs })).into_response())
}
