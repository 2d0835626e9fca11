//! LLM metrics: the OpenTelemetry `gen_ai` histograms (exported to Prometheus with
//! underscores and the unit suffix OpenTelemetry's Prometheus exporter adds) and tollgate's
//! token and cost counters by app and product.
//!
//! Every metric and label name is here, so the moving `gen_ai` conventions change in one
//! place. Label values that come from clients or configuration (models, apps, products,
//! currencies) are bounded: each label keeps the first [`LABEL_VALUES_CAP`] distinct values
//! it sees in the process's life and reports every later one as [`OTHER`]; a value longer
//! than [`LABEL_VALUE_MAX_BYTES`] is [`OTHER`] too. A series count is then at most the
//! product of the caps of its labels, whatever clients send.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::LazyLock;

use parking_lot::Mutex;

use prometheus::{CounterVec, HistogramOpts, HistogramVec, IntCounterVec, Opts};

use super::METRICS;
use crate::vars::Exchange;

/// `gen_ai.client.token.usage` (`{token}`; `gen_ai.token.type` = input | output).
pub const TOKEN_USAGE: &str = "gen_ai_client_token_usage";
/// `gen_ai.server.request.duration` (seconds).
pub const REQUEST_DURATION: &str = "gen_ai_server_request_duration_seconds";
/// `gen_ai.server.time_to_first_token` (seconds).
pub const TIME_TO_FIRST_TOKEN: &str = "gen_ai_server_time_to_first_token_seconds";
/// `gen_ai.server.time_per_output_token` (seconds).
pub const TIME_PER_OUTPUT_TOKEN: &str = "gen_ai_server_time_per_output_token_seconds";
/// Tokens charged, by app, product and type (input | output).
pub const TOKENS_TOTAL: &str = "tollgate_llm_tokens_total";
/// Cost charged, by app, product and currency (see [`record_cost`]).
pub const COST_TOTAL: &str = "tollgate_llm_cost_total";

pub const L_OPERATION: &str = "gen_ai_operation_name";
pub const L_PROVIDER: &str = "gen_ai_provider_name";
pub const L_REQUEST_MODEL: &str = "gen_ai_request_model";
pub const L_RESPONSE_MODEL: &str = "gen_ai_response_model";
pub const L_TOKEN_TYPE: &str = "gen_ai_token_type";
pub const L_ERROR_TYPE: &str = "error_type";

/// Distinct values one label keeps before reporting [`OTHER`].
pub const LABEL_VALUES_CAP: usize = 100;
/// Longer label values are reported as [`OTHER`].
pub const LABEL_VALUE_MAX_BYTES: usize = 128;
/// The value standing for every value past the cap.
pub const OTHER: &str = "other";

/// The first [`LABEL_VALUES_CAP`] distinct values of one label.
#[derive(Debug, Default)]
pub struct LabelCap {
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    /// `v` when it is (or can become) one of the kept values, else [`OTHER`]. The empty
    /// value ("not known") is always kept.
    pub fn get<'a>(&self, v: &'a str) -> &'a str {
        if v.is_empty() {
            return v;
        }
        if v.len() > LABEL_VALUE_MAX_BYTES {
            return OTHER;
        }
        let mut seen = self.seen.lock();
        if seen.contains(v) {
            return v;
        }
        if seen.len() >= LABEL_VALUES_CAP {
            return OTHER;
        }
        seen.insert(v.to_owned());
        v
    }
}

pub struct GenAiMetrics {
    pub token_usage: HistogramVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub time_per_output_token: HistogramVec,
    pub tokens_total: IntCounterVec,
    pub cost_total: CounterVec,
    models: LabelCap,
    apps: LabelCap,
    products: LabelCap,
    currencies: LabelCap,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    METRICS
        .registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

const GEN_AI_LABELS: [&str; 5] = [
    L_OPERATION,
    L_PROVIDER,
    L_REQUEST_MODEL,
    L_RESPONSE_MODEL,
    L_ERROR_TYPE,
];

impl GenAiMetrics {
    fn new() -> Self {
        // Buckets as the OpenTelemetry semantic conventions advise.
        let mut token_labels = GEN_AI_LABELS.to_vec();
        token_labels.push(L_TOKEN_TYPE);
        let token_usage = histogram(
            TOKEN_USAGE,
            "gen_ai.client.token.usage: tokens used per LLM call, by type (input, output)",
            &token_labels,
            vec![
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                4194304.0, 16777216.0, 67108864.0,
            ],
        );
        let request_duration = histogram(
            REQUEST_DURATION,
            "gen_ai.server.request.duration: seconds from the request leaving for the model to the response's end",
            &GEN_AI_LABELS,
            vec![
                0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                81.92,
            ],
        );
        let time_to_first_token = histogram(
            TIME_TO_FIRST_TOKEN,
            "gen_ai.server.time_to_first_token: seconds to the first response chunk carrying generated text",
            &GEN_AI_LABELS,
            vec![
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0,
            ],
        );
        let time_per_output_token = histogram(
            TIME_PER_OUTPUT_TOKEN,
            "gen_ai.server.time_per_output_token: seconds per output token after the first, measured at the stream",
            &GEN_AI_LABELS,
            vec![
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ],
        );
        let tokens_total = IntCounterVec::new(
            Opts::new(
                TOKENS_TOTAL,
                "LLM tokens charged, by app, API product and type",
            ),
            &["app", "product", "type"],
        )
        .expect("valid metric");
        METRICS
            .registry
            .register(Box::new(tokens_total.clone()))
            .expect("unique metric");
        let cost_total = CounterVec::new(
            Opts::new(
                COST_TOTAL,
                "LLM cost charged, by app, API product and currency",
            ),
            &["app", "product", "currency"],
        )
        .expect("valid metric");
        METRICS
            .registry
            .register(Box::new(cost_total.clone()))
            .expect("unique metric");
        Self {
            token_usage,
            request_duration,
            time_to_first_token,
            time_per_output_token,
            tokens_total,
            cost_total,
            models: LabelCap::default(),
            apps: LabelCap::default(),
            products: LabelCap::default(),
            currencies: LabelCap::default(),
        }
    }

    /// A model name as a label value (bounded).
    pub fn model<'a>(&self, m: &'a str) -> &'a str {
        self.models.get(m)
    }

    /// The verified app and product of `ex` as label values (bounded; empty without one).
    pub fn app_product<'a>(&self, ex: &'a Exchange) -> (&'a str, &'a str) {
        match ex.state.app(None) {
            Some(v) => (
                self.apps.get(&v.app.name),
                self.products.get(&v.product.spec.name),
            ),
            None => ("", ""),
        }
    }
}

/// The process-wide LLM metrics (registered in [`METRICS`] on first use).
pub static GEN_AI: LazyLock<GenAiMetrics> = LazyLock::new(GenAiMetrics::new);

/// The attributes of one LLM call, as label values.
#[derive(Debug, Clone)]
pub struct CallLabels<'a> {
    pub operation: &'static str,
    pub provider: &'static str,
    pub request_model: &'a str,
    pub response_model: &'a str,
    /// Empty when the call succeeded.
    pub error_type: Cow<'a, str>,
}

impl CallLabels<'_> {
    fn values(&self) -> [&str; 5] {
        let m = &*GEN_AI;
        [
            self.operation,
            self.provider,
            m.model(self.request_model),
            m.model(self.response_model),
            &self.error_type,
        ]
    }
}

/// What one finished LLM call measured.
#[derive(Debug, Clone, Default)]
pub struct CallTimes {
    pub duration: f64,
    pub time_to_first_token: Option<f64>,
    pub time_per_output_token: Option<f64>,
}

/// Records one finished LLM call: the `gen_ai` histograms and the token counters of the
/// exchange's verified app and product.
pub fn record_call(
    ex: &Exchange,
    labels: &CallLabels<'_>,
    times: &CallTimes,
    input_tokens: u64,
    output_tokens: u64,
) {
    let m = &*GEN_AI;
    let v = labels.values();
    m.request_duration
        .with_label_values(&v)
        .observe(times.duration);
    if let Some(t) = times.time_to_first_token {
        m.time_to_first_token.with_label_values(&v).observe(t);
    }
    if let Some(t) = times.time_per_output_token {
        m.time_per_output_token.with_label_values(&v).observe(t);
    }
    let with_type = |t: &'static str| [v[0], v[1], v[2], v[3], v[4], t];
    m.token_usage
        .with_label_values(&with_type("input"))
        .observe(input_tokens as f64);
    m.token_usage
        .with_label_values(&with_type("output"))
        .observe(output_tokens as f64);
    let (app, product) = m.app_product(ex);
    m.tokens_total
        .with_label_values(&[app, product, "input"])
        .inc_by(input_tokens);
    m.tokens_total
        .with_label_values(&[app, product, "output"])
        .inc_by(output_tokens);
}

/// Adds `amount` (in `currency`, e.g. `USD`) to `tollgate_llm_cost_total` for the exchange's
/// verified app and product: for the cost-budget step, once it priced `ex.state.llm_usage`.
/// A negative or non-finite amount is ignored.
pub fn record_cost(ex: &Exchange, currency: &str, amount: f64) {
    if !amount.is_finite() || amount <= 0.0 {
        return;
    }
    let m = &*GEN_AI;
    let (app, product) = m.app_product(ex);
    let currency = m.currencies.get(currency);
    m.cost_total
        .with_label_values(&[app, product, currency])
        .inc_by(amount);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded() {
        let cap = LabelCap::default();
        for i in 0..LABEL_VALUES_CAP {
            let v = format!("m{i}");
            assert_eq!(cap.get(&v), v);
        }
        assert_eq!(cap.get("one-too-many"), OTHER);
        assert_eq!(cap.get("m3"), "m3", "kept values stay");
        assert_eq!(cap.get(""), "");
        assert_eq!(LabelCap::default().get(&"x".repeat(200)), OTHER);
    }

    #[test]
    fn metrics_render_with_their_names() {
        let ex = Exchange::default();
        record_call(
            &ex,
            &CallLabels {
                operation: "chat",
                provider: "openai",
                request_model: "gpt-test-render",
                response_model: "gpt-test-render-2025",
                error_type: Cow::Borrowed(""),
            },
            &CallTimes {
                duration: 0.5,
                time_to_first_token: Some(0.1),
                time_per_output_token: Some(0.01),
            },
            12,
            34,
        );
        record_cost(&ex, "USD", 0.25);
        let text = METRICS.render();
        for name in [
            TOKEN_USAGE,
            REQUEST_DURATION,
            TIME_TO_FIRST_TOKEN,
            TIME_PER_OUTPUT_TOKEN,
            TOKENS_TOTAL,
            COST_TOTAL,
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(text.contains(r#"gen_ai_request_model="gpt-test-render""#));
        assert!(text.contains(r#"gen_ai_token_type="output""#));
    }
}
