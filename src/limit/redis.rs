//! [`RedisLimiter`]: one limit per key shared by every gateway replica, in Redis or Redis
//! Cluster (feature `redis`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;

use super::memory::{MemoryLimiter, MemoryPermit};
use super::{Admission, Limiter, LimiterError, Limits, Quota, Usage};
use crate::clock::{Clock, Timestamp};
use crate::keys::KeyId;
use crate::redis_connection::{self, RedisConnection, Timeouts};

/// One decision, atomically, on the Redis clock.
///
/// `KEYS[1]`: the key's GCRA theoretical arrival time (µs since the epoch, a string with a
/// TTL at that time); `KEYS[2]`: its permits in flight, a sorted set of permit ids scored by
/// the end of their lease. `ARGV`: emission interval µs (0: no rate), the burst's span µs
/// (interval × burst), the most in flight (-1: no limit), the permit id, its lease µs, and
/// the time µs (empty: the server's `TIME`, which every replica then shares).
///
/// Answers `{outcome, remaining, reset µs, retry after µs, now µs}`, outcome 0 allowed,
/// 1 rate limited, 2 too many in flight. The arithmetic is `gcra::decide`'s, in µs; a
/// property test holds the two to the same answers.
const ADMIT: &str = r"
local now = tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local max = tonumber(ARGV[3])
if max >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max then return {2, 0, 0, 0, now} end
end
local remaining, reset = 0, 0
local t = tonumber(ARGV[1])
if t > 0 then
  local tau = tonumber(ARGV[2])
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local start = math.max(tat, now)
  local ahead = start + t - now
  if ahead > tau then return {1, 0, start - now, ahead - tau, now} end
  remaining = math.floor((tau - ahead) / t)
  reset = ahead
  redis.call('SET', KEYS[1], string.format('%d', start + t), 'PX', math.ceil(ahead / 1000))
end
if max >= 0 then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease / 1000))
end
return {0, remaining, reset, 0, now}
";

/// Where a key stands, read without spending: `{tat µs, permits in flight, now µs}`.
/// `ARGV[1]`: the time µs (empty: the server's).
const PEEK: &str = r"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
return {tat, redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf'), now}
";

/// What a [`RedisLimiter`] does with a request while Redis cannot be reached (or answers
/// later than the limiter's timeout).
///
/// In the gateway's config: `on_redis_error = "refuse" | "allow" | "local"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WhenUnavailable {
    /// Refuse it: 503 `limiter_unavailable` (fail closed). The default: a limit that
    /// silently stops holding is a bill nobody agreed to.
    #[default]
    Refuse,
    /// Let it through unlimited, and send no rate-limit headers (fail open): for limits
    /// that protect nothing worth an outage.
    Allow,
    /// Limit it in this replica's memory instead ([`MemoryLimiter`]): each replica then
    /// holds the whole limit by itself, so `n` replicas pass up to `n` times the limit
    /// until Redis is back, when the shared count resumes (what was spent meanwhile is not
    /// carried over).
    Local,
}

/// The [`Limiter`] for several gateway replicas: each key's rate and requests in flight are
/// kept in Redis (standalone or Cluster), so the replicas together hold one limit.
///
/// - **One round trip per decision**: a Lua script checks and updates the key's state
///   atomically, on the Redis server's clock (replicas' clocks need not agree). A request
///   holding a concurrency permit costs one more command when its response ends (the
///   release, sent without waiting on it). The first decision of a process also loads the
///   script (`NOSCRIPT`, then `SCRIPT LOAD`, then again).
/// - **Cluster**: a key's two Redis keys are `{<namespace>:<key id>}:r` (rate) and
///   `{<namespace>:<key id>}:c` (in flight); the hash tag puts both in one slot, so the
///   script runs on the one master that owns the key, and keys spread over the masters.
/// - **Bounded memory**: the rate state expires when the allowance is whole again, and the
///   in-flight set when its last lease ends; Redis holds state only for active keys.
/// - **Leases**: a permit is a member of the in-flight set until it is released or its
///   lease ends (default 10 minutes), so a replica that dies with requests in flight does
///   not hold its keys' slots for ever. A response longer than the lease stops counting
///   when it ends: set the lease above your longest stream.
/// - **Redis down**: [`WhenUnavailable`] chooses (default: refuse, 503). A decision that
///   takes longer than the timeout (default 250 ms) counts as Redis down.
///
/// ```no_run
/// # async fn doc() -> Result<(), tower_gateway_auth::limit::LimiterError> {
/// use std::time::Duration;
/// use tower_gateway_auth::RateLimitLayer;
/// use tower_gateway_auth::limit::{Limits, Rate, RedisLimiter, WhenUnavailable};
///
/// let limiter = RedisLimiter::builder("redis://10.0.0.1:7000,redis://10.0.0.2:7000")
///     .namespace("gateway-eu")
///     .when_unavailable(WhenUnavailable::Local)
///     .timeout(Duration::from_millis(100))
///     .connect()
///     .await?;
/// let layer = RateLimitLayer::new(limiter)
///     .default_limits(Limits::new().with_rate(Rate::per_minute(60)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    connection: RedisConnection,
    namespace: String,
    when_unavailable: WhenUnavailable,
    local: MemoryLimiter,
    lease: Duration,
    timeout: Duration,
    /// Time for decisions; `None`: the Redis server's.
    clock: Option<Arc<dyn Clock>>,
    /// Whether the last decision found Redis down: a change of state is logged, not every
    /// request of an outage.
    down: AtomicBool,
    admit: redis::Script,
    peek: redis::Script,
}

/// Options for a [`RedisLimiter`], from [`RedisLimiter::builder`].
pub struct RedisLimiterBuilder {
    addresses: String,
    namespace: String,
    when_unavailable: WhenUnavailable,
    lease: Duration,
    timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
}

impl RedisLimiterBuilder {
    /// The prefix of the limiter's Redis keys (default `tga`); replicas that share a limit
    /// share a namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// What to do while Redis cannot be reached (default: refuse).
    pub fn when_unavailable(mut self, when: WhenUnavailable) -> Self {
        self.when_unavailable = when;
        self
    }

    /// How long a concurrency permit holds its slot when it is never released (default 10
    /// minutes, at least a second).
    pub fn permit_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(1));
        self
    }

    /// How long a decision may wait on Redis (default 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Decides by `clock` (e.g. a [`ManualClock`](crate::clock::ManualClock) in tests)
    /// instead of the Redis server's clock. Replicas with clocks of their own must keep
    /// them in step; the server's clock needs nothing of the kind, hence the default.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Connects. Fails when Redis cannot be reached now, whatever
    /// [`when_unavailable`](Self::when_unavailable) says: a gateway should not start on a
    /// limit it has never been able to check.
    pub async fn connect(self) -> Result<RedisLimiter, LimiterError> {
        let timeouts = Timeouts {
            connect: Duration::from_millis(500),
            response: self.timeout,
        };
        let connected = redis_connection::connect(&self.addresses, timeouts)
            .await
            .map_err(|e| LimiterError(e.to_string()))?;
        Ok(RedisLimiter {
            shared: Arc::new(Shared {
                connection: connected.connection,
                namespace: self.namespace,
                when_unavailable: self.when_unavailable,
                local: MemoryLimiter::new(),
                lease: self.lease,
                timeout: self.timeout,
                clock: self.clock,
                down: AtomicBool::new(false),
                admit: redis::Script::new(ADMIT),
                peek: redis::Script::new(PEEK),
            }),
        })
    }
}

/// The addresses are left out: a URL may hold a password.
impl fmt::Debug for RedisLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiterBuilder")
            .field("namespace", &self.namespace)
            .field("when_unavailable", &self.when_unavailable)
            .field("lease", &self.lease)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("namespace", &self.shared.namespace)
            .field("when_unavailable", &self.shared.when_unavailable)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// Options for a limiter on the Redis at `addresses`: one URL, or a Cluster's seed
    /// nodes joined by commas (as [`RedisStore`](crate::store::RedisStore) takes them).
    pub fn builder(addresses: impl Into<String>) -> RedisLimiterBuilder {
        RedisLimiterBuilder {
            addresses: addresses.into(),
            namespace: "tga".to_owned(),
            when_unavailable: WhenUnavailable::Refuse,
            lease: Duration::from_secs(600),
            timeout: Duration::from_millis(250),
            clock: None,
        }
    }

    /// Connects to `addresses` with the default options.
    pub async fn connect(addresses: &str) -> Result<Self, LimiterError> {
        Self::builder(addresses).connect().await
    }

    fn keys(&self, key: KeyId) -> [String; 2] {
        let ns = &self.shared.namespace;
        [format!("{{{ns}:{key}}}:r"), format!("{{{ns}:{key}}}:c")]
    }
}

/// A decision of the Redis script, as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    outcome: i64,
    remaining: u32,
    reset_us: u64,
    retry_us: u64,
    now_us: u64,
}

/// What the script is told of a key's limits.
#[derive(Debug, Clone, Copy)]
struct ScriptLimits {
    interval_us: u64,
    tau_us: u64,
    max: i64,
}

impl ScriptLimits {
    fn of(limits: &Limits) -> Self {
        // Lua numbers are doubles: 2^52 µs (142 years) is far past any real span and keeps
        // the script's arithmetic exact.
        const MAX_SPAN: u64 = 1 << 52;
        let (interval_us, tau_us) = match limits.rate() {
            None => (0, 0),
            Some(rate) => {
                let t = (rate.interval_nanos() / 1000).clamp(1, MAX_SPAN);
                (t, t.saturating_mul(rate.burst().into()).min(MAX_SPAN))
            }
        };
        ScriptLimits {
            interval_us,
            tau_us,
            max: limits.max_concurrent().map_or(-1, i64::from),
        }
    }
}

impl Shared {
    async fn run_admit(
        &self,
        keys: &[String; 2],
        limits: ScriptLimits,
        permit: &str,
        now_us: Option<u64>,
    ) -> Result<Decision, LimiterError> {
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(&keys[0])
            .key(&keys[1])
            .arg(limits.interval_us)
            .arg(limits.tau_us)
            .arg(limits.max)
            .arg(permit)
            .arg(u64::try_from(self.lease.as_micros()).unwrap_or(u64::MAX))
            .arg(now_us.map(|n| n.to_string()).unwrap_or_default());
        let answer = self.run(invocation).await?;
        let field = |i: usize| answer.get(i).copied().unwrap_or_default().max(0);
        Ok(Decision {
            outcome: answer.first().copied().unwrap_or(-1),
            remaining: u32::try_from(field(1)).unwrap_or(u32::MAX),
            reset_us: field(2) as u64,
            retry_us: field(3) as u64,
            now_us: field(4) as u64,
        })
    }

    /// Runs a script, within the timeout; its answer as numbers.
    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Vec<i64>, LimiterError> {
        let mut connection = self.connection.clone();
        tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| LimiterError("Redis did not answer in time".into()))?
            .map_err(|e| LimiterError(format!("Redis failed: {}", e.kind_name())))
    }

    /// Notes whether Redis answered, logging the changes.
    fn note(&self, up: bool) {
        let was_down = self.down.swap(!up, Ordering::Relaxed);
        if was_down && up {
            tracing::info!(target: "tower_gateway_auth::limit", "Redis answers the rate limiter again");
        }
    }
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for redis::RedisError {
    /// The kind only: Redis error texts can quote arguments back.
    fn kind_name(&self) -> String {
        if self.is_timeout() {
            "timeout".into()
        } else if self.is_io_error() || self.is_connection_dropped() {
            "connection lost".into()
        } else {
            format!("{:?}", self.kind())
        }
    }
}

/// Builds the [`Admission`] a script decision means.
fn admission(
    d: Decision,
    limits: &Limits,
    permit: Option<RedisPermit>,
) -> Result<Admission<RedisPermit>, LimiterError> {
    let quota = limits.rate().map(|rate| Quota {
        limit: rate.requests(),
        remaining: d.remaining,
        reset: Duration::from_micros(d.reset_us),
        reset_at: Timestamp::from_unix_secs(
            d.now_us.saturating_add(d.reset_us).div_ceil(1_000_000),
        ),
    });
    match (d.outcome, quota) {
        (0, quota) => Ok(Admission::Allowed { permit, quota }),
        (1, Some(quota)) => Ok(Admission::RateLimited {
            quota,
            retry_after: Duration::from_micros(d.retry_us),
        }),
        (2, _) => Ok(Admission::ConcurrencyLimited {
            max: limits.max_concurrent().unwrap_or_default(),
        }),
        _ => Err(LimiterError(
            "the Redis limiter script gave an unknown answer".into(),
        )),
    }
}

impl Limiter for RedisLimiter {
    type Permit = RedisPermit;
    type Future =
        Pin<Box<dyn Future<Output = Result<Admission<RedisPermit>, LimiterError>> + Send>>;

    fn admit(&self, key: KeyId, limits: &Limits) -> Self::Future {
        let limits = *limits;
        let this = self.clone();
        Box::pin(async move {
            if let Some(rate) = limits.rate()
                && rate.requests() == 0
            {
                // Refuses everything: no need to ask Redis.
                return Ok(match this.shared.local.admit(key, &limits).await? {
                    Admission::Allowed { .. } => unreachable!("a rate of 0 allows nothing"),
                    refused => map_local(refused),
                });
            }
            let keys = this.keys(key);
            let id = limits
                .max_concurrent()
                .map(|_| format!("{:016x}", getrandom::u64().unwrap_or_default()))
                .unwrap_or_default();
            let shared = &this.shared;
            let now_us = shared.clock.as_ref().map(|c| c.now_nanos() / 1000);
            match shared
                .run_admit(&keys, ScriptLimits::of(&limits), &id, now_us)
                .await
            {
                Ok(decision) => {
                    shared.note(true);
                    let permit =
                        (decision.outcome == 0 && limits.max_concurrent().is_some()).then(|| {
                            RedisPermit(Held::Shared {
                                shared: this.shared.clone(),
                                set: keys[1].clone(),
                                id,
                            })
                        });
                    admission(decision, &limits, permit)
                }
                Err(error) => {
                    if !shared.down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(target: "tower_gateway_auth::limit", %error, policy = ?shared.when_unavailable, "the rate limiter cannot reach Redis");
                    }
                    match shared.when_unavailable {
                        WhenUnavailable::Refuse => Err(error),
                        WhenUnavailable::Allow => Ok(Admission::Allowed {
                            permit: None,
                            quota: None,
                        }),
                        WhenUnavailable::Local => {
                            Ok(map_local(shared.local.admit(key, &limits).await?))
                        }
                    }
                }
            }
        })
    }

    fn usage(&self, key: KeyId, limits: &Limits) -> super::UsageFuture {
        let limits = *limits;
        let this = self.clone();
        Box::pin(async move {
            let keys = this.keys(key);
            let shared = &this.shared;
            let mut invocation = shared.peek.prepare_invoke();
            let now_us = shared.clock.as_ref().map(|c| c.now_nanos() / 1000);
            invocation
                .key(&keys[0])
                .key(&keys[1])
                .arg(now_us.map(|n| n.to_string()).unwrap_or_default());
            let answer = shared.run(invocation).await?;
            let field = |i: usize| answer.get(i).copied().unwrap_or_default().max(0) as u64;
            Ok(Usage::at(
                field(0).saturating_mul(1000),
                field(2).saturating_mul(1000),
                u32::try_from(field(1)).unwrap_or(u32::MAX),
                &limits,
            ))
        })
    }
}

fn map_local(admission: Admission<MemoryPermit>) -> Admission<RedisPermit> {
    match admission {
        Admission::Allowed { permit, quota } => Admission::Allowed {
            permit: permit.map(|p| RedisPermit(Held::Local(p))),
            quota,
        },
        Admission::RateLimited { quota, retry_after } => {
            Admission::RateLimited { quota, retry_after }
        }
        Admission::ConcurrencyLimited { max } => Admission::ConcurrencyLimited { max },
    }
}

/// One request's slot of its key's concurrency limit in a [`RedisLimiter`]: released when
/// dropped (a command sent on the runtime, not waited on), or at the end of its lease.
pub struct RedisPermit(Held);

enum Held {
    /// A member of the key's in-flight set in Redis.
    Shared {
        shared: Arc<Shared>,
        set: String,
        id: String,
    },
    /// Taken from this replica's memory while Redis was down.
    Local(MemoryPermit),
}

impl Drop for RedisPermit {
    fn drop(&mut self) {
        let Held::Shared { shared, set, id } = &mut self.0 else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime: the lease ends it.
        };
        let mut connection = shared.connection.clone();
        let (set, id, timeout) = (std::mem::take(set), std::mem::take(id), shared.timeout);
        runtime.spawn(async move {
            let mut release = redis::cmd("ZREM");
            release.arg(&set).arg(&id);
            let release = release.query_async::<i64>(&mut connection);
            // A release that fails leaves the slot to its lease.
            let _ = tokio::time::timeout(timeout * 4, release).await;
        });
    }
}

impl fmt::Debug for RedisPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Held::Shared { set, .. } => f.debug_tuple("RedisPermit").field(set).finish(),
            Held::Local(p) => f.debug_tuple("RedisPermit").field(p).finish(),
        }
    }
}
