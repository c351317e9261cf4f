-- Tamper evidence (see README "Audit"). Same shape as the PostgreSQL schema.

CREATE TRIGGER events_no_delete
    BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE audit_signing_keys
(
    key_id             text PRIMARY KEY,
    public_key         blob NOT NULL,
    sealed_private_key blob NOT NULL,
    created_at         text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE event_seals
(
    position       integer PRIMARY KEY,
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       integer NOT NULL,
    payload_hash   blob    NOT NULL,
    hash           blob    NOT NULL,
    prev_hash      blob    NOT NULL,
    accumulator    blob    NOT NULL
) STRICT;

CREATE TABLE audit_checkpoints
(
    seq                  integer PRIMARY KEY,
    position             integer NOT NULL,
    event_count          integer NOT NULL,
    accumulator          blob    NOT NULL,
    prev_checkpoint_hash blob    NOT NULL,
    key_id               text    NOT NULL,
    signature            blob    NOT NULL,
    signed_at            text    NOT NULL
) STRICT;

CREATE TRIGGER event_seals_no_update
    BEFORE UPDATE ON event_seals
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
CREATE TRIGGER event_seals_no_delete
    BEFORE DELETE ON event_seals
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
CREATE TRIGGER audit_checkpoints_no_update
    BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
CREATE TRIGGER audit_checkpoints_no_delete
    BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;

INSERT INTO projection_checkpoints (name, position) VALUES ('seals', 0);
