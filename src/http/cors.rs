//! Cross-origin access from browsers: CORS for the origins in `COUNTERSIGN_CORS_ORIGINS` (none by
//! default: then no CORS header is ever sent), and the `Origin` check on WebSocket upgrades,
//! which CORS does not cover.
//!
//! Credentials are headers a script sets (`Authorization`, `X-API-KEY`), never cookies, so no
//! `Access-Control-Allow-Credentials`: an allowed origin can call the API only with a token its
//! own page obtained.

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, HOST,
    ORIGIN, VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiResult};
use crate::app::AppState;
use crate::config::CorsOrigins;

const ALLOW_METHODS: &str = "GET, POST, DELETE";
const ALLOW_HEADERS: &str = "authorization, content-type, x-api-key, idempotency-key, x-request-id";
/// Response headers a cross-origin script may read beyond the safelisted ones.
const EXPOSE_HEADERS: &str = "retry-after, x-request-id, idempotent-replayed";
/// How long a browser may cache a preflight answer, seconds.
const MAX_AGE: &str = "600";

/// Answer preflights from allowed origins and mark their responses readable; requests from any
/// other origin (or none) pass through untouched, so a disallowed preflight gets the usual
/// JSON 405 and no `Access-Control-*` header.
pub async fn cors(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.cors_origins.is_empty() {
        return next.run(req).await;
    }
    let allowed = req
        .headers()
        .get(ORIGIN)
        .filter(|o| o.to_str().is_ok_and(|o| state.cors_origins.allows(o)))
        .cloned();
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = match (&allowed, preflight) {
        (Some(_), true) => StatusCode::NO_CONTENT.into_response(),
        _ => next.run(req).await,
    };
    let headers = response.headers_mut();
    // With an allow-list, what a response says depends on the request's origin.
    headers.append(VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = allowed {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if preflight {
            headers.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            headers.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        } else {
            headers.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
    }
    response
}

/// Refuse a WebSocket upgrade a browser makes from a foreign page (cross-site WebSocket
/// hijacking): browsers always send `Origin` on one, and it must be this server's own origin
/// or an allowed one. Clients that send no `Origin` (agents, CLIs) are not browsers and pass.
///
/// "Own origin" compares host and port with `Host`, or with `X-Forwarded-Host` when a proxy
/// sets it (a page's script cannot set headers on a WebSocket, so neither can be forged from a
/// browser). The scheme is not compared: TLS usually ends at a proxy.
pub fn check_websocket_origin(origins: &CorsOrigins, headers: &HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if origins.allows(origin) || is_own_origin(origin, headers) {
        return Ok(());
    }
    Err(ApiError::forbidden(
        "origin_not_allowed",
        "WebSocket connections from this origin are not allowed (see COUNTERSIGN_CORS_ORIGINS)",
    ))
}

fn is_own_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Ok(origin) = url::Url::parse(origin) else {
        return false; // also `null` (sandboxed frames, files)
    };
    if !matches!(origin.scheme(), "http" | "https") {
        return false;
    }
    let forwarded = headers
        .get("x-forwarded-host")
        .and_then(|v| v.to_str().ok())
        // A chain of proxies appends: the first is the one the browser addressed.
        .and_then(|v| v.split(',').next());
    let host = headers.get(HOST).and_then(|v| v.to_str().ok());
    [forwarded, host].into_iter().flatten().any(|authority| {
        let authority = authority.trim();
        // Only host[:port] characters, so the value cannot smuggle in a user or a path.
        !authority.is_empty()
            && authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
            && url::Url::parse(&format!("{}://{authority}", origin.scheme()))
                .is_ok_and(|own| own.origin() == origin.origin())
    })
}
