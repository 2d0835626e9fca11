//! ResponseCache end to end: a real Envoy 1.40 in front of the `tollgate` binary. A miss
//! goes upstream and is stored as it passes; a hit is answered by tollgate at once (the
//! upstream never sees it); server-sent events stream through on the miss and are replayed
//! on the hit; POST bodies are part of the key; oversize responses pass on uncached.

mod support;

use std::time::Duration;

use support::{within, TestBed};

const LIMIT: Duration = Duration::from_secs(30);

const CACHE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec:
  type: ResponseCache
  methods: [GET, POST]
  ttlSeconds: 60
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: small-cache}
spec:
  type: ResponseCache
  maxEntryBytes: 64
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: big}
spec:
  match: {pathPrefixes: [/big]}
  request: [{policy: small-cache}]
  response: [{policy: small-cache}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: cached}
spec:
  default: true
  request: [{policy: cache}]
  response: [{policy: cache}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_cache_hits_replays_sse_and_keys_post_bodies() {
    within(LIMIT, async {
        let bed = TestBed::start(CACHE).await;

        // Plain GET (headers-only route: tollgate asks Envoy for the response body).
        let first = bed.get("/echo?x=1", &[]).await;
        assert_eq!(first.status, 200);
        assert_eq!(
            first.header("cache-status"),
            Some("tollgate; fwd=miss; stored")
        );
        let second = bed.get("/echo?x=1", &[]).await;
        assert_eq!(second.status, 200);
        assert_eq!(second.header("cache-status"), Some("tollgate; hit"));
        assert!(second.header("age").is_some());
        assert_eq!(second.header("content-type"), Some("application/json"));
        assert_eq!(
            second.header("x-upstream"),
            Some("e2e"),
            "stored headers replayed"
        );
        assert_eq!(second.body, first.body, "stored body replayed");
        assert_eq!(
            bed.upstream.seen_with_prefix("/echo").len(),
            1,
            "the hit never went upstream"
        );
        bed.get("/echo?x=2", &[]).await;
        assert_eq!(
            bed.upstream.seen_with_prefix("/echo").len(),
            2,
            "another query is another key"
        );

        // Server-sent events: streamed through on the miss, replayed on the hit.
        let s = bed
            .client
            .stream("GET", &bed.url("/sse?n=3&delay_ms=200"), &[], "")
            .await;
        assert_eq!(s.status, 200);
        let streamed = String::from_utf8(s.body()).unwrap();
        assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed:?}");
        assert!(
            s.chunks[0].at + Duration::from_millis(300) < s.total,
            "events were not held back on the miss: first {:?}, end {:?}",
            s.chunks[0].at,
            s.total
        );
        let hit = bed
            .client
            .stream("GET", &bed.url("/sse?n=3&delay_ms=200"), &[], "")
            .await;
        assert_eq!(hit.status, 200);
        assert_eq!(hit.header("content-type"), Some("text/event-stream"));
        assert_eq!(hit.header("cache-status"), Some("tollgate; hit"));
        assert_eq!(String::from_utf8(hit.body()).unwrap(), streamed);
        assert_eq!(bed.upstream.seen_with_prefix("/sse").len(), 1);

        // POST: keyed on a digest of the body (BUFFERED request route).
        let ct = [("content-type", "application/json")];
        let a = bed
            .post("/v1/chat/completions", &ct, r#"{"temperature":0,"n":1}"#)
            .await;
        let b = bed
            .post("/v1/chat/completions", &ct, r#"{"temperature":0,"n":1}"#)
            .await;
        let c = bed
            .post("/v1/chat/completions", &ct, r#"{"temperature":0,"n":2}"#)
            .await;
        assert_eq!(a.header("cache-status"), Some("tollgate; fwd=miss; stored"));
        assert_eq!(b.header("cache-status"), Some("tollgate; hit"));
        assert_eq!(b.body, a.body);
        assert_ne!(c.body, a.body);
        assert_eq!(
            bed.upstream.seen_with_prefix("/v1/chat/completions").len(),
            2
        );

        // Larger than maxEntryBytes: passed on whole, every time, never stored.
        for _ in 0..2 {
            let r = bed.get("/big", &[]).await;
            assert_eq!(r.status, 200);
            assert!(r.body.len() > 64);
            assert!(r.json()["path"] == "/big");
        }
        assert_eq!(bed.upstream.seen_with_prefix("/big").len(), 2);
    })
    .await;
}

const SHARED_SAFELY: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec:
  type: ResponseCache
  ttlSeconds: 60
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: mark-public}
spec:
  type: AssignMessage
  set: {headers: {cache-control: "public, max-age=60"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: cached}
spec:
  default: true
  request: [{policy: cache}]
  response:
  - policy: mark-public
    condition: "request.headers['x-public'] == 'yes'"
  - policy: cache
"#;

/// Issue 12 point 6: one site's entry never answers another host, and a response to a
/// request with credentials is stored in a shared (global) cache only when the response
/// says anyone may have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_cache_keys_by_host_and_keeps_personal_answers() {
    within(LIMIT, async {
        let bed = TestBed::start(SHARED_SAFELY).await;
        let seen = |p: &str| bed.upstream.seen_with_prefix(p).len();

        let a = bed.get("/echo?h=1", &[("host", "a.example")]).await;
        assert_eq!(a.header("cache-status"), Some("tollgate; fwd=miss; stored"));
        let b = bed.get("/echo?h=1", &[("host", "b.example")]).await;
        assert_eq!(
            b.header("cache-status"),
            Some("tollgate; fwd=miss; stored"),
            "another host is another key"
        );
        let a2 = bed.get("/echo?h=1", &[("host", "A.EXAMPLE")]).await;
        assert_eq!(a2.header("cache-status"), Some("tollgate; hit"));
        assert_eq!(a2.body, a.body);
        assert_eq!(seen("/echo?h=1"), 2);

        // Alice's answer is not stored, so nobody else is served it.
        let alice = bed
            .get("/echo?c=1", &[("authorization", "Bearer alice")])
            .await;
        assert_eq!(alice.status, 200);
        assert_eq!(alice.header("cache-status"), Some("tollgate; fwd=miss"));
        let anon = bed.get("/echo?c=1", &[]).await;
        assert_ne!(anon.header("cache-status"), Some("tollgate; hit"));
        assert!(!anon.text().contains("Bearer alice"), "{}", anon.text());
        let key = bed.get("/echo?c=2", &[("x-api-key", "k")]).await;
        assert_eq!(key.header("cache-status"), Some("tollgate; fwd=miss"));

        // Unless the response is public.
        let public = bed
            .get(
                "/echo?c=3",
                &[("authorization", "Bearer alice"), ("x-public", "yes")],
            )
            .await;
        assert_eq!(
            public.header("cache-status"),
            Some("tollgate; fwd=miss; stored")
        );
        let again = bed.get("/echo?c=3", &[]).await;
        assert_eq!(again.header("cache-status"), Some("tollgate; hit"));
    })
    .await;
}

const SOFT_CACHE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec:
  type: ResponseCache
  ttlSeconds: 60
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: cached}
spec:
  default: true
  request: [{policy: cache, continueOnError: true}]
  response: [{policy: cache}]
"#;

/// A hit is a served answer, not a fault: `continueOnError` on the lookup step does not
/// turn it into a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_under_continue_on_error_is_still_a_hit() {
    within(LIMIT, async {
        let bed = TestBed::start(SOFT_CACHE).await;
        let first = bed.get("/echo?soft=1", &[]).await;
        assert_eq!(
            first.header("cache-status"),
            Some("tollgate; fwd=miss; stored")
        );
        let second = bed.get("/echo?soft=1", &[]).await;
        assert_eq!(second.status, 200);
        assert_eq!(second.header("cache-status"), Some("tollgate; hit"));
        assert_eq!(second.body, first.body);
        assert_eq!(
            bed.upstream.seen_with_prefix("/echo").len(),
            1,
            "the hit never went upstream"
        );
    })
    .await;
}

const APIGEE_CACHE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: apigee-cache}
spec:
  type: ResponseCache
  profile: apigee
  keyFragments: ["{request.uri}"]
  expiry: {timeoutInSec: {ref: cache.ttl, value: 120}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: plain-cache}
spec:
  type: ResponseCache
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set: {headers: {x-resp-step: "{request.header.x-n}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: mark}
spec:
  type: JavaScript
  mode: apigee
  source: |
    var hit = context.getVariable('responsecache.apigee-cache.cachehit');
    context.setVariable('response.header.x-cachehit', String(hit));
    // Reads the body: the response is held, and the cache before this step still stores it.
    context.setVariable('response.header.x-length', response.content.length);
    if (hit && request.headers['x-fail']) throw new Error('refused on the hit');
    if (hit && request.headers['x-status']) response.status.code = Number(request.headers['x-status']);
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: apigee}
spec:
  match: {pathPrefixes: [/apigee]}
  request: [{policy: apigee-cache}]
  response: [{policy: apigee-cache}, {policy: tag}, {policy: mark}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: plain}
spec:
  default: true
  request: [{policy: plain-cache}]
  response: [{policy: plain-cache}, {policy: tag}]
"#;

/// `profile: apigee`: a hit skips the upstream but the flow's response steps run on the
/// cached answer (headers set, `responsecache.<p>.cachehit` true), and a response step
/// that fails on it still fails the exchange; tollgate's default answers a hit at once.
/// A later response step that holds the body does not keep the cache from storing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apigee_hits_run_the_response_steps() {
    within(LIMIT, async {
        let bed = TestBed::start(APIGEE_CACHE).await;
        let miss = bed.get("/apigee/a", &[("x-n", "1")]).await;
        assert_eq!(miss.status, 200);
        assert_eq!(miss.header("x-resp-step"), Some("1"));
        assert_eq!(miss.header("x-cachehit"), Some("false"));
        let hit = bed.get("/apigee/a", &[("x-n", "2")]).await;
        assert_eq!(hit.status, 200);
        assert_eq!(hit.header("cache-status"), Some("tollgate; hit"));
        assert_eq!(hit.header("x-resp-step"), Some("2"), "response steps ran");
        assert_eq!(hit.header("x-cachehit"), Some("true"));
        assert_eq!(hit.body, miss.body);
        assert_eq!(
            hit.header("x-length"),
            Some(miss.body.len().to_string().as_str())
        );
        assert_eq!(bed.upstream.seen_with_prefix("/apigee/a").len(), 1);
        // A status a response step sets on the hit is the one served.
        let changed = bed
            .get("/apigee/a", &[("x-status", "203"), ("x-n", "4")])
            .await;
        assert_eq!(changed.status, 203);
        assert_eq!(changed.body, miss.body);
        // Fail closed: a response step that fails on the hit fails the exchange.
        let refused = bed.get("/apigee/a", &[("x-fail", "1"), ("x-n", "3")]).await;
        assert_eq!(refused.status, 500);
        assert!(
            String::from_utf8_lossy(&refused.body)
                .contains("steps.javascript.ScriptExecutionFailed"),
            "{:?}",
            String::from_utf8_lossy(&refused.body)
        );
        assert_eq!(bed.upstream.seen_with_prefix("/apigee/a").len(), 1);

        // tollgate's profile: the hit is answered at once, no response step runs.
        let miss = bed.get("/plain", &[("x-n", "1")]).await;
        assert_eq!(miss.header("x-resp-step"), Some("1"));
        let hit = bed.get("/plain", &[("x-n", "2")]).await;
        assert_eq!(hit.header("cache-status"), Some("tollgate; hit"));
        assert_eq!(
            hit.header("x-resp-step"),
            Some("1"),
            "the stored header is replayed; the step did not run again"
        );
    })
    .await;
}
