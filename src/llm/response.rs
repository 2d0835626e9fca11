//! LLM responses, read incrementally as chunks pass: usage and generated text, per API, from
//! a JSON body, server-sent events, or Gemini's streamed JSON array.
//!
//! [`ResponseAccumulator::feed`] never fails and never holds the stream: it reads a copy of
//! each chunk. Framing errors (garbage, an over-long event) and upstream error events are
//! recorded in the summary; usage then falls back to counting (see
//! [`ResponseSummary::final_usage`]).
//!
//! The traps handled, per API:
//! - OpenAI Chat / Completions streams: usage only with `stream_options.include_usage`, in a
//!   last chunk whose `choices` is empty, `null` or missing; every other chunk has
//!   `usage: null`. Servers that repeat cumulative usage on every chunk are read as the
//!   latest, never added up.
//! - Responses: no `[DONE]`; `response.completed` / `response.incomplete` /
//!   `response.failed` carry the usage; text only from the deltas (the final event repeats it).
//! - Anthropic: input and cache counts only in `message_start` (a later `message_delta`
//!   can only raise them), output cumulative in `message_delta` (replaced, not added),
//!   cache reads and writes separate from `input_tokens` (added into the normalised input).
//! - Gemini / Vertex AI: `usageMetadata` repeated on every chunk (latest wins, field by field),
//!   several candidates (every candidate's text is kept; a candidate `index` of 0 is omitted
//!   on the wire), `thought` parts and `thoughtsTokenCount` (reasoning, added to output).

use serde_json::Value;

use super::detect::StreamShape;
use super::json_stream::{JsonArrayStream, DEFAULT_MAX_ELEMENT_BYTES};
use super::sse::{SseDecoder, DEFAULT_MAX_EVENT_BYTES};
use super::tokens::TokenCounter;
use super::usage::{sum, FinalUsage, Reader, Usage, UsageSource};
use super::Api;

/// Text buckets kept per choice / candidate; higher indexes share the last one (an index
/// from the upstream never sizes an allocation).
pub const MAX_CHOICES: usize = 16;
/// Default bound on the generated text kept (beyond it, only its length is tracked).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 4 << 20;
/// Default bound on a non-streamed JSON body held for parsing.
pub const DEFAULT_MAX_JSON_BYTES: usize = 16 << 20;

/// How the response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    Json,
    Sse,
    JsonArray,
}

impl ResponseFormat {
    /// From the response's `content-type` and what the request path said about streaming.
    pub fn detect(path_stream: Option<StreamShape>, content_type: Option<&str>) -> Self {
        // Bytes, not `str` slicing: a header value may hold multi-byte characters.
        let ct = content_type.unwrap_or("").trim_start().as_bytes();
        if ct.len() >= 17 && ct[..17].eq_ignore_ascii_case(b"text/event-stream") {
            ResponseFormat::Sse
        } else if path_stream == Some(StreamShape::JsonArray) {
            // Also reads a lone `{"error": ...}` object.
            ResponseFormat::JsonArray
        } else {
            ResponseFormat::Json
        }
    }
}

/// Bounds on what an accumulator holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_json_bytes: usize,
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES.max(DEFAULT_MAX_ELEMENT_BYTES),
            max_json_bytes: DEFAULT_MAX_JSON_BYTES,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
        }
    }
}

#[derive(Debug)]
enum Framing {
    Json(Vec<u8>),
    Sse(SseDecoder),
    Array(JsonArrayStream),
    /// Framing failed: nothing more is read.
    Broken,
}

/// Raw counts as the API names them, normalised by [`State::usage`].
#[derive(Debug, Default, Clone)]
struct Raw {
    input: Option<u64>,
    output: Option<u64>,
    cached: Option<u64>,
    cache_creation: Option<u64>,
    reasoning: Option<u64>,
    /// Gemini `toolUsePromptTokenCount`.
    tool_use_prompt: Option<u64>,
    anomaly: bool,
}

#[derive(Debug, Default)]
struct State {
    raw: Raw,
    choices: Vec<String>,
    reasoning: String,
    kept_text_bytes: usize,
    dropped_text_chars: u64,
    max_text: usize,
    model: Option<String>,
    complete: bool,
    upstream_error: Option<String>,
    framing_error: Option<String>,
    events: u64,
}

/// What a response said, once it has ended (or as far as it went).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSummary {
    pub api: Api,
    /// Reported usage, normalised (see [`Usage`]).
    pub usage: Usage,
    /// Generated text per choice / candidate (index order; see [`MAX_CHOICES`]).
    pub choices: Vec<String>,
    /// Reasoning / thinking text (Anthropic thinking, Gemini thoughts, reasoning summaries).
    pub reasoning: String,
    /// Characters generated beyond the kept text (see [`Limits::max_text_bytes`]).
    pub dropped_text_chars: u64,
    /// The model the upstream says answered.
    pub model: Option<String>,
    /// The response's end marker was seen (`[DONE]`, `message_stop`, `response.completed`,
    /// a Gemini `finishReason` or the array's `]`, a whole JSON body).
    pub complete: bool,
    /// An error the upstream reported in the body.
    pub upstream_error: Option<String>,
    /// The body could not be framed or parsed (garbage, over-long event).
    pub framing_error: Option<String>,
    /// Events (or elements, or JSON bodies) read.
    pub events: u64,
}

impl ResponseSummary {
    /// All generated text, choices separated by `\n`.
    pub fn text(&self) -> String {
        self.choices
            .iter()
            .filter(|c| !c.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The usage to charge: the upstream's where it reported it; otherwise input is
    /// `prompt_estimate` (the request's counted prompt) and output is counted from the
    /// generated text (choices and reasoning) for `model`.
    pub fn final_usage(
        &self,
        counter: &TokenCounter,
        model: &str,
        prompt_estimate: u64,
    ) -> FinalUsage {
        let (input_tokens, input_source) = match self.usage.input_tokens {
            Some(n) => (n, UsageSource::Reported),
            None => (prompt_estimate, UsageSource::Counted),
        };
        let (output_tokens, output_source) = match self.usage.output_tokens {
            Some(n) => (n, UsageSource::Reported),
            None => {
                let method = counter.method_for(self.api, model);
                let mut n: u64 = 0;
                for c in &self.choices {
                    n = n.saturating_add(counter.count_with(method, c));
                }
                n = n.saturating_add(counter.count_with(method, &self.reasoning));
                // Text beyond the kept bound: four characters a token.
                n = n.saturating_add(self.dropped_text_chars.div_ceil(4));
                (n, UsageSource::Counted)
            }
        };
        FinalUsage {
            input_tokens,
            output_tokens,
            cached_input_tokens: self.usage.cached_input_tokens.unwrap_or(0),
            cache_creation_input_tokens: self.usage.cache_creation_input_tokens.unwrap_or(0),
            reasoning_tokens: self.usage.reasoning_tokens.unwrap_or(0),
            input_source,
            output_source,
        }
    }
}

/// Reads one response incrementally.
#[derive(Debug)]
pub struct ResponseAccumulator {
    api: Api,
    framing: Framing,
    max_json: usize,
    st: State,
}

impl ResponseAccumulator {
    pub fn new(api: Api, format: ResponseFormat) -> Self {
        Self::with_limits(api, format, Limits::default())
    }

    pub fn with_limits(api: Api, format: ResponseFormat, limits: Limits) -> Self {
        let framing = match format {
            ResponseFormat::Json => Framing::Json(Vec::new()),
            ResponseFormat::Sse => Framing::Sse(SseDecoder::new(limits.max_event_bytes)),
            ResponseFormat::JsonArray => {
                Framing::Array(JsonArrayStream::new(limits.max_event_bytes))
            }
        };
        ResponseAccumulator {
            api,
            framing,
            max_json: limits.max_json_bytes,
            st: State {
                max_text: limits.max_text_bytes,
                ..State::default()
            },
        }
    }

    /// Read one body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        let api = self.api;
        let st = &mut self.st;
        let err = match &mut self.framing {
            Framing::Broken => return,
            Framing::Json(buf) => {
                if buf.len() + chunk.len() > self.max_json {
                    Some(format!("JSON body longer than {} bytes", self.max_json))
                } else {
                    buf.extend_from_slice(chunk);
                    None
                }
            }
            Framing::Sse(d) => d
                .push(chunk, |e| st.on_sse(api, e.event, e.data))
                .err()
                .map(|e| e.to_string()),
            Framing::Array(a) => {
                let r = a.push(chunk, |el| st.on_element(api, el));
                if a.is_done() {
                    st.complete = true;
                }
                r.err().map(|e| e.to_string())
            }
        };
        if let Some(e) = err {
            self.st.framing_error.get_or_insert(e);
            self.framing = Framing::Broken;
        }
    }

    /// Usage reported so far (normalised).
    pub fn usage(&self) -> Usage {
        self.st.usage(self.api)
    }

    /// Bytes of generated text kept so far (choices and reasoning).
    pub fn text_bytes(&self) -> usize {
        self.st.kept_text_bytes
    }

    /// The body ended (or the exchange did): flush what is pending and summarise.
    pub fn finish(mut self) -> ResponseSummary {
        let api = self.api;
        let st = &mut self.st;
        match std::mem::replace(&mut self.framing, Framing::Broken) {
            Framing::Json(buf) => {
                if !buf.is_empty() {
                    match serde_json::from_slice::<Value>(&buf) {
                        Ok(v) => {
                            st.events += 1;
                            st.on_json(api, &v, "");
                            if st.upstream_error.is_none() {
                                st.complete = true;
                            }
                        }
                        Err(e) => {
                            st.framing_error
                                .get_or_insert(format!("response is not JSON: {e}"));
                        }
                    }
                }
            }
            Framing::Sse(mut d) => {
                if let Err(e) = d.finish(|e| st.on_sse(api, e.event, e.data)) {
                    st.framing_error.get_or_insert(e.to_string());
                }
            }
            Framing::Array(_) | Framing::Broken => {}
        }
        ResponseSummary {
            api,
            usage: self.st.usage(api),
            choices: std::mem::take(&mut self.st.choices),
            reasoning: std::mem::take(&mut self.st.reasoning),
            dropped_text_chars: self.st.dropped_text_chars,
            model: self.st.model.take(),
            complete: self.st.complete,
            upstream_error: self.st.upstream_error.take(),
            framing_error: self.st.framing_error.take(),
            events: self.st.events,
        }
    }
}

impl State {
    fn usage(&self, api: Api) -> Usage {
        let r = &self.raw;
        let mut u = Usage {
            anomaly: r.anomaly,
            cached_input_tokens: r.cached,
            cache_creation_input_tokens: r.cache_creation,
            reasoning_tokens: r.reasoning,
            ..Usage::default()
        };
        match api {
            Api::AnthropicMessages => {
                // Anthropic's `input_tokens` excludes cache reads and writes.
                u.input_tokens = r.input.map(|i| {
                    i.saturating_add(r.cached.unwrap_or(0))
                        .saturating_add(r.cache_creation.unwrap_or(0))
                });
                u.output_tokens = r.output;
            }
            Api::Gemini | Api::VertexAi => {
                u.input_tokens = sum(r.input, r.tool_use_prompt);
                // Thoughts are billed as output but are not in `candidatesTokenCount`.
                u.output_tokens = match (r.output, r.reasoning) {
                    (None, None) => None,
                    (o, t) => Some(o.unwrap_or(0).saturating_add(t.unwrap_or(0))),
                };
            }
            Api::OpenAiEmbeddings => {
                u.input_tokens = r.input;
                u.output_tokens = r.input.map(|_| 0);
            }
            _ => {
                u.input_tokens = r.input;
                u.output_tokens = r.output;
            }
        }
        u
    }

    fn push_text(&mut self, choice: Option<usize>, s: &str) {
        if s.is_empty() {
            return;
        }
        let room = self.max_text.saturating_sub(self.kept_text_bytes);
        let keep = if s.len() <= room {
            s
        } else {
            let mut cut = room;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            self.dropped_text_chars = self
                .dropped_text_chars
                .saturating_add(s[cut..].chars().count() as u64);
            &s[..cut]
        };
        if keep.is_empty() {
            return;
        }
        self.kept_text_bytes += keep.len();
        match choice {
            Some(i) => {
                let i = i.min(MAX_CHOICES - 1);
                if self.choices.len() <= i {
                    self.choices.resize(i + 1, String::new());
                }
                self.choices[i].push_str(keep);
            }
            None => self.reasoning.push_str(keep),
        }
    }

    fn set_model(&mut self, v: Option<&Value>) {
        if self.model.is_none() {
            if let Some(Value::String(m)) = v {
                self.model = Some(m.clone());
            }
        }
    }

    fn set_error(&mut self, v: &Value) {
        if self.upstream_error.is_some() {
            return;
        }
        let msg = match v {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string()),
            other => other.to_string(),
        };
        self.upstream_error = Some(msg);
    }

    fn on_sse(&mut self, api: Api, event: &str, data: &str) {
        self.events += 1;
        let data = data.trim();
        if data == "[DONE]" {
            self.complete = true;
            return;
        }
        // Chat and completions chunks, the commonest events, are read into borrowed structs:
        // no map or string allocation per event. Anything they do not fit (another type
        // in a field, duplicate keys) takes the general path below, which reads the same
        // fields from a `Value`.
        if matches!(api, Api::OpenAiChat | Api::OpenAiCompletions) {
            if let Ok(c) = serde_json::from_str::<fast::Chunk<'_>>(data) {
                self.openai_fast(c);
                return;
            }
        }
        match serde_json::from_str::<Value>(data) {
            Ok(v) => self.on_json(api, &v, event),
            Err(e) => {
                self.framing_error
                    .get_or_insert_with(|| format!("event data is not JSON: {e}"));
            }
        }
    }

    fn on_element(&mut self, api: Api, el: &[u8]) {
        self.events += 1;
        match serde_json::from_slice::<Value>(el) {
            Ok(v) => self.on_json(api, &v, ""),
            Err(e) => {
                self.framing_error
                    .get_or_insert_with(|| format!("array element is not JSON: {e}"));
            }
        }
    }

    fn on_json(&mut self, api: Api, v: &Value, event: &str) {
        if !v.is_object() {
            return;
        }
        match api {
            Api::OpenAiChat | Api::OpenAiCompletions | Api::OpenAiEmbeddings => self.openai(v),
            Api::OpenAiResponses => self.responses(v, event),
            Api::AnthropicMessages => self.anthropic(v, event),
            Api::Gemini | Api::VertexAi => self.gemini(v),
        }
    }

    // ---- OpenAI Chat Completions, Completions, Embeddings ----

    fn openai(&mut self, v: &Value) {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            self.set_error(e);
        }
        self.set_model(v.get("model"));
        // `choices` may be missing, `null` or empty (the usage chunk).
        if let Some(Value::Array(choices)) = v.get("choices") {
            for (pos, c) in choices.iter().enumerate() {
                let idx = c
                    .get("index")
                    .and_then(Value::as_u64)
                    .map_or(pos, |i| i.min(MAX_CHOICES as u64) as usize);
                if let Some(Value::String(t)) = c.get("text") {
                    self.push_text(Some(idx), t);
                }
                let Some(m) = c.get("delta").or_else(|| c.get("message")) else {
                    continue;
                };
                for key in ["content", "refusal"] {
                    if let Some(Value::String(t)) = m.get(key) {
                        self.push_text(Some(idx), t);
                    }
                }
                // Reasoning text as vLLM, DeepSeek and routers send it.
                for key in ["reasoning_content", "reasoning"] {
                    if let Some(Value::String(t)) = m.get(key) {
                        self.push_text(None, t);
                    }
                }
                if let Some(Value::Array(calls)) = m.get("tool_calls") {
                    for call in calls {
                        if let Some(Value::String(a)) =
                            call.get("function").and_then(|f| f.get("arguments"))
                        {
                            self.push_text(Some(idx), a);
                        }
                    }
                }
                if let Some(Value::String(a)) =
                    m.get("function_call").and_then(|f| f.get("arguments"))
                {
                    self.push_text(Some(idx), a);
                }
            }
        }
        if let Some(u @ Value::Object(_)) = v.get("usage") {
            self.openai_usage(u);
        }
    }

    fn openai_usage(&mut self, u: &Value) {
        let mut flags = Usage::default();
        let mut r = Reader { usage: &mut flags };
        latest(&mut self.raw.input, r.get(u.get("prompt_tokens")));
        latest(&mut self.raw.output, r.get(u.get("completion_tokens")));
        latest(
            &mut self.raw.cached,
            r.get(u.pointer("/prompt_tokens_details/cached_tokens")),
        );
        latest(
            &mut self.raw.reasoning,
            r.get(u.pointer("/completion_tokens_details/reasoning_tokens")),
        );
        self.raw.anomaly |= flags.anomaly;
    }

    /// [`State::openai`] for a chunk read by [`fast::Chunk`].
    fn openai_fast(&mut self, c: fast::Chunk<'_>) {
        if let Some(e) = c.error.as_ref().filter(|e| !e.is_null()) {
            self.set_error(e);
        }
        if self.model.is_none() {
            if let Some(m) = c.model {
                self.model = Some(m.into_owned());
            }
        }
        for (pos, ch) in c.choices.unwrap_or_default().iter().enumerate() {
            let idx = ch.index.map_or(pos, |i| i.min(MAX_CHOICES as u64) as usize);
            if let Some(t) = &ch.text {
                self.push_text(Some(idx), t);
            }
            let Some(m) = ch.delta.as_ref().or(ch.message.as_ref()) else {
                continue;
            };
            for t in [&m.content, &m.refusal].into_iter().flatten() {
                self.push_text(Some(idx), t);
            }
            for t in [&m.reasoning_content, &m.reasoning].into_iter().flatten() {
                self.push_text(None, t);
            }
            for call in m.tool_calls.iter().flatten() {
                if let Some(a) = call.function.as_ref().and_then(|f| f.arguments.as_ref()) {
                    self.push_text(Some(idx), a);
                }
            }
            if let Some(a) = m.function_call.as_ref().and_then(|f| f.arguments.as_ref()) {
                self.push_text(Some(idx), a);
            }
        }
        if let Some(u @ Value::Object(_)) = c.usage.as_ref() {
            self.openai_usage(u);
        }
    }

    // ---- OpenAI Responses ----

    fn responses(&mut self, v: &Value, event: &str) {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(event);
        let delta = || v.get("delta").and_then(Value::as_str).unwrap_or("");
        match kind {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta" => self.push_text(Some(0), delta()),
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                self.push_text(None, delta())
            }
            "response.created" | "response.in_progress" => {
                if let Some(r) = v.get("response") {
                    self.set_model(r.get("model"));
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.complete = true;
                if let Some(r) = v.get("response") {
                    self.set_model(r.get("model"));
                    if let Some(e) = r.get("error").filter(|e| !e.is_null()) {
                        self.set_error(e);
                    }
                    self.responses_usage(r.get("usage"));
                }
            }
            "error" => self.set_error(v.get("error").unwrap_or(v)),
            _ if kind.is_empty() || v.get("object").and_then(Value::as_str) == Some("response") => {
                // A whole (non-streamed) response.
                self.set_model(v.get("model"));
                if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
                    self.set_error(e);
                }
                if let Some(Value::Array(items)) = v.get("output") {
                    for item in items {
                        self.responses_output_item(item);
                    }
                }
                self.responses_usage(v.get("usage"));
            }
            _ => {}
        }
    }

    fn responses_output_item(&mut self, item: &Value) {
        match item.get("type").and_then(Value::as_str).unwrap_or("") {
            "message" => {
                if let Some(Value::Array(parts)) = item.get("content") {
                    for p in parts {
                        for key in ["text", "refusal"] {
                            if let Some(Value::String(t)) = p.get(key) {
                                self.push_text(Some(0), t);
                            }
                        }
                    }
                }
            }
            "function_call" => {
                if let Some(Value::String(a)) = item.get("arguments") {
                    self.push_text(Some(0), a);
                }
            }
            "reasoning" => {
                if let Some(Value::Array(s)) = item.get("summary") {
                    for p in s {
                        if let Some(Value::String(t)) = p.get("text") {
                            self.push_text(None, t);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn responses_usage(&mut self, u: Option<&Value>) {
        let Some(u @ Value::Object(_)) = u else {
            return;
        };
        let mut flags = Usage::default();
        let mut r = Reader { usage: &mut flags };
        latest(&mut self.raw.input, r.get(u.get("input_tokens")));
        latest(&mut self.raw.output, r.get(u.get("output_tokens")));
        latest(
            &mut self.raw.cached,
            r.get(u.pointer("/input_tokens_details/cached_tokens")),
        );
        latest(
            &mut self.raw.reasoning,
            r.get(u.pointer("/output_tokens_details/reasoning_tokens")),
        );
        self.raw.anomaly |= flags.anomaly;
    }

    // ---- Anthropic Messages ----

    fn anthropic(&mut self, v: &Value, event: &str) {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(event);
        match kind {
            "message_start" => {
                if let Some(m) = v.get("message") {
                    self.set_model(m.get("model"));
                    self.anthropic_usage(m.get("usage"), false);
                }
            }
            "content_block_start" => {
                if let Some(b) = v.get("content_block") {
                    self.anthropic_block(b);
                }
            }
            "content_block_delta" => {
                let Some(d) = v.get("delta") else { return };
                let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("");
                match d.get("type").and_then(Value::as_str).unwrap_or("") {
                    "text_delta" => self.push_text(Some(0), s("text")),
                    "input_json_delta" => self.push_text(Some(0), s("partial_json")),
                    "thinking_delta" => self.push_text(None, s("thinking")),
                    _ => {}
                }
            }
            "message_delta" => self.anthropic_usage(v.get("usage"), true),
            "message_stop" => self.complete = true,
            "error" => self.set_error(v.get("error").unwrap_or(v)),
            "message" => {
                // A whole (non-streamed) message.
                self.set_model(v.get("model"));
                if let Some(Value::Array(blocks)) = v.get("content") {
                    for b in blocks {
                        self.anthropic_block(b);
                    }
                }
                self.anthropic_usage(v.get("usage"), false);
            }
            _ => {}
        }
    }

    fn anthropic_block(&mut self, b: &Value) {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => {
                if let Some(Value::String(t)) = b.get("text") {
                    self.push_text(Some(0), t);
                }
            }
            "thinking" => {
                if let Some(Value::String(t)) = b.get("thinking") {
                    self.push_text(None, t);
                }
            }
            "tool_use" | "server_tool_use" => {
                // Streamed tool input arrives as `input_json_delta`; the start block's
                // `input` is an empty placeholder then.
                if let Some(i) = b.get("input").filter(|i| {
                    !matches!(i, Value::Null) && i.as_object().is_none_or(|o| !o.is_empty())
                }) {
                    self.push_text(Some(0), &i.to_string());
                }
            }
            _ => {}
        }
    }

    /// `delta`: a `message_delta`, whose output count is cumulative (replaces) and whose
    /// input-side counts, when present, can only raise what `message_start` said.
    fn anthropic_usage(&mut self, u: Option<&Value>, delta: bool) {
        let Some(u @ Value::Object(_)) = u else {
            return;
        };
        let mut flags = Usage::default();
        let mut r = Reader { usage: &mut flags };
        let input = r.get(u.get("input_tokens"));
        let creation = r.get(u.get("cache_creation_input_tokens"));
        let read = r.get(u.get("cache_read_input_tokens"));
        let output = r.get(u.get("output_tokens"));
        self.raw.anomaly |= flags.anomaly;
        if delta {
            raise(&mut self.raw.input, input);
            raise(&mut self.raw.cache_creation, creation);
            raise(&mut self.raw.cached, read);
        } else {
            latest(&mut self.raw.input, input);
            latest(&mut self.raw.cache_creation, creation);
            latest(&mut self.raw.cached, read);
        }
        latest(&mut self.raw.output, output);
    }

    // ---- Gemini / Vertex AI ----

    fn gemini(&mut self, v: &Value) {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            self.set_error(e);
        }
        self.set_model(v.get("modelVersion"));
        if let Some(reason) = v
            .pointer("/promptFeedback/blockReason")
            .and_then(Value::as_str)
        {
            if self.upstream_error.is_none() {
                self.upstream_error = Some(format!("prompt blocked: {reason}"));
            }
        }
        if let Some(Value::Array(cands)) = v.get("candidates") {
            for c in cands {
                // proto3 JSON omits a zero index.
                let idx = c
                    .get("index")
                    .and_then(Value::as_u64)
                    .map_or(0, |i| i.min(MAX_CHOICES as u64) as usize);
                if let Some(Value::Array(parts)) = c.pointer("/content/parts") {
                    for p in parts {
                        let thought = p.get("thought").and_then(Value::as_bool) == Some(true);
                        if let Some(Value::String(t)) = p.get("text") {
                            self.push_text(if thought { None } else { Some(idx) }, t);
                        } else if let Some(f) = p.get("functionCall") {
                            if let Some(a) = f.get("args") {
                                self.push_text(Some(idx), &a.to_string());
                            }
                        }
                    }
                }
                if c.get("finishReason").is_some_and(|r| !r.is_null()) {
                    self.complete = true;
                }
            }
        }
        if let Some(u @ Value::Object(_)) = v.get("usageMetadata") {
            let mut flags = Usage::default();
            let mut r = Reader { usage: &mut flags };
            latest(&mut self.raw.input, r.get(u.get("promptTokenCount")));
            latest(&mut self.raw.output, r.get(u.get("candidatesTokenCount")));
            latest(&mut self.raw.reasoning, r.get(u.get("thoughtsTokenCount")));
            latest(
                &mut self.raw.cached,
                r.get(u.get("cachedContentTokenCount")),
            );
            latest(
                &mut self.raw.tool_use_prompt,
                r.get(u.get("toolUsePromptTokenCount")),
            );
            self.raw.anomaly |= flags.anomaly;
        }
    }
}

/// Cumulative counts: the latest reported value replaces the previous one.
fn latest(slot: &mut Option<u64>, v: Option<u64>) {
    if v.is_some() {
        *slot = v;
    }
}

/// A later report may only raise a count.
fn raise(slot: &mut Option<u64>, v: Option<u64>) {
    if let Some(n) = v {
        *slot = Some(slot.map_or(n, |s| s.max(n)));
    }
}

/// Borrowed shapes of OpenAI chat and completions chunks (see `State::on_sse`). Fields
/// another type than these fail the whole read, and the event is read as a `Value`.
mod fast {
    use std::borrow::Cow;

    use serde::Deserialize;
    use serde_json::Value;

    #[derive(Deserialize)]
    pub struct Chunk<'a> {
        #[serde(borrow, default)]
        pub model: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        pub choices: Option<Vec<Choice<'a>>>,
        /// Rare (the last chunk, an error): a `Value` is fine.
        #[serde(default)]
        pub usage: Option<Value>,
        #[serde(default)]
        pub error: Option<Value>,
    }

    #[derive(Deserialize)]
    pub struct Choice<'a> {
        #[serde(default)]
        pub index: Option<u64>,
        #[serde(borrow, default)]
        pub text: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        pub delta: Option<Message<'a>>,
        #[serde(borrow, default)]
        pub message: Option<Message<'a>>,
    }

    #[derive(Deserialize)]
    pub struct Message<'a> {
        #[serde(borrow, default)]
        pub content: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        pub refusal: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        pub reasoning_content: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        pub reasoning: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        pub tool_calls: Option<Vec<ToolCall<'a>>>,
        #[serde(borrow, default)]
        pub function_call: Option<Function<'a>>,
    }

    #[derive(Deserialize)]
    pub struct ToolCall<'a> {
        #[serde(borrow, default)]
        pub function: Option<Function<'a>>,
    }

    #[derive(Deserialize)]
    pub struct Function<'a> {
        #[serde(borrow, default)]
        pub arguments: Option<Cow<'a, str>>,
    }
}

#[cfg(test)]
mod fast_tests {
    use super::*;

    /// The borrowed read and the `Value` read of a chunk leave the same state, and chunks the
    /// borrowed shapes do not fit fall back to the `Value` read.
    #[test]
    fn fast_and_general_reads_agree() {
        let events = [
            r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel\"lo \u00e9\n"}}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"two"}},{"delta":{"refusal":"no"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"think","reasoning":"more"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"function_call":{"arguments":"[2]"}}}]}"#,
            r#"{"choices":[{"index":0,"text":"legacy","logprobs":null,"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"message":{"content":"whole"}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":"9","prompt_tokens_details":{"cached_tokens":2}}}"#,
            r#"{"choices":null,"usage":null}"#,
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            r#"{"choices":[{"index":99999999999,"delta":{"content":"far"}}]}"#,
            // Shapes the borrowed read refuses: the general read decides.
            r#"{"model":7,"choices":[{"index":-1,"delta":{"content":["x"]}}]}"#,
            r#"{"choices":{"0":{"delta":{"content":"map"}}}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"index":1.5,"delta":{"content":7,"refusal":"r"}}]}"#,
        ];
        for api in [Api::OpenAiChat, Api::OpenAiCompletions] {
            let mut fast = State::default();
            let mut general = State::default();
            fast.max_text = 1 << 20;
            general.max_text = 1 << 20;
            for e in events {
                fast.on_sse(api, "", e);
                general.events += 1;
                match serde_json::from_str::<Value>(e) {
                    Ok(v) => general.on_json(api, &v, ""),
                    Err(_) => unreachable!("test events are JSON"),
                }
            }
            assert_eq!(format!("{fast:?}"), format!("{general:?}"));
            assert!(
                fast.choices[0].starts_with("Hel\"lo é\n"),
                "{:?}",
                fast.choices
            );
        }
    }
}
