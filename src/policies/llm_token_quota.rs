//! `LlmTokenQuota`: Apigee's LLMTokenQuota — a Quota counted in LLM tokens — that
//! **reserves, then reconciles** rather than counting after the fact.
//!
//! ```yaml
//! spec:
//!   type: LlmTokenQuota
//!   allow: 100000               # tokens per interval (or a template, or useProduct)
//!   interval: 1
//!   timeUnit: hour              # second, minute, hour, day, week, month
//!   quotaType: default          # default | calendar | flexi | rollingwindow
//!   identifier: "{client_id}"
//!   useProduct: false           # the app's product's llmTokenQuota {limit, interval, timeUnit}
//!   # sharedName / enforceOnly / countOnly: Apigee's pair (below)
//!   failOpen: true              # the counter store down: count locally, or 503
//!   rateLimitHeaders: none      # x-ratelimit / both: x-ratelimit-*-tokens on admitted answers
//!   defaultOutputTokens: 4096   # the output estimate when the request sets no limit
//!   perModel: false             # one counter per model (the request's, or llmModelSource)
//!   # llmModelSource: "{request.header.x-model}"       # template: the model to count under
//!   # llmTokenUsageSource: "{response.header.x-usage}" # template: tokens to charge
//! ```
//!
//! On the request (after the LLM view is read: the step declares `Hooks::llm` and needs the
//! request body) it reserves the estimate — the counted prompt tokens plus the request's
//! output limit (`max_tokens` × `n`, …) or `defaultOutputTokens` — with one atomic
//! enforce-and-count ask: concurrent requests can never together reserve more than `allow`
//! (in synchronous Redis mode across replicas too; asynchronous mode keeps Quota's documented
//! overshoot bound). When the exchange ends, whatever ended it, the after-exchange hook
//! replaces the reservation with the actual usage (`llm.total_tokens`, the tracker's final
//! usage; or `llmTokenUsageSource`), in the window it counted in; with no usage known it is
//! settled to the prompt tokens when the request may have reached the upstream, and released
//! when tollgate answered in its place. A request that is not an LLM request reserves
//! `defaultOutputTokens` and settles the same way, so it can neither slip past a spent
//! quota nor leave a reservation behind.
//!
//! Apigee's pair: a step with `enforceOnly` (on the request) reserves and leaves the
//! reconciling to the `countOnly` step of the same `sharedName` (on the response), which
//! settles it; a `countOnly` step that finds no reservation counts the usage (Apigee's
//! count-after). An `enforceOnly` step alone reserves and its reservation is released when
//! the exchange ends (it never counts, as in Apigee). A step with neither does both.
//!
//! Variables `ratelimit.<policy>.*` as Quota's (counted in tokens); a refusal is 429
//! `policies.llmtokenquota.LLMTokenQuotaViolation` with `Retry-After` and OpenAI's
//! `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens`, `x-ratelimit-reset-tokens`.

use std::sync::Arc;

use serde::Deserialize;

use super::quota::{self, Quota};
use super::{parse_spec, BuildContext, SpecError};
use crate::expr::Template;
use crate::pipeline::{AfterFuture, Direction, ExchangeEnd, Hook, Hooks, Outcome, Policy};
use crate::ratelimit::{Key, Mode, Pending, Reservation, ReservationUnit};
use crate::vars::Exchange;

pub const TYPE: &str = "LlmTokenQuota";

/// Above this, an estimate or a usage is treated as this (a trillion tokens): absurd numbers
/// cannot overflow a counter or wrap a signed adjustment.
pub(crate) const MAX_TOKENS: u64 = 1 << 40;
const DEFAULT_OUTPUT_TOKENS: u64 = 4096;

/// The fields only an LlmTokenQuota has; the rest is Quota's spec.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LlmSpec {
    #[serde(default)]
    llm_token_usage_source: Option<String>,
    #[serde(default)]
    llm_model_source: Option<String>,
    #[serde(default)]
    default_output_tokens: Option<u64>,
    #[serde(default)]
    per_model: bool,
}

const LLM_FIELDS: [&str; 4] = [
    "llmTokenUsageSource",
    "llmModelSource",
    "defaultOutputTokens",
    "perModel",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Reserve on the request, settle after the exchange.
    Both,
    /// Reserve; the count half settles.
    Enforce,
    /// Settle the enforce half's reservation (or count the usage).
    Count,
}

#[derive(Debug)]
struct LlmTokenQuota {
    core: Quota,
    role: Role,
    /// The reservations' tag: the counter namespace (policy or `sharedName`).
    tag: Key,
    usage_source: Option<Template>,
    model_source: Option<Template>,
    per_model: bool,
    default_output: u64,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let serde_norway::Value::Mapping(mut map) = spec else {
        return Err(SpecError::new("", "the spec must be a mapping"));
    };
    if map.contains_key("messageWeight") {
        return Err(SpecError::new(
            "messageWeight",
            "an LlmTokenQuota counts tokens (the prompt's plus the output limit, then the actual usage): it has no messageWeight",
        ));
    }
    let mut own = serde_norway::Mapping::new();
    for f in LLM_FIELDS {
        if let Some(v) = map.remove(f) {
            own.insert(f.into(), v);
        }
    }
    let llm: LlmSpec = parse_spec(serde_norway::Value::Mapping(own))?;
    let spec: quota::Spec = parse_spec(serde_norway::Value::Mapping(map))?;
    let mut core = quota::build_core(ctx, spec, quota::LLM_TOKEN_QUOTA)?;
    let role = match core.mode {
        Mode::EnforceAndCount => Role::Both,
        Mode::EnforceOnly => Role::Enforce,
        Mode::CountOnly => Role::Count,
    };
    // The enforce half reserves: it counts its estimate, to be settled later.
    if role == Role::Enforce {
        core.mode = Mode::EnforceAndCount;
    }
    let template = |field: &str, t: Option<&str>| {
        t.map(|t| Template::compile(t).map_err(|e| SpecError::new(field, e.to_string())))
            .transpose()
    };
    let default_output = llm.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS);
    if default_output > MAX_TOKENS {
        return Err(SpecError::new(
            "defaultOutputTokens",
            format!("at most {MAX_TOKENS}"),
        ));
    }
    Ok(Arc::new(LlmTokenQuota {
        tag: core.overflow,
        core,
        role,
        usage_source: template("llmTokenUsageSource", llm.llm_token_usage_source.as_deref())?,
        model_source: template("llmModelSource", llm.llm_model_source.as_deref())?,
        per_model: llm.per_model,
        default_output,
    }))
}

/// The tokens a request may cost: counted prompt tokens plus its output limit, or `default`
/// when it sets none; at least 1, at most [`MAX_TOKENS`].
pub(super) fn estimate(ex: &Exchange, default_output: u64) -> u64 {
    let prompt = ex.state.llm_prompt_tokens.unwrap_or(0);
    let output = ex
        .state
        .llm
        .as_ref()
        .and_then(|r| r.max_total_output_tokens())
        .unwrap_or(default_output);
    prompt.saturating_add(output).clamp(1, MAX_TOKENS)
}

/// What the exchange is charged in tokens when it ends: the usage source's number, the
/// tracker's final usage, else the prompt tokens when the request may have reached the
/// upstream (0 when tollgate answered in its place: see [`upstream_usage`]).
fn actual_tokens(ex: &Exchange, source: Option<&Template>, end: ExchangeEnd) -> u64 {
    if let Some(t) = source {
        if let Ok(n) = t.render(ex).trim().parse::<u64>() {
            return n.min(MAX_TOKENS);
        }
    }
    match upstream_usage(ex, end) {
        Some(u) => u.total_tokens().min(MAX_TOKENS),
        None if end == ExchangeEnd::Answered => 0,
        None => ex.state.llm_prompt_tokens.unwrap_or(0).min(MAX_TOKENS),
    }
}

/// The usage to charge: the tracker's, except when tollgate answered and the upstream
/// reported nothing and generated nothing (the request was refused before it left; the
/// tracker then only counted the prompt, which no provider bills).
pub(crate) fn upstream_usage(ex: &Exchange, end: ExchangeEnd) -> Option<&crate::llm::FinalUsage> {
    let u = ex.state.llm_usage.as_ref()?;
    let nothing_came_back =
        u.input_source == crate::llm::UsageSource::Counted && u.output_tokens == 0;
    (end != ExchangeEnd::Answered || !nothing_came_back).then_some(u)
}

impl LlmTokenQuota {
    fn model<'e>(&self, ex: &'e Exchange) -> std::borrow::Cow<'e, str> {
        if !self.per_model {
            return std::borrow::Cow::Borrowed("");
        }
        match &self.model_source {
            Some(t) => std::borrow::Cow::Owned(t.render(ex)),
            None => std::borrow::Cow::Borrowed(
                ex.state
                    .llm
                    .as_ref()
                    .and_then(|r| r.model.as_deref())
                    .unwrap_or(""),
            ),
        }
    }

    fn reserve<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        let weight = estimate(ex, self.default_output);
        let model = self.model(ex).into_owned();
        let p = match self
            .core
            .prepare_with(ex, weight, &[b"m", model.as_bytes()])
        {
            Ok(p) => p,
            Err(f) => {
                self.core.metrics.error.inc();
                return Hook::Ready(Outcome::Reject(f));
            }
        };
        let ask = p.ask.clone();
        let keep = move |this: &Self, ex: &mut Exchange, d: &crate::ratelimit::Decision| {
            if d.allowed {
                ex.state.reservations.push(Reservation::new(
                    &this.core.counters,
                    &ask,
                    d,
                    ReservationUnit::Tokens,
                    this.tag,
                ));
            }
        };
        match self.core.counters.decide(p.ask.clone()) {
            Pending::Ready(r) => {
                if let Ok(d) = &r {
                    keep(self, ex, d);
                }
                Hook::from(self.core.finish(ex, p, r))
            }
            Pending::Wait(fut) => Hook::wait(async move {
                let r = fut.await;
                if let Ok(d) = &r {
                    keep(self, ex, d);
                }
                self.core.finish(ex, p, r)
            }),
        }
    }
}

impl Policy for LlmTokenQuota {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request && self.role != Role::Count
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: true,
            after_exchange: self.role != Role::Enforce,
            ..Hooks::default()
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        if dir == Direction::Request && self.role != Role::Count {
            self.reserve(ex)
        } else {
            Hook::CONTINUE
        }
    }

    fn after_exchange(&self, ex: &Exchange, end: ExchangeEnd) -> Option<AfterFuture> {
        if self.role == Role::Enforce {
            return None;
        }
        let reservation = ex.state.reservations.take(self.tag);
        if reservation.is_none() && self.role == Role::Both {
            return None;
        }
        let actual = actual_tokens(ex, self.usage_source.as_ref(), end);
        if let Some(r) = reservation {
            return r.settle(actual);
        }
        // A count half with no reservation to settle: count the usage (Apigee's way).
        if actual == 0 {
            return None;
        }
        let model = self.model(ex).into_owned();
        let mut ask = match self
            .core
            .prepare_with(ex, actual, &[b"m", model.as_bytes()])
        {
            Ok(p) => p.ask,
            Err(f) => {
                tracing::warn!(policy = %self.core.name, fault = %f.message, "token usage not counted");
                return None;
            }
        };
        ask.mode = Mode::CountOnly;
        match self.core.counters.decide(ask) {
            Pending::Ready(_) => None,
            Pending::Wait(fut) => Some(Box::pin(async move {
                let _ = fut.await;
            })),
        }
    }
}

#[cfg(test)]
#[path = "llm_token_quota_tests.rs"]
mod tests;
