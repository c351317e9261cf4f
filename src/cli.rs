//! The operator's commands beyond `serve`: audit (verify, export, seal), roles, master-key
//! rotation (status, rotate) and view rebuilds. `main.rs` parses the command line and calls
//! these.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use aggregates::{MfaVerifier, Role, SecurityLog, SecurityLogCommand, User, UserCommand};
use anyhow::{bail, Context};
use async_trait::async_trait;
use cqrs_es::AggregateError;
use projections::ViewKind;

use crate::audit::{self, export::PublicKeyInfo, Report};
use crate::config::{master_key_from_env, redact_url, DEFAULT_DATABASE_URL};
use crate::crypto::MasterKey;
use crate::projector::Projector;
use crate::store::{cqrs, Actor, Db};

/// The database named by `DATABASE_URL` (or the default), migrated.
pub async fn connect() -> anyhow::Result<Db> {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let db = Db::connect(&url)
        .await
        .with_context(|| format!("connecting to {}", redact_url(&url)))?;
    db.migrate().await?;
    Ok(db)
}

/// The master key with any previous keys (see `config::master_key_from_env`).
fn master_key(required: bool) -> anyhow::Result<Option<MasterKey>> {
    match master_key_from_env()? {
        None if required => bail!("COUNTERSIGN_MASTER_KEY is not set"),
        key => Ok(key),
    }
}

/// Print a verification report; `Ok(true)` if the history is intact.
fn print_report(report: &Report, json: bool) -> anyhow::Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(report.ok);
    }
    match &report.problem {
        None => println!(
            "OK: {} events ({} sealed, {} not yet sealed) in {} aggregates, {} checkpoints verified",
            report.events,
            report.sealed_events,
            report.unsealed_events,
            report.aggregates,
            report.checkpoints
        ),
        Some(p) => {
            println!("BROKEN: {}", p.message);
            println!("  kind: {}", serde_json::to_value(p.kind)?.as_str().unwrap_or("?"));
            if let Some(pos) = p.position {
                println!("  position: {pos}");
            }
            if let (Some(t), Some(id)) = (&p.aggregate_type, &p.aggregate_id) {
                println!("  aggregate: {t} {id} (sequence {})", p.sequence.unwrap_or(0));
            }
            if let Some(seq) = p.checkpoint_seq {
                println!("  checkpoint: {seq}");
            }
            println!(
                "  verified before the break: {} events, {} checkpoints",
                report.events, report.checkpoints
            );
        }
    }
    if let Some(cp) = &report.last_checkpoint {
        println!(
            "last checkpoint: {} at position {} (anchor: {}:{})",
            cp.seq,
            cp.position,
            cp.seq,
            hex::encode(cp.hash)
        );
    }
    println!(
        "{:.2} s, {:.0} events/s",
        report.elapsed_seconds, report.events_per_second
    );
    Ok(report.ok)
}

/// `countersign audit verify`: the database (or, with `file`, an export, offline).
pub async fn audit_verify(
    file: Option<&Path>,
    public_keys: &[String],
    anchor: Option<&str>,
    json: bool,
) -> anyhow::Result<bool> {
    let pinned = public_keys
        .iter()
        .map(|k| audit::parse_public_key(k).map_err(|e| anyhow::anyhow!("--public-key: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let anchor = anchor
        .map(audit::parse_anchor)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--anchor: {e}"))?;
    let report = match file {
        Some(path) => {
            if pinned.is_empty() {
                bail!("offline verification needs --public-key (from GET /api/audit/public_key)");
            }
            let input =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            audit::export::verify_file(std::io::BufReader::new(input), pinned, anchor)
        }
        None => {
            let db = connect().await?;
            let keys = if pinned.is_empty() {
                // With the master key, only keys whose private half opens are trusted.
                audit::sealer::trusted_keys(&db, master_key(false)?.as_ref()).await?
            } else {
                pinned
            };
            audit::verify_database(&db, keys, anchor).await?
        }
    };
    print_report(&report, json)
}

/// `countersign audit export --out FILE`.
pub async fn audit_export(out: &Path) -> anyhow::Result<()> {
    let db = connect().await?;
    let keys = audit::sealer::trusted_keys(&db, master_key(false)?.as_ref()).await?;
    let infos = keys
        .iter()
        .map(|k| PublicKeyInfo {
            key_id: audit::verify::key_id(k),
            public_key: hex::encode(k.as_bytes()),
        })
        .collect();
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    let started = std::time::Instant::now();
    let records = audit::export::export(&db, infos, &mut writer).await?;
    writer.flush()?;
    writer.get_ref().sync_all()?;
    println!(
        "exported {records} records to {} in {:.2} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `countersign audit seal`: seal everything committed now (the server does this
/// continuously).
pub async fn audit_seal() -> anyhow::Result<()> {
    let db = connect().await?;
    let key = Arc::new(master_key(true)?.expect("required"));
    let sealer = audit::Sealer::new(db, key).await?;
    let started = std::time::Instant::now();
    let sealed = sealer.seal_pending().await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sealed {} events up to position {} in {secs:.2} s ({:.0} events/s)",
        sealed.events,
        sealed.position,
        sealed.events as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// The operator cannot spend MFA codes: role commands never ask for one.
struct NoMfa;

#[async_trait]
impl MfaVerifier for NoMfa {
    async fn matching_steps(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: time::OffsetDateTime,
    ) -> Result<Vec<u64>, String> {
        Err("MFA is not available from the command line".into())
    }
}

/// `countersign admin grant-auditor|revoke-auditor USERNAME`: an event on the user, by the
/// operator.
pub async fn set_role(username: &str, role: Role, grant: bool) -> anyhow::Result<()> {
    let db = connect().await?;
    let Some((user_id, _)) = db.user_credentials_by_name(username).await? else {
        bail!("no user named {username:?}");
    };
    // The writer projects the change into the views in the same transaction, so it takes
    // effect even if no server is running.
    let writer = crate::writer::Writer::spawn(Arc::new(Projector::new(db.clone())), None)?;
    let users = cqrs::<User>(&db, &writer, Arc::new(NoMfa) as aggregates::UserServices);
    let request_id = format!("cli-{}", uuid::Uuid::new_v4());
    let now = time::OffsetDateTime::now_utc();
    let command = if grant {
        UserCommand::GrantRole { role, now }
    } else {
        UserCommand::RevokeRole { role, now }
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match users
            .execute_with_metadata(
                &user_id,
                command.clone(),
                Actor::operator().metadata(&request_id),
            )
            .await
        {
            Err(AggregateError::AggregateConflict) if attempt < 3 => continue,
            Err(AggregateError::UserError(e)) => bail!("{username}: {e}"),
            Err(e) => return Err(e.into()),
            Ok(()) => break,
        }
    }
    println!(
        "{} role {} {} {username}",
        if grant { "granted" } else { "revoked" },
        role.as_str(),
        if grant { "to" } else { "from" }
    );
    Ok(())
}

/// `countersign projections rebuild [--view NAME]`.
pub async fn rebuild(view: Option<&str>) -> anyhow::Result<()> {
    let only = match view {
        None => None,
        Some(name) => Some(
            ViewKind::ALL
                .into_iter()
                .find(|k| k.as_str() == name)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown view {name:?}: one of {}",
                        ViewKind::ALL.map(|k| k.as_str()).join(", ")
                    )
                })?,
        ),
    };
    let db = connect().await?;
    let stats = Projector::new(db).rebuild(only).await?;
    println!(
        "rebuilt {} from {} events up to position {}: {} documents in {:.2} s ({:.0} events/s)",
        view.unwrap_or("all views"),
        stats.events,
        stats.position,
        stats.documents,
        stats.elapsed_seconds,
        stats.events as f64 / stats.elapsed_seconds.max(1e-9)
    );
    Ok(())
}

/// `countersign keys status`: sealed secrets per table and master key. `Ok(true)` if every
/// one is under the current key (previous keys can be retired).
pub async fn keys_status(batch: u32, json: bool) -> anyhow::Result<bool> {
    let db = connect().await?;
    let key = master_key(true)?.expect("required");
    let status = crate::keys::status(&db, &key, batch).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(status.not_current == 0);
    }
    print_key_ids(&key);
    println!(
        "{:<20} {:<18} {:<10} {:>8}",
        "table", "master key", "role", "secrets"
    );
    for c in &status.counts {
        let id = c
            .key_id
            .map_or("(not recorded)".to_owned(), |id| id.to_string());
        let role = serde_json::to_value(c.role)?;
        println!(
            "{:<20} {:<18} {:<10} {:>8}",
            c.table.name(),
            id,
            role.as_str().unwrap_or("?"),
            c.count
        );
    }
    if status.malformed > 0 {
        println!("{} sealed secrets are malformed", status.malformed);
    }
    if status.not_current == 0 {
        println!("every sealed secret is under the current master key");
    } else {
        println!(
            "{} sealed secrets are not under the current master key: run `countersign keys rotate`",
            status.not_current
        );
    }
    Ok(status.not_current == 0)
}

fn print_key_ids(key: &MasterKey) {
    println!("current master key:  {}", key.key_id());
    let previous = key.previous_key_ids();
    if previous.is_empty() {
        println!("previous master keys: none");
    } else {
        let ids: Vec<String> = previous.iter().map(ToString::to_string).collect();
        println!("previous master keys: {}", ids.join(", "));
    }
}

/// `countersign keys rotate [--dry-run]`: rewrap every sealed secret under the current master
/// key, then record a `MasterKeyRotated` security event (actor "operator"). `Ok(true)` if
/// every secret is now under the current key.
pub async fn keys_rotate(dry_run: bool, batch: u32, json: bool) -> anyhow::Result<bool> {
    let db = connect().await?;
    let key = master_key(true)?.expect("required");
    let report = crate::keys::rotate(&db, &key, batch, dry_run).await?;
    if !dry_run && (report.rewrapped > 0 || !report.failures.is_empty()) {
        record_rotation(&db, &report)
            .await
            .context("the secrets were rotated, but recording the security event failed")?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(report.complete());
    }
    print_key_ids(&key);
    println!(
        "{:<20} {:>8} {:>8} {:>10} {:>7}",
        "table", "secrets", "current", "rewrapped", "failed"
    );
    for t in &report.tables {
        println!(
            "{:<20} {:>8} {:>8} {:>10} {:>7}",
            t.table.name(),
            t.scanned,
            t.already_current,
            t.rewrapped,
            t.failed
        );
    }
    for f in &report.failures {
        println!("FAILED {} {}: {}", f.table.name(), f.id, f.error);
    }
    if report.conflicts > 0 {
        println!(
            "{} secrets kept changing while being rewrapped: run the command again",
            report.conflicts
        );
    }
    let verb = if dry_run { "would rewrap" } else { "rewrapped" };
    println!("{verb} {} sealed secrets", report.rewrapped);
    if report.complete() && !dry_run {
        println!(
            "every sealed secret is under master key {}: previous keys can be removed from \
             COUNTERSIGN_PREVIOUS_MASTER_KEYS (restart each node after)",
            report.current_key_id
        );
    }
    Ok(report.complete())
}

/// The rotation as a `MasterKeyRotated` event on a fresh `SecurityLog` instance.
async fn record_rotation(db: &Db, report: &crate::keys::RotationReport) -> anyhow::Result<()> {
    let writer = crate::writer::Writer::spawn(Arc::new(Projector::new(db.clone())), None)?;
    let log = cqrs::<SecurityLog>(db, &writer, ());
    let command = SecurityLogCommand::RecordKeyRotation {
        from_key_ids: report.from_key_ids.clone(),
        to_key_id: report.current_key_id.to_string(),
        rewrapped: report.rewrapped,
        failed: report.failures.len() as u64,
        now: time::OffsetDateTime::now_utc(),
    };
    let request_id = format!("cli-{}", uuid::Uuid::new_v4());
    log.execute_with_metadata(
        &uuid::Uuid::new_v4().to_string(),
        command,
        Actor::operator().metadata(&request_id),
    )
    .await?;
    Ok(())
}
