-- Event payloads and metadata, and view documents, are kept as `json` (the text as written)
-- instead of `jsonb`. Nothing queries inside them except the one generated column below, and
-- every reader (aggregate loads, the projector, rebuilds, audit verification and export, every
-- view read) wants the text: `jsonb` parsed it on every write and rendered it anew on every
-- read, half of the database's time in a full replay. Parsed, the text is the same JSON value
-- as before, so existing seals stay valid (they hash the canonical form of the parsed value).
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata TYPE json USING metadata::json;

-- A generated column pins its source column's type: drop it, change the type, derive it again.
DROP INDEX views_due_idx;
ALTER TABLE views DROP COLUMN due_at;
ALTER TABLE views ALTER COLUMN payload TYPE json USING payload::json;
ALTER TABLE views ADD COLUMN due_at text GENERATED ALWAYS AS (
    CASE WHEN kind = 'transaction' AND status = 'pending_authorization'
         THEN payload ->> 'expires_at' END) STORED;
CREATE INDEX views_due_idx ON views (due_at) WHERE due_at IS NOT NULL;
ANALYZE views;
