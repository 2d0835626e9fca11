//! `LlmCostBudget`: a spending limit in a currency per app, API product or developer and
//! period, priced from a per-model table, enforced with the same reserve-then-reconcile
//! counters as `LlmTokenQuota` (no Apigee policy has this).
//!
//! ```yaml
//! spec:
//!   type: LlmCostBudget
//!   currency: USD
//!   budget: 50.00               # per period, in the currency
//!   per: app                    # app | product | developer (of the verified API key)
//!   interval: 1
//!   timeUnit: month             # second … month; periods start at the top of the unit, UTC
//!   prices:                     # per million tokens
//!     - model: gpt-4o-mini      # exact name
//!       input: 0.15
//!       cachedInput: 0.075      # default: the input price
//!       output: 0.60
//!     - model: "claude-sonnet-*"   # a trailing * matches any name with that prefix
//!       input: 3
//!       output: 15
//!   # defaultPrice: {input: 5, output: 15}   # unknown models; without it they are refused
//!   defaultOutputTokens: 4096   # the output estimate when the request sets no limit
//!   failOpen: true              # counter store down: count locally, or 503
//!   # verifyApiKey: verify-key  # whose verified app (default: the last one)
//! ```
//!
//! Models are matched exactly first, then by the longest `prefix*` pattern, then `*`. Money
//! is counted in integer millionths of the currency ("micros"): the estimate is
//! prompt tokens × input price + output limit × output price (rounded up); when the exchange
//! ends it is replaced by the actual cost of `llm.*` usage (uncached input, cached input at
//! its own price, output), or released (see `crate::ratelimit::reserve`). The counter is per
//! (per, identity, currency, period): every budget policy naming the same ones shares it,
//! and the management API reads it (`GET /v1/apps/{app}/spend`, `/v1/products/{p}/spend`).
//!
//! Refusals: a spent budget is 429 `policies.llmcostbudget.BudgetExceeded` with
//! `Retry-After` (the period's end): OpenAI answers an exhausted balance with 429
//! (`insufficient_quota`), which every SDK surfaces as a rate-limit error, where a 402 is an
//! unknown status to them. A model with no price and no `defaultPrice` is 403
//! `policies.llmcostbudget.ModelNotPriced`; no verified app is 500
//! `policies.llmcostbudget.NoIdentity` (place VerifyApiKey first). A request that is not an
//! LLM request passes without reserving (no model is called). `llm.cost` is set from the
//! response-end hook (the actual cost in the currency).

use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;

use serde::Deserialize;

use super::llm_token_quota::MAX_TOKENS;
use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::llm::FinalUsage;
use crate::pipeline::{AfterFuture, Direction, ExchangeEnd, Hook, Hooks, Policy};
use crate::ratelimit::policy as rl;
use crate::ratelimit::window::{self, Unit};
use crate::ratelimit::{
    Ask, Counters, Decision, Key, Mode, Pending, PolicyMetrics, Reservation, ReservationUnit,
    Window,
};
use crate::vars::Exchange;

pub const TYPE: &str = "LlmCostBudget";

const DEFAULT_OUTPUT_TOKENS: u64 = 4096;
/// A price above this per million tokens is a typo.
const MAX_PRICE: f64 = 1_000_000.0;
/// Budgets up to a trillion currency units (in micros, well inside i64).
const MAX_BUDGET: f64 = 1e12;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    App,
    Product,
    Developer,
}

impl Per {
    pub fn as_str(self) -> &'static str {
        match self {
            Per::App => "app",
            Per::Product => "product",
            Per::Developer => "developer",
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PriceSpec {
    #[serde(default)]
    model: Option<String>,
    input: f64,
    #[serde(default)]
    cached_input: Option<f64>,
    output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    currency: String,
    budget: f64,
    per: Per,
    #[serde(default = "one")]
    interval: u32,
    time_unit: String,
    prices: Vec<PriceSpec>,
    #[serde(default)]
    default_price: Option<PriceSpec>,
    #[serde(default)]
    default_output_tokens: Option<u64>,
    #[serde(default = "yes")]
    fail_open: bool,
    #[serde(default)]
    verify_api_key: Option<String>,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// Prices per million tokens, in the currency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl Price {
    /// Micros of `tokens` at `per_million` (a price per million tokens is micros per token).
    fn micros(tokens: u64, per_million: f64) -> u64 {
        let v = (tokens as f64 * per_million).ceil();
        if v.is_finite() && v > 0.0 {
            v.min(i64::MAX as f64 / 2.0) as u64
        } else {
            0
        }
    }

    /// The actual cost of `u`, in micros: uncached input, cached input at its price, output.
    pub fn cost(&self, u: &FinalUsage) -> u64 {
        let input = u.input_tokens.min(MAX_TOKENS);
        let cached = u.cached_input_tokens.min(input);
        Self::micros(input - cached, self.input)
            .saturating_add(Self::micros(cached, self.cached_input))
            .saturating_add(Self::micros(u.output_tokens.min(MAX_TOKENS), self.output))
    }

    /// The estimate: every prompt token at the input price, the output limit at the output
    /// price.
    pub fn estimate(&self, prompt: u64, output: u64) -> u64 {
        Self::micros(prompt.min(MAX_TOKENS), self.input)
            .saturating_add(Self::micros(output.min(MAX_TOKENS), self.output))
    }
}

/// A model → price table: exact names, `prefix*` patterns (longest first), `*`.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    exact: Vec<(String, Price)>,
    prefixes: Vec<(String, Price)>,
    fallback: Option<Price>,
}

impl PriceTable {
    pub fn price(&self, model: &str) -> Option<Price> {
        if let Some((_, p)) = self.exact.iter().find(|(m, _)| m == model) {
            return Some(*p);
        }
        self.prefixes
            .iter()
            .find(|(m, _)| model.starts_with(m.as_str()))
            .map(|(_, p)| *p)
            .or(self.fallback)
    }
}

fn price(field: &str, p: &PriceSpec) -> Result<Price, SpecError> {
    let check = |name: &str, v: f64| {
        if v.is_finite() && (0.0..=MAX_PRICE).contains(&v) {
            Ok(v)
        } else {
            Err(SpecError::new(
                format!("{field}.{name}"),
                format!("a price per million tokens between 0 and {MAX_PRICE}"),
            ))
        }
    };
    let input = check("input", p.input)?;
    Ok(Price {
        input,
        cached_input: check("cachedInput", p.cached_input.unwrap_or(input))?,
        output: check("output", p.output)?,
    })
}

/// What the management API needs to read a budget's spend.
#[derive(Debug)]
pub struct BudgetInfo {
    pub policy: String,
    pub per: Per,
    pub currency: String,
    pub budget_micros: u64,
    interval: u32,
    unit: Unit,
    counters: Counters,
}

/// One budget's spend for one identity in the current period.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spend {
    pub policy: String,
    pub per: &'static str,
    pub currency: String,
    pub budget: f64,
    pub spent: f64,
    pub remaining: f64,
    /// Period bounds, ms since the epoch (UTC).
    pub period_start: i64,
    pub period_end: i64,
}

impl BudgetInfo {
    fn key(&self, identity: &str) -> Key {
        counter_key(self.per, identity, &self.currency, self.interval, self.unit)
    }

    /// The spend of `identity` in the current period, read without counting.
    pub async fn spend(&self, identity: &str) -> Result<Spend, String> {
        let now = self.counters.now();
        let (start, end) = window::aligned(now, self.interval, self.unit);
        let ask = Ask {
            key: self.key(identity),
            overflow: self.key(identity),
            window: Window::Fixed { start, end },
            allow: self.budget_micros,
            weight: 0,
            mode: Mode::CountOnly,
            now,
            fail_open: false,
        };
        let d = match self.counters.decide(ask) {
            Pending::Ready(r) => r,
            Pending::Wait(f) => f.await,
        }
        .map_err(|e| e.to_string())?;
        let money = |m: u64| m as f64 / 1e6;
        Ok(Spend {
            policy: self.policy.clone(),
            per: self.per.as_str(),
            currency: self.currency.clone(),
            budget: money(self.budget_micros),
            spent: money(d.used),
            remaining: money(self.budget_micros.saturating_sub(d.used)),
            period_start: start,
            period_end: end,
        })
    }
}

/// The budgets of the configurations in use (weak: a budget leaves with its configuration).
static BUDGETS: LazyLock<Mutex<Vec<Weak<BudgetInfo>>>> = LazyLock::new(Default::default);

/// The live budgets, one per policy name (the newest configuration's).
pub fn budgets() -> Vec<Arc<BudgetInfo>> {
    let mut list = BUDGETS.lock();
    list.retain(|w| w.strong_count() > 0);
    let mut out: Vec<Arc<BudgetInfo>> = Vec::new();
    for b in list.iter().rev().filter_map(Weak::upgrade) {
        if !out.iter().any(|o| o.policy == b.policy) {
            out.push(b);
        }
    }
    out.sort_by(|a, b| a.policy.cmp(&b.policy));
    out
}

fn counter_key(per: Per, identity: &str, currency: &str, interval: u32, unit: Unit) -> Key {
    Key::new(&[
        b"llmcostbudget",
        per.as_str().as_bytes(),
        identity.as_bytes(),
        currency.as_bytes(),
        &interval.to_le_bytes(),
        unit.as_str().as_bytes(),
    ])
}

#[derive(Debug)]
struct LlmCostBudget {
    info: Arc<BudgetInfo>,
    prices: PriceTable,
    default_output: u64,
    fail_open: bool,
    app: Option<String>,
    /// Tag of this budget's reservations, and the overflow namespace.
    tag: Key,
    metrics: PolicyMetrics,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let currency = spec.currency.trim().to_owned();
    if currency.is_empty() || currency.len() > 16 {
        return Err(SpecError::new("currency", "a currency code such as USD"));
    }
    if !(spec.budget.is_finite() && (0.0..=MAX_BUDGET).contains(&spec.budget)) {
        return Err(SpecError::new(
            "budget",
            format!("an amount between 0 and {MAX_BUDGET}"),
        ));
    }
    let unit = Unit::parse(&spec.time_unit).ok_or_else(|| {
        SpecError::new("timeUnit", "one of second, minute, hour, day, week, month")
    })?;
    if !(1..=100_000).contains(&spec.interval) {
        return Err(SpecError::new("interval", "between 1 and 100000"));
    }
    let mut prices = PriceTable::default();
    for (i, p) in spec.prices.iter().enumerate() {
        let field = format!("prices[{i}]");
        let pr = price(&field, p)?;
        match p.model.as_deref().map(str::trim) {
            None | Some("") => {
                return Err(SpecError::new(
                    format!("{field}.model"),
                    "a model name, a `prefix*` pattern or `*`",
                ))
            }
            Some("*") => prices.fallback = Some(pr),
            Some(m) => match m.strip_suffix('*') {
                Some(prefix) => prices.prefixes.push((prefix.to_owned(), pr)),
                None => prices.exact.push((m.to_owned(), pr)),
            },
        }
    }
    prices
        .prefixes
        .sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    if let Some(d) = &spec.default_price {
        if d.model.is_some() {
            return Err(SpecError::new("defaultPrice.model", "not allowed here"));
        }
        prices.fallback = Some(price("defaultPrice", d)?);
    }
    let default_output = spec.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS);
    if default_output > MAX_TOKENS {
        return Err(SpecError::new(
            "defaultOutputTokens",
            format!("at most {MAX_TOKENS}"),
        ));
    }
    let info = Arc::new(BudgetInfo {
        policy: ctx.name.clone(),
        per: spec.per,
        currency,
        budget_micros: (spec.budget * 1e6).round() as u64,
        interval: spec.interval,
        unit,
        counters: ctx.services.counters.clone(),
    });
    {
        let mut list = BUDGETS.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&info));
    }
    Ok(Arc::new(LlmCostBudget {
        info,
        prices,
        default_output,
        fail_open: spec.fail_open,
        app: spec.verify_api_key.map(|v| format!("verifyapikey.{v}.")),
        tag: Key::new(&[b"llmcostbudget", ctx.name.as_bytes()]),
        metrics: PolicyMetrics::new(&ctx.name),
    }))
}

impl LlmCostBudget {
    fn identity<'e>(&self, ex: &'e Exchange) -> Option<&'e str> {
        let v = ex.state.app(self.app.as_deref())?;
        Some(match self.info.per {
            Per::App => v.app.name.as_str(),
            Per::Product => v.product.spec.name.as_str(),
            Per::Developer => v.app.developer_email.as_str(),
        })
    }

    fn price_of(&self, ex: &Exchange) -> Result<Price, Fault> {
        let model = ex
            .state
            .llm
            .as_ref()
            .and_then(|r| r.model.as_deref())
            .unwrap_or("");
        self.prices.price(model).ok_or_else(|| {
            Fault::new(
                403,
                "policies.llmcostbudget.ModelNotPriced",
                format!(
                    "the model `{}` has no price in this API's cost budget",
                    rl::shown(model)
                ),
            )
        })
    }

    fn reserve<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        let Some(req) = ex.state.llm.clone() else {
            return Hook::CONTINUE;
        };
        let price = match self.price_of(ex) {
            Ok(p) => p,
            Err(f) => {
                self.metrics.error.inc();
                return Hook::from(Err(f));
            }
        };
        let Some(identity) = self.identity(ex) else {
            self.metrics.error.inc();
            return Hook::from(Err(Fault::new(
                500,
                "policies.llmcostbudget.NoIdentity",
                "a cost budget needs the verified app: place a VerifyApiKey step before it",
            )));
        };
        let prompt = ex.state.llm_prompt_tokens.unwrap_or(0);
        let output = req.max_total_output_tokens().unwrap_or(self.default_output);
        let now = self.info.counters.now();
        let (start, end) = window::aligned(now, self.info.interval, self.info.unit);
        let ask = Ask {
            key: self.info.key(identity),
            overflow: self.tag,
            window: Window::Fixed { start, end },
            allow: self.info.budget_micros,
            weight: price.estimate(prompt, output).max(1),
            mode: Mode::EnforceAndCount,
            now,
            fail_open: self.fail_open,
        };
        match self.info.counters.decide(ask.clone()) {
            Pending::Ready(r) => Hook::from(self.finish(ex, &ask, r)),
            Pending::Wait(fut) => Hook::wait(async move {
                let r = fut.await;
                self.finish(ex, &ask, r)
            }),
        }
    }

    fn finish(
        &self,
        ex: &mut Exchange,
        ask: &Ask,
        r: Result<Decision, crate::ratelimit::CounterError>,
    ) -> Result<(), Fault> {
        let d = r.map_err(|e| {
            self.metrics.fail_closed.inc();
            Fault::new(
                503,
                "policies.llmcostbudget.StoreUnavailable",
                format!("cost budget counters are unavailable: {e}"),
            )
            .with_header("retry-after", "1")
        })?;
        if d.degraded {
            self.metrics.fail_open.inc();
        }
        if d.allowed {
            self.metrics.allowed.inc();
            ex.state.reservations.push(Reservation::new(
                &self.info.counters,
                ask,
                &d,
                ReservationUnit::Micros,
                self.tag,
            ));
            return Ok(());
        }
        self.metrics.rejected.inc();
        let money = |m: u64| m as f64 / 1e6;
        Err(Fault::new(
            429,
            "policies.llmcostbudget.BudgetExceeded",
            format!(
                "The {} budget of {:.2} {} for this {} is spent ({:.2} used; this request may cost up to {:.4}). It renews at the start of the next period.",
                self.info.policy,
                money(ask.allow),
                self.info.currency,
                self.info.per.as_str(),
                money(d.used),
                money(ask.weight),
            ),
        )
        .with_header(
            "retry-after",
            rl::seconds_until(d.expiry, ask.now).to_string(),
        ))
    }

    /// The actual cost when the exchange ends, in micros.
    fn actual(&self, ex: &Exchange, end: ExchangeEnd) -> u64 {
        let Ok(price) = self.price_of(ex) else {
            return 0;
        };
        match super::llm_token_quota::upstream_usage(ex, end) {
            Some(u) => price.cost(u),
            None if end == ExchangeEnd::Answered => 0,
            None => price.estimate(ex.state.llm_prompt_tokens.unwrap_or(0), 0),
        }
    }
}

impl Policy for LlmCostBudget {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: true,
            after_exchange: true,
            ..Hooks::default()
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        match dir {
            Direction::Request => self.reserve(ex),
            Direction::Response => Hook::CONTINUE,
        }
    }

    /// Prices what the exchange is charged into `llm.cost` (read by usage reports,
    /// analytics and templates) and the cost counters, once the usage is settled.
    fn exchange_end(&self, ex: &mut Exchange, end: ExchangeEnd) {
        let cost = self.actual(ex, end) as f64 / 1e6;
        ex.state.llm_cost = Some(cost);
        crate::telemetry::gen_ai::record_cost(ex, &self.info.currency, cost);
    }

    fn after_exchange(&self, ex: &Exchange, end: ExchangeEnd) -> Option<AfterFuture> {
        let r = ex.state.reservations.take(self.tag)?;
        r.settle(self.actual(ex, end))
    }
}

#[cfg(test)]
#[path = "llm_cost_budget_tests.rs"]
mod tests;
