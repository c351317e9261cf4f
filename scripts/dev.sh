#!/usr/bin/env bash
# Quick start: a usable local Countersign in one command — a local dev chain (anvil, state kept in
# .countersign-dev/) and the server on http://127.0.0.1:8080 with the embedded SQLite store and
# generated dev secrets. Ctrl-C stops both. Not for production (see README: Configuration).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -e node_modules/.bin/anvil ] || npm ci --no-audit --no-fund
mkdir -p .countersign-dev

port="${ANVIL_PORT:-8545}"
rpc_up() {
  curl -s -o /dev/null -X POST -H 'content-type: application/json' \
    --data '{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}' "http://127.0.0.1:$port"
}
if [ -z "${WEB3_PROVIDER_URI:-}" ]; then
  if ! rpc_up; then
    echo "starting anvil on 127.0.0.1:$port (chain state in .countersign-dev/anvil-state.json)"
    node_modules/.bin/anvil --port "$port" --silent --state .countersign-dev/anvil-state.json &
    anvil_pid=$!
    trap 'kill "$anvil_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 1 50); do rpc_up && break; sleep 0.1; done
  fi
  export WEB3_PROVIDER_URI="http://127.0.0.1:$port"
fi

cargo run --bin countersign -- serve --dev "$@"
