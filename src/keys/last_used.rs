//! When each key was last used: noted on the request path in memory, written to the store
//! off it, at most once a minute per key.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hashbrown::HashMap;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::keys::KeyId;
use crate::store::{KeyAdmin, StoreError};

/// How often noted uses are written, by default.
pub const DEFAULT_FLUSH_EVERY: Duration = Duration::from_secs(10);

/// The shards noted uses are spread over, so that requests on different keys rarely meet on
/// one lock.
const SHARDS: usize = 16;

/// Past this many uses waiting (a store down for long), the oldest are dropped: last-used
/// times are worth less than the memory of a gateway.
const MAX_WAITING: usize = 1 << 20;

type WriteFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;
type Writer = Arc<dyn Fn(Vec<(KeyId, Timestamp)>) -> WriteFuture + Send + Sync>;

/// Records when each key was last used, to the minute, for every store.
///
/// The [`InboundApiKeyLayer`](crate::InboundApiKeyLayer) given one
/// ([`last_used`](crate::InboundApiKeyLayer::last_used)) calls [`note`](Self::note) for
/// each accepted key: a lock on one of 16 shards and a hash-map probe, no I/O. The first use
/// of a key in a minute queues one write; every other use that minute costs nothing more. A
/// tokio task (spawned on the runtime of the first use, ended when the `LastUsed` is
/// dropped) writes what is queued every [`flush_every`](LastUsedBuilder::flush_every)
/// (default 10 s) in one batch, [`KeyAdmin::note_uses`]: a key used 10,000 times a minute
/// costs one store write a minute per replica. A failed write is retried with the next
/// batch; call [`flush`](Self::flush) on shutdown so the last minute is not lost.
///
/// The management API shows the times as `last_used_at` (RFC 3339, to the minute).
///
/// ```
/// use std::sync::Arc;
/// use tower_gateway_auth::InboundApiKeyLayer;
/// use tower_gateway_auth::keys::LastUsed;
/// use tower_gateway_auth::store::MemoryStore;
///
/// let store = Arc::new(MemoryStore::new());
/// let uses = LastUsed::new(store.clone());
/// let layer = InboundApiKeyLayer::from_shared(store).last_used(&uses);
/// ```
#[derive(Clone)]
pub struct LastUsed {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    writer: Writer,
    clock: Arc<dyn Clock>,
    every: Duration,
    started: AtomicBool,
    /// One flush at a time, so that a batch is never written after a later one.
    flushing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Shard {
    /// The minute (Unix seconds / 60) each key was last noted in.
    noted: HashMap<KeyId, u64>,
    /// Uses not written yet.
    waiting: Vec<(KeyId, Timestamp)>,
}

/// Options for [`LastUsed`].
pub struct LastUsedBuilder {
    writer: Writer,
    clock: Arc<dyn Clock>,
    every: Duration,
}

impl std::fmt::Debug for LastUsedBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastUsedBuilder")
            .field("flush_every", &self.every)
            .finish_non_exhaustive()
    }
}

impl LastUsedBuilder {
    /// The clock uses are timed by (tests); the system clock by default.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How often queued uses are written (at least 1 ms).
    pub fn flush_every(mut self, every: Duration) -> Self {
        self.every = every.max(Duration::from_millis(1));
        self
    }

    /// The recorder.
    pub fn build(self) -> LastUsed {
        LastUsed {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                writer: self.writer,
                clock: self.clock,
                every: self.every,
                started: AtomicBool::new(false),
                flushing: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

impl LastUsed {
    /// A recorder writing to `store`, with the defaults.
    pub fn new<A: KeyAdmin>(store: Arc<A>) -> Self {
        Self::builder(store).build()
    }

    /// Options for a recorder writing to `store`.
    pub fn builder<A: KeyAdmin>(store: Arc<A>) -> LastUsedBuilder {
        LastUsedBuilder {
            writer: Arc::new(move |uses| {
                let store = store.clone();
                Box::pin(async move { store.note_uses(uses).await })
            }),
            clock: Arc::new(SystemClock),
            every: DEFAULT_FLUSH_EVERY,
        }
    }

    /// Notes that `key` was used now.
    pub fn note(&self, key: KeyId) {
        let now = self.inner.clock.now().as_unix_secs();
        let minute = now / 60;
        let mut shard = self.inner.shard(key);
        if shard.noted.insert(key, minute) == Some(minute) {
            return;
        }
        shard
            .waiting
            .push((key, Timestamp::from_unix_secs(minute * 60)));
        drop(shard);
        self.start();
    }

    /// Writes every use noted so far, now.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    /// Spawns the writing task, once, on the runtime of the caller (if there is one; without
    /// one uses wait for [`flush`](Self::flush)).
    fn start(&self) {
        if self.inner.started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(write_every(weak, self.inner.every));
    }
}

/// Key ids are random: their low bits spread keys evenly.
fn shard_of(key: KeyId) -> usize {
    (key.as_u64() as usize) % SHARDS
}

async fn write_every(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match inner.flush().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(target: "tower_gateway_auth::last_used", "writing last-used times works again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(target: "tower_gateway_auth::last_used", %error, "cannot write last-used times; retrying");
            }
            Err(_) => {}
        }
    }
}

impl Inner {
    fn shard(&self, key: KeyId) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let _one = self.flushing.lock().await;
        let this_minute = self.clock.now().as_unix_secs() / 60;
        let mut batch = Vec::new();
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            batch.append(&mut shard.waiting);
            // Keys not used this minute need no memory of it.
            shard.noted.retain(|_, minute| *minute >= this_minute);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let result = (self.writer)(batch.clone()).await;
        if result.is_err() {
            // Back in front of what came since, so that the order of times per key holds.
            let mut waiting = 0;
            for shard in &*self.shards {
                waiting += shard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .waiting
                    .len();
            }
            let keep = MAX_WAITING.saturating_sub(waiting).min(batch.len());
            let batch = batch.split_off(batch.len() - keep);
            let mut by_shard: Vec<Vec<(KeyId, Timestamp)>> = vec![Vec::new(); SHARDS];
            for (key, at) in batch {
                by_shard[shard_of(key)].push((key, at));
            }
            for (shard, earlier) in self.shards.iter().zip(by_shard) {
                let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard.waiting.splice(0..0, earlier);
            }
        }
        result
    }
}

impl std::fmt::Debug for LastUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastUsed")
            .field("flush_every", &self.inner.every)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::keys::KeyRecord;
    use crate::store::{KeyStore, MemoryStore};

    #[tokio::test]
    async fn a_key_used_many_times_a_minute_is_written_once_that_minute() {
        let store = Arc::new(MemoryStore::new());
        let record = store.insert(KeyRecord::new(KeyId::random(), store.hasher().digest(b"k")));
        let clock = ManualClock::new(Timestamp::from_unix_secs(1_000_000_020));
        let uses = LastUsed::builder(store.clone())
            .clock(clock.clone())
            .flush_every(Duration::from_secs(3600))
            .build();
        for _ in 0..10_000 {
            uses.note(record.id());
        }
        let waiting: usize = uses
            .inner
            .shards
            .iter()
            .map(|s| s.lock().unwrap().waiting.len())
            .sum();
        assert_eq!(waiting, 1);
        uses.flush().await.unwrap();
        let minute = Timestamp::from_unix_secs(1_000_000_020 / 60 * 60);
        assert_eq!(
            store.last_used(vec![record.id()]).await.unwrap(),
            vec![Some(minute)]
        );

        clock.advance(Duration::from_secs(60));
        uses.note(record.id());
        uses.note(record.id());
        uses.flush().await.unwrap();
        let next = Timestamp::from_unix_secs(minute.as_unix_secs() + 60);
        assert_eq!(
            store.last_used(vec![record.id()]).await.unwrap(),
            vec![Some(next)]
        );
    }
}
