//! Fixture tests: every API's request and response shapes (fixtures in `fixtures/`, written
//! for this repository in the documented shapes), the usage traps, and chunk-boundary
//! independence (every fixture fed split at every byte offset, and at many random offsets,
//! in LF, CRLF and CR line-end forms, must give the same summary).

use super::detect::{Endpoint, StreamShape};
use super::response::{Limits, MAX_CHOICES};
use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("fixtures/", $name)).as_slice()
    };
}

fn feed_chunks(api: Api, format: ResponseFormat, chunks: &[&[u8]]) -> ResponseSummary {
    let mut acc = ResponseAccumulator::new(api, format);
    for c in chunks {
        acc.feed(c);
    }
    acc.finish()
}

fn whole(api: Api, format: ResponseFormat, body: &[u8]) -> ResponseSummary {
    feed_chunks(api, format, &[body])
}

/// A small deterministic generator (no seed files, no flakiness).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % bound.max(1)
    }
}

/// Same summary whatever the chunking: one cut at every offset, then 300 random multi-cuts
/// (including empty chunks and single bytes).
fn assert_split_invariant(api: Api, format: ResponseFormat, body: &[u8]) -> ResponseSummary {
    let expected = whole(api, format, body);
    for i in 0..=body.len() {
        let got = feed_chunks(api, format, &[&body[..i], &body[i..]]);
        assert_eq!(got, expected, "split at byte {i}");
    }
    let mut rng = Lcg(body.len() as u64);
    for round in 0..300 {
        let mut cuts: Vec<usize> = (0..1 + rng.next(12))
            .map(|_| rng.next(body.len() + 1))
            .collect();
        cuts.push(0);
        cuts.push(body.len());
        cuts.sort_unstable();
        let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &body[w[0]..w[1]]).collect();
        let got = feed_chunks(api, format, &chunks);
        assert_eq!(got, expected, "round {round}, cuts {cuts:?}");
    }
    expected
}

/// An SSE fixture in LF form, and the same with CRLF, lone CR, and comments between events:
/// all split-invariant and all equal.
fn sse_all_forms(api: Api, body: &[u8]) -> ResponseSummary {
    let lf = assert_split_invariant(api, ResponseFormat::Sse, body);
    let text = std::str::from_utf8(body).unwrap();
    let crlf = text.replace('\n', "\r\n");
    let cr = text.replace('\n', "\r");
    let commented = text.replace("\n\n", "\n\n: keep-alive\n\n:\n");
    for form in [crlf, cr, commented] {
        let got = assert_split_invariant(api, ResponseFormat::Sse, form.as_bytes());
        assert_eq!(got, lf);
    }
    lf
}

fn usage(
    input: Option<u64>,
    output: Option<u64>,
    cached: Option<u64>,
    creation: Option<u64>,
    reasoning: Option<u64>,
) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        cache_creation_input_tokens: creation,
        reasoning_tokens: reasoning,
        anomaly: false,
    }
}

// ---------------------------------------------------------------- responses: OpenAI Chat

#[test]
fn openai_chat_stream_usage_only_in_the_include_usage_chunk() {
    let body = fixture!("openai_chat_stream_usage.sse");
    let s = sse_all_forms(Api::OpenAiChat, body);
    assert_eq!(s.text(), "Tolls are paid at the gate.");
    assert_eq!(s.usage, usage(Some(31), Some(9), Some(0), None, Some(0)));
    assert_eq!(s.usage.total_tokens(), Some(40));
    assert!(s.complete);
    assert_eq!(s.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(s.framing_error, None);

    // Every chunk before the last one says `usage: null`: nothing is reported yet.
    let cut = std::str::from_utf8(body)
        .unwrap()
        .find("\"choices\":[]")
        .unwrap();
    let early = whole(Api::OpenAiChat, ResponseFormat::Sse, &body[..cut]);
    assert!(!early.usage.is_reported());
    assert!(!early.complete);
}

#[test]
fn openai_chat_stream_null_choices_reasoning_and_tool_calls() {
    let s = sse_all_forms(
        Api::OpenAiChat,
        fixture!("openai_chat_stream_null_choices.sse"),
    );
    assert_eq!(s.choices, vec!["{\"amount\": 3}".to_owned()]);
    assert_eq!(s.reasoning, "Think about tolls.");
    assert_eq!(
        s.usage,
        usage(Some(120), Some(75), Some(64), None, Some(64))
    );
    assert!(s.complete);
}

#[test]
fn openai_stream_without_usage_is_counted_from_the_text() {
    let s = sse_all_forms(Api::OpenAiChat, fixture!("openai_chat_stream_no_usage.sse"));
    // Two choices interleaved: each keeps its own text.
    assert_eq!(
        s.choices,
        vec!["hello world".to_owned(), "bonjour world".to_owned()]
    );
    assert!(!s.usage.is_reported());
    assert!(s.complete);
    let counter = TokenCounter::default();
    let f = s.final_usage(&counter, "gpt-4o", 17);
    assert_eq!(f.input_tokens, 17);
    assert_eq!(f.input_source, UsageSource::Counted);
    let expected = counter.count(Api::OpenAiChat, "gpt-4o", "hello world")
        + counter.count(Api::OpenAiChat, "gpt-4o", "bonjour world");
    assert_eq!(f.output_tokens, expected);
    assert!(f.output_tokens >= 4);
    assert_eq!(f.output_source, UsageSource::Counted);
}

#[test]
fn interrupted_stream_is_counted_not_lost() {
    let body = fixture!("openai_chat_stream_usage.sse");
    let cut = std::str::from_utf8(body)
        .unwrap()
        .find("finish_reason\":\"stop")
        .unwrap();
    let s = whole(Api::OpenAiChat, ResponseFormat::Sse, &body[..cut]);
    assert!(!s.complete);
    assert_eq!(s.text(), "Tolls are paid at the gate.");
    let f = s.final_usage(&TokenCounter::default(), "gpt-4o-mini", 31);
    assert_eq!(f.input_tokens, 31);
    assert_eq!(
        f.output_tokens,
        TokenCounter::default().count(
            Api::OpenAiChat,
            "gpt-4o-mini",
            "Tolls are paid at the gate."
        )
    );
}

#[test]
fn openai_chat_json_choices_cached_and_reasoning() {
    let s = assert_split_invariant(
        Api::OpenAiChat,
        ResponseFormat::Json,
        fixture!("openai_chat.json"),
    );
    assert_eq!(
        s.choices,
        vec![
            "First answer.".to_owned(),
            "{\"plate\":\"AB-123\"}".to_owned()
        ]
    );
    assert_eq!(
        s.usage,
        usage(Some(2048), Some(300), Some(1920), None, Some(128))
    );
    assert!(s.complete);
    let f = s.final_usage(&TokenCounter::default(), "gpt-4.1", 0);
    assert_eq!(
        (f.input_tokens, f.output_tokens, f.total_tokens()),
        (2048, 300, 2348)
    );
    assert_eq!(f.output_source, UsageSource::Reported);
}

#[test]
fn openai_completions_stream_and_embeddings() {
    let s = sse_all_forms(
        Api::OpenAiCompletions,
        fixture!("openai_completions_stream.sse"),
    );
    assert_eq!(s.text(), "Once upon a toll");
    assert_eq!(s.usage, usage(Some(5), Some(4), None, None, None));

    let s = assert_split_invariant(
        Api::OpenAiEmbeddings,
        ResponseFormat::Json,
        fixture!("openai_embeddings.json"),
    );
    assert_eq!(s.usage, usage(Some(8), Some(0), None, None, None));
    assert_eq!(s.text(), "");
}

#[test]
fn openai_error_body_is_recorded() {
    let s = whole(
        Api::OpenAiChat,
        ResponseFormat::Json,
        br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
    );
    assert_eq!(s.upstream_error.as_deref(), Some("Rate limit reached"));
    assert!(!s.complete);
    assert!(!s.usage.is_reported());
}

// ---------------------------------------------------------------- responses: Responses API

#[test]
fn responses_stream_completed_without_done() {
    let body = fixture!("responses_stream.sse");
    let s = sse_all_forms(Api::OpenAiResponses, body);
    // The text comes from the deltas once; `output_text.done` and `response.completed`
    // repeat it and must not double it.
    assert_eq!(s.text(), "The toll is 3 euros.");
    assert_eq!(s.reasoning, "Checking the rate.");
    assert_eq!(
        s.usage,
        usage(Some(412), Some(148), Some(256), None, Some(128))
    );
    assert!(s.complete);
    assert_eq!(s.model.as_deref(), Some("gpt-5-mini-2025-08-07"));

    let cut = std::str::from_utf8(body)
        .unwrap()
        .find("event: response.completed")
        .unwrap();
    let early = whole(Api::OpenAiResponses, ResponseFormat::Sse, &body[..cut]);
    assert!(!early.complete);
    assert!(!early.usage.is_reported());
}

#[test]
fn responses_json_output_items() {
    let s = assert_split_invariant(
        Api::OpenAiResponses,
        ResponseFormat::Json,
        fixture!("responses.json"),
    );
    assert_eq!(s.text(), "{\"lane\":4}Gate 4 is open.");
    assert_eq!(s.reasoning, "Short plan.");
    assert_eq!(s.usage, usage(Some(90), Some(22), Some(0), None, Some(0)));
    assert!(s.complete);
}

#[test]
fn responses_failed_and_error_events() {
    let body = b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"},\"usage\":{\"input_tokens\":7,\"output_tokens\":0,\"total_tokens\":7}}}\n\n";
    let s = whole(Api::OpenAiResponses, ResponseFormat::Sse, body);
    assert!(s.complete);
    assert_eq!(s.upstream_error.as_deref(), Some("boom"));
    assert_eq!(s.usage.input_tokens, Some(7));
    let s = whole(
        Api::OpenAiResponses,
        ResponseFormat::Sse,
        b"event: error\ndata: {\"type\":\"error\",\"code\":\"x\",\"message\":\"overloaded\"}\n\n",
    );
    assert_eq!(s.upstream_error.as_deref(), Some("overloaded"));
}

// ---------------------------------------------------------------- responses: Anthropic

#[test]
fn anthropic_stream_input_from_message_start_output_cumulative_cache_separate() {
    let s = sse_all_forms(Api::AnthropicMessages, fixture!("anthropic_stream.sse"));
    assert_eq!(s.text(), "Use lane two.{\"lane\": 2}");
    assert_eq!(s.reasoning, "The driver asks about lanes.");
    // input = 25 + 100 written to the cache + 2000 read from it; output is the cumulative
    // 57 from message_delta (not 1 + 57).
    assert_eq!(
        s.usage,
        usage(Some(2125), Some(57), Some(2000), Some(100), None)
    );
    assert!(s.complete);
    assert_eq!(s.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
}

#[test]
fn anthropic_message_delta_cannot_lower_input() {
    let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":500,\"output_tokens\":1}}}\n\n\
                event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":0,\"output_tokens\":10}}\n\n\
                event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":12}}\n\n";
    let s = whole(Api::AnthropicMessages, ResponseFormat::Sse, body.as_bytes());
    assert_eq!(s.usage.input_tokens, Some(500));
    assert_eq!(s.usage.output_tokens, Some(12));
    assert!(!s.complete);
}

#[test]
fn anthropic_json_and_error_event() {
    let s = assert_split_invariant(
        Api::AnthropicMessages,
        ResponseFormat::Json,
        fixture!("anthropic.json"),
    );
    assert_eq!(s.text(), "Lane three is free.{\"lane\":3}");
    assert_eq!(s.usage, usage(Some(350), Some(40), Some(50), Some(0), None));
    assert!(s.complete);

    let s = whole(
        Api::AnthropicMessages,
        ResponseFormat::Sse,
        b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    );
    assert_eq!(s.upstream_error.as_deref(), Some("Overloaded"));
}

// ---------------------------------------------------------------- responses: Gemini, Vertex

#[test]
fn gemini_sse_candidates_thoughts_and_repeated_usage() {
    for api in [Api::Gemini, Api::VertexAi] {
        let s = sse_all_forms(api, fixture!("gemini_stream.sse"));
        // Candidate 0 has no `index` on the wire; candidate 1 does.
        assert_eq!(
            s.choices,
            vec!["Take lane five.".to_owned(), "Lane one.".to_owned()]
        );
        assert_eq!(s.reasoning, "Weighing the lanes.");
        // Latest usageMetadata wins (not summed over chunks): input 40 + 4 tool-use prompt,
        // output 12 candidates + 30 thoughts.
        assert_eq!(s.usage, usage(Some(44), Some(42), Some(16), None, Some(30)));
        assert!(s.complete);
        assert_eq!(s.model.as_deref(), Some("gemini-2.5-flash"));
    }
}

#[test]
fn gemini_json_array_stream_split_anywhere() {
    let body = fixture!("gemini_stream_array.json");
    let s = assert_split_invariant(Api::VertexAi, ResponseFormat::JsonArray, body);
    assert_eq!(s.text(), "Lanes: \"[1]\", {2} and 3.");
    assert_eq!(s.usage, usage(Some(11), Some(9), None, None, None));
    assert!(s.complete);
    assert_eq!(s.events, 2);
    // CRLF between elements.
    let crlf = std::str::from_utf8(body).unwrap().replace('\n', "\r\n");
    assert_eq!(
        assert_split_invariant(Api::VertexAi, ResponseFormat::JsonArray, crlf.as_bytes()),
        s
    );
    // Cut before the closing bracket: not complete (the finishReason says it is, though).
    let open = whole(
        Api::VertexAi,
        ResponseFormat::JsonArray,
        &body[..body.len() - 1],
    );
    assert_eq!(open.usage, s.usage);
}

#[test]
fn gemini_json_thoughts_and_function_call() {
    let s = assert_split_invariant(Api::Gemini, ResponseFormat::Json, fixture!("gemini.json"));
    assert_eq!(s.text(), "Lane six.{\"lane\":6}");
    assert_eq!(s.reasoning, "Plan first.");
    assert_eq!(s.usage, usage(Some(70), Some(35), None, None, Some(20)));
}

#[test]
fn gemini_errors_as_lone_object_and_blocked_prompt() {
    let s = whole(
        Api::Gemini,
        ResponseFormat::JsonArray,
        br#"{"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}"#,
    );
    assert_eq!(s.upstream_error.as_deref(), Some("Resource exhausted"));
    assert_eq!(s.framing_error, None);
    let s = whole(
        Api::Gemini,
        ResponseFormat::Json,
        br#"{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}}"#,
    );
    assert_eq!(s.upstream_error.as_deref(), Some("prompt blocked: SAFETY"));
    assert_eq!(s.usage.input_tokens, Some(9));
}

// ---------------------------------------------------------------- bad input

#[test]
fn absurd_usage_numbers_are_refused_and_counted_instead() {
    let s = sse_all_forms(Api::OpenAiChat, fixture!("absurd_usage.sse"));
    assert!(s.usage.anomaly);
    assert_eq!(s.usage.input_tokens, None);
    assert_eq!(s.usage.output_tokens, None);
    assert_eq!(s.usage.cached_input_tokens, None);
    assert_eq!(s.usage.reasoning_tokens, None);
    let f = s.final_usage(&TokenCounter::default(), "gpt-4o", 12);
    assert_eq!((f.input_tokens, f.output_tokens), (12, 2));
    assert_eq!(f.output_source, UsageSource::Counted);

    // Anthropic and Gemini numbers go through the same gate.
    let s = whole(
        Api::AnthropicMessages,
        ResponseFormat::Json,
        br#"{"type":"message","content":[],"usage":{"input_tokens":18446744073709551615,"output_tokens":-1,"cache_read_input_tokens":999999999}}"#,
    );
    assert!(s.usage.anomaly);
    assert_eq!(s.usage.input_tokens, None);
    assert_eq!(s.usage.output_tokens, None);
    let s = whole(
        Api::Gemini,
        ResponseFormat::Json,
        br#"{"usageMetadata":{"promptTokenCount":1000000000,"candidatesTokenCount":1000000000,"thoughtsTokenCount":1000000000,"toolUsePromptTokenCount":1000000000}}"#,
    );
    // The largest accepted values add up without overflow.
    assert_eq!(s.usage.input_tokens, Some(2 * MAX_USAGE_TOKENS));
    assert_eq!(s.usage.output_tokens, Some(2 * MAX_USAGE_TOKENS));
    assert!(!s.usage.anomaly);
}

#[test]
fn garbage_never_panics_and_is_reported() {
    let s = whole(
        Api::OpenAiChat,
        ResponseFormat::Sse,
        b"data: {not json\n\ndata: [DONE]\n\n",
    );
    assert!(s.framing_error.is_some());
    assert!(s.complete);
    let s = whole(Api::Gemini, ResponseFormat::JsonArray, b"<html>502</html>");
    assert!(s.framing_error.is_some());
    let s = whole(
        Api::AnthropicMessages,
        ResponseFormat::Json,
        b"upstream connect error",
    );
    assert!(s.framing_error.is_some());
    // Random bytes in every format and API, in random chunks.
    let mut rng = Lcg(7);
    for api in [
        Api::OpenAiChat,
        Api::OpenAiResponses,
        Api::AnthropicMessages,
        Api::Gemini,
    ] {
        for format in [
            ResponseFormat::Json,
            ResponseFormat::Sse,
            ResponseFormat::JsonArray,
        ] {
            for _ in 0..20 {
                let mut acc = ResponseAccumulator::new(api, format);
                for _ in 0..rng.next(20) {
                    let bytes: Vec<u8> = (0..rng.next(300))
                        .map(|_| b"data: {}[]\"\\\n\r:,x\x00\xff"[rng.next(17)])
                        .collect();
                    acc.feed(&bytes);
                }
                let _ = acc.finish();
            }
        }
    }
}

#[test]
fn over_long_event_stops_reading_without_growth() {
    let limits = Limits {
        max_event_bytes: 256,
        max_json_bytes: 256,
        max_text_bytes: 1 << 20,
    };
    let mut acc = ResponseAccumulator::with_limits(Api::OpenAiChat, ResponseFormat::Sse, limits);
    acc.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\n");
    acc.feed(b"data: ");
    for _ in 0..100 {
        acc.feed(&[b'x'; 64]);
    }
    acc.feed(
        b"\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n",
    );
    let s = acc.finish();
    assert_eq!(s.text(), "ok");
    assert!(s.framing_error.unwrap().contains("256"));
    assert!(!s.usage.is_reported());

    let mut acc = ResponseAccumulator::with_limits(Api::OpenAiChat, ResponseFormat::Json, limits);
    acc.feed(&[b' '; 200]);
    acc.feed(&[b' '; 200]);
    assert!(acc.finish().framing_error.is_some());
}

#[test]
fn text_is_bounded_and_choice_indexes_cannot_size_allocations() {
    let limits = Limits {
        max_text_bytes: 8,
        ..Limits::default()
    };
    let mut acc = ResponseAccumulator::with_limits(Api::OpenAiChat, ResponseFormat::Sse, limits);
    acc.feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"abcdef\xc3\xa9\xc3\xa9\xc3\xa9\"}}]}\n\n");
    acc.feed(b"data: {\"choices\":[{\"index\":4000000000,\"delta\":{\"content\":\"zz\"}}]}\n\n");
    let s = acc.finish();
    assert_eq!(s.choices, vec!["abcdef\u{e9}".to_owned()]);
    assert_eq!(s.dropped_text_chars, 4);
    let f = s.final_usage(&TokenCounter::default(), "gpt-4o", 0);
    assert!(f.output_tokens >= 2);

    let mut acc = ResponseAccumulator::new(Api::Gemini, ResponseFormat::Sse);
    acc.feed(b"data: {\"candidates\":[{\"index\":99999999999,\"content\":{\"parts\":[{\"text\":\"far\"}]}}]}\n\n");
    let s = acc.finish();
    assert_eq!(s.choices.len(), MAX_CHOICES);
    assert_eq!(s.choices[MAX_CHOICES - 1], "far");
}

#[test]
fn response_format_from_content_type_and_path() {
    assert_eq!(
        ResponseFormat::detect(None, Some("text/event-stream; charset=utf-8")),
        ResponseFormat::Sse
    );
    assert_eq!(
        ResponseFormat::detect(Some(StreamShape::JsonArray), Some("Text/Event-Stream")),
        ResponseFormat::Sse
    );
    assert_eq!(
        ResponseFormat::detect(
            Some(StreamShape::JsonArray),
            Some("application/json; charset=UTF-8")
        ),
        ResponseFormat::JsonArray
    );
    assert_eq!(
        ResponseFormat::detect(None, Some("application/json")),
        ResponseFormat::Json
    );
    assert_eq!(ResponseFormat::detect(None, None), ResponseFormat::Json);
    // A multi-byte character across byte 17 must not panic.
    assert_eq!(
        ResponseFormat::detect(None, Some("text/event-strea\u{e9}m")),
        ResponseFormat::Json
    );
}

// ---------------------------------------------------------------- requests

fn ep(api: Api) -> Endpoint {
    Endpoint {
        api,
        path_model: None,
        path_stream: None,
    }
}

#[test]
fn openai_chat_request() {
    let r = parse_request(&ep(Api::OpenAiChat), fixture!("req_openai_chat.json")).unwrap();
    assert_eq!(r.model.as_deref(), Some("gpt-4o"));
    assert_eq!(
        r.prompt,
        "Answer as a toll clerk.\nWhat does lane 4 cost?\nprice\n{\"lane\":4}\n3 euros\nAnd for a truck?"
    );
    assert!(r.tools.contains("\"price\""));
    assert!(r.stream && r.include_usage);
    // The larger of max_tokens and max_completion_tokens.
    assert_eq!(r.max_output_tokens, Some(200));
    assert_eq!(r.n, Some(2));
    assert_eq!(r.max_total_output_tokens(), Some(400));
    assert_eq!((r.messages, r.media_parts), (5, 1));

    let counter = TokenCounter::default();
    let prompt_only = counter.count(Api::OpenAiChat, "gpt-4o", &r.prompt);
    let tools = counter.count(Api::OpenAiChat, "gpt-4o", &r.tools);
    assert_eq!(
        counter.count_request(&r, None),
        prompt_only + tools + 5 * 3 + 3
    );
}

#[test]
fn responses_request_every_input_shape() {
    let r = parse_request(&ep(Api::OpenAiResponses), fixture!("req_responses.json")).unwrap();
    assert_eq!(
        r.prompt,
        "Be brief.\nOpen the gate.\nopen_gate\n{\"lane\":1}\nopened\nDone.\nGate logic."
    );
    assert_eq!(r.max_output_tokens, Some(512));
    assert!(r.stream);
    assert_eq!(r.previous_response_id.as_deref(), Some("resp_0"));
    assert_eq!(r.media_parts, 1);
    let r = parse_request(
        &ep(Api::OpenAiResponses),
        br#"{"model":"gpt-5","input":"Hi"}"#,
    )
    .unwrap();
    assert_eq!((r.prompt.as_str(), r.messages, r.stream), ("Hi", 1, false));
}

#[test]
fn anthropic_request() {
    let r = parse_request(&ep(Api::AnthropicMessages), fixture!("req_anthropic.json")).unwrap();
    assert_eq!(
        r.prompt,
        "You run a toll road.\nWhich lane?\nCheck lanes.\nlanes\n{\"open\":true}\nlanes 2 and 5\nTariff sheet."
    );
    assert_eq!(r.max_output_tokens, Some(1024));
    assert!(r.stream);
    assert_eq!((r.messages, r.media_parts), (3, 1));
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5"));
}

#[test]
fn gemini_request_model_from_path() {
    let e = detect(
        "POST",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
        |_| None,
    )
    .unwrap();
    let r = parse_request(&e, fixture!("req_gemini.json")).unwrap();
    assert_eq!(r.model.as_deref(), Some("gemini-2.5-pro"));
    assert_eq!(
        r.prompt,
        "You are a toll assistant.\nPrice for lane 7?\nLet me check.\nprice\n{\"lane\":7}\n{\"euros\":4}"
    );
    assert!(r.stream);
    assert_eq!(r.stream_shape, Some(StreamShape::JsonArray));
    assert_eq!(r.max_output_tokens, Some(256));
    assert_eq!(r.n, Some(3));
    assert_eq!(r.max_total_output_tokens(), Some(768));
    assert_eq!(r.media_parts, 1);
    // snake_case spellings are accepted as well.
    let r = parse_request(
        &ep(Api::VertexAi),
        br#"{"contents":{"parts":[{"text":"x"}]},"generation_config":{"max_output_tokens":5,"candidate_count":2}}"#,
    )
    .unwrap();
    assert_eq!(
        (r.max_output_tokens, r.n, r.stream),
        (Some(5), Some(2), false)
    );
}

#[test]
fn completions_and_embeddings_inputs() {
    let p = |api, body: &[u8]| parse_request(&ep(api), body).unwrap();
    let r = p(
        Api::OpenAiCompletions,
        br#"{"model":"davinci-002","prompt":[[1,2,3],[4,5]],"max_tokens":7}"#,
    );
    assert_eq!((r.prompt_token_ids, r.max_output_tokens), (5, Some(7)));
    let r = p(
        Api::OpenAiCompletions,
        br#"{"prompt":[1,2,3],"suffix":"end"}"#,
    );
    assert_eq!((r.prompt_token_ids, r.prompt.as_str()), (3, "end"));
    let r = p(
        Api::OpenAiEmbeddings,
        br#"{"model":"text-embedding-3-small","input":["a","b"]}"#,
    );
    assert_eq!(r.prompt, "a\nb");
    let counter = TokenCounter::default();
    let r = p(
        Api::OpenAiEmbeddings,
        br#"{"model":"text-embedding-3-small","input":[[1,2,3,4]]}"#,
    );
    assert_eq!(counter.count_request(&r, None), 4);
}

#[test]
fn bad_requests_are_typed_errors() {
    let bad: &[(Api, &[u8])] = &[
        (Api::OpenAiChat, b"not json"),
        (Api::OpenAiChat, b"[1,2]"),
        (Api::OpenAiChat, b""),
        (Api::OpenAiChat, br#"{"messages":"hi"}"#),
        (Api::OpenAiChat, br#"{"messages":["hi"]}"#),
        (Api::OpenAiChat, br#"{"messages":[{"content":5}]}"#),
        (Api::OpenAiChat, br#"{"stream":"yes"}"#),
        (Api::OpenAiChat, br#"{"max_tokens":-1}"#),
        (Api::OpenAiChat, br#"{"max_tokens":1.5}"#),
        (Api::OpenAiChat, br#"{"max_tokens":1e400}"#),
        (Api::OpenAiChat, br#"{"n":"2"}"#),
        (Api::OpenAiChat, br#"{"model":5}"#),
        (Api::OpenAiChat, br#"{"stream_options":true}"#),
        (Api::OpenAiCompletions, br#"{"prompt":{"a":1}}"#),
        (Api::OpenAiCompletions, br#"{"prompt":[[1,-2]]}"#),
        (Api::OpenAiResponses, br#"{"input":5}"#),
        (Api::AnthropicMessages, br#"{"system":5}"#),
        (
            Api::AnthropicMessages,
            br#"{"messages":[{"content":[{"type":"tool_result","content":7}]}]}"#,
        ),
        (Api::Gemini, br#"{"contents":5}"#),
        (Api::Gemini, br#"{"contents":[{"parts":{"text":"x"}}]}"#),
        (Api::Gemini, br#"{"generationConfig":[]}"#),
        (
            Api::Gemini,
            br#"{"generationConfig":{"maxOutputTokens":"9"}}"#,
        ),
    ];
    for (api, body) in bad {
        let r = parse_request(&ep(*api), body);
        assert!(r.is_err(), "{api:?} {}", String::from_utf8_lossy(body));
    }
    // Deep nesting hits serde_json's recursion limit: an error, not a stack overflow.
    let deep = format!(
        "{{\"messages\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(matches!(
        parse_request(&ep(Api::OpenAiChat), deep.as_bytes()),
        Err(LlmError::Json(_))
    ));
    // Error messages name the field.
    let e = parse_request(&ep(Api::OpenAiChat), br#"{"max_tokens":"x"}"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field `max_tokens` must be a non-negative integer"
    );
}

#[test]
fn unknown_fields_and_parts_are_ignored() {
    let r = parse_request(
        &ep(Api::OpenAiChat),
        br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}},{"type":"text","text":"hi"}]}],"temperature":0.1,"future":{"x":1}}"#,
    )
    .unwrap();
    assert_eq!((r.prompt.as_str(), r.media_parts), ("hi", 1));
}
