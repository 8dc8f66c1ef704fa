//! Browser clients of the reference gateway: `cors` on a route (preflights answered by the
//! gateway, CORS headers on its refusals), a realtime route relaying WebSockets through the
//! gateway's own server (an ephemeral key in the subprotocol, minted by the management
//! API; closed when its parent is revoked, and at shutdown), and the configuration's
//! checks.

use super::{app, call, env, issue, start};
use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use support::ws::{self, close_of, connect, next_text};
use support::{TempDir, spawn_upstream};
use tokio_tungstenite::tungstenite::Message;

const PAGE: &str = "https://app.example";

fn config(keys: &std::path::Path, http: SocketAddr, realtime: SocketAddr) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"
admin_scope = "admin"
reload_ms = 50

[[route]]
prefix = "/openai"
upstream = "http://{http}"
provider = "openai"
credential_env = "OPENAI_API_KEY"
cors = {{ origins = ["{PAGE}", "http://localhost:5173"], headers = ["x-client-trace"] }}
[route.limits]
requests_per_minute = 2

[[route]]
prefix = "/realtime"
upstream = "ws://{realtime}"
provider = "openai"
credential_env = "OPENAI_API_KEY"
sources = ["header:x-api-key", "bearer", "subprotocol"]
cors = {{ origins = ["{PAGE}"] }}
[route.websocket]
recheck_ms = 100
idle_timeout_secs = 30
max_message_bytes = 65536
"#,
        keys = keys.display()
    )
}

fn access_control(answer: &support::Answer) -> Vec<String> {
    let mut names: Vec<String> = answer
        .headers
        .keys()
        .map(|n| n.as_str().to_owned())
        .filter(|n| n.starts_with("access-control-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn preflights_are_answered_by_the_gateway_and_refusals_carry_cors_headers() {
    let dir = TempDir::new("gw-cors");
    let (http, seen) = spawn_upstream().await;
    let (realtime, _) = ws::spawn_echo().await;
    let (key, _) = issue(&dir.file(), "page", &[]).await;
    let gw = start(&config(&dir.file(), http, realtime)).await;

    // The preflight: no key, answered here, never forwarded.
    let preflight = call(
        gw.addr,
        Method::OPTIONS,
        "/openai/v1/chat/completions",
        &[
            ("origin", PAGE),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os, x-client-trace",
            ),
        ],
        "",
    )
    .await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    let h = &preflight.headers;
    assert_eq!(h["access-control-allow-origin"], PAGE);
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "authorization",
        "x-api-key",
        "content-type",
        "x-stainless-os",
        "x-client-trace",
    ] {
        assert!(
            allowed.split(", ").any(|a| a == name),
            "{name} in {allowed}"
        );
    }
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert!(h.get("access-control-allow-credentials").is_none());
    assert_eq!(seen.count(), 0, "a preflight never reaches the upstream");

    // From an origin not on the list: answered (not forwarded), without a CORS header.
    let elsewhere = call(
        gw.addr,
        Method::OPTIONS,
        "/openai/v1/chat/completions",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert!(
        access_control(&elsewhere).is_empty(),
        "{:?}",
        elsewhere.headers
    );
    assert_eq!(seen.count(), 0);

    // The real request without a key: 401 the page can read.
    let refused = call(
        gw.addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[("origin", PAGE)],
        "{}",
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers["access-control-allow-origin"], PAGE);
    assert!(
        refused.headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("retry-after")
    );
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No API key"),
        "{}",
        refused.text()
    );
    assert!(
        refused
            .headers
            .get_all("vary")
            .iter()
            .any(|v| v == "origin")
    );

    // With the key: forwarded, the answer readable by the page, nothing of CORS upstream.
    let key = key.expose();
    let ok = call(
        gw.addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[
            ("origin", PAGE),
            ("authorization", &format!("Bearer {key}")),
        ],
        "{}",
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.headers["access-control-allow-origin"], PAGE);
    assert_eq!(
        seen.last().headers["authorization"],
        format!("Bearer {}", super::OPENAI_SECRET)
    );

    // The same from an origin not on the list: served (CORS is the browser's check) but
    // with no CORS header, so a browser keeps the answer from the page.
    let other = call(
        gw.addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[("origin", "https://evil.example"), ("x-api-key", key)],
        "{}",
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(access_control(&other).is_empty());

    // A 429 (two a minute) carries them too, with Retry-After exposed.
    let limited = call(
        gw.addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[("origin", PAGE), ("x-api-key", key)],
        "{}",
    )
    .await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers["access-control-allow-origin"], PAGE);
    assert!(limited.headers.contains_key("retry-after"));

    // A plain OPTIONS (no Access-Control-Request-Method) is not a preflight: it needs a key.
    let plain = call(
        gw.addr,
        Method::OPTIONS,
        "/openai/v1/models",
        &[("origin", PAGE)],
        "",
    )
    .await;
    assert_eq!(plain.status, StatusCode::UNAUTHORIZED);
    let no_origin = call(
        gw.addr,
        Method::OPTIONS,
        "/openai/v1/models",
        &[("access-control-request-method", "GET")],
        "",
    )
    .await;
    assert_eq!(no_origin.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_browser_session_on_the_realtime_route_with_an_ephemeral_key() {
    let dir = TempDir::new("gw-realtime");
    let (http, _) = spawn_upstream().await;
    let (realtime, sessions) = ws::spawn_echo().await;
    let (backend, _) = issue(&dir.file(), "backend", &["admin"]).await;
    let gw = start(&config(&dir.file(), http, realtime)).await;

    // The page's backend mints a key for the browser with its own.
    let minted = call(
        gw.addr,
        Method::POST,
        "/admin/ephemeral",
        &[
            ("x-api-key", backend.expose()),
            ("content-type", "application/json"),
        ],
        r#"{"ttl_seconds": 60}"#,
    )
    .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{}", minted.text());
    let ephemeral = minted.json()["key"].as_str().unwrap().to_owned();
    let id = minted.json()["parent"].as_str().unwrap().to_owned();

    let offer = format!("realtime, openai-insecure-api-key.{ephemeral}");
    let (mut socket, head) = connect(
        gw.addr,
        "/realtime/v1/realtime?model=gpt-realtime",
        &[("sec-websocket-protocol", &offer), ("origin", PAGE)],
    )
    .await
    .expect("upgraded through the gateway");
    assert_eq!(head["sec-websocket-protocol"], "realtime");
    socket
        .send(Message::text("{\"type\":\"session.update\"}"))
        .await
        .unwrap();
    assert_eq!(
        next_text(&mut socket).await,
        "{\"type\":\"session.update\"}"
    );

    let seen = sessions.last();
    assert_eq!(seen.path, "/v1/realtime?model=gpt-realtime");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {}", super::OPENAI_SECRET)
    );
    assert_eq!(seen.headers["sec-websocket-protocol"], "realtime");
    assert!(seen.headers.contains_key("x-request-id"));
    assert!(!format!("{:?}", seen.headers).contains(&ephemeral));

    // From an origin not on the route's list: refused before any key is looked at.
    let refused = connect(
        gw.addr,
        "/realtime/v1/realtime",
        &[
            ("sec-websocket-protocol", &offer),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(refused.err().map(|e| e.0), Some(StatusCode::FORBIDDEN));

    // Revoking the backend's key closes the browser's socket, through the parent.
    let revoked = call(
        gw.addr,
        Method::POST,
        &format!("/admin/keys/{id}/revoke"),
        &[("x-api-key", backend.expose())],
        "",
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    let (code, _) = close_of(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
}

#[tokio::test]
async fn shutdown_closes_open_sockets_with_1001_and_waits_for_them() {
    let dir = TempDir::new("gw-realtime-stop");
    let (http, _) = spawn_upstream().await;
    let (realtime, sessions) = ws::spawn_echo().await;
    let (key, _) = issue(&dir.file(), "k", &[]).await;
    let mut gw = start(&config(&dir.file(), http, realtime)).await;
    let offer = format!("realtime, openai-insecure-api-key.{}", key.expose());
    let (mut socket, _) = connect(
        gw.addr,
        "/realtime/v1/realtime",
        &[("sec-websocket-protocol", &offer)],
    )
    .await
    .unwrap();
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "hi");

    let _ = gw.shutdown.take().unwrap().send(());
    let (code, reason) = close_of(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        (code, reason.as_str()),
        (1001, "the gateway is shutting down")
    );
    assert_eq!(sessions.ended().await.close.map(|c| c.0), Some(1001));
    drop(socket);
    let served = tokio::time::timeout(Duration::from_secs(10), gw.served.take().unwrap())
        .await
        .expect("serve returns once the socket is closed");
    served.unwrap().unwrap();
}

#[tokio::test]
async fn browser_settings_are_checked_at_start_up() {
    let dir = TempDir::new("gw-cors-config");
    let (http, _) = spawn_upstream().await;
    let (realtime, _) = ws::spawn_echo().await;
    let good = config(&dir.file(), http, realtime);
    assert!(app::Config::from_toml(&good).unwrap().plan(&env).is_ok());
    for (from, to, field, says) in [
        (
            r#"cors = { origins = ["https://app.example"] }"#,
            r#"cors = { origins = ["*"], credentials = true }"#,
            "route[1].cors",
            "credentials",
        ),
        (
            r#"cors = { origins = ["https://app.example"] }"#,
            r#"cors = { origins = ["https://app.example/"] }"#,
            "route[1].cors",
            "trailing slash",
        ),
        (
            r#"cors = { origins = ["https://app.example"] }"#,
            r#"cors = { origins = [] }"#,
            "route[1].cors",
            "at least one origin",
        ),
        (
            r#""subprotocol"]"#,
            r#""subprotocol:bad prefix"]"#,
            "route[1].sources[2]",
            "unknown key source",
        ),
        (
            "recheck_ms = 100",
            "recheck_ms = 0",
            "route[1].websocket.recheck_ms",
            "at least",
        ),
    ] {
        let text = good.replacen(from, to, 1);
        assert_ne!(text, good, "{from}");
        let err = app::Config::from_toml(&text)
            .unwrap()
            .plan(&env)
            .err()
            .unwrap_or_else(|| panic!("{to} was accepted"));
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains(says), "{err}");
    }
}

/// The realtime example's page backend, as `cargo run --example realtime` serves it.
#[allow(dead_code)]
#[path = "../../../examples/realtime/page.rs"]
mod page;

/// Serves the example page, its backend minting from `gateway` with `key`, on `listener`.
fn serve_page(listener: tokio::net::TcpListener, gateway: SocketAddr, key: &str) {
    let app = page::router(page::Backend {
        gateway: format!("http://{gateway}"),
        route: "/realtime".into(),
        key: key.to_owned(),
        ttl_seconds: 60,
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
}

/// Headless Chromium: the example page, served from an allowed origin, mints an ephemeral
/// key at its backend, calls the gateway cross-origin (preflighted) and opens a realtime
/// WebSocket with the key in the subprotocol, and exchanges a message; from an origin not
/// on the route's list the browser's CORS check blocks the `fetch` and the gateway refuses
/// the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_a_page_opens_a_realtime_socket_with_an_ephemeral_key() {
    let Some(browser) = support::browser::Browser::start().await else {
        return;
    };
    let dir = TempDir::new("gw-realtime-page");
    let (backend, _) = issue(&dir.file(), "page-backend", &["admin"]).await;
    let allowed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_origin = format!("http://{}", allowed.local_addr().unwrap());
    let other_origin = format!("http://{}", other.local_addr().unwrap());
    let config = format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"
admin_scope = "admin"

[[route]]
prefix = "/realtime"
upstream = "echo"
provider = "openai"
sources = ["header:x-api-key", "bearer", "subprotocol"]
cors = {{ origins = ["{page_origin}"] }}
"#,
        keys = dir.file().display()
    );
    let gw = start(&config).await;
    serve_page(allowed, gw.addr, backend.expose());
    serve_page(other, gw.addr, backend.expose());

    let client = &browser.client;
    client.goto(&format!("{page_origin}/")).await.unwrap();
    browser.click("#connect").await;
    browser.until("window.state.messages.length >= 2").await;
    let state = client
        .execute("return window.state;", vec![])
        .await
        .unwrap();
    browser.screenshot("realtime-allowed-origin").await;
    assert_eq!(state["fetchStatus"], 200, "{state}");
    assert_eq!(state["opened"], true, "{state}");
    assert_eq!(state["protocol"], "realtime", "{state}");
    // What the upstream saw, as its first message tells it.
    let seen: serde_json::Value =
        serde_json::from_str(state["messages"][0].as_str().unwrap()).unwrap();
    assert_eq!(seen["type"], "echo.session");
    assert_eq!(seen["path"], "/v1/realtime");
    let headers = &seen["headers"];
    assert_eq!(
        headers["authorization"],
        "Bearer sk-echo-upstream-credential"
    );
    assert_eq!(headers["sec-websocket-protocol"], "realtime");
    let text = headers.to_string();
    assert!(!text.contains("openai-insecure-api-key"), "{text}");
    assert!(!text.contains(backend.expose()), "{text}");
    // The message the page sent, echoed.
    assert!(
        state["messages"][1]
            .as_str()
            .unwrap()
            .contains("session.update"),
        "{state}"
    );
    let log = browser.find("#log").await.text().await.unwrap();
    assert!(log.contains("socket open"), "{log}");
    assert!(
        !log.contains(backend.expose()),
        "the page never holds the backend's key"
    );

    // The same page from an origin the route does not list.
    client.goto(&format!("{other_origin}/")).await.unwrap();
    browser.click("#connect").await;
    browser
        .until("window.state.fetchError !== null && window.state.closed !== null")
        .await;
    let state = client
        .execute("return window.state;", vec![])
        .await
        .unwrap();
    browser.screenshot("realtime-other-origin").await;
    assert!(
        state["fetchError"]
            .as_str()
            .unwrap()
            .contains("Failed to fetch"),
        "{state}"
    );
    assert_eq!(state["fetchStatus"], serde_json::Value::Null);
    assert_eq!(state["opened"], false, "{state}");
    assert_eq!(
        state["closed"]["code"], 1006,
        "the handshake was refused: {state}"
    );
    browser.close().await;
}
