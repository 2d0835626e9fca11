//! `TemplateRule`: admin rules on what flows must and must not contain (Apigee's
//! ApimTemplateRule required and deny lists).

use super::snapshot::Flow;
use super::spec::TemplateRuleSpec;
use crate::pipeline::{Direction, Step};
use crate::policies::ALL_TYPES;

#[derive(Debug)]
pub struct TemplateRule {
    name: String,
    flows: Option<Vec<String>>,
    required: Vec<String>,
    denied: Vec<String>,
}

/// `*` matches any run of characters. Linear in the pattern and the name: the literal
/// pieces between stars are found left to right, each as early as it occurs (the earliest
/// place leaves the most room for the rest, so no backtracking is needed).
fn glob(pattern: &str, s: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let mut middle: Vec<&str> = pieces.collect();
    let Some(last) = middle.pop() else {
        // No star: the whole name.
        return rest.is_empty();
    };
    for piece in middle {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// The direction a policy type guards: a required type is met only by a step there.
fn guarded_direction(type_name: &str) -> Direction {
    match type_name {
        "SanitizeResponse" => Direction::Response,
        _ => Direction::Request,
    }
}

/// Why no step of `flow` meets a requirement for `type_name`, or `None` when one does: a
/// step of that type in the direction it guards, without a condition or `continueOnError`.
/// (A cache hit before it answers without the upstream; a cache placed before
/// authentication is judged at load on its own, see `check_cache_placement`.)
fn unmet(flow: &Flow, type_name: &str) -> Option<Vec<String>> {
    let dir = guarded_direction(type_name);
    let (steps, other, here, there): (Vec<&Step>, Vec<&Step>, _, _) = match dir {
        Direction::Request => (
            flow.request.steps().collect(),
            flow.response.steps().collect(),
            "request",
            "response",
        ),
        Direction::Response => (
            flow.response.steps().collect(),
            flow.request.steps().collect(),
            "response",
            "request",
        ),
    };
    let mut reasons = Vec::new();
    for s in steps {
        if s.policy.type_name() == type_name {
            let why = if s.condition.is_some() {
                Some("has a condition".to_owned())
            } else if s.continue_on_error {
                Some("has continueOnError".to_owned())
            } else {
                None
            };
            match why {
                None => return None,
                Some(w) => reasons.push(format!("its {here} step `{}` {w}", s.policy_name)),
            }
        }
    }
    for s in other {
        if s.policy.type_name() == type_name {
            reasons.push(format!(
                "its {there} step `{}` does not guard the {here}",
                s.policy_name
            ));
        }
    }
    Some(reasons)
}

impl TemplateRule {
    pub fn compile(name: &str, spec: TemplateRuleSpec) -> Result<Self, String> {
        for (field, list) in [
            ("requiredPolicyTypes", &spec.required_policy_types),
            ("deniedPolicyTypes", &spec.denied_policy_types),
        ] {
            for (i, t) in list.iter().enumerate() {
                if !ALL_TYPES.contains(&t.as_str()) {
                    return Err(format!(
                        "field `spec.{field}[{i}]`: unknown policy type `{t}`; known types: {}",
                        ALL_TYPES.join(", ")
                    ));
                }
            }
        }
        if let Some(t) = spec
            .required_policy_types
            .iter()
            .find(|t| spec.denied_policy_types.contains(t))
        {
            return Err(format!("policy type `{t}` is both required and denied"));
        }
        if spec.required_policy_types.is_empty() && spec.denied_policy_types.is_empty() {
            return Err("a TemplateRule needs requiredPolicyTypes or deniedPolicyTypes".into());
        }
        Ok(Self {
            name: name.to_owned(),
            flows: spec.flows,
            required: spec.required_policy_types,
            denied: spec.denied_policy_types,
        })
    }

    fn applies_to(&self, flow: &str) -> bool {
        self.flows
            .as_ref()
            .is_none_or(|pats| pats.iter().any(|p| glob(p, flow)))
    }

    /// The ways `flow` breaks this rule, each naming the flow, the rule and the type.
    pub fn check(&self, flow: &Flow) -> Vec<String> {
        if !self.applies_to(&flow.name) {
            return Vec::new();
        }
        let used: Vec<&str> = flow.policy_types().collect();
        let mut out = Vec::new();
        for t in &self.required {
            if let Some(reasons) = unmet(flow, t) {
                let dir = match guarded_direction(t) {
                    Direction::Request => "request",
                    Direction::Response => "response",
                };
                let mut m = format!(
                    "flow `{}` breaks TemplateRule `{}`: it must contain a step of policy type \
                     `{t}` that runs on every {dir} (no condition, no continueOnError)",
                    flow.name, self.name
                );
                if !reasons.is_empty() {
                    m.push_str("; ");
                    m.push_str(&reasons.join("; "));
                }
                out.push(m);
            }
        }
        for t in &self.denied {
            if used.contains(&t.as_str()) {
                out.push(format!(
                    "flow `{}` breaks TemplateRule `{}`: policy type `{t}` is not allowed",
                    flow.name, self.name
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, SourceFile};

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("llm-*", "llm-chat"));
        assert!(!glob("llm-*", "api"));
        assert!(glob("*-v1", "chat-v1"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("llm", "llm"));
        assert!(!glob("llm", "llm-chat"));
        assert!(glob("a*a", "aa"));
        assert!(!glob("a*a", "a"));
        assert!(glob("*b*b*", "abab"));
        assert!(glob("**", ""));
        assert!(glob("é*é", "éxé"));
        assert!(!glob("ab*ba", "aba"));
    }

    /// Many stars against a long name that almost matches: the old recursive matcher took
    /// exponential time here.
    #[test]
    fn glob_is_linear() {
        let pattern = format!("{}b", "a*".repeat(40));
        let name = "a".repeat(5_000);
        let t = std::time::Instant::now();
        assert!(!glob(&pattern, &name));
        assert!(glob(&pattern, &format!("{name}b")));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
    }

    fn load(extra: &str) -> Result<(), String> {
        let text = format!(
            r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: deny}}
spec: {{type: RaiseFault, status: 403}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: tag}}
spec: {{type: AssignMessage, set: {{headers: {{x-a: b}}}}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: llm-chat}}
spec:
  match: {{pathPrefixes: [/v1]}}
  request: [{{policy: tag}}]
  response: [{{policy: deny, condition: "false"}}]
---
{extra}"#
        );
        compile_text(text)
    }

    /// Compiles one file's text: `Ok` or every error, as text.
    fn compile_text(text: String) -> Result<(), String> {
        compile(
            &[SourceFile {
                name: "r.yaml".into(),
                text,
            }],
            None,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn required_and_denied() {
        let e = load("apiVersion: tollgate.dev/v1alpha1\nkind: TemplateRule\nmetadata: {name: sec}\nspec: {requiredPolicyTypes: [VerifyApiKey]}\n").unwrap_err();
        assert!(
            e.contains("flow `llm-chat` breaks TemplateRule `sec`") && e.contains("`VerifyApiKey`"),
            "{e}"
        );
        let e = load("apiVersion: tollgate.dev/v1alpha1\nkind: TemplateRule\nmetadata: {name: no-faults}\nspec: {deniedPolicyTypes: [RaiseFault]}\n").unwrap_err();
        assert!(
            e.contains("TemplateRule `no-faults`") && e.contains("`RaiseFault` is not allowed"),
            "{e}"
        );
        // Scoped to other flows: fine.
        load("apiVersion: tollgate.dev/v1alpha1\nkind: TemplateRule\nmetadata: {name: s}\nspec: {flows: [api-*], requiredPolicyTypes: [VerifyApiKey]}\n").unwrap();
        load("apiVersion: tollgate.dev/v1alpha1\nkind: TemplateRule\nmetadata: {name: s}\nspec: {requiredPolicyTypes: [AssignMessage]}\n").unwrap();
        let e = load("apiVersion: tollgate.dev/v1alpha1\nkind: TemplateRule\nmetadata: {name: s}\nspec: {requiredPolicyTypes: [Nope]}\n").unwrap_err();
        assert!(e.contains("unknown policy type `Nope`"), "{e}");
    }

    fn with_steps(request: &str, response: &str, required: &str) -> Result<(), String> {
        let text = format!(
            r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: key}}
spec: {{type: VerifyApiKey}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: cache}}
spec: {{type: ResponseCache, scope: app}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: tag}}
spec: {{type: AssignMessage, set: {{headers: {{x-a: b}}}}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: api}}
spec:
  match: {{pathPrefixes: [/v1]}}
  request: {request}
  response: {response}
---
apiVersion: tollgate.dev/v1alpha1
kind: TemplateRule
metadata: {{name: sec}}
spec: {{requiredPolicyTypes: [{required}]}}
"#
        );
        compile_text(text)
    }

    /// A required type is met only by a step that runs on every request in the direction
    /// it guards.
    #[test]
    fn required_steps_must_always_run() {
        with_steps("[{policy: key}]", "[]", "VerifyApiKey").unwrap();
        with_steps("[{policy: tag}, {policy: key}]", "[]", "VerifyApiKey").unwrap();
        // A (per-app) cache before it: hits never reach the upstream.
        with_steps(
            "[{policy: cache}, {policy: key}]",
            "[{policy: cache}]",
            "VerifyApiKey",
        )
        .unwrap();
        // One unconditional step suffices even beside a conditional one.
        with_steps(
            "[{policy: key, condition: 'false'}, {policy: key}]",
            "[]",
            "VerifyApiKey",
        )
        .unwrap();
        for (request, response, why) in [
            (
                "[{policy: key, condition: \"request.headers['x'] == 'y'\"}]",
                "[]",
                "has a condition",
            ),
            (
                "[{policy: key, continueOnError: true}]",
                "[]",
                "has continueOnError",
            ),
            (
                "[]",
                "[{policy: key}]",
                "its response step `key` does not guard the request",
            ),
        ] {
            let e = with_steps(request, response, "VerifyApiKey").unwrap_err();
            assert!(
                e.contains("breaks TemplateRule `sec`")
                    && e.contains("runs on every request")
                    && e.contains(why),
                "{request} / {response}: {e}"
            );
        }
        // AssignMessage only in the response does not meet a request requirement.
        let e = with_steps("[]", "[{policy: tag}]", "AssignMessage").unwrap_err();
        assert!(e.contains("does not guard the request"), "{e}");
    }
}
