//! The Redis backend: several replicas share one Redis (or one Redis Cluster).
//!
//! # Addressing
//!
//! - a single Redis: `redis://[user:password@]host:port[/db]` (also `unix://…`, as the `redis`
//!   crate reads it);
//! - Redis Cluster: `redis+cluster://[user:password@]host1:port1,host2:port2,…` — the seed
//!   nodes, the rest is discovered. A cluster has no databases, so no `/db` path.
//!
//! # Layout (Cluster-safe: every command touches one key)
//!
//! - `tollgate:{products}`: a hash, field = product name, value = `ApiProduct` JSON;
//! - `tollgate:{apps}`: a hash, field = app name, value = `App` JSON;
//! - `tollgate:{kvm}:<map>`: a hash per key-value map, field = entry key, value = JSON;
//! - `tollgate:rl:{<key hex>}[:<window start>]`: quota counters (see [`COUNTER_SCRIPT`]);
//! - `tollgate:{counters}`: counter checkpoints, field = key hex (unused unless asked for);
//! - `tollgate:cache:<policy>:<key hex>`: ResponseCache entries, expiring with their TTL.
//!
//! A scan is one `HGETALL` per hash. [`Cond::Absent`] is `HSETNX`; [`Cond::Present`] and
//! [`Cond::Revision`] are small Lua scripts (`HGET`, compare, then `HSET`) so the check and
//! the write are atomic across replicas; a delete is `HDEL` (0 removed: not found).
//!
//! # Change feed
//!
//! After each successful write the writer increments the counter `tollgate:{changes}:seq` and
//! publishes `<seq> product:<name>` or `<seq> app:<name>` on the channel `tollgate:changes`
//! (`tollgate:changes:<db>` for a database other than 0: pub/sub channels are not scoped to a
//! database). Every replica (the writer too) holds a dedicated pub/sub connection in a
//! background task and forwards what it hears to its [`Backend::subscribe`] receivers. That task
//! reconnects by itself with back-off (trying each seed node in turn for a cluster, where a
//! classic `PUBLISH` reaches every node), and after a reconnect sends [`Change::Resync`],
//! because messages published meanwhile are lost.
//!
//! Pub/sub delivers at most once, and a notice can also be lost while the connection stays
//! up: the writer's `PUBLISH` timed out after its write, or a cluster-bus link between two
//! nodes was down. So the task also reads the counter every [`GAP_CHECK_EVERY`]; when it has
//! stood above the notices heard for a whole check, a notice is missing and the task sends
//! `Resync`. A lost change is seen within about two checks instead of never.
//!
//! Commands go through a `ConnectionManager` (single) or a `ClusterConnection` (cluster), both
//! reconnecting by themselves; each command is bounded by [`COMMAND_TIMEOUT`], so a dead Redis
//! answers [`StoreError::Unavailable`] quickly instead of hanging.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use prometheus::IntCounterVec;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, RedisFuture, Value};
use tokio::sync::broadcast;

use super::backend::{Backend, Cond, Keep, Put, Table};
use super::{Change, OpenOptions, StoreError};
use crate::ratelimit::{Ask, Decision, Window};

/// The hash holding products.
pub const PRODUCTS_KEY: &str = "tollgate:{products}";
/// The hash holding apps.
pub const APPS_KEY: &str = "tollgate:{apps}";
/// A key-value map's hash: field = entry key, value = `KvmEntry` JSON. The `{kvm}` hash tag
/// keeps every map on one Cluster slot, beside nothing else.
pub fn kvm_key(map: &str) -> String {
    format!("tollgate:{{kvm}}:{map}")
}

/// The hash holding counter checkpoints.
pub const CHECKPOINTS_KEY: &str = "tollgate:{counters}";
/// The prefix of cache entries.
pub const CACHE_PREFIX: &str = "tollgate:cache:";
/// The pub/sub channel carrying change notices.
pub const CHANGES_CHANNEL: &str = "tollgate:changes";
/// The counter each write increments before announcing itself; notices carry its value, so a
/// replica can tell that one went missing.
pub const SEQ_KEY: &str = "tollgate:{changes}:seq";
/// How often the change feed compares the counter with the notices it heard.
pub const GAP_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Notices heard out of order that the gap check keeps; past this it stops waiting and resyncs.
const MAX_AHEAD: usize = 4096;
/// The scheme of Redis Cluster URLs.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Longest wait for one command (including a reconnect it has to wait for).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the first connection, retries included.
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle pub/sub connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Quota counters. Keys: `tollgate:rl:{<key hex>}` (flexi: a hash `e` end, `n` count;
/// rolling: a hash slot index → count) and `tollgate:rl:{<key hex>}:<window start>` (fixed
/// windows: a plain counter). The hash tag is the counter's own 128-bit key, so counters
/// spread over a cluster's slots and every key one decision touches lives in one slot. Keys
/// expire a minute after their window.
///
/// Reads, judges and counts one decision atomically. KEYS[1]: the counter. ARGV: type
/// (`f` fixed, `x` flexi, `r` rolling), mode (`ec`, `e`, `c`), weight, allow, now (ms),
/// and the window's end (fixed) or length (flexi, rolling). Returns {allowed, used, expiry}.
/// A weight of 0 only reads.
pub const COUNTER_SCRIPT: &str = r"
local t, mode = ARGV[1], ARGV[2]
local w, allow, now, a = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local used, expiry, cur, slot, counts = 0, 0, 0, 1, {}
if t == 'f' then
  used = tonumber(redis.call('GET', KEYS[1]) or '0')
  expiry = a
elseif t == 'x' then
  local v = redis.call('HMGET', KEYS[1], 'e', 'n')
  local e = tonumber(v[1])
  if e and e > now then
    used = tonumber(v[2]) or 0
    expiry = e
  else
    expiry = now + a
  end
else
  slot = math.max(1, math.ceil(a / 10))
  cur = math.floor(now / slot)
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local k = tonumber(all[i])
    if k > cur - 10 then
      counts[k] = tonumber(all[i + 1])
      used = used + counts[k]
    else
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  expiry = (cur + 1) * slot
end
local allowed = 1
if mode ~= 'c' and used + w > allow then
  allowed = 0
  if t == 'r' then
    -- Refused: when enough of the oldest slots have left for this weight to fit.
    expiry = (cur + 10) * slot
    local left = used
    for k = cur - 9, cur do
      left = left - (counts[k] or 0)
      if left + w <= allow then
        expiry = (k + 10) * slot
        break
      end
    end
  end
end
if allowed == 1 and mode ~= 'e' and w > 0 then
  used = used + w
  if t == 'f' then
    redis.call('INCRBY', KEYS[1], w)
    redis.call('PEXPIREAT', KEYS[1], expiry + 60000)
  elseif t == 'x' then
    redis.call('HSET', KEYS[1], 'e', expiry, 'n', used)
    redis.call('PEXPIREAT', KEYS[1], expiry + 60000)
  else
    redis.call('HINCRBY', KEYS[1], cur, w)
    redis.call('PEXPIRE', KEYS[1], a + slot + 60000)
  end
end
return {allowed, used, expiry}
";

/// `HSET` a product or app only if it exists at the expected revision (`ARGV[3]`): 1
/// written, 0 absent, -1 another revision stored (a concurrent update won). The revision is
/// read from the stored JSON with Redis's bundled `cjson`; an object without one is at 0.
const UPDATE_OBJECT_SCRIPT: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  return 0
end
local ok, doc = pcall(cjson.decode, cur)
local rev = 0
if ok and type(doc) == 'table' and type(doc['revision']) == 'number' then
  rev = doc['revision']
end
if rev ~= tonumber(ARGV[3]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// `HSET` the field only if it exists: 1 written, 0 absent.
const UPDATE_SCRIPT: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
";

/// The command connection: one server or a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Change-feed re-reads by reason: `reconnect` (the pub/sub connection was re-established),
/// `gap` (a numbered notice never arrived), `counter_reset` (the counter went back: Redis
/// lost its data).
static FEED_RESYNCS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_store_feed_resyncs_total",
            "Full re-reads of the Redis store requested by the change feed, by reason",
        ),
        &["reason"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "store feed metric not registered");
    }
    c
});

/// Aborts the subscriber task when the store goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct RedisBackend {
    conn: Conn,
    /// The URL without its password, for messages.
    target: String,
    update: redis::Script,
    update_object: redis::Script,
    counter: redis::Script,
    /// Longest wait for one command.
    timeout: Duration,
    changes: broadcast::Sender<Change>,
    /// The pub/sub channel of this database.
    channel: String,
    /// The change feed's subscriber task, when following it.
    _subscriber: Option<AbortOnDrop>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.target)
            .field(
                "mode",
                &match self.conn {
                    Conn::Single(_) => "single",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .finish_non_exhaustive()
    }
}

/// What a URL addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Single(String),
    /// Seed node URLs (`redis://…` each).
    Cluster(Vec<String>),
}

fn parse_target(url: &str) -> Result<Target, String> {
    let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
        return Ok(Target::Single(url.to_owned()));
    };
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.contains('/') || hosts.contains('?') {
        return Err(
            "a Redis Cluster URL takes no path or query (a cluster has no databases)".into(),
        );
    }
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| match userinfo {
            Some(u) => format!("redis://{u}@{h}"),
            None => format!("redis://{h}"),
        })
        .collect();
    if nodes.is_empty() {
        return Err(format!(
            "a Redis Cluster URL names at least one node: {CLUSTER_SCHEME}host:port[,host:port…]"
        ));
    }
    Ok(Target::Cluster(nodes))
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

fn unavailable(target: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis {target}: {what}: {e}"))
}

/// Bounds a Redis future by `limit`, mapping errors and timeouts to `Unavailable`.
async fn bounded<T>(
    target: &str,
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(target, what, e)),
        Err(_) => Err(unavailable(
            target,
            what,
            format!("no answer within {} ms", limit.as_millis()),
        )),
    }
}

/// The change channel of database `db`.
fn changes_channel(db: i64) -> String {
    if db == 0 {
        CHANGES_CHANNEL.to_owned()
    } else {
        format!("{CHANGES_CHANNEL}:{db}")
    }
}

/// A subscribed pub/sub connection to one node.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

/// Reads a change notice and its number, if it has one; anything unknown asks for a full
/// re-read.
fn parse_notice(payload: &[u8]) -> (Option<u64>, Change) {
    let Ok(mut text) = std::str::from_utf8(payload) else {
        return (None, Change::Resync);
    };
    let mut seq = None;
    // Unnumbered notices start with a letter, so a leading number is unambiguous.
    if let Some((n, rest)) = text.split_once(' ') {
        if let Ok(n) = n.parse::<u64>() {
            seq = Some(n);
            text = rest;
        }
    }
    let change = match text.split_once(':') {
        Some(("product", name)) => Change::Product(name.to_owned()),
        Some(("app", name)) => Change::App(name.to_owned()),
        _ => Change::Resync,
    };
    (seq, change)
}

fn change_message(seq: Option<u64>, change: &Change) -> String {
    let text = match change {
        Change::Product(name) => format!("product:{name}"),
        Change::App(name) => format!("app:{name}"),
        Change::Resync => "resync".to_owned(),
    };
    match seq {
        Some(n) => format!("{n} {text}"),
        None => text,
    }
}

/// What the change feed has heard of the write counter, to find notices that never came.
#[derive(Debug, Default)]
struct Heard {
    /// Every notice up to this number was heard, or predates the subscription; `None` until
    /// the counter could be read.
    through: Option<u64>,
    /// Numbers heard beyond `through`.
    ahead: BTreeSet<u64>,
    /// The counter at the previous check, when it stood above `through`.
    suspect: Option<u64>,
}

/// What a counter check found.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Fine,
    /// A notice at or below the counter of the previous check has still not come.
    Gap,
    /// The counter is below what was heard: Redis lost its data or was flushed.
    CounterReset,
}

impl Heard {
    /// Everything up to `counter` is accounted for (it was read before the consumer's next
    /// full read).
    fn start_at(&mut self, counter: u64) {
        self.through = Some(counter);
        self.ahead.retain(|&n| n > counter);
        self.suspect = None;
        self.advance();
    }

    fn advance(&mut self) {
        if let Some(t) = self.through.as_mut() {
            while self.ahead.remove(&(*t + 1)) {
                *t += 1;
            }
        }
    }

    fn heard(&mut self, seq: u64) {
        if self.through.is_some_and(|t| seq <= t) {
            return;
        }
        if self.through.is_none() && self.ahead.len() >= MAX_AHEAD {
            // Kept only for the first check, which drops what it covers.
            self.ahead.pop_first();
        }
        self.ahead.insert(seq);
        self.advance();
    }

    /// Compares the counter read now with what was heard. After `Gap` or `CounterReset` the
    /// caller sends `Resync` and calls `start_at(counter)`.
    fn check(&mut self, counter: u64) -> Check {
        let Some(through) = self.through else {
            self.start_at(counter);
            return Check::Fine;
        };
        if counter < through || self.ahead.last().is_some_and(|&n| n > counter) {
            return Check::CounterReset;
        }
        // A notice is published right after its increment, so one whole check is plenty of
        // time for it to arrive.
        if self.suspect.is_some_and(|s| through < s) || self.ahead.len() > MAX_AHEAD {
            return Check::Gap;
        }
        self.suspect = (counter > through).then_some(counter);
        Check::Fine
    }
}

/// The feed's view of the write counter: where to read it, and what was heard.
struct Sequence {
    conn: Conn,
    /// The URL without its password, for messages.
    target: String,
    heard: Heard,
}

impl Sequence {
    /// Reads the write counter (0 before the first write).
    async fn read(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("GET").arg(SEQ_KEY).clone();
        let n: Option<u64> = bounded(
            &self.target,
            "read the change counter",
            COMMAND_TIMEOUT,
            cmd.query_async(&mut conn),
        )
        .await?;
        Ok(n.unwrap_or(0))
    }

    /// Starts counting from the counter as it is now; on failure the first check will.
    async fn restart(&mut self) {
        self.heard = Heard::default();
        if let Ok(n) = self.read().await {
            self.heard.start_at(n);
        }
    }

    /// Reads the counter; `Some(reason)` when the consumer must re-read everything.
    async fn check(&mut self) -> Option<&'static str> {
        let n = match self.read().await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "redis change counter unreadable");
                return None;
            }
        };
        let reason = match self.heard.check(n) {
            Check::Fine => return None,
            Check::Gap => "gap",
            Check::CounterReset => "counter_reset",
        };
        self.heard.start_at(n);
        Some(reason)
    }
}

fn resync(tx: &broadcast::Sender<Change>, reason: &'static str) {
    FEED_RESYNCS.with_label_values(&[reason]).inc();
    let _ = tx.send(Change::Resync);
}

/// Forwards messages and checks the counter until the connection is lost.
async fn pump(pubsub: redis::aio::PubSub, tx: &broadcast::Sender<Change>, seq: &mut Sequence) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut gaps = tokio::time::interval(GAP_CHECK_EVERY);
    gaps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gaps.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => {
                    let (n, change) = parse_notice(msg.get_payload_bytes());
                    if let Some(n) = n {
                        seq.heard.heard(n);
                    }
                    let _ = tx.send(change);
                }
                None => return,
            },
            _ = gaps.tick() => {
                if let Some(reason) = seq.check().await {
                    tracing::warn!(reason, "redis change feed missed a notice; resyncing");
                    resync(tx, reason);
                }
            },
            _ = ping.tick() => {
                match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "redis change feed ping failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("redis change feed ping timed out");
                        return;
                    }
                }
            }
        }
    }
}

/// The subscriber task: forwards notices, reconnects with back-off, and sends `Resync` after
/// every reconnect.
async fn follow(
    nodes: Vec<redis::Client>,
    channel: String,
    first: redis::aio::PubSub,
    mut seq: Sequence,
    tx: broadcast::Sender<Change>,
) {
    let mut current = Some(first);
    let mut next = 0usize;
    loop {
        if let Some(pubsub) = current.take() {
            pump(pubsub, &tx, &mut seq).await;
            tracing::warn!(redis = %seq.target, "redis change feed lost; reconnecting");
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let Some(client) = nodes.get(next % nodes.len().max(1)) else {
                return;
            };
            next = next.wrapping_add(1);
            match tokio::time::timeout(CONNECT_TIMEOUT, subscribe(client, &channel)).await {
                Ok(Ok(pubsub)) => {
                    tracing::info!(redis = %seq.target, "redis change feed reconnected; resyncing");
                    current = Some(pubsub);
                    // Read before the consumer's full re-read, which covers what came before.
                    seq.restart().await;
                    // Whatever was published while disconnected is lost: re-read everything.
                    resync(&tx, "reconnect");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(redis = %seq.target, error = %e, "redis change feed reconnect failed")
                }
                Err(_) => {
                    tracing::debug!(redis = %seq.target, "redis change feed reconnect timed out")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// How long [`command_connection`] waits.
#[derive(Debug, Clone, Copy)]
struct Limits {
    connect: Duration,
    command: Duration,
    first_connect: Duration,
}

impl Limits {
    fn new(timeout: Option<Duration>) -> Self {
        match timeout {
            None => Self {
                connect: CONNECT_TIMEOUT,
                command: COMMAND_TIMEOUT,
                first_connect: FIRST_CONNECT_TIMEOUT,
            },
            Some(t) => Self {
                connect: t,
                command: t,
                first_connect: t,
            },
        }
    }
}

/// Checks a Redis URL without connecting (for configuration errors at load).
pub fn check_url(url: &str) -> Result<(), String> {
    match parse_target(url)? {
        Target::Single(u) => redis::Client::open(u.as_str())
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Target::Cluster(seeds) => seeds.iter().try_for_each(|s| {
            redis::Client::open(s.as_str())
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
    }
}

/// A command connection to `url` (see the module documentation for the schemes), the
/// clients of its nodes (for pub/sub) and the URL without its password. Commands reconnect
/// by themselves.
async fn command_connection(
    url: &str,
    limits: Limits,
) -> Result<(Conn, Vec<redis::Client>, String), StoreError> {
    let display = redact(url);
    let target = parse_target(url).map_err(|e| unavailable(&display, "bad URL", e))?;
    let (conn, nodes) = match &target {
        Target::Single(u) => {
            let client =
                redis::Client::open(u.as_str()).map_err(|e| unavailable(&display, "bad URL", e))?;
            // No retries inside the manager (its first retry waits at least a second):
            // a command that finds the connection broken fails at once and starts a new
            // connection attempt, so the manager reconnects on demand and recovers on the
            // first command after Redis is back.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(limits.connect)
                .set_response_timeout(limits.command)
                .set_number_of_retries(0);
            let manager = bounded(
                &display,
                "connect",
                limits.first_connect,
                ConnectionManager::new_with_config(client.clone(), config),
            )
            .await?;
            (Conn::Single(manager), vec![client])
        }
        Target::Cluster(seeds) => {
            let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(limits.connect)
                .response_timeout(limits.command)
                .retries(2)
                .build()
                .map_err(|e| unavailable(&display, "bad URL", e))?;
            let conn = bounded(
                &display,
                "connect to the cluster",
                limits.first_connect,
                client.get_async_connection(),
            )
            .await?;
            let nodes = seeds
                .iter()
                .map(|s| redis::Client::open(s.as_str()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unavailable(&display, "bad URL", e))?;
            (Conn::Cluster(conn), nodes)
        }
    };
    Ok((conn, nodes, display))
}

/// The Redis key of an ask's counter.
pub fn counter_key(ask: &Ask) -> String {
    match ask.window {
        Window::Fixed { start, .. } => format!("tollgate:rl:{{{}}}:{start}", ask.key.hex()),
        _ => format!("tollgate:rl:{{{}}}", ask.key.hex()),
    }
}

/// The counter script's arguments after the key: type, mode, weight, allow, now, and the
/// window's end (fixed) or length.
fn counter_args(ask: &Ask) -> (&'static str, &'static str, u64, u64, i64, i64) {
    let (t, a) = match ask.window {
        Window::Fixed { end, .. } => ("f", end),
        Window::Flexi { len } => ("x", len),
        Window::Rolling { len } => ("r", len),
    };
    (t, ask.mode.code(), ask.weight, ask.allow, ask.now, a)
}

fn parse_counter_reply(v: &Value) -> Option<Decision> {
    let Value::Array(items) = v else { return None };
    let n = |i: usize| match items.get(i)? {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    Some(Decision {
        allowed: n(0)? == 1,
        used: u64::try_from(n(1)?).unwrap_or(0),
        expiry: n(2)?,
        degraded: false,
    })
}

type ValueFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = redis::RedisResult<Value>> + Send>>;

/// The key of a cache entry.
fn cache_key(key: &str) -> String {
    format!("{CACHE_PREFIX}{key}")
}

/// The table's hash.
fn hash_of(table: Table<'_>) -> String {
    match table {
        Table::Products => PRODUCTS_KEY.to_owned(),
        Table::Apps => APPS_KEY.to_owned(),
        Table::Kvm(map) => kvm_key(map),
    }
}

impl RedisBackend {
    /// Connects to `url` (see the module documentation for the schemes), subscribes to the
    /// change channel and starts the subscriber task. Fails with `Unavailable` when Redis
    /// cannot be reached within a few seconds.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, OpenOptions::default()).await
    }

    /// [`RedisBackend::connect`], following the change feed only when `opts` asks, within
    /// `opts.timeout` when given.
    pub async fn connect_with(url: &str, opts: OpenOptions) -> Result<Self, StoreError> {
        let limits = Limits::new(opts.timeout);
        let (conn, nodes, display) = command_connection(url, limits).await?;
        let mut store_conn = conn;
        // Fail now, clearly, rather than on the first request.
        bounded(
            &display,
            "PING",
            limits.command,
            redis::cmd("PING").query_async::<Value>(&mut store_conn),
        )
        .await?;
        let channel = changes_channel(store_conn.get_db());
        let changes = broadcast::channel(1024).0;
        let subscriber = if opts.change_feed {
            // Subscribe before returning, so no change made afterwards is missed.
            let mut first = None;
            let mut last_error = None;
            for client in &nodes {
                match tokio::time::timeout(limits.connect, subscribe(client, &channel)).await {
                    Ok(Ok(p)) => {
                        first = Some(p);
                        break;
                    }
                    Ok(Err(e)) => last_error = Some(e.to_string()),
                    Err(_) => last_error = Some("timed out".to_owned()),
                }
            }
            let Some(first) = first else {
                return Err(unavailable(
                    &display,
                    "subscribe to the change channel",
                    last_error.unwrap_or_else(|| "no node".to_owned()),
                ));
            };
            // Read after subscribing: every later write is then heard or found missing.
            let mut seq = Sequence {
                conn: store_conn.clone(),
                target: display.clone(),
                heard: Heard::default(),
            };
            seq.restart().await;
            let task = tokio::spawn(follow(nodes, channel.clone(), first, seq, changes.clone()));
            Some(AbortOnDrop(task))
        } else {
            None
        };
        Ok(Self {
            conn: store_conn,
            target: display,
            update: redis::Script::new(UPDATE_SCRIPT),
            update_object: redis::Script::new(UPDATE_OBJECT_SCRIPT),
            counter: redis::Script::new(COUNTER_SCRIPT),
            timeout: limits.command,
            changes,
            channel,
            _subscriber: subscriber,
        })
    }

    async fn query<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        bounded(&self.target, what, self.timeout, cmd.query_async(&mut conn)).await
    }

    /// A read: when it finds the connection broken (Redis restarted while this replica was
    /// idle), it is tried once more on the connection the manager re-establishes, within the
    /// same time bound. Writes are not retried: one may have been applied before the break.
    async fn read<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T, StoreError> {
        let attempts = async {
            let mut conn = self.conn.clone();
            match cmd.query_async(&mut conn).await {
                Err(e) if e.is_io_error() || e.is_unrecoverable_error() => {
                    tracing::debug!(error = %e, "redis read retried on a new connection");
                    let mut conn = self.conn.clone();
                    cmd.query_async(&mut conn).await
                }
                r => r,
            }
        };
        bounded(&self.target, what, self.timeout, attempts).await
    }

    async fn script<T: FromRedisValue>(
        &self,
        what: &str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        bounded(
            &self.target,
            what,
            self.timeout,
            invocation.invoke_async(&mut conn),
        )
        .await
    }

    /// Several counter calls: one pipeline on a single server; on a cluster, where a
    /// pipeline must stay in one slot, concurrent calls.
    async fn count_many(&self, asks: &[Ask]) -> redis::RedisResult<Vec<Value>> {
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for ask in asks {
                    let (t, mode, w, allow, now, arg) = counter_args(ask);
                    pipe.cmd("EVAL")
                        .arg(COUNTER_SCRIPT)
                        .arg(1)
                        .arg(counter_key(ask))
                        .arg(t)
                        .arg(mode)
                        .arg(w)
                        .arg(allow)
                        .arg(now)
                        .arg(arg);
                }
                let mut conn = self.conn.clone();
                pipe.query_async::<Vec<Value>>(&mut conn).await
            }
            Conn::Cluster(_) => {
                let futures: Vec<ValueFuture> = asks
                    .iter()
                    .map(|ask| {
                        let mut conn = self.conn.clone();
                        let script = self.counter.clone();
                        let key = counter_key(ask);
                        let (t, mode, w, allow, now, arg) = counter_args(ask);
                        Box::pin(async move {
                            script
                                .key(key)
                                .arg(t)
                                .arg(mode)
                                .arg(w)
                                .arg(allow)
                                .arg(now)
                                .arg(arg)
                                .invoke_async::<Value>(&mut conn)
                                .await
                        }) as ValueFuture
                    })
                    .collect();
                futures_util::stream::iter(futures)
                    .buffered(64)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.query::<Value>("PING", &redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    async fn get(&self, table: Table<'_>, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let cmd = redis::cmd("HGET").arg(hash_of(table)).arg(key).clone();
        self.read("HGET", &cmd).await
    }

    /// One `HGETALL` per table, not one atomic read: a write landing between them is
    /// announced on the change feed, which re-reads it.
    async fn scan(&self, tables: &[Table<'_>]) -> Result<Vec<Vec<(String, Vec<u8>)>>, StoreError> {
        let mut out = Vec::with_capacity(tables.len());
        for t in tables {
            let cmd = redis::cmd("HGETALL").arg(hash_of(*t)).clone();
            let raw: BTreeMap<String, Vec<u8>> = self.read("HGETALL", &cmd).await?;
            out.push(raw.into_iter().collect());
        }
        Ok(out)
    }

    async fn put(
        &self,
        table: Table<'_>,
        key: &str,
        value: Vec<u8>,
        cond: Cond,
    ) -> Result<Put, StoreError> {
        let hash = hash_of(table);
        let written: i64 = match cond {
            Cond::Any => {
                let cmd = redis::cmd("HSET").arg(&hash).arg(key).arg(value).clone();
                let _: i64 = self.query("HSET", &cmd).await?;
                1
            }
            Cond::Absent => {
                let cmd = redis::cmd("HSETNX").arg(&hash).arg(key).arg(value).clone();
                self.query("HSETNX", &cmd).await?
            }
            Cond::Present => {
                let mut invocation = self.update.prepare_invoke();
                invocation.key(&hash).arg(key).arg(value);
                self.script("update script", invocation).await?
            }
            Cond::Revision(r) => {
                let mut invocation = self.update_object.prepare_invoke();
                invocation.key(&hash).arg(key).arg(value).arg(r);
                self.script("update script", invocation).await?
            }
        };
        Ok(match (written, cond) {
            (1.., _) => Put::Written,
            (0, Cond::Absent) => Put::Exists,
            (0, _) => Put::Missing,
            _ => Put::Stale,
        })
    }

    async fn delete(&self, table: Table<'_>, key: &str) -> Result<bool, StoreError> {
        let cmd = redis::cmd("HDEL").arg(hash_of(table)).arg(key).clone();
        let removed: i64 = self.query("HDEL", &cmd).await?;
        Ok(removed > 0)
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Numbers and announces a change to every replica. A notice that is not published
    /// leaves the counter above what replicas hear, and their gap check re-reads everything.
    async fn announce(&self, change: Change) {
        let incr = redis::cmd("INCR").arg(SEQ_KEY).clone();
        let seq = match self.query::<u64>("INCR", &incr).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, ?change, "cannot number a store change");
                None
            }
        };
        let cmd = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(change_message(seq, &change))
            .clone();
        if let Err(e) = self.query::<Value>("PUBLISH", &cmd).await {
            tracing::warn!(error = %e, ?change, "cannot announce a store change");
        }
    }

    /// One call of [`COUNTER_SCRIPT`] per ask: a single one by `EVALSHA`, several in one
    /// pipeline (or concurrently on a cluster). The caller bounds the wait.
    async fn count(&self, asks: &[Ask]) -> Result<Vec<Option<Decision>>, StoreError> {
        let fail = |e: &dyn std::fmt::Display| unavailable(&self.target, "counters", e);
        let replies = match asks {
            [] => return Ok(Vec::new()),
            [ask] => {
                let (t, mode, w, allow, now, arg) = counter_args(ask);
                let mut inv = self.counter.prepare_invoke();
                inv.key(counter_key(ask))
                    .arg(t)
                    .arg(mode)
                    .arg(w)
                    .arg(allow)
                    .arg(now)
                    .arg(arg);
                let mut conn = self.conn.clone();
                vec![inv
                    .invoke_async::<Value>(&mut conn)
                    .await
                    .map_err(|e| fail(&e))?]
            }
            _ => self.count_many(asks).await.map_err(|e| fail(&e))?,
        };
        if replies.len() != asks.len() {
            return Err(fail(&format!(
                "{} replies for {} commands",
                replies.len(),
                asks.len()
            )));
        }
        Ok(replies.iter().map(parse_counter_reply).collect())
    }

    async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        let cmd = redis::cmd("HGETALL").arg(CHECKPOINTS_KEY).clone();
        let raw: BTreeMap<String, Vec<u8>> = self.read("HGETALL", &cmd).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| Some((u128::from_str_radix(&k, 16).ok()?, v)))
            .collect())
    }

    async fn save_counters(
        &self,
        rows: Vec<(u128, Vec<u8>)>,
        keep: Keep,
    ) -> Result<(), StoreError> {
        if !rows.is_empty() {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(CHECKPOINTS_KEY);
            for (k, v) in &rows {
                cmd.arg(format!("{k:032x}")).arg(v.as_slice());
            }
            let _: i64 = self.query("HSET", &cmd).await?;
        }
        let cmd = redis::cmd("HGETALL").arg(CHECKPOINTS_KEY).clone();
        let raw: BTreeMap<String, Vec<u8>> = self.read("HGETALL", &cmd).await?;
        let gone: Vec<&String> = raw
            .iter()
            .filter(|(_, v)| !keep(v))
            .map(|(k, _)| k)
            .collect();
        if !gone.is_empty() {
            let cmd = redis::cmd("HDEL").arg(CHECKPOINTS_KEY).arg(gone).clone();
            let _: i64 = self.query("HDEL", &cmd).await?;
        }
        Ok(())
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let cmd = redis::cmd("GET").arg(cache_key(key)).clone();
        self.query("GET", &cmd).await
    }

    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Ok(());
        }
        let cmd = redis::cmd("SET")
            .arg(cache_key(key))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .clone();
        self.query::<()>("SET", &cmd).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_target("redis://127.0.0.1:6379/2"),
            Ok(Target::Single("redis://127.0.0.1:6379/2".into()))
        );
        assert_eq!(
            parse_target("redis+cluster://u:p@h1:1,h2:2/"),
            Ok(Target::Cluster(vec![
                "redis://u:p@h1:1".into(),
                "redis://u:p@h2:2".into()
            ]))
        );
        assert!(parse_target("redis+cluster://").is_err());
        assert!(parse_target("redis+cluster://h1:1/3").is_err());
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://secret@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn change_messages() {
        for c in [
            Change::Product("a:b ü".into()),
            Change::Product("12 b".into()),
            Change::App("x".into()),
            Change::Resync,
        ] {
            for seq in [None, Some(0), Some(u64::MAX)] {
                assert_eq!(
                    parse_notice(change_message(seq, &c).as_bytes()),
                    (seq, c.clone())
                );
            }
        }
        assert_eq!(parse_notice(b"\xff"), (None, Change::Resync));
        assert_eq!(parse_notice(b"kvm:x"), (None, Change::Resync));
        assert_eq!(parse_notice(b"-1 app:x"), (None, Change::Resync));
        assert_eq!(changes_channel(0), "tollgate:changes");
        assert_eq!(changes_channel(3), "tollgate:changes:3");
    }

    #[test]
    fn heard_in_order_is_fine() {
        let mut h = Heard::default();
        h.start_at(10);
        assert_eq!(h.check(12), Check::Fine);
        h.heard(12);
        h.heard(11);
        assert_eq!(h.through, Some(12));
        assert!(h.ahead.is_empty());
        assert_eq!(h.check(12), Check::Fine);
        assert_eq!(h.check(12), Check::Fine);
        // Notices that predate the start are ignored.
        h.heard(3);
        assert_eq!(h.through, Some(12));
    }

    #[test]
    fn a_notice_in_flight_gets_one_check() {
        let mut h = Heard::default();
        h.start_at(0);
        assert_eq!(h.check(1), Check::Fine);
        h.heard(1);
        assert_eq!(h.check(2), Check::Fine);
        h.heard(2);
        assert_eq!(h.check(2), Check::Fine);
    }

    #[test]
    fn a_lost_notice_is_a_gap_on_the_next_check() {
        let mut h = Heard::default();
        h.start_at(5);
        h.heard(7);
        assert_eq!(h.check(7), Check::Fine);
        // 6 never comes; 8 does.
        h.heard(8);
        assert_eq!(h.check(8), Check::Gap);
        h.start_at(8);
        assert_eq!((h.through, h.ahead.len()), (Some(8), 0));
        assert_eq!(h.check(8), Check::Fine);
        assert_eq!(h.check(8), Check::Fine);
    }

    #[test]
    fn an_unpublished_change_is_a_gap() {
        let mut h = Heard::default();
        h.start_at(0);
        assert_eq!(h.check(1), Check::Fine);
        assert_eq!(h.check(1), Check::Gap);
    }

    #[test]
    fn a_counter_that_goes_back_is_a_reset() {
        let mut h = Heard::default();
        h.start_at(9);
        assert_eq!(h.check(2), Check::CounterReset);
        let mut h = Heard::default();
        h.start_at(0);
        h.heard(4);
        assert_eq!(h.check(1), Check::CounterReset);
    }

    #[test]
    fn an_unknown_start_is_set_by_the_first_check() {
        let mut h = Heard::default();
        h.heard(4);
        assert_eq!(h.check(4), Check::Fine);
        assert_eq!(h.through, Some(4));
        assert_eq!(h.check(4), Check::Fine);
    }

    #[test]
    fn too_many_out_of_order_is_a_gap() {
        let mut h = Heard::default();
        h.start_at(0);
        for n in 2..(MAX_AHEAD as u64 + 3) {
            h.heard(n);
        }
        assert_eq!(h.check(MAX_AHEAD as u64 + 2), Check::Gap);
    }

    #[test]
    fn keys_hash_tag_the_counter() {
        let mut ask = Ask {
            key: crate::ratelimit::Key(0xab),
            window: Window::Fixed {
                start: 60_000,
                end: 120_000,
            },
            allow: 1,
            weight: 1,
            mode: crate::ratelimit::Mode::EnforceAndCount,
            now: 0,
            fail_open: true,
            overflow: crate::ratelimit::Key(1),
        };
        assert_eq!(
            counter_key(&ask),
            "tollgate:rl:{000000000000000000000000000000ab}:60000"
        );
        ask.window = Window::Flexi { len: 1 };
        assert_eq!(
            counter_key(&ask),
            "tollgate:rl:{000000000000000000000000000000ab}"
        );
        assert_eq!(
            parse_counter_reply(&Value::Array(vec![
                Value::Int(1),
                Value::Int(5),
                Value::Int(9)
            ])),
            Some(Decision {
                allowed: true,
                used: 5,
                expiry: 9,
                degraded: false
            })
        );
        assert_eq!(parse_counter_reply(&Value::Nil), None);
    }
}
