#!/usr/bin/env bash
# Envoy + wrk through (a) no ext_proc filter, (b) the floor (no-op ext_proc), (c) an ext_proc
# server under test (tollgate), in front of a tiny local upstream. Loopback only.
#
#   benches/envoy-compare.sh [HOST:PORT]      # (c) = an ext_proc server already running there
#   TOLLGATE_BIN=target/release/tollgate TOLLGATE_CONFIG=policies/x.yaml benches/envoy-compare.sh
#
# Without an address or TOLLGATE_BIN/TOLLGATE_CONFIG, (c) is skipped.
# Environment:
#   DURATION=10           seconds of wrk per run (plus WARMUP=2 seconds of unmeasured wrk)
#   MIX="headers"         space-separated list of: headers (GET /, header messages only),
#                         body (POST 2 KB JSON to /v1/chat/completions: BUFFERED request body,
#                         FULL_DUPLEX_STREAMED response body), sse (the same to /sse/..., the
#                         upstream answers with a 20-event SSE stream)
#   ROUNDS=1              repeat the whole cycle (targets interleaved) and report medians;
#                         use 3+ on a busy 2-core machine
#   HEADERS=$'x-api-key: k1\nx-tenant: t1'   extra request headers, one per line (wrk and curl)
#   EXPECT_CODE=200       status the check request before each run must get
#   CONNECTIONS=32 THREADS=2   wrk -c / -t
#   ENVOY_CONCURRENCY=2   Envoy worker threads
#   ENVOY=.tools/envoy/envoy   FLOOR_BIN, UPSTREAM_BIN (default: built with cargo as examples)
#   KEEP=1                keep the work dir (bootstraps, logs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
MIX="${MIX:-headers}"
ROUNDS="${ROUNDS:-1}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"
ENVOY_CONCURRENCY="${ENVOY_CONCURRENCY:-2}"
ENVOY="${ENVOY:-$ROOT/.tools/envoy/envoy}"
TARGET_ADDR="${1:-${TOLLGATE_ADDR:-}}"
EXPECT_CODE="${EXPECT_CODE:-200}"
HDR_ARGS=()
while IFS= read -r h; do if [[ -n "$h" ]]; then HDR_ARGS+=(-H "$h"); fi; done <<<"${HEADERS:-}"

die() { echo "envoy-compare: $*" >&2; exit 1; }
log() { echo "envoy-compare: $*" >&2; }

[[ -x "$ENVOY" ]] || die "no Envoy at $ENVOY (run scripts/setup.sh)"
command -v wrk >/dev/null || die "wrk not found (run scripts/setup.sh)"
command -v curl >/dev/null || die "curl not found (run scripts/setup.sh)"
for m in $MIX; do [[ "$m" =~ ^(headers|body|sse)$ ]] || die "unknown mix '$m' (headers|body|sse)"; done

is_loopback() { [[ "$1" =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost):[0-9]+$ ]]; }
if [[ -n "$TARGET_ADDR" ]]; then
  is_loopback "$TARGET_ADDR" || die "target $TARGET_ADDR is not a loopback HOST:PORT"
  TARGET_ADDR="${TARGET_ADDR/localhost/127.0.0.1}"
fi

if [[ -z "${FLOOR_BIN:-}" || -z "${UPSTREAM_BIN:-}" ]]; then
  log "building the floor and upstream examples"
  (cd "$ROOT" && cargo build --release --quiet --example floor --example upstream)
  dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  FLOOR_BIN="${FLOOR_BIN:-$dir/release/examples/floor}"
  UPSTREAM_BIN="${UPSTREAM_BIN:-$dir/release/examples/upstream}"
fi

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_init envoy-compare
read -r UP_PORT FLOOR_PORT LISTEN_PORT ADMIN_PORT TG_PORT TG_ADMIN <<<"$(free_ports 6)"

start upstream "$UPSTREAM_BIN" --addr "127.0.0.1:$UP_PORT"
wait_for 10 "$LAST_PID" port_open "$UP_PORT" || die "upstream did not start: $(tail -5 "$WORK/upstream.log")"
start floor "$FLOOR_BIN" --addr "127.0.0.1:$FLOOR_PORT"
wait_for 10 "$LAST_PID" port_open "$FLOOR_PORT" || die "floor did not start: $(tail -5 "$WORK/floor.log")"

if [[ -z "$TARGET_ADDR" && -n "${TOLLGATE_BIN:-}" ]]; then
  [[ -n "${TOLLGATE_CONFIG:-}" ]] || die "TOLLGATE_BIN needs TOLLGATE_CONFIG"
  start tollgate "$TOLLGATE_BIN" serve --config "$TOLLGATE_CONFIG" \
    --grpc-addr "127.0.0.1:$TG_PORT" --admin-addr "127.0.0.1:$TG_ADMIN" --store memory
  wait_for 30 "$LAST_PID" curl -sf "http://127.0.0.1:$TG_ADMIN/readyz" \
    || die "tollgate not ready: $(tail -20 "$WORK/tollgate.log")"
  TARGET_ADDR="127.0.0.1:$TG_PORT"
fi
TARGETS=("no-extproc:" "floor:127.0.0.1:$FLOOR_PORT")
if [[ -n "$TARGET_ADDR" ]]; then TARGETS+=("tollgate:$TARGET_ADDR"); else log "no ext_proc target given: (c) skipped"; fi

# A chat-completion request body of about 2 KB, and wrk scripts for the POST mixes.
python3 - "$WORK" <<'PY'
import json, sys
user = ("Summarise the quarterly report, list the three main risks and suggest next steps. " * 23).strip()
body = json.dumps({"model": "gpt-4o-mini", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": user}], "temperature": 0.2, "max_tokens": 512, "stream": False},
    separators=(",", ":"))
open(f"{sys.argv[1]}/body.json", "w").write(body)
open(f"{sys.argv[1]}/post.lua", "w").write(
    'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
    f'wrk.body = [==[{body}]==]\n')
PY

# bootstrap FILE EXTPROC_HOST:PORT|""
bootstrap() {
  local file="$1" ext="$2" per_route="" filter="" cluster=""
  if [[ -n "$ext" ]]; then
    per_route='
                typed_per_filter_config:
                  envoy.filters.http.ext_proc:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
                    overrides:
                      processing_mode:
                        request_header_mode: SEND
                        response_header_mode: SEND
                        request_body_mode: BUFFERED
                        response_body_mode: FULL_DUPLEX_STREAMED
                        response_trailer_mode: SEND
                      failure_mode_allow: false'
    filter='
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {cluster_name: ext_proc_cluster}
              failure_mode_allow: false
              message_timeout: 1s
              allow_mode_override: true
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: NONE
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP
              request_attributes: ["request.path", "request.method", "source.address"]
              response_attributes: ["response.code"]
              metadata_options:
                receiving_namespaces: {untyped: ["policy"]}'
    cluster="$(grpc_cluster ext_proc_cluster "${ext%:*}" "${ext##*:}")"
  fi
  envoy_bootstrap "$file" "\
              - match: {prefix: \"/v1/chat/completions\"}
                route: {cluster: upstream, timeout: 0s}$per_route
              - match: {prefix: \"/sse\"}
                route: {cluster: upstream, timeout: 0s}$per_route
              - match: {prefix: \"/\"}
                route: {cluster: upstream}" "$filter" "$cluster"
}

# to_us VALUE-WITH-UNIT (wrk style: 512.00us, 1.20ms, 2.01s, 1.00m)
to_us() {
  awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    f = (u == "us") ? 1 : (u == "ms") ? 1000 : (u == "s") ? 1000000 : (u == "m") ? 60000000 : 0;
    printf "%.0f", n * f }'
}

RESULTS=()
for ((round = 1; round <= ROUNDS; round++)); do
for mix in $MIX; do
  case "$mix" in
    headers) url_path="/"; wrk_script=(); curl_args=() ;;
    body) url_path="/v1/chat/completions"; wrk_script=(-s "$WORK/post.lua")
          curl_args=(-H "content-type: application/json" --data-binary "@$WORK/body.json") ;;
    sse) url_path="/sse/v1/chat/completions"; wrk_script=(-s "$WORK/post.lua")
         curl_args=(-H "content-type: application/json" --data-binary "@$WORK/body.json") ;;
  esac
  url="http://127.0.0.1:$LISTEN_PORT$url_path"
  for t in "${TARGETS[@]}"; do
    name="${t%%:*}"; ext="${t#*:}"
    bootstrap "$WORK/envoy-$name.yaml" "$ext"
    start "envoy-$mix-$name" "$ENVOY" -c "$WORK/envoy-$name.yaml" --concurrency "$ENVOY_CONCURRENCY" \
      --disable-hot-restart -l warn
    envoy_pid=$LAST_PID
    wait_for 20 "$envoy_pid" curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" \
      || die "Envoy ($name) not ready: $(tail -20 "$WORK/envoy-$mix-$name.log")"
    # One request through the whole chain must succeed before measuring.
    code="$(curl -s -o "$WORK/check.out" -w '%{http_code}' --max-time 5 "${HDR_ARGS[@]}" "${curl_args[@]}" "$url" || true)"
    if [[ "$code" != "$EXPECT_CODE" ]]; then
      die "$mix/$name: check request got HTTP $code; Envoy log: $(tail -20 "$WORK/envoy-$mix-$name.log")"
    fi
    if [[ "$mix" == sse ]] && ! grep -q 'data: \[DONE\]' "$WORK/check.out"; then
      die "$mix/$name: SSE response incomplete"
    fi
    if ((WARMUP > 0)); then
      timeout $((WARMUP + 10)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" "${HDR_ARGS[@]}" "${wrk_script[@]}" "$url" >/dev/null
    fi
    out="$(timeout $((DURATION + 15)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 5s --latency \
      "${HDR_ARGS[@]}" "${wrk_script[@]}" "$url")" || die "$mix/$name: wrk failed"
    echo "$out" >"$WORK/wrk-$mix-$name.txt"
    stop_envoy "$envoy_pid"
    rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
    p50="$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
    p99="$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")"
    sockerr="$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")"
    RESULTS+=("$mix $name ${rps:-0} ${p50:-0} ${p99:-0} ${non2xx:-0} ${sockerr:-0}")
    log "round $round $mix/$name: ${rps:-0} req/s, p99 ${p99:-0} us, non-2xx ${non2xx:-0}, socket errors ${sockerr:-0}"
  done
done
done

echo
echo "Envoy $("$ENVOY" --version | grep -o '/1\.[0-9.]*/' | tr -d /), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, Envoy --concurrency $ENVOY_CONCURRENCY, $(nproc) cores shared by all processes, $ROUNDS round(s): medians"
printf '%s\n' "${RESULTS[@]}" | python3 -c '
import statistics as st, sys
rows = {}
for line in sys.stdin:
    mix, name, *v = line.split()
    rows.setdefault((mix, name), []).append([float(x) for x in v])
med = {}
print("%-8s %-11s %12s %9s %9s %8s %8s" % ("mix", "target", "req/s", "p50_us", "p99_us", "non2xx", "sockerr"))
for (mix, name), runs in rows.items():
    rps, p50, p99 = (st.median(r[i] for r in runs) for i in range(3))
    med[mix, name] = (rps, p99)
    print("%-8s %-11s %12.1f %9.0f %9.0f %8d %8d" % (mix, name, rps, p50, p99,
          sum(r[3] for r in runs), sum(r[4] for r in runs)))
print()
def ratio(mix, a, b, i):
    x, y = med.get((mix, a)), med.get((mix, b))
    return "%.3f" % (x[i] / y[i]) if x and y and y[i] > 0 else "-"
for mix in dict.fromkeys(m for m, _ in rows):
    print("%-8s req/s  tollgate/floor %s  floor/no-extproc %s   p99  tollgate/floor %s  floor/no-extproc %s"
          % (mix, ratio(mix, "tollgate", "floor", 0), ratio(mix, "floor", "no-extproc", 0),
             ratio(mix, "tollgate", "floor", 1), ratio(mix, "floor", "no-extproc", 1)))
'
bad="$(printf '%s\n' "${RESULTS[@]}" | awk '$6 > 0 || $7 > 0' | wc -l)"
if ((bad > 0)); then log "some runs had non-2xx responses or socket errors (see the table)"; exit 1; fi
