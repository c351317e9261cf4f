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
//!   intermediate `Value`; older shapes are upcast first, as everywhere else);
//! - documents are folded in memory and written once, at the end, in bulk (PostgreSQL: `COPY …
//!   FROM STDIN (FORMAT binary)`).
//!
//! Memory is bounded by `max_documents`: past it, the least recently touched half is written
//! out, and read back if a later event touches one of them.
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
    docs: [HashMap<String, Held>; 4],
    /// Documents written out to bound memory: only these can exist in the table (it was
    /// emptied), so only these are ever looked up.
    written_out: [HashSet<String>; 4],
    held: usize,
    pub(crate) events: i64,
    /// Documents read back after being written out early.
    pub(crate) reloaded: i64,
    upcasters: Vec<Box<dyn EventUpcaster>>,
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
        }
    }

    /// Fold one event (events must arrive in position order).
    pub(crate) async fn fold(
        &mut self,
        event: RawEvent<'_>,
        sink: &mut Sink<'_>,
    ) -> Result<(), ProjectorError> {
        self.events += 1;
        let Some(kind) = ViewKind::for_aggregate(event.aggregate_type) else {
            return Ok(());
        };
        if self.only.is_some_and(|k| k != kind) {
            return Ok(());
        }
        let head = EventHead {
            position: event.position,
            event_type: event.event_type,
        };
        let map = &mut self.docs[slot(kind)];
        let (id, held) = match map.remove_entry(event.aggregate_id) {
            Some((id, held)) => (id, Some(held)),
            None => {
                self.held += 1;
                let id = event.aggregate_id.to_owned();
                let held = if self.written_out[slot(kind)].contains(&id) {
                    self.reloaded += 1;
                    sink.load(kind, &id, head).await?
                } else {
                    None
                };
                (id, held)
            }
        };
        let (current, created, stored) = match held {
            Some(h) => (Some(h.state), h.created, h.stored),
            None => (None, event.position, false),
        };
        let state = if self
            .upcasters
            .iter()
            .any(|u| u.can_upcast(event.event_type, event.event_version))
        {
            let stored_event = crate::upcast::upcast(stored_event(&event)?, &self.upcasters);
            projections::fold(kind, current, &stored_event)?
        } else {
            projections::fold_text(kind, current, head, event.payload)?
        };
        self.docs[slot(kind)].insert(
            id,
            Held {
                state,
                created,
                position: event.position,
                touched: self.events as u64,
                stored,
            },
        );
        if self.held > self.max_documents {
            sink.keyed().await?;
            self.write_out(sink, true).await?;
        }
        Ok(())
    }

    /// Write documents back: the least recently touched half (`partial`), or all.
    async fn write_out(
        &mut self,
        sink: &mut Sink<'_>,
        partial: bool,
    ) -> Result<(), ProjectorError> {
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
        let (again, fresh): (Vec<_>, Vec<_>) = out.into_iter().partition(|(_, h)| h.stored);
        fn row((id, held): (String, Held)) -> Result<Row, ProjectorError> {
            let doc = held
                .state
                .to_doc_text(id)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((doc, held.created, held.position))
        }
        let again: Vec<Row> = again.into_iter().map(row).collect::<Result<_, _>>()?;
        // Encoded as they are sent, so the database stores one chunk while the next is made.
        sink.insert(fresh.into_iter().map(row)).await?;
        sink.upsert(&again).await?;
        Ok(())
    }

    /// Write every document still held.
    pub(crate) async fn finish(&mut self, sink: &mut Sink<'_>) -> Result<(), ProjectorError> {
        self.write_out(sink, false).await
    }
}

/// A rebuilt document with its creating and last positions.
type Row = (ViewDoc<String>, i64, i64);

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
    ) -> Result<Option<Held>, ProjectorError> {
        let sql = format!(
            "SELECT payload, created_position FROM {} WHERE kind = $1 AND id = $2",
            self.table()
        );
        let found: Option<(Value, i64)> = match self {
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
        Ok(Some(Held {
            state: ViewState::decode(kind, &payload, head)?,
            created,
            position: 0,
            touched: 0,
            stored: true,
        }))
    }

    /// Documents that are not in the table yet.
    async fn insert(
        &mut self,
        rows: impl ExactSizeIterator<Item = Result<Row, ProjectorError>>,
    ) -> Result<(), ProjectorError> {
        match self {
            Self::Postgres { conn, .. } => copy_in(conn, rows).await,
            Self::Sqlite(_) => {
                let rows: Vec<Row> = rows.collect::<Result<_, _>>()?;
                self.upsert(&rows).await
            }
        }
    }

    /// Documents that may be in the table.
    async fn upsert(&mut self, rows: &[Row]) -> Result<(), ProjectorError> {
        let insert = format!("INSERT INTO {} ({VIEW_COLUMNS}) ", self.table());
        for chunk in rows.chunks(UPSERT_CHUNK) {
            macro_rules! run {
                ($conn:expr, $cast:expr) => {{
                    let mut q = sqlx::QueryBuilder::new(&insert);
                    push_view_rows(&mut q, chunk, $cast);
                    q.push(VIEWS_ON_CONFLICT);
                    q.build().execute(&mut **$conn).await?;
                }};
            }
            match self {
                Self::Postgres { conn: c, .. } => run!(c, "::json"),
                Self::Sqlite(c) => run!(c, ""),
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
    // Fresh statistics, or the planner may not use the new indexes.
    sqlx::query("ANALYZE views").execute(&mut *conn).await?;
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

/// Write documents with `COPY … FROM STDIN (FORMAT binary)`.
async fn copy_in(
    conn: &mut PgConnection,
    rows: impl ExactSizeIterator<Item = Result<Row, ProjectorError>>,
) -> Result<(), ProjectorError> {
    if rows.len() == 0 {
        return Ok(());
    }
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {STAGING} ({VIEW_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let mut buf = Vec::with_capacity(COPY_CHUNK + 4096);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for row in rows {
        let (doc, created, position) = match row {
            Ok(row) => row,
            Err(e) => {
                copy.abort("a document could not be encoded").await?;
                return Err(e);
            }
        };
        buf.extend_from_slice(&9i16.to_be_bytes());
        for text in [
            Some(doc.kind.as_str()),
            Some(doc.id.as_str()),
            doc.owner_user_id.as_deref(),
            doc.wallet_address.as_deref(),
            doc.api_key_id.as_deref(),
            doc.status.as_deref(),
        ] {
            match text {
                Some(t) => {
                    buf.extend_from_slice(&field_len(t.len())?.to_be_bytes());
                    buf.extend_from_slice(t.as_bytes());
                }
                None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        for n in [created, position] {
            buf.extend_from_slice(&8i32.to_be_bytes());
            buf.extend_from_slice(&n.to_be_bytes());
        }
        // json's binary form is its text.
        buf.extend_from_slice(&field_len(doc.payload.len())?.to_be_bytes());
        buf.extend_from_slice(doc.payload.as_bytes());
        if buf.len() >= COPY_CHUNK {
            copy.send(buf.as_slice()).await?;
            buf.clear();
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(buf).await?;
    copy.finish().await?;
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

/// Stream the events in `(0, upto]` (of one aggregate type, if given) from `conn` in position
/// order into `folder`, with `COPY … TO STDOUT (FORMAT binary)`.
pub(crate) async fn fold_postgres(
    conn: &mut PgConnection,
    upto: i64,
    only: Option<&'static str>,
    folder: &mut Folder,
    sink: &mut Sink<'_>,
) -> Result<(), ProjectorError> {
    // COPY takes no parameters: both values are ours (an integer, a fixed type name).
    let filter = only
        .map(|t| format!(" AND aggregate_type = '{t}'"))
        .unwrap_or_default();
    let sql = format!(
        "COPY (SELECT position, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload::text FROM events WHERE position <= {upto}{filter} \
         ORDER BY position) TO STDOUT (FORMAT binary)"
    );
    let mut stream = conn.copy_out_raw(&sql).await?;
    let mut reader = CopyReader::default();
    while let Some(chunk) = stream.next().await {
        reader.push(chunk?);
        while let Some(row) = reader.next_row()? {
            folder.fold(row.event()?, sink).await?;
        }
    }
    if !reader.finished {
        return Err(corrupt("the event stream ended early"));
    }
    Ok(())
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
