//! The sealer: after commit, in position order, it hashes each event into its aggregate's
//! chain and the global accumulator, stores the seals, and signs a checkpoint over the
//! accumulator — all of one batch in one transaction, holding its checkpoint row lock (the
//! projector's discipline), so two nodes never seal twice and a crash seals nothing.
//!
//! Writers are never serialized by it: events are appended as before and sealed a moment
//! later. The signing key is generated on first start and kept sealed under the master key;
//! it is opened only to sign a checkpoint and zeroized right after.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::canonical::{self, accumulate, CheckpointFields, EventHasher, Hash, ZERO};
use super::store::event_text_columns;
use super::verify::{key_id, AuditEvent, Checkpoint, Seal};
use super::AuditError;
use crate::crypto::{MasterKey, Purpose};
use crate::store::{with_pool, Backend, Db};

/// Events per sealing transaction, and so at most this many events per checkpoint.
pub const BATCH: i64 = 2000;
const LOCK_ROW: &str = "seals";

/// A signing key as stored: public half in the clear, private half sealed.
#[derive(Clone)]
pub struct StoredKey {
    pub key_id: String,
    pub public_key: VerifyingKey,
    sealed_private_key: Vec<u8>,
}

impl StoredKey {
    fn binding(&self) -> [String; 2] {
        [self.key_id.clone(), hex::encode(self.public_key.as_bytes())]
    }

    /// Open the private key, check it belongs to the public key, and hand it to `f`; the key
    /// is zeroized when `f` returns.
    pub fn with_signing_key<T>(
        &self,
        master_key: &MasterKey,
        f: impl FnOnce(&SigningKey) -> T,
    ) -> Result<T, AuditError> {
        let binding = self.binding();
        let opened = master_key
            .open(
                Purpose::AuditSigningKey,
                &[&binding[0], &binding[1]],
                &self.sealed_private_key,
            )
            .map_err(|e| AuditError::Key(format!("audit key {}: {e}", self.key_id)))?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        if opened.len() != 32 {
            return Err(AuditError::Key("audit key has the wrong length".into()));
        }
        bytes.copy_from_slice(&opened);
        // SigningKey zeroizes itself on drop.
        let signing = SigningKey::from_bytes(&bytes);
        if signing.verifying_key() != self.public_key {
            return Err(AuditError::Key(format!(
                "audit key {} does not match its public key",
                self.key_id
            )));
        }
        Ok(f(&signing))
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    key_id: String,
    public_key: Vec<u8>,
    sealed_private_key: Vec<u8>,
}

impl TryFrom<KeyRow> for StoredKey {
    type Error = AuditError;
    fn try_from(r: KeyRow) -> Result<Self, AuditError> {
        let bytes: [u8; 32] = r
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| AuditError::Key("stored public key has the wrong length".into()))?;
        let public_key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| AuditError::Key(format!("stored public key is invalid: {e}")))?;
        if key_id(&public_key) != r.key_id {
            return Err(AuditError::Key(format!(
                "audit key id {} does not match its public key",
                r.key_id
            )));
        }
        Ok(Self {
            key_id: r.key_id,
            public_key,
            sealed_private_key: r.sealed_private_key,
        })
    }
}

/// Every audit key in the database, oldest first. Their ids are checked against the public
/// keys; whether the private halves open is checked by [`Sealer::new`] and by
/// `trusted_keys` when a master key is at hand.
pub async fn stored_keys(db: &Db) -> Result<Vec<StoredKey>, AuditError> {
    let rows: Vec<KeyRow> = with_pool!(db, |pool| sqlx::query_as(
        "SELECT key_id, public_key, sealed_private_key FROM audit_signing_keys \
         ORDER BY created_at, key_id"
    )
    .fetch_all(pool)
    .await?);
    rows.into_iter().map(StoredKey::try_from).collect()
}

/// The public keys verification may trust. With the master key, only keys whose sealed
/// private half opens and matches count: a key row planted by someone without the master key
/// is refused.
pub async fn trusted_keys(
    db: &Db,
    master_key: Option<&MasterKey>,
) -> Result<Vec<VerifyingKey>, AuditError> {
    let mut keys = Vec::new();
    for key in stored_keys(db).await? {
        if let Some(mk) = master_key {
            key.with_signing_key(mk, |_| ())?;
        }
        keys.push(key.public_key);
    }
    Ok(keys)
}

#[derive(sqlx::FromRow)]
pub(crate) struct CheckpointRow {
    seq: i64,
    position: i64,
    event_count: i64,
    accumulator: Vec<u8>,
    prev_checkpoint_hash: Vec<u8>,
    key_id: String,
    signature: Vec<u8>,
    signed_at: String,
}

impl TryFrom<CheckpointRow> for Checkpoint {
    type Error = AuditError;
    fn try_from(r: CheckpointRow) -> Result<Self, AuditError> {
        let hash = |b: &[u8], what: &str| {
            canonical::hash_from_slice(b)
                .ok_or_else(|| AuditError::Corrupt(format!("checkpoint {} {what}", r.seq)))
        };
        Ok(Checkpoint {
            seq: r.seq,
            position: r.position,
            event_count: r.event_count,
            accumulator: hash(&r.accumulator, "accumulator")?,
            prev_checkpoint_hash: hash(&r.prev_checkpoint_hash, "previous hash")?,
            key_id: r.key_id,
            signature: r.signature,
            signed_at: r.signed_at,
        })
    }
}

pub(crate) const CHECKPOINT_COLUMNS: &str =
    "seq, position, event_count, accumulator, prev_checkpoint_hash, key_id, signature, signed_at";

/// The next events to seal, payload and metadata as stored (hashed without parsing them into
/// a `Value`).
fn seal_input_sql(backend: Backend) -> String {
    format!(
        "SELECT {} FROM events e WHERE e.position > $1 ORDER BY e.position LIMIT $2",
        event_text_columns(backend)
    )
}

/// An aggregate's event: its type, id and sequence.
type EventKey = (String, String, i64);

/// The query for the seal hashes of the events now stored under `keys` (those that have one):
/// the event at that key in `events`, then the seal at its position, as a batch's
/// predecessors are found.
fn predecessors_query<'a, DB: sqlx::Database>(keys: &'a [EventKey]) -> sqlx::QueryBuilder<'a, DB>
where
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut query = sqlx::QueryBuilder::new("WITH k (t, i, s) AS (");
    query.push_values(keys, |mut b, (t, i, s)| {
        b.push_bind(t.as_str()).push_bind(i.as_str()).push_bind(*s);
    });
    query.push(
        ") SELECT p.aggregate_type, p.aggregate_id, ps.hash FROM k \
         JOIN events p ON p.aggregate_type = k.t AND p.aggregate_id = k.i AND p.sequence = k.s \
         JOIN event_seals ps ON ps.position = p.position",
    );
    query
}

/// Keys per predecessor query (3 parameters each): far below both backends' limits.
const PREDECESSORS_CHUNK: usize = 500;

/// What one sealing pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sealed {
    /// The last sealed position.
    pub position: i64,
    /// Events sealed by this pass.
    pub events: i64,
}

pub struct Sealer {
    db: Db,
    master_key: Arc<MasterKey>,
    key: StoredKey,
    running: Mutex<()>,
}

impl Sealer {
    /// Load the signing key, generating it on first start (under the sealer's lock, so two
    /// nodes starting together agree on one key). Fails if the stored key does not open with
    /// this master key.
    pub async fn new(db: Db, master_key: Arc<MasterKey>) -> Result<Self, AuditError> {
        let key = with_pool!(&db, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE projection_checkpoints SET position = position WHERE name = $1")
                .bind(LOCK_ROW)
                .execute(&mut *tx)
                .await?;
            let existing: Option<KeyRow> = sqlx::query_as(
                "SELECT key_id, public_key, sealed_private_key FROM audit_signing_keys \
                 ORDER BY created_at DESC, key_id LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await?;
            let key = match existing {
                Some(row) => {
                    tx.rollback().await?;
                    StoredKey::try_from(row)?
                }
                None => {
                    let mut secret = Zeroizing::new([0u8; 32]);
                    rand::rngs::OsRng.fill_bytes(secret.as_mut_slice());
                    let signing = SigningKey::from_bytes(&secret);
                    let public_key = signing.verifying_key();
                    drop(signing);
                    let id = key_id(&public_key);
                    let public_hex = hex::encode(public_key.as_bytes());
                    let sealed = master_key.seal(
                        Purpose::AuditSigningKey,
                        &[&id, &public_hex],
                        secret.as_slice(),
                    );
                    sqlx::query(
                        "INSERT INTO audit_signing_keys (key_id, public_key, sealed_private_key) \
                         VALUES ($1, $2, $3)",
                    )
                    .bind(&id)
                    .bind(public_key.as_bytes().as_slice())
                    .bind(&sealed)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    tracing::info!(key_id = %id, "generated the audit signing key");
                    StoredKey {
                        key_id: id,
                        public_key,
                        sealed_private_key: sealed,
                    }
                }
            };
            key
        });
        key.with_signing_key(&master_key, |_| ())?;
        Ok(Self {
            db,
            master_key,
            key,
            running: Mutex::new(()),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key.key_id
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.public_key
    }

    /// Seal every committed event not sealed yet, one transaction and one signed checkpoint
    /// per batch.
    pub async fn seal_pending(&self) -> Result<Sealed, AuditError> {
        let _running = self.running.lock().await;
        // Nothing new: no write transaction (this runs every poll interval on every node).
        let (head, sealed): (i64, i64) = with_pool!(&self.db, |pool| sqlx::query_as(
            "SELECT (SELECT COALESCE(MAX(position), 0) FROM events), \
             (SELECT position FROM projection_checkpoints WHERE name = $1)"
        )
        .bind(LOCK_ROW)
        .fetch_one(pool)
        .await?);
        if head <= sealed {
            return Ok(Sealed {
                position: sealed,
                events: 0,
            });
        }
        let mut total = Sealed::default();
        loop {
            let batch = self.seal_batch().await?;
            total.position = batch.position;
            total.events += batch.events;
            if batch.events < BATCH {
                return Ok(total);
            }
        }
    }

    async fn seal_batch(&self) -> Result<Sealed, AuditError> {
        let select = seal_input_sql(self.db.backend());
        let last_sql =
            format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1");
        with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            // The write lock first (a row lock on Postgres, the database lock on SQLite).
            sqlx::query("UPDATE projection_checkpoints SET position = position WHERE name = $1")
                .bind(LOCK_ROW)
                .execute(&mut *tx)
                .await?;
            let last: Option<CheckpointRow> =
                sqlx::query_as(&last_sql).fetch_optional(&mut *tx).await?;
            let last = last.map(Checkpoint::try_from).transpose()?;
            let (after, mut count, mut acc, prev_cp_hash, seq) = match &last {
                None => (0, 0, ZERO, ZERO, 1),
                Some(cp) => (
                    cp.position,
                    cp.event_count,
                    cp.accumulator,
                    cp.hash(),
                    cp.seq + 1,
                ),
            };
            let rows: Vec<AuditEvent> = sqlx::query_as(&select)
                .bind(after)
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
            let Some(position) = rows.last().map(|r| r.position) else {
                tx.rollback().await?;
                return Ok(Sealed {
                    position: after,
                    events: 0,
                });
            };
            // An aggregate's first event in this batch links to the seal of its predecessor,
            // if it has one (a first event, sequence 1, has none: nothing to look up). Later
            // ones link to the hash made just before them.
            let mut firsts: HashSet<(&str, &str)> = HashSet::new();
            let wanted: Vec<EventKey> = rows
                .iter()
                .filter(|r| firsts.insert((&r.aggregate_type, &r.aggregate_id)) && r.sequence > 1)
                .map(|r| {
                    (
                        r.aggregate_type.clone(),
                        r.aggregate_id.clone(),
                        r.sequence - 1,
                    )
                })
                .collect();
            // Keyed by aggregate: one predecessor is looked up per aggregate, its first event's.
            let mut stored: HashMap<(String, String), Hash> = HashMap::with_capacity(wanted.len());
            for chunk in wanted.chunks(PREDECESSORS_CHUNK) {
                let found: Vec<(String, String, Vec<u8>)> = predecessors_query(chunk)
                    .build_query_as()
                    .fetch_all(&mut *tx)
                    .await?;
                for (t, i, hash) in found {
                    if let Some(hash) = canonical::hash_from_slice(&hash) {
                        stored.insert((t, i), hash);
                    }
                }
            }
            let events = rows.len() as i64;
            let mut hasher = EventHasher::default();
            let mut heads: HashMap<(String, String), Hash> = HashMap::new();
            let mut seals: Vec<(i64, Seal)> = Vec::with_capacity(rows.len());
            for row in rows {
                let key = (row.aggregate_type.clone(), row.aggregate_id.clone());
                let prev = heads
                    .get(&key)
                    .or_else(|| stored.get(&key))
                    .copied()
                    .unwrap_or(ZERO);
                let (hash, payload_hash) =
                    hasher
                        .hash_with_payload(&row.fields(), &prev)
                        .map_err(|e| {
                            AuditError::Corrupt(format!(
                                "event at position {} is not JSON: {e}",
                                row.position
                            ))
                        })?;
                acc = accumulate(&acc, &hash);
                count += 1;
                heads.insert(key, hash);
                seals.push((
                    row.position,
                    Seal {
                        payload_hash,
                        aggregate_type: row.aggregate_type,
                        aggregate_id: row.aggregate_id,
                        sequence: row.sequence,
                        hash,
                        prev_hash: prev,
                        accumulator: acc,
                    },
                ));
            }
            // 8 parameters per row; chunks stay far below both backends' parameter limits.
            for chunk in seals.chunks(500) {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO event_seals (position, aggregate_type, aggregate_id, sequence, \
                     payload_hash, hash, prev_hash, accumulator) ",
                );
                insert.push_values(chunk, |mut b, (position, s)| {
                    b.push_bind(*position)
                        .push_bind(s.aggregate_type.as_str())
                        .push_bind(s.aggregate_id.as_str())
                        .push_bind(s.sequence)
                        .push_bind(s.payload_hash.as_slice())
                        .push_bind(s.hash.as_slice())
                        .push_bind(s.prev_hash.as_slice())
                        .push_bind(s.accumulator.as_slice());
                });
                insert.build().execute(&mut *tx).await?;
            }
            let checkpoint = self.sign(CheckpointFields {
                seq,
                position,
                event_count: count,
                accumulator: acc,
                prev_checkpoint_hash: prev_cp_hash,
                key_id: self.key.key_id.clone(),
                signed_at: now_rfc3339(),
            })?;
            sqlx::query(&format!(
                "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(checkpoint.seq)
            .bind(checkpoint.position)
            .bind(checkpoint.event_count)
            .bind(checkpoint.accumulator.as_slice())
            .bind(checkpoint.prev_checkpoint_hash.as_slice())
            .bind(&checkpoint.key_id)
            .bind(&checkpoint.signature)
            .bind(&checkpoint.signed_at)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE projection_checkpoints SET position = $1 WHERE name = $2")
                .bind(position)
                .bind(LOCK_ROW)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Sealed { position, events })
        })
    }

    fn sign(&self, fields: CheckpointFields) -> Result<Checkpoint, AuditError> {
        let message = fields.message();
        let signature = self
            .key
            .with_signing_key(&self.master_key, |k| k.sign(&message).to_bytes().to_vec())?;
        Ok(Checkpoint {
            seq: fields.seq,
            position: fields.position,
            event_count: fields.event_count,
            accumulator: fields.accumulator,
            prev_checkpoint_hash: fields.prev_checkpoint_hash,
            key_id: fields.key_id,
            signature,
            signed_at: fields.signed_at,
        })
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
