//! `Quota`: at most `allow` requests (or weight) per `interval` `timeUnit` per identifier,
//! counted in memory or in Redis (see `crate::ratelimit`).
//!
//! ```yaml
//! spec:
//!   type: Quota
//!   allow: 100                  # or a template: "{apiproduct.attributes.daily-limit}"
//!   interval: 1                 # or a template
//!   timeUnit: day               # second, minute, hour, day, week, month, or a template
//!   quotaType: default          # default | calendar | flexi | rollingwindow
//!   # startTime: "2026-01-01T00:00:00Z"   # calendar only
//!   identifier: "{client_id}"   # default: one counter for the policy
//!   messageWeight: 1            # or a template
//!   useProduct: false           # take allow/interval/timeUnit from the verified API product
//!   # verifyApiKey: verify-key  # whose variables useProduct reads (default: the last one)
//!   # sharedName: tokens        # a counter shared by an enforceOnly and a countOnly half
//!   # enforceOnly: true         # check on the request, count nothing
//!   # countOnly: true           # count on the response, never refuse
//!   failOpen: true              # Redis down: count locally (true) or answer 503 (false)
//!   rateLimitHeaders: none      # none | ietf | x-ratelimit | both
//! ```
//!
//! Sets `ratelimit.<policy>.{allowed,used,available,remaining,expiry}` (`remaining` is
//! `available` by the name the design uses) and Apigee's
//! `ratelimit.<policy>.{allowed.count,used.count,available.count,exceed.count,expiry.time,identifier}`,
//! generated from the decision kept in the exchange's typed state (nothing is copied unless
//! read); `identifier` is Apigee's `_default` for a policy without one (its one counter). `useProduct` reads the verified product's quota settings from that state too.
//! A refusal is 429 `policies.ratelimit.QuotaViolation` with `Retry-After`.
//!
//! A `messageWeight` of 0 is a valid no-op count in a `countOnly` half (a response that
//! used no tokens); enforcing quotas keep Apigee's rule that a weight is at least 1
//! (`InvalidMessageWeight`), since "check without counting" is what `enforceOnly` is for.

use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::consumer::index::Verified;
use crate::consumer::QuotaSettings;
use crate::expr::Template;
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::ratelimit::policy::{self as rl, NumberSpec, Setting};
use crate::ratelimit::window::{self, Unit};
use crate::ratelimit::{
    Ask, CounterError, Counters, Decision, Key, KeyPrefix, Mode, Pending, PolicyMetrics, Window,
};
use crate::vars::state::QuotaResult;
use crate::vars::Exchange;

pub const TYPE: &str = "Quota";

const MAX_ALLOW: u64 = i64::MAX as u64;
const MAX_INTERVAL: u64 = 100_000;
const UNITS: &str = "second, minute, hour, day, week, month";

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum QuotaType {
    #[default]
    Default,
    Calendar,
    Flexi,
    Rollingwindow,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum HeaderStyle {
    #[default]
    None,
    Ietf,
    XRatelimit,
    Both,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Spec {
    #[serde(default)]
    allow: Option<NumberSpec>,
    #[serde(default)]
    interval: Option<NumberSpec>,
    #[serde(default)]
    time_unit: Option<String>,
    #[serde(default)]
    quota_type: QuotaType,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    identifier: Option<String>,
    #[serde(default)]
    message_weight: Option<NumberSpec>,
    #[serde(default)]
    use_product: bool,
    #[serde(default)]
    verify_api_key: Option<String>,
    #[serde(default)]
    shared_name: Option<String>,
    #[serde(default)]
    enforce_only: bool,
    #[serde(default)]
    count_only: bool,
    #[serde(default = "yes")]
    fail_open: bool,
    #[serde(default)]
    rate_limit_headers: HeaderStyle,
}

fn yes() -> bool {
    true
}

#[derive(Debug)]
enum UnitSetting {
    Fixed(Unit),
    Template(Template),
}

/// The product's quota variables, most specific first, and the VerifyApiKey step whose
/// verified app they describe.
/// What differs between `Quota` and `LlmTokenQuota` (which counts tokens on the same
/// machinery): counter namespace, the product's settings, fault code, header names.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flavor {
    /// The counter key's first part, so a Quota and an LlmTokenQuota never share a counter.
    key_kind: &'static [u8],
    /// The product's settings: `quota` or `llmTokenQuota` (variables `…quota.*` or
    /// `…llmquota.*`).
    llm: bool,
    violation: &'static str,
    /// The refusal message before the identifier.
    message: &'static str,
}

pub(super) const QUOTA: Flavor = Flavor {
    key_kind: b"quota",
    llm: false,
    violation: "policies.ratelimit.QuotaViolation",
    message: "Rate limit quota violation. Quota limit  exceeded.",
};

pub(super) const LLM_TOKEN_QUOTA: Flavor = Flavor {
    key_kind: b"llmtokenquota",
    llm: true,
    violation: "policies.llmtokenquota.LLMTokenQuotaViolation",
    message: "LLM token quota violation. Token limit exceeded.",
};

#[derive(Debug)]
struct ProductVars {
    /// `verifyapikey.<p>.` of the `verifyApiKey` step named; `None`: the latest.
    app: Option<String>,
    llm: bool,
    limit: Vec<String>,
    interval: Vec<String>,
    unit: Vec<String>,
    name: Vec<String>,
}

impl ProductVars {
    fn new(vk: Option<&str>, llm: bool) -> Self {
        let p = vk.map(|v| format!("verifyapikey.{v}.")).unwrap_or_default();
        let app = vk.map(|_| p.clone());
        let q = if llm { "llmquota" } else { "quota" };
        let names = |what: &str| {
            vec![
                format!("{p}apiproduct.developer.{q}.{what}"),
                format!("{p}apiproduct.{q}.{what}"),
            ]
        };
        Self {
            app,
            llm,
            limit: names("limit"),
            interval: names("interval"),
            unit: names("timeunit"),
            name: vec![format!("{p}apiproduct.name")],
        }
    }
}

fn first<'e>(ex: &'e Exchange, names: &[String]) -> Option<std::borrow::Cow<'e, str>> {
    names
        .iter()
        .find_map(|n| ex.lookup(n).filter(|v| !v.is_empty()))
}

impl ProductVars {
    /// The verified app to read, unless a variable of one of `names` was set explicitly (by
    /// a script or AssignMessage): that wins, as explicit variables always do, and is read
    /// as text.
    fn typed_app<'e>(&self, ex: &'e Exchange, names: &[&[String]]) -> Option<&'e Verified> {
        let overridden = !ex.vars.is_empty()
            && names
                .iter()
                .flat_map(|n| n.iter())
                .any(|n| ex.vars.contains_key(n));
        if overridden {
            return None;
        }
        ex.state.app(self.app.as_deref())
    }

    /// allow, interval, unit from the product's quota, when it sets one.
    fn quota(&self, ex: &Exchange) -> Option<(u64, u32, Unit)> {
        if let Some(v) = self.typed_app(ex, &[&self.limit, &self.interval, &self.unit]) {
            let q = match self.operation_limits(v) {
                Some(q) => q,
                None if self.llm => v.product.spec.llm_token_quota.as_ref()?,
                None => v.product.spec.quota.as_ref()?,
            };
            let limit = q.limit.min(MAX_ALLOW);
            let unit = Unit::parse(q.time_unit.as_str())?;
            return Some((limit, q.interval.max(1), unit));
        }
        let limit = first(ex, &self.limit).and_then(|v| v.trim().parse::<u64>().ok());
        let unit = first(ex, &self.unit).and_then(|v| Unit::parse(&v));
        let interval = first(ex, &self.interval)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|i| *i >= 1);
        Some((limit?, interval.unwrap_or(1), unit?))
    }

    /// The limits of the operation the request matched, when it sets its own.
    fn operation_limits<'v>(&self, v: &'v Verified) -> Option<&'v QuotaSettings> {
        let op = v.operation()?;
        if self.llm {
            op.llm_token_quota.as_ref()
        } else {
            op.quota.as_ref()
        }
    }

    /// The product's name (part of the counter key), with the operation's when the
    /// operation sets its own limits (each such operation counts apart).
    fn product_name<'e>(&self, ex: &'e Exchange) -> Option<std::borrow::Cow<'e, str>> {
        if let Some(v) = self.typed_app(ex, &[&self.name]) {
            let n = v.product.spec.name.as_str();
            if n.is_empty() {
                return None;
            }
            if self.operation_limits(v).is_some() {
                let op = v.operation()?.counter_name();
                return Some(std::borrow::Cow::Owned(format!("{n} {op}")));
            }
            return Some(std::borrow::Cow::Borrowed(n));
        }
        first(ex, &self.name)
    }
}

/// Variable names, built once.
#[derive(Debug)]
struct VarNames {
    /// `ratelimit.<policy>.`
    prefix: Arc<str>,
    /// The full names a decision defines.
    names: Vec<String>,
    failed_store: String,
}

impl VarNames {
    fn new(policy: &str) -> Self {
        let prefix = format!("ratelimit.{policy}.");
        Self {
            names: QuotaResult::names(&prefix).collect(),
            failed_store: format!("{prefix}failed.store"),
            prefix: prefix.into(),
        }
    }
}

#[derive(Debug)]
pub(super) struct Quota {
    flavor: Flavor,
    pub(super) name: String,
    /// The counter key's constant parts (`quota`, the policy or `sharedName`), hashed once.
    key_prefix: KeyPrefix,
    /// Overflow namespace of this quota's counters (shared by `sharedName` halves).
    pub(super) overflow: Key,
    allow: Option<Setting>,
    interval: Setting,
    unit: Option<UnitSetting>,
    quota_type: QuotaType,
    start_time: i64,
    identifier: Option<Template>,
    weight: Option<Setting>,
    product: Option<ProductVars>,
    pub(super) mode: Mode,
    fail_open: bool,
    headers: HeaderStyle,
    pub(super) counters: Counters,
    pub(super) metrics: PolicyMetrics,
    vars: VarNames,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    Ok(Arc::new(build_core(ctx, parse_spec(spec)?, QUOTA)?))
}

/// The quota `spec` describes, of `flavor`.
pub(super) fn build_core(
    ctx: &BuildContext,
    spec: Spec,
    flavor: Flavor,
) -> Result<Quota, SpecError> {
    if spec.enforce_only && spec.count_only {
        return Err(SpecError::new(
            "countOnly",
            "a Quota is enforceOnly or countOnly, not both",
        ));
    }
    if (spec.enforce_only || spec.count_only) && spec.shared_name.is_none() {
        return Err(SpecError::new(
            "sharedName",
            "enforceOnly and countOnly halves share a counter: give both the same sharedName",
        ));
    }
    let allow = spec
        .allow
        .as_ref()
        .map(|a| Setting::compile("allow", a, 0, MAX_ALLOW))
        .transpose()?;
    if allow.is_none() && !spec.use_product {
        return Err(SpecError::new(
            "allow",
            "required (or set useProduct: true to take it from the API product)",
        ));
    }
    let interval = match &spec.interval {
        Some(i) => Setting::compile("interval", i, 1, MAX_INTERVAL)?,
        None => Setting::Fixed(1),
    };
    let unit = match spec.time_unit.as_deref() {
        None if spec.use_product => None,
        None => {
            return Err(SpecError::new(
                "timeUnit",
                format!("required: one of {UNITS}"),
            ))
        }
        Some(u) => {
            let tpl =
                Template::compile(u).map_err(|e| SpecError::new("timeUnit", e.to_string()))?;
            if tpl.is_static() {
                Some(UnitSetting::Fixed(Unit::parse(u).ok_or_else(|| {
                    SpecError::new(
                        "timeUnit",
                        format!("`{u}` is not a time unit: one of {UNITS}"),
                    )
                })?))
            } else {
                Some(UnitSetting::Template(tpl))
            }
        }
    };
    let start_time = match (spec.quota_type, spec.start_time.as_deref()) {
        (QuotaType::Calendar, Some(s)) => window::parse_start(s).ok_or_else(|| {
            SpecError::new(
                "startTime",
                format!("`{s}` is not a time like 2026-01-01T00:00:00Z or 2026-01-01 00:00:00"),
            )
        })?,
        (QuotaType::Calendar, None) => {
            return Err(SpecError::new(
                "startTime",
                "required with quotaType: calendar",
            ))
        }
        (_, Some(_)) => {
            return Err(SpecError::new(
                "startTime",
                "only meaningful with quotaType: calendar",
            ))
        }
        (_, None) => 0,
    };
    let weight = spec
        .message_weight
        .as_ref()
        .map(|w| {
            Setting::compile(
                "messageWeight",
                w,
                min_weight(spec.count_only),
                rl::MAX_WEIGHT,
            )
        })
        .transpose()?;
    let identifier = match (spec.identifier.as_deref(), spec.use_product) {
        (None, true) => rl::identifier("identifier", Some("{client_id}"))?,
        (id, _) => rl::identifier("identifier", id)?,
    };
    let mode = if spec.enforce_only {
        Mode::EnforceOnly
    } else if spec.count_only {
        Mode::CountOnly
    } else {
        Mode::EnforceAndCount
    };
    let namespace = spec.shared_name.unwrap_or_else(|| ctx.name.clone());
    Ok(Quota {
        flavor,
        name: ctx.name.clone(),
        key_prefix: KeyPrefix::new(&[flavor.key_kind, namespace.as_bytes()]),
        overflow: Key::new(&[flavor.key_kind, namespace.as_bytes()]),
        allow,
        interval,
        unit,
        quota_type: spec.quota_type,
        start_time,
        identifier,
        weight,
        product: spec
            .use_product
            .then(|| ProductVars::new(spec.verify_api_key.as_deref(), flavor.llm)),
        mode,
        fail_open: spec.fail_open,
        headers: spec.rate_limit_headers,
        counters: ctx.services.counters.clone(),
        metrics: PolicyMetrics::new(&ctx.name),
        vars: VarNames::new(&ctx.name),
    })
}

/// A count-only half may count 0 (nothing used); an enforcing quota needs at least 1.
fn min_weight(count_only: bool) -> u64 {
    if count_only {
        0
    } else {
        1
    }
}

/// A decision about to be made.
pub(super) struct Prepared {
    pub(super) ask: Ask,
    /// As shown (bounded).
    identifier: String,
    /// Window length in ms, for the `RateLimit-Policy` header.
    window_ms: i64,
}

fn config_fault(code: &str, message: String) -> Fault {
    Fault::new(500, code, message)
}

impl Quota {
    /// allow, interval, unit for this exchange: the product's when asked and present,
    /// otherwise the spec's (literal or template).
    fn settings(&self, ex: &Exchange) -> Result<(u64, u32, Unit), Fault> {
        if let Some(q) = self.product.as_ref().and_then(|p| p.quota(ex)) {
            return Ok(q);
        }
        let Some(allow) = &self.allow else {
            return Err(config_fault(
                "policies.ratelimit.FailedToResolveQuotaIntervalReference",
                "the API product sets no quota and the policy no allow count".into(),
            ));
        };
        let allow = allow.resolve(ex, 0, MAX_ALLOW).map_err(|t| {
            config_fault(
                "policies.ratelimit.InvalidAllowCount",
                format!(
                    "allow count `{}` is not a non-negative integer",
                    rl::shown(&t)
                ),
            )
        })?;
        let interval = self.interval.resolve(ex, 1, MAX_INTERVAL).map_err(|t| {
            config_fault(
                "policies.ratelimit.InvalidQuotaInterval",
                format!("interval `{}` is not an integer ≥ 1", rl::shown(&t)),
            )
        })?;
        let unit = match &self.unit {
            Some(UnitSetting::Fixed(u)) => *u,
            Some(UnitSetting::Template(t)) => {
                let text = t.render(ex);
                Unit::parse(&text).ok_or_else(|| {
                    config_fault(
                        "policies.ratelimit.InvalidQuotaTimeUnit",
                        format!("`{}` is not a time unit: one of {UNITS}", rl::shown(&text)),
                    )
                })?
            }
            None => {
                return Err(config_fault(
                    "policies.ratelimit.InvalidQuotaTimeUnit",
                    "the API product sets no quota and the policy no timeUnit".into(),
                ))
            }
        };
        Ok((allow, u32::try_from(interval).unwrap_or(1), unit))
    }

    fn prepare(&self, ex: &Exchange) -> Result<Prepared, Fault> {
        let weight = rl::weight(
            self.weight.as_ref(),
            ex,
            min_weight(self.mode == Mode::CountOnly),
        )?;
        self.prepare_with(ex, weight, &[])
    }

    /// The ask of `weight` for this exchange; `extra` parts join the counter key (an
    /// LlmTokenQuota's model).
    pub(super) fn prepare_with(
        &self,
        ex: &Exchange,
        weight: u64,
        extra: &[&[u8]],
    ) -> Result<Prepared, Fault> {
        let (allow, interval, unit) = self.settings(ex)?;
        let identifier = self
            .identifier
            .as_ref()
            .map(|t| t.render_cow(ex))
            .unwrap_or_default();
        let product = self
            .product
            .as_ref()
            .and_then(|p| p.product_name(ex))
            .unwrap_or_default();
        let now = self.counters.now();
        let (window, window_ms) = match self.quota_type {
            QuotaType::Default => {
                let (start, end) = window::aligned(now, interval, unit);
                (Window::Fixed { start, end }, end - start)
            }
            QuotaType::Calendar => {
                let (start, end) = window::calendar(now, self.start_time, interval, unit);
                (Window::Fixed { start, end }, end - start)
            }
            QuotaType::Flexi => {
                let len = window::span_from(now, interval, unit);
                (Window::Flexi { len }, len)
            }
            QuotaType::Rollingwindow => {
                let len = window::rolling_len(interval, unit);
                (Window::Rolling { len }, len)
            }
        };
        let interval_bytes = interval.to_le_bytes();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(5 + extra.len());
        parts.extend_from_slice(&[
            product.as_bytes(),
            identifier.as_bytes(),
            &interval_bytes,
            unit.as_str().as_bytes(),
            match self.quota_type {
                QuotaType::Default => b"d",
                QuotaType::Calendar => b"c",
                QuotaType::Flexi => b"f",
                QuotaType::Rollingwindow => b"r",
            },
        ]);
        parts.extend_from_slice(extra);
        let key = self.key_prefix.finish(&parts);
        // Apigee's name for the one counter of a policy without an identifier.
        let identifier = if identifier.is_empty() {
            "_default".to_owned()
        } else {
            rl::shown(&identifier).into_owned()
        };
        Ok(Prepared {
            ask: Ask {
                key,
                overflow: self.overflow,
                window,
                allow,
                weight,
                mode: self.mode,
                now,
                fail_open: self.fail_open,
            },
            identifier,
            window_ms,
        })
    }

    pub(super) fn finish(
        &self,
        ex: &mut Exchange,
        p: Prepared,
        result: Result<Decision, CounterError>,
    ) -> Result<(), Fault> {
        let d = match result {
            Ok(d) => d,
            Err(e) => {
                self.metrics.fail_closed.inc();
                self.metrics.error.inc();
                ex.set_var(self.vars.failed_store.clone(), true);
                return Err(Fault::new(
                    503,
                    "policies.ratelimit.StoreUnavailable",
                    format!("Quota counters are unavailable: {e}"),
                )
                .with_header("retry-after", "1"));
            }
        };
        if d.degraded {
            self.metrics.fail_open.inc();
            ex.set_var(self.vars.failed_store.clone(), true);
        }
        let ask = &p.ask;
        let now = ask.now;
        let available = ask.allow.saturating_sub(d.used);
        let exceed = if d.allowed {
            0
        } else {
            d.used.saturating_add(ask.weight).saturating_sub(ask.allow)
        };
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let reset = rl::seconds_until(d.expiry, now);
        let allow = ask.allow;
        let window_ms = p.window_ms;
        let refusal =
            (!d.allowed).then(|| format!("{} Identifier : {}", self.flavor.message, p.identifier));
        // A variable of the same name set earlier would shadow the source: drop it, as
        // setting each variable did.
        if !ex.vars.is_empty() {
            for n in &self.vars.names {
                ex.vars.remove(n);
            }
        }
        ex.state.add_quota(QuotaResult {
            prefix: Arc::clone(&self.vars.prefix),
            allowed: int(allow),
            used: int(d.used),
            available: int(available),
            exceed: int(exceed),
            expiry: d.expiry,
            identifier: p.identifier,
        });
        let Some(message) = refusal else {
            self.metrics.allowed.inc();
            if self.mode != Mode::CountOnly {
                self.limit_headers(allow, available, reset, window_ms, |h, v| {
                    ex.set_header(Direction::Response, h, v);
                });
            }
            return Ok(());
        };
        self.metrics.rejected.inc();
        let mut fault = Fault::new(429, self.flavor.violation, message)
            .with_header("retry-after", reset.to_string());
        self.limit_headers(allow, available, reset, window_ms, |h, v| {
            fault.headers.push((h.to_owned(), v));
        });
        if self.flavor.llm && !matches!(self.headers, HeaderStyle::XRatelimit | HeaderStyle::Both) {
            // OpenAI's token headers on every refusal: the SDKs read them to back off.
            self.token_headers(allow, available, d.expiry - now, |h, v| {
                fault.headers.push((h.to_owned(), v));
            });
        }
        Err(fault)
    }

    /// Emits the configured rate-limit headers through `out` (no list is built).
    fn limit_headers(
        &self,
        allow: u64,
        available: u64,
        reset: i64,
        window_ms: i64,
        mut out: impl FnMut(&'static str, String),
    ) {
        if matches!(self.headers, HeaderStyle::Ietf | HeaderStyle::Both) {
            // draft-ietf-httpapi-ratelimit-headers: structured-field lists keyed by policy.
            let w = (window_ms / 1000).max(1);
            out(
                "ratelimit-policy",
                format!("\"{}\";q={allow};w={w}", self.name),
            );
            out(
                "ratelimit",
                format!("\"{}\";r={available};t={reset}", self.name),
            );
        }
        if matches!(self.headers, HeaderStyle::XRatelimit | HeaderStyle::Both) {
            if self.flavor.llm {
                self.token_headers(allow, available, reset.saturating_mul(1000), out);
            } else {
                out("x-ratelimit-limit", allow.to_string());
                out("x-ratelimit-remaining", available.to_string());
                out("x-ratelimit-reset", reset.to_string());
            }
        }
    }

    /// OpenAI's `x-ratelimit-*-tokens` headers; the reset in OpenAI's duration format.
    fn token_headers(
        &self,
        allow: u64,
        available: u64,
        reset_ms: i64,
        mut out: impl FnMut(&'static str, String),
    ) {
        out("x-ratelimit-limit-tokens", allow.to_string());
        out("x-ratelimit-remaining-tokens", available.to_string());
        out("x-ratelimit-reset-tokens", openai_duration(reset_ms));
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `17ms`, `1s`, `6m0s`, `1h2m3s`
/// (whole seconds, rounded up, from a second on).
pub(super) fn openai_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = (ms + 999) / 1000;
    let (h, m, s) = (s / 3600, s % 3600 / 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

impl Policy for Quota {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        let p = match self.prepare(ex) {
            Ok(p) => p,
            Err(f) => {
                self.metrics.error.inc();
                return Hook::Ready(Outcome::Reject(f));
            }
        };
        match self.counters.decide(p.ask.clone()) {
            Pending::Ready(r) => Hook::from(self.finish(ex, p, r)),
            Pending::Wait(fut) => Hook::wait(async move {
                let r = fut.await;
                self.finish(ex, p, r)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::FakeClock;
    use crate::services::Services;

    fn ms(s: &str) -> i64 {
        window::parse_start(s).unwrap()
    }

    struct Bed {
        services: Services,
        clock: Arc<FakeClock>,
    }

    impl Bed {
        fn new(at: &str) -> Self {
            let clock = FakeClock::new(ms(at));
            Self {
                services: Services {
                    counters: Counters::memory(clock.clone(), 10_000),
                    ..Default::default()
                },
                clock,
            }
        }

        fn policy(&self, name: &str, yaml: &str) -> Arc<dyn Policy> {
            let ctx = BuildContext {
                name: name.into(),
                config_dir: None,
                services: self.services.clone(),
            };
            build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap()
        }
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
        match p.run(ex, Direction::Request) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(_) => panic!("memory counters decide at once"),
        }
    }

    fn admitted(p: &Arc<dyn Policy>, n: usize) -> usize {
        (0..n)
            .filter(|_| run(p, &mut Exchange::default()).is_ok())
            .count()
    }

    #[test]
    fn default_type_resets_at_the_top_of_each_unit() {
        for (unit, last_ms, next) in [
            ("second", "2024-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z"),
            ("minute", "2024-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z"),
            ("hour", "2024-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z"),
            ("day", "2024-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z"),
            // 2024-03-09 is a Saturday: weeks turn on Sunday 00:00 UTC.
            ("week", "2024-03-09T23:59:59.999Z", "2024-03-10T00:00:00Z"),
            // Leap February ends on the 29th; 2023's on the 28th.
            ("month", "2024-02-29T23:59:59.999Z", "2024-03-01T00:00:00Z"),
            ("month", "2023-02-28T23:59:59.999Z", "2023-03-01T00:00:00Z"),
        ] {
            let bed = Bed::new(last_ms);
            let p = bed.policy("q", &format!("{{allow: 2, timeUnit: {unit}}}"));
            assert_eq!(admitted(&p, 3), 2, "{unit} at {last_ms}");
            bed.clock.set(ms(next));
            assert_eq!(admitted(&p, 3), 2, "{unit} at {next}");
        }
    }

    /// Window edges for every quota type × time unit, months of every length (leap and
    /// common February, 30 and 31 days), in UTC: the last instant of a window still counts
    /// in it (a spent identifier is refused, a fresh one admitted), the first instant of the
    /// next counts afresh; a rolling window drops each count exactly one length after it.
    #[test]
    fn window_edges_for_every_type_and_unit() {
        // unit, default window, calendar (start time, a later window), flexi (first
        // request, end of its window).
        type Case = (
            &'static str,
            [&'static str; 2],
            [&'static str; 3],
            [&'static str; 2],
        );
        let cases: [Case; 9] = [
            (
                "second",
                ["2024-02-29T23:59:59Z", "2024-03-01T00:00:00Z"],
                [
                    "2024-03-10T10:00:00.250Z",
                    "2024-03-10T10:00:05.250Z",
                    "2024-03-10T10:00:06.250Z",
                ],
                ["2024-03-10T10:00:00.700Z", "2024-03-10T10:00:01.700Z"],
            ),
            (
                "minute",
                ["2024-12-31T23:59:00Z", "2025-01-01T00:00:00Z"],
                [
                    "2024-03-10T10:00:30Z",
                    "2024-03-10T10:05:30Z",
                    "2024-03-10T10:06:30Z",
                ],
                ["2024-03-10T10:00:42Z", "2024-03-10T10:01:42Z"],
            ),
            (
                "hour",
                ["2024-03-10T23:00:00Z", "2024-03-11T00:00:00Z"],
                [
                    "2024-03-10T10:30:00Z",
                    "2024-03-11T01:30:00Z",
                    "2024-03-11T02:30:00Z",
                ],
                ["2024-03-10T10:17:00Z", "2024-03-10T11:17:00Z"],
            ),
            (
                "day",
                ["2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z"],
                [
                    "2024-02-28T12:00:00Z",
                    "2024-02-29T12:00:00Z",
                    "2024-03-01T12:00:00Z",
                ],
                ["2023-02-28T06:00:00Z", "2023-03-01T06:00:00Z"],
            ),
            (
                // Weeks turn on Sunday 00:00 UTC; calendar weeks from a Wednesday noon.
                "week",
                ["2024-03-10T00:00:00Z", "2024-03-17T00:00:00Z"],
                [
                    "2024-03-13T12:00:00Z",
                    "2024-03-20T12:00:00Z",
                    "2024-03-27T12:00:00Z",
                ],
                ["2024-02-26T09:00:00Z", "2024-03-04T09:00:00Z"],
            ),
            (
                // February in a leap year; a calendar month from the 31st is clamped.
                "month",
                ["2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"],
                [
                    "2024-01-31T08:30:00Z",
                    "2024-02-29T08:30:00Z",
                    "2024-03-31T08:30:00Z",
                ],
                ["2024-02-10T00:00:00Z", "2024-03-10T00:00:00Z"],
            ),
            (
                // February in a common year.
                "month",
                ["2023-02-01T00:00:00Z", "2023-03-01T00:00:00Z"],
                [
                    "2023-01-31T08:30:00Z",
                    "2023-02-28T08:30:00Z",
                    "2023-03-31T08:30:00Z",
                ],
                ["2023-01-31T00:00:00Z", "2023-02-28T00:00:00Z"],
            ),
            (
                // 30 days.
                "month",
                ["2024-04-01T00:00:00Z", "2024-05-01T00:00:00Z"],
                [
                    "2024-03-15T00:00:00Z",
                    "2024-04-15T00:00:00Z",
                    "2024-05-15T00:00:00Z",
                ],
                ["2024-04-10T00:00:00Z", "2024-05-10T00:00:00Z"],
            ),
            (
                // 31 days, across the year end.
                "month",
                ["2024-12-01T00:00:00Z", "2025-01-01T00:00:00Z"],
                [
                    "2024-11-15T00:00:00Z",
                    "2024-12-15T00:00:00Z",
                    "2025-01-15T00:00:00Z",
                ],
                ["2024-12-20T00:00:00Z", "2025-01-20T00:00:00Z"],
            ),
        ];
        let id = |n: u32| {
            let mut ex = Exchange::default();
            ex.request.headers.push("x-id".into(), format!("id{n}"));
            ex
        };
        // Two of three admitted for a spent-free identifier; then the edge checks.
        let edges = |what: &str, yaml: String, start: i64, end: i64| {
            let bed = Bed::new("2000-01-01T00:00:00Z");
            let p = bed.policy("q", &yaml);
            bed.clock.set(start);
            let n = (0..3).filter(|_| run(&p, &mut id(1)).is_ok()).count();
            assert_eq!(n, 2, "{what}: first instant");
            bed.clock.set(end - 1);
            let mut spent = id(1);
            assert!(
                run(&p, &mut spent).is_err(),
                "{what}: last instant, still spent"
            );
            assert_eq!(
                spent.lookup("ratelimit.q.expiry").as_deref(),
                Some(end.to_string().as_str()),
                "{what}: window end"
            );
            run(&p, &mut id(2)).unwrap();
            bed.clock.set(end);
            let n = (0..3).filter(|_| run(&p, &mut id(1)).is_ok()).count();
            assert_eq!(n, 2, "{what}: next window counts afresh");
        };
        let base = "allow: 2, identifier: '{request.header.x-id}'";
        for (unit, [ds, de], [cal, cs, ce], [fs, fe]) in cases {
            edges(
                &format!("default {unit} {ds}"),
                format!("{{{base}, timeUnit: {unit}}}"),
                ms(ds),
                ms(de),
            );
            edges(
                &format!("calendar {unit} from {cal}"),
                format!("{{{base}, timeUnit: {unit}, quotaType: calendar, startTime: '{cal}'}}"),
                ms(cs),
                ms(ce),
            );
            edges(
                &format!("flexi {unit} from {fs}"),
                format!("{{{base}, timeUnit: {unit}, quotaType: flexi}}"),
                ms(fs),
                ms(fe),
            );
            // Rolling: one count at a slot boundary, one half a window later; the first
            // leaves exactly one length after it was made, the second stays.
            let len = window::rolling_len(1, Unit::parse(unit).unwrap());
            let slot = Window::slot_len(len);
            let t = ms(ds) - ms(ds).rem_euclid(slot);
            let what = format!("rollingwindow {unit} at {ds}");
            let bed = Bed::new("2000-01-01T00:00:00Z");
            let p = bed.policy(
                "q",
                &format!("{{{base}, timeUnit: {unit}, quotaType: rollingwindow}}"),
            );
            bed.clock.set(t);
            run(&p, &mut id(1)).unwrap();
            bed.clock.set(t + len / 2);
            run(&p, &mut id(1)).unwrap();
            assert!(run(&p, &mut id(1)).is_err(), "{what}: spent");
            bed.clock.set(t + len - 1);
            assert!(
                run(&p, &mut id(1)).is_err(),
                "{what}: the first count is still in"
            );
            run(&p, &mut id(2)).unwrap();
            bed.clock.set(t + len);
            run(&p, &mut id(1)).unwrap();
            assert!(
                run(&p, &mut id(1)).is_err(),
                "{what}: the second count is still in"
            );
        }
        // A rolling month is 30 days whatever the month, so its count is never reset by
        // the calendar (a length measured from now would change on the 1st of March).
        let bed = Bed::new("2024-02-20T00:00:00Z");
        let p = bed.policy(
            "q",
            &format!("{{{base}, timeUnit: month, quotaType: rollingwindow}}"),
        );
        run(&p, &mut id(1)).unwrap();
        run(&p, &mut id(1)).unwrap();
        bed.clock.set(ms("2024-03-01T00:00:00Z"));
        assert!(run(&p, &mut id(1)).is_err());
    }

    #[test]
    fn week_window_does_not_turn_on_monday() {
        let bed = Bed::new("2024-03-10T00:00:00Z"); // Sunday
        let p = bed.policy("q", "{allow: 1, timeUnit: week}");
        assert_eq!(admitted(&p, 2), 1);
        bed.clock.set(ms("2024-03-11T00:00:00Z")); // Monday: same week
        assert_eq!(admitted(&p, 1), 0);
        bed.clock.set(ms("2024-03-16T23:59:59.999Z"));
        assert_eq!(admitted(&p, 1), 0);
        bed.clock.set(ms("2024-03-17T00:00:00Z"));
        assert_eq!(admitted(&p, 1), 1);
    }

    #[test]
    fn calendar_type_from_its_start_time() {
        let bed = Bed::new("2024-01-31T10:00:00Z");
        let p = bed.policy(
            "q",
            "{allow: 1, timeUnit: month, quotaType: calendar, startTime: '2024-01-31T08:30:00Z'}",
        );
        assert_eq!(admitted(&p, 2), 1);
        // Next window: Feb 29 08:30 (clamped; leap year).
        bed.clock.set(ms("2024-02-29T08:29:59.999Z"));
        assert_eq!(admitted(&p, 1), 0);
        bed.clock.set(ms("2024-02-29T08:30:00Z"));
        assert_eq!(admitted(&p, 2), 1);
        bed.clock.set(ms("2024-03-31T08:30:00Z"));
        assert_eq!(admitted(&p, 1), 1);
    }

    #[test]
    fn flexi_type_starts_at_each_identifiers_first_request() {
        let bed = Bed::new("2024-01-01T00:00:30Z");
        let p = bed.policy(
            "q",
            "{allow: 1, timeUnit: minute, quotaType: flexi, identifier: '{request.header.x-id}'}",
        );
        let mut a = Exchange::default();
        a.request.headers.push("x-id".into(), "a".into());
        let mut b = Exchange::default();
        b.request.headers.push("x-id".into(), "b".into());
        run(&p, &mut a).unwrap();
        assert_eq!(
            a.lookup("ratelimit.q.expiry.time").as_deref(),
            Some(ms("2024-01-01T00:01:30Z").to_string().as_str())
        );
        bed.clock.set(ms("2024-01-01T00:01:00Z"));
        run(&p, &mut b).unwrap();
        assert!(run(&p, &mut a).is_err(), "a's minute runs to 00:01:30");
        bed.clock.set(ms("2024-01-01T00:01:30Z"));
        run(&p, &mut a).unwrap();
        assert!(run(&p, &mut b).is_err(), "b's minute runs to 00:02:00");
        bed.clock.set(ms("2024-01-01T00:02:00Z"));
        run(&p, &mut b).unwrap();
    }

    #[test]
    fn rolling_window_looks_back() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let p = bed.policy("q", "{allow: 2, timeUnit: hour, quotaType: rollingwindow}");
        assert_eq!(admitted(&p, 1), 1);
        bed.clock.advance(30 * 60_000);
        assert_eq!(admitted(&p, 2), 1);
        // At the top of the hour the first request has not left yet (no fixed reset).
        bed.clock.set(ms("2024-01-01T00:59:59Z"));
        assert_eq!(admitted(&p, 1), 0);
        bed.clock.set(ms("2024-01-01T01:00:00Z"));
        assert_eq!(admitted(&p, 2), 1);
    }

    #[test]
    fn variables_headers_and_the_violation() {
        let bed = Bed::new("2024-01-01T00:00:10Z");
        let p = bed.policy(
            "q",
            "{allow: 2, timeUnit: minute, identifier: '{request.header.x-id}', rateLimitHeaders: both}",
        );
        let mut ex = Exchange::default();
        ex.request.headers.push("x-id".into(), "alice".into());
        run(&p, &mut ex).unwrap();
        let v = |ex: &Exchange, n: &str| ex.lookup(n).map(|c| c.into_owned());
        assert_eq!(v(&ex, "ratelimit.q.allowed.count").as_deref(), Some("2"));
        assert_eq!(v(&ex, "ratelimit.q.used.count").as_deref(), Some("1"));
        assert_eq!(v(&ex, "ratelimit.q.available").as_deref(), Some("1"));
        assert_eq!(v(&ex, "ratelimit.q.remaining").as_deref(), Some("1"));
        assert_eq!(v(&ex, "ratelimit.q.available.count").as_deref(), Some("1"));
        assert_eq!(
            v(&ex, "ratelimit.q.expiry").as_deref(),
            Some(ms("2024-01-01T00:01:00Z").to_string().as_str())
        );
        assert_eq!(v(&ex, "ratelimit.q.identifier").as_deref(), Some("alice"));
        assert_eq!(v(&ex, "ratelimit.q.exceed.count").as_deref(), Some("0"));
        let m = ex.take_mutations(Direction::Response);
        let h = |n: &str| {
            m.set
                .iter()
                .find(|(k, _, _)| k == n)
                .map(|(_, v, _)| v.clone())
        };
        assert_eq!(h("x-ratelimit-limit").as_deref(), Some("2"));
        assert_eq!(h("x-ratelimit-remaining").as_deref(), Some("1"));
        assert_eq!(h("x-ratelimit-reset").as_deref(), Some("50"));
        assert_eq!(h("ratelimit-policy").as_deref(), Some("\"q\";q=2;w=60"));
        assert_eq!(h("ratelimit").as_deref(), Some("\"q\";r=1;t=50"));
        run(&p, &mut ex).unwrap();
        let f = run(&p, &mut ex).unwrap_err();
        assert_eq!(f.status, 429);
        assert_eq!(f.code, "policies.ratelimit.QuotaViolation");
        assert!(f.message.ends_with("Identifier : alice"), "{}", f.message);
        assert!(f.headers.contains(&("retry-after".into(), "50".into())));
        // Without an identifier: Apigee's `_default`, in the variable and the message.
        let d = bed.policy("d", "{allow: 0, timeUnit: minute}");
        let mut dx = Exchange::default();
        let f = run(&d, &mut dx).unwrap_err();
        assert!(
            f.message.ends_with("Identifier : _default"),
            "{}",
            f.message
        );
        assert_eq!(
            v(&dx, "ratelimit.d.identifier").as_deref(),
            Some("_default")
        );
        assert_eq!(v(&ex, "ratelimit.q.exceed.count").as_deref(), Some("1"));
        assert_eq!(v(&ex, "ratelimit.q.remaining").as_deref(), Some("0"));
        // Listed (CEL maps, debugging) under every name, `remaining` included.
        let mut listed = Vec::new();
        ex.for_each_var(&mut |k, v| listed.push((k.to_owned(), v.as_text().into_owned())));
        assert!(
            listed.contains(&("ratelimit.q.remaining".into(), "0".into())),
            "{listed:?}"
        );
        assert!(listed.contains(&("ratelimit.q.used.count".into(), "2".into())));
        // A variable set earlier under the same name does not hide the decision's.
        let mut ex = Exchange::default();
        ex.set_var("ratelimit.q.used", "stale");
        ex.request.headers.push("x-id".into(), "bob".into());
        run(&p, &mut ex).unwrap();
        assert_eq!(v(&ex, "ratelimit.q.used").as_deref(), Some("1"));
    }

    #[test]
    fn remaining_is_usable_in_conditions() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let p = bed.policy("q", "{allow: 3, timeUnit: minute}");
        let mut ex = Exchange::default();
        run(&p, &mut ex).unwrap();
        let low = crate::expr::Condition::compile("ratelimit.q.remaining < 3").unwrap();
        assert!(low.eval(&ex));
        let none = crate::expr::Condition::compile("ratelimit.q.remaining == 0").unwrap();
        assert!(!none.eval(&ex));
    }

    #[test]
    fn count_only_accepts_a_zero_weight_as_a_no_op() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let enforce = bed.policy(
            "enforce",
            "{allow: 10, timeUnit: hour, sharedName: tokens, enforceOnly: true, messageWeight: '{w}'}",
        );
        let count = bed.policy(
            "count",
            "{allow: 10, timeUnit: hour, sharedName: tokens, countOnly: true, messageWeight: '{tokens}'}",
        );
        let mut ex = Exchange::default();
        ex.set_var("tokens", "0");
        run(&count, &mut ex).unwrap();
        assert_eq!(ex.lookup("ratelimit.count.used").as_deref(), Some("0"));
        ex.set_var("tokens", "4");
        run(&count, &mut ex).unwrap();
        ex.set_var("tokens", "0");
        run(&count, &mut ex).unwrap();
        assert_eq!(ex.lookup("ratelimit.count.used").as_deref(), Some("4"));
        // A literal 0 is accepted for a count-only half too.
        bed.policy(
            "zero",
            "{allow: 10, timeUnit: hour, sharedName: tokens, countOnly: true, messageWeight: 0}",
        );
        // Enforcing halves still require a weight of at least 1.
        ex.set_var("w", "0");
        assert_eq!(
            run(&enforce, &mut ex).unwrap_err().code,
            "policies.ratelimit.InvalidMessageWeight"
        );
        ex.set_var("tokens", "-1");
        assert_eq!(
            run(&count, &mut ex).unwrap_err().code,
            "policies.ratelimit.InvalidMessageWeight"
        );
    }

    #[test]
    fn enforce_only_and_count_only_share_one_counter() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let enforce = bed.policy(
            "enforce",
            "{allow: 100, timeUnit: hour, sharedName: tokens, enforceOnly: true}",
        );
        let count = bed.policy(
            "count",
            "{allow: 100, timeUnit: hour, sharedName: tokens, countOnly: true, messageWeight: '{tokens}'}",
        );
        let mut ex = Exchange::default();
        run(&enforce, &mut ex).unwrap();
        ex.set_var("tokens", "60");
        run(&count, &mut ex).unwrap();
        run(&enforce, &mut ex).unwrap();
        run(&count, &mut ex).unwrap(); // 120: counted although over the limit
        let f = run(&enforce, &mut ex).unwrap_err();
        assert_eq!(f.code, "policies.ratelimit.QuotaViolation");
        assert_eq!(ex.lookup("ratelimit.enforce.used").as_deref(), Some("120"));
    }

    #[test]
    fn product_quota_and_templates() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let p = bed.policy("q", "{useProduct: true, verifyApiKey: vk}");
        let mut ex = Exchange::default();
        ex.set_var("client_id", "k1");
        // The product's settings, under either name.
        ex.set_var("verifyapikey.vk.apiproduct.quota.limit", 2i64);
        ex.set_var("verifyapikey.vk.apiproduct.quota.interval", 1i64);
        ex.set_var("verifyapikey.vk.apiproduct.quota.timeunit", "minute");
        ex.set_var("verifyapikey.vk.apiproduct.name", "chat");
        run(&p, &mut ex).unwrap();
        run(&p, &mut ex).unwrap();
        assert!(run(&p, &mut ex).is_err());
        // Another app (client_id) has its own count.
        ex.set_var("client_id", "k2");
        run(&p, &mut ex).unwrap();
        // Apigee's developer.quota names win.
        ex.set_var("verifyapikey.vk.apiproduct.developer.quota.limit", 5i64);
        ex.set_var(
            "verifyapikey.vk.apiproduct.developer.quota.timeunit",
            "hour",
        );
        run(&p, &mut ex).unwrap();
        assert_eq!(ex.lookup("ratelimit.q.allowed").as_deref(), Some("5"));
        // No product quota and no fallback: a clear fault.
        let mut bare = Exchange::default();
        let f = run(&p, &mut bare).unwrap_err();
        assert_eq!(f.status, 500);

        let t = bed.policy(
            "t",
            "{allow: '{request.header.x-limit}', interval: '{request.header.x-iv}', timeUnit: '{request.header.x-unit}'}",
        );
        let mut ex = Exchange::default();
        ex.request.headers.push("x-limit".into(), "1".into());
        ex.request.headers.push("x-iv".into(), "2".into());
        ex.request.headers.push("x-unit".into(), "hour".into());
        run(&t, &mut ex).unwrap();
        assert!(run(&t, &mut ex).is_err());
        for (h, bad, code) in [
            ("x-limit", "lots", "policies.ratelimit.InvalidAllowCount"),
            ("x-iv", "0", "policies.ratelimit.InvalidQuotaInterval"),
            (
                "x-unit",
                "fortnight",
                "policies.ratelimit.InvalidQuotaTimeUnit",
            ),
        ] {
            let mut e = Exchange::default();
            for (k, v) in [("x-limit", "1"), ("x-iv", "1"), ("x-unit", "day")] {
                e.request
                    .headers
                    .push(k.into(), if k == h { bad } else { v }.into());
            }
            assert_eq!(run(&t, &mut e).unwrap_err().code, code, "{h}={bad}");
        }
    }

    #[test]
    fn bad_weights_and_identifiers() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let p = bed.policy(
            "q",
            "{allow: 10, timeUnit: minute, messageWeight: '{request.header.x-w}', identifier: '{request.header.x-id}'}",
        );
        for bad in ["0", "-2", "ten", "1e3"] {
            let mut e = Exchange::default();
            e.request.headers.push("x-w".into(), bad.into());
            assert_eq!(
                run(&p, &mut e).unwrap_err().code,
                "policies.ratelimit.InvalidMessageWeight"
            );
        }
        let mut e = Exchange::default();
        e.request.headers.push("x-w".into(), "3".into());
        e.request.headers.push("x-id".into(), "x".repeat(100_000));
        run(&p, &mut e).unwrap();
        assert_eq!(e.lookup("ratelimit.q.used").as_deref(), Some("3"));
        assert!(e.lookup("ratelimit.q.identifier").unwrap().len() < 300);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let bed = Bed::new("2024-01-01T00:00:00Z");
        let ctx = BuildContext {
            name: "q".into(),
            config_dir: None,
            services: bed.services.clone(),
        };
        let field = |y: &str| {
            build(&ctx, serde_norway::from_str(y).unwrap())
                .unwrap_err()
                .field
        };
        assert_eq!(field("{allow: 1, timeUnit: fortnight}"), "timeUnit");
        assert_eq!(field("{allow: 1}"), "timeUnit");
        assert_eq!(field("{timeUnit: day}"), "allow");
        assert_eq!(field("{allow: -1, timeUnit: day}"), "allow");
        assert_eq!(field("{allow: 1, interval: 0, timeUnit: day}"), "interval");
        assert_eq!(
            field("{allow: 1, timeUnit: day, quotaType: weekly}"),
            "quotaType"
        );
        assert_eq!(
            field("{allow: 1, timeUnit: day, quotaType: calendar}"),
            "startTime"
        );
        assert_eq!(
            field("{allow: 1, timeUnit: day, quotaType: calendar, startTime: soon}"),
            "startTime"
        );
        assert_eq!(
            field("{allow: 1, timeUnit: day, countOnly: true}"),
            "sharedName"
        );
        assert_eq!(
            field("{allow: 1, timeUnit: day, sharedName: s, countOnly: true, enforceOnly: true}"),
            "countOnly"
        );
        assert_eq!(
            field("{allow: 1, timeUnit: day, messageWeight: 0}"),
            "messageWeight"
        );
        assert_eq!(
            field("{allow: 1, timeUnit: day, rateLimitHeaders: all}"),
            "rateLimitHeaders"
        );
    }
}
