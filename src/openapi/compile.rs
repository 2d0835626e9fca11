//! The compiled description: every path template, operation, parameter and media type,
//! their schemas compiled into `jsonschema` validators at load.

use std::collections::HashMap;
use std::path::Path;

use jsonschema::{Draft, Registry, Validator};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::dialect::{apply_dispatch, plan_discriminators, rewrite, View};
use super::document::{fragment, load_all, DocSet, Loc};
use super::error::{invalid, OasError};
use super::paths::{parse_template, Part};

/// An OpenAPI description compiled for checking exchanges against it.
#[derive(Debug)]
pub struct Api {
    /// Base paths tried in order (`""` last when none is configured).
    pub(super) bases: Vec<String>,
    /// Most literal templates first.
    pub(super) paths: Vec<PathItem>,
    pub(super) validators: Vec<Validator>,
    pub(super) body_schemas: bool,
    pub(super) allow: AllowSpec,
    pub(super) max_depth: usize,
    pub(super) max_items: usize,
}

/// Apigee's `AllowUnspecifiedParameters`: all true by default.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct AllowSpec {
    #[serde(default = "yes")]
    pub query: bool,
    #[serde(default = "yes")]
    pub header: bool,
    #[serde(default = "yes")]
    pub cookie: bool,
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

fn yes() -> bool {
    true
}

/// How a description is compiled, and what its checks accept.
#[derive(Debug, Clone)]
pub struct Options {
    /// Replaces the paths of the description's `servers` as the base paths.
    pub base_path: Option<String>,
    /// Compiles the response schemas too (for checking responses).
    pub responses: bool,
    /// Parameters a request may carry that the description does not declare.
    pub allow: AllowSpec,
    /// JSON nesting refused beyond this.
    pub max_depth: usize,
    /// Arrays longer than this are refused.
    pub max_items: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum In {
    Path,
    Query,
    Header,
    Cookie,
}

impl In {
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) struct Types {
    pub(super) int: bool,
    pub(super) num: bool,
    pub(super) boolean: bool,
}

#[derive(Debug, Clone)]
pub(super) enum Shape {
    Scalar(Types),
    Array { items: Types, sep: Option<char> },
    Object(HashMap<String, Types>),
}

#[derive(Debug)]
pub(super) struct Param {
    pub(super) name: String,
    pub(super) at: In,
    pub(super) required: bool,
    pub(super) shape: Shape,
    /// `content: {application/json: ...}` instead of `schema`: the value is JSON text.
    pub(super) json: bool,
    pub(super) deep_object: bool,
    /// An object in `form` style, exploded: each property is its own query (or cookie)
    /// name (`?color=red&size=2` for `{color, size}`).
    pub(super) form_object: bool,
    pub(super) validator: Option<usize>,
}

#[derive(Debug)]
pub(super) struct Media {
    /// `application/json`, `application/*`, `*/*` ...
    pub(super) range: String,
    pub(super) validator: Option<usize>,
}

#[derive(Debug)]
pub(super) struct Body {
    pub(super) required: bool,
    pub(super) media: Vec<Media>,
}

#[derive(Debug)]
pub(super) struct ResponseSpec {
    /// `200`, `2XX` or `default`.
    pub(super) status: String,
    pub(super) media: Vec<Media>,
}

#[derive(Debug)]
pub(super) struct Operation {
    pub(super) method: String,
    pub(super) params: Vec<Param>,
    pub(super) body: Option<Body>,
    pub(super) responses: Vec<ResponseSpec>,
}

#[derive(Debug)]
pub(super) struct PathItem {
    pub(super) template: String,
    pub(super) segments: Vec<Vec<Part>>,
    pub(super) ops: Vec<Operation>,
}

/// Schemas to compile, and which view (request or response) each belongs to.
struct Pending {
    pub(super) schemas: Vec<(Loc, View)>,
}

impl Pending {
    fn add(&mut self, loc: Loc, view: View) -> usize {
        self.schemas.push((loc, view));
        self.schemas.len() - 1
    }
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

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

fn compile_param(ds: &DocSet, loc: Loc, pending: &mut Pending) -> Result<Option<Param>, OasError> {
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
        In::Query => matches!(
            style,
            "form" | "spaceDelimited" | "pipeDelimited" | "deepObject"
        ),
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

pub(super) fn is_json(media: &str) -> bool {
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
                Some(Value::Object(c)) => {
                    compile_media(&bl.child("content"), c, View::Request, pending)
                }
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

impl Api {
    /// Compiles the description at `path`.
    pub fn compile(path: &Path, spec: &Options) -> Result<Api, OasError> {
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
            None => {
                return Err(invalid(
                    "openapi",
                    "not an OpenAPI document (no `openapi` field)",
                ))
            }
        };
        let v30 = !version;
        ds.check_cycles()?;

        let with_responses = spec.responses;
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
        let draft = if v30 {
            Draft::Draft7
        } else {
            Draft::Draft202012
        };
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
        let body_schemas = paths.iter().flat_map(|p| &p.ops).any(|o| o.body.is_some());
        Ok(Api {
            bases,
            paths,
            validators,
            body_schemas,
            allow: spec.allow,
            max_depth: spec.max_depth,
            max_items: spec.max_items,
        })
    }

    /// Whether some operation declares a request body (else no request body needs reading).
    pub fn has_body_schemas(&self) -> bool {
        self.body_schemas
    }
}
