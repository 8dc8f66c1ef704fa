//! The cost of one rate-limit decision: `cargo bench --bench limits`.
//!
//! Group `decision`, in one run: `memory_limiter` is [`MemoryLimiter::admit`] (sharded
//! table, GCRA, the system clock) and `governor_keyed` is governor's keyed GCRA
//! (`DefaultKeyedRateLimiter<u64>`: a dashmap of atomic TATs on the quanta clock), the
//! reference implementation, both keyed the same way: 10,000 distinct key ids, cycled, at a
//! rate high enough that decisions pass (the common case). `memory_limiter_concurrency`
//! adds a concurrency limit (a permit taken and released per decision). Compare the ratio
//! `memory_limiter / governor_keyed`; absolute times depend on the machine.
//!
//! Group `redis`, when `redis-server` is on the PATH (it starts one on a free loopback
//! port; without one it says so and skips): `redis_limiter` and
//! `redis_limiter_concurrency` are [`RedisLimiter::admit`] over the same keys, each
//! decision awaited on a current-thread runtime (so a decision is a full round trip, not
//! a pipelined one). After the group it prints the round trips Redis counted per decision
//! (`INFO commandstats`: script calls, and the `ZREM` a released permit sends), which is
//! the figure that matters more than the time: the time is loopback latency.

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{Quota, RateLimiter};
use tower_gateway_auth::keys::KeyId;
use tower_gateway_auth::limit::{Admission, Limiter, Limits, MemoryLimiter, Rate, RedisLimiter};

const KEYS: u64 = 10_000;

mod support;

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

/// Commands Redis has run, by name: `INFO commandstats`.
fn calls(rt: &tokio::runtime::Runtime, url: &str) -> std::collections::HashMap<String, u64> {
    rt.block_on(async {
        let client = redis::Client::open(url).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect()
    })
}

fn redis(c: &mut Criterion) {
    let Some((url, mut server)) = support::redis() else {
        eprintln!("redis: SKIPPED, no redis-server to start");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter = rt.block_on(RedisLimiter::connect(&url)).unwrap();
    let mut group = c.benchmark_group("redis");
    for (name, limits) in [
        (
            "redis_limiter",
            Limits::new().with_rate(Rate::per_second(1_000_000)),
        ),
        (
            "redis_limiter_concurrency",
            Limits::new()
                .with_rate(Rate::per_second(1_000_000))
                .with_max_concurrent(8),
        ),
    ] {
        // Loads the script, so that the counts below are of decisions only.
        rt.block_on(limiter.admit(KeyId::from_u64(0), &limits))
            .unwrap();
        let before = calls(&rt, &url);
        let mut decisions = 0u64;
        let mut k = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                k = (k + 1) % KEYS;
                decisions += 1;
                // The permit is dropped inside the runtime, where its release is spawned.
                black_box(rt.block_on(async {
                    let admission = limiter.admit(KeyId::from_u64(k), &limits).await;
                    matches!(admission, Ok(Admission::Allowed { .. }))
                }))
            })
        });
        // Let the released permits' commands land.
        rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(200)).await });
        let after = calls(&rt, &url);
        let delta = |cmd: &str| after.get(cmd).unwrap_or(&0) - before.get(cmd).unwrap_or(&0);
        let trips = delta("evalsha") + delta("eval") + delta("zrem");
        eprintln!(
            "{name}: {decisions} decisions, {trips} round trips ({} script calls, {} releases): {:.2} per decision",
            delta("evalsha") + delta("eval"),
            delta("zrem"),
            trips as f64 / decisions.max(1) as f64
        );
    }
    group.finish();
    if let Some(server) = &mut server {
        let _ = server.kill();
        let _ = server.wait();
    }
}

criterion_group!(benches, decision, redis);
criterion_main!(benches);
