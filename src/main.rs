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
use tollgate::ratelimit::memory::{spawn_maintenance, MemoryCounters};
use tollgate::ratelimit::redis::{RedisCounters, SyncMode};
use tollgate::ratelimit::{Clock, Counters, SystemClock};
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
    #[arg(long, default_value = "2s", value_parser = parse_period)]
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
    /// Where Quota counters live: `auto` is Redis with `--store redis`, memory otherwise
    /// (checkpointed to the embedded store with `--store embedded`). SpikeArrest always
    /// counts per replica, in memory.
    #[arg(long, value_enum, env = "TOLLGATE_COUNTERS", default_value_t = CounterKind::Auto)]
    counters: CounterKind,
    /// Redis counters: `sync` (one atomic round trip per decision, exact across replicas) or
    /// `async` (local counting, synced every --counter-sync-interval; bounded overshoot).
    #[arg(long, value_enum, env = "TOLLGATE_COUNTER_SYNC", default_value_t = CounterSync::Sync)]
    counter_sync: CounterSync,
    /// How often asynchronous Redis counters are synced.
    #[arg(long, env = "TOLLGATE_COUNTER_SYNC_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    counter_sync_interval: Duration,
    /// How often in-memory quota counters are checkpointed to the embedded store.
    #[arg(long, env = "TOLLGATE_COUNTER_CHECKPOINT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    counter_checkpoint_interval: Duration,
    /// Live in-memory counters kept before new identifiers share one overflow counter.
    #[arg(long, env = "TOLLGATE_COUNTER_MAX_KEYS", default_value_t = tollgate::ratelimit::memory::DEFAULT_MAX_KEYS)]
    counter_max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CounterKind {
    /// Redis with --store redis, memory otherwise.
    Auto,
    /// In memory (per replica).
    Memory,
    /// Redis at --redis-url (shared by replicas).
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CounterSync {
    Sync,
    Async,
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

/// Longest duration a flag accepts: far beyond any sensible value, and far enough from
/// the clock's range that adding it to now cannot overflow.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration like 500ms, 2s, 1m, 1h");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => return Err(bad()),
    };
    d.filter(|d| *d <= MAX_FLAG_DURATION)
        .ok_or_else(|| format!("`{s}` is longer than a year"))
}

/// A period something repeats at: a duration that is not zero (a timer cannot tick at 0).
fn parse_period(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}`: the period must not be zero"));
    }
    Ok(d)
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
    let (store, database) = match &spec {
        // The embedded file also keeps counter checkpoints: keep a handle to it.
        StoreSpec::Embedded(dir) => {
            let dir = dir.clone();
            let embedded =
                tokio::task::spawn_blocking(move || store::embedded::EmbeddedStore::open(&dir))
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot open the embedded store: {e}"))?
                    .map_err(|e| anyhow::anyhow!("cannot open the embedded store: {e}"))?;
            let db = embedded.database();
            (
                std::sync::Arc::new(embedded) as std::sync::Arc<dyn store::Store>,
                Some(db),
            )
        }
        _ => (
            store::open(&spec)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the {:?} store: {e}", args.store))?,
            None,
        ),
    };
    tracing::info!(store = store.kind(), "store open");
    let consumers = Consumers::new(store);
    let (counters, checkpoint_db) = counters(&args, database).await?;
    tracing::info!(counters = counters.kind(), "counters ready");
    let services = Services {
        counters: counters.clone(),
        egress: std::sync::Arc::new(
            tollgate::policies::service_callout::Egress::new(&args.callout_allow)
                .map_err(|e| anyhow::anyhow!("--callout-allow: {e}"))?,
        ),
        ..Services::with_consumers(consumers.clone())
    };
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
    .await?;
    // A last checkpoint after the drain, so a clean restart loses no count.
    if let Some(db) = checkpoint_db {
        let local = counters.local.clone();
        let now = counters.now();
        match tokio::task::spawn_blocking(move || local.checkpoint(&db, now)).await {
            Ok(Ok(n)) => tracing::info!(rows = n, "counters checkpointed at shutdown"),
            Ok(Err(e)) => tracing::warn!(error = %e, "final counter checkpoint failed"),
            Err(e) => tracing::warn!(error = %e, "final counter checkpoint failed"),
        }
    }
    Ok(())
}

/// Builds the counter service the flags ask for, restores checkpointed counters, and starts
/// the sweeper (and checkpoints). Returns the database checkpoints go to, if any.
async fn counters(
    args: &ServeArgs,
    database: Option<std::sync::Arc<redb::Database>>,
) -> anyhow::Result<(Counters, Option<std::sync::Arc<redb::Database>>)> {
    let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(SystemClock);
    let local = std::sync::Arc::new(MemoryCounters::new(args.counter_max_keys));
    let use_redis = match args.counters {
        CounterKind::Auto => args.store == StoreKind::Redis,
        CounterKind::Memory => false,
        CounterKind::Redis => true,
    };
    if use_redis {
        let url = args
            .redis_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--counters redis needs --redis-url"))?;
        let mode = match args.counter_sync {
            CounterSync::Sync => SyncMode::Sync,
            CounterSync::Async => SyncMode::Async {
                interval: args.counter_sync_interval.max(Duration::from_millis(1)),
            },
        };
        let redis = RedisCounters::connect(url, mode, args.counter_max_keys)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach Redis for counters: {e}"))?;
        spawn_maintenance(local.clone(), clock.clone(), None);
        return Ok((Counters::redis(clock, local, redis), None));
    }
    let checkpoint = database;
    if let Some(db) = &checkpoint {
        let (db, l, now) = (db.clone(), local.clone(), clock.now_ms());
        let n = tokio::task::spawn_blocking(move || l.restore(&db, now))
            .await
            .map_err(|e| anyhow::anyhow!("cannot read counter checkpoints: {e}"))?
            .map_err(|e| anyhow::anyhow!("cannot read counter checkpoints: {e}"))?;
        tracing::info!(counters = n, "counters restored from the embedded store");
    }
    spawn_maintenance(
        local.clone(),
        clock.clone(),
        checkpoint.clone().map(|db| {
            (
                db,
                args.counter_checkpoint_interval
                    .max(Duration::from_millis(100)),
            )
        }),
    );
    Ok((Counters::with_local(clock, local), checkpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags took `n * 3600` unchecked (an overflow) and a zero reload interval panicked in
    /// the timer; both are refused with a message now.
    #[test]
    fn zero_and_huge_flag_durations_are_refused() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("18446744073709551615h").is_err());
        assert!(parse_duration("99999999999999s").is_err());
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_period("0s").is_err());
        assert_eq!(parse_period("2s"), Ok(Duration::from_secs(2)));
    }
}
