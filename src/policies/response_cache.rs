//! `ResponseCache`: answers repeated requests from memory. Put the same policy in a flow's
//! request steps (lookup) and response steps (populate), as in Apigee.
//!
//! ```yaml
//! spec:
//!   type: ResponseCache
//!   keyPrefix: chat
//!   keyFragments: ["{request.uri}", "{request.header.x-tenant}"]   # templates
//!   scope: global              # global | app (client_id) | flow
//!   ttlSeconds: 300
//!   methods: [GET, HEAD]       # add POST to cache on a digest of the body (deterministic LLM calls)
//!   skipLookup: "request.headers['cache-control'] == 'no-cache'"   # CEL; entry refreshed
//!   skipPopulate: "response.headers['x-partial'] == 'yes'"
//!   excludeErrorResponses: true        # only 2xx are stored
//!   respectCacheControl: true          # upstream no-store/private (no-cache but on SSE) not stored, max-age caps the TTL
//!   maxEntryBytes: 1048576             # larger responses pass on, not stored
//!   maxCacheBytes: 67108864            # the whole cache, by stored bytes
//!   statusHeader: cache-status         # RFC 9211: `tollgate; hit` / `tollgate; fwd=miss[; stored]`
//!   coalesceWaitMs: 0                  # > 0: concurrent misses on a key wait for the first
//!   shared: {redis: "redis://127.0.0.1:6379/0", timeoutMs: 50}   # optional second tier
//!   profile: tollgate                  # or apigee: Apigee's defaults for the unset fields
//!   skipCacheLookup: 'request.header.bypass-cache = "true"'   # Apigee's language (or skipLookup, CEL)
//!   skipCachePopulation: 'response.status.code != 200'        # (or skipPopulate, CEL)
//!   expiry: {timeoutInSec: {ref: cache.ttl, value: 300}}      # in place of ttlSeconds; or
//!           # {expiryDate: "12-31-2027"} (mm-dd-yyyy, start of day UTC) or
//!           # {timeOfDay: "02:00:00"} (hh:mm:ss UTC, the next one); each a literal or {ref, value}
//!   useAcceptHeader: false             # Accept, Accept-Encoding, -Language, -Charset in the key
//!   responseStepsOnHit: false          # a hit runs the flow's response steps (Apigee)
//! ```
//!
//! `profile: apigee` changes the defaults to Apigee's: `excludeErrorResponses: false`
//! stores any status (tollgate's `false` stores 2xx–4xx), `respectCacheControl: false`
//! (Apigee's `UseResponseCacheHeaders`, accepted as an alias), `responseStepsOnHit: true`.
//! With `responseStepsOnHit`, a hit still skips the upstream and the rest of the request
//! steps, but every response step of the flow runs on the cached answer (the policy's own
//! populate half does nothing on its own hit); a response step that fails turns the answer
//! into its fault. `responsecache.<policy>.cachehit` is `true` on a hit and `false` after
//! a lookup that missed or was skipped. An `expiry` whose ref and literal give no future
//! time stores nothing. What stays stricter than Apigee under every profile: a response to
//! a request with credentials is stored outside `scope: app` only when its `Cache-Control`
//! allows a shared cache to (below), `Vary: *` and oversize bodies are never stored, and
//! cookies are never replayed.
//!
//! The key is a SHA-256 over the prefix, scope, host, fragments (length-prefixed), method
//! and, for methods with a body, a digest of the body: hostile input never reaches the
//! cache's key space as is. A response to a request with credentials (`Authorization`, a
//! cookie, an API key, a verified `client_id`) is stored outside `scope: app` only when its
//! `Cache-Control` allows a shared cache to (RFC 9111 §3.5: `public`, `s-maxage`,
//! `must-revalidate`). A hit ends the exchange at once with an `ImmediateResponse`: the stored
//! status, headers and body, plus `age` and the status header; it needs the request
//! headers the response named in `Vary` to match and its content coding to be accepted
//! (`Vary: *` is never stored). The response side never
//! holds the body: it asks the stream for a copy as the body passes (server-sent events keep
//! streaming) and stores it when the body ends; a hit replays the stored events at once.
//! Entries live in a byte-bounded `moka` cache kept across configuration reloads. With
//! `shared`, a local miss also asks Redis (bounded by `timeoutMs`; an unreachable Redis is
//! a miss, never an error) and every stored entry is also written there (in the background,
//! with the same TTL), so replicas share what any of them fetched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{parse_spec, BuildContext, SpecError};
use crate::cache::{
    accepts_encoding, all_values, freshness, hex, is_event_stream, shareable_with_credentials,
    stored_header, unhex, Entry, Freshness, Key, KeyHasher, LocalCache, SharedTier,
};
use crate::expr::{Condition, Template};
use crate::pipeline::{Answer, Direction, Hook, Hooks, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "ResponseCache";
pub const HIT: &str = "responsecache.Hit";

fn default_ttl() -> u64 {
    300
}
fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}
fn default_entry() -> usize {
    1024 * 1024
}
fn default_total() -> u64 {
    64 * 1024 * 1024
}
fn default_status_header() -> String {
    "cache-status".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    key_prefix: String,
    #[serde(default)]
    key_fragments: Vec<String>,
    #[serde(default)]
    scope: Scope,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default = "default_methods")]
    methods: Vec<String>,
    #[serde(default)]
    skip_lookup: Option<String>,
    #[serde(default)]
    skip_populate: Option<String>,
    /// Default: true (`profile: apigee`: false, and then any status is stored).
    #[serde(default)]
    exclude_error_responses: Option<bool>,
    /// Default: true (`profile: apigee`: false, Apigee's `UseResponseCacheHeaders`).
    #[serde(default, alias = "useResponseCacheHeaders")]
    respect_cache_control: Option<bool>,
    #[serde(default)]
    profile: Profile,
    /// Apigee's `SkipCacheLookup`: a condition in Apigee's language.
    #[serde(default)]
    skip_cache_lookup: Option<String>,
    /// Apigee's `SkipCachePopulation`: a condition in Apigee's language.
    #[serde(default)]
    skip_cache_population: Option<String>,
    /// Apigee's `ExpirySettings`, in place of `ttlSeconds`.
    #[serde(default)]
    expiry: Option<ExpirySpec>,
    /// Apigee's `UseAcceptHeader`: the request's `Accept*` headers are part of the key.
    #[serde(default)]
    use_accept_header: bool,
    /// A hit runs the flow's response steps on the served answer (Apigee). Default: false
    /// (`profile: apigee`: true).
    #[serde(default)]
    response_steps_on_hit: Option<bool>,
    #[serde(default = "default_entry")]
    max_entry_bytes: usize,
    #[serde(default = "default_total")]
    max_cache_bytes: u64,
    #[serde(default = "default_status_header")]
    status_header: String,
    #[serde(default)]
    coalesce_wait_ms: u64,
    #[serde(default)]
    shared: Option<SharedSpec>,
}

fn default_shared_timeout() -> u64 {
    50
}

/// `shared:` of a cache (this one and SemanticCache): a Redis URL and a timeout.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SharedSpec {
    /// `redis://host:port[/db]`.
    pub(crate) redis: String,
    #[serde(default = "default_shared_timeout")]
    pub(crate) timeout_ms: u64,
}

/// Whose defaults the unset fields take.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Profile {
    /// tollgate's: only 2xx stored, upstream `Cache-Control` honoured, a hit answers at once.
    #[default]
    Tollgate,
    /// Apigee's: any status stored, upstream headers ignored, a hit runs the response steps.
    Apigee,
}

/// One of Apigee's `ExpirySettings` values: a literal, or `{ref, value}` where the variable
/// wins when it resolves and the literal is the fallback.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum Setting<T> {
    Literal(T),
    Ref(RefSetting<T>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RefSetting<T> {
    #[serde(rename = "ref")]
    reference: String,
    value: Option<T>,
}

impl<T: Clone> Setting<T> {
    fn parts(&self) -> (Option<String>, Option<T>) {
        match self {
            Setting::Literal(v) => (None, Some(v.clone())),
            Setting::Ref(r) => (Some(r.reference.clone()), r.value.clone()),
        }
    }
}

/// `expiry:`, Apigee's `ExpirySettings`: exactly one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExpirySpec {
    #[serde(default, alias = "timeoutInSeconds")]
    timeout_in_sec: Option<Setting<u64>>,
    /// `mm-dd-yyyy`: entries expire at the start of that day (UTC).
    #[serde(default)]
    expiry_date: Option<Setting<String>>,
    /// `hh:mm:ss`: entries expire at the next such time of day (UTC).
    #[serde(default)]
    time_of_day: Option<Setting<String>>,
}

/// When a stored entry expires, decided each time one is stored.
#[derive(Debug, Clone)]
enum Expiry {
    /// Seconds; a `ref` that resolves to a positive whole number wins.
    Timeout {
        reference: Option<String>,
        secs: Option<u64>,
    },
    /// A date (`mm-dd-yyyy`, start of the day, UTC).
    Date {
        reference: Option<String>,
        date: Option<chrono::NaiveDate>,
    },
    /// A time of day (`hh:mm:ss`, UTC): the next one from now.
    TimeOfDay {
        reference: Option<String>,
        time: Option<chrono::NaiveTime>,
    },
}

fn parse_date(s: &str) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(s.trim(), "%m-%d-%Y").ok()
}

fn parse_time(s: &str) -> Option<chrono::NaiveTime> {
    chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M:%S").ok()
}

/// The longest lifetime an entry may have: `Instant + ttl` panics past the clock's range.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl Expiry {
    fn compile(spec: &ExpirySpec) -> Result<Self, SpecError> {
        let given = [
            spec.timeout_in_sec.is_some(),
            spec.expiry_date.is_some(),
            spec.time_of_day.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(SpecError::new(
                "expiry",
                "give exactly one of timeoutInSec, expiryDate, timeOfDay",
            ));
        }
        let check_ref = |field: &str, r: &Option<String>| match r {
            Some(r) if r.trim().is_empty() => Err(SpecError::new(field, "`ref` names a variable")),
            _ => Ok(()),
        };
        if let Some(t) = &spec.timeout_in_sec {
            let (reference, secs) = t.parts();
            check_ref("expiry.timeoutInSec.ref", &reference)?;
            if let Some(s) = secs {
                if s == 0 || s > MAX_TTL.as_secs() {
                    return Err(SpecError::new(
                        "expiry.timeoutInSec",
                        "must be between 1 and 31536000 (one year)",
                    ));
                }
            } else if reference.is_none() {
                return Err(SpecError::new(
                    "expiry.timeoutInSec",
                    "give a value or a ref",
                ));
            }
            return Ok(Expiry::Timeout { reference, secs });
        }
        if let Some(d) = &spec.expiry_date {
            let (reference, text) = d.parts();
            check_ref("expiry.expiryDate.ref", &reference)?;
            let date = text
                .map(|t| {
                    parse_date(&t).ok_or_else(|| {
                        SpecError::new("expiry.expiryDate", format!("`{t}` is not mm-dd-yyyy"))
                    })
                })
                .transpose()?;
            return Ok(Expiry::Date { reference, date });
        }
        let (reference, text) = spec
            .time_of_day
            .as_ref()
            .map(Setting::parts)
            .unwrap_or_default();
        check_ref("expiry.timeOfDay.ref", &reference)?;
        let time = text
            .map(|t| {
                parse_time(&t).ok_or_else(|| {
                    SpecError::new("expiry.timeOfDay", format!("`{t}` is not hh:mm:ss"))
                })
            })
            .transpose()?;
        Ok(Expiry::TimeOfDay { reference, time })
    }

    /// The lifetime of an entry stored now; `None`: do not store (the date is past, or
    /// neither the ref nor a literal gives a usable value).
    fn ttl(&self, ex: &Exchange, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
        let resolved = |r: &Option<String>| {
            r.as_deref()
                .and_then(|r| ex.lookup(r))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let ttl = match self {
            Expiry::Timeout { reference, secs } => {
                let from_ref = resolved(reference).and_then(|v| v.parse::<u64>().ok());
                Duration::from_secs(from_ref.filter(|s| *s > 0).or(*secs)?)
            }
            Expiry::Date { reference, date } => {
                let d = resolved(reference).and_then(|v| parse_date(&v)).or(*date)?;
                let at = d.and_hms_opt(0, 0, 0)?.and_utc();
                (at - now).to_std().ok()?
            }
            Expiry::TimeOfDay { reference, time } => {
                let t = resolved(reference).and_then(|v| parse_time(&v)).or(*time)?;
                let today = now.date_naive().and_time(t).and_utc();
                let at = if today > now {
                    today
                } else {
                    today + chrono::Duration::days(1)
                };
                (at - now).to_std().ok()?
            }
        };
        (!ttl.is_zero()).then_some(ttl.min(MAX_TTL))
    }
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Scope {
    #[default]
    Global,
    /// Per calling app (`client_id`, set by VerifyApiKey); no app, no caching.
    App,
    Flow,
}

#[derive(Debug)]
struct ResponseCache {
    name: String,
    prefix: String,
    fragments: Vec<Template>,
    scope: Scope,
    methods: Vec<String>,
    body_methods: bool,
    skip_lookup: Option<Condition>,
    skip_populate: Option<Condition>,
    exclude_errors: bool,
    /// With `exclude_errors` false: every status (Apigee), not only those below 500.
    any_status: bool,
    respect_cache_control: bool,
    max_entry: usize,
    /// The entry lifetime: `ttlSeconds` or `expiry`.
    expiry: Expiry,
    use_accept_header: bool,
    response_steps_on_hit: bool,
    status_header: String,
    store: Arc<LocalCache>,
    /// Keys with a request upstream, for coalescing concurrent misses.
    inflight: Option<moka::sync::Cache<Key, Arc<tokio::sync::Notify>>>,
    coalesce_wait: Duration,
    shared: Option<Arc<SharedTier>>,
    key_var: String,
    populate_var: String,
    /// Set when `skipLookup` sent the request upstream (`fwd=request`, not `fwd=miss`).
    bypass_var: String,
    /// Set when the request carried credentials and the key is not per app.
    credentialed_var: String,
    /// Apigee's `responsecache.<policy>.cachehit`: true on a hit, false on a lookup that
    /// missed (or was skipped).
    cachehit_var: String,
    metrics: CacheCounters,
}

/// `tollgate_response_cache_total{policy,result}`, resolved once per policy so a lookup
/// does no label hashing, and present at 0 from the start so a hit-ratio query has a value.
#[derive(Debug)]
struct CacheCounters {
    hit: prometheus::IntCounter,
    miss: prometheus::IntCounter,
    bypass: prometheus::IntCounter,
    stored: prometheus::IntCounter,
}

static CACHE_RESULTS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(
    || {
        let c = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_response_cache_total",
                "ResponseCache results by policy: hit, miss (went upstream), bypass (skipLookup), stored",
            ),
            &["policy", "result"],
        )
        .expect("valid metric");
        if let Err(e) = crate::telemetry::METRICS
            .registry
            .register(Box::new(c.clone()))
        {
            tracing::warn!(error = %e, "cache metric not registered");
        }
        c
    },
);

impl CacheCounters {
    fn new(policy: &str) -> Self {
        let c = |r: &str| CACHE_RESULTS.with_label_values(&[policy, r]);
        Self {
            hit: c("hit"),
            miss: c("miss"),
            bypass: c("bypass"),
            stored: c("stored"),
        }
    }
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    Ok(Arc::new(build_cache(ctx, spec)?))
}

fn build_cache(ctx: &BuildContext, spec: serde_norway::Value) -> Result<ResponseCache, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let apigee = spec.profile == Profile::Apigee;
    // `Instant + ttl` panics past the clock's range: bound it at load (one year).
    let ttl_seconds = spec.ttl_seconds.unwrap_or_else(default_ttl);
    if ttl_seconds == 0 || ttl_seconds > MAX_TTL.as_secs() {
        return Err(SpecError::new(
            "ttlSeconds",
            "must be between 1 and 31536000 (one year)",
        ));
    }
    let expiry = match (&spec.expiry, spec.ttl_seconds) {
        (Some(_), Some(_)) => {
            return Err(SpecError::new(
                "expiry",
                "give ttlSeconds or expiry, not both",
            ))
        }
        (Some(e), None) => Expiry::compile(e)?,
        (None, _) => Expiry::Timeout {
            reference: None,
            secs: Some(ttl_seconds),
        },
    };
    if spec.max_entry_bytes == 0 || spec.max_entry_bytes as u64 > spec.max_cache_bytes {
        return Err(SpecError::new(
            "maxEntryBytes",
            "must be greater than 0 and at most maxCacheBytes",
        ));
    }
    let status_header = super::check_header_name(&spec.status_header)
        .map_err(|m| SpecError::new("statusHeader", m))?;
    let fragments = spec
        .key_fragments
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Template::compile(f)
                .map_err(|e| SpecError::new(format!("keyFragments[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cond = |field: &str, c: &Option<String>| {
        c.as_deref()
            .map(|c| Condition::compile(c).map_err(|e| SpecError::new(field, e.to_string())))
            .transpose()
    };
    // `skipLookup` (CEL) or `skipCacheLookup` (Apigee's language), not both.
    let either =
        |cel: (&str, &Option<String>), apigee: (&str, &Option<String>)| match (cel.1, apigee.1) {
            (Some(_), Some(_)) => Err(SpecError::new(
                apigee.0,
                format!("give {} (CEL) or {} (Apigee), not both", cel.0, apigee.0),
            )),
            (None, Some(c)) => Condition::compile_apigee(c)
                .map(Some)
                .map_err(|e| SpecError::new(apigee.0, e.to_string())),
            _ => cond(cel.0, cel.1),
        };
    let skip_lookup = either(
        ("skipLookup", &spec.skip_lookup),
        ("skipCacheLookup", &spec.skip_cache_lookup),
    )?;
    let skip_populate = either(
        ("skipPopulate", &spec.skip_populate),
        ("skipCachePopulation", &spec.skip_cache_population),
    )?;
    let methods: Vec<String> = spec
        .methods
        .iter()
        .map(|m| m.to_ascii_uppercase())
        .collect();
    if methods.is_empty() {
        return Err(SpecError::new("methods", "give at least one method"));
    }
    let body_methods = methods
        .iter()
        .any(|m| matches!(m.as_str(), "POST" | "PUT" | "PATCH" | "QUERY"));
    let ttl = Duration::from_secs(ttl_seconds);
    let id = format!("{}|{}|{}", ctx.name, ttl_seconds, spec.max_cache_bytes);
    let store = ctx.services.caches.get(id, spec.max_cache_bytes);
    let coalesce_wait = Duration::from_millis(spec.coalesce_wait_ms);
    let inflight = (spec.coalesce_wait_ms > 0).then(|| {
        moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(coalesce_wait)
            .build()
    });
    let shared = spec
        .shared
        .as_ref()
        .map(|sh| {
            let timeout = Duration::from_millis(sh.timeout_ms);
            let tier = SharedTier::redis(&sh.redis, &ctx.name, timeout, ttl)
                .map_err(|e| SpecError::new("shared.redis", e))?;
            if sh.timeout_ms == 0 {
                return Err(SpecError::new("shared.timeoutMs", "must be greater than 0"));
            }
            Ok(Arc::new(tier))
        })
        .transpose()?;
    Ok(ResponseCache {
        shared,
        metrics: CacheCounters::new(&ctx.name),
        name: ctx.name.clone(),
        prefix: spec.key_prefix,
        fragments,
        scope: spec.scope,
        methods,
        body_methods,
        skip_lookup,
        skip_populate,
        exclude_errors: spec.exclude_error_responses.unwrap_or(!apigee),
        any_status: apigee,
        respect_cache_control: spec.respect_cache_control.unwrap_or(!apigee),
        max_entry: spec.max_entry_bytes,
        expiry,
        use_accept_header: spec.use_accept_header,
        response_steps_on_hit: spec.response_steps_on_hit.unwrap_or(apigee),
        status_header,
        store,
        inflight,
        coalesce_wait,
        key_var: format!("responsecache.{}.key", ctx.name),
        populate_var: format!("responsecache.{}.populate", ctx.name),
        bypass_var: format!("responsecache.{}.bypass", ctx.name),
        credentialed_var: format!("responsecache.{}.credentialed", ctx.name),
        cachehit_var: format!("responsecache.{}.cachehit", ctx.name),
    })
}

impl ResponseCache {
    /// The key for this exchange, or `None` when it must not be cached (no app in app
    /// scope, a method not cached).
    fn key(&self, ex: &Exchange) -> Option<Key> {
        let method = ex.request.method.as_str();
        if !self.methods.iter().any(|m| m == method) {
            return None;
        }
        let mut h = KeyHasher::new();
        let mut part = |b: &[u8]| h.part(b);
        part(self.prefix.as_bytes());
        match self.scope {
            Scope::Global => part(b"global"),
            Scope::Flow => part(ex.flow.as_bytes()),
            Scope::App => {
                let app = ex.lookup("client_id")?;
                if app.is_empty() {
                    return None;
                }
                part(app.as_bytes());
            }
        }
        // The host, as Envoy's virtual hosts compare it: one entry never answers another
        // site behind the same gateway.
        let host = ex.request.host.trim_end_matches('.').to_ascii_lowercase();
        part(host.as_bytes());
        part(method.as_bytes());
        if self.fragments.is_empty() {
            part(ex.request.uri.as_bytes());
        }
        for f in &self.fragments {
            part(f.render(ex).as_bytes());
        }
        if self.use_accept_header {
            // Apigee's `UseAcceptHeader`: the negotiated representation is part of the key.
            for name in [
                "accept",
                "accept-encoding",
                "accept-language",
                "accept-charset",
            ] {
                part(all_values(&ex.request.headers, name).as_bytes());
            }
        }
        if self.body_methods && matches!(method, "POST" | "PUT" | "PATCH" | "QUERY") {
            let digest = Sha256::digest(ex.request_body.as_deref().unwrap_or_default());
            part(&digest);
        }
        Some(h.finish())
    }

    /// Whether the client sent credentials (RFC 9111 §3.5's `Authorization`, or an API key,
    /// or a cookie) or a step verified who it is (`client_id`): its response may be for that
    /// caller only.
    fn credentialed(ex: &Exchange) -> bool {
        const HEADERS: [&str; 6] = [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
            "api-key",
            "x-goog-api-key",
        ];
        HEADERS
            .iter()
            .any(|h| ex.client_header_values(h).any(|v| !v.is_empty()))
            || crate::vars::query_pairs_raw(ex.request.query_string()).any(|(k, _)| {
                matches!(
                    crate::vars::percent_decode(k).to_ascii_lowercase().as_str(),
                    "key" | "apikey" | "api_key" | "api-key" | "access_token"
                )
            })
            || ex.lookup("client_id").is_some_and(|c| !c.is_empty())
    }

    /// Whether `e` may answer this request: the headers it varies on match, and the
    /// request accepts its content coding.
    fn usable(e: &Entry, ex: &Exchange) -> bool {
        let h = &ex.request.headers;
        e.vary.iter().all(|(n, v)| h.get(n) == v.as_deref())
            && e.headers
                .iter()
                .filter(|(n, _)| n == "content-encoding")
                .all(|(_, coding)| accepts_encoding(h.get("accept-encoding"), coding))
    }

    fn hit(&self, ex: &mut Exchange, e: &Entry) -> Outcome {
        self.metrics.hit.inc();
        ex.set_var(self.cachehit_var.clone(), true);
        if self.response_steps_on_hit {
            ex.state.response_steps_on_answer = true;
        }
        let mut headers = e.headers.clone();
        headers.push(("age".into(), e.stored.elapsed().as_secs().to_string()));
        headers.push((self.status_header.clone(), "tollgate; hit".into()));
        Outcome::Respond(Box::new(Answer::new(
            e.status,
            HIT,
            headers,
            e.content_type.clone(),
            e.body.clone(),
        )))
    }

    fn release(&self, key: &Key) {
        if let Some(inflight) = &self.inflight {
            if let Some(n) = inflight.remove(key) {
                n.notify_waiters();
            }
        }
    }

    fn lookup<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        let Some(key) = self.key(ex) else {
            return Hook::CONTINUE;
        };
        ex.set_var(self.key_var.clone(), hex(&key));
        ex.set_var(self.cachehit_var.clone(), false);
        if self.scope != Scope::App && Self::credentialed(ex) {
            ex.set_var(self.credentialed_var.clone(), true);
        }
        if self.skip_lookup.as_ref().is_some_and(|c| c.eval(ex)) {
            ex.set_var(self.bypass_var.clone(), true);
            return Hook::CONTINUE;
        }
        if let Some(e) = self.store.get(&key) {
            if Self::usable(&e, ex) {
                return Hook::Ready(self.hit(ex, &e));
            }
            // Another variant (or coding) is stored: go upstream; the answer replaces it.
            return Hook::CONTINUE;
        }
        if self.shared.is_none() && self.inflight.is_none() {
            return Hook::CONTINUE;
        }
        Hook::Pending(Box::pin(async move {
            if let Some(sh) = &self.shared {
                if let Some(e) = sh.get(&key).await {
                    let e = Arc::new(e);
                    self.store.insert(key, e.clone());
                    if Self::usable(&e, ex) {
                        return self.hit(ex, &e);
                    }
                    return Outcome::Continue;
                }
            }
            let Some(inflight) = &self.inflight else {
                return Outcome::Continue;
            };
            let mut leader = false;
            let notify = inflight.get_with(key, || {
                leader = true;
                Arc::new(tokio::sync::Notify::new())
            });
            if leader {
                return Outcome::Continue;
            }
            // Another request for this key is upstream: wait (bounded) for it to populate.
            let _ = tokio::time::timeout(self.coalesce_wait, notify.notified()).await;
            match self.store.get(&key) {
                Some(e) if Self::usable(&e, ex) => self.hit(ex, &e),
                _ => Outcome::Continue,
            }
        }))
    }

    /// Decides on response headers whether this response may be stored.
    fn on_response(&self, ex: &mut Exchange) {
        // The answer this policy served itself, going through the response steps: nothing
        // to store (Apigee skips the populate half on a hit too).
        if matches!(
            ex.var(&self.cachehit_var),
            Some(crate::vars::ValueRef::Bool(true))
        ) {
            return;
        }
        let Some(key) = ex.lookup(&self.key_var).and_then(|k| unhex(&k)) else {
            return;
        };
        let Some(resp) = &ex.response else { return };
        let status = resp.status;
        let cacheable_status = if self.exclude_errors {
            (200..300).contains(&status)
        } else if self.any_status {
            (100..600).contains(&status)
        } else {
            (200..500).contains(&status)
        };
        let event_stream = is_event_stream(resp);
        let cache_control = all_values(&resp.headers, "cache-control");
        let forbidden = self.respect_cache_control
            && freshness(&cache_control, event_stream) == Freshness::DoNotStore;
        // A response to a request with credentials, in a cache not keyed by the caller, is
        // stored only when the upstream says any caller may have it (RFC 9111 §3.5) — even
        // with `respectCacheControl: false`.
        let personal = ex.vars.contains_key(&self.credentialed_var)
            && !shareable_with_credentials(&cache_control);
        // `Vary: *`: no later request can be known to match.
        let vary_any = all_values(&resp.headers, "vary")
            .split(',')
            .any(|v| v.trim() == "*");
        let length = resp
            .headers
            .get("content-length")
            .and_then(|l| l.trim().parse::<usize>().ok());
        let too_big = length.is_some_and(|l| l > self.max_entry);
        let skip = self.skip_populate.as_ref().is_some_and(|c| c.eval(ex));
        let fwd = if ex.vars.contains_key(&self.bypass_var) {
            self.metrics.bypass.inc();
            "tollgate; fwd=request"
        } else {
            self.metrics.miss.inc();
            "tollgate; fwd=miss"
        };
        if personal {
            tracing::debug!(policy = %self.name, "response to a request with credentials not stored: no public, s-maxage or must-revalidate, and scope is not app");
        }
        if !cacheable_status || forbidden || personal || vary_any || too_big || skip {
            ex.set_header(Direction::Response, &self.status_header, fwd.into());
            self.release(&key);
            return;
        }
        // `stored` only when the size is known now to fit; a body of unknown length
        // (streamed, chunked) may still turn out too large.
        let held = ex.response_body.as_ref().map(Vec::len);
        let certain = held.or(length).is_some_and(|l| l <= self.max_entry);
        let status = if certain {
            format!("{fwd}; stored")
        } else {
            fwd.to_owned()
        };
        ex.set_header(Direction::Response, &self.status_header, status);
        ex.set_var(self.populate_var.clone(), true);
        match ex.response_body.take() {
            // An earlier response step held the whole body: store it now.
            Some(body) => {
                self.store_entry(ex, key, &body);
                ex.response_body = Some(body);
            }
            None => ex.response_capture = ex.response_capture.max(self.max_entry),
        }
    }

    fn store_entry(&self, ex: &mut Exchange, key: Key, body: &[u8]) {
        ex.vars.remove(&self.populate_var);
        let Some(resp) = &ex.response else { return };
        self.metrics.stored.inc();
        if body.len() > self.max_entry {
            tracing::debug!(policy = %self.name, bytes = body.len(), "response larger than maxEntryBytes; not cached");
            self.release(&key);
            return;
        }
        let headers = resp
            .headers
            .iter()
            .filter(|(n, _)| stored_header(n) && *n != self.status_header)
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
            .collect();
        let Some(base) = self.expiry.ttl(ex, chrono::Utc::now()) else {
            tracing::debug!(policy = %self.name, "expiry resolves to no future time; not cached");
            self.release(&key);
            return;
        };
        let ttl = match self.respect_cache_control {
            true => match freshness(
                &all_values(&resp.headers, "cache-control"),
                is_event_stream(resp),
            ) {
                Freshness::AtMost(d) => d.min(base),
                _ => base,
            },
            false => base,
        };
        // The coding is checked against `accept-encoding` on every hit, so that header is
        // not pinned to one value here.
        let mut vary: Vec<(String, Option<String>)> = Vec::new();
        for name in all_values(&resp.headers, "vary").split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() || name == "accept-encoding" || vary.iter().any(|(n, _)| *n == name)
            {
                continue;
            }
            let value = ex.request.headers.get(&name).map(str::to_owned);
            vary.push((name, value));
        }
        let now = Instant::now();
        let entry = Entry {
            status: resp.status,
            headers,
            content_type: resp
                .headers
                .get("content-type")
                .unwrap_or("application/octet-stream")
                .to_owned(),
            body: body.to_vec(),
            stored: now,
            expires: now + ttl,
            vary,
        };
        if let Some(sh) = &self.shared {
            sh.put(key, &entry);
        }
        self.store.insert(key, Arc::new(entry));
        self.release(&key);
    }
}

impl Policy for ResponseCache {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request && self.body_methods
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            response_copy: true,
            ..Hooks::default()
        }
    }

    fn request_headers<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        self.lookup(ex)
    }

    fn request_body<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        self.lookup(ex)
    }

    fn response_headers<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        self.on_response(ex);
        Hook::CONTINUE
    }

    /// The copy of a response that streamed past: stored when the headers said it may be.
    fn response_end<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        if !ex.vars.contains_key(&self.populate_var) {
            return Hook::CONTINUE;
        }
        if let Some(key) = ex.lookup(&self.key_var).and_then(|k| unhex(&k)) {
            // Taken and put back unchanged, as `on_response` does: no copy.
            if let Some(body) = ex.response_body.take() {
                self.store_entry(ex, key, &body);
                ex.response_body = Some(body);
            }
        }
        Hook::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo, ResponseInfo};

    fn policy(y: &str) -> Arc<dyn Policy> {
        let ctx = BuildContext {
            name: "rc".into(),
            ..Default::default()
        };
        build(&ctx, serde_norway::from_str(y).unwrap()).unwrap()
    }

    fn request(method: &str, uri: &str, body: Option<&str>) -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), method.into());
        h.push(":path".into(), uri.into());
        Exchange {
            request: RequestInfo::from_headers(h),
            request_body: body.map(|b| b.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    /// Where a step stopped the exchange: a served answer (a hit) or a fault.
    #[derive(Debug)]
    struct Stop {
        answer: bool,
        status: u16,
        headers: Vec<(String, String)>,
        /// (content type, bytes)
        body: Option<(String, Vec<u8>)>,
    }

    impl Stop {
        fn is_answer(&self) -> bool {
            self.answer
        }
    }

    async fn run(p: &Arc<dyn Policy>, ex: &mut Exchange, dir: Direction) -> Result<(), Stop> {
        match p.run(ex, dir).outcome().await {
            Outcome::Continue => Ok(()),
            Outcome::Respond(a) => {
                let ct = a
                    .headers
                    .iter()
                    .find(|(n, _)| n == "content-type")
                    .map(|(_, v)| v.clone());
                Err(Stop {
                    answer: true,
                    status: a.status,
                    headers: a.headers.clone(),
                    body: ct.map(|ct| (ct, a.body)),
                })
            }
            Outcome::Reject(f) => Err(Stop {
                answer: false,
                status: f.status,
                headers: f.headers,
                body: f.body,
            }),
        }
    }

    /// What the stream does at the end of a response that streamed past with a copy.
    fn observe(p: &Arc<dyn Policy>, ex: &mut Exchange, body: &[u8]) {
        assert!(p.hooks().response_copy);
        ex.response_body = Some(body.to_vec());
        assert!(matches!(p.response_end(ex), Hook::Ready(Outcome::Continue)));
        ex.response_body = None;
    }

    /// Runs a miss through: request, response headers, captured body.
    async fn miss(
        p: &Arc<dyn Policy>,
        ex: &mut Exchange,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) {
        run(p, ex, Direction::Request).await.unwrap();
        let mut h = Headers::new();
        h.push(":status".into(), status.to_string());
        for (k, v) in headers {
            h.push((*k).into(), (*v).into());
        }
        ex.response = Some(ResponseInfo { status, headers: h });
        run(p, ex, Direction::Response).await.unwrap();
        if ex.response_capture > 0 {
            let limit = ex.response_capture;
            ex.response_capture = 0;
            if body.len() <= limit {
                observe(p, ex, body.as_bytes());
            }
        }
    }

    #[tokio::test]
    async fn miss_then_hit_with_age_and_status() {
        let p = policy("keyFragments: ['{request.uri}']");
        let mut ex = request("GET", "/a?x=1", None);
        miss(
            &p,
            &mut ex,
            200,
            &[
                ("content-type", "application/json"),
                ("set-cookie", "s=1"),
                ("x-up", "1"),
            ],
            "{\"v\":1}",
        )
        .await;
        let m = ex.take_mutations(Direction::Response);
        assert!(m
            .set
            .iter()
            .any(|(n, v, _)| n == "cache-status" && v.contains("miss")));

        let mut ex = request("GET", "/a?x=1", None);
        let f = run(&p, &mut ex, Direction::Request).await.unwrap_err();
        assert!(f.is_answer());
        assert_eq!(f.status, 200);
        assert_eq!(f.body.as_ref().unwrap().1, b"{\"v\":1}");
        assert_eq!(f.body.as_ref().unwrap().0, "application/json");
        assert!(f.headers.contains(&("x-up".into(), "1".into())));
        assert!(f.headers.iter().any(|(n, _)| n == "age"));
        assert!(f
            .headers
            .contains(&("cache-status".into(), "tollgate; hit".into())));
        assert!(
            !f.headers.iter().any(|(n, _)| n == "set-cookie"),
            "cookies are never replayed"
        );
        assert_eq!(
            ex.lookup("responsecache.rc.cachehit").as_deref(),
            Some("true")
        );
        // Another URI misses; another method is not cached at all.
        let mut ex = request("GET", "/a?x=2", None);
        run(&p, &mut ex, Direction::Request).await.unwrap();
        assert_eq!(
            ex.lookup("responsecache.rc.cachehit").as_deref(),
            Some("false")
        );
        let mut ex = request("DELETE", "/a?x=1", None);
        run(&p, &mut ex, Direction::Request).await.unwrap();
        assert!(ex.lookup("responsecache.rc.key").is_none());
    }

    #[tokio::test]
    async fn what_is_not_stored() {
        let p = policy("maxEntryBytes: 10");
        for (status, headers, body) in [
            (500, vec![], "x"),
            (200, vec![("cache-control", "no-store")], "x"),
            (200, vec![("cache-control", "max-age=5, private")], "x"),
            (200, vec![], "far more than ten bytes"),
            (200, vec![("content-length", "99")], "x"),
        ] {
            let mut ex = request("GET", "/n", None);
            miss(&p, &mut ex, status, &headers, body).await;
            let mut ex = request("GET", "/n", None);
            assert!(
                run(&p, &mut ex, Direction::Request).await.is_ok(),
                "{status} {headers:?} stored"
            );
        }
        // Overridden: errors and private responses may be stored when asked for.
        let p = policy("excludeErrorResponses: false\nrespectCacheControl: false");
        let mut ex = request("GET", "/n", None);
        miss(&p, &mut ex, 404, &[("cache-control", "private")], "gone").await;
        let mut ex = request("GET", "/n", None);
        assert_eq!(
            run(&p, &mut ex, Direction::Request)
                .await
                .unwrap_err()
                .status,
            404
        );
    }

    #[tokio::test]
    async fn post_keyed_on_body_and_skip_conditions() {
        let p = policy("methods: [POST]\nskipLookup: \"request.headers['cache-control'] == 'no-cache'\"\nskipPopulate: \"response.headers['x-partial'] == 'yes'\"");
        assert!(p.needs_body(Direction::Request));
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":0}"));
        miss(
            &p,
            &mut ex,
            200,
            &[("content-type", "text/event-stream")],
            "data: a\n\ndata: [DONE]\n\n",
        )
        .await;
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":0}"));
        let f = run(&p, &mut ex, Direction::Request).await.unwrap_err();
        assert_eq!(f.body.as_ref().unwrap().0, "text/event-stream");
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":1}"));
        assert!(run(&p, &mut ex, Direction::Request).await.is_ok());
        // skipLookup: goes upstream and refreshes the entry.
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":0}"));
        ex.request
            .headers
            .push("cache-control".into(), "no-cache".into());
        miss(
            &p,
            &mut ex,
            200,
            &[("content-type", "text/event-stream")],
            "data: b\n\n",
        )
        .await;
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":0}"));
        let f = run(&p, &mut ex, Direction::Request).await.unwrap_err();
        assert_eq!(f.body.as_ref().unwrap().1, b"data: b\n\n");
        // skipPopulate keeps the old entry.
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":0}"));
        ex.request
            .headers
            .push("cache-control".into(), "no-cache".into());
        miss(&p, &mut ex, 200, &[("x-partial", "yes")], "partial").await;
        let mut ex = request("POST", "/v1/chat", Some("{\"temperature\":0}"));
        let f = run(&p, &mut ex, Direction::Request).await.unwrap_err();
        assert_eq!(f.body.as_ref().unwrap().1, b"data: b\n\n");
    }

    #[tokio::test]
    async fn scopes_and_hostile_keys() {
        let p = policy("scope: app\nkeyFragments: ['{request.header.x-k}']");
        let mut ex = request("GET", "/s", None);
        run(&p, &mut ex, Direction::Request).await.unwrap();
        assert!(
            ex.lookup("responsecache.rc.key").is_none(),
            "no app, no caching"
        );
        let hostile = "\u{0}\r\n".repeat(10_000);
        let mut ex = request("GET", "/s", None);
        ex.request.headers.push("x-k".into(), hostile);
        ex.set_var("client_id", "app1");
        miss(&p, &mut ex, 200, &[], "one").await;
        assert_eq!(
            ex.lookup("responsecache.rc.key").unwrap().len(),
            64,
            "a digest, whatever the input"
        );
        let mut ex = request("GET", "/s", None);
        ex.set_var("client_id", "app2");
        assert!(
            run(&p, &mut ex, Direction::Request).await.is_ok(),
            "another app's entry"
        );
    }

    #[tokio::test]
    async fn concurrent_misses_wait_for_the_first() {
        let p = policy("coalesceWaitMs: 5000");
        let mut first = request("GET", "/c", None);
        run(&p, &mut first, Direction::Request).await.unwrap();
        let p2 = p.clone();
        let follower = tokio::spawn(async move {
            let mut ex = request("GET", "/c", None);
            run(&p2, &mut ex, Direction::Request).await
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!follower.is_finished(), "the second miss waits");
        let mut h = Headers::new();
        h.push(":status".into(), "200".into());
        first.response = Some(ResponseInfo {
            status: 200,
            headers: h,
        });
        run(&p, &mut first, Direction::Response).await.unwrap();
        observe(&p, &mut first, b"shared");
        let f = follower.await.unwrap().unwrap_err();
        assert_eq!(f.body.unwrap().1, b"shared");
    }

    #[tokio::test]
    async fn unreachable_shared_tier_is_a_miss() {
        // Nothing listens on port 1: lookups and stores degrade to the local cache.
        let p = policy("shared: {redis: 'redis://127.0.0.1:1', timeoutMs: 20}");
        let mut ex = request("GET", "/u", None);
        miss(&p, &mut ex, 200, &[], "local").await;
        let mut ex = request("GET", "/u", None);
        let f = run(&p, &mut ex, Direction::Request).await.unwrap_err();
        assert_eq!(f.body.unwrap().1, b"local");
        let mut ex = request("GET", "/other", None);
        assert!(run(&p, &mut ex, Direction::Request).await.is_ok());
    }

    fn status_header(ex: &mut Exchange) -> Option<String> {
        let m = ex.take_mutations(Direction::Response);
        m.set
            .iter()
            .find(|(n, _, _)| n == "cache-status")
            .map(|(_, v, _)| v.clone())
    }

    /// A lookup's outcome: the hit's body, or `None` for a miss.
    async fn lookup(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Option<Vec<u8>> {
        match run(p, ex, Direction::Request).await {
            Ok(()) => None,
            Err(f) => {
                assert!(f.is_answer(), "{f:?}");
                f.body.map(|b| b.1)
            }
        }
    }

    fn as_app(mut ex: Exchange, app: &str) -> Exchange {
        ex.set_var("client_id", app.to_owned());
        ex
    }

    #[tokio::test]
    async fn scope_keeps_apps_and_flows_apart() {
        // Per app: the same fragments under two apps are two keys.
        let p = policy("scope: app\nkeyFragments: ['{request.uri}']");
        miss(
            &p,
            &mut as_app(request("GET", "/s", None), "app1"),
            200,
            &[],
            "one",
        )
        .await;
        assert_eq!(
            lookup(&p, &mut as_app(request("GET", "/s", None), "app2")).await,
            None
        );
        assert_eq!(
            lookup(&p, &mut as_app(request("GET", "/s", None), "app1"))
                .await
                .unwrap(),
            b"one"
        );
        // Global: the same fragments are one key whoever asks, so a response to a verified
        // app is stored only when the upstream says anyone may have it (RFC 9111 §3.5).
        let p = policy("scope: global\nkeyFragments: ['{request.uri}']");
        miss(
            &p,
            &mut as_app(request("GET", "/s", None), "app1"),
            200,
            &[],
            "one",
        )
        .await;
        assert_eq!(
            lookup(&p, &mut as_app(request("GET", "/s", None), "app2")).await,
            None
        );
        miss(
            &p,
            &mut as_app(request("GET", "/s", None), "app1"),
            200,
            &[("cache-control", "public")],
            "one",
        )
        .await;
        assert_eq!(
            lookup(&p, &mut as_app(request("GET", "/s", None), "app2"))
                .await
                .unwrap(),
            b"one"
        );
        // Per flow.
        let p = policy("scope: flow");
        let in_flow = |flow: &str| {
            let mut ex = request("GET", "/f", None);
            ex.flow = flow.into();
            ex
        };
        miss(&p, &mut in_flow("f1"), 200, &[], "f1").await;
        assert_eq!(lookup(&p, &mut in_flow("f2")).await, None);
        assert_eq!(lookup(&p, &mut in_flow("f1")).await.unwrap(), b"f1");
    }

    #[tokio::test]
    async fn responses_to_credentialed_requests_are_stored_only_when_allowed() {
        let p = policy("{}");
        let with = |h: &str, v: &str, uri: &str| {
            let mut ex = request("GET", uri, None);
            ex.request.headers.push(h.into(), v.into());
            ex
        };
        // Authorization, an API key header or query parameter, a cookie: not stored...
        for (i, (h, v, q)) in [
            ("authorization", "Bearer alice", ""),
            ("x-api-key", "k", ""),
            ("cookie", "s=1", ""),
            ("x-other", "1", "?api_key=k"),
        ]
        .into_iter()
        .enumerate()
        {
            let uri = format!("/p{i}{q}");
            miss(
                &p,
                &mut with(h, v, &uri),
                200,
                &[("cache-control", "max-age=60")],
                "alice",
            )
            .await;
            assert_eq!(
                lookup(&p, &mut request("GET", &uri, None)).await,
                None,
                "{h}"
            );
        }
        // ...unless the response allows it: public, s-maxage, must-revalidate.
        for (i, cc) in ["public, max-age=60", "s-maxage=60", "must-revalidate"]
            .into_iter()
            .enumerate()
        {
            let uri = format!("/ok{i}");
            miss(
                &p,
                &mut with("authorization", "Bearer alice", &uri),
                200,
                &[("cache-control", cc)],
                "shared",
            )
            .await;
            assert_eq!(
                lookup(&p, &mut request("GET", &uri, None)).await.unwrap(),
                b"shared",
                "{cc}"
            );
        }
        // Even with respectCacheControl off.
        let lax = policy("respectCacheControl: false");
        miss(
            &lax,
            &mut with("authorization", "Bearer alice", "/lax"),
            200,
            &[],
            "alice",
        )
        .await;
        assert_eq!(lookup(&lax, &mut request("GET", "/lax", None)).await, None);
        // The client's Authorization counts when the flow took it out of the view.
        let mut ex = request("GET", "/owned", None);
        ex.client_owned
            .push("authorization".into(), "Bearer alice".into());
        miss(&p, &mut ex, 200, &[], "alice").await;
        assert_eq!(lookup(&p, &mut request("GET", "/owned", None)).await, None);
        // Per-app scope keys by the caller: stored.
        let per_app = policy("scope: app");
        let mut ex = as_app(with("authorization", "Bearer alice", "/app"), "app1");
        miss(&per_app, &mut ex, 200, &[], "app1's").await;
        assert_eq!(
            lookup(&per_app, &mut as_app(request("GET", "/app", None), "app1"))
                .await
                .unwrap(),
            b"app1's"
        );
    }

    #[tokio::test]
    async fn the_key_includes_the_host() {
        let p = policy("keyFragments: ['{request.path}']");
        let at = |host: &str| {
            let mut ex = request("GET", "/h", None);
            ex.request.host = host.into();
            ex
        };
        miss(&p, &mut at("a.example"), 200, &[], "site a").await;
        assert_eq!(lookup(&p, &mut at("b.example")).await, None);
        assert_eq!(lookup(&p, &mut at("A.Example.")).await.unwrap(), b"site a");
    }

    #[tokio::test]
    async fn entries_expire_with_the_ttl_or_the_upstream_max_age() {
        let short = policy("ttlSeconds: 1");
        miss(&short, &mut request("GET", "/t", None), 200, &[], "t").await;
        let long = policy("ttlSeconds: 300");
        miss(
            &long,
            &mut request("GET", "/m", None),
            200,
            &[("cache-control", "public, max-age=1")],
            "m",
        )
        .await;
        miss(
            &long,
            &mut request("GET", "/s", None),
            200,
            &[("cache-control", "max-age=300, s-maxage=1")],
            "s",
        )
        .await;
        miss(
            &long,
            &mut request("GET", "/l", None),
            200,
            &[("cache-control", "max-age=300")],
            "l",
        )
        .await;
        for (p, uri) in [(&short, "/t"), (&long, "/m"), (&long, "/s"), (&long, "/l")] {
            assert!(
                lookup(p, &mut request("GET", uri, None)).await.is_some(),
                "{uri} fresh"
            );
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for (p, uri) in [(&short, "/t"), (&long, "/m"), (&long, "/s")] {
            assert_eq!(
                lookup(p, &mut request("GET", uri, None)).await,
                None,
                "{uri} expired"
            );
        }
        assert!(
            lookup(&long, &mut request("GET", "/l", None))
                .await
                .is_some(),
            "max-age above the TTL changes nothing"
        );
    }

    #[tokio::test]
    async fn no_cache_and_zero_lifetimes_are_not_stored_unless_overridden() {
        let p = policy("ttlSeconds: 60");
        for cc in [
            "no-cache",
            "no-cache=\"set-cookie\"",
            "max-age=0",
            "s-maxage=0, max-age=60",
            "max-age=soon",
        ] {
            let uri = format!("/n?{}", cc.len());
            miss(
                &p,
                &mut request("GET", &uri, None),
                200,
                &[("cache-control", cc)],
                "x",
            )
            .await;
            assert_eq!(
                lookup(&p, &mut request("GET", &uri, None)).await,
                None,
                "{cc} stored"
            );
        }
        let p = policy("respectCacheControl: false");
        miss(
            &p,
            &mut request("GET", "/n", None),
            200,
            &[("cache-control", "no-cache, max-age=0")],
            "x",
        )
        .await;
        assert!(lookup(&p, &mut request("GET", "/n", None)).await.is_some());
        // An event stream's `no-cache` (sent by SSE servers on every stream) does not forbid
        // storing; its `no-store` does.
        let p = policy("ttlSeconds: 60");
        let sse = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ];
        miss(
            &p,
            &mut request("GET", "/sse", None),
            200,
            &sse,
            "data: x\n\n",
        )
        .await;
        assert!(
            lookup(&p, &mut request("GET", "/sse", None))
                .await
                .is_some(),
            "SSE no-cache stored"
        );
        let sse = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
        ];
        miss(
            &p,
            &mut request("GET", "/sse2", None),
            200,
            &sse,
            "data: x\n\n",
        )
        .await;
        assert_eq!(
            lookup(&p, &mut request("GET", "/sse2", None)).await,
            None,
            "SSE no-store not stored"
        );
    }

    #[tokio::test]
    async fn evicted_by_max_cache_bytes() {
        let c = Arc::new(
            build_cache(
                &BuildContext::default(),
                serde_norway::from_str("maxCacheBytes: 4000\nmaxEntryBytes: 1000").unwrap(),
            )
            .unwrap(),
        );
        let p: Arc<dyn Policy> = c.clone();
        let body = "b".repeat(900);
        for i in 0..20 {
            miss(
                &p,
                &mut request("GET", &format!("/e{i}"), None),
                200,
                &[],
                &body,
            )
            .await;
        }
        c.store.run_pending_tasks();
        assert!(
            c.store.weighted_size() <= 4000,
            "{}",
            c.store.weighted_size()
        );
        let mut hits = 0;
        for i in 0..20 {
            if lookup(&p, &mut request("GET", &format!("/e{i}"), None))
                .await
                .is_some()
            {
                hits += 1;
            }
        }
        assert!(
            (1..=4).contains(&hits),
            "{hits} entries of 900 bytes in 4000"
        );
    }

    #[tokio::test]
    async fn caches_a_reload_no_longer_uses_are_dropped() {
        let ctx = BuildContext {
            name: "rc".into(),
            ..Default::default()
        };
        let caches = ctx.services.caches.clone();
        let make = |y: &str| build(&ctx, serde_norway::from_str(y).unwrap()).unwrap();
        let old = make("ttlSeconds: 60");
        miss(&old, &mut request("GET", "/r", None), 200, &[], "kept").await;
        // A reload builds the new configuration while the old one still runs: an unchanged
        // policy finds its cache and entries.
        let same = make("ttlSeconds: 60");
        drop(old);
        assert_eq!(
            lookup(&same, &mut request("GET", "/r", None))
                .await
                .unwrap(),
            b"kept"
        );
        assert_eq!(caches.live(), 1);
        // The next reload resizes it: the old cache goes with the last policy using it.
        let resized = make("ttlSeconds: 60\nmaxCacheBytes: 10000000");
        assert_eq!(caches.live(), 2);
        drop(same);
        assert_eq!(caches.live(), 1);
        assert_eq!(caches.slots(), 1, "the dead slot is pruned");
        assert_eq!(
            lookup(&resized, &mut request("GET", "/r", None)).await,
            None
        );
        drop(resized);
        assert_eq!(caches.live(), 0);
        let again = make("ttlSeconds: 60");
        assert_eq!(
            lookup(&again, &mut request("GET", "/r", None)).await,
            None,
            "its entries were freed"
        );
    }

    #[tokio::test]
    async fn cache_status_claims_stored_only_when_certain() {
        let p = policy(
            "maxEntryBytes: 10\nskipLookup: \"request.headers['cache-control'] == 'no-cache'\"",
        );
        for (uri, status, headers, want) in [
            (
                "/a",
                200,
                vec![("content-length", "3")],
                "tollgate; fwd=miss; stored",
            ),
            ("/b", 200, vec![], "tollgate; fwd=miss"),
            (
                "/c",
                200,
                vec![("content-length", "99")],
                "tollgate; fwd=miss",
            ),
            (
                "/d",
                500,
                vec![("content-length", "3")],
                "tollgate; fwd=miss",
            ),
            (
                "/e",
                200,
                vec![("content-length", "3"), ("cache-control", "no-store")],
                "tollgate; fwd=miss",
            ),
        ] {
            let mut ex = request("GET", uri, None);
            miss(&p, &mut ex, status, &headers, "abc").await;
            assert_eq!(status_header(&mut ex).as_deref(), Some(want), "{uri}");
        }
        // Unknown length: not claimed, but stored when the body turns out to fit.
        assert_eq!(
            lookup(&p, &mut request("GET", "/b", None)).await.unwrap(),
            b"abc"
        );
        let mut ex = request("GET", "/a", None);
        ex.request
            .headers
            .push("cache-control".into(), "no-cache".into());
        miss(&p, &mut ex, 200, &[("content-length", "3")], "abc").await;
        assert_eq!(
            status_header(&mut ex).as_deref(),
            Some("tollgate; fwd=request; stored")
        );
    }

    #[tokio::test]
    async fn vary_and_content_encoding() {
        let p = policy("ttlSeconds: 60");
        miss(
            &p,
            &mut request("GET", "/star", None),
            200,
            &[("vary", "*")],
            "x",
        )
        .await;
        assert_eq!(
            lookup(&p, &mut request("GET", "/star", None)).await,
            None,
            "Vary: * is never stored"
        );

        let with = |uri: &str, headers: &[(&str, &str)]| {
            let mut ex = request("GET", uri, None);
            for (n, v) in headers {
                ex.request.headers.push((*n).into(), (*v).into());
            }
            ex
        };
        miss(
            &p,
            &mut with("/lang", &[("accept-language", "en")]),
            200,
            &[("vary", "Accept-Language, accept-encoding")],
            "en",
        )
        .await;
        assert_eq!(
            lookup(&p, &mut with("/lang", &[("accept-language", "fr")])).await,
            None
        );
        assert_eq!(lookup(&p, &mut with("/lang", &[])).await, None);
        assert_eq!(
            lookup(&p, &mut with("/lang", &[("accept-language", "en")]))
                .await
                .unwrap(),
            b"en"
        );

        miss(
            &p,
            &mut with("/gz", &[("accept-encoding", "gzip, br")]),
            200,
            &[("content-encoding", "gzip")],
            "zz",
        )
        .await;
        for (ae, served) in [
            (Some("gzip, br"), true),
            (Some("br;q=1.0, GZIP;q=0.5"), true),
            (Some("*"), true),
            (Some("br, *;q=0"), false),
            (Some("gzip;q=0, *"), false),
            (Some("identity"), false),
            (None, false),
        ] {
            let mut ex = with(
                "/gz",
                &ae.map(|a| vec![("accept-encoding", a)]).unwrap_or_default(),
            );
            assert_eq!(lookup(&p, &mut ex).await.is_some(), served, "{ae:?}");
        }
    }

    #[tokio::test]
    async fn hop_by_hop_headers_are_not_stored() {
        let p = policy("ttlSeconds: 60");
        let hop = [
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "h2c"),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "1"),
        ];
        miss(&p, &mut request("GET", "/h", None), 200, &hop, "h").await;
        let f = run(&p, &mut request("GET", "/h", None), Direction::Request)
            .await
            .unwrap_err();
        let names: Vec<&str> = f.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"x-kept"), "{names:?}");
        for (n, _) in &hop[..6] {
            assert!(!names.contains(n), "{n} replayed: {names:?}");
        }
    }

    #[test]
    fn bad_specs() {
        let ctx = BuildContext::default();
        for (y, field) in [
            ("ttlSeconds: 0", "ttlSeconds"),
            ("maxEntryBytes: 100\nmaxCacheBytes: 10", "maxEntryBytes"),
            ("statusHeader: 'bad header'", "statusHeader"),
            ("skipLookup: 'a =='", "skipLookup"),
            ("methods: []", "methods"),
            ("shared: {redis: 'nope://x'}", "shared.redis"),
            (
                "shared: {redis: 'redis://127.0.0.1:1', timeoutMs: 0}",
                "shared.timeoutMs",
            ),
            ("ttlSeconds: 5\nexpiry: {timeoutInSec: 5}", "expiry"),
            ("expiry: {timeoutInSec: 5, timeOfDay: '10:00:00'}", "expiry"),
            ("expiry: {}", "expiry"),
            ("expiry: {expiryDate: '2027-12-31'}", "expiry.expiryDate"),
            ("expiry: {timeOfDay: '25:00'}", "expiry.timeOfDay"),
            ("expiry: {timeoutInSec: 0}", "expiry.timeoutInSec"),
            (
                "expiry: {timeoutInSec: {ref: ''}}",
                "expiry.timeoutInSec.ref",
            ),
            ("skipCacheLookup: 'request.verb ='", "skipCacheLookup"),
            (
                "skipLookup: 'true'\nskipCacheLookup: 'request.verb = \"GET\"'",
                "skipCacheLookup",
            ),
            ("profile: akamai", "profile"),
        ] {
            let e = build(&ctx, serde_norway::from_str(y).unwrap()).unwrap_err();
            assert_eq!(e.field, field, "{y}");
        }
    }

    /// `profile: apigee`: any status is stored, upstream `Cache-Control` is not consulted,
    /// a hit says so in `responsecache.<p>.cachehit` and asks for the response steps.
    #[tokio::test]
    async fn apigee_profile_defaults() {
        let p = policy("profile: apigee");
        let mut ex = request("GET", "/err", None);
        miss(&p, &mut ex, 503, &[("cache-control", "no-store")], "down").await;
        assert_eq!(
            ex.lookup("responsecache.rc.cachehit").as_deref(),
            Some("false")
        );
        assert!(!ex.state.response_steps_on_answer);
        let mut ex = request("GET", "/err", None);
        let hit = run(&p, &mut ex, Direction::Request).await.unwrap_err();
        assert!(hit.is_answer());
        assert_eq!(hit.status, 503);
        assert_eq!(
            ex.lookup("responsecache.rc.cachehit").as_deref(),
            Some("true")
        );
        assert!(ex.state.response_steps_on_answer);
        // The populate half, run on its own answer, stores nothing again.
        ex.response = Some(ResponseInfo {
            status: 503,
            headers: Headers::new(),
        });
        run(&p, &mut ex, Direction::Response).await.unwrap();
        assert_eq!(ex.response_capture, 0);
        assert!(ex.take_mutations(Direction::Response).is_empty());

        // tollgate's defaults: a 503 passes on, and a hit answers at once.
        let p = policy("{}");
        let mut ex = request("GET", "/err", None);
        miss(&p, &mut ex, 503, &[], "down").await;
        let mut ex = request("GET", "/err", None);
        run(&p, &mut ex, Direction::Request).await.unwrap();
        // `excludeErrorResponses: true` under the Apigee profile: 2xx only.
        let p = policy("profile: apigee\nexcludeErrorResponses: true\nresponseStepsOnHit: false");
        let mut ex = request("GET", "/err", None);
        miss(&p, &mut ex, 404, &[], "gone").await;
        let mut ex = request("GET", "/err", None);
        run(&p, &mut ex, Direction::Request).await.unwrap();
        let mut ex = request("GET", "/ok", None);
        miss(&p, &mut ex, 200, &[], "ok").await;
        let mut ex = request("GET", "/ok", None);
        assert!(run(&p, &mut ex, Direction::Request).await.is_err());
        assert!(!ex.state.response_steps_on_answer);
    }

    /// Apigee's conditions skip the lookup (refreshing the entry) and the population.
    #[tokio::test]
    async fn apigee_skip_conditions() {
        let p = policy(
            "skipCacheLookup: 'request.header.bypass-cache = \"true\"'\n\
             skipCachePopulation: 'response.header.x-partial = \"yes\"'",
        );
        let mut ex = request("GET", "/w", None);
        miss(&p, &mut ex, 200, &[], "v1").await;
        let mut ex = request("GET", "/w", None);
        ex.request
            .headers
            .push("bypass-cache".into(), "true".into());
        miss(&p, &mut ex, 200, &[], "v2").await;
        assert_eq!(
            ex.lookup("responsecache.rc.cachehit").as_deref(),
            Some("false")
        );
        let mut ex = request("GET", "/w", None);
        assert_eq!(lookup(&p, &mut ex).await.as_deref(), Some(&b"v2"[..]));
        let mut ex = request("GET", "/w", None);
        ex.request
            .headers
            .push("bypass-cache".into(), "true".into());
        miss(&p, &mut ex, 200, &[("x-partial", "yes")], "partial").await;
        let mut ex = request("GET", "/w", None);
        assert_eq!(lookup(&p, &mut ex).await.as_deref(), Some(&b"v2"[..]));
    }

    /// `useAcceptHeader`: requests negotiating another representation miss.
    #[tokio::test]
    async fn accept_headers_in_the_key() {
        let with = |accept: &str| {
            let mut ex = request("GET", "/doc", None);
            ex.request.headers.push("accept".into(), accept.into());
            ex
        };
        let p = policy("useAcceptHeader: true");
        miss(&p, &mut with("application/json"), 200, &[], "{}").await;
        assert!(lookup(&p, &mut with("application/json")).await.is_some());
        assert!(lookup(&p, &mut with("application/xml")).await.is_none());
        let p = policy("{}");
        miss(&p, &mut with("application/json"), 200, &[], "{}").await;
        assert!(lookup(&p, &mut with("application/xml")).await.is_some());
    }

    /// `expiry`: a timeout (ref first, literal as fallback), a date, a time of day.
    #[test]
    fn expiry_settings() {
        use chrono::TimeZone;
        let compile = |y: &str| Expiry::compile(&serde_norway::from_str(y).unwrap()).unwrap();
        let now = chrono::Utc
            .with_ymd_and_hms(2027, 3, 10, 22, 0, 0)
            .single()
            .unwrap();
        let mut ex = Exchange::default();
        let t = compile("timeoutInSec: {ref: cache.ttl, value: 60}");
        assert_eq!(t.ttl(&ex, now), Some(Duration::from_secs(60)));
        ex.set_var("cache.ttl", "5");
        assert_eq!(t.ttl(&ex, now), Some(Duration::from_secs(5)));
        ex.set_var("cache.ttl", "soon");
        assert_eq!(t.ttl(&ex, now), Some(Duration::from_secs(60)));
        // A ref alone that does not resolve: nothing is stored.
        let t = compile("timeoutInSec: {ref: nope}");
        assert_eq!(t.ttl(&ex, now), None);

        let d = compile("expiryDate: '03-12-2027'");
        assert_eq!(d.ttl(&ex, now), Some(Duration::from_secs(26 * 3600)));
        let past = compile("expiryDate: '03-10-2027'");
        assert_eq!(past.ttl(&ex, now), None, "a past date stores nothing");
        let d = compile("expiryDate: {ref: cache.until, value: '03-11-2027'}");
        assert_eq!(d.ttl(&ex, now), Some(Duration::from_secs(2 * 3600)));
        ex.set_var("cache.until", "03-13-2027");
        assert_eq!(d.ttl(&ex, now), Some(Duration::from_secs(50 * 3600)));
        let far = compile("expiryDate: '01-01-2099'");
        assert_eq!(far.ttl(&ex, now), Some(MAX_TTL));

        let t = compile("timeOfDay: '23:30:00'");
        assert_eq!(t.ttl(&ex, now), Some(Duration::from_secs(5400)));
        let t = compile("timeOfDay: '21:00:00'");
        assert_eq!(
            t.ttl(&ex, now),
            Some(Duration::from_secs(23 * 3600)),
            "tomorrow's"
        );
        let t = compile("timeOfDay: {ref: cache.at, value: '22:00:10'}");
        assert_eq!(t.ttl(&ex, now), Some(Duration::from_secs(10)));
    }

    /// An entry stored under `expiry` lives as long as it says.
    #[tokio::test]
    async fn expiry_applies_to_stored_entries() {
        let p = policy("expiry: {timeoutInSec: {ref: my.ttl, value: 600}}");
        let mut ex = request("GET", "/short", None);
        ex.set_var("my.ttl", "1");
        miss(&p, &mut ex, 200, &[], "x").await;
        let mut ex = request("GET", "/short", None);
        assert!(lookup(&p, &mut ex).await.is_some());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut ex = request("GET", "/short", None);
        assert!(
            lookup(&p, &mut ex).await.is_none(),
            "expired after the ref's 1 s"
        );
    }
}
