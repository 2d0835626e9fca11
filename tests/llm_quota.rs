//! The "no overshoot" proof for LlmTokenQuota's reserve-then-reconcile counters, with the
//! real binary: 200 concurrent streaming chat exchanges, driven message by message over the
//! ext_proc protocol as Envoy sends them, against a 5,000-token quota — in memory (one
//! process) and on one real `redis-server` shared by two processes (synchronous mode: the
//! counter mode's bound is 0). While every admitted exchange is still open, the tokens
//! reserved (`tollgate_llm_reserved_tokens_outstanding`, summed over the processes) never
//! exceed the limit, and the quota is full (the next estimate would not fit). Then the
//! exchanges end every way an exchange can — completed streams, client aborts mid-stream,
//! upstream errors — plus bad input (a non-JSON body, absurd numbers): the outstanding
//! reservations read from `/metrics` return to zero and the released capacity admits again.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient, processing_response::Response,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use tokio::sync::{mpsc, Barrier};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

mod support;

use support::redis::RedisServer;
use support::{ext_proc, free_port, Proc};

const LIMIT: u64 = 5_000;
/// Each request's estimate before the LLM tracker counts its prompt: `max_tokens` (or the
/// default output estimate when the request is not read as an LLM request). With the
/// tracker, the counted prompt tokens add to it: the assertions hold either way.
const OUTPUT: u64 = 100;
const CLIENTS: usize = 200;

fn config(dir: &Path) {
    std::fs::write(
        dir.join("llm.yaml"),
        format!(
            r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: tokens}}
spec:
  type: LlmTokenQuota
  allow: {LIMIT}
  interval: 1
  timeUnit: hour
  quotaType: flexi
  identifier: "{{request.header.x-user}}"
  defaultOutputTokens: {OUTPUT}
  failOpen: false
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: chat}}
spec:
  match: {{pathPrefixes: [/v1]}}
  request:
  - policy: tokens
"#
        ),
    )
    .unwrap();
}

struct Tollgate {
    _proc: Proc,
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
        while support::http_blocking(admin, "GET", "/readyz", None, None).0 != 200 {
            assert!(!proc.exited(), "tollgate exited at start");
            assert!(Instant::now() < deadline, "tollgate was not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client = ext_proc::connect(format!("127.0.0.1:{grpc}")).await;
        Self {
            _proc: proc,
            admin,
            client,
        }
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, text) = support::http_blocking(self.admin, "GET", "/metrics", None, None);
        support::metric(&text, series).unwrap_or(0.0)
    }
}

fn outstanding(ts: &[&Tollgate]) -> (f64, f64) {
    ts.iter().fold((0.0, 0.0), |(n, t), g| {
        (
            n + g.metric("tollgate_llm_reservations_outstanding"),
            t + g.metric("tollgate_llm_reserved_tokens_outstanding"),
        )
    })
}

/// One ext_proc stream, driven like Envoy drives it.
struct Conv {
    tx: Option<mpsc::Sender<ProcessingRequest>>,
    rx: Streaming<ProcessingResponse>,
}

impl Conv {
    async fn open(client: &ExternalProcessorClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(8);
        let rx = client
            .clone()
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx: Some(tx), rx }
    }

    async fn ask(&mut self, m: ProcessingRequest) -> ProcessingResponse {
        self.tx.as_ref().unwrap().send(m).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("tollgate answers within 10 s")
            .expect("no stream error")
            .expect("an answer")
    }

    /// Sends a message that gets no answer it needs to wait for.
    async fn send(&mut self, m: ProcessingRequest) {
        self.tx.as_ref().unwrap().send(m).await.unwrap();
    }
}

fn immediate_status(r: &ProcessingResponse) -> Option<u32> {
    match &r.response {
        Some(Response::ImmediateResponse(i)) => {
            let code = i.status.as_ref().map_or(0, |s| s.code as u32);
            if code != 429 {
                eprintln!("answer {code}: {}", String::from_utf8_lossy(&i.body));
            }
            Some(code)
        }
        _ => None,
    }
}

/// Request headers and body of a streaming chat request: BUFFERED request body (as the
/// deploy/ Envoy configuration sends it for LLM flows), response STREAMED.
async fn request(conv: &mut Conv, user: &str, body: &[u8]) -> Result<(), u32> {
    let mut h = ext_proc::request_headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "llm.test"),
            (":scheme", "http"),
            ("content-type", "application/json"),
            ("x-user", user),
        ],
        false,
    );
    h.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: BodySendMode::Buffered as i32,
        response_body_mode: BodySendMode::Streamed as i32,
        ..Default::default()
    });
    let r = conv.ask(h).await;
    if let Some(s) = immediate_status(&r) {
        return Err(s);
    }
    let r = conv.ask(ext_proc::body(false, body, true)).await;
    match immediate_status(&r) {
        Some(s) => Err(s),
        None => Ok(()),
    }
}

fn chat(max_tokens: u64) -> Vec<u8> {
    format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"stream_options":{{"include_usage":true}},"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Say hello."}}]}}"#
    )
    .into_bytes()
}

const SSE: &[&[u8]] = &[
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo.\"},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
    b"data: [DONE]\n\n",
];

/// How an admitted exchange ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Completed,
    ClientAbort,
    UpstreamError,
}

async fn finish(mut conv: Conv, how: Ending) {
    match how {
        Ending::Completed => {
            conv.ask(ext_proc::response_headers(
                &[(":status", "200"), ("content-type", "text/event-stream")],
                false,
            ))
            .await;
            for (i, chunk) in SSE.iter().enumerate() {
                conv.ask(ext_proc::body(true, chunk, i + 1 == SSE.len()))
                    .await;
            }
            conv.tx = None;
            let _ = tokio::time::timeout(Duration::from_secs(5), conv.rx.message()).await;
        }
        Ending::ClientAbort => {
            conv.ask(ext_proc::response_headers(
                &[(":status", "200"), ("content-type", "text/event-stream")],
                false,
            ))
            .await;
            conv.ask(ext_proc::body(true, SSE[0], false)).await;
            // The client goes away mid-stream: Envoy resets the ext_proc stream.
            drop(conv);
        }
        Ending::UpstreamError => {
            conv.send(ext_proc::response_headers(&[(":status", "503")], true))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), conv.rx.message()).await;
            conv.tx = None;
            let _ = tokio::time::timeout(Duration::from_secs(5), conv.rx.message()).await;
        }
    }
}

/// 200 concurrent exchanges spread over `ts`; every admitted one stays open until all have
/// been decided; then the reserved tokens are checked and the exchanges end.
async fn no_overshoot(ts: &[&Tollgate], user: &str) {
    // One exchange per process first: connections made, the counter script loaded.
    for t in ts {
        let mut conv = Conv::open(&t.client).await;
        assert_eq!(request(&mut conv, "warm-up", &chat(OUTPUT)).await, Ok(()));
        finish(conv, Ending::Completed).await;
    }
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let release = Arc::new(Barrier::new(CLIENTS + 1));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let client = ts[i % ts.len()].client.clone();
        let (barrier, release, user) = (barrier.clone(), release.clone(), user.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conv = Conv::open(&client).await;
            let decided = request(&mut conv, &user, &chat(OUTPUT)).await;
            barrier.wait().await;
            release.wait().await;
            match decided {
                Ok(()) => {
                    let how = [
                        Ending::Completed,
                        Ending::ClientAbort,
                        Ending::UpstreamError,
                    ][i % 3];
                    finish(conv, how).await;
                    Ok(())
                }
                Err(status) => {
                    drop(conv);
                    Err(status)
                }
            }
        }));
    }
    barrier.wait().await;
    // Everything decided, every admitted exchange still open.
    let (count, tokens) = outstanding(ts);
    release.wait().await;
    let (mut admitted, mut unavailable) = (0u64, 0u64);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => admitted += 1,
            // failOpen: false — a decision Redis did not answer within its bound (a loaded
            // machine) is refused 503: never an overshoot, but the quota may then not fill.
            Err(503) => unavailable += 1,
            Err(status) => assert_eq!(status, 429, "refusals are 429"),
        }
    }
    assert_eq!(
        count, admitted as f64,
        "one reservation per admitted exchange"
    );
    assert!(
        tokens <= LIMIT as f64,
        "reserved {tokens} tokens for a {LIMIT}-token quota"
    );
    let per = tokens / admitted as f64;
    eprintln!("admitted {admitted}, reserved {tokens} tokens ({per} each)");
    assert!(
        per >= OUTPUT as f64,
        "each reserved at least its output limit"
    );
    if unavailable == 0 {
        assert!(
            tokens + per > LIMIT as f64,
            "the quota was full: {tokens} reserved by {admitted}"
        );
    } else {
        eprintln!("{unavailable} decisions refused 503 (counter store slow): fullness not checked");
    }
    assert!((1..=LIMIT / OUTPUT).contains(&admitted));
    // Every way of ending settles: nothing stays outstanding.
    support::eventually(Duration::from_secs(10), "reservations settled", || async {
        (outstanding(ts) == (0.0, 0.0)).then_some(())
    })
    .await;
    // The released capacity admits again (a new exchange of the same size).
    let mut conv = Conv::open(&ts[0].client).await;
    assert_eq!(request(&mut conv, user, &chat(OUTPUT)).await, Ok(()));
    finish(conv, Ending::UpstreamError).await;
}

/// Bad input never leaves a reservation behind: a non-JSON body, absurd limits, a request
/// that ends before its body.
async fn bad_input(t: &Tollgate) {
    // Admitted or answered (a 400 once the body is read as an LLM request), it settles.
    let mut conv = Conv::open(&t.client).await;
    if request(&mut conv, "bad", b"{not json").await.is_ok() {
        finish(conv, Ending::Completed).await;
    }
    let mut conv = Conv::open(&t.client).await;
    let huge = br#"{"model":"m","max_tokens":18446744073709551615,"n":99999,"messages":[]}"#;
    if let Err(s) = request(&mut conv, "bad", huge).await {
        assert_ne!(s, 500, "absurd numbers get a clear answer");
    }
    drop(conv);
    let mut conv = Conv::open(&t.client).await;
    let r = conv
        .ask({
            let mut h = ext_proc::request_headers(
                &[(":method", "POST"), (":path", "/v1/x"), ("x-user", "bad")],
                false,
            );
            h.protocol_config = Some(ProtocolConfiguration {
                request_body_mode: BodySendMode::Buffered as i32,
                ..Default::default()
            });
            h
        })
        .await;
    assert!(immediate_status(&r).is_none());
    drop(conv);
    support::eventually(Duration::from_secs(10), "bad input settled", || async {
        (outstanding(&[t]) == (0.0, 0.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_counters_never_overshoot_and_settle_every_ending() {
    let cfg = tempfile::tempdir().unwrap();
    config(cfg.path());
    let logs = tempfile::tempdir().unwrap();
    let t = Tollgate::start(cfg.path(), logs.path(), "mem", &["--store", "memory"]).await;
    no_overshoot(&[&t], "alice").await;
    bad_input(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_redis_two_processes_never_overshoot_and_settle_every_ending() {
    let redis = RedisServer::start();
    let cfg = tempfile::tempdir().unwrap();
    config(cfg.path());
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
    no_overshoot(&[&a, &b], "bob").await;
    bad_input(&b).await;
}
