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
use tower_gateway_auth::keys::{Ephemeral, KeyId, KeyManager, KeyRecord, NewKey};
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
        .layer(RateLimitLayer::new(MemoryLimiter::with_clock(
            clock.clone(),
        )))
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
    assert_eq!(
        rec.count(),
        5,
        "the refused requests never reached the upstream"
    );

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
        assert_eq!(
            a.headers["anthropic-ratelimit-requests-reset"],
            reset.as_str()
        );
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
    let (store, _) =
        store(Limits::new().with_rate(Rate::new(7, Duration::from_secs(10)).with_burst(1)));
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
        KeyRecord::new(
            KeyId::random(),
            MemoryStore::new().hasher().digest(KEY.as_bytes()),
        )
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
        assert_eq!(
            svc.clone()
                .oneshot(Request::new(()))
                .await
                .unwrap()
                .status(),
            200
        );
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
        .mint_ephemeral(&Identity::new(parent.record.clone()), Ephemeral::new())
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
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// A gateway whose upstream answers each request with an SSE stream the test feeds through
/// the sender it receives on `streams`.
async fn streaming_gateway(
    max: u32,
    clock: &ManualClock,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
) {
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
        .layer(RateLimitLayer::new(MemoryLimiter::with_clock(
            clock.clone(),
        )))
        .layer(InboundApiKeyLayer::new(store).clock(clock.clone()))
        .layer(RejectionLayer::new());
    (support::spawn_axum(app).await, streams)
}

fn stream_request(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","stream":true}"#,
        )))
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
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
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

// ---- model access ----

use std::collections::VecDeque;
use std::sync::Mutex;
use tower_gateway_auth::limit::{ModelAccessLayer, ModelList, ReplayBody, UnknownModel};

/// A request body handed over in the given chunks.
struct Chunks(VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

fn chunks<I: IntoIterator<Item = Vec<u8>>>(parts: I) -> Chunks {
    Chunks(parts.into_iter().map(Bytes::from).collect())
}

/// What the upstream received: each request's body, whole.
#[derive(Clone, Default)]
struct Bodies(Arc<Mutex<Vec<Result<Bytes, String>>>>);

impl Bodies {
    fn all(&self) -> Vec<Result<Bytes, String>> {
        self.0.lock().unwrap().clone()
    }
}

fn restricted(models: &[&str]) -> Arc<KeyRecord> {
    Arc::new(
        KeyRecord::new(
            KeyId::random(),
            MemoryStore::new().hasher().digest(KEY.as_bytes()),
        )
        .with_models(ModelList::new(models.iter().copied())),
    )
}

/// Sends `body` through a [`ModelAccessLayer`] (`layer`) to an upstream that reads the
/// whole body, as the key `record`, with rejections in `format`.
async fn through(
    layer: ModelAccessLayer,
    format: ErrorFormat,
    record: &Arc<KeyRecord>,
    uri: &str,
    headers: &[(&str, &str)],
    body: Chunks,
) -> (support::Answer, Bodies) {
    let bodies = Bodies::default();
    let seen = bodies.clone();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::new().error_format(format))
        .layer(layer)
        .service_fn(move |req: Request<ReplayBody<Chunks>>| {
            let seen = seen.clone();
            async move {
                let body = req.into_body().collect().await;
                let body = body.map(|b| b.to_bytes()).map_err(|e| e.to_string());
                seen.0.lock().unwrap().push(body);
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            }
        });
    let mut req = Request::post(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(body).unwrap();
    req.extensions_mut().insert(Identity::new(record.clone()));
    (read(svc.oneshot(req).await.unwrap()).await, bodies)
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn a_model_the_key_may_not_use_is_403_in_each_dialect_and_reaches_nothing() {
    let key = restricted(&["gpt-4o-mini", "claude-3-5-haiku*"]);
    let body = || chunks([br#"{"model":"gpt-4o","messages":[]}"#.to_vec()]);
    let (openai, seen) = through(
        ModelAccessLayer::new(),
        ErrorFormat::OpenAi,
        &key,
        CHAT,
        &[],
        body(),
    )
    .await;
    assert_eq!(openai.status, StatusCode::FORBIDDEN);
    assert_eq!(openai.json()["error"]["code"], "model_not_allowed");
    assert_eq!(
        openai.json()["error"]["message"],
        "This API key may not use the model `gpt-4o`."
    );
    assert!(seen.all().is_empty(), "the upstream saw nothing");

    let claude = || chunks([br#"{"max_tokens":5,"model":"claude-3-opus-latest"}"#.to_vec()]);
    let (anthropic, seen) = through(
        ModelAccessLayer::new(),
        ErrorFormat::Anthropic,
        &key,
        "/v1/messages",
        &[],
        claude(),
    )
    .await;
    assert_eq!(anthropic.status, StatusCode::FORBIDDEN);
    assert_eq!(anthropic.json()["error"]["type"], "permission_error");
    assert!(seen.all().is_empty());

    let grpc = [("content-type", "application/grpc")];
    let (status, seen) = through(
        ModelAccessLayer::new(),
        ErrorFormat::OpenAi,
        &key,
        CHAT,
        &grpc,
        body(),
    )
    .await;
    assert_eq!(status.headers["grpc-status"], "7", "PERMISSION_DENIED");
    assert!(seen.all().is_empty());
}

#[tokio::test]
async fn an_allowed_model_arrives_byte_for_byte_however_it_is_chunked() {
    let key = restricted(&["claude-3-5-haiku*"]);
    let text: &[u8] = b" {\"stream\" : true,\n \"mod\\u0065l\":\"claude-3-5-haiku-latest\" ,\"messages\":[{\"model\":\"x\"}]}\r\n";
    for cut in 1..text.len() {
        let body = chunks([text[..cut].to_vec(), text[cut..].to_vec()]);
        let (answer, seen) = through(
            ModelAccessLayer::new(),
            ErrorFormat::Anthropic,
            &key,
            "/v1/messages",
            &[],
            body,
        )
        .await;
        assert_eq!(answer.status, 200, "cut at {cut}");
        assert_eq!(seen.all(), [Ok(Bytes::from_static(text))], "cut at {cut}");
    }
}

#[tokio::test]
async fn models_in_gemini_and_azure_paths_are_checked_without_reading_the_body() {
    let key = restricted(&["gemini-2.0-flash", "prod-gpt4o"]);
    let layer = ModelAccessLayer::new;
    let empty = || chunks([]);
    let gemini = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";
    let (ok, seen) = through(layer(), ErrorFormat::OpenAi, &key, gemini, &[], empty()).await;
    assert_eq!(ok.status, 200);
    assert_eq!(seen.all().len(), 1);
    let (refused, seen) = through(
        layer(),
        ErrorFormat::OpenAi,
        &key,
        "/v1beta/models/gemini-1.5-pro:generateContent",
        &[],
        empty(),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(seen.all().is_empty());
    let azure = "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21";
    let (ok, _) = through(layer(), ErrorFormat::OpenAi, &key, azure, &[], empty()).await;
    assert_eq!(ok.status, 200);
    let (refused, _) = through(
        layer(),
        ErrorFormat::OpenAi,
        &key,
        "/openai/deployments/other/chat/completions",
        &[],
        empty(),
    )
    .await;
    assert_eq!(refused.status, 403);
}

#[tokio::test]
async fn unreadable_models_follow_the_configured_rule() {
    let key = restricted(&["gpt-4o-mini"]);
    let unrestricted = Arc::new(KeyRecord::new(
        KeyId::random(),
        MemoryStore::new().hasher().digest(b"x"),
    ));
    let filler = format!(r#"{{"messages":"{}","#, "a".repeat(70 * 1024));
    let late = |model: &str| {
        chunks([
            filler.clone().into_bytes(),
            format!(r#""model":"{model}"}}"#).into_bytes(),
        ])
    };
    let not_json = || {
        chunks([
            b"--boundary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini"
                .to_vec(),
        ])
    };
    let no_model = || chunks([br#"{"input":"hello"}"#.to_vec()]);

    // Default: a restricted key must name a readable model within the bound.
    for body in [late("gpt-4o-mini"), not_json(), no_model()] {
        let (a, seen) = through(
            ModelAccessLayer::new(),
            ErrorFormat::OpenAi,
            &key,
            CHAT,
            &[],
            body,
        )
        .await;
        assert_eq!(a.status, 403, "{}", a.text());
        assert!(seen.all().is_empty());
    }
    // A key without a list passes untouched, whatever the body.
    let (a, seen) = through(
        ModelAccessLayer::new(),
        ErrorFormat::OpenAi,
        &unrestricted,
        CHAT,
        &[],
        not_json(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        seen.all()[0].as_ref().unwrap().len(),
        not_json().0.iter().map(Bytes::len).sum::<usize>()
    );

    // Allowed when configured: past the bound the body streams on, still watched.
    let allow = || ModelAccessLayer::new().unknown_model(UnknownModel::Allow);
    let (a, seen) = through(
        allow(),
        ErrorFormat::OpenAi,
        &key,
        CHAT,
        &[],
        late("gpt-4o-mini"),
    )
    .await;
    assert_eq!(a.status, 200);
    let expected = [
        filler.clone().into_bytes(),
        br#""model":"gpt-4o-mini"}"#.to_vec(),
    ]
    .concat();
    assert_eq!(seen.all(), [Ok(Bytes::from(expected))]);
    let (a, seen) = through(allow(), ErrorFormat::OpenAi, &key, CHAT, &[], not_json()).await;
    assert_eq!(a.status, 200);
    assert!(seen.all()[0].is_ok());
    // A forbidden model past the bound breaks the body before the upstream has all of it.
    let (_, seen) = through(
        allow(),
        ErrorFormat::OpenAi,
        &key,
        CHAT,
        &[],
        late("gpt-4o"),
    )
    .await;
    assert!(
        seen.all()[0].as_ref().unwrap_err().contains("may not use"),
        "{:?}",
        seen.all()
    );
}

#[tokio::test]
async fn a_second_model_key_is_refused() {
    let key = restricted(&["gpt-4o-mini"]);
    let twice = chunks([br#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#.to_vec()]);
    let (a, seen) = through(
        ModelAccessLayer::new(),
        ErrorFormat::OpenAi,
        &key,
        CHAT,
        &[],
        twice,
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(seen.all().is_empty());
    // Found after the model was decided, in the streamed rest: the body breaks.
    let late = chunks([
        br#"{"model":"gpt-4o-mini","#.to_vec(),
        br#""messages":[],"model":"gpt-4o"}"#.to_vec(),
    ]);
    let (_, seen) = through(
        ModelAccessLayer::new(),
        ErrorFormat::OpenAi,
        &key,
        CHAT,
        &[],
        late,
    )
    .await;
    assert!(
        seen.all()[0]
            .as_ref()
            .unwrap_err()
            .contains("more than once")
    );
}

#[tokio::test]
async fn a_large_body_streams_past_its_model() {
    // The client sends the model and the first part of 1 MiB, then waits until the upstream
    // has read that part before sending the rest: a layer that buffered the body would never
    // let the upstream see it, and the test would time out.
    let (first_seen_tx, first_seen) = tokio::sync::oneshot::channel::<usize>();
    let first_seen_tx = Arc::new(Mutex::new(Some(first_seen_tx)));
    let total = Arc::new(Mutex::new(None));
    let total_seen = total.clone();
    let store = MemoryStore::new();
    store.insert(
        KeyRecord::new(KeyId::random(), store.hasher().digest(KEY.as_bytes()))
            .with_models(ModelList::new(["gpt-4o*"])),
    );
    let app = Router::new()
        .route(
            CHAT,
            post(move |req: axum::extract::Request| {
                let first_seen_tx = first_seen_tx.clone();
                let total = total_seen.clone();
                async move {
                    let mut body = req.into_body();
                    let mut n = 0;
                    let mut hash = crc32fast::Hasher::new();
                    while let Some(frame) = body.frame().await {
                        let data = frame.unwrap().into_data().unwrap();
                        n += data.len();
                        hash.update(&data);
                        if let Some(tx) = first_seen_tx.lock().unwrap().take() {
                            tx.send(n).unwrap();
                        }
                    }
                    *total.lock().unwrap() = Some((n, hash.finalize()));
                    "ok"
                }
            }),
        )
        .layer(ModelAccessLayer::new())
        .layer(InboundApiKeyLayer::new(store))
        .layer(RejectionLayer::new());
    let gw = support::spawn_axum(app).await;

    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let head = Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","input":"{}"#,
        "x".repeat(16 * 1024)
    ));
    let tail = Bytes::from(format!(r#"{}"}}"#, "y".repeat(1024 * 1024)));
    let mut whole = crc32fast::Hasher::new();
    whole.update(&head);
    whole.update(&tail);
    let len = head.len() + tail.len();
    let req = Request::post(format!("http://{gw}{CHAT}"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::new(ChannelBody(rx)))
        .unwrap();
    let client: hyper_util::client::legacy::Client<_, axum::body::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let response = tokio::spawn(async move { client.request(req).await.unwrap().status() });
    tx.send(head).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), first_seen)
        .await
        .expect("the upstream saw the first bytes before the client sent the last")
        .unwrap();
    assert!(first < len, "{first} of {len} bytes");
    tx.send(tail).await.unwrap();
    drop(tx);
    assert_eq!(response.await.unwrap(), 200);
    assert_eq!(
        *total.lock().unwrap(),
        Some((len, whole.finalize())),
        "byte for byte"
    );
}

mod fuzz {
    use super::*;
    use proptest::arbitrary::any;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever the bytes and however they are cut, the layer neither panics nor changes
        /// what it passes on: the upstream gets the bytes exactly, or nothing at all.
        #[test]
        fn any_bytes_pass_unchanged_or_not_at_all(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                "[ {}\\[\\]\":,\\\\a-z0-9]{0,120}".prop_map(String::into_bytes),
                "\\{\"model\":\"gpt-4o[a-z\\-\\\\\"]{0,8}\"[ ,a-z\":{}]{0,40}".prop_map(String::into_bytes),
            ],
            cuts in proptest::collection::vec(any::<usize>(), 0..5),
            allow in any::<bool>(),
            bound in 64usize..128,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut parts = Vec::new();
            let mut from = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                parts.push(bytes[from..p].to_vec());
                from = p;
            }
            let rule = if allow { UnknownModel::Allow } else { UnknownModel::Refuse };
            let layer = ModelAccessLayer::new().unknown_model(rule).max_buffer(bound);
            let key = restricted(&["gpt-4o*"]);
            let (answer, seen) = rt.block_on(through(layer, ErrorFormat::OpenAi, &key, CHAT, &[], chunks(parts)));
            match seen.all().as_slice() {
                [] => prop_assert!(answer.status == 403 || answer.status == 400),
                [Ok(body)] => prop_assert_eq!(&body[..], &bytes[..]),
                // A body broken mid-stream: a model found late, or twice.
                [Err(e)] => prop_assert!(e.contains("model"), "{}", e),
                more => prop_assert!(false, "{} requests", more.len()),
            }
        }
    }
}

// ---- the service that was polled ready is the one called ----

mod readiness {
    use super::*;
    use std::future::{Future, Ready};
    use tower::Service;
    use tower_gateway_auth::limit::{Admission, Limiter, LimiterError, MemoryPermit};

    /// A limiter whose decisions take one wake-up, as a networked backend's do.
    struct SlowLimiter(MemoryLimiter<ManualClock>);

    struct Slow<F> {
        inner: F,
        yielded: bool,
    }

    impl<F: Future + Unpin> Future for Slow<F> {
        type Output = F::Output;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            if !self.yielded {
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll(cx)
        }
    }

    impl Limiter for SlowLimiter {
        type Permit = MemoryPermit;
        type Future = Slow<Ready<Result<Admission<MemoryPermit>, LimiterError>>>;

        fn admit(&self, key: KeyId, limits: &Limits) -> Self::Future {
            Slow {
                inner: self.0.admit(key, limits),
                yielded: false,
            }
        }

        fn usage(&self, key: KeyId, limits: &Limits) -> tower_gateway_auth::limit::UsageFuture {
            self.0.usage(key, limits)
        }

        fn charge(&self, key: KeyId, limits: &Limits, tokens: u64) {
            self.0.charge(key, limits, tokens)
        }
    }

    fn with_identity<B>(mut req: Request<B>, record: &Arc<KeyRecord>) -> Request<B> {
        req.extensions_mut().insert(Identity::new(record.clone()));
        req
    }

    #[tokio::test]
    async fn a_limiter_that_waits_calls_the_readied_service_and_still_limits() {
        let (mock, mut handle) =
            tower_test::mock::pair::<Request<()>, http::Response<Full<Bytes>>>();
        let mut svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(SlowLimiter(MemoryLimiter::with_clock(
                clock(),
            ))))
            .service(mock);
        let record = Arc::new(
            KeyRecord::new(KeyId::random(), MemoryStore::new().hasher().digest(b"k")).with_limits(
                Limits::new()
                    .with_rate(Rate::per_minute(1))
                    .with_max_concurrent(1),
            ),
        );
        let first = svc
            .ready()
            .await
            .unwrap()
            .call(with_identity(Request::new(()), &record));
        let upstream = tokio::spawn(async move {
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_response(http::Response::new(Full::new(Bytes::from_static(b"ok"))));
            handle
        });
        let first = first.await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "0");
        let mut handle = upstream.await.unwrap();
        let second = svc
            .ready()
            .await
            .unwrap()
            .call(with_identity(Request::new(()), &record))
            .await
            .unwrap();
        assert_eq!(second.status(), 429);
        drop(first);
        drop(svc);
        assert!(
            handle.next_request().await.is_none(),
            "one request reached the upstream"
        );
    }

    #[tokio::test]
    async fn model_access_calls_the_readied_service() {
        let (mock, mut handle) =
            tower_test::mock::pair::<Request<ReplayBody<Chunks>>, http::Response<Full<Bytes>>>();
        let mut svc = ServiceBuilder::new()
            .layer(ModelAccessLayer::new())
            .service(mock);
        let record = restricted(&["gpt-4o-mini"]);
        let body = chunks([br#"{"model":"gpt-4o-mini"}"#.to_vec()]);
        let call = svc
            .ready()
            .await
            .unwrap()
            .call(with_identity(Request::new(body), &record));
        let upstream = tokio::spawn(async move {
            let (req, respond) = handle.next_request().await.unwrap();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            respond.send_response(http::Response::new(Full::new(Bytes::new())));
            body
        });
        assert_eq!(call.await.unwrap().status(), 200);
        assert_eq!(upstream.await.unwrap(), r#"{"model":"gpt-4o-mini"}"#);
    }
}
