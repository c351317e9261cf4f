-- As on PostgreSQL (its migration 0012): the index on (kind, status) held every document but
-- served one question, which transactions are executed and waiting for their receipt. A
-- partial index holds just those; the queries spell its predicate out, as SQLite needs to use
-- it (Db::executed_transactions). It leads with `status` although that is constant in it:
-- without statistics (SQLite gathers none unless asked) the planner otherwise prefers any
-- index with an equality on `kind`, i.e. a scan of every transaction.
DROP INDEX views_status_idx;
CREATE INDEX views_executed_idx ON views (status, position)
    WHERE kind = 'transaction' AND status = 'executed';
