//! What every policy module builds with: its [`BuildContext`], the [`SpecError`] a spec
//! that does not build returns, spec parsing, header-name checks, and reads of the files a
//! configuration refers to (recorded, so the reloader watches them too). Kept apart from
//! the registry in `mod.rs`, which names every policy module: a module the policies use
//! (`ratelimit::policy`, say) can use this one without reaching the registry.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

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
