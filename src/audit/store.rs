//! Reading the audit data back: the merged, position-ordered record stream that verification
//! and export walk (events, seals and checkpoints read in keyset pages), and the filtered,
//! paginated event listing auditors and users read.

use std::collections::VecDeque;

use projections::StoredEvent;

use super::canonical::{self, Hash};
use super::sealer::{CheckpointRow, CHECKPOINT_COLUMNS};
use super::verify::{AuditEvent, Checkpoint, Record, Seal};
use super::AuditError;
use crate::projector::EventRow;
use crate::store::{with_pool, Backend, Db};

const PAGE: i64 = 10_000;

/// Event columns (table alias `e`), with `recorded_at` as RFC 3339 UTC on both backends.
pub(crate) fn event_columns(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "e.position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, \
             e.event_version, e.payload, e.metadata, \
             to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS recorded_at"
        }
        Backend::Sqlite => {
            "e.position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, \
             e.event_version, e.payload, e.metadata, e.recorded_at"
        }
    }
}

/// [`event_columns`] with payload and metadata as the text they are stored as (`json` on
/// PostgreSQL), for the readers that hash them ([`AuditEvent`]): the sealer and [`DbRecords`].
pub(crate) fn event_text_columns(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "e.position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, \
             e.event_version, e.payload::text AS payload, e.metadata::text AS metadata, \
             to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS recorded_at"
        }
        Backend::Sqlite => event_columns(backend),
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SealRow {
    pub position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    payload_hash: Vec<u8>,
    hash: Vec<u8>,
    prev_hash: Vec<u8>,
    accumulator: Vec<u8>,
}

pub(crate) const SEAL_COLUMNS: &str =
    "position, aggregate_type, aggregate_id, sequence, payload_hash, hash, prev_hash, accumulator";

impl TryFrom<SealRow> for Seal {
    type Error = AuditError;
    fn try_from(r: SealRow) -> Result<Self, AuditError> {
        let h = |b: &[u8]| -> Result<Hash, AuditError> {
            canonical::hash_from_slice(b).ok_or_else(|| {
                AuditError::Corrupt(format!("seal {} has a malformed hash", r.position))
            })
        };
        Ok(Seal {
            payload_hash: h(&r.payload_hash)?,
            hash: h(&r.hash)?,
            prev_hash: h(&r.prev_hash)?,
            accumulator: h(&r.accumulator)?,
            aggregate_type: r.aggregate_type,
            aggregate_id: r.aggregate_id,
            sequence: r.sequence,
        })
    }
}

/// The audit records of a database in verification order: event positions (event and seal
/// merged by position) with each checkpoint after the last position it covers.
pub struct DbRecords {
    db: Db,
    events: VecDeque<AuditEvent>,
    seals: VecDeque<(i64, Seal)>,
    checkpoints: VecDeque<Checkpoint>,
    event_cursor: Option<i64>,
    seal_cursor: Option<i64>,
    checkpoint_cursor: Option<i64>,
}

impl DbRecords {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            events: VecDeque::new(),
            seals: VecDeque::new(),
            checkpoints: VecDeque::new(),
            event_cursor: Some(i64::MIN),
            seal_cursor: Some(i64::MIN),
            checkpoint_cursor: Some(i64::MIN),
        }
    }

    async fn fill(&mut self) -> Result<(), AuditError> {
        let backend = self.db.backend();
        if self.events.is_empty() {
            if let Some(after) = self.event_cursor {
                let sql = format!(
                    "SELECT {} FROM events e WHERE e.position > $1 ORDER BY e.position LIMIT $2",
                    event_text_columns(backend)
                );
                let rows: Vec<AuditEvent> = with_pool!(&self.db, |pool| sqlx::query_as(&sql)
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(pool)
                    .await?);
                self.event_cursor = (rows.len() as i64 == PAGE)
                    .then(|| rows.last().map(|r| r.position))
                    .flatten();
                self.events.extend(rows);
            }
        }
        if self.seals.is_empty() {
            if let Some(after) = self.seal_cursor {
                let sql = format!(
                    "SELECT {SEAL_COLUMNS} FROM event_seals WHERE position > $1 ORDER BY position LIMIT $2"
                );
                let rows: Vec<SealRow> = with_pool!(&self.db, |pool| sqlx::query_as(&sql)
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(pool)
                    .await?);
                self.seal_cursor = (rows.len() as i64 == PAGE)
                    .then(|| rows.last().map(|r| r.position))
                    .flatten();
                for row in rows {
                    let position = row.position;
                    self.seals.push_back((position, Seal::try_from(row)?));
                }
            }
        }
        if self.checkpoints.is_empty() {
            if let Some(after) = self.checkpoint_cursor {
                let sql = format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE seq > $1 ORDER BY seq LIMIT $2"
                );
                let rows: Vec<CheckpointRow> = with_pool!(&self.db, |pool| sqlx::query_as(&sql)
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(pool)
                    .await?);
                let full = rows.len() as i64 == PAGE;
                for row in rows {
                    self.checkpoints.push_back(Checkpoint::try_from(row)?);
                }
                self.checkpoint_cursor = full
                    .then(|| self.checkpoints.back().map(|c| c.seq))
                    .flatten();
            }
        }
        Ok(())
    }

    /// The next record, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Record>, AuditError> {
        self.fill().await?;
        let next_event = self.events.front().map(|e| e.position);
        let next_seal = self.seals.front().map(|(p, _)| *p);
        let next_position = match (next_event, next_seal) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(cp) = self.checkpoints.front() {
            if next_position.is_none_or(|p| cp.position < p) {
                return Ok(self.checkpoints.pop_front().map(Record::Checkpoint));
            }
        }
        let Some(position) = next_position else {
            return Ok(None);
        };
        let event = if next_event == Some(position) {
            self.events.pop_front()
        } else {
            None
        };
        let seal = if next_seal == Some(position) {
            self.seals.pop_front().map(|(_, s)| s)
        } else {
            None
        };
        Ok(Some(Record::Event {
            position,
            event,
            seal,
        }))
    }
}

/// Filters of the event listing.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub after: i64,
    pub limit: i64,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    /// Inclusive lower bound of `recorded_at`, RFC 3339.
    pub from: Option<time::OffsetDateTime>,
    /// Exclusive upper bound of `recorded_at`, RFC 3339.
    pub to: Option<time::OffsetDateTime>,
    /// Only the aggregates this user owns (their user, wallets, API keys and the transactions
    /// on their wallets); `None` for auditors.
    pub owner_user_id: Option<String>,
}

/// An event with its integrity fields, as the audit API shows it.
#[derive(Debug, Clone)]
pub struct SealedEvent {
    pub event: StoredEvent,
    pub hash: Option<Hash>,
    pub prev_hash: Option<Hash>,
}

#[derive(sqlx::FromRow)]
struct SealedEventRow {
    #[sqlx(flatten)]
    event: EventRow,
    hash: Option<Vec<u8>>,
    prev_hash: Option<Vec<u8>>,
}

impl From<SealedEventRow> for SealedEvent {
    fn from(r: SealedEventRow) -> Self {
        Self {
            event: r.event.into(),
            hash: r.hash.as_deref().and_then(canonical::hash_from_slice),
            prev_hash: r.prev_hash.as_deref().and_then(canonical::hash_from_slice),
        }
    }
}

/// Timestamps as each backend compares them: SQLite stores fixed-width UTC text.
fn time_param(backend: Backend, t: time::OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    match backend {
        Backend::Postgres => utc
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        Backend::Sqlite => {
            let f = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            utc.format(&f).unwrap_or_default()
        }
    }
}

impl Db {
    /// Events in commit order after `filter.after`, keyset-paginated by position: a page never
    /// skips or repeats an event even while writers run (positions are commit-ordered).
    pub async fn audit_events(&self, filter: &EventFilter) -> Result<Vec<SealedEvent>, AuditError> {
        let backend = self.backend();
        let ts = |n: usize| match backend {
            Backend::Postgres => format!("CAST(${n} AS timestamptz)"),
            Backend::Sqlite => format!("${n}"),
        };
        let mut sql = format!(
            "SELECT {}, s.hash, s.prev_hash FROM events e \
             LEFT JOIN event_seals s ON s.position = e.position \
             WHERE e.position > $1 \
             AND ($2 IS NULL OR e.aggregate_type = $2) \
             AND ($3 IS NULL OR e.aggregate_id = $3) \
             AND ($4 IS NULL OR e.event_type = $4) \
             AND ($5 IS NULL OR e.recorded_at >= {}) \
             AND ($6 IS NULL OR e.recorded_at < {}) ",
            event_columns(backend),
            ts(5),
            ts(6),
        );
        if filter.owner_user_id.is_some() {
            // The caller's own aggregates, found through the views' owner column.
            sql.push_str(
                "AND EXISTS (SELECT 1 FROM views v WHERE v.owner_user_id = $8 AND v.id = e.aggregate_id \
                 AND v.kind = CASE e.aggregate_type WHEN 'Transaction' THEN 'transaction' \
                 WHEN 'Wallet' THEN 'wallet' WHEN 'ApiKey' THEN 'api_key' WHEN 'User' THEN 'user' END) ",
            );
        }
        sql.push_str("ORDER BY e.position LIMIT $7");
        let from = filter.from.map(|t| time_param(backend, t));
        let to = filter.to.map(|t| time_param(backend, t));
        let rows: Vec<SealedEventRow> = with_pool!(self, |pool| {
            let mut q = sqlx::query_as(&sql)
                .bind(filter.after)
                .bind(filter.aggregate_type.as_deref())
                .bind(filter.aggregate_id.as_deref())
                .bind(filter.event_type.as_deref())
                .bind(from.as_deref())
                .bind(to.as_deref())
                .bind(filter.limit);
            if let Some(owner) = &filter.owner_user_id {
                q = q.bind(owner.as_str());
            }
            q.fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(SealedEvent::from).collect())
    }

    /// One aggregate's events with their integrity fields, in sequence order.
    pub async fn audit_events_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<SealedEvent>, AuditError> {
        let sql = format!(
            "SELECT {}, s.hash, s.prev_hash FROM events e \
             LEFT JOIN event_seals s ON s.position = e.position \
             WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 ORDER BY e.sequence",
            event_columns(self.backend())
        );
        let rows: Vec<SealedEventRow> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(SealedEvent::from).collect())
    }

    /// The latest signed checkpoint.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let sql =
            format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1");
        let row: Option<CheckpointRow> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .fetch_optional(pool)
            .await?);
        row.map(Checkpoint::try_from).transpose()
    }
}
