//! `Forward` between a real client and a real upstream on loopback: what the upstream
//! receives, what comes back, streaming, and failures.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::response::Response;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{client, get, send, spawn_axum};
use tokio::sync::{Notify, mpsc};
use tower_gateway_auth::ErrorFormat;
use tower_gateway_auth::proxy::Forward;

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
    let gw = gateway(Forward::new(&format!("http://{upstream}/base")).unwrap()).await;
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
    let forward = Forward::builder(&format!("http://{closed}"))
        .unwrap()
        .error_format(ErrorFormat::Anthropic)
        .build();
    let gw = gateway(forward).await;
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
        let go_on = go_on.clone();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(4);
            tokio::spawn(async move {
                tx.send(Ok(Bytes::from_static(b"data: {\"delta\":\"Hel\"}\n\n")))
                    .await
                    .unwrap();
                go_on.notified().await;
                tx.send(Ok(Bytes::from_static(
                    b"data: {\"delta\":\"lo\"}\n\ndata: [DONE]\n\n",
                )))
                .await
                .unwrap();
            });
            let stream = support::ReceiverStream(rx);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
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
