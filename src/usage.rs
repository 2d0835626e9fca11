//! Usage per app, product and developer, per hour and per day: requests, errors, input and
//! output tokens and cost, added up across replicas in the store's usage tallies
//! ([`crate::store::Backend::tally_add`]), read back as a report (`GET /v1/usage`, JSON or
//! CSV) and charted by the admin page.
//!
//! The data path only adds to a small in-process table (one lock, no allocation once a name
//! was seen in the hour); a task flushes it to the store every few seconds, so a report can
//! lag by one flush interval, and the store sees a handful of writes per interval whatever
//! the traffic. A report first flushes this replica's pending adds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::llm::FinalUsage;
use crate::store::{Backend, StoreError, TallyAdd};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// How long buckets are kept: hours for 35 days, days for 400.
const HOUR_TTL: Duration = Duration::from_secs(35 * 86_400);
const DAY_TTL: Duration = Duration::from_secs(400 * 86_400);
/// The most buckets one report reads (a month of hours, a year and a month of days).
const MAX_HOURS: i64 = 31 * 24;
const MAX_DAYS: i64 = 400;
/// Pending slots kept when the store is down; beyond this, new names are not recorded until
/// a flush succeeds (counted).
const MAX_PENDING_NAMES: usize = 100_000;

/// What usage is broken down by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    App,
    Product,
    Developer,
}

impl Dim {
    const ALL: [Dim; 3] = [Dim::App, Dim::Product, Dim::Developer];

    pub fn as_str(self) -> &'static str {
        match self {
            Dim::App => "app",
            Dim::Product => "product",
            Dim::Developer => "developer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Dim::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// Hour or day buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    fn len_ms(self) -> i64 {
        match self {
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }
}

/// The totals of one name in one hour.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    requests: i64,
    errors: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_micros: i64,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cost_micros = self.cost_micros.saturating_add(o.cost_micros);
    }

    fn fields(&self) -> [(&'static str, i64); 5] {
        [
            ("requests", self.requests),
            ("errors", self.errors),
            ("inputTokens", self.input_tokens),
            ("outputTokens", self.output_tokens),
            ("costMicros", self.cost_micros),
        ]
    }
}

/// Who an exchange is charged to (the app VerifyApiKey verified).
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub app: &'a str,
    pub product: &'a str,
    pub developer: &'a str,
}

/// One exchange's contribution.
#[derive(Debug, Clone, Copy, Default)]
pub struct Charge<'a> {
    /// The client got a status of 400 or more, or the exchange failed or was cut off.
    pub error: bool,
    pub usage: Option<&'a FinalUsage>,
    /// In the price table's currency.
    pub cost: Option<f64>,
}

type Pending = HashMap<(Dim, i64), HashMap<String, Tally>>;

/// This replica's pending adds and the store they go to.
pub struct Ledger {
    backend: Arc<dyn Backend>,
    pending: Mutex<Pending>,
    /// Serialises flushes (the periodic one and a report's), so no add is sent twice.
    flushing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

static METRICS: std::sync::LazyLock<(prometheus::IntCounter, prometheus::IntCounter)> =
    std::sync::LazyLock::new(|| {
        let v = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_usage_flushes_total",
                "Usage tally flushes to the store by result (ok, error: retried at the next)",
            ),
            &["result"],
        )
        .expect("valid metric");
        if let Err(e) = crate::telemetry::METRICS
            .registry
            .register(Box::new(v.clone()))
        {
            tracing::warn!(error = %e, "usage metric not registered");
        }
        (
            v.with_label_values(&["ok"]),
            v.with_label_values(&["error"]),
        )
    });

impl Ledger {
    pub fn new(backend: Arc<dyn Backend>) -> Arc<Self> {
        std::sync::LazyLock::force(&METRICS);
        Arc::new(Self {
            backend,
            pending: Mutex::new(HashMap::new()),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    /// Adds one exchange at `at_ms` (Unix milliseconds).
    pub fn record(&self, at_ms: i64, who: Who<'_>, charge: Charge<'_>) {
        let t = Tally {
            requests: 1,
            errors: i64::from(charge.error),
            input_tokens: charge
                .usage
                .map_or(0, |u| i64::try_from(u.input_tokens).unwrap_or(i64::MAX)),
            output_tokens: charge
                .usage
                .map_or(0, |u| i64::try_from(u.output_tokens).unwrap_or(i64::MAX)),
            cost_micros: charge
                .cost
                .filter(|c| c.is_finite() && *c > 0.0)
                .map_or(0, |c| (c * 1e6).round().min(i64::MAX as f64) as i64),
        };
        let hour = at_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let mut pending = self.pending.lock();
        let full = pending.values().map(HashMap::len).sum::<usize>() >= MAX_PENDING_NAMES;
        for (dim, name) in [
            (Dim::App, who.app),
            (Dim::Product, who.product),
            (Dim::Developer, who.developer),
        ] {
            if name.is_empty() {
                continue;
            }
            let names = pending.entry((dim, hour)).or_default();
            match names.get_mut(name) {
                Some(slot) => slot.merge(&t),
                None if !full => {
                    names.insert(name.to_owned(), t);
                }
                None => {
                    METRICS.1.inc();
                }
            }
        }
    }

    /// Sends the pending adds to the store; on failure they stay pending for the next flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _one = self.flushing.lock().await;
        let taken = std::mem::take(&mut *self.pending.lock());
        if taken.is_empty() {
            return Ok(());
        }
        let mut hours = Vec::new();
        let mut days: HashMap<(Dim, i64, &str), Tally> = HashMap::new();
        for ((dim, hour), names) in &taken {
            let day = hour.div_euclid(DAY_MS) * DAY_MS;
            for (name, t) in names {
                push_adds(&mut hours, &bucket(*dim, Granularity::Hour, *hour), name, t);
                days.entry((*dim, day, name.as_str())).or_default().merge(t);
            }
        }
        let mut day_adds = Vec::new();
        for ((dim, day, name), t) in &days {
            push_adds(
                &mut day_adds,
                &bucket(*dim, Granularity::Day, *day),
                name,
                t,
            );
        }
        let result = async {
            self.backend.tally_add(&hours, HOUR_TTL).await?;
            self.backend.tally_add(&day_adds, DAY_TTL).await
        }
        .await;
        match result {
            Ok(()) => {
                METRICS.0.inc();
                Ok(())
            }
            Err(e) => {
                // Put them back (merged with what came in meanwhile). A failure after the
                // hour buckets were written counts those again at the next flush: the store
                // has no transaction across buckets, and over-counting one flush of a
                // failing store is the lesser loss.
                METRICS.1.inc();
                let mut pending = self.pending.lock();
                for (k, names) in taken {
                    let slot = pending.entry(k).or_default();
                    for (name, t) in names {
                        slot.entry(name).or_default().merge(&t);
                    }
                }
                Err(e)
            }
        }
    }

    /// Flushes every `interval` until the ledger is dropped elsewhere.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(ledger) = weak.upgrade() else { return };
                if let Err(e) = ledger.flush().await {
                    tracing::warn!(error = %e, "usage flush failed; kept for the next one");
                }
            }
        });
    }

    /// The usage by `dim` in `gran` buckets from `from_ms` to `to_ms` (bucket starts in
    /// that range, UTC), for `name` or every name with usage.
    pub async fn report(&self, q: &Query) -> Result<Report, ReportError> {
        let len = q.granularity.len_ms();
        let first = q.from_ms.div_euclid(len) * len;
        let last = q.to_ms.div_euclid(len) * len;
        if last < first {
            return Err(ReportError::Range("`to` is before `from`".into()));
        }
        let count = (last - first) / len + 1;
        let max = match q.granularity {
            Granularity::Hour => MAX_HOURS,
            Granularity::Day => MAX_DAYS,
        };
        if count > max {
            return Err(ReportError::Range(format!(
                "at most {max} {} buckets per report, not {count}",
                q.granularity.as_str()
            )));
        }
        self.flush().await.map_err(ReportError::Store)?;
        let starts: Vec<i64> = (0..count).map(|i| first + i * len).collect();
        let buckets: Vec<String> = starts
            .iter()
            .map(|s| bucket(q.by, q.granularity, *s))
            .collect();
        let read = self
            .backend
            .tally_read(&buckets)
            .await
            .map_err(ReportError::Store)?;
        let mut by_name: std::collections::BTreeMap<String, Vec<Tally>> = Default::default();
        for (i, fields) in read.into_iter().enumerate() {
            for (field, value) in fields {
                let Some((metric, name)) = field.split_once(':') else {
                    continue;
                };
                if q.name.as_deref().is_some_and(|n| n != name) {
                    continue;
                }
                let points = by_name
                    .entry(name.to_owned())
                    .or_insert_with(|| vec![Tally::default(); starts.len()]);
                let t = &mut points[i];
                match metric {
                    "requests" => t.requests = value,
                    "errors" => t.errors = value,
                    "inputTokens" => t.input_tokens = value,
                    "outputTokens" => t.output_tokens = value,
                    "costMicros" => t.cost_micros = value,
                    _ => {}
                }
            }
        }
        if let Some(n) = &q.name {
            by_name
                .entry(n.clone())
                .or_insert_with(|| vec![Tally::default(); starts.len()]);
        }
        let series = by_name
            .into_iter()
            .map(|(name, tallies)| Series {
                name,
                points: starts
                    .iter()
                    .zip(tallies)
                    .map(|(s, t)| Point {
                        start: crate::telemetry::analytics::rfc3339_ms(
                            std::time::UNIX_EPOCH
                                + Duration::from_millis(u64::try_from(*s).unwrap_or(0)),
                        ),
                        requests: t.requests,
                        errors: t.errors,
                        input_tokens: t.input_tokens,
                        output_tokens: t.output_tokens,
                        total_tokens: t.input_tokens.saturating_add(t.output_tokens),
                        cost: t.cost_micros as f64 / 1e6,
                    })
                    .collect(),
            })
            .collect();
        Ok(Report {
            by: q.by,
            granularity: q.granularity,
            series,
        })
    }
}

fn bucket(dim: Dim, gran: Granularity, start: i64) -> String {
    format!("{}:{}:{start}", dim.as_str(), gran.as_str())
}

fn push_adds(out: &mut Vec<TallyAdd>, bucket: &str, name: &str, t: &Tally) {
    for (metric, v) in t.fields() {
        if v != 0 {
            out.push(TallyAdd {
                bucket: bucket.to_owned(),
                field: format!("{metric}:{name}"),
                delta: v,
            });
        }
    }
}

/// A report's question.
#[derive(Debug, Clone)]
pub struct Query {
    pub by: Dim,
    pub granularity: Granularity,
    pub from_ms: i64,
    pub to_ms: i64,
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Range(String),
    #[error(transparent)]
    Store(StoreError),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub by: Dim,
    pub granularity: Granularity,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// The bucket's start, RFC 3339 UTC.
    pub start: String,
    pub requests: i64,
    pub errors: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub cost: f64,
}

impl Report {
    /// The same report as CSV: one row per name and bucket.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "start,by,name,requests,errors,input_tokens,output_tokens,total_tokens,cost\n",
        );
        for s in &self.series {
            for p in &s.points {
                out.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{}\n",
                    p.start,
                    self.by.as_str(),
                    csv_field(&s.name),
                    p.requests,
                    p.errors,
                    p.input_tokens,
                    p.output_tokens,
                    p.total_tokens,
                    p.cost
                ));
            }
        }
        out
    }
}

/// RFC 4180 quoting, and a leading `=`, `+`, `-` or `@` neutralised so a spreadsheet never
/// runs a name as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::UsageSource;
    use crate::store::memory::MemoryBackend;

    fn usage(i: u64, o: u64) -> FinalUsage {
        FinalUsage {
            input_tokens: i,
            output_tokens: o,
            cached_input_tokens: 0,
            cache_creation_input_tokens: 0,
            reasoning_tokens: 0,
            input_source: UsageSource::Reported,
            output_source: UsageSource::Reported,
        }
    }

    const T0: i64 = 1_796_652_000_000; // 2026-12-07T14:00:00Z

    #[tokio::test]
    async fn two_replicas_add_up_per_hour_and_day() {
        let store: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let (a, b) = (Ledger::new(store.clone()), Ledger::new(store.clone()));
        let shop = Who {
            app: "shop",
            product: "gold",
            developer: "dev@shop.example",
        };
        let bank = Who {
            app: "bank",
            product: "gold",
            developer: "dev@bank.example",
        };
        let u = usage(100, 20);
        a.record(
            T0,
            shop,
            Charge {
                usage: Some(&u),
                cost: Some(0.0015),
                ..Default::default()
            },
        );
        b.record(
            T0 + 60_000,
            shop,
            Charge {
                error: true,
                ..Default::default()
            },
        );
        b.record(T0 + HOUR_MS, bank, Charge::default());
        a.flush().await.unwrap();
        // b's adds are flushed by the report itself (b asks).
        let q = Query {
            by: Dim::App,
            granularity: Granularity::Hour,
            from_ms: T0,
            to_ms: T0 + HOUR_MS,
            name: None,
        };
        let r = b.report(&q).await.unwrap();
        assert_eq!(
            r.series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["bank", "shop"]
        );
        let shop_pts = &r.series[1].points;
        assert_eq!(shop_pts.len(), 2);
        assert_eq!(shop_pts[0].start, "2026-12-07T14:00:00.000Z");
        assert_eq!(
            (
                shop_pts[0].requests,
                shop_pts[0].errors,
                shop_pts[0].total_tokens
            ),
            (2, 1, 120)
        );
        assert!((shop_pts[0].cost - 0.0015).abs() < 1e-9);
        assert_eq!(shop_pts[1].requests, 0);
        assert_eq!(r.series[0].points[1].requests, 1);

        // By product and by day: both apps in one product, one day.
        let r = a
            .report(&Query {
                by: Dim::Product,
                granularity: Granularity::Day,
                ..q.clone()
            })
            .await
            .unwrap();
        assert_eq!(r.series.len(), 1);
        assert_eq!(r.series[0].points[0].requests, 3);
        assert_eq!(r.series[0].points[0].start, "2026-12-07T00:00:00.000Z");

        // One name asked: a series even with no usage.
        let r = a
            .report(&Query {
                by: Dim::Developer,
                name: Some("nobody@x".into()),
                ..q.clone()
            })
            .await
            .unwrap();
        assert_eq!(r.series.len(), 1);
        assert_eq!(r.series[0].points[0].requests, 0);

        let csv = b.report(&q).await.unwrap().to_csv();
        assert!(csv.starts_with("start,by,name,requests"));
        assert!(
            csv.contains("2026-12-07T14:00:00.000Z,app,shop,2,1,100,20,120,0.0015\n"),
            "{csv}"
        );
    }

    #[tokio::test]
    async fn ranges_are_bounded() {
        let l = Ledger::new(Arc::new(MemoryBackend::new()));
        let q = Query {
            by: Dim::App,
            granularity: Granularity::Hour,
            from_ms: T0,
            to_ms: T0 + 40 * DAY_MS,
            name: None,
        };
        assert!(matches!(l.report(&q).await, Err(ReportError::Range(_))));
        let q = Query {
            to_ms: T0 - HOUR_MS,
            ..q
        };
        assert!(matches!(l.report(&q).await, Err(ReportError::Range(_))));
    }

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
