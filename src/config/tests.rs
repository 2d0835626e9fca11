//! Configurations compiled whole and the snapshots they give: flow selection, errors,
//! consumer objects, phases.

use super::*;
use crate::consumer::{hash_key, Origin};
use crate::vars::RequestInfo;

fn files(text: &str) -> Vec<SourceFile> {
    vec![SourceFile {
        name: "test.yaml".into(),
        text: text.into(),
    }]
}

const BASE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set: {headers: {x-flow: "{flow.name}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  match: {pathPrefixes: [/v1/chat], methods: [post]}
  request: [{policy: tag}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: v1}
spec:
  match: {pathPrefixes: [/v1]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api-host}
spec:
  match: {hosts: ["*.example.com"]}
  priority: 10
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: fallback}
spec:
  default: true
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: by-name-only}
spec: {}
"#;

fn req(method: &str, path: &str, host: &str) -> RequestInfo {
    RequestInfo {
        method: method.into(),
        uri: path.into(),
        host: host.into(),
        ..Default::default()
    }
}

#[test]
fn selection_order() {
    let s = compile(&files(BASE), None).unwrap();
    let pick = |m, p, h, named: Option<&str>| {
        s.select(named, &req(m, p, h))
            .unwrap()
            .map(|f| f.name.clone())
    };
    assert_eq!(
        pick("POST", "/v1/chat/completions", "a", None).as_deref(),
        Some("chat")
    );
    assert_eq!(
        pick("GET", "/v1/chat/completions", "a", None).as_deref(),
        Some("v1")
    );
    assert_eq!(
        pick("GET", "/v1/chat", "x.example.com:443", None).as_deref(),
        Some("api-host")
    );
    assert_eq!(
        pick("GET", "/v1/chat", "example.com", None).as_deref(),
        Some("v1")
    );
    assert_eq!(
        pick("GET", "/other", "a", None).as_deref(),
        Some("fallback")
    );
    assert_eq!(
        pick("GET", "/other", "a", Some("by-name-only")).as_deref(),
        Some("by-name-only")
    );
    // A name that is not defined is an error, not a fall-through to matching.
    let e = s
        .select(Some("missing"), &req("GET", "/other", "a"))
        .unwrap_err();
    assert_eq!(e, UnknownFlow("missing".into()));
    assert_eq!(
        (e.fault().status, e.fault().code.as_str()),
        (500, "tollgate.UnknownFlow")
    );
}

/// The same target written differently selects the same flow: host case, port and
/// trailing dot, repeated slashes, dot segments, escapes.
#[test]
fn selection_cannot_be_dodged() {
    let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  match: {hosts: [API.Example.com.], pathPrefixes: [/v1/chat]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: wild}
spec:
  match: {hosts: ["*.internal"]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: open}
spec: {default: true}
"#;
    let s = compile(&files(text), None).unwrap();
    let pick = |p: &str, h: &str| {
        s.select(None, &req("POST", p, h))
            .unwrap()
            .unwrap()
            .name
            .clone()
    };
    for host in [
        "api.example.com",
        "API.EXAMPLE.COM.:8443",
        "Api.Example.Com:80",
        "api.example.com.",
    ] {
        for path in [
            "/v1/chat/completions",
            "//v1//chat/completions",
            "/v1/./chat",
            "/x/../v1/chat",
            "/v1%2Fchat",
            "/%761/chat",
            "/v1\\chat?a=b",
        ] {
            assert_eq!(pick(path, host), "chat", "{host} {path}");
        }
    }
    assert_eq!(pick("/v1/chat", "api.example.org"), "open");
    assert_eq!(pick("/v2/chat", "api.example.com"), "open");
    assert_eq!(pick("/v1/../v2/chat", "api.example.com"), "open");
    assert_eq!(pick("/", "A.B.INTERNAL.:1"), "wild");
    assert_eq!(pick("/", "internal"), "open");
    assert_eq!(pick("/", "é.internal"), "wild");
    assert_eq!(pick("/", "é"), "open");
}

#[test]
fn match_entries_are_checked() {
    let flow = |m: &str| {
        format!("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: f}}\nspec: {{match: {m}}}\n")
    };
    let e = errs(&flow("{pathPrefixes: ['//v1//chat']}"));
    assert!(
        e.contains("spec.match.pathPrefixes[0]") && e.contains("write `/v1/chat`"),
        "{e}"
    );
    let e = errs(&flow("{pathPrefixes: [v1]}"));
    assert!(e.contains("must start with `/`"), "{e}");
    let e = errs(&flow("{hosts: ['api.example.com:443']}"));
    assert!(
        e.contains("spec.match.hosts[0]") && e.contains("without a port"),
        "{e}"
    );
    for bad in ["é", "a*b", "*.*", ""] {
        let e = errs(&flow(&format!("{{hosts: ['{bad}']}}")));
        assert!(e.contains("spec.match.hosts[0]"), "{bad}: {e}");
    }
    compile(
        &files(&flow("{hosts: ['*', 'api.*', '*-api.example.com']}")),
        None,
    )
    .unwrap();
}

fn errs(text: &str) -> String {
    compile(&files(text), None).unwrap_err().to_string()
}

#[test]
fn errors_name_file_document_and_field() {
    let e = errs(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {requets: []}\n",
    );
    assert!(e.contains("test.yaml: Flow \"f\" (document 1)"), "{e}");
    assert!(e.contains("unknown field `requets`"), "{e}");

    let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {request: [{policy: nope}]}\n");
    assert!(
        e.contains("spec.request[0].policy") && e.contains("nope"),
        "{e}"
    );

    let e = errs("a: [\n");
    assert!(e.contains("invalid YAML"), "{e}");

    let e = errs("apiVersion: v1\nkind: Flow\nmetadata: {name: f}\n");
    assert!(e.contains("apiVersion"), "{e}");

    // Every type of the model is implemented now: a policy's own error names its field.
    let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: ModelRouter}\n");
    assert!(e.contains("field `spec.rules`"), "{e}");

    let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 'x'}\n");
    assert!(e.contains("spec.status"), "{e}");

    let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {request: [{policy: p, condition: 'a ==' }]}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 400}\n");
    assert!(e.contains("spec.request[0].condition"), "{e}");

    let policy_p = "---\napiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 400}\n";
    let e = errs(&format!("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: f}}\nspec: {{request: [{{policy: p, apigeeCondition: 'request.verb = '}}]}}\n{policy_p}"));
    assert!(
        e.contains("spec.request[0].apigeeCondition") && e.contains("at column 16"),
        "{e}"
    );
    let e = errs(&format!("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: f}}\nspec: {{request: [{{policy: p, condition: 'true', apigeeCondition: 'true'}}]}}\n{policy_p}"));
    assert!(
        e.contains("spec.request[0]") && e.contains("not both"),
        "{e}"
    );
    let e = errs(&format!("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {{name: a}}\nspec: {{type: AssignMessage, set: {{headers: {{x: '{{fooBar(client_id)}}'}}}}}}\n{policy_p}"));
    assert!(e.contains("unknown template function `fooBar`"), "{e}");

    let dup = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: chat}}\nspec: {{}}\n");
    assert!(errs(&dup).contains("duplicate Flow name"));

    let two_defaults = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: d2}}\nspec: {{default: true}}\n");
    assert!(errs(&two_defaults).contains("more than one flow"));
}

#[test]
fn openapi_and_empty_documents_are_skipped() {
    let text =
        format!("{BASE}---\n---\nopenapi: 3.1.0\ninfo: {{title: x, version: '1'}}\npaths: {{}}\n");
    assert!(compile(&files(&text), None).is_ok());
}

#[test]
fn key_value_maps_from_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token.txt"), "from-file\n").unwrap();
    let kvm = "apiVersion: tollgate.dev/v1alpha1\nkind: KeyValueMap\nmetadata: {name: creds}\nspec:\n  entries:\n    plain: v\n    tok: {valueFrom: {file: token.txt}, secret: true}\n    lit: {value: x, secret: true}\n";
    let snap = compile(&files(&format!("{BASE}---\n{kvm}")), Some(dir.path())).unwrap();
    let m = &snap.kvms["creds"];
    assert_eq!(m["plain"].value, "v");
    assert_eq!(
        (m["tok"].value.as_str(), m["tok"].secret),
        ("from-file", true)
    );
    assert!(m["lit"].secret);

    for (entries, want) in [
        ("{\"a\\nb\": v}", "control characters"),
        (
            "{a: {value: x, valueFrom: {env: X}}}",
            "exactly one of value, valueFrom",
        ),
        (
            "{a: {valueFrom: {env: TOLLGATE_SURELY_UNSET_VAR}}}",
            "is not set",
        ),
        ("{a: {secret: true}}", "exactly one of value, valueFrom"),
    ] {
        let text = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: KeyValueMap\nmetadata: {{name: m}}\nspec: {{entries: {entries}}}\n");
        let e = errs(&text);
        assert!(
            e.contains("KeyValueMap \"m\"") && e.contains(want),
            "{entries}: {e}"
        );
    }
    let big = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: KeyValueMap\nmetadata: {{name: m}}\nspec: {{entries: {{a: {}}}}}\n", "v".repeat(70_000));
    assert!(errs(&big).contains("at most"));
}

const CONSUMERS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: chat}
spec:
  operations: [{path: "/v1/chat/completions", methods: [POST]}]
  quota: {limit: 10, timeUnit: minute}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {name: acme}
spec:
  developerEmail: dev@acme.test
  products: [chat]
  keys:
  - {id: k1, hash: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
  - {id: k2, valueFrom: {env: TOLLGATE_TEST_KEY_K2}, expiresAt: "2030-01-01T00:00:00Z"}
"#;

#[test]
fn products_and_apps_from_files() {
    // The variable comes from an injected environment, not the process's.
    let options = LoadOptions {
        env: EnvLookup::fixed([("TOLLGATE_TEST_KEY_K2", "k2-secret-value-0123456789")]),
        ..Default::default()
    };
    let compile =
        |text: &str| compile_with_options(&files(text), None, &Services::default(), &options);
    let s = compile(CONSUMERS).unwrap();
    assert_eq!(s.products.len(), 1);
    assert_eq!(
        s.apps[0].keys[1].hash,
        hash_key("k2-secret-value-0123456789")
    );
    assert_eq!(s.apps[0].keys[1].expires_at, Some(1_893_456_000_000));
    assert!(s.apps.iter().all(|a| a.origin == Origin::File));

    let bad = |from: &str, to: &str| {
        compile(&CONSUMERS.replace(from, to))
            .unwrap_err()
            .to_string()
    };
    assert!(bad("products: [chat]", "products: [gold]").contains("no ApiProduct named `gold`"));
    assert!(bad("hash: \"sha256:ba", "hash: \"md5:ba").contains("spec.keys[0].hash"));
    assert!(bad("{id: k1, hash:", "{id: k1, value: clear, hash:").contains("unknown field `value`"));
    assert!(bad("TOLLGATE_TEST_KEY_K2", "TOLLGATE_TEST_KEY_UNSET").contains("is not set"));
    assert!(bad("2030-01-01T00:00:00Z", "tomorrow").contains("RFC 3339"));
    assert!(bad("/v1/chat/completions", "v1").contains("spec.operations[0].path"));
    assert!(bad("limit: 10", "limit: 0").contains("spec.quota"));
    assert!(bad("dev@acme.test", "nobody").contains("developerEmail"));
}

/// A key from a mounted Secret file (relative to the configuration directory), its
/// trailing newline not part of the key; unreadable and too-short files are refused.
#[test]
fn app_keys_from_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k2.key"), "k2-from-a-secret-file-0123\n").unwrap();
    std::fs::write(dir.path().join("short.key"), "too-short\n").unwrap();
    let text = CONSUMERS.replace("{env: TOLLGATE_TEST_KEY_K2}", "{file: k2.key}");
    let s = compile(&files(&text), Some(dir.path())).unwrap();
    assert_eq!(
        s.apps[0].keys[1].hash,
        hash_key("k2-from-a-secret-file-0123")
    );
    let absolute = dir.path().join("k2.key");
    let text = CONSUMERS.replace(
        "{env: TOLLGATE_TEST_KEY_K2}",
        &format!("{{file: \"{}\"}}", absolute.display()),
    );
    let s = compile(&files(&text), None).unwrap();
    assert_eq!(
        s.apps[0].keys[1].hash,
        hash_key("k2-from-a-secret-file-0123")
    );
    let fails = |from: &str| {
        let text = CONSUMERS.replace("{env: TOLLGATE_TEST_KEY_K2}", from);
        compile(&files(&text), Some(dir.path()))
            .unwrap_err()
            .to_string()
    };
    let e = fails("{file: absent.key}");
    assert!(
        e.contains("spec.keys[1].valueFrom.file") && e.contains("cannot read"),
        "{e}"
    );
    assert!(fails("{file: short.key}").contains("16-512 printable"));
    assert!(fails("{file: k2.key, env: X}").contains("exactly one of env, file"));
}

/// One root cause, one error: a Policy (or ApiProduct) that fails to compile is not
/// reported again as missing by every flow (or app) that refers to it, and a file that
/// cannot be read does not make every reference into it an error.
#[test]
fn one_root_cause_one_error() {
    let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: broken}
spec: {type: RaiseFault, status: 'x'}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: a}
spec: {request: [{policy: broken}]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: b}
spec: {default: true, request: [{policy: broken}], response: [{policy: broken}]}
"#;
    let e = compile(&files(text), None).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(e.0[0].location.contains("Policy \"broken\""), "{e}");
    // A name nobody wrote is still an error.
    let e = errs(&text.replace("response: [{policy: broken}]", "response: [{policy: typo}]"));
    assert!(
        e.contains("no Policy named `typo`") && !e.contains("`broken`"),
        "{e}"
    );

    let products = CONSUMERS.replace("limit: 10", "limit: 0");
    let e = compile(&files(&products), None).unwrap_err();
    assert!(e.to_string().contains("spec.quota"), "{e}");
    assert!(!e.to_string().contains("no ApiProduct named"), "{e}");

    let two = vec![
        SourceFile {
            name: "policies.yaml".into(),
            text: "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 403\n".into(),
        },
        SourceFile {
            name: "flows.yaml".into(),
            text: "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {default: true, request: [{policy: p}]}\n".into(),
        },
    ];
    let e = compile(&two, None).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(
        e.0[0].location.starts_with("policies.yaml") && e.0[0].message.contains("invalid YAML"),
        "{e}"
    );
}

#[test]
fn empty_configuration_is_a_warning() {
    let s = compile(&[], None).unwrap();
    assert_eq!(s.warnings.len(), 1);
    assert!(s.warnings[0].message.contains("no configuration documents"));
    let s = compile(&files("---\n"), Some(Path::new("/etc/tollgate"))).unwrap();
    assert_eq!(s.warnings[0].location, "/etc/tollgate");
    assert!(compile(&files(BASE), None).unwrap().warnings.is_empty());
}

const CACHE_AUTH: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: key}
spec: {type: VerifyApiKey}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec: {type: ResponseCache, SCOPE}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request: [STEPS]
  response: [{policy: cache}]
"#;

/// A cache lookup before authentication: refused when shared, warned when per app.
#[test]
fn cache_before_authentication() {
    let cfg = |scope: &str, steps: &str| {
        files(&CACHE_AUTH.replace("SCOPE", scope).replace("STEPS", steps))
    };
    for scope in ["ttlSeconds: 60", "scope: global", "scope: flow"] {
        let e = compile(&cfg(scope, "{policy: cache}, {policy: key}"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Flow \"api\"")
                && e.contains("spec.request[0]")
                && e.contains("before the authentication step `key`"),
            "{scope}: {e}"
        );
        // After authentication: fine.
        let s = compile(&cfg(scope, "{policy: key}, {policy: cache}"), None).unwrap();
        assert!(s.warnings.is_empty());
    }
    let s = compile(&cfg("scope: app", "{policy: cache}, {policy: key}"), None).unwrap();
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(
        s.warnings[0].message.contains("scope app"),
        "{:?}",
        s.warnings
    );
    // No authentication in the flow: nothing to judge.
    compile(&cfg("scope: global", "{policy: cache}"), None).unwrap();
}

/// A flow that reads bodies larger than one ext_proc message is refused, against the
/// serving process's --max-message-bytes.
#[test]
fn max_body_must_fit_one_message() {
    let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: body}
spec: {type: AssignMessage, set: {body: "{request.content}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: big}
spec:
  default: true
  maxBodyBytes: 20000000
  request: [STEPS]
"#;
    let with = |steps: &str, max: usize| {
        compile_with_options(
            &files(&text.replace("STEPS", steps)),
            None,
            &Services::default(),
            &LoadOptions {
                max_message_bytes: max,
                ..Default::default()
            },
        )
    };
    let e = with("{policy: body}", DEFAULT_MAX_MESSAGE_BYTES)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spec.maxBodyBytes")
            && e.contains("--max-message-bytes")
            && e.contains("20065536"),
        "{e}"
    );
    with("{policy: body}", 20_065_536).unwrap();
    // A flow that reads no body is not limited by its maxBodyBytes.
    with("", DEFAULT_MAX_MESSAGE_BYTES).unwrap();
}

#[test]
fn phases_split() {
    let s = compile(&files(BASE), None).unwrap();
    let chat = &s.by_name["chat"];
    assert_eq!(chat.request.on_headers.len(), 1);
    assert!(!chat.request.needs_body());
}

/// A step's `apigeeCondition` compiles to a condition the step applies by, and the flow's
/// description names its language.
#[test]
fn steps_take_apigee_conditions() {
    let text = format!(
        "{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: ap}}\n\
         spec:\n  request:\n    - {{policy: tag, apigeeCondition: 'request.verb = \"POST\"'}}\n    \
         - {{policy: tag, condition: \"request.method == 'GET'\"}}\n"
    );
    let s = compile(&files(&text), None).unwrap();
    let ap = &s.by_name["ap"];
    let steps: Vec<_> = ap.request.steps().collect();
    let ex = |m: &str| crate::vars::Exchange {
        request: req(m, "/", "a"),
        ..Default::default()
    };
    assert!(steps[0].applies(&ex("POST")) && !steps[0].applies(&ex("GET")));
    assert!(steps[1].applies(&ex("GET")) && !steps[1].applies(&ex("POST")));
    let d = ap.describe();
    assert_eq!(d["request"][0]["condition"], "request.verb = \"POST\"");
    assert_eq!(d["request"][0]["conditionLanguage"], "apigee");
    assert_eq!(d["request"][1]["conditionLanguage"], "cel");
}

/// Fault rules compile with their conditions in either language; what they cannot hold is
/// refused at load, naming the field.
#[test]
fn fault_rules_compile_and_are_checked() {
    const POLICIES: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: status}
spec:
  type: AssignMessage
  set: {statusCode: 403}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: deny}
spec: {type: RaiseFault, status: 403}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec: {type: ResponseCache}
"#;
    let flow = |spec: &str| {
        format!(
            "{BASE}---\n{POLICIES}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\n\
             metadata: {{name: fr}}\nspec:\n{spec}"
        )
    };
    let ok = flow(
        "  basePath: /api\n  request: [{policy: deny}]\n  faultRules:\n  \
         - {name: a, apigeeCondition: 'fault.name = \"RaiseFault\"', steps: [{policy: status}]}\n  \
         - {name: b, condition: \"fault.code == 'x'\", steps: [{policy: tag}]}\n  \
         defaultFaultRule: {alwaysEnforce: true, steps: [{policy: tag}]}\n",
    );
    let s = compile(&files(&ok), None).unwrap();
    let fr = &s.by_name["fr"];
    assert_eq!(fr.base_path.as_deref(), Some("/api"));
    let rules = fr.faults.as_ref().expect("rules");
    assert_eq!(rules.rules.len(), 2);
    assert!(rules.default.as_ref().is_some_and(|d| d.always_enforce));
    let d = fr.describe();
    assert_eq!(d["faultRules"]["rules"][0]["conditionLanguage"], "apigee");
    assert_eq!(d["faultRules"]["rules"][1]["steps"][0]["policy"], "tag");
    assert_eq!(d["faultRules"]["default"]["alwaysEnforce"], true);
    assert_eq!(d["basePath"], "/api");
    // Flows without rules carry none: their rejections take the usual path.
    assert!(s.by_name["chat"].faults.is_none());

    for (spec, want) in [
        (
            "  response: [{policy: status}]\n",
            "field `spec.response[0]`: AssignMessage `status` sets `set.statusCode`",
        ),
        (
            "  faultRules: [{name: a, steps: [{policy: tag}]}, {name: a, steps: []}]\n",
            "field `spec.faultRules[1].name`: another fault rule is named `a`",
        ),
        (
            "  faultRules: [{name: a, condition: 'true', apigeeCondition: 'x = 1'}]\n",
            "field `spec.faultRules[0]`: a fault rule has `condition` (CEL) or `apigeeCondition`",
        ),
        (
            "  faultRules: [{name: a, apigeeCondition: 'fault.name ='}]\n",
            "field `spec.faultRules[0].apigeeCondition`",
        ),
        (
            "  defaultFaultRule: {steps: [{policy: nope}]}\n",
            "field `spec.defaultFaultRule.steps[0].policy`: no Policy named `nope`",
        ),
        (
            "  basePath: api\n",
            "field `spec.basePath`: `api` must be a path starting with `/`",
        ),
        ("  faultRules: [{name: a, steps: [], extra: 1}]\n", "extra"),
        (
            "  defaultFaultRule: {steps: [{policy: cache}]}\n",
            "field `spec.defaultFaultRule.steps[0]`: ResponseCache `cache` needs hooks beyond",
        ),
    ] {
        let e = errs(&flow(spec));
        assert!(e.contains(want), "{spec}: {e}");
    }
}

#[test]
fn llm_tracking_is_placed_where_the_slots_are_first_read() {
    let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set: {headers: {x-flow: "{flow.name}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: model}
spec:
  type: AssignMessage
  set: {headers: {x-model: "{llm.model}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: reads}
spec:
  request: [{policy: tag}, {policy: model}, {policy: tag}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: metrics-only}
spec:
  llm:
    includeUsage: true
    counting: {charsPerToken: 3.5, charsPerTokenByModel: {claude: 3.2}}
  request: [{policy: tag}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: untracked}
spec:
  request: [{policy: tag}]
"#;
    let s = compile(&files(text), None).unwrap();
    let names = |p: &crate::pipeline::DirectionPipeline| {
        p.steps().map(|s| s.policy_name.clone()).collect::<Vec<_>>()
    };
    let reads = &s.by_name["reads"];
    // The header step before it still runs on the headers; from the tracker on, the body.
    assert_eq!(reads.request.on_headers.len(), 1);
    assert_eq!(
        names(&reads.request),
        ["tag", crate::llm::track::STEP_NAME, "model", "tag"]
    );
    assert_eq!(names(&reads.response), [crate::llm::track::STEP_NAME]);
    assert_eq!(reads.response.chunk_steps.len(), 1);
    assert!(!reads.request.replaces_body);
    let m = &s.by_name["metrics-only"];
    assert_eq!(names(&m.request), ["tag", crate::llm::track::STEP_NAME]);
    assert!(m.request.replaces_body, "includeUsage may rewrite the body");
    assert_eq!(m.request.owned, ["accept-encoding", "x-flow"]);
    let u = &s.by_name["untracked"];
    assert!(!u.request.needs_body() && u.response.is_empty());

    let e = errs(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {llm: {includeUsages: true}}\n",
    );
    assert!(e.contains("includeUsages"), "{e}");
    let e = errs(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {llm: {counting: {charsPerTokenByModel: {claude: 0}}}}\n",
    );
    assert!(e.contains("spec.llm.counting"), "{e}");
}
