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
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus::IntCounterVec;
// tokio's clock: the real one in the server, and one tests can advance (expiry, refresh).
use tokio::time::Instant;

use crate::http_client::{cache_max_age, HttpClient};

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

/// A fetched set and when it goes stale.
#[derive(Debug)]
pub struct Fetched {
    pub set: KeySet,
    pub expires: Instant,
    /// Unique per fetch (never 0): results verified with one set are not reused with the next.
    pub generation: u64,
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug, Default)]
struct FetchState {
    /// Last fetch caused by an unknown `kid`.
    last_unknown_kid: Option<Instant>,
    /// Last failed fetch: no new attempt for `min_refresh` after it.
    last_failure: Option<Instant>,
    background: bool,
}

/// A key set served at a URL, shared by every policy that names the URL.
#[derive(Debug)]
pub struct RemoteKeySet {
    url: String,
    opts: RemoteOptions,
    http: HttpClient,
    current: ArcSwapOption<Fetched>,
    state: Mutex<FetchState>,
    /// Held while fetching: concurrent refreshes wait for the one in flight.
    fetching: tokio::sync::Mutex<()>,
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
        &self.url
    }

    /// The cached set, fresh or stale. When stale, starts one background refresh.
    pub fn cached(self: &Arc<Self>) -> Option<Arc<Fetched>> {
        let cur = self.current.load_full()?;
        if cur.expires <= Instant::now() {
            self.refresh_in_background();
        }
        Some(cur)
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            // One at a time, and none while backing off after a failure.
            let backing_off = st
                .last_failure
                .is_some_and(|t| t.elapsed() < self.opts.min_refresh);
            if st.background || backing_off {
                return;
            }
            st.background = true;
        }
        let this = Arc::clone(self);
        handle.spawn(async move {
            let reason = if this.current.load().is_some() {
                Reason::Expired
            } else {
                Reason::Initial
            };
            if let Err(e) = this.refresh(reason).await {
                tracing::warn!(url = %this.url, error = %e, "JWKS background refresh failed");
            }
            if let Ok(mut st) = this.state.lock() {
                st.background = false;
            }
        });
    }

    /// Starts fetching the set if nothing is cached yet (at configuration load).
    pub fn prefetch(self: &Arc<Self>) {
        if self.current.load().is_none() {
            self.refresh_in_background();
        }
    }

    /// Fetches the set again, unless another caller did while this one waited, or the
    /// last attempt was under `min_refresh` ago. Returns the set to use.
    pub async fn refresh(&self, reason: Reason) -> Result<Arc<Fetched>, JwksError> {
        let before = self.current.load_full();
        let _guard = self.fetching.lock().await;
        let now_cur = self.current.load_full();
        let replaced = match (&before, &now_cur) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, Some(_)) => true,
            _ => false,
        };
        if replaced {
            if let Some(cur) = now_cur {
                return Ok(cur);
            }
        }
        {
            let mut st = self
                .state
                .lock()
                .map_err(|_| JwksError::RateLimited(self.opts.min_refresh))?;
            let recent =
                |t: Option<Instant>| t.is_some_and(|t| t.elapsed() < self.opts.min_refresh);
            // After a failure, back off whatever the reason; unknown `kid`s may force a
            // fetch at most once per interval (the initial and expiry fetches do not count).
            if recent(st.last_failure)
                || (matches!(reason, Reason::UnknownKid) && recent(st.last_unknown_kid))
            {
                return Err(JwksError::RateLimited(self.opts.min_refresh));
            }
            if matches!(reason, Reason::UnknownKid) {
                st.last_unknown_kid = Some(Instant::now());
            }
        }
        let result = self.fetch().await;
        FETCHES
            .with_label_values(&[reason.as_str(), if result.is_ok() { "ok" } else { "error" }])
            .inc();
        if let Ok(mut st) = self.state.lock() {
            st.last_failure = if result.is_err() {
                Some(Instant::now())
            } else {
                None
            };
        }
        let fetched = Arc::new(result?);
        tracing::info!(url = %self.url, keys = fetched.set.keys.len(), reason = reason.as_str(), "JWKS fetched");
        self.current.store(Some(Arc::clone(&fetched)));
        Ok(fetched)
    }

    async fn fetch(&self) -> Result<Fetched, JwksError> {
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
        Ok(Fetched {
            set,
            expires: Instant::now() + ttl,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
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
        let mut sets = match self.sets.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = (url.to_owned(), opts);
        if !sets.contains_key(&key) {
            // Sets no configuration uses any more (options edited away) go now.
            sets.retain(|_, s| Arc::strong_count(s) > 1);
        }
        Arc::clone(sets.entry(key).or_insert_with(|| {
            Arc::new(RemoteKeySet {
                url: url.to_owned(),
                opts,
                http: http.clone(),
                current: ArcSwapOption::empty(),
                state: Mutex::new(FetchState::default()),
                fetching: tokio::sync::Mutex::new(()),
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
