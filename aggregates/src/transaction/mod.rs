//! The `Transaction` aggregate: an agent (or user) prepares, the wallet's owner authorizes or
//! rejects, the initiator executes exactly once, the chain confirms or fails it.
//! Signing is a side effect behind [`TransactionSigner`]; this module never touches keys.

mod commands;
mod events;
pub mod summary;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

pub use commands::{
    FeeParams, PrepareTransaction, PreparedSimulation, ReceiptOutcome, TransactionCommand,
};
pub use events::{TransactionEvent, TransactionPrepared};

use crate::types::{Address, Amount, HexBytes};

/// Who started a transaction (and who may execute it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Initiator {
    Agent {
        api_key_id: String,
        api_key_name: String,
    },
    User {
        user_id: String,
    },
}

impl Initiator {
    /// Same principal, ignoring display names (a key may be renamed; its id is what counts).
    pub fn same_principal(&self, other: &Initiator) -> bool {
        match (self, other) {
            (Self::Agent { api_key_id: a, .. }, Self::Agent { api_key_id: b, .. }) => a == b,
            (Self::User { user_id: a }, Self::User { user_id: b }) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionKind {
    Native,
    Erc20,
    ContractCall,
}

/// Exactly what gets signed. Authorization binds to its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxPayload {
    pub chain_id: u64,
    pub from: Address,
    pub to: Address,
    pub value: Amount,
    pub data: HexBytes,
}

impl TxPayload {
    /// SHA-256 over a versioned, unambiguous encoding of every signed field.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"countersign-tx-v1\0");
        h.update(self.chain_id.to_be_bytes());
        h.update(self.from.as_bytes());
        h.update(self.to.as_bytes());
        h.update(self.value.to_be_bytes());
        h.update((self.data.as_slice().len() as u64).to_be_bytes());
        h.update(self.data.as_slice());
        hex::encode(h.finalize())
    }
}

/// What simulating the call (`eth_call` as the wallet, then a gas estimate) showed at prepare
/// time. A call that would revert is still put to the human, with the reason: state may change
/// before execution, and execution simulates again anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SimulationOutcome {
    Success,
    /// The call would fail: the decoded revert reason, or the node's message.
    Reverted {
        reason: String,
    },
    /// The chain node could not be asked; nothing is known.
    Unavailable {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionStatus {
    PendingAuthorization,
    Authorized,
    Rejected,
    Expired,
    Executed,
    Confirmed,
    Failed,
}

impl TransactionStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PendingAuthorization => "pending_authorization",
            Self::Authorized => "authorized",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Executed => "executed",
            Self::Confirmed => "confirmed",
            Self::Failed => "failed",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Rejected | Self::Expired | Self::Confirmed | Self::Failed
        )
    }
}

impl fmt::Display for TransactionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    #[error("transaction not found")]
    NotFound,
    #[error("transaction already exists")]
    AlreadyExists,
    /// Mapped to "not found" at the edge: callers must not learn that it exists.
    #[error("transaction not found")]
    NotOwner,
    #[error("only the principal that prepared the transaction may execute it")]
    NotInitiator,
    #[error("the transaction expired before it was authorized")]
    Expired,
    #[error("expiry must be in the future")]
    InvalidExpiry,
    #[error("cannot {action} a transaction that is {status}")]
    InvalidState {
        action: &'static str,
        status: TransactionStatus,
    },
    #[error("transaction was already executed")]
    AlreadyExecuted { tx_hash: String },
    #[error("transaction is not due to expire")]
    NotDue,
    #[error("max fee per gas {max_fee_per_gas} wei exceeds the configured cap of {cap} wei")]
    FeeAboveCap { max_fee_per_gas: u128, cap: u128 },
    #[error("signing failed: {0}")]
    Signing(String),
}

/// What the signer needs: the authorized payload plus chain parameters chosen at execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningRequest {
    pub wallet_address: Address,
    pub owner_user_id: String,
    pub payload: TxPayload,
    pub nonce: u64,
    pub fees: FeeParams,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTransaction {
    pub tx_hash: String,
    pub raw: HexBytes,
}

#[async_trait]
pub trait TransactionSigner: Send + Sync {
    async fn sign(&self, request: SigningRequest) -> Result<SignedTransaction, String>;
}

pub type TransactionServices = Arc<dyn TransactionSigner>;

/// Aggregate state, rebuilt from events only.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Transaction {
    prepared: Option<TransactionPrepared>,
    status: Option<TransactionStatus>,
    tx_hash: Option<String>,
}

impl Transaction {
    pub fn status(&self) -> Option<TransactionStatus> {
        self.status
    }

    pub fn prepared(&self) -> Option<&TransactionPrepared> {
        self.prepared.as_ref()
    }

    pub fn tx_hash(&self) -> Option<&str> {
        self.tx_hash.as_deref()
    }

    /// The prepared transaction and its status, or `NotFound` before it was prepared.
    fn existing(&self) -> Result<(&TransactionPrepared, TransactionStatus), TransactionError> {
        match (&self.prepared, self.status) {
            (Some(p), Some(s)) => Ok((p, s)),
            _ => Err(TransactionError::NotFound),
        }
    }

    /// Checks shared by authorize and reject: the owner deciding on a live, pending prompt.
    fn check_decision(
        &self,
        user_id: &str,
        now: OffsetDateTime,
        action: &'static str,
    ) -> Result<&TransactionPrepared, TransactionError> {
        let (prepared, status) = self.existing()?;
        if prepared.owner_user_id != user_id {
            return Err(TransactionError::NotOwner);
        }
        if status == TransactionStatus::Expired
            || (status == TransactionStatus::PendingAuthorization && now >= prepared.expires_at)
        {
            return Err(TransactionError::Expired);
        }
        if status != TransactionStatus::PendingAuthorization {
            return Err(TransactionError::InvalidState { action, status });
        }
        Ok(prepared)
    }
}

impl Aggregate for Transaction {
    const TYPE: &'static str = "Transaction";
    type Command = TransactionCommand;
    type Event = TransactionEvent;
    type Error = TransactionError;
    type Services = TransactionServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        signer: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            TransactionCommand::Prepare(cmd) => {
                if self.prepared.is_some() {
                    return Err(TransactionError::AlreadyExists);
                }
                if cmd.expires_at <= cmd.now {
                    return Err(TransactionError::InvalidExpiry);
                }
                let payload_digest = cmd.payload.digest();
                let simulation = cmd.simulation;
                TransactionEvent::TransactionPrepared(Box::new(TransactionPrepared {
                    transaction_id: cmd.transaction_id,
                    wallet_address: cmd.wallet_address,
                    owner_user_id: cmd.owner_user_id,
                    initiator: cmd.initiator,
                    kind: cmd.kind,
                    to: cmd.to,
                    token_address: cmd.token_address,
                    amount: cmd.amount,
                    memo: cmd.memo,
                    summary: cmd.summary,
                    payload: cmd.payload,
                    payload_digest,
                    prepared_at: cmd.now,
                    expires_at: cmd.expires_at,
                    simulation: Some(simulation.outcome),
                    gas_estimate: simulation.gas_estimate,
                    max_fee_per_gas: simulation.max_fee_per_gas,
                    max_fee_wei: simulation.max_fee_wei,
                }))
            }
            TransactionCommand::Authorize { user_id, now } => {
                let prepared = self.check_decision(&user_id, now, "authorize")?;
                TransactionEvent::TransactionAuthorized {
                    payload_digest: prepared.payload.digest(),
                    authorized_by: user_id,
                    authorized_at: now,
                }
            }
            TransactionCommand::Reject {
                user_id,
                reason,
                now,
            } => {
                self.check_decision(&user_id, now, "reject")?;
                TransactionEvent::TransactionRejected {
                    rejected_by: user_id,
                    reason,
                    rejected_at: now,
                }
            }
            TransactionCommand::Expire { now } => {
                let (prepared, status) = self.existing()?;
                if status != TransactionStatus::PendingAuthorization {
                    return Err(TransactionError::InvalidState {
                        action: "expire",
                        status,
                    });
                }
                if now < prepared.expires_at {
                    return Err(TransactionError::NotDue);
                }
                TransactionEvent::TransactionExpired { expired_at: now }
            }
            TransactionCommand::Execute {
                actor,
                nonce,
                fees,
                max_fee_per_gas_cap,
                now,
            } => {
                let (prepared, status) = self.existing()?;
                if !prepared.initiator.same_principal(&actor) {
                    return Err(TransactionError::NotInitiator);
                }
                match status {
                    TransactionStatus::Authorized => {}
                    TransactionStatus::Executed | TransactionStatus::Confirmed => {
                        return Err(TransactionError::AlreadyExecuted {
                            tx_hash: self.tx_hash.clone().unwrap_or_default(),
                        })
                    }
                    TransactionStatus::Failed if self.tx_hash.is_some() => {
                        return Err(TransactionError::AlreadyExecuted {
                            tx_hash: self.tx_hash.clone().unwrap_or_default(),
                        })
                    }
                    status => {
                        return Err(TransactionError::InvalidState {
                            action: "execute",
                            status,
                        })
                    }
                }
                if let Some(cap) = max_fee_per_gas_cap {
                    if fees.max_fee_per_gas > cap {
                        return Err(TransactionError::FeeAboveCap {
                            max_fee_per_gas: fees.max_fee_per_gas,
                            cap,
                        });
                    }
                }
                let signed = signer
                    .sign(SigningRequest {
                        wallet_address: prepared.wallet_address,
                        owner_user_id: prepared.owner_user_id.clone(),
                        payload: prepared.payload.clone(),
                        nonce,
                        fees,
                    })
                    .await
                    .map_err(TransactionError::Signing)?;
                TransactionEvent::TransactionExecuted {
                    tx_hash: signed.tx_hash,
                    nonce,
                    gas_limit: fees.gas_limit,
                    max_fee_per_gas: fees.max_fee_per_gas,
                    max_priority_fee_per_gas: fees.max_priority_fee_per_gas,
                    raw_transaction: signed.raw.to_hex(),
                    executed_by: actor,
                    executed_at: now,
                }
            }
            TransactionCommand::RecordReceipt { outcome, now } => {
                let (_, status) = self.existing()?;
                if status != TransactionStatus::Executed {
                    return Err(TransactionError::InvalidState {
                        action: "confirm",
                        status,
                    });
                }
                match outcome {
                    ReceiptOutcome::Confirmed {
                        block_number,
                        gas_used,
                        effective_gas_price,
                    } => TransactionEvent::TransactionConfirmed {
                        block_number,
                        gas_used,
                        effective_gas_price,
                        confirmed_at: now,
                    },
                    ReceiptOutcome::Reverted { block_number } => {
                        TransactionEvent::TransactionFailed {
                            reason: "reverted on chain".to_owned(),
                            block_number: Some(block_number),
                            failed_at: now,
                        }
                    }
                }
            }
            TransactionCommand::Fail { reason, now } => {
                let (_, status) = self.existing()?;
                if !matches!(
                    status,
                    TransactionStatus::Authorized | TransactionStatus::Executed
                ) {
                    return Err(TransactionError::InvalidState {
                        action: "fail",
                        status,
                    });
                }
                TransactionEvent::TransactionFailed {
                    reason,
                    block_number: None,
                    failed_at: now,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.status = Some(match event {
            TransactionEvent::TransactionPrepared(prepared) => {
                self.prepared = Some(*prepared);
                TransactionStatus::PendingAuthorization
            }
            TransactionEvent::TransactionAuthorized { .. } => TransactionStatus::Authorized,
            TransactionEvent::TransactionRejected { .. } => TransactionStatus::Rejected,
            TransactionEvent::TransactionExpired { .. } => TransactionStatus::Expired,
            TransactionEvent::TransactionExecuted { tx_hash, .. } => {
                self.tx_hash = Some(tx_hash);
                TransactionStatus::Executed
            }
            TransactionEvent::TransactionConfirmed { .. } => TransactionStatus::Confirmed,
            TransactionEvent::TransactionFailed { .. } => TransactionStatus::Failed,
        });
    }
}
