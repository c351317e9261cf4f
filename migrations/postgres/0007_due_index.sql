-- Prompts waiting for their human, by deadline: the expiry worker reads only those due instead
-- of every pending view on every tick. Derived from the document, so it can never disagree.
ALTER TABLE views ADD COLUMN due_at text GENERATED ALWAYS AS (
    CASE WHEN kind = 'transaction' AND status = 'pending_authorization'
         THEN payload ->> 'expires_at' END) STORED;
CREATE INDEX views_due_idx ON views (due_at) WHERE due_at IS NOT NULL;
-- Fresh databases have no statistics yet; without them the planner may scan instead of using
-- the indexes above.
ANALYZE views;
ANALYZE events;
