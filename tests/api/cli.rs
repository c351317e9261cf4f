//! The `countersign` binary: secure defaults at start-up, dev mode, concurrent migrations.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;

use crate::helpers::*;

fn countersign(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_countersign"));
    // A clean environment and a directory without `.env`, so only what the test sets counts.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

fn good_master_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Run `serve` expecting it to refuse to start; returns its output.
fn refused(envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = countersign(dir.path());
    cmd.arg("serve")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/x.db", dir.path().display()),
        )
        .env("COUNTERSIGN_ADDR", "127.0.0.1:0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run countersign");
    assert!(
        !out.status.success(),
        "server started but should have refused"
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn missing_secrets_are_a_startup_error() {
    let out = refused(&[]);
    assert!(out.contains("JWT_SECRET_KEY is not set"), "{out}");
    let jwt = "x".repeat(40);
    let out = refused(&[("JWT_SECRET_KEY", &jwt)]);
    assert!(out.contains("COUNTERSIGN_MASTER_KEY is not set"), "{out}");
}

#[test]
fn weak_secrets_are_a_startup_error() {
    let key = good_master_key();
    let out = refused(&[
        ("JWT_SECRET_KEY", "short"),
        ("COUNTERSIGN_MASTER_KEY", &key),
    ]);
    assert!(out.contains("at least 32 bytes"), "{out}");
    let jwt = "x".repeat(40);
    let out = refused(&[
        ("JWT_SECRET_KEY", &jwt),
        ("COUNTERSIGN_MASTER_KEY", "c2hvcnQ="),
    ]);
    assert!(out.contains("must decode to 32 bytes"), "{out}");
    let zeros = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
    let out = refused(&[("JWT_SECRET_KEY", &jwt), ("COUNTERSIGN_MASTER_KEY", &zeros)]);
    assert!(out.contains("not random"), "{out}");
}

#[test]
fn an_unknown_database_scheme_is_a_startup_error() {
    let (jwt, key) = ("x".repeat(40), good_master_key());
    let out = refused(&[
        ("JWT_SECRET_KEY", &jwt),
        ("COUNTERSIGN_MASTER_KEY", &key),
        ("DATABASE_URL", "postgress://localhost/typo"),
    ]);
    assert!(out.contains("unsupported scheme \"postgress\""), "{out}");
}

#[tokio::test]
async fn dev_mode_generates_private_secrets_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = countersign(dir.path())
        .args(["serve", "--dev"])
        .env("COUNTERSIGN_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/dev.db", dir.path().display()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let mut healthy = false;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&url).await {
            healthy = r.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(healthy, "dev server never became healthy");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("DEV MODE"),
        "dev mode must say so loudly: {log}"
    );
    let secrets = dir.path().join(".countersign-dev/secrets.env");
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&secrets).unwrap();
    assert!(text.contains("JWT_SECRET_KEY=") && text.contains("COUNTERSIGN_MASTER_KEY="));
    // No secret value reaches the log.
    for line in text.lines().filter(|l| l.contains('=')) {
        let value = line.split_once('=').unwrap().1;
        assert!(!log.contains(value), "a secret was logged");
    }
}

#[tokio::test]
async fn concurrent_migrations_on_one_postgres_are_safe() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let store = Store::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            countersign(dir.path())
                .arg("migrate")
                .env("DATABASE_URL", &store.url)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And again: idempotent.
    let out = countersign(dir.path())
        .arg("migrate")
        .env("DATABASE_URL", &store.url)
        .output()
        .unwrap();
    assert!(out.status.success());
    store.cleanup().await;
}

#[tokio::test]
async fn loopback_postgres_goes_without_tls_unless_the_url_asks() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let store = Store::new(Backend::Postgres).await;
    async fn encrypted(url: &str) -> bool {
        let countersign::store::Db::Postgres(pool) =
            countersign::store::Db::connect(url).await.unwrap()
        else {
            unreachable!("a postgres URL")
        };
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await
                .unwrap();
        pool.close().await;
        ssl
    }
    assert!(!encrypted(&store.url).await, "TLS on loopback by default");
    // This machine's server offers TLS: asking for it still gets it.
    let offered: bool = sqlx::query_scalar("SELECT current_setting('ssl') = 'on'")
        .fetch_one(&sqlx::PgPool::connect(&store.url).await.unwrap())
        .await
        .unwrap();
    if offered {
        let sep = if store.url.contains('?') { '&' } else { '?' };
        assert!(encrypted(&format!("{}{sep}sslmode=require", store.url)).await);
    }
    store.cleanup().await;
}
