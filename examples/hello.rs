//! An axum hello-world, bare or behind the crate's whole layer stack, for load tests
//! (`scripts/loadtest.sh`); or, with `--forward`, the gateway's proxy alone.
//!
//! ```text
//! cargo run --release --example hello -- [--stack | --forward URL | --sse] [--listen 127.0.0.1:3100]
//! ```
//!
//! With `--stack` the handler sits behind `InboundApiKeyLayer` (a memory store of 1,000
//! keys), `UpstreamAuthLayer` (OpenAI preset) and `HeaderInjectLayer` (a request id); the
//! first line on stdout is a valid key. With `--forward URL` every request goes to `URL`
//! through `proxy::Forward` and nothing else: what forwarding costs without any of the
//! authentication, to set the gateway's figures against.
//!
//! With `--sse` it is a streaming upstream for `scripts/streamtest.sh`: every request gets
//! `text/event-stream`, one event every 200 ms for 20 s (`--events N`, `--interval-ms M`),
//! each event a small chat-completion chunk as an LLM provider streams it.
//!
//! Everything runs on one thread (tokio's current-thread runtime), as the gateway does with
//! `workers = 1`.

use std::sync::Arc;

use axum::Router;
use axum::routing::any;
use axum::serve::ListenerExt;
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
    let mut sse = false;
    let mut events = 100u32;
    let mut interval_ms = 200u64;
    let mut listen = "127.0.0.1:3100".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stack" => stack = true,
            "--forward" => forward = Some(args.next().expect("--forward needs a URL")),
            "--listen" => listen = args.next().expect("--listen needs an address"),
            "--sse" => sse = true,
            "--events" => events = args.next().and_then(|n| n.parse().ok()).expect("a count"),
            "--interval-ms" => {
                interval_ms = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("milliseconds")
            }
            other => panic!(
                "unknown argument {other}; usage: hello [--stack | --forward URL | --sse] [--listen ADDR]"
            ),
        }
    }
    // TCP_NODELAY on every connection, as the gateway and nginx set it (`axum::serve` does
    // not): without it Nagle's algorithm may hold a write back until the client's ACK, and
    // `Forward` alone, the load test's baseline, showed a p50 of 16 ms at a fixed rate in two
    // runs of four where the gateway showed 1.
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .unwrap()
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    if sse {
        println!("-");
        eprintln!("SSE upstream ({events} events every {interval_ms} ms) on http://{listen}");
        let interval = std::time::Duration::from_millis(interval_ms);
        let app = Router::new().route(
            "/{*path}",
            any(move || async move {
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-cache")
                    .body(axum::body::Body::new(Events::new(events, interval)))
                    .unwrap()
            }),
        );
        axum::serve(listener, app).await.unwrap();
        return;
    }
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
    // `with_state(())` turns the router's handlers into routes once, as `axum::serve` does
    // for the bare router; a router served without it boxes its handler again on every
    // request (two allocations and a clone that the stack would be charged for).
    let app = ServiceBuilder::new()
        .map_response(|r: http::Response<_>| r.map(axum::body::Body::new))
        .layer(inbound)
        .layer(upstream)
        .layer(HeaderInjectLayer::new().request_id(RequestId::new().echo(true)))
        .service(app.with_state(()));
    eprintln!("hello (full stack) on http://{listen}");
    axum::serve(listener, tower::make::Shared::new(app))
        .await
        .unwrap();
}

/// A body of `left` server-sent events, one per tick, then the end.
struct Events {
    ticks: tokio::time::Interval,
    sent: u32,
    left: u32,
}

impl Events {
    fn new(count: u32, every: std::time::Duration) -> Self {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A late tick is sent late, not made up for with a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Events {
            ticks,
            sent: 0,
            left: count,
        }
    }
}

impl http_body::Body for Events {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.ticks.poll_tick(cx));
        self.left -= 1;
        self.sent += 1;
        let event = format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {}\"}}}}]}}\n\n",
            self.sent
        );
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(event.into()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}
