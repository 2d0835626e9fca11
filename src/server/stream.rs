//! One ext_proc stream: the state machine that turns Envoy's messages into pipeline phases
//! and the pipeline's decisions into answers.
//!
//! Rules it keeps (Envoy 1.40):
//! - outside FULL_DUPLEX_STREAMED every message gets exactly one answer of its kind;
//! - in FULL_DUPLEX_STREAMED body chunks are answered with `StreamedBodyResponse`s, passed
//!   on as they come unless the flow's body steps need the whole body first;
//! - a flow that needs a body Envoy is not sending asks for it with `mode_override`;
//!   a body the flow does not need is answered at once;
//! - after an immediate response, further messages are ignored (Envoy may have sent them
//!   before it saw the answer).

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    processing_mode::BodySendMode, ProcessingMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request, HttpBody, HttpHeaders, HttpTrailers,
    ProcessingRequest, ProcessingResponse,
};
use tonic::Status;

use super::proto;
use super::{NoMatch, Shared};
use crate::config::{Flow, Snapshot};
use crate::fault::{ErrorFormat, Fault, Rendered};
use crate::pipeline::chunk::ChunkRunner;
use crate::pipeline::{run_steps, Answer, Direction, ExchangeEnd, Outcome};
use crate::telemetry::{METRICS, PHASES};
use crate::vars::{Exchange, HeaderMutations, RequestInfo, ResponseInfo};

const NONE: i32 = BodySendMode::None as i32;
const STREAMED: i32 = BodySendMode::Streamed as i32;
const BUFFERED: i32 = BodySendMode::Buffered as i32;
const BUFFERED_PARTIAL: i32 = BodySendMode::BufferedPartial as i32;
const FULL_DUPLEX: i32 = BodySendMode::FullDuplexStreamed as i32;

#[derive(Debug, Default)]
struct Side {
    headers_seen: bool,
    headers_eos: bool,
    body_seen: bool,
    /// The body (or trailers) ended.
    body_done: bool,
    trailers_seen: bool,
    /// The flow's body steps for this side ran.
    steps_ran: bool,
    /// Body collected for the body steps.
    buf: Vec<u8>,
    /// Body send mode in force for this side.
    mode: i32,
    /// Copy of the response body as it passes (see `Exchange::response_capture`).
    capture: Vec<u8>,
    /// `content-length` was removed on the headers answer (the body may change length
    /// after the headers left).
    length_removed: bool,
    /// FULL_DUPLEX_STREAMED request whose body steps decide: the headers answer waits for
    /// them (as body-based routing does), so their header changes reach the upstream and
    /// the filters after tollgate (the endpoint picker) instead of being dropped.
    headers_held: bool,
    /// Body bytes tollgate saw for this side (analytics, when no `content-length`).
    body_bytes: u64,
}

/// Per-stream state.
pub struct StreamState {
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    flow: Option<Arc<Flow>>,
    /// Boxed: keeps the stream's state, and the futures holding it, small enough for the
    /// allocator's fast path.
    ex: Box<Exchange>,
    started: bool,
    modes_known: bool,
    observability: bool,
    req: Side,
    resp: Side,
    /// An immediate response was sent: the exchange is over for tollgate.
    answered: bool,
    /// The response ended: any further message breaks the protocol.
    complete: bool,
    rejected: bool,
    /// The gateway sends bodies without waiting for the headers answer: it ignores
    /// `mode_override`.
    no_override: bool,
    /// A `mode_override` asked for the request body.
    request_override_sent: bool,
    /// Body bytes this stream took from the process-wide budget.
    budget_taken: usize,
    /// The response's chunk steps, when the flow has any.
    chunks: Option<Box<ChunkRunner>>,
    /// The stream ended with an error status.
    failed: bool,
    /// When the stream opened, for the exchange's latency and time in analytics.
    opened: Instant,
    opened_at: std::time::SystemTime,
    /// The answer tollgate gave in place of the upstream: status, deciding policy, code.
    decided: Option<(u16, String, String)>,
}

fn protocol_error(kind: &str) {
    debug_assert!(
        crate::telemetry::PROTOCOL_ERROR_KINDS.contains(&kind),
        "{kind}"
    );
    METRICS
        .protocol_errors_total
        .with_label_values(&[kind])
        .inc();
}

impl StreamState {
    pub fn new(shared: Arc<Shared>) -> Self {
        let snap = shared.config.snapshot();
        METRICS.streams_total.inc();
        METRICS.streams_active.inc();
        Self {
            shared,
            snap,
            flow: None,
            ex: Box::default(),
            started: false,
            modes_known: false,
            observability: false,
            req: Side::default(),
            resp: Side::default(),
            answered: false,
            complete: false,
            rejected: false,
            no_override: false,
            request_override_sent: false,
            budget_taken: 0,
            chunks: None,
            failed: false,
            opened: Instant::now(),
            opened_at: std::time::SystemTime::now(),
            decided: None,
        }
    }

    /// The stream is ending with an error status (for the after-exchange hooks).
    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// Ends the exchange for a step's outcome other than `Continue`: a rejection, or an
    /// answer served in place of the upstream (`dir` says which side served it).
    async fn stop(&mut self, outcome: Outcome, dir: Direction, out: &mut Vec<ProcessingResponse>) {
        match outcome {
            Outcome::Continue => {}
            Outcome::Reject(f) => self.reject(f, out).await,
            Outcome::Respond(a) => self.respond(a, dir, out).await,
        }
    }

    /// Serves `answer` as an immediate response: not a rejection. A request step's answer
    /// first goes through the response steps that apply to answers.
    async fn respond(
        &mut self,
        mut answer: Box<Answer>,
        dir: Direction,
        out: &mut Vec<ProcessingResponse>,
    ) {
        // The exchange's usage is known before any response hook runs on the answer.
        crate::llm::track::finish(&mut self.ex, ExchangeEnd::Answered);
        if let (Direction::Request, Some(flow)) = (dir, self.flow.clone()) {
            // A step asked for the whole response flow on its answer (Apigee's ResponseCache
            // hit): every response step runs on it, in order; a rejection still rejects.
            let all: Vec<crate::pipeline::Step>;
            let steps = if self.ex.state.response_steps_on_answer {
                all = flow.response.steps().cloned().collect();
                &all
            } else {
                &flow.response.answer_steps
            };
            if !steps.is_empty() {
                // Boxed: keeps the common path's futures small.
                let run = crate::pipeline::run_answer_steps(steps, &mut self.ex, answer);
                match Box::pin(run).await {
                    Outcome::Respond(a) => answer = a,
                    Outcome::Reject(f) => return self.reject(f, out).await,
                    Outcome::Continue => return,
                }
            }
        }
        tracing::debug!(code = %answer.code, status = answer.status, "answered");
        let Answer {
            status,
            code,
            headers,
            body,
        } = *answer;
        let status = if (200..=599).contains(&status) {
            status
        } else {
            500
        };
        self.ex.trace.answered(status, &code);
        self.decided = Some((status, String::new(), code.clone()));
        out.push(proto::immediate(
            Rendered {
                status,
                headers,
                body,
            },
            &code,
        ));
        self.answered = true;
    }

    /// The flow's error format; `auto` resolved from the request's LLM API.
    fn error_format(&self) -> ErrorFormat {
        let r = &self.ex.request;
        self.flow
            .as_ref()
            .map(|f| f.error_format)
            .unwrap_or_default()
            .resolve(&r.method, &r.uri, |n| r.headers.get(n))
    }

    /// Ends the exchange with an immediate response for `fault`: the flow's fault rules
    /// shape it when it has any (see `pipeline::faults`).
    async fn reject(&mut self, fault: Fault, out: &mut Vec<ProcessingResponse>) {
        let Some(rules) = self.flow.as_ref().and_then(|f| f.faults.clone()) else {
            let rendered = fault.render(self.error_format());
            return self.reject_with(fault, rendered, out);
        };
        // The type of the step that raised it; none for tollgate's own faults.
        let step_type = self.flow.as_ref().and_then(|f| {
            f.request
                .steps()
                .chain(f.response.steps())
                .find(|s| s.policy_name == fault.policy)
                .map(|s| s.policy.type_name())
        });
        let format = self.error_format();
        let run = crate::pipeline::faults::handle(&rules, &mut self.ex, &fault, step_type, format);
        // Boxed: keeps the futures of flows without rules small.
        let rendered = Box::pin(run).await;
        self.reject_with(fault, rendered, out);
    }

    /// Answers with `rendered`, the client's form of `fault`.
    fn reject_with(
        &mut self,
        mut fault: Fault,
        rendered: Rendered,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let flow = self.flow.as_ref().map_or("", |f| f.name.as_str());
        if fault.policy.is_empty() {
            fault.policy = "tollgate".to_owned();
        }
        METRICS
            .rejections_total
            .with_label_values(&[flow, &fault.policy, &fault.code])
            .inc();
        if let Some(f) = &self.flow {
            f.metrics.rejected.inc();
        }
        tracing::debug!(flow, policy = %fault.policy, code = %fault.code, status = fault.status, "rejected");
        self.ex
            .trace
            .rejected(fault.status, &fault.policy, &fault.code);
        self.decided = Some((rendered.status, fault.policy.clone(), fault.code.clone()));
        out.push(proto::immediate(rendered, &fault.code));
        self.answered = true;
        self.rejected = true;
    }

    /// Handles one message, pushing zero or more answers. An `Err` ends the stream with
    /// that gRPC status.
    pub async fn on_message(
        &mut self,
        msg: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), Status> {
        if !self.started {
            self.started = true;
            self.observability = msg.observability_mode;
            if let Some(pc) = &msg.protocol_config {
                self.modes_known = true;
                self.req.mode = pc.request_body_mode;
                self.resp.mode = pc.response_body_mode;
                self.no_override = pc.send_body_without_waiting_for_header_response;
            }
            if msg.request.is_none()
                && msg.client_window_update.is_none()
                && msg.flow_control_init.is_none()
            {
                // Envoy's first message always carries the request headers.
                protocol_error("empty_first_message");
                return Err(Status::invalid_argument(
                    "first ext_proc message carries no request",
                ));
            }
        }
        if !msg.attributes.is_empty() {
            proto::attributes_into(&msg.attributes, &mut self.ex.attributes);
        }
        let Some(request) = msg.request else {
            // Flow-control updates carry no request; anything else empty is a broken client.
            // Neither expects an answer.
            if msg.client_window_update.is_none() && msg.flow_control_init.is_none() {
                protocol_error("empty_message");
                tracing::debug!("ext_proc message without a request; ignored");
            }
            return Ok(());
        };
        if self.answered {
            return Ok(());
        }
        if self.complete {
            protocol_error("message_after_end");
            return Err(Status::failed_precondition(
                "ext_proc message received after the exchange ended",
            ));
        }
        let start = Instant::now();
        let hist = match &request {
            Request::RequestHeaders(_) => &PHASES.request_headers,
            Request::RequestBody(_) => &PHASES.request_body,
            Request::RequestTrailers(_) => &PHASES.request_trailers,
            Request::ResponseHeaders(_) => &PHASES.response_headers,
            Request::ResponseBody(_) => &PHASES.response_body,
            Request::ResponseTrailers(_) => &PHASES.response_trailers,
        };
        let result = match request {
            Request::RequestHeaders(h) => {
                self.on_request_headers(h, msg.metadata_context.as_ref(), out)
                    .await
            }
            Request::RequestBody(b) => self.on_body(Direction::Request, b, out).await,
            Request::RequestTrailers(t) => self.on_trailers(Direction::Request, t, out).await,
            Request::ResponseHeaders(h) => self.on_response_headers(h, out).await,
            Request::ResponseBody(b) => self.on_body(Direction::Response, b, out).await,
            Request::ResponseTrailers(t) => self.on_trailers(Direction::Response, t, out).await,
        };
        hist.observe(start.elapsed().as_secs_f64());
        if self.observability {
            // Envoy does not wait for answers in observability mode and must get none.
            out.clear();
        }
        result
    }

    fn side(&mut self, dir: Direction) -> &mut Side {
        match dir {
            Direction::Request => &mut self.req,
            Direction::Response => &mut self.resp,
        }
    }

    /// A mode override asking for `req`/`resp` body modes, or `None` when Envoy would
    /// ignore it (FULL_DUPLEX_STREAMED, bodies sent without waiting, an Envoy that ignored
    /// one before or is said not to allow them) or the modes are unknown.
    fn mode_override(&self, req: i32, resp: i32) -> Option<ProcessingMode> {
        if !self.modes_known
            || self.no_override
            || self.req.mode == FULL_DUPLEX
            || self.resp.mode == FULL_DUPLEX
            || !self.shared.override_usable()
        {
            return None;
        }
        Some(ProcessingMode {
            request_body_mode: req,
            response_body_mode: resp,
            ..Default::default()
        })
    }

    async fn on_request_headers(
        &mut self,
        h: HttpHeaders,
        metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), Status> {
        if self.req.headers_seen {
            protocol_error("duplicate_request_headers");
            return Err(Status::invalid_argument(
                "request_headers received twice on one stream",
            ));
        }
        if self.resp.headers_seen {
            protocol_error("request_headers_after_response");
            return Err(Status::invalid_argument(
                "request_headers received after response_headers",
            ));
        }
        self.req.headers_seen = true;
        self.req.headers_eos = h.end_of_stream;
        if h.end_of_stream {
            self.req.body_done = true;
        }
        self.ex.request = RequestInfo::from_headers(proto::headers_from(h.headers));
        self.ex.request_without_body = h.end_of_stream;
        let named = proto::flow_from_metadata(metadata);
        let selected = match self.snap.select(named.as_deref(), &self.ex.request) {
            Ok(selected) => selected,
            Err(unknown) => {
                self.reject(unknown.fault(), out).await;
                return Ok(());
            }
        };
        let Some(flow) = selected else {
            METRICS
                .decisions_total
                .with_label_values(&["", "no_flow"])
                .inc();
            if self.shared.on_no_match == NoMatch::Reject {
                let fault = Fault::new(
                    404,
                    "tollgate.NoMatchingFlow",
                    format!(
                        "No flow handles {} {}",
                        self.ex.request.method,
                        self.ex.request.path()
                    ),
                );
                self.reject(fault, out).await;
            } else {
                out.push(proto::request_headers(None, false, None));
            }
            return Ok(());
        };
        flow.metrics.requests.inc();
        self.ex.flow.clone_from(&flow.name);
        self.ex.base_path.clone_from(&flow.base_path);
        if crate::telemetry::trace::enabled() {
            self.ex.trace = crate::telemetry::trace::ExchangeTrace::start(
                &self.ex.request.headers,
                &flow.name,
                &self.ex.request.method,
                self.ex.request.path(),
            );
        }
        self.flow = Some(flow.clone());
        crate::pipeline::claim_owned_headers(&flow.request, &mut self.ex);

        let o = run_steps(&flow.request.on_headers, &mut self.ex, Direction::Request).await;
        if !o.is_continue() {
            self.stop(o, Direction::Request, out).await;
            return Ok(());
        }
        let mut mode = None;
        if flow.request.needs_body() {
            if h.end_of_stream {
                // No body will come: the body steps run now, on an empty body.
                self.req.steps_ran = true;
                self.ex.set_body(Direction::Request, Some(Vec::new()));
                let o = run_steps(&flow.request.on_body, &mut self.ex, Direction::Request).await;
                if !o.is_continue() {
                    self.stop(o, Direction::Request, out).await;
                    return Ok(());
                }
            } else if self.req.mode == NONE {
                let resp = if flow.response.needs_body() && self.resp.mode == NONE {
                    STREAMED
                } else {
                    self.resp.mode
                };
                mode = self.mode_override(BUFFERED, resp);
                if mode.is_some() {
                    self.req.mode = BUFFERED;
                    self.resp.mode = resp;
                    self.request_override_sent = true;
                } else {
                    // Envoy will not send the body: refuse now, before the request is
                    // forwarded, rather than after the upstream answered.
                    protocol_error("request_body_not_sent");
                    let fault = Self::body_not_sent(&flow.name);
                    self.reject(fault, out).await;
                    return Ok(());
                }
            }
        }
        if !h.end_of_stream
            && mode.is_none()
            && self.req.mode == FULL_DUPLEX
            && flow.request.needs_body()
        {
            // Envoy sends the body without waiting for this answer, and no body byte goes
            // on before the steps decided anyway: answer the headers with the body.
            self.req.headers_held = true;
            return Ok(());
        }
        let mut muts = self.ex.take_mutations(Direction::Request);
        let clear_route_cache = !muts.is_empty();
        if !h.end_of_stream
            && flow.request.replaces_body
            && matches!(self.req.mode, STREAMED | FULL_DUPLEX)
        {
            // These headers leave before the body is decided: a replaced body would not
            // match the client's length (the upstream gets it chunked instead).
            Self::drop_length(&mut muts);
            self.req.length_removed = true;
        }
        out.push(proto::request_headers(
            proto::header_mutation(muts),
            clear_route_cache,
            mode,
        ));
        Ok(())
    }

    async fn on_response_headers(
        &mut self,
        h: HttpHeaders,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), Status> {
        if self.resp.headers_seen {
            protocol_error("duplicate_response_headers");
            return Err(Status::invalid_argument(
                "response_headers received twice on one stream",
            ));
        }
        self.resp.headers_seen = true;
        self.resp.headers_eos = h.end_of_stream;
        let headers = proto::headers_from(h.headers);
        let status = headers
            .get(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        self.ex.response = Some(ResponseInfo { status, headers });
        if h.end_of_stream {
            self.resp.body_done = true;
            self.complete = true;
            // No body follows: the usage is known before any response step runs.
            crate::llm::track::on_response_headers(&mut self.ex);
            crate::llm::track::finish(&mut self.ex, ExchangeEnd::Completed);
        }
        let Some(flow) = self.flow.clone() else {
            out.push(proto::response_headers(None, None));
            return Ok(());
        };

        // Request body steps that never ran because Envoy never sent the body: fail
        // closed, and say how to fix the Envoy configuration.
        if flow.request.needs_body()
            && !self.req.steps_ran
            && !self.req.headers_eos
            && !self.req.body_seen
            && !self.req.trailers_seen
        {
            protocol_error("request_body_not_sent");
            // An upstream answer (not an error Envoy may have made itself, such as 413 for
            // a body past its buffer) proves the override was ignored and the request went
            // on: stop asking, so the next ones are refused before they are forwarded.
            if self.request_override_sent && (100..400).contains(&status) {
                self.shared.override_was_ignored();
            }
            let fault = Self::body_not_sent(&flow.name);
            self.reject(fault, out).await;
            return Ok(());
        }

        let o = run_steps(&flow.response.on_headers, &mut self.ex, Direction::Response).await;
        if !o.is_continue() {
            self.stop(o, Direction::Response, out).await;
            return Ok(());
        }
        let mut mode = None;
        if flow.response.needs_body() {
            let sse = self
                .ex
                .response
                .as_ref()
                .and_then(|r| r.headers.get("content-type"))
                .is_some_and(|ct| ct.starts_with("text/event-stream"));
            // An event stream whose body steps all guard it chunk by chunk is not held:
            // they run now, on the headers, and the events flow on through the chunk steps.
            let through = !h.end_of_stream && sse && flow.response.streams_in_chunks;
            if h.end_of_stream || through {
                self.resp.steps_ran = true;
                if h.end_of_stream {
                    self.ex.set_body(Direction::Response, Some(Vec::new()));
                }
                let o = run_steps(&flow.response.on_body, &mut self.ex, Direction::Response).await;
                if !o.is_continue() {
                    self.stop(o, Direction::Response, out).await;
                    return Ok(());
                }
            }
            if !h.end_of_stream && self.resp.mode == NONE {
                // Server-sent events must keep flowing: inspect them as they pass. Other
                // bodies are buffered so body steps can also replace them.
                let want = if sse { STREAMED } else { BUFFERED };
                mode = self.mode_override(self.req.mode, want);
                if mode.is_some() {
                    self.resp.mode = want;
                }
            }
        }
        let chunked = !flow.response.chunk_steps.is_empty() && !h.end_of_stream;
        if chunked {
            self.chunks = Some(Box::new(ChunkRunner::start(
                &flow.response.chunk_steps,
                &self.ex,
            )));
        }
        if (self.ex.response_capture > 0 || chunked) && !flow.response.needs_body() {
            if h.end_of_stream {
                self.observe_response(&flow).await;
            } else if self.resp.mode == NONE {
                // A step wants a copy of the body: ask for it streamed, so it is not held.
                mode = self.mode_override(self.req.mode, STREAMED);
                if mode.is_some() {
                    self.resp.mode = STREAMED;
                }
            }
        }
        let mut muts = self.ex.take_mutations(Direction::Response);
        if !h.end_of_stream
            && (flow.response.replaces_body || chunked)
            && matches!(self.resp.mode, STREAMED | FULL_DUPLEX)
        {
            // A chunk step may change the body's length as it passes, too.
            Self::drop_length(&mut muts);
            self.resp.length_removed = true;
        }
        out.push(proto::response_headers(proto::header_mutation(muts), mode));
        Ok(())
    }

    fn body_not_sent(flow: &str) -> Fault {
        Fault::new(
            500,
            "tollgate.RequestBodyNotReceived",
            format!(
                "flow {flow} needs the request body but Envoy does not send it: set request_body_mode BUFFERED on the route, or allow_mode_override on the ext_proc filter (not with FULL_DUPLEX_STREAMED)"
            ),
        )
    }

    /// Removes `content-length` (and any step's value for it) from a headers answer.
    fn drop_length(muts: &mut HeaderMutations) {
        muts.set
            .retain(|(n, _, _)| !n.eq_ignore_ascii_case("content-length"));
        muts.remove.push("content-length".to_owned());
    }

    /// Sets `content-length` to `len` in a body answer whose headers Envoy still holds.
    fn set_length(muts: &mut HeaderMutations, len: usize) {
        muts.set
            .retain(|(n, _, _)| !n.eq_ignore_ascii_case("content-length"));
        muts.remove
            .retain(|n| !n.eq_ignore_ascii_case("content-length"));
        muts.set
            .push(("content-length".to_owned(), len.to_string(), false));
    }

    /// The held request headers answer (see `Side::headers_held`), with every header
    /// change the request steps made, the body's length fixed when a step replaced it.
    fn release_request_headers(&mut self, body_len: usize, out: &mut Vec<ProcessingResponse>) {
        if !std::mem::take(&mut self.req.headers_held) {
            return;
        }
        let mut muts = self.ex.take_mutations(Direction::Request);
        if self.ex.request_body_replaced {
            Self::set_length(&mut muts, body_len);
        }
        let clear_route_cache = !muts.is_empty();
        out.push(proto::request_headers(
            proto::header_mutation(muts),
            clear_route_cache,
            None,
        ));
    }

    /// Takes `n` bytes from the process-wide body budget for this stream.
    fn take_budget(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        if self.shared.body_budget.try_take(n) {
            self.budget_taken += n;
            true
        } else {
            false
        }
    }

    /// A body whose new length cannot reach the peer: the headers left with the old
    /// `content-length` (a step replaced the body though it was not known to).
    fn length_mismatch(&self, dir: Direction, body: &[u8]) -> bool {
        let side = match dir {
            Direction::Request => &self.req,
            Direction::Response => &self.resp,
        };
        if side.length_removed || side.headers_held {
            return false;
        }
        let declared = match dir {
            Direction::Request => self.ex.request.headers.get("content-length"),
            Direction::Response => self
                .ex
                .response
                .as_ref()
                .and_then(|r| r.headers.get("content-length")),
        };
        declared
            .and_then(|v| v.trim().parse::<usize>().ok())
            .is_some_and(|n| n != body.len())
    }

    /// Keeps a copy of a passing response chunk for the steps that asked for one; past
    /// the limit the copy is dropped (the body still passes).
    fn capture(&mut self, chunk: &[u8]) {
        let limit = self.ex.response_capture;
        if limit == 0 {
            return;
        }
        if self.resp.capture.len() + chunk.len() > limit || !self.take_budget(chunk.len()) {
            tracing::debug!(
                limit,
                "response body larger than the capture limit; not kept"
            );
            self.ex.response_capture = 0;
            self.resp.capture = Vec::new();
            return;
        }
        self.resp.capture.extend_from_slice(chunk);
    }

    /// Hands the captured response body to the response steps that see a copy.
    async fn observe_response(&mut self, flow: &Flow) {
        if self.ex.response_capture == 0 {
            return;
        }
        self.ex.response_capture = 0;
        let body = std::mem::take(&mut self.resp.capture);
        if !flow.response.copy_steps.is_empty() {
            let run =
                crate::pipeline::run_copy_steps(&flow.response.copy_steps, &mut self.ex, body);
            Box::pin(run).await;
        }
    }

    /// Runs a response chunk through the flow's chunk steps: the bytes to pass on and
    /// whether they end the stream. Without chunk steps, the chunk as it is.
    fn through_chunks(&mut self, flow: &Flow, data: Vec<u8>, eos: bool) -> (Vec<u8>, bool) {
        match self.chunks.as_mut() {
            None => (data, eos),
            Some(runner) => {
                let (data, end) = runner.push(&flow.response.chunk_steps, &mut self.ex, data, eos);
                if end {
                    // Before the copy steps and the after-exchange hooks run.
                    crate::llm::track::finish(&mut self.ex, ExchangeEnd::Completed);
                }
                if end && !eos {
                    // A step ended the stream early: the copy is not the upstream's answer.
                    self.ex.response_capture = 0;
                    self.resp.capture = Vec::new();
                }
                (data, end)
            }
        }
    }

    /// Passes a response chunk on through the chunk steps (no body step holds it).
    async fn pass_response_chunk(
        &mut self,
        flow: &Flow,
        mode: i32,
        chunk: Vec<u8>,
        eos: bool,
        out: &mut Vec<ProcessingResponse>,
    ) {
        if self.chunks.as_ref().is_some_and(|r| r.ended()) {
            // A step ended the stream: the rest of the upstream's body goes nowhere.
            if mode != FULL_DUPLEX {
                out.push(proto::body(
                    false,
                    proto::common(None, Some(Mutation::ClearBody(true))),
                ));
            }
            return;
        }
        let (data, end) = self.through_chunks(flow, chunk, eos);
        if self.ex.response_capture > 0 {
            self.capture(&data);
            if end {
                self.observe_response(flow).await;
            }
        }
        if self.chunks.is_none() {
            // Only a copy was taken: the chunk passes untouched.
            out.push(Self::pass(Direction::Response, mode, data, end));
            return;
        }
        out.push(match mode {
            FULL_DUPLEX => proto::streamed_body(false, data, end),
            BUFFERED | BUFFERED_PARTIAL if eos => {
                // Envoy still holds the headers: the answer fixes their length.
                let mut muts = crate::vars::HeaderMutations::default();
                Self::set_length(&mut muts, data.len());
                proto::body(
                    false,
                    proto::common(proto::header_mutation(muts), Some(Mutation::Body(data))),
                )
            }
            _ if data.is_empty() => {
                proto::body(false, proto::common(None, Some(Mutation::ClearBody(true))))
            }
            _ => proto::body(false, proto::common(None, Some(Mutation::Body(data)))),
        });
    }

    /// The answer that passes a chunk on untouched.
    fn pass(dir: Direction, mode: i32, chunk: Vec<u8>, eos: bool) -> ProcessingResponse {
        let request = dir == Direction::Request;
        if mode == FULL_DUPLEX {
            proto::streamed_body(request, chunk, eos)
        } else {
            proto::body(request, None)
        }
    }

    async fn on_body(
        &mut self,
        dir: Direction,
        b: HttpBody,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), Status> {
        let side = self.side(dir);
        let mode = side.mode;
        if !side.headers_seen {
            // Possible when the header mode is SKIP: nothing to decide on, pass it on.
            protocol_error("body_before_headers");
            out.push(Self::pass(dir, mode, b.body, b.end_of_stream));
            return Ok(());
        }
        if side.body_done {
            protocol_error("body_after_end");
            return Err(Status::invalid_argument(format!(
                "{}_body received after the {} body ended",
                dir.as_str(),
                dir.as_str()
            )));
        }
        side.body_seen = true;
        side.body_bytes = side.body_bytes.saturating_add(b.body.len() as u64);
        let eos = b.end_of_stream;
        if eos {
            side.body_done = true;
        }
        let steps_ran = side.steps_ran;
        let needs = self.flow.as_ref().is_some_and(|f| match dir {
            Direction::Request => f.request.needs_body(),
            Direction::Response => f.response.needs_body(),
        });
        if dir == Direction::Response && eos {
            self.complete = true;
        }
        if !needs || steps_ran {
            if dir == Direction::Response && (self.ex.response_capture > 0 || self.chunks.is_some())
            {
                if let Some(flow) = self.flow.clone() {
                    self.pass_response_chunk(&flow, mode, b.body, eos, out)
                        .await;
                    return Ok(());
                }
            }
            out.push(Self::pass(dir, mode, b.body, eos));
            return Ok(());
        }
        let Some(flow) = self.flow.clone() else {
            return Ok(());
        };
        let request = dir == Direction::Request;
        let side = self.side(dir);
        if side.buf.len() + b.body.len() > flow.max_body_bytes {
            let fault = Fault::new(
                413,
                "protocol.http.TooBigBody",
                format!(
                    "The {} body is larger than the {} bytes flow {} accepts",
                    dir.as_str(),
                    flow.max_body_bytes,
                    flow.name
                ),
            );
            side.buf = Vec::new();
            self.reject(fault, out).await;
            return Ok(());
        }
        if mode == BUFFERED_PARTIAL && !eos {
            // Envoy cut the body at its buffer limit: the rest would follow undecided, and
            // the steps cannot judge a body they do not see whole.
            let fault = Fault::new(
                413,
                "protocol.http.TooBigBody",
                format!(
                    "The {} body is larger than the gateway buffers for inspection (BUFFERED_PARTIAL)",
                    dir.as_str()
                ),
            );
            self.side(dir).buf = Vec::new();
            self.reject(fault, out).await;
            return Ok(());
        }
        if !self.take_budget(b.body.len()) {
            let fault = Fault::new(
                503,
                "tollgate.BodyBufferFull",
                "The gateway holds too many bodies for inspection right now; retry later",
            );
            self.side(dir).buf = Vec::new();
            tracing::warn!(flow = %flow.name, limit = self.shared.body_budget.limit(), "--max-buffered-bytes reached; body refused");
            self.reject(fault, out).await;
            return Ok(());
        }
        self.side(dir).buf.extend_from_slice(&b.body);
        match mode {
            FULL_DUPLEX => {
                // Hold the chunks until the body is whole, then release it at once.
                if eos {
                    if let Some(body) = self.decided_body(&flow, dir, out).await {
                        let (body, _) = if request {
                            self.release_request_headers(body.len(), out);
                            (body, true)
                        } else {
                            self.through_chunks(&flow, body, true)
                        };
                        out.push(proto::streamed_body(request, body, true));
                    }
                }
            }
            BUFFERED | BUFFERED_PARTIAL => {
                // One message holds the whole body (possibly followed by trailers); Envoy
                // still holds the headers, so the answer can fix their length.
                if let Some(body) = self.run_body_steps(&flow, dir, out).await {
                    let mut replaced = match dir {
                        Direction::Request => self.ex.request_body_replaced,
                        Direction::Response => self.ex.response_body_replaced,
                    };
                    let body = if !request && self.chunks.is_some() {
                        replaced = true;
                        self.through_chunks(&flow, body, true).0
                    } else {
                        body
                    };
                    let mut muts = self.ex.take_mutations(dir);
                    if replaced {
                        Self::set_length(&mut muts, body.len());
                    }
                    let body_mutation = replaced.then_some(Mutation::Body(body));
                    // Request headers changed by a body step (a model router's routing
                    // header) must re-pick the route: Envoy still holds the headers and
                    // has not routed yet, and it clears its route cache only when asked.
                    let clear_route_cache = request && !muts.is_empty();
                    let mut common = proto::common(proto::header_mutation(muts), body_mutation);
                    if let Some(c) = common.as_mut() {
                        c.clear_route_cache = clear_route_cache;
                    }
                    out.push(proto::body(request, common));
                }
            }
            _ => {
                // STREAMED (or unknown). Request chunks are answered at once (Envoy's
                // message timer never runs out on a slow upload) but emptied, so no request
                // byte passes before the steps decided; the whole body goes on with the last
                // chunk. Response chunks are held so only when a step may replace the body;
                // otherwise they flow on (server-sent events) and the steps see a copy.
                let hold = request || flow.response.replaces_body;
                if !eos {
                    if !hold && self.chunks.is_some() {
                        // The body steps see it whole at the end; the chunk steps as it passes.
                        let (data, _) = self.through_chunks(&flow, b.body, false);
                        let mutation = if data.is_empty() {
                            Mutation::ClearBody(true)
                        } else {
                            Mutation::Body(data)
                        };
                        out.push(proto::body(request, proto::common(None, Some(mutation))));
                        return Ok(());
                    }
                    let mutation = hold.then_some(Mutation::ClearBody(true));
                    out.push(proto::body(request, proto::common(None, mutation)));
                    return Ok(());
                }
                let Some(body) = self.decided_body(&flow, dir, out).await else {
                    return Ok(());
                };
                if !request && self.chunks.is_some() {
                    // Held: the whole body is the last chunk. Passed: what the chunk steps
                    // still hold, with the last chunk (the body steps saw the original).
                    let last = if hold { body } else { b.body };
                    let (data, _) = self.through_chunks(&flow, last, true);
                    if !self.ex.take_mutations(dir).is_empty() {
                        tracing::debug!(flow = %flow.name, "header changes from body steps are dropped in STREAMED mode; use BUFFERED");
                    }
                    out.push(proto::body(
                        false,
                        proto::common(None, Some(Mutation::Body(data))),
                    ));
                    return Ok(());
                }
                if !self.ex.take_mutations(dir).is_empty() {
                    // The headers already went on: nothing can change them now.
                    tracing::debug!(flow = %flow.name, "header changes from body steps are dropped in STREAMED mode; use BUFFERED");
                }
                let mutation = if hold {
                    Some(Mutation::Body(body))
                } else {
                    if self.ex.response_body_replaced {
                        tracing::warn!(flow = %flow.name, "a response step replaced a body that already streamed on; the change is dropped");
                    }
                    None
                };
                out.push(proto::body(request, proto::common(None, mutation)));
            }
        }
        Ok(())
    }

    /// Runs the body steps on a body whose headers already left (STREAMED, FULL_DUPLEX):
    /// the body to release, or `None` after a rejection, including a replaced body whose
    /// length no longer matches the `content-length` that went ahead.
    async fn decided_body(
        &mut self,
        flow: &Flow,
        dir: Direction,
        out: &mut Vec<ProcessingResponse>,
    ) -> Option<Vec<u8>> {
        let body = self.run_body_steps(flow, dir, out).await?;
        if self.length_mismatch(dir, &body) {
            protocol_error("body_length_mismatch");
            tracing::error!(flow = %flow.name, direction = dir.as_str(), "a body step replaced the body after its content-length went ahead; refused");
            let fault = Fault::new(
                500,
                "tollgate.BodyLengthMismatch",
                format!(
                    "flow {} replaced the {} body after its headers were forwarded with their length; use BUFFERED for this route",
                    flow.name,
                    dir.as_str()
                ),
            );
            self.reject(fault, out).await;
            return None;
        }
        Some(body)
    }

    /// Runs the body steps of `dir` on the collected body. Returns the body to forward, or
    /// `None` after a rejection (already answered).
    async fn run_body_steps(
        &mut self,
        flow: &Flow,
        dir: Direction,
        out: &mut Vec<ProcessingResponse>,
    ) -> Option<Vec<u8>> {
        let body = std::mem::take(&mut self.side(dir).buf);
        self.side(dir).steps_ran = true;
        let steps = match dir {
            Direction::Request => &flow.request.on_body,
            Direction::Response => &flow.response.on_body,
        };
        if dir == Direction::Response {
            // The usage is known before the response's body steps run.
            crate::llm::track::whole_response(&mut self.ex, &body);
        }
        // A step before the first body step asked for a copy (a cache populating itself):
        // it gets the body as it was when it ran, the upstream's, once the body steps let
        // the response through.
        let copy = (dir == Direction::Response
            && self.ex.response_capture > 0
            && !flow.response.copy_steps.is_empty())
        .then(|| body.clone())
        .filter(|b| b.len() <= self.ex.response_capture);
        self.ex.set_body(dir, Some(body));
        let o = run_steps(steps, &mut self.ex, dir).await;
        if !o.is_continue() {
            self.stop(o, dir, out).await;
            return None;
        }
        let body = self.ex.take_body(dir).unwrap_or_default();
        if dir == Direction::Response {
            self.ex.response_capture = 0;
            if let Some(copy) = copy {
                let run =
                    crate::pipeline::run_copy_steps(&flow.response.copy_steps, &mut self.ex, copy);
                Box::pin(run).await;
            }
        }
        Some(body)
    }

    async fn on_trailers(
        &mut self,
        dir: Direction,
        _t: HttpTrailers,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), Status> {
        let request = dir == Direction::Request;
        let side = self.side(dir);
        if side.trailers_seen {
            protocol_error("duplicate_trailers");
            return Err(Status::invalid_argument(format!(
                "{}_trailers received twice",
                dir.as_str()
            )));
        }
        side.trailers_seen = true;
        side.body_done = true;
        let pending = !side.steps_ran && side.headers_seen;
        let mode = side.mode;
        if dir == Direction::Response {
            self.complete = true;
        }
        let needs = self.flow.as_ref().is_some_and(|f| match dir {
            Direction::Request => f.request.needs_body(),
            Direction::Response => f.response.needs_body(),
        });
        if dir == Direction::Response && !needs {
            if let Some(flow) = self.flow.clone() {
                if self.chunks.as_ref().is_some_and(|r| !r.ended()) {
                    // What the chunk steps still hold goes on before the trailers end the
                    // body (STREAMED cannot carry it on a trailers answer: dropped).
                    let (data, _) = self.through_chunks(&flow, Vec::new(), true);
                    if self.ex.response_capture > 0 {
                        self.capture(&data);
                    }
                    if mode == FULL_DUPLEX {
                        out.push(proto::streamed_body(false, data, false));
                    } else if !data.is_empty() {
                        tracing::warn!(flow = %flow.name, bytes = data.len(), "chunk steps held bytes when trailers ended a STREAMED body; dropped");
                    }
                }
                self.observe_response(&flow).await;
            }
        }
        if needs && pending {
            if let Some(flow) = self.flow.clone() {
                if mode == STREAMED && !self.side(dir).buf.is_empty() {
                    // The chunks were emptied as they passed; a trailers answer cannot
                    // carry the body, so it cannot be released whole: refuse.
                    let fault = Fault::new(
                        500,
                        "tollgate.BodyEndedByTrailers",
                        format!(
                            "the {} body ended with trailers, which STREAMED cannot release after inspection; use BUFFERED or FULL_DUPLEX_STREAMED for this route",
                            dir.as_str()
                        ),
                    );
                    self.reject(fault, out).await;
                    return Ok(());
                }
                match self.decided_body(&flow, dir, out).await {
                    None => return Ok(()),
                    Some(body) if mode == FULL_DUPLEX => {
                        // The held body goes on before the trailers; they end the stream.
                        let (body, _) = if request {
                            self.release_request_headers(body.len(), out);
                            (body, false)
                        } else {
                            self.through_chunks(&flow, body, true)
                        };
                        out.push(proto::streamed_body(request, body, false));
                    }
                    Some(_) => {}
                }
                let _ = self.ex.take_mutations(dir);
            }
        }
        out.push(proto::trailers(request));
        Ok(())
    }
}

impl StreamState {
    /// How the exchange ended, for the after-exchange hooks.
    fn end(&self) -> ExchangeEnd {
        if self.failed {
            ExchangeEnd::Failed
        } else if self.answered {
            ExchangeEnd::Answered
        } else if self.complete || self.chunks.as_ref().is_some_and(|r| r.ended()) {
            ExchangeEnd::Completed
        } else {
            ExchangeEnd::Aborted
        }
    }

    /// How the exchange ended, for traces, analytics and usage: an answer tollgate gave is
    /// a rejection or a served answer.
    fn outcome(&self) -> &'static str {
        match self.end() {
            ExchangeEnd::Failed => "failed",
            ExchangeEnd::Answered if self.rejected => "rejected",
            ExchangeEnd::Answered => "answered",
            ExchangeEnd::Completed => "completed",
            ExchangeEnd::Aborted => "aborted",
        }
    }

    /// Charges the exchange to the verified app's usage, and writes its analytics record
    /// when `record` (sampled).
    fn account(&self, record: bool) {
        let outcome = self.outcome();
        let status = self
            .decided
            .as_ref()
            .map(|d| d.0)
            .or_else(|| self.ex.response.as_ref().map(|r| r.status));
        let verified = self.ex.state.app(None);
        if let (Some(ledger), Some(v)) = (&self.shared.usage, verified) {
            let at = self
                .opened_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            ledger.record(
                at,
                crate::usage::Who {
                    app: &v.app.name,
                    product: &v.product.spec.name,
                    developer: &v.app.developer_email,
                },
                crate::usage::Charge {
                    error: status.is_none_or(|s| s >= 400)
                        || matches!(outcome, "failed" | "aborted"),
                    usage: self.ex.state.llm_usage.as_ref(),
                    cost: self.ex.state.llm_cost,
                },
            );
        }
        if !record || self.flow.is_none() {
            return;
        }
        let length = |h: Option<&crate::vars::Headers>| {
            h.and_then(|h| h.get("content-length"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let seen = |n: u64| (n > 0).then_some(n);
        let llm = self.ex.state.llm.as_deref();
        let usage = self.ex.state.llm_usage.as_ref();
        let (policy, fault) = match &self.decided {
            Some((_, p, c)) if self.rejected => (Some(p.clone()), Some(c.clone())),
            Some((_, _, c)) => (None, Some(c.clone()).filter(|c| !c.is_empty())),
            None => (None, None),
        };
        crate::telemetry::analytics::send(crate::telemetry::analytics::Record {
            time: crate::telemetry::analytics::rfc3339_ms(self.opened_at),
            flow: self.ex.flow.clone(),
            method: self.ex.request.method.clone(),
            path: self
                .ex
                .request
                .path()
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
            request_id: self
                .ex
                .request
                .headers
                .get("x-request-id")
                .map(str::to_owned),
            app: verified.map(|v| v.app.name.clone()),
            developer: verified.map(|v| v.app.developer_email.clone()),
            product: verified.map(|v| v.product.spec.name.clone()),
            api: llm.map(|r| r.api.as_str().to_owned()),
            model: llm.and_then(|r| r.model.clone()),
            status,
            outcome,
            policy,
            fault,
            latency_ms: self.opened.elapsed().as_secs_f64() * 1000.0,
            request_bytes: length(Some(&self.ex.request.headers)).or(seen(self.req.body_bytes)),
            response_bytes: length(self.ex.response.as_ref().map(|r| &r.headers))
                .or(seen(self.resp.body_bytes)),
            input_tokens: usage.map(|u| u.input_tokens),
            output_tokens: usage.map(|u| u.output_tokens),
            total_tokens: usage.map(|u| u.total_tokens()),
            cost: self.ex.state.llm_cost,
        });
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        METRICS.streams_active.dec();
        self.shared.body_budget.give_back(self.budget_taken);
        if let (Some(f), false) = (&self.flow, self.rejected) {
            f.metrics.continued.inc();
        }
        let end = self.end();
        if let Some(flow) = self.flow.clone() {
            // Whatever is known, before usage, analytics and the after-exchange hooks read
            // it (no-op when the response's end already set it, or the flow does not track).
            crate::llm::track::finish(&mut self.ex, end);
            let (req, resp) = (&flow.request.after, &flow.response.after);
            let resp_only = resp
                .iter()
                .filter(|p| !req.iter().any(|q| Arc::ptr_eq(p, q)));
            for p in req.iter().chain(resp_only) {
                p.exchange_end(&mut self.ex, end);
            }
        }
        let sampled = crate::telemetry::analytics::sample();
        if sampled || (self.shared.usage.is_some() && self.ex.state.app(None).is_some()) {
            self.account(sampled);
        }
        if self.ex.trace.is_recording() {
            let outcome = self.outcome();
            let error = match outcome {
                "failed" => Some("stream_error"),
                "aborted" => Some("aborted"),
                _ => None,
            };
            let status = self.ex.response.as_ref().map(|r| r.status);
            self.ex.trace.end(status, outcome, error);
        }
        if let Some(flow) = &self.flow {
            let (req, resp) = (&flow.request.after, &flow.response.after);
            if !req.is_empty() || !resp.is_empty() {
                // The stream's last answer is gone by now: the hooks never delay it.
                let resp_only = resp
                    .iter()
                    .filter(|p| !req.iter().any(|q| Arc::ptr_eq(p, q)));
                crate::pipeline::spawn_after_exchange(req.iter().chain(resp_only), &self.ex, end);
            }
        }
    }
}
