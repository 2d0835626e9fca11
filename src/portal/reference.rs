//! A product's OpenAPI description rendered as a readable API reference: operations by
//! path, their parameters, request and response bodies with their schemas (local `$ref`s
//! followed, to a bounded depth) and examples. Read with the loader OasValidation uses
//! ([`crate::openapi::read_document`]); every string from the document is escaped.

use std::fmt::Write;

use serde_json::Value;

use super::html::esc;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// How deep `$ref`s are followed inside one schema (cycles end here too).
const MAX_DEPTH: usize = 8;
/// Longest JSON shown for one schema or example.
const MAX_SHOWN: usize = 16 * 1024;

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..MAX_DEPTH {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => match r.strip_prefix('#').and_then(|p| doc.pointer(p)) {
                Some(t) => v = t,
                None => return v,
            },
            None => return v,
        }
    }
    v
}

/// `v` with local `$ref`s replaced by what they point at, `depth` levels deep.
fn inline(doc: &Value, v: &Value, depth: usize) -> Value {
    if depth == 0 {
        return v.clone();
    }
    match v {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                if let Some(t) = r.strip_prefix('#').and_then(|p| doc.pointer(p)) {
                    return inline(doc, t, depth - 1);
                }
                return v.clone();
            }
            Value::Object(
                m.iter()
                    .map(|(k, x)| (k.clone(), inline(doc, x, depth - 1)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| inline(doc, x, depth - 1)).collect()),
        _ => v.clone(),
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    if s.len() > MAX_SHOWN {
        let mut cut = MAX_SHOWN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("\n…");
    }
    s
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn schema_type(doc: &Value, s: &Value) -> String {
    let s = resolve(doc, s);
    let t = text(s, "type");
    if t == "array" {
        if let Some(items) = s.get("items") {
            return format!("array of {}", schema_type(doc, items));
        }
    }
    if t.is_empty() {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            return r.rsplit('/').next().unwrap_or(r).to_owned();
        }
        return "any".into();
    }
    t
}

/// Examples of a media type or parameter: `example` and each of `examples`.
fn examples(doc: &Value, v: &Value, out: &mut String) {
    if let Some(e) = v.get("example") {
        let _ = write!(
            out,
            "<div>Example:</div><pre class=\"example\">{}</pre>",
            esc(&pretty(e))
        );
    }
    if let Some(Value::Object(m)) = v.get("examples") {
        for (name, ex) in m {
            let ex = resolve(doc, ex);
            let shown = ex.get("value").unwrap_or(ex);
            let _ = write!(
                out,
                "<div>Example <code>{}</code>{}:</div><pre class=\"example\">{}</pre>",
                esc(name),
                match text(ex, "summary") {
                    s if s.is_empty() => String::new(),
                    s => format!(" — {}", esc(&s)),
                },
                esc(&pretty(shown))
            );
        }
    }
}

fn content(doc: &Value, c: &Value, out: &mut String) {
    let Some(m) = c.get("content").and_then(Value::as_object) else {
        return;
    };
    for (media, mt) in m {
        let _ = write!(out, "<div><span class=\"tag\">{}</span></div>", esc(media));
        if let Some(s) = mt.get("schema") {
            let _ = write!(
                out,
                "<details><summary>Schema ({})</summary><pre class=\"schema\">{}</pre></details>",
                esc(&schema_type(doc, s)),
                esc(&pretty(&inline(doc, s, MAX_DEPTH)))
            );
        }
        examples(doc, mt, out);
    }
}

/// The reference for one document: `anchor_prefix` keeps ids unique on the page.
pub fn render(doc: &Value) -> String {
    let mut out = String::with_capacity(4096);
    let info = doc.get("info").cloned().unwrap_or(Value::Null);
    let _ = write!(
        out,
        "<section class=\"reference\"><h2>API reference: {} <small>{}</small></h2>",
        esc(&text(&info, "title")),
        esc(&text(&info, "version"))
    );
    let d = text(&info, "description");
    if !d.is_empty() {
        let _ = write!(out, "<p class=\"doc-description\">{}</p>", esc(&d));
    }
    if let Some(Value::Array(servers)) = doc.get("servers") {
        out.push_str("<p>Servers: ");
        for s in servers {
            let _ = write!(out, "<code>{}</code> ", esc(&text(s, "url")));
        }
        out.push_str("</p>");
    }
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        out.push_str("<p>No paths.</p></section>");
        return out;
    };
    for (path, item) in paths {
        let item = resolve(doc, item);
        let shared: Vec<&Value> = item
            .get("parameters")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let _ = write!(
                out,
                "<div class=\"card operation\"><h3><span class=\"tag {m}\">{}</span> <code>{}</code></h3>",
                m.to_ascii_uppercase(),
                esc(path)
            );
            for (key, tag) in [("summary", "strong"), ("description", "p")] {
                let t = text(op, key);
                if !t.is_empty() {
                    let _ = write!(out, "<{tag}>{}</{tag}>", esc(&t));
                }
            }
            let params: Vec<&Value> = shared
                .iter()
                .copied()
                .chain(
                    op.get("parameters")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten(),
                )
                .map(|p| resolve(doc, p))
                .collect();
            if !params.is_empty() {
                out.push_str("<h4>Parameters</h4><table><tr><th>Name</th><th>In</th><th>Type</th><th>Required</th><th>Description</th></tr>");
                for p in &params {
                    let ty = p
                        .get("schema")
                        .map(|s| schema_type(doc, s))
                        .unwrap_or_default();
                    let _ = write!(
                        out,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}",
                        esc(&text(p, "name")),
                        esc(&text(p, "in")),
                        esc(&ty),
                        if p.get("required").and_then(Value::as_bool) == Some(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        esc(&text(p, "description"))
                    );
                    examples(doc, p, &mut out);
                    out.push_str("</td></tr>");
                }
                out.push_str("</table>");
            }
            if let Some(body) = op.get("requestBody") {
                let body = resolve(doc, body);
                out.push_str("<h4>Request body</h4>");
                let t = text(body, "description");
                if !t.is_empty() {
                    let _ = write!(out, "<p>{}</p>", esc(&t));
                }
                content(doc, body, &mut out);
            }
            if let Some(Value::Object(responses)) = op.get("responses") {
                out.push_str("<h4>Responses</h4>");
                for (status, r) in responses {
                    let r = resolve(doc, r);
                    let _ = write!(
                        out,
                        "<div><strong>{}</strong> {}</div>",
                        esc(status),
                        esc(&text(r, "description"))
                    );
                    content(doc, r, &mut out);
                }
            }
            out.push_str("</div>");
        }
    }
    out.push_str("</section>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_paths_parameters_schemas_and_examples_escaped() {
        let doc = serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "Pets <b>", "version": "1"},
            "paths": {"/pets/{id}": {
                "parameters": [{"$ref": "#/components/parameters/Id"}],
                "get": {"summary": "One pet", "responses": {"200": {"description": "ok",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pet"},
                    "example": {"name": "<script>alert(1)</script>"}}}}}}
            }},
            "components": {
                "parameters": {"Id": {"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}},
                "schemas": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}, "self": {"$ref": "#/components/schemas/Pet"}}}}
            }
        });
        let html = render(&doc);
        assert!(html.contains("<code>/pets/{id}</code>"));
        assert!(html.contains("<code>id</code></td><td>path</td><td>integer</td><td>yes"));
        assert!(html.contains("Schema (object)"));
        assert!(html.contains("&quot;name&quot;"), "{html}");
        assert!(!html.contains("<script>") && !html.contains("<b>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }
}
