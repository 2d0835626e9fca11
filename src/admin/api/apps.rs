//! `/v1/apps[/{name}]`: apps (their keys are managed through `keys`).

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::errors::{ApiError, ApiResult};
use super::keys::KeyView;
use super::request::{
    check_attributes, check_name, check_path_name, decode, path_param, required_object, show,
};
use super::response::{created, page_request, paginate};
use super::state::{app_not_found, delete_shadowed, file_defined, Api};
use crate::consumer::{App, AppStatus, Origin};
use crate::store::{StoreError, Write};

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

pub(super) async fn list_apps(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult {
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

pub(super) async fn get_app(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let a = api.app(&name).await?.ok_or_else(|| app_not_found(&name))?;
    Ok(Json(AppView::from(&a)).into_response())
}

pub(super) async fn create_app(
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

pub(super) async fn put_app(
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

pub(super) async fn delete_app(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
