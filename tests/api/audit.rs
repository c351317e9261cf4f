//! Audit: the sealed history detects tampering and says where; exports verify offline; the
//! audit API's access rules; pagination under concurrent writes; views rebuilt from events
//! equal the live ones; old event versions still load.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use countersign::audit::{self, ProblemKind, Report, Sealer};
use countersign::projector::Projector;
use countersign::store::Db;
use ed25519_dalek::VerifyingKey;
use projections::ViewKind;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    tampering_with_sealed_history_is_detected_and_located,
    an_export_verifies_offline_and_one_changed_byte_is_located,
    audit_access_auditor_user_and_agent,
    paging_through_events_while_writers_run_never_skips_or_repeats,
    rebuilt_views_equal_the_live_ones,
    an_old_version_event_is_upcast_on_load,
    an_auditor_socket_receives_every_event,
);

/// Run SQL on either backend.
async fn exec(db: &Db, sql: &str) {
    match db {
        Db::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        Db::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar_i64(db: &Db, sql: &str) -> i64 {
    match db {
        Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

/// Disable the append-only protections, as an operator with database access could.
async fn disable_protections(db: &Db) {
    match db {
        Db::Postgres(_) => {
            for table in ["events", "event_seals", "audit_checkpoints"] {
                exec(db, &format!("ALTER TABLE {table} DISABLE TRIGGER USER")).await;
            }
        }
        Db::Sqlite(_) => {
            for trigger in [
                "events_append_only",
                "events_no_delete",
                "event_seals_no_update",
                "event_seals_no_delete",
                "audit_checkpoints_no_update",
                "audit_checkpoints_no_delete",
            ] {
                exec(db, &format!("DROP TRIGGER {trigger}")).await;
            }
        }
    }
}

/// A copy of the test's database (server stopped), for one tampering scenario.
struct Copy {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Copy {
    async fn of(app: &TestApp) -> Self {
        match app.backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("copy.db");
                let db = Db::connect(&app.store.url).await.unwrap();
                exec(&db, &format!("VACUUM INTO '{}'", path.display())).await;
                db.close().await;
                Self {
                    url: format!("sqlite://{}", path.display()),
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin = std::env::var("TEST_DATABASE_URL").unwrap();
                let source = url::Url::parse(&app.store.url).unwrap().path()[1..].to_owned();
                let name = format!("countersign_copy_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&admin).await.unwrap();
                // A template must have no other sessions: PostgreSQL waits 5 s for the ones
                // just closed to end, which a loaded machine has been seen to exceed.
                let create = format!("CREATE DATABASE {name} TEMPLATE {source}");
                let mut attempts = 0;
                while let Err(e) = sqlx::query(&create).execute(&pool).await {
                    attempts += 1;
                    let busy = e.to_string().contains("being accessed by other users");
                    assert!(busy && attempts < 5, "copy the test database: {e}");
                }
                pool.close().await;
                let mut url = url::Url::parse(&admin).unwrap();
                url.set_path(&name);
                Self {
                    url: url.to_string(),
                    _dir: None,
                    pg: Some((admin, name)),
                }
            }
        }
    }

    async fn drop_db(self) {
        if let Some((admin, name)) = self.pg {
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    }
}

async fn trusted_keys(db: &Db) -> Vec<VerifyingKey> {
    audit::sealer::trusted_keys(db, None).await.unwrap()
}

async fn verify(db: &Db) -> Report {
    audit::verify_database(db, trusted_keys(db).await, None)
        .await
        .unwrap()
}

/// Seal everything committed, as a second node's sealer would.
async fn seal_all(app: &TestApp) {
    let db = Db::connect(&app.store.url).await.unwrap();
    let sealer = Sealer::new(db.clone(), Arc::new(app.config().master_key))
        .await
        .unwrap();
    sealer.seal_pending().await.unwrap();
    db.close().await;
}

/// Users, a wallet, an agent, and transactions in every early state; several seal batches.
async fn workload(app: &TestApp) -> (TestUser, String, Agent, Vec<String>) {
    let (mut user, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let mut txs = vec![];
    for i in 0..3u128 {
        txs.push(
            app.prepare(&agent, native_body(&wallet, &random_address(), i + 1))
                .await,
        );
    }
    seal_all(app).await;
    let (status, body) = app
        .post(
            "/api/reject_transaction",
            &user.auth(),
            json!({"transaction_id": txs[0], "reason": "no"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.authorize(&mut user, &txs[1]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    seal_all(app).await;
    for i in 0..2u128 {
        txs.push(
            app.prepare(&agent, native_body(&wallet, &random_address(), 10 + i))
                .await,
        );
    }
    let _ = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": "nobody-here", "password": "wrong password!"}),
        )
        .await;
    seal_all(app).await;
    (user, wallet, agent, txs)
}

#[derive(sqlx::FromRow, Debug)]
struct Row {
    position: i64,
}

async fn row(db: &Db, sql: &str) -> Row {
    match db {
        Db::Postgres(p) => sqlx::query_as(sql).fetch_one(p).await.unwrap(),
        Db::Sqlite(p) => sqlx::query_as(sql).fetch_one(p).await.unwrap(),
    }
}

fn assert_problem(report: &Report, kind: ProblemKind, position: i64, what: &str) {
    let p = report
        .problem
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: tampering not detected: {report:?}"));
    assert_eq!(p.kind, kind, "{what}: {}", p.message);
    assert_eq!(p.position, Some(position), "{what}: {}", p.message);
}

async fn tampering_with_sealed_history_is_detected_and_located(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (_user, _wallet, _agent, txs) = workload(&app).await;
    app.stop().await;
    seal_all(&app).await;
    let db = Db::connect(&app.store.url).await.unwrap();
    let clean = verify(&db).await;
    assert!(clean.ok, "{:?}", clean.problem);
    assert_eq!(clean.unsealed_events, 0);
    assert!(clean.checkpoints >= 3, "{clean:?}");
    let total = scalar_i64(&db, "SELECT COUNT(*) FROM events").await;
    assert_eq!(clean.events, total);
    db.close().await;
    let rejected = &txs[0];

    // 1. A payload edited in place.
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    let target = row(
        &db,
        &format!("SELECT position FROM events WHERE aggregate_id = '{rejected}' AND sequence = 1"),
    )
    .await;
    let mut payload = db.events_after(target.position - 1, 1).await.unwrap()[0]
        .payload
        .clone();
    payload["TransactionPrepared"]["memo"] = json!("a different memo");
    match &db {
        Db::Postgres(p) => sqlx::query("UPDATE events SET payload = $1 WHERE position = $2")
            .bind(&payload)
            .bind(target.position)
            .execute(p)
            .await
            .map(|_| ()),
        Db::Sqlite(p) => sqlx::query("UPDATE events SET payload = $1 WHERE position = $2")
            .bind(&payload)
            .bind(target.position)
            .execute(p)
            .await
            .map(|_| ()),
    }
    .unwrap();
    let report = verify(&db).await;
    assert_problem(
        &report,
        ProblemKind::PayloadChanged,
        target.position,
        "update payload",
    );
    let p = report.problem.unwrap();
    assert_eq!(p.aggregate_id.as_deref(), Some(rejected.as_str()));
    assert_eq!(p.sequence, Some(1));
    db.close().await;
    copy.drop_db().await;

    // 2. An event deleted.
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    exec(
        &db,
        &format!("DELETE FROM events WHERE position = {}", target.position),
    )
    .await;
    assert_problem(
        &verify(&db).await,
        ProblemKind::EventMissing,
        target.position,
        "delete",
    );
    db.close().await;
    copy.drop_db().await;

    // 3a. A forged event in a free position below the sealed head: the owner "authorized"
    // the transaction they rejected.
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    let forged = |position: i64| {
        format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
             payload, metadata, position) VALUES ('Transaction', '{rejected}', 3, 'TransactionAuthorized', \
             '1.0', '{{\"TransactionAuthorized\":{{\"authorized_by\":\"x\",\"payload_digest\":\"00\",\
             \"authorized_at\":\"2026-01-01T00:00:00Z\"}}}}', '{{\"actor\":\"x\"}}', {position})"
        )
    };
    exec(&db, &forged(0)).await;
    assert_problem(
        &verify(&db).await,
        ProblemKind::ForgedEvent,
        0,
        "forged at a free position",
    );
    db.close().await;
    copy.drop_db().await;

    // 3b. A forged event squeezed in by shifting every later event up by one.
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    let k = target.position + 2;
    exec(
        &db,
        &format!("UPDATE events SET position = position + 1000000 WHERE position > {k}"),
    )
    .await;
    exec(
        &db,
        "UPDATE events SET position = position - 999999 WHERE position > 1000000",
    )
    .await;
    exec(&db, &forged(k + 1)).await;
    assert_problem(
        &verify(&db).await,
        ProblemKind::EventReplaced,
        k + 1,
        "forged by shifting",
    );
    db.close().await;
    copy.drop_db().await;

    // 4. Two events of one transaction swap sequences.
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    let tx = rejected;
    exec(
        &db,
        &format!("UPDATE events SET sequence = 100 WHERE aggregate_id = '{tx}' AND sequence = 1"),
    )
    .await;
    exec(
        &db,
        &format!("UPDATE events SET sequence = 1 WHERE aggregate_id = '{tx}' AND sequence = 2"),
    )
    .await;
    exec(
        &db,
        &format!("UPDATE events SET sequence = 2 WHERE aggregate_id = '{tx}' AND sequence = 100"),
    )
    .await;
    assert_problem(
        &verify(&db).await,
        ProblemKind::Reordered,
        target.position,
        "swap",
    );
    db.close().await;
    copy.drop_db().await;

    // 5. The tail cut off, with its seals, after the second-to-last checkpoint.
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    let last_seq = scalar_i64(&db, "SELECT MAX(seq) FROM audit_checkpoints").await;
    let keep = scalar_i64(
        &db,
        &format!(
            "SELECT position FROM audit_checkpoints WHERE seq = {}",
            last_seq - 1
        ),
    )
    .await;
    exec(&db, &format!("DELETE FROM events WHERE position > {keep}")).await;
    exec(
        &db,
        &format!("DELETE FROM event_seals WHERE position > {keep}"),
    )
    .await;
    let report = verify(&db).await;
    assert_problem(&report, ProblemKind::TailTruncated, keep + 1, "truncate");
    let p = report.problem.unwrap();
    assert_eq!(p.checkpoint_seq, Some(last_seq - 1));
    assert!(
        p.message
            .contains(&format!("after checkpoint {}", last_seq - 1)),
        "{}",
        p.message
    );
    db.close().await;
    copy.drop_db().await;

    // 6. A checkpoint edited (its signature no longer matches).
    let copy = Copy::of(&app).await;
    let db = Db::connect(&copy.url).await.unwrap();
    disable_protections(&db).await;
    exec(
        &db,
        "UPDATE audit_checkpoints SET event_count = event_count + 1 WHERE seq = 2",
    )
    .await;
    let report = verify(&db).await;
    let p = report.problem.unwrap();
    assert_eq!(
        (p.kind, p.checkpoint_seq),
        (ProblemKind::CheckpointSignatureInvalid, Some(2))
    );
    db.close().await;
    copy.drop_db().await;

    // 7. A payload that is no longer JSON at all (SQLite stores any text; PostgreSQL's `json`
    // column refuses it): verification names the event, and so does an export, which fails
    // rather than write a file that cannot be read back.
    if backend == Backend::Sqlite {
        let copy = Copy::of(&app).await;
        let db = Db::connect(&copy.url).await.unwrap();
        disable_protections(&db).await;
        exec(
            &db,
            &format!(
                "UPDATE events SET payload = '{{\"TransactionRejected\": ' WHERE position = {}",
                target.position
            ),
        )
        .await;
        let report = verify(&db).await;
        assert_problem(
            &report,
            ProblemKind::Malformed,
            target.position,
            "payload not JSON",
        );
        db.close().await;
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = run(countersign(&copy.url)
            .args(["audit", "export", "--out"])
            .arg(dir.path().join("history.jsonl")));
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("event at position {}", target.position)),
            "{out}"
        );
        copy.drop_db().await;
    }

    // And through the API: an auditor sees the break on the live server.
    let db = Db::connect(&app.store.url).await.unwrap();
    disable_protections(&db).await;
    exec(
        &db,
        &format!("DELETE FROM events WHERE position = {}", target.position),
    )
    .await;
    if backend == Backend::Postgres {
        // Back on, or new events would get no position.
        exec(&db, "ALTER TABLE events ENABLE TRIGGER USER").await;
    }
    db.close().await;
    app.restart().await;
    let auditor = auditor(&app, "audra").await;
    let (status, body) = app.get("/api/audit/verify", &auditor.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false);
    assert_eq!(body["problem"]["kind"], "event_missing");
    assert_eq!(body["problem"]["position"], target.position);
    app.cleanup().await;
}

fn countersign(database_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_countersign"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run countersign");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Register `name` and make them an auditor through the operator command line.
async fn auditor(app: &TestApp, name: &str) -> TestUser {
    let user = app.register(name).await;
    let (ok, out) = run(countersign(&app.store.url).args(["admin", "grant-auditor", name]));
    assert!(ok, "{out}");
    user
}

async fn an_export_verifies_offline_and_one_changed_byte_is_located(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    workload(&app).await;
    let (status, key) = app.get("/api/audit/public_key", &Auth::None).await;
    assert_eq!(status, StatusCode::OK);
    let public_key = key["public_key"].as_str().unwrap().to_owned();
    app.stop().await;
    seal_all(&app).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.jsonl");
    let (ok, out) = run(countersign(&app.store.url)
        .args(["audit", "export", "--out"])
        .arg(&file));
    assert!(ok, "{out}");

    // Offline: no database in the environment at all.
    let offline = |file: &std::path::Path, key: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_countersign"));
        cmd.env_clear()
            .args(["audit", "verify", "--json", "--public-key", key, "--file"])
            .arg(file);
        let out = cmd.output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), report)
    };
    let (ok, report) = offline(&file, &public_key);
    assert!(ok, "{report}");
    assert_eq!(report["ok"], true);
    let db = Db::connect(&app.store.url).await.unwrap();
    let events = scalar_i64(&db, "SELECT COUNT(*) FROM events").await;
    db.close().await;
    assert_eq!(report["events"], events);

    // Another key is not trusted.
    let other = hex::encode([0x11u8; 32]);
    let other = countersign::audit::parse_public_key(&other)
        .map(|k| hex::encode(k.as_bytes()))
        .unwrap_or_else(|_| public_key.replace('a', "b"));
    let (ok, report) = offline(&file, &other);
    assert!(!ok);
    assert_ne!(report["ok"], true);

    // One byte changed inside a payload: the memo of a prepared transaction.
    let text = std::fs::read_to_string(&file).unwrap();
    let at = text.find("test payment").expect("a memo in the export");
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line: Value = serde_json::from_str(text[line_start..].lines().next().unwrap()).unwrap();
    let mut bytes = text.into_bytes();
    bytes[at] = b'T';
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, bytes).unwrap();
    let (ok, report) = offline(&tampered, &public_key);
    assert!(!ok);
    assert_eq!(report["problem"]["kind"], "payload_changed", "{report}");
    assert_eq!(report["problem"]["position"], line["position"]);
    assert_eq!(report["problem"]["aggregate_id"], line["aggregate_id"]);

    // A file cut short is not a valid export.
    let text = std::fs::read_to_string(&file).unwrap();
    let cut: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
    std::fs::write(&tampered, cut).unwrap();
    let (ok, report) = offline(&tampered, &public_key);
    assert!(!ok);
    assert_eq!(report["problem"]["kind"], "malformed", "{report}");
    app.cleanup().await;
}

fn event_types(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_owned())
        .collect()
}

async fn audit_access_auditor_user_and_agent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (alice, _wallet, agent, txs) = workload(&app).await;
    let bob = app.register("bob").await;
    let carol = auditor(&app, "carol").await;

    // Agents: 403 everywhere.
    for path in [
        "/api/audit/events".to_owned(),
        format!("/api/audit/transactions/{}", txs[0]),
        "/api/audit/verify".to_owned(),
    ] {
        let resp = app.get(&path, &agent.auth()).await;
        assert_error(&resp, StatusCode::FORBIDDEN, "forbidden");
    }
    // No credentials: 401; the public key is public.
    let resp = app.get("/api/audit/events", &Auth::None).await;
    assert_eq!(resp.0, StatusCode::UNAUTHORIZED);
    let (status, key) = app.get("/api/audit/public_key", &Auth::None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(key["algorithm"], "Ed25519");
    assert_eq!(key["public_key"].as_str().unwrap().len(), 64);

    // A user: only their own aggregates; no verification; others' transactions are unknown.
    let (status, page) = app.get("/api/audit/events?limit=1000", &alice.auth()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    let types = event_types(&page);
    for t in [
        "UserRegistered",
        "MfaEnabled",
        "WalletCreated",
        "ApiKeyIssued",
        "TransactionPrepared",
        "TransactionRejected",
        "TransactionAuthorized",
    ] {
        assert!(types.contains(&t.to_owned()), "{t} missing from {types:?}");
    }
    assert!(!types.iter().any(|t| t.starts_with("Login")), "{types:?}");
    assert!(events
        .iter()
        .all(|e| e["aggregate_id"] != bob.user_id.as_str()));
    let (_, bobs) = app.get("/api/audit/events", &bob.auth()).await;
    assert!(bobs["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["aggregate_id"] == bob.user_id.as_str()));
    let resp = app
        .get(&format!("/api/audit/transactions/{}", txs[0]), &bob.auth())
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app.get("/api/audit/verify", &alice.auth()).await;
    assert_error(&resp, StatusCode::FORBIDDEN, "auditor_role_required");
    let (status, own) = app
        .get(
            &format!("/api/audit/transactions/{}", txs[0]),
            &alice.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own["derived_state"]["status"], "rejected");
    assert_eq!(own["view_matches"], true);

    // The auditor: everything, including failed logins with their source address and the
    // operator's role grant.
    let (status, page) = app.get("/api/audit/events?limit=1000", &carol.auth()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let all = page["events"].as_array().unwrap();
    assert!(all.len() > events.len());
    assert!(all
        .windows(2)
        .all(|w| w[0]["position"].as_i64() < w[1]["position"].as_i64()));
    let failed = all
        .iter()
        .find(|e| e["event_type"] == "LoginFailed")
        .expect("failed login recorded");
    assert_eq!(failed["aggregate_type"], "SecurityLog");
    assert_eq!(failed["payload"]["LoginFailed"]["username"], "nobody-here");
    assert_eq!(failed["payload"]["LoginFailed"]["user_id"], Value::Null);
    assert_eq!(failed["metadata"]["source_ip"], "127.0.0.1");
    let succeeded = all
        .iter()
        .find(|e| {
            e["event_type"] == "LoginSucceeded"
                && e["payload"]["LoginSucceeded"]["user_id"] == alice.user_id.as_str()
        })
        .expect("successful login recorded");
    assert_eq!(succeeded["metadata"]["actor"], alice.user_id.as_str());
    let granted = all
        .iter()
        .find(|e| e["event_type"] == "RoleGranted")
        .expect("role grant recorded");
    assert_eq!(granted["aggregate_id"], carol.user_id.as_str());
    assert_eq!(granted["payload"]["RoleGranted"]["role"], "auditor");
    assert_eq!(granted["metadata"]["actor_type"], "operator");
    let wallet_created = all
        .iter()
        .find(|e| e["event_type"] == "WalletCreated")
        .unwrap();
    assert_eq!(wallet_created["metadata"]["source_ip"], "127.0.0.1");

    // Filters.
    let (_, page) = app
        .get(
            &format!(
                "/api/audit/events?aggregate_type=Transaction&aggregate_id={}",
                txs[1]
            ),
            &carol.auth(),
        )
        .await;
    assert_eq!(
        event_types(&page),
        ["TransactionPrepared", "TransactionAuthorized"]
    );
    let (_, page) = app
        .get(
            "/api/audit/events?event_type=TransactionRejected",
            &carol.auth(),
        )
        .await;
    assert_eq!(event_types(&page), ["TransactionRejected"]);
    let (_, page) = app
        .get("/api/audit/events?from=2999-01-01T00:00:00Z", &carol.auth())
        .await;
    assert!(page["events"].as_array().unwrap().is_empty());
    let (_, page) = app
        .get(
            "/api/audit/events?from=2000-01-01T00:00:00Z&to=2999-01-01T00:00:00Z&limit=1000",
            &carol.auth(),
        )
        .await;
    assert_eq!(page["events"].as_array().unwrap().len(), all.len());
    let resp = app
        .get("/api/audit/events?from=yesterday", &carol.auth())
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    let resp = app.get("/api/audit/events?limit=0", &carol.auth()).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");

    // Any transaction, re-derived from its events.
    let (status, audit) = app
        .get(
            &format!("/api/audit/transactions/{}", txs[1]),
            &carol.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    assert_eq!(audit["derived_state"]["status"], "authorized");
    assert_eq!(audit["view"]["status"], "authorized");
    assert_eq!(audit["view_matches"], true);
    assert_eq!(audit["events"].as_array().unwrap().len(), 2);

    // Verification (once the sealer has caught up with the auditor's own events).
    let mut report = Value::Null;
    for _ in 0..50 {
        let (status, body) = app.get("/api/audit/verify", &carol.auth()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        report = body;
        if report["unsealed_events"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["unsealed_events"], 0, "{report}");
    assert_eq!(report["public_key"], key);

    // Auditors act on wallets like anyone else: not on others'.
    let resp = app
        .post(
            "/api/reject_transaction",
            &carol.auth(),
            json!({"transaction_id": txs[2]}),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");

    // Revoked: back to a regular user.
    let (ok, out) = run(countersign(&app.store.url).args(["admin", "revoke-auditor", "carol"]));
    assert!(ok, "{out}");
    let resp = app.get("/api/audit/verify", &carol.auth()).await;
    assert_error(&resp, StatusCode::FORBIDDEN, "auditor_role_required");
    let (ok, out) = run(countersign(&app.store.url).args(["admin", "revoke-auditor", "carol"]));
    assert!(!ok && out.contains("does not have the role"), "{out}");
    let (ok, out) = run(countersign(&app.store.url).args(["admin", "grant-auditor", "nobody"]));
    assert!(!ok && out.contains("no user named"), "{out}");
    let (_, me) = app.get("/api/me", &carol.auth()).await;
    assert_eq!(me["roles"], json!([]));
    app.cleanup().await;
}

async fn paging_through_events_while_writers_run_never_skips_or_repeats(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend).await);
    let (_user, wallet, agent) = app.user_with_wallet("paula", 0).await;
    let carol = auditor(&app, "carol").await;
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (app, wallet, key) = (app.clone(), wallet.clone(), agent.key.clone());
            tokio::spawn(async move {
                let agent = Agent {
                    id: String::new(),
                    key,
                };
                for i in 0..10u128 {
                    app.prepare(
                        &agent,
                        native_body(&wallet, &random_address(), w * 100 + i + 1),
                    )
                    .await;
                }
            })
        })
        .collect();
    let pager = {
        let (app, done, auth) = (app.clone(), done.clone(), carol.auth());
        tokio::spawn(async move {
            let (mut after, mut seen) = (0i64, Vec::<i64>::new());
            loop {
                let finished = done.load(Ordering::SeqCst);
                let (status, page) = app
                    .get(&format!("/api/audit/events?after={after}&limit=7"), &auth)
                    .await;
                assert_eq!(status, StatusCode::OK, "{page}");
                let events = page["events"].as_array().unwrap();
                seen.extend(events.iter().map(|e| e["position"].as_i64().unwrap()));
                after = page["next_after"].as_i64().unwrap();
                if events.is_empty() && finished {
                    return seen;
                }
            }
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = pager.await.unwrap();
    let db = Db::connect(&app.store.url).await.unwrap();
    let all: Vec<i64> = db
        .events_after(0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    db.close().await;
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "repeated or out of order"
    );
    assert_eq!(seen, all, "skipped events");
    Arc::try_unwrap(app)
        .ok()
        .expect("no other owners")
        .cleanup()
        .await;
}

type ViewRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    String,
    Option<String>,
);

async fn views_snapshot(db: &Db) -> Vec<ViewRow> {
    let sql = "SELECT kind, id, owner_user_id, wallet_address, api_key_id, status, \
               created_position, position, CAST(payload AS text), due_at FROM views \
               ORDER BY kind, id";
    let rows: Vec<ViewRow> = match db {
        Db::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
        Db::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
    };
    // Compare documents as JSON values (text form differs between backends' renderings).
    rows.into_iter()
        .map(|mut r| {
            let v: Value = serde_json::from_str(&r.8).unwrap();
            r.8 = v.to_string();
            r
        })
        .collect()
}

/// The table's shape (columns, indexes, constraints) and its generated deadlines: what a
/// rebuild must leave as it found it, besides the documents.
async fn views_shape(db: &Db) -> Vec<String> {
    match db {
        Db::Postgres(p) => sqlx::query_scalar(
            "SELECT column_name || ' ' || data_type || ' ' || is_nullable || ' ' || \
                    is_generated || ' ' || coalesce(generation_expression, '') \
             FROM information_schema.columns WHERE table_name = 'views' \
             UNION ALL SELECT indexdef FROM pg_indexes WHERE tablename = 'views' \
             UNION ALL SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
                       WHERE conrelid = 'views'::regclass \
             UNION ALL SELECT 'due ' || id || ' ' || coalesce(due_at, '-') || ' document ' || \
                              (payload::json ->> 'expires_at') FROM views \
                       WHERE kind = 'transaction' AND status = 'pending_authorization' \
             UNION ALL SELECT 'stray due ' || id FROM views WHERE due_at IS NOT NULL \
                       AND NOT (kind = 'transaction' AND status = 'pending_authorization') \
             UNION ALL SELECT 'table ' || tablename FROM pg_tables WHERE tablename LIKE 'views%' \
             ORDER BY 1",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        Db::Sqlite(p) => sqlx::query_scalar(
            "SELECT coalesce(sql, name) FROM sqlite_master WHERE tbl_name LIKE 'views%' \
             UNION ALL SELECT 'due ' || id || ' ' || coalesce(due_at, '-') || ' document ' || \
                              json_extract(payload, '$.expires_at') FROM views \
                       WHERE kind = 'transaction' AND status = 'pending_authorization' \
             UNION ALL SELECT 'stray due ' || id FROM views WHERE due_at IS NOT NULL \
                       AND NOT (kind = 'transaction' AND status = 'pending_authorization') \
             ORDER BY 1",
        )
        .fetch_all(p)
        .await
        .unwrap(),
    }
}

async fn rebuilt_views_equal_the_live_ones(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, _wallet, agent, _txs) = workload(&app).await;
    let second = app.issue_api_key(&mut user, "second", None).await;
    let resp = app
        .delete(&format!("/api/api_keys/{}", second.id), &user.auth())
        .await;
    assert_eq!(resp.0, StatusCode::NO_CONTENT);
    let _ = auditor(&app, "carol").await;
    let _ = agent;

    let db = Db::connect(&app.store.url).await.unwrap();
    let projector = Projector::new(db.clone());
    projector.catch_up().await.unwrap();
    let live = views_snapshot(&db).await;
    let shape = views_shape(&db).await;
    assert!(
        shape.iter().any(|s| s.contains("views_due_idx")),
        "{shape:?}"
    );
    // Each waiting prompt's deadline column is its document's, and nothing else has one.
    let due: Vec<&String> = shape.iter().filter(|s| s.starts_with("due ")).collect();
    assert_eq!(due.len(), 3, "{shape:?}");
    for row in due {
        let parts: Vec<&str> = row.split(' ').collect();
        assert_eq!(parts.len(), 5, "{row}");
        assert_eq!(parts[2], parts[4], "{row}");
    }
    assert!(
        !shape.iter().any(|s| s.starts_with("stray due ")),
        "{shape:?}"
    );
    assert!(live.iter().any(|r| r.0 == "transaction"));
    assert!(live
        .iter()
        .any(|r| r.0 == "api_key" && r.5.as_deref() == Some("revoked")));
    assert!(live
        .iter()
        .any(|r| r.0 == "user" && r.8.contains("auditor")));

    // While the server runs: everything, then twice more (idempotent), then one view.
    let stats = projector.rebuild(None).await.unwrap();
    assert!(stats.events > 0);
    assert_eq!(views_snapshot(&db).await, live);
    projector.rebuild(None).await.unwrap();
    assert_eq!(views_snapshot(&db).await, live);
    // Memory bounded to a document or two: the rest are written out early and read back
    // when a later event touches them, with the same result.
    for (only, bound) in [(None, 2), (Some(ViewKind::Transaction), 1)] {
        let stats = projector.rebuild_bounded(only, bound).await.unwrap();
        assert!(
            stats.reloaded > 0,
            "{only:?} {bound}: nothing was read back"
        );
        assert_eq!(views_snapshot(&db).await, live, "{only:?} {bound}");
    }
    let (ok, out) =
        run(countersign(&app.store.url).args(["projections", "rebuild", "--view", "transaction"]));
    assert!(ok, "{out}");
    assert_eq!(views_snapshot(&db).await, live);
    let (ok, out) =
        run(countersign(&app.store.url).args(["projections", "rebuild", "--view", "nope"]));
    assert!(!ok && out.contains("unknown view"), "{out}");

    // A view that went wrong is repaired.
    exec(&db, "DELETE FROM views WHERE kind = 'wallet'").await;
    exec(
        &db,
        "UPDATE views SET status = 'confirmed' WHERE kind = 'transaction'",
    )
    .await;
    projector.rebuild(None).await.unwrap();
    assert_eq!(views_snapshot(&db).await, live);
    assert_eq!(views_shape(&db).await, shape);

    // An event after a settled one (the aggregate never writes it, but the log is the truth):
    // a rebuild has already sent the settled document to the database when it arrives, and
    // must fold it in all the same, exactly as the live projector does.
    let rejected = live
        .iter()
        .find(|r| r.0 == "transaction" && r.5.as_deref() == Some("rejected"))
        .expect("the workload rejects a transaction")
        .1
        .clone();
    let next = scalar_i64(
        &db,
        &format!("SELECT MAX(sequence) + 1 FROM events WHERE aggregate_id = '{rejected}'"),
    )
    .await;
    exec(
        &db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('Transaction', '{rejected}', {next}, 'TransactionFailed', '1.0', \
             '{{\"TransactionFailed\":{{\"reason\":\"late\",\"block_number\":7,\"failed_at\":\"2026-01-01T00:00:00Z\"}}}}', \
             '{{\"actor\":\"test\",\"actor_type\":\"system\"}}')"
        ),
    )
    .await;
    projector.catch_up().await.unwrap();
    let late = views_snapshot(&db).await;
    assert!(late
        .iter()
        .any(|r| r.1 == rejected && r.5.as_deref() == Some("failed")));
    let stats = projector.rebuild(None).await.unwrap();
    assert_eq!(views_snapshot(&db).await, late);
    if backend == Backend::Postgres {
        // Read back once the staging table's COPY was closed.
        assert_eq!(stats.reloaded, 1);
    }
    projector
        .rebuild(Some(ViewKind::Transaction))
        .await
        .unwrap();
    assert_eq!(views_snapshot(&db).await, late);
    // The API still serves.
    let (status, _) = app.get("/api/transactions", &user.auth()).await;
    assert_eq!(status, StatusCode::OK);

    // An event that cannot be folded, last in the log (so most documents are already on
    // their way to the database when it is read): the rebuild fails, promptly, naming it,
    // and leaves the views as they were.
    exec(
        &db,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Transaction', 'broken', 1, 'TransactionPrepared', '1.0', \
         '{\"TransactionPrepared\":5}', '{\"actor\":\"test\",\"actor_type\":\"system\"}')",
    )
    .await;
    let failed = tokio::time::timeout(std::time::Duration::from_secs(30), projector.rebuild(None))
        .await
        .expect("a failing rebuild returns instead of hanging");
    let err = failed
        .expect_err("an undecodable event fails the rebuild")
        .to_string();
    assert!(err.contains("TransactionPrepared"), "{err}");
    assert_eq!(views_snapshot(&db).await, late);
    assert_eq!(views_shape(&db).await, shape);
    db.close().await;
    app.cleanup().await;
}

async fn an_old_version_event_is_upcast_on_load(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let db = Db::connect(&app.store.url).await.unwrap();
    // A user registered before `UserRegistered` 1.1: the old shape, stored as it was.
    let user_id = uuid::Uuid::new_v4().to_string();
    let hash = countersign::crypto::hash_password(secrecy::SecretString::from(PASSWORD.to_owned()))
        .await
        .unwrap();
    assert!(db
        .insert_user_credentials(&user_id, "Olivia", &hash)
        .await
        .unwrap());
    let insert = format!(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('User', '{user_id}', 1, 'UserRegistered', '1.0', \
         '{{\"UserRegistered\":{{\"user_id\":\"{user_id}\",\"username\":\"Olivia\",\"registered_at\":\"2025-06-01T00:00:00Z\"}}}}', \
         '{{\"actor\":\"{user_id}\",\"actor_type\":\"user\"}}')"
    );
    exec(&db, &insert).await;
    db.close().await;

    // The projector folds it into a view; the aggregate loads it through cqrs-es (MFA setup
    // replays the user's events).
    let (status, body) = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": "olivia", "password": PASSWORD}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let olivia = Auth::Bearer(body["access_token"].as_str().unwrap().to_owned());
    let (status, me) = app.get("/api/me", &olivia).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["username"], "Olivia");
    let (status, body) = app
        .post("/api/setup_mfa", &olivia, json!({"password": PASSWORD}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, me) = app.get("/api/me", &olivia).await;
    assert_eq!(me["mfa_pending"], true);

    // A rebuild upcasts it too: the views it makes equal the live ones.
    let db = Db::connect(&app.store.url).await.unwrap();
    let projector = Projector::new(db.clone());
    projector.catch_up().await.unwrap();
    let live = views_snapshot(&db).await;
    assert!(
        live.iter().any(|r| r.0 == "user" && r.1 == user_id),
        "{live:?}"
    );
    projector.rebuild(None).await.unwrap();
    assert_eq!(views_snapshot(&db).await, live);

    // The stored bytes are untouched, and they seal and verify as stored.
    seal_all(&app).await;
    let first = &db.events_of("User", &user_id).await.unwrap()[0];
    assert_eq!(first.event_version, "1.0");
    assert!(first.payload["UserRegistered"]
        .get("username_key")
        .is_none());
    let report = verify(&db).await;
    assert!(report.ok, "{:?}", report.problem);
    db.close().await;
    app.cleanup().await;
}

async fn next_ws_json(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    use futures::StreamExt;
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("socket open")
            .expect("socket message");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

async fn an_auditor_socket_receives_every_event(backend: Backend) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn(backend).await;
    let (alice, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let earlier = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    let carol = auditor(&app, "carol").await;
    let url = format!("{}/api/ws?after=0", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", carol.token).parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    // Replay: everything, not only transactions — someone else's registration, wallet, key,
    // login and transaction.
    let mut replayed = Vec::new();
    loop {
        let message = next_ws_json(&mut socket).await;
        if message["type"] == "caught_up" {
            break;
        }
        assert_eq!(message["type"], "event", "{message}");
        replayed.push(message);
    }
    for (aggregate_type, aggregate_id) in [
        ("User", alice.user_id.as_str()),
        ("Wallet", wallet.as_str()),
        ("ApiKey", agent.id.as_str()),
    ] {
        assert!(
            replayed
                .iter()
                .any(|m| m["aggregate_type"] == aggregate_type && m["aggregate_id"] == aggregate_id),
            "no {aggregate_type} event of {aggregate_id} in {replayed:?}"
        );
    }
    assert!(replayed.iter().any(|m| m["event_type"] == "LoginSucceeded"));
    assert!(replayed
        .iter()
        .any(|m| m["transaction_id"] == earlier.as_str()));
    let positions: Vec<i64> = replayed
        .iter()
        .map(|m| m["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in commit order");
    // Live: a security event (a failed login) and the next transaction.
    let (status, _) = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": "alice", "password": "not the password at all"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let later = app
        .prepare(&agent, native_body(&wallet, &random_address(), 2))
        .await;
    let mut live = Vec::new();
    while !live
        .iter()
        .any(|m: &Value| m["transaction_id"] == later.as_str())
    {
        live.push(next_ws_json(&mut socket).await);
    }
    assert!(
        live.iter().any(|m| m["event_type"] == "LoginFailed"),
        "{live:?}"
    );
    app.cleanup().await;
}
