#!/usr/bin/env bash
# Runs `tollgate import` over every bundle of the public Apigee sample repositories and
# prints the share converted / approximated / refused, and what blocks the refused ones.
#
# The repositories are cloned (shallow) into .tools/apigee-samples (git-ignored; set
# APIGEE_SAMPLES_DIR to use another folder). Without network access the script says
# SKIPPED and exits 0: CI has no network, and the committed look-alike corpus
# (tests/data/apigee-bundles, `cargo test --test import_corpus`) is the tested proof.
#
#   scripts/fetch-apigee-samples.sh            # clone or update, import, summarise
#   TOLLGATE_BIN=target/release/tollgate scripts/fetch-apigee-samples.sh
#   APIGEE_SAMPLES_OFFLINE=1 APIGEE_SAMPLES_DIR=DIR scripts/fetch-apigee-samples.sh
#                                              # no fetching: import the bundles under DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEST="${APIGEE_SAMPLES_DIR:-$ROOT/.tools/apigee-samples}"
REPOS=(apigee/api-platform-samples apigee/devrel GoogleCloudPlatform/apigee-samples)

if [[ "${APIGEE_SAMPLES_OFFLINE:-0}" == 1 ]]; then
  echo "== offline: importing the bundles already under $DEST"
elif ! timeout 20 git ls-remote --exit-code "https://github.com/${REPOS[0]}" HEAD >/dev/null 2>&1; then
  echo "fetch-apigee-samples: SKIPPED: github.com is not reachable from this machine (the look-alike corpus in tests/data/apigee-bundles is what CI tests)"
  exit 0
else
 mkdir -p "$DEST"
 for repo in "${REPOS[@]}"; do
  dir="$DEST/${repo//\//__}"
  if [[ -d "$dir/.git" ]]; then
    echo "== updating $repo"
    git -C "$dir" pull --quiet --ff-only || echo "   (update failed: using the copy there)"
  else
    echo "== cloning $repo"
    git clone --quiet --depth 1 "https://github.com/$repo" "$dir"
  fi
 done
fi

BIN="${TOLLGATE_BIN:-$ROOT/target/debug/tollgate}"
if [[ ! -x "$BIN" ]]; then
  echo "== building tollgate"
  cargo build --quiet --bin tollgate
  BIN="$ROOT/target/debug/tollgate"
fi

OUT="$DEST/.converted"
REPORTS="$DEST/.reports"
rm -rf "$OUT" "$REPORTS"
mkdir -p "$OUT" "$REPORTS"
n=0
errors=0
while IFS= read -r -d '' bundle; do
  n=$((n + 1))
  id="$(printf '%05d' "$n")"
  # Exit 0: converted or approximated; 2: some element not convertible; both wrote a
  # configuration that `tollgate import` checked as `tollgate validate` would. 1: an error.
  set +e
  "$BIN" import --json "$bundle" "$OUT/$id" >"$REPORTS/$id.json" 2>"$REPORTS/$id.err"
  rc=$?
  set -e
  if [[ $rc -eq 1 ]]; then
    errors=$((errors + 1))
    echo "   error: $bundle: $(head -c 300 "$REPORTS/$id.err")"
    rm -f "$REPORTS/$id.json"
  fi
done < <(find "$DEST" -path "$OUT" -prune -o -path "$REPORTS" -prune -o -type d \( -name apiproxy -o -name sharedflowbundle \) -print0 | sort -z)

python3 - "$REPORTS" "$n" "$errors" <<'PY'
import collections, glob, json, os, sys
reports, total, errors = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
outcomes = collections.Counter()
elements = collections.Counter()
blockers = collections.Counter()
for f in sorted(glob.glob(os.path.join(reports, "*.json"))):
    try:
        r = json.load(open(f))
    except ValueError:
        continue
    outcomes[r["outcome"]] += 1
    for k, v in r["counts"].items():
        elements[k] += v
    # What blocks a bundle: the root element type of each not-convertible item, once per bundle.
    seen = set()
    for i in r["elements"]:
        if i["status"] != "notConvertible":
            continue
        el = i["element"]
        if "/policies/" in i["file"]:
            what = el.split("/")[0].split("[")[0]
        elif "FaultRule" in el:
            what = "FaultRules"
        elif "/Step[" in el:
            continue  # a step of a policy counted above
        else:
            what = el.split("/")[-1].split("[")[0]
        seen.add(what)
    for w in seen:
        blockers[w] += 1
done = sum(outcomes.values())
pct = lambda k, of: 100.0 * k / of if of else 0.0
print(f"\n{total} bundles found, {done} imported, {errors} errors")
for k in ("converted", "approximated", "notConvertible"):
    print(f"  {k:15} {outcomes[k]:5}  {pct(outcomes[k], done):5.1f} %")
el = sum(elements.values())
print(f"{el} elements: " + ", ".join(f"{elements[k]} {k} ({pct(elements[k], el):.1f} %)" for k in ("converted", "approximated", "notConvertible")))
print("what keeps bundles from converting (bundles affected):")
for w, c in blockers.most_common(15):
    print(f"  {c:5}  {w}")
PY
echo "reports: $REPORTS (one JSON per bundle), configurations: $OUT"
