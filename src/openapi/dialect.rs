//! Rewriting OpenAPI schema dialects into plain JSON Schema.

use serde_json::{json, Map, Value};

use super::document::DocSet;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum View {
    Request,
    Response,
}

pub(super) fn rewrite(v: &mut Value, v30: bool, view: View) {
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
pub(super) struct Dispatch {
    pub(super) doc: usize,
    pub(super) ptr: String,
    pub(super) key: &'static str,
    pub(super) prop: String,
    pub(super) cases: Vec<(Value, String)>,
}

pub(super) fn plan_discriminators(ds: &DocSet) -> Vec<Dispatch> {
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

pub(super) fn apply_dispatch(root: &mut Value, d: &Dispatch) {
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
