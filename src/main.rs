//! The `tollgate` command: `serve`, `validate`, `import` and `jwt mint`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tollgate::admin::ApiAuth;
use tollgate::app;
use tollgate::config::reload::ConfigSource;
use tollgate::config::{self, SourceFile};
use tollgate::ratelimit::shared::SyncMode;
use tollgate::server::tls::TlsFiles;
use tollgate::server::NoMatch;
use tollgate::services::Services;
use tollgate::store::StoreSpec;
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
    /// Check a configuration directory: exit 0 when valid (warnings on stderr), 1 with the
    /// errors on stderr. Takes the options of `serve` that change what it accepts.
    Validate {
        /// Configuration directory.
        dir: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Convert an Apigee proxy or shared-flow bundle (a directory or a zip) into a tollgate
    /// configuration directory, with a report of every element: converted, approximated
    /// (how) or not convertible (why). Exit 0 when everything converted or was
    /// approximated, 2 when some element could not be converted (the output is still
    /// written: such steps answer 500 `tollgate.NotConverted`), 1 on an error.
    Import {
        /// The bundle: `apiproxy/` or `sharedflowbundle/`, a directory holding one, or a zip.
        bundle: PathBuf,
        /// Where to write the configuration (and `import/report.{txt,json}`).
        #[arg(required_unless_present = "check")]
        out_dir: Option<PathBuf>,
        /// Only report: write nothing.
        #[arg(long)]
        check: bool,
        /// Print the report as JSON rather than text.
        #[arg(long)]
        json: bool,
    },
    /// Print the version, the commit it was built from and the target.
    Version {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// JSON Web Token tools (for trying VerifyJwt flows).
    Jwt {
        #[command(subcommand)]
        command: JwtCommand,
    },
}

#[derive(Subcommand, Debug)]
enum JwtCommand {
    /// Print a signed token: `iat` now and `exp` after --expires-in unless the claims set
    /// them.
    Mint(MintArgs),
}

#[derive(clap::Args, Debug)]
struct MintArgs {
    /// Signing algorithm: HS256/384/512 (with --secret or --secret-env), RS*/PS*, ES256/384
    /// or EdDSA (with --key).
    #[arg(long, default_value = "HS256")]
    alg: String,
    /// HMAC secret.
    #[arg(long, conflicts_with_all = ["secret_env", "key"])]
    secret: Option<String>,
    /// Name of an environment variable holding the HMAC secret.
    #[arg(long, conflicts_with = "key")]
    secret_env: Option<String>,
    /// PEM private key file (PKCS#8; PKCS#1 for RSA).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Claims, as a JSON object.
    #[arg(long, default_value = "{}")]
    claims: String,
    /// Lifetime of the token (sets `exp` unless the claims have one).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    expires_in: Duration,
    /// `kid` header (the key id a JWKS names the key by).
    #[arg(long)]
    kid: Option<String>,
}

/// The token `tollgate jwt mint` prints, or why it cannot.
fn mint(args: &MintArgs) -> Result<String, String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let alg: Algorithm = args
        .alg
        .parse()
        .map_err(|_| format!("--alg: unknown algorithm `{}`", args.alg))?;
    let secret = || -> Result<Vec<u8>, String> {
        match (&args.secret, &args.secret_env) {
            (Some(s), _) => Ok(s.as_bytes().to_vec()),
            (None, Some(var)) => std::env::var(var)
                .map(String::into_bytes)
                .map_err(|_| format!("--secret-env: `{var}` is not set")),
            (None, None) => Err(format!("{alg:?} needs --secret or --secret-env")),
        }
    };
    let pem = || -> Result<Vec<u8>, String> {
        let path = args
            .key
            .as_ref()
            .ok_or_else(|| format!("{alg:?} needs --key (a PEM private key file)"))?;
        std::fs::read(path).map_err(|e| format!("cannot read --key {}: {e}", path.display()))
    };
    let bad_key = |e: jsonwebtoken::errors::Error| format!("--key is not a {alg:?} key: {e}");
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(&secret()?)
        }
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem()?).map_err(bad_key)?,
        Algorithm::ES256 | Algorithm::ES384 => {
            EncodingKey::from_ec_pem(&pem()?).map_err(bad_key)?
        }
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem()?).map_err(bad_key)?,
    };
    let mut claims: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&args.claims)
        .map_err(|e| format!("--claims must be a JSON object: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    claims.entry("iat").or_insert(now.into());
    claims
        .entry("exp")
        .or_insert(now.saturating_add(args.expires_in.as_secs()).into());
    let mut header = Header::new(alg);
    header.kid.clone_from(&args.kid);
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("cannot sign: {e}"))
}

/// The options that change which configurations are accepted: `serve` and `validate` both
/// take them, so both judge a configuration alike.
#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// Largest ext_proc message accepted (a buffered body arrives in one message); a flow
    /// whose maxBodyBytes cannot fit in one message is refused.
    #[arg(long, env = "TOLLGATE_MAX_MESSAGE_BYTES", default_value_t = config::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Destinations ServiceCallout may call: `host`, `host:port`, `*.domain[:port]`,
    /// comma-separated. Default: anywhere.
    #[arg(long, env = "TOLLGATE_CALLOUT_ALLOW", value_delimiter = ',')]
    callout_allow: Vec<String>,
    /// The built-in embedder's model directory (SemanticCache and ModelRouter with
    /// `embedder: {kind: static}` and no `modelDir`); `scripts/setup.sh` installs one in
    /// `.tools/embed-model`.
    #[arg(long, env = "TOLLGATE_EMBED_MODEL_DIR")]
    embedder_model_dir: Option<std::path::PathBuf>,
}

impl LoadArgs {
    fn options(&self) -> config::LoadOptions {
        config::LoadOptions {
            max_message_bytes: self.max_message_bytes,
            ..Default::default()
        }
    }

    fn egress(&self) -> anyhow::Result<tollgate::policies::service_callout::Egress> {
        tollgate::policies::service_callout::Egress::new(&self.callout_allow)
            .map_err(|e| anyhow::anyhow!("--callout-allow: {e}"))
    }
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
    /// Also serve `/metrics`, `/healthz` and `/readyz` (not the management API) here, so
    /// the admin port can be bound to a private address while Prometheus and probes
    /// scrape this one.
    #[arg(long, env = "TOLLGATE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Admin and metrics ports: a connection whose request headers take longer is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    admin_header_read_timeout: Duration,
    /// Admin and metrics ports: connections served at once (each port); more are
    /// answered 503 and closed.
    #[arg(long, default_value_t = 128)]
    admin_max_connections: usize,
    /// What to do with requests no flow matches.
    #[arg(long, value_enum, default_value_t = NoMatch::Continue)]
    on_no_match: NoMatch,
    /// How often the configuration directory is re-read (in addition to file events).
    #[arg(long, default_value = "2s", value_parser = parse_period)]
    reload_interval: Duration,
    /// After SIGTERM, how long tollgate stays up not ready (`/readyz` 503, gRPC health
    /// NOT_SERVING) while still serving new streams, so health checks move traffic away
    /// before the port closes.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Then, how long open streams may take to finish (no new connections meanwhile).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[command(flatten)]
    load: LoadArgs,
    /// Whether the gateway honours ext_proc `mode_override` (Envoy's `allow_mode_override`).
    /// With `denied`, a flow that needs a body the route does not send is refused before the
    /// request is forwarded.
    #[arg(long, value_enum, env = "TOLLGATE_MODE_OVERRIDE", default_value_t = tollgate::server::ModeOverride::Allowed)]
    mode_override: tollgate::server::ModeOverride,
    /// Body bytes all streams together may hold for body steps; past it new bodies are
    /// refused with 503 `tollgate.BodyBufferFull`.
    #[arg(long, env = "TOLLGATE_MAX_BUFFERED_BYTES", default_value_t = tollgate::server::DEFAULT_MAX_BUFFERED_BYTES)]
    max_buffered_bytes: usize,
    /// PEM certificate chain for serving gRPC over TLS (with --tls-key).
    #[arg(long, env = "TOLLGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TOLLGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): the gRPC port then requires a client certificate signed by
    /// one of them (mTLS; only the gateway may call). Certificate, key and CA files are
    /// re-read every --reload-interval and take effect for new connections.
    #[arg(long, env = "TOLLGATE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
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
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Name of an environment variable holding the management API's bearer token.
    #[arg(long)]
    admin_token_env: Option<String>,
    /// Open the management API without authentication (development only).
    #[arg(long)]
    admin_insecure: bool,
    #[arg(long, value_enum, env = "TOLLGATE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Runtime worker threads. Default: the CPUs this process may use, which takes the
    /// container's CPU limit (cgroup `cpu.max` quota) and CPU affinity into account, so a pod
    /// limited to 2 CPUs on a 64-core node runs 2 workers, not 64.
    #[arg(long, env = "TOLLGATE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    /// Export traces over OTLP/gRPC to this collector (`http://otel-collector:4317`): a span
    /// per exchange, continuing the gateway's `traceparent`, with a child per step that
    /// waited. Off when unset.
    #[arg(long, env = "TOLLGATE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0 to 1); a sampled parent from the gateway is always
    /// followed.
    #[arg(long, env = "TOLLGATE_TRACE_SAMPLE_RATIO", default_value_t = 0.01)]
    trace_sample_ratio: f64,
    /// Write one JSON line per exchange (flow, app, developer, product, API, model, status,
    /// deciding policy, latency, sizes, tokens, cost; never a secret) to `stdout` or a file.
    /// Off when unset.
    #[arg(long, env = "TOLLGATE_ANALYTICS", value_name = "stdout|PATH")]
    analytics: Option<tollgate::telemetry::analytics::Sink>,
    /// Share of exchanges that get an analytics record (0 to 1), spread evenly. 1 % by
    /// default, like traces: a record for every exchange costs about a fifth of the stream
    /// rate of a cheap flow on two cores (benches/observability-cost.sh); usage reports
    /// count every exchange whatever this is.
    #[arg(long, env = "TOLLGATE_ANALYTICS_SAMPLE_RATIO", default_value_t = 0.01)]
    analytics_sample_ratio: f64,
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
    /// Proxies in front of Envoy that append the address they saw to X-Forwarded-For and
    /// are trusted, Envoy itself included when it appends (`use_remote_address: true`):
    /// the client address is the Nth entry from the right. 0 (default) never reads
    /// X-Forwarded-For and uses Envoy's `source.address` attribute only (prefer that, with
    /// Envoy's own `xff_num_trusted_hops`).
    #[arg(long, env = "TOLLGATE_XFF_TRUSTED_HOPS", default_value_t = 0)]
    xff_trusted_hops: usize,
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

/// How an option was given, for messages: `--flag`, or `--flag (from VAR)` when it came
/// from the environment.
fn given(m: &ArgMatches, id: &str) -> Option<String> {
    let flag = format!("--{}", id.replace('_', "-"));
    match m.value_source(id)? {
        ValueSource::CommandLine => Some(flag),
        ValueSource::EnvVariable => {
            let var = Cli::command()
                .find_subcommand("serve")
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == id).cloned())
                .and_then(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
                .unwrap_or_default();
            Some(format!("{flag} (from {var})"))
        }
        _ => None,
    }
}

/// Options of `serve` that contradict each other, each message naming both sides (and the
/// environment variable an option came from).
fn conflicts(m: &ArgMatches, args: &ServeArgs) -> Vec<String> {
    let mut out = Vec::new();
    let auth: Vec<String> = ["admin_token_file", "admin_token_env", "admin_insecure"]
        .iter()
        .filter_map(|id| given(m, id))
        .collect();
    if auth.len() > 1 {
        out.push(format!(
            "{} conflict: give one way to authenticate the management API",
            auth.join(" and ")
        ));
    }
    let redis_counters = match args.counters {
        CounterKind::Auto => args.store == StoreKind::Redis,
        CounterKind::Memory => false,
        CounterKind::Redis => true,
    };
    // What decided that counters are not in Redis.
    let value = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    let counters_why = || {
        given(m, "counters").map_or_else(
            || {
                let store = given(m, "store").unwrap_or_else(|| "--store".to_owned());
                format!("{store} {} (counters in memory)", value(&args.store))
            },
            |flag| format!("{flag} {}", value(&args.counters)),
        )
    };
    if !redis_counters {
        for id in ["counter_sync", "counter_sync_interval"] {
            if let Some(flag) = given(m, id) {
                out.push(format!(
                    "{flag} conflicts with {}: it applies to Redis counters only",
                    counters_why()
                ));
            }
        }
    }
    if args.analytics.is_none() {
        if let Some(flag) = given(m, "analytics_sample_ratio") {
            out.push(format!(
                "{flag} needs --analytics: records are written only there"
            ));
        }
    }
    if args.otlp_endpoint.is_none() {
        if let Some(flag) = given(m, "trace_sample_ratio") {
            out.push(format!(
                "{flag} needs --otlp-endpoint: traces are exported only to a collector"
            ));
        }
    }
    let checkpoints = !redis_counters && args.store == StoreKind::Embedded;
    if !checkpoints {
        if let Some(flag) = given(m, "counter_checkpoint_interval") {
            let why = if redis_counters {
                let flag = given(m, "counters")
                    .or_else(|| given(m, "store"))
                    .unwrap_or_else(|| "--counters".to_owned());
                format!("{flag} redis")
            } else {
                counters_why()
            };
            out.push(format!(
                "{flag} conflicts with {why}: counters are checkpointed only in memory with \
                 --store embedded"
            ));
        }
    }
    out
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let (Command::Serve(args), Some(m)) = (&cli.command, matches.subcommand_matches("serve")) {
        let found = conflicts(m, args);
        if !found.is_empty() {
            for c in found {
                eprintln!("error: {c}");
            }
            return ExitCode::from(2);
        }
    }
    match cli.command {
        Command::Validate { dir, load } => validate(&dir, &load),
        Command::Import {
            bundle,
            out_dir,
            check,
            json,
        } => import(&bundle, out_dir.as_deref(), check, json),
        Command::Version { json } => {
            let b = &tollgate::telemetry::BUILD;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"version": b.version, "commit": b.commit, "target": b.target, "profile": b.profile})
                );
            } else {
                println!(
                    "tollgate {} (commit {}, {}, {})",
                    b.version, b.commit, b.target, b.profile
                );
            }
            ExitCode::SUCCESS
        }
        Command::Jwt {
            command: JwtCommand::Mint(args),
        } => match mint(&args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate jwt mint: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            init_logging(args.log_format);
            tollgate::vars::set_xff_trusted_hops(args.xff_trusted_hops);
            let workers = worker_threads(args.worker_threads);
            tracing::info!(workers, "starting the runtime");
            tollgate::telemetry::METRICS
                .worker_threads
                .set(i64::try_from(workers).unwrap_or(i64::MAX));
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
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

/// The runtime's worker count: the flag, else the CPUs this process may use.
/// `available_parallelism` reads the cgroup v1/v2 CPU quota and the affinity mask on Linux
/// (a fractional quota rounds down, at least 1).
fn worker_threads(flag: Option<u16>) -> usize {
    flag.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(std::num::NonZeroUsize::get)
            .unwrap_or(1)
    })
}

/// `tollgate import`: converts, writes (unless `--check`), checks the written directory as
/// `validate` would, and prints the report.
fn import(
    bundle: &std::path::Path,
    out: Option<&std::path::Path>,
    check: bool,
    json: bool,
) -> ExitCode {
    let done = match tollgate::import::convert(bundle) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tollgate import: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !check {
        if let Some(out) = out {
            if let Err(e) = tollgate::import::write(&done, out)
                .and_then(|()| tollgate::import::validate_dir(out))
            {
                eprintln!("tollgate import: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&done.report).unwrap_or_default()
        );
    } else {
        print!("{}", done.report.text());
    }
    if done.report.counts.not_convertible > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// `tollgate validate`: compiles `dir` as `serve` would with the same options.
fn validate(dir: &std::path::Path, load: &LoadArgs) -> ExitCode {
    let egress = match load.egress() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let services = Services {
        egress: std::sync::Arc::new(egress),
        embedders: std::sync::Arc::new(tollgate::embed::Embedders::new(
            load.embedder_model_dir.clone(),
        )),
        ..Services::default()
    };
    let result = config::read_dir(dir).and_then(|files| {
        config::compile_with_options(&files, Some(dir), &services, &load.options())
    });
    match result {
        Ok(s) => {
            for w in &s.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: valid ({} flows, {} policies{})",
                dir.display(),
                s.by_name.len(),
                s.policies.len(),
                match s.warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".to_owned(),
                    n => format!(", {n} warnings"),
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate serve`: the flags as [`app::Options`], then [`app::run`].
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
    // Held until serve returns: dropping it flushes the last spans.
    let _trace = match &args.otlp_endpoint {
        Some(endpoint) => Some(tollgate::telemetry::trace::init(
            endpoint,
            args.trace_sample_ratio,
        )?),
        None => None,
    };
    let _analytics = match &args.analytics {
        Some(sink) => Some(tollgate::telemetry::analytics::init(
            sink.clone(),
            args.analytics_sample_ratio,
        )?),
        None => None,
    };
    let options = app::Options {
        source,
        load: args.load.options(),
        egress: args.load.egress()?,
        embedder_model_dir: args.load.embedder_model_dir.clone(),
        storage: storage_options(&args)?,
        serve: app::ServeOptions {
            grpc_addr: args.grpc_addr,
            admin_addr: args.admin_addr,
            on_no_match: args.on_no_match,
            metrics_addr: args.metrics_addr,
            reload_interval: args.reload_interval,
            shutdown_grace: args.shutdown_grace,
            drain_timeout: args.drain_timeout,
            max_message_bytes: args.load.max_message_bytes,
            mode_override: args.mode_override,
            max_buffered_bytes: args.max_buffered_bytes,
            tls: args
                .tls_cert
                .clone()
                .zip(args.tls_key.clone())
                .map(|(cert, key)| TlsFiles {
                    cert,
                    key,
                    client_ca: args.tls_client_ca.clone(),
                }),
            api_auth,
            usage: None,
            admin_limits: tollgate::admin::HttpLimits {
                header_read_timeout: args
                    .admin_header_read_timeout
                    .max(Duration::from_millis(100)),
                max_connections: args.admin_max_connections.max(1),
                ..Default::default()
            },
        },
    };
    app::run(options).await
}

/// Which backends `--store`, `--counters` and `--counter-sync` name.
fn storage_options(args: &ServeArgs) -> anyhow::Result<app::StorageOptions> {
    let redis = |flag: &str| {
        args.redis_url
            .clone()
            .map(StoreSpec::Redis)
            .ok_or_else(|| anyhow::anyhow!("{flag} redis needs --redis-url"))
    };
    let store = match args.store {
        StoreKind::Memory => StoreSpec::Memory,
        StoreKind::Embedded => StoreSpec::Embedded(args.data_dir.clone()),
        StoreKind::Redis => redis("--store")?,
    };
    let use_redis = match args.counters {
        CounterKind::Auto => args.store == StoreKind::Redis,
        CounterKind::Memory => false,
        CounterKind::Redis => true,
    };
    let counters = if use_redis {
        app::CounterPlacement::Shared {
            spec: redis("--counters")?,
            mode: match args.counter_sync {
                CounterSync::Sync => SyncMode::Sync,
                CounterSync::Async => SyncMode::Async {
                    interval: args.counter_sync_interval.max(Duration::from_millis(1)),
                },
            },
        }
    } else {
        app::CounterPlacement::Memory
    };
    Ok(app::StorageOptions {
        store,
        counters,
        checkpoint_interval: args.counter_checkpoint_interval,
        counter_max_keys: args.counter_max_keys,
    })
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
