//! Rate limits and MFA lockout, attacked over HTTP: login brute force (per username, per
//! address), API-key spraying, a per-key request rate, and wrong TOTP codes locking every
//! MFA-protected action. Each refusal is a 429 with `Retry-After` and changes nothing else.

use std::time::Duration;

use countersign::limits::Rate;
use countersign::store::Db;
use countersign::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    login_brute_force_on_one_username_is_refused_with_429_and_changes_nothing,
    failures_across_usernames_exhaust_the_address_limit,
    spraying_api_keys_from_one_address_is_refused_before_any_lookup,
    five_wrong_codes_lock_every_mfa_protected_action_for_15_minutes,
);

/// A request with its `Retry-After` header (seconds), if any.
async fn send_raw(req: reqwest::RequestBuilder) -> (StatusCode, Option<u64>, Value) {
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").map(|v| {
        v.to_str()
            .unwrap()
            .parse::<u64>()
            .expect("Retry-After in seconds")
    });
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, retry_after, body)
}

async fn login(app: &TestApp, username: &str, password: &str) -> (StatusCode, Option<u64>, Value) {
    let req = app
        .client
        .post(app.url("/api/login"))
        .json(&json!({"username": username, "password": password}));
    send_raw(req).await
}

async fn with_key(app: &TestApp, key: &str) -> (StatusCode, Option<u64>, Value) {
    send_raw(
        app.client
            .get(app.url("/api/wallets"))
            .header("X-API-KEY", key),
    )
    .await
}

/// Assert a 429 with the given code, a `Retry-After` within `range` and a message saying when.
fn assert_limited(
    resp: &(StatusCode, Option<u64>, Value),
    code: &str,
    range: std::ops::RangeInclusive<u64>,
) {
    let (status, retry_after, body) = resp;
    assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let secs = retry_after.expect("Retry-After header");
    assert!(range.contains(&secs), "Retry-After {secs} not in {range:?}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("retry in"), "{message}");
}

async fn event_count(app: &TestApp) -> i64 {
    let sql = "SELECT COUNT(*) FROM events";
    match Db::connect(&app.store.url).await.unwrap() {
        Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
        Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(&p).await.unwrap(),
    }
}

async fn login_brute_force_on_one_username_is_refused_with_429_and_changes_nothing(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    app.register("alice").await;
    app.register("bob").await;
    // The default: 10 failures per username, then one more every 90 s.
    for i in 0..10 {
        let resp = login(&app, "alice", &format!("wrong password {i}")).await;
        assert_eq!(resp.0, StatusCode::UNAUTHORIZED, "{}", resp.2);
        assert_eq!(resp.1, None, "no Retry-After on a plain failure");
    }
    let before = event_count(&app).await;
    // Refused now, even with the right password, and in any letter case.
    for username in ["alice", "ALICE", "alice"] {
        let resp = login(&app, username, PASSWORD).await;
        assert_limited(&resp, "rate_limited", 60..=90);
        assert!(resp.2["access_token"].is_null());
        assert!(resp.2["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this username"));
    }
    assert_limited(
        &login(&app, "alice", "another guess").await,
        "rate_limited",
        60..=90,
    );
    // Refused attempts record nothing (no LoginFailed/LoginSucceeded event) and check no
    // password.
    assert_eq!(event_count(&app).await, before);
    // Another username from the same address is not blocked by alice's failures.
    let resp = login(&app, "bob", PASSWORD).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.2);
    assert!(resp.2["access_token"].is_string());
    app.cleanup().await;
}

async fn failures_across_usernames_exhaust_the_address_limit(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Some(|c: &mut Config| {
            c.limits.login_per_ip = Rate::new(5, Duration::from_secs(600));
        }),
    )
    .await;
    app.register("carol").await; // one success: it does not count
    for i in 0..5 {
        let resp = login(&app, &format!("nobody{i}"), "wrong password").await;
        assert_eq!(resp.0, StatusCode::UNAUTHORIZED, "{}", resp.2);
    }
    let resp = login(&app, "carol", PASSWORD).await;
    assert_limited(&resp, "rate_limited", 100..=120);
    assert!(resp.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("this address"));
    app.cleanup().await;
}

async fn spraying_api_keys_from_one_address_is_refused_before_any_lookup(backend: Backend) {
    // 20 failures (the default), over a long window so a slow machine cannot refill one.
    let app = TestApp::spawn_with(
        backend,
        Some(|c: &mut Config| {
            c.limits.api_key_failures_per_ip = Rate::new(20, Duration::from_secs(600));
        }),
    )
    .await;
    let (user, _wallet, agent) = app.user_with_wallet("dave", 0).await;
    // Well-formed unknown keys and garbage alike.
    for i in 0..20 {
        let key = if i % 2 == 0 {
            format!("csk_{}", hex::encode(rand::random::<[u8; 32]>()))
        } else {
            format!("not-a-key-{i}")
        };
        let resp = with_key(&app, &key).await;
        assert_eq!(resp.0, StatusCode::UNAUTHORIZED, "{}", resp.2);
    }
    let resp = with_key(&app, "csk_0000").await;
    assert_limited(&resp, "rate_limited", 1..=30);
    assert!(resp.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("API key"));
    // Checked before the key is looked up: from this address even a valid key waits.
    assert_limited(&with_key(&app, &agent.key).await, "rate_limited", 1..=30);
    // Users are not affected.
    let (status, body) = app.get("/api/wallets", &user.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_api_key_has_its_own_configurable_request_rate() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Some(|c: &mut Config| c.limits.api_key_requests = Rate::per_second(1, 4)),
    )
    .await;
    let (mut user, _wallet, agent) = app.user_with_wallet("erin", 0).await;
    let other = app.issue_api_key(&mut user, "other", None).await;
    // A burst of 4, then one per second.
    for _ in 0..4 {
        let resp = with_key(&app, &agent.key).await;
        assert_eq!(resp.0, StatusCode::OK, "{}", resp.2);
    }
    let resp = with_key(&app, &agent.key).await;
    assert_limited(&resp, "rate_limited", 1..=1);
    assert!(resp.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rate limit of this API key"));
    // Another key of the same owner has its own bucket; a limited key is not a failed
    // authentication (the address is not blocked).
    assert_eq!(with_key(&app, &other.key).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(with_key(&app, &agent.key).await.0, StatusCode::OK);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_request_rate_does_not_throttle_a_busy_agent() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_user, _wallet, agent) = app.user_with_wallet("fred", 0).await;
    // 8 concurrent clients on one key, 400 requests back to back.
    let mut tasks = vec![];
    for _ in 0..8 {
        let client = app.client.clone();
        let url = app.url("/api/transactions");
        let key = agent.key.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = vec![];
            for _ in 0..50 {
                let resp = client.get(&url).header("X-API-KEY", &key).send().await;
                codes.push(resp.unwrap().status());
            }
            codes
        }));
    }
    for task in tasks {
        let codes = task.await.unwrap();
        assert!(codes.iter().all(|s| *s == StatusCode::OK), "{codes:?}");
    }
    app.cleanup().await;
}

async fn audit_events(app: &TestApp, user: &TestUser, event_type: &str) -> Vec<Value> {
    let (status, body) = app
        .get(
            &format!(
                "/api/audit/events?aggregate_type=User&aggregate_id={}&event_type={event_type}",
                user.user_id
            ),
            &user.auth(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["events"].as_array().unwrap().clone()
}

async fn me(app: &TestApp, user: &TestUser) -> Value {
    let (status, body) = app.get("/api/me", &user.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn post_raw(
    app: &TestApp,
    path: &str,
    user: &TestUser,
    body: Value,
) -> (StatusCode, Option<u64>, Value) {
    let req = app
        .client
        .post(app.url(path))
        .bearer_auth(&user.token)
        .json(&body);
    send_raw(req).await
}

async fn five_wrong_codes_lock_every_mfa_protected_action_for_15_minutes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Two codes spent so far: confirming MFA and issuing the key.
    let (mut user, wallet, agent) = app.user_with_wallet("grace", 10u128.pow(18)).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;
    let authorize = |code: String| json!({"transaction_id": tx, "mfa_code": code});

    // Four wrong codes, on different MFA-protected actions: each a 403 naming the field and
    // saying how many are left.
    let attempts: [(&str, Value); 4] = [
        ("/api/authorize_transaction", authorize(user.wrong_code())),
        (
            "/api/api_keys",
            json!({"name": "k", "mfa_code": user.wrong_code()}),
        ),
        (
            "/api/setup_mfa",
            json!({"password": PASSWORD, "mfa_code": user.wrong_code()}),
        ),
        (
            "/api/transfer",
            json!({"password": PASSWORD, "mfa_code": user.wrong_code(),
                   "wallet_address": wallet, "to_address": random_address(), "amount": "1"}),
        ),
    ];
    for (i, (path, body)) in attempts.into_iter().enumerate() {
        let (status, retry_after, body) = post_raw(&app, path, &user, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_mfa_code", "{path}: {body}");
        assert_eq!(body["error"]["field"], "mfa_code");
        assert_eq!(retry_after, None);
        let left = format!("{} more wrong codes", 4 - i);
        assert!(
            body["error"]["message"].as_str().unwrap().contains(&left),
            "{body}"
        );
        assert_eq!(me(&app, &user).await["mfa_failed_attempts"], i + 1);
    }
    assert!(me(&app, &user).await["mfa_locked_until"].is_null());

    // The fifth locks: 429 with Retry-After of about 15 minutes.
    let resp = post_raw(
        &app,
        "/api/authorize_transaction",
        &user,
        authorize(user.wrong_code()),
    )
    .await;
    assert_limited(&resp, "mfa_locked", 890..=900);
    let before = event_count(&app).await;

    // During the lockout even a correct, unused code is refused, on every action, and
    // nothing is recorded or spent.
    let code = user.fresh_code().await;
    let resp = post_raw(&app, "/api/authorize_transaction", &user, authorize(code)).await;
    assert_limited(&resp, "mfa_locked", 880..=900);
    assert!(resp.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("locked until"));
    let code = user.last_code();
    let resp = post_raw(
        &app,
        "/api/api_keys",
        &user,
        json!({"name": "k", "mfa_code": code}),
    )
    .await;
    assert_limited(&resp, "mfa_locked", 880..=900);
    assert_eq!(event_count(&app).await, before);
    let view = app.status(&agent.auth(), &tx).await;
    assert_eq!(view["status"], "pending_authorization");

    // The user sees the lockout...
    let profile = me(&app, &user).await;
    let until = profile["mfa_locked_until"].as_str().expect("locked");
    let until = OffsetDateTime::parse(until, &Rfc3339).unwrap();
    let left = until - OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(14) && left <= time::Duration::minutes(15));
    assert_eq!(profile["mfa_failed_attempts"], 0);
    // ...and its history, with the actor and each action's purpose.
    let rejected = audit_events(&app, &user, "MfaCodeRejected").await;
    let purposes: Vec<&str> = rejected
        .iter()
        .map(|e| e["payload"]["MfaCodeRejected"]["purpose"].as_str().unwrap())
        .collect();
    assert_eq!(
        purposes,
        [
            format!("authorize_transaction:{tx}").as_str(),
            "issue_api_key",
            "replace_mfa",
            "transfer",
            format!("authorize_transaction:{tx}").as_str(),
        ]
    );
    let failures: Vec<u64> = rejected
        .iter()
        .map(|e| {
            e["payload"]["MfaCodeRejected"]["failures"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(failures, [1, 2, 3, 4, 5]);
    let locked = audit_events(&app, &user, "MfaLockedOut").await;
    assert_eq!(locked.len(), 1);
    let event = &locked[0];
    assert_eq!(event["metadata"]["actor"], user.user_id.as_str());
    assert_eq!(event["metadata"]["actor_type"], "user");
    assert_eq!(event["payload"]["MfaLockedOut"]["failures"], 5);
    // No code appears in the history.
    let history = serde_json::to_string(&rejected).unwrap();
    assert!(!history.contains(&user.last_code()));

    // Saying no needs no code: rejecting still works during the lockout.
    let (status, body) = app
        .post(
            "/api/reject_transaction",
            &user.auth(),
            json!({"transaction_id": tx, "reason": "locked out"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Other users are unaffected.
    let mut other = app.register("heidi").await;
    app.enroll_mfa(&mut other).await;
    app.issue_api_key(&mut other, "unaffected", None).await;
    let profile = me(&app, &other).await;
    assert!(profile["mfa_locked_until"].is_null());
    assert_eq!(profile["mfa_failed_attempts"], 0);
    app.cleanup().await;
}
