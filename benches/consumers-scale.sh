#!/usr/bin/env bash
# Consumer scale: tollgate with 100k apps (one API key each) in the embedded store.
#
#   1. seeds APPS apps into a temporary data directory (benches/seed_store.rs) and reports how
#      long that took;
#   2. starts `tollgate serve --store embedded` on it (config: benches/configs, whose `verify`
#      flow runs VerifyApiKey) STARTS times and reports startup-to-ready (exec to the first
#      200 from /readyz, polled every 10 ms) and RSS (VmRSS, and the peak VmHWM) once ready;
#   3. drives the verify flow with a seeded key (benches/loadgen.rs; any error or immediate
#      answer fails the run: a seeded key must verify, and an unknown one must not) and
#      reports the rate and the RSS after it;
#   4. measures key creations per second through the management API (POST
#      /v1/apps/{app}/keys, each durable before its 201) with wrk over KEY_APPS apps made
#      beforehand, on that 100k-app store and (FRESH=1) on an empty store; then kills the
#      100k-app process with SIGKILL, restarts it and checks every 201'd key is still there.
#
# Loopback only; every process it starts is stopped on exit and the data directories removed.
# The machine's load average is printed with each figure.
#
#   benches/consumers-scale.sh
# Environment: APPS=100000, STARTS=3, LOAD_DURATION=3 (seconds), CONCURRENCY=32,
#              CONNECTIONS=2, KEY_APPS=50, WRK_DURATION=5 (seconds), WRK_CONNECTIONS=4,
#              FRESH=1 (also measure key creations on an empty store), BUILD=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
APPS="${APPS:-100000}"
STARTS="${STARTS:-3}"
LOAD_DURATION="${LOAD_DURATION:-3}"
CONCURRENCY="${CONCURRENCY:-32}"
CONNECTIONS="${CONNECTIONS:-2}"
KEY_APPS="${KEY_APPS:-50}"
WRK_DURATION="${WRK_DURATION:-5}"
WRK_CONNECTIONS="${WRK_CONNECTIONS:-4}"
FRESH="${FRESH:-1}"
BUILD="${BUILD:-1}"

command -v wrk >/dev/null || { echo "wrk is needed (scripts/test.sh installs it)" >&2; exit 1; }
if [ "$BUILD" = 1 ]; then
  cargo build --release --quiet --bin tollgate --example seed_store --example loadgen
fi
BIN=target/release
WORK=$(mktemp -d /tmp/tollgate-scale.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
load() { awk '{print "load " $1 " " $2 " " $3}' /proc/loadavg; }
rss() { awk '/VmRSS|VmHWM/ {printf "%s %.1f MB  ", $1, $2/1024}' "/proc/$1/status"; }
api() { curl -sS --noproxy '*' --max-time 10 "$@"; }
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }

# start DATA_DIR ADMIN_PORT GRPC_PORT LOG -> "PID SECONDS" (SECONDS: exec to the first 200 from
# /readyz, polled every 10 ms). The process keeps running; its PID is also added to PIDS.
start() {
  local out
  out=$(python3 - "$@" "$BIN/tollgate" <<'PY'
import subprocess, sys, time, urllib.request
data, admin, grpc, log, exe = sys.argv[1:6]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
t0 = time.monotonic()
p = subprocess.Popen(
    [exe, "serve", "--store", "embedded", "--data-dir", data, "--config", "benches/configs",
     "--admin-insecure", "--grpc-addr", f"127.0.0.1:{grpc}", "--admin-addr", f"127.0.0.1:{admin}"],
    stdout=open(log, "ab"), stderr=subprocess.STDOUT, env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"})
while True:
    try:
        with opener.open(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if p.poll() is not None:
        print(p.pid, "exited")
        sys.exit(0)
    if time.monotonic() - t0 > 60:
        print(p.pid, "timeout")
        sys.exit(0)
    time.sleep(0.01)
print(p.pid, f"{time.monotonic() - t0:.3f}")
PY
)
  PIDS+=("${out%% *}")
  case ${out##* } in
    exited|timeout) echo "tollgate did not become ready (${out##* }); log:" >&2; tail -20 "$4" >&2; exit 1 ;;
  esac
  echo "$out"
}

stop() { # PID [signal]
  kill "-${2:-TERM}" "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}

# loadgen against the verify flow: KEY CONCURRENCY, then loadgen args; prints its JSON line
# (loadgen exits 1 on errors: the callers check the counts)
verify_run() {
  local key=$1 conc=$2; shift 2
  "$BIN/examples/loadgen" --addr "http://127.0.0.1:$GRPC" --path /verify/v1/chat/completions \
    --mix headers --header "x-api-key:$key" --concurrency "$conc" --connections "$CONNECTIONS" \
    --json "$@" || true
}

# wrk: key creations over KEY_APPS apps on the admin port ADMIN; prints the 201 count last
key_creations() { # ADMIN LABEL
  local admin=$1 label=$2 out created
  for i in $(seq 0 $((KEY_APPS - 1))); do
    api -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$admin/v1/apps" \
      -H 'content-type: application/json' \
      -d "{\"name\":\"keyapp-$i\",\"developerEmail\":\"keys$i@bench.example.com\",\"products\":[\"seeded\"]}" |
      grep -q 201 || { echo "cannot create app keyapp-$i" >&2; exit 1; }
  done
  out=$(wrk -t1 -c"$WRK_CONNECTIONS" -d"${WRK_DURATION}s" --latency --timeout 10s -s "$WORK/keys.lua" \
    "http://127.0.0.1:$admin" 2>&1)
  echo "$out" | sed -n '/Latency Distribution/,/^ *99%/p;/Requests\/sec/p;/^status/p;/Non-2xx/p;/errors/p' | sed 's/^/    /' >&2
  created=$(echo "$out" | awk '/^status 201:/ {print $3}')
  created=${created:-0}
  python3 -c "import sys; n=int(sys.argv[1]); print(f'key creations ($label): {n} x 201 in ${WRK_DURATION}s = {n/$WRK_DURATION:.0f}/s  [$(load)]')" "$created" >&2
  echo "$created"
}

cat >"$WORK/keys.lua" <<LUA
-- POST /v1/apps/keyapp-<n>/keys, rotating over $KEY_APPS apps; tallies statuses per thread.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {}; n = 0 end
local headers = { ["Content-Type"] = "application/json" }
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/apps/keyapp-" .. (n % $KEY_APPS) .. "/keys", headers, "{}")
end
response = function(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
done = function(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("status %d: %d\n", k, v)) end
end
LUA

echo "== machine: $(nproc) cores, $(load)"
echo "== seeding $APPS apps"
seed=$("$BIN/examples/seed_store" --data-dir "$WORK/data" --apps "$APPS" --json)
echo "$seed"
KEY=$(echo "$seed" | json 'd["sample_key"]')
echo "$seed" | python3 -c '
import json, sys
d = json.load(sys.stdin)
s, r, f = d["seed_s"], d["apps_per_s"], d["file_bytes"] / 1e6
print(f"seeding: {s:.2f}s ({r:.0f} apps/s), file {f:.1f} MB", end="")'
echo "  [$(load)]"

ADMIN=$(free_port); GRPC=$(free_port)
echo "== startup with $APPS apps (exec to /readyz 200, polled every 10 ms), $STARTS starts"
times=()
for s in $(seq "$STARTS"); do
  start "$WORK/data" "$ADMIN" "$GRPC" "$WORK/tollgate.log" >"$WORK/start.out"
  read -r PID T <"$WORK/start.out"
  times+=("$T")
  echo "start $s: ready in ${T}s; $(rss "$PID") [$(load)]"
  if [ "$s" != "$STARTS" ]; then stop "$PID"; fi
done
python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f"startup-to-ready: median {statistics.median(v):.3f}s min {min(v):.3f}s max {max(v):.3f}s")' "${times[@]}"
sleep 1
echo "RSS 1 s after ready: $(rss "$PID") [$(load)]"

echo "== verify flow with a seeded key ($KEY), ${LOAD_DURATION}s"
out=$(verify_run "$KEY" "$CONCURRENCY" --duration "$LOAD_DURATION" --warmup 1)
echo "$out"
echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
bad = d["immediate"] + d["mismatches"] + d["errors"] + d["timeouts"]
if bad or not d["ok"]:
    sys.exit(f"the seeded key did not verify on every stream: {d}")
rate, p99, ok = d["rate"], d["p99_us"] / 1000, d["ok"]
print(f"verify flow: {rate:.0f} streams/s, p99 {p99:.2f} ms, all {ok} streams passed", end="")'
echo "  [$(load)]"
echo "RSS after load: $(rss "$PID")"
out=$(verify_run tg_seed_not_a_key_0000 4 --streams 50 --warmup 0)
echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
if d["immediate"] != d["streams"] or not d["streams"]:
    sys.exit(f"an unknown key was not refused on every stream: {d}")
n = d["immediate"]
print(f"unknown key: all {n} streams refused")'

echo "== key creations through the management API (embedded store, durable before 201)"
echo "  on the $APPS-app store, $KEY_APPS apps, wrk -t1 -c$WRK_CONNECTIONS -d${WRK_DURATION}s"
made=$(key_creations "$ADMIN" "$APPS-app store")
echo "RSS after key creations: $(rss "$PID")"
# A created key verifies on the data plane (the index follows the store).
newkey=$(api -X POST "http://127.0.0.1:$ADMIN/v1/apps/keyapp-0/keys" -H 'content-type: application/json' -d '{}' | json 'd["key"]')
made=$((made + 1))
sleep 0.5
out=$(verify_run "$newkey" 4 --streams 100 --warmup 0)
echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
if d["ok"] != d["streams"] or not d["streams"]:
    sys.exit(f"a key created through the API does not verify: {d}")
n = d["ok"]
print(f"a key created through the API verifies ({n} streams)")'

echo "== kill -9 and restart: every acknowledged key is still there"
stop "$PID" 9
start "$WORK/data" "$ADMIN" "$GRPC" "$WORK/tollgate.log" >"$WORK/start.out"
read -r PID T <"$WORK/start.out"
echo "restart after kill -9: ready in ${T}s; $(rss "$PID") [$(load)]"
kept=0
for i in $(seq 0 $((KEY_APPS - 1))); do
  n=$(api "http://127.0.0.1:$ADMIN/v1/apps/keyapp-$i" | json 'len(d["keys"])')
  kept=$((kept + n))
done
if [ "$kept" -lt "$made" ]; then echo "only $kept of $made acknowledged keys survived kill -9" >&2; exit 1; fi
echo "after kill -9: $kept keys stored, $made acknowledged (201)"
stop "$PID"

if [ "$FRESH" = 1 ]; then
  echo "== key creations on an empty store"
  start "$WORK/fresh" "$ADMIN" "$GRPC" "$WORK/tollgate-fresh.log" >"$WORK/start.out"
  read -r PID T <"$WORK/start.out"
  api -o /dev/null -X POST "http://127.0.0.1:$ADMIN/v1/products" -H 'content-type: application/json' \
    -d '{"name":"seeded","operations":[{"path":"/verify/**","methods":["POST"]}]}'
  key_creations "$ADMIN" "empty store" >/dev/null
  stop "$PID"
fi
