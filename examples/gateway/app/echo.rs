//! The built-in echo upstream: answers every request with JSON of what it received, so a
//! newcomer sees the credential rewrite with one curl.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::Request;
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

/// Serves the echo upstream on 127.0.0.1 at a free port.
pub async fn spawn() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(echo);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn echo(req: Request) -> axum::Json<Value> {
    let mut headers = Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::Array(all)) => all.push(value.into()),
            Some(one) => *one = json!([one.take(), value]),
            None => {
                headers.insert(name.as_str().to_owned(), value.into());
            }
        }
    }
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
}
