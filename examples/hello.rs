//! An axum hello-world, bare or behind the crate's whole layer stack, for load tests
//! (`scripts/loadtest.sh`); or, with `--forward`, the gateway's proxy alone.
//!
//! ```text
//! cargo run --release --example hello -- [--stack | --forward URL] [--listen 127.0.0.1:3100]
//! ```
//!
//! With `--stack` the handler sits behind `InboundApiKeyLayer` (a memory store of 1,000
//! keys), `UpstreamAuthLayer` (OpenAI preset) and `HeaderInjectLayer` (a request id); the
//! first line on stdout is a valid key. With `--forward URL` every request goes to `URL`
//! through `proxy::Forward` and nothing else: what forwarding costs without any of the
//! authentication, to set the gateway's figures against.
//!
//! Everything runs on one thread (tokio's current-thread runtime), as the gateway does with
//! `workers = 1`.

use std::sync::Arc;

use axum::Router;
use axum::routing::any;
use tower::ServiceBuilder;
use tower_gateway_auth::inject::RequestId;
use tower_gateway_auth::keys::{KeyManager, NewKey};
use tower_gateway_auth::proxy::Forward;
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::upstream::{Credential, Provider};
use tower_gateway_auth::{HeaderInjectLayer, InboundApiKeyLayer, UpstreamAuthLayer};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut stack = false;
    let mut forward = None;
    let mut listen = "127.0.0.1:3100".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stack" => stack = true,
            "--forward" => forward = Some(args.next().expect("--forward needs a URL")),
            "--listen" => listen = args.next().expect("--listen needs an address"),
            other => panic!(
                "unknown argument {other}; usage: hello [--stack | --forward URL] [--listen ADDR]"
            ),
        }
    }
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
    if let Some(upstream) = forward {
        println!("-");
        eprintln!("forward to {upstream} on http://{listen}");
        let forward = Forward::new(&upstream).expect("an http(s) URL");
        let app = ServiceBuilder::new()
            .map_response(|r: http::Response<_>| r.map(axum::body::Body::new))
            .service(forward);
        axum::serve(listener, tower::make::Shared::new(app))
            .await
            .unwrap();
        return;
    }
    let app = Router::new().route("/{*path}", any(|| async { "hello" }));
    if !stack {
        println!("-");
        eprintln!("hello (bare) on http://{listen}");
        axum::serve(listener, app).await.unwrap();
        return;
    }

    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone());
    let mut first = None;
    for i in 0..1000 {
        let issued = manager
            .issue(NewKey::named(format!("load-{i}")))
            .await
            .unwrap();
        first.get_or_insert(issued.key);
    }
    println!("{}", first.unwrap().expose());
    let inbound = InboundApiKeyLayer::from_shared(store);
    let upstream = UpstreamAuthLayer::new(
        Provider::openai(),
        Credential::new("sk-upstream-load-test").unwrap(),
    )
    .strip_inbound(&inbound);
    // Around the whole router, not inside it with `Router::layer`: every request is
    // authenticated before routing (an unknown path is a 401, not a 404 that tells the route
    // table), and the stack is cloned once per request rather than boxed per route.
    let app = ServiceBuilder::new()
        .map_response(|r: http::Response<_>| r.map(axum::body::Body::new))
        .layer(inbound)
        .layer(upstream)
        .layer(HeaderInjectLayer::new().request_id(RequestId::new().echo(true)))
        .service(app);
    eprintln!("hello (full stack) on http://{listen}");
    axum::serve(listener, tower::make::Shared::new(app))
        .await
        .unwrap();
}
