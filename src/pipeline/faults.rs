//! A flow's fault rules: what runs when the flow rejects an exchange, shaping the error
//! response the client gets (Apigee's `<FaultRules>` and `<DefaultFaultRule>` of a
//! ProxyEndpoint).
//!
//! Order, as Apigee runs a ProxyEndpoint's rules: the rules are tried from the last one
//! written to the first, and only the first whose condition holds runs (with several
//! matching rules, the one written last wins); a rule without a condition always holds.
//! Every step of that rule whose own condition holds runs, in order. The default rule runs
//! when no rule ran, or after the rule that ran when it has `alwaysEnforce`, unless a
//! RaiseFault ran in that rule (as in Apigee).
//!
//! The steps run on the error response: before the first step, the fault rendered in the
//! flow's error format is the exchange's response (`response.status.code`,
//! `response.header.*`, `response.content`, and the `error.*` names below); a response
//! step's changes (AssignMessage's `set.headers`, `set.body`, `set.statusCode`) change it.
//! A RaiseFault step replaces it with its own fault, rendered the same way, and the steps
//! after it still run (Apigee does not leave a fault rule at a RaiseFault).
//!
//! A fault inside a fault rule never re-enters the rules. A step that fails (a fault that
//! is not a RaiseFault's, and without `continueOnError`) ends the handling, and the client
//! gets the original fault as if the flow had no rules: fail closed, never an
//! half-shaped answer.
//!
//! Names readable while the rules run (and after, for the after-exchange hooks):
//! `fault.name` (the last segment of the error code, `InvalidApiKey`), `fault.code` (the
//! whole code, `oauth.v2.InvalidApiKey`), `fault.reason` and `error.message` (the
//! message), `fault.policy`, `fault.category` (`Step` for a step's fault, `System` for
//! tollgate's own), `error.status.code`, `error.reason.phrase`, `error.content`,
//! `error.header.<name>` (the error response as the steps left it so far), `is.error`,
//! and the failing step's `<policy>.failed` and `<policytype>.<policy>.failed`.

use std::sync::Arc;

use super::{Direction, Outcome, Step};
use crate::expr::Condition;
use crate::fault::{ErrorFormat, Fault, Rendered};
use crate::vars::{Exchange, Headers, ResponseInfo};

/// One fault rule: a condition and the steps to run when it is the one chosen.
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub name: String,
    pub condition: Option<Arc<Condition>>,
    pub steps: Vec<Step>,
}

/// The default fault rule.
#[derive(Debug, Clone)]
pub struct DefaultFaultRule {
    pub name: String,
    /// Runs even after a fault rule ran (Apigee's `AlwaysEnforce`).
    pub always_enforce: bool,
    pub steps: Vec<Step>,
}

/// A flow's fault handling; a flow without rules has none at all (its rejections take the
/// path they always took).
#[derive(Debug, Clone, Default)]
pub struct FaultRules {
    /// As written; tried from the last.
    pub rules: Vec<FaultRule>,
    pub default: Option<DefaultFaultRule>,
}

impl FaultRules {
    /// The rules as written, for the management API and the admin page.
    pub fn describe(&self) -> serde_json::Value {
        let steps = |steps: &[Step]| -> Vec<serde_json::Value> {
            steps
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "policy": s.policy_name,
                        "type": s.policy.type_name(),
                        "condition": s.condition.as_ref().map(|c| c.source()),
                        "conditionLanguage": s.condition.as_ref().map(|c| c.language()),
                        "continueOnError": s.continue_on_error,
                    })
                })
                .collect()
        };
        serde_json::json!({
            "rules": self.rules.iter().map(|r| serde_json::json!({
                "name": r.name,
                "condition": r.condition.as_ref().map(|c| c.source()),
                "conditionLanguage": r.condition.as_ref().map(|c| c.language()),
                "steps": steps(&r.steps),
            })).collect::<Vec<_>>(),
            "default": self.default.as_ref().map(|d| serde_json::json!({
                "name": d.name,
                "alwaysEnforce": d.always_enforce,
                "steps": steps(&d.steps),
            })),
        })
    }
}

/// What the fault-rule variables read: the fault being handled.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    pub policy: String,
    /// `Step` for a step's fault, `System` for tollgate's own (body too large, ...).
    pub category: &'static str,
}

impl ErrorInfo {
    /// Apigee's `fault.name`: the error code's last segment.
    pub fn name(&self) -> &str {
        self.code.rsplit('.').next().unwrap_or(&self.code)
    }
}

/// The name segment Apigee gives a policy type in `<segment>.<policy>.failed` (and in the
/// other variables the type publishes); for types Apigee lacks, the type in lower case.
pub fn failed_prefix(type_name: &str) -> std::borrow::Cow<'static, str> {
    use std::borrow::Cow;
    Cow::Borrowed(match type_name {
        "VerifyApiKey" => "verifyapikey",
        "Quota" | "SpikeArrest" | "LlmTokenQuota" | "PromptTokenLimit" => "ratelimit",
        "VerifyJwt" => "jwt",
        "JavaScript" => "javascript",
        "AssignMessage" => "assignmessage",
        "RaiseFault" => "raisefault",
        "OasValidation" => "oasvalidation",
        "ResponseCache" => "responsecache",
        "ServiceCallout" => "servicecallout",
        "KeyValueMap" => "keyvaluemap",
        other => return Cow::Owned(other.to_ascii_lowercase()),
    })
}

/// Sets the `failed` variables of `step_name` (of type `type_name`): `<policy>.failed` and
/// Apigee's `<policytype>.<policy>.failed` (VerifyApiKey's also as Apigee's
/// `oauthV2.<policy>.failed`).
pub fn set_failed(ex: &mut Exchange, step_name: &str, type_name: &str) {
    ex.set_var(format!("{step_name}.failed"), true);
    ex.set_var(
        format!("{}.{step_name}.failed", failed_prefix(type_name)),
        true,
    );
    if type_name == "VerifyApiKey" {
        ex.set_var(format!("oauthV2.{step_name}.failed"), true);
    }
}

/// Puts `r` in place of the exchange's response: the message the fault steps shape.
fn install(ex: &mut Exchange, r: Rendered) {
    let mut h = Headers::with_capacity(r.headers.len() + 1);
    h.push(":status".to_owned(), r.status.to_string());
    for (n, v) in r.headers {
        h.push(crate::vars::lower_case(&n).into_owned(), v);
    }
    ex.response = Some(ResponseInfo {
        status: r.status,
        headers: h,
    });
    ex.set_body(Direction::Response, Some(r.body));
    // Changes meant for an upstream response that no longer goes out.
    let _ = ex.take_mutations(Direction::Response);
}

/// The error response as the steps left it.
fn take(ex: &mut Exchange) -> Rendered {
    let _ = ex.take_mutations(Direction::Response);
    let (status, headers) = match ex.response.as_ref() {
        Some(r) => (
            r.status,
            r.headers
                .iter()
                .filter(|(n, _)| !n.starts_with(':'))
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
        ),
        None => (500, Vec::new()),
    };
    let status = if (200..=599).contains(&status) {
        status
    } else {
        500
    };
    Rendered {
        status,
        headers,
        body: ex.take_body(Direction::Response).unwrap_or_default(),
    }
}

/// How a rule's steps ended.
enum RuleEnd {
    Done {
        raised: bool,
    },
    /// A step failed: answer with the original fault.
    Failed,
}

async fn run_rule(steps: &[Step], ex: &mut Exchange, format: ErrorFormat) -> RuleEnd {
    let mut raised = false;
    for step in steps {
        if !step.applies(ex) {
            continue;
        }
        match step.policy.run(ex, Direction::Response).outcome().await {
            Outcome::Continue => {}
            // A served answer (a cache hit) becomes the error response.
            Outcome::Respond(a) => install(
                ex,
                Rendered {
                    status: a.status,
                    headers: a.headers,
                    body: a.body,
                },
            ),
            Outcome::Reject(f) if step.policy.type_name() == crate::policies::raise_fault::TYPE => {
                raised = true;
                install(ex, f.render(format));
            }
            Outcome::Reject(f) => {
                set_failed(ex, &step.policy_name, step.policy.type_name());
                if step.continue_on_error {
                    continue;
                }
                tracing::warn!(policy = %step.policy_name, code = %f.code, "a fault rule's step failed; answering with the original fault");
                return RuleEnd::Failed;
            }
        }
    }
    RuleEnd::Done { raised }
}

/// Runs `rules` for `fault` and returns what the client gets. `step_type` is the type of
/// the step that raised the fault (`None` for tollgate's own faults).
pub async fn handle(
    rules: &FaultRules,
    ex: &mut Exchange,
    fault: &Fault,
    step_type: Option<&'static str>,
    format: ErrorFormat,
) -> Rendered {
    let original = fault.render(format);
    if let Some(t) = step_type {
        set_failed(ex, &fault.policy, t);
    }
    ex.error = Some(Box::new(ErrorInfo {
        code: fault.code.clone(),
        message: fault.message.clone(),
        policy: fault.policy.clone(),
        category: if step_type.is_some() {
            "Step"
        } else {
            "System"
        },
    }));
    install(ex, original.clone());
    let chosen = rules
        .rules
        .iter()
        .rev()
        .find(|r| r.condition.as_ref().is_none_or(|c| c.eval(ex)));
    let mut raised = false;
    if let Some(rule) = chosen {
        tracing::debug!(rule = %rule.name, code = %fault.code, "fault rule");
        match run_rule(&rule.steps, ex, format).await {
            RuleEnd::Done { raised: r } => raised = r,
            RuleEnd::Failed => return original,
        }
    }
    if let Some(d) = &rules.default {
        if !raised && (chosen.is_none() || d.always_enforce) {
            tracing::debug!(rule = %d.name, code = %fault.code, "default fault rule");
            if let RuleEnd::Failed = run_rule(&d.steps, ex, format).await {
                return original;
            }
        }
    }
    take(ex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Hook, Policy};
    use crate::vars::RequestInfo;

    /// Sets a header (and counts its runs in `ran.<name>`), or fails.
    #[derive(Debug)]
    struct Mark {
        header: &'static str,
        fail: bool,
    }

    impl Policy for Mark {
        fn type_name(&self) -> &'static str {
            "Mark"
        }
        fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
            assert_eq!(dir, Direction::Response);
            if self.fail {
                return Hook::Ready(Outcome::Reject(Fault::new(500, "x.Broken", "broken")));
            }
            let seen = ex.lookup("fault.name").unwrap_or_default().into_owned();
            ex.set_header(Direction::Response, self.header, seen);
            Hook::CONTINUE
        }
    }

    fn step(name: &str, p: Arc<dyn Policy>, cond: Option<&str>) -> Step {
        Step {
            policy_name: name.into(),
            policy: p,
            condition: cond.map(|c| Arc::new(Condition::compile_apigee(c).unwrap())),
            continue_on_error: false,
        }
    }

    fn mark(h: &'static str) -> Arc<dyn Policy> {
        Arc::new(Mark {
            header: h,
            fail: false,
        })
    }

    fn raise(status: u16, body: &str) -> Arc<dyn Policy> {
        let y = format!("{{status: {status}, errorCode: custom.Raised, body: '{body}'}}");
        crate::policies::raise_fault::build(
            &crate::policies::BuildContext {
                name: "rf".into(),
                ..Default::default()
            },
            serde_norway::from_str(&y).unwrap(),
        )
        .unwrap()
    }

    fn rule(name: &str, cond: Option<&str>, steps: Vec<Step>) -> FaultRule {
        FaultRule {
            name: name.into(),
            condition: cond.map(|c| Arc::new(Condition::compile_apigee(c).unwrap())),
            steps,
        }
    }

    fn quota_fault() -> Fault {
        let mut f = Fault::new(
            429,
            "policies.ratelimit.QuotaViolation",
            "Rate limit quota violation",
        )
        .with_header("retry-after", "3");
        f.policy = "q".into();
        f
    }

    fn header<'a>(r: &'a Rendered, n: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }

    fn ex() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "GET".into());
        h.push(":path".into(), "/v1/x".into());
        Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_last_matching_rule_runs_alone() {
        let rules = FaultRules {
            rules: vec![
                rule(
                    "first",
                    Some(r#"fault.name = "QuotaViolation""#),
                    vec![step("a", mark("x-first"), None)],
                ),
                rule(
                    "second",
                    Some(r#"fault.name = "QuotaViolation""#),
                    vec![
                        step("b", mark("x-second"), None),
                        step("skipped", mark("x-skipped"), Some(r#"fault.name = "Nope""#)),
                    ],
                ),
                rule(
                    "other",
                    Some(r#"fault.name = "InvalidApiKey""#),
                    vec![step("c", mark("x-other"), None)],
                ),
            ],
            default: Some(DefaultFaultRule {
                name: "default".into(),
                always_enforce: false,
                steps: vec![step("d", mark("x-default"), None)],
            }),
        };
        let mut ex = ex();
        let r = handle(
            &rules,
            &mut ex,
            &quota_fault(),
            Some("Quota"),
            ErrorFormat::Apigee,
        )
        .await;
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "x-second"), Some("QuotaViolation"));
        assert_eq!(header(&r, "x-first"), None, "only the last matching rule");
        assert_eq!(header(&r, "x-skipped"), None);
        assert_eq!(header(&r, "x-default"), None, "a rule ran: no default");
        assert_eq!(header(&r, "retry-after"), Some("3"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body["fault"]["detail"]["errorcode"],
            "policies.ratelimit.QuotaViolation"
        );
        assert_eq!(ex.lookup("q.failed").as_deref(), Some("true"));
        assert_eq!(ex.lookup("ratelimit.q.failed").as_deref(), Some("true"));
        assert_eq!(
            ex.lookup("fault.code").as_deref(),
            Some("policies.ratelimit.QuotaViolation")
        );
        assert_eq!(ex.lookup("error.status.code").as_deref(), Some("429"));
        assert_eq!(ex.lookup("fault.category").as_deref(), Some("Step"));

        // No rule matches: the default rule.
        let mut ex2 = self::ex();
        let mut f = Fault::new(401, "oauth.v2.FailedToResolveAPIKey", "no key");
        f.policy = "vk".into();
        let r = handle(
            &rules,
            &mut ex2,
            &f,
            Some("VerifyApiKey"),
            ErrorFormat::Apigee,
        )
        .await;
        assert_eq!(header(&r, "x-default"), Some("FailedToResolveAPIKey"));
        assert_eq!(ex2.lookup("oauthV2.vk.failed").as_deref(), Some("true"));
        assert_eq!(
            ex2.lookup("verifyapikey.vk.failed").as_deref(),
            Some("true")
        );
    }

    #[tokio::test]
    async fn always_enforce_and_raise_fault() {
        let mut rules = FaultRules {
            rules: vec![rule(
                "quota",
                None,
                vec![
                    step("rf", raise(503, r#"{"busy":true}"#), None),
                    // Steps after a RaiseFault still run, on its response.
                    step("after", mark("x-after"), None),
                ],
            )],
            default: Some(DefaultFaultRule {
                name: "default".into(),
                always_enforce: true,
                steps: vec![step("d", mark("x-default"), None)],
            }),
        };
        let mut ex = ex();
        let r = handle(
            &rules,
            &mut ex,
            &quota_fault(),
            Some("Quota"),
            ErrorFormat::Openai,
        )
        .await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, br#"{"busy":true}"#);
        assert_eq!(header(&r, "x-after"), Some("QuotaViolation"));
        assert_eq!(header(&r, "x-default"), None, "RaiseFault ran: no default");
        assert_eq!(
            header(&r, "retry-after"),
            None,
            "the raised fault's headers"
        );

        // Without RaiseFault, alwaysEnforce runs the default rule after the rule.
        rules.rules[0].steps.remove(0);
        let mut ex = self::ex();
        let r = handle(
            &rules,
            &mut ex,
            &quota_fault(),
            Some("Quota"),
            ErrorFormat::Apigee,
        )
        .await;
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "x-after"), Some("QuotaViolation"));
        assert_eq!(header(&r, "x-default"), Some("QuotaViolation"));
    }

    #[tokio::test]
    async fn a_failing_rule_answers_with_the_original_fault() {
        let broken: Arc<dyn Policy> = Arc::new(Mark {
            header: "x",
            fail: true,
        });
        let mut rules = FaultRules {
            rules: vec![rule(
                "r",
                None,
                vec![
                    step("m", mark("x-m"), None),
                    step("broken", broken.clone(), None),
                ],
            )],
            default: None,
        };
        let mut ex = ex();
        let f = quota_fault();
        let r = handle(&rules, &mut ex, &f, Some("Quota"), ErrorFormat::Apigee).await;
        assert_eq!(r, f.render(ErrorFormat::Apigee));
        assert_eq!(ex.lookup("broken.failed").as_deref(), Some("true"));
        // continueOnError lets the rule go on.
        rules.rules[0].steps[1].continue_on_error = true;
        let mut ex = self::ex();
        let r = handle(&rules, &mut ex, &f, Some("Quota"), ErrorFormat::Apigee).await;
        assert_eq!(header(&r, "x-m"), Some("QuotaViolation"));
    }

    #[test]
    fn failed_prefixes() {
        assert_eq!(failed_prefix("Quota"), "ratelimit");
        assert_eq!(failed_prefix("SpikeArrest"), "ratelimit");
        assert_eq!(failed_prefix("VerifyApiKey"), "verifyapikey");
        assert_eq!(failed_prefix("ExtractVariables"), "extractvariables");
    }
}
