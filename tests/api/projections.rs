//! Views are exact: every committed event is applied once, in commit order — with concurrent
//! writers, with a second node's projector racing this one, and across a crash.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aggregates::{
    SecurityLog, SecurityLogCommand, SecurityLogError, Transaction, TransactionCommand,
};
use countersign::chain::KeyringSigner;
use countersign::projector::{
    document_positions_sql, Projector, EXECUTED_TRANSACTIONS, EXECUTED_TRANSACTIONS_OF,
};
use countersign::store::{Actor, Db};
use countersign::writer::{Writer, NEW_AGGREGATE};
use countersign::Application;
use cqrs_es::AggregateError;
use futures::future::join_all;
use projections::{TransactionView, ViewKind};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    views_are_exact_under_concurrent_writers_and_two_projectors,
    events_committed_while_no_server_runs_reach_views_at_start,
    views_are_exact_after_a_crash_under_load,
    a_commit_folds_events_another_writer_left_unprojected,
    a_made_up_id_that_is_taken_conflicts_instead_of_forking_history,
    view_queries_go_through_their_indexes,
);

async fn checkpoint(db: &Db) -> i64 {
    let sql = "SELECT position FROM projection_checkpoints WHERE name = 'views'";
    match db {
        Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

/// Compare every transaction view with the event log it was built from.
async fn assert_views_exact(db: &Db) -> usize {
    let events = db.events_after(0, 1_000_000).await.unwrap();
    assert!(!events.is_empty());
    // Positions are unique and increasing, and follow each aggregate's own sequence.
    assert!(events.windows(2).all(|w| w[0].position < w[1].position));
    let mut per_aggregate: HashMap<(String, String), Vec<&projections::StoredEvent>> =
        HashMap::new();
    for e in &events {
        per_aggregate
            .entry((e.aggregate_type.clone(), e.aggregate_id.clone()))
            .or_default()
            .push(e);
    }
    for list in per_aggregate.values() {
        assert!(list.windows(2).all(|w| w[0].sequence < w[1].sequence));
    }
    assert_eq!(checkpoint(db).await, events.last().unwrap().position);

    let mut checked = 0;
    for ((kind, id), list) in &per_aggregate {
        if kind != "Transaction" {
            continue;
        }
        let view: TransactionView = db
            .view(ViewKind::Transaction, id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no view for transaction {id}"));
        assert_eq!(
            view.version as usize,
            list.len(),
            "view {id} missed or doubled events"
        );
        assert_eq!(view.position, list.last().unwrap().position);
        let expected_status = match list.last().unwrap().event_type.as_str() {
            "TransactionPrepared" => "pending_authorization",
            "TransactionRejected" => "rejected",
            "TransactionAuthorized" => "authorized",
            other => panic!("unexpected event {other}"),
        };
        assert_eq!(view.status, expected_status);
        checked += 1;
    }
    checked
}

async fn views_are_exact_under_concurrent_writers_and_two_projectors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("erin", 0).await;

    // A second node's projector, on its own pool, racing the server's own.
    let other_db = Db::connect(&app.store.url).await.unwrap();
    let other = Arc::new(Projector::new(other_db.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let racer = tokio::spawn({
        let (other, stop) = (other.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                other.catch_up().await.expect("second projector");
                tokio::task::yield_now().await;
            }
        }
    });

    let ids: Vec<String> = join_all(
        (0..24u128).map(|i| app.prepare(&agent, native_body(&wallet, &random_address(), i + 1))),
    )
    .await;
    let owner = user.auth();
    let rejections = join_all(ids.iter().step_by(2).map(|id| {
        app.post(
            "/api/reject_transaction",
            &owner,
            json!({"transaction_id": id, "reason": "not now"}),
        )
    }))
    .await;
    assert!(rejections.iter().all(|(s, _)| *s == StatusCode::OK));
    stop.store(true, Ordering::Relaxed);
    racer.await.unwrap();
    other.catch_up().await.unwrap();

    assert_eq!(assert_views_exact(&other_db).await, 24);
    // What the API serves is the same view.
    let (_, listed) = app
        .get("/api/transactions?status=rejected", &user.auth())
        .await;
    assert_eq!(listed["transactions"].as_array().unwrap().len(), 12);
    other_db.close().await;
    app.cleanup().await;
}

async fn events_committed_while_no_server_runs_reach_views_at_start(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("frank", 0).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    app.stop().await;

    // Another node commits an event and dies before any projector runs.
    let db = Db::connect(&app.store.url).await.unwrap();
    let signer = Arc::new(KeyringSigner::new(
        db.clone(),
        Arc::new(app.config().master_key),
    ));
    // The backend's plain cqrs-es repository: it appends without projecting.
    let transactions = cqrs_es::CqrsFramework::<Transaction, _>::new(
        cqrs_es::persist::PersistedEventStore::new_event_store(db.event_repository()),
        vec![],
        signer as aggregates::TransactionServices,
    );
    transactions
        .execute_with_metadata(
            &tx,
            TransactionCommand::Reject {
                user_id: user.user_id.clone(),
                reason: Some("from another node".into()),
                now: time::OffsetDateTime::now_utc(),
            },
            Actor::user(&user.user_id).metadata("test"),
        )
        .await
        .unwrap();
    db.close().await;

    app.restart().await;
    let view = app.status(&user.auth(), &tx).await;
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["rejection_reason"], "from another node");
    app.cleanup().await;
}

async fn views_are_exact_after_a_crash_under_load(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let (_user, wallet, agent) = app.user_with_wallet("grace", 0).await;
    app.stop().await;

    // Our own server instance, so it can be killed without a graceful shutdown.
    let server = Application::build(app.config()).await.unwrap();
    let base = format!("http://127.0.0.1:{}", server.port());
    let task = tokio::spawn(server.run_until(std::future::pending()));
    let client = reqwest::Client::new();
    let load = join_all((0..40u128).map(|i| {
        let (client, base, key) = (client.clone(), base.clone(), agent.key.clone());
        let body = native_body(&wallet, &random_address(), i + 1);
        async move {
            let _ = client
                .post(format!("{base}/api/prepare_transaction"))
                .header("X-API-KEY", key)
                .json(&body)
                .send()
                .await;
        }
    }));
    let crash = async {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        task.abort();
    };
    tokio::join!(load, crash);

    app.restart().await;
    let db = Db::connect(&app.store.url).await.unwrap();
    assert!(assert_views_exact(&db).await > 0);
    db.close().await;
    app.cleanup().await;
}

/// The writer folds, in its own transaction, events that a writer which does not project (an
/// older version, a tool writing SQL) committed after the checkpoint — before its own.
async fn a_commit_folds_events_another_writer_left_unprojected(backend: Backend) {
    // No periodic catch-up during the test: only the writer can fold the foreign event.
    let app = TestApp::spawn_with(
        backend,
        Some(|c| c.poll_interval = std::time::Duration::from_secs(3600)),
    )
    .await;
    let (user, wallet, agent) = app.user_with_wallet("heidi", 0).await;
    let first = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    let db = Db::connect(&app.store.url).await.unwrap();
    let before = checkpoint(&db).await;
    let signer = Arc::new(KeyringSigner::new(
        db.clone(),
        Arc::new(app.config().master_key),
    ));
    let plain = cqrs_es::CqrsFramework::<Transaction, _>::new(
        cqrs_es::persist::PersistedEventStore::new_event_store(db.event_repository()),
        vec![],
        signer as aggregates::TransactionServices,
    );
    plain
        .execute_with_metadata(
            &first,
            TransactionCommand::Reject {
                user_id: user.user_id.clone(),
                reason: Some("by a writer that does not project".into()),
                now: time::OffsetDateTime::now_utc(),
            },
            Actor::user(&user.user_id).metadata("test"),
        )
        .await
        .unwrap();
    assert_eq!(checkpoint(&db).await, before, "not projected yet");
    assert_eq!(
        app.status(&user.auth(), &first).await["status"],
        "pending_authorization"
    );

    // The next command through the server commits after it and folds it too.
    let second = app
        .prepare(&agent, native_body(&wallet, &random_address(), 2))
        .await;
    let view = app.status(&user.auth(), &first).await;
    assert_eq!(view["status"], "rejected", "{view}");
    assert_eq!(
        view["rejection_reason"],
        "by a writer that does not project"
    );
    assert_eq!(
        app.status(&user.auth(), &second).await["status"],
        "pending_authorization"
    );
    let head: i64 = app.get("/healthz", &Auth::None).await.1["position"]
        .as_i64()
        .unwrap();
    assert_eq!(checkpoint(&db).await, head);
    db.close().await;
    app.cleanup().await;
}

/// A command on an id its task has just made up skips reading that aggregate's events (the
/// prepare path). Were the id already taken, the store's unique key must refuse the append
/// rather than let a second history start at sequence 1.
async fn a_made_up_id_that_is_taken_conflicts_instead_of_forking_history(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let db = Db::connect(&app.store.url).await.unwrap();
    let writer = Writer::spawn(Arc::new(Projector::new(db.clone())), None).unwrap();
    let log = countersign::store::cqrs::<SecurityLog>(&db, &writer, ());
    let id = uuid::Uuid::new_v4().to_string();
    let rotation = || SecurityLogCommand::RecordKeyRotation {
        from_key_ids: vec!["old".into()],
        to_key_id: "new".into(),
        rewrapped: 1,
        failed: 0,
        now: time::OffsetDateTime::now_utc(),
    };
    let history = || async {
        let events = db.events_after(0, 1_000_000).await.unwrap();
        events
            .into_iter()
            .filter(|e| e.aggregate_id == id)
            .map(|e| e.sequence)
            .collect::<Vec<_>>()
    };
    let metadata = || Actor::operator().metadata("test");
    log.execute_with_metadata(&id, rotation(), metadata())
        .await
        .unwrap();

    let forked = NEW_AGGREGATE
        .scope(
            id.clone(),
            log.execute_with_metadata(&id, rotation(), metadata()),
        )
        .await;
    assert!(
        matches!(forked, Err(AggregateError::AggregateConflict)),
        "{forked:?}"
    );
    assert_eq!(history().await, [1]);

    // Outside the scope the history is read, and the aggregate judges the command on it.
    let judged = log.execute_with_metadata(&id, rotation(), metadata()).await;
    assert!(
        matches!(
            judged,
            Err(AggregateError::UserError(SecurityLogError::AlreadyRecorded))
        ),
        "{judged:?}"
    );
    assert_eq!(history().await, [1]);
    db.close().await;
    app.cleanup().await;
}

/// Queries the server sends over and over must go through an index on both databases, not
/// read every document: the receipt worker's and each execution's look for executed
/// transactions (the partial index `views_executed_idx` holds those alone), and the writer
/// looks up the documents a batch's commands were decided on (the primary key; SQLite's leads
/// with `kind`). Over 20,000 documents of every kind: on PostgreSQL analysed, as autovacuum
/// leaves a table; on SQLite without statistics, as the server leaves it.
async fn view_queries_go_through_their_indexes(backend: Backend) {
    let store = Store::new(backend).await;
    let db = Db::connect(&store.url).await.unwrap();
    db.migrate().await.unwrap();
    // One in four a transaction, one in a hundred of those executed, the rest confirmed.
    let columns = "kind, id, owner_user_id, wallet_address, api_key_id, status, \
                   created_position, position, payload";
    let values = "CASE i % 4 WHEN 0 THEN 'transaction' WHEN 1 THEN 'wallet' \
                  WHEN 2 THEN 'api_key' ELSE 'user' END, 'doc-' || i, 'user-' || (i % 50), \
                  'wallet-' || (i % 100), 'key-' || (i % 100), CASE WHEN i % 4 = 0 THEN \
                  CASE WHEN i % 400 = 0 THEN 'executed' ELSE 'confirmed' END END, i, i, '{}'";
    match &db {
        Db::Postgres(pool) => {
            sqlx::query(&format!(
                "INSERT INTO views ({columns}) SELECT {values} FROM generate_series(1, 20000) i"
            ))
            .execute(pool)
            .await
            .unwrap();
            sqlx::query("ANALYZE views").execute(pool).await.unwrap();
        }
        Db::Sqlite(pool) => {
            sqlx::query(&format!(
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 20000) \
                 INSERT INTO views ({columns}) SELECT {values} FROM s"
            ))
            .execute(pool)
            .await
            .unwrap();
        }
    }
    let positions = document_positions_sql(&[2, 1]);
    let primary_key = match backend {
        Backend::Postgres => "views_pkey",
        Backend::Sqlite => "sqlite_autoindex_views_1",
    };
    let cases: [(&str, &[&str], &str); 3] = [
        (EXECUTED_TRANSACTIONS, &[], "views_executed_idx"),
        (
            EXECUTED_TRANSACTIONS_OF,
            &["wallet-0"],
            "views_executed_idx",
        ),
        (
            &positions,
            &["wallet", "doc-1", "doc-5", "api_key", "doc-2"],
            primary_key,
        ),
    ];
    for (sql, binds, index) in cases {
        let plan: Vec<String> = match &db {
            Db::Postgres(pool) => {
                let explain = format!("EXPLAIN {sql}");
                let mut query = sqlx::query_scalar(&explain);
                for value in binds {
                    query = query.bind(*value);
                }
                query.fetch_all(pool).await.unwrap()
            }
            Db::Sqlite(pool) => {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
                for value in binds {
                    query = query.bind(*value);
                }
                let rows = query.fetch_all(pool).await.unwrap();
                rows.into_iter().map(|(_, _, _, detail)| detail).collect()
            }
        };
        let plan = plan.join("\n");
        assert!(
            plan.contains(index) && !plan.contains("Seq Scan") && !plan.contains("SCAN views"),
            "{backend:?}: {sql}\n{plan}"
        );
    }
    db.close().await;
    store.cleanup().await;
}
