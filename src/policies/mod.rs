//! Policy types, one module each (a file, or a folder with a `mod.rs` when a policy has
//! parts of its own). A module defines `pub const TYPE: &str` (the `spec.type` name) and
//! `pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>,
//! SpecError>`; adding a policy type is adding its module, a `mod` line and a [`REGISTRY`]
//! entry below.

use std::sync::Arc;

use crate::pipeline::Policy;

pub mod common;
pub use common::{
    check_header_name, parse_spec, read_config_file, record_read, recording_reads,
    valid_header_value, BuildContext, SpecError,
};

pub mod access_control;
pub mod assign_message;
pub mod cors;
pub mod extract_variables;
pub mod generate_jwt;
pub mod inference_objective;
pub mod javascript;
pub mod json_threat_protection;
pub mod key_value_map;
pub mod llm_cost_budget;
#[cfg(test)]
pub(crate) mod llm_test_support;
pub mod llm_token_quota;
pub mod model_router;
pub mod monetization_limits_check;
pub mod oas_validation;
pub mod prompt_token_limit;
pub mod quota;
pub mod raise_fault;
pub mod response_cache;
pub mod sanitize_external;
pub mod sanitize_prompt;
pub mod sanitize_response;
pub mod semantic_cache;
pub mod service_callout;
pub mod spike_arrest;
pub mod verify_api_key;
pub mod verify_jwt;

pub type BuildFn = fn(&BuildContext, serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError>;

/// Every implemented policy type and its builder.
pub static REGISTRY: &[(&str, BuildFn)] = &[
    (access_control::TYPE, access_control::build),
    (assign_message::TYPE, assign_message::build),
    (cors::TYPE, cors::build),
    (extract_variables::TYPE, extract_variables::build),
    (generate_jwt::TYPE, generate_jwt::build),
    (generate_jwt::APIGEE_TYPE, generate_jwt::build),
    (inference_objective::TYPE, inference_objective::build),
    (javascript::TYPE, javascript::build),
    (json_threat_protection::TYPE, json_threat_protection::build),
    (key_value_map::TYPE, key_value_map::build),
    (llm_cost_budget::TYPE, llm_cost_budget::build),
    (llm_token_quota::TYPE, llm_token_quota::build),
    (
        monetization_limits_check::TYPE,
        monetization_limits_check::build,
    ),
    (model_router::TYPE, model_router::build),
    (oas_validation::TYPE, oas_validation::build),
    (prompt_token_limit::TYPE, prompt_token_limit::build),
    (quota::TYPE, quota::build),
    (raise_fault::TYPE, raise_fault::build),
    (response_cache::TYPE, response_cache::build),
    (sanitize_prompt::TYPE, sanitize_prompt::build),
    (sanitize_prompt::APIGEE_TYPE, sanitize_prompt::build),
    (sanitize_response::TYPE, sanitize_response::build),
    (sanitize_response::APIGEE_TYPE, sanitize_response::build),
    (semantic_cache::TYPE, semantic_cache::build),
    (
        semantic_cache::APIGEE_LOOKUP_TYPE,
        semantic_cache::build_lookup,
    ),
    (
        semantic_cache::APIGEE_POPULATE_TYPE,
        semantic_cache::build_populate,
    ),
    (service_callout::TYPE, service_callout::build),
    (spike_arrest::TYPE, spike_arrest::build),
    (verify_api_key::TYPE, verify_api_key::build),
    (verify_jwt::TYPE, verify_jwt::build),
];

/// Every policy type of the configuration model, implemented or not yet.
pub const ALL_TYPES: &[&str] = &[
    "VerifyApiKey",
    "VerifyJwt",
    "SpikeArrest",
    "Quota",
    "OasValidation",
    "ResponseCache",
    "KeyValueMap",
    "JavaScript",
    "ServiceCallout",
    "AssignMessage",
    "RaiseFault",
    "InferenceObjective",
    "LlmTokenQuota",
    "PromptTokenLimit",
    "LlmCostBudget",
    "MonetizationLimitsCheck",
    "SanitizePrompt",
    "SanitizeUserPrompt",
    "SanitizeResponse",
    "SanitizeModelResponse",
    "SemanticCache",
    "SemanticCacheLookup",
    "SemanticCachePopulate",
    "ModelRouter",
    "ExtractVariables",
    "AccessControl",
    "CORS",
    "JSONThreatProtection",
    "GenerateJwt",
    "GenerateJWT",
];

pub fn builder(type_name: &str) -> Option<BuildFn> {
    REGISTRY
        .iter()
        .find(|(t, _)| *t == type_name)
        .map(|(_, b)| *b)
        .or_else(|| {
            EXTRA
                .load()
                .iter()
                .find(|(t, _)| *t == type_name)
                .map(|(_, b)| *b)
        })
}

/// Policy types added at run time by [`register`].
static EXTRA: std::sync::LazyLock<arc_swap::ArcSwap<Vec<(&'static str, BuildFn)>>> =
    std::sync::LazyLock::new(Default::default);

/// Adds a policy type beside the built-in ones, for the configurations compiled from now
/// on: how tests (and programs embedding tollgate) exercise hooks no built-in type uses
/// yet. A built-in type of the same name wins; registering a name again replaces it.
pub fn register(type_name: &'static str, build: BuildFn) {
    EXTRA.rcu(|list| {
        let mut list: Vec<_> = list
            .iter()
            .filter(|(t, _)| *t != type_name)
            .copied()
            .collect();
        list.push((type_name, build));
        list
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_types_build() {
        fn build(
            ctx: &BuildContext,
            _spec: serde_norway::Value,
        ) -> Result<Arc<dyn Policy>, SpecError> {
            Err(SpecError::new("", format!("built {}", ctx.name)))
        }
        assert!(builder("TestOnlyRegistered").is_none());
        register("TestOnlyRegistered", build);
        let b = builder("TestOnlyRegistered").expect("registered");
        let ctx = BuildContext {
            name: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            b(&ctx, serde_norway::Value::Null).unwrap_err().message,
            "built x"
        );
    }

    #[test]
    fn registry_has_the_implemented_types() {
        for (t, _) in REGISTRY {
            assert!(ALL_TYPES.contains(t), "{t} missing from ALL_TYPES");
        }
        assert!(builder("AssignMessage").is_some());
        assert!(builder("RaiseFault").is_some());
        assert!(builder("Nope").is_none());
    }

    /// The list above is written by hand: every policy module under `src/policies/` (a file,
    /// or a folder's `mod.rs`, that defines `TYPE`) must have its entry.
    #[test]
    fn registry_lists_every_policy_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/policies");
        let modules = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| if p.is_dir() { p.join("mod.rs") } else { p })
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter(|s| s.contains("\npub const TYPE: &str"))
            // A module also registered under Apigee's names has an entry per name.
            .map(|s| 1 + s.matches("\npub const APIGEE_").count())
            .sum::<usize>();
        assert_eq!(
            REGISTRY.len(),
            modules,
            "a policy module without a REGISTRY entry"
        );
        let mut types: Vec<&str> = REGISTRY.iter().map(|(t, _)| *t).collect();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), REGISTRY.len(), "a type registered twice");
    }
}
