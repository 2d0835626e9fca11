//! Optional trace export over OTLP/gRPC (`--otlp-endpoint`): one span per exchange, a child
//! of the trace the gateway started (W3C `traceparent` / `tracestate` in the request
//! headers; Envoy's `x-request-id` as an attribute), and a child span per step that waited
//! (a store, a callout, a guard). Sampling is parent-based: a sampled parent is always
//! followed; a new trace is sampled at `--trace-sample-ratio` (1 % by default). An exchange
//! that is not sampled creates no span objects beyond the sampler's decision, so tracing at
//! its defaults stays off the hot path.

use std::borrow::Cow;
use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::vars::Headers;

/// Why trace export could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--trace-sample-ratio must be between 0 and 1, not {0}")]
    Ratio(f64),
    #[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("trace export is already set up in this process")]
    AlreadySet,
}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Flushes and stops the exporter when dropped (at the end of `serve`), so the spans of the
/// last exchanges are sent before the process exits.
pub struct TraceGuard(SdkTracerProvider);

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

/// Starts exporting to `endpoint` (`http://collector:4317`). Must run inside the Tokio
/// runtime: the gRPC exporter uses it. The service name is `OTEL_SERVICE_NAME` or `tollgate`.
pub fn init(endpoint: &str, ratio: f64) -> Result<TraceGuard, TraceError> {
    use opentelemetry_otlp::WithExportConfig;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(TraceError::Ratio(ratio));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TraceError::Exporter {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "tollgate".to_owned());
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build();
    use opentelemetry::trace::TracerProvider as _;
    let tracer = provider.tracer("tollgate");
    TRACER.set(tracer).map_err(|_| TraceError::AlreadySet)?;
    tracing::info!(endpoint, ratio, "exporting traces over OTLP");
    Ok(TraceGuard(provider))
}

/// Whether trace export is on in this process.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n).collect()
    }
}

/// The exchange's span, when this exchange is traced (sampled, export on).
#[derive(Debug, Default)]
pub struct ExchangeTrace(Option<Context>);

/// A step's span; ends when [`StepSpan::end`] is called or it drops.
pub struct StepSpan(Option<opentelemetry_sdk::trace::Span>);

/// The exchange's trace context, held while a step borrows the exchange.
#[derive(Debug, Clone)]
pub struct TraceHandle(Context);

impl TraceHandle {
    /// A child span for a step that waits.
    pub fn step(&self, policy: &str, policy_type: &str) -> StepSpan {
        let Some(tracer) = TRACER.get() else {
            return StepSpan(None);
        };
        let span = tracer
            .span_builder(Cow::Owned(format!("policy {policy}")))
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new("tollgate.policy", policy.to_owned()),
                KeyValue::new("tollgate.policy.type", policy_type.to_owned()),
            ])
            .start_with_context(tracer, &self.0);
        StepSpan(Some(span))
    }
}

impl ExchangeTrace {
    /// Starts the exchange's span under the trace in `headers`, or none when export is off
    /// or the sampler says no.
    pub fn start(headers: &Headers, flow: &str, method: &str, path: &str) -> Self {
        let Some(tracer) = TRACER.get() else {
            return Self(None);
        };
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let mut attrs = vec![
            KeyValue::new("tollgate.flow", flow.to_owned()),
            KeyValue::new("http.request.method", method.to_owned()),
            // The path without the query: queries may carry keys.
            KeyValue::new(
                "url.path",
                path.split('?').next().unwrap_or_default().to_owned(),
            ),
        ];
        if let Some(id) = headers.get("x-request-id") {
            attrs.push(KeyValue::new(
                "http.request.header.x-request-id",
                id.to_owned(),
            ));
        }
        let span = tracer
            .span_builder(Cow::Owned(format!("ext_proc {flow}")))
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(tracer, &parent);
        if !span.span_context().is_sampled() {
            return Self(None);
        }
        Self(Some(parent.with_span(span)))
    }

    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// A handle to start step spans with while the exchange is lent to a step, when the
    /// exchange is traced (a cheap clone of the span's context); `None` costs nothing.
    pub fn handle(&self) -> Option<TraceHandle> {
        self.0.clone().map(TraceHandle)
    }

    /// Records an answer tollgate gave in place of the upstream.
    pub fn answered(&self, status: u16, code: &str) {
        if let Some(cx) = &self.0 {
            let span = cx.span();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            span.set_attribute(KeyValue::new("tollgate.answer", code.to_owned()));
        }
    }

    /// Records a rejection: the status, the deciding policy and its fault code.
    pub fn rejected(&self, status: u16, policy: &str, code: &str) {
        if let Some(cx) = &self.0 {
            let span = cx.span();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            span.set_attribute(KeyValue::new("tollgate.policy", policy.to_owned()));
            span.set_attribute(KeyValue::new("tollgate.fault", code.to_owned()));
        }
    }

    /// Adds an attribute to the exchange's span (the verified app, the deciding policy).
    pub fn attribute(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }

    /// Ends the exchange's span: `status` is the HTTP status the client got when known,
    /// `error` names what ended it badly (a rejection code, an abort, a stream error).
    pub fn end(&mut self, status: Option<u16>, outcome: &str, error: Option<&str>) {
        let Some(cx) = self.0.take() else { return };
        let span = cx.span();
        if let Some(s) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        span.set_attribute(KeyValue::new("tollgate.outcome", outcome.to_owned()));
        if let Some(e) = error {
            span.set_attribute(KeyValue::new("error.type", e.to_owned()));
            span.set_status(Status::error(e.to_owned()));
        }
        span.end();
    }
}

impl StepSpan {
    /// Ends the span, marked as an error with `error` (the fault code) when the step
    /// rejected.
    pub fn end(mut self, error: Option<&str>) {
        if let Some(mut s) = self.0.take() {
            if let Some(e) = error {
                s.set_attribute(KeyValue::new("error.type", e.to_owned()));
                s.set_status(Status::error(e.to_owned()));
            }
            s.end();
        }
    }
}

impl Drop for StepSpan {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            s.end();
        }
    }
}

impl Drop for ExchangeTrace {
    fn drop(&mut self) {
        if self.0.is_some() {
            self.end(None, "dropped", None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_costs_nothing() {
        // No exporter in unit tests: no span, and the step spans are inert.
        let mut h = Headers::new();
        h.push(
            "traceparent".into(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        );
        let mut t = ExchangeTrace::start(&h, "f", "GET", "/x?key=secret");
        assert!(!t.is_recording());
        assert!(t.handle().is_none());
        t.end(Some(200), "continue", None);
    }

    #[test]
    fn ratio_out_of_range_is_refused() {
        assert!(matches!(
            init("http://127.0.0.1:1", 1.5),
            Err(TraceError::Ratio(_))
        ));
    }
}
