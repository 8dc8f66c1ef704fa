//! Bytes per key of `MemoryStore` at 1,000,000 realistic records, counted by a counting
//! allocator: `cargo bench --bench memory`.
//!
//! Each record is built the way a file or Redis load builds it: its own name, hint, scopes
//! and times, a 90-day expiry, no metadata. What is reported is what the store retains
//! (allocated minus freed while filling it), divided by the number of keys.

use std::alloc::System;
use std::time::Duration;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower_gateway_auth::clock::Timestamp;
use tower_gateway_auth::keys::{KeyFormat, KeyHasher, KeyId, KeyRecord};
use tower_gateway_auth::store::MemoryStore;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEYS: usize = 1_000_000;

fn main() {
    // Keys and digests are made before counting: they are the clients', not the store's.
    let format = KeyFormat::new("gw").unwrap();
    let hasher = KeyHasher::sha256();
    let now = Timestamp::now();
    let inputs: Vec<_> = (0..KEYS)
        .map(|i| {
            let key = format.generate();
            (hasher.digest(key.expose().as_bytes()), format.hint(&key), i)
        })
        .collect();

    let region = Region::new(GLOBAL);
    let store = MemoryStore::new();
    for (digest, hint, i) in &inputs {
        let scopes: &[&str] = if i % 10 == 0 {
            &["chat", "admin"]
        } else {
            &["chat"]
        };
        store.insert(
            KeyRecord::new(KeyId::random(), *digest)
                .with_name(format!("customer-{i:07}"))
                .with_hint(hint.clone())
                .with_created_at(now)
                .with_expires_at(Some(now + Duration::from_secs(90 * 86_400)))
                .with_scopes(scopes.iter().copied()),
        );
    }
    let change = region.change();
    let retained = change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64;
    assert_eq!(store.len(), KEYS);
    println!(
        "memory store: {KEYS} keys, {:.1} MiB retained, {:.1} B/key (target <= 160)",
        retained as f64 / (1024.0 * 1024.0),
        retained as f64 / KEYS as f64
    );
}
