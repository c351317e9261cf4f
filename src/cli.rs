//! The operator's commands beyond `serve`: audit (verify, export, seal), roles, and view
//! rebuilds. `main.rs` parses the command line and calls these.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use aggregates::{MfaVerifier, Role, User, UserCommand};
use anyhow::{bail, Context};
use async_trait::async_trait;
use cqrs_es::AggregateError;
use projections::ViewKind;

use crate::audit::{self, export::PublicKeyInfo, Report};
use crate::config::{redact_url, DEFAULT_DATABASE_URL};
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

fn master_key(required: bool) -> anyhow::Result<Option<MasterKey>> {
    match std::env::var("COUNTERSIGN_MASTER_KEY")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        Some(v) => Ok(Some(MasterKey::from_base64(&v).map_err(|why| {
            anyhow::anyhow!("COUNTERSIGN_MASTER_KEY is invalid: {why}")
        })?)),
        None if required => bail!("COUNTERSIGN_MASTER_KEY is not set"),
        None => Ok(None),
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
    let writer = crate::writer::Writer::spawn(Arc::new(Projector::new(db.clone())), None);
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
