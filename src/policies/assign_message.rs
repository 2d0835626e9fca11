//! `AssignMessage`: set, add and remove headers of the message its step belongs to (request
//! steps change the request, response steps the response), and assign flow variables.
//! Values are templates over flow variables. Order, as in Apigee: remove, add, set, then
//! variables. `set.body` replaces the message body (as Apigee's `<Set><Payload>`); it and
//! any template reading `{request.content}` / `{response.content}` make the step run on
//! the body phase.
//!
//! ```yaml
//! spec:
//!   type: AssignMessage
//!   remove: {headers: [x-debug]}
//!   add: {headers: {x-trace: "{request.header.x-request-id}"}}
//!   set: {headers: {x-tollgate-flow: "{flow.name}"}}
//!   assignVariables: {tier: "{request.header.x-tier}"}
//! ```
//!
//! `googleToken` sets a header (default `Authorization: Bearer <token>`) to a Google token
//! for the gateway's own identity (see `crate::google`), after the other operations:
//!
//! ```yaml
//!   googleToken:
//!     accessToken: {scopes: [https://www.googleapis.com/auth/cloud-platform]}
//!     # or idToken: {audience: https://my-service-abc.a.run.app}
//!     header: x-serverless-authorization     # default authorization
//!     serviceAccountKeyFile: keys/sa.key     # default: the metadata server
//!     metadataHost: 169.254.169.254          # default: $GCE_METADATA_HOST, metadata.google.internal
//! ```
//!
//! A token that cannot be obtained fails the step with 503
//! `steps.googletoken.TokenUnavailable`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::{
    check_header_name, parse_spec, read_config_file, valid_header_value, BuildContext, SpecError,
};
use crate::expr::Template;
use crate::fault::Fault;
use crate::google::{Cached, Kind, ServiceAccountKey, Source, TokenSlot};
use crate::pipeline::{Direction, Hook, Hooks, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "AssignMessage";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    set: SetSpec,
    #[serde(default)]
    add: HeaderMap,
    #[serde(default)]
    remove: RemoveSpec,
    #[serde(default)]
    assign_variables: BTreeMap<String, String>,
    #[serde(default)]
    google_token: Option<GoogleTokenSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct GoogleTokenSpec {
    #[serde(default)]
    access_token: Option<AccessTokenSpec>,
    #[serde(default)]
    id_token: Option<IdTokenSpec>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    service_account_key_file: Option<String>,
    #[serde(default)]
    metadata_host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessTokenSpec {
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdTokenSpec {
    audience: String,
}

#[derive(Debug)]
pub(super) struct GoogleToken {
    pub(super) header: String,
    pub(super) slot: Arc<TokenSlot>,
}

pub(super) fn google_token(
    ctx: &BuildContext,
    g: GoogleTokenSpec,
) -> Result<GoogleToken, SpecError> {
    let at = "googleToken";
    let kind = match (g.access_token, g.id_token) {
        (Some(a), None) => {
            if a.scopes.is_empty() || a.scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
                return Err(SpecError::new(
                    "googleToken.accessToken.scopes",
                    "give one or more scopes (URLs, no spaces)",
                ));
            }
            Kind::Access { scopes: a.scopes }
        }
        (None, Some(i)) if !i.audience.is_empty() => Kind::Id {
            audience: i.audience,
        },
        _ => {
            return Err(SpecError::new(
                at,
                "give accessToken {scopes} or idToken {audience}",
            ))
        }
    };
    let header = check_header_name(g.header.as_deref().unwrap_or("authorization"))
        .map_err(|m| SpecError::new("googleToken.header", m))?;
    let source = match (g.service_account_key_file, g.metadata_host) {
        (Some(_), Some(_)) => {
            return Err(SpecError::new(
                at,
                "give serviceAccountKeyFile or metadataHost, not both",
            ))
        }
        (Some(f), None) => {
            let field = "googleToken.serviceAccountKeyFile";
            let text = read_config_file(ctx, field, &f)?;
            let key = ServiceAccountKey::parse(&text)
                .map_err(|e| SpecError::new(field, e.to_string()))?;
            Source::ServiceAccount(Arc::new(key))
        }
        (None, Some(h)) if !h.is_empty() && !h.contains('/') => Source::Metadata(h),
        (None, Some(_)) => {
            return Err(SpecError::new(
                "googleToken.metadataHost",
                "a host or host:port",
            ))
        }
        (None, None) => Source::metadata_default(),
    };
    let slot = ctx.services.google.slot(source, kind, &ctx.services.http);
    Ok(GoogleToken { header, slot })
}

pub(super) fn token_unavailable(e: &crate::google::TokenError) -> Fault {
    tracing::warn!(error = %e, "google token unavailable");
    Fault::new(
        503,
        "steps.googletoken.TokenUnavailable",
        "Could not obtain a Google token for the upstream",
    )
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HeaderMap {
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SetSpec {
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Replaces the body; a `content-type` goes in `headers`.
    #[serde(default)]
    body: Option<String>,
    /// The error response's status (Apigee's `<Set><StatusCode>`): a number or a template;
    /// only in a fault rule's steps.
    #[serde(default)]
    status_code: Option<StatusSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StatusSpec {
    Number(u16),
    Text(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RemoveSpec {
    #[serde(default)]
    headers: Vec<String>,
}

#[derive(Debug)]
struct AssignMessage {
    remove: Vec<String>,
    add: Vec<(String, Template)>,
    set: Vec<(String, Template)>,
    variables: Vec<(String, Template)>,
    body: Option<Template>,
    /// `set.statusCode`.
    status: Option<Template>,
    /// Some template reads the message body.
    reads_body: bool,
    /// Some template reads an `llm.*` variable: the flow tracks its LLM traffic, and the
    /// step waits for the whole message (on the response, the usage is known at its end).
    reads_llm: bool,
    google: Option<GoogleToken>,
}

fn compile_headers(
    field: &str,
    headers: BTreeMap<String, String>,
) -> Result<Vec<(String, Template)>, SpecError> {
    headers
        .into_iter()
        .map(|(name, value)| {
            let at = format!("{field}.{name}");
            let name = check_header_name(&name).map_err(|m| SpecError::new(&at, m))?;
            let t = Template::compile(&value).map_err(|e| SpecError::new(&at, e.to_string()))?;
            Ok((name, t))
        })
        .collect()
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let remove = spec
        .remove
        .headers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            check_header_name(n).map_err(|m| SpecError::new(format!("remove.headers[{i}]"), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let add = compile_headers("add.headers", spec.add.headers)?;
    let set = compile_headers("set.headers", spec.set.headers)?;
    let variables = spec
        .assign_variables
        .into_iter()
        .map(|(name, value)| {
            let at = format!("assignVariables.{name}");
            if name.is_empty() || name.starts_with("request.") || name.starts_with("response.") {
                return Err(SpecError::new(
                    at,
                    "variable names must be non-empty and outside request.* / response.*",
                ));
            }
            let t = Template::compile(&value).map_err(|e| SpecError::new(&at, e.to_string()))?;
            Ok((name, t))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let body = spec
        .set
        .body
        .as_deref()
        .map(|b| Template::compile(b).map_err(|e| SpecError::new("set.body", e.to_string())))
        .transpose()?;
    let status = match spec.set.status_code {
        None => None,
        Some(StatusSpec::Number(n)) if (200..=599).contains(&n) => Some(
            Template::compile(&n.to_string())
                .map_err(|e| SpecError::new("set.statusCode", e.to_string()))?,
        ),
        Some(StatusSpec::Number(_)) => {
            return Err(SpecError::new(
                "set.statusCode",
                "must be an HTTP status between 200 and 599",
            ))
        }
        Some(StatusSpec::Text(t)) => Some(
            Template::compile(&t).map_err(|e| SpecError::new("set.statusCode", e.to_string()))?,
        ),
    };
    let reads_body = add
        .iter()
        .chain(set.iter())
        .chain(variables.iter())
        .map(|(_, t)| t)
        .chain(body.iter())
        .chain(status.iter())
        .flat_map(Template::variables)
        .any(|v| {
            v == "request.content"
                || v == "response.content"
                || v == "message.content"
                || v == "request.formstring"
                || v.starts_with("request.formparam.")
        });
    let reads_llm = add
        .iter()
        .chain(set.iter())
        .chain(variables.iter())
        .map(|(_, t)| t)
        .chain(body.iter())
        .flat_map(Template::variables)
        .any(|v| v.starts_with("llm."));
    let google = spec
        .google_token
        .map(|g| google_token(ctx, g))
        .transpose()?;
    if remove.is_empty()
        && add.is_empty()
        && set.is_empty()
        && variables.is_empty()
        && body.is_none()
        && status.is_none()
        && google.is_none()
    {
        return Err(SpecError::new(
            "",
            "AssignMessage does nothing: give set, add, remove, assignVariables or googleToken",
        ));
    }
    Ok(Arc::new(AssignMessage {
        remove,
        add,
        set,
        variables,
        body,
        status,
        reads_body,
        reads_llm,
        google,
    }))
}

fn rendered(name: &str, t: &Template, ex: &Exchange) -> Option<String> {
    let v = t.render(ex);
    if valid_header_value(&v) {
        Some(v)
    } else {
        tracing::warn!(
            header = name,
            "template rendered a value with CR, LF or NUL; header not set"
        );
        None
    }
}

impl Policy for AssignMessage {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, _dir: Direction) -> bool {
        self.body.is_some() || self.reads_body || self.reads_llm
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: self.reads_llm,
            ..Hooks::default()
        }
    }

    fn replaces_body(&self, _dir: Direction) -> bool {
        self.body.is_some()
    }

    fn fault_rule_only(&self) -> Option<&'static str> {
        self.status.as_ref().map(|_| "sets `set.statusCode`")
    }

    /// `set.headers` and the Google token's header. `add.headers` adds to what the
    /// client sent, by definition, so it owns nothing.
    fn owned_request_headers(&self) -> Vec<String> {
        self.set
            .iter()
            .map(|(n, _)| n.clone())
            .chain(self.google.iter().map(|g| g.header.clone()))
            .filter(|n| !n.starts_with(':'))
            .collect()
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        for name in &self.remove {
            ex.remove_header(dir, name);
        }
        for (name, t) in &self.add {
            if let Some(v) = rendered(name, t, ex) {
                ex.add_header(dir, name, v);
            }
        }
        for (name, t) in &self.set {
            match rendered(name, t, ex) {
                Some(v) => ex.set_header(dir, name, v),
                // The header is this step's to set: no value from before it survives.
                None => ex.remove_header(dir, name),
            }
        }
        for (name, t) in &self.variables {
            let v = t.render(ex);
            ex.set_var(name.clone(), v);
        }
        if let Some(t) = &self.body {
            let b = t.render(ex).into_bytes();
            ex.replace_body(dir, b);
        }
        if let Some(t) = &self.status {
            // Only a fault rule's step has one (refused elsewhere at load): it sets the
            // status of the error response the rule shapes.
            let text = t.render(ex);
            let Some(code) = text
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (200..=599).contains(c))
            else {
                return Hook::Ready(Outcome::Reject(Fault::new(
                    500,
                    "steps.assignmessage.InvalidStatusCode",
                    format!("set.statusCode rendered `{text}`, not an HTTP status"),
                )));
            };
            if let (Direction::Response, Some(r)) = (dir, ex.response.as_mut()) {
                r.status = code;
                r.headers.set(":status", code.to_string());
            }
        }
        let Some(g) = &self.google else {
            return Hook::Ready(Outcome::Continue);
        };
        match g.slot.get() {
            Cached::Ready(t) => {
                ex.set_header(dir, &g.header, format!("Bearer {}", t.value));
                Hook::Ready(Outcome::Continue)
            }
            Cached::Failed(e) => Hook::Ready(Outcome::Reject(token_unavailable(&e))),
            Cached::Missing => Hook::wait(async move {
                let t = g.slot.fetch().await.map_err(|e| token_unavailable(&e))?;
                ex.set_header(dir, &g.header, format!("Bearer {}", t.value));
                Ok(())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo};

    fn spec(y: &str) -> serde_norway::Value {
        serde_norway::from_str(y).unwrap()
    }

    #[test]
    fn applies_in_order() {
        let p = build(
            &BuildContext::default(),
            spec(
                r#"
remove: {headers: [x-debug]}
add: {headers: {x-trace: "t-{request.header.x-id}"}}
set: {headers: {X-Flow: "{flow.name}", x-bad: "{request.header.x-evil}"}}
assignVariables: {tier: "{request.header.x-flow}"}
"#,
            ),
        )
        .unwrap();
        let mut h = Headers::new();
        h.push("x-id".into(), "7".into());
        h.push("x-debug".into(), "1".into());
        h.push("x-evil".into(), "a\nb".into());
        let mut ex = Exchange {
            flow: "f1".into(),
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        assert!(matches!(
            p.run(&mut ex, Direction::Request),
            Hook::Ready(Outcome::Continue)
        ));
        let m = ex.take_mutations(Direction::Request);
        assert_eq!(m.remove, ["x-debug", "x-bad"]);
        assert!(m.set.contains(&("x-trace".into(), "t-7".into(), true)));
        assert!(m.set.contains(&("x-flow".into(), "f1".into(), false)));
        assert!(!m.set.iter().any(|(n, _, _)| n == "x-bad"));
        // A value that cannot be a header removes the header (it is the step's to set).
        assert!(m.remove.contains(&"x-bad".to_string()), "{m:?}");
        assert_eq!(p.owned_request_headers(), ["x-flow", "x-bad"]);
        assert_eq!(ex.lookup("tier").as_deref(), Some("f1"));
    }

    #[test]
    fn body_steps() {
        let p = build(
            &BuildContext::default(),
            spec(r#"set: {body: '{"wrapped": {request.content}}'}"#),
        )
        .unwrap();
        assert!(p.needs_body(Direction::Request));
        let mut ex = Exchange {
            request_body: Some(b"[1]".to_vec()),
            ..Default::default()
        };
        assert!(matches!(
            p.run(&mut ex, Direction::Request),
            Hook::Ready(Outcome::Continue)
        ));
        assert_eq!(
            ex.request_body.as_deref(),
            Some(&br#"{"wrapped": [1]}"#[..])
        );
        assert!(ex.request_body_replaced);

        let reads = build(
            &BuildContext::default(),
            spec("assignVariables: {prompt: '{request.content}'}"),
        )
        .unwrap();
        assert!(reads.needs_body(Direction::Request));
        let headers_only =
            build(&BuildContext::default(), spec("set: {headers: {x-a: b}}")).unwrap();
        assert!(!headers_only.needs_body(Direction::Request));
    }

    #[test]
    fn bad_specs_name_the_field() {
        let e = build(&BuildContext::default(), spec("set: {headers: {host: x}}")).unwrap_err();
        assert_eq!(e.field, "set.headers.host");
        let e = build(&BuildContext::default(), spec("sett: {}")).unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        let e = build(&BuildContext::default(), spec("{}")).unwrap_err();
        assert!(e.message.contains("does nothing"));
    }
}
