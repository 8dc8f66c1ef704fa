//! A tonic gRPC server (the standard health service) behind `InboundApiKeyLayer`: clients
//! without a valid key get `UNAUTHENTICATED`, keys without the `health` scope
//! `PERMISSION_DENIED`.
//!
//! ```text
//! cargo run --example tonic
//! grpcurl -plaintext -H "authorization: Bearer <printed key>" 127.0.0.1:3002 grpc.health.v1.Health/Check
//! ```

use std::sync::Arc;

use tonic::transport::Server;
use tower_gateway_auth::InboundApiKeyLayer;
use tower_gateway_auth::keys::{KeyManager, NewKey};
use tower_gateway_auth::store::MemoryStore;

#[tokio::main]
async fn main() {
    let store = Arc::new(MemoryStore::new());
    let issued = KeyManager::new(store.clone())
        .issue(NewKey::named("grpc-client").scopes(["health"]))
        .await
        .unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let addr = "127.0.0.1:3002".parse().unwrap();
    println!("gRPC health service on {addr}");
    println!("your key (shown once): {}", issued.key.expose());
    Server::builder()
        .layer(InboundApiKeyLayer::from_shared(store).require_scopes(["health"]))
        .add_service(health)
        .serve(addr)
        .await
        .unwrap();
}
