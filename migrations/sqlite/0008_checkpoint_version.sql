-- Every transaction that writes views sets the checkpoint row's `version` to a fresh random
-- value (see src/writer.rs). PostgreSQL's writer uses it to know that nobody wrote since its
-- own last commit; on SQLite it is kept the same way so the statements stay the same.
ALTER TABLE projection_checkpoints ADD COLUMN version integer NOT NULL DEFAULT 0;
