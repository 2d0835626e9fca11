//! Body handling in every ext_proc body mode, through a real Envoy 1.40: a body step that
//! replaces the body works for requests carrying `content-length` (and for responses), a body
//! step that refuses a request lets no request byte reach the upstream, a flow that needs a
//! body Envoy will not send is refused before the request is forwarded, and an over-large
//! message fails closed. Run with `cargo test --test e2e_body_modes`.

mod support;

use std::time::Duration;

use support::{within, BedOptions, EnvoyOptions, Mode, RouteSpec, TestBed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: new-request-body}
spec:
  type: AssignMessage
  set:
    headers: {x-body-was: "{request.content}"}
    body: '{"replaced":"request body","longer":"than the original"}'
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: new-response-body}
spec:
  type: AssignMessage
  set:
    body: '{"replaced":"response"}'
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: gate}
spec:
  type: JavaScript
  source: |
    if (request.content.indexOf('deny') >= 0) throw {status: 403, code: 'custom.Denied', message: 'denied by body'};
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: rewrite}
spec:
  match: {pathPrefixes: [/rewrite]}
  request: [{policy: new-request-body}]
  response: [{policy: new-response-body}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: json-limits}
spec: {type: JSONThreatProtection, containerDepth: 3}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: extract}
spec:
  type: ExtractVariables
  variablePrefix: ev
  jsonPayload: [{name: model, jsonPath: "$.model"}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: model-header}
spec:
  type: AssignMessage
  set: {headers: {x-model: "{ev.model}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: threat}
spec:
  match: {pathPrefixes: [/threat]}
  maxBodyBytes: 4096
  request: [{policy: json-limits}, {policy: extract}, {policy: model-header}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: gate}
spec:
  match: {pathPrefixes: [/gate]}
  maxBodyBytes: 1048576
  request: [{policy: gate}]
"#;

/// The body modes under test, by the path segment that selects them.
const MODES: &[(&str, &str)] = &[
    ("buffered", "BUFFERED"),
    ("partial", "BUFFERED_PARTIAL"),
    ("streamed", "STREAMED"),
    ("duplex", "FULL_DUPLEX_STREAMED"),
    ("none", "NONE"),
];

/// Filter-level mode with trailers SEND (FULL_DUPLEX_STREAMED needs it at filter level), and
/// a route per flow and body mode: `/<flow>/<mode>` sends both bodies in that mode.
fn envoy() -> EnvoyOptions {
    let mut routes = Vec::new();
    for flow in ["rewrite", "gate", "threat"] {
        for (seg, mode) in MODES {
            let m = Mode::bodies(mode);
            routes.push(
                RouteSpec::new(&format!("/{flow}/{seg}"))
                    .timeout("0s")
                    .mode(m),
            );
        }
    }
    // A route whose response is FULL_DUPLEX_STREAMED and whose request body is not sent:
    // Envoy ignores mode overrides there.
    routes.push(
        RouteSpec::new("/gate/fdresp")
            .timeout("0s")
            .mode(Mode::duplex_response()),
    );
    routes.push(RouteSpec::new("/"));
    EnvoyOptions {
        mode: Mode {
            request_trailer_mode: Some("SEND"),
            response_trailer_mode: Some("SEND"),
            ..Mode::headers_only()
        },
        routes,
        ..EnvoyOptions::default()
    }
}

async fn bed(extra: &[&str]) -> TestBed {
    bed_with(CONFIG, extra).await
}

async fn bed_with(config: &str, extra: &[&str]) -> TestBed {
    let mut opts = BedOptions::new(config);
    opts.envoy = envoy();
    opts.tollgate_args
        .extend(extra.iter().map(|s| (*s).to_owned()));
    TestBed::start_with(opts).await
}

/// A raw HTTP/1.1 request: `head` (without the blank line), then each body chunk with a
/// pause before it; reads the whole answer (the request says `connection: close`). Returns
/// the status and the answer's body (de-chunked when chunked).
async fn raw_request(
    addr: std::net::SocketAddr,
    head: &str,
    chunks: &[&[u8]],
    pause: Duration,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("{head}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    for c in chunks {
        tokio::time::sleep(pause).await;
        // The peer may have answered and closed already (a refusal).
        if s.write_all(c).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

const NEW_REQUEST_BODY: &str = r#"{"replaced":"request body","longer":"than the original"}"#;
const NEW_RESPONSE_BODY: &str = r#"{"replaced":"response"}"#;

/// Issue 20 defect 1: replacing a body works for a request with `content-length`, in every
/// body mode, and the response body is replaced too; the upstream and the client get the new
/// bodies exactly, with a `content-length` (when there is one) that matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_replacement_with_content_length_in_every_mode() {
    within(LIMIT, async {
        let bed = bed(&[]).await;
        for (seg, _) in MODES {
            let path = format!("/rewrite/{seg}");
            let r = bed
                .client
                .send(
                    "POST",
                    &bed.url(&path),
                    &[("content-type", "application/json")],
                    "original body",
                )
                .await;
            assert_eq!(r.status, 200, "{seg}: {:?}\n{}", r.text(), bed.envoy.log());
            assert_eq!(r.text(), NEW_RESPONSE_BODY, "{seg}: response body");
            if let Some(cl) = r.header("content-length") {
                assert_eq!(cl, NEW_RESPONSE_BODY.len().to_string(), "{seg}");
            }
            let seen = bed.upstream.seen_with_prefix(&path);
            assert_eq!(seen.len(), 1, "{seg}");
            assert_eq!(
                String::from_utf8_lossy(&seen[0].body_bytes()),
                NEW_REQUEST_BODY,
                "{seg}: the upstream got the new body"
            );
            // A header set by a body step reaches the upstream only where Envoy still
            // holds the headers when the body is decided (BUFFERED, also by override), or
            // where tollgate holds its headers answer for the body (FULL_DUPLEX_STREAMED).
            let held = matches!(*seg, "buffered" | "partial" | "none" | "duplex");
            assert_eq!(
                seen[0].headers.get("x-body-was").map(String::as_str),
                held.then_some("original body"),
                "{seg}"
            );
            if let Some(cl) = seen[0].headers.get("content-length") {
                assert_eq!(cl, &NEW_REQUEST_BODY.len().to_string(), "{seg}");
            }
        }
    })
    .await;
}

/// Issue 12 point 2: a body step that refuses the request lets no body byte reach the
/// upstream, in every body mode, even when the body comes in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_never_reaches_the_upstream_in_any_mode() {
    within(LIMIT, async {
        let bed = bed(&[]).await;
        for (seg, _) in MODES {
            let path = format!("/gate/{seg}");
            let pieces: [&[u8]; 3] = [b"first piece, ", b"second piece, ", b"deny"];
            let len: usize = pieces.iter().map(|p| p.len()).sum();
            let (status, body) = raw_request(
                bed.envoy.listen,
                &format!("POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len}"),
                &pieces,
                Duration::from_millis(60),
            )
            .await;
            assert_eq!(status, 403, "{seg}: {body}");
            assert!(body.contains("custom.Denied"), "{seg}: {body}");
            // Give the upstream a moment: bytes already on their way would arrive now.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for s in bed.upstream.seen_with_prefix(&path) {
                assert!(
                    s.body_bytes().is_empty(),
                    "{seg}: the upstream got body bytes {:?}",
                    String::from_utf8_lossy(&s.body_bytes())
                );
            }
            // And an allowed body in pieces arrives whole.
            let pieces: [&[u8]; 3] = [b"first piece, ", b"second piece, ", b"fine"];
            let (status, body) = raw_request(
                bed.envoy.listen,
                &format!("POST {path}/ok HTTP/1.1\r\nhost: t\r\ncontent-length: 31"),
                &pieces,
                Duration::from_millis(60),
            )
            .await;
            assert_eq!(status, 200, "{seg}: {body}");
            let seen = bed.upstream.seen_with_prefix(&format!("{path}/ok"));
            assert_eq!(seen.len(), 1, "{seg}");
            assert_eq!(
                seen[0].body_bytes(),
                b"first piece, second piece, fine",
                "{seg}"
            );
        }
    })
    .await;
}

/// Issue 12 point 1: a buffered body past `--max-message-bytes` fails closed: the client
/// gets a 5xx and the upstream never sees the request (an OK end let Envoy forward it with
/// no body step run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_max_message_bytes_is_refused_not_forwarded() {
    within(LIMIT, async {
        // Flows whose maxBodyBytes fit one message (the load-time check refuses others), so
        // the message limit itself is what the over-large body meets: Envoy's BUFFERED
        // route sends the whole body in one message, whatever the flow's limit.
        let config = CONFIG
            .replace("maxBodyBytes: 1048576", "maxBodyBytes: 4000")
            .replace(
                "match: {pathPrefixes: [/rewrite]}",
                "match: {pathPrefixes: [/rewrite]}\n  maxBodyBytes: 4000",
            );
        let bed = bed_with(&config, &["--max-message-bytes", "70000"]).await;
        let body = "x".repeat(100_000);
        let r = bed.post("/gate/buffered/big", &[], body).await;
        assert!(
            r.status >= 500,
            "status {} ({} bytes)",
            r.status,
            r.body.len()
        );
        assert!(
            bed.upstream
                .seen_with_prefix("/gate/buffered/big")
                .is_empty(),
            "the upstream got the request"
        );
        let m = bed
            .tollgate
            .metric("tollgate_protocol_errors_total{kind=\"message_too_large\"}")
            .await;
        assert_eq!(m, Some(1.0));
        // A body that fits still goes through.
        let r = bed.post("/gate/buffered/small", &[], "fine").await;
        assert_eq!(r.status, 200, "{:?}", r.text());
    })
    .await;
}

/// Issue 12 point 2: where Envoy will not send the body a flow needs, the request is
/// refused before it is forwarded, not after the upstream answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_envoy_will_not_send_is_refused_before_forwarding() {
    within(LIMIT, async {
        // FULL_DUPLEX_STREAMED response: Envoy ignores overrides on this route.
        let bed = bed(&[]).await;
        let r = bed.post("/gate/fdresp/x", &[], "fine").await;
        assert_eq!(r.status, 500, "{:?}", r.text());
        assert!(
            r.text().contains("tollgate.RequestBodyNotReceived"),
            "{}",
            r.text()
        );
        assert!(bed.upstream.seen_with_prefix("/gate/fdresp").is_empty());
        drop(bed);

        // allow_mode_override off. Told so: refused at once.
        let mut opts = BedOptions::new(CONFIG);
        opts.envoy = EnvoyOptions {
            allow_mode_override: false,
            ..envoy()
        };
        let mut told = opts.clone();
        told.tollgate_args
            .extend(["--mode-override".to_owned(), "denied".to_owned()]);
        let bed = TestBed::start_with(told).await;
        let r = bed.post("/gate/none/a", &[], "fine").await;
        assert_eq!(r.status, 500, "{:?}", r.text());
        assert!(bed.upstream.seen_with_prefix("/gate/none").is_empty());
        drop(bed);

        // Not told: the first request proves the override is ignored (it reached the
        // upstream and is answered 500); every later one is refused before forwarding.
        let bed = TestBed::start_with(opts).await;
        let r = bed.post("/gate/none/a", &[], "fine").await;
        assert_eq!(r.status, 500, "{:?}", r.text());
        assert_eq!(bed.upstream.seen_with_prefix("/gate/none").len(), 1);
        for _ in 0..3 {
            let r = bed.post("/gate/none/b", &[], "fine").await;
            assert_eq!(r.status, 500, "{:?}", r.text());
        }
        assert_eq!(bed.upstream.seen_with_prefix("/gate/none").len(), 1);
        assert!(bed.tollgate.log().contains("Envoy ignored a mode_override"));
    })
    .await;
}

/// Without graceful close Envoy ends every ext_proc stream with an HTTP/2 reset, also while
/// tollgate still holds a body when the client goes away: that is the peer leaving, a normal
/// end, never counted as a stream error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_resets_are_normal_ends() {
    within(LIMIT, async {
        let mut opts = BedOptions::new(CONFIG);
        opts.envoy = envoy();
        opts.envoy.runtime.insert(
            "envoy.reloadable_features.ext_proc_graceful_grpc_close".to_owned(),
            serde_json::Value::Bool(false),
        );
        let bed = TestBed::start_with(opts).await;
        for seg in ["buffered", "streamed", "duplex"] {
            let r = bed.post(&format!("/rewrite/{seg}"), &[], "body").await;
            assert_eq!(r.status, 200, "{seg}: {:?}", r.text());
        }
        // A client that leaves half way through a body tollgate holds.
        let mut s = tokio::net::TcpStream::connect(bed.envoy.listen)
            .await
            .unwrap();
        s.write_all(b"POST /gate/duplex/x HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nhalf")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(s);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let metrics = bed.tollgate.metrics().await;
        let errors: Vec<&str> = metrics
            .lines()
            // Known kinds are exported at 0 (so alerts have series): only counts matter.
            .filter(|l| l.starts_with("tollgate_protocol_errors_total") && !l.ends_with(" 0"))
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            bed.tollgate.metric("tollgate_streams_active").await,
            Some(0.0)
        );
        assert_eq!(
            bed.tollgate.metric("tollgate_body_buffer_bytes").await,
            Some(0.0)
        );
    })
    .await;
}

/// Issue 12 point 8: bodies held across all streams are bounded by `--max-buffered-bytes`;
/// past it a body is refused with 503 `tollgate.BodyBufferFull` (and never forwarded) while
/// the streams within the budget go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_max_buffered_bytes_are_shed_with_503() {
    within(LIMIT, async {
        let bed = bed(&["--max-buffered-bytes", "1000"]).await;
        let listen = bed.envoy.listen;
        // The first request holds 600 bytes of its 900 while the second arrives.
        let first = tokio::spawn(async move {
            let a = vec![b'a'; 600];
            let b = vec![b'b'; 300];
            raw_request(
                listen,
                "POST /gate/duplex/first HTTP/1.1\r\nhost: t\r\ncontent-length: 900",
                &[&a, &b],
                Duration::from_millis(400),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        let second = vec![b'c'; 600];
        let (status, body) = raw_request(
            listen,
            "POST /gate/duplex/second HTTP/1.1\r\nhost: t\r\ncontent-length: 600",
            &[&second],
            Duration::ZERO,
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("tollgate.BodyBufferFull"), "{body}");
        // FULL_DUPLEX_STREAMED forwards the headers before the body is decided, so the
        // upstream may have seen them (then a reset), but never a byte of the body.
        let sent: usize = bed
            .upstream
            .seen_with_prefix("/gate/duplex/second")
            .iter()
            .map(|r| r.body_bytes().len())
            .sum();
        assert_eq!(
            sent, 0,
            "body bytes of the shed request reached the upstream"
        );
        let (status, body) = first.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let seen = bed.upstream.seen_with_prefix("/gate/duplex/first");
        assert_eq!(seen[0].body_bytes().len(), 900);
        assert_eq!(
            bed.tollgate.metric("tollgate_body_buffer_shed_total").await,
            Some(1.0)
        );
    })
    .await;
}

/// Holding a STREAMED request body does not hold Envoy's answers: with the default 200 ms
/// `message_timeout` and pauses longer than that between pieces, the body still arrives whole
/// (or is refused whole), in STREAMED and FULL_DUPLEX_STREAMED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_outlasts_message_timeout_while_held() {
    within(LIMIT, async {
        let mut opts = BedOptions::new(CONFIG);
        opts.envoy = EnvoyOptions {
            message_timeout: "0.2s".to_owned(),
            ..envoy()
        };
        let bed = TestBed::start_with(opts).await;
        for seg in ["streamed", "duplex"] {
            let pieces: [&[u8]; 3] = [b"one, ", b"two, ", b"fine"];
            let (status, body) = raw_request(
                bed.envoy.listen,
                &format!("POST /gate/{seg}/slow HTTP/1.1\r\nhost: t\r\ncontent-length: 14"),
                &pieces,
                Duration::from_millis(300),
            )
            .await;
            assert_eq!(status, 200, "{seg}: {body}");
            let seen = bed.upstream.seen_with_prefix(&format!("/gate/{seg}/slow"));
            assert_eq!(seen[0].body_bytes(), b"one, two, fine", "{seg}");

            let pieces: [&[u8]; 3] = [b"one, ", b"two, ", b"deny"];
            let (status, body) = raw_request(
                bed.envoy.listen,
                &format!("POST /gate/{seg}/slowdeny HTTP/1.1\r\nhost: t\r\ncontent-length: 14"),
                &pieces,
                Duration::from_millis(300),
            )
            .await;
            assert_eq!(status, 403, "{seg}: {body}");
            for s in bed
                .upstream
                .seen_with_prefix(&format!("/gate/{seg}/slowdeny"))
            {
                assert!(s.body_bytes().is_empty(), "{seg}");
            }
        }
    })
    .await;
}

/// Issue 18's body-reading request policies in every body mode: JSON threat protection
/// refuses a too-deep body sent in pieces before any byte reaches the upstream, and an
/// accepted body goes on whole with the value ExtractVariables read from it.
#[tokio::test]
async fn json_threat_protection_and_extract_variables_in_every_mode() {
    within(LIMIT, async {
        let bed = bed(&[]).await;
        for (seg, _) in MODES.iter().filter(|(seg, _)| *seg != "none") {
            let path = format!("/threat/{seg}");
            let pieces: [&[u8]; 2] = [br#"{"a":{"b":"#, br#"{"c":[1]}}}"#];
            let len: usize = pieces.iter().map(|p| p.len()).sum();
            let (status, body) = raw_request(
                bed.envoy.listen,
                &format!("POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len}"),
                &pieces,
                Duration::from_millis(60),
            )
            .await;
            assert_eq!(status, 500, "{seg}: {body}");
            assert!(body.contains("jsonthreatprotection"), "{seg}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            // STREAMED and FULL_DUPLEX_STREAMED send the headers on before the body is
            // decided (as in the gate test above): no body byte may follow them.
            for s in bed.upstream.seen_with_prefix(&path) {
                assert!(
                    s.body_bytes().is_empty(),
                    "{seg}: a refused body reached the upstream"
                );
            }
            let pieces: [&[u8]; 2] = [br#"{"model":"#, br#""gpt-4o"}"#];
            let (status, body) = raw_request(
                bed.envoy.listen,
                &format!("POST {path}/ok HTTP/1.1\r\nhost: t\r\ncontent-length: 18"),
                &pieces,
                Duration::from_millis(60),
            )
            .await;
            assert_eq!(status, 200, "{seg}: {body}");
            let seen = bed.upstream.seen_with_prefix(&format!("{path}/ok"));
            assert_eq!(seen.len(), 1, "{seg}");
            assert_eq!(seen[0].body_bytes(), br#"{"model":"gpt-4o"}"#, "{seg}");
            // STREAMED forwards the headers before the body: a header made from the body can
            // only go with them where tollgate holds the headers answer (every other mode).
            if *seg != "streamed" {
                assert_eq!(
                    seen[0].headers.get("x-model").map(String::as_str),
                    Some("gpt-4o"),
                    "{seg}"
                );
            }
        }
    })
    .await;
}
