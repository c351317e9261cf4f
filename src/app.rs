//! Wiring: builds the store, command frameworks, projector and chain client into one
//! [`AppState`], binds the listener (port 0 works, for tests) and runs the server with its
//! background workers until shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aggregates::{ApiKey, Transaction, User, Wallet};
use cqrs_es::{Aggregate, AggregateError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::chain::{Chain, KeyringSigner};
use crate::config::Config;
use crate::crypto::{JwtKeys, MasterKey};
use crate::projector::Projector;
use crate::push::Hub;
use crate::services::TotpVerifier;
use crate::store::{cqrs, Actor, Cqrs, Db, StoreError};
use crate::wallet_lock::WalletLocks;
use crate::writer::Writer;
use crate::{http, workers};

/// Attempts for a command that loses an optimistic-concurrency race. Retrying is safe: the
/// aggregate re-decides from the fresh state (a replayed code or a second execution fails).
const CONFLICT_RETRIES: usize = 3;

pub struct Inner {
    pub db: Db,
    pub projector: Arc<Projector>,
    /// Seals committed events into hash chains and signs checkpoints (see `audit`).
    pub sealer: Arc<crate::audit::Sealer>,
    pub hub: Arc<Hub>,
    pub users: Cqrs<User>,
    pub wallets: Cqrs<Wallet>,
    pub api_keys: Cqrs<ApiKey>,
    pub transactions: Cqrs<Transaction>,
    /// Login attempts (one aggregate per attempt).
    pub security_log: Cqrs<aggregates::SecurityLog>,
    pub jwt: JwtKeys,
    pub master_key: Arc<MasterKey>,
    pub chain: Chain,
    pub keyring: Arc<KeyringSigner>,
    /// Serializes executions per wallet, across nodes on PostgreSQL.
    pub wallet_locks: WalletLocks,
    pub default_expiry: Duration,
    pub poll_interval: Duration,
    /// Cap on an execution's max fee per gas (wei); `None`: no cap.
    pub max_fee_per_gas_cap: Option<u128>,
    /// How long an `Idempotency-Key` is remembered (see `http::idempotency`).
    pub idempotency_ttl: Duration,
    /// See [`Config::crash_after_sign_for_tests`].
    pub crash_after_sign_for_tests: bool,
    /// Set by the crash test hook: this instance behaves as a dead process and broadcasts
    /// nothing more.
    halted: AtomicBool,
    /// Counters and histograms behind `GET /metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Login and API-key rate limits, in memory (see `limits`).
    pub limits: crate::limits::Limits,
    /// Origins allowed cross-origin calls and WebSockets (see `http::cors`); empty: none.
    pub cors_origins: crate::config::CorsOrigins,
    /// See [`Config::request_timeout`].
    pub request_timeout: Duration,
    /// See [`Config::header_timeout`].
    pub header_timeout: Duration,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub async fn new(config: Config) -> Result<Self, StoreError> {
        let db = Db::connect_with(&config.database_url, config.db_max_connections).await?;
        db.migrate().await?;
        crate::crypto::init_passwords();
        let master_key = Arc::new(config.master_key);
        let keyring = Arc::new(KeyringSigner::new(db.clone(), master_key.clone()));
        let verifier = Arc::new(TotpVerifier::new(db.clone(), master_key.clone()));
        let sealer = crate::audit::Sealer::new(db.clone(), master_key.clone())
            .await
            .map_err(|e| StoreError::Startup(e.to_string()))?;
        let projector = Arc::new(Projector::new(db.clone()));
        let hub = Arc::new(Hub::new(db.clone(), projector.node()).await?);
        let writer = Writer::spawn(projector.clone(), Some(hub.clone()))
            .map_err(|e| StoreError::Startup(format!("starting the event writer: {e}")))?;
        Ok(Self(Arc::new(Inner {
            users: cqrs(&db, &writer, verifier as aggregates::UserServices)
                .append_query(Box::new(CommittedUserEvents)),
            wallets: cqrs(&db, &writer, ()),
            api_keys: cqrs(&db, &writer, ()),
            transactions: cqrs(
                &db,
                &writer,
                keyring.clone() as aggregates::TransactionServices,
            ),
            projector,
            sealer: Arc::new(sealer),
            security_log: cqrs(&db, &writer, ()),
            hub,
            jwt: JwtKeys::new(&config.jwt_secret, config.jwt_ttl),
            chain: Chain::new(config.chain_url, config.chain_timeout),
            wallet_locks: WalletLocks::new(&db),
            default_expiry: config.default_expiry,
            poll_interval: config.poll_interval,
            max_fee_per_gas_cap: config.max_fee_per_gas_cap,
            idempotency_ttl: config.idempotency_ttl,
            crash_after_sign_for_tests: config.crash_after_sign_for_tests,
            halted: AtomicBool::new(false),
            metrics: crate::metrics::Metrics::new(config.metrics),
            limits: crate::limits::Limits::new(&config.limits),
            cors_origins: config.cors_origins,
            request_timeout: config.request_timeout,
            header_timeout: config.header_timeout,
            master_key,
            keyring,
            db,
        })))
    }

    /// Test hook: stop broadcasting, as a crashed process would (see
    /// [`Config::crash_after_sign_for_tests`]).
    pub fn halt(&self) {
        self.halted.store(true, Ordering::SeqCst);
    }

    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    /// Run a command with its actor recorded in every event's metadata, retrying lost
    /// concurrency races. Its events are in the views once this returns (the writer projects
    /// them in the same transaction), so the response and any read after it reflect the change.
    pub async fn execute<A>(
        &self,
        cqrs: &Cqrs<A>,
        aggregate_id: &str,
        command: A::Command,
        actor: &Actor,
        request_id: &str,
    ) -> Result<(), http::ApiError>
    where
        A: Aggregate,
        A::Command: Clone,
        A::Error: Into<http::ApiError>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let result = cqrs
                .execute_with_metadata(aggregate_id, command.clone(), actor.metadata(request_id))
                .await;
            self.metrics.record_command(A::TYPE, &result, started);
            match result {
                Err(AggregateError::AggregateConflict) if attempt < CONFLICT_RETRIES => continue,
                Err(e) => return Err(e.into()),
                Ok(()) => return Ok(()),
            }
        }
    }
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let addr = config.addr;
        let state = AppState::new(config).await?;
        // Bring views up to date before serving (e.g. after a crash mid-projection).
        state.projector.catch_up().await?;
        // Seal what committed while no server ran; failure is logged and retried by the worker.
        if let Err(e) = state.sealer.seal_pending().await {
            tracing::error!(error = %e, "sealing at start-up failed");
        }
        let listener = TcpListener::bind(addr).await?;
        Ok(Self { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serve until `shutdown` resolves, then stop the workers and close the pool.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let workers: Vec<JoinHandle<()>> = workers::spawn_all(self.state.clone());
        let router = http::router(self.state.clone());
        tracing::info!(addr = %self.listener.local_addr()?, "countersign listening");
        serve(self.listener, router, self.state.header_timeout, shutdown).await;
        for w in workers {
            w.abort();
        }
        self.state.db.close().await;
        Ok(())
    }
}

/// Accept connections until `shutdown`, then wait for the requests in flight. Like
/// `axum::serve`, plus what it leaves out: a deadline for each request's headers, which also
/// closes idle keep-alive connections (without it, a client trickling headers or idling holds
/// a connection and its memory forever).
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        tracing::trace!(%peer, "connection accepted");
        // Responses are written whole: send them now rather than wait for an ACK.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                router.clone().oneshot(req)
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away mid-request is its own business.
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

tokio::task_local! {
    /// The events committed by the `User` commands of [`AppState::execute_user_command`].
    static COMMITTED_USER_EVENTS: std::sync::Mutex<Option<Vec<aggregates::UserEvent>>>;
}

/// The one cqrs-es query (views are the projector's): hands the events a `User` command
/// committed back to the task that ran it. Some outcomes are events rather than errors (a wrong
/// MFA code is recorded so that it counts; cqrs-es stores nothing when a command fails).
struct CommittedUserEvents;

#[async_trait::async_trait]
impl cqrs_es::Query<User> for CommittedUserEvents {
    async fn dispatch(&self, _: &str, events: &[cqrs_es::EventEnvelope<User>]) {
        // Dispatch runs in the committing task, after the commit; outside a capture, no-op.
        let _ = COMMITTED_USER_EVENTS.try_with(|captured| {
            if let Ok(mut captured) = captured.lock() {
                *captured = Some(events.iter().map(|e| e.payload.clone()).collect());
            }
        });
    }
}

impl AppState {
    /// Run a `User` command like [`execute`](Self::execute) and return the events it
    /// recorded (those of the attempt that committed, after any conflict retries). Fails
    /// closed: a command that succeeded without its events reaching us is an error, never
    /// an empty (and so unrefused) outcome.
    pub async fn execute_user_command(
        &self,
        user_id: &str,
        command: aggregates::UserCommand,
        actor: &Actor,
        request_id: &str,
    ) -> Result<Vec<aggregates::UserEvent>, http::ApiError> {
        COMMITTED_USER_EVENTS
            .scope(std::sync::Mutex::new(None), async {
                self.execute(&self.users, user_id, command, actor, request_id)
                    .await?;
                COMMITTED_USER_EVENTS
                    .with(|captured| captured.lock().ok().and_then(|mut e| e.take()))
                    .ok_or_else(|| {
                        http::ApiError::internal("a user command's events were not captured")
                    })
            })
            .await
    }
}
