//! The `tollgate` command: `serve` and `validate`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tollgate::admin::ApiAuth;
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::config::{self, SourceFile};
use tollgate::consumer::service::Consumers;
use tollgate::server::{self, NoMatch, ServeOptions};
use tollgate::services::Services;
use tollgate::store::{self, StoreSpec};
use tollgate::telemetry::{init_logging, LogFormat};

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Envoy ext_proc policy decision point for API and LLM traffic.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve ext_proc on the gRPC port and health, readiness and metrics on the admin port.
    Serve(Box<ServeArgs>),
    /// Check a configuration directory: exit 0 when valid, 1 with the errors on stderr.
    Validate {
        /// Configuration directory.
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Configuration directory (watched and hot-reloaded). Without it, the built-in
    /// example configuration is served.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "TOLLGATE_GRPC_ADDR", default_value = "0.0.0.0:9002")]
    grpc_addr: SocketAddr,
    #[arg(long, env = "TOLLGATE_ADMIN_ADDR", default_value = "0.0.0.0:9003")]
    admin_addr: SocketAddr,
    /// What to do with requests no flow matches.
    #[arg(long, value_enum, default_value_t = NoMatch::Continue)]
    on_no_match: NoMatch,
    /// How often the configuration directory is re-read (in addition to file events).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    reload_interval: Duration,
    /// How long open streams may take to finish after SIGTERM.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Largest ext_proc message accepted (a buffered body arrives in one message).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_message_bytes: usize,
    /// PEM certificate chain for serving gRPC over TLS (with --tls-key).
    #[arg(long, env = "TOLLGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TOLLGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where API-created products, apps and keys live.
    #[arg(long, value_enum, env = "TOLLGATE_STORE", default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// Directory of the embedded store.
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "tollgate-data")]
    data_dir: PathBuf,
    /// Redis for `--store redis`: `redis://host:port[/db]` or
    /// `redis+cluster://host1:port1,host2:port2`.
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    redis_url: Option<String>,
    /// File holding the management API's bearer token.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN_FILE",
        conflicts_with = "admin_token_env"
    )]
    admin_token_file: Option<PathBuf>,
    /// Name of an environment variable holding the management API's bearer token.
    #[arg(long, conflicts_with = "admin_insecure")]
    admin_token_env: Option<String>,
    /// Open the management API without authentication (development only).
    #[arg(long, conflicts_with = "admin_token_file")]
    admin_insecure: bool,
    #[arg(long, value_enum, env = "TOLLGATE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Destinations ServiceCallout may call: `host`, `host:port`, `*.domain[:port]`,
    /// comma-separated. Default: anywhere.
    #[arg(long, env = "TOLLGATE_CALLOUT_ALLOW", value_delimiter = ',')]
    callout_allow: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// A transactional file under --data-dir (one replica).
    Embedded,
    /// Redis or Redis Cluster (several replicas).
    Redis,
    /// In memory: nothing survives a restart.
    Memory,
}

fn api_auth(args: &ServeArgs) -> anyhow::Result<Option<ApiAuth>> {
    let token = if let Some(f) = &args.admin_token_file {
        std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read --admin-token-file {}: {e}", f.display()))?
    } else if let Some(var) = &args.admin_token_env {
        std::env::var(var).map_err(|_| anyhow::anyhow!("--admin-token-env: `{var}` is not set"))?
    } else if args.admin_insecure {
        return Ok(Some(ApiAuth::Insecure));
    } else {
        return Ok(None);
    };
    let token = token.trim().to_owned();
    if token.len() < 16 {
        anyhow::bail!("the management API token must be at least 16 characters");
    }
    Ok(Some(ApiAuth::Bearer(token)))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 2s, 1m, 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}` is not a duration like 500ms, 2s, 1m, 1h")),
    }
}

/// The configuration `tollgate serve` runs without `--config`.
const EMBEDDED: &[(&str, &str)] = &[(
    "embedded:policies/quickstart.yaml",
    include_str!("../policies/quickstart.yaml"),
)];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { dir } => match config::load_dir(&dir) {
            Ok(s) => {
                println!(
                    "{}: valid ({} flows, {} policies)",
                    dir.display(),
                    s.by_name.len(),
                    s.policies.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            init_logging(args.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: Box<ServeArgs>) -> anyhow::Result<()> {
    let source = match &args.config {
        Some(dir) => ConfigSource::Dir(dir.clone()),
        None => {
            tracing::info!("no --config: serving the built-in example configuration");
            ConfigSource::Embedded(
                EMBEDDED
                    .iter()
                    .map(|(name, text)| SourceFile {
                        name: (*name).to_owned(),
                        text: (*text).to_owned(),
                    })
                    .collect(),
            )
        }
    };
    let api_auth = api_auth(&args)?;
    let spec = match args.store {
        StoreKind::Memory => StoreSpec::Memory,
        StoreKind::Embedded => StoreSpec::Embedded(args.data_dir.clone()),
        StoreKind::Redis => StoreSpec::Redis(
            args.redis_url
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--store redis needs --redis-url"))?,
        ),
    };
    let store = store::open(&spec)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the {:?} store: {e}", args.store))?;
    tracing::info!(store = store.kind(), "store open");
    let consumers = Consumers::new(store);
    let mut services = Services::with_consumers(consumers.clone());
    services.egress = std::sync::Arc::new(
        tollgate::policies::service_callout::Egress::new(&args.callout_allow)
            .map_err(|e| anyhow::anyhow!("--callout-allow: {e}"))?,
    );
    // Configuration first (its index build sees no store objects yet and is cheap), then
    // the store: the full index is built once.
    let config = ConfigManager::load_with(source, services)
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    // Follow the change feed before reading, so no write between the two is missed.
    consumers.spawn_follower();
    consumers
        .resync()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the store: {e}"))?;
    server::serve(
        config,
        ServeOptions {
            grpc_addr: args.grpc_addr,
            admin_addr: args.admin_addr,
            on_no_match: args.on_no_match,
            reload_interval: args.reload_interval,
            drain_timeout: args.drain_timeout,
            max_message_bytes: args.max_message_bytes,
            tls: args.tls_cert.zip(args.tls_key),
            api_auth,
        },
    )
    .await
}
