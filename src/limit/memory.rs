//! [`MemoryLimiter`]: exact limits within one process, in sharded tables.

use std::fmt;
use std::future::{Ready, ready};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::gcra;
use super::{
    Admission, Limiter, LimiterError, Limits, Quota, TokenVerdict, Usage, UsageFuture, judge_tokens,
};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::keys::KeyId;

/// Entries a shard holds before its first sweep of idle keys.
const FIRST_SWEEP: usize = 256;

/// The in-memory [`Limiter`]: GCRA and in-flight counts per key, exact within one process.
///
/// Keys are spread over shards (a few per core), each a table behind its own lock held
/// for a few nanoseconds per decision. Memory follows the number of active keys: a key's
/// entry is dropped once its allowance is whole again and nothing of it is in flight,
/// swept lazily when a shard has doubled since its last sweep (no background task), which
/// changes no answer (an idle entry means the same as none). Decisions are ready futures.
///
/// Time comes from a [`Clock`] ([`SystemClock`] by default, whose reads are a kernel tick
/// coarse: rates up to a few hundred per second per key are exact).
///
/// ```
/// use std::future::Future;
/// use tower_gateway_auth::clock::{ManualClock, Timestamp};
/// use tower_gateway_auth::keys::KeyId;
/// use tower_gateway_auth::limit::{Admission, Limiter, Limits, MemoryLimiter, Rate};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let limiter = MemoryLimiter::with_clock(ManualClock::new(Timestamp::from_unix_secs(1_000)));
/// let limits = Limits::new().with_rate(Rate::per_minute(2));
/// let key = KeyId::random();
/// assert!(matches!(limiter.admit(key, &limits).await, Ok(Admission::Allowed { .. })));
/// assert!(matches!(limiter.admit(key, &limits).await, Ok(Admission::Allowed { .. })));
/// assert!(matches!(limiter.admit(key, &limits).await, Ok(Admission::RateLimited { .. })));
/// # });
/// ```
pub struct MemoryLimiter<C = SystemClock> {
    table: Arc<Table>,
    clock: C,
}

struct Table {
    shards: Box<[Shard]>,
    hasher: DefaultHashBuilder,
    shift: u32,
}

impl Table {
    fn hash(&self, key: u64) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard that holds the key of `hash`: its top bits choose.
    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[(hash >> self.shift) as usize]
    }
}

/// Aligned to a cache line, so that two cores working on two shards do not share one.
#[repr(align(64))]
struct Shard(Mutex<Entries>);

struct Entries {
    table: HashTable<Entry>,
    sweep_at: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    key: u64,
    /// Kept for the table to grow without rehashing (its hasher is random per limiter).
    hash: u64,
    /// The GCRA theoretical arrival time, ns since the epoch (0: none).
    tat: u64,
    in_flight: u32,
    /// The token rate's theoretical arrival time, ns (0: none).
    token_tat: u64,
    /// Budget tokens used in the period that ends at `budget_end` (secs; `u64::MAX` for a
    /// budget that never starts again).
    budget_used: u64,
    budget_end: u64,
}

impl Entry {
    /// Budget tokens used in the period that ends at `end`: none when the stored count is
    /// of another period.
    fn used_in(&self, end: u64) -> u64 {
        if self.budget_end == end {
            self.budget_used
        } else {
            0
        }
    }

    /// Whether the entry means nothing any more: dropping it changes no answer.
    fn idle(&self, now: u64) -> bool {
        self.tat <= now
            && self.token_tat <= now
            && self.in_flight == 0
            && (self.budget_used == 0 || self.budget_end <= now / 1_000_000_000)
    }
}

/// The end (secs) of the budget period that holds `now` (ns), `u64::MAX` for never.
fn budget_end(limits: &Limits, now: u64) -> u64 {
    limits
        .budget()
        .and_then(|b| b.period().end_after(now / 1_000_000_000))
        .unwrap_or(u64::MAX)
}

impl MemoryLimiter<SystemClock> {
    /// A limiter on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }
}

impl Default for MemoryLimiter<SystemClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock> MemoryLimiter<C> {
    /// A limiter reading time from `clock` (e.g. a [`ManualClock`](crate::clock::ManualClock)
    /// in tests).
    pub fn with_clock(clock: C) -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (cores * 4).next_power_of_two().clamp(8, 256);
        let shards = (0..n)
            .map(|_| {
                Shard(Mutex::new(Entries {
                    table: HashTable::new(),
                    sweep_at: FIRST_SWEEP,
                }))
            })
            .collect();
        MemoryLimiter {
            table: Arc::new(Table {
                shards,
                hasher: DefaultHashBuilder::default(),
                shift: 64 - n.trailing_zeros(),
            }),
            clock,
        }
    }

    /// How many keys have an entry now (active, or not yet swept).
    pub fn len(&self) -> usize {
        self.table.shards.iter().map(|s| lock(s).table.len()).sum()
    }

    /// Whether no key has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `key`'s shard, locked, and the time now.
    fn at(&self, key: KeyId) -> At<'_> {
        let key = key.as_u64();
        let hash = self.table.hash(key);
        At {
            key,
            hash,
            now: self.clock.now_nanos(),
            entries: lock(self.table.shard(hash)),
        }
    }

    /// The decision, made synchronously.
    fn decide(&self, key: KeyId, limits: &Limits) -> Admission<MemoryPermit> {
        let mut at = self.at(key);
        let (key, hash, now) = (at.key, at.hash, at.now);
        let entry = at.entry();
        if let Some(max) = limits.max_concurrent
            && entry.in_flight >= max
        {
            return Admission::ConcurrencyLimited { max };
        }
        // Every test before any change: a request refused for tokens spends no rate.
        let rate = match limits.rate {
            None => None,
            Some(rate) => {
                let d = gcra::decide(entry.tat, now, &rate);
                let quota = Quota {
                    limit: rate.requests(),
                    remaining: d.remaining,
                    reset: Duration::from_nanos(d.reset),
                    reset_at: Timestamp::from_unix_secs(
                        now.saturating_add(d.reset).div_ceil(1_000_000_000),
                    ),
                };
                if !d.allowed {
                    return Admission::RateLimited {
                        quota,
                        retry_after: Duration::from_nanos(d.retry_after),
                    };
                }
                Some((quota, d.tat))
            }
        };
        let tokens = if limits.counts_tokens() {
            let used = entry.used_in(budget_end(limits, now));
            match judge_tokens(entry.token_tat, used, now, limits) {
                TokenVerdict::Pass(tokens) => tokens,
                TokenVerdict::Rate(tokens, retry_after) => {
                    return Admission::TokensLimited {
                        tokens,
                        retry_after,
                    };
                }
                TokenVerdict::Budget(tokens, retry_after) => {
                    return Admission::BudgetExhausted {
                        tokens,
                        retry_after,
                    };
                }
            }
        } else {
            None
        };
        let quota = rate.map(|(quota, tat)| {
            entry.tat = tat;
            quota
        });
        let permit = limits.max_concurrent.map(|_| {
            entry.in_flight += 1;
            MemoryPermit {
                table: self.table.clone(),
                key,
                hash,
            }
        });
        Admission::Allowed {
            permit,
            quota,
            tokens,
        }
    }
}

/// Where one key's decision, charge or reading is made: its shard locked, the time taken.
struct At<'a> {
    key: u64,
    hash: u64,
    now: u64,
    entries: MutexGuard<'a, Entries>,
}

impl At<'_> {
    /// The key's entry, made if it has none.
    fn entry(&mut self) -> &mut Entry {
        self.entries.entry(self.key, self.hash, self.now)
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, Entries> {
    // A panic while a shard was held leaves counts that are still consistent (every write
    // is one field), so the table stays usable.
    shard
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Entries {
    /// The key's entry, made when missing; sweeps idle entries first when the shard has
    /// grown to twice its size after the last sweep.
    fn entry(&mut self, key: u64, hash: u64, now: u64) -> &mut Entry {
        if self.table.find(hash, |e| e.key == key).is_none() && self.table.len() >= self.sweep_at {
            self.table.retain(|e| !e.idle(now));
            self.sweep_at = (self.table.len() * 2).max(FIRST_SWEEP);
        }
        self.table
            .entry(hash, |e| e.key == key, |e| e.hash)
            .or_insert(Entry {
                key,
                hash,
                tat: 0,
                in_flight: 0,
                token_tat: 0,
                budget_used: 0,
                budget_end: 0,
            })
            .into_mut()
    }
}

impl<C: Clock> Limiter for MemoryLimiter<C> {
    type Permit = MemoryPermit;
    type Future = Ready<Result<Admission<MemoryPermit>, LimiterError>>;

    #[inline]
    fn admit(&self, key: KeyId, limits: &Limits) -> Self::Future {
        ready(Ok(self.decide(key, limits)))
    }

    fn usage(&self, key: KeyId, limits: &Limits) -> UsageFuture {
        let at = self.at(key);
        let now = at.now;
        let end = budget_end(limits, now);
        let (tat, in_flight, token_tat, used) = at
            .entries
            .table
            .find(at.hash, |e| e.key == at.key)
            .map_or((0, 0, 0, 0), |e| {
                (e.tat, e.in_flight, e.token_tat, e.used_in(end))
            });
        let usage =
            Usage::at(tat, now, in_flight, limits).with_tokens(token_tat, used, now, limits);
        Box::pin(ready(Ok(usage)))
    }

    fn charge(&self, key: KeyId, limits: &Limits, tokens: u64) {
        if !limits.counts_tokens() || tokens == 0 {
            return;
        }
        let mut at = self.at(key);
        let now = at.now;
        let entry = at.entry();
        if let Some(rate) = limits.tokens() {
            entry.token_tat = gcra::charge(entry.token_tat, now, &rate, tokens);
        }
        if limits.budget().is_some() {
            let end = budget_end(limits, now);
            entry.budget_used = entry.used_in(end).saturating_add(tokens);
            entry.budget_end = end;
        }
    }
}

impl<C> fmt::Debug for MemoryLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("shards", &self.table.shards.len())
            .finish_non_exhaustive()
    }
}

/// One request's slot of its key's concurrency limit; released when dropped.
pub struct MemoryPermit {
    table: Arc<Table>,
    key: u64,
    hash: u64,
}

impl Drop for MemoryPermit {
    fn drop(&mut self) {
        let shard = self.table.shard(self.hash);
        let mut entries = lock(shard);
        if let Some(e) = entries.table.find_mut(self.hash, |e| e.key == self.key) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

impl fmt::Debug for MemoryPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPermit")
            .field("key", &KeyId::from_u64(self.key))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::limit::Rate;

    #[test]
    fn idle_keys_are_swept_and_keys_in_flight_are_kept() {
        let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
        let limiter = MemoryLimiter::with_clock(clock.clone());
        let shards = limiter.table.shards.len();
        let rate = Limits::new().with_rate(Rate::per_second(1));
        let held = Limits::new().with_max_concurrent(1);
        let permit = match limiter.decide(KeyId::from_u64(u64::MAX), &held) {
            Admission::Allowed { permit, .. } => permit.unwrap(),
            other => panic!("{other:?}"),
        };
        // 100 waves of keys that each go idle a second after their one request.
        for wave in 0..100u64 {
            for k in 0..(shards as u64 * 64) {
                let id = KeyId::from_u64(wave << 32 | k);
                assert!(matches!(
                    limiter.decide(id, &rate),
                    Admission::Allowed { .. }
                ));
            }
            clock.advance(Duration::from_secs(2));
        }
        let bound = 2 * shards * FIRST_SWEEP + shards * 64;
        assert!(limiter.len() <= bound, "{} > {bound}", limiter.len());
        // The key in flight kept its entry through every sweep.
        assert!(matches!(
            limiter.decide(KeyId::from_u64(u64::MAX), &held),
            Admission::ConcurrencyLimited { max: 1 }
        ));
        drop(permit);
        assert!(matches!(
            limiter.decide(KeyId::from_u64(u64::MAX), &held),
            Admission::Allowed { .. }
        ));
    }
}
