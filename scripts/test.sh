#!/usr/bin/env bash
# The full test suite: domain unit tests, then the integration tests against the real server on
# embedded SQLite — and on PostgreSQL too when TEST_DATABASE_URL is set (e.g.
# postgres://postgres@127.0.0.1:5432/test; each test creates and drops its own database) — with
# a private anvil chain per test.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -e node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil ] || [ -e node_modules/.bin/anvil ] \
  || npm ci --no-audit --no-fund
if [ -z "${ANVIL_BIN:-}" ] && [ ! -e node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil ]; then
  # Other platforms: let the npm shim resolve the binary.
  export ANVIL_BIN="$PWD/node_modules/.bin/anvil"
fi

# Tests mostly wait on the network and on TOTP time steps: run many at once.
cargo test --workspace --all-targets -- --test-threads="${TEST_THREADS:-16}"

# The browser end-to-end test drives the web page in headless Chromium (Debian's `chromium`
# package; playwright-core cannot download browsers here). It uses the server binary built above.
export COUNTERSIGN_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/debug/countersign"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  node --test tests/e2e/
else
  echo "SKIPPED browser end-to-end test: no Chromium at $CHROMIUM (apt-get install chromium)"
  [ -z "${CI:-}" ] || exit 1
fi
