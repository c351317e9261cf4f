//! Every transaction kind, user-initiated and agent-prepared, on a real chain: calls encoded
//! from a contract ABI, simulation and a readable summary at prepare time, a second simulation
//! before broadcast, burst authorization with one code, nonces under concurrency and after a
//! rejected broadcast, the fee cap, and recovery from a crash between signing and broadcasting.

use alloy::primitives::U256;
use alloy::sol_types::SolValue;
use countersign::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    user_transfers_native_eth_with_exact_balances,
    user_transfers_erc20_and_the_prompt_reads_in_token_units,
    user_contract_call_is_encoded_from_the_abi,
    agent_calls_from_an_abi_and_erc20_calls_are_summarized_and_executed,
    a_call_that_reverts_at_prepare_shows_the_reason_in_the_prompt,
    a_call_that_starts_to_revert_after_authorization_is_not_broadcast,
    one_code_authorizes_a_burst_all_or_nothing,
    twenty_concurrent_executions_from_one_wallet_all_confirm,
    a_nonce_gap_left_by_a_rejected_broadcast_is_filled_by_the_next_execution,
    a_crash_between_signing_and_broadcasting_is_recovered_with_the_same_transaction,
    a_fee_above_the_cap_fails_before_signing,
    prepare_still_works_when_the_chain_is_unreachable,
    bad_abis_argument_types_and_overflows_are_400s_naming_the_field,
);

const ETH: u128 = 1_000_000_000_000_000_000;
/// Any well-formed code: for requests refused before the code is looked at.
const UNUSED_CODE: &str = "123456";

fn artifact(name: &str) -> Value {
    let text = match name {
        "TestToken" => include_str!("../contracts/TestToken.json"),
        "Target" => include_str!("../contracts/Target.json"),
        _ => unreachable!(),
    };
    serde_json::from_str(text).unwrap()
}

fn target_abi() -> Value {
    artifact("Target")["abi"].clone()
}

fn word_address(address: &str) -> String {
    format!("{:0>64}", address.trim_start_matches("0x").to_lowercase())
}

fn word_u256(v: u128) -> String {
    format!("{v:064x}")
}

fn hex_u128(hex: &str) -> u128 {
    U256::from_str_radix(hex.trim_start_matches("0x"), 16)
        .unwrap()
        .to::<u128>()
}

fn lower(v: &Value) -> String {
    v.as_str().unwrap().to_lowercase()
}

/// A user with MFA (one code spent) and a wallet funded with `fund_wei`, but no agent.
async fn owner_with_wallet(app: &TestApp, username: &str, fund_wei: u128) -> (TestUser, String) {
    let mut user = app.register(username).await;
    app.enroll_mfa(&mut user).await;
    let wallet = app.create_wallet(&user).await;
    if fund_wei > 0 {
        app.anvil.fund(&wallet, fund_wei).await;
    }
    (user, wallet)
}

/// Deploy a TestToken ("Test USD", TUSD, 6 decimals) and give `holder` 1,000 TUSD.
async fn deploy_token(app: &TestApp, holder: &str) -> String {
    let args = (
        "Test USD".to_string(),
        "TUSD".to_string(),
        U256::from(6u8),
        U256::from(1_000_000_000_000u64),
    )
        .abi_encode_params();
    let code = format!(
        "{}{}",
        artifact("TestToken")["bytecode"].as_str().unwrap(),
        hex::encode(args)
    );
    let token = app.anvil.deploy(&code).await;
    app.anvil
        .send_from_dev(json!({
            "from": ANVIL_ACCOUNT_0, "to": token,
            "data": format!("0xa9059cbb{}{}", word_address(holder), word_u256(1_000_000_000)),
        }))
        .await;
    token
}

async fn token_balance(app: &TestApp, token: &str, who: &str) -> u128 {
    hex_u128(
        &app.anvil
            .call(token, &format!("0x70a08231{}", word_address(who)))
            .await,
    )
}

async fn deploy_target(app: &TestApp) -> String {
    app.anvil
        .deploy(artifact("Target")["bytecode"].as_str().unwrap())
        .await
}

/// `setPaused(p)` from the Target's owner (anvil dev account 0, its deployer).
async fn set_paused(app: &TestApp, target: &str, paused: bool) {
    app.anvil
        .send_from_dev(json!({
            "from": ANVIL_ACCOUNT_0, "to": target,
            "data": format!("0x16c38b3c{}", word_u256(u128::from(paused))),
        }))
        .await;
}

async fn counter(app: &TestApp, target: &str) -> u128 {
    hex_u128(&app.anvil.call(target, "0x61bc221a").await)
}

async fn execute(app: &TestApp, agent: &Agent, tx: &str) -> (StatusCode, Value) {
    app.post(
        "/api/execute_transaction",
        &agent.auth(),
        json!({"transaction_id": tx}),
    )
    .await
}

async fn events(app: &TestApp, auth: &Auth, tx: &str) -> Vec<Value> {
    let (status, body) = app
        .get(&format!("/api/transactions/{tx}/events"), auth)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["events"].as_array().unwrap().clone()
}

fn event_types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect()
}

/// What the confirmed transaction cost in gas, from its view.
fn gas_cost(view: &Value) -> u128 {
    let gas_used = u128::from(view["gas_used"].as_u64().unwrap());
    let price: u128 = view["effective_gas_price"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    gas_used * price
}

async fn transactions_of(app: &TestApp, auth: &Auth) -> Vec<Value> {
    let (status, body) = app.get("/api/transactions", auth).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["transactions"].as_array().unwrap().clone()
}

async fn user_transfers_native_eth_with_exact_balances(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet) = owner_with_wallet(&app, "alice", 10 * ETH).await;
    let recipient = random_address();
    let amount = 3 * ETH / 2;
    let code = user.fresh_code().await;
    // `address` and `to_address`: the Flask project's field names.
    let (status, body) = app
        .post(
            "/api/transfer",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code, "address": wallet,
                   "to_address": recipient, "amount": amount.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Broadcast: executed, or confirmed already if the receipt worker saw the block first.
    assert!(
        body["status"] == "executed" || body["status"] == "confirmed",
        "{body}"
    );
    let tx = body["transaction_id"].as_str().unwrap().to_owned();
    let hash = body["tx_hash"].as_str().unwrap().to_owned();
    assert!(body["summary"]
        .as_str()
        .unwrap()
        .starts_with("Send 1.5 ETH to 0x"));

    let view = app.wait_for_status(&user.auth(), &tx, "confirmed").await;
    assert_eq!(view["tx_hash"], hash.as_str());
    assert_eq!(
        view["initiator"],
        json!({"type": "user", "user_id": user.user_id})
    );
    assert_eq!(view["simulation"]["status"], "success");
    assert_eq!(app.anvil.balance(&recipient).await, amount);
    assert_eq!(
        app.anvil.balance(&wallet).await,
        10 * ETH - amount - gas_cost(&view)
    );

    // Same aggregate, same history as an agent's: every step an event with the user as actor.
    let history = events(&app, &user.auth(), &tx).await;
    assert_eq!(
        event_types(&history),
        [
            "TransactionPrepared",
            "TransactionAuthorized",
            "TransactionExecuted",
            "TransactionConfirmed"
        ]
    );
    for e in &history[..3] {
        assert_eq!(e["actor"], user.user_id.as_str());
        assert_eq!(e["actor_type"], "user");
    }
    assert_eq!(
        history[2]["data"]["executed_by"],
        json!({"type": "user", "user_id": user.user_id})
    );

    // A wrong password or a replayed code changes nothing.
    let resp = app
        .post(
            "/api/transfer",
            &user.auth(),
            json!({"password": "not the password", "mfa_code": user.fresh_code().await,
                   "wallet_address": wallet, "to_address": recipient, "amount": "1"}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_password");
    let resp = app
        .post(
            "/api/transfer",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                   "to_address": recipient, "amount": "1"}),
        )
        .await;
    assert_eq!(resp.0, StatusCode::FORBIDDEN, "{}", resp.1);
    assert_eq!(transactions_of(&app, &user.auth()).await.len(), 1);
    assert_eq!(app.anvil.balance(&recipient).await, amount);
    app.cleanup().await;
}

async fn user_transfers_erc20_and_the_prompt_reads_in_token_units(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet) = owner_with_wallet(&app, "bob", ETH).await;
    let token = deploy_token(&app, &wallet).await;
    let recipient = random_address();
    let code = user.fresh_code().await;
    let (status, body) = app
        .post(
            "/api/transfer_erc20",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                   "token_address": token, "to_address": recipient, "amount": "250000000"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let tx = body["transaction_id"].as_str().unwrap().to_owned();
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Transfer 250 TUSD (token 0x") && summary.contains(") to 0x"),
        "{summary}"
    );
    let view = app.wait_for_status(&user.auth(), &tx, "confirmed").await;
    assert_eq!(view["kind"], "erc20");
    assert_eq!(lower(&view["to"]), recipient);
    assert_eq!(lower(&view["payload"]["to"]), token.to_lowercase());
    assert_eq!(view["amount"], "250000000");
    assert_eq!(token_balance(&app, &token, &recipient).await, 250_000_000);
    assert_eq!(token_balance(&app, &token, &wallet).await, 750_000_000);
    assert_eq!(app.anvil.balance(&wallet).await, ETH - gas_cost(&view));
    app.cleanup().await;
}

async fn user_contract_call_is_encoded_from_the_abi(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet) = owner_with_wallet(&app, "carol", ETH).await;
    let target = deploy_target(&app).await;
    let code = user.fresh_code().await;
    // The ABI as a JSON string (web3.py style) works as well as an array.
    let (status, body) = app
        .post(
            "/api/contract_call",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                   "contract_address": target, "contract_abi": target_abi().to_string(),
                   "function_name": "increment", "function_args": ["5"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let tx = body["transaction_id"].as_str().unwrap().to_owned();
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Call increment(by: 5) on 0x"),
        "{summary}"
    );
    let view = app.wait_for_status(&user.auth(), &tx, "confirmed").await;
    assert_eq!(view["kind"], "contract_call");
    assert_eq!(view["data"], format!("0x7cf5dab0{}", word_u256(5)));
    assert_eq!(counter(&app, &target).await, 5);
    assert_eq!(app.anvil.balance(&wallet).await, ETH - gas_cost(&view));

    // A call that would revert is refused up front: nothing recorded, nothing signed.
    set_paused(&app, &target, true).await;
    let code = user.fresh_code().await;
    let resp = app
        .post(
            "/api/contract_call",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                   "contract_address": target, "contract_abi": target_abi(),
                   "function_name": "increment", "function_args": [1]}),
        )
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "simulation_failed");
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Target: paused"),
        "{}",
        resp.1
    );
    assert_eq!(transactions_of(&app, &user.auth()).await.len(), 1);
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    app.cleanup().await;
}

async fn agent_calls_from_an_abi_and_erc20_calls_are_summarized_and_executed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("dave", 10 * ETH).await;
    let target = deploy_target(&app).await;
    let token = deploy_token(&app, &wallet).await;
    let spender = random_address();
    let recipient = random_address();
    let deposit = 12_345_678_900u128;

    // A payable call encoded from the ABI.
    let call = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "contract_abi": target_abi(), "function_name": "deposit",
                   "function_args": [], "value": deposit.to_string()}),
        )
        .await;
    // An ERC20 approval sent as raw calldata is still recognised, in token units.
    let approve = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "contract_call", "to": token,
                   "data": format!("0x095ea7b3{}{}", word_address(&spender),
                                   word_u256(100_000_000))}),
        )
        .await;
    let transfer = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "erc20", "token_address": token,
                   "to": recipient, "amount": "250000000"}),
        )
        .await;
    // Something nothing is known about: selector and raw calldata.
    let unknown = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "data": "0x61bc221a"}),
        )
        .await;

    let (_, inbox) = app
        .get(
            "/api/transactions?status=pending_authorization",
            &user.auth(),
        )
        .await;
    let prompt = |id: &str| {
        inbox["transactions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["transaction_id"] == id)
            .cloned()
            .unwrap()
    };
    let p = prompt(&call);
    let summary = p["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Call deposit() on 0x")
            && summary.ends_with(", sending 0.0000000123456789 ETH"),
        "{summary}"
    );
    assert_eq!(p["simulation"], json!({"status": "success"}));
    assert!(p["gas_estimate"].as_u64().unwrap() > 21_000);
    let max_fee_wei: u128 = p["max_fee_wei"].as_str().unwrap().parse().unwrap();
    let max_fee_per_gas: u128 = p["max_fee_per_gas"].as_str().unwrap().parse().unwrap();
    assert!(max_fee_wei >= u128::from(p["gas_estimate"].as_u64().unwrap()) * max_fee_per_gas);
    let summary = prompt(&approve)["summary"].as_str().unwrap().to_owned();
    assert!(
        summary.starts_with("Approve 0x") && summary.contains(" to spend 100 TUSD (token 0x"),
        "{summary}"
    );
    let summary = prompt(&transfer)["summary"].as_str().unwrap().to_owned();
    assert!(
        summary.starts_with("Transfer 250 TUSD (token 0x"),
        "{summary}"
    );
    let summary = prompt(&unknown)["summary"].as_str().unwrap().to_owned();
    assert!(
        summary.starts_with("Call unknown function 0x61bc221a on 0x")
            && summary.ends_with("(calldata 0x61bc221a, 4 bytes)"),
        "{summary}"
    );

    let ids = [call.clone(), approve.clone(), transfer.clone()];
    let (status, body) = app.authorize_all(&mut user, &ids).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for tx in &ids {
        let (status, body) = execute(&app, &agent, tx).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        app.wait_for_status(&agent.auth(), tx, "confirmed").await;
    }
    assert_eq!(app.anvil.balance(&target).await, deposit);
    let recorded = app
        .anvil
        .call(&target, &format!("0xfc7e286d{}", word_address(&wallet)))
        .await;
    assert_eq!(hex_u128(&recorded), deposit);
    let allowance = app
        .anvil
        .call(
            &token,
            &format!(
                "0xdd62ed3e{}{}",
                word_address(&wallet),
                word_address(&spender)
            ),
        )
        .await;
    assert_eq!(hex_u128(&allowance), 100_000_000);
    assert_eq!(token_balance(&app, &token, &recipient).await, 250_000_000);
    assert_eq!(token_balance(&app, &token, &wallet).await, 750_000_000);
    app.cleanup().await;
}

async fn a_call_that_reverts_at_prepare_shows_the_reason_in_the_prompt(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("erin", ETH).await;
    let target = deploy_target(&app).await;
    set_paused(&app, &target, true).await;

    let (status, body) = app
        .post(
            "/api/prepare_transaction",
            &agent.auth(),
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "contract_abi": target_abi(), "function_name": "increment",
                   "function_args": ["1"], "memo": "bump the counter"}),
        )
        .await;
    // Still put to the human (state may change before execution), with the reason.
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["simulation"],
        json!({"status": "reverted", "reason": "Target: paused"})
    );
    let tx = body["transaction_id"].as_str().unwrap();
    let (_, inbox) = app
        .get(
            "/api/transactions?status=pending_authorization",
            &user.auth(),
        )
        .await;
    let prompt = &inbox["transactions"][0];
    assert_eq!(prompt["transaction_id"], tx);
    assert_eq!(
        prompt["simulation"],
        json!({"status": "reverted", "reason": "Target: paused"})
    );
    let summary = prompt["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Call increment(by: 1) on 0x")
            && summary.ends_with("WARNING: simulation reverts: \"Target: paused\""),
        "{summary}"
    );
    assert_eq!(prompt["gas_estimate"], Value::Null);
    // The event carries it too (push subscribers and auditors read events).
    let history = events(&app, &user.auth(), tx).await;
    assert_eq!(
        history[0]["data"]["simulation"],
        json!({"status": "reverted", "reason": "Target: paused"})
    );

    // A caller that is not the owner reverts with its own reason.
    let (status, body) = app
        .post(
            "/api/prepare_transaction",
            &agent.auth(),
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "contract_abi": target_abi(), "function_name": "setPaused",
                   "function_args": [false]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["simulation"]["reason"], "Target: not owner");
    app.cleanup().await;
}

async fn a_call_that_starts_to_revert_after_authorization_is_not_broadcast(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("frank", ETH).await;
    let target = deploy_target(&app).await;
    let tx = app
        .prepare(
            &agent,
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "contract_abi": target_abi(), "function_name": "increment",
                   "function_args": ["1"]}),
        )
        .await;
    assert_eq!(
        app.status(&agent.auth(), &tx).await["simulation"]["status"],
        "success"
    );
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    set_paused(&app, &target, true).await;
    let resp = execute(&app, &agent, &tx).await;
    assert_error(&resp, StatusCode::CONFLICT, "simulation_failed");
    assert!(resp.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Target: paused"));

    let view = app.status(&agent.auth(), &tx).await;
    assert_eq!(view["status"], "failed");
    assert_eq!(view["tx_hash"], Value::Null);
    assert_eq!(view["failure_reason"], "simulation failed: Target: paused");
    assert_eq!(
        event_types(&events(&app, &agent.auth(), &tx).await),
        [
            "TransactionPrepared",
            "TransactionAuthorized",
            "TransactionFailed"
        ]
    );
    // Nothing was signed or sent: no gas spent, the nonce untouched.
    assert_eq!(app.onchain_nonce(&wallet).await, 0);
    assert_eq!(app.anvil.balance(&wallet).await, ETH);
    assert_eq!(counter(&app, &target).await, 0);
    // And it stays failed.
    set_paused(&app, &target, false).await;
    let resp = execute(&app, &agent, &tx).await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
    assert_eq!(app.onchain_nonce(&wallet).await, 0);
    app.cleanup().await;
}

async fn one_code_authorizes_a_burst_all_or_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut alice, wallet, agent) = app.user_with_wallet("grace", ETH).await;
    let (_bob, bob_wallet, bob_agent) = app.user_with_wallet("heidi", ETH).await;
    let recipient = random_address();
    let mut ids = vec![];
    for i in 1..=3u128 {
        ids.push(
            app.prepare(&agent, native_body(&wallet, &recipient, i))
                .await,
        );
    }
    let rejected = app
        .prepare(&agent, native_body(&wallet, &recipient, 9))
        .await;
    let (status, body) = app
        .post(
            "/api/reject_transaction",
            &alice.auth(),
            json!({"transaction_id": rejected}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bobs = app
        .prepare(&bob_agent, native_body(&bob_wallet, &recipient, 1))
        .await;

    let code = alice.fresh_code().await;
    let batch = |ids: Vec<String>| json!({"transaction_ids": ids, "mfa_code": code});
    let path = "/api/authorize_transactions";
    let with = |extra: &str| {
        let mut v = ids.clone();
        v.push(extra.to_owned());
        v
    };
    // Someone else's transaction, or an unknown one: 404 naming the entry; nothing happens.
    let resp = app.post(path, &alice.auth(), batch(with(&bobs))).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_field(&resp, "transaction_ids[3]");
    let resp = app
        .post(
            path,
            &alice.auth(),
            batch(with(&uuid::Uuid::new_v4().to_string())),
        )
        .await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_field(&resp, "transaction_ids[3]");
    // One no longer pending: 409 naming it.
    let resp = app.post(path, &alice.auth(), batch(with(&rejected))).await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
    assert_field(&resp, "transaction_ids[3]");
    // Malformed lists.
    let resp = app.post(path, &alice.auth(), batch(with(&ids[1]))).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "transaction_ids[3]");
    let resp = app.post(path, &alice.auth(), batch(vec![])).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "transaction_ids");
    let many: Vec<String> = (0..51).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let resp = app.post(path, &alice.auth(), batch(many)).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "transaction_ids");
    for tx in &ids {
        assert_eq!(
            app.status(&alice.auth(), tx).await["status"],
            "pending_authorization"
        );
    }
    // None of that spent the code: it now authorizes the three, each with its own event.
    let (status, body) = app.post(path, &alice.auth(), batch(ids.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "authorized");
    assert_eq!(body["transactions"].as_array().unwrap().len(), 3);
    for tx in &ids {
        let history = events(&app, &alice.auth(), tx).await;
        assert_eq!(
            event_types(&history),
            ["TransactionPrepared", "TransactionAuthorized"]
        );
        assert_eq!(history[1]["actor"], alice.user_id.as_str());
    }
    let (status, _) = app
        .get(
            &format!("/api/transaction_status?transaction_id={bobs}"),
            &alice.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The code is spent now.
    let later = app
        .prepare(&agent, native_body(&wallet, &recipient, 4))
        .await;
    let resp = app.post(path, &alice.auth(), batch(vec![later])).await;
    assert_eq!(resp.0, StatusCode::FORBIDDEN, "{}", resp.1);
    app.cleanup().await;
}

async fn twenty_concurrent_executions_from_one_wallet_all_confirm(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("ivan", 10 * ETH).await;
    let recipient = random_address();
    let mut ids = vec![];
    for i in 1..=20u128 {
        ids.push(
            app.prepare(&agent, native_body(&wallet, &recipient, i * 1000))
                .await,
        );
    }
    let (status, body) = app.authorize_all(&mut user, &ids).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let results = futures::future::join_all(ids.iter().map(|tx| execute(&app, &agent, tx))).await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let mut nonces = vec![];
    for tx in &ids {
        let view = app.wait_for_status(&agent.auth(), tx, "confirmed").await;
        nonces.push(view["nonce"].as_u64().unwrap());
    }
    nonces.sort();
    assert_eq!(nonces, (0..20).collect::<Vec<u64>>());
    assert_eq!(app.anvil.balance(&recipient).await, 210 * 1000);
    assert_eq!(app.onchain_nonce(&wallet).await, 20);
    app.cleanup().await;
}

async fn a_nonce_gap_left_by_a_rejected_broadcast_is_filled_by_the_next_execution(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("judy", 10 * ETH).await;
    let recipient = random_address();
    let big = app
        .prepare(&agent, native_body(&wallet, &recipient, 5 * ETH))
        .await;
    let second = app
        .prepare(&agent, native_body(&wallet, &recipient, 1000))
        .await;
    let third = app
        .prepare(&agent, native_body(&wallet, &recipient, 2000))
        .await;
    let ids = [big.clone(), second.clone(), third.clone()];
    let (status, body) = app.authorize_all(&mut user, &ids).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Blocks only when the test says so: both wait in the node's pool, nonces 0 and 1.
    app.anvil.rpc("evm_setAutomine", json!([false])).await;
    let (status, body) = execute(&app, &agent, &big).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let big_hash = body["tx_hash"].as_str().unwrap().to_owned();
    let (status, body) = execute(&app, &agent, &second).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.status(&agent.auth(), &big).await["nonce"], 0);
    assert_eq!(app.status(&agent.auth(), &second).await["nonce"], 1);

    // The node loses nonce 0 and can no longer accept it (the wallet cannot pay 5 ETH): the
    // receipt worker's rebroadcast is rejected and the transaction fails. Nonce 1 is stuck
    // behind the gap.
    app.anvil
        .rpc("anvil_setBalance", json!([wallet, format!("{ETH:#x}")]))
        .await;
    app.anvil
        .rpc("anvil_dropTransaction", json!([big_hash]))
        .await;
    let view = app.wait_for_status(&agent.auth(), &big, "failed").await;
    assert!(
        view["failure_reason"]
            .as_str()
            .unwrap()
            .starts_with("broadcast rejected:"),
        "{view}"
    );
    assert_eq!(
        app.status(&agent.auth(), &second).await["status"],
        "executed"
    );

    // The next execution takes the freed nonce, which lets the stuck one through.
    app.anvil
        .rpc(
            "anvil_setBalance",
            json!([wallet, format!("{:#x}", 10 * ETH)]),
        )
        .await;
    let (status, body) = execute(&app, &agent, &third).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.status(&agent.auth(), &third).await["nonce"], 0);
    for _ in 0..3 {
        app.anvil.rpc("evm_mine", json!([])).await;
    }
    app.anvil.rpc("evm_setAutomine", json!([true])).await;
    app.wait_for_status(&agent.auth(), &third, "confirmed")
        .await;
    app.wait_for_status(&agent.auth(), &second, "confirmed")
        .await;
    assert_eq!(app.onchain_nonce(&wallet).await, 2);
    assert_eq!(app.anvil.balance(&recipient).await, 3000);
    assert_eq!(app.status(&agent.auth(), &big).await["status"], "failed");
    app.cleanup().await;
}

async fn a_crash_between_signing_and_broadcasting_is_recovered_with_the_same_transaction(
    backend: Backend,
) {
    let mut app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("kim", 10 * ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, ETH))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // This instance "dies" right after the signed transaction is recorded.
    app.configure = Some(|c: &mut Config| c.crash_after_sign_for_tests = true);
    app.restart().await;
    let resp = execute(&app, &agent, &tx).await;
    assert_error(&resp, StatusCode::INTERNAL_SERVER_ERROR, "internal_error");
    let view = app.status(&agent.auth(), &tx).await;
    assert_eq!(view["status"], "executed");
    let hash = view["tx_hash"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let seen = app
        .anvil
        .rpc("eth_getTransactionByHash", json!([hash]))
        .await;
    assert_eq!(seen, Value::Null, "never broadcast before the restart");
    assert_eq!(app.onchain_nonce(&wallet).await, 0);

    // The restarted server sends the recorded bytes: the same hash, mined once.
    app.configure = None;
    app.restart().await;
    let view = app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
    assert_eq!(view["tx_hash"], hash.as_str());
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(app.anvil.balance(&recipient).await, ETH);
    let receipt = app
        .anvil
        .rpc("eth_getTransactionReceipt", json!([hash]))
        .await;
    assert_eq!(receipt["status"], "0x1");
    let history = events(&app, &agent.auth(), &tx).await;
    assert_eq!(
        event_types(&history),
        [
            "TransactionPrepared",
            "TransactionAuthorized",
            "TransactionExecuted",
            "TransactionConfirmed"
        ]
    );
    // Executing again signs nothing new.
    let (status, body) = execute(&app, &agent, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tx_hash"], hash.as_str());
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    assert_eq!(app.anvil.balance(&recipient).await, ETH);
    app.cleanup().await;
}

async fn a_fee_above_the_cap_fails_before_signing(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Some(|c: &mut Config| c.max_fee_per_gas_cap = Some(1)),
    )
    .await;
    let (mut user, wallet, agent) = app.user_with_wallet("leo", ETH).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = execute(&app, &agent, &tx).await;
    assert_error(&resp, StatusCode::CONFLICT, "fee_above_cap");
    let view = app.status(&agent.auth(), &tx).await;
    assert_eq!(view["status"], "failed");
    assert_eq!(view["tx_hash"], Value::Null);
    assert!(view["failure_reason"]
        .as_str()
        .unwrap()
        .starts_with("fee above cap"));
    assert_eq!(app.onchain_nonce(&wallet).await, 0);
    assert_eq!(app.anvil.balance(&wallet).await, ETH);
    app.cleanup().await;
}

async fn prepare_still_works_when_the_chain_is_unreachable(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("mia", ETH).await;
    let token = random_address();
    app.configure = Some(|c: &mut Config| {
        c.chain_url = "http://127.0.0.1:1".parse().unwrap();
    });
    app.restart().await;

    let (status, body) = app
        .post(
            "/api/prepare_transaction",
            &agent.auth(),
            json!({"wallet_address": wallet, "kind": "erc20", "token_address": token,
                   "to": RECIPIENT, "amount": "250000000"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["simulation"]["status"], "unavailable");
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Transfer 250000000 base units (token 0x")
            && summary.ends_with("not simulated (chain node unreachable)"),
        "{summary}"
    );
    let view = app
        .status(&user.auth(), body["transaction_id"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "pending_authorization");
    assert_eq!(view["gas_estimate"], Value::Null);

    // A user-initiated transfer needs the chain now: 503, nothing recorded, no code spent.
    // A user-initiated transfer needs the chain now: 503, and nothing is recorded.
    let code = user.fresh_code().await;
    let resp = app
        .post(
            "/api/transfer",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code, "wallet_address": wallet,
                   "to_address": RECIPIENT, "amount": "1"}),
        )
        .await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "chain_unavailable");
    assert_eq!(transactions_of(&app, &user.auth()).await.len(), 1);
    app.cleanup().await;
}

async fn bad_abis_argument_types_and_overflows_are_400s_naming_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("nina", ETH).await;
    let target = random_address();
    let over_u256 =
        "115792089237316195423570985008687907853269984665640564039457584007913129639936";
    let call = |abi: Value, name: &str, args: Value| {
        json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
               "contract_abi": abi, "function_name": name, "function_args": args})
    };
    let abi = target_abi();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "ABI that is not JSON",
            call(json!("[{not json"), "increment", json!([1])),
            "contract_abi",
        ),
        (
            "ABI that is not a list",
            call(json!({"x": 1}), "increment", json!([1])),
            "contract_abi",
        ),
        (
            "ABI with a malformed item",
            call(json!([{"type": "function"}]), "increment", json!([1])),
            "contract_abi",
        ),
        (
            "unknown function",
            call(abi.clone(), "decrement", json!([1])),
            "function_name",
        ),
        (
            "wrong argument count",
            call(abi.clone(), "increment", json!([1, 2])),
            "function_args",
        ),
        (
            "bool for a uint256",
            call(abi.clone(), "increment", json!([true])),
            "function_args[0]",
        ),
        (
            "negative uint256",
            call(abi.clone(), "increment", json!(["-1"])),
            "function_args[0]",
        ),
        (
            "uint256 overflow",
            call(abi.clone(), "increment", json!([over_u256])),
            "function_args[0]",
        ),
        (
            "fractional uint256",
            call(abi.clone(), "increment", json!([1.5])),
            "function_args[0]",
        ),
        (
            "string for a bool",
            call(abi.clone(), "setPaused", json!(["yes"])),
            "function_args[0]",
        ),
        (
            "both data and an ABI",
            {
                let mut b = call(abi.clone(), "increment", json!([1]));
                b["data"] = json!("0xd0e30db0");
                b
            },
            "data",
        ),
        (
            "function without an ABI",
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "function_name": "increment", "function_args": [1]}),
            "contract_abi",
        ),
        (
            "ABI without a function",
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "contract_abi": abi}),
            "function_name",
        ),
        (
            "value overflow",
            {
                let mut b = call(abi.clone(), "increment", json!([1]));
                b["value"] = json!(over_u256);
                b
            },
            "value",
        ),
        (
            "ABI on a native transfer",
            {
                let mut b = native_body(&wallet, RECIPIENT, 1);
                b["contract_abi"] = abi.clone();
                b
            },
            "contract_abi",
        ),
    ];
    for (case, body, field) in cases {
        let resp = app
            .post("/api/prepare_transaction", &agent.auth(), body)
            .await;
        assert_eq!(resp.0, StatusCode::BAD_REQUEST, "{case}: {}", resp.1);
        assert_eq!(
            resp.1["error"]["code"], "invalid_field",
            "{case}: {}",
            resp.1
        );
        assert_eq!(resp.1["error"]["field"], field, "{case}: {}", resp.1);
    }

    // The user-initiated endpoints refuse the same way, before the password or code is looked
    // at.
    let base = |path: &'static str, extra: Value| {
        let mut b = json!({"password": PASSWORD, "mfa_code": UNUSED_CODE,
                           "wallet_address": wallet});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        (path, b)
    };
    let cases = vec![
        (
            base(
                "/api/transfer",
                json!({"to_address": RECIPIENT, "amount": over_u256}),
            ),
            "amount",
        ),
        (
            base(
                "/api/transfer",
                json!({"to_address": RECIPIENT, "amount": "1.5"}),
            ),
            "amount",
        ),
        (
            base(
                "/api/transfer_erc20",
                json!({"token_address": "0x1234", "to_address": RECIPIENT, "amount": "1"}),
            ),
            "token_address",
        ),
        (
            base(
                "/api/contract_call",
                json!({"contract_address": target, "contract_abi": abi,
                       "function_name": "increment", "function_args": ["ten"]}),
            ),
            "function_args[0]",
        ),
        (
            base(
                "/api/contract_call",
                json!({"contract_address": target, "contract_abi": abi,
                       "function_name": "increment", "function_args": [1],
                       "value": over_u256}),
            ),
            "value",
        ),
        (
            base(
                "/api/contract_call",
                json!({"contract_address": target, "contract_abi": "nope",
                       "function_name": "increment", "function_args": [1]}),
            ),
            "contract_abi",
        ),
    ];
    for ((path, body), field) in cases {
        let resp = app.post(path, &user.auth(), body).await;
        assert_eq!(resp.0, StatusCode::BAD_REQUEST, "{path}: {}", resp.1);
        assert_eq!(resp.1["error"]["field"], field, "{path}: {}", resp.1);
    }
    assert_eq!(
        transactions_of(&app, &user.auth()).await,
        Vec::<Value>::new()
    );
    app.cleanup().await;
}
