//! The gRPC side: the ext_proc service, gRPC health, and the process lifecycle (serve,
//! reload on SIGHUP, graceful shutdown on SIGTERM).

pub mod proto;
pub mod stream;
pub mod tls;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// State shared by every stream.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<ConfigManager>,
    pub on_no_match: NoMatch,
    /// False while starting and once shutdown begins.
    pub ready: AtomicBool,
}

impl Shared {
    pub fn new(config: Arc<ConfigManager>, on_no_match: NoMatch) -> Arc<Self> {
        Arc::new(Self {
            config,
            on_no_match,
            ready: AtomicBool::new(false),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
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

/// True for what tonic reports when the peer resets the stream (Envoy ends every stream
/// with RST unless graceful close is on) rather than for a message it could not decode.
fn is_decode_error(s: &Status) -> bool {
    s.code() == Code::Internal && s.message().contains("decode")
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
                        tracing::warn!(error = %e.message(), "ext_proc protocol violation; stream closed");
                        self.error = Some(e);
                    }
                    self.queue.extend(out);
                }
                Ok(None) => return None,
                Err(s) if is_decode_error(&s) => {
                    METRICS
                        .protocol_errors_total
                        .with_label_values(&["malformed_message"])
                        .inc();
                    tracing::warn!(error = %s.message(), "malformed ext_proc message; stream closed");
                    self.error = Some(Status::invalid_argument(format!(
                        "malformed ext_proc message: {}",
                        s.message()
                    )));
                }
                Err(s) => {
                    tracing::trace!(code = ?s.code(), error = %s.message(), "ext_proc stream ended by the peer");
                    return None;
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

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// A second listener serving only `/metrics`, `/healthz` and `/readyz`, so the admin
    /// port (and its management API) can stay private while Prometheus and probes reach
    /// this one.
    pub metrics_addr: Option<SocketAddr>,
    pub on_no_match: NoMatch,
    pub reload_interval: Duration,
    /// After SIGTERM: not ready, but new streams still accepted, for this long (the
    /// gateway's health checks need time to move traffic away).
    pub shutdown_grace: Duration,
    /// Then: no new connections; open streams may finish for this long.
    pub drain_timeout: Duration,
    pub max_message_bytes: usize,
    /// Serve gRPC over TLS (GKE sends HTTP/2 over TLS to `appProtocol: HTTP2` backends),
    /// with client certificates required when a client CA is given; reloaded on change.
    pub tls: Option<tls::TlsFiles>,
    /// The management API under `/v1/` on the admin port; `None` keeps it closed.
    pub api_auth: Option<crate::admin::ApiAuth>,
    /// Bounds of the admin and metrics HTTP servers.
    pub admin_limits: crate::admin::HttpLimits,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
}

/// Runs the ext_proc server and the admin server until SIGTERM or Ctrl-C, then shuts down
/// in the order the README promises: not ready at once (`/readyz` 503, gRPC health
/// NOT_SERVING) while new streams are still served for `shutdown_grace`; then no new
/// connections and open streams drain up to `drain_timeout`; the admin port answers
/// throughout and closes last.
pub async fn serve(config: Arc<ConfigManager>, opts: ServeOptions) -> anyhow::Result<()> {
    let shared = Shared::new(config.clone(), opts.on_no_match);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // `grpc_stop`: stop accepting gRPC connections; `stop`: everything else, at the end.
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let tls = match &opts.tls {
        Some(files) => Some(
            tls::ReloadingTls::load(files.clone()).map_err(|e| anyhow::anyhow!("gRPC TLS: {e}"))?,
        ),
        None => None,
    };
    let grpc_listener = bind(opts.grpc_addr, "gRPC").await?;
    let admin_listener = bind(opts.admin_addr, "admin").await?;
    let metrics_listener = match opts.metrics_addr {
        Some(a) => Some(bind(a, "metrics").await?),
        None => None,
    };
    tracing::info!(
        grpc = %grpc_listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        metrics = ?metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
        "listening"
    );

    let mut admin = crate::admin::router(shared.clone());
    match &opts.api_auth {
        Some(auth) => {
            admin =
                crate::admin::with_api(admin, config.services().consumers.clone(), auth.clone());
            let s = config.services();
            admin = crate::admin::with_kvm_api(
                admin,
                s.consumers.clone(),
                s.kvms.clone(),
                auth.clone(),
            );
            if matches!(auth, crate::admin::ApiAuth::Insecure) {
                tracing::warn!("management API open WITHOUT authentication (--admin-insecure)");
            }
        }
        None => {
            admin = crate::admin::with_closed_api(admin);
            tracing::info!(
                "management API closed: give --admin-token-file or --admin-token-env (or --admin-insecure) to open it"
            )
        }
    }
    let mut http_tasks = vec![tokio::spawn(crate::admin::serve_http(
        admin_listener,
        admin,
        opts.admin_limits,
        stop_rx.clone(),
    ))];
    if let Some(l) = metrics_listener {
        http_tasks.push(tokio::spawn(crate::admin::serve_http(
            l,
            crate::admin::router(shared.clone()),
            opts.admin_limits,
            stop_rx.clone(),
        )));
    }

    let watcher = tokio::spawn(config.clone().watch(opts.reload_interval, stop_rx.clone()));
    if let Some(t) = &tls {
        tokio::spawn(t.clone().watch(opts.reload_interval, stop_rx.clone()));
        tracing::info!(
            cert = %opts.tls.as_ref().map(|f| f.cert.display().to_string()).unwrap_or_default(),
            client_certificates = opts.tls.as_ref().is_some_and(|f| f.client_ca.is_some()),
            "gRPC over TLS"
        );
    }

    let service = Processor::new(shared.clone()).into_service(opts.max_message_bytes);
    health_reporter
        .set_serving::<ExternalProcessorServer<Processor>>()
        .await;
    let mut grpc_shutdown = grpc_stop_rx.clone();
    let stopped = async move {
        let _ = grpc_shutdown.wait_for(|v| *v).await;
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(service);
    let mut grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>> = match tls {
        Some(t) => tokio::spawn(router.serve_with_incoming_shutdown(
            t.incoming(grpc_listener, grpc_stop_rx.clone()),
            stopped,
        )),
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            // Without TCP_NODELAY small answers wait out Nagle + delayed ACK (~40 ms p99).
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            stopped,
        )),
    };
    shared.ready.store(true, Ordering::Relaxed);
    tracing::info!("ready");

    let signals = wait_for_shutdown(config.clone());
    tokio::select! {
        () = signals => {}
        r = &mut grpc => {
            // The server stopped on its own: that is an error.
            shared.ready.store(false, Ordering::Relaxed);
            let _ = grpc_stop_tx.send(true);
            let _ = stop_tx.send(true);
            return match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("gRPC server stopped unexpectedly")),
                Ok(Err(e)) => Err(anyhow::anyhow!("gRPC server failed: {e}")),
                Err(e) => Err(anyhow::anyhow!("gRPC server task failed: {e}")),
            };
        }
    }

    // 1. Not ready: health checks and load balancers move away, while streams that still
    //    arrive meanwhile are served.
    tracing::info!(grace = ?opts.shutdown_grace, drain_timeout = ?opts.drain_timeout, "shutting down: not ready; still serving during the grace period");
    shared.ready.store(false, Ordering::Relaxed);
    health_reporter
        .set_not_serving::<ExternalProcessorServer<Processor>>()
        .await;
    tokio::time::sleep(opts.shutdown_grace).await;
    // 2. No new connections; open streams finish up to the deadline.
    tracing::info!(
        open = METRICS.streams_active.get(),
        "grace period over: draining open streams"
    );
    let _ = grpc_stop_tx.send(true);
    let drained = tokio::time::timeout(opts.drain_timeout, async {
        // Envoy keeps its HTTP/2 connection open, so watch the streams rather than the
        // connections.
        while METRICS.streams_active.get() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all streams finished"),
        Err(_) => tracing::warn!(
            open = METRICS.streams_active.get(),
            "drain deadline reached; closing open streams"
        ),
    }
    grpc.abort();
    // 3. Last, the admin port (it answered `/readyz` 503 until here) and the watchers.
    let _ = stop_tx.send(true);
    for t in http_tasks {
        let _ = t.await;
    }
    let _ = watcher.await;
    Ok(())
}

/// Waits for SIGTERM or SIGINT; reloads the configuration on every SIGHUP meanwhile.
async fn wait_for_shutdown(config: Arc<ConfigManager>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                let c = config.clone();
                let _ = tokio::task::spawn_blocking(move || c.reload(true)).await;
            }
        }
    }
}
