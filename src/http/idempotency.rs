//! `Idempotency-Key`: a client may send a key with a state-changing request (prepare, execute,
//! the user-initiated transfers) and retry it safely. Keys are scoped per caller (API key or
//! user), so two callers never see each other's responses.
//!
//! - First use: the key is *reserved* in its own row (`in_progress`) before the handler runs;
//!   then the response is stored (`completed`). A 2xx or a 4xx that answers the request itself
//!   (400, 403, 404) is stored; a 401, 408, 409 (state that may change), 423, 429 or 5xx is not
//!   (the reservation is released, so a retry runs again).
//! - Same key, same request (a keyed SHA-256 of method, path and body bytes, see
//!   [`crate::crypto::JwtKeys::fingerprint`]: bodies may hold passwords and codes): the stored
//!   status and body are replayed with `Idempotent-Replayed: true`; nothing runs again.
//! - Same key, another request: 409 `idempotency_key_reused`. A repeat while the first is still
//!   running: 409 `idempotency_in_progress`, never a second execution.
//! - Crash safety: if the process dies between running and storing, the `in_progress` row
//!   stays. Once its lease (the request timeout plus a margin) has passed, a retry takes it
//!   over and runs again. That second run is safe: `execute_transaction` returns the first
//!   hash and broadcasts nothing (the aggregate executes once), a user transfer's MFA code was
//!   spent by the first run so the repeat is refused (403 `mfa_code_replayed`, nothing
//!   signed), and a repeated prepare can at worst put a second prompt to the human, which
//!   moves nothing without their code.
//! - Keys expire after `COUNTERSIGN_IDEMPOTENCY_TTL` (24 h): an expired row counts as absent
//!   and the background worker purges them.
//!
//! Stored responses never hold secrets (these endpoints return none); [`holds_secret`] checks
//! every one before it is written.

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ApiError, ApiResult};
use super::extract::{parse_json, AuthAgent, AuthUser};
use crate::app::AppState;
use crate::store::{with_pool, Db, StoreError};

pub const HEADER: &str = "Idempotency-Key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub const MAX_KEY_LEN: usize = 255;
/// How long a reservation holds past the request timeout (which cuts every request off)
/// before another request may take it over, so a live request is never overtaken.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Largest response body kept (these endpoints answer a few hundred bytes).
const MAX_STORED_BODY: usize = 64 * 1024;
/// Field names that would mean a response carries a secret: such a response is never stored.
const SECRET_FIELDS: [&str; 9] = [
    "access_token",
    "api_key",
    "secret",
    "password",
    "private_key",
    "mfa_code",
    "otpauth_uri",
    "qr_png_base64",
    "ticket",
];

/// Who a key belongs to: keys of different callers never meet.
pub struct Scope(String);

impl Scope {
    pub fn agent(agent: &AuthAgent) -> Self {
        Self(format!("api_key:{}", agent.key.api_key_id))
    }

    pub fn user(user: &AuthUser) -> Self {
        Self(format!("user:{}", user.user_id))
    }
}

/// The key and the fingerprint of the request it came with (absent without the header).
pub struct IdempotencyKey(Option<Keyed>);

struct Keyed {
    key: String,
    method: String,
    path: String,
    body: Bytes,
}

impl Keyed {
    /// The request as sent: method, path and body bytes, under a server-keyed digest.
    fn request_hash(&self, state: &AppState) -> String {
        state.jwt.fingerprint(
            "countersign/idempotency/v1",
            &[self.method.as_bytes(), self.path.as_bytes(), &self.body],
        )
    }
}

/// A JSON body (parsed like [`super::extract::ApiJson`]) plus the request's idempotency key.
pub struct Idempotent<T> {
    pub key: IdempotencyKey,
    pub body: T,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Idempotent<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let key = header_key(req.headers())?;
        let method = req.method().as_str().to_owned();
        // Routes are nested under /api; the original URI is the one the client sent.
        let path = req
            .extensions()
            .get::<OriginalUri>()
            .map_or_else(|| req.uri().clone(), |o| o.0.clone());
        let path = path
            .path_and_query()
            .map_or_else(|| path.path().to_owned(), |p| p.as_str().to_owned());
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body exceeds 64 KiB",
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text())
            }
        })?;
        let body = parse_json(&bytes)?;
        let key = key.map(|key| Keyed {
            key,
            method,
            path,
            body: bytes,
        });
        Ok(Self {
            key: IdempotencyKey(key),
            body,
        })
    }
}

/// The header's value, if sent: 1-255 visible ASCII characters, once.
fn header_key(headers: &axum::http::HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &str| ApiError::invalid(HEADER, format!("{HEADER} {why}"));
    if values.next().is_some() {
        return Err(invalid("must be sent once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
        return Err(invalid(&format!(
            "must be 1 to {MAX_KEY_LEN} characters long"
        )));
    }
    if !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "must be printable ASCII without spaces (e.g. a UUID)",
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

impl IdempotencyKey {
    /// Run `work` at most once per key and caller; without a key, just run it.
    pub async fn run<R: IntoResponse>(
        self,
        state: &AppState,
        scope: Scope,
        work: impl Future<Output = ApiResult<R>>,
    ) -> Response {
        let Some(keyed) = self.0 else {
            return work.await.into_response();
        };
        let reservation = state
            .db
            .reserve_idempotency_key(
                &scope.0,
                &keyed.key,
                &keyed.request_hash(state),
                state.idempotency_ttl,
                state.request_timeout + LEASE_MARGIN,
            )
            .await;
        let owner = match reservation {
            Err(e) => return ApiError::from(e).into_response(),
            Ok(Reservation::Acquired { owner }) => owner,
            Ok(Reservation::Replay { status, body }) => return replay(status, body),
            Ok(Reservation::Reused) => {
                return ApiError::conflict(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request: use a new key",
                )
                .with_field(HEADER)
                .into_response()
            }
            Ok(Reservation::InProgress) => {
                return ApiError::conflict(
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still running: retry shortly",
                )
                .with_field(HEADER)
                .into_response()
            }
        };
        let response = work.await.into_response();
        let (parts, body) = response.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_STORED_BODY).await {
            Ok(bytes) => bytes,
            Err(e) => {
                release(state, &scope, &keyed, &owner).await;
                return ApiError::internal(format!("response body unreadable: {e}"))
                    .into_response();
            }
        };
        let stored = std::str::from_utf8(&bytes)
            .ok()
            .filter(|text| storable(parts.status, text));
        match stored {
            Some(text) => {
                let result = state
                    .db
                    .complete_idempotency_key(
                        &scope.0,
                        &keyed.key,
                        &owner,
                        parts.status.as_u16(),
                        text,
                    )
                    .await;
                if let Err(e) = result {
                    // The response still goes out; the reservation lapses after its lease.
                    tracing::error!(error = %e, "could not store an idempotent response");
                }
            }
            None => release(state, &scope, &keyed, &owner).await,
        }
        Response::from_parts(parts, axum::body::Body::from(bytes))
    }
}

async fn release(state: &AppState, scope: &Scope, keyed: &Keyed, owner: &str) {
    if let Err(e) = state
        .db
        .release_idempotency_key(&scope.0, &keyed.key, owner)
        .await
    {
        tracing::error!(error = %e, "could not release an idempotency key");
    }
}

fn replay(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// Whether a response is an answer to the request itself (kept and replayed) rather than to
/// a passing condition (not kept, so a retry runs again). Never one that holds a secret.
fn storable(status: StatusCode, body: &str) -> bool {
    let Ok(json) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    if holds_secret(&json) {
        tracing::error!(%status, "refusing to store a response that holds a secret field");
        debug_assert!(false, "an idempotent endpoint answered with a secret field");
        return false;
    }
    if status.is_success() {
        return true;
    }
    if !status.is_client_error() {
        return false;
    }
    // A 409 answers the state of things (not yet authorized, a concurrent update, simulation
    // against today's chain), which may change: a retry should look again.
    !matches!(
        status,
        StatusCode::UNAUTHORIZED
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::CONFLICT
            | StatusCode::LOCKED
            | StatusCode::TOO_MANY_REQUESTS
    )
}

/// True if any object in `value`, at any depth, has a field named like a secret.
pub fn holds_secret(value: &Value) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| SECRET_FIELDS.contains(&k.as_str()) || holds_secret(v)),
        Value::Array(items) => items.iter().any(holds_secret),
        _ => false,
    }
}

/// What reserving a key found.
enum Reservation {
    /// This request holds the key: run, then complete or release it.
    Acquired { owner: String },
    /// The same request already completed: its stored answer.
    Replay { status: u16, body: String },
    /// The key was used with a different request.
    Reused,
    /// The same request is running now (or its lease has not run out).
    InProgress,
}

fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

type KeyRow = (
    String,
    String,
    String,
    i64,
    Option<i32>,
    Option<String>,
    i64,
);

impl Db {
    /// Reserve `(scope, key)` for a request with `request_hash`, or say why not. Races are
    /// settled by the primary key (one insert wins) and by compare-and-set on `owner`.
    async fn reserve_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        ttl: Duration,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        for _ in 0..4 {
            let now = now_ms();
            let owner = uuid::Uuid::new_v4().to_string();
            let inserted = with_pool!(self, |pool| {
                sqlx::query(
                "INSERT INTO idempotency_keys (scope, idempotency_key, request_hash, state, owner, \
                 locked_until, created_at, expires_at) \
                 VALUES ($1, $2, $3, 'in_progress', $4, $5, $6, $7) \
                 ON CONFLICT (scope, idempotency_key) DO NOTHING"
            )
            .bind(scope)
            .bind(key)
            .bind(request_hash)
            .bind(&owner)
            .bind(now.saturating_add(millis(lease)))
            .bind(now)
            .bind(now.saturating_add(millis(ttl)))
            .execute(pool)
            .await?
            .rows_affected()
            });
            if inserted == 1 {
                return Ok(Reservation::Acquired { owner });
            }
            let row: Option<KeyRow> = with_pool!(self, |pool| sqlx::query_as(
                "SELECT request_hash, state, owner, locked_until, status_code, response_body, \
                 expires_at FROM idempotency_keys WHERE scope = $1 AND idempotency_key = $2"
            )
            .bind(scope)
            .bind(key)
            .fetch_optional(pool)
            .await?);
            let Some((hash, row_state, holder, locked_until, status, body, expires_at)) = row
            else {
                continue;
            };
            if expires_at <= now {
                // Expired: as if never used. Delete it (only if still expired) and retry.
                with_pool!(self, |pool| sqlx::query(
                    "DELETE FROM idempotency_keys \
                     WHERE scope = $1 AND idempotency_key = $2 AND expires_at <= $3"
                )
                .bind(scope)
                .bind(key)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected());
                continue;
            }
            if hash != request_hash {
                return Ok(Reservation::Reused);
            }
            if row_state == "completed" {
                let (Some(status), Some(body)) = (status, body) else {
                    return Err(StoreError::Corrupt(
                        "completed idempotency key without a response".into(),
                    ));
                };
                return Ok(Reservation::Replay {
                    status: u16::try_from(status).unwrap_or(500),
                    body,
                });
            }
            if locked_until > now {
                return Ok(Reservation::InProgress);
            }
            // The holder outlived any request: it died between running and storing.
            let taken = with_pool!(self, |pool| sqlx::query(
                "UPDATE idempotency_keys SET owner = $3, locked_until = $4 \
                 WHERE scope = $1 AND idempotency_key = $2 AND state = 'in_progress' \
                 AND owner = $5"
            )
            .bind(scope)
            .bind(key)
            .bind(&owner)
            .bind(now.saturating_add(millis(lease)))
            .bind(&holder)
            .execute(pool)
            .await?
            .rows_affected());
            if taken == 1 {
                tracing::warn!(scope, "took over an abandoned idempotency key");
                return Ok(Reservation::Acquired { owner });
            }
        }
        Ok(Reservation::InProgress)
    }

    async fn complete_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        owner: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError> {
        let updated = with_pool!(self, |pool| sqlx::query(
            "UPDATE idempotency_keys SET state = 'completed', status_code = $4, \
             response_body = $5 \
             WHERE scope = $1 AND idempotency_key = $2 AND owner = $3 AND state = 'in_progress'"
        )
        .bind(scope)
        .bind(key)
        .bind(owner)
        .bind(i32::from(status))
        .bind(body)
        .execute(pool)
        .await?
        .rows_affected());
        if updated != 1 {
            tracing::warn!(
                scope,
                "idempotency key was taken over before its response was stored"
            );
        }
        Ok(())
    }

    async fn release_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE scope = $1 AND idempotency_key = $2 AND owner = $3 AND state = 'in_progress'"
        )
        .bind(scope)
        .bind(key)
        .bind(owner)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Delete expired keys (background worker); returns how many.
    pub async fn purge_idempotency_keys(&self) -> Result<u64, StoreError> {
        Ok(with_pool!(self, |pool| sqlx::query(
            "DELETE FROM idempotency_keys WHERE expires_at <= $1"
        )
        .bind(now_ms())
        .execute(pool)
        .await?
        .rows_affected()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_bounded_visible_ascii() {
        let check = |v: &[u8]| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_bytes(v).unwrap());
            header_key(&h)
        };
        assert_eq!(
            check(b"abc-123_XYZ").unwrap().as_deref(),
            Some("abc-123_XYZ")
        );
        assert!(check(&[b'k'; MAX_KEY_LEN]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; MAX_KEY_LEN + 1],
            b"has space",
            b"tab\there",
            &[0xC3, 0xA9],
        ] {
            let err = check(bad).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.field.as_deref(), Some(HEADER));
        }
        assert_eq!(header_key(&axum::http::HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn only_answers_to_the_request_itself_are_kept() {
        let ok = json!({"transaction_id": "t"}).to_string();
        let err = |code: &str| json!({"error": {"code": code, "message": "m"}}).to_string();
        assert!(storable(StatusCode::CREATED, &ok));
        assert!(storable(StatusCode::BAD_REQUEST, &err("invalid_field")));
        assert!(storable(StatusCode::FORBIDDEN, &err("invalid_mfa_code")));
        assert!(storable(StatusCode::NOT_FOUND, &err("not_found")));
        assert!(!storable(StatusCode::CONFLICT, &err("invalid_state")));
        assert!(!storable(StatusCode::CONFLICT, &err("conflict")));
        assert!(!storable(StatusCode::UNAUTHORIZED, &err("unauthorized")));
        assert!(!storable(
            StatusCode::TOO_MANY_REQUESTS,
            &err("rate_limited")
        ));
        assert!(!storable(
            StatusCode::SERVICE_UNAVAILABLE,
            &err("chain_unavailable")
        ));
        assert!(!storable(
            StatusCode::INTERNAL_SERVER_ERROR,
            &err("internal_error")
        ));
        assert!(!storable(StatusCode::OK, "not json"));
    }

    #[test]
    fn secret_fields_are_found_at_any_depth() {
        assert!(holds_secret(&json!({"access_token": "x"})));
        assert!(holds_secret(&json!({"a": [{"b": {"private_key": "x"}}]})));
        assert!(!holds_secret(
            &json!({"transaction_id": "t", "tx_hash": "0x", "summary": "Send 1 ETH"})
        ));
    }
}
