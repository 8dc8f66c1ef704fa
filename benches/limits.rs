//! The cost of one rate-limit decision: `cargo bench --bench limits`.
//!
//! Group `decision`, in one run: `memory_limiter` is [`MemoryLimiter::admit`] (sharded
//! table, GCRA, the system clock) and `governor_keyed` is governor's keyed GCRA
//! (`DefaultKeyedRateLimiter<u64>`: a dashmap of atomic TATs on the quanta clock), the
//! reference implementation, both keyed the same way: 10,000 distinct key ids, cycled, at a
//! rate high enough that decisions pass (the common case). `memory_limiter_concurrency`
//! adds a concurrency limit (a permit taken and released per decision). Compare the ratio
//! `memory_limiter / governor_keyed`; absolute times depend on the machine.

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{Quota, RateLimiter};
use tower_gateway_auth::keys::KeyId;
use tower_gateway_auth::limit::{Admission, Limiter, Limits, MemoryLimiter, Rate};

const KEYS: u64 = 10_000;

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");

    let ours = MemoryLimiter::new();
    let limits = Limits::new().with_rate(Rate::per_second(1_000_000));
    let mut k = 0u64;
    group.bench_function("memory_limiter", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            let admission = ours.admit(KeyId::from_u64(k), &limits).into_inner();
            black_box(matches!(admission, Ok(Admission::Allowed { .. })))
        })
    });

    let theirs = RateLimiter::keyed(Quota::per_second(NonZeroU32::new(1_000_000).unwrap()));
    let mut k = 0u64;
    group.bench_function("governor_keyed", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            black_box(theirs.check_key(&k).is_ok())
        })
    });

    let with_permit = limits.with_max_concurrent(8);
    let mut k = 0u64;
    group.bench_function("memory_limiter_concurrency", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            let admission = ours.admit(KeyId::from_u64(k), &with_permit).into_inner();
            black_box(matches!(admission, Ok(Admission::Allowed { .. })))
        })
    });
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
