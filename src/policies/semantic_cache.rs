//! `SemanticCache`: answers a question asked again, in other words, from what the model
//! answered the first time. Apigee's `SemanticCacheLookup` / `SemanticCachePopulate` pair is
//! accepted too (one looks up, the other stores; they share entries by `cacheName`).
//!
//! ```yaml
//! spec:
//!   type: SemanticCache
//!   embedder: {kind: static}        # the built-in model (--embedder-model-dir), or
//!                                   # {kind: openai, url: http://tei:8080, model: ..., timeoutMs: 500}
//!   threshold: 0.75                 # cosine similarity a stored question must reach
//!   ttlSeconds: 3600
//!   scope: app                      # app (default) | product | developer | global; the model always
//!   includeSystemPrompt: true       # entries of two system prompts never meet
//!   maxTurns: 1                     # conversations with more turns are not cached
//!   maxPromptTokens: 2048           # longer prompts are not cached
//!   maxEntryBytes: 65536            # longer answers are not stored
//!   maxCacheBytes: 67108864         # the whole cache
//!   exactUpTo: 2048                 # entries per scope searched exactly; an approximate index past it
//!   statusHeader: x-tollgate-semantic-cache   # `hit; similarity=0.91`, `hit; exact`, `miss`, `skip; reason=turns`
//!   cacheName: faq                  # entries shared by the policies that name it (default: the policy's name)
//!   shared: {redis: "redis://127.0.0.1:6379/0", timeoutMs: 50}   # replicas share entries
//! ```
//!
//! **The key.** A question is looked up within a scope: a SHA-256 over the embedder, the
//! model, the scope's identity (the verified app, product or developer; without one a
//! non-global scope does not cache), the system prompt, every earlier turn exactly, and every
//! request field that shapes the answer (temperature, `response_format`, `max_tokens`, ...: the
//! body without its conversation and stream fields). Only the last user turn is compared by
//! meaning. Two apps, two models, two system prompts or two JSON schemas never share an
//! answer. Within a scope, the same question (byte for byte) is found without embedding;
//! otherwise the last user turn is embedded (once per request, shared with a `ModelRouter`),
//! the closest stored questions at or above `threshold` are checked by
//! [`crate::embed::specifics::compatible`] (numbers, negations, names must agree), and the
//! best that passes is served.
//!
//! **Skipped** (counted `skip`, status `skip; reason=...`): no user question last (a tool
//! loop), more turns than `maxTurns`, images or other media, token-array prompts, `n` > 1,
//! requests offering tools, prompts over `maxPromptTokens`, no identity for the scope.
//!
//! **A hit** is an `Outcome::Respond`: the stored answer written in the request's API and
//! stream mode by [`crate::llm::synth`] (JSON, or the event stream the SDK reads), so no
//! later request step runs: token quotas are not charged, the upstream is not called.
//!
//! **Populate** happens after the exchange, off the client's path: when the response was a
//! complete 2xx answer with one choice of text, no upstream error, not cut short. TTL and
//! the byte bound are enforced inside the index ([`crate::vindex`]). An embedder that fails
//! is a miss (logged and counted), never an error for the request.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{check_header_name, parse_spec, BuildContext, SpecError};
use crate::embed::{self, Embedder, EmbedderSpec, Embedding};
use crate::llm::synth::{self, Synth};
use crate::llm::{self as llm_mod, Api, Conversation, LlmRequest};
use crate::pipeline::{AfterFuture, Answer, Direction, ExchangeEnd, Hook, Hooks, Outcome, Policy};
use crate::vars::Exchange;
use crate::vindex::{IndexConfig, Scope, VectorIndex};

pub const TYPE: &str = "SemanticCache";
/// Apigee's lookup half.
pub const APIGEE_LOOKUP_TYPE: &str = "SemanticCacheLookup";
/// Apigee's populate half.
pub const APIGEE_POPULATE_TYPE: &str = "SemanticCachePopulate";
pub const HIT: &str = "semanticcache.Hit";

fn default_threshold() -> f32 {
    embed::DEFAULT_THRESHOLD
}
fn default_ttl() -> u64 {
    3600
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_max_prompt_tokens() -> u64 {
    2048
}
fn default_entry() -> usize {
    64 * 1024
}
fn default_total() -> u64 {
    64 * 1024 * 1024
}
fn default_exact_up_to() -> usize {
    2048
}
fn default_status_header() -> String {
    "x-tollgate-semantic-cache".into()
}
fn default_embedder() -> EmbedderSpec {
    EmbedderSpec::Static { model_dir: None }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default = "default_embedder")]
    embedder: EmbedderSpec,
    #[serde(default = "default_threshold")]
    threshold: f32,
    #[serde(default = "default_ttl", alias = "ttlInSeconds")]
    ttl_seconds: u64,
    #[serde(default)]
    scope: ScopeKind,
    #[serde(default = "yes")]
    include_system_prompt: bool,
    #[serde(default = "one")]
    max_turns: usize,
    #[serde(default = "default_max_prompt_tokens")]
    max_prompt_tokens: u64,
    #[serde(default = "default_entry")]
    max_entry_bytes: usize,
    #[serde(default = "default_total")]
    max_cache_bytes: u64,
    #[serde(default = "default_exact_up_to")]
    exact_up_to: usize,
    #[serde(default = "default_status_header")]
    status_header: String,
    #[serde(default)]
    cache_name: Option<String>,
    #[serde(default)]
    shared: Option<SharedSpec>,
}

use super::response_cache::SharedSpec;

/// Whose entries a lookup may see (besides the model, always).
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum ScopeKind {
    /// The verified app (developer + app name, else `client_id`): no app, no caching.
    #[default]
    App,
    Product,
    Developer,
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Both,
    Lookup,
    Populate,
}

/// A stored answer.
#[derive(Debug)]
pub struct Entry {
    /// The question as asked (for the specifics check against a later one).
    question: String,
    answer: String,
    /// The model that answered (as the upstream named it).
    model: String,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.question.len() + self.answer.len() + self.model.len() + 64
    }
}

/// One cache's entries: the vector index and the exact-question map, kept across
/// configuration reloads in [`SemanticStores`].
#[derive(Debug)]
pub struct Store {
    index: VectorIndex<Entry>,
    exact: moka::sync::Cache<u128, Exact>,
    ttl: Duration,
    shared: Mutex<Option<Arc<crate::vindex::shared::SharedIndex>>>,
}

/// An exact-map value: the entry and how long it lives (shorter for an entry that arrived
/// from another replica part-way through its life).
#[derive(Debug, Clone)]
struct Exact {
    entry: Arc<Entry>,
    ttl: Duration,
}

struct ExactExpiry;

impl moka::Expiry<u128, Exact> for ExactExpiry {
    fn expire_after_create(
        &self,
        _key: &u128,
        value: &Exact,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl Store {
    fn new(cfg: &StoreConfig) -> Self {
        Self {
            index: VectorIndex::new(IndexConfig {
                max_bytes: cfg.max_cache_bytes,
                ttl: cfg.ttl,
                exact_up_to: cfg.exact_up_to,
            }),
            exact: moka::sync::Cache::builder()
                .max_capacity(cfg.max_cache_bytes)
                .weigher(|_, e: &Exact| u32::try_from(e.entry.bytes()).unwrap_or(u32::MAX))
                .expire_after(ExactExpiry)
                .build(),
            ttl: cfg.ttl,
            shared: Mutex::new(None),
        }
    }

    /// Stores `entry` for `ttl` at most (never past the cache's own TTL).
    fn insert(
        &self,
        scope: Scope,
        exact: u128,
        embedding: Embedding,
        entry: Arc<Entry>,
        ttl: Duration,
    ) {
        let ttl = ttl.min(self.ttl);
        if ttl.is_zero() {
            return;
        }
        let bytes = entry.bytes();
        self.exact.insert(
            exact,
            Exact {
                entry: entry.clone(),
                ttl,
            },
        );
        self.index
            .insert_with_ttl(scope, embedding, entry, bytes, ttl);
    }
}

/// What makes two configurations' stores interchangeable.
#[derive(Debug, Clone, PartialEq)]
struct StoreConfig {
    ttl: Duration,
    max_cache_bytes: u64,
    exact_up_to: usize,
    shared: Option<SharedSpec>,
}

/// The semantic caches of the process by name, kept across reloads (a reload that keeps a
/// cache's settings keeps its entries).
#[derive(Debug, Default)]
pub struct SemanticStores {
    stores: Mutex<std::collections::HashMap<String, (StoreConfig, Arc<Store>)>>,
}

impl SemanticStores {
    fn get(&self, name: &str, cfg: &StoreConfig) -> Arc<Store> {
        let mut stores = self.stores.lock();
        match stores.get(name) {
            Some((c, s)) if c == cfg => s.clone(),
            _ => {
                let s = Arc::new(Store::new(cfg));
                stores.insert(name.to_owned(), (cfg.clone(), s.clone()));
                s
            }
        }
    }
}

#[derive(Debug)]
struct SemanticCache {
    name: String,
    /// `cacheName`, or the policy's name.
    cache: Arc<str>,
    mode: Mode,
    embedder: Arc<dyn Embedder>,
    threshold: f32,
    scope: ScopeKind,
    include_system: bool,
    max_turns: usize,
    max_prompt_tokens: u64,
    max_entry: usize,
    status_header: String,
    store: Arc<Store>,
    /// `semanticcache.<policy>.`
    prefix: String,
    metrics: Counters,
}

/// `tollgate_semantic_cache_lookups_total{policy,result}` and friends, resolved once.
#[derive(Debug)]
struct Counters {
    hit_exact: prometheus::IntCounter,
    hit_similar: prometheus::IntCounter,
    miss: prometheus::IntCounter,
    skip: prometheus::IntCounter,
    error: prometheus::IntCounter,
    stored: prometheus::IntCounter,
    similarity: prometheus::Histogram,
    entries: prometheus::IntGauge,
    bytes: prometheus::IntGauge,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "semantic cache metric not registered");
    }
    c
}

static LOOKUPS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    register(
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_semantic_cache_lookups_total",
                "SemanticCache lookups by policy and result: hit_exact, hit_similar, miss, skip (not cacheable), error (embedder failed: served as a miss)",
            ),
            &["policy", "result"],
        )
        .expect("valid metric"),
    )
});
static STORED: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    register(
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_semantic_cache_stored_total",
                "Answers SemanticCache stored, by policy",
            ),
            &["policy"],
        )
        .expect("valid metric"),
    )
});
static SIMILARITY: std::sync::LazyLock<prometheus::HistogramVec> = std::sync::LazyLock::new(|| {
    register(
            prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new(
                    "tollgate_semantic_cache_hit_similarity",
                    "Cosine similarity of the stored question a SemanticCache hit served (exact hits are 1)",
                )
                .buckets(vec![0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]),
                &["policy"],
            )
            .expect("valid metric"),
        )
});
static ENTRIES: std::sync::LazyLock<prometheus::IntGaugeVec> = std::sync::LazyLock::new(|| {
    register(
        prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "tollgate_semantic_cache_entries",
                "Entries in a SemanticCache's index (expired ones count until swept)",
            ),
            &["policy"],
        )
        .expect("valid metric"),
    )
});
static BYTES: std::sync::LazyLock<prometheus::IntGaugeVec> = std::sync::LazyLock::new(|| {
    register(
        prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "tollgate_semantic_cache_bytes",
                "Bytes a SemanticCache's index holds",
            ),
            &["policy"],
        )
        .expect("valid metric"),
    )
});

impl Counters {
    fn new(policy: &str) -> Self {
        let c = |r: &str| LOOKUPS.with_label_values(&[policy, r]);
        Self {
            hit_exact: c("hit_exact"),
            hit_similar: c("hit_similar"),
            miss: c("miss"),
            skip: c("skip"),
            error: c("error"),
            stored: STORED.with_label_values(&[policy]),
            similarity: SIMILARITY.with_label_values(&[policy]),
            entries: ENTRIES.with_label_values(&[policy]),
            bytes: BYTES.with_label_values(&[policy]),
        }
    }
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    build_mode(ctx, spec, Mode::Both)
}

pub fn build_lookup(
    ctx: &BuildContext,
    spec: serde_norway::Value,
) -> Result<Arc<dyn Policy>, SpecError> {
    build_mode(ctx, spec, Mode::Lookup)
}

pub fn build_populate(
    ctx: &BuildContext,
    spec: serde_norway::Value,
) -> Result<Arc<dyn Policy>, SpecError> {
    build_mode(ctx, spec, Mode::Populate)
}

fn build_mode(
    ctx: &BuildContext,
    spec: serde_norway::Value,
    mode: Mode,
) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    if !(spec.threshold > 0.0 && spec.threshold <= 1.0) {
        return Err(SpecError::new("threshold", "must be in (0, 1]"));
    }
    if spec.ttl_seconds == 0 {
        return Err(SpecError::new("ttlSeconds", "must be at least 1"));
    }
    if spec.max_turns == 0 {
        return Err(SpecError::new("maxTurns", "must be at least 1"));
    }
    if spec.max_entry_bytes == 0 || spec.max_entry_bytes as u64 > spec.max_cache_bytes {
        return Err(SpecError::new(
            "maxEntryBytes",
            "must be at least 1 and at most maxCacheBytes",
        ));
    }
    let status_header =
        check_header_name(&spec.status_header).map_err(|e| SpecError::new("statusHeader", e))?;
    let embedder = ctx
        .services
        .embedders
        .get(
            &spec.embedder,
            ctx.config_dir.as_deref(),
            &ctx.services.http,
        )
        .map_err(|e| SpecError::new("embedder", e.to_string()))?;
    let cache_name = spec.cache_name.clone().unwrap_or_else(|| ctx.name.clone());
    let store_cfg = StoreConfig {
        ttl: Duration::from_secs(spec.ttl_seconds),
        max_cache_bytes: spec.max_cache_bytes,
        exact_up_to: spec.exact_up_to,
        shared: spec.shared.clone(),
    };
    let store = ctx.services.semantic.get(&cache_name, &store_cfg);
    if let Some(sh) = &spec.shared {
        connect_shared(&store, &cache_name, sh)?;
    }
    Ok(Arc::new(SemanticCache {
        prefix: format!("semanticcache.{}.", ctx.name),
        metrics: Counters::new(&ctx.name),
        name: ctx.name.clone(),
        cache: cache_name.as_str().into(),
        mode,
        embedder,
        threshold: spec.threshold,
        scope: spec.scope,
        include_system: spec.include_system_prompt,
        max_turns: spec.max_turns,
        max_prompt_tokens: spec.max_prompt_tokens,
        max_entry: spec.max_entry_bytes,
        status_header,
        store,
    }))
}

/// Starts following the shared tier once per store (a reload keeping the store keeps the
/// follower).
fn connect_shared(store: &Arc<Store>, cache_name: &str, sh: &SharedSpec) -> Result<(), SpecError> {
    let mut slot = store.shared.lock();
    if slot.is_some() {
        return Ok(());
    }
    let shared = crate::vindex::shared::SharedIndex::connect(
        &sh.redis,
        &format!("semanticcache:{cache_name}"),
        Duration::from_millis(sh.timeout_ms.max(1)),
    )
    .map_err(|e| SpecError::new("shared.redis", e.to_string()))?;
    let shared = Arc::new(shared);
    let weak = Arc::downgrade(store);
    shared.follow(move |scope, embedding, payload, ttl| {
        let Some(store) = weak.upgrade() else {
            return;
        };
        match decode_entry(&payload) {
            // The entry's remaining life, not a fresh TTL.
            Some((exact, entry)) => store.insert(scope, exact, embedding, Arc::new(entry), ttl),
            None => tracing::warn!("semantic cache: unreadable shared entry skipped"),
        }
    });
    *slot = Some(shared);
    Ok(())
}

/// A shared entry's payload: the exact key, then the question, answer and model, each
/// length-prefixed.
fn encode_entry(exact: u128, e: &Entry) -> bytes::Bytes {
    let mut out = Vec::with_capacity(16 + 12 + e.bytes());
    out.extend_from_slice(&exact.to_le_bytes());
    for s in [&e.question, &e.answer, &e.model] {
        out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.into()
}

fn decode_entry(b: &[u8]) -> Option<(u128, Entry)> {
    let exact = u128::from_le_bytes(b.get(..16)?.try_into().ok()?);
    let mut rest = b.get(16..)?;
    let mut field = || -> Option<String> {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(4..4 + n)?).ok()?.to_owned();
        rest = rest.get(4 + n..)?;
        Some(s)
    };
    let question = field()?;
    let answer = field()?;
    let model = field()?;
    Some((
        exact,
        Entry {
            question,
            answer,
            model,
        },
    ))
}

/// Why a request is not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    NoQuestion,
    Turns,
    Media,
    Choices,
    Tools,
    Long,
    NoIdentity,
    Body,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::NoQuestion => "no-question",
            Skip::Turns => "turns",
            Skip::Media => "media",
            Skip::Choices => "choices",
            Skip::Tools => "tools",
            Skip::Long => "long",
            Skip::NoIdentity => "no-identity",
            Skip::Body => "body",
        }
    }
}

/// A miss's key, kept in `ex.state.semantic_pending` until the answer is stored.
#[derive(Debug)]
pub struct Pending {
    /// The cache's name (a Lookup and a Populate of one cache share it).
    cache: Arc<str>,
    key: Key,
}

/// A cacheable request: where to look and what for.
#[derive(Debug, Clone)]
struct Key {
    scope: Scope,
    exact: u128,
    question: String,
}

/// Request fields that carry the conversation or only the transport: everything else
/// shapes the answer and is part of the scope.
const CONVERSATION_FIELDS: &[&str] = &[
    "messages",
    "input",
    "prompt",
    "contents",
    "system",
    "instructions",
    "systemInstruction",
    "system_instruction",
    "stream",
    "stream_options",
    "model",
    "user",
    "metadata",
    "store",
];

fn sha128(h: Sha256) -> u128 {
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_le_bytes(b)
}

fn put(h: &mut Sha256, s: &[u8]) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s);
}

impl SemanticCache {
    /// The scope's identity, `None` when the scope needs one the exchange lacks.
    fn identity(&self, ex: &Exchange) -> Option<String> {
        let get = |n: &str| {
            ex.lookup(n)
                .filter(|v| !v.is_empty())
                .map(|v| v.into_owned())
        };
        match self.scope {
            ScopeKind::Global => Some(String::new()),
            ScopeKind::Product => get("apiproduct.name"),
            ScopeKind::Developer => get("developer.email"),
            ScopeKind::App => match (get("developer.email"), get("app.name")) {
                (Some(d), Some(a)) => Some(format!("{d}\n{a}")),
                _ => get("client_id"),
            },
        }
    }

    /// The request's key, or why it is not cached.
    fn key(&self, ex: &Exchange) -> Result<Option<Key>, Skip> {
        let Some(req) = ex.state.llm.clone() else {
            return Ok(None);
        };
        if req.api == Api::OpenAiEmbeddings {
            return Ok(None);
        }
        let Some(json) = ex.body_json(Direction::Request) else {
            return Err(Skip::Body);
        };
        let Ok(v) = json.value.as_ref() else {
            return Err(Skip::Body);
        };
        let conv = llm_mod::conversation(req.api, v).map_err(|_| Skip::Body)?;
        // The skips first: a request that is not cached needs no digest.
        self.check(&req, &conv, ex.state.llm_prompt_tokens)?;
        let params = params_digest(v);
        let identity = self.identity(ex).ok_or(Skip::NoIdentity)?;
        let question = conv.last_user().ok_or(Skip::NoQuestion)?.to_owned();
        let mut h = Sha256::new();
        put(&mut h, b"tollgate.semantic.v1");
        put(&mut h, self.embedder.id().as_bytes());
        put(&mut h, req.model.as_deref().unwrap_or("").as_bytes());
        put(&mut h, format!("{:?}", self.scope).as_bytes());
        put(&mut h, identity.as_bytes());
        if self.include_system {
            put(&mut h, conv.system.as_bytes());
        }
        for t in conv.earlier() {
            put(&mut h, t.role.as_str().as_bytes());
            put(&mut h, t.text.as_bytes());
        }
        put(&mut h, &params);
        let scope = sha128(h.clone());
        put(&mut h, question.as_bytes());
        let exact = sha128(h);
        Ok(Some(Key {
            scope,
            exact,
            question,
        }))
    }

    fn check(
        &self,
        req: &LlmRequest,
        conv: &Conversation,
        tokens: Option<u64>,
    ) -> Result<(), Skip> {
        if conv.last_user().is_none_or(|q| q.trim().is_empty()) {
            return Err(Skip::NoQuestion);
        }
        if conv.turns.len() > self.max_turns {
            return Err(Skip::Turns);
        }
        if conv.media_parts > 0 || conv.token_ids > 0 || req.media_parts > 0 {
            return Err(Skip::Media);
        }
        if req.choices() > 1 {
            return Err(Skip::Choices);
        }
        if !req.tools.is_empty() {
            return Err(Skip::Tools);
        }
        if tokens.unwrap_or(0) > self.max_prompt_tokens {
            return Err(Skip::Long);
        }
        Ok(())
    }

    fn set_status(&self, ex: &mut Exchange, hit: bool, status: String) {
        ex.set_var(format!("{}cachehit", self.prefix), hit);
        ex.set_header(Direction::Response, &self.status_header, status);
    }

    fn skip(&self, ex: &mut Exchange, why: Skip) {
        self.metrics.skip.inc();
        ex.set_var(format!("{}skipped", self.prefix), why.as_str());
        self.set_status(ex, false, format!("skip; reason={}", why.as_str()));
    }

    /// The best stored answer for `key` at or above the threshold whose specifics agree.
    fn similar(&self, key: &Key, query: &Embedding) -> Option<(f32, Arc<Entry>)> {
        self.store
            .index
            .search(key.scope, query, self.threshold, 4)
            .into_iter()
            .find(|h| embed::specifics::compatible(&key.question, &h.value.question))
            .map(|h| (h.similarity, h.value))
    }

    /// The hit as the request's API would have answered it.
    fn answer(&self, ex: &mut Exchange, entry: &Entry, similarity: Option<f32>) -> Outcome {
        let Some(req) = ex.state.llm.clone() else {
            return Outcome::Continue;
        };
        let mut raw = [0u8; 12];
        // An id is cosmetic (SDKs echo it): a failed draw is not worth failing the hit.
        let _ = getrandom::fill(&mut raw);
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let created = chrono::Utc::now().timestamp();
        let model = if entry.model.is_empty() {
            req.model.as_deref().unwrap_or("")
        } else {
            &entry.model
        };
        let Some(w) = synth::write(&Synth {
            api: req.api,
            stream: req.stream || req.stream_shape.is_some(),
            stream_shape: req.stream_shape,
            include_usage: req.include_usage,
            model,
            text: &entry.answer,
            id: &id,
            created,
        }) else {
            return Outcome::Continue;
        };
        let status = match similarity {
            None => {
                self.metrics.hit_exact.inc();
                self.metrics.similarity.observe(1.0);
                "hit; exact".to_owned()
            }
            Some(s) => {
                self.metrics.hit_similar.inc();
                self.metrics.similarity.observe(f64::from(s));
                format!("hit; similarity={s:.3}")
            }
        };
        ex.set_var(format!("{}cachehit", self.prefix), true);
        ex.set_var(
            format!("{}similarity", self.prefix),
            crate::vars::Value::Float(f64::from(similarity.unwrap_or(1.0))),
        );
        let headers = vec![(self.status_header.clone(), status)];
        Outcome::Respond(Box::new(Answer::new(
            200,
            HIT,
            headers,
            w.content_type.to_owned(),
            w.body,
        )))
    }

    async fn lookup(&self, ex: &mut Exchange) -> Outcome {
        let key = match self.key(ex) {
            Ok(Some(k)) => k,
            Ok(None) => return Outcome::Continue,
            Err(why) => {
                self.skip(ex, why);
                return Outcome::Continue;
            }
        };
        if let Some(e) = self.store.exact.get(&key.exact) {
            return self.answer(ex, &e.entry, None);
        }
        let embedding = embed::embed_shared(
            &mut ex.state.prompt_embedding,
            &self.embedder,
            &key.question,
        )
        .await;
        let found = match embedding {
            Ok(q) => self.similar(&key, &q),
            Err(e) => {
                self.metrics.error.inc();
                tracing::warn!(policy = %self.name, error = %e, "semantic cache: embedding failed; served as a miss");
                None
            }
        };
        match found {
            Some((sim, e)) => self.answer(ex, &e, Some(sim)),
            None => {
                self.metrics.miss.inc();
                self.remember(ex, key);
                self.set_status(ex, false, "miss".into());
                Outcome::Continue
            }
        }
    }

    /// Keeps a miss's key for storing the answer (once per cache and exchange).
    fn remember(&self, ex: &mut Exchange, key: Key) {
        let pending = &mut ex.state.semantic_pending;
        if !pending.iter().any(|p| p.cache == self.cache) {
            pending.push(Pending {
                cache: self.cache.clone(),
                key,
            });
        }
    }

    /// What to store after the exchange: the answer, when it is one worth serving again.
    fn entry(&self, ex: &Exchange) -> Option<Entry> {
        let status = ex.response.as_ref()?.status;
        if !(200..300).contains(&status) {
            return None;
        }
        if response_guarded(ex) {
            // The tracker read the upstream's words; the client may have seen them
            // redacted or cut. A hit is not guarded again, so such an answer is not stored.
            return None;
        }
        let s = ex.state.llm_response.as_deref()?;
        let text = s.choices.first()?;
        if !s.complete
            || s.upstream_error.is_some()
            || s.framing_error.is_some()
            || s.dropped_text_chars > 0
            || s.choices.len() != 1
            || text.trim().is_empty()
            || text.len() > self.max_entry
        {
            return None;
        }
        Some(Entry {
            question: String::new(),
            answer: text.clone(),
            model: s.model.clone().unwrap_or_default(),
        })
    }
}

/// A response guard found something in the answer, or could not read it.
fn response_guarded(ex: &Exchange) -> bool {
    let mut guarded = false;
    ex.for_each_var(&mut |k, v| {
        if let Some(rest) = k.strip_prefix("sanitizeresponse.") {
            guarded |= (rest.ends_with(".matched") && v.as_text() == "true")
                || rest.ends_with(".unsupported");
        }
    });
    guarded
}

/// A digest of the request fields that shape the answer (see [`CONVERSATION_FIELDS`]).
fn params_digest(v: &serde_json::Value) -> Vec<u8> {
    let Some(o) = v.as_object() else {
        return Vec::new();
    };
    let mut fields: Vec<(&String, &serde_json::Value)> = o
        .iter()
        .filter(|(k, _)| !CONVERSATION_FIELDS.contains(&k.as_str()))
        .collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (k, v) in fields {
        put(&mut h, k.as_bytes());
        put(&mut h, v.to_string().as_bytes());
    }
    h.finalize().to_vec()
}

impl Policy for SemanticCache {
    fn type_name(&self) -> &'static str {
        match self.mode {
            Mode::Both => TYPE,
            Mode::Lookup => APIGEE_LOOKUP_TYPE,
            Mode::Populate => APIGEE_POPULATE_TYPE,
        }
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: true,
            after_exchange: self.mode != Mode::Lookup,
            ..Hooks::default()
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        match (dir, self.mode) {
            (Direction::Request, Mode::Both | Mode::Lookup) => {
                Hook::Pending(Box::pin(self.lookup(ex)))
            }
            (Direction::Request, Mode::Populate) => {
                // Marks the exchange for storing after it (the lookup half may be in
                // another flow step, or absent).
                match self.key(ex) {
                    Ok(Some(key)) => self.remember(ex, key),
                    Ok(None) => {}
                    Err(why) => {
                        ex.set_var(format!("{}skipped", self.prefix), why.as_str());
                    }
                }
                Hook::CONTINUE
            }
            (Direction::Response, _) => Hook::CONTINUE,
        }
    }

    fn after_exchange(&self, ex: &Exchange, end: ExchangeEnd) -> Option<AfterFuture> {
        if end != ExchangeEnd::Completed {
            return None;
        }
        let key = ex
            .state
            .semantic_pending
            .iter()
            .find(|p| p.cache == self.cache)?
            .key
            .clone();
        let mut entry = self.entry(ex)?;
        entry.question = key.question.clone();
        let entry = Arc::new(entry);
        let ready = embed::PromptEmbedding::matching(
            &ex.state.prompt_embedding,
            self.embedder.id(),
            &key.question,
        )
        .cloned();
        let embedder = self.embedder.clone();
        let store = self.store.clone();
        let metrics = (
            self.metrics.stored.clone(),
            self.metrics.entries.clone(),
            self.metrics.bytes.clone(),
        );
        let name = self.name.clone();
        Some(Box::pin(async move {
            let embedding = match ready {
                Some(e) => e,
                None => match embedder.embed(&key.question).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(policy = %name, error = %e, "semantic cache: answer not stored: embedding failed");
                        return;
                    }
                },
            };
            let shared = store.shared.lock().clone();
            if let Some(sh) = shared {
                sh.publish(
                    key.scope,
                    &embedding,
                    encode_entry(key.exact, &entry),
                    store.ttl,
                );
            }
            let ttl = store.ttl;
            store.insert(key.scope, key.exact, embedding, entry, ttl);
            metrics.0.inc();
            metrics
                .1
                .set(i64::try_from(store.index.len()).unwrap_or(i64::MAX));
            metrics
                .2
                .set(i64::try_from(store.index.bytes()).unwrap_or(i64::MAX));
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Endpoint, ResponseAccumulator, ResponseFormat};
    use crate::policies::llm_test_support::verified;
    use crate::services::Services;
    use crate::vars::ResponseInfo;

    fn model_dir() -> Option<std::path::PathBuf> {
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/embed-model");
        if d.join("model.safetensors").exists() {
            Some(d)
        } else {
            eprintln!("skipped: no built-in model in .tools/embed-model (run scripts/setup.sh)");
            None
        }
    }

    fn services(dir: &std::path::Path) -> Services {
        Services {
            embedders: Arc::new(embed::Embedders::new(Some(dir.to_path_buf()))),
            ..Services::default()
        }
    }

    fn policy_in(services: &Services, name: &str, yaml: &str, mode: Mode) -> Arc<dyn Policy> {
        let ctx = BuildContext {
            name: name.into(),
            services: services.clone(),
            ..Default::default()
        };
        build_mode(&ctx, serde_norway::from_str(yaml).expect("yaml"), mode).expect("builds")
    }

    /// A chat request `body` from app `app`, parsed as the tracker would.
    fn exchange(app: &str, body: serde_json::Value) -> Exchange {
        let mut ex = Exchange::default();
        ex.request.method = "POST".into();
        ex.request.uri = "/v1/chat/completions".into();
        let bytes = serde_json::to_vec(&body).expect("json");
        let endpoint = Endpoint {
            api: Api::OpenAiChat,
            path_model: None,
            path_stream: None,
        };
        let req = crate::llm::parse_request(&endpoint, &bytes).expect("llm request");
        ex.state.llm = Some(Arc::new(req));
        ex.state.llm_prompt_tokens = Some(20);
        ex.request_body = Some(bytes);
        ex.state
            .add_app("verifyapikey.k.".into(), verified(app, "dev@x", "p", None));
        ex
    }

    fn chat(q: &str) -> serde_json::Value {
        serde_json::json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": q}]})
    }

    /// The upstream answered `text` (a whole JSON chat completion).
    fn answered(ex: &mut Exchange, status: u16, text: &str) {
        ex.response = Some(ResponseInfo {
            status,
            headers: Default::default(),
        });
        let mut acc = ResponseAccumulator::new(Api::OpenAiChat, ResponseFormat::Json);
        acc.feed(
            serde_json::json!({"id": "x", "object": "chat.completion", "model": "gpt-4o-mini-2024",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": "stop"}]})
            .to_string()
            .as_bytes(),
        );
        ex.state.llm_response = Some(Box::new(acc.finish()));
    }

    async fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Outcome {
        p.run(ex, Direction::Request).outcome().await
    }

    async fn populate(p: &Arc<dyn Policy>, ex: &Exchange) {
        if let Some(f) = p.after_exchange(ex, ExchangeEnd::Completed) {
            f.await;
        }
    }

    fn body_text(o: &Outcome) -> String {
        match o {
            Outcome::Respond(a) => String::from_utf8(a.body.clone()).expect("utf-8"),
            other => panic!("not a hit: {other:?}"),
        }
    }

    #[tokio::test]
    async fn paraphrase_hits_within_the_app_and_never_across_apps() {
        let Some(dir) = model_dir() else { return };
        let s = services(&dir);
        let p = policy_in(&s, "sc", "{}", Mode::Both);
        let q = "What is the capital of Australia?";
        let mut first = exchange("app-a", chat(q));
        assert_eq!(run(&p, &mut first).await, Outcome::Continue);
        assert_eq!(
            first
                .var("semanticcache.sc.cachehit")
                .map(|v| v.as_text().into_owned()),
            Some("false".into())
        );
        answered(&mut first, 200, "Canberra.");
        populate(&p, &first).await;

        // The same words: an exact hit, no embedding needed.
        let mut again = exchange("app-a", chat(q));
        let o = run(&p, &mut again).await;
        assert!(body_text(&o).contains("\"Canberra.\""), "{o:?}");
        if let Outcome::Respond(a) = &o {
            assert_eq!(a.code, HIT);
            assert!(a
                .headers
                .iter()
                .any(|(n, v)| n == "x-tollgate-semantic-cache" && v == "hit; exact"));
        }
        // Other words, same question: a similar hit.
        let mut para = exchange("app-a", chat("What's Australia's capital city?"));
        let o = run(&p, &mut para).await;
        assert!(body_text(&o).contains("Canberra."), "{o:?}");
        let sim = para.var("semanticcache.sc.similarity").expect("similarity");
        assert!(sim.as_text().parse::<f64>().unwrap() >= f64::from(embed::DEFAULT_THRESHOLD));
        // Another app asking the very same words: a miss.
        let mut other = exchange("app-b", chat(q));
        assert_eq!(run(&p, &mut other).await, Outcome::Continue);
        // A near-miss (another country) in the same app: a miss.
        let mut near = exchange("app-a", chat("What is the capital of Austria?"));
        assert_eq!(run(&p, &mut near).await, Outcome::Continue);
    }

    #[tokio::test]
    async fn system_prompt_model_and_parameters_are_part_of_the_scope() {
        let Some(dir) = model_dir() else { return };
        let s = services(&dir);
        let p = policy_in(&s, "sc2", "{}", Mode::Both);
        let q = "How do I reverse a list in Python?";
        let mut first = exchange("a", chat(q));
        run(&p, &mut first).await;
        answered(&mut first, 200, "Use reversed() or list.reverse().");
        populate(&p, &first).await;
        let variants = [
            serde_json::json!({"model": "gpt-4o-mini", "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": q}]}),
            serde_json::json!({"model": "gpt-4o", "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q}]}),
            serde_json::json!({"model": "gpt-4o-mini", "temperature": 1.5, "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q}]}),
            serde_json::json!({"model": "gpt-4o-mini", "response_format": {"type": "json_object"}, "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q}]}),
        ];
        for v in variants {
            let mut ex = exchange("a", v.clone());
            assert_eq!(run(&p, &mut ex).await, Outcome::Continue, "{v}");
        }
        // Streaming is not a parameter of the answer: the same entry, as events.
        let mut streaming = chat(q);
        streaming["stream"] = true.into();
        let mut ex = exchange("a", streaming);
        let body = body_text(&run(&p, &mut ex).await);
        assert!(body.starts_with("data: "), "{body}");
        assert!(body.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn only_whole_successful_guarded_free_answers_are_stored() {
        let Some(dir) = model_dir() else { return };
        let s = services(&dir);
        let p = policy_in(&s, "sc3", "{}", Mode::Both);
        let q = "Name three primary colours.";
        let stored = |s: &Services| {
            s.semantic.get(
                "sc3",
                &StoreConfig {
                    ttl: Duration::from_secs(3600),
                    max_cache_bytes: default_total(),
                    exact_up_to: 2048,
                    shared: None,
                },
            )
        };
        // A 500, a guarded answer, an exchange that did not complete: nothing stored.
        let mut ex = exchange("a", chat(q));
        run(&p, &mut ex).await;
        answered(&mut ex, 500, "oops");
        populate(&p, &ex).await;
        let mut ex = exchange("a", chat(q));
        run(&p, &mut ex).await;
        answered(&mut ex, 200, "Red, yellow, blue.");
        ex.set_var("sanitizeresponse.g.matched", true);
        populate(&p, &ex).await;
        let mut ex = exchange("a", chat(q));
        run(&p, &mut ex).await;
        answered(&mut ex, 200, "Red, yellow, blue.");
        assert!(p.after_exchange(&ex, ExchangeEnd::Aborted).is_none());
        assert_eq!(stored(&s).index.len(), 0);
        // A good one is.
        populate(&p, &ex).await;
        assert_eq!(stored(&s).index.len(), 1);
    }

    #[tokio::test]
    async fn what_is_not_cacheable_is_skipped_with_a_reason() {
        let Some(dir) = model_dir() else { return };
        let s = services(&dir);
        let p = policy_in(&s, "sc4", "{maxPromptTokens: 100}", Mode::Both);
        let cases = [
            (
                serde_json::json!({"model": "m", "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "And then?"}]}),
                "turns",
            ),
            (
                serde_json::json!({"model": "m", "n": 2, "messages": [
                {"role": "user", "content": "Hi"}]}),
                "choices",
            ),
            (
                serde_json::json!({"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}],
                "messages": [{"role": "user", "content": "Hi"}]}),
                "tools",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:x"}}]}]}),
                "media",
            ),
        ];
        for (body, why) in cases {
            let mut ex = exchange("a", body);
            assert_eq!(run(&p, &mut ex).await, Outcome::Continue);
            assert_eq!(
                ex.var("semanticcache.sc4.skipped")
                    .map(|v| v.as_text().into_owned()),
                Some(why.to_owned())
            );
        }
        let mut long = exchange("a", chat("Hi"));
        long.state.llm_prompt_tokens = Some(101);
        run(&p, &mut long).await;
        assert_eq!(
            long.var("semanticcache.sc4.skipped")
                .map(|v| v.as_text().into_owned()),
            Some("long".to_owned())
        );
        // No verified app under `scope: app`: nothing is cached.
        let mut anon = exchange("a", chat("Hi"));
        anon.state = Default::default();
        anon.state.llm = exchange("a", chat("Hi")).state.llm.clone();
        run(&p, &mut anon).await;
        assert_eq!(
            anon.var("semanticcache.sc4.skipped")
                .map(|v| v.as_text().into_owned()),
            Some("no-identity".to_owned())
        );
    }

    #[tokio::test]
    async fn apigee_pair_shares_entries_by_cache_name() {
        let Some(dir) = model_dir() else { return };
        let s = services(&dir);
        let lookup = policy_in(&s, "look", "{cacheName: faq}", Mode::Lookup);
        let populate_p = policy_in(&s, "pop", "{cacheName: faq}", Mode::Populate);
        assert_eq!(lookup.type_name(), APIGEE_LOOKUP_TYPE);
        assert!(!lookup.hooks().after_exchange);
        let q = "What does HTTP status 418 mean?";
        let mut ex = exchange("a", chat(q));
        assert_eq!(run(&lookup, &mut ex).await, Outcome::Continue);
        assert_eq!(run(&populate_p, &mut ex).await, Outcome::Continue);
        answered(&mut ex, 200, "I'm a teapot.");
        populate(&populate_p, &ex).await;
        let mut again = exchange("a", chat(q));
        assert!(body_text(&run(&lookup, &mut again).await).contains("teapot"));
    }

    #[test]
    fn specs_are_checked_and_entries_round_trip() {
        let Some(dir) = model_dir() else { return };
        let s = services(&dir);
        for (yaml, field) in [
            ("{threshold: 0}", "threshold"),
            ("{threshold: 1.5}", "threshold"),
            ("{ttlSeconds: 0}", "ttlSeconds"),
            ("{maxTurns: 0}", "maxTurns"),
            ("{maxEntryBytes: 100, maxCacheBytes: 10}", "maxEntryBytes"),
            ("{statusHeader: 'bad name'}", "statusHeader"),
            ("{scope: tenant}", "scope"),
            ("{nope: 1}", ""),
            (
                "{embedder: {kind: static, modelDir: /nonexistent}}",
                "embedder",
            ),
        ] {
            let ctx = BuildContext {
                name: "x".into(),
                services: s.clone(),
                ..Default::default()
            };
            let e = build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap_err();
            assert!(e.field.starts_with(field), "{yaml}: {e}");
        }
        let e = Entry {
            question: "q ü".into(),
            answer: "a\n\"x\"".into(),
            model: "m".into(),
        };
        assert!(decode_entry(b"short").is_none());
        assert!(decode_entry(&encode_entry(1, &e)[..30]).is_none());
        let (k, back) = decode_entry(&encode_entry(42, &e)).expect("decodes");
        assert_eq!(
            (k, back.question, back.answer, back.model),
            (42, e.question, e.answer, e.model)
        );
    }
}
