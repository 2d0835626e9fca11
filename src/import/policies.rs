//! One converter per Apigee policy type: [`TABLE`]. A converter reads the policy's XML,
//! classifies every element it holds (through [`Ctx::c`]) and returns the tollgate spec, or
//! `None` when something in it cannot be carried over (the step then fails closed).
//!
//! Types tollgate does not implement yet have `convert: None` and the reason; enabling one
//! after its feature lands is writing its function and putting it in its row.

use roxmltree::Node;
use serde_json::{json, Map, Value};

use super::bundle::Bundle;
use super::xml::{all, attr, child, child_text, kids, text, truthy, Classifier};

/// What a converter works with.
pub struct Ctx<'b> {
    pub c: Classifier,
    pub bundle: &'b Bundle,
    /// The tollgate policy name.
    pub name: String,
    /// The proxy's base path (OASValidation matches paths below it).
    pub base_path: Option<String>,
    /// Files to write beside the configuration (`scripts/…`, `specs/…`).
    pub files: Vec<(String, Vec<u8>)>,
    /// Further documents (a `KeyValueMap` with a policy's initial entries).
    pub docs: Vec<Value>,
    /// Bundle files the policy used (`resources/jsc/a.js`).
    pub used: Vec<String>,
}

pub type ConvertFn = fn(&mut Ctx<'_>, Node<'_, '_>) -> Option<Value>;

/// One Apigee policy type.
pub struct Entry {
    /// The root element's name (`VerifyAPIKey`).
    pub apigee: &'static str,
    pub convert: Option<ConvertFn>,
    /// Why it is not converted (when `convert` is `None`), and where the mapping plugs in.
    pub why: &'static str,
}

/// Policies that only observe (logging, analytics): their steps are left out, reported
/// approximated, since leaving them out changes nothing the client or upstream sees.
pub const INERT: &[(&str, &str)] = &[
    ("MessageLogging", "logging only: tollgate logs and exports analytics itself (--analytics); the step is left out"),
    ("StatisticsCollector", "analytics only: see tollgate's --analytics records; the step is left out"),
    ("DataCapture", "analytics only: see tollgate's --analytics records; the step is left out"),
    ("TraceCapture", "debug capture only; the step is left out"),
];

const fn yes(apigee: &'static str, convert: ConvertFn) -> Entry {
    Entry {
        apigee,
        convert: Some(convert),
        why: "",
    }
}

const fn no(apigee: &'static str, why: &'static str) -> Entry {
    Entry {
        apigee,
        convert: None,
        why,
    }
}

/// Every Apigee policy type the importer knows. Not listed: "unknown policy type".
pub static TABLE: &[Entry] = &[
    yes("VerifyAPIKey", verify_api_key),
    yes("Quota", quota),
    yes("SpikeArrest", spike_arrest),
    yes("AssignMessage", assign_message),
    yes("RaiseFault", raise_fault),
    yes("KeyValueMapOperations", key_value_map),
    yes("Javascript", javascript),
    yes("ServiceCallout", service_callout),
    yes("OASValidation", oas_validation),
    yes("ResponseCache", response_cache),
    yes("VerifyJWT", verify_jwt),
    yes("JSONThreatProtection", json_threat_protection),
    yes("CORS", cors),
    yes("ExtractVariables", extract_variables),
    yes("GenerateJWT", generate_jwt),
    yes("AccessControl", access_control),
    // Not planned in issue 18.
    no("OAuthV2", "tollgate has no OAuth 2.0 token service (verify Google or third-party tokens with VerifyJwt instead)"),
    no("FlowCallout", "tollgate has no shared-flow callouts: import the shared flow and put its steps in the flow"),
    no("DecodeJWT", "tollgate has no DecodeJWT (VerifyJwt verifies and decodes)"),
    no("XMLThreatProtection", "tollgate has no XML threat protection"),
    no("RegularExpressionProtection", "tollgate has no RegularExpressionProtection"),
    no("XMLToJSON", "tollgate has no XML/JSON conversion"),
    no("JSONToXML", "tollgate has no XML/JSON conversion"),
    no("XSL", "tollgate has no XSL transformations"),
    no("JavaCallout", "tollgate runs no Java"),
    no("PythonScript", "tollgate runs no Python"),
    no("BasicAuthentication", "tollgate has no BasicAuthentication policy"),
    no("HMAC", "tollgate has no HMAC policy (the hmacSha256 template function computes one)"),
    no("PopulateCache", "tollgate has no general-purpose cache policies (PopulateCache/LookupCache)"),
    no("LookupCache", "tollgate has no general-purpose cache policies (PopulateCache/LookupCache)"),
    no("InvalidateCache", "tollgate has no general-purpose cache policies"),
    no("ResetQuota", "tollgate has no ResetQuota"),
    no("AccessEntity", "tollgate has no AccessEntity"),
    no("GetOAuthV2Info", "tollgate has no OAuth 2.0 token service"),
    no("SetOAuthV2Info", "tollgate has no OAuth 2.0 token service"),
    no("DeleteOAuthV2Info", "tollgate has no OAuth 2.0 token service"),
    no("OAuthV1", "tollgate has no OAuth 1.0a"),
    no("SAMLAssertion", "tollgate has no SAML"),
    no("ExternalCallout", "tollgate has no gRPC external callouts (ServiceCallout makes HTTP calls)"),
    no("GenerateJWS", "tollgate has no JWS generation"),
    no("VerifyJWS", "tollgate has no JWS verification"),
    no("ConcurrentRatelimit", "tollgate has no concurrent rate limit"),
    no("Ldap", "tollgate has no LDAP"),
    no("MonetizationLimitsCheck", "tollgate has no monetization"),
    no("SOAPMessageValidation", "tollgate has no SOAP/XML schema validation"),
    no("SemanticCacheLookup", "not mapped: Apigee's Vertex AI embeddings and Vector Search index (Embeddings, SimilaritySearch) have no tollgate counterpart to carry them to; tollgate's SemanticCache (a local embedder and index, Apigee's type names accepted) is written by hand"),
    no("SemanticCachePopulate", "not mapped: Apigee's Vertex AI embeddings and Vector Search index have no tollgate counterpart to carry them to; tollgate's SemanticCache (a local embedder and index, Apigee's type names accepted) is written by hand"),
    yes("SanitizeUserPrompt", sanitize_user_prompt),
    yes("SanitizeModelResponse", sanitize_model_response),
    yes("LLMTokenQuota", llm_token_quota),
    yes("PromptTokenLimit", prompt_token_limit),
];

pub fn entry(apigee: &str) -> Option<&'static Entry> {
    TABLE.iter().find(|e| e.apigee == apigee)
}

// ───────────────────────────── shared pieces ─────────────────────────────

/// A literal as a tollgate template: `{` becomes `\{` so it is never read as a reference.
pub fn literal(s: &str) -> String {
    s.replace('{', "\\{")
}

/// `{ref}`, or `{firstnonnull(ref,'literal')}` when Apigee's literal is the fallback.
fn reference(r: &str, fallback: Option<&str>) -> String {
    match fallback {
        Some(l) if !l.contains('\'') => format!("{{firstnonnull({r},'{l}')}}"),
        _ => format!("{{{r}}}"),
    }
}

/// Whether a template reads any variable (Apigee's IgnoreUnresolvedVariables matters then).
fn has_refs(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'{'
            && (i == 0 || b[i - 1] != b'\\')
            && b.get(i + 1).is_some_and(|n| n.is_ascii_alphabetic())
    })
}

/// Handles `IgnoreUnresolvedVariables` where templates are rendered.
fn ignore_unresolved(x: &mut Ctx<'_>, root: Node<'_, '_>, uses_refs: bool) {
    let n = child(root, "IgnoreUnresolvedVariables");
    let ignore = n.map(text).is_some_and(|t| truthy(&t));
    let note = "tollgate renders a variable that does not resolve as empty text (Apigee's IgnoreUnresolvedVariables true)";
    match (n, ignore || !uses_refs) {
        (Some(n), true) => x.c.ok(n, note),
        (Some(n), false) => x.c.approx(
            n,
            format!("{note}; Apigee would fail the step with steps.<policy>.UnresolvedVariable"),
        ),
        (None, true) => {}
        (None, false) => x.c.add_named(
            format!(
                "{}/IgnoreUnresolvedVariables (default false)",
                super::xml::path(root)
            ),
            super::report::Status::Approximated,
            format!("{note}; Apigee's default would fail the step on an unresolved variable"),
        ),
    }
}

/// Google token authentication (`<Authentication>` of a target, a callout or AssignMessage
/// `Set`): the `googleToken` spec, or `None` (classified) when it cannot be carried.
pub fn google_token(c: &mut Classifier, auth: Node<'_, '_>) -> Option<Value> {
    c.touch(auth);
    let mut spec = Map::new();
    let mut ok = true;
    for k in kids(auth) {
        match k.tag_name().name() {
            "HeaderName" => {
                spec.insert("header".into(), json!(text(k).to_ascii_lowercase()));
                c.ok(k, "googleToken.header");
            }
            "GoogleAccessToken" => {
                let scopes: Vec<String> = child(k, "Scopes")
                    .map(|s| {
                        all(s, "Scope")
                            .map(text)
                            .filter(|t| !t.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                if scopes.is_empty() {
                    c.no(k, "a GoogleAccessToken without Scopes");
                    ok = false;
                    continue;
                }
                spec.insert("accessToken".into(), json!({"scopes": scopes}));
                if let Some(l) = child(k, "LifetimeInSeconds") {
                    c.approx(l, "tokens live as long as the token server says and are renewed past half their life");
                }
                c.ok(k, "googleToken.accessToken: the gateway's service account (metadata server, or $GCE_METADATA_HOST)");
            }
            "GoogleIDToken" => {
                let Some(aud) = child_text(k, "Audience") else {
                    c.no(k, "a GoogleIDToken without a literal Audience");
                    ok = false;
                    continue;
                };
                if aud.contains('{')
                    || child(k, "Audience")
                        .and_then(|a| a.attribute("ref"))
                        .is_some()
                {
                    c.no(
                        k,
                        "an Audience from a variable (tollgate's idToken audience is a literal)",
                    );
                    ok = false;
                    continue;
                }
                spec.insert("idToken".into(), json!({"audience": aud}));
                if let Some(e) = child(k, "IncludeEmail") {
                    c.approx(e, "tollgate asks the metadata server for format=full tokens (they carry the email)");
                }
                c.ok(k, "googleToken.idToken");
            }
            other => {
                c.no(k, format!("`{other}` in Authentication is not supported"));
                ok = false;
            }
        }
    }
    if !spec.contains_key("accessToken") && !spec.contains_key("idToken") {
        return None;
    }
    spec.entry("header").or_insert(json!("authorization"));
    ok.then_some(Value::Object(spec))
}

// ───────────────────────────── converters ─────────────────────────────

fn verify_api_key(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let Some(k) = child(root, "APIKey") else {
        x.c.add_named(
            format!("{}/APIKey", super::xml::path(root)),
            super::report::Status::NotConvertible,
            "no APIKey element",
        );
        return None;
    };
    let from = match attr(k, "ref") {
        Some(r) => {
            if let Some(q) = r.strip_prefix("request.queryparam.") {
                json!({"query": q})
            } else if let Some(h) = r.strip_prefix("request.header.") {
                json!({"header": h.to_ascii_lowercase()})
            } else {
                json!({"template": format!("{{{r}}}")})
            }
        }
        None => {
            x.c.no(k, "an APIKey without ref");
            return None;
        }
    };
    x.c.ok(k, format!("keyFrom: {from}"));
    Some(json!({
        "type": "VerifyApiKey",
        "keyFrom": [from],
        // Apigee leaves the key in the request.
        "stripKey": false,
    }))
}

/// A number or template for `<X ref="v">literal</X>` / `count` + `countRef`.
fn number_or_ref(lit: Option<String>, r: Option<String>) -> Option<Value> {
    match (lit, r) {
        (l, Some(r)) => Some(json!(reference(&r, l.as_deref()))),
        (Some(l), None) => Some(l.parse::<u64>().map(Value::from).unwrap_or(json!(l))),
        (None, None) => None,
    }
}

fn quota(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut spec = Map::new();
    spec.insert("type".into(), json!("Quota"));
    let qtype = attr(root, "type").unwrap_or_else(|| "default".to_owned());
    let qtype = match qtype.as_str() {
        "calendar" | "flexi" | "rollingwindow" | "default" => qtype,
        other => {
            x.c.add_named(
                format!("{}@type", super::xml::label(root)),
                super::report::Status::NotConvertible,
                format!("quota type `{other}`"),
            );
            return None;
        }
    };
    spec.insert("quotaType".into(), json!(qtype));
    let mut ok = true;
    for k in kids(root) {
        let name = k.tag_name().name();
        match name {
            "Allow" => {
                if child(k, "Class").is_some() {
                    x.c.no(k, "class-based Allow (Class ref) is not supported");
                    ok = false;
                    continue;
                }
                let lit = attr(k, "count").or_else(|| Some(text(k)).filter(|t| !t.is_empty()));
                match number_or_ref(lit, attr(k, "countRef")) {
                    Some(v) => {
                        x.c.ok(k, format!("allow: {v}"));
                        spec.insert("allow".into(), v);
                    }
                    None => {
                        x.c.no(k, "Allow without count or countRef");
                        ok = false;
                    }
                }
            }
            "Interval" | "TimeUnit" => {
                let lit = Some(text(k)).filter(|t| !t.is_empty());
                let key = if name == "Interval" { "interval" } else { "timeUnit" };
                match number_or_ref(lit, attr(k, "ref")) {
                    Some(v) => {
                        x.c.ok(k, format!("{key}: {v}"));
                        spec.insert(key.into(), v);
                    }
                    None => {
                        x.c.no(k, format!("{name} without a value or ref"));
                        ok = false;
                    }
                }
            }
            "Identifier" => match attr(k, "ref") {
                Some(r) => {
                    spec.insert("identifier".into(), json!(format!("{{{r}}}")));
                    x.c.ok(k, format!("identifier: {{{r}}}"));
                }
                None => {
                    x.c.no(k, "Identifier without ref");
                    ok = false;
                }
            },
            "MessageWeight" => match number_or_ref(Some(text(k)).filter(|t| !t.is_empty()), attr(k, "ref")) {
                Some(v) => {
                    x.c.ok(k, format!("messageWeight: {v}"));
                    spec.insert("messageWeight".into(), v);
                }
                None => {
                    x.c.no(k, "MessageWeight without a value or ref");
                    ok = false;
                }
            },
            "StartTime" if qtype == "calendar" => {
                spec.insert("startTime".into(), json!(text(k)));
                x.c.ok(k, "startTime (UTC)");
            }
            "StartTime" => x.c.ok(k, "only calendar quotas start at a time (Apigee ignores it too)"),
            "Distributed" | "Synchronous" | "AsynchronousConfiguration" => x.c.approx(
                k,
                "where counters live is a deployment choice in tollgate (--counters memory|redis, --counter-sync sync|async), not a policy setting",
            ),
            "UseQuotaConfigInAPIProduct" => {
                spec.insert("useProduct".into(), json!(true));
                if let Some(step) = attr(k, "stepName") {
                    spec.insert("verifyApiKey".into(), json!(super::sanitize(&step)));
                }
                if let Some(d) = child(k, "DefaultConfig") {
                    for (tag, key) in [("Allow", "allow"), ("Interval", "interval"), ("TimeUnit", "timeUnit")] {
                        if let Some(v) = child_text(d, tag) {
                            spec.entry(key).or_insert(v.parse::<u64>().map(Value::from).unwrap_or(json!(v)));
                        }
                    }
                }
                x.c.ok(k, "useProduct: true (the product's quota, DefaultConfig as the literal settings)");
            }
            "SharedName" => {
                spec.insert("sharedName".into(), json!(text(k)));
                x.c.ok(k, "sharedName");
            }
            "CountOnly" | "EnforceOnly" => {
                let key = if name == "CountOnly" { "countOnly" } else { "enforceOnly" };
                spec.insert(key.into(), json!(truthy(&text(k))));
                x.c.ok(k, key);
            }
            "IgnoreUnresolvedVariables" => {
                if truthy(&text(k)) {
                    x.c.ok(k, "a setting from a template that does not render uses the literal");
                } else {
                    x.c.approx(k, "a reference that does not resolve uses the literal fallback; one that renders an invalid number answers 500 (Apigee: an error either way)");
                }
            }
            _ => {}
        }
    }
    spec.entry("interval").or_insert(json!(1));
    spec.entry("messageWeight").or_insert(json!(1));
    // Apigee sends no rate-limit headers.
    spec.insert("rateLimitHeaders".into(), json!("none"));
    ok.then_some(Value::Object(spec))
}

fn spike_arrest(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut spec = Map::new();
    spec.insert("type".into(), json!("SpikeArrest"));
    let mut ok = true;
    for k in kids(root) {
        match k.tag_name().name() {
            "Rate" => {
                let lit = Some(text(k)).filter(|t| !t.is_empty());
                match (lit, attr(k, "ref")) {
                    (Some(l), None) => {
                        x.c.ok(k, format!("rate: {l}"));
                        spec.insert("rate".into(), json!(l));
                    }
                    (Some(l), Some(r)) => {
                        x.c.approx(k, format!("rate: {l} always: tollgate's SpikeArrest rate is a literal, so `{r}` is not read (a rate from a variable is issue 18 item 4)"));
                        spec.insert("rate".into(), json!(l));
                    }
                    (None, _) => {
                        x.c.no(
                            k,
                            "a Rate from a variable only: tollgate's SpikeArrest rate is a literal",
                        );
                        ok = false;
                    }
                }
            }
            "Identifier" => match attr(k, "ref") {
                Some(r) => {
                    spec.insert("identifier".into(), json!(format!("{{{r}}}")));
                    x.c.ok(k, "identifier");
                }
                None => {
                    x.c.no(k, "Identifier without ref");
                    ok = false;
                }
            },
            "MessageWeight" => {
                match number_or_ref(Some(text(k)).filter(|t| !t.is_empty()), attr(k, "ref")) {
                    Some(v) => {
                        spec.insert("messageWeight".into(), v);
                        x.c.ok(k, "messageWeight");
                    }
                    None => {
                        x.c.no(k, "MessageWeight without a value or ref");
                        ok = false;
                    }
                }
            }
            "UseEffectiveCount" => {
                spec.insert("useEffectiveCount".into(), json!(truthy(&text(k))));
                x.c.ok(k, "useEffectiveCount");
            }
            _ => {}
        }
    }
    spec.entry("useEffectiveCount").or_insert(json!(false));
    (ok && spec.contains_key("rate")).then_some(Value::Object(spec))
}

/// `<Headers><Header name="n">value</Header>…</Headers>` as name → template.
fn headers(x: &mut Ctx<'_>, h: Node<'_, '_>) -> Map<String, Value> {
    let mut m = Map::new();
    for one in kids(h) {
        match attr(one, "name") {
            Some(n) if one.tag_name().name() == "Header" => {
                m.insert(n.to_ascii_lowercase(), json!(text(one)));
                x.c.ok(one, "header");
            }
            _ => x.c.no(one, "a header without a name"),
        }
    }
    x.c.touch(h);
    m
}

fn assign_message(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut set = Map::new();
    let mut set_headers = Map::new();
    let mut add = Map::new();
    let mut remove: Vec<Value> = Vec::new();
    let mut vars = Map::new();
    let mut google = None;
    let mut ok = true;
    let mut uses_refs = false;
    for k in kids(root) {
        match k.tag_name().name() {
            "AssignTo" => {
                if attr(k, "createNew").is_some_and(|v| truthy(&v)) || !text(k).is_empty() {
                    x.c.no(k, "a new message object (createNew / a named message): tollgate's AssignMessage changes the exchange's own request or response");
                    ok = false;
                } else {
                    x.c.ok(k, "the step's own message (request steps change the request, response steps the response)");
                }
            }
            "Set" | "Add" | "Remove" => {
                let op = k.tag_name().name();
                x.c.touch(k);
                for s in kids(k) {
                    match (op, s.tag_name().name()) {
                        ("Set", "Headers") => {
                            let h = headers(x, s);
                            uses_refs |= h.values().any(|v| v.as_str().is_some_and(has_refs));
                            set_headers.extend(h);
                        }
                        ("Add", "Headers") => {
                            let h = headers(x, s);
                            uses_refs |= h.values().any(|v| v.as_str().is_some_and(has_refs));
                            add.extend(h);
                        }
                        ("Remove", "Headers") => {
                            if kids(s).next().is_none() {
                                x.c.no(
                                    s,
                                    "removing every header: tollgate removes named headers only",
                                );
                                ok = false;
                                continue;
                            }
                            for one in kids(s) {
                                match attr(one, "name") {
                                    Some(n) => {
                                        remove.push(json!(n.to_ascii_lowercase()));
                                        x.c.ok(one, "remove.headers");
                                    }
                                    None => {
                                        x.c.no(one, "a header without a name");
                                        ok = false;
                                    }
                                }
                            }
                            x.c.touch(s);
                        }
                        ("Set", "Payload") => {
                            if s.attribute("variablePrefix").is_some()
                                || s.attribute("variableSuffix").is_some()
                            {
                                x.c.no(
                                    s,
                                    "variablePrefix/variableSuffix: tollgate templates use { }",
                                );
                                ok = false;
                                continue;
                            }
                            let body = text(s);
                            uses_refs |= has_refs(&body);
                            set.insert("body".into(), json!(body));
                            if let Some(ct) = attr(s, "contentType") {
                                set_headers.insert("content-type".into(), json!(ct));
                            }
                            x.c.ok(s, "set.body (and content-type)");
                        }
                        ("Set", "Authentication") => match google_token(&mut x.c, s) {
                            Some(g) => google = Some(g),
                            None => ok = false,
                        },
                        (_, other) => {
                            x.c.no(s, format!("{op}/{other}: tollgate's AssignMessage sets, adds and removes headers, sets the body and variables"));
                            ok = false;
                        }
                    }
                }
            }
            "AssignVariable" => {
                let Some(name) = child_text(k, "Name") else {
                    x.c.no(k, "AssignVariable without Name");
                    ok = false;
                    continue;
                };
                let value = child_text(k, "Value");
                let v = if let Some(t) = child_text(k, "Template") {
                    t
                } else if let Some(r) = child_text(k, "Ref") {
                    reference(&r, value.as_deref())
                } else if let Some(v) = value {
                    literal(&v)
                } else {
                    x.c.no(k, "AssignVariable with neither Value, Ref nor Template (or a PropertySetRef/ResourceURL)");
                    ok = false;
                    continue;
                };
                uses_refs |= has_refs(&v);
                vars.insert(name, json!(v));
                x.c.ok(k, "assignVariables");
            }
            _ => {}
        }
    }
    ignore_unresolved(x, root, uses_refs);
    if let Some(n) = child(root, "IgnoreUnresolvedVariables") {
        x.c.touch(n);
    }
    if !ok {
        return None;
    }
    let mut spec = Map::new();
    spec.insert("type".into(), json!("AssignMessage"));
    if !set_headers.is_empty() {
        set.insert("headers".into(), Value::Object(set_headers));
    }
    if !set.is_empty() {
        spec.insert("set".into(), Value::Object(set));
    }
    if !add.is_empty() {
        spec.insert("add".into(), json!({"headers": add}));
    }
    if !remove.is_empty() {
        spec.insert("remove".into(), json!({"headers": remove}));
    }
    if !vars.is_empty() {
        spec.insert("assignVariables".into(), Value::Object(vars));
    }
    if let Some(g) = google {
        spec.insert("googleToken".into(), g);
    }
    Some(Value::Object(spec))
}

fn raise_fault(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut spec = Map::new();
    spec.insert("type".into(), json!("RaiseFault"));
    // Apigee's defaults: 500 and the generic fault.
    spec.insert("status".into(), json!(500));
    spec.insert("errorCode".into(), json!("steps.raisefault.RaiseFault"));
    spec.insert(
        "message".into(),
        json!(format!(
            "Raising fault. Fault name : {}",
            attr(root, "name").unwrap_or_default()
        )),
    );
    let mut ok = true;
    let mut uses_refs = false;
    if let Some(fr) = child(root, "FaultResponse") {
        x.c.touch(fr);
        let mut has_set = false;
        for k in kids(fr) {
            if k.tag_name().name() != "Set" {
                x.c.no(
                    k,
                    format!(
                        "FaultResponse/{}: tollgate's RaiseFault sets status, headers and payload",
                        k.tag_name().name()
                    ),
                );
                ok = false;
                continue;
            }
            has_set = true;
            x.c.touch(k);
            for s in kids(k) {
                match s.tag_name().name() {
                    "StatusCode" => match text(s).parse::<u16>() {
                        Ok(n) if (100..=599).contains(&n) => {
                            spec.insert("status".into(), json!(n));
                            x.c.ok(s, "status");
                        }
                        _ => {
                            x.c.no(s, "a status that is not a literal number (tollgate's RaiseFault status is fixed at load)");
                            ok = false;
                        }
                    },
                    "ReasonPhrase" => x.c.approx(s, "HTTP/2 and Envoy send no reason phrase"),
                    "Headers" => {
                        let h = headers(x, s);
                        uses_refs |= h.values().any(|v| v.as_str().is_some_and(has_refs));
                        spec.insert("headers".into(), Value::Object(h));
                    }
                    "Payload" => {
                        let body = text(s);
                        uses_refs |= has_refs(&body);
                        spec.insert("body".into(), json!(body));
                        if let Some(ct) = attr(s, "contentType") {
                            spec.insert("contentType".into(), json!(ct));
                        }
                        x.c.ok(s, "body (the response is exactly this payload)");
                    }
                    other => {
                        x.c.no(s, format!("Set/{other} in a RaiseFault"));
                        ok = false;
                    }
                }
            }
        }
        if has_set && !spec.contains_key("body") {
            // Apigee answers a FaultResponse without Payload with an empty body.
            spec.insert("body".into(), json!(""));
        }
    }
    if let Some(s) = child(root, "ShortFaultReason") {
        x.c.approx(s, "tollgate always uses the fault message as given");
    }
    ignore_unresolved(x, root, uses_refs);
    if let Some(n) = child(root, "IgnoreUnresolvedVariables") {
        x.c.touch(n);
    }
    ok.then_some(Value::Object(spec))
}

/// KVM `<Key><Parameter>lit</Parameter><Parameter ref="v"/></Key>` as tollgate key parts.
fn kvm_key(k: Node<'_, '_>) -> Option<Vec<Value>> {
    let parts: Vec<Value> = all(k, "Parameter")
        .map(|p| match attr(p, "ref") {
            Some(r) => json!(format!("{{{r}}}")),
            None => json!(literal(&text(p))),
        })
        .collect();
    (!parts.is_empty()).then_some(parts)
}

fn key_value_map(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    // Apigee's default map name.
    let map = attr(root, "mapIdentifier").unwrap_or_else(|| "kvmap".to_owned());
    let mut spec = Map::new();
    spec.insert("type".into(), json!("KeyValueMap"));
    spec.insert("map".into(), json!(map));
    spec.insert("scope".into(), json!("global"));
    // Apigee caches reads for 300 s unless told otherwise.
    spec.insert("expirySeconds".into(), json!(300));
    let (mut get, mut put, mut delete) = (Vec::new(), Vec::new(), Vec::new());
    let mut ok = true;
    for k in kids(root) {
        match k.tag_name().name() {
            "Scope" => {
                let s = text(k);
                if s == "environment" || s == "organization" {
                    x.c.ok(k, "scope: global (one map for the whole configuration)");
                } else {
                    spec.insert("scope".into(), json!("flow"));
                    x.c.approx(k, format!("scope {s} becomes scope: flow (keys prefixed with the flow name in one map)"));
                }
            }
            "ExpiryTimeInSecs" => match text(k).parse::<u64>() {
                Ok(n) => {
                    spec.insert("expirySeconds".into(), json!(n));
                    x.c.ok(k, "expirySeconds");
                }
                Err(_) => {
                    x.c.no(k, "ExpiryTimeInSecs must be a literal number");
                    ok = false;
                }
            },
            "Get" => {
                let (Some(var), Some(key)) =
                    (attr(k, "assignTo"), child(k, "Key").and_then(kvm_key))
                else {
                    x.c.no(k, "Get needs assignTo and a Key of Parameters");
                    ok = false;
                    continue;
                };
                if attr(k, "index").is_some_and(|i| i != "1") {
                    x.c.no(
                        k,
                        "Get with index other than 1: tollgate values are single strings",
                    );
                    ok = false;
                    continue;
                }
                get.push(json!({"key": key, "variable": var}));
                x.c.ok(k, "get");
            }
            "Put" => {
                // Apigee's default keeps an existing value (override="false").
                let overwrite = attr(k, "override").is_some_and(|o| truthy(&o));
                let key = child(k, "Key").and_then(kvm_key);
                let values: Vec<Node<'_, '_>> = all(k, "Value").collect();
                let (Some(key), [v]) = (key, values.as_slice()) else {
                    x.c.no(k, "Put needs a Key of Parameters and exactly one Value");
                    ok = false;
                    continue;
                };
                let value = match attr(*v, "ref") {
                    Some(r) => format!("{{{r}}}"),
                    None => literal(&text(*v)),
                };
                put.push(json!({"key": key, "value": value, "override": overwrite}));
                x.c.ok(k, format!("put, override: {overwrite}"));
            }
            "Delete" => match child(k, "Key").and_then(kvm_key) {
                Some(key) => {
                    delete.push(json!({"key": key}));
                    x.c.ok(k, "delete");
                }
                None => {
                    x.c.no(k, "Delete needs a Key of Parameters");
                    ok = false;
                }
            },
            "InitialEntries" => {
                let mut entries = Map::new();
                for e in all(k, "Entry") {
                    let key: Option<Vec<String>> =
                        child(e, "Key").map(|kk| all(kk, "Parameter").map(text).collect());
                    let val = child_text(e, "Value");
                    match (key, val) {
                        (Some(parts), Some(v)) if !parts.is_empty() => {
                            entries.insert(parts.join("__"), json!(v));
                        }
                        _ => {}
                    }
                }
                x.docs.push(json!({
                    "apiVersion": "tollgate.dev/v1alpha1",
                    "kind": "KeyValueMap",
                    "metadata": {"name": map},
                    "spec": {"entries": entries},
                }));
                x.c.ok(k, format!("a KeyValueMap document `{map}` with these entries (file entries: a policy put on them is refused with 409 FileDefined)"));
            }
            "ExclusiveCache" => x.c.ok(k, "tollgate's read cache is per policy already"),
            _ => {}
        }
    }
    if !get.is_empty() {
        spec.insert("get".into(), json!(get));
    }
    if !put.is_empty() {
        spec.insert("put".into(), json!(put));
    }
    if !delete.is_empty() {
        spec.insert("delete".into(), json!(delete));
    }
    ok.then_some(Value::Object(spec))
}

fn javascript(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut source = String::new();
    let mut ok = true;
    let mut includes = Vec::new();
    let mut main = None;
    let mut props = Map::new();
    for k in kids(root) {
        match k.tag_name().name() {
            "IncludeURL" => includes.push(k),
            "ResourceURL" => main = Some(k),
            "Source" => {
                main = Some(k);
            }
            "Properties" => {
                x.c.touch(k);
                for p in kids(k) {
                    match attr(p, "name") {
                        Some(n) if p.tag_name().name() == "Property" => {
                            props.insert(n, json!(text(p)));
                            x.c.ok(p, "properties");
                        }
                        _ => {
                            x.c.no(p, "a property without a name");
                            ok = false;
                        }
                    }
                }
                if kids(k).next().is_none() {
                    x.c.ok(k, "empty");
                }
            }
            _ => {}
        }
    }
    let read = |x: &mut Ctx<'_>, n: Node<'_, '_>| -> Option<String> {
        let url = text(n);
        let Some(file) = url.strip_prefix("jsc://") else {
            x.c.no(n, format!("`{url}` is not a jsc:// resource"));
            return None;
        };
        let rel = format!("resources/jsc/{file}");
        match x.bundle.text(&rel) {
            Some(Ok(t)) => {
                x.c.ok(n, format!("{rel} copied into the script"));
                x.used.push(rel.clone());
                Some(t.to_owned())
            }
            _ => {
                x.c.no(
                    n,
                    format!("{} is missing or not UTF-8", x.bundle.show(&rel)),
                );
                None
            }
        }
    };
    for inc in includes {
        match read(x, inc) {
            Some(t) => {
                source.push_str(&t);
                source.push('\n');
            }
            None => ok = false,
        }
    }
    match main {
        Some(m) if m.tag_name().name() == "Source" => {
            source.push_str(&text(m));
            x.c.ok(m, "inline source");
        }
        Some(m) => match read(x, m) {
            Some(t) => source.push_str(&t),
            None => ok = false,
        },
        None => {
            x.c.add_named(
                super::xml::label(root),
                super::report::Status::NotConvertible,
                "no ResourceURL or Source",
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let mut spec = Map::new();
    spec.insert("type".into(), json!("JavaScript"));
    let file = format!("scripts/{}.js", x.name);
    spec.insert("file".into(), json!(file));
    // Apigee's script semantics: sloppy mode, Apigee's object model.
    spec.insert("mode".into(), json!("apigee"));
    if !props.is_empty() {
        spec.insert("properties".into(), Value::Object(props));
    }
    let limit = attr(root, "timeLimit").and_then(|t| t.parse::<u64>().ok());
    let label = format!("{}@timeLimit", super::xml::label(root));
    match limit {
        Some(n @ 1..=1000) => {
            spec.insert("timeLimitMs".into(), json!(n));
            x.c.add_named(label, super::report::Status::Converted, "timeLimitMs");
        }
        Some(n) => {
            spec.insert("timeLimitMs".into(), json!(1000));
            x.c.add_named(
                label,
                super::report::Status::Approximated,
                format!("{n} ms capped at tollgate's 1000 ms"),
            );
        }
        None => {
            spec.insert("timeLimitMs".into(), json!(1000));
        }
    }
    if source.contains("httpClient") {
        x.c.add_named(
            format!("{} (script)", super::xml::label(root)),
            super::report::Status::NotConvertible,
            "the script uses httpClient: tollgate's JavaScript needs an httpClient allow-list the bundle does not say (add `httpClient` to the converted policy)",
        );
        return None;
    }
    x.c.add_named(
        format!("{} (script)", super::xml::label(root)),
        super::report::Status::Approximated,
        format!(
            "{file}: `mode: apigee` (sloppy mode, Apigee's object model) in QuickJS, not Rhino: \
             what a script reads beyond that model, or Java objects, is not there"
        ),
    );
    x.files.push((file, source.into_bytes()));
    Some(Value::Object(spec))
}

fn service_callout(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut req = Map::new();
    let mut spec = Map::new();
    spec.insert("type".into(), json!("ServiceCallout"));
    for k in kids(root) {
        match k.tag_name().name() {
            "Request" => {
                x.c.touch(k);
                if attr(k, "variable").is_some() && kids(k).next().is_none() {
                    x.c.no(k, "a request built elsewhere (a named message from AssignMessage): tollgate builds the callout request in the policy");
                    ok = false;
                    continue;
                }
                if let Some(v) = k.attribute("variable") {
                    x.c.add_named(
                        format!("{}@variable", super::xml::path(k)),
                        super::report::Status::Converted,
                        format!("`{v}`: the request is built in the policy"),
                    );
                }
                for s in kids(k) {
                    match s.tag_name().name() {
                        "Set" => {
                            x.c.touch(s);
                            for t in kids(s) {
                                match t.tag_name().name() {
                                    "Headers" => {
                                        let h = headers(x, t);
                                        req.insert("headers".into(), Value::Object(h));
                                    }
                                    "Payload" => {
                                        let body = text(t);
                                        req.insert("body".into(), json!(body));
                                        if let Some(ct) = attr(t, "contentType") {
                                            let h = req.entry("headers").or_insert(json!({}));
                                            if let Some(m) = h.as_object_mut() {
                                                m.insert("content-type".into(), json!(ct));
                                            }
                                        }
                                        x.c.ok(t, "request.body");
                                    }
                                    "Verb" => {
                                        req.insert(
                                            "method".into(),
                                            json!(text(t).to_ascii_uppercase()),
                                        );
                                        x.c.ok(t, "request.method");
                                    }
                                    other => {
                                        x.c.no(t, format!("Set/{other} in a callout request: tollgate sets method, headers and body (query parameters go in the URL)"));
                                        ok = false;
                                    }
                                }
                            }
                        }
                        "IgnoreUnresolvedVariables" => {
                            let note = "unresolved variables render as empty text";
                            if truthy(&text(s)) {
                                x.c.ok(s, note);
                            } else {
                                x.c.approx(
                                    s,
                                    format!("{note}; Apigee would fail the callout on one"),
                                );
                            }
                        }
                        other => {
                            x.c.no(s, format!("Request/{other}"));
                            ok = false;
                        }
                    }
                }
            }
            "Response" => {
                let v = text(k);
                x.c.approx(k, format!(
                    "the answer is in servicecallout.{}.status / .header.<name> / .body, not `{v}.status.code` / `{v}.header.<name>` / `{v}.content`: change the references",
                    x.name
                ));
            }
            "Timeout" => match text(k).parse::<u64>() {
                Ok(n) if (1..=60_000).contains(&n) => {
                    spec.insert("timeoutMs".into(), json!(n));
                    x.c.ok(k, "timeoutMs");
                }
                _ => {
                    spec.insert("timeoutMs".into(), json!(60_000));
                    x.c.approx(k, "timeoutMs 60000 (tollgate's longest)");
                }
            },
            "HTTPTargetConnection" => {
                x.c.touch(k);
                for t in kids(k) {
                    match t.tag_name().name() {
                        "URL" => {
                            req.insert("url".into(), json!(text(t)));
                            x.c.ok(t, "request.url (the host is checked against --callout-allow)");
                        }
                        "Authentication" => match google_token(&mut x.c, t) {
                            Some(g) => {
                                spec.insert("googleToken".into(), g);
                            }
                            None => ok = false,
                        },
                        "SSLInfo" => x.c.approx(t, "TLS uses the system roots (a caFile can be added); client certificates are issue 18 item 4"),
                        "Properties" => x.c.approx(t, "connection properties are tollgate's own (pooled client)"),
                        other => {
                            x.c.no(t, format!("HTTPTargetConnection/{other}"));
                            ok = false;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if !req.contains_key("url") {
        x.c.add_named(
            format!("{}/HTTPTargetConnection/URL", super::xml::label(root)),
            super::report::Status::NotConvertible,
            "no literal URL (LocalTargetConnection or a target server)",
        );
        ok = false;
    }
    if !ok {
        return None;
    }
    req.entry("method").or_insert(json!("GET"));
    spec.insert("request".into(), Value::Object(req));
    // Apigee's defaults: 55 s, no retries, 1xx-3xx are successes.
    spec.entry("timeoutMs").or_insert(json!(55_000));
    spec.insert("retries".into(), json!(0));
    spec.insert("successCodes".into(), json!(["100-399"]));
    Some(Value::Object(spec))
}

fn oas_validation(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("OasValidation"));
    // Apigee: bodies are checked only when asked; every location allows unknown parameters.
    spec.insert("validateBody".into(), json!(false));
    let mut allow = Map::new();
    for l in ["query", "header", "cookie"] {
        allow.insert(l.into(), json!(true));
    }
    spec.insert("response".into(), json!("off"));
    for k in kids(root) {
        match k.tag_name().name() {
            "OASResource" => {
                let r = text(k);
                let Some(file) = r.strip_prefix("oas://") else {
                    x.c.no(k, format!("`{r}` is not an oas:// resource (a spec from a variable is not supported)"));
                    ok = false;
                    continue;
                };
                let rel = format!("resources/oas/{file}");
                if !x.bundle.files.contains_key(&rel) {
                    x.c.no(k, format!("{} is missing", x.bundle.show(&rel)));
                    ok = false;
                    continue;
                }
                // Every file of resources/oas, for the spec's relative $refs.
                for f in x.bundle.list("resources/oas") {
                    let rel = format!("resources/oas/{f}");
                    if let Some(b) = x.bundle.files.get(&rel) {
                        x.files.push((format!("specs/{f}"), b.clone()));
                        x.used.push(rel);
                    }
                }
                spec.insert("spec".into(), json!(format!("specs/{file}")));
                x.c.ok(k, format!("spec: specs/{file}"));
            }
            "Source" => {
                let s = text(k);
                if s == "response" {
                    spec.insert("response".into(), json!("enforce"));
                    x.c.approx(k, "response: enforce (tollgate answers a response that fails validation with 502; the request is checked too)");
                } else {
                    x.c.ok(k, "the request");
                }
            }
            "Options" => {
                x.c.touch(k);
                for o in kids(k) {
                    match o.tag_name().name() {
                        "ValidateMessageBody" => {
                            spec.insert("validateBody".into(), json!(truthy(&text(o))));
                            x.c.ok(o, "validateBody");
                        }
                        "AllowUnspecifiedParameters" => {
                            x.c.touch(o);
                            for p in kids(o) {
                                let key = p.tag_name().name().to_ascii_lowercase();
                                if ["query", "header", "cookie"].contains(&key.as_str()) {
                                    allow.insert(key.clone(), json!(truthy(&text(p))));
                                    x.c.ok(p, format!("allowUnspecifiedParameters.{key}"));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    spec.insert("allowUnspecifiedParameters".into(), Value::Object(allow));
    if let Some(bp) = x.base_path.clone().filter(|b| b != "/") {
        spec.insert("basePath".into(), json!(bp));
    }
    x.c.add_named(
        format!("{} (checks)", super::xml::label(root)),
        super::report::Status::Approximated,
        "paths below the proxy's base path as Apigee; tollgate also refuses a request content type the operation does not declare, and validates OpenAPI 3.1 too",
    );
    (ok && spec.contains_key("spec")).then_some(Value::Object(spec))
}

fn response_cache(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("ResponseCache"));
    // Apigee's defaults where tollgate has the setting: any status but 5xx (ExcludeErrorResponse
    // false), Cache-Control ignored (UseResponseCacheHeaders false), keys per proxy.
    spec.insert("excludeErrorResponses".into(), json!(false));
    spec.insert("respectCacheControl".into(), json!(false));
    spec.insert("scope".into(), json!("flow"));
    spec.insert("ttlSeconds".into(), json!(3600));
    // Apigee runs the flow's response steps on a hit.
    spec.insert("responseStepsOnHit".into(), json!(true));
    let mut fragments = Vec::new();
    let mut expiry: Option<Value> = None;
    let mut ttl_set = false;
    for k in kids(root) {
        match k.tag_name().name() {
            "CacheKey" => {
                x.c.touch(k);
                for f in kids(k) {
                    match f.tag_name().name() {
                        "Prefix" => {
                            spec.insert("keyPrefix".into(), json!(text(f)));
                            x.c.ok(f, "keyPrefix");
                        }
                        "KeyFragment" => {
                            match attr(f, "ref") {
                                Some(r) => fragments.push(json!(format!("{{{r}}}"))),
                                None => fragments.push(json!(literal(&text(f)))),
                            }
                            x.c.ok(f, "keyFragments");
                        }
                        other => {
                            x.c.no(f, format!("CacheKey/{other}"));
                            ok = false;
                        }
                    }
                }
            }
            "Scope" => {
                let s = text(k);
                if s == "Global" {
                    spec.insert("scope".into(), json!("global"));
                    x.c.ok(k, "scope: global");
                } else {
                    x.c.approx(k, format!("scope {s} becomes scope: flow (keys per tollgate flow)"));
                }
            }
            "ExpirySettings" => {
                x.c.touch(k);
                for e in kids(k) {
                    let tag = e.tag_name().name();
                    let lit = Some(text(e)).filter(|t| !t.is_empty());
                    let field = match tag {
                        "TimeoutInSec" | "TimeoutInSeconds" => "timeoutInSec",
                        "ExpiryDate" => "expiryDate",
                        "TimeOfDay" => "timeOfDay",
                        other => {
                            x.c.no(e, format!("ExpirySettings/{other}"));
                            ok = false;
                            continue;
                        }
                    };
                    // A literal TimeoutInSec alone stays ttlSeconds; the rest is `expiry`.
                    let value = match (field, lit, attr(e, "ref")) {
                        ("timeoutInSec", Some(l), None) => match l.parse::<u64>() {
                            Ok(n) if expiry.is_none() && !ttl_set => {
                                ttl_set = true;
                                spec.insert("ttlSeconds".into(), json!(n.clamp(1, 31_536_000)));
                                x.c.ok(e, "ttlSeconds");
                                continue;
                            }
                            Ok(_) => Some(Value::Null),
                            Err(_) => None,
                        },
                        ("timeoutInSec", l, Some(r)) => match l.map(|l| l.parse::<u64>()) {
                            None => Some(json!({"ref": r})),
                            Some(Ok(n)) => Some(json!({"ref": r, "value": n})),
                            Some(Err(_)) => None,
                        },
                        (_, Some(l), None) => Some(json!(l)),
                        (_, l, Some(r)) => Some(match l {
                            Some(l) => json!({"ref": r, "value": l}),
                            None => json!({"ref": r}),
                        }),
                        (_, None, None) => None,
                    };
                    match value {
                        Some(v) if expiry.is_none() && !ttl_set => {
                            expiry = Some(json!({ field: v }));
                            x.c.ok(e, format!("expiry.{field} (UTC)"));
                        }
                        Some(_) => {
                            x.c.no(e, "ExpirySettings holds one setting (tollgate's `expiry` takes exactly one)");
                            ok = false;
                        }
                        None => {
                            x.c.no(e, format!("{tag}: neither a value nor a ref tollgate reads"));
                            ok = false;
                        }
                    }
                }
            }
            "ExcludeErrorResponse" => {
                let v = truthy(&text(k));
                spec.insert("excludeErrorResponses".into(), json!(v));
                if v {
                    x.c.ok(k, "excludeErrorResponses: true (2xx only)");
                } else {
                    x.c.approx(k, "excludeErrorResponses: false stores anything below 500 (Apigee stores 5xx too)");
                }
            }
            "UseResponseCacheHeaders" => {
                spec.insert("respectCacheControl".into(), json!(truthy(&text(k))));
                x.c.approx(k, "respectCacheControl (tollgate reads Cache-Control's no-store/private/no-cache and max-age/s-maxage, not Expires)");
            }
            "SkipCacheLookup" | "SkipCachePopulation" => {
                let key = if k.tag_name().name() == "SkipCacheLookup" {
                    "skipCacheLookup"
                } else {
                    "skipCachePopulation"
                };
                let cond = text(k);
                match crate::expr::Condition::compile_apigee(&cond) {
                    Ok(_) => {
                        spec.insert(key.into(), json!(cond));
                        x.c.ok(k, key);
                    }
                    Err(e) => {
                        x.c.no(k, format!("condition `{cond}`: {e}"));
                        ok = false;
                    }
                }
            }
            "UseAcceptHeader" => {
                if truthy(&text(k)) {
                    fragments.push(json!("{request.header.accept}"));
                    fragments.push(json!("{request.header.accept-encoding}"));
                    x.c.ok(k, "the Accept and Accept-Encoding headers join the key");
                } else {
                    x.c.ok(k, "false");
                }
            }
            "CacheResource" => x.c.approx(k, "tollgate keeps one in-process cache per policy (optionally a Redis tier: `shared`)"),
            "CacheLookupTimeoutInSeconds" => x.c.approx(k, "no wait for a lookup in the local cache"),
            _ => {}
        }
    }
    if fragments.is_empty() {
        fragments.push(json!("{request.uri}"));
    }
    spec.insert("keyFragments".into(), json!(fragments));
    if let Some(e) = expiry {
        spec.remove("ttlSeconds");
        spec.insert("expiry".into(), e);
    }
    x.c.add_named(
        format!("{} (behaviour)", super::xml::label(root)),
        super::report::Status::Approximated,
        "responses to requests carrying credentials are stored only when Cache-Control says any caller may have them, or with scope app (stricter than Apigee)",
    );
    ok.then_some(Value::Object(spec))
}

fn verify_jwt(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("VerifyJwt"));
    let mut claims = Map::new();
    for k in kids(root) {
        match k.tag_name().name() {
            "Algorithm" => {
                let algs: Vec<String> = text(k)
                    .split(',')
                    .map(|a| a.trim().to_owned())
                    .filter(|a| !a.is_empty())
                    .collect();
                spec.insert("algorithms".into(), json!(algs));
                x.c.ok(k, "algorithms");
            }
            "Source" => {
                let s = text(k);
                if let Some(h) = s.strip_prefix("request.header.") {
                    spec.insert(
                        "tokenFrom".into(),
                        json!([{"header": h.to_ascii_lowercase()}]),
                    );
                    x.c.ok(k, "tokenFrom");
                } else if let Some(q) = s.strip_prefix("request.queryparam.") {
                    spec.insert("tokenFrom".into(), json!([{"query": q}]));
                    x.c.ok(k, "tokenFrom");
                } else {
                    x.c.no(k, format!("a token from `{s}`: tollgate reads tokens from a header or query parameter"));
                    ok = false;
                }
            }
            "PublicKey" => match child(k, "JWKS").and_then(|j| attr(j, "uri")) {
                Some(uri) if !uri.contains('{') => {
                    spec.insert("jwks".into(), json!({"url": uri}));
                    x.c.ok(k, "jwks.url");
                }
                _ => {
                    x.c.no(k, "a public key from a variable or inline value: tollgate takes a JWKS URL or file");
                    ok = false;
                }
            },
            "SecretKey" => {
                x.c.no(k, "an HMAC secret from a variable: tollgate takes the secret from the spec or a file");
                ok = false;
            }
            "Issuer" => {
                spec.insert("issuer".into(), json!(text(k)));
                x.c.ok(k, "issuer");
            }
            "Audience" => {
                spec.insert("audience".into(), json!([text(k)]));
                x.c.ok(k, "audience");
            }
            "Subject" => {
                claims.insert("sub".into(), json!(text(k)));
                x.c.ok(k, "matchClaims.sub");
            }
            "AdditionalClaims" => {
                x.c.touch(k);
                for cl in kids(k) {
                    match attr(cl, "name") {
                        Some(n) if attr(cl, "ref").is_none() => {
                            claims.insert(n, json!(text(cl)));
                            x.c.ok(cl, "matchClaims");
                        }
                        _ => {
                            x.c.no(cl, "a claim from a variable");
                            ok = false;
                        }
                    }
                }
            }
            "TimeAllowance" => {
                let t = text(k);
                let secs = t
                    .strip_suffix('s')
                    .and_then(|n| n.parse::<u64>().ok())
                    .or_else(|| {
                        t.strip_suffix("ms")
                            .and_then(|n| n.parse::<u64>().ok())
                            .map(|ms| ms / 1000)
                    });
                match secs {
                    Some(s) => {
                        spec.insert("leewaySeconds".into(), json!(s));
                        x.c.ok(k, "leewaySeconds");
                    }
                    None => {
                        x.c.no(k, format!("TimeAllowance `{t}`"));
                        ok = false;
                    }
                }
            }
            "IgnoreUnresolvedVariables" | "IgnoreCriticalHeaders" | "IgnoreIssuedAt" => x.c.approx(
                k,
                "tollgate's checks are fixed (crit refused unless handled, iat checked)",
            ),
            _ => {}
        }
    }
    if !claims.is_empty() {
        spec.insert("matchClaims".into(), Value::Object(claims));
    }
    if !spec.contains_key("jwks") {
        ok = false;
    }
    ok.then_some(Value::Object(spec))
}

/// `LLMTokenQuota`: Quota's elements, counted in tokens, plus the model and usage sources.
fn llm_token_quota(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut extra = Map::new();
    for k in kids(root) {
        match k.tag_name().name() {
            "LLMModelSource" => {
                extra.insert("llmModelSource".into(), json!(text(k)));
                x.c.ok(k, "llmModelSource (the model the request is counted under with perModel; recorded otherwise)");
            }
            "LLMTokenUsageSource" => {
                extra.insert("llmTokenUsageSource".into(), json!(text(k)));
                x.c.ok(
                    k,
                    "llmTokenUsageSource (default: the usage the LLM API itself reports)",
                );
            }
            "MessageWeight" => {
                x.c.no(
                    k,
                    "a MessageWeight in an LLMTokenQuota: tollgate weighs by tokens",
                );
                ok = false;
            }
            _ => {}
        }
    }
    let spec = quota(x, root)?;
    let Value::Object(mut spec) = spec else {
        return None;
    };
    spec.insert("type".into(), json!("LlmTokenQuota"));
    spec.remove("messageWeight");
    spec.extend(extra);
    x.c.add_named(
        format!("{} (counting)", super::xml::label(root)),
        super::report::Status::Approximated,
        "tollgate reserves the request's estimate (prompt tokens plus its output limit, or defaultOutputTokens 4096) on the request and reconciles to the real usage when the exchange ends; Apigee counts after the response",
    );
    ok.then_some(Value::Object(spec))
}

/// `PromptTokenLimit`: SpikeArrest's elements, weighed in prompt tokens.
fn prompt_token_limit(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut source = None;
    for k in kids(root) {
        match k.tag_name().name() {
            "UserPromptSource" => {
                source = Some(text(k));
                x.c.ok(k, "userPromptSource");
            }
            "MessageWeight" => {
                x.c.no(
                    k,
                    "a MessageWeight in a PromptTokenLimit: tollgate weighs by prompt tokens",
                );
                ok = false;
            }
            _ => {}
        }
    }
    let spec = spike_arrest(x, root)?;
    let Value::Object(mut spec) = spec else {
        return None;
    };
    spec.insert("type".into(), json!("PromptTokenLimit"));
    if let Some(s) = source {
        spec.insert("userPromptSource".into(), json!(s));
    }
    ok.then_some(Value::Object(spec))
}

// ─────────────────── ExtractVariables, CORS, JSONThreatProtection ───────────────────

/// ExtractVariables' `Source`, classified: Apigee's `message` (the flow's message) becomes
/// `request` (approximated: tollgate's ExtractVariables has no "the step's message").
fn message_source(x: &mut Ctx<'_>, k: Node<'_, '_>) -> Option<String> {
    let s = text(k);
    match s.as_str() {
        "request" | "response" => {
            x.c.ok(k, format!("source: {s}"));
            Some(s)
        }
        "" | "message" => {
            x.c.approx(k, "Apigee's `message` (the flow's message) becomes source: request; write source: response for a step in a response flow");
            Some("request".to_owned())
        }
        v => {
            x.c.ok(k, format!("source: the variable `{v}`"));
            Some(v.to_owned())
        }
    }
}

/// `<Pattern ignoreCase="…">` children of an ExtractVariables element: the patterns and the
/// element's ignoreCase (tollgate has one per element).
fn ev_patterns(x: &mut Ctx<'_>, n: Node<'_, '_>) -> Option<(Vec<String>, bool)> {
    let mut pats = Vec::new();
    let mut cases = Vec::new();
    for p in kids(n) {
        if p.tag_name().name() != "Pattern" {
            continue;
        }
        let t = text(p);
        if t.is_empty() {
            continue;
        }
        cases.push(attr(p, "ignoreCase").is_some_and(|v| truthy(&v)));
        pats.push(t);
    }
    if pats.is_empty() {
        x.c.no(n, "no Pattern to match");
        return None;
    }
    let ignore = cases.iter().any(|c| *c);
    if cases.iter().all(|c| *c == ignore) {
        x.c.ok(
            n,
            format!("{} pattern(s), ignoreCase: {ignore}", pats.len()),
        );
    } else {
        x.c.approx(n, "patterns mixing ignoreCase true and false all compare case-insensitively (tollgate's ignoreCase is per element)");
    }
    Some((pats, ignore))
}

fn extract_variables(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("ExtractVariables"));
    // Apigee's defaults: the flow's message, unresolved variables fail the step.
    spec.insert("source".into(), json!("request"));
    spec.insert("ignoreUnresolvedVariables".into(), json!(false));
    let mut uri: Vec<String> = Vec::new();
    let mut uri_case = false;
    let mut lists: [(&str, Vec<Value>); 4] = [
        ("queryParams", Vec::new()),
        ("headers", Vec::new()),
        ("formParams", Vec::new()),
        ("variables", Vec::new()),
    ];
    let mut jsonp = Vec::new();
    let mut saw_source = false;
    for k in kids(root) {
        let tag = k.tag_name().name();
        match tag {
            "Source" => {
                saw_source = true;
                if let Some(s) = message_source(x, k) {
                    spec.insert("source".into(), json!(s));
                }
                if attr(k, "clearPayload").is_some_and(|v| truthy(&v)) {
                    x.c.add_named(
                        format!("{}/@clearPayload", super::xml::path(k)),
                        super::report::Status::Approximated,
                        "the source payload is kept (tollgate does not clear it after extraction)",
                    );
                }
            }
            "VariablePrefix" => {
                let p = text(k);
                if !p.is_empty() {
                    spec.insert("variablePrefix".into(), json!(p));
                }
                x.c.ok(k, "variablePrefix");
            }
            "IgnoreUnresolvedVariables" => {
                spec.insert("ignoreUnresolvedVariables".into(), json!(truthy(&text(k))));
                x.c.ok(k, "ignoreUnresolvedVariables");
            }
            "URIPath" => match ev_patterns(x, k) {
                Some((p, c)) => {
                    uri.extend(p);
                    uri_case |= c;
                }
                None => ok = false,
            },
            "QueryParam" | "Header" | "FormParam" | "Variable" => {
                let i = match tag {
                    "QueryParam" => 0,
                    "Header" => 1,
                    "FormParam" => 2,
                    _ => 3,
                };
                let Some(name) = attr(k, "name") else {
                    x.c.no(k, "no name attribute");
                    ok = false;
                    continue;
                };
                match ev_patterns(x, k) {
                    Some((p, c)) => lists[i]
                        .1
                        .push(json!({"name": name, "patterns": p, "ignoreCase": c})),
                    None => ok = false,
                }
            }
            "JSONPayload" => {
                x.c.touch(k);
                for v in kids(k) {
                    let path = child_text(v, "JSONPath");
                    match (v.tag_name().name(), attr(v, "name"), path) {
                        ("Variable", Some(name), Some(p)) if !p.contains('{') => {
                            let mut j = json!({"name": name, "jsonPath": p});
                            if let Some(t) = attr(v, "type") {
                                j["type"] = json!(t);
                            }
                            jsonp.push(j);
                            x.c.ok(v, "jsonPayload");
                        }
                        _ => {
                            x.c.no(v, "a JSONPayload Variable needs a name and a literal JSONPath (a path from a variable is not supported)");
                            ok = false;
                        }
                    }
                }
            }
            "XMLPayload" => {
                x.c.no(k, "tollgate's ExtractVariables reads no XML payloads");
                ok = false;
            }
            _ => {}
        }
    }
    if !saw_source {
        x.c.add_named(
            format!("{}/Source (default message)", super::xml::path(root)),
            super::report::Status::Approximated,
            "Apigee's default `message` (the flow's message) becomes source: request; write source: response for a step in a response flow",
        );
    }
    if !uri.is_empty() {
        spec.insert(
            "uriPath".into(),
            json!({"patterns": uri, "ignoreCase": uri_case}),
        );
    }
    for (key, v) in lists {
        if !v.is_empty() {
            spec.insert(key.into(), json!(v));
        }
    }
    if !jsonp.is_empty() {
        spec.insert("jsonPayload".into(), json!(jsonp));
    }
    ok.then_some(Value::Object(spec))
}

fn cors(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("CORS"));
    // Apigee's documented defaults, written out.
    spec.insert("allowMethods".into(), json!("GET, PUT, POST, DELETE"));
    spec.insert(
        "allowHeaders".into(),
        json!("origin, x-requested-with, accept, content-type"),
    );
    spec.insert("maxAge".into(), json!(1800));
    spec.insert("allowCredentials".into(), json!(false));
    spec.insert("generatePreflightResponse".into(), json!(true));
    spec.insert("ignoreUnresolvedVariables".into(), json!(true));
    for k in kids(root) {
        let tag = k.tag_name().name();
        let v = text(k);
        let field = match tag {
            "AllowOrigins" => "allowOrigins",
            "AllowMethods" => "allowMethods",
            "AllowHeaders" => "allowHeaders",
            "ExposeHeaders" => "exposeHeaders",
            "MaxAge" => "maxAge",
            "AllowCredentials" => "allowCredentials",
            "GeneratePreflightResponse" => "generatePreflightResponse",
            "IgnoreUnresolvedVariables" => "ignoreUnresolvedVariables",
            _ => continue,
        };
        match field {
            "maxAge" => match v.parse::<i64>() {
                Ok(n) => {
                    spec.insert(field.into(), json!(n));
                    x.c.ok(k, field);
                }
                Err(_) => {
                    x.c.no(k, format!("MaxAge `{v}` is not a number of seconds"));
                    ok = false;
                }
            },
            "allowCredentials" | "generatePreflightResponse" | "ignoreUnresolvedVariables" => {
                spec.insert(field.into(), json!(truthy(&v)));
                x.c.ok(k, field);
            }
            _ if v.is_empty() => {
                x.c.no(k, "empty");
                ok = false;
            }
            _ => {
                spec.insert(field.into(), json!(v));
                x.c.ok(k, field);
            }
        }
    }
    if !spec.contains_key("allowOrigins") {
        x.c.add_named(
            format!("{}/AllowOrigins", super::xml::path(root)),
            super::report::Status::NotConvertible,
            "CORS needs AllowOrigins",
        );
        ok = false;
    }
    ok.then_some(Value::Object(spec))
}

fn json_threat_protection(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("JSONThreatProtection"));
    let mut limits = 0;
    for k in kids(root) {
        let tag = k.tag_name().name();
        let field = match tag {
            "Source" => {
                let v = text(k);
                match v.as_str() {
                    "request" | "response" => {
                        spec.insert("source".into(), json!(v));
                        x.c.ok(k, format!("source: {v}"));
                    }
                    "" | "message" => x.c.ok(k, "the step's own message (tollgate's default)"),
                    _ => {
                        x.c.no(k, format!("a variable source (`{v}`): tollgate checks the request or response body"));
                        ok = false;
                    }
                }
                continue;
            }
            "ArrayElementCount" => "arrayElementCount",
            "ContainerDepth" => "containerDepth",
            "ObjectEntryCount" => "objectEntryCount",
            "ObjectEntryNameLength" => "objectEntryNameLength",
            "StringValueLength" => "stringValueLength",
            _ => continue,
        };
        match text(k).parse::<i64>() {
            Ok(n) => {
                spec.insert(field.into(), json!(n));
                limits += usize::from(n >= 0);
                x.c.ok(k, field);
            }
            Err(_) => {
                x.c.no(
                    k,
                    format!(
                        "`{}` is not a number (a limit from a variable is not supported)",
                        text(k)
                    ),
                );
                ok = false;
            }
        }
    }
    if limits == 0 {
        x.c.add_named(
            format!("{} (limits)", super::xml::label(root)),
            super::report::Status::NotConvertible,
            "no limit set: nothing to check",
        );
        ok = false;
    }
    ok.then_some(Value::Object(spec))
}

// ─────────────────────────── AccessControl, GenerateJWT ───────────────────────────

fn access_control(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("AccessControl"));
    // Apigee's defaults, written out.
    spec.insert("noRuleMatchAction".into(), json!("ALLOW"));
    spec.insert("validateBasedOn".into(), json!("X_FORWARDED_FOR_ALL_IP"));
    let mut rules = Vec::new();
    for k in kids(root) {
        match k.tag_name().name() {
            "IPRules" => {
                x.c.touch(k);
                if let Some(a) = attr(k, "noRuleMatchAction") {
                    let a = a.to_ascii_uppercase();
                    if a == "ALLOW" || a == "DENY" {
                        spec.insert("noRuleMatchAction".into(), json!(a));
                    } else {
                        x.c.add_named(
                            format!("{}/@noRuleMatchAction", super::xml::path(k)),
                            super::report::Status::NotConvertible,
                            format!("`{a}` is neither ALLOW nor DENY"),
                        );
                        ok = false;
                    }
                }
                for r in kids(k) {
                    if r.tag_name().name() != "MatchRule" {
                        continue;
                    }
                    let action = attr(r, "action").map(|a| a.to_ascii_uppercase());
                    let mut addrs = Vec::new();
                    let mut bad = None;
                    for s in all(r, "SourceAddress") {
                        let ip = text(s);
                        let mask = attr(s, "mask");
                        if ip.contains('{') || mask.as_deref().is_some_and(|m| m.contains('{')) {
                            bad = Some("a SourceAddress or mask from a variable (tollgate's rules are literal CIDRs)");
                            continue;
                        }
                        addrs.push(match mask {
                            Some(m) => format!("{ip}/{m}"),
                            None => ip,
                        });
                    }
                    match (action.as_deref(), bad) {
                        (Some(a @ ("ALLOW" | "DENY")), None) if !addrs.is_empty() => {
                            rules.push(json!({"action": a, "sourceAddresses": addrs}));
                            x.c.ok(r, format!("matchRules: {a} {}", addrs.join(", ")));
                        }
                        (_, Some(why)) => {
                            x.c.no(r, why);
                            ok = false;
                        }
                        _ => {
                            x.c.no(
                                r,
                                "a MatchRule needs action ALLOW or DENY and a SourceAddress",
                            );
                            ok = false;
                        }
                    }
                }
            }
            "ValidateBasedOn" => {
                let v = text(k).to_ascii_uppercase();
                match v.as_str() {
                    "X_FORWARDED_FOR_ALL_IP"
                    | "X_FORWARDED_FOR_FIRST_IP"
                    | "X_FORWARDED_FOR_LAST_IP" => {
                        spec.insert("validateBasedOn".into(), json!(v));
                        x.c.ok(k, format!("validateBasedOn: {v}"));
                    }
                    _ => {
                        x.c.no(k, format!("`{v}` is not a ValidateBasedOn value"));
                        ok = false;
                    }
                }
            }
            _ => {}
        }
    }
    spec.insert("matchRules".into(), json!(rules));
    x.c.add_named(
        format!("{} (client address)", super::xml::label(root)),
        super::report::Status::Approximated,
        "without X-Forwarded-For the address checked is the one Envoy saw (client.ip, with --xff-trusted-hops); X_FORWARDED_FOR_ALL_IP also checks it beside every header entry",
    );
    ok.then_some(Value::Object(spec))
}

/// A literal or `ref` value as a template (`ref` wins, the literal is its fallback).
fn value_or_ref(n: Node<'_, '_>) -> Option<String> {
    let lit = Some(text(n)).filter(|t| !t.is_empty());
    match (attr(n, "ref"), lit) {
        (Some(r), l) => Some(reference(&r, l.as_deref())),
        (None, Some(l)) => Some(literal(&l)),
        (None, None) => None,
    }
}

/// A relative time (`30m`, `3600`) as GenerateJwt reads it.
fn relative_time(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && matches!(unit, "" | "ms" | "s" | "m" | "h" | "d" | "w")
}

/// `<Claim name type ref array>` children as JSON values (templates for strings).
fn jwt_claims(x: &mut Ctx<'_>, n: Node<'_, '_>) -> Option<Map<String, Value>> {
    x.c.touch(n);
    let mut m = Map::new();
    let mut ok = true;
    for c in kids(n) {
        let name = attr(c, "name");
        let kind = attr(c, "type").unwrap_or_else(|| "string".into());
        let array = attr(c, "array").is_some_and(|v| truthy(&v));
        let lit = text(c);
        let value = match (
            c.tag_name().name(),
            name.as_deref(),
            kind.as_str(),
            array,
            attr(c, "ref"),
        ) {
            ("Claim", Some(_), "string", false, _) => value_or_ref(c).map(Value::String),
            ("Claim", Some(_), "number", false, None) => lit
                .parse::<f64>()
                .ok()
                .and_then(|_| serde_json::from_str(&lit).ok()),
            ("Claim", Some(_), "boolean", false, None) => match lit.to_ascii_lowercase().as_str() {
                "true" => Some(json!(true)),
                "false" => Some(json!(false)),
                _ => None,
            },
            _ => None,
        };
        match (name, value) {
            (Some(name), Some(v)) => {
                m.insert(name, v);
                x.c.ok(c, "a claim");
            }
            _ => {
                x.c.no(c, "only string claims (literal or ref) and literal number/boolean claims convert: a typed claim from a variable, an array or a map would be sent as a string");
                ok = false;
            }
        }
    }
    ok.then_some(m)
}

fn generate_jwt(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert("type".into(), json!("GenerateJwt"));
    spec.insert("ignoreUnresolvedVariables".into(), json!(false));
    let apigee_name = attr(root, "name").unwrap_or_else(|| x.name.clone());
    spec.insert(
        "outputVariable".into(),
        json!(format!("jwt.{apigee_name}.generated_jwt")),
    );
    for k in kids(root) {
        let tag = k.tag_name().name();
        match tag {
            "Algorithm" => {
                spec.insert("algorithm".into(), json!(text(k)));
                x.c.ok(k, "algorithm");
            }
            "Type" => {
                if text(k).eq_ignore_ascii_case("signed") {
                    x.c.ok(k, "a signed JWT");
                } else {
                    x.c.no(k, "tollgate signs JWTs; it does not encrypt them");
                    ok = false;
                }
            }
            "SecretKey" | "PrivateKey" => {
                x.c.touch(k);
                let mut key = Map::new();
                if let Some(e) = attr(k, "encoding") {
                    match e.to_ascii_lowercase().as_str() {
                        "utf-8" | "utf8" => key.insert("encoding".into(), json!("utf-8")),
                        "base64" => key.insert("encoding".into(), json!("base64")),
                        "hex" | "base16" => key.insert("encoding".into(), json!("hex")),
                        other => {
                            x.c.add_named(
                                format!("{}/@encoding", super::xml::path(k)),
                                super::report::Status::NotConvertible,
                                format!(
                                    "encoding `{other}` (tollgate reads utf-8, base64 and hex)"
                                ),
                            );
                            ok = false;
                            None
                        }
                    };
                }
                for p in kids(k) {
                    match (p.tag_name().name(), value_or_ref(p)) {
                        ("Value", Some(v)) => {
                            key.insert("value".into(), json!(v));
                            x.c.ok(p, "the key's value (a template)");
                        }
                        ("Id", Some(v)) => {
                            key.insert("id".into(), json!(v));
                            x.c.ok(p, "the `kid` header");
                        }
                        ("Password", _) => {
                            x.c.no(p, "tollgate reads unencrypted PEM keys only");
                            ok = false;
                        }
                        _ => {}
                    }
                }
                let field = if tag == "SecretKey" {
                    "secretKey"
                } else {
                    "privateKey"
                };
                spec.insert(field.into(), Value::Object(key));
            }
            "Issuer" | "Subject" => match value_or_ref(k) {
                Some(v) => {
                    spec.insert(tag.to_ascii_lowercase(), json!(v));
                    x.c.ok(k, tag.to_ascii_lowercase());
                }
                None => x.c.ok(k, "empty: not set"),
            },
            "Audience" => match (attr(k, "ref"), text(k)) {
                (Some(r), l) if l.is_empty() => {
                    spec.insert("audience".into(), json!(format!("{{{r}}}")));
                    x.c.approx(k, "the variable's value is one audience (Apigee splits a comma-separated value into several)");
                }
                (None, l) if !l.is_empty() => {
                    let many: Vec<String> = l
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(literal)
                        .collect();
                    spec.insert("audience".into(), json!(many));
                    x.c.ok(k, "audience");
                }
                _ => {
                    x.c.no(k, "an Audience with both ref and a literal, or neither");
                    ok = false;
                }
            },
            "ExpiresIn" | "NotBefore" => {
                let v = text(k);
                let field = if tag == "ExpiresIn" {
                    "expiresIn"
                } else {
                    "notBeforeIn"
                };
                if attr(k, "ref").is_none() && relative_time(&v) {
                    spec.insert(field.into(), json!(v));
                    x.c.ok(k, field);
                } else {
                    x.c.no(k, format!("`{v}`: tollgate takes a literal relative time (a ref or an absolute time is not supported)"));
                    ok = false;
                }
            }
            "Id" => {
                match value_or_ref(k) {
                    Some(v) => spec.insert("id".into(), json!(v)),
                    None => spec.insert("id".into(), json!("")),
                };
                x.c.ok(k, "`jti` (empty: a generated UUID, as Apigee's <Id/>)");
            }
            "AdditionalClaims" | "AdditionalHeaders" => match jwt_claims(x, k) {
                Some(m) => {
                    let field = if tag == "AdditionalClaims" {
                        "additionalClaims"
                    } else {
                        "additionalHeaders"
                    };
                    spec.insert(field.into(), Value::Object(m));
                }
                None => ok = false,
            },
            "OutputVariable" => {
                spec.insert("outputVariable".into(), json!(text(k)));
                x.c.ok(k, "outputVariable");
            }
            "IgnoreUnresolvedVariables" => {
                spec.insert("ignoreUnresolvedVariables".into(), json!(truthy(&text(k))));
                x.c.ok(k, "ignoreUnresolvedVariables");
            }
            "CriticalHeaders" => {
                x.c.no(k, "tollgate sets no `crit` header");
                ok = false;
            }
            _ => {}
        }
    }
    ok.then_some(Value::Object(spec))
}

// ─────────────────── SanitizeUserPrompt, SanitizeModelResponse ───────────────────

/// Apigee's Model Armor policies: Model Armor alone decides (no local detectors), a match
/// refuses, an error refuses. `prompt` is SanitizeUserPrompt.
fn model_armor(x: &mut Ctx<'_>, root: Node<'_, '_>, prompt: bool) -> Option<Value> {
    let mut ok = true;
    let mut spec = Map::new();
    spec.insert(
        "type".into(),
        json!(if prompt {
            "SanitizePrompt"
        } else {
            "SanitizeResponse"
        }),
    );
    // Apigee's policy asks Model Armor only: no local detector runs.
    spec.insert("detectors".into(), json!({}));
    let mut armor = Map::new();
    armor.insert("failOpen".into(), json!(false));
    armor.insert("onMatch".into(), json!("block"));
    armor.insert("redact".into(), json!(false));
    armor.insert("timeoutMs".into(), json!(1500));
    for k in kids(root) {
        match (k.tag_name().name(), prompt) {
            ("ModelArmor", _) => {
                x.c.touch(k);
                for m in kids(k) {
                    if m.tag_name().name() != "TemplateName" {
                        continue;
                    }
                    let t = text(m);
                    if t.starts_with("projects/") && !t.contains('{') {
                        armor.insert("templateName".into(), json!(t));
                        x.c.ok(m, "external.modelArmor.templateName (the endpoint follows its location; the token is the gateway's Google identity)");
                    } else {
                        x.c.no(m, "a TemplateName from variables: tollgate needs the literal projects/…/locations/…/templates/… to reach Model Armor's regional endpoint");
                        ok = false;
                    }
                }
            }
            ("UserPromptSource", true) => {
                spec.insert("promptSource".into(), json!(text(k)));
                x.c.ok(k, "promptSource: Model Armor is asked about this text (a redact decision still rewrites the body's strings)");
            }
            ("UserPromptSource", false) => x.c.approx(k, "not sent: tollgate sends Model Armor the generated text only"),
            ("LLMResponseSource", false) => x.c.approx(k, "tollgate reads the generated text itself, from every API it understands (JSON answers and streams), in place of this expression"),
            ("IgnoreUnresolvedVariables", _) => {
                if truthy(&text(k)) {
                    x.c.ok(k, "a variable that does not resolve renders as empty text");
                } else {
                    x.c.approx(k, "a variable that does not resolve renders as empty text (Apigee would fail the step)");
                }
            }
            _ => {}
        }
    }
    if !armor.contains_key("templateName") {
        if ok {
            x.c.add_named(
                format!("{}/ModelArmor/TemplateName", super::xml::label(root)),
                super::report::Status::NotConvertible,
                "no Model Armor template",
            );
        }
        ok = false;
    }
    if prompt && !spec.contains_key("promptSource") {
        x.c.add_named(
            format!("{}/UserPromptSource (default)", super::xml::label(root)),
            super::report::Status::Approximated,
            "Apigee's default is the last part of a Gemini request; tollgate sends every string of the prompt (all messages, any API it understands)",
        );
    }
    let mut external = json!({ "modelArmor": armor });
    if !prompt {
        // The answer must be checked before the client reads it: a stream is ended with the
        // API's refusal rather than passed unchecked.
        external["streams"] = json!("block");
    }
    spec.insert("external".into(), external);
    x.c.add_named(
        format!("{} (behaviour)", super::xml::label(root)),
        super::report::Status::Approximated,
        if prompt {
            "a match is 400 steps.sanitizeprompt.PromptBlocked, an unreachable Model Armor 503 steps.sanitizeprompt.ExternalGuardFailed (tollgate's codes); Apigee's SanitizeUserPrompt.<policy>.* variables are set"
        } else {
            "a match turns the answer into the API's own refusal (a stream ends with it: streams: block), an unreachable Model Armor refuses (tollgate's codes); Apigee's SanitizeModelResponse.<policy>.* variables are set"
        },
    );
    ok.then_some(Value::Object(spec))
}

fn sanitize_user_prompt(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    model_armor(x, root, true)
}

fn sanitize_model_response(x: &mut Ctx<'_>, root: Node<'_, '_>) -> Option<Value> {
    model_armor(x, root, false)
}
