//! When each key was last used, on every store: through the inbound layer on a real server,
//! written once a minute per key however busy the key, kept apart from the records (no
//! record changes, so no cache invalidation and no CAS conflict), dropped with the key.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use support::{TempDir, client, get as get_req, send, spawn_axum};
use tower_gateway_auth::InboundApiKeyLayer;
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{KeyManager, LastUsed, NewKey};
use tower_gateway_auth::store::{FileStore, KeyAdmin, MemoryStore, RedisStore};

const START: u64 = 1_900_000_010;

/// Serves a route behind `store` noting uses; 100 requests with one key in one minute, one
/// a minute later; checks what the store recorded, and that its record did not change.
async fn uses_are_recorded_to_the_minute<S: KeyAdmin>(store: Arc<S>) {
    let clock = ManualClock::new(Timestamp::from_unix_secs(START));
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let issued = manager.issue(NewKey::named("busy")).await.unwrap();
    let idle = manager.issue(NewKey::named("idle")).await.unwrap();
    let uses = LastUsed::builder(store.clone())
        .clock(clock.clone())
        .flush_every(Duration::from_secs(3600))
        .build();
    let app = Router::new().route("/v1/x", get(|| async { "ok" })).layer(
        InboundApiKeyLayer::from_shared(store.clone())
            .clock(clock.clone())
            .last_used(&uses),
    );
    let addr = spawn_axum(app).await;
    let http = client();
    let auth = format!("Bearer {}", issued.key.expose());
    for _ in 0..100 {
        let answer = send(&http, get_req(addr, "/v1/x", &[("authorization", &auth)])).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let wrong = send(
        &http,
        get_req(addr, "/v1/x", &[("authorization", "Bearer gw_nope")]),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let ids = vec![issued.record.id(), idle.record.id()];
    assert_eq!(
        store.last_used(ids.clone()).await.unwrap(),
        vec![None, None],
        "nothing written on the request path"
    );
    uses.flush().await.unwrap();
    let minute = Timestamp::from_unix_secs(START / 60 * 60);
    assert_eq!(
        store.last_used(ids.clone()).await.unwrap(),
        vec![Some(minute), None]
    );
    // The record itself is untouched: last use is not access configuration.
    assert_eq!(
        *store.get(issued.record.id()).await.unwrap().unwrap(),
        *issued.record
    );

    clock.advance(Duration::from_secs(90));
    let answer = send(&http, get_req(addr, "/v1/x", &[("authorization", &auth)])).await;
    assert_eq!(answer.status, StatusCode::OK);
    uses.flush().await.unwrap();
    let later = Timestamp::from_unix_secs((START + 90) / 60 * 60);
    assert_eq!(
        store.last_used(ids.clone()).await.unwrap(),
        vec![Some(later), None]
    );
    // An earlier time never replaces a later one (another replica's late batch).
    store
        .note_uses(vec![(issued.record.id(), minute)])
        .await
        .unwrap();
    assert_eq!(store.last_used(ids.clone()).await.unwrap()[0], Some(later));

    manager.delete(issued.record.id()).await.unwrap();
    assert_eq!(store.last_used(ids).await.unwrap(), vec![None, None]);
}

#[tokio::test]
async fn memory_store_records_last_use() {
    uses_are_recorded_to_the_minute(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn file_store_records_last_use_beside_the_key_file_and_keeps_it_across_reopening() {
    let dir = TempDir::new("last-used");
    let store = Arc::new(FileStore::open(dir.file()).unwrap());
    uses_are_recorded_to_the_minute(store.clone()).await;

    let manager = KeyManager::new(store.clone());
    let kept = manager.issue(NewKey::named("kept")).await.unwrap();
    let at = Timestamp::from_unix_secs(START / 60 * 60);
    store.note_uses(vec![(kept.record.id(), at)]).await.unwrap();
    let before = std::fs::read(dir.file()).unwrap();
    let reopened = FileStore::open(dir.file()).unwrap();
    assert_eq!(
        reopened.last_used(vec![kept.record.id()]).await.unwrap(),
        vec![Some(at)]
    );
    assert_eq!(
        std::fs::read(dir.file()).unwrap(),
        before,
        "the key file is not rewritten"
    );
    let side = std::fs::read_to_string(dir.0.join("keys.json.last-used")).unwrap();
    assert!(side.contains(&kept.record.id().to_string()));
    assert!(!side.contains(kept.key.expose()), "no key at rest");
}

#[tokio::test]
async fn cached_redis_store_records_last_use() {
    let Some((url, _server)) = support::redis::redis_url() else {
        return;
    };
    let store = RedisStore::builder(url)
        .namespace(support::redis::namespace())
        .connect()
        .await
        .unwrap();
    uses_are_recorded_to_the_minute(Arc::new(store.cached())).await;
}
