//! Live push over WebSocket: approval prompts for owners, decisions for agents, tenant
//! isolation, loss-free resume, revocation, tickets, long polls, and two nodes on one Postgres.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    owner_socket_gets_the_prompt_and_agent_socket_gets_the_decision,
    other_tenants_sockets_receive_nothing,
    resume_delivers_exactly_the_missed_events,
    revoked_key_socket_is_closed,
    browser_ticket_opens_one_socket_once,
    long_poll_returns_when_the_human_decides,
);

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn connect(base: &str, auth: &Auth, query: &str) -> Socket {
    let url = format!("{}/api/ws{query}", base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    match auth {
        Auth::Bearer(t) => {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Auth::ApiKey(k) => {
            request
                .headers_mut()
                .insert("x-api-key", k.parse().unwrap());
        }
        Auth::None => {}
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("ws connect");
    let replayed = replay(&mut socket).await;
    assert!(replayed.is_empty(), "unexpected replay: {replayed:?}");
    socket
}

/// Read the replayed events up to the `caught_up` marker.
async fn replay(socket: &mut Socket) -> Vec<Value> {
    let mut out = vec![];
    loop {
        let msg = next_message(socket).await.expect("caught_up marker");
        match msg["type"].as_str() {
            Some("caught_up") => return out,
            Some("event") => out.push(msg),
            _ => panic!("unexpected message {msg}"),
        }
    }
}

/// The next JSON message within 5 s (`None` on timeout or close).
async fn next_message(socket: &mut Socket) -> Option<Value> {
    next_within(socket, Duration::from_secs(5)).await
}

pub(crate) async fn next_within(socket: &mut Socket, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = tokio::time::timeout_at(deadline, socket.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(text) => return Some(serde_json::from_str(text.as_str()).unwrap()),
            Message::Close(frame) => {
                return Some(json!({"type": "closed", "code": frame.map(|f| u16::from(f.code))}))
            }
            _ => continue,
        }
    }
}

/// Collect event messages until `n` arrived (panics after 10 s).
async fn events(socket: &mut Socket, n: usize) -> Vec<Value> {
    let mut out = vec![];
    while out.len() < n {
        let msg = next_within(socket, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("only {} of {n} events arrived: {out:?}", out.len()));
        if msg["type"] == "event" {
            out.push(msg);
        }
    }
    out
}

async fn owner_socket_gets_the_prompt_and_agent_socket_gets_the_decision(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app
        .user_with_wallet("ivan", 1_000_000_000_000_000_000)
        .await;
    let mut owner_socket = connect(&app.address, &user.auth(), "").await;
    let mut agent_socket = connect(&app.address, &agent.auth(), "").await;

    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 777))
        .await;
    let prompt = &events(&mut owner_socket, 1).await[0];
    assert_eq!(prompt["event_type"], "TransactionPrepared");
    assert_eq!(prompt["transaction_id"], tx.as_str());
    assert_eq!(prompt["status"], "pending_authorization");
    assert_eq!(prompt["wallet_address"], wallet.as_str());
    assert_eq!(prompt["data"]["payload"]["value"], "777");
    assert_eq!(prompt["data"]["memo"], "test payment");
    assert_eq!(prompt["data"]["initiator"]["api_key_name"], "agent");
    assert!(prompt["data"]["expires_at"].is_string());
    assert!(prompt["position"].as_i64().unwrap() > 0);
    // Pushed straight from this node's commit: stamped once the commit was acknowledged. (The
    // hub's fallback pump, which reads from the database every second, can route a commit
    // between its acknowledgement and the hand-over; such an event carries no stamp.)
    let at = |field: &str| {
        let text = prompt[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {prompt}"));
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    };
    if !prompt["committed_at"].is_null() {
        assert!(at("committed_at") >= at("recorded_at"), "{prompt}");
    }

    let (status, _) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = events(&mut agent_socket, 4).await;
    let types: Vec<&str> = got
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
    assert!(got
        .windows(2)
        .all(|w| w[0]["position"].as_i64() < w[1]["position"].as_i64()));
    assert_eq!(got[2]["status"], "executed");
    assert!(got[2]["data"]["tx_hash"].is_string());
    app.cleanup().await;
}

async fn other_tenants_sockets_receive_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut alice, wallet, agent) = app.user_with_wallet("judy", 0).await;
    let (mallory, _, mallory_agent) = app.user_with_wallet("mallory", 0).await;
    // Alice's second key: same owner, but it did not prepare the transaction.
    let other_key = app.issue_api_key(&mut alice, "other", None).await;
    let mut sockets = vec![
        connect(&app.address, &mallory.auth(), "").await,
        connect(&app.address, &mallory_agent.auth(), "").await,
        connect(&app.address, &other_key.auth(), "").await,
    ];
    let mut owner = connect(&app.address, &alice.auth(), "").await;

    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    app.post(
        "/api/reject_transaction",
        &alice.auth(),
        json!({"transaction_id": tx}),
    )
    .await;
    // The owner sees both events; by then the others would have had theirs too.
    assert_eq!(events(&mut owner, 2).await.len(), 2);
    for socket in &mut sockets {
        let msg = next_within(socket, Duration::from_millis(500)).await;
        assert!(msg.is_none(), "another tenant received {msg:?}");
    }
    app.cleanup().await;
}

async fn resume_delivers_exactly_the_missed_events(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("ken", 0).await;
    let mut socket = connect(&app.address, &user.auth(), "").await;
    let first = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    let seen = events(&mut socket, 1).await;
    assert_eq!(seen[0]["transaction_id"], first.as_str());
    let last_position = seen[0]["position"].as_i64().unwrap();
    socket.close(None).await.unwrap();

    // While disconnected: three prompts and a rejection.
    let mut missed = vec![];
    for i in 0..3 {
        missed.push(
            app.prepare(&agent, native_body(&wallet, &random_address(), i + 2))
                .await,
        );
    }
    app.post(
        "/api/reject_transaction",
        &user.auth(),
        json!({"transaction_id": first}),
    )
    .await;

    // Query-string resume: the missed events, then `caught_up`, then live ones exactly once.
    let url = format!(
        "{}/api/ws?after={last_position}",
        app.address.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", user.token).parse().unwrap(),
    );
    let (mut resumed, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let replayed = replay(&mut resumed).await;
    // Read back from the log, not from a commit this socket saw happen.
    assert!(replayed.iter().all(|e| e["committed_at"].is_null()));
    let live = app
        .prepare(&agent, native_body(&wallet, &random_address(), 9))
        .await;
    // Where replay ends and live delivery starts depends on timing; the sequence may not.
    let mut got = replayed;
    let remaining = 5usize.saturating_sub(got.len());
    got.extend(events(&mut resumed, remaining).await);
    let ids: Vec<&str> = got
        .iter()
        .map(|e| e["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [&missed[0], &missed[1], &missed[2], &first, &live].map(String::as_str)
    );
    assert_eq!(got[3]["event_type"], "TransactionRejected");
    assert!(next_within(&mut resumed, Duration::from_millis(300))
        .await
        .is_none());

    // The first-message form of resume gives the same replay.
    let url = format!("{}/api/ws", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", user.token).parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(Message::text(
            json!({"type": "resume", "after": last_position}).to_string(),
        ))
        .await
        .unwrap();
    let mut got = vec![];
    while got.len() < 5 {
        let msg = next_message(&mut socket).await.expect("replayed event");
        if msg["type"] == "event" {
            got.push(msg["transaction_id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        got,
        [&missed[0], &missed[1], &missed[2], &first, &live].map(String::clone)
    );
    app.cleanup().await;
}

async fn revoked_key_socket_is_closed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, _, agent) = app.user_with_wallet("leo", 0).await;
    let mut socket = connect(&app.address, &agent.auth(), "").await;
    let (status, _) = app
        .delete(&format!("/api/api_keys/{}", agent.id), &user.auth())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let msg = next_message(&mut socket).await.expect("close frame");
    assert_eq!(msg["type"], "closed");
    assert_eq!(msg["code"], 4003);
    // And it cannot come back.
    let url = format!("{}/api/ws", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", agent.key.parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());
    app.cleanup().await;
}

async fn browser_ticket_opens_one_socket_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("mia", 0).await;
    let (status, body) = app.post("/api/ws_ticket", &user.auth(), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ticket = body["ticket"].as_str().unwrap().to_owned();
    assert_eq!(body["expires_in"], 30);

    let mut socket = connect(&app.address, &Auth::None, &format!("?ticket={ticket}")).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 5))
        .await;
    assert_eq!(
        events(&mut socket, 1).await[0]["transaction_id"],
        tx.as_str()
    );

    // Single use, and nothing without credentials.
    let url = format!(
        "{}/api/ws?ticket={ticket}",
        app.address.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("a used ticket was not refused: {:?}", other.err()),
    }
    // A request that is not an upgrade is refused before its ticket is looked at.
    let (status, body) = app
        .get(&format!("/api/ws?ticket={ticket}"), &Auth::None)
        .await;
    assert_error(
        &(status, body),
        StatusCode::BAD_REQUEST,
        "websocket_required",
    );
    let url = format!("{}/api/ws", app.address.replace("http://", "ws://"));
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    app.cleanup().await;
}

async fn long_poll_returns_when_the_human_decides(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (user, wallet, agent) = app.user_with_wallet("nina", 0).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 5))
        .await;

    // Times out while pending, with the current view.
    let (status, view) = app
        .get(
            &format!("/api/transactions/{tx}/wait?timeout=1"),
            &agent.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["status"], "pending_authorization");

    let (wait_path, agent_auth) = (
        format!("/api/transactions/{tx}/wait?timeout=20"),
        agent.auth(),
    );
    let waiting = app.get(&wait_path, &agent_auth);
    let deciding = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.post(
            "/api/reject_transaction",
            &user.auth(),
            json!({"transaction_id": tx, "reason": "no"}),
        )
        .await
    };
    let started = std::time::Instant::now();
    let ((status, view), _) = tokio::join!(waiting, deciding);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["status"], "rejected");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "did not return on the decision"
    );

    let resp = app
        .get(
            &format!("/api/transactions/{tx}/wait?timeout=600"),
            &agent.auth(),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "timeout");
    app.cleanup().await;
}

/// Two `countersign serve` processes on one Postgres database: a command through one is
/// pushed to a socket on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_crosses_server_processes_on_postgres() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let (user, wallet, agent) = app.user_with_wallet("olga", 0).await;
    let config = app.config();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut node_b = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir.path())
        .env("DATABASE_URL", &app.store.url)
        .env("WEB3_PROVIDER_URI", &app.anvil.url)
        .env("JWT_SECRET_KEY", app.jwt_secret())
        .env(
            "COUNTERSIGN_MASTER_KEY",
            config.master_key.to_base64().as_str(),
        )
        .env("COUNTERSIGN_ADDR", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let node_b_url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{node_b_url}/healthz")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut on_b = connect(&node_b_url, &user.auth(), "").await;
    // Prepared through node A…
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 3))
        .await;
    // …pushed by node B.
    let got = events(&mut on_b, 1).await;
    assert_eq!(got[0]["transaction_id"], tx.as_str());
    let _ = node_b.kill();
    let _ = node_b.wait();
    app.cleanup().await;
}
