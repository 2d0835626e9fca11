//! JSON Web Key sets for `VerifyJwt`: parsed once into ready-to-use decoding keys, and,
//! for sets served at a URL, a process-wide cache that outlives configuration reloads.
//!
//! A remote set is fetched once and kept for the server's `Cache-Control: max-age` (else the
//! policy's default), clamped to [1 min, 1 day]. When it expires, requests keep using it
//! while one background fetch replaces it (a JWKS endpoint that is briefly down does not
//! fail traffic). A token whose `kid` is not in the set triggers one fetch for everyone
//! waiting, at most once per `minRefresh` interval: a stream of tokens with made-up `kid`s
//! cannot turn into a stream of fetches. After a failed fetch, no new attempt is made for
//! `minRefresh` either: requests that need keys get 503 at once instead of queueing.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::Mutex;
use prometheus::IntCounterVec;
// tokio's clock: the real one in the server, and one tests can advance (expiry, refresh).
use tokio::time::Instant;

use crate::http_client::{cache_max_age, HttpClient};
use crate::refresh::{Cached, Entry, Intervals, Refused, Slot, Source, Why};

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 512 * 1024;
const MIN_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

static FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_jwks_fetches_total",
            "JWKS fetches by reason (initial, expired, unknown_kid) and result (ok, error)",
        ),
        &["reason", "result"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "jwks metric not registered");
    }
    c
});

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JwksError {
    #[error("JWKS is not a JSON object with a `keys` array: {0}")]
    Format(String),
    #[error("JWKS has no usable signing key")]
    NoKeys,
    #[error("fetching JWKS from {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("JWKS refresh skipped: the last attempt was less than {0:?} ago")]
    RateLimited(Duration),
}

/// Which algorithms a key can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Family {
    pub fn of(alg: Algorithm) -> Self {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
            Algorithm::ES256 => Family::P256,
            Algorithm::ES384 => Family::P384,
            Algorithm::EdDSA => Family::Ed25519,
            _ => Family::Rsa,
        }
    }
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when the set pins one.
    pub alg: Option<Algorithm>,
    pub family: Family,
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish()
    }
}

impl Key {
    pub fn hmac(secret: &[u8]) -> Self {
        Self {
            kid: None,
            alg: None,
            family: Family::Hmac,
            key: DecodingKey::from_secret(secret),
        }
    }

    fn from_jwk(jwk: &Jwk) -> Result<Option<Self>, String> {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return Ok(None);
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::OctetKey(_) => Family::Hmac,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Family::P256,
                EllipticCurve::P384 => Family::P384,
                _ => return Ok(None),
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => Family::Ed25519,
                _ => return Ok(None),
            },
        };
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(ka) => {
                let name = serde_json::to_value(ka)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                match Algorithm::from_str(&name) {
                    Ok(a) => Some(a),
                    // An encryption algorithm (RSA-OAEP, ...): not a signing key.
                    Err(_) => return Ok(None),
                }
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        Ok(Some(Self {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            key,
        }))
    }

    /// True when this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.family == Family::of(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// A parsed key set.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

/// How a token's key was looked for.
pub enum Lookup<'a> {
    Found(&'a Key),
    /// The token names a `kid` the set does not have.
    UnknownKid,
    /// No `kid`, and not exactly one key fits the algorithm.
    Ambiguous,
}

impl KeySet {
    /// Parses a JWKS document. Keys that are malformed, for encryption, or of a kind
    /// tollgate cannot verify are skipped (logged), so one odd key does not void the set.
    pub fn parse(doc: &[u8]) -> Result<Self, JwksError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc = serde_json::from_slice(doc).map_err(|e| JwksError::Format(e.to_string()))?;
        let mut keys = Vec::with_capacity(doc.keys.len());
        for (i, v) in doc.keys.into_iter().enumerate() {
            let parsed = serde_json::from_value::<Jwk>(v)
                .map_err(|e| e.to_string())
                .and_then(|jwk| Key::from_jwk(&jwk));
            match parsed {
                Ok(Some(k)) => keys.push(k),
                Ok(None) => {}
                Err(e) => tracing::warn!(index = i, error = %e, "JWKS key skipped"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoKeys);
        }
        Ok(Self { keys })
    }

    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid) && k.accepts(alg))
                .map_or(Lookup::UnknownKid, Lookup::Found),
            None => {
                let mut fit = self.keys.iter().filter(|k| k.accepts(alg));
                match (fit.next(), fit.next()) {
                    (Some(k), None) => Lookup::Found(k),
                    _ => Lookup::Ambiguous,
                }
            }
        }
    }
}

/// Settings of one remote key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteOptions {
    /// Lifetime when the server sends no `max-age`.
    pub default_ttl: Duration,
    /// Least time between two fetches caused by unknown `kid`s or failures.
    pub min_refresh: Duration,
    pub timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(300),
            min_refresh: Duration::from_secs(30),
            timeout: Duration::from_secs(3),
        }
    }
}

/// A fetched set.
#[derive(Debug)]
pub struct Fetched {
    pub set: KeySet,
    /// Unique per fetch (never 0): results verified with one set are not reused with the next.
    pub generation: u64,
}

/// The set as the cache holds it (with its refresh time; deref to [`Fetched`]).
pub type Current = Arc<Entry<Fetched>>;

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A key set served at a URL, shared by every policy that names the URL: a refresh slot
/// ([`crate::refresh`]) over the URL. Sets are never dropped for age (no `usable_until`):
/// a stale set keeps verifying while its refresh fails.
#[derive(Debug)]
pub struct RemoteKeySet {
    slot: Arc<Slot<KeySource>>,
}

/// The fetching half of a [`RemoteKeySet`].
#[derive(Debug)]
struct KeySource {
    url: String,
    opts: RemoteOptions,
    http: HttpClient,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JWKS {}", self.url)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Reason {
    Initial,
    Expired,
    UnknownKid,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Expired => "expired",
            Reason::UnknownKid => "unknown_kid",
        }
    }
}

impl RemoteKeySet {
    pub fn url(&self) -> &str {
        &self.slot.source().url
    }

    /// The cached set, fresh or stale. When stale, starts one background refresh.
    pub fn cached(&self) -> Option<Current> {
        match self.slot.get() {
            Cached::Ready(cur) => Some(cur),
            Cached::Missing | Cached::Failed(_) => None,
        }
    }

    /// Starts fetching the set if nothing is cached yet (at configuration load).
    pub fn prefetch(&self) {
        self.slot.prefetch();
    }

    /// Fetches the set again, unless another caller did while this one waited, or the
    /// last attempt was under `min_refresh` ago. After a failure, back off whatever the
    /// reason; unknown `kid`s may force a fetch at most once per interval (the initial and
    /// expiry fetches do not count). Returns the set to use.
    pub async fn refresh(&self, reason: Reason) -> Result<Current, JwksError> {
        let forced = matches!(reason, Reason::UnknownKid);
        self.slot.refresh(forced).await.map_err(|r| match r {
            Refused::Failed(e) => e,
            Refused::BackingOff(_) | Refused::TooSoon => {
                JwksError::RateLimited(self.slot.source().opts.min_refresh)
            }
        })
    }
}

impl Source for KeySource {
    type Value = Fetched;
    type Error = JwksError;

    async fn fetch(&self, why: Why) -> Result<Entry<Fetched>, JwksError> {
        let reason = match why {
            Why::Initial => Reason::Initial,
            Why::Due => Reason::Expired,
            Why::Forced => Reason::UnknownKid,
        };
        let result = self.fetch_once().await;
        FETCHES
            .with_label_values(&[reason.as_str(), if result.is_ok() { "ok" } else { "error" }])
            .inc();
        let entry = result?;
        tracing::info!(url = %self.url, keys = entry.set.keys.len(), reason = reason.as_str(), "JWKS fetched");
        Ok(entry)
    }
}

impl KeySource {
    async fn fetch_once(&self) -> Result<Entry<Fetched>, JwksError> {
        let err = |message: String| JwksError::Fetch {
            url: self.url.clone(),
            message,
        };
        let req = hyper::Request::get(&self.url)
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(e.to_string()))?;
        let resp = self
            .http
            .send(req, false, self.opts.timeout, MAX_JWKS_BYTES)
            .await
            .map_err(|e| err(e.to_string()))?;
        if resp.status != 200 {
            return Err(err(format!("status {}", resp.status)));
        }
        let set = KeySet::parse(&resp.body).map_err(|e| err(e.to_string()))?;
        let ttl = cache_max_age(&resp.headers)
            .unwrap_or(self.opts.default_ttl)
            .clamp(MIN_TTL, MAX_TTL);
        let fetched = Fetched {
            set,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        // Refreshed once expired; used, stale, until a refresh succeeds.
        Ok(Entry::new(fetched, Instant::now() + ttl, None))
    }
}

/// Every remote key set of the process, by URL and options.
#[derive(Debug, Default)]
pub struct Jwks {
    sets: Mutex<HashMap<(String, RemoteOptions), Arc<RemoteKeySet>>>,
}

impl Jwks {
    /// The shared set for `url` with `opts`. Policies that agree on both share one set
    /// (one cache, one fetch); an edited `cacheSeconds`, `minRefreshSeconds` or `timeoutMs`
    /// gets a set of its own at the next reload instead of the first policy's settings.
    pub fn remote(&self, url: &str, opts: RemoteOptions, http: &HttpClient) -> Arc<RemoteKeySet> {
        let mut sets = self.sets.lock();
        let key = (url.to_owned(), opts);
        if !sets.contains_key(&key) {
            // Sets no configuration uses any more (options edited away) go now.
            sets.retain(|_, s| Arc::strong_count(s) > 1);
        }
        Arc::clone(sets.entry(key).or_insert_with(|| {
            let source = KeySource {
                url: url.to_owned(),
                opts,
                http: http.clone(),
            };
            let intervals = Intervals {
                backoff: opts.min_refresh,
                forced: opts.min_refresh,
            };
            Arc::new(RemoteKeySet {
                slot: Arc::new(Slot::new(source, intervals)),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_skips_odd_keys() {
        let doc = br#"{"keys":[
            {"kty":"RSA","kid":"r1","alg":"RS256","use":"sig","n":"sXch","e":"AQAB"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"sXch","e":"AQAB"},
            {"kty":"RSA","kid":"oaep","alg":"RSA-OAEP","n":"sXch","e":"AQAB"},
            {"kty":"EC","kid":"e1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"weird"},
            {"kty":"OKP","kid":"x","crv":"X25519","x":"AAAA"}
        ]}"#;
        let set = KeySet::parse(doc).unwrap();
        let kids: Vec<_> = set.keys.iter().map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, [Some("r1"), Some("e1")]);
        assert!(matches!(
            set.find(Some("r1"), Algorithm::RS256),
            Lookup::Found(_)
        ));
        // The key pins RS256: a PS256 token may not use it.
        assert!(matches!(
            set.find(Some("r1"), Algorithm::PS256),
            Lookup::UnknownKid
        ));
        // An RSA key never verifies an HMAC or EC token (algorithm confusion).
        assert!(matches!(
            set.find(Some("r1"), Algorithm::HS256),
            Lookup::UnknownKid
        ));
        assert!(matches!(
            set.find(Some("e1"), Algorithm::ES384),
            Lookup::UnknownKid
        ));
        assert!(matches!(set.find(None, Algorithm::ES256), Lookup::Found(_)));
        assert!(matches!(
            set.find(Some("zz"), Algorithm::RS256),
            Lookup::UnknownKid
        ));
        assert!(matches!(KeySet::parse(b"{}"), Err(JwksError::Format(_))));
        assert!(matches!(
            KeySet::parse(br#"{"keys":[]}"#),
            Err(JwksError::NoKeys)
        ));
    }

    #[test]
    fn ambiguous_without_kid() {
        let set = KeySet {
            keys: vec![Key::hmac(b"a"), Key::hmac(b"b")],
        };
        assert!(matches!(
            set.find(None, Algorithm::HS256),
            Lookup::Ambiguous
        ));
    }
}
