//! Google OAuth access tokens and OIDC ID tokens for the gateway's own identity, minted
//! for `AssignMessage`'s `googleToken` to send upstream (Vertex AI, Cloud Run, ...).
//!
//! Two sources, speaking Google's real protocols:
//! - the GKE/GCE metadata server (workload identity): `GET
//!   /computeMetadata/v1/instance/service-accounts/default/token?scopes=…` (JSON
//!   `access_token`, `expires_in`) and `…/identity?audience=…&format=full` (a JWT), with
//!   `Metadata-Flavor: Google`. Host from `metadataHost`, else `GCE_METADATA_HOST`, else
//!   `metadata.google.internal`.
//! - a service-account key file: an RS256 JWT-bearer assertion signed with the key,
//!   posted to the file's `token_uri` (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`),
//!   answered with `access_token` (scopes) or `id_token` (`target_audience`).
//!
//! Tokens are cached per (source, kind, scopes/audience) for the process, used without
//! waiting while fresh, refreshed by one background fetch once past half their life (or
//! within 5 minutes of expiry), and fetched by one caller for all waiting ones when
//! missing or expired. A source that is down fails fast: after a failed fetch, callers
//! needing a token get the error for `RETRY_AFTER_FAILURE` without a new attempt.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use parking_lot::Mutex;
use prometheus::IntCounterVec;
use serde::Deserialize;
// tokio's clock: the real one in the server, and one tests can advance (refresh timing).
use tokio::time::Instant;

use crate::http_client::HttpClient;
use crate::refresh::{Entry, Intervals, Refused, Slot, Why};

const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// After a failed fetch, fail at once for this long instead of piling up new attempts.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// Do not use a token this close to its expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// Longest lifetime believed from a token endpoint: `expires_in` and an ID token's `exp`
/// come from outside, and `Instant + Duration` panics past the clock's range.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// When a token fetched at `now` with `lifetime` expires, and when to refresh it (halfway,
/// or five minutes before expiry if later).
fn token_times(now: Instant, lifetime: Duration) -> (Instant, Instant) {
    let lifetime = lifetime.min(MAX_LIFETIME);
    let refresh_in = (lifetime / 2).max(lifetime.saturating_sub(Duration::from_secs(300)));
    (now + lifetime, now + refresh_in)
}

static FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_google_token_fetches_total",
            "Google token fetches by source (metadata, key_file), kind (access, id) and result",
        ),
        &["source", "kind", "result"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "google token metric not registered");
    }
    c
});

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("service account key file: {0}")]
    KeyFile(String),
    #[error("token request to {url} failed: {message}")]
    Fetch { url: String, message: String },
    #[error("token endpoint answer unusable: {0}")]
    Answer(String),
}

/// A service-account key file (the JSON Google issues), reduced to what signing needs.
#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default = "default_token_uri")]
    token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Parses a key file and checks the key can sign.
    pub fn parse(text: &[u8]) -> Result<Self, TokenError> {
        let k: Self =
            serde_json::from_slice(text).map_err(|e| TokenError::KeyFile(e.to_string()))?;
        jsonwebtoken::EncodingKey::from_rsa_pem(k.private_key.as_bytes())
            .map_err(|e| TokenError::KeyFile(format!("private_key: {e}")))?;
        let uri: hyper::Uri = k
            .token_uri
            .parse()
            .map_err(|e| TokenError::KeyFile(format!("token_uri: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(TokenError::KeyFile("token_uri must be http(s)".into()));
        }
        Ok(k)
    }
}

/// Where tokens come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Metadata server at this host (`host[:port]`).
    Metadata(String),
    ServiceAccount(Arc<ServiceAccountKey>),
}

impl Source {
    /// The metadata server from `GCE_METADATA_HOST`, as Google's client libraries do.
    pub fn metadata_default() -> Self {
        let host = std::env::var("GCE_METADATA_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_METADATA_HOST.into());
        Source::Metadata(host)
    }

    fn id(&self) -> String {
        match self {
            Source::Metadata(h) => format!("metadata:{h}"),
            // The key itself is part of the id: a rotated key file (same email) gets a new
            // slot, so its tokens are signed with the new key, not the one loaded first.
            Source::ServiceAccount(k) => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(k.private_key.as_bytes());
                let fp: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("sa:{}:{}:{fp}", k.client_email, k.token_uri)
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Source::Metadata(_) => "metadata",
            Source::ServiceAccount(_) => "key_file",
        }
    }
}

/// What kind of token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Access { scopes: Vec<String> },
    Id { audience: String },
}

impl Kind {
    fn label(&self) -> &'static str {
        match self {
            Kind::Access { .. } => "access",
            Kind::Id { .. } => "id",
        }
    }
}

/// A minted token (its value is `.value`).
pub type Token = Entry<String>;

/// What [`TokenSlot::get`] can answer without waiting: `Ready`, `Missing` (call
/// [`TokenSlot::fetch`]) or `Failed` (the last fetch failed a moment ago: fail without a new
/// attempt).
pub type Cached = crate::refresh::Cached<String, TokenError>;

/// One cached token and its refresh machinery: a refresh slot ([`crate::refresh`]) over a
/// token source.
#[derive(Debug)]
pub struct TokenSlot {
    slot: Arc<Slot<TokenSource>>,
}

/// The minting half of a [`TokenSlot`].
#[derive(Debug)]
struct TokenSource {
    source: Source,
    kind: Kind,
    http: HttpClient,
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "google {} token from {}",
            self.kind.label(),
            self.source.label()
        )
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `exp` of a JWT, read without verifying it (we asked for it; we only need its life).
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

impl TokenSlot {
    /// The cached token when usable; starts a background refresh when it is getting old.
    pub fn get(&self) -> Cached {
        self.slot.get()
    }

    /// Fetches a token, unless another caller fetched one while this one waited.
    pub async fn fetch(&self) -> Result<Arc<Token>, TokenError> {
        self.slot.refresh(false).await.map_err(|r| match r {
            Refused::Failed(e) | Refused::BackingOff(e) => e,
            // Token slots never force a fetch.
            Refused::TooSoon => TokenError::Answer("token refresh refused as too soon".into()),
        })
    }
}

impl crate::refresh::Source for TokenSource {
    type Value = String;
    type Error = TokenError;

    async fn fetch(&self, _why: Why) -> Result<Token, TokenError> {
        let result = self.mint().await;
        FETCHES
            .with_label_values(&[
                self.source.label(),
                self.kind.label(),
                if result.is_ok() { "ok" } else { "error" },
            ])
            .inc();
        let (value, lifetime) = result?;
        let now = Instant::now();
        let (expires, refresh_at) = token_times(now, lifetime);
        tracing::debug!(
            source = self.source.label(),
            kind = self.kind.label(),
            lifetime_s = lifetime.as_secs(),
            "google token minted"
        );
        // Not used within EXPIRY_MARGIN of its expiry.
        let usable_until = expires.checked_sub(EXPIRY_MARGIN).unwrap_or(now);
        Ok(Entry::new(value, refresh_at, Some(usable_until)))
    }
}

impl TokenSource {
    /// One request to the source: (token, lifetime).
    async fn mint(&self) -> Result<(String, Duration), TokenError> {
        let (url, req) = match &self.source {
            Source::Metadata(host) => {
                let base =
                    format!("http://{host}/computeMetadata/v1/instance/service-accounts/default");
                let url = match &self.kind {
                    Kind::Access { scopes } => {
                        format!(
                            "{base}/token?scopes={}",
                            crate::vars::percent_encode(&scopes.join(","))
                        )
                    }
                    Kind::Id { audience } => {
                        format!(
                            "{base}/identity?audience={}&format=full",
                            crate::vars::percent_encode(audience)
                        )
                    }
                };
                let req = hyper::Request::get(&url)
                    .header("metadata-flavor", "Google")
                    .body(Full::new(Bytes::new()));
                (url, req)
            }
            Source::ServiceAccount(key) => {
                let assertion = self.assertion(key)?;
                let form = format!(
                    "grant_type={}&assertion={}",
                    crate::vars::percent_encode("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    crate::vars::percent_encode(&assertion)
                );
                let req = hyper::Request::post(&key.token_uri)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from(form)));
                (key.token_uri.clone(), req)
            }
        };
        let fetch_err = |message: String| TokenError::Fetch {
            url: url.clone(),
            message,
        };
        let req = req.map_err(|e| fetch_err(e.to_string()))?;
        let resp = self
            .http
            .send(req, false, FETCH_TIMEOUT, MAX_TOKEN_RESPONSE)
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        if resp.status != 200 {
            let detail =
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)]).into_owned();
            return Err(fetch_err(format!("status {}: {detail}", resp.status)));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: Option<String>,
            id_token: Option<String>,
            expires_in: Option<u64>,
        }
        let id_from_jwt = |jwt: String| -> Result<(String, Duration), TokenError> {
            let exp =
                jwt_exp(&jwt).ok_or_else(|| TokenError::Answer("ID token has no exp".into()))?;
            let life = exp.saturating_sub(now_unix());
            if life == 0 {
                return Err(TokenError::Answer("ID token already expired".into()));
            }
            Ok((jwt, Duration::from_secs(life)))
        };
        match (&self.source, &self.kind) {
            // The metadata server answers an ID token as the bare JWT.
            (Source::Metadata(_), Kind::Id { .. }) => {
                let jwt = String::from_utf8(resp.body.to_vec())
                    .map_err(|_| TokenError::Answer("ID token is not text".into()))?;
                id_from_jwt(jwt.trim().to_owned())
            }
            (_, kind) => {
                let a: Answer = serde_json::from_slice(&resp.body)
                    .map_err(|e| TokenError::Answer(format!("not JSON: {e}")))?;
                match kind {
                    Kind::Access { .. } => {
                        let t = a
                            .access_token
                            .filter(|t| !t.is_empty())
                            .ok_or_else(|| TokenError::Answer("no access_token".into()))?;
                        let life = a
                            .expires_in
                            .filter(|e| *e > 0)
                            .ok_or_else(|| TokenError::Answer("no expires_in".into()))?;
                        Ok((t, Duration::from_secs(life)))
                    }
                    Kind::Id { .. } => {
                        let t = a
                            .id_token
                            .filter(|t| !t.is_empty())
                            .ok_or_else(|| TokenError::Answer("no id_token".into()))?;
                        id_from_jwt(t)
                    }
                }
            }
        }
    }

    /// The signed JWT-bearer assertion (RFC 7523) for a service-account key.
    fn assertion(&self, key: &ServiceAccountKey) -> Result<String, TokenError> {
        let now = now_unix();
        let mut claims = serde_json::json!({
            "iss": key.client_email,
            "aud": key.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        match &self.kind {
            Kind::Access { scopes } => claims["scope"] = scopes.join(" ").into(),
            Kind::Id { audience } => {
                claims["target_audience"] = audience.clone().into();
                claims["sub"] = key.client_email.clone().into();
            }
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid.clone_from(&key.private_key_id);
        let enc = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
            .map_err(|e| TokenError::KeyFile(e.to_string()))?;
        jsonwebtoken::encode(&header, &claims, &enc).map_err(|e| TokenError::KeyFile(e.to_string()))
    }
}

/// Every token slot of the process.
#[derive(Debug, Default)]
pub struct GoogleTokens {
    slots: Mutex<HashMap<String, Arc<TokenSlot>>>,
}

impl GoogleTokens {
    /// The shared slot for `source` and `kind`.
    pub fn slot(&self, source: Source, kind: Kind, http: &HttpClient) -> Arc<TokenSlot> {
        let key = format!("{}|{kind:?}", source.id());
        let mut slots = self.slots.lock();
        Arc::clone(slots.entry(key).or_insert_with(|| {
            let source = TokenSource {
                source,
                kind,
                http: http.clone(),
            };
            let intervals = Intervals {
                backoff: RETRY_AFTER_FAILURE,
                forced: RETRY_AFTER_FAILURE,
            };
            Arc::new(TokenSlot {
                slot: Arc::new(Slot::new(source, intervals)),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn huge_token_lifetimes_are_capped_not_an_overflow() {
        let now = super::Instant::now();
        let (expires, refresh) = super::token_times(now, super::Duration::from_secs(u64::MAX));
        assert_eq!(expires - now, super::MAX_LIFETIME);
        assert!(refresh > now && refresh < expires);
        let (expires, refresh) = super::token_times(now, super::Duration::from_secs(3600));
        assert_eq!(expires - now, super::Duration::from_secs(3600));
        assert_eq!(refresh - now, super::Duration::from_secs(3300));
    }

    use super::*;

    #[test]
    fn form_encoding_and_exp() {
        assert_eq!(
            crate::vars::percent_encode("urn:ietf:params:oauth:grant-type:jwt-bearer"),
            "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        );
        assert_eq!(crate::vars::percent_encode("a b/c"), "a%20b%2Fc");
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert_eq!(jwt_exp(&format!("x.{}.y", b64(r#"{"exp":42}"#))), Some(42));
        assert_eq!(jwt_exp("garbage"), None);
    }

    #[test]
    fn key_file_errors() {
        assert!(matches!(
            ServiceAccountKey::parse(b"{}"),
            Err(TokenError::KeyFile(_))
        ));
        let bad = br#"{"client_email":"a@b","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}"#;
        assert!(matches!(
            ServiceAccountKey::parse(bad),
            Err(TokenError::KeyFile(_))
        ));
    }
}
