//! What list and create answers carry beyond the resource: pages (`pageSize`,
//! `pageToken`, `nextPageToken`) and the 201 with its `Location`.

use std::collections::BTreeMap;
use std::ops::Bound;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;

use super::errors::ApiError;
use super::request::show;

/// List page size when `pageSize` is absent or 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest list page; larger `pageSize` values are lowered to it.
pub const MAX_PAGE_SIZE: usize = 1000;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListView<T> {
    items: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

pub(super) struct PageRequest {
    pub(super) size: usize,
    pub(super) after: Option<String>,
}

pub(super) fn page_request(query: Option<&str>) -> Result<PageRequest, ApiError> {
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
pub(super) fn paginate<T: Serialize + Clone>(
    items: &BTreeMap<String, T>,
    page: &PageRequest,
) -> Response {
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

pub(super) fn created(location: String, body: impl Serialize) -> Response {
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
