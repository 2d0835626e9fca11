//! `RaiseFault`: stop the exchange and answer the client with a chosen status, error code,
//! message, headers and (optionally) a body of its own. Usually guarded by a condition.
//!
//! ```yaml
//! spec:
//!   type: RaiseFault
//!   status: 403
//!   errorCode: access.Denied
//!   message: "{request.path} is closed"
//!   headers: {x-reason: closed}
//!   # body: '{"closed": true}'   # replaces the flow's error format
//!   # contentType: application/json
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::{check_header_name, parse_spec, valid_header_value, BuildContext, SpecError};
use crate::expr::Template;
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "RaiseFault";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    status: u16,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
}

#[derive(Debug)]
struct RaiseFault {
    status: u16,
    code: String,
    message: Template,
    headers: Vec<(String, Template)>,
    body: Option<(String, Template)>,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    if !(200..=599).contains(&spec.status) {
        return Err(SpecError::new(
            "status",
            "must be an HTTP status between 200 and 599",
        ));
    }
    let tpl = |field: &str, s: &str| {
        Template::compile(s).map_err(|e| SpecError::new(field, e.to_string()))
    };
    let message = tpl(
        "message",
        spec.message
            .as_deref()
            .unwrap_or(&format!("Raised by policy {}", ctx.name)),
    )?;
    let headers = spec
        .headers
        .iter()
        .map(|(n, v)| {
            let at = format!("headers.{n}");
            let n = check_header_name(n).map_err(|m| SpecError::new(&at, m))?;
            if n == "content-type" {
                return Err(SpecError::new(at, "use contentType to set the body's type"));
            }
            Ok((n, tpl(&at, v)?))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let body = match spec.body {
        Some(b) => {
            let ct = spec.content_type.unwrap_or_else(|| "text/plain".to_owned());
            if !valid_header_value(&ct) {
                return Err(SpecError::new("contentType", "invalid header value"));
            }
            Some((ct, tpl("body", &b)?))
        }
        None if spec.content_type.is_some() => {
            return Err(SpecError::new("contentType", "only meaningful with body"));
        }
        None => None,
    };
    Ok(Arc::new(RaiseFault {
        status: spec.status,
        code: spec
            .error_code
            .unwrap_or_else(|| "steps.raisefault.RaiseFault".to_owned()),
        message,
        headers,
        body,
    }))
}

impl Policy for RaiseFault {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        let mut fault = Fault::new(self.status, self.code.clone(), self.message.render(ex));
        for (n, t) in &self.headers {
            let v = t.render(ex);
            if valid_header_value(&v) {
                fault.headers.push((n.clone(), v));
            }
        }
        if let Some((ct, t)) = &self.body {
            fault.body = Some((ct.clone(), t.render(ex).into_bytes()));
        }
        Hook::Ready(Outcome::Reject(fault))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_y(y: &str) -> Result<Arc<dyn Policy>, SpecError> {
        let ctx = BuildContext {
            name: "deny".into(),
            ..Default::default()
        };
        build(&ctx, serde_norway::from_str(y).unwrap())
    }

    #[test]
    fn raises_with_templates() {
        let p = build_y("{status: 403, errorCode: a.B, message: 'no {flow.name}', headers: {x-r: '{flow.name}'}}").unwrap();
        let mut ex = Exchange {
            flow: "f".into(),
            ..Default::default()
        };
        let Hook::Ready(Outcome::Reject(f)) = p.run(&mut ex, Direction::Request) else {
            panic!("expected a fault");
        };
        assert_eq!(f.status, 403);
        assert_eq!(f.code, "a.B");
        assert_eq!(f.message, "no f");
        assert_eq!(f.headers, vec![("x-r".to_string(), "f".to_string())]);
        assert!(f.body.is_none());
    }

    #[test]
    fn defaults_and_body() {
        let p = build_y(
            "{status: 418, body: '{\"tea\": \"{flow.name}\"}', contentType: application/json}",
        )
        .unwrap();
        let mut ex = Exchange::default();
        let Hook::Ready(Outcome::Reject(f)) = p.run(&mut ex, Direction::Response) else {
            panic!("expected a fault");
        };
        assert_eq!(f.code, "steps.raisefault.RaiseFault");
        assert_eq!(f.message, "Raised by policy deny");
        assert_eq!(f.body.unwrap().1, br#"{"tea": ""}"#.to_vec());
    }

    #[test]
    fn invalid() {
        assert!(build_y("{status: 99}").unwrap_err().field == "status");
        assert!(build_y("{}").is_err());
        assert!(build_y("{status: 400, contentType: x}").is_err());
        assert_eq!(
            build_y("{status: 400, headers: {content-type: x}}")
                .unwrap_err()
                .field,
            "headers.content-type"
        );
    }
}
