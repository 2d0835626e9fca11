//! gRPC load generator for an ext_proc server: plays Envoy's side of `ExternalProcessor.Process`.
//!
//! Each stream sends one message, awaits its answer, then sends the next (as Envoy does), then
//! half-closes and waits for the server to end the stream. Every answer is checked for the
//! expected kind.
//!
//!     cargo build --release --example loadgen
//!     target/release/examples/loadgen --addr http://127.0.0.1:9102 --mix sse --duration 5
//!
//! Mixes:
//!   headers  request_headers(eos) -> response_headers(eos)
//!   body     request_headers -> request_body 2 KB JSON (eos, BUFFERED) -> response_headers(eos)
//!   sse      request_headers(eos) -> response_headers(text/event-stream) -> 20 response_body
//!            chunks (FULL_DUPLEX_STREAMED, last eos; `--sse-chunks`), one streamed_response
//!            answer per chunk; `--sse-request-body` sends a 2 KB streaming chat request body
//!            (BUFFERED) first, as an LLM call does; `--sse-usage` makes the next-to-last
//!            chunk an OpenAI usage chunk
//!
//! Exit status: 0 when at least one stream completed and there were no mismatches, errors or
//! timeouts; 1 otherwise (the report is printed either way).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, external_processor_client::ExternalProcessorClient,
    processing_request::Request as Req, processing_response::Response as Resp, HttpBody,
    HttpHeaders, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mix {
    Headers,
    Body,
    Sse,
}

#[derive(Parser, Debug)]
#[command(about = "Load generator for an Envoy ext_proc gRPC server")]
struct Args {
    /// ext_proc server URI.
    #[arg(long, default_value = "http://127.0.0.1:9002")]
    addr: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections; streams are spread over them.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Measured duration in seconds (after warmup). Ignored with --streams.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Run exactly this many measured streams instead of a fixed duration.
    #[arg(long)]
    streams: Option<u64>,
    /// Warmup seconds (streams run but are not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Message sequence per stream.
    #[arg(long, value_enum, default_value_t = Mix::Headers)]
    mix: Mix,
    /// :path of the simulated request.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// :authority of the simulated request.
    #[arg(long, default_value = "api.example.com")]
    authority: String,
    /// Extra request header `name:value` (repeatable).
    #[arg(long = "header", value_name = "K:V")]
    headers: Vec<String>,
    /// `name:FILE`: header `name` takes, per stream, the next line of FILE (cycling), e.g.
    /// distinct bearer tokens so a verifier's cache cannot answer.
    #[arg(long = "header-values", value_name = "K:FILE")]
    header_values: Option<String>,
    /// Give up on a stream after this many milliseconds (counted as a timeout).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print a single JSON line instead of the text report.
    #[arg(long)]
    json: bool,
    /// Response body chunks (one server-sent event each) of the `sse` mix.
    #[arg(long, default_value_t = 20)]
    sse_chunks: usize,
    /// `sse` mix: send a 2 KB streaming chat request body (BUFFERED) before the response, as
    /// an LLM call does (a token-counting flow reads it).
    #[arg(long)]
    sse_request_body: bool,
    /// `sse` mix: the next-to-last chunk is an OpenAI usage chunk (`include_usage`).
    #[arg(long)]
    sse_usage: bool,
    /// Approximate size of the chat request body (`body` mix, `--sse-request-body`).
    #[arg(long, default_value_t = 2048)]
    body_bytes: usize,
    /// Every request body differs from every other in each line of the prompt (a ticket
    /// number), so no cache keyed on prompt text can help: the worst case for counting.
    #[arg(long)]
    unique_bodies: bool,
    /// `sse` mix: send the response chunks without waiting for each answer, and end the
    /// stream at the answer that carries end_of_stream. In FULL_DUPLEX_STREAMED a server may
    /// hold bytes back across chunks (a stream guard's window) and answer several chunks at
    /// once, which the default lockstep (one answer per chunk) cannot wait for.
    #[arg(long)]
    sse_pipelined: bool,
    /// With `--sse-pipelined`: wait this many milliseconds between response chunks, as a
    /// model streams tokens (0: as fast as possible). The report then also gives the time
    /// to the first answered body bytes (`ttfb`), what a client sees as time to first token.
    #[arg(long, default_value_t = 0)]
    sse_interval_ms: u64,
}

/// In `--unique-bodies` prompts, replaced by the stream's number.
const MARK: &[u8; 12] = b"000000000000";

fn hv(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        raw_value: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn headers_msg(headers: Vec<HeaderValue>, eos: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap { headers }),
        end_of_stream: eos,
        ..Default::default()
    }
}

fn msg(request: Req) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..Default::default()
    }
}

/// A chat-completion request body of about `size` bytes (at least about 200).
fn chat_body(size: usize, unique: bool) -> Vec<u8> {
    let filler = if unique {
        "Ticket 000000000000: summarise the quarterly report, list the main risks. "
    } else {
        "Summarise the quarterly report, list the three main risks and suggest next steps. "
    };
    let mut user = String::new();
    while user.len() < size.saturating_sub(198) {
        user.push_str(filler);
    }
    format!(
        concat!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"system","content":"You are a helpful "#,
            r#"assistant."}},{{"role":"user","content":"{}"}}],"temperature":0.2,"max_tokens":512,"#,
            r#""stream":false,"user":"bench-user-1"}}"#
        ),
        user.trim_end()
    )
    .into_bytes()
}

fn sse_chunk(i: usize, chunks: usize, usage: bool) -> Vec<u8> {
    if i + 1 == chunks {
        return b"data: [DONE]\n\n".to_vec();
    }
    if usage && i + 2 == chunks {
        return br#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":420,"completion_tokens":396,"total_tokens":816}}

"#
        .to_vec();
    }
    format!(
        concat!(
            r#"data: {{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"#,
            r#""model":"gpt-4o-mini","choices":[{{"index":0,"delta":{{"content":"token{} "}},"#,
            r#""finish_reason":null}}]}}"#,
            "\n\n"
        ),
        i
    )
    .into_bytes()
}

/// The message sequence of one stream (x-request-id is filled in per stream).
fn script(args: &Args) -> Result<Vec<ProcessingRequest>, String> {
    let mut req_headers = vec![
        hv(":method", "POST"),
        hv(":path", &args.path),
        hv(":authority", &args.authority),
        hv(":scheme", "https"),
        hv("user-agent", "tollgate-loadgen/1.0"),
        hv("x-request-id", ""),
        hv("content-type", "application/json"),
        hv(
            "accept",
            if args.mix == Mix::Sse {
                "text/event-stream"
            } else {
                "application/json"
            },
        ),
        hv("x-forwarded-proto", "https"),
        hv("x-forwarded-for", "127.0.0.1"),
    ];
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?}: expected name:value"))?;
        req_headers.push(hv(&k.trim().to_ascii_lowercase(), v.trim()));
    }
    let mut resp_headers = vec![
        hv(":status", "200"),
        hv("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ];
    let duplex = BodySendMode::FullDuplexStreamed as i32;
    let mut pc = ProtocolConfiguration::default();
    let mut out = Vec::new();
    match args.mix {
        Mix::Headers => {
            req_headers.retain(|h| h.key != "content-type");
            out.push(msg(Req::RequestHeaders(headers_msg(req_headers, true))));
            resp_headers.push(hv("content-type", "application/json"));
            resp_headers.push(hv("content-length", "512"));
            out.push(msg(Req::ResponseHeaders(headers_msg(resp_headers, true))));
        }
        Mix::Body => {
            let body = chat_body(args.body_bytes, args.unique_bodies);
            req_headers.push(hv("content-length", &body.len().to_string()));
            pc.request_body_mode = BodySendMode::Buffered as i32;
            out.push(msg(Req::RequestHeaders(headers_msg(req_headers, false))));
            out.push(msg(Req::RequestBody(HttpBody {
                body,
                end_of_stream: true,
                ..Default::default()
            })));
            resp_headers.push(hv("content-type", "application/json"));
            resp_headers.push(hv("content-length", "512"));
            out.push(msg(Req::ResponseHeaders(headers_msg(resp_headers, true))));
        }
        Mix::Sse => {
            pc.response_body_mode = duplex;
            if args.sse_request_body {
                let body = String::from_utf8(chat_body(args.body_bytes, args.unique_bodies))
                    .map_err(|e| e.to_string())?
                    .replace(r#""stream":false"#, r#""stream":true"#)
                    .into_bytes();
                req_headers.push(hv("content-length", &body.len().to_string()));
                pc.request_body_mode = BodySendMode::Buffered as i32;
                out.push(msg(Req::RequestHeaders(headers_msg(req_headers, false))));
                out.push(msg(Req::RequestBody(HttpBody {
                    body,
                    end_of_stream: true,
                    ..Default::default()
                })));
            } else {
                req_headers.retain(|h| h.key != "content-type");
                out.push(msg(Req::RequestHeaders(headers_msg(req_headers, true))));
            }
            resp_headers.push(hv("content-type", "text/event-stream"));
            resp_headers.push(hv("cache-control", "no-cache"));
            out.push(msg(Req::ResponseHeaders(headers_msg(resp_headers, false))));
            let n = args.sse_chunks.max(1);
            for i in 0..n {
                let chunk = HttpBody {
                    body: sse_chunk(i, n, args.sse_usage),
                    end_of_stream: i + 1 == n,
                    ..Default::default()
                };
                out.push(msg(Req::ResponseBody(chunk)));
            }
        }
    }
    out[0].protocol_config = Some(pc);
    Ok(out)
}

/// How one stream ended.
enum Outcome {
    Ok,
    Immediate,
    Mismatch(String),
    Error(String),
}

/// None when `resp` is the right answer to `req`, else what was wrong.
fn check(req: &ProcessingRequest, resp: &ProcessingResponse, duplex: bool) -> Option<String> {
    let got = resp.response.as_ref();
    let ok = match (req.request.as_ref()?, got) {
        (Req::RequestHeaders(_), Some(Resp::RequestHeaders(_))) => true,
        (Req::ResponseHeaders(_), Some(Resp::ResponseHeaders(_))) => true,
        (Req::RequestBody(_), Some(Resp::RequestBody(_))) => true,
        (Req::RequestTrailers(_), Some(Resp::RequestTrailers(_))) => true,
        (Req::ResponseTrailers(_), Some(Resp::ResponseTrailers(_))) => true,
        (Req::ResponseBody(b), Some(Resp::ResponseBody(r))) if duplex => {
            let m = r
                .response
                .as_ref()
                .and_then(|c| c.body_mutation.as_ref())
                .and_then(|m| m.mutation.as_ref());
            match m {
                Some(Mutation::StreamedResponse(s)) if s.end_of_stream == b.end_of_stream => true,
                Some(Mutation::StreamedResponse(_)) => {
                    return Some("streamed_response end_of_stream differs".into())
                }
                _ => {
                    return Some(
                        "response_body without streamed_response in FULL_DUPLEX_STREAMED".into(),
                    )
                }
            }
        }
        (Req::ResponseBody(_), Some(Resp::ResponseBody(_))) => true,
        _ => false,
    };
    if ok {
        return None;
    }
    let name = |r: &Req| match r {
        Req::RequestHeaders(_) => "request_headers",
        Req::ResponseHeaders(_) => "response_headers",
        Req::RequestBody(_) => "request_body",
        Req::ResponseBody(_) => "response_body",
        Req::RequestTrailers(_) => "request_trailers",
        Req::ResponseTrailers(_) => "response_trailers",
    };
    let got = match got {
        None => "no response",
        Some(Resp::RequestHeaders(_)) => "request_headers",
        Some(Resp::ResponseHeaders(_)) => "response_headers",
        Some(Resp::RequestBody(_)) => "request_body",
        Some(Resp::ResponseBody(_)) => "response_body",
        Some(Resp::RequestTrailers(_)) => "request_trailers",
        Some(Resp::ResponseTrailers(_)) => "response_trailers",
        Some(Resp::ImmediateResponse(_)) => "immediate_response",
        Some(Resp::StreamedImmediateResponse(_)) => "streamed_immediate_response",
    };
    Some(format!(
        "{} answered with {got}",
        name(req.request.as_ref()?)
    ))
}

/// Writes `n` over every [`MARK`] in `body`.
fn mark(body: &mut [u8], n: u64) {
    let digits = format!("{:012}", n % 1_000_000_000_000);
    let mut i = 0;
    while i + MARK.len() <= body.len() {
        if &body[i..i + MARK.len()] == MARK {
            body[i..i + MARK.len()].copy_from_slice(digits.as_bytes());
            i += MARK.len();
        } else {
            i += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)] // one stream's script, ids and the timings it reports
async fn one_stream(
    channel: Channel,
    script: &[ProcessingRequest],
    request_id: String,
    extra: Option<(&str, &[u8])>,
    duplex: bool,
    unique: Option<u64>,
    pipelined: Option<Duration>,
    first_body: &mut Option<Instant>,
) -> Outcome {
    let (tx, rx) = mpsc::channel::<ProcessingRequest>(2);
    let mut first = script[0].clone();
    if let Some(Req::RequestHeaders(h)) = first.request.as_mut() {
        if let Some(v) = h
            .headers
            .iter_mut()
            .flat_map(|m| m.headers.iter_mut())
            .find(|v| v.key == "x-request-id")
        {
            v.raw_value = request_id.into_bytes();
        }
        if let (Some((name, value)), Some(map)) = (extra, h.headers.as_mut()) {
            map.headers.push(HeaderValue {
                key: name.to_string(),
                raw_value: value.to_vec(),
                ..Default::default()
            });
        }
    }
    // Queue the first message before opening the stream: Envoy sends it with the stream.
    let _ = tx.send(first).await;
    let mut client = ExternalProcessorClient::new(channel);
    let mut inbound = match client.process(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Outcome::Error(format!("open: {:?} {}", s.code(), s.message())),
    };
    for (i, req) in script.iter().enumerate() {
        let owned;
        if let (Some(interval), true, Some(Req::ResponseBody(_))) =
            (pipelined, duplex, &req.request)
        {
            return pipelined_body(tx, inbound, script[i..].to_vec(), interval, first_body).await;
        }
        let req = match (unique, &req.request) {
            (Some(n), Some(Req::RequestBody(_))) => {
                let mut r = req.clone();
                if let Some(Req::RequestBody(b)) = r.request.as_mut() {
                    mark(&mut b.body, n);
                }
                owned = r;
                &owned
            }
            _ => req,
        };
        if i > 0 && tx.send(req.clone()).await.is_err() {
            return Outcome::Error("request stream closed".into());
        }
        match inbound.message().await {
            Ok(Some(resp)) => {
                if let Some(Resp::ImmediateResponse(_)) = resp.response {
                    return Outcome::Immediate;
                }
                if let Some(why) = check(req, &resp, duplex) {
                    return Outcome::Mismatch(why);
                }
            }
            Ok(None) => {
                return Outcome::Error(format!(
                    "server ended the stream before answering message {}",
                    i + 1
                ))
            }
            Err(s) => return Outcome::Error(format!("{:?} {}", s.code(), s.message())),
        }
    }
    drop(tx); // half-close, like Envoy with ext_proc_graceful_grpc_close
    match inbound.message().await {
        Ok(None) => Outcome::Ok,
        Ok(Some(_)) => Outcome::Mismatch("extra response after the last answer".into()),
        Err(s) => Outcome::Error(format!("at close: {:?} {}", s.code(), s.message())),
    }
}

/// Sends the response chunks at once; answers may come fewer and later (see
/// `--sse-pipelined`). Ok when an answer with end_of_stream arrives, then the server closes.
async fn pipelined_body(
    tx: mpsc::Sender<ProcessingRequest>,
    mut inbound: tonic::Streaming<ProcessingResponse>,
    chunks: Vec<ProcessingRequest>,
    interval: Duration,
    first_body: &mut Option<Instant>,
) -> Outcome {
    let sender = tokio::spawn(async move {
        for (i, c) in chunks.into_iter().enumerate() {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if tx.send(c).await.is_err() {
                return;
            }
        }
        // tx dropped here: half-close once everything is sent.
    });
    let outcome = loop {
        match inbound.message().await {
            Ok(Some(resp)) => match resp.response {
                Some(Resp::ImmediateResponse(_)) => break Outcome::Immediate,
                Some(Resp::ResponseBody(r)) => match r
                    .response
                    .as_ref()
                    .and_then(|c| c.body_mutation.as_ref())
                    .and_then(|m| m.mutation.as_ref())
                {
                    Some(Mutation::StreamedResponse(s)) => {
                        if !s.body.is_empty() && first_body.is_none() {
                            *first_body = Some(Instant::now());
                        }
                        if s.end_of_stream {
                            break Outcome::Ok;
                        }
                    }
                    _ => {
                        break Outcome::Mismatch(
                            "response_body without streamed_response in FULL_DUPLEX_STREAMED"
                                .into(),
                        )
                    }
                },
                _ => break Outcome::Mismatch("not a response_body answer to a body chunk".into()),
            },
            Ok(None) => {
                break Outcome::Error("server ended the stream before the last chunk".into())
            }
            Err(s) => break Outcome::Error(format!("{:?} {}", s.code(), s.message())),
        }
    };
    let _ = sender.await;
    if !matches!(outcome, Outcome::Ok) {
        return outcome;
    }
    match inbound.message().await {
        Ok(None) => Outcome::Ok,
        Ok(Some(_)) => Outcome::Mismatch("extra response after the last answer".into()),
        Err(s) => Outcome::Error(format!("at close: {:?} {}", s.code(), s.message())),
    }
}

#[derive(Default)]
struct Stats {
    lat_us: Vec<u64>,
    /// Time to the first answered body bytes (`--sse-pipelined`).
    ttfb_us: Vec<u64>,
    ok: u64,
    immediate: u64,
    mismatches: u64,
    errors: u64,
    timeouts: u64,
    samples: Vec<String>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.lat_us.extend(o.lat_us);
        self.ttfb_us.extend(o.ttfb_us);
        self.ok += o.ok;
        self.immediate += o.immediate;
        self.mismatches += o.mismatches;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        for s in o.samples {
            if self.samples.len() < 5 && !self.samples.contains(&s) {
                self.samples.push(s);
            }
        }
    }
    fn sample(&mut self, s: String) {
        if self.samples.len() < 5 && !self.samples.contains(&s) {
            self.samples.push(s);
        }
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.concurrency == 0 || args.connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    let script = Arc::new(script(&args)?);
    let duplex = args.mix == Mix::Sse;
    let values: Arc<(String, Vec<Vec<u8>>)> = Arc::new(match &args.header_values {
        None => (String::new(), Vec::new()),
        Some(spec) => {
            let (name, file) = spec
                .split_once(':')
                .ok_or_else(|| format!("--header-values {spec:?}: expected name:FILE"))?;
            let lines: Vec<Vec<u8>> = std::fs::read_to_string(file)
                .map_err(|e| format!("--header-values {file}: {e}"))?
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| l.as_bytes().to_vec())
                .collect();
            if lines.is_empty() {
                return Err(format!("--header-values {file}: no lines").into());
            }
            (name.trim().to_ascii_lowercase(), lines)
        }
    });

    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // Each connect() opens its own HTTP/2 connection.
        let ep = Endpoint::from_shared(args.addr.clone())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3));
        let ch = ep.connect().await.map_err(|e| {
            format!(
                "connect {}: {e} ({:?})",
                args.addr,
                std::error::Error::source(&e)
            )
        })?;
        channels.push(ch);
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup.max(0.0));
    let stop_at = measure_from + Duration::from_secs_f64(args.duration.max(0.0));
    let started = Arc::new(AtomicU64::new(0)); // measured streams started (for --streams)
    let ids = Arc::new(AtomicU64::new(0));
    let timeout = Duration::from_millis(args.timeout_ms);
    let unique = args.unique_bodies;
    let pipelined = args
        .sse_pipelined
        .then(|| Duration::from_millis(args.sse_interval_ms));
    let limit = args.streams;
    let last_end = Arc::new(Mutex::new(measure_from));

    let mut tasks = Vec::with_capacity(args.concurrency);
    for w in 0..args.concurrency {
        let channel = channels[w % channels.len()].clone();
        let (script, values, started, ids, last_end) = (
            script.clone(),
            values.clone(),
            started.clone(),
            ids.clone(),
            last_end.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut st = Stats::default();
            let mut my_end = measure_from;
            loop {
                let t0 = Instant::now();
                let measured = t0 >= measure_from;
                if measured {
                    let done = match limit {
                        Some(n) => started.fetch_add(1, Ordering::Relaxed) >= n,
                        None => t0 >= stop_at,
                    };
                    if done {
                        break;
                    }
                }
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let mut first_body = None;
                let rid = format!("6b1f0c2e-0000-4000-8000-{id:012x}");
                let extra = (!values.1.is_empty()).then(|| {
                    let v = &values.1[(id % values.1.len() as u64) as usize];
                    (values.0.as_str(), v.as_slice())
                });
                let res = tokio::time::timeout(
                    timeout,
                    one_stream(
                        channel.clone(),
                        &script,
                        rid,
                        extra,
                        duplex,
                        unique.then_some(id + 1),
                        pipelined,
                        &mut first_body,
                    ),
                )
                .await;
                let t1 = Instant::now();
                if let (true, Some(f), Ok(Outcome::Ok)) = (measured, first_body.take(), &res) {
                    st.ttfb_us.push(f.duration_since(t0).as_micros() as u64);
                }
                if !measured {
                    continue;
                }
                my_end = my_end.max(t1);
                let us = t1.duration_since(t0).as_micros() as u64;
                match res {
                    Ok(Outcome::Ok) => {
                        st.ok += 1;
                        st.lat_us.push(us);
                    }
                    Ok(Outcome::Immediate) => {
                        st.immediate += 1;
                        st.lat_us.push(us);
                    }
                    Ok(Outcome::Mismatch(why)) => {
                        st.mismatches += 1;
                        st.sample(format!("mismatch: {why}"));
                    }
                    Ok(Outcome::Error(why)) => {
                        st.errors += 1;
                        st.sample(format!("error: {why}"));
                    }
                    Err(_) => {
                        st.timeouts += 1;
                        st.sample(format!("timeout after {} ms", timeout.as_millis()));
                    }
                }
            }
            let mut le = last_end.lock();
            *le = (*le).max(my_end);
            st
        }));
    }
    let mut total = Stats::default();
    for t in tasks {
        total.merge(t.await?);
    }
    let elapsed = last_end.lock().duration_since(measure_from).as_secs_f64();
    let lat = &mut total.lat_us;
    lat.sort_unstable();
    let completed = total.ok + total.immediate;
    let all = completed + total.mismatches + total.errors + total.timeouts;
    let rate = if elapsed > 0.0 {
        completed as f64 / elapsed
    } else {
        0.0
    };
    let (p50, p90, p99, max) = (
        pct(lat, 50.0),
        pct(lat, 90.0),
        pct(lat, 99.0),
        lat.last().copied().unwrap_or(0),
    );
    total.ttfb_us.sort_unstable();
    let ttfb50 = pct(&total.ttfb_us, 50.0);
    let mix = format!("{:?}", args.mix).to_lowercase();

    if args.json {
        println!(
            concat!(
                r#"{{"mix":"{}","addr":"{}","concurrency":{},"connections":{},"elapsed_s":{:.3},"#,
                r#""streams":{},"completed":{},"ok":{},"immediate":{},"rate":{:.1},"p50_us":{},"p90_us":{},"#,
                r#""p99_us":{},"max_us":{},"ttfb_p50_us":{},"mismatches":{},"errors":{},"timeouts":{}}}"#
            ),
            mix,
            args.addr.replace('"', ""),
            args.concurrency,
            args.connections,
            elapsed,
            all,
            completed,
            total.ok,
            total.immediate,
            rate,
            p50,
            p90,
            p99,
            max,
            ttfb50,
            total.mismatches,
            total.errors,
            total.timeouts
        );
    } else {
        println!(
            "loadgen: mix={mix} addr={} concurrency={} connections={} measured={elapsed:.2}s (warmup {}s)",
            args.addr, args.concurrency, args.connections, args.warmup
        );
        println!(
            "streams:     {all} ({completed} completed: {} ok, {} immediate)",
            total.ok, total.immediate
        );
        println!("rate:        {rate:.1} streams/s");
        println!("latency us:  p50 {p50}  p90 {p90}  p99 {p99}  max {max}");
        if !total.ttfb_us.is_empty() {
            println!("first body:  p50 {ttfb50} us (time to the first answered body bytes)");
        }
        println!(
            "errors:      mismatches {}  errors {}  timeouts {}",
            total.mismatches, total.errors, total.timeouts
        );
    }
    for s in &total.samples {
        eprintln!("  {s}");
    }
    if completed == 0 || total.mismatches + total.errors + total.timeouts > 0 {
        std::process::exit(1);
    }
    Ok(())
}
