-- The index on (kind, status) held every document but served one question: which transactions
-- are executed and waiting for their receipt (the receipt worker; a wallet's nonces in flight).
-- A partial index holds just those. Every prepare, and every status change, no longer adds an
-- entry to a large index of a handful of distinct keys, and `projections rebuild` no longer
-- sorts every document for it. The queries spell the predicate out (Db::executed_transactions).
DROP INDEX views_status_idx;
CREATE INDEX views_executed_idx ON views (position)
    WHERE kind = 'transaction' AND status = 'executed';
