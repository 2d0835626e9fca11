//! What every handler shares: the consumers (configuration-file objects beside the store's),
//! the lock that orders this process's writes, and the lookups and read-modify-write of
//! products and apps.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::sync::Mutex;

use super::errors::{ApiError, ApiResult, WRITE_ATTEMPTS};
use crate::consumer::service::Consumers;
use crate::consumer::{ApiProduct, App, Origin};
use crate::store::{StoreError, Write};

#[derive(Clone)]
pub(super) struct Api {
    pub(super) consumers: Arc<Consumers>,
    /// Serializes this process's writes: read-modify-write of an app (adding a key, a PUT
    /// that keeps the keys) and the reference checks between apps and products.
    pub(super) write: Arc<Mutex<()>>,
}

pub(super) fn app_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("app `{name}` not found"))
}

pub(super) fn file_defined(kind: &str, name: &str) -> ApiError {
    ApiError::FileDefined(format!(
        "{kind} `{name}` is defined in a configuration file; change it there, not through the API"
    ))
}

/// The answer to a DELETE of a name a configuration file defines: 204 when the store held
/// an object of that name (shadowed by the file's, and now removed), 409 `FileDefined`
/// when there was nothing but the file's to delete.
pub(super) fn delete_shadowed(
    kind: &str,
    name: &str,
    deleted: Result<(), StoreError>,
) -> ApiResult {
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
    pub(super) async fn product(&self, name: &str) -> Result<Option<ApiProduct>, ApiError> {
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
    pub(super) async fn app(&self, name: &str) -> Result<Option<App>, ApiError> {
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
    pub(super) async fn update_store_app<R, F, Fut>(
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

    pub(super) async fn check_products_exist(&self, products: &[String]) -> Result<(), ApiError> {
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
