//! Quota and SpikeArrest through a real Envoy 1.40: the rate-limit headers set while the
//! request is decided reach the client on the upstream's answer, and a refusal reaches it as
//! 429 with `Retry-After` in the flow's error format.

mod support;

use std::time::Duration;

use support::{within, TestBed};

const LIMIT: Duration = Duration::from_secs(20);

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: hourly}
spec:
  type: Quota
  allow: 2
  timeUnit: hour
  quotaType: flexi
  identifier: "{request.header.x-user}"
  rateLimitHeaders: both
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: smooth}
spec: {type: SpikeArrest, rate: 1pm, identifier: "{request.header.x-user}"}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: quota}
spec:
  match: {pathPrefixes: [/quota]}
  errorFormat: openai
  request: [{policy: hourly}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: spike}
spec:
  match: {pathPrefixes: [/spike]}
  request: [{policy: smooth}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_clients_through_envoy() {
    within(LIMIT, async {
        let bed = TestBed::start(CONFIG).await;
        let user = [("x-user", "ann")];
        let r = bed.get("/quota/echo", &user).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
        assert_eq!(r.header("ratelimit-policy"), Some("\"hourly\";q=2;w=3600"));
        let reset: i64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&reset), "reset {reset}");
        assert!(r
            .header("ratelimit")
            .unwrap()
            .starts_with("\"hourly\";r=1;t="));
        let r = bed.get("/quota/echo", &user).await;
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));

        let r = bed.get("/quota/echo", &user).await;
        assert_eq!(r.status, 429);
        let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&retry), "retry-after {retry}");
        let body = r.json();
        assert_eq!(body["error"]["code"], "policies.ratelimit.QuotaViolation");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(bed.upstream.seen_with_prefix("/quota").len(), 2);

        // One a minute, smoothed: the second request at once is refused.
        assert_eq!(bed.get("/spike/echo", &user).await.status, 200);
        let r = bed.get("/spike/echo", &user).await;
        assert_eq!(r.status, 429);
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "policies.ratelimit.SpikeArrestViolation"
        );
        let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((55..=60).contains(&retry), "retry-after {retry}");
        // Another identifier has its own limiter.
        assert_eq!(
            bed.get("/spike/echo", &[("x-user", "bob")]).await.status,
            200
        );
        let metrics = bed.tollgate.metrics().await;
        assert!(
            metrics.contains(
                "tollgate_ratelimit_decisions_total{policy=\"hourly\",result=\"rejected\"} 1"
            ),
            "{metrics}"
        );
    })
    .await;
}
