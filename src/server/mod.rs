//! The gRPC side: the ext_proc service and the state its streams share. The process
//! around it (listeners, the admin server, the lifecycle) is assembled in [`crate::app`].

pub mod proto;
pub mod stream;
pub mod tls;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures_util::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::config::reload::ConfigManager;
use crate::telemetry::METRICS;
use stream::StreamState;

/// What to do with a request no flow matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NoMatch {
    /// Let it through untouched.
    #[default]
    Continue,
    /// Answer 404 `tollgate.NoMatchingFlow`.
    Reject,
}

/// Whether the gateway honours `mode_override` (Envoy's `allow_mode_override: true`), which
/// tollgate cannot see from its side of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModeOverride {
    /// Ask for a body Envoy is not sending with `mode_override` (the shipped bootstraps
    /// allow it). A request whose body then never comes proves the gateway ignores it:
    /// from then on such requests are refused before they are forwarded.
    #[default]
    Allowed,
    /// Never ask: a flow that needs a body the route does not send is refused at once.
    Denied,
}

/// Default `--max-buffered-bytes`: bodies held across all streams.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 512 * 1024 * 1024;

/// How streams behave, beyond the configuration.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub on_no_match: NoMatch,
    pub mode_override: ModeOverride,
    /// Body bytes all streams together may hold for body steps.
    pub max_buffered_bytes: usize,
    /// Where each exchange with a verified app is charged (requests, errors, tokens, cost).
    pub usage: Option<Arc<crate::usage::Ledger>>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            on_no_match: NoMatch::default(),
            mode_override: ModeOverride::default(),
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            usage: None,
        }
    }
}

struct BudgetMetrics {
    held: prometheus::IntGauge,
    shed: prometheus::IntCounter,
}

static BUDGET_METRICS: LazyLock<BudgetMetrics> = LazyLock::new(|| {
    let held = prometheus::IntGauge::new(
        "tollgate_body_buffer_bytes",
        "Body bytes held for body steps across all streams",
    )
    .expect("valid metric");
    let shed = prometheus::IntCounter::new(
        "tollgate_body_buffer_shed_total",
        "Bodies refused (503) because --max-buffered-bytes was reached",
    )
    .expect("valid metric");
    for m in [
        Box::new(held.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(shed.clone()),
    ] {
        if let Err(e) = METRICS.registry.register(m) {
            tracing::warn!(error = %e, "body buffer metric not registered");
        }
    }
    BudgetMetrics { held, shed }
});

/// The process-wide budget for body bytes held by streams (beside each flow's
/// `maxBodyBytes`): past it new body buffering is refused instead of the process growing
/// until it is killed.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Self {
        LazyLock::force(&BUDGET_METRICS);
        Self {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Takes `n` bytes from the budget; false (and nothing taken) when they do not fit.
    pub fn try_take(&self, n: usize) -> bool {
        let ok = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok();
        if ok {
            BUDGET_METRICS
                .held
                .add(i64::try_from(n).unwrap_or(i64::MAX));
        } else {
            BUDGET_METRICS.shed.inc();
        }
        ok
    }

    /// Gives back `n` bytes taken with [`BodyBudget::try_take`].
    pub fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(n))
            });
        BUDGET_METRICS
            .held
            .sub(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// State shared by every stream.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<ConfigManager>,
    pub on_no_match: NoMatch,
    /// False while starting and once shutdown begins.
    pub ready: AtomicBool,
    pub mode_override: ModeOverride,
    /// Set once a request's body never came after a `mode_override` asked for it: the
    /// gateway ignores overrides, so asking again would forward requests undecided.
    override_ignored: AtomicBool,
    pub body_budget: BodyBudget,
    pub usage: Option<Arc<crate::usage::Ledger>>,
}

impl Shared {
    pub fn new(config: Arc<ConfigManager>, on_no_match: NoMatch) -> Arc<Self> {
        Self::with_options(
            config,
            StreamOptions {
                on_no_match,
                ..StreamOptions::default()
            },
        )
    }

    pub fn with_options(config: Arc<ConfigManager>, opts: StreamOptions) -> Arc<Self> {
        Arc::new(Self {
            config,
            on_no_match: opts.on_no_match,
            ready: AtomicBool::new(false),
            mode_override: opts.mode_override,
            override_ignored: AtomicBool::new(false),
            body_budget: BodyBudget::new(opts.max_buffered_bytes),
            usage: opts.usage,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// True when asking Envoy for a body with `mode_override` can work.
    pub fn override_usable(&self) -> bool {
        self.mode_override == ModeOverride::Allowed
            && !self.override_ignored.load(Ordering::Relaxed)
    }

    /// Notes that the gateway ignored a `mode_override` (logged once).
    pub fn override_was_ignored(&self) {
        if !self.override_ignored.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "Envoy ignored a mode_override (allow_mode_override is off on its ext_proc filter): requests whose flow needs a body the route does not send are refused from now on; set allow_mode_override: true or a body mode on the route, or start with --mode-override denied"
            );
        }
    }
}

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct Processor {
    shared: Arc<Shared>,
}

impl Processor {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The tonic service, accepting messages up to `max_message_bytes` (a buffered body
    /// arrives in one message).
    pub fn into_service(self, max_message_bytes: usize) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

struct Driver {
    state: StreamState,
    inbound: Streaming<ProcessingRequest>,
    queue: VecDeque<ProcessingResponse>,
    error: Option<Status>,
    ended: bool,
}

/// True when the inbound error is the peer's HTTP/2 stream or connection going away (Envoy
/// resets every stream at its end unless graceful close is on, and resets it when its client
/// leaves): nobody waits for an answer any more. Any other error (a message too large or
/// malformed) leaves Envoy waiting, and must end the stream with an error status.
fn peer_gone(s: &Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        if e.is::<hyper::Error>() {
            return true;
        }
        cur = e.source();
    }
    s.message().starts_with("h2 protocol error")
}

/// The `tollgate_protocol_errors_total` kind and the status that ends the stream for an
/// inbound error that is not the peer going away.
fn stream_error(s: &Status) -> (&'static str, Status) {
    match s.code() {
        // tonic: "decoded message length too large" (past --max-message-bytes), or a
        // compressed message that grows past it.
        Code::OutOfRange | Code::ResourceExhausted => (
            "message_too_large",
            Status::resource_exhausted(format!(
                "ext_proc message larger than --max-message-bytes: {}",
                s.message()
            )),
        ),
        Code::Internal if s.message().contains("decod") => (
            "malformed_message",
            Status::invalid_argument(format!("malformed ext_proc message: {}", s.message())),
        ),
        _ => (
            "stream_error",
            Status::internal(format!("ext_proc stream error: {}", s.message())),
        ),
    }
}

impl Driver {
    async fn next(mut self) -> Option<(Result<ProcessingResponse, Status>, Self)> {
        loop {
            if let Some(r) = self.queue.pop_front() {
                return Some((Ok(r), self));
            }
            if let Some(e) = self.error.take() {
                self.ended = true;
                return Some((Err(e), self));
            }
            if self.ended {
                return None;
            }
            match self.inbound.message().await {
                Ok(Some(msg)) => {
                    let mut out = Vec::with_capacity(1);
                    if let Err(e) = self.state.on_message(msg, &mut out).await {
                        self.state.fail();
                        tracing::warn!(error = %e.message(), "ext_proc protocol violation; stream closed");
                        self.error = Some(e);
                    }
                    self.queue.extend(out);
                }
                // Envoy half-closed: every message so far is answered.
                Ok(None) => return None,
                Err(s) if peer_gone(&s) => {
                    tracing::trace!(code = ?s.code(), error = %s.message(), "ext_proc stream ended by the peer");
                    return None;
                }
                Err(s) => {
                    // Envoy still waits for an answer: an error status makes it fail closed
                    // (an OK end would let it forward the message undecided).
                    let (kind, status) = stream_error(&s);
                    METRICS
                        .protocol_errors_total
                        .with_label_values(&[kind])
                        .inc();
                    tracing::warn!(kind, code = ?s.code(), error = %s.message(), "ext_proc stream error; stream closed with an error status");
                    self.state.fail();
                    self.error = Some(status);
                }
            }
        }
    }
}

pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let driver = Driver {
            state: StreamState::new(self.shared.clone()),
            inbound: request.into_inner(),
            // Most messages get one answer; a small start avoids regrowing per stream.
            queue: VecDeque::with_capacity(2),
            error: None,
            ended: false,
        };
        let s = futures_util::stream::unfold(driver, Driver::next);
        Ok(Response::new(Box::pin(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_errors_that_leave_envoy_waiting_end_with_an_error() {
        // What tonic reports for a message past --max-message-bytes.
        let s = Status::out_of_range(
            "Error, decoded message length too large: found 8197 bytes, the limit is: 4096 bytes",
        );
        assert!(!peer_gone(&s));
        let (kind, status) = stream_error(&s);
        assert_eq!(kind, "message_too_large");
        assert_eq!(status.code(), Code::ResourceExhausted);

        let s = Status::internal("failed to decode Protobuf message: buffer underflow");
        assert!(!peer_gone(&s));
        assert_eq!(stream_error(&s).0, "malformed_message");
        assert_eq!(stream_error(&s).1.code(), Code::InvalidArgument);

        let s = Status::unknown("something else");
        assert!(!peer_gone(&s));
        assert_eq!(stream_error(&s).0, "stream_error");
        assert_ne!(stream_error(&s).1.code(), Code::Ok);

        // The peer's reset, as tonic words it: a normal end.
        let s = Status::internal(
            "h2 protocol error: stream error received: unexpected internal error encountered",
        );
        assert!(peer_gone(&s));
    }

    #[test]
    fn body_budget_takes_and_gives_back() {
        let b = BodyBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        assert_eq!(b.held(), 100);
        b.give_back(100);
        assert_eq!(b.held(), 0);
        assert!(!b.try_take(101));
        assert!(!b.try_take(usize::MAX));
    }
}
