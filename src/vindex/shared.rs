//! The Redis tier of the vector index: replicas share the entries any of them stored. Plain
//! Redis (no search module): Redis only carries entries from one replica's index to the
//! others'; every replica searches its own [`VectorIndex`](super::VectorIndex).
//!
//! # Layout (namespace `<ns>`, e.g. the policy's name)
//!
//! - `tollgate:vindex:<ns>:e:<origin>:<seq>`: one entry, expiring with the entry's TTL
//!   (`SET … PX`): `TGV1`, the scope (u128 LE), the dimensions (u32 LE), the vector (f32 LE
//!   each), then the caller's payload bytes.
//! - `tollgate:vindex:<ns>:log`: a stream, one record per entry (`k` = its key, `o` = the
//!   publishing replica), trimmed to about [`STREAM_MAXLEN`] records (`XADD MAXLEN ~`).
//!
//! [`SharedIndex::publish`] writes both in one pipeline (the entry first), in a spawned task.
//! [`SharedIndex::follow`] reads the stream from its start (`XREAD` from `0-0`: the backfill
//! of every entry still alive, then new ones as they come, `BLOCK` on a connection of its
//! own), skips its own records, fetches each entry with its remaining TTL (`PTTL`), and hands
//! it to the caller, who inserts it into the local index with that TTL. An entry whose key has
//! expired is skipped: a replica never revives an entry past its life.
//!
//! # Failure
//!
//! Every Redis call is bounded by the timeout given to [`SharedIndex::connect`]. Redis
//! unreachable means local only: publishes are dropped (counted, logged at debug), the
//! follower reconnects with back-off and resumes after the last record it read. Nothing is
//! ever an error for a request: `publish` returns at once, whatever Redis does. Counted in
//! `tollgate_semantic_shared_errors_total{op}`; entries in
//! `tollgate_semantic_shared_entries_total{direction}` (`published`, `received`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use redis::Value;

use super::Scope;
use crate::embed::Embedding;

/// About this many stream records are kept (the entries themselves expire by TTL): the
/// backfill of a new replica reads at most this many.
pub const STREAM_MAXLEN: usize = 100_000;
/// Publishes waiting on Redis at once, at most; more are dropped (counted) rather than queued
/// behind a slow Redis.
pub const MAX_IN_FLIGHT: usize = 256;
/// After a failed connection or publish, publishes are skipped for this long.
const DOWN_FOR: Duration = Duration::from_secs(1);
/// How long one `XREAD` waits for new records.
const BLOCK: Duration = Duration::from_secs(1);
/// Records read (and entries fetched) per round.
const BATCH: usize = 128;
/// Entries wider than this are refused on read (no embedder comes close).
const MAX_DIMS: usize = 65_536;
const MAGIC: &[u8; 4] = b"TGV1";
const HEADER: usize = 4 + 16 + 4;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared vector index: {0}")]
    Config(String),
}

static ERRORS: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    let c = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_semantic_shared_errors_total",
            "Semantic cache Redis tier failures by operation (connect, publish, dropped, \
             follow); each one leaves the replica on its local index",
        ),
        &["op"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "semantic shared metric not registered");
    }
    c
});

static ENTRIES: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    let c = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_semantic_shared_entries_total",
            "Semantic cache entries through the Redis tier: published, received (from other replicas)",
        ),
        &["direction"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "semantic shared metric not registered");
    }
    c
});

fn error(op: &str) {
    ERRORS.with_label_values(&[op]).inc();
}

/// The entry's stored form.
fn encode(scope: Scope, e: &Embedding, payload: &[u8]) -> Vec<u8> {
    let v = e.as_slice();
    let mut b = Vec::with_capacity(HEADER + v.len() * 4 + payload.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&scope.to_le_bytes());
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for x in v {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.extend_from_slice(payload);
    b
}

fn decode(b: &[u8]) -> Option<(Scope, Embedding, Bytes)> {
    let rest = b.strip_prefix(MAGIC)?;
    let (scope, rest) = rest.split_first_chunk::<16>()?;
    let (dims, rest) = rest.split_first_chunk::<4>()?;
    let dims = u32::from_le_bytes(*dims) as usize;
    if dims == 0 || dims > MAX_DIMS || rest.len() < dims * 4 {
        return None;
    }
    let (vec, payload) = rest.split_at(dims * 4);
    let v: Vec<f32> = vec
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let e = Embedding::normalized(v).ok()?;
    Some((
        u128::from_le_bytes(*scope),
        e,
        Bytes::copy_from_slice(payload),
    ))
}

/// What the caller's `on_entry` receives: scope, vector, payload and remaining TTL.
type OnEntry = dyn Fn(Scope, Embedding, Bytes, Duration) + Send + Sync;

struct Inner {
    client: redis::Client,
    /// The URL without its password, for logs.
    display: String,
    /// `tollgate:vindex:<ns>:`.
    prefix: String,
    stream: String,
    /// This replica's name in the stream (random per instance).
    origin: String,
    seq: AtomicU64,
    timeout: Duration,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// Publishes are skipped until then (Redis just failed).
    down_until: Mutex<Option<Instant>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    closed: AtomicBool,
    close: tokio::sync::Notify,
}

/// One replica's handle on the shared tier. Dropping it stops its follower.
pub struct SharedIndex {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedIndex")
            .field("redis", &self.inner.display)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for SharedIndex {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.close.notify_waiters();
    }
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, hosts)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{hosts}"),
        None => format!("{scheme}://***@{hosts}"),
    }
}

impl SharedIndex {
    /// The tier in the Redis at `url` (`redis://`, `rediss://` or `unix://`; one server:
    /// no Redis Cluster) under `namespace`. Checks the URL only: the connection is made on
    /// first use, so a Redis that is down at start-up delays sharing, never the start.
    pub fn connect(url: &str, namespace: &str, timeout: Duration) -> Result<Self, SharedError> {
        if url.starts_with(crate::store::redis_store::CLUSTER_SCHEME) {
            return Err(SharedError::Config(
                "Redis Cluster is not supported by the semantic cache's shared tier: name one server".into(),
            ));
        }
        if namespace.is_empty() || namespace.chars().any(|c| c.is_whitespace() || c == '*') {
            return Err(SharedError::Config(format!(
                "namespace {namespace:?}: not empty, no spaces or '*'"
            )));
        }
        if timeout.is_zero() {
            return Err(SharedError::Config("timeout must be above 0".into()));
        }
        let client = redis::Client::open(url)
            .map_err(|e| SharedError::Config(format!("Redis URL {}: {e}", redact(url))))?;
        let mut origin = [0u8; 8];
        // A clock-derived name if the OS has no randomness for us: still distinct enough.
        if getrandom::fill(&mut origin).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            origin = (t ^ u64::from(std::process::id())).to_le_bytes();
        }
        let prefix = format!("tollgate:vindex:{namespace}:");
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                display: redact(url),
                stream: format!("{prefix}log"),
                prefix,
                origin: format!("{:016x}", u64::from_le_bytes(origin)),
                seq: AtomicU64::new(0),
                timeout,
                conn: tokio::sync::OnceCell::new(),
                down_until: Mutex::new(None),
                in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
                closed: AtomicBool::new(false),
                close: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Shares an entry with the other replicas for `ttl`. Returns at once: the write runs in
    /// a task of its own (bounded by the timeout); failures are counted and logged, never
    /// returned. Needs a Tokio runtime (without one the entry is not shared, and counted).
    pub fn publish(&self, scope: Scope, embedding: &Embedding, payload: Bytes, ttl: Duration) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return;
        }
        let inner = &self.inner;
        if inner.is_down() {
            error("dropped");
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            error("dropped");
            return;
        };
        let Ok(permit) = inner.in_flight.clone().try_acquire_owned() else {
            error("dropped");
            return;
        };
        let record = encode(scope, embedding, &payload);
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("{}e:{}:{seq}", inner.prefix, inner.origin);
        let inner = inner.clone();
        handle.spawn(async move {
            let _permit = permit;
            let write = async {
                let mut conn = inner.conn().await?;
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(record)
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore()
                    .cmd("XADD")
                    .arg(&inner.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAXLEN)
                    .arg("*")
                    .arg("k")
                    .arg(&key)
                    .arg("o")
                    .arg(&inner.origin)
                    .ignore();
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(inner.timeout, write).await {
                Ok(Ok(())) => ENTRIES.with_label_values(&["published"]).inc(),
                Ok(Err(e)) => inner.failed("publish", &e),
                Err(_) => inner.failed("publish", "no answer in time"),
            }
        });
    }

    /// Follows the other replicas' entries: first every entry still alive (the backfill),
    /// then each new one as it is published, each handed to `on_entry` with its remaining
    /// TTL. Runs until this handle is dropped (or the task aborted); reconnects by itself.
    /// Spawned on the current Tokio runtime; called outside one (a configuration built on a
    /// plain thread), it runs on a small runtime of its own, on a thread of its own.
    pub fn follow(
        &self,
        on_entry: impl Fn(Scope, Embedding, Bytes, Duration) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        let task = async move { inner.follow(&on_entry).await };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return handle.spawn(task);
        }
        // Only the OS refusing an epoll instance or a thread fails here; tokio::spawn would
        // have panicked in the same place.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime for the shared index follower");
        let join = rt.spawn(task);
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("vindex-follow".into())
            .spawn(move || rt.block_on(inner.closed()));
        if let Err(e) = spawned {
            error("follow");
            tracing::warn!(error = %e, "semantic shared tier: no thread to follow other replicas on");
        }
        join
    }
}

impl Inner {
    fn is_down(&self) -> bool {
        let mut d = self.down_until.lock();
        match *d {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }

    fn failed(&self, op: &str, why: &str) {
        error(op);
        *self.down_until.lock() = Some(Instant::now() + DOWN_FOR);
        tracing::debug!(redis = %self.display, op, error = why, "semantic shared tier: Redis failed; local only");
    }

    /// The command connection, made on first use (bounded by the timeout); it reconnects by
    /// itself afterwards.
    async fn conn(&self) -> Result<ConnectionManager, String> {
        let make = || async {
            // No retries inside the manager (its first retry waits a second): a command that
            // finds the connection broken fails at once and a new attempt starts.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(self.timeout)
                .set_number_of_retries(0);
            match tokio::time::timeout(
                self.timeout,
                ConnectionManager::new_with_config(self.client.clone(), config),
            )
            .await
            {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect: no answer in time".to_owned()),
            }
        };
        self.conn.get_or_try_init(make).await.cloned()
    }

    /// Returns when the handle is dropped.
    async fn closed(&self) {
        loop {
            let closed = self.close.notified();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            closed.await;
        }
    }

    /// Waits `d`, or less when the handle is dropped; true when it was.
    async fn pause(&self, d: Duration) -> bool {
        let closed = self.close.notified();
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        tokio::select! {
            _ = closed => true,
            _ = tokio::time::sleep(d) => self.closed.load(Ordering::Acquire),
        }
    }

    async fn follow(&self, on_entry: &OnEntry) {
        // `0-0`: from the first record (the backfill), then on from the last one read.
        let mut last = "0-0".to_owned();
        let mut backoff = Duration::from_millis(100);
        let mut reported = false;
        while !self.closed.load(Ordering::Acquire) {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(BLOCK + self.timeout);
            let conn = tokio::time::timeout(
                self.timeout,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await;
            let mut conn = match conn {
                Ok(Ok(c)) => c,
                other => {
                    error("follow");
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect: no answer in time".to_owned(),
                    };
                    if !reported {
                        tracing::warn!(redis = %self.display, error = %why, "semantic shared tier: cannot follow other replicas' entries; retrying");
                        reported = true;
                    }
                    if self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if reported {
                tracing::info!(redis = %self.display, "semantic shared tier: following again");
                reported = false;
            }
            backoff = Duration::from_millis(100);
            loop {
                let closed = self.close.notified();
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT")
                    .arg(BATCH)
                    .arg("BLOCK")
                    .arg(BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(&last);
                let read = cmd.query_async::<Option<StreamReadReply>>(&mut conn);
                let reply = tokio::select! {
                    _ = closed => return,
                    r = tokio::time::timeout(BLOCK + self.timeout, read) => r,
                };
                let reply = match reply {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        self.lost(&e.to_string());
                        break;
                    }
                    Err(_) => {
                        self.lost("XREAD: no answer in time");
                        break;
                    }
                };
                let records = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
                let mut keys = Vec::new();
                for r in records {
                    last = r.id;
                    let field = |f: &str| match r.map.get(f) {
                        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                        _ => None,
                    };
                    if field("o").as_deref() == Some(self.origin.as_str()) {
                        continue;
                    }
                    if let Some(k) = field("k").filter(|k| k.starts_with(&self.prefix)) {
                        keys.push(k);
                    }
                }
                if keys.is_empty() {
                    continue;
                }
                if let Err(e) = self.fetch(&mut conn, &keys, on_entry).await {
                    self.lost(&e);
                    break;
                }
            }
            if self.pause(backoff).await {
                return;
            }
        }
    }

    fn lost(&self, why: &str) {
        error("follow");
        tracing::debug!(redis = %self.display, error = why, "semantic shared tier: follower lost Redis; reconnecting");
    }

    /// Fetches `keys` (value and remaining TTL) and hands the live ones to `on_entry`.
    async fn fetch(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        keys: &[String],
        on_entry: &OnEntry,
    ) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
        }
        let values =
            match tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("GET: no answer in time".into()),
            };
        for pair in values.chunks_exact(2) {
            let (Value::BulkString(raw), Value::Int(ttl_ms)) = (&pair[0], &pair[1]) else {
                // Gone (expired or trimmed) between the record and now.
                continue;
            };
            // -1 (no expiry) cannot come from `publish`; such a key is not ours to serve.
            let Ok(ttl_ms) = u64::try_from(*ttl_ms) else {
                continue;
            };
            if ttl_ms == 0 {
                continue;
            }
            let Some((scope, e, payload)) = decode(raw) else {
                error("decode");
                continue;
            };
            ENTRIES.with_label_values(&["received"]).inc();
            on_entry(scope, e, payload, Duration::from_millis(ttl_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let e = Embedding::normalized(vec![0.5, -1.0, 2.0]).unwrap();
        let b = encode(u128::MAX - 3, &e, b"payload");
        let (s, d, p) = decode(&b).expect("decodes");
        assert_eq!(s, u128::MAX - 3);
        assert!(d.cosine(&e) > 0.99999);
        assert_eq!(&p[..], b"payload");
        assert!(decode(&b[..HEADER + 8]).is_none(), "vector cut short");
        assert!(decode(b"TGV2").is_none());
        assert!(decode(&[]).is_none());
        let mut zero = b.clone();
        zero[HEADER..HEADER + 12].fill(0);
        assert!(
            decode(&zero).is_none(),
            "an all-zero vector has no direction"
        );
        let mut wide = b.clone();
        wide[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&wide).is_none());
    }

    /// Built and followed outside any runtime (a configuration loaded on a plain thread):
    /// the follower runs on its own runtime and stops when the handle is dropped.
    #[test]
    fn follow_outside_a_runtime() {
        let s = SharedIndex::connect("redis://127.0.0.1:1", "ns", Duration::from_millis(50))
            .expect("valid");
        let join = s.follow(|_, _, _, _| {});
        // Publishing without a runtime is dropped, not a panic.
        let e = Embedding::normalized(vec![1.0]).unwrap();
        s.publish(1, &e, Bytes::new(), Duration::from_secs(1));
        drop(s);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Its runtime goes away once the handle is dropped: the task ends (cancelled).
            let _ = tokio::time::timeout(Duration::from_secs(10), join)
                .await
                .expect("ended");
        });
    }

    #[test]
    fn bad_configuration_is_refused() {
        let t = Duration::from_secs(1);
        assert!(SharedIndex::connect("redis+cluster://a:1", "ns", t).is_err());
        assert!(SharedIndex::connect("redis://127.0.0.1:1", "", t).is_err());
        assert!(SharedIndex::connect("not a url", "ns", t).is_err());
        assert!(SharedIndex::connect("redis://127.0.0.1:1", "ns", Duration::ZERO).is_err());
        assert!(SharedIndex::connect("redis://127.0.0.1:1", "ns", t).is_ok());
    }
}
