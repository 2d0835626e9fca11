//! `GET /v1/apps/{name}/spend` and `GET /v1/products/{name}/spend`: what the cost budgets
//! (`LlmCostBudget` policies of the running configuration) have counted in the current
//! period, read without counting (a zero count-only ask on every backend).
//!
//! ```json
//! {"name": "app-a", "budgets": [{"policy": "monthly-spend", "per": "app", "currency": "USD",
//!   "budget": 50.0, "spent": 12.5, "remaining": 37.5,
//!   "periodStart": 1772323200000, "periodEnd": 1775001600000}]}
//! ```
//!
//! An app's answer lists the budgets counted per app and per developer (its developer's);
//! a product's, those counted per product. Amounts are in the budget's currency (counted in
//! millionths). 404 when the app or product does not exist; 503 when the counter store
//! cannot be read.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::errors::{ApiError, ApiResult};
use super::request::{check_name, path_param};
use super::state::{app_not_found, Api};
use crate::policies::llm_cost_budget::{budgets, Per};

async fn spend_of(targets: Vec<(Per, String)>) -> Result<Vec<serde_json::Value>, ApiError> {
    let mut out = Vec::new();
    for b in budgets() {
        for (per, identity) in &targets {
            if b.per == *per {
                let s = b
                    .spend(identity)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("reading the counters: {e}")))?;
                out.push(serde_json::to_value(s).map_err(|e| ApiError::Internal(e.to_string()))?);
            }
        }
    }
    Ok(out)
}

pub(super) async fn app_spend(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let app = api.app(&name).await?.ok_or_else(|| app_not_found(&name))?;
    let budgets = spend_of(vec![
        (Per::App, app.name.clone()),
        (Per::Developer, app.developer_email.clone()),
    ])
    .await?;
    Ok(Json(json!({"name": app.name, "budgets": budgets})).into_response())
}

pub(super) async fn product_spend(
    State(api): State<Api>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let name = path_param(name)?;
    check_name(&name, "name")?;
    let product = api
        .product(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("product `{name}` not found")))?;
    let budgets = spend_of(vec![(Per::Product, product.name.clone())]).await?;
    Ok(Json(json!({"name": product.name, "budgets": budgets})).into_response())
}
