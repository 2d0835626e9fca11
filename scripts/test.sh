#!/usr/bin/env bash
# Everything CI checks: installs what the tests need when missing (Envoy 1.40, wrk, h2load,
# redis-server, cargo-deny), then format, lints, the dependency policy (deny.toml) and every
# test (unit, gRPC stream, lifecycle, and the end-to-end tests through a real Envoy).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# One build of everything: incremental state would only cost disk (gigabytes on a clean clone).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

bash scripts/setup.sh
# The built-in embedder's model for `validate` and the tests (SemanticCache, ModelRouter).
export TOLLGATE_EMBED_MODEL_DIR="${TOLLGATE_EMBED_MODEL_DIR:-$ROOT/.tools/embed-model}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
bash scripts/deny.sh
echo "== tollgate validate policies/ benches/configs/"
cargo run --quiet --locked -- validate policies
cargo run --quiet --locked -- validate benches/configs
echo "== fuzz smoke (every cargo fuzz target over its corpus, regressions and seeded mutations; bounded)"
cargo test --locked --test fuzz_smoke
echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --all-targets --locked --no-fail-fast 2>&1 | tee "$log"
# One closing line for the whole run (the last target cargo runs has no tests of its own).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
