//! One conformance suite for every storage backend (`store_suite!` expands the same tests for
//! each, as Kuadrant Limitador does), through each typed façade: objects ([`Store`]),
//! counters (`Backend::count`, checkpoints, `SharedCounters`) and cache entries
//! (`SharedTier`); plus backend-specific tests: the embedded store's durability and
//! corruption handling, and Redis with several replicas, an outage and a restart. A new
//! backend gets one fixture and one `store_suite!` line here.
//!
//! The Redis tests start their own `redis-server` (from `scripts/setup.sh`) on a free loopback
//! port, in a temporary directory, without persistence; it is killed on drop.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tollgate::consumer::{
    hash_key, ApiKey, ApiProduct, App, AppStatus, KeyStatus, Operation, Origin, QuotaSettings,
    TimeUnit,
};
use tollgate::store::embedded::EmbeddedBackend;
use tollgate::store::memory::MemoryBackend;
use tollgate::store::redis_store::RedisBackend;
use tollgate::store::{self, Backend, Change, Store, StoreError, StoreSpec, Write};

mod support;

use support::free_port;
use support::redis::RedisServer;

/// Every test is bounded by this.
const TEST_LIMIT: Duration = Duration::from_secs(20);
/// A change must reach the feed within this.
const FEED_LIMIT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A backend, the object store over it, and whatever must live as long as they (a
/// temporary directory, a Redis server).
struct Fixture {
    backend: Arc<dyn Backend>,
    store: Store,
    _keep: Box<dyn Any + Send>,
}

impl Fixture {
    fn new(backend: Arc<dyn Backend>, keep: Box<dyn Any + Send>) -> Self {
        Self {
            store: Store::new(backend.clone()),
            backend,
            _keep: keep,
        }
    }
}

async fn memory() -> Fixture {
    Fixture::new(Arc::new(MemoryBackend::new()), Box::new(()))
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = EmbeddedBackend::open(dir.path()).expect("open embedded store");
    Fixture::new(Arc::new(backend), Box::new(dir))
}

async fn redis() -> Fixture {
    let server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url())
        .await
        .expect("connect to redis");
    Fixture::new(Arc::new(backend), Box::new(server))
}

async fn redis_cluster() -> Fixture {
    let server = RedisServer::start_cluster();
    let backend = RedisBackend::connect(&server.cluster_url())
        .await
        .expect("connect to redis cluster");
    Fixture::new(Arc::new(backend), Box::new(server))
}

/// The object store in an embedded backend at `dir`.
fn open_embedded(dir: &Path) -> Result<Store, StoreError> {
    EmbeddedBackend::open(dir).map(|b| Store::new(Arc::new(b)))
}

/// The object store in the Redis at `url`.
async fn connect_redis(url: &str) -> Result<Store, StoreError> {
    RedisBackend::connect(url)
        .await
        .map(|b| Store::new(Arc::new(b)))
}

/// A three-node Redis Cluster (no replicas), slots split evenly.
struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// A command connection to each node.
fn connect_all(nodes: &[RedisServer]) -> Vec<redis::Connection> {
    nodes
        .iter()
        .map(|n| {
            redis::Client::open(n.url())
                .and_then(|c| c.get_connection())
                .expect("connect to a cluster node")
        })
        .collect()
}

impl RedisCluster {
    fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(true, false))
            .collect();
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        let mut cons = connect_all(&nodes);
        for (con, (from, to)) in cons.iter_mut().zip(ranges) {
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(from)
                .arg(to)
                .query::<()>(con)
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        for n in &nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(n.port)
                .query::<()>(&mut cons[0])
                .expect("CLUSTER MEET");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for con in &mut cons {
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(con)
                    .expect("CLUSTER INFO");
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster never became ok:\n{info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let cluster = Self { nodes };
        cluster.wait_for_bus(deadline);
        cluster
    }

    /// Waits until a `PUBLISH` on any node reaches a subscriber on every node. `cluster_state:ok`
    /// can come before every cluster-bus link is up, and a message published meanwhile is
    /// forwarded to no one: the change-feed tests would then see a loss the harness caused.
    fn wait_for_bus(&self, deadline: Instant) {
        // Raw RESP over TCP: a subscriber only has to find each round's tokens in what it reads.
        let mut subscribers: Vec<TcpStream> = self
            .nodes
            .iter()
            .map(|n| {
                let mut s = TcpStream::connect(("127.0.0.1", n.port)).expect("connect to a node");
                s.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("read timeout");
                s.write_all(b"SUBSCRIBE harness:probe\r\n")
                    .expect("SUBSCRIBE");
                s
            })
            .collect();
        let mut publishers = connect_all(&self.nodes);
        for round in 0u32.. {
            let tokens: Vec<String> = (0..publishers.len())
                .map(|i| format!("probe-{round}-{i}"))
                .collect();
            for (con, token) in publishers.iter_mut().zip(&tokens) {
                redis::cmd("PUBLISH")
                    .arg("harness:probe")
                    .arg(token)
                    .exec(con)
                    .expect("PUBLISH");
            }
            let mut all = true;
            for s in &mut subscribers {
                let mut heard = String::new();
                let until = Instant::now() + Duration::from_millis(300);
                let mut buf = [0u8; 4096];
                while !tokens
                    .iter()
                    .all(|t| heard.contains(&format!("\r\n{t}\r\n")))
                    && Instant::now() < until
                {
                    if let Ok(n) = s.read(&mut buf) {
                        heard.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
                all &= tokens
                    .iter()
                    .all(|t| heard.contains(&format!("\r\n{t}\r\n")));
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster bus never carried every message"
            );
        }
    }

    /// A cluster URL naming these nodes as seeds.
    fn url(&self, nodes: &[usize]) -> String {
        let hosts: Vec<String> = nodes
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.nodes[i].port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// Sends a signal (`STOP`, `CONT`) to a process this test started.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

// ---------------------------------------------------------------------------------------------
// Objects

fn product(name: &str) -> ApiProduct {
    ApiProduct {
        name: name.into(),
        description: "a product".into(),
        operations: vec![Operation {
            path: "/v1/models/{model}:predict".into(),
            methods: vec!["POST".into()],
            models: vec![],
            ..Default::default()
        }],
        quota: Some(QuotaSettings {
            limit: 100,
            interval: 1,
            time_unit: TimeUnit::Minute,
        }),
        llm_token_quota: None,
        approval_type: Default::default(),
        attributes: BTreeMap::new(),
        origin: Origin::Api,
        revision: 0,
    }
}

fn app(name: &str) -> App {
    App {
        name: name.into(),
        developer_email: "dev@example.com".into(),
        status: AppStatus::Approved,
        products: vec!["gold".into()],
        keys: vec![ApiKey {
            id: format!("key_{}", name.len()),
            hash: hash_key(&format!("secret-{name}")),
            status: KeyStatus::Approved,
            expires_at: Some(1_900_000_000_000),
            created_at: 1_700_000_000_000,
        }],
        attributes: BTreeMap::new(),
        origin: Origin::Api,
        revision: 0,
    }
}

/// Next change on the feed, within `FEED_LIMIT`.
async fn next_change(rx: &mut broadcast::Receiver<Change>) -> Change {
    match tokio::time::timeout(FEED_LIMIT, rx.recv()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!("change feed failed: {e}"),
        Err(_) => panic!("no change within {FEED_LIMIT:?}"),
    }
}

/// Runs a test body within `TEST_LIMIT`.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test exceeded its time limit");
}

// ---------------------------------------------------------------------------------------------
// The shared suite

mod suite {
    use super::*;

    pub async fn products_crud(s: Store) {
        assert_eq!(s.get_product("gold").await.unwrap(), None);
        match s.put_product(&product("gold"), Write::Update).await {
            Err(StoreError::NotFound { kind, name }) => {
                assert_eq!((kind, name.as_str()), ("product", "gold"))
            }
            other => panic!("update of a missing product: {other:?}"),
        }
        assert!(matches!(
            s.delete_product("gold").await,
            Err(StoreError::NotFound { .. })
        ));

        let mut p = product("gold");
        s.put_product(&p, Write::Create).await.unwrap();
        assert_eq!(s.get_product("gold").await.unwrap(), Some(p.clone()));
        match s.put_product(&p, Write::Create).await {
            Err(StoreError::AlreadyExists { kind, name }) => {
                assert_eq!((kind, name.as_str()), ("product", "gold"))
            }
            other => panic!("second create: {other:?}"),
        }

        p.description = "changed".into();
        p.quota = None;
        s.put_product(&p, Write::Update).await.unwrap();
        // The stored copy is one revision on.
        p.revision = 1;
        assert_eq!(s.get_product("gold").await.unwrap(), Some(p.clone()));

        s.delete_product("gold").await.unwrap();
        assert_eq!(s.get_product("gold").await.unwrap(), None);
        assert!(matches!(
            s.delete_product("gold").await,
            Err(StoreError::NotFound { .. })
        ));
        // Gone means creatable again.
        s.put_product(&p, Write::Create).await.unwrap();
    }

    pub async fn apps_crud(s: Store) {
        assert_eq!(s.get_app("a1").await.unwrap(), None);
        match s.put_app(&app("a1"), Write::Update).await {
            Err(StoreError::NotFound { kind, name }) => {
                assert_eq!((kind, name.as_str()), ("app", "a1"))
            }
            other => panic!("update of a missing app: {other:?}"),
        }
        assert!(matches!(
            s.delete_app("a1").await,
            Err(StoreError::NotFound { .. })
        ));

        let mut a = app("a1");
        s.put_app(&a, Write::Create).await.unwrap();
        assert_eq!(s.get_app("a1").await.unwrap(), Some(a.clone()));
        match s.put_app(&a, Write::Create).await {
            Err(StoreError::AlreadyExists { kind, name }) => {
                assert_eq!((kind, name.as_str()), ("app", "a1"))
            }
            other => panic!("second create: {other:?}"),
        }

        a.status = AppStatus::Revoked;
        a.keys[0].status = KeyStatus::Revoked;
        s.put_app(&a, Write::Update).await.unwrap();
        a.revision = 1;
        assert_eq!(s.get_app("a1").await.unwrap(), Some(a.clone()));

        // Products and apps are separate namespaces.
        assert_eq!(s.get_product("a1").await.unwrap(), None);

        s.delete_app("a1").await.unwrap();
        assert_eq!(s.get_app("a1").await.unwrap(), None);
        assert!(matches!(
            s.delete_app("a1").await,
            Err(StoreError::NotFound { .. })
        ));
    }

    /// Two replicas read an app at one revision; the first update wins, the second is
    /// refused instead of silently restoring what the first changed (a revoked key).
    pub async fn stale_updates_are_refused(s: Store) {
        let mut a = app("a1");
        s.put_app(&a, Write::Create).await.unwrap();
        let read_by_b = s.get_app("a1").await.unwrap().unwrap();
        a.keys[0].status = KeyStatus::Revoked;
        s.put_app(&a, Write::Update).await.unwrap();

        let mut b = read_by_b.clone();
        b.attributes.insert("added".into(), "by b".into());
        match s.put_app(&b, Write::Update).await {
            Err(StoreError::Conflict { kind, name }) => {
                assert_eq!((kind, name.as_str()), ("app", "a1"))
            }
            other => panic!("stale app update: {other:?}"),
        }
        let stored = s.get_app("a1").await.unwrap().unwrap();
        assert_eq!(stored.keys[0].status, KeyStatus::Revoked);
        assert_eq!(stored.revision, 1);
        assert!(!stored.attributes.contains_key("added"));
        // Read again, changed again: accepted, and the revocation stays.
        let mut b = stored;
        b.attributes.insert("added".into(), "by b".into());
        s.put_app(&b, Write::Update).await.unwrap();
        let stored = s.get_app("a1").await.unwrap().unwrap();
        assert_eq!(
            (stored.revision, stored.keys[0].status),
            (2, KeyStatus::Revoked)
        );

        let p = product("gold");
        s.put_product(&p, Write::Create).await.unwrap();
        s.put_product(&p, Write::Update).await.unwrap();
        assert!(matches!(
            s.put_product(&p, Write::Update).await,
            Err(StoreError::Conflict {
                kind: "product",
                ..
            })
        ));
        assert_eq!(s.get_product("gold").await.unwrap().unwrap().revision, 1);
    }

    pub async fn snapshot_returns_everything(s: Store) {
        let empty = s.snapshot().await.unwrap();
        assert!(empty.products.is_empty() && empty.apps.is_empty());

        let products: Vec<_> = (0..3).map(|i| product(&format!("p{i}"))).collect();
        let apps: Vec<_> = (0..5).map(|i| app(&format!("a{i}"))).collect();
        for p in &products {
            s.put_product(p, Write::Create).await.unwrap();
        }
        for a in &apps {
            s.put_app(a, Write::Create).await.unwrap();
        }
        s.delete_app("a4").await.unwrap();

        let mut snap = s.snapshot().await.unwrap();
        snap.products.sort_by(|a, b| a.name.cmp(&b.name));
        snap.apps.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(snap.products, products);
        assert_eq!(snap.apps, apps[..4].to_vec());
    }

    pub async fn change_feed_reports_every_write(s: Store) {
        let mut rx = s.subscribe();
        let p = product("gold");
        let a = app("a1");
        s.put_product(&p, Write::Create).await.unwrap();
        // A failed write changes nothing and reports nothing.
        assert!(s.put_product(&p, Write::Create).await.is_err());
        s.put_product(&p, Write::Update).await.unwrap();
        s.put_app(&a, Write::Create).await.unwrap();
        assert!(s.delete_app("missing").await.is_err());
        s.put_app(&a, Write::Update).await.unwrap();
        s.delete_app("a1").await.unwrap();
        s.delete_product("gold").await.unwrap();

        let expected = [
            Change::Product("gold".into()),
            Change::Product("gold".into()),
            Change::App("a1".into()),
            Change::App("a1".into()),
            Change::App("a1".into()),
            Change::Product("gold".into()),
        ];
        for want in expected {
            assert_eq!(next_change(&mut rx).await, want);
        }
        // Nothing more.
        let extra = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(extra.is_err(), "unexpected change: {extra:?}");
    }

    pub async fn unicode_names_and_large_attributes(s: Store) {
        let name = "prodüct 名前 🚀 with:colons/slashes {braces} \"quotes\"";
        let mut p = product(name);
        p.description = "ünïcödé ✓".repeat(1000);
        p.attributes.insert("big".into(), "x".repeat(1 << 20));
        p.attributes.insert("ключ".into(), "значение 値".into());
        let mut a = app("app 🚀 ü");
        a.products = vec![name.into()];
        a.keys = (0..200)
            .map(|i| ApiKey {
                id: format!("key_{i}"),
                hash: hash_key(&format!("k{i}")),
                status: KeyStatus::Pending,
                expires_at: None,
                created_at: i,
            })
            .collect();
        a.attributes.insert("blob".into(), "ü".repeat(300_000));

        let mut rx = s.subscribe();
        s.put_product(&p, Write::Create).await.unwrap();
        s.put_app(&a, Write::Create).await.unwrap();
        assert_eq!(next_change(&mut rx).await, Change::Product(name.into()));
        assert_eq!(next_change(&mut rx).await, Change::App(a.name.clone()));

        assert_eq!(s.get_product(name).await.unwrap(), Some(p.clone()));
        assert_eq!(s.get_app(&a.name).await.unwrap(), Some(a.clone()));
        let snap = s.snapshot().await.unwrap();
        assert_eq!(snap.products, vec![p]);
        assert_eq!(snap.apps, vec![a.clone()]);
        s.delete_app(&a.name).await.unwrap();
        assert_eq!(next_change(&mut rx).await, Change::App(a.name.clone()));
    }

    pub async fn concurrent_creates_have_one_winner(s: Store) {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let mut a = app("contested");
            a.developer_email = format!("dev{i}@example.com");
            let s = s.clone();
            tasks.push(tokio::spawn(
                async move { s.put_app(&a, Write::Create).await },
            ));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(ok, 1, "exactly one create wins");
    }
}

mod kvm_suite {
    use super::*;
    use tollgate::kvm::KvmEntry;

    fn entry(v: &str, secret: bool) -> KvmEntry {
        KvmEntry {
            value: v.into(),
            secret,
        }
    }

    pub async fn kvm_entries_crud(s: Store) {
        assert_eq!(s.get_kvm_entry("creds", "k").await.unwrap(), None);
        match s
            .put_kvm_entry("creds", "k", &entry("v", false), Some(Write::Update))
            .await
        {
            Err(StoreError::NotFound { name, .. }) => assert_eq!(name, "creds/k"),
            other => panic!("update of a missing entry: {other:?}"),
        }
        s.put_kvm_entry("creds", "k", &entry("v", false), Some(Write::Create))
            .await
            .unwrap();
        assert!(matches!(
            s.put_kvm_entry("creds", "k", &entry("w", false), Some(Write::Create))
                .await,
            Err(StoreError::AlreadyExists { .. })
        ));
        s.put_kvm_entry("creds", "k", &entry("w", true), Some(Write::Update))
            .await
            .unwrap();
        assert_eq!(
            s.get_kvm_entry("creds", "k").await.unwrap(),
            Some(entry("w", true))
        );
        // Upsert, odd keys, and maps whose names share a prefix stay apart.
        let odd = "tenant 1__tök/en?#%&=ünï";
        s.put_kvm_entry("creds", odd, &entry("x", false), None)
            .await
            .unwrap();
        s.put_kvm_entry("creds", odd, &entry("y", false), None)
            .await
            .unwrap();
        s.put_kvm_entry("creds.other", "k", &entry("z", false), None)
            .await
            .unwrap();
        s.put_kvm_entry("cred", "k", &entry("q", false), None)
            .await
            .unwrap();
        let all = s.list_kvm_entries("creds").await.unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[odd], entry("y", false));
        assert_eq!(s.list_kvm_entries("nothing").await.unwrap().len(), 0);

        s.delete_kvm_entry("creds", odd).await.unwrap();
        assert!(matches!(
            s.delete_kvm_entry("creds", odd).await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(s.list_kvm_entries("creds").await.unwrap().len(), 1);
        assert_eq!(
            s.get_kvm_entry("creds.other", "k").await.unwrap(),
            Some(entry("z", false))
        );
    }
}

/// Counters through the backend: every backend decides alike (the Redis script and the
/// in-process table are two implementations of one contract), keeps checkpoints, and carries
/// the shared-counter façade.
mod counters_suite {
    use super::*;
    use tollgate::ratelimit::memory::MemoryCounters;
    use tollgate::ratelimit::shared::{SharedCounters, SyncMode};
    use tollgate::ratelimit::{Ask, Decision, Key, Mode, Pending, Window};

    const EC: Mode = Mode::EnforceAndCount;

    fn ask(key: u128, window: Window, allow: u64, weight: u64, mode: Mode, now: i64) -> Ask {
        Ask {
            key: Key(key),
            overflow: Key(9_999),
            window,
            allow,
            weight,
            mode,
            now,
            fail_open: false,
        }
    }

    async fn one(b: &Arc<dyn Backend>, a: Ask) -> Decision {
        let mut d = b.count(&[a]).await.expect("count");
        assert_eq!(d.len(), 1);
        d.pop().flatten().expect("a readable decision")
    }

    /// A time in 2027 (an hour boundary): Redis expires counters at their window's end,
    /// so windows must lie ahead of the wall clock.
    const T: i64 = 1_800_000_000_000;

    /// Reserve (an enforce-and-count ask of the estimate), then adjust by `actual −
    /// reserved` in the window and slot it counted in; never below zero; moot once that
    /// window or slot has passed; a count-only ask of 0 reads without starting a window.
    pub async fn reservations_adjust_where_they_counted(b: Arc<dyn Backend>) {
        use tollgate::ratelimit::Adjust;
        async fn adjust(b: &Arc<dyn Backend>, a: Adjust) -> Option<u64> {
            let mut v = b.adjust(&[a]).await.expect("adjust");
            assert_eq!(v.len(), 1);
            v.pop().flatten()
        }
        let w = Window::Fixed {
            start: T,
            end: T + 60_000,
        };
        let a = ask(31, w, 100, 60, EC, T + 1);
        let d = one(&b, a.clone()).await;
        assert!(d.allowed);
        let at = |delta, now| Adjust {
            delta,
            now,
            ..Adjust::of(&a, &d)
        };
        // A concurrent reservation that does not fit is refused while 60 are reserved.
        assert!(!one(&b, ask(31, w, 100, 50, EC, T + 2)).await.allowed);
        assert_eq!(adjust(&b, at(-45, T + 3)).await, Some(15), "refund");
        assert!(one(&b, ask(31, w, 100, 50, EC, T + 4)).await.allowed);
        assert_eq!(
            adjust(&b, at(30, T + 5)).await,
            Some(95),
            "an excess counts"
        );
        assert_eq!(
            adjust(&b, at(-1_000, T + 6)).await,
            Some(0),
            "never below 0"
        );
        assert_eq!(
            adjust(&b, at(-1, T + 60_000)).await,
            None,
            "window over: moot"
        );
        // Flexi: only the window it counted in.
        let f = Window::Flexi { len: 1000 };
        let a = ask(32, f, 100, 50, EC, T + 10);
        let d = one(&b, a.clone()).await;
        let at = |delta, now| Adjust {
            delta,
            now,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(adjust(&b, at(-20, T + 500)).await, Some(30));
        one(&b, ask(32, f, 100, 5, EC, T + 1_500)).await;
        assert_eq!(adjust(&b, at(-20, T + 1_600)).await, None, "a later window");
        assert_eq!(
            one(&b, ask(32, f, 100, 0, Mode::CountOnly, T + 1_600))
                .await
                .used,
            5
        );
        // Rolling (slots of 100 ms): the slot it counted in, until that slot leaves.
        let r = Window::Rolling { len: 1000 };
        let a = ask(33, r, 100, 40, EC, T + 50);
        let d = one(&b, a.clone()).await;
        one(&b, ask(33, r, 100, 7, EC, T + 450)).await;
        let at = |delta, now| Adjust {
            delta,
            now,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(adjust(&b, at(-30, T + 500)).await, Some(17));
        assert_eq!(
            one(&b, ask(33, r, 100, 0, Mode::CountOnly, T + 999))
                .await
                .used,
            17
        );
        assert_eq!(adjust(&b, at(-5, T + 1_000)).await, None, "its slot left");
        assert_eq!(
            one(&b, ask(33, r, 100, 0, Mode::CountOnly, T + 1_000))
                .await
                .used,
            7
        );
        // Reading a flexi counter that does not exist starts no window.
        let d = one(&b, ask(34, f, 10, 0, Mode::CountOnly, T + 100)).await;
        assert_eq!((d.used, d.expiry), (0, T + 1_100));
        let d = one(&b, ask(34, f, 10, 1, EC, T + 700)).await;
        assert_eq!(d.expiry, T + 1_700, "the window starts at the first count");
        // Absent counter: nothing to adjust in flexi or rolling windows.
        let ghost = Adjust {
            key: Key(35),
            window: f,
            counted_at: T,
            counted_end: T + 1000,
            delta: -5,
            now: T + 1,
        };
        assert_eq!(adjust(&b, ghost).await, None);
    }

    pub async fn windows_count_alike(b: Arc<dyn Backend>) {
        // Fixed: counts to the limit, refuses without counting, resets on the next window.
        let w = Window::Fixed {
            start: T,
            end: T + 60_000,
        };
        for i in 1..=3 {
            let d = one(&b, ask(1, w, 3, 1, EC, T + 1)).await;
            assert_eq!((d.allowed, d.used, d.expiry), (true, i, T + 60_000));
        }
        let d = one(&b, ask(1, w, 3, 1, EC, T + 2)).await;
        assert_eq!(
            (d.allowed, d.used),
            (false, 3),
            "a refused request is not counted"
        );
        let next = Window::Fixed {
            start: T + 60_000,
            end: T + 120_000,
        };
        assert_eq!(one(&b, ask(1, next, 3, 1, EC, T + 60_000)).await.used, 1);
        // Modes: enforce only counts nothing; count only counts past the limit.
        let w = Window::Fixed {
            start: T,
            end: T + 1000,
        };
        assert!(
            one(&b, ask(2, w, 10, 1, Mode::EnforceOnly, T))
                .await
                .allowed
        );
        assert_eq!(
            one(&b, ask(2, w, 10, 1, Mode::EnforceOnly, T)).await.used,
            0
        );
        let d = one(&b, ask(2, w, 10, 12, Mode::CountOnly, T + 1)).await;
        assert_eq!((d.allowed, d.used), (true, 12));
        assert!(
            !one(&b, ask(2, w, 10, 1, Mode::EnforceOnly, T + 2))
                .await
                .allowed
        );
        // Flexi: the window starts at the first request.
        let f = Window::Flexi { len: 1000 };
        let d = one(&b, ask(4, f, 1, 1, EC, T + 5_250)).await;
        assert_eq!((d.allowed, d.expiry), (true, T + 6_250));
        assert!(!one(&b, ask(4, f, 1, 1, EC, T + 6_249)).await.allowed);
        let d = one(&b, ask(4, f, 1, 1, EC, T + 6_250)).await;
        assert_eq!((d.allowed, d.expiry), (true, T + 7_250));
        // Rolling (slots of 100 ms): a refusal names when capacity returns.
        let r = Window::Rolling { len: 1000 };
        assert!(one(&b, ask(7, r, 5, 1, EC, T)).await.allowed);
        for _ in 0..4 {
            assert!(one(&b, ask(7, r, 5, 1, EC, T + 450)).await.allowed);
        }
        let d = one(&b, ask(7, r, 5, 1, EC, T + 500)).await;
        assert_eq!((d.allowed, d.used, d.expiry), (false, 5, T + 1000));
        assert_eq!(one(&b, ask(7, r, 5, 2, EC, T + 500)).await.expiry, T + 1400);
        assert!(!one(&b, ask(7, r, 5, 2, EC, T + 1399)).await.allowed);
        assert!(one(&b, ask(7, r, 5, 2, EC, T + 1400)).await.allowed);
    }

    pub async fn a_batch_is_decided_in_order(b: Arc<dyn Backend>) {
        let w = Window::Fixed {
            start: T,
            end: T + 3_600_000,
        };
        let asks: Vec<Ask> = (0..20u128)
            .map(|k| {
                ask(
                    100 + k % 5,
                    w,
                    1_000,
                    1 + k as u64 % 5,
                    Mode::CountOnly,
                    T + 10,
                )
            })
            .collect();
        let out = b.count(&asks).await.unwrap();
        assert_eq!(out.len(), 20);
        // Each ask's answer is its own key's running total.
        for (i, d) in out.iter().enumerate() {
            let k = i as u64 % 5;
            assert_eq!(
                d.expect("readable").used,
                (i as u64 / 5 + 1) * (k + 1),
                "ask {i}"
            );
        }
        // Keys 100..105 each got four asks of weight (k % 5) + 1.
        for k in 0..5u128 {
            let d = one(&b, ask(100 + k, w, 1_000, 0, Mode::EnforceOnly, T + 20)).await;
            assert_eq!(d.used, 4 * (k as u64 + 1), "key {k}");
        }
        assert!(b.count(&[]).await.unwrap().is_empty());
    }

    pub async fn checkpoints_round_trip(b: Arc<dyn Backend>) {
        let all: store::backend::Keep = Arc::new(|_| true);
        assert!(b.load_counters().await.unwrap().is_empty());
        b.save_counters(vec![(1, vec![1, 2, 3]), (u128::MAX, vec![9])], all)
            .await
            .unwrap();
        let mut rows = b.load_counters().await.unwrap();
        rows.sort();
        assert_eq!(rows, vec![(1, vec![1, 2, 3]), (u128::MAX, vec![9])]);
        // Rows the filter refuses are dropped, new ones kept.
        let not_nine: store::backend::Keep = Arc::new(|v| v != [9]);
        b.save_counters(vec![(3, vec![7])], not_nine).await.unwrap();
        let mut rows = b.load_counters().await.unwrap();
        rows.sort();
        assert_eq!(rows, vec![(1, vec![1, 2, 3]), (3, vec![7])]);
        // A table restored from them counts on.
        let c = MemoryCounters::new(10);
        let day = Window::Fixed {
            start: 0,
            end: 86_400_000,
        };
        for _ in 0..3 {
            c.apply(&ask(42, day, 10, 1, EC, 5));
        }
        assert_eq!(c.checkpoint(&*b, 10).await.unwrap(), 1);
        let fresh = MemoryCounters::new(10);
        assert_eq!(fresh.restore(&*b, 20).await.unwrap(), 1);
        assert_eq!(fresh.apply(&ask(42, day, 10, 1, EC, 30)).used, 4);
    }

    /// Reservations through `SharedCounters`: synchronous adjustments are the backend's;
    /// asynchronous ones land on the mirror (a refund of counts not sent yet comes off the
    /// pending count, one of counts already sent is sent as an adjustment at the next sync).
    pub async fn shared_counters_settle_reservations(b: Arc<dyn Backend>) {
        use tollgate::ratelimit::{Adjust, AdjustPending};
        let local = Arc::new(MemoryCounters::new(100));
        let now = tollgate::ratelimit::Clock::now_ms(&tollgate::ratelimit::SystemClock);
        let hour = Window::Fixed {
            start: now - now % 3_600_000,
            end: now - now % 3_600_000 + 3_600_000,
        };
        let read = |key| ask(key, hour, 100, 0, Mode::CountOnly, now);
        let settle = |p: AdjustPending| async move {
            match p {
                AdjustPending::Ready(r) => r.unwrap(),
                AdjustPending::Wait(f) => f.await.unwrap(),
            }
        };
        let sync = SharedCounters::new(b.clone(), SyncMode::Sync, 100);
        let a = ask(60, hour, 100, 60, EC, now);
        let d = match sync.decide(a.clone(), &local) {
            Pending::Wait(f) => f.await.unwrap(),
            Pending::Ready(_) => panic!("synchronous mode waits on the backend"),
        };
        let adj = |delta| Adjust {
            delta,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(settle(sync.adjust(adj(-45))).await, Some(15));
        assert_eq!(one(&b, read(60)).await.used, 15);
        // Asynchronous.
        let interval = Duration::from_secs(3600);
        let m = SharedCounters::new(b.clone(), SyncMode::Async { interval }, 100);
        let decide = |a: Ask| match m.decide(a, &local) {
            Pending::Ready(r) => r.unwrap(),
            Pending::Wait(_) => panic!("asynchronous mode decides at once"),
        };
        let a = ask(61, hour, 100, 60, EC, now);
        let d = decide(a.clone());
        let adj = |delta| Adjust {
            delta,
            ..Adjust::of(&a, &d)
        };
        assert_eq!(
            settle(m.adjust(adj(-45))).await,
            Some(15),
            "off the pending count"
        );
        m.sync(now, interval).await;
        assert_eq!(one(&b, read(61)).await.used, 15);
        assert_eq!(settle(m.adjust(adj(-10))).await, Some(5), "a debit");
        assert!(!decide(ask(61, hour, 100, 96, EC, now)).allowed);
        assert!(
            decide(ask(61, hour, 100, 95, EC, now)).allowed,
            "the refund is usable at once"
        );
        m.sync(now, interval).await;
        assert_eq!(one(&b, read(61)).await.used, 100);
        assert_eq!(settle(m.adjust(adj(-100))).await, Some(0));
        m.sync(now, interval).await;
        assert_eq!(one(&b, read(61)).await.used, 0);
    }

    pub async fn shared_counters_use_the_backend(b: Arc<dyn Backend>) {
        let local = Arc::new(MemoryCounters::new(100));
        // Wall time: the asynchronous sync task's first tick syncs at the wall clock.
        let now = tollgate::ratelimit::Clock::now_ms(&tollgate::ratelimit::SystemClock);
        let hour = Window::Fixed {
            start: now - now % 3_600_000,
            end: now - now % 3_600_000 + 3_600_000,
        };
        // Synchronous: each decision is the backend's.
        let sync = SharedCounters::new(b.clone(), SyncMode::Sync, 100);
        let mut admitted = 0;
        for _ in 0..5 {
            let d = match sync.decide(ask(50, hour, 3, 1, EC, now), &local) {
                Pending::Wait(f) => f.await.unwrap(),
                Pending::Ready(_) => panic!("synchronous mode waits on the backend"),
            };
            assert!(!d.degraded);
            admitted += usize::from(d.allowed);
        }
        assert_eq!(admitted, 3);
        assert_eq!(
            one(&b, ask(50, hour, 3, 0, Mode::EnforceOnly, now))
                .await
                .used,
            3
        );
        // Asynchronous: counted locally, sent by a sync, seen by another replica's sync.
        let interval = Duration::from_secs(3600);
        let a = SharedCounters::new(b.clone(), SyncMode::Async { interval }, 100);
        let other = SharedCounters::new(b.clone(), SyncMode::Async { interval }, 100);
        let decide = |c: &Arc<SharedCounters>| match c.decide(ask(51, hour, 3, 1, EC, now), &local)
        {
            Pending::Ready(r) => r.unwrap(),
            Pending::Wait(_) => panic!("asynchronous mode decides at once"),
        };
        assert!(decide(&a).allowed);
        assert!(decide(&a).allowed);
        a.sync(now, interval).await;
        assert_eq!(
            one(&b, ask(51, hour, 3, 0, Mode::EnforceOnly, now))
                .await
                .used,
            2
        );
        assert!(decide(&other).allowed, "a third fits");
        other.sync(now, interval).await;
        assert!(!decide(&other).allowed, "after its sync it knows of all 3");
    }
}

/// Cache entries through the backend and through the ResponseCache's shared tier.
mod tally_suite {
    use super::*;
    use tollgate::store::TallyAdd;

    fn add(bucket: &str, field: &str, delta: i64) -> TallyAdd {
        TallyAdd {
            bucket: bucket.into(),
            field: field.into(),
            delta,
        }
    }

    /// Adds land in their bucket and field, add up across calls (as they do across replicas),
    /// read back per bucket in the order asked, and a bucket is gone after its TTL.
    pub async fn tallies_add_up_and_expire(b: Arc<dyn Backend>) {
        let (h1, h2) = ("app:hour:1000".to_owned(), "app:hour:2000".to_owned());
        let long = Duration::from_secs(60);
        b.tally_add(
            &[
                add(&h1, "requests:shop", 3),
                add(&h1, "tokens:shop", 120),
                add(&h2, "requests:shop", 1),
            ],
            long,
        )
        .await
        .unwrap();
        b.tally_add(
            &[add(&h1, "requests:shop", 2), add(&h1, "requests:bank", 7)],
            long,
        )
        .await
        .unwrap();
        let mut got = b
            .tally_read(&[h2.clone(), "app:hour:3000".into(), h1.clone()])
            .await
            .unwrap();
        for g in &mut got {
            g.sort();
        }
        assert_eq!(got[0], vec![("requests:shop".to_owned(), 1)]);
        assert!(got[1].is_empty(), "an untouched bucket is empty");
        assert_eq!(
            got[2],
            vec![
                ("requests:bank".to_owned(), 7),
                ("requests:shop".to_owned(), 5),
                ("tokens:shop".to_owned(), 120)
            ]
        );
        // A short-lived bucket disappears.
        let short = "app:hour:4000".to_owned();
        b.tally_add(&[add(&short, "requests:x", 1)], Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(
            b.tally_read(std::slice::from_ref(&short)).await.unwrap()[0].len(),
            1
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(b.tally_read(&[short]).await.unwrap()[0].is_empty());
    }
}

mod cache_suite {
    use super::*;
    use tollgate::cache::{Entry, SharedTier};

    pub async fn entries_round_trip_and_expire(b: Arc<dyn Backend>) {
        let day = Duration::from_secs(86_400);
        assert_eq!(b.cache_get("p:k1").await.unwrap(), None);
        b.cache_put("p:k1", b"v1".to_vec(), day).await.unwrap();
        b.cache_put("p:k2", vec![0, 255, 10], day).await.unwrap();
        assert_eq!(b.cache_get("p:k1").await.unwrap(), Some(b"v1".to_vec()));
        assert_eq!(b.cache_get("p:k2").await.unwrap(), Some(vec![0, 255, 10]));
        b.cache_put("p:k1", b"v2".to_vec(), day).await.unwrap();
        assert_eq!(b.cache_get("p:k1").await.unwrap(), Some(b"v2".to_vec()));
        // Entries are not records: another namespace.
        assert_eq!(b.get(store::Table::Products, "p:k1").await.unwrap(), None);
        // An entry disappears after its TTL.
        b.cache_put("p:short", b"x".to_vec(), Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(b.cache_get("p:short").await.unwrap(), None);
        assert_eq!(b.cache_get("p:k2").await.unwrap(), Some(vec![0, 255, 10]));
    }

    pub async fn the_shared_tier_round_trips_entries(b: Arc<dyn Backend>) {
        let tier = Arc::new(SharedTier::new(
            b.clone(),
            "pol",
            Duration::from_secs(2),
            Duration::from_secs(60),
        ));
        let key = [7u8; 32];
        assert!(tier.get(&key).await.is_none());
        let now = Instant::now();
        let entry = Entry {
            status: 203,
            headers: vec![("x-a".into(), "1".into())],
            content_type: "text/plain".into(),
            body: b"cached \x00 bytes".to_vec(),
            stored: now,
            expires: now + Duration::from_secs(30),
            vary: vec![
                ("accept-language".into(), Some("en".into())),
                ("x-none".into(), None),
            ],
        };
        tier.put(key, &entry);
        let mut got = None;
        for _ in 0..100 {
            got = tier.get(&key).await;
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = got.expect("the entry was stored");
        assert_eq!(
            (
                got.status,
                &got.headers,
                &got.content_type,
                &got.body,
                &got.vary
            ),
            (
                entry.status,
                &entry.headers,
                &entry.content_type,
                &entry.body,
                &entry.vary
            )
        );
        // It keeps the expiry it was stored with, not the tier's 60 s.
        let left = got.expires.saturating_duration_since(Instant::now());
        assert!(
            left <= Duration::from_secs(30) && left > Duration::from_secs(20),
            "{left:?}"
        );
        assert!(tier.get(&[8u8; 32]).await.is_none());
    }
}

/// Expands the shared suite for one backend: `store_suite!(module, async-fixture-expression)`.
macro_rules! store_suite {
    ($module:ident, $fixture:expr) => {
        mod $module {
            use super::*;

            async fn run<F, Fut>(test: F)
            where
                F: FnOnce(Store) -> Fut,
                Fut: Future<Output = ()>,
            {
                bounded(async {
                    let fixture: Fixture = $fixture.await;
                    test(fixture.store.clone()).await;
                    drop(fixture);
                })
                .await
            }

            async fn run_backend<F, Fut>(test: F)
            where
                F: FnOnce(Arc<dyn Backend>) -> Fut,
                Fut: Future<Output = ()>,
            {
                bounded(async {
                    let fixture: Fixture = $fixture.await;
                    test(fixture.backend.clone()).await;
                    drop(fixture);
                })
                .await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn products_crud() {
                run(suite::products_crud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn apps_crud() {
                run(suite::apps_crud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_updates_are_refused() {
                run(suite::stale_updates_are_refused).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn snapshot_returns_everything() {
                run(suite::snapshot_returns_everything).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn change_feed_reports_every_write() {
                run(suite::change_feed_reports_every_write).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unicode_names_and_large_attributes() {
                run(suite::unicode_names_and_large_attributes).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_creates_have_one_winner() {
                run(suite::concurrent_creates_have_one_winner).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kvm_entries_crud() {
                run(kvm_suite::kvm_entries_crud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counter_windows_count_alike() {
                run_backend(counters_suite::windows_count_alike).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counter_batches_are_decided_in_order() {
                run_backend(counters_suite::a_batch_is_decided_in_order).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counter_reservations_adjust_where_they_counted() {
                run_backend(counters_suite::reservations_adjust_where_they_counted).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared_counters_settle_reservations() {
                run_backend(counters_suite::shared_counters_settle_reservations).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counter_checkpoints_round_trip() {
                run_backend(counters_suite::checkpoints_round_trip).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared_counters_use_the_backend() {
                run_backend(counters_suite::shared_counters_use_the_backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cache_entries_round_trip_and_expire() {
                run_backend(cache_suite::entries_round_trip_and_expire).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_shared_cache_tier_round_trips_entries() {
                run_backend(cache_suite::the_shared_tier_round_trips_entries).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn usage_tallies_add_up_and_expire() {
                run_backend(tally_suite::tallies_add_up_and_expire).await
            }
        }
    };
}

store_suite!(memory_store, memory());
store_suite!(embedded_store, embedded());
store_suite!(redis_store, redis());
store_suite!(redis_cluster_store, redis_cluster());

// ---------------------------------------------------------------------------------------------
// Opening through `StoreSpec`

#[tokio::test]
async fn open_by_spec() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = RedisServer::start();
        for (spec, kind) in [
            (StoreSpec::Memory, "memory"),
            (StoreSpec::Embedded(dir.path().join("data")), "embedded"),
            (StoreSpec::Redis(server.url()), "redis"),
        ] {
            let s = Store::new(store::open(&spec).await.unwrap());
            assert_eq!(s.kind(), kind);
            s.put_product(&product("p"), Write::Create).await.unwrap();
            assert!(s.get_product("p").await.unwrap().is_some());
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Embedded

mod embedded_only {
    use super::*;
    use redb::{Database, ReadableDatabase};
    use tollgate::store::embedded::{APPS, DB_FILE, PRODUCTS};

    #[tokio::test]
    async fn reopen_keeps_data() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("nested").join("data");
            {
                let s = open_embedded(&data).unwrap();
                s.put_product(&product("gold"), Write::Create)
                    .await
                    .unwrap();
                s.put_app(&app("a1"), Write::Create).await.unwrap();
                s.put_app(&app("a2"), Write::Create).await.unwrap();
                s.delete_app("a2").await.unwrap();
            }
            let b = EmbeddedBackend::open(&data).unwrap();
            assert_eq!(b.path(), data.join(DB_FILE));
            let s = Store::new(Arc::new(b));
            assert_eq!(s.get_product("gold").await.unwrap(), Some(product("gold")));
            assert_eq!(s.get_app("a1").await.unwrap(), Some(app("a1")));
            assert_eq!(s.get_app("a2").await.unwrap(), None);
            let snap = s.snapshot().await.unwrap();
            assert_eq!((snap.products.len(), snap.apps.len()), (1, 1));
        })
        .await
    }

    #[tokio::test]
    async fn a_second_opener_is_refused_clearly() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let _first = open_embedded(dir.path()).unwrap();
            match open_embedded(dir.path()) {
                Err(StoreError::Unavailable(m)) => {
                    assert!(m.contains("already open"), "{m}");
                    assert!(m.contains(DB_FILE), "{m}");
                }
                other => panic!("second open: {other:?}"),
            }
        })
        .await
    }

    #[tokio::test]
    async fn an_unusable_directory_is_unavailable() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("a-file");
            std::fs::write(&file, b"not a directory").unwrap();
            assert!(matches!(
                open_embedded(&file),
                Err(StoreError::Unavailable(_))
            ));
            // A file that is not a redb database.
            let garbage = dir.path().join("garbage");
            std::fs::create_dir(&garbage).unwrap();
            std::fs::write(garbage.join(DB_FILE), vec![0x5a; 10_000]).unwrap();
            assert!(matches!(
                open_embedded(&garbage),
                Err(StoreError::Unavailable(_))
            ));
        })
        .await
    }

    #[tokio::test]
    async fn a_damaged_file_is_refused_not_a_panic() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = open_embedded(dir.path()).unwrap();
                for i in 0..200 {
                    s.put_app(&app(&format!("a{i}")), Write::Create)
                        .await
                        .unwrap();
                }
            }
            // Scribble over every page but the first (the header).
            let file = dir.path().join(DB_FILE);
            let mut bytes = std::fs::read(&file).unwrap();
            for b in bytes.iter_mut().skip(4096).step_by(7) {
                *b ^= 0x5a;
            }
            std::fs::write(&file, bytes).unwrap();
            let opened = std::panic::catch_unwind(|| open_embedded(dir.path()));
            match opened {
                Ok(Err(StoreError::Unavailable(m))) => {
                    assert!(m.contains(DB_FILE) && m.contains("corrupt"), "{m}")
                }
                Ok(Ok(_)) => panic!("a damaged file opened"),
                Ok(Err(e)) => panic!("unexpected error: {e}"),
                Err(_) => panic!("opening a damaged file panicked"),
            }
        })
        .await
    }

    #[tokio::test]
    async fn corrupt_values_read_as_corrupt() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = open_embedded(dir.path()).unwrap();
                s.put_product(&product("good"), Write::Create)
                    .await
                    .unwrap();
                s.put_product(&product("bad"), Write::Create).await.unwrap();
                s.put_app(&app("a1"), Write::Create).await.unwrap();
            }
            {
                // Damage the values behind the store's back.
                let db = Database::create(dir.path().join(DB_FILE)).unwrap();
                let txn = db.begin_write().unwrap();
                {
                    let mut t = txn.open_table(PRODUCTS).unwrap();
                    t.insert("bad", b"{\"name\": \"bad\", garbage".as_slice())
                        .unwrap();
                    // Valid JSON, stored under another name.
                    let other = serde_json::to_vec(&product("other")).unwrap();
                    t.insert("misfiled", other.as_slice()).unwrap();
                    let mut apps = txn.open_table(APPS).unwrap();
                    apps.insert("a1", [0xff, 0xfe, 0x00].as_slice()).unwrap();
                }
                txn.commit().unwrap();
                let read = db.begin_read().unwrap();
                assert!(read.open_table(PRODUCTS).is_ok());
            }
            let s = open_embedded(dir.path()).unwrap();
            for name in ["bad", "misfiled"] {
                match s.get_product(name).await {
                    Err(e @ StoreError::Corrupt { .. }) => {
                        let StoreError::Corrupt { kind, name: n, .. } = &e else {
                            unreachable!()
                        };
                        assert_eq!((*kind, n.as_str()), ("product", name));
                        assert!(e.to_string().contains(name), "{e}");
                    }
                    other => panic!("corrupt product {name}: {other:?}"),
                }
            }
            assert!(matches!(
                s.get_app("a1").await,
                Err(StoreError::Corrupt { kind: "app", .. })
            ));
            // The rest still reads; a snapshot leaves the damaged objects out.
            assert_eq!(s.get_product("good").await.unwrap(), Some(product("good")));
            let snap = s.snapshot().await.unwrap();
            assert_eq!(snap.products, vec![product("good")]);
            assert!(snap.apps.is_empty());
            // A damaged object can be replaced or deleted.
            s.put_product(&product("bad"), Write::Update).await.unwrap();
            let mut replaced = product("bad");
            replaced.revision = 1;
            assert_eq!(s.get_product("bad").await.unwrap(), Some(replaced));
            s.delete_app("a1").await.unwrap();
        })
        .await
    }

    const CHILD_DIR_ENV: &str = "TOLLGATE_STORE_KILL_CHILD_DIR";

    /// The child half of `acknowledged_writes_survive_kill_9`: writes products one by one and
    /// prints `acked <i>` after each `Ok`. Without the environment variable it does nothing.
    #[test]
    fn kill9_child_writer() {
        let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
            return;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = open_embedded(Path::new(&dir)).unwrap();
            for i in 0.. {
                s.put_product(&product(&format!("p{i}")), Write::Create)
                    .await
                    .unwrap();
                println!("acked {i}");
            }
        });
    }

    #[test]
    fn acknowledged_writes_survive_kill_9() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "embedded_only::kill9_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.strip_prefix("acked ") {
                    if let Ok(i) = i.trim().parse::<u64>() {
                        if tx.send(i).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = None;
        while last.is_none_or(|i| i < 30) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(i) => last = Some(i),
                Err(_) => break,
            }
        }
        // SIGKILL in the middle of the write stream.
        child.kill().unwrap();
        child.wait().unwrap();
        while let Ok(i) = rx.try_recv() {
            last = Some(i);
        }
        let last = last.expect("the child acknowledged no write");
        assert!(
            last >= 30,
            "the child acknowledged only {last} writes in 15 s"
        );

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = open_embedded(dir.path()).unwrap();
            for i in 0..=last {
                let name = format!("p{i}");
                assert_eq!(
                    s.get_product(&name).await.unwrap(),
                    Some(product(&name)),
                    "acknowledged write {i} of {last} lost"
                );
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

mod redis_only {
    use super::*;

    async fn wait_for(rx: &mut broadcast::Receiver<Change>, want: &Change, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(c)) if &c == want => return,
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(e)) => panic!("change feed closed: {e}"),
                Err(_) => panic!("no {want:?} within {limit:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_write_on_one_replica_reaches_the_other() {
        bounded(async {
            let server = RedisServer::start();
            let a = connect_redis(&server.url()).await.unwrap();
            let b = connect_redis(&server.url()).await.unwrap();
            let mut b_rx = b.subscribe();
            let mut a_rx = a.subscribe();

            let started = Instant::now();
            a.put_product(&product("gold"), Write::Create)
                .await
                .unwrap();
            assert_eq!(next_change(&mut b_rx).await, Change::Product("gold".into()));
            assert!(started.elapsed() < FEED_LIMIT);
            assert_eq!(b.get_product("gold").await.unwrap(), Some(product("gold")));
            // The writer hears its own write too.
            assert_eq!(next_change(&mut a_rx).await, Change::Product("gold".into()));

            b.put_app(&app("a1"), Write::Create).await.unwrap();
            assert_eq!(next_change(&mut a_rx).await, Change::App("a1".into()));
            // Create/update races across replicas resolve in Redis.
            assert!(matches!(
                a.put_app(&app("a1"), Write::Create).await,
                Err(StoreError::AlreadyExists { .. })
            ));
            b.delete_app("a1").await.unwrap();
            assert!(matches!(
                a.put_app(&app("a1"), Write::Update).await,
                Err(StoreError::NotFound { .. })
            ));
        })
        .await
    }

    /// A write whose notice never went out (the writer's PUBLISH timed out, a cluster-bus link
    /// was down) is found by the counter check and answered with a full re-read.
    #[tokio::test]
    async fn a_lost_notice_is_found_and_resynced() {
        bounded(async {
            let server = RedisServer::start();
            let a = connect_redis(&server.url()).await.unwrap();
            let b = connect_redis(&server.url()).await.unwrap();
            let mut b_rx = b.subscribe();
            a.put_product(&product("gold"), Write::Create)
                .await
                .unwrap();
            assert_eq!(next_change(&mut b_rx).await, Change::Product("gold".into()));

            // What a writer does when its PUBLISH is lost: the write and the increment.
            let client = redis::Client::open(server.url()).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            let json = serde_json::to_string(&product("silver")).unwrap();
            redis::pipe()
                .cmd("HSET")
                .arg(tollgate::store::redis_store::PRODUCTS_KEY)
                .arg("silver")
                .arg(json)
                .cmd("INCR")
                .arg(tollgate::store::redis_store::SEQ_KEY)
                .exec_async(&mut con)
                .await
                .unwrap();
            // Within the replicas' 2 s bound (two 500 ms checks, whatever their phase).
            assert_eq!(next_change(&mut b_rx).await, Change::Resync);
            assert!(
                tollgate::telemetry::METRICS
                    .render()
                    .contains("tollgate_store_feed_resyncs_total{reason=\"gap\"}"),
                "gap resyncs are counted"
            );
            // Heard notices after the re-read are in order again: no further resync.
            a.put_product(&product("bronze"), Write::Create)
                .await
                .unwrap();
            assert_eq!(
                next_change(&mut b_rx).await,
                Change::Product("bronze".into())
            );
            tokio::time::sleep(tollgate::store::redis_store::GAP_CHECK_EVERY * 3).await;
            assert!(b_rx.is_empty(), "no spurious resync");
        })
        .await
    }

    /// Stores on two databases of one Redis do not hear each other's notices (pub/sub
    /// channels span databases, so each database has its own).
    #[tokio::test]
    async fn databases_have_their_own_feeds() {
        bounded(async {
            let server = RedisServer::start();
            let db1 = format!("redis://127.0.0.1:{}/1", server.port);
            let a = connect_redis(&server.url()).await.unwrap();
            let b = connect_redis(&db1).await.unwrap();
            let b2 = connect_redis(&db1).await.unwrap();
            let mut a_rx = a.subscribe();
            let mut b_rx = b.subscribe();
            b2.put_app(&app("a1"), Write::Create).await.unwrap();
            assert_eq!(next_change(&mut b_rx).await, Change::App("a1".into()));
            a.put_app(&app("a2"), Write::Create).await.unwrap();
            assert_eq!(next_change(&mut a_rx).await, Change::App("a2".into()));
            tokio::time::sleep(tollgate::store::redis_store::GAP_CHECK_EVERY * 3).await;
            assert!(a_rx.is_empty() && b_rx.is_empty(), "nothing crossed over");
            assert_eq!(a.get_app("a1").await.unwrap(), None);
        })
        .await
    }

    #[tokio::test]
    async fn an_outage_is_unavailable_quickly_and_recovers() {
        bounded(async {
            let mut server = RedisServer::start();
            let s = connect_redis(&server.url()).await.unwrap();
            let mut rx = s.subscribe();
            s.put_product(&product("gold"), Write::Create)
                .await
                .unwrap();
            assert_eq!(next_change(&mut rx).await, Change::Product("gold".into()));

            server.kill();
            for round in 0..3 {
                let started = Instant::now();
                let r = s.get_product("gold").await;
                let took = started.elapsed();
                assert!(
                    matches!(r, Err(StoreError::Unavailable(_))),
                    "round {round}: {r:?}"
                );
                assert!(took < Duration::from_secs(3), "round {round} took {took:?}");
                let started = Instant::now();
                let r = s.put_app(&app("a1"), Write::Create).await;
                assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
                assert!(started.elapsed() < Duration::from_secs(3));
            }
            let snap = tokio::time::timeout(Duration::from_secs(3), s.snapshot()).await;
            assert!(matches!(snap, Ok(Err(StoreError::Unavailable(_)))));

            // Back on the same port (empty: the test server persists nothing).
            server.restart();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match s.put_product(&product("silver"), Write::Create).await {
                    Ok(()) => break,
                    Err(StoreError::Unavailable(m)) => {
                        assert!(Instant::now() < deadline, "still unavailable: {m}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("after the restart: {e}"),
                }
            }
            assert_eq!(
                s.get_product("silver").await.unwrap(),
                Some(product("silver"))
            );
            // The subscriber reconnected by itself and asks for a full re-read.
            wait_for(&mut rx, &Change::Resync, Duration::from_secs(8)).await;
            // And it forwards changes again.
            s.delete_product("silver").await.unwrap();
            wait_for(&mut rx, &Change::Product("silver".into()), FEED_LIMIT).await;
        })
        .await
    }

    /// Redis restarts while a replica is idle: its next read works at once.
    #[tokio::test]
    async fn an_idle_replica_reads_right_after_a_restart() {
        bounded(async {
            let mut server = RedisServer::start();
            let s = connect_redis(&server.url()).await.unwrap();
            s.put_product(&product("gold"), Write::Create)
                .await
                .unwrap();
            server.restart();
            assert_eq!(s.get_product("gold").await.unwrap(), None);
            s.put_product(&product("gold"), Write::Create)
                .await
                .unwrap();
            let snap = s.snapshot().await.unwrap();
            assert_eq!(snap.products, vec![product("gold")]);
        })
        .await
    }

    /// A server that stops answering (SIGSTOP: connections stay open) must not hang callers.
    #[tokio::test]
    async fn a_frozen_server_times_out_and_recovers() {
        bounded(async {
            let server = RedisServer::start();
            let s = connect_redis(&server.url()).await.unwrap();
            s.put_product(&product("gold"), Write::Create)
                .await
                .unwrap();
            let pid = server.pid();
            signal(pid, "STOP");
            let started = Instant::now();
            let r = s.get_product("gold").await;
            let took = started.elapsed();
            signal(pid, "CONT");
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
            assert!(took < Duration::from_secs(3), "took {took:?}");
            let deadline = Instant::now() + Duration::from_secs(8);
            loop {
                match s.get_product("gold").await {
                    Ok(p) => {
                        assert_eq!(p, Some(product("gold")));
                        break;
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "not back: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_silent_listener_is_unavailable() {
        bounded(async {
            // Accepts connections (the kernel does) and never answers.
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            for url in [
                format!("redis://127.0.0.1:{port}/"),
                format!("redis+cluster://127.0.0.1:{port}"),
            ] {
                let started = Instant::now();
                let r = connect_redis(&url).await;
                assert!(matches!(r, Err(StoreError::Unavailable(_))), "{url}: {r:?}");
                assert!(started.elapsed() < Duration::from_secs(7), "{url}");
            }
            drop(listener);
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_on_a_three_node_cluster() {
        bounded(async {
            let cluster = RedisCluster::start();
            let a = connect_redis(&cluster.url(&[0, 1, 2])).await.unwrap();
            // Another replica knows a different seed, so its change feed is on another node.
            let b = connect_redis(&cluster.url(&[2])).await.unwrap();
            let mut b_rx = b.subscribe();
            let mut a_rx = a.subscribe();

            for i in 0..20 {
                a.put_product(&product(&format!("p{i}")), Write::Create)
                    .await
                    .unwrap();
            }
            b.put_app(&app("a1"), Write::Create).await.unwrap();
            for i in 0..20 {
                assert_eq!(
                    next_change(&mut b_rx).await,
                    Change::Product(format!("p{i}"))
                );
            }
            assert_eq!(next_change(&mut b_rx).await, Change::App("a1".into()));
            wait_for(&mut a_rx, &Change::App("a1".into()), FEED_LIMIT).await;

            b.put_app(&app("a1"), Write::Update).await.unwrap();
            assert!(matches!(
                a.put_app(&app("a1"), Write::Create).await,
                Err(StoreError::AlreadyExists { .. })
            ));
            let snap = b.snapshot().await.unwrap();
            assert_eq!((snap.products.len(), snap.apps.len()), (20, 1));
            a.delete_product("p3").await.unwrap();
            assert_eq!(b.get_product("p3").await.unwrap(), None);
        })
        .await
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_unavailable() {
        bounded(async {
            let port = free_port();
            let started = Instant::now();
            match connect_redis(&format!("redis://127.0.0.1:{port}/")).await {
                Err(StoreError::Unavailable(m)) => assert!(m.contains(&port.to_string()), "{m}"),
                other => panic!("{other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(3));
            let started = Instant::now();
            let cluster = format!("redis+cluster://127.0.0.1:{port}");
            match connect_redis(&cluster).await {
                Err(StoreError::Unavailable(m)) => assert!(m.contains(&port.to_string()), "{m}"),
                other => panic!("{other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(6));
            for bad in ["redis+cluster://", "redis+cluster://h:1/2", "nonsense"] {
                assert!(
                    matches!(connect_redis(bad).await, Err(StoreError::Unavailable(_))),
                    "{bad}"
                );
            }
            // Passwords stay out of messages.
            match connect_redis(&format!("redis://user:hunter2@127.0.0.1:{port}/")).await {
                Err(e) => assert!(!e.to_string().contains("hunter2"), "{e}"),
                Ok(_) => panic!("connected to nothing"),
            }
        })
        .await
    }

    #[tokio::test]
    async fn corrupt_values_read_as_corrupt() {
        bounded(async {
            let server = RedisServer::start();
            let s = connect_redis(&server.url()).await.unwrap();
            s.put_product(&product("good"), Write::Create)
                .await
                .unwrap();
            let client = redis::Client::open(server.url()).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("HSET")
                .arg(tollgate::store::redis_store::PRODUCTS_KEY)
                .arg("bad")
                .arg("not json")
                .exec_async(&mut con)
                .await
                .unwrap();
            assert!(matches!(
                s.get_product("bad").await,
                Err(StoreError::Corrupt { kind: "product", ref name, .. }) if name == "bad"
            ));
            let snap = s.snapshot().await.unwrap();
            assert_eq!(snap.products, vec![product("good")]);
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// ResponseCache's shared Redis tier: two replicas (separate local caches) on one Redis.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_cache_shared_tier_serves_other_replicas() {
    use tollgate::pipeline::{Direction, Hook, Outcome, Policy};
    use tollgate::policies::{builder, BuildContext};
    use tollgate::vars::{Exchange, Headers, RequestInfo, ResponseInfo};

    bounded(async {
        let server = RedisServer::start();
        let spec = format!(
            "ttlSeconds: 60\nshared: {{redis: '{}', timeoutMs: 500}}\n",
            server.url()
        );
        let replica = || {
            let ctx = BuildContext {
                name: "shared-cache".into(),
                ..Default::default()
            };
            builder("ResponseCache").unwrap()(&ctx, serde_norway::from_str(&spec).unwrap()).unwrap()
        };
        let (a, b): (Arc<dyn Policy>, Arc<dyn Policy>) = (replica(), replica());
        let request = || {
            let mut h = Headers::new();
            h.push(":method".into(), "GET".into());
            h.push(":path".into(), "/shared?x=1".into());
            Exchange {
                request: RequestInfo::from_headers(h),
                ..Default::default()
            }
        };
        async fn run(p: &Arc<dyn Policy>, ex: &mut Exchange, dir: Direction) -> bool {
            let r = match p.run(ex, dir) {
                Hook::Ready(o) => o
                    .into_result()
                    .map(|a| assert!(a.is_none(), "unexpected answer")),
                Hook::Pending(f) => f
                    .await
                    .into_result()
                    .map(|a| assert!(a.is_none(), "unexpected answer")),
            };
            r.is_err()
        }
        // Replica a: miss, then the response is stored (locally and in Redis).
        let mut ex = request();
        assert!(!run(&a, &mut ex, Direction::Request).await);
        let mut h = Headers::new();
        h.push("content-type".into(), "text/plain".into());
        ex.response = Some(ResponseInfo {
            status: 200,
            headers: h,
        });
        assert!(!run(&a, &mut ex, Direction::Response).await);
        // What the stream does once the body streamed past.
        ex.response_body = Some(b"from replica a".to_vec());
        assert!(a.response_end(&mut ex).outcome().await.is_continue());
        // Replica b never saw it: its hit comes from Redis (written in the background).
        let mut found = None;
        for _ in 0..50 {
            let mut ex = request();
            if let Hook::Pending(f) = b.run(&mut ex, Direction::Request) {
                if let Outcome::Respond(answer) = f.await {
                    found = Some(answer);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hit = found.expect("replica b answers from the shared tier");
        assert_eq!(hit.status, 200);
        let content_type = hit.headers.iter().find(|(n, _)| n == "content-type");
        assert_eq!(
            (
                content_type.map(|(_, v)| v.clone()).unwrap(),
                hit.body.clone()
            ),
            ("text/plain".to_owned(), b"from replica a".to_vec())
        );
        assert!(hit.headers.iter().any(|(n, _)| n == "age"));
        drop(server);
    })
    .await;
}
