//! The `tollgate` process: gRPC health, SIGHUP reload, and graceful shutdown on SIGTERM
//! (not ready first, open streams drain, then exit 0).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient, processing_request::Request,
    processing_response::Response, HttpHeaders, ProcessingRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

mod support;

use support::{free_port, http_blocking, serve_command, ServeProcess};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec: {type: AssignMessage, set: {headers: {x-flow: "{flow.name}"}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: all}
spec:
  default: true
  request: [{policy: tag}]
"#;

fn start(extra: &[&str]) -> ServeProcess {
    start_in(tempfile::tempdir().unwrap(), extra)
}

fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> ServeProcess {
    let (grpc, admin) = (free_port(), free_port());
    let mut c = serve_command(dir.path(), CONFIG, grpc, admin);
    c.args(extra).stdout(Stdio::null()).stderr(Stdio::null());
    ServeProcess::ready(&mut c, dir, grpc, admin)
}

/// (status, body) of a GET; (0, "") when the port is closed.
fn get(port: u16, path: &str) -> (u16, String) {
    http_blocking(port, "GET", path, None, None)
}

fn signal(p: &ServeProcess, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn metric(p: &ServeProcess, name: &str) -> Option<f64> {
    let (_, body) = get(p.admin, "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn headers_msg() -> ProcessingRequest {
    let h = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![h(":method", "GET"), h(":path", "/x"), h(":authority", "a")],
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_health_and_admin_endpoints() {
    let p = start(&[]);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", p.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    for service in ["", "envoy.service.ext_proc.v3.ExternalProcessor"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    assert_eq!(get(p.admin, "/healthz").0, 200);
    let (code, body) = get(p.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("tollgate_config_synchronized 1"), "{body}");
}

#[tokio::test]
async fn sighup_forces_a_reload() {
    let p = start(&["--reload-interval", "1h"]);
    assert_eq!(metric(&p, "tollgate_config_generation"), Some(1.0));
    signal(&p, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&p, "tollgate_config_generation") != Some(2.0) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_turns_unready_then_drains_open_streams() {
    let mut p = start(&["--drain-timeout", "10s"]);
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{}", p.grpc))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut answers = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // An exchange is under way: its request was answered, its response is still to come.
    tx.send(headers_msg()).await.unwrap();
    let r = answers.message().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::RequestHeaders(_))));

    signal(&p, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _) = get(p.admin, "/readyz");
        if code == 503 || code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The process waits for the open stream...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "exited before the stream finished"
    );

    // ...which can still be answered and finish.
    let h = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    tx.send(ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![h(":status", "200")],
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = answers.message().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::ResponseHeaders(_))));
    drop(tx);
    let _ = answers.message().await;

    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn grpc_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let p = start_in(dir, &["--tls-cert", &cert_s, "--tls-key", &key_s]);

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ck.cert.pem()))
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", p.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ExternalProcessorClient::new(ch);
    let (tx, rx) = mpsc::channel(4);
    let mut answers = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(headers_msg()).await.unwrap();
    let r = answers.message().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::RequestHeaders(_))));

    // Plain text is refused on the TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", p.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut health = HealthClient::new(ch);
        assert!(health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_err());
    }
}
