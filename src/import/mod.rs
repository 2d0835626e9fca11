//! `tollgate import`: an Apigee proxy or shared-flow bundle (a directory or a zip) to a
//! tollgate configuration directory, with a report classifying every element as converted,
//! approximated (and how) or not convertible (and why).
//!
//! - Policies go through [`policies::TABLE`], one converter per Apigee type.
//! - Each ProxyEndpoint becomes a Flow matched by its base path. Its steps, in Apigee's order:
//!   proxy PreFlow, the first conditional flow whose condition holds, PostFlow, then the
//!   target's (chosen by the first RouteRule whose condition holds) PreFlow, conditional
//!   flows and PostFlow; the response the other way round (target first). Apigee picks one
//!   conditional flow, once; tollgate has no flow groups, so marker steps (one per flow, all
//!   before any flow's step, each `(this flow's condition) and not (an earlier flow's) ...`)
//!   record the choice in `apigee.import.flow.<scope>` and the flow's steps check it.
//! - The ProxyEndpoint's base path is the flow's `basePath` (so `proxy.pathsuffix` in
//!   conditions means what it does in Apigee), its `FaultRules` / `DefaultFaultRule` the
//!   flow's `faultRules` / `defaultFaultRule`.
//! - Never fail open: a step whose policy (or condition) cannot be converted becomes a
//!   RaiseFault answering 500 `tollgate.NotConverted` under the same name and condition, so
//!   the converted configuration validates and refuses what it cannot do. Policies that only
//!   observe (MessageLogging, ...) are left out instead.
//! - Every converted policy is built through the policy registry before it is written; one
//!   that tollgate refuses becomes a placeholder too, with tollgate's error in the report.
#![allow(clippy::too_many_lines)]

pub mod bundle;
pub mod policies;
pub mod report;
mod xml;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};
use serde_json::{json, Value};

use bundle::{Bundle, Kind};
use report::{Item, Report, Status};
use xml::{all, attr, child, child_text, kids, text, Classifier};

/// Apigee's request payload limit, written out as the flow's `maxBodyBytes`.
const APIGEE_MAX_BODY: usize = 10 * 1024 * 1024;
const PLACEHOLDER_CODE: &str = "tollgate.NotConverted";
/// The placeholder for steps that stand for no one policy: a condition that could not be
/// converted, a missing target, a target's token step that could not be.
const CONDITION_PLACEHOLDER: &str = "apigee-not-converted";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("{}: neither an Apigee proxy (apiproxy/) nor a shared flow (sharedflowbundle/)", .0.display())]
    NotABundle(PathBuf),
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("the converted configuration does not validate (an importer bug):\n{0}")]
    Invalid(String),
}

/// A converted bundle: the files to write (relative paths) and the report.
pub struct Import {
    pub report: Report,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// What one policy became.
struct PolicyOut {
    apigee_type: String,
    /// The tollgate name (Apigee's, with characters tollgate refuses replaced).
    name: String,
    spec: Option<Value>,
    /// Why not converted (placeholder message).
    why: String,
    /// Left out (observes only), and why.
    inert: Option<&'static str>,
    enabled: bool,
    continue_on_error: bool,
    /// The report's index of the policy's own item (updated when the build refuses it).
    item: usize,
}

/// A tollgate metadata name for an Apigee name: letters, digits, `-`, `_`, `.`.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect();
    if s.is_empty() {
        "unnamed".to_owned()
    } else {
        s
    }
}

fn parse<'t>(bundle: &Bundle, rel: &str, text: &'t str) -> Result<Document<'t>, ImportError> {
    Document::parse(text).map_err(|e| ImportError::Parse {
        file: bundle.show(rel),
        message: e.to_string(),
    })
}

/// Converts the bundle at `path` (nothing is written).
pub fn convert(path: &Path) -> Result<Import, ImportError> {
    let bundle = Bundle::read(path)?;
    Converter::new(&bundle, path).run()
}

/// Writes `import`'s files under `out` (created if missing), then its report as
/// `import/report.txt` and `import/report.json` (a subdirectory: the loader reads only the
/// top level, and a JSON report there would be read as configuration).
pub fn write(import: &Import, out: &Path) -> Result<(), ImportError> {
    let werr = |p: &Path, e: std::io::Error| ImportError::Write {
        path: p.to_owned(),
        message: e.to_string(),
    };
    for (rel, bytes) in &import.files {
        let p = out.join(rel);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| werr(dir, e))?;
        }
        std::fs::write(&p, bytes).map_err(|e| werr(&p, e))?;
    }
    let dir = out.join("import");
    std::fs::create_dir_all(&dir).map_err(|e| werr(&dir, e))?;
    let t = dir.join("report.txt");
    std::fs::write(&t, import.report.text()).map_err(|e| werr(&t, e))?;
    let j = dir.join("report.json");
    let json = serde_json::to_string_pretty(&import.report).unwrap_or_default();
    std::fs::write(&j, json).map_err(|e| werr(&j, e))?;
    Ok(())
}

struct Converter<'b> {
    bundle: &'b Bundle,
    shown: String,
    name: String,
    items: Vec<Item>,
    policies: BTreeMap<String, PolicyOut>,
    aux_files: BTreeMap<String, Vec<u8>>,
    docs: Vec<Value>,
    flows: Vec<Value>,
    used: BTreeSet<String>,
    /// Files whose elements were classified already (a target used by two proxy endpoints).
    classified: BTreeSet<String>,
    /// Synthesized policies (a target's Google token step): name → spec.
    synthesized: BTreeMap<String, Value>,
    condition_placeholder: bool,
    /// The flow being assembled (names its marker steps).
    current: String,
}

/// A flow's share of a step's condition: Apigee conditions, all of which must hold.
#[derive(Clone, Default)]
struct Cond {
    parts: Vec<String>,
    /// A part could not be converted: the steps fail closed.
    broken: Option<String>,
}

impl Cond {
    fn and(&self, more: &Cond) -> Cond {
        let mut c = self.clone();
        c.parts.extend(more.parts.iter().cloned());
        if c.broken.is_none() {
            c.broken.clone_from(&more.broken);
        }
        c
    }

    fn render(&self) -> Option<String> {
        match self.parts.len() {
            0 => None,
            1 => Some(self.parts[0].clone()),
            _ => Some(
                self.parts
                    .iter()
                    .map(|p| format!("({p})"))
                    .collect::<Vec<_>>()
                    .join(" and "),
            ),
        }
    }
}

impl<'b> Converter<'b> {
    fn new(bundle: &'b Bundle, path: &Path) -> Self {
        Self {
            bundle,
            shown: path.display().to_string(),
            name: String::new(),
            items: Vec::new(),
            policies: BTreeMap::new(),
            aux_files: BTreeMap::new(),
            docs: Vec::new(),
            flows: Vec::new(),
            used: BTreeSet::new(),
            classified: BTreeSet::new(),
            synthesized: BTreeMap::new(),
            condition_placeholder: false,
            current: String::new(),
        }
    }

    fn run(mut self) -> Result<Import, ImportError> {
        self.manifest()?;
        self.policies()?;
        // Before the steps are classified: a step of a policy tollgate refuses fails closed.
        self.check_policies(false);
        match self.bundle.kind {
            Kind::Apiproxy => self.proxies()?,
            Kind::Sharedflowbundle => self.shared_flows()?,
        }
        self.other_files();
        self.check_policies(true);
        let files = self.render();
        let outputs = files.keys().cloned().collect();
        let report = Report::new(self.shown, self.bundle.kind, self.name, self.items, outputs);
        Ok(Import { report, files })
    }

    fn manifest(&mut self) -> Result<(), ImportError> {
        let top: Vec<String> = self
            .bundle
            .files
            .keys()
            .filter(|k| !k.contains('/') && k.ends_with(".xml"))
            .cloned()
            .collect();
        for rel in top {
            let Some(t) = self.bundle.text(&rel) else {
                continue;
            };
            let t = t?;
            let doc = parse(self.bundle, &rel, t)?;
            let root = doc.root_element();
            if self.name.is_empty() {
                self.name =
                    attr(root, "name").unwrap_or_else(|| rel.trim_end_matches(".xml").to_owned());
            }
            let mut c = Classifier::new(self.bundle.show(&rel));
            c.ok(
                root,
                "the bundle's manifest (lists its policies, endpoints and resources; revision and dates have no effect)",
            );
            self.items.append(&mut c.items);
        }
        if self.name.is_empty() {
            self.name = "imported".to_owned();
        }
        Ok(())
    }

    fn policies(&mut self) -> Result<(), ImportError> {
        let list: Vec<String> = self
            .bundle
            .list("policies")
            .into_iter()
            .map(str::to_owned)
            .collect();
        for f in list {
            let rel = format!("policies/{f}");
            if !f.ends_with(".xml") {
                self.items.push(Item {
                    file: self.bundle.show(&rel),
                    element: f.clone(),
                    status: Status::NotConvertible,
                    note: "not a policy file (policies/ holds XML)".to_owned(),
                });
                continue;
            }
            let Some(t) = self.bundle.text(&rel) else {
                continue;
            };
            let t = t?;
            let doc = parse(self.bundle, &rel, t)?;
            let root = doc.root_element();
            let apigee_type = root.tag_name().name().to_owned();
            let apigee_name =
                attr(root, "name").unwrap_or_else(|| f.trim_end_matches(".xml").to_owned());
            // Two Apigee names may sanitize alike (`A B`, `A-B`): each keeps a name of its own.
            let mut name = sanitize(&apigee_name);
            let base = name.clone();
            let mut n = 2;
            while self.policies.values().any(|p| p.name == name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            let mut x = policies::Ctx {
                c: Classifier::new(self.bundle.show(&rel)),
                bundle: self.bundle,
                name: name.clone(),
                base_path: self.first_base_path(),
                files: Vec::new(),
                docs: Vec::new(),
                used: Vec::new(),
            };
            let enabled = attr(root, "enabled").is_none_or(|v| xml::truthy(&v));
            let continue_on_error = attr(root, "continueOnError").is_some_and(|v| xml::truthy(&v));
            let inert = policies::INERT
                .iter()
                .find(|(t, _)| *t == apigee_type)
                .map(|(_, why)| *why);
            let (spec, why) = if let Some(why) = inert {
                x.c.touch(root);
                for k in kids(root) {
                    x.c.approx(k, "left out with the policy");
                }
                (None, why.to_owned())
            } else {
                match policies::entry(&apigee_type) {
                    Some(e) => match e.convert {
                        Some(f) => {
                            let spec = f(&mut x, root);
                            x.c.finish(root, &apigee_type);
                            let why = if spec.is_none() {
                                "an element of the policy could not be converted".to_owned()
                            } else {
                                String::new()
                            };
                            (spec, why)
                        }
                        None => {
                            x.c.touch(root);
                            for k in kids(root) {
                                x.c.add(
                                    k,
                                    Status::NotConvertible,
                                    format!("with the policy: {}", e.why),
                                );
                            }
                            (None, e.why.to_owned())
                        }
                    },
                    None => {
                        x.c.touch(root);
                        for k in kids(root) {
                            x.c.add(
                                k,
                                Status::NotConvertible,
                                "with the policy: an unknown policy type",
                            );
                        }
                        (
                            None,
                            format!(
                                "`{apigee_type}` is not an Apigee policy type the importer knows"
                            ),
                        )
                    }
                }
            };
            // The policy's own item, first among its elements.
            let status = if inert.is_some() {
                Status::Approximated
            } else if spec.is_none() {
                Status::NotConvertible
            } else {
                x.c.worst.max(Status::Converted)
            };
            let note = if inert.is_some() {
                why.clone()
            } else if let Some(s) = &spec {
                format!(
                    "Policy `{name}` ({})",
                    s.get("type").and_then(Value::as_str).unwrap_or_default()
                )
            } else {
                format!("steps using it answer 500 {PLACEHOLDER_CODE}: {why}")
            };
            let mut attrs = Vec::new();
            if !enabled {
                attrs
                    .push("enabled=false: its steps are left out, as Apigee skips them".to_owned());
            }
            if continue_on_error {
                attrs.push("continueOnError=true: its steps carry continueOnError".to_owned());
            }
            let note = if attrs.is_empty() {
                note
            } else {
                format!("{note}; {}", attrs.join("; "))
            };
            let item = self.items.len();
            self.items.push(Item {
                file: self.bundle.show(&rel),
                element: xml::label(root),
                status,
                note,
            });
            self.items.append(&mut x.c.items);
            if spec.is_some() {
                for (p, b) in x.files {
                    self.aux_files.insert(p, b);
                }
                self.docs.append(&mut x.docs);
                self.used.extend(x.used);
            }
            self.policies.insert(
                apigee_name,
                PolicyOut {
                    apigee_type,
                    name,
                    spec,
                    why,
                    inert,
                    enabled,
                    continue_on_error,
                    item,
                },
            );
        }
        Ok(())
    }

    /// The first ProxyEndpoint's base path (OASValidation needs it when converting).
    fn first_base_path(&self) -> Option<String> {
        let rel = self
            .bundle
            .list("proxies")
            .into_iter()
            .find(|f| f.ends_with(".xml"))?;
        let t = self.bundle.text(&format!("proxies/{rel}"))?.ok()?;
        let doc = Document::parse(t).ok()?;
        let conn = child(doc.root_element(), "HTTPProxyConnection")?;
        child_text(conn, "BasePath")
    }

    /// Converts one `<Flow>` condition (or a route rule's, a step's, a fault rule's): as
    /// written (the flow's `basePath` gives `proxy.pathsuffix` its meaning), compiled.
    fn condition(&self, raw: Option<String>, _base: &str) -> Cond {
        let Some(raw) = raw.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()) else {
            return Cond::default();
        };
        match crate::expr::Condition::compile_apigee(&raw) {
            Ok(_) => Cond {
                parts: vec![raw],
                broken: None,
            },
            Err(e) => Cond {
                parts: Vec::new(),
                broken: Some(format!("condition `{raw}`: {e}")),
            },
        }
    }

    /// `not (c)` for first-match chains.
    fn negate(c: &Cond) -> Cond {
        Cond {
            parts: c.parts.iter().map(|p| format!("not ({p})")).collect(),
            broken: c.broken.clone(),
        }
    }

    /// The steps of a `<Request>` / `<Response>` element, each classified.
    fn steps(
        &mut self,
        c: &mut Classifier,
        holder: Option<Node<'_, '_>>,
        flow: &Cond,
        base: &str,
        where_: &str,
    ) -> Vec<Value> {
        let Some(holder) = holder else {
            return Vec::new();
        };
        c.touch(holder);
        let mut out = Vec::new();
        for step in kids(holder) {
            if matches!(step.tag_name().name(), "Condition" | "AlwaysEnforce") {
                continue; // a fault rule's own, classified by the caller
            }
            if step.tag_name().name() != "Step" {
                c.no(step, "only Step elements hold steps");
                continue;
            }
            let Some(pname) = child_text(step, "Name") else {
                c.no(step, "a Step without Name");
                continue;
            };
            let own = self.condition(child_text(step, "Condition"), base);
            let cond = flow.and(&own);
            let label = format!("{where_} step `{pname}`");
            let Some(p) = self.policies.get(&pname) else {
                c.no(step, format!("{label}: no policy named `{pname}` in policies/ (the step would fail in Apigee too); it answers 500 {PLACEHOLDER_CODE}"));
                let name = sanitize(&pname);
                self.policies.insert(
                    pname.clone(),
                    PolicyOut {
                        apigee_type: "?".to_owned(),
                        name: name.clone(),
                        spec: None,
                        why: format!("no policy named `{pname}`"),
                        inert: None,
                        enabled: true,
                        continue_on_error: false,
                        item: usize::MAX,
                    },
                );
                out.push(json!({"policy": name}));
                continue;
            };
            if !p.enabled {
                c.ok(
                    step,
                    format!("{label}: left out (the policy is disabled, Apigee skips it)"),
                );
                continue;
            }
            if let Some(why) = p.inert {
                c.approx(step, format!("{label}: left out: {why}"));
                continue;
            }
            if let Some(broken) = &cond.broken {
                c.no(step, format!("{label}: {broken}; the step answers 500 {PLACEHOLDER_CODE} on every request"));
                self.condition_placeholder = true;
                out.push(json!({"policy": CONDITION_PLACEHOLDER}));
                continue;
            }
            let mut s = serde_json::Map::new();
            s.insert("policy".into(), json!(p.name));
            if let Some(r) = cond.render() {
                s.insert("apigeeCondition".into(), json!(r));
            }
            if p.continue_on_error {
                s.insert("continueOnError".into(), json!(true));
            }
            if p.spec.is_some() {
                c.ok(step, label);
            } else {
                c.no(step, format!("{label}: the policy `{pname}` ({}) could not be converted: {}; the step answers 500 {PLACEHOLDER_CODE}", p.apigee_type, p.why));
            }
            out.push(Value::Object(s));
        }
        out
    }

    /// A ProxyEndpoint's `FaultRules` and `DefaultFaultRule` as the flow's `faultRules`
    /// (kept in Apigee's order: tollgate, like Apigee, tries them from the last) and
    /// `defaultFaultRule`.
    fn fault_rules(
        &mut self,
        c: &mut Classifier,
        root: Node<'_, '_>,
        base: &str,
    ) -> (Vec<Value>, Option<Value>) {
        let mut rules = Vec::new();
        if let Some(fr) = child(root, "FaultRules") {
            if kids(fr).next().is_none() {
                c.ok(fr, "empty");
            }
            c.touch(fr);
            for r in kids(fr) {
                let name = attr(r, "name").unwrap_or_else(|| format!("rule-{}", rules.len() + 1));
                let own = self.condition(child_text(r, "Condition"), base);
                if let Some(b) = &own.broken {
                    c.no(r, format!("{b}: the rule is left out (faults it would shape keep tollgate's Apigee-format body)"));
                    continue;
                }
                c.touch(r);
                if let Some(cn) = child(r, "Condition") {
                    c.ok(cn, "the rule's apigeeCondition");
                }
                let steps = self.steps(
                    c,
                    Some(r),
                    &Cond::default(),
                    base,
                    &format!("fault rule `{name}`"),
                );
                let mut rule = serde_json::Map::new();
                rule.insert("name".into(), json!(name));
                if let Some(cond) = own.render() {
                    rule.insert("apigeeCondition".into(), json!(cond));
                }
                rule.insert("steps".into(), json!(steps));
                rules.push(Value::Object(rule));
            }
        }
        let mut default = None;
        if let Some(d) = child(root, "DefaultFaultRule") {
            c.touch(d);
            let mut rule = serde_json::Map::new();
            if let Some(n) = attr(d, "name") {
                rule.insert("name".into(), json!(n));
            }
            if let Some(a) = child(d, "AlwaysEnforce") {
                rule.insert("alwaysEnforce".into(), json!(xml::truthy(&text(a))));
                c.ok(a, "alwaysEnforce");
            }
            if let Some(cn) = child(d, "Condition") {
                c.no(cn, "a DefaultFaultRule condition: tollgate's defaultFaultRule has none (its steps may carry conditions)");
            }
            let steps = self.steps(c, Some(d), &Cond::default(), base, "default fault rule");
            rule.insert("steps".into(), json!(steps));
            default = Some(Value::Object(rule));
        }
        (rules, default)
    }

    /// A TargetEndpoint's fault rules: tollgate's flow has one set (the proxy's).
    fn target_fault_rules(c: &mut Classifier, root: Node<'_, '_>) {
        if let Some(fr) = child(root, "FaultRules") {
            if kids(fr).next().is_none() {
                c.ok(fr, "empty");
            } else {
                c.touch(fr);
                for r in kids(fr) {
                    c.no(r, "a TargetEndpoint's fault rule: a tollgate flow has one set of faultRules (move it to the ProxyEndpoint's)");
                }
            }
        }
        if let Some(d) = child(root, "DefaultFaultRule") {
            c.no(d, "a TargetEndpoint's DefaultFaultRule: a tollgate flow has one (the ProxyEndpoint's)");
        }
    }

    /// PreFlow, conditional Flows and PostFlow of an endpoint: (request, response) steps.
    fn endpoint_steps(
        &mut self,
        c: &mut Classifier,
        root: Node<'_, '_>,
        outer: &Cond,
        base: &str,
        what: &str,
    ) -> (Vec<Value>, Vec<Value>) {
        let (mut req, mut resp) = (Vec::new(), Vec::new());
        let mut flows_req = Vec::new();
        let mut flows_resp = Vec::new();
        // The flow choice, all made before any flow's step runs.
        let mut markers = Vec::new();
        if let Some(pre) = child(root, "PreFlow") {
            c.touch(pre);
            req.extend(self.steps(
                c,
                child(pre, "Request"),
                outer,
                base,
                &format!("{what} PreFlow request"),
            ));
            resp.extend(self.steps(
                c,
                child(pre, "Response"),
                outer,
                base,
                &format!("{what} PreFlow response"),
            ));
        }
        if let Some(flows) = child(root, "Flows") {
            c.touch(flows);
            let mut earlier: Vec<Cond> = Vec::new();
            let mut catch_all = false;
            for f in kids(flows) {
                c.touch(f);
                let fname = attr(f, "name").unwrap_or_default();
                if catch_all {
                    c.ok(f, "never runs: an earlier flow has no condition (Apigee runs the first flow that matches); left out");
                    continue;
                }
                let own = self.condition(child_text(f, "Condition"), base);
                let mut cond = outer.and(&own);
                for e in &earlier {
                    cond = cond.and(&Self::negate(e));
                }
                if own.parts.is_empty() && own.broken.is_none() {
                    catch_all = true;
                }
                // Apigee chooses the flow once, here: a marker step records the choice and
                // the flow's steps check it, so a step changing what the condition reads
                // (a header, a variable) does not change which flow runs.
                let has_steps = ["Request", "Response"]
                    .iter()
                    .filter_map(|d| child(f, d))
                    .any(|h| kids(h).next().is_some());
                let scope = sanitize(&what.replace('`', ""));
                let value = sanitize(&fname);
                let var = format!("apigee.import.flow.{scope}");
                if has_steps && cond.broken.is_none() {
                    let marker = sanitize(&format!("apigee-flow.{}.{scope}.{value}", self.current));
                    self.synthesized.insert(
                        marker.clone(),
                        json!({"type": "AssignMessage", "assignVariables": {var.clone(): value.clone()}}),
                    );
                    let mut m = serde_json::Map::new();
                    m.insert("policy".into(), json!(marker));
                    if let Some(r) = cond.render() {
                        m.insert("apigeeCondition".into(), json!(r));
                    }
                    markers.push(Value::Object(m));
                    cond = Cond {
                        parts: vec![format!("{var} = \"{value}\"")],
                        broken: None,
                    };
                }
                if let Some(cn) = child(f, "Condition") {
                    match &own.broken {
                        None => c.ok(cn, format!("chosen once, where Apigee chooses (first match): a step `apigee-flow…` sets {var} = \"{value}\" when this condition holds and no earlier flow's did; the flow's steps check it")),
                        Some(b) => c.no(cn, b.clone()),
                    }
                }
                flows_req.extend(self.steps(
                    c,
                    child(f, "Request"),
                    &cond,
                    base,
                    &format!("{what} flow `{fname}` request"),
                ));
                flows_resp.extend(self.steps(
                    c,
                    child(f, "Response"),
                    &cond,
                    base,
                    &format!("{what} flow `{fname}` response"),
                ));
                earlier.push(own);
            }
        }
        req.extend(markers);
        req.extend(flows_req);
        resp.extend(flows_resp);
        if let Some(post) = child(root, "PostFlow") {
            c.touch(post);
            req.extend(self.steps(
                c,
                child(post, "Request"),
                outer,
                base,
                &format!("{what} PostFlow request"),
            ));
            resp.extend(self.steps(
                c,
                child(post, "Response"),
                outer,
                base,
                &format!("{what} PostFlow response"),
            ));
        }
        (req, resp)
    }

    fn proxies(&mut self) -> Result<(), ImportError> {
        let list: Vec<String> = self
            .bundle
            .list("proxies")
            .into_iter()
            .filter(|f| f.ends_with(".xml"))
            .map(str::to_owned)
            .collect();
        let several = list.len() > 1;
        for f in list {
            let rel = format!("proxies/{f}");
            let Some(t) = self.bundle.text(&rel) else {
                continue;
            };
            let t = t?;
            let doc = parse(self.bundle, &rel, t)?;
            let root = doc.root_element();
            let mut c = Classifier::new(self.bundle.show(&rel));
            let ep_name =
                attr(root, "name").unwrap_or_else(|| f.trim_end_matches(".xml").to_owned());
            let flow_name = if several {
                sanitize(&format!("{}-{ep_name}", self.name))
            } else {
                sanitize(&self.name)
            };
            self.current.clone_from(&flow_name);
            let mut base = "/".to_owned();
            if let Some(conn) = child(root, "HTTPProxyConnection") {
                c.touch(conn);
                for k in kids(conn) {
                    match k.tag_name().name() {
                        "BasePath" => {
                            base = text(k);
                            if !base.starts_with('/') {
                                base.insert(0, '/');
                            }
                            c.ok(k, format!("match.pathPrefixes: [{base}] (a plain prefix: /v1/pets also takes /v1/petstore)"));
                        }
                        "VirtualHost" => {
                            c.approx(k, "hosts are Envoy's routing (add match.hosts to restrict)")
                        }
                        "Properties" => c.approx(k, "connection properties are Envoy's"),
                        other => c.no(k, format!("HTTPProxyConnection/{other}")),
                    }
                }
            }
            let (fault_rules, default_fault_rule) = self.fault_rules(&mut c, root, &base);
            let (mut req, mut resp) =
                self.endpoint_steps(&mut c, root, &Cond::default(), &base, "proxy");
            // Route rules: the first whose condition holds picks the target.
            let mut target_req = Vec::new();
            let mut target_resp = Vec::new();
            let mut urls = Vec::new();
            let mut earlier: Vec<Cond> = Vec::new();
            for rr in all(root, "RouteRule") {
                c.touch(rr);
                let own = self.condition(child_text(rr, "Condition"), &base);
                if let Some(cn) = child(rr, "Condition") {
                    match &own.broken {
                        None => c.ok(cn, "the route's condition, on the target's steps"),
                        Some(b) => c.no(cn, b.clone()),
                    }
                }
                let mut cond = own.clone();
                for e in &earlier {
                    cond = cond.and(&Self::negate(e));
                }
                earlier.push(own);
                if let Some(u) = child(rr, "URL") {
                    urls.push(text(u));
                    c.approx(u, "the upstream is Envoy's route for this flow; the URL is kept in the flow's annotation apigee.import/target-url");
                }
                match child(rr, "TargetEndpoint") {
                    Some(te) => {
                        let tname = text(te);
                        c.ok(
                            te,
                            format!("the steps of TargetEndpoint `{tname}` follow the proxy's"),
                        );
                        let (rq, rs, url) = self.target(&tname, &cond, &base)?;
                        target_req.extend(rq);
                        target_resp.extend(rs);
                        urls.extend(url);
                    }
                    None if child(rr, "URL").is_none() => {
                        c.ok(rr, "no target: the request goes on where Envoy routes it (a targetless proxy, as the Apigee Extension Processor runs)");
                    }
                    None => {}
                }
            }
            if let Some(pc) = child(root, "PostClientFlow") {
                c.touch(pc);
                for holder in kids(pc) {
                    c.touch(holder);
                    for step in kids(holder) {
                        let pname = child_text(step, "Name").unwrap_or_default();
                        match self.policies.get(&pname).and_then(|p| p.inert) {
                            Some(why) => c.approx(step, format!("PostClientFlow step `{pname}`: left out: {why}")),
                            None => c.no(step, format!("PostClientFlow step `{pname}`: tollgate runs nothing after the response is sent (after-exchange work is built into its policies)")),
                        }
                    }
                }
            }
            c.finish(root, "a ProxyEndpoint");
            req.extend(target_req);
            // Response: target first, then the proxy's.
            target_resp.append(&mut resp);
            let resp = target_resp;
            let mut annotations = serde_json::Map::new();
            annotations.insert("apigee.import/proxy".into(), json!(self.name));
            annotations.insert("apigee.import/endpoint".into(), json!(ep_name));
            if !urls.is_empty() {
                annotations.insert("apigee.import/target-url".into(), json!(urls.join(" ")));
            }
            let mut spec = serde_json::Map::new();
            spec.insert("match".into(), json!({"pathPrefixes": [base]}));
            spec.insert("basePath".into(), json!(base));
            spec.insert("errorFormat".into(), json!("apigee"));
            spec.insert("maxBodyBytes".into(), json!(APIGEE_MAX_BODY));
            spec.insert("request".into(), json!(req));
            spec.insert("response".into(), json!(resp));
            if !fault_rules.is_empty() {
                spec.insert("faultRules".into(), json!(fault_rules));
            }
            if let Some(d) = default_fault_rule {
                spec.insert("defaultFaultRule".into(), d);
            }
            self.flows.push(json!({
                "apiVersion": "tollgate.dev/v1alpha1",
                "kind": "Flow",
                "metadata": {"name": flow_name, "annotations": annotations},
                "spec": spec,
            }));
            self.items.append(&mut c.items);
        }
        if self.flows.is_empty() {
            self.items.push(Item {
                file: self.bundle.show("proxies"),
                element: "ProxyEndpoint".to_owned(),
                status: Status::NotConvertible,
                note: "the bundle has no ProxyEndpoint: no flow is written".to_owned(),
            });
        }
        Ok(())
    }

    /// A TargetEndpoint's (request, response) steps under `route`, and its URL.
    #[allow(clippy::type_complexity)]
    fn target(
        &mut self,
        tname: &str,
        route: &Cond,
        base: &str,
    ) -> Result<(Vec<Value>, Vec<Value>, Option<String>), ImportError> {
        let rel = format!("targets/{tname}.xml");
        let Some(t) = self.bundle.text(&rel) else {
            self.items.push(Item {
                file: self.bundle.show(&rel),
                element: format!("TargetEndpoint[{tname}]"),
                status: Status::NotConvertible,
                note: format!("the route names a TargetEndpoint the bundle does not have; a step answering 500 {PLACEHOLDER_CODE} stands for it"),
            });
            self.condition_placeholder = true;
            let mut s = serde_json::Map::new();
            s.insert("policy".into(), json!(CONDITION_PLACEHOLDER));
            if let Some(r) = route.render() {
                s.insert("apigeeCondition".into(), json!(r));
            }
            return Ok((vec![Value::Object(s)], Vec::new(), None));
        };
        let t = t?;
        let doc = parse(self.bundle, &rel, t)?;
        let root = doc.root_element();
        let mut c = Classifier::new(self.bundle.show(&rel));
        Self::target_fault_rules(&mut c, root);
        let (mut req, resp) =
            self.endpoint_steps(&mut c, root, route, base, &format!("target `{tname}`"));
        let mut url = None;
        if let Some(conn) = child(root, "HTTPTargetConnection") {
            c.touch(conn);
            for k in kids(conn) {
                match k.tag_name().name() {
                    "URL" => {
                        url = Some(text(k));
                        c.approx(k, "the upstream is Envoy's route for this flow; the URL is kept in the flow's annotation apigee.import/target-url");
                    }
                    "Authentication" => {
                        let g = policies::google_token(&mut c, k);
                        match g {
                            Some(g) => {
                                let name = sanitize(&format!("{tname}-google-token"));
                                self.synthesized.insert(
                                    name.clone(),
                                    json!({"type": "AssignMessage", "googleToken": g}),
                                );
                                let mut s = serde_json::Map::new();
                                s.insert("policy".into(), json!(name));
                                if let Some(r) = route.render() {
                                    s.insert("apigeeCondition".into(), json!(r));
                                }
                                req.push(Value::Object(s));
                                c.add_named(format!("{} (token step)", xml::path(k)), Status::Converted, format!("the last request step: AssignMessage `{name}` with googleToken"));
                            }
                            None => {
                                req.push(json!({"policy": CONDITION_PLACEHOLDER}));
                                self.condition_placeholder = true;
                            }
                        }
                    }
                    "LoadBalancer" | "SSLInfo" | "Properties" | "Path" => {
                        c.approx(
                            k,
                            "upstream connections are Envoy's (cluster, TLS, load balancing)",
                        );
                    }
                    other => c.no(k, format!("HTTPTargetConnection/{other}")),
                }
            }
        }
        if let Some(l) = child(root, "LocalTargetConnection") {
            c.no(l, "tollgate cannot chain proxies (LocalTargetConnection)");
        }
        if self.classified.insert(rel) {
            c.finish(root, "a TargetEndpoint");
            self.items.append(&mut c.items);
        }
        Ok((req, resp, url))
    }

    fn shared_flows(&mut self) -> Result<(), ImportError> {
        let list: Vec<String> = self
            .bundle
            .list("sharedflows")
            .into_iter()
            .filter(|f| f.ends_with(".xml"))
            .map(str::to_owned)
            .collect();
        for f in list {
            let rel = format!("sharedflows/{f}");
            let Some(t) = self.bundle.text(&rel) else {
                continue;
            };
            let t = t?;
            let doc = parse(self.bundle, &rel, t)?;
            let root = doc.root_element();
            let mut c = Classifier::new(self.bundle.show(&rel));
            let sf = attr(root, "name").unwrap_or_else(|| f.trim_end_matches(".xml").to_owned());
            let flow_name = sanitize(&if sf == "default" {
                self.name.clone()
            } else {
                format!("{}-{sf}", self.name)
            });
            let req = self.steps(&mut c, Some(root), &Cond::default(), "/", "shared flow");
            c.add_named(
                xml::label(root),
                Status::Approximated,
                format!("becomes Flow `{flow_name}` (no match: chosen by name through the extension metadata `tollgate-flow: {flow_name}`); tollgate has no FlowCallout, so its steps run as the flow's request steps"),
            );
            c.finish(root, "a SharedFlow");
            self.flows.push(json!({
                "apiVersion": "tollgate.dev/v1alpha1",
                "kind": "Flow",
                "metadata": {"name": flow_name, "annotations": {"apigee.import/sharedflow": self.name.clone()}},
                "spec": {
                    "errorFormat": "apigee",
                    "maxBodyBytes": APIGEE_MAX_BODY,
                    "request": req,
                }
            }));
            self.items.append(&mut c.items);
        }
        Ok(())
    }

    /// Files outside what the endpoints and policies read.
    fn other_files(&mut self) {
        let known = ["policies/", "proxies/", "targets/", "sharedflows/"];
        let files: Vec<String> = self.bundle.files.keys().cloned().collect();
        for rel in files {
            if !rel.contains('/') && rel.ends_with(".xml") {
                continue;
            }
            if known.iter().any(|k| rel.starts_with(k)) {
                if rel.ends_with(".xml") || rel.starts_with("policies/") {
                    continue;
                }
                self.items.push(Item {
                    file: self.bundle.show(&rel),
                    element: rel.clone(),
                    status: Status::Approximated,
                    note: "not XML: ignored".to_owned(),
                });
                continue;
            }
            let (status, note) = if self.used.contains(&rel) {
                (Status::Converted, "copied (scripts/, specs/)".to_owned())
            } else if rel.starts_with("resources/jsc/") || rel.starts_with("resources/oas/") {
                (
                    Status::Approximated,
                    "not used by a converted policy: not copied".to_owned(),
                )
            } else if let Some(kind) = rel
                .strip_prefix("resources/")
                .and_then(|r| r.split('/').next())
            {
                (
                    Status::NotConvertible,
                    format!("`{kind}` resources: tollgate has no {kind} runtime or resource type"),
                )
            } else {
                (
                    Status::NotConvertible,
                    "a file the importer does not know".to_owned(),
                )
            };
            self.items.push(Item {
                file: self.bundle.show(&rel),
                element: rel,
                status,
                note,
            });
        }
    }

    /// Builds every converted spec through the registry (with its files in a scratch
    /// directory); one tollgate refuses becomes a placeholder, with the error in the report.
    fn check_policies(&mut self, synthesized: bool) {
        let scratch = std::env::temp_dir().join(format!(
            "tollgate-import-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        for (rel, bytes) in &self.aux_files {
            let p = scratch.join(rel);
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let _ = std::fs::write(&p, bytes);
        }
        let services = crate::services::Services::default();
        let mut refused: HashMap<String, String> = HashMap::new();
        let specs: Vec<(String, Value)> = if synthesized {
            self.synthesized
                .iter()
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect()
        } else {
            self.policies
                .values()
                .filter_map(|p| p.spec.as_ref().map(|s| (p.name.clone(), s.clone())))
                .collect()
        };
        for (name, mut spec) in specs {
            let ty = spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            // The builder reads the spec without its `type` (the loader's envelope has it).
            if let Some(m) = spec.as_object_mut() {
                m.remove("type");
            }
            let Some(build) = crate::policies::builder(&ty) else {
                refused.insert(name, format!("tollgate has no policy type {ty}"));
                continue;
            };
            let ctx = crate::policies::BuildContext {
                name: name.clone(),
                config_dir: Some(scratch.clone()),
                services: services.clone(),
            };
            let value: serde_norway::Value = match serde_norway::to_value(&spec) {
                Ok(v) => v,
                Err(e) => {
                    refused.insert(name, e.to_string());
                    continue;
                }
            };
            if let Err(e) = build(&ctx, value) {
                refused.insert(name, e.to_string());
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
        for p in self.policies.values_mut() {
            if let Some(e) = refused.get(&p.name) {
                p.spec = None;
                p.why = format!("tollgate refuses the converted spec: {e}");
                if let Some(it) = self.items.get_mut(p.item) {
                    it.status = Status::NotConvertible;
                    it.note = format!("steps using it answer 500 {PLACEHOLDER_CODE}: {}", p.why);
                }
            }
        }
        for (name, e) in &refused {
            if self.synthesized.remove(name).is_some() {
                self.items.push(Item {
                    file: self.bundle.show("targets"),
                    element: name.clone(),
                    status: Status::NotConvertible,
                    note: format!(
                        "tollgate refuses the token step: {e}; it answers 500 {PLACEHOLDER_CODE}"
                    ),
                });
                self.synthesized
                    .insert(name.clone(), placeholder(&format!("token step {name}")));
            }
        }
    }

    /// The configuration files: `<name>.yaml` (policies, then flows), scripts and specs.
    fn render(&mut self) -> BTreeMap<String, Vec<u8>> {
        let mut docs: Vec<Value> = Vec::new();
        let doc = |name: &str, spec: Value| {
            json!({
                "apiVersion": "tollgate.dev/v1alpha1",
                "kind": "Policy",
                "metadata": {"name": name},
                "spec": spec,
            })
        };
        let mut seen = BTreeSet::new();
        for p in self.policies.values() {
            if p.inert.is_some() || !seen.insert(p.name.clone()) {
                continue;
            }
            let spec = match &p.spec {
                Some(s) => s.clone(),
                None => placeholder(&format!("policy {} ({})", p.name, p.apigee_type)),
            };
            docs.push(doc(&p.name, spec));
        }
        for (n, s) in &self.synthesized {
            if seen.insert(n.clone()) {
                docs.push(doc(n, s.clone()));
            }
        }
        if self.condition_placeholder && seen.insert(CONDITION_PLACEHOLDER.to_owned()) {
            docs.push(doc(
                CONDITION_PLACEHOLDER,
                placeholder("an Apigee condition"),
            ));
        }
        // One KeyValueMap document per map (several policies may seed one).
        let mut maps: BTreeMap<String, Value> = BTreeMap::new();
        for d in self.docs.drain(..) {
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match maps.get_mut(&name) {
                Some(m) => {
                    if let (Some(a), Some(b)) = (
                        m["spec"]["entries"].as_object_mut(),
                        d["spec"]["entries"].as_object(),
                    ) {
                        for (k, v) in b {
                            a.entry(k.clone()).or_insert(v.clone());
                        }
                    }
                }
                None => {
                    maps.insert(name, d);
                }
            }
        }
        docs.extend(maps.into_values());
        docs.append(&mut self.flows);
        let mut yaml = format!(
            "# Converted by `tollgate import` from the Apigee {} `{}`.\n# See import/report.txt for what converted, what was approximated and what was not.\n",
            self.bundle.kind.root(),
            self.name
        );
        for d in &docs {
            yaml.push_str("---\n");
            yaml.push_str(&serde_norway::to_string(&readable(d)).unwrap_or_default());
        }
        let mut files = std::mem::take(&mut self.aux_files);
        files.insert(format!("{}.yaml", sanitize(&self.name)), yaml.into_bytes());
        files
    }
}

/// A document in the order people read it: `apiVersion`, `kind`, `metadata`, `spec` with
/// its `type` first (JSON maps here are sorted by key).
fn readable(doc: &Value) -> serde_norway::Value {
    use serde_norway::{Mapping, Value as Y};
    let Ok(Y::Mapping(m)) = serde_norway::to_value(doc) else {
        return serde_norway::to_value(doc).unwrap_or(Y::Null);
    };
    let first = |m: &Mapping, keys: &[&str]| {
        let mut out = Mapping::new();
        for k in keys {
            if let Some(v) = m.get(*k) {
                out.insert(Y::from(*k), v.clone());
            }
        }
        for (k, v) in m {
            if !k.as_str().is_some_and(|k| keys.contains(&k)) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    };
    let mut top = first(&m, &["apiVersion", "kind", "metadata", "spec"]);
    if let Some(Y::Mapping(spec)) = top.get("spec").cloned() {
        top.insert(Y::from("spec"), Y::Mapping(first(&spec, &["type"])));
    }
    Y::Mapping(top)
}

/// A RaiseFault that refuses every request reaching the step: what cannot be converted
/// fails closed.
fn placeholder(what: &str) -> Value {
    json!({
        "type": "RaiseFault",
        "status": 500,
        "errorCode": PLACEHOLDER_CODE,
        "message": format!("{what} was not converted from Apigee (see the import report)"),
    })
}

/// Checks a written directory as `tollgate validate` does.
pub fn validate_dir(dir: &Path) -> Result<(), ImportError> {
    crate::config::read_dir(dir)
        .and_then(|files| crate::config::compile(&files, Some(dir)))
        .map(|_| ())
        .map_err(|e| ImportError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tollgate_refuses_are_replaced() {
        assert_eq!(sanitize("Verify API Key"), "Verify-API-Key");
        assert_eq!(sanitize("AM-Set_1.x"), "AM-Set_1.x");
        assert_eq!(sanitize(""), "unnamed");
    }
}
