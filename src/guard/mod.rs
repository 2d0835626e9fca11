//! The guardrail detection engine (issue 15): local detectors, redaction, and a streaming
//! scanner, for the `SanitizePrompt` / `SanitizeResponse` policies to call.
//!
//! Self-contained: no protobuf, no pipeline types.
//!
//! - [`GuardSpec`]: the configuration (serde, `deny_unknown_fields`), compiled once by
//!   [`Detector::compile`] into a [`Detector`] (`Send + Sync`, shared in an `Arc`).
//! - [`Detector::scan`]: one multi-pattern regex pass (`regex_automata::meta::Regex` built
//!   from every built-in pattern) plus one Aho-Corasick pass over a normalised copy of the
//!   text (injection and jailbreak phrasing, denied words and topics), then validators on
//!   the candidates only (Luhn, IBAN mod-97, SSN ranges, IP parsing, entropy, JWT header).
//!   Custom regexes form a second multi-pattern pass, only when configured.
//! - [`redact()`] / [`redact_json`]: rewrite text, or the string values of a JSON document
//!   (re-escaped, everything else byte for byte).
//! - [`StreamScanner`]: fed text deltas, releases what is safe, holding back a bounded tail.
//! - [`armor`]: Model Armor request / result types and their mapping to findings and Apigee
//!   variables.
//! - [`external`]: the external guards' clients (Model Armor over REST, a generic HTTP
//!   guard), their timeouts, fail-open/closed and metrics.
//!
//! Findings carry categories and byte ranges, never the matched text: nothing here puts a
//! matched value in an error, a log line or a metric label.

pub mod armor;
mod detector;
pub mod external;
mod normalize;
mod patterns;
mod phrases;
mod redact;
mod spec;
mod stream;
mod validate;

#[cfg(test)]
mod quality;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

pub use detector::{Detector, Sanitized};
pub use redact::{
    redact, redact_json, rewrite_json_strings, JsonFinding, JsonRedaction, JsonString,
};
pub use spec::{
    Builtin, CustomPatternSpec, DeniedTopicSpec, DeniedWordsSpec, DetectorSpec, GuardSpec,
    RedactionStyle, StreamSpec,
};
pub use stream::{StreamOutput, StreamScanner};

/// Why a [`GuardSpec`] could not be compiled, or a document not rewritten. Messages name the
/// offending pattern or position, never matched text.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("custom pattern `{name}` is not a valid regex: {reason}")]
    CustomPattern { name: String, reason: String },
    #[error("custom pattern name `{0}` is used twice")]
    DuplicateCustom(String),
    #[error("custom pattern name must be 1-64 characters of [A-Za-z0-9_-], got {0:?}")]
    CustomName(String),
    #[error("{what} must not be empty")]
    Empty { what: String },
    #[error("custom patterns could not be compiled together: {0}")]
    CustomSet(String),
    #[error("{0}")]
    Limits(String),
    #[error("JSON document is malformed at byte {offset}: {reason}")]
    Json { offset: usize, reason: &'static str },
    #[error("internal: built-in pattern set failed to compile: {0}")]
    Builtin(String),
}

/// How sure a detector is. Ordered: `Low < Medium < High`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }
}

/// What a finding asks the policy to do. Ordered by severity: `Log < Redact < Block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Log,
    Redact,
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Redact => "redact",
            Action::Block => "block",
        }
    }
}

/// What was found. Built-in categories are fixed; custom patterns and denied topics carry
/// their configured name (bounded by the configuration, so safe as a metric label).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Category {
    Builtin(Builtin),
    /// A configured regex, by its name.
    Custom(Arc<str>),
    DeniedWord,
    /// A configured topic, by its name.
    DeniedTopic(Arc<str>),
}

impl Category {
    /// The family without the configured name: the label for metrics and Apigee-style
    /// variables (`email`, `custom`, `denied_topic`, …).
    pub fn family(&self) -> &'static str {
        match self {
            Category::Builtin(b) => b.as_str(),
            Category::Custom(_) => "custom",
            Category::DeniedWord => "denied_word",
            Category::DeniedTopic(_) => "denied_topic",
        }
    }

    /// The placeholder a redaction writes: `[EMAIL]`, `[CUSTOM:ORDER_ID]`.
    pub fn placeholder(&self) -> String {
        format!("[{}]", self.to_string().to_ascii_uppercase())
    }
}

impl fmt::Display for Category {
    /// `email`, `custom:<name>`, `denied_topic:<name>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Category::Custom(n) => write!(f, "custom:{n}"),
            Category::DeniedTopic(n) => write!(f, "denied_topic:{n}"),
            other => f.write_str(other.family()),
        }
    }
}

impl From<Builtin> for Category {
    fn from(b: Builtin) -> Self {
        Category::Builtin(b)
    }
}

/// One detection: where (byte range in the scanned text), what, how sure, and the
/// configured action. Never holds the matched text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub category: Category,
    pub confidence: Confidence,
    pub action: Action,
    pub start: usize,
    pub end: usize,
}

impl Finding {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The most severe action among `findings` (`None` when there are none).
pub fn decision(findings: &[Finding]) -> Option<Action> {
    findings.iter().map(|f| f.action).max()
}
