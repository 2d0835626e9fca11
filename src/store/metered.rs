//! Latency and errors of every store call, by backend and operation
//! (`tollgate_store_operation_duration_seconds{backend,op}`,
//! `tollgate_store_errors_total{backend,op}`), measured around whichever backend
//! [`super::open`] opened. The series are resolved once per backend, so a call does no label
//! hashing: two clock reads and one histogram observation.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use tokio::sync::broadcast;

use super::backend::{Backend, Cond, Keep, Put, Table, TallyAdd, Visit};
use super::{Change, StoreError};
use crate::counters::{Adjust, Ask, Decision};

struct Vecs {
    seconds: HistogramVec,
    errors: IntCounterVec,
}

static VECS: LazyLock<Vecs> = LazyLock::new(|| {
    let seconds = HistogramVec::new(
        HistogramOpts::new(
            "tollgate_store_operation_duration_seconds",
            "Store calls by backend and operation, failures included",
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ]),
        &["backend", "op"],
    )
    .expect("valid metric");
    let errors = IntCounterVec::new(
        Opts::new(
            "tollgate_store_errors_total",
            "Failed store calls by backend and operation",
        ),
        &["backend", "op"],
    )
    .expect("valid metric");
    let r = &crate::telemetry::METRICS.registry;
    for c in [
        Box::new(seconds.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(errors.clone()),
    ] {
        if let Err(e) = r.register(c) {
            tracing::warn!(error = %e, "store metric not registered");
        }
    }
    Vecs { seconds, errors }
});

/// The operations measured.
#[derive(Clone, Copy)]
enum Op {
    Get,
    Scan,
    Put,
    Delete,
    Count,
    Adjust,
    LoadCounters,
    SaveCounters,
    CacheGet,
    CachePut,
    TallyAdd,
    TallyRead,
    Ping,
}

const OPS: [(Op, &str); 13] = [
    (Op::Get, "get"),
    (Op::Scan, "scan"),
    (Op::Put, "put"),
    (Op::Delete, "delete"),
    (Op::Count, "count"),
    (Op::Adjust, "adjust"),
    (Op::LoadCounters, "load_counters"),
    (Op::SaveCounters, "save_counters"),
    (Op::CacheGet, "cache_get"),
    (Op::CachePut, "cache_put"),
    (Op::TallyAdd, "tally_add"),
    (Op::TallyRead, "tally_read"),
    (Op::Ping, "ping"),
];

/// A backend whose every call is timed and whose failures are counted.
pub struct Metered {
    inner: Arc<dyn Backend>,
    series: Vec<(Histogram, IntCounter)>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Metered {
    pub fn wrap(inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
        let kind = inner.kind();
        let series = OPS
            .iter()
            .map(|(_, name)| {
                (
                    VECS.seconds.with_label_values(&[kind, name]),
                    VECS.errors.with_label_values(&[kind, name]),
                )
            })
            .collect();
        Arc::new(Self { inner, series })
    }

    fn record<T>(&self, op: Op, started: Instant, r: &Result<T, StoreError>) {
        let (h, e) = &self.series[op as usize];
        h.observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            e.inc();
        }
    }
}

macro_rules! timed {
    ($self:ident, $op:expr, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.record($op, started, &r);
        r
    }};
}

#[async_trait]
impl Backend for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, Op::Ping, self.inner.ping())
    }

    async fn get(&self, table: Table<'_>, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        timed!(self, Op::Get, self.inner.get(table, key))
    }

    async fn scan(&self, tables: &[Table<'_>], visit: Visit) -> Result<(), StoreError> {
        timed!(self, Op::Scan, self.inner.scan(tables, visit))
    }

    async fn put(
        &self,
        table: Table<'_>,
        key: &str,
        value: Vec<u8>,
        cond: Cond,
    ) -> Result<Put, StoreError> {
        timed!(self, Op::Put, self.inner.put(table, key, value, cond))
    }

    async fn delete(&self, table: Table<'_>, key: &str) -> Result<bool, StoreError> {
        timed!(self, Op::Delete, self.inner.delete(table, key))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.subscribe()
    }

    async fn announce(&self, change: Change) {
        self.inner.announce(change).await
    }

    async fn count(&self, asks: &[Ask]) -> Result<Vec<Option<Decision>>, StoreError> {
        timed!(self, Op::Count, self.inner.count(asks))
    }

    async fn adjust(&self, adjusts: &[Adjust]) -> Result<Vec<Option<u64>>, StoreError> {
        timed!(self, Op::Adjust, self.inner.adjust(adjusts))
    }

    async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        timed!(self, Op::LoadCounters, self.inner.load_counters())
    }

    async fn save_counters(
        &self,
        rows: Vec<(u128, Vec<u8>)>,
        keep: Keep,
    ) -> Result<(), StoreError> {
        timed!(self, Op::SaveCounters, self.inner.save_counters(rows, keep))
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        timed!(self, Op::CacheGet, self.inner.cache_get(key))
    }

    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        timed!(self, Op::CachePut, self.inner.cache_put(key, value, ttl))
    }

    async fn tally_add(&self, adds: &[TallyAdd], ttl: Duration) -> Result<(), StoreError> {
        timed!(self, Op::TallyAdd, self.inner.tally_add(adds, ttl))
    }

    async fn tally_read(&self, buckets: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        timed!(self, Op::TallyRead, self.inner.tally_read(buckets))
    }
}
