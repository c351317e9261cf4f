//! Transaction events: a public format read by clients, push subscribers and auditors.
//! Renaming a variant orphans stored history: add an upcaster instead (see README).

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Initiator, SimulationOutcome, TransactionKind, TxPayload};
use crate::types::{Address, Amount};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TransactionEvent {
    TransactionPrepared(Box<TransactionPrepared>),
    TransactionAuthorized {
        authorized_by: String,
        payload_digest: String,
        #[serde(with = "time::serde::rfc3339")]
        authorized_at: OffsetDateTime,
    },
    TransactionRejected {
        rejected_by: String,
        reason: Option<String>,
        #[serde(with = "time::serde::rfc3339")]
        rejected_at: OffsetDateTime,
    },
    TransactionExpired {
        #[serde(with = "time::serde::rfc3339")]
        expired_at: OffsetDateTime,
    },
    /// Signed and about to be broadcast. Recorded *before* the broadcast so that a crash in
    /// between is recovered by rebroadcasting these exact bytes (same hash), never re-signing.
    TransactionExecuted {
        tx_hash: String,
        nonce: u64,
        gas_limit: u64,
        max_fee_per_gas: u128,
        max_priority_fee_per_gas: u128,
        raw_transaction: String,
        executed_by: Initiator,
        #[serde(with = "time::serde::rfc3339")]
        executed_at: OffsetDateTime,
    },
    TransactionConfirmed {
        block_number: u64,
        gas_used: u64,
        effective_gas_price: u128,
        #[serde(with = "time::serde::rfc3339")]
        confirmed_at: OffsetDateTime,
    },
    TransactionFailed {
        reason: String,
        block_number: Option<u64>,
        #[serde(with = "time::serde::rfc3339")]
        failed_at: OffsetDateTime,
    },
}

/// The approval prompt: everything a human needs to decide, and the exact payload that an
/// authorization binds to (through `payload_digest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionPrepared {
    pub transaction_id: String,
    pub wallet_address: Address,
    pub owner_user_id: String,
    pub initiator: Initiator,
    pub kind: TransactionKind,
    /// For ERC20 transfers, the token recipient; otherwise the same as `payload.to`.
    pub to: Address,
    pub token_address: Option<Address>,
    pub amount: Option<Amount>,
    pub memo: Option<String>,
    pub summary: String,
    pub payload: TxPayload,
    pub payload_digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub prepared_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    // Added with simulation at prepare time. Optional so that events recorded before then
    // still load (absent = not simulated); never rename them (see the module comment).
    /// What simulating the call showed when the prompt went out.
    #[serde(default)]
    pub simulation: Option<SimulationOutcome>,
    /// The node's gas estimate for the call.
    #[serde(default)]
    pub gas_estimate: Option<u64>,
    /// The EIP-1559 max fee per gas suggested at prepare time, in wei.
    #[serde(default)]
    pub max_fee_per_gas: Option<u128>,
    /// The most the network fee could cost at prepare time (gas limit × max fee per gas), wei.
    #[serde(default)]
    pub max_fee_wei: Option<Amount>,
}

impl DomainEvent for TransactionEvent {
    fn event_type(&self) -> String {
        match self {
            Self::TransactionPrepared(_) => "TransactionPrepared",
            Self::TransactionAuthorized { .. } => "TransactionAuthorized",
            Self::TransactionRejected { .. } => "TransactionRejected",
            Self::TransactionExpired { .. } => "TransactionExpired",
            Self::TransactionExecuted { .. } => "TransactionExecuted",
            Self::TransactionConfirmed { .. } => "TransactionConfirmed",
            Self::TransactionFailed { .. } => "TransactionFailed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}
