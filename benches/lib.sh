# Shell helpers shared by the Envoy benchmark scripts (sourced, not run). The sourcing
# script defines `log MESSAGE` first.

# bench_init NAME: a work dir in $WORK (kept when KEEP=1) and $PIDS, whose processes are
# killed and reaped on exit.
bench_init() {
  WORK="$(mktemp -d "/tmp/$1.XXXXXX")"
  PIDS=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}
bench_cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ "${KEEP:-0}" == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}

# N distinct free loopback ports.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait_for SECONDS PID CMD...: poll CMD until it succeeds, fail if PID dies or time runs out.
wait_for() {
  local secs="$1" pid="$2"; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || return 1
    ((SECONDS < end)) || return 1
    sleep 0.1
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() { # start NAME CMD...: run in background, log to $WORK/NAME.log, pid in $LAST_PID
  local name="$1"; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# Envoy 1.40 can segfault when it shuts down while ext_proc gRPC streams are still open (they
# linger for a few ms after the HTTP requests end). So: wait until the ext_proc cluster has no
# active request (at most 5 s), then /quitquitquit; SIGTERM only if still running 10 s later.
# Uses $ADMIN_PORT.
stop_envoy() {
  local pid="$1" i active
  for ((i = 0; i < 100; i++)); do
    active="$(curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/stats?filter=^cluster\.ext_proc_cluster\.upstream_rq_active\$" \
      | awk -F': ' '{print $2}')"
    [[ "${active:-0}" == 0 ]] && break
    sleep 0.05
  done
  curl -s -o /dev/null -X POST --max-time 2 "http://127.0.0.1:$ADMIN_PORT/quitquitquit" || true
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  stop "$pid"
}

# grpc_cluster NAME HOST PORT: a static HTTP/2 cluster, as YAML lines under `clusters:`.
grpc_cluster() {
  cat <<EOF
  - name: $1
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: $1
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $2, port_value: $3}}}}]}]
EOF
}

# envoy_bootstrap FILE ROUTES FILTERS CLUSTERS: a listener on $LISTEN_PORT (admin on
# $ADMIN_PORT) routing to the cluster `upstream` (127.0.0.1:$UP_PORT). ROUTES are the route
# entries (14-space indent), FILTERS the HTTP filters before the router (each starting with a
# newline, 10-space indent), CLUSTERS more clusters (grpc_cluster's form). Based on
# /work/shared/reference/envoy-ext-proc.yaml.
envoy_bootstrap() {
  cat >"$1" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $ADMIN_PORT}}}
layered_runtime:
  layers:
  - name: static
    static_layer: {envoy.reloadable_features.ext_proc_graceful_grpc_close: true}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: $LISTEN_PORT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
$2
          http_filters:$3
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
$4
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP_PORT}}}}]}]
EOF
}
