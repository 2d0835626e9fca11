//! `SanitizeResponse` (also `SanitizeModelResponse`, Apigee's name): the local guardrail
//! detectors over the text an LLM generated (issue 15).
//!
//! ```yaml
//! spec:
//!   type: SanitizeResponse
//!   detectors: {email: {action: redact}, private_key: {action: block}}
//!   onUnsupported: block        # default; `pass` lets an answer it cannot read through
//! ```
//!
//! What is guarded, per API (the text the model generated: `content` / `text` members,
//! refusals where the API streams them; tool-call arguments and reasoning deltas are not):
//!
//! - JSON answers (held whole), every API: the generated text members (`content`, `text`,
//!   `output_text`, `refusal`: chat `choices[].message.content`, legacy completions
//!   `choices[].text`, Responses `output[].content[].text`, Anthropic `content[].text`,
//!   Gemini / Vertex AI `candidates[].content.parts[].text`) are scanned; `redact` rewrites
//!   them in place; `block` empties the generated text and sets the API's own refusal reason, so the SDK
//!   reads a normal answer in every body mode (in FULL_DUPLEX_STREAMED the 200 already
//!   left): OpenAI chat and completions `finish_reason: "content_filter"`, Responses
//!   `status: "incomplete"` with `incomplete_details.reason: "content_filter"`, Anthropic
//!   `stop_reason: "refusal"`, Gemini `finishReason: "SAFETY"`. Embeddings carry no
//!   generated text: nothing to guard.
//! - Streams: the body is framed by the LLM module's framers ([`SseDecoder`] for
//!   server-sent events, [`JsonArrayStream`] for Gemini's `streamGenerateContent` without
//!   `alt=sse`), never a second framer. Each text delta is fed to a [`StreamScanner`] per
//!   choice / content part / content block / candidate and replaced by what the scanner
//!   releases (redacted); the scanner's held tail comes out in a later delta, at the latest
//!   just before the part's closing event. The step declares `Hooks::streams_in_chunks`,
//!   so an event stream is not held for its body hook: events flow on as they are read.
//!   Per API:
//!   - OpenAI chat (`choices[].delta.content`, and `delta.refusal`) and legacy completions
//!     (`choices[].text`); `logprobs` of a delta whose text changed are dropped (their tokens
//!     spell the text).
//!   - OpenAI Responses: `response.output_text.delta` and `response.refusal.delta`. The
//!     closing events repeat the whole text (`response.output_text.done`,
//!     `response.content_part.done`, `response.output_item.done`, `response.completed`): it
//!     is replaced by exactly the text the deltas released, so the redacted value never
//!     comes back in a final event (a part with no deltas is scanned from its final text).
//!     Sequence numbers stay contiguous when a tail delta is inserted.
//!   - Anthropic Messages: `text_delta` per content block.
//!   - Gemini / Vertex AI, `alt=sse` and the JSON-array stream alike: every part's text per
//!     candidate.
//!
//!   A `block` ends the stream with the API's own final event ([`ChunkAction::End`], never a
//!   cut connection), after the text released before the finding: OpenAI chat and
//!   completions a chunk with `finish_reason: "content_filter"` then `data: [DONE]`;
//!   Responses the open parts' and items' `.done` events then `response.incomplete` with
//!   `incomplete_details.reason: "content_filter"` (what OpenAI sends for its own filter;
//!   the openai SDK yields it as a normal event, and its `responses.stream()` helper reads
//!   the incomplete response; `get_final_response()` raises there, as for OpenAI's own
//!   filter, since no `response.completed` came); Anthropic `content_block_stop`, `message_delta`
//!   with `stop_reason: "refusal"`, `message_stop`; Gemini a candidate with
//!   `finishReason: "SAFETY"` (and the array's closing `]`).
//! - What cannot be checked is refused, not passed: a compressed body, an event whose data
//!   is not JSON (other than `[DONE]`), an event or array element over 1 MiB, a JSON-array
//!   stream that is not JSON, a 2xx JSON answer that does not parse. A stream then ends with
//!   the API's error event (OpenAI chat / completions `data: {"error": …}`, which the openai
//!   SDK raises as `APIError`; Responses an `error` event; Anthropic `event: error`, raised
//!   by its SDK; Gemini `{"error": …}`, raised as `APIError` by google-genai); a JSON answer
//!   is answered 422 `steps.sanitizeresponse.UnsupportedResponse`. `onUnsupported: pass`
//!   lets such an answer through instead (a warning, once). Either way
//!   `sanitizeresponse.<policy>.unsupported` names the reason. Lines of an event stream
//!   that are not SSE fields carry nothing an SDK reads and are dropped; `:` comments pass as
//!   one `: keep-alive` line per chunk. Error answers (non-2xx) pass: they hold no generated
//!   text.
//!
//! External guards (Model Armor, a generic HTTP guard; `external`, see `sanitize_external`)
//! check JSON answers after the local detectors (wrapping the body hook: they see only what
//! the local stage let through); a stream is refused at once, held and checked whole at its
//! end, or left to the local detectors (`external.streams`: `block`, `end`, `local`).
//!
//! Variables: `sanitizeresponse.<policy>.{matched,action,categories,findings,unsupported}`
//! and Apigee's `SanitizeModelResponse.<policy>.*` match states.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::sanitize_prompt::{categories, compile_guard, count_findings, take_key, DURATION};
use super::{BuildContext, SpecError};
use crate::fault::Fault;
use crate::guard::{self, Action, Detector, Finding, StreamScanner};
use crate::llm::json_stream::JsonArrayStream;
use crate::llm::sse::SseDecoder;
use crate::llm::{Api, ResponseFormat};
use crate::pipeline::{Chunk, ChunkAction, ChunkSpec, Direction, Hook, Hooks, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "SanitizeResponse";
/// Apigee's type name for the same policy.
pub const APIGEE_TYPE: &str = "SanitizeModelResponse";

pub const BLOCKED_CODE: &str = "steps.sanitizeresponse.ResponseBlocked";
/// An answer the guard cannot read (compressed, not JSON, an over-long event).
pub const UNSUPPORTED_CODE: &str = "steps.sanitizeresponse.UnsupportedResponse";

/// Choices / parts guarded apart; higher indexes share the last scanner (an index from the
/// upstream never sizes an allocation).
const MAX_PARTS: u64 = 64;

/// The most text kept per Responses part for its final events (twice the SSE framer's
/// bound on one event).
const MAX_RELEASED: usize = 2 * crate::llm::sse::DEFAULT_MAX_EVENT_BYTES;

/// What to do with an answer the guard cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnUnsupported {
    Block,
    Pass,
}

#[derive(Debug)]
struct SanitizeResponse {
    name: String,
    detector: Arc<Detector>,
    on_unsupported: OnUnsupported,
    /// Model Armor / HTTP guards, after the local detectors (`sanitize_external`).
    external: Option<Arc<crate::guard::external::ExternalGuards>>,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let mut spec = spec;
    let external =
        super::sanitize_external::take(ctx, &mut spec, crate::guard::external::Kind::Response)?;
    // Taking a key that is never there turns a null spec into an empty mapping (every
    // default).
    take_key(&mut spec, "type")?;
    let on_unsupported = match take_key(&mut spec, "onUnsupported")? {
        None => OnUnsupported::Block,
        Some(v) => match v.as_str() {
            Some("block") => OnUnsupported::Block,
            Some("pass") => OnUnsupported::Pass,
            _ => {
                return Err(SpecError::new(
                    "onUnsupported",
                    "must be `block` (the default) or `pass`",
                ))
            }
        },
    };
    Ok(Arc::new(SanitizeResponse {
        name: ctx.name.clone(),
        detector: compile_guard(spec, false)?,
        on_unsupported,
        external,
    }))
}

/// How a stream's bytes are framed.
enum Framing {
    Sse(SseDecoder),
    Array(ArrayFraming),
    /// `onUnsupported: pass` after something unreadable: the rest passes untouched.
    Pass,
    /// Taken out while a chunk is read.
    Busy,
}

/// Gemini's streamed JSON array, re-emitted element by element.
struct ArrayFraming {
    split: JsonArrayStream,
    /// `Some(true)` once `[` was seen (and sent), `Some(false)` for a lone object.
    array: Option<bool>,
    sent: u64,
    closed: bool,
}

/// One choice / content part / content block / candidate.
struct Part {
    scanner: StreamScanner,
    /// Responses only: the text released so far, which the final events repeat.
    released: Option<String>,
    closed: bool,
    /// Responses only: the part's item id and whether it is a refusal part.
    item_id: String,
    refusal: bool,
    /// Responses only: its `output_text.done` / `content_part.done` went out.
    text_done_sent: bool,
    part_done_sent: bool,
}

/// Responses API stream state.
#[derive(Default)]
struct Responses {
    /// The `response` object of `response.created` (for a closing `response.incomplete`).
    response: Option<Value>,
    /// Output items by `output_index`, and whether their `.done` went out.
    items: BTreeMap<u64, (Value, bool)>,
    /// Events inserted so far: later sequence numbers move up by this much.
    shift: u64,
    last_seq: Option<u64>,
}

/// One stream's guard state, kept on the exchange between chunks.
pub struct StreamState {
    policy: Arc<str>,
    api: Api,
    framing: Framing,
    parts: BTreeMap<(u64, u64), Part>,
    findings: Vec<Finding>,
    ended: bool,
    responses: Option<Box<Responses>>,
    /// Something passed unchecked (`onUnsupported: pass`): the reason, for the variable.
    unsupported: Option<&'static str>,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("policy", &self.policy)
            .field("api", &self.api)
            .field("parts", &self.parts.len())
            .field("findings", &self.findings.len())
            .field("ended", &self.ended)
            .finish()
    }
}

/// Writes one event; `data` may hold several lines.
fn write_event(out: &mut Vec<u8>, name: &str, data: &str) {
    if !name.is_empty() {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

fn named_event(out: &mut Vec<u8>, name: &str, data: &Value) {
    write_event(out, name, &data.to_string());
}

fn index(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(MAX_PARTS)
}

/// Sets `key` when `v` is an object (never panics on an unexpected shape).
fn put(v: &mut Value, key: &str, val: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_owned(), val);
    }
}

fn str_of<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// What reading an event decided.
enum Step {
    Next,
    /// The stream ends after what was written.
    End,
    /// The event cannot be checked (the reason).
    Unsupported(&'static str),
}

impl StreamState {
    /// Feeds `delta` to the scanner of `key`; the text to send now, and whether it blocked.
    /// `finish` releases the held tail (the part ended).
    fn push(
        &mut self,
        detector: &Arc<Detector>,
        key: (u64, u64),
        delta: &str,
        finish: bool,
    ) -> (String, bool) {
        let keep = self.api == Api::OpenAiResponses;
        let p = self.parts.entry(key).or_insert_with(|| Part {
            scanner: StreamScanner::new(detector.clone()),
            released: keep.then(String::new),
            closed: false,
            item_id: String::new(),
            refusal: false,
            text_done_sent: false,
            part_done_sent: false,
        });
        let mut out = p.scanner.push(delta);
        if finish && out.blocked.is_none() {
            let f = p.scanner.finish();
            out.release.push_str(&f.release);
            out.findings.extend(f.findings);
            out.blocked = f.blocked;
        }
        if finish || out.blocked.is_some() {
            p.closed = true;
        }
        if let Some(r) = p.released.as_mut() {
            // Bounded: a final event repeating more than this would be over the framer's
            // bound and refused anyway.
            if r.len() + out.release.len() <= MAX_RELEASED {
                r.push_str(&out.release);
            }
        }
        let blocked = out.blocked.is_some();
        self.findings.extend(out.findings);
        if let Some(b) = out.blocked {
            self.findings.push(b);
        }
        (out.release, blocked)
    }
}

impl SanitizeResponse {
    fn position(&self, ex: &Exchange) -> Option<usize> {
        ex.state
            .guard_streams
            .iter()
            .position(|s| *s.policy == *self.name)
    }

    fn set_vars(&self, ex: &mut Exchange, findings: &[Finding]) {
        let action = guard::decision(findings);
        let k = |n: &str| format!("sanitizeresponse.{}.{n}", self.name);
        ex.set_var(k("matched"), !findings.is_empty());
        ex.set_var(
            k("action"),
            action.map(Action::as_str).unwrap_or("none").to_string(),
        );
        ex.set_var(k("categories"), categories(findings.iter()));
        ex.set_var(k("findings"), findings.len() as i64);
        for (n, v) in guard::armor::local_variables(APIGEE_TYPE, &self.name, findings) {
            ex.set_var(n, v);
        }
    }

    /// Records an answer the guard cannot read; `true` when it may pass anyway.
    fn unsupported(&self, ex: &mut Exchange, reason: &str) -> bool {
        let k = format!("sanitizeresponse.{}.unsupported", self.name);
        let first = ex.var(&k).is_none();
        ex.set_var(k, reason.to_owned());
        let pass = self.on_unsupported == OnUnsupported::Pass;
        if first {
            if pass {
                tracing::warn!(policy = %self.name, reason, "response not checked (onUnsupported: pass)");
            } else {
                tracing::info!(policy = %self.name, reason, "response refused: it cannot be checked");
            }
        }
        pass
    }

    fn unsupported_message(&self, reason: &str) -> String {
        format!(
            "The model's response could not be checked by guardrail {} ({reason}).",
            self.name
        )
    }

    /// The stream state for a response whose first chunk is here; `None` when the chunk
    /// path has nothing to do (no LLM call, an error answer, a JSON body guarded whole).
    fn start(&self, ex: &Exchange) -> Option<StreamState> {
        let llm = ex.state.llm.as_ref()?;
        let resp = ex.response.as_ref()?;
        if !(200..300).contains(&resp.status) {
            return None;
        }
        let format = ResponseFormat::detect(llm.stream_shape, resp.headers.get("content-type"));
        let framing = match format {
            ResponseFormat::Json => return None,
            ResponseFormat::Sse => Framing::Sse(SseDecoder::default()),
            ResponseFormat::JsonArray => Framing::Array(ArrayFraming {
                split: JsonArrayStream::default(),
                array: None,
                sent: 0,
                closed: false,
            }),
        };
        Some(StreamState {
            policy: self.name.as_str().into(),
            api: llm.api,
            framing,
            parts: BTreeMap::new(),
            findings: Vec::new(),
            ended: false,
            responses: (llm.api == Api::OpenAiResponses).then(Box::default),
            unsupported: None,
        })
    }

    /// Reads `data` (and, at `eos`, what the framer still holds), writing what passes to
    /// `out`. `Err` names why the stream cannot be checked.
    fn feed(
        &self,
        st: &mut StreamState,
        data: &[u8],
        eos: bool,
        out: &mut Vec<u8>,
    ) -> Result<bool, &'static str> {
        let mut end = false;
        let mut why = None;
        match std::mem::replace(&mut st.framing, Framing::Busy) {
            Framing::Sse(mut dec) => {
                let mut on = |name: &str, data: &str| {
                    if end || why.is_some() {
                        return;
                    }
                    match self.event(st, name, data, out) {
                        Step::Next => {}
                        Step::End => end = true,
                        Step::Unsupported(r) => why = Some(r),
                    }
                };
                let mut r = dec.push(data, |e| on(e.event, e.data));
                if eos && r.is_ok() {
                    r = dec.finish(|e| on(e.event, e.data));
                }
                if r.is_err() {
                    why = why.or(Some("a server-sent event longer than 1 MiB"));
                }
                if dec.take_comments() && why.is_none() && !end {
                    out.extend_from_slice(b": keep-alive\n\n");
                }
                st.framing = Framing::Sse(dec);
            }
            Framing::Array(mut a) => {
                if a.array.is_none() {
                    if let Some(&b) = data.iter().find(|b| !b.is_ascii_whitespace()) {
                        a.array = Some(b == b'[');
                        if b == b'[' {
                            out.push(b'[');
                        }
                    }
                }
                let r = a.split.push(data, |el| {
                    if end || why.is_some() {
                        return;
                    }
                    if a.sent > 0 {
                        out.extend_from_slice(b",\r\n");
                    }
                    a.sent += 1;
                    match self.element(st, el, out) {
                        Step::Next => {}
                        Step::End => end = true,
                        Step::Unsupported(r) => why = Some(r),
                    }
                });
                if let Err(e) = r {
                    why = why.or(Some(match e {
                        crate::llm::json_stream::JsonStreamError::ElementTooLarge { .. } => {
                            "a streamed JSON element longer than 1 MiB"
                        }
                        crate::llm::json_stream::JsonStreamError::Unexpected { .. } => {
                            "a streamed JSON array that is not JSON"
                        }
                    }));
                }
                if why.is_none() && a.array == Some(true) && !a.closed && (end || a.split.is_done())
                {
                    out.push(b']');
                    a.closed = true;
                }
                st.framing = Framing::Array(a);
            }
            Framing::Pass => {
                out.extend_from_slice(data);
                st.framing = Framing::Pass;
            }
            // Never left in place between chunks; refused rather than passed if it were.
            Framing::Busy => why = Some("an internal framing error"),
        }
        match why {
            Some(w) => Err(w),
            None => Ok(end),
        }
    }

    /// Ends the stream with the API's error event for an answer that cannot be checked.
    fn error_end(&self, st: &mut StreamState, reason: &str, out: &mut Vec<u8>) {
        let msg = self.unsupported_message(reason);
        match st.api {
            Api::OpenAiResponses => {
                let seq = st
                    .responses
                    .as_ref()
                    .and_then(|r| r.last_seq)
                    .map_or(0, |s| s + 1);
                named_event(
                    out,
                    "error",
                    &json!({"type": "error", "code": UNSUPPORTED_CODE, "message": msg, "param": null, "sequence_number": seq}),
                );
            }
            Api::AnthropicMessages => named_event(
                out,
                "error",
                &json!({"type": "error", "error": {"type": "api_error", "message": msg}}),
            ),
            Api::Gemini | Api::VertexAi => {
                let e = json!({"error": {"code": 422, "message": msg, "status": "FAILED_PRECONDITION"}});
                match &mut st.framing {
                    Framing::Array(a) if a.closed => {}
                    Framing::Array(a) => {
                        a.closed = true;
                        if a.array == Some(true) {
                            if a.sent > 0 {
                                out.extend_from_slice(b",\r\n");
                            }
                            out.extend_from_slice(e.to_string().as_bytes());
                            out.push(b']');
                        } else {
                            out.extend_from_slice(e.to_string().as_bytes());
                        }
                    }
                    _ => write_event(out, "", &e.to_string()),
                }
            }
            _ => write_event(
                out,
                "",
                &json!({"error": {"message": msg, "type": "guardrail_error", "param": null, "code": UNSUPPORTED_CODE}})
                    .to_string(),
            ),
        }
    }

    /// One server-sent event.
    fn event(&self, st: &mut StreamState, name: &str, data: &str, out: &mut Vec<u8>) -> Step {
        let trimmed = data.trim();
        if trimmed.is_empty() || trimmed == "[DONE]" {
            write_event(out, name, data);
            return Step::Next;
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            let reason = "an event whose data is not JSON";
            if self.on_unsupported == OnUnsupported::Pass {
                st.unsupported = Some(reason);
                write_event(out, name, data);
                return Step::Next;
            }
            return Step::Unsupported(reason);
        };
        match st.api {
            Api::OpenAiChat | Api::OpenAiCompletions => {
                let completions = st.api == Api::OpenAiCompletions;
                let (changed, blocked) = self.openai_choices(st, &mut v, completions);
                if changed {
                    write_event(out, name, &v.to_string());
                } else {
                    write_event(out, name, data);
                }
                if blocked {
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return Step::End;
                }
                Step::Next
            }
            Api::AnthropicMessages => self.anthropic(st, name, data, v, out),
            Api::Gemini | Api::VertexAi => {
                let (changed, blocked) = self.gemini(st, &mut v);
                if changed {
                    write_event(out, name, &v.to_string());
                } else {
                    write_event(out, name, data);
                }
                if blocked {
                    Step::End
                } else {
                    Step::Next
                }
            }
            Api::OpenAiResponses => self.responses(st, name, data, v, out),
            // Embeddings never stream; nothing generated to read.
            Api::OpenAiEmbeddings => {
                write_event(out, name, data);
                Step::Next
            }
        }
    }

    /// One element of Gemini's streamed array (or its lone object).
    fn element(&self, st: &mut StreamState, raw: &[u8], out: &mut Vec<u8>) -> Step {
        let Ok(mut v) = serde_json::from_slice::<Value>(raw) else {
            let reason = "a streamed JSON element that is not JSON";
            if self.on_unsupported == OnUnsupported::Pass {
                st.unsupported = Some(reason);
                out.extend_from_slice(raw);
                return Step::Next;
            }
            return Step::Unsupported(reason);
        };
        if !matches!(st.api, Api::Gemini | Api::VertexAi) {
            return Step::Unsupported("a JSON-array stream for an API that has none");
        }
        if v.get("error").is_some() {
            out.extend_from_slice(raw);
            return Step::Next;
        }
        let (changed, blocked) = self.gemini(st, &mut v);
        if changed {
            out.extend_from_slice(v.to_string().as_bytes());
        } else {
            out.extend_from_slice(raw);
        }
        if blocked {
            Step::End
        } else {
            Step::Next
        }
    }

    /// OpenAI chat (`delta.content`) or completions (`text`) choices: whether `v` changed,
    /// and whether a choice blocked (`v` is then that choice's final chunk).
    fn openai_choices(
        &self,
        st: &mut StreamState,
        v: &mut Value,
        completions: bool,
    ) -> (bool, bool) {
        let d = &self.detector;
        let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) else {
            return (false, false);
        };
        let mut changed = false;
        let mut block = None;
        for c in choices.iter_mut() {
            if !c.is_object() {
                continue;
            }
            let i = index(c, "index");
            let finish = c.get("finish_reason").is_some_and(|f| !f.is_null());
            // Chat: the answer (`content`, part 0) and a refusal (`refusal`, part 1, only
            // once one started). Completions: `text`.
            let fields: &[(&str, u64)] = if completions {
                &[("text", 0)]
            } else {
                &[("content", 0), ("refusal", 1)]
            };
            let mut blocked = false;
            for &(field, part) in fields {
                let slot = if completions {
                    c.get(field)
                } else {
                    c.get("delta").and_then(|dl| dl.get(field))
                };
                let delta = slot.and_then(Value::as_str).unwrap_or("").to_owned();
                let open = part == 0 || st.parts.contains_key(&(i, part));
                if delta.is_empty() && !(finish && open) {
                    continue;
                }
                let (rel, b) = st.push(d, (i, part), &delta, finish);
                if rel != delta {
                    changed = true;
                    // Their tokens spell the original text.
                    if c.get("logprobs").is_some_and(|l| !l.is_null()) {
                        put(c, "logprobs", Value::Null);
                    }
                    if completions {
                        put(c, field, Value::String(rel));
                    } else {
                        if !c.get("delta").is_some_and(Value::is_object) {
                            put(c, "delta", json!({}));
                        }
                        if let Some(dl) = c.get_mut("delta") {
                            put(dl, field, Value::String(rel));
                        }
                    }
                }
                if b {
                    blocked = true;
                    break;
                }
            }
            if blocked {
                put(c, "finish_reason", json!("content_filter"));
                changed = true;
                block = Some(i);
                break;
            }
        }
        if let Some(i) = block {
            // Only the blocked choice's final chunk: the others' text in it is unchecked.
            choices.retain(|c| c.is_object() && index(c, "index") == i);
        }
        (changed, block.is_some())
    }

    fn anthropic(
        &self,
        st: &mut StreamState,
        name: &str,
        data: &str,
        mut v: Value,
        out: &mut Vec<u8>,
    ) -> Step {
        let d = &self.detector;
        let i = index(&v, "index");
        let stop = |out: &mut Vec<u8>| {
            named_event(
                out,
                "message_delta",
                &json!({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": null}, "usage": {"output_tokens": 0}}),
            );
            named_event(out, "message_stop", &json!({"type": "message_stop"}));
        };
        match str_of(&v, "type") {
            "content_block_start"
                if v.pointer("/content_block/type").and_then(Value::as_str) == Some("text") =>
            {
                // A block may start with text (usually "").
                let t = v
                    .pointer("/content_block/text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let (rel, blocked) = st.push(d, (i, 0), &t, false);
                if rel != t {
                    v["content_block"]["text"] = Value::String(rel);
                    write_event(out, name, &v.to_string());
                } else {
                    write_event(out, name, data);
                }
                if blocked {
                    named_event(
                        out,
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": i}),
                    );
                    stop(out);
                    return Step::End;
                }
                Step::Next
            }
            "content_block_delta"
                if v.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta") =>
            {
                let delta = v
                    .pointer("/delta/text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let (rel, blocked) = st.push(d, (i, 0), &delta, false);
                v["delta"]["text"] = Value::String(rel);
                write_event(out, name, &v.to_string());
                if blocked {
                    named_event(
                        out,
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": i}),
                    );
                    stop(out);
                    return Step::End;
                }
                Step::Next
            }
            "content_block_stop" if st.parts.contains_key(&(i, 0)) => {
                let (rel, blocked) = st.push(d, (i, 0), "", true);
                if !rel.is_empty() {
                    named_event(
                        out,
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": rel}}),
                    );
                }
                write_event(out, name, data);
                if blocked {
                    stop(out);
                    return Step::End;
                }
                Step::Next
            }
            _ => {
                write_event(out, name, data);
                Step::Next
            }
        }
    }

    /// Gemini / Vertex AI candidates: whether `v` changed, and whether one blocked (`v` is
    /// then its final one).
    fn gemini(&self, st: &mut StreamState, v: &mut Value) -> (bool, bool) {
        let d = &self.detector;
        let Some(cands) = v.get_mut("candidates").and_then(Value::as_array_mut) else {
            return (false, false);
        };
        let mut any = false;
        let mut block = None;
        for c in cands.iter_mut() {
            if !c.is_object() {
                continue;
            }
            let i = index(c, "index");
            let finish = c.get("finishReason").is_some_and(|f| !f.is_null());
            let mut changed = false;
            let mut blocked = false;
            match c
                .pointer_mut("/content/parts")
                .and_then(Value::as_array_mut)
            {
                Some(parts) => {
                    let last = parts
                        .iter()
                        .rposition(|p| p.get("text").is_some_and(Value::is_string));
                    for (j, p) in parts.iter_mut().enumerate() {
                        let Some(t) = p.get("text").and_then(Value::as_str).map(str::to_owned)
                        else {
                            continue;
                        };
                        let (rel, b) = st.push(d, (i, 0), &t, finish && Some(j) == last);
                        if rel != t {
                            changed = true;
                            put(p, "text", Value::String(rel));
                        }
                        if b {
                            blocked = true;
                            break;
                        }
                    }
                    if finish && last.is_none() && st.parts.contains_key(&(i, 0)) {
                        let (rel, b) = st.push(d, (i, 0), "", true);
                        if !rel.is_empty() {
                            changed = true;
                            parts.push(json!({"text": rel}));
                        }
                        blocked = b;
                    }
                }
                None if finish && st.parts.contains_key(&(i, 0)) => {
                    let (rel, b) = st.push(d, (i, 0), "", true);
                    if !rel.is_empty() {
                        changed = true;
                        put(
                            c,
                            "content",
                            json!({"role": "model", "parts": [{"text": rel}]}),
                        );
                    }
                    blocked = b;
                }
                None => {}
            }
            if changed || blocked {
                any = true;
                if let Some(o) = c.as_object_mut() {
                    // Its tokens spell the original text.
                    o.remove("logprobsResult");
                }
            }
            if blocked {
                put(c, "finishReason", json!("SAFETY"));
                block = Some(i);
                break;
            }
        }
        if let Some(i) = block {
            cands.retain(|c| c.is_object() && index(c, "index") == i);
        }
        (any, block.is_some())
    }

    /// One OpenAI Responses event.
    fn responses(
        &self,
        st: &mut StreamState,
        name: &str,
        data: &str,
        mut v: Value,
        out: &mut Vec<u8>,
    ) -> Step {
        let d = &self.detector;
        let ty = str_of(&v, "type").to_owned();
        let seq = v.get("sequence_number").and_then(Value::as_u64);
        let oi = index(&v, "output_index");
        let ci = index(&v, "content_index");
        let mut modified = false;
        let rs = st.responses.get_or_insert_with(Box::default);
        match ty.as_str() {
            "response.created" | "response.queued" | "response.in_progress"
                if rs.response.is_none() =>
            {
                rs.response = v.get("response").cloned();
            }
            "response.content_part.added" => {
                // A part may start with text (usually ""): the first delta.
                let t = v
                    .pointer("/part/text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                if !t.is_empty() {
                    let (rel, blocked) = st.push(d, (oi, ci), &t, false);
                    if blocked {
                        self.responses_block(st, out);
                        return Step::End;
                    }
                    if let Some(part) = v.get_mut("part") {
                        put(part, "text", Value::String(rel));
                    }
                    modified = true;
                }
            }
            "response.output_item.added" => {
                if let Some(item) = v.get("item") {
                    rs.items.insert(oi, (item.clone(), false));
                }
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                let delta = str_of(&v, "delta").to_owned();
                let refusal = ty == "response.refusal.delta";
                let item_id = str_of(&v, "item_id").to_owned();
                let (rel, blocked) = st.push(d, (oi, ci), &delta, false);
                if let Some(p) = st.parts.get_mut(&(oi, ci)) {
                    if p.item_id.is_empty() {
                        p.item_id = item_id;
                        p.refusal = refusal;
                    }
                }
                if rel != delta {
                    v["delta"] = Value::String(rel);
                    if v.get("logprobs").is_some() {
                        v["logprobs"] = json!([]);
                    }
                    modified = true;
                }
                self.write_responses(st, name, data, &mut v, seq, modified, out);
                if blocked {
                    self.responses_block(st, out);
                    return Step::End;
                }
                return Step::Next;
            }
            "response.output_text.done" | "response.refusal.done" => {
                let refusal = ty == "response.refusal.done";
                let field = if refusal { "refusal" } else { "text" };
                let item_id = str_of(&v, "item_id").to_owned();
                let upstream = str_of(&v, field).to_owned();
                let (text, blocked) =
                    self.close_part(st, (oi, ci), &upstream, &item_id, refusal, seq, out);
                if blocked {
                    self.responses_block(st, out);
                    return Step::End;
                }
                if text != upstream {
                    v[field] = Value::String(text);
                    if v.get("logprobs").is_some() {
                        v["logprobs"] = json!([]);
                    }
                    modified = true;
                }
                if let Some(p) = st.parts.get_mut(&(oi, ci)) {
                    p.text_done_sent = true;
                }
            }
            "response.content_part.done" => {
                let item_id = str_of(&v, "item_id").to_owned();
                if let Some(part) = v.get_mut("part") {
                    match self.final_part(st, (oi, ci), part, &item_id, seq, out) {
                        Some(true) => {
                            self.responses_block(st, out);
                            return Step::End;
                        }
                        Some(false) => modified = true,
                        None => {}
                    }
                }
                if let Some(p) = st.parts.get_mut(&(oi, ci)) {
                    p.part_done_sent = true;
                }
            }
            "response.output_item.done" => {
                if let Some(item) = v.get_mut("item") {
                    match self.final_item(st, oi, item, seq, out) {
                        Some(true) => {
                            self.responses_block(st, out);
                            return Step::End;
                        }
                        Some(false) => modified = true,
                        None => {}
                    }
                    let item = item.clone();
                    st.responses
                        .get_or_insert_with(Box::default)
                        .items
                        .insert(oi, (item, true));
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                let mut blocked = false;
                if let Some(items) = v
                    .pointer_mut("/response/output")
                    .and_then(Value::as_array_mut)
                {
                    for (k, item) in items.iter_mut().enumerate() {
                        let k = (k as u64).min(MAX_PARTS);
                        match self.final_item(st, k, item, seq, out) {
                            Some(true) => {
                                blocked = true;
                                break;
                            }
                            Some(false) => modified = true,
                            None => {}
                        }
                    }
                }
                if blocked {
                    self.responses_block(st, out);
                    return Step::End;
                }
            }
            _ => {}
        }
        self.write_responses(st, name, data, &mut v, seq, modified, out);
        Step::Next
    }

    /// Writes a Responses event, its sequence number moved past any inserted event.
    #[allow(clippy::too_many_arguments)]
    fn write_responses(
        &self,
        st: &mut StreamState,
        name: &str,
        data: &str,
        v: &mut Value,
        seq: Option<u64>,
        mut modified: bool,
        out: &mut Vec<u8>,
    ) {
        let rs = st.responses.get_or_insert_with(Box::default);
        if let Some(s) = seq {
            if rs.shift > 0 {
                v["sequence_number"] = json!(s + rs.shift);
                modified = true;
            }
            rs.last_seq = Some(s + rs.shift);
        }
        if modified {
            write_event(out, name, &v.to_string());
        } else {
            write_event(out, name, data);
        }
    }

    /// The next sequence number for an event tollgate adds before the current one.
    fn insert_seq(st: &mut StreamState, seq: Option<u64>) -> Value {
        let rs = st.responses.get_or_insert_with(Box::default);
        let s = match seq {
            Some(s) => s + rs.shift,
            None => rs.last_seq.map_or(0, |l| l + 1),
        };
        rs.shift += 1;
        rs.last_seq = Some(s);
        json!(s)
    }

    /// The next sequence number at the end of the stream.
    fn next_seq(st: &mut StreamState) -> Value {
        let rs = st.responses.get_or_insert_with(Box::default);
        let s = rs.last_seq.map_or(0, |l| l + 1);
        rs.last_seq = Some(s);
        json!(s)
    }

    /// The final text of Responses part `key` (what its deltas released), closing it first:
    /// its held tail goes out as one more delta. A part with no deltas is scanned from
    /// `upstream`. Whether it blocked.
    #[allow(clippy::too_many_arguments)]
    fn close_part(
        &self,
        st: &mut StreamState,
        key: (u64, u64),
        upstream: &str,
        item_id: &str,
        refusal: bool,
        seq: Option<u64>,
        out: &mut Vec<u8>,
    ) -> (String, bool) {
        let d = &self.detector;
        let blocked = match st.parts.get(&key) {
            Some(p) if p.closed => false,
            Some(_) => {
                let (tail, blocked) = st.push(d, key, "", true);
                if !tail.is_empty() {
                    let kind = if refusal {
                        "response.refusal.delta"
                    } else {
                        "response.output_text.delta"
                    };
                    let s = Self::insert_seq(st, seq);
                    named_event(
                        out,
                        kind,
                        &json!({"type": kind, "item_id": item_id, "output_index": key.0, "content_index": key.1, "delta": tail, "logprobs": [], "sequence_number": s}),
                    );
                }
                blocked
            }
            None => st.push(d, key, upstream, true).1,
        };
        let p = st.parts.get_mut(&key);
        let text = p
            .map(|p| {
                if p.item_id.is_empty() {
                    p.item_id = item_id.to_owned();
                    p.refusal = refusal;
                }
                p.released.clone().unwrap_or_default()
            })
            .unwrap_or_default();
        (text, blocked)
    }

    /// Rewrites a Responses content part (`output_text` / `refusal`) to its released text:
    /// `None` unchanged, `Some(blocked)` changed.
    fn final_part(
        &self,
        st: &mut StreamState,
        key: (u64, u64),
        part: &mut Value,
        item_id: &str,
        seq: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let (field, refusal) = match str_of(part, "type") {
            "output_text" => ("text", false),
            "refusal" => ("refusal", true),
            _ => return None,
        };
        let upstream = str_of(part, field).to_owned();
        let (text, blocked) = self.close_part(st, key, &upstream, item_id, refusal, seq, out);
        if blocked {
            return Some(true);
        }
        if text == upstream {
            return None;
        }
        part[field] = Value::String(text);
        if part.get("logprobs").is_some() {
            part["logprobs"] = json!([]);
        }
        Some(false)
    }

    /// Rewrites a Responses output item's message parts: `None` unchanged, `Some(blocked)`.
    fn final_item(
        &self,
        st: &mut StreamState,
        oi: u64,
        item: &mut Value,
        seq: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        if str_of(item, "type") != "message" {
            return None;
        }
        let item_id = str_of(item, "id").to_owned();
        let parts = item.get_mut("content").and_then(Value::as_array_mut)?;
        let mut changed = None;
        for (ci, part) in parts.iter_mut().enumerate() {
            let ci = (ci as u64).min(MAX_PARTS);
            match self.final_part(st, (oi, ci), part, &item_id, seq, out) {
                Some(true) => return Some(true),
                Some(false) => changed = Some(false),
                None => {}
            }
        }
        changed
    }

    /// Ends a Responses stream on a block: the open parts' and items' `.done` events with the
    /// text released so far, then `response.incomplete` (reason `content_filter`).
    fn responses_block(&self, st: &mut StreamState, out: &mut Vec<u8>) {
        let keys: Vec<(u64, u64)> = st.parts.keys().copied().collect();
        for key in keys {
            let item_done = st
                .responses
                .as_ref()
                .and_then(|r| r.items.get(&key.0))
                .is_some_and(|i| i.1);
            let Some(p) = st.parts.get(&key) else {
                continue;
            };
            if item_done {
                continue;
            }
            let (text_sent, part_sent) = (p.text_done_sent, p.part_done_sent);
            let text = p.released.clone().unwrap_or_default();
            let item_id = p.item_id.clone();
            let (kind, field, ptype) = if p.refusal {
                ("response.refusal.done", "refusal", "refusal")
            } else {
                ("response.output_text.done", "text", "output_text")
            };
            if !text_sent {
                let s = Self::next_seq(st);
                let mut e = json!({"type": kind, "item_id": item_id, "output_index": key.0, "content_index": key.1, "sequence_number": s});
                put(&mut e, field, json!(text));
                if ptype == "output_text" {
                    put(&mut e, "logprobs", json!([]));
                }
                named_event(out, kind, &e);
            }
            if !part_sent {
                let s = Self::next_seq(st);
                let part = if ptype == "refusal" {
                    json!({"type": ptype, "refusal": text})
                } else {
                    json!({"type": ptype, "text": text, "annotations": []})
                };
                named_event(
                    out,
                    "response.content_part.done",
                    &json!({"type": "response.content_part.done", "item_id": item_id, "output_index": key.0, "content_index": key.1, "part": part, "sequence_number": s}),
                );
            }
        }
        // Items: the open ones close as incomplete, with the text their parts released.
        let items: Vec<(u64, Value, bool)> = st
            .responses
            .as_ref()
            .map(|r| {
                r.items
                    .iter()
                    .map(|(k, (v, d))| (*k, v.clone(), *d))
                    .collect()
            })
            .unwrap_or_default();
        let mut output = Vec::new();
        for (oi, mut item, done) in items {
            if !done {
                if str_of(&item, "type") == "message" {
                    let content: Vec<Value> = st
                        .parts
                        .range((oi, 0)..=(oi, u64::MAX))
                        .map(|(_, p)| {
                            let t = p.released.clone().unwrap_or_default();
                            if p.refusal {
                                json!({"type": "refusal", "refusal": t})
                            } else {
                                json!({"type": "output_text", "text": t, "annotations": []})
                            }
                        })
                        .collect();
                    put(&mut item, "content", Value::Array(content));
                }
                put(&mut item, "status", json!("incomplete"));
                let s = Self::next_seq(st);
                named_event(
                    out,
                    "response.output_item.done",
                    &json!({"type": "response.output_item.done", "output_index": oi, "item": item, "sequence_number": s}),
                );
            }
            output.push(item);
        }
        let mut response = st
            .responses
            .as_ref()
            .and_then(|r| r.response.clone())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({"object": "response"}));
        response["status"] = json!("incomplete");
        response["incomplete_details"] = json!({"reason": "content_filter"});
        response["output"] = Value::Array(output);
        let s = Self::next_seq(st);
        named_event(
            out,
            "response.incomplete",
            &json!({"type": "response.incomplete", "response": response, "sequence_number": s}),
        );
    }
}

/// `body` with the generated text taken out and the API's own refusal reason: the SDK
/// reads a normal, empty answer (the status and headers may already have left, in
/// FULL_DUPLEX_STREAMED). `None` for a body of another shape (then a 422).
fn refusal(api: Option<Api>, body: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    if !v.is_object() {
        return None;
    }
    match api? {
        Api::OpenAiChat | Api::OpenAiCompletions => {
            for c in v.get_mut("choices")?.as_array_mut()? {
                if api == Some(Api::OpenAiChat) {
                    if let Some(m) = c.get_mut("message") {
                        put(m, "content", json!(""));
                    }
                } else {
                    put(c, "text", json!(""));
                }
                put(c, "finish_reason", json!("content_filter"));
                put(c, "logprobs", Value::Null);
            }
        }
        Api::OpenAiResponses => {
            let output = v.get_mut("output")?.as_array_mut()?;
            // Messages lose their text; other items (tool calls, reasoning) go too: the
            // answer is refused whole.
            output.retain(|i| str_of(i, "type") == "message");
            for item in output.iter_mut() {
                put(item, "content", json!([]));
                put(item, "status", json!("incomplete"));
            }
            put(&mut v, "status", json!("incomplete"));
            put(
                &mut v,
                "incomplete_details",
                json!({"reason": "content_filter"}),
            );
            if v.get("output_text").is_some() {
                put(&mut v, "output_text", json!(""));
            }
        }
        Api::AnthropicMessages => {
            put(&mut v, "content", json!([]));
            put(&mut v, "stop_reason", json!("refusal"));
        }
        Api::Gemini | Api::VertexAi => {
            for c in v.get_mut("candidates")?.as_array_mut()? {
                put(c, "content", json!({"role": "model", "parts": []}));
                put(c, "finishReason", json!("SAFETY"));
                if let Some(o) = c.as_object_mut() {
                    o.remove("logprobsResult");
                }
            }
        }
        Api::OpenAiEmbeddings => return None,
    }
    serde_json::to_vec(&v).ok()
}

impl Policy for SanitizeResponse {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    // ── external guards (sanitize_external): they wrap the body hook, running after the
    // local stage and only on what it let through (a local block pays for no call) ──
    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        let Some(ext) = self
            .external
            .as_deref()
            .filter(|_| dir == Direction::Response)
        else {
            return match dir {
                Direction::Response => self.response_end(ex),
                Direction::Request => self.request_headers(ex),
            };
        };
        Hook::Pending(Box::pin(async move {
            let local = self.response_end(ex).outcome().await;
            if !matches!(local, Outcome::Continue) {
                return local;
            }
            match super::sanitize_external::check_response(ext, &self.name, ex).await {
                super::sanitize_external::After::Pass => Outcome::Continue,
                super::sanitize_external::After::Fault(f) => Outcome::Reject(f),
                super::sanitize_external::After::Block(cats) => {
                    let api = ex.state.llm.as_ref().map(|r| r.api);
                    if let Some(b) = ex.response_body.as_deref().and_then(|b| refusal(api, b)) {
                        ex.replace_body(Direction::Response, b);
                        return Outcome::Continue;
                    }
                    Outcome::Reject(Fault::new(
                        422,
                        BLOCKED_CODE,
                        format!("The model's response was blocked by a guardrail ({cats})."),
                    ))
                }
            }
        }))
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Response
    }

    fn replaces_body(&self, dir: Direction) -> bool {
        dir == Direction::Response
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: true,
            // Raw bytes, nothing held by the runner: the LLM module's framers in the
            // stream state hold a partial event (at most 1 MiB), the scanners a text tail.
            response_chunks: Some(ChunkSpec::bytes(0)),
            // An event stream is guarded as it passes, never held whole; except for external
            // guards under `streams: end`, which check the whole stream before its end leaves.
            streams_in_chunks: !self
                .external
                .as_ref()
                .is_some_and(|e| e.streams == crate::guard::external::StreamPolicy::End),
            ..Hooks::default()
        }
    }

    fn response_chunk(&self, ex: &mut Exchange, chunk: &mut Chunk) -> ChunkAction {
        // ── external guards on streams (sanitize_external) ──
        if let Some(ext) = &self.external {
            if let Some(a) = super::sanitize_external::on_stream_chunk(ext, &self.name, ex, chunk) {
                return a;
            }
        }
        let mut st = match self.position(ex) {
            Some(i) => ex.state.guard_streams.swap_remove(i),
            None => match self.start(ex) {
                Some(st) => st,
                // Not a stream (a JSON body is guarded whole in `response_end`).
                None => return ChunkAction::Pass,
            },
        };
        if st.ended {
            chunk.data.clear();
            ex.state.guard_streams.push(st);
            return ChunkAction::End;
        }
        let started = Instant::now();
        let before = st.findings.len();
        let encoded = matches!(st.framing, Framing::Sse(_) | Framing::Array(_))
            && ex
                .response
                .as_ref()
                .and_then(|r| r.headers.get("content-encoding"))
                .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let mut out = Vec::with_capacity(chunk.data.len() + 64);
        let mut end = false;
        if encoded {
            let reason = "a compressed body";
            if self.unsupported(ex, reason) {
                st.framing = Framing::Pass;
            } else {
                self.error_end(&mut st, reason, &mut out);
                end = true;
            }
        }
        if !end {
            match self.feed(&mut st, &chunk.data, chunk.end_of_stream, &mut out) {
                Ok(e) => end = e,
                Err(reason) => {
                    if self.unsupported(ex, reason) {
                        // The framer gave up: the rest of the stream passes as it comes.
                        st.framing = Framing::Pass;
                    } else {
                        self.error_end(&mut st, reason, &mut out);
                        end = true;
                    }
                }
            }
        }
        if let Some(reason) = st.unsupported.take() {
            self.unsupported(ex, reason);
        }
        chunk.data = out;
        st.ended = end;
        count_findings(&self.name, st.findings[before..].iter());
        DURATION
            .with_label_values(&[&self.name, "local"])
            .observe(started.elapsed().as_secs_f64());
        let findings = (st.findings.len() > before).then(|| st.findings.clone());
        ex.state.guard_streams.push(st);
        if let Some(findings) = findings {
            self.set_vars(ex, &findings);
            if end {
                tracing::info!(policy = %self.name, categories = %categories(findings.iter().filter(|f| f.action == Action::Block)), "response stream blocked");
            }
        }
        if end {
            ChunkAction::End
        } else {
            ChunkAction::Pass
        }
    }

    fn response_end<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        let Some(llm) = ex.state.llm.as_ref() else {
            return Hook::CONTINUE;
        };
        let (api, shape) = (llm.api, llm.stream_shape);
        let Some(resp) = ex.response.as_ref() else {
            return Hook::CONTINUE;
        };
        if api == Api::OpenAiEmbeddings
            || !(200..300).contains(&resp.status)
            || self.position(ex).is_some()
            || ResponseFormat::detect(shape, resp.headers.get("content-type"))
                != ResponseFormat::Json
        {
            // Vectors, an error answer, or a stream (guarded as it passes).
            return Hook::CONTINUE;
        }
        let encoded = resp
            .headers
            .get("content-encoding")
            .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let Some(body) = ex.response_body.as_deref().filter(|b| !b.is_empty()) else {
            return Hook::CONTINUE;
        };
        let started = Instant::now();
        let r = if encoded {
            Err("a compressed body")
        } else {
            // The rewriter reads strings only: a body that is no JSON at all would pass it.
            serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .ok()
                .and_then(|_| {
                    guard::redact_json(&self.detector, body, |at| {
                        matches!(at.key, Some("content" | "text" | "output_text" | "refusal"))
                    })
                    .ok()
                })
                .ok_or("a JSON answer that does not parse")
        };
        let r = match r {
            Ok(r) => r,
            Err(reason) => {
                if self.unsupported(ex, reason) {
                    return Hook::CONTINUE;
                }
                return Hook::Ready(Outcome::Reject(Fault::new(
                    422,
                    UNSUPPORTED_CODE,
                    self.unsupported_message(reason),
                )));
            }
        };
        DURATION
            .with_label_values(&[&self.name, "local"])
            .observe(started.elapsed().as_secs_f64());
        let findings: Vec<Finding> = r.findings.into_iter().map(|f| f.finding).collect();
        count_findings(&self.name, findings.iter());
        self.set_vars(ex, &findings);
        match r.action {
            Some(Action::Block) => {
                let cats = categories(findings.iter().filter(|f| f.action == Action::Block));
                tracing::info!(policy = %self.name, categories = %cats, "response blocked");
                if let Some(b) = ex
                    .response_body
                    .as_deref()
                    .and_then(|b| refusal(Some(api), b))
                {
                    ex.replace_body(Direction::Response, b);
                    return Hook::CONTINUE;
                }
                Hook::Ready(Outcome::Reject(Fault::new(
                    422,
                    BLOCKED_CODE,
                    format!("The model's response was blocked by a guardrail ({cats})."),
                )))
            }
            Some(Action::Redact) => {
                if let Some(b) = r.body {
                    ex.replace_body(Direction::Response, b);
                }
                Hook::CONTINUE
            }
            _ => Hook::CONTINUE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{LlmRequest, StreamShape};
    use crate::services::Services;
    use crate::vars::ResponseInfo;

    fn policy(yaml: &str) -> Arc<dyn Policy> {
        let ctx = BuildContext {
            name: "rg".into(),
            config_dir: None,
            services: Services::default(),
        };
        build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap()
    }

    fn exchange_with(api: Api, content_type: &str, shape: Option<StreamShape>) -> Exchange {
        let mut ex = Exchange::default();
        let mut r: LlmRequest = (*crate::policies::llm_test_support::request("m", None)).clone();
        r.api = api;
        r.stream_shape = shape;
        ex.state.llm = Some(Arc::new(r));
        let mut resp = ResponseInfo {
            status: 200,
            ..ResponseInfo::default()
        };
        resp.headers
            .push("content-type".into(), content_type.to_owned());
        ex.response = Some(resp);
        ex
    }

    /// A streamed answer (server-sent events).
    fn exchange(api: Api) -> Exchange {
        exchange_with(api, "text/event-stream; charset=utf-8", None)
    }

    /// Feeds `chunks` (the last one ends the body when `eos`); the bytes the client got and
    /// whether the policy ended the stream.
    fn feed(
        p: &Arc<dyn Policy>,
        ex: &mut Exchange,
        chunks: &[Vec<u8>],
        eos: bool,
    ) -> (String, bool) {
        let mut got = Vec::new();
        for (k, c) in chunks.iter().enumerate() {
            let mut c = Chunk {
                data: c.clone(),
                end_of_stream: eos && k + 1 == chunks.len(),
                whole_events: false,
            };
            let a = p.response_chunk(ex, &mut c);
            got.extend_from_slice(&c.data);
            if a == ChunkAction::End {
                return (String::from_utf8(got).unwrap(), true);
            }
            assert_eq!(a, ChunkAction::Pass);
        }
        (String::from_utf8(got).unwrap(), false)
    }

    /// Feeds `events` one chunk each (not the end of the body).
    fn stream(p: &Arc<dyn Policy>, ex: &mut Exchange, events: &[String]) -> (String, bool) {
        let chunks: Vec<Vec<u8>> = events.iter().map(|e| e.clone().into_bytes()).collect();
        feed(p, ex, &chunks, false)
    }

    /// `whole` cut into `n`-byte chunks, the last one ending the body.
    fn pieces(whole: &str, n: usize) -> Vec<Vec<u8>> {
        whole.as_bytes().chunks(n).map(<[u8]>::to_vec).collect()
    }

    /// The events a client reads: (event name, data JSON or string).
    fn events_of(s: &str) -> Vec<(String, Value)> {
        let mut d = SseDecoder::default();
        let mut out = d.push_collect(s.as_bytes()).unwrap();
        d.finish(|e| out.push((e.event.to_owned(), e.data.to_owned())))
            .unwrap();
        out.into_iter()
            .map(|(n, d)| {
                let v = serde_json::from_str(&d).unwrap_or(Value::String(d));
                (n, v)
            })
            .collect()
    }

    fn openai(delta: &str, finish: Option<&str>) -> String {
        let v = json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": delta}, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    /// The text an OpenAI client reassembles from the stream.
    fn openai_text(s: &str) -> String {
        events_of(s)
            .iter()
            .filter_map(|(_, v)| {
                v.pointer("/choices/0/delta/content")
                    .or_else(|| v.pointer("/choices/0/text"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn openai_stream_redacts_an_address_split_across_events() {
        let p = policy("{detectors: {email: {action: redact}}}");
        assert!(p.hooks().response_chunks.is_some());
        let events = [
            openai("Write to jane.d", None),
            openai("oe@exam", None),
            openai("ple.com today", None),
            openai("", Some("stop")),
            "data: [DONE]\n\n".to_string(),
        ];
        let mut ex = exchange(Api::OpenAiChat);
        let (got, ended) = stream(&p, &mut ex, &events);
        assert!(!ended);
        assert!(!got.contains("jane") && !got.contains("example"), "{got}");
        assert_eq!(openai_text(&got), "Write to [EMAIL] today");
        assert!(got.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            ex.var("sanitizeresponse.rg.categories").unwrap().as_text(),
            "email"
        );
        // The same stream cut anywhere (events split across chunks, CRLF line ends): the
        // LLM module's framer reassembles them.
        let crlf = events.concat().replace('\n', "\r\n");
        for n in [1, 3, 7, 64] {
            let mut ex = exchange(Api::OpenAiChat);
            let (got, ended) = feed(&p, &mut ex, &pieces(&crlf, n), true);
            assert!(!ended);
            assert_eq!(openai_text(&got), "Write to [EMAIL] today", "{n}: {got}");
            assert!(got.ends_with("data: [DONE]\n\n"), "{n}: {got}");
        }
    }

    #[test]
    fn openai_stream_block_ends_with_content_filter_and_done() {
        let p = policy("{detectors: {email: {action: block}}}");
        let mut ex = exchange(Api::OpenAiChat);
        let events = [
            openai("Hello. Mail jane.d", None),
            openai("oe@example.com now", None),
            openai(" and more", None),
        ];
        let (got, ended) = stream(&p, &mut ex, &events);
        assert!(ended);
        assert!(!got.contains("jane"), "{got}");
        assert!(
            got.contains("\"finish_reason\":\"content_filter\""),
            "{got}"
        );
        assert!(got.ends_with("data: [DONE]\n\n"), "{got}");
        assert!(openai_text(&got).starts_with("Hello."), "{got}");
        // All events in one chunk (a BUFFERED body): what came before the block stays.
        let mut ex2 = exchange(Api::OpenAiChat);
        let (got2, ended) = stream(&p, &mut ex2, &[events.concat()]);
        assert!(ended);
        assert_eq!(openai_text(&got2), openai_text(&got));
        assert!(got2.ends_with("data: [DONE]\n\n"), "{got2}");
        // Anything after the end is dropped.
        let (more, ended) = stream(&p, &mut ex, &[openai("x", None)]);
        assert!(ended && more.is_empty());
    }

    #[test]
    fn openai_stream_refusal_deltas_are_guarded_too() {
        let p = policy("{detectors: {email: {action: redact}}}");
        let ev = |r: &str, finish: Option<&str>| {
            let v = json!({"choices": [{"index": 0, "delta": {"refusal": r}, "finish_reason": finish}]});
            format!("data: {v}\n\n")
        };
        let mut ex = exchange(Api::OpenAiChat);
        let (got, _) = stream(
            &p,
            &mut ex,
            &[
                ev("I won't mail jane.d", None),
                ev("oe@example.com", None),
                ev("", Some("stop")),
            ],
        );
        let text: String = events_of(&got)
            .iter()
            .filter_map(|(_, v)| {
                v.pointer("/choices/0/delta/refusal")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "I won't mail [EMAIL]", "{got}");
    }

    fn completion(text: &str, finish: Option<&str>) -> String {
        let v = json!({"id": "cmpl", "object": "text_completion", "choices": [
            {"index": 0, "text": text, "logprobs": {"tokens": [text]}, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    #[test]
    fn completions_stream_redacts_and_blocks() {
        let p = policy("{detectors: {email: {action: redact}, payment_card: {action: block}}}");
        let events = [
            completion("Write to jane.d", None),
            completion("oe@exam", None),
            completion("ple.com today", Some("stop")),
            "data: [DONE]\n\n".to_string(),
        ];
        let mut ex = exchange(Api::OpenAiCompletions);
        let (got, ended) = stream(&p, &mut ex, &events);
        assert!(!ended);
        assert_eq!(openai_text(&got), "Write to [EMAIL] today", "{got}");
        // Log probabilities spell the text: dropped where it changed.
        assert!(!got.contains("jane") && !got.contains("exam"), "{got}");

        let mut ex = exchange(Api::OpenAiCompletions);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[
                completion("Card 4111 1111 ", None),
                completion("1111 1111 ok", None),
            ],
        );
        assert!(ended);
        assert!(!got.contains("1111"), "{got}");
        assert_eq!(openai_text(&got), "Card ");
        assert!(
            got.contains("\"finish_reason\":\"content_filter\""),
            "{got}"
        );
        assert!(got.ends_with("data: [DONE]\n\n"), "{got}");
    }

    /// An OpenAI Responses stream as the API sends it, text in `deltas`.
    fn responses_stream(deltas: &[&str]) -> String {
        responses_stream_with(deltas, &deltas.concat())
    }

    /// The same, with `full` as the text the final events repeat.
    fn responses_stream_with(deltas: &[&str], full: &str) -> String {
        let mut seq = 0;
        let mut out = String::new();
        let mut ev = |v: Value| {
            let mut v = v;
            v["sequence_number"] = json!(seq);
            seq += 1;
            out.push_str(&format!(
                "event: {}\ndata: {v}\n\n",
                v["type"].as_str().unwrap()
            ));
        };
        let resp = |status: &str, output: Value| json!({"id": "resp_1", "object": "response", "status": status, "model": "m", "output": output, "usage": null});
        let part = json!({"type": "output_text", "text": full, "annotations": [], "logprobs": []});
        let item = json!({"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]});
        ev(json!({"type": "response.created", "response": resp("in_progress", json!([]))}));
        ev(
            json!({"type": "response.output_item.added", "output_index": 0,
            "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        );
        ev(
            json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []}}),
        );
        for d in deltas {
            ev(
                json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": d, "logprobs": [{"token": d}]}),
            );
        }
        ev(
            json!({"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "text": full, "logprobs": []}),
        );
        ev(
            json!({"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "part": part}),
        );
        ev(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
        ev(json!({"type": "response.completed", "response": resp("completed", json!([item]))}));
        out
    }

    /// Every text a Responses client can read, by where it read it.
    fn responses_texts(s: &str) -> BTreeMap<String, String> {
        let mut t = BTreeMap::new();
        for (name, v) in events_of(s) {
            let ty = v["type"].as_str().unwrap_or_default().to_owned();
            assert_eq!(name, ty, "event name and type agree");
            let text = match ty.as_str() {
                "response.output_text.delta" => {
                    let d = v["delta"].as_str().unwrap().to_owned();
                    t.entry("deltas".to_owned())
                        .or_insert_with(String::new)
                        .push_str(&d);
                    continue;
                }
                "response.output_text.done" => v["text"].clone(),
                "response.content_part.done" => v["part"]["text"].clone(),
                "response.output_item.done" => v["item"]["content"][0]["text"].clone(),
                "response.completed" | "response.incomplete" => {
                    v["response"]["output"][0]["content"][0]["text"].clone()
                }
                _ => continue,
            };
            t.insert(ty, text.as_str().unwrap_or("<none>").to_owned());
        }
        t
    }

    /// The stream's sequence numbers run 0, 1, 2… with no gap or repeat.
    fn assert_sequence(s: &str) {
        let seqs: Vec<u64> = events_of(s)
            .iter()
            .filter_map(|(_, v)| v["sequence_number"].as_u64())
            .collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{s}");
    }

    #[test]
    fn responses_stream_redacts_deltas_and_every_final_text_alike() {
        let p = policy("{detectors: {email: {action: redact}}}");
        let whole = responses_stream(&["Write to jane.d", "oe@exam", "ple.com today"]);
        for n in [whole.len(), 5] {
            let mut ex = exchange(Api::OpenAiResponses);
            let (got, ended) = feed(&p, &mut ex, &pieces(&whole, n), true);
            assert!(!ended, "{got}");
            assert!(!got.contains("jane") && !got.contains("example"), "{got}");
            let texts = responses_texts(&got);
            assert_eq!(texts.len(), 5, "{texts:?}");
            for (k, t) in &texts {
                assert_eq!(t, "Write to [EMAIL] today", "{k}: {got}");
            }
            assert_sequence(&got);
            assert_eq!(events_of(&got).last().unwrap().0, "response.completed");
        }
    }

    #[test]
    fn responses_final_text_without_deltas_is_scanned_once_and_kept_consistent() {
        let p = policy("{detectors: {email: {action: redact}}}");
        let whole = responses_stream_with(&[], "mail jane.doe@example.com");
        let mut ex = exchange(Api::OpenAiResponses);
        let (got, _) = stream(&p, &mut ex, &[whole]);
        assert!(!got.contains("jane"), "{got}");
        let texts = responses_texts(&got);
        assert!(texts.values().all(|t| t == "mail [EMAIL]"), "{texts:?}");
    }

    #[test]
    fn responses_stream_block_ends_incomplete_with_the_released_text() {
        let p = policy("{detectors: {payment_card: {action: block}}}");
        let whole = responses_stream(&["Your card ", "4111 1111 ", "1111 1111", " is on file."]);
        for n in [whole.len(), 9] {
            let mut ex = exchange(Api::OpenAiResponses);
            let (got, ended) = feed(&p, &mut ex, &pieces(&whole, n), true);
            assert!(ended, "{got}");
            assert!(!got.contains("1111"), "{got}");
            let evs = events_of(&got);
            let (last, v) = evs.last().unwrap();
            assert_eq!(last, "response.incomplete");
            assert_eq!(v["response"]["status"], "incomplete");
            assert_eq!(
                v["response"]["incomplete_details"]["reason"],
                "content_filter"
            );
            assert_eq!(v["response"]["id"], "resp_1");
            let texts = responses_texts(&got);
            for t in texts.values() {
                assert_eq!(t, "Your card ", "{texts:?}");
            }
            for kind in [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
            ] {
                assert!(texts.contains_key(kind), "{kind}: {got}");
            }
            assert_sequence(&got);
            assert_eq!(
                ex.var("SanitizeModelResponse.rg.filterMatchState")
                    .unwrap()
                    .as_text(),
                "MATCH_FOUND"
            );
        }
        // A block found only in the final text (a part with no deltas) ends it too.
        let whole = responses_stream_with(&[], "card 4111 1111 1111 1111");
        let mut ex = exchange(Api::OpenAiResponses);
        let (got, ended) = stream(&p, &mut ex, &[whole]);
        assert!(ended && !got.contains("1111"), "{got}");
        assert_eq!(events_of(&got).last().unwrap().0, "response.incomplete");
        assert_sequence(&got);
    }

    fn anthropic(ty: &str, v: Value) -> String {
        format!("event: {ty}\ndata: {v}\n\n")
    }

    #[test]
    fn anthropic_stream_redacts_and_blocks_with_its_own_events() {
        let delta = |t: &str| {
            anthropic(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
            )
        };
        let stop = anthropic(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        );
        let text_of = |got: &str| -> String {
            events_of(got)
                .iter()
                .filter_map(|(_, v)| {
                    v.pointer("/delta/text")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .collect()
        };
        let p = policy("{detectors: {email: {action: redact}}}");
        let whole = [delta("to jane.doe@exa"), delta("mple.com"), stop.clone()].concat();
        for n in [whole.len(), 4] {
            let mut ex = exchange(Api::AnthropicMessages);
            let (got, ended) = feed(&p, &mut ex, &pieces(&whole, n), true);
            assert!(!ended);
            assert_eq!(text_of(&got), "to [EMAIL]");
            assert!(got.contains("content_block_stop"));
        }

        let p = policy("{detectors: {email: {action: block}}}");
        let mut ex = exchange(Api::AnthropicMessages);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[delta("to jane.doe@exa"), delta("mple.com ok")],
        );
        assert!(ended);
        assert!(!got.contains("jane"), "{got}");
        assert!(got.contains("\"stop_reason\":\"refusal\""), "{got}");
        assert!(
            got.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            "{got}"
        );
    }

    fn gemini(t: &str, finish: bool) -> Value {
        let mut c = json!({"content": {"role": "model", "parts": [{"text": t}]}});
        if finish {
            c["finishReason"] = json!("STOP");
        }
        json!({"candidates": [c], "modelVersion": "m"})
    }

    fn gemini_text(elements: &[Value]) -> String {
        elements
            .iter()
            .filter_map(|v| v.pointer("/candidates/0/content/parts/0/text"))
            .filter_map(Value::as_str)
            .collect()
    }

    #[test]
    fn gemini_stream_redacts_and_blocks_with_safety() {
        let p = policy("{detectors: {private_key: {action: block}, email: {action: redact}}}");
        let ev = |t: &str, f: bool| format!("data: {}\n\n", gemini(t, f));
        let mut ex = exchange(Api::Gemini);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[ev("to jane.d", false), ev("oe@example.com now", true)],
        );
        assert!(!ended);
        let els: Vec<Value> = events_of(&got).into_iter().map(|(_, v)| v).collect();
        assert_eq!(gemini_text(&els), "to [EMAIL] now");

        let mut ex = exchange(Api::Gemini);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[
                ev("key: -----BEGIN RSA PRIV", false),
                ev("ATE KEY-----\nMIIE", false),
                ev("abc\n-----END RSA PRIVATE KEY-----\n", false),
            ],
        );
        assert!(ended, "{got}");
        assert!(got.contains("\"finishReason\":\"SAFETY\""), "{got}");
        assert!(!got.contains("MIIE"), "{got}");
    }

    #[test]
    fn gemini_json_array_stream_is_framed_redacted_and_closed_on_block() {
        let array = |els: &[Value]| {
            let body: Vec<String> = els
                .iter()
                .map(|e| serde_json::to_string_pretty(e).unwrap())
                .collect();
            format!("[{}]", body.join(",\r\n"))
        };
        let p = policy("{detectors: {email: {action: redact}, payment_card: {action: block}}}");
        let whole = array(&[
            gemini("Write to jane.d", false),
            gemini("oe@example.com today", true),
        ]);
        for n in [whole.len(), 3] {
            let mut ex = exchange_with(
                Api::Gemini,
                "application/json; charset=UTF-8",
                Some(StreamShape::JsonArray),
            );
            let (got, ended) = feed(&p, &mut ex, &pieces(&whole, n), true);
            assert!(!ended);
            let v: Vec<Value> = serde_json::from_str(&got).expect(&got);
            assert_eq!(gemini_text(&v), "Write to [EMAIL] today", "{got}");
        }
        let whole = array(&[
            gemini("Card 4111 1111 ", false),
            gemini("1111 1111 ok", false),
            gemini("more", true),
        ]);
        let mut ex = exchange_with(
            Api::Gemini,
            "application/json",
            Some(StreamShape::JsonArray),
        );
        let (got, ended) = feed(&p, &mut ex, &pieces(&whole, 10), true);
        assert!(ended);
        assert!(!got.contains("1111"), "{got}");
        let v: Vec<Value> = serde_json::from_str(&got).expect(&got);
        assert_eq!(v.last().unwrap()["candidates"][0]["finishReason"], "SAFETY");
        assert_eq!(gemini_text(&v), "Card ");
        // Not JSON: refused with an error element that closes the array.
        let mut ex = exchange_with(
            Api::Gemini,
            "application/json",
            Some(StreamShape::JsonArray),
        );
        let (got, ended) = feed(
            &p,
            &mut ex,
            &[b"[{\"candidates\": []}, oops".to_vec()],
            false,
        );
        assert!(ended);
        let v: Vec<Value> = serde_json::from_str(&got).expect(&got);
        assert_eq!(v[1]["error"]["code"], 422, "{got}");
        assert_eq!(
            ex.var("sanitizeresponse.rg.unsupported").unwrap().as_text(),
            "a streamed JSON array that is not JSON"
        );
    }

    #[test]
    fn unreadable_streams_are_refused_with_the_apis_error_event_unless_pass() {
        let p = policy("{detectors: {email: {action: redact}}}");
        // Lines that are no SSE fields carry nothing: dropped, no panic.
        let mut ex = exchange(Api::OpenAiChat);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[
                "garbage \u{0}\u{7f} line\n\n".into(),
                "\u{feff}::\r\r".into(),
            ],
        );
        assert!(!ended && got.is_empty(), "{got:?}");
        // Data that is not JSON: the openai SDK raises the `error` it reads.
        let (got, ended) = stream(&p, &mut ex, &["data: jane.doe@example.com\n\n".into()]);
        assert!(ended, "{got}");
        assert!(!got.contains("jane"), "{got}");
        let (_, v) = &events_of(&got)[0];
        assert_eq!(v["error"]["code"], UNSUPPORTED_CODE);
        // Anthropic and Responses: their `error` events.
        let mut ex = exchange(Api::AnthropicMessages);
        let (got, ended) = stream(&p, &mut ex, &["event: x\ndata: {nope\n\n".into()]);
        assert!(ended);
        assert_eq!(events_of(&got)[0].1["error"]["type"], "api_error");
        let mut ex = exchange(Api::OpenAiResponses);
        let (got, ended) = stream(&p, &mut ex, &["data: {nope\n\n".into()]);
        assert!(ended);
        assert_eq!(events_of(&got)[0].0, "error");
        // An event over the framer's bound (1 MiB).
        let mut ex = exchange(Api::OpenAiChat);
        let big = format!("data: {{\"x\": \"{}", "a".repeat(1 << 20));
        let (got, ended) = stream(&p, &mut ex, &[big]);
        assert!(ended);
        assert!(got.contains(UNSUPPORTED_CODE), "{got}");
        // A compressed body cannot be read.
        let mut ex = exchange(Api::OpenAiChat);
        if let Some(r) = ex.response.as_mut() {
            r.headers.push("content-encoding".into(), "gzip".into());
        }
        let (got, ended) = stream(&p, &mut ex, &[openai("jane.doe@example.com", None)]);
        assert!(ended && !got.contains("jane"), "{got}");
        assert_eq!(
            ex.var("sanitizeresponse.rg.unsupported").unwrap().as_text(),
            "a compressed body"
        );

        // `onUnsupported: pass`: what cannot be read passes, the rest is still guarded.
        let p = policy("{onUnsupported: pass, detectors: {email: {action: redact}}}");
        let mut ex = exchange(Api::OpenAiChat);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[
                "data: plain text\n\n".into(),
                openai("to jane.doe@example.com", Some("stop")),
            ],
        );
        assert!(!ended);
        assert!(got.starts_with("data: plain text\n\n"), "{got}");
        assert_eq!(openai_text(&got), "to [EMAIL]");
        assert!(ex.var("sanitizeresponse.rg.unsupported").is_some());
        let e = BuildContext {
            name: "rg".into(),
            config_dir: None,
            services: Services::default(),
        };
        let bad = build(
            &e,
            serde_norway::from_str("{onUnsupported: maybe}").unwrap(),
        );
        assert_eq!(bad.unwrap_err().field, "onUnsupported");
    }

    #[test]
    fn keep_alive_comments_still_pass() {
        let p = policy("{detectors: {email: {action: redact}}}");
        let mut ex = exchange(Api::AnthropicMessages);
        let (got, _) = stream(&p, &mut ex, &[": keep-alive\n\n".into()]);
        assert_eq!(got, ": keep-alive\n\n");
    }

    fn run_json(p: &Arc<dyn Policy>, api: Api, body: &str) -> (Hook<'static>, Exchange) {
        let mut ex = exchange_with(api, "application/json", None);
        ex.response_body = Some(body.as_bytes().to_vec());
        let r = match p.run(&mut ex, Direction::Response) {
            Hook::Ready(Outcome::Continue) => Hook::CONTINUE,
            Hook::Ready(Outcome::Reject(f)) => Hook::Ready(Outcome::Reject(f)),
            _ => panic!("unexpected outcome"),
        };
        (r, ex)
    }

    fn body_of(ex: &Exchange) -> Value {
        serde_json::from_slice(ex.response_body.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn json_answers_are_redacted_or_refused_whole() {
        let body = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"mail jane.doe@example.com"}}],"model":"m"}"#;
        let p = policy("{detectors: {email: {action: redact}}}");
        let (r, ex) = run_json(&p, Api::OpenAiChat, body);
        assert!(matches!(r, Hook::Ready(Outcome::Continue)));
        let out = String::from_utf8(ex.response_body.clone().unwrap()).unwrap();
        assert!(
            out.contains("mail [EMAIL]") && !out.contains("jane"),
            "{out}"
        );

        let p = policy("{detectors: {email: {action: block}}}");
        let (r, ex) = run_json(&p, Api::OpenAiChat, body);
        assert!(matches!(r, Hook::Ready(Outcome::Continue)));
        let out = body_of(&ex);
        assert_eq!(out["choices"][0]["message"]["content"], "");
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(out["id"], "x");
        assert_eq!(
            ex.var("SanitizeModelResponse.rg.filterMatchState")
                .unwrap()
                .as_text(),
            "MATCH_FOUND"
        );
    }

    #[test]
    fn json_answers_of_every_api() {
        let redact = policy("{detectors: {email: {action: redact}}}");
        let block = policy("{detectors: {email: {action: block}}}");
        // Responses: output[].content[].text.
        let body = r#"{"id":"r","object":"response","status":"completed","output":[{"id":"m","type":"message","content":[{"type":"output_text","text":"mail jane.doe@example.com","annotations":[]}]}]}"#;
        let (_, ex) = run_json(&redact, Api::OpenAiResponses, body);
        assert_eq!(
            body_of(&ex)["output"][0]["content"][0]["text"],
            "mail [EMAIL]"
        );
        let (r, ex) = run_json(&block, Api::OpenAiResponses, body);
        assert!(matches!(r, Hook::Ready(Outcome::Continue)));
        let out = body_of(&ex);
        assert!(!out.to_string().contains("jane"));
        assert_eq!(out["status"], "incomplete");
        assert_eq!(out["incomplete_details"]["reason"], "content_filter");
        // Legacy completions: choices[].text.
        let body = r#"{"id":"c","object":"text_completion","choices":[{"index":0,"text":"mail jane.doe@example.com","logprobs":null,"finish_reason":"stop"}]}"#;
        let (_, ex) = run_json(&redact, Api::OpenAiCompletions, body);
        assert_eq!(body_of(&ex)["choices"][0]["text"], "mail [EMAIL]");
        let (_, ex) = run_json(&block, Api::OpenAiCompletions, body);
        let out = body_of(&ex);
        assert_eq!(out["choices"][0]["text"], "");
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
        // Anthropic and Gemini refusals.
        let body = r#"{"id":"m","type":"message","content":[{"type":"text","text":"jane.doe@example.com"}],"stop_reason":"end_turn"}"#;
        let (_, ex) = run_json(&block, Api::AnthropicMessages, body);
        assert_eq!(body_of(&ex)["stop_reason"], "refusal");
        let body = gemini("jane.doe@example.com", true).to_string();
        let (_, ex) = run_json(&block, Api::Gemini, &body);
        assert_eq!(body_of(&ex)["candidates"][0]["finishReason"], "SAFETY");
        // Embeddings: vectors, nothing generated to guard.
        let body =
            r#"{"object":"list","data":[{"embedding":[0.1]}],"model":"jane.doe@example.com"}"#;
        let (r, ex) = run_json(&block, Api::OpenAiEmbeddings, body);
        assert!(matches!(r, Hook::Ready(Outcome::Continue)));
        assert_eq!(ex.response_body.as_deref(), Some(body.as_bytes()));
        // A 2xx answer that is not JSON cannot be checked: 422, or passed when configured.
        let (r, ex) = run_json(&redact, Api::OpenAiChat, "mail jane.doe@example.com");
        let Hook::Ready(Outcome::Reject(f)) = r else {
            panic!("refused");
        };
        assert_eq!((f.status, f.code.as_str()), (422, UNSUPPORTED_CODE));
        assert!(!f.message.contains("jane"));
        assert!(ex.var("sanitizeresponse.rg.unsupported").is_some());
        let pass = policy("{onUnsupported: pass, detectors: {email: {action: redact}}}");
        let (r, _) = run_json(&pass, Api::OpenAiChat, "mail jane.doe@example.com");
        assert!(matches!(r, Hook::Ready(Outcome::Continue)));
        // An error answer holds no generated text: it passes.
        let mut ex = exchange_with(Api::OpenAiChat, "text/plain", None);
        ex.response.as_mut().unwrap().status = 502;
        ex.response_body = Some(b"bad gateway".to_vec());
        assert!(matches!(
            block.run(&mut ex, Direction::Response),
            Hook::Ready(Outcome::Continue)
        ));
    }

    /// Mutated streams of every API, cut at random places: never a panic, and once the
    /// policy ends a stream nothing more passes.
    #[test]
    fn mutated_streams_of_every_api_never_panic() {
        let p = policy("{detectors: {email: {action: redact}, payment_card: {action: block}}}");
        let odd = [
            r#"data: {"choices": 5}"#,
            r#"data: {"choices": [7, null, {"index": -1, "delta": "x"}]}"#,
            r#"data: {"candidates": [{"content": {"parts": [{"text": 3}, "s"]}, "finishReason": 1}]}"#,
            r#"event: response.output_text.done
data: {"type": "response.output_text.done", "output_index": 99999999999, "text": 5}"#,
            r#"data: {"type": "response.output_item.done", "item": "msg"}"#,
            r#"data: {"type": "response.completed", "response": {"output": [1, {"type": "message", "content": 2}]}}"#,
            r#"data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": null}}"#,
            r#"data: [1, 2]"#,
            "data: \u{0}",
        ];
        let mut bases = vec![
            [
                openai("mail jane.doe@exa", None),
                openai("mple.com 4111 1111 1111 1111", Some("stop")),
            ]
            .concat(),
            completion("to jane.doe@example.com", Some("stop")),
            responses_stream(&["card 4111 1111 ", "1111 1111", " jane.doe@example.com"]),
        ];
        bases.extend(
            odd.iter()
                .map(|o| format!("{}\n\n", o.replace("\\n", "\n"))),
        );
        let apis = [
            Api::OpenAiChat,
            Api::OpenAiCompletions,
            Api::OpenAiResponses,
            Api::AnthropicMessages,
            Api::Gemini,
            Api::VertexAi,
            Api::OpenAiEmbeddings,
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n.max(1) as u64) as usize
        };
        for round in 0..400 {
            let mut bytes = bases[rnd(bases.len())].clone().into_bytes();
            bytes.extend_from_slice(bases[rnd(bases.len())].as_bytes());
            for _ in 0..rnd(4) {
                let at = rnd(bytes.len());
                match rnd(3) {
                    0 => bytes[at] = rnd(256) as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, b"\n{}[]\":,"[rnd(8)]),
                }
            }
            let api = apis[round % apis.len()];
            let (ct, shape) = if rnd(3) == 0 && matches!(api, Api::Gemini | Api::VertexAi) {
                ("application/json", Some(StreamShape::JsonArray))
            } else {
                ("text/event-stream", None)
            };
            let mut ex = exchange_with(api, ct, shape);
            let mut chunks = Vec::new();
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let n = 1 + rnd(rest.len().min(40));
                chunks.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let (_, ended) = feed(&p, &mut ex, &chunks, rnd(2) == 0);
            if ended {
                let (more, again) = feed(&p, &mut ex, &[b"data: {}\n\n".to_vec()], false);
                assert!(again && more.is_empty());
            }
        }
    }
}
