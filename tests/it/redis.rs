//! RedisStore and its cache against a real `redis-server`: two replicas sharing keys,
//! revocation fan-out, Redis killed and restarted under load, the negative cache, atomic
//! writes, and no key at rest.
//!
//! With `REDIS_URL` unset the tests start their own `redis-server` on a free loopback port.
//! Without a `redis-server` binary they skip with a message, unless `REQUIRE_REDIS=1` (CI),
//! where they fail.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use redis::AsyncCommands;
use support::redis::{RedisServer, namespace, redis_url};
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{Ephemeral, KeyHasher, KeyManager, KeyStatus, NewKey, Scopes};
use tower_gateway_auth::store::listen_for_invalidations;
use tower_gateway_auth::store::{CachedStore, KeyAdmin, KeyStore, RedisStore, Write, WriteError};

async fn connect(url: &str, ns: &str) -> RedisStore {
    RedisStore::builder(url)
        .namespace(ns)
        .hasher(KeyHasher::sha256())
        .connect()
        .await
        .unwrap()
}

/// Waits until `cache` has had more than `seen` invalidations.
async fn announced(cache: &CachedStore<RedisStore>, seen: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.invalidations() <= seen {
        assert!(Instant::now() < deadline, "no announcement arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn status<K>(store: &K, key: &str) -> StatusCode
where
    K: KeyStore + Clone,
{
    support::key_status(store.clone(), key).await
}

#[tokio::test]
async fn two_replicas_share_keys_and_a_revocation_reaches_the_other_within_a_second() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let a = CachedStore::builder(connect(&url, &ns).await)
        .ttl(Duration::from_secs(3600))
        .build();
    let b = CachedStore::builder(connect(&url, &ns).await)
        .ttl(Duration::from_secs(3600))
        .build();
    let (mut la, mut lb) = (listen_for_invalidations(&a), listen_for_invalidations(&b));
    la.subscribed().await;
    lb.subscribed().await;

    let seen = b.invalidations();
    let issued = KeyManager::new(Arc::new(a.clone()))
        .issue(NewKey::named("shared"))
        .await
        .unwrap();
    let key = issued.key.expose();
    // The issue itself is announced (negative caches may know the digest): let it land first.
    announced(&b, seen).await;
    assert_eq!(
        status(&b, key).await,
        StatusCode::OK,
        "issued on A, works on B"
    );
    assert_eq!(status(&a, key).await, StatusCode::OK);
    assert_eq!(a.cached().0, 1, "A's cache is warm");
    assert_eq!(b.cached().0, 1, "B's cache is warm");

    KeyManager::new(Arc::new(a.clone()))
        .revoke(issued.record.id())
        .await
        .unwrap();
    let revoked = Instant::now();
    assert_eq!(status(&a, key).await, StatusCode::UNAUTHORIZED, "A at once");
    loop {
        match status(&b, key).await {
            StatusCode::UNAUTHORIZED => break,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "B still accepts a key revoked on A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn redis_killed_and_restarted_under_a_warm_cache() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let ns = namespace();
    let clock = ManualClock::new(Timestamp::now());
    let store = CachedStore::builder(connect(&server.url(), &ns).await)
        .ttl(Duration::from_secs(30))
        .max_staleness(Duration::from_secs(120))
        .clock(clock.clone())
        .build();
    listen_for_invalidations(&store).subscribed().await;
    let seen = store.invalidations();
    let issued = KeyManager::new(Arc::new(store.clone()))
        .issue(NewKey::named("cached"))
        .await
        .unwrap();
    let key = issued.key.expose();
    // Once locally, once through the channel.
    announced(&store, seen + 1).await;
    assert_eq!(status(&store, key).await, StatusCode::OK);

    server.kill();
    assert_eq!(
        status(&store, key).await,
        StatusCode::OK,
        "fresh in the cache"
    );
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        status(&store, key).await,
        StatusCode::OK,
        "stale, within the bound"
    );
    for unknown in ["gw_never-seen-1", "gw_never-seen-2"] {
        assert_eq!(
            status(&store, unknown).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "never 200, never 401"
        );
    }
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        status(&store, key).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "beyond the bound"
    );

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&store, key).await != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "did not recover after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status(&store, "gw_never-seen-1").await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn ten_thousand_requests_with_one_unknown_key_make_a_handful_of_store_calls() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let store = connect(&url, &namespace()).await.cached();
    for _ in 0..10_000 {
        assert_eq!(
            status(&store, "gw_unknown-key-000").await,
            StatusCode::UNAUTHORIZED
        );
    }
    let calls = store.store_lookups();
    // One call per 5-second negative entry: this loop takes a few seconds at most.
    assert!((1..=5).contains(&calls), "{calls} store calls");
}

#[tokio::test]
async fn only_digests_and_metadata_reach_redis_and_ephemeral_keys_expire_there() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let store = Arc::new(connect(&url, &ns).await);
    let manager = KeyManager::new(store.clone());
    let parent = manager
        .issue(NewKey::named("parent").scopes(["chat", "rt"]))
        .await
        .unwrap();
    let who = {
        let record = store.get(parent.record.id()).await.unwrap().unwrap();
        tower_gateway_auth::Identity::new(record)
    };
    let eph = manager
        .mint_ephemeral(
            &who,
            Ephemeral::new()
                .scopes(Scopes::new(["rt"]))
                .ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let rotated = manager
        .rotate(parent.record.id(), Duration::from_secs(10))
        .await
        .unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = con.keys(format!("{{{ns}}}:*")).await.unwrap();
    assert!(keys.len() >= 7, "{keys:?}");
    for k in &keys {
        let value: String = match con.get(k).await {
            Ok(v) => v,
            Err(_) => {
                let kind: String = redis::cmd("TYPE")
                    .arg(k)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                let members: Vec<String> = match kind.as_str() {
                    "set" => con.smembers(k).await.unwrap(),
                    "zset" => con.zrange(k, 0, -1).await.unwrap(),
                    other => panic!("{k} holds a {other}"),
                };
                members.join(",")
            }
        };
        for secret in [&parent.key, &eph.key, &rotated.key] {
            assert!(
                !value.contains(secret.expose()) && !k.contains(secret.expose()),
                "a key is in Redis"
            );
        }
    }
    let ttl: i64 = con
        .ttl(format!("{{{ns}}}:k:{}", eph.record.digest().to_hex()))
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "ephemeral key TTL {ttl}");
    let ttl: i64 = con
        .ttl(format!("{{{ns}}}:k:{}", rotated.record.digest().to_hex()))
        .await
        .unwrap();
    assert_eq!(
        ttl, -1,
        "ordinary keys stay until purged, for the audit trail"
    );
    assert_eq!(status(&*store, eph.key.expose()).await, StatusCode::OK);
    assert_eq!(manager.list().await.unwrap().len(), 3);
}

#[tokio::test]
async fn writes_are_atomic_and_a_stale_write_is_a_conflict() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let a = Arc::new(connect(&url, &ns).await);
    let b = Arc::new(connect(&url, &ns).await);
    let issued = KeyManager::new(a.clone())
        .issue(NewKey::named("contended"))
        .await
        .unwrap();
    let stale = issued.record.clone();
    KeyManager::new(b.clone())
        .set_enabled(stale.id(), false)
        .await
        .unwrap();
    let lost = a
        .apply(vec![Write::Replace {
            old: stale.clone(),
            new: (*stale).clone().with_name("renamed"),
        }])
        .await;
    assert!(matches!(lost, Err(WriteError::Conflict)));
    assert_eq!(
        a.get(stale.id()).await.unwrap().unwrap().status(),
        KeyStatus::Disabled
    );

    // A rotation is one step: the old key's new expiry and the new key land together.
    let rotated = KeyManager::new(a.clone())
        .rotate(stale.id(), Duration::from_secs(5))
        .await
        .unwrap();
    let old = b.get(stale.id()).await.unwrap().unwrap();
    assert!(old.expires_at().is_some());
    assert!(b.get(rotated.record.id()).await.unwrap().is_some());

    // Two replicas issuing at once lose nothing.
    let (ma, mb) = (KeyManager::new(a.clone()), KeyManager::new(b.clone()));
    let (ra, rb) = tokio::join!(
        async {
            for i in 0..25 {
                ma.issue(NewKey::named(format!("a-{i}"))).await.unwrap();
            }
        },
        async {
            for i in 0..25 {
                mb.issue(NewKey::named(format!("b-{i}"))).await.unwrap();
            }
        },
    );
    let _ = (ra, rb);
    assert_eq!(a.list().await.unwrap().len(), 52);
}

#[tokio::test]
async fn the_keygen_store_and_a_gateway_cache_agree() {
    // What the gateway example does with `redis_url`: a cached store; and keygen: a plain one.
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let gateway = CachedStore::new(connect(&url, &ns).await);
    listen_for_invalidations(&gateway).subscribed().await;
    let keygen = Arc::new(connect(&url, &ns).await);
    let seen = gateway.invalidations();
    let issued = KeyManager::new(keygen.clone())
        .issue(NewKey::named("from-keygen"))
        .await
        .unwrap();
    announced(&gateway, seen).await;
    assert_eq!(status(&gateway, issued.key.expose()).await, StatusCode::OK);
    KeyManager::new(keygen)
        .revoke(issued.record.id())
        .await
        .unwrap();
    let revoked = Instant::now();
    while status(&gateway, issued.key.expose()).await == StatusCode::OK {
        assert!(revoked.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- Attacks (issue 11) --------------------------------------------------------------------

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn expired_ephemeral_ids_leave_the_index_and_live_ones_are_capped() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let store = Arc::new(connect(&url, &ns).await);
    // The manager's time stands still while it mints, so that on a slow machine no child
    // expires (in the manager's eyes) before the 120th mint and the cap is exactly 100.
    // Redis still expires the records in real time, at the expiry they were given.
    let clock = ManualClock::new(Timestamp::now());
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let parent = manager.issue(NewKey::named("flood")).await.unwrap();
    let who =
        tower_gateway_auth::Identity::new(store.get(parent.record.id()).await.unwrap().unwrap());
    let mut minted = 0;
    for _ in 0..120 {
        if manager
            .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(1)))
            .await
            .is_ok()
        {
            minted += 1;
        }
    }
    assert_eq!(minted, 100, "live ephemeral keys per parent are capped");
    let mut con = raw(&url).await;
    let before: usize = con.scard(format!("{{{ns}}}:ids")).await.unwrap();
    assert_eq!(before, 101);
    // Redis drops the expired records by itself; their ids leave the index with them.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    clock.set(Timestamp::now());
    assert!(
        manager
            .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(60)))
            .await
            .is_ok()
    );
    assert_eq!(manager.list().await.unwrap().len(), 2);
    let after: usize = con.scard(format!("{{{ns}}}:ids")).await.unwrap();
    assert_eq!(after, 2, "the parent and its one live child");
}

#[tokio::test]
async fn one_corrupt_record_does_not_stop_listing_or_revoking() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let store = Arc::new(connect(&url, &ns).await);
    let manager = KeyManager::new(store.clone());
    let good = manager.issue(NewKey::named("good")).await.unwrap();
    let bad = manager.issue(NewKey::named("bad")).await.unwrap();
    let mut con = raw(&url).await;
    let _: () = con
        .set(
            format!("{{{ns}}}:k:{}", bad.record.digest().to_hex()),
            // Corrupt where serde would quote the value back: the digest must not reach a log.
            format!(r#"{{"created_at": "{}"}}"#, bad.record.digest().to_hex()),
        )
        .await
        .unwrap();
    let (logs, _guard) = support::capture_logs();
    let listed = manager.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id()).collect::<Vec<_>>(),
        [good.record.id()]
    );
    assert!(
        logs.text().contains(&bad.record.id().to_string()),
        "{}",
        logs.text()
    );
    assert!(
        !logs.text().contains(&bad.record.digest().to_hex()),
        "{}",
        logs.text()
    );
    manager.revoke(good.record.id()).await.unwrap();
    assert_eq!(
        status(&*store, good.key.expose()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(manager.purge_expired().await.unwrap(), 0);
}

#[tokio::test]
async fn a_namespace_written_under_another_pepper_is_named_not_silently_unverifiable() {
    let Some((url, _server)) = redis_url() else {
        return;
    };
    let ns = namespace();
    let peppered = KeyHasher::with_pepper(b"a pepper of sixteen bytes or more");
    let store = RedisStore::builder(&url)
        .namespace(&ns)
        .hasher(peppered.clone())
        .connect()
        .await
        .unwrap();
    KeyManager::new(Arc::new(store))
        .issue(NewKey::named("k"))
        .await
        .unwrap();
    for other in [
        KeyHasher::sha256(),
        KeyHasher::with_pepper(b"another pepper, also long enough"),
    ] {
        let error = RedisStore::builder(&url)
            .namespace(&ns)
            .hasher(other)
            .connect()
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(&ns) && error.contains("pepper"), "{error}");
    }
    let again = RedisStore::builder(&url).namespace(&ns).hasher(peppered);
    assert!(again.connect().await.is_ok());
}
