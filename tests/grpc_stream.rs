//! Integration tests that drive the ext_proc gRPC stream directly, message by message, the
//! way Envoy 1.40 does, against a tollgate server running in this process.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, external_processor_client::ExternalProcessorClient,
    processing_request::Request, processing_response::Response, CommonResponse, HttpTrailers,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::server::{ModeOverride, NoMatch, Processor, Shared, StreamOptions};
use tonic::{Code, Streaming};

mod support;

use support::ext_proc::{self, hv};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set: {headers: {x-flow: "{flow.name}", x-path: "{request.path}"}}
  remove: {headers: [x-secret]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag-response}
spec:
  type: AssignMessage
  set: {headers: {x-status: "{response.status}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: deny}
spec: {type: RaiseFault, status: 403, errorCode: test.Denied, message: "denied {request.path}", headers: {x-why: test}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: wrap-body}
spec:
  type: AssignMessage
  set:
    headers: {x-wrapped: "yes"}
    body: '{"wrapped":{request.content}}'
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: wrap-response}
spec:
  type: AssignMessage
  set: {body: '[{response.content}]'}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  match: {pathPrefixes: [/api]}
  request:
  - {policy: deny, condition: "request.headers['x-deny'] == 'yes'"}
  - {policy: tag}
  response: [{policy: tag-response}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: oai}
spec:
  match: {pathPrefixes: [/v1/chat]}
  errorFormat: openai
  request: [{policy: deny}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: problem}
spec:
  match: {pathPrefixes: [/problem]}
  errorFormat: problem
  request: [{policy: deny}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: body}
spec:
  match: {pathPrefixes: [/body]}
  maxBodyBytes: 64
  request: [{policy: tag}, {policy: wrap-body}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: response-body}
spec:
  match: {pathPrefixes: [/rbody]}
  response: [{policy: wrap-response}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: by-metadata}
spec:
  request: [{policy: tag}]
"#;

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

async fn start(config: &str, on_no_match: NoMatch) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    start_in(dir, on_no_match).await
}

async fn start_in(dir: tempfile::TempDir, on_no_match: NoMatch) -> Server {
    let opts = StreamOptions {
        on_no_match,
        ..StreamOptions::default()
    };
    start_with(dir, opts, 4 * 1024 * 1024).await
}

async fn start_with(dir: tempfile::TempDir, opts: StreamOptions, max_message: usize) -> Server {
    let cm = ConfigManager::load(ConfigSource::Dir(dir.path().to_path_buf())).unwrap();
    let shared = Shared::with_options(cm, opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Processor::new(shared).into_service(max_message);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Server {
        addr,
        _dir: dir,
        _task: task,
    }
}

/// One ext_proc stream, driven like Envoy drives it.
struct Conv {
    tx: Option<mpsc::Sender<ProcessingRequest>>,
    rx: Streaming<ProcessingResponse>,
}

impl Conv {
    async fn open(s: &Server) -> Self {
        let mut client = ExternalProcessorClient::connect(format!("http://{}", s.addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx: Some(tx), rx }
    }

    async fn send(&mut self, m: ProcessingRequest) {
        self.tx.as_ref().unwrap().send(m).await.unwrap();
    }

    async fn next(&mut self) -> Result<Option<ProcessingResponse>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("tollgate did not answer within 5 s")
    }

    /// Sends `m` and returns the one answer.
    async fn ask(&mut self, m: ProcessingRequest) -> ProcessingResponse {
        self.send(m).await;
        self.next().await.unwrap().expect("an answer")
    }

    /// Sends `m` and checks that no answer comes.
    async fn tell(&mut self, m: ProcessingRequest) {
        self.send(m).await;
        let r = tokio::time::timeout(Duration::from_millis(200), self.rx.message()).await;
        assert!(r.is_err(), "unexpected answer: {r:?}");
    }

    /// Half-closes and checks the server ends the stream cleanly without more answers.
    async fn finish(mut self) {
        self.tx = None;
        let r = self.next().await;
        assert!(matches!(r, Ok(None)), "expected a clean end, got {r:?}");
    }
}

fn req_headers(method: &str, path: &str, extra: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", "api.test"),
        (":scheme", "http"),
    ];
    headers.extend_from_slice(extra);
    ext_proc::request_headers(&headers, eos)
}

fn with_modes(
    mut m: ProcessingRequest,
    req: BodySendMode,
    resp: BodySendMode,
) -> ProcessingRequest {
    m.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: req as i32,
        response_body_mode: resp as i32,
        ..Default::default()
    });
    m
}

fn resp_headers(status: &str, extra: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    let mut headers = vec![(":status", status)];
    headers.extend_from_slice(extra);
    ext_proc::response_headers(&headers, eos)
}

fn req_body(b: &[u8], eos: bool) -> ProcessingRequest {
    ext_proc::body(false, b, eos)
}

fn resp_body(b: &[u8], eos: bool) -> ProcessingRequest {
    ext_proc::body(true, b, eos)
}

fn common(r: &ProcessingResponse) -> Option<&CommonResponse> {
    match r.response.as_ref().expect("a response") {
        Response::RequestHeaders(h) | Response::ResponseHeaders(h) => h.response.as_ref(),
        Response::RequestBody(b) | Response::ResponseBody(b) => b.response.as_ref(),
        other => panic!("not a headers/body response: {other:?}"),
    }
}

/// The headers a response sets, as (name, value) with the value from `raw_value`; checks
/// that `value` is never used.
fn set_headers(r: &ProcessingResponse) -> Vec<(String, String)> {
    common(r)
        .and_then(|c| c.header_mutation.as_ref())
        .map(|m| {
            m.set_headers
                .iter()
                .map(|o| {
                    let h = o.header.as_ref().unwrap();
                    assert!(h.value.is_empty(), "mutation must use raw_value only");
                    (
                        h.key.clone(),
                        String::from_utf8(h.raw_value.clone()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn header(r: &ProcessingResponse, name: &str) -> Option<String> {
    set_headers(r)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

fn immediate(r: &ProcessingResponse) -> &ImmediateResponse {
    match r.response.as_ref() {
        Some(Response::ImmediateResponse(i)) => i,
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

fn immediate_header(i: &ImmediateResponse, name: &str) -> Option<String> {
    i.headers.as_ref().and_then(|m| {
        m.set_headers.iter().find_map(|o| {
            let h = o.header.as_ref()?;
            (h.key == name).then(|| String::from_utf8(h.raw_value.clone()).unwrap())
        })
    })
}

fn streamed(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    match common(r)
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
    {
        Some(Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("expected a streamed body response, got {other:?}"),
    }
}

#[tokio::test]
async fn headers_only_exchange_sets_and_removes_headers() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let r = c
        .ask(req_headers(
            "GET",
            "/api/items?x=1",
            &[("x-secret", "s")],
            true,
        ))
        .await;
    assert!(matches!(r.response, Some(Response::RequestHeaders(_))));
    assert_eq!(header(&r, "x-flow").as_deref(), Some("api"));
    assert_eq!(header(&r, "x-path").as_deref(), Some("/api/items"));
    let cr = common(&r).unwrap();
    assert_eq!(
        cr.header_mutation.as_ref().unwrap().remove_headers,
        ["x-secret"]
    );
    assert!(
        cr.clear_route_cache,
        "request header changes must clear the route cache"
    );
    assert!(r.mode_override.is_none());

    let r = c.ask(resp_headers("201", &[], true)).await;
    assert!(matches!(r.response, Some(Response::ResponseHeaders(_))));
    assert_eq!(header(&r, "x-status").as_deref(), Some("201"));
    c.finish().await;
}

#[tokio::test]
async fn raise_fault_in_each_error_format() {
    let s = start(CONFIG, NoMatch::Continue).await;

    let mut c = Conv::open(&s).await;
    let r = c
        .ask(req_headers("GET", "/api/x", &[("x-deny", "yes")], true))
        .await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 403);
    assert_eq!(
        immediate_header(i, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(immediate_header(i, "x-why").as_deref(), Some("test"));
    let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(v["fault"]["faultstring"], "denied /api/x");
    assert_eq!(v["fault"]["detail"]["errorcode"], "test.Denied");
    // Envoy may still send what it had in flight: it gets no answer.
    c.tell(resp_headers("200", &[], true)).await;
    c.finish().await;

    let mut c = Conv::open(&s).await;
    let r = c
        .ask(req_headers("POST", "/v1/chat/completions", &[], false))
        .await;
    let v: serde_json::Value = serde_json::from_slice(&immediate(&r).body).unwrap();
    assert_eq!(v["error"]["code"], "test.Denied");
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(v["error"]["message"], "denied /v1/chat/completions");

    let mut c = Conv::open(&s).await;
    let r = c.ask(req_headers("GET", "/problem", &[], true)).await;
    let i = immediate(&r);
    assert_eq!(
        immediate_header(i, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(v["status"], 403);
    assert_eq!(v["title"], "Forbidden");
    assert_eq!(v["code"], "test.Denied");
}

#[tokio::test]
async fn no_match_continues_or_rejects() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let r = c.ask(req_headers("GET", "/elsewhere", &[], true)).await;
    assert!(common(&r).is_none(), "untouched: {r:?}");
    let r = c.ask(resp_headers("200", &[], true)).await;
    assert!(common(&r).is_none());
    c.finish().await;

    let s = start(CONFIG, NoMatch::Reject).await;
    let mut c = Conv::open(&s).await;
    let r = c.ask(req_headers("GET", "/elsewhere", &[], true)).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 404);
    let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(v["fault"]["detail"]["errorcode"], "tollgate.NoMatchingFlow");
}

#[tokio::test]
async fn gke_extension_metadata_selects_the_flow() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let mut m = req_headers("GET", "/api/would-match-api", &[], true);
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "tollgate-flow".to_string(),
        PbValue {
            kind: Some(Kind::StringValue("by-metadata".into())),
        },
    );
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "com.google.ext_proc.gateway.chain0.tollgate".into(),
        Struct { fields },
    );
    m.metadata_context = Some(md);
    let r = c.ask(m).await;
    assert_eq!(header(&r, "x-flow").as_deref(), Some("by-metadata"));
}

/// Metadata naming a flow the configuration does not define is a configuration error
/// answered 500 `tollgate.UnknownFlow`, never a fall-through to path matching (which
/// would run some other flow's policies, or none).
#[tokio::test]
async fn unknown_flow_in_metadata_is_500_not_a_fall_through() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let mut m = req_headers("GET", "/api/would-match-api", &[], true);
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "tollgate-flow".to_string(),
        PbValue {
            kind: Some(Kind::StringValue("no-such-flow".into())),
        },
    );
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "com.google.ext_proc.gateway.chain0.tollgate".into(),
        Struct { fields },
    );
    m.metadata_context = Some(md);
    let r = c.ask(m).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 500);
    let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(v["fault"]["detail"]["errorcode"], "tollgate.UnknownFlow");
}

#[tokio::test]
async fn body_flow_asks_for_the_body_with_mode_override() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let m = with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::None,
        BodySendMode::None,
    );
    let r = c.ask(m).await;
    let mode = r
        .mode_override
        .expect("a mode override asking for the body");
    assert_eq!(mode.request_body_mode, BodySendMode::Buffered as i32);
    assert_eq!(mode.response_body_mode, BodySendMode::None as i32);
    // Header-only steps before the body step already ran.
    assert_eq!(header(&r, "x-flow").as_deref(), Some("body"));

    let r = c.ask(req_body(br#"{"a":1}"#, true)).await;
    assert!(matches!(r.response, Some(Response::RequestBody(_))));
    assert_eq!(header(&r, "x-wrapped").as_deref(), Some("yes"));
    // Envoy has not routed yet: request header changes made on the body re-pick the route.
    assert!(common(&r).unwrap().clear_route_cache);
    match common(&r)
        .unwrap()
        .body_mutation
        .as_ref()
        .unwrap()
        .mutation
        .as_ref()
    {
        Some(Mutation::Body(b)) => assert_eq!(b, br#"{"wrapped":{"a":1}}"#),
        other => panic!("expected a replaced body, got {other:?}"),
    }
    let r = c.ask(resp_headers("200", &[], true)).await;
    assert!(matches!(r.response, Some(Response::ResponseHeaders(_))));
    c.finish().await;
}

#[tokio::test]
async fn a_body_the_flow_does_not_need_gets_continue_at_once() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let m = with_modes(
        req_headers("POST", "/api/x", &[], false),
        BodySendMode::Buffered,
        BodySendMode::None,
    );
    let r = c.ask(m).await;
    assert!(r.mode_override.is_none());
    let r = c.ask(req_body(b"hello", true)).await;
    assert!(matches!(r.response, Some(Response::RequestBody(_))));
    assert!(common(&r).is_none(), "CONTINUE without mutation: {r:?}");
}

#[tokio::test]
async fn full_duplex_response_chunks_pass_as_they_come() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let m = with_modes(
        req_headers("GET", "/api/stream", &[], true),
        BodySendMode::None,
        BodySendMode::FullDuplexStreamed,
    );
    c.ask(m).await;
    let r = c
        .ask(resp_headers(
            "200",
            &[("content-type", "text/event-stream")],
            false,
        ))
        .await;
    assert!(r.mode_override.is_none());
    for i in 0..5 {
        let chunk = format!("data: {{\"i\":{i}}}\n\n");
        let r = c.ask(resp_body(chunk.as_bytes(), false)).await;
        assert_eq!(streamed(&r), (chunk.into_bytes(), false));
    }
    let r = c.ask(resp_body(b"", true)).await;
    assert_eq!(streamed(&r), (Vec::new(), true));
    c.finish().await;
}

#[tokio::test]
async fn full_duplex_request_body_is_held_until_whole_then_released() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let m = with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::FullDuplexStreamed,
        BodySendMode::FullDuplexStreamed,
    );
    // The headers answer waits for the body steps (Envoy sends the body without waiting
    // for it), so their header changes go with it.
    c.tell(m).await;
    c.tell(req_body(b"[1,", false)).await;
    c.tell(req_body(b"2", false)).await;
    let r = c.ask(req_body(b"]", true)).await;
    assert!(
        matches!(r.response, Some(Response::RequestHeaders(_))),
        "{r:?}"
    );
    assert!(r.mode_override.is_none(), "no override in full duplex");
    let r = c.next().await.unwrap().unwrap();
    assert_eq!(streamed(&r), (br#"{"wrapped":[1,2]}"#.to_vec(), true));
}

#[tokio::test]
async fn full_duplex_body_ended_by_trailers() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = open_duplex_body(&s).await;
    c.tell(req_body(b"7", false)).await;
    c.send(ProcessingRequest {
        request: Some(Request::RequestTrailers(HttpTrailers::default())),
        ..Default::default()
    })
    .await;
    let r = c.next().await.unwrap().unwrap();
    assert!(
        matches!(r.response, Some(Response::RequestHeaders(_))),
        "the held headers answer first: {r:?}"
    );
    let r = c.next().await.unwrap().unwrap();
    assert_eq!(streamed(&r), (br#"{"wrapped":7}"#.to_vec(), false));
    let r = c.next().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::RequestTrailers(_))));
}

fn body_mutation(r: &ProcessingResponse) -> Option<&Mutation> {
    common(r)
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
}

#[tokio::test]
async fn streamed_mode_answers_every_chunk_but_holds_the_bytes() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let r = c
        .ask(with_modes(
            req_headers("POST", "/body", &[("content-length", "4")], false),
            BodySendMode::Streamed,
            BodySendMode::None,
        ))
        .await;
    // The headers leave now, before the body is decided: its length cannot stay.
    let removed = &common(&r)
        .unwrap()
        .header_mutation
        .as_ref()
        .unwrap()
        .remove_headers;
    assert!(removed.iter().any(|h| h == "content-length"), "{r:?}");
    // Every chunk is answered at once (no message timeout), emptied: nothing passes yet.
    for chunk in [&b"[1,"[..], b"2"] {
        let r = c.ask(req_body(chunk, false)).await;
        assert!(matches!(r.response, Some(Response::RequestBody(_))));
        assert_eq!(body_mutation(&r), Some(&Mutation::ClearBody(true)));
    }
    // The last chunk carries the whole decided body.
    let r = c.ask(req_body(b"]", true)).await;
    assert_eq!(
        body_mutation(&r),
        Some(&Mutation::Body(br#"{"wrapped":[1,2]}"#.to_vec()))
    );
    let r = c.ask(resp_headers("200", &[], true)).await;
    assert!(matches!(r.response, Some(Response::ResponseHeaders(_))));
}

#[tokio::test]
async fn streamed_request_refused_by_a_body_step_released_nothing() {
    let config = format!(
        "{CONFIG}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: gate}}\nspec:\n  match: {{pathPrefixes: [/gate]}}\n  request: [{{policy: tag}}, {{policy: wrap-body}}, {{policy: deny}}]\n"
    );
    let s = start(&config, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("POST", "/gate", &[], false),
        BodySendMode::Streamed,
        BodySendMode::None,
    ))
    .await;
    let r = c.ask(req_body(b"secret", false)).await;
    assert_eq!(body_mutation(&r), Some(&Mutation::ClearBody(true)));
    let r = c.ask(req_body(b"", true)).await;
    assert_eq!(immediate(&r).status.as_ref().unwrap().code, 403);
}

#[tokio::test]
async fn buffered_partial_cut_body_is_refused_whole_body_processed() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::BufferedPartial,
        BodySendMode::None,
    ))
    .await;
    // Cut at Envoy's buffer limit (end_of_stream false): the rest would pass undecided.
    let r = c.ask(req_body(b"1", false)).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 413);
    assert!(String::from_utf8_lossy(&i.body).contains("BUFFERED_PARTIAL"));

    // A body that fit whole is processed once, with its new length.
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("POST", "/body", &[("content-length", "1")], false),
        BodySendMode::BufferedPartial,
        BodySendMode::None,
    ))
    .await;
    let r = c.ask(req_body(b"1", true)).await;
    assert_eq!(header(&r, "content-length").as_deref(), Some("13"));
    match common(&r)
        .unwrap()
        .body_mutation
        .as_ref()
        .unwrap()
        .mutation
        .as_ref()
    {
        Some(Mutation::Body(b)) => assert_eq!(b, br#"{"wrapped":1}"#),
        other => panic!("expected a replaced body, got {other:?}"),
    }
}

#[tokio::test]
async fn response_body_step_gets_the_body_by_override() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let r = c
        .ask(with_modes(
            req_headers("GET", "/rbody", &[], true),
            BodySendMode::None,
            BodySendMode::None,
        ))
        .await;
    assert!(r.mode_override.is_none(), "the request body is not needed");
    let r = c
        .ask(resp_headers(
            "200",
            &[("content-type", "application/json")],
            false,
        ))
        .await;
    let mode = r.mode_override.expect("asks for the response body");
    assert_eq!(mode.response_body_mode, BodySendMode::Buffered as i32);
    let r = c.ask(resp_body(b"1", true)).await;
    match common(&r)
        .unwrap()
        .body_mutation
        .as_ref()
        .unwrap()
        .mutation
        .as_ref()
    {
        Some(Mutation::Body(b)) => assert_eq!(b, b"[1]"),
        other => panic!("expected a replaced body, got {other:?}"),
    }
    c.finish().await;

    // Server-sent events keep flowing: STREAMED, every chunk answered at once.
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("GET", "/rbody", &[], true),
        BodySendMode::None,
        BodySendMode::None,
    ))
    .await;
    let r = c
        .ask(resp_headers(
            "200",
            &[("content-type", "text/event-stream")],
            false,
        ))
        .await;
    assert_eq!(
        r.mode_override.unwrap().response_body_mode,
        BodySendMode::Streamed as i32
    );
    // The step replaces the body: chunks are held (emptied) and the whole new body goes
    // with the last one.
    let r = c.ask(resp_body(b"data: 1\n\n", false)).await;
    assert_eq!(body_mutation(&r), Some(&Mutation::ClearBody(true)));
    let r = c.ask(resp_body(b"", true)).await;
    assert_eq!(
        body_mutation(&r),
        Some(&Mutation::Body(b"[data: 1\n\n]".to_vec()))
    );
    c.finish().await;
}

#[tokio::test]
async fn body_over_the_flow_limit_is_413() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::Buffered,
        BodySendMode::None,
    ))
    .await;
    let r = c.ask(req_body(&[b'x'; 65], true)).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 413);
    let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
    assert_eq!(
        v["fault"]["detail"]["errorcode"],
        "protocol.http.TooBigBody"
    );
}

fn assert_body_not_sent(r: &ProcessingResponse) {
    let i = immediate(r);
    assert_eq!(i.status.as_ref().unwrap().code, 500);
    let body = String::from_utf8_lossy(&i.body);
    assert!(body.contains("tollgate.RequestBodyNotReceived"), "{body}");
    assert!(body.contains("request_body_mode BUFFERED"), "{body}");
}

#[tokio::test]
async fn a_body_envoy_will_not_send_is_refused_before_forwarding() {
    let s = start(CONFIG, NoMatch::Continue).await;
    // No protocol_config: tollgate cannot override, Envoy will not send the body.
    let mut c = Conv::open(&s).await;
    assert_body_not_sent(&c.ask(req_headers("POST", "/body", &[], false)).await);
    // FULL_DUPLEX_STREAMED on a side: Envoy ignores overrides.
    let mut c = Conv::open(&s).await;
    let r = c
        .ask(with_modes(
            req_headers("POST", "/body", &[], false),
            BodySendMode::None,
            BodySendMode::FullDuplexStreamed,
        ))
        .await;
    assert_body_not_sent(&r);
    // Bodies sent without waiting for the headers answer: overrides ignored too.
    let mut c = Conv::open(&s).await;
    let mut m = with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::None,
        BodySendMode::None,
    );
    m.protocol_config
        .as_mut()
        .unwrap()
        .send_body_without_waiting_for_header_response = true;
    assert_body_not_sent(&c.ask(m).await);
    // A request without a body needs no override.
    let mut c = Conv::open(&s).await;
    let r = c
        .ask(with_modes(
            req_headers("GET", "/body", &[], true),
            BodySendMode::None,
            BodySendMode::None,
        ))
        .await;
    assert!(matches!(r.response, Some(Response::RequestHeaders(_))));
}

#[tokio::test]
async fn an_ignored_override_is_learned_and_later_requests_are_refused_at_once() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let none = || {
        with_modes(
            req_headers("POST", "/body", &[], false),
            BodySendMode::None,
            BodySendMode::None,
        )
    };
    // An error Envoy may make itself (413 past its buffer) proves nothing.
    let mut c = Conv::open(&s).await;
    assert!(c.ask(none()).await.mode_override.is_some());
    assert_body_not_sent(&c.ask(resp_headers("413", &[], true)).await);
    // An upstream answer without the body: the override was ignored.
    let mut c = Conv::open(&s).await;
    assert!(c.ask(none()).await.mode_override.is_some());
    assert_body_not_sent(&c.ask(resp_headers("200", &[], true)).await);
    // From now on refused before forwarding.
    let mut c = Conv::open(&s).await;
    assert_body_not_sent(&c.ask(none()).await);
}

#[tokio::test]
async fn mode_override_denied_refuses_at_request_headers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), CONFIG).unwrap();
    let opts = StreamOptions {
        mode_override: ModeOverride::Denied,
        ..StreamOptions::default()
    };
    let s = start_with(dir, opts, 4 * 1024 * 1024).await;
    let mut c = Conv::open(&s).await;
    let r = c
        .ask(with_modes(
            req_headers("POST", "/body", &[], false),
            BodySendMode::None,
            BodySendMode::None,
        ))
        .await;
    assert_body_not_sent(&r);
    // A route that sends the body still works.
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::Buffered,
        BodySendMode::None,
    ))
    .await;
    let r = c.ask(req_body(b"1", true)).await;
    assert!(matches!(body_mutation(&r), Some(Mutation::Body(_))));
}

#[tokio::test]
async fn a_message_past_max_message_bytes_ends_the_stream_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), CONFIG).unwrap();
    let s = start_with(dir, StreamOptions::default(), 4096).await;
    let before = metric_value("tollgate_protocol_errors_total{kind=\"message_too_large\"}");
    let mut c = Conv::open(&s).await;
    c.ask(with_modes(
        req_headers("POST", "/api/x", &[], false),
        BodySendMode::Buffered,
        BodySendMode::None,
    ))
    .await;
    // Not an OK end: Envoy would forward the body with no body step run.
    c.send(req_body(&[b'x'; 8192], true)).await;
    let e = c.next().await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-message-bytes"),
        "{}",
        e.message()
    );
    let after = metric_value("tollgate_protocol_errors_total{kind=\"message_too_large\"}");
    assert_eq!(after, before + 1.0);
}

#[tokio::test]
async fn bodies_past_the_global_budget_are_shed_with_503() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), CONFIG).unwrap();
    let opts = StreamOptions {
        max_buffered_bytes: 100,
        ..StreamOptions::default()
    };
    let s = start_with(dir, opts, 4 * 1024 * 1024).await;
    // One stream holds 60 bytes of a body still coming...
    let mut a = open_duplex_body(&s).await;
    a.tell(req_body(&[b'1'; 60], false)).await;
    // ...so another cannot hold 50 more: shed with a defined answer.
    let shed_before = metric_value("tollgate_body_buffer_shed_total");
    let mut b = open_duplex_body(&s).await;
    let r = b.ask(req_body(&[b'2'; 50], false)).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 503);
    assert!(String::from_utf8_lossy(&i.body).contains("tollgate.BodyBufferFull"));
    assert!(metric_value("tollgate_body_buffer_shed_total") >= shed_before + 1.0);
    // When the first stream ends its bytes come back.
    drop(a);
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut c = open_duplex_body(&s).await;
        c.tell(req_body(&[b'3'; 50], false)).await;
        // The held headers answer, then the body's.
        let r = c.ask(req_body(b"", true)).await;
        if matches!(r.response, Some(Response::RequestHeaders(_))) {
            ok = true;
            break;
        }
    }
    assert!(ok, "the budget was not given back");
}

/// A stream for the `/body` flow with a FULL_DUPLEX_STREAMED request body coming (the
/// headers answer is held until the body steps ran).
async fn open_duplex_body(s: &Server) -> Conv {
    let mut c = Conv::open(s).await;
    c.tell(with_modes(
        req_headers("POST", "/body", &[], false),
        BodySendMode::FullDuplexStreamed,
        BodySendMode::None,
    ))
    .await;
    c
}

/// One sample from this process's metrics (0 when absent).
fn metric_value(series: &str) -> f64 {
    let text = tollgate::telemetry::METRICS.render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn observability_mode_sends_nothing_back() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let mut m = req_headers("GET", "/api/x", &[("x-deny", "yes")], true);
    m.observability_mode = true;
    c.tell(m).await;
    let mut m = resp_headers("200", &[], true);
    m.observability_mode = true;
    c.tell(m).await;
    c.finish().await;
}

// ---- bad input ----

#[tokio::test]
async fn body_before_headers_gets_a_safe_answer() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let r = c.ask(req_body(b"x", true)).await;
    assert!(matches!(r.response, Some(Response::RequestBody(_))));
    assert!(common(&r).is_none());
}

#[tokio::test]
async fn two_request_header_messages_end_the_stream_with_an_error() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    c.ask(req_headers("GET", "/api/x", &[], false)).await;
    c.send(req_headers("GET", "/api/x", &[], false)).await;
    let e = c.next().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("twice"), "{}", e.message());
}

#[tokio::test]
async fn an_empty_first_message_is_an_error_a_later_one_is_ignored() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    c.send(ProcessingRequest::default()).await;
    let e = c.next().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut c = Conv::open(&s).await;
    c.ask(req_headers("GET", "/api/x", &[], false)).await;
    c.tell(ProcessingRequest::default()).await;
    let r = c.ask(resp_headers("200", &[], true)).await;
    assert!(matches!(r.response, Some(Response::ResponseHeaders(_))));
}

#[tokio::test]
async fn message_after_the_end_is_an_error() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    c.ask(req_headers("GET", "/api/x", &[], true)).await;
    c.ask(resp_headers("200", &[], true)).await;
    c.send(resp_body(b"late", true)).await;
    let e = c.next().await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn non_utf8_header_bytes_are_tolerated() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let mut c = Conv::open(&s).await;
    let mut m = req_headers("GET", "/api/x", &[], true);
    if let Some(Request::RequestHeaders(h)) = m.request.as_mut() {
        h.headers
            .as_mut()
            .unwrap()
            .headers
            .push(hv("x-deny", [0xff, 0xfe, b'y']));
    }
    let r = c.ask(m).await;
    // Not "yes", so not denied; the flow ran normally.
    assert_eq!(header(&r, "x-flow").as_deref(), Some("api"));
}

mod raw {
    //! A codec that sends arbitrary bytes as gRPC messages, to test malformed input.
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Default)]
    pub struct RawCodec;
    pub struct RawEnc;
    pub struct RawDec;

    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let v = src.chunk().to_vec();
            src.advance(v.len());
            Ok(Some(v))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
}

#[tokio::test]
async fn malformed_protobuf_gets_invalid_argument_not_a_hang() {
    let s = start(CONFIG, NoMatch::Continue).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 2 (request_headers) as a length-delimited value that runs past the end.
    let garbage = vec![0x12, 0x7f, 0x01];
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
    );
    let req = tonic::Request::new(tokio_stream::iter(vec![garbage]));
    let result = tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = grpc.streaming(req, path, raw::RawCodec).await?.into_inner();
        stream.message().await
    })
    .await
    .expect("no hang");
    let e = result.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("malformed"), "{}", e.message());
}

#[tokio::test]
async fn streams_keep_their_snapshot_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    let one = CONFIG.replace("x-flow: \"{flow.name}\"", "x-flow: \"one\"");
    std::fs::write(&file, &one).unwrap();
    let path = dir.path().to_path_buf();
    let cm = ConfigManager::load(ConfigSource::Dir(path.clone())).unwrap();
    let shared = Shared::new(cm.clone(), NoMatch::Continue);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Processor::new(shared).into_service(1 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let s = Server {
        addr,
        _dir: dir,
        _task: tokio::spawn(async {}),
    };
    // A stream opened before the reload...
    // Opening the call runs `process`, which takes the snapshot.
    let mut old = Conv::open(&s).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let two = CONFIG.replace("x-flow: \"{flow.name}\"", "x-flow: \"two\"");
    std::fs::write(&file, two).unwrap();
    assert_eq!(
        cm.reload(false).unwrap(),
        tollgate::config::reload::ReloadOutcome::Reloaded
    );
    assert_eq!(cm.generation(), 2);

    // ...finishes on its old snapshot; a new one sees the new configuration.
    let r = old.ask(req_headers("GET", "/api/x", &[], true)).await;
    assert_eq!(header(&r, "x-flow").as_deref(), Some("one"));
    let mut new = Conv::open(&s).await;
    let r = new.ask(req_headers("GET", "/api/x", &[], true)).await;
    assert_eq!(header(&r, "x-flow").as_deref(), Some("two"));

    // A broken edit is refused and the running configuration stays.
    std::fs::write(&file, "kind: [").unwrap();
    assert!(cm.reload(false).is_err());
    assert_eq!(cm.generation(), 2);
    let mut after = Conv::open(&s).await;
    let r = after.ask(req_headers("GET", "/api/x", &[], true)).await;
    assert_eq!(header(&r, "x-flow").as_deref(), Some("two"));
}
