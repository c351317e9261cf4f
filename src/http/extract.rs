//! Extractors: JSON bodies with field-named errors, request ids, and the two kinds of caller
//! (users with a JWT, agents with an API key). Authentication failures are always JSON 401s.

use std::sync::Arc;

use aggregates::Address;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use projections::{ApiKeyView, TransactionView, ViewKind};
use secrecy::SecretString;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use crate::app::AppState;
use crate::crypto::{ApiKeySecret, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN};
use crate::read_cache::CachedTransaction;
use crate::store::Actor;
use crate::writer::Unchanged;

/// A JSON body. Malformed JSON, wrong types and unknown fields are 400s naming the field;
/// an oversized body is a 413.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
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
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every body is an object (serde would also take a struct from a positional array).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "request body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = if path == "." {
            field_in_message(&message)
        } else {
            Some(path)
        };
        match field {
            Some(field) if !inner.is_syntax() && !inner.is_eof() => {
                ApiError::invalid(&field, message)
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message),
        }
    })?;
    // One object and nothing after it but whitespace: `{…}junk` or `{…}{…}` is not a body.
    de.end()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
    Ok(value)
}

/// serde names the field in "missing field `x`" / "unknown field `x`" / "duplicate field `x`"
/// messages.
fn field_in_message(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))
        .or_else(|| message.strip_prefix("duplicate field `"))?;
    rest.split('`').next().map(str::to_owned)
}

/// A query string, parsed like a JSON body (400 naming the field on error).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let field = if path == "." {
                    field_in_message(&message).unwrap_or_default()
                } else {
                    path
                };
                ApiError::invalid(&field, message)
            })
    }
}

/// The request id set by the request-id layer (or sent by the client).
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .chars()
                .take(128)
                .collect(),
        ))
    }
}

/// A user authenticated by `Authorization: Bearer <jwt>`.
pub struct AuthUser {
    pub user_id: String,
    /// When the access token expires (unix seconds).
    pub expires_at: i64,
    /// The token's id (`jti`): what a logout revokes.
    pub token_id: String,
    /// The user's token version the token was issued under.
    pub token_version: u64,
}

impl AuthUser {
    pub fn actor(&self) -> Actor {
        Actor::user(&self.user_id)
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("missing credentials: send Authorization: Bearer <token>")
        })?;
        let claims = state
            .jwt
            .verify(token)
            .map_err(|_| ApiError::unauthorized("invalid or expired token"))?;
        // Logged out, or issued before a password change or MFA replacement: 401.
        super::sessions::check_session(state, &claims.sub, &claims.jti, claims.ver).await?;
        Ok(Self {
            user_id: claims.sub,
            expires_at: claims.exp,
            token_id: claims.jti,
            token_version: claims.ver,
        })
    }
}

/// An agent authenticated by `X-API-KEY`. Revocation takes effect on the next request: the
/// key's view is read on every call (for status polls from the read cache, which the
/// revocation's commit invalidates; see `read_cache`; for prepares see [`CommandAgent`]).
#[derive(Clone)]
pub struct AuthAgent {
    pub key: ApiKeyView,
}

impl AuthAgent {
    pub fn actor(&self) -> Actor {
        Actor::api_key(&self.key.api_key_id)
    }

    /// Whether this key may act on `wallet` (owned by `owner_user_id`).
    pub fn may_use(&self, wallet: &Address, owner_user_id: &str) -> bool {
        self.key.owner_user_id == owner_user_id && self.key.covers(wallet)
    }
}

/// Rate-limited (see `limits`): an address that keeps presenting bad keys is refused before
/// any lookup, and each key has a request rate. Both refusals are 429 with `Retry-After`.
async fn agent_from_key(state: &AppState, key: &str) -> Result<AuthAgent, ApiError> {
    authenticate_key(state, key, |hash| async move {
        let view = state.db.api_key_view_by_hash(&hash).await?;
        Ok(view.map(|view| (view, ())))
    })
    .await
    .map(|(agent, ())| agent)
}

/// An agent authenticated for a command it asks for (a prepare): the key's view from the
/// node's read cache when it holds it, else from the database, as [`AuthAgent`] otherwise. The
/// command names the view as one it was decided on ([`Unchanged`]), so it commits only if the
/// key is still as read: a revocation committed on any node before the command commits
/// refuses it (then [`CommandAgent::reread`] decides on the database's copy).
pub struct CommandAgent {
    pub agent: AuthAgent,
    /// The key's view as read.
    pub read: Unchanged,
    key_hash: String,
}

impl FromRequestParts<AppState> for CommandAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = api_key_header(parts)
            .ok_or_else(|| ApiError::unauthorized("missing credentials: send X-API-KEY"))?;
        let cache = &state.hub.cache;
        let (agent, (as_of, key_hash)) = authenticate_key(state, key.trim(), |hash| async move {
            if let Some((key, as_of)) = cache.api_key(&hash) {
                return Ok(Some((ApiKeyView::clone(&key), (as_of, hash))));
            }
            let ticket = cache.begin_read();
            let Some((key, as_of)) = state
                .db
                .api_key_view_by_hash_at::<ApiKeyView>(&hash)
                .await?
            else {
                return Ok(None);
            };
            if let Some(ticket) = ticket {
                cache.fill(ticket, &hash, Arc::new(key.clone()), None);
            }
            Ok(Some((key, (as_of, hash))))
        })
        .await?;
        let read = Unchanged {
            kind: ViewKind::ApiKey,
            id: agent.key.api_key_id.clone(),
            as_of,
        };
        Ok(Self {
            agent,
            read,
            key_hash,
        })
    }
}

impl CommandAgent {
    /// The key read again from the database, after a command decided on the copy read before
    /// was refused because the key changed since: 401 if it is revoked now.
    pub async fn reread(&self, state: &AppState) -> Result<Self, ApiError> {
        let found = state
            .db
            .api_key_view_by_hash_at::<ApiKeyView>(&self.key_hash)
            .await?;
        let Some((key, as_of)) = found.filter(|(key, _)| !key.is_revoked()) else {
            return Err(ApiError::unauthorized("invalid or revoked API key"));
        };
        Ok(Self {
            read: Unchanged {
                kind: ViewKind::ApiKey,
                id: key.api_key_id.clone(),
                as_of,
            },
            agent: AuthAgent { key },
            key_hash: self.key_hash.clone(),
        })
    }
}

/// The agent presenting `key` and the transaction `id` (which the caller must still check the
/// agent may see), authenticated exactly as the extractor does: from the hub's read cache when
/// it holds both documents (see `read_cache`), else read in one round trip and kept.
pub(super) async fn agent_with_transaction(
    state: &AppState,
    key: &str,
    id: &str,
) -> Result<(AuthAgent, Option<Arc<CachedTransaction>>), ApiError> {
    let cache = &state.hub.cache;
    authenticate_key(state, key.trim(), |hash| async move {
        if let Some((key, transaction)) = cache.status(&hash, id) {
            return Ok(Some((ApiKeyView::clone(&key), Some(transaction))));
        }
        let ticket = cache.begin_read();
        let found = state
            .db
            .api_key_view_by_hash_and_view::<ApiKeyView, TransactionView>(
                &hash,
                ViewKind::Transaction,
                id,
            )
            .await?;
        let Some((key, view)) = found else {
            return Ok(None);
        };
        let transaction = view
            .map(CachedTransaction::new)
            .transpose()
            .map_err(|e| crate::store::StoreError::Corrupt(e.to_string()))?
            .map(Arc::new);
        if let Some(ticket) = ticket {
            cache.fill(ticket, &hash, Arc::new(key.clone()), transaction.clone());
        }
        Ok(Some((key, transaction)))
    })
    .await
}

/// Authenticate `key` by its credential hash with `lookup`, which returns the key's view and
/// whatever else it read: the rate limits, failure accounting and revocation check of every
/// API-key request.
async fn authenticate_key<T, F, Fut>(
    state: &AppState,
    key: &str,
    lookup: F,
) -> Result<(AuthAgent, T), ApiError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<(ApiKeyView, T)>, crate::store::StoreError>>,
{
    let source_ip = crate::store::SOURCE_IP.try_with(|ip| *ip).ok();
    state.limits.check_api_key_auth(source_ip)?;
    let invalid = || ApiError::unauthorized("invalid or revoked API key");
    // One round trip: the credential and its view (revocation is read on every call).
    let found = if ApiKeySecret::looks_valid(key) {
        lookup(ApiKeySecret::hash_presented(key)).await?
    } else {
        None
    };
    let Some((view, also)) = found.filter(|(view, _)| !view.is_revoked()) else {
        state.limits.api_key_auth_failed(source_ip);
        return Err(invalid());
    };
    state.limits.api_key_request(&view.api_key_id)?;
    Ok((AuthAgent { key: view }, also))
}

/// The `X-API-KEY` header, if sent.
pub(super) fn api_key_header(parts: &Parts) -> Option<&str> {
    parts.headers.get("x-api-key").and_then(|v| v.to_str().ok())
}

/// The agent of an API key id, unless the key is revoked.
pub async fn agent_by_id(state: &AppState, key_id: &str) -> Result<AuthAgent, ApiError> {
    let invalid = || ApiError::unauthorized("invalid or revoked API key");
    let view: ApiKeyView = state
        .db
        .view(ViewKind::ApiKey, key_id)
        .await?
        .ok_or_else(invalid)?;
    if view.is_revoked() {
        return Err(invalid());
    }
    Ok(AuthAgent { key: view })
}

impl FromRequestParts<AppState> for AuthAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = api_key_header(parts)
            .ok_or_else(|| ApiError::unauthorized("missing credentials: send X-API-KEY"))?;
        agent_from_key(state, key.trim()).await
    }
}

/// Either kind of caller, for endpoints open to both. An API key wins if both are sent.
pub enum Caller {
    User(AuthUser),
    Agent(AuthAgent),
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if parts.headers.contains_key("x-api-key") {
            AuthAgent::from_request_parts(parts, state)
                .await
                .map(Caller::Agent)
        } else {
            AuthUser::from_request_parts(parts, state)
                .await
                .map(Caller::User)
        }
    }
}

/// A password as sent by a client: never logged, zeroized on drop.
pub struct Password(pub SecretString);

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() > MAX_PASSWORD_LEN {
            return Err(serde::de::Error::custom(format!(
                "password must be at most {MAX_PASSWORD_LEN} bytes"
            )));
        }
        Ok(Self(SecretString::from(s)))
    }
}

impl Password {
    /// New passwords must be long enough; existing ones are only compared.
    pub fn check_new(&self) -> Result<(), ApiError> {
        use secrecy::ExposeSecret;
        if self.0.expose_secret().chars().count() < MIN_PASSWORD_LEN {
            return Err(ApiError::invalid(
                "password",
                format!("password must be at least {MIN_PASSWORD_LEN} characters"),
            ));
        }
        Ok(())
    }
}

/// A 6-digit TOTP code.
pub struct MfaCode(pub String);

impl<'de> Deserialize<'de> for MfaCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(serde::de::Error::custom("MFA code must be 6 digits"));
        }
        Ok(Self(s))
    }
}

/// A string of bounded length (`N` characters at most).
#[derive(Debug, Clone)]
pub struct Bounded<const N: usize>(pub String);

impl<'de, const N: usize> Deserialize<'de> for Bounded<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.chars().count() > N {
            return Err(serde::de::Error::custom(format!(
                "must be at most {N} characters"
            )));
        }
        if s.chars().any(|c| c.is_control() && c != '\n') {
            return Err(serde::de::Error::custom(
                "must not contain control characters",
            ));
        }
        Ok(Self(s))
    }
}

/// A username: 3-64 characters of letters, digits, `_`, `.`, `-`.
pub struct Username(pub String);

impl<'de> Deserialize<'de> for Username {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = (3..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(serde::de::Error::custom(
                "username must be 3-64 characters: letters, digits, '_', '.', '-'",
            ));
        }
        Ok(Self(s))
    }
}
