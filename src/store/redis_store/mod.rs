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
//! - `tollgate:cache:<policy>:<key hex>`: ResponseCache entries, expiring with their TTL;
//! - `tollgate:usage:<bucket>`: a hash per usage bucket (`<dimension>:<hour|day>:<start>`),
//!   field = `<metric>:<name>`, value = the total over every replica (see `crate::usage`).
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
//! `Resync`. A lost change is seen within about two checks instead of never. The feed lives
//! in [`feed`]; a backend opened without it ([`OpenOptions::change_feed`] false: counters, the
//! cache tier) holds no pub/sub connection.
//!
//! Commands go through a `ConnectionManager` (single) or a `ClusterConnection` (cluster), both
//! reconnecting by themselves; each command is bounded by [`COMMAND_TIMEOUT`] (or
//! [`OpenOptions::timeout`]), so a dead Redis
//! answers [`StoreError::Unavailable`] quickly instead of hanging.

mod feed;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, RedisFuture, Value};
use tokio::sync::broadcast;

use super::backend::{Backend, Cond, Keep, Put, Table, TallyAdd, Visit};
use super::{Change, OpenOptions, StoreError};
use crate::counters::{Adjust, Ask, Decision, Window};

pub use feed::GAP_CHECK_EVERY;

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
/// The scheme of Redis Cluster URLs.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Longest wait for one command (including a reconnect it has to wait for).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the first connection, retries included.
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Adjusts what a reservation counted ([`Adjust`]), atomically. KEYS[1]: the counter (as
/// for [`COUNTER_SCRIPT`]). ARGV: type (`f`, `x`, `r`), delta (signed), now (ms), the
/// window's end (fixed) or length (flexi, rolling), when the reservation counted (ms, picks
/// the rolling slot) and the flexi window's end it counted in. The count never goes below 0.
/// Returns {1, count after} or {0, 0} when that window (or slot) has passed: moot.
pub const ADJUST_SCRIPT: &str = r"
local t = ARGV[1]
local d, now, a, at, cend = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if t == 'f' then
  if now >= a then return {0, 0} end
  local n = math.max(0, tonumber(redis.call('GET', KEYS[1]) or '0') + d)
  redis.call('SET', KEYS[1], n)
  redis.call('PEXPIREAT', KEYS[1], a + 60000)
  return {1, n}
elseif t == 'x' then
  local v = redis.call('HMGET', KEYS[1], 'e', 'n')
  local e = tonumber(v[1])
  if (not e) or e ~= cend or e <= now then return {0, 0} end
  local n = math.max(0, (tonumber(v[2]) or 0) + d)
  redis.call('HSET', KEYS[1], 'n', n)
  return {1, n}
end
local slot = math.max(1, math.ceil(a / 10))
local cur = math.floor(now / slot)
local k = math.floor(at / slot)
if k <= cur - 10 or k > cur then return {0, 0} end
local n = math.max(0, tonumber(redis.call('HGET', KEYS[1], k) or '0') + d)
if n > 0 then
  redis.call('HSET', KEYS[1], k, n)
  redis.call('PEXPIRE', KEYS[1], a + slot + 60000)
else
  redis.call('HDEL', KEYS[1], k)
end
local used = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i]) > cur - 10 then used = used + tonumber(all[i + 1]) end
end
return {1, used}
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

/// The key of a usage tally bucket.
fn tally_key(bucket: &str) -> String {
    format!("tollgate:usage:{bucket}")
}

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

pub struct RedisBackend {
    conn: Conn,
    /// The URL without its password, for messages.
    target: String,
    update: redis::Script,
    update_object: redis::Script,
    counter: redis::Script,
    adjust: redis::Script,
    /// Longest wait for one command.
    timeout: Duration,
    changes: broadcast::Sender<Change>,
    /// The pub/sub channel of this database.
    channel: String,
    /// The change feed's subscriber task, when following it.
    _subscriber: Option<feed::AbortOnDrop>,
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
pub(crate) fn redact(url: &str) -> String {
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

/// The answers of the asks on one counter, with their places in the batch.
type GroupFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = redis::RedisResult<Vec<(usize, Value)>>> + Send>,
>;

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
        let channel = feed::changes_channel(store_conn.get_db());
        let changes = broadcast::channel(1024).0;
        let subscriber = if opts.change_feed {
            // Subscribed before returning, so no change made afterwards is missed.
            let feed = feed::Feed {
                nodes,
                channel: channel.clone(),
                conn: store_conn.clone(),
                target: display.clone(),
                connect_timeout: limits.connect,
            };
            Some(feed.start(changes.clone()).await?)
        } else {
            None
        };
        Ok(Self {
            conn: store_conn,
            target: display,
            update: redis::Script::new(UPDATE_SCRIPT),
            update_object: redis::Script::new(UPDATE_OBJECT_SCRIPT),
            counter: redis::Script::new(COUNTER_SCRIPT),
            adjust: redis::Script::new(ADJUST_SCRIPT),
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
                // Asks on the same counter run one after another, in batch order, so each
                // answer is that counter's running total at its turn; distinct counters
                // (spread over slots) run concurrently.
                let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
                let mut by_key: HashMap<String, usize> = HashMap::new();
                for (i, ask) in asks.iter().enumerate() {
                    let key = counter_key(ask);
                    match by_key.get(&key) {
                        Some(&g) => groups[g].1.push(i),
                        None => {
                            by_key.insert(key.clone(), groups.len());
                            groups.push((key, vec![i]));
                        }
                    }
                }
                let futures: Vec<GroupFuture> = groups
                    .into_iter()
                    .map(|(key, idx)| {
                        let conn = self.conn.clone();
                        let script = self.counter.clone();
                        let args: Vec<_> = idx.iter().map(|&i| counter_args(&asks[i])).collect();
                        Box::pin(async move {
                            let mut out = Vec::with_capacity(idx.len());
                            for (i, (t, mode, w, allow, now, arg)) in idx.into_iter().zip(args) {
                                let mut conn = conn.clone();
                                let v = script
                                    .key(&key)
                                    .arg(t)
                                    .arg(mode)
                                    .arg(w)
                                    .arg(allow)
                                    .arg(now)
                                    .arg(arg)
                                    .invoke_async::<Value>(&mut conn)
                                    .await?;
                                out.push((i, v));
                            }
                            Ok(out)
                        }) as GroupFuture
                    })
                    .collect();
                let done = futures_util::stream::iter(futures)
                    .buffer_unordered(64)
                    .collect::<Vec<_>>()
                    .await;
                let mut values: Vec<Option<Value>> = vec![None; asks.len()];
                for group in done {
                    for (i, v) in group? {
                        values[i] = Some(v);
                    }
                }
                Ok(values
                    .into_iter()
                    .map(|v| v.unwrap_or(Value::Nil))
                    .collect())
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
    async fn scan(&self, tables: &[Table<'_>], mut visit: Visit) -> Result<(), StoreError> {
        for (i, t) in tables.iter().enumerate() {
            let cmd = redis::cmd("HGETALL").arg(hash_of(*t)).clone();
            let raw: BTreeMap<String, Vec<u8>> = self.read("HGETALL", &cmd).await?;
            for (k, v) in &raw {
                visit(i, k, v);
            }
        }
        Ok(())
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
            .arg(feed::change_message(seq, &change))
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

    /// One call of [`ADJUST_SCRIPT`] per adjustment, concurrently (each touches one key, so
    /// this is Cluster-safe). The caller bounds the wait.
    async fn adjust(&self, adjusts: &[Adjust]) -> Result<Vec<Option<u64>>, StoreError> {
        let calls = adjusts.iter().map(|adj| {
            let (t, a) = match adj.window {
                Window::Fixed { end, .. } => ("f", end),
                Window::Flexi { len } => ("x", len),
                Window::Rolling { len } => ("r", len),
            };
            let ask_key = Ask {
                key: adj.key,
                overflow: adj.key,
                window: adj.window,
                allow: 0,
                weight: 0,
                mode: crate::counters::Mode::CountOnly,
                now: adj.now,
                fail_open: false,
            };
            let mut inv = self.adjust.prepare_invoke();
            inv.key(counter_key(&ask_key))
                .arg(t)
                .arg(adj.delta)
                .arg(adj.now)
                .arg(a)
                .arg(adj.counted_at)
                .arg(adj.counted_end);
            let mut conn = self.conn.clone();
            async move { inv.invoke_async::<Vec<i64>>(&mut conn).await }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(v) if v.first() == Some(&1) => {
                    Ok(v.get(1).map(|n| u64::try_from(*n).unwrap_or(0)))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(unavailable(&self.target, "counter adjustment", e)),
            })
            .collect()
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

    async fn tally_add(&self, adds: &[TallyAdd], ttl: Duration) -> Result<(), StoreError> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        // One pipeline per bucket: a bucket is one key, so one slot on a cluster.
        let mut by_bucket: std::collections::BTreeMap<&str, Vec<&TallyAdd>> =
            std::collections::BTreeMap::new();
        for a in adds {
            by_bucket.entry(a.bucket.as_str()).or_default().push(a);
        }
        for (bucket, adds) in by_bucket {
            let key = tally_key(bucket);
            let mut pipe = redis::pipe();
            for a in adds {
                pipe.cmd("HINCRBY")
                    .arg(&key)
                    .arg(&a.field)
                    .arg(a.delta)
                    .ignore();
            }
            pipe.cmd("PEXPIRE").arg(&key).arg(ms).ignore();
            let mut conn = self.conn.clone();
            bounded::<()>(
                &self.target,
                "HINCRBY",
                self.timeout,
                pipe.query_async(&mut conn),
            )
            .await?;
        }
        Ok(())
    }

    async fn tally_read(&self, buckets: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        let mut out = Vec::with_capacity(buckets.len());
        for b in buckets {
            let cmd = redis::cmd("HGETALL").arg(tally_key(b)).clone();
            let fields: Vec<(String, i64)> = self.read("HGETALL", &cmd).await?;
            out.push(fields);
        }
        Ok(out)
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
    fn keys_hash_tag_the_counter() {
        let mut ask = Ask {
            key: crate::counters::Key(0xab),
            window: Window::Fixed {
                start: 60_000,
                end: 120_000,
            },
            allow: 1,
            weight: 1,
            mode: crate::counters::Mode::EnforceAndCount,
            now: 0,
            fail_open: true,
            overflow: crate::counters::Key(1),
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
