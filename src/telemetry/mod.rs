//! Prometheus metrics and log set-up. Metrics live in one process-wide registry; counters
//! that the hot path touches per flow are resolved once per configuration (see
//! [`FlowMetrics`]) so a request does no label hashing.

pub mod analytics;
pub mod gen_ai;
pub mod trace;

use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub streams_total: IntCounter,
    pub streams_active: IntGauge,
    pub requests_total: IntCounterVec,
    pub decisions_total: IntCounterVec,
    pub rejections_total: IntCounterVec,
    pub phase_seconds: HistogramVec,
    pub protocol_errors_total: IntCounterVec,
    pub config_synchronized: IntGauge,
    pub config_last_reload_success: Gauge,
    pub config_last_reload_attempt: Gauge,
    pub config_reloads_total: IntCounterVec,
    pub config_generation: IntGauge,
    pub build_info: prometheus::IntGaugeVec,
    /// The runtime's worker threads (`--worker-threads` or the CPUs the process may use).
    pub worker_threads: IntGauge,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let streams_total = IntCounter::new("tollgate_streams_total", "ext_proc streams opened")
            .expect("valid metric");
        r.register(Box::new(streams_total.clone()))
            .expect("unique metric");
        let streams_active = IntGauge::new("tollgate_streams_active", "ext_proc streams open now")
            .expect("valid metric");
        r.register(Box::new(streams_active.clone()))
            .expect("unique metric");
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_phase_duration_seconds",
                "Time tollgate spent answering one ext_proc message, by phase",
            )
            .buckets(vec![
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["phase"],
        )
        .expect("valid metric");
        r.register(Box::new(phase_seconds.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let fgauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "tollgate_build_info",
                "tollgate version, commit and target (always 1)",
            ),
            &["version", "commit", "target", "profile"],
        )
        .expect("valid metric");
        r.register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[BUILD.version, BUILD.commit, BUILD.target, BUILD.profile])
            .set(1);
        let worker_threads = gauge(
            "tollgate_worker_threads",
            "Runtime worker threads (--worker-threads, default the CPUs the process may use)",
        );
        Self {
            worker_threads,
            streams_total,
            streams_active,
            requests_total: counter_vec(
                r,
                "tollgate_requests_total",
                "HTTP exchanges by matched flow",
                &["flow"],
            ),
            decisions_total: counter_vec(
                r,
                "tollgate_decisions_total",
                "Final decisions by flow: continue, reject, no_flow",
                &["flow", "decision"],
            ),
            rejections_total: counter_vec(
                r,
                "tollgate_rejections_total",
                "Rejections by flow, policy and error code",
                &["flow", "policy", "code"],
            ),
            phase_seconds,
            protocol_errors_total: counter_vec(
                r,
                "tollgate_protocol_errors_total",
                "ext_proc messages that broke the protocol, by kind",
                &["kind"],
            ),
            config_synchronized: gauge(
                "tollgate_config_synchronized",
                "1 when the running configuration is the one on disk, 0 after a failed reload",
            ),
            config_last_reload_success: fgauge(
                "tollgate_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load",
            ),
            config_last_reload_attempt: fgauge(
                "tollgate_config_last_reload_attempt_timestamp_seconds",
                "Unix time of the last configuration load attempt",
            ),
            config_reloads_total: counter_vec(
                r,
                "tollgate_config_reloads_total",
                "Configuration loads by result",
                &["result"],
            ),
            config_generation: gauge(
                "tollgate_config_generation",
                "Generation of the running configuration (1 = first load)",
            ),
            build_info,
            registry,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn phase(&self, phase: &str) -> Histogram {
        self.phase_seconds.with_label_values(&[phase])
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics::new();
    // Known label values start at 0, so rates, ratios and alerts have a series to work on
    // before the first error (an absent series makes `rate()` empty, not 0).
    for kind in PROTOCOL_ERROR_KINDS {
        m.protocol_errors_total.with_label_values(&[kind]);
    }
    for result in ["success", "failure"] {
        m.config_reloads_total.with_label_values(&[result]);
    }
    m
});

/// Every `tollgate_protocol_errors_total` kind the server counts.
pub const PROTOCOL_ERROR_KINDS: &[&str] = &[
    "body_after_end",
    "body_before_headers",
    "body_length_mismatch",
    "duplicate_request_headers",
    "duplicate_response_headers",
    "duplicate_trailers",
    "empty_first_message",
    "empty_message",
    "message_after_end",
    "request_body_not_sent",
    "request_headers_after_response",
    "malformed_message",
    "message_too_large",
    "stream_error",
];

/// Per-flow counters resolved once when the configuration compiles.
#[derive(Debug, Clone)]
pub struct FlowMetrics {
    pub requests: IntCounter,
    pub continued: IntCounter,
    pub rejected: IntCounter,
}

impl FlowMetrics {
    pub fn new(flow: &str) -> Self {
        let m = &*METRICS;
        Self {
            requests: m.requests_total.with_label_values(&[flow]),
            continued: m.decisions_total.with_label_values(&[flow, "continue"]),
            rejected: m.decisions_total.with_label_values(&[flow, "reject"]),
        }
    }
}

/// Pre-resolved phase histograms.
pub struct PhaseHistograms {
    pub request_headers: Histogram,
    pub request_body: Histogram,
    pub request_trailers: Histogram,
    pub response_headers: Histogram,
    pub response_body: Histogram,
    pub response_trailers: Histogram,
}

pub static PHASES: LazyLock<PhaseHistograms> = LazyLock::new(|| {
    let m = &*METRICS;
    PhaseHistograms {
        request_headers: m.phase("request_headers"),
        request_body: m.phase("request_body"),
        request_trailers: m.phase("request_trailers"),
        response_headers: m.phase("response_headers"),
        response_body: m.phase("response_body"),
        response_trailers: m.phase("response_trailers"),
    }
});

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The version, the commit it was built from (`TOLLGATE_GIT_COMMIT` at build time, set by the
/// Dockerfile's build argument; `unknown` otherwise) and the target: what `tollgate version`
/// prints and `tollgate_build_info` carries.
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: &'static str,
    pub target: &'static str,
    pub profile: &'static str,
}

pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: match option_env!("TOLLGATE_GIT_COMMIT") {
        Some(c) => c,
        None => "unknown",
    },
    target: if cfg!(target_arch = "x86_64") {
        "x86_64-linux"
    } else if cfg!(target_arch = "aarch64") {
        "aarch64-linux"
    } else {
        "other"
    },
    profile: if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    },
};

/// The filter of the installed subscriber, changeable at run time through the management API
/// (`GET`/`PUT /v1/logging`), so an operator can turn on `debug` for one module on a live
/// replica without a restart.
type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

static LOG_FILTER: std::sync::OnceLock<(FilterHandle, parking_lot::Mutex<String>)> =
    std::sync::OnceLock::new();

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("invalid log filter `{0}`: {1}")]
    Invalid(String, String),
    #[error("logging is not set up in this process")]
    NotInstalled,
}

/// The filter in force (`RUST_LOG` syntax), when this process installed the subscriber.
pub fn log_filter() -> Option<String> {
    LOG_FILTER.get().map(|(_, s)| s.lock().clone())
}

/// Replaces the filter in force; the old one stays when `spec` does not parse.
pub fn set_log_filter(spec: &str) -> Result<(), LogFilterError> {
    let spec = spec.trim();
    let filter = tracing_subscriber::EnvFilter::try_new(spec)
        .map_err(|e| LogFilterError::Invalid(spec.to_owned(), e.to_string()))?;
    let (handle, current) = LOG_FILTER.get().ok_or(LogFilterError::NotInstalled)?;
    let mut current = current.lock();
    handle
        .reload(filter)
        .map_err(|_| LogFilterError::NotInstalled)?;
    spec.clone_into(&mut current);
    tracing::info!(filter = spec, "log filter changed");
    Ok(())
}

/// Installs the global `tracing` subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, reload, EnvFilter, Layer};
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = match format {
        LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set((handle, parking_lot::Mutex::new(spec)));
    }
    // Otherwise one was already installed (tests): keep the first one.
}
