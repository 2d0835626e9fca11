//! The process's embedders, built once per distinct spec and kept across configuration
//! reloads: loading the built-in model reads a 10 MB tokenizer, which a reload (or two
//! policies naming the same model) should not repeat; and the semantic cache and the model
//! router of one flow share one embedder, so one request's prompt is embedded once
//! ([`PromptEmbedding`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{build, EmbedError, Embedder, EmbedderSpec, Embedding};

/// Embedders by spec. `default_model_dir` is `--embedder-model-dir`
/// (`TOLLGATE_EMBED_MODEL_DIR`), used by a `kind: static` spec that names no directory.
#[derive(Debug, Default)]
pub struct Embedders {
    default_model_dir: Option<PathBuf>,
    built: Mutex<HashMap<String, Arc<dyn Embedder>>>,
}

impl Embedders {
    pub fn new(default_model_dir: Option<PathBuf>) -> Self {
        Self {
            default_model_dir,
            built: Mutex::default(),
        }
    }

    /// The process default, read from `TOLLGATE_EMBED_MODEL_DIR` when set (how `validate`,
    /// tests and benches find the model without a flag).
    pub fn from_env() -> Self {
        Self::new(std::env::var_os("TOLLGATE_EMBED_MODEL_DIR").map(PathBuf::from))
    }

    pub fn default_model_dir(&self) -> Option<&Path> {
        self.default_model_dir.as_deref()
    }

    /// The embedder `spec` names: the one built before for the same spec, else a new one.
    /// A relative `modelDir` is resolved against `config_dir`.
    pub fn get(
        &self,
        spec: &EmbedderSpec,
        config_dir: Option<&Path>,
        http: &crate::http_client::HttpClient,
    ) -> Result<Arc<dyn Embedder>, EmbedError> {
        let spec = match spec {
            EmbedderSpec::Static { model_dir } => EmbedderSpec::Static {
                model_dir: Some(
                    model_dir
                        .as_deref()
                        .map(|d| match config_dir {
                            Some(base) if d.is_relative() => base.join(d),
                            _ => d.to_path_buf(),
                        })
                        .or_else(|| self.default_model_dir.clone())
                        .ok_or_else(|| {
                            EmbedError::Config(
                                "kind: static needs modelDir, or tollgate's \
                                 --embedder-model-dir (TOLLGATE_EMBED_MODEL_DIR); \
                                 scripts/setup.sh installs a model in .tools/embed-model"
                                    .into(),
                            )
                        })?,
                ),
            },
            other => other.clone(),
        };
        let key = format!("{spec:?}");
        if let Some(e) = self.built.lock().get(&key) {
            return Ok(e.clone());
        }
        // Built outside the lock: loading a model takes a while, and another spec's
        // lookup should not wait for it. Two loads of one spec at once keep the first.
        let e = build(&spec, None, http)?;
        Ok(self.built.lock().entry(key).or_insert(e).clone())
    }
}

/// The request's prompt embedded once and shared by the steps that need it (a semantic
/// cache and a model router with the same embedder): kept in `ex.state.prompt_embedding`.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// [`Embedder::id`] of the embedder that made it.
    pub embedder: Arc<str>,
    /// A hash of the text embedded, so a step embedding other text does not reuse it.
    pub text_hash: u64,
    pub embedding: Embedding,
}

impl PromptEmbedding {
    /// `text`'s hash as [`PromptEmbedding::text_hash`] holds it.
    pub fn hash_text(text: &str) -> u64 {
        use std::hash::BuildHasher;
        static SEED: std::sync::LazyLock<foldhash::quality::RandomState> =
            std::sync::LazyLock::new(foldhash::quality::RandomState::default);
        SEED.hash_one(text)
    }

    /// The stored embedding when it was made by `embedder` from `text`.
    pub fn matching<'a>(
        slot: &'a Option<PromptEmbedding>,
        embedder: &str,
        text: &str,
    ) -> Option<&'a Embedding> {
        slot.as_ref()
            .filter(|p| &*p.embedder == embedder && p.text_hash == Self::hash_text(text))
            .map(|p| &p.embedding)
    }
}

/// Embeds `text` with `embedder`, reusing `slot` when it holds that text's embedding by the
/// same embedder, and leaving the result in `slot` for the next step.
pub async fn embed_shared(
    slot: &mut Option<PromptEmbedding>,
    embedder: &Arc<dyn Embedder>,
    text: &str,
) -> Result<Embedding, EmbedError> {
    if let Some(e) = PromptEmbedding::matching(slot, embedder.id(), text) {
        return Ok(e.clone());
    }
    let started = std::time::Instant::now();
    let result = embedder.embed(text).await;
    let kind = embedder.id().split(':').next().unwrap_or("other");
    let kind = if kind == "static" || kind == "openai" {
        kind
    } else {
        "other"
    };
    EMBED_SECONDS
        .with_label_values(&[kind, if result.is_ok() { "ok" } else { "error" }])
        .observe(started.elapsed().as_secs_f64());
    let embedding = result?;
    *slot = Some(PromptEmbedding {
        embedder: embedder.id().into(),
        text_hash: PromptEmbedding::hash_text(text),
        embedding: embedding.clone(),
    });
    Ok(embedding)
}

/// `tollgate_embedder_duration_seconds{kind,result}`: every prompt embedded on a request's
/// path (the cache's lookup, the router's similarity rules), however it ended.
static EMBED_SECONDS: std::sync::LazyLock<prometheus::HistogramVec> = std::sync::LazyLock::new(
    || {
        let h = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "tollgate_embedder_duration_seconds",
                "Time to embed a prompt on the request path, by embedder kind (static, openai) and result (ok, error)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
            &["kind", "result"],
        )
        .expect("valid metric");
        if let Err(e) = crate::telemetry::METRICS
            .registry
            .register(Box::new(h.clone()))
        {
            tracing::warn!(error = %e, "embedder metric not registered");
        }
        h
    },
);
