//! Accounts: register, login, MFA enrolment, and the caller's own profile.

use aggregates::{SecurityLogCommand, UserCommand};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use projections::{UserView, ViewKind};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, AuthUser, MfaCode, Password, RequestId, Username};
use crate::app::AppState;
use crate::crypto::{hash_password, verify_password, Purpose, TotpSecret};
use crate::store::Actor;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    username: Username,
    password: Password,
}

pub async fn register(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    body.password.check_new()?;
    let username = body.username.0;
    let user_id = uuid::Uuid::new_v4().to_string();
    let hash = hash_password(body.password.0).await?;
    if !state
        .db
        .insert_user_credentials(&user_id, &username, &hash)
        .await?
    {
        return Err(
            ApiError::conflict("username_taken", "that username is already registered")
                .with_field("username"),
        );
    }
    let command = UserCommand::Register {
        user_id: user_id.clone(),
        username: username.clone(),
        now: OffsetDateTime::now_utc(),
    };
    let result = state
        .execute(
            &state.users,
            &user_id,
            command,
            &Actor::user(&user_id),
            &request_id,
        )
        .await;
    if let Err(e) = result {
        // Release the name: the account does not exist without its event.
        state.db.delete_user_credentials(&user_id).await?;
        return Err(e);
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({"user_id": user_id, "username": username})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: Password,
}

/// Unknown user and wrong password take the same path and time and give the same answer.
/// Failures are rate-limited per username and per source address (see `limits`): a refused
/// attempt is a 429 that checks no password and records nothing.
pub async fn login(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<Json<Value>> {
    let source_ip = crate::store::SOURCE_IP.try_with(|ip| *ip).ok();
    state.limits.begin_login(&body.username, source_ip)?;
    // No registered name is longer or holds a control character (a NUL cannot even be sent
    // to PostgreSQL): such a name is unknown without asking the store.
    let plausible = body.username.len() <= 64 && !body.username.chars().any(char::is_control);
    let found = if plausible {
        state.db.user_credentials_by_name(&body.username).await?
    } else {
        None
    };
    let (user_id, hash) = match found {
        Some((id, hash)) => (Some(id), Some(hash)),
        None => (None, None),
    };
    let ok = verify_password(body.password.0, hash).await?;
    let success = ok && user_id.is_some();
    if success {
        state.limits.login_succeeded(&body.username, source_ip);
    }
    // Every attempt is in the history, with its source address; the same work either way.
    record_login(
        &state,
        user_id.clone(),
        &body.username,
        success,
        &request_id,
    )
    .await?;
    let user_id = match (success, user_id) {
        (true, Some(id)) => id,
        _ => return Err(ApiError::unauthorized("invalid username or password")),
    };
    Ok(Json(super::sessions::issue_token(&state, &user_id).await?))
}

/// Append a `LoginSucceeded` / `LoginFailed` event on a fresh `SecurityLog` instance.
async fn record_login(
    state: &AppState,
    user_id: Option<String>,
    username: &str,
    success: bool,
    request_id: &str,
) -> ApiResult<()> {
    let actor = match (&user_id, success) {
        (Some(id), true) => Actor::user(id),
        _ => Actor::anonymous(),
    };
    let command = SecurityLogCommand::RecordLogin {
        user_id,
        // Bounded and printable: what an attacker typed is history, not terminal escapes (and a
        // NUL is not storable as PostgreSQL JSON).
        username: username
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect(),
        success,
        now: OffsetDateTime::now_utc(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    state
        .execute(&state.security_log, &id, command, &actor, request_id)
        .await
}

/// Check the caller's password (for sensitive actions on top of the token).
pub async fn require_password(
    state: &AppState,
    user_id: &str,
    password: Password,
) -> ApiResult<()> {
    let hash = state.db.password_hash(user_id).await?;
    if verify_password(password.0, hash).await? {
        Ok(())
    } else {
        Err(ApiError::wrong_password().with_field("password"))
    }
}

async fn user_view(state: &AppState, user_id: &str) -> ApiResult<UserView> {
    state
        .db
        .view(ViewKind::User, user_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown user"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupMfaRequest {
    password: Password,
    mfa_code: Option<MfaCode>,
}

/// Start (or replace) MFA enrolment: a new pending secret, active after `confirm_mfa`.
/// Replacing an active MFA needs a current code from it, not just a token and password.
pub async fn setup_mfa(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<SetupMfaRequest>,
) -> ApiResult<Json<Value>> {
    require_password(&state, &user.user_id, body.password).await?;
    let profile = user_view(&state, &user.user_id).await?;
    let secret = TotpSecret::generate();
    let secret_id = uuid::Uuid::new_v4().to_string();
    let sealed = state.master_key.seal(
        Purpose::TotpSecret,
        &[&user.user_id, &secret_id],
        secret.as_bytes(),
    );
    state
        .db
        .insert_mfa_secret(&secret_id, &user.user_id, &sealed)
        .await?;
    let command = UserCommand::StartMfaSetup {
        secret_id: secret_id.clone(),
        code: body.mfa_code.map(|c| c.0),
        now: OffsetDateTime::now_utc(),
    };
    if let Err(e) = execute_code_command(&state, &user, command, &request_id).await {
        // Refused (no or a wrong code, a lockout): nothing refers to the new secret, so it
        // does not stay behind. After a 5xx it may have been recorded: keep it then.
        if e.status.is_client_error() {
            state.db.delete_mfa_secret(&secret_id).await?;
        }
        return Err(e);
    }
    let enrollment = secret
        .enrollment(&profile.username)
        .map_err(ApiError::internal)?;
    Ok(Json(json!({
        "secret": enrollment.secret_base32.as_str(),
        "otpauth_uri": enrollment.otpauth_uri.as_str(),
        "qr_png_base64": enrollment.qr_png_base64.as_str(),
    })))
}

pub(super) fn mfa_field(e: ApiError) -> ApiError {
    if e.status == StatusCode::FORBIDDEN {
        e.with_field("mfa_code")
    } else {
        e
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmMfaRequest {
    mfa_code: MfaCode,
}

pub async fn confirm_mfa(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<ConfirmMfaRequest>,
) -> ApiResult<Json<Value>> {
    let command = UserCommand::ConfirmMfa {
        code: body.mfa_code.0,
        now: OffsetDateTime::now_utc(),
    };
    execute_code_command(&state, &user, command, &request_id).await?;
    // A replaced MFA ends every earlier session, this one included: it gets a new token.
    let body = super::sessions::with_renewed_token(&state, &user, json!({"mfa_enabled": true}));
    Ok(Json(body.await?))
}

/// Spend one MFA code for `purpose` (the step then cannot be used again).
pub async fn use_mfa_code(
    state: &AppState,
    user: &AuthUser,
    code: MfaCode,
    purpose: &str,
    request_id: &str,
) -> ApiResult<()> {
    let command = UserCommand::UseMfaCode {
        code: code.0,
        purpose: purpose.to_owned(),
        now: OffsetDateTime::now_utc(),
    };
    execute_code_command(state, user, command, request_id).await
}

/// Run a user command that may check an MFA code, and answer from what it recorded. A wrong
/// code is *recorded* (`MfaCodeRejected`, counting towards the lockout), so the command
/// succeeds and the refusal is read from its events: 403 `invalid_mfa_code`, or 429
/// `mfa_locked` for the code that locks and for every attempt during the lockout. Every
/// code-checking user command must run through here: `state.execute` alone would take a
/// recorded wrong code for success.
pub(super) async fn execute_code_command(
    state: &AppState,
    user: &AuthUser,
    command: UserCommand,
    request_id: &str,
) -> ApiResult<()> {
    let events = state
        .execute_user_command(&user.user_id, command, &user.actor(), request_id)
        .await
        .map_err(mfa_field)?;
    aggregates::mfa_verdict(&events).map_err(|e| mfa_field(e.into()))
}

pub async fn me(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Value>> {
    let profile = user_view(&state, &user.user_id).await?;
    Ok(Json(json!({
        "user_id": profile.user_id,
        "username": profile.username,
        "mfa_enabled": profile.mfa_enabled,
        "mfa_pending": profile.mfa_pending,
        "mfa_failed_attempts": profile.mfa_failed_attempts,
        "mfa_locked_until": mfa_locked_until(&profile, OffsetDateTime::now_utc()),
        "roles": profile.roles,
    })))
}

/// The end of the MFA lockout if it is still running at `now`.
fn mfa_locked_until(profile: &UserView, now: OffsetDateTime) -> Option<String> {
    let until = profile.mfa_locked_until.as_deref()?;
    let end = OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339).ok()?;
    (now < end).then(|| until.to_owned())
}
