//! Loading: the configuration files of a directory, their fingerprint, and their YAML
//! documents parsed into envelopes (kind, name, spec), each remembering where it was
//! written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::errors::{ConfigError, ConfigErrors};
use super::spec::Envelope;

/// A configuration file's name (for messages) and text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// Reads the configuration files of `dir`: regular files (symlinks followed, as in a
/// mounted ConfigMap) named `*.yaml`, `*.yml` or `*.json`, not hidden, in name order.
pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, ConfigErrors> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ConfigErrors::one(
            dir.display().to_string(),
            format!("cannot read directory: {e}"),
        )
    })?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| ConfigErrors::one(dir.display().to_string(), e.to_string()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        if !(name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")) {
            continue;
        }
        // fs::metadata follows symlinks: ConfigMap keys are symlinks into `..data/`.
        match std::fs::metadata(entry.path()) {
            Ok(m) if m.is_file() => paths.push(entry.path()),
            Ok(_) => {}
            Err(e) => {
                return Err(ConfigErrors::one(
                    entry.path().display().to_string(),
                    e.to_string(),
                ))
            }
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| ConfigErrors::one(p.display().to_string(), format!("cannot read: {e}")))?;
        files.push(SourceFile {
            name: p.display().to_string(),
            text,
        });
    }
    Ok(files)
}

/// A digest of the files' names and contents: equal digests mean nothing changed.
pub fn fingerprint(files: &[SourceFile]) -> String {
    fingerprint_with(files, &[])
}

/// [`fingerprint`], also covering the files the configuration refers to (scripts, OpenAPI
/// documents, key files): names and contents, or that one cannot be read.
pub fn fingerprint_with(files: &[SourceFile], referenced: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.name.as_bytes());
        h.update([0]);
        h.update(f.text.as_bytes());
        h.update([0]);
    }
    for p in referenced {
        h.update(p.as_os_str().as_encoded_bytes());
        h.update([1]);
        match std::fs::read(p) {
            Ok(bytes) => h.update(&bytes),
            Err(e) => h.update(format!("unreadable: {:?}", e.kind()).as_bytes()),
        }
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a document was written, for messages.
#[derive(Debug, Clone)]
pub(super) struct DocAt {
    pub(super) file: String,
    pub(super) index: usize,
}

impl DocAt {
    pub(super) fn here(&self) -> String {
        format!("{} (document {})", self.file, self.index)
    }
    pub(super) fn named(&self, kind: &str, name: &str) -> String {
        format!("{}: {kind} \"{name}\" (document {})", self.file, self.index)
    }
}

pub(super) struct Parsed {
    pub(super) at: DocAt,
    pub(super) env: Envelope,
}

pub(super) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Deserializes `value` into `T`, naming the field on error.
pub(super) fn typed<T: for<'de> Deserialize<'de>>(value: serde_norway::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("field `spec.{path}`: {}", e.into_inner())
        }
    })
}

fn is_openapi_document(v: &serde_norway::Value) -> bool {
    v.as_mapping()
        .is_some_and(|m| m.contains_key("openapi") || m.contains_key("swagger"))
}

/// Parses every document of `files`.
pub(super) fn parse_documents(files: &[SourceFile], errors: &mut Vec<ConfigError>) -> Vec<Parsed> {
    let mut out = Vec::new();
    for f in files {
        for (i, doc) in serde_norway::Deserializer::from_str(&f.text).enumerate() {
            let at = DocAt {
                file: f.name.clone(),
                index: i + 1,
            };
            let value = match serde_norway::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(ConfigError {
                        location: at.here(),
                        message: format!("invalid YAML: {e}"),
                    });
                    // The rest of the file cannot be trusted after a syntax error.
                    break;
                }
            };
            if value.is_null() || is_openapi_document(&value) {
                // Empty documents (`---` at the end) and OpenAPI descriptions kept beside the
                // configuration for OasValidation are not configuration documents.
                continue;
            }
            match serde_path_to_error::deserialize::<_, Envelope>(value) {
                Ok(env) => out.push(Parsed { at, env }),
                Err(e) => {
                    let path = e.path().to_string();
                    let message = if path == "." {
                        e.into_inner().to_string()
                    } else {
                        format!("field `{path}`: {}", e.into_inner())
                    };
                    errors.push(ConfigError {
                        location: at.here(),
                        message,
                    });
                }
            }
        }
    }
    out
}

/// Names of the documents that were written, whether or not they compiled: a reference to
/// one that failed is not reported again (its own error is the root cause).
#[derive(Debug, Default)]
pub(super) struct Declared {
    pub(super) policies: HashSet<String>,
    pub(super) products: HashSet<String>,
    /// Some document could not be read at all (its kind and name are unknown), so any
    /// unresolved reference may point into it.
    pub(super) incomplete: bool,
}

impl Declared {
    pub(super) fn policy(&self, name: &str) -> bool {
        self.incomplete || self.policies.contains(name)
    }
    pub(super) fn product(&self, name: &str) -> bool {
        self.incomplete || self.products.contains(name)
    }
}
