//! An axum app behind `InboundApiKeyLayer`, with one freshly generated key.
//!
//! ```text
//! cargo run --example axum
//! curl -H "x-api-key: <printed key>" http://127.0.0.1:3000/whoami
//! ```

use axum::{Router, routing::get};
use tower_gateway_auth::keys::{KeyId, KeyRecord};
use tower_gateway_auth::store::{KeyStore, MemoryStore};
use tower_gateway_auth::{Identity, InboundApiKeyLayer};

#[tokio::main]
async fn main() {
    let store = MemoryStore::new();
    let key = format!("gw_demo{}", KeyId::random().as_u64());
    let digest = store.hasher().digest(key.as_bytes());
    store.insert(KeyRecord::new(KeyId::random(), digest).with_name("demo"));

    let app = Router::new()
        .route(
            "/whoami",
            get(|who: Identity| async move { format!("hello {} ({})\n", who.name(), who.id()) }),
        )
        .layer(InboundApiKeyLayer::new(store));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
        .await
        .unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    println!("your key (shown once): {key}");
    axum::serve(listener, app).await.unwrap();
}
