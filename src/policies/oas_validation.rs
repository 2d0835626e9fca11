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
//! The description is compiled and checked by [`crate::openapi`]; this module is the
//! policy around it: its spec, the fault a failed check becomes (400 for a request, 502 for
//! an enforced response) and the logging of a response check.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::openapi::{AllowSpec, Api, OasError, Options, Violations};
use crate::pipeline::{Direction, Hook, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "OasValidation";
pub const FAILED: &str = "policies.oasvalidation.Failed";

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

#[derive(Debug)]
struct OasValidation {
    name: String,
    api: Api,
    validate_body: bool,
    body_schemas: bool,
    response: ResponseMode,
    max_violations: usize,
}

/// Compiles the description at `path` (the policy's whole load-time work).
fn compile(path: &Path, spec: &Spec) -> Result<OasValidation, OasError> {
    let api = Api::compile(
        path,
        &Options {
            base_path: spec.base_path.clone(),
            responses: spec.response != ResponseMode::Off,
            allow: spec.allow_unspecified_parameters,
            max_depth: spec.max_depth,
            max_items: spec.max_array_items,
        },
    )?;
    Ok(OasValidation {
        name: String::new(),
        body_schemas: api.has_body_schemas(),
        api,
        validate_body: spec.validate_body,
        response: spec.response,
        max_violations: spec.max_violations.max(1),
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

impl OasValidation {
    fn check_request(&self, ex: &Exchange) -> Result<(), Fault> {
        let mut v = Violations::new(self.max_violations);
        self.api.check_request(ex, self.validate_body, &mut v);
        v.into_fault(400, FAILED, "request")
    }

    fn check_response(&self, ex: &mut Exchange) -> Result<(), Fault> {
        let mut v = Violations::new(self.max_violations);
        self.api.check_response(ex, &mut v);
        let failed = !v.entries().is_empty();
        match self.response {
            ResponseMode::Enforce => v.into_fault(502, FAILED, "response"),
            _ => {
                if failed {
                    let shown: Vec<String> = v
                        .entries()
                        .iter()
                        .map(|(p, m)| format!("{p}: {m}"))
                        .collect();
                    tracing::warn!(policy = %self.name, violations = ?shown, "response breaks the API description");
                    ex.set_var(format!("{}.response.failed", self.name), true);
                }
                Ok(())
            }
        }
    }
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

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        Hook::from(match dir {
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
    use serde_json::{json, Value};

    use super::*;
    use crate::vars::{Headers, RequestInfo, ResponseInfo};

    pub(crate) fn exchange(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Exchange {
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
        build(
            &ctx,
            serde_norway::from_str(&format!("spec: spec.yaml\n{extra}")).unwrap(),
        )
    }

    fn run(p: &Arc<dyn Policy>, ex: &mut Exchange, dir: Direction) -> Result<(), Fault> {
        match p.run(ex, dir) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(_) => panic!("OasValidation never waits"),
        }
    }

    fn pointers(f: &Fault) -> Vec<String> {
        f.violations
            .as_ref()
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|x| x["pointer"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
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
        write(
            d.path(),
            "more.yaml",
            "Dog:\n  type: object\n  required: [barks]\n  properties: {barks: {type: boolean}}\n",
        );
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
        assert_eq!(
            pointers(&run(&p, &mut ex, Direction::Request).unwrap_err()),
            ["/path"]
        );
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
            [
                "/query/limit",
                "/query/tags/1",
                "/header/x-trace",
                "/cookie/session"
            ]
        );
        let mut ex = exchange("GET", "/v1/pets?limit=ten", &[], None);
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/query/limit", "/header/x-trace"]);
        assert!(
            f.message.contains("required parameter is missing") || f.message.contains("integer")
        );
    }

    #[test]
    fn unspecified_parameters() {
        let d = pets();
        let p = policy(
            d.path(),
            "allowUnspecifiedParameters: {query: false, header: false, cookie: false}",
        )
        .unwrap();
        let mut ex = exchange(
            "GET",
            "/v1/pets?limit=1&debug=1",
            &[
                ("x-trace", "a"),
                ("x-extra", "1"),
                ("user-agent", "t"),
                ("cookie", "session=abc; zz=1"),
            ],
            None,
        );
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(
            pointers(&f),
            ["/query/debug", "/cookie/zz", "/header/x-extra"]
        );
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
        let mut ex = exchange(
            "POST",
            "/v1/pets",
            &json,
            Some(r#"{"name": null, "kind": "Cat", "lives": 9}"#),
        );
        run(&p, &mut ex, Direction::Request).unwrap();
        // Sibling file through the discriminator: Dog needs `barks`.
        let mut ex = exchange(
            "POST",
            "/v1/pets",
            &json,
            Some(r#"{"name": "rex", "kind": "Dog"}"#),
        );
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/body"], "{f:?}");
        assert!(f.message.contains("barks"), "{}", f.message);
        // Unknown discriminator value, 3.0 exclusiveMinimum.
        let mut ex = exchange(
            "POST",
            "/v1/pets",
            &json,
            Some(r#"{"name": "x", "kind": "Cow", "age": 0}"#),
        );
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        let ps = pointers(&f);
        assert!(
            ps.contains(&"/body/kind".to_owned()) && ps.contains(&"/body/age".to_owned()),
            "{ps:?}"
        );

        for (ct, body, want) in [
            ("application/json", "{not json", "not valid JSON"),
            (
                "text/plain",
                "hello",
                "content type text/plain is not one of",
            ),
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
        let mut ex = exchange(
            "POST",
            "/v1/pets",
            &json,
            Some(r#"{"name": 1, "kind": 2, "age": "x"}"#),
        );
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
        assert!(resp(
            &enforce,
            201,
            r#"{"id": 1, "name": "a", "kind": "Cat", "lives": 1}"#
        )
        .0
        .is_ok());
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

    fn request_pointers(
        p: &Arc<dyn Policy>,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Vec<String> {
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
        let ok = |uri: &str| {
            assert_eq!(
                request_pointers(&p, uri, &[], None),
                Vec::<String>::new(),
                "{uri}"
            )
        };
        // form + explode (the default): one name, repeated.
        ok("/items?t=a&t=b");
        assert_eq!(
            request_pointers(&p, "/items?t=a&t=c", &[], None),
            ["/query/t/1"]
        );
        // spaceDelimited (encoded as %20 or +) and pipeDelimited.
        ok("/items?s=1%202+3&p=4|5");
        assert_eq!(
            request_pointers(&p, "/items?s=1%20x", &[], None),
            ["/query/s/1"]
        );
        assert_eq!(
            request_pointers(&p, "/items?p=4|y|6", &[], None),
            ["/query/p/1"]
        );
        // deepObject.
        ok("/items?d[min]=1&d[max]=9");
        assert_eq!(
            request_pointers(&p, "/items?d[min]=1&d[max]=11", &[], None),
            ["/query/d/max"]
        );
        // form + explode object: each property is its own query name, and a declared one.
        ok("/items?color=red&size=2");
        assert_eq!(
            request_pointers(&p, "/items?color=green", &[], None),
            ["/query/f/color"]
        );
        assert_eq!(
            request_pointers(&p, "/items?color=red&size=big", &[], None),
            ["/query/f/size"]
        );
        assert_eq!(
            request_pointers(&p, "/items?size=2", &[], None),
            ["/query/f"],
            "color is required"
        );
        assert_eq!(
            request_pointers(&p, "/items?colour=red", &[], None),
            ["/query/colour"]
        );
    }

    #[test]
    fn formats_are_validated() {
        let d = styles();
        let p = policy(d.path(), "").unwrap();
        let uuid = [("x-id", "0b4a4e1e-5f9e-4c5b-9d7a-3f7f0c6f1a2b")];
        assert!(request_pointers(&p, "/items?since=2024-05-01T10:00:00Z", &uuid, None).is_empty());
        assert_eq!(
            request_pointers(
                &p,
                "/items?since=yesterday",
                &[("x-id", "not-a-uuid")],
                None
            ),
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
        let p = policy(
            d.path(),
            "allowUnspecifiedParameters: {query: false, header: false}",
        )
        .unwrap();
        // RFC 6901: `~` is `~0`, `/` is `~1`, in declared and undeclared names alike.
        assert_eq!(
            request_pointers(&p, "/items?a%2Fb~c=x", &[], None),
            ["/query/a~1b~0c"]
        );
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
        write(
            d.path(),
            "parts.json",
            r#"{"Thing": {"type": "object", "required": ["v"], "properties": {"v": {"type": "string", "nullable": true}}}}"#,
        );
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
        assert!(
            e.message.contains("spec.json") && e.message.contains("not valid YAML or JSON"),
            "{e}"
        );
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
        let mut ex = exchange(
            "POST",
            "/t",
            &[("content-type", "application/json")],
            Some(r#"{"kids": [{"kids": [{"kids": 1}]}]}"#),
        );
        let f = run(&p, &mut ex, Direction::Request).unwrap_err();
        assert_eq!(pointers(&f), ["/body/kids/0/kids/0/kids"]);
    }
}
