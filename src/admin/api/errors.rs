//! Everything a management API call can fail with, and how a failure is answered.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::store::StoreError;

/// Read-modify-write rounds of one API write before it answers 409: each round that loses
/// to a concurrent write (through another replica) reads the object again.
pub(super) const WRITE_ATTEMPTS: usize = 5;

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
    pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
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

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) async fn wrong_method() -> ApiError {
    ApiError::MethodNotAllowed
}
