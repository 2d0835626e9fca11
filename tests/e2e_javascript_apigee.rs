//! JavaScript in Apigee mode end to end: a real Envoy 1.40 in front of the `tollgate`
//! binary. A request script calls another service through `httpClient`, signs with
//! `crypto` and `properties` and sets headers through `context.setVariable`; a response
//! script rewrites the body and the status, as the public Apigee samples' scripts do.

mod support;

use std::time::Duration;

use support::{within, TestBed, Upstream};

const LIMIT: Duration = Duration::from_secs(30);

fn config(lookup: &str) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: enrich}}
spec:
  type: JavaScript
  mode: apigee
  properties: {{lookup: "{lookup}", salt: "pepper"}}
  source: |
    // Sloppy mode: `profile` is an undeclared global, as Rhino allows.
    var exchange = httpClient.get(properties.lookup + '/echo?user=' + request.headers['x-user']);
    exchange.waitForComplete();
    if (!exchange.isSuccess()) throw new Error('lookup failed: ' + exchange.getError());
    profile = JSON.parse(exchange.getResponse().content);
    context.setVariable('request.header.x-profile-uri', profile.uri);
    var sig = crypto.getSHA256();
    sig.update(properties.salt);
    sig.update(request.path);
    context.setVariable('request.header.x-signature', sig.digest64());
    print('enriched', request.path);
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: reshape}}
spec:
  type: JavaScript
  mode: apigee
  source: |
    var upstream = JSON.parse(response.content);
    response.content = JSON.stringify({{path: upstream.path, method: upstream.method}});
    if (request.headers['x-accepted']) response.status.code = 202;
    context.setVariable('response.header.x-reshaped', 'yes');
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: js}}
spec:
  default: true
  request: [{{policy: enrich}}]
  response: [{{policy: reshape}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apigee_scripts_call_out_sign_and_rewrite() {
    within(LIMIT, async {
        let lookup = Upstream::start();
        let bed = TestBed::start(&config(&format!("http://{}", lookup.addr))).await;

        let r = bed
            .get("/orders/7", &[("x-user", "ada"), ("x-accepted", "1")])
            .await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-reshaped"), Some("yes"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"path": "/orders/7", "method": "GET"})
        );

        // The lookup service got the script's call; the upstream got its headers.
        let calls = lookup.seen_with_prefix("/echo");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].uri, "/echo?user=ada");
        let seen = bed.upstream.seen_with_prefix("/orders/7");
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].headers.get("x-profile-uri").map(String::as_str),
            Some("/echo?user=ada")
        );
        use base64::Engine as _;
        use sha2::Digest;
        let want = base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(b"pepper/orders/7"));
        assert_eq!(
            seen[0].headers.get("x-signature").map(String::as_str),
            Some(want.as_str())
        );

        // Without x-accepted the status stays the upstream's.
        let r = bed.get("/orders/8", &[("x-user", "bob")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-reshaped"), Some("yes"));
    })
    .await;
}
