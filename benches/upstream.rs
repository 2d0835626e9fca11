//! A tiny, fast HTTP upstream for the Envoy benchmarks (HTTP/1.1 and h2c).
//!
//! Any path: 200 with a fixed chat-completion JSON body. `/sse`: 200 `text/event-stream` with
//! `--sse-events` events (the last one `data: [DONE]`), `--sse-interval-ms` apart.
//!
//!     cargo build --release --example upstream && target/release/examples/upstream --addr 127.0.0.1:8080

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{header, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser, Clone, Copy)]
#[command(about = "Fixed-response HTTP upstream for benchmarks")]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Events per /sse response.
    #[arg(long, default_value_t = 20)]
    sse_events: usize,
    /// Pause between SSE events in milliseconds (0: write them back to back).
    #[arg(long, default_value_t = 0)]
    sse_interval_ms: u64,
}

const JSON: &str = concat!(
    r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","#,
    r#""choices":[{"index":0,"message":{"role":"assistant","content":"The report shows steady growth; "#,
    r#"the main risks are supply, currency and churn."},"finish_reason":"stop"}],"#,
    r#""usage":{"prompt_tokens":412,"completion_tokens":18,"total_tokens":430}}"#
);

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn sse_event(i: usize, last: bool) -> Bytes {
    if last {
        return Bytes::from_static(b"data: [DONE]\n\n");
    }
    Bytes::from(format!(
        concat!(
            r#"data: {{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"#,
            r#""model":"gpt-4o-mini","choices":[{{"index":0,"delta":{{"content":"token{} "}},"#,
            r#""finish_reason":null}}]}}"#,
            "\n\n"
        ),
        i
    ))
}

async fn handle(req: Request<Incoming>, args: Args) -> Result<Response<Body>, Infallible> {
    let sse = req.uri().path().starts_with("/sse");
    // Read the request body so the connection can be reused.
    let _ = req.into_body().collect().await;
    if !sse {
        let body = Full::new(Bytes::from_static(JSON.as_bytes())).boxed_unsync();
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap());
    }
    let (n, pause) = (
        args.sse_events.max(1),
        Duration::from_millis(args.sse_interval_ms),
    );
    let events = futures_util::stream::unfold(0usize, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        Some((
            Ok::<_, Infallible>(Frame::data(sse_event(i, i + 1 == n))),
            i + 1,
        ))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(events).boxed_unsync())
        .unwrap())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    eprintln!("upstream: listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, args));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
