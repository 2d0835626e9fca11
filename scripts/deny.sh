#!/usr/bin/env bash
# `cargo deny check` against deny.toml. Installs the pinned cargo-deny into .tools/ when
# missing (from crates.io). Licenses, bans and sources always run. Advisories need the
# RustSec database, fetched from GitHub: they run when it can be fetched (or a fetched copy
# exists, said to be possibly stale), and are reported SKIPPED, not silently passed, when not.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DENY_VERSION="0.20.2"
DENY_ROOT="$ROOT/.tools/cargo-deny"
export PATH="$DENY_ROOT/bin:$PATH"

if [[ "$(cargo-deny --version 2>/dev/null || true)" != "cargo-deny $DENY_VERSION" ]]; then
  echo "setup: cargo install --locked cargo-deny $DENY_VERSION (into .tools/cargo-deny; a few minutes, once)" >&2
  cargo install --locked --quiet cargo-deny --version "$DENY_VERSION" --root "$DENY_ROOT"
fi

echo "== cargo deny check licenses bans sources"
cargo deny --locked check licenses bans sources

DB_DIR="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if timeout 120 cargo deny --locked fetch db >/dev/null 2>&1; then
  echo "== cargo deny check advisories"
  cargo deny --locked --offline check advisories
elif find "$DB_DIR" -mindepth 2 -maxdepth 2 -name crates -type d 2>/dev/null | grep -q .; then
  echo "== cargo deny check advisories (the RustSec database could not be fetched: using the copy in $DB_DIR, possibly stale)"
  cargo deny --locked --offline check advisories
else
  echo "== cargo deny check advisories: SKIPPED: the RustSec advisory database (https://github.com/rustsec/advisory-db) cannot be fetched from this machine and no earlier copy is in $DB_DIR; licenses, bans and sources were checked"
fi
