//! The `external` option of `SanitizePrompt` and `SanitizeResponse`: Model Armor and generic
//! HTTP guards (`crate::guard::external`), called after the local detectors.
//!
//! ```yaml
//! spec:
//!   type: SanitizePrompt
//!   detectors: {prompt_injection: {action: block}}        # local: runs first, costs nothing
//!   external:
//!     modelArmor:
//!       templateName: projects/my-proj/locations/us-central1/templates/strict
//!       # endpoint: https://modelarmor.us-central1.rep.googleapis.com   (from the location)
//!       # credentials: {metadataHost: …} | {serviceAccountKeyFile: sa.json} | {none: true}
//!       #              (default: the metadata server, scope cloud-platform)
//!       timeoutMs: 1500        # keep below Envoy's ext_proc message_timeout
//!       failOpen: false          # an error or timeout refuses (503); true passes, said in variables
//!       onMatch: block           # or log
//!       redact: false            # true: an SDP-only match is redacted with Model Armor's
//!                                # de-identified text instead of blocked
//!     http:
//!       url: https://guard.internal/check
//!       headers: {x-api-key: "…"}
//!       timeoutMs: 1000
//!       failOpen: false
//!       onMatch: block
//!     # SanitizeResponse only: what a streamed answer gets (the guards need the whole text
//!     # before the client sees it): block (default, the stream ends at once with the API's
//!     # refusal), end (the stream is held whole and checked; a match answers the refusal
//!     # in its place) or local (the local
//!     # detectors guard it alone; the skip is said)
//!     streams: block
//! ```
//!
//! A prompt blocked locally never reaches an external guard (no paid call); steps placed
//! before the guard policy (auth, quotas) refuse before it runs at all. The guards run in the
//! order `modelArmor`, `http`; a block or a closed failure stops there.
//!
//! Variables, besides the policy's own (`matched`, `action`, `categories` now include the
//! external verdicts): `<prefix>.<policy>.<guard>.{outcome,action,categories,skipped}` with
//! `<guard>` `modelArmor` or `http`, outcome `ok | match | error | timeout | refused |
//! skipped`; and Model Armor's result under Apigee's names
//! (`SanitizeUserPrompt.<policy>.piAndJailbreakFilterResult.matchState`, …).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{parse_spec, read_config_file, BuildContext, SpecError};
use crate::fault::Fault;
use crate::google::{Kind as TokenKind, ServiceAccountKey, Source};
use crate::guard::external::{
    Ask, Client, End, ExternalGuard, ExternalGuards, HttpGuard, Kind, ModelArmor, OnMatch,
    StreamPolicy, REQUESTS,
};
use crate::guard::{self, Action, JsonString};
use crate::llm::{Api, ResponseFormat};
use crate::pipeline::{Chunk, ChunkAction};
use crate::vars::Exchange;

/// Below the 2 s `message_timeout` of deploy/envoy: Envoy would otherwise end the
/// exchange with its own 500 before the guard's verdict, or its closed failure, arrives.
const DEFAULT_TIMEOUT_MS: u64 = 1500;
const MAX_TIMEOUT_MS: u64 = 60_000;
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    model_armor: Option<ModelArmorSpec>,
    #[serde(default)]
    http: Option<HttpSpec>,
    #[serde(default)]
    streams: Option<StreamPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ModelArmorSpec {
    template_name: String,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    credentials: Option<CredentialsSpec>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    on_match: OnMatch,
    #[serde(default)]
    redact: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CredentialsSpec {
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    service_account_key_file: Option<String>,
    #[serde(default)]
    metadata_host: Option<String>,
    /// No `authorization` header (an emulator, or a proxy that adds it).
    #[serde(default)]
    none: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpSpec {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    on_match: OnMatch,
}

fn timeout(field: &str, ms: Option<u64>) -> Result<Duration, SpecError> {
    let ms = ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        return Err(SpecError::new(
            field,
            format!("between 1 and {MAX_TIMEOUT_MS} milliseconds"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// `projects/{p}/locations/{l}/templates/{t}` → the location.
fn template_location(t: &str) -> Option<&str> {
    let seg: Vec<&str> = t.split('/').collect();
    let ok = seg.len() == 6
        && seg[0] == "projects"
        && seg[2] == "locations"
        && seg[4] == "templates"
        && [seg[1], seg[3], seg[5]].iter().all(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    ok.then_some(seg[3])
}

/// An endpoint base (`https://host[:port]`, no path but `/`) checked against the egress
/// rules, without its trailing slash.
fn endpoint(field: &str, url: &str, ctx: &BuildContext) -> Result<String, SpecError> {
    super::service_callout::check_url(url, &ctx.services.egress)
        .map_err(|m| SpecError::new(field, m))?;
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| SpecError::new(field, format!("not a URL: {e}")))?;
    if uri.path() != "/" || uri.query().is_some() {
        return Err(SpecError::new(field, "a base URL: scheme and host only"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn model_armor(ctx: &BuildContext, s: ModelArmorSpec) -> Result<ExternalGuard, SpecError> {
    let at = "external.modelArmor";
    let location = template_location(&s.template_name).ok_or_else(|| {
        SpecError::new(
            format!("{at}.templateName"),
            "projects/{project}/locations/{location}/templates/{template}",
        )
    })?;
    let default_endpoint = format!("https://modelarmor.{location}.rep.googleapis.com");
    let endpoint = endpoint(
        &format!("{at}.endpoint"),
        s.endpoint.as_deref().unwrap_or(&default_endpoint),
        ctx,
    )?;
    let token = match s.credentials {
        Some(c) if c.none => {
            if c.scopes.is_some()
                || c.service_account_key_file.is_some()
                || c.metadata_host.is_some()
            {
                return Err(SpecError::new(
                    format!("{at}.credentials"),
                    "none: true takes no other field",
                ));
            }
            None
        }
        c => {
            let c = c.unwrap_or(CredentialsSpec {
                scopes: None,
                service_account_key_file: None,
                metadata_host: None,
                none: false,
            });
            let scopes = c.scopes.unwrap_or_else(|| vec![CLOUD_PLATFORM.into()]);
            if scopes.is_empty() || scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
                return Err(SpecError::new(
                    format!("{at}.credentials.scopes"),
                    "one or more scopes (URLs, no spaces)",
                ));
            }
            let source = match (c.service_account_key_file, c.metadata_host) {
                (Some(_), Some(_)) => {
                    return Err(SpecError::new(
                        format!("{at}.credentials"),
                        "give serviceAccountKeyFile or metadataHost, not both",
                    ))
                }
                (Some(f), None) => {
                    let field = format!("{at}.credentials.serviceAccountKeyFile");
                    let text = read_config_file(ctx, &field, &f)?;
                    let key = ServiceAccountKey::parse(&text)
                        .map_err(|e| SpecError::new(&field, e.to_string()))?;
                    Source::ServiceAccount(Arc::new(key))
                }
                (None, Some(h)) if !h.is_empty() && !h.contains('/') => Source::Metadata(h),
                (None, Some(_)) => {
                    return Err(SpecError::new(
                        format!("{at}.credentials.metadataHost"),
                        "a host or host:port",
                    ))
                }
                (None, None) => Source::metadata_default(),
            };
            Some(
                ctx.services
                    .google
                    .slot(source, TokenKind::Access { scopes }, &ctx.services.http),
            )
        }
    };
    Ok(ExternalGuard {
        client: Client::ModelArmor(ModelArmor {
            endpoint,
            template: s.template_name,
            token,
            redact: s.redact,
            http: ctx.services.http.clone(),
        }),
        timeout: timeout(&format!("{at}.timeoutMs"), s.timeout_ms)?,
        fail_open: s.fail_open,
        on_match: s.on_match,
    })
}

fn http_guard(ctx: &BuildContext, s: HttpSpec) -> Result<ExternalGuard, SpecError> {
    let at = "external.http";
    super::service_callout::check_url(&s.url, &ctx.services.egress)
        .map_err(|m| SpecError::new(format!("{at}.url"), m))?;
    let url: hyper::Uri = s
        .url
        .parse()
        .map_err(|e| SpecError::new(format!("{at}.url"), format!("not a URL: {e}")))?;
    let mut headers = Vec::new();
    for (k, v) in &s.headers {
        let field = format!("{at}.headers.{k}");
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| SpecError::new(&field, "not a header name"))?;
        if matches!(name.as_str(), "content-type" | "content-length" | "host") {
            return Err(SpecError::new(&field, "set by the guard call itself"));
        }
        let value = hyper::header::HeaderValue::from_str(v)
            .map_err(|_| SpecError::new(&field, "not a header value"))?;
        headers.push((name, value));
    }
    Ok(ExternalGuard {
        client: Client::Http(HttpGuard {
            url,
            headers,
            http: ctx.services.http.clone(),
        }),
        timeout: timeout(&format!("{at}.timeoutMs"), s.timeout_ms)?,
        fail_open: s.fail_open,
        on_match: s.on_match,
    })
}

/// Takes `external` out of a guard policy's spec and builds its guards.
pub(crate) fn take(
    ctx: &BuildContext,
    spec: &mut serde_norway::Value,
    kind: Kind,
) -> Result<Option<Arc<ExternalGuards>>, SpecError> {
    let Some(v) = super::sanitize_prompt::take_key(spec, "external")? else {
        return Ok(None);
    };
    let s: Spec = parse_spec(v).map_err(|e| {
        let field = if e.field.is_empty() {
            "external".to_string()
        } else {
            format!("external.{}", e.field)
        };
        SpecError::new(field, e.message)
    })?;
    if kind == Kind::Prompt && s.streams.is_some() {
        return Err(SpecError::new(
            "external.streams",
            "only SanitizeResponse guards streams",
        ));
    }
    let mut guards = Vec::new();
    if let Some(m) = s.model_armor {
        guards.push(model_armor(ctx, m)?);
    }
    if let Some(h) = s.http {
        guards.push(http_guard(ctx, h)?);
    }
    if guards.is_empty() {
        return Err(SpecError::new("external", "give modelArmor, http or both"));
    }
    // Every outcome this policy can count, exported at 0 from the start (alerts and rates
    // have a series before the first event).
    let outcomes: &[&str] = match kind {
        Kind::Prompt => &["ok", "match", "error", "timeout"],
        Kind::Response => &["ok", "match", "error", "timeout", "refused", "skipped"],
    };
    for g in &guards {
        for o in outcomes {
            REQUESTS.with_label_values(&[&ctx.name, g.client.label(), o]);
        }
    }
    Ok(Some(Arc::new(ExternalGuards {
        guards,
        streams: s.streams.unwrap_or_default(),
    })))
}

/// The variable prefixes of a guard policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Names {
    /// `sanitizeprompt` / `sanitizeresponse`.
    pub own: &'static str,
    /// `SanitizeUserPrompt` / `SanitizeModelResponse`.
    pub apigee: &'static str,
    pub kind: Kind,
}

/// The string values `select` picks in `doc`, in document order.
fn collect_parts(
    doc: &[u8],
    mut select: impl FnMut(JsonString<'_>) -> bool,
) -> Result<Vec<String>, guard::GuardError> {
    let mut parts = Vec::new();
    guard::rewrite_json_strings(doc, |at, value| {
        if select(at) {
            parts.push(value.to_owned());
        }
        None
    })?;
    Ok(parts)
}

/// `doc` with the picked string values replaced by `parts`, in order.
fn put_parts(
    doc: &[u8],
    parts: &[String],
    mut select: impl FnMut(JsonString<'_>) -> bool,
) -> Result<Option<Vec<u8>>, guard::GuardError> {
    let mut i = 0;
    guard::rewrite_json_strings(doc, |at, value| {
        if !select(at) {
            return None;
        }
        let new = parts.get(i);
        i += 1;
        new.filter(|n| n.as_str() != value).cloned()
    })
}

/// What the policy does after the guards.
pub(crate) enum After {
    Pass,
    /// A guard blocked: the categories to name.
    Block(String),
    Fault(Fault),
}

/// Runs `guards` over the picked strings of the `names.kind` body (or over `text` alone,
/// which then cannot be redacted in place), sets the variables and rewrites the body on a
/// redaction.
pub(crate) async fn check_body(
    guards: &ExternalGuards,
    ex: &mut Exchange,
    policy: &str,
    names: Names,
    text: Option<String>,
    select: fn(JsonString<'_>) -> bool,
) -> After {
    let dir = match names.kind {
        Kind::Prompt => crate::pipeline::Direction::Request,
        Kind::Response => crate::pipeline::Direction::Response,
    };
    let body = match names.kind {
        Kind::Prompt => ex.request_body.as_deref(),
        Kind::Response => ex.response_body.as_deref(),
    }
    .unwrap_or_default();
    let (parts, redactable) = match text {
        Some(t) => (vec![t], false),
        None => match collect_parts(body, select) {
            Ok(p) => (p, true),
            Err(e) => {
                // The local stage read this body; one it cannot is refused, never passed.
                tracing::warn!(policy = %policy, error = %e, "body not readable for the external guards");
                return After::Fault(unavailable(names, "unreadable"));
            }
        },
    };
    if parts.iter().all(|p| p.trim().is_empty()) {
        // No text (media only, an empty answer): nothing to ask about.
        return After::Pass;
    }
    let llm = ex.state.llm.clone();
    let ask = Ask {
        kind: names.kind,
        policy,
        apigee_prefix: names.apigee,
        api: llm.as_ref().map_or("unknown", |r| r.api.as_str()),
        model: llm.as_ref().and_then(|r| r.model.as_deref()),
        redactable,
    };
    let d = guards.check(&ask, parts).await;
    set_vars(ex, policy, names, &d);
    match d.end {
        End::Block { .. } => After::Block(d.categories.join(",")),
        End::Failed { guard, outcome } => {
            tracing::debug!(policy = %policy, guard, outcome, "refused: external guard unavailable");
            After::Fault(unavailable(names, outcome))
        }
        End::Pass => {
            if let Some(p) = &d.parts {
                let body = match names.kind {
                    Kind::Prompt => ex.request_body.as_deref(),
                    Kind::Response => ex.response_body.as_deref(),
                }
                .unwrap_or_default();
                match put_parts(body, p, select) {
                    Ok(Some(b)) => ex.replace_body(dir, b),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(policy = %policy, error = %e, "redaction could not be applied; refused");
                        return After::Block(d.categories.join(","));
                    }
                }
            }
            After::Pass
        }
    }
}

/// The fault of a guard that could not check (fail closed): 503, so a client may retry.
fn unavailable(names: Names, why: &str) -> Fault {
    let what = match names.kind {
        Kind::Prompt => "prompt",
        Kind::Response => "model's response",
    };
    Fault::new(
        503,
        format!("steps.{}.ExternalGuardFailed", names.own),
        format!("The {what} could not be checked by an external guardrail ({why})."),
    )
}

fn set_vars(ex: &mut Exchange, policy: &str, names: Names, d: &crate::guard::external::Decision) {
    let own = |n: &str| format!("{}.{policy}.{n}", names.own);
    for (k, v, apigee) in &d.vars {
        if *apigee {
            // A local match stands: Model Armor's NO_MATCH_FOUND does not undo it.
            let keep = v == "NO_MATCH_FOUND"
                && ex
                    .var(k)
                    .is_some_and(|x| x.as_text().as_ref() == "MATCH_FOUND");
            if !keep {
                ex.set_var(k.clone(), v.clone());
            }
        } else {
            ex.set_var(own(k), v.clone());
        }
    }
    if !d.matched {
        return;
    }
    ex.set_var(own("matched"), true);
    let local = ex
        .var(&own("action"))
        .map(|v| v.as_text().into_owned())
        .unwrap_or_default();
    let local = match local.as_str() {
        "block" => Some(Action::Block),
        "redact" => Some(Action::Redact),
        "log" => Some(Action::Log),
        _ => None,
    };
    if let Some(a) = local.max(d.action) {
        ex.set_var(own("action"), a.as_str().to_string());
    }
    let mut cats: Vec<String> = ex
        .var(&own("categories"))
        .map(|v| v.as_text().into_owned())
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .chain(d.categories.iter().cloned())
        .collect();
    cats.sort();
    cats.dedup();
    ex.set_var(own("categories"), cats.join(","));
    ex.set_var(
        format!("{}.{policy}.filterMatchState", names.apigee),
        "MATCH_FOUND",
    );
}

/// The framing of a streamed LLM answer (server-sent events, or Gemini's JSON array
/// without `alt=sse`); `None` for a whole JSON answer or no LLM exchange.
fn stream_format(ex: &Exchange) -> Option<ResponseFormat> {
    let llm = ex.state.llm.as_ref()?;
    let ct = ex.response.as_ref()?.headers.get("content-type");
    match ResponseFormat::detect(llm.stream_shape, ct) {
        ResponseFormat::Json => None,
        f => Some(f),
    }
}

/// SanitizeResponse's variable names.
const RESPONSE_NAMES: Names = Names {
    own: "sanitizeresponse",
    apigee: "SanitizeModelResponse",
    kind: Kind::Response,
};

/// The members of an answer that hold generated text (as the local stage reads them).
fn generated_member(at: JsonString<'_>) -> bool {
    matches!(at.key, Some("content" | "text" | "output_text" | "refusal"))
}

/// SanitizeResponse, after its local stage let the answer through: `streams: end`'s
/// verdict on a stream's whole text (kept for [`on_stream_chunk`]), or the guards on a
/// whole JSON answer. Nothing is asked about an answer the local stage blocked, found
/// unreadable, or that holds no generated text (an error status, embeddings, a compressed
/// or non-JSON body: the local stage decides those).
pub(crate) async fn check_response(
    guards: &ExternalGuards,
    policy: &str,
    ex: &mut Exchange,
) -> After {
    if let Some(end) = stream_end(guards, policy, ex) {
        end.run(guards, policy, ex).await;
        return After::Pass;
    }
    let own = |n: &str| format!("sanitizeresponse.{policy}.{n}");
    let skip = {
        let (Some(llm), Some(resp)) = (ex.state.llm.as_ref(), ex.response.as_ref()) else {
            return After::Pass;
        };
        let encoded = resp
            .headers
            .get("content-encoding")
            .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let body = ex.response_body.as_deref().unwrap_or_default();
        llm.api == Api::OpenAiEmbeddings
            || !(200..300).contains(&resp.status)
            || encoded
            || stream_format(ex).is_some()
            || body.is_empty()
            || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err()
            || ex.var(&own("unsupported")).is_some()
            || ex
                .var(&own("action"))
                .is_some_and(|a| a.as_text().as_ref() == "block")
    };
    if skip {
        return After::Pass;
    }
    check_body(guards, ex, policy, RESPONSE_NAMES, None, generated_member).await
}

/// `streams: end`: a streamed answer's whole generated text, read at its end.
pub(crate) struct StreamEnd {
    flag: String,
    parts: Vec<String>,
    unreadable: bool,
    llm: Arc<crate::llm::LlmRequest>,
}

/// `streams: end`, at the end of a streamed answer (SanitizeResponse's `response_end`, which
/// runs on the whole body before its last chunk is released): what to check, or `None` when
/// this is not such a stream. [`StreamEnd::run`] keeps the guards' verdict for
/// [`on_stream_chunk`] in `sanitizeresponse.<policy>.external.stream` (`pass` or `block`).
pub(crate) fn stream_end(
    guards: &ExternalGuards,
    policy: &str,
    ex: &Exchange,
) -> Option<StreamEnd> {
    if guards.streams != StreamPolicy::End {
        return None;
    }
    let format = stream_format(ex)?;
    let llm = ex.state.llm.clone()?;
    let body = ex.response_body.as_deref().filter(|b| !b.is_empty())?;
    let flag = format!("sanitizeresponse.{policy}.external.stream");
    if ex.var(&flag).is_some() {
        return None;
    }
    // The generated text of every choice, read by the LLM module (every API's framing),
    // with room for all of it: a text it could not read whole is not vouched for.
    let limits = crate::llm::response::Limits {
        max_text_bytes: body.len(),
        ..Default::default()
    };
    let mut acc = crate::llm::ResponseAccumulator::with_limits(llm.api, format, limits);
    acc.feed(body);
    let summary = acc.finish();
    let unreadable = summary.framing_error.is_some() || summary.dropped_text_chars > 0;
    let parts: Vec<String> = summary
        .choices
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect();
    Some(StreamEnd {
        flag,
        parts,
        unreadable,
        llm,
    })
}

impl StreamEnd {
    /// Asks the guards; never a rejection (the stream's headers, and maybe text, already
    /// left): the chunk step ends the stream with the API's refusal instead.
    pub(crate) async fn run(self, guards: &ExternalGuards, policy: &str, ex: &mut Exchange) {
        let StreamEnd {
            flag,
            parts,
            unreadable,
            llm,
        } = self;
        if unreadable {
            tracing::warn!(policy = %policy, "streamed answer not readable whole; its end is refused");
            ex.set_var(flag, "block");
            return;
        }
        if parts.is_empty() {
            ex.set_var(flag, "pass");
            return;
        }
        let ask = Ask {
            kind: Kind::Response,
            policy,
            apigee_prefix: "SanitizeModelResponse",
            api: llm.api.as_str(),
            model: llm.model.as_deref(),
            redactable: false,
        };
        let d = guards.check(&ask, parts).await;
        set_vars(ex, policy, RESPONSE_NAMES, &d);
        let verdict = if d.end == End::Pass { "pass" } else { "block" };
        ex.set_var(flag, verdict);
    }
}

/// SanitizeResponse on a streamed answer when it has external guards (they cannot check
/// text before it reaches the client without holding the stream): `streams: block` ends it
/// at its first chunk with the API's refusal; `streams: local` lets the local detectors
/// guard it, the skip said once; `streams: end` passes it on until [`stream_end`]'s verdict,
/// then ends it with the refusal on a block (or when no verdict came by its last chunk).
/// `None`: go on with the local stream guard.
pub(crate) fn on_stream_chunk(
    guards: &ExternalGuards,
    policy: &str,
    ex: &mut Exchange,
    chunk: &mut Chunk,
) -> Option<ChunkAction> {
    let format = stream_format(ex)?;
    let flag = format!("sanitizeresponse.{policy}.external.stream");
    if guards.streams == StreamPolicy::End {
        return end_mode_chunk(policy, ex, chunk, &flag, format);
    }
    match ex.var(&flag).map(|v| v.as_text().into_owned()).as_deref() {
        Some("refused") => {
            chunk.data.clear();
            return Some(ChunkAction::End);
        }
        Some(_) => return None,
        None => {}
    }
    let (outcome, first) = match guards.streams {
        StreamPolicy::Local => ("skipped", "skipped"),
        StreamPolicy::Block | StreamPolicy::End => ("refused", "refused"),
    };
    ex.set_var(flag, first);
    for g in &guards.guards {
        REQUESTS
            .with_label_values(&[policy, g.client.label(), outcome])
            .inc();
        ex.set_var(
            format!("sanitizeresponse.{policy}.{}.outcome", g.client.var_name()),
            outcome,
        );
    }
    if guards.streams == StreamPolicy::Local {
        tracing::warn!(policy = %policy, "streamed answer: external guards skipped (streams: local), local detectors only");
        return None;
    }
    tracing::info!(policy = %policy, "streamed answer refused: external guards need the whole text (streams: block)");
    ex.set_var(format!("sanitizeresponse.{policy}.matched"), true);
    ex.set_var(format!("sanitizeresponse.{policy}.action"), "block");
    let api = ex.state.llm.as_ref().map(|r| r.api);
    chunk.data = refused_stream(api, format, &chunk.data);
    Some(ChunkAction::End)
}

/// `streams: end`: chunks pass (through the local guard) until the verdict says block, or
/// the last chunk comes without a verdict (fail closed); then the stream ends with the
/// API's refusal: a whole refused stream when nothing was released yet (the body was held
/// whole), else the refusal's final events after what was sent.
fn end_mode_chunk(
    policy: &str,
    ex: &mut Exchange,
    chunk: &mut Chunk,
    flag: &str,
    format: ResponseFormat,
) -> Option<ChunkAction> {
    let passed = format!("sanitizeresponse.{policy}.external.released");
    let verdict = ex.var(flag).map(|v| v.as_text().into_owned());
    match verdict.as_deref() {
        Some("refused") => {
            chunk.data.clear();
            return Some(ChunkAction::End);
        }
        Some("pass") => return None,
        Some(_) => {}
        None if chunk.end_of_stream => {
            tracing::warn!(policy = %policy, "streamed answer ended without the external guards' verdict; its end is refused");
        }
        None => {
            if !chunk.data.is_empty() {
                ex.set_var(passed, true);
            }
            return None;
        }
    }
    ex.set_var(flag.to_string(), "refused");
    ex.set_var(format!("sanitizeresponse.{policy}.matched"), true);
    ex.set_var(format!("sanitizeresponse.{policy}.action"), "block");
    let api = ex.state.llm.as_ref().map(|r| r.api);
    chunk.data = if ex.var(&passed).is_some() {
        refused_end(api, format)
    } else {
        refused_stream(api, format, &chunk.data)
    };
    tracing::info!(policy = %policy, "streamed answer's end refused by the external guards");
    Some(ChunkAction::End)
}

/// Gemini's refusal candidate.
fn safety() -> serde_json::Value {
    serde_json::json!({"candidates": [{"index": 0, "content": {"role": "model", "parts": []},
                                       "finishReason": "SAFETY"}]})
}

/// The API's refusal as the last events of a stream whose beginning already passed (a JSON
/// array: one more element, and the array's end).
fn refused_end(api: Option<Api>, format: ResponseFormat) -> Vec<u8> {
    use serde_json::json;
    if format == ResponseFormat::JsonArray {
        return format!(",{}]", safety()).into_bytes();
    }
    let mut out = Vec::new();
    let mut ev = |name: Option<&str>, v: serde_json::Value| {
        if let Some(n) = name {
            out.extend_from_slice(format!("event: {n}\n").as_bytes());
        }
        out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
    };
    match api {
        Some(Api::OpenAiChat) => {
            ev(
                None,
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {},
                        "finish_reason": "content_filter"}]}),
            );
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        Some(Api::AnthropicMessages) => {
            ev(
                Some("message_delta"),
                json!({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": null},
                       "usage": {"output_tokens": 0}}),
            );
            ev(Some("message_stop"), json!({"type": "message_stop"}));
        }
        Some(Api::Gemini | Api::VertexAi) => ev(None, safety()),
        _ => ev(
            Some("error"),
            json!({"type": "error", "code": "content_filter",
                   "message": "The streamed answer was refused by a guardrail.", "param": null}),
        ),
    }
    out
}

/// A whole stream that ends at once with the API's refusal, carrying the ids of the
/// upstream's first event where there is one: the SDK reads a normal, empty end.
fn refused_stream(api: Option<Api>, format: ResponseFormat, first: &[u8]) -> Vec<u8> {
    use serde_json::{json, Value};
    if format == ResponseFormat::JsonArray {
        return format!("[{}]", safety()).into_bytes();
    }
    let first_json: Option<Value> = std::str::from_utf8(first).ok().and_then(|t| {
        t.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .find_map(|d| serde_json::from_str(d.trim()).ok())
    });
    let field = |k: &str| first_json.as_ref().and_then(|v| v.get(k)).cloned();
    let mut out = Vec::new();
    let mut ev = |name: Option<&str>, v: &Value| {
        if let Some(n) = name {
            out.extend_from_slice(format!("event: {n}\n").as_bytes());
        }
        out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
    };
    match api {
        Some(Api::OpenAiChat) => {
            ev(
                None,
                &json!({"id": field("id").unwrap_or(json!("chatcmpl-refused")),
                    "object": "chat.completion.chunk",
                    "created": field("created").unwrap_or(json!(0)),
                    "model": field("model").unwrap_or(json!("")),
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": "content_filter"}]}),
            );
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        Some(Api::AnthropicMessages) => {
            let message = first_json
                .as_ref()
                .filter(|v| v.get("type").and_then(Value::as_str) == Some("message_start"))
                .and_then(|v| v.get("message").cloned())
                .unwrap_or_else(|| {
                    json!({"id": "msg_refused", "type": "message", "role": "assistant",
                        "content": [], "model": "", "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": 0, "output_tokens": 0}})
                });
            ev(
                Some("message_start"),
                &json!({"type": "message_start", "message": message}),
            );
            ev(
                Some("message_delta"),
                &json!({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": null},
                        "usage": {"output_tokens": 0}}),
            );
            ev(Some("message_stop"), &json!({"type": "message_stop"}));
        }
        Some(Api::Gemini | Api::VertexAi) => {
            ev(None, &safety());
        }
        _ => {
            // Responses and the others: an error event, which their SDKs raise.
            ev(
                Some("error"),
                &json!({"type": "error", "code": "content_filter",
                        "message": "The streamed answer was refused by a guardrail.", "param": null}),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::Services;

    fn ctx() -> BuildContext {
        BuildContext {
            name: "g".into(),
            config_dir: None,
            services: Services::default(),
        }
    }

    fn take_yaml(y: &str, kind: Kind) -> Result<Option<Arc<ExternalGuards>>, SpecError> {
        let mut v: serde_norway::Value = serde_norway::from_str(y).unwrap_or_default();
        take(&ctx(), &mut v, kind)
    }

    #[test]
    fn specs_are_checked_at_load() {
        let g = take_yaml(
            "{external: {modelArmor: {templateName: projects/p/locations/us-central1/templates/t, credentials: {none: true}}, http: {url: 'http://127.0.0.1:9/x', timeoutMs: 50, failOpen: true, onMatch: log}}}",
            Kind::Prompt,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("guards"));
        assert_eq!(g.guards.len(), 2);
        let Client::ModelArmor(m) = &g.guards[0].client else {
            panic!("model armor first")
        };
        assert_eq!(
            m.endpoint,
            "https://modelarmor.us-central1.rep.googleapis.com"
        );
        assert!(m.token.is_none());
        assert_eq!(g.guards[0].timeout, Duration::from_millis(1500));
        assert!(!g.guards[0].fail_open);
        assert_eq!(g.guards[1].on_match, OnMatch::Log);
        assert!(g.guards[1].fail_open);

        for (y, field) in [
            ("{external: {}}", "external"),
            ("{external: {modelArmor: {templateName: 'projects/p/templates/t'}}}", "external.modelArmor.templateName"),
            ("{external: {modelArmor: {templateName: projects/p/locations/l/templates/t, colour: red}}}", "external.modelArmor"),
            ("{external: {http: {url: 'ftp://x/y'}}}", "external.http.url"),
            ("{external: {http: {url: 'http://169.254.169.254/'}}}", "external.http.url"),
            ("{external: {http: {url: 'http://x/', timeoutMs: 0}}}", "external.http.timeoutMs"),
            ("{external: {http: {url: 'http://x/', headers: {content-type: a}}}}", "external.http.headers.content-type"),
            ("{external: {modelArmor: {templateName: projects/p/locations/l/templates/t, endpoint: 'http://x/v1'}}}", "external.modelArmor.endpoint"),
            ("{external: {http: {url: 'http://x/'}, streams: local}}", "external.streams"),
        ] {
            let e = take_yaml(y, Kind::Prompt).err().unwrap_or_else(|| panic!("{y} refused"));
            assert!(e.field.starts_with(field), "{y}: {} {}", e.field, e.message);
        }
        let g = take_yaml(
            "{external: {http: {url: 'http://x/'}, streams: local}}",
            Kind::Response,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("guards"));
        assert_eq!(g.streams, StreamPolicy::Local);
        let g = take_yaml("{external: {http: {url: 'http://x/'}}}", Kind::Response)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("guards"));
        assert_eq!(
            g.streams,
            StreamPolicy::Block,
            "streams fail closed by default"
        );
        assert!(take_yaml("{defaultAction: log}", Kind::Prompt)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
    }

    #[test]
    fn verdicts_merge_into_the_policy_variables() {
        use crate::guard::external::Decision;
        let mut ex = Exchange::default();
        // What the local stage set: a logged email, an injection match.
        ex.set_var("sanitizeprompt.p.matched", true);
        ex.set_var("sanitizeprompt.p.action", "log");
        ex.set_var("sanitizeprompt.p.categories", "email");
        ex.set_var(
            "SanitizeUserPrompt.p.piAndJailbreakFilterResult.matchState",
            "MATCH_FOUND",
        );
        let d = Decision {
            end: End::Pass,
            parts: Some(vec!["x".into()]),
            matched: true,
            action: Some(Action::Redact),
            categories: vec!["custom:model_armor_sdp".into(), "email".into()],
            vars: vec![
                ("modelArmor.outcome".into(), "match".into(), false),
                (
                    "SanitizeUserPrompt.p.piAndJailbreakFilterResult.matchState".into(),
                    "NO_MATCH_FOUND".into(),
                    true,
                ),
                (
                    "SanitizeUserPrompt.p.sdpFilterResult.deidentifyResult.matchState".into(),
                    "MATCH_FOUND".into(),
                    true,
                ),
            ],
        };
        let names = Names {
            own: "sanitizeprompt",
            apigee: "SanitizeUserPrompt",
            kind: Kind::Prompt,
        };
        set_vars(&mut ex, "p", names, &d);
        let v = |n: &str| {
            ex.var(n)
                .map(|v| v.as_text().into_owned())
                .unwrap_or_default()
        };
        assert_eq!(v("sanitizeprompt.p.modelArmor.outcome"), "match");
        assert_eq!(v("sanitizeprompt.p.action"), "redact");
        assert_eq!(
            v("sanitizeprompt.p.categories"),
            "custom:model_armor_sdp,email"
        );
        assert_eq!(
            v("SanitizeUserPrompt.p.piAndJailbreakFilterResult.matchState"),
            "MATCH_FOUND",
            "a local match stands"
        );
        assert_eq!(
            v("SanitizeUserPrompt.p.sdpFilterResult.deidentifyResult.matchState"),
            "MATCH_FOUND"
        );
        assert_eq!(v("SanitizeUserPrompt.p.filterMatchState"), "MATCH_FOUND");
    }

    #[test]
    fn parts_come_out_and_go_back_in_order() {
        let doc = br#"{"model":"m","messages":[{"role":"user","content":"a \"q\""},{"role":"user","content":"b"}]}"#;
        let sel = |at: JsonString<'_>| at.key == Some("content");
        let parts = collect_parts(doc, sel).unwrap_or_default();
        assert_eq!(parts, ["a \"q\"", "b"]);
        let out = put_parts(doc, &["a [X]".into(), "b".into()], sel)
            .unwrap_or_default()
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["messages"][0]["content"], "a [X]");
        assert_eq!(v["messages"][1]["content"], "b");
        assert_eq!(v["model"], "m");
    }

    fn sse_exchange() -> Exchange {
        let mut ex = Exchange::default();
        let mut h = crate::vars::Headers::new();
        h.push("content-type".into(), "text/event-stream".into());
        ex.response = Some(crate::vars::ResponseInfo {
            status: 200,
            headers: h,
        });
        let mut r: crate::llm::LlmRequest =
            (*crate::policies::llm_test_support::request("m", None)).clone();
        r.api = Api::OpenAiChat;
        ex.state.llm = Some(Arc::new(r));
        ex
    }

    fn chunk(data: &str, eos: bool) -> Chunk {
        Chunk {
            data: data.as_bytes().to_vec(),
            end_of_stream: eos,
            whole_events: true,
        }
    }

    #[test]
    fn stream_end_mode_ends_with_a_refusal_on_a_block_or_no_verdict() {
        let g = take_yaml(
            "{external: {http: {url: 'http://x/'}, streams: end}}",
            Kind::Response,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("guards"));
        let flag = "sanitizeresponse.g.external.stream";
        let ev = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";

        // No verdict yet: the chunk passes (to the local guard).
        let mut ex = sse_exchange();
        let mut c = chunk(ev, false);
        assert_eq!(on_stream_chunk(&g, "g", &mut ex, &mut c), None);
        // The verdict says block: the refusal's final events after what was sent.
        ex.set_var(flag, "block");
        let mut c = chunk("data: [DONE]\n\n", true);
        assert_eq!(
            on_stream_chunk(&g, "g", &mut ex, &mut c),
            Some(ChunkAction::End)
        );
        let out = String::from_utf8(c.data).unwrap_or_default();
        assert!(
            out.contains("content_filter") && out.ends_with("data: [DONE]\n\n"),
            "{out}"
        );
        assert!(!out.contains("role"), "only the end: {out}");
        let mut c = chunk(ev, false);
        assert_eq!(
            on_stream_chunk(&g, "g", &mut ex, &mut c),
            Some(ChunkAction::End)
        );
        assert!(c.data.is_empty());

        // Held whole (nothing released before the verdict): a whole refused stream.
        let mut ex = sse_exchange();
        ex.set_var(flag, "block");
        let mut c = chunk(ev, true);
        assert_eq!(
            on_stream_chunk(&g, "g", &mut ex, &mut c),
            Some(ChunkAction::End)
        );
        let out = String::from_utf8(c.data).unwrap_or_default();
        assert!(
            out.contains("\"role\":\"assistant\"") && !out.contains("hi"),
            "{out}"
        );

        // A pass verdict leaves the stream to the local guard.
        let mut ex = sse_exchange();
        ex.set_var(flag, "pass");
        let mut c = chunk(ev, true);
        assert_eq!(on_stream_chunk(&g, "g", &mut ex, &mut c), None);

        // The last chunk without a verdict: refused (fail closed), not passed unchecked.
        let mut ex = sse_exchange();
        let mut c = chunk(ev, true);
        assert_eq!(
            on_stream_chunk(&g, "g", &mut ex, &mut c),
            Some(ChunkAction::End)
        );
        assert!(String::from_utf8(c.data)
            .unwrap_or_default()
            .contains("content_filter"));
    }

    #[test]
    fn only_streams_end_holds_a_stream_whole() {
        let hooks = |y: &str| {
            let spec: serde_norway::Value = serde_norway::from_str(y).unwrap_or_default();
            crate::policies::sanitize_response::build(&ctx(), spec)
                .unwrap_or_else(|e| panic!("{e}"))
                .hooks()
        };
        assert!(hooks("{}").streams_in_chunks);
        assert!(hooks("{external: {http: {url: 'http://x/'}}}").streams_in_chunks);
        assert!(hooks("{external: {http: {url: 'http://x/'}, streams: local}}").streams_in_chunks);
        assert!(!hooks("{external: {http: {url: 'http://x/'}, streams: end}}").streams_in_chunks);
    }

    #[test]
    fn stream_end_reads_the_whole_generated_text() {
        let g = take_yaml(
            "{external: {http: {url: 'http://x/'}, streams: end}}",
            Kind::Response,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("guards"));
        let mut ex = sse_exchange();
        let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        ex.response_body = Some(body.as_bytes().to_vec());
        let end = stream_end(&g, "g", &ex).unwrap_or_else(|| panic!("a stream to check"));
        assert_eq!(end.parts, ["Hello"]);
        assert!(!end.unreadable);
        // Not under `streams: end`, or not a stream: nothing.
        let b = take_yaml("{external: {http: {url: 'http://x/'}}}", Kind::Response)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("guards"));
        assert!(stream_end(&b, "g", &ex).is_none());
        ex.response = None;
        assert!(stream_end(&g, "g", &ex).is_none());
    }

    #[test]
    fn refused_streams_are_whole_for_each_api() {
        let first = b"data: {\"id\":\"c9\",\"created\":5,\"model\":\"gpt\",\"choices\":[]}\n\n";
        let s = String::from_utf8(refused_stream(
            Some(Api::OpenAiChat),
            ResponseFormat::Sse,
            first,
        ))
        .unwrap_or_default();
        assert!(
            s.contains("\"finish_reason\":\"content_filter\"") && s.contains("\"id\":\"c9\""),
            "{s}"
        );
        assert!(s.ends_with("data: [DONE]\n\n"));
        let s = String::from_utf8(refused_stream(
            Some(Api::AnthropicMessages),
            ResponseFormat::Sse,
            b"",
        ))
        .unwrap_or_default();
        assert!(s.starts_with("event: message_start\n"), "{s}");
        assert!(
            s.contains("\"stop_reason\":\"refusal\"")
                && s.ends_with("{\"type\":\"message_stop\"}\n\n")
        );
        let s = String::from_utf8(refused_stream(Some(Api::Gemini), ResponseFormat::Sse, b""))
            .unwrap_or_default();
        assert!(s.contains("\"finishReason\":\"SAFETY\""), "{s}");
        let s = String::from_utf8(refused_stream(
            Some(Api::OpenAiResponses),
            ResponseFormat::Sse,
            b"",
        ))
        .unwrap_or_default();
        assert!(s.starts_with("event: error\n"), "{s}");
        // Gemini's JSON-array stream: a whole array, or its last element and end.
        let whole = refused_stream(Some(Api::Gemini), ResponseFormat::JsonArray, b"[");
        let v: serde_json::Value = serde_json::from_slice(&whole).unwrap_or_default();
        assert_eq!(v[0]["candidates"][0]["finishReason"], "SAFETY");
        let mut sent = b"[{\"candidates\":[]}".to_vec();
        sent.extend(refused_end(Some(Api::Gemini), ResponseFormat::JsonArray));
        let v: serde_json::Value = serde_json::from_slice(&sent).unwrap_or_default();
        assert_eq!(v[1]["candidates"][0]["finishReason"], "SAFETY", "{v}");
    }
}
