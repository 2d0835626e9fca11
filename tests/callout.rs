//! `ServiceCallout` against a real local HTTP server (hyper, HTTP/1.1 and HTTP/2 with
//! prior knowledge): templated requests, variables from status, headers and JSON paths,
//! retries, timeouts, 5xx, huge and non-JSON bodies, the circuit breaker and egress rules.
// Faults are returned by value, as the library does (see its lib.rs).
#![allow(clippy::result_large_err)]

use parking_lot::Mutex;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tollgate::pipeline::Policy;
use tollgate::policies::service_callout::Egress;
use tollgate::policies::{builder, BuildContext, SpecError};
use tollgate::services::Services;
use tollgate::vars::{Exchange, Headers, RequestInfo};

mod support;

use support::policy::{self, run};

/// (method, path, query, headers, body) of a request.
type Request1 = (String, String, String, Vec<(String, String)>, String);

#[derive(Default)]
struct Seen {
    hits: AtomicUsize,
    flaky_left: AtomicUsize,
    last: Mutex<Option<Request1>>,
}

async fn handle(
    seen: Arc<Seen>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    seen.hits.fetch_add(1, Ordering::SeqCst);
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    *seen.last.lock() = Some((
        method,
        path.clone(),
        query.clone(),
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    ));
    let resp = |status: u16, ct: &str, body: Bytes| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .header("x-upstream", "callee")
            .body(Full::new(body))
            .unwrap()
    };
    Ok(match path.as_str() {
        "/check" => resp(
            200,
            "application/json",
            Bytes::from(json!({"allowed": true, "user": {"tier": "gold", "limits": [1, 2]}, "n": 7, "version": version}).to_string()),
        ),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            resp(200, "text/plain", Bytes::new())
        }
        "/fail" => resp(503, "text/plain", Bytes::from_static(b"down")),
        "/forbidden" => resp(403, "application/json", Bytes::from_static(b"{\"allowed\":false}")),
        "/huge" => resp(200, "application/json", Bytes::from(vec![b' '; 4 * 1024 * 1024])),
        "/text" => resp(200, "text/plain", Bytes::from_static(b"<html>not json</html>")),
        "/flaky" => {
            if seen.flaky_left.load(Ordering::SeqCst) > 0 {
                seen.flaky_left.fetch_sub(1, Ordering::SeqCst);
                resp(503, "text/plain", Bytes::new())
            } else {
                resp(200, "application/json", Bytes::from_static(b"{\"ok\":1}"))
            }
        }
        _ => resp(404, "text/plain", Bytes::new()),
    })
}

/// HTTP/1.1 and HTTP/2 (prior knowledge) on one port.
async fn serve() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn build(services: &Services, yaml: &str) -> Result<Arc<dyn Policy>, SpecError> {
    let ctx = BuildContext {
        name: "authz".into(),
        config_dir: None,
        services: services.clone(),
    };
    policy::build("ServiceCallout", &ctx, yaml)
}

fn exchange() -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), "/v1/chat?user=u%201".into());
    h.push("x-user".into(), "alice".into());
    h.push("x-evil".into(), "a&admin=1/..".into());
    let mut ex = Exchange {
        request: RequestInfo::from_headers(h),
        ..Default::default()
    };
    ex.set_var("client_id", "app-1");
    ex
}

#[tokio::test]
async fn templated_call_fills_variables() {
    let (addr, seen) = serve().await;
    let services = Services::default();
    for http2 in [false, true] {
        let p = build(
            &services,
            &format!(
                r#"
request:
  method: POST
  url: "http://{addr}/check?client={{client_id}}&who={{request.header.x-evil}}"
  headers: {{content-type: application/json, x-user: "{{request.header.x-user}}"}}
  body: '{{"path": "{{request.path}}"}}'
http2: {http2}
response:
  json: {{allowed: "$.allowed", tier: "$.user.tier", limits: "$.user.limits", n: "$.n", version: "$.version", missing: "$.nope"}}
"#
            ),
        )
        .unwrap();
        let mut ex = exchange();
        run(&p, &mut ex).await.unwrap();
        let v = |n: &str| {
            ex.lookup(&format!("servicecallout.authz.{n}"))
                .map(|c| c.into_owned())
        };
        assert_eq!(v("status").as_deref(), Some("200"));
        assert_eq!(v("json.allowed").as_deref(), Some("true"));
        assert_eq!(v("json.tier").as_deref(), Some("gold"));
        assert_eq!(v("json.limits").as_deref(), Some("[1,2]"));
        assert_eq!(v("json.n").as_deref(), Some("7"));
        assert_eq!(
            v("json.version").as_deref(),
            Some(if http2 { "HTTP/2.0" } else { "HTTP/1.1" })
        );
        assert_eq!(v("json.missing"), None);
        assert_eq!(v("header.x-upstream").as_deref(), Some("callee"));
        assert!(v("body").unwrap().contains("gold"));
        let (method, path, query, headers, body) = seen.last.lock().clone().unwrap();
        assert_eq!(
            (method.as_str(), path.as_str(), query.as_str()),
            ("POST", "/check", "client=app-1&who=a%26admin%3D1%2F..")
        );
        assert!(headers.contains(&("x-user".into(), "alice".into())));
        assert_eq!(body, r#"{"path": "/v1/chat"}"#);
    }
}

#[tokio::test]
async fn failures_are_clear_and_bounded() {
    let (addr, _seen) = serve().await;
    let services = Services::default();
    let call = |path: &str, extra: &str| {
        build(
            &services,
            &format!("request: {{url: 'http://{addr}{path}'}}\ntimeoutMs: 300\n{extra}"),
        )
        .unwrap()
    };
    let cases = [
        (
            "/slow",
            "",
            504,
            "steps.servicecallout.ExecutionFailed",
            "timed out",
        ),
        (
            "/fail",
            "",
            502,
            "steps.servicecallout.ExecutionFailed",
            "503",
        ),
        (
            "/forbidden",
            "",
            502,
            "steps.servicecallout.ExecutionFailed",
            "403",
        ),
        (
            "/huge",
            "maxResponseBytes: 65536",
            502,
            "steps.servicecallout.ResponseTooLarge",
            "65536",
        ),
        (
            "/text",
            "response: {json: {a: $.a}}",
            502,
            "steps.servicecallout.ResponseNotJson",
            "not JSON",
        ),
    ];
    for (path, extra, status, code, msg) in cases {
        let p = call(path, extra);
        let mut ex = exchange();
        let start = Instant::now();
        let f = run(&p, &mut ex).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (status, code), "{path}");
        assert!(f.message.contains(msg), "{path}: {}", f.message);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            start.elapsed()
        );
        assert!(ex.lookup("servicecallout.authz.error").is_some());
    }
    // A status in successCodes is a success; its variables are set.
    let p = call(
        "/forbidden",
        "successCodes: ['200-299', '403']\nresponse: {json: {allowed: $.allowed}}",
    );
    let mut ex = exchange();
    run(&p, &mut ex).await.unwrap();
    assert_eq!(
        ex.lookup("servicecallout.authz.json.allowed").as_deref(),
        Some("false")
    );
    // Unreachable destination.
    let dead = build(
        &services,
        "request: {url: 'http://127.0.0.1:9/x'}\ntimeoutMs: 2000",
    )
    .unwrap();
    let f = run(&dead, &mut exchange()).await.unwrap_err();
    assert_eq!(f.status, 502);
    assert!(f.message.contains("connect failed"), "{}", f.message);
}

/// A DNS or connection error names hosts, addresses and resolver details: the operator's
/// log gets them, the client (and the flow's `error` variable) only that the call failed.
#[tokio::test]
async fn connection_errors_are_not_shown_to_the_client() {
    let services = Services::default();
    for url in ["http://no-such-host.invalid:8080/x", "http://127.0.0.1:9/x"] {
        let p = build(
            &services,
            &format!("request: {{url: '{url}'}}\ntimeoutMs: 2000"),
        )
        .unwrap();
        let mut ex = exchange();
        let f = run(&p, &mut ex).await.unwrap_err();
        assert_eq!(
            (f.status, f.code.as_str()),
            (502, "steps.servicecallout.ExecutionFailed")
        );
        assert_eq!(f.message, "callout connect failed", "{url}");
        let error = ex
            .lookup("servicecallout.authz.error")
            .unwrap_or_default()
            .into_owned();
        for leak in ["invalid", "127.0.0.1", "dns", "refused", "resolve", "error"] {
            assert!(
                !f.message.to_lowercase().contains(leak),
                "{url}: {}",
                f.message
            );
            assert!(!error.to_lowercase().contains(leak), "{url}: {error}");
        }
    }
}

/// The breaker counts failed calls: a call that failed after its retries is one failure.
#[tokio::test]
async fn circuit_breaker_counts_calls_not_attempts() {
    let (addr, seen) = serve().await;
    let services = Services::default();
    let p = build(
        &services,
        &format!("request: {{url: 'http://{addr}/fail'}}\nretries: 2\ncircuitBreaker: {{failures: 2, openSeconds: 60}}"),
    )
    .unwrap();
    // Two calls of three attempts each go out before the breaker opens.
    for _ in 0..2 {
        assert_eq!(run(&p, &mut exchange()).await.unwrap_err().status, 502);
    }
    assert_eq!(seen.hits.load(Ordering::SeqCst), 6);
    let f = run(&p, &mut exchange()).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (503, "steps.servicecallout.CircuitOpen")
    );
    assert_eq!(seen.hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn retries_for_idempotent_calls_only() {
    let (addr, seen) = serve().await;
    let services = Services::default();
    seen.flaky_left.store(2, Ordering::SeqCst);
    let get = build(
        &services,
        &format!("request: {{url: 'http://{addr}/flaky'}}\nretries: 2"),
    )
    .unwrap();
    run(&get, &mut exchange()).await.unwrap();
    assert_eq!(seen.hits.load(Ordering::SeqCst), 3);

    seen.hits.store(0, Ordering::SeqCst);
    seen.flaky_left.store(1, Ordering::SeqCst);
    let post = build(
        &services,
        &format!("request: {{method: POST, url: 'http://{addr}/flaky'}}\nretries: 2"),
    )
    .unwrap();
    let f = run(&post, &mut exchange()).await.unwrap_err();
    assert_eq!(f.status, 502);
    assert_eq!(
        seen.hits.load(Ordering::SeqCst),
        1,
        "a POST that reached the server is not retried"
    );
}

/// A server that reads each request's head, then closes the connection without answering:
/// the request reached it. Returns its address and the number of requests it read.
async fn serve_hang_up() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
                // Dropped: closed before any answer.
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_connection_closed_after_the_request_is_retried_only_when_idempotent() {
    let (addr, count) = serve_hang_up().await;
    let services = Services::default();
    let post = build(
        &services,
        &format!("request: {{method: POST, url: 'http://{addr}/x', body: 'charge'}}\nretries: 2"),
    )
    .unwrap();
    let f = run(&post, &mut exchange()).await.unwrap_err();
    assert_eq!(f.status, 502, "{}", f.message);
    assert!(!f.message.contains("connect failed"), "{}", f.message);
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "a POST the callee may have acted on is sent once"
    );

    count.store(0, Ordering::SeqCst);
    let get = build(
        &services,
        &format!("request: {{url: 'http://{addr}/x'}}\nretries: 2"),
    )
    .unwrap();
    assert_eq!(run(&get, &mut exchange()).await.unwrap_err().status, 502);
    assert_eq!(count.load(Ordering::SeqCst), 3, "a GET is retried");
}

/// An HTTPS server with a certificate for `localhost` issued by a CA made here, offering
/// `alpn` protocols. Returns its address and the CA certificate (PEM).
async fn serve_tls(alpn: &[&[u8]]) -> (SocketAddr, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
    )
    .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, s) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test]
async fn https_with_an_internal_ca_over_http1_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let services = Services::default();
    let with_dir = |yaml: &str| {
        builder("ServiceCallout").unwrap()(
            &BuildContext {
                name: "authz".into(),
                config_dir: Some(dir.path().to_path_buf()),
                services: services.clone(),
            },
            serde_norway::from_str(yaml).unwrap(),
        )
    };
    for (alpn, version) in [
        (&[b"http/1.1".as_slice()][..], "HTTP/1.1"),
        (&[b"h2".as_slice(), b"http/1.1".as_slice()][..], "HTTP/2.0"),
    ] {
        let (addr, ca) = serve_tls(alpn).await;
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        let url = format!("https://localhost:{}/check", addr.port());
        // Not signed by a system root: refused.
        let untrusted = with_dir(&format!("request: {{url: '{url}'}}")).unwrap();
        let f = run(&untrusted, &mut exchange()).await.unwrap_err();
        assert_eq!(f.status, 502);
        // Why (the certificate) is in the operator's log, not in the answer.
        assert_eq!(f.message, "callout connect failed");
        // Trusting the internal CA: the call goes through, in the protocol ALPN chose.
        let p = with_dir(&format!(
            "request: {{url: '{url}'}}\ncaFile: ca.pem\nresponse: {{json: {{version: $.version}}}}"
        ))
        .unwrap();
        let mut ex = exchange();
        run(&p, &mut ex).await.unwrap();
        assert_eq!(
            ex.lookup("servicecallout.authz.json.version").as_deref(),
            Some(version)
        );
    }
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    let e = with_dir("request: {url: 'https://localhost/x'}\ncaFile: junk.pem")
        .err()
        .unwrap();
    assert!(e.to_string().contains("caFile"), "{e}");
}

#[tokio::test]
async fn circuit_breaker_stops_calling_a_failing_service() {
    let (addr, seen) = serve().await;
    let services = Services::default();
    let p = build(
        &services,
        &format!("request: {{url: 'http://{addr}/fail'}}\ncircuitBreaker: {{failures: 3, openSeconds: 60}}"),
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(run(&p, &mut exchange()).await.unwrap_err().status, 502);
    }
    for _ in 0..20 {
        let f = run(&p, &mut exchange()).await.unwrap_err();
        assert_eq!(
            (f.status, f.code.as_str()),
            (503, "steps.servicecallout.CircuitOpen")
        );
    }
    assert_eq!(seen.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn egress_rules_restrict_destinations() {
    let (addr, _seen) = serve().await;
    let mut services = Services {
        egress: Arc::new(Egress::new(&["allowed.internal", "localhost"]).unwrap()),
        ..Default::default()
    };
    let e = build(
        &services,
        &format!("request: {{url: 'http://{addr}/check'}}"),
    )
    .err()
    .unwrap();
    assert!(e.message.contains("not allowed"), "{e}");
    // A templated path is fine; the host is fixed and checked at load.
    assert!(build(
        &services,
        "request: {url: 'http://allowed.internal/u/{client_id}'}"
    )
    .is_ok());
    services.egress = Arc::new(Egress::new(&[format!("127.0.0.1:{}", addr.port())]).unwrap());
    let p = build(
        &services,
        &format!("request: {{url: 'http://{addr}/check'}}"),
    )
    .unwrap();
    run(&p, &mut exchange()).await.unwrap();

    // With no --callout-allow, everything but link-local: the metadata server (which hands
    // out the gateway's own credentials) is refused at load, by address or by name.
    let open = Services::default();
    for url in [
        "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fe80::1]:8080/x",
        "http://169.254.169.254/u/{client_id}",
    ] {
        let e = build(&open, &format!("request: {{url: '{url}'}}"))
            .err()
            .unwrap();
        assert!(e.message.contains("link-local"), "{url}: {e}");
    }
    // The operator can allow it explicitly.
    let allowed = Services {
        egress: Arc::new(Egress::new(&["169.254.169.254"]).unwrap()),
        ..Default::default()
    };
    assert!(build(&allowed, "request: {url: 'http://169.254.169.254/x'}").is_ok());
}

/// An HTTPS server (certificate for `localhost`) that requires a client certificate issued
/// by its CA. Returns its address, the CA (PEM), and a client certificate and key the CA
/// issued (PEM), plus a pair from another CA.
async fn serve_mtls() -> (
    SocketAddr,
    Arc<Seen>,
    String,
    (String, String),
    (String, String),
) {
    let new_ca = || {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
    };
    let ca = new_ca();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let client_of = |issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let client = client_of(&ca);
    let stranger = client_of(&new_ca());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s0 = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, s) = (acceptor.clone(), s0.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen, ca.pem(), client, stranger)
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, seen, ca, (cert, key), (other_cert, other_key)) = serve_mtls().await;
    for (name, text) in [
        ("ca.pem", &ca),
        ("client.pem", &cert),
        ("client.key", &key),
        ("other.pem", &other_cert),
        ("other.key", &other_key),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let services = Services::default();
    let with_dir = |yaml: &str| {
        builder("ServiceCallout").unwrap()(
            &BuildContext {
                name: "authz".into(),
                config_dir: Some(dir.path().to_path_buf()),
                services: services.clone(),
            },
            serde_norway::from_str(yaml).unwrap(),
        )
    };
    let url = format!("https://localhost:{}/check", addr.port());
    // No client certificate: the server refuses the handshake.
    let p = with_dir(&format!("request: {{url: '{url}'}}\ncaFile: ca.pem")).unwrap();
    assert_eq!(run(&p, &mut exchange()).await.unwrap_err().status, 502);
    // One the server's CA did not issue: refused too.
    let p = with_dir(&format!(
        "request: {{url: '{url}'}}\ncaFile: ca.pem\nclientCertificate: {{certFile: other.pem, keyFile: other.key}}"
    ))
    .unwrap();
    assert_eq!(run(&p, &mut exchange()).await.unwrap_err().status, 502);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 0);
    // The gateway's certificate: the call goes through.
    let p = with_dir(&format!(
        "request: {{url: '{url}'}}\ncaFile: ca.pem\nclientCertificate: {{certFile: client.pem, keyFile: client.key}}\nresponse: {{json: {{allowed: $.allowed}}}}"
    ))
    .unwrap();
    let mut ex = exchange();
    run(&p, &mut ex).await.unwrap();
    assert_eq!(
        ex.lookup("servicecallout.authz.json.allowed").as_deref(),
        Some("true")
    );
    assert_eq!(seen.hits.load(Ordering::SeqCst), 1);
    // A pair that does not load is refused at load, naming the field.
    std::fs::write(dir.path().join("junk.key"), "not a key").unwrap();
    let e = with_dir(&format!(
        "request: {{url: '{url}'}}\nclientCertificate: {{certFile: client.pem, keyFile: junk.key}}"
    ))
    .err()
    .unwrap();
    assert_eq!(e.field, "clientCertificate", "{e}");
    let e = with_dir(&format!(
        "request: {{url: '{url}'}}\nclientCertificate: {{certFile: client.pem, keyFile: other.key}}"
    ))
    .err()
    .unwrap();
    assert_eq!(
        e.field, "clientCertificate",
        "a key that is not the certificate's: {e}"
    );
}

/// A metadata server for Google tokens, on its own port.
async fn serve_metadata() -> (SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        let flavored = req
                            .headers()
                            .get("metadata-flavor")
                            .is_some_and(|v| v == "Google");
                        let ok = flavored
                            && req.uri().path()
                                == "/computeMetadata/v1/instance/service-accounts/default/token";
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        let body = if ok {
                            json!({"access_token": format!("ya29.test-{n}"), "expires_in": 3599, "token_type": "Bearer"}).to_string()
                        } else {
                            String::new()
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(if ok { 200 } else { 403 })
                                .header("content-type", "application/json")
                                .header("metadata-flavor", "Google")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test]
async fn google_token_authentication() {
    let (addr, seen) = serve().await;
    let (md, md_calls) = serve_metadata().await;
    let services = Services::default();
    let p = build(
        &services,
        &format!(
            "request: {{url: 'http://{addr}/check'}}\ngoogleToken: {{accessToken: {{scopes: [https://www.googleapis.com/auth/cloud-platform]}}, metadataHost: '{md}'}}"
        ),
    )
    .unwrap();
    for _ in 0..2 {
        run(&p, &mut exchange()).await.unwrap();
        let (_, path, _, headers, _) = seen.last.lock().clone().unwrap();
        assert_eq!(path, "/check");
        let auth = headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone());
        assert_eq!(auth.as_deref(), Some("Bearer ya29.test-0"));
    }
    assert_eq!(md_calls.load(Ordering::SeqCst), 1, "the token is cached");

    // A custom header; the same header in request.headers is refused at load.
    let p = build(
        &services,
        &format!(
            "request: {{url: 'http://{addr}/check'}}\ngoogleToken: {{accessToken: {{scopes: [s1]}}, header: x-serverless-authorization, metadataHost: '{md}'}}"
        ),
    )
    .unwrap();
    run(&p, &mut exchange()).await.unwrap();
    let (_, _, _, headers, _) = seen.last.lock().clone().unwrap();
    assert!(headers
        .iter()
        .any(|(k, v)| k == "x-serverless-authorization" && v.starts_with("Bearer ya29.test-")));
    let e = build(
        &services,
        &format!(
            "request: {{url: 'http://{addr}/check', headers: {{authorization: x}}}}\ngoogleToken: {{accessToken: {{scopes: [s]}}, metadataHost: '{md}'}}"
        ),
    )
    .err()
    .unwrap();
    assert_eq!(e.field, "googleToken.header");

    // No token to be had: 503, and the callee is not called.
    let hits = seen.hits.load(Ordering::SeqCst);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = build(
        &services,
        &format!(
            "request: {{url: 'http://{addr}/check'}}\ngoogleToken: {{idToken: {{audience: https://x}}, metadataHost: '{dead}'}}"
        ),
    )
    .unwrap();
    let f = run(&p, &mut exchange()).await.unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (503, "steps.googletoken.TokenUnavailable")
    );
    assert_eq!(seen.hits.load(Ordering::SeqCst), hits);
}
