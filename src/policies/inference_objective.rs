//! `InferenceObjective`: tells the inference gateway's endpoint picker (EPP, llm-d) how to
//! schedule the request — its objective (an `InferenceObjective` object, which carries the
//! priority), its fairness id (the tenant whose share it draws from) and optionally its
//! latency targets — from the verified app and API product, never from the client.
//!
//! ```yaml
//! spec:
//!   type: InferenceObjective
//!   # each: a template or a list of them; the first that renders a non-empty value wins
//!   objective: ["{app.attributes.inference-objective}", "{apiproduct.attributes.inference-objective}"]
//!   fairnessId: ["{app.attributes.inference-fairness-id}", "{app.name}"]
//!   sloTtftMs: ["{app.attributes.slo-ttft-ms}", "{apiproduct.attributes.slo-ttft-ms}"]
//!   sloTpotMs: ["{app.attributes.slo-tpot-ms}", "{apiproduct.attributes.slo-tpot-ms}"]
//!   modelName: true   # X-Gateway-Model-Name from the request's model (needs the body)
//! ```
//!
//! Headers (the picker reads the new llm-d names and still accepts the old ones; both are
//! set): `x-llm-d-inference-objective` + `x-gateway-inference-objective`,
//! `x-llm-d-inference-fairness-id` + `x-gateway-inference-fairness-id`, `x-llm-d-slo-ttft-ms`,
//! `x-llm-d-slo-tpot-ms`, and `x-gateway-model-name`.
//!
//! Every one of them is owned ([`Policy::owned_request_headers`]): the client's values are
//! removed before the first step runs, so a batch consumer cannot claim a latency-critical
//! objective or another tenant's fairness id, even when this step is skipped by its
//! condition, fails, or renders nothing (then the picker applies its defaults). The model
//! rewrite headers (`x-llm-d-model-name-rewrite`, `x-gateway-model-name-rewrite`) are owned
//! too and never set: a client naming a rewrite would be served a model other than the one
//! its key was checked for. A value that is not well formed (an objective that is not a
//! Kubernetes object name, an SLO that is not a number of milliseconds) is not sent, with
//! one warning per policy.
//!
//! The picker's own headers and metadata (`x-gateway-destination-endpoint*`, `envoy.lb`)
//! are never named: the picker sets them after tollgate, and nothing here may pre-empt it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, valid_header_value, BuildContext, SpecError};
use crate::expr::Template;
use crate::pipeline::{Direction, Hook, Hooks, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "InferenceObjective";

pub const OBJECTIVE: [&str; 2] = [
    "x-llm-d-inference-objective",
    "x-gateway-inference-objective",
];
pub const FAIRNESS_ID: [&str; 2] = [
    "x-llm-d-inference-fairness-id",
    "x-gateway-inference-fairness-id",
];
pub const SLO_TTFT: &str = "x-llm-d-slo-ttft-ms";
pub const SLO_TPOT: &str = "x-llm-d-slo-tpot-ms";
pub const MODEL_NAME: &str = "x-gateway-model-name";
pub const MODEL_REWRITE: [&str; 2] = ["x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"];

/// Longest fairness id or model name sent (the picker keys queues by the id).
const MAX_VALUE_LEN: usize = 256;
/// Longest SLO accepted: one hour.
const MAX_SLO_MS: u64 = 3_600_000;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    objective: Option<OneOrMany>,
    #[serde(default)]
    fairness_id: Option<OneOrMany>,
    #[serde(default)]
    slo_ttft_ms: Option<OneOrMany>,
    #[serde(default)]
    slo_tpot_ms: Option<OneOrMany>,
    #[serde(default = "yes")]
    model_name: bool,
}

fn yes() -> bool {
    true
}

/// What a rendered value must look like to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A Kubernetes object name (DNS-1123 subdomain): the `InferenceObjective` it names.
    ObjectName,
    /// Visible ASCII, at most [`MAX_VALUE_LEN`] bytes.
    Token,
    /// Milliseconds, 1 to [`MAX_SLO_MS`].
    Millis,
}

/// One value the step sends: the first non-empty rendering of `sources`, checked as
/// `kind`, to every header of `headers`.
#[derive(Debug)]
struct Field {
    name: &'static str,
    sources: Vec<Template>,
    kind: Kind,
    headers: &'static [&'static str],
    warned: AtomicBool,
}

#[derive(Debug)]
struct InferenceObjective {
    fields: Vec<Field>,
    model_name: bool,
    warned_model: AtomicBool,
    prefix: String,
}

fn templates(
    field: &'static str,
    given: Option<OneOrMany>,
    default: &[&str],
) -> Result<Vec<Template>, SpecError> {
    let sources = given.map_or_else(
        || default.iter().map(|s| (*s).to_owned()).collect(),
        OneOrMany::into_vec,
    );
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Template::compile(s).map_err(|e| SpecError::new(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let field = |name, sources, kind, headers| Field {
        name,
        sources,
        kind,
        headers,
        warned: AtomicBool::new(false),
    };
    let fields = vec![
        field(
            "objective",
            templates(
                "objective",
                spec.objective,
                &[
                    "{app.attributes.inference-objective}",
                    "{apiproduct.attributes.inference-objective}",
                ],
            )?,
            Kind::ObjectName,
            &OBJECTIVE[..],
        ),
        field(
            "fairnessId",
            templates(
                "fairnessId",
                spec.fairness_id,
                &["{app.attributes.inference-fairness-id}", "{app.name}"],
            )?,
            Kind::Token,
            &FAIRNESS_ID[..],
        ),
        field(
            "sloTtftMs",
            templates(
                "sloTtftMs",
                spec.slo_ttft_ms,
                &[
                    "{app.attributes.slo-ttft-ms}",
                    "{apiproduct.attributes.slo-ttft-ms}",
                ],
            )?,
            Kind::Millis,
            std::slice::from_ref(&SLO_TTFT),
        ),
        field(
            "sloTpotMs",
            templates(
                "sloTpotMs",
                spec.slo_tpot_ms,
                &[
                    "{app.attributes.slo-tpot-ms}",
                    "{apiproduct.attributes.slo-tpot-ms}",
                ],
            )?,
            Kind::Millis,
            std::slice::from_ref(&SLO_TPOT),
        ),
    ];
    Ok(Arc::new(InferenceObjective {
        fields,
        model_name: spec.model_name,
        warned_model: AtomicBool::new(false),
        prefix: ctx.name.clone(),
    }))
}

/// A DNS-1123 subdomain: lower-case letters, digits, `-` and `.`, starting and ending with
/// a letter or digit, at most 253 characters.
fn is_object_name(s: &str) -> bool {
    let b = s.as_bytes();
    let end = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 253
        && b.first().is_some_and(end)
        && b.last().is_some_and(end)
        && b.iter().all(|c| end(c) || *c == b'-' || *c == b'.')
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_VALUE_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The value to send for `kind`, or `None` when `s` is not one.
fn checked(kind: Kind, s: &str) -> Option<String> {
    let s = s.trim();
    match kind {
        Kind::ObjectName => is_object_name(s).then(|| s.to_owned()),
        Kind::Token => is_token(s).then(|| s.to_owned()),
        Kind::Millis => {
            if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = s.parse().ok()?;
            (1..=MAX_SLO_MS).contains(&n).then(|| n.to_string())
        }
    }
}

/// The model the upstream will serve: the LLM view the tracker parsed (`ex.state.llm`), or
/// the same parse of the exchange's shared JSON body ([`crate::llm::request::parse_request_json`])
/// when no tracker ran. A body naming `model` twice names none (servers differ on which
/// one counts).
pub fn request_model(ex: &Exchange) -> Option<String> {
    if let Some(r) = &ex.state.llm {
        return r.model.clone();
    }
    let uri = ex.request.uri.as_str();
    let endpoint = crate::llm::detect(ex.request.method.as_str(), uri, |n| {
        ex.request.headers.get(n)
    })?;
    let body = ex.body_json(Direction::Request);
    match body.as_deref() {
        Some(b) if b.duplicate_keys.iter().any(|k| k == "model") => None,
        Some(crate::vars::state::JsonBody { value: Ok(v), .. }) => {
            crate::llm::request::parse_request_json(&endpoint, v)
                .ok()
                .and_then(|r| r.model)
        }
        // No body, or not JSON: only the path can name it.
        _ => endpoint.path_model,
    }
}

impl InferenceObjective {
    fn apply(&self, ex: &mut Exchange) {
        for f in &self.fields {
            let rendered = f
                .sources
                .iter()
                .map(|t| t.render(ex))
                .find(|v| !v.trim().is_empty());
            let value = match rendered {
                Some(r) => {
                    let v = checked(f.kind, &r);
                    if v.is_none() && !f.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            policy = %self.prefix,
                            field = f.name,
                            value = %r.escape_debug(),
                            "rendered value is not well formed; header not sent (the picker's default applies)"
                        );
                    }
                    v
                }
                None => None,
            };
            for h in f.headers {
                match &value {
                    Some(v) => ex.set_header(Direction::Request, h, v.clone()),
                    // This step's header: nothing from before it survives.
                    None => ex.remove_header(Direction::Request, h),
                }
            }
        }
        if self.model_name {
            let model = request_model(ex);
            match model.filter(|m| m.len() <= MAX_VALUE_LEN && valid_header_value(m)) {
                Some(m) => ex.set_header(Direction::Request, MODEL_NAME, m),
                None => {
                    if !self.warned_model.swap(true, Ordering::Relaxed) {
                        tracing::debug!(policy = %self.prefix, "request names no usable model; X-Gateway-Model-Name not sent");
                    }
                    ex.remove_header(Direction::Request, MODEL_NAME);
                }
            }
        }
    }
}

impl Policy for InferenceObjective {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    /// The model header is read from the body (OpenAI, Anthropic).
    fn needs_body(&self, dir: Direction) -> bool {
        self.model_name && dir == Direction::Request
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: self.model_name,
            ..Hooks::default()
        }
    }

    fn owned_request_headers(&self) -> Vec<String> {
        let mut owned: Vec<String> = self
            .fields
            .iter()
            .flat_map(|f| f.headers.iter())
            .chain(MODEL_REWRITE.iter())
            .map(|h| (*h).to_owned())
            .collect();
        if self.model_name {
            owned.push(MODEL_NAME.to_owned());
        }
        owned
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        if dir == Direction::Request {
            self.apply(ex);
        }
        Hook::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{hash_key, ApiKey, ApiProduct, App, KeyStatus, Operation, Origin};
    use crate::services::Services;
    use crate::vars::{Headers, RequestInfo};

    fn services() -> Services {
        let s = Services::default();
        let product = |name: &str, attrs: &[(&str, &str)]| ApiProduct {
            name: name.into(),
            description: String::new(),
            operations: vec![Operation {
                path: "/**".into(),
                methods: vec![],
                models: vec![],
                ..Default::default()
            }],
            quota: None,
            llm_token_quota: None,
            approval_type: Default::default(),
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            origin: Origin::File,
            revision: 0,
        };
        let app = |name: &str, product: &str, secret: &str, attrs: &[(&str, &str)]| App {
            name: name.into(),
            developer_email: format!("{name}@example.com"),
            status: Default::default(),
            products: vec![product.into()],
            keys: vec![ApiKey {
                id: format!("{name}-key"),
                hash: hash_key(secret),
                status: KeyStatus::Approved,
                expires_at: None,
                created_at: 0,
            }],
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            origin: Origin::File,
            revision: 0,
        };
        s.consumers.set_file_objects(
            vec![
                product(
                    "interactive",
                    &[
                        ("inference-objective", "latency-critical"),
                        ("slo-ttft-ms", "500"),
                        ("slo-tpot-ms", "50"),
                    ],
                ),
                product(
                    "batch",
                    &[
                        ("inference-objective", "Not A Name"),
                        ("slo-ttft-ms", "soon"),
                    ],
                ),
            ],
            vec![
                app("chat-app", "interactive", "chat-key-0123456789", &[]),
                app(
                    "nightly",
                    "batch",
                    "batch-key-0123456789",
                    &[("inference-fairness-id", "tenant-b")],
                ),
            ],
        );
        s
    }

    fn build_in(s: &Services, name: &str, yaml: &str) -> Arc<dyn Policy> {
        let ctx = BuildContext {
            name: name.into(),
            config_dir: None,
            services: s.clone(),
        };
        let spec = serde_norway::from_str(yaml).unwrap();
        if name == "vk" {
            super::super::verify_api_key::build(&ctx, spec).unwrap()
        } else {
            build(&ctx, spec).unwrap()
        }
    }

    fn ex(path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), path.into());
        for (k, v) in headers {
            h.push((*k).into(), (*v).into());
        }
        let mut e = Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        e.request_body = body.map(|b| b.as_bytes().to_vec());
        e
    }

    fn sent(e: &mut Exchange) -> Vec<(String, String)> {
        let m = e.take_mutations(Direction::Request);
        let mut set: Vec<_> = m.set.into_iter().map(|(n, v, _)| (n, v)).collect();
        set.sort();
        set
    }

    fn ready(h: Hook<'_>) {
        match h {
            Hook::Ready(o) => assert!(o.is_continue(), "{o:?}"),
            Hook::Pending(_) => panic!("synchronous"),
        }
    }

    #[test]
    fn headers_from_the_product_and_app() {
        let s = services();
        let vk = build_in(&s, "vk", "{}");
        let io = build_in(&s, "io", "{}");
        assert!(io.needs_body(Direction::Request));
        assert!(io.hooks().llm);
        let mut e = ex(
            "/v1/chat/completions",
            &[("x-api-key", "chat-key-0123456789")],
            Some(r#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}]}"#),
        );
        ready(vk.run(&mut e, Direction::Request));
        ready(io.run(&mut e, Direction::Request));
        let want: Vec<(String, String)> = [
            ("x-gateway-inference-fairness-id", "chat-app"),
            ("x-gateway-inference-objective", "latency-critical"),
            ("x-gateway-model-name", "llama-3-8b"),
            ("x-llm-d-inference-fairness-id", "chat-app"),
            ("x-llm-d-inference-objective", "latency-critical"),
            ("x-llm-d-slo-tpot-ms", "50"),
            ("x-llm-d-slo-ttft-ms", "500"),
        ]
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
        assert_eq!(sent(&mut e), want);

        // The batch app: its own fairness id; the product's malformed objective and SLO
        // are not sent, and the headers are removed rather than left to the client.
        let mut e = ex(
            "/v1beta/models/gemini-2.0-flash:generateContent",
            &[("x-api-key", "batch-key-0123456789")],
            Some(r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#),
        );
        ready(vk.run(&mut e, Direction::Request));
        ready(io.run(&mut e, Direction::Request));
        let m = e.take_mutations(Direction::Request);
        let set: Vec<_> = m
            .set
            .iter()
            .map(|(n, v, _)| (n.as_str(), v.as_str()))
            .collect();
        assert!(
            set.contains(&("x-llm-d-inference-fairness-id", "tenant-b")),
            "{set:?}"
        );
        assert!(
            set.contains(&("x-gateway-model-name", "gemini-2.0-flash")),
            "{set:?}"
        );
        for h in [OBJECTIVE[0], OBJECTIVE[1], SLO_TTFT, SLO_TPOT] {
            assert!(m.remove.iter().any(|r| r == h), "{h} removed: {m:?}");
            assert!(!set.iter().any(|(n, _)| *n == h), "{h} not set");
        }
    }

    /// Every header the step sends is owned (the flow takes the client's values out before
    /// any step), the model rewrite too; the picker's destination headers never are, and
    /// no run ever names them.
    #[test]
    fn owns_its_headers_and_never_the_pickers() {
        let s = services();
        let io = build_in(&s, "io", "{}");
        let owned = io.owned_request_headers();
        for h in [
            "x-llm-d-inference-objective",
            "x-gateway-inference-objective",
            "x-llm-d-inference-fairness-id",
            "x-gateway-inference-fairness-id",
            "x-llm-d-slo-ttft-ms",
            "x-llm-d-slo-tpot-ms",
            "x-gateway-model-name",
            "x-llm-d-model-name-rewrite",
            "x-gateway-model-name-rewrite",
        ] {
            assert!(owned.iter().any(|o| o == h), "{h}");
        }
        let without_model = build_in(&s, "io2", "{modelName: false}");
        assert!(!without_model.needs_body(Direction::Request));
        assert!(!without_model
            .owned_request_headers()
            .iter()
            .any(|h| h == MODEL_NAME));
        let mut e = ex(
            "/v1/chat/completions",
            &[
                ("x-gateway-destination-endpoint", "10.0.0.9:8000"),
                ("x-gateway-destination-endpoint-subset", "10.0.0.9:8000"),
                ("x-llm-d-inference-objective", "forged"),
            ],
            Some(r#"{"model":"m"}"#),
        );
        ready(io.run(&mut e, Direction::Request));
        let m = e.take_mutations(Direction::Request);
        for name in m.set.iter().map(|(n, _, _)| n).chain(m.remove.iter()) {
            assert!(
                !name.starts_with("x-gateway-destination-endpoint"),
                "{name}"
            );
        }
        for name in owned {
            assert!(
                !name.starts_with("x-gateway-destination-endpoint"),
                "{name}"
            );
        }
        assert_eq!(
            e.request.headers.get("x-gateway-destination-endpoint"),
            Some("10.0.0.9:8000")
        );
    }

    #[test]
    fn configured_sources_and_checks() {
        let s = services();
        let io = build_in(
            &s,
            "io",
            r#"{objective: ["{request.header.x-tier}", "standard"], fairnessId: "{request.header.x-tenant}", sloTtftMs: [], sloTpotMs: "250", modelName: false}"#,
        );
        let mut e = ex("/v1/chat/completions", &[("x-tenant", "team a")], None);
        ready(io.run(&mut e, Direction::Request));
        let set = sent(&mut e);
        assert!(set.contains(&("x-llm-d-inference-objective".into(), "standard".into())));
        assert!(set.contains(&("x-llm-d-slo-tpot-ms".into(), "250".into())));
        // A space makes no fairness id.
        assert!(!set.iter().any(|(n, _)| n.contains("fairness")), "{set:?}");
        assert!(!set.iter().any(|(n, _)| n == SLO_TTFT));
        let mut e = ex("/v1/chat/completions", &[("x-tier", "sheddable")], None);
        ready(io.run(&mut e, Direction::Request));
        assert!(
            sent(&mut e).contains(&("x-gateway-inference-objective".into(), "sheddable".into()))
        );

        for (kind, input, want) in [
            (Kind::ObjectName, "a.b-c", Some("a.b-c")),
            (Kind::ObjectName, "-a", None),
            (Kind::ObjectName, "A", None),
            (Kind::ObjectName, "a_b", None),
            (Kind::Token, "tenant:1", Some("tenant:1")),
            (Kind::Token, "a\u{1}", None),
            (Kind::Millis, " 0250 ", Some("250")),
            (Kind::Millis, "0", None),
            (Kind::Millis, "3600001", None),
            (Kind::Millis, "99999999999999999999", None),
            (Kind::Millis, "-5", None),
        ] {
            assert_eq!(checked(kind, input).as_deref(), want, "{kind:?} {input:?}");
        }
        assert!(!is_token(&"x".repeat(MAX_VALUE_LEN + 1)));
        let ctx = BuildContext::default();
        assert!(build(&ctx, serde_norway::from_str("{priority: 1}").unwrap()).is_err());
    }

    /// The model as the upstream reads it: the body's for OpenAI and Anthropic, the path's
    /// for Gemini; nothing for a body naming it twice or a body that is not JSON.
    #[test]
    fn the_model_header_follows_the_request() {
        let model = |path: &str, body: Option<&str>| request_model(&ex(path, &[], body));
        assert_eq!(
            model(
                "/v1/messages",
                Some(r#"{"model":"claude-x","max_tokens":5,"messages":[]}"#)
            )
            .as_deref(),
            Some("claude-x")
        );
        assert_eq!(
            model(
                "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                Some("{}")
            )
            .as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            model(
                "/v1beta/models/gemini-2.5-pro:generateContent",
                Some("not json")
            )
            .as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            model("/v1/chat/completions", Some(r#"{"model":"a","model":"b"}"#)),
            None
        );
        assert_eq!(model("/v1/chat/completions", Some("not json")), None);
        assert_eq!(model("/not/llm", Some(r#"{"model":"a"}"#)), None);
        // The tracker's view wins when present.
        let mut e = ex("/v1/chat/completions", &[], Some(r#"{"model":"a"}"#));
        let mut parsed = crate::llm::parse_request(
            &crate::llm::detect("POST", "/v1/chat/completions", |_| None).unwrap(),
            br#"{"model":"from-tracker"}"#,
        )
        .unwrap();
        parsed.model = Some("from-tracker".into());
        e.state.llm = Some(Arc::new(parsed));
        assert_eq!(request_model(&e).as_deref(), Some("from-tracker"));
        // A model that cannot be a header value is not sent.
        let s = services();
        let io = build_in(&s, "io", "{}");
        let mut e = ex(
            "/v1/chat/completions",
            &[("x-gateway-model-name", "forged")],
            Some(r#"{"model":"bad\nmodel"}"#),
        );
        ready(io.run(&mut e, Direction::Request));
        let m = e.take_mutations(Direction::Request);
        assert!(m.remove.iter().any(|h| h == MODEL_NAME), "{m:?}");
        assert!(!m.set.iter().any(|(h, _, _)| h == MODEL_NAME), "{m:?}");
    }
}
