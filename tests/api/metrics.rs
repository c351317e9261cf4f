//! `GET /metrics`: Prometheus text (format 0.0.4) that counts exactly what happened — requests
//! per route template, command outcomes, chain RPCs, WebSocket connections, projection lag —
//! with bounded labels that name no user, key or transaction; and its access control.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use countersign::metrics::MetricsAccess;
use secrecy::SecretString;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(metrics_count_a_countersigned_flow_with_bounded_labels);

const ETH: u128 = 1_000_000_000_000_000_000;
const TOKEN: &str = "metrics-token-for-tests-0123456789";

// ---- a tiny parser for the text exposition format ----

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
}

/// Parse a label set `a="x",b="y\"z"` (the part between the braces).
fn parse_labels(mut s: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (name, rest) = s
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label in {line}"));
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name {name:?} in {line}"
        );
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} in {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line}"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "repeated label in {line}"
        );
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    labels
}

/// Parse a scrape, checking the format as it goes: every sample belongs to a family declared
/// with `# TYPE` before it, no series appears twice, values are numbers, histograms are
/// cumulative and end in `+Inf` = `_count`.
fn parse(text: &str) -> Scrape {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut seen = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family {name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "unknown comment {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                parse_labels(rest.strip_suffix('}').expect("closing brace"), line),
            ),
            None => (series, BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample before its # TYPE: {line}"
        );
        assert!(seen.insert(series.to_owned()), "series twice: {series}");
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    let scrape = Scrape { samples };
    // Histograms: buckets cumulative, `+Inf` equals `_count`.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in scrape
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut labels = s.labels.clone();
            let le = labels.remove("le").expect("bucket has le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            by_series
                .entry(format!("{labels:?}"))
                .or_default()
                .push((le, s.value));
        }
        for (labels, buckets) in by_series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}{labels}: buckets not cumulative"
            );
            let (le, last) = *buckets.last().unwrap();
            assert!(le.is_infinite(), "{family}{labels}: no +Inf bucket");
            let count = scrape
                .samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count") && format!("{:?}", s.labels) == labels
                })
                .unwrap_or_else(|| panic!("{family}{labels}: no _count"));
            assert_eq!(count.value, last, "{family}{labels}: +Inf != _count");
        }
    }
    scrape
}

impl Scrape {
    /// The sum of the samples named `name` whose labels include `labels` (0 if none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn requests(&self, route: &str, method: &str, status: &str) -> f64 {
        self.value(
            "countersign_http_requests_total",
            &[("route", route), ("method", method), ("status", status)],
        )
    }

    fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

async fn scrape_text(app: &TestApp) -> String {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    resp.text().await.unwrap()
}

async fn scrape(app: &TestApp) -> Scrape {
    parse(&scrape_text(app).await)
}

/// Scrape until `check` holds (gauges that settle in the background), at most ~5 s.
async fn scrape_until(app: &TestApp, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    for _ in 0..50 {
        let s = scrape(app).await;
        if check(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("metrics never showed {what}");
}

async fn metrics_count_a_countersigned_flow_with_bounded_labels(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut user, wallet, agent) = app.user_with_wallet("metrics-alice", 10 * ETH).await;

    let before = scrape(&app).await;
    let (tx, other) = (
        app.prepare(&agent, native_body(&wallet, &random_address(), ETH))
            .await,
        app.prepare(&agent, native_body(&wallet, &random_address(), ETH))
            .await,
    );
    // A wrong code is refused.
    let wrong = user.wrong_code();
    let resp = app
        .post(
            "/api/authorize_transaction",
            &user.auth(),
            json!({"transaction_id": other, "mfa_code": wrong}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Rejecting twice: the second is refused by the aggregate (a rejected command).
    let reject = json!({"transaction_id": other, "reason": "no"});
    let (status, body) = app
        .post("/api/reject_transaction", &user.auth(), reject.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = app
        .post("/api/reject_transaction", &user.auth(), reject)
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "invalid_state");
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut status_reads = 0;
    loop {
        status_reads += 1;
        if app.status(&agent.auth(), &tx).await["status"] == "confirmed" {
            break;
        }
        assert!(status_reads < 100, "never confirmed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = scrape(&app).await;

    // Requests, by route template, method and status class, exactly.
    let diff = |route: &str, method: &str, status: &str| {
        after.requests(route, method, status) - before.requests(route, method, status)
    };
    assert_eq!(diff("/api/prepare_transaction", "POST", "2xx"), 2.0);
    assert_eq!(diff("/api/authorize_transaction", "POST", "2xx"), 1.0);
    assert_eq!(diff("/api/authorize_transaction", "POST", "4xx"), 1.0);
    assert_eq!(diff("/api/execute_transaction", "POST", "2xx"), 1.0);
    assert_eq!(diff("/api/reject_transaction", "POST", "2xx"), 1.0);
    assert_eq!(diff("/api/reject_transaction", "POST", "4xx"), 1.0);
    assert_eq!(
        diff("/api/transaction_status", "GET", "2xx"),
        f64::from(status_reads)
    );
    // A scrape is counted once it has answered: the first shows up in the second.
    assert_eq!(diff("/metrics", "GET", "2xx"), 1.0);
    assert_eq!(diff("/api/register", "POST", "2xx"), 0.0);
    assert!(after.requests("/api/register", "POST", "2xx") >= 1.0);
    let latency_count = after.value(
        "countersign_http_request_duration_seconds_count",
        &[("route", "/api/prepare_transaction"), ("status", "2xx")],
    );
    assert_eq!(
        latency_count,
        after.requests("/api/prepare_transaction", "POST", "2xx")
    );

    // Command outcomes per aggregate type.
    let commands = |s: &Scrape, aggregate: &str, outcome: &str| {
        s.value(
            "countersign_commands_total",
            &[("aggregate", aggregate), ("outcome", outcome)],
        )
    };
    // Prepare ×2, reject, authorize, execute, confirm (by the receipt worker).
    let tx_ok = commands(&after, "Transaction", "ok") - commands(&before, "Transaction", "ok");
    assert!(tx_ok >= 6.0, "Transaction ok: {tx_ok}");
    assert_eq!(
        commands(&after, "Transaction", "rejected") - commands(&before, "Transaction", "rejected"),
        1.0,
        "the second reject"
    );
    // The accepted code.
    assert!(commands(&after, "User", "ok") - commands(&before, "User", "ok") >= 1.0);
    assert_eq!(commands(&after, "Transaction", "error"), 0.0);
    let appends = after.value(
        "countersign_event_append_seconds_count",
        &[("aggregate", "Transaction")],
    ) - before.value(
        "countersign_event_append_seconds_count",
        &[("aggregate", "Transaction")],
    );
    assert_eq!(appends, tx_ok, "one append timing per successful command");

    // Group commits by path: on PostgreSQL the prepares (which only create their documents)
    // take the one-statement path once the writer knows the checkpoint; the rest, and every
    // commit on SQLite, the general one.
    let batches =
        |s: &Scrape, path: &str| s.value("countersign_writer_batches_total", &[("path", path)]);
    assert!(batches(&after, "general") - batches(&before, "general") >= 4.0);
    match backend {
        Backend::Postgres => assert!(batches(&after, "fast") - batches(&before, "fast") >= 1.0),
        Backend::Sqlite => assert_eq!(batches(&after, "fast"), 0.0),
    }
    // The prepares looked their key and wallet up in the read cache (hit or miss, each).
    let lookups = |s: &Scrape| {
        s.value(
            "countersign_read_cache_command_lookups_total",
            &[("result", "hit")],
        ) + s.value(
            "countersign_read_cache_command_lookups_total",
            &[("result", "miss")],
        )
    };
    assert_eq!(lookups(&after) - lookups(&before), 4.0);

    // Chain RPCs: simulated at prepare and execute, broadcast, receipt polled.
    for method in [
        "eth_estimateGas",
        "eth_sendRawTransaction",
        "eth_getTransactionReceipt",
    ] {
        let n = after.value(
            "countersign_chain_rpc_requests_total",
            &[("method", method)],
        );
        assert!(n > 0.0, "{method}: {n}");
        let timed = after.value(
            "countersign_chain_rpc_duration_seconds_count",
            &[("method", method)],
        );
        assert_eq!(timed, n, "{method}");
    }

    // WebSocket connections go up with a socket and down when it closes.
    assert_eq!(after.value("countersign_ws_connections", &[]), 0.0);
    let url = format!("{}/api/ws", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", agent.key.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("caught_up in time")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["type"] == "caught_up" {
                break;
            }
        }
    }
    let open = scrape(&app).await;
    assert_eq!(open.value("countersign_ws_connections", &[]), 1.0);
    assert_eq!(open.value("countersign_ws_send_queue_messages", &[]), 0.0);
    socket.close(None).await.unwrap();
    drop(socket);
    scrape_until(&app, "the socket closed", |s| {
        s.value("countersign_ws_connections", &[]) == 0.0
    })
    .await;

    // Projection and push lag are 0 once the views have caught up.
    let (status, health) = app.get("/healthz", &Auth::None).await;
    assert_eq!(status, StatusCode::OK);
    let caught_up = scrape_until(&app, "no lag", |s| {
        s.value("countersign_projection_lag_events", &[]) == 0.0
            && s.value("countersign_ws_push_lag_events", &[]) == 0.0
    })
    .await;
    let head = caught_up.value("countersign_events_head_position", &[]);
    assert!(
        head >= health["position"].as_f64().unwrap(),
        "{head} {health}"
    );
    assert_eq!(
        caught_up.value("countersign_projection_checkpoint_position", &[]),
        head
    );
    assert_eq!(caught_up.value("countersign_store_up", &[]), 1.0);
    assert!(caught_up.value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(caught_up.value("process_open_fds", &[]) > 0.0);

    // Unknown paths and methods do not create label values; matched routes are templates.
    let routes_before = caught_up.label_values("countersign_http_requests_total", "route");
    let unmatched_before =
        caught_up.value("countersign_http_requests_total", &[("route", "unmatched")]);
    let secret_path = format!("/nope/{}", uuid::Uuid::new_v4());
    for (method, path) in [
        ("GET", secret_path.as_str()),
        ("POST", "/api/nope-at-all"),
        ("BREW", "/coffee"),
        ("GET", "/api/transactions/x/y/z"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = app
            .client
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = app
        .get(&format!("/api/transactions/{tx}/events"), &agent.auth())
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = scrape_text(&app).await;
    let last = parse(&text);
    let routes_after = last.label_values("countersign_http_requests_total", "route");
    let new: Vec<&String> = routes_after.difference(&routes_before).collect();
    let allowed = ["unmatched", "/api/transactions/{id}/events"];
    assert!(
        new.iter().all(|r| allowed.contains(&r.as_str())),
        "new route labels: {new:?}"
    );
    assert!(routes_after.contains("/api/transactions/{id}/events"));
    assert_eq!(
        last.value("countersign_http_requests_total", &[("route", "unmatched")]) - unmatched_before,
        4.0
    );
    let methods = last.label_values("countersign_http_requests_total", "method");
    assert!(
        methods.iter().all(|m| [
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other"
        ]
        .contains(&m.as_str())),
        "{methods:?}"
    );
    assert!(methods.contains("other"), "BREW is counted as other");
    // Nothing identifies a user, wallet, key or transaction.
    for id in [
        user.user_id.as_str(),
        user.username.as_str(),
        wallet.as_str(),
        &wallet.to_lowercase(),
        agent.id.as_str(),
        tx.as_str(),
        other.as_str(),
        &secret_path,
    ] {
        assert!(!text.contains(id), "the scrape mentions {id}");
    }

    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_with_a_token_need_it_and_disabled_metrics_are_not_found() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Some(|c| c.metrics = MetricsAccess::Token(SecretString::from(TOKEN))),
    )
    .await;
    for auth in [
        Auth::None,
        Auth::Bearer("wrong-token-wrong-token-wrong".into()),
        Auth::Bearer(format!("{TOKEN}x")),
    ] {
        let resp = app.get("/metrics", &auth).await;
        assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let resp = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let scrape = parse(&resp.text().await.unwrap());
    // The refused scrapes were counted like any request.
    assert_eq!(scrape.requests("/metrics", "GET", "4xx"), 4.0);
    app.cleanup().await;

    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Some(|c| c.metrics = MetricsAccess::Disabled),
    )
    .await;
    let resp = app.get("/metrics", &Auth::None).await;
    assert_error(&resp, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(resp.1["error"]["message"], "no such endpoint");
    app.cleanup().await;
}

#[test]
fn the_parser_rejects_malformed_scrapes() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{r=\"q\\\"\"} 1\n";
    assert_eq!(parse(ok).value("a_total", &[("r", "q\"")]), 1.0);
    for bad in [
        "a_total 1\n",                                    // no TYPE
        "# TYPE a_total counter\na_total{r=\"x} 1\n",     // unterminated
        "# TYPE a_total counter\na_total 1\na_total 2\n", // series twice
        "# TYPE a_total counter\na_total one\n",          // not a number
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted: {bad}"
        );
    }
}
