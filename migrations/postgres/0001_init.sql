-- Countersign schema, PostgreSQL. Applied by `countersign migrate` and at start-up; sqlx holds
-- an advisory lock while migrating, so several instances may start at once.

-- The event log (postgres-es names its INSERT columns, so the extra columns are ours).
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        jsonb                        NOT NULL,
    metadata       jsonb                        NOT NULL,
    -- Global, commit-ordered position; assigned by the trigger below.
    position       bigint                       NOT NULL,
    recorded_at    timestamptz                  NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_position_idx ON events (position);

CREATE SEQUENCE events_position_seq AS bigint;

-- Positions must be commit-ordered: a reader that has seen position N must already be able to
-- see every event below N. A plain sequence is not (a transaction that drew a smaller number may
-- commit later). The transaction-scoped advisory lock, taken before drawing the number and held
-- until commit, makes appends take positions in commit order. Rolled-back appends leave unused
-- numbers, never invisible ones.
CREATE FUNCTION events_assign_position() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_advisory_xact_lock(7236481193);
    NEW.position := nextval('events_position_seq');
    NEW.recorded_at := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER events_assign_position
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_assign_position();

-- Events are append-only through the application role.
CREATE FUNCTION events_forbid_change() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_forbid_change();

-- Read side: one row per view document, updated with its checkpoint in one transaction.
CREATE TABLE projection_checkpoints
(
    name     text PRIMARY KEY,
    position bigint NOT NULL
);
INSERT INTO projection_checkpoints (name, position) VALUES ('views', 0);

CREATE TABLE views
(
    kind             text   NOT NULL,
    id               text   NOT NULL,
    owner_user_id    text,
    wallet_address   text,
    api_key_id       text,
    status           text,
    created_position bigint NOT NULL,
    position         bigint NOT NULL,
    payload          jsonb  NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX views_owner_idx ON views (kind, owner_user_id, created_position);
CREATE INDEX views_api_key_idx ON views (kind, api_key_id, created_position);
CREATE INDEX views_status_idx ON views (kind, status);

-- Secrets live outside the event log (auditors read events). Each is sealed with envelope
-- encryption bound to its owner; rows are only ever inserted, and events decide which is live.
CREATE TABLE user_credentials
(
    user_id        text PRIMARY KEY,
    username       text        NOT NULL,
    username_key   text        NOT NULL UNIQUE,
    password_hash  text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mfa_secrets
(
    secret_id  text PRIMARY KEY,
    user_id    text        NOT NULL,
    sealed     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE wallet_keys
(
    wallet_address text PRIMARY KEY,
    owner_user_id  text        NOT NULL,
    sealed         bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_key_credentials
(
    api_key_id text PRIMARY KEY,
    key_hash   text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
