//! Token usage, normalised across providers.
//!
//! Every provider reports usage differently; [`Usage`] holds one meaning whatever the API:
//!
//! - `input_tokens`: every input token billed, cache reads and cache writes included
//!   (OpenAI's `prompt_tokens` already includes cached tokens; Anthropic's `input_tokens`
//!   does not, so its cache counts are added; Gemini's `toolUsePromptTokenCount` is added).
//! - `output_tokens`: every generated token billed, reasoning included (Gemini's
//!   `thoughtsTokenCount` is outside `candidatesTokenCount`, so it is added).
//! - `cached_input_tokens`, `cache_creation_input_tokens`, `reasoning_tokens`: the parts of
//!   the above that are priced differently.
//!
//! Numbers from the upstream are not trusted: a count that is negative, not an integer, or
//! above [`MAX_USAGE_TOKENS`] is refused (treated as not reported, and `anomaly` is set), and
//! all arithmetic saturates.

use serde_json::Value;

/// The largest token count accepted from an upstream (10^9: far above any context window).
pub const MAX_USAGE_TOKENS: u64 = 1_000_000_000;

/// Usage as reported by the upstream, normalised (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    /// Some usage number was refused (negative, fractional, absurdly large, wrong type).
    pub anomaly: bool,
}

impl Usage {
    /// Whether the upstream reported anything usable.
    pub fn is_reported(&self) -> bool {
        self.input_tokens.is_some() || self.output_tokens.is_some()
    }

    /// `input + output`, saturating; `None` when neither was reported.
    pub fn total_tokens(&self) -> Option<u64> {
        if !self.is_reported() {
            return None;
        }
        Some(
            self.input_tokens
                .unwrap_or(0)
                .saturating_add(self.output_tokens.unwrap_or(0)),
        )
    }
}

/// Where a final count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream's usage.
    Reported,
    /// Counted by tollgate (the request's prompt, or the text streamed) because the upstream
    /// sent none (no `include_usage`, interrupted stream, refused numbers).
    Counted,
}

/// The usage an exchange is charged with: reported where the upstream reported it,
/// counted otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub input_source: UsageSource,
    pub output_source: UsageSource,
}

impl FinalUsage {
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// Reads one token count from an upstream value. `Ok(None)` when absent or `null`;
/// `Err(())` when present but refused.
pub(crate) fn count(v: Option<&Value>) -> Result<Option<u64>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                return if u <= MAX_USAGE_TOKENS {
                    Ok(Some(u))
                } else {
                    Err(())
                };
            }
            // An integral float (`12.0`) is tolerated; fractions and negatives are not.
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && (0.0..=MAX_USAGE_TOKENS as f64).contains(&f) => {
                    Ok(Some(f as u64))
                }
                _ => Err(()),
            }
        }
        // int64 fields may arrive as JSON strings (proto3 JSON mapping).
        Some(Value::String(s)) => match s.parse::<u64>() {
            Ok(u) if u <= MAX_USAGE_TOKENS => Ok(Some(u)),
            _ => Err(()),
        },
        Some(_) => Err(()),
    }
}

/// Field setter that records refused numbers in `anomaly`.
pub(crate) struct Reader<'a> {
    pub usage: &'a mut Usage,
}

impl Reader<'_> {
    /// The count at `v`, or `None` (absent, or refused and flagged).
    pub fn get(&mut self, v: Option<&Value>) -> Option<u64> {
        match count(v) {
            Ok(n) => n,
            Err(()) => {
                self.usage.anomaly = true;
                None
            }
        }
    }
}

/// Sum of counts where at least one is present.
pub(crate) fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_are_validated() {
        assert_eq!(count(None), Ok(None));
        assert_eq!(count(Some(&json!(null))), Ok(None));
        assert_eq!(count(Some(&json!(0))), Ok(Some(0)));
        assert_eq!(count(Some(&json!(123))), Ok(Some(123)));
        assert_eq!(count(Some(&json!(12.0))), Ok(Some(12)));
        assert_eq!(count(Some(&json!("77"))), Ok(Some(77)));
        assert_eq!(count(Some(&json!(-1))), Err(()));
        assert_eq!(count(Some(&json!(1.5))), Err(()));
        assert_eq!(count(Some(&json!(u64::MAX))), Err(()));
        assert_eq!(count(Some(&json!(1e300))), Err(()));
        assert_eq!(count(Some(&json!(MAX_USAGE_TOKENS + 1))), Err(()));
        assert_eq!(count(Some(&json!("-3"))), Err(()));
        assert_eq!(count(Some(&json!([1]))), Err(()));
        assert_eq!(count(Some(&json!(true))), Err(()));
    }

    #[test]
    fn totals_saturate() {
        let u = Usage {
            input_tokens: Some(u64::MAX),
            output_tokens: Some(5),
            ..Usage::default()
        };
        assert_eq!(u.total_tokens(), Some(u64::MAX));
        assert_eq!(Usage::default().total_tokens(), None);
        assert_eq!(sum(None, None), None);
        assert_eq!(sum(Some(u64::MAX), Some(1)), Some(u64::MAX));
    }
}
