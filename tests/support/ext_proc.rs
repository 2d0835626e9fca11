//! ext_proc messages and one-shot exchanges, as Envoy sends them: for tests that talk to
//! tollgate's gRPC port directly (no Envoy in between).

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient, processing_request::Request,
    processing_response::Response, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use tonic::transport::Channel;

/// A header as Envoy sends it (the value in `raw_value`).
pub fn hv(k: &str, v: impl AsRef<[u8]>) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_ref().to_vec(),
    }
}

/// Request headers, in the order given (pseudo-headers included).
pub fn request_headers(headers: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    headers_msg(false, headers, end_of_stream)
}

/// Response headers, in the order given (`:status` included).
pub fn response_headers(headers: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    headers_msg(true, headers, end_of_stream)
}

fn headers_msg(response: bool, headers: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    let h = HttpHeaders {
        headers: Some(HeaderMap {
            headers: headers.iter().map(|(k, v)| hv(k, v)).collect(),
        }),
        end_of_stream,
        ..Default::default()
    };
    ProcessingRequest {
        request: Some(if response {
            Request::ResponseHeaders(h)
        } else {
            Request::RequestHeaders(h)
        }),
        ..Default::default()
    }
}

/// A request (`response` false) or response body chunk.
pub fn body(response: bool, b: &[u8], end_of_stream: bool) -> ProcessingRequest {
    let b = HttpBody {
        body: b.to_vec(),
        end_of_stream,
        ..Default::default()
    };
    ProcessingRequest {
        request: Some(if response {
            Request::ResponseBody(b)
        } else {
            Request::RequestBody(b)
        }),
        ..Default::default()
    }
}

/// A client of tollgate's ext_proc service at `addr` (`host:port`).
pub async fn connect(addr: impl std::fmt::Display) -> ExternalProcessorClient<Channel> {
    ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Sends `msg` as the whole of a new stream and returns the first answer.
pub async fn ask_once(
    client: &ExternalProcessorClient<Channel>,
    msg: ProcessingRequest,
) -> ProcessingResponse {
    let mut answers = client
        .clone()
        .process(tokio_stream::iter(vec![msg]))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap()
}

/// The HTTP status an answer to request headers stands for: 200 when tollgate lets the
/// request on, otherwise the status of its immediate answer.
pub fn status_of(r: ProcessingResponse) -> u32 {
    match r.response {
        Some(Response::RequestHeaders(_)) => 200,
        Some(Response::ImmediateResponse(i)) => i.status.map_or(0, |s| s.code as u32),
        other => panic!("unexpected answer {other:?}"),
    }
}
