//! The vector index's Redis tier against a real `redis-server`: replicas (each a local
//! `VectorIndex` and a `SharedIndex` following the others) share entries, a late replica
//! backfills the live ones, TTLs survive the trip, and a dead Redis never blocks or fails the
//! publisher.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tollgate::embed::Embedding;
use tollgate::vindex::shared::SharedIndex;
use tollgate::vindex::{IndexConfig, Scope, VectorIndex};

mod support;

use support::redis::RedisServer;

const TIMEOUT: Duration = Duration::from_millis(500);

/// One replica: its own index, filled by its follower with the others' entries.
struct Replica {
    index: Arc<VectorIndex<Bytes>>,
    shared: SharedIndex,
    /// Remaining TTLs the follower was handed.
    ttls: Arc<Mutex<Vec<Duration>>>,
    _follower: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(url: &str) -> Self {
        let index = Arc::new(VectorIndex::new(IndexConfig {
            max_bytes: 1 << 24,
            ttl: Duration::from_secs(3600),
            exact_up_to: 2048,
        }));
        let shared = SharedIndex::connect(url, "test", TIMEOUT).expect("valid URL");
        let ttls = Arc::new(Mutex::new(Vec::new()));
        let (i, t) = (index.clone(), ttls.clone());
        let follower = shared.follow(move |scope, e, payload, ttl| {
            t.lock().push(ttl);
            let n = payload.len();
            i.insert_with_ttl(scope, e, Arc::new(payload), n, ttl);
        });
        Self {
            index,
            shared,
            ttls,
            _follower: follower,
        }
    }

    /// What the semantic cache does on populate: local insert, then share.
    fn populate(&self, scope: Scope, e: &Embedding, payload: &str, ttl: Duration) {
        let p = Bytes::from(payload.to_owned());
        self.index
            .insert_with_ttl(scope, e.clone(), Arc::new(p.clone()), p.len(), ttl);
        self.shared.publish(scope, e, p, ttl);
    }

    fn find(&self, scope: Scope, e: &Embedding) -> Option<String> {
        let hit = self.index.search(scope, e, 0.999, 1).into_iter().next()?;
        Some(String::from_utf8_lossy(&hit.value).into_owned())
    }

    /// Waits (bounded) until `e` is found with `payload`.
    async fn wait_for(&self, scope: Scope, e: &Embedding, payload: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.find(scope, e).as_deref() != Some(payload) {
            assert!(
                Instant::now() < deadline,
                "{payload} never reached this replica"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn vector(seed: u32) -> Embedding {
    // Distinct directions: one hot-ish vectors with a seed-dependent tail.
    let mut v = vec![0.01f32; 64];
    v[(seed as usize) % 64] = 1.0;
    v[(seed as usize * 7 + 3) % 64] += 0.5;
    Embedding::normalized(v).expect("non-zero")
}

fn errors_total() -> f64 {
    tollgate::telemetry::METRICS
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == "tollgate_semantic_shared_errors_total")
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_published_by_one_replica_is_found_by_the_other() {
    let redis = RedisServer::start();
    let a = Replica::start(&redis.url());
    let b = Replica::start(&redis.url());
    let (e1, e2) = (vector(1), vector(2));
    assert_eq!(b.find(7, &e1), None);
    a.populate(7, &e1, "answer one", Duration::from_secs(60));
    b.wait_for(7, &e1, "answer one").await;
    // Scopes stay apart across replicas too.
    assert!(b.index.search(8, &e1, -1.0, 5).is_empty());
    // B's entry reaches A after A's own record in the stream: by then A has skipped its
    // own, so it holds its entry once, plus B's.
    b.populate(7, &e2, "answer two", Duration::from_secs(60));
    a.wait_for(7, &e2, "answer two").await;
    assert_eq!(
        a.index.len(),
        2,
        "a replica never re-inserts its own entries"
    );
    assert_eq!(b.index.len(), 2);
    // The TTL handed over is what is left of the entry's life.
    let ttls = b.ttls.lock().clone();
    assert_eq!(ttls.len(), 1);
    assert!(ttls[0] <= Duration::from_secs(60) && ttls[0] > Duration::from_secs(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_replica_backfills_live_entries_only() {
    let redis = RedisServer::start();
    let a = Replica::start(&redis.url());
    let (long, short, after) = (vector(10), vector(11), vector(12));
    a.populate(3, &long, "long", Duration::from_secs(60));
    a.populate(3, &short, "short", Duration::from_millis(200));
    // Wait until Redis expired the short one (bounded; no fixed sleep).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("tollgate:vindex:test:e:*")
            .query_async(&mut con)
            .await
            .unwrap();
        if keys.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "keys: {keys:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.populate(3, &after, "after", Duration::from_secs(60));
    // C starts now: it reads the whole stream in order, so once it has `after` it has seen
    // the records of all three.
    let c = Replica::start(&redis.url());
    c.wait_for(3, &after, "after").await;
    assert_eq!(c.find(3, &long).as_deref(), Some("long"));
    assert_eq!(c.find(3, &short), None, "an expired entry is not revived");
    assert_eq!(c.index.len(), 2);
    for ttl in c.ttls.lock().iter() {
        assert!(*ttl <= Duration::from_secs(60) && !ttl.is_zero());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_neither_blocks_nor_fails_the_publisher() {
    let mut redis = RedisServer::start();
    let a = Replica::start(&redis.url());
    let b = Replica::start(&redis.url());
    let e = vector(20);
    a.populate(1, &e, "before", Duration::from_secs(60));
    b.wait_for(1, &e, "before").await;
    redis.kill();
    let before = errors_total();
    // Publishing goes on: every call returns, the local index keeps working.
    for i in 0..500u32 {
        a.populate(2, &vector(100 + i), "while down", Duration::from_secs(60));
    }
    assert_eq!(a.find(2, &vector(150)).as_deref(), Some("while down"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while errors_total() <= before {
        assert!(Instant::now() < deadline, "failures are counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Redis back (empty): sharing resumes by itself.
    redis.restart();
    let again = vector(40);
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.find(1, &again).is_none() {
        assert!(Instant::now() < deadline, "sharing never resumed");
        a.shared.publish(
            1,
            &again,
            Bytes::from_static(b"again"),
            Duration::from_secs(60),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(b.find(1, &again).as_deref(), Some("again"));
}
