//! Quotas across process boundaries, with the real binary and a real `redis-server`:
//! two replicas in synchronous mode admit exactly the limit together; in asynchronous mode
//! the overshoot stays within its documented bound; Redis killed and restarted mid-run
//! follows each policy's fail mode and counting resumes where it stood; an embedded-store
//! replica keeps a day quota's count across `kill -9`.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use tonic::transport::Channel;

mod support;

use support::redis::RedisServer;
use support::{ext_proc, free_port, Proc};

/// (status, body) of a GET.
fn http_get(port: u16, path: &str) -> (u16, String) {
    support::http_blocking(port, "GET", path, None, None)
}

struct Tollgate {
    proc: Proc,
    admin: u16,
    client: ExternalProcessorClient<Channel>,
}

impl Tollgate {
    async fn start(config: &Path, logs: &Path, name: &str, args: &[&str]) -> Self {
        let (grpc, admin) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn("tollgate", cmd, logs.join(format!("{name}.log")));
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_get(admin, "/readyz").0 != 200 {
            assert!(!proc.exited(), "tollgate exited at start");
            assert!(Instant::now() < deadline, "tollgate was not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client = ext_proc::connect(format!("127.0.0.1:{grpc}")).await;
        Self {
            proc,
            admin,
            client,
        }
    }

    /// Sends request headers for `path`: 200 when tollgate lets the request on, otherwise
    /// the status of its immediate answer.
    async fn status(&self, path: &str, headers: &[(&str, &str)]) -> u32 {
        let mut all = vec![(":method", "GET"), (":path", path), (":authority", "a")];
        all.extend_from_slice(headers);
        let msg = ext_proc::request_headers(&all, true);
        ext_proc::status_of(ext_proc::ask_once(&self.client, msg).await)
    }

    /// Upper edge of the smallest `tollgate_ratelimit_sync_gap_seconds` bucket holding every
    /// observation: the longest time between two syncs, rounded up.
    fn longest_sync_gap(&self) -> f64 {
        let text = http_get(self.admin, "/metrics").1;
        let total = support::metric(&text, "tollgate_ratelimit_sync_gap_seconds_count")
            .expect("the sync gap histogram is exported");
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("tollgate_ratelimit_sync_gap_seconds_bucket{le=\"")?;
                let (le, count) = rest.split_once("\"} ")?;
                Some((le.parse::<f64>().ok()?, count.trim().parse::<f64>().ok()?))
            })
            .filter(|&(_, count)| count >= total)
            .map(|(le, _)| le)
            .fold(f64::INFINITY, f64::min)
    }

    fn metric(&self, series: &str) -> f64 {
        http_get(self.admin, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn config(text: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("limits.yaml"), text).unwrap();
    d
}

/// A flexi hour quota (its window starts at the first request, so no clock edge falls
/// inside a test) of `allow` per `x-user`, failing closed, on `/q`.
fn quota_config(allow: u32) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: shared-quota}}
spec:
  type: Quota
  allow: {allow}
  timeUnit: hour
  quotaType: flexi
  identifier: "{{request.header.x-user}}"
  failOpen: false
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: q}}
spec:
  match: {{pathPrefixes: [/q]}}
  request: [{{policy: shared-quota}}]
"#
    )
}

/// `clients` tasks, each sending `per_client` requests alternately to the replicas; returns
/// (admitted, refused with 429). Any other answer fails the test.
async fn hammer(
    replicas: &[&Tollgate],
    clients: usize,
    per_client: usize,
    user: &str,
) -> (usize, usize) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let targets: Vec<ExternalProcessorClient<Channel>> =
            replicas.iter().map(|t| t.client.clone()).collect();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            for i in 0..per_client {
                let t = Tollgate::status_on(&targets[(c + i) % targets.len()], "/q", &user).await;
                match t {
                    200 => ok += 1,
                    429 => refused += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, refused)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        total.0 += a;
        total.1 += r;
    }
    total
}

/// One task per replica sending `per_replica` requests one at a time, no two starting less
/// than `period` apart (a late tick delays the next rather than bursting), so each replica's
/// rate is at most 1/`period`; returns (admitted, refused with 429).
async fn paced(
    replicas: &[&Tollgate],
    period: Duration,
    per_replica: usize,
    user: &str,
) -> (usize, usize) {
    let mut tasks = Vec::new();
    for t in replicas {
        let client = t.client.clone();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut ok, mut refused) = (0, 0);
            for _ in 0..per_replica {
                tick.tick().await;
                match Tollgate::status_on(&client, "/q", &user).await {
                    200 => ok += 1,
                    429 => refused += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, refused)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        total.0 += a;
        total.1 += r;
    }
    total
}

impl Tollgate {
    async fn status_on(client: &ExternalProcessorClient<Channel>, path: &str, user: &str) -> u32 {
        let msg = ext_proc::request_headers(
            &[
                (":method", "GET"),
                (":path", path),
                (":authority", "a"),
                ("x-user", user),
            ],
            true,
        );
        ext_proc::status_of(ext_proc::ask_once(client, msg).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_redis_two_replicas_admit_exactly_the_limit() {
    let redis = RedisServer::start_persistent();
    let cfg = config(&quota_config(150));
    let logs = tempfile::tempdir().unwrap();
    let url = redis.url();
    let args = [
        "--store",
        "memory",
        "--counters",
        "redis",
        "--redis-url",
        &url,
    ];
    let a = Tollgate::start(cfg.path(), logs.path(), "a", &args).await;
    let b = Tollgate::start(cfg.path(), logs.path(), "b", &args).await;
    // 32 concurrent clients, 500 requests for a limit of 150.
    let (admitted, refused) = hammer(&[&a, &b], 32, 16, "alice").await;
    assert_eq!(admitted, 150, "admitted together (refused {refused})");
    assert_eq!(refused, 32 * 16 - 150);
    // Another identifier has its own count.
    assert_eq!(a.status("/q", &[("x-user", "bob")]).await, 200);
    let allowed = a
        .metric("tollgate_ratelimit_decisions_total{policy=\"shared-quota\",result=\"allowed\"}")
        + b.metric(
            "tollgate_ratelimit_decisions_total{policy=\"shared-quota\",result=\"allowed\"}",
        );
    assert_eq!(allowed, 151.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_redis_overshoot_stays_within_its_bound_and_converges() {
    let redis = RedisServer::start_persistent();
    let cfg = config(&quota_config(100));
    let logs = tempfile::tempdir().unwrap();
    let url = redis.url();
    let args = [
        "--store",
        "memory",
        "--counters",
        "redis",
        "--redis-url",
        &url,
        "--counter-sync",
        "async",
        "--counter-sync-interval",
        "50ms",
    ];
    let a = Tollgate::start(cfg.path(), logs.path(), "a", &args).await;
    let b = Tollgate::start(cfg.path(), logs.path(), "b", &args).await;
    // Each replica driven at no more than 200 requests/s (one every 5 ms, one at a time),
    // 100 requests each: twice the limit is offered, so the window is spent mid-run.
    let period = Duration::from_millis(5);
    let (admitted, _) = paced(&[&a, &b], period, 100, "carol").await;
    // The documented bound: replicas × rate × the time between syncs, which is the 50 ms
    // interval (2 × 200/s × 50 ms = 20) unless a loaded machine delays syncs: the longest gap
    // either replica measured (upper edge of its histogram bucket) stands in for it.
    let gap = a.longest_sync_gap().max(b.longest_sync_gap()).max(0.05);
    let bound = (2.0 * 200.0 * gap).ceil() as usize;
    assert!(
        (100..=100 + bound).contains(&admitted),
        "admitted {admitted} for a limit of 100 on two replicas (bound +{bound}, longest sync gap {gap} s)"
    );
    // Once synced, both replicas know the window is spent.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ra = a.status("/q", &[("x-user", "carol")]).await;
        let rb = b.status("/q", &[("x-user", "carol")]).await;
        if ra == 429 && rb == 429 {
            break;
        }
        assert!(Instant::now() < deadline, "replicas never converged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis holds the true total (what both replicas counted, over-admissions included).
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:rl:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let n: u64 = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("n")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        n >= 100 && n <= admitted as u64 + 2,
        "redis count {n}, admitted {admitted}"
    );
}

const FAIL_MODES: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: open-quota}
spec: {type: Quota, allow: 8, timeUnit: hour, quotaType: flexi, failOpen: true}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: closed-quota}
spec: {type: Quota, allow: 1000, timeUnit: hour, quotaType: flexi, failOpen: false}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: open}
spec:
  match: {pathPrefixes: [/open]}
  request: [{policy: open-quota}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: closed}
spec:
  match: {pathPrefixes: [/closed]}
  request: [{policy: closed-quota}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_follows_the_fail_mode_and_counting_resumes() {
    let mut redis = RedisServer::start_persistent();
    let cfg = config(FAIL_MODES);
    let logs = tempfile::tempdir().unwrap();
    let url = redis.url();
    let t = Tollgate::start(
        cfg.path(),
        logs.path(),
        "t",
        &[
            "--store",
            "memory",
            "--counters",
            "redis",
            "--redis-url",
            &url,
        ],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(t.status("/open", &[]).await, 200);
    }
    assert_eq!(t.status("/closed", &[]).await, 200);

    redis.kill();
    // Fail closed: 503. Fail open: admitted, counted locally, and said so in the metrics.
    assert_eq!(t.status("/closed", &[]).await, 503);
    for _ in 0..2 {
        assert_eq!(t.status("/open", &[]).await, 200);
    }
    assert!(t.metric("tollgate_ratelimit_fail_open_total{policy=\"open-quota\"}") >= 2.0);
    assert!(t.metric("tollgate_ratelimit_fail_closed_total{policy=\"closed-quota\"}") >= 1.0);
    assert!(t.metric("tollgate_ratelimit_redis_errors_total{op=\"decide\"}") >= 1.0);

    redis.restart();
    // Reconnects by itself (within the one-second back-off, plus a reconnect).
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.status("/closed", &[]).await != 200 {
        assert!(Instant::now() < deadline, "counting never resumed on Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counting resumes where Redis stood (3 before the outage; local counts are not
    // merged): 5 more of 8, then 429.
    for i in 0..5 {
        assert_eq!(
            t.status("/open", &[]).await,
            200,
            "request {i} after restart"
        );
    }
    assert_eq!(t.status("/open", &[]).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_redis_down_keeps_failing_closed_until_it_is_back() {
    let mut redis = RedisServer::start_persistent();
    let cfg = config(FAIL_MODES);
    let logs = tempfile::tempdir().unwrap();
    let url = redis.url();
    let t = Tollgate::start(
        cfg.path(),
        logs.path(),
        "t",
        &[
            "--store",
            "memory",
            "--counters",
            "redis",
            "--redis-url",
            &url,
            "--counter-sync",
            "async",
            "--counter-sync-interval",
            "50ms",
        ],
    )
    .await;
    assert_eq!(t.status("/closed", &[]).await, 200);
    redis.kill();
    // The first failed sync marks Redis down; from then on, and for longer than the
    // one-second back-off, fail-closed answers 503 and fail-open still admits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.status("/closed", &[]).await != 503 {
        assert!(
            Instant::now() < deadline,
            "fail-closed never noticed Redis down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut open_admitted = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(t.status("/closed", &[]).await, 503);
        match t.status("/open", &[]).await {
            200 => open_admitted += 1,
            429 => {}
            other => panic!("fail-open answered {other}"),
        }
    }
    // Fail open counts on the local counter: its limit (8) still holds.
    assert_eq!(open_admitted, 8);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.status("/closed", &[]).await != 200 {
        assert!(
            Instant::now() < deadline,
            "never recovered after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_restart_keeps_a_day_quota() {
    let cfg = config(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: daily}
spec: {type: Quota, allow: 5, timeUnit: day, identifier: "{request.header.x-user}"}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: q}
spec:
  match: {pathPrefixes: [/q]}
  request: [{policy: daily}]
"#,
    );
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let args = [
        "--store",
        "embedded",
        "--data-dir",
        dir,
        "--counter-checkpoint-interval",
        "100ms",
    ];
    let day = || chrono::Utc::now().date_naive();
    let started = day();
    let mut t = Tollgate::start(cfg.path(), logs.path(), "first", &args).await;
    for _ in 0..3 {
        assert_eq!(t.status("/q", &[("x-user", "dora")]).await, 200);
    }
    // The checkpoint runs on the next maintenance tick (every second); then kill -9.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    t.proc.kill();
    drop(t);

    let t = Tollgate::start(cfg.path(), logs.path(), "second", &args).await;
    let results = [
        t.status("/q", &[("x-user", "dora")]).await,
        t.status("/q", &[("x-user", "dora")]).await,
        t.status("/q", &[("x-user", "dora")]).await,
    ];
    if day() != started {
        eprintln!("the UTC day turned during the test: the new day has a new count");
        return;
    }
    assert_eq!(
        results,
        [200, 200, 429],
        "3 of 5 were used before the restart"
    );
    drop(t);

    // SIGTERM: the checkpoint after the drain saves counts the periodic one (hourly here)
    // has not written yet.
    let args = [
        "--store",
        "embedded",
        "--data-dir",
        dir,
        "--counter-checkpoint-interval",
        "1h",
        "--drain-timeout",
        "2s",
    ];
    let mut t = Tollgate::start(cfg.path(), logs.path(), "third", &args).await;
    for _ in 0..4 {
        assert_eq!(t.status("/q", &[("x-user", "eve")]).await, 200);
    }
    let pid = t.proc.child.as_ref().map(Child::id).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !t.proc.exited() {
        assert!(
            Instant::now() < deadline,
            "tollgate did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(t);
    let t = Tollgate::start(cfg.path(), logs.path(), "fourth", &args).await;
    let results = [
        t.status("/q", &[("x-user", "eve")]).await,
        t.status("/q", &[("x-user", "eve")]).await,
    ];
    if day() != started {
        return;
    }
    assert_eq!(results, [200, 429], "4 of 5 were used before SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_counts_in_both_modes() {
    let cluster = RedisServer::start_cluster();
    let url = format!("redis+cluster://127.0.0.1:{}", cluster.port);
    let cfg = config(&quota_config(20));
    let logs = tempfile::tempdir().unwrap();
    let sync = Tollgate::start(
        cfg.path(),
        logs.path(),
        "sync",
        &[
            "--store",
            "memory",
            "--counters",
            "redis",
            "--redis-url",
            &url,
        ],
    )
    .await;
    let (admitted, _) = hammer(&[&sync], 8, 10, "erin").await;
    assert_eq!(admitted, 20);
    // Asynchronous mode syncs many counters (several slots) at once.
    let asynchronous = Tollgate::start(
        cfg.path(),
        logs.path(),
        "async",
        &[
            "--store",
            "memory",
            "--counters",
            "redis",
            "--redis-url",
            &url,
            "--counter-sync",
            "async",
            "--counter-sync-interval",
            "50ms",
        ],
    )
    .await;
    for user in ["u1", "u2", "u3", "u4"] {
        assert_eq!(asynchronous.status("/q", &[("x-user", user)]).await, 200);
    }
    // erin's window is spent in Redis: once synced, the async replica refuses too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while asynchronous.status("/q", &[("x-user", "erin")]).await != 429 {
        assert!(
            Instant::now() < deadline,
            "the async replica never saw the count"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        asynchronous.metric("tollgate_ratelimit_redis_errors_total{op=\"sync\"}"),
        0.0,
        "syncing across cluster slots failed"
    );
    // The sync replica sees the async replica's counts: u1 has 1 of 20 used.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.port)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:rl:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.contains(":{") && k.ends_with('}')),
        "{keys:?}"
    );
}

/// Asynchronous mirrors are bounded by `--counter-max-keys`: past the cap new identifiers
/// count on their policy's overflow counter (in Redis, and it still limits); once mirrors
/// are idle with nothing to send they are evicted to make room; the counter gauge includes
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_mirrors_are_capped_and_overflow_still_limits() {
    use tollgate::ratelimit::memory::MemoryCounters;
    use tollgate::ratelimit::shared::{SharedCounters, SyncMode};
    use tollgate::ratelimit::{Ask, Key, Mode, Pending, Window, RL_METRICS};
    use tollgate::store::{OpenOptions, StoreSpec};

    let redis = RedisServer::start_persistent();
    let url = redis.url();
    // The interval is long, so only the explicit syncs below run (after the first tick).
    let interval = Duration::from_secs(60);
    let no_feed = OpenOptions {
        change_feed: false,
        ..Default::default()
    };
    let backend = tollgate::store::open_with(&StoreSpec::Redis(url.clone()), no_feed)
        .await
        .unwrap();
    let counters = SharedCounters::new(backend, SyncMode::Async { interval }, 4);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let local = std::sync::Arc::new(MemoryCounters::new(100));
    let t0: i64 = 1_800_000_000_000;
    let hour = Window::Fixed {
        start: t0 - t0 % 3_600_000,
        end: t0 - t0 % 3_600_000 + 3_600_000,
    };
    let decide = |id: u128, now: i64| {
        let ask = Ask {
            key: Key(id),
            overflow: Key(77),
            window: hour,
            allow: 3,
            weight: 1,
            mode: Mode::EnforceAndCount,
            now,
            fail_open: false,
        };
        match counters.decide(ask, &local) {
            Pending::Ready(r) => r.unwrap(),
            Pending::Wait(_) => panic!("asynchronous mode decides at once"),
        }
    };
    for id in 1..=4 {
        assert!(decide(id, t0).allowed);
    }
    assert_eq!(counters.mirrors(), 4);
    // A flood of new identifiers while the mirrors are in use: one overflow mirror, which
    // admits the limit (3) and refuses the rest.
    let admitted = (100..140).filter(|id| decide(*id, t0 + 10).allowed).count();
    assert_eq!(admitted, 3);
    assert_eq!(
        counters.mirrors(),
        5,
        "four identifiers and one overflow counter"
    );
    assert_eq!(
        RL_METRICS.keys(),
        5,
        "the counter gauge includes the mirrors"
    );
    // Existing identifiers keep their own mirror.
    assert_eq!(decide(1, t0 + 20).used, 2);
    counters.sync(t0 + 30, interval).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:rl:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 5, "{keys:?}");
    let overflow_key = format!(
        "tollgate:rl:{{{}}}:{}",
        hour.overflow_key(Key(77)).hex(),
        t0 - t0 % 3_600_000
    );
    let n: u64 = redis::cmd("GET")
        .arg(&overflow_key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(n, 3, "the overflow count reached Redis");
    // Two minutes later everything is idle and sent: a new identifier evicts them and gets
    // a mirror of its own.
    let later = t0 + 120_000;
    let d = decide(500, later);
    assert!(d.allowed);
    assert_eq!(d.used, 1);
    assert_eq!(counters.mirrors(), 1);
    // An evicted identifier is read back from Redis at the next sync.
    decide(1, later);
    counters.sync(later + 10, interval).await;
    assert!(
        !decide(1, later + 20).allowed,
        "identifier 1 has used its 3"
    );
}

/// The Redis script tells a refused rolling-window request when capacity returns (the
/// end of the first slot whose leaving makes room), not the next slot's end; times are
/// passed in, so the clock is the test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rolling_window_refusal_names_when_capacity_returns() {
    let redis = RedisServer::start_persistent();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Rolling window of 1000 ms (slots of 100 ms), 5 allowed.
    async fn call(conn: &mut redis::aio::MultiplexedConnection, weight: u64, now: i64) -> Vec<i64> {
        redis::Script::new(tollgate::store::redis_store::COUNTER_SCRIPT)
            .key("tollgate:rl:{test}")
            .arg("r")
            .arg("ec")
            .arg(weight)
            .arg(5)
            .arg(now)
            .arg(1000)
            .invoke_async(conn)
            .await
            .unwrap()
    }
    let c = &mut conn;
    assert_eq!(call(c, 1, 0).await[0], 1);
    for _ in 0..4 {
        assert_eq!(call(c, 1, 450).await[0], 1);
    }
    assert_eq!(call(c, 1, 500).await, vec![0, 5, 1000]);
    assert_eq!(call(c, 2, 500).await, vec![0, 5, 1400]);
    assert_eq!(call(c, 2, 1399).await[0], 0);
    assert_eq!(call(c, 2, 1400).await[0], 1);
    assert_eq!(call(c, 9, 1400).await, vec![0, 2, 2400]);
}
