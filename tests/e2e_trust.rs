//! What a client cannot forge, through a real Envoy: a header a step sets for the upstream
//! never carries the client's value, whether the step runs, fails, is skipped or cannot
//! render a value; the client address quotas and conditions use cannot be changed with
//! `X-Forwarded-For`; a product's model list is checked against the model the request
//! carries, not a header. Run with `cargo test --test e2e_trust`.

mod support;

use std::time::Duration;

use support::{within, BedOptions, TestBed};

const LIMIT: Duration = Duration::from_secs(20);

/// The key `tg_demo_key_rotate_me_0001` (hash as in policies/api-keys.yaml).
const KEY: &str = "tg_demo_key_rotate_me_0001";

const OWNED: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: all}
spec:
  operations: [{path: "/**"}]
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {name: demo-app}
spec:
  developerEmail: demo@example.com
  products: [all]
  keys:
  - id: demo
    hash: "sha256:ab5e9264f492ebbe5db57367b2f55fb10b0eb516f4b939831d03a79aee7d679b"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: verify-key}
spec:
  type: VerifyApiKey
  identityHeaders: {app: x-tollgate-app, clientId: x-tollgate-client-id}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set:
    headers:
      x-tollgate-tier: "gold"
      x-tollgate-copy: "{request.header.x-source}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: seen}
spec:
  type: AssignMessage
  set:
    headers:
      x-seen-app: "before:{request.header.x-tollgate-app}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: seen
  - policy: verify-key
    condition: "request.headers['x-use-key'] == 'yes'"
  - policy: tag
    condition: "request.headers['x-tag'] == 'yes'"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_values_of_owned_headers_never_reach_the_upstream() {
    within(LIMIT, async {
        let bed = TestBed::start(OWNED).await;
        let spoofed = [
            ("x-tollgate-app", "admin-app"),
            ("x-tollgate-client-id", "admin"),
            ("x-tollgate-tier", "platinum"),
            ("x-tollgate-copy", "spoofed"),
        ];

        // Both setting steps skipped (conditions false): the client's values are gone.
        let r = bed.get("/echo", &spoofed).await;
        assert_eq!(r.status, 200, "{}", r.text());
        for (h, _) in spoofed {
            assert_eq!(
                r.echoed_header(h),
                None,
                "{h} reached the upstream: {}",
                r.text()
            );
        }
        // A step before the setter does not see the client's value either.
        assert_eq!(r.echoed_header("x-seen-app").as_deref(), Some("before:"));

        // The steps run: the upstream sees their values only.
        let mut headers = spoofed.to_vec();
        headers.extend([
            ("x-use-key", "yes"),
            ("x-tag", "yes"),
            ("x-api-key", KEY),
            ("x-source", "ok"),
        ]);
        let r = bed.get("/echo", &headers).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("x-tollgate-app").as_deref(),
            Some("demo-app")
        );
        assert_eq!(
            r.echoed_header("x-tollgate-client-id").as_deref(),
            Some("demo")
        );
        assert_eq!(r.echoed_header("x-tollgate-tier").as_deref(), Some("gold"));
        assert_eq!(r.echoed_header("x-tollgate-copy").as_deref(), Some("ok"));
    })
    .await;
}

const RENDER: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: copy}
spec:
  type: AssignMessage
  set:
    headers:
      x-tollgate-copy: "{request.query.v}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: copy
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_cannot_be_a_header_removes_it() {
    within(LIMIT, async {
        let bed = TestBed::start(RENDER).await;
        let r = bed
            .get("/echo?v=a%0D%0Ab", &[("x-tollgate-copy", "spoofed")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-tollgate-copy"), None, "{}", r.text());
        let r = bed
            .get("/echo?v=fine", &[("x-tollgate-copy", "spoofed")])
            .await;
        assert_eq!(r.echoed_header("x-tollgate-copy").as_deref(), Some("fine"));
    })
    .await;
}

const JWT_THEN_TOKEN: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: jwt}
spec:
  type: VerifyJwt
  algorithms: [HS256]
  keys: {secret: 0123456789abcdef0123456789abcdef}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: upstream-auth}
spec:
  type: AssignMessage
  set:
    headers:
      authorization: "Bearer upstream-{jwt.jwt.claim.sub}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: jwt
  - policy: upstream-auth
"#;

/// `Authorization` is the flow's to set for the upstream, yet VerifyJwt before the setter
/// still reads the client's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_reader_still_sees_the_clients_owned_header() {
    within(LIMIT, async {
        let bed = TestBed::start(JWT_THEN_TOKEN).await;
        let token = hs256(
            "0123456789abcdef0123456789abcdef",
            r#"{"sub":"alice","exp":4102444800}"#,
        );
        let r = bed
            .get("/echo", &[("authorization", &format!("Bearer {token}"))])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("authorization").as_deref(),
            Some("Bearer upstream-alice")
        );
        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.status, 401, "{}", r.text());
    })
    .await;
}

fn hs256(secret: &str, claims: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::from_str::<serde_json::Value>(claims).unwrap(),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

const PER_CLIENT: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: per-client}
spec:
  type: Quota
  allow: 1
  interval: 1
  timeUnit: hour
  identifier: "{client.ip}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: who}
spec:
  type: AssignMessage
  set: {headers: {x-client-ip: "{client.ip}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: who
  - policy: per-client
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_does_not_change_the_client_address() {
    within(LIMIT, async {
        let bed = TestBed::start(PER_CLIENT).await;
        let r = bed
            .get("/echo", &[("x-forwarded-for", "203.0.113.1")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-client-ip").as_deref(), Some("127.0.0.1"));
        // Another forwarded address is the same client: its quota is spent.
        let r = bed
            .get("/echo", &[("x-forwarded-for", "203.0.113.2")])
            .await;
        assert_eq!(r.status, 429, "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_with_trusted_hops() {
    within(LIMIT, async {
        let mut opts = BedOptions::new(PER_CLIENT);
        opts.tollgate_args
            .extend(["--xff-trusted-hops".to_owned(), "2".to_owned()]);
        let bed = TestBed::start_with(opts).await;
        // Two trusted hops: a load balancer in front (it appended 203.0.113.1, the address
        // it saw) and Envoy itself (`use_remote_address` appends its peer). The client
        // wrote the entries left of them.
        let r = bed
            .get("/echo", &[("x-forwarded-for", "6.6.6.6, 203.0.113.1")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echoed_header("x-client-ip").as_deref(),
            Some("203.0.113.1"),
            "{}",
            r.text()
        );
        let r = bed
            .get("/echo", &[("x-forwarded-for", "6.6.6.7, 203.0.113.1")])
            .await;
        assert_eq!(
            r.status,
            429,
            "a spoofed left entry is a new client: {}",
            r.text()
        );
        let r = bed
            .get("/echo", &[("x-forwarded-for", "6.6.6.6, 203.0.113.2")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    })
    .await;
}

const MODELS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: gated}
spec:
  operations:
  - {path: /v1/chat/completions, models: [gpt-4o]}
  - {path: /v1/responses, models: [gpt-4o]}
  - {path: "/v1beta/models/{model}:generateContent", models: [gemini-2.0-flash]}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {name: demo-app}
spec:
  developerEmail: demo@example.com
  products: [gated]
  keys:
  - id: demo
    hash: "sha256:ab5e9264f492ebbe5db57367b2f55fb10b0eb516f4b939831d03a79aee7d679b"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: verify-key}
spec:
  type: VerifyApiKey
  model: "{request.header.x-model}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: verify-key-body}
spec:
  type: VerifyApiKey
  model: "{request.header.x-model}"
  modelFromBody: true
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: body}
spec:
  match: {pathPrefixes: [/v1/chat/completions]}
  request:
  - policy: verify-key-body
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: verify-key
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_cannot_stand_in_for_the_model_the_request_carries() {
    within(LIMIT, async {
        let bed = TestBed::start(MODELS).await;
        let json = [("x-api-key", KEY), ("content-type", "application/json")];
        let with_header = |m: &'static str| {
            let mut h = json.to_vec();
            h.push(("x-model", m));
            h
        };
        // OpenAI-style: the body decides, the header is checked too.
        let chat = "/v1/chat/completions";
        let r = bed
            .post(chat, &with_header("gpt-4o"), r#"{"model":"gpt-4o"}"#)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = bed
            .post(chat, &with_header("gpt-4o"), r#"{"model":"o3-pro"}"#)
            .await;
        assert_eq!(
            r.status,
            401,
            "the header stood in for the body: {}",
            r.text()
        );
        let r = bed.post(chat, &json, r#"{"model":"o3-pro"}"#).await;
        assert_eq!(r.status, 401, "{}", r.text());
        // A step on the headers, with a body still to come: the header decides nothing.
        let r = bed
            .post(
                "/v1/responses",
                &with_header("gpt-4o"),
                r#"{"model":"o3-pro"}"#,
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.text().contains("model is unknown"), "{}", r.text());
        // Without a body, the header is all the request names.
        let r = bed.get("/v1/responses", &with_header("gpt-4o")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = bed.get("/v1/responses", &with_header("o3-pro")).await;
        assert_eq!(r.status, 401, "{}", r.text());
        // Gemini-style: the path names the model.
        let gemini = |m: &str| format!("/v1beta/models/{m}:generateContent");
        let r = bed.post(&gemini("gemini-2.0-flash"), &json, "{}").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = bed
            .post(
                &gemini("gemini-2.5-pro"),
                &with_header("gemini-2.0-flash"),
                "{}",
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text());
    })
    .await;
}
