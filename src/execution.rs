//! Executing an authorized transaction: the one path shared by the agent's
//! `execute_transaction` and the user-initiated endpoints (`transfer`, `transfer_erc20`,
//! `contract_call`).
//!
//! Under the wallet's lock: simulate again (a call that reverts now is not signed), choose
//! EIP-1559 fees within the configured cap, check that the balance covers value plus the
//! maximum gas cost, pick the nonce ([`crate::chain::next_nonce`]), sign through the aggregate
//! (recorded as `TransactionExecuted`, raw bytes included, before anything leaves the server),
//! broadcast. Each way to fail before signing is recorded as `TransactionFailed` with its
//! reason; nothing is signed then. A repeat returns the first hash and broadcasts nothing.

use aggregates::{FeeParams, HexBytes, Initiator, TransactionCommand};
use alloy::primitives::U256;
use axum::http::StatusCode;
use projections::{TransactionView, ViewKind};
use time::OffsetDateTime;

use crate::app::AppState;
use crate::chain::{gas_limit_for, next_nonce, to_u256, CallOutcome, ChainError};
use crate::http::{ApiError, ApiResult};
use crate::store::Actor;

/// Who executes, as the aggregate and the event metadata know them.
pub struct Executor<'a> {
    pub initiator: Initiator,
    pub actor: &'a Actor,
    pub request_id: &'a str,
}

async fn current_view(state: &AppState, transaction_id: &str) -> ApiResult<TransactionView> {
    state
        .db
        .view(ViewKind::Transaction, transaction_id)
        .await?
        .ok_or_else(|| ApiError::not_found("transaction"))
}

fn not_executable(view: &TransactionView) -> ApiError {
    ApiError::conflict(
        "invalid_state",
        format!("cannot execute a transaction that is {}", view.status),
    )
}

/// Record why execution stopped before signing (or why the broadcast was refused).
async fn record_failure(
    state: &AppState,
    transaction_id: &str,
    reason: &str,
    executor: &Executor<'_>,
) -> ApiResult<()> {
    let command = TransactionCommand::Fail {
        reason: reason.to_owned(),
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.transactions,
            transaction_id,
            command,
            executor.actor,
            executor.request_id,
        )
        .await
}

/// Execute the authorized transaction `transaction_id` (the caller has checked that it may see
/// it; the aggregate checks that `executor` is its initiator). Returns the view afterwards.
pub async fn execute_authorized(
    state: &AppState,
    transaction_id: &str,
    executor: &Executor<'_>,
) -> ApiResult<TransactionView> {
    let view = current_view(state, transaction_id).await?;
    if view.tx_hash.is_some() {
        return Ok(view);
    }
    if view.status != "authorized" {
        return Err(not_executable(&view));
    }
    let payload = view.payload.clone();
    // Held until the broadcast outcome is recorded, across every node (see `wallet_lock`).
    let mut wallet_guard = state.wallet_locks.lock(&payload.from).await?;

    // Another execution, on this node or another, may have run while this one waited for the
    // lock: re-read. (A command's events are in the views once it returns, on every node.)
    let view = current_view(state, transaction_id).await?;
    if view.tx_hash.is_some() {
        return Ok(view);
    }
    if view.status != "authorized" {
        return Err(not_executable(&view));
    }

    let value = to_u256(&payload.value);
    let gas = match state
        .chain
        .simulate(&payload.from, &payload.to, value, payload.data.as_slice())
        .await?
    {
        CallOutcome::Success { gas } => gas,
        CallOutcome::Reverted { reason, .. } => {
            let reason = format!("simulation failed: {reason}");
            record_failure(state, transaction_id, &reason, executor).await?;
            return Err(ApiError::conflict("simulation_failed", reason));
        }
    };
    let gas_limit = gas_limit_for(gas);
    let (max_fee_per_gas, max_priority_fee_per_gas) = state.chain.fees().await?;
    if let Some(cap) = state.max_fee_per_gas_cap {
        if max_fee_per_gas > cap {
            let reason = format!(
                "fee above cap: the network asks up to {max_fee_per_gas} wei per gas, the \
                 configured cap is {cap} wei per gas"
            );
            record_failure(state, transaction_id, &reason, executor).await?;
            return Err(ApiError::conflict("fee_above_cap", reason));
        }
    }
    let balance = state.chain.balance(&payload.from).await?;
    let max_cost =
        value.saturating_add(U256::from(gas_limit).saturating_mul(U256::from(max_fee_per_gas)));
    if balance < max_cost {
        let reason = format!(
            "insufficient funds: balance {balance} wei, value plus maximum gas cost {max_cost} wei"
        );
        record_failure(state, transaction_id, &reason, executor).await?;
        return Err(ApiError::conflict("insufficient_funds", reason));
    }

    let mined = state.chain.mined_nonce(&payload.from).await?;
    let in_flight: Vec<TransactionView> = state
        .db
        .executed_transactions_of(&payload.from.to_checksum())
        .await?;
    let nonce = next_nonce(mined, in_flight.iter().filter_map(|v| v.nonce));
    // Nothing is signed under a lock that died with its database connection.
    wallet_guard.ensure_held().await?;

    if state.crash_after_sign_for_tests {
        // From here on this instance is "dead": nothing it does may broadcast.
        state.halt();
    }
    let command = TransactionCommand::Execute {
        actor: executor.initiator.clone(),
        nonce,
        fees: FeeParams {
            gas_limit,
            max_fee_per_gas,
            max_priority_fee_per_gas,
        },
        max_fee_per_gas_cap: state.max_fee_per_gas_cap,
        now: OffsetDateTime::now_utc(),
    };
    match state
        .execute(
            &state.transactions,
            transaction_id,
            command,
            executor.actor,
            executor.request_id,
        )
        .await
    {
        Ok(()) => {}
        Err(e) if e.code == "already_executed" => return current_view(state, transaction_id).await,
        Err(e) => return Err(e),
    }
    if state.crash_after_sign_for_tests {
        return Err(ApiError::internal(
            "test hook: crashed after recording the signed transaction, before broadcasting it",
        ));
    }

    let raw = state
        .db
        .executed_event(transaction_id)
        .await?
        .and_then(|e| e.get("raw_transaction")?.as_str()?.parse::<HexBytes>().ok())
        .ok_or_else(|| ApiError::internal("executed transaction has no raw bytes"))?;
    match state.chain.send_raw(raw.as_slice()).await {
        Ok(()) => {}
        Err(ChainError::Rejected(reason)) => {
            tracing::warn!(error = %reason, transaction_id, nonce, "broadcast rejected");
            // Recorded as failed, its nonce is free for the next execution (see `next_nonce`).
            let reason = format!("broadcast rejected: {reason}");
            record_failure(state, transaction_id, &reason, executor).await?;
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "broadcast_rejected",
                reason,
            ));
        }
        // Signed and recorded: the receipt worker rebroadcasts the same bytes when it can.
        Err(ChainError::Unavailable(e)) => {
            tracing::warn!(error = %e, transaction_id, "broadcast deferred");
        }
    }
    wallet_guard.release().await;
    current_view(state, transaction_id).await
}
