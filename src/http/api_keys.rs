//! Agent API keys: issued with MFA, shown once, scoped to the owner's wallets, revocable.

use aggregates::{Address, ApiKeyCommand};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use projections::{ApiKeyView, ViewKind, WalletView};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, AuthUser, Bounded, MfaCode, RequestId};
use super::users::use_mfa_code;
use crate::app::AppState;
use crate::crypto::ApiKeySecret;
use crate::projector::ViewColumn;

const MAX_SCOPE: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    name: Bounded<100>,
    mfa_code: MfaCode,
    /// Omitted or null: all of the owner's wallets, including future ones.
    wallet_addresses: Option<Vec<Address>>,
}

pub async fn issue(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<IssueRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = body.name.0.trim().to_owned();
    if name.is_empty() {
        return Err(ApiError::invalid("name", "name must not be empty"));
    }
    if let Some(scope) = &body.wallet_addresses {
        if scope.is_empty() || scope.len() > MAX_SCOPE {
            return Err(ApiError::invalid(
                "wallet_addresses",
                format!("list 1 to {MAX_SCOPE} wallets, or omit it for all wallets"),
            ));
        }
        for (i, address) in scope.iter().enumerate() {
            let wallet: Option<WalletView> = state
                .db
                .view(ViewKind::Wallet, &address.to_checksum())
                .await?;
            if wallet.is_none_or(|w| w.owner_user_id != user.user_id) {
                return Err(
                    ApiError::not_found("wallet").with_field(format!("wallet_addresses[{i}]"))
                );
            }
        }
    }
    use_mfa_code(&state, &user, body.mfa_code, "issue_api_key", &request_id).await?;
    let secret = ApiKeySecret::generate();
    let api_key_id = uuid::Uuid::new_v4().to_string();
    state
        .db
        .insert_api_key_credentials(&api_key_id, &secret.hash())
        .await?;
    let command = ApiKeyCommand::Issue {
        api_key_id: api_key_id.clone(),
        owner_user_id: user.user_id.clone(),
        name: name.clone(),
        wallet_addresses: body.wallet_addresses.clone(),
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.api_keys,
            &api_key_id,
            command,
            &user.actor(),
            &request_id,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "api_key_id": api_key_id,
            "api_key": secret.expose(),
            "name": name,
            "wallet_addresses": body.wallet_addresses,
        })),
    ))
}

pub async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Value>> {
    let keys: Vec<ApiKeyView> = state
        .db
        .views_by(ViewKind::ApiKey, ViewColumn::Owner, &user.user_id, None)
        .await?;
    Ok(Json(json!({ "api_keys": keys })))
}

pub async fn revoke(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    Path(api_key_id): Path<String>,
) -> ApiResult<StatusCode> {
    // Ids are UUIDs: anything else names no key (and never reaches the store).
    if uuid::Uuid::parse_str(&api_key_id).is_err() {
        return Err(ApiError::not_found("API key"));
    }
    let command = ApiKeyCommand::Revoke {
        user_id: user.user_id.clone(),
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.api_keys,
            &api_key_id,
            command,
            &user.actor(),
            &request_id,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
