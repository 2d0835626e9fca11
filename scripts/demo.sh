#!/usr/bin/env bash
# Runs tollgate on the example configuration in policies/ (hot-reloaded: edit a file and
# watch the behaviour change), with a local Envoy 1.40 in front and a demo upstream that
# echoes what it receives. Everything listens on 127.0.0.1; Ctrl-C stops it all.
#   client :10000 -> Envoy -> demo upstream :8080
#                      \-- ext_proc -> tollgate :9002 (admin, metrics :9003)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh >/dev/null
cargo build --release --quiet --bin tollgate

for port in 10000 9901 9002 9003 8080; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is in use; stop whatever listens there first" >&2
    exit 1
  fi
done

LOGS="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo: stopped (logs were in $LOGS)"
}
trap cleanup EXIT INT TERM

python3 scripts/demo_upstream.py 8080 >"$LOGS/upstream.log" 2>&1 & PIDS+=($!)
# The management API is open without a token here because everything listens on 127.0.0.1;
# in production give --admin-token-file.
target/release/tollgate serve --config policies --grpc-addr 127.0.0.1:9002 --admin-addr 127.0.0.1:9003 \
  --data-dir .tools/demo-data --admin-insecure \
  >"$LOGS/tollgate.log" 2>&1 & PIDS+=($!)
.tools/envoy/envoy -c deploy/envoy/envoy-local.yaml --base-id 7 -l warning >"$LOGS/envoy.log" 2>&1 & PIDS+=($!)

for _ in $(seq 100); do
  curl -sf localhost:9003/readyz >/dev/null 2>&1 && curl -sf localhost:9901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf localhost:9003/readyz >/dev/null || { echo "demo: tollgate did not start:"; cat "$LOGS/tollgate.log"; exit 1; }

cat <<'TXT'

tollgate is running with policies/ behind Envoy on http://localhost:10000 . Try:

  curl -s localhost:10000/hello                       # upstream echo shows x-tollgate-flow: api
  curl -si localhost:10000/admin                      # 403, Apigee fault JSON (RaiseFault)
  curl -si localhost:10000/v1/chat/completions -H 'x-block: yes' -d '{"model":"m"}'
                                                      # 403, OpenAI error JSON
  curl -sN localhost:10000/sse                        # server-sent events, streamed through
  curl -s localhost:9003/metrics | grep ^tollgate_    # Prometheus metrics

API keys (policies/api-keys.yaml guards /v1/models):
  curl -si localhost:10000/v1/models                  # 401 oauth.v2.FailedToResolveAPIKey
  curl -s -XPOST localhost:9003/v1/apps -H 'content-type: application/json' \
       -d '{"name":"my-app","developerEmail":"me@example.com","products":["models-read"]}'
  curl -s -XPOST localhost:9003/v1/apps/my-app/keys   # shows the new key, once
  curl -s localhost:10000/v1/models -H "x-api-key: <that key>"   # 200

Edit policies/quickstart.yaml and the change applies within a second (a broken edit is
refused and logged; the running configuration stays). Ctrl-C stops everything.
TXT
tail -f "$LOGS/tollgate.log" &
PIDS+=($!)
wait "${PIDS[1]}"
