//! The projector keeps view documents current from the event log, and the read queries over
//! them.
//!
//! Exactly-once: the projector reads events strictly after its checkpoint in global-position
//! order (positions are commit-ordered, see the migrations), folds them with the pure
//! `projections` crate, and writes the documents *and* the new checkpoint in one transaction.
//! A crash rolls both back; a second projector (another node) waits on the checkpoint row lock
//! and then continues from the committed checkpoint. cqrs-es query dispatch is not used.

use std::collections::HashMap;

use projections::{StoredEvent, ViewDoc, ViewKind};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{watch, Mutex};

use crate::store::{with_pool, Backend, Db, StoreError};

const CHECKPOINT: &str = "views";
const BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("projection failed: {0}")]
    Projection(#[from] projections::ProjectionError),
}

impl From<sqlx::Error> for ProjectorError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: Value,
    metadata: Value,
    recorded_at: String,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> Self {
        Self {
            position: r.position,
            aggregate_type: r.aggregate_type,
            aggregate_id: r.aggregate_id,
            sequence: r.sequence,
            event_type: r.event_type,
            event_version: r.event_version,
            payload: r.payload,
            metadata: r.metadata,
            recorded_at: r.recorded_at,
        }
    }
}

/// The column list of event reads, with `recorded_at` rendered as RFC 3339 UTC on both
/// backends.
fn event_columns(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "position, aggregate_type, aggregate_id, sequence, event_type, event_version, \
             payload, metadata, \
             to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS recorded_at"
        }
        Backend::Sqlite => {
            "position, aggregate_type, aggregate_id, sequence, event_type, event_version, \
             payload, metadata, recorded_at"
        }
    }
}

pub struct Projector {
    db: Db,
    /// One catch-up at a time per process; other processes are held off by the row lock.
    running: Mutex<()>,
    applied: watch::Sender<i64>,
}

impl Projector {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            running: Mutex::new(()),
            applied: watch::Sender::new(0),
        }
    }

    /// The position up to which views are known to be current, as a watchable value.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Apply every committed event not yet in the views. Returns the checkpoint reached.
    /// Called after each command (so a response never precedes its own view update) and
    /// periodically (events from other nodes, recovery after a crash).
    pub async fn catch_up(&self) -> Result<i64, ProjectorError> {
        let _running = self.running.lock().await;
        loop {
            let (checkpoint, applied) = self.apply_batch().await?;
            self.applied.send_if_modified(|p| {
                let changed = *p != checkpoint;
                *p = checkpoint;
                changed
            });
            if applied < BATCH {
                return Ok(checkpoint);
            }
        }
    }

    /// One transaction: lock the checkpoint, fold the next batch, write documents and checkpoint.
    async fn apply_batch(&self) -> Result<(i64, i64), ProjectorError> {
        let backend = self.db.backend();
        let select_events = format!(
            "SELECT {} FROM events WHERE position > $1 ORDER BY position LIMIT $2",
            event_columns(backend)
        );
        with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            // Taking the write lock first: a row lock on Postgres, the database write lock on
            // SQLite (so the transaction never has to upgrade from a stale read snapshot).
            sqlx::query("UPDATE projection_checkpoints SET position = position WHERE name = $1")
                .bind(CHECKPOINT)
                .execute(&mut *tx)
                .await?;
            let checkpoint: i64 =
                sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
                    .bind(CHECKPOINT)
                    .fetch_one(&mut *tx)
                    .await?;
            let rows: Vec<EventRow> = sqlx::query_as(&select_events)
                .bind(checkpoint)
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
            let Some(last) = rows.last().map(|r| r.position) else {
                tx.rollback().await?;
                return Ok((checkpoint, 0));
            };
            let count = rows.len() as i64;
            let mut docs: HashMap<(ViewKind, String), (ViewDoc, i64)> = HashMap::new();
            for row in rows {
                let event = StoredEvent::from(row);
                let Some(key) = projections::target(&event) else {
                    continue;
                };
                let current = match docs.get(&key) {
                    Some((doc, _)) => Some(doc.payload.clone()),
                    None => {
                        sqlx::query_scalar("SELECT payload FROM views WHERE kind = $1 AND id = $2")
                            .bind(key.0.as_str())
                            .bind(&key.1)
                            .fetch_optional(&mut *tx)
                            .await?
                    }
                };
                let doc = projections::apply(key.0, current, &event)?;
                docs.insert(key, (doc, event.position));
            }
            for (doc, position) in docs.into_values() {
                sqlx::query(
                    "INSERT INTO views (kind, id, owner_user_id, wallet_address, api_key_id, \
                     status, created_position, position, payload) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) \
                     ON CONFLICT (kind, id) DO UPDATE SET owner_user_id = excluded.owner_user_id, \
                     wallet_address = excluded.wallet_address, api_key_id = excluded.api_key_id, \
                     status = excluded.status, position = excluded.position, payload = excluded.payload",
                )
                .bind(doc.kind.as_str())
                .bind(&doc.id)
                .bind(&doc.owner_user_id)
                .bind(&doc.wallet_address)
                .bind(&doc.api_key_id)
                .bind(&doc.status)
                .bind(position)
                .bind(&doc.payload)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("UPDATE projection_checkpoints SET position = $1 WHERE name = $2")
                .bind(last)
                .bind(CHECKPOINT)
                .execute(&mut *tx)
                .await?;
            if backend == Backend::Postgres {
                // Delivered at commit: wakes the push hub of every node.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(crate::push::VIEWS_CHANNEL)
                    .bind(last.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok((last, count))
        })
    }
}

/// Read queries over views and the event log.
impl Db {
    pub async fn view<T: DeserializeOwned>(
        &self,
        kind: ViewKind,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let payload: Option<Value> = with_pool!(self, |pool| sqlx::query_scalar(
            "SELECT payload FROM views WHERE kind = $1 AND id = $2"
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(pool)
        .await?);
        payload.map(decode_view).transpose()
    }

    /// Views of one kind selected by an indexed column (`owner_user_id` or `api_key_id`), newest
    /// first, optionally filtered by status.
    pub async fn views_by<T: DeserializeOwned>(
        &self,
        kind: ViewKind,
        column: ViewColumn,
        value: &str,
        status: Option<&str>,
    ) -> Result<Vec<T>, StoreError> {
        let sql = format!(
            "SELECT payload FROM views WHERE kind = $1 AND {} = $2 \
             AND ($3 IS NULL OR status = $3) ORDER BY created_position DESC LIMIT 1000",
            column.name()
        );
        let rows: Vec<Value> = with_pool!(self, |pool| sqlx::query_scalar(&sql)
            .bind(kind.as_str())
            .bind(value)
            .bind(status)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(decode_view).collect()
    }

    /// Every view of a kind in a status (background workers: expiry, receipts).
    pub async fn views_in_status<T: DeserializeOwned>(
        &self,
        kind: ViewKind,
        status: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rows: Vec<Value> = with_pool!(self, |pool| {
            sqlx::query_scalar(
            "SELECT payload FROM views WHERE kind = $1 AND status = $2 ORDER BY position LIMIT 10000"
        )
        .bind(kind.as_str())
        .bind(status)
        .fetch_all(pool)
        .await?
        });
        rows.into_iter().map(decode_view).collect()
    }

    /// The history of one aggregate, in order.
    pub async fn events_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {} FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
            event_columns(self.backend())
        );
        let rows: Vec<EventRow> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(StoredEvent::from).collect())
    }

    /// Events after `position` in commit order.
    pub async fn events_after(
        &self,
        position: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {} FROM events WHERE position > $1 ORDER BY position LIMIT $2",
            event_columns(self.backend())
        );
        let rows: Vec<EventRow> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(position)
            .bind(limit)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(StoredEvent::from).collect())
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ViewColumn {
    Owner,
    ApiKey,
}

impl ViewColumn {
    fn name(self) -> &'static str {
        match self {
            Self::Owner => "owner_user_id",
            Self::ApiKey => "api_key_id",
        }
    }
}

fn decode_view<T: DeserializeOwned>(payload: Value) -> Result<T, StoreError> {
    serde_json::from_value(payload).map_err(|e| StoreError::Corrupt(e.to_string()))
}
