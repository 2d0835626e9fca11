//! `VerifyJwt`: only requests bearing a valid JSON Web Token get through.
//!
//! ```yaml
//! spec:
//!   type: VerifyJwt
//!   algorithms: [RS256]            # pinned; `none` does not exist; HS and public-key
//!                                  # algorithms cannot be mixed (no algorithm confusion)
//!   jwks: {url: https://issuer.example.com/.well-known/jwks.json}
//!   # or inline keys: keys: {jwks: {keys: [...]}} | {jwksFile: keys/jwks.jwks} | {secret: ...}
//!   issuer: [https://issuer.example.com]
//!   audience: [my-api]
//!   leewaySeconds: 60
//!   requiredClaims: [sub]
//!   matchClaims: {hd: example.com}
//!   tokenFrom: [{header: authorization}]   # default: `Authorization: Bearer <jwt>`
//! ```
//!
//! `preset: google` verifies Google-signed ID tokens (issuer `https://accounts.google.com`
//! or `accounts.google.com`, Google's JWKS, RS256); give the `audience`.
//!
//! On success it publishes `jwt.<policy>.claim.<name>` for every top-level claim (arrays
//! joined with commas, objects as JSON), `jwt.<policy>.header.{alg,kid,typ}` and
//! `jwt.<policy>.valid`. Failures are 401 with `WWW-Authenticate: Bearer` (RFC 6750) and
//! Apigee's `steps.jwt.*` codes; keys that cannot be fetched are 503.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::{check_header_name, parse_spec, read_config_file, BuildContext, SpecError};
use crate::fault::Fault;
use crate::jwks::{Current, Key, KeySet, Lookup, Reason, RemoteKeySet, RemoteOptions};
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::vars::{Exchange, Value};

pub const TYPE: &str = "VerifyJwt";

const GOOGLE_JWKS: &str = "https://www.googleapis.com/oauth2/v3/certs";
const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// Default largest token accepted: bigger ones are refused before any decoding.
const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    preset: Option<Preset>,
    #[serde(default)]
    algorithms: Vec<String>,
    #[serde(default)]
    jwks: Option<JwksSpec>,
    #[serde(default)]
    keys: Option<KeysSpec>,
    #[serde(default)]
    issuer: OneOrMany,
    #[serde(default)]
    audience: OneOrMany,
    #[serde(default)]
    leeway_seconds: Option<u64>,
    #[serde(default)]
    required_claims: Vec<String>,
    #[serde(default)]
    match_claims: BTreeMap<String, String>,
    #[serde(default)]
    token_from: Vec<TokenFromSpec>,
    #[serde(default)]
    max_token_bytes: Option<usize>,
    /// `exp` must be present (default true).
    #[serde(default)]
    require_exp: Option<bool>,
    #[serde(default)]
    realm: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Preset {
    Google,
}

#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JwksSpec {
    url: String,
    /// Key lifetime when the server sends no `Cache-Control: max-age`.
    #[serde(default)]
    cache_seconds: Option<u64>,
    /// Least time between fetches caused by unknown `kid`s or failures.
    #[serde(default)]
    min_refresh_seconds: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeysSpec {
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    #[serde(default)]
    jwks_file: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFromSpec {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    query: Option<String>,
    /// Scheme before the token in the header; default `Bearer` for `authorization`.
    #[serde(default)]
    scheme: Option<String>,
}

#[derive(Debug)]
enum TokenFrom {
    Header {
        name: String,
        scheme: Option<String>,
    },
    Query(String),
}

#[derive(Debug)]
enum Keys {
    Static(KeySet),
    Remote(Arc<RemoteKeySet>),
}

#[derive(Debug)]
struct VerifyJwt {
    algorithms: Vec<Algorithm>,
    keys: Keys,
    /// Issuer, audience, leeway, required claims; `algorithms` is set per token.
    validation: Validation,
    leeway: u64,
    required: Vec<String>,
    match_claims: Vec<(String, String)>,
    token_from: Vec<TokenFrom>,
    max_token_bytes: usize,
    /// `jwt.<policy>.`
    prefix: Arc<str>,
    /// `Bearer realm="..."`
    challenge: String,
    cache: VerifiedCache,
}

fn parse_alg(s: &str) -> Result<Algorithm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Err("`none` is never accepted".into());
    }
    s.parse::<Algorithm>().map_err(|_| {
        format!("unknown algorithm `{s}` (RS/PS 256-512, ES256, ES384, EdDSA, HS256-512)")
    })
}

fn is_hmac(a: Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let google = spec.preset == Some(Preset::Google);
    let mut algorithms = spec
        .algorithms
        .iter()
        .enumerate()
        .map(|(i, a)| parse_alg(a).map_err(|m| SpecError::new(format!("algorithms[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    if algorithms.is_empty() {
        if google {
            algorithms.push(Algorithm::RS256);
        } else {
            return Err(SpecError::new(
                "algorithms",
                "pin the accepted algorithms, e.g. [RS256]",
            ));
        }
    }
    let hmac = algorithms.iter().filter(|a| is_hmac(**a)).count();
    if hmac != 0 && hmac != algorithms.len() {
        return Err(SpecError::new(
            "algorithms",
            "HS* and public-key algorithms cannot be mixed in one policy",
        ));
    }
    let mut issuer = spec.issuer.into_vec();
    let audience = spec.audience.into_vec();
    let mut jwks = spec.jwks;
    if google {
        if issuer.is_empty() {
            issuer = GOOGLE_ISSUERS.iter().map(|s| (*s).to_owned()).collect();
        }
        if jwks.is_none() && spec.keys.is_none() {
            jwks = Some(JwksSpec {
                url: GOOGLE_JWKS.into(),
                cache_seconds: None,
                min_refresh_seconds: None,
                timeout_ms: None,
            });
        }
        if audience.is_empty() {
            return Err(SpecError::new(
                "audience",
                "the Google preset needs the audience (your client ID or service URL)",
            ));
        }
    }
    let keys = match (jwks, spec.keys) {
        (Some(_), Some(_)) => return Err(SpecError::new("keys", "give jwks or keys, not both")),
        (None, None) => return Err(SpecError::new("", "give jwks (a URL) or keys (inline)")),
        (Some(j), None) => {
            if hmac != 0 {
                return Err(SpecError::new(
                    "jwks",
                    "HS* keys are secrets: give keys.secret",
                ));
            }
            let uri: hyper::Uri = j
                .url
                .parse()
                .map_err(|e| SpecError::new("jwks.url", format!("{e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(SpecError::new("jwks.url", "must be an http(s) URL"));
            }
            let d = RemoteOptions::default();
            let opts = RemoteOptions {
                default_ttl: j.cache_seconds.map_or(d.default_ttl, Duration::from_secs),
                min_refresh: j
                    .min_refresh_seconds
                    .map_or(d.min_refresh, Duration::from_secs),
                timeout: j.timeout_ms.map_or(d.timeout, Duration::from_millis),
            };
            let remote = ctx.services.jwks.remote(&j.url, opts, &ctx.services.http);
            remote.prefetch();
            Keys::Remote(remote)
        }
        (None, Some(k)) => Keys::Static(static_keys(ctx, k, hmac != 0)?),
    };
    let leeway = spec.leeway_seconds.unwrap_or(60);
    let mut validation = Validation::new(algorithms[0]);
    validation.leeway = leeway;
    validation.validate_nbf = true;
    // `exp` is checked whenever present; `requireExp: false` only lets tokens without it in.
    let mut spec_claims: Vec<&str> = Vec::new();
    if spec.require_exp.unwrap_or(true) {
        spec_claims.push("exp");
    }
    if !issuer.is_empty() {
        validation.set_issuer(&issuer);
        spec_claims.push("iss");
    }
    // Without an expected audience, a token naming one is refused (RFC 7519 §4.1.3: it is
    // meant for someone else).
    if !audience.is_empty() {
        validation.set_audience(&audience);
        spec_claims.push("aud");
    }
    validation.set_required_spec_claims(&spec_claims);
    let mut token_from = Vec::new();
    for (i, t) in spec.token_from.into_iter().enumerate() {
        let at = format!("tokenFrom[{i}]");
        token_from.push(match (t.header, t.query) {
            (Some(h), None) => {
                let name = check_header_name(&h).map_err(|m| SpecError::new(&at, m))?;
                let scheme = match t.scheme {
                    Some(s) if s.is_empty() => None,
                    Some(s) => Some(s),
                    None if name == "authorization" => Some("Bearer".to_owned()),
                    None => None,
                };
                TokenFrom::Header { name, scheme }
            }
            (None, Some(q)) if !q.is_empty() && t.scheme.is_none() => TokenFrom::Query(q),
            _ => return Err(SpecError::new(at, "give exactly one of header, query")),
        });
    }
    if token_from.is_empty() {
        token_from.push(TokenFrom::Header {
            name: "authorization".into(),
            scheme: Some("Bearer".into()),
        });
    }
    let realm = spec.realm.unwrap_or_else(|| "tollgate".into());
    if realm.contains('"') || !super::valid_header_value(&realm) {
        return Err(SpecError::new(
            "realm",
            "must not contain quotes or line breaks",
        ));
    }
    Ok(Arc::new(VerifyJwt {
        algorithms,
        keys,
        validation,
        leeway,
        required: spec.required_claims,
        match_claims: spec.match_claims.into_iter().collect(),
        token_from,
        max_token_bytes: spec.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES),
        prefix: format!("jwt.{}.", ctx.name).into(),
        challenge: format!("Bearer realm=\"{realm}\""),
        cache: VerifiedCache::new(),
    }))
}

fn static_keys(ctx: &BuildContext, k: KeysSpec, hmac: bool) -> Result<KeySet, SpecError> {
    let given = [
        k.jwks.is_some(),
        k.jwks_file.is_some(),
        k.secret.is_some(),
        k.secret_file.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(SpecError::new(
            "keys",
            "give exactly one of jwks, jwksFile, secret, secretFile",
        ));
    }
    let secret = match (k.secret, k.secret_file) {
        (Some(s), _) => Some(s.into_bytes()),
        (_, Some(f)) => Some(read_config_file(ctx, "keys.secretFile", &f)?),
        _ => None,
    };
    if let Some(secret) = secret {
        if !hmac {
            return Err(SpecError::new(
                "keys",
                "a secret verifies HS* algorithms only",
            ));
        }
        // RFC 7518 §3.2: the key must be at least as long as the hash.
        if secret.len() < 32 {
            return Err(SpecError::new(
                "keys",
                "an HMAC secret needs at least 32 bytes",
            ));
        }
        return Ok(KeySet {
            keys: vec![Key::hmac(&secret)],
        });
    }
    let (field, doc) = match (k.jwks, k.jwks_file) {
        (Some(v), _) => (
            "keys.jwks",
            serde_json::to_vec(&v).map_err(|e| SpecError::new("keys.jwks", e.to_string()))?,
        ),
        (_, Some(f)) => ("keys.jwksFile", read_config_file(ctx, "keys.jwksFile", &f)?),
        _ => return Err(SpecError::new("keys", "no key given")),
    };
    let set = KeySet::parse(&doc).map_err(|e| SpecError::new(field, e.to_string()))?;
    if !hmac
        && set
            .keys
            .iter()
            .any(|k| k.family == crate::jwks::Family::Hmac)
    {
        return Err(SpecError::new(
            field,
            "symmetric (oct) keys are not allowed with public-key algorithms",
        ));
    }
    Ok(set)
}

/// A failed verification: 401 with an RFC 6750 challenge.
fn invalid(challenge: &str, code: &str, message: &str) -> Fault {
    Fault::new(401, code, message).with_header(
        "www-authenticate",
        format!("{challenge}, error=\"invalid_token\", error_description=\"{message}\""),
    )
}

/// What the synchronous part of a verification found.
struct Parsed {
    alg: Algorithm,
    kid: Option<String>,
    typ: Option<String>,
}

/// Tokens that verified, so a client sending the same token again (the usual case: one
/// token for many requests) costs a hash and a lookup, not a signature check. An entry is
/// used only with the key set it was verified with and while its `exp` (plus leeway) holds;
/// everything else about a token is fixed by its bytes, compared in full.
#[derive(Debug)]
struct VerifiedCache {
    hasher: std::hash::RandomState,
    shards: Vec<parking_lot::Mutex<std::collections::HashMap<u64, Arc<VerifiedToken>>>>,
}

#[derive(Debug)]
struct VerifiedToken {
    token: Box<str>,
    exp: Option<u64>,
    generation: u64,
    vars: Arc<Vec<(String, Value)>>,
}

const CACHE_SHARDS: usize = 16;
const CACHE_PER_SHARD: usize = 256;

impl VerifiedCache {
    fn new() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            shards: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
        }
    }

    fn shard(
        &self,
        h: u64,
    ) -> &parking_lot::Mutex<std::collections::HashMap<u64, Arc<VerifiedToken>>> {
        &self.shards[(h as usize) % CACHE_SHARDS]
    }

    fn get(
        &self,
        token: &str,
        generation: u64,
        now: u64,
        leeway: u64,
    ) -> Option<Arc<Vec<(String, Value)>>> {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(token);
        let shard = self.shard(h).lock();
        let e = shard.get(&h)?;
        (e.generation == generation
            && *e.token == *token
            && e.exp.is_none_or(|exp| exp.saturating_add(leeway) >= now))
        .then(|| Arc::clone(&e.vars))
    }

    fn put(&self, token: &str, exp: Option<u64>, generation: u64, vars: Arc<Vec<(String, Value)>>) {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(token);
        let mut shard = self.shard(h).lock();
        if shard.len() >= CACHE_PER_SHARD {
            let now = now_secs();
            shard.retain(|_, e| e.exp.is_none_or(|exp| exp >= now));
            if shard.len() >= CACHE_PER_SHARD {
                shard.clear();
            }
        }
        shard.insert(
            h,
            Arc::new(VerifiedToken {
                token: token.into(),
                exp,
                generation,
                vars,
            }),
        );
    }
}

/// A claim as a flow variable: an array of scalars (`aud`, `scope`-like lists) as its items
/// joined by commas, anything else as [`Value::from`] makes it.
fn claim_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Array(a) if a.iter().all(|x| !x.is_array() && !x.is_object()) => {
            Value::Str(
                a.iter()
                    .map(|x| match claim_value(x) {
                        Value::Str(s) => s,
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            )
        }
        other => Value::from(other),
    }
}

fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

impl VerifyJwt {
    fn find_token<'a>(&self, ex: &'a Exchange) -> Option<std::borrow::Cow<'a, str>> {
        for source in &self.token_from {
            match source {
                TokenFrom::Header { name, scheme } => {
                    let Some(v) = ex.client_header_values(name).next() else {
                        continue;
                    };
                    let v = v.trim();
                    let token = match scheme {
                        None => v,
                        Some(s) => match v.split_once(' ') {
                            Some((got, rest)) if got.eq_ignore_ascii_case(s) => rest.trim(),
                            _ => continue,
                        },
                    };
                    if !token.is_empty() {
                        return Some(std::borrow::Cow::Borrowed(token));
                    }
                }
                TokenFrom::Query(q) => {
                    if let Some(v) = ex.request.query(q).filter(|v| !v.is_empty()) {
                        return Some(std::borrow::Cow::Owned(v));
                    }
                }
            }
        }
        None
    }

    /// Checks size, shape and header; the key is not known yet.
    fn parse(&self, token: &str) -> Result<Parsed, Fault> {
        let c = &self.challenge;
        if token.len() > self.max_token_bytes {
            return Err(invalid(c, "steps.jwt.InvalidToken", "token too large"));
        }
        let header_b64 = token.split('.').next().unwrap_or_default();
        let header: serde_json::Map<String, serde_json::Value> =
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header_b64)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| invalid(c, "steps.jwt.FailedToDecode", "malformed token"))?;
        if token.split('.').count() != 3 {
            return Err(invalid(c, "steps.jwt.FailedToDecode", "malformed token"));
        }
        if header.contains_key("crit") {
            return Err(invalid(
                c,
                "steps.jwt.UnhandledCriticalHeader",
                "critical header extensions are not supported",
            ));
        }
        let alg_name = header
            .get("alg")
            .and_then(|a| a.as_str())
            .ok_or_else(|| invalid(c, "steps.jwt.NoAlgorithmFoundInHeader", "no alg in header"))?;
        let alg = alg_name
            .parse::<Algorithm>()
            .ok()
            .filter(|a| self.algorithms.contains(a))
            .ok_or_else(|| {
                invalid(
                    c,
                    "steps.jwt.AlgorithmMismatch",
                    "token algorithm not accepted",
                )
            })?;
        let text = |k: &str| header.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        Ok(Parsed {
            alg,
            kid: text("kid"),
            typ: text("typ"),
        })
    }

    /// Verifies signature and claims with `key`, then publishes the claims.
    fn finish(
        &self,
        token: &str,
        p: &Parsed,
        key: &Key,
        generation: u64,
        ex: &mut Exchange,
    ) -> Result<(), Fault> {
        use jsonwebtoken::errors::ErrorKind as K;
        let c = &self.challenge;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![p.alg];
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(|e| {
            let (code, msg) = match e.kind() {
                K::ExpiredSignature => ("steps.jwt.TokenExpired", "token expired"),
                K::ImmatureSignature => ("steps.jwt.TokenNotYetValid", "token not yet valid"),
                K::InvalidIssuer => ("steps.jwt.JwtIssuerMismatch", "issuer not accepted"),
                K::InvalidAudience => ("steps.jwt.JwtAudienceMismatch", "audience not accepted"),
                K::MissingRequiredClaim(_) => {
                    ("steps.jwt.InvalidClaim", "a required claim is missing")
                }
                K::InvalidAlgorithm => (
                    "steps.jwt.AlgorithmMismatch",
                    "token algorithm not accepted",
                ),
                K::InvalidSignature => ("steps.jwt.InvalidToken", "invalid signature"),
                K::Json(_) | K::Base64(_) | K::Utf8(_) | K::InvalidToken => {
                    ("steps.jwt.FailedToDecode", "malformed token")
                }
                _ => ("steps.jwt.InvalidToken", "invalid token"),
            };
            invalid(c, code, msg)
        })?;
        let claims = data.claims;
        if let Some(iat) = claims.get("iat") {
            let ok = iat
                .as_f64()
                .is_some_and(|t| t <= (now_secs() + self.leeway) as f64);
            if !ok {
                return Err(invalid(
                    c,
                    "steps.jwt.TokenNotYetValid",
                    "token issued in the future",
                ));
            }
        }
        // A claim that must be a NumericDate but is not is a malformed token.
        for k in ["exp", "nbf"] {
            if claims.get(k).is_some_and(|v| !v.is_number()) {
                return Err(invalid(
                    c,
                    "steps.jwt.InvalidClaim",
                    "exp/nbf must be numbers",
                ));
            }
        }
        for name in &self.required {
            if claims.get(name).is_none_or(|v| v.is_null()) {
                return Err(invalid(
                    c,
                    "steps.jwt.InvalidClaim",
                    "a required claim is missing",
                ));
            }
        }
        for (name, want) in &self.match_claims {
            let ok = claims
                .get(name)
                .is_some_and(|v| claim_value(v).as_text() == want.as_str());
            if !ok {
                return Err(invalid(
                    c,
                    "steps.jwt.InvalidClaim",
                    "a claim has the wrong value",
                ));
            }
        }
        let mut vars = Vec::with_capacity(claims.len() + 4);
        vars.push(("valid".to_owned(), Value::Bool(true)));
        vars.push(("header.alg".to_owned(), Value::Str(format!("{:?}", p.alg))));
        if let Some(kid) = &p.kid {
            vars.push(("header.kid".to_owned(), Value::Str(kid.clone())));
        }
        if let Some(typ) = &p.typ {
            vars.push(("header.typ".to_owned(), Value::Str(typ.clone())));
        }
        for (k, v) in &claims {
            vars.push((format!("claim.{k}"), claim_value(v)));
        }
        let vars = Arc::new(vars);
        let exp = claims.get("exp").and_then(|e| e.as_f64()).map(|e| e as u64);
        self.cache.put(token, exp, generation, Arc::clone(&vars));
        ex.state.add_token(Arc::clone(&self.prefix), vars);
        Ok(())
    }

    fn no_key(&self, lookup: &Lookup<'_>) -> Fault {
        match lookup {
            Lookup::Ambiguous => invalid(
                &self.challenge,
                "steps.jwt.KeyIdMissing",
                "token has no kid",
            ),
            _ => invalid(
                &self.challenge,
                "steps.jwt.NoMatchingPublicKey",
                "no key for this token",
            ),
        }
    }

    fn verify_with(
        &self,
        token: &str,
        p: &Parsed,
        set: &KeySet,
        generation: u64,
        ex: &mut Exchange,
    ) -> Result<(), Fault> {
        match set.find(p.kid.as_deref(), p.alg) {
            Lookup::Found(k) => self.finish(token, p, k, generation, ex),
            other => Err(self.no_key(&other)),
        }
    }
}

fn keys_unavailable(e: &crate::jwks::JwksError) -> Fault {
    tracing::warn!(error = %e, "VerifyJwt: no keys to verify with");
    Fault::new(
        503,
        "steps.jwt.JwksUnavailable",
        "Token keys are unavailable",
    )
    .with_header("retry-after", "5")
}

impl Policy for VerifyJwt {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        let Some(token) = self.find_token(ex) else {
            return Hook::Ready(Outcome::Reject(
                Fault::new(
                    401,
                    "steps.jwt.FailedToResolveVariable",
                    "No token in the request",
                )
                .with_header("www-authenticate", self.challenge.clone()),
            ));
        };
        let cached = match &self.keys {
            Keys::Static(_) => None,
            Keys::Remote(r) => r.cached(),
        };
        let generation = cached.as_ref().map_or(0, |f| f.generation);
        if let Some(vars) = self.cache.get(&token, generation, now_secs(), self.leeway) {
            ex.state.add_token(Arc::clone(&self.prefix), vars);
            return Hook::Ready(Outcome::Continue);
        }
        let parsed = match self.parse(&token) {
            Ok(p) => p,
            Err(f) => return Hook::Ready(Outcome::Reject(f)),
        };
        let remote = match &self.keys {
            Keys::Static(set) => {
                let token = token.into_owned();
                return Hook::from(self.verify_with(&token, &parsed, set, 0, ex));
            }
            Keys::Remote(r) => r,
        };
        // Fast path: a cached set (fresh, or stale while it is being refetched) has the key.
        let reason = match &cached {
            Some(f) => match f.set.find(parsed.kid.as_deref(), parsed.alg) {
                Lookup::Found(k) => {
                    let token = token.into_owned();
                    return Hook::from(self.finish(&token, &parsed, k, f.generation, ex));
                }
                Lookup::Ambiguous => {
                    return Hook::Ready(Outcome::Reject(self.no_key(&Lookup::Ambiguous)))
                }
                Lookup::UnknownKid => Reason::UnknownKid,
            },
            None => Reason::Initial,
        };
        let token = token.into_owned();
        let remote = Arc::clone(remote);
        Hook::wait(async move {
            let set: Current = match remote.refresh(reason).await {
                Ok(s) => s,
                // Rate limited or failed: answer from what is cached, if anything.
                Err(e) => match cached {
                    Some(c) => c,
                    None => return Err(keys_unavailable(&e)),
                },
            };
            self.verify_with(&token, &parsed, &set.set, set.generation, ex)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo};
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn spec(y: &str) -> serde_norway::Value {
        serde_norway::from_str(y).unwrap()
    }

    fn policy(y: &str) -> Arc<dyn Policy> {
        build(
            &BuildContext {
                name: "jwt1".into(),
                ..Default::default()
            },
            spec(y),
        )
        .unwrap()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn exchange(auth: &str) -> Exchange {
        let mut h = Headers::new();
        h.push(":path".into(), "/x".into());
        h.push("authorization".into(), auth.into());
        Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
        match p.run(ex, Direction::Request) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(_) => panic!("static keys answer at once"),
        }
    }

    const HS_SPEC: &str = "
algorithms: [HS256]
keys: {secret: 0123456789abcdef0123456789abcdef-test}
issuer: https://issuer.test
audience: [api]
leewaySeconds: 5
requiredClaims: [sub]
matchClaims: {tier: gold}
";

    fn good() -> serde_json::Value {
        let now = now_secs();
        serde_json::json!({"iss": "https://issuer.test", "aud": ["api", "other"], "sub": "u1",
            "exp": now + 60, "iat": now, "tier": "gold", "n": 3, "obj": {"a": 1}})
    }

    #[test]
    fn valid_token_publishes_claims() {
        let p = policy(HS_SPEC);
        let mut ex = exchange(&format!("Bearer {}", hs(good())));
        run(&p, &mut ex).unwrap();
        assert_eq!(ex.lookup("jwt.jwt1.claim.sub").as_deref(), Some("u1"));
        assert_eq!(
            ex.lookup("jwt.jwt1.claim.aud").as_deref(),
            Some("api,other")
        );
        assert_eq!(ex.lookup("jwt.jwt1.claim.n").as_deref(), Some("3"));
        assert_eq!(
            ex.lookup("jwt.jwt1.claim.obj").as_deref(),
            Some(r#"{"a":1}"#)
        );
        assert_eq!(ex.lookup("jwt.jwt1.header.alg").as_deref(), Some("HS256"));
        assert_eq!(ex.lookup("jwt.jwt1.valid").as_deref(), Some("true"));
    }

    fn code(p: &Arc<dyn Policy>, auth: &str) -> (u16, String) {
        let mut ex = exchange(auth);
        let f = run(p, &mut ex).unwrap_err();
        assert!(
            f.headers
                .iter()
                .any(|(n, v)| n == "www-authenticate" && v.starts_with("Bearer realm=")),
            "{f:?}"
        );
        (f.status, f.code)
    }

    #[test]
    fn bad_tokens_get_clear_codes() {
        let p = policy(HS_SPEC);
        let now = now_secs();
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good();
            c[k] = v;
            format!("Bearer {}", hs(c))
        };
        let without = |k: &str| {
            let mut c = good();
            c.as_object_mut().unwrap().remove(k);
            format!("Bearer {}", hs(c))
        };
        assert_eq!(code(&p, "").1, "steps.jwt.FailedToResolveVariable");
        assert_eq!(code(&p, "Basic abc").1, "steps.jwt.FailedToResolveVariable");
        assert_eq!(code(&p, "Bearer a.b").1, "steps.jwt.FailedToDecode");
        assert_eq!(
            code(&p, &with("exp", (now - 100).into())).1,
            "steps.jwt.TokenExpired"
        );
        // Inside the leeway: still valid.
        let mut ex = exchange(&with("exp", (now - 2).into()));
        run(&p, &mut ex).unwrap();
        assert_eq!(
            code(&p, &with("nbf", (now + 100).into())).1,
            "steps.jwt.TokenNotYetValid"
        );
        assert_eq!(
            code(&p, &with("iat", (now + 100).into())).1,
            "steps.jwt.TokenNotYetValid"
        );
        assert_eq!(
            code(&p, &with("iss", "evil".into())).1,
            "steps.jwt.JwtIssuerMismatch"
        );
        assert_eq!(code(&p, &without("iss")).1, "steps.jwt.InvalidClaim");
        assert_eq!(
            code(&p, &with("aud", "nope".into())).1,
            "steps.jwt.JwtAudienceMismatch"
        );
        assert_eq!(code(&p, &without("exp")).1, "steps.jwt.InvalidClaim");
        assert_eq!(code(&p, &without("sub")).1, "steps.jwt.InvalidClaim");
        assert_eq!(
            code(&p, &with("tier", "free".into())).1,
            "steps.jwt.InvalidClaim"
        );
        assert_eq!(
            code(&p, &with("exp", "soon".into())).1,
            "steps.jwt.InvalidClaim"
        );
        // Signed with another secret.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good(),
            &EncodingKey::from_secret(b"another secret, at least 32 bytes long"),
        )
        .unwrap();
        assert_eq!(
            code(&p, &format!("Bearer {forged}")).1,
            "steps.jwt.InvalidToken"
        );
        // Algorithm not pinned (HS512), and `none`.
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &good(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            code(&p, &format!("Bearer {hs512}")).1,
            "steps.jwt.AlgorithmMismatch"
        );
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&good().to_string()));
        assert_eq!(
            code(&p, &format!("Bearer {none}")).1,
            "steps.jwt.AlgorithmMismatch"
        );
        let crit = format!(
            "{}.{}.x",
            b64(r#"{"alg":"HS256","crit":["b64"]}"#),
            b64("{}")
        );
        assert_eq!(
            code(&p, &format!("Bearer {crit}")).1,
            "steps.jwt.UnhandledCriticalHeader"
        );
        let huge = format!("Bearer {}", "a".repeat(DEFAULT_MAX_TOKEN_BYTES + 1));
        assert_eq!(code(&p, &huge), (401, "steps.jwt.InvalidToken".to_owned()));
    }

    #[test]
    fn token_from_query_and_custom_header() {
        let p = policy(
            "
algorithms: [HS256]
keys: {secret: 0123456789abcdef0123456789abcdef-test}
tokenFrom: [{header: x-jwt}, {query: access_token}]
",
        );
        let mut c = good();
        c.as_object_mut().unwrap().remove("aud");
        let t = hs(c);
        let mut h = Headers::new();
        h.push(":path".into(), format!("/x?access_token={t}"));
        let mut ex = Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        run(&p, &mut ex).unwrap();
        let mut h = Headers::new();
        h.push("x-jwt".into(), t);
        let mut ex = Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        run(&p, &mut ex).unwrap();
        // Without an expected audience, a token with one is refused (it is meant for
        // someone else).
        let mut ex = exchange(&format!("Bearer {}", hs(good())));
        let p2 =
            policy("{algorithms: [HS256], keys: {secret: 0123456789abcdef0123456789abcdef-test}}");
        assert_eq!(
            run(&p2, &mut ex).unwrap_err().code,
            "steps.jwt.JwtAudienceMismatch"
        );
    }

    #[test]
    fn verified_cache_honours_exp_generation_and_bytes() {
        let c = VerifiedCache::new();
        let vars = Arc::new(vec![("valid".to_owned(), Value::Bool(true))]);
        let now = now_secs();
        c.put("tok-a", Some(now + 10), 7, Arc::clone(&vars));
        assert!(c.get("tok-a", 7, now, 0).is_some());
        assert!(c.get("tok-a", 8, now, 0).is_none(), "another key set");
        assert!(c.get("tok-b", 7, now, 0).is_none());
        assert!(c.get("tok-a", 7, now + 11, 0).is_none(), "expired");
        assert!(
            c.get("tok-a", 7, now + 11, 5).is_some(),
            "within the leeway"
        );
        for i in 0..(CACHE_SHARDS * CACHE_PER_SHARD * 2) {
            c.put(&format!("t{i}"), Some(now + 10), 7, Arc::clone(&vars));
        }
        let total: usize = c.shards.iter().map(|s| s.lock().len()).sum();
        assert!(total <= CACHE_SHARDS * CACHE_PER_SHARD, "bounded: {total}");
        // A cached token is answered without parsing or checking a signature again, but
        // only while it is still valid: an expired one falls through to full checks.
        let p = policy(HS_SPEC);
        let t = format!("Bearer {}", hs(good()));
        let mut ex = exchange(&t);
        run(&p, &mut ex).unwrap();
        let mut ex = exchange(&t);
        run(&p, &mut ex).unwrap();
        assert_eq!(ex.lookup("jwt.jwt1.claim.sub").as_deref(), Some("u1"));
    }

    #[test]
    fn specs_refuse_weak_or_confusable_settings() {
        let e = |y: &str| build(&BuildContext::default(), spec(y)).unwrap_err();
        assert_eq!(e("{keys: {secret: x}}").field, "algorithms");
        assert!(e("{algorithms: [none], keys: {secret: x}}")
            .message
            .contains("none"));
        assert!(e("{algorithms: [HS256, RS256], keys: {secret: x}}")
            .message
            .contains("mixed"));
        assert!(e("{algorithms: [HS256], keys: {secret: short}}")
            .message
            .contains("32 bytes"));
        assert!(
            e("{algorithms: [RS256], keys: {secret: 0123456789abcdef0123456789abcdef}}")
                .message
                .contains("HS* algorithms only")
        );
        assert!(e("{algorithms: [HS256], jwks: {url: 'http://x/jwks'}}")
            .message
            .contains("secret"));
        assert!(e("{algorithms: [RS256], jwks: {url: 'ftp://x/jwks'}}")
            .message
            .contains("http"));
        assert!(
            e("{algorithms: [RS256], keys: {jwks: {keys: [{kty: oct, k: AAAA}]}}}")
                .message
                .contains("symmetric")
        );
        assert!(e("{preset: google}").message.contains("audience"));
        assert!(e("{algorithms: [RS256]}").message.contains("jwks"));
    }
}
