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
    /// Renders the fault in `format`. A fault carrying its own body keeps it.
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
                    ErrorFormat::Apigee => (
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
                };
                if let Some(list) = &self.violations {
                    let slot = match format {
                        ErrorFormat::Apigee => v.pointer_mut("/fault/detail"),
                        ErrorFormat::Openai => v.pointer_mut("/error"),
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
