//! Storage: the backend chosen from `DATABASE_URL`, migrations, the cqrs-es event repository
//! over either backend, and the tables that hold what must stay out of events (credentials and
//! sealed secrets). The views themselves are in `projector`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use cqrs_es::persist::{
    PersistedEventRepository, PersistedEventStore, PersistenceError, ReplayStream, SerializedEvent,
    SerializedSnapshot,
};
use cqrs_es::{Aggregate, CqrsFramework};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::writer::{GroupCommitRepository, Writer};

/// Run `$body` with `$pool` bound to the concrete pool of either backend. The body is compiled
/// once per backend, so the same SQL text must be valid on both (sqlx accepts `$N` on SQLite).
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::store::Db::Postgres($pool) => $body,
            $crate::store::Db::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "DATABASE_URL has unsupported scheme {0:?}: use postgres://, postgresql:// or sqlite://"
    )]
    UnknownScheme(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The server cannot start with this configuration (e.g. its master keys do not open the
    /// stored audit key).
    #[error("cannot start: {0}")]
    Startup(String),
}

impl StoreError {
    /// The database could not be reached, is restarting or too busy: retry later (HTTP 503),
    /// as opposed to a bug or bad data.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Database(e) if is_unavailable(e))
    }

    /// The message for a domain service's `String` error, marked when the database was
    /// unavailable so the HTTP layer still answers 503 (see [`is_unavailable_message`]).
    pub fn service_message(&self) -> String {
        if self.is_unavailable() {
            format!("{UNAVAILABLE}: {self}")
        } else {
            self.to_string()
        }
    }
}

/// Prefix of a service error message caused by an unavailable database.
const UNAVAILABLE: &str = "database unavailable";

pub fn is_unavailable_message(message: &str) -> bool {
    message.starts_with(UNAVAILABLE)
}

/// Whether a database error is a fault of the connection or the server's availability
/// (connection lost or refused, pool exhausted, server shutting down or starting up, SQLite
/// busy past its timeout) rather than of the statement.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // PostgreSQL: class 08 connection exception, 57P01-57P03 shutdown / starting up,
            // 53300 too many connections. SQLite: BUSY and LOCKED with their extended codes.
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "53300" | "5" | "6" | "261" | "262" | "517"
                )
        }),
        _ => false,
    }
}

/// Whether `e` or any error in its source chain is an unavailable database.
pub fn caused_by_unavailable(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<sqlx::Error>().is_some_and(is_unavailable) {
            return true;
        }
        next = e.source();
    }
    false
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// PostgreSQL connections per process unless configured (`COUNTERSIGN_DB_MAX_CONNECTIONS`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// The smallest pool that leaves room for work besides the wallet locks' sessions.
pub const MIN_CONNECTIONS: u32 = 4;

/// A pooled PostgreSQL connection idle longer than this is pinged before use.
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

const SQLITE_MAX_CONNECTIONS: u32 = 8;

pub(crate) fn pg_pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // No ping per checkout under load; a connection that failed is dropped when released.
        // One idle for a while may have died unseen (a database restart while nothing ran):
        // ping it first, and replace it if that fails.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > IDLE_PING_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// PostgreSQL on this machine is reached without TLS unless the URL (or `PGSSLMODE`) asks for
/// it: whoever can read loopback traffic is already root here, so encryption protects nothing
/// and costs every round trip (sqlx's default, `prefer`, negotiates TLS whenever the server
/// offers it). Any other host keeps the configured or default mode.
fn loopback_without_tls(url: &str, options: PgConnectOptions) -> PgConnectOptions {
    let asked =
        url.to_ascii_lowercase().contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    let host = options.get_host();
    let local = host == "localhost"
        || host.starts_with('/')
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local && !asked {
        options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        options
    }
}

/// A connection pool to the configured backend.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    /// Connect to the database named by `url`. The scheme picks the backend; anything else is an
    /// error, never a silent fallback to a fresh embedded database.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, DEFAULT_MAX_CONNECTIONS).await
    }

    /// [`connect`](Self::connect) with a PostgreSQL pool of `max_connections`.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => {
                let options = loopback_without_tls(url, PgConnectOptions::from_str(url)?);
                let pool = pg_pool_options(max_connections.max(MIN_CONNECTIONS))
                    .connect_with(options)
                    .await?;
                Ok(Self::Postgres(pool))
            }
            "sqlite" => {
                let options = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a committed event survives power loss, not only a process crash.
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(SQLITE_MAX_CONNECTIONS)
                    .connect_with(options)
                    .await?;
                Ok(Self::Sqlite(pool))
            }
            other => Err(StoreError::UnknownScheme(other.to_owned())),
        }
    }

    /// A pool of its own with this one's connection options, for a task that runs on another
    /// runtime (a connection serves the runtime it was opened on). Connects on first use.
    pub fn dedicated(&self, max_connections: u32) -> Self {
        match self {
            Self::Postgres(pool) => Self::Postgres(
                pg_pool_options(max_connections)
                    .connect_lazy_with(pool.connect_options().as_ref().clone()),
            ),
            Self::Sqlite(pool) => Self::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .connect_lazy_with(pool.connect_options().as_ref().clone()),
            ),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Apply pending migrations (idempotent; serialized across instances on Postgres).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Self::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await?,
            Self::Sqlite(pool) => sqlx::migrate!("migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    pub fn event_repository(&self) -> EventRepository {
        match self {
            Self::Postgres(pool) => {
                EventRepository::Postgres(PostgresEventRepository::new(pool.clone()))
            }
            Self::Sqlite(pool) => EventRepository::Sqlite(SqliteEventRepository::new(pool.clone())),
        }
    }

    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await)
    }

    // ---- credentials and sealed secrets (never in events) ----

    /// Reserve a username for a new user. `Ok(false)` if the name is taken (case-insensitive).
    pub async fn insert_user_credentials(
        &self,
        user_id: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        let result = with_pool!(self, |pool| sqlx::query(
            "INSERT INTO user_credentials (user_id, username, username_key, password_hash) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (username_key) DO NOTHING"
        )
        .bind(user_id)
        .bind(username)
        .bind(username.to_lowercase())
        .bind(password_hash)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(result == 1)
    }

    pub async fn delete_user_credentials(&self, user_id: &str) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM user_credentials WHERE user_id = $1")
                .bind(user_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// `(user_id, password_hash)` for a username.
    pub async fn user_credentials_by_name(
        &self,
        username: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        Ok(with_pool!(self, |pool| sqlx::query_as(
            "SELECT user_id, password_hash FROM user_credentials WHERE username_key = $1"
        )
        .bind(username.to_lowercase())
        .fetch_optional(pool)
        .await?))
    }

    pub async fn password_hash(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(with_pool!(self, |pool| sqlx::query_scalar(
            "SELECT password_hash FROM user_credentials WHERE user_id = $1"
        )
        .bind(user_id)
        .fetch_optional(pool)
        .await?))
    }

    pub async fn insert_mfa_secret(
        &self,
        secret_id: &str,
        user_id: &str,
        sealed: &[u8],
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query("INSERT INTO mfa_secrets (secret_id, user_id, sealed) VALUES ($1, $2, $3)")
                .bind(secret_id)
                .bind(user_id)
                .bind(sealed)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Remove a secret no event refers to (an enrolment that was refused).
    pub async fn delete_mfa_secret(&self, secret_id: &str) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query("DELETE FROM mfa_secrets WHERE secret_id = $1")
                .bind(secret_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The sealed secret, only if it belongs to `user_id`.
    pub async fn mfa_secret(
        &self,
        secret_id: &str,
        user_id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(with_pool!(self, |pool| sqlx::query_scalar(
            "SELECT sealed FROM mfa_secrets WHERE secret_id = $1 AND user_id = $2"
        )
        .bind(secret_id)
        .bind(user_id)
        .fetch_optional(pool)
        .await?))
    }

    pub async fn insert_wallet_key(
        &self,
        wallet_address: &str,
        owner_user_id: &str,
        sealed: &[u8],
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO wallet_keys (wallet_address, owner_user_id, sealed) VALUES ($1, $2, $3)"
            )
            .bind(wallet_address)
            .bind(owner_user_id)
            .bind(sealed)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// `(owner_user_id, sealed key)` of a wallet.
    pub async fn wallet_key(
        &self,
        wallet_address: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        Ok(with_pool!(self, |pool| sqlx::query_as(
            "SELECT owner_user_id, sealed FROM wallet_keys WHERE wallet_address = $1"
        )
        .bind(wallet_address)
        .fetch_optional(pool)
        .await?))
    }

    pub async fn insert_api_key_credentials(
        &self,
        api_key_id: &str,
        key_hash: &str,
    ) -> Result<(), StoreError> {
        with_pool!(self, |pool| {
            sqlx::query("INSERT INTO api_key_credentials (api_key_id, key_hash) VALUES ($1, $2)")
                .bind(api_key_id)
                .bind(key_hash)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The `TransactionExecuted` payload of a transaction, if it was executed.
    pub async fn executed_event(&self, transaction_id: &str) -> Result<Option<Value>, StoreError> {
        let payload: Option<Value> = with_pool!(self, |pool| sqlx::query_scalar(
            "SELECT payload FROM events WHERE aggregate_type = 'Transaction' \
             AND aggregate_id = $1 AND event_type = 'TransactionExecuted'"
        )
        .bind(transaction_id)
        .fetch_optional(pool)
        .await?);
        Ok(payload.and_then(|mut p| p.get_mut("TransactionExecuted").map(Value::take)))
    }
}

/// The cqrs-es event repository over either backend (the plain event store only: the 0.5
/// snapshot and aggregate stores apply events twice).
pub enum EventRepository {
    Postgres(PostgresEventRepository),
    Sqlite(SqliteEventRepository),
}

macro_rules! delegate {
    ($self:ident, |$repo:ident| $body:expr) => {
        match $self {
            EventRepository::Postgres($repo) => $body,
            EventRepository::Sqlite($repo) => $body,
        }
    };
}

impl PersistedEventRepository for EventRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, |r| r.get_events::<A>(aggregate_id).await)
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, |r| r
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await)
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        delegate!(self, |r| r.get_snapshot::<A>(aggregate_id).await)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        delegate!(self, |r| r.persist::<A>(events, snapshot_update).await)
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, |r| r.stream_events::<A>(aggregate_id).await)
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, |r| r.stream_all_events::<A>().await)
    }
}

pub type Cqrs<A> = CqrsFramework<A, PersistedEventStore<GroupCommitRepository, A>>;

/// A command framework for `A` on `db`, appending through `writer`, with no query processors:
/// the writer folds each commit into the views in the same transaction (see `writer`).
pub fn cqrs<A: Aggregate>(db: &Db, writer: &Writer, services: A::Services) -> Cqrs<A> {
    CqrsFramework::new(
        // Old event shapes are upcast on load (see `upcast`).
        PersistedEventStore::new_event_store(GroupCommitRepository::new(
            db.event_repository(),
            writer.clone(),
        ))
        .with_upcasters(crate::upcast::upcasters()),
        vec![],
        services,
    )
}

/// Command metadata stored with every event: who, which request, when.
#[derive(Debug, Clone)]
pub struct Actor {
    pub kind: &'static str,
    pub id: String,
}

impl Actor {
    pub fn user(id: impl Into<String>) -> Self {
        Self {
            kind: "user",
            id: id.into(),
        }
    }

    pub fn api_key(id: impl Into<String>) -> Self {
        Self {
            kind: "api_key",
            id: id.into(),
        }
    }

    pub fn system(name: &str) -> Self {
        Self {
            kind: "system",
            id: name.to_owned(),
        }
    }

    /// Someone not (yet) authenticated, e.g. a login attempt.
    pub fn anonymous() -> Self {
        Self {
            kind: "anonymous",
            id: String::new(),
        }
    }

    /// The operator, acting through the `countersign` command line.
    pub fn operator() -> Self {
        Self {
            kind: "operator",
            id: "operator".to_owned(),
        }
    }

    pub fn metadata(&self, request_id: &str) -> HashMap<String, String> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut metadata = HashMap::from([
            ("actor".to_owned(), self.id.clone()),
            ("actor_type".to_owned(), self.kind.to_owned()),
            ("request_id".to_owned(), request_id.to_owned()),
            ("time".to_owned(), now),
        ]);
        // The client address of the HTTP request being served, if any (see `SOURCE_IP`).
        if let Ok(ip) = SOURCE_IP.try_with(|ip| ip.to_string()) {
            metadata.insert("source_ip".to_owned(), ip);
        }
        metadata
    }
}

tokio::task_local! {
    /// The peer address of the HTTP request a task is serving, set by the HTTP layer for the
    /// whole request so every event it causes records where it came from. The direct peer
    /// only: `X-Forwarded-For` is not trusted.
    pub static SOURCE_IP: std::net::IpAddr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgSslMode;

    fn mode(url: &str) -> PgSslMode {
        loopback_without_tls(url, PgConnectOptions::from_str(url).unwrap()).get_ssl_mode()
    }

    #[test]
    fn loopback_defaults_to_no_tls_and_everything_else_keeps_its_mode() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return; // the environment decides; nothing to default
        }
        for local in [
            "postgres://u@127.0.0.1:5432/db",
            "postgres://u@127.0.0.2/db",
            "postgres://u@localhost/db",
            "postgres://u@[::1]:5432/db",
        ] {
            assert!(matches!(mode(local), PgSslMode::Disable), "{local}");
        }
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@db.example.com/db"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@10.0.0.5/db?sslmode=verify-full"),
            PgSslMode::VerifyFull
        ));
    }
}
