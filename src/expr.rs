//! The expression language: CEL conditions and `{variable}` templates over flow variables.
//! Both compile at configuration load; the request path only evaluates.
//!
//! In CEL the request is a map: `request.method`, `request.path`, `request.host`,
//! `request.headers["x-api-key"]` (names lower case), `request.query["model"]`;
//! `response.status`, `response.headers[...]`; policy variables by their dotted names
//! (`client_id`, `ratelimit.quota1.available`). A condition whose evaluation fails (for
//! example a missing header) is false, as in Apigee.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::value::CowVal;
use cel::context::VariableResolver;
use cel::objects::{Key, Map};
use cel::{Context, Env, Program};

use crate::vars::{Exchange, Headers, Value};

#[derive(Debug, thiserror::Error)]
pub enum ExprError {
    #[error("invalid condition `{source_text}`: {message}")]
    Parse {
        source_text: String,
        message: String,
    },
    #[error("invalid template `{0}`: {1}")]
    Template(String, String),
}

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled CEL condition.
pub struct Condition {
    source: String,
    program: Program,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl Condition {
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        let program = ENV.compile(source).map_err(|e| ExprError::Parse {
            source_text: source.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a boolean; an error or a non-boolean result is `false` (logged).
    pub fn eval(&self, ex: &Exchange) -> bool {
        let resolver = ExchangeResolver { ex };
        let mut ctx = Context::with_env(ENV.clone());
        ctx.set_variable_resolver(&resolver);
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            Ok(other) => {
                tracing::debug!(condition = %self.source, result = ?other, "condition is not a boolean; treated as false");
                false
            }
            Err(e) => {
                tracing::debug!(condition = %self.source, error = %e, "condition failed to evaluate; treated as false");
                false
            }
        }
    }
}

struct ExchangeResolver<'a> {
    ex: &'a Exchange,
}

fn str_val(s: &str) -> cel::Value {
    cel::Value::String(Arc::new(s.to_owned()))
}

fn headers_map(h: &Headers) -> cel::Value {
    let mut m: HashMap<Key, cel::Value> = HashMap::with_capacity(h.len());
    for (n, v) in h.iter() {
        // First value wins, as in `Headers::get`.
        m.entry(Key::String(Arc::new(n.to_owned())))
            .or_insert_with(|| str_val(v));
    }
    cel::Value::Map(Map { map: Arc::new(m) })
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Str(s) => str_val(s),
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::Bool(b) => cel::Value::Bool(*b),
    }
}

fn map_of(entries: Vec<(&str, cel::Value)>) -> cel::Value {
    let m: HashMap<Key, cel::Value> = entries
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k.to_owned())), v))
        .collect();
    cel::Value::Map(Map { map: Arc::new(m) })
}

/// Inserts `value` at the dotted `path` inside nested maps.
fn insert_nested(root: &mut HashMap<String, Nested>, path: &str, value: cel::Value) {
    match path.split_once('.') {
        None => {
            root.insert(path.to_owned(), Nested::Leaf(value));
        }
        Some((head, tail)) => {
            let entry = root
                .entry(head.to_owned())
                .or_insert_with(|| Nested::Branch(HashMap::new()));
            if let Nested::Leaf(_) = entry {
                // A scalar and a map under one name: the map wins for member access.
                *entry = Nested::Branch(HashMap::new());
            }
            if let Nested::Branch(m) = entry {
                insert_nested(m, tail, value);
            }
        }
    }
}

enum Nested {
    Leaf(cel::Value),
    Branch(HashMap<String, Nested>),
}

impl Nested {
    fn into_value(self) -> cel::Value {
        match self {
            Nested::Leaf(v) => v,
            Nested::Branch(m) => {
                let m: HashMap<Key, cel::Value> = m
                    .into_iter()
                    .map(|(k, v)| (Key::String(Arc::new(k)), v.into_value()))
                    .collect();
                cel::Value::Map(Map { map: Arc::new(m) })
            }
        }
    }
}

impl ExchangeResolver<'_> {
    fn request_map(&self) -> cel::Value {
        let r = &self.ex.request;
        let headers = headers_map(&r.headers);
        map_of(vec![
            ("method", str_val(&r.method)),
            ("path", str_val(r.path())),
            ("uri", str_val(&r.uri)),
            ("host", str_val(r.hostname())),
            ("scheme", str_val(&r.scheme)),
            ("headers", headers.clone()),
            ("header", headers),
            ("query", self.query_map()),
        ])
    }

    fn query_map(&self) -> cel::Value {
        let query: HashMap<Key, cel::Value> =
            crate::vars::query_pairs(self.ex.request.query_string())
                .map(|(k, v)| (Key::String(Arc::new(k)), cel::Value::String(Arc::new(v))))
                .collect();
        cel::Value::Map(Map {
            map: Arc::new(query),
        })
    }

    /// Resolves `name`. CEL asks for the longest dotted name first (`request.method`
    /// before `request`), so common lookups are answered directly, without building maps.
    fn value_of(&self, name: &str) -> Option<cel::Value> {
        let ex = self.ex;
        let r = &ex.request;
        match name {
            "request.method" => return Some(str_val(&r.method)),
            "request.path" => return Some(str_val(r.path())),
            "request.uri" => return Some(str_val(&r.uri)),
            "request.host" => return Some(str_val(r.hostname())),
            "request.scheme" => return Some(str_val(&r.scheme)),
            "request.headers" | "request.header" => return Some(headers_map(&r.headers)),
            "request.query" => return Some(self.query_map()),
            "request" => return Some(self.request_map()),
            "response.status" | "response.code" => {
                return ex.response.as_ref().map(|r| cel::Value::Int(i64::from(r.status)))
            }
            "response.headers" | "response.header" => {
                return ex.response.as_ref().map(|r| headers_map(&r.headers))
            }
            "response" => {
                let r = ex.response.as_ref()?;
                let headers = headers_map(&r.headers);
                return Some(map_of(vec![
                    ("status", cel::Value::Int(i64::from(r.status))),
                    ("code", cel::Value::Int(i64::from(r.status))),
                    ("headers", headers.clone()),
                    ("header", headers),
                ]));
            }
            "flow.name" => return Some(str_val(&ex.flow)),
            "flow" => return Some(map_of(vec![("name", str_val(&ex.flow))])),
            "client.ip" => return Some(ex.client_ip().map_or(cel::Value::Null, str_val)),
            "client" => {
                return Some(map_of(vec![(
                    "ip",
                    ex.client_ip().map_or(cel::Value::Null, str_val),
                )]))
            }
            _ => {}
        }
        if let Some(v) = ex.vars.get(name) {
            return Some(to_cel(v));
        }
        if let Some(h) = name
            .strip_prefix("request.header.")
            .or_else(|| name.strip_prefix("request.headers."))
        {
            return r.headers.get(h).map(str_val);
        }
        if name.starts_with("request.") || name.starts_with("response.") {
            // Let CEL select the field from the parent map (e.g. `request.query.page`).
            return None;
        }
        // A prefix of dotted variables becomes a nested map: `ratelimit.q.used` is
        // reachable as `ratelimit.q.used` in CEL, and `ratelimit.q` is a map.
        let prefix_len = name.len() + 1;
        let mut root: HashMap<String, Nested> = HashMap::new();
        let scalar_vars = ex.vars.iter().map(|(k, v)| (k.as_str(), to_cel(v)));
        let attrs = ex.attributes.iter().map(|(k, v)| (k.as_str(), str_val(v)));
        for (k, v) in scalar_vars.chain(attrs) {
            if k.len() > prefix_len && k.starts_with(name) && k.as_bytes()[name.len()] == b'.' {
                insert_nested(&mut root, &k[prefix_len..], v);
            }
        }
        if root.is_empty() {
            return ex.attributes.get(name).map(|v| str_val(v));
        }
        Some(Nested::Branch(root).into_value())
    }
}

impl VariableResolver for ExchangeResolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let v = self.value_of(variable)?;
        let boxed: Box<dyn cel::common::value::Val> = v.try_into().ok()?;
        Some(CowVal::Owned(boxed))
    }
}

/// A string with `{flow.variable}` references, e.g. `Bearer {kvm.creds.token}`. A brace
/// whose content is not a variable name (as in a JSON literal) is kept as text, so JSON
/// payloads need no escaping. A reference that does not resolve renders as empty text.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(String),
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Template {
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            match after.find('}') {
                Some(close) if is_var_name(&after[..close]) => {
                    lit.push_str(&rest[..open]);
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var(after[..close].to_owned()));
                    rest = &after[close + 1..];
                }
                _ => {
                    lit.push_str(&rest[..=open]);
                    rest = after;
                }
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Self { parts })
    }

    /// The variable names the template refers to.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// True when the template has no variable references.
    pub fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    pub fn render(&self, ex: &Exchange) -> String {
        match self.parts.as_slice() {
            [] => String::new(),
            [Part::Lit(s)] => s.clone(),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Var(name) => {
                            if let Some(v) = ex.lookup(name) {
                                out.push_str(&v);
                            }
                        }
                    }
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo};

    fn ex() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "GET".into());
        h.push(":path".into(), "/v1/models?page=2".into());
        h.push(":authority".into(), "api.local".into());
        h.push("x-tier".into(), "gold".into());
        let mut ex = Exchange {
            flow: "demo".into(),
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        ex.set_var("client_id", "c-1");
        ex.set_var("ratelimit.q1.available", 7);
        ex
    }

    #[test]
    fn conditions_over_request_and_vars() {
        let ex = ex();
        let t = |s: &str| Condition::compile(s).unwrap().eval(&ex);
        assert!(t("request.method == 'GET'"));
        assert!(t("request.path.startsWith('/v1/')"));
        assert!(t("request.headers['x-tier'] == 'gold'"));
        assert!(t("request.query['page'] == '2'"));
        assert!(t("client_id == 'c-1'"));
        assert!(t("ratelimit.q1.available > 5"));
        assert!(t("flow.name == 'demo'"));
        assert!(!t("request.header.x_missing == 'a'"));
        assert!(t("request.query.page == '2'"));
        assert!(t("request.uri == '/v1/models?page=2'"));
        assert!(!t("has(request.headers.host)"));
        assert!(t("ratelimit.q1 == {'available': 7}"));
        assert!(!t("request.headers['x-missing'] == 'a'"));
        assert!(!t("'x-missing' in request.headers"));
        assert!(!t("unknown_var == 1"));
        assert!(!t("1 + 1"));
    }

    #[test]
    fn bad_condition_is_a_load_error() {
        let err = Condition::compile("request.method ==").unwrap_err();
        assert!(err.to_string().contains("request.method =="));
    }

    #[test]
    fn templates() {
        let ex = ex();
        let r = |s: &str| Template::compile(s).unwrap().render(&ex);
        assert_eq!(r("plain"), "plain");
        assert_eq!(r("{request.method} {request.path}"), "GET /v1/models");
        assert_eq!(r("id={client_id};"), "id=c-1;");
        assert_eq!(r(r#"{"a":1,"b":"{flow.name}"}"#), r#"{"a":1,"b":"demo"}"#);
        assert_eq!(r("{missing}x"), "x");
        assert_eq!(r("{ not a var }"), "{ not a var }");
        assert_eq!(r("{"), "{");
        assert!(Template::compile("abc").unwrap().is_static());
    }
}
