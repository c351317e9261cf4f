-- Access tokens ended by a logout (their `jti`), kept until they would have expired anyway
-- (`expires_at`, unix seconds) and then purged. The `LoggedOut` event on the user is the
-- record; this table is what every authenticated request checks.
CREATE TABLE revoked_tokens
(
    token_id   text   PRIMARY KEY,
    user_id    text   NOT NULL,
    expires_at bigint NOT NULL
);
CREATE INDEX revoked_tokens_expires_at ON revoked_tokens (expires_at);

-- A WebSocket ticket remembers the access token it was issued for, so a socket is not
-- opened (and is closed) for a token revoked in the meantime.
ALTER TABLE ws_tickets ADD COLUMN token_id text;
ALTER TABLE ws_tickets ADD COLUMN token_version bigint;
