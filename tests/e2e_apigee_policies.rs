//! Apigee's common request policies through a real Envoy: CORS preflights answered and
//! CORS headers on the upstream's response, AccessControl on the address Envoy gives (and
//! `X-Forwarded-For` as Apigee reads it), JSONThreatProtection before the upstream, and
//! ExtractVariables feeding an AssignMessage. Run with
//! `cargo test --test e2e_apigee_policies`.

mod support;

use std::time::Duration;

use support::{within, TestBed};

const LIMIT: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cors}
spec:
  type: CORS
  allowOrigins: "https://app.example.com, {request.header.x-extra-origin}"
  allowMethods: GET, POST
  exposeHeaders: x-request-id
  allowCredentials: true
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: deny-listed}
spec:
  type: AccessControl
  matchRules:
  - {action: DENY, sourceAddresses: [203.0.113.0/24]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: loopback-only}
spec:
  type: AccessControl
  noRuleMatchAction: DENY
  validateBasedOn: CLIENT_IP
  matchRules:
  - {action: ALLOW, sourceAddresses: [127.0.0.0/8, "::1"]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: no-loopback}
spec:
  type: AccessControl
  validateBasedOn: CLIENT_IP
  matchRules:
  - {action: DENY, sourceAddresses: [127.0.0.0/8]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: json-limits}
spec:
  type: JSONThreatProtection
  containerDepth: 3
  stringValueLength: 10
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: extract}
spec:
  type: ExtractVariables
  variablePrefix: acct
  uriPath: {patterns: ["/api/accounts/{id}"]}
  queryParams: [{name: region, patterns: ["{area}-{zone}"]}]
  jsonPayload:
  - {name: model, jsonPath: "$.model"}
  - {name: max, jsonPath: "$.limits.max", type: integer}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: forward}
spec:
  type: AssignMessage
  set:
    headers:
      x-account-id: "{acct.id}"
      x-model: "{acct.model}"
      x-max: "{acct.max}"
      x-area: "{acct.area}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  match: {pathPrefixes: [/api/]}
  request:
  - policy: cors
  - policy: deny-listed
  - policy: loopback-only
  - policy: json-limits
  - policy: extract
    # A GET has no payload to extract from (Apigee's ExecutionFailed).
    apigeeCondition: request.verb = "POST"
  - policy: forward
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: closed}
spec:
  match: {pathPrefixes: [/closed/]}
  request:
  - policy: no-loopback
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_answered_and_headers_on_the_upstream_response() {
    within(LIMIT, async {
        let bed = TestBed::start(CONFIG).await;
        let r = bed
            .client
            .send(
                "OPTIONS",
                &bed.url("/api/accounts/1"),
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", "content-type"),
                ],
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert_eq!(r.header("access-control-max-age"), Some("1800"));
        assert!(
            bed.upstream.seen().iter().all(|s| s.method != "OPTIONS"),
            "the preflight reached the upstream"
        );

        // An actual request: the upstream's answer carries the CORS headers.
        let r = bed
            .get("/api/accounts/1", &[("origin", "https://app.example.com")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(
            r.header("access-control-expose-headers"),
            Some("x-request-id")
        );
        assert_eq!(r.header("vary"), Some("Origin"));

        // An origin a template allows; one nothing allows gets no CORS headers.
        let r = bed
            .get(
                "/api/accounts/1",
                &[
                    ("origin", "https://other.example"),
                    ("x-extra-origin", "https://other.example"),
                ],
            )
            .await;
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://other.example")
        );
        let r = bed
            .get("/api/accounts/1", &[("origin", "https://evil.example")])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_on_the_address_envoy_gives() {
    within(LIMIT, async {
        let bed = TestBed::start(CONFIG).await;
        // From loopback: allowed by the allow-list (CLIENT_IP: Envoy's peer address).
        let r = bed.get("/api/accounts/1", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // A listed address anywhere in X-Forwarded-For: denied, as Apigee's default.
        let r = bed
            .get("/api/accounts/1", &[("x-forwarded-for", "203.0.113.9")])
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "accesscontrol.IPDeniedAccess"
        );
        assert_eq!(
            r.json()["fault"]["faultstring"],
            "Access Denied for client ip : 203.0.113.9"
        );
        // CLIENT_IP allow-list: what the client writes in X-Forwarded-For changes nothing.
        // (Envoy appends its own host address, not 127.0.0.1, for a loopback peer, so the
        // header's entries are not the peer here.)
        let r = bed
            .get("/api/accounts/1", &[("x-forwarded-for", "198.51.100.1")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // CLIENT_IP: Envoy's peer address decides, whatever the header claims.
        let r = bed
            .get("/closed/x", &[("x-forwarded-for", "198.51.100.1")])
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["faultstring"],
            "Access Denied for client ip : 127.0.0.1"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threat_protection_and_extracted_variables() {
    within(LIMIT, async {
        let bed = TestBed::start(CONFIG).await;
        let ct = [("content-type", "application/json")];
        let r = bed
            .post(
                "/api/accounts/42?region=eu-west",
                &ct,
                r#"{"model":"gpt-4o","limits":{"max":64}}"#,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-account-id").as_deref(), Some("42"));
        assert_eq!(r.echoed_header("x-model").as_deref(), Some("gpt-4o"));
        assert_eq!(r.echoed_header("x-max").as_deref(), Some("64"));
        assert_eq!(r.echoed_header("x-area").as_deref(), Some("eu"));

        let before = bed.upstream.seen().len();
        for body in [
            r#"{"a":{"b":{"c":{}}}}"#,
            r#"{"model":"a-very-long-model-name"}"#,
            r#"{"model":"#,
        ] {
            let r = bed.post("/api/accounts/42", &ct, body).await;
            assert_eq!(r.status, 500, "{body}: {}", r.text());
            assert_eq!(
                r.json()["fault"]["detail"]["errorcode"],
                "steps.jsonthreatprotection.ExecutionFailed",
                "{body}"
            );
        }
        assert_eq!(
            bed.upstream.seen().len(),
            before,
            "a refused body went upstream"
        );

        // A cast ExtractVariables cannot make: Apigee's UnableToCast.
        let r = bed
            .post("/api/accounts/42", &ct, r#"{"limits":{"max":"lots"}}"#)
            .await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(
            r.json()["fault"]["detail"]["errorcode"],
            "steps.extractvariables.UnableToCast"
        );
    })
    .await;
}

const SIGNING: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: mint}
spec:
  type: GenerateJWT
  algorithm: RS256
  privateKey: {file: signing.pem, id: "key-{request.header.x-key-version}"}
  issuer: urn://tollgate
  subject: "{request.header.x-user}"
  audience: backend
  expiresIn: 5m
  id: ""
  additionalClaims: {scope: read}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: send}
spec:
  type: AssignMessage
  set:
    headers:
      authorization: "Bearer {jwt.mint.generated_jwt}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: mint
  - policy: send
"#;

/// A token signed at the gateway reaches the upstream and verifies with the public key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_jwt_reaches_the_upstream_and_verifies() {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let private = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string();
    let public = key
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    within(LIMIT, async {
        let mut opts = support::BedOptions::new(SIGNING);
        opts.files.push(("signing.pem".to_owned(), private));
        let bed = TestBed::start_with(opts).await;
        let r = bed
            .get(
                "/echo",
                &[
                    ("x-user", "alice"),
                    ("x-key-version", "7"),
                    ("authorization", "Bearer forged"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let auth = r.echoed_header("authorization").expect("a token upstream");
        let token = auth.strip_prefix("Bearer ").expect("a bearer token");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.set_audience(&["backend"]);
        v.set_issuer(&["urn://tollgate"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
            &v,
        )
        .expect("the upstream can verify the token");
        assert_eq!(data.header.kid.as_deref(), Some("key-7"));
        assert_eq!(data.claims["sub"], "alice");
        assert_eq!(data.claims["scope"], "read");
        let (iat, exp) = (
            data.claims["iat"].as_i64().unwrap(),
            data.claims["exp"].as_i64().unwrap(),
        );
        assert_eq!(exp - iat, 300);
    })
    .await;
}
