//! The process-wide outgoing HTTP client: pooled connections (hyper-util), HTTP/1.1 and
//! HTTP/2 (ALPN over TLS, or prior knowledge for `http2: true` on plain HTTP), rustls with
//! the system roots (plus, for a callout's `caFile`, extra CAs). Service callouts, JWKS fetches and Google token requests share it, so
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
    /// No connection was made (refused, DNS, TLS handshake): the request never left.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The request may have reached the server (e.g. the connection closed before the
    /// answer).
    #[error("request failed: {0}")]
    Failed(String),
}

impl HttpError {
    /// A connection that never carried the request: safe to retry any method. Set from
    /// hyper-util's own flag, not from the message ("connection reset" is not one).
    pub fn is_connect(&self) -> bool {
        matches!(self, HttpError::Connect(_))
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

/// The system roots, read once per process: reading them is slow, and every `Services`
/// (tests and `validate` make many) builds a client.
static ROOTS: LazyLock<rustls::RootCertStore> = LazyLock::new(|| {
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
    roots
});

static TLS: LazyLock<rustls::ClientConfig> = LazyLock::new(|| tls_config(ROOTS.clone()));

fn tls_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Clients that also trust extra CAs, by SHA-256 of the PEM: policies naming the same CA
/// file share one pool, across reloads too.
static WITH_EXTRA_ROOTS: LazyLock<
    parking_lot::Mutex<std::collections::HashMap<[u8; 32], HttpClient>>,
> = LazyLock::new(Default::default);

fn connector_with(tls: rustls::ClientConfig) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

impl HttpClient {
    pub fn new() -> Self {
        Self::with_connector(connector_with(TLS.clone()))
    }

    /// A client that trusts the system roots and the CA certificates in `pem` (an internal
    /// CA, for a `caFile`). Fails when `pem` holds no usable certificate.
    pub fn with_extra_roots(pem: &[u8]) -> Result<Self, String> {
        Self::with_tls(Some(pem), None)
    }

    /// A client that trusts the system roots plus the CA certificates in `ca_pem` (when
    /// given) and, with `client`, presents that certificate chain and private key (PEM) to
    /// servers that ask for one (mutual TLS). Clients are shared by a digest of all of it.
    pub fn with_tls(ca_pem: Option<&[u8]>, client: Option<(&[u8], &[u8])>) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [ca_pem, client.map(|c| c.0), client.map(|c| c.1)] {
            // Length-prefixed, absent parts distinct from empty ones.
            match part {
                Some(p) => {
                    h.update([1u8]);
                    h.update((p.len() as u64).to_le_bytes());
                    h.update(p);
                }
                None => h.update([0u8]),
            }
        }
        let digest: [u8; 32] = h.finalize().into();
        let mut cache = WITH_EXTRA_ROOTS.lock();
        if let Some(c) = cache.get(&digest) {
            return Ok(c.clone());
        }
        let mut roots = ROOTS.clone();
        if let Some(pem) = ca_pem {
            let mut added = 0;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("not a PEM certificate file: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("unusable CA certificate: {e}"))?;
                added += 1;
            }
            if added == 0 {
                return Err("no PEM certificate in the file".into());
            }
        }
        let tls = match client {
            None => tls_config(roots),
            Some((cert_pem, key_pem)) => {
                let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client certificate: not PEM: {e}"))?;
                if chain.is_empty() {
                    return Err("client certificate: no PEM certificate in the file".into());
                }
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| format!("client key: no PEM private key: {e}"))?;
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports rustls' default protocol versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate and key: {e}"))?
            }
        };
        let client = Self::with_connector(connector_with(tls));
        cache.insert(digest, client.clone());
        Ok(client)
    }

    fn with_connector(conn: HttpsConnector<HttpConnector>) -> Self {
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
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                if e.is_connect() {
                    HttpError::Connect(msg)
                } else {
                    HttpError::Failed(msg)
                }
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
