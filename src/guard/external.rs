//! External guards (issue 15 item 5): a paid or remote check a guard policy makes after its
//! local detectors. Two clients: Model Armor over its REST protocol ([`ModelArmor`], the
//! result types in [`super::armor`]) and a generic HTTP guard ([`HttpGuard`], the protocol
//! below). [`ExternalGuards::check`] runs the configured ones in order over the text parts of
//! one prompt or answer and says what to do: pass, pass with redacted parts, block, or fail
//! (closed, unless the guard is configured `failOpen`).
//!
//! The generic HTTP guard protocol (documented in the README):
//!
//! ```text
//! POST <url>  content-type: application/json
//! {"kind": "prompt" | "response", "policy": "<policy>", "api": "openai.chat_completions", "model": "gpt-4o",
//!  "text": "<the parts joined by a blank line>", "parts": ["<part>", ...]}
//!
//! 200 {"action": "allow" | "block" | "redact", "categories": ["<name>", ...],
//!      "parts": ["<part, redacted>", ...]}   // redact: one per part sent, same order
//!                                            // ("text" instead is accepted for one part)
//! ```
//!
//! Anything else (another status, a body that is not that JSON, an unknown action, a redaction
//! whose parts do not line up) is an error, as is a timeout: the guard then fails closed or
//! open as configured. Errors, logs and metrics never carry the text: transport errors are
//! hyper's, answer errors give a position, never a value.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use prometheus::{HistogramVec, IntCounterVec};
use serde::Deserialize;

use super::armor::{self, SanitizeModelResponseRequest, SanitizeUserPromptRequest};
use crate::google::{Cached, TokenSlot};
use crate::http_client::{HttpClient, HttpError};

/// Largest answer read from a guard.
const MAX_ANSWER: usize = 4 << 20;
/// Categories kept from a generic guard's answer (they go into variables and messages).
const MAX_CATEGORIES: usize = 16;

/// Joins parts for guards that read one text, and splits a de-identified text back. `␞`
/// (SYMBOL FOR RECORD SEPARATOR) on its own line: a visible, harmless glyph that no detector
/// takes for data, so a de-identified text still holds it between the parts.
pub const PART_SEPARATOR: &str = "\n\u{241E}\n";

/// Requests to external guards by policy, guard (`model_armor`, `http`) and outcome: `ok`
/// (no match), `match`, `error`, `timeout`; for streams a guard cannot check, `refused`
/// (the stream was ended) or `skipped` (`streams: local`).
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_guard_external_requests_total",
            "External guard checks by policy, guard and outcome",
        ),
        &["policy", "guard", "outcome"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "guard metric not registered");
    }
    c
});

/// Latency of external guard calls (token, request and answer), by policy and guard.
pub static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    let h = HistogramVec::new(
        prometheus::HistogramOpts::new(
            "tollgate_guard_external_duration_seconds",
            "External guard call latency by policy and guard",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["policy", "guard"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(h.clone()))
    {
        tracing::warn!(error = %e, "guard metric not registered");
    }
    h
});

/// Why a guard gave no usable verdict. Never carries the text checked.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExternalError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("credentials unavailable: {0}")]
    Credentials(String),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answer unusable: {0}")]
    Answer(String),
}

impl ExternalError {
    /// The metric outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            ExternalError::Timeout(_) => "timeout",
            _ => "error",
        }
    }
}

fn http_error(e: HttpError) -> ExternalError {
    match e {
        HttpError::Timeout(d) => ExternalError::Timeout(d),
        other => ExternalError::Transport(other.to_string()),
    }
}

/// A parse error's position only: serde's messages can quote values from the answer.
fn answer_error(what: &str, e: &serde_json::Error) -> ExternalError {
    ExternalError::Answer(format!("{what} (line {}, column {})", e.line(), e.column()))
}

/// What is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prompt,
    Response,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Prompt => "prompt",
            Kind::Response => "response",
        }
    }
}

/// What a match does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMatch {
    /// Refuse the prompt or answer (never echoing the text).
    #[default]
    Block,
    /// Only set variables, count and log.
    Log,
}

/// What a guard said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    Allow,
    Block,
    /// The parts, redacted (as many as were sent).
    Redact(Vec<String>),
}

/// One guard's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub said: Said,
    /// Bounded names (`prompt_injection`, `custom:model_armor_rai`, a generic guard's own).
    pub categories: Vec<String>,
    /// Variables the guard's protocol defines (Model Armor: Apigee's names).
    pub vars: Vec<(String, String)>,
}

/// Who asks, about what.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub kind: Kind,
    pub policy: &'a str,
    /// Apigee's prefix for Model Armor's variables: `SanitizeUserPrompt` /
    /// `SanitizeModelResponse`.
    pub apigee_prefix: &'a str,
    pub api: &'a str,
    pub model: Option<&'a str>,
    /// Whether a redaction can be applied (the parts map back to the body).
    pub redactable: bool,
}

/// Model Armor: `POST {endpoint}/v1/{template}:sanitizeUserPrompt|:sanitizeModelResponse`
/// with a Google access token.
#[derive(Debug)]
pub struct ModelArmor {
    /// `https://modelarmor.{location}.rep.googleapis.com`, no trailing slash.
    pub endpoint: String,
    /// `projects/{p}/locations/{l}/templates/{t}`.
    pub template: String,
    /// `None` sends no `authorization` (a local emulator or a proxy that adds it).
    pub token: Option<Arc<TokenSlot>>,
    /// Use the de-identified text of an SDP-only match instead of blocking.
    pub redact: bool,
    pub http: HttpClient,
}

impl ModelArmor {
    async fn bearer(&self) -> Result<Option<String>, ExternalError> {
        let Some(slot) = &self.token else {
            return Ok(None);
        };
        let token = match slot.get() {
            Cached::Ready(t) => t,
            Cached::Failed(e) => return Err(ExternalError::Credentials(e.to_string())),
            Cached::Missing => slot
                .fetch()
                .await
                .map_err(|e| ExternalError::Credentials(e.to_string()))?,
        };
        Ok(Some(format!("Bearer {}", token.value)))
    }

    async fn call(
        &self,
        ask: &Ask<'_>,
        parts: &[String],
        timeout: Duration,
    ) -> Result<Verdict, ExternalError> {
        let text = parts.join(PART_SEPARATOR);
        let prompt = ask.kind == Kind::Prompt;
        let body = if prompt {
            serde_json::to_vec(&SanitizeUserPromptRequest::new(text.as_str()))
        } else {
            serde_json::to_vec(&SanitizeModelResponseRequest::new(text.as_str(), None))
        }
        .map_err(|e| ExternalError::Answer(format!("request not encodable: {e}")))?;
        let url = format!(
            "{}{}",
            self.endpoint,
            armor::method_path(&self.template, prompt)
        );
        let mut req = hyper::Request::post(url).header("content-type", "application/json");
        if let Some(b) = self.bearer().await? {
            req = req.header("authorization", b);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ExternalError::Transport(e.to_string()))?;
        let resp = self
            .http
            .send(req, false, timeout, MAX_ANSWER)
            .await
            .map_err(http_error)?;
        if !(200..300).contains(&resp.status) {
            return Err(ExternalError::Status(resp.status));
        }
        let parsed: armor::SanitizeResponse = serde_json::from_slice(&resp.body)
            .map_err(|e| answer_error("not a sanitize answer", &e))?;
        verdict_of(&parsed.sanitization_result, ask, parts.len(), self.redact)
    }
}

/// Model Armor's result as a verdict. `FAILURE` is an error; `PARTIAL` without a match is an
/// error too (some filters did not run: nothing vouches for the text).
fn verdict_of(
    s: &armor::SanitizationResult,
    ask: &Ask<'_>,
    parts: usize,
    redact: bool,
) -> Result<Verdict, ExternalError> {
    if s.invocation_result.is("FAILURE") {
        return Err(ExternalError::Answer("invocationResult FAILURE".into()));
    }
    let m = |st: Option<&armor::ApiEnum>| st.is_some_and(|x| x.is("MATCH_FOUND"));
    let others = m(s.pi_and_jailbreak().map(|r| &r.match_state))
        || m(s.rai().map(|r| &r.match_state))
        || m(s.malicious_uris().map(|r| &r.match_state))
        || m(s.csam().map(|r| &r.match_state));
    let sdp = s.sdp();
    let sdp_match = sdp.is_some_and(|r| {
        m(r.inspect_result.as_ref().map(|i| &i.match_state))
            || m(r.deidentify_result.as_ref().map(|d| &d.match_state))
    });
    let matched = s.filter_match_state.is("MATCH_FOUND") || others || sdp_match;
    if !matched && s.invocation_result.is("PARTIAL") {
        return Err(ExternalError::Answer(
            "invocationResult PARTIAL: some filters did not run".into(),
        ));
    }
    let vars = s.variables(ask.apigee_prefix, ask.policy);
    if !matched {
        return Ok(Verdict {
            said: Said::Allow,
            categories: Vec::new(),
            vars,
        });
    }
    let mut categories: Vec<String> = s
        .findings(0)
        .iter()
        .map(|f| f.category.to_string())
        .collect();
    if let Some(d) = sdp.and_then(|r| r.deidentify_result.as_ref()) {
        for t in &d.info_types {
            categories.push(match armor::sdp_category(t) {
                Some(b) => b.as_str().to_string(),
                None => "custom:model_armor_sdp".into(),
            });
        }
    }
    if categories.is_empty() {
        categories.push("custom:model_armor".into());
    }
    categories.sort();
    categories.dedup();
    let said = match s.deidentified_text() {
        Some(t) if redact && sdp_match && !others && ask.redactable => {
            let back: Vec<String> = t.split(PART_SEPARATOR).map(str::to_owned).collect();
            if back.len() == parts {
                Said::Redact(back)
            } else {
                // The separators did not survive: the redaction cannot be placed. Blocked
                // rather than passed unredacted.
                tracing::warn!(policy = %ask.policy, "Model Armor's de-identified text does not map back to the parts; blocked");
                Said::Block
            }
        }
        _ => Said::Block,
    };
    Ok(Verdict {
        said,
        categories,
        vars,
    })
}

/// A generic HTTP guard (protocol in the module docs).
#[derive(Debug)]
pub struct HttpGuard {
    pub url: hyper::Uri,
    pub headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    pub http: HttpClient,
}

#[derive(Debug, Deserialize)]
struct HttpAnswer {
    action: String,
    #[serde(default)]
    categories: Vec<serde_json::Value>,
    #[serde(default)]
    parts: Option<Vec<String>>,
    #[serde(default)]
    text: Option<String>,
}

/// A category name safe for variables and messages: `[A-Za-z0-9_.:-]{1,64}`.
fn clean_category(v: &serde_json::Value) -> Option<String> {
    let s = v.as_str()?;
    (!s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')))
    .then(|| s.to_owned())
}

impl HttpGuard {
    async fn call(
        &self,
        ask: &Ask<'_>,
        parts: &[String],
        timeout: Duration,
    ) -> Result<Verdict, ExternalError> {
        let body = serde_json::json!({
            "kind": ask.kind.as_str(),
            "policy": ask.policy,
            "api": ask.api,
            "model": ask.model,
            "text": parts.join("\n\n"),
            "parts": parts,
        });
        let mut req =
            hyper::Request::post(self.url.clone()).header("content-type", "application/json");
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| ExternalError::Transport(e.to_string()))?;
        let resp = self
            .http
            .send(req, false, timeout, MAX_ANSWER)
            .await
            .map_err(http_error)?;
        if !(200..300).contains(&resp.status) {
            return Err(ExternalError::Status(resp.status));
        }
        let a: HttpAnswer = serde_json::from_slice(&resp.body)
            .map_err(|e| answer_error("not a guard answer", &e))?;
        let mut categories: Vec<String> = a
            .categories
            .iter()
            .filter_map(clean_category)
            .take(MAX_CATEGORIES)
            .collect();
        categories.sort();
        categories.dedup();
        let said = match a.action.as_str() {
            "allow" => Said::Allow,
            "block" => Said::Block,
            "redact" => {
                let back = match (a.parts, a.text) {
                    (Some(p), _) => p,
                    (None, Some(t)) if parts.len() == 1 => vec![t],
                    _ => {
                        return Err(ExternalError::Answer(
                            "redact without parts (or text for one part)".into(),
                        ))
                    }
                };
                if back.len() != parts.len() {
                    return Err(ExternalError::Answer(format!(
                        "redact answered {} parts for {} sent",
                        back.len(),
                        parts.len()
                    )));
                }
                if ask.redactable {
                    Said::Redact(back)
                } else {
                    // Nowhere to put the redaction: blocked, never passed unredacted.
                    Said::Block
                }
            }
            _ => return Err(ExternalError::Answer("unknown action".into())),
        };
        if said != Said::Allow && categories.is_empty() {
            categories.push("http_guard".into());
        }
        Ok(Verdict {
            said,
            categories,
            vars: Vec::new(),
        })
    }
}

/// One configured external guard.
#[derive(Debug)]
pub enum Client {
    ModelArmor(ModelArmor),
    Http(HttpGuard),
}

impl Client {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Client::ModelArmor(_) => "model_armor",
            Client::Http(_) => "http",
        }
    }

    /// The variable segment: `<prefix>.<policy>.<var_name>.outcome`.
    pub fn var_name(&self) -> &'static str {
        match self {
            Client::ModelArmor(_) => "modelArmor",
            Client::Http(_) => "http",
        }
    }
}

#[derive(Debug)]
pub struct ExternalGuard {
    pub client: Client,
    pub timeout: Duration,
    pub fail_open: bool,
    pub on_match: OnMatch,
}

/// What SanitizeResponse does with a streamed answer its external guards cannot check
/// before the text reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamPolicy {
    /// End the stream at once with the API's refusal (fail closed).
    #[default]
    Block,
    /// Let the local detectors guard it alone (the external guards are skipped, said in a
    /// variable, a metric and a warning).
    Local,
    /// Hold the stream whole, check its whole generated text, then release it, or the API's
    /// refusal in its place on a match (or a closed failure). The first token waits for the
    /// whole generation.
    End,
}

/// The external guards of one policy, in the order they run.
#[derive(Debug)]
pub struct ExternalGuards {
    pub guards: Vec<ExternalGuard>,
    pub streams: StreamPolicy,
}

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Go on (with `Decision::parts` when redacted).
    Pass,
    /// A guard blocked (its label; the categories are in [`Decision::categories`]).
    Block { guard: &'static str },
    /// A guard failed and is not `failOpen`: its label and outcome.
    Failed {
        guard: &'static str,
        outcome: &'static str,
    },
}

/// What [`ExternalGuards::check`] decided.
#[derive(Debug, Clone)]
pub struct Decision {
    pub end: End,
    /// The redacted parts, when a guard redacted.
    pub parts: Option<Vec<String>>,
    /// Whether any guard matched (blocked, redacted or logged).
    pub matched: bool,
    /// The most severe thing done: `block`, `redact` or `log` (a logged match).
    pub action: Option<super::Action>,
    pub categories: Vec<String>,
    /// `(<guard var name>.<name>, value)` for the policy to prefix, and Apigee's names whole
    /// (`apigee` true).
    pub vars: Vec<(String, String, bool)>,
}

impl ExternalGuards {
    /// Runs the guards in order over `parts`: a block or a closed failure stops there (later
    /// guards are not called); a redaction feeds the next guard the redacted parts.
    pub async fn check(&self, ask: &Ask<'_>, parts: Vec<String>) -> Decision {
        let mut d = Decision {
            end: End::Pass,
            parts: None,
            matched: false,
            action: None,
            categories: Vec::new(),
            vars: Vec::new(),
        };
        let mut parts = parts;
        for g in &self.guards {
            let label = g.client.label();
            let name = g.client.var_name();
            let started = Instant::now();
            let call = async {
                match &g.client {
                    Client::ModelArmor(c) => c.call(ask, &parts, g.timeout).await,
                    Client::Http(c) => c.call(ask, &parts, g.timeout).await,
                }
            };
            // The token fetch counts against the timeout too.
            let r = match tokio::time::timeout(g.timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(ExternalError::Timeout(g.timeout)),
            };
            DURATION
                .with_label_values(&[ask.policy, label])
                .observe(started.elapsed().as_secs_f64());
            let v = match r {
                Ok(v) => v,
                Err(e) => {
                    let outcome = e.outcome();
                    REQUESTS
                        .with_label_values(&[ask.policy, label, outcome])
                        .inc();
                    d.vars
                        .push((format!("{name}.outcome"), outcome.to_string(), false));
                    if g.fail_open {
                        tracing::warn!(policy = %ask.policy, guard = label, error = %e, "external guard failed; passed unchecked (failOpen)");
                        d.vars
                            .push((format!("{name}.skipped"), "true".into(), false));
                        continue;
                    }
                    tracing::warn!(policy = %ask.policy, guard = label, error = %e, "external guard failed; refused (fail closed)");
                    d.end = End::Failed {
                        guard: label,
                        outcome,
                    };
                    return d;
                }
            };
            let matched = v.said != Said::Allow;
            let outcome = if matched { "match" } else { "ok" };
            REQUESTS
                .with_label_values(&[ask.policy, label, outcome])
                .inc();
            d.vars
                .push((format!("{name}.outcome"), outcome.to_string(), false));
            d.vars.extend(v.vars.into_iter().map(|(k, x)| (k, x, true)));
            if !matched {
                continue;
            }
            d.matched = true;
            d.categories.extend(v.categories.iter().cloned());
            d.vars
                .push((format!("{name}.categories"), v.categories.join(","), false));
            let done = match (v.said, g.on_match) {
                (_, OnMatch::Log) => super::Action::Log,
                (Said::Redact(p), OnMatch::Block) => {
                    parts = p;
                    d.parts = Some(parts.clone());
                    super::Action::Redact
                }
                _ => super::Action::Block,
            };
            d.vars
                .push((format!("{name}.action"), done.as_str().to_string(), false));
            d.action = d.action.max(Some(done));
            tracing::info!(policy = %ask.policy, guard = label, action = done.as_str(), categories = %v.categories.join(","), "external guard matched");
            if done == super::Action::Block {
                d.end = End::Block { guard: label };
                break;
            }
        }
        d.categories.sort();
        d.categories.dedup();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(redactable: bool) -> Ask<'static> {
        Ask {
            kind: Kind::Prompt,
            policy: "p",
            apigee_prefix: "SanitizeUserPrompt",
            api: "openai_chat",
            model: Some("m"),
            redactable,
        }
    }

    fn result(j: &str) -> armor::SanitizationResult {
        serde_json::from_str::<armor::SanitizeResponse>(j)
            .unwrap_or_else(|e| panic!("{e}"))
            .sanitization_result
    }

    #[test]
    fn verdicts_from_model_armor_results() {
        let clean = result(
            r#"{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND","invocationResult":"SUCCESS",
            "filterResults":{"csam":{"csamFilterFilterResult":{"executionState":"EXECUTION_SUCCESS","matchState":"NO_MATCH_FOUND"}}}}}"#,
        );
        let v = verdict_of(&clean, &ask(true), 1, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.said, Said::Allow);
        assert!(v.vars.contains(&(
            "SanitizeUserPrompt.p.csamFilterFilterResult.matchState".into(),
            "NO_MATCH_FOUND".into()
        )));

        // Enum numbers, the overall state, RAI: a block with a bounded category.
        let rai = result(
            r#"{"sanitizationResult":{"filterMatchState":2,"invocationResult":1,
            "filterResults":{"rai":{"raiFilterResult":{"executionState":1,"matchState":2}}}}}"#,
        );
        let v = verdict_of(&rai, &ask(true), 1, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.said, Said::Block);
        assert_eq!(v.categories, ["custom:model_armor_rai"]);

        // SDP de-identification: redacted parts when the separators survive...
        let deid = format!(
            r#"{{"sanitizationResult":{{"filterMatchState":"MATCH_FOUND","invocationResult":"SUCCESS",
            "filterResults":{{"sdp":{{"sdpFilterResult":{{"deidentifyResult":{{"executionState":"EXECUTION_SUCCESS",
            "matchState":"MATCH_FOUND","data":{{"text":{}}},"transformedBytes":"20","infoTypes":["EMAIL_ADDRESS"]}}}}}}}}}}}}"#,
            serde_json::to_string(&format!("hi{PART_SEPARATOR}mail [EMAIL_ADDRESS]"))
                .unwrap_or_default()
        );
        let r = result(&deid);
        let v = verdict_of(&r, &ask(true), 2, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v.said,
            Said::Redact(vec!["hi".into(), "mail [EMAIL_ADDRESS]".into()])
        );
        assert_eq!(v.categories, ["email"]);
        // ... blocked when they do not, when redaction is off, or nowhere to put it.
        assert_eq!(
            verdict_of(&r, &ask(true), 3, true).map(|v| v.said),
            Ok(Said::Block)
        );
        assert_eq!(
            verdict_of(&r, &ask(true), 2, false).map(|v| v.said),
            Ok(Said::Block)
        );
        assert_eq!(
            verdict_of(&r, &ask(false), 2, true).map(|v| v.said),
            Ok(Said::Block)
        );

        // FAILURE, and PARTIAL without a match, cannot vouch for the text.
        let failed = result(r#"{"sanitizationResult":{"invocationResult":"FAILURE"}}"#);
        assert!(verdict_of(&failed, &ask(true), 1, true).is_err());
        let partial = result(
            r#"{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND","invocationResult":"PARTIAL"}}"#,
        );
        assert!(verdict_of(&partial, &ask(true), 1, true).is_err());
        let partial_match = result(
            r#"{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","invocationResult":"PARTIAL",
            "filterResults":{"pi_and_jailbreak":{"piAndJailbreakFilterResult":{"matchState":"MATCH_FOUND","confidenceLevel":"HIGH"}}}}}"#,
        );
        let v = verdict_of(&partial_match, &ask(true), 1, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (v.said, v.categories),
            (Said::Block, vec!["prompt_injection".to_string()])
        );
    }

    /// A guard answering `answer` (status, body) to every request, after `delay`.
    async fn fake_guard(status: u16, answer: &'static str, delay: Duration) -> hyper::Uri {
        let app = axum::Router::new().fallback(move || async move {
            tokio::time::sleep(delay).await;
            (
                axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
                [("content-type", "application/json")],
                answer,
            )
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        format!("http://{addr}/guard")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn guards(url: hyper::Uri, fail_open: bool, on_match: OnMatch) -> ExternalGuards {
        ExternalGuards {
            guards: vec![ExternalGuard {
                client: Client::Http(HttpGuard {
                    url,
                    headers: Vec::new(),
                    http: HttpClient::new(),
                }),
                timeout: Duration::from_millis(300),
                fail_open,
                on_match,
            }],
            streams: StreamPolicy::Block,
        }
    }

    #[tokio::test]
    async fn http_guard_answers_map_to_decisions() {
        let parts = || vec!["a".to_string(), "b".to_string()];
        let run = |status, answer, delay, open, on| async move {
            let g = guards(fake_guard(status, answer, delay).await, open, on);
            g.check(&ask(true), parts()).await
        };
        let d = run(
            200,
            r#"{"action":"allow"}"#,
            Duration::ZERO,
            false,
            OnMatch::Block,
        )
        .await;
        assert_eq!((d.end, d.matched), (End::Pass, false));
        let d = run(
            200,
            r#"{"action":"redact","categories":["pii"],"parts":["[X]","b"]}"#,
            Duration::ZERO,
            false,
            OnMatch::Block,
        )
        .await;
        assert_eq!(d.end, End::Pass);
        assert_eq!(d.parts, Some(vec!["[X]".to_string(), "b".to_string()]));
        assert_eq!(d.action, Some(super::super::Action::Redact));
        let d = run(
            200,
            r#"{"action":"block","categories":["t"]}"#,
            Duration::ZERO,
            false,
            OnMatch::Log,
        )
        .await;
        assert_eq!(
            (d.end, d.action),
            (End::Pass, Some(super::super::Action::Log))
        );
        let d = run(
            200,
            r#"{"action":"block"}"#,
            Duration::ZERO,
            false,
            OnMatch::Block,
        )
        .await;
        assert_eq!(d.end, End::Block { guard: "http" });
        assert_eq!(d.categories, ["http_guard"]);
        // Protocol errors, statuses and timeouts fail closed, or open when configured.
        for (status, answer, delay, outcome) in [
            (
                200,
                r#"{"action":"redact","parts":["only one"]}"#,
                Duration::ZERO,
                "error",
            ),
            (200, r#"{"action":"maybe"}"#, Duration::ZERO, "error"),
            (200, "not json", Duration::ZERO, "error"),
            (500, r#"{"action":"allow"}"#, Duration::ZERO, "error"),
            (
                200,
                r#"{"action":"allow"}"#,
                Duration::from_secs(2),
                "timeout",
            ),
        ] {
            let d = run(status, answer, delay, false, OnMatch::Block).await;
            assert_eq!(
                d.end,
                End::Failed {
                    guard: "http",
                    outcome
                },
                "{answer}"
            );
            let d = run(status, answer, delay, true, OnMatch::Block).await;
            assert_eq!(d.end, End::Pass, "{answer}");
            assert!(d
                .vars
                .contains(&("http.skipped".into(), "true".into(), false)));
        }
    }

    #[test]
    fn categories_from_elsewhere_are_bounded() {
        use serde_json::json;
        assert_eq!(clean_category(&json!("toxicity")), Some("toxicity".into()));
        assert_eq!(
            clean_category(&json!("pii:email")),
            Some("pii:email".into())
        );
        assert_eq!(clean_category(&json!("jane doe@example.com")), None);
        assert_eq!(clean_category(&json!("x".repeat(65))), None);
        assert_eq!(clean_category(&json!(3)), None);
        assert_eq!(clean_category(&json!("")), None);
    }

    #[test]
    fn parse_errors_never_quote_the_answer() {
        let e = serde_json::from_str::<HttpAnswer>(r#"{"action": 5, "text": "secret value"}"#)
            .err()
            .map(|e| answer_error("not a guard answer", &e));
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("line 1"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        assert_eq!(
            ExternalError::Timeout(Duration::from_secs(1)).outcome(),
            "timeout"
        );
        assert_eq!(ExternalError::Status(500).outcome(), "error");
    }
}
