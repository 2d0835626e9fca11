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

/// Steps under Apigee conditions, through Envoy and the real pipeline: a POST under
/// `/v1/` is refused, anything else passes; a step whose condition's variable is missing
/// (null) is skipped; the passing step renders template functions.
const APIGEE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: refuse-post}
spec: {type: RaiseFault, status: 403, errorCode: apigee.Refused, message: refused}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set:
    headers:
      x-tag: "{toUpperCase(request.header.x-tier)}-{substring(request.path,1,3)}"
      x-tier-or: "{firstnonnull(request.header.x-other,'none')}"
      x-model: "{jsonPath($.model,request.content)}"
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: apigee}
spec:
  default: true
  request:
    - policy: refuse-post
      apigeeCondition: 'request.verb = "POST" and request.path MatchesPath "/v1/**"'
    - policy: tag
      apigeeCondition: 'request.header.x-tier != null and not (request.header.x-tier := "none")'
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_or_skip_by_apigee_conditions() {
    within(LIMIT, async {
        let bed = TestBed::start(APIGEE).await;
        let r = bed.post("/v1/chat/completions", &[], "{}").await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json()["fault"]["detail"]["errorcode"], "apigee.Refused");
        assert!(
            bed.upstream.seen().is_empty(),
            "a refused POST reached the upstream"
        );

        // Not a POST, or not under /v1/: the refusal is skipped.
        let r = bed.get("/v1/chat/completions", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // No x-tier header: null, so `!=` null is false and the tag step is skipped.
        assert_eq!(r.echoed_header("x-tag"), None);
        let r = bed.post("/v2/chat", &[], "{}").await;
        assert_eq!(r.status, 200, "{}", r.text());
        // A function reading the body makes the step a body step: the body reaches it.
        let r = bed
            .post("/v2/chat", &[("x-tier", "silver")], r#"{"model":"m-1"}"#)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-model").as_deref(), Some("m-1"));
        assert_eq!(r.echoed_header("x-tag").as_deref(), Some("SILVER-v2"));

        let r = bed.get("/v1/models", &[("x-tier", "gold")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echoed_header("x-tag").as_deref(), Some("GOLD-v1"));
        assert_eq!(r.echoed_header("x-tier-or").as_deref(), Some("none"));
        // `:=` is case-insensitive: "NONE" skips the tag step.
        let r = bed.get("/v1/models", &[("x-tier", "NONE")]).await;
        assert_eq!(r.echoed_header("x-tag"), None);
    })
    .await;
}
