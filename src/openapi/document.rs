//! Loading: the description and the files it refers to, as JSON; following `$ref`s.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{invalid, OasError};
use crate::policies::common::record_read;
use crate::vars::percent_decode;

/// Sibling files a spec may pull in through `$ref`s.
const MAX_FILES: usize = 64;

pub(super) struct Doc {
    pub(super) uri: String,
    pub(super) path: PathBuf,
    pub(super) value: Value,
}

/// A node of a loaded document: which document, and the JSON pointer inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Loc {
    pub(super) doc: usize,
    pub(super) ptr: String,
}

impl Loc {
    pub(super) fn child(&self, key: &str) -> Loc {
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
pub(super) fn fragment(ptr: &str) -> String {
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
    record_read(path);
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
pub(super) fn load_all(root: &Path) -> Result<Vec<Doc>, OasError> {
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
pub(super) struct DocSet {
    pub(super) docs: Vec<Doc>,
    pub(super) by_path: HashMap<PathBuf, usize>,
}

impl DocSet {
    pub(super) fn new(docs: Vec<Doc>) -> Self {
        let by_path = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.path.clone(), i))
            .collect();
        Self { docs, by_path }
    }

    pub(super) fn get(&self, loc: &Loc) -> Option<&Value> {
        self.docs.get(loc.doc)?.value.pointer(&loc.ptr)
    }

    pub(super) fn shown(&self, loc: &Loc) -> String {
        let name = self.docs[loc.doc]
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name}#{}", loc.ptr)
    }

    /// Where `r`, written in document `from`, points.
    pub(super) fn resolve(&self, from: usize, r: &str) -> Result<Loc, OasError> {
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
    pub(super) fn deref(&self, loc: Loc) -> Result<(Loc, &Map<String, Value>), OasError> {
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
    pub(super) fn check_cycles(&self) -> Result<(), OasError> {
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

    fn visit(
        &self,
        loc: Loc,
        path: &mut Vec<Loc>,
        done: &mut HashSet<Loc>,
    ) -> Result<(), OasError> {
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
