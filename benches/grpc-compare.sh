#!/usr/bin/env bash
# The gRPC load generator straight at the ext_proc port: the floor (a no-op ext_proc server)
# against tollgate with an empty flow, a three-AssignMessage + condition flow, a
# VerifyApiKey flow (a valid key, so every stream must pass: an immediate answer fails the
# run), a one-step JavaScript flow and a VerifyJwt flow (RS256, JWKS served by
# benches/jwks_fixture.rs and cached), runs interleaved, medians and ratios (to the floor;
# verify, js and jwt also to the empty flow)
# printed, with the server's CPU time per stream (steadier than the rate on a busy machine).
# Target `cache`: a ResponseCache flow whose entry the first stream stores; every later
# stream is a hit answered at request headers (there an immediate answer is required, and
# its ratios to the empty flow are printed). Also tollgate's idle RSS. Loopback only.
#
# Target `verify-bare`: VerifyApiKey alone, without `verify`'s key stripping and identity
# headers (so, like the empty flow, its answers carry no header mutation).
# Target `jwt-fresh`: the /jwt flow, but every stream brings a token the verifier has not seen
# (jwks_fixture signs 20000 distinct tokens, more than VerifyJwt's verified-token cache
# holds, cycled by the load generator): a full RS256 signature check per stream.
# Target `oas` (body mix only): OasValidation of the load generator's 2 KB chat-completion
# body against the public OpenAI description (OAS_SPEC, default
# ../shared/data/openai-openapi-3.1.yaml, read in place, never copied into the repository),
# compared with the empty flow, which is sent the same buffered body.
#
# Traffic limits (issue 4): `limits` is VerifyApiKey + SpikeArrest + Quota, each with its
# defaults, on the main tollgate (in-memory counters); `limits-sync` and `limits-async` are
# the same flow on two more tollgate processes counting quotas in a local redis-server
# (--counters redis, --counter-sync sync|async). Each is also printed as a ratio to the empty
# flow; targets: memory >= 0.90, Redis sync >= 0.50, Redis async >= 0.85 (headers mix).
# `limits-full` adds the optional header work: key stripped, two identity headers, and the
# x-ratelimit-* response headers.
#
# Each round runs every target once, starting one target later than the round before.
# Ratios to the empty flow are printed twice: the ratio of the medians, and the median (with
# quartiles) of the per-round ratios, which pairs runs made seconds apart and so cancels
# most of a shared machine's drift.
#
#   benches/grpc-compare.sh
#   MIX=headers TARGETS="empty limits limits-sync limits-async" benches/grpc-compare.sh
#   MIX=body TARGETS="empty oas" benches/grpc-compare.sh
#   BASE_BIN=/path/to/older/tollgate TARGETS="empty empty-base verify-bare verify-bare-base" \
#     benches/grpc-compare.sh
# BASE_BIN: a second tollgate binary (an older build) served the same configuration; each
# target named `<target>-base` runs `<target>` against it, and `<target>` is also printed as
# a ratio to `<target>-base`, so a change is measured before/after in one run.
# LLM (issue 14): `llm-quota` is LlmTokenQuota (memory counters) on a buffered chat body,
# `llm-quota-sync` the same flow on the Redis-counting replica (synchronous); compare with
# `empty` sent the same body: MIX=body BODY_BYTES=4096 TARGETS="empty llm-quota llm-quota-sync".
# Guardrails (issue 15): `guard` is SanitizePrompt + SanitizeResponse with every local
# detector: MIX=body BODY_BYTES=4096 TARGETS="empty guard".
# Model routing (issue 16): `router` is ModelRouter scanning for keywords the prompt lacks,
# then a model rule rewriting the body's model; `router-kw` decides on a keyword the prompt
# has: MIX=body BODY_BYTES=4096 TARGETS="empty router router-kw" (target >= 0.90x empty).
# Semantic cache (issue 16): `semantic` is a SemanticCache hit (target >= 1.0x `empty` sent
# the same body): MIX=body BODY_BYTES=4096 TARGETS="empty semantic".
# Monetization (issue 19): `mint` is VerifyApiKey + MonetizationLimitsCheck (in-memory
# counters, a per-call plan, a balance set up through the management API at start);
# `mint-off` is the same flow without the check (target mint >= 0.90x mint-off):
# MIX=headers TARGETS="mint-off mint".
# LOADGEN_ARGS=--unique-bodies makes every prompt line unique (no token-count cache hit).
# Environment: DURATION=5 (seconds per run), ROUNDS=3, MIX="headers body sse", BODY_BYTES=2048,
#              CONCURRENCY=32, CONNECTIONS=2,
#              TARGETS="floor empty three verify verify-bare cache limits limits-full limits-sync
#                       limits-async js jwt jwt-fresh oas"
set -euo pipefail
# The built-in embedder's model, for the semantic cache flow of benches/configs.
export TOLLGATE_EMBED_MODEL_DIR="${TOLLGATE_EMBED_MODEL_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools/embed-model}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
MIX="${MIX:-headers body sse}"
CONCURRENCY="${CONCURRENCY:-32}"
CONNECTIONS="${CONNECTIONS:-2}"
BODY_BYTES="${BODY_BYTES:-2048}"
TARGETS="${TARGETS:-floor empty three verify verify-bare cache limits limits-full limits-sync limits-async js jwt jwt-fresh oas}"
# The key of the app `bench-app` in benches/configs/bench.yaml (stored there as its SHA-256).
BENCH_KEY=tg_bench_key_0000000000000000

cargo build --release --quiet --bin tollgate --example floor --example loadgen --example jwks_fixture
BIN=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FLOOR_PORT=$(free_port); TG_PORT=$(free_port); TG_ADMIN=$(free_port)
PIDS=(); TMPS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  rm -rf "${TMPS[@]}"
}
trap cleanup EXIT

"$BIN/examples/floor" --addr "127.0.0.1:$FLOOR_PORT" >/dev/null 2>&1 & FLOOR_PID=$!; PIDS+=($FLOOR_PID)
# The JWKS for the /jwt flow (fixed address, as in benches/configs/bench.yaml) and its token.
JWT_OUT=$(mktemp); JWT_TOKENS=$(mktemp); TMPS+=("$JWT_OUT" "$JWT_TOKENS"); NTOKENS=0
[[ " $TARGETS " == *" jwt-fresh "* ]] && NTOKENS=20000
"$BIN/examples/jwks_fixture" --addr 127.0.0.1:19876 --tokens "$NTOKENS" --tokens-file "$JWT_TOKENS" \
  >"$JWT_OUT" 2>/dev/null & PIDS+=($!)
for _ in $(seq 1200); do [ -s "$JWT_OUT" ] && break; sleep 0.1; done
BENCH_JWT=$(head -1 "$JWT_OUT"); rm -f "$JWT_OUT"
[ -n "$BENCH_JWT" ] || { echo "jwks_fixture did not start" >&2; exit 1; }
# The benchmark configuration, plus the OpenAI-description flow when asked for.
CONF=$(mktemp -d); TMPS+=("$CONF")
cp benches/configs/*.yaml "$CONF/"
if [[ " $TARGETS " == *" oas "* ]]; then
  OAS_SPEC="${OAS_SPEC:-$ROOT/../shared/data/openai-openapi-3.1.yaml}"
  [ -f "$OAS_SPEC" ] || { echo "OAS_SPEC=$OAS_SPEC not found" >&2; exit 1; }
  cat >"$CONF/oas.yaml" <<EOF
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: oas-openai}
spec: {type: OasValidation, spec: "$OAS_SPEC", basePath: /oas/v1}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: oas}
spec:
  match: {pathPrefixes: [/oas]}
  request: [{policy: oas-openai}]
EOF
fi
RUST_LOG=warn "$BIN/tollgate" serve --config "$CONF" --store memory --grpc-addr "127.0.0.1:$TG_PORT" \
  --admin-addr "127.0.0.1:$TG_ADMIN" --admin-insecure >/dev/null 2>&1 & TG_PID=$!; PIDS+=($TG_PID)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" >/dev/null || { echo "tollgate did not start" >&2; exit 1; }
# Monetization (issue 19): the bench app's developer gets a prepaid account with a balance no
# run can spend, and a subscription to the bench product's per-call plan (loopback admin API).
mint_api() { curl -sf -X "$1" "http://127.0.0.1:$TG_ADMIN$2" -H 'content-type: application/json' -d "$3" >/dev/null; }
mint_api PUT /v1/developers/bench@example.com/account '{"currency":"USD","billing":"prepaid"}'
mint_api POST /v1/developers/bench@example.com/topups '{"amount":"1000000000","reference":"bench"}'
mint_api POST /v1/subscriptions '{"app":"bench-app","plan":"bench-per-call"}'
# Redis-counting replicas, only when asked for.
if [[ " $TARGETS " == *" limits-sync "* || " $TARGETS " == *" limits-async "* || " $TARGETS " == *" llm-quota-sync "* ]]; then
  command -v redis-server >/dev/null || { echo "redis-server not found: run scripts/setup.sh" >&2; exit 1; }
  REDIS_PORT=$(free_port); REDIS_DIR=$(mktemp -d)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$REDIS_DIR" \
    >/dev/null 2>&1 & PIDS+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  for sync in sync async; do
    port=$(free_port); admin=$(free_port)
    RUST_LOG=warn "$BIN/tollgate" serve --config "$CONF" --store memory --counters redis \
      --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --counter-sync "$sync" \
      --grpc-addr "127.0.0.1:$port" --admin-addr "127.0.0.1:$admin" >/dev/null 2>&1 & pid=$!; PIDS+=($pid)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "tollgate ($sync counters) did not start" >&2; exit 1; }
    if [ "$sync" = sync ]; then SYNC_PORT=$port; SYNC_PID=$pid; else ASYNC_PORT=$port; ASYNC_PID=$pid; fi
  done
fi
if [[ " $TARGETS " == *"-base "* ]]; then
  [ -x "${BASE_BIN:-}" ] || { echo "targets *-base need BASE_BIN (an older tollgate binary)" >&2; exit 1; }
  BASE_PORT=$(free_port); BASE_ADMIN=$(free_port)
  RUST_LOG=warn "$BASE_BIN" serve --config "$CONF" --store memory --grpc-addr "127.0.0.1:$BASE_PORT" \
    --admin-addr "127.0.0.1:$BASE_ADMIN" >/dev/null 2>&1 & BASE_PID=$!; PIDS+=($BASE_PID)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$BASE_ADMIN/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$BASE_ADMIN/readyz" >/dev/null || { echo "BASE_BIN tollgate did not start" >&2; exit 1; }
fi
sleep 1
echo "tollgate idle RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$TG_PID/status)"

HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime of a process
run() { # pid addr path mix [loadgen args...] -> "rate p99 cpu_us_per_stream"; fails on any
        # error or immediate answer (ALLOW_IMMEDIATE=1: fails unless answers are immediate).
        # pid: the server under test, whose CPU time is counted.
  local pid=$1 addr=$2 path=$3 mix=$4 t0 out; shift 4
  t0=$(ticks "$pid")
  out=$("$BIN/examples/loadgen" --addr "http://127.0.0.1:$addr" --path "$path" --mix "$mix" "$@" \
    --duration "$DURATION" --warmup 1 --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
    --body-bytes "$BODY_BYTES" ${LOADGEN_ARGS:-} --json |
    python3 -c '
import json, os, sys
d = json.loads(sys.stdin.read())
hits = os.environ.get("ALLOW_IMMEDIATE") == "1"
if (d["immediate"] > 0) != hits or d["mismatches"] or d["errors"] or d["timeouts"]:
    sys.exit(f"unexpected outcomes on {sys.argv[1]}: {d}")
print(d["rate"], d["p99_us"], d["streams"])' "$path")
  # Server CPU per stream: CPU time over warmup + measured time, divided by the streams of
  # that whole time (taken at the measured rate).
  python3 -c 'import sys; r, p, n, dt, hz, s = sys.argv[1:]; print(r, p, float(dt) / int(hz) * 1e6 / max(float(r) * float(s), 1))' \
    $out $(( $(ticks "$pid") - t0 )) "$HZ" "$(python3 -c "print($DURATION + 1)")"
}
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

for mix in $MIX; do
  declare -A R=() P=() C=()
  read -ra TLIST <<<"$TARGETS"
  for round in $(seq "$ROUNDS"); do
    # Each round starts one target later, so no flow always runs first or right after
    # another (the machine's state drifts within a round).
    k=$(( (round - 1) % ${#TLIST[@]} ))
    for t in "${TLIST[@]:k}" "${TLIST[@]:0:k}"; do
      [ "$t" = oas ] && [ "$mix" != body ] && continue # the OpenAI operation requires its body
      [[ "$t" == router* ]] && [ "$mix" != body ] && continue # routes on the body
      # `<target>-base`: the same request against BASE_BIN's process.
      pid=$TG_PID port=$TG_PORT
      if [[ "$t" == *-base ]]; then pid=$BASE_PID port=$BASE_PORT; fi
      case ${t%-base} in
        floor) out=$(run "$FLOOR_PID" "$FLOOR_PORT" /v1/chat/completions "$mix") ;;
        empty) out=$(run "$pid" "$port" /empty/v1/chat/completions "$mix") ;;
        three) out=$(run "$pid" "$port" /three/v1/chat/completions "$mix") ;;
        verify) out=$(run "$pid" "$port" /verify/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        verify-bare) out=$(run "$pid" "$port" /verify-bare/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        limits) out=$(run "$pid" "$port" /limits/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        mint) out=$(run "$pid" "$port" /mint/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        mint-off) out=$(run "$pid" "$port" /mint-off/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        limits-full) out=$(run "$pid" "$port" /limits-full/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        limits-sync) out=$(run "$SYNC_PID" "$SYNC_PORT" /limits/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        limits-async) out=$(run "$ASYNC_PID" "$ASYNC_PORT" /limits/v1/chat/completions "$mix" --header "x-api-key:$BENCH_KEY") ;;
        cache) out=$(ALLOW_IMMEDIATE=1 run "$pid" "$port" /cache/v1/chat/completions "$mix") ;;
        js) out=$(run "$pid" "$port" /js/v1/chat/completions "$mix") ;;
        jwt) out=$(run "$pid" "$port" /jwt/v1/chat/completions "$mix" --header "authorization:Bearer $BENCH_JWT") ;;
        jwt-fresh) out=$(run "$pid" "$port" /jwt/v1/chat/completions "$mix" --header-values "authorization:$JWT_TOKENS") ;;
        oas) out=$(run "$pid" "$port" /oas/v1/chat/completions "$mix") ;;
        llm-quota) out=$(run "$pid" "$port" /llm-quota/v1/chat/completions "$mix" --header "x-user:bench") ;;
        llm-quota-sync) out=$(run "$SYNC_PID" "$SYNC_PORT" /llm-quota/v1/chat/completions "$mix" --header "x-user:bench") ;;
        guard) out=$(run "$pid" "$port" /guard/v1/chat/completions "$mix") ;;
        router) out=$(run "$pid" "$port" /router/v1/chat/completions "$mix") ;;
        router-kw) out=$(run "$pid" "$port" /router-kw/v1/chat/completions "$mix") ;;
        semantic)
          # One streamed exchange stores the answer (the SSE mix sends the same chat body
          # with "stream":true, which is not part of the cache's scope); then every stream hits.
          "$BIN/examples/loadgen" --addr "http://127.0.0.1:$port" --path /semantic/v1/chat/completions \
            --mix sse --sse-request-body --body-bytes "$BODY_BYTES" --duration 1 --warmup 0 \
            --concurrency 1 --connections 1 >/dev/null 2>&1 || true
          out=$(ALLOW_IMMEDIATE=1 run "$pid" "$port" /semantic/v1/chat/completions "$mix") ;;
        *) echo "unknown target $t" >&2; exit 2 ;;
      esac
      read -r rate p99 cpu <<<"$out"
      R[$t]+="$rate "; P[$t]+="$p99 "; C[$t]+="$cpu "
    done
  done
  fr=$(median ${R[floor]:-0}); fp=$(median ${P[floor]:-0})
  er=$(median ${R[empty]:-0}); ep=$(median ${P[empty]:-0}); ec=$(median ${C[empty]:-0})
  for t in $TARGETS; do
    [ -n "${R[$t]:-}" ] || continue
    r=$(median ${R[$t]}); p=$(median ${P[$t]}); c=$(median ${C[$t]})
    python3 - "$mix" "$t" "$r" "$p" "$c" "$fr" "$fp" "$er" "$ep" "$ec" "${R[$t]}" "${R[empty]:-}" "${R[$t-base]:-}" <<'PY'
import statistics, sys
mix, t = sys.argv[1:3]
r, p, c, fr, fp, er, ep, ec = map(float, sys.argv[3:11])
# Paired: each round's rate over the empty flow's rate in the same round (both ran within
# seconds of each other), then the median and quartiles of those ratios.
pairs = [a / b for a, b in zip(map(float, sys.argv[11].split()), map(float, sys.argv[12].split())) if b]
ratio = lambda a, b: f"{a / b:5.2f}" if b else "  n/a"
line = (f"mix={mix} target={t:12} rate={r:9.0f}/s p99={p / 1000:7.2f}ms cpu={c:6.1f}us/stream"
        f"  rate/floor={ratio(r, fr)}  p99/floor={ratio(p, fp)}")
if t in ("verify", "verify-bare", "cache", "js", "jwt", "jwt-fresh", "oas", "router", "router-kw", "semantic") or t.startswith("limits"):
    line += f"  rate/empty={ratio(r, er)}  p99/empty={ratio(p, ep)}  cpu/empty={ratio(c, ec)}"
    if len(pairs) >= 2:
        q = statistics.quantiles(pairs, n=4, method="inclusive")
        line += f"  paired rate/empty={statistics.median(pairs):.2f} [quartiles {q[0]:.2f}-{q[2]:.2f}]"
if sys.argv[13]:
    # Before/after: this build's rate over BASE_BIN's for the same target, paired per round.
    base = [float(x) for x in sys.argv[13].split()]
    br = statistics.median(base)
    after = [a / b for a, b in zip(map(float, sys.argv[11].split()), base) if b]
    line += f"  rate/base={ratio(r, br)}  paired rate/base={statistics.median(after):.2f}"
print(line)
PY
  done
  echo "  [$(awk '{print "load " $1 " " $2 " " $3}' /proc/loadavg) at the end of mix=$mix]"
  unset R P C
done
echo "tollgate RSS after load: $(awk '/VmRSS/ {print $2, $3}' /proc/$TG_PID/status)"
