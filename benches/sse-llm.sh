#!/usr/bin/env bash
# Issue 14's streaming bar: a 200-chunk SSE response through a token-counting flow adds at
# most 5 % to the floor's time to last chunk. One stream at a time (concurrency 1), so the
# figure is latency, not throughput; rounds interleave the targets so noise hits them alike.
#   floor       benches/floor.rs (an ext_proc server that answers every message at once)
#   empty       tollgate, a flow with no steps (its own floor)
#   llm-usage   the /llm flow (LLM tracker), the upstream sends a usage chunk
#   llm-count   the same flow, no usage chunk: the streamed text is counted at the end
#   guard       SanitizeResponse with every local detector (issue 15: at most +10 %); only
#               with PIPELINED=1, as a stream guard holds bytes back across chunks
# Prints p50 time to last chunk per target (median of the rounds' p50s) and ratios to floor.
# PIPELINED=1: the client sends all chunks without waiting for each answer (loadgen
# --sse-pipelined), so the figure is how fast one stream's chunks get through, not the
# per-chunk round trip; default targets then floor, empty, llm-usage and guard.
# INTERVAL_MS=N (with PIPELINED=1): chunks N ms apart, as a model streams; the report then
# also gives the time to the first answered body bytes (time to first token) per target.
# Environment: ROUNDS=3, DURATION=3, CHUNKS=200, NO_BUILD=1 (use target/release as it is).
set -euo pipefail
# The built-in embedder's model, for the semantic cache flow of benches/configs.
export TOLLGATE_EMBED_MODEL_DIR="${TOLLGATE_EMBED_MODEL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools/embed-model}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${ROUNDS:-3}"; DURATION="${DURATION:-3}"; CHUNKS="${CHUNKS:-200}"
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet --bin tollgate --example floor --example loadgen
BIN=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FLOOR_PORT=$(free_port); TG_PORT=$(free_port); TG_ADMIN=$(free_port)
PIDS=(); CONF=$(mktemp -d)
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$CONF"; }
trap cleanup EXIT
cp benches/configs/*.yaml "$CONF/"
"$BIN/examples/floor" --addr "127.0.0.1:$FLOOR_PORT" >/dev/null 2>&1 & PIDS+=($!)
RUST_LOG=warn "$BIN/tollgate" serve --config "$CONF" --store memory --grpc-addr "127.0.0.1:$TG_PORT" \
  --admin-addr "127.0.0.1:$TG_ADMIN" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null || { echo "tollgate did not start" >&2; exit 1; }
declare -A ADDR=([floor]=$FLOOR_PORT [empty]=$TG_PORT [llm-usage]=$TG_PORT [llm-count]=$TG_PORT [guard]=$TG_PORT)
declare -A PATHS=([floor]=/llm/v1/chat/completions [empty]=/empty/v1/chat/completions
  [llm-usage]=/llm/v1/chat/completions [llm-count]=/llm/v1/chat/completions
  [guard]=/guard/v1/chat/completions)
declare -A EXTRA=([floor]=--sse-usage [empty]=--sse-usage [llm-usage]=--sse-usage [llm-count]= [guard]=--sse-usage)
if [ "${PIPELINED:-0}" = 1 ]; then
  MODE="--sse-pipelined --sse-interval-ms ${INTERVAL_MS:-0}"; TARGETS="${TARGETS:-floor empty llm-usage guard}"
else
  MODE=; TARGETS="${TARGETS:-floor empty llm-usage llm-count}"
fi
declare -A P50S TTFB
for r in $(seq "$ROUNDS"); do
  for t in $TARGETS; do
    out=$("$BIN/examples/loadgen" --addr "http://127.0.0.1:${ADDR[$t]}" --path "${PATHS[$t]}" --mix sse \
      --sse-chunks "$CHUNKS" --sse-request-body ${EXTRA[$t]} $MODE --concurrency 1 --connections 1 \
      --duration "$DURATION" --warmup 1 --json |
      python3 -c 'import json,sys; d=json.load(sys.stdin); assert not (d["errors"] or d["mismatches"] or d["timeouts"]), d; print(d["p50_us"], d["ttfb_p50_us"])')
    P50S[$t]="${P50S[$t]:-} ${out% *}"; TTFB[$t]="${TTFB[$t]:-} ${out#* }"
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
FLOOR=$(echo "${P50S[floor]:-}" | median); FLOOR_FB=$(echo "${TTFB[floor]:-}" | median)
for t in $TARGETS; do
  m=$(echo "${P50S[$t]}" | median); fb=$(echo "${TTFB[$t]}" | median)
  awk -v t="$t" -v m="$m" -v f="${FLOOR:-0}" -v all="${P50S[$t]}" -v fb="$fb" -v ff="${FLOOR_FB:-0}" 'BEGIN {
    printf "target=%-10s p50 to last chunk=%8.2f ms", t, m/1000;
    if (f > 0) printf "  vs floor=%+6.1f%%", (m/f - 1) * 100;
    if (fb > 0) printf "  first body=%7.3f ms", fb/1000;
    printf "   (rounds:%s us)\n", all }'
done
