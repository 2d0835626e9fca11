//! `ServiceCallout`: an HTTP call to another service in the middle of a flow, whose answer
//! later steps and conditions read as flow variables.
//!
//! ```yaml
//! spec:
//!   type: ServiceCallout
//!   request:
//!     method: POST                      # default GET
//!     url: "http://authz.internal:8080/check?user={jwt.auth.claim.sub}"
//!     headers: {content-type: application/json}
//!     body: '{"path": "{request.path}"}'
//!   http2: false          # true: HTTP/2 with prior knowledge on http:// (h2c); on
//!                         # https:// HTTP/2 or HTTP/1.1 is chosen by ALPN
//!   caFile: certs/internal-ca.pem  # extra CA certificates (PEM) trusted for https://,
//!                         # besides the system roots (beside the configuration)
//!   timeoutMs: 1000       # per attempt, connect to last body byte
//!   retries: 1            # idempotent methods only (and connect failures for any method)
//!   maxResponseBytes: 1048576
//!   successCodes: [200-299]   # other statuses fail the step (502)
//!   circuitBreaker: {failures: 5, openSeconds: 10}
//!   response:
//!     json: {allowed: "$.allowed", tier: "$.user.tier"}   # RFC 9535 JSONPath
//!   clientCertificate:    # mutual TLS: the certificate (chain) and key presented
//!     certFile: certs/client.pem
//!     keyFile: certs/client.key
//!   googleToken:          # Apigee's <Authentication><GoogleAccessToken|GoogleIDToken>
//!     accessToken: {scopes: [https://www.googleapis.com/auth/cloud-platform]}
//!     # idToken: {audience: https://my-service-abc.a.run.app}
//!     # header, serviceAccountKeyFile, metadataHost: as AssignMessage's googleToken
//! ```
//!
//! `googleToken` sends the gateway's own Google token (default `Authorization: Bearer
//! <token>`, see `crate::google`; one cached token per source and scopes, shared with
//! AssignMessage); a token that cannot be had fails the step with 503
//! `steps.googletoken.TokenUnavailable` and nothing is sent. `clientCertificate` files are
//! read at load (PEM: a certificate chain, and a PKCS#8, PKCS#1 or SEC1 key); a pair that
//! does not load is refused there.
//!
//! Variables (`<p>` is the policy name): `servicecallout.<p>.status`,
//! `servicecallout.<p>.header.<name>`, `servicecallout.<p>.body`,
//! `servicecallout.<p>.json.<name>`, and `servicecallout.<p>.error` when it failed.
//! Failures: 504 timeout, 502 unreachable / bad status / too large / not JSON, 503 circuit
//! open, 500 destination not allowed — all `steps.servicecallout.*`; `continueOnError`
//! on the step lets the flow go on with `<p>.failed` set.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Method};
use prometheus::IntCounterVec;
use serde::Deserialize;
use serde_json_path::JsonPath;

use super::{
    check_header_name, parse_spec, read_config_file, valid_header_value, BuildContext, SpecError,
};
use crate::expr::Template;
use crate::fault::Fault;
use crate::http_client::{HttpClient, HttpError, HttpResponse};
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::vars::state::CalloutResult;
use crate::vars::{Exchange, Value};

pub const TYPE: &str = "ServiceCallout";

const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// How long a callout took, answered or not (timeouts included), by policy.
static CALLOUT_SECONDS: LazyLock<prometheus::HistogramVec> = LazyLock::new(|| {
    let h = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(
            "tollgate_callout_duration_seconds",
            "Service callout latency by policy, failures and timeouts included",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["policy"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(h.clone()))
    {
        tracing::warn!(error = %e, "callout metric not registered");
    }
    h
});

static CALLOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "tollgate_callouts_total",
            "Service callouts by policy and result (ok, status, timeout, error, circuit_open, denied)",
        ),
        &["policy", "result"],
    )
    .expect("valid metric");
    if let Err(e) = crate::telemetry::METRICS
        .registry
        .register(Box::new(c.clone()))
    {
        tracing::warn!(error = %e, "callout metric not registered");
    }
    c
});

/// Where callouts may go, set by the operator (`tollgate serve --callout-allow`), not by
/// the configuration authors. Patterns: `host`, `host:port`, `*.example.com` (any
/// subdomain), optionally with `:port`. Empty allows everything except link-local
/// addresses (169.254.0.0/16, fe80::/10) and the metadata server's names: the cloud
/// metadata server hands out the gateway's own credentials. A pattern that names such a
/// destination allows it.
#[derive(Debug, Default, Clone)]
pub struct Egress {
    patterns: Vec<(String, Option<u16>)>,
}

/// Names of the GCE/GKE metadata server (169.254.169.254).
const METADATA_NAMES: [&str; 2] = ["metadata.google.internal", "metadata"];

/// An IPv4 address in any form the system resolver accepts as numeric (`inet_aton`:
/// `169.254.169.254`, `2852039166`, `0xa9.0xfe.0xa9.0xfe`, `169.254.43518`).
fn numeric_ipv4(host: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let n = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            u32::from_str_radix(hex, 16).ok()?
        } else if p.len() > 1 && p.starts_with('0') {
            u32::from_str_radix(&p[1..], 8).ok()?
        } else {
            p.parse::<u32>().ok()?
        };
        nums.push(n);
    }
    let (last, head) = nums.split_last()?;
    let mut v: u32 = 0;
    for (i, n) in head.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        v |= n << (24 - 8 * i);
    }
    let room = 32 - 8 * head.len() as u32;
    if room < 32 && (*last >> room) != 0 {
        return None;
    }
    Some(std::net::Ipv4Addr::from(v | last))
}

/// A link-local destination (or the metadata server by name).
fn is_link_local(host: &str) -> bool {
    if METADATA_NAMES.contains(&host.trim_end_matches('.')) {
        return true;
    }
    let v4 = |a: std::net::Ipv4Addr| a.is_link_local();
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a.to_ipv4_mapped().is_some_and(v4),
        Err(_) => numeric_ipv4(host).is_some_and(v4),
    }
}

impl Egress {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in patterns {
            let p = p.as_ref().trim().to_ascii_lowercase();
            if p.is_empty() {
                continue;
            }
            // `host`, `host:port`, `[v6]`, `[v6]:port`.
            let split = if p.starts_with('[') {
                p.split_once("]:").map(|(h, port)| (format!("{h}]"), port))
            } else if p.matches(':').count() == 1 {
                p.split_once(':').map(|(h, port)| (h.to_owned(), port))
            } else {
                None
            };
            let (host, port) = match split {
                Some((h, port)) => {
                    let port = port
                        .parse::<u16>()
                        .map_err(|_| format!("`{p}`: bad port"))?;
                    (h, Some(port))
                }
                None => (p.clone(), None),
            };
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            out.push((host, port));
        }
        Ok(Self { patterns: out })
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.check(host, port).is_ok()
    }

    /// Ok, or why `host:port` is refused.
    pub fn check(&self, host: &str, port: u16) -> Result<(), String> {
        let host = host.to_ascii_lowercase();
        if self.patterns.is_empty() {
            if is_link_local(&host) {
                return Err(format!(
                    "destination {host}:{port} is link-local (the cloud metadata server); \
                     only --callout-allow can allow it"
                ));
            }
            return Ok(());
        }
        let listed = self.patterns.iter().any(|(h, p)| {
            let host_ok = match h.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|pre| pre.ends_with('.') && pre.len() > 1),
                None => *h == host,
            };
            host_ok && p.is_none_or(|p| p == port)
        });
        if listed {
            Ok(())
        } else {
            Err(format!(
                "destination {host}:{port} is not allowed (--callout-allow)"
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    request: RequestSpec,
    #[serde(default)]
    http2: bool,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    max_response_bytes: Option<usize>,
    #[serde(default)]
    success_codes: Vec<String>,
    #[serde(default)]
    circuit_breaker: Option<BreakerSpec>,
    #[serde(default)]
    response: ResponseSpec,
    #[serde(default)]
    client_certificate: Option<ClientCertSpec>,
    #[serde(default)]
    google_token: Option<super::assign_message::GoogleTokenSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientCertSpec {
    cert_file: String,
    key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestSpec {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BreakerSpec {
    failures: u32,
    open_seconds: u64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResponseSpec {
    #[serde(default)]
    json: BTreeMap<String, String>,
}

/// Consecutive-failure circuit breaker: after `failures` failures in a row the callout is
/// not attempted for `open`; then one trial call decides (half-open).
#[derive(Debug)]
struct Breaker {
    failures: u32,
    open: Duration,
    consecutive: AtomicU32,
    /// Nanoseconds since `epoch` until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// May a call go out now? In half-open state only the caller that moves the deadline
    /// gets the trial.
    fn admit(&self) -> bool {
        self.admit_at(self.now())
    }

    fn admit_at(&self, now: u64) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        // Half-open: one trial; everyone else waits for its result for another period.
        let next = now.saturating_add(u64::try_from(self.open.as_nanos()).unwrap_or(u64::MAX));
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn record(&self, ok: bool) {
        self.record_at(ok, self.now());
    }

    fn record_at(&self, ok: bool, now: u64) {
        if ok {
            self.consecutive.store(0, Ordering::Release);
            self.open_until.store(0, Ordering::Release);
            return;
        }
        let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.failures {
            let until = now.saturating_add(u64::try_from(self.open.as_nanos()).unwrap_or(u64::MAX));
            self.open_until.store(until.max(1), Ordering::Release);
        }
    }
}

#[derive(Debug)]
struct ServiceCallout {
    name: String,
    method: Method,
    url: Template,
    headers: Vec<(String, Template)>,
    body: Option<Template>,
    http2: bool,
    timeout: Duration,
    retries: u32,
    max_bytes: usize,
    success: Vec<(u16, u16)>,
    breaker: Option<Breaker>,
    json: Vec<(String, JsonPath)>,
    reads_body: bool,
    http: HttpClient,
    egress: Arc<Egress>,
    prefix: Arc<str>,
    google: Option<super::assign_message::GoogleToken>,
}

fn parse_codes(codes: &[String]) -> Result<Vec<(u16, u16)>, SpecError> {
    if codes.is_empty() {
        return Ok(vec![(200, 299)]);
    }
    codes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("successCodes[{i}]");
            let (a, b) = c.split_once('-').unwrap_or((c, c));
            let p = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (100..=599).contains(n))
                    .ok_or_else(|| SpecError::new(&at, "a status like 200 or a range like 200-299"))
            };
            Ok((p(a)?, p(b)?))
        })
        .collect()
}

/// Checks a URL's destination; a URL with variables is checked again when rendered.
pub(crate) fn check_url(url: &str, egress: &Egress) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if scheme != "http" && scheme != "https" {
        return Err("the URL must be http:// or https://".into());
    }
    let host = uri.host().ok_or("the URL has no host")?;
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    egress.check(host.trim_start_matches('[').trim_end_matches(']'), port)
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let method = spec
        .request
        .method
        .as_deref()
        .unwrap_or("GET")
        .to_ascii_uppercase()
        .parse::<Method>()
        .map_err(|e| SpecError::new("request.method", e.to_string()))?;
    let url = Template::compile(&spec.request.url)
        .map_err(|e| SpecError::new("request.url", e.to_string()))?;
    if url.is_static() {
        check_url(&spec.request.url, &ctx.services.egress)
            .map_err(|m| SpecError::new("request.url", m))?;
    } else {
        // The scheme and host must be fixed: a variable there would let a client choose
        // where tollgate sends requests.
        let head = spec.request.url.split('{').next().unwrap_or_default();
        let after_scheme = head.split_once("://").map(|(_, r)| r).unwrap_or_default();
        if !after_scheme.contains('/') {
            return Err(SpecError::new(
                "request.url",
                "variables may appear only in the path and query, after a fixed scheme and host",
            ));
        }
        let fixed = format!("{}/", head.rsplit_once('/').map_or(head, |(h, _)| h));
        check_url(&fixed, &ctx.services.egress).map_err(|m| SpecError::new("request.url", m))?;
    }
    let headers = spec
        .request
        .headers
        .into_iter()
        .map(|(name, value)| {
            let at = format!("request.headers.{name}");
            let n = name.to_ascii_lowercase();
            if n == "host" || n == "content-length" || n == "transfer-encoding" || n == "connection"
            {
                return Err(SpecError::new(&at, "set by the client itself"));
            }
            let n = check_header_name(&n)
                .or_else(|e| {
                    if n.starts_with("x-envoy") {
                        Ok(n.clone())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|m| SpecError::new(&at, m))?;
            let t = Template::compile(&value).map_err(|e| SpecError::new(&at, e.to_string()))?;
            Ok((n, t))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let body = spec
        .request
        .body
        .as_deref()
        .map(|b| Template::compile(b).map_err(|e| SpecError::new("request.body", e.to_string())))
        .transpose()?;
    let json = spec
        .response
        .json
        .into_iter()
        .map(|(name, path)| {
            JsonPath::parse(&path)
                .map(|p| (name.clone(), p))
                .map_err(|e| SpecError::new(format!("response.json.{name}"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let breaker = spec
        .circuit_breaker
        .map(|b| {
            if b.failures == 0 || b.open_seconds == 0 {
                return Err(SpecError::new(
                    "circuitBreaker",
                    "failures and openSeconds must be at least 1",
                ));
            }
            Ok(Breaker {
                failures: b.failures,
                open: Duration::from_secs(b.open_seconds),
                consecutive: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                epoch: Instant::now(),
            })
        })
        .transpose()?;
    let timeout = Duration::from_millis(spec.timeout_ms.unwrap_or(2000));
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err(SpecError::new("timeoutMs", "between 1 and 60000"));
    }
    // An internal CA: trusted by this callout, in addition to the system roots; a client
    // certificate for servers that ask for one.
    let ca = spec
        .ca_file
        .as_deref()
        .map(|f| read_config_file(ctx, "caFile", f))
        .transpose()?;
    let client = match &spec.client_certificate {
        Some(c) => Some((
            read_config_file(ctx, "clientCertificate.certFile", &c.cert_file)?,
            read_config_file(ctx, "clientCertificate.keyFile", &c.key_file)?,
        )),
        None => None,
    };
    let http = match (&ca, &client) {
        (None, None) => ctx.services.http.clone(),
        (Some(pem), None) => {
            HttpClient::with_extra_roots(pem).map_err(|m| SpecError::new("caFile", m))?
        }
        (ca, Some((cert, key))) => {
            HttpClient::with_tls(ca.as_deref(), Some((cert.as_slice(), key.as_slice()))).map_err(
                |m| {
                    let field = if m.starts_with("not a PEM")
                        || m.starts_with("no PEM")
                        || m.starts_with("unusable CA")
                    {
                        "caFile"
                    } else {
                        "clientCertificate"
                    };
                    SpecError::new(field, m)
                },
            )?
        }
    };
    let google = spec
        .google_token
        .map(|g| super::assign_message::google_token(ctx, g))
        .transpose()?;
    if let Some(g) = &google {
        if headers.iter().any(|(n, _)| *n == g.header) {
            return Err(SpecError::new(
                "googleToken.header",
                format!(
                    "`{}` is also in request.headers: the token sets it",
                    g.header
                ),
            ));
        }
    }
    let retries = spec.retries.unwrap_or(0);
    if retries > 5 {
        return Err(SpecError::new("retries", "at most 5"));
    }
    let reads_body = headers
        .iter()
        .map(|(_, t)| t)
        .chain(body.iter())
        .chain(std::iter::once(&url))
        .flat_map(Template::variables)
        .any(|v| v == "request.content" || v == "response.content");
    // Every result at 0 from the start, so an error-ratio query or alert has a series.
    for r in ["ok", "status", "timeout", "error", "circuit_open", "denied"] {
        CALLOUTS.with_label_values(&[ctx.name.as_str(), r]);
    }
    CALLOUT_SECONDS.with_label_values(&[ctx.name.as_str()]);
    Ok(Arc::new(ServiceCallout {
        name: ctx.name.clone(),
        method,
        url,
        headers,
        body,
        http2: spec.http2,
        timeout,
        retries,
        max_bytes: spec.max_response_bytes.unwrap_or(DEFAULT_MAX_BYTES),
        success: parse_codes(&spec.success_codes)?,
        breaker,
        json,
        reads_body,
        http,
        egress: Arc::clone(&ctx.services.egress),
        prefix: format!("servicecallout.{}.", ctx.name).into(),
        google,
    }))
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A failure, before it becomes a fault: (status, code suffix, metric result, message).
struct Failure(u16, &'static str, &'static str, String);

impl ServiceCallout {
    fn success(&self, status: u16) -> bool {
        self.success
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&status))
    }

    fn build_request(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &Bytes,
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let mut b = hyper::Request::builder()
            .method(self.method.clone())
            .uri(url);
        for (n, v) in headers {
            b = b.header(n, v);
        }
        b.body(Full::new(body.clone())).map_err(|e| e.to_string())
    }

    async fn call(
        &self,
        url: String,
        headers: Vec<(String, String)>,
        body: Bytes,
    ) -> Result<HttpResponse, Failure> {
        let mut attempt = 0;
        loop {
            let req = self.build_request(&url, &headers, &body).map_err(|m| {
                Failure(500, "ExecutionFailed", "error", format!("bad request: {m}"))
            })?;
            let r = self
                .http
                .send(req, self.http2, self.timeout, self.max_bytes)
                .await;
            let retryable = match &r {
                Err(e) if e.is_connect() => true,
                Err(HttpError::Failed(_)) => is_idempotent(&self.method),
                Ok(resp) => is_idempotent(&self.method) && matches!(resp.status, 502..=504),
                Err(_) => false,
            };
            if retryable && attempt < self.retries {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(25 << attempt.min(5))).await;
                continue;
            }
            return match r {
                Ok(resp) => Ok(resp),
                Err(HttpError::Timeout(d)) => Err(Failure(
                    504,
                    "ExecutionFailed",
                    "timeout",
                    format!("callout timed out after {} ms", d.as_millis()),
                )),
                Err(HttpError::TooLarge(n)) => Err(Failure(
                    502,
                    "ResponseTooLarge",
                    "error",
                    format!("callout response larger than {n} bytes"),
                )),
                // The cause (a DNS name that does not resolve, a refused address, a TLS
                // error) is for the operator's log: the client learns only that the call failed.
                Err(e @ HttpError::Connect(_)) => {
                    tracing::warn!(policy = %self.name, error = %e, attempts = attempt + 1, "service callout could not connect");
                    Err(Failure(
                        502,
                        "ExecutionFailed",
                        "error",
                        "callout connect failed".into(),
                    ))
                }
                Err(e @ HttpError::Failed(_)) => {
                    tracing::warn!(policy = %self.name, error = %e, attempts = attempt + 1, "service callout request failed");
                    Err(Failure(
                        502,
                        "ExecutionFailed",
                        "error",
                        "callout request failed".into(),
                    ))
                }
            };
        }
    }

    async fn execute(
        &self,
        ex: &mut Exchange,
        url: String,
        headers: Vec<(String, String)>,
        body: Bytes,
    ) -> Result<(), Fault> {
        let counter = |result: &str| {
            CALLOUTS
                .with_label_values(&[self.name.as_str(), result])
                .inc()
        };
        let mut vars = CalloutResult {
            prefix: Arc::clone(&self.prefix),
            status: None,
            headers: HeaderMap::new(),
            body: None,
            json: Vec::new(),
            error: None,
        };
        let mut headers = headers;
        if let Some(g) = &self.google {
            let token = match g.slot.get() {
                crate::google::Cached::Ready(t) => Ok(t.value.clone()),
                crate::google::Cached::Failed(e) => Err(e),
                crate::google::Cached::Missing => g.slot.fetch().await.map(|t| t.value.clone()),
            };
            match token {
                Ok(t) => headers.push((g.header.clone(), format!("Bearer {t}"))),
                Err(e) => {
                    counter("error");
                    vars.error = Some("no Google token for the callout".into());
                    ex.state.add_callout(vars);
                    return Err(super::assign_message::token_unavailable(&e));
                }
            }
        }
        let started = std::time::Instant::now();
        let outcome: Result<(), Failure> = async {
            let resp = self.call(url, headers, body).await;
            CALLOUT_SECONDS
                .with_label_values(&[self.name.as_str()])
                .observe(started.elapsed().as_secs_f64());
            let resp = resp?;
            vars.status = Some(resp.status);
            let text = String::from_utf8(resp.body.to_vec()).ok();
            let parsed = if self.json.is_empty() {
                None
            } else {
                text.as_deref()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            };
            vars.headers = resp.headers;
            vars.body = text;
            if !self.success(resp.status) {
                return Err(Failure(
                    502,
                    "ExecutionFailed",
                    "status",
                    format!("callout answered {}", resp.status),
                ));
            }
            if !self.json.is_empty() {
                let doc = parsed.ok_or_else(|| {
                    Failure(
                        502,
                        "ResponseNotJson",
                        "error",
                        "callout response is not JSON".into(),
                    )
                })?;
                for (name, path) in &self.json {
                    if let Some(v) = path.query(&doc).first() {
                        vars.json.push((name.clone(), Value::from(v)));
                    }
                }
            }
            Ok(())
        }
        .await;
        let result = match outcome {
            Ok(()) => {
                counter("ok");
                Ok(())
            }
            Err(Failure(status, code, metric, message)) => {
                counter(metric);
                tracing::debug!(policy = %self.name, %message, "service callout failed");
                vars.error = Some(message.clone());
                Err(Fault::new(
                    status,
                    format!("steps.servicecallout.{code}"),
                    message,
                ))
            }
        };
        if let Some(b) = &self.breaker {
            // Only the callee's own failures count: a 4xx is an answer, not an outage.
            let down = matches!(&result, Err(f) if f.status == 504 || vars.status.is_none_or(|s| s >= 500));
            b.record(!down);
        }
        ex.state.add_callout(vars);
        result
    }
}

impl Policy for ServiceCallout {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, _dir: Direction) -> bool {
        self.reads_body
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        let fail = |ex: &mut Exchange, status: u16, code: &str, result: &str, message: String| {
            CALLOUTS
                .with_label_values(&[self.name.as_str(), result])
                .inc();
            ex.state.add_callout(CalloutResult {
                prefix: Arc::clone(&self.prefix),
                status: None,
                headers: HeaderMap::new(),
                body: None,
                json: Vec::new(),
                error: Some(message.clone()),
            });
            Hook::Ready(Outcome::Reject(Fault::new(
                status,
                format!("steps.servicecallout.{code}"),
                message,
            )))
        };
        // Variables are percent-encoded: a header value cannot add query parameters or
        // path segments of its own.
        let url = self.url.render_escaped(ex, crate::vars::percent_encode);
        if !self.url.is_static() {
            if let Err(m) = check_url(&url, &self.egress) {
                return fail(ex, 500, "DestinationNotAllowed", "denied", m);
            }
        }
        if let Some(b) = &self.breaker {
            if !b.admit() {
                return fail(
                    ex,
                    503,
                    "CircuitOpen",
                    "circuit_open",
                    "callout circuit is open after repeated failures".into(),
                );
            }
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for (n, t) in &self.headers {
            let v = t.render(ex);
            if valid_header_value(&v) {
                headers.push((n.clone(), v));
            }
        }
        let body = self
            .body
            .as_ref()
            .map(|t| Bytes::from(t.render(ex)))
            .unwrap_or_default();
        Hook::wait(self.execute(ex, url, headers, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_patterns() {
        let e = Egress::new(&["authz.internal", "*.corp.example:8443", "127.0.0.1"]).unwrap();
        assert!(e.allows("authz.internal", 80));
        assert!(e.allows("AUTHZ.internal", 9000));
        assert!(e.allows("a.corp.example", 8443));
        assert!(!e.allows("a.corp.example", 443));
        assert!(!e.allows("corp.example", 8443));
        assert!(!e.allows("evilcorp.example", 8443));
        assert!(e.allows("127.0.0.1", 1234));
        assert!(!e.allows("10.0.0.1", 80));
        assert!(Egress::default().allows("anything", 1));
        assert!(Egress::new(&["x:notaport"]).is_err());
    }

    #[test]
    fn link_local_is_denied_unless_listed() {
        let open = Egress::default();
        for host in [
            "169.254.169.254",
            "169.254.1.1",
            "2852039166",
            "0xa9.0xfe.0xa9.0xfe",
            "0251.0376.0251.0376",
            "169.254.43518",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.169.254",
            "metadata.google.internal",
            "METADATA.google.internal.",
            "metadata",
        ] {
            let e = open.check(host, 80).unwrap_err();
            assert!(e.contains("link-local"), "{host}: {e}");
        }
        for host in [
            "169.255.0.1",
            "10.0.0.1",
            "127.0.0.1",
            "fec0::1",
            "::1",
            "metadata.example.com",
            "1.2.3",
        ] {
            assert!(open.allows(host, 80), "{host}");
        }
        // Listed explicitly: allowed.
        let listed = Egress::new(&["169.254.169.254", "metadata.google.internal:80"]).unwrap();
        assert!(listed.allows("169.254.169.254", 80));
        assert!(listed.allows("metadata.google.internal", 80));
        assert!(!listed.allows("169.254.1.1", 80));
    }

    fn build_with(y: &str, egress: Egress) -> Result<Arc<dyn Policy>, SpecError> {
        let mut ctx = BuildContext {
            name: "c".into(),
            ..Default::default()
        };
        ctx.services.egress = Arc::new(egress);
        build(&ctx, serde_norway::from_str(y).unwrap())
    }

    #[test]
    fn specs() {
        let only = || Egress::new(&["allowed.test"]).unwrap();
        assert!(build_with("request: {url: 'http://allowed.test/x'}", only()).is_ok());
        let e = build_with("request: {url: 'http://other.test/x'}", only()).unwrap_err();
        assert!(e.message.contains("not allowed"), "{e}");
        let e = build_with(
            "request: {url: 'http://{request.header.host}/x'}",
            Egress::default(),
        )
        .unwrap_err();
        assert!(e.message.contains("fixed scheme and host"), "{e}");
        assert!(build_with(
            "request: {url: 'http://allowed.test/u/{client_id}'}",
            only()
        )
        .is_ok());
        assert!(build_with("request: {url: 'ftp://allowed.test/'}", Egress::default()).is_err());
        let e = build_with(
            "{request: {url: 'http://a/'}, response: {json: {x: '$[bad'}}}",
            Egress::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "response.json.x");
        let e = build_with(
            "{request: {url: 'http://a/'}, successCodes: ['2xx']}",
            Egress::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "successCodes[0]");
        let e = build_with(
            "{request: {url: 'http://a/', headers: {host: x}}}",
            Egress::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "request.headers.host");
    }

    #[test]
    fn breaker_opens_and_half_opens() {
        let b = Breaker {
            failures: 2,
            open: Duration::from_nanos(30),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        // Times in nanoseconds since the breaker's epoch; open for 30.
        assert!(b.admit_at(1));
        b.record_at(false, 1);
        assert!(b.admit_at(2));
        b.record_at(false, 2);
        assert!(!b.admit_at(3), "open after two failures");
        assert!(!b.admit_at(31));
        assert!(b.admit_at(33), "one trial after the open period");
        assert!(!b.admit_at(34), "only one trial");
        b.record_at(false, 40);
        assert!(!b.admit_at(60), "the failed trial reopens it");
        assert!(b.admit_at(71));
        b.record_at(true, 72);
        assert!(b.admit_at(73) && b.admit_at(74), "closed again");
    }

    /// `openSeconds` comes from the configuration: a huge one overflowed the deadline sum.
    #[test]
    fn breaker_with_huge_open_period_does_not_overflow() {
        let b = Breaker {
            failures: 1,
            open: Duration::from_secs(u64::MAX),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        b.record_at(false, 5);
        assert!(!b.admit_at(6), "open");
        assert!(!b.admit_at(u64::MAX - 1), "open until the end of time");
    }
}
