//! `JSONThreatProtection` (Apigee's policy of that name): refuses a JSON payload whose shape
//! exceeds set limits, before anything parses it into memory.
//!
//! ```yaml
//! spec:
//!   type: JSONThreatProtection
//!   source: request            # request | response; default: the step's own message
//!   arrayElementCount: 20      # elements in one array
//!   containerDepth: 10         # nesting of objects and arrays
//!   objectEntryCount: 15       # members of one object
//!   objectEntryNameLength: 50  # characters in a member name
//!   stringValueLength: 500     # characters in a string value
//! ```
//!
//! A limit that is absent or negative is not checked, as in Apigee; at least one must be
//! set. The payload is checked by one iterative pass over its bytes (an explicit stack, no
//! recursion, nothing built), so a deep or huge document costs time linear in its size and
//! memory linear in its depth; the pass also checks that the payload is JSON. Lengths count
//! characters (an escape sequence is one).
//!
//! As Apigee: only a body whose `Content-Type` is JSON (`application/json`, `*+json`) or
//! absent is checked; an empty body passes. A payload over a limit, or one that is not JSON,
//! is 500 `steps.jsonthreatprotection.ExecutionFailed` with Apigee's message shape
//! (`JSONThreatProtection[<policy>]: Execution failed. reason: ... at line N`); a `source`
//! message not there at that point (a `response` source on the request path) is 500
//! `steps.jsonthreatprotection.SourceUnavailable`.

use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "JSONThreatProtection";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    array_element_count: Option<i64>,
    #[serde(default)]
    container_depth: Option<i64>,
    #[serde(default)]
    object_entry_count: Option<i64>,
    #[serde(default)]
    object_entry_name_length: Option<i64>,
    #[serde(default)]
    string_value_length: Option<i64>,
}

/// The limits; `u64::MAX` is "not checked".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub array_elements: u64,
    pub depth: u64,
    pub object_entries: u64,
    pub name_length: u64,
    pub string_length: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            array_elements: u64::MAX,
            depth: u64::MAX,
            object_entries: u64::MAX,
            name_length: u64::MAX,
            string_length: u64::MAX,
        }
    }
}

#[derive(Debug)]
struct JsonThreatProtection {
    name: String,
    source: Option<Direction>,
    limits: Limits,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let source = match spec.source.as_deref().map(str::trim) {
        None | Some("") => None,
        Some("request") => Some(Direction::Request),
        Some("response") => Some(Direction::Response),
        Some(other) => {
            // Apigee's NonMessageVariable, at load.
            return Err(SpecError::new(
                "source",
                format!("`{other}`: request or response"),
            ));
        }
    };
    let limit = |v: Option<i64>| match v {
        Some(n) if n >= 0 => u64::try_from(n).unwrap_or(u64::MAX),
        _ => u64::MAX,
    };
    let limits = Limits {
        array_elements: limit(spec.array_element_count),
        depth: limit(spec.container_depth),
        object_entries: limit(spec.object_entry_count),
        name_length: limit(spec.object_entry_name_length),
        string_length: limit(spec.string_value_length),
    };
    if limits == Limits::default() {
        return Err(SpecError::new(
            "",
            "set at least one of arrayElementCount, containerDepth, objectEntryCount, \
             objectEntryNameLength, stringValueLength",
        ));
    }
    Ok(Arc::new(JsonThreatProtection {
        name: ctx.name.clone(),
        source,
        limits,
    }))
}

/// Why a payload was refused, and at which byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub reason: String,
    pub at: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value must come (top level, after `:`, after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{`: a member name or `}`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    Colon,
    /// After a value: `,`, the container's end, or (at the top) the end of the text.
    After,
}

struct Frame {
    object: bool,
    count: u64,
}

fn over(what: &str, max: u64, found: u64, at: usize) -> Violation {
    Violation {
        reason: format!("Exceeded {what}, max {max} allowed, found {found}"),
        at,
    }
}

fn invalid(what: &str, at: usize) -> Violation {
    Violation {
        reason: format!("Invalid JSON: {what}"),
        at,
    }
}

/// Scans a string starting after its opening quote: the index after its closing quote and
/// its length in characters.
fn scan_string(b: &[u8], mut i: usize) -> Result<(usize, u64), Violation> {
    let start = i;
    let mut chars = 0u64;
    while i < b.len() {
        match b[i] {
            b'"' => return Ok((i + 1, chars)),
            b'\\' => {
                match b.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                    Some(b'u') => {
                        let hex = b
                            .get(i + 2..i + 6)
                            .ok_or_else(|| invalid("bad escape", i))?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return Err(invalid("bad escape", i));
                        }
                        i += 6;
                    }
                    _ => return Err(invalid("bad escape", i)),
                }
                chars += 1;
            }
            c if c < 0x20 => return Err(invalid("control character in a string", i)),
            c => {
                // One character per UTF-8 lead byte (the text was checked as UTF-8).
                if c & 0xC0 != 0x80 {
                    chars += 1;
                }
                i += 1;
            }
        }
    }
    Err(invalid("unterminated string", start))
}

fn scan_number(b: &[u8], mut i: usize) -> Result<usize, Violation> {
    let start = i;
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > s
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    if b.get(i) == Some(&b'0') {
        i += 1;
    } else if !digits(&mut i) {
        return Err(invalid("bad number", start));
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return Err(invalid("bad number", start));
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return Err(invalid("bad number", start));
        }
    }
    Ok(i)
}

/// Checks `text` against `limits` in one pass; also refuses text that is not JSON.
pub(crate) fn check(text: &[u8], limits: &Limits) -> Result<(), Violation> {
    if std::str::from_utf8(text).is_err() {
        return Err(invalid("not UTF-8", 0));
    }
    let b = text;
    let mut stack: Vec<Frame> = Vec::new();
    let mut state = State::Value;
    let mut i = 0usize;
    loop {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        let Some(&c) = b.get(i) else {
            return if state == State::After && stack.is_empty() {
                Ok(())
            } else {
                Err(invalid("unexpected end", i))
            };
        };
        match state {
            State::Value | State::ValueOrEnd => {
                if state == State::ValueOrEnd && c == b']' {
                    stack.pop();
                    i += 1;
                    state = State::After;
                    continue;
                }
                if let Some(top) = stack.last_mut() {
                    if !top.object {
                        top.count += 1;
                        if top.count > limits.array_elements {
                            return Err(over(
                                "array element count",
                                limits.array_elements,
                                top.count,
                                i,
                            ));
                        }
                    }
                }
                match c {
                    b'{' | b'[' => {
                        stack.push(Frame {
                            object: c == b'{',
                            count: 0,
                        });
                        let depth = stack.len() as u64;
                        if depth > limits.depth {
                            return Err(over("container depth", limits.depth, depth, i));
                        }
                        i += 1;
                        state = if c == b'{' {
                            State::KeyOrEnd
                        } else {
                            State::ValueOrEnd
                        };
                    }
                    b'"' => {
                        let (end, len) = scan_string(b, i + 1)?;
                        if len > limits.string_length {
                            return Err(over("string value length", limits.string_length, len, i));
                        }
                        i = end;
                        state = State::After;
                    }
                    b'-' | b'0'..=b'9' => {
                        i = scan_number(b, i)?;
                        state = State::After;
                    }
                    _ => {
                        let lit: &[u8] = match c {
                            b't' => b"true",
                            b'f' => b"false",
                            b'n' => b"null",
                            _ => return Err(invalid("unexpected character", i)),
                        };
                        if !b[i..].starts_with(lit) {
                            return Err(invalid("unexpected character", i));
                        }
                        i += lit.len();
                        state = State::After;
                    }
                }
            }
            State::KeyOrEnd | State::Key => {
                if state == State::KeyOrEnd && c == b'}' {
                    stack.pop();
                    i += 1;
                    state = State::After;
                    continue;
                }
                if c != b'"' {
                    return Err(invalid("expected a member name", i));
                }
                let (end, len) = scan_string(b, i + 1)?;
                if len > limits.name_length {
                    return Err(over("object entry name length", limits.name_length, len, i));
                }
                if let Some(top) = stack.last_mut() {
                    top.count += 1;
                    if top.count > limits.object_entries {
                        return Err(over(
                            "object entry count",
                            limits.object_entries,
                            top.count,
                            i,
                        ));
                    }
                }
                i = end;
                state = State::Colon;
            }
            State::Colon => {
                if c != b':' {
                    return Err(invalid("expected `:`", i));
                }
                i += 1;
                state = State::Value;
            }
            State::After => {
                let Some(top) = stack.last() else {
                    return Err(invalid("text after the value", i));
                };
                match (c, top.object) {
                    (b',', true) => state = State::Key,
                    (b',', false) => state = State::Value,
                    (b'}', true) | (b']', false) => {
                        stack.pop();
                    }
                    _ => return Err(invalid("expected `,` or the container's end", i)),
                }
                i += 1;
            }
        }
    }
}

fn is_json_type(ct: Option<&str>) -> bool {
    let Some(ct) = ct else {
        return true;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || mime.ends_with("+json")
}

impl JsonThreatProtection {
    fn fault(&self, code: &str, reason: String) -> Fault {
        Fault::new(
            500,
            format!("steps.jsonthreatprotection.{code}"),
            format!(
                "JSONThreatProtection[{n}]: Execution failed. reason: JSONThreatProtection[{n}]: {reason}",
                n = self.name
            ),
        )
    }

    fn inspect(&self, ex: &Exchange, dir: Direction) -> Result<(), Fault> {
        let source = self.source.unwrap_or(dir);
        let (headers, body) = match source {
            Direction::Request => (Some(&ex.request.headers), ex.request_body.as_deref()),
            Direction::Response => (
                ex.response.as_ref().map(|r| &r.headers),
                ex.response_body.as_deref(),
            ),
        };
        let Some(headers) = headers.filter(|_| source == dir || source == Direction::Request)
        else {
            return Err(self.fault(
                "SourceUnavailable",
                "the response is not available here".to_owned(),
            ));
        };
        if !is_json_type(headers.get("content-type")) {
            return Ok(());
        }
        let Some(body) = body.filter(|b| !b.iter().all(u8::is_ascii_whitespace)) else {
            return Ok(());
        };
        check(body, &self.limits).map_err(|v| {
            let line = 1 + body[..v.at.min(body.len())]
                .iter()
                .filter(|&&c| c == b'\n')
                .count();
            self.fault("ExecutionFailed", format!("{} at line {line}", v.reason))
        })
    }
}

impl Policy for JsonThreatProtection {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        self.source.is_none_or(|s| s == dir)
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        Hook::Ready(self.inspect(ex, dir).into())
    }
}

#[cfg(test)]
#[path = "json_threat_protection_tests.rs"]
mod tests;
