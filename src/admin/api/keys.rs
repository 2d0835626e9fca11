//! `/v1/apps/{name}/keys[/{id}[/revoke|approve|expire]]`: an app's keys, generated here,
//! shown in clear once (in the 201 of their creation) and stored only as their hash.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::errors::{ApiError, ApiResult};
use super::request::{body_object, check_name, decode, path_param};
use super::response::{created, page_request, paginate};
use super::state::{app_not_found, Api};
use crate::consumer::{hash_key, ApiKey, ApprovalType, KeyStatus};

/// Longest key lifetime accepted: 100 years.
const MAX_LIFETIME_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

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

/// A key as responses show it: never its hash.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KeyView {
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

fn key_not_found(app: &str, id: &str) -> ApiError {
    ApiError::NotFound(format!("key `{id}` not found in app `{app}`"))
}

pub(super) async fn list_keys(
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

pub(super) async fn get_key(
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

pub(super) async fn create_key(
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

pub(super) async fn delete_key(
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

pub(super) async fn revoke_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    change_key(api, params, KeyAction::Revoke).await
}

pub(super) async fn approve_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    change_key(api, params, KeyAction::Approve).await
}

pub(super) async fn expire_key(
    State(api): State<Api>,
    params: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    change_key(api, params, KeyAction::Expire).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
