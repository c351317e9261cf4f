//! Master-key rotation over the tables that hold sealed secrets: count them per master key
//! (`countersign keys status`) and rewrap every one still under an older key under the current
//! key (`countersign keys rotate`). The procedure is in the README ("Key rotation").
//!
//! Rewrapping decrypts only each secret's data key (see `crypto::envelope`), never the secret,
//! and keeps the owner binding. Rows are read in primary-key pages and each is written back with
//! a compare-and-swap on the blob it was read as, so a concurrent writer (another rotation) is
//! never overwritten; a lost race is retried on a later pass. Running it again is a no-op.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::crypto::{KeyId, MasterKey, Purpose};
use crate::store::{with_pool, Db, StoreError};

/// Rows read and rewritten per transaction.
pub const DEFAULT_BATCH: u32 = 500;
/// Passes over the tables before giving up on rows that keep changing underneath.
const MAX_PASSES: usize = 3;

/// A table of sealed secrets: how to page through it, what each row is bound to, and how to
/// swap one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SealedTable {
    WalletKeys,
    MfaSecrets,
    AuditSigningKeys,
}

impl SealedTable {
    pub const ALL: [Self; 3] = [Self::WalletKeys, Self::MfaSecrets, Self::AuditSigningKeys];

    pub fn name(self) -> &'static str {
        match self {
            Self::WalletKeys => "wallet_keys",
            Self::MfaSecrets => "mfa_secrets",
            Self::AuditSigningKeys => "audit_signing_keys",
        }
    }

    fn purpose(self) -> Purpose {
        match self {
            Self::WalletKeys => Purpose::WalletKey,
            Self::MfaSecrets => Purpose::TotpSecret,
            Self::AuditSigningKeys => Purpose::AuditSigningKey,
        }
    }

    /// Up to `limit` rows with a primary key after `after`, in key order.
    async fn page(self, db: &Db, after: &str, limit: u32) -> Result<Vec<SealedRow>, StoreError> {
        let limit = i64::from(limit);
        // The binding is exactly what the writers seal with (`chain::KeyringSigner`,
        // `http::users::setup_mfa`, `audit::sealer`).
        let rows = match self {
            Self::WalletKeys => {
                let rows: Vec<(String, String, Vec<u8>)> = with_pool!(db, |pool| sqlx::query_as(
                    "SELECT wallet_address, owner_user_id, sealed FROM wallet_keys \
                     WHERE wallet_address > $1 ORDER BY wallet_address LIMIT $2"
                )
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?);
                rows.into_iter()
                    .map(|(address, owner, sealed)| SealedRow {
                        id: address.clone(),
                        binding: [address, owner],
                        sealed,
                    })
                    .collect()
            }
            Self::MfaSecrets => {
                let rows: Vec<(String, String, Vec<u8>)> = with_pool!(db, |pool| sqlx::query_as(
                    "SELECT secret_id, user_id, sealed FROM mfa_secrets \
                     WHERE secret_id > $1 ORDER BY secret_id LIMIT $2"
                )
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?);
                rows.into_iter()
                    .map(|(secret_id, user_id, sealed)| SealedRow {
                        id: secret_id.clone(),
                        binding: [user_id, secret_id],
                        sealed,
                    })
                    .collect()
            }
            Self::AuditSigningKeys => {
                let rows: Vec<(String, Vec<u8>, Vec<u8>)> = with_pool!(db, |pool| sqlx::query_as(
                    "SELECT key_id, public_key, sealed_private_key FROM audit_signing_keys \
                     WHERE key_id > $1 ORDER BY key_id LIMIT $2"
                )
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?);
                rows.into_iter()
                    .map(|(key_id, public_key, sealed)| SealedRow {
                        id: key_id.clone(),
                        binding: [key_id, hex::encode(public_key)],
                        sealed,
                    })
                    .collect()
            }
        };
        Ok(rows)
    }

    /// The UPDATE that swaps one row's blob if it still holds the one read: `$1` new blob,
    /// `$2` primary key, `$3` the blob as read.
    fn compare_and_swap_sql(self) -> &'static str {
        match self {
            Self::WalletKeys => {
                "UPDATE wallet_keys SET sealed = $1 WHERE wallet_address = $2 AND sealed = $3"
            }
            Self::MfaSecrets => {
                "UPDATE mfa_secrets SET sealed = $1 WHERE secret_id = $2 AND sealed = $3"
            }
            Self::AuditSigningKeys => {
                "UPDATE audit_signing_keys SET sealed_private_key = $1 \
                 WHERE key_id = $2 AND sealed_private_key = $3"
            }
        }
    }
}

struct SealedRow {
    /// Primary key (wallet address, secret id or audit key id): not secret.
    id: String,
    binding: [String; 2],
    sealed: Vec<u8>,
}

impl SealedRow {
    fn binding(&self) -> [&str; 2] {
        [&self.binding[0], &self.binding[1]]
    }
}

/// How a master key relates to this process's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// `COUNTERSIGN_MASTER_KEY`: seals new secrets.
    Current,
    /// In `COUNTERSIGN_PREVIOUS_MASTER_KEYS`: opens, and is rotated away from.
    Previous,
    /// Not configured here: these secrets cannot be opened or rotated by this process.
    Unknown,
    /// The version-1 format, which does not name its key (rotation adds the id).
    Unrecorded,
}

/// Sealed secrets under one master key in one table.
#[derive(Debug, Clone, Serialize)]
pub struct KeyCount {
    pub table: SealedTable,
    /// The key's id; `None` for version-1 blobs.
    pub key_id: Option<KeyId>,
    pub role: KeyRole,
    pub count: u64,
}

/// What `keys status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub current_key_id: KeyId,
    pub previous_key_ids: Vec<KeyId>,
    pub counts: Vec<KeyCount>,
    /// Blobs whose header is unreadable (each is also reported by `keys rotate`).
    pub malformed: u64,
    /// Secrets not yet under the current key: 0 means previous keys can be retired.
    pub not_current: u64,
}

fn role(master_key: &MasterKey, key_id: Option<KeyId>) -> KeyRole {
    match key_id {
        None => KeyRole::Unrecorded,
        Some(id) if id == master_key.key_id() => KeyRole::Current,
        Some(id) if master_key.knows(id) => KeyRole::Previous,
        Some(_) => KeyRole::Unknown,
    }
}

/// Count sealed secrets per table and master key. Reads only the blob headers: nothing is
/// opened.
pub async fn status(db: &Db, master_key: &MasterKey, batch: u32) -> Result<KeyStatus, StoreError> {
    let batch = batch.max(1);
    let mut counts = Vec::new();
    let mut malformed = 0;
    let mut not_current = 0;
    for table in SealedTable::ALL {
        let mut per_key: BTreeMap<Option<KeyId>, u64> = BTreeMap::new();
        let mut after = String::new();
        loop {
            let rows = table.page(db, &after, batch).await?;
            for row in &rows {
                match MasterKey::sealed_key_id(&row.sealed) {
                    Ok(id) => {
                        *per_key.entry(id).or_default() += 1;
                        if id != Some(master_key.key_id()) {
                            not_current += 1;
                        }
                    }
                    Err(_) => {
                        malformed += 1;
                        not_current += 1;
                    }
                }
            }
            match rows.last() {
                Some(last) if rows.len() == batch as usize => after.clone_from(&last.id),
                _ => break,
            }
        }
        counts.extend(per_key.into_iter().map(|(key_id, count)| KeyCount {
            table,
            key_id,
            role: role(master_key, key_id),
            count,
        }));
    }
    Ok(KeyStatus {
        current_key_id: master_key.key_id(),
        previous_key_ids: master_key.previous_key_ids(),
        counts,
        malformed,
        not_current,
    })
}

/// Per-table outcome of a rotation.
#[derive(Debug, Clone, Serialize)]
pub struct TableRotation {
    pub table: SealedTable,
    /// Rows read in the first pass.
    pub scanned: u64,
    /// Already under the current key.
    pub already_current: u64,
    /// Rewrapped under the current key (with `dry_run`: would be).
    pub rewrapped: u64,
    /// Could not be rewrapped (see `failures`).
    pub failed: u64,
}

/// A secret that could not be rewrapped, and why. Never contains secret material.
#[derive(Debug, Clone, Serialize)]
pub struct RotationFailure {
    pub table: SealedTable,
    /// The row's primary key (wallet address, MFA secret id or audit key id).
    pub id: String,
    pub error: String,
}

/// What `keys rotate` did.
#[derive(Debug, Clone, Serialize)]
pub struct RotationReport {
    pub dry_run: bool,
    pub current_key_id: KeyId,
    pub previous_key_ids: Vec<KeyId>,
    pub tables: Vec<TableRotation>,
    pub failures: Vec<RotationFailure>,
    /// Rows that changed between read and write on every pass (left for the next run).
    pub conflicts: u64,
    pub rewrapped: u64,
    /// The keys the rewrapped secrets were under (`"unrecorded"`: the version-1 format).
    pub from_key_ids: Vec<String>,
}

impl RotationReport {
    /// Every secret is (or, in a dry run, would be) under the current key.
    pub fn complete(&self) -> bool {
        self.failures.is_empty() && self.conflicts == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Rewrap every sealed secret not under the current master key, `batch` rows per transaction.
/// With `dry_run`, check that each could be rewrapped (its data key unwraps) and write nothing.
/// A secret that cannot be rewrapped (key not configured, wrong binding, corrupt) is reported
/// and left as it is; the others are still rotated.
pub async fn rotate(
    db: &Db,
    master_key: &MasterKey,
    batch: u32,
    dry_run: bool,
) -> Result<RotationReport, RotationError> {
    let mut rotation = Rotation {
        db,
        master_key,
        batch: batch.max(1),
        dry_run,
        failures: Vec::new(),
        from: BTreeSet::new(),
    };
    let mut tables = Vec::new();
    let mut conflicts = 0;
    for table in SealedTable::ALL {
        let mut stats = TableRotation {
            table,
            scanned: 0,
            already_current: 0,
            rewrapped: 0,
            failed: 0,
        };
        // The first pass visits every row; later passes only the rows whose compare-and-swap
        // lost to a concurrent write, read afresh.
        let mut lost = rotation.pass(table, None, &mut stats).await?;
        for _ in 1..MAX_PASSES {
            if lost.is_empty() {
                break;
            }
            lost = rotation.pass(table, Some(&lost), &mut stats).await?;
        }
        conflicts += lost.len() as u64;
        stats.failed = rotation
            .failures
            .iter()
            .filter(|f| f.table == table)
            .count() as u64;
        tables.push(stats);
    }
    Ok(RotationReport {
        dry_run,
        current_key_id: master_key.key_id(),
        previous_key_ids: master_key.previous_key_ids(),
        rewrapped: tables.iter().map(|t| t.rewrapped).sum(),
        tables,
        failures: rotation.failures,
        conflicts,
        from_key_ids: rotation.from.into_iter().collect(),
    })
}

struct Rotation<'a> {
    db: &'a Db,
    master_key: &'a MasterKey,
    batch: u32,
    dry_run: bool,
    failures: Vec<RotationFailure>,
    from: BTreeSet<String>,
}

impl Rotation<'_> {
    /// One pass over a table (or, with `only`, over those rows); returns the ids of the rows
    /// whose compare-and-swap found the blob changed since it was read.
    async fn pass(
        &mut self,
        table: SealedTable,
        only: Option<&BTreeSet<String>>,
        stats: &mut TableRotation,
    ) -> Result<BTreeSet<String>, RotationError> {
        let mut lost = BTreeSet::new();
        let mut after = String::new();
        loop {
            let rows = table.page(self.db, &after, self.batch).await?;
            let mut swaps = Vec::new();
            for row in &rows {
                match only {
                    Some(ids) if !ids.contains(&row.id) => continue,
                    Some(_) => {}
                    None => stats.scanned += 1,
                }
                match self
                    .master_key
                    .rewrap(table.purpose(), &row.binding(), &row.sealed)
                {
                    // Includes a row another rotation rewrapped while this one raced it.
                    Ok(None) => stats.already_current += 1,
                    Ok(Some(rewrapped)) => swaps.push((row, rewrapped)),
                    Err(e) => self.failures.push(RotationFailure {
                        table,
                        id: row.id.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            if self.dry_run {
                stats.rewrapped += swaps.len() as u64;
            } else if !swaps.is_empty() {
                let swapped = with_pool!(self.db, |pool| {
                    let mut tx = pool.begin().await?;
                    let mut swapped = Vec::with_capacity(swaps.len());
                    for (row, rewrapped) in &swaps {
                        let done = sqlx::query(table.compare_and_swap_sql())
                            .bind(rewrapped.as_slice())
                            .bind(&row.id)
                            .bind(row.sealed.as_slice())
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        swapped.push(done == 1);
                    }
                    tx.commit().await?;
                    swapped
                });
                for ((row, _), done) in swaps.iter().zip(swapped) {
                    if done {
                        stats.rewrapped += 1;
                        self.from
                            .insert(match MasterKey::sealed_key_id(&row.sealed) {
                                Ok(Some(id)) => id.to_string(),
                                _ => "unrecorded".to_owned(),
                            });
                    } else {
                        lost.insert(row.id.clone());
                    }
                }
            }
            match rows.last() {
                Some(last) if rows.len() == self.batch as usize => after.clone_from(&last.id),
                _ => break,
            }
        }
        Ok(lost)
    }
}
