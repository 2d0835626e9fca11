//! tollgate's ext_proc server with one more policy type, `NoopChunk`: a response step whose
//! chunk hook asks for whole server-sent events and passes each on untouched. No built-in
//! policy type uses chunk hooks yet; this measures what the hook path costs a stream.
//!
//!     cargo build --release --example hooked --example floor --example loadgen
//!     target/release/examples/floor --addr 127.0.0.1:9102 &
//!     target/release/examples/hooked --addr 127.0.0.1:9103 &            # NoopChunk flow
//!     target/release/examples/hooked --addr 127.0.0.1:9104 --no-hook &  # empty flow
//!     for a in 9102 9103 9104; do target/release/examples/loadgen --addr http://127.0.0.1:$a \
//!         --mix sse --sse-chunks 200 --concurrency 1 --connections 1 --duration 5; done
//!
//! Time to last chunk is the stream latency loadgen reports (the last chunk's answer ends
//! the stream); the issue's bar: the NoopChunk flow at most 5% above the floor.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use tollgate::config::reload::{ConfigManager, ConfigSource};
use tollgate::pipeline::{Chunk, ChunkAction, ChunkSpec, Hooks, Policy};
use tollgate::policies::{BuildContext, SpecError};
use tollgate::server::{NoMatch, Processor, Shared};
use tollgate::vars::Exchange;

// As in the `tollgate` binary.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(about = "tollgate with a no-op chunk-hook policy (benchmark)")]
struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:9103")]
    addr: SocketAddr,
    /// Serve an empty flow instead (tollgate's own cost without the hook).
    #[arg(long)]
    no_hook: bool,
}

#[derive(Debug)]
struct NoopChunk;

impl Policy for NoopChunk {
    fn type_name(&self) -> &'static str {
        "NoopChunk"
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            response_chunks: Some(ChunkSpec::events(0)),
            ..Hooks::default()
        }
    }

    fn response_chunk(&self, _ex: &mut Exchange, _chunk: &mut Chunk) -> ChunkAction {
        ChunkAction::Pass
    }
}

fn build(_ctx: &BuildContext, _spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    Ok(Arc::new(NoopChunk))
}

const HOOKED: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: noop}
spec: {type: NoopChunk}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: hooked}
spec:
  default: true
  response: [{policy: noop}]
"#;

const EMPTY: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: empty}
spec:
  default: true
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tollgate::policies::register("NoopChunk", build);
    let dir = tempfile::tempdir()?;
    let config = if args.no_hook { EMPTY } else { HOOKED };
    std::fs::write(dir.path().join("flows.yaml"), config)?;
    let cm = ConfigManager::load(ConfigSource::Dir(dir.path().to_path_buf()))
        .map_err(|e| format!("config: {e}"))?;
    let svc = Processor::new(Shared::new(cm, NoMatch::Continue)).into_service(4 * 1024 * 1024);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await?;
    Ok(())
}
