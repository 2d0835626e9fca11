//! `OasValidation`: checks requests (and optionally responses) against an OpenAPI 3.0 or
//! 3.1 description kept beside the configuration.
//!
//! ```yaml
//! spec:
//!   type: OasValidation
//!   spec: specs/petstore.yaml        # YAML or JSON, relative to the configuration directory
//!   basePath: /v1                    # optional; default: the paths of the spec's `servers`
//!   validateBody: true               # JSON request bodies against their schema
//!   allowUnspecifiedParameters: {query: true, header: true, cookie: true}
//!   response: off                    # off | log | enforce
//!   maxViolations: 10
//!   maxDepth: 64                     # JSON nesting refused beyond this
//!   maxArrayItems: 10000
//! ```
//!
//! Everything is compiled at load: path templates into segment matchers, every operation's
//! parameter and body schemas into `jsonschema` validators over a registry that holds the
//! document and the sibling files it `$ref`s. OpenAPI-only schema keywords are rewritten
//! first: 3.0 `nullable` and boolean `exclusiveMinimum`/`exclusiveMaximum` (3.0 schemas are
//! then validated as draft 7, 3.1 as 2020-12), `readOnly` properties are not required in
//! requests (nor `writeOnly` ones in responses), and a `discriminator` over `$ref`s becomes
//! a dispatch on the property's value, so a body is checked against the one schema it names.
//! A `$ref` cycle that never descends into the instance (`A: {allOf: [$ref: A]}`), a remote
//! `$ref`, or a `$ref` leaving the spec's directory refuses the configuration.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonschema::{Draft, Registry, Validator};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::pipeline::{Direction, Outcome, Policy};
use crate::vars::{percent_decode, query_pairs, Exchange};

pub const TYPE: &str = "OasValidation";
pub const FAILED: &str = "policies.oasvalidation.Failed";

/// Sibling files a spec may pull in through `$ref`s.
const MAX_FILES: usize = 64;
/// Longest a violation message gets: messages quote the offending value.
const MAX_MESSAGE: usize = 240;

fn yes() -> bool {
    true
}
fn default_max_violations() -> usize {
    10
}
fn default_max_depth() -> usize {
    64
}
fn default_max_items() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    spec: String,
    #[serde(default)]
    base_path: Option<String>,
    #[serde(default = "yes")]
    validate_body: bool,
    #[serde(default)]
    allow_unspecified_parameters: AllowSpec,
    #[serde(default)]
    response: ResponseMode,
    #[serde(default = "default_max_violations")]
    max_violations: usize,
    #[serde(default = "default_max_depth")]
    max_depth: usize,
    #[serde(default = "default_max_items")]
    max_array_items: usize,
}

/// Apigee's `AllowUnspecifiedParameters`: all true by default.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct AllowSpec {
    #[serde(default = "yes")]
    query: bool,
    #[serde(default = "yes")]
    header: bool,
    #[serde(default = "yes")]
    cookie: bool,
}

impl Default for AllowSpec {
    fn default() -> Self {
        Self {
            query: true,
            header: true,
            cookie: true,
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum ResponseMode {
    #[default]
    Off,
    /// Violations are logged and counted in `<policy>.response.failed`; the response passes.
    Log,
    /// A response that breaks the spec becomes a 502.
    Enforce,
}

/// Why a spec does not load.
#[derive(Debug, thiserror::Error)]
pub enum OasError {
    #[error("cannot read `{path}`: {message}")]
    Read { path: String, message: String },
    #[error("`{path}` is not valid YAML or JSON: {message}")]
    Parse { path: String, message: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("cyclic $ref that never descends into the instance: {0}")]
    Cycle(String),
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
}

fn invalid(at: impl Into<String>, message: impl Into<String>) -> OasError {
    OasError::Invalid {
        at: at.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Loading: the document and the files it refers to, as JSON.

struct Doc {
    uri: String,
    path: PathBuf,
    value: Value,
}

/// A node of a loaded document: which document, and the JSON pointer inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Loc {
    doc: usize,
    ptr: String,
}

impl Loc {
    fn child(&self, key: &str) -> Loc {
        Loc {
            doc: self.doc,
            ptr: format!("{}/{}", self.ptr, key.replace('~', "~0").replace('/', "~1")),
        }
    }
}

fn file_uri(p: &Path) -> String {
    let mut s = String::from("file://");
    for b in p.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A JSON pointer as a URI fragment (percent-encoded where a fragment does not allow).
fn fragment(ptr: &str) -> String {
    let mut s = String::with_capacity(ptr.len());
    for b in ptr.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A JSON value read from YAML leniently: integers beyond 64 bits (OpenAI's spec has
/// `minimum: -9223372036854776000`) become floats, and `200:` keys become strings.
struct Lenient(Value);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor).map(Lenient)
    }
}

struct LenientVisitor;

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

impl<'de> serde::de::Visitor<'de> for LenientVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(json!(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(json!(v))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(float(v as f64))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Value, E> {
        Ok(float(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Lenient(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some((Lenient(k), Lenient(v))) = map.next_entry()? {
            let key = match k {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null => "null".to_owned(),
                _ => return Err(serde::de::Error::custom("a mapping key is not a scalar")),
            };
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

fn read_doc(path: &Path) -> Result<Value, OasError> {
    let shown = path.display().to_string();
    super::record_read(path);
    let text = std::fs::read_to_string(path).map_err(|e| OasError::Read {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let parse = |message: String| OasError::Parse {
        path: shown.clone(),
        message,
    };
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| parse(e.to_string()))
    } else {
        serde_norway::from_str::<Lenient>(&text)
            .map(|l| l.0)
            .map_err(|e| parse(e.to_string()))
    }
}

/// A spec document (YAML or JSON by extension) as OasValidation reads it: YAML numbers beyond
/// JSON's range and non-string mapping keys are accepted. For benchmarks and tools.
pub fn read_document(path: &Path) -> Result<Value, OasError> {
    read_doc(path)
}

/// Every `$ref` string in `v`.
fn collect_refs<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => stack.push(x),
                    }
                }
            }
            Value::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
}

fn split_ref(r: &str) -> (&str, &str) {
    r.split_once('#').unwrap_or((r, ""))
}

fn canonical(p: &Path) -> Result<PathBuf, OasError> {
    p.canonicalize().map_err(|e| OasError::Read {
        path: p.display().to_string(),
        message: e.to_string(),
    })
}

/// Loads the spec and every file its `$ref`s reach (all under the spec's directory).
fn load_all(root: &Path) -> Result<Vec<Doc>, OasError> {
    let root = canonical(root)?;
    let home = root.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut docs: Vec<Doc> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut queue = vec![root];
    while let Some(path) = queue.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        if docs.len() >= MAX_FILES {
            return Err(OasError::Unsupported(format!(
                "the spec refers to more than {MAX_FILES} files"
            )));
        }
        let value = read_doc(&path)?;
        let mut refs = Vec::new();
        collect_refs(&value, &mut refs);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for r in refs {
            let (file, _) = split_ref(r);
            if file.is_empty() {
                continue;
            }
            if file.contains("://") {
                return Err(OasError::Unsupported(format!(
                    "remote $ref `{r}`: keep referenced files beside the spec"
                )));
            }
            let target = canonical(&dir.join(&*percent_decode(file)))?;
            if !target.starts_with(&home) {
                return Err(OasError::Unsupported(format!(
                    "$ref `{r}` leaves the spec's directory"
                )));
            }
            queue.push(target);
        }
        docs.push(Doc {
            uri: file_uri(&path),
            path,
            value,
        });
    }
    Ok(docs)
}

/// The loaded documents and how to follow `$ref`s between them.
struct DocSet {
    docs: Vec<Doc>,
    by_path: HashMap<PathBuf, usize>,
}

impl DocSet {
    fn new(docs: Vec<Doc>) -> Self {
        let by_path = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.path.clone(), i))
            .collect();
        Self { docs, by_path }
    }

    fn get(&self, loc: &Loc) -> Option<&Value> {
        self.docs.get(loc.doc)?.value.pointer(&loc.ptr)
    }

    fn shown(&self, loc: &Loc) -> String {
        let name = self.docs[loc.doc]
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name}#{}", loc.ptr)
    }

    /// Where `r`, written in document `from`, points.
    fn resolve(&self, from: usize, r: &str) -> Result<Loc, OasError> {
        let (file, frag) = split_ref(r);
        let doc = if file.is_empty() {
            from
        } else {
            let dir = self.docs[from]
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let p = canonical(&dir.join(&*percent_decode(file)))?;
            *self
                .by_path
                .get(&p)
                .ok_or_else(|| invalid(r, "file not loaded"))?
        };
        let ptr = percent_decode(frag).into_owned();
        if !(ptr.is_empty() || ptr.starts_with('/')) {
            return Err(OasError::Unsupported(format!(
                "$ref `{r}`: only JSON-pointer fragments are supported"
            )));
        }
        let loc = Loc { doc, ptr };
        if self.get(&loc).is_none() {
            return Err(invalid(r, "$ref points at nothing"));
        }
        Ok(loc)
    }

    /// Follows `$ref`s from `loc` to an object that is not a reference.
    fn deref(&self, loc: Loc) -> Result<(Loc, &Map<String, Value>), OasError> {
        let mut loc = loc;
        for _ in 0..32 {
            let v = self
                .get(&loc)
                .ok_or_else(|| invalid(self.shown(&loc), "missing"))?;
            let m = v
                .as_object()
                .ok_or_else(|| invalid(self.shown(&loc), "expected an object"))?;
            match m.get("$ref").and_then(Value::as_str) {
                Some(r) => loc = self.resolve(loc.doc, r)?,
                None => return Ok((loc, m)),
            }
        }
        Err(OasError::Cycle(self.shown(&loc)))
    }

    /// Refuses `$ref` cycles that validation would follow forever: through `$ref`,
    /// `allOf`/`anyOf`/`oneOf`/`not`/`if`/`then`/`else` without entering a property or item.
    fn check_cycles(&self) -> Result<(), OasError> {
        let mut targets = Vec::new();
        for (i, d) in self.docs.iter().enumerate() {
            let mut refs = Vec::new();
            collect_refs(&d.value, &mut refs);
            for r in refs {
                targets.push(self.resolve(i, r)?);
            }
        }
        let mut done: HashSet<Loc> = HashSet::new();
        for t in targets {
            let mut path = Vec::new();
            self.visit(t, &mut path, &mut done)?;
        }
        Ok(())
    }

    fn visit(&self, loc: Loc, path: &mut Vec<Loc>, done: &mut HashSet<Loc>) -> Result<(), OasError> {
        if done.contains(&loc) {
            return Ok(());
        }
        if let Some(i) = path.iter().position(|l| *l == loc) {
            let chain: Vec<String> = path[i..]
                .iter()
                .chain(std::iter::once(&loc))
                .map(|l| self.shown(l))
                .collect();
            return Err(OasError::Cycle(chain.join(" -> ")));
        }
        if path.len() > 256 {
            return Err(OasError::Unsupported("$ref chains deeper than 256".into()));
        }
        let mut next = Vec::new();
        if let Some(v) = self.get(&loc) {
            inplace_refs(v, &mut next);
        }
        path.push(loc.clone());
        for r in next {
            let target = self.resolve(loc.doc, &r)?;
            self.visit(target, path, done)?;
        }
        path.pop();
        done.insert(loc);
        Ok(())
    }
}

/// The `$ref`s a schema applies to the same instance (not to its properties or items).
fn inplace_refs(v: &Value, out: &mut Vec<String>) {
    let Some(m) = v.as_object() else { return };
    if let Some(Value::String(r)) = m.get("$ref") {
        out.push(r.clone());
    }
    for k in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(a)) = m.get(k) {
            for x in a {
                inplace_refs(x, out);
            }
        }
    }
    for k in ["not", "if", "then", "else"] {
        if let Some(x) = m.get(k) {
            inplace_refs(x, out);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rewriting OpenAPI schema dialects into plain JSON Schema.

#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    Request,
    Response,
}

fn rewrite(v: &mut Value, v30: bool, view: View) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, v30, view)),
        Value::Object(m) => {
            for x in m.values_mut() {
                rewrite(x, v30, view);
            }
            fix_exclusive(m);
            if v30 {
                rewrite_30(v);
            }
            if let Value::Object(m) = v {
                hide_required(m, view);
            }
        }
        _ => {}
    }
}

/// Draft 4 style boolean `exclusiveMinimum`/`exclusiveMaximum` (OpenAPI 3.0, and found in
/// real 3.1 documents too) as the numeric bounds later drafts expect.
fn fix_exclusive(m: &mut Map<String, Value>) {
    for (flag, bound) in [
        ("exclusiveMaximum", "maximum"),
        ("exclusiveMinimum", "minimum"),
    ] {
        if let Some(Value::Bool(b)) = m.get(flag) {
            let b = *b;
            m.remove(flag);
            if b {
                if let Some(n) = m.remove(bound) {
                    m.insert(flag.to_owned(), n);
                }
            }
        }
    }
}

/// 3.0 `nullable`, which JSON Schema does not know.
fn rewrite_30(v: &mut Value) {
    let Value::Object(m) = v else { return };
    match m.get("nullable") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            m.remove("nullable");
            return;
        }
        _ => return,
    }
    m.remove("nullable");
    if let Some(Value::String(t)) = m.get("type") {
        let t = t.clone();
        m.insert("type".into(), json!([t, "null"]));
        if let Some(Value::Array(e)) = m.get_mut("enum") {
            if !e.contains(&Value::Null) {
                e.push(Value::Null);
            }
        }
    } else {
        // `nullable` beside `$ref` / `allOf` (no `type`): null or the schema.
        let inner = std::mem::take(m);
        *v = json!({"anyOf": [Value::Object(inner), {"type": "null"}]});
    }
}

/// `readOnly` properties are not required in requests, `writeOnly` ones not in responses.
fn hide_required(m: &mut Map<String, Value>, view: View) {
    let flag = match view {
        View::Request => "readOnly",
        View::Response => "writeOnly",
    };
    let hidden: Vec<String> = match m.get("properties") {
        Some(Value::Object(props)) => props
            .iter()
            .filter(|(_, p)| p.get(flag) == Some(&Value::Bool(true)))
            .map(|(k, _)| k.clone())
            .collect(),
        _ => return,
    };
    if hidden.is_empty() {
        return;
    }
    if let Some(Value::Array(req)) = m.get_mut("required") {
        req.retain(|r| r.as_str().is_none_or(|r| !hidden.iter().any(|h| h == r)));
    }
}

/// A `discriminator` over `oneOf`/`anyOf` of `$ref`s, planned with the documents at hand:
/// the property is required and one of the known values, and the value selects the one
/// schema the instance must match (plain `oneOf` would also report every other branch's
/// failures). Values come from the explicit `mapping`, else from the branch's own
/// `enum`/`const` for the property (OpenAI's spec relies on that), else the schema name.
struct Dispatch {
    doc: usize,
    ptr: String,
    key: &'static str,
    prop: String,
    cases: Vec<(Value, String)>,
}

fn plan_discriminators(ds: &DocSet) -> Vec<Dispatch> {
    let mut out = Vec::new();
    for (doc, d) in ds.docs.iter().enumerate() {
        let mut stack: Vec<(String, &Value)> = vec![(String::new(), &d.value)];
        while let Some((ptr, v)) = stack.pop() {
            match v {
                Value::Object(m) => {
                    if let Some(p) = plan_one(ds, doc, &ptr, m) {
                        out.push(p);
                    }
                    for (k, x) in m {
                        if x.is_object() || x.is_array() {
                            let esc = k.replace('~', "~0").replace('/', "~1");
                            stack.push((format!("{ptr}/{esc}"), x));
                        }
                    }
                }
                Value::Array(a) => {
                    for (i, x) in a.iter().enumerate() {
                        if x.is_object() || x.is_array() {
                            stack.push((format!("{ptr}/{i}"), x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn plan_one(ds: &DocSet, doc: usize, ptr: &str, m: &Map<String, Value>) -> Option<Dispatch> {
    let prop = m
        .get("discriminator")?
        .get("propertyName")?
        .as_str()?
        .to_owned();
    let key = ["oneOf", "anyOf"]
        .into_iter()
        .find(|k| m.get(*k).is_some_and(Value::is_array))?;
    let refs: Vec<String> = m
        .get(key)?
        .as_array()?
        .iter()
        .map(|b| b.get("$ref").and_then(Value::as_str).map(str::to_owned))
        .collect::<Option<_>>()?;
    let mut cases: Vec<(Value, String)> = Vec::new();
    if let Some(Value::Object(mapping)) = m.get("discriminator").and_then(|d| d.get("mapping")) {
        for (value, target) in mapping {
            let Some(t) = target.as_str() else { continue };
            let t = if t.contains('#') || t.contains('/') {
                t.to_owned()
            } else {
                format!("#/components/schemas/{t}")
            };
            cases.push((json!(value), t));
        }
    }
    for r in &refs {
        if cases.iter().any(|(_, t)| t == r) {
            continue;
        }
        let own: Vec<Value> = ds
            .resolve(doc, r)
            .and_then(|l| ds.deref(l))
            .ok()
            .and_then(|(l, _)| ds.deref(l.child("properties").child(&prop)).ok())
            .map(|(_, p)| match (p.get("const"), p.get("enum")) {
                (Some(c), _) => vec![c.clone()],
                (None, Some(Value::Array(e))) => e.clone(),
                _ => Vec::new(),
            })
            .unwrap_or_default();
        if own.is_empty() {
            let name = r.rsplit('/').next().unwrap_or(r).to_owned();
            cases.push((json!(name), r.clone()));
        } else {
            cases.extend(own.into_iter().map(|v| (v, r.clone())));
        }
    }
    Some(Dispatch {
        doc,
        ptr: ptr.to_owned(),
        key,
        prop,
        cases,
    })
}

fn apply_dispatch(root: &mut Value, d: &Dispatch) {
    let Some(Value::Object(m)) = root.pointer_mut(&d.ptr) else {
        return;
    };
    let values: Vec<Value> = d.cases.iter().map(|(v, _)| v.clone()).collect();
    let prop = d.prop.clone();
    let mut all = vec![json!({"required": [prop], "properties": {prop.clone(): {"enum": values}}})];
    for (value, target) in &d.cases {
        all.push(json!({
            "if": {"properties": {prop.clone(): {"const": value}}, "required": [prop]},
            "then": {"$ref": target}
        }));
    }
    m.remove(d.key);
    match m.get_mut("allOf") {
        Some(Value::Array(a)) => a.extend(all),
        _ => {
            m.insert("allOf".into(), Value::Array(all));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The compiled description.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum In {
    Path,
    Query,
    Header,
    Cookie,
}

impl In {
    fn as_str(self) -> &'static str {
        match self {
            In::Path => "path",
            In::Query => "query",
            In::Header => "header",
            In::Cookie => "cookie",
        }
    }
}

/// Which JSON types a parameter's text may become.
#[derive(Debug, Clone, Copy, Default)]
struct Types {
    int: bool,
    num: bool,
    boolean: bool,
}

#[derive(Debug, Clone)]
enum Shape {
    Scalar(Types),
    Array { items: Types, sep: Option<char> },
    Object(HashMap<String, Types>),
}

#[derive(Debug)]
struct Param {
    name: String,
    at: In,
    required: bool,
    shape: Shape,
    /// `content: {application/json: ...}` instead of `schema`: the value is JSON text.
    json: bool,
    deep_object: bool,
    /// An object in `form` style, exploded: each property is its own query (or cookie)
    /// name (`?color=red&size=2` for `{color, size}`).
    form_object: bool,
    validator: Option<usize>,
}

#[derive(Debug)]
struct Media {
    /// `application/json`, `application/*`, `*/*` ...
    range: String,
    validator: Option<usize>,
}

#[derive(Debug)]
struct Body {
    required: bool,
    media: Vec<Media>,
}

#[derive(Debug)]
struct ResponseSpec {
    /// `200`, `2XX` or `default`.
    status: String,
    media: Vec<Media>,
}

#[derive(Debug)]
struct Operation {
    method: String,
    params: Vec<Param>,
    body: Option<Body>,
    responses: Vec<ResponseSpec>,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Param(String),
}

#[derive(Debug)]
struct PathItem {
    template: String,
    segments: Vec<Vec<Part>>,
    ops: Vec<Operation>,
}

fn parse_template(t: &str) -> Result<Vec<Vec<Part>>, String> {
    let trimmed = t.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    trimmed
        .split('/')
        .map(|seg| {
            let mut parts = Vec::new();
            let mut rest = seg;
            while let Some(open) = rest.find('{') {
                if open > 0 {
                    parts.push(Part::Lit(rest[..open].to_owned()));
                }
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| format!("unclosed `{{` in path `{t}`"))?;
                let name = &rest[open + 1..open + close];
                if matches!(parts.last(), Some(Part::Param(_))) {
                    return Err(format!("path `{t}`: two parameters in a row are ambiguous"));
                }
                parts.push(Part::Param(name.to_owned()));
                rest = &rest[open + close + 1..];
            }
            if !rest.is_empty() {
                parts.push(Part::Lit(percent_decode_path(rest).into_owned()));
            }
            Ok(parts)
        })
        .collect()
}

/// Matches one path segment against its template parts, pushing the parameters' values
/// (nothing when it does not match). Linear in the segment: parameters never follow each
/// other, so each literal after a parameter is taken at its leftmost occurrence past the
/// parameter's first character (which leaves the most room for the rest), and a literal
/// that ends the segment must be its suffix. No backtracking, whatever the template.
fn match_parts(parts: &[Part], s: &str, out: &mut Vec<(String, String)>) -> bool {
    let mark = out.len();
    let ok = match_parts_greedy(parts, s, out);
    if !ok {
        out.truncate(mark);
    }
    ok
}

fn match_parts_greedy(parts: &[Part], mut s: &str, out: &mut Vec<(String, String)>) -> bool {
    let mut i = 0;
    while let Some(part) = parts.get(i) {
        match (part, parts.get(i + 1)) {
            (Part::Lit(l), _) => match s.strip_prefix(l.as_str()) {
                Some(r) => s = r,
                None => return false,
            },
            (Part::Param(n), None) => {
                if s.is_empty() {
                    return false;
                }
                out.push((n.clone(), s.to_owned()));
                return true;
            }
            (Part::Param(n), Some(Part::Lit(l))) => {
                let at = if i + 2 == parts.len() {
                    if s.len() <= l.len() || !s.ends_with(l.as_str()) {
                        return false;
                    }
                    s.len() - l.len()
                } else {
                    let Some(first) = s.chars().next().map(char::len_utf8) else {
                        return false;
                    };
                    match s[first..].find(l.as_str()) {
                        Some(j) => first + j,
                        None => return false,
                    }
                };
                out.push((n.clone(), s[..at].to_owned()));
                s = &s[at + l.len()..];
                i += 1;
            }
            (Part::Param(_), Some(Part::Param(_))) => return false,
        }
        i += 1;
    }
    s.is_empty()
}

/// One path template matched against one path the way the validator matches them (each
/// segment percent-decoded): the parameters, or `None`. For the fuzz targets and tests.
#[doc(hidden)]
pub fn match_path_template(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    let segments = parse_template(template).ok()?;
    let trimmed = path.trim_matches('/');
    let segs: Vec<String> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').map(|s| percent_decode_path(s).into_owned()).collect()
    };
    if segments.len() != segs.len() {
        return None;
    }
    let mut params = Vec::new();
    segments
        .iter()
        .zip(&segs)
        .all(|(parts, s)| match_parts(parts, s, &mut params))
        .then_some(params)
}

#[derive(Debug)]
struct OasValidation {
    name: String,
    /// Base paths tried in order (`""` last when none is configured).
    bases: Vec<String>,
    /// Most literal templates first.
    paths: Vec<PathItem>,
    validators: Vec<Validator>,
    validate_body: bool,
    body_schemas: bool,
    allow: AllowSpec,
    response: ResponseMode,
    max_violations: usize,
    max_depth: usize,
    max_items: usize,
}

/// Schemas to compile, and which view (request or response) each belongs to.
struct Pending {
    schemas: Vec<(Loc, View)>,
}

impl Pending {
    fn add(&mut self, loc: Loc, view: View) -> usize {
        self.schemas.push((loc, view));
        self.schemas.len() - 1
    }
}

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn schema_types(ds: &DocSet, loc: &Loc, depth: usize) -> (Option<&'static str>, Types) {
    let mut t = Types::default();
    let Ok((loc, m)) = ds.deref(loc.clone()) else {
        return (None, t);
    };
    let mut kind = None;
    let mut names: Vec<&str> = match m.get("type") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if names.is_empty() && depth < 3 {
        for k in ["anyOf", "oneOf", "allOf"] {
            if let Some(Value::Array(a)) = m.get(k) {
                for (i, _) in a.iter().enumerate() {
                    let (k2, t2) = schema_types(ds, &loc.child(k).child(&i.to_string()), depth + 1);
                    t.int |= t2.int;
                    t.num |= t2.num;
                    t.boolean |= t2.boolean;
                    kind = kind.or(k2);
                }
            }
        }
    }
    for n in names.drain(..) {
        match n {
            "integer" => t.int = true,
            "number" => t.num = true,
            "boolean" => t.boolean = true,
            "array" => kind = Some("array"),
            "object" => kind = Some("object"),
            _ => {}
        }
    }
    (kind, t)
}

fn compile_param(
    ds: &DocSet,
    loc: Loc,
    pending: &mut Pending,
) -> Result<Option<Param>, OasError> {
    let (loc, m) = ds.deref(loc)?;
    let at_text = ds.shown(&loc);
    let name = m
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(&at_text, "parameter without `name`"))?;
    let at = match m.get("in").and_then(Value::as_str) {
        Some("path") => In::Path,
        Some("query") => In::Query,
        Some("header") => In::Header,
        Some("cookie") => In::Cookie,
        other => {
            return Err(invalid(
                &at_text,
                format!("parameter `in` must be path, query, header or cookie, not {other:?}"),
            ))
        }
    };
    let name = if at == In::Header {
        let lower = name.to_ascii_lowercase();
        // OpenAPI: these header parameters are ignored (the spec describes them elsewhere).
        if matches!(lower.as_str(), "accept" | "content-type" | "authorization") {
            return Ok(None);
        }
        lower
    } else {
        name.to_owned()
    };
    let required = at == In::Path || m.get("required") == Some(&Value::Bool(true));
    let style = m.get("style").and_then(Value::as_str).unwrap_or(match at {
        In::Query | In::Cookie => "form",
        In::Path | In::Header => "simple",
    });
    // Refused rather than read as another style: `label` (`/.a.b`) and `matrix` (`/;x=a`)
    // path values would otherwise be checked as `simple` text and pass or fail by accident.
    let supported = match at {
        In::Path | In::Header => style == "simple",
        In::Query => matches!(style, "form" | "spaceDelimited" | "pipeDelimited" | "deepObject"),
        In::Cookie => style == "form",
    };
    if !supported {
        return Err(OasError::Unsupported(format!(
            "{at_text}: parameter `{name}` in {}: style `{style}` (tollgate reads simple path and \
             header parameters, form/spaceDelimited/pipeDelimited/deepObject query parameters, \
             form cookies)",
            at.as_str()
        )));
    }
    let explode = m
        .get("explode")
        .and_then(Value::as_bool)
        .unwrap_or(style == "form");
    let (schema_loc, json) = if m.contains_key("schema") {
        (Some(loc.child("schema")), false)
    } else if let Some(Value::Object(content)) = m.get("content") {
        let media = content.keys().next().cloned().unwrap_or_default();
        let l = loc.child("content").child(&media);
        let has = ds.get(&l.child("schema")).is_some();
        (has.then(|| l.child("schema")), true)
    } else {
        (None, false)
    };
    let (kind, types) = schema_loc
        .as_ref()
        .map(|l| schema_types(ds, l, 0))
        .unwrap_or_default();
    let shape = match kind {
        Some("array") if !json => {
            let items = schema_loc
                .as_ref()
                .and_then(|l| ds.deref(l.clone()).ok())
                .map(|(l, _)| schema_types(ds, &l.child("items"), 0).1)
                .unwrap_or_default();
            let sep = match (at, style, explode) {
                (In::Query | In::Cookie, "form", true) => None,
                (_, "spaceDelimited", _) => Some(' '),
                (_, "pipeDelimited", _) => Some('|'),
                _ => Some(','),
            };
            Shape::Array { items, sep }
        }
        Some("object") if !json => {
            let mut props = HashMap::new();
            if let Some(l) = &schema_loc {
                if let Ok((l, sm)) = ds.deref(l.clone()) {
                    if let Some(Value::Object(p)) = sm.get("properties") {
                        for k in p.keys() {
                            let t = schema_types(ds, &l.child("properties").child(k), 0).1;
                            props.insert(k.clone(), t);
                        }
                    }
                }
            }
            Shape::Object(props)
        }
        _ => Shape::Scalar(types),
    };
    let form_object = matches!(shape, Shape::Object(_))
        && matches!(at, In::Query | In::Cookie)
        && style == "form"
        && explode;
    let validator = schema_loc.map(|l| pending.add(l, View::Request));
    Ok(Some(Param {
        name,
        at,
        required,
        shape,
        json,
        deep_object: style == "deepObject",
        form_object,
        validator,
    }))
}

fn compile_media(
    loc: &Loc,
    content: &Map<String, Value>,
    view: View,
    pending: &mut Pending,
) -> Vec<Media> {
    content
        .iter()
        .map(|(range, mt)| {
            let validator = (is_json(range) && mt.get("schema").is_some())
                .then(|| pending.add(loc.child(range).child("schema"), view));
            Media {
                range: range.to_ascii_lowercase(),
                validator,
            }
        })
        .collect()
}

fn is_json(media: &str) -> bool {
    let m = media
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    m == "application/json" || m.ends_with("+json")
}

fn compile_operation(
    ds: &DocSet,
    method: &str,
    op_loc: Loc,
    path_params: &[Loc],
    pending: &mut Pending,
    with_responses: bool,
) -> Result<Operation, OasError> {
    let (op_loc, op) = ds.deref(op_loc)?;
    let mut param_locs: Vec<Loc> = path_params.to_vec();
    if let Some(Value::Array(ps)) = op.get("parameters") {
        for i in 0..ps.len() {
            param_locs.push(op_loc.child("parameters").child(&i.to_string()));
        }
    }
    let mut params: Vec<Param> = Vec::new();
    for l in param_locs {
        if let Some(p) = compile_param(ds, l, pending)? {
            // Operation parameters override path-item ones of the same name and location.
            params.retain(|q| !(q.name == p.name && q.at == p.at));
            params.push(p);
        }
    }
    let body = match op.get("requestBody") {
        None => None,
        Some(_) => {
            let (bl, b) = ds.deref(op_loc.child("requestBody"))?;
            let media = match b.get("content") {
                Some(Value::Object(c)) => compile_media(&bl.child("content"), c, View::Request, pending),
                _ => Vec::new(),
            };
            Some(Body {
                required: b.get("required") == Some(&Value::Bool(true)),
                media,
            })
        }
    };
    let mut responses = Vec::new();
    if let Some(Value::Object(rs)) = op.get("responses") {
        for status in rs.keys() {
            let media = if with_responses {
                let (rl, r) = ds.deref(op_loc.child("responses").child(status))?;
                match r.get("content") {
                    Some(Value::Object(c)) => {
                        compile_media(&rl.child("content"), c, View::Response, pending)
                    }
                    _ => Vec::new(),
                }
            } else {
                Vec::new()
            };
            responses.push(ResponseSpec {
                status: status.to_ascii_uppercase(),
                media,
            });
        }
    }
    Ok(Operation {
        method: method.to_ascii_uppercase(),
        params,
        body,
        responses,
    })
}

fn server_bases(root: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(Value::Array(servers)) = root.get("servers") {
        for s in servers {
            let Some(url) = s.get("url").and_then(Value::as_str) else {
                continue;
            };
            let mut url = url.to_owned();
            if let Some(Value::Object(vars)) = s.get("variables") {
                for (k, v) in vars {
                    let d = v.get("default").and_then(Value::as_str).unwrap_or_default();
                    url = url.replace(&format!("{{{k}}}"), d);
                }
            }
            let path = match url.find("://") {
                Some(i) => url[i + 3..]
                    .find('/')
                    .map_or(String::new(), |j| url[i + 3 + j..].to_owned()),
                None => url,
            };
            let path = path.trim_end_matches('/').to_owned();
            if !path.is_empty() && path.starts_with('/') && !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

/// Compiles the description at `path` (the policy's whole load-time work).
fn compile(path: &Path, spec: &Spec) -> Result<OasValidation, OasError> {
    let docs = load_all(path)?;
    let ds = DocSet::new(docs);
    let root = &ds.docs[0].value;
    let version = match root.get("openapi").and_then(Value::as_str) {
        Some(v) if v.starts_with("3.0") => false,
        Some(v) if v.starts_with("3.1") => true,
        Some(v) => {
            return Err(OasError::Unsupported(format!(
                "OpenAPI version {v}: tollgate reads 3.0 and 3.1"
            )))
        }
        None if root.get("swagger").is_some() => {
            return Err(OasError::Unsupported(
                "Swagger 2.0: convert the description to OpenAPI 3.0 or 3.1".into(),
            ))
        }
        None => return Err(invalid("openapi", "not an OpenAPI document (no `openapi` field)")),
    };
    let v30 = !version;
    ds.check_cycles()?;

    let with_responses = spec.response != ResponseMode::Off;
    let mut pending = Pending {
        schemas: Vec::new(),
    };
    let mut paths = Vec::new();
    if let Some(Value::Object(ps)) = root.get("paths") {
        for template in ps.keys() {
            let item_loc = Loc {
                doc: 0,
                ptr: String::new(),
            }
            .child("paths")
            .child(template);
            let (item_loc, item) = ds.deref(item_loc)?;
            let segments = parse_template(template).map_err(|m| invalid("paths", m))?;
            let mut path_params = Vec::new();
            if let Some(Value::Array(a)) = item.get("parameters") {
                for i in 0..a.len() {
                    path_params.push(item_loc.child("parameters").child(&i.to_string()));
                }
            }
            let mut ops = Vec::new();
            for m in METHODS {
                if item.contains_key(*m) {
                    let op = compile_operation(
                        &ds,
                        m,
                        item_loc.child(m),
                        &path_params,
                        &mut pending,
                        with_responses,
                    )
                    .map_err(|e| match e {
                        OasError::Invalid { at, message } => invalid(
                            format!("{} {template}: {at}", m.to_ascii_uppercase()),
                            message,
                        ),
                        e => e,
                    })?;
                    ops.push(op);
                }
            }
            paths.push(PathItem {
                template: template.clone(),
                segments,
                ops,
            });
        }
    }
    // Concrete paths win over templated ones (`/users/me` before `/users/{id}`).
    paths.sort_by_key(|p| {
        let literal = p
            .segments
            .iter()
            .filter(|s| s.iter().all(|x| matches!(x, Part::Lit(_))))
            .count();
        (std::cmp::Reverse(literal), p.template.clone())
    });

    // One registry per view, each holding every document rewritten for that view.
    let dispatches = plan_discriminators(&ds);
    let draft = if v30 { Draft::Draft7 } else { Draft::Draft202012 };
    let mut validators = Vec::with_capacity(pending.schemas.len());
    let mut registries: Vec<(View, Registry<'static>)> = Vec::new();
    for view in [View::Request, View::Response] {
        if !pending.schemas.iter().any(|(_, v)| *v == view) {
            continue;
        }
        let resources = ds.docs.iter().enumerate().map(|(i, d)| {
            let mut v = d.value.clone();
            for p in dispatches.iter().filter(|p| p.doc == i) {
                apply_dispatch(&mut v, p);
            }
            rewrite(&mut v, v30, view);
            (d.uri.clone(), draft.create_resource(v))
        });
        let registry = Registry::new()
            .draft(draft)
            .extend(resources)
            .and_then(|b| b.prepare())
            .map_err(|e| invalid("spec", format!("cannot index the schemas: {e}")))?;
        registries.push((view, registry));
    }
    for (loc, view) in &pending.schemas {
        let Some((_, registry)) = registries.iter().find(|(v, _)| v == view) else {
            return Err(invalid("spec", "internal: no registry for a schema"));
        };
        let target = format!("{}#{}", ds.docs[loc.doc].uri, fragment(&loc.ptr));
        let v = jsonschema::options()
            .with_draft(draft)
            .with_registry(registry)
            .should_validate_formats(true)
            .build(&json!({ "$ref": target }))
            .map_err(|e| invalid(ds.shown(loc), format!("schema does not compile: {e}")))?;
        validators.push(v);
    }

    let bases = match &spec.base_path {
        Some(b) => vec![b.trim_end_matches('/').to_owned()],
        None => {
            let mut b = server_bases(root);
            b.push(String::new());
            b
        }
    };
    let body_schemas = paths
        .iter()
        .flat_map(|p| &p.ops)
        .any(|o| o.body.is_some());
    Ok(OasValidation {
        name: String::new(),
        bases,
        paths,
        validators,
        validate_body: spec.validate_body,
        body_schemas,
        allow: spec.allow_unspecified_parameters,
        response: spec.response,
        max_violations: spec.max_violations.max(1),
        max_depth: spec.max_depth,
        max_items: spec.max_array_items,
    })
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let path = Path::new(&spec.spec);
    let path = match (&ctx.config_dir, path.is_absolute()) {
        (Some(dir), false) => dir.join(path),
        _ => path.to_path_buf(),
    };
    if let Some(b) = &spec.base_path {
        if !b.starts_with('/') {
            return Err(SpecError::new("basePath", "must start with `/`"));
        }
    }
    let mut p = compile(&path, &spec).map_err(|e| SpecError::new("spec", e.to_string()))?;
    p.name.clone_from(&ctx.name);
    Ok(Arc::new(p))
}

// ---------------------------------------------------------------------------------------
// Run time.

/// Violations found so far, at most `max`.
struct Violations {
    list: Vec<(String, String)>,
    max: usize,
    more: usize,
}

impl Violations {
    fn push(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
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

    fn into_fault(self, status: u16, what: &str) -> Result<(), Fault> {
        let Some((p, m)) = self.list.first() else {
            return Ok(());
        };
        let total = self.list.len() + self.more;
        let mut msg = format!("OpenAPI validation of the {what} failed: {p}: {m}");
        if total > 1 {
            msg.push_str(&format!(" (and {} more)", total - 1));
        }
        let mut f = Fault::new(status, FAILED, msg);
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

impl OasValidation {
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

    fn operation<'o>(&'o self, ex: &Exchange, v: &mut Violations) -> Option<(&'o Operation, Vec<(String, String)>)> {
        let path = ex.request.path();
        let Some((item, params)) = self.find(path) else {
            v.push("/path", format!("`{path}` matches no path of the API description"));
            return None;
        };
        let method = ex.request.method.as_str();
        match item.ops.iter().find(|o| o.method.eq_ignore_ascii_case(method)) {
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

    fn check_params(&self, ex: &Exchange, op: &Operation, path_params: &[(String, String)], v: &mut Violations) {
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
                    v.push(format!("/query/{}", pointer_token(k)), "parameter is not declared");
                }
            }
        }
        if !self.allow.cookie {
            for (k, _) in &cookies {
                if !declared(In::Cookie, k) {
                    v.push(format!("/cookie/{}", pointer_token(k)), "cookie is not declared");
                }
            }
        }
        if !self.allow.header {
            for (k, _) in ex.request.headers.iter() {
                if !ambient_header(k) && !declared(In::Header, k) {
                    v.push(format!("/header/{}", pointer_token(k)), "header is not declared");
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
                let shown = if mime.is_empty() { "none" } else { mime.as_str() };
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
        let parsed =
            json().unwrap_or_else(|| std::borrow::Cow::Owned(crate::vars::state::JsonBody::parse(body)));
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

    fn check_request(&self, ex: &Exchange) -> Result<(), Fault> {
        let mut v = Violations {
            list: Vec::new(),
            max: self.max_violations,
            more: 0,
        };
        if let Some((op, params)) = self.operation(ex, &mut v) {
            self.check_params(ex, op, &params, &mut v);
            if let (true, Some(body)) = (self.validate_body, &op.body) {
                let data = ex.request_body.as_deref().unwrap_or_default();
                self.check_body(
                    &body.media,
                    body.required,
                    ex.request.headers.get("content-type"),
                    data,
                    || ex.body_json(Direction::Request),
                    &mut v,
                );
            }
        }
        v.into_fault(400, "request")
    }

    fn check_response(&self, ex: &mut Exchange) -> Result<(), Fault> {
        let Some(resp) = &ex.response else {
            return Ok(());
        };
        let mut v = Violations {
            list: Vec::new(),
            max: self.max_violations,
            more: 0,
        };
        let mut scratch = Violations {
            list: Vec::new(),
            max: 1,
            more: 0,
        };
        // An unknown operation is the request check's business.
        let Some((op, _)) = self.operation(ex, &mut scratch) else {
            return Ok(());
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
                    &mut v,
                );
            }
        }
        let failed = !v.list.is_empty();
        match self.response {
            ResponseMode::Enforce => v.into_fault(502, "response"),
            _ => {
                if failed {
                    let shown: Vec<String> =
                        v.list.iter().map(|(p, m)| format!("{p}: {m}")).collect();
                    tracing::warn!(policy = %self.name, violations = ?shown, "response breaks the API description");
                    ex.set_var(format!("{}.response.failed", self.name), true);
                }
                Ok(())
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

/// Decodes `%XX` in a path segment (`+` stays a plus in paths).
fn percent_decode_path(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('+') {
        let protected = s.replace('+', "%2B");
        return std::borrow::Cow::Owned(percent_decode(&protected).into_owned());
    }
    percent_decode(s)
}

impl Policy for OasValidation {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        match dir {
            Direction::Request => self.validate_body && self.body_schemas,
            Direction::Response => self.response != ResponseMode::Off,
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Outcome<'a> {
        Outcome::Ready(match dir {
            Direction::Request => self.check_request(ex),
            Direction::Response => {
                if self.response == ResponseMode::Off {
                    Ok(())
                } else {
                    self.check_response(ex)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo, ResponseInfo};

    pub(crate) fn exchange(method: &str, uri: &str, headers: &[(&str, &str)], body: Option<&str>) -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), method.into());
        h.push(":path".into(), uri.into());
        for (k, v) in headers {
            h.push((*k).into(), (*v).into());
        }
        Exchange {
            request: RequestInfo::from_headers(h),
            request_body: body.map(|b| b.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn policy(dir: &Path, extra: &str) -> Result<Arc<dyn Policy>, SpecError> {
        let ctx = BuildContext {
            name: "oas".into(),
            config_dir: Some(dir.to_path_buf()),
            ..Default::default()
        };
        build(&ctx, serde_norway::from_str(&format!("spec: spec.yaml\n{extra}")).unwrap())
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange, dir: Direction) -> Result<(), Fault> {
        match p.run(ex, dir) {
            Outcome::Ready(r) => r,
            Outcome::Pending(_) => panic!("OasValidation never waits"),
        }
    }

    fn pointers(f: &Fault) -> Vec<String> {
        f.violations
            .as_ref()
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|x| x["pointer"].as_str().unwrap_or_default().to_owned()).collect())
            .unwrap_or_default()
    }

    const PETS_30: &str = r##"
openapi: 3.0.3
info: {title: pets, version: "1"}
servers: [{url: "https://api.example.com/{ver}", variables: {ver: {default: v1}}}]
paths:
  /pets:
    get:
      parameters:
        - {name: limit, in: query, schema: {type: integer, maximum: 100}}
        - {name: tags, in: query, style: form, explode: false, schema: {type: array, items: {type: string, enum: [a, b]}}}
        - {name: x-trace, in: header, required: true, schema: {type: string, pattern: "^[0-9a-f]+$"}}
        - {name: session, in: cookie, schema: {type: string, minLength: 3}}
      responses: {"200": {description: ok}}
    post:
      requestBody:
        required: true
        content:
          application/json: {schema: {$ref: "#/components/schemas/Pet"}}
      responses:
        "201":
          description: made
          content: {application/json: {schema: {$ref: "#/components/schemas/Pet"}}}
  /pets/{id}:
    parameters: [{name: id, in: path, required: true, schema: {type: integer}}]
    get: {responses: {"200": {description: ok}}}
  /pets/mine:
    get: {responses: {"200": {description: ok}}}
  /files/{name}.json:
    get: {responses: {"200": {description: ok}}}
components:
  schemas:
    Pet:
      type: object
      required: [id, name, kind]
      properties:
        id: {type: integer, readOnly: true}
        name: {type: string, nullable: true}
        age: {type: integer, minimum: 0, exclusiveMinimum: true}
        kind: {type: string}
      discriminator: {propertyName: kind}
      oneOf: [{$ref: "#/components/schemas/Cat"}, {$ref: "./more.yaml#/Dog"}]
    Cat:
      type: object
      required: [lives]
      properties: {lives: {type: integer}}
"##;

    fn pets() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "spec.yaml", PETS_30);
        write(d.path(), "more.yaml", "Dog:\n  type: object\n  required: [barks]\n  properties: {barks: {type: boolean}}\n");
        d
    }

    #[test]
    fn paths_methods_and_parameters() {
        let d = pets();
        let p = policy(d.path(), "").unwrap();
        let ok = [("x-trace", "ab12")];
        let mut ex = exchange("GET", "/v1/pets?limit=5&tags=a,b", &ok, None);
        run(&p, &mut ex, Direction::Request).unwrap();
        // Trailing slash, server base path from the variable default, no base at all.
        let mut ex = exchange("GET", "/pets/?limit=5", &ok, None);
        run(&p, &mut ex, Direction::Request).unwrap();
        // Concrete path before the template; percent-encoded segment; mixed template segment.
        let mut ex = exchange("GET", "/v1/pets/mine", &[], None);
        run(&p, &mut ex, Direction::Request).unwrap();
        let mut ex = exchange("GET", "/v1/pets/%34%32", &[], None);
        run(&p, &mut ex, Direction::Request).unwrap();
        let mut ex = exchange("GET", "/v1/files/report.json", &[], None);
        run(&p, &mut ex, Direction::Request).unwrap();

        let mut ex = exchange("GET", "/v1/pets/abc", &[], None);
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (400, FAILED));
        assert_eq!(pointers(&f), ["/path/id"]);

        let mut ex = exchange("GET", "/v1/nothing", &[], None);
        assert_eq!(pointers(&run(&p, &mut ex, Direction::Request).unwrap_err()), ["/path"]);
        let mut ex = exchange("DELETE", "/v1/pets", &[], None);
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/method"]);
        assert!(f.message.contains("GET, POST"), "{}", f.message);

        let mut ex = exchange(
            "GET",
            "/v1/pets?limit=500&tags=a,c",
            &[("x-trace", "XYZ"), ("cookie", "session=ab; other=1")],
            None,
        );
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(
            pointers(&f),
            ["/query/limit", "/query/tags/1", "/header/x-trace", "/cookie/session"]
        );
        let mut ex = exchange("GET", "/v1/pets?limit=ten", &[], None);
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/query/limit", "/header/x-trace"]);
        assert!(f.message.contains("required parameter is missing") || f.message.contains("integer"));
    }

    #[test]
    fn unspecified_parameters() {
        let d = pets();
        let p = policy(d.path(), "allowUnspecifiedParameters: {query: false, header: false, cookie: false}").unwrap();
        let mut ex = exchange(
            "GET",
            "/v1/pets?limit=1&debug=1",
            &[("x-trace", "a"), ("x-extra", "1"), ("user-agent", "t"), ("cookie", "session=abc; zz=1")],
            None,
        );
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/query/debug", "/cookie/zz", "/header/x-extra"]);
        // Allowed by default.
        let p = policy(d.path(), "").unwrap();
        run(&p, &mut ex, Direction::Request).unwrap();
    }

    #[test]
    fn bodies_30() {
        let d = pets();
        let p = policy(d.path(), "").unwrap();
        assert!(p.needs_body(Direction::Request));
        let json = [("content-type", "application/json; charset=utf-8")];
        // readOnly `id` not required; nullable name; discriminator picks Cat.
        let mut ex = exchange("POST", "/v1/pets", &json, Some(r#"{"name": null, "kind": "Cat", "lives": 9}"#));
        run(&p, &mut ex, Direction::Request).unwrap();
        // Sibling file through the discriminator: Dog needs `barks`.
        let mut ex = exchange("POST", "/v1/pets", &json, Some(r#"{"name": "rex", "kind": "Dog"}"#));
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/body"], "{f:?}");
        assert!(f.message.contains("barks"), "{}", f.message);
        // Unknown discriminator value, 3.0 exclusiveMinimum.
        let mut ex = exchange("POST", "/v1/pets", &json, Some(r#"{"name": "x", "kind": "Cow", "age": 0}"#));
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        let ps = pointers(&f);
        assert!(ps.contains(&"/body/kind".to_owned()) && ps.contains(&"/body/age".to_owned()), "{ps:?}");

        for (ct, body, want) in [
            ("application/json", "{not json", "not valid JSON"),
            ("text/plain", "hello", "content type text/plain is not one of"),
            ("application/json", "", "required"),
        ] {
            let mut ex = exchange("POST", "/v1/pets", &[("content-type", ct)], Some(body));
            let f = run(&p, &mut ex, Direction::Request).unwrap_err();
            assert!(f.message.contains(want), "{ct} {body}: {}", f.message);
        }
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let mut ex = exchange("POST", "/v1/pets", &json, Some(&deep));
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert!(f.message.contains("nested deeper than 64"), "{}", f.message);
        let big = format!("[{}1]", "1,".repeat(20_000));
        let mut ex = exchange("POST", "/v1/pets", &json, Some(&big));
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert!(f.message.contains("at most 10000"), "{}", f.message);
        let p2 = policy(d.path(), "maxViolations: 2").unwrap();
        let mut ex = exchange("POST", "/v1/pets", &json, Some(r#"{"name": 1, "kind": 2, "age": "x"}"#));
        let f = run(&p2, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f).len(), 2);
        assert!(f.message.contains("more"), "{}", f.message);
    }

    #[test]
    fn responses_log_and_enforce() {
        let d = pets();
        let resp = |p: &Arc<dyn Policy>, status: u16, body: &str| {
            let mut ex = exchange("POST", "/v1/pets", &[], None);
            let mut h = Headers::new();
            h.push("content-type".into(), "application/json".into());
            ex.response = Some(ResponseInfo { status, headers: h });
            ex.response_body = Some(body.as_bytes().to_vec());
            let r = run(p, &mut ex, Direction::Response);
            (r, ex.lookup("oas.response.failed").map(|s| s.into_owned()))
        };
        let off = policy(d.path(), "").unwrap();
        assert!(!off.needs_body(Direction::Response));
        let enforce = policy(d.path(), "response: enforce").unwrap();
        assert!(enforce.needs_body(Direction::Response));
        // writeOnly/readOnly: `id` is required in responses.
        assert!(resp(&enforce, 201, r#"{"id": 1, "name": "a", "kind": "Cat", "lives": 1}"#).0.is_ok());
        let (r, _) = resp(&enforce, 201, r#"{"name": "a", "kind": "Cat", "lives": 1}"#);
        let f = r.unwrap_err();
        assert_eq!(f.status, 502);
        let (r, _) = resp(&enforce, 500, "{}");
        assert_eq!(pointers(&r.unwrap_err()), ["/status"]);
        let log = policy(d.path(), "response: log").unwrap();
        let (r, failed) = resp(&log, 500, "{}");
        assert!(r.is_ok());
        assert_eq!(failed.as_deref(), Some("true"));
    }

    const STYLES_31: &str = r##"
openapi: 3.1.0
info: {title: styles, version: "1"}
paths:
  /items:
    get:
      parameters:
        - {name: t, in: query, schema: {type: array, items: {type: string, enum: [a, b]}}}
        - {name: s, in: query, style: spaceDelimited, explode: false, schema: {type: array, items: {type: integer}}}
        - {name: p, in: query, style: pipeDelimited, explode: false, schema: {type: array, items: {type: integer}}}
        - name: d
          in: query
          style: deepObject
          schema: {type: object, properties: {min: {type: integer}, max: {type: integer, maximum: 10}}}
        - name: f
          in: query
          schema:
            type: object
            required: [color]
            properties: {color: {type: string, enum: [red, blue]}, size: {type: integer}}
        - {name: since, in: query, schema: {type: string, format: date-time}}
        - {name: x-id, in: header, schema: {type: string, format: uuid}}
        - {name: "a/b~c", in: query, schema: {type: integer}}
      responses: {"200": {description: ok}}
    post:
      requestBody:
        content:
          application/json:
            schema:
              type: object
              properties: {when: {type: string, format: date-time}, id: {type: string, format: uuid}}
      responses: {"201": {description: made}}
  /a+b/{n}:
    get: {responses: {"200": {description: ok}}}
"##;

    fn styles() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "spec.yaml", STYLES_31);
        d
    }

    fn request_pointers(p: &Arc<dyn Policy>, uri: &str, headers: &[(&str, &str)], body: Option<&str>) -> Vec<String> {
        let method = if body.is_some() { "POST" } else { "GET" };
        let mut ex = exchange(method, uri, headers, body);
        match run(p, &mut ex, Direction::Request) {
            Ok(()) => Vec::new(),
            Err(f) => pointers(&f),
        }
    }

    #[test]
    fn styles_and_explode() {
        let d = styles();
        let p = policy(d.path(), "allowUnspecifiedParameters: {query: false}").unwrap();
        let ok = |uri: &str| assert_eq!(request_pointers(&p, uri, &[], None), Vec::<String>::new(), "{uri}");
        // form + explode (the default): one name, repeated.
        ok("/items?t=a&t=b");
        assert_eq!(request_pointers(&p, "/items?t=a&t=c", &[], None), ["/query/t/1"]);
        // spaceDelimited (encoded as %20 or +) and pipeDelimited.
        ok("/items?s=1%202+3&p=4|5");
        assert_eq!(request_pointers(&p, "/items?s=1%20x", &[], None), ["/query/s/1"]);
        assert_eq!(request_pointers(&p, "/items?p=4|y|6", &[], None), ["/query/p/1"]);
        // deepObject.
        ok("/items?d[min]=1&d[max]=9");
        assert_eq!(request_pointers(&p, "/items?d[min]=1&d[max]=11", &[], None), ["/query/d/max"]);
        // form + explode object: each property is its own query name, and a declared one.
        ok("/items?color=red&size=2");
        assert_eq!(request_pointers(&p, "/items?color=green", &[], None), ["/query/f/color"]);
        assert_eq!(request_pointers(&p, "/items?color=red&size=big", &[], None), ["/query/f/size"]);
        assert_eq!(request_pointers(&p, "/items?size=2", &[], None), ["/query/f"], "color is required");
        assert_eq!(request_pointers(&p, "/items?colour=red", &[], None), ["/query/colour"]);
    }

    #[test]
    fn formats_are_validated() {
        let d = styles();
        let p = policy(d.path(), "").unwrap();
        let uuid = [("x-id", "0b4a4e1e-5f9e-4c5b-9d7a-3f7f0c6f1a2b")];
        assert!(request_pointers(&p, "/items?since=2024-05-01T10:00:00Z", &uuid, None).is_empty());
        assert_eq!(
            request_pointers(&p, "/items?since=yesterday", &[("x-id", "not-a-uuid")], None),
            ["/query/since", "/header/x-id"]
        );
        let json = [("content-type", "application/json")];
        let good = r#"{"when": "2024-05-01T10:00:00+02:00", "id": "0b4a4e1e-5f9e-4c5b-9d7a-3f7f0c6f1a2b"}"#;
        assert!(request_pointers(&p, "/items", &json, Some(good)).is_empty());
        let bad = r#"{"when": "2024-13-45", "id": "1234"}"#;
        let mut ps = request_pointers(&p, "/items", &json, Some(bad));
        ps.sort();
        assert_eq!(ps, ["/body/id", "/body/when"]);
    }

    #[test]
    fn pointers_escape_names_and_plus_in_paths_is_literal() {
        let d = styles();
        let p = policy(d.path(), "allowUnspecifiedParameters: {query: false, header: false}").unwrap();
        // RFC 6901: `~` is `~0`, `/` is `~1`, in declared and undeclared names alike.
        assert_eq!(request_pointers(&p, "/items?a%2Fb~c=x", &[], None), ["/query/a~1b~0c"]);
        assert_eq!(
            request_pointers(&p, "/items?x%2Fy~=1", &[("x-a~b", "1")], None),
            ["/query/x~1y~0", "/header/x-a~0b"]
        );
        // `+` in a template literal is a plus (as in the request path), not a space.
        assert!(request_pointers(&p, "/a+b/1", &[], None).is_empty());
        assert!(request_pointers(&p, "/a%2Bb/1", &[], None).is_empty());
        assert_eq!(request_pointers(&p, "/a%20b/1", &[], None), ["/path"]);
    }

    #[test]
    fn json_specs_load() {
        let d = tempfile::tempdir().unwrap();
        let spec = json!({
            "openapi": "3.0.3",
            "info": {"title": "json", "version": "1"},
            "paths": {"/n/{id}": {"put": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "parts.json#/Thing"}}}},
                "responses": {"204": {"description": "done"}}
            }}}
        });
        write(d.path(), "spec.json", &spec.to_string());
        write(d.path(), "parts.json", r#"{"Thing": {"type": "object", "required": ["v"], "properties": {"v": {"type": "string", "nullable": true}}}}"#);
        let ctx = BuildContext {
            name: "oas".into(),
            config_dir: Some(d.path().to_path_buf()),
            ..Default::default()
        };
        let p = build(&ctx, serde_norway::from_str("spec: spec.json").unwrap()).unwrap();
        let json = [("content-type", "application/json")];
        let mut ex = exchange("PUT", "/n/7", &json, Some(r#"{"v": null}"#));
        run(&p, &mut ex, Direction::Request).unwrap();
        let mut ex = exchange("PUT", "/n/x", &json, Some(r#"{"v": 1}"#));
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/path/id", "/body/v"]);
        // A JSON spec is parsed as JSON: YAML syntax in it is a parse error naming the file.
        write(d.path(), "spec.json", "openapi: 3.0.3\n");
        let e = build(&ctx, serde_norway::from_str("spec: spec.json").unwrap()).unwrap_err();
        assert!(e.message.contains("spec.json") && e.message.contains("not valid YAML or JSON"), "{e}");
    }

    #[test]
    fn unsupported_styles_are_refused_at_load() {
        let d = tempfile::tempdir().unwrap();
        for (param, style) in [
            ("{name: id, in: path, required: true, style: label, schema: {type: string}}", "label"),
            ("{name: id, in: path, required: true, style: matrix, schema: {type: array, items: {type: string}}}", "matrix"),
            ("{name: q, in: query, style: simple, schema: {type: string}}", "simple"),
            ("{name: h, in: header, style: form, schema: {type: string}}", "form"),
            ("{name: c, in: cookie, style: deepObject, schema: {type: object}}", "deepObject"),
        ] {
            write(
                d.path(),
                "spec.yaml",
                &format!("openapi: 3.1.0\ninfo: {{title: t, version: '1'}}\npaths:\n  /x/{{id}}:\n    get:\n      parameters: [{param}]\n      responses: {{'200': {{description: ok}}}}\n"),
            );
            let e = policy(d.path(), "").unwrap_err();
            assert_eq!(e.field, "spec");
            assert!(e.message.contains("unsupported") && e.message.contains(&format!("style `{style}`")), "{style}: {}", e.message);
        }
    }

    #[test]
    fn bad_specs_are_refused_clearly() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("swagger: '2.0'\ninfo: {title: x, version: '1'}\npaths: {}\n", "Swagger 2.0"),
            ("openapi: 4.0.0\npaths: {}\n", "OpenAPI version 4.0.0"),
            ("openapi: 3.1.0\ncomponents: {schemas: {A: {$ref: '#/components/schemas/B'}, B: {allOf: [{$ref: '#/components/schemas/A'}]}}}\npaths: {}\n", "cyclic"),
            ("openapi: 3.1.0\npaths: {/a: {get: {requestBody: {content: {application/json: {schema: {$ref: 'https://example.com/x.json'}}}}}}}\n", "remote $ref"),
            ("openapi: 3.1.0\npaths: {/a: {get: {requestBody: {content: {application/json: {schema: {$ref: '../outside.yaml'}}}}}}}\n", "outside"),
            ("openapi: 3.1.0\npaths: {/a: {get: {requestBody: {content: {application/json: {schema: {$ref: '#/nope'}}}}}}}\n", "points at nothing"),
            ("openapi: 3.1.0\npaths: {/a: {get: {requestBody: {content: {application/json: {schema: {type: string, pattern: '(['}}}}}}}\n", "does not compile"),
            ("openapi: 3.1.0\npaths: {/a: {get: {parameters: [{name: x, in: body}]}}}\n", "parameter `in`"),
            ("openapi: [unclosed\n", "not valid YAML"),
        ];
        std::fs::write(d.path().parent().unwrap().join("outside.yaml"), "{}").ok();
        for (text, want) in cases {
            write(d.path(), "spec.yaml", text);
            let e = policy(d.path(), "").unwrap_err();
            assert_eq!(e.field, "spec");
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
        let e = policy(&d.path().join("missing"), "").unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
        // Structural recursion (a tree) is fine.
        write(d.path(), "spec.yaml", "openapi: 3.1.0\ninfo: {title: t, version: '1'}\npaths:\n  /t:\n    post:\n      requestBody: {content: {application/json: {schema: {$ref: '#/components/schemas/T'}}}}\ncomponents: {schemas: {T: {type: object, properties: {kids: {type: array, items: {$ref: '#/components/schemas/T'}}}}}}\n");
        let p = policy(d.path(), "").unwrap();
        let mut ex = exchange("POST", "/t", &[("content-type", "application/json")], Some(r#"{"kids": [{"kids": [{"kids": 1}]}]}"#));
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/body/kids/0/kids/0/kids"]);
    }
}
