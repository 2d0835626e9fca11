//! End to end through a real Envoy 1.40 and the `tollgate` binary: a VerifyJwt flow whose
//! keys come from a local JWKS server, feeding a ServiceCallout to a local authorization
//! service and a JavaScript step. Run with `cargo test --test e2e_jwt_callout`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::IntoResponse;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::json;
use support::{within, TestBed};

const LIMIT: Duration = Duration::from_secs(30);

struct Services {
    jwks: serde_json::Value,
    jwks_hits: AtomicUsize,
    authz_hits: AtomicUsize,
}

async fn jwks(State(s): State<Arc<Services>>) -> impl IntoResponse {
    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
    (
        [
            ("content-type", "application/json"),
            ("cache-control", "max-age=600"),
        ],
        s.jwks.to_string(),
    )
}

async fn authz(State(s): State<Arc<Services>>, RawQuery(q): RawQuery) -> impl IntoResponse {
    s.authz_hits.fetch_add(1, Ordering::SeqCst);
    let q = q.unwrap_or_default();
    let allowed = q.contains("sub=user-1");
    (
        [("content-type", "application/json")],
        json!({"allowed": allowed, "plan": "enterprise"}).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_callout_and_script_through_envoy() {
    within(LIMIT, async {
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let enc = EncodingKey::from_rsa_pem(
            key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let jwk = json!({"kty": "RSA", "kid": "e2e", "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be())});
        let state = Arc::new(Services {
            jwks: json!({"keys": [jwk]}),
            jwks_hits: AtomicUsize::new(0),
            authz_hits: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/jwks", axum::routing::get(jwks))
            .route("/authz", axum::routing::get(authz))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });

        let config = format!(
            r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: auth}}
spec:
  type: VerifyJwt
  algorithms: [RS256]
  jwks: {{url: "http://{addr}/jwks"}}
  issuer: https://issuer.e2e
  audience: e2e
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: check}}
spec:
  type: ServiceCallout
  request: {{url: "http://{addr}/authz?sub={{jwt.auth.claim.sub}}"}}
  timeoutMs: 1000
  response: {{json: {{allowed: "$.allowed", plan: "$.plan"}}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: deny}}
spec: {{type: RaiseFault, status: 403, errorCode: authz.Denied, message: denied}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: stamp}}
spec:
  type: JavaScript
  source: |
    request.setHeader('x-user', context.getVariable('jwt.auth.claim.sub'));
    request.setHeader('x-plan', context.getVariable('servicecallout.check.json.plan'));
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: api}}
spec:
  default: true
  request:
  - policy: auth
  - policy: check
  - policy: deny
    condition: "servicecallout.check.json.allowed == false"
  - policy: stamp
"#
        );
        let bed = TestBed::start(&config).await;
        let token = |sub: &str, exp_offset: i64| {
            let now = jsonwebtoken::get_current_timestamp() as i64;
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("e2e".into());
            encode(
                &h,
                &json!({"iss": "https://issuer.e2e", "aud": "e2e", "sub": sub, "exp": now + exp_offset}),
                &enc,
            )
            .unwrap()
        };

        let good = format!("Bearer {}", token("user-1", 300));
        for _ in 0..3 {
            let r = bed.get("/echo", &[("authorization", good.as_str())]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echoed_header("x-user").as_deref(), Some("user-1"));
            assert_eq!(r.echoed_header("x-plan").as_deref(), Some("enterprise"));
        }
        assert_eq!(state.jwks_hits.load(Ordering::SeqCst), 1, "JWKS cached");
        assert_eq!(state.authz_hits.load(Ordering::SeqCst), 3);

        let r = bed.get("/echo", &[]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"tollgate\""));
        assert_eq!(r.json()["fault"]["detail"]["errorcode"], "steps.jwt.FailedToResolveVariable");

        let expired = format!("Bearer {}", token("user-1", -600));
        let r = bed.get("/echo", &[("authorization", expired.as_str())]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["fault"]["detail"]["errorcode"], "steps.jwt.TokenExpired");
        assert!(r.header("www-authenticate").unwrap().contains("invalid_token"));

        let other = format!("Bearer {}", token("user-2", 300));
        let r = bed.get("/echo", &[("authorization", other.as_str())]).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json()["fault"]["detail"]["errorcode"], "authz.Denied");
        assert_eq!(
            bed.upstream.seen_with_prefix("/echo").len(),
            3,
            "refused requests never reach the upstream"
        );
    })
    .await;
}
