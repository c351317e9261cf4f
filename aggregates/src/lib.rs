//! Countersign's domain: the aggregates whose events are the system's source of truth.
//!
//! Pure decisions over state and commands; no database, network, clock or key material.
//! Side effects (signing, TOTP verification) go through the service traits defined here and
//! implemented by the server crate. Event names and shapes are a public format.

pub mod api_key;
pub mod security_log;
pub mod transaction;
pub mod types;
pub mod user;
pub mod wallet;

pub use api_key::{ApiKey, ApiKeyCommand, ApiKeyError, ApiKeyEvent};
pub use security_log::{SecurityLog, SecurityLogCommand, SecurityLogError, SecurityLogEvent};
pub use transaction::{
    FeeParams, Initiator, PrepareTransaction, PreparedSimulation, ReceiptOutcome,
    SignedTransaction, SigningRequest, SimulationOutcome, Transaction, TransactionCommand,
    TransactionError, TransactionEvent, TransactionKind, TransactionPrepared, TransactionServices,
    TransactionSigner, TransactionStatus, TxPayload,
};
pub use types::{Address, Amount, HexBytes, ParseError};
pub use user::{
    mfa_verdict, MfaVerifier, Role, User, UserCommand, UserError, UserEvent, UserServices,
    MFA_LOCKOUT, MFA_MAX_FAILURES,
};
pub use wallet::{Wallet, WalletCommand, WalletError, WalletEvent};
