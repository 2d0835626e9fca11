//! Counters for `Quota` and `SpikeArrest`: one service per process, handed to every
//! configuration load through [`crate::services::Services`], so counts survive reloads.
//!
//! - [`memory::MemoryCounters`]: in-memory counters (a sharded `DashMap` of small slots),
//!   bounded in size, optionally checkpointed through a storage backend (the embedded
//!   store's file) so a restart keeps a day's or a month's count. Spike arrest always counts
//!   here (per replica, as in Apigee). The data path calls it directly: no trait object, no
//!   lock beyond one shard's.
//! - [`shared::SharedCounters`]: quotas shared by replicas through a storage backend
//!   ([`crate::store::Backend::count`]: Redis), either synchronous (one atomic call per
//!   decision: replicas together never exceed the limit) or asynchronous (local counting,
//!   batched sync; bounded overshoot).
//!
//! Every time comes from a [`Clock`] in milliseconds since the Unix epoch (UTC), so tests
//! drive window edges with a [`FakeClock`]. `governor` is not used: quota windows need wall
//! time (top of the hour, midnight UTC, calendar months) where governor's clocks are
//! relative, its keyed store has no size bound, and its GCRA refuses a message weight larger
//! than the burst where Apigee counts it.

pub mod memory;
pub mod policy;
pub mod reserve;
pub mod shared;
pub mod window;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;

pub use reserve::{Reservation, ReservationUnit, Reservations, RESERVATION_METRICS};

pub use crate::counters::{
    gcra_overflow_key, Adjust, Ask, Decision, Key, KeyPrefix, Mode, RateLimitMetrics, Window,
    RL_METRICS, ROLLING_SLOTS,
};

/// Wall time since the Unix epoch: microseconds (spike arrest smooths rates above 1000/s)
/// and milliseconds (quota windows).
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_us(&self) -> i64;

    fn now_ms(&self) -> i64 {
        self.now_us().div_euclid(1000)
    }
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock tests move by hand (set in milliseconds, kept in microseconds).
#[derive(Debug, Default)]
pub struct FakeClock(AtomicI64);

impl FakeClock {
    pub fn new(ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(ms * 1000)))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms * 1000, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms * 1000, Ordering::SeqCst);
    }
    pub fn advance_us(&self, us: i64) {
        self.0.fetch_add(us, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CounterError {
    /// The shared counter store cannot be reached and the policy fails closed.
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
}

pub type DecisionFuture = Pin<Box<dyn Future<Output = Result<Decision, CounterError>> + Send>>;

/// A decision now, or one that waits on the shared backend.
pub enum Pending {
    Ready(Result<Decision, CounterError>),
    Wait(DecisionFuture),
}

/// An adjustment's answer: the window's count after it, or `None` when moot.
pub type AdjustFuture = Pin<Box<dyn Future<Output = Result<Option<u64>, CounterError>> + Send>>;

/// An adjustment now, or one that waits on the shared backend.
pub enum AdjustPending {
    Ready(Result<Option<u64>, CounterError>),
    Wait(AdjustFuture),
}

/// Which backend quotas count in.
#[derive(Debug, Clone)]
enum Backend {
    Memory,
    Shared(Arc<shared::SharedCounters>),
}

/// The process's counter service.
#[derive(Debug, Clone)]
pub struct Counters {
    pub clock: Arc<dyn Clock>,
    /// Local counters: spike arrest, in-memory quotas, and the fail-open fallback.
    pub local: Arc<memory::MemoryCounters>,
    backend: Backend,
}

impl Default for Counters {
    fn default() -> Self {
        Self::memory(Arc::new(SystemClock), memory::DEFAULT_MAX_KEYS)
    }
}

impl Counters {
    /// Counters in memory only.
    pub fn memory(clock: Arc<dyn Clock>, max_keys: usize) -> Self {
        Self {
            local: Arc::new(memory::MemoryCounters::new(max_keys)),
            clock,
            backend: Backend::Memory,
        }
    }

    /// Counters in memory only, on a table made elsewhere (restored from a checkpoint).
    pub fn with_local(clock: Arc<dyn Clock>, local: Arc<memory::MemoryCounters>) -> Self {
        Self {
            clock,
            local,
            backend: Backend::Memory,
        }
    }

    /// Quotas in a shared backend, the rest in `local`.
    pub fn shared(
        clock: Arc<dyn Clock>,
        local: Arc<memory::MemoryCounters>,
        shared: Arc<shared::SharedCounters>,
    ) -> Self {
        Self {
            clock,
            local,
            backend: Backend::Shared(shared),
        }
    }

    /// Now, in milliseconds.
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Now, in microseconds.
    pub fn now_us(&self) -> i64 {
        self.clock.now_us()
    }

    /// `memory`, `redis-sync` or `redis-async`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Memory => "memory",
            Backend::Shared(r) => r.kind(),
        }
    }

    /// Decides a quota ask in the configured backend.
    pub fn decide(&self, ask: Ask) -> Pending {
        match &self.backend {
            Backend::Memory => Pending::Ready(Ok(self.local.apply(&ask))),
            Backend::Shared(r) => r.decide(ask, &self.local),
        }
    }

    /// Adjusts what a reservation counted (see [`Adjust`]) where it was counted: the local
    /// table when `local` (memory counters, or a fail-open decision made while the shared
    /// backend was down), else the shared backend.
    pub fn adjust(&self, adj: Adjust, local: bool) -> AdjustPending {
        match &self.backend {
            Backend::Shared(r) if !local => r.adjust(adj),
            _ => AdjustPending::Ready(Ok(self.local.adjust(&adj))),
        }
    }
}

/// A policy's metric handles, resolved once at load.
#[derive(Debug, Clone)]
pub struct PolicyMetrics {
    pub allowed: IntCounter,
    pub rejected: IntCounter,
    pub error: IntCounter,
    pub fail_open: IntCounter,
    pub fail_closed: IntCounter,
}

impl PolicyMetrics {
    pub fn new(policy: &str) -> Self {
        let m = &*RL_METRICS;
        Self {
            allowed: m.decisions.with_label_values(&[policy, "allowed"]),
            rejected: m.decisions.with_label_values(&[policy, "rejected"]),
            error: m.decisions.with_label_values(&[policy, "error"]),
            fail_open: m.fail_open.with_label_values(&[policy]),
            fail_closed: m.fail_closed.with_label_values(&[policy]),
        }
    }
}
