//! Security properties: token validation, password rules, account enumeration, MFA enrolment
//! and replacement, API-key issuance, and secrets that must never be stored in the clear.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    jwt_must_be_signed_pinned_and_current,
    new_passwords_need_at_least_twelve_characters,
    login_failure_does_not_reveal_whether_the_user_exists,
    usernames_are_unique_case_insensitively,
    setup_mfa_requires_the_password_and_confirm_requires_a_pending_setup,
    replacing_active_mfa_requires_a_current_code_and_keeps_the_old_secret,
    replacement_mfa_secret_becomes_active_only_after_confirmation,
    issuing_an_api_key_requires_enrolled_mfa_and_a_valid_code,
    secrets_never_reach_the_event_log_or_plaintext_tables,
    healthz_reports_ok,
);

const ETH: u128 = 1_000_000_000_000_000_000;

/// Start and confirm MFA for `user`, returning the base32 secret.
async fn enroll(app: &TestApp, user: &mut TestUser) -> String {
    app.enroll_mfa(user).await
}

async fn me(app: &TestApp, user: &TestUser) -> Value {
    let (status, body) = app.get("/api/me", &user.auth()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

// ---------------------------------------------------------------------------------------------
// Tokens

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn good_claims(sub: &str) -> Value {
    let now = unix_now();
    json!({"sub": sub, "iss": "countersign", "aud": "countersign-api", "iat": now,
           "exp": now + 600, "jti": uuid::Uuid::new_v4().to_string(), "ver": 0})
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{body}.")
}

async fn jwt_must_be_signed_pinned_and_current(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let user = app.register("alice").await;
    let secret = app.jwt_secret().to_owned();
    let hs256 = |claims: &Value| sign(Algorithm::HS256, &secret, claims);
    let claims = good_claims(&user.user_id);
    let changed = |key: &str, value: Value| {
        let mut c = claims.clone();
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let now = unix_now();

    let resp = app.get("/api/me", &Auth::None).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");

    let bad_tokens: Vec<(&str, String)> = vec![
        ("garbage", "garbage".to_owned()),
        ("three garbage parts", "a.b.c".to_owned()),
        ("alg none", unsigned(&claims)),
        (
            "wrong audience",
            hs256(&changed("aud", json!("someone-else"))),
        ),
        ("wrong issuer", hs256(&changed("iss", json!("evil")))),
        ("expired", hs256(&changed("exp", json!(now - 60)))),
        (
            "issued in the future",
            hs256(&changed("iat", json!(now + 300))),
        ),
        ("not yet valid", hs256(&changed("nbf", json!(now + 300)))),
        ("missing sub", hs256(&without("sub"))),
        ("missing exp", hs256(&without("exp"))),
        ("missing aud", hs256(&without("aud"))),
        ("missing iss", hs256(&without("iss"))),
        ("missing iat", hs256(&without("iat"))),
        (
            "unknown user",
            hs256(&good_claims(&uuid::Uuid::new_v4().to_string())),
        ),
        (
            "wrong secret",
            sign(Algorithm::HS256, "not-the-server-secret-at-all", &claims),
        ),
        (
            "HS512 with the right secret",
            sign(Algorithm::HS512, &secret, &claims),
        ),
        (
            "HS384 with the right secret",
            sign(Algorithm::HS384, &secret, &claims),
        ),
    ];
    for (case, token) in bad_tokens {
        let resp = app.get("/api/me", &Auth::Bearer(token)).await;
        assert_eq!(resp.0, StatusCode::UNAUTHORIZED, "{case}: {}", resp.1);
        assert_eq!(
            resp.1["error"]["code"], "unauthorized",
            "{case}: {}",
            resp.1
        );
    }
    // A token in another scheme is no token.
    let resp = app
        .client
        .get(app.url("/api/me"))
        .header("authorization", format!("Basic {}", hs256(&claims)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // The same claims, correctly formed and signed, are accepted: the cases above fail for
    // the reason they name.
    let (status, body) = app.get("/api/me", &Auth::Bearer(hs256(&claims))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], user.user_id.as_str());
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Passwords and usernames

async fn new_passwords_need_at_least_twelve_characters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for short in ["abcdefghijk", "ééééééééééé"] {
        let resp = app
            .post(
                "/api/register",
                &Auth::None,
                json!({"username": "alice", "password": short}),
            )
            .await;
        assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
        assert_field(&resp, "password");
    }
    // Nothing was created: the name is still free and cannot log in.
    let resp = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": "alice", "password": "abcdefghijk"}),
        )
        .await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, body) = app
        .post(
            "/api/register",
            &Auth::None,
            json!({"username": "alice", "password": "abcdefghijkl"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.cleanup().await;
}

async fn login_failure_does_not_reveal_whether_the_user_exists(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.register("alice").await;
    let login = |username: String, password: &'static str| {
        app.post(
            "/api/login",
            &Auth::None,
            json!({"username": username, "password": password}),
        )
    };
    let unknown = login("mallory".into(), PASSWORD).await;
    let wrong = login("alice".into(), "not the right password").await;
    let too_long = login("a".repeat(65), PASSWORD).await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(wrong, unknown);
    assert_eq!(too_long, unknown);

    let (status, body) = login("alice".into(), PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["access_token"].is_string());
    app.cleanup().await;
}

async fn usernames_are_unique_case_insensitively(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice = app.register("alice").await;
    for taken in ["alice", "Alice", "ALICE"] {
        let resp = app
            .post(
                "/api/register",
                &Auth::None,
                json!({"username": taken, "password": "another long password"}),
            )
            .await;
        assert_error(&resp, StatusCode::CONFLICT, "username_taken");
        assert_field(&resp, "username");
    }
    // The original account is untouched: same id, same name, same password.
    let profile = me(&app, &alice).await;
    assert_eq!(profile["username"], alice.username.as_str());
    assert_eq!(alice.username, "alice");
    let (status, _) = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": "alice", "password": "another long password"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.register("alice2").await;
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// MFA

async fn setup_mfa_requires_the_password_and_confirm_requires_a_pending_setup(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;

    let resp = app
        .post(
            "/api/setup_mfa",
            &user.auth(),
            json!({"password": "not the right password"}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_password");
    assert_field(&resp, "password");
    let profile = me(&app, &user).await;
    assert_eq!(profile["mfa_enabled"], false);
    assert_eq!(profile["mfa_pending"], false);

    let resp = app
        .post(
            "/api/confirm_mfa",
            &user.auth(),
            json!({"mfa_code": "123456"}),
        )
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "no_pending_mfa");

    // Enrolled, nothing is pending any more: a valid code cannot confirm anything.
    enroll(&app, &mut user).await;
    let code = user.fresh_code().await;
    let resp = app
        .post("/api/confirm_mfa", &user.auth(), json!({"mfa_code": code}))
        .await;
    assert_error(&resp, StatusCode::CONFLICT, "no_pending_mfa");
    let profile = me(&app, &user).await;
    assert_eq!(profile["mfa_enabled"], true);
    assert_eq!(profile["mfa_pending"], false);
    app.cleanup().await;
}

async fn replacing_active_mfa_requires_a_current_code_and_keeps_the_old_secret(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    enroll(&app, &mut user).await;

    let resp = app
        .post(
            "/api/setup_mfa",
            &user.auth(),
            json!({"password": PASSWORD}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_code_required");
    assert_field(&resp, "mfa_code");
    let resp = app
        .post(
            "/api/setup_mfa",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": user.wrong_code()}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    assert_field(&resp, "mfa_code");
    let profile = me(&app, &user).await;
    assert_eq!(profile["mfa_enabled"], true);
    assert_eq!(profile["mfa_pending"], false);

    // The old secret still protects actions.
    app.issue_api_key(&mut user, "still works", None).await;
    app.cleanup().await;
}

async fn replacement_mfa_secret_becomes_active_only_after_confirmation(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    let old = enroll(&app, &mut user).await;
    let code = user.fresh_code().await;
    let (status, body) = app
        .post(
            "/api/setup_mfa",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new = body["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(body["otpauth_uri"].as_str().unwrap().contains(&new));
    let profile = me(&app, &user).await;
    assert_eq!(profile["mfa_enabled"], true);
    assert_eq!(profile["mfa_pending"], true);

    // Pending: the new secret's codes are refused, the old secret's still accepted.
    let resp = app
        .post(
            "/api/api_keys",
            &user.auth(),
            json!({"name": "new", "mfa_code": totp_code(&new, current_step())}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    app.issue_api_key(&mut user, "old secret", None).await;

    // Confirmed: the new secret is the one (this waits for an unused time step).
    user.switch_secret(&new);
    let code = user.fresh_code().await;
    let (status, body) = app
        .post("/api/confirm_mfa", &user.auth(), json!({"mfa_code": code}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The replacement ended every earlier session; this one goes on with a new token.
    user.token = body["access_token"].as_str().unwrap().to_owned();
    let profile = me(&app, &user).await;
    assert_eq!(profile["mfa_enabled"], true);
    assert_eq!(profile["mfa_pending"], false);
    let resp = app
        .post(
            "/api/api_keys",
            &user.auth(),
            json!({"name": "old", "mfa_code": totp_code(&old, current_step())}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    let (_, keys) = app.get("/api/api_keys", &user.auth()).await;
    assert_eq!(keys["api_keys"].as_array().unwrap().len(), 1, "{keys}");
    app.cleanup().await;
}

async fn issuing_an_api_key_requires_enrolled_mfa_and_a_valid_code(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    let resp = app
        .post(
            "/api/api_keys",
            &user.auth(),
            json!({"name": "agent", "mfa_code": "123456"}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_not_enabled");

    // A started but unconfirmed enrolment is not MFA either, even with its own valid code.
    let (status, body) = app
        .post(
            "/api/setup_mfa",
            &user.auth(),
            json!({"password": PASSWORD}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let secret = body["secret"].as_str().unwrap().to_owned();
    let resp = app
        .post(
            "/api/api_keys",
            &user.auth(),
            json!({"name": "agent", "mfa_code": totp_code(&secret, current_step())}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_not_enabled");

    user.set_secret(&secret);
    let code = user.fresh_code().await;
    let (status, body) = app
        .post("/api/confirm_mfa", &user.auth(), json!({"mfa_code": code}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resp = app
        .post(
            "/api/api_keys",
            &user.auth(),
            json!({"name": "agent", "mfa_code": user.wrong_code()}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    assert_field(&resp, "mfa_code");
    let (_, keys) = app.get("/api/api_keys", &user.auth()).await;
    assert_eq!(keys["api_keys"], json!([]));

    app.issue_api_key(&mut user, "agent", None).await;
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Secrets at rest

/// Every row's value of `column` in `table`, as raw bytes (text as UTF-8, blobs as stored).
async fn column(app: &TestApp, table: &str, column: &str, binary: bool) -> Vec<Vec<u8>> {
    let rows: Vec<(Vec<u8>,)> = match app.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.store.url).await.unwrap();
            let rows = sqlx::query_as(&format!("SELECT CAST({column} AS BLOB) FROM {table}"))
                .fetch_all(&pool)
                .await
                .unwrap();
            pool.close().await;
            rows
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&app.store.url).await.unwrap();
            let expr = if binary {
                column.to_owned()
            } else {
                format!("convert_to({column}::text, 'UTF8')")
            };
            let rows = sqlx::query_as(&format!("SELECT {expr} FROM {table}"))
                .fetch_all(&pool)
                .await
                .unwrap();
            pool.close().await;
            rows
        }
    };
    rows.into_iter().map(|(v,)| v).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Assert that none of `secrets` occurs in `data`, exactly or ignoring ASCII case.
fn assert_absent(what: &str, data: &[u8], secrets: &[(&str, Vec<u8>)]) {
    let lower = data.to_ascii_lowercase();
    for (name, secret) in secrets {
        assert!(!contains(data, secret), "{name} found in {what}");
        assert!(
            !contains(&lower, &secret.to_ascii_lowercase()),
            "{name} found (case-insensitively) in {what}"
        );
    }
}

/// Object keys that would mean a secret is being recorded.
fn sensitive_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "api_key",
        "mfa_code",
        "code",
        "token",
        "access_token",
        "jwt",
        "key",
        "sealed",
        "otpauth_uri",
        "qr_png_base64",
    ]
    .contains(&k.as_str())
        || ["private", "password", "mnemonic", "seed", "key_hash"]
            .iter()
            .any(|s| k.contains(s))
        || k.ends_with("_secret")
        || k.ends_with("secret_base32")
}

fn keys_of(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                keys_of(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| keys_of(v, out)),
        _ => {}
    }
}

async fn secrets_never_reach_the_event_log_or_plaintext_tables(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    let totp_base32 = enroll(&app, &mut user).await;
    let wallet = app.create_wallet(&user).await;
    app.anvil.fund(&wallet, ETH).await;
    let agent = app.issue_api_key(&mut user, "agent", None).await;
    let tx = app
        .prepare(&agent, native_body(&wallet, &random_address(), 1000))
        .await;
    let (status, body) = app.authorize(&mut user, &tx).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post(
            "/api/execute_transaction",
            &agent.auth(),
            json!({"transaction_id": tx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.wait_for_status(&agent.auth(), &tx, "confirmed").await;

    let totp_raw = decode_base32(&totp_base32);
    assert_eq!(totp_raw.len(), 20);
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("TOTP secret (base32)", totp_base32.clone().into_bytes()),
        (
            "TOTP secret (base32, unpadded)",
            totp_base32.trim_end_matches('=').as_bytes().to_vec(),
        ),
        ("TOTP secret (hex)", hex::encode(&totp_raw).into_bytes()),
        ("TOTP secret (raw bytes)", totp_raw.clone()),
        ("API key", agent.key.clone().into_bytes()),
        (
            "API key (without prefix)",
            agent.key.trim_start_matches("csk_").as_bytes().to_vec(),
        ),
        ("password", PASSWORD.as_bytes().to_vec()),
        ("JWT", user.token.clone().into_bytes()),
        (
            "JWT signature",
            user.token.rsplit('.').next().unwrap().as_bytes().to_vec(),
        ),
    ];

    // The event log: no secret values, no secret-looking fields.
    let event_types = column(&app, "events", "event_type", false).await;
    let event_types: Vec<String> = event_types
        .into_iter()
        .map(|t| String::from_utf8(t).unwrap())
        .collect();
    for expected in [
        "UserRegistered",
        "MfaSetupStarted",
        "MfaEnabled",
        "ApiKeyIssued",
        "TransactionPrepared",
        "TransactionAuthorized",
        "TransactionExecuted",
        "TransactionConfirmed",
    ] {
        assert!(
            event_types.iter().any(|t| t == expected),
            "{expected} missing from {event_types:?}"
        );
    }
    let mut keys = vec![];
    for col in ["payload", "metadata"] {
        for row in column(&app, "events", col, false).await {
            assert_absent("the event log", &row, &secrets);
            let json: Value = serde_json::from_slice(&row).expect("events hold JSON");
            keys_of(&json, &mut keys);
        }
    }
    assert!(keys.iter().any(|k| k == "secret_id"), "{keys:?}");
    let leaked: Vec<&String> = keys.iter().filter(|k| sensitive_key(k)).collect();
    assert!(
        leaked.is_empty(),
        "secret-like fields in events: {leaked:?}"
    );

    // Secret tables hold sealed or hashed values only; views hold no secrets either.
    let checks: [(&str, &[(&str, bool)]); 5] = [
        (
            "mfa_secrets",
            &[("secret_id", false), ("user_id", false), ("sealed", true)],
        ),
        (
            "wallet_keys",
            &[
                ("wallet_address", false),
                ("owner_user_id", false),
                ("sealed", true),
            ],
        ),
        (
            "api_key_credentials",
            &[("api_key_id", false), ("key_hash", false)],
        ),
        (
            "user_credentials",
            &[
                ("user_id", false),
                ("username", false),
                ("password_hash", false),
            ],
        ),
        ("views", &[("payload", false)]),
    ];
    for (table, columns) in checks {
        let mut rows = 0;
        for (col, binary) in columns {
            for value in column(&app, table, col, *binary).await {
                rows += 1;
                assert_absent(&format!("{table}.{col}"), &value, &secrets);
            }
        }
        assert!(rows > 0, "{table} is empty");
    }
    // Two MFA rows (the first setup is the only one here) would be fine; at least one, sealed.
    for sealed in column(&app, "mfa_secrets", "sealed", true).await {
        assert!(
            sealed.len() > totp_raw.len(),
            "sealed TOTP secret too short"
        );
    }
    for hash in column(&app, "user_credentials", "password_hash", false).await {
        assert!(
            hash.starts_with(b"$argon2"),
            "password is not an argon2 hash"
        );
    }
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Service endpoints

async fn healthz_reports_ok(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, body) = app.get("/healthz", &Auth::None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_as_json() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let resp = app
        .client
        .get(app.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let doc: Value = resp.json().await.expect("the document is JSON");
    assert!(doc["openapi"].is_string(), "{doc}");
    app.cleanup().await;
}
