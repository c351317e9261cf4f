//! The write path (src/writer.rs): a command decided on documents read earlier — from a node's
//! cache — commits only if they are unchanged, whichever node changed them; PostgreSQL's
//! one-statement fast path is taken, and gives way to the general path whenever anything but
//! this node's writer wrote in between, losing nothing; concurrent simulations share JSON-RPC
//! batches without mixing up their answers; a call written on a connection the node closed is
//! sent again on a new one.

use std::sync::Arc;

use aggregates::{Address, ApiKeyEvent};
use countersign::projector::Projector;
use countersign::store::Db;
use countersign::writer::{DocumentChanged, Unchanged, Writer};
use cqrs_es::persist::{PersistenceError, SerializedEvent};
use projections::{ApiKeyView, ViewKind};
use reqwest::StatusCode;
use serde_json::json;
use time::OffsetDateTime;

use crate::helpers::*;
use crate::nodes::{
    behind_chain_proxy, post_at, small_pool, socket_addr, Fault, FaultProxy, Node, ServerProcess,
};
use crate::on_both_backends;

on_both_backends!(
    a_command_decided_on_a_document_that_changed_since_is_refused,
    a_key_revoked_while_its_prepare_waits_on_the_chain_stops_the_prepare,
    concurrent_simulations_share_batches_and_each_gets_its_own_answer,
    a_simulation_on_a_connection_the_node_closed_is_sent_again,
    an_execution_on_connections_the_node_closed_is_sent_again,
);

const ETH: u128 = 1_000_000_000_000_000_000;

/// A fresh database of `backend`, migrated, and a connection to it.
async fn migrated(backend: Backend) -> (Store, Db) {
    let store = Store::new(backend).await;
    let db = Db::connect(&store.url).await.unwrap();
    db.migrate().await.unwrap();
    (store, db)
}

/// A writer of its own on `db`, as a node has.
fn writer_on(db: &Db) -> (Arc<Projector>, Writer) {
    let projector = Arc::new(Projector::new(db.clone()));
    let writer = Writer::spawn(projector.clone(), None).expect("writer starts");
    (projector, writer)
}

fn event(id: &str, sequence: usize, event: &ApiKeyEvent) -> SerializedEvent {
    use cqrs_es::DomainEvent;
    SerializedEvent {
        aggregate_id: id.to_owned(),
        sequence,
        aggregate_type: "ApiKey".into(),
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_value(event).unwrap(),
        metadata: json!({"actor": "test", "actor_type": "system"}),
    }
}

fn issued(id: &str) -> SerializedEvent {
    event(
        id,
        1,
        &ApiKeyEvent::ApiKeyIssued {
            api_key_id: id.to_owned(),
            owner_user_id: "owner".into(),
            name: id.to_owned(),
            wallet_addresses: None::<Vec<Address>>,
            issued_at: OffsetDateTime::now_utc(),
        },
    )
}

fn revoked(id: &str) -> SerializedEvent {
    event(
        id,
        2,
        &ApiKeyEvent::ApiKeyRevoked {
            revoked_by: "owner".into(),
            revoked_at: OffsetDateTime::now_utc(),
        },
    )
}

/// Where the view of key `id` is now.
async fn position_of(db: &Db, id: &str) -> i64 {
    let (_, position): (ApiKeyView, i64) = db
        .view_at(ViewKind::ApiKey, id)
        .await
        .unwrap()
        .expect("the key's view");
    position
}

fn key_read(id: &str, as_of: i64) -> Vec<Unchanged> {
    vec![Unchanged {
        kind: ViewKind::ApiKey,
        id: id.to_owned(),
        as_of,
    }]
}

fn assert_changed(result: Result<(), PersistenceError>) {
    match result {
        Err(PersistenceError::UnknownError(e)) if e.is::<DocumentChanged>() => {}
        other => panic!("expected DocumentChanged, got {other:?}"),
    }
}

/// New keys stand in for commands (each creates its own document); the key `k` stands in for a
/// document they were decided on. Each is appended as its command's only event, the way the
/// server appends a prepare: by whichever path the writer picks.
async fn a_command_decided_on_a_document_that_changed_since_is_refused(backend: Backend) {
    let (store, db) = migrated(backend).await;
    let (projector, writer) = writer_on(&db);
    let command = |n: usize| issued(&format!("command-{n}"));

    writer
        .append("ApiKey", &[issued("k")], vec![])
        .await
        .unwrap();
    let read_at = position_of(&db, "k").await;
    // Decided on the key as it is: committed, first by the general path (which reads the key
    // under its lock), then — on PostgreSQL — by the fast path from what the writer remembers.
    for n in 0..3 {
        writer
            .append("ApiKey", &[command(n)], key_read("k", read_at))
            .await
            .unwrap();
    }
    // A read older than the key's current state is stale even if nothing changed since: the
    // document was at `read_at` when read.
    assert_changed(
        writer
            .append("ApiKey", &[command(3)], key_read("k", read_at - 1))
            .await,
    );

    // The key changes; a command decided on the old copy is refused, one on the new accepted.
    writer
        .append("ApiKey", &[revoked("k")], vec![])
        .await
        .unwrap();
    assert_changed(
        writer
            .append("ApiKey", &[command(4)], key_read("k", read_at))
            .await,
    );
    let now_at = position_of(&db, "k").await;
    assert!(now_at > read_at);
    writer
        .append("ApiKey", &[command(5)], key_read("k", now_at))
        .await
        .unwrap();

    // Another node's writer changes a document this writer remembers: this writer's next
    // command decided on the old copy is still refused.
    writer
        .append("ApiKey", &[issued("j")], vec![])
        .await
        .unwrap();
    let j_at = position_of(&db, "j").await;
    writer
        .append("ApiKey", &[command(6)], key_read("j", j_at))
        .await
        .unwrap();
    let (_other_projector, other) = writer_on(&db);
    other
        .append("ApiKey", &[revoked("j")], vec![])
        .await
        .unwrap();
    assert_changed(
        writer
            .append("ApiKey", &[command(7)], key_read("j", j_at))
            .await,
    );
    // Nothing refused was written.
    for n in [3, 4, 7] {
        let missing: Option<(ApiKeyView, i64)> = db
            .view_at(ViewKind::ApiKey, &format!("command-{n}"))
            .await
            .unwrap();
        assert!(missing.is_none(), "refused command {n} was written");
        assert!(db
            .events_of("ApiKey", &format!("command-{n}"))
            .await
            .unwrap()
            .is_empty());
    }
    let (fast, general) = projector.batches();
    if backend == Backend::Postgres {
        assert!(fast >= 2, "fast {fast}, general {general}");
    } else {
        assert_eq!(fast, 0);
    }
    db.close().await;
    store.cleanup().await;
}

/// An event written by something that does not project (here: straight into the table) between
/// two fast batches: the next batch finds the positions moved, the general path folds the
/// stranger in, and the fast path resumes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_written_behind_the_writer_s_back_is_projected_and_the_fast_path_resumes() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let (store, db) = migrated(Backend::Postgres).await;
    let (projector, writer) = writer_on(&db);
    for n in 0..3 {
        writer
            .append("ApiKey", &[issued(&format!("before-{n}"))], vec![])
            .await
            .unwrap();
    }
    let (fast_before, _) = projector.batches();
    assert!(fast_before >= 1);

    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let stranger = issued("stranger");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('ApiKey', 'stranger', 1, $1, $2, $3::json, '{}'::json)",
    )
    .bind(&stranger.event_type)
    .bind(&stranger.event_version)
    .bind(stranger.payload.to_string())
    .execute(pool)
    .await
    .unwrap();

    for n in 0..3 {
        writer
            .append("ApiKey", &[issued(&format!("after-{n}"))], vec![])
            .await
            .unwrap();
    }
    let (fast, general) = projector.batches();
    assert!(general >= 2, "the stranger was not met by the general path");
    assert!(fast > fast_before, "the fast path did not resume");
    for id in ["stranger", "after-0", "after-2"] {
        position_of(&db, id).await;
    }
    let checkpoint = db.projection_checkpoint().await.unwrap();
    let head: i64 = sqlx::query_scalar("SELECT MAX(position) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(checkpoint, head);
    db.close().await;
    store.cleanup().await;
}

/// PostgreSQL goes away while a fast batch waits for a connection (the pool retries refused
/// connections for its 10 s): the commands folded into the next batch meanwhile fail with it,
/// as a 503, instead of waiting out another 10 s each behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_waiting_behind_a_fast_batch_that_cannot_reach_the_database_fail_with_it() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let (store, migrating) = migrated(Backend::Postgres).await;
    migrating.close().await;
    let proxy = FaultProxy::start(socket_addr(&store.url)).await;
    let db = Db::connect(&proxy.url_for(&store.url)).await.unwrap();
    let (projector, writer) = writer_on(&db);
    writer
        .append("ApiKey", &[issued("first")], vec![])
        .await
        .unwrap();

    // Its connection cut and its port closed, as when PostgreSQL crashed: idle over a second,
    // the writer's connection is pinged before use and found dead, and new ones are refused
    // until the pool gives up.
    proxy.set(Fault::Reset);
    drop(proxy);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    let at_database = tokio::spawn({
        let writer = writer.clone();
        async move { writer.append("ApiKey", &[issued("second")], vec![]).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let behind = (0..3).map(|n| {
        let writer = writer.clone();
        tokio::spawn(async move {
            let result = writer
                .append("ApiKey", &[issued(&format!("behind-{n}"))], vec![])
                .await;
            (result, std::time::Instant::now())
        })
    });
    let behind = futures::future::join_all(behind).await;
    let first = at_database.await.unwrap();
    assert!(
        matches!(first, Err(PersistenceError::ConnectionError(_))),
        "{first:?}"
    );
    for answer in behind {
        let (result, at) = answer.unwrap();
        assert!(
            matches!(result, Err(PersistenceError::ConnectionError(_))),
            "{result:?}"
        );
        let took = at - started;
        assert!(
            took < std::time::Duration::from_secs(14),
            "waited out a second timeout: {took:?}"
        );
    }
    // (The writer knew the checkpoint from `first`: `second` went the fast way.)
    assert_eq!(projector.batches(), (0, 1));
    db.close().await;
    store.cleanup().await;
}

/// The key's revocation committed on one node refuses a prepare on another node that has the
/// key in its cache, whether or not that node's hub has seen the revocation yet: 401, never 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_on_another_node_after_the_key_was_revoked_is_refused() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let app = TestApp::spawn_with(Backend::Postgres, Some(small_pool)).await;
    let second = ServerProcess::start(&app).await;
    for round in 0..3 {
        let (owner, wallet, agent) = app
            .user_with_wallet(&format!("revoke-race-{round}"), ETH)
            .await;
        // The second node reads the key and wallet and keeps them.
        for _ in 0..3 {
            let (status, body) = post_at(
                &second.address,
                "/api/prepare_transaction",
                &agent.auth(),
                native_body(&wallet, &random_address(), 1),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        let (status, body) = app
            .delete(&format!("/api/api_keys/{}", agent.id), &owner.auth())
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let refused = post_at(
            &second.address,
            "/api/prepare_transaction",
            &agent.auth(),
            native_body(&wallet, &random_address(), 1),
        )
        .await;
        assert_error(&refused, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    drop(second);
    app.cleanup().await;
}

/// A prepare reads the key (from the node's cache when it can), then waits on its simulation:
/// here the chain never answers, for two seconds. The owner revokes the key meanwhile. The
/// prepare was decided on the key as it was, so it does not commit; decided again on the
/// key as it is now, it is a 401 — as any request after the revocation.
async fn a_key_revoked_while_its_prepare_waits_on_the_chain_stops_the_prepare(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, Some(small_pool)).await;
    let (owner, wallet, agent) = app.user_with_wallet("revoke-midway", ETH).await;
    app.prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;

    app.stop().await;
    let proxy = FaultProxy::start(socket_addr(&app.anvil.url)).await;
    let mut config = app.config();
    config.chain_url = proxy.url_for(&app.anvil.url).parse().unwrap();
    config.chain_timeout = std::time::Duration::from_secs(2);
    let node = Node::start(config).await;
    app.address = node.address.clone();
    // Twice through the node: the second read of the key may come from its cache.
    for _ in 0..2 {
        app.prepare(&agent, native_body(&wallet, &random_address(), 1))
            .await;
    }

    proxy.set(Fault::Blackhole);
    let waiting = {
        let (address, auth) = (node.address.clone(), agent.auth());
        let body = native_body(&wallet, &random_address(), 1);
        tokio::spawn(
            async move { post_at(&address, "/api/prepare_transaction", &auth, body).await },
        )
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, body) = app
        .delete(&format!("/api/api_keys/{}", agent.id), &owner.auth())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let refused = waiting.await.unwrap();
    assert_error(&refused, StatusCode::UNAUTHORIZED, "unauthorized");
    // Three prompts, not four.
    let (status, list) = app
        .get(
            "/api/transactions?status=pending_authorization",
            &owner.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["transactions"].as_array().unwrap().len(), 3, "{list}");
    proxy.set(Fault::None);
    node.stop().await;
    app.cleanup().await;
}

/// Prepares that simulate at once share JSON-RPC batches to the node: each still gets its own
/// outcome (a revert for the calls to a paused contract, a gas estimate for the transfers).
async fn concurrent_simulations_share_batches_and_each_gets_its_own_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_user, wallet, agent) = app.user_with_wallet("batch-sim", ETH).await;
    let target = app
        .anvil
        .deploy(
            serde_json::from_str::<serde_json::Value>(include_str!("../contracts/Target.json"))
                .unwrap()["bytecode"]
                .as_str()
                .unwrap(),
        )
        .await;
    // pause(true): `increment` reverts with a reason from now on.
    app.anvil
        .send_from_dev(json!({
            "from": ANVIL_ACCOUNT_0, "to": target,
            "data": format!("0x16c38b3c{:064x}", 1),
        }))
        .await;
    let abi = serde_json::from_str::<serde_json::Value>(include_str!("../contracts/Target.json"))
        .unwrap()["abi"]
        .clone();
    let requests = (0..16).map(|i| {
        let body = if i % 2 == 0 {
            native_body(&wallet, &random_address(), 1)
        } else {
            json!({"wallet_address": wallet, "kind": "contract_call", "to": target,
                   "contract_abi": abi, "function_name": "increment", "function_args": ["1"]})
        };
        let (app, auth) = (&app, agent.auth());
        async move { (i, app.post("/api/prepare_transaction", &auth, body).await) }
    });
    let answers = futures::future::join_all(requests).await;
    for (i, (status, body)) in answers {
        assert_eq!(status, StatusCode::CREATED, "{body}");
        if i % 2 == 0 {
            assert_eq!(body["simulation"]["status"], "success", "{body}");
            assert_eq!(body["gas_estimate"], 21_000, "{body}");
        } else {
            assert_eq!(
                body["simulation"],
                json!({"status": "reverted", "reason": "Target: paused"}),
                "{body}"
            );
            assert!(body["gas_estimate"].is_null(), "{body}");
        }
    }
    app.cleanup().await;
}

/// The node (here a proxy in front of it) closes the server's idle keep-alive connections, as
/// a restarted node or a load balancer does: the next simulation, written on a connection
/// found dead only then, is sent again on a new one instead of reporting the node unreachable.
async fn a_simulation_on_a_connection_the_node_closed_is_sent_again(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (_owner, wallet, agent) = app.user_with_wallet("reconnect", ETH).await;
    let (proxy, node) = behind_chain_proxy(&mut app, None).await;
    for _ in 0..5 {
        app.prepare(&agent, native_body(&wallet, &random_address(), 1))
            .await;
        // Every pooled connection is dead, unbeknown to the server.
        proxy.set(Fault::Stale);
        let (status, body) = app
            .post(
                "/api/prepare_transaction",
                &agent.auth(),
                native_body(&wallet, &random_address(), 1),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["simulation"]["status"], "success", "{body}");
    }
    node.stop().await;
    app.cleanup().await;
}

/// The same for every other call to the node: execution's fee estimate, nonce and broadcast,
/// each possibly the first write on a pooled connection the node closed, are sent again on a
/// new connection, and the agent gets its transaction on chain instead of a 503
/// `chain_unavailable`.
async fn an_execution_on_connections_the_node_closed_is_sent_again(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (mut owner, wallet, agent) = app.user_with_wallet("reexecute", ETH).await;
    let (proxy, node) = behind_chain_proxy(&mut app, None).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            app.prepare(&agent, native_body(&wallet, &random_address(), 1))
                .await,
        );
    }
    let (status, body) = app.authorize_all(&mut owner, &ids).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for id in &ids {
        // Every pooled connection is dead, unbeknown to the server.
        proxy.set(Fault::Stale);
        let (status, body) = app
            .post(
                "/api/execute_transaction",
                &agent.auth(),
                json!({"transaction_id": id}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for id in &ids {
        app.wait_for_status(&agent.auth(), id, "confirmed").await;
    }
    node.stop().await;
    app.cleanup().await;
}
