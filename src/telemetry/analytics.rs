//! Analytics: one JSON line per exchange (sampled) to stdout or a file
//! (`--analytics stdout|PATH`, `--analytics-sample-ratio`): when, which flow, app, developer
//! and product, which API and model, the status and the policy that decided, latency, sizes,
//! tokens and cost. Never a secret: no header or query values, no keys, the path without its
//! query.
//!
//! Records go through a bounded queue to a writer thread, so a slow disk or a blocked stdout
//! never delays a stream: when the queue is full the record is dropped and counted
//! (`tollgate_analytics_records_total{result="dropped"}`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;

/// Records waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 16_384;
/// The writer flushes at least this often when records keep coming, and at once when idle.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => Sink::Stdout,
            path => Sink::File(PathBuf::from(path)),
        })
    }
}

/// Why analytics could not start.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("--analytics-sample-ratio must be between 0 and 1, not {0}")]
    Ratio(f64),
    #[error("cannot open the analytics file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("analytics are already set up in this process")]
    AlreadySet,
}

enum Msg {
    Record(Box<Record>),
    /// Write out everything queued so far, then answer.
    Flush(SyncSender<()>),
}

struct Writer {
    tx: SyncSender<Msg>,
    /// Keep one record in `every` (sampling without randomness on the hot path).
    ratio: f64,
    seen: AtomicU64,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

struct Counters {
    written: IntCounter,
    dropped: IntCounter,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| {
    let v = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_analytics_records_total",
            "Analytics records by result: written, or dropped because the writer fell behind",
        ),
        &["result"],
    )
    .expect("valid metric");
    if let Err(e) = super::METRICS.registry.register(Box::new(v.clone())) {
        tracing::warn!(error = %e, "analytics metric not registered");
    }
    Counters {
        written: v.with_label_values(&["written"]),
        dropped: v.with_label_values(&["dropped"]),
    }
});

/// One exchange. Absent fields are left out of the line.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// RFC 3339, UTC, milliseconds: when the exchange started.
    pub time: String,
    pub flow: String,
    pub method: String,
    /// Without the query (queries may carry keys).
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub developer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The status the client got, when known (an aborted exchange may have none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// completed, rejected, answered, aborted or failed.
    pub outcome: &'static str,
    /// The policy that rejected or answered, and its fault code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// From the first message tollgate saw to the end of the exchange.
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

/// Writes out the queued records when dropped (at the end of `serve`), waiting at most 2 s.
pub struct AnalyticsGuard(());

impl Drop for AnalyticsGuard {
    fn drop(&mut self) {
        if let Some(w) = WRITER.get() {
            let (ack, done) = mpsc::sync_channel(1);
            if w.tx.send(Msg::Flush(ack)).is_ok() {
                let _ = done.recv_timeout(Duration::from_secs(2));
            }
        }
    }
}

/// Starts writing records to `sink`, keeping `ratio` of the exchanges.
pub fn init(sink: Sink, ratio: f64) -> Result<AnalyticsGuard, AnalyticsError> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(AnalyticsError::Ratio(ratio));
    }
    let out: Box<dyn Write + Send> = match &sink {
        Sink::Stdout => Box::new(std::io::stdout()),
        Sink::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| AnalyticsError::Open {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
    };
    let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
    WRITER
        .set(Writer {
            tx,
            ratio,
            seen: AtomicU64::new(0),
        })
        .map_err(|_| AnalyticsError::AlreadySet)?;
    LazyLock::force(&COUNTERS);
    std::thread::Builder::new()
        .name("analytics".into())
        .spawn(move || write_loop(rx, out))
        .map_err(|source| AnalyticsError::Open {
            path: "(writer thread)".into(),
            source,
        })?;
    tracing::info!(?sink, ratio, "writing analytics records");
    Ok(AnalyticsGuard(()))
}

fn write_loop(rx: mpsc::Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut last_flush = std::time::Instant::now();
    loop {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(Msg::Record(r)) => {
                let line = serde_json::to_vec(&r).map(|mut v| {
                    v.push(b'\n');
                    v
                });
                match line
                    .map_err(std::io::Error::from)
                    .and_then(|l| out.write_all(&l))
                {
                    Ok(()) => COUNTERS.written.inc(),
                    Err(e) => {
                        COUNTERS.dropped.inc();
                        tracing::warn!(error = %e, "analytics record not written");
                    }
                }
                if last_flush.elapsed() >= FLUSH_EVERY {
                    let _ = out.flush();
                    last_flush = std::time::Instant::now();
                }
            }
            Ok(Msg::Flush(ack)) => {
                let _ = out.flush();
                let _ = ack.try_send(());
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                last_flush = std::time::Instant::now();
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        }
    }
}

/// Whether this exchange gets a record: analytics are on and the sample keeps it. Called
/// once per exchange at its end; off costs one atomic load.
pub fn sample() -> bool {
    let Some(w) = WRITER.get() else {
        return false;
    };
    if w.ratio >= 1.0 {
        return true;
    }
    if w.ratio <= 0.0 {
        return false;
    }
    // Keep the n-th exchange when n·ratio crosses an integer: exactly `ratio` of them,
    // evenly spread, with no random numbers.
    let n = w.seen.fetch_add(1, Ordering::Relaxed) as f64;
    (n * w.ratio).floor() != ((n + 1.0) * w.ratio).floor()
}

/// Queues `record`; dropped (and counted) when the writer is behind.
pub fn send(record: Record) {
    let Some(w) = WRITER.get() else { return };
    match w.tx.try_send(Msg::Record(Box::new(record))) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => COUNTERS.dropped.inc(),
    }
}

/// `time` of a record: RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_652_000_123);
        assert_eq!(rfc3339_ms(t), "2026-12-07T14:00:00.123Z");
        assert_eq!(rfc3339_ms(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_ms(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_leave_out_what_is_unknown() {
        let r = Record {
            time: "t".into(),
            flow: "f".into(),
            method: "GET".into(),
            path: "/x".into(),
            outcome: "completed",
            latency_ms: 1.5,
            status: Some(200),
            ..Record::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"time":"t","flow":"f","method":"GET","path":"/x","status":200,"outcome":"completed","latencyMs":1.5})
        );
    }
}
