//! `/v1/kvms/{map}/entries[/{key}]`: key-value map entries through the management API, with
//! the same bearer auth, strict JSON, pagination and 409 `FileDefined` rules as the rest of
//! it. Entries are kept in the store; a secret entry's value is never returned (it reads as
//! `null` with `"secret": true`). Keys travel percent-encoded in the path.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{authenticate, ApiAuth, Guard};
use super::errors::{wrong_method, ApiError, ApiResult};
use super::request::{decode, path_param, required_object, BODY_LIMIT};
use super::response::{page_request, paginate};
use crate::consumer::service::Consumers;
use crate::kvm::{check_key, check_map_name, check_value, KvmEntry, Kvms};
use crate::store::Write;

#[derive(Clone)]
struct KvmApi {
    consumers: Arc<Consumers>,
    kvms: Arc<Kvms>,
}

/// An entry as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryView {
    key: String,
    /// `null` for secret entries.
    value: Option<String>,
    secret: bool,
    origin: &'static str,
}

fn view(key: &str, e: &KvmEntry, origin: &'static str) -> EntryView {
    EntryView {
        key: key.to_owned(),
        value: (!e.secret).then(|| e.value.clone()),
        secret: e.secret,
        origin,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    key: String,
    value: String,
    #[serde(default)]
    secret: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: String,
    #[serde(default)]
    secret: bool,
}

fn check_map(map: &str) -> Result<(), ApiError> {
    check_map_name(map).map_err(|m| ApiError::invalid("map", m))
}

fn check_entry_key(key: &str) -> Result<(), ApiError> {
    check_key(key).map_err(|m| ApiError::invalid("key", m))
}

fn file_defined(map: &str, key: &str) -> ApiError {
    ApiError::FileDefined(format!(
        "entry `{key}` of map `{map}` is defined in a configuration file; change it there"
    ))
}

fn not_found(map: &str, key: &str) -> ApiError {
    ApiError::NotFound(format!("entry `{key}` of map `{map}` not found"))
}

pub fn router(consumers: Arc<Consumers>, kvms: Arc<Kvms>, auth: ApiAuth) -> Router {
    let guard = Arc::new(Guard::new(&auth));
    Router::new()
        .route(
            "/v1/kvms/{map}/entries",
            get(list_entries).post(create_entry),
        )
        .route(
            "/v1/kvms/{map}/entries/{key}",
            get(get_entry).put(put_entry).delete(delete_entry),
        )
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(guard, authenticate))
        .with_state(KvmApi { consumers, kvms })
}

async fn list_entries(
    State(api): State<KvmApi>,
    map: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let map = path_param(map)?;
    check_map(&map)?;
    let page = page_request(q.as_deref())?;
    let mut all: BTreeMap<String, EntryView> = api
        .consumers
        .store()
        .list_kvm_entries(&map)
        .await?
        .iter()
        .map(|(k, e)| (k.clone(), view(k, e, "api")))
        .collect();
    if let Some(files) = api.kvms.files().get(&map) {
        for (k, e) in files {
            all.insert(k.clone(), view(k, e, "file"));
        }
    }
    Ok(paginate(&all, &page))
}

async fn get_entry(
    State(api): State<KvmApi>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (map, key) = path_param(p)?;
    check_map(&map)?;
    check_entry_key(&key)?;
    if let Some(e) = api.kvms.file_entry(&map, &key) {
        return Ok(Json(view(&key, &e, "file")).into_response());
    }
    let e = api
        .consumers
        .store()
        .get_kvm_entry(&map, &key)
        .await?
        .ok_or_else(|| not_found(&map, &key))?;
    Ok(Json(view(&key, &e, "api")).into_response())
}

async fn create_entry(
    State(api): State<KvmApi>,
    map: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let map = path_param(map)?;
    check_map(&map)?;
    let b: CreateBody = decode(required_object(&headers, body)?)?;
    check_entry_key(&b.key)?;
    check_value(&b.value).map_err(|m| ApiError::invalid("value", m))?;
    if api.kvms.file_entry(&map, &b.key).is_some() {
        return Err(file_defined(&map, &b.key));
    }
    let entry = KvmEntry {
        value: b.value,
        secret: b.secret,
    };
    api.consumers
        .store()
        .put_kvm_entry(&map, &b.key, &entry, Some(Write::Create))
        .await?;
    tracing::info!(map = %map, secret = entry.secret, "kvm entry created through the management API");
    let v = view(&b.key, &entry, "api");
    let mut resp = (StatusCode::CREATED, Json(v)).into_response();
    let location = format!(
        "/v1/kvms/{map}/entries/{}",
        crate::kvm::encode_path_segment(&b.key)
    );
    if let Ok(h) = axum::http::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(axum::http::header::LOCATION, h);
    }
    Ok(resp)
}

async fn put_entry(
    State(api): State<KvmApi>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let (map, key) = path_param(p)?;
    check_map(&map)?;
    check_entry_key(&key)?;
    let b: PutBody = decode(required_object(&headers, body)?)?;
    check_value(&b.value).map_err(|m| ApiError::invalid("value", m))?;
    if api.kvms.file_entry(&map, &key).is_some() {
        return Err(file_defined(&map, &key));
    }
    let entry = KvmEntry {
        value: b.value,
        secret: b.secret,
    };
    // PUT writes the entry whether or not it exists.
    api.consumers
        .store()
        .put_kvm_entry(&map, &key, &entry, None)
        .await?;
    Ok(Json(view(&key, &entry, "api")).into_response())
}

async fn delete_entry(
    State(api): State<KvmApi>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (map, key) = path_param(p)?;
    check_map(&map)?;
    check_entry_key(&key)?;
    if api.kvms.file_entry(&map, &key).is_some() {
        return Err(file_defined(&map, &key));
    }
    match api.consumers.store().delete_kvm_entry(&map, &key).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(crate::store::StoreError::NotFound { .. }) => Err(not_found(&map, &key)),
        Err(e) => Err(e.into()),
    }
}
