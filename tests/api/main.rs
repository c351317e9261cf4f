//! Integration tests: the real server on port 0, real SQLite and Postgres, real anvil.
//! One test binary (fast to link); each module is a specification of one area.

mod adversarial;
mod audit;
mod cli;
mod concurrency;
mod cors;
mod docs;
mod faults;
mod flow;
mod helpers;
mod idempotency;
mod keys;
mod kinds;
mod limits;
mod metrics;
mod negative;
mod nodes;
mod projections;
mod push;
mod read_cache;
mod security;
mod sessions;
mod timeouts;
mod writer;

/// Generate a `_sqlite` and a `_postgres` test from `async fn name(backend: Backend)`.
/// The Postgres variant is skipped (and says so) without `TEST_DATABASE_URL`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod backends {
            $(
                pub mod $name {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn sqlite() {
                        super::super::$name($crate::helpers::Backend::Sqlite).await
                    }

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn postgres() {
                        if $crate::helpers::backends().contains(&$crate::helpers::Backend::Postgres) {
                            super::super::$name($crate::helpers::Backend::Postgres).await
                        }
                    }
                }
            )*
        }
    };
}
