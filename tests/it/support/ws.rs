//! WebSocket test parts: a real echo upstream (tokio-tungstenite) that records what it
//! received, and a real client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What the echo upstream saw of one socket.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub path: String,
    pub headers: HeaderMap,
    /// Every text or binary message received, text as is, binary as `<N bytes>`.
    pub received: Vec<String>,
    /// The close frame the gateway sent, if one came: code and reason.
    pub close: Option<(u16, String)>,
    /// Whether the socket has ended.
    pub ended: bool,
}

/// Every socket the echo upstream accepted (and every handshake it refused, with
/// `ended` set and nothing received).
#[derive(Debug, Clone, Default)]
pub struct Sessions(pub Arc<Mutex<Vec<Session>>>);

impl Sessions {
    pub fn all(&self) -> Vec<Session> {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn last(&self) -> Session {
        self.all().pop().expect("no socket reached the upstream")
    }

    /// Waits (up to 5 s) until the last socket has ended, and returns it.
    pub async fn ended(&self) -> Session {
        for _ in 0..500 {
            if let Some(s) = self.all().pop().filter(|s| s.ended) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the upstream's socket never ended: {:?}", self.all());
    }
}

/// A WebSocket echo server on 127.0.0.1:0, standing in for a realtime API. It selects the
/// subprotocol `realtime` when offered (or, on `/bad-protocol`, one that was not offered),
/// refuses the handshake on `/refuse` with 403, and echoes every text or binary message.
/// A text message `close:<code>` makes it close with that code and reason `bye`;
/// `send:<n>` makes it send a binary message of `n` bytes.
pub async fn spawn_echo() -> (SocketAddr, Sessions) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sessions = Sessions::default();
    let record = sessions.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(echo(tcp, record.clone()));
        }
    });
    (addr, sessions)
}

async fn echo<S>(stream: S, sessions: Sessions)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let index = {
        let mut all = sessions.0.lock().unwrap();
        all.push(Session::default());
        all.len() - 1
    };
    let update = |f: &mut dyn FnMut(&mut Session)| f(&mut sessions.0.lock().unwrap()[index]);
    // tungstenite's callback type: its error is a whole response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        update(&mut |s| {
            s.path = req.uri().to_string();
            s.headers = req.headers().clone();
        });
        if req.uri().path() == "/refuse" {
            let mut refused = ErrorResponse::new(Some("refused upstream".to_owned()));
            *refused.status_mut() = StatusCode::FORBIDDEN;
            return Err(refused);
        }
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| v.to_str().unwrap().split(','))
            .map(|p| p.trim().to_owned())
            .collect::<Vec<_>>();
        if req.uri().path() == "/bad-protocol" {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("never-offered"),
            );
        } else if offered.iter().any(|p| p == "realtime") {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("realtime"),
            );
        }
        Ok(response)
    };
    // The upstream takes messages far larger than the gateway relays.
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let Ok(mut ws) = ws else {
        update(&mut |s| s.ended = true);
        return;
    };
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                update(&mut |s| s.received.push(text.to_string()));
                if let Some(code) = text.strip_prefix("close:") {
                    let frame = CloseFrame {
                        code: CloseCode::from(code.parse::<u16>().unwrap()),
                        reason: "bye".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                    continue;
                }
                if let Some(n) = text.strip_prefix("send:") {
                    let big = vec![7u8; n.parse().unwrap()];
                    if ws.send(Message::binary(big)).await.is_err() {
                        break;
                    }
                    continue;
                }
                if ws.send(Message::Text(text)).await.is_err() {
                    break;
                }
            }
            Ok(Message::Binary(data)) => {
                update(&mut |s| s.received.push(format!("<{} bytes>", data.len())));
                if ws.send(Message::Binary(data)).await.is_err() {
                    break;
                }
            }
            Ok(Message::Close(frame)) => {
                update(&mut |s| {
                    s.close = frame
                        .as_ref()
                        .map(|f| (u16::from(f.code), f.reason.to_string()));
                });
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    update(&mut |s| s.ended = true);
}

/// Like [`spawn_echo`], over TLS with a fresh self-signed certificate for `localhost`;
/// returns the port and the certificate.
pub async fn spawn_tls_echo() -> (u16, rustls::pki_types::CertificateDer<'static>, Sessions) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .unwrap();
    // h2 first: a client that offered it would get it, so the test shows the gateway asks
    // for HTTP/1.1 alone when it upgrades.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Sessions::default();
    let record = sessions.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    // No h2 offered (hyper-rustls offers no ALPN at all for HTTP/1.1 alone).
                    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    assert_ne!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN for an upgrade");
                    echo(tls, record).await;
                }
            });
        }
    });
    (port, cert, sessions)
}

pub type Client = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `ws://{addr}{path}` with `headers` (a `sec-websocket-protocol`
/// among them is offered, and the server's choice checked, as a browser does): the socket
/// and the `101`'s headers, or the status and body of the refusal.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, HeaderMap), (StatusCode, String)> {
    connect_with(addr, path, headers, WebSocketConfig::default()).await
}

/// [`connect`] with a client configuration (message limits).
pub async fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    config: WebSocketConfig,
) -> Result<(Client, HeaderMap), (StatusCode, String)> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await {
        Ok((ws, response)) => Ok((ws, response.headers().clone())),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = (*response)
                .into_body()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// The next text message (skipping pings and pongs), or panics after 5 s or on a close.
pub async fn next_text(ws: &mut Client) -> String {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no message within 5 s")
            .expect("the socket ended")
            .expect("the socket failed");
        match message {
            Message::Text(text) => return text.to_string(),
            Message::Binary(data) => return format!("<{} bytes>", data.len()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Waits (up to `within`) for the close frame the server sends, skipping messages: its
/// code and reason.
pub async fn close_of(ws: &mut Client, within: Duration) -> (u16, String) {
    let read = async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(e) => panic!("the socket failed before a close frame: {e}"),
            }
        }
        panic!("the socket ended without a close frame")
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| panic!("no close frame within {within:?}"))
}
