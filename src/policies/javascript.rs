//! `JavaScript`: a script (QuickJS through `rquickjs`) run as a step, with Apigee's API.
//!
//! ```yaml
//! spec:
//!   type: JavaScript
//!   source: |                       # or `file: scripts/tag.js` (beside the configuration)
//!     var tier = context.getVariable('jwt.auth.claim.tier') || 'free';
//!     request.setHeader('x-tier', tier);
//!     if (tier === 'banned') throw {status: 403, code: 'custom.Banned', message: 'no'};
//!   timeLimitMs: 50                 # per run (interrupt); default 50, at most 1000
//!   memoryLimitBytes: 8388608       # heap a run may add; default 8 MiB
//!   needsBody: false                # default: true when the source uses .content, .body,
//!                                   # .json(, setContent or setJson
//!   mode: strict                    # or apigee: run as Apigee runs scripts (below)
//!   properties: {salt: pepper}      # Apigee's <Properties>: the script's `properties`
//!   httpClient: {timeoutMs: 1000, maxResponseBytes: 1048576, maxRequests: 4}
//! ```
//!
//! `mode: apigee` (Apigee's JavaScript policy): sloppy mode, so an undeclared assignment
//! makes a global (Rhino's behaviour; strict mode throws `ReferenceError`). Such globals
//! live in an engine of their own whose global object is extensible but whose built-ins are
//! locked, and are deleted after every run; a run that makes them undeletable
//! (`Object.preventExtensions(globalThis)`, a non-configurable property) retires the engine.
//! `response.status` is then Apigee's: a number with a writable `code` and a `message`.
//!
//! In both modes: `request.content = …` / `response.content = …` replace a body,
//! `response.status = n` (or `.status.code = n`) sets the status (200–599), and
//! `context.setVariable` writes `request.content`, `response.content` and
//! `response.status.code` besides the headers (`request.verb` is refused: Envoy's default
//! ext_proc mutation rules drop a method change silently); `properties` (strings);
//! `crypto.getSHA1/getSHA256/getSHA512/getMD5()` with `update(v)`, `digest()` (hex),
//! `digest64()` (base64); `httpClient.get(url[, callback])` and
//! `httpClient.send(new Request(url, method, headers, body)[, callback])` returning an
//! exchange with `waitForComplete()`, `isComplete()`, `isSuccess()` (an answer came, any
//! status), `isError()`, `getResponse()` (`status` with `.code`, `headers`, `content`) and
//! `getError()`. A request starts at once and runs on a runtime of its own; waiting for it
//! blocks only the script's request (the tokio worker's other tasks move to another
//! thread), is bounded by `httpClient.timeoutMs`, and does not count against
//! `timeLimitMs`. Destinations are checked against the operator's callout allow-list
//! (`--callout-allow`, as for ServiceCallout): a refused one throws. A callback is called
//! when the answer is in, before `get`/`send` returns (Apigee calls it later).
//! `print` logs at most 4 KiB a call and 16 KiB a run.
//!
//! In the script (strict mode): `context.getVariable(name)` / `setVariable(name, value)` /
//! `removeVariable(name)` (`request.header.<n>` and `response.header.<n>` set headers),
//! `request` and `response` with `method`, `url`, `path`, `status`, `headers`,
//! `queryParams`, `content` (text), `json()`, `getHeader`, `setHeader`, `removeHeader`,
//! `setContent`, `setJson`; `print(...)` logs. Throwing fails the step with 500
//! `steps.javascript.ScriptExecutionFailed`; throwing `{status, code, message}` fails it
//! with that fault. The limit that stopped a script (time, memory, stack) is named in the
//! fault.
//!
//! Isolation: each worker thread has one runtime and context, made once; the standard
//! objects are deep-frozen and `eval` / `Function` constructors are disabled before any
//! script runs, and scripts are functions whose state is local to one run, so nothing a
//! run does is visible to another request. There is no file, network or timer API.
//! A script is checked at load (syntax, and that its text is exactly one function body)
//! and compiled once per worker thread on first use.
//!
//! Runs are synchronous, on the tokio worker that polls the stream. A run that lasts more
//! than a millisecond hands the worker's other tasks to another thread (`block_in_place`,
//! see [`hand_off_worker`]), so a script looping to its time limit delays only its own
//! request, never other streams or the health checks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use rquickjs::function::Rest;
use rquickjs::{Context, Ctx, Function, Object, Persistent, Runtime, Value as JsValue};
use serde::Deserialize;

use super::{
    check_header_name, parse_spec, read_config_file, valid_header_value, BuildContext, SpecError,
};
use crate::fault::Fault;
use crate::http_client::{HttpClient, HttpError, HttpResponse};
use crate::pipeline::{Direction, Hook, Policy};
use crate::vars::{Exchange, Value, ValueRef};

pub const TYPE: &str = "JavaScript";

const DEFAULT_TIME_LIMIT: Duration = Duration::from_millis(50);
const MAX_TIME_LIMIT: Duration = Duration::from_millis(1000);
const DEFAULT_MEMORY_LIMIT: usize = 8 * 1024 * 1024;
const MAX_STACK: usize = 256 * 1024;
/// How long a run may hold a tokio worker thread before the worker's other tasks are handed
/// to another thread (see [`hand_off_worker`]), and how often that is retried.
const HAND_OFF_AFTER: Duration = Duration::from_millis(1);
const HAND_OFF_RETRY: Duration = Duration::from_millis(2);
/// Longest script accepted.
const MAX_SOURCE: usize = 256 * 1024;

static RUNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_javascript_runs_total",
            "JavaScript runs by policy and result (ok, error, fault, time_limit, memory_limit)",
        ),
        &["policy", "result"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "javascript metric not registered");
    }
    c
});

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    time_limit_ms: Option<u64>,
    #[serde(default)]
    memory_limit_bytes: Option<usize>,
    #[serde(default)]
    needs_body: Option<bool>,
    /// `apigee`: the script runs as Apigee runs it (sloppy mode, see the module docs).
    #[serde(default)]
    mode: Mode,
    /// Apigee's `<Properties>`: the script's `properties` object (strings).
    #[serde(default)]
    properties: std::collections::BTreeMap<String, serde_norway::Value>,
    /// Limits of the script's `httpClient`.
    #[serde(default)]
    http_client: Option<HttpClientSpec>,
}

/// How the script runs.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Mode {
    /// Strict mode; globals frozen.
    #[default]
    Strict,
    /// Apigee's: sloppy mode (undeclared assignments make globals, cleared after the run).
    Apigee,
}

fn default_http_timeout() -> u64 {
    1000
}
fn default_http_max_bytes() -> usize {
    1024 * 1024
}
fn default_http_max_requests() -> usize {
    4
}

/// `httpClient:` limits. Destinations are checked against the operator's callout
/// allow-list (`--callout-allow`) as ServiceCallout's are.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpClientSpec {
    /// Per request, connect to last body byte; waiting for it does not count against
    /// `timeLimitMs`.
    #[serde(default = "default_http_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_http_max_bytes")]
    max_response_bytes: usize,
    /// Requests one run may start.
    #[serde(default = "default_http_max_requests")]
    max_requests: usize,
}

impl Default for HttpClientSpec {
    fn default() -> Self {
        Self {
            timeout_ms: default_http_timeout(),
            max_response_bytes: default_http_max_bytes(),
            max_requests: default_http_max_requests(),
        }
    }
}

/// What a run's `httpClient` may do.
#[derive(Debug, Clone)]
struct HttpLimits {
    timeout: Duration,
    max_bytes: usize,
    max_requests: usize,
    egress: Arc<super::service_callout::Egress>,
}

/// A script ready to run: its wrapped text and limits. Workers compile it on first use.
#[derive(Debug)]
struct Script {
    id: u64,
    /// `function(context,request,response,print){…}`
    wrapped: String,
}

/// The policy's run counters, resolved once (no label hashing per run).
#[derive(Debug)]
struct Counters {
    ok: prometheus::IntCounter,
    fault: prometheus::IntCounter,
    error: prometheus::IntCounter,
    time_limit: prometheus::IntCounter,
    memory_limit: prometheus::IntCounter,
}

#[derive(Debug)]
struct JavaScript {
    name: Arc<str>,
    counters: Counters,
    script: Arc<Script>,
    time_limit: Duration,
    memory_limit: usize,
    needs_body: bool,
    /// The source calls a body setter.
    replaces_body: bool,
    mode: Mode,
    /// `properties`, as (name, value) strings.
    properties: Arc<[(String, String)]>,
    http: HttpLimits,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const PARAMS: &str = "context,request,response,print";

/// The script as one function. `properties`, `crypto`, `httpClient` and `Request` are
/// globals, not parameters: a script that declares its own `crypto` still compiles.
fn wrap(source: &str, mode: Mode) -> String {
    let strict = match mode {
        Mode::Strict => "\"use strict\";",
        Mode::Apigee => "",
    };
    format!("function({PARAMS}){{{strict}{source}\n}}")
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let spec_file = spec.file.as_ref().map(|f| match &ctx.config_dir {
        Some(d) if std::path::Path::new(f).is_relative() => d.join(f).display().to_string(),
        _ => f.clone(),
    });
    let source = match (spec.source, spec.file) {
        (Some(s), None) => s,
        (None, Some(f)) => {
            let bytes = read_config_file(ctx, "file", &f)?;
            String::from_utf8(bytes).map_err(|_| SpecError::new("file", "not UTF-8 text"))?
        }
        _ => return Err(SpecError::new("", "give source or file")),
    };
    if source.len() > MAX_SOURCE {
        return Err(SpecError::new(
            "source",
            format!("longer than {MAX_SOURCE} bytes"),
        ));
    }
    let time_limit = spec
        .time_limit_ms
        .map_or(DEFAULT_TIME_LIMIT, Duration::from_millis);
    if time_limit.is_zero() || time_limit > MAX_TIME_LIMIT {
        return Err(SpecError::new("timeLimitMs", "between 1 and 1000"));
    }
    let memory_limit = spec.memory_limit_bytes.unwrap_or(DEFAULT_MEMORY_LIMIT);
    if !(64 * 1024..=256 * 1024 * 1024).contains(&memory_limit) {
        return Err(SpecError::new(
            "memoryLimitBytes",
            "between 65536 and 268435456",
        ));
    }
    let wrapped = wrap(&source, spec.mode);
    check_compiles(&wrapped, spec.mode).map_err(|m| match &spec_file {
        // Name the script file, so `line N` points somewhere an editor can open.
        Some(path) => SpecError::new("file", format!("{path}: {m}")),
        None => SpecError::new("source", m),
    })?;
    let needs_body = spec.needs_body.unwrap_or_else(|| {
        // `.content`, not `content`: reading `content-type` needs no body.
        [".content", ".body", ".json(", "setContent", "setJson"]
            .iter()
            .any(|w| source.contains(w))
    });
    let replaces_body =
        ["setContent", "setJson"].iter().any(|w| source.contains(w)) || assigns_content(&source);
    let mut properties = Vec::with_capacity(spec.properties.len());
    for (k, v) in &spec.properties {
        let v = match v {
            serde_norway::Value::String(s) => s.clone(),
            serde_norway::Value::Number(n) => n.to_string(),
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Null => String::new(),
            _ => {
                return Err(SpecError::new(
                    format!("properties.{k}"),
                    "a property is a string, number or boolean",
                ))
            }
        };
        properties.push((k.clone(), v));
    }
    let http_spec = spec.http_client.unwrap_or_default();
    if http_spec.timeout_ms == 0 || http_spec.timeout_ms > 10_000 {
        return Err(SpecError::new(
            "httpClient.timeoutMs",
            "between 1 and 10000",
        ));
    }
    if http_spec.max_response_bytes == 0 || http_spec.max_response_bytes > 16 * 1024 * 1024 {
        return Err(SpecError::new(
            "httpClient.maxResponseBytes",
            "between 1 and 16777216",
        ));
    }
    if http_spec.max_requests > 16 {
        return Err(SpecError::new("httpClient.maxRequests", "at most 16"));
    }
    let counter = |r: &str| RUNS.with_label_values(&[ctx.name.as_str(), r]);
    Ok(Arc::new(JavaScript {
        name: ctx.name.as_str().into(),
        counters: Counters {
            ok: counter("ok"),
            fault: counter("fault"),
            error: counter("error"),
            time_limit: counter("time_limit"),
            memory_limit: counter("memory_limit"),
        },
        script: Arc::new(Script {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            wrapped,
        }),
        time_limit,
        memory_limit,
        needs_body,
        replaces_body,
        mode: spec.mode,
        properties: properties.into(),
        http: HttpLimits {
            timeout: Duration::from_millis(http_spec.timeout_ms),
            max_bytes: http_spec.max_response_bytes,
            max_requests: http_spec.max_requests,
            egress: Arc::clone(&ctx.services.egress),
        },
    }))
}

/// Whether the source may write a body other than through `setContent` / `setJson`:
/// `x.content = …` or `context.setVariable('request.content' | 'response.content', …)`.
fn assigns_content(source: &str) -> bool {
    static ASSIGN: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r#"\.content\s*=([^=]|$)|(request|response)\.content['"]\s*,"#)
            .expect("valid regex")
    });
    ASSIGN.is_match(source)
}

/// Compiles the script in a throwaway worker: a syntax error, or text that is not exactly
/// one function body (a `})(); … (function(){` escape), is refused here, at load.
fn check_compiles(wrapped: &str, mode: Mode) -> Result<(), String> {
    let w = Worker::new(mode).map_err(|e| format!("JavaScript engine: {e}"))?;
    w.deadline(Duration::from_millis(200));
    let r = w.ctx.with(|ctx| compile(&ctx, &w.api, wrapped).map(|_| ()));
    w.clear_deadline();
    r
}

/// Compiles `wrapped` with the prelude's private compiler. A source that closes the
/// function early yields a different function (or none): its text would not match.
fn compile<'js>(
    ctx: &Ctx<'js>,
    api: &Persistent<Object<'static>>,
    wrapped: &str,
) -> Result<Function<'js>, String> {
    let api = api.clone().restore(ctx).map_err(|e| e.to_string())?;
    let compiler: Function = api.get("compile").map_err(|e| e.to_string())?;
    let r: rquickjs::Result<Function> = compiler.call((wrapped,));
    let f = r.map_err(|e| match e {
        rquickjs::Error::Exception => {
            let v = ctx.catch();
            let text = js_error_text(&v);
            match v
                .as_exception()
                .and_then(|ex| ex.stack())
                .and_then(|st| source_line(&st))
            {
                Some(line) => format!("line {line}: {text}"),
                None => text,
            }
        }
        other => other.to_string(),
    })?;
    let text: String = f
        .get::<_, Function>("toString")
        .and_then(|ts| ts.call((rquickjs::function::This(f.clone()),)))
        .map_err(|e| e.to_string())?;
    if text != wrapped {
        return Err("the source must be one function body (it closes the function early)".into());
    }
    Ok(f)
}

/// Lines the compiler puts before the script's first line: `Function` wraps its body in
/// `(function anonymous(\n) {\n`, and the script's first line shares the line of
/// `return (function(...){"use strict";`.
const COMPILE_LINE_OFFSET: usize = 2;

/// The script line a compile error's stack points at (`at <input>:LINE:COL`).
fn source_line(stack: &str) -> Option<usize> {
    let at = stack.lines().find_map(|l| l.trim().strip_prefix("at "))?;
    let mut parts = at.rsplitn(3, ':');
    let (_col, line) = (parts.next()?, parts.next()?);
    let line: usize = line.trim().parse().ok()?;
    line.checked_sub(COMPILE_LINE_OFFSET).filter(|&l| l > 0)
}

fn js_error_text(v: &JsValue<'_>) -> String {
    if let Some(ex) = v.as_exception() {
        let name: String = ex.get("name").unwrap_or_else(|_| "Error".into());
        return format!("{name}: {}", ex.message().unwrap_or_default());
    }
    if let Some(s) = v.as_string() {
        return s.to_string().unwrap_or_default();
    }
    if let Some(o) = v.as_object() {
        if let Ok(m) = o.get::<_, String>("message") {
            return m;
        }
    }
    format!("{:?}", v.type_of())
}

// ───────────────────────────── per-thread engine ─────────────────────────────

/// What a run's host functions act on: the exchange, moved in for the run.
struct Current {
    ex: Exchange,
    dir: Direction,
    policy: Arc<str>,
    http: HttpLimits,
    /// The run's `httpClient` requests, by id; taken when waited for.
    pending: Vec<Pending>,
    /// The worker's deadline: pushed back by the time a run waits for a request.
    deadline: Arc<AtomicU64>,
    /// Bytes `print` logged in this run.
    printed: usize,
    /// The policy's `properties`.
    properties: Arc<[(String, String)]>,
}

/// One `httpClient` request of a run.
enum Pending {
    Waiting(std::sync::mpsc::Receiver<Result<HttpResponse, HttpError>>),
    /// The answer, seen by `isComplete` before the script waited for it.
    Ready(Result<HttpResponse, String>),
    /// Handed to the script.
    Taken,
}

/// Most `print` output one run logs; the rest is dropped (with one note).
const MAX_PRINT_PER_RUN: usize = 16 * 1024;

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
    /// Apigee-mode scripts run in their own engine: its global object is not frozen.
    static APIGEE_WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// The runtime `httpClient` requests run on: a script waits for them synchronously, so
/// they cannot run on the runtime whose worker thread the script holds.
static HTTP_RUNTIME: LazyLock<Option<tokio::runtime::Runtime>> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-js-http")
        .enable_all()
        .build()
        .map_err(|e| tracing::error!(error = %e, "JavaScript httpClient runtime not started"))
        .ok()
});

/// `httpClient`'s connection pool (on [`HTTP_RUNTIME`]).
static HTTP_CLIENT: LazyLock<HttpClient> = LazyLock::new(HttpClient::new);

/// Starts one `httpClient` request; its result arrives on the receiver.
fn http_start(
    cur: &Current,
    method: &str,
    url: &str,
    headers_json: &str,
    body: Option<String>,
) -> Result<std::sync::mpsc::Receiver<Result<HttpResponse, HttpError>>, String> {
    super::service_callout::check_url(url, &cur.http.egress)
        .map_err(|m| format!("httpClient: {url}: {m}"))?;
    let method = hyper::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("httpClient: bad method `{method}`"))?;
    let headers: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(headers_json).map_err(|_| "httpClient: headers must be an object")?;
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (n, v) in headers {
        let v = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let n = check_header_name(&n).map_err(|m| format!("httpClient: {m}"))?;
        if !valid_header_value(&v) {
            return Err("httpClient: header values may not contain CR, LF or NUL".into());
        }
        req = req.header(n, v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|e| format!("httpClient: {e}"))?;
    let rt = HTTP_RUNTIME
        .as_ref()
        .ok_or("httpClient: no runtime to send requests on")?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (timeout, max) = (cur.http.timeout, cur.http.max_bytes);
    rt.spawn(async move {
        let r = HTTP_CLIENT.send(req, false, timeout, max).await;
        let _ = tx.send(r);
    });
    Ok(rx)
}

/// Waits for a request a script started: the thread blocks, so on a tokio worker its
/// other tasks are handed to another thread first (`block_in_place`).
fn http_wait(
    rx: &std::sync::mpsc::Receiver<Result<HttpResponse, HttpError>>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    // The request's own timeout ends it; the margin only covers the hand-over.
    let wait = || match rx.recv_timeout(timeout + Duration::from_millis(500)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("timed out after {timeout:?}")),
    };
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if !multi {
        return wait();
    }
    // A panic must not unwind into QuickJS (it would abort the process).
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::block_in_place(wait)
    }))
    .unwrap_or_else(|_| Err("the wait failed".into()))
}

/// `crypto`'s digests of the concatenated parts.
fn hash(alg: &str, parts: &[String], encoding: &str) -> Option<String> {
    use sha2::Digest;
    fn run<D: Digest>(parts: &[String]) -> Vec<u8> {
        let mut d = D::new();
        for p in parts {
            d.update(p.as_bytes());
        }
        d.finalize().to_vec()
    }
    let bytes = match alg {
        "sha256" => run::<sha2::Sha256>(parts),
        "sha512" => run::<sha2::Sha512>(parts),
        "md5" => run::<md5::Md5>(parts),
        "sha1" => {
            let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
            for p in parts {
                c.update(p.as_bytes());
            }
            c.finish().as_ref().to_vec()
        }
        _ => return None,
    };
    Some(match encoding {
        "base64" => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(bytes)
        }
        _ => crate::cache::hex(&bytes),
    })
}

fn with_current<R>(
    ctx: &Ctx<'_>,
    f: impl FnOnce(&mut Current) -> rquickjs::Result<R>,
) -> rquickjs::Result<R> {
    CURRENT.with(|c| match c.borrow_mut().as_mut() {
        Some(cur) => f(cur),
        None => Err(rquickjs::Exception::throw_internal(
            ctx,
            "no request in progress",
        )),
    })
}

fn dir_of(ctx: &Ctx<'_>, cur: &Current, d: &str) -> rquickjs::Result<Direction> {
    match d {
        "request" => Ok(Direction::Request),
        "response" if cur.ex.response.is_some() || cur.dir == Direction::Response => {
            Ok(Direction::Response)
        }
        "response" => Err(rquickjs::Exception::throw_type(
            ctx,
            "there is no response yet",
        )),
        _ => Err(rquickjs::Exception::throw_type(ctx, "bad message")),
    }
}

fn to_js<'js>(ctx: &Ctx<'js>, v: ValueRef<'_>) -> rquickjs::Result<JsValue<'js>> {
    Ok(match v {
        ValueRef::Str(s) => rquickjs::String::from_str(ctx.clone(), s)?.into_value(),
        ValueRef::Int(i) => JsValue::new_number(ctx.clone(), i as f64),
        ValueRef::Float(f) => JsValue::new_number(ctx.clone(), f),
        ValueRef::Bool(b) => JsValue::new_bool(ctx.clone(), b),
    })
}

fn from_js(v: &JsValue<'_>) -> Option<Value> {
    if let Some(b) = v.as_bool() {
        return Some(Value::Bool(b));
    }
    if let Some(i) = v.as_int() {
        return Some(Value::Int(i64::from(i)));
    }
    if let Some(f) = v.as_float() {
        if f.fract() == 0.0 && f.abs() < 9.0e15 {
            return Some(Value::Int(f as i64));
        }
        return Some(Value::Float(f));
    }
    if let Some(s) = v.as_string() {
        return s.to_string().ok().map(Value::Str);
    }
    None
}

/// Host functions, made once per worker; they act on [`CURRENT`].
fn host<'js>(ctx: &Ctx<'js>) -> rquickjs::Result<Object<'js>> {
    let h = Object::new(ctx.clone())?;
    h.set(
        "get",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, name: String| -> rquickjs::Result<JsValue<'js>> {
                with_current(&ctx, |cur| {
                    if let Some(v) = cur.ex.var(&name) {
                        return to_js(&ctx, v);
                    }
                    match cur.ex.lookup(&name) {
                        Some(s) => to_js(&ctx, ValueRef::Str(&s)),
                        None => Ok(JsValue::new_null(ctx.clone())),
                    }
                })
            },
        )?,
    )?;
    h.set(
        "set",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, name: String, v: JsValue<'js>| {
                with_current(&ctx, |cur| {
                    for (prefix, d) in [
                        ("request.header.", Direction::Request),
                        ("response.header.", Direction::Response),
                    ] {
                        if let Some(h) = name.strip_prefix(prefix) {
                            let val = from_js(&v).map(|v| v.to_string()).unwrap_or_default();
                            return set_header(&ctx, cur, d, h, &val);
                        }
                    }
                    if let Some(r) = set_message_variable(&ctx, cur, &name, &v) {
                        return r;
                    }
                    if name.is_empty()
                        || name.starts_with("request.")
                        || name.starts_with("response.")
                    {
                        return Err(rquickjs::Exception::throw_type(
                            &ctx,
                            &format!("`{name}` is read-only"),
                        ));
                    }
                    match from_js(&v) {
                        Some(val) => cur.ex.set_var(name, val),
                        None if v.is_null() || v.is_undefined() => {
                            cur.ex.vars.remove(&name);
                        }
                        None => {
                            return Err(rquickjs::Exception::throw_type(
                                &ctx,
                                "variables hold strings, numbers and booleans (use JSON.stringify)",
                            ))
                        }
                    }
                    Ok(())
                })
            },
        )?,
    )?;
    h.set(
        "remove",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, name: String| {
            with_current(&ctx, |cur| {
                cur.ex.vars.remove(&name);
                Ok(())
            })
        })?,
    )?;
    h.set(
        "info",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, what: String| -> rquickjs::Result<JsValue<'js>> {
                with_current(&ctx, |cur| {
                    let r = &cur.ex.request;
                    let s: Option<String> = match what.as_str() {
                        "method" => Some(r.method.clone()),
                        "url" => Some(r.uri.clone()),
                        "path" => Some(r.path().to_owned()),
                        "host" => Some(r.host.clone()),
                        "flow" => Some(cur.ex.flow.clone()),
                        "reason" => cur.ex.response.as_ref().map(|r| {
                            hyper::StatusCode::from_u16(r.status)
                                .ok()
                                .and_then(|s| s.canonical_reason())
                                .unwrap_or_default()
                                .to_owned()
                        }),
                        "status" => {
                            return Ok(match &cur.ex.response {
                                Some(resp) => JsValue::new_int(ctx.clone(), i32::from(resp.status)),
                                None => JsValue::new_undefined(ctx.clone()),
                            })
                        }
                        _ => None,
                    };
                    match s {
                        Some(s) => to_js(&ctx, ValueRef::Str(&s)),
                        None => Ok(JsValue::new_undefined(ctx.clone())),
                    }
                })
            },
        )?,
    )?;
    h.set(
        "headers",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, d: String| -> rquickjs::Result<Object<'js>> {
                with_current(&ctx, |cur| {
                    let o = Object::new(ctx.clone())?;
                    let headers = match dir_of(&ctx, cur, &d)? {
                        Direction::Request => Some(&cur.ex.request.headers),
                        Direction::Response => cur.ex.response.as_ref().map(|r| &r.headers),
                    };
                    for (n, v) in headers.into_iter().flat_map(|h| h.iter()) {
                        if n.starts_with(':') {
                            continue;
                        }
                        let joined = match o.get::<_, Option<String>>(n)? {
                            Some(prev) => format!("{prev}, {v}"),
                            None => v.to_owned(),
                        };
                        o.set(n, joined)?;
                    }
                    Ok(o)
                })
            },
        )?,
    )?;
    h.set(
        "query",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>| -> rquickjs::Result<Object<'js>> {
                with_current(&ctx, |cur| {
                    let o = Object::new(ctx.clone())?;
                    for (k, v) in crate::vars::query_pairs(cur.ex.request.query_string()) {
                        if !o.contains_key(k.as_str())? {
                            o.set(k, v)?;
                        }
                    }
                    Ok(o)
                })
            },
        )?,
    )?;
    h.set(
        "setHeader",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, d: String, name: String, value: String| {
                with_current(&ctx, |cur| {
                    let d = dir_of(&ctx, cur, &d)?;
                    set_header(&ctx, cur, d, &name, &value)
                })
            },
        )?,
    )?;
    h.set(
        "removeHeader",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, d: String, name: String| {
            with_current(&ctx, |cur| {
                let d = dir_of(&ctx, cur, &d)?;
                let name = check_header_name(&name)
                    .map_err(|m| rquickjs::Exception::throw_type(&ctx, &m))?;
                cur.ex.remove_header(d, &name);
                Ok(())
            })
        })?,
    )?;
    h.set(
        "body",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, d: String| -> rquickjs::Result<JsValue<'js>> {
                with_current(&ctx, |cur| {
                    let body = match dir_of(&ctx, cur, &d)? {
                        Direction::Request => cur.ex.request_body.as_deref(),
                        Direction::Response => cur.ex.response_body.as_deref(),
                    };
                    match body {
                        Some(b) => to_js(&ctx, ValueRef::Str(&String::from_utf8_lossy(b))),
                        None => Ok(JsValue::new_undefined(ctx.clone())),
                    }
                })
            },
        )?,
    )?;
    h.set(
        "setBody",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, d: String, text: String| {
            with_current(&ctx, |cur| {
                let d = dir_of(&ctx, cur, &d)?;
                let has = match d {
                    Direction::Request => cur.ex.request_body.is_some(),
                    Direction::Response => cur.ex.response_body.is_some(),
                };
                if !has {
                    return Err(rquickjs::Exception::throw_type(
                        &ctx,
                        "the body is not available in this phase (set needsBody: true)",
                    ));
                }
                cur.ex.replace_body(d, text.into_bytes());
                Ok(())
            })
        })?,
    )?;
    h.set(
        "properties",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>| -> rquickjs::Result<Object<'js>> {
                with_current(&ctx, |cur| {
                    let o = Object::new(ctx.clone())?;
                    for (k, v) in cur.properties.iter() {
                        o.set(k.as_str(), v.as_str())?;
                    }
                    Ok(o)
                })
            },
        )?,
    )?;
    h.set(
        "setStatus",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, d: String, code: f64| {
            with_current(&ctx, |cur| {
                if dir_of(&ctx, cur, &d)? != Direction::Response {
                    return Err(rquickjs::Exception::throw_type(
                        &ctx,
                        "only a response has a status",
                    ));
                }
                set_status(&ctx, cur, code)
            })
        })?,
    )?;
    h.set(
        "hash",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, alg: String, parts: Vec<String>, enc: String| {
                hash(&alg, &parts, &enc).ok_or_else(|| {
                    rquickjs::Exception::throw_type(&ctx, &format!("unknown hash `{alg}`"))
                })
            },
        )?,
    )?;
    h.set(
        "httpSend",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, method: String, url: String, headers: String, body: Option<String>| {
                with_current(&ctx, |cur| {
                    if cur.pending.len() >= cur.http.max_requests {
                        return Err(rquickjs::Exception::throw_range(
                            &ctx,
                            &format!(
                                "httpClient: at most {} requests per run",
                                cur.http.max_requests
                            ),
                        ));
                    }
                    let rx = http_start(cur, &method, &url, &headers, body)
                        .map_err(|m| rquickjs::Exception::throw_type(&ctx, &m))?;
                    cur.pending.push(Pending::Waiting(rx));
                    tracing::debug!(policy = %cur.policy, %method, %url, "httpClient request");
                    Ok(cur.pending.len() - 1)
                })
            },
        )?,
    )?;
    h.set(
        "httpReady",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, id: usize| {
            with_current(&ctx, |cur| {
                // A look that does not wait; an answer found is kept for the wait.
                let Some(p) = cur.pending.get_mut(id) else {
                    return Ok(false);
                };
                if let Pending::Waiting(rx) = p {
                    match rx.try_recv() {
                        Ok(r) => *p = Pending::Ready(r.map_err(|e| e.to_string())),
                        Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(false),
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            *p = Pending::Ready(Err("the request was dropped".into()))
                        }
                    }
                }
                Ok(true)
            })
        })?,
    )?;
    h.set(
        "httpWait",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, id: usize| -> rquickjs::Result<Object<'js>> {
                let (p, timeout, deadline) = with_current(&ctx, |cur| {
                    let p = cur
                        .pending
                        .get_mut(id)
                        .map(|p| std::mem::replace(p, Pending::Taken));
                    Ok((p, cur.http.timeout, Arc::clone(&cur.deadline)))
                })?;
                let started = Instant::now();
                let result = match p {
                    Some(Pending::Waiting(rx)) => http_wait(&rx, timeout),
                    Some(Pending::Ready(r)) => r,
                    _ => {
                        return Err(rquickjs::Exception::throw_type(
                            &ctx,
                            "httpClient: no such request",
                        ))
                    }
                };
                // Waiting is not running: the script's time limit is pushed back by it.
                let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let _ = deadline.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    (d != 0).then(|| d.saturating_add(waited))
                });
                let o = Object::new(ctx.clone())?;
                match result {
                    Ok(r) => {
                        o.set("status", r.status)?;
                        let headers = Object::new(ctx.clone())?;
                        for (n, v) in &r.headers {
                            let v = String::from_utf8_lossy(v.as_bytes());
                            let joined = match headers.get::<_, Option<String>>(n.as_str())? {
                                Some(prev) => format!("{prev}, {v}"),
                                None => v.into_owned(),
                            };
                            headers.set(n.as_str(), joined)?;
                        }
                        o.set("headers", headers)?;
                        o.set("content", String::from_utf8_lossy(&r.body).into_owned())?;
                    }
                    Err(e) => o.set("error", e)?,
                }
                Ok(o)
            },
        )?,
    )?;
    h.set(
        "print",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, parts: Rest<String>| {
            with_current(&ctx, |cur| {
                if cur.printed >= MAX_PRINT_PER_RUN {
                    return Ok(());
                }
                let msg = parts.0.join(" ");
                let mut end = msg.len().min(4096).min(MAX_PRINT_PER_RUN - cur.printed);
                while !msg.is_char_boundary(end) {
                    end -= 1;
                }
                cur.printed += end.max(1);
                tracing::info!(policy = %cur.policy, flow = %cur.ex.flow, "{}", &msg[..end]);
                if cur.printed >= MAX_PRINT_PER_RUN {
                    tracing::info!(policy = %cur.policy, "print: {MAX_PRINT_PER_RUN} bytes logged in this run; the rest is dropped");
                }
                Ok(())
            })
        })?,
    )?;
    Ok(h)
}

/// `context.setVariable` on the message variables Apigee lets a script write: the bodies
/// and the response status. `None`: not one of them.
fn set_message_variable(
    ctx: &Ctx<'_>,
    cur: &mut Current,
    name: &str,
    v: &JsValue<'_>,
) -> Option<rquickjs::Result<()>> {
    let text = || from_js(v).map(|v| v.to_string()).unwrap_or_default();
    Some(match name {
        "request.content" | "response.content" => (|| {
            let d = dir_of(ctx, cur, name.split('.').next().unwrap_or_default())?;
            let has = match d {
                Direction::Request => cur.ex.request_body.is_some(),
                Direction::Response => cur.ex.response_body.is_some(),
            };
            if !has {
                return Err(rquickjs::Exception::throw_type(
                    ctx,
                    "the body is not available in this phase (set needsBody: true)",
                ));
            }
            cur.ex.replace_body(d, text().into_bytes());
            Ok(())
        })(),
        "response.status.code" => match from_js(v) {
            Some(Value::Int(i)) => set_status(ctx, cur, i as f64),
            Some(Value::Str(s)) => match s.trim().parse::<u16>() {
                Ok(n) => set_status(ctx, cur, f64::from(n)),
                Err(_) => Err(rquickjs::Exception::throw_type(ctx, "a status is a number")),
            },
            _ => Err(rquickjs::Exception::throw_type(ctx, "a status is a number")),
        },
        // Envoy's default ext_proc mutation rules drop a `:method` change silently
        // (`allow_all_routing`): refused here rather than ignored there.
        "request.verb" => Err(rquickjs::Exception::throw_type(
            ctx,
            "`request.verb` is read-only here: Envoy does not let an ext_proc server change the method",
        )),
        _ => return None,
    })
}

/// Sets the response's status (the `:status` Envoy sends on).
fn set_status(ctx: &Ctx<'_>, cur: &mut Current, code: f64) -> rquickjs::Result<()> {
    if cur.ex.response.is_none() {
        return Err(rquickjs::Exception::throw_type(
            ctx,
            "there is no response yet",
        ));
    }
    if code.fract() != 0.0 || !(200.0..=599.0).contains(&code) {
        return Err(rquickjs::Exception::throw_range(
            ctx,
            "a response status is a whole number from 200 to 599",
        ));
    }
    let code = code as u16;
    cur.ex
        .set_header(Direction::Response, ":status", code.to_string());
    if let Some(r) = cur.ex.response.as_mut() {
        r.status = code;
    }
    Ok(())
}

fn set_header(
    ctx: &Ctx<'_>,
    cur: &mut Current,
    d: Direction,
    name: &str,
    value: &str,
) -> rquickjs::Result<()> {
    let name = check_header_name(name).map_err(|m| rquickjs::Exception::throw_type(ctx, &m))?;
    if !valid_header_value(value) {
        return Err(rquickjs::Exception::throw_type(
            ctx,
            "header values may not contain CR, LF or NUL",
        ));
    }
    cur.ex.set_header(d, &name, value.to_owned());
    Ok(())
}

/// Builds the script API around the host functions, keeps a private compiler, disables
/// string compilation and deep-freezes everything reachable from the global object.
const PRELUDE: &str = r#"(function (h, apigee) {
"use strict";
const compileFn = Function;
const str = (x) => (typeof x === 'string' ? x : JSON.stringify(x));
// Apigee's status: a number that also has `code` (writable on the response) and `message`.
function status(d) {
  const code = h.info('status');
  if (code === undefined) return undefined;
  const n = new Number(code);
  Object.defineProperty(n, 'code', { get() { return h.info('status'); }, set(v) { h.setStatus(d, Number(v)); } });
  Object.defineProperty(n, 'message', { get() { return h.info('reason'); } });
  return n;
}
function message(d) {
  return {
    get headers() { return h.headers(d); },
    getHeader(n) { const v = h.headers(d)[String(n).toLowerCase()]; return v === undefined ? null : v; },
    setHeader(n, v) { h.setHeader(d, String(n), String(v)); },
    removeHeader(n) { h.removeHeader(d, String(n)); },
    get content() { return h.body(d); },
    set content(s) { h.setBody(d, String(s)); },
    get body() { return h.body(d); },
    json() { const c = h.body(d); return c === undefined ? undefined : JSON.parse(c); },
    setContent(s) { h.setBody(d, String(s)); },
    setJson(o) { h.setBody(d, JSON.stringify(o)); },
  };
}
const request = message('request');
Object.defineProperties(request, {
  method: { get() { return h.info('method'); } },
  url: { get() { return h.info('url'); } },
  path: { get() { return h.info('path'); } },
  host: { get() { return h.info('host'); } },
  queryParams: { get() { return h.query(); } },
});
const response = message('response');
Object.defineProperty(response, 'status', {
  get() { return apigee ? status('response') : h.info('status'); },
  set(v) { h.setStatus('response', Number(v)); },
});
const context = {
  getVariable(n) { return h.get(String(n)); },
  setVariable(n, v) { h.set(String(n), v); },
  removeVariable(n) { h.remove(String(n)); },
  get flow() { return h.info('flow'); },
  proxyRequest: request, proxyResponse: response,
  targetRequest: request, targetResponse: response,
};
const print = (...a) => h.print(...a.map(str));
// Apigee's crypto: hash objects fed with update(), read with digest() (hex) or digest64().
function hasher(alg) {
  const parts = [];
  return {
    update(v) { parts.push(str(v)); return this; },
    digest() { return h.hash(alg, parts, 'hex'); },
    digest64() { return h.hash(alg, parts, 'base64'); },
  };
}
const crypto = {
  getSHA1() { return hasher('sha1'); },
  getSHA256() { return hasher('sha256'); },
  getSHA512() { return hasher('sha512'); },
  getMD5() { return hasher('md5'); },
};
// Apigee's httpClient: the call starts at once; waitForComplete (or any read) waits for it.
function Request(url, method, headers, body) {
  if (!(this instanceof Request)) return new Request(url, method, headers, body);
  this.url = url; this.method = method || 'GET'; this.headers = headers || {}; this.body = body;
}
function httpResponse(r) {
  const n = new Number(r.status);
  n.code = r.status;
  return { status: n, headers: r.headers, content: r.content,
    getHeader(k) { const v = r.headers[String(k).toLowerCase()]; return v === undefined ? null : v; } };
}
function exchange(id, cb) {
  let done = null;
  const wait = () => { if (done === null) done = h.httpWait(id); return done; };
  const x = {
    waitForComplete() { wait(); },
    isComplete() { return done !== null || h.httpReady(id); },
    isSuccess() { return !wait().error; },
    isError() { return !!wait().error; },
    getResponse() { const r = wait(); return r.error ? undefined : httpResponse(r); },
    getError() { return wait().error || null; },
  };
  if (typeof cb === 'function') { const r = wait(); cb(r.error ? undefined : httpResponse(r), r.error || undefined); }
  return x;
}
const sendOne = (method, url, headers, body, cb) =>
  exchange(h.httpSend(String(method).toUpperCase(), String(url), JSON.stringify(headers || {}),
    body === undefined || body === null ? null : String(body)), cb);
const httpClient = {
  get(url, cb) { return sendOne('GET', url, {}, null, cb); },
  send(req, cb) { return sendOne(req.method || 'GET', req.url, req.headers, req.body, cb); },
};
const compile = (text) => compileFn('return (' + text + ')')();
const blocked = function () { throw new EvalError('code generation from strings is disabled'); };
for (const f of [function () {}, async function () {}, function* () {}, async function* () {}]) {
  Object.defineProperty(Object.getPrototypeOf(f), 'constructor', { value: blocked });
}
blocked.prototype = Function.prototype;
globalThis.Function = blocked;
delete globalThis.eval;
const seen = new Set();
const harden = (o) => {
  if (o === null || (typeof o !== 'object' && typeof o !== 'function') || seen.has(o)) return;
  seen.add(o);
  Object.freeze(o);
  for (const k of Reflect.ownKeys(o)) {
    const d = Object.getOwnPropertyDescriptor(o, k);
    if (!d) continue;
    if ('value' in d) harden(d.value); else { harden(d.get); harden(d.set); }
  }
  harden(Object.getPrototypeOf(o));
};
// Globals, not parameters (a script may declare these names itself); `properties` is the
// running policy's.
Object.defineProperties(globalThis, {
  crypto: { value: crypto, enumerable: false },
  httpClient: { value: httpClient, enumerable: false },
  Request: { value: Request, enumerable: false },
  properties: { get() { return Object.freeze(h.properties()); }, enumerable: false },
});
const api = [context, request, response, print, crypto, httpClient, Request, blocked];
// Sloppy scripts (Apigee's) create globals by assigning undeclared names: the global
// object stays extensible, its own properties are locked, and `reset` deletes whatever a
// run added. Strict scripts cannot create globals: the global object is frozen.
let base = null;
if (apigee) {
  seen.add(globalThis);
  for (const k of Reflect.ownKeys(globalThis)) {
    const d = Object.getOwnPropertyDescriptor(globalThis, k);
    if ('value' in d) harden(d.value); else { harden(d.get); harden(d.set); }
    const lock = { configurable: false };
    if ('value' in d) lock.writable = false;
    Object.defineProperty(globalThis, k, lock);
  }
  harden(Object.getPrototypeOf(globalThis));
  base = new Set(Reflect.ownKeys(globalThis));
} else {
  api.push(globalThis);
}
for (const o of api) harden(o);
const reset = () => {
  if (base === null) return true;
  if (!Object.isExtensible(globalThis)) return false;
  for (const k of Reflect.ownKeys(globalThis)) {
    if (!base.has(k) && !Reflect.deleteProperty(globalThis, k)) return false;
  }
  return true;
};
return { context, request, response, print, compile, reset };
})"#;

struct Worker {
    // Field order is drop order: JS values before their context and runtime.
    scripts: HashMap<u64, (Weak<Script>, Persistent<Function<'static>>)>,
    api: Persistent<Object<'static>>,
    ctx: Context,
    rt: Runtime,
    epoch: Instant,
    /// Nanoseconds since `epoch` after which the run is interrupted; 0: no run.
    deadline: Arc<AtomicU64>,
    /// Nanoseconds since `epoch` after which the run hands its worker's other tasks to
    /// another thread; 0: not (again) during this run.
    hand_off_at: Arc<AtomicU64>,
    interrupted: Arc<AtomicBool>,
    /// Heap in use with every compiled script loaded, the base of each run's limit.
    baseline: usize,
    /// A run left the global object in a state `reset` could not undo: the worker is
    /// dropped and a fresh one made for the next run.
    poisoned: bool,
}

impl Worker {
    fn new(mode: Mode) -> rquickjs::Result<Self> {
        let rt = Runtime::new()?;
        rt.set_max_stack_size(MAX_STACK);
        let epoch = Instant::now();
        let deadline = Arc::new(AtomicU64::new(0));
        let interrupted = Arc::new(AtomicBool::new(false));
        let hand_off_at = Arc::new(AtomicU64::new(0));
        {
            let deadline = Arc::clone(&deadline);
            let interrupted = Arc::clone(&interrupted);
            let hand_off_at = Arc::clone(&hand_off_at);
            rt.set_interrupt_handler(Some(Box::new(move || {
                let d = deadline.load(Ordering::Relaxed);
                let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if d != 0 && now > d {
                    interrupted.store(true, Ordering::Relaxed);
                    return true;
                }
                let h = hand_off_at.load(Ordering::Relaxed);
                if d != 0 && h != 0 && now > h {
                    hand_off_worker();
                    let retry = u64::try_from(HAND_OFF_RETRY.as_nanos()).unwrap_or(u64::MAX);
                    hand_off_at.store(now.saturating_add(retry), Ordering::Relaxed);
                }
                false
            })));
        }
        let ctx = Context::full(&rt)?;
        let api = ctx.with(|ctx| -> rquickjs::Result<Persistent<Object<'static>>> {
            let prelude: Function = ctx.eval(PRELUDE)?;
            let api: Object = prelude.call((host(&ctx)?, mode == Mode::Apigee))?;
            Ok(Persistent::save(&ctx, api))
        })?;
        let baseline = usize::try_from(rt.memory_usage().malloc_size).unwrap_or(0);
        Ok(Self {
            scripts: HashMap::new(),
            api,
            ctx,
            rt,
            epoch,
            deadline,
            hand_off_at,
            interrupted,
            baseline,
            poisoned: false,
        })
    }

    fn deadline(&self, limit: Duration) {
        let now = self.epoch.elapsed();
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.interrupted.store(false, Ordering::Relaxed);
        self.hand_off_at.store(
            if limit > HAND_OFF_AFTER {
                ns(now + HAND_OFF_AFTER)
            } else {
                0
            },
            Ordering::Relaxed,
        );
        self.deadline.store(ns(now + limit), Ordering::Relaxed);
    }

    fn clear_deadline(&self) {
        self.deadline.store(0, Ordering::Relaxed);
        self.hand_off_at.store(0, Ordering::Relaxed);
    }

    /// The script's function in this worker, compiled on first use.
    fn function(&mut self, script: &Arc<Script>) -> Result<Persistent<Function<'static>>, String> {
        if let Some((_, f)) = self.scripts.get(&script.id) {
            return Ok(f.clone());
        }
        // Scripts of replaced configurations go when a new one arrives.
        self.scripts.retain(|_, (w, _)| w.strong_count() > 0);
        self.rt.set_memory_limit(0);
        self.deadline(Duration::from_millis(500));
        let api = &self.api;
        let f = self
            .ctx
            .with(|ctx| compile(&ctx, api, &script.wrapped).map(|f| Persistent::save(&ctx, f)));
        self.clear_deadline();
        let f = f?;
        self.scripts
            .insert(script.id, (Arc::downgrade(script), f.clone()));
        self.rt.run_gc();
        self.baseline = usize::try_from(self.rt.memory_usage().malloc_size).unwrap_or(0);
        Ok(f)
    }
}

/// Called from the interrupt handler of a run that has held its thread for
/// [`HAND_OFF_AFTER`]: on a tokio multi-thread worker, `block_in_place` gives the worker's
/// scheduler (its queue of other streams, health checks, timers) to a fresh thread, while
/// this thread finishes the script and the current task's poll, then leaves the worker
/// pool. Runs stay inline (a trivial script costs a few µs, less than any thread hand-off),
/// and only a long run pays for the hand-off, once. The closure waits briefly so the new
/// thread can take the scheduler (if it has not, `block_in_place` takes it back on return,
/// and the next interrupt tries again). Outside a multi-thread runtime (tests, `validate`)
/// there is no worker to free.
fn hand_off_worker() {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if !multi {
        return;
    }
    // A panic must not unwind into QuickJS (it would abort the process).
    let r = std::panic::catch_unwind(|| {
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_micros(200)));
    });
    if r.is_err() {
        tracing::warn!("JavaScript: could not hand the worker's tasks to another thread");
    }
}

/// How a run ended, when not well.
enum RunError {
    TimeLimit,
    MemoryLimit,
    StackLimit,
    /// The script threw `{status, code, message}`.
    Fault(Fault),
    Failed(String),
}

impl JavaScript {
    fn execute(
        &self,
        worker: &mut Worker,
        ex: &mut Exchange,
        dir: Direction,
    ) -> Result<(), RunError> {
        // Compiled before the exchange is handed over: nothing runs with it but the script.
        let f = self.function_in(worker)?;
        let cur = Current {
            ex: std::mem::take(ex),
            dir,
            policy: Arc::clone(&self.name),
            http: self.http.clone(),
            pending: Vec::new(),
            deadline: Arc::clone(&worker.deadline),
            printed: 0,
            properties: Arc::clone(&self.properties),
        };
        CURRENT.with(|c| *c.borrow_mut() = Some(cur));
        let result = self.call(worker, f);
        if let Some(cur) = CURRENT.with(|c| c.borrow_mut().take()) {
            *ex = cur.ex;
        }
        result
    }

    fn call(&self, worker: &mut Worker, f: Persistent<Function<'static>>) -> Result<(), RunError> {
        worker
            .rt
            .set_memory_limit(worker.baseline.saturating_add(self.memory_limit));
        worker.deadline(self.time_limit);
        let api = &worker.api;
        let rt = &worker.rt;
        let mut poisoned = false;
        let result = worker.ctx.with(|ctx| -> Result<(), RunError> {
            let run = || -> rquickjs::Result<()> {
                let api = api.clone().restore(&ctx)?;
                let f = f.restore(&ctx)?;
                let args: (JsValue, JsValue, JsValue, JsValue) = (
                    api.get("context")?,
                    api.get("request")?,
                    api.get("response")?,
                    api.get("print")?,
                );
                let _ignored: JsValue = f.call(args)?;
                Ok(())
            };
            let r = run()
                .map_err(|e| self.classify(&ctx, e, worker.interrupted.load(Ordering::Relaxed)));
            // Globals a sloppy run made go now; a global object it locked against that
            // retires this worker.
            let reset = || -> rquickjs::Result<bool> {
                let api = api.clone().restore(&ctx)?;
                let reset: Function = api.get("reset")?;
                reset.call(())
            };
            if self.mode == Mode::Apigee && !matches!(reset(), Ok(true)) {
                let _ = ctx.catch();
                poisoned = true;
            }
            r
        });
        // Promise jobs the run queued run now, inside its limits, never in a later run.
        // (Outside `with`: job execution takes the runtime lock itself.)
        let result = result.and_then(|()| {
            while rt.is_job_pending() {
                if rt.execute_pending_job().is_err() {
                    return Err(if worker.interrupted.load(Ordering::Relaxed) {
                        RunError::TimeLimit
                    } else {
                        RunError::Failed("a promise job failed".into())
                    });
                }
            }
            Ok(())
        });
        worker.clear_deadline();
        worker.rt.set_memory_limit(0);
        if poisoned {
            tracing::warn!(policy = %self.name, "JavaScript: a run left globals that could not be cleared; engine replaced");
            worker.poisoned = true;
        }
        if matches!(result, Err(RunError::TimeLimit | RunError::MemoryLimit)) {
            worker.rt.run_gc();
        }
        result
    }

    fn function_in(&self, worker: &mut Worker) -> Result<Persistent<Function<'static>>, RunError> {
        worker.function(&self.script).map_err(RunError::Failed)
    }

    fn classify(&self, ctx: &Ctx<'_>, e: rquickjs::Error, interrupted: bool) -> RunError {
        if interrupted {
            let _ = ctx.catch();
            return RunError::TimeLimit;
        }
        let rquickjs::Error::Exception = e else {
            return RunError::Failed(e.to_string());
        };
        let v = ctx.catch();
        // When the engine cannot even allocate its "out of memory" error (an array whose
        // next growth does not fit) it throws null instead (QuickJS's JS_ThrowError2): a
        // null exception is the memory limit. (A script throwing null itself is reported
        // the same way; nothing tells the two apart.)
        if v.is_null() {
            return RunError::MemoryLimit;
        }
        // A fault the script built: {status, code, message}.
        if let Some(o) = v.as_object().filter(|_| v.as_exception().is_none()) {
            if let Ok(status) = o.get::<_, f64>("status") {
                if (400.0..=599.0).contains(&status) {
                    let code: String = o
                        .get::<_, Option<String>>("code")
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| "steps.javascript.ScriptExecutionFailed".into());
                    let message: String = o
                        .get::<_, Option<String>>("message")
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    return RunError::Fault(Fault::new(status as u16, code, message));
                }
            }
        }
        let text = js_error_text(&v);
        if text.contains("out of memory")
            || text.contains("string too long")
            || text.contains("invalid array length")
        {
            return RunError::MemoryLimit;
        }
        if text.contains("stack") && text.starts_with("RangeError")
            || text.contains("stack overflow")
        {
            return RunError::StackLimit;
        }
        RunError::Failed(text)
    }
}

impl Policy for JavaScript {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, _dir: Direction) -> bool {
        self.needs_body
    }

    fn replaces_body(&self, _dir: Direction) -> bool {
        self.needs_body && self.replaces_body
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        let slot = match self.mode {
            Mode::Strict => &WORKER,
            Mode::Apigee => &APIGEE_WORKER,
        };
        let result = slot.with(|w| {
            let mut w = w.borrow_mut();
            if w.is_none() {
                match Worker::new(self.mode) {
                    Ok(new) => *w = Some(new),
                    Err(e) => return Err(RunError::Failed(format!("JavaScript engine: {e}"))),
                }
            }
            let r = match w.as_mut() {
                Some(worker) => self.execute(worker, ex, dir),
                None => Err(RunError::Failed("JavaScript engine unavailable".into())),
            };
            if w.as_ref().is_some_and(|w| w.poisoned) {
                *w = None;
            }
            r
        });
        let c = &self.counters;
        let (metric, fault) = match result {
            Ok(()) => (&c.ok, None),
            Err(RunError::Fault(f)) => (&c.fault, Some(f)),
            Err(e) => {
                let (metric, msg) = match e {
                    RunError::TimeLimit => (
                        &c.time_limit,
                        format!(
                            "exceeded its time limit of {} ms",
                            self.time_limit.as_millis()
                        ),
                    ),
                    RunError::MemoryLimit => (
                        &c.memory_limit,
                        format!("exceeded its memory limit of {} bytes", self.memory_limit),
                    ),
                    RunError::StackLimit => (
                        &c.error,
                        "exceeded the stack limit (too deep recursion)".to_owned(),
                    ),
                    RunError::Failed(m) => (&c.error, format!("failed: {m}")),
                    RunError::Fault(_) => (&c.fault, String::new()),
                };
                let message = format!("JavaScript {} {msg}", self.name);
                tracing::debug!(policy = %self.name, %message, "script failed");
                (
                    metric,
                    Some(Fault::new(
                        500,
                        "steps.javascript.ScriptExecutionFailed",
                        message,
                    )),
                )
            }
        };
        metric.inc();
        Hook::from(fault.map_or(Ok(()), Err))
    }
}
