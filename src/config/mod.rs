//! Configuration: read a directory of multi-document YAML, parse every document into its
//! spec, compile once into a [`Snapshot`] (policies built, conditions compiled, flows split
//! into phases, template rules checked). A configuration that fails anywhere is refused
//! whole, with every error naming file, document and field.

pub mod matching;
pub mod reload;
pub mod rules;
pub mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::consumer::{hash_key, valid_hash, ApiKey, ApiProduct, App, Origin};
use crate::expr::Condition;
use crate::fault::{ErrorFormat, Fault};
use crate::kvm::{FileMaps, KvmEntry};
use crate::pipeline::{Direction, DirectionPipeline, Policy, Step};
use crate::policies::{self, BuildContext};
use crate::services::Services;
use crate::telemetry::FlowMetrics;
use crate::vars::RequestInfo;
use matching::HostPattern;
use spec::{ApiProductSpec, AppSpec, Envelope, FlowSpec, MatchSpec, StepSpec, TemplateRuleSpec};

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file: Kind "name" (document N)`, as precise as known.
    pub location: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![ConfigError {
            location: location.into(),
            message: message.into(),
        }])
    }
}

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

/// How a flow's matching is tested (see [`matching`] for how hosts and paths compare).
#[derive(Debug, Clone, Default)]
pub struct FlowMatch {
    hosts: Vec<HostPattern>,
    /// Each already normal ([`matching::normalize_path`] leaves it as it is).
    path_prefixes: Vec<String>,
    methods: Vec<String>,
}

impl FlowMatch {
    /// Compiles a `match`, or says what is wrong with each entry (as `field ...: message`).
    fn from_spec(m: &MatchSpec) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut hosts = Vec::new();
        for (i, h) in m.hosts.iter().enumerate() {
            match HostPattern::parse(h) {
                Ok(p) => hosts.push(p),
                Err(e) => errors.push(format!("field `spec.match.hosts[{i}]`: {e}")),
            }
        }
        for (i, p) in m.path_prefixes.iter().enumerate() {
            if !p.starts_with('/') {
                errors.push(format!(
                    "field `spec.match.pathPrefixes[{i}]`: must start with `/`"
                ));
                continue;
            }
            let normal = matching::normalize_path(p);
            if normal != p.as_str() {
                // Requests are compared in normal form: this prefix could never match.
                errors.push(format!(
                    "field `spec.match.pathPrefixes[{i}]`: `{p}` is not a normalised path \
                     (requests are matched on their normalised path); write `{normal}`"
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            hosts,
            path_prefixes: m.path_prefixes.clone(),
            methods: m.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        })
    }

    /// `target` is the request's normalised path and host, computed once per request.
    fn matches(&self, method: &str, target: &Target<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return false;
        }
        if !self.path_prefixes.is_empty()
            && !self
                .path_prefixes
                .iter()
                .any(|p| target.path.starts_with(p.as_str()))
        {
            return false;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| h.matches(&target.host)) {
            return false;
        }
        true
    }

    /// Sort key for "more specific first".
    fn specificity(&self) -> (usize, u8, bool) {
        let longest = self
            .path_prefixes
            .iter()
            .map(String::len)
            .min()
            .unwrap_or(0);
        let host = if self.hosts.is_empty() {
            0
        } else if self.hosts.iter().all(HostPattern::is_exact) {
            2
        } else {
            1
        };
        (longest, host, !self.methods.is_empty())
    }
}

/// A request's path and host as flows compare them.
struct Target<'a> {
    path: std::borrow::Cow<'a, str>,
    host: std::borrow::Cow<'a, str>,
}

/// A compiled flow.
#[derive(Debug)]
pub struct Flow {
    pub name: String,
    pub matcher: Option<FlowMatch>,
    pub is_default: bool,
    pub priority: i32,
    pub error_format: ErrorFormat,
    pub max_body_bytes: usize,
    pub request: DirectionPipeline,
    pub response: DirectionPipeline,
    pub metrics: FlowMetrics,
}

impl Flow {
    /// Every policy type the flow's steps use.
    pub fn policy_types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.request
            .steps()
            .chain(self.response.steps())
            .map(|s| s.policy.type_name())
    }
}

/// A whole compiled configuration. Streams hold the snapshot they started with.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Flows with a `match`, most specific first.
    pub matching: Vec<Arc<Flow>>,
    pub by_name: HashMap<String, Arc<Flow>>,
    pub default_flow: Option<Arc<Flow>>,
    pub policies: BTreeMap<String, Arc<dyn Policy>>,
    /// API products and apps defined in the files.
    pub products: Vec<ApiProduct>,
    pub apps: Vec<App>,
    /// Key-value maps defined in the files.
    pub kvms: Arc<FileMaps>,
    /// Covers the configuration files and `referenced` (see [`fingerprint_with`]).
    pub fingerprint: String,
    /// Files outside the configuration files that compiling it read.
    pub referenced: Vec<PathBuf>,
    /// Problems that do not refuse the configuration (logged at every load, printed by
    /// `validate`).
    pub warnings: Vec<ConfigError>,
}

/// Extension metadata named a flow the configuration does not define: the gateway and
/// tollgate disagree, and running some other flow instead could skip the policies meant for
/// the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the gateway's extension metadata names flow `{0}`, which the configuration does not define"
)]
pub struct UnknownFlow(pub String);

impl UnknownFlow {
    /// The answer for the client: 500 `tollgate.UnknownFlow` (the name stays in the log).
    pub fn fault(&self) -> Fault {
        Fault::new(
            500,
            "tollgate.UnknownFlow",
            "The gateway selected a flow that is not configured",
        )
    }
}

impl Snapshot {
    /// Chooses the flow: by name from extension metadata, else the first matching flow,
    /// else the default flow; `Ok(None)` when none applies. A name that is not defined is
    /// an error, never a fall-through to matching.
    pub fn select(
        &self,
        named: Option<&str>,
        req: &RequestInfo,
    ) -> Result<Option<Arc<Flow>>, UnknownFlow> {
        if let Some(name) = named {
            return match self.by_name.get(name) {
                Some(f) => Ok(Some(f.clone())),
                None => {
                    let e = UnknownFlow(name.to_owned());
                    tracing::error!(flow = name, "{e}");
                    Err(e)
                }
            };
        }
        let target = Target {
            path: matching::normalize_path(&req.uri),
            host: matching::normalize_host(&req.host),
        };
        Ok(self
            .matching
            .iter()
            .find(|f| {
                f.matcher
                    .as_ref()
                    .is_some_and(|m| m.matches(&req.method, &target))
            })
            .or(self.default_flow.as_ref())
            .cloned())
    }
}

/// Where a document was written, for messages.
#[derive(Debug, Clone)]
struct DocAt {
    file: String,
    index: usize,
}

impl DocAt {
    fn here(&self) -> String {
        format!("{} (document {})", self.file, self.index)
    }
    fn named(&self, kind: &str, name: &str) -> String {
        format!("{}: {kind} \"{name}\" (document {})", self.file, self.index)
    }
}

struct Parsed {
    at: DocAt,
    env: Envelope,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Deserializes `value` into `T`, naming the field on error.
fn typed<T: for<'de> Deserialize<'de>>(value: serde_norway::Value) -> Result<T, String> {
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
fn parse_documents(files: &[SourceFile], errors: &mut Vec<ConfigError>) -> Vec<Parsed> {
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

const KINDS: &[&str] = &[
    "Flow",
    "Policy",
    "TemplateRule",
    "ApiProduct",
    "App",
    "KeyValueMap",
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

/// Names of the documents that were written, whether or not they compiled: a reference to
/// one that failed is not reported again (its own error is the root cause).
#[derive(Debug, Default)]
struct Declared {
    policies: HashSet<String>,
    products: HashSet<String>,
    /// Some document could not be read at all (its kind and name are unknown), so any
    /// unresolved reference may point into it.
    incomplete: bool,
}

impl Declared {
    fn policy(&self, name: &str) -> bool {
        self.incomplete || self.policies.contains(name)
    }
    fn product(&self, name: &str) -> bool {
        self.incomplete || self.products.contains(name)
    }
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
        ..Default::default()
    };
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

fn build_products(docs: Vec<Parsed>, errors: &mut Vec<ConfigError>) -> Vec<ApiProduct> {
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

fn build_apps(
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

fn build_kvms(
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

/// The compiled policies, and the `scope` of each ResponseCache policy as written.
type BuiltPolicies = (BTreeMap<String, Arc<dyn Policy>>, HashMap<String, String>);

fn build_policies(
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
        let condition = match s.condition.as_deref().map(Condition::compile) {
            None => None,
            Some(Ok(c)) => Some(Arc::new(c)),
            Some(Err(e)) => {
                errors.push(format!("field `spec.{field}[{i}].condition`: {e}"));
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

/// What flows are checked against besides their own spec.
struct FlowChecks<'a> {
    declared: &'a Declared,
    /// `scope` of each ResponseCache policy.
    cache_scopes: &'a HashMap<String, String>,
    options: &'a LoadOptions,
}

/// Authentication policy types: what sets the caller's identity.
const AUTH_TYPES: &[&str] = &["VerifyApiKey", "VerifyJwt"];

/// A ResponseCache lookup before the flow's authentication answers hits to callers nobody
/// checked. Shared scopes (`global`, `flow`) would hand one caller's response to anyone:
/// refused. A per-app cache there never stores (no `client_id` yet): warned.
fn check_cache_placement(
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

fn build_flows(
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
        let (Ok(request), Ok(response)) = (request, response) else {
            errors.extend(msgs.into_iter().map(|message| ConfigError {
                location: loc.clone(),
                message,
            }));
            continue;
        };
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
            },
            d.at,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(text: &str) -> Vec<SourceFile> {
        vec![SourceFile {
            name: "test.yaml".into(),
            text: text.into(),
        }]
    }

    const BASE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec:
  type: AssignMessage
  set: {headers: {x-flow: "{flow.name}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  match: {pathPrefixes: [/v1/chat], methods: [post]}
  request: [{policy: tag}]
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: v1}
spec:
  match: {pathPrefixes: [/v1]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api-host}
spec:
  match: {hosts: ["*.example.com"]}
  priority: 10
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: fallback}
spec:
  default: true
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: by-name-only}
spec: {}
"#;

    fn req(method: &str, path: &str, host: &str) -> RequestInfo {
        RequestInfo {
            method: method.into(),
            uri: path.into(),
            host: host.into(),
            ..Default::default()
        }
    }

    #[test]
    fn selection_order() {
        let s = compile(&files(BASE), None).unwrap();
        let pick = |m, p, h, named: Option<&str>| {
            s.select(named, &req(m, p, h))
                .unwrap()
                .map(|f| f.name.clone())
        };
        assert_eq!(
            pick("POST", "/v1/chat/completions", "a", None).as_deref(),
            Some("chat")
        );
        assert_eq!(
            pick("GET", "/v1/chat/completions", "a", None).as_deref(),
            Some("v1")
        );
        assert_eq!(
            pick("GET", "/v1/chat", "x.example.com:443", None).as_deref(),
            Some("api-host")
        );
        assert_eq!(
            pick("GET", "/v1/chat", "example.com", None).as_deref(),
            Some("v1")
        );
        assert_eq!(
            pick("GET", "/other", "a", None).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pick("GET", "/other", "a", Some("by-name-only")).as_deref(),
            Some("by-name-only")
        );
        // A name that is not defined is an error, not a fall-through to matching.
        let e = s
            .select(Some("missing"), &req("GET", "/other", "a"))
            .unwrap_err();
        assert_eq!(e, UnknownFlow("missing".into()));
        assert_eq!(
            (e.fault().status, e.fault().code.as_str()),
            (500, "tollgate.UnknownFlow")
        );
    }

    /// The same target written differently selects the same flow: host case, port and
    /// trailing dot, repeated slashes, dot segments, escapes.
    #[test]
    fn selection_cannot_be_dodged() {
        let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: chat}
spec:
  match: {hosts: [API.Example.com.], pathPrefixes: [/v1/chat]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: wild}
spec:
  match: {hosts: ["*.internal"]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: open}
spec: {default: true}
"#;
        let s = compile(&files(text), None).unwrap();
        let pick = |p: &str, h: &str| {
            s.select(None, &req("POST", p, h))
                .unwrap()
                .unwrap()
                .name
                .clone()
        };
        for host in [
            "api.example.com",
            "API.EXAMPLE.COM.:8443",
            "Api.Example.Com:80",
            "api.example.com.",
        ] {
            for path in [
                "/v1/chat/completions",
                "//v1//chat/completions",
                "/v1/./chat",
                "/x/../v1/chat",
                "/v1%2Fchat",
                "/%761/chat",
                "/v1\\chat?a=b",
            ] {
                assert_eq!(pick(path, host), "chat", "{host} {path}");
            }
        }
        assert_eq!(pick("/v1/chat", "api.example.org"), "open");
        assert_eq!(pick("/v2/chat", "api.example.com"), "open");
        assert_eq!(pick("/v1/../v2/chat", "api.example.com"), "open");
        assert_eq!(pick("/", "A.B.INTERNAL.:1"), "wild");
        assert_eq!(pick("/", "internal"), "open");
        assert_eq!(pick("/", "é.internal"), "wild");
        assert_eq!(pick("/", "é"), "open");
    }

    #[test]
    fn match_entries_are_checked() {
        let flow = |m: &str| {
            format!("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: f}}\nspec: {{match: {m}}}\n")
        };
        let e = errs(&flow("{pathPrefixes: ['//v1//chat']}"));
        assert!(
            e.contains("spec.match.pathPrefixes[0]") && e.contains("write `/v1/chat`"),
            "{e}"
        );
        let e = errs(&flow("{pathPrefixes: [v1]}"));
        assert!(e.contains("must start with `/`"), "{e}");
        let e = errs(&flow("{hosts: ['api.example.com:443']}"));
        assert!(
            e.contains("spec.match.hosts[0]") && e.contains("without a port"),
            "{e}"
        );
        for bad in ["é", "a*b", "*.*", ""] {
            let e = errs(&flow(&format!("{{hosts: ['{bad}']}}")));
            assert!(e.contains("spec.match.hosts[0]"), "{bad}: {e}");
        }
        compile(
            &files(&flow("{hosts: ['*', 'api.*', '*-api.example.com']}")),
            None,
        )
        .unwrap();
    }

    fn errs(text: &str) -> String {
        compile(&files(text), None).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {requets: []}\n");
        assert!(e.contains("test.yaml: Flow \"f\" (document 1)"), "{e}");
        assert!(e.contains("unknown field `requets`"), "{e}");

        let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {request: [{policy: nope}]}\n");
        assert!(
            e.contains("spec.request[0].policy") && e.contains("nope"),
            "{e}"
        );

        let e = errs("a: [\n");
        assert!(e.contains("invalid YAML"), "{e}");

        let e = errs("apiVersion: v1\nkind: Flow\nmetadata: {name: f}\n");
        assert!(e.contains("apiVersion"), "{e}");

        let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: ModelRouter}\n");
        assert!(e.contains("not implemented"), "{e}");

        let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 'x'}\n");
        assert!(e.contains("spec.status"), "{e}");

        let e = errs("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {request: [{policy: p, condition: 'a ==' }]}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 400}\n");
        assert!(e.contains("spec.request[0].condition"), "{e}");

        let dup = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: chat}}\nspec: {{}}\n");
        assert!(errs(&dup).contains("duplicate Flow name"));

        let two_defaults = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: d2}}\nspec: {{default: true}}\n");
        assert!(errs(&two_defaults).contains("more than one flow"));
    }

    #[test]
    fn openapi_and_empty_documents_are_skipped() {
        let text = format!(
            "{BASE}---\n---\nopenapi: 3.1.0\ninfo: {{title: x, version: '1'}}\npaths: {{}}\n"
        );
        assert!(compile(&files(&text), None).is_ok());
    }

    #[test]
    fn key_value_maps_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token.txt"), "from-file\n").unwrap();
        let kvm = "apiVersion: tollgate.dev/v1alpha1\nkind: KeyValueMap\nmetadata: {name: creds}\nspec:\n  entries:\n    plain: v\n    tok: {valueFrom: {file: token.txt}, secret: true}\n    lit: {value: x, secret: true}\n";
        let snap = compile(&files(&format!("{BASE}---\n{kvm}")), Some(dir.path())).unwrap();
        let m = &snap.kvms["creds"];
        assert_eq!(m["plain"].value, "v");
        assert_eq!(
            (m["tok"].value.as_str(), m["tok"].secret),
            ("from-file", true)
        );
        assert!(m["lit"].secret);

        for (entries, want) in [
            ("{\"a\\nb\": v}", "control characters"),
            (
                "{a: {value: x, valueFrom: {env: X}}}",
                "exactly one of value, valueFrom",
            ),
            (
                "{a: {valueFrom: {env: TOLLGATE_SURELY_UNSET_VAR}}}",
                "is not set",
            ),
            ("{a: {secret: true}}", "exactly one of value, valueFrom"),
        ] {
            let text = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: KeyValueMap\nmetadata: {{name: m}}\nspec: {{entries: {entries}}}\n");
            let e = errs(&text);
            assert!(
                e.contains("KeyValueMap \"m\"") && e.contains(want),
                "{entries}: {e}"
            );
        }
        let big = format!("{BASE}---\napiVersion: tollgate.dev/v1alpha1\nkind: KeyValueMap\nmetadata: {{name: m}}\nspec: {{entries: {{a: {}}}}}\n", "v".repeat(70_000));
        assert!(errs(&big).contains("at most"));
    }

    const CONSUMERS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: chat}
spec:
  operations: [{path: "/v1/chat/completions", methods: [POST]}]
  quota: {limit: 10, timeUnit: minute}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {name: acme}
spec:
  developerEmail: dev@acme.test
  products: [chat]
  keys:
  - {id: k1, hash: "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
  - {id: k2, valueFrom: {env: TOLLGATE_TEST_KEY_K2}, expiresAt: "2030-01-01T00:00:00Z"}
"#;

    #[test]
    fn products_and_apps_from_files() {
        // The variable comes from an injected environment, not the process's.
        let options = LoadOptions {
            env: EnvLookup::fixed([("TOLLGATE_TEST_KEY_K2", "k2-secret-value-0123456789")]),
            ..Default::default()
        };
        let compile =
            |text: &str| compile_with_options(&files(text), None, &Services::default(), &options);
        let s = compile(CONSUMERS).unwrap();
        assert_eq!(s.products.len(), 1);
        assert_eq!(
            s.apps[0].keys[1].hash,
            hash_key("k2-secret-value-0123456789")
        );
        assert_eq!(s.apps[0].keys[1].expires_at, Some(1_893_456_000_000));
        assert!(s.apps.iter().all(|a| a.origin == Origin::File));

        let bad = |from: &str, to: &str| {
            compile(&CONSUMERS.replace(from, to))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("products: [chat]", "products: [gold]").contains("no ApiProduct named `gold`"));
        assert!(bad("hash: \"sha256:ba", "hash: \"md5:ba").contains("spec.keys[0].hash"));
        assert!(
            bad("{id: k1, hash:", "{id: k1, value: clear, hash:").contains("unknown field `value`")
        );
        assert!(bad("TOLLGATE_TEST_KEY_K2", "TOLLGATE_TEST_KEY_UNSET").contains("is not set"));
        assert!(bad("2030-01-01T00:00:00Z", "tomorrow").contains("RFC 3339"));
        assert!(bad("/v1/chat/completions", "v1").contains("spec.operations[0].path"));
        assert!(bad("limit: 10", "limit: 0").contains("spec.quota"));
        assert!(bad("dev@acme.test", "nobody").contains("developerEmail"));
    }

    /// A key from a mounted Secret file (relative to the configuration directory), its
    /// trailing newline not part of the key; unreadable and too-short files are refused.
    #[test]
    fn app_keys_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k2.key"), "k2-from-a-secret-file-0123\n").unwrap();
        std::fs::write(dir.path().join("short.key"), "too-short\n").unwrap();
        let text = CONSUMERS.replace("{env: TOLLGATE_TEST_KEY_K2}", "{file: k2.key}");
        let s = compile(&files(&text), Some(dir.path())).unwrap();
        assert_eq!(
            s.apps[0].keys[1].hash,
            hash_key("k2-from-a-secret-file-0123")
        );
        let absolute = dir.path().join("k2.key");
        let text = CONSUMERS.replace(
            "{env: TOLLGATE_TEST_KEY_K2}",
            &format!("{{file: \"{}\"}}", absolute.display()),
        );
        let s = compile(&files(&text), None).unwrap();
        assert_eq!(
            s.apps[0].keys[1].hash,
            hash_key("k2-from-a-secret-file-0123")
        );
        let fails = |from: &str| {
            let text = CONSUMERS.replace("{env: TOLLGATE_TEST_KEY_K2}", from);
            compile(&files(&text), Some(dir.path()))
                .unwrap_err()
                .to_string()
        };
        let e = fails("{file: absent.key}");
        assert!(
            e.contains("spec.keys[1].valueFrom.file") && e.contains("cannot read"),
            "{e}"
        );
        assert!(fails("{file: short.key}").contains("16-512 printable"));
        assert!(fails("{file: k2.key, env: X}").contains("exactly one of env, file"));
    }

    /// One root cause, one error: a Policy (or ApiProduct) that fails to compile is not
    /// reported again as missing by every flow (or app) that refers to it, and a file that
    /// cannot be read does not make every reference into it an error.
    #[test]
    fn one_root_cause_one_error() {
        let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: broken}
spec: {type: RaiseFault, status: 'x'}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: a}
spec: {request: [{policy: broken}]}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: b}
spec: {default: true, request: [{policy: broken}], response: [{policy: broken}]}
"#;
        let e = compile(&files(text), None).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(e.0[0].location.contains("Policy \"broken\""), "{e}");
        // A name nobody wrote is still an error.
        let e = errs(&text.replace("response: [{policy: broken}]", "response: [{policy: typo}]"));
        assert!(
            e.contains("no Policy named `typo`") && !e.contains("`broken`"),
            "{e}"
        );

        let products = CONSUMERS.replace("limit: 10", "limit: 0");
        let e = compile(&files(&products), None).unwrap_err();
        assert!(e.to_string().contains("spec.quota"), "{e}");
        assert!(!e.to_string().contains("no ApiProduct named"), "{e}");

        let two = vec![
            SourceFile {
                name: "policies.yaml".into(),
                text: "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {type: RaiseFault, status: 403\n".into(),
            },
            SourceFile {
                name: "flows.yaml".into(),
                text: "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {default: true, request: [{policy: p}]}\n".into(),
            },
        ];
        let e = compile(&two, None).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(
            e.0[0].location.starts_with("policies.yaml") && e.0[0].message.contains("invalid YAML"),
            "{e}"
        );
    }

    #[test]
    fn empty_configuration_is_a_warning() {
        let s = compile(&[], None).unwrap();
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].message.contains("no configuration documents"));
        let s = compile(&files("---\n"), Some(Path::new("/etc/tollgate"))).unwrap();
        assert_eq!(s.warnings[0].location, "/etc/tollgate");
        assert!(compile(&files(BASE), None).unwrap().warnings.is_empty());
    }

    const CACHE_AUTH: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: key}
spec: {type: VerifyApiKey}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: cache}
spec: {type: ResponseCache, SCOPE}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request: [STEPS]
  response: [{policy: cache}]
"#;

    /// A cache lookup before authentication: refused when shared, warned when per app.
    #[test]
    fn cache_before_authentication() {
        let cfg = |scope: &str, steps: &str| {
            files(&CACHE_AUTH.replace("SCOPE", scope).replace("STEPS", steps))
        };
        for scope in ["ttlSeconds: 60", "scope: global", "scope: flow"] {
            let e = compile(&cfg(scope, "{policy: cache}, {policy: key}"), None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("Flow \"api\"")
                    && e.contains("spec.request[0]")
                    && e.contains("before the authentication step `key`"),
                "{scope}: {e}"
            );
            // After authentication: fine.
            let s = compile(&cfg(scope, "{policy: key}, {policy: cache}"), None).unwrap();
            assert!(s.warnings.is_empty());
        }
        let s = compile(&cfg("scope: app", "{policy: cache}, {policy: key}"), None).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(
            s.warnings[0].message.contains("scope app"),
            "{:?}",
            s.warnings
        );
        // No authentication in the flow: nothing to judge.
        compile(&cfg("scope: global", "{policy: cache}"), None).unwrap();
    }

    /// A flow that reads bodies larger than one ext_proc message is refused, against the
    /// serving process's --max-message-bytes.
    #[test]
    fn max_body_must_fit_one_message() {
        let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: body}
spec: {type: AssignMessage, set: {body: "{request.content}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: big}
spec:
  default: true
  maxBodyBytes: 20000000
  request: [STEPS]
"#;
        let with = |steps: &str, max: usize| {
            compile_with_options(
                &files(&text.replace("STEPS", steps)),
                None,
                &Services::default(),
                &LoadOptions {
                    max_message_bytes: max,
                    ..Default::default()
                },
            )
        };
        let e = with("{policy: body}", DEFAULT_MAX_MESSAGE_BYTES)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.maxBodyBytes")
                && e.contains("--max-message-bytes")
                && e.contains("20065536"),
            "{e}"
        );
        with("{policy: body}", 20_065_536).unwrap();
        // A flow that reads no body is not limited by its maxBodyBytes.
        with("", DEFAULT_MAX_MESSAGE_BYTES).unwrap();
    }

    #[test]
    fn phases_split() {
        let s = compile(&files(BASE), None).unwrap();
        let chat = &s.by_name["chat"];
        assert_eq!(chat.request.on_headers.len(), 1);
        assert!(!chat.request.needs_body());
    }
}
