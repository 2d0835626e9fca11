//! The guard configuration, as written in a policy's `spec` (camelCase fields, snake_case
//! detector and enum names, unknown fields refused).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Action, Confidence};

/// The built-in detectors, by their category name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    PromptInjection,
    Jailbreak,
    Email,
    Phone,
    PaymentCard,
    Iban,
    UsSsn,
    IpAddress,
    AwsKey,
    GcpKey,
    PrivateKey,
    Jwt,
    ApiKey,
    HighEntropyToken,
}

impl Builtin {
    pub const ALL: [Builtin; 14] = [
        Builtin::PromptInjection,
        Builtin::Jailbreak,
        Builtin::Email,
        Builtin::Phone,
        Builtin::PaymentCard,
        Builtin::Iban,
        Builtin::UsSsn,
        Builtin::IpAddress,
        Builtin::AwsKey,
        Builtin::GcpKey,
        Builtin::PrivateKey,
        Builtin::Jwt,
        Builtin::ApiKey,
        Builtin::HighEntropyToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Builtin::PromptInjection => "prompt_injection",
            Builtin::Jailbreak => "jailbreak",
            Builtin::Email => "email",
            Builtin::Phone => "phone",
            Builtin::PaymentCard => "payment_card",
            Builtin::Iban => "iban",
            Builtin::UsSsn => "us_ssn",
            Builtin::IpAddress => "ip_address",
            Builtin::AwsKey => "aws_key",
            Builtin::GcpKey => "gcp_key",
            Builtin::PrivateKey => "private_key",
            Builtin::Jwt => "jwt",
            Builtin::ApiKey => "api_key",
            Builtin::HighEntropyToken => "high_entropy_token",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.as_str() == name)
    }
}

/// How a redaction rewrites a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedactionStyle {
    /// `[EMAIL]`, `[PAYMENT_CARD]`, `[CUSTOM:NAME]`.
    #[default]
    Placeholder,
    /// One `*` per character of the match.
    Mask,
}

/// One built-in detector's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectorSpec {
    pub action: Action,
    /// Findings below this confidence are dropped (default: the spec's `minConfidence`).
    #[serde(default)]
    pub min_confidence: Option<Confidence>,
}

/// A configured regex (Rust `regex` syntax, Unicode aware).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CustomPatternSpec {
    /// `[A-Za-z0-9_-]{1,64}`; the finding's category is `custom:<name>`.
    pub name: String,
    pub pattern: String,
    pub action: Action,
    #[serde(default = "high")]
    pub confidence: Confidence,
}

/// Words refused wherever they appear as whole words (matched after normalisation: case,
/// accents, zero-width characters, leetspeak).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeniedWordsSpec {
    pub words: Vec<String>,
    pub action: Action,
}

/// A named topic: any of its phrases marks the text (`denied_topic:<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeniedTopicSpec {
    pub name: String,
    pub phrases: Vec<String>,
    pub action: Action,
}

/// Streaming bounds (see [`super::StreamScanner`]).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamSpec {
    /// Trailing bytes held back after each delta so that a match spanning deltas is caught
    /// before any of it is released (default 256; 16..=65536).
    #[serde(default = "hold_back")]
    pub hold_back_bytes: usize,
    /// A candidate still open at the end of the text (a private key block arriving line by
    /// line) may be held up to this many bytes before it is released redacted as it stands
    /// (default 4096; at least `holdBackBytes`, at most 1 MiB).
    #[serde(default = "max_match")]
    pub max_match_bytes: usize,
}

impl Default for StreamSpec {
    fn default() -> Self {
        StreamSpec {
            hold_back_bytes: hold_back(),
            max_match_bytes: max_match(),
        }
    }
}

/// A guard's configuration. Absent `detectors` means every built-in detector with
/// `defaultAction`; an empty map means none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GuardSpec {
    #[serde(default)]
    pub detectors: Option<BTreeMap<Builtin, DetectorSpec>>,
    /// The action of every built-in detector when `detectors` is absent (default `log`).
    #[serde(default)]
    pub default_action: Option<Action>,
    /// Findings below this confidence are dropped (default `low`: keep all).
    #[serde(default)]
    pub min_confidence: Option<Confidence>,
    #[serde(default)]
    pub redaction: RedactionStyle,
    #[serde(default)]
    pub custom: Vec<CustomPatternSpec>,
    #[serde(default)]
    pub denied_words: Option<DeniedWordsSpec>,
    #[serde(default)]
    pub denied_topics: Vec<DeniedTopicSpec>,
    #[serde(default)]
    pub stream: StreamSpec,
}

impl GuardSpec {
    /// Every built-in detector with one action (tests, benches, a quick start).
    pub fn all(action: Action) -> GuardSpec {
        GuardSpec {
            default_action: Some(action),
            ..GuardSpec::default()
        }
    }

    /// The enabled built-in detectors and their settings.
    pub(crate) fn enabled(&self) -> BTreeMap<Builtin, (Action, Option<Confidence>)> {
        match &self.detectors {
            Some(map) => map
                .iter()
                .map(|(b, d)| (*b, (d.action, d.min_confidence)))
                .collect(),
            None => {
                let action = self.default_action.unwrap_or(Action::Log);
                Builtin::ALL.iter().map(|b| (*b, (action, None))).collect()
            }
        }
    }
}

fn high() -> Confidence {
    Confidence::High
}

fn hold_back() -> usize {
    256
}

fn max_match() -> usize {
    4096
}
