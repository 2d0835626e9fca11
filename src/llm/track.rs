//! The LLM tracker: what fills the exchange's LLM slots (`ex.state.llm`,
//! `llm_prompt_tokens`, `llm_usage`) for the steps that read them (`Hooks::llm`).
//!
//! A flow tracks when one of its steps declares `Hooks::llm` or it has an `llm:` block.
//! Compiling such a flow inserts one internal step, [`LlmTracking`], into both directions:
//!
//! - **request**: right before the first request step that declares `Hooks::llm` (at the end
//!   of the request steps when only response steps or the `llm:` block ask). It needs the
//!   body, so from there on the flow holds the request body, and steps before it still run on
//!   the headers. Its body hook detects the API ([`super::detect`]), parses the body once
//!   through the exchange's shared JSON parse, counts the prompt once, and keeps a
//!   [`Tracker`] in `ex.state.llm_tracker`. A body on an LLM endpoint that cannot be read
//!   (not JSON, a known field of the wrong type, no body) is answered 400
//!   [`INVALID_REQUEST`]; a body past `maxBodyBytes` gets the flow's 413. A request that is
//!   no LLM call (`GET /v1/models`) leaves the slots empty and costs nothing more.
//!   It claims `accept-encoding` (removed before any step runs): the upstream then answers
//!   uncompressed, so the response can be read as it passes.
//! - **response**: the first response step. It picks the framing from the request's stream
//!   shape and the response's `content-type`, then sees every chunk first, through the
//!   pipeline's chunk path (FULL_DUPLEX_STREAMED, STREAMED, and the whole body at once when
//!   BUFFERED), and feeds one [`ResponseAccumulator`]. With `includeUsage` it also drops the
//!   usage-only chunk the client did not ask for.
//!
//! [`finish`] sets `ex.state.llm_usage` once: the stream calls it when the response ends
//! (before any response-end, copy or after-exchange hook), when tollgate answers, and when
//! the stream goes away. What is charged:
//! - a response that ended: the upstream's usage where it reported it, else the counted
//!   prompt and the tokens of the generated text ([`ResponseSummary::final_usage`]);
//! - an upstream error status (4xx/5xx): no output; input only if the upstream reported it
//!   (providers do not bill failed calls);
//! - an abort or a broken stream after the response began: as a response that ended, with
//!   the text streamed so far; output is the larger of the last usage reported and the
//!   streamed text's count (Anthropic's `message_start` reports 1 output token);
//! - no upstream response (tollgate answered, or the exchange ended first): the counted
//!   prompt, no output.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use super::detect::StreamShape;
use super::response::{ResponseAccumulator, ResponseFormat, ResponseSummary};
use super::tokens::{CountingConfig, CountingConfigError, TokenCounter};
use super::usage::{FinalUsage, UsageSource};
use super::{Api, LlmRequest};
use crate::fault::Fault;
use crate::pipeline::{
    Chunk, ChunkAction, ChunkSpec, Direction, ExchangeEnd, Hook, Hooks, Outcome, Policy,
};
use crate::telemetry::gen_ai::{self, CallLabels, CallTimes};
use crate::vars::Exchange;

/// The fault code of a request to an LLM endpoint whose body cannot be read.
pub const INVALID_REQUEST: &str = "steps.llm.InvalidRequest";
/// The name the internal step has in faults and logs.
pub const STEP_NAME: &str = "llm-tracking";

/// A flow's tracking settings (its `llm:` block, or the defaults).
#[derive(Debug, Clone, Default)]
pub struct TrackConfig {
    pub counter: TokenCounter,
    /// Add `stream_options.include_usage` to OpenAI streaming requests that did not ask,
    /// and drop the usage-only chunk from what their client sees.
    pub include_usage: bool,
}

impl TrackConfig {
    pub fn new(counting: CountingConfig, include_usage: bool) -> Result<Self, CountingConfigError> {
        Ok(Self {
            counter: TokenCounter::new(counting)?,
            include_usage,
        })
    }
}

/// One exchange's tracking state (in `ex.state.llm_tracker`).
#[derive(Debug)]
pub struct Tracker {
    cfg: Arc<TrackConfig>,
    api: Api,
    model: String,
    stream: bool,
    path_stream: Option<StreamShape>,
    started: Instant,
    /// Set once the response headers are known.
    acc: Option<ResponseAccumulator>,
    status: u16,
    /// Response bytes fed so far (the stream hands the rest of a held body over once).
    fed: usize,
    /// The response is compressed: its bytes are not read.
    encoded: bool,
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    /// tollgate added `include_usage`: the usage-only chunk is not for the client.
    drop_usage_chunk: bool,
    done: bool,
}

impl Tracker {
    /// The model the request now names (a model router rewrote it): usage is counted and
    /// reported for the model the upstream serves.
    pub fn set_model(&mut self, model: &str) {
        model.clone_into(&mut self.model);
    }

    /// tollgate asked the upstream for a usage chunk the client did not ask for.
    pub fn injected_usage(&self) -> bool {
        self.drop_usage_chunk
    }

    /// Feeds response bytes (no-op before the response headers, after the end, or on a
    /// compressed body).
    fn feed(&mut self, data: &[u8]) {
        if self.done || data.is_empty() {
            return;
        }
        self.fed = self.fed.saturating_add(data.len());
        if self.encoded {
            return;
        }
        let Some(acc) = self.acc.as_mut() else {
            return;
        };
        let before = acc.text_bytes();
        acc.feed(data);
        if acc.text_bytes() > before {
            let now = Instant::now();
            self.first_text.get_or_insert(now);
            self.last_text = Some(now);
        }
    }
}

/// The internal step that tracks a flow's LLM traffic (see the module documentation).
#[derive(Debug)]
pub struct LlmTracking {
    cfg: Arc<TrackConfig>,
}

impl LlmTracking {
    pub fn new(cfg: Arc<TrackConfig>) -> Self {
        Self { cfg }
    }

    fn fault(message: String) -> Fault {
        Fault::new(400, INVALID_REQUEST, message)
    }

    /// Parses the request (rewriting it for `includeUsage`): `None` when it is no LLM call.
    fn parse(&self, ex: &mut Exchange) -> Result<Option<(LlmRequest, bool)>, Fault> {
        let endpoint = {
            let headers = &ex.request.headers;
            super::detect(&ex.request.method, &ex.request.uri, |h| headers.get(h))
        };
        let Some(endpoint) = endpoint else {
            return Ok(None);
        };
        let parsed = {
            let Some(json) = ex.body_json(Direction::Request) else {
                return Err(Self::fault(format!(
                    "{} needs a JSON request body",
                    endpoint.api.as_str()
                )));
            };
            let v = json.value.as_ref().map_err(|e| {
                Self::fault(format!(
                    "The {} request body is not valid JSON: {e}",
                    endpoint.api.as_str()
                ))
            })?;
            super::request::parse_request_json(&endpoint, v)
                .map_err(|e| Self::fault(format!("The {} {e}", endpoint.api.as_str())))
                .map(|r| (r, self.cfg.include_usage && wants_usage_injection(v)))
        };
        let (req, inject) = parsed?;
        let inject = inject
            && req.stream
            && !req.include_usage
            && matches!(req.api, Api::OpenAiChat | Api::OpenAiCompletions);
        if inject {
            if let Some(body) = with_include_usage(ex) {
                ex.replace_body(Direction::Request, body);
            }
        }
        Ok(Some((req, inject)))
    }

    /// Fills the slots and starts tracking.
    fn install(&self, ex: &mut Exchange, req: LlmRequest, prompt: u64, inject: bool) {
        ex.state.llm_prompt_tokens = Some(prompt);
        ex.state.llm_tracker = Some(Box::new(Tracker {
            cfg: self.cfg.clone(),
            api: req.api,
            model: req.model.clone().unwrap_or_default(),
            stream: req.stream || req.stream_shape.is_some(),
            path_stream: req.stream_shape,
            started: Instant::now(),
            acc: None,
            status: 0,
            fed: 0,
            encoded: false,
            first_text: None,
            last_text: None,
            drop_usage_chunk: inject,
            done: false,
        }));
        ex.state.llm = Some(Arc::new(req));
    }
}

/// Prompts longer than this (bytes of text and tool definitions) are counted on the
/// blocking pool: tiktoken on a megabyte takes long enough to hold up the other streams
/// this worker thread serves.
pub const INLINE_COUNT_BYTES: usize = 64 * 1024;

/// Whether the body's `stream_options` leaves room for tollgate to add `include_usage`
/// (absent, or an object without it).
fn wants_usage_injection(v: &serde_json::Value) -> bool {
    match v.get("stream_options") {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Object(o)) => !o.contains_key("include_usage"),
        Some(_) => false,
    }
}

/// The request body with `stream_options.include_usage: true` added.
fn with_include_usage(ex: &Exchange) -> Option<Vec<u8>> {
    let json = ex.body_json(Direction::Request)?;
    let mut v = json.value.as_ref().ok()?.clone();
    let obj = v.as_object_mut()?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    if opts.is_null() {
        *opts = serde_json::Value::Object(serde_json::Map::new());
    }
    opts.as_object_mut()?
        .insert("include_usage".to_owned(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok()
}

impl Policy for LlmTracking {
    fn type_name(&self) -> &'static str {
        "LlmTracking"
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request
    }

    fn replaces_body(&self, dir: Direction) -> bool {
        dir == Direction::Request && self.cfg.include_usage
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            // Whole events only when a usage chunk may have to be dropped; otherwise raw
            // bytes, nothing held (the accumulator frames them itself).
            response_chunks: Some(if self.cfg.include_usage {
                ChunkSpec::events(0)
            } else {
                ChunkSpec::bytes(0)
            }),
            ..Hooks::default()
        }
    }

    fn owned_request_headers(&self) -> Vec<String> {
        vec!["accept-encoding".to_owned()]
    }

    fn request_body<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        let (req, inject) = match self.parse(ex) {
            Err(f) => return Hook::Ready(Outcome::Reject(f)),
            Ok(None) => return Hook::CONTINUE,
            Ok(Some(r)) => r,
        };
        let in_thread = req.prompt.len().saturating_add(req.tools.len()) <= INLINE_COUNT_BYTES
            || tokio::runtime::Handle::try_current().is_err();
        if in_thread {
            let prompt = self.cfg.counter.count_request(&req, None);
            self.install(ex, req, prompt, inject);
            return Hook::CONTINUE;
        }
        Hook::Pending(Box::pin(async move {
            let req = Arc::new(req);
            let (counter, r) = (self.cfg.counter.clone(), req.clone());
            let prompt =
                match tokio::task::spawn_blocking(move || counter.count_request(&r, None)).await {
                    Ok(n) => n,
                    // The pool is shutting down: count here rather than pass the prompt as free.
                    Err(_) => self.cfg.counter.count_request(&req, None),
                };
            let req = Arc::try_unwrap(req).unwrap_or_else(|a| (*a).clone());
            self.install(ex, req, prompt, inject);
            Outcome::Continue
        }))
    }

    fn response_headers<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        on_response_headers(ex);
        Hook::CONTINUE
    }

    fn response_chunk(&self, ex: &mut Exchange, chunk: &mut Chunk) -> ChunkAction {
        let Some(t) = ex.state.llm_tracker.as_mut() else {
            return ChunkAction::Pass;
        };
        t.feed(&chunk.data);
        if t.drop_usage_chunk && chunk.whole_events {
            drop_usage_events(&mut chunk.data);
        }
        ChunkAction::Pass
    }
}

/// The response headers are known: the framing is chosen.
pub fn on_response_headers(ex: &mut Exchange) {
    let Some(resp) = ex.response.as_ref() else {
        return;
    };
    let Some(t) = ex.state.llm_tracker.as_mut() else {
        return;
    };
    if t.acc.is_some() || t.done {
        return;
    }
    t.status = resp.status;
    let ct = resp.headers.get("content-type");
    t.encoded = resp
        .headers
        .get("content-encoding")
        .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
    if t.encoded {
        tracing::warn!(
            api = t.api.as_str(),
            "compressed LLM response: usage cannot be read; counted instead"
        );
    }
    let format = ResponseFormat::detect(t.path_stream, ct);
    t.acc = Some(ResponseAccumulator::new(t.api, format));
}

/// The whole response body is known before the response's body steps run (it was held):
/// feeds what the chunk path did not, and finishes.
pub fn whole_response(ex: &mut Exchange, body: &[u8]) {
    let Some(t) = ex.state.llm_tracker.as_mut() else {
        return;
    };
    if t.done {
        return;
    }
    let rest = body.get(t.fed..).unwrap_or_default();
    t.feed(rest);
    finish(ex, ExchangeEnd::Completed);
}

/// Sets `ex.state.llm_usage` for a tracked exchange, once, and records the call's metrics
/// (see the module documentation for what is charged). A no-op for untracked exchanges and
/// after the first call.
pub fn finish(ex: &mut Exchange, end: ExchangeEnd) {
    let Some(t) = ex.state.llm_tracker.as_mut() else {
        return;
    };
    if t.done {
        return;
    }
    t.done = true;
    let summary = t.acc.take().map(ResponseAccumulator::finish);
    let prompt = ex.state.llm_prompt_tokens.unwrap_or(0);
    let Some(t) = ex.state.llm_tracker.as_deref() else {
        return;
    };
    let (usage, error_type) = charge(t, summary.as_ref(), prompt, end);
    let response_model = summary
        .as_ref()
        .and_then(|s| s.model.clone())
        .unwrap_or_default();
    let now = Instant::now();
    let streamed = t.stream;
    let times = CallTimes {
        duration: now.duration_since(t.started).as_secs_f64(),
        time_to_first_token: t
            .first_text
            .filter(|_| streamed)
            .map(|f| f.duration_since(t.started).as_secs_f64()),
        time_per_output_token: match (t.first_text, t.last_text) {
            (Some(f), Some(l)) if streamed && usage.output_tokens > 1 => {
                Some(l.duration_since(f).as_secs_f64() / (usage.output_tokens - 1) as f64)
            }
            _ => None,
        },
    };
    let api = t.api;
    let request_model = t.model.clone();
    let reached_upstream = summary.is_some();
    ex.state.llm_usage = Some(usage);
    ex.state.llm_response = summary.map(Box::new);
    if !reached_upstream && end == ExchangeEnd::Answered {
        // tollgate answered: no model was called.
        return;
    }
    let Some(u) = ex.state.llm_usage.as_ref() else {
        return;
    };
    gen_ai::record_call(
        ex,
        &CallLabels {
            operation: api.operation_name(),
            provider: api.provider_name(),
            request_model: &request_model,
            response_model: &response_model,
            error_type,
        },
        &times,
        u.input_tokens,
        u.output_tokens,
    );
}

/// What the exchange is charged with, and its `error.type` (empty on success).
fn charge(
    t: &Tracker,
    summary: Option<&ResponseSummary>,
    prompt: u64,
    end: ExchangeEnd,
) -> (FinalUsage, Cow<'static, str>) {
    let counted = |input: u64| FinalUsage {
        input_tokens: input,
        output_tokens: 0,
        cached_input_tokens: 0,
        cache_creation_input_tokens: 0,
        reasoning_tokens: 0,
        input_source: UsageSource::Counted,
        output_source: UsageSource::Counted,
    };
    let Some(s) = summary else {
        // No upstream response: the prompt, nothing generated.
        let error = match end {
            ExchangeEnd::Aborted => "aborted",
            ExchangeEnd::Failed => "failed",
            _ => "",
        };
        return (counted(prompt), Cow::Borrowed(error));
    };
    if t.status >= 400 {
        let mut u = counted(s.usage.input_tokens.unwrap_or(0));
        if s.usage.input_tokens.is_some() {
            u.input_source = UsageSource::Reported;
        }
        if let Some(o) = s.usage.output_tokens {
            u.output_tokens = o;
            u.output_source = UsageSource::Reported;
        }
        return (u, Cow::Owned(t.status.to_string()));
    }
    let mut usage = s.final_usage(&t.cfg.counter, &t.model, prompt);
    if !s.complete && usage.output_source == UsageSource::Reported {
        // A stream cut short reports output only as far as its last usage (Anthropic's
        // `message_start` says 1): the text that did stream may be more.
        let mut text_only = s.clone();
        text_only.usage.output_tokens = None;
        let counted = text_only
            .final_usage(&t.cfg.counter, &t.model, prompt)
            .output_tokens;
        if counted > usage.output_tokens {
            usage.output_tokens = counted;
            usage.output_source = UsageSource::Counted;
        }
    }
    let error = match end {
        ExchangeEnd::Aborted => "aborted",
        ExchangeEnd::Failed => "failed",
        _ if s.upstream_error.is_some() => "upstream_error",
        _ => "",
    };
    (usage, Cow::Borrowed(error))
}

/// Drops, from whole server-sent events, the usage-only chunk of an OpenAI stream: `usage`
/// set, `choices` empty, `null` or missing.
fn drop_usage_events(data: &mut Vec<u8>) {
    // Cheap test first, no allocation: most events carry no usage, or `"usage":null`.
    if !has_usage_value(data) {
        return;
    }
    let chunk = Chunk {
        data: std::mem::take(data),
        end_of_stream: false,
        whole_events: true,
    };
    let mut out = Vec::with_capacity(chunk.data.len());
    for event in chunk.events() {
        if !is_usage_only(event) {
            out.extend_from_slice(event);
        }
    }
    *data = out;
}

/// Some `"usage"` key in `data` has a value other than `null`.
fn has_usage_value(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut rest = data;
    while let Some(i) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[i + KEY.len()..];
        let value = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b':'))
            .map_or(&[][..], |j| &rest[j..]);
        if !value.starts_with(b"null") {
            return true;
        }
    }
    false
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    usage: Option<serde::de::IgnoredAny>,
}

/// One event (with its blank line) is an OpenAI usage-only chunk.
fn is_usage_only(event: &[u8]) -> bool {
    if !has_usage_value(event) {
        return false;
    }
    let Ok(text) = std::str::from_utf8(event) else {
        return false;
    };
    let mut data = String::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    match serde_json::from_str::<Probe>(&data) {
        Ok(p) => p.usage.is_some() && p.choices.is_none_or(|c| c.is_empty()),
        Err(_) => false,
    }
}

#[cfg(test)]
#[path = "track_tests.rs"]
mod tests;
