//! Helpers shared by the integration tests: recording inner services, real loopback
//! servers and a real HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod redis;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_gateway_auth::Identity;
use tower_gateway_auth::keys::{KeyId, KeyRecord};
use tower_gateway_auth::store::{KeyStore, MemoryStore};

/// What an inner service saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub uri: Uri,
    pub headers: HeaderMap,
    pub identity: Option<Identity>,
}

/// Every request that reached the inner service.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    pub fn record<B>(&self, req: &Request<B>) {
        self.0.lock().unwrap().push(Seen {
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            identity: req.extensions().get::<Identity>().cloned(),
        });
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.0
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the inner service was never called")
    }

    /// An inner service that records each request and answers 200 "ok".
    pub fn service(&self) -> Recording {
        Recording(self.clone())
    }
}

/// See [`Recorder::service`].
#[derive(Debug, Clone)]
pub struct Recording(Recorder);

impl<B> tower::Service<Request<B>> for Recording {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.0.record(&req);
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

/// A memory store holding `keys` (name, key, scopes).
pub fn store_with(keys: &[(&str, &str, &[&str])]) -> Arc<MemoryStore> {
    let store = MemoryStore::new();
    for (name, key, scopes) in keys {
        let digest = store.hasher().digest(key.as_bytes());
        store.insert(
            KeyRecord::new(KeyId::random(), digest)
                .with_name(*name)
                .with_scopes(scopes.iter().copied()),
        );
    }
    Arc::new(store)
}

/// Serves `app` (a `Router`, or any service axum can serve) on 127.0.0.1:0; returns the bound
/// address.
pub async fn spawn_axum<S>(app: S) -> SocketAddr
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tower::make::Shared::new(app);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, fully read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// Sends `req` with a real client and reads the whole response.
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Answer {
    let response = client.request(req).await.expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A GET to `addr` + `path_and_query` with `headers`.
pub fn get(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut req = Request::builder().uri(format!("http://{addr}{path_and_query}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

/// Reads a oneshot response whose body is a `ResponseBody`.
pub async fn read<B>(response: Response<B>) -> Answer
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Headers every HTTP client adds on its own; left out of [`Seen::header_pairs`] so tests
/// can compare the rest exactly.
const TRANSPORT_HEADERS: [&str; 3] = ["host", "content-length", "transfer-encoding"];

impl Seen {
    /// Every header but the transport ones, as sorted `(name, value)` pairs.
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(name, _)| !TRANSPORT_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        pairs.sort();
        pairs
    }

    /// The URI and every header, as one text to search for leaked secrets.
    pub fn everything(&self) -> String {
        let mut text = self.uri.to_string();
        for (name, value) in &self.headers {
            text.push('\n');
            text.push_str(name.as_str());
            text.push_str(": ");
            text.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        text
    }
}

/// `(name, value)` pairs as owned, sorted strings, to compare with [`Seen::header_pairs`].
pub fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = expected
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    pairs.sort();
    pairs
}

/// The request id a recording upstream answers with, as providers do.
pub const UPSTREAM_REQUEST_ID: &str = "req_upstream";

/// A provider stand-in on 127.0.0.1:0: records every request and answers 200 "upstream ok"
/// with its own `x-request-id`.
pub async fn spawn_upstream() -> (SocketAddr, Recorder) {
    let rec = Recorder::default();
    let recording = rec.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        recording.record(&req);
        async { ([("x-request-id", UPSTREAM_REQUEST_ID)], "upstream ok") }
    });
    (spawn_axum(app).await, rec)
}

/// The proxy at the bottom of a gateway stack: the library's own, to `upstream`.
pub fn forward_to(upstream: SocketAddr) -> tower_gateway_auth::proxy::Forward {
    tower_gateway_auth::proxy::Forward::new(&format!("http://{upstream}")).unwrap()
}

/// Serves any tower service (a whole gateway stack) on 127.0.0.1:0 with hyper, HTTP/1.1
/// upgrades (WebSockets) included, as the gateway does.
pub async fn spawn_service<S, B>(service: S) -> SocketAddr
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                    .ok();
            });
        }
    });
    addr
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tga-{tag}-{}-{}",
            std::process::id(),
            KeyId::random()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn file(&self) -> std::path::PathBuf {
        self.0.join("keys.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The status a request with `key` in `x-api-key` gets from the inbound layer over `store`.
pub async fn key_status<K>(store: K, key: &str) -> StatusCode
where
    K: tower_gateway_auth::store::KeyStore,
{
    use tower::ServiceExt;
    let svc = tower::ServiceBuilder::new()
        .layer(tower_gateway_auth::InboundApiKeyLayer::new(store))
        .service(Recorder::default().service());
    let req = Request::builder()
        .header("x-api-key", key)
        .body(())
        .unwrap();
    read(svc.oneshot(req).await.unwrap()).await.status
}

/// An mpsc receiver as a body stream, so an upstream can send events when the test says.
pub struct ReceiverStream(pub tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<Bytes, Infallible>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().0.poll_recv(cx)
    }
}

/// Everything `tracing` prints at any level while the returned guard lives (this thread).
pub fn capture_logs() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// Where [`capture_logs`] writes.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Sends `request` as raw bytes on a fresh TCP connection and reads until the server closes
/// it (or 5 s pass): for requests a real client would refuse to send (dot segments,
/// backslashes) and for watching what a server does with a partial request.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await;
    if read.is_err() && response.is_empty() {
        panic!(
            "no answer within 5 s to {:?}",
            String::from_utf8_lossy(request)
        );
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The body of a raw HTTP/1.1 response sent with `Content-Length`.
pub fn raw_body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// `Identity` for a fresh key record named `name`, as the inbound layer would set it.
pub fn identity(name: &str) -> Identity {
    let store = MemoryStore::new();
    let digest = store.hasher().digest(name.as_bytes());
    Identity::new(Arc::new(
        KeyRecord::new(KeyId::random(), digest).with_name(name),
    ))
}

/// `req` as the inbound layer passes on a verified caller: with an [`Identity`].
pub fn with_identity<B>(mut req: Request<B>) -> Request<B> {
    req.extensions_mut().insert(identity("caller"));
    req
}

/// What the upstream received of one request.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream answering every request with `body` (as `content_type`), written in pieces
/// of `piece` bytes with a pause between them, so that the gateway reads it in many reads;
/// it records what it received.
pub async fn spawn_canned(
    content_type: &'static str,
    body: &'static [u8],
    piece: usize,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app =
        axum::Router::new().fallback(axum::routing::any(move |req: axum::extract::Request| {
            let record = record.clone();
            async move {
                let (parts, body_in) = req.into_parts();
                let bytes = axum::body::to_bytes(body_in, usize::MAX).await.unwrap();
                record.lock().unwrap().push(Received {
                    headers: parts.headers,
                    body: bytes,
                });
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
                tokio::spawn(async move {
                    for chunk in body.chunks(piece) {
                        if tx.send(Ok(Bytes::from_static(chunk))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                });
                http::Response::builder()
                    .header("content-type", content_type)
                    .body(axum::body::Body::from_stream(ReceiverStream(rx)))
                    .unwrap()
            }
        }));
    (spawn_axum(app).await, seen)
}
