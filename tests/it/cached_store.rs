//! CachedStore in front of a store that can be slowed down, broken and counted: hits, the
//! negative cache, single flight, serving stale records within a bound, invalidation.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::sync::Notify;
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{KeyDigest, KeyHasher, KeyId, KeyRecord, KeyStatus};
use tower_gateway_auth::store::{BoxLookup, CachedStore, KeyStore, MemoryStore, StoreError};

/// A store behind a switch: counted, optionally failing, optionally held at a gate.
#[derive(Clone, Default)]
struct Backend {
    keys: Arc<MemoryStore>,
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    gate: Arc<std::sync::Mutex<Option<Arc<Notify>>>>,
}

impl KeyStore for Backend {
    type Lookup = BoxLookup;

    fn lookup(&self, digest: &KeyDigest) -> BoxLookup {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        let digest = *digest;
        Box::pin(async move {
            let gate = me.gate.lock().unwrap().clone();
            if let Some(gate) = gate {
                gate.notified().await;
            }
            if me.failing.load(Ordering::SeqCst) {
                return Err(StoreError::new("backend down"));
            }
            Ok(me.keys.lookup_now(&digest))
        })
    }
}

impl Backend {
    fn add(&self, key: &str) -> Arc<KeyRecord> {
        self.keys.insert(KeyRecord::new(
            KeyId::random(),
            KeyHasher::sha256().digest(key.as_bytes()),
        ))
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

const T0: u64 = 1_800_000_000;

fn cache(backend: &Backend, clock: &ManualClock) -> CachedStore<Backend> {
    CachedStore::builder(backend.clone())
        .ttl(Duration::from_secs(30))
        .negative_ttl(Duration::from_secs(5))
        .max_staleness(Duration::from_secs(300))
        .clock(clock.clone())
        .build()
}

async fn status(store: &CachedStore<Backend>, key: &str) -> StatusCode {
    support::key_status(store.clone(), key).await
}

#[tokio::test]
async fn hits_are_served_from_memory_until_the_ttl() {
    let backend = Backend::default();
    backend.add("k-alice");
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = cache(&backend, &clock);
    for _ in 0..100 {
        assert_eq!(status(&store, "k-alice").await, StatusCode::OK);
    }
    assert_eq!(backend.calls(), 1);
    clock.advance(Duration::from_secs(29));
    assert_eq!(status(&store, "k-alice").await, StatusCode::OK);
    assert_eq!(backend.calls(), 1);
    clock.advance(Duration::from_secs(1));
    assert_eq!(status(&store, "k-alice").await, StatusCode::OK);
    assert_eq!(backend.calls(), 2, "refreshed after the ttl");
}

#[tokio::test]
async fn ten_thousand_requests_with_one_unknown_key_reach_the_store_a_handful_of_times() {
    let backend = Backend::default();
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = cache(&backend, &clock);
    for i in 0..10_000 {
        // Twenty seconds pass over the run: the 5-second negative entry expires four times.
        if i % 500 == 499 {
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(status(&store, "gw_unknown").await, StatusCode::UNAUTHORIZED);
    }
    let calls = backend.calls();
    assert!((1..=5).contains(&calls), "{calls} store calls");
    assert_eq!(store.store_lookups() as usize, calls);
}

#[tokio::test]
async fn concurrent_misses_on_one_key_make_one_store_call() {
    let backend = Backend::default();
    backend.add("k-busy");
    let gate = Arc::new(Notify::new());
    *backend.gate.lock().unwrap() = Some(gate.clone());
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = cache(&backend, &clock);
    let waiting: Vec<_> = (0..100)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { status(&store, "k-busy").await })
        })
        .collect();
    // Let every request reach the cache before the one store call answers.
    while backend.calls() == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    gate.notify_waiters();
    gate.notify_one();
    for w in waiting {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn a_failing_store_is_covered_within_the_staleness_bound_and_no_further() {
    let backend = Backend::default();
    backend.add("k-known");
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = cache(&backend, &clock);
    assert_eq!(status(&store, "k-known").await, StatusCode::OK);
    backend.failing.store(true, Ordering::SeqCst);

    clock.advance(Duration::from_secs(60));
    assert_eq!(
        status(&store, "k-known").await,
        StatusCode::OK,
        "stale but within 300 s"
    );
    assert_eq!(
        status(&store, "k-never-seen").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    clock.advance(Duration::from_secs(241));
    assert_eq!(
        status(&store, "k-known").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "beyond the bound"
    );

    backend.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        status(&store, "k-known").await,
        StatusCode::OK,
        "recovers with the store"
    );
    assert_eq!(
        status(&store, "k-never-seen").await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn invalidation_takes_effect_at_once_and_beats_a_lookup_in_flight() {
    let backend = Backend::default();
    let record = backend.add("k-revoked-soon");
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = cache(&backend, &clock);
    assert_eq!(status(&store, "k-revoked-soon").await, StatusCode::OK);

    backend
        .keys
        .insert((*record).clone().with_status(KeyStatus::Revoked));
    assert_eq!(
        status(&store, "k-revoked-soon").await,
        StatusCode::OK,
        "cached until told"
    );
    store.invalidate(record.digest());
    assert_eq!(
        status(&store, "k-revoked-soon").await,
        StatusCode::UNAUTHORIZED
    );

    // A lookup under way when an invalidation arrives neither serves nor caches what it
    // read before: it asks the store again, and caches that.
    let fresh = backend.add("k-racing");
    let gate = Arc::new(Notify::new());
    *backend.gate.lock().unwrap() = Some(gate.clone());
    let pending = {
        let store = store.clone();
        tokio::spawn(async move { status(&store, "k-racing").await })
    };
    while backend.calls() < 3 {
        tokio::task::yield_now().await;
    }
    store.invalidate(fresh.digest());
    *backend.gate.lock().unwrap() = None;
    gate.notify_one();
    assert_eq!(pending.await.unwrap(), StatusCode::OK);
    assert_eq!(
        backend.calls(),
        4,
        "the answer read before the invalidation was asked again"
    );
    status(&store, "k-racing").await;
    assert_eq!(backend.calls(), 4, "the answer read after it was cached");
}

#[tokio::test]
async fn the_cache_stays_within_its_capacity() {
    let backend = Backend::default();
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = CachedStore::builder(backend.clone())
        .capacity(64, 32)
        .clock(clock.clone())
        .build();
    for i in 0..1_000 {
        backend.add(&format!("k-{i}"));
        status(&store, &format!("k-{i}")).await;
        status(&store, &format!("unknown-{i}")).await;
    }
    let (known, unknown) = store.cached();
    assert!(
        known <= 64 + 16 && unknown <= 32 + 16,
        "{known} known, {unknown} unknown"
    );
    assert!(known > 0 && unknown > 0);
}

/// A store whose answers are read when the call starts and handed back when the test says:
/// what a slow network store does.
#[derive(Clone, Default)]
struct Snapshotting {
    keys: Arc<MemoryStore>,
    release: Arc<Notify>,
    calls: Arc<AtomicUsize>,
}

impl KeyStore for Snapshotting {
    type Lookup = BoxLookup;

    fn lookup(&self, digest: &KeyDigest) -> BoxLookup {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = self.keys.lookup_now(digest);
        let release = self.release.clone();
        Box::pin(async move {
            // Only the first call is held back; later ones answer at once.
            if n == 0 {
                release.notified().await;
            }
            Ok(answer)
        })
    }
}

/// Reproduces the race of issue 11: a lookup that starts after an invalidation must not join
/// a fetch that started before it, and that fetch's answer must not be cached.
async fn no_answer_from_before_an_invalidation(revoke: bool) {
    let backend = Snapshotting::default();
    let digest = KeyHasher::sha256().digest(b"k-race");
    let record = KeyRecord::new(KeyId::random(), digest);
    if revoke {
        backend.keys.insert(record.clone());
    }
    let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
    let store = CachedStore::builder(backend.clone())
        .clock(clock.clone())
        .build();
    // A lookup starts and reads the old state; its answer is held back.
    let early = tokio::spawn({
        let store = store.clone();
        async move { store.lookup(&digest).await.unwrap() }
    });
    while backend.calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // The key changes (revoked, or newly issued) and the cache is told.
    if revoke {
        backend
            .keys
            .insert(record.clone().with_status(KeyStatus::Revoked));
    } else {
        backend.keys.insert(record.clone());
    }
    store.invalidate(&digest);
    // A lookup that starts now must see the new state...
    let late = tokio::spawn({
        let store = store.clone();
        async move { store.lookup(&digest).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    backend.release.notify_one();
    let late = late.await.unwrap();
    let _ = early.await.unwrap();
    let expect = |found: Option<Arc<KeyRecord>>, when: &str| {
        if revoke {
            assert_eq!(
                found.map(|r| r.status()),
                Some(KeyStatus::Revoked),
                "{when}"
            );
        } else {
            assert!(found.is_some(), "{when}: a new key cached as unknown");
        }
    };
    expect(late, "the lookup that started after invalidate");
    // ... and so must every later one, from the cache.
    for _ in 0..3 {
        expect(store.lookup(&digest).await.unwrap(), "a later lookup");
    }
}

#[tokio::test]
async fn a_revocation_is_never_undone_by_a_fetch_that_started_before_it() {
    no_answer_from_before_an_invalidation(true).await;
}

#[tokio::test]
async fn a_new_key_is_never_cached_as_unknown_by_a_fetch_that_started_before_it() {
    no_answer_from_before_an_invalidation(false).await;
}
