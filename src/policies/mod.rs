//! Policy types, one module each (a file, or a folder with a `mod.rs` when a policy has
//! parts of its own). A module defines `pub const TYPE: &str` (the `spec.type` name) and
//! `pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>,
//! SpecError>`; adding a policy type is adding its module, a `mod` line and a [`REGISTRY`]
//! entry below.

use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::pipeline::Policy;

pub type BuildFn = fn(&BuildContext, serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError>;

pub mod assign_message;
pub mod javascript;
pub mod key_value_map;
pub mod oas_validation;
pub mod quota;
pub mod raise_fault;
pub mod response_cache;
pub mod service_callout;
pub mod spike_arrest;
pub mod verify_api_key;
pub mod verify_jwt;

/// Every implemented policy type and its builder.
pub static REGISTRY: &[(&str, BuildFn)] = &[
    (assign_message::TYPE, assign_message::build),
    (javascript::TYPE, javascript::build),
    (key_value_map::TYPE, key_value_map::build),
    (oas_validation::TYPE, oas_validation::build),
    (quota::TYPE, quota::build),
    (raise_fault::TYPE, raise_fault::build),
    (response_cache::TYPE, response_cache::build),
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
    "LlmTokenQuota",
    "PromptTokenLimit",
    "SanitizePrompt",
    "SanitizeResponse",
    "SemanticCache",
    "ModelRouter",
];

/// What a builder may need besides its spec.
#[derive(Debug, Clone, Default)]
pub struct BuildContext {
    /// The policy's `metadata.name`.
    pub name: String,
    /// The configuration directory, for files a policy refers to.
    pub config_dir: Option<PathBuf>,
    /// Run-time services (consumer index, ...).
    pub services: crate::services::Services,
}

/// A spec that does not build: the field (a path like `set.headers.x-a`) and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("field `{field}`: ") })]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub fn builder(type_name: &str) -> Option<BuildFn> {
    REGISTRY
        .iter()
        .find(|(t, _)| *t == type_name)
        .map(|(_, b)| *b)
}

/// Deserializes a policy's spec (without `type`), naming the offending field on error.
pub fn parse_spec<T: DeserializeOwned>(spec: serde_norway::Value) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        SpecError::new(field, e.into_inner().to_string())
    })
}

/// Checks a header name a policy will set or remove. Envoy ignores or rejects changes to
/// some headers; refusing them at load is clearer than a silent no-op at run time.
pub fn check_header_name(name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let valid = !lower.is_empty()
        && lower.bytes().enumerate().all(|(i, b)| {
            (i == 0 && b == b':') || b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
        });
    if !valid {
        return Err(format!("`{name}` is not a valid header name"));
    }
    if lower.starts_with(':') && lower != ":path" {
        return Err(format!(
            "`{name}`: only `:path` may be changed among pseudo-headers"
        ));
    }
    if lower == "host" || lower.starts_with("x-envoy") {
        return Err(format!("`{name}`: Envoy ignores changes to this header"));
    }
    if matches!(
        lower.as_str(),
        "content-length" | "transfer-encoding" | "connection" | "keep-alive" | "upgrade" | "te"
    ) {
        return Err(format!(
            "`{name}` is managed by Envoy and cannot be changed by a policy"
        ));
    }
    if lower == "x-gateway-destination-endpoint" {
        return Err(format!(
            "`{name}` belongs to the Inference Gateway endpoint picker; tollgate never sets it"
        ));
    }
    Ok(lower)
}

thread_local! {
    /// Files read while a configuration compiles on this thread (see [`record_read`]).
    static READ_FILES: std::cell::RefCell<Option<Vec<PathBuf>>> = const { std::cell::RefCell::new(None) };
}

/// Notes that compiling the configuration reads `path` (a script, an OpenAPI document, a
/// key file): the reloader fingerprints it with the configuration files, so editing it
/// reloads like editing the YAML.
pub fn record_read(path: &std::path::Path) {
    READ_FILES.with(|r| {
        if let Some(v) = r.borrow_mut().as_mut() {
            v.push(path.to_path_buf());
        }
    });
}

/// Runs `f` and returns, sorted and without duplicates, the files it read (through
/// [`record_read`]); an enclosing recording sees them too.
pub fn recording_reads<R>(f: impl FnOnce() -> R) -> (R, Vec<PathBuf>) {
    let outer = READ_FILES.with(|r| r.borrow_mut().replace(Vec::new()));
    let out = f();
    let mut read = READ_FILES
        .with(|r| std::mem::replace(&mut *r.borrow_mut(), outer))
        .unwrap_or_default();
    read.sort();
    read.dedup();
    READ_FILES.with(|r| {
        if let Some(v) = r.borrow_mut().as_mut() {
            v.extend(read.iter().cloned());
        }
    });
    (out, read)
}

/// Reads a file a policy refers to: relative paths are beside the configuration (files
/// not named `*.yaml`/`*.yml`/`*.json`, or in a subdirectory, so the loader does not take
/// them for configuration).
pub fn read_config_file(ctx: &BuildContext, field: &str, file: &str) -> Result<Vec<u8>, SpecError> {
    let path = std::path::Path::new(file);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        ctx.config_dir
            .as_deref()
            .ok_or_else(|| {
                SpecError::new(
                    field,
                    "a relative path needs a configuration directory (this configuration is not from one)",
                )
            })?
            .join(path)
    };
    record_read(&path);
    std::fs::read(&path).map_err(|e| SpecError::new(field, format!("{}: {e}", path.display())))
}

/// A header value is sent only if Envoy would accept it: no CR, LF or NUL.
pub fn valid_header_value(v: &str) -> bool {
    !v.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    /// or a folder with a `mod.rs`) must have its entry, once.
    #[test]
    fn registry_lists_every_policy_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/policies");
        let modules = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                (p.extension().is_some_and(|x| x == "rs") && !p.ends_with("mod.rs"))
                    || p.join("mod.rs").is_file()
            })
            .count();
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

    #[test]
    fn header_names() {
        assert_eq!(check_header_name("X-Foo").unwrap(), "x-foo");
        assert!(check_header_name(":path").is_ok());
        assert!(check_header_name(":authority").is_err());
        assert!(check_header_name("x-envoy-original-path").is_err());
        assert!(check_header_name("x-gateway-destination-endpoint").is_err());
        assert!(check_header_name("bad name").is_err());
        assert!(check_header_name("").is_err());
        assert!(!valid_header_value("a\r\nb"));
        assert!(valid_header_value("a b"));
    }
}
