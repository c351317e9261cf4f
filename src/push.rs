//! Live push: one hub per node tails the event log in position order and routes each
//! transaction event to the sockets entitled to it.
//!
//! No gap, no duplicate: the hub only reads events at or below the projection checkpoint (so
//! every event it routes has its view, which says who may see it), advances its cursor under
//! the same lock that registers subscribers, and a subscriber registered at cursor C receives
//! every event > C through its channel while its replay covers `(after, C]` from the database.
//! Positions are commit-ordered (see the migrations), so "> C" never skips a late commit.
//!
//! Multi-node: the projector that advances the checkpoint issues `NOTIFY countersign_views` in
//! the same transaction; every node's hub listens and wakes. The event table stays the source of
//! truth: a missed notification only delays delivery until the next periodic tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use crate::read_cache::ReadCache;
use crate::store::{with_pool, Backend, Db, StoreError};

pub const VIEWS_CHANNEL: &str = "countersign_views";
/// Messages a socket may have queued before it counts as too slow and is dropped.
pub const SUBSCRIBER_BUFFER: usize = 1024;
const PAGE: i64 = 500;
const FALLBACK_TICK: Duration = Duration::from_secs(1);

/// Who a socket belongs to, which decides what it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Events of transactions on wallets the user owns.
    User(String),
    /// Events of transactions the API key prepared.
    Agent(String),
    /// Events of every transaction (a user with the auditor role; see `http::audit`).
    Auditor(String),
}

/// What the hub hands a socket.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Event { position: i64, message: Arc<str> },
    Close { code: u16, reason: &'static str },
}

pub const CLOSE_EXPIRED: u16 = 4001;
pub const CLOSE_REVOKED: u16 = 4003;
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// A stored event with the routing columns of its transaction's view.
#[derive(sqlx::FromRow, Debug, Clone)]
pub struct PushRow {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The event's payload as JSON text (decoded only for a socket that receives it).
    pub payload: String,
    pub recorded_at: String,
    /// When this node's writer saw the commit acknowledged (RFC 3339, UTC). Only on events
    /// committed here and handed straight to the hub; `None` for events read back from the log
    /// (other nodes' commits, replays on resume).
    #[sqlx(default)]
    pub committed_at: Option<String>,
    pub owner_user_id: Option<String>,
    pub api_key_id: Option<String>,
    pub wallet_address: Option<String>,
}

/// The status a transaction has right after `event_type`.
fn status_after(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        "TransactionPrepared" => "pending_authorization",
        "TransactionAuthorized" => "authorized",
        "TransactionRejected" => "rejected",
        "TransactionExpired" => "expired",
        "TransactionExecuted" => "executed",
        "TransactionConfirmed" => "confirmed",
        "TransactionFailed" => "failed",
        _ => return None,
    })
}

impl PushRow {
    /// Which document the event changed, for the read cache.
    fn changed(&self) -> (&str, &str, i64) {
        (&self.aggregate_type, &self.aggregate_id, self.position)
    }

    /// A row for `event`, its routing columns still to be filled in.
    pub fn unrouted(event: &projections::StoredEvent) -> Self {
        Self {
            position: event.position,
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            event_type: event.event_type.clone(),
            payload: event.payload.to_string(),
            recorded_at: event.recorded_at.clone(),
            committed_at: None,
            owner_user_id: None,
            api_key_id: None,
            wallet_address: None,
        }
    }

    /// The event's data: its payload without the event-type envelope.
    fn data(&self) -> Value {
        let mut payload: Value = serde_json::from_str(&self.payload).unwrap_or(Value::Null);
        payload
            .get_mut(&self.event_type)
            .map(Value::take)
            .unwrap_or(Value::Null)
    }

    /// The wire message for a transaction event.
    pub fn message(&self) -> Option<String> {
        let data = self.data();
        if self.aggregate_type != "Transaction" {
            // Users, wallets, keys, logins: only auditors' sockets route these (see
            // `visible_to`: they have no transaction view, so no owner or key).
            return Some(
                json!({
                    "type": "event",
                    "position": self.position,
                    "event_type": self.event_type,
                    "aggregate_type": self.aggregate_type,
                    "aggregate_id": self.aggregate_id,
                    "recorded_at": self.recorded_at,
                    "committed_at": self.committed_at,
                    "data": data,
                })
                .to_string(),
            );
        }
        Some(
            json!({
                "type": "event",
                "position": self.position,
                "event_type": self.event_type,
                "transaction_id": self.aggregate_id,
                "wallet_address": self.wallet_address,
                "status": status_after(&self.event_type),
                "recorded_at": self.recorded_at,
                "committed_at": self.committed_at,
                "data": data,
            })
            .to_string(),
        )
    }

    fn visible_to(&self, principal: &Principal) -> bool {
        match principal {
            Principal::User(id) => self.owner_user_id.as_deref() == Some(id),
            Principal::Agent(key) => self.api_key_id.as_deref() == Some(key),
            Principal::Auditor(_) => true,
        }
    }
}

impl From<projections::StoredEvent> for PushRow {
    /// A row for `event`, its routing columns still to be filled in.
    fn from(event: projections::StoredEvent) -> Self {
        Self {
            position: event.position,
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            event_type: event.event_type,
            payload: event.payload.to_string(),
            recorded_at: event.recorded_at,
            committed_at: None,
            owner_user_id: None,
            api_key_id: None,
            wallet_address: None,
        }
    }
}

fn select_push(backend: Backend, filter: &str) -> String {
    let (payload, recorded_at) = match backend {
        Backend::Postgres => (
            "e.payload::text",
            "to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        ),
        Backend::Sqlite => ("e.payload", "e.recorded_at"),
    };
    format!(
        "SELECT e.position, e.aggregate_type, e.aggregate_id, e.event_type, {payload} AS payload, \
         {recorded_at} AS recorded_at, v.owner_user_id, v.api_key_id, v.wallet_address \
         FROM events e LEFT JOIN views v \
           ON e.aggregate_type = 'Transaction' AND v.kind = 'transaction' AND v.id = e.aggregate_id \
         WHERE e.position > $1 AND e.position <= $2 {filter} \
         ORDER BY e.position LIMIT $3"
    )
}

impl Db {
    pub async fn projection_checkpoint(&self) -> Result<i64, StoreError> {
        Ok(with_pool!(self, |pool| sqlx::query_scalar(
            "SELECT position FROM projection_checkpoints WHERE name = 'views'"
        )
        .fetch_one(pool)
        .await?))
    }

    /// Events in `(after, upto]`, all of them (hub) or those a principal may see (replay).
    pub async fn push_events(
        &self,
        after: i64,
        upto: i64,
        principal: Option<&Principal>,
    ) -> Result<Vec<PushRow>, StoreError> {
        let (filter, value) = match principal {
            None => ("", None),
            Some(Principal::User(id)) => ("AND v.owner_user_id = $4", Some(id.as_str())),
            Some(Principal::Agent(key)) => ("AND v.api_key_id = $4", Some(key.as_str())),
            Some(Principal::Auditor(_)) => ("", None),
        };
        let sql = select_push(self.backend(), filter);
        Ok(with_pool!(self, |pool| {
            let mut q = sqlx::query_as::<_, PushRow>(&sql)
                .bind(after)
                .bind(upto)
                .bind(PAGE);
            if let Some(v) = value {
                q = q.bind(v);
            }
            q.fetch_all(pool).await?
        }))
    }
}

struct Subscriber {
    principal: Principal,
    /// The access token (`jti`) a user's socket was opened with.
    token_id: Option<String>,
    tx: mpsc::Sender<Outgoing>,
}

impl Subscriber {
    fn is_user(&self, user_id: &str) -> bool {
        matches!(&self.principal, Principal::User(id) | Principal::Auditor(id) if id == user_id)
    }
}

struct HubState {
    cursor: i64,
    next_id: u64,
    subscribers: HashMap<u64, Subscriber>,
}

/// A registered socket: events after `from` arrive on `rx`; `(after, from]` is the caller's
/// to replay.
pub struct Subscription {
    pub id: u64,
    pub from: i64,
    pub rx: mpsc::Receiver<Outgoing>,
}

pub struct Hub {
    db: Db,
    /// This node's id in checkpoint notifications ([`crate::projector::Projector::node`]).
    node: String,
    state: Mutex<HubState>,
    pumping: tokio::sync::Mutex<()>,
    wake: Notify,
    position: watch::Sender<i64>,
    /// Status reads from memory, kept exact by the events routed here.
    pub cache: ReadCache,
}

impl Hub {
    /// Start at the current checkpoint: earlier events are served by replay. `node` is the
    /// id this node's projector signs its notifications with.
    pub async fn new(db: Db, node: &str) -> Result<Self, StoreError> {
        let cursor = db.projection_checkpoint().await?;
        let cache = ReadCache::default();
        cache.advance([], cursor, None);
        Ok(Self {
            db,
            node: node.to_owned(),
            state: Mutex::new(HubState {
                cursor,
                next_id: 0,
                subscribers: HashMap::new(),
            }),
            pumping: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            position: watch::Sender::new(cursor),
            cache,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest position routed, as a watchable value (long polls wait on it).
    pub fn watch_position(&self) -> watch::Receiver<i64> {
        self.position.subscribe()
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Messages routed to sockets and not yet taken by them: the total and the deepest queue
    /// (for `/metrics`).
    pub fn queued_messages(&self) -> (usize, usize) {
        self.lock()
            .subscribers
            .values()
            .map(|s| s.tx.max_capacity() - s.tx.capacity())
            .fold((0, 0), |(total, deepest), q| (total + q, deepest.max(q)))
    }

    pub fn subscribe(&self, principal: Principal) -> Subscription {
        self.subscribe_session(principal, None)
    }

    /// Subscribe a socket opened with the access token `token_id` (closed when a logout,
    /// password change or MFA replacement ends that token).
    pub fn subscribe_session(
        &self,
        principal: Principal,
        token_id: Option<String>,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        let subscriber = Subscriber {
            principal,
            token_id,
            tx,
        };
        state.subscribers.insert(id, subscriber);
        Subscription {
            id,
            from: state.cursor,
            rx,
        }
    }

    pub fn unsubscribe(&self, id: u64) {
        self.lock().subscribers.remove(&id);
    }

    /// Ask the hub to look for new events now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Route the events this node just committed — every event in `(after, upto]` — without
    /// reading them back, if they continue exactly where the hub is and no pump is running.
    /// Otherwise wake the pump, which reads them from the database (the source of truth).
    pub fn publish(&self, after: i64, upto: i64, events: &[PushRow]) {
        // The writer answers once this returns: no read may find the copies these replace,
        // even while the pump has yet to route them.
        self.cache.changed(events.iter().map(PushRow::changed));
        // No wait for a running pump: it routes only what is above the cursor when it is done
        // reading, so whichever of the two gets the state lock first routes an event, once.
        let cursor = {
            let mut state = self.lock();
            if state.cursor != after {
                state.cursor
            } else {
                for row in events {
                    Self::route(&mut state, row);
                }
                state.cursor = upto;
                self.cache.advance([], upto, Some(Instant::now()));
                upto
            }
        };
        if cursor == upto {
            self.position.send_replace(upto);
        } else if cursor < upto {
            self.wake();
        }
    }

    /// Route everything new, page by page.
    pub async fn pump(&self) -> Result<(), StoreError> {
        let _pumping = self.pumping.lock().await;
        loop {
            let cursor = self.lock().cursor;
            let checked = Instant::now();
            let upto = self.db.projection_checkpoint().await?;
            if upto <= cursor {
                self.cache.advance([], cursor, Some(checked));
                return Ok(());
            }
            let rows = self.db.push_events(cursor, upto, None).await?;
            let reached = rows.last().map_or(upto, |r| r.position);
            {
                let mut state = self.lock();
                // `publish` may have routed some of these meanwhile (this node's commits).
                let routed = state.cursor;
                for row in rows.iter().filter(|r| r.position > routed) {
                    Self::route(&mut state, row);
                }
                // A full page may stop short of `upto`; otherwise nothing routable remains.
                let full_page = rows.len() as i64 == PAGE;
                let reached = if full_page { reached } else { upto };
                state.cursor = state.cursor.max(reached);
                let current = (!full_page).then_some(checked);
                self.cache
                    .advance(rows.iter().map(PushRow::changed), state.cursor, current);
            }
            self.position.send_replace(self.lock().cursor);
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    /// Close the sockets of sessions a user event ended: the one token of a `LoggedOut`, every
    /// token of the user on `PasswordChanged` or an `MfaEnabled` that replaced a secret. (A
    /// socket opened with the token issued by that very request, before this event is routed,
    /// is closed too; the client reconnects with it.)
    fn end_sessions(state: &mut HubState, row: &PushRow) {
        let data = row.data();
        let user_id = row.aggregate_id.as_str();
        let logged_out = match row.event_type.as_str() {
            "LoggedOut" => match data.get("token_id").and_then(Value::as_str) {
                Some(token) => Some(token),
                None => return,
            },
            "PasswordChanged" => None,
            "MfaEnabled" if !data["replaced_secret_id"].is_null() => None,
            _ => return,
        };
        state.subscribers.retain(|_, s| {
            let ended = s.is_user(user_id)
                && logged_out.is_none_or(|token| s.token_id.as_deref() == Some(token));
            if ended {
                let _ = s.tx.try_send(Outgoing::Close {
                    code: CLOSE_REVOKED,
                    reason: "session ended: log in again",
                });
            }
            !ended
        });
    }

    fn route(state: &mut HubState, row: &PushRow) {
        if row.aggregate_type == "User" {
            Self::end_sessions(state, row);
            return;
        }
        if row.aggregate_type == "ApiKey" && row.event_type == "ApiKeyRevoked" {
            let revoked = Principal::Agent(row.aggregate_id.clone());
            state.subscribers.retain(|_, s| {
                if s.principal == revoked {
                    let _ = s.tx.try_send(Outgoing::Close {
                        code: CLOSE_REVOKED,
                        reason: "API key revoked",
                    });
                    false
                } else {
                    true
                }
            });
            // Auditors still receive the event itself, below.
        }
        // Encoded once, and only if some socket is to receive it.
        let mut message: Option<Option<Arc<str>>> = None;
        // A subscriber whose buffer is full is dropped: its socket closes with "too slow,
        // resume", and it reconnects with `after` = the last position it received.
        state.subscribers.retain(|_, s| {
            if !row.visible_to(&s.principal) {
                return true;
            }
            let encoded = message.get_or_insert_with(|| row.message().map(Arc::from));
            let Some(message) = encoded else {
                return true;
            };
            s.tx.try_send(Outgoing::Event {
                position: row.position,
                message: message.clone(),
            })
            .is_ok()
        });
    }

    /// Pump whenever woken (local commits, Postgres notifications) and on a fallback tick.
    pub async fn run(self: Arc<Self>, mut local: watch::Receiver<i64>) {
        let mut tick = tokio::time::interval(FALLBACK_TICK);
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                changed = local.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Commits of this node are usually routed by `publish` already.
                    if *local.borrow_and_update() <= self.lock().cursor {
                        continue;
                    }
                }
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pump().await {
                tracing::warn!(error = %e, "push hub could not read events");
            }
        }
    }

    /// Whether a checkpoint notification (`position@node`) brings anything to read. This
    /// node's own advances reach the hub directly — `publish`, or the projector's watch in
    /// `run` — and its notification can arrive before `publish` has run: pumping for it would
    /// only read back what `publish` is about to route.
    fn needs_pump(&self, payload: &str) -> bool {
        let (position, node) = payload.split_once('@').unwrap_or((payload, ""));
        node != self.node
            && position
                .parse::<i64>()
                .map_or(true, |p| p > self.lock().cursor)
    }

    /// On Postgres, wake on every checkpoint advance made by any node.
    pub async fn listen(self: Arc<Self>) {
        let Db::Postgres(pool) = &self.db else {
            return;
        };
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                    tokio::time::sleep(FALLBACK_TICK).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(VIEWS_CHANNEL).await {
                tracing::warn!(error = %e, "LISTEN failed; retrying");
                tokio::time::sleep(FALLBACK_TICK).await;
                continue;
            }
            loop {
                match listener.recv().await {
                    Ok(n) if !self.needs_pump(n.payload()) => {}
                    Ok(_) => self.wake(),
                    Err(e) => {
                        tracing::warn!(error = %e, "notification stream broke; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// The access token a user's ticket was issued for: checked again when the socket opens.
#[derive(Debug, Clone)]
pub struct TicketToken {
    pub token_id: String,
    pub token_version: u64,
}

/// Single-use WebSocket tickets (stored hashed; consumed atomically).
impl Db {
    pub async fn insert_ws_ticket(
        &self,
        ticket_hash: &str,
        principal: &Principal,
        expires_at: i64,
        session_expires_at: Option<i64>,
        token: Option<&TicketToken>,
    ) -> Result<(), StoreError> {
        let (kind, id) = match principal {
            Principal::User(id) => ("user", id),
            Principal::Agent(id) => ("api_key", id),
            Principal::Auditor(id) => ("auditor", id),
        };
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM ws_tickets WHERE expires_at < $1")
                .bind(expires_at - 3600)
                .execute(pool)
                .await?;
            sqlx::query(
                "INSERT INTO ws_tickets (ticket_hash, principal_type, principal_id, expires_at, \
                 session_expires_at, token_id, token_version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(ticket_hash)
            .bind(kind)
            .bind(id)
            .bind(expires_at)
            .bind(session_expires_at)
            .bind(token.map(|t| t.token_id.as_str()))
            .bind(token.map(|t| i64::try_from(t.token_version).unwrap_or(i64::MAX)))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Consume a ticket: it is deleted whether or not it is still valid.
    pub async fn take_ws_ticket(
        &self,
        ticket_hash: &str,
        now: i64,
    ) -> Result<Option<(Principal, Option<i64>, Option<TicketToken>)>, StoreError> {
        type Row = (
            String,
            String,
            i64,
            Option<i64>,
            Option<String>,
            Option<i64>,
        );
        let row: Option<Row> = with_pool!(self, |pool| {
            sqlx::query_as(
                "DELETE FROM ws_tickets WHERE ticket_hash = $1 \
                 RETURNING principal_type, principal_id, expires_at, session_expires_at, \
                 token_id, token_version",
            )
            .bind(ticket_hash)
            .fetch_optional(pool)
            .await?
        });
        Ok(
            row.and_then(|(kind, id, expires_at, session, token_id, version)| {
                if expires_at < now {
                    return None;
                }
                let principal = match kind.as_str() {
                    "user" => Principal::User(id),
                    "auditor" => Principal::Auditor(id),
                    _ => Principal::Agent(id),
                };
                let token = token_id
                    .zip(version)
                    .map(|(token_id, version)| TicketToken {
                        token_id,
                        token_version: u64::try_from(version).unwrap_or(u64::MAX),
                    });
                Some((principal, session, token))
            }),
        )
    }
}
