//! The HTTP surface: routes (the Flask project's paths kept), middleware, JSON errors.

mod api_keys;
mod audit;
mod cors;
mod error;
mod extract;
#[doc(hidden)]
pub mod fuzzing;
mod idempotency;
mod sessions;
mod transactions;
mod transfers;
mod users;
mod wallets;
mod web;
mod ws;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, ApiResult};
pub use extract::parse_json;

use crate::app::AppState;

pub const BODY_LIMIT: usize = 64 * 1024;
const OPENAPI: &str = include_str!("../openapi.json");

pub fn router(state: AppState) -> Router {
    let metrics_state = state.clone();
    let cors_state = state.clone();
    let limit = state.request_timeout;
    let api = Router::new()
        .route("/register", post(users::register))
        .route("/login", post(users::login))
        .route("/me", get(users::me))
        .route("/setup_mfa", post(users::setup_mfa))
        .route("/confirm_mfa", post(users::confirm_mfa))
        .route("/change_password", post(sessions::change_password))
        .route("/logout", post(sessions::logout))
        .route("/create_wallet", post(wallets::create_wallet))
        .route("/wallets", get(wallets::list_wallets))
        .route("/load_wallet", post(wallets::load_wallet))
        .route("/api_keys", post(api_keys::issue).get(api_keys::list))
        .route("/api_keys/{id}", delete(api_keys::revoke))
        .route("/prepare_transaction", post(transactions::prepare))
        .route("/authorize_transaction", post(transactions::authorize))
        .route(
            "/authorize_transactions",
            post(transactions::authorize_many),
        )
        .route("/reject_transaction", post(transactions::reject))
        .route("/execute_transaction", post(transactions::execute))
        .route("/transfer", post(transfers::transfer))
        .route("/transfer_erc20", post(transfers::transfer_erc20))
        .route("/contract_call", post(transfers::contract_call))
        .route("/transaction_status", get(transactions::status))
        .route("/transactions", get(transactions::list))
        .route("/transactions/{id}/events", get(transactions::events))
        .route("/transactions/{id}/wait", get(ws::wait))
        .route("/ws_ticket", post(ws::issue_ticket))
        .route("/ws", get(ws::ws))
        .route("/audit/events", get(audit::events))
        .route("/audit/transactions/{id}", get(audit::transaction))
        .route("/audit/verify", get(audit::verify))
        .route("/audit/public_key", get(audit::public_key))
        .route("/openapi.json", get(openapi));

    Router::new()
        .nest("/api", api)
        .merge(web::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::metrics::scrape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                request_timeout(limit, req, next)
            },
        ))
        .layer(axum::middleware::from_fn(record_source_ip))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("handler panicked").into_response()
        }))
        // Outside the timeout and the panic catcher, so an allowed origin can read those too.
        .layer(axum::middleware::from_fn_with_state(cors_state, cors::cors))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        // Outermost of the response layers, so timeouts, caught panics and CORS preflights
        // carry them too. Nothing here is meant to be framed, embedded by other sites or sent
        // a referrer; the web page sets its own, fuller CSP (`web.rs`). HSTS is the TLS
        // proxy's job.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("same-origin"),
        ))
        // Outside the panic catcher, so a panic counts as the 500 it becomes.
        .layer(axum::middleware::from_fn_with_state(
            metrics_state,
            crate::metrics::track_requests,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Spans carry method, matched route and request id; never headers or bodies.
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                let request_id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                tracing::info_span!("request", method = %req.method(), route, request_id)
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

async fn healthz(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    match state.projector.catch_up().await {
        Ok(position) => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "position": position})),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the store is not reachable",
            )
            .into_response()
        }
    }
}

/// Serve the request with its client address in scope, so the events it causes record it.
async fn record_source_ip(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    match peer {
        Some(ip) => crate::store::SOURCE_IP.scope(ip, next.run(req)).await,
        None => next.run(req).await,
    }
}

/// Bound every request; a timeout is a JSON 408 like every other error.
async fn request_timeout(
    limit: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long",
        )
        .into_response(),
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}
