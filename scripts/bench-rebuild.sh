#!/usr/bin/env bash
# #5 rebuild, alternating binaries on one kept database (BENCHMARKS.md, "rebuild folds in
# place"): each run is a CHECKPOINT, then `countersign projections rebuild`, printing its
# events/s, the client's CPU (user, system) and the whole machine's busy CPU over the run.
#
#   KEEP=1 GENERATE_ONLY=1 scripts/bench-audit.sh              # the 1M-event database, kept
#   scripts/bench-rebuild.sh [RUNS] BIN [BIN...]                # e.g. 5 /tmp/before/countersign target/release/countersign
#
# DATABASE_URL defaults to that database on the local PostgreSQL.
set -euo pipefail
RUNS=${1:?runs per binary}
shift
[ $# -gt 0 ] || { echo "usage: $0 RUNS BIN [BIN...]" >&2; exit 1; }
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/countersign_audit_bench}"
export COUNTERSIGN_MASTER_KEY="${COUNTERSIGN_MASTER_KEY:-$(head -c 32 /dev/urandom | base64)}"
export RUST_LOG=error
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
ticks=$(getconf CLK_TCK)
for _ in $(seq "$RUNS"); do
  for bin in "$@"; do
    psql "$DATABASE_URL" -qc CHECKPOINT
    sleep 1
    before=$(busy)
    out=$({ /usr/bin/time -f "client %U s user, %S s system" "$bin" projections rebuild; } 2>&1)
    after=$(busy)
    echo "$bin: $(grep -o '[0-9]* events/s' <<<"$out"), $(tail -n 1 <<<"$out"), machine $(awk -v t="$ticks" -v d=$((after - before)) 'BEGIN {printf "%.2f", d / t}') CPU-s"
  done
done
