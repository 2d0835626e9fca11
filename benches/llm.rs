//! Criterion benchmarks of `tollgate::llm` (issue 14):
//! - counting an 8 KB prompt: o200k (gpt-4o), cl100k (gpt-4), the approximation (Claude);
//! - parsing a 4 KB chat request and estimating its prompt tokens;
//! - usage and text extraction per SSE chunk for each format (OpenAI Chat with
//!   `include_usage`, Responses, Anthropic, Gemini `alt=sse`, Gemini JSON array), each
//!   chunk one event as servers flush them; reported per chunk (criterion "elements");
//! - the same through the pipeline's LLM tracker (`tollgate::llm::track`), as a tracked flow
//!   runs it: request hook (parse + count), response headers, each chunk through the
//!   tracker's chunk hook, then the end (usage slot, gen_ai metrics); and a 200-chunk chat
//!   stream with and without a usage chunk (without, the streamed text is counted with
//!   tiktoken at the end).
//!
//! `cargo bench --bench llm` (`-- --quick` for a short run)

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use tollgate::llm::track::{self, LlmTracking, TrackConfig};
use tollgate::llm::{
    detect, parse_request, Api, CountingConfig, ResponseAccumulator, ResponseFormat, TokenCounter,
};
use tollgate::pipeline::{Chunk, Direction, ExchangeEnd, Hook, Outcome, Policy};
use tollgate::vars::{Exchange, Headers, RequestInfo, ResponseInfo};

// As in the `tollgate` binary.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// About 8 KB of varied English-like prose with numbers, punctuation and some JSON.
fn prompt_8k() -> String {
    let words = [
        "the",
        "toll",
        "gateway",
        "counts",
        "tokens",
        "before",
        "each",
        "call,",
        "and",
        "reconciles",
        "them",
        "with",
        "usage",
        "when",
        "stream",
        "ends;",
        "quotas",
        "never",
        "overshoot",
        "(even",
        "under",
        "load)",
        "for",
        "tenant",
        "42",
        "in",
        "region",
        "europe-west4.",
        "Prices:",
        "$0.15/M",
        "input,",
        "\"cached\"",
        "{\"lane\":",
        "7}",
    ];
    let mut s = String::with_capacity(8300);
    let mut i = 0usize;
    while s.len() < 8192 {
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
        s.push(if i % 19 == 18 { '\n' } else { ' ' });
        i += 1;
    }
    s
}

fn chat_body_4k() -> Vec<u8> {
    let turn = "Explain how the toll gateway reserves tokens for a streaming request and what \
                happens when the client disconnects half way through the answer. ";
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a concise assistant for a toll road operator."}),
    ];
    while serde_json::to_vec(&messages).map_or(0, |v| v.len()) < 4000 {
        messages.push(serde_json::json!({"role": "user", "content": turn}));
        messages.push(
            serde_json::json!({"role": "assistant", "content": [{"type": "text", "text": turn}]}),
        );
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": 512, "messages": messages,
    }))
    .unwrap_or_default()
}

fn counting(c: &mut Criterion) {
    let counter = TokenCounter::default();
    TokenCounter::warm_up();
    let text = prompt_8k();
    let mut g = c.benchmark_group("count_8k_prompt");
    g.throughput(Throughput::Bytes(text.len() as u64));
    for (name, api, model) in [
        ("o200k_gpt-4o", Api::OpenAiChat, "gpt-4o"),
        ("cl100k_gpt-4", Api::OpenAiChat, "gpt-4"),
        ("approx_claude", Api::AnthropicMessages, "claude-sonnet-4-5"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| counter.count(api, model, black_box(&text)))
        });
    }
    g.finish();

    let body = chat_body_4k();
    let ep = detect("POST", "/v1/chat/completions", |_| None).expect("chat endpoint");
    let mut g = c.benchmark_group("chat_request_4k");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| parse_request(&ep, black_box(&body)).map(|r| r.prompt.len()))
    });
    g.bench_function("parse_and_count", |b| {
        b.iter(|| parse_request(&ep, black_box(&body)).map(|r| counter.count_request(&r, None)))
    });
    g.finish();
}

/// The fixture split into one chunk per event (or per array element).
fn per_event_chunks(body: &[u8], sep: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + sep.len() <= body.len() {
        if &body[i..i + sep.len()] == sep {
            out.push(body[start..i + sep.len()].to_vec());
            start = i + sep.len();
            i = start;
        } else {
            i += 1;
        }
    }
    if start < body.len() {
        out.push(body[start..].to_vec());
    }
    out
}

/// Name, API, framing, fixture, separator between its events.
type Case = (
    &'static str,
    Api,
    ResponseFormat,
    &'static [u8],
    &'static [u8],
);

fn extraction(c: &mut Criterion) {
    let cases: [Case; 5] = [
        (
            "openai_chat_sse",
            Api::OpenAiChat,
            ResponseFormat::Sse,
            include_bytes!("../src/llm/fixtures/openai_chat_stream_usage.sse"),
            b"\n\n",
        ),
        (
            "responses_sse",
            Api::OpenAiResponses,
            ResponseFormat::Sse,
            include_bytes!("../src/llm/fixtures/responses_stream.sse"),
            b"\n\n",
        ),
        (
            "anthropic_sse",
            Api::AnthropicMessages,
            ResponseFormat::Sse,
            include_bytes!("../src/llm/fixtures/anthropic_stream.sse"),
            b"\n\n",
        ),
        (
            "gemini_sse",
            Api::Gemini,
            ResponseFormat::Sse,
            include_bytes!("../src/llm/fixtures/gemini_stream.sse"),
            b"\n\n",
        ),
        (
            "gemini_json_array",
            Api::VertexAi,
            ResponseFormat::JsonArray,
            include_bytes!("../src/llm/fixtures/gemini_stream_array.json"),
            b"\n,",
        ),
    ];
    let mut g = c.benchmark_group("usage_per_chunk");
    for (name, api, format, body, sep) in cases {
        let chunks = per_event_chunks(body, sep);
        g.throughput(Throughput::Elements(chunks.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut acc = ResponseAccumulator::new(api, format);
                for ch in &chunks {
                    acc.feed(black_box(ch));
                }
                acc.finish().usage
            })
        });
    }
    g.finish();

    // A 200-chunk chat stream, as the issue's end-to-end speed target streams it.
    let mut body = Vec::new();
    for i in 0..199 {
        body.extend_from_slice(
            format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":400}}\n\ndata: [DONE]\n\n");
    let chunks = per_event_chunks(&body, b"\n\n");
    let mut g = c.benchmark_group("stream_200_chunks");
    g.throughput(Throughput::Elements(chunks.len() as u64));
    g.bench_function("openai_chat_sse", |b| {
        b.iter(|| {
            let mut acc = ResponseAccumulator::new(Api::OpenAiChat, ResponseFormat::Sse);
            for ch in &chunks {
                acc.feed(black_box(ch));
            }
            acc.finish().usage
        })
    });
    g.finish();
}

/// One tracked exchange: request hook on `body` sent to `path`, a 200 `content_type`
/// response, `chunks` through the chunk hook, then the end. Returns the output tokens.
fn tracked(
    policy: &LlmTracking,
    path: &str,
    body: &[u8],
    content_type: &str,
    chunks: &[Vec<u8>],
) -> u64 {
    let mut ex = Exchange::default();
    let mut h = Headers::with_capacity(2);
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), path.into());
    ex.request = RequestInfo::from_headers(h);
    ex.set_body(Direction::Request, Some(body.to_vec()));
    match policy.run(&mut ex, Direction::Request) {
        Hook::Ready(Outcome::Continue) => {}
        _ => panic!("the tracker accepts the bench request"),
    }
    let mut h = Headers::with_capacity(2);
    h.push(":status".into(), "200".into());
    h.push("content-type".into(), content_type.into());
    ex.response = Some(ResponseInfo {
        status: 200,
        headers: h,
    });
    let _ = policy.run(&mut ex, Direction::Response);
    for (i, c) in chunks.iter().enumerate() {
        // The stream hands each chunk over as an owned buffer; the copy stands for it.
        let mut chunk = Chunk {
            data: c.clone(),
            end_of_stream: i + 1 == chunks.len(),
            whole_events: false,
        };
        let _ = policy.response_chunk(&mut ex, black_box(&mut chunk));
    }
    track::finish(&mut ex, ExchangeEnd::Completed);
    ex.state.llm_usage.map_or(0, |u| u.output_tokens)
}

fn tracker(c: &mut Criterion) {
    TokenCounter::warm_up();
    let cfg = TrackConfig::new(CountingConfig::default(), false).expect("default counting");
    let policy = LlmTracking::new(Arc::new(cfg));
    let chat = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Which lane is cheapest for a truck?"}]}"#;
    let anthropic = br#"{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Which lane is cheapest for a truck?"}]}"#;
    let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"Which lane is cheapest for a truck?"}]}]}"#;
    let responses =
        br#"{"model":"gpt-5-mini","stream":true,"input":"Which lane is cheapest for a truck?"}"#;
    type TrackCase = (
        &'static str,
        &'static str,
        &'static [u8],
        &'static str,
        &'static [u8],
        &'static [u8],
    );
    let cases: [TrackCase; 5] = [
        (
            "openai_chat_sse",
            "/v1/chat/completions",
            chat,
            "text/event-stream",
            include_bytes!("../src/llm/fixtures/openai_chat_stream_usage.sse"),
            b"\n\n",
        ),
        (
            "responses_sse",
            "/v1/responses",
            responses,
            "text/event-stream",
            include_bytes!("../src/llm/fixtures/responses_stream.sse"),
            b"\n\n",
        ),
        (
            "anthropic_sse",
            "/v1/messages",
            anthropic,
            "text/event-stream",
            include_bytes!("../src/llm/fixtures/anthropic_stream.sse"),
            b"\n\n",
        ),
        (
            "gemini_sse",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            gemini,
            "text/event-stream",
            include_bytes!("../src/llm/fixtures/gemini_stream.sse"),
            b"\n\n",
        ),
        (
            "gemini_json_array",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            gemini,
            "application/json",
            include_bytes!("../src/llm/fixtures/gemini_stream_array.json"),
            b"\n,",
        ),
    ];
    let mut g = c.benchmark_group("tracker_per_chunk");
    for (name, path, req, ct, body, sep) in cases {
        let chunks = per_event_chunks(body, sep);
        g.throughput(Throughput::Elements(chunks.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| tracked(&policy, path, req, ct, &chunks))
        });
    }
    g.finish();

    // 200 chunks as loadgen's `--sse-chunks 200` streams them, with and without usage.
    let mut body = Vec::new();
    for i in 0..198 {
        body.extend_from_slice(
            format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}]}}\n\n"
            )
            .as_bytes(),
        );
    }
    let usage = b"data: {\"id\":\"chatcmpl-bench\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":396,\"total_tokens\":416}}\n\n";
    let mut with_usage = body.clone();
    with_usage.extend_from_slice(usage);
    with_usage.extend_from_slice(b"data: [DONE]\n\n");
    body.extend_from_slice(b"data: {\"id\":\"chatcmpl-bench\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
    body.extend_from_slice(b"data: [DONE]\n\n");
    let mut g = c.benchmark_group("tracker_200_chunks");
    for (name, stream) in [("usage_reported", &with_usage), ("usage_counted", &body)] {
        let chunks = per_event_chunks(stream, b"\n\n");
        g.throughput(Throughput::Elements(chunks.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                tracked(
                    &policy,
                    "/v1/chat/completions",
                    chat,
                    "text/event-stream",
                    &chunks,
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, counting, extraction, tracker);
criterion_main!(benches);
