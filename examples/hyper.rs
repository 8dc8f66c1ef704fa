//! A plain hyper server (no framework) behind `InboundApiKeyLayer`.
//!
//! ```text
//! cargo run --example hyper
//! curl -H "x-api-key: <printed key>" http://127.0.0.1:3001/
//! ```

use std::convert::Infallible;

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_gateway_auth::keys::{KeyManager, NewKey};
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::{Identity, InboundApiKeyLayer};

#[tokio::main]
async fn main() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let issued = KeyManager::new(store.clone())
        .issue(NewKey::named("demo"))
        .await
        .unwrap();

    let service = ServiceBuilder::new()
        .layer(InboundApiKeyLayer::from_shared(store))
        .service_fn(|req: Request<Incoming>| async move {
            let who = req
                .extensions()
                .get::<Identity>()
                .expect("the layer put it there");
            let text = format!("hello {} ({})\n", who.name(), who.id());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001")
        .await
        .unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    println!("your key (shown once): {}", issued.key.expose());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
