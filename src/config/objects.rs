//! The consumer objects a configuration defines: API products, apps (their keys hashed)
//! and key-value maps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::errors::ConfigError;
use super::flows::EnvLookup;
use super::load::{typed, valid_name, Declared, Parsed};
use super::spec::{self, ApiProductSpec, AppSpec};
use crate::consumer::{hash_key, valid_hash, ApiKey, ApiProduct, App, Origin};
use crate::kvm::{FileMaps, KvmEntry};

pub(super) fn build_products(docs: Vec<Parsed>, errors: &mut Vec<ConfigError>) -> Vec<ApiProduct> {
    let mut out = Vec::new();
    for d in docs {
        let name = d.env.metadata.name.clone();
        let loc = d.at.named("ApiProduct", &name);
        let result = typed::<ApiProductSpec>(d.env.spec).and_then(|s| {
            let p = ApiProduct {
                name: name.clone(),
                description: s.description,
                operations: s.operations,
                quota: s.quota,
                llm_token_quota: s.llm_token_quota,
                approval_type: s.approval_type,
                attributes: s.attributes,
                origin: Origin::File,
                revision: 0,
            };
            for (field, q) in [("quota", &p.quota), ("llmTokenQuota", &p.llm_token_quota)] {
                if q.as_ref().is_some_and(|q| q.limit == 0 || q.interval == 0) {
                    return Err(format!(
                        "field `spec.{field}`: limit and interval must be greater than 0"
                    ));
                }
            }
            crate::consumer::index::Product::compile(p.clone())
                .map_err(|e| match e.split_once(": ") {
                    Some((field, m)) => format!("field `spec.{field}`: {m}"),
                    None => e,
                })
                .map(|_| p)
        });
        match result {
            Ok(p) => out.push(p),
            Err(message) => errors.push(ConfigError {
                location: loc,
                message,
            }),
        }
    }
    out
}

/// Reads a key given by reference; the value itself is never kept, only its hash.
fn key_hash(
    k: &spec::KeySpec,
    i: usize,
    config_dir: Option<&Path>,
    env: &EnvLookup,
) -> Result<String, String> {
    let at = format!("field `spec.keys[{i}]");
    match (&k.hash, &k.value_from) {
        (Some(h), None) => {
            if valid_hash(h) {
                Ok(h.clone())
            } else {
                Err(format!(
                    "{at}.hash`: must be `sha256:` and 64 lower-case hex digits"
                ))
            }
        }
        (None, Some(v)) => {
            let value = match (&v.env, &v.file) {
                (Some(var), None) => env.var(var).ok_or_else(|| {
                    format!("{at}.valueFrom.env`: environment variable `{var}` is not set")
                })?,
                (None, Some(file)) => {
                    let path = match config_dir {
                        Some(d) if Path::new(file).is_relative() => d.join(file),
                        _ => PathBuf::from(file),
                    };
                    crate::policies::record_read(&path);
                    std::fs::read_to_string(&path).map_err(|e| {
                        format!("{at}.valueFrom.file`: cannot read {}: {e}", path.display())
                    })?
                }
                _ => return Err(format!("{at}.valueFrom`: give exactly one of env, file")),
            };
            let value = value.trim();
            if value.len() < 16 || value.len() > 512 || value.bytes().any(|b| !b.is_ascii_graphic())
            {
                return Err(format!(
                    "{at}.valueFrom`: the key must be 16-512 printable ASCII characters"
                ));
            }
            Ok(hash_key(value))
        }
        _ => Err(format!(
            "{at}`: give exactly one of hash, valueFrom (keys are never written in clear text)"
        )),
    }
}

pub(super) fn build_apps(
    docs: Vec<Parsed>,
    products: &[ApiProduct],
    declared: &Declared,
    config_dir: Option<&Path>,
    env: &EnvLookup,
    errors: &mut Vec<ConfigError>,
) -> Vec<App> {
    let mut out: Vec<App> = Vec::new();
    let mut hashes: HashMap<String, String> = HashMap::new();
    for d in docs {
        let name = d.env.metadata.name.clone();
        let loc = d.at.named("App", &name);
        let spec = match typed::<AppSpec>(d.env.spec) {
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
        if !spec.developer_email.contains('@') || spec.developer_email.len() > 254 {
            msgs.push("field `spec.developerEmail`: not an email address".to_owned());
        }
        for (i, p) in spec.products.iter().enumerate() {
            // A product that failed to compile has its own error already.
            if !products.iter().any(|x| x.name == *p) && !declared.product(p) {
                msgs.push(format!(
                    "field `spec.products[{i}]`: no ApiProduct named `{p}`"
                ));
            }
        }
        let mut keys = Vec::new();
        for (i, k) in spec.keys.iter().enumerate() {
            if !valid_name(&k.id) || keys.iter().any(|x: &ApiKey| x.id == k.id) {
                msgs.push(format!(
                    "field `spec.keys[{i}].id`: missing, invalid or duplicate"
                ));
                continue;
            }
            let expires_at = match k
                .expires_at
                .as_deref()
                .map(chrono::DateTime::parse_from_rfc3339)
            {
                None => None,
                Some(Ok(t)) => Some(t.timestamp_millis()),
                Some(Err(e)) => {
                    msgs.push(format!(
                        "field `spec.keys[{i}].expiresAt`: not an RFC 3339 time: {e}"
                    ));
                    continue;
                }
            };
            match key_hash(k, i, config_dir, env) {
                Ok(hash) => {
                    if let Some(other) = hashes.insert(hash.clone(), name.clone()) {
                        msgs.push(format!(
                            "field `spec.keys[{i}]`: the same key is already used by app `{other}`"
                        ));
                    }
                    keys.push(ApiKey {
                        id: k.id.clone(),
                        hash,
                        status: k.status,
                        expires_at,
                        created_at: 0,
                    });
                }
                Err(m) => msgs.push(m),
            }
        }
        if !msgs.is_empty() {
            errors.extend(msgs.into_iter().map(|message| ConfigError {
                location: loc.clone(),
                message,
            }));
            continue;
        }
        out.push(App {
            name,
            developer_email: spec.developer_email,
            status: spec.status,
            products: spec.products,
            keys,
            attributes: spec.attributes,
            origin: Origin::File,
            revision: 0,
        });
    }
    out
}

/// Reads a `valueFrom` (an environment variable, or a file relative to the configuration).
fn read_value_from(
    v: &spec::ValueFrom,
    at: &str,
    config_dir: Option<&Path>,
    env: &EnvLookup,
) -> Result<String, String> {
    match (&v.env, &v.file) {
        (Some(var), None) => env
            .var(var)
            .ok_or_else(|| format!("{at}.valueFrom.env`: environment variable `{var}` is not set")),
        (None, Some(file)) => {
            let path = match config_dir {
                Some(d) if Path::new(file).is_relative() => d.join(file),
                _ => PathBuf::from(file),
            };
            crate::policies::record_read(&path);
            std::fs::read_to_string(&path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                .map_err(|e| format!("{at}.valueFrom.file`: cannot read {}: {e}", path.display()))
        }
        _ => Err(format!("{at}.valueFrom`: give exactly one of env, file")),
    }
}

pub(super) fn build_kvms(
    docs: Vec<Parsed>,
    config_dir: Option<&Path>,
    env: &EnvLookup,
    errors: &mut Vec<ConfigError>,
) -> FileMaps {
    let mut out = FileMaps::new();
    for d in docs {
        let name = d.env.metadata.name.clone();
        let loc = d.at.named("KeyValueMap", &name);
        let spec: spec::KeyValueMapSpec = match typed(d.env.spec) {
            Ok(s) => s,
            Err(message) => {
                errors.push(ConfigError {
                    location: loc,
                    message,
                });
                continue;
            }
        };
        let mut entries = std::collections::BTreeMap::new();
        for (key, e) in spec.entries {
            let at = format!("field `spec.entries.{key}");
            let entry = crate::kvm::check_key(&key)
                .map_err(|m| format!("{at}`: {m}"))
                .and_then(|()| match e {
                    spec::KvmEntrySpec::Plain(value) => Ok(KvmEntry {
                        value,
                        secret: false,
                    }),
                    spec::KvmEntrySpec::Full(f) => {
                        let value = match (f.value, &f.value_from) {
                            (Some(v), None) => v,
                            (None, Some(from)) => read_value_from(from, &at, config_dir, env)?,
                            _ => {
                                return Err(format!("{at}`: give exactly one of value, valueFrom"))
                            }
                        };
                        Ok(KvmEntry {
                            value,
                            secret: f.secret,
                        })
                    }
                })
                .and_then(|e| {
                    crate::kvm::check_value(&e.value)
                        .map(|()| e)
                        .map_err(|m| format!("{at}`: {m}"))
                });
            match entry {
                Ok(e) => {
                    entries.insert(key, e);
                }
                Err(message) => errors.push(ConfigError {
                    location: loc.clone(),
                    message,
                }),
            }
        }
        out.insert(name, entries);
    }
    out
}

pub(super) fn build_rate_plans(
    docs: Vec<Parsed>,
    products: &[ApiProduct],
    declared: &Declared,
    errors: &mut Vec<ConfigError>,
) -> crate::monetization::Plans {
    use crate::monetization::plan::{RatePlan, RatePlanSpec};
    let mut out = Vec::new();
    for d in docs {
        let name = d.env.metadata.name.clone();
        let loc = d.at.named("RatePlan", &name);
        let result = typed::<RatePlanSpec>(d.env.spec)
            .and_then(|s| RatePlan::compile(&name, s))
            .and_then(|p| {
                if products.iter().any(|x| x.name == p.product) || declared.product(&p.product) {
                    Ok(p)
                } else {
                    Err(format!(
                        "field `spec.product`: no ApiProduct named `{}`",
                        p.product
                    ))
                }
            });
        match result {
            Ok(p) => out.push(std::sync::Arc::new(p)),
            Err(message) => errors.push(ConfigError {
                location: loc,
                message,
            }),
        }
    }
    crate::monetization::Plans(out)
}
