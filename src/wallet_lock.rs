//! Per-wallet execution locks, across every server process sharing the database.
//!
//! An execution holds its wallet's lock from choosing the nonce until the broadcast outcome is
//! recorded, so two executions from one wallet never pick the same nonce. Within a process the
//! lock is a Tokio mutex per wallet. On PostgreSQL the holder also takes a transaction-scoped
//! advisory lock keyed by the wallet, on a pooled connection it keeps meanwhile, so every node
//! on the database is serialized; it is released by commit, by rollback when the guard is
//! dropped (an error, a cancelled request), or by PostgreSQL itself when the holder's process
//! or connection dies — a crashed node never leaves a wallet locked. At most a quarter of the
//! pool's connections are held for locks, so lock holders (who need further connections to do
//! their work) can never take the whole pool. SQLite is
//! single-node: the process lock is the whole lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aggregates::Address;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::store::{Db, StoreError};

/// How long an execution waits for its wallet before giving up with `wallet_busy`. Longer than
/// an execution normally takes (a few chain round trips), shorter than the request limit.
pub const LOCK_WAIT: Duration = Duration::from_secs(20);
/// Advisory-lock key space of wallet locks (two-int form: the first key names the use).
const LOCK_CLASS: i32 = 0x4353_574c; // "CSWL"

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another execution from the wallet held the lock for all of [`LOCK_WAIT`].
    #[error("another execution from this wallet is under way; retry shortly")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for LockError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // lock_timeout expired while waiting for the advisory lock.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03") => Self::Busy,
            _ => Self::Store(StoreError::Database(e)),
        }
    }
}

pub struct WalletLocks {
    local: std::sync::Mutex<HashMap<Address, Arc<Mutex<()>>>>,
    /// The pool and the permits for lock connections (PostgreSQL only).
    sessions: Option<(PgPool, Arc<Semaphore>)>,
}

/// A held wallet lock; dropping it releases it.
pub struct WalletGuard {
    /// Holds the advisory lock until commit or rollback (PostgreSQL only).
    session: Option<(Transaction<'static, Postgres>, OwnedSemaphorePermit)>,
    _local: OwnedMutexGuard<()>,
}

/// The advisory-lock key of a wallet. A collision between two wallets only serializes them.
fn lock_key(wallet: &Address) -> i32 {
    let digest = Sha256::digest(wallet.as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl WalletLocks {
    pub fn new(db: &Db) -> Self {
        let sessions = match db {
            Db::Postgres(pool) => {
                // The most wallets one node executes from at once.
                let sessions = (pool.options().get_max_connections() / 4).max(1);
                Some((pool.clone(), Arc::new(Semaphore::new(sessions as usize))))
            }
            Db::Sqlite(_) => None,
        };
        Self {
            local: Default::default(),
            sessions,
        }
    }

    fn local(&self, wallet: &Address) -> Arc<Mutex<()>> {
        self.local
            .lock()
            .expect("wallet lock map poisoned")
            .entry(*wallet)
            .or_default()
            .clone()
    }

    /// Wait (at most [`LOCK_WAIT`] in this process, and as long again for another node) for
    /// the wallet's lock.
    pub async fn lock(&self, wallet: &Address) -> Result<WalletGuard, LockError> {
        let waited = tokio::time::Instant::now();
        let local = tokio::time::timeout(LOCK_WAIT, self.local(wallet).lock_owned())
            .await
            .map_err(|_| LockError::Busy)?;
        let Some((pool, permits)) = &self.sessions else {
            return Ok(WalletGuard {
                session: None,
                _local: local,
            });
        };
        let permit = tokio::time::timeout(
            LOCK_WAIT.saturating_sub(waited.elapsed()),
            permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| LockError::Busy)?
        .expect("lock permits are never closed");
        let mut session = pool.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", LOCK_WAIT.as_millis()))
            .execute(&mut *session)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(lock_key(wallet))
            .execute(&mut *session)
            .await?;
        Ok(WalletGuard {
            session: Some((session, permit)),
            _local: local,
        })
    }

    /// The wallet's lock if nobody holds it now.
    pub async fn try_lock(&self, wallet: &Address) -> Result<Option<WalletGuard>, LockError> {
        let Ok(local) = self.local(wallet).try_lock_owned() else {
            return Ok(None);
        };
        let Some((pool, permits)) = &self.sessions else {
            return Ok(Some(WalletGuard {
                session: None,
                _local: local,
            }));
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let mut session = pool.begin().await?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(lock_key(wallet))
            .fetch_one(&mut *session)
            .await?;
        Ok(held.then_some(WalletGuard {
            session: Some((session, permit)),
            _local: local,
        }))
    }
}

impl WalletGuard {
    /// Check that the lock is still held: its connection can die (a database restart), and
    /// PostgreSQL then releases the lock, so another node may already be choosing a nonce.
    /// Called right before signing, so nothing is signed under a lost lock.
    pub async fn ensure_held(&mut self) -> Result<(), LockError> {
        if let Some((session, _)) = &mut self.session {
            sqlx::query("SELECT 1").execute(&mut **session).await?;
        }
        Ok(())
    }

    /// Release now (dropping the guard releases too, a moment later).
    pub async fn release(mut self) {
        if let Some((session, _permit)) = self.session.take() {
            if let Err(e) = session.commit().await {
                // The connection is gone, and with it the lock.
                tracing::debug!(error = %e, "releasing a wallet lock failed");
            }
        }
    }
}
