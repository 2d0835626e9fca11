#!/usr/bin/env bash
# Envoy's rate-limit filter -> Kuadrant Limitador against Envoy's ext_proc filter -> tollgate,
# on the same limit and the same load (issue 4's optional comparison). Loopback only.
#
# Both count one limit per API key (the `x-api-key` request header), high enough that the
# load never trips it, in memory: Limitador with a limits file (namespace `bench`, variable
# descriptors[0]['api_key']), tollgate with one Quota whose identifier is the header. Both
# are asked once per request: the rate-limit filter makes one unary RLS call; the ext_proc
# filter sends request headers only (response headers SKIP, as a Quota without rate-limit
# headers needs). A third run without either filter is the ceiling. wrk drives each in
# turn, ROUNDS times (rotating order), and the medians and the per-round ratio
# tollgate/limitador are printed. Before each run one request must pass; after all runs each
# server's counter must have seen the requests (read back from Limitador's HTTP API and
# tollgate's metrics).
#
# Limitador is not a dependency and nothing of it is kept in this repository: build it from
# its public source into a directory outside the repository, e.g.
#   git clone https://github.com/Kuadrant/limitador /tmp/limitador
#   (cd /tmp/limitador && cargo build --release -p limitador-server)   # needs protoc, libclang
#   LIMITADOR_BIN=/tmp/limitador/target/release/limitador-server benches/limitador-compare.sh
#
# Environment: LIMITADOR_BIN (required), DURATION=10, WARMUP=2, ROUNDS=3, CONNECTIONS=32,
#              THREADS=2, ENVOY_CONCURRENCY=2, ENVOY=.tools/envoy/envoy, KEEP=1 keeps the
#              work dir.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
ROUNDS="${ROUNDS:-3}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"
ENVOY_CONCURRENCY="${ENVOY_CONCURRENCY:-2}"
ENVOY="${ENVOY:-$ROOT/.tools/envoy/envoy}"
KEY=tg_bench_key_0000000000000000

die() { echo "limitador-compare: $*" >&2; exit 1; }
log() { echo "limitador-compare: $*" >&2; }

[[ -n "${LIMITADOR_BIN:-}" && -x "${LIMITADOR_BIN:-}" ]] || die "set LIMITADOR_BIN to a built limitador-server (see the header)"
[[ -x "$ENVOY" ]] || die "no Envoy at $ENVOY (run scripts/setup.sh)"
command -v wrk >/dev/null || die "wrk not found (run scripts/setup.sh)"

log "building tollgate and the upstream"
(cd "$ROOT" && cargo build --release --quiet --bin tollgate --example upstream)
TOLLGATE_BIN="$ROOT/target/release/tollgate"
UPSTREAM_BIN="$ROOT/target/release/examples/upstream"

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init limitador-compare
read -r UP_PORT LISTEN_PORT ADMIN_PORT TG_PORT TG_ADMIN RLS_PORT RLS_HTTP <<<"$(free_ports 7)"

# The same limit on both sides: 10^12 per hour per API key.
cat >"$WORK/limits.yaml" <<'EOF'
- namespace: bench
  max_value: 1000000000000
  seconds: 3600
  conditions: []
  variables:
  - descriptors[0]['api_key']
EOF
mkdir -p "$WORK/tollgate"
cat >"$WORK/tollgate/quota.yaml" <<'EOF'
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: per-key}
spec: {type: Quota, allow: 1000000000000, timeUnit: hour, identifier: "{request.header.x-api-key}"}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: limited}
spec:
  match: {pathPrefixes: [/]}
  request: [{policy: per-key}]
EOF

start upstream "$UPSTREAM_BIN" --addr "127.0.0.1:$UP_PORT"
wait_for 10 "$LAST_PID" port_open "$UP_PORT" || die "upstream did not start"
start limitador "$LIMITADOR_BIN" --rls-ip 127.0.0.1 --rls-port "$RLS_PORT" \
  --http-ip 127.0.0.1 --http-port "$RLS_HTTP" "$WORK/limits.yaml" memory
LIMITADOR_PID=$LAST_PID
wait_for 20 "$LIMITADOR_PID" port_open "$RLS_PORT" || die "limitador did not start: $(tail -20 "$WORK/limitador.log")"
RUST_LOG=warn start tollgate "$TOLLGATE_BIN" serve --config "$WORK/tollgate" --store memory \
  --grpc-addr "127.0.0.1:$TG_PORT" --admin-addr "127.0.0.1:$TG_ADMIN"
TOLLGATE_PID=$LAST_PID
wait_for 30 "$TOLLGATE_PID" curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" || die "tollgate not ready: $(tail -20 "$WORK/tollgate.log")"

bootstrap() { # FILE none|limitador|tollgate
  local file="$1" kind="$2" filter="" rate_limits="" cluster=""
  case "$kind" in
    limitador)
      rate_limits='
                  rate_limits:
                  - actions:
                    - {request_headers: {header_name: x-api-key, descriptor_key: api_key}}'
      filter='
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: bench
              failure_mode_deny: true
              timeout: 1s
              rate_limit_service:
                transport_api_version: V3
                grpc_service: {envoy_grpc: {cluster_name: rls}}'
      cluster="$(grpc_cluster rls 127.0.0.1 "$RLS_PORT")" ;;
    tollgate)
      filter='
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {envoy_grpc: {cluster_name: ext_proc_cluster}}
              failure_mode_allow: false
              message_timeout: 1s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SKIP
                request_body_mode: NONE
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP'
      cluster="$(grpc_cluster ext_proc_cluster 127.0.0.1 "$TG_PORT")" ;;
  esac
  envoy_bootstrap "$file" "\
              - match: {prefix: \"/\"}
                route:
                  cluster: upstream$rate_limits" "$filter" "$cluster"
}

KINDS=(none limitador tollgate)
RESULTS=()
for ((round = 1; round <= ROUNDS; round++)); do
  k=$(( (round - 1) % ${#KINDS[@]} ))
  for kind in "${KINDS[@]:k}" "${KINDS[@]:0:k}"; do
    bootstrap "$WORK/envoy-$kind.yaml" "$kind"
    start "envoy-$kind-$round" "$ENVOY" -c "$WORK/envoy-$kind.yaml" --concurrency "$ENVOY_CONCURRENCY" \
      --disable-hot-restart -l warn
    envoy_pid=$LAST_PID
    wait_for 20 "$envoy_pid" curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" \
      || die "Envoy ($kind) not ready: $(tail -20 "$WORK/envoy-$kind-$round.log")"
    url="http://127.0.0.1:$LISTEN_PORT/v1/models"
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "x-api-key: $KEY" "$url" || true)"
    [[ "$code" == 200 ]] || die "$kind: check request got HTTP $code: $(tail -20 "$WORK/envoy-$kind-$round.log")"
    if ((WARMUP > 0)); then
      timeout $((WARMUP + 10)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -H "x-api-key: $KEY" "$url" >/dev/null
    fi
    out="$(timeout $((DURATION + 15)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 5s \
      -H "x-api-key: $KEY" "$url")" || die "$kind: wrk failed"
    stop_envoy "$envoy_pid"
    rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
    bad="$(awk '/Non-2xx or 3xx responses:/ {n += $NF} /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")"
    ((bad == 0)) || die "$kind: $bad failed requests in round $round"
    RESULTS+=("$round $kind ${rps:-0}")
    log "round $round $kind: ${rps:-0} req/s"
  done
done

# Each server must have counted: Limitador's counter for the key, tollgate's allowed metric.
lim="$(curl -sf "http://127.0.0.1:$RLS_HTTP/counters/bench" || true)"
grep -q "$KEY" <<<"$lim" || die "Limitador holds no counter for the key: $lim"
tg="$(curl -sf "http://127.0.0.1:$TG_ADMIN/metrics" | awk '/^tollgate_ratelimit_decisions_total\{.*per-key.*allowed/ {n += $NF} END {print n + 0}')"
((tg > 0)) || die "tollgate counted no allowed Quota decision"

echo
echo "Envoy $("$ENVOY" --version | grep -o '/1\.[0-9.]*/' | tr -d /), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, Envoy --concurrency $ENVOY_CONCURRENCY, $(nproc) cores shared by all processes, $ROUNDS round(s)"
printf '%s\n' "${RESULTS[@]}" | python3 -c '
import statistics as st, sys
rate = {}
for line in sys.stdin:
    rnd, kind, rps = line.split()
    rate.setdefault(kind, {})[rnd] = float(rps)
for kind, runs in rate.items():
    print("%-10s median %9.0f req/s   runs %s" % (kind, st.median(runs.values()), " ".join("%.0f" % v for v in runs.values())))
pairs = [rate["tollgate"][r] / rate["limitador"][r] for r in rate["tollgate"] if rate["limitador"].get(r)]
print("tollgate/limitador: ratio of medians %.3f, median of per-round ratios %.3f" % (
    st.median(rate["tollgate"].values()) / st.median(rate["limitador"].values()), st.median(pairs)))
for kind in ("limitador", "tollgate"):
    print("%s/no-filter: %.3f" % (kind, st.median(rate[kind].values()) / st.median(rate["none"].values())))
'
