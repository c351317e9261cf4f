//! `GET /api/ws`: live events over WebSocket, resumable by position; `POST /api/ws_ticket`:
//! single-use tickets for browsers (which cannot set headers on a WebSocket); and the long poll
//! `GET /api/transactions/{id}/wait` for agents without WebSockets.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ApiResult};
use super::extract::{ApiQuery, Caller};
use super::transactions::visible_transaction;
use crate::app::AppState;
use crate::push::{Outgoing, Principal, Subscription, TicketToken, CLOSE_EXPIRED, CLOSE_TOO_SLOW};

const TICKET_TTL_SECS: i64 = 30;
const PING_EVERY: Duration = Duration::from_secs(20);
const PONG_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a socket without `?after=` waits for a `{"type":"resume"}` first message.
const RESUME_GRACE: Duration = Duration::from_millis(200);
const MAX_WAIT_SECS: u64 = 55;

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn ticket_hash(ticket: &str) -> String {
    hex::encode(Sha256::digest(ticket.as_bytes()))
}

/// A single-use ticket, valid for 30 seconds, that opens one socket as the caller.
pub async fn issue_ticket(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (principal, session_expires_at, token) = match &caller {
        Caller::User(u) => (
            user_principal(&state, &u.user_id).await?,
            Some(u.expires_at),
            Some(TicketToken {
                token_id: u.token_id.clone(),
                token_version: u.token_version,
            }),
        ),
        Caller::Agent(a) => (Principal::Agent(a.key.api_key_id.clone()), None, None),
    };
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut_slice());
    let ticket = zeroize::Zeroizing::new(hex::encode(bytes.as_slice()));
    state
        .db
        .insert_ws_ticket(
            &ticket_hash(&ticket),
            &principal,
            now_unix() + TICKET_TTL_SECS,
            session_expires_at,
            token.as_ref(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"ticket": ticket.as_str(), "expires_in": TICKET_TTL_SECS})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsQuery {
    ticket: Option<String>,
    after: Option<i64>,
}

/// A user's socket principal: auditors receive every transaction's events.
async fn user_principal(state: &AppState, user_id: &str) -> ApiResult<Principal> {
    let view: Option<projections::UserView> =
        state.db.view(projections::ViewKind::User, user_id).await?;
    Ok(match view {
        Some(v) if v.has_role(aggregates::Role::Auditor) => Principal::Auditor(user_id.to_owned()),
        _ => Principal::User(user_id.to_owned()),
    })
}

/// Who the socket is for, and until when its credentials are valid.
struct WsAuth {
    principal: Principal,
    expires_at: Option<i64>,
    /// The access token (`jti`) of a user's socket: a logout of it closes the socket.
    token_id: Option<String>,
}

async fn authenticate(
    state: &AppState,
    parts: &mut Parts,
    ticket: Option<&str>,
) -> ApiResult<WsAuth> {
    if let Some(ticket) = ticket {
        let (principal, session_expires_at, token) = state
            .db
            .take_ws_ticket(&ticket_hash(ticket), now_unix())
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid, used or expired ticket"))?;
        match (&principal, &token) {
            // The key may have been revoked since the ticket was issued.
            (Principal::Agent(key), _) => {
                super::extract::agent_by_id(state, key).await?;
            }
            // And the token logged out, or ended by a password change or MFA replacement.
            (Principal::User(user_id) | Principal::Auditor(user_id), Some(t)) => {
                super::sessions::check_session(state, user_id, &t.token_id, t.token_version)
                    .await?;
            }
            (_, None) => {}
        }
        return Ok(WsAuth {
            principal,
            expires_at: session_expires_at,
            token_id: token.map(|t| t.token_id),
        });
    }
    match Caller::from_request_parts(parts, state).await? {
        Caller::User(u) => Ok(WsAuth {
            principal: user_principal(state, &u.user_id).await?,
            expires_at: Some(u.expires_at),
            token_id: Some(u.token_id),
        }),
        Caller::Agent(a) => Ok(WsAuth {
            principal: Principal::Agent(a.key.api_key_id),
            expires_at: None,
            token_id: None,
        }),
    }
}

/// The upgrade request: credentials (header or ticket) and the resume position.
pub struct WsRequest {
    auth: WsAuth,
    after: Option<i64>,
    upgrade: WebSocketUpgrade,
}

impl FromRequestParts<AppState> for WsRequest {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        // First: a foreign page's socket must not even spend a ticket.
        super::cors::check_websocket_origin(&state.cors_origins, &parts.headers)?;
        let ApiQuery(query) = ApiQuery::<WsQuery>::from_request_parts(parts, state).await?;
        if query.after.is_some_and(|a| a < 0) {
            return Err(ApiError::invalid("after", "after must be a position ≥ 0"));
        }
        // Before authenticating: a request that cannot be upgraded must not consume a ticket.
        let upgrade = WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "websocket_required", e.body_text())
            })?;
        let auth = authenticate(state, parts, query.ticket.as_deref()).await?;
        Ok(Self {
            auth,
            after: query.after,
            upgrade,
        })
    }
}

pub async fn ws(State(state): State<AppState>, request: WsRequest) -> Response {
    let WsRequest {
        auth,
        after,
        upgrade,
    } = request;
    // Small buffers: an idle socket should cost kilobytes, not the 128 KiB default.
    upgrade
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(16 * 1024)
        .on_upgrade(move |socket| async move {
            let subscription = state
                .hub
                .subscribe_session(auth.principal.clone(), auth.token_id.clone());
            let id = subscription.id;
            if let Err(e) = serve_socket(&state, socket, auth, after, subscription).await {
                tracing::debug!(error = %e, "socket ended");
            }
            state.hub.unsubscribe(id);
        })
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) -> Result<(), axum::Error> {
    socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await
}

async fn send_text(socket: &mut WebSocket, text: &str) -> Result<(), axum::Error> {
    socket.send(Message::Text(text.into())).await
}

/// Parse a `{"type":"resume","after":N}` message.
fn resume_position(message: &Message) -> Option<i64> {
    let Message::Text(text) = message else {
        return None;
    };
    let v: Value = serde_json::from_str(text.as_str()).ok()?;
    if v["type"] != "resume" {
        return None;
    }
    v["after"].as_i64().filter(|a| *a >= 0)
}

async fn serve_socket(
    state: &AppState,
    mut socket: WebSocket,
    auth: WsAuth,
    after: Option<i64>,
    mut subscription: Subscription,
) -> Result<(), axum::Error> {
    let after = match after {
        Some(a) => Some(a),
        None => match tokio::time::timeout(RESUME_GRACE, socket.recv()).await {
            Ok(Some(Ok(message))) => resume_position(&message),
            Ok(_) => return Ok(()),
            Err(_) => None,
        },
    };

    // Replay what was missed, up to where live delivery starts.
    let mut last_sent = after.unwrap_or(subscription.from);
    while last_sent < subscription.from {
        let rows = state
            .db
            .push_events(last_sent, subscription.from, Some(&auth.principal))
            .await
            .map_err(axum::Error::new)?;
        let Some(last) = rows.last().map(|r| r.position) else {
            break;
        };
        for row in rows {
            if let Some(message) = row.message() {
                send_text(&mut socket, &message).await?;
            }
        }
        last_sent = last;
    }
    last_sent = last_sent.max(subscription.from);
    send_text(
        &mut socket,
        &json!({"type": "caught_up", "position": last_sent}).to_string(),
    )
    .await?;

    let expiry = auth.expires_at.map(|at| {
        let secs = u64::try_from(at - now_unix()).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_secs(secs)
    });
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut last_pong = tokio::time::Instant::now();
    loop {
        tokio::select! {
            outgoing = subscription.rx.recv() => match outgoing {
                Some(Outgoing::Event { position, message }) => {
                    if position > last_sent {
                        send_text(&mut socket, &message).await?;
                        last_sent = position;
                    }
                }
                Some(Outgoing::Close { code, reason }) => return close(&mut socket, code, reason).await,
                None => {
                    let reason = format!("too slow: reconnect with after={last_sent}");
                    return close(&mut socket, CLOSE_TOO_SLOW, &reason).await;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Pong(_))) => last_pong = tokio::time::Instant::now(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if last_pong.elapsed() > PONG_TIMEOUT {
                    return close(&mut socket, 1011, "no pong").await;
                }
                socket.send(Message::Ping(Default::default())).await?;
            }
            _ = async { tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)).await },
                if expiry.is_some() => {
                return close(&mut socket, CLOSE_EXPIRED, "credentials expired: log in again").await;
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    timeout: Option<u64>,
}

/// Long poll: answer as soon as the transaction leaves `pending_authorization`, or when the
/// timeout (default 30 s, at most 55 s, and always 5 s inside the request timeout) passes,
/// with the current view either way.
pub async fn wait(
    State(state): State<AppState>,
    caller: Caller,
    Path(transaction_id): Path<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> ApiResult<Json<projections::TransactionView>> {
    // A wait the request timeout would cut off would answer 408 instead of the view: keep
    // 5 s (or, under a very short request timeout, half of it) for the answer.
    let limit = state.request_timeout.as_secs();
    let max = MAX_WAIT_SECS.min(limit.saturating_sub(5)).max(limit / 2);
    let timeout = query.timeout.unwrap_or(30.min(max));
    if timeout > max {
        return Err(ApiError::invalid(
            "timeout",
            format!("timeout must be at most {max} seconds"),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut position = state.hub.watch_position();
    loop {
        position.mark_unchanged();
        let view = visible_transaction(&state, &caller, &transaction_id).await?;
        if view.status != "pending_authorization" {
            return Ok(Json(view));
        }
        tokio::select! {
            changed = position.changed() => {
                if changed.is_err() {
                    return Ok(Json(view));
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(view)),
        }
    }
}
