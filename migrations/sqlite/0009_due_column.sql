-- A pending transaction's deadline is written with the document (`ViewDoc::due_at`), as on
-- PostgreSQL (its migration 0011), instead of being generated from it: one way to fill the
-- column on both backends, and no JSON parsed to index a stored document.
DROP INDEX views_due_idx;
ALTER TABLE views DROP COLUMN due_at;
ALTER TABLE views ADD COLUMN due_at text;
UPDATE views SET due_at = json_extract(payload, '$.expires_at')
 WHERE kind = 'transaction' AND status = 'pending_authorization';
CREATE INDEX views_due_idx ON views (due_at) WHERE due_at IS NOT NULL;
