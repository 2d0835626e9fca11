//! `ExtractVariables` (Apigee's policy of that name): sets flow variables from parts of a
//! message — the URI path, query and form parameters, headers, another variable's text, and
//! the JSON payload through JSONPath.
//!
//! ```yaml
//! spec:
//!   type: ExtractVariables
//!   source: request                 # request (default) | response | a variable's name
//!   variablePrefix: req             # variables are `req.<name>`; none: `<name>`
//!   ignoreUnresolvedVariables: false
//!   uriPath:
//!     patterns: ["/accounts/{id}", "/v1/accounts/{id}/**"]
//!     ignoreCase: false
//!   queryParams: [{name: code, patterns: ["DBN{dbncode}"], ignoreCase: true}]
//!   headers: [{name: authorization, patterns: ["Bearer {token}"]}]
//!   formParams: [{name: greeting, patterns: ["hello {user}"]}]
//!   variables: [{name: request.header.x-tier, patterns: ["{tier}-{region}"]}]
//!   jsonPayload:
//!   - {name: model, jsonPath: "$.model"}
//!   - {name: stream, jsonPath: "$.stream", type: boolean}
//! ```
//!
//! Patterns, as Apigee's: literal text and `{name}` captures; the whole value must match
//! (the first pattern of an element that matches wins; literals compare case-insensitively
//! with `ignoreCase`). A capture takes the text up to the first place the literal after it
//! matches. A `uriPath` pattern matches segment by segment: a capture stays within its
//! segment, `*` is any one segment and `**` any number of them (`/**/{id}` takes the last
//! segment). The URI path matched is `proxy.pathsuffix` when the flow defines it, else the
//! request path (without the query). A query, form or header name ending in `.N`
//! (`w.2`) reads the Nth value of a repeated one, as Apigee; a header without it is all its
//! values joined with `,`.
//!
//! JSONPath is RFC 9535 (as ServiceCallout's): one match is the value itself (a string
//! without quotes, other values as JSON text), several are a JSON array; `type` casts it
//! (`string`, `boolean`, `integer`, `long`, `float`, `double`, `nodeset`: always the JSON
//! array). A value that does not match sets no variable, as in Apigee.
//!
//! Faults (500, as Apigee's):
//! - `steps.extractvariables.SourceMessageNotAvailable`: the source message or variable is
//!   not there (a `response` source on the request path, an unset variable);
//! - `steps.extractvariables.ExecutionFailed`: `jsonPayload` on an empty or malformed JSON
//!   payload;
//! - `steps.extractvariables.UnableToCast`: a value that `type` cannot hold.
//!
//! With `ignoreUnresolvedVariables: true` the first two set nothing and the step goes on.
//! Apigee's `InvalidJSONPath` and its variable-name errors (`SetVariableFailed`,
//! `ImmutableVariable`) are refused at load here: an invalid JSONPath, a variable in
//! `request.*` / `response.*` or an empty name cannot reach a request. XML payloads
//! (`XMLPayload`) are not supported.

use std::sync::Arc;

use serde::Deserialize;
use serde_json_path::JsonPath;

use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::vars::{Exchange, Value};

pub const TYPE: &str = "ExtractVariables";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    variable_prefix: Option<String>,
    #[serde(default)]
    ignore_unresolved_variables: bool,
    #[serde(default)]
    uri_path: Option<UriPathSpec>,
    #[serde(default)]
    query_params: Vec<NamedSpec>,
    #[serde(default)]
    headers: Vec<NamedSpec>,
    #[serde(default)]
    form_params: Vec<NamedSpec>,
    #[serde(default)]
    variables: Vec<NamedSpec>,
    #[serde(default)]
    json_payload: Vec<JsonSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UriPathSpec {
    patterns: Vec<String>,
    #[serde(default)]
    ignore_case: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamedSpec {
    name: String,
    patterns: Vec<String>,
    #[serde(default)]
    ignore_case: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JsonSpec {
    name: String,
    json_path: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// Where the policy reads from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Message(Direction),
    Variable(String),
}

/// A name a template could refer to (`a.b-c_d`), as the template parser reads them.
fn is_var_ref(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A compiled pattern, matched against the whole value.
#[derive(Debug, Clone)]
struct Pattern {
    kind: PatKind,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
enum PatKind {
    /// Literals and captures (headers, parameters, variables).
    Text(Vec<PatPart>),
    /// A URI path, segment by segment: captures stay within a segment.
    Path(Vec<Seg>),
}

#[derive(Debug, Clone)]
enum Seg {
    /// `*`: any one segment.
    One,
    /// `**`: any number of segments, none included.
    Any,
    Parts(Vec<PatPart>),
}

#[derive(Debug, Clone, PartialEq)]
enum PatPart {
    Lit(String),
    /// The variable's full name (prefix applied).
    Cap(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cast {
    String,
    Boolean,
    Integer,
    Long,
    Float,
    Double,
    NodeSet,
}

#[derive(Debug)]
struct JsonVar {
    var: String,
    path: JsonPath,
    cast: Cast,
}

/// A named source (a header, a parameter, a variable) and its patterns. `index` is
/// Apigee's `name="w.2"`: the second value of a repeated parameter or header.
#[derive(Debug)]
struct Named {
    name: String,
    index: Option<usize>,
    patterns: Vec<Pattern>,
}

#[derive(Debug)]
struct ExtractVariables {
    name: String,
    source: Source,
    ignore_unresolved: bool,
    uri_path: Vec<Pattern>,
    query: Vec<Named>,
    headers: Vec<Named>,
    form: Vec<Named>,
    variables: Vec<Named>,
    json: Vec<JsonVar>,
}

/// The full name of an extracted variable, checked: Apigee refuses read-only names at run
/// time (`SetVariableFailed`); here they are refused at load.
fn var_name(prefix: Option<&str>, name: &str, field: &str) -> Result<String, SpecError> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && !s.starts_with('.')
            && !s.ends_with('.')
    };
    if !valid(name) {
        return Err(SpecError::new(
            field,
            format!("`{name}` is not a variable name (letters, digits, `_`, `-`, `.`)"),
        ));
    }
    let full = match prefix {
        Some(p) => format!("{p}.{name}"),
        None => name.to_owned(),
    };
    if full.starts_with("request.")
        || full.starts_with("response.")
        || crate::vars::Builtin::parse(&full).is_some()
    {
        return Err(SpecError::new(
            field,
            format!("`{full}` is read-only (Apigee: steps.extractvariables.SetVariableFailed)"),
        ));
    }
    Ok(full)
}

/// Compiles literal text and `{name}` captures.
fn compile_parts(
    src: &str,
    text: &str,
    prefix: Option<&str>,
    field: &str,
) -> Result<Vec<PatPart>, SpecError> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .ok_or_else(|| SpecError::new(field, format!("`{src}`: a `{{` without its `}}`")))?;
        if open > 0 {
            parts.push(PatPart::Lit(rest[..open].to_owned()));
        }
        let name = &rest[open + 1..close];
        if matches!(parts.last(), Some(PatPart::Cap(_))) {
            return Err(SpecError::new(
                field,
                format!("`{src}`: two captures need literal text between them"),
            ));
        }
        parts.push(PatPart::Cap(var_name(prefix, name, field)?));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(SpecError::new(
            field,
            format!("`{src}`: a `}}` without its `{{`"),
        ));
    }
    if !rest.is_empty() {
        parts.push(PatPart::Lit(rest.to_owned()));
    }
    Ok(parts)
}

/// The captures when `text` (already lower-cased for `ignoreCase`) matches `parts` whole;
/// values are cut from `orig`, of the same length. A capture is never empty: it takes the
/// text up to the first place the next literal matches.
fn match_parts<'t, 'p>(
    parts: &'p [PatPart],
    hay: &str,
    orig: &'t str,
    caps: &mut Vec<(&'p str, &'t str)>,
) -> bool {
    let mut at = 0usize;
    for (i, part) in parts.iter().enumerate() {
        match part {
            PatPart::Lit(l) => {
                if !hay[at..].starts_with(l.as_str()) {
                    return false;
                }
                at += l.len();
            }
            PatPart::Cap(name) => {
                let end = match parts.get(i + 1) {
                    Some(PatPart::Lit(next)) => {
                        let Some(c) = hay[at..].chars().next() else {
                            return false;
                        };
                        let from = at + c.len_utf8();
                        match hay[from..].find(next.as_str()) {
                            Some(p) => from + p,
                            None => return false,
                        }
                    }
                    _ => hay.len(),
                };
                if end == at {
                    return false;
                }
                caps.push((name.as_str(), &orig[at..end]));
                at = end;
            }
        }
    }
    at == hay.len()
}

impl Pattern {
    fn compile(
        src: &str,
        prefix: Option<&str>,
        ignore_case: bool,
        path: bool,
        field: &str,
    ) -> Result<Self, SpecError> {
        let lower = |parts: Vec<PatPart>| -> Vec<PatPart> {
            parts
                .into_iter()
                .map(|p| match p {
                    PatPart::Lit(l) if ignore_case => PatPart::Lit(l.to_lowercase()),
                    other => other,
                })
                .collect()
        };
        if src.is_empty() {
            return Err(SpecError::new(field, "an empty pattern"));
        }
        let kind = if path {
            let segs = src
                .split('/')
                .map(|seg| {
                    Ok(match seg {
                        "*" => Seg::One,
                        "**" => Seg::Any,
                        _ => Seg::Parts(lower(compile_parts(src, seg, prefix, field)?)),
                    })
                })
                .collect::<Result<Vec<_>, SpecError>>()?;
            PatKind::Path(segs)
        } else {
            PatKind::Text(lower(compile_parts(src, src, prefix, field)?))
        };
        Ok(Self { kind, ignore_case })
    }

    /// The captures when `text` matches the whole pattern; `None` otherwise.
    fn matches<'t>(&self, text: &'t str) -> Option<Vec<(&str, &'t str)>> {
        // Lower-casing keeps byte offsets only when the length stays: a text whose lower
        // case is longer or shorter matches nothing rather than capturing at a wrong offset.
        let lowered;
        let hay: &str = if self.ignore_case {
            lowered = text.to_lowercase();
            if lowered.len() != text.len() {
                return None;
            }
            &lowered
        } else {
            text
        };
        let mut caps = Vec::new();
        match &self.kind {
            PatKind::Text(parts) => match_parts(parts, hay, text, &mut caps).then_some(caps),
            PatKind::Path(segs) => {
                let mut hs = Vec::new();
                let mut at = 0;
                for h in hay.split('/') {
                    hs.push((h, &text[at..at + h.len()]));
                    at += h.len() + 1;
                }
                match_segs(segs, &hs, &mut caps).then_some(caps)
            }
        }
    }
}

/// Matches pattern segments against path segments, iteratively: a table of which pattern
/// suffix can match which path suffix, filled from the end (each `**` either ends here or
/// takes one more segment), then one forward walk that takes the captures, `**` taking as
/// few segments as it can. Work and memory are pattern segments × path segments, whatever
/// the path's length or the number of `**`; no recursion.
fn match_segs<'t, 'p>(
    segs: &'p [Seg],
    hs: &[(&str, &'t str)],
    caps: &mut Vec<(&'p str, &'t str)>,
) -> bool {
    let (np, ns) = (segs.len(), hs.len());
    let width = ns + 1;
    let mut ok = vec![false; (np + 1) * width];
    ok[np * width + ns] = true;
    let mut scratch = Vec::new();
    for i in (0..np).rev() {
        for j in (0..=ns).rev() {
            let next = |i: usize, j: usize| ok[i * width + j];
            let v = match &segs[i] {
                Seg::Any => next(i + 1, j) || (j < ns && next(i, j + 1)),
                Seg::One => j < ns && !hs[j].0.is_empty() && next(i + 1, j + 1),
                Seg::Parts(parts) => {
                    j < ns && next(i + 1, j + 1) && {
                        scratch.clear();
                        match_parts(parts, hs[j].0, hs[j].1, &mut scratch)
                    }
                }
            };
            ok[i * width + j] = v;
        }
    }
    if !ok[0] {
        return false;
    }
    let (mut i, mut j) = (0, 0);
    while i < np {
        match &segs[i] {
            Seg::Any => {
                if ok[(i + 1) * width + j] {
                    i += 1;
                } else {
                    j += 1;
                }
            }
            Seg::One => {
                i += 1;
                j += 1;
            }
            Seg::Parts(parts) => {
                match_parts(parts, hs[j].0, hs[j].1, caps);
                i += 1;
                j += 1;
            }
        }
    }
    true
}

fn patterns(
    list: &[String],
    prefix: Option<&str>,
    ignore_case: bool,
    path: bool,
    field: &str,
) -> Result<Vec<Pattern>, SpecError> {
    if list.is_empty() {
        return Err(SpecError::new(field, "give one or more patterns"));
    }
    list.iter()
        .enumerate()
        .map(|(i, p)| Pattern::compile(p, prefix, ignore_case, path, &format!("{field}[{i}]")))
        .collect()
}

fn named(
    list: Vec<NamedSpec>,
    prefix: Option<&str>,
    field: &str,
    lower_names: bool,
    indexed: bool,
) -> Result<Vec<Named>, SpecError> {
    list.into_iter()
        .enumerate()
        .map(|(i, n)| {
            let at = format!("{field}[{i}]");
            if n.name.is_empty() {
                return Err(SpecError::new(format!("{at}.name"), "must not be empty"));
            }
            let name = if lower_names {
                n.name.to_ascii_lowercase()
            } else {
                n.name
            };
            // `w.2`: the second value of `w`, as Apigee reads such a name.
            let (name, index) = match name.rsplit_once('.') {
                Some((base, k)) if indexed && !base.is_empty() => match k.parse::<usize>() {
                    Ok(k) if (1..=100).contains(&k) => (base.to_owned(), Some(k)),
                    _ => (name, None),
                },
                _ => (name, None),
            };
            let pats = patterns(
                &n.patterns,
                prefix,
                n.ignore_case,
                false,
                &format!("{at}.patterns"),
            )?;
            Ok(Named {
                name,
                index,
                patterns: pats,
            })
        })
        .collect()
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let prefix = spec.variable_prefix.as_deref();
    if let Some(p) = prefix {
        // The prefix is part of every name: checked as one.
        var_name(None, p, "variablePrefix")?;
    }
    let source = match spec.source.as_deref().map(str::trim) {
        None | Some("request") | Some("") => Source::Message(Direction::Request),
        Some("response") => Source::Message(Direction::Response),
        Some(v) => {
            if !is_var_ref(v) {
                return Err(SpecError::new(
                    "source",
                    format!("`{v}` is neither request, response nor a variable name"),
                ));
            }
            Source::Variable(v.to_owned())
        }
    };
    let message_only = !matches!(source, Source::Message(_))
        && (spec.uri_path.is_some()
            || !spec.query_params.is_empty()
            || !spec.headers.is_empty()
            || !spec.form_params.is_empty());
    if message_only {
        return Err(SpecError::new(
            "source",
            "uriPath, queryParams, headers and formParams read a message: a variable source \
             takes only variables and jsonPayload",
        ));
    }
    let uri_path = match &spec.uri_path {
        Some(u) => patterns(&u.patterns, prefix, u.ignore_case, true, "uriPath.patterns")?,
        None => Vec::new(),
    };
    let query = named(spec.query_params, prefix, "queryParams", false, true)?;
    let headers = named(spec.headers, prefix, "headers", true, true)?;
    let form = named(spec.form_params, prefix, "formParams", false, true)?;
    let variables = named(spec.variables, prefix, "variables", false, false)?;
    let json = spec
        .json_payload
        .into_iter()
        .enumerate()
        .map(|(i, j)| {
            let at = format!("jsonPayload[{i}]");
            let var = var_name(prefix, &j.name, &format!("{at}.name"))?;
            // Apigee writes the path as `{...}`-free JSONPath; a leading `$` is required.
            let path = JsonPath::parse(j.json_path.trim()).map_err(|e| {
                SpecError::new(
                    format!("{at}.jsonPath"),
                    format!(
                        "invalid JSONPath `{}` (Apigee: steps.extractvariables.InvalidJSONPath): {e}",
                        j.json_path
                    ),
                )
            })?;
            let cast = match j.kind.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("string") => Cast::String,
                Some("boolean") => Cast::Boolean,
                Some("integer") => Cast::Integer,
                Some("long") => Cast::Long,
                Some("float") => Cast::Float,
                Some("double") => Cast::Double,
                Some("nodeset") => Cast::NodeSet,
                Some(other) => {
                    return Err(SpecError::new(
                        format!("{at}.type"),
                        format!(
                            "`{other}`: one of string, boolean, integer, long, float, double, nodeset"
                        ),
                    ))
                }
            };
            Ok(JsonVar { var, path, cast })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if uri_path.is_empty()
        && query.is_empty()
        && headers.is_empty()
        && form.is_empty()
        && variables.is_empty()
        && json.is_empty()
    {
        // Apigee's deployment error NothingToExtract.
        return Err(SpecError::new(
            "",
            "nothing to extract: give uriPath, queryParams, headers, formParams, variables or jsonPayload",
        ));
    }
    for (i, Named { name, .. }) in variables.iter().enumerate() {
        if !is_var_ref(name) {
            return Err(SpecError::new(
                format!("variables[{i}].name"),
                format!("`{name}` is not a variable name"),
            ));
        }
    }
    Ok(Arc::new(ExtractVariables {
        name: ctx.name.clone(),
        source,
        ignore_unresolved: spec.ignore_unresolved_variables,
        uri_path,
        query,
        headers,
        form,
        variables,
        json,
    }))
}

/// One match or several, as text: a single string without quotes, other values as JSON.
fn json_text(nodes: &[&serde_json::Value]) -> Option<String> {
    match nodes {
        [] => None,
        [serde_json::Value::String(s)] => Some(s.clone()),
        [serde_json::Value::Null] => None,
        [one] => Some(one.to_string()),
        many => {
            Some(serde_json::Value::Array(many.iter().map(|v| (*v).clone()).collect()).to_string())
        }
    }
}

fn cast(nodes: &[&serde_json::Value], to: Cast) -> Result<Option<Value>, String> {
    if to == Cast::NodeSet {
        if nodes.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Value::Str(
            serde_json::Value::Array(nodes.iter().map(|v| (*v).clone()).collect()).to_string(),
        )));
    }
    let Some(text) = json_text(nodes) else {
        return Ok(None);
    };
    let bad = || format!("cannot cast `{text}` to {to:?}");
    Ok(Some(match to {
        Cast::String | Cast::NodeSet => Value::Str(text.clone()),
        Cast::Boolean => match text.trim() {
            // Java's Boolean.parseBoolean accepts any case.
            t if t.eq_ignore_ascii_case("true") => Value::Bool(true),
            t if t.eq_ignore_ascii_case("false") => Value::Bool(false),
            _ => return Err(bad()),
        },
        Cast::Integer => {
            let n: i64 = text.trim().parse().map_err(|_| bad())?;
            i32::try_from(n).map_err(|_| bad())?;
            Value::Int(n)
        }
        Cast::Long => Value::Int(text.trim().parse().map_err(|_| bad())?),
        Cast::Float | Cast::Double => {
            let f: f64 = text.trim().parse().map_err(|_| bad())?;
            if !f.is_finite() {
                return Err(bad());
            }
            Value::Float(f)
        }
    }))
}

impl ExtractVariables {
    fn fault(&self, code: &str, message: String) -> Fault {
        Fault::new(500, format!("steps.extractvariables.{code}"), message)
    }

    fn source_missing(&self, what: &str) -> Fault {
        self.fault(
            "SourceMessageNotAvailable",
            format!(
                "{what} message is not available for ExtractVariable: {}",
                self.name
            ),
        )
    }

    fn extract(&self, ex: &mut Exchange, dir: Direction) -> Result<(), Fault> {
        let mut found: Vec<(String, Value)> = Vec::new();
        let push_caps = |caps: Vec<(&str, &str)>, found: &mut Vec<(String, Value)>| {
            for (n, v) in caps {
                found.push((n.to_owned(), Value::Str(v.to_owned())));
            }
        };
        // The source text for `variables` and `jsonPayload` when it is a variable.
        let mut source_text: Option<String> = None;
        match &self.source {
            Source::Message(d) => {
                if *d == Direction::Response && (ex.response.is_none() || dir == Direction::Request)
                {
                    if self.ignore_unresolved {
                        return Ok(());
                    }
                    return Err(self.source_missing("response"));
                }
                let d = *d;
                if !self.uri_path.is_empty() {
                    let suffix = ex.lookup("proxy.pathsuffix").map(|s| s.into_owned());
                    let path = suffix.unwrap_or_else(|| ex.request.path().to_owned());
                    if let Some(c) = self.uri_path.iter().find_map(|p| p.matches(&path)) {
                        push_caps(c, &mut found);
                    }
                }
                if !self.query.is_empty() {
                    let pairs: Vec<(String, String)> =
                        crate::vars::query_pairs(ex.request.query_string()).collect();
                    for n in &self.query {
                        let v = pairs
                            .iter()
                            .filter(|(k, _)| *k == n.name)
                            .nth(n.index.map_or(0, |k| k - 1));
                        if let Some((_, v)) = v {
                            if let Some(c) = n.patterns.iter().find_map(|p| p.matches(v)) {
                                push_caps(c, &mut found);
                            }
                        }
                    }
                }
                let headers = match d {
                    Direction::Request => Some(&ex.request.headers),
                    Direction::Response => ex.response.as_ref().map(|r| &r.headers),
                };
                for n in &self.headers {
                    let values: Vec<&str> = headers
                        .into_iter()
                        .flat_map(|h| h.iter())
                        .filter(|(k, _)| k.eq_ignore_ascii_case(&n.name))
                        .map(|(_, v)| v)
                        .collect();
                    let v = match n.index {
                        // Several values are one comma-separated text, as Apigee reads them.
                        None if !values.is_empty() => Some(values.join(",")),
                        None => None,
                        Some(k) => values
                            .iter()
                            .flat_map(|v| v.split(','))
                            .map(str::trim)
                            .nth(k - 1)
                            .map(str::to_owned),
                    };
                    if let Some(v) = v {
                        if let Some(c) = n.patterns.iter().find_map(|p| p.matches(&v)) {
                            push_caps(c, &mut found);
                        }
                    }
                }
                if !self.form.is_empty() {
                    let is_form = headers
                        .and_then(|h| h.get("content-type"))
                        .map(|ct| {
                            ct.split(';')
                                .next()
                                .unwrap_or("")
                                .trim()
                                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
                        })
                        .unwrap_or(false);
                    let body = match d {
                        Direction::Request => ex.request_body.as_deref(),
                        Direction::Response => ex.response_body.as_deref(),
                    };
                    if let (true, Some(body)) = (is_form, body) {
                        let text = String::from_utf8_lossy(body);
                        let pairs: Vec<(String, String)> =
                            crate::vars::query_pairs(&text).collect();
                        for n in &self.form {
                            let v = pairs
                                .iter()
                                .filter(|(k, _)| *k == n.name)
                                .nth(n.index.map_or(0, |k| k - 1));
                            if let Some((_, v)) = v {
                                if let Some(c) = n.patterns.iter().find_map(|p| p.matches(v)) {
                                    push_caps(c, &mut found);
                                }
                            }
                        }
                    }
                }
            }
            Source::Variable(v) => match ex.lookup(v) {
                Some(t) => source_text = Some(t.into_owned()),
                None if self.ignore_unresolved => return Ok(()),
                None => return Err(self.source_missing(v)),
            },
        }
        for n in &self.variables {
            if let Some(v) = ex.lookup(&n.name) {
                if let Some(c) = n.patterns.iter().find_map(|p| p.matches(&v)) {
                    push_caps(c, &mut found);
                }
            }
        }
        if !self.json.is_empty() {
            let parsed;
            let value: Option<&serde_json::Value> = match (&self.source, &source_text) {
                (Source::Variable(_), Some(t)) => {
                    parsed =
                        serde_json::from_str::<serde_json::Value>(t).map_err(|e| e.to_string());
                    parsed.as_ref().ok()
                }
                _ => None,
            };
            let body;
            let json: Result<&serde_json::Value, String> = match value {
                Some(v) => Ok(v),
                None => match &self.source {
                    Source::Message(d) => {
                        body = ex.body_json(*d);
                        match body.as_deref() {
                            Some(b) => b.value.as_ref().map_err(Clone::clone),
                            None => Err("the payload is empty".to_owned()),
                        }
                    }
                    Source::Variable(v) => Err(format!("`{v}` does not hold JSON")),
                },
            };
            match json {
                Ok(json) => {
                    for j in &self.json {
                        let nodes = j.path.query(json).all();
                        match cast(&nodes, j.cast) {
                            Ok(Some(v)) => found.push((j.var.clone(), v)),
                            Ok(None) => {}
                            Err(m) => {
                                return Err(self.fault(
                                    "UnableToCast",
                                    format!("Unable to cast value for variable {}: {m}", j.var),
                                ))
                            }
                        }
                    }
                }
                Err(_) if self.ignore_unresolved => {}
                Err(e) => {
                    return Err(self.fault(
                        "ExecutionFailed",
                        format!(
                            "Failed to execute the ExtractVariables: {}. Reason: {e}",
                            self.name
                        ),
                    ))
                }
            }
        }
        for (n, v) in found {
            ex.set_var(n, v);
        }
        Ok(())
    }
}

impl Policy for ExtractVariables {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        match &self.source {
            Source::Message(d) => {
                let content = match dir {
                    Direction::Request => "request.content",
                    Direction::Response => "response.content",
                };
                (*d == dir && (!self.json.is_empty() || !self.form.is_empty()))
                    || self.variables.iter().any(|n| n.name == content)
            }
            // A variable source may be the message content itself.
            Source::Variable(v) => {
                let reads = |n: &str| match dir {
                    Direction::Request => n == "request.content",
                    Direction::Response => n == "response.content",
                };
                reads(v) || self.variables.iter().any(|n| reads(&n.name))
            }
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        Hook::Ready(Outcome::from(self.extract(ex, dir)))
    }
}

#[cfg(test)]
#[path = "extract_variables_tests.rs"]
mod tests;
