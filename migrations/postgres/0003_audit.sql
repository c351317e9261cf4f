-- Tamper evidence (see README "Audit"). A single sealer, running after commit in position
-- order, hashes every event into a per-aggregate chain and a global accumulator, and signs a
-- checkpoint over the accumulator after each batch. Writers are never serialized by it.

-- Events were protected against UPDATE only; DELETE and TRUNCATE are refused too.
CREATE TRIGGER events_no_delete
    BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_forbid_change();
CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_forbid_change();

-- The Ed25519 key that signs checkpoints; the private half sealed under the master key.
CREATE TABLE audit_signing_keys
(
    key_id             text PRIMARY KEY,
    public_key         bytea       NOT NULL,
    sealed_private_key bytea       NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- One row per sealed event. `hash` and `accumulator` are what verification checks; the
-- aggregate, sequence and payload hash let a report say what changed.
CREATE TABLE event_seals
(
    position       bigint PRIMARY KEY,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL,
    payload_hash   bytea  NOT NULL,
    hash           bytea  NOT NULL,
    prev_hash      bytea  NOT NULL,
    accumulator    bytea  NOT NULL
);

-- Signed checkpoints, chained by `prev_checkpoint_hash`.
CREATE TABLE audit_checkpoints
(
    seq                  bigint PRIMARY KEY,
    position             bigint NOT NULL,
    event_count          bigint NOT NULL,
    accumulator          bytea  NOT NULL,
    prev_checkpoint_hash bytea  NOT NULL,
    key_id               text   NOT NULL,
    signature            bytea  NOT NULL,
    signed_at            text   NOT NULL
);

CREATE FUNCTION audit_forbid_change() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END
$$;

CREATE TRIGGER event_seals_append_only
    BEFORE UPDATE OR DELETE ON event_seals
    FOR EACH ROW EXECUTE FUNCTION audit_forbid_change();
CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_forbid_change();

-- The sealer's lock row (same discipline as the projector's checkpoint).
INSERT INTO projection_checkpoints (name, position) VALUES ('seals', 0);
