//! `Forward` between a real client and a real upstream on loopback: what the upstream
//! receives, what comes back, streaming, and failures.

use crate::support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{client, get, send, spawn_axum};
use tokio::sync::{Notify, mpsc};
use tower_gateway_auth::proxy::{Forward, StripHopByHopLayer};
use tower_gateway_auth::rejection::ErrorFormat;

/// An upstream that answers with JSON of what it received.
async fn echo_upstream() -> std::net::SocketAddr {
    let app = Router::new().fallback(|req: AxumRequest| async move {
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<binary>").into()))
            .collect();
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        axum::Json(serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }))
    });
    spawn_axum(app).await
}

async fn gateway(forward: Forward) -> std::net::SocketAddr {
    spawn_axum(Router::new().nest_service("/up", forward)).await
}

#[tokio::test]
async fn forwards_path_query_and_body_and_drops_hop_by_hop_headers() {
    let upstream = echo_upstream().await;
    // The client's `Connection` list is honored on entry, as a gateway is meant to be built.
    let forward = Forward::new(&format!("http://{upstream}/base")).unwrap();
    let gw = spawn_axum(
        Router::new()
            .nest_service("/up", forward)
            .layer(StripHopByHopLayer::new()),
    )
    .await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{gw}/up/v1/chat?z=%2F%20&a=b+c&&k"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret-hop")
        .header("keep-alive", "timeout=5")
        .header("x-end-to-end", "kept")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = a.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/base/v1/chat");
    assert_eq!(seen["query"], "z=%2F%20&a=b+c&&k");
    assert_eq!(seen["body"], "{\"model\":\"m\"}");
    let headers = &seen["headers"];
    assert_eq!(headers["x-end-to-end"], "kept");
    assert_eq!(headers["host"], upstream.to_string());
    for gone in ["x-hop", "keep-alive"] {
        assert!(headers.get(gone).is_none(), "{gone} reached the upstream");
    }
}

#[tokio::test]
async fn the_headers_an_upstream_names_in_connection_are_dropped_from_its_response() {
    let app = Router::new().fallback(|| async {
        Response::builder()
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("x-end-to-end", "kept")
            .body(Body::from("ok"))
            .unwrap()
    });
    let upstream = spawn_axum(app).await;
    let gw = gateway(Forward::new(&format!("http://{upstream}")).unwrap()).await;
    let a = send(&client(), get(gw, "/up/x", &[])).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["x-end-to-end"], "kept");
    assert!(a.headers.get("x-upstream-hop").is_none(), "{:?}", a.headers);
}

#[tokio::test]
async fn upstream_errors_come_back_as_they_are() {
    let app = Router::new().fallback(|| async {
        Response::builder()
            .status(429)
            .header("retry-after", "7")
            .body(Body::from("{\"error\":\"slow down\"}"))
            .unwrap()
    });
    let upstream = spawn_axum(app).await;
    let gw = gateway(Forward::new(&format!("http://{upstream}")).unwrap()).await;
    let a = send(&client(), get(gw, "/up/x", &[])).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["retry-after"], "7");
    assert_eq!(a.text(), "{\"error\":\"slow down\"}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_a_silent_one_504() {
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let forward = Forward::new(&format!("http://{closed}")).unwrap();
    let gw = spawn_axum(
        Router::new()
            .nest_service("/up", forward)
            .layer(tower_gateway_auth::RejectionLayer::new().error_format(ErrorFormat::Anthropic)),
    )
    .await;
    let a = send(&client(), get(gw, "/up/x", &[])).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.json()["error"]["type"], "api_error");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached")
    );

    let never = Arc::new(Notify::new());
    let wait = never.clone();
    let silent = spawn_axum(Router::new().fallback(move || {
        let wait = wait.clone();
        async move {
            wait.notified().await;
            "too late"
        }
    }))
    .await;
    let forward = Forward::builder(&format!("http://{silent}"))
        .unwrap()
        .response_timeout(Duration::from_millis(300))
        .build();
    let gw = gateway(forward).await;
    let a = send(&client(), get(gw, "/up/x", &[])).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.json()["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn server_sent_events_stream_event_by_event() {
    // The upstream sends its first event, then waits for the test to have received it before
    // sending the last one: if the proxy buffered, the test would never see the first event.
    let go_on = Arc::new(Notify::new());
    let release = go_on.clone();
    let app = Router::new().fallback(move || {
        let body = gated_body(
            b"data: {\"delta\":\"Hel\"}\n\n",
            b"data: {\"delta\":\"lo\"}\n\ndata: [DONE]\n\n",
            go_on.clone(),
        );
        async move {
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    });
    let upstream = spawn_axum(app).await;
    let gw = gateway(Forward::new(&format!("http://{upstream}")).unwrap()).await;
    let response = client()
        .request(get(gw, "/up/v1/chat/completions", &[]))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: {\"delta\":\"Hel\"}\n\n");
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            rest.extend_from_slice(&data);
        }
    }
    assert_eq!(rest, b"data: {\"delta\":\"lo\"}\n\ndata: [DONE]\n\n");
}

/// Serves the echo app over TLS with a fresh self-signed certificate for `localhost`;
/// returns the port and the certificate.
async fn tls_echo_upstream() -> (u16, rustls::pki_types::CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().fallback(|req: AxumRequest| async move {
        axum::Json(serde_json::json!({"path": req.uri().path(), "version": format!("{:?}", req.version())}))
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (port, cert)
}

#[tokio::test]
async fn https_upstreams_work_and_certificates_are_checked() {
    let (port, cert) = tls_echo_upstream().await;
    let upstream = format!("https://localhost:{port}/base");

    let trusting = Forward::builder(&upstream)
        .unwrap()
        .add_root_certificate(cert)
        .build();
    let gw = gateway(trusting).await;
    let a = send(&client(), get(gw, "/up/v1/models", &[])).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["path"], "/base/v1/models");
    assert_eq!(a.json()["version"], "HTTP/2.0", "ALPN picked HTTP/2");

    // The same upstream without its certificate among the trusted roots is refused.
    let gw = gateway(Forward::new(&upstream).unwrap()).await;
    let a = send(&client(), get(gw, "/up/v1/models", &[])).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
}

/// Accepts connections on 127.0.0.1:0, counting them, and serves each with `serve` on a task
/// of its own.
async fn counting_listener<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

/// An upstream that counts the TCP connections it accepts, serving `app` on each.
async fn counting_upstream(app: Router) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    counting_listener(move |stream| {
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// A streamed body: `first`, then `rest` once `go_on` is notified.
fn gated_body(first: &'static [u8], rest: &'static [u8], go_on: Arc<Notify>) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(2);
    tokio::spawn(async move {
        tx.send(Ok(Bytes::from_static(first))).await.unwrap();
        go_on.notified().await;
        // The reader may be gone by now (a body dropped half-read).
        let _ = tx.send(Ok(Bytes::from_static(rest))).await;
    });
    Body::from_stream(support::ReceiverStream(rx))
}

/// A body of `chunks`, sent as separate frames (so chunked on the wire).
fn streamed(chunks: &'static [&'static str]) -> Body {
    let frames = chunks
        .iter()
        .map(|c| Ok::<_, Infallible>(Bytes::from_static(c.as_bytes())));
    let (tx, rx) = mpsc::channel(chunks.len());
    for frame in frames {
        tx.try_send(frame).unwrap();
    }
    Body::from_stream(support::ReceiverStream(rx))
}

#[tokio::test]
async fn http1_connections_are_reused_once_their_body_is_read() {
    let app = Router::new()
        .route("/sized", axum::routing::get(|| async { "sized body" }))
        .route(
            "/chunked",
            axum::routing::get(|| async { streamed(&["chunked ", "body"]) }),
        )
        .route(
            "/empty",
            axum::routing::get(|| async { StatusCode::NO_CONTENT }),
        );
    let (upstream, accepted) = counting_upstream(app).await;
    let gw = gateway(Forward::new(&format!("http://{upstream}")).unwrap()).await;
    let client = client();
    for round in 0..5 {
        let sized = send(&client, get(gw, "/up/sized", &[])).await;
        assert_eq!((sized.status, sized.text()), (StatusCode::OK, "sized body"));
        let chunked = send(&client, get(gw, "/up/chunked", &[])).await;
        assert_eq!(chunked.text(), "chunked body", "round {round}");
        let empty = send(&client, get(gw, "/up/empty", &[])).await;
        assert_eq!(empty.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for 15 exchanges"
    );

    // Concurrent requests each get a connection of their own, and they all go back.
    let all: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { send(&client, get(gw, "/up/sized", &[])).await })
        })
        .collect();
    for answer in all {
        assert_eq!(answer.await.unwrap().text(), "sized body");
    }
    let opened = accepted.load(Ordering::SeqCst);
    assert!((1..=8).contains(&opened), "{opened} connections");
    for _ in 0..8 {
        assert_eq!(
            send(&client, get(gw, "/up/sized", &[])).await.text(),
            "sized body"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        opened,
        "pooled connections reused"
    );
}

#[tokio::test]
async fn a_body_dropped_half_read_does_not_leave_its_rest_to_the_next_request() {
    let go_on = Arc::new(Notify::new());
    let release = go_on.clone();
    let app = Router::new()
        .route("/sized", axum::routing::get(|| async { "sized body" }))
        .route(
            "/slow",
            axum::routing::get(move || {
                let body = gated_body(b"first part;", b"LEFTOVER", go_on.clone());
                async move { body }
            }),
        );
    let (upstream, accepted) = counting_upstream(app).await;
    let gw = gateway(Forward::new(&format!("http://{upstream}")).unwrap()).await;
    let client = client();
    let response = client.request(get(gw, "/up/slow", &[])).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first part;");
    drop(body);
    release.notify_one();
    for _ in 0..3 {
        let next = send(&client, get(gw, "/up/sized", &[])).await;
        assert_eq!((next.status, next.text()), (StatusCode::OK, "sized body"));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the half-read connection was closed, the next one reused"
    );
}

/// An upstream speaking raw HTTP/1.1 that answers one request per connection and then closes
/// it, without saying so in a `Connection: close` header when `announce` is false.
async fn one_shot_upstream(announce: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    counting_listener(move |mut stream| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let close = if announce {
            "connection: close\r\n"
        } else {
            ""
        };
        let response = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{close}\r\nok");
        let _ = stream.write_all(response.as_bytes()).await;
        // Dropped: closed right after the answer.
    })
    .await
}

#[tokio::test]
async fn upstreams_that_close_connections_cost_no_request() {
    for announce in [true, false] {
        let (upstream, accepted) = one_shot_upstream(announce).await;
        let gw = gateway(Forward::new(&format!("http://{upstream}")).unwrap()).await;
        let client = client();
        for i in 0..5 {
            let answer = send(&client, get(gw, "/up/x", &[])).await;
            assert_eq!(
                (answer.status, answer.text()),
                (StatusCode::OK, "ok"),
                "request {i}, connection: close announced: {announce}"
            );
            // The close of an unannounced one reaches the gateway while the connection idles.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }
}

// --- Issue 11: what a client must not be able to do through the proxy --------------------

const PROVIDER_SECRET: &str = "sk-provider-secret-0123";

/// A gateway stack on loopback without the inbound layer: every request gets the identity
/// `caller`, then the provider credential (OpenAI with organization and project), a request
/// id, and goes to `upstream` through `Forward`.
async fn credentialed_stack(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    use tower::ServiceBuilder;
    use tower_gateway_auth::inject::RequestId;
    use tower_gateway_auth::upstream::{Credential, Provider};
    use tower_gateway_auth::{HeaderInjectLayer, UpstreamAuthLayer};
    let provider = Provider::openai()
        .organization(http::HeaderValue::from_static("org-gateway"))
        .project(http::HeaderValue::from_static("proj-gateway"));
    let stack = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(UpstreamAuthLayer::new(
            provider,
            Credential::new(PROVIDER_SECRET).unwrap(),
        ))
        .layer(HeaderInjectLayer::new().request_id(RequestId::new().echo(true)))
        .service(support::forward_to(upstream));
    support::spawn_service(stack).await
}

#[tokio::test]
async fn a_client_connection_header_cannot_remove_what_the_layers_set() {
    let (upstream, seen) = support::spawn_upstream().await;
    let gw = credentialed_stack(upstream).await;
    let a = send(
        &client(),
        get(
            gw,
            "/v1/models",
            &[(
                "connection",
                "authorization, openai-organization, openai-project, x-request-id",
            )],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = seen.last();
    assert_eq!(
        got.headers
            .get("authorization")
            .map(|v| v.to_str().unwrap()),
        Some(format!("Bearer {PROVIDER_SECRET}").as_str()),
        "the provider credential was removed after the layer set it:\n{}",
        got.everything()
    );
    assert_eq!(got.headers["openai-organization"], "org-gateway");
    assert_eq!(got.headers["openai-project"], "proj-gateway");
    assert_eq!(got.headers["x-request-id"], a.headers["x-request-id"]);
}

/// Raw request targets that try to leave the base path, with how they are spelled.
const ESCAPES: &[&str] = &[
    "/../other/v1/models",
    "/v1/../../other",
    "/%2e%2e/other",
    "/%2E%2E/other",
    "/%2e%2E/other",
    "/.%2e/other",
    "/%2e./other",
    "/v1/%2e%2e",
    "/..%2fother",
    "/..%2Fother",
    "/..%5cother",
    "/..\\other",
    "/..;/other",
    "/%2e%2e;x=1/other",
];

#[tokio::test]
async fn forward_refuses_a_path_that_would_leave_its_base() {
    let (upstream, seen) = support::spawn_upstream().await;
    let forward = Forward::new(&format!("http://{upstream}/base")).unwrap();
    let gw = support::spawn_service(forward).await;
    for target in ESCAPES {
        let request = format!("GET {target} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n");
        let answer = support::raw_exchange(gw, request.as_bytes()).await;
        assert_eq!(support::raw_status(&answer), 400, "{target}: {answer}");
    }
    assert_eq!(
        seen.count(),
        0,
        "a path outside the base reached the upstream: {:?}",
        seen.all()
            .iter()
            .map(|s| s.uri.to_string())
            .collect::<Vec<_>>()
    );
    // Dots inside a segment are just names.
    let answer = support::raw_exchange(
        gw,
        b"GET /v1/files/a..b/.well-known/x.json HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(support::raw_status(&answer), 200, "{answer}");
    assert_eq!(seen.last().uri, "/base/v1/files/a..b/.well-known/x.json");
}

#[tokio::test]
async fn upstream_failures_name_the_request_id_and_not_the_upstream() {
    use tower::ServiceBuilder;
    use tower_gateway_auth::HeaderInjectLayer;
    use tower_gateway_auth::inject::RequestId;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let never = Arc::new(Notify::new());
    let wait = never.clone();
    let silent = spawn_axum(Router::new().fallback(move || {
        let wait = wait.clone();
        async move {
            wait.notified().await;
            "too late"
        }
    }))
    .await;
    // What is logged instead is checked in tests/no_secrets.rs, where every test captures
    // logs (a callsite first hit by a test without a subscriber can miss a capture).
    for (upstream, status) in [
        (closed, StatusCode::BAD_GATEWAY),
        (silent, StatusCode::GATEWAY_TIMEOUT),
    ] {
        let forward = Forward::builder(&format!("http://{upstream}"))
            .unwrap()
            .response_timeout(Duration::from_millis(300))
            .build();
        let stack = ServiceBuilder::new()
            .layer(HeaderInjectLayer::new().request_id(RequestId::new().echo(true)))
            .service(forward);
        let gw = support::spawn_service(stack).await;
        let a = send(&client(), get(gw, "/v1/models", &[])).await;
        assert_eq!(a.status, status);
        let body = a.text();
        let id = a.headers["x-request-id"].to_str().unwrap();
        for leaked in [
            upstream.to_string(),
            upstream.port().to_string(),
            "127.0.0.1".to_owned(),
            "refused".to_owned(),
            "connect".to_owned(),
        ] {
            assert!(
                !body.contains(&leaked),
                "{status}: the body names `{leaked}`: {body}"
            );
        }
        assert!(
            body.contains(id),
            "{status}: the body lacks the request id {id}: {body}"
        );
    }
    drop(never);
}

#[tokio::test]
async fn an_upstream_head_past_the_read_buffer_bound_is_502_and_the_pool_recovers() {
    // A pooled HTTP/1.1 connection's read buffer stops growing at 64 KiB (up to twice that
    // on its last growth): a larger response head is a clear 502, never a hang, and the
    // next request goes through.
    let upstream = spawn_axum(Router::new().fallback(|req: AxumRequest| async move {
        match req.uri().path() {
            "/huge" => ([("x-huge", "h".repeat(300_000))], "never seen").into_response(),
            _ => "fine".into_response(),
        }
    }))
    .await;
    let gw = gateway(support::forward_to(upstream)).await;
    let a = tokio::time::timeout(
        Duration::from_secs(10),
        send(&client(), get(gw, "/up/huge", &[])),
    )
    .await
    .expect("an oversized upstream head must not hang the request");
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert!(!a.text().contains("never seen"));
    assert!(!a.headers.contains_key("x-huge"));
    let b = send(&client(), get(gw, "/up/small", &[])).await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.text(), "fine");
}
