//! Typed per-exchange state: what policies established about the exchange, kept as the
//! values they computed (the verified app and product, a verified token's claims, quota
//! decisions, callout answers, the parsed bodies, later the LLM request). Policies that need
//! one read the slot (a Quota reads the verified product's quota settings as numbers); the
//! flow variables conditions, templates and scripts see (`client_id`,
//! `verifyapikey.<p>.apiproduct.quota.limit`, `ratelimit.<p>.used.count`, ...) are generated
//! from the slots when asked for, never stored a second time.
//!
//! Each slot kind owns a name space: `verifyapikey.<p>.` and the bare app names (`client_id`,
//! `app.*`, `developer.email`, `apiproduct.*`), `jwt.<p>.`, `ratelimit.<p>.`,
//! `servicecallout.<p>.`. A later entry of a kind wins over an earlier one for a name both
//! define (a second VerifyApiKey step's `client_id`); explicit variables
//! ([`super::Exchange::vars`]) win over all.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use hyper::HeaderMap;

use super::{Value, ValueRef};
use crate::consumer::index::Verified;
use crate::consumer::QuotaSettings;
use crate::llm::LlmRequest;

/// The typed slots of one exchange. Empty (no allocation) until a policy fills one.
#[derive(Debug, Default)]
pub struct State {
    apps: Vec<AppSlot>,
    tokens: Vec<TokenSlot>,
    quotas: Vec<QuotaResult>,
    callouts: Vec<CalloutResult>,
    /// The LLM request the request body carries, once a step parsed it (issue 14 fills it,
    /// from [`super::Exchange::body_json`] through [`crate::llm::request::parse_request_json`],
    /// so the body is parsed once).
    pub llm: Option<Arc<LlmRequest>>,
    /// The prompt tokens of `llm`, counted once (see `pipeline::Hooks::llm`).
    pub llm_prompt_tokens: Option<u64>,
    /// What the exchange is charged with: the upstream's usage where it reported one,
    /// counted otherwise; set once the response ended, or the exchange ended without one
    /// (see `pipeline::Hooks::llm`).
    pub llm_usage: Option<crate::llm::FinalUsage>,
    /// What the exchange cost in the price table's currency, once a cost-budget step priced
    /// `llm_usage` (the `llm.cost` variable).
    pub llm_cost: Option<f64>,
    /// Token-quota and cost-budget reservations counted on the request, settled by the
    /// steps that made them (or their count halves) after the exchange; any left are
    /// released when the exchange drops.
    pub reservations: crate::ratelimit::reserve::Reservations,
    /// The LLM tracker's per-exchange state (see [`crate::llm::track`]); `None` when the
    /// flow does not track or the request is no LLM call.
    pub llm_tracker: Option<Box<crate::llm::track::Tracker>>,
    /// The LLM response as the tracker read it (text, completeness, errors), once the
    /// response ended: what a semantic cache stores.
    pub llm_response: Option<Box<crate::llm::ResponseSummary>>,
    /// The prompt's embedding, shared by the steps that embed the same text with the same
    /// embedder (SemanticCache, ModelRouter).
    pub prompt_embedding: Option<crate::embed::PromptEmbedding>,
    /// Each SemanticCache step's key on a miss, for storing the answer after the exchange
    /// (the request body is gone by then).
    pub semantic_pending: Vec<crate::policies::semantic_cache::Pending>,
    /// Each SanitizeResponse step's stream scanners, kept between response chunks.
    pub guard_streams: Vec<crate::policies::sanitize_response::StreamState>,
    /// What a MonetizationLimitsCheck step charges when the exchange ends.
    pub mint: Option<Box<crate::policies::monetization_limits_check::Charging>>,
    /// The request and response bodies parsed as JSON, on first use (see
    /// [`super::Exchange::body_json`]).
    pub(super) json: [OnceLock<JsonBody>; 2],
    /// The answer a request step served runs through every response step of the flow,
    /// not only those declared for answers (a ResponseCache hit as Apigee runs it).
    pub response_steps_on_answer: bool,
}

/// An app and product VerifyApiKey verified.
#[derive(Debug)]
struct AppSlot {
    /// `verifyapikey.<policy>.`
    prefix: Arc<str>,
    v: Verified,
}

/// The claims and header of a token VerifyJwt verified.
#[derive(Debug)]
struct TokenSlot {
    /// `jwt.<policy>.`
    prefix: Arc<str>,
    /// (name after the prefix, value); shared with the policy's verified-token cache.
    vars: Arc<Vec<(String, Value)>>,
}

/// One Quota decision.
#[derive(Debug)]
pub struct QuotaResult {
    /// `ratelimit.<policy>.`
    pub prefix: Arc<str>,
    pub allowed: i64,
    pub used: i64,
    pub available: i64,
    pub exceed: i64,
    /// Window end, ms since the epoch.
    pub expiry: i64,
    /// As shown (bounded).
    pub identifier: String,
}

/// The answer of one ServiceCallout.
#[derive(Debug)]
pub struct CalloutResult {
    /// `servicecallout.<policy>.`
    pub prefix: Arc<str>,
    pub status: Option<u16>,
    pub headers: HeaderMap,
    pub body: Option<String>,
    /// The values the spec's JSONPaths selected, by name.
    pub json: Vec<(String, Value)>,
    pub error: Option<String>,
}

/// A body parsed as JSON: the value, or why it is not JSON (serde_json's message), plus the
/// keys the top-level object holds more than once (the value keeps the last, as most
/// servers do; a reader that must not guess, such as VerifyApiKey's `model`, refuses them).
#[derive(Debug, Clone)]
pub struct JsonBody {
    pub value: Result<serde_json::Value, String>,
    pub duplicate_keys: Vec<String>,
    /// The bytes parsed (address and length), to notice a body written around
    /// [`super::Exchange::set_body`].
    pub(super) source: (usize, usize),
}

impl JsonBody {
    /// Parses `body` as `serde_json::from_slice` would (same errors, depth limit, trailing
    /// characters check), noting duplicate top-level keys on the way.
    pub fn parse(body: &[u8]) -> Self {
        use serde::de::DeserializeSeed;
        let mut duplicate_keys = Vec::new();
        let mut de = serde_json::Deserializer::from_slice(body);
        let value = Top {
            duplicates: &mut duplicate_keys,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| e.to_string());
        Self {
            value,
            duplicate_keys,
            source: (body.as_ptr() as usize, body.len()),
        }
    }

    /// The top-level object's string member `key`: `None` when the body is not a JSON
    /// object, the member is absent, not a string, empty, or given more than once.
    pub fn top_level_str(&self, key: &str) -> Option<&str> {
        if self.duplicate_keys.iter().any(|k| k == key) {
            return None;
        }
        self.value
            .as_ref()
            .ok()?
            .as_object()?
            .get(key)?
            .as_str()
            .filter(|s| !s.is_empty())
    }
}

/// Builds the top-level value, recording keys its object repeats; nested values are
/// serde_json's own.
struct Top<'d> {
    duplicates: &'d mut Vec<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Top<'_> {
    type Value = serde_json::Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Top<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v: serde_json::Value = map.next_value()?;
            match out.entry(k) {
                serde_json::map::Entry::Occupied(mut e) => {
                    if !self.duplicates.iter().any(|d| d == e.key()) {
                        self.duplicates.push(e.key().clone());
                    }
                    e.insert(v);
                }
                serde_json::map::Entry::Vacant(e) => {
                    e.insert(v);
                }
            }
        }
        Ok(serde_json::Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<serde_json::Value>()? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
        Ok(serde_json::Value::from(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
        Ok(serde_json::Value::from(u))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
}

/// The `llm.` variables, by suffix.
const LLM_SUFFIXES: [&str; 9] = [
    "api",
    "model",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost",
];

/// Quota setting names after `apiproduct.`, bare and with Apigee's `developer.` segment
/// (`llmQuota` as Apigee writes it, and in lower case).
const QUOTA_FIELDS: [(&str, &str); 3] = [
    ("quota", "developer.quota"),
    ("llmquota", "developer.llmquota"),
    ("llmQuota", "developer.llmQuota"),
];

/// The variables a quota decision defines, by suffix after `ratelimit.<policy>.`
/// (`remaining` is `available` by the name the design uses).
const QUOTA_SUFFIXES: [&str; 11] = [
    "allowed.count",
    "used.count",
    "available.count",
    "exceed.count",
    "expiry.time",
    "identifier",
    "allowed",
    "used",
    "available",
    "remaining",
    "expiry",
];

fn app_quota<'v>(v: &'v Verified, which: &str) -> Option<&'v QuotaSettings> {
    let p = &v.product.spec;
    let op = v.operation();
    match which {
        "quota" | "developer.quota" => op.and_then(|o| o.quota.as_ref()).or(p.quota.as_ref()),
        _ => op
            .and_then(|o| o.llm_token_quota.as_ref())
            .or(p.llm_token_quota.as_ref()),
    }
}

/// An app variable by its name without the policy prefix.
fn app_field<'v>(v: &'v Verified, name: &str) -> Option<ValueRef<'v>> {
    let app = &v.app;
    let product = &v.product.spec;
    Some(match name {
        "client_id" => ValueRef::Str(&v.key().id),
        "app.name" | "developer.app.name" => ValueRef::Str(&app.name),
        "developer.email" => ValueRef::Str(&app.developer_email),
        "apiproduct.name" => ValueRef::Str(&product.name),
        // Only an approved key of an approved app verifies.
        "status" | "app.status" => ValueRef::Str("approved"),
        "issued_at" => ValueRef::Int(v.key().created_at),
        // Apigee's -1 for a key that never expires.
        "expires_at" => ValueRef::Int(v.key().expires_at.unwrap_or(-1)),
        _ => {
            if let Some(k) = name.strip_prefix("app.") {
                // `app.attributes.<k>`, or Apigee's `app.<k>`.
                let k = k.strip_prefix("attributes.").unwrap_or(k);
                return app.attributes.get(k).map(|v| ValueRef::Str(v));
            }
            let rest = name.strip_prefix("apiproduct.")?;
            if let Some(k) = rest.strip_prefix("attributes.") {
                return product.attributes.get(k).map(|v| ValueRef::Str(v));
            }
            let quota = rest
                .rsplit_once('.')
                .filter(|(which, _)| QUOTA_FIELDS.iter().any(|(a, b)| which == a || which == b));
            let Some((which, setting)) = quota else {
                // Apigee's `apiproduct.<attribute>`.
                return product.attributes.get(rest).map(|v| ValueRef::Str(v));
            };
            let q = app_quota(v, which)?;
            match setting {
                "limit" => ValueRef::Int(i64::try_from(q.limit).unwrap_or(i64::MAX)),
                "interval" => ValueRef::Int(i64::from(q.interval)),
                "timeunit" => ValueRef::Str(q.time_unit.as_str()),
                _ => return None,
            }
        }
    })
}

fn each_app_field(v: &Verified, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
    for name in [
        "client_id",
        "app.name",
        "developer.app.name",
        "developer.email",
        "apiproduct.name",
        "status",
        "issued_at",
        "expires_at",
    ] {
        if let Some(x) = app_field(v, name) {
            f(name, x);
        }
    }
    for (k, x) in &v.app.attributes {
        f(&format!("app.attributes.{k}"), ValueRef::Str(x));
    }
    for (k, x) in &v.product.spec.attributes {
        f(&format!("apiproduct.attributes.{k}"), ValueRef::Str(x));
    }
    for (a, b) in QUOTA_FIELDS {
        for which in [a, b] {
            for setting in ["limit", "interval", "timeunit"] {
                let name = format!("apiproduct.{which}.{setting}");
                if let Some(x) = app_field(v, &name) {
                    f(&name, x);
                }
            }
        }
    }
}

impl AppSlot {
    fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        app_field(&self.v, name.strip_prefix(&*self.prefix).unwrap_or(name))
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
        each_app_field(&self.v, &mut |name, v| {
            // The key's own fields exist only under the policy's prefix, as in Apigee.
            if !matches!(name, "status" | "issued_at" | "expires_at") {
                f(name, v);
            }
            f(&format!("{}{name}", self.prefix), v);
        });
    }
}

/// Apigee's names for the registered claims, after `claim.`.
const CLAIM_ALIASES: [(&str, &str); 7] = [
    ("issuer", "iss"),
    ("subject", "sub"),
    ("audience", "aud"),
    ("expiry", "exp"),
    ("issued_at", "iat"),
    ("notbefore", "nbf"),
    ("id", "jti"),
];

impl TokenSlot {
    fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        let rest = name.strip_prefix(&*self.prefix)?;
        // Apigee's `decoded.claim.<c>` / `decoded.header.<h>` name the same values.
        let rest = rest.strip_prefix("decoded.").unwrap_or(rest);
        let find = |n: &str| {
            self.vars
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_ref())
        };
        if let Some(v) = find(rest) {
            return Some(v);
        }
        let claim = rest.strip_prefix("claim.")?;
        let (_, short) = CLAIM_ALIASES.iter().find(|(long, _)| *long == claim)?;
        find(&format!("claim.{short}"))
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
        for (n, v) in self.vars.iter() {
            f(&format!("{}{n}", self.prefix), v.as_ref());
            if n.starts_with("claim.") || n.starts_with("header.") {
                f(&format!("{}decoded.{n}", self.prefix), v.as_ref());
            }
        }
    }
}

impl QuotaResult {
    fn value(&self, suffix: &str) -> Option<ValueRef<'_>> {
        Some(match suffix {
            "allowed.count" | "allowed" => ValueRef::Int(self.allowed),
            "used.count" | "used" => ValueRef::Int(self.used),
            "available.count" | "available" | "remaining" => ValueRef::Int(self.available),
            "exceed.count" => ValueRef::Int(self.exceed),
            "expiry.time" | "expiry" => ValueRef::Int(self.expiry),
            "identifier" => ValueRef::Str(&self.identifier),
            _ => return None,
        })
    }

    fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        self.value(name.strip_prefix(&*self.prefix)?)
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
        for suffix in QUOTA_SUFFIXES {
            if let Some(v) = self.value(suffix) {
                f(&format!("{}{suffix}", self.prefix), v);
            }
        }
    }

    /// The full names this decision defines.
    pub fn names(prefix: &str) -> impl Iterator<Item = String> + '_ {
        QUOTA_SUFFIXES.iter().map(move |s| format!("{prefix}{s}"))
    }
}

impl CalloutResult {
    fn field(&self, rest: &str) -> Option<ValueRef<'_>> {
        match rest {
            "status" => self.status.map(|s| ValueRef::Int(i64::from(s))),
            "body" => self.body.as_deref().map(ValueRef::Str),
            "error" => self.error.as_deref().map(ValueRef::Str),
            _ => {
                if let Some(h) = rest.strip_prefix("header.") {
                    return self
                        .headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .map(ValueRef::Str);
                }
                let j = rest.strip_prefix("json.")?;
                self.json
                    .iter()
                    .find(|(n, _)| n == j)
                    .map(|(_, v)| v.as_ref())
            }
        }
    }

    fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        self.field(name.strip_prefix(&*self.prefix)?)
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
        for k in ["status", "body", "error"] {
            if let Some(v) = self.field(k) {
                f(&format!("{}{k}", self.prefix), v);
            }
        }
        for (k, v) in &self.headers {
            if let Ok(v) = v.to_str() {
                f(&format!("{}header.{k}", self.prefix), ValueRef::Str(v));
            }
        }
        for (k, v) in &self.json {
            f(&format!("{}json.{k}", self.prefix), v.as_ref());
        }
    }
}

/// Lists every name of `slots` once, with the value the latest slot defining it gives.
fn list<T>(
    slots: &[T],
    get: impl Fn(&T, &str) -> bool,
    each: impl Fn(&T, &mut dyn FnMut(&str, ValueRef<'_>)),
    f: &mut dyn FnMut(&str, ValueRef<'_>),
) {
    for (i, s) in slots.iter().enumerate() {
        each(s, &mut |k, v| {
            if !slots[i + 1..].iter().any(|later| get(later, k)) {
                f(k, v);
            }
        });
    }
}

impl State {
    /// Records the app and product VerifyApiKey `prefix` (`verifyapikey.<p>.`) verified.
    pub fn add_app(&mut self, prefix: Arc<str>, v: Verified) {
        self.apps.push(AppSlot { prefix, v });
    }

    /// The app verified by the VerifyApiKey step with `prefix` (`verifyapikey.<p>.`), or by
    /// the latest one when `None`.
    pub fn app(&self, prefix: Option<&str>) -> Option<&Verified> {
        let mut apps = self.apps.iter().rev();
        match prefix {
            None => apps.next(),
            Some(p) => apps.find(|a| *a.prefix == *p),
        }
        .map(|a| &a.v)
    }

    /// Records the variables of a token VerifyJwt `prefix` (`jwt.<p>.`) verified.
    pub fn add_token(&mut self, prefix: Arc<str>, vars: Arc<Vec<(String, Value)>>) {
        self.tokens.push(TokenSlot { prefix, vars });
    }

    pub fn add_quota(&mut self, q: QuotaResult) {
        self.quotas.push(q);
    }

    /// The latest decision of the quota with `prefix` (`ratelimit.<p>.`).
    pub fn quota(&self, prefix: &str) -> Option<&QuotaResult> {
        self.quotas.iter().rev().find(|q| *q.prefix == *prefix)
    }

    pub fn add_callout(&mut self, c: CalloutResult) {
        self.callouts.push(c);
    }

    /// The variable `name` generated from the slots, if one defines it. The first segment
    /// picks the slot kind, so a name costs one kind's slots at most.
    pub fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        let head = name.split_once('.').map_or(name, |(h, _)| h);
        match head {
            "verifyapikey" | "client_id" | "app" | "developer" | "apiproduct" => {
                self.apps.iter().rev().find_map(|a| a.get(name))
            }
            "jwt" => self.tokens.iter().rev().find_map(|t| t.get(name)),
            "ratelimit" => self.quotas.iter().rev().find_map(|q| q.get(name)),
            "servicecallout" => self.callouts.iter().rev().find_map(|c| c.get(name)),
            "llm" => self.llm_var(name.strip_prefix("llm.")?),
            "mint" => self.mint.as_ref()?.var(name.strip_prefix("mint.")?),
            _ => None,
        }
    }

    /// Calls `f` for every variable the slots define, each name once (for CEL maps of a
    /// prefix, script listings, debugging).
    pub fn for_each(&self, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
        list(&self.apps, |s, k| s.get(k).is_some(), AppSlot::for_each, f);
        list(
            &self.tokens,
            |s, k| s.get(k).is_some(),
            TokenSlot::for_each,
            f,
        );
        list(
            &self.quotas,
            |s, k| s.get(k).is_some(),
            QuotaResult::for_each,
            f,
        );
        list(
            &self.callouts,
            |s, k| s.get(k).is_some(),
            CalloutResult::for_each,
            f,
        );
        for suffix in LLM_SUFFIXES {
            if let Some(v) = self.llm_var(suffix) {
                f(&format!("llm.{suffix}"), v);
            }
        }
    }

    /// `llm.<suffix>`, from the LLM slots: the request's (`api`, `model`, `stream`), the
    /// charged usage once the exchange has one (`prompt_tokens` is the counted prompt
    /// before that), the cost once a budget step priced it.
    fn llm_var(&self, suffix: &str) -> Option<ValueRef<'_>> {
        let int = |n: u64| ValueRef::Int(i64::try_from(n).unwrap_or(i64::MAX));
        let usage = self.llm_usage.as_ref();
        Some(match suffix {
            "api" => ValueRef::Str(self.llm.as_ref()?.api.as_str()),
            "model" => ValueRef::Str(self.llm.as_ref()?.model.as_deref()?),
            "stream" => ValueRef::Bool(self.llm.as_ref()?.stream),
            "prompt_tokens" => match usage {
                Some(u) => int(u.input_tokens),
                None => int(self.llm_prompt_tokens?),
            },
            "completion_tokens" => int(usage?.output_tokens),
            "total_tokens" => int(usage?.total_tokens()),
            "cached_tokens" => int(usage?.cached_input_tokens),
            "reasoning_tokens" => int(usage?.reasoning_tokens),
            "cost" => ValueRef::Float(self.llm_cost?),
            _ => return None,
        })
    }

    /// The cached parse of body `i` (0 request, 1 response) when it was made from `body`.
    pub(super) fn cached_json(&self, i: usize, body: &[u8]) -> Option<&JsonBody> {
        self.json[i]
            .get()
            .filter(|j| j.source == (body.as_ptr() as usize, body.len()))
    }
}

/// A parsed body, borrowed from the cache or (rarely) parsed afresh.
pub type JsonRef<'a> = Cow<'a, JsonBody>;
