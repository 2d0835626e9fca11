//! The process-wide outgoing HTTP client: pooled connections (hyper-util), HTTP/1.1 and
//! HTTP/2 (ALPN over TLS, or prior knowledge for `http2: true` on plain HTTP), rustls with
//! the system roots. Service callouts, JWKS fetches and Google token requests share it, so
//! connections are reused across policies and configuration reloads.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type Inner = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why an outgoing call produced no usable response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request failed: {0}")]
    Failed(String),
}

impl HttpError {
    /// A connection that never carried the request: safe to retry any method.
    pub fn is_connect(&self) -> bool {
        matches!(self, HttpError::Failed(m) if m.contains("connect"))
    }
}

/// A complete response, body read (up to the caller's limit).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct HttpClient {
    /// HTTP/1.1, or HTTP/2 when TLS negotiates it.
    auto: Inner,
    /// HTTP/2 with prior knowledge (h2c), for callouts that ask for it.
    h2: Inner,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// The TLS settings, built once per process: reading the system roots is slow, and every
/// `Services` (tests and `validate` make many) builds a client.
static TLS: LazyLock<rustls::ClientConfig> = LazyLock::new(|| {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "reading system CA certificates");
    }
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        // No CA bundle in the image: plain HTTP still works, HTTPS calls fail clearly.
        tracing::warn!("no system CA certificates; HTTPS calls will fail");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
});

fn connector() -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(TLS.clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

impl HttpClient {
    pub fn new() -> Self {
        let conn = connector();
        let auto = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(true)
            .build(conn);
        Self { auto, h2 }
    }

    /// Sends `req` and reads the whole response, within `timeout` (connect, headers and
    /// body together), refusing bodies over `max_body` bytes.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        http2_prior_knowledge: bool,
        timeout: Duration,
        max_body: usize,
    ) -> Result<HttpResponse, HttpError> {
        let client = if http2_prior_knowledge {
            &self.h2
        } else {
            &self.auto
        };
        let call = async {
            let resp = client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                if e.is_connect() {
                    msg = format!("connect: {msg}");
                }
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                HttpError::Failed(msg)
            })?;
            let (parts, body) = resp.into_parts();
            if let Some(len) = parts
                .headers
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
            {
                if len > max_body {
                    return Err(HttpError::TooLarge(max_body));
                }
            }
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        HttpError::TooLarge(max_body)
                    } else {
                        HttpError::Failed(format!("reading body: {e}"))
                    }
                })?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(timeout)),
        }
    }
}

/// `max-age` of a `Cache-Control` header, when there is one and it allows caching.
pub fn cache_max_age(headers: &HeaderMap) -> Option<Duration> {
    let cc = headers.get(hyper::header::CACHE_CONTROL)?.to_str().ok()?;
    let mut max_age = None;
    for d in cc.split(',').map(str::trim) {
        let d = d.to_ascii_lowercase();
        if d == "no-store" || d == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            max_age = v
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    max_age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control() {
        let mut h = HeaderMap::new();
        assert_eq!(cache_max_age(&h), None);
        h.insert(
            "cache-control",
            "public, max-age=19800, must-revalidate".parse().unwrap(),
        );
        assert_eq!(cache_max_age(&h), Some(Duration::from_secs(19800)));
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(cache_max_age(&h), Some(Duration::ZERO));
        h.insert("cache-control", "max-age=abc".parse().unwrap());
        assert_eq!(cache_max_age(&h), None);
    }
}
