//! Countersign: a self-hosted wallet server where every agent transaction is countersigned by
//! a human. This crate is the shell around the domain (`aggregates`) and read side
//! (`projections`): configuration, storage, HTTP, chain access and cryptography.

pub mod abi;
pub mod app;
pub mod audit;
pub mod chain;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod execution;
pub mod explain;
pub mod http;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod projector;
pub mod push;
pub mod read_cache;
pub(crate) mod rebuild;
pub mod services;
pub mod store;
pub mod upcast;
pub mod wallet_lock;
pub mod workers;
pub mod writer;

pub use app::{AppState, Application};
pub use config::Config;
