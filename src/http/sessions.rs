//! Sessions: ending access tokens before they expire.
//!
//! Every access token carries the user's *token version* (`ver`) and its own id (`jti`). The
//! version is derived from events: the user view counts `PasswordChanged` and `MfaEnabled`
//! events that replaced an active secret, so a password change or an MFA replacement ends
//! every session issued before it. `POST /api/logout` ends one token: a `LoggedOut` event
//! records it (with the actor), and its id goes into `revoked_tokens` until it would have
//! expired anyway (purged by the background worker).
//!
//! Every authenticated request checks both in one query against the shared database (the user
//! view is written in the same transaction as its events), so on several nodes a revoked token
//! is refused by all of them as soon as the revoking request has been answered.

use aggregates::UserCommand;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use projections::{UserView, ViewKind};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, AuthUser, MfaCode, Password, RequestId};
use super::users::{execute_code_command, require_password};
use crate::app::AppState;
use crate::crypto::hash_password;
use crate::store::{with_pool, Db, StoreError};

/// The 401 for a token ended by a logout, password change or MFA replacement.
pub fn token_revoked() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "token_revoked",
        "this access token was revoked (logout, password change or MFA replacement): log in again",
    )
}

/// Refuse a token whose user is unknown, whose version is not the user's current one, or
/// which was logged out.
pub async fn check_session(
    state: &AppState,
    user_id: &str,
    token_id: &str,
    token_version: u64,
) -> ApiResult<()> {
    let (view, revoked) = state
        .db
        .session_state(user_id, token_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown user"))?;
    if revoked || view.token_version != token_version {
        return Err(token_revoked());
    }
    Ok(())
}

/// A new access token under the user's current token version, as the login response.
pub async fn issue_token(state: &AppState, user_id: &str) -> ApiResult<Value> {
    let view: UserView = state
        .db
        .view(ViewKind::User, user_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown user"))?;
    let token = state
        .jwt
        .issue(user_id, view.token_version)
        .map_err(ApiError::internal)?;
    Ok(json!({
        "access_token": token.expose_secret(),
        "token_type": "Bearer",
        "expires_in": state.jwt.ttl_secs(),
    }))
}

/// `body` plus a fresh token (`access_token`, `token_type`, `expires_in`) if the caller's
/// token was just ended by its own request (e.g. `confirm_mfa` replacing an active secret).
pub async fn with_renewed_token(
    state: &AppState,
    user: &AuthUser,
    mut body: Value,
) -> ApiResult<Value> {
    let view: Option<UserView> = state.db.view(ViewKind::User, &user.user_id).await?;
    if view.is_some_and(|v| v.token_version != user.token_version) {
        if let (Some(out), Value::Object(fresh)) = (
            body.as_object_mut(),
            issue_token(state, &user.user_id).await?,
        ) {
            out.extend(fresh);
        }
    }
    Ok(body)
}

/// End the caller's token. The event comes first: if recording the revocation then fails, the
/// client sees an error and the token still works, so retrying the logout finishes it.
pub async fn logout(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
) -> ApiResult<StatusCode> {
    let token_expires_at =
        OffsetDateTime::from_unix_timestamp(user.expires_at).map_err(ApiError::internal)?;
    let command = UserCommand::Logout {
        token_id: user.token_id.clone(),
        token_expires_at,
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.users,
            &user.user_id,
            command,
            &user.actor(),
            &request_id,
        )
        .await?;
    state
        .db
        .revoke_token(&user.token_id, &user.user_id, user.expires_at)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    current_password: Password,
    new_password: Password,
    /// Required when MFA is enabled.
    mfa_code: Option<MfaCode>,
}

/// Change the password: current password, and a current MFA code when MFA is enabled. Every
/// token issued before is refused afterwards; the response carries a fresh one.
///
/// Order: the new hash is computed first, then `PasswordChanged` is recorded (which ends
/// the old sessions), then the stored hash is replaced. A failure between the last two leaves
/// the old password valid and the sessions ended, and the client sees an error: the safe way
/// round (never a new password with the old sessions still alive, or without its event).
pub async fn change_password(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<ChangePasswordRequest>,
) -> ApiResult<Json<Value>> {
    body.new_password
        .check_new()
        .map_err(|e| e.with_field("new_password"))?;
    if body.new_password.0.expose_secret() == body.current_password.0.expose_secret() {
        return Err(ApiError::invalid(
            "new_password",
            "new_password must differ from current_password",
        ));
    }
    require_password(&state, &user.user_id, body.current_password)
        .await
        .map_err(|e| match e.field {
            Some(_) => e.with_field("current_password"),
            None => e,
        })?;
    let new_hash = hash_password(body.new_password.0).await?;
    let command = UserCommand::ChangePassword {
        code: body.mfa_code.map(|c| c.0),
        now: OffsetDateTime::now_utc(),
    };
    // A wrong code is recorded (it counts towards the MFA lockout) and refused here.
    execute_code_command(&state, &user, command, &request_id).await?;
    state.db.set_password_hash(&user.user_id, &new_hash).await?;
    Ok(Json(issue_token(&state, &user.user_id).await?))
}

impl Db {
    /// The user's view and whether `token_id` was logged out, in one round trip.
    async fn session_state(
        &self,
        user_id: &str,
        token_id: &str,
    ) -> Result<Option<(UserView, bool)>, StoreError> {
        let row: Option<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(
            "SELECT payload, (SELECT COUNT(*) FROM revoked_tokens WHERE token_id = $3) \
             FROM views WHERE kind = $1 AND id = $2"
        )
        .bind(ViewKind::User.as_str())
        .bind(user_id)
        .bind(token_id)
        .fetch_optional(pool)
        .await?);
        row.map(|(payload, revoked)| {
            serde_json::from_str(&payload)
                .map(|view| (view, revoked > 0))
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    async fn revoke_token(
        &self,
        token_id: &str,
        user_id: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| sqlx::query(
            "INSERT INTO revoked_tokens (token_id, user_id, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (token_id) DO NOTHING"
        )
        .bind(token_id)
        .bind(user_id)
        .bind(expires_at)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(())
    }

    async fn set_password_hash(&self, user_id: &str, hash: &str) -> Result<(), StoreError> {
        with_pool!(self, |pool| sqlx::query(
            "UPDATE user_credentials SET password_hash = $2 WHERE user_id = $1"
        )
        .bind(user_id)
        .bind(hash)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Forget revocations of tokens that have expired anyway (background worker).
    pub async fn purge_revoked_tokens(&self) -> Result<u64, StoreError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Ok(with_pool!(self, |pool| sqlx::query(
            "DELETE FROM revoked_tokens WHERE expires_at < $1"
        )
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected()))
    }
}
