//! The compiled configuration: flows (their matching and phases) and the [`Snapshot`] that
//! chooses one for a request.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use super::errors::ConfigError;
use super::matching::{self, HostPattern};
use super::spec::MatchSpec;
use crate::consumer::{ApiProduct, App};
use crate::fault::{ErrorFormat, Fault};
use crate::kvm::FileMaps;
use crate::pipeline::{DirectionPipeline, Policy};
use crate::telemetry::FlowMetrics;
use crate::vars::RequestInfo;

/// How a flow's matching is tested (see [`matching`] for how hosts and paths compare).
#[derive(Debug, Clone, Default)]
pub struct FlowMatch {
    hosts: Vec<HostPattern>,
    /// Each already normal ([`matching::normalize_path`] leaves it as it is).
    path_prefixes: Vec<String>,
    methods: Vec<String>,
}

impl FlowMatch {
    /// The match as configured (normalised), for the management API and the admin page.
    pub fn describe(&self) -> serde_json::Value {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| match h {
                HostPattern::Exact(s) => s.clone(),
                HostPattern::Suffix(s) => format!("*{s}"),
                HostPattern::Prefix(s) => format!("{s}*"),
                HostPattern::Any => "*".to_owned(),
            })
            .collect();
        serde_json::json!({
            "hosts": hosts,
            "pathPrefixes": self.path_prefixes,
            "methods": self.methods,
        })
    }

    /// Compiles a `match`, or says what is wrong with each entry (as `field ...: message`).
    pub(super) fn from_spec(m: &MatchSpec) -> Result<Self, Vec<String>> {
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
    pub(super) fn specificity(&self) -> (usize, u8, bool) {
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
    /// `basePath` (`proxy.basepath`).
    pub base_path: Option<Arc<str>>,
    /// The fault rules; `None` without any (a rejection then renders as it always did).
    pub faults: Option<Arc<crate::pipeline::faults::FaultRules>>,
}

impl Flow {
    /// What the flow does, for the management API and the admin page: its match and its
    /// steps in order (policy, type, condition and its language).
    pub fn describe(&self) -> serde_json::Value {
        let steps = |d: &DirectionPipeline| -> Vec<serde_json::Value> {
            d.steps()
                .map(|s| {
                    serde_json::json!({
                        "policy": s.policy_name,
                        "type": s.policy.type_name(),
                        "condition": s.condition.as_ref().map(|c| c.source()),
                        // `cel` or `apigee` (a step's `apigeeCondition`).
                        "conditionLanguage": s.condition.as_ref().map(|c| c.language()),
                        "continueOnError": s.continue_on_error,
                    })
                })
                .collect()
        };
        serde_json::json!({
            "name": self.name,
            "default": self.is_default,
            "priority": self.priority,
            "match": self.matcher.as_ref().map(FlowMatch::describe),
            "maxBodyBytes": self.max_body_bytes,
            "request": steps(&self.request),
            "response": steps(&self.response),
            "basePath": self.base_path.as_deref(),
            "faultRules": self.faults.as_ref().map(|f| f.describe()),
        })
    }

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
    /// Covers the configuration files and `referenced` (see [`super::fingerprint_with`]).
    pub fingerprint: String,
    /// Files outside the configuration files that compiling it read.
    pub referenced: Vec<PathBuf>,
    /// Problems that do not refuse the configuration (logged at every load, printed by
    /// `validate`).
    pub warnings: Vec<ConfigError>,
    /// Rate plans defined in the files (the monetization service lists the newest live).
    pub rate_plans: Arc<crate::monetization::Plans>,
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
    /// Every flow, described (see [`Flow::describe`]), by name.
    pub fn describe_flows(&self) -> Vec<serde_json::Value> {
        let mut flows: Vec<&Arc<Flow>> = self.by_name.values().collect();
        flows.sort_by(|a, b| a.name.cmp(&b.name));
        flows.into_iter().map(|f| f.describe()).collect()
    }

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
