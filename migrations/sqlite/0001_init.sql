-- Countersign schema, SQLite (the embedded default). Same shape as the PostgreSQL schema.

CREATE TABLE events
(
    aggregate_type text                          NOT NULL,
    aggregate_id   text                          NOT NULL,
    sequence       integer CHECK (sequence >= 0) NOT NULL,
    event_type     text                          NOT NULL,
    event_version  text                          NOT NULL,
    payload        text                          NOT NULL,
    metadata       text                          NOT NULL,
    -- Global, commit-ordered position. SQLite has a single writer, so positions assigned inside
    -- the writing transaction are commit-ordered by construction.
    position       integer UNIQUE,
    recorded_at    text                          NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE TRIGGER events_assign_position
    AFTER INSERT ON events
    FOR EACH ROW WHEN NEW.position IS NULL
BEGIN
    UPDATE events
    SET position = (SELECT COALESCE(MAX(position), 0) + 1 FROM events)
    WHERE rowid = NEW.rowid;
END;

-- Append-only: the only permitted update is the position assignment above.
CREATE TRIGGER events_append_only
    BEFORE UPDATE ON events
    FOR EACH ROW WHEN OLD.position IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE projection_checkpoints
(
    name     text PRIMARY KEY,
    position integer NOT NULL
) STRICT;
INSERT INTO projection_checkpoints (name, position) VALUES ('views', 0);

CREATE TABLE views
(
    kind             text    NOT NULL,
    id               text    NOT NULL,
    owner_user_id    text,
    wallet_address   text,
    api_key_id       text,
    status           text,
    created_position integer NOT NULL,
    position         integer NOT NULL,
    payload          text    NOT NULL,
    PRIMARY KEY (kind, id)
) STRICT;
CREATE INDEX views_owner_idx ON views (kind, owner_user_id, created_position);
CREATE INDEX views_api_key_idx ON views (kind, api_key_id, created_position);
CREATE INDEX views_status_idx ON views (kind, status);

CREATE TABLE user_credentials
(
    user_id       text PRIMARY KEY,
    username      text NOT NULL,
    username_key  text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE mfa_secrets
(
    secret_id  text PRIMARY KEY,
    user_id    text NOT NULL,
    sealed     blob NOT NULL,
    created_at text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE wallet_keys
(
    wallet_address text PRIMARY KEY,
    owner_user_id  text NOT NULL,
    sealed         blob NOT NULL,
    created_at     text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE api_key_credentials
(
    api_key_id text PRIMARY KEY,
    key_hash   text NOT NULL UNIQUE,
    created_at text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
