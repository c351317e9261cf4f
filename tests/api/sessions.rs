//! Sessions: a logout ends one access token, a password change or an MFA replacement ends
//! every earlier one (token version), on every node; sockets and tickets of ended tokens are
//! refused and closed.

use std::time::Duration;

use futures::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;
use crate::nodes::Node;
use crate::on_both_backends;

on_both_backends!(
    logout_ends_only_the_token_it_was_sent_with,
    a_logout_is_honoured_by_every_node_at_once,
    changing_the_password_ends_every_earlier_session,
    changing_the_password_checks_the_current_one_and_the_mfa_code,
    replacing_mfa_ends_earlier_sessions_but_enrolling_does_not,
    tokens_need_the_current_version,
    sockets_and_tickets_of_ended_tokens_are_refused_and_closed,
);

const NEW_PASSWORD: &str = "a much longer new passphrase";

async fn login(app: &TestApp, username: &str, password: &str) -> (StatusCode, Value) {
    app.post(
        "/api/login",
        &Auth::None,
        json!({"username": username, "password": password}),
    )
    .await
}

async fn new_token(app: &TestApp, username: &str) -> String {
    let (status, body) = login(app, username, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn bearer(token: &str) -> Auth {
    Auth::Bearer(token.to_owned())
}

async fn assert_works(app: &TestApp, token: &str) {
    let (status, body) = app.get("/api/me", &bearer(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn assert_revoked(app: &TestApp, token: &str) {
    let resp = app.get("/api/me", &bearer(token)).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "token_revoked");
}

/// The user's own events of `event_type`, read through the audit API.
async fn user_events(app: &TestApp, user: &TestUser, auth: &Auth, event_type: &str) -> Vec<Value> {
    let (status, body) = app
        .get(
            &format!(
                "/api/audit/events?aggregate_type=User&aggregate_id={}&event_type={event_type}",
                user.user_id
            ),
            auth,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["events"].as_array().unwrap().clone()
}

async fn logout_ends_only_the_token_it_was_sent_with(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let user = app.register("alice").await;
    let other = new_token(&app, "alice").await;

    let resp = app.post("/api/logout", &Auth::None, json!({})).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");

    let (status, body) = app.post("/api/logout", &user.auth(), json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_revoked(&app, &user.token).await;
    // Every endpoint refuses it, including a second logout and the socket ticket.
    let resp = app.post("/api/logout", &user.auth(), json!({})).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "token_revoked");
    let resp = app.post("/api/ws_ticket", &user.auth(), json!({})).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "token_revoked");
    let resp = app.get("/api/wallets", &user.auth()).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "token_revoked");

    // The user's other session goes on, and a new login works.
    assert_works(&app, &other).await;
    assert_works(&app, &new_token(&app, "alice").await).await;

    // Recorded, with the actor and the token id (not the token).
    let events = user_events(&app, &user, &bearer(&other), "LoggedOut").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["metadata"]["actor"], user.user_id.as_str());
    assert_eq!(events[0]["metadata"]["actor_type"], "user");
    let data = &events[0]["payload"]["LoggedOut"];
    assert!(
        data["token_id"].as_str().is_some_and(|j| j.len() == 36),
        "{data}"
    );
    assert!(!events[0].to_string().contains(&user.token));
    app.cleanup().await;
}

async fn a_logout_is_honoured_by_every_node_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let second = Node::start(app.config()).await;
    let user = app.register("alice").await;
    let me_on = |base: &str, token: &str| {
        app.client
            .get(format!("{base}/api/me"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        me_on(&second.address, &user.token).await.unwrap().status(),
        StatusCode::OK
    );
    let (status, _) = app.post("/api/logout", &user.auth(), json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Immediately, without waiting for any background catch-up.
    let resp = me_on(&second.address, &user.token).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "token_revoked");

    // A password change on the second node ends the first node's sessions as well.
    let token = new_token(&app, "alice").await;
    let resp = app
        .client
        .post(format!("{}/api/change_password", second.address))
        .bearer_auth(&token)
        .json(&json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_revoked(&app, &token).await;
    second.stop().await;
    app.cleanup().await;
}

async fn changing_the_password_ends_every_earlier_session(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    app.enroll_mfa(&mut user).await;
    let other = new_token(&app, "alice").await;

    let code = user.fresh_code().await;
    let (status, body) = app
        .post(
            "/api/change_password",
            &user.auth(),
            json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD, "mfa_code": code}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    let fresh = body["access_token"].as_str().unwrap().to_owned();

    // Every token issued before is refused; the one it returned works.
    assert_revoked(&app, &user.token).await;
    assert_revoked(&app, &other).await;
    assert_works(&app, &fresh).await;

    // The old password is gone, the new one logs in.
    let resp = login(&app, "alice", PASSWORD).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, body) = login(&app, "alice", NEW_PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_works(&app, body["access_token"].as_str().unwrap()).await;

    // Recorded with its actor, and the code it spent; no secret material.
    let events = user_events(&app, &user, &bearer(&fresh), "PasswordChanged").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["metadata"]["actor"], user.user_id.as_str());
    assert_eq!(
        events[0]["payload"],
        json!({"PasswordChanged": {"changed_at": events[0]["payload"]["PasswordChanged"]["changed_at"]}})
    );
    let accepted = user_events(&app, &user, &bearer(&fresh), "MfaCodeAccepted").await;
    assert!(accepted
        .iter()
        .any(|e| e["payload"]["MfaCodeAccepted"]["purpose"] == "change_password"));
    // The spent code cannot be used again.
    user.token = fresh;
    let resp = app
        .post(
            "/api/change_password",
            &user.auth(),
            json!({"current_password": NEW_PASSWORD, "new_password": PASSWORD,
                   "mfa_code": user.last_code()}),
        )
        .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_code_replayed");
    assert_works(&app, &user.token).await;
    app.cleanup().await;
}

async fn changing_the_password_checks_the_current_one_and_the_mfa_code(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    let auth = user.auth();
    let change = |body: Value| app.post("/api/change_password", &auth, body);

    // Without MFA: the current password is enough, and a code is refused.
    let resp =
        change(json!({"current_password": "wrong password!!", "new_password": NEW_PASSWORD})).await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_password");
    assert_field(&resp, "current_password");
    let resp = change(json!({"current_password": PASSWORD, "new_password": "short"})).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "new_password");
    let resp = change(json!({"current_password": PASSWORD, "new_password": PASSWORD})).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "new_password");
    let resp = change(json!({"current_password": PASSWORD})).await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    assert_field(&resp, "new_password");
    let resp = change(
        json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD,
                             "mfa_code": "123456"}),
    )
    .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_not_enabled");
    let resp = change(
        json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD,
                             "extra": 1}),
    )
    .await;
    assert_error(&resp, StatusCode::BAD_REQUEST, "invalid_field");
    // Nothing changed by any of these.
    assert_works(&app, &user.token).await;
    let (status, _) = login(&app, "alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    let none = user_events(&app, &user, &user.auth(), "PasswordChanged").await;
    assert!(none.is_empty());

    // With MFA: the code is required and must be right.
    app.enroll_mfa(&mut user).await;
    let change = |body: Value| app.post("/api/change_password", &auth, body);
    let resp = change(json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD})).await;
    assert_error(&resp, StatusCode::FORBIDDEN, "mfa_code_required");
    assert_field(&resp, "mfa_code");
    let resp = change(
        json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD,
                             "mfa_code": user.wrong_code()}),
    )
    .await;
    assert_error(&resp, StatusCode::FORBIDDEN, "invalid_mfa_code");
    assert_field(&resp, "mfa_code");
    assert_works(&app, &user.token).await;
    let (status, _) = login(&app, "alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    let resp = login(&app, "alice", NEW_PASSWORD).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    app.cleanup().await;
}

async fn replacing_mfa_ends_earlier_sessions_but_enrolling_does_not(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut user = app.register("alice").await;
    let before_enrolment = user.token.clone();
    app.enroll_mfa(&mut user).await;
    // The first enrolment replaces nothing: the session goes on.
    assert_works(&app, &before_enrolment).await;
    let other = new_token(&app, "alice").await;

    // Starting a replacement ends nothing yet.
    let code = user.fresh_code().await;
    let (status, body) = app
        .post(
            "/api/setup_mfa",
            &user.auth(),
            json!({"password": PASSWORD, "mfa_code": code}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_works(&app, &other).await;

    // Confirming it does: every earlier token is refused, the confirming session gets a new one.
    user.switch_secret(body["secret"].as_str().unwrap());
    let code = user.fresh_code().await;
    let (status, body) = app
        .post("/api/confirm_mfa", &user.auth(), json!({"mfa_code": code}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mfa_enabled"], true);
    let fresh = body["access_token"]
        .as_str()
        .expect("a new token")
        .to_owned();
    assert_revoked(&app, &user.token).await;
    assert_revoked(&app, &other).await;
    assert_revoked(&app, &before_enrolment).await;
    assert_works(&app, &fresh).await;
    assert_works(&app, &new_token(&app, "alice").await).await;
    app.cleanup().await;
}

async fn tokens_need_the_current_version(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let user = app.register("alice").await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let sign = |claims: Value| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(app.jwt_secret().as_bytes()),
        )
        .unwrap()
    };
    let claims = |ver: Value| {
        let mut c = json!({"sub": user.user_id, "iss": "countersign", "aud": "countersign-api",
                           "iat": now, "exp": now + 600, "jti": uuid::Uuid::new_v4().to_string()});
        if !ver.is_null() {
            c["ver"] = ver;
        }
        c
    };
    // Correctly signed, but without a version or with one the user never had.
    let resp = app
        .get("/api/me", &bearer(&sign(claims(Value::Null))))
        .await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let resp = app.get("/api/me", &bearer(&sign(claims(json!("0"))))).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "unauthorized");
    let resp = app.get("/api/me", &bearer(&sign(claims(json!(1))))).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "token_revoked");
    // The current version (0 for a new user) passes: the cases above fail for their reason.
    assert_works(&app, &sign(claims(json!(0)))).await;

    // After a password change, a token forged with the old version fails, the new one passes.
    let (status, _) = app
        .post(
            "/api/change_password",
            &user.auth(),
            json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let resp = app.get("/api/me", &bearer(&sign(claims(json!(0))))).await;
    assert_error(&resp, StatusCode::UNAUTHORIZED, "token_revoked");
    assert_works(&app, &sign(claims(json!(1)))).await;
    app.cleanup().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_socket(app: &TestApp, auth: Option<&str>, query: &str) -> Result<Socket, String> {
    let url = format!("{}/api/ws{query}", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = auth {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

/// The close code the socket receives within 5 s (`None` if it stays open).
async fn close_code(socket: &mut Socket) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return None,
            Ok(None) | Ok(Some(Err(_))) => return Some(0),
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn ticket(app: &TestApp, token: &str) -> String {
    let (status, body) = app.post("/api/ws_ticket", &bearer(token), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["ticket"].as_str().unwrap().to_owned()
}

async fn sockets_and_tickets_of_ended_tokens_are_refused_and_closed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let user = app.register("alice").await;
    let other = new_token(&app, "alice").await;

    // Open sockets: one by header, one by ticket, with the token about to be logged out; one
    // with the user's other token.
    let mut by_header = open_socket(&app, Some(&user.token), "?after=0")
        .await
        .unwrap();
    let pending_ticket = ticket(&app, &user.token).await;
    let used_ticket = ticket(&app, &user.token).await;
    let mut by_ticket = open_socket(&app, None, &format!("?after=0&ticket={used_ticket}"))
        .await
        .unwrap();
    let mut unaffected = open_socket(&app, Some(&other), "?after=0").await.unwrap();

    let (status, _) = app.post("/api/logout", &user.auth(), json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(close_code(&mut by_header).await, Some(4003));
    assert_eq!(close_code(&mut by_ticket).await, Some(4003));
    // A ticket issued before the logout no longer opens a socket, nor does the token.
    assert!(
        open_socket(&app, None, &format!("?ticket={pending_ticket}"))
            .await
            .is_err()
    );
    assert!(open_socket(&app, Some(&user.token), "").await.is_err());

    // A password change closes every socket of the user.
    let (status, body) = app
        .post(
            "/api/change_password",
            &bearer(&other),
            json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(close_code(&mut unaffected).await, Some(4003));
    let fresh = body["access_token"].as_str().unwrap().to_owned();
    let mut socket = open_socket(&app, Some(&fresh), "?after=0").await.unwrap();
    assert_eq!(
        close_code(&mut socket).await,
        None,
        "a socket of a live token stays open"
    );
    app.cleanup().await;
}
