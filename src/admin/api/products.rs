//! `/v1/products[/{name}]`: API products.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{Map, Value};

use super::errors::{ApiError, ApiResult, WRITE_ATTEMPTS};
use super::request::{
    check_attributes, check_name, check_path_name, check_text, decode, path_param, required_object,
    show, MAX_NAME_LEN, MAX_TEXT_LEN,
};
use super::response::{created, page_request, paginate};
use super::state::{delete_shadowed, file_defined, Api};
use crate::consumer::index::Product;
use crate::consumer::{ApiProduct, Origin, QuotaSettings};
use crate::store::{StoreError, Write};

const MAX_PATH_LEN: usize = 2048;

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

fn product_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("product `{name}` not found"))
}

pub(super) async fn list_products(State(api): State<Api>, RawQuery(q): RawQuery) -> ApiResult {
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

pub(super) async fn get_product(
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

pub(super) async fn create_product(
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

pub(super) async fn put_product(
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

pub(super) async fn delete_product(
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
