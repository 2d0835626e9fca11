//! A local server for the external guards' tests, in the test process, speaking:
//!
//! - Model Armor's REST protocol as documented (`../shared/reference/llm-traffic.md`):
//!   `POST /v1/projects/{p}/locations/{l}/templates/{t}:sanitizeUserPrompt` with
//!   `{"userPromptData":{"text"}}` and `…:sanitizeModelResponse` with
//!   `{"modelResponseData":{"text"},"userPrompt"?}`, an OAuth bearer required; answers with
//!   the documented result shapes and their quirks (int64 values as strings, enums as names
//!   and as numbers, `csamFilterFilterResult`, SDP inspect findings with byte ranges, SDP
//!   de-identification with `deidentifyResult.data.text`), and Google's error shape
//!   (`{"error":{"code","message","status"}}`) for a wrong path, template, token or body;
//! - the GCE metadata server's token endpoint (`Metadata-Flavor: Google` required), which
//!   mints the one token Model Armor accepts;
//! - the generic HTTP guard protocol (README, `src/guard/external.rs`) at `POST /guard`.
//!
//! Templates: `projects/test-project/locations/us-central1/templates/strict` (inspects) and
//! `…/templates/deid` (de-identifies). What matches (the text lower-cased):
//! `armor:jailbreak` → prompt injection and jailbreak (HIGH); `armor:dangerous` → RAI
//! dangerous; `malware.test` → malicious URI; an email address → SDP `EMAIL_ADDRESS`. The
//! HTTP guard blocks `forbidden topic` (category `topic:forbidden`) and redacts
//! `internal-codename` to `[CODENAME]` in every part (category `codename`); it requires
//! `x-guard-key: test-key`.
//!
//! Every request is recorded (path, auth, body) for the tests to count; `set_delay` slows
//! every guard answer (timeouts).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{json, Value};

pub const PROJECT: &str = "test-project";
pub const LOCATION: &str = "us-central1";
pub const TOKEN: &str = "ya29.test-model-armor-token";

/// The full name of one of the server's templates.
pub fn template(name: &str) -> String {
    format!("projects/{PROJECT}/locations/{LOCATION}/templates/{name}")
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct St {
    delay_ms: AtomicU64,
    calls: Mutex<Vec<Call>>,
    token_fetches: AtomicU64,
}

pub struct GuardServer {
    pub addr: SocketAddr,
    st: Arc<St>,
}

impl GuardServer {
    pub async fn start() -> Self {
        let st = Arc::new(St::default());
        let s = st.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let st = s.clone();
                async move { handle(&st, method, uri, headers, body).await }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, st }
    }

    /// `http://127.0.0.1:port`
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every guard answer waits this long first.
    pub fn set_delay(&self, d: Duration) {
        self.st
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.st.calls.lock().clone()
    }

    /// The Model Armor calls so far.
    pub fn armor_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path.starts_with("/v1/"))
            .collect()
    }

    /// The generic guard calls so far.
    pub fn http_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path == "/guard")
            .collect()
    }

    pub fn token_fetches(&self) -> u64 {
        self.st.token_fetches.load(Ordering::SeqCst)
    }
}

fn google_error(status: StatusCode, name: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"error": {"code": status.as_u16(), "message": message, "status": name}}).to_string(),
    )
        .into_response()
}

fn json_ok(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json; charset=UTF-8")],
        v.to_string(),
    )
        .into_response()
}

async fn handle(st: &St, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if path == "/computeMetadata/v1/instance/service-accounts/default/token" {
        if header("metadata-flavor").as_deref() != Some("Google") {
            return (StatusCode::FORBIDDEN, "Metadata-Flavor: Google required").into_response();
        }
        if !uri.query().unwrap_or_default().contains("cloud-platform") {
            return (StatusCode::BAD_REQUEST, "scopes").into_response();
        }
        st.token_fetches.fetch_add(1, Ordering::SeqCst);
        return json_ok(json!({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}));
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if method == Method::POST && (path.starts_with("/v1/") || path == "/guard") {
        st.calls.lock().push(Call {
            path: path.clone(),
            authorization: header("authorization"),
            body: parsed.clone().unwrap_or(Value::Null),
        });
    }
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if method != Method::POST {
        return google_error(StatusCode::METHOD_NOT_ALLOWED, "UNIMPLEMENTED", "POST only");
    }
    if !header("content-type").is_some_and(|c| c.starts_with("application/json")) {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "JSON bodies only",
        );
    }
    if path == "/guard" {
        return http_guard(header("x-guard-key"), parsed);
    }
    model_armor(&path, header("authorization"), parsed)
}

/// The generic HTTP guard.
fn http_guard(key: Option<String>, body: Option<Value>) -> Response {
    if key.as_deref() != Some("test-key") {
        return (StatusCode::UNAUTHORIZED, "x-guard-key").into_response();
    }
    let Some(b) = body else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let parts: Option<Vec<String>> = b["parts"]
        .as_array()
        .and_then(|a| a.iter().map(|p| p.as_str().map(str::to_owned)).collect());
    let shape_ok = matches!(b["kind"].as_str(), Some("prompt" | "response"))
        && b["text"].is_string()
        && b["api"].is_string()
        && b["policy"].is_string()
        && (b["model"].is_string() || b["model"].is_null());
    let (Some(parts), true) = (parts, shape_ok) else {
        return (StatusCode::BAD_REQUEST, "not the guard request shape").into_response();
    };
    let all = parts.join("\n").to_lowercase();
    if all.contains("forbidden topic") {
        return json_ok(
            json!({"action": "block", "categories": ["topic:forbidden", "not a category!"]}),
        );
    }
    if all.contains("internal-codename") {
        let red: Vec<String> = parts
            .iter()
            .map(|p| p.replace("internal-codename", "[CODENAME]"))
            .collect();
        return json_ok(json!({"action": "redact", "categories": ["codename"], "parts": red}));
    }
    json_ok(json!({"action": "allow", "categories": []}))
}

/// Email addresses in `text`: their byte ranges (a simple scan, enough for the tests).
fn emails(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+');
    let mut out = Vec::new();
    for (i, &c) in b.iter().enumerate() {
        if c != b'@' {
            continue;
        }
        let mut s = i;
        while s > 0 && word(b[s - 1]) {
            s -= 1;
        }
        let mut e = i + 1;
        while e < b.len() && word(b[e]) {
            e += 1;
        }
        while e > i + 1 && b[e - 1] == b'.' {
            e -= 1;
        }
        if s < i && text[i + 1..e].contains('.') {
            out.push((s, e));
        }
    }
    out
}

fn model_armor(path: &str, auth: Option<String>, body: Option<Value>) -> Response {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown path");
    };
    let Some((name, method)) = rest.rsplit_once(':') else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no method");
    };
    let prompt = match method {
        "sanitizeUserPrompt" => true,
        "sanitizeModelResponse" => false,
        _ => return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method"),
    };
    let template = match name.strip_prefix(&format!(
        "projects/{PROJECT}/locations/{LOCATION}/templates/"
    )) {
        Some(t @ ("strict" | "deid")) => t,
        _ => {
            return google_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                &format!("Template {name} not found"),
            )
        }
    };
    if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let Some(Value::Object(b)) = body else {
        return google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "not JSON");
    };
    let (data_key, allowed): (&str, &[&str]) = if prompt {
        ("userPromptData", &["userPromptData", "filterConfig"])
    } else {
        (
            "modelResponseData",
            &["modelResponseData", "userPrompt", "filterConfig"],
        )
    };
    let text = b
        .get(data_key)
        .and_then(|d| d.get("text"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let unknown = b.keys().any(|k| !allowed.contains(&k.as_str()));
    let bad_prompt = b.get("userPrompt").is_some_and(|p| !p.is_string());
    let Some(text) = text.filter(|_| !unknown && !bad_prompt) else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("Invalid JSON payload: expected {data_key}.text"),
        );
    };
    let lower = text.to_lowercase();
    let state = |hit: bool| if hit { "MATCH_FOUND" } else { "NO_MATCH_FOUND" };
    let pi = lower.contains("armor:jailbreak");
    let rai = lower.contains("armor:dangerous");
    let uri = lower.find("malware.test");
    let found = emails(&text);
    let mut results = serde_json::Map::new();
    results.insert(
        "rai".into(),
        json!({"raiFilterResult": {"executionState": "EXECUTION_SUCCESS", "matchState": state(rai),
            "raiFilterTypeResults": {
                "dangerous": {"confidenceLevel": "MEDIUM_AND_ABOVE", "matchState": state(rai)},
                "harassment": {"confidenceLevel": "MEDIUM_AND_ABOVE", "matchState": "NO_MATCH_FOUND"}}}}),
    );
    // Enums as numbers here: clients must accept both.
    results.insert(
        "pi_and_jailbreak".into(),
        json!({"piAndJailbreakFilterResult": {"executionState": 1, "matchState": if pi { 2 } else { 1 },
            "confidenceLevel": if pi { "HIGH" } else { "MEDIUM_AND_ABOVE" }}}),
    );
    let uri_items: Vec<Value> = uri
        .map(|s| {
            vec![json!({"uri": "http://malware.test/",
            "locations": [{"start": s.to_string(), "end": (s + 12).to_string()}]})]
        })
        .unwrap_or_default();
    results.insert(
        "malicious_uris".into(),
        json!({"maliciousUriFilterResult": {"executionState": "EXECUTION_SUCCESS",
            "matchState": state(uri.is_some()), "maliciousUriMatchedItems": uri_items}}),
    );
    let sdp = if template == "deid" {
        let mut out = text.clone();
        for (s, e) in found.iter().rev() {
            out.replace_range(*s..*e, "[EMAIL_ADDRESS]");
        }
        let transformed: usize = found.iter().map(|(s, e)| e - s).sum();
        json!({"sdpFilterResult": {"deidentifyResult": {"executionState": "EXECUTION_SUCCESS",
            "matchState": state(!found.is_empty()),
            "data": if found.is_empty() { Value::Null } else { json!({"text": out}) },
            "transformedBytes": transformed.to_string(),
            "infoTypes": if found.is_empty() { json!([]) } else { json!(["EMAIL_ADDRESS"]) }}}})
    } else {
        let findings: Vec<Value> = found
            .iter()
            .map(|(s, e)| {
                json!({"infoType": "EMAIL_ADDRESS", "likelihood": "VERY_LIKELY",
                "location": {"byteRange": {"start": s.to_string(), "end": e.to_string()},
                             "codepointRange": {"start": s.to_string(), "end": e.to_string()}}})
            })
            .collect();
        json!({"sdpFilterResult": {"inspectResult": {"executionState": "EXECUTION_SUCCESS",
            "matchState": state(!found.is_empty()), "findings": findings}}})
    };
    results.insert("sdp".into(), sdp);
    results.insert(
        "csam".into(),
        json!({"csamFilterFilterResult": {"executionState": "EXECUTION_SUCCESS", "matchState": "NO_MATCH_FOUND"}}),
    );
    let any = pi || rai || uri.is_some() || !found.is_empty();
    json_ok(json!({"sanitizationResult": {
        "filterMatchState": state(any),
        "invocationResult": "SUCCESS",
        "filterResults": results,
        "sanitizationMetadata": {"errorCode": "0", "errorMessage": ""}
    }}))
}
