//! Understanding LLM traffic: which API an exchange speaks, what the request asks for (model,
//! prompt text, stream flag, token limits) and what the response carries (usage and generated
//! text, JSON or streamed), plus prompt token counting.
//!
//! Self-contained: no protobuf, no pipeline types. The AI policies are written against this
//! module, never against a provider's JSON.
//!
//! - [`detect`]: API from method + path (+ headers).
//! - [`parse_request`]: a request body, parsed once, into an [`LlmRequest`].
//! - [`sse::SseDecoder`] and [`json_stream::JsonArrayStream`]: bounded, incremental framing
//!   of streamed responses, fed arbitrary byte chunks.
//! - [`ResponseAccumulator`]: fed each response chunk as it passes; extracts [`Usage`] and the
//!   generated text per API.
//! - [`track`]: the tracker that fills the exchange's LLM slots as the pipeline runs.
//! - [`TokenCounter`]: exact counts for OpenAI models (tiktoken encodings bundled in the
//!   binary, each built once), a documented approximation for other families.

pub mod conversation;
pub mod detect;
pub mod json_stream;
pub mod request;
pub mod response;
pub mod sse;
pub mod synth;
pub mod tokens;
pub mod track;
pub mod usage;

#[cfg(test)]
mod tests;

pub use conversation::{conversation, Conversation, Role, Turn};
pub use detect::{detect, Api, Endpoint, StreamShape};
pub use request::{parse_request, LlmRequest};
pub use response::{ResponseAccumulator, ResponseFormat, ResponseSummary};
pub use tokens::{CountMethod, CountingConfig, Encoding, TokenCounter};
pub use usage::{FinalUsage, Usage, UsageSource, MAX_USAGE_TOKENS};

/// Why a request body could not be understood. Every variant is a client error (400).
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("request body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("field `{field}` must be {expected}")]
    Field {
        field: &'static str,
        expected: &'static str,
    },
}

impl LlmError {
    fn field(field: &'static str, expected: &'static str) -> Self {
        LlmError::Field { field, expected }
    }
}
