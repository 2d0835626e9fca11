//! A value fetched from elsewhere and kept fresh: the one refresh-and-back-off cache behind
//! remote JWKS sets ([`crate::jwks`]) and Google tokens ([`crate::google`]).
//!
//! A [`Slot`] holds at most one value with two times, both set by the [`Source`] that
//! fetched it: `refresh_at`, from which one background fetch replaces it while callers
//! keep using it, and `usable_until` (none: no bound), past which it is no longer served.
//! Fetches are single-flight: callers that find no usable value wait for the one fetch in
//! flight instead of starting their own. After a failed fetch, no new attempt is made for
//! the back-off interval: callers get the failure at once instead of queueing on a source
//! that is down. A caller that needs a newer value than a usable one (a JWT naming a key
//! the set lacks) may force a fetch, at most once per forced interval.
//!
//! Time is tokio's clock, so tests can pause and advance it.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tokio::time::Instant;

/// Why a fetch happens (for the source's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Nothing is held yet.
    Initial,
    /// The held value is due for refresh or no longer usable.
    Due,
    /// A caller forced it (see [`Slot::refresh`]).
    Forced,
}

/// A freshly fetched value and its times.
#[derive(Debug)]
pub struct Entry<T> {
    pub value: T,
    refresh_at: Instant,
    usable_until: Option<Instant>,
}

impl<T> Entry<T> {
    /// `value`, refreshed from `refresh_at` on and served until `usable_until` (none: as long
    /// as no newer value replaces it).
    pub fn new(value: T, refresh_at: Instant, usable_until: Option<Instant>) -> Self {
        Self {
            value,
            refresh_at,
            usable_until,
        }
    }

    fn usable(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|u| now < u)
    }
}

impl<T> std::ops::Deref for Entry<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// Where a slot's value comes from.
pub trait Source: Display + Send + Sync + 'static {
    type Value: Send + Sync + 'static;
    type Error: Clone + Display + Send + Sync + 'static;
    /// One attempt to fetch the value.
    fn fetch(
        &self,
        why: Why,
    ) -> impl Future<Output = Result<Entry<Self::Value>, Self::Error>> + Send;
}

/// How long a slot waits between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    /// After a failed fetch, no new attempt for this long.
    pub backoff: Duration,
    /// Least time between two forced fetches.
    pub forced: Duration,
}

/// Why [`Slot::refresh`] has no value to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused<E> {
    /// This fetch failed.
    Failed(E),
    /// The last fetch failed less than the back-off interval ago (its error); none was made.
    BackingOff(E),
    /// A forced fetch less than the forced interval after the last one; none was made.
    TooSoon,
}

/// What [`Slot::get`] can answer without waiting.
#[derive(Debug)]
pub enum Cached<T, E> {
    Ready(Arc<Entry<T>>),
    /// No usable value: call [`Slot::refresh`].
    Missing,
    /// The last fetch failed a moment ago: fail without a new attempt.
    Failed(E),
}

struct State<E> {
    /// A background refresh is running.
    background: bool,
    last_failure: Option<(Instant, E)>,
    last_forced: Option<Instant>,
}

/// One cached value and its refresh machinery.
pub struct Slot<S: Source> {
    source: S,
    intervals: Intervals,
    current: ArcSwapOption<Entry<S::Value>>,
    state: Mutex<State<S::Error>>,
    /// Held while fetching: concurrent refreshes wait for the one in flight.
    fetching: tokio::sync::Mutex<()>,
}

impl<S: Source> std::fmt::Debug for Slot<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("source", &format_args!("{}", self.source))
            .field("intervals", &self.intervals)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Slot<S> {
    pub fn new(source: S, intervals: Intervals) -> Self {
        Self {
            source,
            intervals,
            current: ArcSwapOption::empty(),
            state: Mutex::new(State {
                background: false,
                last_failure: None,
                last_forced: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// The held value, usable or not, without starting anything.
    pub fn peek(&self) -> Option<Arc<Entry<S::Value>>> {
        self.current.load_full()
    }

    /// The held value when usable; starts a background refresh when it is due.
    pub fn get(self: &Arc<Self>) -> Cached<S::Value, S::Error> {
        let now = Instant::now();
        if let Some(cur) = self.current.load_full() {
            if cur.usable(now) {
                if now >= cur.refresh_at {
                    self.refresh_in_background();
                }
                return Cached::Ready(cur);
            }
        }
        match self.recent_failure() {
            Some(e) => Cached::Failed(e),
            None => Cached::Missing,
        }
    }

    /// Starts fetching in the background when nothing is held yet (at configuration load).
    pub fn prefetch(self: &Arc<Self>) {
        if self.current.load().is_none() {
            self.refresh_in_background();
        }
    }

    fn recent_failure(&self) -> Option<S::Error> {
        let st = self.state.lock();
        st.last_failure
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.intervals.backoff)
            .map(|(_, e)| e.clone())
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut st = self.state.lock();
            // One at a time, and none while backing off after a failure.
            let backing_off = st
                .last_failure
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < self.intervals.backoff);
            if st.background || backing_off {
                return;
            }
            st.background = true;
        }
        let this = Arc::clone(self);
        handle.spawn(async move {
            if let Err(Refused::Failed(e)) = this.refresh(false).await {
                tracing::warn!(source = %this.source, error = %e, "background refresh failed");
            }
            this.state.lock().background = false;
        });
    }

    /// Fetches the value again, unless another caller did while this one waited (and that
    /// value is usable), or the last attempt failed under the back-off interval ago.
    /// `forced`: the caller needs a newer value even than a usable one; such fetches happen
    /// at most once per forced interval (the others are refused with [`Refused::TooSoon`]).
    pub async fn refresh(&self, forced: bool) -> Result<Arc<Entry<S::Value>>, Refused<S::Error>> {
        let before = self.current.load_full();
        let _guard = self.fetching.lock().await;
        let now_cur = self.current.load_full();
        if let Some(cur) = &now_cur {
            let replaced = before.as_ref().is_none_or(|b| !Arc::ptr_eq(b, cur));
            if replaced && cur.usable(Instant::now()) {
                return Ok(Arc::clone(cur));
            }
        }
        {
            let mut st = self.state.lock();
            if let Some((at, e)) = &st.last_failure {
                if at.elapsed() < self.intervals.backoff {
                    return Err(Refused::BackingOff(e.clone()));
                }
            }
            if forced {
                if st
                    .last_forced
                    .is_some_and(|t| t.elapsed() < self.intervals.forced)
                {
                    return Err(Refused::TooSoon);
                }
                st.last_forced = Some(Instant::now());
            }
        }
        let why = match (forced, &now_cur) {
            (true, _) => Why::Forced,
            (false, Some(_)) => Why::Due,
            (false, None) => Why::Initial,
        };
        match self.source.fetch(why).await {
            Ok(entry) => {
                let entry = Arc::new(entry);
                self.current.store(Some(Arc::clone(&entry)));
                self.state.lock().last_failure = None;
                Ok(entry)
            }
            Err(e) => {
                self.state.lock().last_failure = Some((Instant::now(), e.clone()));
                Err(Refused::Failed(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers its scripted results in order (then the last one again), after `delay`.
    struct Scripted {
        results: Mutex<Vec<Result<&'static str, &'static str>>>,
        calls: AtomicUsize,
        whys: Mutex<Vec<Why>>,
        delay: Duration,
        refresh_in: Duration,
        usable_for: Option<Duration>,
    }

    impl Display for Scripted {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("scripted")
        }
    }

    impl Source for Scripted {
        type Value = &'static str;
        type Error = String;
        async fn fetch(&self, why: Why) -> Result<Entry<&'static str>, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.whys.lock().push(why);
            tokio::time::sleep(self.delay).await;
            let r = {
                let mut r = self.results.lock();
                if r.len() > 1 {
                    r.remove(0)
                } else {
                    r[0]
                }
            };
            let now = Instant::now();
            match r {
                Ok(v) => Ok(Entry::new(
                    v,
                    now + self.refresh_in,
                    self.usable_for.map(|u| now + u),
                )),
                Err(e) => Err(e.to_owned()),
            }
        }
    }

    const SEC: Duration = Duration::from_secs(1);
    const INTERVALS: Intervals = Intervals {
        backoff: Duration::from_secs(5),
        forced: Duration::from_secs(30),
    };

    fn slot(
        results: &[Result<&'static str, &'static str>],
        usable_for: Option<Duration>,
    ) -> Arc<Slot<Scripted>> {
        Arc::new(Slot::new(
            Scripted {
                results: Mutex::new(results.to_vec()),
                calls: AtomicUsize::new(0),
                whys: Mutex::new(Vec::new()),
                delay: SEC,
                refresh_in: 10 * SEC,
                usable_for,
            },
            INTERVALS,
        ))
    }

    fn calls(s: &Slot<Scripted>) -> usize {
        s.source.calls.load(Ordering::SeqCst)
    }

    fn ready(c: Cached<&'static str, String>) -> Option<&'static str> {
        match c {
            Cached::Ready(e) => Some(e.value),
            _ => None,
        }
    }

    /// Lets spawned background refreshes run to completion (the paused clock auto-advances
    /// through their sleeps).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(2 * SEC).await;
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let s = slot(&[Ok("a"), Ok("b")], None);
        assert!(matches!(s.get(), Cached::Missing));
        let all = futures_util::future::join_all((0..8).map(|_| s.refresh(false))).await;
        for r in all {
            assert_eq!(r.map(|e| e.value), Ok("a"));
        }
        assert_eq!(calls(&s), 1);
        assert_eq!(*s.source.whys.lock(), [Why::Initial]);
        assert_eq!(ready(s.get()), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_expiry_in_the_background_and_serves_meanwhile() {
        let s = slot(&[Ok("a"), Ok("b")], Some(20 * SEC));
        s.refresh(false).await.unwrap();
        // Fresh: served, nothing fetched.
        tokio::time::advance(5 * SEC).await;
        assert_eq!(ready(s.get()), Some("a"));
        settle().await;
        assert_eq!(calls(&s), 1);
        // Due (past refresh_at, still usable): served at once, one background fetch however
        // many callers.
        tokio::time::advance(5 * SEC).await;
        for _ in 0..5 {
            assert_eq!(ready(s.get()), Some("a"));
        }
        settle().await;
        assert_eq!(calls(&s), 2);
        assert_eq!(*s.source.whys.lock(), [Why::Initial, Why::Due]);
        assert_eq!(ready(s.get()), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_is_served_only_within_its_bound() {
        // Bounded: the refresh keeps failing; past usable_until the value is not served.
        let s = slot(&[Ok("a"), Err("down")], Some(20 * SEC));
        s.refresh(false).await.unwrap();
        tokio::time::advance(12 * SEC).await;
        assert_eq!(ready(s.get()), Some("a"));
        settle().await;
        assert_eq!(calls(&s), 2);
        assert_eq!(ready(s.get()), Some("a"), "stale within the bound");
        tokio::time::advance(10 * SEC).await;
        assert!(matches!(s.get(), Cached::Missing));
        assert_eq!(s.peek().map(|e| e.value), Some("a"));

        // Unbounded: served however old, while refreshes fail.
        let s = slot(&[Ok("a"), Err("down")], None);
        s.refresh(false).await.unwrap();
        tokio::time::advance(3600 * SEC).await;
        assert_eq!(ready(s.get()), Some("a"));
        settle().await;
        assert_eq!(ready(s.get()), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_after_a_failure() {
        let s = slot(&[Err("down"), Err("down"), Ok("a")], None);
        assert_eq!(
            s.refresh(false).await.map(|e| e.value),
            Err(Refused::Failed("down".into()))
        );
        // Within the back-off: failed at once, no attempt, no background fetch.
        tokio::time::advance(4 * SEC).await;
        assert!(matches!(s.get(), Cached::Failed(e) if e == "down"));
        assert_eq!(
            s.refresh(false).await.map(|e| e.value),
            Err(Refused::BackingOff("down".into()))
        );
        s.prefetch();
        settle().await;
        assert_eq!(calls(&s), 1);
        // After it: a new attempt.
        assert!(matches!(s.get(), Cached::Missing));
        assert_eq!(
            s.refresh(false).await.map(|e| e.value),
            Err(Refused::Failed("down".into()))
        );
        assert_eq!(calls(&s), 2);
        tokio::time::advance(5 * SEC).await;
        assert_eq!(s.refresh(false).await.map(|e| e.value), Ok("a"));
        // A success clears the failure.
        assert!(matches!(s.get(), Cached::Ready(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_background_refresh_backs_off_too() {
        let s = slot(&[Ok("a"), Err("down"), Ok("b")], None);
        s.refresh(false).await.unwrap();
        tokio::time::advance(10 * SEC).await;
        assert_eq!(ready(s.get()), Some("a"));
        settle().await;
        assert_eq!(calls(&s), 2);
        // Still due, but backing off: no new background fetch yet.
        assert_eq!(ready(s.get()), Some("a"));
        settle().await;
        assert_eq!(calls(&s), 2);
        tokio::time::advance(5 * SEC).await;
        assert_eq!(ready(s.get()), Some("a"));
        settle().await;
        assert_eq!(calls(&s), 3);
        assert_eq!(ready(s.get()), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn forced_fetches_are_limited_to_one_per_interval() {
        let s = slot(&[Ok("a"), Ok("b"), Ok("c")], None);
        s.refresh(false).await.unwrap();
        assert_eq!(s.refresh(true).await.map(|e| e.value), Ok("b"));
        assert_eq!(
            s.refresh(true).await.map(|e| e.value),
            Err(Refused::TooSoon)
        );
        // The forced fetch began at 1 s (its fetch takes 1 s); 28 s later, still too soon.
        tokio::time::advance(27 * SEC).await;
        assert_eq!(
            s.refresh(true).await.map(|e| e.value),
            Err(Refused::TooSoon)
        );
        // Unforced fetches do not count against it, nor are they limited by it.
        assert_eq!(s.refresh(false).await.map(|e| e.value), Ok("c"));
        tokio::time::advance(2 * SEC).await;
        assert!(s.refresh(true).await.is_ok());
        assert_eq!(calls(&s), 4);
        assert_eq!(
            *s.source.whys.lock(),
            [Why::Initial, Why::Forced, Why::Due, Why::Forced]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_waited_takes_the_value_fetched_meanwhile() {
        let s = slot(&[Ok("a"), Ok("b")], None);
        s.refresh(false).await.unwrap();
        // Two forced refreshes at once: the second waits for the first and takes its value
        // rather than being refused or fetching again.
        let (x, y) = tokio::join!(s.refresh(true), s.refresh(true));
        assert_eq!(x.map(|e| e.value), Ok("b"));
        assert_eq!(y.map(|e| e.value), Ok("b"));
        assert_eq!(calls(&s), 2);
    }
}
