//! RedisLimiter against real `redis-server`s: the script decides exactly as the in-memory
//! GCRA does, limiters sharing a Redis hold one limit, a 3-master Redis Cluster serves both
//! the limiter and the key store, each Redis-down setting does what it says, and a decision
//! costs one round trip.
//!
//! Like `redis.rs`, these start their own servers; without `redis-server` they skip with a
//! message, unless `REQUIRE_REDIS=1` (CI), where they fail.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::redis::{RedisCluster, RedisServer, command_calls, namespace};
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{KeyId, KeyManager, KeyStatus, NewKey};
use tower_gateway_auth::limit::{
    Admission, Budget, BudgetPeriod, Limiter, Limits, MemoryLimiter, Rate, RedisLimiter,
    RedisPermit, WhenUnavailable,
};
use tower_gateway_auth::store::{KeyAdmin, KeyStore, RedisStore, listen_for_invalidations};

async fn limiter(url: &str, ns: &str) -> RedisLimiter {
    RedisLimiter::builder(url)
        .namespace(ns)
        .connect()
        .await
        .unwrap()
}

/// What a decision was, without its permit: comparable across backends.
#[derive(Debug, PartialEq)]
enum Seen {
    Allowed(
        Option<(u32, u32, Duration, Timestamp)>,
        Option<tower_gateway_auth::limit::TokenQuota>,
    ),
    Rate(u32, u32, Duration, Timestamp, Duration),
    Concurrency(u32),
    Tokens(tower_gateway_auth::limit::TokenQuota, Duration),
    Budget(tower_gateway_auth::limit::TokenQuota, Option<Duration>),
}

fn seen<P>(a: Admission<P>) -> Seen {
    match a {
        Admission::Allowed { quota, tokens, .. } => Seen::Allowed(
            quota.map(|q| (q.limit, q.remaining, q.reset, q.reset_at)),
            tokens,
        ),
        Admission::TokensLimited {
            tokens,
            retry_after,
        } => Seen::Tokens(tokens, retry_after),
        Admission::BudgetExhausted {
            tokens,
            retry_after,
        } => Seen::Budget(tokens, retry_after),
        Admission::RateLimited { quota, retry_after } => Seen::Rate(
            quota.limit,
            quota.remaining,
            quota.reset,
            quota.reset_at,
            retry_after,
        ),
        Admission::ConcurrencyLimited { max } => Seen::Concurrency(max),
        _ => unreachable!("no other admission yet"),
    }
}

/// A small deterministic generator: the sequences are the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 23:00 UTC `days` days from today. The Redis keys of budgets expire at absolute times
/// computed from the limiter's clock, so a manual clock must stay ahead of the real one:
/// with a fixed date these tests start failing the day the real clock passes it (one did,
/// on 2026-12-03: its keys expired on arrival and the budget never moved).
fn evening_ahead(days: i64) -> Timestamp {
    let today = time::OffsetDateTime::now_utc().date() + time::Duration::days(days);
    Timestamp::from_unix_secs(today.midnight().assume_utc().unix_timestamp() as u64 + 23 * 3600)
}

/// 23:00 UTC on the last day of next month, and the midnight after it (a new month).
fn month_end_evening() -> (Timestamp, Timestamp) {
    let today = time::OffsetDateTime::now_utc().date();
    let in_two_months = today
        .replace_day(1)
        .unwrap()
        .checked_add(time::Duration::days(62))
        .unwrap()
        .replace_day(1)
        .unwrap();
    let midnight = in_two_months.midnight().assume_utc().unix_timestamp() as u64;
    (
        Timestamp::from_unix_secs(midnight - 3600),
        Timestamp::from_unix_secs(midnight),
    )
}

#[tokio::test]
async fn the_redis_script_decides_exactly_as_the_memory_limiter_on_random_sequences() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = ManualClock::new(evening_ahead(40));
    let redis = RedisLimiter::builder(server.url())
        .namespace(namespace())
        .clock(clock.clone())
        .connect()
        .await
        .unwrap();
    let memory = MemoryLimiter::with_clock(clock.clone());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    // Rates whose emission interval is a whole number of µs (Redis counts µs, the memory
    // limiter ns): then the two must agree to the nanosecond.
    let requests = [1u32, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 60, 120];
    let mut decisions = 0;
    for case in 0..60 {
        let n = requests[rng.below(requests.len() as u64) as usize];
        let period = loop {
            let period = 1 + rng.below(120) as u32;
            if u64::from(period) * 1_000_000 % u64::from(n) == 0 {
                break period;
            }
        };
        let burst = 1 + rng.below(12) as u32;
        let limits = Limits::new()
            .with_rate(Rate::new(n, Duration::from_secs(period.into())).with_burst(burst));
        let key = KeyId::random();
        let step = Duration::from_secs(period.into()) / n;
        for i in 0..40 {
            // Gaps around the emission interval, in whole µs, with bursts of none at all.
            let gap = match rng.below(4) {
                0 => 0,
                _ => rng.below(2 * step.as_micros() as u64 + 1),
            };
            clock.advance(Duration::from_micros(gap));
            let from_redis = seen(redis.admit(key, &limits).await.unwrap());
            let from_memory = seen(memory.admit(key, &limits).await.unwrap());
            assert_eq!(
                from_redis, from_memory,
                "case {case} ({limits:?}), request {i}"
            );
            decisions += 1;
        }
    }
    assert_eq!(decisions, 2400);
}

#[tokio::test]
async fn two_limiters_on_one_redis_hold_one_rate_and_one_concurrency_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace();
    let (a, b) = (
        limiter(&server.url(), &ns).await,
        limiter(&server.url(), &ns).await,
    );
    let key = KeyId::random();
    let rate = Limits::new().with_rate(Rate::per_minute(30));
    let mut passed = 0;
    for i in 0..60 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if let Admission::Allowed { quota, .. } = replica.admit(key, &rate).await.unwrap() {
            passed += 1;
            assert_eq!(quota.unwrap().remaining, 30 - passed);
        }
    }
    assert_eq!(passed, 30, "30 a minute across both replicas");

    let key = KeyId::random();
    let two = Limits::new().with_max_concurrent(2);
    let held = |a: Admission<RedisPermit>| match a {
        Admission::Allowed { permit, .. } => permit.expect("a permit"),
        other => panic!("refused: {other:?}"),
    };
    let first = held(a.admit(key, &two).await.unwrap());
    let _second = held(b.admit(key, &two).await.unwrap());
    assert!(matches!(
        a.admit(key, &two).await.unwrap(),
        Admission::ConcurrencyLimited { max: 2 }
    ));
    let usage = b.usage(key, &two).await.unwrap();
    assert_eq!(usage.in_flight, 2);
    drop(first);
    // The release is sent, not waited on: it lands within moments.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match b.admit(key, &two).await.unwrap() {
            Admission::Allowed { .. } => break,
            _ => assert!(
                Instant::now() < deadline,
                "the released slot never came back"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_permit_never_released_frees_its_slot_when_its_lease_ends() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let limiter = RedisLimiter::builder(server.url())
        .namespace(namespace())
        .permit_lease(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let key = KeyId::random();
    let one = Limits::new().with_max_concurrent(1);
    let Admission::Allowed { permit, .. } = limiter.admit(key, &one).await.unwrap() else {
        panic!("refused");
    };
    // A replica that dies holding the permit never releases it.
    std::mem::forget(permit);
    assert!(matches!(
        limiter.admit(key, &one).await.unwrap(),
        Admission::ConcurrencyLimited { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        limiter.admit(key, &one).await.unwrap(),
        Admission::Allowed { .. }
    ));
}

#[tokio::test]
async fn a_decision_is_one_round_trip_and_a_permit_one_more_to_release() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let limiter = limiter(&server.url(), &namespace()).await;
    let key = KeyId::random();
    let rate = Limits::new().with_rate(Rate::per_minute(1_000));
    // The first decision loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA again).
    limiter.admit(key, &rate).await.unwrap();
    let before = command_calls(&server.url()).await;
    for _ in 0..100 {
        limiter.admit(key, &rate).await.unwrap();
    }
    let after = command_calls(&server.url()).await;
    let delta = |cmd: &str| after.get(cmd).unwrap_or(&0) - before.get(cmd).unwrap_or(&0);
    assert_eq!(delta("evalsha"), 100, "one script call a decision");
    // Redis counts the commands a script runs too: each call's TIME, GET and SET, and
    // nothing else but the INFO that read the statistics.
    for inside in ["time", "get", "set"] {
        assert_eq!(delta(inside), 100, "{inside}");
    }
    let others: u64 = after
        .iter()
        .filter(|(cmd, _)| !matches!(cmd.as_str(), "evalsha" | "info" | "time" | "get" | "set"))
        .map(|(cmd, n)| n - before.get(cmd).unwrap_or(&0))
        .sum();
    assert_eq!(others, 0, "{after:?}");

    let both = rate.with_max_concurrent(5);
    let before = command_calls(&server.url()).await;
    for _ in 0..50 {
        let admitted = limiter.admit(key, &both).await.unwrap();
        drop(admitted);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = command_calls(&server.url()).await;
        let delta = |cmd: &str| after.get(cmd).unwrap_or(&0) - before.get(cmd).unwrap_or(&0);
        if delta("zrem") == 50 {
            assert_eq!(delta("evalsha"), 50);
            break;
        }
        assert!(Instant::now() < deadline, "releases: {}", delta("zrem"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A limiter with `when`, on a server that is then killed.
async fn with_redis_down(when: WhenUnavailable) -> (RedisLimiter, RedisServer) {
    let mut server = RedisServer::start().expect("checked by the caller");
    let limiter = RedisLimiter::builder(server.url())
        .namespace(namespace())
        .when_unavailable(when)
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    // It works while Redis is up.
    let limits = Limits::new().with_rate(Rate::per_minute(1_000));
    assert!(matches!(
        limiter.admit(KeyId::random(), &limits).await.unwrap(),
        Admission::Allowed { quota: Some(_), .. }
    ));
    server.kill();
    (limiter, server)
}

#[tokio::test]
async fn redis_down_refuse_answers_an_error_within_the_timeout() {
    if RedisServer::start().is_none() {
        return;
    }
    let (limiter, _server) = with_redis_down(WhenUnavailable::Refuse).await;
    let limits = Limits::new().with_rate(Rate::per_minute(3));
    for _ in 0..5 {
        let started = Instant::now();
        let error = limiter.admit(KeyId::random(), &limits).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!error.to_string().contains("127.0.0.1"), "{error}");
    }
}

#[tokio::test]
async fn redis_down_allow_lets_every_request_through_without_quota() {
    if RedisServer::start().is_none() {
        return;
    }
    let (limiter, _server) = with_redis_down(WhenUnavailable::Allow).await;
    let limits = Limits::new()
        .with_rate(Rate::per_minute(3))
        .with_max_concurrent(1);
    let key = KeyId::random();
    for _ in 0..10 {
        match limiter.admit(key, &limits).await.unwrap() {
            Admission::Allowed {
                permit: None,
                quota: None,
                tokens: None,
            } => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn redis_down_local_limits_each_replica_in_its_own_memory_then_redis_again() {
    if RedisServer::start().is_none() {
        return;
    }
    let (limiter, mut server) = with_redis_down(WhenUnavailable::Local).await;
    let limits = Limits::new().with_rate(Rate::per_minute(3));
    let key = KeyId::random();
    let mut passed = 0;
    for _ in 0..6 {
        if let Admission::Allowed { quota, .. } = limiter.admit(key, &limits).await.unwrap() {
            assert!(quota.is_some(), "local limits still tell the quota");
            passed += 1;
        }
    }
    assert_eq!(passed, 3, "the limit held in memory");

    // Back up: the shared count resumes (a fresh one: what was spent locally stays local).
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let other = KeyId::random();
    loop {
        let calls = command_calls(&server.url()).await;
        limiter.admit(other, &limits).await.unwrap();
        let after = command_calls(&server.url()).await;
        if after.get("evalsha").unwrap_or(&0) + after.get("eval").unwrap_or(&0)
            > calls.get("evalsha").unwrap_or(&0) + calls.get("eval").unwrap_or(&0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "never went back to Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn on_a_3_master_cluster_the_limiter_holds_one_limit_and_spreads_keys_over_masters() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let ns = namespace();
    // One replica given every seed, one only a single node: both find the whole cluster.
    let a = limiter(&cluster.urls(), &ns).await;
    let b = limiter(&cluster.node_url(2), &ns).await;
    let rate = Limits::new().with_rate(Rate::per_minute(30));
    let keys: Vec<KeyId> = (0..24).map(|_| KeyId::random()).collect();
    for key in &keys {
        let mut passed = 0;
        for i in 0..40 {
            let replica = if i % 2 == 0 { &a } else { &b };
            if matches!(
                replica.admit(*key, &rate).await.unwrap(),
                Admission::Allowed { .. }
            ) {
                passed += 1;
            }
        }
        assert_eq!(passed, 30, "key {key}");
    }
    let per_node = cluster.keys_per_node();
    assert_eq!(per_node.iter().sum::<u64>(), 24, "{per_node:?}");
    assert!(
        per_node.iter().all(|&n| n > 0),
        "24 keys hash-tagged by key id land on every master: {per_node:?}"
    );
}

#[tokio::test]
async fn the_key_store_runs_on_a_3_master_cluster_with_revocation_reaching_another_replica() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let ns = namespace();
    let store = |url: String| {
        let ns = ns.clone();
        async move {
            RedisStore::builder(url)
                .namespace(ns)
                .connect()
                .await
                .unwrap()
        }
    };
    let writer = Arc::new(store(cluster.urls()).await);
    let reader = store(cluster.node_url(1)).await.cached();
    let mut listener = listen_for_invalidations(&reader);
    listener.subscribed().await;

    let manager = KeyManager::new(writer.clone());
    let issued = manager
        .issue(NewKey::named("on-cluster").scopes(["chat"]))
        .await
        .unwrap();
    let key = issued.key.expose().to_owned();
    let eph = manager
        .mint_ephemeral(
            &tower_gateway_auth::Identity::new(issued.record.clone()),
            tower_gateway_auth::keys::Ephemeral::new(),
        )
        .await
        .unwrap();
    assert_eq!(support::key_status(reader.clone(), &key).await, 200);
    assert_eq!(
        support::key_status(reader.clone(), eph.key.expose()).await,
        200
    );
    assert_eq!(writer.list().await.unwrap().len(), 2);

    let seen = reader.invalidations();
    manager.revoke(issued.record.id()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reader.invalidations() <= seen {
        assert!(
            Instant::now() < deadline,
            "no announcement crossed the cluster"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(support::key_status(reader.clone(), &key).await, 401);
    assert_eq!(
        support::key_status(reader.clone(), eph.key.expose()).await,
        401
    );
    let listed = writer.list().await.unwrap();
    assert!(listed.iter().all(|r| r.status() == KeyStatus::Revoked));
    // The namespace's keys share one hash tag: they all sit on one master.
    let per_node = cluster.keys_per_node();
    assert_eq!(
        per_node.iter().filter(|&&n| n > 0).count(),
        1,
        "{per_node:?}"
    );
    let digest = writer.hasher().digest(key.as_bytes());
    assert!(writer.lookup(&digest).await.unwrap().is_some());
}

#[tokio::test]
async fn a_namespace_in_the_layout_before_the_hash_tag_is_moved_and_its_keys_still_work() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace();
    let store = RedisStore::builder(server.url())
        .namespace(&ns)
        .connect()
        .await
        .unwrap();
    let manager = KeyManager::new(Arc::new(store));
    let issued = manager.issue(NewKey::named("old")).await.unwrap();
    // What an earlier version left: the same keys without the braces, and a neighbour
    // namespace whose name starts with this one's, which must stay where it is.
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{ns}}}:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(keys.len() >= 4, "{keys:?}");
    for key in &keys {
        let old = key.replacen(&format!("{{{ns}}}"), &ns, 1);
        let _: () = redis::cmd("RENAME")
            .arg(key)
            .arg(&old)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let neighbour = format!("{ns}:eu:k:abc");
    let _: () = redis::cmd("SET")
        .arg(&neighbour)
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();

    let store = RedisStore::builder(server.url())
        .namespace(&ns)
        .connect()
        .await
        .unwrap();
    assert_eq!(
        support::key_status(store.clone(), issued.key.expose()).await,
        200
    );
    assert_eq!(store.list().await.unwrap().len(), 1);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(left, vec![neighbour], "only the neighbour's key stays");
}

/// Waits until `limiter` shows `used` budget tokens for `key` (a Redis charge is sent, not
/// waited on).
async fn budget_reaches(limiter: &RedisLimiter, key: KeyId, limits: &Limits, used: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let usage = limiter.usage(key, limits).await.unwrap();
        if usage.budget_used == Some(used) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "budget used {:?}, expected {used}",
            usage.budget_used
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn redis_and_memory_agree_on_token_rates_and_budgets_through_random_charges() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // 23:00 UTC: the sequences cross midnight, where daily budgets start again.
    let clock = ManualClock::new(evening_ahead(2));
    // This compares the arithmetic of the two limiters, so a charge must not be dropped
    // because a loaded machine made one Redis call outlast the default 250 ms (seen once
    // in CI with both cores busy: the budget then never moved). What a slow Redis does is
    // the `redis_down_*` and timeout tests' business.
    let redis = RedisLimiter::builder(server.url())
        .namespace(namespace())
        .clock(clock.clone())
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let memory = MemoryLimiter::with_clock(clock.clone());
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut decisions = 0;
    // (token rate, budget) refusals seen: the sequences must reach both.
    let mut refused = (0, 0);
    for case in 0..30 {
        // Tokens a minute with a whole-µs interval; a daily budget of a few thousand.
        let per_minute = [60u32, 600, 1_000, 6_000, 60_000][rng.below(5) as usize];
        let limits = Limits::new()
            .with_tokens(Rate::per_minute(per_minute))
            .with_budget(Budget::new(500 + rng.below(5_000), BudgetPeriod::Day));
        let key = KeyId::random();
        for i in 0..30 {
            clock.advance(Duration::from_millis(rng.below(120_000)));
            let from_redis = seen(redis.admit(key, &limits).await.unwrap());
            let from_memory = seen(memory.admit(key, &limits).await.unwrap());
            assert_eq!(
                from_redis, from_memory,
                "case {case} ({limits:?}), request {i}"
            );
            decisions += 1;
            match from_memory {
                Seen::Tokens(..) => refused.0 += 1,
                Seen::Budget(..) => refused.1 += 1,
                _ => {}
            }
            if matches!(from_memory, Seen::Allowed(..)) {
                let tokens = rng.below(800);
                memory.charge(key, &limits, tokens);
                redis.charge(key, &limits, tokens);
                let used = memory
                    .usage(key, &limits)
                    .await
                    .unwrap()
                    .budget_used
                    .unwrap();
                budget_reaches(&redis, key, &limits, used).await;
                let (m, r) = (
                    memory.usage(key, &limits).await.unwrap(),
                    redis.usage(key, &limits).await.unwrap(),
                );
                assert_eq!(
                    m.tokens_remaining, r.tokens_remaining,
                    "case {case}, request {i}"
                );
                assert_eq!(m.budget_resets_at, r.budget_resets_at);
            }
        }
    }
    assert_eq!(decisions, 900);
    assert!(
        refused.0 > 10 && refused.1 > 10,
        "refusals seen: {refused:?}"
    );
}

#[tokio::test]
async fn a_budget_is_shared_by_replicas_survives_a_restart_and_starts_again_next_month() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace();
    // 23:00 UTC on the last day of a month.
    let (evening, next_month) = month_end_evening();
    let clock = ManualClock::new(evening);
    let replica = || {
        RedisLimiter::builder(server.url())
            .namespace(&ns)
            .clock(clock.clone())
            .connect()
    };
    let (a, b) = (replica().await.unwrap(), replica().await.unwrap());
    let limits = Limits::new().with_budget(Budget::new(1_000, BudgetPeriod::Month));
    let key = KeyId::random();
    a.charge(key, &limits, 600);
    budget_reaches(&b, key, &limits, 600).await;
    b.charge(key, &limits, 500);
    budget_reaches(&a, key, &limits, 1_100).await;
    for replica in [&a, &b] {
        match replica.admit(key, &limits).await.unwrap() {
            Admission::BudgetExhausted {
                tokens,
                retry_after,
            } => {
                assert_eq!((tokens.limit, tokens.remaining), (1_000, 0));
                assert_eq!(retry_after, Some(Duration::from_secs(3600)));
                assert_eq!(tokens.reset_at, Some(next_month));
            }
            other => panic!("{other:?}"),
        }
    }
    // A gateway restart: a fresh limiter finds the spent budget in Redis.
    drop((a, b));
    let restarted = replica().await.unwrap();
    assert!(matches!(
        restarted.admit(key, &limits).await.unwrap(),
        Admission::BudgetExhausted { .. }
    ));
    // Midnight: a new month.
    clock.advance(Duration::from_secs(3600));
    match restarted.admit(key, &limits).await.unwrap() {
        Admission::Allowed { tokens, .. } => assert_eq!(tokens.unwrap().remaining, 1_000),
        other => panic!("{other:?}"),
    }
}
