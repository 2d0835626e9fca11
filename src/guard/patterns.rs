//! The built-in candidate patterns. All are ASCII-only and compiled together, in this order,
//! into one `meta::Regex` with ASCII word boundaries (so the lazy DFA never gives up on
//! non-ASCII text). Order is priority: when two candidates start at the same byte, the
//! earlier pattern wins (a specific key format before the generic token).
//!
//! A pattern only finds candidates; its [`Check`] decides (and may narrow the range).

use super::{Builtin, Confidence};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// The pattern alone is proof.
    None,
    /// `name: value` / `name = value`: keep only the value; it must not be a plain word.
    Assignment,
    /// Letters of both cases and a digit (vendor prefix + random body).
    Mixed,
    Luhn,
    Iban,
    Ssn,
    /// A bare 9-digit SSN after its label: keep the digits.
    SsnLabelled,
    Phone {
        min_digits: u8,
        max_digits: u8,
    },
    Ipv4,
    Ipv6,
    Email,
    Jwt,
    Entropy,
}

pub(crate) struct Pattern {
    pub builtin: Builtin,
    pub regex: &'static str,
    pub check: Check,
    pub confidence: Confidence,
}

const fn p(builtin: Builtin, regex: &'static str, check: Check, confidence: Confidence) -> Pattern {
    Pattern {
        builtin,
        regex,
        check,
        confidence,
    }
}

use Builtin as B;
use Check as C;
use Confidence::{High as H, Low as L, Medium as M};

pub(crate) const PATTERNS: &[Pattern] = &[
    // Secrets first: their prefixes are specific.
    p(
        B::PrivateKey,
        r"-----BEGIN[ A-Z0-9]{0,20}PRIVATE KEY(?: BLOCK)?-----[A-Za-z0-9+/=\s\\]*(?:-----END[ A-Z0-9]{0,20}PRIVATE KEY(?: BLOCK)?-----)?",
        C::None,
        H,
    ),
    p(
        B::Jwt,
        r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
        C::Jwt,
        H,
    ),
    p(B::AwsKey, r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", C::None, H),
    p(
        B::AwsKey,
        r#"(?i:aws)[A-Za-z0-9_ .-]{0,20}(?i:secret)[A-Za-z0-9_ .-]{0,20}["']?\s*[:=]\s*["']?[A-Za-z0-9/+]{40}\b"#,
        C::Assignment,
        H,
    ),
    p(
        B::GcpKey,
        r#""private_key_id"\s*:\s*"[0-9a-f]{40}""#,
        C::Assignment,
        H,
    ),
    p(B::GcpKey, r"\bGOCSPX-[A-Za-z0-9_-]{28}", C::None, H),
    p(B::GcpKey, r"\bya29\.[0-9A-Za-z_-]{30,512}", C::None, H),
    p(
        B::ApiKey,
        r"\bsk-ant-[a-z]{3,8}[0-9]{2}-[A-Za-z0-9_-]{32,256}",
        C::None,
        H,
    ),
    p(
        B::ApiKey,
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,256}",
        C::Mixed,
        H,
    ),
    p(B::ApiKey, r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b", C::None, H),
    p(
        B::ApiKey,
        r"\bgithub_pat_[A-Za-z0-9_]{60,255}\b",
        C::None,
        H,
    ),
    p(
        B::ApiKey,
        r"\bxox[abposr]-[A-Za-z0-9-]{10,250}",
        C::Mixed,
        H,
    ),
    p(
        B::ApiKey,
        r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,247}\b",
        C::None,
        H,
    ),
    p(B::ApiKey, r"\bAIza[0-9A-Za-z_-]{35}", C::None, H),
    p(
        B::ApiKey,
        r#"\b(?i:api[_-]?key|x-api-key|secret[_-]?key|client[_-]?secret|access[_-]?token|auth[_-]?token|password|passwd|pwd)["']?\s{0,3}[:=]\s{0,3}["']?[A-Za-z0-9_\-./+=~!#$%^&*]{6,200}"#,
        C::Assignment,
        M,
    ),
    p(
        B::ApiKey,
        r"\b(?i:bearer)\s{1,3}[A-Za-z0-9_\-.~+/]{16,512}=*",
        C::Assignment,
        M,
    ),
    // Personal data.
    p(
        B::Iban,
        r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
        C::Iban,
        H,
    ),
    p(
        B::PaymentCard,
        r"\b[0-9](?:[ -]?[0-9]){12,18}\b",
        C::Luhn,
        H,
    ),
    p(B::UsSsn, r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", C::Ssn, H),
    p(B::UsSsn, r"\b[0-9]{3} [0-9]{2} [0-9]{4}\b", C::Ssn, M),
    p(
        B::UsSsn,
        r"\b(?i:ssn|social security(?: number)?)[^A-Za-z0-9]{0,4}[0-9]{9}\b",
        C::SsnLabelled,
        H,
    ),
    p(
        B::Phone,
        r"\+[1-9][0-9]{0,3}(?:[ .-]?\(?[0-9]{1,5}\)?){1,6}",
        C::Phone {
            min_digits: 8,
            max_digits: 15,
        },
        H,
    ),
    p(
        B::Phone,
        r"\b00[1-9][0-9]{0,2}(?:[ .-]?[0-9]{1,5}){2,6}\b",
        C::Phone {
            min_digits: 10,
            max_digits: 15,
        },
        M,
    ),
    p(
        B::Phone,
        r"(?:\b1[ .-]?)?(?:\([2-9][0-9]{2}\)[ .-]?|\b[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}\b",
        C::Phone {
            min_digits: 10,
            max_digits: 11,
        },
        M,
    ),
    p(
        B::Phone,
        r"\b0[1-9][0-9]{0,4}(?:[ ./-]?[0-9]{2,5}){1,4}\b",
        C::Phone {
            min_digits: 9,
            max_digits: 12,
        },
        M,
    ),
    p(
        B::IpAddress,
        r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b",
        C::Ipv4,
        M,
    ),
    p(
        B::IpAddress,
        r"(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3})?",
        C::Ipv6,
        M,
    ),
    p(
        B::Email,
        r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b",
        C::Email,
        H,
    ),
    // Last: anything long and random-looking that nothing above claimed.
    p(
        B::HighEntropyToken,
        r"\b[A-Za-z0-9_-]{24,256}",
        C::Entropy,
        L,
    ),
];
