//! Policies built through the registry, and flows compiled from their steps: conditions,
//! phases, and the checks a flow must pass (steps resolve, caches after authentication,
//! bodies fit one ext_proc message).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::errors::ConfigError;
use super::load::{typed, Declared, DocAt, Parsed};
use super::snapshot::{Flow, FlowMatch};
use super::spec::{DefaultFaultRuleSpec, FaultRuleSpec, FlowSpec, LlmSpec, StepSpec};
use crate::expr::Condition;
use crate::pipeline::{Direction, DirectionPipeline, Policy, Step};
use crate::policies::{self, BuildContext};
use crate::services::Services;
use crate::telemetry::FlowMetrics;

/// Largest ext_proc message `serve` accepts by default (`--max-message-bytes`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Room kept in one ext_proc message beside a buffered body: the message's own framing and
/// whatever metadata Envoy forwards with it.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// What the serving process accepts besides the files. `serve` and `validate` take the same
/// options, so both judge a configuration alike.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `--max-message-bytes`: a flow whose largest body cannot fit in one message is refused.
    pub max_message_bytes: usize,
    /// Where `valueFrom: {env: …}` reads variables: the process environment.
    pub env: EnvLookup,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            env: EnvLookup::default(),
        }
    }
}

/// Reads environment variables for `valueFrom: {env: …}`: the process environment, or a
/// fixed set (tests, which must not mutate the process environment other threads read).
#[derive(Clone, Default)]
pub struct EnvLookup(Option<Arc<HashMap<String, String>>>);

impl EnvLookup {
    /// Only these variables, whatever the process environment holds.
    pub fn fixed<K: Into<String>, V: Into<String>>(vars: impl IntoIterator<Item = (K, V)>) -> Self {
        Self(Some(Arc::new(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )))
    }

    pub fn var(&self, name: &str) -> Option<String> {
        match &self.0 {
            None => std::env::var(name).ok(),
            Some(vars) => vars.get(name).cloned(),
        }
    }
}

impl std::fmt::Debug for EnvLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the values may be secrets.
        match &self.0 {
            None => f.write_str("EnvLookup(process)"),
            Some(vars) => f.debug_set().entries(vars.keys()).finish(),
        }
    }
}

/// The compiled policies, and the `scope` of each ResponseCache policy as written.
type BuiltPolicies = (BTreeMap<String, Arc<dyn Policy>>, HashMap<String, String>);

pub(super) fn build_policies(
    docs: Vec<Parsed>,
    config_dir: Option<&Path>,
    services: &Services,
    errors: &mut Vec<ConfigError>,
) -> BuiltPolicies {
    let mut out = BTreeMap::new();
    let mut cache_scopes = HashMap::new();
    for d in docs {
        let name = d.env.metadata.name.clone();
        let loc = d.at.named("Policy", &name);
        let mut spec = d.env.spec;
        let type_name = match spec.as_mapping_mut().and_then(|m| m.remove("type")) {
            Some(serde_norway::Value::String(t)) => t,
            _ => {
                errors.push(ConfigError {
                    location: loc,
                    message: "field `spec.type` is required: the policy type, e.g. AssignMessage"
                        .into(),
                });
                continue;
            }
        };
        let Some(build) = policies::builder(&type_name) else {
            let message = if policies::ALL_TYPES.contains(&type_name.as_str()) {
                format!(
                    "policy type `{type_name}` is not implemented in this version of tollgate yet"
                )
            } else {
                format!(
                    "unknown policy type `{type_name}`; known types: {}",
                    policies::ALL_TYPES.join(", ")
                )
            };
            errors.push(ConfigError {
                location: loc,
                message,
            });
            continue;
        };
        if type_name == "ResponseCache" {
            let scope = spec
                .get("scope")
                .and_then(serde_norway::Value::as_str)
                .unwrap_or("global");
            cache_scopes.insert(name.clone(), scope.to_owned());
        }
        let ctx = BuildContext {
            name: name.clone(),
            config_dir: config_dir.map(Path::to_path_buf),
            services: services.clone(),
        };
        match build(&ctx, spec) {
            Ok(p) => {
                out.insert(name, p);
            }
            Err(e) => errors.push(ConfigError {
                location: loc,
                message: if e.field.is_empty() {
                    e.message
                } else {
                    format!("field `spec.{}`: {}", e.field, e.message)
                },
            }),
        }
    }
    (out, cache_scopes)
}

/// Builds a direction's steps. `Err` when a step is unusable; a step naming a Policy that
/// was written but failed to compile gives no message of its own (that Policy's error is
/// the root cause) yet still fails the flow.
fn build_steps(
    steps: Vec<StepSpec>,
    field: &str,
    policies: &BTreeMap<String, Arc<dyn Policy>>,
    declared: &Declared,
    errors: &mut Vec<String>,
) -> Result<Vec<Step>, ()> {
    let mut out = Vec::new();
    let mut failed = false;
    for (i, s) in steps.into_iter().enumerate() {
        let Some(policy) = policies.get(&s.policy) else {
            if !declared.policy(&s.policy) {
                errors.push(format!(
                    "field `spec.{field}[{i}].policy`: no Policy named `{}`",
                    s.policy
                ));
            }
            failed = true;
            continue;
        };
        let compiled = match (s.condition.as_deref(), s.apigee_condition.as_deref()) {
            (None, None) => None,
            (Some(c), None) => Some(("condition", Condition::compile(c))),
            (None, Some(c)) => Some(("apigeeCondition", Condition::compile_apigee(c))),
            (Some(_), Some(_)) => {
                errors.push(format!(
                    "field `spec.{field}[{i}]`: a step has `condition` (CEL) or \
                     `apigeeCondition` (Apigee), not both"
                ));
                failed = true;
                continue;
            }
        };
        let condition = match compiled {
            None => None,
            Some((_, Ok(c))) => Some(Arc::new(c)),
            Some((key, Err(e))) => {
                errors.push(format!("field `spec.{field}[{i}].{key}`: {e}"));
                failed = true;
                continue;
            }
        };
        out.push(Step {
            policy_name: s.policy,
            policy: policy.clone(),
            condition,
            continue_on_error: s.continue_on_error,
        });
    }
    if failed {
        Err(())
    } else {
        Ok(out)
    }
}

/// A step that only a fault rule may hold (AssignMessage's `set.statusCode`) in the
/// flow's request or response.
fn check_fault_only(steps: &[Step], field: &str, errors: &mut Vec<String>) {
    for (i, s) in steps.iter().enumerate() {
        if let Some(what) = s.policy.fault_rule_only() {
            errors.push(format!(
                "field `spec.{field}[{i}]`: {} `{}` {what}, which only a fault rule's steps \
                 can do (they shape the error response); move it to `faultRules` or \
                 `defaultFaultRule`",
                s.policy.type_name(),
                s.policy_name
            ));
        }
    }
}

/// Fault-rule steps run once, on the error response: a step needing more hooks than that
/// (chunks, a copy of the response, the after-exchange, LLM tracking) cannot run there.
fn check_fault_steps(steps: &[Step], field: &str, errors: &mut Vec<String>) -> bool {
    let mut ok = true;
    for (i, s) in steps.iter().enumerate() {
        let h = s.policy.hooks();
        if h.response_chunks.is_some() || h.response_copy || h.after_exchange || h.llm {
            errors.push(format!(
                "field `spec.{field}[{i}]`: {} `{}` needs hooks beyond one run on the error \
                 response (streaming, a response copy, after-exchange or LLM tracking); a \
                 fault rule cannot run it",
                s.policy.type_name(),
                s.policy_name
            ));
            ok = false;
        }
    }
    ok
}

/// Compiles a flow's fault rules; `Ok(None)` when it has none.
fn build_fault_rules(
    rules: Vec<FaultRuleSpec>,
    default: Option<DefaultFaultRuleSpec>,
    policies: &BTreeMap<String, Arc<dyn Policy>>,
    declared: &Declared,
    errors: &mut Vec<String>,
) -> Result<Option<Arc<crate::pipeline::faults::FaultRules>>, ()> {
    use crate::pipeline::faults::{DefaultFaultRule, FaultRule, FaultRules};
    if rules.is_empty() && default.is_none() {
        return Ok(None);
    }
    let mut failed = false;
    let mut out = FaultRules::default();
    let mut names = std::collections::HashSet::new();
    for (i, r) in rules.into_iter().enumerate() {
        let at = format!("faultRules[{i}]");
        if r.name.is_empty() {
            errors.push(format!("field `spec.{at}.name`: give the rule a name"));
            failed = true;
        } else if !names.insert(r.name.clone()) {
            errors.push(format!(
                "field `spec.{at}.name`: another fault rule is named `{}`",
                r.name
            ));
            failed = true;
        }
        let condition = match (r.condition.as_deref(), r.apigee_condition.as_deref()) {
            (None, None) => None,
            (Some(c), None) => match Condition::compile(c) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    errors.push(format!("field `spec.{at}.condition`: {e}"));
                    failed = true;
                    None
                }
            },
            (None, Some(c)) => match Condition::compile_apigee(c) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    errors.push(format!("field `spec.{at}.apigeeCondition`: {e}"));
                    failed = true;
                    None
                }
            },
            (Some(_), Some(_)) => {
                errors.push(format!(
                    "field `spec.{at}`: a fault rule has `condition` (CEL) or \
                     `apigeeCondition` (Apigee), not both"
                ));
                failed = true;
                None
            }
        };
        let field = format!("{at}.steps");
        match build_steps(r.steps, &field, policies, declared, errors) {
            Ok(steps) => {
                failed |= !check_fault_steps(&steps, &field, errors);
                out.rules.push(FaultRule {
                    name: r.name,
                    condition,
                    steps,
                });
            }
            Err(()) => failed = true,
        }
    }
    if let Some(d) = default {
        let field = "defaultFaultRule.steps";
        match build_steps(d.steps, field, policies, declared, errors) {
            Ok(steps) => {
                failed |= !check_fault_steps(&steps, field, errors);
                out.default = Some(DefaultFaultRule {
                    name: d.name.unwrap_or_else(|| "default".to_owned()),
                    always_enforce: d.always_enforce,
                    steps,
                });
            }
            Err(()) => failed = true,
        }
    }
    if failed {
        Err(())
    } else {
        Ok(Some(Arc::new(out)))
    }
}

/// What flows are checked against besides their own spec.
pub(super) struct FlowChecks<'a> {
    pub(super) declared: &'a Declared,
    /// `scope` of each ResponseCache policy.
    pub(super) cache_scopes: &'a HashMap<String, String>,
    pub(super) options: &'a LoadOptions,
}

/// Authentication policy types: what sets the caller's identity.
const AUTH_TYPES: &[&str] = &["VerifyApiKey", "VerifyJwt"];

/// A ResponseCache lookup before the flow's authentication answers hits to callers nobody
/// checked. Shared scopes (`global`, `flow`) would hand one caller's response to anyone:
/// refused. A per-app cache there never stores (no `client_id` yet): warned.
pub(super) fn check_cache_placement(
    steps: &[Step],
    cache_scopes: &HashMap<String, String>,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let Some(auth) = steps
        .iter()
        .position(|s| AUTH_TYPES.contains(&s.policy.type_name()))
    else {
        return;
    };
    for (i, s) in steps[..auth].iter().enumerate() {
        if s.policy.type_name() != "ResponseCache" {
            continue;
        }
        let auth_name = &steps[auth].policy_name;
        let scope = cache_scopes
            .get(&s.policy_name)
            .map_or("global", String::as_str);
        match scope {
            "global" | "flow" => errors.push(format!(
                "field `spec.request[{i}]`: ResponseCache `{}` (scope {scope}) comes before \
                 the authentication step `{auth_name}`: its hits would answer callers nobody \
                 checked; place it after `{auth_name}`",
                s.policy_name
            )),
            _ => warnings.push(format!(
                "field `spec.request[{i}]`: ResponseCache `{}` (scope {scope}) comes before \
                 the authentication step `{auth_name}`, which identifies the caller it is \
                 scoped by: place it after `{auth_name}`",
                s.policy_name
            )),
        }
    }
}

/// Inserts the LLM tracker's step ([`crate::llm::track`]) into a flow that tracks: one
/// with an `llm:` block or a step that declares `Hooks::llm`. On the request, right before
/// the first such request step (else after the last request step); on the response, first.
fn add_llm_tracking(
    spec: Option<&LlmSpec>,
    request: &mut Vec<Step>,
    response: &mut Vec<Step>,
) -> Result<(), String> {
    let first_llm = request.iter().position(|s| s.policy.hooks().llm);
    let tracks =
        spec.is_some() || first_llm.is_some() || response.iter().any(|s| s.policy.hooks().llm);
    if !tracks {
        return Ok(());
    }
    let spec = spec.cloned().unwrap_or_default();
    let mut counting = crate::llm::CountingConfig::default();
    if let Some(r) = spec.counting.chars_per_token {
        counting.chars_per_token = r;
    }
    let mut by_model: Vec<(String, f64)> =
        spec.counting.chars_per_token_by_model.into_iter().collect();
    // The longest prefix first: `claude-3-haiku` before `claude`.
    by_model.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    counting.prefix_ratios = by_model;
    let cfg = crate::llm::track::TrackConfig::new(counting, spec.include_usage)
        .map_err(|e| format!("field `spec.llm.counting`: {e}"))?;
    // Built now, at load, rather than on the first request that counts.
    crate::llm::TokenCounter::warm_up();
    let policy: Arc<dyn Policy> = Arc::new(crate::llm::track::LlmTracking::new(Arc::new(cfg)));
    let step = Step {
        policy_name: crate::llm::track::STEP_NAME.to_owned(),
        policy,
        condition: None,
        continue_on_error: false,
    };
    request.insert(first_llm.unwrap_or(request.len()), step.clone());
    response.insert(0, step);
    Ok(())
}

pub(super) fn build_flows(
    docs: Vec<Parsed>,
    policies: &BTreeMap<String, Arc<dyn Policy>>,
    checks: &FlowChecks<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<ConfigError>,
) -> Vec<(Flow, DocAt)> {
    let mut out = Vec::new();
    for d in docs {
        let name = d.env.metadata.name.clone();
        let loc = d.at.named("Flow", &name);
        let spec: FlowSpec = match typed(d.env.spec) {
            Ok(s) => s,
            Err(message) => {
                errors.push(ConfigError {
                    location: loc,
                    message,
                });
                continue;
            }
        };
        let mut msgs = Vec::new();
        if spec.max_body_bytes == 0 {
            msgs.push("field `spec.maxBodyBytes`: must be greater than 0".to_owned());
        }
        let matcher = match spec.match_.as_ref().map(FlowMatch::from_spec) {
            None => None,
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                msgs.extend(e);
                None
            }
        };
        let declared = checks.declared;
        let request = build_steps(spec.request, "request", policies, declared, &mut msgs);
        let response = build_steps(spec.response, "response", policies, declared, &mut msgs);
        let faults = build_fault_rules(
            spec.fault_rules,
            spec.default_fault_rule,
            policies,
            declared,
            &mut msgs,
        );
        let base_path = match spec.base_path.as_deref() {
            None => None,
            Some(b) if b.starts_with('/') && !b.contains(['?', '#']) => Some(Arc::from(b)),
            Some(b) => {
                msgs.push(format!(
                    "field `spec.basePath`: `{b}` must be a path starting with `/`, without \
                     a query"
                ));
                None
            }
        };
        if let (Ok(request), Ok(response)) = (&request, &response) {
            check_fault_only(request, "request", &mut msgs);
            check_fault_only(response, "response", &mut msgs);
        }
        let (Ok(request), Ok(response), Ok(faults)) = (request, response, faults) else {
            errors.extend(msgs.into_iter().map(|message| ConfigError {
                location: loc.clone(),
                message,
            }));
            continue;
        };
        let (mut request, mut response) = (request, response);
        if let Err(e) = add_llm_tracking(spec.llm.as_ref(), &mut request, &mut response) {
            errors.push(ConfigError {
                location: loc.clone(),
                message: e,
            });
            continue;
        }
        let mut warns = Vec::new();
        check_cache_placement(&request, checks.cache_scopes, &mut msgs, &mut warns);
        warnings.extend(warns.into_iter().map(|message| ConfigError {
            location: loc.clone(),
            message,
        }));
        let request = DirectionPipeline::compile(request, Direction::Request);
        let response = DirectionPipeline::compile(response, Direction::Response);
        let max_message = checks.options.max_message_bytes;
        if (request.needs_body() || response.needs_body())
            && spec.max_body_bytes.saturating_add(MESSAGE_OVERHEAD_BYTES) > max_message
        {
            // A buffered body arrives in one message: a larger one ends the stream instead
            // of reaching the body steps.
            let room = max_message.saturating_sub(MESSAGE_OVERHEAD_BYTES);
            let fix = if room == 0 {
                // No body fits at all: lowering maxBodyBytes is no way out.
                String::new()
            } else {
                format!("lower maxBodyBytes to {room} or ")
            };
            msgs.push(format!(
                "field `spec.maxBodyBytes`: {} bytes cannot arrive in one ext_proc message \
                 of at most {max_message} bytes (--max-message-bytes, keeping \
                 {MESSAGE_OVERHEAD_BYTES} for framing and metadata); {fix}raise \
                 --max-message-bytes to {}",
                spec.max_body_bytes,
                spec.max_body_bytes.saturating_add(MESSAGE_OVERHEAD_BYTES)
            ));
        }
        if !msgs.is_empty() {
            errors.extend(msgs.into_iter().map(|message| ConfigError {
                location: loc.clone(),
                message,
            }));
            continue;
        }
        out.push((
            Flow {
                metrics: FlowMetrics::new(&name),
                matcher,
                is_default: spec.default,
                priority: spec.priority,
                error_format: spec.error_format,
                max_body_bytes: spec.max_body_bytes,
                request,
                response,
                name,
                base_path,
                faults,
            },
            d.at,
        ));
    }
    out
}
