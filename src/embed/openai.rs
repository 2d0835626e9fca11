//! `kind: openai`: embeddings from an OpenAI-compatible `POST {baseUrl}/v1/embeddings`
//! (OpenAI, vLLM, TEI, Ollama, LiteLLM...), through the process-wide HTTP client.
//!
//! Sends `{"model": …, "input": "<text>"}`, reads `data[0].embedding`. Every failure is an
//! [`EmbedError::Unavailable`] (no answer in time, connection) or
//! [`EmbedError::BadResponse`] (non-2xx, malformed JSON, empty or non-numeric vector), so the
//! caller decides whether to fail open; nothing here retries.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use super::{EmbedError, Embedder, Embedding, DEFAULT_MAX_INPUT_BYTES, DEFAULT_TIMEOUT};
use crate::http_client::{HttpClient, HttpError};

/// Largest answer read (a 4096-dimension vector as JSON is about 90 KB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Configuration of the remote embedder.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenAiSpec {
    /// e.g. `http://tei.internal:8080` (the request goes to `{baseUrl}/v1/embeddings`).
    pub base_url: String,
    /// The `model` field sent.
    pub model: String,
    /// Environment variable holding the bearer key (read once, at load).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the bearer key (read once, at load; surrounding whitespace trimmed).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Whole-call timeout in milliseconds (connect, answer, body). Default 500.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Longer texts are refused with [`EmbedError::TooLong`] before any call. Default 64 KiB.
    #[serde(default)]
    pub max_input_bytes: Option<usize>,
}

/// The remote embedder. Cloning shares the connection pool.
#[derive(Clone)]
pub struct OpenAiEmbedder {
    uri: hyper::Uri,
    model: String,
    /// `Bearer …`, never logged (Debug leaves it out).
    authorization: Option<hyper::header::HeaderValue>,
    timeout: Duration,
    max_input_bytes: usize,
    http: HttpClient,
    id: String,
}

impl std::fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("uri", &self.uri)
            .field("model", &self.model)
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl OpenAiEmbedder {
    /// Validates the URL and reads the key; errors are configuration errors.
    pub fn new(spec: OpenAiSpec, http: HttpClient) -> Result<Self, EmbedError> {
        let base = spec.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(EmbedError::Config(format!(
                "baseUrl must be http:// or https://, got {base:?}"
            )));
        }
        let uri: hyper::Uri = format!("{base}/v1/embeddings")
            .parse()
            .map_err(|e| EmbedError::Config(format!("baseUrl {base:?}: {e}")))?;
        if spec.model.is_empty() {
            return Err(EmbedError::Config("model must not be empty".into()));
        }
        let key = match (&spec.api_key_env, &spec.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(EmbedError::Config(
                    "apiKeyEnv and apiKeyFile are exclusive".into(),
                ))
            }
            (Some(var), None) => Some(std::env::var(var).map_err(|_| {
                EmbedError::Config(format!("apiKeyEnv: environment variable {var} is not set"))
            })?),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| EmbedError::Config(format!("apiKeyFile {}: {e}", path.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let authorization = match key {
            Some(k) if k.is_empty() => {
                return Err(EmbedError::Config("the API key is empty".into()))
            }
            Some(k) => {
                let mut v =
                    hyper::header::HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                        EmbedError::Config(
                            "the API key has characters a header cannot carry".into(),
                        )
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let timeout = spec
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(EmbedError::Config("timeoutMs must be above 0".into()));
        }
        Ok(Self {
            id: format!("openai:{uri}#{}", spec.model),
            uri,
            model: spec.model,
            authorization,
            timeout,
            max_input_bytes: spec.max_input_bytes.unwrap_or(DEFAULT_MAX_INPUT_BYTES),
            http,
        })
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    data: Vec<Datum>,
}

#[derive(serde::Deserialize)]
struct Datum {
    embedding: Vec<f32>,
}

#[async_trait::async_trait]
impl Embedder for OpenAiEmbedder {
    async fn embed(&self, text: &str) -> Result<Embedding, EmbedError> {
        if text.len() > self.max_input_bytes {
            return Err(EmbedError::TooLong {
                len: text.len(),
                max: self.max_input_bytes,
            });
        }
        if text.trim().is_empty() {
            return Err(EmbedError::Empty);
        }
        let body = serde_json::json!({ "model": self.model, "input": text }).to_string();
        let mut req = hyper::Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| EmbedError::Config(format!("request: {e}")))?;
        let resp = self
            .http
            .send(req, false, self.timeout, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                HttpError::TooLarge(n) => {
                    EmbedError::BadResponse(format!("answer larger than {n} bytes"))
                }
                other => EmbedError::Unavailable(other.to_string()),
            })?;
        if !(200..300).contains(&resp.status) {
            return Err(EmbedError::BadResponse(format!("status {}", resp.status)));
        }
        let answer: Answer = serde_json::from_slice(&resp.body)
            // Position only: serde's message can quote the answer, which may echo the prompt.
            .map_err(|e| {
                EmbedError::BadResponse(format!(
                    "not an embeddings answer ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            })?;
        let first = answer
            .data
            .into_iter()
            .next()
            .ok_or_else(|| EmbedError::BadResponse("data is empty".into()))?;
        Embedding::normalized(first.embedding).map_err(|e| match e {
            EmbedError::Empty => EmbedError::BadResponse("zero or empty embedding".into()),
            other => other,
        })
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn dims(&self) -> Option<usize> {
        None
    }
}
