//! Wallets: created on the server (the key never leaves it), listed with live balances.

use std::sync::Arc;

use aggregates::{Address, WalletCommand};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use projections::{ViewKind, WalletView};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, AuthAgent, AuthUser, Caller, Password, RequestId};
use super::users::require_password;
use crate::app::AppState;
use crate::projector::ViewColumn;
use crate::writer::Unchanged;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWalletRequest {
    password: Password,
}

pub async fn create_wallet(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<CreateWalletRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require_password(&state, &user.user_id, body.password).await?;
    let chain_id = state.chain.chain_id().await?;
    let address = state.keyring.create_key(&user.user_id).await?;
    let command = WalletCommand::Create {
        wallet_address: address,
        owner_user_id: user.user_id.clone(),
        chain_id,
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.wallets,
            &address.to_checksum(),
            command,
            &user.actor(),
            &request_id,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"wallet_address": address, "chain_id": chain_id})),
    ))
}

/// The wallet if the caller may see it: its owner, or an agent key scoped to it.
pub async fn visible_wallet(
    state: &AppState,
    caller: &Caller,
    address: &Address,
) -> ApiResult<WalletView> {
    let wallet: Option<WalletView> = state
        .db
        .view(ViewKind::Wallet, &address.to_checksum())
        .await?;
    let visible = wallet.filter(|w| match caller {
        Caller::User(u) => w.owner_user_id == u.user_id,
        Caller::Agent(a) => a.may_use(&w.wallet_address, &w.owner_user_id),
    });
    visible.ok_or_else(|| ApiError::not_found("wallet").with_field("wallet_address"))
}

/// The wallet an agent's command is for, if its key may use it, and how it was read (see
/// [`Unchanged`]): from the node's read cache when `cached` and it holds the wallet, else from
/// the database.
pub async fn command_wallet(
    state: &AppState,
    agent: &AuthAgent,
    address: &Address,
    cached: bool,
) -> ApiResult<(WalletView, Unchanged)> {
    let id = address.to_checksum();
    let cache = &state.hub.cache;
    let hit = cached.then(|| cache.wallet(&id)).flatten();
    let found = match hit {
        Some((wallet, as_of)) => Some((WalletView::clone(&wallet), as_of)),
        None => {
            let ticket = cache.begin_read();
            let found: Option<(WalletView, i64)> = state.db.view_at(ViewKind::Wallet, &id).await?;
            if let (Some(ticket), Some((wallet, _))) = (ticket, &found) {
                cache.fill_wallet(ticket, Arc::new(wallet.clone()));
            }
            found
        }
    };
    let (wallet, as_of) = found
        .filter(|(w, _)| agent.may_use(&w.wallet_address, &w.owner_user_id))
        .ok_or_else(|| ApiError::not_found("wallet").with_field("wallet_address"))?;
    let read = Unchanged {
        kind: ViewKind::Wallet,
        id,
        as_of,
    };
    Ok((wallet, read))
}

pub async fn list_wallets(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    let owner = match &caller {
        Caller::User(u) => u.user_id.clone(),
        Caller::Agent(a) => a.key.owner_user_id.clone(),
    };
    let wallets: Vec<WalletView> = state
        .db
        .views_by(ViewKind::Wallet, ViewColumn::Owner, &owner, None)
        .await?;
    let mut out = Vec::new();
    for w in wallets {
        if let Caller::Agent(a) = &caller {
            if !a.key.covers(&w.wallet_address) {
                continue;
            }
        }
        // The list must not depend on the node: without it, balances are unknown (null).
        let balance = match state.chain.balance(&w.wallet_address).await {
            Ok(b) => Some(b.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "balance unavailable");
                None
            }
        };
        out.push(json!({
            "wallet_address": w.wallet_address,
            "balance_wei": balance,
            "chain_id": w.chain_id,
            "created_at": w.created_at,
        }));
    }
    Ok(Json(json!({ "wallets": out })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadWalletRequest {
    #[serde(alias = "address")]
    wallet_address: Address,
}

pub async fn load_wallet(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<LoadWalletRequest>,
) -> ApiResult<Json<Value>> {
    let wallet = visible_wallet(&state, &caller, &body.wallet_address).await?;
    let balance = state.chain.balance(&wallet.wallet_address).await?;
    let nonce = state.chain.pending_nonce(&wallet.wallet_address).await?;
    Ok(Json(json!({
        "wallet_address": wallet.wallet_address,
        "balance_wei": balance.to_string(),
        "chain_id": wallet.chain_id,
        "nonce": nonce,
    })))
}
