//! The `countersign` command: `serve` the API, or `migrate` the database and exit.

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve { dev, dev_dir } => {
            let config = Config::from_env(dev.then_some(dev_dir.as_path()))?;
            tracing::info!(
                database = %redact_url(&config.database_url),
                chain = %config.chain_url,
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
