//! Flow selection through a real Envoy: the same target written differently (host case,
//! port, trailing dot; repeated slashes) cannot dodge the flow that owns it. The test
//! bootstrap leaves Envoy's path normalisation off (`normalize_path`, `merge_slashes`
//! unset), so tollgate sees what the client wrote. Run with `cargo test --test flow_selection`.

mod support;

use std::time::Duration;

use support::{within, TestBed};

const LIMIT: Duration = Duration::from_secs(20);

/// `/v1/chat` on `api.example.com` is governed (here: refused outright); everything else
/// takes the open default flow, which tags what it lets through.
const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: governed}
spec: {type: RaiseFault, status: 403, errorCode: chat.Governed, message: governed}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag-open}
spec: {type: AssignMessage, set: {headers: {x-flow: "{flow.name}"}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  match: {hosts: [api.example.com], pathPrefixes: [/v1/chat]}
  request: [{policy: governed}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: open}
spec:
  default: true
  request: [{policy: tag-open}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_path_variants_select_the_same_flow() {
    within(LIMIT, async {
        let bed = TestBed::start(CONFIG).await;
        for (host, path) in [
            ("api.example.com", "/v1/chat/completions"),
            ("API.Example.COM.:8443", "/v1/chat/completions"),
            ("api.example.com", "//v1//chat/completions"),
            ("Api.Example.Com.", "/v1/./chat//completions?x=//"),
        ] {
            let r = bed.get(path, &[("host", host)]).await;
            assert_eq!(r.status, 403, "{host} {path}: {}", r.text());
            assert_eq!(
                r.json()["fault"]["detail"]["errorcode"],
                "chat.Governed",
                "{host} {path}"
            );
        }
        assert!(
            bed.upstream.seen().is_empty(),
            "a governed request reached the upstream: {:?}",
            bed.upstream.seen()
        );

        // Other hosts and paths take the default flow.
        for (host, path) in [
            ("api.example.org", "/v1/chat/completions"),
            ("api.example.com", "/v2/chat"),
        ] {
            let r = bed.get(path, &[("host", host)]).await;
            assert_eq!(r.status, 200, "{host} {path}: {}", r.text());
            assert_eq!(r.echoed_header("x-flow").as_deref(), Some("open"));
        }
        // Envoy passed the raw path on: tollgate matched on its normalised form.
        let r = bed.get("//v2//x", &[("host", "api.example.com")]).await;
        assert_eq!(r.json()["uri"], "//v2//x", "{}", r.text());
    })
    .await;
}
