//! Run time: an exchange checked against a compiled description, its violations collected.

use serde_json::{json, Map, Value};

use super::compile::{is_json, Api, In, Media, Operation, Param, PathItem, Shape, Types};
use super::paths::{match_parts, percent_decode_path};
use crate::fault::Fault;
use crate::pipeline::Direction;
use crate::vars::{query_pairs, Exchange};

/// Longest a violation message gets: messages quote the offending value.
const MAX_MESSAGE: usize = 240;

/// Violations found so far, at most `max`.
pub struct Violations {
    list: Vec<(String, String)>,
    max: usize,
    more: usize,
}

impl Violations {
    /// No violation yet; at most `max` are kept (the rest only counted).
    pub fn new(max: usize) -> Self {
        Self {
            list: Vec::new(),
            max,
            more: 0,
        }
    }

    /// The violations kept: a JSON pointer into the exchange and a message.
    pub fn entries(&self) -> &[(String, String)] {
        &self.list
    }

    pub(super) fn push(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
        if self.list.len() >= self.max {
            self.more += 1;
            return;
        }
        let mut message: String = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        self.list.push((pointer.into(), message));
    }

    fn full(&self) -> bool {
        self.list.len() >= self.max
    }

    pub fn into_fault(self, status: u16, code: &str, what: &str) -> Result<(), Fault> {
        let Some((p, m)) = self.list.first() else {
            return Ok(());
        };
        let total = self.list.len() + self.more;
        let mut msg = format!("OpenAPI validation of the {what} failed: {p}: {m}");
        if total > 1 {
            msg.push_str(&format!(" (and {} more)", total - 1));
        }
        let mut f = Fault::new(status, code, msg);
        f.violations = Some(Value::Array(
            self.list
                .into_iter()
                .map(|(p, m)| json!({"pointer": p, "message": m}))
                .collect(),
        ));
        Err(f)
    }
}

fn coerce(s: &str, t: Types) -> Value {
    if t.int {
        if let Ok(i) = s.parse::<i64>() {
            return json!(i);
        }
    }
    if t.num || t.int {
        if let Some(n) = s.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return Value::Number(n);
        }
    }
    if t.boolean && (s == "true" || s == "false") {
        return Value::Bool(s == "true");
    }
    Value::String(s.to_owned())
}

/// Nesting and array sizes of a parsed body, checked before the schema sees it.
fn check_shape(v: &Value, max_depth: usize, max_items: usize) -> Result<(), String> {
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        if d > max_depth {
            return Err(format!("nested deeper than {max_depth} levels"));
        }
        match v {
            Value::Array(a) => {
                if a.len() > max_items {
                    return Err(format!(
                        "an array has {} items; at most {max_items} are accepted",
                        a.len()
                    ));
                }
                stack.extend(a.iter().map(|x| (x, d + 1)));
            }
            Value::Object(m) => stack.extend(m.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// Headers every request carries that no spec declares.
fn ambient_header(name: &str) -> bool {
    name.starts_with(':')
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-envoy-")
        || name.starts_with("x-b3-")
        || matches!(
            name,
            "host"
                | "user-agent"
                | "accept"
                | "accept-encoding"
                | "accept-language"
                | "content-type"
                | "content-length"
                | "authorization"
                | "connection"
                | "cookie"
                | "te"
                | "transfer-encoding"
                | "x-request-id"
                | "forwarded"
                | "via"
                | "traceparent"
                | "tracestate"
                | "b3"
                | "origin"
                | "referer"
                | "cache-control"
                | "pragma"
        )
}

impl Api {
    /// The path item and its parameters for `path` (no query string).
    fn find(&self, path: &str) -> Option<(&PathItem, Vec<(String, String)>)> {
        for base in &self.bases {
            let Some(rest) = path.strip_prefix(base.as_str()) else {
                continue;
            };
            if !(rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            let trimmed = rest.trim_matches('/');
            let segs: Vec<String> = if trimmed.is_empty() {
                Vec::new()
            } else {
                trimmed
                    .split('/')
                    .map(|s| percent_decode_path(s).into_owned())
                    .collect()
            };
            for item in &self.paths {
                if item.segments.len() != segs.len() {
                    continue;
                }
                let mut params = Vec::new();
                if item
                    .segments
                    .iter()
                    .zip(&segs)
                    .all(|(parts, s)| match_parts(parts, s, &mut params))
                {
                    return Some((item, params));
                }
            }
        }
        None
    }

    fn operation<'o>(
        &'o self,
        ex: &Exchange,
        v: &mut Violations,
    ) -> Option<(&'o Operation, Vec<(String, String)>)> {
        let path = ex.request.path();
        let Some((item, params)) = self.find(path) else {
            v.push(
                "/path",
                format!("`{path}` matches no path of the API description"),
            );
            return None;
        };
        let method = ex.request.method.as_str();
        match item
            .ops
            .iter()
            .find(|o| o.method.eq_ignore_ascii_case(method))
        {
            Some(op) => Some((op, params)),
            None => {
                let allowed: Vec<&str> = item.ops.iter().map(|o| o.method.as_str()).collect();
                v.push(
                    "/method",
                    format!(
                        "{method} is not defined for `{}` (defined: {})",
                        item.template,
                        allowed.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn validate(&self, idx: Option<usize>, value: &Value, prefix: &str, v: &mut Violations) {
        let Some(validator) = idx.and_then(|i| self.validators.get(i)) else {
            return;
        };
        // Valid input is the common case: `is_valid` short-circuits and builds no error
        // values, so errors are only collected for a body that fails.
        if validator.is_valid(value) {
            return;
        }
        for e in validator.iter_errors(value) {
            if v.full() {
                v.more += 1;
                continue;
            }
            v.push(format!("{prefix}{}", e.instance_path()), e.to_string());
        }
    }

    fn check_params(
        &self,
        ex: &Exchange,
        op: &Operation,
        path_params: &[(String, String)],
        v: &mut Violations,
    ) {
        let query: Vec<(String, String)> = query_pairs(ex.request.query_string()).collect();
        let cookies: Vec<(String, String)> = ex
            .request
            .headers
            .get("cookie")
            .map(|c| {
                c.split(';')
                    .filter_map(|kv| kv.trim().split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let is_prop = |p: &Param, k: &str| match &p.shape {
            Shape::Object(props) => p.form_object && props.contains_key(k),
            _ => false,
        };
        for p in &op.params {
            let prefix = format!("/{}/{}", p.at.as_str(), pointer_token(&p.name));
            let values: Vec<&str> = match p.at {
                In::Path => path_params
                    .iter()
                    .filter(|(n, _)| *n == p.name)
                    .map(|(_, v)| v.as_str())
                    .collect(),
                In::Query if p.deep_object => query
                    .iter()
                    .filter(|(k, _)| k.starts_with(&format!("{}[", p.name)))
                    .map(|(_, v)| v.as_str())
                    .collect(),
                In::Query | In::Cookie if p.form_object => {
                    let pairs = if p.at == In::Query { &query } else { &cookies };
                    pairs
                        .iter()
                        .filter(|(k, _)| is_prop(p, k))
                        .map(|(_, v)| v.as_str())
                        .collect()
                }
                In::Query => query
                    .iter()
                    .filter(|(k, _)| *k == p.name)
                    .map(|(_, v)| v.as_str())
                    .collect(),
                // What the client sent, also for a header the flow owns (taken out of the
                // request before the first step, see `pipeline::claim_owned_headers`).
                In::Header => ex.client_header_values(&p.name).take(1).collect(),
                In::Cookie => cookies
                    .iter()
                    .filter(|(k, _)| *k == p.name)
                    .map(|(_, v)| v.as_str())
                    .collect(),
            };
            if values.is_empty() {
                if p.required {
                    v.push(prefix, "required parameter is missing");
                }
                continue;
            }
            let value = if p.json {
                match serde_json::from_str::<Value>(values[0]) {
                    Ok(x) => x,
                    Err(e) => {
                        v.push(prefix, format!("not valid JSON: {e}"));
                        continue;
                    }
                }
            } else {
                match &p.shape {
                    Shape::Scalar(t) => {
                        if values.len() > 1 {
                            v.push(&prefix, "given more than once");
                        }
                        coerce(values[0], *t)
                    }
                    Shape::Array { items, sep } => {
                        let parts: Vec<&str> = match sep {
                            None => values,
                            Some(c) => values[0].split(*c).collect(),
                        };
                        Value::Array(parts.into_iter().map(|s| coerce(s, *items)).collect())
                    }
                    Shape::Object(props) => {
                        let mut m = Map::new();
                        if p.form_object {
                            let pairs = if p.at == In::Query { &query } else { &cookies };
                            for (k, val) in pairs {
                                if let Some(t) = props.get(k) {
                                    m.insert(k.clone(), coerce(val, *t));
                                }
                            }
                        } else if p.deep_object {
                            for (k, val) in &query {
                                let Some(key) = k
                                    .strip_prefix(&format!("{}[", p.name))
                                    .and_then(|r| r.strip_suffix(']'))
                                else {
                                    continue;
                                };
                                let t = props.get(key).copied().unwrap_or_default();
                                m.insert(key.to_owned(), coerce(val, t));
                            }
                        } else {
                            // form / simple, not exploded: `k1,v1,k2,v2`.
                            let items: Vec<&str> = values[0].split(',').collect();
                            for kv in items.chunks(2) {
                                if let [k, val] = kv {
                                    let t = props.get(*k).copied().unwrap_or_default();
                                    m.insert((*k).to_owned(), coerce(val, t));
                                }
                            }
                        }
                        Value::Object(m)
                    }
                }
            };
            self.validate(p.validator, &value, &prefix, v);
        }
        let declared = |at: In, name: &str| {
            op.params.iter().any(|p| {
                p.at == at
                    && ((p.name == name && !p.form_object)
                        || is_prop(p, name)
                        || (p.deep_object && name.starts_with(&format!("{}[", p.name))))
            })
        };
        if !self.allow.query {
            for (k, _) in &query {
                if !declared(In::Query, k) {
                    v.push(
                        format!("/query/{}", pointer_token(k)),
                        "parameter is not declared",
                    );
                }
            }
        }
        if !self.allow.cookie {
            for (k, _) in &cookies {
                if !declared(In::Cookie, k) {
                    v.push(
                        format!("/cookie/{}", pointer_token(k)),
                        "cookie is not declared",
                    );
                }
            }
        }
        if !self.allow.header {
            for (k, _) in ex.request.headers.iter() {
                if !ambient_header(k) && !declared(In::Header, k) {
                    v.push(
                        format!("/header/{}", pointer_token(k)),
                        "header is not declared",
                    );
                }
            }
        }
    }

    /// Checks a body against the declared media types; `prefix` is `/body`. A JSON body is
    /// read from the exchange's shared parse (`json`), not parsed here again.
    fn check_body<'e>(
        &self,
        media: &[Media],
        required: bool,
        content_type: Option<&str>,
        body: &[u8],
        json: impl FnOnce() -> Option<crate::vars::state::JsonRef<'e>>,
        v: &mut Violations,
    ) {
        if body.is_empty() {
            if required {
                v.push("/body", "a request body is required");
            }
            return;
        }
        let mime = content_type
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let major = mime.split('/').next().unwrap_or_default();
        let found = media
            .iter()
            .find(|m| m.range == mime)
            .or_else(|| media.iter().find(|m| m.range == format!("{major}/*")))
            .or_else(|| media.iter().find(|m| m.range == "*/*"));
        let Some(m) = found else {
            if !media.is_empty() {
                let known: Vec<&str> = media.iter().map(|m| m.range.as_str()).collect();
                let shown = if mime.is_empty() {
                    "none"
                } else {
                    mime.as_str()
                };
                v.push(
                    "/body",
                    format!("content type {shown} is not one of: {}", known.join(", ")),
                );
            }
            return;
        };
        if m.validator.is_none() || !is_json(&mime) {
            return;
        }
        let parsed = json()
            .unwrap_or_else(|| std::borrow::Cow::Owned(crate::vars::state::JsonBody::parse(body)));
        let value = match &parsed.value {
            Ok(x) => x,
            Err(e) => {
                v.push("/body", format!("not valid JSON: {e}"));
                return;
            }
        };
        if let Err(e) = check_shape(value, self.max_depth, self.max_items) {
            v.push("/body", e);
            return;
        }
        self.validate(m.validator, value, "/body", v);
    }

    /// Checks a request (its path, method, parameters and, with `with_body`, its body).
    pub fn check_request(&self, ex: &Exchange, with_body: bool, v: &mut Violations) {
        if let Some((op, params)) = self.operation(ex, v) {
            self.check_params(ex, op, &params, v);
            if let (true, Some(body)) = (with_body, &op.body) {
                let data = ex.request_body.as_deref().unwrap_or_default();
                self.check_body(
                    &body.media,
                    body.required,
                    ex.request.headers.get("content-type"),
                    data,
                    || ex.body_json(Direction::Request),
                    v,
                );
            }
        }
    }

    /// Checks a response (its status and body) against the request's operation.
    pub fn check_response(&self, ex: &Exchange, v: &mut Violations) {
        let Some(resp) = &ex.response else {
            return;
        };
        let mut scratch = Violations::new(1);
        // An unknown operation is the request check's business.
        let Some((op, _)) = self.operation(ex, &mut scratch) else {
            return;
        };
        let code = resp.status.to_string();
        let class = format!("{}XX", code.chars().next().unwrap_or('0'));
        let declared = op
            .responses
            .iter()
            .find(|r| r.status == code)
            .or_else(|| op.responses.iter().find(|r| r.status == class))
            .or_else(|| op.responses.iter().find(|r| r.status == "DEFAULT"));
        match declared {
            None => v.push("/status", format!("status {code} is not declared")),
            Some(r) => {
                let body = ex.response_body.as_deref().unwrap_or_default();
                self.check_body(
                    &r.media,
                    false,
                    resp.headers.get("content-type"),
                    body,
                    || ex.body_json(Direction::Response),
                    v,
                );
            }
        }
    }
}

/// A name as one JSON-pointer reference token (RFC 6901: `~` is `~0`, `/` is `~1`).
fn pointer_token(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains(['~', '/']) {
        std::borrow::Cow::Owned(name.replace('~', "~0").replace('/', "~1"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}
