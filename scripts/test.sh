#!/usr/bin/env bash
# Everything CI checks: installs what the tests need when missing (Envoy 1.40, wrk, h2load,
# redis-server), then format, lints, and every test (unit, gRPC stream, lifecycle, and the
# end-to-end tests through a real Envoy).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== tollgate validate policies/ benches/configs/"
cargo run --quiet --locked -- validate policies
cargo run --quiet --locked -- validate benches/configs
echo "== cargo test"
cargo test --all-targets --locked
