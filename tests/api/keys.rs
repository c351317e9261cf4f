//! Key hygiene: master-key rotation without downtime (through the real `countersign keys`
//! command, while a server keeps serving), and no secret in a full flow's trace-level log.

use std::process::Stdio;
use std::time::{Duration, Instant};

use countersign::crypto::{MasterKey, Purpose};
use countersign::store::Db;
use countersign::Application;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    rotation_keeps_serving_and_leaves_only_the_new_key_needed,
    no_secret_reaches_a_trace_level_log,
);

const ETH: u128 = 1_000_000_000_000_000_000;

/// A server in this process with a given master key (and previous keys), on the test's store
/// and chain; `app.address` is pointed at it so the helpers talk to it.
struct Node {
    shutdown: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(app: &mut TestApp, master_key: MasterKey) -> Result<Self, String> {
        let mut config = app.config();
        config.master_key = master_key;
        let server = Application::build(config)
            .await
            .map_err(|e| format!("{e:#}"))?;
        app.address = format!("http://127.0.0.1:{}", server.port());
        let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .run_until(async {
                    let _ = rx.await;
                })
                .await
                .expect("server runs");
        });
        Ok(Self { shutdown, handle })
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.handle.await;
    }
}

fn key(b64: &str) -> MasterKey {
    MasterKey::from_base64(b64).unwrap()
}

/// The `countersign` binary on the test's database with exactly these master keys.
fn countersign(app: &TestApp, current: &str, previous: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
    let dir = std::env::temp_dir();
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .env("DATABASE_URL", &app.store.url)
        .env("COUNTERSIGN_MASTER_KEY", current)
        .env("COUNTERSIGN_PREVIOUS_MASTER_KEYS", previous.join(","))
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Run a `keys` subcommand with `--json`; returns (exit success, report).
async fn keys_cmd(app: &TestApp, current: &str, previous: &[&str], args: &[&str]) -> (bool, Value) {
    let out = countersign(app, current, previous)
        .arg("keys")
        .args(args)
        .arg("--json")
        .output()
        .await
        .expect("run countersign keys");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "keys {args:?}: not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// `{table: {key_id_or_"unrecorded": count}}` from a `keys status` report.
fn counts(status: &Value) -> Value {
    let mut by_table = json!({});
    for c in status["counts"].as_array().unwrap() {
        let id = c["key_id"].as_str().unwrap_or("unrecorded").to_owned();
        by_table[c["table"].as_str().unwrap()][id] = c["count"].clone();
    }
    by_table
}

/// Authorize a prepared transfer (the owner's TOTP secret opens) and execute it (the wallet
/// key opens and signs), then wait for the receipt.
async fn countersigned_transfer(app: &TestApp, user: &mut TestUser, wallet: &str, agent: &Agent) {
    let tx = app
        .prepare(agent, native_body(wallet, &random_address(), 1_000))
        .await;
    let (status, body) = app.authorize(user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
}

async fn sql(db: &Db, query: &str, binds: &[&[u8]]) -> u64 {
    match db {
        Db::Postgres(pool) => {
            let mut q = sqlx::query(query);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(pool).await.unwrap().rows_affected()
        }
        Db::Sqlite(pool) => {
            let mut q = sqlx::query(query);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(pool).await.unwrap().rows_affected()
        }
    }
}

/// `count` TOTP secrets of a made-up user sealed under `key`, in one transaction.
async fn insert_bulk_mfa_secrets(db: &Db, key: &MasterKey, count: u64) {
    let rows: Vec<(String, Vec<u8>)> = (0..count)
        .map(|_| {
            let secret_id = uuid::Uuid::new_v4().to_string();
            let secret: [u8; 20] = rand::random();
            let sealed = key.seal(Purpose::TotpSecret, &["bulk-user", &secret_id], &secret);
            (secret_id, sealed)
        })
        .collect();
    let insert =
        "INSERT INTO mfa_secrets (secret_id, user_id, sealed) VALUES ($1, 'bulk-user', $2)";
    match db {
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            for (id, sealed) in &rows {
                sqlx::query(insert)
                    .bind(id)
                    .bind(sealed)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await.unwrap();
            for (id, sealed) in &rows {
                sqlx::query(insert)
                    .bind(id)
                    .bind(sealed)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
}

/// `(payload, metadata)` of every event of a type, as JSON.
async fn events_of_type(db: &Db, event_type: &str) -> Vec<(Value, Value)> {
    let rows: Vec<(String, String)> = match db {
        Db::Postgres(pool) => {
            sqlx::query_as("SELECT payload::text, metadata::text FROM events WHERE event_type = $1")
                .bind(event_type)
                .fetch_all(pool)
                .await
                .unwrap()
        }
        Db::Sqlite(pool) => {
            sqlx::query_as("SELECT payload, metadata FROM events WHERE event_type = $1")
                .bind(event_type)
                .fetch_all(pool)
                .await
                .unwrap()
        }
    };
    rows.into_iter()
        .map(|(p, m)| {
            (
                serde_json::from_str(&p).unwrap(),
                serde_json::from_str(&m).unwrap(),
            )
        })
        .collect()
}

/// Rotation end to end: secrets sealed under the old key (one in the version-1 format, without
/// a key id) are rewrapped by `countersign keys rotate` while a server holding both keys keeps
/// serving; afterwards a server with only the new key signs and verifies MFA, and a server
/// with only the old key refuses to start with a clear error.
async fn rotation_keeps_serving_and_leaves_only_the_new_key_needed(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let old = app.config().master_key.to_base64().as_str().to_owned();
    let new = MasterKey::generate().to_base64().as_str().to_owned();
    let (old_id, new_id) = (
        key(&old).key_id().to_string(),
        key(&new).key_id().to_string(),
    );

    // Secrets under the old key: three users with MFA, a wallet and an agent each. (Each then
    // countersigns once, at a different stage, so no one waits for a fresh TOTP step.)
    let (mut alice, alice_wallet, alice_agent) = app.user_with_wallet("alice", ETH).await;
    let (mut bob, bob_wallet, bob_agent) = app.user_with_wallet("bob", ETH).await;
    let (mut carol, carol_wallet, carol_agent) = app.user_with_wallet("carol", ETH).await;
    let db = Db::connect(&app.store.url).await.unwrap();
    // Bob's wallet key as the version-1 code wrote it: same envelope, no key id.
    let (_, sealed) = db.wallet_key(&bob_wallet).await.unwrap().unwrap();
    let legacy: Vec<u8> = std::iter::once(1u8)
        .chain(sealed[9..].iter().copied())
        .collect();
    let changed = sql(
        &db,
        "UPDATE wallet_keys SET sealed = $1 WHERE sealed = $2",
        &[&legacy, &sealed],
    )
    .await;
    assert_eq!(changed, 1);
    // Enough further sealed secrets that the rotation, one row per transaction, runs for a
    // while: the server is used during it.
    let bulk = 1000;
    insert_bulk_mfa_secrets(&db, &key(&old), bulk).await;

    let (ok, status) = keys_cmd(&app, &old, &[], &["status"]).await;
    assert!(!ok, "one secret has no key id yet: {status}");
    let before = counts(&status);
    assert_eq!(before["wallet_keys"]["unrecorded"], 1, "{before}");
    assert_eq!(before["wallet_keys"][&old_id], 2, "{before}");
    assert_eq!(before["mfa_secrets"][&old_id], 3 + bulk, "{before}");
    assert_eq!(before["audit_signing_keys"][&old_id], 1, "{before}");
    let total = 3 + (3 + bulk) + 1;

    // Rotating without the old key among the previous ones changes nothing, and says why.
    let (ok, report) = keys_cmd(&app, &new, &[], &["rotate"]).await;
    assert!(!ok, "{report}");
    assert_eq!(report["rewrapped"], 0, "{report}");
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len() as u64, total, "{report}");
    assert!(
        failures
            .iter()
            .any(|f| f["error"].as_str().unwrap().contains(&format!(
                "master key {old_id}, which this process does not have"
            ))),
        "{report}"
    );
    let (_, unchanged) = keys_cmd(&app, &old, &[], &["status"]).await;
    assert_eq!(counts(&unchanged), before);
    // The refused run is recorded too: an operator tried, and nothing moved.
    let mut refused = events_of_type(&db, "MasterKeyRotated").await;
    assert_eq!(refused.len(), 1);
    let (payload, _) = refused.remove(0);
    assert_eq!(payload["MasterKeyRotated"]["rewrapped"], 0);
    assert_eq!(payload["MasterKeyRotated"]["failed"], total);

    // Step 2: the node restarts with the new key current and the old one previous.
    app.stop().await;
    let node = Node::start(&mut app, key(&new).with_previous([key(&old)]))
        .await
        .expect("starts with both keys");

    // A dry run says what would move and moves nothing.
    let (ok, dry) = keys_cmd(&app, &new, &[&old], &["rotate", "--dry-run"]).await;
    assert!(ok, "{dry}");
    assert_eq!(dry["rewrapped"], total, "{dry}");
    let (_, still) = keys_cmd(&app, &new, &[&old], &["status"]).await;
    assert_eq!(counts(&still), before);

    // A sealed secret copied to a row of another owner is not laundered by a rotation: it is
    // reported (by row id) and left alone, while every other secret is rewrapped.
    let (alice_owner, alice_sealed) = db.wallet_key(&alice_wallet).await.unwrap().unwrap();
    let planted = random_address();
    db.insert_wallet_key(&planted, &alice_owner, &alice_sealed)
        .await
        .unwrap();
    let (ok, dry) = keys_cmd(&app, &new, &[&old], &["rotate", "--dry-run"]).await;
    assert!(!ok, "{dry}");
    assert_eq!(dry["rewrapped"], total, "{dry}");
    assert_eq!(dry["failures"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(dry["failures"][0]["table"], "wallet_keys");
    assert_eq!(dry["failures"][0]["id"], planted.as_str());
    assert!(
        dry["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("failed authentication"),
        "{dry}"
    );
    let removed = match &db {
        Db::Postgres(pool) => sqlx::query("DELETE FROM wallet_keys WHERE wallet_address = $1")
            .bind(&planted)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected(),
        Db::Sqlite(pool) => sqlx::query("DELETE FROM wallet_keys WHERE wallet_address = $1")
            .bind(&planted)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected(),
    };
    assert_eq!(removed, 1);

    // Step 3: two rotations at once, one row per transaction, while the server serves.
    let rotate = |app: &TestApp| {
        countersign(app, &new, &[&old])
            .args(["keys", "rotate", "--batch-size", "1", "--json"])
            .output()
    };
    let (first, second) = (rotate(&app), rotate(&app));
    let rotations = tokio::spawn(async move { tokio::join!(first, second) });
    let started = Instant::now();
    // Meanwhile an owner countersigns and an agent executes (a TOTP secret and a wallet key
    // open, whichever side of the rotation they are on), and reads keep flowing.
    let tx = app
        .prepare(
            &carol_agent,
            native_body(&carol_wallet, &random_address(), 1_000),
        )
        .await;
    let (status, body) = app.authorize(&mut carol, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &carol_agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let countersigned_in = started.elapsed();
    assert!(
        !rotations.is_finished(),
        "the rotation ended before the transfer did ({countersigned_in:?}): nothing overlapped"
    );
    let mut served = 0;
    while !rotations.is_finished() {
        let (status, body) = app.get("/api/me", &alice.auth()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = app.get("/api/wallets", &bob_agent.auth()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        served += 2;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first, second) = rotations.await.unwrap();
    let rotated = started.elapsed();
    app.wait_for_status(&carol_agent.auth(), &tx, "confirmed")
        .await;
    let mut rewrapped = 0;
    let mut runs_that_moved = 0;
    for out in [first.unwrap(), second.unwrap()] {
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        });
        assert!(out.status.success(), "{report}");
        assert_eq!(report["failures"], json!([]), "{report}");
        assert_eq!(report["conflicts"], 0, "{report}");
        rewrapped += report["rewrapped"].as_u64().unwrap();
        runs_that_moved += usize::from(report["rewrapped"] != 0);
        // Each secret is accounted for once: found current (maybe rewrapped by the other run
        // meanwhile), or rewrapped by this one.
        for t in report["tables"].as_array().unwrap() {
            let sum = t["already_current"].as_u64().unwrap() + t["rewrapped"].as_u64().unwrap();
            assert_eq!(sum, t["scanned"].as_u64().unwrap(), "{report}");
        }
    }
    // Compare-and-swap: every secret was rewrapped exactly once between the two.
    assert_eq!(rewrapped, total);
    assert!(served > 0, "no read ran during the rotation ({rotated:?})");
    // The agent and the owner keep working on the same node, against rewrapped secrets.
    countersigned_transfer(&app, &mut alice, &alice_wallet, &alice_agent).await;

    // Idempotent: nothing left to do, and everything is under the new key.
    let (ok, again) = keys_cmd(&app, &new, &[&old], &["rotate"]).await;
    assert!(ok, "{again}");
    assert_eq!(again["rewrapped"], 0, "{again}");
    let (ok, status) = keys_cmd(&app, &new, &[], &["status"]).await;
    assert!(ok, "{status}");
    assert_eq!(
        counts(&status),
        json!({"wallet_keys": {&new_id: 3}, "mfa_secrets": {&new_id: 3 + bulk},
               "audit_signing_keys": {&new_id: 1}})
    );
    // Only the rewrapped data key changed: the secret's ciphertext is the one sealed before.
    let (_, rewrapped_bob) = db.wallet_key(&bob_wallet).await.unwrap().unwrap();
    assert_eq!(rewrapped_bob[1 + 8 + 24 + 48..], legacy[1 + 24 + 48..]);

    // The rotations are security events by the operator, with key ids only.
    let events = events_of_type(&db, "MasterKeyRotated").await;
    // The refused run, and each run that moved secrets (an idempotent re-run records nothing).
    assert_eq!(events.len(), 1 + runs_that_moved);
    let moved: Vec<&(Value, Value)> = events
        .iter()
        .filter(|(p, _)| p["MasterKeyRotated"]["rewrapped"] != 0)
        .collect();
    let moved_total: u64 = moved
        .iter()
        .map(|(p, _)| p["MasterKeyRotated"]["rewrapped"].as_u64().unwrap())
        .sum();
    assert_eq!(moved_total, total);
    for (payload, metadata) in &moved {
        let e = &payload["MasterKeyRotated"];
        assert_eq!(e["to_key_id"], new_id.as_str());
        assert_eq!(e["failed"], 0);
        let from = e["from_key_ids"].as_array().unwrap();
        assert!(
            from.iter()
                .all(|id| id == old_id.as_str() || id == "unrecorded"),
            "{e}"
        );
        assert_eq!(metadata["actor_type"], "operator", "{metadata}");
        assert!(!e.to_string().contains(&old) && !e.to_string().contains(&new));
    }
    node.stop().await;

    // Step 4: the old key is gone from the configuration. The new key alone signs (bob's
    // wallet key was the version-1 blob) and verifies MFA codes.
    let node = Node::start(&mut app, key(&new))
        .await
        .expect("starts with the new key alone");
    countersigned_transfer(&app, &mut bob, &bob_wallet, &bob_agent).await;
    node.stop().await;

    // A node still configured with only the old key refuses to start, saying which key it lacks.
    let err = match Node::start(&mut app, key(&old)).await {
        Ok(node) => {
            node.stop().await;
            panic!("a node with only the old key started");
        }
        Err(e) => e,
    };
    assert!(err.contains(&new_id) && err.contains(&old_id), "{err}");
    assert!(err.contains("COUNTERSIGN_PREVIOUS_MASTER_KEYS"), "{err}");
    // The same through the binary: an error exit with the reason, not a panic.
    let out = countersign(&app, &old, &[])
        .arg("serve")
        .env("JWT_SECRET_KEY", app.jwt_secret())
        .env("WEB3_PROVIDER_URI", &app.anvil.url)
        .env("COUNTERSIGN_ADDR", "127.0.0.1:0")
        .output()
        .await
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{output}");
    assert_eq!(out.status.code(), Some(1), "{output}");
    assert!(output.contains(&format!("master key {new_id}")), "{output}");
    assert!(!output.contains("panicked"), "{output}");

    db.close().await;
    app.cleanup().await;
}

/// Stops the server process when the test ends, however it ends.
struct Process(tokio::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The real binary at `RUST_LOG=trace` through a whole flow: register, login, MFA, wallet,
/// API key, prepare, authorize, execute, password change, logout. Then every secret the test
/// knows is looked for in everything the process wrote.
async fn no_secret_reaches_a_trace_level_log(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    // The store and chain stay; the server now runs as a separate process.
    app.stop().await;
    let master_b64 = app.config().master_key.to_base64().as_str().to_owned();
    let jwt_secret = app.jwt_secret().to_owned();
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = countersign(&app, &master_b64, &[]);
    cmd.arg("serve")
        .env("RUST_LOG", "trace")
        .env("JWT_SECRET_KEY", &jwt_secret)
        .env("WEB3_PROVIDER_URI", &app.anvil.url)
        .env("COUNTERSIGN_ADDR", "127.0.0.1:0")
        .env("COUNTERSIGN_POLL_INTERVAL_MS", "100")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _server = Process(cmd.spawn().expect("spawn countersign serve"));
    let deadline = Instant::now() + Duration::from_secs(60);
    app.address = loop {
        let text = strip_ansi(&std::fs::read_to_string(&log_path).unwrap_or_default());
        let addr = text
            .lines()
            .filter(|l| l.contains("countersign listening"))
            .find_map(|l| l.split("addr=").nth(1))
            .and_then(|rest| rest.split_whitespace().next().map(str::to_owned));
        if let Some(addr) = addr {
            break format!("http://{addr}");
        }
        assert!(Instant::now() < deadline, "server did not start:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let step_before = current_step();
    let mut user = app.register("trace-alice").await;
    let mut tokens = vec![user.token.clone()];
    let totp_secret = app.enroll_mfa(&mut user).await;
    let wallet = app.create_wallet(&user).await;
    app.anvil.fund(&wallet, ETH).await;
    let agent = app.issue_api_key(&mut user, "trace-agent", None).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, RECIPIENT, 12_345))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.wait_for_status(&agent.auth(), &tx, "confirmed").await;

    // A password change (with an MFA code) hands out a new token; logout ends it.
    let new_password = format!("a new and longer passphrase {}", uuid::Uuid::new_v4());
    let code = user.fresh_code().await;
    let (status, body) = app
        .post(
            "/api/change_password",
            &user.auth(),
            json!({"current_password": PASSWORD, "new_password": new_password, "mfa_code": code}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    user.token = body["access_token"].as_str().unwrap().to_owned();
    tokens.push(user.token.clone());
    let (status, body) = app.post("/api/logout", &user.auth(), json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": "trace-alice", "password": new_password}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokens.push(body["access_token"].as_str().unwrap().to_owned());
    let step_after = current_step();

    // The secrets. The wallet's private key never leaves the server: open it from the
    // database with the master key, and check it is the key of that wallet.
    let db = Db::connect(&app.store.url).await.unwrap();
    let master = key(&master_b64);
    let (owner, sealed) = db.wallet_key(&wallet).await.unwrap().unwrap();
    let private_key = master
        .open(Purpose::WalletKey, &[&wallet, &owner], &sealed)
        .unwrap();
    let signer = alloy::signers::local::PrivateKeySigner::from_slice(&private_key).unwrap();
    assert_eq!(signer.address().to_checksum(None), wallet);
    let audit_key = countersign::audit::sealer::stored_keys(&db)
        .await
        .unwrap()
        .remove(0);
    let audit_private = audit_key
        .with_signing_key(&master, |k| k.to_bytes())
        .unwrap();
    let totp_bytes = decode_base32(&totp_secret);
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let debug_bytes = |b: &[u8]| format!("{:?}", &b[..8]).trim_end_matches(']').to_owned();
    let mut secrets: Vec<(String, String)> = vec![
        ("password".into(), PASSWORD.into()),
        ("new password".into(), new_password.clone()),
        ("API key".into(), agent.key.clone()),
        ("TOTP secret (base32)".into(), totp_secret.clone()),
        ("TOTP secret (hex)".into(), hex::encode(&totp_bytes)),
        ("TOTP secret (bytes)".into(), debug_bytes(&totp_bytes)),
        (
            "wallet key (hex)".into(),
            hex::encode(private_key.as_slice()),
        ),
        (
            "wallet key (HEX)".into(),
            hex::encode_upper(private_key.as_slice()),
        ),
        ("wallet key (base64)".into(), b64(&private_key)),
        ("wallet key (bytes)".into(), debug_bytes(&private_key)),
        ("audit key (hex)".into(), hex::encode(audit_private)),
        ("audit key (bytes)".into(), debug_bytes(&audit_private)),
        ("master key".into(), master_b64.clone()),
        (
            "master key (hex)".into(),
            hex::encode(decode_b64(&master_b64)),
        ),
        ("JWT secret".into(), jwt_secret.clone()),
    ];
    for (i, token) in tokens.iter().enumerate() {
        secrets.push((format!("JWT {i}"), token.clone()));
        // The signature alone is enough to forge nothing, but it is still the token's secret
        // part: no log line may carry it.
        let signature = token.rsplit('.').next().unwrap().to_owned();
        secrets.push((format!("JWT {i} signature"), signature));
    }
    // Every code the user could have sent, quoted as in a body or a Debug print, or as a field.
    for step in step_before.saturating_sub(1)..=step_after + 1 {
        let code = totp_code(&totp_secret, step);
        secrets.push((format!("TOTP code (step {step})"), format!("\"{code}\"")));
        secrets.push((format!("TOTP code (step {step})"), format!("code={code}")));
    }

    // Give the workers (receipts, sealer) a moment to log too, then read everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = strip_ansi(&String::from_utf8_lossy(&std::fs::read(&log_path).unwrap()));

    // The log is real: trace-level lines from the chain client and the HTTP stack, every
    // statement from the database driver, and a span for each request of the flow.
    let trace_lines = text.lines().filter(|l| l.contains(" TRACE ")).count();
    assert!(trace_lines > 20, "only {trace_lines} trace lines:\n{text}");
    for expected in [
        "TRACE countersign::app: connection accepted",
        "alloy_rpc_client::call: serialized request",
        "eth_sendRawTransaction",
        "DEBUG sqlx::query",
        "INSERT INTO wallet_keys",
        "route=\"/api/setup_mfa\"",
        "route=\"/api/authorize_transaction\"",
        "route=\"/api/execute_transaction\"",
        "route=\"/api/change_password\"",
        "route=\"/api/logout\"",
    ] {
        assert!(text.contains(expected), "no {expected:?} in the log");
    }

    for (what, secret) in &secrets {
        assert!(secret.len() >= 8, "{what} is too short to search for");
        if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
            panic!("the {what} appears in the log: {line}");
        }
    }
    db.close().await;
    app.cleanup().await;
}

fn decode_b64(s: &str) -> Vec<u8> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).unwrap()
}
