//! The LLM tracker through a real Envoy 1.40, bodies in FULL_DUPLEX_STREAMED and BUFFERED:
//! a test policy that declares `Hooks { llm: true }` records the LLM slots (before its
//! request hook, and in its after-exchange hook); a response AssignMessage renders `llm.*`
//! variables; `includeUsage` adds `stream_options.include_usage` for the upstream and drops
//! the usage chunk from what the client sees; the gen_ai metrics show on the admin
//! `/metrics`. tollgate's ext_proc server runs in this process (the test policy type is
//! registered with `tollgate::policies::register`); the upstream is a small local server
//! that answers each API from the fixtures in `src/llm/fixtures`, one event per frame.
//! Run with `cargo test --test e2e_llm_track`.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use support::{within, Envoy, EnvoyOptions, HttpClient, Mode, RouteSpec};
use tokio::sync::mpsc;
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::llm::{
    detect, parse_request, Api, FinalUsage, ResponseAccumulator, ResponseFormat, TokenCounter,
    UsageSource,
};
use tollgate::pipeline::{AfterFuture, ExchangeEnd, Hook, Hooks, Policy};
use tollgate::policies::{BuildContext, SpecError};
use tollgate::server::{NoMatch, Processor, Shared};
use tollgate::vars::Exchange;

const LIMIT: Duration = Duration::from_secs(90);

const OPENAI_USAGE: &[u8] = include_bytes!("../src/llm/fixtures/openai_chat_stream_usage.sse");
const OPENAI_NO_USAGE: &[u8] =
    include_bytes!("../src/llm/fixtures/openai_chat_stream_no_usage.sse");
const OPENAI_JSON: &[u8] = include_bytes!("../src/llm/fixtures/openai_chat.json");
const ANTHROPIC: &[u8] = include_bytes!("../src/llm/fixtures/anthropic_stream.sse");
const GEMINI: &[u8] = include_bytes!("../src/llm/fixtures/gemini_stream.sse");

/// A check of what the test policy saw of one exchange.
type Check = Box<dyn Fn(&Seen)>;

/// What the test policy saw of one exchange.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    /// `llm_prompt_tokens` when its request hook ran.
    prompt_at_request: Option<u64>,
    api: Option<Api>,
    model: Option<String>,
    usage: Option<FinalUsage>,
    end: ExchangeEnd,
}

fn reports() -> &'static OnceLock<mpsc::UnboundedSender<Seen>> {
    static TX: OnceLock<mpsc::UnboundedSender<Seen>> = OnceLock::new();
    &TX
}

#[derive(Debug)]
struct Slots;

fn build(_ctx: &BuildContext, _spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    Ok(Arc::new(Slots))
}

impl Policy for Slots {
    fn type_name(&self) -> &'static str {
        "TestLlmSlots"
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: true,
            after_exchange: true,
            ..Hooks::default()
        }
    }

    /// Notes the prompt tokens it sees; `x-reject` is refused here, as a token quota would.
    fn request_headers<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        if let Some(n) = ex.state.llm_prompt_tokens {
            ex.set_var("test.prompt_at_request", n.to_string());
        }
        if ex.request.headers.get("x-reject").is_some() {
            return Hook::Ready(tollgate::pipeline::Outcome::Reject(
                tollgate::fault::Fault::new(429, "test.Refused", "refused"),
            ));
        }
        Hook::CONTINUE
    }

    fn after_exchange(&self, ex: &Exchange, end: ExchangeEnd) -> Option<AfterFuture> {
        let seen = Seen {
            id: ex.request.headers.get("x-test-id").unwrap_or("").to_owned(),
            prompt_at_request: ex
                .vars
                .get("test.prompt_at_request")
                .and_then(|v| v.as_text().parse().ok()),
            api: ex.state.llm.as_ref().map(|r| r.api),
            model: ex.state.llm.as_ref().and_then(|r| r.model.clone()),
            usage: ex.state.llm_usage.clone(),
            end,
        };
        Some(Box::pin(async move {
            if let Some(tx) = reports().get() {
                let _ = tx.send(seen);
            }
        }))
    }
}

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: slots}
spec: {type: TestLlmSlots}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tokens-header}
spec:
  type: AssignMessage
  set:
    headers:
      x-tokens: "{llm.total_tokens}"
      x-prompt: "{llm.prompt_tokens}/{llm.completion_tokens}"
      x-llm: "{llm.api} {llm.model} {llm.stream}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: plain}
spec:
  match: {pathPrefixes: [/duplex/plain, /buffered/plain]}
  request: [{policy: slots}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: inject}
spec:
  match: {pathPrefixes: [/duplex/inject, /buffered/inject]}
  llm: {includeUsage: true}
  request: [{policy: slots}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: header}
spec:
  match: {pathPrefixes: [/buffered/header]}
  response: [{policy: tokens-header}]
"#;

/// tollgate's ext_proc server and admin `/metrics` in this process: their addresses.
async fn serve(dir: &std::path::Path) -> (std::net::SocketAddr, std::net::SocketAddr) {
    tollgate::policies::register("TestLlmSlots", build);
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
    struct Ready;
    impl tollgate::admin::Readiness for Ready {
        fn is_ready(&self) -> bool {
            true
        }
        fn generation(&self) -> u64 {
            1
        }
    }
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _stop_tx;
        tollgate::admin::serve_http(
            admin,
            tollgate::admin::router(Arc::new(Ready)),
            tollgate::admin::HttpLimits::default(),
            stop,
        )
        .await;
    });
    (addr, admin_addr)
}

/// What the upstream received: (path, accept-encoding, body).
type Received = Arc<Mutex<Vec<(String, Option<String>, Vec<u8>)>>>;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Server-sent events one per frame, `gap` apart.
fn sse(body: &'static [u8], gap: Duration) -> Response<Body> {
    let text = std::str::from_utf8(body).unwrap();
    let events: Vec<Bytes> = text
        .split_inclusive("\n\n")
        .map(|e| Bytes::copy_from_slice(e.as_bytes()))
        .collect();
    let stream = futures_util::stream::unfold(events.into_iter(), move |mut it| async move {
        let e = it.next()?;
        tokio::time::sleep(gap).await;
        Some((Ok::<_, Infallible>(Frame::data(e)), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn json(status: u16, body: &[u8]) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)).boxed())
        .unwrap()
}

async fn upstream_handle(
    req: Request<Incoming>,
    got: Received,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let ae = parts
        .headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    got.lock().push((path.clone(), ae, body.clone()));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let gap = Duration::from_millis(if parts.headers.contains_key("x-slow") {
        500
    } else {
        10
    });
    let sse = |b| sse(b, gap);
    if parts.headers.contains_key("x-fail") {
        return Ok(json(
            503,
            br#"{"error":{"message":"overloaded","type":"server_error"}}"#,
        ));
    }
    Ok(if path.ends_with("/chat/completions") {
        if v["stream"] == true {
            if v["stream_options"]["include_usage"] == true {
                sse(OPENAI_USAGE)
            } else {
                sse(OPENAI_NO_USAGE)
            }
        } else {
            json(200, OPENAI_JSON)
        }
    } else if path.ends_with("/v1/messages") {
        sse(ANTHROPIC)
    } else if path.ends_with(":streamGenerateContent") {
        sse(GEMINI)
    } else {
        json(200, br#"{"object":"list","data":[]}"#)
    })
}

fn upstream(got: Received) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let got = got.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| upstream_handle(r, got.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn envoy_options() -> EnvoyOptions {
    let mode = |m: &'static str| Mode::bodies(m);
    EnvoyOptions {
        mode: Mode {
            request_trailer_mode: Some("SEND"),
            response_trailer_mode: Some("SEND"),
            ..Mode::headers_only()
        },
        routes: vec![
            RouteSpec::new("/duplex")
                .timeout("0s")
                .mode(mode("FULL_DUPLEX_STREAMED")),
            RouteSpec::new("/buffered")
                .timeout("0s")
                .mode(mode("BUFFERED")),
            RouteSpec::new("/"),
        ],
        ..EnvoyOptions::default()
    }
}

/// The prompt tokens tollgate counts for `body` sent to `path`.
fn prompt_tokens(path: &str, body: &[u8]) -> u64 {
    let e = detect("POST", path, |_| None).unwrap();
    TokenCounter::default().count_request(&parse_request(&e, body).unwrap(), None)
}

/// The output tokens counted from a stream's text for `model`.
fn counted_output(api: Api, model: &str, body: &[u8]) -> u64 {
    let mut acc = ResponseAccumulator::new(api, ResponseFormat::Sse);
    acc.feed(body);
    acc.finish()
        .final_usage(&TokenCounter::default(), model, 0)
        .output_tokens
}

const CHAT_STREAM: &str = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"What does lane 4 cost?"}]}"#;
const ANTHROPIC_REQ: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Which lane?"}]}"#;
const GEMINI_REQ: &str = r#"{"contents":[{"role":"user","parts":[{"text":"Which lane?"}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_slots_variables_include_usage_and_metrics_through_envoy() {
    within(LIMIT, async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(reports().set(tx).is_ok());
        let tmp = tempfile::tempdir().unwrap();
        let (grpc, admin) = serve(tmp.path()).await;
        let got: Received = Arc::default();
        let up = upstream(got.clone());
        let envoy = Envoy::start(tmp.path(), &envoy_options(), grpc, up).await;
        let client = HttpClient::new();
        let url = |p: &str| format!("http://{}{}", envoy.listen, p);
        let mut expect: Vec<(String, Check)> = Vec::new();

        for mode in ["duplex", "buffered"] {
            // OpenAI, streamed, the client did not ask for usage: counted.
            let path = format!("/{mode}/plain/v1/chat/completions");
            let id = format!("{mode}-openai-counted");
            let s = client
                .stream(
                    "POST",
                    &url(&path),
                    &[
                        ("x-test-id", &id),
                        ("content-type", "application/json"),
                        ("accept-encoding", "gzip, br"),
                    ],
                    CHAT_STREAM,
                )
                .await;
            assert_eq!(s.status, 200, "{id}");
            assert_eq!(
                s.body(),
                OPENAI_NO_USAGE,
                "{id}: the stream as the upstream sent it"
            );
            let prompt = prompt_tokens(&path, CHAT_STREAM.as_bytes());
            let output = counted_output(Api::OpenAiChat, "gpt-4o-mini", OPENAI_NO_USAGE);
            assert!(output > 0);
            expect.push((
                id,
                Box::new(move |s: &Seen| {
                    assert_eq!(s.prompt_at_request, Some(prompt), "counted before the hook");
                    assert_eq!(s.api, Some(Api::OpenAiChat));
                    assert_eq!(s.model.as_deref(), Some("gpt-4o-mini"));
                    let u = s.usage.as_ref().unwrap();
                    assert_eq!((u.input_tokens, u.output_tokens), (prompt, output));
                    assert_eq!(u.output_source, UsageSource::Counted);
                    assert_eq!(s.end, ExchangeEnd::Completed);
                }),
            ));

            // The same through the includeUsage flow: the upstream is asked for usage, the
            // client does not see the usage chunk, the reported usage is recorded.
            let path = format!("/{mode}/inject/v1/chat/completions");
            let id = format!("{mode}-openai-injected");
            let s = client
                .stream(
                    "POST",
                    &url(&path),
                    &[("x-test-id", &id), ("content-type", "application/json")],
                    CHAT_STREAM,
                )
                .await;
            assert_eq!(s.status, 200, "{id}");
            let body = String::from_utf8(s.body()).unwrap();
            let expected: String = std::str::from_utf8(OPENAI_USAGE)
                .unwrap()
                .split_inclusive("\n\n")
                .filter(|e| !e.contains("\"usage\":{"))
                .collect();
            assert_eq!(
                body, expected,
                "{id}: the usage chunk dropped, nothing else"
            );
            expect.push((
                id,
                Box::new(|s: &Seen| {
                    let u = s.usage.as_ref().unwrap();
                    assert_eq!((u.input_tokens, u.output_tokens), (31, 9));
                    assert_eq!(u.input_source, UsageSource::Reported);
                }),
            ));

            // Anthropic and Gemini streams: reported usage, normalised.
            let id = format!("{mode}-anthropic");
            let s = client
                .stream(
                    "POST",
                    &url(&format!("/{mode}/plain/v1/messages")),
                    &[("x-test-id", &id), ("anthropic-version", "2023-06-01")],
                    ANTHROPIC_REQ,
                )
                .await;
            assert_eq!((s.status, s.body()), (200, ANTHROPIC.to_vec()), "{id}");
            expect.push((
                id,
                Box::new(|s: &Seen| {
                    assert_eq!(s.api, Some(Api::AnthropicMessages));
                    let u = s.usage.as_ref().unwrap();
                    assert_eq!(
                        (u.input_tokens, u.output_tokens, u.cached_input_tokens),
                        (2125, 57, 2000)
                    );
                }),
            ));
            let id = format!("{mode}-gemini");
            let s = client
                .stream(
                    "POST",
                    &url(&format!(
                        "/{mode}/plain/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
                    )),
                    &[("x-test-id", &id)],
                    GEMINI_REQ,
                )
                .await;
            assert_eq!((s.status, s.body()), (200, GEMINI.to_vec()), "{id}");
            expect.push((
                id,
                Box::new(|s: &Seen| {
                    assert_eq!(s.model.as_deref(), Some("gemini-2.5-flash"));
                    let u = s.usage.as_ref().unwrap();
                    assert_eq!(
                        (u.input_tokens, u.output_tokens, u.reasoning_tokens),
                        (44, 42, 30)
                    );
                }),
            ));

            // An upstream error: no output charged.
            let id = format!("{mode}-upstream-error");
            let r = client
                .send(
                    "POST",
                    &url(&format!("/{mode}/plain/v1/chat/completions")),
                    &[("x-test-id", &id), ("x-fail", "1")],
                    CHAT_STREAM,
                )
                .await;
            assert_eq!(r.status, 503, "{id}");
            expect.push((
                id,
                Box::new(|s: &Seen| {
                    let u = s.usage.as_ref().unwrap();
                    assert_eq!((u.input_tokens, u.output_tokens), (0, 0));
                }),
            ));

            // A body an LLM endpoint cannot read: 400, never forwarded.
            let r = client
                .send(
                    "POST",
                    &url(&format!("/{mode}/plain/v1/chat/completions")),
                    &[("x-test-id", "bad")],
                    "{not json",
                )
                .await;
            assert_eq!(r.status, 400, "{mode}: {}", r.text());
            assert!(
                r.text().contains("steps.llm.InvalidRequest"),
                "{}",
                r.text()
            );

            // Not an LLM call: passes, slots empty.
            let id = format!("{mode}-models");
            let r = client
                .get(
                    &url(&format!("/{mode}/plain/v1/models")),
                    &[("x-test-id", &id)],
                )
                .await;
            assert_eq!(r.status, 200);
            expect.push((
                id,
                Box::new(|s: &Seen| {
                    assert!(s.api.is_none() && s.usage.is_none() && s.prompt_at_request.is_none());
                }),
            ));
        }

        // The upstream got `include_usage` only through the includeUsage flow, never an
        // `accept-encoding`, and never the unreadable bodies.
        {
            let got = got.lock();
            for (path, ae, body) in got.iter() {
                assert_eq!(ae, &None, "{path}: accept-encoding removed");
                assert_ne!(body.as_slice(), b"{not json", "{path}");
                let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                if path.ends_with("/chat/completions") {
                    assert_eq!(
                        v["stream_options"]["include_usage"] == true,
                        path.contains("/inject/"),
                        "{path}: {v}"
                    );
                }
            }
        }

        // llm.* variables in a response template (BUFFERED: the headers wait for the end).
        let r = client
            .send(
                "POST",
                &url("/buffered/header/v1/chat/completions"),
                &[],
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .await;
        assert_eq!(r.status, 200);
        let reported: serde_json::Value = serde_json::from_slice(OPENAI_JSON).unwrap();
        let u = &reported["usage"];
        assert_eq!(
            r.header("x-tokens"),
            Some(u["total_tokens"].to_string().as_str())
        );
        assert_eq!(
            r.header("x-prompt"),
            Some(format!("{}/{}", u["prompt_tokens"], u["completion_tokens"]).as_str())
        );
        assert_eq!(
            r.header("x-llm"),
            Some("openai.chat_completions gpt-4o-mini false")
        );
        assert_eq!(r.body.as_ref(), OPENAI_JSON);

        // Refused by a step after the tracker: the prompt, no output.
        let path = "/duplex/plain/v1/chat/completions";
        let r = client
            .send("POST", &url(path), &[("x-test-id", "refused"), ("x-reject", "1")], CHAT_STREAM)
            .await;
        assert_eq!(r.status, 429);
        let prompt = prompt_tokens(path, CHAT_STREAM.as_bytes());
        expect.push((
            "refused".into(),
            Box::new(move |s: &Seen| {
                assert_eq!(s.end, ExchangeEnd::Answered);
                let u = s.usage.as_ref().unwrap();
                assert_eq!((u.input_tokens, u.output_tokens), (prompt, 0));
            }),
        ));

        // The client goes away after the first event: what was known.
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(envoy.listen).await.unwrap();
            let req = format!(
                "POST {path} HTTP/1.1\r\nhost: e2e\r\nx-test-id: aborted\r\nx-slow: 1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT_STREAM}",
                CHAT_STREAM.len()
            );
            c.write_all(req.as_bytes()).await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains("data: ") {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "the stream ended before its first event");
                seen.extend_from_slice(&buf[..n]);
            }
        }
        expect.push((
            "aborted".into(),
            Box::new(move |s: &Seen| {
                assert_eq!(s.end, ExchangeEnd::Aborted);
                let u = s.usage.as_ref().unwrap();
                assert_eq!(u.input_tokens, prompt);
                assert_eq!(u.output_source, UsageSource::Counted);
            }),
        ));

        // Every exchange reported once, with the slots filled.
        let mut pending = expect;
        while !pending.is_empty() {
            let s = rx.recv().await.unwrap();
            let Some(i) = pending.iter().position(|(id, _)| *id == s.id) else {
                continue;
            };
            let (id, check) = pending.swap_remove(i);
            eprintln!("checking {id}");
            check(&s);
        }

        // The gen_ai metrics, on the admin /metrics.
        let (status, text) = support::raw_get(admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let series = |name: &str, labels: &[&str]| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let anthropic_out = series(
            "gen_ai_client_token_usage_sum",
            &[
                r#"gen_ai_provider_name="anthropic""#,
                r#"gen_ai_token_type="output""#,
            ],
        );
        assert_eq!(anthropic_out, 114.0, "57 per mode");
        assert!(
            series(
                "gen_ai_server_time_to_first_token_seconds_count",
                &[r#"gen_ai_operation_name="generate_content""#]
            ) >= 2.0
        );
        assert!(
            series(
                "gen_ai_server_time_per_output_token_seconds_count",
                &[r#"gen_ai_provider_name="gcp.gemini""#]
            ) >= 2.0
        );
        assert!(
            series(
                "gen_ai_server_request_duration_seconds_count",
                &[r#"error_type="503""#]
            ) >= 2.0
        );
        assert!(
            series(
                "gen_ai_server_request_duration_seconds_count",
                &[r#"gen_ai_response_model="claude-sonnet-4-5-20250929""#]
            ) >= 2.0
        );
        assert!(series("tollgate_llm_tokens_total", &[r#"type="output""#]) >= 114.0);
    })
    .await;
}
