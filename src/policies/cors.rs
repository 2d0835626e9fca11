//! `CORS` (Apigee's policy of that name): answers CORS preflights itself and adds the CORS
//! headers to the response of an allowed cross-origin request.
//!
//! ```yaml
//! spec:
//!   type: CORS
//!   allowOrigins: "{request.header.origin}"   # comma-separated origins, `*`, or templates
//!   allowMethods: GET, PUT, POST, DELETE      # default GET, PUT, POST, DELETE
//!   allowHeaders: origin, x-requested-with, accept, content-type   # (the default)
//!   exposeHeaders: "*"                        # default: none sent
//!   maxAge: 1800                              # seconds (default 1800); -1 sends none
//!   allowCredentials: false
//!   generatePreflightResponse: true           # answer OPTIONS preflights here (default)
//!   ignoreUnresolvedVariables: true           # (default)
//! ```
//!
//! A request with an `Origin` in `allowOrigins` (exact, case-insensitive; `*` allows any) is
//! allowed: a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//! answered at once with 200 and `Access-Control-Allow-Origin`, `-Allow-Methods`,
//! `-Allow-Headers`, `-Max-Age` and, with `allowCredentials`, `-Allow-Credentials: true`;
//! any other request goes on, and its response gets `Access-Control-Allow-Origin`,
//! `-Expose-Headers` and `-Allow-Credentials` (through the response mutations, as Quota's
//! rate-limit headers: Envoy must send response headers, its default). `Vary: Origin` is
//! added whenever the answer depends on the origin. A preflight from an origin that is not
//! allowed is still answered (200, without CORS headers: the browser refuses it), so it
//! never reaches an upstream that does not expect `OPTIONS`; a request without `Origin` is
//! not a CORS request and is left alone.
//!
//! `*` with `allowCredentials: true` echoes the request's origin: browsers refuse a literal
//! `*` on credentialed requests. With `ignoreUnresolvedVariables: false` a template
//! reference that does not resolve is 500 `steps.cors.UnresolvedVariable`.
//!
//! The step belongs on the request path (on the response path it only adds the headers).
//! Responses tollgate itself renders for a later fault do not carry the CORS headers.

use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, valid_header_value, BuildContext, SpecError};
use crate::expr::Template;
use crate::fault::Fault;
use crate::pipeline::{Answer, Direction, Hook, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "CORS";

const DEFAULT_METHODS: &str = "GET, PUT, POST, DELETE";
const DEFAULT_HEADERS: &str = "origin, x-requested-with, accept, content-type";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    allow_origins: String,
    #[serde(default)]
    allow_methods: Option<String>,
    #[serde(default)]
    allow_headers: Option<String>,
    #[serde(default)]
    expose_headers: Option<String>,
    #[serde(default)]
    max_age: Option<i64>,
    #[serde(default)]
    allow_credentials: bool,
    #[serde(default)]
    generate_preflight_response: Option<bool>,
    #[serde(default)]
    ignore_unresolved_variables: Option<bool>,
}

#[derive(Debug)]
struct Cors {
    origins: Template,
    methods: Template,
    headers: Template,
    expose: Option<Template>,
    max_age: Option<i64>,
    credentials: bool,
    preflight: bool,
    ignore_unresolved: bool,
}

pub fn build(_ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let tpl = |field: &str, s: &str| -> Result<Template, SpecError> {
        if !valid_header_value(s) {
            return Err(SpecError::new(
                field,
                "CR, LF and NUL cannot be in a header",
            ));
        }
        Template::compile(s).map_err(|e| SpecError::new(field, e.to_string()))
    };
    if spec.allow_origins.trim().is_empty() {
        return Err(SpecError::new(
            "allowOrigins",
            "give origins, `*`, or a template such as {request.header.origin}",
        ));
    }
    if let Some(m) = spec.max_age {
        if m < -1 {
            return Err(SpecError::new("maxAge", "seconds, or -1 to send none"));
        }
    }
    Ok(Arc::new(Cors {
        origins: tpl("allowOrigins", &spec.allow_origins)?,
        methods: tpl(
            "allowMethods",
            spec.allow_methods.as_deref().unwrap_or(DEFAULT_METHODS),
        )?,
        headers: tpl(
            "allowHeaders",
            spec.allow_headers.as_deref().unwrap_or(DEFAULT_HEADERS),
        )?,
        expose: spec
            .expose_headers
            .as_deref()
            .map(|e| tpl("exposeHeaders", e))
            .transpose()?,
        max_age: match spec.max_age {
            Some(-1) => None,
            Some(m) => Some(m),
            None => Some(1800),
        },
        credentials: spec.allow_credentials,
        preflight: spec.generate_preflight_response.unwrap_or(true),
        ignore_unresolved: spec.ignore_unresolved_variables.unwrap_or(true),
    }))
}

impl Cors {
    /// Renders `t`; an unresolved reference is an error unless ignored.
    fn render(&self, t: &Template, ex: &Exchange) -> Result<String, Fault> {
        if !self.ignore_unresolved {
            if let Some(v) = t.variables().find(|v| ex.resolve(v).is_none()) {
                return Err(Fault::new(
                    500,
                    "steps.cors.UnresolvedVariable",
                    format!("Unresolved variable : {v}"),
                ));
            }
        }
        let s = t.render(ex);
        Ok(if valid_header_value(&s) {
            s
        } else {
            String::new()
        })
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, when it is allowed.
    fn allow_origin(&self, ex: &Exchange, origin: &str) -> Result<Option<String>, Fault> {
        let list = self.render(&self.origins, ex)?;
        let allowed = list
            .split(',')
            .map(str::trim)
            .find(|o| *o == "*" || (!o.is_empty() && o.eq_ignore_ascii_case(origin)));
        Ok(match allowed {
            Some("*") if !self.credentials => Some("*".to_owned()),
            Some(_) => Some(origin.to_owned()),
            None => None,
        })
    }

    fn decide(&self, ex: &mut Exchange, dir: Direction) -> Result<Outcome, Fault> {
        let Some(origin) = ex.request.headers.get("origin").map(str::to_owned) else {
            return Ok(Outcome::Continue);
        };
        let allowed = self.allow_origin(ex, &origin)?;
        let preflight = dir == Direction::Request
            && self.preflight
            && ex.request.method.eq_ignore_ascii_case("OPTIONS")
            && ex
                .request
                .headers
                .get("access-control-request-method")
                .is_some();
        let vary = allowed.as_deref() != Some("*");
        if preflight {
            let mut headers = Vec::new();
            if let Some(a) = allowed {
                headers.push(("access-control-allow-origin".to_owned(), a));
                headers.push((
                    "access-control-allow-methods".to_owned(),
                    self.render(&self.methods, ex)?,
                ));
                headers.push((
                    "access-control-allow-headers".to_owned(),
                    self.render(&self.headers, ex)?,
                ));
                if let Some(m) = self.max_age {
                    headers.push(("access-control-max-age".to_owned(), m.to_string()));
                }
                if self.credentials {
                    headers.push((
                        "access-control-allow-credentials".to_owned(),
                        "true".to_owned(),
                    ));
                }
            }
            if vary {
                headers.push(("vary".to_owned(), "Origin".to_owned()));
            }
            headers.retain(|(_, v)| !v.is_empty());
            return Ok(Outcome::Respond(Box::new(Answer {
                status: 200,
                code: "cors.Preflight".to_owned(),
                headers,
                body: Vec::new(),
            })));
        }
        if let Some(a) = allowed {
            let expose = match &self.expose {
                Some(t) => Some(self.render(t, ex)?),
                None => None,
            };
            let r = Direction::Response;
            ex.set_header(r, "access-control-allow-origin", a);
            if let Some(e) = expose.filter(|e| !e.is_empty()) {
                ex.set_header(r, "access-control-expose-headers", e);
            }
            if self.credentials {
                ex.set_header(r, "access-control-allow-credentials", "true".to_owned());
            }
        }
        if vary {
            ex.add_header(Direction::Response, "vary", "Origin".to_owned());
        }
        Ok(Outcome::Continue)
    }
}

impl Policy for Cors {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        Hook::Ready(match self.decide(ex, dir) {
            Ok(o) => o,
            Err(f) => Outcome::Reject(f),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo};

    fn build_y(y: &str) -> Result<Arc<dyn Policy>, SpecError> {
        build(&BuildContext::default(), serde_norway::from_str(y).unwrap())
    }

    fn ex(method: &str, headers: &[(&str, &str)]) -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), method.into());
        h.push(":path".into(), "/api".into());
        for (k, v) in headers {
            h.push((*k).into(), (*v).into());
        }
        Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Outcome {
        match p.run(ex, Direction::Request) {
            Hook::Ready(o) => o,
            Hook::Pending(_) => panic!("CORS never waits"),
        }
    }

    fn header<'a>(h: &'a [(String, String)], n: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str())
    }

    const PREFLIGHT: &[(&str, &str)] = &[
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "PUT"),
    ];

    #[test]
    fn preflight_is_answered_with_the_defaults() {
        let p = build_y(r#"{allowOrigins: "https://app.example.com, https://b.example"}"#).unwrap();
        let Outcome::Respond(a) = run(&p, &mut ex("OPTIONS", PREFLIGHT)) else {
            panic!("a preflight is answered");
        };
        assert_eq!(a.status, 200);
        assert!(a.body.is_empty());
        let h = &a.headers;
        assert_eq!(
            header(h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(
            header(h, "access-control-allow-methods"),
            Some(DEFAULT_METHODS)
        );
        assert_eq!(
            header(h, "access-control-allow-headers"),
            Some(DEFAULT_HEADERS)
        );
        assert_eq!(header(h, "access-control-max-age"), Some("1800"));
        assert_eq!(header(h, "access-control-allow-credentials"), None);
        assert_eq!(header(h, "vary"), Some("Origin"));

        // An origin not in the list: answered, without CORS headers.
        let mut e = ex(
            "OPTIONS",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "PUT"),
            ],
        );
        let Outcome::Respond(a) = run(&p, &mut e) else {
            panic!("answered");
        };
        assert_eq!(header(&a.headers, "access-control-allow-origin"), None);

        // An OPTIONS that is not a preflight goes on.
        let mut e = ex("OPTIONS", &[("origin", "https://app.example.com")]);
        assert!(matches!(run(&p, &mut e), Outcome::Continue));
    }

    #[test]
    fn actual_requests_get_response_headers() {
        let p = build_y(
            r#"{allowOrigins: "{request.header.origin}", exposeHeaders: "x-a, x-b", allowCredentials: true, maxAge: -1}"#,
        )
        .unwrap();
        let mut e = ex("GET", &[("origin", "https://x.example")]);
        assert!(matches!(run(&p, &mut e), Outcome::Continue));
        let set = &e.response_mutations.set;
        let get = |n: &str| {
            set.iter()
                .find(|(k, _, _)| k == n)
                .map(|(_, v, _)| v.as_str())
        };
        assert_eq!(
            get("access-control-allow-origin"),
            Some("https://x.example")
        );
        assert_eq!(get("access-control-expose-headers"), Some("x-a, x-b"));
        assert_eq!(get("access-control-allow-credentials"), Some("true"));
        assert_eq!(get("vary"), Some("Origin"));

        // No Origin: not a CORS request, nothing added.
        let mut e = ex("GET", &[]);
        assert!(matches!(run(&p, &mut e), Outcome::Continue));
        assert!(e.response_mutations.is_empty());

        let Outcome::Respond(a) = run(&p, &mut ex("OPTIONS", PREFLIGHT)) else {
            panic!("answered");
        };
        assert_eq!(header(&a.headers, "access-control-max-age"), None);
        assert_eq!(
            header(&a.headers, "access-control-allow-credentials"),
            Some("true")
        );
    }

    #[test]
    fn wildcard_and_credentials() {
        let p = build_y(r#"{allowOrigins: "*"}"#).unwrap();
        let mut e = ex("GET", &[("origin", "https://x.example")]);
        run(&p, &mut e);
        assert_eq!(
            e.response_mutations.set,
            vec![("access-control-allow-origin".into(), "*".into(), false)],
            "no Vary for *"
        );
        let p = build_y(r#"{allowOrigins: "*", allowCredentials: true}"#).unwrap();
        let mut e = ex("GET", &[("origin", "https://x.example")]);
        run(&p, &mut e);
        assert_eq!(
            e.response_mutations.set[0].1, "https://x.example",
            "a credentialed answer names the origin"
        );
    }

    #[test]
    fn unresolved_variables() {
        let p = build_y(r#"{allowOrigins: "{allowed.origin}", ignoreUnresolvedVariables: false}"#)
            .unwrap();
        let mut e = ex("GET", &[("origin", "https://x.example")]);
        let Outcome::Reject(f) = run(&p, &mut e) else {
            panic!("unresolved is a fault");
        };
        assert_eq!(
            (f.status, f.code.as_str()),
            (500, "steps.cors.UnresolvedVariable")
        );
        e.set_var("allowed.origin", "https://x.example");
        assert!(matches!(run(&p, &mut e), Outcome::Continue));
        // Ignored (the default): the origin is simply not allowed.
        let p = build_y(r#"{allowOrigins: "{allowed.origin}"}"#).unwrap();
        let mut e = ex("GET", &[("origin", "https://x.example")]);
        assert!(matches!(run(&p, &mut e), Outcome::Continue));
        assert_eq!(
            e.response_mutations.set,
            vec![("vary".into(), "Origin".into(), true)]
        );
    }

    #[test]
    fn refused_at_load() {
        assert!(build_y("{}").unwrap_err().message.contains("allowOrigins"));
        assert_eq!(
            build_y(r#"{allowOrigins: " "}"#).unwrap_err().field,
            "allowOrigins"
        );
        assert_eq!(
            build_y(r#"{allowOrigins: "*", maxAge: -5}"#)
                .unwrap_err()
                .field,
            "maxAge"
        );
        assert_eq!(
            build_y("{allowOrigins: \"a\\nb\"}").unwrap_err().field,
            "allowOrigins"
        );
        assert_eq!(
            build_y(r#"{allowOrigins: "*", allowHeader: x}"#)
                .unwrap_err()
                .field,
            "allowHeader"
        );
    }
}
