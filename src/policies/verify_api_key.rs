//! `VerifyApiKey`: only known consumers get through, each to the operations its products
//! allow. The chain key → app → products → operation is checked against the in-memory
//! consumer index (never the store), so revocation applies as soon as the index is rebuilt.
//!
//! ```yaml
//! spec:
//!   type: VerifyApiKey
//!   keyFrom: [{header: x-api-key}, {query: apikey}]   # default: header x-api-key
//!   # or: keyFrom: [{preset: llm-sdks}]  (Authorization: Bearer, x-api-key,
//!   #     x-goog-api-key, ?key=: where the OpenAI, Anthropic and Gemini SDKs send it)
//!   stripKey: true          # the upstream never sees the key: the key headers are the
//!                           # flow's (removed before any step), a query key is cut out
//!   identityHeaders:        # tell the upstream who called
//!     app: x-tollgate-app
//!     clientId: x-tollgate-client-id
//!     product: x-tollgate-product
//!     developer: x-tollgate-developer
//!   model: "{llm.model}"    # matched against products' model lists (default)
//!   modelFromBody: true     # run on the request body, read its top-level JSON `model`
//! ```
//!
//! Every configured source is read: the same key in several places is one key, two
//! different keys are refused (`oauth.v2.InvalidApiKey`, "different API keys sent in …"),
//! so no reader downstream can pick the other one. A header source may name a `scheme`
//! (`{header: authorization, scheme: Bearer}`): only a value `<scheme> <key>` (scheme
//! matched case-insensitively) is a key there; another scheme (`Basic …`) is not this
//! policy's credential and stays. `{header: authorization}` without a scheme strips a
//! leading `Bearer ` and otherwise reads the whole value, as before.
//!
//! Products whose operations list `models` are checked against every model the request
//! names ([`VerifyApiKey::request_models`]): the body's top-level JSON `model` (when the step
//! runs with the body: it comes after a step that needs the body, or `modelFromBody: true`
//! asks for it), a Gemini/Vertex path's `models/{model}:method`, and the `model` template's
//! value in addition. A body that may follow unread leaves the template alone deciding nothing, so
//! a header cannot stand in for a body naming another model. With no model known such a
//! request is refused with `oauth.v2.InvalidApiKeyForGivenResource` and a message saying
//! the model is unknown, and a warning names the fix.
//!
//! On success it sets `client_id`, `app.name`, `developer.email`, `apiproduct.name`,
//! `apiproduct.quota.{limit,interval,timeunit}`, `apiproduct.llmquota.{...}`,
//! `app.attributes.<k>`, `apiproduct.attributes.<k>`, and the same under
//! `verifyapikey.<policy>.` as Apigee does; also Apigee's spellings `app.<k>`,
//! `apiproduct.<k>` (custom attributes), `apiproduct.developer.llmQuota.*`,
//! `developer.app.name`, `status`, `issued_at`, `expires_at` (-1: never). Developer
//! details tollgate does not hold (`developer.id`, `developer.firstName`, ...) are unset.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::{check_header_name, parse_spec, BuildContext, SpecError};
use std::borrow::Cow;

use crate::consumer::index::Refusal;
use crate::consumer::service::Consumers;
use crate::expr::Template;
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Policy};
use crate::vars::state::JsonBody;
use crate::vars::Exchange;

pub const TYPE: &str = "VerifyApiKey";

/// Longest key accepted; anything longer is refused without hashing.
const MAX_KEY_LEN: usize = 512;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    key_from: Vec<KeyFromSpec>,
    #[serde(default)]
    strip_key: bool,
    #[serde(default)]
    identity_headers: IdentityHeaders,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    model_from_body: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFromSpec {
    #[serde(default)]
    header: Option<String>,
    /// With `header`: the scheme before the key (`Bearer`).
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    template: Option<String>,
    /// A named list of sources: `llm-sdks`.
    #[serde(default)]
    preset: Option<String>,
}

/// The preset where the official LLM SDKs send a key: OpenAI (`Authorization: Bearer`),
/// Anthropic (`x-api-key`), Gemini (`x-goog-api-key`, or `?key=` in REST examples).
pub const PRESET_LLM_SDKS: &str = "llm-sdks";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IdentityHeaders {
    app: Option<String>,
    client_id: Option<String>,
    product: Option<String>,
    developer: Option<String>,
}

#[derive(Debug)]
enum KeyFrom {
    Header {
        name: String,
        scheme: Scheme,
    },
    Query(String),
    /// The template and its source text.
    Template(Template, String),
}

/// What precedes the key in a header value.
#[derive(Debug, Clone, PartialEq)]
enum Scheme {
    /// The whole value is the key.
    None,
    /// `<scheme> <key>` only; a value with another scheme holds no key for this policy.
    Required(String),
    /// `{header: authorization}` as it always read: `Bearer <key>` or the bare key.
    OptionalBearer,
}

impl KeyFrom {
    /// Where the key was found, for messages.
    fn describe(&self) -> String {
        match self {
            KeyFrom::Header { name, .. } => name.clone(),
            KeyFrom::Query(q) => format!("?{q}="),
            KeyFrom::Template(_, src) => format!("template `{src}`"),
        }
    }
}

#[derive(Debug)]
struct VerifyApiKey {
    key_from: Vec<KeyFrom>,
    strip_key: bool,
    identity: Vec<(String, Identity)>,
    model: Template,
    model_from_body: bool,
    /// Set once the "model unknown" warning was logged (one line per policy, not per request).
    warned_model: std::sync::atomic::AtomicBool,
    consumers: Arc<Consumers>,
    /// Variable names, built once: plain and `verifyapikey.<policy>.`-prefixed.
    /// `verifyapikey.<policy>.`
    prefix: Arc<str>,
}

#[derive(Debug, Clone, Copy)]
enum Identity {
    App,
    ClientId,
    Product,
    Developer,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let mut key_from = Vec::new();
    for (i, k) in spec.key_from.into_iter().enumerate() {
        let at = format!("keyFrom[{i}]");
        if k.scheme.is_some() && k.header.is_none() {
            return Err(SpecError::new(at, "`scheme` goes with `header`"));
        }
        match (k.header, k.query, k.template, k.preset) {
            (Some(h), None, None, None) => {
                let name = check_header_name(&h).map_err(|m| SpecError::new(&at, m))?;
                let scheme = match k.scheme {
                    Some(s) if s.is_empty() => Scheme::None,
                    Some(s) if s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
                        Scheme::Required(s)
                    }
                    Some(_) => {
                        return Err(SpecError::new(at, "`scheme` must be one word (`Bearer`)"))
                    }
                    None if name == "authorization" => Scheme::OptionalBearer,
                    None => Scheme::None,
                };
                key_from.push(KeyFrom::Header { name, scheme });
            }
            (None, Some(q), None, None) if !q.is_empty() => key_from.push(KeyFrom::Query(q)),
            (None, None, Some(t), None) => key_from.push(KeyFrom::Template(
                Template::compile(&t).map_err(|e| SpecError::new(&at, e.to_string()))?,
                t,
            )),
            (None, None, None, Some(p)) if p == PRESET_LLM_SDKS => {
                key_from.push(KeyFrom::Header {
                    name: "authorization".into(),
                    scheme: Scheme::Required("Bearer".into()),
                });
                for h in ["x-api-key", "x-goog-api-key"] {
                    key_from.push(KeyFrom::Header {
                        name: h.into(),
                        scheme: Scheme::None,
                    });
                }
                key_from.push(KeyFrom::Query("key".into()));
            }
            (None, None, None, Some(p)) => {
                return Err(SpecError::new(
                    at,
                    format!("unknown preset `{p}` (known: {PRESET_LLM_SDKS})"),
                ))
            }
            _ => {
                return Err(SpecError::new(
                    at,
                    "give exactly one of header, query, template, preset",
                ))
            }
        }
    }
    // The same source twice would only read one place twice.
    let mut seen = std::collections::HashSet::new();
    for k in &key_from {
        let id = match k {
            KeyFrom::Header { name, .. } => format!("h:{name}"),
            KeyFrom::Query(q) => format!("q:{q}"),
            KeyFrom::Template(_, src) => format!("t:{src}"),
        };
        if !seen.insert(id) {
            return Err(SpecError::new(
                "keyFrom",
                format!("{} is listed twice", k.describe()),
            ));
        }
    }
    if key_from.is_empty() {
        key_from.push(KeyFrom::Header {
            name: "x-api-key".into(),
            scheme: Scheme::None,
        });
    }
    let mut identity = Vec::new();
    let ih = spec.identity_headers;
    for (field, v, which) in [
        ("app", ih.app, Identity::App),
        ("clientId", ih.client_id, Identity::ClientId),
        ("product", ih.product, Identity::Product),
        ("developer", ih.developer, Identity::Developer),
    ] {
        if let Some(h) = v {
            let h = check_header_name(&h)
                .map_err(|m| SpecError::new(format!("identityHeaders.{field}"), m))?;
            identity.push((h, which));
        }
    }
    let model = Template::compile(spec.model.as_deref().unwrap_or("{llm.model}"))
        .map_err(|e| SpecError::new("model", e.to_string()))?;
    Ok(Arc::new(VerifyApiKey {
        key_from,
        strip_key: spec.strip_key,
        identity,
        model,
        model_from_body: spec.model_from_body,
        warned_model: Default::default(),
        consumers: ctx.services.consumers.clone(),
        prefix: format!("verifyapikey.{}.", ctx.name).into(),
    }))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn unauthorized(code: &str, message: &str) -> Fault {
    Fault::new(401, code, message)
}

/// The key and the sources (indexes into `key_from`) that carried it, or the fault for a
/// missing or ambiguous one.
enum Found<'a> {
    Key(Cow<'a, str>, Vec<usize>),
    Missing,
    Twice,
    /// Two sources carried different keys (their indexes).
    Different(usize, usize),
}

/// The key in a header value read with `scheme`; `None` when the value holds no key for
/// this policy (another scheme).
fn strip_scheme<'v>(value: &'v str, scheme: &Scheme) -> Option<&'v str> {
    let v = value.trim();
    let with = |s: &str| {
        let (got, rest) = v.split_once(' ')?;
        got.eq_ignore_ascii_case(s).then(|| rest.trim())
    };
    match scheme {
        Scheme::None => Some(v),
        Scheme::Required(s) => with(s),
        Scheme::OptionalBearer => Some(with("Bearer").unwrap_or(v)),
    }
}

impl VerifyApiKey {
    /// The models the request names, as the upstream reads them: the `model` template's
    /// value, the model in a Gemini/Vertex path (`.../models/{model}:generateContent`) and
    /// the top-level JSON `model` of the body, each once, in that order. When a body may
    /// follow that this step has not read (it runs on the headers, or the body was cut at
    /// Envoy's buffer limit) and the path names no model, the template cannot stand in for
    /// the body: no model is known, and a product that lists models refuses.
    fn request_models(&self, ex: &Exchange) -> Vec<String> {
        let mut models: Vec<String> = Vec::new();
        let mut push = |m: String| {
            if !m.is_empty() && !models.contains(&m) {
                models.push(m);
            }
        };
        let path = path_model(ex.request.path());
        // The variable lookup only for a body that was read (it is set only then).
        let body_unread = match ex.request_body {
            None => !ex.request_without_body,
            Some(_) => ex
                .lookup("request.body.truncated")
                .is_some_and(|v| v == "true"),
        };
        if body_unread && path.is_none() {
            return models;
        }
        push(self.model.render(ex));
        if let Some(m) = path {
            push(m);
        }
        if let Some(m) = ex
            .body_json(Direction::Request)
            .as_deref()
            .and_then(body_model)
        {
            push(m);
        }
        // The LLM view an earlier step's tracker parsed (`Hooks::llm`): the same body and
        // path, read as the upstream's API reads them.
        if let Some(m) = ex.state.llm.as_ref().and_then(|r| r.model.clone()) {
            push(m);
        }
        models
    }

    /// Reads every source. One value per source; the same key in several sources is one
    /// key (all of them are stripped); different keys are refused.
    fn find_key<'a>(&self, ex: &'a Exchange) -> Found<'a> {
        let mut found: Option<(Cow<'a, str>, Vec<usize>)> = None;
        for (i, source) in self.key_from.iter().enumerate() {
            let value: Option<Cow<'a, str>> = match source {
                KeyFrom::Header { name, scheme } => {
                    let mut values = ex
                        .client_header_values(name)
                        .filter_map(|v| strip_scheme(v, scheme))
                        .filter(|v| !v.is_empty());
                    let first = values.next();
                    if first.is_some() && values.next().is_some() {
                        return Found::Twice;
                    }
                    first.map(Cow::Borrowed)
                }
                KeyFrom::Query(q) => {
                    let mut values =
                        crate::vars::query_pairs(ex.request.query_string()).filter(|(k, _)| k == q);
                    let first = values.next();
                    if first.is_some() && values.next().is_some() {
                        return Found::Twice;
                    }
                    first
                        .map(|(_, v)| v)
                        .filter(|v| !v.trim().is_empty())
                        .map(Cow::Owned)
                }
                KeyFrom::Template(t, _) => {
                    let v = t.render(ex);
                    (!v.trim().is_empty()).then_some(Cow::Owned(v))
                }
            };
            let Some(value) = value else { continue };
            match &mut found {
                None => found = Some((value, vec![i])),
                Some((key, at)) if key.trim() == value.trim() => at.push(i),
                Some((_, at)) => return Found::Different(at[0], i),
            }
        }
        match found {
            Some((key, at)) => Found::Key(key, at),
            None => Found::Missing,
        }
    }

    fn verify(&self, ex: &mut Exchange) -> Result<(), Fault> {
        let (key, used) = match self.find_key(ex) {
            Found::Key(k, used) => (k, used),
            Found::Missing => {
                return Err(unauthorized(
                    "oauth.v2.FailedToResolveAPIKey",
                    "Failed to resolve API Key variable",
                ))
            }
            Found::Twice => {
                return Err(unauthorized(
                    "oauth.v2.InvalidApiKey",
                    "API key sent more than once",
                ))
            }
            Found::Different(a, b) => {
                return Err(unauthorized(
                    "oauth.v2.InvalidApiKey",
                    &format!(
                        "different API keys sent in {} and {}",
                        self.key_from[a].describe(),
                        self.key_from[b].describe()
                    ),
                ))
            }
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(unauthorized(
                "oauth.v2.FailedToResolveAPIKey",
                "Failed to resolve API Key variable",
            ));
        }
        if key.len() > MAX_KEY_LEN || key.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(unauthorized("oauth.v2.InvalidApiKey", "Invalid ApiKey"));
        }
        let models = self.request_models(ex);
        let guard = self.consumers.index_guard();
        let (method, path) = (ex.request.method.as_str(), ex.request.path());
        // Every model the request names must be allowed; the last checked (the body's, else
        // the path's) decides the product.
        let mut verified = guard.verify_at(
            key,
            method,
            path,
            models.first().map(String::as_str),
            now_ms,
        );
        for m in models.iter().skip(1) {
            if verified.is_err() {
                break;
            }
            verified = guard.verify_at(key, method, path, Some(m), now_ms);
        }
        drop(guard);
        let verified = verified
            .map_err(|r| match r {
                Refusal::UnknownKey => unauthorized("oauth.v2.InvalidApiKey", "Invalid ApiKey"),
                Refusal::KeyRevoked => {
                    unauthorized("oauth.v2.ApiKeyNotApproved", "ApiKey has been revoked")
                }
                Refusal::KeyPending => {
                    unauthorized("oauth.v2.ApiKeyNotApproved", "ApiKey is not approved yet")
                }
                Refusal::KeyExpired => unauthorized(
                    "keymanagement.service.consumer_key_expired",
                    "The consumer key has expired",
                ),
                Refusal::AppRevoked => unauthorized(
                    "keymanagement.service.invalid_client-app_not_approved",
                    "The developer app is not approved",
                ),
                Refusal::NoProductForOperation => unauthorized(
                    "oauth.v2.InvalidApiKeyForGivenResource",
                    "Invalid ApiKey for given resource",
                ),
                Refusal::ModelUnknown => {
                    if !self
                        .warned_model
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            policy = %self.prefix.trim_end_matches('.'),
                            body_seen = ex.request_body.is_some(),
                            "a product allows this operation only for listed models, but the request's model is unknown: \
                             set `modelFromBody: true` on VerifyApiKey (the request body is then buffered) \
                             and send a JSON body with a top-level `model` (a `model:` template decides only \
                             for requests without a body)"
                        );
                    }
                    unauthorized(
                        "oauth.v2.InvalidApiKeyForGivenResource",
                        "Invalid ApiKey for given resource: the request's model is unknown",
                    )
                }
            })?;
        if self.strip_key {
            for source in used.iter().filter_map(|&i| self.key_from.get(i)) {
                match source {
                    // A header some step of the flow sets for the upstream (a Google token
                    // in `authorization`) was taken from the client before the first step
                    // (`claim_owned_headers`): the client's key is already gone, and
                    // removing it here would remove that step's value if it ran first.
                    KeyFrom::Header { name, .. }
                        if ex
                            .client_owned
                            .iter()
                            .any(|(n, _)| n.eq_ignore_ascii_case(name)) => {}
                    KeyFrom::Header { name, .. } => ex.remove_header(Direction::Request, name),
                    KeyFrom::Query(q) => {
                        if let Some(uri) = strip_query_param(&ex.request.uri, q) {
                            ex.set_header(Direction::Request, ":path", uri.clone());
                            ex.request.uri = uri;
                        }
                    }
                    KeyFrom::Template(..) => {}
                }
            }
        }
        for (h, which) in &self.identity {
            let v = match which {
                Identity::App => &verified.app.name,
                Identity::ClientId => &verified.key().id,
                Identity::Product => &verified.product.spec.name,
                Identity::Developer => &verified.app.developer_email,
            };
            if crate::policies::valid_header_value(v) {
                ex.set_header(Direction::Request, h, v.clone());
            } else {
                ex.remove_header(Direction::Request, h);
            }
        }
        ex.state.add_app(Arc::clone(&self.prefix), verified);
        Ok(())
    }
}

/// The top-level `model` string of a JSON request body (the OpenAI, Anthropic and
/// Vertex-style chat bodies all carry it there), from the exchange's shared parse. A body
/// naming `model` twice names none: the upstream's choice cannot be known.
fn body_model(body: &JsonBody) -> Option<String> {
    body.top_level_str("model").map(str::to_owned)
}

/// The model of a Gemini or Vertex AI path: the last segment is `{model}:{method}` and the
/// one before it `models` (`/v1beta/models/gemini-2.0-flash:generateContent`,
/// `.../publishers/google/models/gemini-1.5-pro:streamGenerateContent`), percent-decoded.
fn path_model(path: &str) -> Option<String> {
    let mut segments = path.rsplit('/');
    let last = segments.next()?;
    if segments.next()? != "models" {
        // Most paths: no decoding (an allocation on every verified request).
        return None;
    }
    let last = crate::vars::percent_decode(last);
    let (model, _method) = last.split_once(':')?;
    (!model.is_empty()).then(|| model.to_owned())
}

/// `uri` without the query parameter `name` (percent-decoded name match), or `None` when
/// it has none.
fn strip_query_param(uri: &str, name: &str) -> Option<String> {
    let (path, qs) = uri.split_once('?')?;
    let mut removed = false;
    let kept: Vec<&str> = qs
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let hit = crate::vars::query_pairs(k)
                .next()
                .is_some_and(|(k, _)| k == name);
            removed |= hit;
            !hit
        })
        .collect();
    if !removed {
        return None;
    }
    Some(if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    })
}

impl Policy for VerifyApiKey {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        self.model_from_body && dir == Direction::Request
    }

    /// The identity headers: only a verified key may name the caller to the upstream. With
    /// `stripKey`, the key headers too: the flow takes them out of the request before the
    /// first step (this step reads the client's values from there), so the key never
    /// reaches the upstream whatever happens later — the step skipped, failed, or run on a
    /// body whose headers already left (STREAMED).
    fn owned_request_headers(&self) -> Vec<String> {
        let keys = self.key_from.iter().filter_map(|k| match k {
            KeyFrom::Header { name, .. } if self.strip_key => Some(name.clone()),
            _ => None,
        });
        self.identity
            .iter()
            .map(|(h, _)| h.clone())
            .chain(keys)
            .filter(|h| !h.starts_with(':'))
            .collect()
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        Hook::from(self.verify(ex))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{
        hash_key, ApiKey, ApiProduct, App, AppStatus, KeyStatus, Operation, Origin, QuotaSettings,
        TimeUnit,
    };
    use crate::services::Services;
    use crate::vars::ValueRef;
    use crate::vars::{Headers, RequestInfo};

    fn services() -> Services {
        let s = Services::default();
        let product = ApiProduct {
            name: "chat".into(),
            description: String::new(),
            operations: vec![Operation {
                path: "/v1/chat/completions".into(),
                methods: vec!["POST".into()],
                models: vec![],
                ..Default::default()
            }],
            quota: Some(QuotaSettings {
                limit: 100,
                interval: 1,
                time_unit: TimeUnit::Minute,
            }),
            llm_token_quota: Some(QuotaSettings {
                limit: 50_000,
                interval: 2,
                time_unit: TimeUnit::Hour,
            }),
            approval_type: Default::default(),
            attributes: [("tier".to_string(), "gold".to_string())].into(),
            origin: Origin::File,
            revision: 0,
        };
        let gated = ApiProduct {
            name: "gated".into(),
            description: String::new(),
            operations: vec![
                Operation {
                    path: "/v1/responses".into(),
                    methods: vec!["POST".into()],
                    models: vec!["gpt-4o".into()],
                    ..Default::default()
                },
                Operation {
                    path: "/v1beta/models/{model}:generateContent".into(),
                    methods: vec!["POST".into()],
                    models: vec!["gemini-2.0-flash".into()],
                    ..Default::default()
                },
            ],
            quota: None,
            llm_token_quota: None,
            approval_type: Default::default(),
            attributes: Default::default(),
            origin: Origin::File,
            revision: 0,
        };
        let key = |id: &str, secret: &str, status: KeyStatus| ApiKey {
            id: id.into(),
            hash: hash_key(secret),
            status,
            expires_at: None,
            created_at: 0,
        };
        let revoked_app = App {
            name: "gone".into(),
            developer_email: "dev@gone.test".into(),
            status: AppStatus::Revoked,
            products: vec!["chat".into()],
            keys: vec![key("k9", "gone-app-key-0123456789", KeyStatus::Approved)],
            attributes: Default::default(),
            origin: Origin::File,
            revision: 0,
        };
        let app = App {
            name: "acme".into(),
            developer_email: "dev@acme.test".into(),
            status: Default::default(),
            products: vec!["chat".into(), "gated".into()],
            keys: vec![
                key("k3", "revoked-key-0123456789", KeyStatus::Revoked),
                key("k4", "pending-key-0123456789", KeyStatus::Pending),
                ApiKey {
                    id: "k1".into(),
                    hash: hash_key("secret-key-0123456789"),
                    status: KeyStatus::Approved,
                    expires_at: None,
                    created_at: 0,
                },
                ApiKey {
                    id: "k2".into(),
                    hash: hash_key("expired-key-0123456789"),
                    status: KeyStatus::Approved,
                    expires_at: Some(1),
                    created_at: 0,
                },
            ],
            attributes: Default::default(),
            origin: Origin::File,
            revision: 0,
        };
        s.consumers
            .set_file_objects(vec![product, gated], vec![app, revoked_app]);
        s
    }

    fn policy(yaml: &str) -> Arc<dyn Policy> {
        let ctx = BuildContext {
            name: "vk".into(),
            config_dir: None,
            services: services(),
        };
        build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap()
    }

    fn ex(method: &str, path: &str, headers: &[(&str, &str)]) -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), method.into());
        h.push(":path".into(), path.into());
        for (k, v) in headers {
            h.push((*k).into(), (*v).into());
        }
        Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
        match p.run(ex, Direction::Request) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(_) => panic!("VerifyApiKey is synchronous"),
        }
    }

    /// A Quota with `useProduct` reads the verified product's quota from the typed state
    /// (numbers, not the variables' text); an explicit variable still wins, as variables do.
    #[test]
    fn quota_reads_the_verified_product_from_the_typed_state() {
        let services = Services {
            counters: crate::ratelimit::Counters::memory(
                crate::ratelimit::FakeClock::new(1_700_000_000_000),
                1000,
            ),
            ..services()
        };
        let ctx = |name: &str| BuildContext {
            name: name.into(),
            config_dir: None,
            services: services.clone(),
        };
        let vk = build(&ctx("vk"), serde_norway::from_str("{}").unwrap()).unwrap();
        let other = build(&ctx("other"), serde_norway::from_str("{}").unwrap()).unwrap();
        let named = crate::policies::quota::build(
            &ctx("q"),
            serde_norway::from_str("{useProduct: true, verifyApiKey: vk}").unwrap(),
        )
        .unwrap();
        let latest = crate::policies::quota::build(
            &ctx("l"),
            serde_norway::from_str("{useProduct: true}").unwrap(),
        )
        .unwrap();
        let quota = |q: &Arc<dyn Policy>, e: &mut Exchange| match q.run(e, Direction::Request) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(_) => panic!("memory counters decide at once"),
        };
        let mut e = ex(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", "secret-key-0123456789")],
        );
        run(&vk, &mut e).unwrap();
        assert!(e.vars.is_empty(), "nothing copied into the variable map");
        assert_eq!(
            e.state
                .app(Some("verifyapikey.vk."))
                .map(|v| v.app.name.as_str()),
            Some("acme")
        );
        quota(&named, &mut e).unwrap();
        assert_eq!(e.var("ratelimit.q.allowed"), Some(ValueRef::Int(100)));
        assert_eq!(e.lookup("ratelimit.q.identifier").as_deref(), Some("k1"));
        quota(&latest, &mut e).unwrap();
        assert_eq!(e.var("ratelimit.l.allowed"), Some(ValueRef::Int(100)));
        // A quota naming a VerifyApiKey step that did not run falls back to nothing.
        let mut e2 = ex(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", "secret-key-0123456789")],
        );
        run(&other, &mut e2).unwrap();
        assert_eq!(quota(&named, &mut e2).unwrap_err().status, 500);
        quota(&latest, &mut e2).unwrap();
        // An explicit variable overrides the product's setting.
        e.set_var("verifyapikey.vk.apiproduct.developer.quota.limit", 7i64);
        quota(&named, &mut e).unwrap();
        assert_eq!(e.var("ratelimit.q.allowed"), Some(ValueRef::Int(7)));
    }

    /// The body's `model` comes from the exchange's shared parse; a body naming it twice,
    /// or an array, names no model.
    #[test]
    fn body_model_reads_the_shared_parse() {
        let parsed = |b: &str| crate::vars::state::JsonBody::parse(b.as_bytes());
        assert_eq!(
            body_model(&parsed(r#"{"model":"gpt-4o","messages":[]}"#)).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(
            body_model(&parsed(r#"{"model":"a","x":{"model":"b"},"model":"c"}"#)),
            None
        );
        assert_eq!(
            body_model(&parsed(r#"{"x":{"model":"b","model":"c"}}"#)),
            None
        );
        assert_eq!(body_model(&parsed(r#"{"model":""}"#)), None);
        assert_eq!(body_model(&parsed(r#"{"model":3}"#)), None);
        assert_eq!(body_model(&parsed(r#"["gpt-4o"]"#)), None);
        assert_eq!(body_model(&parsed(r#"{"model":"gpt-4o""#)), None);
        let mut e = ex("POST", "/v1/responses", &[]);
        e.set_body(Direction::Request, Some(br#"{"model":"gpt-4o"}"#.to_vec()));
        let first = e.body_json(Direction::Request).unwrap();
        assert!(
            matches!(first, std::borrow::Cow::Borrowed(_)),
            "cached on the exchange"
        );
    }

    #[test]
    fn success_sets_variables_and_headers() {
        let p = policy(
            "{stripKey: true, identityHeaders: {app: x-app, clientId: x-client, product: x-product, developer: x-developer}}",
        );
        let mut e = ex(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", "secret-key-0123456789")],
        );
        run(&p, &mut e).unwrap();
        assert_eq!(e.lookup("client_id").as_deref(), Some("k1"));
        assert_eq!(e.lookup("app.name").as_deref(), Some("acme"));
        assert_eq!(e.lookup("apiproduct.name").as_deref(), Some("chat"));
        assert_eq!(e.lookup("apiproduct.quota.limit").as_deref(), Some("100"));
        assert_eq!(
            e.lookup("apiproduct.quota.timeunit").as_deref(),
            Some("minute")
        );
        assert_eq!(
            e.lookup("apiproduct.attributes.tier").as_deref(),
            Some("gold")
        );
        assert_eq!(
            e.lookup("verifyapikey.vk.developer.email").as_deref(),
            Some("dev@acme.test")
        );
        // Apigee's names for the product's quota settings, typed for conditions.
        assert_eq!(
            e.var("verifyapikey.vk.apiproduct.developer.quota.limit"),
            Some(ValueRef::Int(100))
        );
        assert_eq!(
            e.lookup("apiproduct.developer.quota.interval").as_deref(),
            Some("1")
        );
        // The product's LLM token quota, under both names.
        assert_eq!(
            e.var("apiproduct.llmquota.limit"),
            Some(ValueRef::Int(50_000))
        );
        assert_eq!(
            e.lookup("verifyapikey.vk.apiproduct.llmquota.interval")
                .as_deref(),
            Some("2")
        );
        assert_eq!(
            e.lookup("apiproduct.developer.llmquota.timeunit")
                .as_deref(),
            Some("hour")
        );
        assert_eq!(e.lookup("apiproduct.nope.limit"), None);
        assert_eq!(e.lookup("verifyapikey.vk.app.attributes.missing"), None);
        // Apigee's spellings: llmQuota, custom attributes without `attributes.`, the
        // key's status and times; names tollgate cannot know stay unset.
        assert_eq!(
            e.var("verifyapikey.vk.apiproduct.developer.llmQuota.limit"),
            Some(ValueRef::Int(50_000))
        );
        assert_eq!(
            e.lookup("verifyapikey.vk.apiproduct.tier").as_deref(),
            Some("gold")
        );
        assert_eq!(
            e.lookup("verifyapikey.vk.developer.app.name").as_deref(),
            Some("acme")
        );
        assert_eq!(
            e.lookup("verifyapikey.vk.status").as_deref(),
            Some("approved")
        );
        assert_eq!(e.var("verifyapikey.vk.expires_at"), Some(ValueRef::Int(-1)));
        assert_eq!(e.var("verifyapikey.vk.issued_at"), Some(ValueRef::Int(0)));
        assert_eq!(e.lookup("verifyapikey.vk.developer.firstName"), None);
        let cond = |src: &str| crate::expr::Condition::compile(src).unwrap().eval(&e);
        assert!(cond("verifyapikey.vk.apiproduct.quota.limit == 100"));
        assert!(cond("apiproduct.attributes.tier == 'gold'"));
        assert!(cond("verifyapikey.vk.apiproduct.name == 'chat'"));
        // Every name the source lists resolves to the value it lists.
        let mut listed = Vec::new();
        e.for_each_var(&mut |k, v| listed.push((k.to_owned(), v.to_value())));
        assert!(listed.len() >= 20, "{listed:?}");
        for (k, v) in &listed {
            assert_eq!(e.var(k).map(ValueRef::to_value).as_ref(), Some(v), "{k}");
        }
        // A variable a later step sets wins over the published one.
        e.set_var("client_id", "override");
        assert_eq!(e.lookup("client_id").as_deref(), Some("override"));
        let m = e.take_mutations(Direction::Request);
        assert_eq!(m.remove, ["x-api-key"]);
        assert!(m.set.iter().any(|(n, v, _)| n == "x-app" && v == "acme"));
        assert!(m.set.iter().any(|(n, v, _)| n == "x-client" && v == "k1"));
        assert!(m
            .set
            .iter()
            .any(|(n, v, _)| n == "x-product" && v == "chat"));
        assert!(m
            .set
            .iter()
            .any(|(n, v, _)| n == "x-developer" && v == "dev@acme.test"));
    }

    #[test]
    fn key_from_a_template() {
        let p = policy("{keyFrom: [{template: '{request.header.authorization}'}]}");
        let mut e = ex(
            "POST",
            "/v1/chat/completions",
            &[("authorization", "secret-key-0123456789")],
        );
        run(&p, &mut e).unwrap();
        assert_eq!(e.lookup("client_id").as_deref(), Some("k1"));
        // An empty rendering is a missing key.
        let f = run(&p, &mut ex("POST", "/v1/chat/completions", &[])).unwrap_err();
        assert_eq!(f.code, "oauth.v2.FailedToResolveAPIKey");
    }

    /// Every configured source is read: one key in several places is one key; different
    /// keys in two places are refused, whichever is right (no reader downstream may pick
    /// the other); two values of one source are ambiguous and refused.
    #[test]
    fn a_key_sent_twice() {
        let p = policy("{keyFrom: [{header: x-api-key}, {query: apikey}]}");
        for (q, h) in [
            ("wrong-wrong-wrong", "secret-key-0123456789"),
            ("secret-key-0123456789", "wrong-wrong-wrong"),
        ] {
            let f = run(
                &p,
                &mut ex(
                    "POST",
                    &format!("/v1/chat/completions?apikey={q}"),
                    &[("x-api-key", h)],
                ),
            )
            .unwrap_err();
            assert_eq!((f.status, f.code.as_str()), (401, "oauth.v2.InvalidApiKey"));
            assert_eq!(
                f.message,
                "different API keys sent in x-api-key and ?apikey="
            );
        }
        // The same key in both places is one key.
        run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions?apikey=secret-key-0123456789",
                &[("x-api-key", "secret-key-0123456789")],
            ),
        )
        .unwrap();
        // An empty source holds no key.
        run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions?apikey=",
                &[("x-api-key", "secret-key-0123456789")],
            ),
        )
        .unwrap();
        // Two query values, even equal ones.
        for q in [
            "apikey=secret-key-0123456789&apikey=other",
            "apikey=secret-key-0123456789&apikey=secret-key-0123456789",
        ] {
            let f = run(
                &p,
                &mut ex("POST", &format!("/v1/chat/completions?{q}"), &[]),
            )
            .unwrap_err();
            assert_eq!((f.status, f.code.as_str()), (401, "oauth.v2.InvalidApiKey"));
            assert_eq!(f.message, "API key sent more than once");
        }
    }

    /// The `llm-sdks` preset: the key where each official SDK sends it, stripped from that
    /// place only.
    #[test]
    fn keys_as_the_sdks_send_them() {
        let p = policy("{keyFrom: [{preset: llm-sdks}], stripKey: true}");
        let key = "secret-key-0123456789";
        let bearer = format!("Bearer {key}");
        let lower = format!("bearer  {key} ");
        let path_q = format!("/v1/chat/completions?alt=sse&key={key}");
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case; 5] = [
            (
                "/v1/chat/completions",
                &[("authorization", &bearer)],
                "authorization",
            ),
            (
                "/v1/chat/completions",
                &[("authorization", &lower)],
                "authorization",
            ),
            ("/v1/chat/completions", &[("x-api-key", key)], "x-api-key"),
            (
                "/v1/chat/completions",
                &[("x-goog-api-key", key)],
                "x-goog-api-key",
            ),
            (&path_q, &[], ":path"),
        ];
        for (path, headers, place) in cases {
            let mut e = ex("POST", path, headers);
            run(&p, &mut e).unwrap_or_else(|f| panic!("{place}: {f:?}"));
            assert_eq!(e.lookup("client_id").as_deref(), Some("k1"), "{place}");
            let m = e.take_mutations(Direction::Request);
            if place == ":path" {
                assert!(m.remove.is_empty(), "{m:?}");
                assert!(
                    m.set
                        .iter()
                        .any(|(n, v, _)| n == ":path" && v == "/v1/chat/completions?alt=sse"),
                    "{m:?}"
                );
            } else {
                assert_eq!(m.remove, [place], "only the place the key was in");
                assert!(m.set.is_empty(), "{m:?}");
            }
        }
        // Another scheme in Authorization is not this policy's credential: it stays.
        let mut e = ex(
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", key)],
        );
        run(&p, &mut e).unwrap();
        assert_eq!(e.take_mutations(Direction::Request).remove, ["x-api-key"]);
        let f = run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions",
                &[("authorization", "Basic dXNlcjpwYXNz")],
            ),
        )
        .unwrap_err();
        assert_eq!(f.code, "oauth.v2.FailedToResolveAPIKey");
        // The same key twice (a client sending both headers) is stripped from both.
        let mut e = ex(
            "POST",
            "/v1/chat/completions",
            &[("authorization", &bearer), ("x-api-key", key)],
        );
        run(&p, &mut e).unwrap();
        assert_eq!(
            e.take_mutations(Direction::Request).remove,
            ["authorization", "x-api-key"]
        );
        // Two different keys: refused, naming both places.
        let f = run(
            &p,
            &mut ex(
                "POST",
                "/v1beta/models/gemini-2.0-flash:generateContent?key=other-key-0123",
                &[("x-goog-api-key", key)],
            ),
        )
        .unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (401, "oauth.v2.InvalidApiKey"));
        assert_eq!(
            f.message,
            "different API keys sent in x-goog-api-key and ?key="
        );
        let f = run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions",
                &[
                    ("authorization", "Bearer other-key-0123"),
                    ("x-api-key", key),
                ],
            ),
        )
        .unwrap_err();
        assert_eq!(
            f.message,
            "different API keys sent in authorization and x-api-key"
        );
        // `Bearer` with nothing after it is no key.
        let f = run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions",
                &[("authorization", "Bearer ")],
            ),
        )
        .unwrap_err();
        assert_eq!(f.code, "oauth.v2.FailedToResolveAPIKey");
    }

    /// With `stripKey` the key headers are the flow's: the client's values are taken out
    /// before any step; this step reads them from there.
    #[test]
    fn stripped_key_headers_are_owned() {
        let p = policy(
            "{keyFrom: [{preset: llm-sdks}], stripKey: true, identityHeaders: {app: x-app}}",
        );
        assert_eq!(
            p.owned_request_headers(),
            ["x-app", "authorization", "x-api-key", "x-goog-api-key"]
        );
        assert_eq!(
            policy("{identityHeaders: {app: x-app}}").owned_request_headers(),
            ["x-app"]
        );
        let steps = vec![crate::pipeline::Step {
            policy_name: "vk".into(),
            policy: p.clone(),
            condition: None,
            continue_on_error: false,
        }];
        let flow = crate::pipeline::DirectionPipeline::compile(steps, Direction::Request);
        let mut e = ex(
            "POST",
            "/v1/chat/completions",
            &[
                ("x-goog-api-key", "secret-key-0123456789"),
                ("authorization", "Basic eA=="),
            ],
        );
        crate::pipeline::claim_owned_headers(&flow, &mut e);
        assert_eq!(e.request.headers.get("x-goog-api-key"), None);
        run(&p, &mut e).unwrap();
        assert_eq!(e.lookup("client_id").as_deref(), Some("k1"));
        let m = e.take_mutations(Direction::Request);
        assert_eq!(
            m.remove,
            ["authorization", "x-goog-api-key"],
            "by the claim"
        );
    }

    /// `{header: authorization}` reads a bare key as it always did, and a `Bearer` one.
    #[test]
    fn authorization_without_a_scheme_reads_both_forms() {
        let p = policy("{keyFrom: [{header: authorization}]}");
        for v in ["secret-key-0123456789", "Bearer secret-key-0123456789"] {
            run(
                &p,
                &mut ex("POST", "/v1/chat/completions", &[("authorization", v)]),
            )
            .unwrap();
        }
        let p = policy("{keyFrom: [{header: x-key, scheme: Token}]}");
        run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions",
                &[("x-key", "token secret-key-0123456789")],
            ),
        )
        .unwrap();
        let f = run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions",
                &[("x-key", "secret-key-0123456789")],
            ),
        )
        .unwrap_err();
        assert_eq!(f.code, "oauth.v2.FailedToResolveAPIKey");
    }

    /// When a later step sets `authorization` for the upstream (a Google token), the flow
    /// took the client's value out before the first step: VerifyApiKey reads the key from
    /// there and removes nothing, so the step's token survives whatever the order.
    #[test]
    fn stripping_leaves_a_header_the_flow_owns() {
        let p = policy("{keyFrom: [{preset: llm-sdks}], stripKey: true}");
        let mut e = ex("POST", "/v1/chat/completions", &[]);
        e.client_owned.push(
            "authorization".into(),
            "Bearer secret-key-0123456789".into(),
        );
        // A step before this one already set the upstream's token.
        e.set_header(
            Direction::Request,
            "authorization",
            "Bearer ya29.token".into(),
        );
        run(&p, &mut e).unwrap();
        assert_eq!(e.lookup("client_id").as_deref(), Some("k1"));
        let m = e.take_mutations(Direction::Request);
        assert!(m.remove.is_empty(), "{m:?}");
        assert_eq!(
            m.set,
            [(
                "authorization".to_owned(),
                "Bearer ya29.token".to_owned(),
                false
            )]
        );
    }

    #[test]
    fn model_restricted_products() {
        let key = [("x-api-key", "secret-key-0123456789")];
        let body = |p: &Arc<dyn Policy>, body: Option<&str>| {
            let mut e = ex("POST", "/v1/responses", &key);
            e.request_body = body.map(|b| b.as_bytes().to_vec());
            run(p, &mut e)
        };
        // Default: headers only, so no model is known; the refusal says so.
        let p = policy("{}");
        assert!(!p.needs_body(Direction::Request));
        let f = body(&p, None).unwrap_err();
        assert_eq!(f.code, "oauth.v2.InvalidApiKeyForGivenResource");
        assert!(f.message.contains("model is unknown"), "{}", f.message);
        // Run with the body (after a body step, or `modelFromBody`): its `model` decides.
        body(&p, Some(r#"{"messages":[],"model":"gpt-4o"}"#)).unwrap();
        let f = body(&p, Some(r#"{"model":"gpt-3"}"#)).unwrap_err();
        assert_eq!(
            (f.code.as_str(), f.message.as_str()),
            (
                "oauth.v2.InvalidApiKeyForGivenResource",
                "Invalid ApiKey for given resource"
            )
        );
        for unusable in [
            r#"{"model":5}"#,
            "not json",
            r#"{"model":""}"#,
            r#"{"model":"gpt-4o","model":"x"}"#,
        ] {
            let f = body(&p, Some(unusable)).unwrap_err();
            assert!(f.message.contains("model is unknown"), "{unusable}");
        }
        let p = policy("{modelFromBody: true}");
        assert!(p.needs_body(Direction::Request));
        assert!(!p.needs_body(Direction::Response));
        body(&p, Some(r#"{"model":"gpt-4o"}"#)).unwrap();
        // A `model` template cannot stand in for a body naming another model: every model
        // the request names must be allowed.
        let p = policy("{model: '{request.header.x-model}'}");
        let mut e = ex("POST", "/v1/responses", &[key[0], ("x-model", "gpt-4o")]);
        e.request_body = Some(br#"{"model":"gpt-3"}"#.to_vec());
        let f = run(&p, &mut e).unwrap_err();
        assert_eq!(f.code, "oauth.v2.InvalidApiKeyForGivenResource");
        let mut e = ex("POST", "/v1/responses", &[key[0], ("x-model", "gpt-3")]);
        e.request_body = Some(br#"{"model":"gpt-4o"}"#.to_vec());
        assert!(
            run(&p, &mut e).is_err(),
            "the template's model is checked too"
        );
        let mut e = ex("POST", "/v1/responses", &[key[0], ("x-model", "gpt-4o")]);
        e.request_body = Some(br#"{"model":"gpt-4o"}"#.to_vec());
        run(&p, &mut e).unwrap();
        // On the headers, with a body still to come, the header decides nothing.
        let mut e = ex("POST", "/v1/responses", &[key[0], ("x-model", "gpt-4o")]);
        let f = run(&p, &mut e).unwrap_err();
        assert!(f.message.contains("model is unknown"), "{}", f.message);
        // A body cut at Envoy's buffer limit is a body not read.
        let mut e = ex("POST", "/v1/responses", &[key[0], ("x-model", "gpt-4o")]);
        e.request_body = Some(br#"{"messages": ["#.to_vec());
        e.set_var("request.body.truncated", true);
        assert!(run(&p, &mut e).is_err());
        // A request without a body: the template is all there is.
        let mut e = ex("POST", "/v1/responses", &[key[0], ("x-model", "gpt-4o")]);
        e.request_without_body = true;
        run(&p, &mut e).unwrap();
    }

    #[test]
    fn gemini_models_are_read_from_the_path() {
        assert_eq!(
            path_model("/v1beta/models/gemini-2.0-flash:generateContent").as_deref(),
            Some("gemini-2.0-flash")
        );
        assert_eq!(
            path_model("/v1/projects/p/locations/l/publishers/google/models/gemini-1.5-pro%3AstreamGenerateContent")
                .as_deref(),
            Some("gemini-1.5-pro")
        );
        assert_eq!(path_model("/v1/models/gpt-4o"), None);
        assert_eq!(path_model("/v1/chat/completions"), None);
        assert_eq!(path_model("/models/:x"), None);
        assert_eq!(path_model(""), None);
        let key = [("x-api-key", "secret-key-0123456789")];
        let p = policy("{model: '{request.header.x-model}'}");
        let path = |m: &str| format!("/v1beta/models/{m}:generateContent");
        // On the headers alone (the body names no model for Gemini).
        run(&p, &mut ex("POST", &path("gemini-2.0-flash"), &key)).unwrap();
        let f = run(&p, &mut ex("POST", &path("gemini-2.5-pro"), &key)).unwrap_err();
        assert_eq!(f.code, "oauth.v2.InvalidApiKeyForGivenResource");
        // A header naming an allowed model does not make another path model allowed.
        let f = run(
            &p,
            &mut ex(
                "POST",
                &path("gemini-2.5-pro"),
                &[key[0], ("x-model", "gemini-2.0-flash")],
            ),
        )
        .unwrap_err();
        assert_eq!(f.code, "oauth.v2.InvalidApiKeyForGivenResource");
        // Nor does a body naming one.
        let mut e = ex("POST", &path("gemini-2.5-pro"), &key);
        e.request_body = Some(br#"{"model":"gemini-2.0-flash"}"#.to_vec());
        assert!(run(&p, &mut e).is_err());
    }

    #[test]
    fn refusals_have_apigee_codes() {
        let p = policy("{keyFrom: [{header: x-api-key}, {query: apikey}]}");
        let code = |method: &str, path: &str, headers: &[(&str, &str)]| {
            run(&p, &mut ex(method, path, headers)).unwrap_err().code
        };
        assert_eq!(
            code("POST", "/v1/chat/completions", &[]),
            "oauth.v2.FailedToResolveAPIKey"
        );
        assert_eq!(
            code(
                "POST",
                "/v1/chat/completions",
                &[("x-api-key", "nope-nope-nope")]
            ),
            "oauth.v2.InvalidApiKey"
        );
        assert_eq!(
            code(
                "POST",
                "/v1/chat/completions",
                &[("x-api-key", "expired-key-0123456789")]
            ),
            "keymanagement.service.consumer_key_expired"
        );
        assert_eq!(
            code(
                "GET",
                "/v1/chat/completions",
                &[("x-api-key", "secret-key-0123456789")]
            ),
            "oauth.v2.InvalidApiKeyForGivenResource"
        );
        let with_key = |k: &str| code("POST", "/v1/chat/completions", &[("x-api-key", k)]);
        assert_eq!(
            with_key("revoked-key-0123456789"),
            "oauth.v2.ApiKeyNotApproved"
        );
        assert_eq!(
            with_key("pending-key-0123456789"),
            "oauth.v2.ApiKeyNotApproved"
        );
        assert_eq!(
            with_key("gone-app-key-0123456789"),
            "keymanagement.service.invalid_client-app_not_approved"
        );
        // Every refusal is a 401.
        for k in [
            "revoked-key-0123456789",
            "gone-app-key-0123456789",
            "expired-key-0123456789",
        ] {
            let f = run(
                &p,
                &mut ex("POST", "/v1/chat/completions", &[("x-api-key", k)]),
            )
            .unwrap_err();
            assert_eq!(f.status, 401, "{k}");
        }
        // Twice, huge, control characters.
        assert_eq!(
            code(
                "POST",
                "/v1/chat/completions",
                &[("x-api-key", "a"), ("x-api-key", "b")]
            ),
            "oauth.v2.InvalidApiKey"
        );
        let huge = "k".repeat(10_000);
        assert_eq!(
            code("POST", "/v1/chat/completions", &[("x-api-key", &huge)]),
            "oauth.v2.InvalidApiKey"
        );
        assert_eq!(
            code("POST", "/v1/chat/completions", &[("x-api-key", "a\u{1}b")]),
            "oauth.v2.InvalidApiKey"
        );
        // From the query string.
        run(
            &p,
            &mut ex(
                "POST",
                "/v1/chat/completions?apikey=secret-key-0123456789",
                &[],
            ),
        )
        .unwrap();
        let f = run(&p, &mut ex("POST", "/v1/chat/completions", &[])).unwrap_err();
        assert_eq!(f.status, 401);
    }

    #[test]
    fn strips_the_key_from_the_query() {
        assert_eq!(
            strip_query_param("/a?apikey=k&x=1", "apikey").as_deref(),
            Some("/a?x=1")
        );
        assert_eq!(
            strip_query_param("/a?apikey=k", "apikey").as_deref(),
            Some("/a")
        );
        assert_eq!(strip_query_param("/a?x=1", "apikey"), None);
        assert_eq!(strip_query_param("/a", "apikey"), None);
        let p = policy("{keyFrom: [{query: apikey}], stripKey: true}");
        let mut e = ex(
            "POST",
            "/v1/chat/completions?a=1&apikey=secret-key-0123456789",
            &[],
        );
        run(&p, &mut e).unwrap();
        let m = e.take_mutations(Direction::Request);
        assert!(m
            .set
            .iter()
            .any(|(n, v, _)| n == ":path" && v == "/v1/chat/completions?a=1"));
    }

    #[test]
    fn bad_specs() {
        let ctx = BuildContext::default();
        let b = |y: &str| build(&ctx, serde_norway::from_str(y).unwrap());
        assert_eq!(
            b("{keyFrom: [{header: a, query: b}]}").unwrap_err().field,
            "keyFrom[0]"
        );
        assert!(b("{identityHeaders: {app: host}}").is_err());
        assert!(b("{keyfrom: []}").is_err());
        assert!(b("{keyFrom: [{preset: nope}]}")
            .unwrap_err()
            .message
            .contains("llm-sdks"));
        assert!(b("{keyFrom: [{query: k, scheme: Bearer}]}").is_err());
        assert!(b("{keyFrom: [{header: a, scheme: 'two words'}]}").is_err());
        assert!(b("{keyFrom: [{preset: llm-sdks}, {header: x-api-key}]}")
            .unwrap_err()
            .message
            .contains("listed twice"));
    }
}
