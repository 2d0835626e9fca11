//! `ModelRouter`: sends each LLM request to the model (and backend) that fits it, by rules on
//! the requested model, the prompt (keywords, length in tokens, similarity to labelled
//! examples), headers and the verified app or product; and, in a second stage that Envoy runs
//! per upstream attempt, walks a fallback order when a model answers 429 or 5xx.
//!
//! ```yaml
//! spec:
//!   type: ModelRouter
//!   embedder: {kind: static}          # only for similarTo rules (the built-in model)
//!   routeHeader: x-tollgate-route     # the routing header (owned: a client's value never passes)
//!   responseHeader: x-tollgate-route  # optional: the deciding rule's name on the response
//!   keywordsIn: lastUser              # or prompt (every message, system included)
//!   onEmbedderError: noMatch          # or reject (503) when the embedder is unavailable
//!   rules:                            # first match wins; every condition of a rule must hold
//!   - name: code
//!     when:
//!       models: [gpt-4o, "gpt-4o-*"]  # the requested model: exact names or `*` globs
//!       keywords: [stack trace, traceback, "compile error"]   # any of them, ASCII case-insensitive
//!       keywordsIn: prompt            # this rule's text (default: the policy's keywordsIn)
//!       promptTokens: {min: 1, max: 4000}
//!       similarTo: {examples: ["fix this python error"], threshold: 0.7, specifics: false}
//!       headers: {x-tier: gold, x-debug: "*"}   # exact value, or "*" for present
//!       condition: "app.attributes.tier == 'gold'"   # CEL, as a step condition
//!     route: {model: gpt-4o, header: big-pool}   # rewrite the model; set the routing header
//!   - name: ab-test
//!     route:
//!       split: [{model: model-a, weight: 90}, {model: model-b, weight: 10}]
//!       stickyBy: "{app.name}"        # the same app always gets the same branch; else random
//!   - name: pool-rewrite
//!     when: {models: [llama-3-8b]}
//!     route: {model: llama-3-8b-lora, rewrite: header}   # the endpoint picker rewrites it
//!   default: {model: gpt-4o-mini}     # optional: when no rule matched
//! ```
//!
//! A second policy with `stage: attempt` runs in the ext_proc filter Envoy's router runs per
//! upstream attempt (`upstream_http_filters`), and rewrites the model by the attempt number
//! (`x-envoy-attempt-count`, which the route's virtual host adds with
//! `include_request_attempt_count: true`):
//!
//! ```yaml
//! spec:
//!   type: ModelRouter
//!   stage: attempt
//!   fallbacks:
//!   - {model: gpt-4o, then: [gpt-4o-mini, llama-3-70b]}   # attempt 2, attempt 3 and later
//! ```
//!
//! Actions: `model` rewrites `model` in the body (only that value's bytes change; every other
//! field is kept as sent; a model named in the path, Gemini's `models/M:` or Azure's
//! `deployments/M/`, is rewritten in `:path`), updates the exchange's LLM view so later
//! steps (token quotas, cost budgets, metrics) see the routed model, and keeps
//! `x-gateway-model-name` consistent when an earlier step set it. `rewrite: header` leaves
//! the body alone and sets the endpoint picker's `x-llm-d-model-name-rewrite` and
//! `x-gateway-model-name-rewrite` instead (a rewrite inside one InferencePool). `header`
//! sets the routing header: the stream answers with `clear_route_cache`, so Envoy matches its
//! routes again and a route on that header picks another cluster (the request body must be
//! BUFFERED or FULL_DUPLEX_STREAMED: in STREAMED the headers leave before the body is read).
//!
//! Cost: the step reads the request from the exchange's shared JSON parse; only a
//! `promptTokens` rule makes the flow run the LLM tracker (token count, response tracking).
//! Rules are checked cheapest first within each rule (model, headers, tokens, condition,
//! keywords), all keywords of a text scope in one Aho-Corasick pass, and the prompt is
//! embedded only when a similarity rule is reached with its other conditions met.
//!
//! Fail safe: an unavailable embedder makes similarity rules not match (logged once per
//! policy, counted in `tollgate_model_router_embedder_failures_total`) unless
//! `onEmbedderError: reject`; a request that is no LLM call passes untouched.
//!
//! Variables: `modelrouter.<policy>.rule`, `.model` (the model the upstream gets),
//! `.original_model`, `.similarity` (when a similarity rule decided). Metric:
//! `tollgate_model_router_decisions_total{policy,rule,model}`: rule names and models come
//! from the configuration (`default`, `none` when nothing matched, `fallback` in the attempt
//! stage; `unchanged` when the decision keeps the requested model), never from the request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::Deserialize;

use super::inference_objective::{MODEL_NAME, MODEL_REWRITE};
use super::{check_header_name, parse_spec, valid_header_value, BuildContext, SpecError};
use crate::embed::specifics::Specifics;
use crate::embed::{EmbedError, Embedder, EmbedderSpec, Embedding};
use crate::expr::{Condition, Template};
use crate::fault::Fault;
use crate::llm::{Api, LlmRequest};
use crate::pipeline::{Direction, Hook, Hooks, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "ModelRouter";
pub const DEFAULT_ROUTE_HEADER: &str = "x-tollgate-route";
pub const ATTEMPT_HEADER: &str = "x-envoy-attempt-count";
/// The fault code when `onEmbedderError: reject` and the embedder is unavailable.
pub const EMBEDDER_UNAVAILABLE: &str = "modelrouter.EmbedderUnavailable";

/// Rule names with a meaning of their own in variables and metrics.
const RESERVED: [&str; 3] = ["default", "none", "fallback"];
/// The model label of a decision that keeps the requested model.
const UNCHANGED: &str = "unchanged";
/// Longest model name accepted in the configuration (it becomes a header value).
const MAX_MODEL_LEN: usize = 256;
/// Default similarity threshold: topic routing is looser than a cache's "same question".
pub const DEFAULT_SIMILARITY: f32 = 0.7;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Stage {
    #[default]
    Request,
    Attempt,
}

/// Which text keyword rules read.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Scope {
    /// The last turn, when it is the user's (the question being asked now).
    #[default]
    LastUser,
    /// Every prompt text of the request, system prompt included.
    Prompt,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Rewrite {
    #[default]
    Body,
    Header,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum OnEmbedderError {
    #[default]
    NoMatch,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    stage: Stage,
    #[serde(default)]
    rules: Vec<RuleSpec>,
    #[serde(default)]
    default: Option<ActionSpec>,
    #[serde(default)]
    embedder: Option<EmbedderSpec>,
    #[serde(default)]
    route_header: Option<String>,
    #[serde(default)]
    response_header: Option<String>,
    #[serde(default)]
    keywords_in: Scope,
    #[serde(default)]
    on_embedder_error: OnEmbedderError,
    #[serde(default)]
    fallbacks: Vec<FallbackSpec>,
    #[serde(default)]
    attempt_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleSpec {
    name: String,
    #[serde(default)]
    when: WhenSpec,
    route: ActionSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WhenSpec {
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    keywords_in: Option<Scope>,
    #[serde(default)]
    prompt_tokens: Option<TokenRange>,
    #[serde(default)]
    similar_to: Option<SimilarSpec>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    condition: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRange {
    #[serde(default)]
    min: Option<u64>,
    #[serde(default)]
    max: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarSpec {
    examples: Vec<String>,
    #[serde(default)]
    threshold: Option<f32>,
    /// Also require [`crate::embed::specifics`] to agree (numbers, negation, names): off by
    /// default, since a topic ("code questions") is not one question.
    #[serde(default)]
    specifics: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ActionSpec {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    rewrite: Rewrite,
    #[serde(default)]
    split: Vec<BranchSpec>,
    #[serde(default)]
    sticky_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchSpec {
    weight: u32,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FallbackSpec {
    model: String,
    then: Vec<String>,
}

// ───────────────────────────── metrics ─────────────────────────────

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::IntCounterVec {
    let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)
        .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "model router metric not registered");
    }
    c
}

static DECISIONS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    counter_vec(
            "tollgate_model_router_decisions_total",
            "ModelRouter decisions by policy, deciding rule (default, none, fallback) and the model routed to (unchanged: the requested one)",
            &["policy", "rule", "model"],
        )
});

static EMBED_FAILURES: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(
    || {
        counter_vec(
            "tollgate_model_router_embedder_failures_total",
            "ModelRouter requests whose prompt could not be embedded (similarity rules did not match)",
            &["policy"],
        )
    },
);

// ───────────────────────────── compiled form ─────────────────────────────

/// A model pattern: an exact name, or `*` wildcards (each matching any run of characters).
#[derive(Debug, Clone)]
struct Glob {
    parts: Vec<String>,
    wild: bool,
}

impl Glob {
    fn compile(p: &str) -> Result<Self, String> {
        if p.is_empty() {
            return Err("an empty model pattern".into());
        }
        if let Some(c) = p
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '[' | ']'))
        {
            return Err(format!(
                "`{}`: {c:?} is not allowed in a model pattern (only `*` is a wildcard)",
                p.escape_debug()
            ));
        }
        if p.contains("**") {
            return Err(format!("`{p}`: write `*` once"));
        }
        Ok(Self {
            parts: p.split('*').map(str::to_owned).collect(),
            wild: p.contains('*'),
        })
    }

    /// Linear: literal parts matched leftmost in order, the first as a prefix and the last
    /// as a suffix (with `*` as the only wildcard, leftmost is never wrong).
    fn matches(&self, s: &str) -> bool {
        if !self.wild {
            return self.parts[0] == s;
        }
        let (first, rest) = self.parts.split_first().expect("split yields one part");
        let (last, middle) = rest.split_last().expect("a wildcard yields two parts");
        let Some(mut s) = s.strip_prefix(first.as_str()) else {
            return false;
        };
        for m in middle {
            match s.find(m.as_str()) {
                Some(i) => s = &s[i + m.len()..],
                None => return false,
            }
        }
        s.len() >= last.len() && s.ends_with(last.as_str())
    }
}

/// Where a decision sends the request.
#[derive(Debug)]
struct Target {
    model: Option<Arc<str>>,
    header: Option<String>,
    counter: prometheus::IntCounter,
}

#[derive(Debug)]
struct Action {
    /// (cumulative weight up to and including this branch, target)
    branches: Vec<(u64, Target)>,
    total: u64,
    sticky: Option<Template>,
    rewrite: Rewrite,
}

#[derive(Debug)]
struct Similar {
    examples: Vec<String>,
    vectors: tokio::sync::OnceCell<Vec<Embedding>>,
    threshold: f32,
    specifics: Option<Vec<Specifics>>,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    models: Vec<Glob>,
    has_keywords: bool,
    scope: Scope,
    tokens: Option<(u64, u64)>,
    similar: Option<Similar>,
    /// (name, exact value or `None` for present)
    headers: Vec<(String, Option<String>)>,
    condition: Option<Condition>,
    action: Action,
}

/// One multi-pattern automaton over every keyword of the rules reading one text.
///
/// Matching is ASCII case-insensitive. Rather than asking the automaton for that (which
/// leaves it without a fast prefilter: every byte walks the automaton), the text is folded
/// to ASCII lower case, as the patterns are, which lets the leftmost-first search use its
/// vectorised (Teddy) prefilter: the same matches, several times faster on prose.
#[derive(Debug)]
struct Keywords {
    /// Any keyword at all (leftmost-first, prefiltered): most prompts hold none.
    any: AhoCorasick,
    /// Every occurrence, overlapping ones too (one keyword may sit inside another).
    ac: AhoCorasick,
    /// Pattern index → rule index.
    owners: Vec<usize>,
    /// Distinct rules that own a keyword: the scan stops once each is marked.
    rules: usize,
}

impl Keywords {
    fn build(rules: &[(usize, &[String])]) -> Result<Option<Self>, String> {
        let mut patterns = Vec::new();
        let mut owners = Vec::new();
        for (i, words) in rules {
            for w in *words {
                patterns.push(w.to_ascii_lowercase());
                owners.push(*i);
            }
        }
        if patterns.is_empty() {
            return Ok(None);
        }
        let any = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostFirst)
            .build(&patterns)
            .map_err(|e| e.to_string())?;
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            .map_err(|e| e.to_string())?;
        let mut distinct = owners.clone();
        distinct.sort_unstable();
        distinct.dedup();
        Ok(Some(Self {
            any,
            ac,
            owners,
            rules: distinct.len(),
        }))
    }

    /// Marks in `hit` every rule one of whose keywords occurs in `text` (one pass).
    fn scan(&self, text: &str, hit: &mut [bool]) {
        let folded = text.as_bytes().to_ascii_lowercase();
        if !self.any.is_match(&folded) {
            return;
        }
        let mut marked = 0;
        for m in self.ac.find_overlapping_iter(&folded) {
            if let Some(&r) = self.owners.get(m.pattern().as_usize()) {
                if let Some(h) = hit.get_mut(r) {
                    if !*h {
                        *h = true;
                        marked += 1;
                        if marked == self.rules {
                            // Every keyword rule is decided: the rest of the text can only
                            // repeat what is known.
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct VarNames {
    rule: String,
    model: String,
    original: String,
    similarity: String,
}

#[derive(Debug)]
struct ModelRouter {
    name: String,
    stage: Stage,
    rules: Vec<Rule>,
    default: Option<Action>,
    embedder: Option<Arc<dyn Embedder>>,
    route_header: String,
    response_header: Option<String>,
    keywords_last: Option<Keywords>,
    keywords_prompt: Option<Keywords>,
    on_embedder_error: OnEmbedderError,
    fallbacks: Vec<(Glob, Vec<Target>)>,
    attempt_header: String,
    vars: VarNames,
    none: prometheus::IntCounter,
    embed_failures: prometheus::IntCounter,
    warned_embedder: AtomicBool,
    warned_rewrite: AtomicBool,
}

// ───────────────────────────── build ─────────────────────────────

fn check_model(field: &str, m: &str) -> Result<Arc<str>, SpecError> {
    if m.is_empty() || m.len() > MAX_MODEL_LEN || !m.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SpecError::new(
            field,
            format!(
                "`{}` is not a model name (1 to {MAX_MODEL_LEN} visible ASCII characters)",
                m.escape_debug()
            ),
        ));
    }
    Ok(m.into())
}

fn check_value(field: &str, v: &str) -> Result<String, SpecError> {
    if v.is_empty() || !valid_header_value(v) {
        return Err(SpecError::new(
            field,
            format!("`{}` is not a header value", v.escape_debug()),
        ));
    }
    Ok(v.to_owned())
}

fn check_name(field: &str, n: &str) -> Result<String, SpecError> {
    let lower = check_header_name(n).map_err(|e| SpecError::new(field, e))?;
    if lower.starts_with(':') || lower.starts_with("x-envoy-") || lower == "content-length" {
        return Err(SpecError::new(
            field,
            format!("`{n}` cannot be a routing header"),
        ));
    }
    Ok(lower)
}

fn target(
    policy: &str,
    rule: &str,
    field: &str,
    model: Option<&str>,
    header: Option<&str>,
) -> Result<Target, SpecError> {
    let model = model
        .map(|m| check_model(&format!("{field}.model"), m))
        .transpose()?;
    let header = header
        .map(|h| check_value(&format!("{field}.header"), h))
        .transpose()?;
    if model.is_none() && header.is_none() {
        return Err(SpecError::new(field, "names neither a model nor a header"));
    }
    let label = model.as_deref().unwrap_or(UNCHANGED);
    Ok(Target {
        counter: DECISIONS.with_label_values(&[policy, rule, label]),
        model,
        header,
    })
}

fn action(policy: &str, rule: &str, field: &str, spec: ActionSpec) -> Result<Action, SpecError> {
    let sticky = spec
        .sticky_by
        .as_deref()
        .map(|t| {
            Template::compile(t)
                .map_err(|e| SpecError::new(format!("{field}.stickyBy"), e.to_string()))
        })
        .transpose()?;
    let mut branches = Vec::new();
    let mut total = 0u64;
    if spec.split.is_empty() {
        if sticky.is_some() {
            return Err(SpecError::new(
                format!("{field}.stickyBy"),
                "only a split has branches to stick to",
            ));
        }
        branches.push((
            1,
            target(
                policy,
                rule,
                field,
                spec.model.as_deref(),
                spec.header.as_deref(),
            )?,
        ));
        total = 1;
    } else {
        if spec.model.is_some() || spec.header.is_some() {
            return Err(SpecError::new(
                field,
                "give either model/header or split, not both",
            ));
        }
        for (i, b) in spec.split.iter().enumerate() {
            let f = format!("{field}.split[{i}]");
            total += u64::from(b.weight);
            let t = target(policy, rule, &f, b.model.as_deref(), b.header.as_deref())?;
            if b.weight > 0 {
                branches.push((total, t));
            }
        }
        if total == 0 {
            return Err(SpecError::new(
                format!("{field}.split"),
                "the weights add up to 0: no branch can be chosen",
            ));
        }
    }
    Ok(Action {
        branches,
        total,
        sticky,
        rewrite: spec.rewrite,
    })
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let policy = ctx.name.as_str();
    let route_header = check_name(
        "routeHeader",
        spec.route_header.as_deref().unwrap_or(DEFAULT_ROUTE_HEADER),
    )?;
    let response_header = spec
        .response_header
        .as_deref()
        .map(|h| check_name("responseHeader", h))
        .transpose()?;
    // Read, never set: any well-formed name will do.
    let attempt_header = spec
        .attempt_header
        .as_deref()
        .unwrap_or(ATTEMPT_HEADER)
        .to_ascii_lowercase();
    if attempt_header.is_empty()
        || !attempt_header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(SpecError::new(
            "attemptHeader",
            format!("`{attempt_header}` is not a header name"),
        ));
    }

    match spec.stage {
        Stage::Request => {
            if spec.rules.is_empty() && spec.default.is_none() {
                return Err(SpecError::new(
                    "rules",
                    "no rules and no default: the router would never route",
                ));
            }
            if !spec.fallbacks.is_empty() {
                return Err(SpecError::new(
                    "fallbacks",
                    "fallbacks belong to a `stage: attempt` policy (run per upstream attempt)",
                ));
            }
        }
        Stage::Attempt => {
            if !spec.rules.is_empty() || spec.default.is_some() {
                return Err(SpecError::new(
                    "rules",
                    "a `stage: attempt` policy only walks its fallbacks",
                ));
            }
            if spec.fallbacks.is_empty() {
                return Err(SpecError::new("fallbacks", "no fallbacks to walk"));
            }
        }
    }

    let embedder = match &spec.embedder {
        Some(e) => Some(
            ctx.services
                .embedders
                .get(e, ctx.config_dir.as_deref(), &ctx.services.http)
                .map_err(|e| SpecError::new("embedder", e.to_string()))?,
        ),
        None => None,
    };

    let mut rules = Vec::with_capacity(spec.rules.len());
    let mut keyword_rules: [Vec<(usize, Vec<String>)>; 2] = [Vec::new(), Vec::new()];
    for (i, r) in spec.rules.into_iter().enumerate() {
        let field = format!("rules[{i}]");
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 64
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!(
                    "`{}` is not a rule name (1 to 64 letters, digits, `-`, `_`, `.`)",
                    r.name.escape_debug()
                ),
            ));
        }
        if RESERVED.contains(&r.name.as_str()) {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("`{}` is reserved (it names decisions no rule made)", r.name),
            ));
        }
        if rules.iter().any(|x: &Rule| *x.name == *r.name) {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("rule `{}` is defined twice", r.name),
            ));
        }
        let w = r.when;
        let models = w
            .models
            .iter()
            .enumerate()
            .map(|(j, m)| {
                Glob::compile(m).map_err(|e| SpecError::new(format!("{field}.when.models[{j}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(j) = w.keywords.iter().position(|k| k.trim().is_empty()) {
            return Err(SpecError::new(
                format!("{field}.when.keywords[{j}]"),
                "an empty keyword would match every prompt",
            ));
        }
        let scope = w.keywords_in.unwrap_or(spec.keywords_in);
        let has_keywords = !w.keywords.is_empty();
        if has_keywords {
            keyword_rules[scope as usize].push((i, w.keywords));
        }
        let tokens = match w.prompt_tokens {
            None => None,
            Some(TokenRange { min, max }) => {
                let (lo, hi) = (min.unwrap_or(0), max.unwrap_or(u64::MAX));
                if lo > hi {
                    return Err(SpecError::new(
                        format!("{field}.when.promptTokens"),
                        "min is above max",
                    ));
                }
                Some((lo, hi))
            }
        };
        let similar = match w.similar_to {
            None => None,
            Some(s) => {
                let f = format!("{field}.when.similarTo");
                let Some(embedder) = &embedder else {
                    return Err(SpecError::new(
                        f,
                        "similarity needs the policy's `embedder` (e.g. {kind: static})",
                    ));
                };
                if s.examples.is_empty() || s.examples.iter().any(|e| e.trim().is_empty()) {
                    return Err(SpecError::new(
                        format!("{f}.examples"),
                        "needs at least one example, none empty",
                    ));
                }
                let threshold = s.threshold.unwrap_or(DEFAULT_SIMILARITY);
                if !(threshold > 0.0 && threshold <= 1.0) {
                    return Err(SpecError::new(
                        format!("{f}.threshold"),
                        "must be above 0 and at most 1",
                    ));
                }
                let vectors = tokio::sync::OnceCell::new();
                // The built-in model embeds short texts at once: do it now, so a bad example
                // is refused at load and no request pays for it. A remote embedder's first
                // use embeds them instead (and retries after a failure).
                let now = futures_util::FutureExt::now_or_never(embed_all(
                    embedder.as_ref(),
                    &s.examples,
                ));
                match now {
                    Some(Ok(v)) => {
                        let _ = vectors.set(v);
                    }
                    Some(Err(e)) if !e.is_unavailable() => {
                        return Err(SpecError::new(format!("{f}.examples"), e.to_string()));
                    }
                    _ => {}
                }
                Some(Similar {
                    specifics: s
                        .specifics
                        .then(|| s.examples.iter().map(|e| Specifics::of(e)).collect()),
                    examples: s.examples,
                    vectors,
                    threshold,
                })
            }
        };
        let headers = w
            .headers
            .into_iter()
            .map(|(n, v)| {
                let f = format!("{field}.when.headers.{n}");
                let n = check_header_name(&n).map_err(|e| SpecError::new(&f, e))?;
                let v = if v == "*" {
                    None
                } else {
                    Some(check_value(&f, &v)?)
                };
                Ok((n, v))
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        let condition = w
            .condition
            .as_deref()
            .map(|c| {
                Condition::compile(c)
                    .map_err(|e| SpecError::new(format!("{field}.when.condition"), e.to_string()))
            })
            .transpose()?;
        let action = action(policy, &r.name, &format!("{field}.route"), r.route)?;
        rules.push(Rule {
            name: r.name.into(),
            models,
            has_keywords,
            scope,
            tokens,
            similar,
            headers,
            condition,
            action,
        });
    }
    let keywords = |scope: Scope| {
        let list: Vec<(usize, &[String])> = keyword_rules[scope as usize]
            .iter()
            .map(|(i, w)| (*i, w.as_slice()))
            .collect();
        Keywords::build(&list).map_err(|e| SpecError::new("rules", e))
    };
    let keywords_last = keywords(Scope::LastUser)?;
    let keywords_prompt = keywords(Scope::Prompt)?;
    let default = spec
        .default
        .map(|a| action(policy, "default", "default", a))
        .transpose()?;
    let fallbacks = spec
        .fallbacks
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let field = format!("fallbacks[{i}]");
            let glob =
                Glob::compile(&f.model).map_err(|e| SpecError::new(format!("{field}.model"), e))?;
            if f.then.is_empty() {
                return Err(SpecError::new(
                    format!("{field}.then"),
                    "no model to fall back to",
                ));
            }
            let then = f
                .then
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    target(
                        policy,
                        "fallback",
                        &format!("{field}.then[{j}]"),
                        Some(m),
                        None,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((glob, then))
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    let prefix = format!("modelrouter.{policy}");
    Ok(Arc::new(ModelRouter {
        name: policy.to_owned(),
        stage: spec.stage,
        rules,
        default,
        embedder,
        route_header,
        response_header,
        keywords_last,
        keywords_prompt,
        on_embedder_error: spec.on_embedder_error,
        fallbacks,
        attempt_header,
        vars: VarNames {
            rule: format!("{prefix}.rule"),
            model: format!("{prefix}.model"),
            original: format!("{prefix}.original_model"),
            similarity: format!("{prefix}.similarity"),
        },
        none: DECISIONS.with_label_values(&[policy, "none", UNCHANGED]),
        embed_failures: EMBED_FAILURES.with_label_values(&[policy]),
        warned_embedder: AtomicBool::new(false),
        warned_rewrite: AtomicBool::new(false),
    }))
}

async fn embed_all(e: &dyn Embedder, texts: &[String]) -> Result<Vec<Embedding>, EmbedError> {
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        out.push(e.embed(t).await?);
    }
    Ok(out)
}

// ───────────────────────────── body and path rewrites ─────────────────────────────

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `b[i]` is `"`: the index after the closing quote. Prompts are long strings: the scan
/// jumps from one quote or backslash to the next.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        match b[i] {
            b'"' => return Some(i + 1),
            _ => i += 2,
        }
    }
}

/// The index after the JSON value starting at `b[i]`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// `body` (a JSON object the tracker already parsed) with every top-level `key` set to the
/// string `value`, the rest byte for byte as sent; `None` when it has no such key. Keys are
/// compared decoded, so an escaped spelling (`"\u006dodel"`) is found as the parser finds it.
pub(crate) fn set_top_level_string(body: &[u8], key: &str, value: &str) -> Option<Vec<u8>> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut spans = Vec::new();
    loop {
        i = skip_ws(body, i);
        match body.get(i)? {
            b'}' => break,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(body, i)?;
        let raw = &body[i + 1..key_end - 1];
        let is_key = if raw.contains(&b'\\') {
            serde_json::from_slice::<String>(&body[i..key_end])
                .ok()
                .as_deref()
                == Some(key)
        } else {
            raw == key.as_bytes()
        };
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        let end = skip_value(body, i)?;
        if is_key {
            spans.push((i, end));
        }
        i = end;
    }
    if spans.is_empty() {
        return None;
    }
    let encoded = serde_json::to_string(value).ok()?;
    let mut out = Vec::with_capacity(body.len() + encoded.len());
    let mut at = 0;
    for (s, e) in spans {
        out.extend_from_slice(&body[at..s]);
        out.extend_from_slice(encoded.as_bytes());
        at = e;
    }
    out.extend_from_slice(&body[at..]);
    Some(out)
}

/// The request path with the model segment (`models/M:` for Gemini and Vertex AI,
/// `deployments/M/` for Azure) naming `new` instead of `old`.
fn rewrite_path_model(path: &str, old: &str, new: &str) -> Option<String> {
    for (before, after) in [("models/", ":"), ("deployments/", "/")] {
        let needle = format!("{before}{old}{after}");
        if let Some(i) = path.find(&needle) {
            let mut out = String::with_capacity(path.len() + new.len());
            out.push_str(&path[..i]);
            out.push_str(before);
            out.push_str(new);
            out.push_str(after);
            out.push_str(&path[i + needle.len()..]);
            return Some(out);
        }
    }
    None
}

/// A stable 64-bit hash (FNV-1a): the same sticky key picks the same branch on every replica
/// and after every restart.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

// ───────────────────────────── run time ─────────────────────────────

/// What a decision needs of the request once the rules are checked.
struct Asked {
    api: Api,
    model: Option<String>,
}

impl Asked {
    fn of(r: &LlmRequest) -> Self {
        Self {
            api: r.api,
            model: r.model.clone(),
        }
    }
}

/// What one request's rule checks computed so far (each at most once).
#[derive(Default)]
struct Scan {
    /// The last user turn: `None` until read, `Some(None)` when there is none.
    last_user: Option<Option<String>>,
    /// Rules whose keywords matched, per scope, once scanned.
    hits: [Option<Vec<bool>>; 2],
    /// The prompt's embedding: `None` until tried, `Some(None)` when it failed.
    embedding: Option<Option<Embedding>>,
    prompt_specifics: Option<Specifics>,
}

impl ModelRouter {
    fn last_user<'s>(scan: &'s mut Scan, ex: &Exchange, llm: &LlmRequest) -> Option<&'s str> {
        scan.last_user
            .get_or_insert_with(|| {
                let body = ex.body_json(Direction::Request)?;
                let v = body.value.as_ref().ok()?;
                crate::llm::conversation(llm.api, v)
                    .ok()?
                    .last_user()
                    .map(str::to_owned)
            })
            .as_deref()
    }

    fn keyword_hit(
        &self,
        i: usize,
        rule: &Rule,
        scan: &mut Scan,
        ex: &Exchange,
        llm: &LlmRequest,
    ) -> bool {
        let k = rule.scope as usize;
        if scan.hits[k].is_none() {
            let mut hit = vec![false; self.rules.len()];
            let automaton = match rule.scope {
                Scope::LastUser => self.keywords_last.as_ref(),
                Scope::Prompt => self.keywords_prompt.as_ref(),
            };
            if let Some(a) = automaton {
                match rule.scope {
                    Scope::Prompt => a.scan(&llm.prompt, &mut hit),
                    Scope::LastUser => {
                        if let Some(t) = Self::last_user(scan, ex, llm) {
                            a.scan(t, &mut hit);
                        }
                    }
                }
            }
            scan.hits[k] = Some(hit);
        }
        scan.hits[k]
            .as_ref()
            .and_then(|h| h.get(i).copied())
            .unwrap_or(false)
    }

    /// Every condition of `rule` but similarity.
    fn plain_match(
        &self,
        i: usize,
        rule: &Rule,
        scan: &mut Scan,
        ex: &Exchange,
        llm: &LlmRequest,
    ) -> bool {
        if !rule.models.is_empty() {
            let Some(m) = llm.model.as_deref() else {
                return false;
            };
            if !rule.models.iter().any(|g| g.matches(m)) {
                return false;
            }
        }
        for (name, want) in &rule.headers {
            match (ex.request.headers.get(name), want) {
                (None, _) => return false,
                (Some(v), Some(w)) if v != w => return false,
                _ => {}
            }
        }
        if let Some((lo, hi)) = rule.tokens {
            match ex.state.llm_prompt_tokens {
                Some(t) if t >= lo && t <= hi => {}
                _ => return false,
            }
        }
        if let Some(c) = &rule.condition {
            if !c.eval(ex) {
                return false;
            }
        }
        if rule.has_keywords && !self.keyword_hit(i, rule, scan, ex, llm) {
            return false;
        }
        true
    }

    /// The request stage: decide, then apply.
    fn route<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
        // The tracker's view when a step needs one; else the shared JSON parse, read here
        // (no token count, no response tracking: routing on the model and the text needs
        // neither).
        let own = match ex.state.llm {
            Some(_) => None,
            None => match Self::parse(ex) {
                Some(r) => Some(r),
                None => return Hook::CONTINUE,
            },
        };
        let Some(llm) = ex.state.llm.as_deref().or(own.as_deref()) else {
            return Hook::CONTINUE;
        };
        let mut scan = Scan::default();
        for (i, rule) in self.rules.iter().enumerate() {
            if !self.plain_match(i, rule, &mut scan, ex, llm) {
                continue;
            }
            if rule.similar.is_some() {
                // The embedding is the first thing that may wait.
                let Some(owned) = ex.state.llm.clone().or(own) else {
                    return Hook::CONTINUE;
                };
                return Hook::Pending(Box::pin(self.route_from(ex, owned, scan, i)));
            }
            let asked = Asked::of(llm);
            return Hook::Ready(self.apply(ex, &asked, Some(rule), None));
        }
        let asked = Asked::of(llm);
        Hook::Ready(self.apply(ex, &asked, None, None))
    }

    /// [`Self::route`] from rule `start` on, which needs the prompt's embedding.
    async fn route_from(
        &self,
        ex: &mut Exchange,
        llm: Arc<LlmRequest>,
        mut scan: Scan,
        start: usize,
    ) -> Outcome {
        for (i, rule) in self.rules.iter().enumerate().skip(start) {
            if i > start && !self.plain_match(i, rule, &mut scan, ex, &llm) {
                continue;
            }
            let Some(similar) = &rule.similar else {
                let asked = Asked::of(&llm);
                drop(llm);
                return self.apply(ex, &asked, Some(rule), None);
            };
            match self.similarity(similar, &mut scan, ex, &llm).await {
                Err(fault) => return Outcome::Reject(fault),
                Ok(Some(s)) if s >= similar.threshold => {
                    let asked = Asked::of(&llm);
                    drop(llm);
                    return self.apply(ex, &asked, Some(rule), Some(s));
                }
                Ok(_) => {}
            }
        }
        let asked = Asked::of(&llm);
        drop(llm);
        self.apply(ex, &asked, None, None)
    }

    /// The best similarity between the last user turn and `similar`'s examples; `None`
    /// when it cannot be known (no user turn, embedder unavailable).
    async fn similarity(
        &self,
        similar: &Similar,
        scan: &mut Scan,
        ex: &mut Exchange,
        llm: &LlmRequest,
    ) -> Result<Option<f32>, Fault> {
        let Some(embedder) = &self.embedder else {
            return Ok(None);
        };
        if scan.embedding.is_none() {
            let text = Self::last_user(scan, ex, llm).map(str::to_owned);
            let result = match text.as_deref() {
                None => Ok(None),
                Some(t) => crate::embed::embed_shared(&mut ex.state.prompt_embedding, embedder, t)
                    .await
                    .map(Some),
            };
            scan.embedding = Some(match result {
                Ok(e) => e,
                Err(e) => {
                    self.embed_failed(&e)?;
                    None
                }
            });
        }
        let Some(Some(prompt)) = scan.embedding.clone() else {
            return Ok(None);
        };
        let examples = match similar
            .vectors
            .get_or_try_init(|| embed_all(embedder.as_ref(), &similar.examples))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.embed_failed(&e)?;
                return Ok(None);
            }
        };
        if similar.specifics.is_some() && scan.prompt_specifics.is_none() {
            let t = Self::last_user(scan, ex, llm)
                .unwrap_or_default()
                .to_owned();
            scan.prompt_specifics = Some(Specifics::of(&t));
        }
        let best = examples
            .iter()
            .enumerate()
            .filter(
                |(k, _)| match (&similar.specifics, &scan.prompt_specifics) {
                    (Some(ex_specs), Some(p)) => {
                        ex_specs.get(*k).is_some_and(|s| s.mismatch(p).is_none())
                    }
                    _ => true,
                },
            )
            .map(|(_, v)| v.cosine(&prompt))
            .fold(None, |m: Option<f32>, c| Some(m.map_or(c, |m| m.max(c))));
        Ok(best)
    }

    /// An embedding that failed: counted and logged; a fault when configured to reject on an
    /// unavailable embedder. Never the prompt in the log.
    fn embed_failed(&self, e: &EmbedError) -> Result<(), Fault> {
        if !e.is_unavailable() {
            // Too long, nothing to embed: the rule just does not apply.
            tracing::debug!(policy = %self.name, error = %e, "prompt not embedded; similarity rules do not match");
            return Ok(());
        }
        self.embed_failures.inc();
        if !self.warned_embedder.swap(true, Ordering::Relaxed) {
            tracing::warn!(policy = %self.name, error = %e, "embedder unavailable; similarity rules do not match (logged once)");
        }
        match self.on_embedder_error {
            OnEmbedderError::NoMatch => Ok(()),
            OnEmbedderError::Reject => Err(Fault::new(
                503,
                EMBEDDER_UNAVAILABLE,
                "The model router could not classify the prompt.",
            )),
        }
    }

    fn pick<'t>(&self, action: &'t Action, rule: &str, ex: &Exchange) -> Option<&'t Target> {
        if action.branches.len() == 1 {
            return action.branches.first().map(|(_, t)| t);
        }
        let key = action
            .sticky
            .as_ref()
            .map(|t| t.render(ex))
            .filter(|k| !k.is_empty());
        let roll = match key {
            Some(k) => stable_hash(&[rule.as_bytes(), k.as_bytes()]),
            None => getrandom::u64().unwrap_or_else(|_| stable_hash(&[ex.request.uri.as_bytes()])),
        } % action.total;
        action
            .branches
            .iter()
            .find(|(upto, _)| roll < *upto)
            .map(|(_, t)| t)
    }

    /// Applies the decision (`rule`, else the default, else none).
    fn apply(
        &self,
        ex: &mut Exchange,
        llm: &Asked,
        rule: Option<&Rule>,
        similarity: Option<f32>,
    ) -> Outcome {
        let (name, action) = match rule {
            Some(r) => (&*r.name, Some(&r.action)),
            None => ("default", self.default.as_ref()),
        };
        let original = llm.model.clone().unwrap_or_default();
        let Some(action) = action else {
            self.none.inc();
            ex.set_var(self.vars.model.clone(), original.clone());
            ex.set_var(self.vars.original.clone(), original);
            return Outcome::Continue;
        };
        let Some(target) = self.pick(action, name, ex) else {
            return Outcome::Continue;
        };
        target.counter.inc();
        let mut routed = original.clone();
        if let Some(model) = target.model.as_deref() {
            if self.set_model(ex, llm, model, action.rewrite) {
                routed = model.to_owned();
            }
        }
        if let Some(h) = &target.header {
            ex.set_header(Direction::Request, &self.route_header, h.clone());
        }
        if let Some(h) = &self.response_header {
            ex.set_header(Direction::Response, h, name.to_owned());
        }
        ex.set_var(self.vars.rule.clone(), name);
        ex.set_var(self.vars.model.clone(), routed);
        ex.set_var(self.vars.original.clone(), original);
        if let Some(s) = similarity {
            ex.set_var(
                self.vars.similarity.clone(),
                crate::vars::Value::Float(f64::from(s)),
            );
        }
        Outcome::Continue
    }

    /// Sends the request to `model`: in the body (or path), or through the endpoint picker's
    /// rewrite headers; the exchange's LLM view follows. False when the request names its
    /// model nowhere tollgate can rewrite.
    fn set_model(&self, ex: &mut Exchange, llm: &Asked, model: &str, how: Rewrite) -> bool {
        let old = llm.model.as_deref().unwrap_or_default();
        if old == model {
            return true;
        }
        match how {
            Rewrite::Header => {
                for h in MODEL_REWRITE {
                    ex.set_header(Direction::Request, h, model.to_owned());
                }
            }
            Rewrite::Body => {
                let path_model = matches!(llm.api, Api::Gemini | Api::VertexAi);
                let body = (!path_model)
                    .then(|| {
                        ex.request_body
                            .as_deref()
                            .and_then(|b| set_top_level_string(b, "model", model))
                    })
                    .flatten();
                if let Some(b) = body {
                    ex.replace_body(Direction::Request, b);
                } else if let Some(p) = rewrite_path_model(&ex.request.uri, old, model) {
                    ex.set_header(Direction::Request, ":path", p.clone());
                    ex.request.uri = p;
                } else {
                    if !self.warned_rewrite.swap(true, Ordering::Relaxed) {
                        tracing::warn!(policy = %self.name, "the request names its model nowhere it can be rewritten; model not changed (logged once)");
                    }
                    return false;
                }
                if ex.request.headers.get(MODEL_NAME).is_some() {
                    ex.set_header(Direction::Request, MODEL_NAME, model.to_owned());
                }
            }
        }
        // The tracker's view, when one ran, follows (no copy: nothing else holds it now).
        if let Some(view) = ex.state.llm.as_mut() {
            Arc::make_mut(view).model = Some(model.to_owned());
        }
        if let Some(t) = ex.state.llm_tracker.as_mut() {
            t.set_model(model);
        }
        true
    }

    /// The request as the LLM tracker would read it, for the attempt stage, which runs
    /// without one: a tracker there would report every attempt's prompt again.
    fn parse(ex: &Exchange) -> Option<Arc<LlmRequest>> {
        let endpoint = {
            let h = &ex.request.headers;
            crate::llm::detect(&ex.request.method, &ex.request.uri, |n| h.get(n))?
        };
        let body = ex.body_json(Direction::Request)?;
        let v = body.value.as_ref().ok()?;
        let mut r = crate::llm::request::parse_request_json(&endpoint, v).ok()?;
        if body.duplicate_keys.iter().any(|k| k == "model") {
            // Servers differ on which copy counts: no model rule matches such a request
            // (a rewrite still replaces every copy).
            r.model = None;
        }
        Some(Arc::new(r))
    }

    /// The attempt stage: attempt N (2 and later) gets the (N-1)th fallback of the model the
    /// body names, the last one for every later attempt.
    fn attempt(&self, ex: &mut Exchange) -> Hook<'static> {
        let n: u32 = match ex
            .request
            .headers
            .get(&self.attempt_header)
            .and_then(|v| v.trim().parse().ok())
        {
            Some(n) if n >= 2 => n,
            _ => return Hook::CONTINUE,
        };
        let Some(llm) = ex.state.llm.clone().or_else(|| Self::parse(ex)) else {
            return Hook::CONTINUE;
        };
        let Some(model) = llm.model.as_deref() else {
            return Hook::CONTINUE;
        };
        let Some((_, then)) = self.fallbacks.iter().find(|(g, _)| g.matches(model)) else {
            return Hook::CONTINUE;
        };
        let k = usize::try_from(n - 2)
            .unwrap_or(usize::MAX)
            .min(then.len() - 1);
        let Some(target) = then.get(k) else {
            return Hook::CONTINUE;
        };
        let Some(to) = target.model.as_deref() else {
            return Hook::CONTINUE;
        };
        let original = model.to_owned();
        target.counter.inc();
        let asked = Asked::of(&llm);
        drop(llm);
        let routed = if self.set_model(ex, &asked, to, Rewrite::Body) {
            to.to_owned()
        } else {
            original.clone()
        };
        tracing::debug!(policy = %self.name, attempt = n, model = %routed, "fallback model for this attempt");
        ex.set_var(self.vars.rule.clone(), "fallback");
        ex.set_var(self.vars.model.clone(), routed);
        ex.set_var(self.vars.original.clone(), original);
        Hook::CONTINUE
    }
}

impl Policy for ModelRouter {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request
    }

    fn replaces_body(&self, dir: Direction) -> bool {
        if dir != Direction::Request {
            return false;
        }
        let body = |a: &Action| {
            a.rewrite == Rewrite::Body && a.branches.iter().any(|(_, t)| t.model.is_some())
        };
        self.stage == Stage::Attempt
            || self.rules.iter().any(|r| body(&r.action))
            || self.default.as_ref().is_some_and(body)
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            // The LLM tracker only when a rule reads the prompt's token count: otherwise
            // the step reads the model and text from the shared JSON parse itself, and the
            // flow pays for no token count or response tracking it did not ask for. The
            // attempt stage never (a tracker per attempt would report the prompt again).
            llm: self.stage == Stage::Request && self.rules.iter().any(|r| r.tokens.is_some()),
            ..Hooks::default()
        }
    }

    fn owned_request_headers(&self) -> Vec<String> {
        if self.stage == Stage::Attempt {
            return Vec::new();
        }
        let mut owned = vec![self.route_header.clone()];
        owned.extend(MODEL_REWRITE.iter().map(|h| (*h).to_owned()));
        owned
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        if dir != Direction::Request {
            return Hook::CONTINUE;
        }
        match self.stage {
            Stage::Request => self.route(ex),
            Stage::Attempt => self.attempt(ex),
        }
    }
}

#[cfg(test)]
#[path = "model_router_tests.rs"]
mod tests;
