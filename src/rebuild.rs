//! `countersign projections rebuild`: drop view documents and fold the event log into them
//! again, in commit order.
//!
//! A rebuild holds the projector's checkpoint lock (so it is exact, and every node's commands
//! wait for it), which makes its speed matter. It therefore does not go through the catch-up
//! path's per-batch loads and writes:
//! - events stream in commit order: on PostgreSQL through `COPY … TO STDOUT (FORMAT binary)` on
//!   a second connection (every event up to the head read under the lock is committed, so any
//!   later snapshot sees them all), on SQLite in pages inside the rebuild's transaction;
//! - each payload is decoded from its stored JSON text straight into its typed event (no
//!   intermediate `Value`; older shapes are upcast first, as everywhere else) and folded into
//!   its document where it lies in memory (no move of the document per event);
//! - documents are folded in memory and written once, in bulk. On PostgreSQL a `COPY … FROM
//!   STDIN (FORMAT binary)` into an unindexed staging table stays open while events stream in:
//!   a document goes into it as soon as it settles (a transaction in a terminal status), so the
//!   database stores documents while this process is still folding, instead of after. An event
//!   for a document already sent (which settled documents should never get) is held back and
//!   folded into it once that `COPY` is closed.
//!
//! Memory is bounded by `max_documents`: past it, the least recently touched half is written
//! out, and read back if a later event touches one of them (on PostgreSQL, events held back
//! count towards it too: past it the open `COPY` is closed and the rest folds as on SQLite).
//!
//! Nothing here decides what a view contains: that is the `projections` crate's fold.

use std::collections::{HashMap, HashSet};

use bytes::{Buf, Bytes};
use cqrs_es::persist::EventUpcaster;
use futures::StreamExt;
use projections::{EventHead, StoredEvent, ViewDoc, ViewKind, ViewState};
use serde_json::Value;
use sqlx::{PgConnection, SqliteConnection};

use crate::projector::{push_view_rows, ProjectorError, VIEWS_ON_CONFLICT, VIEW_COLUMNS};
use crate::store::StoreError;

/// Documents held in memory before the least recently touched are written out (a transaction
/// view takes about 1–2 KiB decoded).
pub(crate) const MAX_DOCUMENTS: usize = 500_000;
/// Events per read on SQLite.
const SQLITE_PAGE: i64 = 10_000;
/// Rows per multi-row statement when writing documents back with INSERT (9 binds each).
const UPSERT_CHUNK: usize = 500;
/// Bytes per `COPY` message when writing documents.
const COPY_CHUNK: usize = 1 << 20;

/// One event as read for a rebuild: borrowed from the bytes it arrived in.
pub(crate) struct RawEvent<'a> {
    pub(crate) position: i64,
    pub(crate) aggregate_type: &'a str,
    pub(crate) aggregate_id: &'a str,
    pub(crate) sequence: i64,
    pub(crate) event_type: &'a str,
    pub(crate) event_version: &'a str,
    pub(crate) payload: &'a str,
}

impl RawEvent<'_> {
    /// Where the event is in the log and its type, as folds and their errors name it.
    fn head(&self) -> EventHead<'_> {
        EventHead {
            position: self.position,
            event_type: self.event_type,
        }
    }
}

/// The columns of an event read for a rebuild, in this order, on both backends.
pub(crate) const COLUMNS: &str =
    "position, aggregate_type, aggregate_id, sequence, event_type, event_version, payload";

/// The aggregate type whose events feed `kind` (the inverse of [`ViewKind::for_aggregate`]).
pub(crate) fn aggregate_type(kind: ViewKind) -> &'static str {
    match kind {
        ViewKind::Transaction => "Transaction",
        ViewKind::Wallet => "Wallet",
        ViewKind::ApiKey => "ApiKey",
        ViewKind::User => "User",
    }
}

fn slot(kind: ViewKind) -> usize {
    match kind {
        ViewKind::Transaction => 0,
        ViewKind::Wallet => 1,
        ViewKind::ApiKey => 2,
        ViewKind::User => 3,
    }
}

/// Maps keyed by aggregate id. foldhash (seeded per process) rather than SipHash: hashing ids
/// and growing these maps was a tenth of the fold's time.
type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;
type Set = HashSet<String, foldhash::fast::RandomState>;

/// A document being rebuilt.
struct Held {
    state: ViewState,
    /// Position of the event that created it.
    created: i64,
    /// Position of the last event folded in.
    position: i64,
    /// When it was last touched (events folded so far), to pick what to write out first.
    touched: u64,
    /// Already written once during this rebuild (so written again with an upsert).
    stored: bool,
}

/// Where the rebuilt documents go: the rebuild's own transaction. On PostgreSQL that is a
/// staging table ([`STAGING`]) without indexes, indexed once at the end; `keyed` is set once
/// it has its primary key (needed as soon as documents are written out early, to read them
/// back and update them).
pub(crate) enum Sink<'c> {
    Postgres {
        conn: &'c mut PgConnection,
        keyed: bool,
    },
    Sqlite(&'c mut SqliteConnection),
}

/// The table a PostgreSQL rebuild fills before it replaces `views`.
const STAGING: &str = "views_rebuilt";

/// Folds events into documents held in memory; see the module documentation.
pub(crate) struct Folder {
    only: Option<ViewKind>,
    max_documents: usize,
    /// Boxed: the maps grow and are drained by moving entries, which should be pointers.
    docs: [Map<Box<Held>>; 4],
    /// Documents written out to bound memory: only these can exist in the table (it was
    /// emptied), so only these are ever looked up.
    written_out: [Set; 4],
    held: usize,
    pub(crate) events: i64,
    /// Documents read back after being written out early.
    pub(crate) reloaded: i64,
    upcasters: Vec<Box<dyn EventUpcaster>>,
    /// PostgreSQL, while the staging table's `COPY` is open: documents to send into it, and
    /// events for documents already sent (folded once the `COPY` is closed).
    outgoing: Vec<(String, Box<Held>)>,
    late: Vec<OwnedEvent>,
}

/// An event held back, owned.
struct OwnedEvent {
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
}

impl OwnedEvent {
    fn of(e: &RawEvent<'_>) -> Self {
        Self {
            position: e.position,
            aggregate_type: e.aggregate_type.to_owned(),
            aggregate_id: e.aggregate_id.to_owned(),
            sequence: e.sequence,
            event_type: e.event_type.to_owned(),
            event_version: e.event_version.to_owned(),
            payload: e.payload.to_owned(),
        }
    }

    fn raw(&self) -> RawEvent<'_> {
        RawEvent {
            position: self.position,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence: self.sequence,
            event_type: &self.event_type,
            event_version: &self.event_version,
            payload: &self.payload,
        }
    }
}

impl Folder {
    pub(crate) fn new(only: Option<ViewKind>, max_documents: usize) -> Self {
        Self {
            only,
            max_documents: max_documents.max(1),
            docs: Default::default(),
            written_out: Default::default(),
            held: 0,
            events: 0,
            reloaded: 0,
            upcasters: crate::upcast::upcasters(),
            outgoing: Vec::new(),
            late: Vec::new(),
        }
    }

    /// The kind of view `event` feeds in this rebuild, if any.
    fn kind_of(&self, event: &RawEvent<'_>) -> Option<ViewKind> {
        ViewKind::for_aggregate(event.aggregate_type).filter(|k| self.only.is_none_or(|o| o == *k))
    }

    /// Fold one event (events must arrive in position order).
    pub(crate) async fn fold(
        &mut self,
        event: RawEvent<'_>,
        sink: &mut Sink<'_>,
    ) -> Result<(), ProjectorError> {
        self.events += 1;
        self.fold_counted(event, sink).await
    }

    async fn fold_counted(
        &mut self,
        event: RawEvent<'_>,
        sink: &mut Sink<'_>,
    ) -> Result<(), ProjectorError> {
        let Some(kind) = self.kind_of(&event) else {
            return Ok(());
        };
        let touched = self.events as u64;
        if let Some(held) = self.docs[slot(kind)].get_mut(event.aggregate_id) {
            update(&self.upcasters, held, &event, touched)?;
            return Ok(());
        }
        self.held += 1;
        let id = event.aggregate_id.to_owned();
        let loaded = if self.written_out[slot(kind)].contains(&id) {
            self.reloaded += 1;
            sink.load(kind, &id, event.head()).await?
        } else {
            None
        };
        let held = match loaded {
            Some(mut held) => {
                update(&self.upcasters, &mut held, &event, touched)?;
                held
            }
            None => create(&self.upcasters, kind, &event, touched)?,
        };
        self.docs[slot(kind)].insert(id, held);
        if self.held > self.max_documents {
            sink.keyed().await?;
            let leaving = self.take_out(true);
            sink.write(leaving).await?;
        }
        Ok(())
    }

    /// [`fold`](Self::fold) while the staging table's `COPY` is open (nothing can be read
    /// back): documents to send go to `outgoing`, events for documents already sent to `late`.
    /// Returns whether `late` has outgrown the memory bound.
    fn fold_streaming(&mut self, event: RawEvent<'_>) -> Result<bool, ProjectorError> {
        self.events += 1;
        let Some(kind) = self.kind_of(&event) else {
            return Ok(false);
        };
        let touched = self.events as u64;
        let map = &mut self.docs[slot(kind)];
        if let Some(held) = map.get_mut(event.aggregate_id) {
            let settled = update(&self.upcasters, held, &event, touched)?;
            if let Some((id, held)) = settled
                .then(|| map.remove_entry(event.aggregate_id))
                .flatten()
            {
                self.held -= 1;
                self.written_out[slot(kind)].insert(id.clone());
                self.outgoing.push((id, held));
            }
        } else if self.written_out[slot(kind)].contains(event.aggregate_id) {
            self.late.push(OwnedEvent::of(&event));
            return Ok(self.late.len() > self.max_documents);
        } else {
            let held = create(&self.upcasters, kind, &event, touched)?;
            let id = event.aggregate_id.to_owned();
            if held.state.settled() {
                self.written_out[slot(kind)].insert(id.clone());
                self.outgoing.push((id, held));
            } else {
                self.held += 1;
                self.docs[slot(kind)].insert(id, held);
            }
        }
        if self.held > self.max_documents {
            // Nothing was read back while the `COPY` is open, so every document is new to
            // the table and can go into it.
            let leaving = self.take_out(true);
            self.outgoing.extend(leaving);
        }
        Ok(false)
    }

    /// Take documents out of memory: the least recently touched half (`partial`, remembered
    /// as written out), or all.
    fn take_out(&mut self, partial: bool) -> Vec<(String, Box<Held>)> {
        let cutoff = if partial {
            let mut touched: Vec<u64> = self
                .docs
                .iter()
                .flat_map(|m| m.values().map(|h| h.touched))
                .collect();
            let middle = touched.len() / 2;
            *touched.select_nth_unstable(middle).1
        } else {
            u64::MAX
        };
        let mut out = Vec::new();
        for kind in ViewKind::ALL {
            let map = &mut self.docs[slot(kind)];
            let (leaving, keep): (Vec<_>, Vec<_>) =
                map.drain().partition(|(_, h)| h.touched < cutoff);
            map.extend(keep);
            if partial {
                self.written_out[slot(kind)].extend(leaving.iter().map(|(id, _)| id.clone()));
            }
            out.extend(leaving);
        }
        self.held -= out.len();
        out
    }

    /// Fold the events held back while the `COPY` was open, then write every document still
    /// held.
    pub(crate) async fn finish(&mut self, sink: &mut Sink<'_>) -> Result<(), ProjectorError> {
        self.fold_late(sink).await?;
        let all = self.take_out(false);
        sink.write(all).await
    }

    /// Fold the events held back (their documents are read back from the table).
    async fn fold_late(&mut self, sink: &mut Sink<'_>) -> Result<(), ProjectorError> {
        if self.late.is_empty() {
            return Ok(());
        }
        sink.keyed().await?;
        for event in std::mem::take(&mut self.late) {
            self.fold_counted(event.raw(), sink).await?;
        }
        Ok(())
    }
}

/// Whether `event` is of an older shape that must be upcast before it is folded.
fn needs_upcast(upcasters: &[Box<dyn EventUpcaster>], event: &RawEvent<'_>) -> bool {
    upcasters
        .iter()
        .any(|u| u.can_upcast(event.event_type, event.event_version))
}

/// Fold `event` into the document `held`, in place. Returns whether it has settled (a
/// document read back from the table never counts: it cannot be sent with `COPY` again).
fn update(
    upcasters: &[Box<dyn EventUpcaster>],
    held: &mut Held,
    event: &RawEvent<'_>,
    touched: u64,
) -> Result<bool, ProjectorError> {
    if needs_upcast(upcasters, event) {
        let stored = crate::upcast::upcast(stored_event(event)?, upcasters);
        held.state.update_stored(&stored)?;
    } else {
        held.state.update_text(event.head(), event.payload)?;
    }
    held.position = event.position;
    held.touched = touched;
    Ok(!held.stored && held.state.settled())
}

/// The document of `kind` that `event` starts.
fn create(
    upcasters: &[Box<dyn EventUpcaster>],
    kind: ViewKind,
    event: &RawEvent<'_>,
    touched: u64,
) -> Result<Box<Held>, ProjectorError> {
    let state = if needs_upcast(upcasters, event) {
        let stored = crate::upcast::upcast(stored_event(event)?, upcasters);
        projections::fold(kind, None, &stored)?
    } else {
        projections::fold_text(kind, None, event.head(), event.payload)?
    };
    Ok(Box::new(Held {
        state,
        created: event.position,
        position: event.position,
        touched,
        stored: false,
    }))
}

/// A rebuilt document with its creating and last positions.
type Row = (ViewDoc<String>, i64, i64);

fn row((id, held): (String, Box<Held>)) -> Result<Row, ProjectorError> {
    let doc = held.state.to_doc_text(id).map_err(encode_error)?;
    Ok((doc, held.created, held.position))
}

fn encode_error(e: serde_json::Error) -> ProjectorError {
    StoreError::Corrupt(e.to_string()).into()
}

impl Sink<'_> {
    fn table(&self) -> &'static str {
        match self {
            Self::Postgres { .. } => STAGING,
            Self::Sqlite(_) => "views",
        }
    }

    /// Give the staging table its primary key now rather than at the end.
    async fn keyed(&mut self) -> Result<(), ProjectorError> {
        if let Self::Postgres { conn, keyed } = self {
            if !*keyed {
                index_like_views(conn, true).await?;
                *keyed = true;
            }
        }
        Ok(())
    }

    /// A document this rebuild wrote out earlier, decoded, with its creating position.
    async fn load(
        &mut self,
        kind: ViewKind,
        id: &str,
        head: EventHead<'_>,
    ) -> Result<Option<Box<Held>>, ProjectorError> {
        let sql = format!(
            "SELECT payload, created_position FROM {} WHERE kind = $1 AND id = $2",
            self.table()
        );
        let found: Option<(String, i64)> = match self {
            Self::Postgres { conn: c, .. } => {
                sqlx::query_as(&sql)
                    .bind(kind.as_str())
                    .bind(id)
                    .fetch_optional(&mut **c)
                    .await?
            }
            Self::Sqlite(c) => {
                sqlx::query_as(&sql)
                    .bind(kind.as_str())
                    .bind(id)
                    .fetch_optional(&mut **c)
                    .await?
            }
        };
        let Some((payload, created)) = found else {
            return Ok(None);
        };
        Ok(Some(Box::new(Held {
            state: ViewState::decode(kind, &payload, head)?,
            created,
            position: 0,
            touched: 0,
            stored: true,
        })))
    }

    /// Write documents: those new to the table in bulk, those read back from it over their
    /// rows.
    async fn write(&mut self, docs: Vec<(String, Box<Held>)>) -> Result<(), ProjectorError> {
        let (again, fresh): (Vec<_>, Vec<_>) = docs.into_iter().partition(|(_, h)| h.stored);
        let again: Vec<Row> = again.into_iter().map(row).collect::<Result<_, _>>()?;
        match self {
            Self::Postgres { conn, .. } => copy_in(conn, fresh).await?,
            Self::Sqlite(_) => {
                let rows: Vec<Row> = fresh.into_iter().map(row).collect::<Result<_, _>>()?;
                self.upsert(&rows).await?
            }
        }
        self.upsert(&again).await
    }

    /// Documents that may be in the table.
    async fn upsert(&mut self, rows: &[Row]) -> Result<(), ProjectorError> {
        let insert = format!("INSERT INTO {} ({VIEW_COLUMNS}) ", self.table());
        for chunk in rows.chunks(UPSERT_CHUNK) {
            macro_rules! run {
                ($conn:expr) => {{
                    let mut q = sqlx::QueryBuilder::new(&insert);
                    push_view_rows(&mut q, chunk);
                    q.push(VIEWS_ON_CONFLICT);
                    q.build().execute(&mut **$conn).await?;
                }};
            }
            match self {
                Self::Postgres { conn: c, .. } => run!(c),
                Self::Sqlite(c) => run!(c),
            }
        }
        Ok(())
    }
}

/// PostgreSQL: create the empty staging table, shaped as `views` (columns, defaults, generated
/// columns, constraints) but without its indexes, holding the other kinds' documents when only
/// one kind is rebuilt. Inside the rebuild's transaction: nobody else ever sees it.
pub(crate) async fn stage(
    conn: &mut PgConnection,
    only: Option<ViewKind>,
) -> Result<(), ProjectorError> {
    sqlx::query(&format!("DROP TABLE IF EXISTS {STAGING}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE {STAGING} (LIKE views INCLUDING ALL EXCLUDING INDEXES)"
    ))
    .execute(&mut *conn)
    .await?;
    if let Some(kind) = only {
        sqlx::query(&format!(
            "INSERT INTO {STAGING} ({VIEW_COLUMNS}) SELECT {VIEW_COLUMNS} FROM views WHERE kind <> $1"
        ))
        .bind(kind.as_str())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// PostgreSQL: index the filled staging table exactly as `views` is indexed (read from the
/// catalog, so whatever the migrations define), then put it in the place of `views`. Readers
/// see the old table until the rebuild commits; the swap itself waits only for reads in flight.
pub(crate) async fn swap(conn: &mut PgConnection, keyed: bool) -> Result<(), ProjectorError> {
    if !keyed {
        index_like_views(conn, true).await?;
    }
    let names = index_like_views(conn, false).await?;
    for sql in [
        "DROP TABLE views".to_owned(),
        format!("ALTER TABLE {STAGING} RENAME TO views"),
    ] {
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    for (name, primary) in names {
        // Renaming a primary key's constraint renames its index with it.
        let sql = if primary {
            format!("ALTER TABLE views RENAME CONSTRAINT \"{name}_rebuilt\" TO \"{name}\"")
        } else {
            format!("ALTER INDEX \"{name}_rebuilt\" RENAME TO \"{name}\"")
        };
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    // Fresh statistics, or the planner may not use the new indexes: of the columns queries
    // filter on, that is all but the documents (sampling those is most of the work).
    let columns: String = sqlx::query_scalar(
        "SELECT string_agg(quote_ident(attname), ', ') FROM pg_attribute \
         WHERE attrelid = 'views'::regclass AND attnum > 0 AND NOT attisdropped \
         AND attname <> 'payload'",
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(&format!("ANALYZE views ({columns})"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Create on the staging table the primary key of `views` (`primary`) or all its other
/// indexes, under their names suffixed `_rebuilt`. Returns every index name of `views` with
/// whether it is the primary key.
async fn index_like_views(
    conn: &mut PgConnection,
    primary: bool,
) -> Result<Vec<(String, bool)>, ProjectorError> {
    let indexes: Vec<(String, bool, bool, String)> = sqlx::query_as(
        "SELECT c.relname::text, x.indisunique, x.indisprimary, pg_get_indexdef(x.indexrelid) \
         FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
         WHERE x.indrelid = 'views'::regclass ORDER BY c.relname",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (name, unique, is_primary, definition) in &indexes {
        if *is_primary != primary {
            continue;
        }
        // `CREATE [UNIQUE] INDEX name ON table USING method (columns) [WHERE …]`: keep the part
        // from the method on.
        let (_, using) = definition
            .split_once(" USING ")
            .ok_or_else(|| corrupt(&format!("unexpected index definition: {definition}")))?;
        let unique = if *unique { "UNIQUE " } else { "" };
        sqlx::query(&format!(
            "CREATE {unique}INDEX \"{name}_rebuilt\" ON {STAGING} USING {using}"
        ))
        .execute(&mut *conn)
        .await?;
        if *is_primary {
            sqlx::query(&format!(
                "ALTER TABLE {STAGING} ADD CONSTRAINT \"{name}_rebuilt\" \
                 PRIMARY KEY USING INDEX \"{name}_rebuilt\""
            ))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(indexes
        .into_iter()
        .map(|(name, _, primary, _)| (name, primary))
        .collect())
}

/// The statement that writes documents into the staging table. `FREEZE` (the table is this
/// transaction's own) spares every later reader setting hint bits on each fresh row, and
/// vacuum a pass over them.
fn copy_in_statement() -> String {
    format!("COPY {STAGING} ({VIEW_COLUMNS}) FROM STDIN (FORMAT binary, FREEZE)")
}

/// Chunk buffers the database connection is done with, for the encoder to fill again: a
/// fresh megabyte per chunk made the allocator consolidate its free lists every time.
#[derive(Default)]
struct Spare(std::sync::Mutex<Vec<Vec<u8>>>);

impl Spare {
    fn take(&self) -> Vec<u8> {
        let spare = self.0.lock().ok().and_then(|mut s| s.pop());
        spare.unwrap_or_else(|| Vec::with_capacity(COPY_CHUNK + (64 << 10)))
    }

    fn give(&self, mut chunk: Vec<u8>) {
        chunk.clear();
        if let Ok(mut spare) = self.0.lock() {
            spare.push(chunk);
        }
    }
}

/// Documents encoded for `COPY … (FORMAT binary)`, in chunks of about [`COPY_CHUNK`].
struct CopyRows<'s> {
    buf: Vec<u8>,
    spare: &'s Spare,
}

impl<'s> CopyRows<'s> {
    fn new(spare: &'s Spare) -> Self {
        let mut buf = spare.take();
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self { buf, spare }
    }

    fn push(&mut self, (id, held): (String, Box<Held>)) -> Result<(), ProjectorError> {
        let doc = held.state.columns(id);
        let buf = &mut self.buf;
        buf.extend_from_slice(&10i16.to_be_bytes());
        for text in [
            Some(doc.kind.as_str()),
            Some(doc.id.as_str()),
            doc.owner_user_id.as_deref(),
            doc.wallet_address.as_deref(),
            doc.api_key_id.as_deref(),
            doc.status.as_deref(),
        ] {
            push_text(buf, text)?;
        }
        for n in [held.created, held.position] {
            buf.extend_from_slice(&8i32.to_be_bytes());
            buf.extend_from_slice(&n.to_be_bytes());
        }
        // The JSON is written in place after its length field, filled in once it is known,
        // so the row is not copied afterwards.
        let length_at = buf.len();
        buf.extend_from_slice(&0i32.to_be_bytes());
        held.state.write_json(buf).map_err(encode_error)?;
        let length = field_len(buf.len() - length_at - 4)?;
        buf[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
        push_text(buf, doc.due_at.as_deref())
    }

    /// The bytes encoded so far, once they make a chunk.
    fn full_chunk(&mut self) -> Option<Vec<u8>> {
        (self.buf.len() >= COPY_CHUNK).then(|| std::mem::replace(&mut self.buf, self.spare.take()))
    }

    /// The rest, with the trailer.
    fn end(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Write documents with one `COPY`, each encoded into the buffer being sent, so the database
/// stores one chunk while the next is made.
async fn copy_in(
    conn: &mut PgConnection,
    docs: Vec<(String, Box<Held>)>,
) -> Result<(), ProjectorError> {
    if docs.is_empty() {
        return Ok(());
    }
    let mut copy = conn.copy_in_raw(&copy_in_statement()).await?;
    let spare = Spare::default();
    let mut rows = CopyRows::new(&spare);
    for doc in docs {
        if let Err(e) = rows.push(doc) {
            copy.abort("a document could not be encoded").await?;
            return Err(e);
        }
        if let Some(chunk) = rows.full_chunk() {
            copy.send(&chunk[..]).await?;
            spare.give(chunk);
        }
    }
    copy.send(rows.end()).await?;
    copy.finish().await?;
    Ok(())
}

/// One nullable text field of a binary `COPY` row.
fn push_text(buf: &mut Vec<u8>, text: Option<&str>) -> Result<(), ProjectorError> {
    match text {
        Some(t) => {
            buf.extend_from_slice(&field_len(t.len())?.to_be_bytes());
            buf.extend_from_slice(t.as_bytes());
        }
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    Ok(())
}

fn field_len(len: usize) -> Result<i32, ProjectorError> {
    i32::try_from(len).map_err(|_| StoreError::Corrupt("a view document over 2 GiB".into()).into())
}

/// The event as the general (`Value`) path takes it, for upcasting.
fn stored_event(e: &RawEvent<'_>) -> Result<StoredEvent, ProjectorError> {
    let payload =
        serde_json::from_str(e.payload).map_err(|source| projections::ProjectionError::Decode {
            position: e.position,
            event_type: e.event_type.to_owned(),
            source,
        })?;
    Ok(StoredEvent {
        position: e.position,
        aggregate_type: e.aggregate_type.to_owned(),
        aggregate_id: e.aggregate_id.to_owned(),
        sequence: e.sequence,
        event_type: e.event_type.to_owned(),
        event_version: e.event_version.to_owned(),
        payload,
        // Views never read the metadata; the rebuild does not fetch it.
        metadata: Value::Null,
        recorded_at: String::new(),
    })
}

/// A chunk for the staging table's open `COPY`.
enum Chunk {
    Data(Vec<u8>),
    /// Everything was sent: the `COPY` may be finished (without it, it is aborted).
    End(Vec<u8>),
}

/// Fold the events in `(0, upto]` (of one aggregate type, if given), streamed from `reader`
/// in position order with `COPY … TO STDOUT (FORMAT binary)`, into the staging table that
/// `tx` created: see the module documentation. Returns whether the staging table already has
/// its primary key.
pub(crate) async fn fold_postgres(
    reader: &mut PgConnection,
    tx: &mut PgConnection,
    upto: i64,
    only: Option<&'static str>,
    folder: &mut Folder,
) -> Result<bool, ProjectorError> {
    // COPY takes no parameters: both values are ours (an integer, a fixed type name).
    let filter = only
        .map(|t| format!(" AND aggregate_type = '{t}'"))
        .unwrap_or_default();
    let sql = format!(
        "COPY (SELECT position, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload::text FROM events WHERE position <= {upto}{filter} \
         ORDER BY position) TO STDOUT (FORMAT binary)"
    );
    let mut stream = reader.copy_out_raw(&sql).await?;
    let mut events = CopyReader::default();

    // While the staging table's COPY is open, two futures run together on this task: `fold`
    // reads, folds and encodes; `write` feeds the chunks to the database on the other
    // connection as they come.
    let (send, receive) = tokio::sync::mpsc::channel::<Chunk>(2);
    let spare = Spare::default();
    let write = async {
        // Each future owns its end of the channel, so that whichever stops first (done or
        // failed) closes it and the other one stops too, instead of waiting forever.
        let mut receive = receive;
        let mut copy = tx.copy_in_raw(&copy_in_statement()).await?;
        while let Some(chunk) = receive.recv().await {
            match chunk {
                Chunk::Data(bytes) => {
                    copy.send(&bytes[..]).await?;
                    spare.give(bytes);
                }
                Chunk::End(bytes) => {
                    copy.send(bytes).await?;
                    copy.finish().await?;
                    return Ok(());
                }
            }
        }
        // The fold failed (its error is the one reported).
        copy.abort("the rebuild failed").await?;
        Ok::<(), ProjectorError>(())
    };
    let fold = async {
        let send = send;
        let mut rows = CopyRows::new(&spare);
        let mut overflow = false;
        'stream: while let Some(chunk) = stream.next().await {
            events.push(chunk?);
            while let Some(row) = events.next_row()? {
                overflow = folder.fold_streaming(row.event()?)?;
                for doc in folder.outgoing.drain(..) {
                    rows.push(doc)?;
                    if let Some(chunk) = rows.full_chunk() {
                        send.send(Chunk::Data(chunk))
                            .await
                            .map_err(|_| corrupt("the staging table's COPY stopped"))?;
                    }
                }
                if overflow {
                    break 'stream;
                }
            }
        }
        send.send(Chunk::End(rows.end()))
            .await
            .map_err(|_| corrupt("the staging table's COPY stopped"))?;
        Ok::<bool, ProjectorError>(overflow)
    };
    let (written, folded) = futures::join!(write, fold);
    // The database's refusal explains the fold's "stopped", not the other way round.
    written?;
    let overflow = folded?;

    // The COPY is closed: documents can be read back from here on.
    let mut sink = Sink::Postgres {
        conn: tx,
        keyed: false,
    };
    if overflow {
        folder.fold_late(&mut sink).await?;
        loop {
            while let Some(row) = events.next_row()? {
                folder.fold(row.event()?, &mut sink).await?;
            }
            match stream.next().await {
                Some(chunk) => events.push(chunk?),
                None => break,
            }
        }
    }
    if !events.finished {
        return Err(corrupt("the event stream ended early"));
    }
    folder.finish(&mut sink).await?;
    let Sink::Postgres { keyed, .. } = sink else {
        unreachable!("built above")
    };
    Ok(keyed)
}

/// Page through the events in `(0, upto]` (of one aggregate type, if given) on SQLite.
pub(crate) async fn fold_sqlite(
    conn: &mut SqliteConnection,
    upto: i64,
    only: Option<&'static str>,
    folder: &mut Folder,
) -> Result<(), ProjectorError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE position > $1 AND position <= $2 \
         AND ($3 IS NULL OR aggregate_type = $3) ORDER BY position LIMIT $4"
    );
    type Owned = (i64, String, String, i64, String, String, String);
    let mut after = 0i64;
    loop {
        let rows: Vec<Owned> = sqlx::query_as(&sql)
            .bind(after)
            .bind(upto)
            .bind(only)
            .bind(SQLITE_PAGE)
            .fetch_all(&mut *conn)
            .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok(());
        };
        for r in &rows {
            let event = RawEvent {
                position: r.0,
                aggregate_type: &r.1,
                aggregate_id: &r.2,
                sequence: r.3,
                event_type: &r.4,
                event_version: &r.5,
                payload: &r.6,
            };
            folder.fold(event, &mut Sink::Sqlite(&mut *conn)).await?;
        }
        after = last;
    }
}

fn corrupt(what: &str) -> ProjectorError {
    StoreError::Corrupt(format!("rebuild: {what}")).into()
}

/// Parses PostgreSQL's binary `COPY` format, whatever the chunking of the stream.
#[derive(Default)]
struct CopyReader {
    /// Bytes received and not yet parsed.
    buffer: Vec<Bytes>,
    header_read: bool,
    finished: bool,
}

/// One tuple's fields, as ranges of the chunk they arrived in.
struct CopyRow {
    data: Bytes,
    fields: [(usize, usize); 7],
}

impl CopyRow {
    fn text(&self, i: usize) -> Result<&str, ProjectorError> {
        let (start, len) = self.fields[i];
        std::str::from_utf8(&self.data[start..start + len]).map_err(|_| corrupt("text not UTF-8"))
    }

    fn int8(&self, i: usize) -> Result<i64, ProjectorError> {
        let (start, len) = self.fields[i];
        let bytes: [u8; 8] = self.data[start..start + len]
            .try_into()
            .map_err(|_| corrupt("an integer not 8 bytes long"))?;
        Ok(i64::from_be_bytes(bytes))
    }

    fn event(&self) -> Result<RawEvent<'_>, ProjectorError> {
        Ok(RawEvent {
            position: self.int8(0)?,
            aggregate_type: self.text(1)?,
            aggregate_id: self.text(2)?,
            sequence: self.int8(3)?,
            event_type: self.text(4)?,
            event_version: self.text(5)?,
            payload: self.text(6)?,
        })
    }
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyReader {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffer.push(chunk);
        }
    }

    /// The next complete tuple, if one has arrived.
    fn next_row(&mut self) -> Result<Option<CopyRow>, ProjectorError> {
        if self.finished || self.buffer.is_empty() {
            return Ok(None);
        }
        // PostgreSQL sends a tuple per message; join chunks only when one was split.
        if self.buffer.len() > 1 {
            let joined: Vec<u8> = self.buffer.iter().flat_map(|b| b.iter().copied()).collect();
            self.buffer = vec![Bytes::from(joined)];
        }
        let data = self.buffer[0].clone();
        let mut at = 0usize;
        if !self.header_read {
            let fixed = SIGNATURE.len() + 8;
            if data.len() < fixed {
                return Ok(None);
            }
            if &data[..SIGNATURE.len()] != SIGNATURE {
                return Err(corrupt("not a binary COPY stream"));
            }
            let mut rest = &data[SIGNATURE.len() + 4..fixed];
            let extension = usize::try_from(rest.get_i32()).map_err(|_| corrupt("bad header"))?;
            if data.len() < fixed + extension {
                return Ok(None);
            }
            at = fixed + extension;
            self.header_read = true;
        }
        let start = at;
        let Some(count) = read_i16(&data, at) else {
            self.consume(data, start);
            return Ok(None);
        };
        at += 2;
        if count == -1 {
            self.finished = true;
            self.buffer.clear();
            return Ok(None);
        }
        if count != 7 {
            return Err(corrupt("unexpected column count"));
        }
        let mut fields = [(0usize, 0usize); 7];
        for field in &mut fields {
            let Some(len) = read_i32(&data, at) else {
                self.consume(data, start);
                return Ok(None);
            };
            let len = usize::try_from(len).map_err(|_| corrupt("a NULL column"))?;
            at += 4;
            if data.len() < at + len {
                self.consume(data, start);
                return Ok(None);
            }
            *field = (at, len);
            at += len;
        }
        self.consume(data.clone(), at);
        Ok(Some(CopyRow { data, fields }))
    }

    /// Keep what follows `at` of `data` (the whole buffer) for the next call: the rest, or a
    /// tuple that is not complete yet, from its beginning.
    fn consume(&mut self, data: Bytes, at: usize) {
        self.buffer.clear();
        if at < data.len() {
            self.buffer.push(data.slice(at..));
        }
    }
}

fn read_i16(data: &[u8], at: usize) -> Option<i16> {
    data.get(at..at + 2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
}

fn read_i32(data: &[u8], at: usize) -> Option<i32> {
    data.get(at..at + 4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(fields: &[&[u8]]) -> Vec<u8> {
        let mut out = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            out.extend_from_slice(&(f.len() as i32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    fn stream() -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for position in [1i64, 2] {
            out.extend(tuple(&[
                &position.to_be_bytes(),
                b"Transaction",
                b"t1",
                &position.to_be_bytes(),
                b"TransactionPrepared",
                b"1.0",
                br#"{"a":1}"#,
            ]));
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn positions(chunks: Vec<Bytes>) -> (Vec<i64>, bool) {
        let mut reader = CopyReader::default();
        let mut seen = Vec::new();
        for chunk in chunks {
            reader.push(chunk);
            while let Some(row) = reader.next_row().unwrap() {
                let e = row.event().unwrap();
                assert_eq!((e.aggregate_id, e.payload), ("t1", r#"{"a":1}"#));
                seen.push(e.position);
            }
        }
        (seen, reader.finished)
    }

    #[test]
    fn copy_rows_parse_whatever_the_chunking() {
        let all = stream();
        assert_eq!(
            positions(vec![Bytes::from(all.clone())]),
            (vec![1, 2], true)
        );
        // Every split point, and byte by byte.
        for split in 1..all.len() {
            let chunks = vec![
                Bytes::copy_from_slice(&all[..split]),
                Bytes::copy_from_slice(&all[split..]),
            ];
            assert_eq!(positions(chunks), (vec![1, 2], true), "split at {split}");
        }
        let bytes = all.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        assert_eq!(positions(bytes), (vec![1, 2], true));
    }

    #[test]
    fn a_cut_stream_is_not_finished() {
        let all = stream();
        let (seen, finished) = positions(vec![Bytes::copy_from_slice(&all[..all.len() - 2])]);
        assert_eq!(seen, vec![1, 2]);
        assert!(!finished);
    }
}
