//! Negative paths of the countersigned flow: bad or reused codes, other people's resources,
//! out-of-order steps, double execution, expiry, revoked keys, and malformed input. Every
//! refused attempt is checked to have changed nothing.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    wrong_mfa_code_is_refused_and_the_transaction_stays_pending,
    replayed_mfa_code_is_refused_on_another_transaction,
    one_code_used_concurrently_authorizes_only_one_transaction,
    mfa_code_from_three_steps_ago_is_refused,
    another_users_transaction_is_invisible_and_untouchable,
    api_key_scoped_to_one_wallet_cannot_reach_another_or_see_other_keys_transactions,
    execute_before_authorize_is_an_invalid_state,
    executing_twice_returns_the_same_hash_and_broadcasts_once,
    concurrent_executes_return_the_same_hash_and_broadcast_once,
    decisions_are_final_authorize_after_reject_and_reject_after_authorize_conflict,
    expired_transaction_cannot_be_authorized_rejected_or_executed,
    revoked_api_key_is_refused_and_only_its_owner_can_revoke_it,
    invalid_amounts_addresses_and_fields_are_refused_naming_the_field,
    prepare_with_another_users_id_is_a_user_mismatch,
    agent_status_reads_authenticate_and_scope_like_every_other_request,
);

const ETH: u128 = 1_000_000_000_000_000_000;

fn status_of(view: &Value) -> &str {
    view["status"].as_str().unwrap_or_default()
}

async fn execute(app: &TestApp, agent: &Agent, tx: &str) -> (StatusCode, Value) {
    app.post(
        "/api/execute_transaction",
        &agent.auth(),
        json!({"transaction_id": tx}),
    )
    .await
}

async fn status_raw(app: &TestApp, auth: &Auth, tx: &str) -> (StatusCode, Value) {
    app.get(
        &format!("/api/transaction_status?transaction_id={tx}"),
        auth,
    )
    .await
}

async fn event_types(app: &TestApp, auth: &Auth, tx: &str) -> Vec<String> {
    let (status, body) = app
        .get(&format!("/api/transactions/{tx}/events"), auth)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_owned())
        .collect()
}

async fn wrong_mfa_code_is_refused_and_the_transaction_stays_pending(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;

    let resp = app
        .post(
            "/api/authorize_transaction",
            &user.auth(),
            json!({"transaction_id": tx, "mfa_code": user.wrong_code()}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    assert_field(&resp, "mfa_code");
    let view = app.status(&user.auth(), &tx).await;
    assert_eq!(status_of(&view), "pending_authorization");
    assert_eq!(view["authorized_by"], Value::Null);
    assert_eq!(
        event_types(&app, &user.auth(), &tx).await,
        ["TransactionPrepared"]
    );

    // The right code still works: the refusal was about the code, not the transaction.
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.cleanup().await;
}

async fn replayed_mfa_code_is_refused_on_another_transaction(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let a = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;
    let b = app
        .prepare(&agent, native_body(&wallet, &random_address(), 2000))
        .await;
    let (status, body) = app.authorize(&mut user, &a).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let resp = app
        .post(
            "/api/authorize_transaction",
            &user.auth(),
            json!({"transaction_id": b, "mfa_code": user.last_code()}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_code_replayed");
    assert_field(&resp, "mfa_code");
    assert_eq!(
        status_of(&app.status(&user.auth(), &b).await),
        "pending_authorization"
    );
    assert_eq!(status_of(&app.status(&user.auth(), &a).await), "authorized");
    app.cleanup().await;
}

async fn one_code_used_concurrently_authorizes_only_one_transaction(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let a = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;
    let b = app
        .prepare(&agent, native_body(&wallet, &random_address(), 2000))
        .await;
    let code = user.fresh_code().await;
    let auth = user.auth();
    let authorize = |tx: &str| {
        app.post(
            "/api/authorize_transaction",
            &auth,
            json!({"transaction_id": tx, "mfa_code": code}),
        )
    };
    let (ra, rb) = tokio::join!(authorize(&a), authorize(&b));

    let (won, lost, loser) = match (ra.0, rb.0) {
        (StatusCode::OK, _) => (&ra, &rb, &b),
        (_, StatusCode::OK) => (&rb, &ra, &a),
        _ => panic!("neither authorization succeeded: {} / {}", ra.1, rb.1),
    };
    assert_eq!(won.1["status"], "authorized");
    assert_error(lost, StatusCode::FORBIDDEN, "mfa_code_replayed");
    assert_eq!(
        status_of(&app.status(&user.auth(), loser).await),
        "pending_authorization"
    );
    app.cleanup().await;
}

async fn mfa_code_from_three_steps_ago_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;
    let now = current_step();
    // Three steps back, unless (one in a million) its code equals one that is valid now.
    let live: Vec<String> = (now - 2..=now + 2).map(|s| user.code_at(s)).collect();
    let old = (3..10)
        .map(|back| user.code_at(now - back))
        .find(|c| !live.contains(c))
        .unwrap();

    let resp = app
        .post(
            "/api/authorize_transaction",
            &user.auth(),
            json!({"transaction_id": tx, "mfa_code": old}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    assert_field(&resp, "mfa_code");
    assert_eq!(
        status_of(&app.status(&user.auth(), &tx).await),
        "pending_authorization"
    );
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.cleanup().await;
}

async fn another_users_transaction_is_invisible_and_untouchable(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut alice, wallet, alice_agent) = app.user_with_wallet("alice", ETH).await;
    let (mut bob, _bob_wallet, bob_agent) = app.user_with_wallet("bob", ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&alice_agent, native_body(&wallet, &recipient, 1000))
        .await;
    let before = app.status(&alice.auth(), &tx).await;

    // Bob, as a user: cannot see, decide on, or list the history of Alice's transaction.
    let resp = status_raw(&app, &bob.auth(), &tx).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app.authorize(&mut bob, &tx).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app
        .post(
            "/api/reject_transaction",
            &bob.auth(),
            json!({"transaction_id": tx, "reason": "not yours"}),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app
        .get(&format!("/api/transactions/{tx}/events"), &bob.auth())
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let (status, list) = app.get("/api/transactions", &bob.auth()).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["transactions"], json!([]));
    // Nor scope an API key to Alice's wallet (refused before the code is looked at).
    let resp = app
        .post(
            "/api/api_keys",
            &bob.auth(),
            json!({"name": "stolen", "mfa_code": bob.last_code(), "wallet_addresses": [wallet]}),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_field(&resp, "wallet_addresses[0]");
    let (_, keys) = app.get("/api/api_keys", &bob.auth()).await;
    assert_eq!(keys["api_keys"].as_array().unwrap().len(), 1, "{keys}");

    // Nor Alice's wallet, as a user or through his agent.
    let resp = app
        .post(
            "/api/load_wallet",
            &bob.auth(),
            json!({"wallet_address": wallet}),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_field(&resp, "wallet_address");
    let resp = app
        .post(
            "/api/load_wallet",
            &bob_agent.auth(),
            json!({"wallet_address": wallet}),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app
        .post(
            "/api/prepare_transaction",
            &bob_agent.auth(),
            native_body(&wallet, &recipient, 5),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_field(&resp, "wallet_address");
    let resp = status_raw(&app, &bob_agent.auth(), &tx).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");

    assert_eq!(app.status(&alice.auth(), &tx).await, before);
    assert_eq!(
        event_types(&app, &alice.auth(), &tx).await,
        ["TransactionPrepared"]
    );
    let (status, list) = app.get("/api/transactions", &alice.auth()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["transactions"].as_array().unwrap().len(), 1, "{list}");

    // Once Alice authorizes, Bob's agent still cannot execute it: nothing is signed or sent.
    let (status, body) = app.authorize(&mut alice, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = execute(&app, &bob_agent, &tx).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let view = app.status(&alice.auth(), &tx).await;
    assert_eq!(status_of(&view), "authorized");
    assert_eq!(view["tx_hash"], Value::Null);
    assert_eq!(app.onchain_nonce(&wallet).await, 0);
    assert_eq!(app.anvil.balance(&recipient).await, 0);
    assert_eq!(app.anvil.balance(&wallet).await, ETH);
    app.cleanup().await;
}

async fn api_key_scoped_to_one_wallet_cannot_reach_another_or_see_other_keys_transactions(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (mut alice, first, agent) = app.user_with_wallet("alice", ETH).await;
    let second = app.create_wallet(&alice).await;
    let scoped = app
        .issue_api_key(&mut alice, "scoped", Some(vec![second.clone()]))
        .await;
    let recipient = random_address();

    let resp = app
        .post(
            "/api/prepare_transaction",
            &scoped.auth(),
            native_body(&first, &recipient, 7),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_field(&resp, "wallet_address");
    let resp = app
        .post(
            "/api/load_wallet",
            &scoped.auth(),
            json!({"wallet_address": first}),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let (status, wallets) = app.get("/api/wallets", &scoped.auth()).await;
    assert_eq!(status, StatusCode::OK, "{wallets}");
    let listed: Vec<&str> = wallets["wallets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["wallet_address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [second.as_str()]);

    // Each key prepares within its scope, and sees only what it prepared.
    let on_first = app
        .prepare(&agent, native_body(&first, &recipient, 1))
        .await;
    let on_second = app
        .prepare(&scoped, native_body(&second, &recipient, 2))
        .await;
    let resp = status_raw(&app, &scoped.auth(), &on_first).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = execute(&app, &scoped, &on_first).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = status_raw(&app, &agent.auth(), &on_second).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let (_, list) = app.get("/api/transactions", &scoped.auth()).await;
    let ids: Vec<&str> = list["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [on_second.as_str()]);
    assert_eq!(
        status_of(&app.status(&scoped.auth(), &on_second).await),
        "pending_authorization"
    );
    assert_eq!(
        status_of(&app.status(&alice.auth(), &on_first).await),
        "pending_authorization"
    );
    app.cleanup().await;
}

async fn execute_before_authorize_is_an_invalid_state(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, 1000))
        .await;

    let resp = execute(&app, &agent, &tx).await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
    let view = app.status(&user.auth(), &tx).await;
    assert_eq!(status_of(&view), "pending_authorization");
    assert_eq!(view["tx_hash"], Value::Null);
    assert_eq!(
        event_types(&app, &user.auth(), &tx).await,
        ["TransactionPrepared"]
    );
    assert_eq!(app.onchain_nonce(&wallet).await, 0);
    assert_eq!(app.anvil.balance(&recipient).await, 0);
    app.cleanup().await;
}

async fn executing_twice_returns_the_same_hash_and_broadcasts_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let recipient = random_address();
    let amount = 123_456_789u128;
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, amount))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, first) = execute(&app, &agent, &tx).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let hash = first["tx_hash"].as_str().unwrap().to_owned();
    let (status, second) = execute(&app, &agent, &tx).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["tx_hash"], hash.as_str());

    let view = app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
    assert_eq!(view["tx_hash"], hash.as_str());
    // Even after confirmation, a repeat answers with the same hash and sends nothing.
    let (status, third) = execute(&app, &agent, &tx).await;
    assert_eq!(status, StatusCode::OK, "{third}");
    assert_eq!(third["tx_hash"], hash.as_str());

    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(app.anvil.balance(&recipient).await, amount);
    let types = event_types(&app, &user.auth(), &tx).await;
    assert_eq!(
        types.iter().filter(|t| *t == "TransactionExecuted").count(),
        1,
        "{types:?}"
    );
    app.cleanup().await;
}

async fn concurrent_executes_return_the_same_hash_and_broadcast_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let recipient = random_address();
    let amount = 987_654_321u128;
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, amount))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (a, b) = tokio::join!(execute(&app, &agent, &tx), execute(&app, &agent, &tx));
    assert_eq!(a.0, StatusCode::OK, "{}", a.1);
    assert_eq!(b.0, StatusCode::OK, "{}", b.1);
    let hash = a.1["tx_hash"].as_str().unwrap().to_owned();
    assert_eq!(b.1["tx_hash"], hash.as_str());

    let view = app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
    assert_eq!(view["tx_hash"], hash.as_str());
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(app.anvil.balance(&recipient).await, amount);
    let types = event_types(&app, &user.auth(), &tx).await;
    assert_eq!(
        types.iter().filter(|t| *t == "TransactionExecuted").count(),
        1,
        "{types:?}"
    );
    app.cleanup().await;
}

async fn decisions_are_final_authorize_after_reject_and_reject_after_authorize_conflict(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let rejected = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    let authorized = app
        .prepare(&agent, native_body(&wallet, &random_address(), 2))
        .await;

    let (status, body) = app
        .post(
            "/api/reject_transaction",
            &user.auth(),
            json!({"transaction_id": rejected, "reason": "no"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = app.authorize(&mut user, &rejected).await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
    let view = app.status(&user.auth(), &rejected).await;
    assert_eq!(status_of(&view), "rejected");
    assert_eq!(view["authorized_by"], Value::Null);
    let resp = execute(&app, &agent, &rejected).await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");

    // The refused attempt did not spend its code: the same code authorizes the other one.
    let (status, body) = app
        .post(
            "/api/authorize_transaction",
            &user.auth(),
            json!({"transaction_id": authorized, "mfa_code": user.last_code()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = app
        .post(
            "/api/reject_transaction",
            &user.auth(),
            json!({"transaction_id": authorized}),
        )
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
    let view = app.status(&user.auth(), &authorized).await;
    assert_eq!(status_of(&view), "authorized");
    assert_eq!(view["rejection_reason"], Value::Null);
    assert_eq!(
        event_types(&app, &user.auth(), &authorized).await,
        ["TransactionPrepared", "TransactionAuthorized"]
    );
    assert_eq!(
        event_types(&app, &user.auth(), &rejected).await,
        ["TransactionPrepared", "TransactionRejected"]
    );
    app.cleanup().await;
}

async fn expired_transaction_cannot_be_authorized_rejected_or_executed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let recipient = random_address();
    let mut body = native_body(&wallet, &recipient, 1000);
    body["expires_in"] = json!(1);
    let tx = app.prepare(&agent, body).await;
    app.wait_for_status(&agent.auth(), &tx, "expired").await;

    let resp = app.authorize(&mut user, &tx).await;
    assert_error(&resp, StatusCode::CONFLICT, "transaction_expired");
    let resp = app
        .post(
            "/api/reject_transaction",
            &user.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "transaction_expired");
    let resp = execute(&app, &agent, &tx).await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");

    let view = app.status(&user.auth(), &tx).await;
    assert_eq!(status_of(&view), "expired");
    assert_eq!(view["tx_hash"], Value::Null);
    assert_eq!(
        event_types(&app, &user.auth(), &tx).await,
        ["TransactionPrepared", "TransactionExpired"]
    );
    assert_eq!(app.onchain_nonce(&wallet).await, 0);
    assert_eq!(app.anvil.balance(&recipient).await, 0);
    app.cleanup().await;
}

async fn revoked_api_key_is_refused_and_only_its_owner_can_revoke_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (alice, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let bob = app.register("bob").await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    let key_path = format!("/api/api_keys/{}", agent.id);

    // Someone else's key, or no key at all: not found, and nothing changes.
    let resp = app.delete(&key_path, &bob.auth()).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app
        .delete(
            &format!("/api/api_keys/{}", uuid::Uuid::new_v4()),
            &alice.auth(),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        status_of(&app.status(&agent.auth(), &tx).await),
        "pending_authorization"
    );

    let (status, body) = app.delete(&key_path, &alice.auth()).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let resp = app
        .post(
            "/api/prepare_transaction",
            &agent.auth(),
            native_body(&wallet, &random_address(), 1),
        )
        .await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let resp = status_raw(&app, &agent.auth(), &tx).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let resp = app.get("/api/wallets", &agent.auth()).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");

    let (status, keys) = app.get("/api/api_keys", &alice.auth()).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let keys = keys["api_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["api_key_id"], agent.id.as_str());
    assert!(keys[0]["revoked_at"].is_string(), "{keys:?}");
    let (_, bob_keys) = app.get("/api/api_keys", &bob.auth()).await;
    assert_eq!(bob_keys["api_keys"], json!([]));

    // Revoking again is a no-op; the owner still sees the prompt the key prepared.
    let (status, _) = app.delete(&key_path, &alice.auth()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        status_of(&app.status(&alice.auth(), &tx).await),
        "pending_authorization"
    );
    let (_, list) = app.get("/api/transactions", &alice.auth()).await;
    assert_eq!(list["transactions"].as_array().unwrap().len(), 1);
    app.cleanup().await;
}

/// Flip the case of the first letter of a checksummed address (breaking its EIP-55 checksum
/// while staying mixed-case).
fn break_checksum(address: &str) -> String {
    let hex = &address[2..];
    let i = hex.find(|c: char| c.is_ascii_alphabetic()).unwrap();
    let mut chars: Vec<char> = hex.chars().collect();
    chars[i] = if chars[i].is_ascii_uppercase() {
        chars[i].to_ascii_lowercase()
    } else {
        chars[i].to_ascii_uppercase()
    };
    let out = format!("0x{}", chars.into_iter().collect::<String>());
    assert!(
        out.chars().any(|c| c.is_ascii_uppercase())
            && out[2..].chars().any(|c| c.is_ascii_lowercase())
    );
    out
}

async fn invalid_amounts_addresses_and_fields_are_refused_naming_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let base = native_body(&wallet, RECIPIENT, 1000);
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let over_u256 =
        "115792089237316195423570985008687907853269984665640564039457584007913129639936";
    let token = random_address();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("negative value", with("value", json!(-1)), "value"),
        ("negative value string", with("value", json!("-1")), "value"),
        (
            "fractional value string",
            with("value", json!("1.5")),
            "value",
        ),
        (
            "fractional value number",
            with("value", json!(1.5)),
            "value",
        ),
        (
            "value above 2^256-1",
            with("value", json!(over_u256)),
            "value",
        ),
        ("non-numeric value", with("value", json!("lots")), "value"),
        ("exponent value", with("value", json!("1e18")), "value"),
        ("short address", with("to", json!("0x1234")), "to"),
        (
            "address without 0x",
            with("to", json!(RECIPIENT.trim_start_matches("0x"))),
            "to",
        ),
        (
            "bad EIP-55 checksum",
            with("to", json!(break_checksum(RECIPIENT))),
            "to",
        ),
        (
            "bad wallet checksum",
            with("wallet_address", json!(break_checksum(&wallet))),
            "wallet_address",
        ),
        ("native with data", with("data", json!("0x")), "data"),
        (
            "native with token_address",
            with("token_address", json!(token)),
            "token_address",
        ),
        (
            "erc20 without token_address",
            json!({"wallet_address": wallet, "kind": "erc20", "to": RECIPIENT, "amount": "1"}),
            "token_address",
        ),
        (
            "erc20 with value",
            json!({"wallet_address": wallet, "kind": "erc20", "to": RECIPIENT, "amount": "1",
                   "token_address": token, "value": "1"}),
            "value",
        ),
        (
            "contract call with a short selector",
            json!({"wallet_address": wallet, "kind": "contract_call", "to": token,
                   "data": "0xd0e3"}),
            "data",
        ),
        ("unknown kind", with("kind", json!("nft")), "kind"),
        ("unknown field", with("foo", json!(1)), "foo"),
        (
            "expires_in zero",
            with("expires_in", json!(0)),
            "expires_in",
        ),
        (
            "expires_in too long",
            with("expires_in", json!(901)),
            "expires_in",
        ),
        (
            "expires_in negative",
            with("expires_in", json!(-5)),
            "expires_in",
        ),
        (
            "memo too long",
            with("memo", json!("m".repeat(501))),
            "memo",
        ),
    ];
    for (case, body, field) in cases {
        let resp = app
            .post("/api/prepare_transaction", &agent.auth(), body)
            .await;
        assert_eq!(
            resp.0,
            StatusCode::BAD_REQUEST,
            "{case}: unexpected status, body: {}",
            resp.1
        );
        assert_eq!(
            resp.1["error"]["code"], "invalid_field",
            "{case}: {}",
            resp.1
        );
        assert_eq!(resp.1["error"]["field"], field, "{case}: {}", resp.1);
    }
    let (_, list) = app.get("/api/transactions", &agent.auth()).await;
    assert_eq!(list["transactions"], json!([]), "nothing was prepared");

    // The limits themselves are accepted (and lower-case addresses need no checksum).
    let mut ok = with("memo", json!("m".repeat(500)));
    ok["expires_in"] = json!(900);
    ok["to"] = json!(RECIPIENT.to_lowercase());
    ok["value"] = json!(u64::MAX);
    let tx = app.prepare(&agent, ok).await;
    let view = app.status(&agent.auth(), &tx).await;
    assert_eq!(view["to"], RECIPIENT);
    assert_eq!(view["value"], u64::MAX.to_string());
    app.cleanup().await;
}

async fn prepare_with_another_users_id_is_a_user_mismatch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("alice", ETH).await;
    let other = app.register("bob").await;
    let mut body = native_body(&wallet, &random_address(), 1);
    body["user_id"] = json!(other.user_id);
    let resp = app
        .post("/api/prepare_transaction", &agent.auth(), body.clone())
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "user_mismatch");
    assert_field(&resp, "user_id");
    body["user_id"] = json!("not-a-user");
    let resp = app
        .post("/api/prepare_transaction", &agent.auth(), body.clone())
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "user_mismatch");
    let (_, list) = app.get("/api/transactions", &user.auth()).await;
    assert_eq!(list["transactions"], json!([]));

    body["user_id"] = json!(user.user_id);
    app.prepare(&agent, body).await;
    app.cleanup().await;
}

// HTTP parsing: the same on every backend, so SQLite only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_empty_and_oversized_bodies_and_unknown_routes_get_json_errors() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_user, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let path = "/api/prepare_transaction";

    let resp = app
        .post_raw(path, &agent.auth(), r#"{"wallet_address":"#)
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    let resp = app.post_raw(path, &agent.auth(), "{not json}").await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    let resp = app.post_raw(path, &agent.auth(), "").await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");
    let resp = app.post_raw(path, &agent.auth(), "  \n").await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_json");

    // Over 64 KiB, even as well-formed JSON.
    let mut big = native_body(&wallet, RECIPIENT, 1);
    big["memo"] = json!("x".repeat(64 * 1024));
    let resp = app.post_body(path, &agent.auth(), big.to_string()).await;
    assert_error(&resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    let resp = app.get("/api/no_such_endpoint", &agent.auth()).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app.get("/no/such/path", &Auth::None).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    let resp = app.get(path, &agent.auth()).await;
    assert_error(&resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let resp = app.get("/api/login", &Auth::None).await;
    assert_error(&resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");

    let (_, list) = app.get("/api/transactions", &agent.auth()).await;
    assert_eq!(list["transactions"], json!([]));
    app.cleanup().await;
}

/// An agent's `transaction_status` reads its key and the transaction in one round trip; it
/// must judge credentials first and show only what that key prepared, like every other read.
async fn agent_status_reads_authenticate_and_scope_like_every_other_request(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut alice, wallet, agent) = app.user_with_wallet("alice", 0).await;
    let sibling = app.issue_api_key(&mut alice, "sibling", None).await;
    let (_, _, mallory) = app.user_with_wallet("mallory", 0).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;

    let (status, view) = status_raw(&app, &agent.auth(), &tx).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["transaction_id"], tx.as_str());
    // Another key of the same owner, another user's key, an unknown id, a malformed id.
    for (auth, id) in [
        (sibling.auth(), tx.clone()),
        (mallory.auth(), tx.clone()),
        (agent.auth(), uuid::Uuid::new_v4().to_string()),
        (agent.auth(), "not-a-uuid".to_owned()),
    ] {
        let resp = status_raw(&app, &auth, &id).await;
        assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    }
    // Bad credentials are a 401 whatever the query; a good key with a bad query, a 400.
    let forged = Auth::ApiKey(format!("{}x", agent.key));
    let resp = status_raw(&app, &forged, &tx).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let resp = app.get("/api/transaction_status", &forged).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let resp = app.get("/api/transaction_status", &agent.auth()).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "transaction_id");
    let resp = app
        .get(
            &format!("/api/transaction_status?transaction_id={tx}&extra=1"),
            &agent.auth(),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");

    // Revoked: refused at once, though the transaction is still there.
    let (status, body) = app
        .delete(&format!("/api/api_keys/{}", agent.id), &alice.auth())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let resp = status_raw(&app, &agent.auth(), &tx).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        status_of(&app.status(&alice.auth(), &tx).await),
        "pending_authorization"
    );
    app.cleanup().await;
}
