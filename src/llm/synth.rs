//! Answers written by tollgate in an API's own response format: a semantic-cache hit is
//! served as the upstream would have served it, as one JSON body or, for a streaming
//! request, as the event stream the API's SDK reads (every event type its stream helpers
//! expect, in order, ending with the API's end marker).
//!
//! The text is one assistant message; usage reports no tokens (nothing was generated).

use serde_json::{json, Value};

use super::detect::StreamShape;
use super::Api;

/// What to write: the request's API and stream mode, and the answer.
#[derive(Debug, Clone)]
pub struct Synth<'a> {
    pub api: Api,
    /// The request asked for a stream (`stream: true`, or a streaming Gemini path).
    pub stream: bool,
    /// Gemini's streaming path without `alt=sse` streams one JSON array.
    pub stream_shape: Option<StreamShape>,
    /// OpenAI `stream_options.include_usage`: a usage chunk before `[DONE]`.
    pub include_usage: bool,
    pub model: &'a str,
    pub text: &'a str,
    /// The response id (`chatcmpl-…`, `msg_…`, `resp_…` prefixes are added).
    pub id: &'a str,
    /// Unix seconds.
    pub created: i64,
}

/// A written answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

const SSE: &str = "text/event-stream";
const JSON: &str = "application/json";

/// `None` for APIs that generate no text (embeddings).
pub fn write(s: &Synth<'_>) -> Option<Written> {
    let sse_data = |events: &[Value]| {
        let mut body = Vec::new();
        for e in events {
            body.extend_from_slice(b"data: ");
            body.extend_from_slice(e.to_string().as_bytes());
            body.extend_from_slice(b"\n\n");
        }
        body
    };
    let named = |events: &[(&str, Value)]| {
        let mut body = Vec::new();
        for (name, e) in events {
            body.extend_from_slice(format!("event: {name}\ndata: {e}\n\n").as_bytes());
        }
        body
    };
    let w = match s.api {
        Api::OpenAiEmbeddings => return None,
        Api::OpenAiChat => {
            let id = format!("chatcmpl-{}", s.id);
            if s.stream {
                let chunk = |delta: Value, finish: Value| {
                    json!({"id": id, "object": "chat.completion.chunk", "created": s.created,
                        "model": s.model, "choices": [{"index": 0, "delta": delta,
                        "logprobs": null, "finish_reason": finish}]})
                };
                let mut events = vec![
                    chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                    chunk(json!({"content": s.text}), Value::Null),
                    chunk(json!({}), json!("stop")),
                ];
                if s.include_usage {
                    events.push(json!({"id": id, "object": "chat.completion.chunk",
                        "created": s.created, "model": s.model, "choices": [],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}));
                }
                let mut body = sse_data(&events);
                body.extend_from_slice(b"data: [DONE]\n\n");
                Written {
                    content_type: SSE,
                    body,
                }
            } else {
                let v = json!({"id": id, "object": "chat.completion", "created": s.created,
                    "model": s.model, "choices": [{"index": 0, "message": {"role": "assistant",
                    "content": s.text, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}});
                Written {
                    content_type: JSON,
                    body: v.to_string().into_bytes(),
                }
            }
        }
        Api::OpenAiCompletions => {
            let id = format!("cmpl-{}", s.id);
            let v = |text: &str, finish: Value| {
                json!({"id": id, "object": "text_completion", "created": s.created,
                    "model": s.model, "choices": [{"index": 0, "text": text, "logprobs": null,
                    "finish_reason": finish}]})
            };
            if s.stream {
                let mut body = sse_data(&[v(s.text, Value::Null), v("", json!("stop"))]);
                body.extend_from_slice(b"data: [DONE]\n\n");
                Written {
                    content_type: SSE,
                    body,
                }
            } else {
                let mut whole = v(s.text, json!("stop"));
                whole["usage"] =
                    json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
                Written {
                    content_type: JSON,
                    body: whole.to_string().into_bytes(),
                }
            }
        }
        Api::OpenAiResponses => {
            let id = format!("resp_{}", s.id);
            let msg_id = format!("msg_{}", s.id);
            let part = json!({"type": "output_text", "text": s.text, "annotations": []});
            let item = json!({"id": msg_id, "type": "message", "status": "completed",
                "role": "assistant", "content": [part]});
            let response = |status: &str, output: Value| {
                json!({"id": id, "object": "response", "created_at": s.created,
                    "status": status, "model": s.model, "output": output,
                    "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
                    "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0}}})
            };
            if s.stream {
                let empty_item = json!({"id": msg_id, "type": "message",
                    "status": "in_progress", "role": "assistant", "content": []});
                let empty_part = json!({"type": "output_text", "text": "", "annotations": []});
                let events: Vec<(&str, Value)> = vec![
                    (
                        "response.created",
                        json!({"type": "response.created", "sequence_number": 0,
                        "response": response("in_progress", json!([]))}),
                    ),
                    (
                        "response.output_item.added",
                        json!({"type": "response.output_item.added",
                        "sequence_number": 1, "output_index": 0, "item": empty_item}),
                    ),
                    (
                        "response.content_part.added",
                        json!({"type": "response.content_part.added",
                        "sequence_number": 2, "item_id": msg_id, "output_index": 0,
                        "content_index": 0, "part": empty_part}),
                    ),
                    (
                        "response.output_text.delta",
                        json!({"type": "response.output_text.delta",
                        "sequence_number": 3, "item_id": msg_id, "output_index": 0,
                        "content_index": 0, "delta": s.text, "logprobs": []}),
                    ),
                    (
                        "response.output_text.done",
                        json!({"type": "response.output_text.done",
                        "sequence_number": 4, "item_id": msg_id, "output_index": 0,
                        "content_index": 0, "text": s.text, "logprobs": []}),
                    ),
                    (
                        "response.content_part.done",
                        json!({"type": "response.content_part.done",
                        "sequence_number": 5, "item_id": msg_id, "output_index": 0,
                        "content_index": 0, "part": part}),
                    ),
                    (
                        "response.output_item.done",
                        json!({"type": "response.output_item.done",
                        "sequence_number": 6, "output_index": 0, "item": item}),
                    ),
                    (
                        "response.completed",
                        json!({"type": "response.completed",
                        "sequence_number": 7, "response": response("completed", json!([item]))}),
                    ),
                ];
                Written {
                    content_type: SSE,
                    body: named(&events),
                }
            } else {
                Written {
                    content_type: JSON,
                    body: response("completed", json!([item]))
                        .to_string()
                        .into_bytes(),
                }
            }
        }
        Api::AnthropicMessages => {
            let id = format!("msg_{}", s.id);
            let usage = json!({"input_tokens": 0, "output_tokens": 0});
            if s.stream {
                let events: Vec<(&str, Value)> = vec![
                    (
                        "message_start",
                        json!({"type": "message_start", "message": {"id": id,
                        "type": "message", "role": "assistant", "model": s.model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": usage}}),
                    ),
                    (
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
                    ),
                    (
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": s.text}}),
                    ),
                    (
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ),
                    (
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason":
                        "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 0}}),
                    ),
                    ("message_stop", json!({"type": "message_stop"})),
                ];
                Written {
                    content_type: SSE,
                    body: named(&events),
                }
            } else {
                let v = json!({"id": id, "type": "message", "role": "assistant",
                    "model": s.model, "content": [{"type": "text", "text": s.text}],
                    "stop_reason": "end_turn", "stop_sequence": null, "usage": usage});
                Written {
                    content_type: JSON,
                    body: v.to_string().into_bytes(),
                }
            }
        }
        Api::Gemini | Api::VertexAi => {
            let v = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": s.text}]},
                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 0, "candidatesTokenCount": 0,
                    "totalTokenCount": 0},
                "modelVersion": s.model, "responseId": s.id});
            match (s.stream, s.stream_shape) {
                (true, Some(StreamShape::JsonArray)) => Written {
                    content_type: JSON,
                    body: format!("[{v}]").into_bytes(),
                },
                (true, _) => Written {
                    content_type: SSE,
                    body: sse_data(&[v]),
                },
                (false, _) => Written {
                    content_type: JSON,
                    body: v.to_string().into_bytes(),
                },
            }
        }
    };
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ResponseAccumulator, ResponseFormat};

    fn synth(api: Api, stream: bool, shape: Option<StreamShape>) -> Written {
        write(&Synth {
            api,
            stream,
            stream_shape: shape,
            include_usage: true,
            model: "m-1",
            text: "Paris is the capital of France. \"Quoted\"\nnew line",
            id: "abc",
            created: 1_700_000_000,
        })
        .expect("a text API")
    }

    /// What tollgate writes, its own reader reads back whole: the same text, complete, no
    /// framing error, for every API and stream mode.
    #[test]
    fn every_format_reads_back_as_the_same_complete_answer() {
        let cases = [
            (Api::OpenAiChat, false, None),
            (Api::OpenAiChat, true, None),
            (Api::OpenAiCompletions, false, None),
            (Api::OpenAiCompletions, true, None),
            (Api::OpenAiResponses, false, None),
            (Api::OpenAiResponses, true, None),
            (Api::AnthropicMessages, false, None),
            (Api::AnthropicMessages, true, None),
            (Api::Gemini, false, None),
            (Api::Gemini, true, Some(StreamShape::Sse)),
            (Api::Gemini, true, Some(StreamShape::JsonArray)),
            (Api::VertexAi, true, Some(StreamShape::Sse)),
        ];
        for (api, stream, shape) in cases {
            let w = synth(api, stream, shape);
            let format = ResponseFormat::detect(shape, Some(w.content_type));
            let mut acc = ResponseAccumulator::new(api, format);
            // Fed in odd pieces, as a network would.
            for piece in w.body.chunks(7) {
                acc.feed(piece);
            }
            let s = acc.finish();
            assert_eq!(s.framing_error, None, "{api:?} stream={stream}");
            assert_eq!(s.upstream_error, None, "{api:?} stream={stream}");
            assert!(s.complete, "{api:?} stream={stream} not complete");
            assert_eq!(
                s.text(),
                "Paris is the capital of France. \"Quoted\"\nnew line",
                "{api:?} stream={stream}"
            );
        }
        assert!(write(&Synth {
            api: Api::OpenAiEmbeddings,
            stream: false,
            stream_shape: None,
            include_usage: false,
            model: "e",
            text: "",
            id: "x",
            created: 0,
        })
        .is_none());
    }

    #[test]
    fn openai_stream_ends_with_done_and_usage_only_when_asked() {
        let w = synth(Api::OpenAiChat, true, None);
        let body = String::from_utf8(w.body).unwrap();
        assert!(body.ends_with("data: [DONE]\n\n"));
        assert!(body.contains("\"usage\""));
        assert_eq!(w.content_type, "text/event-stream");
    }
}
