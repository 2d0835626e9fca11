//! Reservations: count an estimate now, replace it with the actual amount later.
//!
//! A token quota or a cost budget cannot know what an LLM call costs before it ends, and
//! counting only at the end lets every concurrent request pass a counter that is not spent
//! yet. So the request step decides an ask of the *estimate* atomically (enforce and count:
//! the counters never admit more estimates than the limit, across replicas in synchronous
//! Redis mode) and keeps a [`Reservation`]: the counter key, the window and the time it
//! counted in, and the amount. When the exchange ends, [`Reservation::settle`] adds
//! `actual − reserved` (signed) to that same window through [`Counters::adjust`], never
//! taking it below zero; releasing is settling to 0.
//!
//! - An actual above the estimate (a request without an output limit that ran past the
//!   default estimate) counts its excess in the reservation's window while that is open, so
//!   the counter may pass `allow` and later requests wait. If the window is over, the
//!   adjustment is moot, refund or excess: the window can refuse nobody any more, and
//!   charging the excess to the next window would refuse requests that never saw it.
//! - Exactly once: `settle` consumes the reservation; one dropped without being settled
//!   (the exchange went away before its after-exchange hook took it, a step failed) is
//!   released from its `Drop`, on the runtime when the backend must be waited on.
//! - A failed adjustment (the shared store down) leaves the estimate counted: the window
//!   over-counts until it ends, never under-counts. Counted in
//!   `tollgate_llm_reservations_settled_total{result="error"}`.
//!
//! Gauges: `tollgate_llm_reservations_outstanding` (reservations not settled yet),
//! `tollgate_llm_reserved_tokens_outstanding` and
//! `tollgate_llm_reserved_cost_micros_outstanding` (their amounts).

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;

use parking_lot::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use super::{Adjust, AdjustPending, Ask, Counters, Decision, Key};
use crate::telemetry::METRICS;

/// What a reservation counts, for the outstanding-amount gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationUnit {
    Tokens,
    /// Millionths of the budget's currency.
    Micros,
}

pub struct ReservationMetrics {
    pub outstanding: IntGauge,
    pub tokens: IntGauge,
    pub micros: IntGauge,
    applied: IntCounter,
    exact: IntCounter,
    moot: IntCounter,
    error: IntCounter,
}

pub static RESERVATION_METRICS: LazyLock<ReservationMetrics> = LazyLock::new(|| {
    let r = &METRICS.registry;
    let gauge = |name: &str, help: &str| {
        let g = IntGauge::new(name, help).expect("valid metric");
        r.register(Box::new(g.clone())).expect("unique metric");
        g
    };
    let settled = IntCounterVec::new(
        Opts::new(
            "tollgate_llm_reservations_settled_total",
            "Reservations settled (reconciled or released) by result: applied, exact (nothing to change), moot (its window had ended), error (the store failed; the estimate stays counted)",
        ),
        &["result"],
    )
    .expect("valid metric");
    r.register(Box::new(settled.clone()))
        .expect("unique metric");
    ReservationMetrics {
        outstanding: gauge(
            "tollgate_llm_reservations_outstanding",
            "Token and cost reservations counted and not yet reconciled or released",
        ),
        tokens: gauge(
            "tollgate_llm_reserved_tokens_outstanding",
            "Tokens held by outstanding token-quota reservations",
        ),
        micros: gauge(
            "tollgate_llm_reserved_cost_micros_outstanding",
            "Millionths of a currency unit held by outstanding cost-budget reservations",
        ),
        applied: settled.with_label_values(&["applied"]),
        exact: settled.with_label_values(&["exact"]),
        moot: settled.with_label_values(&["moot"]),
        error: settled.with_label_values(&["error"]),
    }
});

/// The work left after settling, when the backend must be waited on.
pub type SettleFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

#[derive(Debug)]
struct Held {
    counters: Counters,
    adjust: Adjust,
    reserved: u64,
    /// Counted on the local table (memory counters, or fail-open while Redis was down).
    local: bool,
    unit: ReservationUnit,
    tag: Key,
}

/// An estimate counted on a counter, to settle once (see the module documentation).
#[derive(Debug)]
pub struct Reservation {
    held: Option<Held>,
}

fn gauge_amount(unit: ReservationUnit) -> &'static IntGauge {
    match unit {
        ReservationUnit::Tokens => &RESERVATION_METRICS.tokens,
        ReservationUnit::Micros => &RESERVATION_METRICS.micros,
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Reservation {
    /// The reservation an admitted enforce-and-count decision `d` of `ask` made. `tag`
    /// identifies the counter's owner (a policy or `sharedName` namespace) so the step that
    /// settles it finds it among the exchange's reservations.
    pub fn new(
        counters: &Counters,
        ask: &Ask,
        d: &Decision,
        unit: ReservationUnit,
        tag: Key,
    ) -> Self {
        RESERVATION_METRICS.outstanding.inc();
        gauge_amount(unit).add(as_i64(ask.weight));
        Self {
            held: Some(Held {
                counters: counters.clone(),
                adjust: Adjust::of(ask, d),
                reserved: ask.weight,
                local: counters.kind() == "memory" || d.degraded,
                unit,
                tag,
            }),
        }
    }

    pub fn tag(&self) -> Option<Key> {
        self.held.as_ref().map(|h| h.tag)
    }

    /// The amount counted.
    pub fn reserved(&self) -> u64 {
        self.held.as_ref().map_or(0, |h| h.reserved)
    }

    /// Replaces the reservation with `actual` (0 releases it). Done at once on local
    /// counters; otherwise the returned future (owning what it needs) does it.
    pub fn settle(mut self, actual: u64) -> Option<SettleFuture> {
        let held = self.held.take()?;
        Self::settle_held(held, actual)
    }

    fn settle_held(held: Held, actual: u64) -> Option<SettleFuture> {
        RESERVATION_METRICS.outstanding.dec();
        gauge_amount(held.unit).sub(as_i64(held.reserved));
        let delta = i128::from(actual) - i128::from(held.reserved);
        if delta == 0 {
            RESERVATION_METRICS.exact.inc();
            return None;
        }
        let delta = i64::try_from(delta).unwrap_or(if delta > 0 { i64::MAX } else { i64::MIN });
        let adj = Adjust {
            delta,
            now: held.counters.now(),
            ..held.adjust
        };
        let record = move |r: Result<Option<u64>, super::CounterError>| match r {
            Ok(Some(_)) => RESERVATION_METRICS.applied.inc(),
            Ok(None) => RESERVATION_METRICS.moot.inc(),
            Err(e) => {
                RESERVATION_METRICS.error.inc();
                tracing::warn!(error = %e, delta, "a reservation could not be settled; its estimate stays counted");
            }
        };
        match held.counters.adjust(adj, held.local) {
            AdjustPending::Ready(r) => {
                record(r);
                None
            }
            AdjustPending::Wait(fut) => Some(Box::pin(async move { record(fut.await) })),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        if let Some(fut) = Self::settle_held(held, 0) {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(fut);
                }
                Err(_) => {
                    tracing::warn!("a reservation dropped outside a runtime stays counted");
                }
            }
        }
    }
}

/// The reservations an exchange holds (in its typed state), for the steps that settle them.
/// Behind a mutex because after-exchange hooks see the exchange shared (uncontended: one
/// exchange's steps run one at a time).
#[derive(Debug, Default)]
pub struct Reservations(Mutex<Vec<Reservation>>);

impl Reservations {
    pub fn push(&self, r: Reservation) {
        self.0.lock().push(r);
    }

    /// Takes the first reservation tagged `tag`.
    pub fn take(&self, tag: Key) -> Option<Reservation> {
        let mut v = self.0.lock();
        let i = v.iter().position(|r| r.tag() == Some(tag))?;
        Some(v.swap_remove(i))
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}
