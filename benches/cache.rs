//! What a `CachedStore` hit and miss cost, against `MemoryStore`'s lookup:
//! `cargo bench --bench cache`.
//!
//! Group `cache`, over 10,000 active keys of a 1,000,000-key store:
//! - `memory_lookup`: `MemoryStore::lookup`, the baseline;
//! - `cached_hit`: `CachedStore` in front of that store, every key already cached;
//! - `cached_miss`: the same with a zero TTL, so every lookup goes through the miss path
//!   (single flight, the store call, the cache update) to the in-memory store;
//! - `redis_miss`: a miss that reaches a real Redis (a round trip on loopback), when
//!   `REDIS_URL` is set or a `redis-server` can be started.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tower_gateway_auth::keys::{
    KeyDigest, KeyFormat, KeyHasher, KeyId, KeyManager, KeyRecord, NewKey,
};
use tower_gateway_auth::store::{CachedStore, KeyStore, MemoryStore, RedisStore};

const STORE_KEYS: usize = 1_000_000;
const ACTIVE_KEYS: usize = 10_000;

mod support;
use support::{now, redis};

fn store() -> (Arc<MemoryStore>, Vec<KeyDigest>) {
    let format = KeyFormat::new("gw").unwrap();
    let hasher = KeyHasher::sha256();
    let store = MemoryStore::new();
    let mut active = Vec::with_capacity(ACTIVE_KEYS);
    for i in 0..STORE_KEYS {
        let digest = hasher.digest(format.generate().expose().as_bytes());
        if i < ACTIVE_KEYS {
            active.push(digest);
        }
        store.insert(KeyRecord::new(KeyId::random(), digest).with_name(format!("k-{i}")));
    }
    (Arc::new(store), active)
}

fn cache(c: &mut Criterion) {
    // Misses arm a timeout, which needs a runtime to exist (not to run: they are polled here).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _context = runtime.enter();
    let (store, active) = store();
    let mut group = c.benchmark_group("cache");

    let mut i = 0;
    group.bench_function("memory_lookup", |b| {
        b.iter(|| {
            i += 1;
            black_box(now(store.lookup(&active[i % ACTIVE_KEYS])).unwrap())
        })
    });

    let cached = CachedStore::builder(store.clone())
        .capacity(2 * ACTIVE_KEYS, ACTIVE_KEYS)
        .build();
    for digest in &active {
        now(cached.lookup(digest))
            .unwrap()
            .expect("active keys are in the store");
    }
    let mut i = 0;
    group.bench_function("cached_hit", |b| {
        b.iter(|| {
            i += 1;
            black_box(now(cached.lookup(&active[i % ACTIVE_KEYS])).unwrap())
        })
    });
    assert_eq!(
        cached.store_lookups() as usize,
        ACTIVE_KEYS,
        "every measured lookup was a hit"
    );

    let always_miss = CachedStore::builder(store.clone())
        .ttl(Duration::ZERO)
        .build();
    let mut i = 0;
    group.bench_function("cached_miss", |b| {
        b.iter(|| {
            i += 1;
            black_box(now(always_miss.lookup(&active[i % ACTIVE_KEYS])).unwrap())
        })
    });

    if let Some((url, mut server)) = redis() {
        let (redis_cache, digests) = runtime.block_on(async {
            let redis = RedisStore::connect(&url).await.unwrap();
            let manager = KeyManager::new(Arc::new(redis.clone()));
            let mut digests = Vec::new();
            for i in 0..100 {
                let issued = manager
                    .issue(NewKey::named(format!("bench-{i}")))
                    .await
                    .unwrap();
                digests.push(*issued.record.digest());
            }
            (
                CachedStore::builder(redis).ttl(Duration::ZERO).build(),
                digests,
            )
        });
        let mut i = 0;
        group.bench_function("redis_miss", |b| {
            b.iter(|| {
                i += 1;
                black_box(
                    runtime
                        .block_on(redis_cache.lookup(&digests[i % digests.len()]))
                        .unwrap(),
                )
            })
        });
        if let Some(server) = server.as_mut() {
            let _ = server.kill();
        }
    } else {
        eprintln!("cache/redis_miss skipped: no REDIS_URL and no redis-server");
    }
    group.finish();
}

criterion_group!(benches, cache);
criterion_main!(benches);
