//! Model Armor (issue 15 item 5): the REST request bodies of `sanitizeUserPrompt` /
//! `sanitizeModelResponse`, their result shapes parsed tolerantly, and the mapping to
//! [`Finding`]-like results and to Apigee's flow variable names. No HTTP here.
//!
//! Quirks handled: `filterResults` is a map keyed `rai`, `pi_and_jailbreak`,
//! `malicious_uris`, `sdp`, `csam`, each value a wrapper object (`raiFilterResult`,
//! `piAndJailbreakFilterResult`, `maliciousUriFilterResult`, `sdpFilterResult` with
//! `inspectResult` or `deidentifyResult`, `csamFilterFilterResult` — the doubled word is the
//! API's); int64 values may be JSON strings; enums may be names or numbers; unknown fields
//! and unknown enum values are kept as such, never an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use super::{Builtin, Category, Confidence, Finding};

/// `{"userPromptData":{"text":"…"}}`
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SanitizeUserPromptRequest {
    pub user_prompt_data: DataItem,
}

/// `{"modelResponseData":{"text":"…"},"userPrompt":"…"}`
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SanitizeModelResponseRequest {
    pub model_response_data: DataItem,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_prompt: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataItem {
    pub text: String,
}

impl SanitizeUserPromptRequest {
    pub fn new(text: impl Into<String>) -> Self {
        SanitizeUserPromptRequest {
            user_prompt_data: DataItem { text: text.into() },
        }
    }
}

impl SanitizeModelResponseRequest {
    pub fn new(text: impl Into<String>, user_prompt: Option<String>) -> Self {
        SanitizeModelResponseRequest {
            model_response_data: DataItem { text: text.into() },
            user_prompt,
        }
    }
}

/// The path of a call: `v1/projects/{p}/locations/{l}/templates/{t}:sanitizeUserPrompt`.
pub fn method_path(template: &str, prompt: bool) -> String {
    let method = if prompt {
        "sanitizeUserPrompt"
    } else {
        "sanitizeModelResponse"
    };
    format!("/v1/{}:{method}", template.trim_start_matches('/'))
}

/// An enum the API may send as its name or its number; unknown values are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiEnum {
    /// The name (`MATCH_FOUND`), or the number as text when no name is known for it.
    pub name: String,
}

impl ApiEnum {
    pub fn is(&self, name: &str) -> bool {
        self.name == name
    }
}

fn enum_de<'de, D: Deserializer<'de>>(
    d: D,
    names: &'static [&'static str],
) -> Result<ApiEnum, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let name = match &v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| names.get(i))
            .map_or_else(|| n.to_string(), |s| (*s).to_string()),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    Ok(ApiEnum { name })
}

macro_rules! api_enum {
    ($f:ident, [$($n:literal),*]) => {
        fn $f<'de, D: Deserializer<'de>>(d: D) -> Result<ApiEnum, D::Error> {
            enum_de(d, &[$($n),*])
        }
    };
}

// Numbering as in the API's protocol buffers (0 is UNSPECIFIED).
api_enum!(
    match_state,
    [
        "FILTER_MATCH_STATE_UNSPECIFIED",
        "NO_MATCH_FOUND",
        "MATCH_FOUND"
    ]
);
api_enum!(
    invocation,
    [
        "INVOCATION_RESULT_UNSPECIFIED",
        "SUCCESS",
        "PARTIAL",
        "FAILURE"
    ]
);
api_enum!(
    execution,
    [
        "FILTER_EXECUTION_STATE_UNSPECIFIED",
        "EXECUTION_SUCCESS",
        "EXECUTION_SKIPPED"
    ]
);
api_enum!(
    confidence,
    [
        "DETECTION_CONFIDENCE_LEVEL_UNSPECIFIED",
        "LOW_AND_ABOVE",
        "MEDIUM_AND_ABOVE",
        "HIGH"
    ]
);
api_enum!(
    likelihood,
    [
        "LIKELIHOOD_UNSPECIFIED",
        "VERY_UNLIKELY",
        "UNLIKELY",
        "POSSIBLE",
        "LIKELY",
        "VERY_LIKELY"
    ]
);

/// An int64 sent as a number or a string.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    })
}

/// The answer of either method.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SanitizeResponse {
    pub sanitization_result: SanitizationResult,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SanitizationResult {
    #[serde(deserialize_with = "match_state")]
    pub filter_match_state: ApiEnum,
    #[serde(deserialize_with = "invocation")]
    pub invocation_result: ApiEnum,
    /// Keyed `rai`, `pi_and_jailbreak`, `malicious_uris`, `sdp`, `csam` (others kept).
    pub filter_results: BTreeMap<String, FilterResult>,
}

/// One `filterResults` value: exactly one wrapper is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FilterResult {
    pub rai_filter_result: Option<RaiResult>,
    pub pi_and_jailbreak_filter_result: Option<PiResult>,
    pub malicious_uri_filter_result: Option<UriResult>,
    pub sdp_filter_result: Option<SdpResult>,
    pub csam_filter_filter_result: Option<Basic>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Basic {
    #[serde(deserialize_with = "execution")]
    pub execution_state: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RaiResult {
    #[serde(deserialize_with = "execution")]
    pub execution_state: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
    /// `sexually_explicit`, `hate_speech`, `harassment`, `dangerous`.
    pub rai_filter_type_results: BTreeMap<String, RaiType>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RaiType {
    #[serde(deserialize_with = "confidence")]
    pub confidence_level: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PiResult {
    #[serde(deserialize_with = "execution")]
    pub execution_state: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
    #[serde(deserialize_with = "confidence")]
    pub confidence_level: ApiEnum,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UriResult {
    #[serde(deserialize_with = "execution")]
    pub execution_state: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
    pub malicious_uri_matched_items: Vec<UriItem>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UriItem {
    pub locations: Vec<Range>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Range {
    #[serde(deserialize_with = "int64")]
    pub start: Option<i64>,
    #[serde(deserialize_with = "int64")]
    pub end: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SdpResult {
    pub inspect_result: Option<SdpInspect>,
    pub deidentify_result: Option<SdpDeidentify>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SdpInspect {
    #[serde(deserialize_with = "execution")]
    pub execution_state: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
    pub findings: Vec<SdpFinding>,
    pub findings_truncated: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SdpFinding {
    pub info_type: String,
    #[serde(deserialize_with = "likelihood")]
    pub likelihood: ApiEnum,
    pub location: SdpLocation,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SdpLocation {
    pub byte_range: Range,
    pub codepoint_range: Range,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SdpDeidentify {
    #[serde(deserialize_with = "execution")]
    pub execution_state: ApiEnum,
    #[serde(deserialize_with = "match_state")]
    pub match_state: ApiEnum,
    pub data: Option<DataOut>,
    #[serde(deserialize_with = "int64")]
    pub transformed_bytes: Option<i64>,
    pub info_types: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DataOut {
    #[serde(default)]
    pub text: String,
}

impl SanitizationResult {
    fn find<T>(&self, f: impl Fn(&FilterResult) -> Option<&T>) -> Option<&T> {
        self.filter_results.values().find_map(f)
    }

    pub fn rai(&self) -> Option<&RaiResult> {
        self.find(|r| r.rai_filter_result.as_ref())
    }

    pub fn pi_and_jailbreak(&self) -> Option<&PiResult> {
        self.find(|r| r.pi_and_jailbreak_filter_result.as_ref())
    }

    pub fn malicious_uris(&self) -> Option<&UriResult> {
        self.find(|r| r.malicious_uri_filter_result.as_ref())
    }

    pub fn sdp(&self) -> Option<&SdpResult> {
        self.find(|r| r.sdp_filter_result.as_ref())
    }

    pub fn csam(&self) -> Option<&Basic> {
        self.find(|r| r.csam_filter_filter_result.as_ref())
    }

    /// De-identified text when the template de-identifies (`sdp.deidentifyResult.data`).
    pub fn deidentified_text(&self) -> Option<&str> {
        self.sdp()?
            .deidentify_result
            .as_ref()?
            .data
            .as_ref()
            .map(|d| d.text.as_str())
    }

    /// Findings in tollgate's vocabulary: SDP info types map to the local categories where
    /// one exists (with the byte range when given); other filters that matched become
    /// `custom:model_armor_<filter>` over the whole text (`text_len`). The action is left to
    /// the policy (`Log` here).
    pub fn findings(&self, text_len: usize) -> Vec<Finding> {
        let mut out = Vec::new();
        let whole = |category: Category, confidence: Confidence| Finding {
            category,
            confidence,
            action: super::Action::Log,
            start: 0,
            end: text_len,
        };
        if let Some(pi) = self
            .pi_and_jailbreak()
            .filter(|p| p.match_state.is("MATCH_FOUND"))
        {
            out.push(whole(
                Builtin::PromptInjection.into(),
                level(&pi.confidence_level),
            ));
        }
        for (name, found) in [
            ("rai", self.rai().map(|r| &r.match_state)),
            (
                "malicious_uris",
                self.malicious_uris().map(|r| &r.match_state),
            ),
            ("csam", self.csam().map(|r| &r.match_state)),
        ] {
            if found.is_some_and(|m| m.is("MATCH_FOUND")) {
                let c = Category::Custom(Arc::from(format!("model_armor_{name}")));
                out.push(whole(c, Confidence::High));
            }
        }
        if let Some(inspect) = self.sdp().and_then(|s| s.inspect_result.as_ref()) {
            for f in &inspect.findings {
                let category = match sdp_category(&f.info_type) {
                    Some(b) => Category::Builtin(b),
                    None => Category::Custom(Arc::from("model_armor_sdp")),
                };
                let r = &f.location.byte_range;
                let (start, end) = match (r.start, r.end) {
                    (Some(s), Some(e)) if 0 <= s && s < e => (
                        usize::try_from(s).unwrap_or(0).min(text_len),
                        usize::try_from(e).unwrap_or(text_len).min(text_len),
                    ),
                    // proto3 omits a zero start.
                    (None, Some(e)) if e > 0 => {
                        (0, usize::try_from(e).unwrap_or(text_len).min(text_len))
                    }
                    _ => (0, text_len),
                };
                let confidence = match f.likelihood.name.as_str() {
                    "VERY_LIKELY" => Confidence::High,
                    "LIKELY" => Confidence::Medium,
                    _ => Confidence::Low,
                };
                out.push(Finding {
                    category,
                    confidence,
                    action: super::Action::Log,
                    start,
                    end,
                });
            }
        }
        out
    }

    /// Apigee's flow variables for this result: `<prefix>.<policy>.<name>` with `prefix`
    /// `SanitizeUserPrompt` or `SanitizeModelResponse`.
    pub fn variables(&self, prefix: &str, policy: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let mut put = |k: &str, val: &ApiEnum| {
            if !val.name.is_empty() {
                v.push((format!("{prefix}.{policy}.{k}"), val.name.clone()));
            }
        };
        put("filterMatchState", &self.filter_match_state);
        put("invocationResult", &self.invocation_result);
        if let Some(r) = self.rai() {
            put("raiFilterResult.executionState", &r.execution_state);
            put("raiFilterResult.matchState", &r.match_state);
        }
        if let Some(r) = self.pi_and_jailbreak() {
            put(
                "piAndJailbreakFilterResult.executionState",
                &r.execution_state,
            );
            put("piAndJailbreakFilterResult.matchState", &r.match_state);
            put(
                "piAndJailbreakFilterResult.confidenceLevel",
                &r.confidence_level,
            );
        }
        if let Some(r) = self.malicious_uris() {
            put(
                "maliciousUriFilterResult.executionState",
                &r.execution_state,
            );
            put("maliciousUriFilterResult.matchState", &r.match_state);
        }
        if let Some(s) = self.sdp() {
            if let Some(r) = &s.inspect_result {
                put(
                    "sdpFilterResult.inspectResult.executionState",
                    &r.execution_state,
                );
                put("sdpFilterResult.inspectResult.matchState", &r.match_state);
            }
            if let Some(r) = &s.deidentify_result {
                put(
                    "sdpFilterResult.deidentifyResult.executionState",
                    &r.execution_state,
                );
                put(
                    "sdpFilterResult.deidentifyResult.matchState",
                    &r.match_state,
                );
            }
        }
        if let Some(r) = self.csam() {
            put("csamFilterFilterResult.executionState", &r.execution_state);
            put("csamFilterFilterResult.matchState", &r.match_state);
        }
        v
    }
}

fn level(c: &ApiEnum) -> Confidence {
    match c.name.as_str() {
        "HIGH" => Confidence::High,
        "MEDIUM_AND_ABOVE" => Confidence::Medium,
        _ => Confidence::Low,
    }
}

/// Sensitive Data Protection info types that have a local category.
pub fn sdp_category(info_type: &str) -> Option<Builtin> {
    Some(match info_type {
        "EMAIL_ADDRESS" => Builtin::Email,
        "PHONE_NUMBER" => Builtin::Phone,
        "CREDIT_CARD_NUMBER" => Builtin::PaymentCard,
        "IBAN_CODE" => Builtin::Iban,
        "US_SOCIAL_SECURITY_NUMBER" => Builtin::UsSsn,
        "IP_ADDRESS" => Builtin::IpAddress,
        "AWS_CREDENTIALS" => Builtin::AwsKey,
        "GCP_CREDENTIALS" => Builtin::GcpKey,
        "GCP_API_KEY" | "AZURE_AUTH_TOKEN" | "AUTH_TOKEN" => Builtin::ApiKey,
        "JSON_WEB_TOKEN" => Builtin::Jwt,
        "ENCRYPTION_KEY" => Builtin::PrivateKey,
        _ => return None,
    })
}

/// The same Apigee variables from local findings, so flows written for
/// `SanitizeUserPrompt` read the same names whichever engine decided: prompt injection or
/// jailbreak → `piAndJailbreakFilterResult`, personal data and secrets → `sdpFilterResult
/// .inspectResult`. The overall `filterMatchState` covers every finding.
pub fn local_variables(prefix: &str, policy: &str, findings: &[Finding]) -> Vec<(String, String)> {
    let state = |hit: bool| if hit { "MATCH_FOUND" } else { "NO_MATCH_FOUND" }.to_string();
    let pi = findings.iter().any(|f| {
        matches!(
            f.category,
            Category::Builtin(Builtin::PromptInjection | Builtin::Jailbreak)
        )
    });
    let sdp = findings.iter().any(|f| {
        matches!(&f.category, Category::Builtin(b) if !matches!(b, Builtin::PromptInjection | Builtin::Jailbreak))
    });
    let k = |n: &str| format!("{prefix}.{policy}.{n}");
    vec![
        (k("filterMatchState"), state(!findings.is_empty())),
        (k("invocationResult"), "SUCCESS".to_string()),
        (k("piAndJailbreakFilterResult.matchState"), state(pi)),
        (k("sdpFilterResult.inspectResult.matchState"), state(sdp)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written from the documented shape (llm-traffic.md), with the quirks: a number enum, an
    /// int64 string, the doubled `csamFilterFilterResult`, an unknown field.
    const PROMPT_RESULT: &str = r#"{
      "sanitizationResult": {
        "filterMatchState": "MATCH_FOUND",
        "invocationResult": "SUCCESS",
        "filterResults": {
          "rai": {"raiFilterResult": {"executionState": "EXECUTION_SUCCESS", "matchState": "NO_MATCH_FOUND",
            "raiFilterTypeResults": {"dangerous": {"confidenceLevel": "MEDIUM_AND_ABOVE", "matchState": "NO_MATCH_FOUND"}}}},
          "pi_and_jailbreak": {"piAndJailbreakFilterResult": {"executionState": 1, "matchState": 2, "confidenceLevel": "HIGH"}},
          "malicious_uris": {"maliciousUriFilterResult": {"executionState": "EXECUTION_SUCCESS", "matchState": "NO_MATCH_FOUND"}},
          "sdp": {"sdpFilterResult": {"inspectResult": {"executionState": "EXECUTION_SUCCESS", "matchState": "MATCH_FOUND",
            "findings": [{"infoType": "EMAIL_ADDRESS", "likelihood": "VERY_LIKELY",
              "location": {"byteRange": {"start": "11", "end": "27"}, "codepointRange": {"start": "11", "end": "27"}}},
              {"infoType": "PERSON_NAME", "likelihood": 4, "location": {"byteRange": {"end": "4"}}}]}}},
          "csam": {"csamFilterFilterResult": {"executionState": "EXECUTION_SUCCESS", "matchState": "NO_MATCH_FOUND"}}
        },
        "sanitizationMetadata": {"errorCode": "0"}
      }
    }"#;

    #[test]
    fn parses_results_with_quirks() {
        let r: SanitizeResponse =
            serde_json::from_str(PROMPT_RESULT).unwrap_or_else(|e| panic!("{e}"));
        let s = &r.sanitization_result;
        assert!(s.filter_match_state.is("MATCH_FOUND"));
        let pi = s.pi_and_jailbreak().unwrap_or_else(|| panic!("no pi"));
        assert!(pi.match_state.is("MATCH_FOUND") && pi.execution_state.is("EXECUTION_SUCCESS"));
        let f = s.findings(40);
        let c: Vec<(String, usize, usize)> = f
            .iter()
            .map(|f| (f.category.to_string(), f.start, f.end))
            .collect();
        assert_eq!(
            c,
            [
                ("prompt_injection".to_string(), 0, 40),
                ("email".to_string(), 11, 27),
                ("custom:model_armor_sdp".to_string(), 0, 4)
            ]
        );
        let vars = s.variables("SanitizeUserPrompt", "guard-in");
        let get = |k: &str| {
            vars.iter()
                .find(|(n, _)| n == &format!("SanitizeUserPrompt.guard-in.{k}"))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("piAndJailbreakFilterResult.matchState"),
            Some("MATCH_FOUND")
        );
        assert_eq!(
            get("sdpFilterResult.inspectResult.matchState"),
            Some("MATCH_FOUND")
        );
        assert_eq!(
            get("csamFilterFilterResult.matchState"),
            Some("NO_MATCH_FOUND")
        );
        assert_eq!(get("raiFilterResult.matchState"), Some("NO_MATCH_FOUND"));
        assert_eq!(get("invocationResult"), Some("SUCCESS"));
    }

    #[test]
    fn deidentify_and_requests() {
        let j = r#"{"sanitizationResult":{"filterMatchState":1,"invocationResult":"PARTIAL",
          "filterResults":{"sdp":{"sdpFilterResult":{"deidentifyResult":{"executionState":"EXECUTION_SUCCESS",
          "matchState":"MATCH_FOUND","data":{"text":"mail [EMAIL_ADDRESS]"},"transformedBytes":"16","infoTypes":["EMAIL_ADDRESS"]}}}}}}"#;
        let r: SanitizeResponse = serde_json::from_str(j).unwrap_or_else(|e| panic!("{e}"));
        let s = &r.sanitization_result;
        assert!(s.filter_match_state.is("NO_MATCH_FOUND"));
        assert!(s.invocation_result.is("PARTIAL"));
        assert_eq!(s.deidentified_text(), Some("mail [EMAIL_ADDRESS]"));
        assert_eq!(
            s.sdp()
                .and_then(|x| x.deidentify_result.as_ref())
                .and_then(|d| d.transformed_bytes),
            Some(16)
        );
        // Unknown numbers stay visible rather than failing.
        let r: SanitizeResponse =
            serde_json::from_str(r#"{"sanitizationResult":{"invocationResult":9}}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.sanitization_result.invocation_result.is("9"));

        let body = serde_json::to_string(&SanitizeUserPromptRequest::new("hi")).unwrap_or_default();
        assert_eq!(body, r#"{"userPromptData":{"text":"hi"}}"#);
        let body =
            serde_json::to_string(&SanitizeModelResponseRequest::new("out", Some("in".into())))
                .unwrap_or_default();
        assert_eq!(
            body,
            r#"{"modelResponseData":{"text":"out"},"userPrompt":"in"}"#
        );
        assert_eq!(
            method_path("projects/p/locations/l/templates/t", true),
            "/v1/projects/p/locations/l/templates/t:sanitizeUserPrompt"
        );
    }

    #[test]
    fn local_findings_set_the_same_variables() {
        let f = Finding {
            category: Builtin::Jailbreak.into(),
            confidence: Confidence::High,
            action: super::super::Action::Block,
            start: 0,
            end: 3,
        };
        let v = local_variables("SanitizeUserPrompt", "p", &[f]);
        assert!(v.contains(&(
            "SanitizeUserPrompt.p.piAndJailbreakFilterResult.matchState".into(),
            "MATCH_FOUND".into()
        )));
        assert!(v.contains(&(
            "SanitizeUserPrompt.p.sdpFilterResult.inspectResult.matchState".into(),
            "NO_MATCH_FOUND".into()
        )));
    }
}
