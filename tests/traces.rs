//! Trace export over OTLP/gRPC, received by a local collector the test runs (the
//! collector's gRPC service from the `opentelemetry-proto` crate): the exchange's span
//! continues the gateway's `traceparent`, carries the flow, `x-request-id`, the status and
//! the deciding policy; a step that waited (a callout) has a child span; sampling follows an
//! unsampled parent.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;

mod support;

use support::{eventually, ext_proc, free_port, serve_command, within, ServeProcess, Upstream};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            Some(AnyValue::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn config(callout: std::net::SocketAddr) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: authz}}
spec:
  type: ServiceCallout
  request: {{url: "http://{callout}/authz"}}
  timeoutMs: 2000
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{name: deny}}
spec: {{type: RaiseFault, status: 403, errorCode: access.Denied, message: denied}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {{name: api}}
spec:
  default: true
  request:
    - {{policy: deny, condition: "request.path.startsWith('/deny')"}}
    - {{policy: authz}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_export_spans_that_continue_the_gateways_trace() {
    let collector = Collector::default();
    let otlp = free_port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve(([127, 0, 0, 1], otlp).into()),
    );
    let callout = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let mut c = serve_command(dir.path(), &config(callout.addr), grpc, admin);
    c.args(["--otlp-endpoint", &format!("http://127.0.0.1:{otlp}")])
        .args(["--trace-sample-ratio", "1"])
        // Export within 100 ms instead of the default 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let p = tokio::task::spawn_blocking(move || ServeProcess::ready(&mut c, dir, grpc, admin))
        .await
        .unwrap();
    let client = ext_proc::connect(format!("127.0.0.1:{grpc}")).await;

    // 1. A whole exchange under the gateway's sampled trace: request, then response.
    let msgs = vec![
        ext_proc::request_headers(
            &[
                (":method", "GET"),
                (":path", "/v1/things?key=secret"),
                ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
                ("x-request-id", "req-1"),
            ],
            true,
        ),
        ext_proc::response_headers(&[(":status", "200")], true),
    ];
    let mut answers = client
        .clone()
        .process(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    within(Duration::from_secs(10), async {
        assert!(answers.message().await.unwrap().is_some());
        assert!(answers.message().await.unwrap().is_some());
    })
    .await;
    drop(answers);

    // 2. The gateway's trace is not sampled: tollgate follows it, even at ratio 1.
    let answer = ext_proc::ask_once(
        &client,
        ext_proc::request_headers(
            &[
                (":method", "GET"),
                (":path", "/deny"),
                ("traceparent", &format!("00-{UNSAMPLED_TRACE}-{PARENT}-00")),
            ],
            true,
        ),
    )
    .await;
    assert_eq!(ext_proc::status_of(answer), 403);

    // 3. No trace from the gateway: a new root trace, sampled at ratio 1.
    let answer = ext_proc::ask_once(
        &client,
        ext_proc::request_headers(&[(":method", "GET"), (":path", "/deny/x")], true),
    )
    .await;
    assert_eq!(ext_proc::status_of(answer), 403);

    let spans = eventually(Duration::from_secs(20), "three spans exported", || {
        let spans = collector.spans.lock().clone();
        async move { (spans.len() >= 3).then_some(spans) }
    })
    .await;

    let exchange = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| hex(&s.trace_id) == TRACE && s.name == "ext_proc api")
        .unwrap_or_else(|| panic!("no exchange span in trace {TRACE}: {spans:#?}"));
    assert_eq!(
        hex(&exchange.parent_span_id),
        PARENT,
        "child of the gateway's span"
    );
    assert_eq!(attr(exchange, "tollgate.flow").as_deref(), Some("api"));
    assert_eq!(
        attr(exchange, "http.request.header.x-request-id").as_deref(),
        Some("req-1")
    );
    // The query (which may carry a key) is not recorded.
    assert_eq!(attr(exchange, "url.path").as_deref(), Some("/v1/things"));
    assert_eq!(
        attr(exchange, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(exchange, "tollgate.outcome").as_deref(),
        Some("completed")
    );

    let step = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "policy authz")
        .unwrap_or_else(|| panic!("no span for the callout step: {spans:#?}"));
    assert_eq!(hex(&step.trace_id), TRACE);
    assert_eq!(
        step.parent_span_id, exchange.span_id,
        "child of the exchange"
    );
    assert_eq!(
        attr(step, "tollgate.policy.type").as_deref(),
        Some("ServiceCallout")
    );

    assert!(
        spans
            .iter()
            .all(|(_, s)| hex(&s.trace_id) != UNSAMPLED_TRACE),
        "a span was exported under an unsampled parent"
    );

    let denied = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| attr(s, "tollgate.fault").as_deref() == Some("access.Denied"))
        .unwrap_or_else(|| panic!("no span for the rejected exchange: {spans:#?}"));
    assert!(denied.parent_span_id.is_empty(), "a new root trace");
    assert_eq!(attr(denied, "tollgate.policy").as_deref(), Some("deny"));
    assert_eq!(
        attr(denied, "http.response.status_code").as_deref(),
        Some("403")
    );
    assert!(spans.iter().all(|(service, _)| service == "tollgate"));

    drop(p);
    server.abort();
}
