//! Realtime APIs through the gateway's layers on loopback: WebSockets to a real echo
//! upstream (frames both ways, the credential swapped in the upgrade, the key out of the
//! subprotocol list, closes from either side and by the gateway: a revoked key, an
//! oversized message, idle and lifetime limits, the concurrency limit held while open, bad
//! handshakes refused with nothing upstream) and WebRTC signalling (an SDP offer passed
//! byte for byte).

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use http::StatusCode;
use http_body_util::Full;
use support::ws::{self, close_of, connect, next_text};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower::ServiceBuilder;
use tower_gateway_auth::inbound::KeySource;
use tower_gateway_auth::keys::{Ephemeral, IssuedKey, KeyManager, NewKey};
use tower_gateway_auth::limit::{Limits, MemoryLimiter};
use tower_gateway_auth::proxy::{Forward, StripHopByHopLayer};
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::upstream::{Credential, Provider};
use tower_gateway_auth::{InboundApiKeyLayer, RateLimitLayer, RejectionLayer, UpstreamAuthLayer};

const UPSTREAM_KEY: &str = "sk-upstream-realtime-secret";

struct Setup {
    /// The gateway.
    gw: std::net::SocketAddr,
    manager: KeyManager<MemoryStore>,
    key: IssuedKey,
}

impl Setup {
    /// What a backend does for its page: mints a key living `ttl` from the setup's key.
    async fn mint(&self, ttl: Duration) -> IssuedKey {
        let parent = tower_gateway_auth::Identity::new(self.key.record.clone());
        self.manager
            .mint_ephemeral(&parent, Ephemeral::new().ttl(ttl))
            .await
            .unwrap()
    }
}

/// Options of the stack under test.
#[derive(Clone, Copy)]
struct Options {
    recheck: Duration,
    idle: Duration,
    lifetime: Duration,
    max_message: usize,
    max_concurrent: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            recheck: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            lifetime: Duration::from_secs(600),
            max_message: 1 << 20,
            max_concurrent: None,
        }
    }
}

/// A gateway stack (hop-by-hop, rejections, inbound with the header, bearer and
/// subprotocol sources, limits, OpenAI's credential, `Forward`) in front of `upstream`,
/// served with upgrades; one key issued.
async fn setup(upstream: &str, options: Options) -> Setup {
    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone());
    let key = manager
        .issue(NewKey::named("browser-backend"))
        .await
        .unwrap();
    let inbound = InboundApiKeyLayer::from_shared(store)
        .sources([
            "header:x-api-key".parse::<KeySource>().unwrap(),
            KeySource::Bearer,
            "subprotocol".parse().unwrap(),
        ])
        .recheck_sockets_every(options.recheck);
    let upstream_auth =
        UpstreamAuthLayer::new(Provider::openai(), Credential::new(UPSTREAM_KEY).unwrap())
            .strip_inbound(&inbound);
    let mut limits = Limits::new();
    if let Some(max) = options.max_concurrent {
        limits = limits.with_max_concurrent(max);
    }
    let forward = Forward::builder(upstream)
        .unwrap()
        .socket_idle_timeout(options.idle)
        .socket_max_lifetime(options.lifetime)
        .socket_max_message_size(options.max_message)
        .build();
    let stack = ServiceBuilder::new()
        .layer(StripHopByHopLayer::new())
        .layer(RejectionLayer::new().realm("gateway"))
        .layer(inbound)
        .layer(RateLimitLayer::new(MemoryLimiter::new()).default_limits(limits))
        .layer(upstream_auth)
        .service(forward);
    let gw = support::spawn_service(stack).await;
    Setup { gw, manager, key }
}

fn subprotocols(key: &str) -> String {
    format!("realtime, openai-insecure-api-key.{key}, openai-beta.realtime-v1")
}

#[tokio::test]
async fn messages_flow_both_ways_and_the_upstream_sees_only_the_provider_credential() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let s = setup(&format!("ws://{upstream}"), Options::default()).await;
    let key = s.key.key.expose().to_owned();
    let (logs, _guard) = support::capture_logs();

    let offer = subprotocols(&key);
    let (mut socket, head) = connect(
        s.gw,
        "/v1/realtime?model=gpt-realtime",
        &[
            ("sec-websocket-protocol", &offer),
            ("origin", "https://app.example"),
        ],
    )
    .await
    .expect("the upgrade is relayed");
    // The browser offered `realtime` and the key; the upstream chose `realtime`, which the
    // client accepts (the client library checked it was offered).
    assert_eq!(head["sec-websocket-protocol"], "realtime");
    assert_eq!(head["upgrade"], "websocket");

    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "hello");
    socket
        .send(Message::binary(vec![1u8; 70_000]))
        .await
        .unwrap();
    assert_eq!(next_text(&mut socket).await, "<70000 bytes>");
    // A ping is answered on its own hop; data keeps flowing after it.
    socket
        .send(Message::Ping(Bytes::from_static(b"p")))
        .await
        .unwrap();
    socket.send(Message::text("after ping")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "after ping");

    let seen = sessions.last();
    assert_eq!(seen.path, "/v1/realtime?model=gpt-realtime");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert_eq!(
        seen.headers["sec-websocket-protocol"], "realtime, openai-beta.realtime-v1",
        "only the key's entry is gone"
    );
    assert!(seen.headers.get("sec-websocket-extensions").is_none());
    assert_eq!(seen.headers["host"], upstream.to_string());
    let everything = format!("{:?}", seen.headers);
    assert!(!everything.contains(&key), "{everything}");
    assert_eq!(seen.received, ["hello", "<70000 bytes>", "after ping"]);

    // The client closes: the upstream gets the same code and reason.
    socket
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .unwrap();
    let ended = sessions.ended().await;
    assert_eq!(ended.close, Some((1000, "done".to_owned())));

    let logs = logs.text();
    assert!(logs.contains("WebSocket open"), "{logs}");
    assert!(
        !logs.contains(&key) && !logs.contains(UPSTREAM_KEY),
        "{logs}"
    );
}

#[tokio::test]
async fn a_server_side_client_sends_its_key_in_a_header() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let s = setup(&format!("ws://{upstream}"), Options::default()).await;
    let key = s.key.key.expose().to_owned();
    let (mut socket, head) = connect(
        s.gw,
        "/v1/realtime",
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await
    .unwrap();
    assert!(head.get("sec-websocket-protocol").is_none());
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "hi");
    let seen = sessions.last();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert!(seen.headers.get("sec-websocket-protocol").is_none());
}

#[tokio::test]
async fn the_upstream_closing_reaches_the_client_with_its_code() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let s = setup(&format!("ws://{upstream}"), Options::default()).await;
    let offer = subprotocols(s.key.key.expose());
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    socket.send(Message::text("close:4001")).await.unwrap();
    assert_eq!(
        close_of(&mut socket, Duration::from_secs(5)).await,
        (4001, "bye".to_owned())
    );
    assert!(sessions.ended().await.ended);
}

#[tokio::test]
async fn a_revoked_keys_socket_is_closed_within_the_recheck_interval() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let recheck = Duration::from_millis(200);
    let options = Options {
        recheck,
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), options).await;
    let offer = subprotocols(s.key.key.expose());
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    socket.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "still here");
    // Several rechecks pass while the key is good.
    tokio::time::sleep(recheck * 3).await;
    socket.send(Message::text("and here")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "and here");

    let revoked = Instant::now();
    s.manager.revoke(s.key.record.id()).await.unwrap();
    let (code, reason) = close_of(&mut socket, Duration::from_secs(3)).await;
    let took = revoked.elapsed();
    assert_eq!(code, 1008);
    assert_eq!(reason, "This API key has been revoked.");
    assert!(
        took <= recheck + Duration::from_millis(400),
        "closed {took:?} after the revocation, the bound is one interval ({recheck:?}) and a lookup"
    );
    let ended = sessions.ended().await;
    assert_eq!(ended.close, Some((1008, reason)));
}

#[tokio::test]
async fn an_ephemeral_keys_socket_closes_when_its_parent_is_disabled() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let options = Options {
        recheck: Duration::from_millis(100),
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), options).await;
    let ephemeral = s.mint(Duration::from_secs(60)).await;
    let offer = subprotocols(ephemeral.key.expose());
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    socket.send(Message::text("ephemeral")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "ephemeral");
    let seen = sessions.last();
    assert!(!format!("{:?}", seen.headers).contains(ephemeral.key.expose()));

    // Disabling the parent writes nothing to the ephemeral key's record: the recheck
    // judges the lineage itself.
    s.manager
        .set_enabled(s.key.record.id(), false)
        .await
        .unwrap();
    let (code, reason) = close_of(&mut socket, Duration::from_secs(3)).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("minted from"), "{reason}");
    assert_eq!(sessions.ended().await.close.map(|c| c.0), Some(1008));
}

#[tokio::test]
async fn an_expired_ephemeral_keys_socket_is_closed() {
    let (upstream, _sessions) = ws::spawn_echo().await;
    let options = Options {
        recheck: Duration::from_millis(100),
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), options).await;
    let ephemeral = s.mint(Duration::from_secs(2)).await;
    let offer = subprotocols(ephemeral.key.expose());
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    let (code, reason) = close_of(&mut socket, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1008, "This API key has expired."));
}

#[tokio::test]
async fn an_oversized_message_closes_both_sides_with_1009() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let options = Options {
        max_message: 64 * 1024,
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), options).await;
    let offer = subprotocols(s.key.key.expose());

    // From the client: never passed on.
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    socket.send(Message::text("small")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "small");
    socket
        .send(Message::binary(vec![0u8; 64 * 1024 + 1]))
        .await
        .unwrap();
    let (code, _) = close_of(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, 1009);
    let ended = sessions.ended().await;
    assert_eq!(
        ended.received,
        ["small"],
        "the big message never reached the upstream"
    );
    assert_eq!(ended.close.map(|c| c.0), Some(1009));

    // From the upstream: never passed on either.
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    socket.send(Message::text("send:70000")).await.unwrap();
    let (code, reason) = close_of(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, 1009, "{reason}");
    assert_eq!(sessions.ended().await.close.map(|c| c.0), Some(1009));
}

#[tokio::test]
async fn idle_and_lifetime_limits_close_with_1001() {
    let (upstream, _sessions) = ws::spawn_echo().await;
    let idle = Options {
        idle: Duration::from_millis(300),
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), idle).await;
    let offer = subprotocols(s.key.key.expose());
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    // Messages keep it open past the idle timeout…
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        socket.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(next_text(&mut socket).await, format!("m{i}"));
    }
    // …silence closes it.
    let (code, reason) = close_of(&mut socket, Duration::from_secs(2)).await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));

    let lifetime = Options {
        lifetime: Duration::from_millis(500),
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), lifetime).await;
    let offer = subprotocols(s.key.key.expose());
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    let opened = Instant::now();
    let chatter = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if socket.send(Message::text("busy")).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(300), chatter).await;
    let (code, reason) = close_of(&mut socket, Duration::from_secs(2)).await;
    assert_eq!(code, 1001);
    assert!(reason.contains("lifetime"), "{reason}");
    assert!(opened.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn an_open_socket_counts_as_one_request_in_flight() {
    let (upstream, _sessions) = ws::spawn_echo().await;
    let options = Options {
        max_concurrent: Some(1),
        ..Options::default()
    };
    let s = setup(&format!("ws://{upstream}"), options).await;
    let key = s.key.key.expose().to_owned();
    let offer = subprotocols(&key);
    let (mut socket, _) = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    socket.send(Message::text("x")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "x");

    // While it is open, the key's one slot is taken: a second socket and a plain request
    // are refused.
    let second = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)]).await;
    assert_eq!(
        second.err().map(|e| e.0),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    let http = support::client();
    let plain = support::send(
        &http,
        support::get(s.gw, "/v1/models", &[("x-api-key", &key)]),
    )
    .await;
    assert_eq!(
        plain.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        plain.text()
    );

    socket.close(None).await.unwrap();
    drop(socket);
    // Closed: the slot is free again (the relay lets go once its close handshake is done).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)]).await {
            Ok(_) => break,
            Err((status, _)) => {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
                assert!(Instant::now() < deadline, "the slot was never released");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn bad_handshakes_are_refused_and_reach_nothing_upstream() {
    let (upstream, sessions) = ws::spawn_echo().await;
    let s = setup(&format!("ws://{upstream}"), Options::default()).await;
    let key = s.key.key.expose().to_owned();

    for (offer, status) in [
        // No key at all.
        ("realtime".to_owned(), StatusCode::UNAUTHORIZED),
        // A wrong key.
        (subprotocols("gw_not-a-key"), StatusCode::UNAUTHORIZED),
        // Our prefix with nothing after it.
        (
            "realtime, openai-insecure-api-key.".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        // Two different keys.
        (
            format!("openai-insecure-api-key.{key}, openai-insecure-api-key.gw_other"),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let refused = connect(s.gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)]).await;
        let Err((got, body)) = refused else {
            panic!("{offer}: not refused");
        };
        assert_eq!(got, status, "{offer}: {body}");
    }
    // The key in the subprotocol and a different one in a header: ambiguous.
    let refused = connect(
        s.gw,
        "/v1/realtime",
        &[
            ("sec-websocket-protocol", &subprotocols(&key)),
            ("x-api-key", "gw_other"),
        ],
    )
    .await;
    assert_eq!(refused.err().map(|e| e.0), Some(StatusCode::BAD_REQUEST));
    assert_eq!(sessions.count(), 0, "nothing reached the upstream");

    // A dot segment in the path: 400 before anything.
    let refused = connect(
        s.gw,
        "/v1/%2e%2e/admin",
        &[("sec-websocket-protocol", &subprotocols(&key))],
    )
    .await;
    assert_eq!(refused.err().map(|e| e.0), Some(StatusCode::BAD_REQUEST));
    assert_eq!(sessions.count(), 0);

    // The upstream refuses the upgrade: its answer comes back.
    let refused = connect(
        s.gw,
        "/refuse",
        &[("sec-websocket-protocol", &subprotocols(&key))],
    )
    .await;
    let (status, body) = refused.err().unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("refused upstream"), "{body}");

    // The upstream selects a subprotocol the client never offered: 502, no socket.
    let refused = connect(
        s.gw,
        "/bad-protocol",
        &[("sec-websocket-protocol", &subprotocols(&key))],
    )
    .await;
    assert_eq!(refused.err().map(|e| e.0), Some(StatusCode::BAD_GATEWAY));

    // A malformed upgrade (no Sec-WebSocket-Key) is a plain GET: not upgraded.
    let raw = format!(
        "GET /v1/realtime HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"
    );
    let answer = support::raw_exchange(s.gw, raw.as_bytes()).await;
    assert_ne!(support::raw_status(&answer), 101, "{answer}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_for_an_upgrade_too() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = setup(&format!("ws://127.0.0.1:{port}"), Options::default()).await;
    let refused = connect(
        s.gw,
        "/v1/realtime",
        &[("sec-websocket-protocol", &subprotocols(s.key.key.expose()))],
    )
    .await;
    assert_eq!(refused.err().map(|e| e.0), Some(StatusCode::BAD_GATEWAY));
}

#[tokio::test]
async fn wss_upstreams_are_upgraded_over_http1_on_tls() {
    let (port, cert, sessions) = ws::spawn_tls_echo().await;
    let store = Arc::new(MemoryStore::new());
    let key = KeyManager::new(store.clone())
        .issue(NewKey::named("k"))
        .await
        .unwrap();
    let inbound = InboundApiKeyLayer::from_shared(store).sources(["subprotocol".parse().unwrap()]);
    let upstream =
        UpstreamAuthLayer::new(Provider::openai(), Credential::new(UPSTREAM_KEY).unwrap())
            .strip_inbound(&inbound);
    let forward = Forward::builder(&format!("wss://localhost:{port}"))
        .unwrap()
        .add_root_certificate(cert)
        .build();
    let stack = ServiceBuilder::new()
        .layer(StripHopByHopLayer::new())
        .layer(inbound)
        .layer(upstream)
        .service(forward);
    let gw = support::spawn_service(stack).await;
    let (mut socket, head) = connect(
        gw,
        "/v1/realtime",
        &[("sec-websocket-protocol", &subprotocols(key.key.expose()))],
    )
    .await
    .unwrap();
    assert_eq!(head["sec-websocket-protocol"], "realtime");
    socket.send(Message::text("over tls")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "over tls");
    let seen = sessions.last();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert_eq!(seen.headers["host"], format!("localhost:{port}"));
}

/// WebRTC signalling: the browser (or its backend) posts an SDP offer; the answer comes
/// back. Both pass byte for byte, with the key swapped.
#[tokio::test]
async fn an_sdp_offer_passes_byte_for_byte_with_the_key_swapped() {
    const OFFER: &[u8] = b"v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
a=group:BUNDLE 0\r\na=msid-semantic: WMS\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
c=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=rtpmap:111 opus/48000/2\r\n";
    const ANSWER: &[u8] = b"v=0\r\no=- 1 2 IN IP4 203.0.113.1\r\ns=-\r\nt=0 0\r\nm=audio 3478 UDP/TLS/RTP/SAVPF 111\r\na=setup:passive\r\na=mid:0\r\n";

    let (upstream, seen) = support::spawn_canned("application/sdp", ANSWER, 16).await;
    let s = setup(&format!("http://{upstream}"), Options::default()).await;
    let key = s.key.key.expose().to_owned();
    let req = http::Request::post(format!(
        "http://{}/v1/realtime/calls?model=gpt-realtime",
        s.gw
    ))
    .header("content-type", "application/sdp")
    .header("authorization", format!("Bearer {key}"))
    .body(Full::new(Bytes::from_static(OFFER)))
    .unwrap();
    let answer = support::send(&support::client(), req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/sdp");
    assert_eq!(answer.body, ANSWER, "the answer, byte for byte");

    let received = seen.lock().unwrap().pop().unwrap();
    assert_eq!(received.body, OFFER, "the offer, byte for byte");
    assert_eq!(received.headers["content-type"], "application/sdp");
    assert_eq!(
        received.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert!(!format!("{:?}", received.headers).contains(&key));
}

/// A store that answers as `inner` until told to fail.
struct Flaky {
    inner: Arc<MemoryStore>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl tower_gateway_auth::store::KeyStore for Flaky {
    type Lookup = tower_gateway_auth::store::BoxLookup;

    fn lookup(&self, digest: &tower_gateway_auth::keys::KeyDigest) -> Self::Lookup {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(tower_gateway_auth::store::StoreError::new("store down"))
            });
        }
        let answer = self.inner.lookup(digest);
        Box::pin(answer)
    }
}

#[tokio::test]
async fn a_store_down_during_a_recheck_closes_the_socket_with_1011() {
    use tower_gateway_auth::store::KeyStore;
    let (upstream, sessions) = ws::spawn_echo().await;
    let store = Arc::new(MemoryStore::new());
    let key = KeyManager::new(store.clone())
        .issue(NewKey::named("k"))
        .await
        .unwrap();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = Flaky {
        inner: store.clone(),
        failing: failing.clone(),
    };
    assert_eq!(flaky.hasher().digest(b"x"), store.hasher().digest(b"x"));
    let inbound = InboundApiKeyLayer::new(flaky)
        .sources(["subprotocol".parse().unwrap()])
        .recheck_sockets_every(Duration::from_millis(100));
    let upstream_auth =
        UpstreamAuthLayer::new(Provider::openai(), Credential::new(UPSTREAM_KEY).unwrap())
            .strip_inbound(&inbound);
    let stack = ServiceBuilder::new()
        .layer(StripHopByHopLayer::new())
        .layer(inbound)
        .layer(upstream_auth)
        .service(Forward::new(&format!("ws://{upstream}")).unwrap());
    let gw = support::spawn_service(stack).await;
    let (mut socket, _) = connect(
        gw,
        "/v1/realtime",
        &[("sec-websocket-protocol", &subprotocols(key.key.expose()))],
    )
    .await
    .unwrap();
    socket.send(Message::text("up")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "up");
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, reason) = close_of(&mut socket, Duration::from_secs(3)).await;
    assert_eq!(code, 1011, "fail closed: {reason}");
    assert_eq!(sessions.ended().await.close.map(|c| c.0), Some(1011));
}
