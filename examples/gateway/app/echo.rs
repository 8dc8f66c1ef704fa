//! The built-in echo upstream: answers every request with JSON of what it received, so a
//! newcomer sees the credential rewrite with one curl. It also takes WebSockets, as a
//! realtime API does: its first message says what the upgrade carried (the headers, the
//! subprotocols), then it echoes every message.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Serves the echo upstream on 127.0.0.1 at a free port.
pub async fn spawn() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(echo);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

fn headers_json(headers: &HeaderMap) -> Map<String, Value> {
    let mut all = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match all.get_mut(name.as_str()) {
            Some(Value::Array(values)) => values.push(value.into()),
            Some(one) => *one = json!([one.take(), value]),
            None => {
                all.insert(name.as_str().to_owned(), value.into());
            }
        }
    }
    all
}

async fn echo(mut req: Request) -> Response {
    if tower_gateway_auth::socket::is_websocket_upgrade(&req) {
        return socket(&mut req);
    }
    let headers = headers_json(req.headers());
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    axum::Json(json!({
        "echo": true,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body.len(),
    }))
    .into_response()
}

/// Accepts the upgrade (selecting `realtime` when it is offered, as OpenAI's realtime API
/// does), then says what it saw and echoes.
fn socket(req: &mut Request) -> Response {
    let Some(accept) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let realtime = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "realtime");
    let seen = json!({
        "type": "echo.session",
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers_json(req.headers()),
    });
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if ws.send(Message::text(seen.to_string())).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            let reply = match message {
                Message::Text(text) => Message::Text(text),
                Message::Binary(data) => Message::Binary(data),
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    if realtime {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
    }
    response
}
