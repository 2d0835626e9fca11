//! The built-in embedder: a Model2Vec-style static model.
//!
//! Embedding = tokenize (the model's own `tokenizer.json`: through [`super::unigram`] when it
//! has the built-in model's shape, 58 MB resident for the whole model against 340 MB
//! through `tokenizers`; else through `tokenizers`), look each token's row up
//! (through `mapping` when the vocabulary is quantised to fewer rows), scale it by the
//! token's `weights` entry, average, normalise. No attention, no matrix products: the cost
//! is the tokenizer's. Matches the reference encoder shipped in the PyPI package (a test
//! compares vectors), except that nothing is truncated: a cache must not call two long
//! prompts equal because their first 512 tokens are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use sha2::Digest;

use super::{EmbedError, Embedder, Embedding, DEFAULT_MAX_INPUT_BYTES};

/// Texts longer than this are embedded on the blocking pool, not on the caller's task
/// (the tokenizer takes roughly a microsecond per few bytes).
const INLINE_MAX_BYTES: usize = 8 * 1024;

#[derive(Debug)]
struct Inner {
    tokenizer: Tokenizer,
    /// Token id -> row of `rows`.
    mapping: Vec<u32>,
    /// Token id -> scale.
    weights: Vec<f32>,
    /// `n_rows * dims` values, row-major.
    rows: Rows,
    dims: usize,
    max_input_bytes: usize,
}

/// The model's tokenizer: the compact Unigram one when `tokenizer.json` has its shape (the
/// built-in model does), else the `tokenizers` crate.
#[derive(Debug)]
enum Tokenizer {
    Compact(super::unigram::Unigram),
    Full(Box<tokenizers::Tokenizer>),
}

/// The embedding rows as stored: int8 rows stay int8 (a quarter of the memory); their
/// scale vanishes in the normalisation.
#[derive(Debug)]
enum Rows {
    I8(Vec<i8>),
    F32(Vec<f32>),
}

impl Rows {
    fn len(&self) -> usize {
        match self {
            Rows::I8(r) => r.len(),
            Rows::F32(r) => r.len(),
        }
    }

    /// Adds `w` times row `row` (of `d` values) to `sum`; false when out of range.
    fn add(&self, row: usize, d: usize, w: f32, sum: &mut [f32]) -> bool {
        let start = row * d;
        match self {
            Rows::I8(r) => match r.get(start..start + d) {
                Some(r) => {
                    for (s, v) in sum.iter_mut().zip(r) {
                        *s += f32::from(*v) * w;
                    }
                    true
                }
                None => false,
            },
            Rows::F32(r) => match r.get(start..start + d) {
                Some(r) => {
                    for (s, v) in sum.iter_mut().zip(r) {
                        *s += v * w;
                    }
                    true
                }
                None => false,
            },
        }
    }
}

/// The built-in static embedder (`kind: static`). `Clone` shares the model.
#[derive(Debug, Clone)]
pub struct StaticEmbedder {
    inner: Arc<Inner>,
    id: Arc<str>,
}

fn model_err(dir: &Path, reason: impl Into<String>) -> EmbedError {
    EmbedError::Model {
        dir: dir.to_path_buf(),
        reason: reason.into(),
    }
}

impl StaticEmbedder {
    /// Loads `dir/{config.json,tokenizer.json,model.safetensors}`. Every check happens here,
    /// so a broken directory fails at configuration load, not on a request.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        Self::load_with_limit(dir, DEFAULT_MAX_INPUT_BYTES)
    }

    /// [`load`](Self::load), refusing texts over `max_input_bytes`.
    pub fn load_with_limit(dir: &Path, max_input_bytes: usize) -> Result<Self, EmbedError> {
        let read = |name: &str| -> Result<Vec<u8>, EmbedError> {
            std::fs::read(dir.join(name)).map_err(|e| model_err(dir, format!("{name}: {e}")))
        };
        // config.json: only its presence and shape are checked; the vectors are always
        // normalised (cosine needs it whatever the model's `normalize`).
        let _cfg: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&read("config.json")?)
                .map_err(|e| model_err(dir, format!("config.json: {e}")))?;
        let tokenizer_json = read("tokenizer.json")?;
        let tokenizer = match super::unigram::Unigram::from_json(&tokenizer_json)
            .map_err(|e| model_err(dir, e.to_string()))?
        {
            Some(u) => Tokenizer::Compact(u),
            None => {
                let mut t = tokenizers::Tokenizer::from_bytes(&tokenizer_json)
                    .map_err(|e| model_err(dir, format!("tokenizer.json: {e}")))?;
                t.with_padding(None);
                t.with_truncation(None)
                    .map_err(|e| model_err(dir, format!("tokenizer.json: {e}")))?;
                Tokenizer::Full(Box::new(t))
            }
        };
        drop(tokenizer_json);
        let bytes = read("model.safetensors")?;
        let digest = sha2::Sha256::digest(&bytes);
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| model_err(dir, format!("model.safetensors: {e}")))?;

        let emb = st
            .tensor("embeddings")
            .map_err(|e| model_err(dir, format!("model.safetensors: embeddings: {e}")))?;
        let &[n_rows, dims] = emb.shape() else {
            return Err(model_err(dir, "embeddings must be 2-dimensional"));
        };
        if n_rows == 0 || dims == 0 {
            return Err(model_err(dir, "embeddings is empty"));
        }
        let rows = match emb.dtype() {
            Dtype::I8 => Rows::I8(emb.data().iter().map(|&b| b as i8).collect()),
            Dtype::F32 => Rows::F32(
                emb.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            other => {
                return Err(model_err(
                    dir,
                    format!("embeddings dtype {other:?} not supported (I8 or F32)"),
                ))
            }
        };
        if rows.len() != n_rows * dims {
            return Err(model_err(dir, "embeddings size does not match its shape"));
        }

        let vocab = match &tokenizer {
            Tokenizer::Compact(u) => u.vocab_size(),
            Tokenizer::Full(t) => t.get_vocab_size(true),
        };
        let mapping: Vec<u32> = match st.tensor("mapping") {
            Ok(t) => {
                if t.dtype() != Dtype::I64 {
                    return Err(model_err(dir, "mapping must be I64"));
                }
                t.data()
                    .chunks_exact(8)
                    .map(|c| {
                        let v =
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                        u32::try_from(v)
                            .ok()
                            .filter(|&r| (r as usize) < n_rows)
                            .ok_or_else(|| model_err(dir, "mapping points outside embeddings"))
                    })
                    .collect::<Result<_, _>>()?
            }
            // Unquantised: one row per token.
            Err(_) => (0..n_rows as u32).collect(),
        };
        let weights: Vec<f32> = match st.tensor("weights") {
            Ok(t) => {
                if t.dtype() != Dtype::F32 {
                    return Err(model_err(dir, "weights must be F32"));
                }
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            Err(_) => vec![1.0; mapping.len()],
        };
        if mapping.len() < vocab || weights.len() != mapping.len() {
            return Err(model_err(
                dir,
                format!(
                    "tokenizer has {vocab} tokens, mapping {} and weights {}",
                    mapping.len(),
                    weights.len()
                ),
            ));
        }
        // Named by content, so replicas with the model at different paths share cache keys.
        let hex = format!("{digest:x}");
        let id = format!("static:{dims}:{}", &hex[..16]);
        Ok(Self {
            inner: Arc::new(Inner {
                tokenizer,
                mapping,
                weights,
                rows,
                dims,
                max_input_bytes,
            }),
            id: id.into(),
        })
    }

    /// Embeds on the calling thread (CPU work, proportional to the text's length).
    pub fn embed_sync(&self, text: &str) -> Result<Embedding, EmbedError> {
        self.inner.embed(text)
    }

    pub fn model_dims(&self) -> usize {
        self.inner.dims
    }
}

impl Inner {
    fn embed(&self, text: &str) -> Result<Embedding, EmbedError> {
        if text.len() > self.max_input_bytes {
            return Err(EmbedError::TooLong {
                len: text.len(),
                max: self.max_input_bytes,
            });
        }
        if text.trim().is_empty() {
            return Err(EmbedError::Empty);
        }
        let mut compact = Vec::new();
        let full;
        let ids: &[u32] = match &self.tokenizer {
            Tokenizer::Compact(u) => {
                u.encode(text, &mut compact);
                &compact
            }
            Tokenizer::Full(t) => {
                // The tokenizer's errors come from its configuration, not from the text
                // (any &str tokenizes); still, no panic: report it as a model problem.
                full = t.encode_fast(text, false).map_err(|e| EmbedError::Model {
                    dir: PathBuf::new(),
                    reason: format!("tokenizer: {e}"),
                })?;
                full.get_ids()
            }
        };
        if ids.is_empty() {
            return Err(EmbedError::Empty);
        }
        let d = self.dims;
        let mut sum = vec![0f32; d];
        for &id in ids {
            let t = id as usize;
            let (Some(&row), Some(&w)) = (self.mapping.get(t), self.weights.get(t)) else {
                continue;
            };
            self.rows.add(row as usize, d, w, &mut sum);
        }
        // The mean's 1/n and the int8 scale vanish in the normalisation.
        Embedding::normalized(sum)
    }
}

#[async_trait::async_trait]
impl Embedder for StaticEmbedder {
    async fn embed(&self, text: &str) -> Result<Embedding, EmbedError> {
        if text.len() <= INLINE_MAX_BYTES || text.len() > self.inner.max_input_bytes {
            return self.inner.embed(text);
        }
        let inner = self.inner.clone();
        let owned = text.to_owned();
        match tokio::task::spawn_blocking(move || inner.embed(&owned)).await {
            Ok(r) => r,
            // The runtime is shutting down.
            Err(e) => Err(EmbedError::Unavailable(format!("embedding task: {e}"))),
        }
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn dims(&self) -> Option<usize> {
        Some(self.inner.dims)
    }
}
