//! Quota counters in a shared backend (Redis, or Redis Cluster), shared by every replica.
//! The backend decides each ask atomically ([`Backend::count`]; for Redis one Lua call,
//! `crate::store::redis_store::COUNTER_SCRIPT`); this module adds the two ways of using it,
//! the local mirrors and the handling of an unreachable backend.
//!
//! # Synchronous mode
//!
//! One backend call per decision reads, judges and counts atomically: replicas together
//! never admit more than the limit.
//!
//! # Asynchronous mode
//!
//! Decisions are made on a local mirror (`remote` count last read from Redis + `pending`
//! local count); every `interval` a task sends the pending counts in one batch (one pipeline
//! of the same script, count-only) and reads the totals back. Each replica can admit up to the limit
//! minus the last total it read, which lacks what the others admitted since their last sync
//! before it (syncs are not aligned, so up to two intervals of the others' admissions): the
//! overshoot is ≤ replicas × (admission rate per replica) × the time between syncs (the
//! interval while the replica keeps up; `tollgate_ratelimit_sync_gap_seconds` shows it), and
//! never more than (replicas − 1) × limit per window.
//!
//! Mirrors are bounded by `--counter-max-keys`: a new identifier finding the table full
//! first evicts mirrors with nothing to send that were not used for an interval (at most
//! every 100 ms; an evicted one is read back from Redis at the next sync after its next
//! use), and if it is still full counts on its policy's overflow counter
//! ([`Window::overflow_key`]), in Redis like any other, as the memory table does.
//!
//! # Redis down
//!
//! An error or timeout (250 ms) marks Redis down for one second: decisions then skip Redis.
//! A policy that fails open counts on the replica's local counters (logged, metric
//! `tollgate_ratelimit_fail_open_total`); one that fails closed gets
//! [`CounterError::Unavailable`] (503). After the second the next decision tries Redis again
//! (the connection reconnects by itself); counting resumes in Redis where it stood (local
//! counts made meanwhile are not merged back). In asynchronous mode the sync task probes a
//! down Redis every interval (so it stays marked down, and fail-closed policies keep
//! answering 503, until it answers), and pending counts are kept and sent once it does.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use super::memory::MemoryCounters;
use super::{
    Adjust, AdjustFuture, AdjustPending, Ask, Clock, CounterError, Decision, Mode, Pending,
    SystemClock, Window, RL_METRICS,
};
use crate::store::Backend;

/// Longest wait for one decision's round trip.
const DECIDE_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest wait for one asynchronous sync batch.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the backend is left alone after an error.
const DOWN_FOR_MS: i64 = 1000;
/// Counters sent per batch in asynchronous mode.
const BATCH: usize = 1000;

/// Synchronous or asynchronous counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Sync,
    Async { interval: Duration },
}

/// A quota counter mirrored locally in asynchronous mode.
#[derive(Debug, Clone)]
struct Mirror {
    ask: Ask,
    /// The total Redis returned at the last sync.
    remote: u64,
    /// Counted here and not sent yet.
    pending: u64,
    /// Sent in the batch now in flight (still counted here until Redis answers).
    inflight: u64,
    /// Refunds of reservations already sent (or in flight), to send as an adjustment.
    debit: u64,
    expiry: i64,
    touched: i64,
}

pub struct SharedCounters {
    backend: Arc<dyn Backend>,
    mode: SyncMode,
    /// Wall time (ms) until which Redis is considered down.
    down_until: AtomicI64,
    down: AtomicBool,
    /// Asynchronous mode: mirrors by (key, window start).
    mirrors: DashMap<(u128, i64), Mirror>,
    /// Entries in `mirrors` (`DashMap::len` locks every shard).
    mirror_count: AtomicUsize,
    max_mirrors: usize,
    /// When idle mirrors were last evicted to make room (ms).
    last_evict: AtomicI64,
}

impl std::fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCounters")
            .field("backend", &self.backend.kind())
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn wall_ms() -> i64 {
    SystemClock.now_ms()
}

impl SharedCounters {
    /// Counters in `backend` (connected already); in asynchronous mode this starts the
    /// sync task. `max_keys` bounds the asynchronous mirrors.
    pub fn new(backend: Arc<dyn Backend>, mode: SyncMode, max_keys: usize) -> Arc<Self> {
        // Both operations at 0 from the start, so a store-down alert has a series.
        for op in ["decide", "sync"] {
            RL_METRICS.redis_errors.with_label_values(&[op]);
        }
        let this = Arc::new(Self {
            backend,
            mode,
            down_until: AtomicI64::new(0),
            down: AtomicBool::new(false),
            mirrors: DashMap::new(),
            mirror_count: AtomicUsize::new(0),
            max_mirrors: max_keys.max(1),
            last_evict: AtomicI64::new(i64::MIN),
        });
        if let SyncMode::Async { interval } = mode {
            let weak = Arc::downgrade(&this);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last: Option<std::time::Instant> = None;
                loop {
                    tick.tick().await;
                    let Some(this) = weak.upgrade() else { return };
                    this.sync(wall_ms(), interval).await;
                    let now = std::time::Instant::now();
                    if let Some(prev) = last {
                        RL_METRICS
                            .sync_gap
                            .observe(now.duration_since(prev).as_secs_f64());
                    }
                    last = Some(now);
                }
            });
        }
        this
    }

    pub fn kind(&self) -> &'static str {
        match (self.backend.kind(), self.mode) {
            ("redis", SyncMode::Sync) => "redis-sync",
            ("redis", SyncMode::Async { .. }) => "redis-async",
            (_, SyncMode::Sync) => "shared-sync",
            (_, SyncMode::Async { .. }) => "shared-async",
        }
    }

    fn is_down(&self) -> bool {
        wall_ms() < self.down_until.load(Ordering::Relaxed)
    }

    fn mark_down(&self, op: &str, error: &str) {
        RL_METRICS.redis_errors.with_label_values(&[op]).inc();
        self.down_until
            .store(wall_ms() + DOWN_FOR_MS, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(backend = self.backend.kind(), %error, "redis counters unavailable; applying each policy's fail mode");
        }
    }

    fn mark_up(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(
                backend = self.backend.kind(),
                "redis counters available again"
            );
        }
    }

    /// Counts locally (fail open) or refuses (fail closed).
    fn fallback(ask: &Ask, local: &MemoryCounters) -> Result<Decision, CounterError> {
        if ask.fail_open {
            let mut d = local.apply(ask);
            d.degraded = true;
            Ok(d)
        } else {
            Err(CounterError::Unavailable(
                "the quota counter store (Redis) is unavailable".into(),
            ))
        }
    }

    pub fn decide(self: &Arc<Self>, ask: Ask, local: &Arc<MemoryCounters>) -> Pending {
        if self.is_down() {
            return Pending::Ready(Self::fallback(&ask, local));
        }
        match self.mode {
            SyncMode::Sync => {
                let this = self.clone();
                let local = local.clone();
                Pending::Wait(Box::pin(async move {
                    match this.eval(&ask).await {
                        Ok(d) => {
                            this.mark_up();
                            Ok(d)
                        }
                        Err(e) => {
                            this.mark_down("decide", &e);
                            Self::fallback(&ask, &local)
                        }
                    }
                }))
            }
            SyncMode::Async { .. } => Pending::Ready(Ok(self.decide_mirror(ask))),
        }
    }

    /// Adjusts what a reservation counted: synchronously in the backend, or on the mirror
    /// (asynchronous mode: a refund of counts already sent is kept as a debit and sent at
    /// the next sync, applied to the window current then). A reservation counted locally
    /// because the backend was down is adjusted by the caller on the local table.
    pub fn adjust(self: &Arc<Self>, adj: Adjust) -> AdjustPending {
        match self.mode {
            SyncMode::Sync => {
                if self.is_down() {
                    return AdjustPending::Ready(Err(CounterError::Unavailable(
                        "the quota counter store (Redis) is unavailable".into(),
                    )));
                }
                let this = self.clone();
                let fut: AdjustFuture = Box::pin(async move {
                    match tokio::time::timeout(
                        DECIDE_TIMEOUT,
                        this.backend.adjust(std::slice::from_ref(&adj)),
                    )
                    .await
                    {
                        Ok(Ok(v)) => {
                            this.mark_up();
                            Ok(v.first().copied().flatten())
                        }
                        Ok(Err(e)) => {
                            this.mark_down("adjust", &e.to_string());
                            Err(CounterError::Unavailable(e.to_string()))
                        }
                        Err(_) => {
                            this.mark_down("adjust", "timed out");
                            Err(CounterError::Unavailable("timed out".into()))
                        }
                    }
                });
                AdjustPending::Wait(fut)
            }
            SyncMode::Async { .. } => AdjustPending::Ready(Ok(self.adjust_mirror(&adj))),
        }
    }

    fn adjust_mirror(&self, adj: &Adjust) -> Option<u64> {
        let start = match adj.window {
            Window::Fixed { start, end } => {
                if adj.now >= end {
                    return None;
                }
                start
            }
            _ => 0,
        };
        let mut m = self.mirrors.get_mut(&(adj.key.0, start))?;
        if matches!(adj.window, Window::Flexi { .. })
            && (m.expiry != adj.counted_end || adj.now >= m.expiry)
        {
            return None;
        }
        let d = adj.delta.unsigned_abs();
        if adj.delta >= 0 {
            m.pending = m.pending.saturating_add(d);
        } else {
            let from_pending = d.min(m.pending);
            m.pending -= from_pending;
            m.debit = m.debit.saturating_add(d - from_pending);
        }
        Some(
            m.remote
                .saturating_add(m.inflight)
                .saturating_add(m.pending)
                .saturating_sub(m.debit),
        )
    }

    /// Asynchronous mode: sends the mirrors' debits as adjustments of their current window.
    async fn send_debits(&self, now: i64) {
        let mut debits = Vec::new();
        for e in self.mirrors.iter() {
            if e.debit > 0 {
                let m = e.value();
                debits.push((
                    *e.key(),
                    Adjust {
                        key: m.ask.key,
                        window: m.ask.window,
                        counted_at: now,
                        counted_end: m.expiry,
                        delta: -i64::try_from(m.debit).unwrap_or(i64::MAX),
                        now,
                    },
                ));
            }
        }
        for (k, _) in &debits {
            if let Some(mut m) = self.mirrors.get_mut(k) {
                m.debit = 0;
            }
        }
        if debits.is_empty() {
            return;
        }
        let adjusts: Vec<Adjust> = debits.iter().map(|(_, a)| *a).collect();
        match tokio::time::timeout(SYNC_TIMEOUT, self.backend.adjust(&adjusts)).await {
            Ok(Ok(_)) => {}
            other => {
                let e = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                self.mark_down("sync", &e);
                for (k, a) in debits {
                    if let Some(mut m) = self.mirrors.get_mut(&k) {
                        m.debit = m.debit.saturating_add(a.delta.unsigned_abs());
                    }
                }
            }
        }
    }

    async fn eval(&self, ask: &Ask) -> Result<Decision, String> {
        match tokio::time::timeout(
            DECIDE_TIMEOUT,
            self.backend.count(std::slice::from_ref(ask)),
        )
        .await
        {
            Ok(Ok(v)) => match v.first() {
                Some(Some(d)) => Ok(*d),
                _ => Err("unexpected reply".to_owned()),
            },
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} ms",
                DECIDE_TIMEOUT.as_millis()
            )),
        }
    }

    /// How many mirrors are held (asynchronous mode).
    pub fn mirrors(&self) -> usize {
        self.mirror_count.load(Ordering::Relaxed)
    }

    /// Drops mirrors with nothing pending or in flight that were not used for `idle_ms`.
    fn evict_idle(&self, now: i64, idle_ms: i64) {
        self.mirrors.retain(|_, m| {
            m.pending > 0
                || m.inflight > 0
                || m.debit > 0
                || now.saturating_sub(m.touched) < idle_ms
        });
        self.count_mirrors();
    }

    fn count_mirrors(&self) {
        let n = self.mirrors.len();
        self.mirror_count.store(n, Ordering::Relaxed);
        RL_METRICS.set_mirror_keys(n);
    }

    /// The mirror key of `ask`, switching `ask` to its overflow counter when the mirror
    /// table is full.
    fn mirror_key(&self, ask: &mut Ask) -> (u128, i64) {
        let start = match ask.window {
            Window::Fixed { start, .. } => start,
            _ => 0,
        };
        let k = (ask.key.0, start);
        if self.mirror_count.load(Ordering::Relaxed) < self.max_mirrors
            || self.mirrors.contains_key(&k)
        {
            return k;
        }
        let now = ask.now;
        let last = self.last_evict.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 100
            && self
                .last_evict
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let idle_ms = match self.mode {
                SyncMode::Async { interval } => {
                    i64::try_from(interval.as_millis()).unwrap_or(i64::MAX)
                }
                SyncMode::Sync => 0,
            };
            self.evict_idle(now, idle_ms);
        }
        if self.mirror_count.load(Ordering::Relaxed) < self.max_mirrors {
            return k;
        }
        RL_METRICS.overflow.inc();
        ask.key = ask.window.overflow_key(ask.overflow);
        (ask.key.0, start)
    }

    fn decide_mirror(&self, mut ask: Ask) -> Decision {
        let key = self.mirror_key(&mut ask);
        let now = ask.now;
        let mut m = match self.mirrors.entry(key) {
            dashmap::Entry::Occupied(o) => o.into_ref(),
            dashmap::Entry::Vacant(v) => {
                let n = self.mirror_count.fetch_add(1, Ordering::Relaxed) + 1;
                RL_METRICS.set_mirror_keys(n);
                v.insert(Mirror {
                    expiry: match ask.window {
                        Window::Fixed { end, .. } => end,
                        Window::Flexi { len } => now.saturating_add(len),
                        Window::Rolling { len } => now.saturating_add(Window::slot_len(len)),
                    },
                    ask: ask.clone(),
                    remote: 0,
                    pending: 0,
                    inflight: 0,
                    debit: 0,
                    touched: now,
                })
            }
        };
        if matches!(ask.window, Window::Flexi { .. })
            && now >= m.expiry
            && m.pending == 0
            && m.inflight == 0
        {
            // The flexi window passed; the next sync reads the new one.
            m.remote = 0;
            if let Window::Flexi { len } = ask.window {
                m.expiry = now.saturating_add(len);
            }
        }
        let used = m
            .remote
            .saturating_add(m.inflight)
            .saturating_add(m.pending)
            .saturating_sub(m.debit);
        let (allowed, add) = match ask.mode {
            Mode::EnforceAndCount => {
                let ok = used.saturating_add(ask.weight) <= ask.allow;
                (ok, if ok { ask.weight } else { 0 })
            }
            Mode::EnforceOnly => (used.saturating_add(ask.weight) <= ask.allow, 0),
            Mode::CountOnly => (true, ask.weight),
        };
        m.pending = m.pending.saturating_add(add);
        m.touched = now;
        m.ask.allow = ask.allow;
        Decision {
            allowed,
            used: used.saturating_add(add),
            expiry: m.expiry,
            degraded: false,
        }
    }

    /// Sends one batch of count-only calls, in one backend call.
    async fn send_batch(
        &self,
        chunk: &[((u128, i64), Ask, u64)],
        now: i64,
    ) -> Result<Vec<Option<Decision>>, String> {
        let asks: Vec<Ask> = chunk
            .iter()
            .map(|(_, ask, w)| Ask {
                now,
                weight: *w,
                mode: Mode::CountOnly,
                ..ask.clone()
            })
            .collect();
        self.backend.count(&asks).await.map_err(|e| e.to_string())
    }

    /// Asynchronous mode: sends pending counts, refreshes recently used mirrors, drops idle
    /// ones.
    pub async fn sync(&self, now: i64, interval: Duration) {
        // While the backend is down, probe it every tick: a failed probe keeps it marked
        // down (so fail-closed policies keep answering 503), a good one lets the batch go.
        if self.down.load(Ordering::Relaxed) {
            match tokio::time::timeout(DECIDE_TIMEOUT, self.backend.ping()).await {
                Ok(Ok(())) => self.mark_up(),
                Ok(Err(e)) => return self.mark_down("sync", &e.to_string()),
                Err(_) => return self.mark_down("sync", "PING timed out"),
            }
        }
        self.send_debits(now).await;
        let idle_after = i64::try_from(interval.as_millis())
            .unwrap_or(1000)
            .saturating_mul(20)
            .max(2000);
        let mut batch = Vec::new();
        self.mirrors.retain(|k, m| {
            let idle = now.saturating_sub(m.touched) > idle_after;
            if m.pending == 0 && m.inflight == 0 && m.debit == 0 && idle && now > m.expiry {
                return false;
            }
            if m.pending > 0 || !idle {
                batch.push((*k, m.ask.clone(), m.pending));
                m.inflight = m.pending;
                m.pending = 0;
            }
            true
        });
        self.count_mirrors();
        if batch.is_empty() {
            return;
        }
        for chunk in batch.chunks(BATCH) {
            let res = tokio::time::timeout(SYNC_TIMEOUT, self.send_batch(chunk, now)).await;
            let replies = match res {
                Ok(Ok(v)) if v.len() == chunk.len() => v,
                other => {
                    let e = match other {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(v)) => format!("{} replies for {} commands", v.len(), chunk.len()),
                        Err(_) => "timed out".to_owned(),
                    };
                    self.mark_down("sync", &e);
                    // Keep the counts for the next attempt.
                    for (k, _, _) in chunk {
                        if let Some(mut m) = self.mirrors.get_mut(k) {
                            m.pending = m.pending.saturating_add(m.inflight);
                            m.inflight = 0;
                        }
                    }
                    continue;
                }
            };
            self.mark_up();
            for ((k, _, _), v) in chunk.iter().zip(replies) {
                if let Some(mut m) = self.mirrors.get_mut(k) {
                    match v {
                        // The total includes what was in flight.
                        Some(d) => {
                            m.remote = d.used;
                            m.expiry = d.expiry;
                        }
                        None => m.pending = m.pending.saturating_add(m.inflight),
                    }
                    m.inflight = 0;
                }
            }
        }
    }
}
