//! The compiled pipeline: a flow's steps split into the phases they run in, and the
//! `Policy` trait every policy type implements.
//!
//! A step runs at the earliest phase that has what it needs. Header-only steps run on the
//! headers message, so a rejected request never uploads its body; once one step needs the
//! body, it and every later step of that direction run on the body (order is preserved).
//!
//! Phases, in the order Envoy sends them, and the [`Policy`] hook each calls:
//!
//! | phase | hook | runs for |
//! |---|---|---|
//! | request headers | [`Policy::request_headers`] | request steps before the first body step |
//! | request body | [`Policy::request_body`] (body steps), [`Policy::request_headers`] (later header-only steps) | the rest, on the whole body |
//! | response headers | [`Policy::response_headers`] | response steps before the first body step |
//! | response chunk | [`Policy::response_chunk`] | steps that declared [`Hooks::response_chunks`], each chunk as it passes |
//! | response end | [`Policy::response_end`] (body steps, body held), [`Policy::response_headers`] (later header-only steps) | the rest, on the whole body; and, after the body passed, steps that declared [`Hooks::response_copy`] on the copy some step asked for |
//! | after the exchange | [`Policy::after_exchange`] | steps that declared [`Hooks::after_exchange`], once, however the exchange ended |

pub mod chunk;
pub mod faults;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::expr::Condition;
use crate::fault::Fault;
use crate::vars::Exchange;

pub use crate::direction::Direction;
pub use chunk::{Chunk, ChunkAction, ChunkSpec};

/// A served answer: a step answers the client in place of the upstream (a cache hit). Not
/// a fault: never counted as a rejection, never swallowed by `continueOnError`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// Short code for logs and Envoy's response-code details, e.g. `responsecache.Hit`.
    pub code: String,
    /// Headers for the client, `content-type` among them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// An answer with `content_type` (replacing any `content-type` in `headers`).
    pub fn new(
        status: u16,
        code: impl Into<String>,
        mut headers: Vec<(String, String)>,
        content_type: String,
        body: Vec<u8>,
    ) -> Self {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        headers.push(("content-type".to_owned(), content_type));
        Self {
            status,
            code: code.into(),
            headers,
            body,
        }
    }
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Go on with the next step.
    Continue,
    /// Answer the client with this instead of going on (no later request step runs; the
    /// response steps that declared [`Hooks::on_answers`] run on it).
    Respond(Box<Answer>),
    /// Stop the exchange with this fault (unless the step has `continueOnError`).
    Reject(Fault),
}

impl Outcome {
    /// The outcome as a `Result`: `Ok(None)` to go on, `Ok(Some(answer))` for a served
    /// answer, `Err` for a rejection.
    pub fn into_result(self) -> Result<Option<Box<Answer>>, Fault> {
        match self {
            Outcome::Continue => Ok(None),
            Outcome::Respond(a) => Ok(Some(a)),
            Outcome::Reject(f) => Err(f),
        }
    }

    pub fn is_continue(&self) -> bool {
        matches!(self, Outcome::Continue)
    }
}

impl From<Result<(), Fault>> for Outcome {
    fn from(r: Result<(), Fault>) -> Self {
        match r {
            Ok(()) => Outcome::Continue,
            Err(f) => Outcome::Reject(f),
        }
    }
}

/// A hook's future when the policy has to wait (a store, a callout).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// What a hook returns: most policies decide at once and allocate nothing.
pub enum Hook<'a> {
    Ready(Outcome),
    Pending(HookFuture<'a>),
}

impl<'a> Hook<'a> {
    pub const CONTINUE: Hook<'static> = Hook::Ready(Outcome::Continue);

    /// Waits for `fut`: `Ok` goes on, `Err` rejects.
    pub fn wait(fut: impl Future<Output = Result<(), Fault>> + Send + 'a) -> Self {
        Hook::Pending(Box::pin(async move { fut.await.into() }))
    }

    /// Waits for the outcome.
    pub async fn outcome(self) -> Outcome {
        match self {
            Hook::Ready(o) => o,
            Hook::Pending(f) => f.await,
        }
    }
}

impl From<Result<(), Fault>> for Hook<'_> {
    fn from(r: Result<(), Fault>) -> Self {
        Hook::Ready(r.into())
    }
}

impl From<Outcome> for Hook<'_> {
    fn from(o: Outcome) -> Self {
        Hook::Ready(o)
    }
}

/// How an exchange ended, for [`Policy::after_exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeEnd {
    /// The response went through to its end.
    Completed,
    /// tollgate answered in place of the upstream: a rejection or a served answer.
    Answered,
    /// The stream went away before the response ended (client abort, upstream reset, Envoy
    /// gone).
    Aborted,
    /// The stream ended with an error (a protocol violation or a broken message).
    Failed,
}

/// The work of an after-exchange hook: owns what it needs (clone the `Arc`s of stores).
pub type AfterFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The hooks a step uses besides the headers and body ones, declared once when the flow
/// compiles, so a flow pays only for what its steps use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    /// [`Policy::response_chunk`] runs on every response chunk as it passes.
    pub response_chunks: Option<ChunkSpec>,
    /// [`Policy::response_end`] runs on a copy of the response after it passed, when a step
    /// asked for the copy through [`Exchange::response_capture`] (a cache populating
    /// itself without holding the body back).
    pub response_copy: bool,
    /// [`Policy::after_exchange`] runs once the exchange is over.
    pub after_exchange: bool,
    /// The response hooks also run on an answer a request step served
    /// ([`Outcome::Respond`]): its status, headers and body are the response.
    pub on_answers: bool,
    /// The step reads the exchange's LLM view: the flow then holds the request body,
    /// parses it once into `ex.state.llm` and counts its prompt tokens into
    /// `ex.state.llm_prompt_tokens` before the step's request hook runs, and feeds every
    /// response chunk to one accumulator whose final usage is in `ex.state.llm_usage`
    /// before any response-end or after-exchange hook runs (issue 14).
    pub llm: bool,
    /// A response body step that guards a server-sent event stream in its chunk hook
    /// ([`Hooks::response_chunks`]): for such a stream it needs no held body, and its body
    /// hook runs on the response headers (with no body). When every response body step
    /// says so, an event stream flows on as it is read instead of being held whole.
    pub streams_in_chunks: bool,
}

/// One compiled policy instance. Policies know nothing about protobuf: they read and write
/// the [`Exchange`] (variables, headers through its mutation helpers) and decide with an
/// [`Outcome`]. Every hook has a default that does nothing.
pub trait Policy: Send + Sync + fmt::Debug {
    /// The `spec.type` this policy was built from.
    fn type_name(&self) -> &'static str;

    /// True when the step needs the whole message body of `dir` to run: its body hook
    /// ([`Policy::request_body`] / [`Policy::response_end`]) then runs on the held body in
    /// place of its headers hook, and every later step of `dir` runs at that phase too.
    fn needs_body(&self, _dir: Direction) -> bool {
        false
    }

    /// True when the step may replace the body of `dir` (the stream then drops
    /// `content-length` from headers that leave before the body is decided).
    fn replaces_body(&self, _dir: Direction) -> bool {
        false
    }

    /// The hooks beyond headers and body this step uses.
    fn hooks(&self) -> Hooks {
        Hooks::default()
    }

    /// What the step does that only a fault rule's step may do (shaping the error
    /// response, e.g. setting its status), to refuse it in a flow's request or response.
    fn fault_rule_only(&self) -> Option<&'static str> {
        None
    }

    /// The request headers this step sets for the upstream when it runs on the request
    /// (lower case). The flow removes the client's values of every one of them before any
    /// step runs (see [`claim_owned_headers`]), so a client cannot supply one of them in
    /// the step's place when the step is skipped, fails or cannot render a value.
    fn owned_request_headers(&self) -> Vec<String> {
        Vec::new()
    }

    /// Request headers are known (the step does not need the request body).
    fn request_headers<'a>(&'a self, _ex: &'a mut Exchange) -> Hook<'a> {
        Hook::CONTINUE
    }

    /// The whole request body is in `ex.request_body` (the step needs it); it may replace
    /// it with [`Exchange::replace_body`].
    fn request_body<'a>(&'a self, _ex: &'a mut Exchange) -> Hook<'a> {
        Hook::CONTINUE
    }

    /// Response headers are known (the step does not need the response body).
    fn response_headers<'a>(&'a self, _ex: &'a mut Exchange) -> Hook<'a> {
        Hook::CONTINUE
    }

    /// One response chunk as it passes (declared with [`Hooks::response_chunks`]). It may
    /// rewrite `chunk.data`, hold back a tail of at most the declared bytes, or end the
    /// stream with `chunk.data` as the final chunk. Synchronous: it must not wait.
    fn response_chunk(&self, _ex: &mut Exchange, _chunk: &mut Chunk) -> ChunkAction {
        ChunkAction::Pass
    }

    /// The whole response is in `ex.response_body`. For a step that needs the response
    /// body, the body is held and the step may reject or replace it. For a step that
    /// declared [`Hooks::response_copy`], it runs after the body passed, on the copy: it
    /// can no longer change the response (a rejection is logged and dropped).
    fn response_end<'a>(&'a self, _ex: &'a mut Exchange) -> Hook<'a> {
        Hook::CONTINUE
    }

    /// The exchange is over and `ex.state.llm_usage` is settled (declared with
    /// [`Hooks::after_exchange`]): a last synchronous look, with the exchange writable,
    /// before usage reports, analytics and the after-exchange hooks read it (a budget
    /// prices the usage into `llm.cost` here). Called once per exchange; must not wait.
    fn exchange_end(&self, _ex: &mut Exchange, _end: ExchangeEnd) {}

    /// The exchange is over (declared with [`Hooks::after_exchange`]): called once per
    /// exchange, whatever ended it, after the client's answer left. The returned future is
    /// spawned: it may use the stores, and never delays the client.
    fn after_exchange(&self, _ex: &Exchange, _end: ExchangeEnd) -> Option<AfterFuture> {
        None
    }

    /// What the pipeline calls for `dir` where the flow placed the step: by default the
    /// body hook when it needs the body, else the headers hook. A policy whose decision is
    /// the same in every phase may override this instead of the four hooks (the policy
    /// types written before the phase hooks do).
    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        match (dir, self.needs_body(dir)) {
            (Direction::Request, false) => self.request_headers(ex),
            (Direction::Request, true) => self.request_body(ex),
            (Direction::Response, false) => self.response_headers(ex),
            (Direction::Response, true) => self.response_end(ex),
        }
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

impl Step {
    /// The step's condition holds (or it has none).
    pub fn applies(&self, ex: &Exchange) -> bool {
        self.condition.as_ref().is_none_or(|c| c.eval(ex))
    }
}

/// The steps of one direction, split by phase.
#[derive(Debug, Clone, Default)]
pub struct DirectionPipeline {
    pub on_headers: Vec<Step>,
    pub on_body: Vec<Step>,
    /// A body step may replace the body.
    pub replaces_body: bool,
    /// Every body step that needs the body guards an event stream in its chunk hook
    /// ([`Hooks::streams_in_chunks`]): such a response is not held.
    pub streams_in_chunks: bool,
    /// Request headers some step of this pipeline sets for the upstream (sorted, each
    /// once); empty for the response.
    pub owned: Vec<String>,
    /// Response steps with a chunk hook, in order, with what each declared.
    pub chunk_steps: Vec<(Step, ChunkSpec)>,
    /// Response steps that see a copy of the response after it passed.
    pub copy_steps: Vec<Step>,
    /// Response steps that also run on a served answer.
    pub answer_steps: Vec<Step>,
    /// Policies with an after-exchange hook, each once, in step order.
    pub after: Vec<Arc<dyn Policy>>,
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
        let mut chunk_steps = Vec::new();
        let mut copy_steps = Vec::new();
        let mut answer_steps = Vec::new();
        let mut after: Vec<Arc<dyn Policy>> = Vec::new();
        for s in &steps {
            let hooks = s.policy.hooks();
            if dir == Direction::Response {
                if let Some(spec) = hooks.response_chunks {
                    chunk_steps.push((s.clone(), spec));
                }
                if hooks.response_copy {
                    copy_steps.push(s.clone());
                }
                if hooks.on_answers {
                    answer_steps.push(s.clone());
                }
            }
            if hooks.after_exchange && !after.iter().any(|p| Arc::ptr_eq(p, &s.policy)) {
                after.push(s.policy.clone());
            }
        }
        let mut on_headers = steps;
        let on_body = on_headers.split_off(split);
        let replaces_body = on_body.iter().any(|s| s.policy.replaces_body(dir));
        let streams_in_chunks = dir == Direction::Response
            && !on_body.is_empty()
            && on_body.iter().all(|s| {
                let h = s.policy.hooks();
                !s.policy.needs_body(dir) || (h.streams_in_chunks && h.response_chunks.is_some())
            });
        Self {
            on_headers,
            on_body,
            replaces_body,
            streams_in_chunks,
            owned,
            chunk_steps,
            copy_steps,
            answer_steps,
            after,
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

/// Runs `steps` in order, each with the hook of its placement ([`Policy::run`]). A served
/// answer ends the run. A rejection ends it too unless its step has `continueOnError`, in
/// which case `<policy>.failed` is set and the run goes on.
pub async fn run_steps(steps: &[Step], ex: &mut Exchange, dir: Direction) -> Outcome {
    for step in steps {
        if !step.applies(ex) {
            continue;
        }
        let trace = ex.trace.handle();
        let outcome = match step.policy.run(ex, dir) {
            Hook::Ready(o) => o,
            Hook::Pending(fut) => match trace {
                None => fut.await,
                // A step that waits (a store, a callout) gets its own span.
                Some(t) => {
                    let span = t.step(&step.policy_name, step.policy.type_name());
                    let o = fut.await;
                    span.end(match &o {
                        Outcome::Reject(f) => Some(f.code.as_str()),
                        _ => None,
                    });
                    o
                }
            },
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::Respond(mut answer) => {
                if answer.code.is_empty() {
                    answer.code.clone_from(&step.policy_name);
                }
                return Outcome::Respond(answer);
            }
            Outcome::Reject(mut fault) => {
                if fault.policy.is_empty() {
                    fault.policy.clone_from(&step.policy_name);
                }
                if step.continue_on_error {
                    tracing::debug!(policy = %step.policy_name, code = %fault.code, "step failed; continueOnError");
                    faults::set_failed(ex, &step.policy_name, step.policy.type_name());
                    continue;
                }
                return Outcome::Reject(fault);
            }
        }
    }
    Outcome::Continue
}

/// Runs the response-end hook of the steps that see a copy of the response after it passed
/// (`body` is the copy). Their outcome can no longer change the response.
pub async fn run_copy_steps(steps: &[Step], ex: &mut Exchange, body: Vec<u8>) {
    ex.set_body(Direction::Response, Some(body));
    for step in steps {
        if !step.applies(ex) {
            continue;
        }
        let outcome = step.policy.response_end(ex).outcome().await;
        if !outcome.is_continue() {
            tracing::debug!(policy = %step.policy_name, ?outcome, "a response-end step decided after the response passed; dropped");
        }
    }
    ex.set_body(Direction::Response, None);
}

/// Runs the response steps that apply to a served answer on it: `ex.response` and
/// `ex.response_body` hold the answer; each step runs its response-headers hook, or its
/// response-end hook when it needs the body. Returns the answer as the steps left it, or
/// their rejection.
pub async fn run_answer_steps(steps: &[Step], ex: &mut Exchange, answer: Box<Answer>) -> Outcome {
    let Answer {
        status,
        code,
        headers,
        body,
    } = *answer;
    let mut h = crate::vars::Headers::new();
    h.push(":status".to_owned(), status.to_string());
    for (n, v) in headers {
        h.push(n, v);
    }
    ex.response = Some(crate::vars::ResponseInfo { status, headers: h });
    ex.set_body(Direction::Response, Some(body));
    let outcome = run_steps(steps, ex, Direction::Response).await;
    if !outcome.is_continue() {
        return outcome;
    }
    // The steps changed the answer's headers through the exchange: its view is the result.
    let _ = ex.take_mutations(Direction::Response);
    let headers = ex
        .response
        .as_ref()
        .map(|r| {
            r.headers
                .iter()
                .filter(|(n, _)| !n.starts_with(':'))
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    // A step may have set the status (a script's `response.status.code`).
    let status = ex.response.as_ref().map_or(status, |r| r.status);
    Outcome::Respond(Box::new(Answer {
        status,
        code,
        headers,
        body: ex.take_body(Direction::Response).unwrap_or_default(),
    }))
}

/// Starts the after-exchange hooks of `policies` for `ex`, ended by `end`: the hooks build
/// their futures now, and one task runs them in order, off the stream's path.
pub fn spawn_after_exchange<'p>(
    policies: impl Iterator<Item = &'p Arc<dyn Policy>>,
    ex: &Exchange,
    end: ExchangeEnd,
) {
    let futures: Vec<AfterFuture> = policies.filter_map(|p| p.after_exchange(ex, end)).collect();
    if futures.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(async move {
                for f in futures {
                    f.await;
                }
            });
        }
        Err(_) => tracing::warn!("no runtime to run after-exchange hooks on; skipped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake {
        body: bool,
        reject: bool,
        respond: bool,
    }

    impl Fake {
        fn decide(&self, ex: &mut Exchange) -> Hook<'_> {
            let n = ex.vars.len();
            ex.set_var(format!("ran.{n}"), true);
            if self.respond {
                Hook::Ready(Outcome::Respond(Box::new(Answer::new(
                    200,
                    "",
                    vec![("x-a".into(), "1".into())],
                    "text/plain".into(),
                    b"hi".to_vec(),
                ))))
            } else if self.reject {
                Hook::Ready(Outcome::Reject(Fault::new(403, "x", "no")))
            } else {
                Hook::Pending(Box::pin(async { Outcome::Continue }))
            }
        }
    }

    impl Policy for Fake {
        fn type_name(&self) -> &'static str {
            "Fake"
        }
        fn needs_body(&self, _dir: Direction) -> bool {
            self.body
        }
        fn hooks(&self) -> Hooks {
            Hooks {
                after_exchange: true,
                on_answers: self.body,
                ..Hooks::default()
            }
        }
        fn request_headers<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
            assert!(!self.body, "a body step runs its body hook");
            self.decide(ex)
        }
        fn request_body<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
            assert!(self.body);
            self.decide(ex)
        }
        fn response_end<'a>(&'a self, ex: &'a mut Exchange) -> Hook<'a> {
            ex.set_header(Direction::Response, "x-seen", "yes".into());
            if let Some(b) = ex.response_body.as_mut() {
                b.extend_from_slice(b"!");
            }
            Hook::CONTINUE
        }
    }

    fn fake(body: bool, reject: bool, respond: bool) -> Arc<dyn Policy> {
        Arc::new(Fake {
            body,
            reject,
            respond,
        })
    }

    fn step(name: &str, policy: Arc<dyn Policy>, cond: Option<&str>, coe: bool) -> Step {
        Step {
            policy_name: name.into(),
            policy,
            condition: cond.map(|c| Arc::new(Condition::compile(c).unwrap())),
            continue_on_error: coe,
        }
    }

    #[test]
    fn split_keeps_order_after_first_body_step() {
        let shared = fake(false, false, false);
        let p = DirectionPipeline::compile(
            vec![
                step("a", shared.clone(), None, false),
                step("b", fake(true, false, false), None, false),
                step("c", fake(false, false, false), None, false),
                step("a-again", shared, None, false),
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
        assert_eq!(names, ["b", "c", "a-again"]);
        assert!(p.needs_body());
        // One after-exchange hook per policy, however many steps use it.
        assert_eq!(p.after.len(), 3);
        assert!(p.chunk_steps.is_empty() && p.answer_steps.is_empty());
    }

    #[tokio::test]
    async fn conditions_rejections_and_continue_on_error() {
        let mut ex = Exchange::default();
        let steps = vec![
            step("skipped", fake(false, true, false), Some("1 == 2"), false),
            step("soft", fake(false, true, false), None, true),
            step("ok", fake(false, false, false), None, false),
            step("hard", fake(false, true, false), None, false),
            step("never", fake(false, false, false), None, false),
        ];
        let Outcome::Reject(fault) = run_steps(&steps, &mut ex, Direction::Request).await else {
            panic!("rejected")
        };
        assert_eq!(fault.policy, "hard");
        assert_eq!(ex.lookup("soft.failed").as_deref(), Some("true"));
        assert_eq!(ex.lookup("fake.soft.failed").as_deref(), Some("true"));
        // soft.failed, fake.soft.failed, ran.0, ran.3 (ok), ran.4 (hard): "never" did
        // not run.
        assert_eq!(ex.vars.len(), 5);
    }

    #[tokio::test]
    async fn a_served_answer_is_never_swallowed_by_continue_on_error() {
        let mut ex = Exchange::default();
        let steps = vec![
            step("hit", fake(false, false, true), None, true),
            step("never", fake(false, false, false), None, false),
        ];
        let Outcome::Respond(a) = run_steps(&steps, &mut ex, Direction::Request).await else {
            panic!("answered")
        };
        assert_eq!(
            (a.status, a.code.as_str(), a.body.as_slice()),
            (200, "hit", &b"hi"[..])
        );
        assert!(a
            .headers
            .contains(&("content-type".into(), "text/plain".into())));
        assert!(ex.lookup("hit.failed").is_none());
        assert_eq!(ex.vars.len(), 1, "the later step did not run");
    }

    #[tokio::test]
    async fn response_steps_that_apply_to_answers_run_on_them() {
        let resp = DirectionPipeline::compile(
            vec![
                step("plain", fake(false, false, false), None, false),
                step("on-answers", fake(true, false, false), None, false),
            ],
            Direction::Response,
        );
        assert_eq!(resp.answer_steps.len(), 1);
        let mut ex = Exchange::default();
        let answer = Box::new(Answer::new(
            200,
            "hit",
            vec![],
            "text/plain".into(),
            b"hi".to_vec(),
        ));
        let Outcome::Respond(a) = run_answer_steps(&resp.answer_steps, &mut ex, answer).await
        else {
            panic!("still an answer")
        };
        assert_eq!(a.body, b"hi!");
        assert!(a.headers.contains(&("x-seen".into(), "yes".into())));
        assert!(a
            .headers
            .contains(&("content-type".into(), "text/plain".into())));
        assert_eq!(a.code, "hit");
    }

    #[test]
    fn results_convert_to_outcomes() {
        assert!(Outcome::from(Ok(())).is_continue());
        let o: Outcome = Err(Fault::new(400, "x", "y")).into();
        assert!(matches!(o.into_result(), Err(f) if f.status == 400));
    }
}
