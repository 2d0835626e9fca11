use super::*;
use crate::vars::{Headers, RequestInfo, ResponseInfo};

fn build_y(y: &str) -> Result<Arc<dyn Policy>, SpecError> {
    let ctx = BuildContext {
        name: "ev".into(),
        ..Default::default()
    };
    build(&ctx, serde_norway::from_str(y).unwrap())
}

fn request(path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), path.into());
    h.push(":authority".into(), "api.example.com".into());
    for (k, v) in headers {
        h.push((*k).into(), (*v).into());
    }
    let mut ex = Exchange {
        flow: "f".into(),
        request: RequestInfo::from_headers(h),
        ..Default::default()
    };
    ex.set_body(Direction::Request, body.map(|b| b.as_bytes().to_vec()));
    ex
}

fn run(p: &Arc<dyn Policy>, ex: &mut Exchange, dir: Direction) -> Outcome {
    match p.run(ex, dir) {
        Hook::Ready(o) => o,
        Hook::Pending(_) => panic!("ExtractVariables never waits"),
    }
}

fn var(ex: &Exchange, name: &str) -> Option<String> {
    ex.lookup(name).map(|v| v.into_owned())
}

#[test]
fn uri_path_query_and_headers_with_a_prefix() {
    let p = build_y(
        r#"
variablePrefix: req
uriPath: {patterns: ["/v2/accounts/{id}", "/accounts/{id}/**"]}
queryParams: [{name: code, patterns: ["DBN{dbncode}"], ignoreCase: true}]
headers: [{name: Authorization, patterns: ["Bearer {token}"]}]
"#,
    )
    .unwrap();
    assert!(!p.needs_body(Direction::Request));
    let mut ex = request(
        "/accounts/42/balance?code=dbn88",
        &[("authorization", "Bearer abc.def")],
        None,
    );
    assert_eq!(run(&p, &mut ex, Direction::Request), Outcome::Continue);
    assert_eq!(var(&ex, "req.id").as_deref(), Some("42"));
    assert_eq!(var(&ex, "req.dbncode").as_deref(), Some("88"));
    assert_eq!(var(&ex, "req.token").as_deref(), Some("abc.def"));

    // A capture is one segment; a pattern without `/**` matches the whole path only.
    let mut ex = request("/v2/accounts/42/x", &[("authorization", "Basic x")], None);
    assert_eq!(run(&p, &mut ex, Direction::Request), Outcome::Continue);
    assert_eq!(var(&ex, "req.id"), None);
    assert_eq!(var(&ex, "req.token"), None);
    let mut ex = request("/v2/accounts/7", &[], None);
    run(&p, &mut ex, Direction::Request);
    assert_eq!(var(&ex, "req.id").as_deref(), Some("7"));
}

#[test]
fn repeated_values_by_index() {
    let p = build_y(
        r#"
queryParams:
- {name: w, patterns: ["{first}"]}
- {name: w.2, patterns: ["{second}"]}
headers:
- {name: x-h, patterns: ["{all}"]}
- {name: x-h.3, patterns: ["{third}"]}
"#,
    )
    .unwrap();
    let mut ex = request("/?w=sun&w=rain", &[("x-h", "a, b"), ("x-h", "c")], None);
    run(&p, &mut ex, Direction::Request);
    assert_eq!(var(&ex, "first").as_deref(), Some("sun"));
    assert_eq!(var(&ex, "second").as_deref(), Some("rain"));
    assert_eq!(var(&ex, "all").as_deref(), Some("a, b,c"));
    assert_eq!(var(&ex, "third").as_deref(), Some("c"));
}

#[test]
fn patterns_match_whole_values() {
    let pat = |s: &str, ic: bool, path: bool| Pattern::compile(s, None, ic, path, "f").unwrap();
    let p = pat("{a}.{b}", false, false);
    assert_eq!(p.matches("x.y.z"), Some(vec![("a", "x"), ("b", "y.z")]));
    assert_eq!(p.matches(".y"), None, "captures are never empty");
    assert_eq!(p.matches("xy"), None);
    let p = pat("Bearer {t}", true, false);
    assert_eq!(p.matches("BEARER Tok"), Some(vec![("t", "Tok")]));
    assert_eq!(p.matches("Bearer "), None);
    let p = pat("/a/{id}", false, true);
    assert_eq!(p.matches("/a/b"), Some(vec![("id", "b")]));
    assert_eq!(p.matches("/a/b/c"), None);
    assert_eq!(p.matches("/A/b"), None);
    let p = pat("/a/**", false, true);
    assert_eq!(p.matches("/a/b/c"), Some(vec![]));
    assert_eq!(p.matches("/a"), Some(vec![]));
    assert_eq!(p.matches("/ab"), None);
    // `**` anywhere, `*` one segment, captures inside a segment.
    let p = pat("/**/{id}", false, true);
    assert_eq!(p.matches("/v1/customers/42"), Some(vec![("id", "42")]));
    assert_eq!(p.matches("/42"), Some(vec![("id", "42")]));
    let p = pat("/*/orders/{order}.json", false, true);
    assert_eq!(p.matches("/u7/orders/9.json"), Some(vec![("order", "9")]));
    assert_eq!(p.matches("/orders/9.json"), None);
    let p = pat("/users/{user}/**/items/{item}", false, true);
    assert_eq!(
        p.matches("/users/u1/a/b/items/i2"),
        Some(vec![("user", "u1"), ("item", "i2")])
    );
    assert_eq!(
        p.matches("/users/u1/items/i2"),
        Some(vec![("user", "u1"), ("item", "i2")])
    );
    // Many `**` over a long path: bounded work, a clean no.
    let p = pat("/**/**/**/**/**/x", false, true);
    let long = "/a".repeat(30_000);
    assert_eq!(p.matches(&long), None);
    assert_eq!(p.matches(&format!("{long}/x")), Some(vec![]));
    // Non-ASCII text under ignoreCase whose lower case changes length matches nothing
    // rather than capturing at a wrong offset.
    let p = pat("x{v}", true, false);
    assert_eq!(p.matches("xÄ"), Some(vec![("v", "Ä")]));
    assert_eq!(p.matches("xİ"), None);
}

#[test]
fn json_payload_with_types() {
    let p = build_y(
        r#"
variablePrefix: body
jsonPayload:
- {name: model, jsonPath: "$.model"}
- {name: stream, jsonPath: "$.stream", type: boolean}
- {name: max, jsonPath: "$.max_tokens", type: integer}
- {name: temp, jsonPath: "$.temperature", type: double}
- {name: roles, jsonPath: "$.messages[*].role"}
- {name: first, jsonPath: "$.messages[0]"}
- {name: one, jsonPath: "$.model", type: nodeset}
- {name: missing, jsonPath: "$.nope"}
"#,
    )
    .unwrap();
    assert!(p.needs_body(Direction::Request));
    assert!(!p.needs_body(Direction::Response));
    let body = r#"{"model":"gpt-4o","stream":true,"max_tokens":64,"temperature":0.5,
        "messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]}"#;
    let mut ex = request("/v1/chat", &[], Some(body));
    assert_eq!(run(&p, &mut ex, Direction::Request), Outcome::Continue);
    assert_eq!(var(&ex, "body.model").as_deref(), Some("gpt-4o"));
    assert_eq!(
        ex.var("body.stream"),
        Some(crate::vars::ValueRef::Bool(true))
    );
    assert_eq!(ex.var("body.max"), Some(crate::vars::ValueRef::Int(64)));
    assert_eq!(ex.var("body.temp"), Some(crate::vars::ValueRef::Float(0.5)));
    assert_eq!(
        var(&ex, "body.roles").as_deref(),
        Some(r#"["system","user"]"#)
    );
    assert_eq!(
        var(&ex, "body.first").as_deref(),
        Some(r#"{"content":"s","role":"system"}"#)
    );
    assert_eq!(var(&ex, "body.one").as_deref(), Some(r#"["gpt-4o"]"#));
    assert_eq!(var(&ex, "body.missing"), None);
}

#[test]
fn faults_as_apigee() {
    let p = build_y(r#"{jsonPayload: [{name: n, jsonPath: "$.n", type: integer}]}"#).unwrap();
    let code = |o: Outcome| match o {
        Outcome::Reject(f) => (f.status, f.code),
        other => panic!("expected a fault, got {other:?}"),
    };
    let mut ex = request("/", &[], Some(r#"{"n":"ten"}"#));
    assert_eq!(
        code(run(&p, &mut ex, Direction::Request)),
        (500, "steps.extractvariables.UnableToCast".into())
    );
    let mut ex = request("/", &[], Some(r#"{"n": 3000000000}"#));
    assert_eq!(
        code(run(&p, &mut ex, Direction::Request)).1,
        "steps.extractvariables.UnableToCast",
        "integer is 32 bits, as Java's"
    );
    let mut ex = request("/", &[], Some("not json"));
    assert_eq!(
        code(run(&p, &mut ex, Direction::Request)).1,
        "steps.extractvariables.ExecutionFailed"
    );
    let mut ex = request("/", &[], None);
    assert_eq!(
        code(run(&p, &mut ex, Direction::Request)).1,
        "steps.extractvariables.ExecutionFailed"
    );
    // Ignored: nothing set, the step goes on.
    let p =
        build_y(r#"{ignoreUnresolvedVariables: true, jsonPayload: [{name: n, jsonPath: "$.n"}]}"#)
            .unwrap();
    let mut ex = request("/", &[], Some("not json"));
    assert_eq!(run(&p, &mut ex, Direction::Request), Outcome::Continue);
    assert_eq!(var(&ex, "n"), None);

    // A response source on the request path.
    let p = build_y(r#"{source: response, headers: [{name: x, patterns: ["{v}"]}]}"#).unwrap();
    let mut ex = request("/", &[], None);
    assert_eq!(
        code(run(&p, &mut ex, Direction::Request)).1,
        "steps.extractvariables.SourceMessageNotAvailable"
    );
    // ... and on the response path.
    let mut h = Headers::new();
    h.push("x".into(), "hello".into());
    ex.response = Some(ResponseInfo {
        status: 200,
        headers: h,
    });
    assert_eq!(run(&p, &mut ex, Direction::Response), Outcome::Continue);
    assert_eq!(var(&ex, "v").as_deref(), Some("hello"));
}

#[test]
fn variable_sources_and_form_params() {
    let p = build_y(
        r#"
source: callout.body
variablePrefix: c
jsonPayload: [{name: tier, jsonPath: "$.user.tier"}]
variables: [{name: region.code, patterns: ["{area}-{zone}"]}]
"#,
    )
    .unwrap();
    let mut ex = request("/", &[], None);
    let code = |o: Outcome| match o {
        Outcome::Reject(f) => f.code,
        other => panic!("expected a fault, got {other:?}"),
    };
    assert_eq!(
        code(run(&p, &mut ex, Direction::Request)),
        "steps.extractvariables.SourceMessageNotAvailable"
    );
    ex.set_var("callout.body", r#"{"user":{"tier":"gold"}}"#);
    ex.set_var("region.code", "eu-west");
    assert_eq!(run(&p, &mut ex, Direction::Request), Outcome::Continue);
    assert_eq!(var(&ex, "c.tier").as_deref(), Some("gold"));
    assert_eq!(var(&ex, "c.area").as_deref(), Some("eu"));
    assert_eq!(var(&ex, "c.zone").as_deref(), Some("west"));

    let p = build_y(r#"{formParams: [{name: greeting, patterns: ["hello {user}"]}]}"#).unwrap();
    assert!(p.needs_body(Direction::Request));
    let form = [(
        "content-type",
        "application/x-www-form-urlencoded; charset=utf-8",
    )];
    let mut ex = request("/", &form, Some("a=1&greeting=hello+Mae%20West"));
    run(&p, &mut ex, Direction::Request);
    assert_eq!(var(&ex, "user").as_deref(), Some("Mae West"));
    // Not a form: nothing read.
    let mut ex = request("/", &[], Some("greeting=hello+x"));
    run(&p, &mut ex, Direction::Request);
    assert_eq!(var(&ex, "user"), None);
}

#[test]
fn refused_at_load() {
    let field = |y: &str| build_y(y).unwrap_err().field;
    assert_eq!(field("{}"), "");
    assert_eq!(field("{uriPath: {patterns: []}}"), "uriPath.patterns");
    assert_eq!(
        field(r#"{jsonPayload: [{name: a, jsonPath: "$[?"}]}"#),
        "jsonPayload[0].jsonPath"
    );
    assert_eq!(
        field(r#"{jsonPayload: [{name: a, jsonPath: "$.a", type: date}]}"#),
        "jsonPayload[0].type"
    );
    assert_eq!(
        field(r#"{jsonPayload: [{name: request.verb, jsonPath: "$.a"}]}"#),
        "jsonPayload[0].name"
    );
    assert_eq!(
        field(r#"{variablePrefix: response, headers: [{name: a, patterns: ["{b}"]}]}"#),
        "headers[0].patterns[0]"
    );
    assert_eq!(
        field(r#"{headers: [{name: a, patterns: ["{b}{c}"]}]}"#),
        "headers[0].patterns[0]"
    );
    assert_eq!(
        field(r#"{headers: [{name: a, patterns: ["{b"]}]}"#),
        "headers[0].patterns[0]"
    );
    assert_eq!(
        field(r#"{source: my.var, headers: [{name: a, patterns: ["{b}"]}]}"#),
        "source"
    );
    assert_eq!(
        field(r#"{source: "a b", variables: [{name: a, patterns: ["{b}"]}]}"#),
        "source"
    );
    assert_eq!(field("{nope: 1}"), "nope");
}
