//! Faults on real components: PostgreSQL cut off while requests flow (through a TCP proxy in
//! front of the real server), the chain node refusing connections or accepting them and never
//! answering, and the server binary SIGKILLed at random moments while it executes.

use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::nodes::{
    behind_chain_proxy, client_with_timeout, small_pool, socket_addr, try_request, Fault,
    FaultProxy, Node, PrivatePostgres, ServerProcess,
};
use crate::on_both_backends;

on_both_backends!(
    an_unreachable_chain_defers_execution_until_it_is_back,
    kill_9_at_random_moments_loses_nothing_and_pays_nobody_twice,
);

const ETH: u128 = 1_000_000_000_000_000_000;

async fn authorize_all(app: &TestApp, user: &mut TestUser, ids: &[&str]) {
    let (status, body) = app.authorize_all(user, ids).await;
    assert_eq!(status, StatusCode::OK, "{body}");
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

/// One request's fate during the PostgreSQL outage test.
#[derive(Debug)]
struct Outcome {
    started: Instant,
    elapsed: Duration,
    status: StatusCode,
    body: Value,
    /// The connection failed without an answer (then `status` is 503 and `body` null).
    dropped: Option<String>,
}

/// How PostgreSQL goes away in the outage tests.
enum Outage {
    /// Every connection cut and new ones refused, by a proxy in front of the shared server.
    Cut(FaultProxy),
    /// A server of the test's own crashed (`pg_ctl stop -m immediate`) and started again.
    Crash(PrivatePostgres),
}

impl Outage {
    /// The longest a request may take to be answered: the pool's 10 s acquire timeout (sqlx
    /// retries refused connections until then), plus slack for CI's load. A command queued
    /// behind a writer batch that waits out that timeout fails with it instead of waiting out
    /// another one (`src/writer.rs`): before that fix, one took 20 s here.
    fn max_answer(&self) -> Duration {
        match self {
            Self::Cut(_) => Duration::from_secs(12),
            Self::Crash(_) => Duration::from_secs(15),
        }
    }

    fn begin(&self) {
        match self {
            Self::Cut(proxy) => proxy.set(Fault::Reset),
            Self::Crash(pg) => tokio::task::block_in_place(|| pg.stop("immediate")),
        }
    }

    fn end(&self) {
        match self {
            Self::Cut(proxy) => proxy.set(Fault::None),
            Self::Crash(pg) => tokio::task::block_in_place(|| pg.start_again()),
        }
    }
}

/// PostgreSQL cut off for a few seconds while agents keep preparing transactions (see
/// [`postgres_outage`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_503_then_the_server_recovers_and_lost_nothing_it_confirmed() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let mut app = TestApp::spawn_with(Backend::Postgres, Some(small_pool)).await;
    // From here on, one server that reaches the database only through the proxy.
    app.stop().await;
    let proxy = FaultProxy::start(socket_addr(&app.store.url)).await;
    let mut config = app.config();
    config.database_url = proxy.url_for(&app.store.url);
    let db_url = app.store.url.clone();
    postgres_outage(app, config, &db_url, Outage::Cut(proxy)).await;
}

/// The same with a real PostgreSQL server crashed and restarted (a private one: the shared
/// server serves the other tests). Needs the PostgreSQL server binaries (always on CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_restart_is_503_then_the_server_recovers_and_lost_nothing() {
    let Some(pg) = tokio::task::block_in_place(PrivatePostgres::start) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no PostgreSQL server binaries (initdb) on CI"
        );
        eprintln!("SKIPPED: no PostgreSQL server binaries (initdb); set PG_BINDIR");
        return;
    };
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    // The test app's chain and secrets, on the private server.
    app.stop().await;
    let mut config = app.config();
    config.database_url = pg.url();
    small_pool(&mut config);
    let db_url = pg.url();
    postgres_outage(app, config, &db_url, Outage::Crash(pg)).await;
}

/// One server on `config` (whose database is `db_url`) while PostgreSQL goes away for a few
/// seconds and agents keep preparing transactions: requests meanwhile get a JSON 503
/// `unavailable` quickly (no hang, no 500), the same server serves again once the database is
/// back, every transaction it answered 201 for is in the views and the event log, and an
/// execution refused during the outage goes through afterwards.
async fn postgres_outage(
    mut app: TestApp,
    config: countersign::Config,
    db_url: &str,
    outage: Outage,
) {
    let node = Node::start(config).await;
    app.address = node.address.clone();
    let (mut user, wallet, agent) = app.user_with_wallet("pia", 10 * ETH).await;
    let recipient = random_address();
    let queued = app
        .prepare(&agent, native_body(&wallet, &recipient, 4242))
        .await;
    authorize_all(&app, &mut user, &[&queued]).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agents = (0..3).map(|_| {
        let (stop, base, key) = (stop.clone(), node.address.clone(), agent.key.clone());
        let body = native_body(&wallet, &random_address(), 1);
        tokio::spawn(async move {
            let client = client_with_timeout(Duration::from_secs(30));
            let mut outcomes = vec![];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let answer = try_request(
                    &client,
                    Method::POST,
                    &base,
                    "/api/prepare_transaction",
                    &Auth::ApiKey(key.clone()),
                    Some(&body),
                )
                .await;
                // A 503 sent before the request body was read ends its keep-alive connection;
                // a request the client sent on it meanwhile fails without an answer. Allowed
                // during the outage only, like the 503s themselves (checked below).
                let (status, body, dropped) = match answer {
                    Ok((status, body)) => (status, body, None),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null, Some(e)),
                };
                outcomes.push(Outcome {
                    started,
                    elapsed: started.elapsed(),
                    status,
                    body,
                    dropped,
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        })
    });
    let agents: Vec<_> = agents.collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outage_began = Instant::now();
    outage.begin();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // An execution during the outage: 503, and it stays executable.
    let resp = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": queued}),
        )
        .await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let (status, body) = app.get("/healthz", &Auth::None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    outage.end();
    let restored = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut outcomes = vec![];
    for a in agents {
        outcomes.extend(a.await.unwrap());
    }

    let mut created = vec![];
    let mut unavailable = 0;
    for o in &outcomes {
        assert!(o.elapsed < outage.max_answer(), "no request hangs: {o:?}");
        match o.status {
            StatusCode::CREATED => created.push(o.body["transaction_id"].as_str().unwrap()),
            StatusCode::SERVICE_UNAVAILABLE => {
                // A dropped connection follows a 503 on it by at most the agent's pause.
                let until = match o.dropped {
                    None => {
                        assert_eq!(o.body["error"]["code"], "unavailable", "{o:?}");
                        unavailable += 1;
                        restored
                    }
                    Some(_) => restored + Duration::from_millis(500),
                };
                assert!(
                    o.started + o.elapsed > outage_began && o.started < until,
                    "503 only during the outage: {o:?}"
                );
            }
            _ => panic!("only 201 or 503: {o:?}"),
        }
        if o.started > restored + Duration::from_millis(500) {
            assert_eq!(o.status, StatusCode::CREATED, "served again: {o:?}");
        }
    }
    assert!(unavailable > 0, "the outage was real");
    assert!(
        outcomes
            .iter()
            .any(|o| o.started > restored && o.status == StatusCode::CREATED),
        "served after the outage without a restart"
    );

    // Everything answered 201 is in the views and in the event log.
    let db = sqlx::PgPool::connect(db_url).await.unwrap();
    for tx in &created {
        let view = app.status(&agent.auth(), tx).await;
        assert_eq!(view["status"], "pending_authorization", "{view}");
        let prepared: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'Transaction' \
             AND aggregate_id = $1 AND event_type = 'TransactionPrepared'",
        )
        .bind(tx)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(prepared, 1, "{tx} is in the event log");
    }
    db.close().await;
    let (status, body) = app.get("/api/transactions", &agent.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed = body["transactions"].as_array().unwrap().len();
    assert!(
        listed > created.len(),
        "{listed} listed, {} created",
        created.len()
    );

    // The execution refused during the outage goes through now.
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": queued}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.wait_for_status(&agent.auth(), &queued, "confirmed")
        .await;
    assert_eq!(app.anvil.balance(&recipient).await, 4242);
    assert_eq!(app.onchain_nonce(&wallet).await, 1);
    node.stop().await;
    app.cleanup().await;
}

/// With the chain node refusing connections, then accepting them and never answering: agents
/// still prepare and the owner still authorizes; execution answers 503 `chain_unavailable`
/// within the configured chain timeout, records nothing, and succeeds once the node is back.
async fn an_unreachable_chain_defers_execution_until_it_is_back(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, Some(small_pool)).await;
    let (mut user, wallet, agent) = app.user_with_wallet("quinn", 10 * ETH).await;
    let (first_recipient, second_recipient) = (random_address(), random_address());
    let first = app
        .prepare(&agent, native_body(&wallet, &first_recipient, 111))
        .await;

    let (proxy, node) = behind_chain_proxy(&mut app, Some(Duration::from_secs(2))).await;

    // Refused: prepare (not simulated) and authorize work, execution is a clear 503.
    proxy.set(Fault::Reset);
    let second = app
        .prepare(&agent, native_body(&wallet, &second_recipient, 222))
        .await;
    let view = app.status(&agent.auth(), &second).await;
    assert_eq!(view["simulation"]["status"], "unavailable", "{view}");
    authorize_all(&app, &mut user, &[&first, &second]).await;
    let resp = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": first}),
        )
        .await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "chain_unavailable");
    let (status, body) = app.get("/api/wallets", &user.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["wallets"][0]["balance_wei"], Value::Null);

    // Accepting connections and never answering: bounded by the chain timeout.
    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let resp = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": first}),
        )
        .await;
    let took = started.elapsed();
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "chain_unavailable");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "one timed-out call, not a hang: {took:?}"
    );
    let started = Instant::now();
    let resp = app
        .post(
            "/api/load_wallet",
            &agent.auth(),
            json!({"wallet_address": wallet}),
        )
        .await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "chain_unavailable");
    assert!(started.elapsed() < Duration::from_secs(6));
    for tx in [&first, &second] {
        assert_eq!(app.status(&agent.auth(), tx).await["status"], "authorized");
        let types = event_types(&app, &agent.auth(), tx).await;
        assert_eq!(
            types,
            ["TransactionPrepared", "TransactionAuthorized"],
            "nothing recorded by the failed attempts"
        );
    }
    assert_eq!(app.onchain_nonce(&wallet).await, 0);

    // Back: the same requests succeed, without a restart.
    proxy.set(Fault::None);
    for (tx, recipient, amount) in [
        (&first, &first_recipient, 111),
        (&second, &second_recipient, 222),
    ] {
        let (status, body) = app
            .post(
                "/api/execute_transaction",
                &agent.auth(),
                json!({"transaction_id": tx}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        app.wait_for_status(&agent.auth(), tx, "confirmed").await;
        assert_eq!(app.anvil.balance(recipient).await, amount);
    }
    assert_eq!(app.onchain_nonce(&wallet).await, 2);
    node.stop().await;
    app.cleanup().await;
}

/// Waits until no transaction is `executed` (signed, receipt not yet recorded), then checks
/// the invariants: each is still `authorized` (never signed: retryable) or `confirmed`; the
/// confirmed ones hold nonces 0..n and the chain has exactly n transactions from the wallet;
/// every recipient got its amount if confirmed and nothing otherwise. Returns n.
async fn settled(
    app: &TestApp,
    agent: &Agent,
    wallet: &str,
    txs: &[(String, String, u128)],
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let views = loop {
        let mut views = vec![];
        for (tx, _, _) in txs {
            views.push(app.status(&agent.auth(), tx).await);
        }
        if views.iter().all(|v| v["status"] != "executed") {
            break views;
        }
        assert!(
            Instant::now() < deadline,
            "stuck in executed: {:?}",
            views.iter().map(|v| &v["status"]).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut nonces = vec![];
    for (view, (_, recipient, amount)) in views.iter().zip(txs) {
        let paid = app.anvil.balance(recipient).await;
        match view["status"].as_str().unwrap() {
            "confirmed" => {
                nonces.push(view["nonce"].as_u64().unwrap());
                assert_eq!(paid, *amount, "paid exactly once: {view}");
            }
            "authorized" => {
                assert_eq!(view["tx_hash"], Value::Null, "{view}");
                assert_eq!(paid, 0, "not paid: {view}");
            }
            _ => panic!("neither confirmed nor retryable: {view}"),
        }
    }
    nonces.sort();
    let n = nonces.len() as u64;
    assert_eq!(
        nonces,
        (0..n).collect::<Vec<_>>(),
        "nonces without gaps or repeats"
    );
    assert_eq!(
        app.onchain_nonce(wallet).await,
        n,
        "one broadcast per confirmed transaction"
    );
    n
}

/// The `countersign` binary is SIGKILLed at random moments while it executes a burst of
/// transactions from one wallet, and restarted, several times. Every transaction ends
/// confirmed or still authorized (and then executes fine), nothing is stuck, the chain nonce
/// equals the number of transactions sent, and nobody is paid twice.
async fn kill_9_at_random_moments_loses_nothing_and_pays_nobody_twice(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, Some(small_pool)).await;
    let (mut user, wallet, agent) = app.user_with_wallet("ruth", 10 * ETH).await;
    const N: usize = 16;
    let mut txs = vec![];
    for i in 0..N {
        let recipient = random_address();
        let amount = 5000 + i as u128;
        let tx = app
            .prepare(&agent, native_body(&wallet, &recipient, amount))
            .await;
        txs.push((tx, recipient, amount));
    }
    let ids: Vec<&str> = txs.iter().map(|(tx, _, _)| tx.as_str()).collect();
    authorize_all(&app, &mut user, &ids).await;
    app.stop().await;

    let mut server = ServerProcess::start(&app).await;
    app.address = server.address.clone();
    let client = client_with_timeout(Duration::from_secs(10));
    for round in 0..5 {
        // Up to four not yet signed, plus one already done (a repeat must stay a no-op).
        let mut burst = vec![];
        for (tx, _, _) in &txs {
            let view = app.status(&agent.auth(), tx).await;
            if view["status"] == "authorized" && burst.len() < 4 {
                burst.push(tx.clone());
            } else if view["status"] == "confirmed" && burst.len() == 4 {
                burst.push(tx.clone());
                break;
            }
        }
        let fired: Vec<_> = burst
            .into_iter()
            .map(|tx| {
                let (client, base, key) =
                    (client.clone(), server.address.clone(), agent.key.clone());
                tokio::spawn(async move {
                    // The answer, if any, does not matter: the server is about to die.
                    let _ = try_request(
                        &client,
                        Method::POST,
                        &base,
                        "/api/execute_transaction",
                        &Auth::ApiKey(key),
                        Some(&json!({"transaction_id": tx})),
                    )
                    .await;
                })
            })
            .collect();
        // A burst takes a few hundred milliseconds: die anywhere in it (or just after).
        let delay = rand::thread_rng().gen_range(0..300);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill9();
        for f in fired {
            let _ = f.await;
        }

        server = ServerProcess::start(&app).await;
        app.address = server.address.clone();
        let mut signed = 0;
        for (tx, _, _) in &txs {
            signed += usize::from(app.status(&agent.auth(), tx).await["status"] == "executed");
        }
        let done = settled(&app, &agent, &wallet, &txs).await;
        eprintln!(
            "round {round}: killed after {delay} ms; after the restart {signed} signed awaiting \
             their receipt; {done} of {N} confirmed"
        );
    }

    // Whatever was never signed executes now; each is paid exactly once.
    for (tx, _, _) in &txs {
        let (status, body) = app
            .post(
                "/api/execute_transaction",
                &agent.auth(),
                json!({"transaction_id": tx}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(settled(&app, &agent, &wallet, &txs).await, N as u64);
    for (tx, _, _) in &txs {
        let types = event_types(&app, &agent.auth(), tx).await;
        assert_eq!(
            types.iter().filter(|t| *t == "TransactionExecuted").count(),
            1,
            "signed once: {types:?}"
        );
    }
    server.kill9();
    app.cleanup().await;
}
