//! In-memory counters checkpointed through a storage backend. The table itself
//! ([`MemoryCounters`]) lives in [`crate::counters::table`], below the storage backends that
//! keep one in process; this module adds what reads and writes it through a
//! [`Backend`]: restoring at start, checkpointing, and the maintenance task.
//!
//! Checkpoints: fixed, flexi and rolling windows of a minute or longer are written (when
//! changed) to the store's backend ([`Backend::save_counters`]: the `counters` table of the
//! embedded store's file) and read back at start, so a restart keeps a day's or a month's
//! count (losing at most one checkpoint interval of counting). A failed checkpoint marks its
//! rows changed again, so the next one retries.

use std::sync::Arc;

use crate::counters::table::{row_is_live, Row};
pub use crate::counters::table::{MemoryCounters, DEFAULT_MAX_KEYS};
use crate::store::backend::Keep;
use crate::store::Backend;

impl MemoryCounters {
    /// Reads counters checkpointed earlier; returns how many are still live.
    pub async fn restore(&self, backend: &dyn Backend, now: i64) -> Result<usize, String> {
        let rows = backend.load_counters().await.map_err(|e| e.to_string())?;
        Ok(self.restore_rows(rows, now))
    }

    /// Writes the windows changed since the last checkpoint and drops expired rows, in one
    /// durable step. Returns the rows written.
    pub async fn checkpoint(&self, backend: &dyn Backend, now: i64) -> Result<usize, String> {
        let changed = self.take_changed(now);
        self.write_changed(changed, save_to(backend, now)).await
    }
}

type SaveFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// Writes checkpoint rows to `backend`, dropping the rows expired at `now`.
fn save_to<'a>(backend: &'a dyn Backend, now: i64) -> impl FnOnce(Vec<Row>) -> SaveFuture<'a> {
    move |rows| {
        Box::pin(async move {
            let keep: Keep = Arc::new(move |v: &[u8]| row_is_live(v, now));
            backend
                .save_counters(rows, keep)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Runs the sweep every second and, with a backend, the checkpoint every `every`, until
/// the process ends.
pub fn spawn_maintenance(
    counters: Arc<MemoryCounters>,
    clock: Arc<dyn super::Clock>,
    checkpoint: Option<(Arc<dyn Backend>, std::time::Duration)>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let c = counters.clone();
            let now = clock.now_ms();
            let due = checkpoint
                .as_ref()
                .filter(|(_, every)| last_checkpoint.elapsed() >= *every)
                .map(|(backend, _)| backend.clone());
            if due.is_some() {
                last_checkpoint = tokio::time::Instant::now();
            }
            let collect = due.is_some();
            // The sweep and the collection walk the table: off the workers.
            let res = tokio::task::spawn_blocking(move || {
                c.sweep(now);
                collect.then(|| c.take_changed(now))
            })
            .await;
            let written = match (res, due) {
                (Ok(Some(rows)), Some(backend)) => {
                    Some(counters.write_changed(rows, save_to(&*backend, now)).await)
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "counter maintenance task failed");
                    None
                }
                _ => None,
            };
            match written {
                Some(Err(e)) => tracing::warn!(error = %e, "counter checkpoint failed"),
                Some(Ok(n)) if n > 0 => tracing::debug!(rows = n, "counters checkpointed"),
                _ => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Mode, Window};

    use crate::counters::test_ask as ask;

    #[tokio::test]
    async fn checkpoint_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::embedded::EmbeddedBackend::open(dir.path()).unwrap();
        let c = MemoryCounters::new(100);
        let day = Window::Fixed {
            start: 0,
            end: 86_400_000,
        };
        let sec = Window::Fixed {
            start: 0,
            end: 1000,
        };
        for _ in 0..7 {
            c.apply(&ask(7, day, 100, 1, Mode::EnforceAndCount, 10));
        }
        c.apply(&ask(8, sec, 100, 1, Mode::EnforceAndCount, 10));
        assert_eq!(
            c.checkpoint(&db, 20).await.unwrap(),
            1,
            "only the day window"
        );
        assert_eq!(
            c.checkpoint(&db, 30).await.unwrap(),
            0,
            "nothing changed since"
        );
        let fresh = MemoryCounters::new(100);
        assert_eq!(fresh.restore(&db, 40).await.unwrap(), 1);
        assert_eq!(
            fresh
                .apply(&ask(7, day, 100, 1, Mode::EnforceAndCount, 50))
                .used,
            8
        );
        // Expired rows are neither restored nor kept.
        assert_eq!(
            MemoryCounters::new(10)
                .restore(&db, 86_400_000)
                .await
                .unwrap(),
            0
        );
        c.checkpoint(&db, 86_400_000).await.unwrap();
        assert_eq!(db.load_counters().await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_failed_checkpoint_is_retried_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::embedded::EmbeddedBackend::open(dir.path()).unwrap();
        let c = MemoryCounters::new(100);
        let day = Window::Fixed {
            start: 0,
            end: 86_400_000,
        };
        for _ in 0..3 {
            c.apply(&ask(7, day, 100, 1, Mode::EnforceAndCount, 10));
        }
        let changed = c.take_changed(20);
        let failed = c
            .write_changed(changed, |rows| async move {
                assert_eq!(rows.len(), 1);
                Err("disk full".to_owned())
            })
            .await;
        assert_eq!(failed, Err("disk full".into()));
        // Nothing changed since, yet the row is written now.
        assert_eq!(c.checkpoint(&db, 30).await.unwrap(), 1);
        let fresh = MemoryCounters::new(100);
        assert_eq!(fresh.restore(&db, 40).await.unwrap(), 1);
        assert_eq!(
            fresh
                .apply(&ask(7, day, 100, 1, Mode::EnforceAndCount, 50))
                .used,
            4
        );
    }

    #[tokio::test]
    async fn rolling_windows_are_checkpointed_and_keep_expiring_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::embedded::EmbeddedBackend::open(dir.path()).unwrap();
        let c = MemoryCounters::new(100);
        let hour = 3_600_000;
        let w = Window::Rolling { len: hour };
        // 3 at 0:00, 2 at 0:30 (slots of 6 minutes).
        for _ in 0..3 {
            c.apply(&ask(9, w, 10, 1, Mode::EnforceAndCount, 0));
        }
        for _ in 0..2 {
            c.apply(&ask(9, w, 10, 1, Mode::EnforceAndCount, hour / 2));
        }
        // A rolling second (spike arrest) is too short to keep.
        c.apply(&ask(
            10,
            Window::Rolling { len: 1000 },
            10,
            1,
            Mode::EnforceAndCount,
            0,
        ));
        assert_eq!(c.checkpoint(&db, hour / 2).await.unwrap(), 1);
        let fresh = MemoryCounters::new(100);
        assert_eq!(fresh.restore(&db, hour / 2 + 1).await.unwrap(), 1);
        let d = fresh.apply(&ask(9, w, 10, 1, Mode::EnforceAndCount, hour / 2 + 1));
        assert_eq!(d.used, 6, "the restart kept the rolling count");
        // The 0:00 requests leave an hour later; the later ones stay.
        let d = fresh.apply(&ask(9, w, 10, 0, Mode::EnforceOnly, hour));
        assert_eq!(d.used, 3);
        // A rolling row whose counts have all left is neither restored nor kept.
        assert_eq!(
            MemoryCounters::new(10)
                .restore(&db, 3 * hour)
                .await
                .unwrap(),
            0
        );
        c.checkpoint(&db, 3 * hour).await.unwrap();
        assert_eq!(db.load_counters().await.unwrap().len(), 0);
    }
}
