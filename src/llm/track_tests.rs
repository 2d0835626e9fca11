//! The tracker on every format, driven as the stream drives it: the request hook, the
//! response headers, chunks through the pipeline's own [`ChunkRunner`], then [`finish`].

use super::*;
use crate::pipeline::chunk::ChunkRunner;
use crate::pipeline::{Outcome, Step};
use crate::vars::{Headers, RequestInfo, ResponseInfo};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("fixtures/", $name)).as_slice()
    };
}

struct Harness {
    step: Step,
    spec: ChunkSpec,
    ex: Exchange,
    runner: Option<ChunkRunner>,
}

impl Harness {
    fn new(include_usage: bool) -> Self {
        let cfg = TrackConfig::new(CountingConfig::default(), include_usage).unwrap();
        let policy: Arc<dyn Policy> = Arc::new(LlmTracking::new(Arc::new(cfg)));
        let spec = policy.hooks().response_chunks.unwrap();
        Self {
            step: Step {
                policy_name: STEP_NAME.into(),
                policy,
                condition: None,
                continue_on_error: false,
            },
            spec,
            ex: Exchange::default(),
            runner: None,
        }
    }

    /// Runs the request hook on `method path` with `body`.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Outcome {
        let mut h = Headers::new();
        h.push(":method".into(), method.into());
        h.push(":path".into(), path.into());
        for (n, v) in headers {
            h.push((*n).into(), (*v).into());
        }
        self.ex.request = RequestInfo::from_headers(h);
        self.ex.set_body(Direction::Request, Some(body.to_vec()));
        match self.step.policy.run(&mut self.ex, Direction::Request) {
            Hook::Ready(o) => o,
            Hook::Pending(_) => panic!("the tracker never waits"),
        }
    }

    fn response(&mut self, status: u16, content_type: &str) {
        let mut h = Headers::new();
        h.push(":status".into(), status.to_string());
        h.push("content-type".into(), content_type.into());
        self.ex.response = Some(ResponseInfo { status, headers: h });
        assert!(matches!(
            self.step.policy.run(&mut self.ex, Direction::Response),
            Hook::Ready(Outcome::Continue)
        ));
        self.runner = Some(ChunkRunner::start(
            &[(self.step.clone(), self.spec)],
            &self.ex,
        ));
    }

    /// Pushes `chunks` through the chunk path; the last ends the body when `eos`. Returns
    /// what the client would see.
    fn body(&mut self, chunks: &[&[u8]], eos: bool) -> Vec<u8> {
        let steps = [(self.step.clone(), self.spec)];
        let runner = self.runner.as_mut().unwrap();
        let mut seen = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let last = eos && i + 1 == chunks.len();
            let (data, end) = runner.push(&steps, &mut self.ex, c.to_vec(), last);
            seen.extend_from_slice(&data);
            if end {
                finish(&mut self.ex, ExchangeEnd::Completed);
            }
        }
        seen
    }

    fn usage(&self) -> &FinalUsage {
        self.ex.state.llm_usage.as_ref().expect("usage set")
    }

    fn var(&self, name: &str) -> String {
        self.ex
            .lookup(name)
            .map(|v| v.into_owned())
            .unwrap_or_default()
    }
}

/// `body` cut every `n` bytes.
fn cut(body: &[u8], n: usize) -> Vec<&[u8]> {
    body.chunks(n).collect()
}

const CHAT: &[u8] =
    br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"What does lane 4 cost?"}]}"#;

#[test]
fn openai_stream_with_usage_split_anywhere() {
    for n in [1, 7, 64, 100_000] {
        let mut h = Harness::new(false);
        assert_eq!(
            h.request("POST", "/v1/chat/completions", &[], CHAT),
            Outcome::Continue
        );
        let prompt = h.ex.state.llm_prompt_tokens.unwrap();
        assert!(prompt > 5, "counted: {prompt}");
        assert_eq!(
            h.var("llm.prompt_tokens"),
            prompt.to_string(),
            "before the response"
        );
        assert_eq!(h.var("llm.completion_tokens"), "");
        h.response(200, "text/event-stream");
        let body = fixture!("openai_chat_stream_usage.sse");
        let seen = h.body(&cut(body, n), true);
        assert_eq!(seen, body, "passed untouched");
        let u = h.usage();
        assert_eq!((u.input_tokens, u.output_tokens), (31, 9));
        assert_eq!(u.input_source, UsageSource::Reported);
        assert_eq!(h.var("llm.total_tokens"), "40");
        assert_eq!(h.var("llm.prompt_tokens"), "31");
        assert_eq!(h.var("llm.api"), "openai.chat_completions");
        assert_eq!(h.var("llm.model"), "gpt-4o-mini");
        assert_eq!(h.var("llm.stream"), "true");
        assert_eq!(h.var("llm.cached_tokens"), "0");
    }
}

#[test]
fn openai_stream_without_usage_is_counted_from_the_text() {
    let mut h = Harness::new(false);
    let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    h.request("POST", "/v1/chat/completions", &[], body);
    let prompt = h.ex.state.llm_prompt_tokens.unwrap();
    h.response(200, "text/event-stream; charset=utf-8");
    h.body(&cut(fixture!("openai_chat_stream_no_usage.sse"), 5), true);
    let u = h.usage();
    assert_eq!(u.input_tokens, prompt);
    assert_eq!(u.input_source, UsageSource::Counted);
    assert_eq!(u.output_source, UsageSource::Counted);
    assert!(u.output_tokens > 0);
}

#[test]
fn anthropic_stream() {
    let mut h = Harness::new(false);
    let req = br#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Which lane?"}]}"#;
    h.request(
        "POST",
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        req,
    );
    h.response(200, "text/event-stream");
    h.body(&cut(fixture!("anthropic_stream.sse"), 13), true);
    let u = h.usage();
    // input_tokens + cache reads + cache writes.
    assert_eq!((u.input_tokens, u.output_tokens), (2125, 57));
    assert_eq!(u.cached_input_tokens, 2000);
    assert_eq!(u.cache_creation_input_tokens, 100);
    assert_eq!(h.var("llm.api"), "anthropic.messages");
    assert_eq!(h.var("llm.cached_tokens"), "2000");
}

#[test]
fn gemini_sse_and_array_streams() {
    let mut h = Harness::new(false);
    let req = br#"{"contents":[{"role":"user","parts":[{"text":"Which lane?"}]}]}"#;
    h.request(
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        &[],
        req,
    );
    assert_eq!(h.var("llm.model"), "gemini-2.5-flash");
    assert_eq!(h.var("llm.stream"), "true");
    h.response(200, "text/event-stream");
    h.body(&cut(fixture!("gemini_stream.sse"), 11), true);
    let u = h.usage();
    // prompt + tool-use prompt; candidates + thoughts.
    assert_eq!((u.input_tokens, u.output_tokens), (44, 42));
    assert_eq!(u.reasoning_tokens, 30);
    assert_eq!(h.var("llm.reasoning_tokens"), "30");

    let mut h = Harness::new(false);
    h.request(
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        &[],
        req,
    );
    h.response(200, "application/json");
    h.body(&cut(fixture!("gemini_stream_array.json"), 9), true);
    assert_eq!((h.usage().input_tokens, h.usage().output_tokens), (11, 9));
}

#[test]
fn an_abort_charges_the_prompt_and_the_text_so_far() {
    let body = fixture!("openai_chat_stream_no_usage.sse");
    let mut whole = Harness::new(false);
    whole.request("POST", "/v1/chat/completions", &[], CHAT);
    whole.response(200, "text/event-stream");
    whole.body(&[body], true);
    let full = whole.usage().output_tokens;

    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    h.response(200, "text/event-stream");
    h.body(&[&body[..body.len() / 2]], false);
    assert!(h.ex.state.llm_usage.is_none(), "not before the end");
    finish(&mut h.ex, ExchangeEnd::Aborted);
    let u = h.usage().clone();
    assert_eq!(u.input_tokens, h.ex.state.llm_prompt_tokens.unwrap());
    assert!(
        u.output_tokens > 0 && u.output_tokens < full,
        "{} of {full}",
        u.output_tokens
    );
    // Once only.
    finish(&mut h.ex, ExchangeEnd::Completed);
    assert_eq!(h.usage(), &u);
}

#[test]
fn no_upstream_response_costs_the_prompt_only() {
    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    finish(&mut h.ex, ExchangeEnd::Answered);
    let u = h.usage();
    assert_eq!(u.input_tokens, h.ex.state.llm_prompt_tokens.unwrap());
    assert_eq!(u.output_tokens, 0);
}

#[test]
fn upstream_errors_are_not_charged_output() {
    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    h.response(429, "application/json");
    h.body(
        &[br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#],
        true,
    );
    let u = h.usage();
    assert_eq!((u.input_tokens, u.output_tokens), (0, 0));
    assert_eq!(h.var("llm.total_tokens"), "0");

    // An error event inside a 200 stream: what was generated before it.
    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    h.response(200, "text/event-stream");
    h.body(
        &[
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Lane four costs three\"}}]}\n\n",
            b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n",
        ],
        true,
    );
    assert!(h.usage().output_tokens > 0);
}

#[test]
fn garbage_and_absurd_usage_fall_back_to_counting() {
    for body in [
        &b"data: not json at all\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"[..],
        &b"\xff\xfe\x00garbage without any framing"[..],
        fixture!("absurd_usage.sse"),
    ] {
        let mut h = Harness::new(false);
        h.request("POST", "/v1/chat/completions", &[], CHAT);
        h.response(200, "text/event-stream");
        h.body(&cut(body, 3), true);
        let u = h.usage();
        assert_eq!(u.input_source, UsageSource::Counted);
        assert_eq!(u.input_tokens, h.ex.state.llm_prompt_tokens.unwrap());
        assert!(
            u.output_tokens < 1000,
            "no absurd number: {}",
            u.output_tokens
        );
    }
}

#[test]
fn buffered_json_and_a_held_body_are_read_once() {
    let body = fixture!("openai_chat.json");
    let expected = {
        let mut h = Harness::new(false);
        h.request("POST", "/v1/chat/completions", &[], CHAT);
        h.response(200, "application/json");
        h.body(&[body], true);
        h.usage().clone()
    };
    assert_eq!(expected.input_source, UsageSource::Reported);
    // A body step held the body: part of it passed the chunk path, the rest is handed over
    // whole before the body steps run, then the last chunk passes without being read again.
    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    h.response(200, "application/json");
    let (a, b) = body.split_at(body.len() / 3);
    h.body(&[a], false);
    whole_response(&mut h.ex, body);
    assert_eq!(h.usage(), &expected);
    h.body(&[b], true);
    assert_eq!(h.usage(), &expected);
}

#[test]
fn compressed_responses_are_counted_not_read() {
    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    let mut hd = Headers::new();
    hd.push(":status".into(), "200".into());
    hd.push("content-type".into(), "application/json".into());
    hd.push("content-encoding".into(), "gzip".into());
    h.ex.response = Some(ResponseInfo {
        status: 200,
        headers: hd,
    });
    on_response_headers(&mut h.ex);
    whole_response(&mut h.ex, b"\x1f\x8b\x08\x00binary");
    assert_eq!(h.usage().input_source, UsageSource::Counted);
    assert_eq!(h.usage().output_tokens, 0);
}

#[test]
fn unreadable_llm_bodies_are_answered_400() {
    for (body, says) in [
        (&b"not json"[..], "not valid JSON"),
        (&b""[..], "not valid JSON"),
        (&b"[1,2]"[..], "JSON object"),
        (&br#"{"model":"gpt-4o","messages":5}"#[..], "messages"),
        (&br#"{"model":7,"messages":[]}"#[..], "model"),
    ] {
        let mut h = Harness::new(false);
        let Outcome::Reject(f) = h.request("POST", "/v1/chat/completions", &[], body) else {
            panic!("{body:?} rejected")
        };
        assert_eq!((f.status, f.code.as_str()), (400, INVALID_REQUEST));
        assert!(f.message.contains(says), "{}", f.message);
        assert!(h.ex.state.llm.is_none() && h.ex.state.llm_tracker.is_none());
    }
}

#[test]
fn other_requests_leave_the_slots_empty() {
    let mut h = Harness::new(true);
    assert_eq!(h.request("GET", "/v1/models", &[], b""), Outcome::Continue);
    assert_eq!(
        h.request("POST", "/v1/files", &[], b"garbage"),
        Outcome::Continue
    );
    assert!(h.ex.state.llm.is_none() && h.ex.state.llm_prompt_tokens.is_none());
    h.response(200, "application/json");
    assert_eq!(h.body(&[b"{\"data\":[]}"], true), b"{\"data\":[]}");
    finish(&mut h.ex, ExchangeEnd::Completed);
    assert!(h.ex.state.llm_usage.is_none());
    assert_eq!(h.var("llm.api"), "");
}

#[test]
fn include_usage_is_added_and_its_chunk_dropped() {
    let mut h = Harness::new(true);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    assert!(h.ex.request_body_replaced);
    let sent: serde_json::Value =
        serde_json::from_slice(h.ex.request_body.as_deref().unwrap()).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["messages"][0]["content"], "What does lane 4 cost?");
    assert!(
        !h.ex.state.llm.as_ref().unwrap().include_usage,
        "as the client asked"
    );
    h.response(200, "text/event-stream");
    let body = fixture!("openai_chat_stream_usage.sse");
    for n in [1, 10, 1000] {
        let mut h2 = Harness::new(true);
        h2.request("POST", "/v1/chat/completions", &[], CHAT);
        h2.response(200, "text/event-stream");
        let seen = String::from_utf8(h2.body(&cut(body, n), true)).unwrap();
        assert!(!seen.contains("\"usage\":{"), "usage chunk dropped: {seen}");
        assert!(
            seen.contains("Tolls are") && seen.ends_with("data: [DONE]\n\n"),
            "{seen}"
        );
        assert_eq!(h2.var("llm.total_tokens"), "40", "still recorded");
    }

    // A client that asked keeps its usage chunk; other APIs are left alone.
    let mut h = Harness::new(true);
    let asked = br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    h.request("POST", "/v1/chat/completions", &[], asked);
    assert!(!h.ex.request_body_replaced);
    h.response(200, "text/event-stream");
    assert_eq!(h.body(&[body], true), body);
    for (path, req) in [
        ("/v1/chat/completions", &br#"{"model":"gpt-4o","messages":[]}"#[..]),
        ("/v1/messages", &br#"{"model":"claude","max_tokens":5,"stream":true,"messages":[]}"#[..]),
        ("/v1/chat/completions", &br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},"messages":[]}"#[..]),
    ] {
        let mut h = Harness::new(true);
        h.request("POST", path, &[], req);
        assert!(!h.ex.request_body_replaced, "{path}");
    }
}

#[test]
fn usage_only_events_are_recognised() {
    assert!(is_usage_only(
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"
    ));
    assert!(is_usage_only(
        b"data: {\"choices\":null,\"usage\":{\"prompt_tokens\":1}}\n\n"
    ));
    assert!(is_usage_only(
        b"data:{\"usage\":{\"prompt_tokens\":1}}\r\n\r\n"
    ));
    assert!(!is_usage_only(
        b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n"
    ));
    assert!(!is_usage_only(
        b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\n"
    ));
    assert!(!is_usage_only(b"data: [DONE]\n\n"));
    assert!(!is_usage_only(b"data: {\"usage\": broken\n\n"));
}

#[test]
fn llm_cost_resolves_from_its_slot() {
    let mut ex = Exchange::default();
    assert!(ex.lookup("llm.cost").is_none());
    ex.state.llm_cost = Some(0.0125);
    assert_eq!(ex.lookup("llm.cost").as_deref(), Some("0.0125"));
    let mut names = Vec::new();
    ex.for_each_var(&mut |n, _| names.push(n.to_owned()));
    assert_eq!(names, ["llm.cost"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_huge_prompt_is_counted_off_the_worker_thread() {
    let text = "lane four costs three euros, ".repeat(4000);
    assert!(text.len() > INLINE_COUNT_BYTES);
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o", "messages": [{"role": "user", "content": text}]
    }))
    .unwrap();
    let mut h = Harness::new(false);
    let mut hd = Headers::new();
    hd.push(":method".into(), "POST".into());
    hd.push(":path".into(), "/v1/chat/completions".into());
    h.ex.request = RequestInfo::from_headers(hd);
    h.ex.set_body(Direction::Request, Some(body.clone()));
    let Hook::Pending(fut) = h.step.policy.run(&mut h.ex, Direction::Request) else {
        panic!("counted on the blocking pool")
    };
    assert_eq!(fut.await, Outcome::Continue);
    let ep = crate::llm::detect("POST", "/v1/chat/completions", |_| None).unwrap();
    let expected = TokenCounter::default()
        .count_request(&crate::llm::parse_request(&ep, &body).unwrap(), None);
    assert_eq!(h.ex.state.llm_prompt_tokens, Some(expected));
    assert!(h.ex.state.llm_tracker.is_some() && h.ex.state.llm.is_some());
}

#[test]
fn an_aborted_anthropic_stream_is_charged_the_text_that_streamed() {
    let body = fixture!("anthropic_stream.sse");
    let text = std::str::from_utf8(body).unwrap();
    // Up to and including the first text delta: message_start said output_tokens 1.
    let cut = text.find("event: content_block_stop").unwrap();
    let mut h = Harness::new(false);
    let req = br#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Which lane?"}]}"#;
    h.request("POST", "/v1/messages", &[], req);
    h.response(200, "text/event-stream");
    h.body(&[&body[..cut]], false);
    finish(&mut h.ex, ExchangeEnd::Aborted);
    let u = h.usage();
    assert_eq!(u.input_tokens, 2125, "reported in message_start");
    assert_eq!(u.input_source, UsageSource::Reported);
    assert!(
        u.output_tokens > 1,
        "the streamed thinking is counted: {}",
        u.output_tokens
    );
    assert_eq!(u.output_source, UsageSource::Counted);
}

#[test]
fn llm_variables_in_conditions_and_templates() {
    let mut h = Harness::new(false);
    h.request("POST", "/v1/chat/completions", &[], CHAT);
    h.response(200, "text/event-stream");
    h.body(&[fixture!("openai_chat_stream_usage.sse")], true);
    let cond = |c: &str| crate::expr::Condition::compile(c).unwrap().eval(&h.ex);
    assert!(cond("llm.total_tokens > 10"));
    assert!(cond("llm.total_tokens == 40 && llm.stream"));
    assert!(cond(
        "llm.api == 'openai.chat_completions' && llm.model.startsWith('gpt-4o')"
    ));
    assert!(!cond("llm.completion_tokens > 9"));
    let t = crate::expr::Template::compile(
        "{llm.prompt_tokens}+{llm.completion_tokens}={llm.total_tokens}",
    )
    .unwrap();
    assert_eq!(t.render(&h.ex), "31+9=40");
}

#[test]
fn usage_values_are_spotted_without_parsing() {
    assert!(!has_usage_value(
        b"data: {\"choices\":[],\"usage\":null}\n\n"
    ));
    assert!(!has_usage_value(
        b"data: {\"usage\" : null}\n\ndata: {\"x\":1}\n\n"
    ));
    assert!(has_usage_value(
        b"data: {\"usage\":null}\n\ndata: {\"usage\":{\"a\":1}}\n\n"
    ));
    assert!(has_usage_value(b"data: {\"usage\": {}}"));
    assert!(
        has_usage_value(b"data: {\"usage\""),
        "a cut value is looked at"
    );
    assert!(!has_usage_value(b"data: {\"choices\":[]}"));
}
