//! The pipeline's chunk and after-exchange hooks through a real Envoy 1.40, the response in
//! FULL_DUPLEX_STREAMED. No built-in policy type uses these hooks yet, so this test runs
//! tollgate's ext_proc server in-process with a test policy type registered
//! (`tollgate::policies::register`): a chunk step that rewrites an event, holds back a
//! tail of an event, and ends the stream with a final event; and an after-exchange hook
//! that reports how each exchange ended.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use support::{within, Envoy, EnvoyOptions, HttpClient, Mode, RouteSpec, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::pipeline::{
    AfterFuture, Answer, Chunk, ChunkAction, ChunkSpec, ExchangeEnd, Hook, Hooks, Outcome, Policy,
};
use tollgate::policies::{BuildContext, SpecError};
use tollgate::server::{NoMatch, Processor, Shared};
use tollgate::vars::Exchange;

const LIMIT: Duration = Duration::from_secs(60);
/// Bytes of each event held back until the next one comes.
const TAIL: usize = 4;

type Report = (String, ExchangeEnd);

/// Where the after-exchange hooks report: (x-test-id, how it ended).
fn static_tx() -> &'static OnceLock<mpsc::UnboundedSender<Report>> {
    static TX: OnceLock<mpsc::UnboundedSender<Report>> = OnceLock::new();
    &TX
}

/// Only the test that watches the reports sets the channel up.
fn report(r: Report) {
    if let Some(tx) = static_tx().get() {
        let _ = tx.send(r);
    }
}

#[derive(Debug)]
struct Hooked;

fn build(_ctx: &BuildContext, _spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    Ok(Arc::new(Hooked))
}

impl Policy for Hooked {
    fn type_name(&self) -> &'static str {
        "TestHooks"
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            response_chunks: Some(ChunkSpec::events(TAIL)),
            after_exchange: true,
            ..Hooks::default()
        }
    }

    /// `x-answer: yes` is answered at once, in place of the upstream.
    fn request_headers<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        if ex.request.headers.get("x-answer") == Some("yes") {
            return Hook::Ready(Outcome::Respond(Box::new(Answer::new(
                200,
                "test.Answered",
                vec![],
                "text/plain".into(),
                b"answered".to_vec(),
            ))));
        }
        Hook::CONTINUE
    }

    /// Rewrites event 1, ends the stream after the event `x-end-at` names, and otherwise
    /// holds back the last bytes of what passed until the next chunk.
    fn response_chunk(&self, ex: &mut Exchange, chunk: &mut Chunk) -> ChunkAction {
        let text = String::from_utf8_lossy(&chunk.data).replace("{\"i\":1}", "{\"i\":\"one\"}");
        if let Some(at) = ex.request.headers.get("x-end-at") {
            let event = format!("data: {{\"i\":{at}}}\n\n");
            if let Some(i) = text.find(&event) {
                chunk.data = format!("{}data: [ended]\n\n", &text[..i + event.len()]).into_bytes();
                return ChunkAction::End;
            }
        }
        chunk.data = text.into_bytes();
        ChunkAction::Hold(TAIL)
    }

    fn after_exchange(&self, ex: &Exchange, end: ExchangeEnd) -> Option<AfterFuture> {
        let id = ex.request.headers.get("x-test-id").unwrap_or("").to_owned();
        Some(Box::pin(async move {
            // Off the stream's path: a store write would go here.
            tokio::task::yield_now().await;
            report((id, end));
        }))
    }
}

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: hooked}
spec: {type: TestHooks}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: hooks}
spec:
  default: true
  request: [{policy: hooked}]
  response: [{policy: hooked}]
"#;

/// tollgate's ext_proc server in this process: its address.
async fn serve(dir: &std::path::Path) -> std::net::SocketAddr {
    tollgate::policies::register("TestHooks", build);
    std::fs::write(dir.join("flows.yaml"), CONFIG).unwrap();
    let cm = ConfigManager::load(ConfigSource::Dir(dir.to_path_buf())).unwrap();
    let shared = Shared::new(cm, NoMatch::Continue);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Processor::new(shared).into_service(4 * 1024 * 1024);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// Starts a stream through Envoy, reads until the first body bytes arrive, then goes away.
async fn abort_mid_stream(envoy: std::net::SocketAddr, path: &str, id: &str) {
    let mut s = tokio::net::TcpStream::connect(envoy).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: e2e\r\nx-test-id: {id}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended before its first event");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
}

/// An ext_proc stream that breaks the protocol (request headers twice), straight to the
/// server: it ends with an error status.
async fn protocol_violation(grpc: std::net::SocketAddr, id: &str) {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        external_processor_client::ExternalProcessorClient, processing_request::Request,
        HttpHeaders, ProcessingRequest,
    };
    let h = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    };
    let headers = ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![h(":method", "GET"), h(":path", "/x"), h("x-test-id", id)],
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut client = ExternalProcessorClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let sent = futures_util::stream::iter(vec![headers.clone(), headers]);
    let mut rx = client.process(sent).await.unwrap().into_inner();
    assert!(
        rx.message().await.unwrap().is_some(),
        "the first is answered"
    );
    assert!(
        rx.message().await.is_err(),
        "the second ends the stream with an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_and_after_exchange_hooks_through_envoy() {
    within(LIMIT, async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(reports_init(tx));
        let tmp = tempfile::tempdir().unwrap();
        let grpc = serve(tmp.path()).await;
        let upstream = Upstream::start();
        // `/sse`: the response in FULL_DUPLEX_STREAMED (see `EnvoyOptions::default`).
        let envoy = Envoy::start(tmp.path(), &EnvoyOptions::default(), grpc, upstream.addr).await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{}", envoy.listen, p);

        // Rewritten and held back, every byte still delivered, in order.
        let s = client
            .stream(
                "GET",
                &url("/sse?n=3&delay_ms=150"),
                &[("x-test-id", "complete")],
                "",
            )
            .await;
        assert_eq!(s.status, 200);
        let body = String::from_utf8(s.body()).unwrap();
        assert_eq!(
            body,
            "data: {\"i\":0}\n\ndata: {\"i\":\"one\"}\n\ndata: {\"i\":2}\n\ndata: [DONE]\n\n"
        );
        // The first event's last bytes waited for the next event.
        let first = &s.chunks[0].data;
        assert_eq!(
            &first[..],
            &b"data: {\"i\":0}\n\n"[..15 - TAIL],
            "{first:?}"
        );

        // Ended by the step with its own final event: nothing after it reaches the client.
        let s = client
            .stream(
                "GET",
                &url("/sse?n=5&delay_ms=150"),
                &[("x-test-id", "ended"), ("x-end-at", "2")],
                "",
            )
            .await;
        assert_eq!(s.status, 200);
        assert_eq!(
            String::from_utf8(s.body()).unwrap(),
            "data: {\"i\":0}\n\ndata: {\"i\":\"one\"}\n\ndata: {\"i\":2}\n\ndata: [ended]\n\n"
        );

        // Answered by the step in place of the upstream.
        let r = client
            .get(
                &url("/echo"),
                &[("x-test-id", "answered"), ("x-answer", "yes")],
            )
            .await;
        assert_eq!((r.status, r.text().as_str()), (200, "answered"));
        assert!(upstream.seen_with_prefix("/echo").is_empty());

        // The client goes away mid-stream.
        abort_mid_stream(envoy.listen, "/sse?n=100&delay_ms=100", "aborted").await;

        // A stream that ends with an error.
        protocol_violation(grpc, "failed").await;

        // One report per exchange; a last exchange proves no late duplicate is pending
        // behind the others.
        let mut seen: BTreeMap<String, Vec<ExchangeEnd>> = BTreeMap::new();
        // (Exchanges without an id are the other test's, run in parallel.)
        while seen.len() < 5 {
            let (id, end) = rx.recv().await.unwrap();
            if !id.is_empty() {
                seen.entry(id).or_default().push(end);
            }
        }
        let r = client.get(&url("/echo"), &[("x-test-id", "last")]).await;
        assert_eq!(r.status, 200);
        loop {
            let (id, end) = rx.recv().await.unwrap();
            let done = id == "last";
            if !id.is_empty() {
                seen.entry(id).or_default().push(end);
            }
            if done {
                break;
            }
        }
        use ExchangeEnd::*;
        let expected: BTreeMap<String, Vec<ExchangeEnd>> = [
            ("complete", Completed),
            ("ended", Completed),
            ("answered", Answered),
            ("aborted", Aborted),
            ("failed", Failed),
            ("last", Completed),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), vec![v]))
        .collect();
        assert_eq!(seen, expected);
    })
    .await;
}

fn reports_init(tx: mpsc::UnboundedSender<Report>) -> bool {
    static_tx().set(tx).is_ok()
}

/// The same chunk step with the response body STREAMED (not full duplex): each chunk is
/// answered with its rewritten bytes, the held tail follows with the next chunk, and after
/// the step ended the stream the upstream's further chunks are emptied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_hooks_in_streamed_mode() {
    within(LIMIT, async {
        let tmp = tempfile::tempdir().unwrap();
        let grpc = serve(tmp.path()).await;
        let upstream = Upstream::start();
        let streamed = Mode {
            response_body_mode: Some("STREAMED"),
            ..Mode::headers_only()
        };
        let opts = EnvoyOptions {
            routes: vec![RouteSpec::new("/").timeout("0s").mode(streamed)],
            ..EnvoyOptions::default()
        };
        let envoy = Envoy::start(tmp.path(), &opts, grpc, upstream.addr).await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{}", envoy.listen, p);

        let s = client
            .stream("GET", &url("/sse?n=3&delay_ms=150"), &[], "")
            .await;
        assert_eq!(s.status, 200);
        assert_eq!(
            String::from_utf8(s.body()).unwrap(),
            "data: {\"i\":0}\n\ndata: {\"i\":\"one\"}\n\ndata: {\"i\":2}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(&s.chunks[0].data[..], &b"data: {\"i\":0}\n\n"[..15 - TAIL]);

        let s = client
            .stream(
                "GET",
                &url("/sse?n=5&delay_ms=150"),
                &[("x-end-at", "2")],
                "",
            )
            .await;
        assert_eq!(
            String::from_utf8(s.body()).unwrap(),
            "data: {\"i\":0}\n\ndata: {\"i\":\"one\"}\n\ndata: {\"i\":2}\n\ndata: [ended]\n\n"
        );
        // A JSON body (not events) passes through the same step whole.
        let r = client.get(&url("/echo"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], "/echo");
    })
    .await;
}
