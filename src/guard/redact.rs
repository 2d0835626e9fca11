//! Rewriting text and JSON documents from findings.
//!
//! A JSON document is rewritten string value by string value: each literal is decoded,
//! scanned, and when changed re-encoded by `serde_json` (so escaping is always right); every
//! other byte of the document is copied as it was. Replacing one valid string literal by
//! another cannot make a valid document invalid.

use std::borrow::Cow;

use super::detector::Detector;
use super::spec::RedactionStyle;
use super::{Action, Finding, GuardError};

/// Rewrites the ranges of `findings` (any action; overlapping ranges are merged, the first
/// finding's category names the placeholder). Ranges outside `text` or off character
/// boundaries are widened to the enclosing characters or ignored, never a panic.
pub fn redact<'a>(text: &'a str, findings: &[Finding], style: RedactionStyle) -> Cow<'a, str> {
    if findings.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut ranges: Vec<(usize, usize, &Finding)> = findings
        .iter()
        .filter_map(|f| {
            let s = floor(text, f.start.min(text.len()));
            let e = ceil(text, f.end.min(text.len()));
            (s < e).then_some((s, e, f))
        })
        .collect();
    if ranges.is_empty() {
        return Cow::Borrowed(text);
    }
    ranges.sort_by_key(|r| (r.0, std::cmp::Reverse(r.1)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut i = 0;
    while i < ranges.len() {
        let (s, mut e, f) = ranges[i];
        i += 1;
        while i < ranges.len() && ranges[i].0 < e {
            e = e.max(ranges[i].1);
            i += 1;
        }
        if s < at {
            continue;
        }
        out.push_str(&text[at..s]);
        match style {
            RedactionStyle::Placeholder => out.push_str(&f.category.placeholder()),
            RedactionStyle::Mask => {
                for _ in text[s..e].chars() {
                    out.push('*');
                }
            }
        }
        at = e;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

fn floor(t: &str, mut i: usize) -> usize {
    while i > 0 && !t.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil(t: &str, mut i: usize) -> usize {
    while i < t.len() && !t.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Where a string value sits in a JSON document.
#[derive(Debug, Clone, Copy)]
pub struct JsonString<'a> {
    /// The member name the value (or the array holding it) belongs to, when there is one:
    /// `content`, `text`, `input`…
    pub key: Option<&'a str>,
    /// Index of the value among the document's string values, in document order.
    pub index: usize,
}

/// A finding inside one string value of a document (byte offsets in the decoded value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFinding {
    pub string_index: usize,
    pub finding: Finding,
}

/// The outcome of [`redact_json`].
#[derive(Debug, Default)]
pub struct JsonRedaction {
    /// The rewritten document, `None` when nothing was redacted (the body stands).
    pub body: Option<Vec<u8>>,
    pub findings: Vec<JsonFinding>,
    /// The most severe action among the findings.
    pub action: Option<Action>,
}

/// Scans every string value of `doc` (object keys are left alone), redacting the `redact`
/// findings in place. `select` picks the values to scan by where they sit (return `true`
/// for all). A `block` finding is reported and nothing is rewritten: the policy refuses the
/// document whole.
pub fn redact_json(
    detector: &Detector,
    doc: &[u8],
    mut select: impl FnMut(JsonString<'_>) -> bool,
) -> Result<JsonRedaction, GuardError> {
    let mut findings = Vec::new();
    let body = rewrite_json_strings(doc, |at, value| {
        if !select(at) {
            return None;
        }
        let s = detector.sanitize(value);
        findings.extend(s.findings.into_iter().map(|finding| JsonFinding {
            string_index: at.index,
            finding,
        }));
        match s.text {
            Cow::Owned(t) => Some(t),
            Cow::Borrowed(_) => None,
        }
    })?;
    let action = findings.iter().map(|f| f.finding.action).max();
    Ok(JsonRedaction {
        body: if action == Some(Action::Block) {
            None
        } else {
            body
        },
        findings,
        action,
    })
}

/// Calls `f` with every string value of `doc`, decoded; where it returns a new value, the
/// literal is replaced by its JSON encoding. Returns `None` when nothing changed. The
/// document must be UTF-8 with well-formed strings and balanced brackets; it is not
/// otherwise validated (a parse elsewhere does that), and is never made less valid.
pub fn rewrite_json_strings(
    doc: &[u8],
    mut f: impl FnMut(JsonString<'_>, &str) -> Option<String>,
) -> Result<Option<Vec<u8>>, GuardError> {
    let text = std::str::from_utf8(doc).map_err(|e| GuardError::Json {
        offset: e.valid_up_to(),
        reason: "not UTF-8",
    })?;
    let b = doc;
    // Containers: (is_object, the key this container is the value of).
    let mut stack: Vec<(bool, Option<String>)> = Vec::new();
    let mut key: Option<String> = None;
    let mut expect_key = false;
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut index = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Jump from one quote or backslash to the next: prompts are long strings.
                let mut j = i + 1;
                let mut escaped = false;
                loop {
                    match b
                        .get(j..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    {
                        None => {
                            j = b.len();
                            break;
                        }
                        Some(k) if b[j + k] == b'"' => {
                            j += k;
                            break;
                        }
                        Some(k) => {
                            escaped = true;
                            j += k + 2;
                        }
                    }
                }
                if j >= b.len() {
                    return Err(GuardError::Json {
                        offset: i,
                        reason: "unterminated string",
                    });
                }
                let literal = &text[i..=j];
                let decoded: Cow<'_, str> = if escaped {
                    Cow::Owned(serde_json::from_str::<String>(literal).map_err(|_| {
                        GuardError::Json {
                            offset: i,
                            reason: "invalid string escape",
                        }
                    })?)
                } else {
                    Cow::Borrowed(&text[i + 1..j])
                };
                let in_object = stack.last().is_some_and(|c| c.0);
                if in_object && expect_key {
                    key = Some(decoded.into_owned());
                    expect_key = false;
                } else {
                    let k = if in_object {
                        key.as_deref()
                    } else {
                        stack.last().and_then(|c| c.1.as_deref())
                    };
                    let at = JsonString { key: k, index };
                    index += 1;
                    if let Some(new) = f(at, &decoded) {
                        let o = out.get_or_insert_with(|| Vec::with_capacity(doc.len() + 64));
                        o.extend_from_slice(&b[copied..i]);
                        let enc = serde_json::to_string(&new).map_err(|_| GuardError::Json {
                            offset: i,
                            reason: "could not encode",
                        })?;
                        o.extend_from_slice(enc.as_bytes());
                        copied = j + 1;
                    }
                }
                i = j + 1;
                continue;
            }
            b'{' => {
                let k = if stack.last().is_some_and(|c| c.0) {
                    key.take()
                } else {
                    stack.last().and_then(|c| c.1.clone())
                };
                stack.push((true, k));
                expect_key = true;
            }
            b'[' => {
                let k = if stack.last().is_some_and(|c| c.0) {
                    key.take()
                } else {
                    stack.last().and_then(|c| c.1.clone())
                };
                stack.push((false, k));
            }
            b'}' | b']' => {
                let want_object = b[i] == b'}';
                match stack.pop() {
                    Some((obj, _)) if obj == want_object => {}
                    _ => {
                        return Err(GuardError::Json {
                            offset: i,
                            reason: "unbalanced brackets",
                        })
                    }
                }
                key = None;
                expect_key = false;
            }
            b',' if stack.last().is_some_and(|c| c.0) => {
                expect_key = true;
                key = None;
            }
            b':' => expect_key = false,
            _ => {}
        }
        i += 1;
    }
    if !stack.is_empty() {
        return Err(GuardError::Json {
            offset: b.len(),
            reason: "unbalanced brackets",
        });
    }
    Ok(out.map(|mut o| {
        o.extend_from_slice(&b[copied..]);
        o
    }))
}
