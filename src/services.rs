//! Implementations of the domain's service traits that need the database and keys.
//! (The transaction signer lives with the chain code in `chain`.)

use std::sync::Arc;

use aggregates::MfaVerifier;
use async_trait::async_trait;
use time::OffsetDateTime;

use crate::crypto::{MasterKey, Purpose, TotpSecret};
use crate::store::Db;

/// Opens a user's sealed TOTP secret (bound to user and secret id) and checks a code.
pub struct TotpVerifier {
    db: Db,
    master_key: Arc<MasterKey>,
}

impl TotpVerifier {
    pub fn new(db: Db, master_key: Arc<MasterKey>) -> Self {
        Self { db, master_key }
    }
}

#[async_trait]
impl MfaVerifier for TotpVerifier {
    async fn matching_steps(
        &self,
        user_id: &str,
        secret_id: &str,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<u64>, String> {
        let sealed = self
            .db
            .mfa_secret(secret_id, user_id)
            .await
            .map_err(|e| e.service_message())?
            .ok_or_else(|| "MFA secret missing".to_owned())?;
        let secret = self
            .master_key
            .open(Purpose::TotpSecret, &[user_id, secret_id], &sealed)
            .map_err(|e| e.to_string())?;
        let unix = u64::try_from(now.unix_timestamp()).unwrap_or_default();
        Ok(TotpSecret::from_bytes(secret).matching_steps(code, unix))
    }
}
