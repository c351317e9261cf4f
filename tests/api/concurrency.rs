//! Concurrency across nodes: racing decisions and executions on one transaction, and racing
//! executions of many transactions from one wallet, through two server processes sharing one
//! PostgreSQL database — the test's own server and a `countersign serve` child process (on
//! SQLite, which is single-node, the same races through one server).
//! Every race ends in exactly one outcome, at most one broadcast per transaction, nonces
//! without gaps or repeats, and conflicts answered 409 (or 403 for a spent code), never 5xx.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::nodes::{get_at, post_at, small_pool, ServerProcess};
use crate::on_both_backends;

on_both_backends!(
    racing_authorize_reject_and_execute_on_one_transaction_have_one_outcome,
    racing_executions_of_one_transaction_broadcast_it_once,
    executions_from_one_wallet_through_two_nodes_take_consecutive_nonces,
);

const ETH: u128 = 1_000_000_000_000_000_000;

/// Two nodes on one store: the `TestApp`'s server and, on PostgreSQL, the server binary in a
/// process of its own. On SQLite both "nodes" are the one server.
struct Cluster {
    app: TestApp,
    second: Option<ServerProcess>,
}

impl Cluster {
    async fn start(backend: Backend) -> Self {
        let app = TestApp::spawn_with(backend, Some(small_pool)).await;
        let second = match backend {
            Backend::Postgres => Some(ServerProcess::start(&app).await),
            Backend::Sqlite => None,
        };
        Self { app, second }
    }

    /// The node serving request `i` (alternating).
    fn node(&self, i: usize) -> String {
        match (&self.second, i % 2) {
            (Some(node), 1) => node.address.clone(),
            _ => self.app.address.clone(),
        }
    }

    async fn cleanup(self) {
        drop(self.second);
        self.app.cleanup().await;
    }
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

fn count(types: &[String], name: &str) -> usize {
    types.iter().filter(|t| *t == name).count()
}

/// A losing request: a JSON 409 (or 403 for an authorization whose code the winner spent).
fn assert_lost(path: &str, status: StatusCode, body: &Value) {
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let allowed = match status {
        StatusCode::CONFLICT => matches!(code, "invalid_state" | "conflict"),
        StatusCode::FORBIDDEN => path.contains("authorize") && code == "mfa_code_replayed",
        _ => false,
    };
    assert!(allowed, "{path}: unexpected {status} {body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

async fn racing_authorize_reject_and_execute_on_one_transaction_have_one_outcome(backend: Backend) {
    let cluster = Cluster::start(backend).await;
    let app = &cluster.app;
    let (mut user, wallet, agent) = app.user_with_wallet("rosa", 10 * ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, 1234))
        .await;

    // Two authorizations (one code between them), four rejections and four executions, all
    // at once, spread over both nodes.
    let code = user.fresh_code().await;
    let requests = (0..10).map(|i| {
        let node = cluster.node(i);
        let (path, auth, body) = match i {
            0 | 1 => (
                "/api/authorize_transaction",
                user.auth(),
                json!({"transaction_id": tx, "mfa_code": code}),
            ),
            2..=5 => (
                "/api/reject_transaction",
                user.auth(),
                json!({"transaction_id": tx, "reason": "race"}),
            ),
            _ => (
                "/api/execute_transaction",
                agent.auth(),
                json!({"transaction_id": tx}),
            ),
        };
        async move { (path, post_at(&node, path, &auth, body).await) }
    });
    let results = join_all(requests).await;

    let mut decided = vec![];
    let mut hashes = vec![];
    for (path, (status, body)) in &results {
        if *status == StatusCode::OK {
            match *path {
                "/api/execute_transaction" => hashes.push(body["tx_hash"].clone()),
                _ => decided.push(*path),
            }
        } else {
            assert_lost(path, *status, body);
        }
    }
    assert_eq!(decided.len(), 1, "exactly one decision wins: {results:?}");
    let authorized = decided[0] == "/api/authorize_transaction";
    assert!(authorized || hashes.is_empty(), "executed while rejected");
    hashes.dedup();
    assert!(hashes.len() <= 1, "one signed transaction: {hashes:?}");

    let types = event_types(app, &user.auth(), &tx).await;
    assert_eq!(
        count(&types, "TransactionAuthorized") + count(&types, "TransactionRejected"),
        1,
        "{types:?}"
    );
    let view = app.status(&user.auth(), &tx).await;
    if authorized {
        // The executions may all have come before the authorization: one more, then mined.
        let (status, body) = app
            .post(
                "/api/execute_transaction",
                &agent.auth(),
                json!({"transaction_id": tx}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if let Some(hash) = hashes.first() {
            assert_eq!(&body["tx_hash"], hash);
        }
        app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
        assert_eq!(app.onchain_nonce(&wallet).await, 1);
        assert_eq!(app.anvil.balance(&recipient).await, 1234);
        let types = event_types(app, &user.auth(), &tx).await;
        assert_eq!(count(&types, "TransactionExecuted"), 1, "{types:?}");
    } else {
        assert_eq!(view["status"], "rejected");
        let resp = app
            .post(
                "/api/execute_transaction",
                &agent.auth(),
                json!({"transaction_id": tx}),
            )
            .await;
        assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
        assert_eq!(app.onchain_nonce(&wallet).await, 0);
        assert_eq!(app.anvil.balance(&recipient).await, 0);
        assert_eq!(count(&types, "TransactionExecuted"), 0, "{types:?}");
    }
    cluster.cleanup().await;
}

async fn racing_executions_of_one_transaction_broadcast_it_once(backend: Backend) {
    let cluster = Cluster::start(backend).await;
    let app = &cluster.app;
    let (mut user, wallet, agent) = app.user_with_wallet("sven", 10 * ETH).await;
    let recipient = random_address();
    let tx = app
        .prepare(&agent, native_body(&wallet, &recipient, 777))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let requests = (0..8).map(|i| {
        let node = cluster.node(i);
        let auth = agent.auth();
        let body = json!({"transaction_id": tx});
        async move { post_at(&node, "/api/execute_transaction", &auth, body).await }
    });
    let results = join_all(requests).await;
    let first_hash = results[0].1["tx_hash"].clone();
    assert!(first_hash.is_string(), "{results:?}");
    for (status, body) in &results {
        assert_eq!(
            *status,
            StatusCode::OK,
            "every repeat answers the one hash: {body}"
        );
        assert_eq!(body["tx_hash"], first_hash, "{results:?}");
    }

    let view = app.wait_for_status(&agent.auth(), &tx, "confirmed").await;
    assert_eq!(view["tx_hash"], first_hash);
    assert_eq!(view["nonce"], 0);
    assert_eq!(app.onchain_nonce(&wallet).await, 1, "broadcast once");
    assert_eq!(app.anvil.balance(&recipient).await, 777, "paid once");
    let types = event_types(app, &user.auth(), &tx).await;
    assert_eq!(count(&types, "TransactionExecuted"), 1, "{types:?}");
    cluster.cleanup().await;
}

async fn executions_from_one_wallet_through_two_nodes_take_consecutive_nonces(backend: Backend) {
    let cluster = Cluster::start(backend).await;
    let app = &cluster.app;
    let (mut user, wallet, agent) = app.user_with_wallet("tove", 10 * ETH).await;
    const N: usize = 6;
    let mut txs = vec![];
    for i in 0..N {
        let recipient = random_address();
        let amount = 1000 + i as u128;
        let tx = app
            .prepare(&agent, native_body(&wallet, &recipient, amount))
            .await;
        txs.push((tx, recipient, amount));
    }
    let ids: Vec<&str> = txs.iter().map(|(tx, _, _)| tx.as_str()).collect();
    let (status, body) = app.authorize_all(&mut user, &ids).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Each transaction executed twice, once through each node, all at once.
    let requests = (0..2 * N).map(|i| {
        let node = cluster.node(i);
        let tx = txs[i / 2].0.clone();
        let auth = agent.auth();
        async move {
            let result = post_at(
                &node,
                "/api/execute_transaction",
                &auth,
                json!({"transaction_id": tx}),
            )
            .await;
            (tx, result)
        }
    });
    let results = join_all(requests).await;
    for pair in results.chunks(2) {
        for (_, (status, body)) in pair {
            assert_eq!(*status, StatusCode::OK, "{body}");
        }
        assert_eq!(pair[0].1 .1["tx_hash"], pair[1].1 .1["tx_hash"], "{pair:?}");
    }

    let mut nonces = vec![];
    for (tx, recipient, amount) in &txs {
        // Read through the other node too: both see the same state.
        let (status, view) = get_at(
            &cluster.node(1),
            &format!("/api/transaction_status?transaction_id={tx}"),
            &agent.auth(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{view}");
        let view = app.wait_for_status(&agent.auth(), tx, "confirmed").await;
        nonces.push(view["nonce"].as_u64().unwrap());
        assert_eq!(app.anvil.balance(recipient).await, *amount, "paid once");
    }
    nonces.sort();
    assert_eq!(
        nonces,
        (0..N as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert_eq!(app.onchain_nonce(&wallet).await, N as u64);
    cluster.cleanup().await;
}
