//! The `countersign` command: `serve` the API, `migrate` the database, and the operator's
//! `audit`, `admin`, `projections` and `keys` commands (see `cli`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use countersign::config::redact_url;
use countersign::store::Db;
use countersign::{Application, Config};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "countersign",
    version,
    about = "Wallet server for AI agents, countersigned by humans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Development mode: generate missing secrets into DIR/secrets.env (0600). Not for
        /// production.
        #[arg(long)]
        dev: bool,
        /// Where dev mode keeps its generated secrets.
        #[arg(long, default_value = ".countersign-dev")]
        dev_dir: PathBuf,
    },
    /// Apply database migrations and exit (the server also applies them at start-up).
    Migrate,
    /// Tamper evidence: verify the sealed history, export it, seal now.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Operator actions on accounts (recorded as events, actor "operator").
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Read-side maintenance.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Master keys: which key seals what, and rotation (see README "Key rotation").
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Count sealed secrets per table and master key. Exits 1 if any is not under the
    /// current key.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Rewrap every sealed secret under COUNTERSIGN_MASTER_KEY; the keys they are under now
    /// must be in COUNTERSIGN_PREVIOUS_MASTER_KEYS. Safe while servers run; idempotent. Exits 1
    /// if any secret could not be rewrapped.
    Rotate {
        /// Check that every secret could be rewrapped, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Secrets per transaction.
        #[arg(long, default_value_t = countersign::keys::DEFAULT_BATCH)]
        batch_size: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify every event, chain and signed checkpoint (the database, or an export offline).
    /// Exits 1 if the history is broken, naming the first broken link.
    Verify {
        /// Verify this export instead of the database (no database needed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Trusted checkpoint key (hex or base64, from GET /api/audit/public_key); repeatable.
        /// Required with --file.
        #[arg(long = "public-key")]
        public_keys: Vec<String>,
        /// SEQ:HASH of a checkpoint seen before, which must still be there (catches a
        /// history cut short together with its later checkpoints).
        #[arg(long)]
        anchor: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the history with all integrity data as JSON Lines.
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// Seal and sign everything committed so far (the server does this continuously).
    Seal,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Grant the auditor role (read all history, run verification).
    GrantAuditor { username: String },
    /// Revoke the auditor role.
    RevokeAuditor { username: String },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// Drop and rebuild views from the event log in commit order.
    Rebuild {
        /// Only this view: transaction, wallet, api_key or user.
        #[arg(long)]
        view: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt().with_env_filter(
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info")),
    );
    // The server logs to stdout; the other commands to stderr, so that their stdout carries
    // only their output (e.g. `--json` reports).
    if matches!(cli.command, Command::Serve { .. }) {
        logs.init();
    } else {
        logs.with_writer(std::io::stderr).init();
    }
    match cli.command {
        Command::Serve { dev, dev_dir } => {
            let config = Config::from_env(dev.then_some(dev_dir.as_path()))?;
            tracing::info!(
                database = %redact_url(&config.database_url),
                chain = %countersign::config::redact_chain_url(&config.chain_url),
                master_key_id = %config.master_key.key_id(),
                previous_master_key_ids = ?config.master_key.previous_key_ids(),
                "starting"
            );
            let app = Application::build(config).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate => {
            let url = std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| countersign::config::DEFAULT_DATABASE_URL.to_owned());
            let db = Db::connect(&url)
                .await
                .with_context(|| format!("connecting to {}", redact_url(&url)))?;
            db.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Audit { command } => match command {
            AuditCommand::Verify {
                file,
                public_keys,
                anchor,
                json,
            } => {
                let ok = countersign::cli::audit_verify(
                    file.as_deref(),
                    &public_keys,
                    anchor.as_deref(),
                    json,
                )
                .await?;
                if !ok {
                    std::process::exit(1);
                }
                Ok(())
            }
            AuditCommand::Export { out } => countersign::cli::audit_export(&out).await,
            AuditCommand::Seal => countersign::cli::audit_seal().await,
        },
        Command::Admin { command } => match command {
            AdminCommand::GrantAuditor { username } => {
                countersign::cli::set_role(&username, aggregates::Role::Auditor, true).await
            }
            AdminCommand::RevokeAuditor { username } => {
                countersign::cli::set_role(&username, aggregates::Role::Auditor, false).await
            }
        },
        Command::Projections {
            command: ProjectionsCommand::Rebuild { view },
        } => countersign::cli::rebuild(view.as_deref()).await,
        Command::Keys { command } => {
            let ok = match command {
                KeysCommand::Status { json } => {
                    countersign::cli::keys_status(countersign::keys::DEFAULT_BATCH, json).await?
                }
                KeysCommand::Rotate {
                    dry_run,
                    batch_size,
                    json,
                } => countersign::cli::keys_rotate(dry_run, batch_size, json).await?,
            };
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
