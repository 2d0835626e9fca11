//! The documents as written: Kubernetes-style envelopes and the specs of the kinds this
//! module compiles itself (`Flow`, `TemplateRule`). Policy specs belong to their policy
//! files. Every struct refuses unknown fields.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::fault::ErrorFormat;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: serde_norway::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Default largest body a flow buffers: Envoy's own default buffer limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlowSpec {
    /// Which traffic the flow takes when no extension metadata names a flow. Without it the
    /// flow is chosen only by name (`tollgate-flow` metadata) or as the default.
    #[serde(default, rename = "match")]
    pub match_: Option<MatchSpec>,
    /// The flow for traffic no other flow matches.
    #[serde(default)]
    pub default: bool,
    /// Higher wins among matching flows; ties go to the more specific match.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub error_format: ErrorFormat,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub request: Vec<StepSpec>,
    #[serde(default)]
    pub response: Vec<StepSpec>,
    /// LLM tracking: present, it turns tracking on even when no step reads the LLM slots
    /// (metrics-only flows), and sets how tokens are counted.
    #[serde(default)]
    pub llm: Option<LlmSpec>,
    /// The path the flow's API lives under (Apigee's ProxyEndpoint `BasePath`):
    /// `proxy.basepath`, and `proxy.pathsuffix` is the request path after it. It does not
    /// select the flow (`match.pathPrefixes` does).
    #[serde(default)]
    pub base_path: Option<String>,
    /// What runs when the flow rejects an exchange (see `pipeline::faults`): tried from
    /// the last to the first, the first whose condition holds runs.
    #[serde(default)]
    pub fault_rules: Vec<FaultRuleSpec>,
    /// Runs when no fault rule ran (or always, with `alwaysEnforce`).
    #[serde(default)]
    pub default_fault_rule: Option<DefaultFaultRuleSpec>,
}

/// One of a flow's `faultRules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultRuleSpec {
    pub name: String,
    /// A CEL condition; none: the rule always holds.
    #[serde(default)]
    pub condition: Option<String>,
    /// A condition in Apigee's language, instead of `condition`.
    #[serde(default)]
    pub apigee_condition: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
}

/// A flow's `defaultFaultRule`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultFaultRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub always_enforce: bool,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
}

/// A flow's `llm:` block.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LlmSpec {
    /// Add `stream_options.include_usage: true` to OpenAI streaming requests (Chat
    /// Completions, Completions) that did not ask, and drop the extra usage-only chunk from
    /// what their client sees; usage is still recorded.
    #[serde(default)]
    pub include_usage: bool,
    #[serde(default)]
    pub counting: CountingSpec,
}

/// How models without an exact tokenizer (every non-OpenAI family) are approximated.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CountingSpec {
    /// Characters per token (Latin script; CJK counts one token a character). Default 4.
    #[serde(default)]
    pub chars_per_token: Option<f64>,
    /// Per model-name prefix (case-insensitive; the longest matching prefix wins), e.g.
    /// `claude: 3.5`.
    #[serde(default)]
    pub chars_per_token_by_model: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// Exact host names or `*.suffix` wildcards; the port is ignored.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StepSpec {
    pub policy: String,
    /// A CEL condition.
    #[serde(default)]
    pub condition: Option<String>,
    /// A condition in Apigee's language (`request.verb = "POST"`), instead of `condition`.
    #[serde(default)]
    pub apigee_condition: Option<String>,
    #[serde(default)]
    pub continue_on_error: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TemplateRuleSpec {
    /// Flow names the rule applies to; `*` wildcards allowed. Default: every flow.
    #[serde(default)]
    pub flows: Option<Vec<String>>,
    /// Policy types every such flow must contain.
    #[serde(default)]
    pub required_policy_types: Vec<String>,
    /// Policy types no such flow may contain.
    #[serde(default)]
    pub denied_policy_types: Vec<String>,
}

/// An `ApiProduct` document's spec (the name is `metadata.name`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiProductSpec {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub operations: Vec<crate::consumer::Operation>,
    #[serde(default)]
    pub quota: Option<crate::consumer::QuotaSettings>,
    #[serde(default)]
    pub llm_token_quota: Option<crate::consumer::QuotaSettings>,
    #[serde(default)]
    pub approval_type: crate::consumer::ApprovalType,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// An `App` document's spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AppSpec {
    pub developer_email: String,
    #[serde(default)]
    pub status: crate::consumer::AppStatus,
    #[serde(default)]
    pub products: Vec<String>,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// An API key in a file: never in clear text. Either its hash, or where to read it
/// (an environment variable, or a file such as a mounted Kubernetes Secret).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeySpec {
    pub id: String,
    #[serde(default)]
    pub hash: Option<String>,
    #[serde(default)]
    pub value_from: Option<ValueFrom>,
    #[serde(default)]
    pub status: crate::consumer::KeyStatus,
    /// RFC 3339 time, e.g. `2027-01-01T00:00:00Z`.
    #[serde(default)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueFrom {
    #[serde(default)]
    pub env: Option<String>,
    /// Relative paths are relative to the configuration directory.
    #[serde(default)]
    pub file: Option<String>,
}

/// A `KeyValueMap` document's spec: the map's initial entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyValueMapSpec {
    #[serde(default)]
    pub entries: BTreeMap<String, KvmEntrySpec>,
}

/// `key: value`, or `key: {value | valueFrom, secret}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum KvmEntrySpec {
    Plain(String),
    Full(KvmEntryFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KvmEntryFull {
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub value_from: Option<ValueFrom>,
    #[serde(default)]
    pub secret: bool,
}
