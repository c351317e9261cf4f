//! Agents' `transaction_status` polls are answered from memory (src/read_cache.rs), yet never
//! show a change late on the node that made it: an authorization or a revocation is visible to
//! the very next poll. On another node (PostgreSQL) they become visible as soon as its push hub
//! has read them. With the database gone the cache stops answering instead of serving copies
//! it can no longer check.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::*;
use crate::nodes::{get_at, small_pool, FaultProxy, ServerProcess};
use crate::on_both_backends;

on_both_backends!(status_polls_from_memory_see_each_change_at_once_on_the_node_that_made_it);

const ETH: u128 = 1_000_000_000_000_000_000;

/// `countersign_read_cache_lookups_total{result}` on the server at `base`.
async fn lookups(base: &str, result: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("countersign_read_cache_lookups_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

fn status_path(tx: &str) -> String {
    format!("/api/transaction_status?transaction_id={tx}")
}

/// Poll the pending `tx` on `base` until two polls were answered from memory: until its hub
/// has first confirmed it is current (one tick after start), polls go to the database.
async fn poll_until_answered_from_memory(base: &str, auth: &Auth, tx: &str) {
    let hits = lookups(base, "hit").await;
    let started = Instant::now();
    while lookups(base, "hit").await < hits + 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{base} never answered status polls from memory"
        );
        let (status, body) = get_at(base, &status_path(tx), auth).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "pending_authorization");
    }
}

/// Poll on `base` until the reply satisfies `done`; at most `within`.
async fn poll_until(
    base: &str,
    auth: &Auth,
    tx: &str,
    within: Duration,
    what: &str,
    done: impl Fn(StatusCode, &serde_json::Value) -> bool,
) {
    let started = Instant::now();
    loop {
        let (status, body) = get_at(base, &status_path(tx), auth).await;
        if done(status, &body) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{base} never showed {what}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two polls fill and then hit the cache; the owner's authorization and then the key's
/// revocation must each be what the next poll sees.
async fn status_polls_from_memory_see_each_change_at_once_on_the_node_that_made_it(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (mut owner, wallet, agent) = app.user_with_wallet("cache-owner", ETH).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    poll_until_answered_from_memory(&app.address, &agent.auth(), &tx).await;

    let (status, body) = app.authorize(&mut owner, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = app.status(&agent.auth(), &tx).await;
    assert_eq!(after["status"], "authorized", "the very next poll: {after}");
    // And the new document is what the database holds.
    let (status, owners) = app.get(&status_path(&tx), &owner.auth()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(owners, app.status(&agent.auth(), &tx).await);

    let (status, body) = app
        .delete(&format!("/api/api_keys/{}", agent.id), &owner.auth())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let resp = app.get(&status_path(&tx), &agent.auth()).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    app.cleanup().await;
}

/// A second node (the server binary) holds the documents in its cache; changes committed by
/// the first node reach its polls through its push hub, within the hub's lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_s_cache_follows_commits_made_elsewhere() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let app = TestApp::spawn_with(Backend::Postgres, Some(small_pool)).await;
    let second = ServerProcess::start(&app).await;
    let (mut owner, wallet, agent) = app.user_with_wallet("cache-nodes", ETH).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    poll_until_answered_from_memory(&second.address, &agent.auth(), &tx).await;

    let (status, body) = app.authorize(&mut owner, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // NOTIFY wakes the second node's hub; its fallback tick is 1 s.
    poll_until(
        &second.address,
        &agent.auth(),
        &tx,
        Duration::from_secs(3),
        "the authorization",
        |status, body| status == StatusCode::OK && body["status"] == "authorized",
    )
    .await;

    let (status, body) = app
        .delete(&format!("/api/api_keys/{}", agent.id), &owner.auth())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    poll_until(
        &second.address,
        &agent.auth(),
        &tx,
        Duration::from_secs(3),
        "the revocation",
        |status, body| {
            status == StatusCode::UNAUTHORIZED && body["error"]["code"] == "unauthorized"
        },
    )
    .await;
    drop(second);
    app.cleanup().await;
}

/// Cut off from PostgreSQL, a node's hub cannot confirm it is current: within the cache's
/// two-second allowance polls get the store's 503, not copies that can no longer be checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_database_stops_answering_from_memory() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let store = TestApp::spawn(Backend::Postgres).await;
    let proxy = FaultProxy::start(crate::nodes::socket_addr(&store.store.url)).await;
    let mut config = store.config();
    config.database_url = proxy.url_for(&store.store.url);
    small_pool(&mut config);
    let node = crate::nodes::Node::start(config).await;
    let (_owner, wallet, agent) = store.user_with_wallet("cache-cut", ETH).await;
    let tx = store
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    poll_until_answered_from_memory(&node.address, &agent.auth(), &tx).await;

    proxy.set(crate::nodes::Fault::Reset);
    let cut = Instant::now();
    poll_until(
        &node.address,
        &agent.auth(),
        &tx,
        Duration::from_secs(15),
        "a 503 while the database is unreachable",
        |status, body| {
            status == StatusCode::SERVICE_UNAVAILABLE && body["error"]["code"].is_string()
        },
    )
    .await;
    // Copies may be served only within the allowance (plus a pool timeout for the miss).
    assert!(
        cut.elapsed() < Duration::from_secs(14),
        "{:?}",
        cut.elapsed()
    );
    proxy.set(crate::nodes::Fault::None);
    node.stop().await;
    store.cleanup().await;
}
