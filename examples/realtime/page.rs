//! The backend of the realtime example page: it serves the page, and mints an ephemeral
//! key for it from its own gateway key (`POST /session`). The browser gets only the
//! ephemeral key: short-lived, unable to manage or mint keys, revoked with its parent.

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// Where the gateway is and the backend's own key for it.
pub struct Backend {
    /// The gateway, as the browser reaches it: `http://127.0.0.1:8080`.
    pub gateway: String,
    /// The gateway route the page uses: `/realtime`.
    pub route: String,
    /// The backend's gateway key. Never sent to the browser.
    pub key: String,
    /// How long a minted key lives, in seconds.
    pub ttl_seconds: u64,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("gateway", &self.gateway)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// The page (`/`, `/page.js`, `/page.css`) and `POST /session`.
pub fn router(backend: Backend) -> Router {
    let backend = Arc::new(backend);
    Router::new()
        .route("/", get(index))
        .route(
            "/page.js",
            get(|| async { asset(SCRIPT, "text/javascript") }),
        )
        .route("/page.css", get(|| async { asset(STYLE, "text/css") }))
        .route("/session", post(session))
        .with_state(backend)
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// The page, with a policy that lets it talk to its own origin and the gateway only.
async fn index(State(backend): State<Arc<Backend>>) -> Response {
    let ws = backend
        .gateway
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' {} {ws}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        backend.gateway
    );
    let mut response =
        ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response();
    if let Ok(policy) = HeaderValue::from_str(&policy) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

/// Mints a key for the page at the gateway's management API (`POST /admin/ephemeral`),
/// authenticated with the backend's own key.
async fn session(State(backend): State<Arc<Backend>>) -> Response {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({ "ttl_seconds": backend.ttl_seconds }).to_string();
    let request = http::Request::post(format!("{}/admin/ephemeral", backend.gateway))
        .header("x-api-key", &backend.key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request");
    let minted = match client.request(request).await {
        Ok(response) => response,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("the gateway is unreachable: {e}"),
            )
                .into_response();
        }
    };
    let status = minted.status();
    let bytes = minted
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status != StatusCode::CREATED {
        return (
            StatusCode::BAD_GATEWAY,
            format!("the gateway answered {status}"),
        )
            .into_response();
    }
    let Ok(minted) = serde_json::from_slice::<Value>(&bytes) else {
        return (StatusCode::BAD_GATEWAY, "the gateway's answer is not JSON").into_response();
    };
    let mut response = axum::Json(json!({
        "key": minted["key"],
        "expires_at": minted["expires_at"],
        "gateway": backend.gateway,
        "route": backend.route,
    }))
    .into_response();
    // A key is in this body: no cache may keep it.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
