//! Helpers shared by the integration tests: recording inner services, real loopback
//! servers and a real HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_gateway_auth::{Identity, KeyId, KeyRecord, KeyStore, MemoryStore};

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

/// Serves `app` on 127.0.0.1:0; returns the bound address.
pub async fn spawn_axum(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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
