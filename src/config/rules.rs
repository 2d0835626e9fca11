//! `TemplateRule`: admin rules on what flows must and must not contain (Apigee's
//! ApimTemplateRule required and deny lists).

use super::spec::TemplateRuleSpec;
use super::Flow;
use crate::policies::ALL_TYPES;

#[derive(Debug)]
pub struct TemplateRule {
    name: String,
    flows: Option<Vec<String>>,
    required: Vec<String>,
    denied: Vec<String>,
}

/// `*` matches any run of characters.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            s.len() >= head.len()
                && s.starts_with(head)
                && (0..=s.len() - head.len())
                    .filter(|i| s.is_char_boundary(head.len() + i))
                    .any(|i| glob(tail, &s[head.len() + i..]))
        }
    }
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
            if !used.contains(&t.as_str()) {
                out.push(format!(
                    "flow `{}` breaks TemplateRule `{}`: it must contain a step of policy type `{t}`",
                    flow.name, self.name
                ));
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
}
