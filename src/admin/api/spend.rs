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

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::Value;
    use tower::ServiceExt;

    use crate::admin::api::{router, ApiAuth};
    use crate::consumer::service::Consumers;
    use crate::consumer::{ApiProduct, App, AppStatus, Origin};
    use crate::pipeline::{Direction, Hook, Outcome};
    use crate::policies::llm_test_support::{llm_exchange, verified};
    use crate::policies::{llm_cost_budget, BuildContext};
    use crate::ratelimit::{Counters, FakeClock};
    use crate::services::Services;
    use crate::store::{Store, Write};

    async fn get(r: &axum::Router, path: &str) -> (StatusCode, Value) {
        let resp = r
            .clone()
            .oneshot(
                axum::http::Request::get(path)
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

    #[tokio::test]
    async fn spend_per_app_and_product_is_read_without_counting() {
        let store = Store::memory();
        store
            .put_product(
                &ApiProduct {
                    name: "spend-gold".into(),
                    description: String::new(),
                    operations: vec![],
                    quota: None,
                    llm_token_quota: None,
                    approval_type: Default::default(),
                    attributes: Default::default(),
                    origin: Origin::Api,
                    revision: 0,
                },
                Write::Create,
            )
            .await
            .unwrap();
        store
            .put_app(
                &App {
                    name: "spend-app".into(),
                    developer_email: "spend@example.com".into(),
                    status: AppStatus::Approved,
                    products: vec!["spend-gold".into()],
                    keys: vec![],
                    attributes: Default::default(),
                    origin: Origin::Api,
                    revision: 0,
                },
                Write::Create,
            )
            .await
            .unwrap();
        let r = router(Consumers::new(store), ApiAuth::Insecure);
        let clock = FakeClock::new(1_800_000_000_000);
        let services = Services {
            counters: Counters::memory(clock, 100),
            ..Default::default()
        };
        let build = |name: &str, per: &str| {
            let ctx = BuildContext {
                name: name.into(),
                config_dir: None,
                services: services.clone(),
            };
            llm_cost_budget::build(
                &ctx,
                serde_norway::from_str(&format!(
                    "{{currency: USD, budget: 2, per: {per}, timeUnit: day, prices: [{{model: '*', input: 10, output: 20}}]}}"
                ))
                .unwrap(),
            )
            .unwrap()
        };
        let per_app = build("spend-api-app", "app");
        let per_product = build("spend-api-product", "product");
        // One request reserves 1000 × 10 + 500 × 20 micros = $0.02 on both budgets.
        let mut ex = llm_exchange("m", 1000, Some(500));
        ex.state.add_app(
            "verifyapikey.v.".into(),
            verified("spend-app", "spend@example.com", "spend-gold", None),
        );
        for p in [&per_app, &per_product] {
            assert!(matches!(
                p.run(&mut ex, Direction::Request),
                Hook::Ready(Outcome::Continue)
            ));
        }
        for _ in 0..2 {
            let (status, body) = get(&r, "/v1/apps/spend-app/spend").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let b = body["budgets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["policy"] == "spend-api-app")
                .cloned()
                .unwrap();
            assert_eq!(b["per"], "app");
            assert_eq!(b["currency"], "USD");
            assert_eq!(b["budget"], 2.0);
            assert_eq!(b["spent"], 0.02, "reading twice counts nothing");
            assert_eq!(b["remaining"], 1.98);
            assert!(b["periodEnd"].as_i64().unwrap() > b["periodStart"].as_i64().unwrap());
        }
        let (status, body) = get(&r, "/v1/products/spend-gold/spend").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["policy"] == "spend-api-product" && b["spent"] == 0.02));
        assert!(!body["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["policy"] == "spend-api-app"));
        assert_eq!(
            get(&r, "/v1/apps/nobody/spend").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get(&r, "/v1/products/nothing/spend").await.0,
            StatusCode::NOT_FOUND
        );
        drop(ex);
    }
}
