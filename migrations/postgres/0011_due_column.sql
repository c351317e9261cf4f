-- A pending transaction's deadline gets a column of its own, written with the document
-- (`ViewDoc::due_at`), instead of a partial index on `payload::json ->> 'expires_at'`: that
-- index made PostgreSQL parse every pending document it stored, ~10 µs each on an idle core,
-- and every prepare stores one, inside the writer's one-at-a-time commit (src/writer.rs).
-- The expiry worker's query reads the column through its partial index as before.
DROP INDEX views_due_idx;
ALTER TABLE views ADD COLUMN due_at text COLLATE "C";
UPDATE views SET due_at = payload::json ->> 'expires_at'
 WHERE kind = 'transaction' AND status = 'pending_authorization';
CREATE INDEX views_due_idx ON views (due_at) WHERE due_at IS NOT NULL;

-- The writer's fast path writes the column too: the function of migration 0010 with one more
-- array, `view_dues`.
DROP FUNCTION countersign_append(bigint, bigint, bigint, text[], text[], bigint[], text[], text[],
                                 text[], text[], text[], text[], text[], text[], text[], text[],
                                 bigint[], bigint[], text[], text, text);

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
    view_dues         text[],
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
                       created_position, position, payload, due_at)
    SELECT *
      FROM unnest(view_kinds, view_ids, view_owners, view_wallets, view_api_keys,
                  view_statuses, view_created, view_positions, view_documents, view_dues);
    PERFORM pg_notify(channel, notification);
    outcome := 'ok';
END
$$;
