#!/usr/bin/env bash
# Runs tollgate on the example configuration in policies/ (hot-reloaded: edit a file and
# watch the behaviour change), with a local Envoy 1.40 in front, a demo upstream that
# echoes what it receives, and the authorization service the callout example calls.
# Everything listens on 127.0.0.1; Ctrl-C stops it all. Every run starts from a fresh store
# (in a temporary directory), so it behaves the same the second time as the first.
#   client :10000 -> Envoy -> demo upstream :8080
#                      \-- ext_proc -> tollgate :9002 (admin, metrics :9003)
#                                        \-- ServiceCallout -> demo authz :8081
#
#   scripts/demo.sh          start, print commands to try, follow tollgate's log
#   scripts/demo.sh --try    start, run every command printed here and shown in the
#                            comments of policies/*.yaml, print what each answered, stop
# TOLLGATE_BIN=path picks the binary; otherwise a current target/{release,debug}/tollgate
# is used as it is, and only a missing or outdated one is (re)built (release).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=run
case "${1:-}" in
  --try) MODE=try ;;
  "") ;;
  *) echo "usage: scripts/demo.sh [--try]" >&2; exit 2 ;;
esac

if [[ ! -x .tools/envoy/envoy ]] || [[ ! -e .tools/embed-model/model.safetensors ]] || ! command -v curl >/dev/null; then
  bash scripts/setup.sh >/dev/null
fi

# A binary is current when no source it is built from (the built-in configuration
# included) is newer than it.
current() {
  [[ -x "$1" ]] && [[ -z "$(find src Cargo.toml Cargo.lock policies/quickstart.yaml \
    -newer "$1" -print -quit 2>/dev/null)" ]]
}
BIN="${TOLLGATE_BIN:-}"
if [[ -z "$BIN" ]]; then
  for b in target/release/tollgate target/debug/tollgate; do
    if current "$b"; then BIN="$b"; break; fi
  done
fi
if [[ -z "$BIN" ]]; then
  echo "demo: building tollgate (release; the next run reuses it)" >&2
  cargo build --release --quiet --bin tollgate
  BIN=target/release/tollgate
fi

# Which port is taken, and by what when `ss` can tell.
declare -A ROLE=([10000]="Envoy listener" [9901]="Envoy admin" [9002]="tollgate gRPC"
  [9003]="tollgate admin" [8080]="demo upstream" [8081]="demo authorization service")
busy=0
for port in 10000 9901 9002 9003 8080 8081; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    who="$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'users:(([^)]*))' | head -n1 || true)"
    echo "demo: port $port (${ROLE[$port]}) is in use${who:+ by $who}; stop whatever listens there first" >&2
    busy=1
  fi
done
((busy == 0)) || exit 1

LOGS="$(mktemp -d)"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo: stopped (logs were in $LOGS)" >&2
}
trap cleanup EXIT INT TERM

python3 scripts/demo_upstream.py 8080 --authz 8081 >"$LOGS/upstream.log" 2>&1 & PIDS+=($!)
# The management API is open without a token here because everything listens on 127.0.0.1;
# in production give --admin-token-file. The store (and the quota counters checkpointed in
# it) live in this run's temporary directory: a rerun starts clean.
"$BIN" serve --config policies --grpc-addr 127.0.0.1:9002 --admin-addr 127.0.0.1:9003 \
  --embedder-model-dir .tools/embed-model \
  --data-dir "$LOGS/data" --admin-insecure --shutdown-grace 0s --drain-timeout 2s \
  >"$LOGS/tollgate.log" 2>&1 & PIDS+=($!)
.tools/envoy/envoy -c deploy/envoy/envoy-local.yaml --base-id 7 -l warning >"$LOGS/envoy.log" 2>&1 & PIDS+=($!)

for _ in $(seq 150); do
  curl -sf localhost:9003/readyz >/dev/null 2>&1 && curl -sf localhost:9901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf localhost:9003/readyz >/dev/null || { echo "demo: tollgate did not start:"; cat "$LOGS/tollgate.log"; exit 1; }
curl -sf localhost:9901/ready >/dev/null || { echo "demo: Envoy did not start:"; cat "$LOGS/envoy.log"; exit 1; }

TRY="$(cat <<'TXT'
  curl -s localhost:10000/hello                       -> 200, upstream echo shows x-tollgate-flow: api
  curl -si localhost:10000/admin                      -> 403, Apigee fault JSON (RaiseFault)
  curl -si localhost:10000/v1/chat/completions -H 'x-block: yes' -d '{"model":"m"}'
                                                      -> 403, OpenAI error JSON
  curl -sN localhost:10000/sse                        -> 200, server-sent events, streamed through
  curl -s localhost:9003/metrics                      -> 200, Prometheus metrics (grep ^tollgate_)

API keys (policies/api-keys.yaml guards /v1/models):
  curl -si localhost:10000/v1/models                  -> 401 oauth.v2.FailedToResolveAPIKey
  curl -s -XPOST localhost:9003/v1/apps -H 'content-type: application/json' \
       -d '{"name":"my-app","developerEmail":"me@example.com","products":["models-read"]}'
                                                      -> 201, the app
  KEY=$(curl -s -XPOST localhost:9003/v1/apps/my-app/keys | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
                                                      (the new key; shown once)
  curl -s localhost:10000/v1/models -H "x-api-key: $KEY"   -> 200
TXT
)"

if [[ "$MODE" == run ]]; then
  cat <<TXT

tollgate is running with policies/ behind Envoy on http://localhost:10000 ($BIN). Try:

$TRY

Each example in policies/ shows more commands in its comments (tollgate there is $BIN);
scripts/demo.sh --try runs them all. Edit policies/quickstart.yaml and the change applies
within a second (a broken edit is refused and logged; the running configuration stays).
Ctrl-C stops everything.
TXT
  tail -f "$LOGS/tollgate.log" &
  PIDS+=($!)
  wait "${PIDS[1]}"
  exit 0
fi

# --try: the commands above, then every example's, each with the status codes it got and
# what the text says it should get. A command's own output is not shown (it holds keys,
# request ids and times that differ from run to run); see it by running it yourself.
mkdir -p "$LOGS/bin"
ln -sf "$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" "$LOGS/bin/tollgate"
printf '%s\n' "$TRY" | python3 scripts/demo_commands.py --stdin demo.sh policies/*.yaml >"$LOGS/try.sh"
PATH="$LOGS/bin:$PATH" bash "$LOGS/try.sh"
