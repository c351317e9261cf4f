//! The write path: group commit.
//!
//! cqrs-es loads an aggregate, decides, and hands the new events to its repository's `persist`.
//! Here `persist` does not open a transaction of its own: it queues the events for one writer
//! task, which appends everything queued meanwhile — the events of many commands — in a single
//! transaction that also folds them into the views and advances the projection checkpoint (see
//! [`Projector::append`]). Under load a commit, its fsync and its round trips are shared by all
//! the commands in it; when idle, a command is committed at once (the queue holds just it).
//!
//! Guarantees kept: optimistic concurrency (a second command on the same aggregate version in
//! one batch is refused before the write; a duplicate from another node aborts the batch, which
//! is then retried command by command, so only the stale command fails), commit-ordered
//! positions, and views that contain a command's events when its response is sent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::projector::{Append, Appended, Projector};
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
    reply: oneshot::Sender<Result<(), PersistenceError>>,
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

    /// Append one command's events; resolves once they are committed and projected.
    pub async fn append(
        &self,
        aggregate_type: &'static str,
        events: Vec<SerializedEvent>,
    ) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            append: Append {
                aggregate_type,
                events,
            },
            reply,
        };
        let stopped = || PersistenceError::UnknownError("the event writer has stopped".into());
        self.sender.send(request).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    projector: &Projector,
    db: &Db,
    hub: Option<Arc<Hub>>,
    mut receiver: mpsc::Receiver<Request>,
) {
    while let Some(first) = receiver.recv().await {
        let mut events = first.append.events.len();
        let mut batch = vec![first];
        while events < MAX_BATCH_EVENTS {
            match receiver.try_recv() {
                Ok(next) => {
                    events += next.append.events.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // Two commands that read the same version of one aggregate: the later one lost the
        // race (as it would have against the database), without costing the batch.
        let mut claimed = HashSet::new();
        let (batch, stale): (Vec<Request>, Vec<Request>) = batch.into_iter().partition(|r| {
            r.append.events.iter().all(|e| {
                claimed.insert((r.append.aggregate_type, e.aggregate_id.clone(), e.sequence))
            })
        });
        for request in stale {
            let _ = request
                .reply
                .send(Err(PersistenceError::OptimisticLockError));
        }
        let started = Instant::now();
        let outcome = commit(projector, db, hub.as_deref(), batch).await;
        match outcome {
            // Commands that queued while this batch waited for the database (up to the pool's
            // acquire timeout: sqlx retries refused connections until then) would each wait
            // out another timeout behind the next batch. They fail now, unwritten, as a 503.
            // (A connection that broke at once is a blip: the next batch reconnects.)
            Err(unreachable) if started.elapsed() > OUTAGE => {
                while let Ok(request) = receiver.try_recv() {
                    let error = PersistenceError::ConnectionError(unreachable.clone().into());
                    let _ = request.reply.send(Err(error));
                }
            }
            _ => {}
        }
    }
}

/// Hand committed events to the local push hub, then announce the checkpoint.
fn publish(projector: &Projector, hub: Option<&Hub>, appended: Appended) {
    if let Some(hub) = hub {
        hub.publish(appended.after, appended.upto, &appended.events);
    }
    projector.advance(appended.upto);
}

/// Commit a batch and answer its commands. `Err`: the database could not be reached (why), and
/// every command of the batch was answered so.
async fn commit(
    projector: &Projector,
    db: &Db,
    hub: Option<&Hub>,
    batch: Vec<Request>,
) -> Result<(), String> {
    let (appends, replies): (Vec<Append>, Vec<_>) =
        batch.into_iter().map(|r| (r.append, r.reply)).unzip();
    match projector.append(db, &appends).await {
        Ok(appended) => {
            publish(projector, hub, appended);
            for reply in replies {
                let _ = reply.send(Ok(()));
            }
            Ok(())
        }
        Err(e) if appends.len() > 1 && !is_connection_error(&e) => {
            // Probably one stale command (another node won a race): find it by committing
            // each alone. Any other failure then fails each command on its own.
            tracing::debug!(error = %e, commands = appends.len(), "batch append failed; retrying one by one");
            for (append, reply) in appends.into_iter().zip(replies) {
                let result = projector.append(db, &[append]).await;
                let result = result.map(|appended| publish(projector, hub, appended));
                let _ = reply.send(result.map_err(to_persistence));
            }
            Ok(())
        }
        Err(e) if is_connection_error(&e) => {
            // Retrying one by one would wait out the pool's timeout again for each command.
            let unreachable = e.to_string();
            for reply in replies {
                let error = PersistenceError::ConnectionError(unreachable.clone().into());
                let _ = reply.send(Err(error));
            }
            Err(unreachable)
        }
        Err(e) => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(to_persistence(e)));
            }
            Ok(())
        }
    }
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
        self.writer.append(A::TYPE, events.to_vec()).await
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
            async move { writer.append("Transaction", vec![event("a")]).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued = (0..3).map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .append("Transaction", vec![event(&i.to_string())])
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
