//! Time limits on connections and requests: a client trickling headers or idling on a
//! keep-alive connection is cut off, a WebSocket is not, and a request that runs too long gets
//! a JSON 408 and records nothing.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;
use crate::nodes::{socket_addr, Fault, FaultProxy, Node};

const LIMIT: Duration = Duration::from_secs(1);

/// Read until the peer closes (`Ok` with everything read) or `wait` passes (`Err`).
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(out),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_cut_and_long_requests_get_408() {
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    let (user, wallet, agent) = app.user_with_wallet("tess", 0).await;

    // The same store and chain, with short limits and the chain behind a proxy that can hang.
    app.stop().await;
    let proxy = FaultProxy::start(socket_addr(&app.anvil.url)).await;
    let mut config = app.config();
    config.chain_url = proxy.url_for(&app.anvil.url).parse().unwrap();
    config.chain_timeout = Duration::from_secs(5);
    config.request_timeout = LIMIT;
    config.header_timeout = LIMIT;
    let node = Node::start(config).await;
    app.address = node.address.clone();
    let addr = socket_addr(&node.address);

    // Headers that never finish: the connection is closed after the header timeout.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: countersign\r\nX-Slow: ")
        .await
        .unwrap();
    let read = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "a half-sent request held its connection open");
    assert!(took >= LIMIT / 2, "closed before the limit: {took:?}");

    // An idle keep-alive connection: one answer, then closed once the limit passes.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: countersign\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("closed after idling");
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // A WebSocket outlives the header timeout: it still receives the next prompt.
    let mut socket = crate::push::connect(&node.address, &user.auth(), "").await;
    tokio::time::sleep(LIMIT * 3).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1))
        .await;
    let event = crate::push::next_within(&mut socket, Duration::from_secs(10))
        .await
        .expect("the socket is still open");
    assert_eq!(event["type"], "event", "{event}");
    assert_eq!(event["transaction_id"], tx.as_str(), "{event}");

    // Long polls stay inside the request timeout: by default they answer in time, with the
    // view, and a longer wait than the timeout allows is refused up front.
    let started = Instant::now();
    let (status, view) = app
        .get(&format!("/api/transactions/{tx}/wait"), &agent.auth())
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "pending_authorization", "{view}");
    assert!(started.elapsed() < LIMIT, "{:?}", started.elapsed());
    let resp = app
        .get(
            &format!("/api/transactions/{tx}/wait?timeout=1"),
            &agent.auth(),
        )
        .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_eq!(resp.1["error"]["field"], "timeout", "{}", resp.1);

    // A request that runs past the request timeout (its simulation waits on a chain node that
    // never answers): a JSON 408, and the cancelled prepare recorded nothing.
    let (status, before) = app.get("/api/transactions", &agent.auth()).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    // (The switch also cuts the server's pooled connection to the node, which it finds dead
    // only by writing on it: the simulation is sent again, and hangs.)
    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let resp = app
        .post(
            "/api/prepare_transaction",
            &agent.auth(),
            native_body(&wallet, &random_address(), 2),
        )
        .await;
    let took = started.elapsed();
    assert_error(&resp, StatusCode::REQUEST_TIMEOUT, "request_timeout");
    assert!(
        took < Duration::from_secs(4),
        "not cut off in time: {took:?}"
    );
    proxy.set(Fault::None);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, after) = app.get("/api/transactions", &agent.auth()).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after, before);
    node.stop().await;
    app.cleanup().await;
}
