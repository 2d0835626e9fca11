//! `SpikeArrest`: protects the upstream from bursts, per replica (as in Apigee).
//!
//! ```yaml
//! spec:
//!   type: SpikeArrest
//!   rate: 10ps                  # Nps or Npm
//!   identifier: "{client_id}"   # optional: one limiter per identifier
//!   messageWeight: "{request.header.x-weight}"   # optional: integer or template
//!   useEffectiveCount: false
//! ```
//!
//! With `useEffectiveCount: false` (default) the rate is smoothed as Apigee does it: `10ps`
//! admits one request per 100 ms, `30pm` one per 2 s (a GCRA with no burst); a request of
//! weight w holds the next one back w intervals. With `true`, up to N requests are admitted
//! in any sliding second (or minute), bursts included. A refusal is 429
//! `policies.ratelimit.SpikeArrestViolation` with `Retry-After`.
//!
//! `rate` may be a template, rendered per request (Apigee's `<Rate ref="...">`), such as
//! `"{verifyapikey.verify-key.apiproduct.spike.rate}"`, or with a literal that applies when
//! the reference does not resolve: `"{firstnonnull(verifyapikey.verify-key.apiproduct.spike.rate,'30pm')}"`
//! (the literal is checked at load). A rendered rate that is empty or not a rate fails the
//! step with 500 `policies.ratelimit.FailedToResolveSpikeArrestRate`, as Apigee's: the
//! request is never let through unlimited. Each distinct rate has its own limiter.

use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::expr::Template;
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Policy};
use crate::ratelimit::policy::{self as rl, NumberSpec, Setting};
use crate::ratelimit::{Ask, Counters, Key, KeyPrefix, Mode, PolicyMetrics, Window};
use crate::vars::Exchange;

pub const TYPE: &str = "SpikeArrest";

/// Highest rate accepted (per second or per minute).
const MAX_RATE: u64 = 1_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    rate: String,
    #[serde(default)]
    identifier: Option<String>,
    #[serde(default)]
    message_weight: Option<NumberSpec>,
    #[serde(default)]
    use_effective_count: bool,
}

/// `N` per second or per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rate {
    n: u64,
    per_ms: i64,
}

fn parse_rate(s: &str) -> Option<Rate> {
    let s = s.trim();
    let (num, per_ms) = if let Some(n) = s.strip_suffix("ps") {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix("pm") {
        (n, 60_000)
    } else {
        return None;
    };
    let n: u64 = num.parse().ok()?;
    (1..=MAX_RATE).contains(&n).then_some(Rate { n, per_ms })
}

/// The rate: fixed at load, or a template rendered per request.
#[derive(Debug)]
enum RateSource {
    Fixed(Rate),
    Template(Template),
}

#[derive(Debug)]
pub(super) struct SpikeArrest {
    /// The refusal's fault code and the words its message starts with.
    violation: (&'static str, &'static str),
    rate: RateSource,
    rate_text: String,
    identifier: Option<Template>,
    weight: Option<Setting>,
    effective: bool,
    /// The counter key's constant parts (kind, policy, rate), hashed once.
    key_prefix: KeyPrefix,
    /// Overflow namespace of this policy's counters.
    overflow: Key,
    counters: Counters,
    pub(super) metrics: PolicyMetrics,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let weight = spec
        .message_weight
        .as_ref()
        .map(|w| Setting::compile("messageWeight", w, 1, rl::MAX_WEIGHT))
        .transpose()?;
    Ok(Arc::new(build_core(
        ctx,
        &spec.rate,
        spec.identifier.as_deref(),
        weight,
        spec.use_effective_count,
        (
            b"spike",
            (
                "policies.ratelimit.SpikeArrestViolation",
                "Spike arrest violation.",
            ),
        ),
    )?))
}

/// A spike arrest at `rate` per identifier; `kind` names its counters (so two policy types
/// never share one) and `violation` its fault code and message.
pub(super) fn build_core(
    ctx: &BuildContext,
    rate_text: &str,
    identifier: Option<&str>,
    weight: Option<Setting>,
    use_effective_count: bool,
    (kind_name, violation): (&'static [u8], (&'static str, &'static str)),
) -> Result<SpikeArrest, SpecError> {
    let not_a_rate = |t: &str| {
        SpecError::new(
            "rate",
            format!(
                "`{t}` is not a rate: write N per second or minute, like 10ps or 600pm (1 ≤ N ≤ {MAX_RATE})"
            ),
        )
    };
    let template =
        Template::compile(rate_text).map_err(|e| SpecError::new("rate", e.to_string()))?;
    let rate = if template.is_static() {
        RateSource::Fixed(parse_rate(rate_text).ok_or_else(|| not_a_rate(rate_text))?)
    } else {
        if let Some(lit) = template.literal_fallback() {
            parse_rate(lit).ok_or_else(|| not_a_rate(lit))?;
        }
        RateSource::Template(template)
    };
    let suffix: &[u8] = if use_effective_count {
        b"-window"
    } else {
        b"-smooth"
    };
    // `spike-window` / `spike-smooth` as one part: the keys SpikeArrest always had. A
    // templated rate goes in each key instead (one limiter per rate).
    let kind = [kind_name, suffix].concat();
    let key_prefix = match &rate {
        RateSource::Fixed(r) => KeyPrefix::new(&[
            &kind,
            ctx.name.as_bytes(),
            &r.n.to_le_bytes(),
            &r.per_ms.to_le_bytes(),
        ]),
        RateSource::Template(_) => KeyPrefix::new(&[&kind, ctx.name.as_bytes(), b"templated"]),
    };
    Ok(SpikeArrest {
        violation,
        key_prefix,
        overflow: Key::new(&[kind_name, ctx.name.as_bytes()]),
        rate,
        rate_text: rate_text.trim().to_owned(),
        identifier: rl::identifier("identifier", identifier)?,
        weight,
        effective: use_effective_count,
        counters: ctx.services.counters.clone(),
        metrics: PolicyMetrics::new(&ctx.name),
    })
}

impl SpikeArrest {
    fn check(&self, ex: &mut Exchange) -> Result<(), Fault> {
        let weight = rl::weight(self.weight.as_ref(), ex, 1).inspect_err(|_| {
            self.metrics.error.inc();
        })?;
        self.check_weight(ex, weight)
    }

    /// Admits or refuses a message of `weight` (a PromptTokenLimit's prompt tokens).
    pub(super) fn check_weight(&self, ex: &Exchange, weight: u64) -> Result<(), Fault> {
        let rendered;
        let (rate, rate_text) = match &self.rate {
            RateSource::Fixed(r) => (*r, self.rate_text.as_str()),
            RateSource::Template(t) => {
                rendered = t.render(ex);
                match parse_rate(&rendered) {
                    Some(r) => (r, rendered.trim()),
                    None => {
                        self.metrics.error.inc();
                        return Err(Fault::new(
                            500,
                            "policies.ratelimit.FailedToResolveSpikeArrestRate",
                            format!(
                                "Failed to resolve Spike Arrest Rate reference {} ({:?} is not a rate)",
                                self.rate_text, rendered
                            ),
                        ));
                    }
                }
            }
        };
        let key = {
            let id = self
                .identifier
                .as_ref()
                .map(|t| t.render_cow(ex))
                .unwrap_or_default();
            match &self.rate {
                RateSource::Fixed(_) => self.key_prefix.finish(&[id.as_bytes()]),
                RateSource::Template(_) => self.key_prefix.finish(&[
                    id.as_bytes(),
                    &rate.n.to_le_bytes(),
                    &rate.per_ms.to_le_bytes(),
                ]),
            }
        };
        // GCRA emission interval (µs per unit of weight).
        let emission_us =
            (rate.per_ms.saturating_mul(1000) / i64::try_from(rate.n).unwrap_or(1)).max(1);
        let now_us = self.counters.now_us();
        let now = now_us.div_euclid(1000);
        let result = if self.effective {
            let d = self.counters.local.apply(&Ask {
                key,
                overflow: self.overflow,
                window: Window::Rolling { len: rate.per_ms },
                allow: rate.n,
                weight,
                mode: Mode::EnforceAndCount,
                now,
                fail_open: true,
            });
            if d.allowed {
                Ok(())
            } else {
                Err(d.expiry - now)
            }
        } else {
            self.counters
                .local
                .gcra(key, self.overflow, emission_us, weight, now_us)
        };
        match result {
            Ok(()) => {
                self.metrics.allowed.inc();
                Ok(())
            }
            Err(wait_ms) => {
                self.metrics.rejected.inc();
                let period = if rate.per_ms == 1000 {
                    "Seconds"
                } else {
                    "Minutes"
                };
                Err(Fault::new(
                    429,
                    self.violation.0,
                    format!(
                        "{} Allowed rate : MessageRate{{capacity={}, period={period}}} ({})",
                        self.violation.1, rate.n, rate_text
                    ),
                )
                .with_header(
                    "retry-after",
                    rl::seconds_until(now + wait_ms, now).to_string(),
                ))
            }
        }
    }
}

impl Policy for SpikeArrest {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        Hook::from(self.check(ex))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::FakeClock;
    use crate::services::Services;

    fn policy(yaml: &str) -> (Arc<dyn Policy>, Arc<FakeClock>) {
        let clock = FakeClock::new(1_700_000_000_000);
        let services = Services {
            counters: Counters::memory(clock.clone(), 1000),
            ..Default::default()
        };
        let ctx = BuildContext {
            name: "spike".into(),
            config_dir: None,
            services,
        };
        (
            build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap(),
            clock,
        )
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
        match p.run(ex, Direction::Request) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(_) => panic!("spike arrest decides at once"),
        }
    }

    #[test]
    fn ten_per_second_admits_one_per_hundred_ms() {
        let (p, clock) = policy("{rate: 10ps}");
        let mut ex = Exchange::default();
        run(&p, &mut ex).unwrap();
        let f = run(&p, &mut ex).unwrap_err();
        assert_eq!(f.status, 429);
        assert_eq!(f.code, "policies.ratelimit.SpikeArrestViolation");
        assert_eq!(f.headers, vec![("retry-after".into(), "1".into())]);
        clock.advance(99);
        assert!(run(&p, &mut ex).is_err());
        clock.advance(1);
        run(&p, &mut ex).unwrap();
        // Ten in one second, evenly spaced, all pass; an eleventh squeezed in does not.
        let mut admitted = 0;
        for _ in 0..20 {
            clock.advance(50);
            admitted += usize::from(run(&p, &mut ex).is_ok());
        }
        assert_eq!(admitted, 10);
    }

    #[test]
    fn thirty_per_minute_is_not_thirty_in_a_second() {
        let (p, clock) = policy("{rate: 30pm}");
        let mut ex = Exchange::default();
        let mut admitted = 0;
        for _ in 0..30 {
            admitted += usize::from(run(&p, &mut ex).is_ok());
            clock.advance(33);
        }
        assert_eq!(admitted, 1);
        clock.advance(2000);
        run(&p, &mut ex).unwrap();
    }

    #[test]
    fn rates_above_a_thousand_per_second_smooth_in_microseconds() {
        let (p, clock) = policy("{rate: 10000ps}");
        let mut ex = Exchange::default();
        run(&p, &mut ex).unwrap();
        clock.advance_us(99);
        assert!(run(&p, &mut ex).is_err());
        clock.advance_us(1);
        run(&p, &mut ex).unwrap();
    }

    #[test]
    fn effective_count_allows_bursts_in_the_window() {
        let (p, clock) = policy("{rate: 5ps, useEffectiveCount: true}");
        let mut ex = Exchange::default();
        for _ in 0..5 {
            run(&p, &mut ex).unwrap();
        }
        assert!(run(&p, &mut ex).is_err());
        clock.advance(1000);
        run(&p, &mut ex).unwrap();
    }

    #[test]
    fn identifiers_and_weights() {
        let (p, clock) = policy(
            "{rate: 10ps, identifier: '{request.header.x-user}', messageWeight: '{request.header.x-w}'}",
        );
        let mut a = Exchange::default();
        a.request.headers.push("x-user".into(), "a".into());
        a.request.headers.push("x-w".into(), "3".into());
        let mut b = Exchange::default();
        b.request.headers.push("x-user".into(), "b".into());
        b.request.headers.push("x-w".into(), "1".into());
        run(&p, &mut a).unwrap();
        run(&p, &mut b).unwrap();
        clock.advance(200);
        assert!(run(&p, &mut a).is_err(), "weight 3 holds a back 300 ms");
        run(&p, &mut b).unwrap();
        clock.advance(100);
        run(&p, &mut a).unwrap();
        // Bad weights: a clear fault, not a panic.
        for bad in ["0", "-1", "abc", "1.5"] {
            let mut e = Exchange::default();
            e.request.headers.push("x-w".into(), bad.into());
            let f = run(&p, &mut e).unwrap_err();
            assert_eq!(f.code, "policies.ratelimit.InvalidMessageWeight", "{bad}");
        }
        // A huge identifier is hashed, not stored.
        let mut e = Exchange::default();
        e.request.headers.push("x-user".into(), "u".repeat(1 << 20));
        run(&p, &mut e).unwrap();
    }

    #[test]
    fn bad_specs_name_the_field() {
        let ctx = BuildContext::default();
        let b = |y: &str| build(&ctx, serde_norway::from_str(y).unwrap()).unwrap_err();
        for bad in ["10", "10px", "0ps", "-5ps", "ps", "10.5ps", "99999999pm"] {
            assert_eq!(b(&format!("{{rate: '{bad}'}}")).field, "rate", "{bad}");
        }
        assert_eq!(b("{rate: 1ps, messageWeight: 0}").field, "messageWeight");
        assert_eq!(b("{rate: 1ps, messageWeight: nope}").field, "messageWeight");
        assert!(b("{rate: 1ps, burst: 3}").message.contains("burst"));
        assert_eq!(
            parse_rate("600pm"),
            Some(Rate {
                n: 600,
                per_ms: 60_000
            })
        );
    }

    #[test]
    fn templated_rate_per_request() {
        let (p, clock) = policy(r#"{rate: "{firstnonnull(request.header.x-rate,'1ps')}"}"#);
        // Unresolved: the literal, one per second.
        let mut ex = Exchange::default();
        run(&p, &mut ex).unwrap();
        assert!(run(&p, &mut ex).is_err());
        // The product's rate (here a header): 10ps, its own limiter, one per 100 ms.
        let mut fast = Exchange::default();
        fast.request.headers.push("x-rate".into(), "10ps".into());
        run(&p, &mut fast).unwrap();
        let f = run(&p, &mut fast).unwrap_err();
        assert!(f.message.contains("capacity=10"), "{}", f.message);
        clock.advance(100);
        run(&p, &mut fast).unwrap();
        // A rendered value that is not a rate: refused, never unlimited.
        let mut bad = Exchange::default();
        bad.request.headers.push("x-rate".into(), "lots".into());
        let f = run(&p, &mut bad).unwrap_err();
        assert_eq!(
            (f.status, f.code.as_str()),
            (500, "policies.ratelimit.FailedToResolveSpikeArrestRate")
        );
        // A reference without a literal that does not resolve: the same fault.
        let (p, _) = policy(r#"{rate: "{verifyapikey.k.apiproduct.spike}"}"#);
        let f = run(&p, &mut Exchange::default()).unwrap_err();
        assert_eq!(f.code, "policies.ratelimit.FailedToResolveSpikeArrestRate");
        let ctx = BuildContext::default();
        let e = build(
            &ctx,
            serde_norway::from_str(r#"{rate: "{firstnonnull(a,'10px')}"}"#).unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.field, "rate");
    }
}
