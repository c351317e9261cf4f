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
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{watch, Mutex};

use crate::push::PushRow;
use crate::store::{with_pool, Backend, Db, StoreError};

const CHECKPOINT: &str = "views";
const BATCH: i64 = 500;
/// Events per multi-row INSERT of an append (8 binds each, under Postgres' 65,535).
const APPEND_CHUNK: usize = 1000;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RebuildStats {
    /// The position the rebuild replayed up to (catch-up then continued past it).
    pub position: i64,
    /// Events replayed.
    pub events: i64,
    /// View documents after the rebuild.
    pub documents: i64,
    /// Documents written out early to bound memory and read back when touched again.
    pub reloaded: i64,
    pub elapsed_seconds: f64,
}

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

/// One row of the event log as read back (shared with the audit reader).
#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    pub(crate) position: i64,
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

/// Fold `$events` (in position order) into their view documents inside transaction `$tx`:
/// load the current documents in bulk, fold, write them back in bulk. Written as a macro so
/// that the same code is compiled for each backend's transaction type.
macro_rules! fold_into_views {
    ($tx:expr, $events:expr) => {
        fold_into_views!($tx, $events, None::<(i64, i64, String)>)
    };
    ($tx:expr, $events:expr, $advance_to:expr) => {{
        // `$advance_to` (Postgres only): also move the checkpoint there (position, version)
        // and notify the other nodes, in the statement that writes the last documents (one
        // round trip fewer).
        let advance_to: Option<(i64, i64, String)> = $advance_to;
        let events: Vec<StoredEvent> = $events;
        let mut stored: HashMap<DocKey, String> = HashMap::new();
        for (kind, ids) in documents_to_load(&events) {
            for chunk in ids.chunks(500) {
                let mut q = sqlx::QueryBuilder::new("SELECT id, payload FROM views WHERE kind = ");
                q.push_bind(kind.as_str()).push(" AND id IN (");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                list.push_unseparated(")");
                let found: Vec<(String, String)> = q.build_query_as().fetch_all($tx).await?;
                stored.extend(found.into_iter().map(|(id, payload)| ((kind, id), payload)));
            }
        }
        let written = fold_documents(events, stored)?;
        let chunks = written.chunks(500).count();
        for (index, chunk) in written.chunks(500).enumerate() {
            let advance = advance_to.clone().filter(|_| index + 1 == chunks);
            let insert = format!("INSERT INTO views ({VIEW_COLUMNS}) ");
            let mut q = sqlx::QueryBuilder::new(match advance {
                Some(_) => format!("WITH upserted AS ({insert}"),
                None => insert,
            });
            push_view_rows(&mut q, chunk);
            q.push(VIEWS_ON_CONFLICT);
            if let Some((position, version, notification)) = advance {
                q.push("), advanced AS (UPDATE projection_checkpoints SET position = ")
                    .push_bind(position)
                    .push(", version = ")
                    .push_bind(version)
                    .push(" WHERE name = ")
                    .push_bind(CHECKPOINT)
                    .push(") SELECT pg_notify(")
                    .push_bind(crate::push::VIEWS_CHANNEL)
                    .push(", ")
                    .push_bind(notification)
                    .push(")");
            }
            q.build().execute($tx).await?;
        }
        (written, chunks > 0 && advance_to.is_some())
    }};
}

/// A view document's key: its kind and id.
pub(crate) type DocKey = (ViewKind, String);

/// The documents `events` update that they do not create, by kind: what a fold must load.
fn documents_to_load(events: &[StoredEvent]) -> HashMap<ViewKind, Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut missing: HashMap<ViewKind, Vec<String>> = HashMap::new();
    for event in events {
        if let Some(key) = projections::target(event) {
            if seen.insert(key.clone()) {
                // An aggregate's first event creates its view: nothing to look up.
                let created_here = event.sequence == 1 && key.1 == event.aggregate_id;
                if !created_here {
                    missing.entry(key.0).or_default().push(key.1);
                }
            }
        }
    }
    missing
}

/// A written view document: the document, the position that created it and the position of
/// the last event folded into it.
pub(crate) type WrittenDoc = (ViewDoc<String>, i64, i64);

/// Fold `events` (in position order) into the documents they touch. `stored` holds the text
/// of every document they update that existed before them ([`documents_to_load`]); each is
/// decoded once and encoded once.
fn fold_documents(
    events: Vec<StoredEvent>,
    mut stored: HashMap<DocKey, String>,
) -> Result<Vec<WrittenDoc>, ProjectorError> {
    let upcasters = crate::upcast::upcasters();
    // Each document touched: its state, the position that created it (if created here) and
    // the position of the last event folded in.
    let mut docs: HashMap<DocKey, (projections::ViewState, Option<i64>, i64)> = HashMap::new();
    for event in events {
        let Some(key) = projections::target(&event) else {
            continue;
        };
        let event = crate::upcast::upcast(event, &upcasters);
        let (current, created) = match docs.remove(&key) {
            Some((state, created, _)) => (Some(state), created),
            None => {
                let head = projections::EventHead::of(&event);
                let current = stored
                    .remove(&key)
                    .map(|doc| projections::ViewState::decode(key.0, &doc, head))
                    .transpose()?;
                let created = current.is_none().then_some(event.position);
                (current, created)
            }
        };
        let state = projections::fold(key.0, current, &event)?;
        docs.insert(key, (state, created, event.position));
    }
    let mut written = Vec::with_capacity(docs.len());
    for ((_, id), (state, created, position)) in docs {
        let doc = state
            .to_doc_text(id)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        written.push((doc, created.unwrap_or(position), position));
    }
    Ok(written)
}

/// Fill in the routing columns of transaction events from their documents as written, as the
/// hub's query would read them.
fn route(pushed: &mut [PushRow], written: &[WrittenDoc]) {
    let routes: HashMap<&str, &ViewDoc<String>> = written
        .iter()
        .filter(|(doc, _, _)| doc.kind == ViewKind::Transaction)
        .map(|(doc, _, _)| (doc.id.as_str(), doc))
        .collect();
    for row in pushed {
        if row.aggregate_type == "Transaction" {
            if let Some(doc) = routes.get(row.aggregate_id.as_str()) {
                row.owner_user_id.clone_from(&doc.owner_user_id);
                row.api_key_id.clone_from(&doc.api_key_id);
                row.wallet_address.clone_from(&doc.wallet_address);
            }
        }
    }
}

/// The columns a view row is written with, in the order [`push_view_rows`] binds them.
pub(crate) const VIEW_COLUMNS: &str = "kind, id, owner_user_id, wallet_address, api_key_id, \
     status, created_position, position, payload, due_at";
/// Writing a document that exists keeps its `created_position`.
pub(crate) const VIEWS_ON_CONFLICT: &str = " ON CONFLICT (kind, id) DO UPDATE SET \
     owner_user_id = excluded.owner_user_id, wallet_address = excluded.wallet_address, \
     api_key_id = excluded.api_key_id, status = excluded.status, position = excluded.position, \
     payload = excluded.payload, due_at = excluded.due_at";

/// Append `VALUES (…), …` for `rows` (document, creating position, last position) in the
/// order of [`VIEW_COLUMNS`]. Documents are stored as their JSON text (`text` on PostgreSQL
/// since migration 0009: the database has no reason to check what this process encoded).
pub(crate) fn push_view_rows<'a, DB: sqlx::Database>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    rows: &'a [(ViewDoc<String>, i64, i64)],
) where
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push_values(rows, |mut b, (doc, created, position)| {
        b.push_bind(doc.kind.as_str())
            .push_bind(doc.id.as_str())
            .push_bind(doc.owner_user_id.as_deref())
            .push_bind(doc.wallet_address.as_deref())
            .push_bind(doc.api_key_id.as_deref())
            .push_bind(doc.status.as_deref())
            .push_bind(*created)
            .push_bind(*position)
            .push_bind(doc.payload.as_str())
            .push_bind(doc.due_at.as_deref());
    });
}

/// Event payloads and metadata are stored as JSON text (`json` on Postgres, see migration 0008)
/// and bound as text with this cast, so the database only checks the text instead of building
/// a `jsonb` from it.
pub(crate) fn json_cast(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "::json",
        Backend::Sqlite => "",
    }
}

/// The payload of a checkpoint notification: the position reached and the node that got
/// there, so a hub can ignore its own node's (which reach it directly, see [`crate::push`]).
pub(crate) fn notification(position: i64, node: &str) -> String {
    format!("{position}@{node}")
}

pub struct Projector {
    db: Db,
    /// The writer's group commits so far: fast path, general path.
    batches: [std::sync::atomic::AtomicU64; 2],
    /// This process's id in checkpoint notifications.
    node: String,
    /// One catch-up at a time per process; other processes are held off by the row lock.
    running: Mutex<()>,
    applied: watch::Sender<i64>,
}

impl Projector {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            batches: Default::default(),
            node: uuid::Uuid::new_v4().simple().to_string(),
            running: Mutex::new(()),
            applied: watch::Sender::new(0),
        }
    }

    /// The pool catch-ups and rebuilds use.
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// Count one of the writer's group commits (`fast`: one statement).
    pub(crate) fn count_batch(&self, fast: bool) {
        self.batches[usize::from(!fast)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The writer's group commits so far: `(fast, general)`.
    pub fn batches(&self) -> (u64, u64) {
        let count = |i: usize| self.batches[i].load(std::sync::atomic::Ordering::Relaxed);
        (count(0), count(1))
    }

    /// This process's id in the checkpoint notifications it sends.
    pub fn node(&self) -> &str {
        &self.node
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
            self.advance(checkpoint);
            if applied < BATCH {
                return Ok(checkpoint);
            }
        }
    }

    /// Drop and rebuild views (all kinds, or one) from the event log in commit order: one
    /// transaction holding the checkpoint lock deletes the documents and folds the events again
    /// — all of them for a full rebuild (the checkpoint moves to the head), those up to the
    /// checkpoint for one view — then the usual catch-up continues. Idempotent. How it is made
    /// fast: [`crate::rebuild`].
    ///
    /// Safe while servers run: readers see the old documents until the rebuild commits
    /// (PostgreSQL; SQLite readers in WAL mode too), and every projector — this node's and
    /// others' — waits on the checkpoint lock meanwhile, so command responses wait too. On
    /// SQLite the rebuild holds the database write lock throughout: writers wait up to the
    /// busy timeout (10 s), so stop the server first for a large SQLite database.
    pub async fn rebuild(&self, only: Option<ViewKind>) -> Result<RebuildStats, ProjectorError> {
        self.rebuild_bounded(only, crate::rebuild::MAX_DOCUMENTS)
            .await
    }

    /// [`rebuild`](Self::rebuild) holding at most about `max_documents` documents in memory at
    /// once (the rest are written out early and read back when touched again).
    pub async fn rebuild_bounded(
        &self,
        only: Option<ViewKind>,
        max_documents: usize,
    ) -> Result<RebuildStats, ProjectorError> {
        use crate::rebuild::{fold_postgres, fold_sqlite, Folder, Sink};

        let started = std::time::Instant::now();
        let running = self.running.lock().await;
        let only_type = only.map(crate::rebuild::aggregate_type);
        let mut folder = Folder::new(only, max_documents);
        // Lock and find what to replay: the same on both backends.
        macro_rules! begin {
            ($tx:expr) => {{
                sqlx::query("UPDATE projection_checkpoints SET version = $2 WHERE name = $1")
                    .bind(CHECKPOINT)
                    .bind(new_version())
                    .execute(&mut *$tx)
                    .await?;
                let checkpoint: i64 = sqlx::query_scalar(
                    "SELECT position FROM projection_checkpoints WHERE name = $1",
                )
                .bind(CHECKPOINT)
                .fetch_one(&mut *$tx)
                .await?;
                // All views: replay the whole log and move the checkpoint to its head. One
                // view: replay up to the checkpoint the other views are at.
                let upto: i64 = match only {
                    Some(_) => checkpoint,
                    None => {
                        sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
                            .fetch_one(&mut *$tx)
                            .await?
                    }
                };
                (checkpoint, upto)
            }};
        }
        let position = match &self.db {
            Db::Postgres(pool) => {
                // Both connections are closed afterwards instead of going back to the pool:
                // after a failure either may be left in the middle of a `COPY`.
                let mut conn = pool.acquire().await?;
                let mut reader = pool.acquire().await?;
                conn.close_on_drop();
                reader.close_on_drop();
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let (checkpoint, upto) = begin!(tx);
                // Into a fresh table, indexed once it is full (far cheaper than keeping five
                // indexes up to date row by row), swapped in at the end.
                crate::rebuild::stage(&mut tx, only).await?;
                // The staging table has no statistics: keep lookups on its primary key.
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await?;
                // Every event up to `upto` is committed (positions are commit-ordered), so a
                // second connection sees them all; reading there overlaps with this one's
                // writes and keeps the stream off the locked transaction.
                let keyed =
                    fold_postgres(&mut reader, &mut tx, upto, only_type, &mut folder).await?;
                drop(reader);
                crate::rebuild::swap(&mut tx, keyed).await?;
                if upto > checkpoint {
                    sqlx::query(
                        "WITH advanced AS (UPDATE projection_checkpoints SET position = $1 \
                         WHERE name = $2) SELECT pg_notify($3, $4)",
                    )
                    .bind(upto)
                    .bind(CHECKPOINT)
                    .bind(crate::push::VIEWS_CHANNEL)
                    .bind(notification(upto, &self.node))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                upto
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                let (checkpoint, upto) = begin!(tx);
                sqlx::query("DELETE FROM views WHERE $1 IS NULL OR kind = $1")
                    .bind(only.map(|k| k.as_str()))
                    .execute(&mut *tx)
                    .await?;
                fold_sqlite(&mut tx, upto, only_type, &mut folder).await?;
                folder.finish(&mut Sink::Sqlite(&mut tx)).await?;
                if upto > checkpoint {
                    sqlx::query("UPDATE projection_checkpoints SET position = $1 WHERE name = $2")
                        .bind(upto)
                        .bind(CHECKPOINT)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                upto
            }
        };
        let (events, reloaded) = (folder.events, folder.reloaded);
        drop(running);
        let documents: i64 = with_pool!(&self.db, |pool| sqlx::query_scalar(
            "SELECT COUNT(*) FROM views WHERE $1 IS NULL OR kind = $1"
        )
        .bind(only.map(|k| k.as_str()))
        .fetch_one(pool)
        .await?);
        let elapsed = started.elapsed().as_secs_f64();
        self.catch_up().await?;
        Ok(RebuildStats {
            position,
            events,
            documents,
            reloaded,
            elapsed_seconds: elapsed,
        })
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
            // Taking the write lock first: a row lock on Postgres (without a new row version,
            // so a catch-up that finds nothing leaves the writer's fast path alone), the
            // database write lock on SQLite (so the transaction never has to upgrade from a
            // stale read snapshot).
            let lock = match backend {
                Backend::Postgres => {
                    "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE"
                }
                Backend::Sqlite => {
                    "UPDATE projection_checkpoints SET position = position WHERE name = $1 \
                     RETURNING position"
                }
            };
            let checkpoint: i64 = sqlx::query_scalar(lock)
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
            let events: Vec<StoredEvent> = rows.into_iter().map(StoredEvent::from).collect();
            fold_into_views!(&mut *tx, events);
            sqlx::query(
                "UPDATE projection_checkpoints SET position = $1, version = $3 WHERE name = $2",
            )
            .bind(last)
            .bind(CHECKPOINT)
            .bind(new_version())
            .execute(&mut *tx)
            .await?;
            if backend == Backend::Postgres {
                // Delivered at commit: wakes the push hub of every node.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(crate::push::VIEWS_CHANNEL)
                    .bind(notification(last, &self.node))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok((last, count))
        })
    }
}

/// The events of one command, to be appended atomically (see [`crate::writer`]).
pub(crate) struct Append {
    pub(crate) aggregate_type: &'static str,
    pub(crate) events: Vec<NewEvent>,
    /// Documents the command was decided on, which must not have changed since.
    pub(crate) unchanged: Vec<crate::writer::Unchanged>,
}

/// A command's new event as the writer stores it, its payload and metadata already JSON text
/// (encoded by the command's own task, not the writer's).
pub(crate) struct NewEvent {
    pub(crate) aggregate_id: String,
    pub(crate) sequence: i64,
    pub(crate) event_type: String,
    pub(crate) event_version: String,
    pub(crate) payload: String,
    pub(crate) metadata: String,
}

impl From<&cqrs_es::persist::SerializedEvent> for NewEvent {
    fn from(e: &cqrs_es::persist::SerializedEvent) -> Self {
        Self {
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence as i64,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            payload: e.payload.to_string(),
            metadata: e.metadata.to_string(),
        }
    }
}

impl NewEvent {
    /// The event as stored at `position`, decoded back into values (for the general path).
    fn stored(
        &self,
        aggregate_type: &str,
        position: i64,
        recorded_at: String,
    ) -> Result<StoredEvent, ProjectorError> {
        let decode =
            |text: &str| serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()));
        Ok(StoredEvent {
            position,
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            payload: decode(&self.payload)?,
            metadata: decode(&self.metadata)?,
            recorded_at,
        })
    }
}

impl Projector {
    /// Append the events of several commands in ONE transaction and fold them — after any
    /// events other writers committed since the checkpoint — into the views in the same
    /// transaction, advancing the checkpoint. Returns the checkpoint reached.
    ///
    /// The checkpoint row lock is taken first and held until commit, so appends that project
    /// are serialized with each other and with stand-alone catch-ups (same lock order
    /// everywhere: checkpoint row, then the position lock of the insert trigger). Positions are
    /// therefore commit-ordered, and every event below ours is committed and visible here.
    /// A duplicate `(aggregate, sequence)` (optimistic concurrency) aborts the whole
    /// transaction: the caller then retries the commands one by one.
    ///
    /// The caller publishes the result: to the push hub, then with [`Projector::advance`].
    pub(crate) async fn append(&self, db: &Db, batch: &[Append]) -> Result<Appended, sqlx::Error> {
        match self.append_inner(db, batch).await {
            Ok(appended) => Ok(appended),
            Err(ProjectorError::Store(StoreError::Database(e))) => Err(e),
            // Not a connection fault: a 500, not a "retry later" 503.
            Err(e) => Err(sqlx::Error::Decode(Box::new(e))),
        }
    }

    /// Publish a checkpoint committed by this process (wakes the local push hub and readers
    /// waiting for their views).
    pub(crate) fn advance(&self, position: i64) {
        self.applied.send_if_modified(|p| {
            let changed = *p < position;
            if changed {
                *p = position;
            }
            changed
        });
    }

    async fn append_inner(&self, db: &Db, batch: &[Append]) -> Result<Appended, ProjectorError> {
        let backend = db.backend();
        let select_gap = format!(
            "SELECT {} FROM events WHERE position > $1 AND position < $2 ORDER BY position",
            event_columns(backend)
        );
        let returning = match backend {
            Backend::Postgres => {
                " RETURNING position, \
                 to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            }
            Backend::Sqlite => " RETURNING position, recorded_at",
        };
        // The write lock first: the checkpoint row on PostgreSQL, without making a new version
        // of it (which would stop the writer's fast path if nothing is written after all); the
        // database write lock on SQLite.
        let lock = match backend {
            Backend::Postgres => {
                "SELECT position, version FROM projection_checkpoints WHERE name = $1 FOR UPDATE"
            }
            Backend::Sqlite => {
                "UPDATE projection_checkpoints SET position = position WHERE name = $1 \
                 RETURNING position, version"
            }
        };
        let json_cast = json_cast(backend);
        let checked = crate::writer::checked_documents(batch);
        with_pool!(&db, |pool| {
            let mut tx = pool.begin().await?;
            let (checkpoint, version_before): (i64, i64) = sqlx::query_as(lock)
                .bind(CHECKPOINT)
                .fetch_one(&mut *tx)
                .await?;
            // Events committed by writers that do not project (none in normal operation). On
            // SQLite, read them first: one writer, so the next positions are ours to assign.
            // On Postgres too when commands are to be checked against them: the position lock
            // of the insert trigger, taken first, waits for any such event in flight. Else the
            // trigger assigns positions; if ours do not follow the checkpoint directly, the gap
            // is read after the insert (below).
            let gap_first = backend == Backend::Sqlite || !checked.is_empty();
            if backend == Backend::Postgres && gap_first {
                sqlx::query("SELECT pg_advisory_xact_lock(7236481193)")
                    .execute(&mut *tx)
                    .await?;
            }
            let mut gap: Vec<EventRow> = if gap_first {
                sqlx::query_as(&select_gap)
                    .bind(checkpoint)
                    .bind(i64::MAX)
                    .fetch_all(&mut *tx)
                    .await?
            } else {
                Vec::new()
            };
            // Where each document commands were checked against is now: the views (current up
            // to the checkpoint), then the events above it.
            let mut found_at: HashMap<DocKey, i64> = HashMap::new();
            for chunk in checked.chunks(500) {
                let mut groups: Vec<(ViewKind, Vec<&str>)> = Vec::new();
                for (kind, id) in chunk {
                    match groups.iter_mut().find(|(k, _)| k == kind) {
                        Some((_, ids)) => ids.push(id.as_str()),
                        None => groups.push((*kind, vec![id.as_str()])),
                    }
                }
                let sizes: Vec<usize> = groups.iter().map(|(_, ids)| ids.len()).collect();
                let sql = document_positions_sql(&sizes);
                let mut q = sqlx::query_as(&sql);
                for (kind, ids) in &groups {
                    q = q.bind(kind.as_str());
                    for id in ids {
                        q = q.bind(*id);
                    }
                }
                let found: Vec<(String, String, i64)> = q.fetch_all(&mut *tx).await?;
                for (kind, id, position) in found {
                    if let Some(kind) = ViewKind::ALL.into_iter().find(|k| k.as_str() == kind) {
                        found_at.insert((kind, id), position);
                    }
                }
            }
            for row in &gap {
                if let Some(kind) = ViewKind::for_aggregate(&row.aggregate_type) {
                    if let Some(p) = found_at.get_mut(&(kind, row.aggregate_id.clone())) {
                        *p = row.position;
                    }
                }
            }
            let checked: Vec<(DocKey, Option<i64>)> = checked
                .into_iter()
                .map(|key| {
                    let position = found_at.get(&key).copied();
                    (key, position)
                })
                .collect();
            let admitted = crate::writer::admit(batch, |key| found_at.get(key).copied());
            let refused: Vec<usize> = (0..batch.len()).filter(|&i| !admitted[i]).collect();
            let rows: Vec<(&'static str, &NewEvent)> = batch
                .iter()
                .zip(&admitted)
                .filter(|(_, admitted)| **admitted)
                .flat_map(|(a, _)| a.events.iter().map(move |e| (a.aggregate_type, e)))
                .collect();
            let next = match backend {
                Backend::Sqlite => Some(gap.last().map_or(checkpoint, |r| r.position) + 1),
                Backend::Postgres => None,
            };
            let mut assigned: Vec<(i64, String)> = Vec::with_capacity(rows.len());
            for (chunk_index, chunk) in rows.chunks(APPEND_CHUNK).enumerate() {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                     event_version, payload, metadata, position) ",
                );
                q.push_values(chunk.iter().enumerate(), |mut b, (i, (ty, e))| {
                    b.push_bind(*ty)
                        .push_bind(e.aggregate_id.as_str())
                        .push_bind(e.sequence)
                        .push_bind(e.event_type.as_str())
                        .push_bind(e.event_version.as_str())
                        .push_bind(e.payload.as_str())
                        .push_unseparated(json_cast)
                        .push_bind(e.metadata.as_str())
                        .push_unseparated(json_cast)
                        .push_bind(next.map(|n| n + (chunk_index * APPEND_CHUNK + i) as i64));
                });
                q.push(returning);
                let mut got: Vec<(i64, String)> = q.build_query_as().fetch_all(&mut *tx).await?;
                got.sort_unstable_by_key(|(position, _)| *position);
                assigned.extend(got);
            }
            // RETURNING follows VALUES order on both backends, and positions are increasing
            // within the statement; sorting above makes the pairing independent of that.
            if let Some(&(first, _)) = assigned.first() {
                if !gap_first && first != checkpoint + 1 {
                    // Numbers drawn before ours by others were committed or rolled back
                    // before the trigger's lock let us draw: this read sees all of them.
                    gap = sqlx::query_as(&select_gap)
                        .bind(checkpoint)
                        .bind(first)
                        .fetch_all(&mut *tx)
                        .await?;
                }
            }
            let mut events: Vec<StoredEvent> = gap.into_iter().map(StoredEvent::from).collect();
            for ((ty, e), (position, recorded_at)) in rows.iter().zip(assigned) {
                events.push(e.stored(ty, position, recorded_at)?);
            }
            let Some(last) = events.last().map(|e| e.position) else {
                tx.rollback().await?;
                return Ok(Appended {
                    after: checkpoint,
                    upto: checkpoint,
                    events: Vec::new(),
                    refused,
                    version_before,
                    version: version_before,
                    checked,
                    written: Vec::new(),
                });
            };
            let mut pushed: Vec<PushRow> = events.iter().map(PushRow::unrouted).collect();
            let version = new_version();
            let advance_to = (backend == Backend::Postgres)
                .then(|| (last, version, notification(last, &self.node)));
            let (written, advanced) = fold_into_views!(&mut *tx, events, advance_to);
            route(&mut pushed, &written);
            // Unless done with the documents above: the checkpoint and (Postgres) the wake-up
            // of other nodes' hubs, delivered at commit, in one statement.
            let advance = match backend {
                Backend::Postgres => {
                    "WITH advanced AS (UPDATE projection_checkpoints SET position = $1, \
                     version = $5 WHERE name = $2) SELECT pg_notify($3, $4)"
                }
                Backend::Sqlite => {
                    "UPDATE projection_checkpoints SET position = $1, version = $5 \
                     WHERE name = $2 AND $3 IS NOT NULL AND $4 IS NOT NULL"
                }
            };
            if !advanced {
                sqlx::query(advance)
                    .bind(last)
                    .bind(CHECKPOINT)
                    .bind(crate::push::VIEWS_CHANNEL)
                    .bind(notification(last, &self.node))
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            stamp_committed(&mut pushed);
            Ok(Appended {
                after: checkpoint,
                upto: last,
                events: pushed,
                refused,
                version_before,
                version,
                checked,
                written: written_positions(&written),
            })
        })
    }

    /// The writer's fast path (PostgreSQL): send `draft` as one statement
    /// (`countersign_append`, migrations 0010 and 0011) that writes its events and documents,
    /// leaves the checkpoint at `version` and wakes the other nodes — if the checkpoint is
    /// still as `known` says: one round trip and one commit.
    ///
    /// [`Fast::Moved`] if the checkpoint is not as `known` says, and an error with code
    /// `CS001` if positions moved under it: then nothing was written.
    pub(crate) async fn send_draft(
        &self,
        pool: &sqlx::PgPool,
        known: Known,
        version: i64,
        draft: Draft,
    ) -> Result<Fast, sqlx::Error> {
        let Draft {
            after,
            events,
            docs,
            mut pushed,
            refused,
            written,
            ..
        } = draft;
        debug_assert_eq!(after, known.checkpoint);
        let upto = known.checkpoint + events.sequences.len() as i64;
        if upto > known.checkpoint {
            let (outcome, recorded): (String, Option<Vec<String>>) = sqlx::query_as(
                "SELECT outcome, recorded FROM countersign_append(\
                 $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
                 $19, $20, $21, $22)",
            )
            .bind(known.checkpoint)
            .bind(known.version)
            .bind(version)
            .bind(&events.aggregate_types)
            .bind(&events.aggregate_ids)
            .bind(&events.sequences)
            .bind(&events.event_types)
            .bind(&events.event_versions)
            .bind(&events.payloads)
            .bind(&events.metadata)
            .bind(&docs.kinds)
            .bind(&docs.ids)
            .bind(&docs.owners)
            .bind(&docs.wallets)
            .bind(&docs.api_keys)
            .bind(&docs.statuses)
            .bind(&docs.created)
            .bind(&docs.positions)
            .bind(&docs.documents)
            .bind(&docs.dues)
            .bind(crate::push::VIEWS_CHANNEL)
            .bind(notification(upto, &self.node))
            .fetch_one(pool)
            .await?;
            if outcome != "ok" {
                return Ok(Fast::Moved);
            }
            for (row, recorded_at) in pushed.iter_mut().zip(recorded.unwrap_or_default()) {
                row.recorded_at = recorded_at;
            }
            stamp_committed(&mut pushed);
        }
        let version = if upto > known.checkpoint {
            version
        } else {
            known.version
        };
        Ok(Fast::Committed(Appended {
            after: known.checkpoint,
            upto,
            events: pushed,
            refused,
            version_before: known.version,
            version,
            checked: Vec::new(),
            written,
        }))
    }
}

/// A fast-path batch being put together (see [`crate::writer`]): commands that only create
/// documents, each folded as it arrives with the positions its events get if the batch commits
/// right after position `after`. Owns everything the statement sends.
pub(crate) struct Draft {
    after: i64,
    events: EventColumns,
    docs: DocColumns,
    pushed: Vec<PushRow>,
    /// Commands of the batch not to be written (by their index in it).
    refused: Vec<usize>,
    /// Commands in it so far, written or refused.
    commands: usize,
    written: Vec<(DocKey, i64)>,
    upcasters: Vec<Box<dyn cqrs_es::persist::EventUpcaster>>,
}

impl Draft {
    pub(crate) fn new(after: i64) -> Self {
        Self {
            after,
            events: EventColumns::default(),
            docs: DocColumns::default(),
            pushed: Vec::new(),
            refused: Vec::new(),
            commands: 0,
            written: Vec::new(),
            upcasters: crate::upcast::upcasters(),
        }
    }

    /// The position the checkpoint moves to if the batch commits.
    pub(crate) fn upto(&self) -> i64 {
        self.after + self.events.sequences.len() as i64
    }

    /// Take in the next command: fold it if `admitted`, else count it as refused. The command
    /// must only create documents (`writer::creates_only`).
    pub(crate) fn add(&mut self, append: &Append, admitted: bool) -> Result<(), ProjectorError> {
        let index = self.commands;
        self.commands += 1;
        if !admitted {
            self.refused.push(index);
            return Ok(());
        }
        let kind = ViewKind::for_aggregate(append.aggregate_type);
        let mut docs: Vec<(String, Option<projections::ViewState>, i64, i64)> = Vec::new();
        let first = self.upto() + 1;
        for (i, e) in append.events.iter().enumerate() {
            let position = first + i as i64;
            if let Some(kind) = kind {
                let slot = match docs.iter().position(|(id, ..)| *id == e.aggregate_id) {
                    Some(slot) => slot,
                    None => {
                        docs.push((e.aggregate_id.clone(), None, position, position));
                        docs.len() - 1
                    }
                };
                let (_, state, _, last) = &mut docs[slot];
                let current = state.take();
                // Decoded straight from the text, unless an older shape is upcast first (as
                // everywhere else; this server writes the current shapes).
                *state = Some(
                    if self
                        .upcasters
                        .iter()
                        .any(|u| u.can_upcast(&e.event_type, &e.event_version))
                    {
                        let stored = e.stored(append.aggregate_type, position, String::new())?;
                        let stored = crate::upcast::upcast(stored, &self.upcasters);
                        projections::fold(kind, current, &stored)?
                    } else {
                        let head = projections::EventHead {
                            position,
                            event_type: &e.event_type,
                        };
                        projections::fold_text(kind, current, head, &e.payload)?
                    },
                );
                *last = position;
            }
        }
        let mut written = Vec::with_capacity(docs.len());
        for (id, state, created, position) in docs {
            if let (Some(kind), Some(state)) = (kind, state) {
                let doc = state
                    .to_doc_text(id)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                debug_assert_eq!(doc.kind, kind);
                written.push((doc, created, position));
            }
        }
        let mut pushed: Vec<PushRow> = append
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.events.push(append.aggregate_type, e);
                PushRow {
                    position: first + i as i64,
                    aggregate_type: append.aggregate_type.to_owned(),
                    aggregate_id: e.aggregate_id.clone(),
                    event_type: e.event_type.clone(),
                    payload: e.payload.clone(),
                    recorded_at: String::new(),
                    committed_at: None,
                    owner_user_id: None,
                    api_key_id: None,
                    wallet_address: None,
                }
            })
            .collect();
        route(&mut pushed, &written);
        self.pushed.extend(pushed);
        self.written.extend(written_positions(&written));
        self.docs.extend(written);
        Ok(())
    }
}

/// Stamp events with the moment their commit was acknowledged (see [`PushRow::committed_at`]).
fn stamp_committed(pushed: &mut [PushRow]) {
    let committed_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    for row in pushed {
        row.committed_at = Some(committed_at.clone());
    }
}

fn written_positions(written: &[WrittenDoc]) -> Vec<(DocKey, i64)> {
    written
        .iter()
        .map(|(doc, _, position)| ((doc.kind, doc.id.clone()), *position))
        .collect()
}

/// The event columns of a [`Draft`], one array each.
#[derive(Default)]
struct EventColumns {
    aggregate_types: Vec<String>,
    aggregate_ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    event_versions: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl EventColumns {
    fn push(&mut self, aggregate_type: &str, event: &NewEvent) {
        self.aggregate_types.push(aggregate_type.to_owned());
        self.aggregate_ids.push(event.aggregate_id.clone());
        self.sequences.push(event.sequence);
        self.event_types.push(event.event_type.clone());
        self.event_versions.push(event.event_version.clone());
        self.payloads.push(event.payload.clone());
        self.metadata.push(event.metadata.clone());
    }
}

/// The view columns of a [`Draft`], one array each, as [`VIEW_COLUMNS`].
#[derive(Default)]
struct DocColumns {
    kinds: Vec<&'static str>,
    ids: Vec<String>,
    owners: Vec<Option<String>>,
    wallets: Vec<Option<String>>,
    api_keys: Vec<Option<String>>,
    statuses: Vec<Option<String>>,
    created: Vec<i64>,
    positions: Vec<i64>,
    documents: Vec<String>,
    dues: Vec<Option<String>>,
}

impl DocColumns {
    fn extend(&mut self, written: Vec<WrittenDoc>) {
        for (doc, created, position) in written {
            self.kinds.push(doc.kind.as_str());
            self.ids.push(doc.id);
            self.owners.push(doc.owner_user_id);
            self.wallets.push(doc.wallet_address);
            self.api_keys.push(doc.api_key_id);
            self.statuses.push(doc.status);
            self.created.push(created);
            self.positions.push(position);
            self.documents.push(doc.payload);
            self.dues.push(doc.due_at);
        }
    }
}

/// The checkpoint row as the writer's commits leave it: its position and its version, a
/// random value every transaction that writes views sets anew (migration 0010).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Known {
    pub(crate) checkpoint: i64,
    pub(crate) version: i64,
}

/// A fresh checkpoint version (see [`Known`]).
pub(crate) fn new_version() -> i64 {
    rand::random()
}

/// How a fast-path append went (see [`Projector::send_draft`]).
pub(crate) enum Fast {
    Committed(Appended),
    Moved,
}

/// What one append committed: the events in `(after, upto]` — every event in that range, with
/// push routing — for the local hub, and what the writer keeps of it.
pub(crate) struct Appended {
    pub(crate) after: i64,
    pub(crate) upto: i64,
    pub(crate) events: Vec<PushRow>,
    /// Commands of the batch not written: a document they were checked against had changed.
    pub(crate) refused: Vec<usize>,
    /// The checkpoint row's version before and after.
    pub(crate) version_before: i64,
    pub(crate) version: i64,
    /// Documents commands were checked against and their positions under the lock (`None`:
    /// no such document), before this append's own events.
    pub(crate) checked: Vec<(DocKey, Option<i64>)>,
    /// Every document this append wrote, with its new position.
    pub(crate) written: Vec<(DocKey, i64)>,
}

/// Read queries over views and the event log.
impl Db {
    pub async fn view<T: DeserializeOwned>(
        &self,
        kind: ViewKind,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let payload: Option<String> = with_pool!(self, |pool| sqlx::query_scalar(
            "SELECT payload FROM views WHERE kind = $1 AND id = $2"
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(pool)
        .await?);
        payload.map(decode_view).transpose()
    }

    /// [`view`](Self::view) with the position of the last event folded into it: the
    /// document is current as of there (see `writer::Unchanged`).
    pub async fn view_at<T: DeserializeOwned>(
        &self,
        kind: ViewKind,
        id: &str,
    ) -> Result<Option<(T, i64)>, StoreError> {
        let row: Option<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(
            "SELECT payload, position FROM views WHERE kind = $1 AND id = $2"
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(pool)
        .await?);
        row.map(|(payload, position)| Ok((decode_view(payload)?, position)))
            .transpose()
    }

    /// [`api_key_view_by_hash`](Self::api_key_view_by_hash) with the view's position, as
    /// [`view_at`](Self::view_at).
    pub async fn api_key_view_by_hash_at<T: DeserializeOwned>(
        &self,
        key_hash: &str,
    ) -> Result<Option<(T, i64)>, StoreError> {
        let row: Option<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(
            "SELECT v.payload, v.position FROM api_key_credentials c \
             JOIN views v ON v.kind = 'api_key' AND v.id = c.api_key_id WHERE c.key_hash = $1"
        )
        .bind(key_hash)
        .fetch_optional(pool)
        .await?);
        row.map(|(payload, position)| Ok((decode_view(payload)?, position)))
            .transpose()
    }

    /// The view of the API key whose credential hash is `key_hash`.
    pub async fn api_key_view_by_hash<T: DeserializeOwned>(
        &self,
        key_hash: &str,
    ) -> Result<Option<T>, StoreError> {
        Ok(self
            .api_key_view_by_hash_at(key_hash)
            .await?
            .map(|(view, _)| view))
    }

    /// [`api_key_view_by_hash`](Self::api_key_view_by_hash) and, in the same round trip, the
    /// `kind` view `id` (if it exists). For reads an agent makes often (`transaction_status`).
    pub async fn api_key_view_by_hash_and_view<K: DeserializeOwned, T: DeserializeOwned>(
        &self,
        key_hash: &str,
        kind: ViewKind,
        id: &str,
    ) -> Result<Option<(K, Option<T>)>, StoreError> {
        let row: Option<(String, Option<String>)> = with_pool!(self, |pool| sqlx::query_as(
            "SELECT k.payload, t.payload FROM api_key_credentials c \
             JOIN views k ON k.kind = 'api_key' AND k.id = c.api_key_id \
             LEFT JOIN views t ON t.kind = $2 AND t.id = $3 \
             WHERE c.key_hash = $1"
        )
        .bind(key_hash)
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(pool)
        .await?);
        row.map(|(key, view)| Ok((decode_view(key)?, view.map(decode_view).transpose()?)))
            .transpose()
    }

    /// Views of one kind selected by a column (`owner_user_id` or `api_key_id`), newest first,
    /// optionally filtered by status.
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
        let rows: Vec<String> = with_pool!(self, |pool| sqlx::query_scalar(&sql)
            .bind(kind.as_str())
            .bind(value)
            .bind(status)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(decode_view).collect()
    }

    /// Pending transactions whose deadline (RFC 3339, as stored) sorts at or before `cutoff`,
    /// soonest first. Text order is time order only to the second (fractions vary in length),
    /// so callers pass a cutoff a second late and compare the exact times themselves.
    pub async fn transactions_due<T: DeserializeOwned>(
        &self,
        cutoff: &str,
        limit: i64,
    ) -> Result<Vec<T>, StoreError> {
        // The deadline column is written with the document (`ViewDoc::due_at`); its partial
        // index serves this query alone.
        let sql = "SELECT payload FROM views WHERE due_at IS NOT NULL AND due_at <= $1 \
                   ORDER BY due_at LIMIT $2";
        let rows: Vec<String> = with_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(cutoff)
            .bind(limit)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(decode_view).collect()
    }

    /// Executed transactions (sent, receipt not yet recorded), oldest first: what the receipt
    /// worker watches. Through the partial index `views_executed_idx` ([`EXECUTED_TRANSACTIONS`]).
    pub async fn executed_transactions<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let rows: Vec<String> = with_pool!(self, |pool| sqlx::query_scalar(EXECUTED_TRANSACTIONS)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(decode_view).collect()
    }

    /// A wallet's executed transactions, newest first: the nonces it has in flight. Through
    /// `views_executed_idx` as well ([`EXECUTED_TRANSACTIONS_OF`]).
    pub async fn executed_transactions_of<T: DeserializeOwned>(
        &self,
        wallet_address: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rows: Vec<String> =
            with_pool!(self, |pool| sqlx::query_scalar(EXECUTED_TRANSACTIONS_OF)
                .bind(wallet_address)
                .fetch_all(pool)
                .await?);
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

/// Where documents stand: their kinds, ids and positions, for groups of ids of one kind each,
/// `sizes[g]` ids in group `g`, bound as the group's kind then its ids (`$1` the first kind,
/// `$2`… its ids, then the next kind…). Each group names its kind, so that both databases find
/// every document through the primary key: SQLite's leads with `kind`, and `id IN (…)` alone
/// read every document there, in every batch of the writer (public for the test that checks
/// the plans).
pub fn document_positions_sql(sizes: &[usize]) -> String {
    let mut next = 0;
    let mut param = || {
        next += 1;
        format!("${next}")
    };
    let groups: Vec<String> = sizes
        .iter()
        .map(|&n| {
            let kind = param();
            let ids: Vec<String> = (0..n).map(|_| param()).collect();
            format!("(kind = {kind} AND id IN ({}))", ids.join(", "))
        })
        .collect();
    format!(
        "SELECT kind, id, position FROM views WHERE {}",
        groups.join(" OR ")
    )
}

/// The documents of executed transactions, oldest first ([`Db::executed_transactions`]). The
/// predicate is spelled out, not bound, so that both databases can use the partial index
/// `views_executed_idx`, which holds these documents alone (public for the test that checks
/// the plans).
pub const EXECUTED_TRANSACTIONS: &str = "SELECT payload FROM views \
     WHERE kind = 'transaction' AND status = 'executed' ORDER BY position LIMIT 10000";

/// One wallet's executed transactions, newest first ([`Db::executed_transactions_of`]).
pub const EXECUTED_TRANSACTIONS_OF: &str = "SELECT payload FROM views \
     WHERE kind = 'transaction' AND status = 'executed' AND wallet_address = $1 \
     ORDER BY created_position DESC LIMIT 1000";

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

fn decode_view<T: DeserializeOwned>(payload: String) -> Result<T, StoreError> {
    serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(e.to_string()))
}
