//! End-to-end test bed: a real Envoy 1.40 in front of the real `tollgate` binary and a local
//! upstream running inside the test process.
//!
//! ```text
//! HttpClient ──HTTP/1.1──▶ Envoy (listener) ──HTTP/1.1──▶ Upstream (hyper, in-process)
//!                            │ ext_proc gRPC (HTTP/2)
//!                            ▼
//!                         tollgate serve --config DIR
//! ```
//!
//! Every piece picks its own loopback ports, so tests run in parallel. Child processes are
//! killed and reaped on `Drop`; when a test panics, the tail of the Envoy and tollgate logs
//! is printed so the failure explains itself.
//!
//! Environment knobs: `ENVOY_BIN` (Envoy binary), `E2E_ENVOY_LOG` (Envoy log level, default
//! `warning`), `E2E_TOLLGATE_LOG` (tollgate `RUST_LOG`, default `info`), `E2E_KEEP_LOGS=1`
//! (print the logs even when the test passes).
#![allow(dead_code)]

pub mod ext_proc;
pub mod guard_server;
pub mod llm_upstream;
pub mod policy;
pub mod redis;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ───────────────────────────── small helpers ─────────────────────────────

/// The repository root (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary: `ENVOY_BIN`, else `<repo>/.tools/envoy/envoy`, else `envoy` on `PATH`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
        panic!(
            "Envoy not found: run scripts/setup.sh (ENVOY_BIN={} does not exist)",
            p.display()
        );
    }
    let local = repo_root().join(".tools/envoy/envoy");
    if local.is_file() {
        return local;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("Envoy not found: run scripts/setup.sh");
}

/// The tollgate binary Cargo built for this test run.
pub fn tollgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

/// `tollgate serve` with `config` written to `dir/c.yaml` as its configuration, on loopback
/// ports `grpc` and `admin`, with the in-memory store; output not redirected.
pub fn serve_command(dir: &Path, config: &str, grpc: u16, admin: u16) -> Command {
    std::fs::write(dir.join("c.yaml"), config).expect("write the configuration");
    let mut c = Command::new(tollgate_bin());
    c.arg("serve")
        .arg("--config")
        .arg(dir)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--store", "memory"])
        .env("TOLLGATE_EMBED_MODEL_DIR", embed_model_dir());
    c
}

/// The built-in embedder's model as `scripts/setup.sh` installs it, for every tollgate the
/// tests start (configurations with `embedder: {kind: static}` and no `modelDir`).
pub fn embed_model_dir() -> PathBuf {
    repo_root().join(".tools/embed-model")
}

/// A `tollgate serve` child process (from plain threads), killed and reaped on drop.
pub struct ServeProcess {
    pub child: Child,
    pub grpc: u16,
    pub admin: u16,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Spawns `cmd` (a [`serve_command`] on `grpc` and `admin` in `dir`) and waits up to
    /// 10 s for `/readyz` to answer 200.
    pub fn ready(cmd: &mut Command, dir: tempfile::TempDir, grpc: u16, admin: u16) -> Self {
        let p = Self {
            child: cmd.spawn().expect("spawn tollgate"),
            grpc,
            admin,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_blocking(admin, "GET", "/readyz", None, None).0 != 200 {
            assert!(Instant::now() < deadline, "tollgate did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static HANDED_OUT: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// A free loopback port (bound to 127.0.0.1:0 and released). Never hands the same port out
/// twice in one test process.
pub fn free_port() -> u16 {
    loop {
        let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        drop(l);
        if HANDED_OUT.lock().insert(port) {
            return port;
        }
    }
}

/// A blocking HTTP/1.1 request (`Connection: close`) to a loopback port, for tests that drive
/// a child process from plain threads: (status, body), or (0, "") when nothing answers.
pub fn http_blocking(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let auth = bearer
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs `f`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close` (no pooling, no hyper): for admin
/// endpoints while waiting for a process to come up. Returns status and body (de-chunked).
/// Envoy answers HTTP/1.0 with 426, hence 1.1.
pub async fn raw_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let bad = || std::io::Error::other(format!("bad HTTP answer: {text:?}"));
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
        let chunked = head
            .lines()
            .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
        let body = if chunked {
            dechunk(body).ok_or_else(bad)?
        } else {
            body.to_owned()
        };
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("raw_get timed out")))
}

fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The value of one sample in Prometheus text: `series` is a metric name, optionally with
/// its labels exactly as rendered (`name{label="v"}`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == series).then(|| value.parse().ok()).flatten()
    })
}

/// The sum of every sample of metric `name` (all label sets); 0 when there is none.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let base = key.split_once('{').map_or(key, |(b, _)| b);
            (base == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |a, b| a + b)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn keep_logs() -> bool {
    std::env::var_os("E2E_KEEP_LOGS").is_some_and(|v| v == "1")
}

/// A child process that is killed and reaped on drop; its log is printed if the test fails.
pub struct Proc {
    name: &'static str,
    pub child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout and stderr going to `log`.
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        Self {
            name,
            child: Some(child),
            log,
        }
    }

    /// Panics with the log if the process already exited.
    pub fn check_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                let log = tail(&self.log, 80);
                self.child = None;
                panic!(
                    "{} exited early ({status}); log {}:\n{log}",
                    self.name,
                    self.log.display()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True once the process has exited (or was killed).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() || keep_logs() {
            eprintln!(
                "──── {} log ({}) ────\n{}\n──── end of {} log ────",
                self.name,
                self.log.display(),
                tail(&self.log, 80),
                self.name
            );
        }
    }
}

// ───────────────────────────── upstream ─────────────────────────────

/// A request the upstream received (recorded on arrival, before answering).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Lower-case name → value (repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// The body bytes received so far (kept when the request is cut off part way).
    pub body: Arc<Mutex<Vec<u8>>>,
}

impl SeenRequest {
    /// The body bytes the upstream has received for this request.
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body.lock().clone()
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// A local HTTP/1.1 upstream on its own tokio runtime:
/// - `/echo` (any method): 200 JSON `{"method","path","uri","headers","body"}`;
/// - `/sse?n=N&delay_ms=D`: 200 `text/event-stream`, N events `data: {"i":k}\n\n`, each
///   followed by a D ms pause, then `data: [DONE]\n\n`;
/// - `/slow?ms=M`: waits M ms, then answers like `/echo`;
/// - anything else: like `/echo`.
///
/// Every answer carries `x-upstream: e2e` (so tests can remove a response header).
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn query_param(query: &str, name: &str) -> Option<u64> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn headers_json(h: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in h {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_owned())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

async fn upstream_handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let headers = headers_json(&parts.headers);
    let received = Arc::new(Mutex::new(Vec::new()));
    seen.lock().push(SeenRequest {
        method: parts.method.to_string(),
        uri: uri.clone(),
        headers: headers.clone(),
        body: received.clone(),
    });
    // Frame by frame, so a request cut off part way still shows what reached the upstream.
    let mut body = body;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            received.lock().extend_from_slice(&data);
        }
    }
    let body = Bytes::from(received.lock().clone());

    if path == "/sse" {
        let n = query_param(&query, "n").unwrap_or(3);
        let delay = Duration::from_millis(query_param(&query, "delay_ms").unwrap_or(100));
        // Event 0, pause, event 1, pause, ..., event n-1, pause, [DONE].
        let events = futures_util::stream::unfold(0u64, move |k| async move {
            if k > n {
                return None;
            }
            if k > 0 {
                tokio::time::sleep(delay).await;
            }
            let data = if k == n {
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                Bytes::from(format!("data: {{\"i\":{k}}}\n\n"))
            };
            Some((Ok::<_, Infallible>(Frame::data(data)), k + 1))
        });
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .header("x-upstream", "e2e")
            .body(BodyExt::boxed(StreamBody::new(events)))
            .unwrap();
        return Ok(resp);
    }
    if path == "/slow" {
        let ms = query_param(&query, "ms").unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let echo = json!({
        "method": parts.method.as_str(),
        "path": path,
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("x-upstream", "e2e")
        .body(full(serde_json::to_vec(&echo).unwrap()))
        .unwrap();
    Ok(resp)
}

impl Upstream {
    pub fn start() -> Self {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().unwrap();
        HANDED_OUT.lock().insert(addr.port());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("upstream")
            .enable_all()
            .build()
            .expect("upstream runtime");
        let seen2 = seen.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| upstream_handle(req, seen.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            runtime: Some(runtime),
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().clone()
    }

    /// Requests received whose path-and-query starts with `prefix`.
    pub fn seen_with_prefix(&self, prefix: &str) -> Vec<SeenRequest> {
        self.seen()
            .into_iter()
            .filter(|r| r.uri.starts_with(prefix))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

// ───────────────────────────── Envoy bootstrap ─────────────────────────────

/// An ext_proc `ProcessingMode`; unset fields are left out (Envoy's defaults apply).
#[derive(Debug, Clone, Default)]
pub struct Mode {
    pub request_header_mode: Option<&'static str>,
    pub response_header_mode: Option<&'static str>,
    pub request_body_mode: Option<&'static str>,
    pub response_body_mode: Option<&'static str>,
    pub request_trailer_mode: Option<&'static str>,
    pub response_trailer_mode: Option<&'static str>,
}

impl Mode {
    /// Both bodies in `body_mode`, trailers SEND.
    pub fn bodies(body_mode: &'static str) -> Self {
        Mode {
            request_body_mode: Some(body_mode),
            response_body_mode: Some(body_mode),
            request_trailer_mode: Some("SEND"),
            response_trailer_mode: Some("SEND"),
            ..Mode::headers_only()
        }
    }

    /// Request and response headers SEND, bodies NONE, trailers SKIP.
    pub fn headers_only() -> Self {
        Self {
            request_header_mode: Some("SEND"),
            response_header_mode: Some("SEND"),
            request_body_mode: Some("NONE"),
            response_body_mode: Some("NONE"),
            request_trailer_mode: Some("SKIP"),
            response_trailer_mode: Some("SKIP"),
        }
    }

    /// Headers SEND and the response body FULL_DUPLEX_STREAMED (trailers SEND, as Envoy
    /// requires for that direction).
    pub fn duplex_response() -> Self {
        Self {
            response_body_mode: Some("FULL_DUPLEX_STREAMED"),
            response_trailer_mode: Some("SEND"),
            ..Self::headers_only()
        }
    }

    /// Headers SEND and the request body BUFFERED.
    pub fn buffered_request() -> Self {
        Self {
            request_body_mode: Some("BUFFERED"),
            ..Self::headers_only()
        }
    }

    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("request_header_mode", self.request_header_mode),
            ("response_header_mode", self.response_header_mode),
            ("request_body_mode", self.request_body_mode),
            ("response_body_mode", self.response_body_mode),
            ("request_trailer_mode", self.request_trailer_mode),
            ("response_trailer_mode", self.response_trailer_mode),
        ] {
            if let Some(v) = v {
                m.insert(k.to_owned(), Value::from(v));
            }
        }
        Value::Object(m)
    }
}

/// One route of the generated bootstrap (all routes go to the upstream).
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub prefix: String,
    /// Route timeout, e.g. `"0s"` for streams.
    pub timeout: Option<String>,
    /// `ExtProcPerRoute.overrides.processing_mode`.
    pub mode: Option<Mode>,
    /// `ExtProcPerRoute.disabled`.
    pub ext_proc_disabled: bool,
}

impl RouteSpec {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            timeout: None,
            mode: None,
            ext_proc_disabled: false,
        }
    }

    pub fn timeout(mut self, t: &str) -> Self {
        self.timeout = Some(t.to_owned());
        self
    }

    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = Some(m);
        self
    }

    pub fn ext_proc_disabled(mut self) -> Self {
        self.ext_proc_disabled = true;
        self
    }
}

/// What the generated Envoy bootstrap contains; modelled on
/// `/work/shared/reference/envoy-ext-proc.yaml`.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Filter-level processing mode.
    pub mode: Mode,
    pub routes: Vec<RouteSpec>,
    pub message_timeout: String,
    pub failure_mode_allow: bool,
    pub allow_mode_override: bool,
    /// Extra runtime keys (the graceful-close key is always on).
    pub runtime: BTreeMap<String, Value>,
}

impl Default for EnvoyOptions {
    /// Headers-only filter; `/sse` → FULL_DUPLEX_STREAMED response with no route timeout;
    /// `/v1/chat/completions` → BUFFERED request; everything else plain.
    fn default() -> Self {
        Self {
            mode: Mode::headers_only(),
            routes: vec![
                RouteSpec::new("/sse")
                    .timeout("0s")
                    .mode(Mode::duplex_response()),
                RouteSpec::new("/v1/chat/completions")
                    .timeout("0s")
                    .mode(Mode::buffered_request()),
                RouteSpec::new("/"),
            ],
            message_timeout: "2s".to_owned(),
            failure_mode_allow: false,
            allow_mode_override: true,
            runtime: BTreeMap::new(),
        }
    }
}

impl EnvoyOptions {
    /// Both bodies in `body_mode` with trailers, filter-wide and on one catch-all route
    /// without a timeout (long streams): how the LLM and guard tests run Envoy.
    pub fn bodies(body_mode: &'static str) -> Self {
        let mode = Mode::bodies(body_mode);
        EnvoyOptions {
            mode: mode.clone(),
            routes: vec![RouteSpec::new("/").timeout("0s").mode(mode)],
            ..EnvoyOptions::default()
        }
    }

    /// The bootstrap as JSON (written out as YAML).
    pub fn bootstrap(&self, listen: u16, admin: u16, grpc: u16, upstream: u16) -> Value {
        let mut runtime = serde_json::Map::new();
        runtime.insert(
            "envoy.reloadable_features.ext_proc_graceful_grpc_close".to_owned(),
            Value::Bool(true),
        );
        for (k, v) in &self.runtime {
            runtime.insert(k.clone(), v.clone());
        }
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut route = json!({"cluster": "upstream"});
                if let Some(t) = &r.timeout {
                    route["timeout"] = Value::from(t.as_str());
                }
                let mut v = json!({"match": {"prefix": r.prefix}, "route": route});
                let per_route = if r.ext_proc_disabled {
                    Some(json!({
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                        "disabled": true
                    }))
                } else {
                    r.mode.as_ref().map(|m| {
                        json!({
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                            "overrides": {"processing_mode": m.to_json()}
                        })
                    })
                };
                if let Some(p) = per_route {
                    v["typed_per_filter_config"] = json!({"envoy.filters.http.ext_proc": p});
                }
                v
            })
            .collect();
        let static_cluster = |name: &str, port: u16| {
            json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": port}
                    }}}]}]
                }
            })
        };
        let mut ext_proc_cluster = static_cluster("ext_proc_cluster", grpc);
        ext_proc_cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "layered_runtime": {"layers": [{"name": "static", "static_layer": runtime}]},
            "static_resources": {
                "listeners": [{
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress_http",
                            // `source.address` is the peer, not X-Forwarded-For's last entry.
                            "use_remote_address": true,
                            "route_config": {"virtual_hosts": [{
                                "name": "e2e",
                                "domains": ["*"],
                                "routes": routes
                            }]},
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.ext_proc",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                                        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc_cluster"}},
                                        "failure_mode_allow": self.failure_mode_allow,
                                        "message_timeout": self.message_timeout,
                                        "allow_mode_override": self.allow_mode_override,
                                        "processing_mode": self.mode.to_json(),
                                        "request_attributes": ["request.path", "request.method", "source.address"],
                                        "response_attributes": ["response.code"],
                                        "metadata_options": {"receiving_namespaces": {"untyped": ["policy"]}}
                                    }
                                },
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    }
                                }
                            ]
                        }
                    }]}]
                }],
                "clusters": [ext_proc_cluster, static_cluster("upstream", upstream)]
            }
        })
    }
}

// ───────────────────────────── processes ─────────────────────────────

/// A running Envoy.
pub struct Envoy {
    proc: Proc,
    /// The HTTP listener clients talk to.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub bootstrap: PathBuf,
}

impl Envoy {
    /// Writes the bootstrap into `dir`, starts Envoy and waits until its admin `/ready` says
    /// LIVE.
    pub async fn start(
        dir: &Path,
        opts: &EnvoyOptions,
        grpc: SocketAddr,
        upstream: SocketAddr,
    ) -> Self {
        let (listen, admin) = (free_port(), free_port());
        let boot = opts.bootstrap(listen, admin, grpc.port(), upstream.port());
        Self::start_bootstrap(dir, &boot, listen, admin).await
    }

    /// Starts Envoy with a bootstrap of the caller's (listening on `listen`, its admin on
    /// `admin`) and waits until it is LIVE: for set-ups [`EnvoyOptions`] does not describe
    /// (several clusters, retries, upstream filters).
    pub async fn start_bootstrap(dir: &Path, boot: &Value, listen: u16, admin: u16) -> Self {
        let bin = envoy_bin();
        let bootstrap = dir.join("envoy.yaml");
        std::fs::write(
            &bootstrap,
            serde_norway::to_string(boot).expect("bootstrap YAML"),
        )
        .expect("write bootstrap");
        // Unique among live Envoys on this machine: this Envoy holds its admin port for
        // its whole life.
        let base_id = u32::from(admin);
        let level = std::env::var("E2E_ENVOY_LOG").unwrap_or_else(|_| "warning".to_owned());
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&bootstrap)
            .args(["--base-id", &base_id.to_string()])
            .args(["--concurrency", "1"])
            .args(["-l", &level]);
        let mut proc = Proc::spawn("envoy", cmd, dir.join("envoy.log"));
        let admin_addr = loopback(admin);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            proc.check_alive();
            if let Ok((200, body)) = raw_get(admin_addr, "/ready").await {
                if body.trim() == "LIVE" {
                    break;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "Envoy did not become LIVE within 15 s (log: {})",
                    proc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            proc,
            listen: loopback(listen),
            admin: admin_addr,
            bootstrap,
        }
    }

    /// Envoy's stats (admin `/stats`) filtered by `filter` (a regex).
    pub async fn stats(&self, filter: &str) -> String {
        raw_get(self.admin, &format!("/stats?filter={filter}"))
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }
}

/// A running `tollgate serve`.
pub struct Tollgate {
    proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Tollgate {
    /// Starts `tollgate serve --config DIR` with `extra` arguments and waits for `/readyz`.
    pub async fn start(config_dir: &Path, log_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(config_dir, log_dir, extra, &[]).await
    }

    /// [`Tollgate::start`] with extra environment variables (`GCE_METADATA_HOST`, ...).
    pub async fn start_with_env(
        config_dir: &Path,
        log_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let (grpc, admin) = (loopback(free_port()), loopback(free_port()));
        let mut cmd = Command::new(tollgate_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(config_dir)
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--store", "memory"])
            .args(extra)
            .env("TOLLGATE_EMBED_MODEL_DIR", embed_model_dir())
            .env(
                "RUST_LOG",
                std::env::var("E2E_TOLLGATE_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("NO_COLOR", "1")
            .env_remove("TOLLGATE_CONFIG")
            .env_remove("TOLLGATE_GRPC_ADDR")
            .env_remove("TOLLGATE_ADMIN_ADDR")
            .envs(env.iter().copied());
        let mut proc = Proc::spawn("tollgate", cmd, log_dir.join("tollgate.log"));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            proc.check_alive();
            if let Ok((200, _)) = raw_get(admin, "/readyz").await {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "tollgate was not ready within 15 s (log: {})",
                    proc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { proc, grpc, admin }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        raw_get(self.admin, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} on the tollgate admin port: {e}"))
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// One sample of `/metrics` (see [`metric`]).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics().await, series)
    }

    /// Waits until `series` has `value`.
    pub async fn wait_metric(&self, series: &str, value: f64, limit: Duration) {
        eventually(limit, &format!("{series} == {value}"), || async {
            (self.metric(series).await == Some(value)).then_some(())
        })
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}

// ───────────────────────────── config directory ─────────────────────────────

/// Writes `text` to `dir/name` atomically (a hidden temporary file renamed over it), as
/// editors and config tools do; tollgate ignores hidden files.
pub fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).expect("create temp file");
        f.write_all(text.as_bytes()).expect("write temp file");
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}

/// A Kubernetes-ConfigMap-style directory: `..<version>/<files>`, `..data -> ..<version>`,
/// and one symlink per key `<file> -> ..data/<file>`. [`ConfigMapDir::swap`] publishes a new
/// version the way the kubelet does (new dir, temporary symlink, rename over `..data`).
pub struct ConfigMapDir {
    pub dir: PathBuf,
}

impl ConfigMapDir {
    pub fn create(dir: &Path, version: &str, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let me = Self {
            dir: dir.to_owned(),
        };
        me.write_version(version, files);
        std::os::unix::fs::symlink(format!("..{version}"), dir.join("..data")).unwrap();
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        me
    }

    fn write_version(&self, version: &str, files: &[(&str, &str)]) {
        let vdir = self.dir.join(format!("..{version}"));
        std::fs::create_dir(&vdir).unwrap();
        for (name, text) in files {
            std::fs::write(vdir.join(name), text).unwrap();
        }
    }

    /// Publishes `version` (same file names as before) atomically.
    pub fn swap(&self, version: &str, files: &[(&str, &str)]) {
        self.write_version(version, files);
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// Runs `tollgate validate DIR`: (exit code, stdout, stderr).
/// Waits for `child` to exit; past `limit`, kills it and panics with `what()`. (Output
/// meant for a pipe must fit in it: it is read after the exit.)
pub fn exit_within(
    child: &mut Child,
    limit: Duration,
    what: impl FnOnce() -> String,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}", what());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn validate(dir: &Path) -> (i32, String, String) {
    let mut child = Command::new(tollgate_bin())
        .arg("validate")
        .arg(dir)
        .env("TOLLGATE_EMBED_MODEL_DIR", embed_model_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate validate");
    let status = exit_within(&mut child, Duration::from_secs(10), || {
        "tollgate validate did not finish within 10 s".into()
    });
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), out, err)
}

// ───────────────────────────── HTTP client ─────────────────────────────

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// For upstream echoes: the header the upstream received.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

/// One body chunk and when it arrived (since the request was sent).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub at: Duration,
    pub data: Bytes,
}

/// An answer read chunk by chunk.
#[derive(Debug)]
pub struct Streamed {
    pub status: u16,
    pub headers: HeaderMap,
    pub chunks: Vec<Chunk>,
    /// When the body ended.
    pub total: Duration,
}

impl Streamed {
    pub fn body(&self) -> Vec<u8> {
        self.chunks
            .iter()
            .flat_map(|c| c.data.iter().copied())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A small HTTP/1.1 client (hyper-util legacy client, no connection reuse) with a
/// per-request deadline.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    pub timeout: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        let inner = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        Self {
            inner,
            timeout: Duration::from_secs(10),
        }
    }

    fn build(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).expect("method"))
            .uri(url);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Full::new(body)).expect("request")
    }

    async fn start(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        match tokio::time::timeout(self.timeout, self.inner.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{what}: {e:?}"),
            Err(_) => panic!("{what}: no answer within {:?}", self.timeout),
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let req = Self::build(method, url, headers, body.into());
        let what = format!("{method} {url}");
        let fut = async {
            let resp = self.start(req).await;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{what}: reading the body: {e:?}"))
                .to_bytes();
            Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => panic!("{what}: not complete within {:?}", self.timeout),
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", url, headers, Bytes::new()).await
    }

    /// Sends a request and reads the answer chunk by chunk, noting when each arrives.
    pub async fn stream(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Streamed {
        let req = Self::build(method, url, headers, body.into());
        let what = format!("{method} {url}");
        let t0 = Instant::now();
        let fut = async {
            let resp = self.start(req).await;
            let (parts, mut body) = resp.into_parts();
            let mut chunks = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.unwrap_or_else(|e| panic!("{what}: reading the body: {e:?}"));
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        chunks.push(Chunk {
                            at: t0.elapsed(),
                            data,
                        });
                    }
                }
            }
            Streamed {
                status: parts.status.as_u16(),
                headers: parts.headers,
                chunks,
                total: t0.elapsed(),
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => panic!("{what}: not complete within {:?}", self.timeout),
        }
    }
}

// ───────────────────────────── the whole bed ─────────────────────────────

/// How to start a [`TestBed`].
#[derive(Debug, Clone)]
pub struct BedOptions {
    /// Files written into the config directory (ignored when `configmap` is set).
    pub files: Vec<(String, String)>,
    /// Lay the config directory out like a mounted ConfigMap, with this first version.
    pub configmap: Option<String>,
    pub envoy: EnvoyOptions,
    /// Extra `tollgate serve` arguments.
    pub tollgate_args: Vec<String>,
}

impl BedOptions {
    /// One file, `flows.yaml`, with `config`; default Envoy; reload every 500 ms.
    pub fn new(config: &str) -> Self {
        Self {
            files: vec![("flows.yaml".to_owned(), config.to_owned())],
            configmap: None,
            envoy: EnvoyOptions::default(),
            tollgate_args: vec!["--reload-interval".to_owned(), "500ms".to_owned()],
        }
    }
}

/// Upstream + tollgate + Envoy, torn down (Envoy first) on drop.
pub struct TestBed {
    // Drop order is declaration order: Envoy, then tollgate, then the upstream, and the
    // directory (config and logs) last.
    pub envoy: Envoy,
    pub tollgate: Tollgate,
    pub upstream: Upstream,
    pub client: HttpClient,
    pub configmap: Option<ConfigMapDir>,
    pub config_dir: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl TestBed {
    /// Default bed: `config` as `flows.yaml`.
    pub async fn start(config: &str) -> Self {
        Self::start_with(BedOptions::new(config)).await
    }

    pub async fn start_with(opts: BedOptions) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-e2e-")
            .tempdir()
            .expect("temp dir");
        let config_dir = tmp.path().join("config");
        let configmap = match &opts.configmap {
            Some(version) => {
                let files: Vec<(&str, &str)> = opts
                    .files
                    .iter()
                    .map(|(n, t)| (n.as_str(), t.as_str()))
                    .collect();
                Some(ConfigMapDir::create(&config_dir, version, &files))
            }
            None => {
                std::fs::create_dir(&config_dir).unwrap();
                for (name, text) in &opts.files {
                    std::fs::write(config_dir.join(name), text).unwrap();
                }
                None
            }
        };
        let upstream = Upstream::start();
        let args: Vec<&str> = opts.tollgate_args.iter().map(String::as_str).collect();
        let tollgate = Tollgate::start(&config_dir, tmp.path(), &args).await;
        let envoy = Envoy::start(tmp.path(), &opts.envoy, tollgate.grpc, upstream.addr).await;
        Self {
            envoy,
            tollgate,
            upstream,
            client: HttpClient::new(),
            configmap,
            config_dir,
            tmp,
        }
    }

    /// `http://<envoy listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.envoy.listen, path)
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client.get(&self.url(path), headers).await
    }

    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.client
            .send("POST", &self.url(path), headers, body)
            .await
    }

    /// Rewrites a config file atomically.
    pub fn write_config(&self, name: &str, text: &str) {
        write_atomic(&self.config_dir, name, text);
    }
}
