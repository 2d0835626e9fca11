#!/usr/bin/env bash
# What traces (sampled at their default 1 %) and analytics records (every exchange, to a
# file) cost: two tollgate processes on the same configuration, one with
# `--otlp-endpoint` (a local OTLP receiver that accepts and drops spans) and `--analytics`,
# one without; the load generator runs against each in turn (interleaved rounds) on a flow
# with a verified app (so usage is charged too) and prints the medians and the ratio of the
# rates. Metrics and the usage ledger are on in both (they have no off switch). Loopback only.
#
#   benches/observability-cost.sh
# Environment: DURATION=5 ROUNDS=3 MIX=headers CONCURRENCY=32 CONNECTIONS=2,
#              ANALYTICS_SAMPLE_RATIO (default: tollgate's default), TRACES=0 (analytics only)
set -euo pipefail
# The built-in embedder's model, for the semantic cache flow of benches/configs.
export TOLLGATE_EMBED_MODEL_DIR="${TOLLGATE_EMBED_MODEL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools/embed-model}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
MIX="${MIX:-headers}"
CONCURRENCY="${CONCURRENCY:-32}"
CONNECTIONS="${CONNECTIONS:-2}"
BENCH_KEY=tg_bench_key_0000000000000000
BIN="${BIN:-target/release}"
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --bin tollgate --example loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=(); TMP=$(mktemp -d)
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

# An OTLP/gRPC receiver that accepts every export (plain HTTP/2 listener answering gRPC OK
# would need a gRPC server: the exporter only needs the connection to succeed or fail fast,
# so a closed port is the cheapest honest stand-in: export fails in the background batch
# thread, off the request path, exactly where a slow collector would cost).
OTLP_PORT=$(free_port)

start() { # name extra-args... -> "pid port"
  local name=$1 port admin; shift
  port=$(free_port); admin=$(free_port)
  RUST_LOG=error "$BIN/tollgate" serve --config benches/configs --store memory \
    --grpc-addr "127.0.0.1:$port" --admin-addr "127.0.0.1:$admin" "$@" >"$TMP/$name.log" 2>&1 &
  local pid=$!; PIDS+=($pid)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "tollgate ($name) did not start" >&2; exit 1; }
  echo "$pid $port"
}
read -r OFF_PID OFF_PORT < <(start off)
ON_ARGS=(--analytics "$TMP/analytics.jsonl")
[ "${TRACES:-1}" = 0 ] || ON_ARGS+=(--otlp-endpoint "http://127.0.0.1:$OTLP_PORT")
[ -z "${ANALYTICS_SAMPLE_RATIO:-}" ] || ON_ARGS+=(--analytics-sample-ratio "$ANALYTICS_SAMPLE_RATIO")
read -r ON_PID ON_PORT < <(start on "${ON_ARGS[@]}")

rate() { # port -> streams/s
  "$BIN/examples/loadgen" --addr "http://127.0.0.1:$1" --path /verify/v1/chat/completions \
    --header "x-api-key:$BENCH_KEY" --mix "$MIX" --duration "$DURATION" --warmup 1 \
    --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); assert not (d["errors"] or d["immediate"] or d["timeouts"]), d; print(d["rate"])'
}
OFF=(); ON=()
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then OFF+=("$(rate "$OFF_PORT")"); ON+=("$(rate "$ON_PORT")")
  else ON+=("$(rate "$ON_PORT")"); OFF+=("$(rate "$OFF_PORT")"); fi
done
python3 - "${OFF[*]}" "${ON[*]}" "$(wc -l <"$TMP/analytics.jsonl")" <<'PY'
import statistics, sys
off = [float(x) for x in sys.argv[1].split()]
on = [float(x) for x in sys.argv[2].split()]
pairs = [b / a for a, b in zip(off, on)]
print(f"off (metrics, usage):            {statistics.median(off):9.0f} streams/s  {off}")
print(f"on (+ traces 1 %, analytics):    {statistics.median(on):9.0f} streams/s  {on}")
print(f"ratio on/off: medians {statistics.median(on)/statistics.median(off):.3f}, paired rounds median {statistics.median(pairs):.3f} {[round(p,3) for p in pairs]}")
print(f"analytics records written: {sys.argv[3]}")
PY
