#!/usr/bin/env bash
# Copy envoy/service/ext_proc/v3/external_processor.proto and its whole import closure
# from the envoy-types crate's packaged proto sources (cargo registry) into proto/.
# Afterwards: ghz --proto proto/envoy/service/ext_proc/v3/external_processor.proto --import-paths proto
# google/protobuf/*.proto (well-known types) are not shipped by envoy-types; protoc, grpcio-tools
# and ghz carry them built in.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/proto"
ENTRY="envoy/service/ext_proc/v3/external_processor.proto"

find_crate_dir() {
  local meta dir=""
  for offline in --offline ""; do
    if meta="$(cd "$ROOT" && cargo metadata --format-version 1 $offline 2>/dev/null)"; then
      dir="$(printf '%s' "$meta" | python3 -c '
import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "envoy-types"]
pkgs.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in p["version"].split(".")])
print(os.path.dirname(pkgs[-1]["manifest_path"]) if pkgs else "")
')"
      if [[ -n "$dir" && -d "$dir/proto" ]]; then echo "$dir"; return 0; fi
    fi
  done
  # Fallback: newest envoy-types in the local cargo registry.
  dir="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/envoy-types-*/ 2>/dev/null | sort -V | tail -n1 || true)"
  if [[ -n "$dir" && -d "$dir/proto" ]]; then echo "${dir%/}"; return 0; fi
  return 1
}

CRATE="$(find_crate_dir)" || {
  echo "protos.sh: envoy-types sources not found (run 'cargo fetch' in $ROOT first)" >&2
  exit 1
}

# Compute the import closure and copy it. Roots searched in this order.
python3 - "$CRATE/proto" "$DEST" "$ENTRY" "$ROOT" <<'PY'
import os, re, shutil, subprocess, sys

src, dest, entry, repo = sys.argv[1:5]
roots = [os.path.join(src, r) for r in (
    "data-plane-api", "xds", "protoc-gen-validate", "googleapis", "cel-spec/proto",
    "opentelemetry-proto", "client_model", "ratelimit")]
imp = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.M)
builtin = lambda p: p.startswith("google/protobuf/")  # well-known types: built into protoc/ghz

def locate(rel):
    for r in roots:
        f = os.path.join(r, rel)
        if os.path.isfile(f):
            return f
    return None

found, missing, todo = {}, [], [entry]
while todo:
    rel = todo.pop()
    if rel in found or builtin(rel):
        continue
    f = locate(rel)
    if f is None:
        missing.append(rel)
        continue
    found[rel] = f
    with open(f, encoding="utf-8") as fh:
        todo.extend(imp.findall(fh.read()))
if missing:
    sys.exit("protos.sh: imports not found in envoy-types sources: " + ", ".join(sorted(missing)))

# Never write over git-tracked files, and only into ignored top-level folders.
tops = sorted({rel.split("/", 1)[0] for rel in found})
def git(*args):
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
if git("rev-parse", "--is-inside-work-tree").returncode == 0:
    tracked = set(git("ls-files", "--", "proto").stdout.split())
    clash = [r for r in found if os.path.join("proto", r) in tracked]
    if clash:
        sys.exit("protos.sh: refusing to overwrite tracked files: " + ", ".join(clash[:5]))
    for t in tops:
        if git("check-ignore", "-q", "--no-index", os.path.join("proto", t) + "/").returncode != 0:
            sys.exit(f"protos.sh: proto/{t}/ is not git-ignored; add '/proto/{t}' to .gitignore")

for t in tops:  # replace wholesale so stale files from another envoy-types version go away
    shutil.rmtree(os.path.join(dest, t), ignore_errors=True)
for rel, f in found.items():
    out = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copyfile(f, out)
print(f"protos: {len(found)} files from {src} -> {dest} ({', '.join(t + '/' for t in tops)})")
PY
