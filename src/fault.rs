//! Rejections and the one place that turns them into what the client sees.

use serde::{Deserialize, Serialize};

/// How a flow renders errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorFormat {
    /// `{"fault":{"faultstring":"…","detail":{"errorcode":"…"}}}`
    #[default]
    Apigee,
    /// `{"error":{"message":"…","type":"…","code":"…"}}`
    Openai,
    /// RFC 9457 `application/problem+json`
    Problem,
    /// Anthropic's `{"type":"error","error":{"type":"rate_limit_error","message":"…"}}`
    Anthropic,
    /// Google's (Gemini, Vertex AI) `{"error":{"code":429,"message":"…","status":
    /// "RESOURCE_EXHAUSTED","details":[…]}}`
    #[serde(alias = "google")]
    Gemini,
    /// The format of the LLM API the request speaks (OpenAI, Anthropic, Gemini / Vertex AI,
    /// detected from its method and path as `llm::detect` does), so each SDK parses the error
    /// into its own exception with tollgate's message; Apigee's for anything else.
    #[serde(alias = "llm")]
    Auto,
}

impl ErrorFormat {
    /// The concrete format for a request: `Auto` picks the detected LLM API's, the others
    /// stay as they are.
    pub fn resolve<'h>(
        self,
        method: &str,
        path_and_query: &str,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> ErrorFormat {
        if self != ErrorFormat::Auto {
            return self;
        }
        use crate::llm::Api;
        match crate::llm::detect(method, path_and_query, header).map(|e| e.api) {
            Some(
                Api::OpenAiChat
                | Api::OpenAiCompletions
                | Api::OpenAiEmbeddings
                | Api::OpenAiResponses,
            ) => ErrorFormat::Openai,
            Some(Api::AnthropicMessages) => ErrorFormat::Anthropic,
            Some(Api::Gemini | Api::VertexAi) => ErrorFormat::Gemini,
            None => ErrorFormat::Apigee,
        }
    }
}

/// A policy's decision to stop the exchange and answer the client itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub status: u16,
    /// Apigee-style error code, e.g. `policies.ratelimit.QuotaViolation`.
    pub code: String,
    pub message: String,
    /// Extra headers for the client (e.g. `retry-after`).
    pub headers: Vec<(String, String)>,
    /// A body that replaces the formatted one: (content type, bytes).
    pub body: Option<(String, Vec<u8>)>,
    /// The policy that raised it, for metrics and logs.
    pub policy: String,
    /// Itemized problems (e.g. OpenAPI violations with JSON pointers), rendered beside the
    /// message in every format: `fault.detail.violations`, `error.violations`, `violations`.
    pub violations: Option<serde_json::Value>,
}

impl Fault {
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            headers: Vec::new(),
            body: None,
            policy: String::new(),
            violations: None,
        }
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What the client receives for a fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

fn openai_type(status: u16) -> &'static str {
    match status {
        400 | 404 | 405 | 409 | 413 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        503 => "service_unavailable",
        _ if status >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// Anthropic's `error.type` for a status (docs.anthropic.com, "Errors").
fn anthropic_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ if status >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// The `google.rpc.Code` name Google's HTTP APIs pair with a status.
fn google_status(status: u16) -> &'static str {
    match status {
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ if status >= 500 => "INTERNAL",
        _ => "INVALID_ARGUMENT",
    }
}

/// Google's error `details`: the fault code as a `google.rpc.ErrorInfo` reason, and a
/// `retry-after` of whole seconds as a `google.rpc.RetryInfo` (what Gemini sends on 429).
fn google_details(code: &str, headers: &[(String, String)]) -> serde_json::Value {
    let mut details = vec![serde_json::json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": code,
        "domain": "tollgate"
    })];
    let retry = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok());
    if let Some(secs) = retry {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{secs}s")
        }));
    }
    serde_json::Value::Array(details)
}

/// Standard reason phrase, for problem+json titles.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

impl Fault {
    /// Renders the fault in `format` (`Auto`, unresolved, renders as Apigee: resolve it
    /// first with [`ErrorFormat::resolve`]). A fault carrying its own body keeps it.
    pub fn render(&self, format: ErrorFormat) -> Rendered {
        let status = if (200..=599).contains(&self.status) {
            self.status
        } else {
            500
        };
        let mut headers = self.headers.clone();
        let (content_type, body) = match &self.body {
            Some((ct, b)) => (ct.clone(), b.clone()),
            None => {
                let (ct, mut v) = match format {
                    ErrorFormat::Apigee | ErrorFormat::Auto => (
                        "application/json",
                        serde_json::json!({"fault": {
                            "faultstring": self.message,
                            "detail": {"errorcode": self.code}
                        }}),
                    ),
                    ErrorFormat::Openai => (
                        "application/json",
                        serde_json::json!({"error": {
                            "message": self.message,
                            "type": openai_type(status),
                            "param": null,
                            "code": self.code
                        }}),
                    ),
                    ErrorFormat::Problem => (
                        "application/problem+json",
                        serde_json::json!({
                            "type": "about:blank",
                            "title": reason_phrase(status),
                            "status": status,
                            "detail": self.message,
                            "code": self.code
                        }),
                    ),
                    // The fault code rides beside the fields the SDK reads (`error.type`,
                    // `error.message`); Anthropic's SDK keeps unknown fields in `body`.
                    ErrorFormat::Anthropic => (
                        "application/json",
                        serde_json::json!({"type": "error", "error": {
                            "type": anthropic_type(status),
                            "message": self.message,
                            "code": self.code
                        }}),
                    ),
                    ErrorFormat::Gemini => (
                        "application/json",
                        serde_json::json!({"error": {
                            "code": status,
                            "message": self.message,
                            "status": google_status(status),
                            "details": google_details(&self.code, &self.headers)
                        }}),
                    ),
                };
                if let Some(list) = &self.violations {
                    let slot = match format {
                        ErrorFormat::Apigee | ErrorFormat::Auto => v.pointer_mut("/fault/detail"),
                        ErrorFormat::Openai | ErrorFormat::Anthropic | ErrorFormat::Gemini => {
                            v.pointer_mut("/error")
                        }
                        ErrorFormat::Problem => Some(&mut v),
                    };
                    if let Some(serde_json::Value::Object(m)) = slot {
                        m.insert("violations".to_owned(), list.clone());
                    }
                }
                (ct.to_owned(), serde_json::to_vec(&v).unwrap_or_default())
            }
        };
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        headers.push(("content-type".to_owned(), content_type));
        Rendered {
            status,
            headers,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &Rendered) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    fn ct(r: &Rendered) -> &str {
        &r.headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .unwrap()
            .1
    }

    #[test]
    fn formats() {
        let f = Fault::new(
            429,
            "policies.ratelimit.QuotaViolation",
            "Rate limit quota violation",
        )
        .with_header("retry-after", "3");
        let a = f.render(ErrorFormat::Apigee);
        assert_eq!(a.status, 429);
        assert_eq!(ct(&a), "application/json");
        assert_eq!(
            body(&a)["fault"]["detail"]["errorcode"],
            "policies.ratelimit.QuotaViolation"
        );
        assert!(a.headers.contains(&("retry-after".into(), "3".into())));

        let o = f.render(ErrorFormat::Openai);
        assert_eq!(body(&o)["error"]["type"], "rate_limit_error");
        assert_eq!(
            body(&o)["error"]["code"],
            "policies.ratelimit.QuotaViolation"
        );

        let p = f.render(ErrorFormat::Problem);
        assert_eq!(ct(&p), "application/problem+json");
        assert_eq!(body(&p)["status"], 429);
        assert_eq!(body(&p)["title"], "Too Many Requests");
    }

    #[test]
    fn violations_in_every_format() {
        let mut f = Fault::new(400, "policies.oasvalidation.Failed", "bad");
        f.violations = Some(serde_json::json!([{"pointer": "/body/a", "message": "m"}]));
        let a = body(&f.render(ErrorFormat::Apigee));
        assert_eq!(a["fault"]["detail"]["violations"][0]["pointer"], "/body/a");
        assert_eq!(
            a["fault"]["detail"]["errorcode"],
            "policies.oasvalidation.Failed"
        );
        let o = body(&f.render(ErrorFormat::Openai));
        assert_eq!(o["error"]["violations"][0]["message"], "m");
        let p = body(&f.render(ErrorFormat::Problem));
        assert_eq!(p["violations"][0]["pointer"], "/body/a");
        let an = body(&f.render(ErrorFormat::Anthropic));
        assert_eq!(an["error"]["violations"][0]["pointer"], "/body/a");
        let g = body(&f.render(ErrorFormat::Gemini));
        assert_eq!(g["error"]["violations"][0]["message"], "m");
    }

    #[test]
    fn anthropic_format() {
        let f = Fault::new(
            429,
            "policies.ratelimit.QuotaViolation",
            "Rate limit quota violation",
        )
        .with_header("retry-after", "3");
        let r = f.render(ErrorFormat::Anthropic);
        assert_eq!(r.status, 429);
        assert_eq!(ct(&r), "application/json");
        let b = body(&r);
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "rate_limit_error");
        assert_eq!(b["error"]["message"], "Rate limit quota violation");
        assert_eq!(b["error"]["code"], "policies.ratelimit.QuotaViolation");
        assert!(r.headers.contains(&("retry-after".into(), "3".into())));
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (500, "api_error"),
            (503, "overloaded_error"),
        ] {
            let b = body(&Fault::new(status, "c", "m").render(ErrorFormat::Anthropic));
            assert_eq!(b["error"]["type"], kind, "{status}");
        }
    }

    #[test]
    fn gemini_format() {
        let f = Fault::new(
            429,
            "policies.ratelimit.QuotaViolation",
            "Rate limit quota violation",
        )
        .with_header("Retry-After", "7");
        let r = f.render(ErrorFormat::Gemini);
        assert_eq!(r.status, 429);
        assert_eq!(ct(&r), "application/json");
        let b = body(&r);
        assert_eq!(b["error"]["code"], 429);
        assert_eq!(b["error"]["message"], "Rate limit quota violation");
        assert_eq!(b["error"]["status"], "RESOURCE_EXHAUSTED");
        let details = b["error"]["details"].as_array().unwrap();
        assert_eq!(
            details[0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(details[0]["reason"], "policies.ratelimit.QuotaViolation");
        assert_eq!(
            details[1]["@type"],
            "type.googleapis.com/google.rpc.RetryInfo"
        );
        assert_eq!(details[1]["retryDelay"], "7s");
        // No retry-after (or not whole seconds): no RetryInfo.
        let b = body(&Fault::new(401, "c", "m").render(ErrorFormat::Gemini));
        assert_eq!(b["error"]["status"], "UNAUTHENTICATED");
        assert_eq!(b["error"]["details"].as_array().unwrap().len(), 1);
        for (status, name) in [
            (400, "INVALID_ARGUMENT"),
            (403, "PERMISSION_DENIED"),
            (404, "NOT_FOUND"),
            (500, "INTERNAL"),
            (503, "UNAVAILABLE"),
            (504, "DEADLINE_EXCEEDED"),
        ] {
            let b = body(&Fault::new(status, "c", "m").render(ErrorFormat::Gemini));
            assert_eq!(b["error"]["status"], name, "{status}");
            assert_eq!(b["error"]["code"], status, "{status}");
        }
    }

    #[test]
    fn auto_picks_the_detected_api() {
        let none = |_: &str| None;
        let anthropic_version = |n: &str| (n == "anthropic-version").then_some("2023-06-01");
        for (method, path, want) in [
            ("POST", "/v1/chat/completions", ErrorFormat::Openai),
            ("POST", "/openai/v1/responses", ErrorFormat::Openai),
            ("POST", "/v1/embeddings", ErrorFormat::Openai),
            ("POST", "/v1/completions", ErrorFormat::Openai),
            ("POST", "/v1/messages", ErrorFormat::Anthropic),
            (
                "POST",
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                ErrorFormat::Gemini,
            ),
            (
                "POST",
                "/v1/projects/p/locations/l/publishers/google/models/m:generateContent",
                ErrorFormat::Gemini,
            ),
            (
                "POST",
                "/v1/projects/p/locations/l/publishers/anthropic/models/c:rawPredict",
                ErrorFormat::Anthropic,
            ),
            ("GET", "/v1/chat/completions", ErrorFormat::Apigee),
            ("POST", "/orders", ErrorFormat::Apigee),
        ] {
            assert_eq!(
                ErrorFormat::Auto.resolve(method, path, none),
                want,
                "{method} {path}"
            );
        }
        assert_eq!(
            ErrorFormat::Auto.resolve("POST", "/x/messages", anthropic_version),
            ErrorFormat::Anthropic
        );
        // A concrete format is kept whatever the request.
        assert_eq!(
            ErrorFormat::Problem.resolve("POST", "/v1/messages", none),
            ErrorFormat::Problem
        );
        // Unresolved, it renders as Apigee.
        let b = body(&Fault::new(429, "c", "m").render(ErrorFormat::Auto));
        assert_eq!(b["fault"]["detail"]["errorcode"], "c");
    }

    #[test]
    fn format_names_in_config() {
        for (name, want) in [
            ("apigee", ErrorFormat::Apigee),
            ("openai", ErrorFormat::Openai),
            ("problem", ErrorFormat::Problem),
            ("anthropic", ErrorFormat::Anthropic),
            ("gemini", ErrorFormat::Gemini),
            ("google", ErrorFormat::Gemini),
            ("auto", ErrorFormat::Auto),
            ("llm", ErrorFormat::Auto),
        ] {
            let f: ErrorFormat = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(f, want, "{name}");
        }
        assert!(serde_json::from_value::<ErrorFormat>(serde_json::json!("soap")).is_err());
    }

    #[test]
    fn own_body_and_bad_status() {
        let mut f = Fault::new(99, "x", "y");
        f.body = Some(("text/plain".into(), b"nope".to_vec()));
        let r = f.render(ErrorFormat::Openai);
        assert_eq!(r.status, 500);
        assert_eq!(r.body, b"nope");
        assert_eq!(ct(&r), "text/plain");
    }
}
