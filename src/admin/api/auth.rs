//! How the management API authenticates its callers: a bearer token, compared in constant
//! time.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::errors::ApiError;

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

/// SHA-256 of the expected token (`None`: insecure). Comparing fixed-size digests in
/// constant time reveals neither the token's content nor its length.
pub(super) struct Guard {
    expected: Option<[u8; 32]>,
}

impl Guard {
    pub(super) fn new(auth: &ApiAuth) -> Self {
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

pub(super) async fn authenticate(
    State(guard): State<Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
    if guard.admits(req.headers()) {
        next.run(req).await
    } else {
        ApiError::Unauthenticated.into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

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
}
