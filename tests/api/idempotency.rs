//! `Idempotency-Key`: a repeat returns the original answer and runs nothing; another request
//! under the same key is refused; keys are per caller, expire, and a failure the client
//! should retry (5xx, a transient 409) is not remembered.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::nodes::{behind_chain_proxy, Fault};
use crate::on_both_backends;

on_both_backends!(
    a_repeated_prepare_returns_the_original_and_records_one_transaction,
    keys_are_per_caller,
    a_malformed_key_is_refused_naming_the_header,
    a_repeated_execute_broadcasts_once,
    a_repeated_transfer_moves_funds_once,
    concurrent_repeats_run_once,
    an_expired_key_is_treated_as_new,
    failures_worth_retrying_are_not_remembered,
    stored_responses_hold_no_secrets,
);

const ETH: u128 = 1_000_000_000_000_000_000;

/// A response with its `Idempotent-Replayed` header.
struct Answer {
    status: StatusCode,
    body: Value,
    replayed: bool,
}

async fn post_keyed(app: &TestApp, path: &str, auth: &Auth, key: &str, body: &Value) -> Answer {
    let mut req = app
        .client
        .post(app.url(path))
        .header("Idempotency-Key", key)
        .json(body);
    req = match auth {
        Auth::Bearer(t) => req.bearer_auth(t),
        Auth::ApiKey(k) => req.header("X-API-KEY", k),
        Auth::None => req,
    };
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        body,
        replayed,
    }
}

async fn transactions(app: &TestApp, user: &TestUser) -> Vec<Value> {
    let (status, body) = app.get("/api/transactions", &user.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["transactions"].as_array().unwrap().clone()
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn a_repeated_prepare_returns_the_original_and_records_one_transaction(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let body = native_body(&wallet, &random_address(), 1000);
    let k = key();

    let first = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.replayed);
    let again = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &body).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed, "the repeat says it is a replay");
    assert_eq!(again.body, first.body, "the original answer, byte for byte");
    let txs = transactions(&app, &user).await;
    assert_eq!(txs.len(), 1, "{txs:?}");
    let tx = first.body["transaction_id"].as_str().unwrap();
    let (_, events) = app
        .get(&format!("/api/transactions/{tx}/events"), &user.auth())
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "{events}");

    // The same key with another body, or on another endpoint: refused, nothing recorded.
    let other = native_body(&wallet, &random_address(), 2000);
    let resp = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &other).await;
    assert_eq!(resp.status, StatusCode::CONFLICT, "{}", resp.body);
    assert_eq!(resp.body["error"]["code"], "idempotency_key_reused");
    assert_eq!(resp.body["error"]["field"], "Idempotency-Key");
    let resp = post_keyed(
        &app,
        "/api/execute_transaction",
        &agent.auth(),
        &k,
        &json!({"transaction_id": tx}),
    )
    .await;
    assert_eq!(resp.status, StatusCode::CONFLICT, "{}", resp.body);
    assert_eq!(resp.body["error"]["code"], "idempotency_key_reused");
    assert_eq!(transactions(&app, &user).await.len(), 1);
    assert_eq!(
        app.status(&agent.auth(), tx).await["status"],
        "pending_authorization"
    );

    // Without a key, every request is its own.
    for _ in 0..2 {
        app.prepare(&agent, body.clone()).await;
    }
    assert_eq!(transactions(&app, &user).await.len(), 3);
    app.cleanup().await;
}

async fn keys_are_per_caller(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut alice, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let second_agent = app.issue_api_key(&mut alice, "second", None).await;
    let (bob, bob_wallet, bob_agent) = app.user_with_wallet("bob", 0).await;
    let k = key();
    let body = native_body(&wallet, &random_address(), 1000);

    let first = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    // Another key of the same owner, same key and body: its own request, not a replay.
    let second = post_keyed(
        &app,
        "/api/prepare_transaction",
        &second_agent.auth(),
        &k,
        &body,
    )
    .await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    assert!(!second.replayed);
    assert_ne!(second.body["transaction_id"], first.body["transaction_id"]);
    // Another tenant with the same key never sees Alice's answer.
    let bob_body = native_body(&bob_wallet, &random_address(), 1000);
    let theirs = post_keyed(
        &app,
        "/api/prepare_transaction",
        &bob_agent.auth(),
        &k,
        &bob_body,
    )
    .await;
    assert_eq!(theirs.status, StatusCode::CREATED, "{}", theirs.body);
    assert!(!theirs.replayed);
    // Nor does replaying Alice's exact request with Bob's key: it runs as Bob's (and fails).
    let resp = post_keyed(
        &app,
        "/api/prepare_transaction",
        &bob_agent.auth(),
        &key(),
        &body,
    )
    .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND, "{}", resp.body);
    assert_eq!(transactions(&app, &alice).await.len(), 2);
    assert_eq!(transactions(&app, &bob).await.len(), 1);
    app.cleanup().await;
}

async fn a_malformed_key_is_refused_naming_the_header(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let body = native_body(&wallet, &random_address(), 1000);
    let too_long = "k".repeat(256);
    for bad in ["", "has space", too_long.as_str(), "tab\tinside"] {
        let resp = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), bad, &body).await;
        assert_eq!(
            resp.status,
            StatusCode::BAD_REQUEST,
            "{bad:?}: {}",
            resp.body
        );
        assert_eq!(
            resp.body["error"]["field"], "Idempotency-Key",
            "{}",
            resp.body
        );
    }
    // Non-ASCII bytes, and the header twice.
    let resp = app
        .client
        .post(app.url("/api/prepare_transaction"))
        .header("X-API-KEY", &agent.key)
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(&[0xC3, 0xA9]).unwrap(),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = app
        .client
        .post(app.url("/api/prepare_transaction"))
        .header("X-API-KEY", &agent.key)
        .header("Idempotency-Key", "one")
        .header("Idempotency-Key", "two")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["field"], "Idempotency-Key");
    // 255 visible characters are fine.
    let longest = "k".repeat(255);
    let ok = post_keyed(
        &app,
        "/api/prepare_transaction",
        &agent.auth(),
        &longest,
        &body_of(&wallet),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    assert_eq!(transactions(&app, &user).await.len(), 1);
    app.cleanup().await;
}

fn body_of(wallet: &str) -> Value {
    native_body(wallet, RECIPIENT, 1)
}

async fn a_repeated_execute_broadcasts_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", 10 * ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, ETH))
        .await;
    let k = key();
    let execute = json!({"transaction_id": tx});

    // Before authorization: a 409 that depends on the state, not remembered.
    let early = post_keyed(
        &app,
        "/api/execute_transaction",
        &agent.auth(),
        &k,
        &execute,
    )
    .await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{}", early.body);
    assert_eq!(early.body["error"]["code"], "invalid_state");
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let first = post_keyed(
        &app,
        "/api/execute_transaction",
        &agent.auth(),
        &k,
        &execute,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert!(!first.replayed);
    app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
    for _ in 0..3 {
        let again = post_keyed(
            &app,
            "/api/execute_transaction",
            &agent.auth(),
            &k,
            &execute,
        )
        .await;
        assert_eq!(again.status, StatusCode::OK);
        assert!(again.replayed);
        assert_eq!(
            again.body, first.body,
            "the original answer (status executed)"
        );
    }
    // Exactly one broadcast: one transaction from the wallet, one payment.
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(app.anvil.balance(&recipient).await, ETH);
    let (_, events) = app
        .get(&format!("/api/transactions/{tx}/events"), &agent.auth())
        .await;
    let executed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event_type"] == "TransactionExecuted")
        .count();
    assert_eq!(executed, 1);
    app.cleanup().await;
}

async fn a_repeated_transfer_moves_funds_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, _agent) = app.user_with_wallet("alice", 10 * ETH).await;
    let recipient = random_address();
    let k = key();
    let code = user.fresh_code().await;
    let body = json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                      "to_address": recipient, "amount": ETH.to_string()});

    let first = post_keyed(&app, "/api/transfer", &user.auth(), &k, &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let again = post_keyed(&app, "/api/transfer", &user.auth(), &k, &body).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert!(again.replayed);
    assert_eq!(again.body, first.body);
    let tx = first.body["transaction_id"].as_str().unwrap();
    app.wait_for_status(&user.auth(), tx, "confirmed").await;
    assert_eq!(app.anvil.balance(&recipient).await, ETH);
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(transactions(&app, &user).await.len(), 1);

    // A deterministic refusal is remembered too: a wrong code is answered, and counted, once.
    let k2 = key();
    let wrong = json!({"password": PASSWORD, "mfa_code": user.wrong_code(),
                       "wallet_address": wallet, "to_address": recipient, "amount": "1"});
    let refused = post_keyed(&app, "/api/transfer", &user.auth(), &k2, &wrong).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let again = post_keyed(&app, "/api/transfer", &user.auth(), &k2, &wrong).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN);
    assert!(again.replayed);
    assert_eq!(again.body, refused.body);
    let (_, me) = app.get("/api/me", &user.auth()).await;
    assert_eq!(me["mfa_failed_attempts"], 1, "{me}");
    assert_eq!(transactions(&app, &user).await.len(), 1);
    app.cleanup().await;
}

async fn concurrent_repeats_run_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let body = native_body(&wallet, &random_address(), 1000);
    let k = key();
    let auth = agent.auth();
    let requests = (0..6).map(|_| post_keyed(&app, "/api/prepare_transaction", &auth, &k, &body));
    let answers = futures::future::join_all(requests).await;
    let created: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    assert!(!created.is_empty());
    assert_eq!(created.iter().filter(|a| !a.replayed).count(), 1, "one ran");
    for a in &answers {
        if a.status == StatusCode::CREATED {
            assert_eq!(a.body["transaction_id"], created[0].body["transaction_id"]);
        } else {
            assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
            assert_eq!(a.body["error"]["code"], "idempotency_in_progress");
            assert_eq!(a.body["error"]["field"], "Idempotency-Key");
        }
    }
    assert_eq!(transactions(&app, &user).await.len(), 1);
    app.cleanup().await;
}

async fn an_expired_key_is_treated_as_new(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Some(|c| c.idempotency_ttl = Duration::from_secs(1)),
    )
    .await;
    let (user, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let body = native_body(&wallet, &random_address(), 1000);
    let k = key();
    let first = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &body).await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    assert!(!second.replayed);
    assert_ne!(second.body["transaction_id"], first.body["transaction_id"]);
    // Expired, another body is no conflict either.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let other = native_body(&wallet, &random_address(), 2000);
    let third = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &other).await;
    assert_eq!(third.status, StatusCode::CREATED, "{}", third.body);
    assert_eq!(transactions(&app, &user).await.len(), 3);
    app.cleanup().await;
}

async fn failures_worth_retrying_are_not_remembered(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", 10 * ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, ETH))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The chain goes away: execution answers 503, which a retry under the same key redoes.
    let (proxy, node) = behind_chain_proxy(&mut app, Some(Duration::from_secs(2))).await;
    proxy.set(Fault::Reset);
    let k = key();
    let execute = json!({"transaction_id": tx});
    let down = post_keyed(
        &app,
        "/api/execute_transaction",
        &agent.auth(),
        &k,
        &execute,
    )
    .await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        down.body
    );
    assert_eq!(down.body["error"]["code"], "chain_unavailable");

    proxy.set(Fault::None);
    let up = post_keyed(
        &app,
        "/api/execute_transaction",
        &agent.auth(),
        &k,
        &execute,
    )
    .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.body);
    assert!(!up.replayed, "it ran again");
    let again = post_keyed(
        &app,
        "/api/execute_transaction",
        &agent.auth(),
        &k,
        &execute,
    )
    .await;
    assert!(again.replayed);
    assert_eq!(again.body, up.body);
    app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(app.anvil.balance(&recipient).await, ETH);

    // An unauthenticated attempt claims nothing: the key still runs for its owner.
    let k = key();
    let body = native_body(&wallet, &random_address(), 1);
    let bad = Auth::ApiKey(format!("csk_{}", "0".repeat(64)));
    let resp = post_keyed(&app, "/api/prepare_transaction", &bad, &k, &body).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let resp = post_keyed(&app, "/api/prepare_transaction", &agent.auth(), &k, &body).await;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.body);
    assert!(!resp.replayed);
    node.stop().await;
    app.cleanup().await;
}

/// The first column of every row `sql` returns, as text.
async fn texts(app: &TestApp, sql: &str) -> Vec<String> {
    match app.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.store.url).await.unwrap();
            let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.into_iter().map(|r| r.0).collect()
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&app.store.url).await.unwrap();
            let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.into_iter().map(|r| r.0).collect()
        }
    }
}

async fn stored_responses_hold_no_secrets(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", 10 * ETH).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    app.authorize(&mut user, &tx).await;
    let code = user.fresh_code().await;
    let transfer = json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                          "to_address": random_address(), "amount": "1"});
    let requests = [
        (
            "/api/prepare_transaction",
            agent.auth(),
            native_body(&wallet, RECIPIENT, 5),
        ),
        (
            "/api/execute_transaction",
            agent.auth(),
            json!({"transaction_id": tx}),
        ),
        ("/api/transfer", user.auth(), transfer.clone()),
    ];
    for (path, auth, body) in &requests {
        let a = post_keyed(&app, path, auth, &key(), body).await;
        assert!(a.status.is_success(), "{path}: {}", a.body);
    }
    let bodies = texts(&app, "SELECT response_body FROM idempotency_keys").await;
    assert_eq!(bodies.len(), 3);
    let fingerprints = texts(&app, "SELECT request_hash FROM idempotency_keys").await;
    let secrets = [
        PASSWORD,
        code.as_str(),
        agent.key.as_str(),
        user.token.as_str(),
    ];
    for stored in bodies.iter().chain(&fingerprints) {
        for secret in secrets {
            assert!(!stored.contains(secret), "a secret in {stored}");
        }
    }
    // The fingerprint of the transfer (whose body holds the password and code) is keyed: not
    // the plain SHA-256 of what was sent, which could be guessed offline.
    use sha2::Digest;
    let plain = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&transfer).unwrap()));
    assert!(fingerprints.iter().all(|f| *f != plain && f.len() == 64));
    app.cleanup().await;
}
