//! In-memory counters: a sharded `DashMap` from [`Key`] (16 bytes, hashed identifiers) to a
//! small slot. A decision locks one shard for a few instructions; there is no global lock.
//!
//! Bounded: a slot is dropped once its window has passed (a sweep every second, and at once
//! when the table is full). When the table still holds `max_keys` live counters, new
//! identifiers share an overflow counter (`tollgate_ratelimit_overflow_total` counts those
//! decisions) rather than grow memory: a flood of distinct identifiers costs at most
//! `max_keys` slots (about 100 bytes each). There is one overflow counter per policy (or
//! `sharedName`) and window ([`super::Window::overflow_key`]), so a SpikeArrest and a Quota
//! in one flow never reset each other's and the overflow still limits.
//!
//! Checkpoints: fixed, flexi and rolling windows of a minute or longer are written (when
//! changed) to the store's backend and read back at start (see [`crate::ratelimit::memory`]),
//! so a restart keeps a day's or a month's count (losing at most one checkpoint interval of
//! counting). A failed checkpoint marks its rows changed again, so the next one retries.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::RefMut;
use dashmap::DashMap;

use super::{
    apply_delta, gcra_overflow_key, Adjust, Ask, Decision, Key, Mode, Window, RL_METRICS,
    ROLLING_SLOTS,
};

/// Live counters kept before new identifiers share an overflow counter.
pub const DEFAULT_MAX_KEYS: usize = 2_000_000;
/// Windows shorter than this are not checkpointed: they are over before a restart matters.
const CHECKPOINT_MIN_WINDOW: i64 = 60_000;
/// Checkpoint rows: key → start, end, count (little-endian i64, i64, u64: a fixed or flexi
/// window), or `r`, slot length, head, ten slot counts (a rolling window).
pub(crate) type Row = (u128, Vec<u8>);

#[derive(Debug, Clone)]
enum Slot {
    /// Fixed and flexi windows.
    Window {
        start: i64,
        end: i64,
        count: u64,
        /// Changed since the last checkpoint.
        dirty: bool,
    },
    Rolling(Box<Rolling>),
    /// Spike arrest's theoretical arrival time, in microseconds.
    Gcra {
        tat_us: i64,
    },
}

#[derive(Debug, Clone)]
struct Rolling {
    slot_len: i64,
    /// Index (time / slot_len) of the newest slot.
    head: i64,
    counts: [u64; ROLLING_SLOTS as usize],
    /// Changed since the last checkpoint.
    dirty: bool,
}

impl Rolling {
    fn new(len: i64, now: i64) -> Self {
        let slot_len = Window::slot_len(len);
        Self {
            slot_len,
            head: now.div_euclid(slot_len),
            counts: [0; ROLLING_SLOTS as usize],
            dirty: false,
        }
    }

    /// When the newest count leaves the window: after that the slot is as good as fresh.
    fn expires(&self) -> i64 {
        (self.head + 1 + ROLLING_SLOTS).saturating_mul(self.slot_len)
    }

    /// The window length this slot was made for, as checkpoints compare it.
    fn len(&self) -> i64 {
        self.slot_len.saturating_mul(ROLLING_SLOTS)
    }

    /// Moves the head to `now`, clearing the slots that left the window.
    fn advance(&mut self, now: i64) {
        let cur = now.div_euclid(self.slot_len);
        if cur <= self.head {
            return;
        }
        if cur - self.head >= ROLLING_SLOTS {
            self.counts = [0; ROLLING_SLOTS as usize];
        } else {
            for i in self.head + 1..=cur {
                self.counts[i.rem_euclid(ROLLING_SLOTS) as usize] = 0;
            }
        }
        self.head = cur;
    }

    fn sum(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    fn add(&mut self, w: u64) {
        if w == 0 {
            return;
        }
        let i = self.head.rem_euclid(ROLLING_SLOTS) as usize;
        self.counts[i] = self.counts[i].saturating_add(w);
        self.dirty = true;
    }

    /// When the oldest slot leaves the window.
    fn next_drop(&self) -> i64 {
        (self.head + 1).saturating_mul(self.slot_len)
    }

    /// When `weight` more fits under `allow` again: the end of the first slot, oldest
    /// first, whose counts leaving bring the sum low enough. The next slot's end is only
    /// right when the oldest slot alone frees enough; telling a refused client that makes
    /// it retry into refusals. A weight larger than `allow` never fits: when everything
    /// counted now has left.
    fn fits_again(&self, weight: u64, allow: u64) -> i64 {
        let mut left = self.sum();
        for i in self.head - ROLLING_SLOTS + 1..=self.head {
            left = left.saturating_sub(self.counts[i.rem_euclid(ROLLING_SLOTS) as usize]);
            if left.saturating_add(weight) <= allow {
                return (i + ROLLING_SLOTS).saturating_mul(self.slot_len);
            }
        }
        (self.head + ROLLING_SLOTS).saturating_mul(self.slot_len)
    }
}

impl Slot {
    /// After this time the slot is indistinguishable from a fresh one.
    fn expires(&self) -> i64 {
        match self {
            Slot::Window { end, .. } => *end,
            Slot::Rolling(r) => r.expires(),
            Slot::Gcra { tat_us } => tat_us / 1000 + 1,
        }
    }
}

/// `used + weight <= allow` for enforcing modes; what to add if admitted.
fn judge(used: u64, ask: &Ask) -> (bool, u64) {
    match ask.mode {
        Mode::EnforceAndCount => {
            let ok = used.saturating_add(ask.weight) <= ask.allow;
            (ok, if ok { ask.weight } else { 0 })
        }
        Mode::EnforceOnly => (used.saturating_add(ask.weight) <= ask.allow, 0),
        Mode::CountOnly => (true, ask.weight),
    }
}

pub struct MemoryCounters {
    map: DashMap<Key, Slot>,
    /// Entries in `map`, kept here: `DashMap::len` locks every shard.
    live: AtomicUsize,
    max_keys: usize,
    last_sweep: AtomicI64,
}

impl std::fmt::Debug for MemoryCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCounters")
            .field("len", &self.map.len())
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl MemoryCounters {
    pub fn new(max_keys: usize) -> Self {
        Self {
            map: DashMap::new(),
            live: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
            last_sweep: AtomicI64::new(i64::MIN),
        }
    }

    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `key`, or the policy's overflow counter when the table is full of live counters.
    fn admit_key(&self, key: Key, now: i64, overflow: impl FnOnce() -> Key) -> Key {
        if self.live.load(Ordering::Relaxed) < self.max_keys || self.map.contains_key(&key) {
            return key;
        }
        // Full: drop expired counters (at most once per 100 ms; a sweep walks the table).
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 100
            && self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep(now);
        }
        if self.live.load(Ordering::Relaxed) < self.max_keys {
            return key;
        }
        RL_METRICS.overflow.inc();
        overflow()
    }

    /// The slot of `key`, created (as `fresh`) when missing.
    fn slot(&self, key: Key, fresh: Slot) -> RefMut<'_, Key, Slot> {
        match self.map.entry(key) {
            Entry::Occupied(o) => o.into_ref(),
            Entry::Vacant(v) => {
                self.live.fetch_add(1, Ordering::Relaxed);
                v.insert(fresh)
            }
        }
    }

    /// Drops every counter whose window has passed.
    pub fn sweep(&self, now: i64) {
        self.map.retain(|_, s| s.expires() > now);
        let n = self.map.len();
        self.live.store(n, Ordering::Relaxed);
        RL_METRICS.set_memory_keys(n);
    }

    /// Decides a quota ask on the local counter. A count-only ask of weight 0 only reads
    /// (it creates no counter, so reading a flexi window does not start one), as the Redis
    /// script does.
    pub fn apply(&self, ask: &Ask) -> Decision {
        if ask.weight == 0 && ask.mode == Mode::CountOnly {
            return self.peek(ask);
        }
        let now = ask.now;
        let key = self.admit_key(ask.key, now, || ask.window.overflow_key(ask.overflow));
        let mut entry = self.slot(key, Slot::Gcra { tat_us: 0 });
        let slot = entry.value_mut();
        match ask.window {
            Window::Fixed { start, end } => {
                if !matches!(slot, Slot::Window { start: s, .. } if *s == start) {
                    *slot = Slot::Window {
                        start,
                        end,
                        count: 0,
                        dirty: false,
                    };
                }
            }
            Window::Flexi { len } => {
                if !matches!(slot, Slot::Window { end, .. } if now < *end) {
                    *slot = Slot::Window {
                        start: now,
                        end: now.saturating_add(len),
                        count: 0,
                        dirty: false,
                    };
                }
            }
            Window::Rolling { len } => {
                let fresh =
                    !matches!(slot, Slot::Rolling(r) if r.slot_len == Window::slot_len(len));
                if fresh {
                    *slot = Slot::Rolling(Box::new(Rolling::new(len, now)));
                }
            }
        }
        match slot {
            Slot::Window {
                end, count, dirty, ..
            } => {
                let (allowed, add) = judge(*count, ask);
                if add > 0 {
                    *count = count.saturating_add(add);
                    *dirty = true;
                }
                Decision {
                    allowed,
                    used: *count,
                    expiry: *end,
                    degraded: false,
                }
            }
            Slot::Rolling(r) => {
                r.advance(now);
                let (allowed, add) = judge(r.sum(), ask);
                r.add(add);
                Decision {
                    allowed,
                    used: r.sum(),
                    expiry: if allowed {
                        r.next_drop()
                    } else {
                        r.fits_again(ask.weight, ask.allow)
                    },
                    degraded: false,
                }
            }
            Slot::Gcra { .. } => unreachable_window(ask),
        }
    }

    /// What `ask`'s counter holds now, without creating or changing it.
    fn peek(&self, ask: &Ask) -> Decision {
        let now = ask.now;
        let fresh = |expiry| Decision {
            allowed: true,
            used: 0,
            expiry,
            degraded: false,
        };
        let empty = match ask.window {
            Window::Fixed { end, .. } => end,
            Window::Flexi { len } => now.saturating_add(len),
            Window::Rolling { len } => {
                let slot = Window::slot_len(len);
                (now.div_euclid(slot) + 1).saturating_mul(slot)
            }
        };
        let Some(slot) = self.map.get(&ask.key) else {
            return fresh(empty);
        };
        match (ask.window, slot.value()) {
            (
                Window::Fixed { start, end },
                Slot::Window {
                    start: s, count, ..
                },
            ) if *s == start => Decision {
                allowed: true,
                used: *count,
                expiry: end,
                degraded: false,
            },
            (Window::Flexi { .. }, Slot::Window { end, count, .. }) if now < *end => Decision {
                allowed: true,
                used: *count,
                expiry: *end,
                degraded: false,
            },
            (Window::Rolling { len }, Slot::Rolling(r)) if r.slot_len == Window::slot_len(len) => {
                let mut r = r.clone();
                r.advance(now);
                Decision {
                    allowed: true,
                    used: r.sum(),
                    expiry: r.next_drop(),
                    degraded: false,
                }
            }
            _ => fresh(empty),
        }
    }

    /// Adds `adj.delta` to the window (or rolling slot) a reservation counted in, never
    /// below 0. `None` when that window has passed (or the counter is gone): the
    /// adjustment is moot. Otherwise the window's count after it.
    pub fn adjust(&self, adj: &Adjust) -> Option<u64> {
        let now = adj.now;
        let mut entry = self.map.get_mut(&adj.key)?;
        match (adj.window, entry.value_mut()) {
            (
                Window::Fixed { start, end },
                Slot::Window {
                    start: s,
                    count,
                    dirty,
                    ..
                },
            ) if *s == start && now < end => {
                *count = apply_delta(*count, adj.delta);
                *dirty = true;
                Some(*count)
            }
            (
                Window::Flexi { .. },
                Slot::Window {
                    end, count, dirty, ..
                },
            ) if *end == adj.counted_end && now < *end => {
                *count = apply_delta(*count, adj.delta);
                *dirty = true;
                Some(*count)
            }
            (Window::Rolling { len }, Slot::Rolling(r)) if r.slot_len == Window::slot_len(len) => {
                r.advance(now);
                let slot = adj.counted_at.div_euclid(r.slot_len);
                if slot <= r.head - ROLLING_SLOTS || slot > r.head {
                    return None;
                }
                let i = slot.rem_euclid(ROLLING_SLOTS) as usize;
                r.counts[i] = apply_delta(r.counts[i], adj.delta);
                r.dirty = true;
                Some(r.sum())
            }
            _ => None,
        }
    }

    /// Spike arrest without bursts (GCRA with no tolerance): admits when the theoretical
    /// arrival time has come, then moves it `weight × emission` on. `Err` carries the ms to
    /// wait. A weight larger than one is admitted whole and delays the next request more.
    /// `overflow` is the policy's overflow namespace (see [`Ask::overflow`]).
    pub fn gcra(
        &self,
        key: Key,
        overflow: Key,
        emission_us: i64,
        weight: u64,
        now_us: i64,
    ) -> Result<(), i64> {
        let key = self.admit_key(key, now_us.div_euclid(1000), || {
            gcra_overflow_key(overflow, emission_us)
        });
        let mut entry = self.slot(key, Slot::Gcra { tat_us: 0 });
        let slot = entry.value_mut();
        let tat = match slot {
            Slot::Gcra { tat_us } => *tat_us,
            _ => 0,
        };
        if tat > now_us {
            return Err((tat - now_us + 999) / 1000);
        }
        let step = emission_us.saturating_mul(i64::try_from(weight).unwrap_or(i64::MAX));
        *slot = Slot::Gcra {
            tat_us: now_us.saturating_add(step),
        };
        Ok(())
    }

    /// Puts back checkpoint rows read from a backend; returns how many are still live.
    pub(crate) fn restore_rows(&self, rows: Vec<Row>, now: i64) -> usize {
        let mut n = 0;
        for (k, v) in rows {
            let Some(slot) = decode(&v) else {
                continue;
            };
            if slot.expires() <= now {
                continue;
            }
            if self.map.insert(Key(k), slot).is_none() {
                self.live.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
        n
    }

    /// Collects the changed windows of a minute or longer, clearing their flag.
    pub(crate) fn take_changed(&self, now: i64) -> Vec<Row> {
        let mut changed = Vec::new();
        for mut e in self.map.iter_mut() {
            let key = e.key().0;
            match e.value_mut() {
                Slot::Window {
                    start,
                    end,
                    count,
                    dirty,
                } => {
                    if *dirty && *end > now && *end - *start >= CHECKPOINT_MIN_WINDOW {
                        *dirty = false;
                        changed.push((key, encode_window(*start, *end, *count)));
                    }
                }
                Slot::Rolling(r) => {
                    if r.dirty && r.expires() > now && r.len() >= CHECKPOINT_MIN_WINDOW {
                        r.dirty = false;
                        changed.push((key, encode_rolling(r)));
                    }
                }
                Slot::Gcra { .. } => {}
            }
        }
        changed
    }

    /// Hands `changed` to `write`; if it fails they are marked changed again (a count that
    /// moved meanwhile was marked by its decision anyway), so the next checkpoint writes them.
    pub(crate) async fn write_changed<F, Fut>(
        &self,
        changed: Vec<Row>,
        write: F,
    ) -> Result<usize, String>
    where
        F: FnOnce(Vec<Row>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let keys: Vec<u128> = changed.iter().map(|(k, _)| *k).collect();
        if let Err(e) = write(changed).await {
            for k in &keys {
                if let Some(mut s) = self.map.get_mut(&Key(*k)) {
                    match s.value_mut() {
                        Slot::Window { dirty, .. } => *dirty = true,
                        Slot::Rolling(r) => r.dirty = true,
                        Slot::Gcra { .. } => {}
                    }
                }
            }
            return Err(e);
        }
        Ok(keys.len())
    }
}

/// Whether a checkpoint row is still live at `now` (the others are dropped).
pub(crate) fn row_is_live(v: &[u8], now: i64) -> bool {
    decode(v).is_some_and(|s| s.expires() > now)
}

/// A slot was just made to fit the window; this cannot happen.
fn unreachable_window(ask: &Ask) -> Decision {
    tracing::error!(?ask, "counter slot does not match its window");
    Decision {
        allowed: true,
        used: 0,
        expiry: ask.now,
        degraded: false,
    }
}

fn encode_window(start: i64, end: i64, count: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&start.to_le_bytes());
    v.extend_from_slice(&end.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v
}

/// Rolling rows start with `r` and are longer than window rows (24 bytes), which older
/// builds wrote without a tag.
fn encode_rolling(r: &Rolling) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + 8 * r.counts.len());
    v.push(b'r');
    v.extend_from_slice(&r.slot_len.to_le_bytes());
    v.extend_from_slice(&r.head.to_le_bytes());
    for c in r.counts {
        v.extend_from_slice(&c.to_le_bytes());
    }
    v
}

fn decode(v: &[u8]) -> Option<Slot> {
    let n = |i: usize| -> Option<[u8; 8]> { v.get(i..i + 8)?.try_into().ok() };
    if v.len() == 24 {
        return Some(Slot::Window {
            start: i64::from_le_bytes(n(0)?),
            end: i64::from_le_bytes(n(8)?),
            count: u64::from_le_bytes(n(16)?),
            dirty: false,
        });
    }
    if v.len() != 17 + 8 * ROLLING_SLOTS as usize || v.first() != Some(&b'r') {
        return None;
    }
    let mut counts = [0u64; ROLLING_SLOTS as usize];
    for (i, c) in counts.iter_mut().enumerate() {
        *c = u64::from_le_bytes(n(17 + 8 * i)?);
    }
    let slot_len = i64::from_le_bytes(n(1)?);
    if slot_len < 1 {
        return None;
    }
    Some(Slot::Rolling(Box::new(Rolling {
        slot_len,
        head: i64::from_le_bytes(n(9)?),
        counts,
        dirty: false,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::counters::test_ask as ask;

    #[test]
    fn fixed_window_counts_to_the_limit_and_resets_on_the_next_window() {
        let c = MemoryCounters::new(100);
        let w = Window::Fixed {
            start: 0,
            end: 60_000,
        };
        for i in 1..=3 {
            let d = c.apply(&ask(1, w, 3, 1, Mode::EnforceAndCount, 59_999));
            assert!(d.allowed);
            assert_eq!(d.used, i);
            assert_eq!(d.expiry, 60_000);
        }
        let d = c.apply(&ask(1, w, 3, 1, Mode::EnforceAndCount, 59_999));
        assert!(!d.allowed);
        assert_eq!(d.used, 3, "a refused request is not counted");
        let next = Window::Fixed {
            start: 60_000,
            end: 120_000,
        };
        let d = c.apply(&ask(1, next, 3, 1, Mode::EnforceAndCount, 60_000));
        assert!(d.allowed);
        assert_eq!(d.used, 1);
    }

    #[test]
    fn weights_and_shared_halves() {
        let c = MemoryCounters::new(100);
        let w = Window::Fixed {
            start: 0,
            end: 1000,
        };
        // Enforce only: admits while under the limit, counts nothing.
        assert!(c.apply(&ask(2, w, 10, 1, Mode::EnforceOnly, 0)).allowed);
        assert_eq!(c.apply(&ask(2, w, 10, 1, Mode::EnforceOnly, 0)).used, 0);
        // Count only: always admits, counts even past the limit.
        let d = c.apply(&ask(2, w, 10, 12, Mode::CountOnly, 1));
        assert!(d.allowed);
        assert_eq!(d.used, 12);
        assert!(!c.apply(&ask(2, w, 10, 1, Mode::EnforceOnly, 2)).allowed);
        // A weight that does not fit is refused whole.
        let w2 = Window::Fixed {
            start: 0,
            end: 1000,
        };
        assert!(
            c.apply(&ask(3, w2, 10, 7, Mode::EnforceAndCount, 0))
                .allowed
        );
        assert!(
            !c.apply(&ask(3, w2, 10, 4, Mode::EnforceAndCount, 0))
                .allowed
        );
        assert!(
            c.apply(&ask(3, w2, 10, 3, Mode::EnforceAndCount, 0))
                .allowed
        );
    }

    #[test]
    fn flexi_window_starts_at_the_first_request() {
        let c = MemoryCounters::new(100);
        let w = Window::Flexi { len: 1000 };
        let d = c.apply(&ask(4, w, 1, 1, Mode::EnforceAndCount, 5_250));
        assert!(d.allowed);
        assert_eq!(d.expiry, 6_250);
        assert!(
            !c.apply(&ask(4, w, 1, 1, Mode::EnforceAndCount, 6_249))
                .allowed
        );
        let d = c.apply(&ask(4, w, 1, 1, Mode::EnforceAndCount, 6_250));
        assert!(d.allowed);
        assert_eq!(d.expiry, 7_250);
    }

    #[test]
    fn rolling_window_never_admits_more_than_the_limit_in_any_span() {
        let c = MemoryCounters::new(100);
        let w = Window::Rolling { len: 1000 };
        // 5 allowed per second; slots of 100 ms.
        for t in [0, 100, 200, 300, 400] {
            assert!(c.apply(&ask(5, w, 5, 1, Mode::EnforceAndCount, t)).allowed);
        }
        assert!(
            !c.apply(&ask(5, w, 5, 1, Mode::EnforceAndCount, 999))
                .allowed
        );
        // The request at 0 stops counting when its slot leaves: at 1000.
        let d = c.apply(&ask(5, w, 5, 1, Mode::EnforceAndCount, 1000));
        assert!(d.allowed, "{d:?}");
        assert!(
            !c.apply(&ask(5, w, 5, 1, Mode::EnforceAndCount, 1099))
                .allowed
        );
        assert!(
            c.apply(&ask(5, w, 5, 1, Mode::EnforceAndCount, 1100))
                .allowed
        );
        // Long idle: everything has left.
        assert_eq!(
            c.apply(&ask(5, w, 5, 1, Mode::EnforceAndCount, 10_000))
                .used,
            1
        );
    }

    #[test]
    fn a_refused_rolling_request_is_told_when_capacity_returns() {
        let c = MemoryCounters::new(100);
        let w = Window::Rolling { len: 1000 };
        // Slots of 100 ms: one request at 0, four at 450.
        assert!(c.apply(&ask(7, w, 5, 1, Mode::EnforceAndCount, 0)).allowed);
        for _ in 0..4 {
            assert!(
                c.apply(&ask(7, w, 5, 1, Mode::EnforceAndCount, 450))
                    .allowed
            );
        }
        // At 500 the window is full. One more fits once the request at 0 has left (1000);
        // two more only once the four at 450 (slot 400..500) have left (1400), not at the
        // next slot's end (600).
        let d = c.apply(&ask(7, w, 5, 1, Mode::EnforceAndCount, 500));
        assert!(!d.allowed);
        assert_eq!(d.expiry, 1000);
        let d = c.apply(&ask(7, w, 5, 2, Mode::EnforceAndCount, 500));
        assert!(!d.allowed);
        assert_eq!(d.expiry, 1400, "{d:?}");
        // Retrying at the time announced is admitted; a moment before is not.
        assert!(
            !c.apply(&ask(7, w, 5, 2, Mode::EnforceAndCount, 1399))
                .allowed
        );
        assert!(
            c.apply(&ask(7, w, 5, 2, Mode::EnforceAndCount, 1400))
                .allowed
        );
        // A weight above the limit never fits: the answer is when everything has left.
        let d = c.apply(&ask(7, w, 5, 9, Mode::EnforceAndCount, 1400));
        assert!(!d.allowed);
        assert_eq!(d.expiry, 2400);
    }

    #[test]
    fn adjustments_land_in_the_window_they_counted_in_and_never_go_below_zero() {
        let c = MemoryCounters::new(100);
        let w = Window::Fixed {
            start: 0,
            end: 1000,
        };
        let a = ask(11, w, 100, 60, Mode::EnforceAndCount, 10);
        let d = c.apply(&a);
        let adj = |delta, now| Adjust {
            delta,
            now,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(c.adjust(&adj(-45, 20)), Some(15), "a refund");
        assert_eq!(c.adjust(&adj(10, 30)), Some(25), "an excess counts too");
        assert_eq!(c.adjust(&adj(-1_000, 40)), Some(0), "never below zero");
        assert_eq!(c.adjust(&adj(-1, 1000)), None, "the window is over: moot");
        // Flexi: only the window it counted in.
        let f = Window::Flexi { len: 1000 };
        let a = ask(12, f, 100, 50, Mode::EnforceAndCount, 0);
        let d = c.apply(&a);
        let adj = |delta, now| Adjust {
            delta,
            now,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(c.adjust(&adj(-20, 500)), Some(30));
        c.apply(&ask(12, f, 100, 5, Mode::EnforceAndCount, 1500));
        assert_eq!(
            c.adjust(&adj(-20, 1600)),
            None,
            "a later window is not touched"
        );
        assert_eq!(c.apply(&ask(12, f, 100, 0, Mode::CountOnly, 1600)).used, 5);
        // Rolling: the slot it counted in, until that slot leaves.
        let r = Window::Rolling { len: 1000 };
        let a = ask(13, r, 100, 40, Mode::EnforceAndCount, 50);
        let d = c.apply(&a);
        c.apply(&ask(13, r, 100, 7, Mode::EnforceAndCount, 450));
        let adj = |delta, now| Adjust {
            delta,
            now,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(c.adjust(&adj(-30, 500)), Some(17));
        assert_eq!(c.apply(&ask(13, r, 100, 0, Mode::CountOnly, 999)).used, 17);
        assert_eq!(c.adjust(&adj(-5, 1000)), None, "its slot left the window");
        assert_eq!(c.apply(&ask(13, r, 100, 0, Mode::CountOnly, 1000)).used, 7);
    }

    #[test]
    fn a_zero_count_only_ask_reads_without_creating_a_counter() {
        let c = MemoryCounters::new(100);
        let f = Window::Flexi { len: 1000 };
        let d = c.apply(&ask(14, f, 10, 0, Mode::CountOnly, 100));
        assert_eq!((d.allowed, d.used, d.expiry), (true, 0, 1100));
        assert!(c.is_empty(), "reading did not start a window");
        c.apply(&ask(14, f, 10, 3, Mode::EnforceAndCount, 500));
        let d = c.apply(&ask(14, f, 10, 0, Mode::CountOnly, 700));
        assert_eq!((d.used, d.expiry), (3, 1500));
    }

    #[test]
    fn gcra_smooths_without_burst() {
        let c = MemoryCounters::new(100);
        // 10 per second: one per 100 ms.
        let ms = |m: i64| m * 1000;
        assert!(c.gcra(Key(6), Key(9_999), 100_000, 1, ms(0)).is_ok());
        assert_eq!(c.gcra(Key(6), Key(9_999), 100_000, 1, ms(1)), Err(99));
        assert_eq!(c.gcra(Key(6), Key(9_999), 100_000, 1, ms(99)), Err(1));
        assert!(c.gcra(Key(6), Key(9_999), 100_000, 1, ms(100)).is_ok());
        // A weight of 3 is admitted and holds the next one back 300 ms.
        assert!(c.gcra(Key(6), Key(9_999), 100_000, 3, ms(200)).is_ok());
        assert!(c.gcra(Key(6), Key(9_999), 100_000, 1, ms(499)).is_err());
        assert!(c.gcra(Key(6), Key(9_999), 100_000, 1, ms(500)).is_ok());
        // 10 000 per second: one every 100 µs, within one millisecond.
        assert!(c.gcra(Key(7), Key(9_999), 100, 1, 1_000_000).is_ok());
        assert!(c.gcra(Key(7), Key(9_999), 100, 1, 1_000_099).is_err());
        assert!(c.gcra(Key(7), Key(9_999), 100, 1, 1_000_100).is_ok());
    }

    #[test]
    fn bounded_table_sweeps_then_overflows() {
        let c = MemoryCounters::new(10);
        let w = Window::Fixed {
            start: 0,
            end: 1000,
        };
        for k in 1..=10 {
            c.apply(&ask(100 + k, w, 5, 1, Mode::EnforceAndCount, 0));
        }
        assert_eq!(c.len(), 10);
        // Full of live counters: a new identifier shares the overflow counter.
        c.apply(&ask(500, w, 5, 1, Mode::EnforceAndCount, 10));
        assert!(c.len() <= 11);
        assert!(c.map.contains_key(&w.overflow_key(Key(9_999))));
        // Once those windows pass, the sweep makes room.
        let w2 = Window::Fixed {
            start: 1000,
            end: 2000,
        };
        c.apply(&ask(600, w2, 5, 1, Mode::EnforceAndCount, 1500));
        assert!(c.map.contains_key(&Key(600)));
        assert!(c.len() <= 2);
    }

    /// A full table: a spike arrest (rolling and GCRA) and two quotas (fixed and flexi) send
    /// new identifiers to overflow counters that keep limiting, without resetting each other.
    #[test]
    fn overflow_counters_are_per_policy_and_window_and_still_limit() {
        let c = MemoryCounters::new(4);
        let hour = Window::Fixed {
            start: 0,
            end: 3_600_000,
        };
        let flexi = Window::Flexi { len: 60_000 };
        let spike = Window::Rolling { len: 1000 };
        for k in 1..=4 {
            c.apply(&ask(k, hour, 1_000, 1, Mode::EnforceAndCount, 0));
        }
        let (quota_a, quota_b, spike_ns) = (Key(71), Key(72), Key(73));
        let mut admitted = [0; 4];
        for i in 0..40u128 {
            // Interleaved, each from a new identifier: all overflow.
            let mut q = ask(1_000 + i, hour, 5, 1, Mode::EnforceAndCount, 10);
            q.overflow = quota_a;
            admitted[0] += usize::from(c.apply(&q).allowed);
            let mut s = ask(2_000 + i, spike, 3, 1, Mode::EnforceAndCount, 10);
            s.overflow = spike_ns;
            admitted[1] += usize::from(c.apply(&s).allowed);
            let mut f = ask(3_000 + i, flexi, 7, 1, Mode::EnforceAndCount, 10);
            f.overflow = quota_b;
            admitted[2] += usize::from(c.apply(&f).allowed);
            admitted[3] +=
                usize::from(c.gcra(Key(4_000 + i), spike_ns, 100_000, 1, 10_000).is_ok());
        }
        assert_eq!(
            admitted,
            [5, 3, 7, 1],
            "each overflow counter enforces its own limit"
        );
        // The same policy with another window length has its own overflow counter too.
        let mut q = ask(
            5_000,
            Window::Fixed {
                start: 0,
                end: 60_000,
            },
            2,
            1,
            Mode::EnforceAndCount,
            10,
        );
        q.overflow = quota_a;
        assert!(c.apply(&q).allowed);
        assert!(c.apply(&q).allowed);
        assert!(!c.apply(&q).allowed);
        let mut q = ask(5_001, hour, 5, 1, Mode::EnforceAndCount, 20);
        q.overflow = quota_a;
        assert_eq!(
            c.apply(&q).used,
            5,
            "the hour's overflow count was not reset"
        );
    }
}
