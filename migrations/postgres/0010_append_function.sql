-- The writer's fast path (src/writer.rs): a batch of commands appended, projected and
-- announced in ONE statement, so one round trip and one commit per batch.
--
-- Every transaction that writes views sets the checkpoint row's `version` to a fresh random
-- value, so "same position and same version" means "nobody wrote since". The writer computes
-- the view documents itself before sending, which needs the positions the events will get: it
-- predicts them from the checkpoint its own last commit left (or the one still in flight
-- will leave), and this function only writes if the prediction holds:
--   * the checkpoint row is exactly as expected (position and version), so nobody appended or
--     rewrote views in between;
--   * the insert trigger's position sequence is where the checkpoint is, so the trigger hands
--     out exactly checkpoint + 1 … checkpoint + n (no event committed by a writer that does not
--     project is waiting above the checkpoint).
-- Otherwise nothing is written: 'moved' is returned, or the statement fails with CS001 after
-- its checkpoint update (rolled back with it), and the writer takes the general path.
-- Locks are taken in the order every writer takes them: the checkpoint row, then the position
-- lock of the insert trigger.
ALTER TABLE projection_checkpoints ADD COLUMN version bigint NOT NULL DEFAULT 0;

CREATE FUNCTION countersign_append(
    expected_position bigint,
    expected_version  bigint,
    new_version       bigint,
    aggregate_types   text[],
    aggregate_ids     text[],
    sequences         bigint[],
    event_types       text[],
    event_versions    text[],
    payloads          text[],
    metadata          text[],
    view_kinds        text[],
    view_ids          text[],
    view_owners       text[],
    view_wallets      text[],
    view_api_keys     text[],
    view_statuses     text[],
    view_created      bigint[],
    view_positions    bigint[],
    view_documents    text[],
    channel           text,
    notification      text,
    OUT outcome       text,
    OUT recorded      text[])
    LANGUAGE plpgsql AS
$$
DECLARE
    upto           bigint := expected_position + cardinality(aggregate_ids);
    drawn          bigint;
    predicted      boolean;
BEGIN
    UPDATE projection_checkpoints SET position = upto, version = new_version
     WHERE name = 'views' AND position = expected_position AND version = expected_version;
    IF NOT FOUND THEN
        outcome := 'moved';
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7236481193);
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
      INTO drawn FROM events_position_seq;
    IF drawn <> expected_position THEN
        RAISE EXCEPTION 'positions moved: next is %, not %', drawn + 1, expected_position + 1
            USING ERRCODE = 'CS001';
    END IF;
    -- Rows are inserted in ordinality order, so the trigger numbers them in that order; the
    -- documents were computed for exactly that numbering, which is checked row by row.
    WITH input AS (
        SELECT *
          FROM unnest(aggregate_types, aggregate_ids, sequences, event_types, event_versions,
                      payloads, metadata) WITH ORDINALITY AS u(t, i, s, e, v, p, m, n)
    ), inserted AS (
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                            payload, metadata)
        SELECT t, i, s, e, v, p::json, m::json FROM input ORDER BY n
        RETURNING aggregate_type, aggregate_id, sequence, position, recorded_at
    )
    SELECT array_agg(to_char(x.recorded_at AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') ORDER BY input.n),
           bool_and(x.position = expected_position + input.n)
      INTO recorded, predicted
      FROM inserted x
      JOIN input ON (input.t, input.i, input.s) = (x.aggregate_type, x.aggregate_id, x.sequence);
    IF NOT predicted OR cardinality(recorded) <> cardinality(aggregate_ids) THEN
        RAISE EXCEPTION 'positions moved: events were not numbered from %', expected_position + 1
            USING ERRCODE = 'CS001';
    END IF;
    -- Every document is new (the writer only sends batches that create theirs): one that
    -- exists already fails the statement, and the general path sorts it out.
    INSERT INTO views (kind, id, owner_user_id, wallet_address, api_key_id, status,
                       created_position, position, payload)
    SELECT *
      FROM unnest(view_kinds, view_ids, view_owners, view_wallets, view_api_keys,
                  view_statuses, view_created, view_positions, view_documents);
    PERFORM pg_notify(channel, notification);
    outcome := 'ok';
END
$$;
