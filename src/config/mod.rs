//! Configuration: read a directory of multi-document YAML, parse every document into its
//! spec, compile once into a [`Snapshot`] (policies built, conditions compiled, flows split
//! into phases, template rules checked). A configuration that fails anywhere is refused
//! whole, with every error naming file, document and field.
//!
//! The parts: `load` (files, their fingerprint, documents), `objects` (products, apps,
//! key-value maps), `flows` (policies and flows), `snapshot` (the result and its flow
//! selection), `errors`; `compile_files` below puts them together. `spec` holds the
//! documents' shapes, `matching` how hosts and paths compare, `rules` the template rules,
//! `reload` the watching and reloading.

pub mod matching;
pub mod reload;
pub mod rules;
pub mod spec;

mod errors;
mod flows;
mod load;
mod objects;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use errors::{ConfigError, ConfigErrors};
pub use flows::{EnvLookup, LoadOptions, DEFAULT_MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES};
pub use load::{fingerprint, fingerprint_with, read_dir, SourceFile};
pub use snapshot::{Flow, FlowMatch, Snapshot, UnknownFlow};

use crate::services::Services;
use flows::{build_flows, build_policies, FlowChecks};
use load::{parse_documents, typed, valid_name, Declared, DocAt};
use objects::{build_apps, build_kvms, build_products};
use spec::TemplateRuleSpec;

const KINDS: &[&str] = &[
    "Flow",
    "Policy",
    "TemplateRule",
    "ApiProduct",
    "App",
    "KeyValueMap",
    "RatePlan",
];
const LATER_KINDS: &[&str] = &[];

/// Loads and compiles the configuration in `dir`.
pub fn load_dir(dir: &Path) -> Result<Snapshot, ConfigErrors> {
    let files = read_dir(dir)?;
    compile(&files, Some(dir))
}

/// Compiles configuration files into a snapshot, with in-memory services.
pub fn compile(files: &[SourceFile], config_dir: Option<&Path>) -> Result<Snapshot, ConfigErrors> {
    compile_with(files, config_dir, &Services::default())
}

/// Compiles configuration files into a snapshot; policies get `services`.
pub fn compile_with(
    files: &[SourceFile],
    config_dir: Option<&Path>,
    services: &Services,
) -> Result<Snapshot, ConfigErrors> {
    compile_with_options(files, config_dir, services, &LoadOptions::default())
}

/// [`compile_with`], judged against the serving process's `options`.
pub fn compile_with_options(
    files: &[SourceFile],
    config_dir: Option<&Path>,
    services: &Services,
    options: &LoadOptions,
) -> Result<Snapshot, ConfigErrors> {
    let (snap, referenced) =
        crate::policies::recording_reads(|| compile_files(files, config_dir, services, options));
    let mut snap = snap?;
    snap.fingerprint = fingerprint_with(files, &referenced);
    snap.referenced = referenced;
    Ok(snap)
}

fn compile_files(
    files: &[SourceFile],
    config_dir: Option<&Path>,
    services: &Services,
    options: &LoadOptions,
) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let docs = parse_documents(files, &mut errors);
    let mut declared = Declared {
        incomplete: !errors.is_empty(),
        ..Default::default()
    };
    for d in &docs {
        match d.env.kind.as_str() {
            "Policy" => declared.policies.insert(d.env.metadata.name.clone()),
            "ApiProduct" => declared.products.insert(d.env.metadata.name.clone()),
            _ => false,
        };
    }
    if docs.is_empty() && errors.is_empty() {
        warnings.push(ConfigError {
            location: config_dir
                .map_or_else(|| "configuration".to_owned(), |d| d.display().to_string()),
            message: "no configuration documents (*.yaml, *.yml, *.json): no flow runs, \
                      every request takes --on-no-match"
                .into(),
        });
    }

    // Envelope checks and name uniqueness per kind.
    let mut seen: HashMap<(String, String), DocAt> = HashMap::new();
    let mut policies_docs = Vec::new();
    let mut flow_docs = Vec::new();
    let mut rule_docs = Vec::new();
    let mut product_docs = Vec::new();
    let mut app_docs = Vec::new();
    let mut kvm_docs = Vec::new();
    let mut plan_docs = Vec::new();
    for d in docs {
        let kind = d.env.kind.as_str();
        let name = d.env.metadata.name.clone();
        if d.env.api_version != crate::API_VERSION {
            errors.push(ConfigError {
                location: d.at.named(kind, &name),
                message: format!(
                    "apiVersion `{}` is not supported; use `{}`",
                    d.env.api_version,
                    crate::API_VERSION
                ),
            });
            continue;
        }
        if !KINDS.contains(&kind) {
            let message = if LATER_KINDS.contains(&kind) {
                format!("kind `{kind}` is not supported by this version of tollgate yet")
            } else {
                format!(
                    "unknown kind `{kind}`; expected one of {}",
                    KINDS.join(", ")
                )
            };
            errors.push(ConfigError {
                location: d.at.named(kind, &name),
                message,
            });
            continue;
        }
        if !valid_name(&name) {
            errors.push(ConfigError {
                location: d.at.named(kind, &name),
                message: "metadata.name must be 1-253 characters of letters, digits, `-`, `_`, `.`"
                    .into(),
            });
            continue;
        }
        if let Some(prev) = seen.insert((kind.to_owned(), name.clone()), d.at.clone()) {
            errors.push(ConfigError {
                location: d.at.named(kind, &name),
                message: format!("duplicate {kind} name; first defined in {}", prev.here()),
            });
            continue;
        }
        match kind {
            "Policy" => policies_docs.push(d),
            "Flow" => flow_docs.push(d),
            "ApiProduct" => product_docs.push(d),
            "App" => app_docs.push(d),
            "KeyValueMap" => kvm_docs.push(d),
            "RatePlan" => plan_docs.push(d),
            _ => rule_docs.push(d),
        }
    }

    let products = build_products(product_docs, &mut errors);
    let apps = build_apps(
        app_docs,
        &products,
        &declared,
        config_dir,
        &options.env,
        &mut errors,
    );
    let kvms = Arc::new(build_kvms(kvm_docs, config_dir, &options.env, &mut errors));
    let rate_plans = Arc::new(objects::build_rate_plans(
        plan_docs,
        &products,
        &declared,
        &mut errors,
    ));
    let services = &Services {
        rate_plans: rate_plans.clone(),
        ..services.clone()
    };
    let (policies, cache_scopes) = build_policies(policies_docs, config_dir, services, &mut errors);
    let flows = build_flows(
        flow_docs,
        &policies,
        &FlowChecks {
            declared: &declared,
            cache_scopes: &cache_scopes,
            options,
        },
        &mut errors,
        &mut warnings,
    );
    let rules = rule_docs
        .into_iter()
        .filter_map(|d| {
            let name = d.env.metadata.name.clone();
            match typed::<TemplateRuleSpec>(d.env.spec)
                .and_then(|s| rules::TemplateRule::compile(&name, s))
            {
                Ok(r) => Some(r),
                Err(message) => {
                    errors.push(ConfigError {
                        location: d.at.named("TemplateRule", &name),
                        message,
                    });
                    None
                }
            }
        })
        .collect::<Vec<_>>();
    for (flow, at) in &flows {
        for rule in &rules {
            for message in rule.check(flow) {
                errors.push(ConfigError {
                    location: at.named("Flow", &flow.name),
                    message,
                });
            }
        }
    }

    let mut defaults = flows.iter().filter(|(f, _)| f.is_default);
    if let (Some(_), Some((second, at))) = (defaults.next(), defaults.next()) {
        errors.push(ConfigError {
            location: at.named("Flow", &second.name),
            message: "more than one flow has `default: true`".into(),
        });
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    let mut snap = Snapshot {
        policies,
        products,
        apps,
        kvms,
        warnings,
        rate_plans,
        ..Default::default()
    };
    services.monetization.publish_plans(&snap.rate_plans);
    for (flow, _) in flows {
        let flow = Arc::new(flow);
        if flow.is_default {
            snap.default_flow = Some(flow.clone());
        }
        if flow.matcher.is_some() {
            snap.matching.push(flow.clone());
        }
        snap.by_name.insert(flow.name.clone(), flow);
    }
    snap.matching.sort_by(|a, b| {
        let (sa, sb) = (
            a.matcher.as_ref().map(FlowMatch::specificity),
            b.matcher.as_ref().map(FlowMatch::specificity),
        );
        b.priority
            .cmp(&a.priority)
            .then(sb.cmp(&sa))
            .then(a.name.cmp(&b.name))
    });
    Ok(snap)
}
