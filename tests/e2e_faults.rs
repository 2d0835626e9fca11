//! Fault rules through a real Envoy 1.40 and the `tollgate` binary: a failed VerifyApiKey,
//! a product mismatch and a Quota violation answered in the shapes `policies/fault-rules.yaml`
//! defines (AssignMessage and RaiseFault in fault rules, the default rule with
//! `alwaysEnforce`), with the variables Apigee users reference rendered into what the client
//! and the upstream see. A second flow adds a response-side fault handled by a CEL rule with
//! a JavaScript step, a fault rule that itself fails (the client gets the original fault),
//! form parameters and header values. Run with `cargo test --test e2e_faults`.

mod support;

use std::time::Duration;

use support::{within, BedOptions, Reply, TestBed};

const LIMIT: Duration = Duration::from_secs(60);
const KEY: &str = "tg_faults_demo_key_0001";

/// A flow whose upstream answer is refused on the response (a RaiseFault on a header the
/// upstream echoes back), handled by a CEL fault rule whose JavaScript step reads the fault
/// variables; requests with `x-break: yes` pick a rule whose step fails.
const EXTRA: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: x-form}
spec:
  type: AssignMessage
  set:
    headers:
      x-form-name: "{request.formparam.name}"
      x-accept-count: "{request.header.accept.values.count}"
      x-accept-values: "{request.header.accept.values}"
      x-base: "{proxy.basepath}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: x-refuse-echo}
spec:
  type: RaiseFault
  status: 500
  errorCode: x.UpstreamRefused
  message: the upstream answered {response.status.code}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: x-js-fault}
spec:
  type: JavaScript
  source: |
    response.setHeader('x-js-fault', context.getVariable('fault.name') + ' ' +
      context.getVariable('error.status.code') + ' ' + context.getVariable('x-refuse-echo.failed') +
      ' ' + context.getVariable('raisefault.x-refuse-echo.failed'));
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: x-bad-gateway}
spec:
  type: AssignMessage
  set:
    statusCode: "{firstnonnull(request.header.x-status,'502')}"
    headers: {x-handled-by: "{fault.policy}"}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: x-broken}
spec:
  type: AssignMessage
  set:
    statusCode: "{request.header.x-break}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: extra}
spec:
  match: {pathPrefixes: [/extra/]}
  basePath: /extra
  request:
  - policy: x-form
  response:
  - policy: x-refuse-echo
    condition: "request.header['x-refuse'] == 'yes'"
  faultRules:
  - name: upstream
    condition: "fault.code == 'x.UpstreamRefused'"
    steps:
    - policy: x-js-fault
    - policy: x-bad-gateway
  - name: broken
    condition: "request.header['x-break'] == 'yes'"
    steps:
    - policy: x-broken
"#;

async fn bed() -> TestBed {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/fault-rules.yaml"),
    )
    .expect("example");
    let mut opts = BedOptions::new(&example);
    opts.files.push(("extra.yaml".to_owned(), EXTRA.to_owned()));
    TestBed::start_with(opts).await
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        })
}

fn fault_code(r: &Reply) -> Option<&str> {
    r.header("x-fault-code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rules_shape_the_answers() {
    within(LIMIT, async {
        let bed = bed().await;

        // No key: the bad-key rule's body, status kept; the default rule (alwaysEnforce)
        // adds its headers after it.
        let r = bed.get("/shop/orders", &[]).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"ApiKey header="x-api-key""#)
        );
        assert_eq!(
            r.json(),
            serde_json::json!({"error": {"code": "FailedToResolveAPIKey",
                "message": "Send a valid key in x-api-key", "path": "/orders"}})
        );
        assert_eq!(fault_code(&r), Some("oauth.v2.FailedToResolveAPIKey"));
        let id = r.header("x-message-id").expect("messageid").to_owned();
        assert!(is_uuid(&id), "{id}");

        // A wrong key: the same rule (its condition names both faults).
        let r = bed.get("/shop/orders", &[("x-api-key", "nope")]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["code"], "InvalidApiKey");
        let other = r.header("x-message-id").unwrap_or_default();
        assert!(
            is_uuid(other) && other != id,
            "one id per exchange: {other} {id}"
        );

        // Through: the upstream sees the variables rendered.
        let r = bed.get("/shop/orders", &[("x-api-key", KEY)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("x-shop-developer").as_deref(),
            Some("buyer@shop.example")
        );
        assert_eq!(r.echoed_header("x-shop-used").as_deref(), Some("1"));
        assert_eq!(r.echoed_header("x-shop-suffix").as_deref(), Some("/orders"));
        assert!(is_uuid(
            &r.echoed_header("x-shop-message-id").unwrap_or_default()
        ));

        // A method the product does not allow: 401 turned into 403 with its own body.
        let r = bed
            .client
            .send(
                "DELETE",
                &bed.url("/shop/orders"),
                &[("x-api-key", KEY)],
                "",
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(
            r.json()["error"]["message"],
            "Your key does not allow DELETE /orders"
        );
        assert_eq!(
            fault_code(&r),
            Some("oauth.v2.InvalidApiKeyForGivenResource")
        );

        let r = bed.get("/shop/orders", &[("x-api-key", KEY)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echoed_header("x-shop-used").as_deref(), Some("2"));

        // Over quota: the RaiseFault's answer, and no default rule after a RaiseFault.
        let r = bed.get("/shop/orders", &[("x-api-key", KEY)]).await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("retry-after"), Some("60"));
        let b = r.json();
        assert_eq!(b["error"], "slow down", "{b}");
        assert_eq!(b["allowed"], 2, "{b}");
        assert!(b["used"].as_i64().is_some_and(|u| u >= 2), "{b}");
        assert_eq!(b["developer"], "buyer@shop.example");
        assert_eq!(fault_code(&r), None, "a RaiseFault ran: no default rule");

        // A fault no rule names: the default rule alone, on the flow's own format.
        let r = bed.get("/shop/orders", &[("x-closed", "yes")]).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["fault"]["detail"]["errorcode"], "shop.Closed");
        assert_eq!(fault_code(&r), Some("shop.Closed"));
        assert!(is_uuid(r.header("x-message-id").unwrap_or_default()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_faults_scripts_and_failing_rules() {
    within(LIMIT, async {
        let bed = bed().await;

        // Form fields and header values reach a request step that holds the body.
        let r = bed
            .client
            .send(
                "POST",
                &bed.url("/extra/form"),
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "text/plain, application/json"),
                    ("accept", "*/*"),
                ],
                "name=J%C3%BCrgen+B&x=1",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-form-name").as_deref(), Some("Jürgen B"));
        assert_eq!(r.echoed_header("x-accept-count").as_deref(), Some("3"));
        assert_eq!(
            r.echoed_header("x-accept-values").as_deref(),
            Some("[text/plain, application/json, */*]")
        );
        assert_eq!(r.echoed_header("x-base").as_deref(), Some("/extra"));

        // A response step's fault: the CEL rule runs a script reading the fault's
        // variables, then sets the status from a template.
        let r = bed.get("/extra/x", &[("x-refuse", "yes")]).await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(
            r.header("x-js-fault"),
            Some("UpstreamRefused 500 true true")
        );
        assert_eq!(r.header("x-handled-by"), Some("x-refuse-echo"));
        assert_eq!(
            r.json()["fault"]["faultstring"],
            "the upstream answered 200"
        );
        let r = bed
            .get("/extra/x", &[("x-refuse", "yes"), ("x-status", "504")])
            .await;
        assert_eq!(r.status, 504);

        // A rule whose step fails (a status that is no status): the original fault.
        let r = bed
            .get("/extra/x", &[("x-refuse", "yes"), ("x-break", "yes")])
            .await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "x.UpstreamRefused"
        );
        assert_eq!(r.header("x-js-fault"), None);
    })
    .await;
}
