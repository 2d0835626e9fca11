//! Policy fixtures for tests that build one policy from its YAML and run it on an exchange
//! in this process (no server).

use std::sync::Arc;

use tollgate::fault::Fault;
use tollgate::pipeline::{Direction, Hook, Policy};
use tollgate::policies::{builder, BuildContext, SpecError};
use tollgate::vars::Exchange;

/// Builds a policy of type `kind` (as registered) from its YAML `spec`.
pub fn build(kind: &str, ctx: &BuildContext, spec: &str) -> Result<Arc<dyn Policy>, SpecError> {
    let build = builder(kind).unwrap_or_else(|| panic!("no policy type {kind}"));
    build(ctx, serde_norway::from_str(spec).expect("spec is YAML"))
}

/// Runs `p` on the request side, waiting for it when it is pending.
pub async fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
    run_in(p, ex, Direction::Request).await
}

/// Runs `p` in direction `dir`, waiting for it when it is pending.
pub async fn run_in(p: &Arc<dyn Policy>, ex: &mut Exchange, dir: Direction) -> Result<(), Fault> {
    match p.run(ex, dir) {
        Hook::Ready(o) => o
            .into_result()
            .map(|a| assert!(a.is_none(), "unexpected answer")),
        Hook::Pending(f) => f
            .await
            .into_result()
            .map(|a| assert!(a.is_none(), "unexpected answer")),
    }
}
