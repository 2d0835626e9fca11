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

/// Runs `tollgate ARGS` with extra environment variables to its end (at most 10 s):
/// (exit code, stdout, stderr).
fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(support::tollgate_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    for var in [
        "TOLLGATE_CONFIG",
        "TOLLGATE_ADMIN_TOKEN_FILE",
        "TOLLGATE_STORE",
        "TOLLGATE_COUNTERS",
        "TOLLGATE_COUNTER_SYNC",
        "TOLLGATE_CALLOUT_ALLOW",
        "TOLLGATE_MAX_MESSAGE_BYTES",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run tollgate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate {args:?} did not finish within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("output");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A broken edit undone by restoring the exact running content (a `git checkout`) brings
/// `tollgate_config_synchronized` back to 1 without a SIGHUP, and nothing is reloaded.
#[tokio::test]
async fn restoring_the_running_configuration_resynchronizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p = start_in(dir, &["--reload-interval", "100ms"]);
    let wait_for = |name: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&p, name) != Some(want) {
            assert!(
                Instant::now() < deadline,
                "{name} did not become {want}: {:?}",
                metric(&p, name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(metric(&p, "tollgate_config_synchronized"), Some(1.0));
    support::write_atomic(&path, "c.yaml", &CONFIG.replace("request:", "requets:"));
    wait_for("tollgate_config_synchronized", 0.0);
    support::write_atomic(&path, "c.yaml", CONFIG);
    wait_for("tollgate_config_synchronized", 1.0);
    assert_eq!(metric(&p, "tollgate_config_generation"), Some(1.0));
}

const CALLOUT: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: meta}
spec:
  type: ServiceCallout
  request: {url: "http://169.254.169.254/computeMetadata/v1/"}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: all}
spec:
  default: true
  request: [{policy: meta}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: body}
spec: {type: AssignMessage, set: {body: "{request.content}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: upload}
spec:
  match: {pathPrefixes: [/upload]}
  maxBodyBytes: 2000000
  request: [{policy: body}]
"#;

/// `validate` takes the options that change what `serve` accepts, and both agree on the
/// same configuration.
#[tokio::test]
async fn validate_and_serve_agree_on_options() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), CALLOUT).unwrap();
    let d = dir.path().to_str().unwrap();

    // Link-local callouts need --callout-allow; a 2 MB body needs room in one message.
    let (code, _, err) = run_cli(&["validate", d], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("link-local"), "{err}");
    let (code, _, err) = run_cli(
        &[
            "validate",
            d,
            "--callout-allow",
            "169.254.169.254",
            "--max-message-bytes",
            "1000000",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Flow \"upload\"")
            && err.contains("--max-message-bytes")
            && !err.contains("link-local"),
        "{err}"
    );
    let (code, out, err) = run_cli(&["validate", d, "--callout-allow", "169.254.169.254"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // The same options from the environment, as serve reads them.
    let (code, _, err) = run_cli(
        &["validate", d],
        &[
            ("TOLLGATE_CALLOUT_ALLOW", "169.254.169.254"),
            ("TOLLGATE_MAX_MESSAGE_BYTES", "1000000"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Flow \"upload\"") && !err.contains("link-local"),
        "{err}"
    );

    // serve refuses what validate refuses, with the same words.
    let (grpc, admin) = (free_port().to_string(), free_port().to_string());
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--config", d, "--store", "memory", "--grpc-addr"];
        let g = format!("127.0.0.1:{grpc}");
        let a = format!("127.0.0.1:{admin}");
        args.push(&g);
        args.push("--admin-addr");
        args.push(&a);
        args.extend_from_slice(extra);
        run_cli(&args, &[])
    };
    let (code, _, err) = serve(&[
        "--callout-allow",
        "169.254.169.254",
        "--max-message-bytes",
        "1000000",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Flow \"upload\"") && err.contains("--max-message-bytes"),
        "{err}"
    );
    // And accepts what validate accepts.
    let (grpc2, admin2) = (free_port(), free_port());
    let mut c = serve_command(dir.path(), CALLOUT, grpc2, admin2);
    c.args(["--callout-allow", "169.254.169.254"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _p = ServeProcess::ready(&mut c, dir, grpc2, admin2);
}

/// Newcomer errors: an empty directory is a warning, not silence; a JavaScript syntax error
/// names the script and the line; conflicting options name both sides.
#[tokio::test]
async fn configuration_and_option_errors_explain_themselves() {
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(&["validate", empty.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning:") && err.contains("no configuration documents"),
        "{err}"
    );
    assert!(out.contains("1 warning"), "{out}");

    let js = tempfile::tempdir().unwrap();
    std::fs::create_dir(js.path().join("scripts")).unwrap();
    std::fs::write(
        js.path().join("scripts/tag.js"),
        "var a = 1;\n\nif (a {\n}\n",
    )
    .unwrap();
    std::fs::write(
        js.path().join("c.yaml"),
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: js}\nspec: {type: JavaScript, file: scripts/tag.js}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {default: true, request: [{policy: js}]}\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["validate", js.path().to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("scripts/tag.js: line 3: SyntaxError"), "{err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one root cause, one error: {err}"
    );

    let (code, _, err) = run_cli(
        &["serve", "--admin-insecure"],
        &[("TOLLGATE_ADMIN_TOKEN_FILE", "/run/secrets/token")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "--admin-token-file (from TOLLGATE_ADMIN_TOKEN_FILE) and --admin-insecure conflict"
        ),
        "{err}"
    );
    let (code, _, err) = run_cli(
        &["serve", "--counters", "memory", "--counter-sync", "async"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--counter-sync conflicts with --counters memory"),
        "{err}"
    );
}
