#!/usr/bin/env bash
# Instructions per ext_proc stream, counted by valgrind (callgrind), in tollgate and in the
# gRPC load generator, for each flow named. Unlike a rate on a shared machine, these counts
# repeat to about 1 % from run to run, so they show what a flow costs even when the
# machine's noise hides it (benches/grpc-compare.sh). Headers mix, loopback only.
#
#   benches/instructions.sh                     # empty verify-bare verify limits limits-full
#   benches/instructions.sh /empty /limits
#
# tollgate runs under callgrind; after a warm-up on every flow its counters are zeroed, the
# load generator runs DURATION seconds on one flow, and the counters are dumped. Then the
# load generator itself runs under callgrind against a second, native tollgate. Printed per
# flow: instructions per stream in each, their sum, and the sum's ratio to the first flow's
# (what the rate ratio would be if both processes were CPU-bound and every instruction cost
# the same). valgrind does not run SHA extensions, so the sha2 crate falls back to portable
# code there (about 3 000 instructions per 64-byte block, against a few hundred with the
# CPU's SHA instructions): flows that hash (VerifyApiKey's key digest, the counter keys of
# SpikeArrest and Quota) are over-counted here. Instruction counts also include the
# batching a flow's pace brings (a slower server reads more frames per wake-up).
# Environment: DURATION=5, CONCURRENCY=8. Needs valgrind (apt-get install valgrind).
set -euo pipefail
# The built-in embedder's model, for the semantic cache flow of benches/configs.
export TOLLGATE_EMBED_MODEL_DIR="${TOLLGATE_EMBED_MODEL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools/embed-model}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION="${DURATION:-5}"
CONCURRENCY="${CONCURRENCY:-8}"
FLOWS=("$@")
[ ${#FLOWS[@]} -gt 0 ] || FLOWS=(/empty /verify-bare /verify /limits /limits-full)
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }
BENCH_KEY=tg_bench_key_0000000000000000

cargo build --release --quiet --bin tollgate --example loadgen
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
read -r PORT ADMIN PORT2 ADMIN2 <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"

RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/tg.%p" "$BIN/tollgate" serve \
  --config benches/configs --store memory --grpc-addr "127.0.0.1:$PORT" --admin-addr "127.0.0.1:$ADMIN" \
  >/dev/null 2>"$WORK/valgrind.log" & TG=$!; PIDS+=($TG)
RUST_LOG=warn "$BIN/tollgate" serve --config benches/configs --store memory \
  --grpc-addr "127.0.0.1:$PORT2" --admin-addr "127.0.0.1:$ADMIN2" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && curl -sf "http://127.0.0.1:$ADMIN2/readyz" >/dev/null && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { echo "tollgate under valgrind did not start" >&2; exit 1; }

load() { # ADDR FLOW SECONDS -> loadgen JSON; fails on anything but passed streams
  local out
  out=$("$BIN/examples/loadgen" --addr "http://127.0.0.1:$1" --path "$2/v1/chat/completions" \
    --header "x-api-key:$BENCH_KEY" --duration "$3" --warmup 0 --concurrency "$CONCURRENCY" --connections 2 --json)
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["completed"] and not (d["immediate"] or d["errors"] or d["mismatches"] or d["timeouts"]) else f"unexpected outcomes: {d}")' "$out"
  echo "$out"
}
# Total instructions in a callgrind dump.
counts() { grep -E '^(summary|totals):' "$1" | head -1 | awk '{print $2}'; }

for f in "${FLOWS[@]}"; do load "$PORT" "$f" 2 >/dev/null; done # first-use work out of the counts
ROWS=()
for f in "${FLOWS[@]}"; do
  callgrind_control -z "$TG" >/dev/null 2>&1
  n=$(load "$PORT" "$f" "$DURATION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["completed"])')
  callgrind_control -d "$TG" >/dev/null 2>&1
  sleep 0.5
  ti=$(counts "$(ls -t "$WORK"/tg."$TG"* | head -1)")
  valgrind --tool=callgrind --callgrind-out-file="$WORK/lg.out" "$BIN/examples/loadgen" \
    --addr "http://127.0.0.1:$PORT2" --path "$f/v1/chat/completions" --header "x-api-key:$BENCH_KEY" \
    --duration "$DURATION" --warmup 0 --concurrency "$CONCURRENCY" --connections 2 --json >"$WORK/lg.json" 2>/dev/null
  ln=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["completed"])' "$WORK/lg.json")
  li=$(counts "$WORK/lg.out")
  ROWS+=("$f $n $ti $ln $li")
done
printf '%s\n' "${ROWS[@]}" | python3 -c '
import sys
rows = [l.split() for l in sys.stdin]
base = None
print("%-13s %10s %10s %8s %7s" % ("flow", "tollgate", "loadgen", "sum", "ratio"))
for f, n, ti, ln, li in rows:
    tg, lg = int(ti) / int(n), int(li) / int(ln)
    base = base or tg + lg
    print("%-13s %10.0f %10.0f %8.0f %7.3f" % (f, tg, lg, tg + lg, base / (tg + lg)))
print("instructions per stream; ratio = first flow / this flow")
'
