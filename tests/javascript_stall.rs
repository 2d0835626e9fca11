//! A script that runs to its time limit must delay only its own request: with more looping
//! scripts than the server has worker threads, other streams and the admin port still
//! answer, and answer before any of the scripts is stopped.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use support::{eventually, ext_proc, raw_get, within, Tollgate};
use tokio::sync::mpsc;

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: spin}
spec:
  type: JavaScript
  source: "print('spinning ' + request.path); while (true) {}"
  timeLimitMs: 1000
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: spin}
spec:
  match: {pathPrefixes: [/spin]}
  request: [{policy: spin}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: empty}
spec:
  match: {pathPrefixes: [/empty]}
  request: []
"#;

/// One ext_proc exchange (request headers only); the kind of answer it got.
async fn ask(grpc: std::net::SocketAddr, path: &str) -> &'static str {
    let client = ext_proc::connect(grpc).await;
    let msg = ext_proc::request_headers(
        &[(":method", "GET"), (":path", path), (":authority", "a")],
        true,
    );
    match ext_proc::ask_once(&client, msg).await.response {
        Some(Response::RequestHeaders(_)) => "continue",
        Some(Response::ImmediateResponse(i)) => {
            assert_eq!(i.status.unwrap().code, 500, "{:?}", i.body);
            "fault"
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_scripts_do_not_stall_other_streams_or_health_checks() {
    within(Duration::from_secs(60), async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("config");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("config.yaml"), CONFIG).unwrap();
        let tg = Tollgate::start(&dir, tmp.path(), &[]).await;

        // The server has one worker thread per core; loop on twice as many.
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let (events, mut done) = mpsc::unbounded_channel::<&'static str>();
        for i in 0..n {
            let (grpc, events) = (tg.grpc, events.clone());
            tokio::spawn(async move {
                let answer = ask(grpc, &format!("/spin/{i}")).await;
                assert_eq!(answer, "fault", "the time limit stops the script");
                let _ = events.send("spin");
            });
        }
        // Every script is running (each printed before looping).
        eventually(Duration::from_secs(20), "all scripts running", || async {
            (tg.log().matches("spinning /spin/").count() >= n).then_some(())
        })
        .await;

        let (grpc, ev) = (tg.grpc, events.clone());
        tokio::spawn(async move {
            assert_eq!(ask(grpc, "/empty").await, "continue");
            let _ = ev.send("empty flow");
        });
        let (admin, ev) = (tg.admin, events.clone());
        tokio::spawn(async move {
            let (status, _) = raw_get(admin, "/healthz").await.unwrap();
            assert_eq!(status, 200);
            let _ = ev.send("healthz");
        });
        drop(events);

        let mut order = Vec::new();
        while let Some(e) = done.recv().await {
            order.push(e);
        }
        assert_eq!(order.len(), n + 2, "every exchange answered: {order:?}");
        let mut first_two = order[..2].to_vec();
        first_two.sort_unstable();
        assert_eq!(
            first_two,
            ["empty flow", "healthz"],
            "other streams and health checks answer while the scripts loop: {order:?}"
        );
        let log = tg.log();
        assert_eq!(
            log.matches("spinning /spin/").count(),
            n,
            "each script ran once"
        );
    })
    .await;
}
