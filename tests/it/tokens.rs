//! Token accounting (issue 15) through real servers: a gateway stack (inbound, rate limit,
//! model access, the library's own `Forward`) in front of an upstream that answers with
//! recorded-shape provider responses, split across TCP writes. What the client received is
//! compared byte for byte with what the upstream sent, and the tokens charged with the
//! responses' usage fields.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Answer, client, send, spawn_canned as upstream};
use tower::ServiceBuilder;
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{KeyId, KeyRecord};
use tower_gateway_auth::limit::{
    Budget, BudgetPeriod, Limiter, Limits, MemoryLimiter, ModelAccessLayer, Rate,
};
use tower_gateway_auth::rejection::ErrorFormat;
use tower_gateway_auth::store::{KeyStore, MemoryStore};
use tower_gateway_auth::{InboundApiKeyLayer, RateLimitLayer, RejectionLayer};

const KEY: &str = "gw_tokens-test-key-0001";
/// 2026-12-02T10:00:00Z.
const T0: u64 = 1_796_205_600;

const OPENAI_SSE: &[u8] = include_bytes!("../fixtures/usage/openai_chat.sse");
const OPENAI_JSON: &[u8] = include_bytes!("../fixtures/usage/openai_chat.json");
const ANTHROPIC_SSE: &[u8] = include_bytes!("../fixtures/usage/anthropic.sse");
const ANTHROPIC_JSON: &[u8] = include_bytes!("../fixtures/usage/anthropic.json");

/// A store with `KEY` carrying `limits`.
fn store(limits: Limits) -> (Arc<MemoryStore>, KeyId) {
    let store = MemoryStore::new();
    let id = KeyId::random();
    store.insert(
        KeyRecord::new(id, store.hasher().digest(KEY.as_bytes()))
            .with_name("tokens")
            .with_limits(limits),
    );
    (Arc::new(store), id)
}

/// The gateway stack in front of `upstream`, rejections in `format`, on `limiter`.
async fn gateway(
    upstream: std::net::SocketAddr,
    store: Arc<MemoryStore>,
    limiter: Arc<MemoryLimiter<ManualClock>>,
    clock: &ManualClock,
    format: ErrorFormat,
) -> std::net::SocketAddr {
    let stack = ServiceBuilder::new()
        .layer(RejectionLayer::new().error_format(format))
        .layer(InboundApiKeyLayer::from_shared(store).clock(clock.clone()))
        .layer(RateLimitLayer::shared(limiter))
        .layer(ModelAccessLayer::new())
        .service(support::forward_to(upstream));
    support::spawn_service(stack).await
}

fn chat(addr: std::net::SocketAddr, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, br")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

fn anthropic(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[]}"#,
        )))
        .unwrap()
}

/// Tokens charged to `id` in its budget period so far.
async fn used(limiter: &MemoryLimiter<ManualClock>, id: KeyId, limits: &Limits) -> u64 {
    limiter
        .usage(id, limits)
        .await
        .unwrap()
        .budget_used
        .unwrap()
}

/// Waits for a charge made when a response body ended on the server side.
async fn charged(limiter: &MemoryLimiter<ManualClock>, id: KeyId, limits: &Limits, total: u64) {
    for _ in 0..200 {
        if used(limiter, id, limits).await == total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "charged {} tokens, expected {total}",
        used(limiter, id, limits).await
    );
}

fn big_budget() -> Limits {
    Limits::new().with_budget(Budget::new(10_000_000, BudgetPeriod::Day))
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_unix_secs(T0))
}

#[tokio::test]
async fn an_openai_stream_is_charged_its_usage_chunk_and_reaches_the_client_unchanged() {
    let clock = clock();
    let limits = big_budget();
    let (store, id) = store(limits);
    let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
    // 7-byte pieces: the usage chunk is split across many reads.
    let (up, seen) = upstream("text/event-stream", OPENAI_SSE, 7).await;
    let gw = gateway(up, store, limiter.clone(), &clock, ErrorFormat::OpenAi).await;
    // The client asked for the usage itself: its stream is passed on whole.
    let asked = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let answer = send(&client(), chat(gw, asked)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(&answer.body[..], OPENAI_SSE, "byte for byte");
    assert_eq!(answer.headers["x-ratelimit-limit-tokens"], "10000000");
    assert_eq!(answer.headers["x-ratelimit-remaining-tokens"], "10000000");
    assert_eq!(
        answer.headers["anthropic-ratelimit-tokens-reset"],
        "2026-12-03T00:00:00Z"
    );
    charged(&limiter, id, &limits, 53).await;
    let got = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        &got.body[..],
        asked.as_bytes(),
        "nothing added: it was asked for"
    );
    assert_eq!(
        got.headers["accept-encoding"], "identity",
        "a compressed answer would hide its usage"
    );
    // The next answer tells what is left.
    let again = send(&client(), chat(gw, asked)).await;
    assert_eq!(again.headers["x-ratelimit-remaining-tokens"], "9999947");
}

#[tokio::test]
async fn a_stream_that_did_not_ask_for_usage_is_asked_and_the_extra_chunk_kept_from_the_client() {
    let clock = clock();
    let limits = big_budget();
    let (store, id) = store(limits);
    let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
    let (up, seen) = upstream("text/event-stream", OPENAI_SSE, 13).await;
    let gw = gateway(up, store, limiter.clone(), &clock, ErrorFormat::OpenAi).await;
    let plain =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = send(&client(), chat(gw, plain)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let got = seen.lock().unwrap().last().cloned().unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        got.headers["content-length"],
        got.body.len().to_string().as_str(),
        "the length follows the body"
    );
    // What the client got is the upstream's stream without the usage-only event.
    let text = std::str::from_utf8(OPENAI_SSE).unwrap();
    let usage_event = text
        .split_inclusive("\n\n")
        .find(|event| event.contains("\"choices\":[]"))
        .expect("the fixture has a usage chunk");
    let expected = text.replacen(usage_event, "", 1);
    assert_eq!(answer.text(), expected);
    assert!(!answer.text().contains("\"usage\":{"));
    charged(&limiter, id, &limits, 53).await;

    // A client that asked `false` is asked anyway: it must not opt out of being counted.
    let opt_out =
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":false}}"#;
    send(&client(), chat(gw, opt_out)).await;
    let got = seen.lock().unwrap().last().cloned().unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    charged(&limiter, id, &limits, 106).await;
}

#[tokio::test]
async fn json_answers_and_anthropic_streams_are_charged_their_usage_fields() {
    for (content_type, body, total, make) in [
        (
            "application/json",
            OPENAI_JSON,
            1363u64,
            (|gw| chat(gw, r#"{"model":"gpt-4o","messages":[]}"#)) as fn(_) -> _,
        ),
        ("text/event-stream", ANTHROPIC_SSE, 13_784 + 89, anthropic),
        (
            "application/json",
            ANTHROPIC_JSON,
            2095 + 2051 + 503,
            anthropic,
        ),
    ] {
        let clock = clock();
        let limits = big_budget();
        let (store, id) = store(limits);
        let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
        let (up, _) = upstream(content_type, body, 11).await;
        let gw = gateway(up, store, limiter.clone(), &clock, ErrorFormat::OpenAi).await;
        let answer = send(&client(), make(gw)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], body, "{content_type} byte for byte");
        charged(&limiter, id, &limits, total).await;
    }
}

#[tokio::test]
async fn a_spent_budget_is_429_insufficient_quota_until_midnight_utc_then_it_starts_again() {
    let clock = clock();
    let limits = Limits::new().with_budget(Budget::new(100, BudgetPeriod::Day));
    let (store, id) = store(limits);
    let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
    let (up, seen) = upstream("text/event-stream", OPENAI_SSE, 64).await;
    let gw = gateway(up, store, limiter.clone(), &clock, ErrorFormat::OpenAi).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true}"#;
    // 53 a request: the second one passes with 47 left and overshoots, by its own usage.
    for (n, left) in [(1, "100"), (2, "47")] {
        let answer = send(&client(), chat(gw, body)).await;
        assert_eq!(answer.status, StatusCode::OK, "request {n}");
        assert_eq!(answer.headers["x-ratelimit-remaining-tokens"], left);
        charged(&limiter, id, &limits, 53 * n).await;
    }
    let before = seen.lock().unwrap().len();
    let refused = send(&client(), chat(gw, body)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let json = refused.json();
    assert_eq!(json["error"]["code"], "insufficient_quota");
    assert_eq!(json["error"]["type"], "insufficient_quota");
    // 14 hours to midnight.
    assert_eq!(refused.headers["retry-after"], "50400");
    assert_eq!(refused.headers["x-ratelimit-remaining-tokens"], "0");
    assert_eq!(refused.headers["x-ratelimit-reset-tokens"], "14h0m0s");
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "nothing reached the upstream"
    );

    clock.advance(Duration::from_secs(14 * 3600 - 1));
    assert_eq!(send(&client(), chat(gw, body)).await.status, 429);
    clock.advance(Duration::from_secs(1));
    let next_day = send(&client(), chat(gw, body)).await;
    assert_eq!(next_day.status, StatusCode::OK, "a new day, a new budget");
    assert_eq!(next_day.headers["x-ratelimit-remaining-tokens"], "100");
}

#[tokio::test]
async fn a_spent_token_rate_is_429_rate_limit_exceeded_of_type_tokens_and_in_anthropics_words() {
    let clock = clock();
    // 60 tokens a minute: one a second.
    let limits = Limits::new().with_tokens(Rate::per_minute(60));
    let (store, _) = store(limits);
    let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
    let (up, seen) = upstream("text/event-stream", OPENAI_SSE, 64).await;
    let gw = gateway(
        up,
        store.clone(),
        limiter.clone(),
        &clock,
        ErrorFormat::OpenAi,
    )
    .await;
    let body = r#"{"model":"gpt-4o-mini","stream":true}"#;
    let first = send(&client(), chat(gw, body)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-ratelimit-limit-tokens"], "60");
    // The charge lands when the server has seen the stream end.
    let mut refused = None;
    for _ in 0..200 {
        let answer = send(&client(), chat(gw, body)).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("the token rate was never spent");
    let json = refused.json();
    assert_eq!(json["error"]["code"], "rate_limit_exceeded");
    assert_eq!(json["error"]["type"], "tokens");
    // 53 spent of 60 in this minute (maybe twice, if a second request passed before the
    // first was charged): at least one token back within 53 × 2 - 60 + 1 seconds.
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=47).contains(&retry), "{retry}");
    assert_eq!(refused.headers["x-ratelimit-remaining-tokens"], "0");
    let upstream_saw = seen.lock().unwrap().len();
    clock.advance(Duration::from_secs(retry));
    assert_eq!(send(&client(), chat(gw, body)).await.status, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), upstream_saw + 1);

    // The same refusal in Anthropic's words.
    let (up, _) = upstream("text/event-stream", ANTHROPIC_SSE, 64).await;
    let gw = gateway(up, store, limiter, &clock, ErrorFormat::Anthropic).await;
    let mut refused = None;
    for _ in 0..200 {
        let answer = send(&client(), anthropic(gw)).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("refused");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    assert_eq!(refused.headers["anthropic-ratelimit-tokens-remaining"], "0");
    assert!(refused.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn a_completion_too_large_to_ask_for_usage_is_413_and_reaches_nothing() {
    let clock = clock();
    let limits = big_budget();
    let (store, _) = store(limits);
    let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
    let (up, seen) = upstream("text/event-stream", OPENAI_SSE, 64).await;
    let stack = ServiceBuilder::new()
        .layer(RejectionLayer::new())
        .layer(InboundApiKeyLayer::from_shared(store).clock(clock.clone()))
        .layer(RateLimitLayer::shared(limiter))
        .layer(ModelAccessLayer::new().max_buffer(512).usage_buffer(1024))
        .service(support::forward_to(up));
    let gw = support::spawn_service(stack).await;
    // Padding past the bound: passed on unread, a stream could dodge its limits.
    let padded = format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(200_000)
    );
    let answer: Answer = send(&client(), chat(gw, &padded)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json()["error"]["code"], "request_too_large");
    assert!(seen.lock().unwrap().is_empty());
    // Under the bound it goes.
    let small = r#"{"model":"gpt-4o-mini","stream":true}"#;
    assert_eq!(
        send(&client(), chat(gw, small)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn keys_without_token_limits_are_not_read_nor_rewritten() {
    let clock = clock();
    let limits = Limits::new().with_rate(Rate::per_minute(100));
    let (store, _) = store(limits);
    let limiter = Arc::new(MemoryLimiter::with_clock(clock.clone()));
    let (up, seen) = upstream("text/event-stream", OPENAI_SSE, 64).await;
    let gw = gateway(up, store, limiter, &clock, ErrorFormat::OpenAi).await;
    let plain = r#"{"model":"gpt-4o-mini","stream":true}"#;
    let answer = send(&client(), chat(gw, plain)).await;
    assert_eq!(&answer.body[..], OPENAI_SSE);
    assert!(!answer.headers.contains_key("x-ratelimit-limit-tokens"));
    let got = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(&got.body[..], plain.as_bytes());
    assert_eq!(got.headers["accept-encoding"], "gzip, br");
}
