//! A local cache in front of any store, for stores a network hop away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::keys::{KeyDigest, KeyHasher};
use crate::keys::{KeyId, KeyRecord};
use crate::ready_or_boxed::ReadyOrBoxed;
use crate::store::table::{self, Keyed, Sharded};
use crate::store::{KeyAdmin, KeyStore, LookupResult, StoreError, Write, WriteError};

/// A [`KeyStore`] that answers from a bounded local cache and asks the store behind it only
/// when it must.
///
/// - A known key is kept for `ttl` (default 30 s; settings are given to
///   [`CachedStore::builder`]), an unknown one for `negative_ttl`
///   (default 5 s), so a flood of bad keys reaches the store a handful of times, not once a
///   request.
/// - Concurrent misses on one digest make one store call; the others wait for its answer.
/// - When the store fails or takes longer than `store_timeout` (default 1 s), a record
///   already held is served for up to `max_staleness` (default 5 min) after it was fetched;
///   beyond that, and for keys not held, the lookup fails and the inbound layer answers 503.
///   Unknown keys are never served stale.
/// - [`invalidate`](Self::invalidate) drops an entry at once (the Redis store's revocation
///   fan-out calls it on every replica). After it returns, no answer fetched before it is
///   served or cached: a store call under way for that digest is marked stale, later
///   lookups do not join it, and its answer goes neither into the cache nor to the callers
///   waiting on it, who ask the store again (a digest invalidated again and again during
///   every one of several attempts fails closed with a store error).
/// - A hit is a probe of a sharded hash table under a read lock, like [`MemoryStore`]'s
///   lookup, and costs about as much.
///
/// [`MemoryStore`]: crate::store::MemoryStore
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tower_gateway_auth::InboundApiKeyLayer;
/// use tower_gateway_auth::store::{CachedStore, MemoryStore};
///
/// let store = CachedStore::builder(MemoryStore::new())
///     .ttl(Duration::from_secs(10))
///     .negative_ttl(Duration::from_secs(2))
///     .build();
/// let layer = InboundApiKeyLayer::new(store);
/// # let _ = layer;
/// ```
pub struct CachedStore<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for CachedStore<K> {
    fn clone(&self) -> Self {
        CachedStore {
            shared: self.shared.clone(),
        }
    }
}

pub(crate) struct Shared<K> {
    store: K,
    known: Table<Arc<KeyRecord>>,
    unknown: Table<Unknown>,
    inflight: Mutex<HashMap<KeyDigest, Arc<Flight>>>,
    /// How many invalidations there have been.
    epoch: AtomicU64,
    store_lookups: AtomicU64,
    ttl: u64,
    negative_ttl: u64,
    max_staleness: u64,
    store_timeout: Duration,
    /// `None` reads the system clock directly (no virtual call on the hit path).
    clock: Option<Arc<dyn Clock>>,
}

/// What one store call found, shareable among the requests that waited for it.
type Outcome = Result<Option<Arc<KeyRecord>>, Arc<StoreError>>;

/// One store call that concurrent lookups of a digest share.
#[derive(Default)]
struct Flight {
    outcome: OnceCell<Outcome>,
    /// Set by an invalidation of the digest while the call may still be under way: its
    /// answer may predate the change.
    stale: AtomicBool,
}

/// How many store calls one lookup makes while its digest keeps being invalidated.
const ATTEMPTS: usize = 4;

/// A bounded table of values found by digest, with the time they were fetched.
struct Table<V> {
    entries: Sharded<table::Shard<Entry<V>>>,
    per_shard: usize,
}

struct Entry<V> {
    value: V,
    fetched: u64,
}

impl<V: Keyed> Keyed for Entry<V> {
    fn digest(&self) -> &KeyDigest {
        self.value.digest()
    }
}

/// An unknown digest.
#[derive(Clone)]
struct Unknown(KeyDigest);

impl Keyed for Unknown {
    fn digest(&self) -> &KeyDigest {
        &self.0
    }
}

impl<V: Keyed + Clone> Table<V> {
    fn new(capacity: usize) -> Self {
        Table {
            entries: Sharded::new(),
            per_shard: capacity.div_ceil(table::SHARDS).max(1),
        }
    }

    #[inline]
    fn get(&self, digest: &KeyDigest) -> Option<(V, u64)> {
        table::find(&self.entries.read(digest), digest).map(|e| (e.value.clone(), e.fetched))
    }

    /// Makes room in a full shard before an insert: entries older than `keep` go, then, if
    /// that was not enough, an eighth of the shard (any eighth: this bounds memory, it is not
    /// an LRU).
    fn make_room(shard: &mut table::Shard<Entry<V>>, per_shard: usize, now: u64, keep: u64) {
        if shard.len() >= per_shard {
            shard.retain(|e| now.saturating_sub(e.fetched) <= keep);
        }
        if shard.len() >= per_shard {
            let mut excess = shard.len() - per_shard * 7 / 8;
            shard.retain(|_| {
                let gone = excess > 0;
                excess = excess.saturating_sub(1);
                !gone
            });
        }
    }

    /// [`put`](Self::put), unless `stale` says otherwise under the shard's lock: an
    /// invalidation sets its flag before it takes that lock to remove, so an answer is either
    /// put before the removal (and removed) or not put at all.
    fn put_unless(&self, value: V, now: u64, keep: u64, stale: &AtomicBool) {
        let mut shard = self.entries.write(value.digest());
        if stale.load(Ordering::SeqCst) {
            return;
        }
        Self::make_room(&mut shard, self.per_shard, now, keep);
        table::put(
            &mut shard,
            Entry {
                value,
                fetched: now,
            },
        );
    }

    fn remove(&self, digest: &KeyDigest) {
        table::take(&mut self.entries.write(digest), digest);
    }

    fn clear(&self) {
        for mut shard in self.entries.write_each() {
            shard.clear();
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Options for a [`CachedStore`], from [`CachedStore::builder`]: every setting is given
/// before the cache exists, so none can be changed under a cache already shared (cloned, or
/// listening for invalidations).
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::store::{CachedStore, MemoryStore};
///
/// let store = CachedStore::builder(MemoryStore::new())
///     .ttl(Duration::from_secs(10))
///     .negative_ttl(Duration::from_secs(2))
///     .capacity(10_000, 1_000)
///     .build();
/// assert_eq!(store.cached(), (0, 0));
/// ```
pub struct CachedStoreBuilder<K> {
    store: K,
    ttl: Duration,
    negative_ttl: Duration,
    max_staleness: Duration,
    store_timeout: Duration,
    capacity: (usize, usize),
    clock: Option<Arc<dyn Clock>>,
}

impl<K: KeyStore> CachedStoreBuilder<K> {
    /// How long a known key is served without asking the store, in whole seconds (default:
    /// 30 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long an unknown digest is answered "unknown" without asking the store (default:
    /// 5 s).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// How long after it was fetched a record may still be served while the store fails
    /// (default: 5 min).
    pub fn max_staleness(mut self, staleness: Duration) -> Self {
        self.max_staleness = staleness;
        self
    }

    /// How long a store call may take before it counts as failed (default: 1 s), so that a
    /// store in trouble costs requests little time before a held record is served.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// How many known and how many unknown digests are kept, at most (default: 100,000
    /// each).
    pub fn capacity(mut self, known: usize, unknown: usize) -> Self {
        self.capacity = (known, unknown);
        self
    }

    /// The clock ages are measured with (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The cache.
    pub fn build(self) -> CachedStore<K> {
        let (known, unknown) = self.capacity;
        CachedStore {
            shared: Arc::new(Shared {
                store: self.store,
                known: Table::new(known),
                unknown: Table::new(unknown),
                inflight: Mutex::new(HashMap::new()),
                epoch: AtomicU64::new(0),
                store_lookups: AtomicU64::new(0),
                ttl: self.ttl.as_secs(),
                negative_ttl: self.negative_ttl.as_secs(),
                max_staleness: self.max_staleness.as_secs(),
                store_timeout: self.store_timeout,
                clock: self.clock,
            }),
        }
    }
}

impl<K> std::fmt::Debug for CachedStoreBuilder<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStoreBuilder")
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_staleness", &self.max_staleness)
            .field("store_timeout", &self.store_timeout)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<K: KeyStore> CachedStore<K> {
    /// `store` behind a cache with the default settings (see [`builder`](Self::builder)).
    pub fn new(store: K) -> Self {
        Self::builder(store).build()
    }

    /// Options for a cache in front of `store`: up to 100,000 known and 100,000 unknown
    /// digests, a 30 s `ttl`, a 5 s `negative_ttl`, 5 min `max_staleness`, a 1 s
    /// `store_timeout`, the system clock.
    pub fn builder(store: K) -> CachedStoreBuilder<K> {
        CachedStoreBuilder {
            store,
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            max_staleness: Duration::from_secs(300),
            store_timeout: Duration::from_secs(1),
            capacity: (100_000, 100_000),
            clock: None,
        }
    }

    /// A handle that does not keep the cache alive (for background listeners).
    #[cfg(feature = "redis")]
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Shared<K>> {
        Arc::downgrade(&self.shared)
    }

    /// The cache behind a handle from [`downgrade`](Self::downgrade), if it lives.
    #[cfg(feature = "redis")]
    pub(crate) fn from_handle(weak: &std::sync::Weak<Shared<K>>) -> Option<Self> {
        weak.upgrade().map(|shared| CachedStore { shared })
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &K {
        &self.shared.store
    }

    /// Forgets `digest`, known or unknown: the next lookup asks the store.
    pub fn invalidate(&self, digest: &KeyDigest) {
        #[cfg(feature = "metrics")]
        crate::metrics::cache_event("invalidation");
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        // The flight first, then the tables: see `Table::put_unless`.
        if let Some(flight) = self.shared.flights().remove(digest) {
            flight.stale.store(true, Ordering::SeqCst);
        }
        self.shared.known.remove(digest);
        self.shared.unknown.remove(digest);
    }

    /// Forgets everything (e.g. after missing invalidations while disconnected).
    pub fn invalidate_all(&self) {
        #[cfg(feature = "metrics")]
        crate::metrics::cache_event("invalidation");
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (_, flight) in self.shared.flights().drain() {
            flight.stale.store(true, Ordering::SeqCst);
        }
        self.shared.known.clear();
        self.shared.unknown.clear();
    }

    /// How many lookups reached the store so far.
    pub fn store_lookups(&self) -> u64 {
        self.shared.store_lookups.load(Ordering::Relaxed)
    }

    /// How many invalidations this cache has had (local writes and announcements).
    pub fn invalidations(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }

    /// How many known and unknown digests are cached.
    pub fn cached(&self) -> (usize, usize) {
        (self.shared.known.len(), self.shared.unknown.len())
    }
}

impl<K> Shared<K> {
    #[inline]
    fn now(&self) -> u64 {
        match &self.clock {
            None => SystemClock.now().as_unix_secs(),
            Some(clock) => clock.now().as_unix_secs(),
        }
    }
}

impl<K> Shared<K> {
    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<KeyDigest, Arc<Flight>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: KeyStore> Shared<K> {
    /// Asks the store, once however many callers wait on the same digest, and again when an
    /// invalidation of the digest made the answer stale on its way.
    async fn fetch(self: Arc<Self>, digest: KeyDigest, now: u64) -> LookupResult {
        for _ in 0..ATTEMPTS {
            let flight = self.flights().entry(digest).or_default().clone();
            let outcome = flight
                .outcome
                .get_or_init(|| async {
                    self.store_lookups.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(self.store_timeout, self.store.lookup(&digest)).await
                    {
                        Ok(found) => found.map_err(Arc::new),
                        Err(_) => Err(Arc::new(StoreError::new("key store lookup timed out"))),
                    }
                })
                .await
                .clone();
            {
                let mut flights = self.flights();
                if flights
                    .get(&digest)
                    .is_some_and(|f| Arc::ptr_eq(f, &flight))
                {
                    flights.remove(&digest);
                }
            }
            if flight.stale.load(Ordering::SeqCst) {
                continue;
            }
            return match outcome {
                Ok(Some(record)) => {
                    self.unknown.remove(&digest);
                    self.known
                        .put_unless(record.clone(), now, self.max_staleness, &flight.stale);
                    Ok(Some(record))
                }
                Ok(None) => {
                    self.known.remove(&digest);
                    self.unknown
                        .put_unless(Unknown(digest), now, self.negative_ttl, &flight.stale);
                    Ok(None)
                }
                Err(error) => match self.known.get(&digest) {
                    Some((record, fetched))
                        if now.saturating_sub(fetched) <= self.max_staleness =>
                    {
                        tracing::warn!(target: "tower_gateway_auth::store", key_id = %record.id(), %error, age_secs = now.saturating_sub(fetched), "key store failed: serving the cached record");
                        #[cfg(feature = "metrics")]
                        crate::metrics::cache_event("stale");
                        Ok(Some(record))
                    }
                    _ => Err(StoreError::new(error.message().to_owned())),
                },
            };
        }
        Err(StoreError::new(
            "the key kept changing while it was looked up",
        ))
    }
}

opaque_ready_or_boxed! {
    /// The lookup future of a [`CachedStore`]: ready at once on a hit.
    pub struct CachedLookup => LookupResult;
}

impl<K: KeyStore> KeyStore for CachedStore<K> {
    type Lookup = CachedLookup;

    #[inline]
    fn lookup(&self, digest: &KeyDigest) -> CachedLookup {
        let shared = &self.shared;
        let now = shared.now();
        if let Some((record, fetched)) = shared.known.get(digest)
            && now.saturating_sub(fetched) < shared.ttl
        {
            #[cfg(feature = "metrics")]
            crate::metrics::cache_event("hit");
            return CachedLookup(ReadyOrBoxed::ready(Ok(Some(record))));
        }
        if let Some((_, fetched)) = shared.unknown.get(digest)
            && now.saturating_sub(fetched) < shared.negative_ttl
        {
            #[cfg(feature = "metrics")]
            crate::metrics::cache_event("negative_hit");
            return CachedLookup(ReadyOrBoxed::ready(Ok(None)));
        }
        #[cfg(feature = "metrics")]
        crate::metrics::cache_event("miss");
        CachedLookup(ReadyOrBoxed::boxed(shared.clone().fetch(*digest, now)))
    }

    fn hasher(&self) -> &KeyHasher {
        self.shared.store.hasher()
    }
}

impl<K: KeyAdmin> KeyAdmin for CachedStore<K> {
    async fn get(&self, id: KeyId) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        self.shared.store.get(id).await
    }

    async fn list(&self) -> Result<Vec<Arc<KeyRecord>>, StoreError> {
        self.shared.store.list().await
    }

    /// Applies the writes to the store, then forgets every digest they touched here (other
    /// replicas learn of it through the store's own fan-out, if it has one).
    async fn apply(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let touched: Vec<KeyDigest> = writes.iter().map(|w| *w.record().digest()).collect();
        let result = self.shared.store.apply(writes).await;
        for digest in &touched {
            self.invalidate(digest);
        }
        result
    }

    async fn note_uses(&self, uses: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        self.shared.store.note_uses(uses).await
    }

    async fn last_used(&self, ids: Vec<KeyId>) -> Result<Vec<Option<Timestamp>>, StoreError> {
        self.shared.store.last_used(ids).await
    }
}

impl<K> std::fmt::Debug for CachedStore<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("ttl_secs", &self.shared.ttl)
            .field("negative_ttl_secs", &self.shared.negative_ttl)
            .field("max_staleness_secs", &self.shared.max_staleness)
            .finish_non_exhaustive()
    }
}
