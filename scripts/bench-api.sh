#!/usr/bin/env bash
# One `loadgen` scenario against a fresh server, database and anvil, as BENCHMARKS.md runs them,
# plus each process's CPU over 10 s in the middle of the load (what bounds it).
#
#   scripts/bench-api.sh [BIN_DIR] SCENARIO [loadgen args...]
#   scripts/bench-api.sh target/release prepare                # 8 agents, 20 s, pgbench baseline
#   scripts/bench-api.sh target/release prepare --baseline false
#   scripts/bench-api.sh target/release status
#   scripts/bench-api.sh target/release ws --rate 200
#
# BIN_DIR holds `countersign` and `loadgen` (default target/release; build them with
# `cargo build --release --bin countersign --bin loadgen`). Environment: DATABASE (default
# countersign_bench, dropped and created on the local PostgreSQL), AGENTS (8), DURATION (20),
# PORT (18080), CHAIN_PORT (18545). Needs pgbench for the prepare baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
SCENARIO=${2:?scenario: prepare, status, ws, flow, login or idle}
shift 2
DATABASE=${DATABASE:-countersign_bench}
PORT=${PORT:-18080}
CHAIN_PORT=${CHAIN_PORT:-18545}
ANVIL=node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
[ -x "$ANVIL" ] || ANVIL=node_modules/.bin/anvil
WORK=$(mktemp -d)
cleanup() {
  kill "${SERVER:-}" "${CHAIN:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$ANVIL" --port "$CHAIN_PORT" --silent &
CHAIN=$!
dropdb -h 127.0.0.1 -U postgres --if-exists --force "$DATABASE"
createdb -h 127.0.0.1 -U postgres "$DATABASE"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DATABASE"
export WEB3_PROVIDER_URI="http://127.0.0.1:$CHAIN_PORT" COUNTERSIGN_ADDR="127.0.0.1:$PORT"
export RUST_LOG=warn JWT_SECRET_KEY=$(openssl rand -hex 20)
export COUNTERSIGN_MASTER_KEY=$(openssl rand -base64 32)
# The per-key request limit would cap the readers of `status`.
export COUNTERSIGN_API_KEY_RATE=0
ulimit -n 20000 2>/dev/null || true
"$BIN/countersign" serve >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done

LOAD=(--url "http://127.0.0.1:$PORT" --server-pid "$SERVER")
case "$SCENARIO" in
  prepare | status | ws | flow | login) LOAD+=(--agents "${AGENTS:-8}" --duration "${DURATION:-20}") ;;
esac
[ "$SCENARIO" = flow ] && LOAD+=(--chain-url "$WEB3_PROVIDER_URI")
"$BIN/loadgen" "$SCENARIO" "${LOAD[@]}" "$@" >"$WORK/out.txt" 2>&1 &
LOADGEN=$!

# CPU ticks (1/100 s) of every PostgreSQL process, the chain and the server.
ticks() {
  for p in $(pgrep -x postgres) ; do awk '{print "postgres", $14 + $15}' "/proc/$p/stat" 2>/dev/null; done
  awk '{print "anvil", $14 + $15}' "/proc/$CHAIN/stat"
  awk '{print "server", $14 + $15}' "/proc/$SERVER/stat"
}
for _ in $(seq 600); do
  grep -q "setup: done" "$WORK/out.txt" 2>/dev/null && break
  kill -0 "$LOADGEN" 2>/dev/null || break
  sleep 0.1
done
sleep 3
BEFORE=$(ticks 2>/dev/null || true)
sleep 10
AFTER=$(ticks 2>/dev/null || true)
wait "$LOADGEN" || { cat "$WORK/out.txt"; exit 1; }
grep -v '^setup' "$WORK/out.txt"
python3 - "$BEFORE" "$AFTER" <<'PY'
import sys
def total(text):
    out = {}
    for line in text.strip().splitlines():
        name, value = line.split()
        out[name] = out.get(name, 0) + int(value)
    return out
before, after = total(sys.argv[1]), total(sys.argv[2])
print("CPU, % of one core, 10 s in the middle of the load:",
      ", ".join(f"{k} {(after[k] - before.get(k, 0)) / 10:.0f}" for k in after))
PY
