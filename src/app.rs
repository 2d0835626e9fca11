//! Process assembly: what `tollgate serve` runs. [`run`] opens the storage (once, here: the
//! object store, the counters and their checkpoints), builds the services every
//! configuration load shares, loads the configuration, then [`serve`] starts the ext_proc
//! gRPC server ([`crate::server`]) and the admin HTTP server ([`crate::admin`]) and runs the
//! lifecycle (reload on SIGHUP, graceful shutdown on SIGTERM). `server` and `admin` do not
//! know each other: this module wires them (the admin port reads readiness through
//! [`admin::Readiness`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;

use crate::admin;
use crate::config::reload::{ConfigManager, ConfigSource};
use crate::config::LoadOptions;
use crate::consumer::service::Consumers;
use crate::policies::service_callout::Egress;
use crate::ratelimit::memory::{spawn_maintenance, MemoryCounters};
use crate::ratelimit::shared::{SharedCounters, SyncMode};
use crate::ratelimit::{Clock, Counters, SystemClock};
use crate::server::tls::{ReloadingTls, TlsFiles};
use crate::server::{ModeOverride, NoMatch, Processor, Shared, StreamOptions};
use crate::services::Services;
use crate::store::{self, Backend, Store, StoreSpec};
use crate::telemetry::METRICS;

/// Where quota counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterPlacement {
    /// In memory, per replica; checkpointed when the store is embedded.
    Memory,
    /// In a shared backend (Redis), synchronous or asynchronous.
    Shared { spec: StoreSpec, mode: SyncMode },
}

/// Where state lives.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Products, apps, keys and key-value entries written through the API.
    pub store: StoreSpec,
    pub counters: CounterPlacement,
    /// How often in-memory counters are checkpointed (with an embedded store).
    pub checkpoint_interval: Duration,
    /// Live in-memory counters (and asynchronous mirrors) kept before new identifiers
    /// share an overflow counter.
    pub counter_max_keys: usize,
}

/// How often this replica's usage is added to the store's tallies.
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Everything `tollgate serve` needs.
#[derive(Debug)]
pub struct Options {
    pub source: ConfigSource,
    pub load: LoadOptions,
    pub egress: Egress,
    /// The built-in embedder's default model directory (`--embedder-model-dir`).
    pub embedder_model_dir: Option<std::path::PathBuf>,
    pub storage: StorageOptions,
    pub serve: ServeOptions,
}

/// The opened storage.
pub struct Storage {
    pub store: Store,
    pub counters: Counters,
    /// Where in-memory counters are checkpointed, if anywhere.
    pub checkpoints: Option<Arc<dyn Backend>>,
}

/// Opens the store and the counters `opts` name, restores checkpointed counters, and
/// starts the counters' maintenance (sweeps, checkpoints, asynchronous syncs). A counter
/// backend that is the store's is shared, not opened twice.
pub async fn open_storage(opts: &StorageOptions) -> anyhow::Result<Storage> {
    let backend = store::open(&opts.store)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the {} store: {e}", spec_kind(&opts.store)))?;
    tracing::info!(store = backend.kind(), "store open");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let local = Arc::new(MemoryCounters::new(opts.counter_max_keys));
    let (counters, checkpoints) = match &opts.counters {
        CounterPlacement::Shared { spec, mode } => {
            let shared = if *spec == opts.store {
                backend.clone()
            } else {
                let no_feed = store::OpenOptions {
                    change_feed: false,
                    ..Default::default()
                };
                store::open_with(spec, no_feed)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot reach Redis for counters: {e}"))?
            };
            let shared = SharedCounters::new(shared, *mode, opts.counter_max_keys);
            spawn_maintenance(local.clone(), clock.clone(), None);
            (Counters::shared(clock, local, shared), None)
        }
        CounterPlacement::Memory => {
            let checkpoints = matches!(opts.store, StoreSpec::Embedded(_)).then(|| backend.clone());
            if let Some(b) = &checkpoints {
                let n = local
                    .restore(&**b, clock.now_ms())
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot read counter checkpoints: {e}"))?;
                tracing::info!(counters = n, "counters restored from the embedded store");
            }
            spawn_maintenance(
                local.clone(),
                clock.clone(),
                checkpoints
                    .clone()
                    .map(|b| (b, opts.checkpoint_interval.max(Duration::from_millis(100)))),
            );
            (Counters::with_local(clock, local), checkpoints)
        }
    };
    tracing::info!(counters = counters.kind(), "counters ready");
    Ok(Storage {
        store: Store::new(backend),
        counters,
        checkpoints,
    })
}

fn spec_kind(spec: &StoreSpec) -> &'static str {
    match spec {
        StoreSpec::Memory => "memory",
        StoreSpec::Embedded(_) => "embedded",
        StoreSpec::Redis(_) => "Redis",
    }
}

/// `tollgate serve`: opens the storage, loads the configuration, serves until SIGTERM,
/// then writes a last counter checkpoint.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let storage = open_storage(&opts.storage).await?;
    let consumers = Consumers::new(storage.store.clone());
    let services = Services {
        counters: storage.counters.clone(),
        egress: Arc::new(opts.egress),
        embedders: Arc::new(crate::embed::Embedders::new(opts.embedder_model_dir)),
        ..Services::with_consumers(consumers.clone())
    };
    // Configuration first (its index build sees no store objects yet and is cheap), then
    // the store: the full index is built once.
    let config = ConfigManager::load_with_options(opts.source, services, opts.load)
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    // Follow the change feed before reading, so no write between the two is missed.
    consumers.spawn_follower();
    consumers
        .resync()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the store: {e}"))?;
    // Usage is tallied in the store every few seconds, and once more after the drain.
    let ledger = crate::usage::Ledger::new(storage.store.backend().clone());
    ledger.spawn_flusher(USAGE_FLUSH_INTERVAL);
    // Monetization charges go to the same tallies on the same rhythm.
    let mint = config.services().monetization.clone();
    mint.spawn_flusher(USAGE_FLUSH_INTERVAL);
    let mut serve_opts = opts.serve;
    serve_opts.usage = Some(ledger.clone());
    serve(config, serve_opts).await?;
    if let Err(e) = ledger.flush().await {
        tracing::warn!(error = %e, "final usage flush failed");
    }
    if let Err(e) = mint.flush().await {
        tracing::warn!(error = %e, "final monetization charge flush failed");
    }
    // A last checkpoint after the drain, so a clean restart loses no count.
    if let Some(b) = storage.checkpoints {
        let counters = &storage.counters;
        match counters.local.checkpoint(&*b, counters.now()).await {
            Ok(n) => tracing::info!(rows = n, "counters checkpointed at shutdown"),
            Err(e) => tracing::warn!(error = %e, "final counter checkpoint failed"),
        }
    }
    Ok(())
}

/// What the admin port's `/readyz` reads: the streams' readiness and the configuration.
struct Ready(Arc<Shared>);

impl admin::Readiness for Ready {
    fn is_ready(&self) -> bool {
        self.0.is_ready()
    }

    fn generation(&self) -> u64 {
        self.0.config.generation()
    }
}

/// The running configuration, as the management API's `/v1/flows` and the admin page read it.
struct View(Arc<ConfigManager>);

impl admin::ConfigView for View {
    fn flows(&self) -> Vec<serde_json::Value> {
        self.0.snapshot().describe_flows()
    }

    fn generation(&self) -> u64 {
        self.0.generation()
    }
}

/// How the process serves (beside the configuration and the storage).
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
    /// Whether the gateway honours `mode_override`.
    pub mode_override: ModeOverride,
    /// Body bytes all streams together may hold.
    pub max_buffered_bytes: usize,
    /// Serve gRPC over TLS (GKE sends HTTP/2 over TLS to `appProtocol: HTTP2` backends),
    /// with client certificates required when a client CA is given; reloaded on change.
    pub tls: Option<TlsFiles>,
    /// The management API under `/v1/` on the admin port; `None` keeps it closed.
    pub api_auth: Option<admin::ApiAuth>,
    /// Bounds of the admin and metrics HTTP servers.
    pub admin_limits: admin::HttpLimits,
    /// The usage ledger (`run` opens it on the store): charged by the streams, read by
    /// `GET /v1/usage`.
    pub usage: Option<Arc<crate::usage::Ledger>>,
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
    let shared = Shared::with_options(
        config.clone(),
        StreamOptions {
            on_no_match: opts.on_no_match,
            mode_override: opts.mode_override,
            max_buffered_bytes: opts.max_buffered_bytes,
            usage: opts.usage.clone(),
        },
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // `grpc_stop`: stop accepting gRPC connections; `stop`: everything else, at the end.
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let tls = match &opts.tls {
        Some(files) => {
            Some(ReloadingTls::load(files.clone()).map_err(|e| anyhow::anyhow!("gRPC TLS: {e}"))?)
        }
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

    let readiness: Arc<dyn admin::Readiness> = Arc::new(Ready(shared.clone()));
    let mut admin = admin::router(readiness.clone());
    match &opts.api_auth {
        Some(auth) => {
            admin = admin::with_api(admin, config.services().consumers.clone(), auth.clone());
            let s = config.services();
            admin = admin::with_kvm_api(admin, s.consumers.clone(), s.kvms.clone(), auth.clone());
            admin = admin::with_mint_api(admin, s, auth.clone());
            admin = admin::with_flows_api(admin, Arc::new(View(config.clone())), auth.clone());
            if let Some(ledger) = &opts.usage {
                admin = admin::with_usage_api(admin, ledger.clone(), auth.clone());
            }
            if matches!(auth, admin::ApiAuth::Insecure) {
                tracing::warn!("management API open WITHOUT authentication (--admin-insecure)");
            }
        }
        None => {
            admin = admin::with_closed_api(admin);
            tracing::info!(
                "management API closed: give --admin-token-file or --admin-token-env (or --admin-insecure) to open it"
            )
        }
    }
    let mut http_tasks = vec![tokio::spawn(admin::serve_http(
        admin_listener,
        admin,
        opts.admin_limits,
        stop_rx.clone(),
    ))];
    if let Some(l) = metrics_listener {
        http_tasks.push(tokio::spawn(admin::serve_http(
            l,
            admin::router(readiness.clone()),
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
