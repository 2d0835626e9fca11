#!/usr/bin/env bash
# The gRPC load generator straight at the ext_proc port: the floor (a no-op ext_proc server)
# against tollgate with an empty flow and with a three-AssignMessage + condition flow, runs
# interleaved, medians and ratios printed. Also tollgate's idle RSS. Loopback only.
#
#   benches/grpc-compare.sh
# Environment: DURATION=5 (seconds per run), ROUNDS=3, MIX="headers body sse",
#              CONCURRENCY=32, CONNECTIONS=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
MIX="${MIX:-headers body sse}"
CONCURRENCY="${CONCURRENCY:-32}"
CONNECTIONS="${CONNECTIONS:-2}"

cargo build --release --quiet --bin tollgate --example floor --example loadgen
BIN=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FLOOR_PORT=$(free_port); TG_PORT=$(free_port); TG_ADMIN=$(free_port)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/examples/floor" --addr "127.0.0.1:$FLOOR_PORT" >/dev/null 2>&1 & PIDS+=($!)
RUST_LOG=warn "$BIN/tollgate" serve --config benches/configs --store memory --grpc-addr "127.0.0.1:$TG_PORT" \
  --admin-addr "127.0.0.1:$TG_ADMIN" >/dev/null 2>&1 & TG_PID=$!; PIDS+=($TG_PID)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null || { echo "tollgate did not start" >&2; exit 1; }
sleep 1
echo "tollgate idle RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$TG_PID/status)"

run() { # addr path mix -> "rate p99"
  "$BIN/examples/loadgen" --addr "http://127.0.0.1:$1" --path "$2" --mix "$3" \
    --duration "$DURATION" --warmup 1 --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" --json |
    python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["rate"], d["p99_us"])'
}
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

for mix in $MIX; do
  declare -A R=() P=()
  for round in $(seq "$ROUNDS"); do
    for t in floor empty three; do
      case $t in
        floor) out=$(run "$FLOOR_PORT" /v1/chat/completions "$mix") ;;
        empty) out=$(run "$TG_PORT" /empty/v1/chat/completions "$mix") ;;
        three) out=$(run "$TG_PORT" /three/v1/chat/completions "$mix") ;;
      esac
      R[$t]+="${out%% *} "; P[$t]+="${out##* } "
    done
  done
  fr=$(median ${R[floor]}); fp=$(median ${P[floor]})
  for t in floor empty three; do
    r=$(median ${R[$t]}); p=$(median ${P[$t]})
    python3 -c "print(f'mix=$mix target=$t rate={$r:9.0f}/s p99={$p/1000:7.2f}ms  rate/floor={$r/$fr:5.2f}  p99/floor={$p/$fp:5.2f}')"
  done
  unset R P
done
echo "tollgate RSS after load: $(awk '/VmRSS/ {print $2, $3}' /proc/$TG_PID/status)"
