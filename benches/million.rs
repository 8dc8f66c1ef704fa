//! A million keys (the P7): `cargo bench --bench million`.
//!
//! - `FileStore`: a key file of 1,000,000 realistic records (as `benches/memory.rs` builds
//!   them) is written, then opened in a fresh process, which reports the time `open` took
//!   and its RSS afterwards (and before, for the process's own share).
//! - Redis (if `redis-server` is installed, or `REDIS_URL` is set): 1,000,000 records
//!   written into a throwaway Redis in the `RedisStore` layout, behind a `CachedStore` that
//!   can hold them all; 64 concurrent tasks on two worker threads look up 200,000 distinct
//!   keys, first cold (every lookup a Redis `GET`), then warm (every one a cache hit; the
//!   cache holds twice the keys, so no shard evicts). It prints p50, p99 and max of each,
//!   with the rate reached.
//!
//! `MILLION_KEYS` sets another count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tower_gateway_auth::clock::Timestamp;
use tower_gateway_auth::keys::{KeyDigest, KeyHasher, KeyId, KeyRecord};
use tower_gateway_auth::store::{CachedStore, FileStore, KeyStore, RedisStore};

mod support;

fn keys() -> usize {
    std::env::var("MILLION_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000)
}

fn record(i: usize, now: Timestamp) -> KeyRecord {
    let hasher = KeyHasher::sha256();
    let scopes: &[&str] = if i.is_multiple_of(10) {
        &["chat", "admin"]
    } else {
        &["chat"]
    };
    KeyRecord::new(
        KeyId::random(),
        hasher.digest(format!("gw_million-{i}").as_bytes()),
    )
    .with_name(format!("customer-{i:07}"))
    .with_hint(format!("gw_…{:04}", i % 10_000))
    .with_created_at(now)
    .with_expires_at(Some(now + Duration::from_secs(90 * 86_400)))
    .with_scopes(scopes.iter().copied())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, path] = args.as_slice()
        && mode == "open"
    {
        return open(path);
    }
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and friends: nothing to do.
    }
    file_store();
    redis();
}

/// The child: opens the file and reports.
fn open(path: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = rss_kib();
    let started = Instant::now();
    let store = runtime.block_on(async { FileStore::builder(path).reload_every(None).open() });
    let store = store.expect("the key file opens");
    let took = started.elapsed();
    let after = rss_kib();
    println!(
        "FileStore: opened {} keys in {:.2} s; RSS {:.0} MiB after ({:.0} MiB before: {:.0} B/key)",
        store.len(),
        took.as_secs_f64(),
        after as f64 / 1024.0,
        before as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / store.len() as f64
    );
}

fn file_store() {
    let n = keys();
    let dir = std::env::temp_dir().join(format!("tga-million-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.json");
    {
        // The file's header as the store writes it, then the records.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async { FileStore::open(&path).unwrap() });
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let now = Timestamp::now();
        let records: Vec<KeyRecord> = (0..n).map(|i| record(i, now)).collect();
        file["keys"] = serde_json::to_value(&records).unwrap();
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "key file: {n} keys, {:.0} MiB; opening it in a fresh process",
        size as f64 / (1024.0 * 1024.0)
    );
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("open")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn redis() {
    let Some((url, mut child)) = support::redis() else {
        eprintln!("no redis-server: the Redis part is skipped");
        return;
    };
    let n = keys();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let namespace = format!("million{}", std::process::id());
        // Records the namespace's hasher, as a first connect does.
        let store = RedisStore::builder(&url)
            .namespace(&namespace)
            .connect()
            .await
            .unwrap();
        let now = Timestamp::now();
        let started = Instant::now();
        let mut digests: Vec<KeyDigest> = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
            let mut mset = redis::cmd("MSET");
            for &i in chunk {
                let r = record(i, now);
                digests.push(*r.digest());
                mset.arg(format!("{{{namespace}}}:k:{}", r.digest().to_hex()))
                    .arg(serde_json::to_string(&r).unwrap());
            }
            let () = mset.query_async(&mut connection).await.unwrap();
        }
        eprintln!(
            "redis: {n} records written in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let cache = Arc::new(
            CachedStore::builder(store)
                .ttl(Duration::from_secs(600))
                .capacity(2 * n, 1_000)
                .build(),
        );
        // 200,000 distinct keys spread over the million.
        let probe: Arc<Vec<KeyDigest>> =
            Arc::new(digests.iter().step_by((n / 200_000).max(1)).copied().collect());
        for kind in ["cold", "warm"] {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            const TASKS: usize = 64;
            for t in 0..TASKS {
                let (cache, probe) = (cache.clone(), probe.clone());
                tasks.spawn(async move {
                    let mut times = Vec::with_capacity(probe.len() / TASKS + 1);
                    for digest in probe.iter().skip(t).step_by(TASKS) {
                        let t0 = Instant::now();
                        let found = cache.lookup(digest).await.unwrap();
                        times.push(t0.elapsed());
                        assert!(found.is_some());
                    }
                    times
                });
            }
            let mut times = Vec::new();
            while let Some(part) = tasks.join_next().await {
                times.extend(part.unwrap());
            }
            let wall = started.elapsed();
            times.sort();
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
            println!(
                "CachedStore<RedisStore>, {n} keys, {kind}: {} lookups by 64 tasks at {:.0}/s: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                times.len(),
                times.len() as f64 / wall.as_secs_f64(),
                at(0.5).as_secs_f64() * 1e6,
                at(0.99).as_secs_f64() * 1e6,
                times.last().unwrap().as_secs_f64() * 1e6
            );
        }
        // A throwaway server is stopped below; one of `REDIS_URL`'s loses the namespace in the
        // background (a synchronous flush of a million keys outlasts the client's timeout).
        let _: redis::RedisResult<()> = redis::cmd("FLUSHDB")
            .arg("ASYNC")
            .query_async(&mut connection)
            .await;
    });
    if let Some(child) = child.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
