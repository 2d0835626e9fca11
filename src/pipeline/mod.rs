//! The compiled pipeline: a flow's steps split into the phases they run in, and the
//! `Policy` trait every policy type implements.
//!
//! A step runs at the earliest phase that has what it needs. Header-only steps run on the
//! headers message, so a rejected request never uploads its body; once one step needs the
//! body, it and every later step of that direction run on the body (order is preserved).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::expr::Condition;
use crate::fault::Fault;
use crate::vars::Exchange;

/// Which half of the exchange a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// A step's future when the policy has to wait (a store, a callout).
pub type PolicyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Fault>> + Send + 'a>>;

/// What a policy returns: most policies decide at once and allocate nothing.
pub enum Outcome<'a> {
    Ready(Result<(), Fault>),
    Pending(PolicyFuture<'a>),
}

impl From<Result<(), Fault>> for Outcome<'_> {
    fn from(r: Result<(), Fault>) -> Self {
        Outcome::Ready(r)
    }
}

/// One compiled policy instance. Policies know nothing about protobuf: they read and write
/// the [`Exchange`] (variables, headers through its mutation helpers) and may reject with a
/// [`Fault`].
pub trait Policy: Send + Sync + fmt::Debug {
    /// The `spec.type` this policy was built from.
    fn type_name(&self) -> &'static str;

    /// True when the step needs the message body of `dir` to run.
    fn needs_body(&self, _dir: Direction) -> bool {
        false
    }

    /// True when the step may replace the body of `dir` (the stream then drops
    /// `content-length` from headers that leave before the body is decided).
    fn replaces_body(&self, _dir: Direction) -> bool {
        false
    }

    /// Runs the step for `dir`, on headers or (when [`Policy::needs_body`]) on the body.
    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Outcome<'a>;

    /// Gets the whole `dir` body after it passed, when a step asked for a copy through
    /// [`Exchange::response_capture`]. Called on every response step; it can no longer
    /// change or reject the message.
    fn observe(&self, _ex: &mut Exchange, _dir: Direction, _body: &[u8]) {}

    /// The request headers this step sets for the upstream when it runs on the request
    /// (lower case). The flow removes the client's values of every one of them before any
    /// step runs (see [`claim_owned_headers`]), so a client cannot supply one of them in
    /// the step's place when the step is skipped, fails or cannot render a value.
    fn owned_request_headers(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A step of a flow: a policy plus when to run it.
#[derive(Debug, Clone)]
pub struct Step {
    pub policy_name: String,
    pub policy: Arc<dyn Policy>,
    pub condition: Option<Arc<Condition>>,
    pub continue_on_error: bool,
}

/// The steps of one direction, split by phase.
#[derive(Debug, Clone, Default)]
pub struct DirectionPipeline {
    pub on_headers: Vec<Step>,
    pub on_body: Vec<Step>,
    /// A body step may replace the body.
    pub replaces_body: bool,
    /// Request headers some step of this pipeline sets for the upstream (sorted, each
    /// once); empty for the response.
    pub owned: Vec<String>,
}

impl DirectionPipeline {
    /// Splits `steps` (in order) at the first one that needs the body.
    pub fn compile(steps: Vec<Step>, dir: Direction) -> Self {
        let split = steps
            .iter()
            .position(|s| s.policy.needs_body(dir))
            .unwrap_or(steps.len());
        let mut owned: Vec<String> = match dir {
            Direction::Request => steps
                .iter()
                .flat_map(|s| s.policy.owned_request_headers())
                .collect(),
            Direction::Response => Vec::new(),
        };
        owned.sort();
        owned.dedup();
        let mut on_headers = steps;
        let on_body = on_headers.split_off(split);
        let replaces_body = on_body.iter().any(|s| s.policy.replaces_body(dir));
        Self {
            on_headers,
            on_body,
            replaces_body,
            owned,
        }
    }

    pub fn needs_body(&self) -> bool {
        !self.on_body.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.on_headers.is_empty() && self.on_body.is_empty()
    }

    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.on_headers.iter().chain(self.on_body.iter())
    }
}

/// Takes the client's values of the request headers the flow's steps set for the upstream
/// (`request.owned`) out of the request, before any step runs: Envoy is told to remove
/// them, and the exchange's view no longer shows them, so conditions, templates and the
/// upstream only ever see the value a step set. The client's values are kept in
/// [`Exchange::client_owned`] for the policies that read a credential the client sent
/// (VerifyJwt's `Authorization` when a later step sets a Google token there, VerifyApiKey's
/// key header): they read it through [`Exchange::client_header_values`].
pub fn claim_owned_headers(request: &DirectionPipeline, ex: &mut Exchange) {
    for name in &request.owned {
        let sent: Vec<String> = ex
            .request
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_owned())
            .collect();
        if sent.is_empty() {
            continue;
        }
        for v in sent {
            ex.client_owned.push(name.clone(), v);
        }
        ex.remove_header(Direction::Request, name);
    }
}

/// Runs `steps` in order. The first rejection ends the run unless its step has
/// `continueOnError`, in which case `<policy>.failed` is set and the run goes on.
pub async fn run_steps(steps: &[Step], ex: &mut Exchange, dir: Direction) -> Result<(), Fault> {
    for step in steps {
        if let Some(cond) = &step.condition {
            if !cond.eval(ex) {
                continue;
            }
        }
        let result = match step.policy.run(ex, dir) {
            Outcome::Ready(r) => r,
            Outcome::Pending(fut) => fut.await,
        };
        if let Err(mut fault) = result {
            if fault.policy.is_empty() {
                fault.policy.clone_from(&step.policy_name);
            }
            if step.continue_on_error {
                tracing::debug!(policy = %step.policy_name, code = %fault.code, "step failed; continueOnError");
                ex.set_var(format!("{}.failed", step.policy_name), true);
                continue;
            }
            return Err(fault);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake {
        body: bool,
        reject: bool,
    }

    impl Policy for Fake {
        fn type_name(&self) -> &'static str {
            "Fake"
        }
        fn needs_body(&self, _dir: Direction) -> bool {
            self.body
        }
        fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Outcome<'a> {
            let n = ex.vars.len();
            ex.set_var(format!("ran.{n}"), true);
            if self.reject {
                Outcome::Ready(Err(Fault::new(403, "x", "no")))
            } else {
                Outcome::Pending(Box::pin(async { Ok(()) }))
            }
        }
    }

    fn step(name: &str, body: bool, reject: bool, cond: Option<&str>, coe: bool) -> Step {
        Step {
            policy_name: name.into(),
            policy: Arc::new(Fake { body, reject }),
            condition: cond.map(|c| Arc::new(Condition::compile(c).unwrap())),
            continue_on_error: coe,
        }
    }

    #[test]
    fn split_keeps_order_after_first_body_step() {
        let p = DirectionPipeline::compile(
            vec![
                step("a", false, false, None, false),
                step("b", true, false, None, false),
                step("c", false, false, None, false),
            ],
            Direction::Request,
        );
        let names: Vec<_> = p
            .on_headers
            .iter()
            .map(|s| s.policy_name.as_str())
            .collect();
        assert_eq!(names, ["a"]);
        let names: Vec<_> = p.on_body.iter().map(|s| s.policy_name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert!(p.needs_body());
    }

    #[tokio::test]
    async fn conditions_rejections_and_continue_on_error() {
        let mut ex = Exchange::default();
        let steps = vec![
            step("skipped", false, true, Some("1 == 2"), false),
            step("soft", false, true, None, true),
            step("ok", false, false, None, false),
            step("hard", false, true, None, false),
            step("never", false, false, None, false),
        ];
        let fault = run_steps(&steps, &mut ex, Direction::Request)
            .await
            .unwrap_err();
        assert_eq!(fault.policy, "hard");
        assert_eq!(ex.lookup("soft.failed").as_deref(), Some("true"));
        // soft.failed, ran.0, ran.2 (ok), ran.3 (hard): "never" did not run.
        assert_eq!(ex.vars.len(), 4);
    }
}
