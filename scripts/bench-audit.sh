#!/usr/bin/env bash
# Audit benchmark (BENCHMARKS.md, "Audit"): N synthetic events (default 1,000,000) in a scratch
# PostgreSQL database, then seal, rebuild views and verify with the release binary, each
# printing events/s. Needs psql; PGURL defaults to the local server used by the tests.
#
#   scripts/bench-audit.sh [N]
#
# The events are 4-event transactions (prepared, authorized, executed, confirmed) interleaved
# 100 at a time, as many agents working at once would leave them. The scratch database is
# dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
PGURL="${PGURL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="countersign_audit_bench"
BIN="${COUNTERSIGN_BIN:-target/release/countersign}"
[ -x "$BIN" ] || cargo build --release --bin countersign
if [ $((N % 400)) -ne 0 ]; then echo "N must be a multiple of 400" >&2; exit 1; fi

psql "$PGURL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DBURL="${PGURL%/*}/$DB"
[ -n "${KEEP:-}" ] || trap 'psql "$PGURL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
export DATABASE_URL="$DBURL" RUST_LOG=warn
export COUNTERSIGN_MASTER_KEY="$(head -c 32 /dev/urandom | base64)"
"$BIN" migrate

echo "generating $N events…"
time psql "$DBURL" -q -v n="$N" <<'SQL'
ALTER TABLE events DISABLE TRIGGER events_assign_position;
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                    metadata, position, recorded_at)
SELECT 'Transaction', 'bench-' || t, s,
       (ARRAY['TransactionPrepared', 'TransactionAuthorized', 'TransactionExecuted',
              'TransactionConfirmed'])[s],
       '1.0',
       CASE s
         WHEN 1 THEN jsonb_build_object('TransactionPrepared', jsonb_build_object(
           'transaction_id', 'bench-' || t,
           'wallet_address', '0x' || lpad(to_hex(t % 1000), 40, '0'),
           'owner_user_id', 'user-' || (t % 1000),
           'initiator', jsonb_build_object('type', 'agent', 'api_key_id', 'key-' || (t % 1000),
                                           'api_key_name', 'agent'),
           'kind', 'native',
           'to', '0x70997970c51812dc3a010c7d01b50e0d17dc79c8',
           'token_address', NULL, 'amount', NULL, 'memo', 'invoice ' || t,
           'summary', 'Send 0.000000000000001 ETH to 0x7099…79C8',
           'payload', jsonb_build_object('chain_id', 31337,
                                         'from', '0x' || lpad(to_hex(t % 1000), 40, '0'),
                                         'to', '0x70997970c51812dc3a010c7d01b50e0d17dc79c8',
                                         'value', '1000', 'data', '0x'),
           'payload_digest', md5(t::text) || md5(t::text),
           'prepared_at', '2026-01-01T00:00:00Z', 'expires_at', '2026-01-01T00:15:00Z'))
         WHEN 2 THEN jsonb_build_object('TransactionAuthorized', jsonb_build_object(
           'authorized_by', 'user-' || (t % 1000), 'payload_digest', md5(t::text) || md5(t::text),
           'authorized_at', '2026-01-01T00:01:00Z'))
         WHEN 3 THEN jsonb_build_object('TransactionExecuted', jsonb_build_object(
           'tx_hash', '0x' || md5(t::text) || md5(t::text), 'nonce', t / 1000,
           'gas_limit', 25200, 'max_fee_per_gas', 2000000000, 'max_priority_fee_per_gas', 1000000000,
           'raw_transaction', '0x02f8' || md5(t::text) || md5((t + 1)::text) || md5((t + 2)::text),
           'executed_by', jsonb_build_object('type', 'agent', 'api_key_id', 'key-' || (t % 1000),
                                             'api_key_name', 'agent'),
           'executed_at', '2026-01-01T00:02:00Z'))
         ELSE jsonb_build_object('TransactionConfirmed', jsonb_build_object(
           'block_number', t, 'gas_used', 21000, 'effective_gas_price', 1500000000,
           'confirmed_at', '2026-01-01T00:02:12Z'))
       END,
       jsonb_build_object('actor', CASE s WHEN 2 THEN 'user-' || (t % 1000) ELSE 'key-' || (t % 1000) END,
                          'actor_type', CASE s WHEN 2 THEN 'user' ELSE 'api_key' END,
                          'request_id', 'bench-' || g, 'time', '2026-01-01T00:00:00Z'),
       g, timestamptz '2026-01-01' + g * interval '1 millisecond'
FROM (SELECT g, ((g - 1) / 400) * 100 + ((g - 1) % 400) % 100 AS t, ((g - 1) % 400) / 100 + 1 AS s
      FROM generate_series(1, :n) AS g) AS x;
ALTER TABLE events ENABLE TRIGGER events_assign_position;
SELECT setval('events_position_seq', :n);
VACUUM ANALYZE events;
SQL
psql "$DBURL" -Atc "SELECT 'events: ' || count(*) || ', ' || pg_size_pretty(pg_total_relation_size('events')) FROM events"

[ -z "${GENERATE_ONLY:-}" ] || exit 0
# Before each timed step: let the database finish the previous step's background work (the
# autovacuum of a million fresh rows, dirty buffers), so a step is not timed against it.
settle() {
  until [ "$(psql "$DBURL" -Atc "SELECT count(*) FROM pg_stat_activity
                                  WHERE backend_type = 'autovacuum worker'")" = 0 ]; do sleep 1; done
  psql "$DBURL" -qc "CHECKPOINT"
}
echo "== seal (hash chains + signed checkpoints)"
settle; "$BIN" audit seal
echo "== projections rebuild (all views, first build)"
settle; "$BIN" projections rebuild
echo "== projections rebuild (all views, again: drop and rebuild)"
settle; "$BIN" projections rebuild
echo "== audit verify"
settle; "$BIN" audit verify
echo "== audit export"
"$BIN" audit export --out /tmp/countersign-bench-export.jsonl
ls -la /tmp/countersign-bench-export.jsonl
echo "== audit verify --file (offline)"
KEY="$(psql "$DBURL" -Atc "SELECT encode(public_key, 'hex') FROM audit_signing_keys LIMIT 1")"
"$BIN" audit verify --file /tmp/countersign-bench-export.jsonl --public-key "$KEY"
rm -f /tmp/countersign-bench-export.jsonl
