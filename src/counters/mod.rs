//! The counting vocabulary and the in-memory counter table, below both the storage backends
//! (which decide asks in [`crate::store::Backend::count`] and keep in-process counters in a
//! [`table::MemoryCounters`]) and the rate-limit services in [`crate::ratelimit`] (which
//! re-exports all of this). Nothing here reads a backend: checkpointing a table through one
//! lives in [`crate::ratelimit::memory`], so storage never depends on rate limiting.

pub mod table;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use sha2::{Digest, Sha256};

use crate::telemetry::METRICS;

/// A counter's identity: 128 bits of SHA-256 over its parts, so an identifier of any size
/// costs 16 bytes and cannot be chosen to collide with another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub u128);

impl Key {
    pub fn new(parts: &[&[u8]]) -> Self {
        KeyPrefix::new(&[]).finish(parts)
    }

    pub fn hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// SHA-256 state after a key's constant leading parts (built once per policy), so a
/// decision hashes only its own parts. `finish` gives the same key as [`Key::new`] over
/// all the parts.
#[derive(Debug, Clone)]
pub struct KeyPrefix(Sha256);

impl KeyPrefix {
    pub fn new(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        Self(h)
    }

    pub fn finish(&self, parts: &[&[u8]]) -> Key {
        let mut h = self.0.clone();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        Key(u128::from_le_bytes(b))
    }
}

/// Which requests count together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `[start, end)`, known from the clock (default and calendar quota types).
    Fixed { start: i64, end: i64 },
    /// `len` ms from the identifier's first request (flexi).
    Flexi { len: i64 },
    /// The last `len` ms, counted in [`ROLLING_SLOTS`] slots (rolling window, effective count).
    Rolling { len: i64 },
}

/// Slots of a rolling window: a request stops counting between `len` and `len + len/10`
/// after it was made, never earlier, so no `len`-long span ever admits more than the limit.
pub const ROLLING_SLOTS: i64 = 10;

impl Window {
    /// Slot length of a rolling window (at least 1 ms).
    pub fn slot_len(len: i64) -> i64 {
        (len + ROLLING_SLOTS - 1).div_euclid(ROLLING_SLOTS).max(1)
    }

    /// The counter asks of one policy (`base`, see [`Ask::overflow`]) share when the table
    /// is full: one per window kind and window (fixed: its start and end; flexi and rolling:
    /// its length), so no policy or window resets another's overflow count.
    pub fn overflow_key(self, base: Key) -> Key {
        let (kind, a, b): (&[u8], i64, i64) = match self {
            Window::Fixed { start, end } => (b"f", start, end),
            Window::Flexi { len } => (b"x", len, 0),
            Window::Rolling { len } => (b"r", len, 0),
        };
        Key::new(&[
            b"overflow",
            &base.0.to_le_bytes(),
            kind,
            &a.to_le_bytes(),
            &b.to_le_bytes(),
        ])
    }
}

/// The spike-arrest (GCRA) counter a policy's new identifiers share when the table is full.
pub fn gcra_overflow_key(base: Key, emission_us: i64) -> Key {
    Key::new(&[
        b"overflow",
        &base.0.to_le_bytes(),
        b"g",
        &emission_us.to_le_bytes(),
    ])
}

/// What a decision does with the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Admit if `used + weight <= allow`, and count it then.
    EnforceAndCount,
    /// Admit if `used + weight <= allow`; count nothing (the request half of a shared quota).
    EnforceOnly,
    /// Always admit; count `weight` (the response half).
    CountOnly,
}

impl Mode {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Mode::EnforceAndCount => "ec",
            Mode::EnforceOnly => "e",
            Mode::CountOnly => "c",
        }
    }
}

/// One decision to make.
#[derive(Debug, Clone)]
pub struct Ask {
    pub key: Key,
    /// The policy's overflow namespace (a hash of its name or `sharedName`): when the
    /// counter table is full, new identifiers count on [`Window::overflow_key`] of it.
    pub overflow: Key,
    pub window: Window,
    pub allow: u64,
    pub weight: u64,
    pub mode: Mode,
    pub now: i64,
    /// When the shared store is down: count locally (true) or fail with `Unavailable`.
    pub fail_open: bool,
}

/// What the counter says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Count in the window after this decision.
    pub used: u64,
    /// When the count next drops (window end; for a rolling window the next slot's end, or,
    /// for a refusal, the end of the first slot whose leaving makes room for the weight:
    /// when a retry is admitted).
    pub expiry: i64,
    /// Counted locally because the shared store was down (fail open).
    pub degraded: bool,
}

/// A change to what a reservation counted: `delta` (signed) is added to the window, and for a
/// rolling window the slot, the reservation was counted in, never taking the count below
/// zero. When that window (or slot) has passed, the adjustment is moot: the window can refuse
/// nobody any more, so neither a refund nor an excess is carried into another window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjust {
    pub key: Key,
    pub window: Window,
    /// When the reservation was counted (ms): picks a rolling window's slot.
    pub counted_at: i64,
    /// The reservation decision's `expiry`: a flexi window's end, which tells that window
    /// from a later one of the same identifier.
    pub counted_end: i64,
    pub delta: i64,
    pub now: i64,
}

impl Adjust {
    /// The adjustment of what `ask` counted with decision `d` (a delta of 0: set it).
    pub fn of(ask: &Ask, d: &Decision) -> Self {
        Self {
            key: ask.key,
            window: ask.window,
            counted_at: ask.now,
            counted_end: d.expiry,
            delta: 0,
            now: ask.now,
        }
    }
}

/// `count + delta`, at least 0.
pub(crate) fn apply_delta(count: u64, delta: i64) -> u64 {
    if delta >= 0 {
        count.saturating_add(delta.unsigned_abs())
    } else {
        count.saturating_sub(delta.unsigned_abs())
    }
}

/// Rate-limit metrics, registered in the process registry on first use.
pub struct RateLimitMetrics {
    pub decisions: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub fail_open: IntCounterVec,
    pub fail_closed: IntCounterVec,
    keys: IntGauge,
    pub overflow: IntCounter,
    /// Time between two asynchronous syncs' ends: how stale a mirror can be, which is what
    /// bounds the overshoot (the interval when the replica keeps up).
    pub sync_gap: Histogram,
    /// The two parts of `keys`: local counters and async Redis mirrors.
    memory_keys: AtomicI64,
    mirror_keys: AtomicI64,
}

impl RateLimitMetrics {
    /// Publishes the local table's size (the gauge counts it plus the Redis mirrors).
    pub fn set_memory_keys(&self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.memory_keys.store(n, Ordering::Relaxed);
        self.publish_keys();
    }

    /// Publishes how many asynchronous Redis mirrors are held.
    pub fn set_mirror_keys(&self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.mirror_keys.store(n, Ordering::Relaxed);
        self.publish_keys();
    }

    fn publish_keys(&self) {
        self.keys.set(
            self.memory_keys
                .load(Ordering::Relaxed)
                .saturating_add(self.mirror_keys.load(Ordering::Relaxed)),
        );
    }

    /// The `tollgate_ratelimit_counters` gauge.
    pub fn keys(&self) -> i64 {
        self.keys.get()
    }
}

pub static RL_METRICS: LazyLock<RateLimitMetrics> = LazyLock::new(|| {
    let r = &METRICS.registry;
    let vec = |name: &str, help: &str, labels: &[&str]| {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        r.register(Box::new(c.clone())).expect("unique metric");
        c
    };
    let keys = IntGauge::new(
        "tollgate_ratelimit_counters",
        "Counters held in memory (spike arrest, local quotas, async Redis mirrors)",
    )
    .expect("valid metric");
    r.register(Box::new(keys.clone())).expect("unique metric");
    let overflow = IntCounter::new(
        "tollgate_ratelimit_overflow_total",
        "Decisions made on an overflow counter (one per policy and window) because the counter table was full",
    )
    .expect("valid metric");
    r.register(Box::new(overflow.clone()))
        .expect("unique metric");
    let sync_gap = Histogram::with_opts(
        HistogramOpts::new(
            "tollgate_ratelimit_sync_gap_seconds",
            "Time between the ends of two asynchronous counter syncs (the interval, more when the replica or Redis lags)",
        )
        .buckets(vec![
            0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
            5.0,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(sync_gap.clone()))
        .expect("unique metric");
    RateLimitMetrics {
        sync_gap,
        decisions: vec(
            "tollgate_ratelimit_decisions_total",
            "Quota and spike arrest decisions by policy and result (allowed, rejected, error)",
            &["policy", "result"],
        ),
        redis_errors: vec(
            "tollgate_ratelimit_redis_errors_total",
            "Failed Redis counter operations by operation (decide, sync)",
            &["op"],
        ),
        fail_open: vec(
            "tollgate_ratelimit_fail_open_total",
            "Decisions counted locally because the counter store was down, by policy",
            &["policy"],
        ),
        fail_closed: vec(
            "tollgate_ratelimit_fail_closed_total",
            "Requests refused with 503 because the counter store was down, by policy",
            &["policy"],
        ),
        keys,
        overflow,
        memory_keys: AtomicI64::new(0),
        mirror_keys: AtomicI64::new(0),
    }
});

/// An ask with a fixed overflow key and fail-open, for the counter tables' tests.
#[cfg(test)]
pub(crate) fn test_ask(
    key: u128,
    window: Window,
    allow: u64,
    weight: u64,
    mode: Mode,
    now: i64,
) -> Ask {
    Ask {
        key: Key(key),
        overflow: Key(9_999),
        window,
        allow,
        weight,
        mode,
        now,
        fail_open: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_parts() {
        assert_ne!(Key::new(&[b"ab", b"c"]), Key::new(&[b"a", b"bc"]));
        assert_eq!(Key::new(&[b"x"]), Key::new(&[b"x"]));
        assert_eq!(Key::new(&[b"x"]).hex().len(), 32);
        assert_eq!(Window::slot_len(1000), 100);
        assert_eq!(Window::slot_len(5), 1);
    }
}
