//! Commands a `Transaction` accepts. Times come in with the command: the domain has no clock.

use time::OffsetDateTime;

use super::{Initiator, SimulationOutcome, TransactionKind, TxPayload};
use crate::types::{Address, Amount};

#[derive(Debug, Clone, PartialEq)]
pub enum TransactionCommand {
    Prepare(Box<PrepareTransaction>),
    Authorize {
        user_id: String,
        now: OffsetDateTime,
    },
    Reject {
        user_id: String,
        reason: Option<String>,
        now: OffsetDateTime,
    },
    Expire {
        now: OffsetDateTime,
    },
    /// Sign the authorized payload with the given chain parameters. The aggregate hands its own
    /// stored payload to the signer, so nothing but what was authorized can be signed.
    /// Fees above `max_fee_per_gas_cap` are refused before anything is signed.
    Execute {
        actor: Initiator,
        nonce: u64,
        fees: FeeParams,
        max_fee_per_gas_cap: Option<u128>,
        now: OffsetDateTime,
    },
    RecordReceipt {
        outcome: ReceiptOutcome,
        now: OffsetDateTime,
    },
    /// The chain refused the broadcast, or execution could not start (e.g. insufficient funds).
    Fail {
        reason: String,
        now: OffsetDateTime,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrepareTransaction {
    pub transaction_id: String,
    pub wallet_address: Address,
    pub owner_user_id: String,
    pub initiator: Initiator,
    pub kind: TransactionKind,
    pub to: Address,
    pub token_address: Option<Address>,
    pub amount: Option<Amount>,
    pub memo: Option<String>,
    pub summary: String,
    pub payload: TxPayload,
    pub simulation: PreparedSimulation,
    pub now: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// What the shell learned by simulating the call before the prompt goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedSimulation {
    pub outcome: SimulationOutcome,
    /// The node's gas estimate (absent when the call reverts or the node is unreachable).
    pub gas_estimate: Option<u64>,
    /// The EIP-1559 max fee per gas the node suggested.
    pub max_fee_per_gas: Option<u128>,
    /// The most the network fee can cost: gas limit (estimate plus margin) × max fee per gas.
    pub max_fee_wei: Option<Amount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeParams {
    pub gas_limit: u64,
    pub max_fee_per_gas: u128,
    pub max_priority_fee_per_gas: u128,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptOutcome {
    Confirmed {
        block_number: u64,
        gas_used: u64,
        effective_gas_price: u128,
    },
    Reverted {
        block_number: u64,
    },
}
