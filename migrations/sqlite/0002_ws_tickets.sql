-- Single-use WebSocket tickets for browsers (which cannot set headers on a WebSocket).
-- Stored as SHA-256 hashes; consumed with DELETE … RETURNING.
CREATE TABLE ws_tickets
(
    ticket_hash        text PRIMARY KEY,
    principal_type     text   NOT NULL,
    principal_id       text   NOT NULL,
    expires_at         integer NOT NULL,
    session_expires_at integer
) STRICT;
