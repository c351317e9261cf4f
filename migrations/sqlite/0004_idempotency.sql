-- Idempotency keys (`Idempotency-Key` header): one row per caller and key. A request first
-- reserves its key (state 'in_progress', held by `owner` until `locked_until`), runs, then
-- stores its response ('completed'); a repeat with the same request replays it. Times are unix
-- milliseconds. Rows past `expires_at` are treated as absent and purged in the background.
CREATE TABLE idempotency_keys
(
    scope           text    NOT NULL, -- the caller: 'api_key:<id>' or 'user:<id>'
    idempotency_key text    NOT NULL,
    request_hash    text    NOT NULL, -- HMAC-SHA256 of method, path and body bytes
    state           text    NOT NULL CHECK (state IN ('in_progress', 'completed')),
    owner           text    NOT NULL, -- random id of the request holding the reservation
    locked_until    integer NOT NULL, -- an in_progress row past this may be taken over
    status_code     integer,
    response_body   text,
    created_at      integer NOT NULL,
    expires_at      integer NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
) STRICT;
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
