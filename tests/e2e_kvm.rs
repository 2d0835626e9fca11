//! KeyValueMap through a real Envoy: a put whose value reads `{request.content}` gets the
//! body without an earlier step asking for it (the step itself makes tollgate ask Envoy for
//! the body), and a composite key with a missing part is refused, not written to a shared
//! entry. Run with `cargo test --test e2e_kvm`.

mod support;

use std::time::Duration;

use support::{within, TestBed};

const LIMIT: Duration = Duration::from_secs(20);

const KVM: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: remember}
spec:
  type: KeyValueMap
  map: prompts
  put:
  - key: ["{request.header.x-tenant}", last]
    value: "{request.content}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: recall}
spec:
  type: KeyValueMap
  map: prompts
  expirySeconds: 0
  get:
  - key: ["{request.header.x-tenant}", last]
    variable: tenant.last
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set: {headers: {x-last: "{tenant.last}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request:
  - policy: remember
  - policy: recall
  - policy: tag
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_reading_the_body_gets_it_and_a_missing_key_part_is_refused() {
    within(LIMIT, async {
        // The default filter sends headers only: the body comes because the step asks.
        let bed = TestBed::start(KVM).await;
        let r = bed
            .post(
                "/echo",
                &[("x-tenant", "acme"), ("content-type", "text/plain")],
                "hello kvm",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-last").as_deref(), Some("hello kvm"));
        assert_eq!(
            r.json()["body"],
            "hello kvm",
            "the body still reaches the upstream"
        );
        // No tenant: no `__last` entry shared by every tenant-less request.
        let r = bed
            .post("/echo", &[("content-type", "text/plain")], "anyone")
            .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("InvalidKey"), "{}", r.text());
    })
    .await;
}
