//! Background workers: projection catch-up (events from other nodes, crash recovery), expiry of
//! unanswered prompts, and receipt tracking with rebroadcast of signed-but-unseen transactions.
//! Each runs on every node; the aggregates make their commands safe to race.

use aggregates::{ReceiptOutcome, TransactionCommand};
use projections::TransactionView;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use crate::app::AppState;
use crate::chain::ChainError;
use crate::store::Actor;

pub fn spawn_all(state: AppState) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(state.hub.clone().run(state.projector.subscribe())),
        tokio::spawn(state.hub.clone().listen()),
        tokio::spawn(projection_loop(state.clone())),
        tokio::spawn(crate::audit::seal_loop(
            state.sealer.clone(),
            state.poll_interval,
        )),
        tokio::spawn(expiry_loop(state.clone())),
        tokio::spawn(purge_loop(state.clone())),
        tokio::spawn(receipt_loop(state)),
    ]
}

async fn projection_loop(state: AppState) {
    let mut tick = tokio::time::interval(state.poll_interval);
    loop {
        tick.tick().await;
        if let Err(e) = state.projector.catch_up().await {
            tracing::error!(error = %e, "projection catch-up failed");
        }
    }
}

async fn expiry_loop(state: AppState) {
    let mut tick = tokio::time::interval(state.poll_interval);
    loop {
        tick.tick().await;
        if let Err(e) = expire_due(&state).await {
            tracing::warn!(error = %e.message, "expiry pass failed");
        }
    }
}

/// Record `TransactionExpired` for every pending prompt past its deadline.
pub async fn expire_due(state: &AppState) -> Result<(), crate::http::ApiError> {
    let now = OffsetDateTime::now_utc();
    let cutoff = (now + time::Duration::seconds(2))
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(crate::http::ApiError::internal)?;
    let pending: Vec<TransactionView> = state.db.transactions_due(&cutoff, 1_000).await?;
    let actor = Actor::system("expiry");
    for view in pending {
        let due = OffsetDateTime::parse(
            &view.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .is_ok_and(|at| at <= now);
        if due {
            // Losing a race to an authorize or reject is fine: the aggregate refuses.
            let _ = state
                .execute(
                    &state.transactions,
                    &view.transaction_id,
                    TransactionCommand::Expire { now },
                    &actor,
                    "expiry",
                )
                .await;
        }
    }
    Ok(())
}

/// How often expired idempotency keys and revocations of expired tokens are deleted.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Delete what no request can need any more: idempotency keys past their TTL (they already
/// count as absent) and revoked tokens past their expiry (they are refused as expired).
async fn purge_loop(state: AppState) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = state.db.purge_idempotency_keys().await {
            tracing::warn!(error = %e, "purging idempotency keys failed");
        }
        if let Err(e) = state.db.purge_revoked_tokens().await {
            tracing::warn!(error = %e, "purging revoked tokens failed");
        }
    }
}

async fn receipt_loop(state: AppState) {
    let mut tick = tokio::time::interval(state.poll_interval);
    loop {
        tick.tick().await;
        if state.is_halted() {
            return;
        }
        if let Err(e) = track_receipts(&state).await {
            tracing::warn!(error = %e.message, "receipt pass failed");
        }
    }
}

/// For each executed transaction: record its receipt once mined; if the node has never seen
/// it (crash between signing and broadcast, node restart), rebroadcast the same signed bytes.
/// A rebroadcast the node refuses fails the transaction, which frees its nonce for the next
/// execution from the wallet (see `chain::next_nonce`), so later ones are not stuck behind it.
pub async fn track_receipts(state: &AppState) -> Result<(), crate::http::ApiError> {
    let executed: Vec<TransactionView> = state.db.executed_transactions().await?;
    let actor = Actor::system("receipts");
    for view in executed {
        let Some(tx_hash) = view.tx_hash.as_deref() else {
            continue;
        };
        let now = OffsetDateTime::now_utc();
        let command = match state.chain.receipt(tx_hash).await {
            Ok(Some(r)) if r.success => TransactionCommand::RecordReceipt {
                outcome: ReceiptOutcome::Confirmed {
                    block_number: r.block_number,
                    gas_used: r.gas_used,
                    effective_gas_price: r.effective_gas_price,
                },
                now,
            },
            Ok(Some(r)) => TransactionCommand::RecordReceipt {
                outcome: ReceiptOutcome::Reverted {
                    block_number: r.block_number,
                },
                now,
            },
            Ok(None) => {
                // An execution from this wallet is under way (it may be broadcasting this very
                // transaction): leave the wallet alone this round. Holding the lock until a
                // failure is recorded keeps it from racing a nonce choice.
                let wallet_guard = match state.wallet_locks.try_lock(&view.wallet_address).await {
                    Ok(Some(guard)) => guard,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "wallet lock unavailable");
                        return Ok(());
                    }
                };
                match rebroadcast_if_unknown(state, &view.transaction_id, tx_hash).await {
                    Ok(()) => {}
                    Err(ChainError::Rejected(reason)) => {
                        let command = TransactionCommand::Fail {
                            reason: format!("broadcast rejected: {reason}"),
                            now,
                        };
                        let _ = state
                            .execute(
                                &state.transactions,
                                &view.transaction_id,
                                command,
                                &actor,
                                "receipts",
                            )
                            .await;
                    }
                    Err(ChainError::Unavailable(_)) => return Ok(()),
                }
                wallet_guard.release().await;
                continue;
            }
            Err(ChainError::Unavailable(_)) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, tx_hash, "receipt lookup failed");
                continue;
            }
        };
        let _ = state
            .execute(
                &state.transactions,
                &view.transaction_id,
                command,
                &actor,
                "receipts",
            )
            .await;
    }
    Ok(())
}

async fn rebroadcast_if_unknown(
    state: &AppState,
    transaction_id: &str,
    tx_hash: &str,
) -> Result<(), ChainError> {
    if state.chain.is_known(tx_hash).await? {
        return Ok(());
    }
    let raw = state
        .db
        .executed_event(transaction_id)
        .await
        .map_err(|e| ChainError::Unavailable(e.to_string()))?
        .and_then(|e| {
            e.get("raw_transaction")
                .and_then(|r| r.as_str().map(str::to_owned))
        })
        .and_then(|hex| hex.parse::<aggregates::HexBytes>().ok());
    let Some(raw) = raw else {
        return Ok(());
    };
    if state.is_halted() {
        return Ok(());
    }
    tracing::info!(
        tx_hash,
        "rebroadcasting signed transaction the node does not know"
    );
    state.chain.send_raw(raw.as_slice()).await
}
