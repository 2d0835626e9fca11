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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::{DeserializeOwned, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

use crate::consumer::index::Product;
use crate::consumer::service::Consumers;
use crate::consumer::{
    hash_key, ApiKey, ApiProduct, App, AppStatus, ApprovalType, KeyStatus, Origin, QuotaSettings,
};
use crate::store::{StoreError, Write};

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 1 << 20;
/// List page size when `pageSize` is absent or 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest list page; larger `pageSize` values are lowered to it.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Read-modify-write rounds of one API write before it answers 409: each round that loses
/// to a concurrent write (through another replica) reads the object again.
const WRITE_ATTEMPTS: usize = 5;

const MAX_NAME_LEN: usize = 253;
const MAX_TEXT_LEN: usize = 4096;
const MAX_PATH_LEN: usize = 2048;
/// Longest key lifetime accepted: 100 years.
const MAX_LIFETIME_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

/// How the management API authenticates its callers.
#[derive(Clone)]
pub enum ApiAuth {
    /// `Authorization: Bearer <token>` must carry this token. An empty token admits nobody.
    Bearer(String),
    /// No authentication (only with an explicit `--admin-insecure`).
    Insecure,
}

impl fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            ApiAuth::Insecure => f.write_str("Insecure"),
        }
    }
}

/// Everything an API call can fail with; turned into a response in one place
/// ([`IntoResponse`]), as `{"error":{"code":…,"message":…,"field":…}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidArgument {
        message: String,
        field: Option<String>,
    },
    #[error("a valid `Authorization: Bearer <token>` header is required")]
    Unauthenticated,
    #[error("{0}")]
    NotFound(String),
    #[error("this method is not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FileDefined(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            message: message.into(),
            field: Some(field.into()),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "InvalidArgument"),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "Unauthenticated"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            ApiError::AlreadyExists(_) => (StatusCode::CONFLICT, "AlreadyExists"),
            ApiError::FileDefined(_) => (StatusCode::CONFLICT, "FileDefined"),
            ApiError::FailedPrecondition(_) => (StatusCode::CONFLICT, "FailedPrecondition"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ApiError::Unavailable(format!(
                "the store is unavailable ({m}); the request did not complete, retry later"
            )),
            e @ StoreError::AlreadyExists { .. } => ApiError::AlreadyExists(e.to_string()),
            e @ StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            e @ StoreError::Corrupt { .. } => ApiError::Internal(e.to_string()),
            // Only after WRITE_ATTEMPTS read-modify-write rounds lost to other writers.
            e @ StoreError::Conflict { .. } => ApiError::FailedPrecondition(format!(
                "{e} on every one of {WRITE_ATTEMPTS} attempts; retry later"
            )),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if status.is_server_error() {
            tracing::warn!(code, error = %self, "management API request failed");
        }
        let field = match &self {
            ApiError::InvalidArgument { field, .. } => field.as_deref(),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                field,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        match self {
            ApiError::Unauthenticated => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable(_) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

#[path = "kvm_api.rs"]
pub mod kvm;

// ---------------------------------------------------------------------------------------
// Router and authentication

#[derive(Clone)]
struct Api {
    consumers: Arc<Consumers>,
    /// Serializes this process's writes: read-modify-write of an app (adding a key, a PUT
    /// that keeps the keys) and the reference checks between apps and products.
    write: Arc<Mutex<()>>,
}

/// SHA-256 of the expected token (`None`: insecure). Comparing fixed-size digests in
/// constant time reveals neither the token's content nor its length.
struct Guard {
    expected: Option<[u8; 32]>,
}

impl Guard {
    fn new(auth: &ApiAuth) -> Self {
        Self {
            expected: match auth {
                ApiAuth::Bearer(t) => Some(Sha256::digest(t.as_bytes()).into()),
                ApiAuth::Insecure => None,
            },
        }
    }

    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(token) = bearer_token(headers) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        bool::from(presented.ct_eq(expected))
    }
}

/// The token of the one `Authorization: Bearer …` header; `None` when absent, sent twice,
/// of another scheme, or empty.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn authenticate(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    if guard.admits(req.headers()) {
        next.run(req).await
    } else {
        ApiError::Unauthenticated.into_response()
    }
}

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

async fn wrong_method() -> ApiError {
    ApiError::MethodNotAllowed
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

// ---------------------------------------------------------------------------------------
// Request parsing

/// A JSON value parsed strictly: an object with the same field twice is refused (plain
/// `serde_json::Value` keeps the last one silently).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(A::Error::custom(format!("duplicate field `{}`", show(&k))));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The field an error is about: the path where deserialization stopped, completed with the
/// field a "missing field" or "duplicate field" message names.
fn field_of(path: &serde_path_to_error::Path, message: &str) -> Option<String> {
    let p = path.to_string();
    let at = (p != "." && p != "?").then_some(p);
    let named = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name.to_owned());
    match (at, named) {
        (Some(at), Some(name)) if !at.ends_with(&format!(".{name}")) && at != name => {
            Some(format!("{at}.{name}"))
        }
        (None, Some(name)) => Some(name),
        (at, _) => at,
    }
}

/// The request body as a JSON object (`None`: an empty body). Refuses a non-JSON content
/// type (415), an oversized body (413), and malformed JSON, duplicate fields or anything
/// other than an object (400).
fn body_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType(
                "request bodies must be JSON (`Content-Type: application/json`)".into(),
            ));
        }
    }
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body exceeds the limit of {BODY_LIMIT} bytes"
            ))
        } else {
            ApiError::InvalidArgument {
                message: format!("cannot read the request body: {}", r.body_text()),
                field: None,
            }
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize::<_, Strict>(&mut de)
        .map_err(|e| {
            let path = e.path().clone();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::InvalidArgument {
                    message: format!("malformed JSON: {inner}"),
                    field: None,
                }
            } else {
                let message = inner.to_string();
                ApiError::InvalidArgument {
                    field: field_of(&path, &message),
                    message,
                }
            }
        })
        .and_then(|Strict(v)| {
            de.end().map_err(|e| ApiError::InvalidArgument {
                message: format!("malformed JSON: {e}"),
                field: None,
            })?;
            Ok(v)
        })?;
    match value {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(ApiError::InvalidArgument {
            message: "the request body must be a JSON object".into(),
            field: None,
        }),
    }
}

/// A required JSON object body.
fn required_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    body_object(headers, body)?.ok_or_else(|| ApiError::InvalidArgument {
        message: "a JSON object body is required".into(),
        field: None,
    })
}

/// Deserializes an object into `T`, naming the offending field on error (unknown fields,
/// wrong types, missing fields).
fn decode<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let path = e.path().clone();
        let message = e.into_inner().to_string();
        ApiError::InvalidArgument {
            field: field_of(&path, &message),
            message,
        }
    })
}

fn path_param<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v).map_err(|r| ApiError::InvalidArgument {
        message: format!("invalid path: {}", r.body_text()),
        field: None,
    })
}

// ---------------------------------------------------------------------------------------
// Validation

/// A value for a message: control characters escaped, long values cut.
fn show(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

fn check_name(value: &str, field: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must be 1 to {MAX_NAME_LEN} characters long"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ApiError::invalid(
            field,
            format!(
                "`{field}` may contain only letters, digits, `.`, `_` and `-` (got `{}`)",
                show(value)
            ),
        ));
    }
    Ok(())
}

fn check_text(value: &str, field: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` is longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` contains control characters"),
        ));
    }
    Ok(())
}

/// A deliberately simple address check: `local@domain.tld`, printable ASCII, sane lengths.
fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"(),:;<>@[\\]".contains(&b));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = domain.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    e.len() <= 254 && local_ok && domain_ok
}

fn check_attributes(attrs: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if attrs.len() > 100 {
        return Err(ApiError::invalid(
            "attributes",
            "at most 100 attributes are allowed",
        ));
    }
    for (k, v) in attrs {
        let field = format!("attributes.{}", show(k));
        if k.is_empty() {
            return Err(ApiError::invalid(field, "attribute names cannot be empty"));
        }
        check_text(k, &field, MAX_NAME_LEN)?;
        check_text(v, &field, MAX_TEXT_LEN)?;
    }
    Ok(())
}

fn check_quota(q: &Option<QuotaSettings>, field: &str) -> Result<(), ApiError> {
    if let Some(q) = q {
        if q.limit == 0 {
            return Err(ApiError::invalid(
                format!("{field}.limit"),
                "a quota limit must be greater than 0",
            ));
        }
        if q.interval == 0 {
            return Err(ApiError::invalid(
                format!("{field}.interval"),
                "a quota interval must be greater than 0",
            ));
        }
    }
    Ok(())
}

fn validate_product(p: &ApiProduct) -> Result<(), ApiError> {
    check_name(&p.name, "name")?;
    if p.origin == Origin::File {
        return Err(ApiError::invalid(
            "origin",
            "`origin: file` is reserved for objects of the configuration files",
        ));
    }
    check_text(&p.description, "description", MAX_TEXT_LEN)?;
    for (i, op) in p.operations.iter().enumerate() {
        check_text(&op.path, &format!("operations[{i}].path"), MAX_PATH_LEN)?;
        for (j, m) in op.methods.iter().enumerate() {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(ApiError::invalid(
                    format!("operations[{i}].methods[{j}]"),
                    format!("`{}` is not an HTTP method", show(m)),
                ));
            }
        }
        for (j, m) in op.models.iter().enumerate() {
            let field = format!("operations[{i}].models[{j}]");
            if m.is_empty() {
                return Err(ApiError::invalid(field, "model names cannot be empty"));
            }
            check_text(m, &field, MAX_NAME_LEN)?;
        }
    }
    Product::compile(p.clone()).map_err(|e| match e.split_once(": ") {
        Some((field, msg)) if field.starts_with("operations[") => {
            ApiError::invalid(field, msg.to_owned())
        }
        _ => ApiError::invalid("operations", e),
    })?;
    check_quota(&p.quota, "quota")?;
    check_quota(&p.llm_token_quota, "llmTokenQuota")?;
    check_attributes(&p.attributes)
}

/// An app as clients send it: everything but the keys (managed through the keys routes)
/// and the origin (set by the server).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AppBody {
    name: String,
    developer_email: String,
    #[serde(default)]
    status: AppStatus,
    #[serde(default)]
    products: Vec<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    origin: Option<Origin>,
}

fn app_body(mut object: Map<String, Value>, path_name: Option<&str>) -> Result<AppBody, ApiError> {
    if object.contains_key("keys") {
        return Err(ApiError::invalid(
            "keys",
            "keys cannot be sent with an app: create them with POST /v1/apps/{name}/keys",
        ));
    }
    if let Some(n) = path_name {
        object
            .entry("name")
            .or_insert_with(|| Value::String(n.to_owned()));
    }
    let body: AppBody = decode(object)?;
    check_name(&body.name, "name")?;
    if body.origin == Some(Origin::File) {
        return Err(ApiError::invalid(
            "origin",
            "`origin: file` is reserved for objects of the configuration files",
        ));
    }
    if !valid_email(&body.developer_email) {
        return Err(ApiError::invalid(
            "developerEmail",
            format!(
                "`{}` is not a valid email address",
                show(&body.developer_email)
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, p) in body.products.iter().enumerate() {
        check_name(p, &format!("products[{i}]"))?;
        if !seen.insert(p) {
            return Err(ApiError::invalid(
                format!("products[{i}]"),
                format!("product `{p}` is listed twice"),
            ));
        }
    }
    check_attributes(&body.attributes)?;
    Ok(body)
}

fn product_body(
    mut object: Map<String, Value>,
    path_name: Option<&str>,
) -> Result<ApiProduct, ApiError> {
    if let Some(n) = path_name {
        object
            .entry("name")
            .or_insert_with(|| Value::String(n.to_owned()));
    }
    let p: ApiProduct = decode(object)?;
    validate_product(&p)?;
    Ok(p)
}

fn check_path_name(body_name: &str, path_name: &str) -> Result<(), ApiError> {
    if body_name != path_name {
        return Err(ApiError::invalid(
            "name",
            format!(
                "the body names `{}` but the path names `{path_name}`; renaming is not supported",
                show(body_name)
            ),
        ));
    }
    Ok(())
}

/// Body of `POST /v1/apps/{name}/keys`; both fields optional, at most one of them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeyRequest {
    expires_in_seconds: Option<u64>,
    expires_at: Option<i64>,
}

impl KeyRequest {
    fn expiry(&self, now: i64) -> Result<Option<i64>, ApiError> {
        match (self.expires_in_seconds, self.expires_at) {
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "expiresAt",
                "give either `expiresInSeconds` or `expiresAt`, not both",
            )),
            (Some(s), None) => {
                let ms = i64::try_from(s)
                    .ok()
                    .and_then(|s| s.checked_mul(1000))
                    .filter(|ms| (1..=MAX_LIFETIME_MS).contains(ms))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "expiresInSeconds",
                            "`expiresInSeconds` must be between 1 and 100 years' worth of seconds",
                        )
                    })?;
                Ok(Some(now + ms))
            }
            (None, Some(at)) => {
                if at <= now || at - now > MAX_LIFETIME_MS {
                    return Err(ApiError::invalid(
                        "expiresAt",
                        "`expiresAt` (Unix milliseconds) must be in the future, at most 100 years ahead",
                    ));
                }
                Ok(Some(at))
            }
            (None, None) => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Views (what responses carry)

/// A key as responses show it: never its hash.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyView {
    id: String,
    status: KeyStatus,
    expires_at: Option<i64>,
    created_at: i64,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        Self {
            id: k.id.clone(),
            status: k.status,
            expires_at: k.expires_at,
            created_at: k.created_at,
        }
    }
}

/// The 201 of a key creation: the only answer that carries the key in clear.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewKeyView {
    id: String,
    key: String,
    status: KeyStatus,
    expires_at: Option<i64>,
    created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct AppView {
    name: String,
    developer_email: String,
    status: AppStatus,
    products: Vec<String>,
    keys: Vec<KeyView>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<String, String>,
    origin: Origin,
    /// The store revision (0 for file apps and new ones), raised by every update.
    revision: u64,
}

impl From<&App> for AppView {
    fn from(a: &App) -> Self {
        Self {
            name: a.name.clone(),
            developer_email: a.developer_email.clone(),
            status: a.status,
            products: a.products.clone(),
            keys: a.keys.iter().map(KeyView::from).collect(),
            attributes: a.attributes.clone(),
            origin: a.origin,
            revision: a.revision,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListView<T> {
    items: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

struct PageRequest {
    size: usize,
    after: Option<String>,
}

fn page_request(query: Option<&str>) -> Result<PageRequest, ApiError> {
    let mut page = PageRequest {
        size: DEFAULT_PAGE_SIZE,
        after: None,
    };
    let (mut size_seen, mut token_seen) = (false, false);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "pageSize" if !size_seen => {
                size_seen = true;
                let n: usize = v.parse().map_err(|_| {
                    ApiError::invalid("pageSize", "`pageSize` must be a non-negative integer")
                })?;
                page.size = match n {
                    0 => DEFAULT_PAGE_SIZE,
                    n => n.min(MAX_PAGE_SIZE),
                };
            }
            "pageToken" if !token_seen => {
                token_seen = true;
                if !v.is_empty() {
                    let after = URL_SAFE_NO_PAD
                        .decode(v)
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "pageToken",
                                "`pageToken` is not a token this API returned",
                            )
                        })?;
                    page.after = Some(after);
                }
            }
            "pageSize" | "pageToken" => {
                return Err(ApiError::invalid(k, format!("`{k}` is given twice")));
            }
            other => {
                return Err(ApiError::invalid(
                    show(other),
                    format!(
                        "unknown query parameter `{}` (expected `pageSize`, `pageToken`)",
                        show(other)
                    ),
                ));
            }
        }
    }
    Ok(page)
}

/// One page of `items` (sorted by name, unique names), after the token's name.
fn paginate<T: Serialize + Clone>(items: &BTreeMap<String, T>, page: &PageRequest) -> Response {
    let lower = match &page.after {
        Some(a) => Bound::Excluded(a.as_str()),
        None => Bound::Unbounded,
    };
    let mut rest = items.range::<str, _>((lower, Bound::Unbounded));
    let chosen: Vec<(&String, &T)> = rest.by_ref().take(page.size).collect();
    let next_page_token = match (rest.next(), chosen.last()) {
        (Some(_), Some((last, _))) => Some(URL_SAFE_NO_PAD.encode(last.as_bytes())),
        _ => None,
    };
    Json(ListView {
        items: chosen.into_iter().map(|(_, v)| v.clone()).collect(),
        next_page_token,
    })
    .into_response()
}

fn created(location: String, body: impl Serialize) -> Response {
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

// ---------------------------------------------------------------------------------------
// Lookups

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn random<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| ApiError::Internal(format!("no randomness available: {e}")))?;
    Ok(b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn product_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("product `{name}` not found"))
}

fn app_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("app `{name}` not found"))
}

fn file_defined(kind: &str, name: &str) -> ApiError {
    ApiError::FileDefined(format!(
        "{kind} `{name}` is defined in a configuration file; change it there, not through the API"
    ))
}

/// The answer to a DELETE of a name a configuration file defines: 204 when the store held
/// an object of that name (shadowed by the file's, and now removed), 409 `FileDefined`
/// when there was nothing but the file's to delete.
fn delete_shadowed(kind: &str, name: &str, deleted: Result<(), StoreError>) -> ApiResult {
    match deleted {
        Ok(()) => {
            tracing::info!(kind, name, "store object shadowed by a configuration file deleted through the management API; the file's stays");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Err(StoreError::NotFound { .. }) => Err(file_defined(kind, name)),
        Err(e) => Err(e.into()),
    }
}

impl Api {
    fn file_product(&self, name: &str) -> Option<ApiProduct> {
        let (products, _) = self.consumers.file_objects();
        products.into_iter().find(|p| p.name == name).map(|mut p| {
            p.origin = Origin::File;
            p
        })
    }

    fn file_app(&self, name: &str) -> Option<App> {
        let (_, apps) = self.consumers.file_objects();
        apps.into_iter().find(|a| a.name == name).map(|mut a| {
            a.origin = Origin::File;
            a
        })
    }

    /// A product by name, file objects first.
    async fn product(&self, name: &str) -> Result<Option<ApiProduct>, ApiError> {
        if let Some(p) = self.file_product(name) {
            return Ok(Some(p));
        }
        Ok(self
            .consumers
            .store()
            .get_product(name)
            .await?
            .map(|mut p| {
                p.origin = Origin::Api;
                p
            }))
    }

    /// An app by name, file objects first.
    async fn app(&self, name: &str) -> Result<Option<App>, ApiError> {
        if let Some(a) = self.file_app(name) {
            return Ok(Some(a));
        }
        Ok(self.consumers.store().get_app(name).await?.map(|mut a| {
            a.origin = Origin::Api;
            a
        }))
    }

    /// A store app for a write: 409 for a file app, 404 when absent.
    async fn store_app_for_write(&self, name: &str) -> Result<App, ApiError> {
        if self.consumers.is_file_app(name) {
            return Err(file_defined("app", name));
        }
        self.consumers
            .store()
            .get_app(name)
            .await?
            .ok_or_else(|| app_not_found(name))
    }

    /// Read-modify-write of store app `name`: `change` gets the app as stored and returns
    /// it changed; the update carries the revision it was read at, so a write made
    /// meanwhile (by another replica: the local `write` lock orders this process's own) is
    /// never overwritten: the round starts again from a fresh read, up to [`WRITE_ATTEMPTS`]
    /// times. Returns the app as written and what `change` returned.
    async fn update_store_app<R, F, Fut>(
        &self,
        name: &str,
        mut change: F,
    ) -> Result<(App, R), ApiError>
    where
        F: FnMut(App) -> Fut,
        Fut: std::future::Future<Output = Result<(App, R), ApiError>>,
    {
        let mut attempt = 1;
        loop {
            let app = self.store_app_for_write(name).await?;
            let (app, r) = change(app).await?;
            match self.consumers.store().put_app(&app, Write::Update).await {
                // The store wrote it one revision past the one it was read at.
                Ok(()) => {
                    let app = App {
                        revision: app.revision.saturating_add(1),
                        ..app
                    };
                    return Ok((app, r));
                }
                Err(StoreError::NotFound { .. }) => return Err(app_not_found(name)),
                Err(StoreError::Conflict { .. }) if attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(app = %name, attempt, "app changed concurrently; reading it again");
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn check_products_exist(&self, products: &[String]) -> Result<(), ApiError> {
        for (i, p) in products.iter().enumerate() {
            if self.product(p).await?.is_none() {
                return Err(ApiError::invalid(
                    format!("products[{i}]"),
                    format!("product `{p}` does not exist"),
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Products

async fn list_products(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult {
    let page = page_request(q.as_deref())?;
    let contents = api.consumers.store().snapshot().await?;
    let (file_products, _) = api.consumers.file_objects();
    let mut all = BTreeMap::new();
    for mut p in contents.products {
        p.origin = Origin::Api;
        all.insert(p.name.clone(), p);
    }
    // A file object shadows a store object of the same name, as it does for writes.
    for mut p in file_products {
        p.origin = Origin::File;
        all.insert(p.name.clone(), p);
    }
    Ok(paginate(&all, &page))
}

async fn get_product(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let p = api
        .product(&name)
        .await?
        .ok_or_else(|| product_not_found(&name))?;
    Ok(Json(p).into_response())
}

async fn create_product(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let mut p = product_body(required_object(&headers, body)?, None)?;
    p.origin = Origin::Api;
    p.revision = 0;
    let _w = api.write.lock().await;
    if api.consumers.is_file_product(&p.name) {
        return Err(file_defined("product", &p.name));
    }
    api.consumers.store().put_product(&p, Write::Create).await?;
    tracing::info!(product = %p.name, "product created through the management API");
    Ok(created(format!("/v1/products/{}", p.name), &p))
}

async fn put_product(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let mut p = product_body(required_object(&headers, body)?, Some(&name))?;
    check_path_name(&p.name, &name)?;
    p.origin = Origin::Api;
    let _w = api.write.lock().await;
    if api.consumers.is_file_product(&name) {
        return Err(file_defined("product", &name));
    }
    // A PUT replaces the product whatever it was, but the store only takes updates at the
    // revision they read: read it, and again when another replica wrote meanwhile.
    let mut attempt = 1;
    loop {
        let current = api
            .consumers
            .store()
            .get_product(&name)
            .await?
            .ok_or_else(|| product_not_found(&name))?;
        p.revision = current.revision;
        match api.consumers.store().put_product(&p, Write::Update).await {
            Ok(()) => break,
            Err(StoreError::NotFound { .. }) => return Err(product_not_found(&name)),
            Err(StoreError::Conflict { .. }) if attempt < WRITE_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
    p.revision += 1;
    tracing::info!(product = %name, "product updated through the management API");
    Ok(Json(p).into_response())
}

async fn delete_product(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let _w = api.write.lock().await;
    if api.consumers.is_file_product(&name) {
        // The file's product stays; what can go is a store product it shadows (made
        // through the API before the file defined it), as the shadowing warning says.
        return delete_shadowed(
            "product",
            &name,
            api.consumers.store().delete_product(&name).await,
        );
    }
    if api.consumers.store().get_product(&name).await?.is_none() {
        return Err(product_not_found(&name));
    }
    let (_, file_apps) = api.consumers.file_objects();
    let contents = api.consumers.store().snapshot().await?;
    let users: BTreeSet<String> = file_apps
        .iter()
        .chain(contents.apps.iter())
        .filter(|a| a.products.contains(&name))
        .map(|a| a.name.clone())
        .collect();
    if !users.is_empty() {
        let mut list: Vec<&str> = users.iter().take(10).map(String::as_str).collect();
        if users.len() > 10 {
            list.push("…");
        }
        return Err(ApiError::FailedPrecondition(format!(
            "product `{name}` is used by {} app(s) ({}); remove it from them first",
            users.len(),
            list.join(", ")
        )));
    }
    api.consumers
        .store()
        .delete_product(&name)
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } => product_not_found(&name),
            e => e.into(),
        })?;
    tracing::info!(product = %name, "product deleted through the management API");
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------
// Apps

async fn list_apps(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult {
    let page = page_request(q.as_deref())?;
    let contents = api.consumers.store().snapshot().await?;
    let (_, file_apps) = api.consumers.file_objects();
    let mut all = BTreeMap::new();
    for mut a in contents.apps {
        a.origin = Origin::Api;
        all.insert(a.name.clone(), AppView::from(&a));
    }
    for mut a in file_apps {
        a.origin = Origin::File;
        all.insert(a.name.clone(), AppView::from(&a));
    }
    Ok(paginate(&all, &page))
}

async fn get_app(State(api): State<Api>, name: Result<Path<String>, PathRejection>) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let a = api.app(&name).await?.ok_or_else(|| app_not_found(&name))?;
    Ok(Json(AppView::from(&a)).into_response())
}

async fn create_app(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = app_body(required_object(&headers, body)?, None)?;
    let _w = api.write.lock().await;
    if api.consumers.is_file_app(&body.name) {
        return Err(file_defined("app", &body.name));
    }
    api.check_products_exist(&body.products).await?;
    let app = App {
        name: body.name,
        developer_email: body.developer_email,
        status: body.status,
        products: body.products,
        keys: Vec::new(),
        attributes: body.attributes,
        origin: Origin::Api,
        revision: 0,
    };
    api.consumers.store().put_app(&app, Write::Create).await?;
    tracing::info!(app = %app.name, "app created through the management API");
    Ok(created(
        format!("/v1/apps/{}", app.name),
        AppView::from(&app),
    ))
}

async fn put_app(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let body = app_body(required_object(&headers, body)?, Some(&name))?;
    check_path_name(&body.name, &name)?;
    let _w = api.write.lock().await;
    api.check_products_exist(&body.products).await?;
    // The body replaces everything but the keys, which are kept as stored.
    let (app, ()) = api
        .update_store_app(&name, |existing| {
            let app = App {
                name: body.name.clone(),
                developer_email: body.developer_email.clone(),
                status: body.status,
                products: body.products.clone(),
                keys: existing.keys,
                attributes: body.attributes.clone(),
                origin: Origin::Api,
                revision: existing.revision,
            };
            async move { Ok((app, ())) }
        })
        .await?;
    tracing::info!(app = %name, "app updated through the management API");
    Ok(Json(AppView::from(&app)).into_response())
}

async fn delete_app(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let _w = api.write.lock().await;
    if api.consumers.is_file_app(&name) {
        return delete_shadowed("app", &name, api.consumers.store().delete_app(&name).await);
    }
    api.consumers
        .store()
        .delete_app(&name)
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } => app_not_found(&name),
            e => e.into(),
        })?;
    tracing::info!(app = %name, "app deleted through the management API");
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------
// Keys

fn key_not_found(app: &str, id: &str) -> ApiError {
    ApiError::NotFound(format!("key `{id}` not found in app `{app}`"))
}

async fn list_keys(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let page = page_request(q.as_deref())?;
    let app = api.app(&name).await?.ok_or_else(|| app_not_found(&name))?;
    let keys: BTreeMap<String, KeyView> = app
        .keys
        .iter()
        .map(|k| (k.id.clone(), KeyView::from(k)))
        .collect();
    Ok(paginate(&keys, &page))
}

async fn get_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (name, id) = path_param(params)?;
    check_name(&name, "name")?;
    check_name(&id, "id")?;
    let app = api.app(&name).await?.ok_or_else(|| app_not_found(&name))?;
    let key = app
        .keys
        .iter()
        .find(|k| k.id == id)
        .ok_or_else(|| key_not_found(&name, &id))?;
    Ok(Json(KeyView::from(key)).into_response())
}

async fn create_key(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let request: KeyRequest = match body_object(&headers, body)? {
        Some(object) => decode(object)?,
        None => KeyRequest::default(),
    };
    let now = now_ms();
    let expires_at = request.expiry(now)?;

    let _w = api.write.lock().await;
    let api_ref = &api;
    let (_, (id, key, status)) = api
        .update_store_app(&name, |mut app| async move {
            let mut manual = false;
            for p in &app.products {
                if let Some(p) = api_ref.product(p).await? {
                    manual |= p.approval_type == ApprovalType::Manual;
                }
            }
            let status = if manual {
                KeyStatus::Pending
            } else {
                KeyStatus::Approved
            };
            let id = loop {
                let id = format!("key_{}", hex(&random::<8>()?));
                if !app.keys.iter().any(|k| k.id == id) {
                    break id;
                }
            };
            let key = format!("tg_{}", URL_SAFE_NO_PAD.encode(random::<32>()?));
            app.keys.push(ApiKey {
                id: id.clone(),
                hash: hash_key(&key),
                status,
                expires_at,
                created_at: now,
            });
            Ok((app, (id, key, status)))
        })
        .await?;
    tracing::info!(app = %name, key_id = %id, ?status, "key created through the management API");
    let mut resp = created(
        format!("/v1/apps/{name}/keys/{id}"),
        NewKeyView {
            id,
            key,
            status,
            expires_at,
            created_at: now,
        },
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn delete_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (name, id) = path_param(params)?;
    check_name(&name, "name")?;
    check_name(&id, "id")?;
    let _w = api.write.lock().await;
    let (name_ref, id_ref) = (&name, &id);
    api.update_store_app(&name, |mut app| async move {
        let before = app.keys.len();
        app.keys.retain(|k| k.id != *id_ref);
        if app.keys.len() == before {
            return Err(key_not_found(name_ref, id_ref));
        }
        Ok((app, ()))
    })
    .await?;
    tracing::info!(app = %name, key_id = %id, "key deleted through the management API");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Clone, Copy)]
enum KeyAction {
    Revoke,
    Approve,
    Expire,
}

async fn change_key(
    api: Api,
    params: Result<Path<(String, String)>, PathRejection>,
    action: KeyAction,
) -> ApiResult {
    let (name, id) = path_param(params)?;
    check_name(&name, "name")?;
    check_name(&id, "id")?;
    let _w = api.write.lock().await;
    let (name_ref, id_ref) = (&name, &id);
    let (_, view) = api
        .update_store_app(&name, |mut app| async move {
            let key = app
                .keys
                .iter_mut()
                .find(|k| k.id == *id_ref)
                .ok_or_else(|| key_not_found(name_ref, id_ref))?;
            match action {
                KeyAction::Revoke => key.status = KeyStatus::Revoked,
                KeyAction::Approve => key.status = KeyStatus::Approved,
                KeyAction::Expire => key.expires_at = Some(now_ms()),
            }
            let view = KeyView::from(&*key);
            Ok((app, view))
        })
        .await?;
    tracing::info!(app = %name, key_id = %id, ?action, "key changed through the management API");
    Ok(Json(view).into_response())
}

async fn revoke_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    change_key(api, params, KeyAction::Revoke).await
}

async fn approve_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    change_key(api, params, KeyAction::Approve).await
}

async fn expire_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    change_key(api, params, KeyAction::Expire).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Table;

    #[test]
    fn names_and_emails() {
        assert!(check_name("gold-1.v2_x", "name").is_ok());
        assert!(check_name("", "name").is_err());
        assert!(check_name("a/b", "name").is_err());
        assert!(check_name("a\nb", "name").is_err());
        assert!(check_name(&"a".repeat(254), "name").is_err());
        assert!(check_name(&"a".repeat(253), "name").is_ok());
        assert!(valid_email("dev@example.com"));
        assert!(valid_email("first.last+tag@sub.example.co"));
        assert!(!valid_email("dev@localhost"));
        assert!(!valid_email("dev@@example.com"));
        assert!(!valid_email("@example.com"));
        assert!(!valid_email("dev example@example.com"));
        assert!(!valid_email("dev@-example.com"));
        assert!(!valid_email("dev@example..com"));
    }

    #[test]
    fn page_requests() {
        let p = page_request(None).unwrap();
        assert_eq!((p.size, p.after), (DEFAULT_PAGE_SIZE, None));
        let p = page_request(Some("pageSize=5000")).unwrap();
        assert_eq!(p.size, MAX_PAGE_SIZE);
        let p = page_request(Some("pageSize=0")).unwrap();
        assert_eq!(p.size, DEFAULT_PAGE_SIZE);
        let tok = URL_SAFE_NO_PAD.encode("abc");
        let p = page_request(Some(&format!("pageSize=2&pageToken={tok}"))).unwrap();
        assert_eq!((p.size, p.after.as_deref()), (2, Some("abc")));
        assert!(page_request(Some("pageSize=-1")).is_err());
        assert!(page_request(Some("pageToken=***")).is_err());
        assert!(page_request(Some("pageSize=1&pageSize=2")).is_err());
        assert!(page_request(Some("bogus=1")).is_err());
    }

    #[test]
    fn strict_json() {
        let h = HeaderMap::new();
        let obj = |s: &str| body_object(&h, Ok(Bytes::from(s.to_owned())));
        assert!(obj(r#"{"a":1,"b":[1,{"c":null}]}"#).unwrap().is_some());
        assert!(obj("  ").unwrap().is_none());
        let err = |s: &str| match obj(s) {
            Err(ApiError::InvalidArgument { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        assert!(err(r#"{"a":1,"a":2}"#).contains("duplicate field"));
        assert!(err(r#"{"a":1"#).contains("malformed JSON"));
        assert!(err(r#"{"a":1} x"#).contains("malformed JSON"));
        assert!(err("[1]").contains("JSON object"));
        assert!(err(&format!("{}{}", "[".repeat(500), "]".repeat(500))).contains("recursion"));
    }

    #[test]
    fn expiry() {
        let r = |s: Option<u64>, a: Option<i64>| {
            KeyRequest {
                expires_in_seconds: s,
                expires_at: a,
            }
            .expiry(1_000)
        };
        assert_eq!(r(None, None).unwrap(), None);
        assert_eq!(r(Some(2), None).unwrap(), Some(3_000));
        assert_eq!(r(None, Some(5_000)).unwrap(), Some(5_000));
        assert!(r(Some(0), None).is_err());
        assert!(r(Some(u64::MAX), None).is_err());
        assert!(r(None, Some(999)).is_err());
        assert!(r(Some(1), Some(5_000)).is_err());
    }

    #[test]
    fn tokens() {
        let g = Guard::new(&ApiAuth::Bearer("s3cret".into()));
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(g.admits(&with("Bearer s3cret")));
        assert!(g.admits(&with("bearer s3cret")));
        assert!(!g.admits(&with("Bearer s3cre")));
        assert!(!g.admits(&with("Basic s3cret")));
        assert!(!g.admits(&with("Bearer ")));
        assert!(!g.admits(&HeaderMap::new()));
        let mut twice = with("Bearer s3cret");
        twice.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(!g.admits(&twice));
        assert!(!Guard::new(&ApiAuth::Bearer(String::new())).admits(&with("Bearer x")));
        assert!(Guard::new(&ApiAuth::Insecure).admits(&HeaderMap::new()));
        assert_eq!(
            format!("{:?}", ApiAuth::Bearer("s3cret".into())),
            "Bearer(<redacted>)"
        );
    }

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
