//! The write path: group commit.
//!
//! cqrs-es loads an aggregate, decides, and hands the new events to its repository's `persist`.
//! Here `persist` does not open a transaction of its own: it queues the events for one writer
//! task, which appends everything queued meanwhile — the events of many commands — in a single
//! transaction that also folds them into the views and advances the projection checkpoint (see
//! [`Projector::append`]). Under load a commit, its fsync and its round trips are shared by all
//! the commands in it; when idle, a command is committed at once (the queue holds just it).
//!
//! On PostgreSQL a batch whose commands only create documents (prepares, registrations, new
//! keys) takes the fast path: the writer predicts the events' positions from the checkpoint its
//! own last commit left, folds the documents itself, and sends everything as one statement
//! that writes only if the prediction holds ([`Projector::send_draft`]). While that batch is at
//! the database, the commands arriving meanwhile are folded into the next one, sent the moment
//! the first lands. Anything else — a command that updates a document, another node's or
//! process's commit in between — takes the general path, and the fast one resumes after it.
//!
//! A command may name documents it was decided on ([`Unchanged`], e.g. the API key and wallet
//! behind a prepare, read from the node's cache): it commits only if none of them changed
//! after the position it read them at, checked under the commit's lock, and is refused with
//! [`DocumentChanged`] otherwise. So a decision taken on a cached copy is as good as one taken
//! on the database at the moment of commit.
//!
//! Guarantees kept: optimistic concurrency (a second command on the same aggregate version in
//! one batch is refused before the write; a duplicate from another node aborts the batch, which
//! is then retried command by command, so only the stale command fails), commit-ordered
//! positions, and views that contain a command's events when its response is sent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use projections::ViewKind;

use crate::projector::{Append, Appended, DocKey, Draft, Fast, Known, NewEvent, Projector};
use crate::push::Hub;
use crate::store::{Db, EventRepository};

/// Most events in one transaction: bounds the transaction's size and a batch's latency.
const MAX_BATCH_EVENTS: usize = 2_000;
/// Commands waiting for the writer; senders wait when it is full (backpressure).
const QUEUE: usize = 4_096;
/// The writer's own pool: it uses one connection at a time.
const WRITER_CONNECTIONS: u32 = 1;
/// A batch that failed to reach the database after this long means an outage, not a blip.
const OUTAGE: Duration = Duration::from_secs(1);

struct Request {
    append: Append,
    reply: Reply,
}

/// The handle commands append through. Cheap to clone; the writer task stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Writer {
    sender: mpsc::Sender<Request>,
}

impl Writer {
    /// Start the writer. Commits are routed straight to `hub`'s sockets when there is one.
    ///
    /// The writer is the one serialized step of every command, so the latency of its round
    /// trips bounds throughput. It runs on a thread and runtime of its own, with its own
    /// connections: its database replies wake it directly instead of queueing it behind the
    /// request handlers on the shared workers (which cost ~0.3 ms per round trip under load).
    pub fn spawn(projector: Arc<Projector>, hub: Option<Arc<Hub>>) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("countersign-writer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let db = projector.db().dedicated(WRITER_CONNECTIONS);
                    run(&projector, &db, hub, receiver).await;
                    db.close().await;
                });
            })?;
        Ok(Self { sender })
    }

    /// Append one command's events, if the documents it was decided on are `unchanged`;
    /// resolves once they are committed and projected.
    pub async fn append(
        &self,
        aggregate_type: &'static str,
        events: &[SerializedEvent],
        unchanged: Vec<Unchanged>,
    ) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.iter().map(NewEvent::from).collect();
        let (reply, answer) = oneshot::channel();
        let request = Request {
            append: Append {
                aggregate_type,
                events,
                unchanged,
            },
            reply,
        };
        let stopped = || PersistenceError::UnknownError("the event writer has stopped".into());
        self.sender.send(request).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A fast batch at the database, and where it leaves the checkpoint if it commits.
struct AtDatabase<'a> {
    landing: std::pin::Pin<Box<dyn std::future::Future<Output = Landed> + Send + 'a>>,
    end: Known,
}

/// A fast batch back from the database.
struct Landed {
    batch: Batch,
    /// How long it was at the database.
    took: Duration,
    result: Result<Fast, sqlx::Error>,
}

/// The next fast batch, folded while the one before it is at the database.
struct Next {
    batch: Batch,
    draft: Draft,
    /// The checkpoint version it leaves.
    version: i64,
}

/// The commands of one group commit.
struct Batch {
    appends: Vec<Append>,
    replies: Vec<Reply>,
}

impl Batch {
    fn events(&self) -> usize {
        self.appends.iter().map(|a| a.events.len()).sum()
    }

    fn append(&mut self, mut other: Batch) {
        self.appends.append(&mut other.appends);
        self.replies.append(&mut other.replies);
    }
}

/// The writer's loop. On PostgreSQL, while a fast batch is at the database, the commands that
/// arrive are folded into the next one, which is sent the moment the first lands: the fold
/// happens off the critical path, and the answers to the batch that landed go out while the
/// next one is at the database.
async fn run(
    projector: &Projector,
    db: &Db,
    hub: Option<Arc<Hub>>,
    mut receiver: mpsc::Receiver<Request>,
) {
    let hub = hub.as_deref();
    let mut state = WriterState::default();
    let mut at_database: Option<AtDatabase<'_>> = None;
    let mut next: Option<Next> = None;
    // Commands that arrived while a fast batch was at the database and that the fast path
    // cannot take: they go once the database is done with it (and with the next one).
    let mut held: Option<Batch> = None;
    let mut open = true;
    loop {
        let Some(sending) = at_database.as_mut() else {
            let batch = match held.take() {
                Some(batch) => batch,
                None => match receiver.recv().await {
                    Some(first) => collect(first, &mut receiver),
                    None => break,
                },
            };
            match state.fast_draft(db, batch) {
                Ok((pool, known, batch, draft)) => {
                    let version = crate::projector::new_version();
                    at_database = Some(send(projector, pool, known, version, batch, draft));
                }
                Err(batch) => {
                    let outcome = general(projector, db, hub, &mut state, batch).await;
                    drain_after_outage(&mut receiver, &mut held, outcome);
                }
            }
            continue;
        };
        let room = next.as_ref().map_or(0, |n| n.batch.events()) < MAX_BATCH_EVENTS;
        tokio::select! {
            biased;
            landed = &mut sending.landing => {
                let end = sending.end;
                at_database = None;
                // (`held` and `next` are never both there: see `fold_next`.)
                if let Some(Next { batch, draft, version }) = next.take() {
                    match (&landed.result, postgres(db)) {
                        (Ok(Fast::Committed(_)), Some(pool)) => {
                            at_database = Some(send(projector, pool, end, version, batch, draft));
                        }
                        // Planned on a checkpoint that did not come to be: the general path,
                        // after the batch that landed.
                        _ => held = Some(batch),
                    }
                }
                let outcome = land(projector, db, hub, &mut state, landed).await;
                drain_after_outage(&mut receiver, &mut held, outcome);
            }
            first = receiver.recv(), if open && held.is_none() && room => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let batch = collect(first, &mut receiver);
                if let Err(batch) = state.fold_next(sending.end, &mut next, batch) {
                    held = Some(batch);
                }
            }
        }
    }
}

/// Send a fast batch to the database.
fn send<'a>(
    projector: &'a Projector,
    pool: &'a sqlx::PgPool,
    known: Known,
    version: i64,
    batch: Batch,
    draft: Draft,
) -> AtDatabase<'a> {
    let end = Known {
        checkpoint: draft.upto(),
        version: if draft.upto() > known.checkpoint {
            version
        } else {
            known.version
        },
    };
    let landing = Box::pin(async move {
        let started = Instant::now();
        let result = projector.send_draft(pool, known, version, draft).await;
        Landed {
            batch,
            took: started.elapsed(),
            result,
        }
    });
    AtDatabase { landing, end }
}

/// The commands queued now, from `first` on (up to [`MAX_BATCH_EVENTS`]), less those that lost
/// a race within the batch: two commands that read the same version of one aggregate — the
/// later one is refused as it would have been by the database, without costing the batch.
fn collect(first: Request, receiver: &mut mpsc::Receiver<Request>) -> Batch {
    let mut events = first.append.events.len();
    let mut requests = vec![first];
    while events < MAX_BATCH_EVENTS {
        match receiver.try_recv() {
            Ok(next) => {
                events += next.append.events.len();
                requests.push(next);
            }
            Err(_) => break,
        }
    }
    let mut claimed = HashSet::new();
    let mut batch = Batch {
        appends: Vec::with_capacity(requests.len()),
        replies: Vec::with_capacity(requests.len()),
    };
    for request in requests {
        let fresh = request.append.events.iter().all(|e| {
            claimed.insert((
                request.append.aggregate_type,
                e.aggregate_id.clone(),
                e.sequence,
            ))
        });
        if fresh {
            batch.appends.push(request.append);
            batch.replies.push(request.reply);
        } else {
            let _ = request
                .reply
                .send(Err(PersistenceError::OptimisticLockError));
        }
    }
    batch
}

/// Commands that queued while a batch could not reach the database (up to the pool's acquire
/// timeout: sqlx retries refused connections until then) — in the channel, or taken from it
/// and `held` — would each wait out another timeout behind the next batch. They fail now,
/// unwritten, as a 503. (A connection that broke at once is a blip: the next batch
/// reconnects.)
fn drain_after_outage(
    receiver: &mut mpsc::Receiver<Request>,
    held: &mut Option<Batch>,
    outcome: Result<(), Outage>,
) {
    if let Err(Outage { why, waited }) = outcome {
        if waited > OUTAGE {
            let error = || PersistenceError::ConnectionError(why.clone().into());
            for reply in held.take().into_iter().flat_map(|batch| batch.replies) {
                let _ = reply.send(Err(error()));
            }
            while let Ok(request) = receiver.try_recv() {
                let _ = request.reply.send(Err(error()));
            }
        }
    }
}

/// The database could not be reached: why, and how long the batch waited to find out.
struct Outage {
    why: String,
    waited: Duration,
}

/// A view document a command was decided on, and the position it was read at: the command
/// commits only if no event after that position changed the document (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unchanged {
    pub kind: ViewKind,
    pub id: String,
    /// The document as read reflected every event up to here.
    pub as_of: i64,
}

/// Why a command was not written: a document it was decided on changed before it could commit.
/// Deciding again on the current documents may succeed.
#[derive(Debug, thiserror::Error)]
#[error("a document the command was decided on changed before it committed")]
pub struct DocumentChanged;

/// The documents `batch`'s commands were decided on, each once.
pub(crate) fn checked_documents(batch: &[Append]) -> Vec<DocKey> {
    let mut seen = HashSet::new();
    batch
        .iter()
        .flat_map(|a| &a.unchanged)
        .map(|u| (u.kind, u.id.clone()))
        .filter(|key| seen.insert(key.clone()))
        .collect()
}

/// Which commands of `batch` may commit: those whose documents are at or before the positions
/// they were read at — `position_of` gives where each is before the batch (`None`: there is no
/// such document) — and were not changed by a command admitted before them in the batch
/// (positions only grow, so such a change is always after the read).
pub(crate) fn admit(batch: &[Append], position_of: impl Fn(&DocKey) -> Option<i64>) -> Vec<bool> {
    let mut changed: HashSet<DocKey> = HashSet::new();
    batch
        .iter()
        .map(|append| {
            let holds = append.unchanged.iter().all(|u| {
                let key = (u.kind, u.id.clone());
                !changed.contains(&key) && position_of(&key).is_some_and(|p| p <= u.as_of)
            });
            if holds {
                if let Some(kind) = ViewKind::for_aggregate(append.aggregate_type) {
                    changed.extend(append.events.iter().map(|e| (kind, e.aggregate_id.clone())));
                }
            }
            holds
        })
        .collect()
}

/// Most document positions the writer remembers; past this it forgets them all (the next
/// batch that needs them reads them again).
const MAX_POSITIONS: usize = 100_000;
/// Most batches the fast path is skipped for after it found the checkpoint moved (another
/// node writing); the pause doubles up to this while that goes on.
const MAX_FAST_PAUSE: u32 = 64;

/// A fast batch ready to go: the pool, the checkpoint it was planned on, its commands, folded.
type FastStart<'a> = (&'a sqlx::PgPool, Known, Batch, Draft);

fn postgres(db: &Db) -> Option<&sqlx::PgPool> {
    match db {
        Db::Postgres(pool) => Some(pool),
        Db::Sqlite(_) => None,
    }
}

/// What the writer knows between batches.
#[derive(Default)]
struct WriterState {
    /// The checkpoint row as this writer's last commit left it, while nothing is known to have
    /// changed views behind its back.
    known: Option<Known>,
    /// Positions of documents commands were decided on, exact as of `known`.
    positions: HashMap<DocKey, i64>,
    /// Batches still to send down the general path before trying the fast one again.
    pause: u32,
    next_pause: u32,
}

impl WriterState {
    /// Whether the fast path may take `batch` (see [`Self::fold`]) right after the writer's
    /// last commit, and the batch folded for it; else the batch back.
    fn fast_draft<'a>(&mut self, db: &'a Db, batch: Batch) -> Result<FastStart<'a>, Batch> {
        let Some(pool) = postgres(db) else {
            return Err(batch);
        };
        if self.pause > 0 {
            self.pause -= 1;
            return Err(batch);
        }
        let Some(known) = self.known else {
            return Err(batch);
        };
        let mut draft = Draft::new(known.checkpoint);
        match self.fold(&mut draft, &batch) {
            Ok(()) => Ok((pool, known, batch, draft)),
            Err(()) => Err(batch),
        }
    }

    /// Fold `batch` into the next fast batch, the one to follow a batch that leaves the
    /// checkpoint at `end`. If the fast path cannot take it, the next batch is given up: all
    /// its commands and `batch`'s come back, to go the general way in that order.
    fn fold_next(&self, end: Known, next: &mut Option<Next>, batch: Batch) -> Result<(), Batch> {
        let mut building = next.take().unwrap_or_else(|| Next {
            batch: Batch {
                appends: Vec::new(),
                replies: Vec::new(),
            },
            draft: Draft::new(end.checkpoint),
            version: crate::projector::new_version(),
        });
        match self.fold(&mut building.draft, &batch) {
            Ok(()) => {
                building.batch.append(batch);
                *next = Some(building);
                Ok(())
            }
            Err(()) => {
                let mut all = building.batch;
                all.append(batch);
                Err(all)
            }
        }
    }

    /// Fold the commands of `batch` into `draft`, if the fast path may take them all: each
    /// only creates documents (so none need reading), and every document it was decided on is
    /// remembered (so it can be checked here, exactly as of the checkpoint).
    fn fold(&self, draft: &mut Draft, batch: &Batch) -> Result<(), ()> {
        if !creates_only(&batch.appends) {
            return Err(());
        }
        let checked = checked_documents(&batch.appends);
        if !checked.iter().all(|key| self.positions.contains_key(key)) {
            return Err(());
        }
        // Fast commands change no document another command may have been decided on (they
        // only create theirs), so each is checked against the positions alone.
        for append in &batch.appends {
            let admitted = admit(std::slice::from_ref(append), |key| {
                self.positions.get(key).copied()
            })[0];
            draft.add(append, admitted).map_err(|e| {
                tracing::debug!(error = %e, "command not folded for the fast path");
            })?;
        }
        Ok(())
    }

    /// The checkpoint moved under the fast path, or the batch failed: forget what was known,
    /// and if another writer moved it (`moved`), leave the fast path alone for a while when
    /// that keeps happening.
    fn fast_failed(&mut self, moved: bool) {
        self.forget();
        if moved {
            self.pause = self.next_pause;
            self.next_pause = (self.next_pause * 2).clamp(1, MAX_FAST_PAUSE);
        }
    }

    fn forget(&mut self) {
        self.known = None;
        self.positions.clear();
    }

    /// Take in what a commit (or a rolled-back attempt) saw and left.
    fn committed(&mut self, appended: &Appended) {
        let unchanged_since_known = self.known.is_some_and(|k| {
            k.checkpoint == appended.after && k.version == appended.version_before
        });
        if !unchanged_since_known || self.positions.len() + appended.checked.len() > MAX_POSITIONS {
            self.positions.clear();
        }
        for (key, position) in &appended.checked {
            match position {
                Some(p) => self.positions.insert(key.clone(), *p),
                None => self.positions.remove(key),
            };
        }
        for (key, position) in &appended.written {
            if let Some(p) = self.positions.get_mut(key) {
                *p = *position;
            }
        }
        self.known = Some(Known {
            checkpoint: appended.upto,
            version: appended.version,
        });
    }
}

/// Whether every command of `batch` only creates documents (an aggregate's first event creates
/// its view), so its documents can be folded without reading any.
fn creates_only(batch: &[Append]) -> bool {
    batch.iter().all(|append| {
        let mut seen = HashSet::new();
        ViewKind::for_aggregate(append.aggregate_type).is_none()
            || append
                .events
                .iter()
                .all(|e| !seen.insert(e.aggregate_id.as_str()) || e.sequence == 1)
    })
}

/// Hand committed events to the local push hub, then announce the checkpoint.
fn publish(projector: &Projector, hub: Option<&Hub>, appended: Appended) {
    if appended.events.is_empty() {
        return;
    }
    if let Some(hub) = hub {
        hub.publish(appended.after, appended.upto, &appended.events);
    }
    projector.advance(appended.upto);
}

/// Answer the commands of a committed batch: refused ones with [`DocumentChanged`].
fn answer(appended: Appended, replies: Vec<Reply>, projector: &Projector, hub: Option<&Hub>) {
    let refused: HashSet<usize> = appended.refused.iter().copied().collect();
    publish(projector, hub, appended);
    for (i, reply) in replies.into_iter().enumerate() {
        let result = if refused.contains(&i) {
            Err(PersistenceError::UnknownError(Box::new(DocumentChanged)))
        } else {
            Ok(())
        };
        let _ = reply.send(result);
    }
}

type Reply = oneshot::Sender<Result<(), PersistenceError>>;

/// A fast batch came back: answer it, or send it down the general path.
async fn land(
    projector: &Projector,
    db: &Db,
    hub: Option<&Hub>,
    state: &mut WriterState,
    landed: Landed,
) -> Result<(), Outage> {
    let Landed {
        batch,
        took,
        result,
    } = landed;
    match result {
        Ok(Fast::Committed(appended)) => {
            projector.count_batch(true);
            state.next_pause = 0;
            state.committed(&appended);
            answer(appended, batch.replies, projector, hub);
            return Ok(());
        }
        Ok(Fast::Moved) => state.fast_failed(true),
        Err(e) if is_connection_error(&e) => {
            // It may have committed: what the writer knew is worth nothing now.
            state.fast_failed(false);
            return Err(unreachable(e, batch.replies, took));
        }
        Err(e) => {
            // Positions moved (a writer that does not project), or a command lost a race to
            // another node: nothing was written; the general path sorts it out.
            tracing::debug!(error = %e, "fast append refused; taking the general path");
            state.fast_failed(true);
        }
    }
    general(projector, db, hub, state, batch).await
}

/// Commit a batch through the general path ([`Projector::append`]) and answer its commands.
async fn general(
    projector: &Projector,
    db: &Db,
    hub: Option<&Hub>,
    state: &mut WriterState,
    batch: Batch,
) -> Result<(), Outage> {
    let Batch { appends, replies } = batch;
    projector.count_batch(false);
    let started = Instant::now();
    let result = projector.append(db, &appends).await;
    match result {
        Ok(appended) => {
            state.committed(&appended);
            answer(appended, replies, projector, hub);
            Ok(())
        }
        Err(e) if appends.len() > 1 && !is_connection_error(&e) => {
            // Probably one stale command (another node won a race): find it by committing
            // each alone. Any other failure then fails each command on its own.
            tracing::debug!(error = %e, commands = appends.len(), "batch append failed; retrying one by one");
            state.forget();
            for (append, reply) in appends.into_iter().zip(replies) {
                match projector.append(db, std::slice::from_ref(&append)).await {
                    Ok(appended) => {
                        state.committed(&appended);
                        answer(appended, vec![reply], projector, hub);
                    }
                    Err(e) => {
                        state.forget();
                        let _ = reply.send(Err(to_persistence(e)));
                    }
                }
            }
            Ok(())
        }
        Err(e) if is_connection_error(&e) => {
            state.forget();
            Err(unreachable(e, replies, started.elapsed()))
        }
        Err(e) => {
            state.forget();
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(to_persistence(e)));
            }
            Ok(())
        }
    }
}

/// Answer every command that the database could not be reached (retrying one by one would wait
/// out the pool's timeout again for each).
fn unreachable(e: sqlx::Error, replies: Vec<Reply>, waited: Duration) -> Outage {
    let why = e.to_string();
    for reply in replies {
        let error = PersistenceError::ConnectionError(why.clone().into());
        let _ = reply.send(Err(error));
    }
    Outage { why, waited }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
    )
}

/// Map a store error the way the cqrs-es repositories do: a duplicate event is a lost race.
fn to_persistence(e: sqlx::Error) -> PersistenceError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            PersistenceError::OptimisticLockError
        }
        _ if is_connection_error(&e) => PersistenceError::ConnectionError(Box::new(e)),
        _ => PersistenceError::UnknownError(Box::new(e)),
    }
}

tokio::task_local! {
    /// The id of an aggregate the current task has just made up (a fresh UUIDv4): it has no
    /// events yet, so the command skips reading them. Were the id ever taken, its first event
    /// would collide with the store's unique (type, id, sequence) key and be refused as a
    /// conflict, like any lost race.
    pub static NEW_AGGREGATE: String;
    /// The documents the current task's command was decided on (see [`Unchanged`]).
    pub static UNCHANGED: Vec<Unchanged>;
}

/// The repository commands use: reads from the backend's cqrs-es repository, appends through
/// the writer.
pub struct GroupCommitRepository {
    read: EventRepository,
    writer: Writer,
}

impl GroupCommitRepository {
    pub fn new(read: EventRepository, writer: Writer) -> Self {
        Self { read, writer }
    }
}

impl PersistedEventRepository for GroupCommitRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        if NEW_AGGREGATE.try_with(|id| id == aggregate_id) == Ok(true) {
            return Ok(Vec::new());
        }
        self.read.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.read
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.read.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        // The plain event store never sends snapshots (see `store::cqrs`).
        debug_assert!(snapshot_update.is_none());
        let unchanged = UNCHANGED.try_with(Vec::clone).unwrap_or_default();
        self.writer.append(A::TYPE, events, unchanged).await
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.read.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.read.stream_all_events::<A>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> SerializedEvent {
        SerializedEvent {
            aggregate_id: id.into(),
            sequence: 1,
            aggregate_type: "Transaction".into(),
            event_type: "TransactionPrepared".into(),
            event_version: "1".into(),
            payload: serde_json::json!({}),
            metadata: serde_json::json!({}),
        }
    }

    /// PostgreSQL down (its port refuses connections): the first batch waits out the pool's
    /// 10 s acquire timeout; the commands that queued meanwhile fail with it, not 10 s later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_queued_behind_a_batch_that_cannot_reach_the_database_fail_with_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://postgres@127.0.0.1:{port}/none");
        let pool = crate::store::pg_pool_options(1).connect_lazy(&url).unwrap();
        let writer = Writer::spawn(Arc::new(Projector::new(Db::Postgres(pool))), None).unwrap();
        let started = Instant::now();
        let first = tokio::spawn({
            let writer = writer.clone();
            async move { writer.append("Transaction", &[event("a")], vec![]).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued = (0..3).map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .append("Transaction", &[event(&i.to_string())], vec![])
                    .await
            })
        });
        let queued = futures::future::join_all(queued).await;
        for result in std::iter::once(first.await).chain(queued) {
            let result = result.unwrap();
            assert!(
                matches!(result, Err(PersistenceError::ConnectionError(_))),
                "{result:?}"
            );
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(14),
            "queued commands waited out a second timeout: {took:?}"
        );
    }
}
