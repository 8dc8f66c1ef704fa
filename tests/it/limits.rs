//! Per-key limits (issue 14): rate and concurrency through real servers, as the providers'
//! SDKs see them, and model access with what the upstream actually received.

use crate::support;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, post};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use support::{Recorder, client, read, send};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tower_gateway_auth::clock::{Clock, ManualClock, Timestamp};
use tower_gateway_auth::keys::{KeyId, KeyManager, KeyRecord, NewKey};
use tower_gateway_auth::limit::{Limits, MemoryLimiter, Rate};
use tower_gateway_auth::rejection::{ErrorFormat, RejectionKind};
use tower_gateway_auth::store::{KeyStore, MemoryStore};
use tower_gateway_auth::{Identity, InboundApiKeyLayer, RateLimitLayer, Rejection, RejectionLayer};

const KEY: &str = "gw_limits-test-key-0001";
const T0: u64 = 1_800_000_000;

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_unix_secs(T0))
}

/// A store with one key, `KEY`, carrying `limits`.
fn store(limits: Limits) -> (Arc<MemoryStore>, KeyId) {
    let store = MemoryStore::new();
    let id = KeyId::random();
    store.insert(
        KeyRecord::new(id, store.hasher().digest(KEY.as_bytes()))
            .with_name("limited")
            .with_limits(limits),
    );
    (Arc::new(store), id)
}

/// A gateway on loopback: rejections in `format`, inbound keys from `store`, rate limits
/// on `clock`, and a recording upstream answering 200.
async fn gateway(
    format: ErrorFormat,
    store: Arc<MemoryStore>,
    clock: &ManualClock,
    rec: &Recorder,
) -> std::net::SocketAddr {
    let rec = rec.clone();
    let app = Router::new()
        .route(
            "/{*path}",
            any(move |req: axum::extract::Request| {
                let rec = rec.clone();
                async move {
                    rec.record(&req);
                    "{\"ok\":true}"
                }
            }),
        )
        .layer(RateLimitLayer::new(MemoryLimiter::with_clock(clock.clone())))
        .layer(InboundApiKeyLayer::new(store).clock(clock.clone()))
        .layer(RejectionLayer::new().error_format(format));
    support::spawn_axum(app).await
}

/// A chat completion as the OpenAI Python SDK sends it.
fn openai_request(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("user-agent", "OpenAI/Python 1.99.9")
        .header("x-stainless-lang", "python")
        .header("x-stainless-retry-count", "0")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap()
}

/// A message as the Anthropic Python SDK sends it.
fn anthropic_request(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .header("user-agent", "Anthropic/Python 0.64.0")
        .header("x-stainless-lang", "python")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-3-5-haiku-latest","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap()
}

fn five_a_minute() -> Limits {
    Limits::new().with_rate(Rate::per_minute(5).with_burst(5))
}

#[tokio::test]
async fn an_openai_client_gets_exactly_its_burst_then_429_with_retry_after_and_openai_headers() {
    let clock = clock();
    let rec = Recorder::default();
    let (store, _) = store(five_a_minute());
    let gw = gateway(ErrorFormat::OpenAi, store, &clock, &rec).await;
    let client = client();

    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(send(&client, openai_request(gw)).await);
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(rec.count(), 5, "the refused requests never reached the upstream");

    // Allowed answers count down.
    for (i, a) in answers[..5].iter().enumerate() {
        assert_eq!(a.headers["x-ratelimit-limit-requests"], "5");
        assert_eq!(
            a.headers["x-ratelimit-remaining-requests"],
            (4 - i).to_string().as_str()
        );
        assert_eq!(
            a.headers["x-ratelimit-reset-requests"],
            format!("{}s", 12 * (i + 1)).replace("60s", "1m0s").as_str()
        );
        assert!(a.headers.get("retry-after").is_none());
    }
    let refused = &answers[5];
    assert_eq!(refused.headers["retry-after"], "12");
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(refused.headers["x-ratelimit-reset-requests"], "1m0s");
    assert_eq!(refused.headers["content-type"], "application/json");
    let body = refused.json();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert!(body["error"]["param"].is_null());
    assert!(
        body["error"]["message"].as_str().unwrap().contains("12s"),
        "{body}"
    );

    // One interval later exactly one more passes.
    clock.advance(Duration::from_secs(12));
    assert_eq!(send(&client, openai_request(gw)).await.status, 200);
    assert_eq!(send(&client, openai_request(gw)).await.status, 429);
    assert_eq!(rec.count(), 6);
}

#[tokio::test]
async fn an_anthropic_client_gets_rate_limit_error_with_anthropic_headers() {
    let clock = clock();
    let rec = Recorder::default();
    let (store, _) = store(five_a_minute());
    let gw = gateway(ErrorFormat::Anthropic, store, &clock, &rec).await;
    let client = client();

    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(send(&client, anthropic_request(gw)).await);
    }
    let passed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(passed, 5);
    assert_eq!(rec.count(), 5);
    for (i, a) in answers[..5].iter().enumerate() {
        assert_eq!(a.headers["anthropic-ratelimit-requests-limit"], "5");
        assert_eq!(
            a.headers["anthropic-ratelimit-requests-remaining"],
            (4 - i).to_string().as_str()
        );
        let reset = Timestamp::from_unix_secs(T0 + 12 * (i as u64 + 1)).to_string();
        assert_eq!(a.headers["anthropic-ratelimit-requests-reset"], reset.as_str());
    }
    let refused = &answers[7];
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers["retry-after"], "12");
    assert_eq!(
        refused.headers["anthropic-ratelimit-requests-reset"],
        Timestamp::from_unix_secs(T0 + 60).to_string().as_str(),
        "RFC 3339"
    );
    let body = refused.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    // Both families ride on every answer.
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    let why = refused.headers.get("www-authenticate");
    assert!(why.is_none(), "a rate limit is not a credential problem");
}

#[tokio::test]
async fn retry_after_rounds_up_to_whole_seconds() {
    let clock = clock();
    let rec = Recorder::default();
    // 7 per 10 s: one every 1.428… s.
    let (store, _) = store(Limits::new().with_rate(Rate::new(7, Duration::from_secs(10)).with_burst(1)));
    let gw = gateway(ErrorFormat::OpenAi, store, &clock, &rec).await;
    let client = client();
    assert_eq!(send(&client, openai_request(gw)).await.status, 200);
    let refused = send(&client, openai_request(gw)).await;
    assert_eq!(refused.headers["retry-after"], "2", "1.43 s is told as 2 s");
    assert_eq!(refused.headers["x-ratelimit-reset-requests"], "1.429s");
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted() {
    let clock = clock();
    let record = Arc::new(
        KeyRecord::new(KeyId::random(), MemoryStore::new().hasher().digest(KEY.as_bytes()))
            .with_limits(Limits::new().with_rate(Rate::per_minute(1))),
    );
    let rec = Recorder::default();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::new())
        .layer(RateLimitLayer::new(MemoryLimiter::with_clock(clock)))
        .service(rec.service());
    let grpc = || {
        let mut req = Request::post("/helloworld.Greeter/SayHello")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        req.extensions_mut().insert(Identity::new(record.clone()));
        req
    };
    let first = svc.clone().oneshot(grpc()).await.unwrap();
    assert_eq!(first.status(), 200);
    let second = read(svc.oneshot(grpc()).await.unwrap()).await;
    assert_eq!(second.status, 200, "gRPC statuses ride on HTTP 200");
    assert_eq!(second.headers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert_eq!(second.headers["retry-after"], "60");
    assert_eq!(rec.count(), 1);
}

#[tokio::test]
async fn layer_defaults_apply_to_keys_without_limits_and_the_kind_is_in_the_extensions() {
    let clock = clock();
    let record = Arc::new(KeyRecord::new(
        KeyId::random(),
        MemoryStore::new().hasher().digest(KEY.as_bytes()),
    ));
    let rec = Recorder::default();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryLimiter::with_clock(clock))
                .default_limits(Limits::new().with_rate(Rate::per_minute(2))),
        )
        .service(rec.service());
    let request = || {
        let mut req = Request::new(());
        req.extensions_mut().insert(Identity::new(record.clone()));
        req
    };
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
    }
    let refused = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), 429);
    let why = refused.extensions().get::<Rejection>().unwrap();
    assert_eq!(why.kind(), RejectionKind::RateLimited);
    // A request without an identity (anonymous pass-through) is not limited here.
    for _ in 0..5 {
        assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), 200);
    }
    assert_eq!(rec.count(), 7);
}

#[tokio::test]
async fn an_ephemeral_key_spends_its_parents_allowance() {
    let clock = clock();
    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let parent = manager
        .issue(NewKey::named("app").limits(Limits::new().with_rate(Rate::per_minute(3))))
        .await
        .unwrap();
    let child = manager
        .mint_ephemeral(&Identity::new(parent.record.clone()), None, None)
        .await
        .unwrap();
    assert_eq!(
        child.record.limits(),
        parent.record.limits(),
        "copied at mint"
    );
    let rec = Recorder::default();
    let gw = gateway(ErrorFormat::OpenAi, store, &clock, &rec).await;
    let client = client();
    let with = |key: &str| {
        Request::post(format!("http://{gw}/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (p, c) = (parent.key.expose(), child.key.expose());
    let mut statuses = Vec::new();
    for key in [c, c, p, c, p] {
        statuses.push(send(&client, with(key)).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429], "one allowance of 3");
    let seen: Vec<Option<KeyId>> = rec
        .all()
        .iter()
        .map(|s| s.identity.as_ref().map(Identity::id))
        .collect();
    assert_eq!(
        seen,
        [
            Some(child.record.id()),
            Some(child.record.id()),
            Some(parent.record.id())
        ]
    );
}

/// A response body fed by the test, event by event.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// A gateway whose upstream answers each request with an SSE stream the test feeds through
/// the sender it receives on `streams`.
async fn streaming_gateway(
    max: u32,
    clock: &ManualClock,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>) {
    let (streams_tx, streams) = mpsc::unbounded_channel();
    let (store, _) = store(Limits::new().with_max_concurrent(max));
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move || {
                let streams_tx = streams_tx.clone();
                async move {
                    let (tx, rx) = mpsc::channel(4);
                    tx.send(Bytes::from_static(b"data: {\"delta\":\"Hel\"}\n\n"))
                        .await
                        .unwrap();
                    streams_tx.send(tx).unwrap();
                    http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(axum::body::Body::new(ChannelBody(rx)))
                        .unwrap()
                }
            }),
        )
        .layer(RateLimitLayer::new(MemoryLimiter::with_clock(clock.clone())))
        .layer(InboundApiKeyLayer::new(store).clock(clock.clone()))
        .layer(RejectionLayer::new());
    (support::spawn_axum(app).await, streams)
}

fn stream_request(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::from_static(br#"{"model":"m","stream":true}"#)))
        .unwrap()
}

/// Sends requests until one is let through, for up to two seconds: a permit is released
/// when the server has seen the stream end, a moment after the client has.
async fn eventually_allowed(
    client: &support::HttpClient,
    addr: std::net::SocketAddr,
) -> Option<http::Response<hyper::body::Incoming>> {
    for _ in 0..200 {
        let response = client.request(stream_request(addr)).await.unwrap();
        if response.status() == 200 {
            return Some(response);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test]
async fn open_streams_hold_their_permits_until_they_end_or_the_client_leaves() {
    let clock = clock();
    let (gw, mut streams) = streaming_gateway(2, &clock).await;
    let client = client();

    let first = client.request(stream_request(gw)).await.unwrap();
    let second = client.request(stream_request(gw)).await.unwrap();
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    let (feed_first, feed_second) = (streams.recv().await.unwrap(), streams.recv().await.unwrap());
    let mut first = first.into_body();
    let event = first.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(event, "data: {\"delta\":\"Hel\"}\n\n", "the stream is open");

    let third = send(&client, stream_request(gw)).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.json()["error"]["code"], "concurrency_limit_exceeded");
    assert!(
        third.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 requests in flight"),
        "the message says which limit"
    );
    assert_eq!(third.headers["retry-after"], "1");

    // The first stream ends: its permit comes back.
    feed_first
        .send(Bytes::from_static(b"data: [DONE]\n\n"))
        .await
        .unwrap();
    drop(feed_first);
    while let Some(frame) = first.frame().await {
        frame.unwrap();
    }
    let third = eventually_allowed(&client, gw).await;
    assert!(third.is_some(), "a finished stream frees its permit");
    // That one holds the permit again.
    let _third_feed = streams.recv().await.unwrap();
    let refused = send(&client, stream_request(gw)).await;
    assert_eq!(refused.status, 429, "two streams are open again");

    // The second client goes away mid-stream; the next event then fails to go out.
    drop(second);
    let _ = feed_second.send(Bytes::from_static(b"data: {}\n\n")).await;
    let fourth = eventually_allowed(&client, gw).await;
    assert!(fourth.is_some(), "a dropped client frees its permit");
    drop((third, fourth));
}

#[tokio::test]
async fn clock_is_the_one_the_limiter_was_given() {
    // A guard for the tests above: ManualClock reads sub-second steps.
    let clock = clock();
    clock.advance(Duration::from_millis(1500));
    assert_eq!(clock.now_nanos(), T0 * 1_000_000_000 + 1_500_000_000);
    assert_eq!(clock.now(), Timestamp::from_unix_secs(T0 + 1));
}
