//! The countersigned flow end to end over HTTP, for every transaction kind, with exact balance
//! checks on a real chain; and a restart that keeps every view and balance.

use alloy::primitives::U256;
use alloy::sol_types::SolValue;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    native_transfer_flow,
    erc20_transfer_flow,
    contract_call_flow,
    restart_keeps_views_and_balances,
    concurrent_executions_from_one_wallet_take_consecutive_nonces,
);

const ETH: u128 = 1_000_000_000_000_000_000;

fn contract(name: &str) -> Value {
    let text = match name {
        "TestToken" => include_str!("../contracts/TestToken.json"),
        "Target" => include_str!("../contracts/Target.json"),
        _ => unreachable!(),
    };
    serde_json::from_str(text).unwrap()
}

fn word_address(address: &str) -> String {
    format!("{:0>64}", address.trim_start_matches("0x").to_lowercase())
}

fn word_u256(v: u128) -> String {
    format!("{v:064x}")
}

fn to_u128(hex: &str) -> u128 {
    U256::from_str_radix(hex.trim_start_matches("0x"), 16)
        .unwrap()
        .to::<u128>()
}

/// Execute as the agent, then wait for the receipt; returns the final view.
async fn execute_and_confirm(app: &TestApp, agent: &Agent, tx: &str) -> Value {
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Broadcast: executed, or confirmed already if the receipt worker saw the block first.
    assert!(
        body["status"] == "executed" || body["status"] == "confirmed",
        "{body}"
    );
    let hash = body["tx_hash"].as_str().unwrap().to_owned();
    let view = app.wait_for_status(&agent.auth(), tx, "confirmed").await;
    assert_eq!(view["tx_hash"], hash);
    assert!(view["block_number"].as_u64().unwrap() > 0);
    view
}

async fn native_transfer_flow(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("alice", 10 * ETH).await;
    let recipient = random_address();
    let amount = 3 * ETH / 2;

    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, amount))
        .await;

    // The owner sees the prompt in their inbox, with what they need to decide.
    let (status, inbox) = app
        .get(
            "/api/transactions?status=pending_authorization",
            &user.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let prompt = &inbox["transactions"][0];
    assert_eq!(prompt["transaction_id"], tx.as_str());
    assert_eq!(prompt["value"], amount.to_string());
    assert_eq!(prompt["memo"], "test payment");
    assert!(prompt["summary"]
        .as_str()
        .unwrap()
        .starts_with("Send 1.5 ETH to 0x"));

    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "authorized");

    let view = execute_and_confirm(&app, &agent, &tx).await;
    assert_eq!(view["wallet_address"], wallet.as_str());
    assert_eq!(app.anvil.balance(&recipient).await, amount);

    // Every step is an event with its actor.
    let (status, history) = app
        .get(&format!("/api/transactions/{tx}/events"), &user.auth())
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = history["events"].as_array().unwrap();
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "TransactionPrepared",
            "TransactionAuthorized",
            "TransactionExecuted",
            "TransactionConfirmed"
        ]
    );
    assert_eq!(events[0]["actor"], agent.id.as_str());
    assert_eq!(events[1]["actor"], user.user_id.as_str());
    assert_eq!(events[2]["actor"], agent.id.as_str());
    let positions: Vec<i64> = events
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    app.cleanup().await;
}

async fn erc20_transfer_flow(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("bob", ETH).await;
    let token = contract("TestToken");
    let args = (
        "Test USD".to_string(),
        "TUSD".to_string(),
        U256::from(6u8), // uint8 encodes as one word
        U256::from(1_000_000_000_000u64),
    )
        .abi_encode_params();
    let code = format!(
        "{}{}",
        token["bytecode"].as_str().unwrap(),
        hex::encode(args)
    );
    let token_address = app.anvil.deploy(&code).await;
    // Give the wallet 1,000 TUSD.
    app.anvil
        .send_from_dev(json!({
            "from": ANVIL_ACCOUNT_0, "to": token_address,
            "data": format!("0xa9059cbb{}{}", word_address(&wallet), word_u256(1_000_000_000)),
        }))
        .await;
    let recipient = random_address();
    let tx = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "erc20", "token_address": token_address,
                   "to": recipient, "amount": "250000000"}),
        )
        .await;
    let view = app.status(&user.auth(), &tx).await;
    assert_eq!(view["to"].as_str().unwrap().to_lowercase(), recipient);
    assert_eq!(
        view["payload"]["to"].as_str().unwrap().to_lowercase(),
        token_address.to_lowercase()
    );
    assert_eq!(view["amount"], "250000000");

    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    execute_and_confirm(&app, &agent, &tx).await;

    let balance_of = |who: &str| format!("0x70a08231{}", word_address(who));
    assert_eq!(
        to_u128(
            &app.anvil
                .call(&token_address, &balance_of(&recipient))
                .await
        ),
        250_000_000
    );
    assert_eq!(
        to_u128(&app.anvil.call(&token_address, &balance_of(&wallet)).await),
        750_000_000
    );
    app.cleanup().await;
}

async fn contract_call_flow(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("carol", ETH).await;
    let target = app
        .anvil
        .deploy(contract("Target")["bytecode"].as_str().unwrap())
        .await;
    let deposit = 12_345_678_900u128;
    let tx = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "data": "0xd0e30db0", "value": deposit.to_string(), "memo": "deposit"}),
        )
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    execute_and_confirm(&app, &agent, &tx).await;

    assert_eq!(app.anvil.balance(&target).await, deposit);
    let recorded = app
        .anvil
        .call(&target, &format!("0xfc7e286d{}", word_address(&wallet)))
        .await;
    assert_eq!(to_u128(&recorded), deposit);
    app.cleanup().await;
}

async fn restart_keeps_views_and_balances(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("dave", 5 * ETH).await;
    let recipient = random_address();
    let done = app
        .prepare(&agent, native_body(&wallet, &recipient, ETH))
        .await;
    app.authorize(&mut user, &done).await;
    execute_and_confirm(&app, &agent, &done).await;
    let pending = app
        .prepare(&agent, native_body(&wallet, &recipient, 2))
        .await;
    let before_done = app.status(&user.auth(), &done).await;
    let before_pending = app.status(&user.auth(), &pending).await;
    let (_, before_wallets) = app.get("/api/wallets", &user.auth()).await;

    app.restart().await;

    // Same secrets: tokens, keys and wallets keep working; views are intact.
    assert_eq!(app.status(&user.auth(), &done).await, before_done);
    assert_eq!(app.status(&user.auth(), &pending).await, before_pending);
    let (status, after_wallets) = app.get("/api/wallets", &agent.auth()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after_wallets, before_wallets);
    assert_eq!(app.anvil.balance(&recipient).await, ETH);

    // And the pending one can still be countersigned and executed after the restart.
    let (status, body) = app.authorize(&mut user, &pending).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    execute_and_confirm(&app, &agent, &pending).await;
    assert_eq!(app.anvil.balance(&recipient).await, ETH + 2);
    app.cleanup().await;
}

async fn concurrent_executions_from_one_wallet_take_consecutive_nonces(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("heidi", 10 * ETH).await;
    let recipient = random_address();
    let mut ids = vec![];
    for i in 1..=3u128 {
        let tx = app
            .prepare(&agent, native_body(&wallet, &recipient, i * 1000))
            .await;
        let (status, body) = app.authorize(&mut user, &tx).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(tx);
    }
    let auth = agent.auth();
    let results = futures::future::join_all(ids.iter().map(|tx| {
        app.post(
            "/api/execute_transaction",
            &auth,
            json!({"transaction_id": tx}),
        )
    }))
    .await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let mut nonces = vec![];
    for tx in &ids {
        let view = app.wait_for_status(&auth, tx, "confirmed").await;
        nonces.push(view["nonce"].as_u64().unwrap());
    }
    nonces.sort();
    assert_eq!(nonces, [0, 1, 2]);
    assert_eq!(app.anvil.balance(&recipient).await, 6000);
    app.cleanup().await;
}
