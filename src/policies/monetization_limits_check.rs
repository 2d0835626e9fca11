//! `MonetizationLimitsCheck` (Apigee's name): refuses a call whose app has no active
//! subscription to a rate plan of the product its key was verified for (403), or whose
//! developer has no balance left (402), and charges the call by its plan.
//!
//! ```yaml
//! spec:
//!   type: MonetizationLimitsCheck
//!   # verifyApiKey: verify-key   # whose verified app (default: the last one)
//!   defaultOutputTokens: 4096    # per-token plans: the output estimate without a limit
//!   failOpen: false              # counters unavailable: 503 (true: count locally)
//! ```
//!
//! The charge is reserved before the call on the developer's spend counter (enforce and
//! count, so concurrent calls cannot spend past `credited + creditLimit`) and reconciled
//! with the actual amount when the exchange ends (`crate::ratelimit::reserve`): a per-call
//! plan charges its band's price when the upstream answered in full (released otherwise); a
//! per-token plan charges the `llm.*` usage, input and output priced apart.
//!
//! Faults (tollgate's `steps.<type>.<Code>` convention; Apigee documents no public code list
//! for this policy, only its `mint.limitscheck.*` variables, which are set here):
//! - 403 `steps.monetizationlimitscheck.SubscriptionNotFound`: no active subscription;
//! - 402 `steps.monetizationlimitscheck.InsufficientFunds`: no account, or the balance (plus
//!   the credit limit) does not cover the call's estimate;
//! - 500 `steps.monetizationlimitscheck.NoIdentity`: no verified app (place VerifyApiKey first);
//! - 503 `steps.monetizationlimitscheck.StoreUnavailable`: counters or store unavailable.
//!
//! Variables: `mint.limitscheck.is_request_blocked`, `mint.limitscheck.is_subscription_found`,
//! `mint.limitscheck.prepaid_developer_balance`, `mint.limitscheck.prepaid_developer_currency`,
//! `mint.limitscheck.purchased_product_name`, `mint.limitscheck.status_message`,
//! `mint.subscription_start_time_ms`, `mint.subscription_end_time_ms`, `mint.rateplan`.

use std::sync::Arc;

use futures_util::FutureExt;
use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::monetization::plan::Per;
use crate::monetization::{
    money, period_key, spend_key, Monetization, Plans, RatePlan, Subscription, SPEND_WINDOW,
};
use crate::pipeline::{AfterFuture, Direction, ExchangeEnd, Hook, Hooks, Policy};
use crate::ratelimit::window::{self, Unit};
use crate::ratelimit::{
    Ask, Counters, Decision, Key, Mode, Pending, PolicyMetrics, Reservation, ReservationUnit,
    Window,
};
use crate::vars::{Exchange, ValueRef};

pub const TYPE: &str = "MonetizationLimitsCheck";
const CODE: &str = "steps.monetizationlimitscheck";
const DEFAULT_OUTPUT_TOKENS: u64 = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    verify_api_key: Option<String>,
    #[serde(default)]
    default_output_tokens: Option<u64>,
    #[serde(default)]
    fail_open: bool,
}

/// What a charged exchange carries from its request to its end.
#[derive(Debug, Clone)]
pub struct Charging {
    pub sub: Arc<Subscription>,
    pub plan: Arc<RatePlan>,
    /// The period's consumption before this call (bands and allowance).
    pub before: u64,
    pub currency: String,
    /// The balance left after this call's reservation, as a decimal.
    pub balance: String,
}

impl Charging {
    /// The `mint.*` variables of an admitted call (read from here, not set one by one).
    pub fn var(&self, suffix: &str) -> Option<ValueRef<'_>> {
        Some(match suffix {
            "rateplan" => ValueRef::Str(&self.plan.name),
            "subscription_start_time_ms" => ValueRef::Int(self.sub.start_ms),
            "subscription_end_time_ms" => ValueRef::Int(self.sub.end_ms?),
            "limitscheck.is_request_blocked" => ValueRef::Bool(false),
            "limitscheck.is_subscription_found" => ValueRef::Bool(true),
            "limitscheck.purchased_product_name" => ValueRef::Str(&self.sub.product),
            "limitscheck.prepaid_developer_currency" => ValueRef::Str(&self.currency),
            "limitscheck.prepaid_developer_balance" => ValueRef::Str(&self.balance),
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct MonetizationLimitsCheck {
    mint: Arc<Monetization>,
    plans: Arc<Plans>,
    counters: Counters,
    app: Option<String>,
    default_output: u64,
    fail_open: bool,
    tag: Key,
    metrics: PolicyMetrics,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let default_output = spec.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS);
    if default_output > crate::policies::llm_token_quota::MAX_TOKENS {
        return Err(SpecError::new("defaultOutputTokens", "too large"));
    }
    Ok(Arc::new(MonetizationLimitsCheck {
        mint: ctx.services.monetization.clone(),
        plans: ctx.services.rate_plans.clone(),
        counters: ctx.services.counters.clone(),
        app: spec.verify_api_key.map(|v| format!("verifyapikey.{v}.")),
        default_output,
        fail_open: spec.fail_open,
        tag: Key::new(&[b"mint", ctx.name.as_bytes()]),
        metrics: PolicyMetrics::new(&ctx.name),
    }))
}

fn unavailable(e: impl std::fmt::Display) -> Fault {
    Fault::new(
        503,
        format!("{CODE}.StoreUnavailable"),
        format!("monetization data is unavailable: {e}"),
    )
    .with_header("retry-after", "1")
}

async fn resolve(p: Pending) -> Result<Decision, Fault> {
    match p {
        Pending::Ready(r) => r,
        Pending::Wait(f) => f.await,
    }
    .map_err(unavailable)
}

impl MonetizationLimitsCheck {
    fn blocked(ex: &mut Exchange, found: bool, message: &str) {
        ex.set_var("mint.limitscheck.is_request_blocked", "true");
        ex.set_var(
            "mint.limitscheck.is_subscription_found",
            if found { "true" } else { "false" },
        );
        ex.set_var("mint.limitscheck.status_message", message.to_owned());
    }

    async fn check(&self, ex: &mut Exchange) -> Result<(), Fault> {
        let Some(v) = ex.state.app(self.app.as_deref()) else {
            self.metrics.error.inc();
            return Err(Fault::new(
                500,
                format!("{CODE}.NoIdentity"),
                "MonetizationLimitsCheck needs the verified app: place a VerifyApiKey step before it",
            ));
        };
        // Arcs, not copies of the names: the exchange is written below.
        let (app_rec, product_rec) = (v.app.clone(), v.product.clone());
        let (app, developer, product) = (
            app_rec.name.as_str(),
            app_rec.developer_email.as_str(),
            product_rec.spec.name.as_str(),
        );
        let now = self.counters.now();
        if !self.mint.subscriptions_loaded() {
            self.mint.preload().await.map_err(unavailable)?;
        }
        let active = self
            .mint
            .active_subscription(app, product, now)
            .and_then(|s| {
                let p = self.plans.get(&s.plan)?.clone();
                p.is_open(now).then_some((s, p))
            });
        let Some((sub, plan)) = active else {
            self.metrics.rejected.inc();
            ex.set_var(
                "mint.limitscheck.purchased_product_name",
                product.to_owned(),
            );
            let m = format!(
                "app `{app}` has no active subscription to a rate plan of product `{product}`"
            );
            Self::blocked(ex, false, &m);
            return Err(Fault::new(403, format!("{CODE}.SubscriptionNotFound"), m));
        };
        let account = match self.mint.cached_account(developer) {
            Some(a) => Some(a),
            None => self.mint.account(developer).await.map_err(unavailable)?,
        };
        let Some((acc, credited)) = account else {
            self.metrics.rejected.inc();
            let m = format!("developer `{developer}` has no billing account");
            Self::blocked(ex, true, &m);
            ex.set_var("mint.rateplan", plan.name.clone());
            return Err(Fault::new(402, format!("{CODE}.InsufficientFunds"), m));
        };
        // The period's consumption before this call: a call is counted now (its position
        // is exact under concurrency), tokens are added when the exchange ends.
        let before = if plan.needs_period_count() {
            let (start, end) = window::aligned(now, 1, Unit::Month);
            let key = period_key(app, &plan.name);
            let weight = u64::from(plan.per == Per::Call);
            let d = resolve(self.counters.decide(Ask {
                key,
                overflow: key,
                window: Window::Fixed { start, end },
                allow: u64::MAX / 4,
                weight,
                mode: Mode::CountOnly,
                now,
                fail_open: self.fail_open,
            }))
            .await?;
            d.used.saturating_sub(weight)
        } else {
            0
        };
        let estimate = match plan.per {
            Per::Call => plan.call_charge(before),
            Per::Token => match &ex.state.llm {
                Some(req) => plan.token_charge(
                    before,
                    ex.state.llm_prompt_tokens.unwrap_or(0),
                    req.max_total_output_tokens().unwrap_or(self.default_output),
                ),
                None => 0,
            },
        };
        let allow = credited.saturating_add(acc.credit_limit).max(0);
        let key = spend_key(developer, &acc.currency);
        let ask = Ask {
            key,
            overflow: self.tag,
            window: SPEND_WINDOW,
            allow: allow.unsigned_abs(),
            weight: estimate.max(0).unsigned_abs(),
            mode: Mode::EnforceAndCount,
            now,
            fail_open: self.fail_open,
        };
        let d = resolve(self.counters.decide(ask.clone())).await?;
        let left = credited.saturating_sub(i64::try_from(d.used).unwrap_or(i64::MAX));
        if !d.allowed {
            self.metrics.rejected.inc();
            let m = format!(
                "the balance of developer `{developer}` does not cover this call ({} {} available, the call may cost {})",
                money::format(allow.saturating_sub(i64::try_from(d.used).unwrap_or(i64::MAX))),
                acc.currency,
                money::format(estimate),
            );
            Self::blocked(ex, true, &m);
            ex.set_var("mint.rateplan", plan.name.clone());
            ex.set_var(
                "mint.limitscheck.prepaid_developer_balance",
                money::format(left),
            );
            ex.set_var(
                "mint.limitscheck.prepaid_developer_currency",
                acc.currency.clone(),
            );
            return Err(Fault::new(402, format!("{CODE}.InsufficientFunds"), m));
        }
        self.metrics.allowed.inc();
        ex.state.reservations.push(Reservation::new(
            &self.counters,
            &ask,
            &d,
            ReservationUnit::Micros,
            self.tag,
        ));
        ex.state.mint = Some(Box::new(Charging {
            sub,
            plan,
            before,
            currency: acc.currency,
            balance: money::format(left),
        }));
        Ok(())
    }

    /// The actual charge, and the tokens it priced.
    fn actual(ex: &Exchange, c: &Charging, end: ExchangeEnd) -> (i64, u64, u64) {
        match c.plan.per {
            Per::Call => (
                if end == ExchangeEnd::Completed {
                    c.plan.call_charge(c.before)
                } else {
                    0
                },
                0,
                0,
            ),
            Per::Token => match crate::policies::llm_token_quota::upstream_usage(ex, end) {
                Some(u) => (
                    c.plan
                        .token_charge(c.before, u.input_tokens, u.output_tokens),
                    u.input_tokens,
                    u.output_tokens,
                ),
                None => (0, 0, 0),
            },
        }
    }
}

impl Policy for MonetizationLimitsCheck {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request && self.plans.0.iter().any(|p| p.per == Per::Token)
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: self.plans.0.iter().any(|p| p.per == Per::Token),
            after_exchange: true,
            ..Hooks::default()
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        if dir != Direction::Request {
            return Hook::CONTINUE;
        }
        // In memory with everything cached nothing waits: decide inline, no boxed future.
        let inline = self.counters.kind() == "memory"
            && self.mint.subscriptions_loaded()
            && ex
                .state
                .app(self.app.as_deref())
                .is_none_or(|v| self.mint.cached_account(&v.app.developer_email).is_some());
        if inline {
            match self.check(ex).now_or_never() {
                Some(r) => Hook::from(r),
                None => Hook::from(Err(unavailable("an in-memory decision waited"))),
            }
        } else {
            Hook::wait(self.check(ex))
        }
    }

    fn after_exchange(&self, ex: &Exchange, end: ExchangeEnd) -> Option<AfterFuture> {
        let r = ex.state.reservations.take(self.tag)?;
        let Some(c) = ex.state.mint.as_deref() else {
            return r.settle(0);
        };
        let (amount, input, output) = Self::actual(ex, c, end);
        let settle = r.settle(amount.max(0).unsigned_abs());
        let now = self.counters.now();
        if amount > 0 || end == ExchangeEnd::Completed {
            self.mint.record(now, &c.sub, input, output, amount);
        }
        // Tokens join the period's consumption once known.
        let mut period = None;
        if c.plan.per == Per::Token && c.plan.needs_period_count() && input + output > 0 {
            let (start, end) = window::aligned(now, 1, Unit::Month);
            let key = period_key(&c.sub.app, &c.plan.name);
            if let Pending::Wait(f) = self.counters.decide(Ask {
                key,
                overflow: key,
                window: Window::Fixed { start, end },
                allow: u64::MAX / 4,
                weight: input + output,
                mode: Mode::CountOnly,
                now,
                fail_open: true,
            }) {
                period = Some(f);
            }
        }
        match (settle, period) {
            (None, None) => None,
            (s, p) => Some(Box::pin(async move {
                if let Some(s) = s {
                    s.await;
                }
                if let Some(p) = p {
                    let _ = p.await;
                }
            })),
        }
    }
}

#[cfg(test)]
#[path = "monetization_limits_check_tests.rs"]
mod tests;
