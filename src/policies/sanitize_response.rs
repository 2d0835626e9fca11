//! `SanitizeResponse` (also `SanitizeModelResponse`, Apigee's name): the local guardrail
//! detectors over the text an LLM generated (issue 15).
//!
//! ```yaml
//! spec:
//!   type: SanitizeResponse
//!   detectors: {email: {action: redact}, private_key: {action: block}}
//! ```
//!
//! - JSON answers (held whole): the generated text members (`content`, `text`) are scanned;
//!   `redact` rewrites them in place; `block` empties the generated text and sets the API's
//!   refusal reason (OpenAI `finish_reason: "content_filter"`, Anthropic
//!   `stop_reason: "refusal"`, Gemini `finishReason: "SAFETY"`), so the SDK reads a normal
//!   answer in every body mode (in FULL_DUPLEX_STREAMED the 200 already left). Other APIs
//!   (Responses, completions) answer 422 `steps.sanitizeresponse.ResponseBlocked` in the
//!   flow's error format — 422, not 5xx: SDKs retry 5xx, generating (and billing) again.
//! - Server-sent events (OpenAI chat completions, Anthropic Messages, Gemini / Vertex AI):
//!   each event's text delta is fed to a [`StreamScanner`] per choice / content block and
//!   replaced by what the scanner releases (redacted); the scanner's held tail comes out in
//!   later events, flushed into the choice's finishing event. A `block` ends the stream with
//!   the API's own final event ([`ChunkAction::End`], never a cut connection): OpenAI a
//!   chunk with `finish_reason: "content_filter"` then `data: [DONE]`; Anthropic
//!   `content_block_stop`, `message_delta` with `stop_reason: "refusal"`, `message_stop`;
//!   Gemini a candidate with `finishReason: "SAFETY"`.
//! - Other streams (OpenAI Responses and legacy completions) are NOT guarded yet: they pass
//!   with a warning and `sanitizeresponse.<policy>.unsupported_stream = true` (their JSON
//!   answers are guarded). Condition the flow on the path if that matters.
//!
//! External guards (Model Armor, a generic HTTP guard; `external`, see `sanitize_external`)
//! check JSON answers after the local detectors; a stream is refused at once, checked whole
//! at its end or left to the local detectors (`external.streams`: `block`, `end`, `local`).
//!
//! Variables: `sanitizeresponse.<policy>.{matched,action,categories,findings}` and Apigee's
//! `SanitizeModelResponse.<policy>.*` match states.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::sanitize_prompt::{categories, compile_guard, count_findings, DURATION};
use super::{BuildContext, SpecError};
use crate::fault::Fault;
use crate::guard::{self, Action, Detector, Finding, StreamScanner};
use crate::llm::Api;
use crate::pipeline::{Chunk, ChunkAction, ChunkSpec, Direction, Hook, Hooks, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "SanitizeResponse";
/// Apigee's type name for the same policy.
pub const APIGEE_TYPE: &str = "SanitizeModelResponse";

pub const BLOCKED_CODE: &str = "steps.sanitizeresponse.ResponseBlocked";

/// The most bytes of events the step asks the chunk runner to hold (it holds none itself:
/// the scanner keeps the text it is unsure of).
const MAX_HOLD: usize = 64 << 10;

#[derive(Debug)]
struct SanitizeResponse {
    name: String,
    detector: Arc<Detector>,
    /// Model Armor / HTTP guards, after the local detectors (`sanitize_external`).
    external: Option<Arc<crate::guard::external::ExternalGuards>>,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let mut spec = spec;
    let external =
        super::sanitize_external::take(ctx, &mut spec, crate::guard::external::Kind::Response)?;
    // Nothing of its own yet: the GuardSpec fields only. Taking a key that is never there
    // turns a null spec into an empty mapping (every default).
    super::sanitize_prompt::take_key(&mut spec, "type")?;
    Ok(Arc::new(SanitizeResponse {
        name: ctx.name.clone(),
        detector: compile_guard(spec)?,
        external,
    }))
}

/// One stream's guard state, kept on the exchange between chunks.
pub struct StreamState {
    policy: Arc<str>,
    api: Option<Api>,
    /// A scanner per choice (OpenAI), content block (Anthropic) or candidate (Gemini).
    scanners: BTreeMap<u64, StreamScanner>,
    findings: Vec<Finding>,
    ended: bool,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("policy", &self.policy)
            .field("api", &self.api)
            .field("scanners", &self.scanners.len())
            .field("findings", &self.findings.len())
            .finish()
    }
}

/// One event's fields: the lines other than `data:`, and the data joined.
struct Event<'a> {
    other: Vec<&'a str>,
    data: String,
}

fn parse_event(raw: &[u8]) -> Option<Event<'_>> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut other = Vec::new();
    let mut data: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut data {
                Some(s) => {
                    s.push('\n');
                    s.push_str(d);
                }
                None => data = Some(d.to_owned()),
            }
        } else {
            other.push(line);
        }
    }
    Some(Event { other, data: data? })
}

fn write_event(out: &mut Vec<u8>, other: &[&str], data: &str) {
    for l in other {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

fn named_event(out: &mut Vec<u8>, name: &str, data: &Value) {
    let line = format!("event: {name}");
    write_event(out, &[line.as_str()], &data.to_string());
}

impl StreamState {
    fn scanner(&mut self, detector: &Arc<Detector>, i: u64) -> &mut StreamScanner {
        self.scanners
            .entry(i)
            .or_insert_with(|| StreamScanner::new(detector.clone()))
    }

    /// Feeds `delta` to scanner `i`; the text to send now, and whether it blocked.
    fn push(
        &mut self,
        detector: &Arc<Detector>,
        i: u64,
        delta: &str,
        finish: bool,
    ) -> (String, bool) {
        let s = self.scanner(detector, i);
        let mut out = s.push(delta);
        if finish && out.blocked.is_none() {
            let f = s.finish();
            out.release.push_str(&f.release);
            out.findings.extend(f.findings);
            out.blocked = f.blocked;
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
    fn state<'e>(&self, ex: &'e mut Exchange) -> &'e mut StreamState {
        let at = match ex
            .state
            .guard_streams
            .iter()
            .position(|s| *s.policy == *self.name)
        {
            Some(i) => i,
            None => {
                ex.state.guard_streams.push(StreamState {
                    policy: self.name.as_str().into(),
                    api: ex.state.llm.as_ref().map(|r| r.api),
                    scanners: BTreeMap::new(),
                    findings: Vec::new(),
                    ended: false,
                });
                ex.state.guard_streams.len() - 1
            }
        };
        &mut ex.state.guard_streams[at]
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

    /// Rewrites one event; `true` when the stream must end after `out`.
    fn event(&self, st: &mut StreamState, raw: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(ev) = parse_event(raw) else {
            out.extend_from_slice(raw);
            return false;
        };
        let Ok(mut v) = serde_json::from_str::<Value>(&ev.data) else {
            // `[DONE]`, pings: pass.
            out.extend_from_slice(raw);
            return false;
        };
        let d = &self.detector;
        match st.api {
            Some(Api::OpenAiChat) => {
                let mut block = None;
                if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
                    for c in choices {
                        let i = c.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let finish = c.get("finish_reason").is_some_and(|f| !f.is_null());
                        let delta = c
                            .pointer("/delta/content")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned();
                        if delta.is_empty() && !finish {
                            continue;
                        }
                        let (rel, blocked) = st.push(d, i, &delta, finish);
                        if let Some(slot) = c.pointer_mut("/delta") {
                            if let Some(o) = slot.as_object_mut() {
                                o.insert("content".into(), Value::String(rel));
                            }
                        }
                        if blocked {
                            c["finish_reason"] = json!("content_filter");
                            block = Some(i);
                            break;
                        }
                    }
                }
                if let Some(i) = block {
                    // Only the blocked choice's final chunk, then the end of the stream.
                    if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
                        choices
                            .retain(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == i);
                    }
                    write_event(out, &ev.other, &v.to_string());
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return true;
                }
                write_event(out, &ev.other, &v.to_string());
                false
            }
            Some(Api::AnthropicMessages) => {
                let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
                let i = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                match ty {
                    "content_block_delta"
                        if v.pointer("/delta/type").and_then(Value::as_str)
                            == Some("text_delta") =>
                    {
                        let delta = v
                            .pointer("/delta/text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned();
                        let (rel, blocked) = st.push(d, i, &delta, false);
                        v["delta"]["text"] = Value::String(rel);
                        write_event(out, &ev.other, &v.to_string());
                        if blocked {
                            named_event(
                                out,
                                "content_block_stop",
                                &json!({"type": "content_block_stop", "index": i}),
                            );
                            named_event(
                                out,
                                "message_delta",
                                &json!({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": null}, "usage": {"output_tokens": 0}}),
                            );
                            named_event(out, "message_stop", &json!({"type": "message_stop"}));
                            return true;
                        }
                        false
                    }
                    "content_block_stop" if st.scanners.contains_key(&i) => {
                        let (rel, blocked) = st.push(d, i, "", true);
                        if !rel.is_empty() {
                            named_event(
                                out,
                                "content_block_delta",
                                &json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": rel}}),
                            );
                        }
                        out.extend_from_slice(raw);
                        if blocked {
                            named_event(
                                out,
                                "message_delta",
                                &json!({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": null}, "usage": {"output_tokens": 0}}),
                            );
                            named_event(out, "message_stop", &json!({"type": "message_stop"}));
                            return true;
                        }
                        false
                    }
                    _ => {
                        out.extend_from_slice(raw);
                        false
                    }
                }
            }
            Some(Api::Gemini | Api::VertexAi) => {
                let mut block = None;
                if let Some(cands) = v.get_mut("candidates").and_then(Value::as_array_mut) {
                    for c in cands {
                        let i = c.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let finish = c.get("finishReason").is_some_and(|f| !f.is_null());
                        let Some(parts) = c
                            .pointer_mut("/content/parts")
                            .and_then(Value::as_array_mut)
                        else {
                            if finish {
                                let (rel, blocked) = st.push(d, i, "", true);
                                if !rel.is_empty() {
                                    c["content"] =
                                        json!({"role": "model", "parts": [{"text": rel}]});
                                }
                                if blocked {
                                    c["finishReason"] = json!("SAFETY");
                                    block = Some(i);
                                    break;
                                }
                            }
                            continue;
                        };
                        let n = parts.len();
                        let mut blocked_here = false;
                        for (j, p) in parts.iter_mut().enumerate() {
                            let Some(t) = p.get("text").and_then(Value::as_str).map(str::to_owned)
                            else {
                                continue;
                            };
                            let (rel, blocked) = st.push(d, i, &t, finish && j + 1 == n);
                            p["text"] = Value::String(rel);
                            if blocked {
                                blocked_here = true;
                                break;
                            }
                        }
                        if blocked_here {
                            c["finishReason"] = json!("SAFETY");
                            block = Some(i);
                            break;
                        }
                    }
                }
                write_event(out, &ev.other, &v.to_string());
                block.is_some()
            }
            _ => {
                // Unreachable for the other APIs (`response_chunk` passes them).
                out.extend_from_slice(raw);
                false
            }
        }
    }
}

/// `body` with the generated text taken out and the API's own refusal reason: the SDK
/// reads a normal, empty answer (the status and headers may already have left, in
/// FULL_DUPLEX_STREAMED). `None` for an API without one (then a 422).
fn refusal(api: Option<Api>, body: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    match api? {
        Api::OpenAiChat => {
            for c in v.get_mut("choices")?.as_array_mut()? {
                c["message"]["content"] = json!("");
                c["finish_reason"] = json!("content_filter");
            }
        }
        Api::AnthropicMessages => {
            v["content"] = json!([]);
            v["stop_reason"] = json!("refusal");
        }
        Api::Gemini | Api::VertexAi => {
            for c in v.get_mut("candidates")?.as_array_mut()? {
                c["content"] = json!({"role": "model", "parts": []});
                c["finishReason"] = json!("SAFETY");
            }
        }
        _ => return None,
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
            response_chunks: Some(ChunkSpec::events(MAX_HOLD)),
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
        if !chunk.whole_events || ex.state.llm.is_none() {
            // Not a stream (the JSON body is guarded whole in `response_end`).
            return ChunkAction::Pass;
        }
        let api = ex.state.llm.as_ref().map(|r| r.api);
        if !matches!(
            api,
            Some(Api::OpenAiChat | Api::AnthropicMessages | Api::Gemini | Api::VertexAi)
        ) {
            // Not rewritten yet (see the module docs): said once per exchange, not hidden.
            let k = format!("sanitizeresponse.{}.unsupported_stream", self.name);
            if ex.var(&k).is_none() {
                tracing::warn!(policy = %self.name, api = ?api, "stream of this API passes unguarded");
                ex.set_var(k, true);
            }
            return ChunkAction::Pass;
        }
        let started = Instant::now();
        let mut st = {
            let s = self.state(ex);
            if s.ended {
                chunk.data.clear();
                return ChunkAction::End;
            }
            std::mem::replace(
                s,
                StreamState {
                    policy: s.policy.clone(),
                    api: s.api,
                    scanners: BTreeMap::new(),
                    findings: Vec::new(),
                    ended: false,
                },
            )
        };
        let before = st.findings.len();
        let mut out = Vec::with_capacity(chunk.data.len());
        let mut end = false;
        for raw in chunk.events() {
            if self.event(&mut st, raw, &mut out) {
                end = true;
                break;
            }
        }
        chunk.data = out;
        st.ended = end;
        count_findings(&self.name, st.findings[before..].iter());
        DURATION
            .with_label_values(&[&self.name, "local"])
            .observe(started.elapsed().as_secs_f64());
        let findings = st.findings.clone();
        *self.state(ex) = st;
        if !findings.is_empty() {
            self.set_vars(ex, &findings);
        }
        if end {
            tracing::info!(policy = %self.name, categories = %categories(findings.iter().filter(|f| f.action == Action::Block)), "response stream blocked");
            ChunkAction::End
        } else {
            ChunkAction::Pass
        }
    }

    fn response_end<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        if ex.state.llm.is_none()
            || ex
                .state
                .guard_streams
                .iter()
                .any(|s| *s.policy == *self.name)
        {
            // Not an LLM answer, or a stream already guarded event by event.
            return Hook::CONTINUE;
        }
        let sse = ex
            .response
            .as_ref()
            .and_then(|r| r.headers.get("content-type"))
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        let Some(body) = ex
            .response_body
            .as_deref()
            .filter(|b| !b.is_empty() && !sse)
        else {
            return Hook::CONTINUE;
        };
        let started = Instant::now();
        let r = match guard::redact_json(&self.detector, body, |at| {
            matches!(at.key, Some("content" | "text" | "output_text"))
        }) {
            Ok(r) => r,
            Err(e) => {
                // An upstream error page or a body that is not JSON: no generated text.
                tracing::debug!(policy = %self.name, error = %e, "response not scanned");
                return Hook::CONTINUE;
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
                let api = ex.state.llm.as_ref().map(|r| r.api);
                if let Some(b) = ex.response_body.as_deref().and_then(|b| refusal(api, b)) {
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
    use crate::llm::LlmRequest;
    use crate::services::Services;

    fn policy(yaml: &str) -> Arc<dyn Policy> {
        let ctx = BuildContext {
            name: "rg".into(),
            config_dir: None,
            services: Services::default(),
        };
        build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap()
    }

    fn exchange(api: Api) -> Exchange {
        let mut ex = Exchange::default();
        let mut r: LlmRequest = (*crate::policies::llm_test_support::request("m", None)).clone();
        r.api = api;
        ex.state.llm = Some(Arc::new(r));
        ex
    }

    /// Feeds `events` one chunk each; the bytes the client got and whether the stream ended.
    fn stream(p: &Arc<dyn Policy>, ex: &mut Exchange, events: &[String]) -> (String, bool) {
        let mut got = String::new();
        for e in events {
            let mut c = Chunk {
                data: e.clone().into_bytes(),
                end_of_stream: false,
                whole_events: true,
            };
            let a = p.response_chunk(ex, &mut c);
            got.push_str(std::str::from_utf8(&c.data).unwrap());
            if a == ChunkAction::End {
                return (got, true);
            }
            assert_eq!(a, ChunkAction::Pass);
        }
        (got, false)
    }

    fn openai(delta: &str, finish: Option<&str>) -> String {
        let v = json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": delta}, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    /// The text an OpenAI client reassembles from the stream.
    fn openai_text(s: &str) -> String {
        s.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn openai_stream_redacts_an_address_split_across_events() {
        let p = policy("{detectors: {email: {action: redact}}}");
        assert!(p.hooks().response_chunks.is_some());
        let mut ex = exchange(Api::OpenAiChat);
        let events = [
            openai("Write to jane.d", None),
            openai("oe@exam", None),
            openai("ple.com today", None),
            openai("", Some("stop")),
            "data: [DONE]\n\n".to_string(),
        ];
        let (got, ended) = stream(&p, &mut ex, &events);
        assert!(!ended);
        assert!(!got.contains("jane") && !got.contains("example"), "{got}");
        assert_eq!(openai_text(&got), "Write to [EMAIL] today");
        assert!(got.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            ex.var("sanitizeresponse.rg.categories").unwrap().as_text(),
            "email"
        );
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
        let p = policy("{detectors: {email: {action: redact}}}");
        let mut ex = exchange(Api::AnthropicMessages);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[delta("to jane.doe@exa"), delta("mple.com"), stop.clone()],
        );
        assert!(!ended);
        let text: String = got
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v.pointer("/delta/text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "to [EMAIL]");
        assert!(got.contains("content_block_stop"));

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

    #[test]
    fn gemini_stream_block_finishes_with_safety() {
        let ev = |t: &str| {
            let v = json!({"candidates": [{"index": 0, "content": {"role": "model", "parts": [{"text": t}]}}]});
            format!("data: {v}\n\n")
        };
        let p = policy("{detectors: {private_key: {action: block}, email: {action: redact}}}");
        let mut ex = exchange(Api::Gemini);
        let (got, ended) = stream(
            &p,
            &mut ex,
            &[
                ev("key: -----BEGIN RSA PRIV"),
                ev("ATE KEY-----\nMIIE"),
                ev("abc\n-----END RSA PRIVATE KEY-----\n"),
            ],
        );
        assert!(ended, "{got}");
        assert!(got.contains("\"finishReason\":\"SAFETY\""), "{got}");
        assert!(!got.contains("MIIE"), "{got}");
    }

    #[test]
    fn json_answers_are_redacted_or_refused_whole() {
        let body = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"mail jane.doe@example.com"}}],"model":"m"}"#;
        let p = policy("{detectors: {email: {action: redact}}}");
        let mut ex = exchange(Api::OpenAiChat);
        ex.response_body = Some(body.to_vec());
        assert!(matches!(
            p.run(&mut ex, Direction::Response),
            Hook::Ready(Outcome::Continue)
        ));
        let out = String::from_utf8(ex.response_body.clone().unwrap()).unwrap();
        assert!(
            out.contains("mail [EMAIL]") && !out.contains("jane"),
            "{out}"
        );

        let p = policy("{detectors: {email: {action: block}}}");
        let mut ex = exchange(Api::OpenAiChat);
        ex.response_body = Some(body.to_vec());
        assert!(matches!(
            p.run(&mut ex, Direction::Response),
            Hook::Ready(Outcome::Continue)
        ));
        let out: Value = serde_json::from_slice(ex.response_body.as_deref().unwrap()).unwrap();
        assert_eq!(out["choices"][0]["message"]["content"], "");
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(out["id"], "x");
        assert_eq!(
            ex.var("SanitizeModelResponse.rg.filterMatchState")
                .unwrap()
                .as_text(),
            "MATCH_FOUND"
        );
        // An API without a refusal shape: 422.
        let mut ex = exchange(Api::OpenAiResponses);
        ex.response_body = Some(
            br#"{"output":[{"content":[{"type":"output_text","text":"jane.doe@example.com"}]}]}"#
                .to_vec(),
        );
        let Hook::Ready(Outcome::Reject(f)) = p.run(&mut ex, Direction::Response) else {
            panic!("blocked");
        };
        assert_eq!((f.status, f.code.as_str()), (422, BLOCKED_CODE));
        assert!(f.message.contains("email") && !f.message.contains("jane"));
        assert_eq!(
            ex.var("SanitizeModelResponse.rg.filterMatchState")
                .unwrap()
                .as_text(),
            "MATCH_FOUND"
        );
    }
}
