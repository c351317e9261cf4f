//! Tamper evidence and audit access to the event log.
//!
//! - [`canonical`]: the one encoding that is hashed and signed.
//! - [`sealer`]: after commit, in position order, chains every event (per aggregate) into a
//!   global accumulator and signs a checkpoint per batch with the server's Ed25519 key.
//! - [`verify`]: recomputes everything and reports the first broken link; fed by [`store`]
//!   (the database) or [`export`] (a JSON Lines file, offline).
//!
//! What this does and does not protect against is in the README ("Audit").

pub mod canonical;
pub mod export;
pub mod sealer;
pub mod store;
pub mod verify;

use std::sync::Arc;

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use projections::StoredEvent;
use serde_json::{json, Value};

pub use sealer::{Sealed, Sealer};
pub use store::{DbRecords, EventFilter, SealedEvent};
pub use verify::{Checkpoint, Problem, ProblemKind, Record, Report, Seal, Verifier};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit signing key: {0}")]
    Key(String),
    #[error("audit data is malformed: {0}")]
    Corrupt(String),
    #[error("i/o: {0}")]
    Io(String),
}

impl From<sqlx::Error> for AuditError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

impl From<std::io::Error> for AuditError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// Walk the whole database (events, seals, checkpoints) through the verifier.
pub async fn verify_database(
    db: &crate::store::Db,
    keys: Vec<VerifyingKey>,
    anchor: Option<(i64, canonical::Hash)>,
) -> Result<Report, AuditError> {
    let mut verifier = Verifier::new(keys, anchor);
    let mut records = DbRecords::new(db.clone());
    while let Some(record) = records.next().await? {
        if !verifier.feed(record) {
            break;
        }
    }
    Ok(verifier.finish())
}

/// A public key given as 64 hex characters or standard base64.
pub fn parse_public_key(s: &str) -> Result<VerifyingKey, String> {
    let s = s.trim();
    let bytes = hex::decode(s)
        .ok()
        .filter(|b| b.len() == 32)
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or_else(|| "expected 32 bytes as hex or base64".to_owned())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "expected 32 bytes as hex or base64".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// An anchor `SEQ:HASH` (a checkpoint seen before, from a report or an export).
pub fn parse_anchor(s: &str) -> Result<(i64, canonical::Hash), String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| "expected SEQ:HASH".to_owned())?;
    let seq = seq.parse().map_err(|_| "SEQ must be a number".to_owned())?;
    let hash =
        canonical::parse_hash(hash).ok_or_else(|| "HASH must be 64 hex digits".to_owned())?;
    Ok((seq, hash))
}

/// `{key_id, public_key (hex), public_key_base64, algorithm}` for a key.
pub fn public_key_json(key: &VerifyingKey) -> Value {
    json!({
        "key_id": verify::key_id(key),
        "algorithm": "Ed25519",
        "public_key": hex::encode(key.as_bytes()),
        "public_key_base64": base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
    })
}

/// A transaction's state re-derived from its events alone: each event (upcast to the current
/// shape) folded through the `Transaction` aggregate's own `apply`, and through the view's
/// pure fold, so an auditor can compare both with the stored view.
pub fn rederive_transaction(events: &[StoredEvent]) -> Result<(Value, Option<Value>), String> {
    use cqrs_es::Aggregate;
    let upcasters = crate::upcast::upcasters();
    let mut aggregate = aggregates::Transaction::default();
    let mut view: Option<Value> = None;
    for stored in events {
        let event = crate::upcast::upcast(stored.clone(), &upcasters);
        let domain: aggregates::TransactionEvent = serde_json::from_value(event.payload.clone())
            .map_err(|e| format!("event {} cannot be decoded: {e}", stored.position))?;
        aggregate.apply(domain);
        let doc = projections::apply(projections::ViewKind::Transaction, view.take(), &event)
            .map_err(|e| e.to_string())?;
        view = Some(doc.payload);
    }
    let state = json!({
        "status": aggregate.status(),
        "tx_hash": aggregate.tx_hash(),
        "aggregate": serde_json::to_value(&aggregate).map_err(|e| e.to_string())?,
    });
    Ok((state, view))
}

/// Background sealing: every `interval`, seal what committed since (each batch signed).
pub async fn seal_loop(sealer: Arc<Sealer>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) = sealer.seal_pending().await {
            tracing::error!(error = %e, "sealing failed");
        }
    }
}

#[cfg(test)]
mod tests;
