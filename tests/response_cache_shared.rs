//! ResponseCache's shared tier against a real `redis-server`: two replicas (two policy
//! instances with their own local caches and services) share what either stored, and an
//! entry read from Redis keeps the expiry it was stored with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::fault::Fault;
use tollgate::pipeline::{Answer, Direction, Policy};
use tollgate::policies::{response_cache, BuildContext};
use tollgate::services::Services;
use tollgate::vars::{Exchange, Headers, RequestInfo, ResponseInfo};

mod support;

use support::redis::RedisServer;

/// One replica's policy: fresh services (so its own local cache), the shared Redis tier.
fn replica(redis: &str, ttl: u64) -> Arc<dyn Policy> {
    let ctx = BuildContext {
        name: "shared".into(),
        services: Services::default(),
        ..Default::default()
    };
    let spec = format!("ttlSeconds: {ttl}\nshared: {{redis: '{redis}', timeoutMs: 1000}}");
    response_cache::build(&ctx, serde_norway::from_str(&spec).unwrap()).unwrap()
}

fn request(uri: &str) -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "GET".into());
    h.push(":path".into(), uri.into());
    Exchange {
        request: RequestInfo::from_headers(h),
        ..Default::default()
    }
}

/// `Ok(None)`: go on; `Ok(Some(answer))`: a hit (a served answer, not a fault).
async fn run(
    p: &Arc<dyn Policy>,
    ex: &mut Exchange,
    dir: Direction,
) -> Result<Option<Box<Answer>>, Fault> {
    p.run(ex, dir).outcome().await.into_result()
}

/// A lookup: the hit's body and `age`, or `None` for a miss.
async fn lookup(p: &Arc<dyn Policy>, uri: &str) -> Option<(Vec<u8>, u64)> {
    let mut ex = request(uri);
    let f = run(p, &mut ex, Direction::Request)
        .await
        .expect("a hit, not a fault")?;
    let age = f
        .headers
        .iter()
        .find(|(n, _)| n == "age")
        .and_then(|(_, v)| v.parse().ok())
        .expect("age");
    Some((f.body, age))
}

/// A miss that goes upstream and stores `body`.
async fn store(p: &Arc<dyn Policy>, uri: &str, body: &str) {
    let mut ex = request(uri);
    run(p, &mut ex, Direction::Request).await.unwrap();
    let mut h = Headers::new();
    h.push(":status".into(), "200".into());
    h.push("content-type".into(), "text/plain".into());
    ex.response = Some(ResponseInfo {
        status: 200,
        headers: h,
    });
    run(p, &mut ex, Direction::Response).await.unwrap();
    assert!(ex.response_capture > 0, "the body is asked for");
    // What the stream does once the body streamed past.
    assert!(p.hooks().response_copy);
    ex.response_body = Some(body.as_bytes().to_vec());
    assert!(p.response_end(&mut ex).outcome().await.is_continue());
}

/// Waits (bounded) until the background write reached Redis.
async fn written(redis: &RedisServer, n: usize) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("tollgate:cache:shared:*")
            .query_async(&mut con)
            .await
            .unwrap();
        if keys.len() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "the entry never reached Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_one_replica_is_a_hit_in_the_other() {
    let redis = RedisServer::start();
    let a = replica(&redis.url(), 60);
    let b = replica(&redis.url(), 60);
    assert_eq!(lookup(&b, "/shared").await, None);
    store(&a, "/shared", "from a").await;
    written(&redis, 1).await;
    let (body, _) = lookup(&b, "/shared").await.expect("b hits a's entry");
    assert_eq!(body, b"from a");
    assert_eq!(lookup(&b, "/other").await, None, "another key is a miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_from_redis_keeps_its_expiry() {
    let redis = RedisServer::start();
    let a = replica(&redis.url(), 2);
    let b = replica(&redis.url(), 2);
    store(&a, "/ttl", "x").await;
    written(&redis, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // B reads it from Redis about 1.2 s into its 2 s life (and keeps it locally)...
    let (_, age) = lookup(&b, "/ttl").await.expect("fresh in Redis");
    assert!(age >= 1, "age {age}");
    // ...and stops serving it when it expires, not a full TTL after B fetched it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(lookup(&b, "/ttl").await, None);
    assert_eq!(lookup(&a, "/ttl").await, None);
}
