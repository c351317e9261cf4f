//! Cross-origin access: CORS off by default, an exact allow-list when configured, `*` refused
//! at start-up, the `Origin` check on WebSocket upgrades, and the security headers every
//! response (the web page above all) carries.

use std::process::{Command, Stdio};
use std::time::Duration;

use countersign::config::CorsOrigins;
use countersign::Config;
use futures::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    cors_is_off_by_default,
    allowed_origins_get_cors_headers_and_others_none,
    websocket_upgrades_from_foreign_origins_are_refused,
    page_and_api_responses_carry_the_security_headers,
);

const APP_ORIGIN: &str = "https://app.example.com";
const DEV_ORIGIN: &str = "http://localhost:5173";
const EVIL_ORIGIN: &str = "https://evil.example.com";

fn allow_list(config: &mut Config) {
    config.cors_origins =
        CorsOrigins::parse(&format!("{APP_ORIGIN}, {DEV_ORIGIN}")).expect("valid origins");
}

/// Every `Access-Control-*` header of a response.
fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// A browser's preflight for a cross-origin JSON POST with a bearer token.
async fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

async fn get_from(app: &TestApp, path: &str, origin: &str, auth: &Auth) -> reqwest::Response {
    let req = app.client.get(app.url(path)).header("origin", origin);
    let req = match auth {
        Auth::Bearer(t) => req.bearer_auth(t),
        Auth::ApiKey(k) => req.header("x-api-key", k),
        Auth::None => req,
    };
    req.send().await.unwrap()
}

async fn cors_is_off_by_default(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let user = app.register("cora").await;

    // A preflight is an OPTIONS like any other: 405, and nothing that lets a browser proceed.
    let resp = preflight(&app, "/api/prepare_transaction", APP_ORIGIN).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(cors_headers(resp.headers()), Vec::<String>::new());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // Simple requests are answered (the browser, not the server, withholds them) without any
    // header that would let the other origin's script read them.
    for (path, auth, status) in [
        ("/api/me", Auth::Bearer(user.token.clone()), StatusCode::OK),
        ("/api/me", Auth::None, StatusCode::UNAUTHORIZED),
        ("/api/openapi.json", Auth::None, StatusCode::OK),
    ] {
        let resp = get_from(&app, path, APP_ORIGIN, &auth).await;
        assert_eq!(resp.status(), status, "{path}");
        assert_eq!(cors_headers(resp.headers()), Vec::<String>::new(), "{path}");
        assert!(resp.headers().get("vary").is_none(), "{path}");
    }

    // Sockets: only the server's own origin (or no Origin: not a browser).
    let own = app.address.clone();
    for origin in [APP_ORIGIN, EVIL_ORIGIN, "null"] {
        let refused = upgrade(&app, &user.auth(), &[("origin", origin)]).await;
        assert_refused(refused, origin);
    }
    upgrade(&app, &user.auth(), &[("origin", &own)])
        .await
        .expect("same-origin socket");
    upgrade(&app, &user.auth(), &[])
        .await
        .expect("socket without Origin");
    app.cleanup().await;
}

async fn allowed_origins_get_cors_headers_and_others_none(backend: Backend) {
    let app = TestApp::spawn_with(backend, Some(allow_list)).await;
    let user = app.register("cyrus").await;

    for origin in [APP_ORIGIN, DEV_ORIGIN] {
        let resp = preflight(&app, "/api/prepare_transaction", origin).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{origin}");
        let h = resp.headers();
        assert_eq!(header(h, "access-control-allow-origin"), origin);
        let methods = header(h, "access-control-allow-methods");
        for method in ["GET", "POST", "DELETE"] {
            assert!(methods.contains(method), "{methods}");
        }
        let allowed = header(h, "access-control-allow-headers");
        for name in [
            "authorization",
            "content-type",
            "x-api-key",
            "idempotency-key",
            "x-request-id",
        ] {
            assert!(allowed.contains(name), "{allowed}");
        }
        assert_eq!(header(h, "access-control-max-age"), "600");
        assert!(header(h, "vary").to_ascii_lowercase().contains("origin"));
        // Answered by the CORS layer itself, and still under the security headers.
        assert_common_headers(h, "preflight");
        // Tokens travel in headers, never cookies: credentials mode is never allowed.
        assert!(h.get("access-control-allow-credentials").is_none());
    }

    // The actual requests: success and errors alike are readable by the allowed origin (an
    // error's JSON is useless to a page that cannot read it), with the useful headers exposed.
    for (auth, status) in [
        (Auth::Bearer(user.token.clone()), StatusCode::OK),
        (Auth::None, StatusCode::UNAUTHORIZED),
    ] {
        let resp = get_from(&app, "/api/me", APP_ORIGIN, &auth).await;
        assert_eq!(resp.status(), status);
        let h = resp.headers();
        assert_eq!(header(h, "access-control-allow-origin"), APP_ORIGIN);
        assert!(header(h, "access-control-expose-headers").contains("retry-after"));
        assert!(header(h, "vary").to_ascii_lowercase().contains("origin"));
        assert!(h.get("access-control-allow-credentials").is_none());
    }
    let resp = app
        .client
        .post(app.url("/api/login"))
        .header("origin", DEV_ORIGIN)
        .json(&json!({"username": "cyrus", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(resp.headers(), "access-control-allow-origin"),
        DEV_ORIGIN
    );

    // Anything not exactly on the list gets no CORS header at all: another site, the same
    // host over another scheme or port, a look-alike suffix, a sandboxed frame.
    for origin in [
        EVIL_ORIGIN,
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com.evil.example",
        "http://localhost:5174",
        "null",
    ] {
        let resp = preflight(&app, "/api/prepare_transaction", origin).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{origin}");
        assert_eq!(
            cors_headers(resp.headers()),
            Vec::<String>::new(),
            "{origin}"
        );
        let resp = get_from(&app, "/api/me", origin, &user.auth()).await;
        assert_eq!(resp.status(), StatusCode::OK, "{origin}");
        assert_eq!(
            cors_headers(resp.headers()),
            Vec::<String>::new(),
            "{origin}"
        );
    }
    // And requests without an Origin (agents, curl) are unaffected.
    let resp = app
        .client
        .get(app.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(cors_headers(resp.headers()), Vec::<String>::new());
    app.cleanup().await;
}

async fn websocket_upgrades_from_foreign_origins_are_refused(backend: Backend) {
    let app = TestApp::spawn_with(backend, Some(allow_list)).await;
    let user = app.register("wanda").await;
    let own = app.address.clone();

    // A browser ticket presented from a foreign page is refused before it is looked at, so
    // the ticket still works afterwards from the page's own origin.
    let (status, body) = app.post("/api/ws_ticket", &user.auth(), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ticket = format!("?ticket={}", body["ticket"].as_str().unwrap());
    for origin in [
        EVIL_ORIGIN,
        "null",
        "http://localhost:5174",
        "https://app.example.com.evil.example",
        // The server's own host on another port is another origin.
        "http://127.0.0.1:1",
    ] {
        let refused = upgrade_with(&app, &ticket, &Auth::None, &[("origin", origin)]).await;
        assert_refused(refused, origin);
    }
    upgrade_with(&app, &ticket, &Auth::None, &[("origin", &own)])
        .await
        .expect("the unspent ticket opens a same-origin socket");

    // Allowed origins, the server's own (also as a proxy names it), and non-browser clients.
    upgrade(&app, &user.auth(), &[("origin", APP_ORIGIN)])
        .await
        .expect("allowed origin");
    upgrade(&app, &user.auth(), &[("origin", DEV_ORIGIN)])
        .await
        .expect("allowed origin");
    upgrade(
        &app,
        &user.auth(),
        &[
            ("origin", "https://wallet.example.org"),
            ("x-forwarded-host", "wallet.example.org"),
        ],
    )
    .await
    .expect("own origin behind a proxy");
    upgrade(&app, &user.auth(), &[]).await.expect("no Origin");
    // A forwarded host only counts for the origin it names.
    let refused = upgrade(
        &app,
        &user.auth(),
        &[
            ("origin", EVIL_ORIGIN),
            ("x-forwarded-host", "wallet.example.org"),
        ],
    )
    .await;
    assert_refused(refused, "evil origin with a forwarded host");
    app.cleanup().await;
}

async fn page_and_api_responses_carry_the_security_headers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let user = app.register("hedy").await;

    for path in ["/", "/app.js", "/app.css"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        let csp = header(h, "content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        let permissions = header(h, "permissions-policy");
        for feature in ["camera=()", "microphone=()", "geolocation=()"] {
            assert!(permissions.contains(feature), "{permissions}");
        }
        assert_eq!(header(h, "cross-origin-opener-policy"), "same-origin");
        assert_common_headers(h, path);
    }

    let me = app
        .client
        .get(app.url("/api/me"))
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let login = app
        .client
        .post(app.url("/api/login"))
        .json(&json!({"username": "hedy", "password": "wrong password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED);
    let missing = app.client.get(app.url("/api/nope")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    for (what, resp) in [
        ("me", me),
        ("failed login", login),
        ("404", missing),
        ("healthz", health),
    ] {
        let h = resp.headers();
        // JSON is never a document: nothing may load, nothing may frame it.
        assert_eq!(
            header(h, "content-security-policy"),
            "default-src 'none'; frame-ancestors 'none'",
            "{what}"
        );
        assert_common_headers(h, what);
    }
    app.cleanup().await;
}

fn assert_common_headers(h: &HeaderMap, what: &str) {
    assert_eq!(header(h, "x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header(h, "cache-control"), "no-store", "{what}");
    assert_eq!(header(h, "x-frame-options"), "DENY", "{what}");
    assert_eq!(header(h, "referrer-policy"), "no-referrer", "{what}");
    assert_eq!(
        header(h, "cross-origin-resource-policy"),
        "same-origin",
        "{what}"
    );
    // Plain HTTP behind a TLS proxy: HSTS is the proxy's to send (see SECURITY.md).
    assert!(h.get("strict-transport-security").is_none(), "{what}");
}

#[test]
fn wildcard_cors_origin_stops_the_server_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let master_key = countersign::crypto::MasterKey::generate().to_base64();
    for (list, expected) in [
        (
            "*",
            "COUNTERSIGN_CORS_ORIGINS is invalid: `*` (any origin) is not allowed",
        ),
        (
            "https://app.example.com,*",
            "`*` (any origin) is not allowed",
        ),
        ("https://app.example.com/", "no path"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_countersign"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .arg("serve")
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/x.db", dir.path().display()),
            )
            .env("COUNTERSIGN_ADDR", "127.0.0.1:0")
            .env("JWT_SECRET_KEY", "j".repeat(40))
            .env("COUNTERSIGN_MASTER_KEY", master_key.as_str())
            .env("COUNTERSIGN_CORS_ORIGINS", list)
            .output()
            .expect("run countersign");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "started with {list}: {text}");
        assert!(text.contains(expected), "{list}: {text}");
    }
}

/// Open `/api/ws` with `auth` and extra headers; `Ok` once the socket is caught up, or the
/// refusal's status and JSON body.
async fn upgrade(
    app: &TestApp,
    auth: &Auth,
    headers: &[(&str, &str)],
) -> Result<(), (StatusCode, Value)> {
    upgrade_with(app, "", auth, headers).await
}

async fn upgrade_with(
    app: &TestApp,
    query: &str,
    auth: &Auth,
    headers: &[(&str, &str)],
) -> Result<(), (StatusCode, Value)> {
    let url = format!("{}/api/ws{query}", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    let h = request.headers_mut();
    match auth {
        Auth::Bearer(t) => {
            h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Auth::ApiKey(k) => {
            h.insert("x-api-key", k.parse().unwrap());
        }
        Auth::None => {}
    }
    for (name, value) in headers {
        h.insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let mut socket = match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => socket,
        Err(tungstenite::Error::Http(resp)) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let body = resp.body().as_deref().unwrap_or_default();
            return Err((status, serde_json::from_slice(body).unwrap_or(Value::Null)));
        }
        Err(e) => panic!("WebSocket failed: {e}"),
    };
    let first = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("a first message within 5 s")
        .expect("socket open")
        .expect("a message");
    let tungstenite::Message::Text(text) = first else {
        panic!("unexpected {first:?}");
    };
    let first: Value = serde_json::from_str(text.as_str()).unwrap();
    assert_eq!(first["type"], "caught_up", "{first}");
    let _ = socket.close(None).await;
    Ok(())
}

fn assert_refused(result: Result<(), (StatusCode, Value)>, origin: &str) {
    let (status, body) = result.expect_err(origin);
    assert_eq!(status, StatusCode::FORBIDDEN, "{origin}: {body}");
    assert_eq!(
        body["error"]["code"], "origin_not_allowed",
        "{origin}: {body}"
    );
}
