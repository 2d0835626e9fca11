//! The floor: a no-op ext_proc server, the cheapest possible answer to Envoy.
//!
//! Every message gets exactly one CONTINUE answer of the matching kind. When the first
//! message's `protocol_config` says FULL_DUPLEX_STREAMED for a direction, body chunks of that
//! direction are echoed back as `streamed_response` mutations instead.
//!
//!     cargo build --release --example floor && target/release/examples/floor --addr 127.0.0.1:9102

use std::net::SocketAddr;
use std::pin::Pin;

use clap::Parser;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation,
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
    processing_request::Request as Req,
    processing_response::Response as Resp,
    BodyMutation, BodyResponse, CommonResponse, HeadersResponse, HttpBody, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser)]
#[command(about = "No-op ext_proc server (benchmark floor)")]
struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:9102")]
    addr: SocketAddr,
}

fn common() -> Option<CommonResponse> {
    Some(CommonResponse::default()) // status CONTINUE, no mutations
}

fn body(b: HttpBody, duplex: bool) -> BodyResponse {
    if !duplex {
        return BodyResponse { response: common() };
    }
    let streamed = StreamedBodyResponse {
        body: b.body,
        end_of_stream: b.end_of_stream,
        ..Default::default()
    };
    let mutation = Some(BodyMutation {
        mutation: Some(Mutation::StreamedResponse(streamed)),
    });
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: mutation,
            ..Default::default()
        }),
    }
}

struct Floor;

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let duplex = BodySendMode::FullDuplexStreamed as i32;
        let (mut req_duplex, mut resp_duplex) = (false, false);
        let out = request.into_inner().filter_map(move |msg| {
            let answer = msg.map(|msg| {
                if let Some(pc) = &msg.protocol_config {
                    req_duplex = pc.request_body_mode == duplex;
                    resp_duplex = pc.response_body_mode == duplex;
                }
                let response = match msg.request? {
                    Req::RequestHeaders(_) => {
                        Resp::RequestHeaders(HeadersResponse { response: common() })
                    }
                    Req::ResponseHeaders(_) => {
                        Resp::ResponseHeaders(HeadersResponse { response: common() })
                    }
                    Req::RequestBody(b) => Resp::RequestBody(body(b, req_duplex)),
                    Req::ResponseBody(b) => Resp::ResponseBody(body(b, resp_duplex)),
                    Req::RequestTrailers(_) => Resp::RequestTrailers(TrailersResponse::default()),
                    Req::ResponseTrailers(_) => Resp::ResponseTrailers(TrailersResponse::default()),
                };
                Some(ProcessingResponse {
                    response: Some(response),
                    ..Default::default()
                })
            });
            // Ok(None): a message without a request (nothing to answer). Err: the peer went away.
            std::future::ready(answer.transpose())
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    eprintln!("floor: ext_proc listening on {}", args.addr);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(ExternalProcessorServer::new(Floor))
        .serve_with_shutdown(args.addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
