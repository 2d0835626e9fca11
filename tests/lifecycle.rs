//! The `tollgate` process: gRPC health, SIGHUP reload, and graceful shutdown on SIGTERM
//! (not ready first, open streams drain, then exit 0).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient, processing_response::Response,
    ProcessingRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

mod support;

use support::{ext_proc, free_port, http_blocking, serve_command, ServeProcess};

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
    ext_proc::request_headers(
        &[(":method", "GET"), (":path", "/x"), (":authority", "a")],
        true,
    )
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

/// Opens an ext_proc stream on `port` and has its request headers answered.
async fn open_exchange(
    port: u16,
) -> (
    mpsc::Sender<ProcessingRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse>,
) {
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut answers = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(headers_msg()).await.unwrap();
    let r = answers.message().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::RequestHeaders(_))));
    (tx, answers)
}

/// Ends an exchange opened by [`open_exchange`] with its response headers.
async fn finish_exchange(
    tx: mpsc::Sender<ProcessingRequest>,
    mut answers: tonic::Streaming<
        envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse,
    >,
) {
    tx.send(ext_proc::response_headers(&[(":status", "200")], true))
        .await
        .unwrap();
    let r = answers.message().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::ResponseHeaders(_))));
    drop(tx);
    let _ = answers.message().await;
}

#[tokio::test]
async fn sigterm_turns_unready_then_drains_open_streams() {
    let mut p = start(&["--shutdown-grace", "1s", "--drain-timeout", "10s"]);
    // An exchange is under way: its request was answered, its response is still to come.
    let (tx, answers) = open_exchange(p.grpc).await;

    signal(&p, "-TERM");
    // Not ready at once, and said so by the admin port (which stays up: a closed port
    // would make health checks fail with errors instead of steering traffic away).
    let sigterm = Instant::now();
    loop {
        let (code, _) = get(p.admin, "/readyz");
        if code == 503 {
            break;
        }
        assert_eq!(code, 200, "the admin port closed on SIGTERM");
        assert!(
            sigterm.elapsed() < Duration::from_secs(1),
            "still ready after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // During the grace period a stream that arrives (the gateway has not noticed yet) is
    // still served, on a new connection.
    let (tx2, answers2) = open_exchange(p.grpc).await;
    finish_exchange(tx2, answers2).await;

    // After the grace period the process waits for the open stream, `/readyz` still 503.
    tokio::time::sleep(Duration::from_millis(1300).saturating_sub(sigterm.elapsed())).await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "exited before the stream finished"
    );
    assert_eq!(
        get(p.admin, "/readyz").0,
        503,
        "admin port gone while draining"
    );

    // ...which can still be answered and finish.
    finish_exchange(tx, answers).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(
        get(p.admin, "/readyz").0,
        0,
        "the admin port closes at the end"
    );
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

// ───────────────────────────── mTLS ─────────────────────────────

type Ca = rcgen::CertifiedIssuer<'static, rcgen::KeyPair>;

fn new_ca(name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// (certificate PEM, key PEM) for `localhost`, issued by `ca`, for a server or a client.
fn leaf(ca: &Ca, client: bool) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Whether a gRPC health check over TLS succeeds: the server's certificate is trusted when
/// issued by `server_ca`, and `identity` is the client certificate presented, if any.
async fn tls_health(port: u16, server_ca: &Ca, identity: Option<&(String, String)>) -> bool {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
    else {
        return false;
    };
    let Ok(Ok(ch)) = tokio::time::timeout(
        Duration::from_secs(5),
        endpoint.connect_timeout(Duration::from_secs(5)).connect(),
    )
    .await
    else {
        return false;
    };
    let mut health = HealthClient::new(ch);
    let check = health.check(HealthCheckRequest {
        service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(5), check).await,
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

/// Writes `text` to `path` through a rename, as a Secret update lands.
fn replace(path: &std::path::Path, text: &str) {
    let dir = path.parent().unwrap();
    support::write_atomic(dir, path.file_name().unwrap().to_str().unwrap(), text);
}

struct MtlsFiles {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn start_mtls(server_ca: &Ca, client_ca: &Ca, extra: &[&str]) -> (ServeProcess, MtlsFiles) {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let files = MtlsFiles {
        cert: tls.join("tls.crt"),
        key: tls.join("tls.key"),
        ca: tls.join("ca.crt"),
    };
    let (cert, key) = leaf(server_ca, false);
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.ca, client_ca.pem()).unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let mut args = vec![
        "--tls-cert".to_owned(),
        s(&files.cert),
        "--tls-key".to_owned(),
        s(&files.key),
        "--tls-client-ca".to_owned(),
        s(&files.ca),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (start_in(dir, &args), files)
}

#[tokio::test]
async fn mtls_admits_only_clients_with_a_certificate_from_the_ca() {
    let (gateway_ca, other_ca) = (new_ca("gateway CA"), new_ca("other CA"));
    let (p, _files) = start_mtls(&gateway_ca, &gateway_ca, &[]);
    let gateway = leaf(&gateway_ca, true);
    let stranger = leaf(&other_ca, true);
    assert!(
        tls_health(p.grpc, &gateway_ca, Some(&gateway)).await,
        "the gateway's certificate is accepted"
    );
    assert!(
        !tls_health(p.grpc, &gateway_ca, None).await,
        "a client without a certificate is refused"
    );
    assert!(
        !tls_health(p.grpc, &gateway_ca, Some(&stranger)).await,
        "a certificate from another CA is refused"
    );

    // An ext_proc exchange works for the gateway.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(gateway_ca.pem()))
        .identity(tonic::transport::Identity::from_pem(&gateway.0, &gateway.1))
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", p.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut answers = ExternalProcessorClient::new(ch)
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(headers_msg()).await.unwrap();
    let r = answers.message().await.unwrap().unwrap();
    assert!(matches!(r.response, Some(Response::RequestHeaders(_))));
}

#[tokio::test]
async fn rotated_certificates_and_client_ca_apply_without_a_restart() {
    let (old_ca, new_ca_) = (new_ca("old CA"), new_ca("new CA"));
    let (p, files) = start_mtls(&old_ca, &old_ca, &["--reload-interval", "200ms"]);
    let (old_client, new_client) = (leaf(&old_ca, true), leaf(&new_ca_, true));
    assert!(tls_health(p.grpc, &old_ca, Some(&old_client)).await);
    assert!(!tls_health(p.grpc, &new_ca_, Some(&new_client)).await);

    // Rotate everything to the new CA, file by file, as a Secret update does.
    let (cert, key) = leaf(&new_ca_, false);
    replace(&files.key, &key);
    replace(&files.cert, &cert);
    replace(&files.ca, &new_ca_.pem());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tls_health(p.grpc, &new_ca_, Some(&new_client)).await {
        assert!(
            Instant::now() < deadline,
            "the rotated files were not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !tls_health(p.grpc, &old_ca, Some(&old_client)).await,
        "the old CA's client is refused after the rotation"
    );
    assert!(
        !tls_health(p.grpc, &new_ca_, Some(&old_client)).await,
        "a client certificate from the old CA is refused by the new client CA"
    );

    // A broken file keeps the running certificate.
    replace(&files.cert, "not a certificate");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(tls_health(p.grpc, &new_ca_, Some(&new_client)).await);
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
    let status = support::exit_within(&mut child, Duration::from_secs(10), || {
        format!("tollgate {args:?} did not finish within 10 s")
    });
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
