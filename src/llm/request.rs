//! LLM request bodies, parsed once into an [`LlmRequest`].
//!
//! The prompt is every piece of text the model will read: system prompts and instructions,
//! every message and content part of every role, tool calls and tool results (as text),
//! Responses `input` in all its shapes. Images, audio, files and other non-text parts are
//! skipped (counted in `media_parts`). Tool definitions are kept apart in `tools` (they are
//! billed as input, but a prompt guard has no business reading them).
//!
//! A body that is not a JSON object, or a known field with the wrong type, is an
//! [`LlmError`]: the caller answers 400. Unknown fields are ignored.

use serde_json::{Map, Value};

use super::detect::{Endpoint, StreamShape};
use super::{Api, LlmError};

/// What an LLM request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    pub api: Api,
    /// The body's `model`, or the path's (Gemini, Vertex AI, Azure deployment) when the body
    /// has none. The path wins for Gemini and Vertex AI, where the body's is ignored upstream.
    pub model: Option<String>,
    /// All prompt text, parts separated by `\n`.
    pub prompt: String,
    /// Tool / function definitions, as JSON text.
    pub tools: String,
    /// Pre-tokenized input (Completions `prompt` / Embeddings `input` as token arrays).
    pub prompt_token_ids: u64,
    /// Chat-style messages (turns), for per-message overhead in estimates.
    pub messages: u64,
    /// Images, audio, files: not estimated.
    pub media_parts: u64,
    pub stream: bool,
    /// Where the stream shape is known from the path (Gemini, Vertex AI).
    pub stream_shape: Option<StreamShape>,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    /// The output limit: `max_tokens`, `max_completion_tokens` (the larger if both),
    /// `max_output_tokens` or `generationConfig.maxOutputTokens`.
    pub max_output_tokens: Option<u64>,
    /// `n` / `candidateCount`, when set.
    pub n: Option<u64>,
    /// OpenAI Responses `previous_response_id`: the visible prompt is only the new turn.
    pub previous_response_id: Option<String>,
}

impl LlmRequest {
    /// How many answers will be generated (`n`, `candidateCount`; 1 when unset or 0).
    pub fn choices(&self) -> u64 {
        self.n.unwrap_or(1).max(1)
    }

    /// The most output tokens the request can be billed, when it sets a limit:
    /// `max_output_tokens * choices`, saturating.
    pub fn max_total_output_tokens(&self) -> Option<u64> {
        self.max_output_tokens
            .map(|m| m.saturating_mul(self.choices()))
    }
}

/// Parse `body` as a request to `endpoint`.
pub fn parse_request(endpoint: &Endpoint, body: &[u8]) -> Result<LlmRequest, LlmError> {
    let v: Value = serde_json::from_slice(body)?;
    parse_request_json(endpoint, &v)
}

/// Reads an already parsed body (the exchange's shared parse,
/// `crate::vars::Exchange::body_json`) as a request to `endpoint`.
pub fn parse_request_json(endpoint: &Endpoint, v: &Value) -> Result<LlmRequest, LlmError> {
    let obj = v.as_object().ok_or(LlmError::NotObject)?;
    let mut r = LlmRequest {
        api: endpoint.api,
        model: None,
        prompt: String::new(),
        tools: String::new(),
        prompt_token_ids: 0,
        messages: 0,
        media_parts: 0,
        stream: false,
        stream_shape: endpoint.path_stream,
        include_usage: false,
        max_output_tokens: None,
        n: None,
        previous_response_id: None,
    };
    let body_model = opt_str(obj, "model")?;
    let mut p = Prompt::default();
    match endpoint.api {
        Api::OpenAiChat => {
            openai_common(obj, &mut r)?;
            r.max_output_tokens = max_opt(
                opt_u64(obj, "max_tokens")?,
                opt_u64(obj, "max_completion_tokens")?,
            );
            for m in opt_array(obj, "messages")?.into_iter().flatten() {
                r.messages += 1;
                openai_message(m, &mut p)?;
            }
            r.tools = tools_text(obj, &["tools", "functions"]);
        }
        Api::OpenAiCompletions => {
            openai_common(obj, &mut r)?;
            r.max_output_tokens = opt_u64(obj, "max_tokens")?;
            r.prompt_token_ids = text_or_tokens(obj.get("prompt"), "prompt", &mut p)?;
            if let Some(s) = opt_str(obj, "suffix")? {
                p.push(s);
            }
        }
        Api::OpenAiEmbeddings => {
            r.prompt_token_ids = text_or_tokens(obj.get("input"), "input", &mut p)?;
        }
        Api::OpenAiResponses => {
            r.stream = opt_bool(obj, "stream")?.unwrap_or(false);
            r.max_output_tokens = opt_u64(obj, "max_output_tokens")?;
            r.previous_response_id = opt_str(obj, "previous_response_id")?.map(str::to_owned);
            if let Some(s) = opt_str(obj, "instructions")? {
                p.push(s);
            }
            match obj.get("input") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    r.messages += 1;
                    p.push(s);
                }
                Some(Value::Array(items)) => {
                    for item in items {
                        r.messages += 1;
                        responses_item(item, &mut p)?;
                    }
                }
                Some(_) => return Err(LlmError::field("input", "a string or an array")),
            }
            r.tools = tools_text(obj, &["tools"]);
        }
        Api::AnthropicMessages => {
            r.stream = opt_bool(obj, "stream")?.unwrap_or(false);
            r.max_output_tokens = opt_u64(obj, "max_tokens")?;
            text_or_parts(
                obj.get("system"),
                &mut p,
                "system",
                "a string or an array",
                anthropic_block,
            )?;
            for m in opt_array(obj, "messages")?.into_iter().flatten() {
                r.messages += 1;
                let m = m
                    .as_object()
                    .ok_or(LlmError::field("messages", "an array of objects"))?;
                text_or_parts(
                    m.get("content"),
                    &mut p,
                    "messages[].content",
                    "a string or an array",
                    anthropic_block,
                )?;
            }
            r.tools = tools_text(obj, &["tools"]);
        }
        Api::Gemini | Api::VertexAi => {
            r.stream = endpoint.path_stream.is_some();
            for key in ["systemInstruction", "system_instruction"] {
                if let Some(c) = obj.get(key) {
                    gemini_content(c, &mut p)?;
                }
            }
            match obj.get("contents") {
                None | Some(Value::Null) => {}
                Some(Value::Array(cs)) => {
                    for c in cs {
                        r.messages += 1;
                        gemini_content(c, &mut p)?;
                    }
                }
                Some(c @ Value::Object(_)) => {
                    r.messages += 1;
                    gemini_content(c, &mut p)?;
                }
                Some(_) => return Err(LlmError::field("contents", "an array")),
            }
            let cfg = match obj
                .get("generationConfig")
                .or_else(|| obj.get("generation_config"))
            {
                None | Some(Value::Null) => None,
                Some(Value::Object(c)) => Some(c),
                Some(_) => return Err(LlmError::field("generationConfig", "an object")),
            };
            if let Some(c) = cfg {
                r.max_output_tokens = match opt_u64(c, "maxOutputTokens")? {
                    Some(n) => Some(n),
                    None => opt_u64(c, "max_output_tokens")?,
                };
                r.n = match opt_u64(c, "candidateCount")? {
                    Some(n) => Some(n),
                    None => opt_u64(c, "candidate_count")?,
                };
            }
            r.tools = tools_text(obj, &["tools"]);
        }
    }
    r.media_parts = p.media;
    r.prompt = p.text;
    // Gemini and Vertex AI serve the model in the path; elsewhere the body names it.
    r.model = match endpoint.api {
        Api::Gemini | Api::VertexAi => endpoint
            .path_model
            .clone()
            .or(body_model.map(str::to_owned)),
        _ => body_model
            .map(str::to_owned)
            .or_else(|| endpoint.path_model.clone()),
    };
    Ok(r)
}

#[derive(Default)]
pub(super) struct Prompt {
    pub(super) text: String,
    pub(super) media: u64,
}

impl Prompt {
    pub(super) fn push(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(s);
    }

    /// Structured values (tool arguments as objects, tool results as JSON) as compact JSON.
    fn push_json(&mut self, v: &Value) {
        match v {
            Value::Null => {}
            Value::String(s) => self.push(s),
            other => self.push(&other.to_string()),
        }
    }
}

fn openai_common(obj: &Map<String, Value>, r: &mut LlmRequest) -> Result<(), LlmError> {
    r.stream = opt_bool(obj, "stream")?.unwrap_or(false);
    r.n = opt_u64(obj, "n")?;
    match obj.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            r.include_usage = opt_bool(o, "include_usage")?.unwrap_or(false);
        }
        Some(_) => return Err(LlmError::field("stream_options", "an object")),
    }
    Ok(())
}

/// Content that is text or an array of parts, each read by `part`; absent or null adds
/// nothing, anything else is `field` not being `expected`.
pub(super) fn text_or_parts(
    v: Option<&Value>,
    p: &mut Prompt,
    field: &'static str,
    expected: &'static str,
    part: fn(&Value, &mut Prompt) -> Result<(), LlmError>,
) -> Result<(), LlmError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) => {
            p.push(s);
            Ok(())
        }
        Some(Value::Array(parts)) => parts.iter().try_for_each(|x| part(x, p)),
        Some(_) => Err(LlmError::field(field, expected)),
    }
}

pub(super) fn openai_message(m: &Value, p: &mut Prompt) -> Result<(), LlmError> {
    let m = m
        .as_object()
        .ok_or(LlmError::field("messages", "an array of objects"))?;
    text_or_parts(
        m.get("content"),
        p,
        "messages[].content",
        "a string, an array or null",
        content_part,
    )?;
    if let Some(Value::String(s)) = m.get("refusal") {
        p.push(s);
    }
    if let Some(Value::Array(calls)) = m.get("tool_calls") {
        for c in calls {
            if let Some(f) = c.get("function") {
                function_call(f, p);
            }
        }
    }
    if let Some(f) = m.get("function_call") {
        function_call(f, p);
    }
    Ok(())
}

fn function_call(f: &Value, p: &mut Prompt) {
    if let Some(Value::String(n)) = f.get("name") {
        p.push(n);
    }
    if let Some(a) = f.get("arguments") {
        p.push_json(a);
    }
}

/// An OpenAI content part (Chat and Responses): text-bearing parts are kept, media counted.
fn content_part(part: &Value, p: &mut Prompt) -> Result<(), LlmError> {
    let part = match part {
        Value::String(s) => {
            p.push(s);
            return Ok(());
        }
        Value::Object(o) => o,
        _ => return Err(LlmError::field("content[]", "an object")),
    };
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" | "input_text" | "output_text" => {
            if let Some(t) = opt_str(part, "text")? {
                p.push(t);
            }
        }
        "refusal" => {
            if let Some(t) = opt_str(part, "refusal")? {
                p.push(t);
            }
        }
        _ => {
            if let Some(Value::String(t)) = part.get("text") {
                p.push(t);
            } else {
                p.media += 1;
            }
        }
    }
    Ok(())
}

/// One item of a Responses `input` array: a message (with or without `type`), a function
/// call or its output, a reasoning item, or a reference.
pub(super) fn responses_item(item: &Value, p: &mut Prompt) -> Result<(), LlmError> {
    let o = match item {
        Value::String(s) => {
            p.push(s);
            return Ok(());
        }
        Value::Object(o) => o,
        _ => return Err(LlmError::field("input[]", "an object")),
    };
    text_or_parts(
        o.get("content"),
        p,
        "input[].content",
        "a string or an array",
        content_part,
    )?;
    let kind = o.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "function_call" | "custom_tool_call" => {
            if let Some(Value::String(n)) = o.get("name") {
                p.push(n);
            }
            for key in ["arguments", "input"] {
                if let Some(a) = o.get(key) {
                    p.push_json(a);
                }
            }
        }
        "function_call_output" | "custom_tool_call_output" => match o.get("output") {
            Some(Value::Array(parts)) => {
                for part in parts {
                    content_part(part, p)?;
                }
            }
            Some(v) => p.push_json(v),
            None => {}
        },
        "reasoning" => {
            if let Some(Value::Array(s)) = o.get("summary") {
                for part in s {
                    if let Some(Value::String(t)) = part.get("text") {
                        p.push(t);
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// An Anthropic content block.
pub(super) fn anthropic_block(b: &Value, p: &mut Prompt) -> Result<(), LlmError> {
    let b = b
        .as_object()
        .ok_or(LlmError::field("content[]", "an object"))?;
    match b.get("type").and_then(Value::as_str).unwrap_or("") {
        "text" => {
            if let Some(t) = opt_str(b, "text")? {
                p.push(t);
            }
        }
        "thinking" => {
            if let Some(t) = opt_str(b, "thinking")? {
                p.push(t);
            }
        }
        "tool_use" | "server_tool_use" => {
            if let Some(Value::String(n)) = b.get("name") {
                p.push(n);
            }
            if let Some(i) = b.get("input") {
                p.push_json(i);
            }
        }
        "tool_result" => text_or_parts(
            b.get("content"),
            p,
            "tool_result.content",
            "a string or an array",
            anthropic_block,
        )?,
        // A plain-text document is text the model reads.
        "document" => match b.get("source") {
            Some(s) if s.get("type").and_then(Value::as_str) == Some("text") => {
                if let Some(Value::String(d)) = s.get("data") {
                    p.push(d);
                }
            }
            _ => p.media += 1,
        },
        "redacted_thinking" => {}
        _ => p.media += 1,
    }
    Ok(())
}

/// A Gemini `Content` (`{role, parts: [...]}`).
pub(super) fn gemini_content(c: &Value, p: &mut Prompt) -> Result<(), LlmError> {
    let c = match c {
        Value::Null => return Ok(()),
        Value::Object(c) => c,
        _ => return Err(LlmError::field("contents[]", "an object")),
    };
    let parts = match c.get("parts") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(parts)) => parts,
        Some(_) => return Err(LlmError::field("contents[].parts", "an array")),
    };
    for part in parts {
        let part = part
            .as_object()
            .ok_or(LlmError::field("parts[]", "an object"))?;
        if let Some(t) = opt_str(part, "text")? {
            p.push(t);
        } else if let Some(f) = part
            .get("functionCall")
            .or_else(|| part.get("function_call"))
        {
            if let Some(Value::String(n)) = f.get("name") {
                p.push(n);
            }
            if let Some(a) = f.get("args") {
                p.push_json(a);
            }
        } else if let Some(f) = part
            .get("functionResponse")
            .or_else(|| part.get("function_response"))
        {
            if let Some(r) = f.get("response") {
                p.push_json(r);
            }
        } else if let Some(e) = part
            .get("executableCode")
            .or_else(|| part.get("executable_code"))
        {
            if let Some(Value::String(code)) = e.get("code") {
                p.push(code);
            }
        } else if let Some(r) = part
            .get("codeExecutionResult")
            .or_else(|| part.get("code_execution_result"))
        {
            if let Some(Value::String(out)) = r.get("output") {
                p.push(out);
            }
        } else {
            p.media += 1;
        }
    }
    Ok(())
}

/// Completions `prompt` / Embeddings `input`: a string, strings, tokens, or token arrays.
/// Returns the number of pre-tokenized tokens.
pub(super) fn text_or_tokens(
    v: Option<&Value>,
    field: &'static str,
    p: &mut Prompt,
) -> Result<u64, LlmError> {
    const EXPECTED: &str = "a string, an array of strings, or token arrays";
    let mut tokens: u64 = 0;
    match v {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => p.push(s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => p.push(s),
                    Value::Number(n) if n.is_u64() => tokens = tokens.saturating_add(1),
                    Value::Array(ts) => {
                        if !ts.iter().all(|t| t.is_u64()) {
                            return Err(LlmError::field(field, EXPECTED));
                        }
                        tokens = tokens.saturating_add(ts.len() as u64);
                    }
                    _ => return Err(LlmError::field(field, EXPECTED)),
                }
            }
        }
        Some(_) => return Err(LlmError::field(field, EXPECTED)),
    }
    Ok(tokens)
}

fn tools_text(obj: &Map<String, Value>, keys: &[&str]) -> String {
    let mut out = String::new();
    for k in keys {
        if let Some(Value::Array(t)) = obj.get(*k) {
            if !t.is_empty() {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&serde_json::to_string(t).unwrap_or_default());
            }
        }
    }
    out
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn opt_str<'a>(o: &'a Map<String, Value>, k: &'static str) -> Result<Option<&'a str>, LlmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(LlmError::field(k, "a string")),
    }
}

fn opt_bool(o: &Map<String, Value>, k: &'static str) -> Result<Option<bool>, LlmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(LlmError::field(k, "a boolean")),
    }
}

/// A non-negative integer (as the APIs themselves require).
fn opt_u64(o: &Map<String, Value>, k: &'static str) -> Result<Option<u64>, LlmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or(LlmError::field(k, "a non-negative integer")),
        Some(_) => Err(LlmError::field(k, "a non-negative integer")),
    }
}

fn opt_array<'a>(
    o: &'a Map<String, Value>,
    k: &'static str,
) -> Result<Option<&'a Vec<Value>>, LlmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(LlmError::field(k, "an array")),
    }
}
