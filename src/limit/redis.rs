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
use super::{Admission, Limiter, LimiterError, Limits, Quota, TokenVerdict, Usage, judge_tokens};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::keys::KeyId;
use crate::redis_connection::{self, RedisConnection, Timeouts};

/// The start of every script: `now`, the time in µs the caller passed in `ARGV[$arg]` (a
/// manual clock, in tests), or else the server's own `TIME`, which every replica then shares.
macro_rules! lua_now {
    ($arg:literal) => {
        concat!(
            "local now = tonumber(ARGV[",
            $arg,
            "])\n",
            "if not now then\n",
            "  local t = redis.call('TIME')\n",
            "  now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n",
            "end\n",
        )
    };
}

/// One decision, atomically, on the Redis clock.
///
/// `KEYS`: the key's GCRA theoretical arrival time (µs since the epoch, a string with a TTL
/// at that time); its permits in flight (a sorted set of permit ids scored by the end of
/// their lease); its token rate's arrival time (µs); its budget's count for the current
/// period. `ARGV`: emission interval µs (0: no rate), the burst's span µs (interval ×
/// burst), the most in flight (-1: no limit), the permit id, its lease µs, the time µs
/// (empty: the server's `TIME`, which every replica then shares), the token interval µs (0:
/// no token rate), the token burst's span µs, and the budget (-1: none).
///
/// Every test comes before any change, so a refused request spends nothing. Answers
/// `{outcome, remaining, reset µs, retry after µs, now µs, token arrival µs, budget used}`,
/// outcome 0 allowed, 1 rate limited, 2 too many in flight, 3 token rate spent, 4 budget
/// spent. The arithmetic is `gcra::decide`'s and `judge_tokens`' in µs; a property test
/// holds the two backends to the same answers.
const ADMIT: &str = concat!(
    lua_now!(6),
    r"
local max = tonumber(ARGV[3])
if max >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max then return {2, 0, 0, 0, now, 0, 0} end
end
local remaining, reset, next = 0, 0, nil
local t = tonumber(ARGV[1])
if t > 0 then
  local tau = tonumber(ARGV[2])
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local start = math.max(tat, now)
  local ahead = start + t - now
  if ahead > tau then return {1, 0, start - now, ahead - tau, now, 0, 0} end
  remaining = math.floor((tau - ahead) / t)
  reset = ahead
  next = start + t
end
local used = 0
local budget = tonumber(ARGV[9])
if budget >= 0 then
  used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if used >= budget then return {4, 0, 0, 0, now, 0, used} end
end
local ttat = 0
local ti = tonumber(ARGV[7])
if ti > 0 then
  ttat = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tonumber(ARGV[8]) - math.max(ttat - now, 0) < ti then return {3, 0, 0, 0, now, ttat, used} end
end
if next then
  redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil(reset / 1000))
end
if max >= 0 then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease / 1000))
end
return {0, remaining, reset, 0, now, ttat, used}
"
);

/// Charges a response's tokens. `KEYS`: the token arrival time, the budget's count for the
/// period. `ARGV`: token interval µs (0: no token rate), tokens, `1` to count them in the
/// budget, the budget count's expiry (Unix secs, 0: none), the time µs (empty: `TIME`).
const CHARGE: &str = concat!(
    lua_now!(5),
    r"
local n = tonumber(ARGV[2])
local ti = tonumber(ARGV[1])
if ti > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local next = math.max(tat, now) + n * ti
  redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000))
end
if ARGV[3] == '1' then
  redis.call('INCRBY', KEYS[2], n)
  local at = tonumber(ARGV[4])
  if at > 0 then redis.call('EXPIREAT', KEYS[2], at) end
end
return 1
"
);

/// Where a key stands, read without spending: `{tat µs, permits in flight, now µs, token
/// arrival µs, budget used}`. `ARGV[1]`: the time µs (empty: the server's).
const PEEK: &str = concat!(
    lua_now!(1),
    r"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttat = tonumber(redis.call('GET', KEYS[3]) or '0')
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
return {tat, redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf'), now, ttat, used}
"
);

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
    charge: redis::Script,
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
                charge: redis::Script::new(CHARGE),
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

    /// The key's four Redis keys: rate, in flight, token rate, and the budget's count for
    /// the period that holds `now_secs`.
    fn keys(&self, key: KeyId, limits: &Limits, now_secs: u64) -> Keys {
        let ns = &self.shared.namespace;
        let end = limits.budget().and_then(|b| b.period().end_after(now_secs));
        let budget = match end {
            Some(end) => format!("{{{ns}:{key}}}:b:{end}"),
            None => format!("{{{ns}:{key}}}:b:never"),
        };
        Keys {
            names: [
                format!("{{{ns}:{key}}}:r"),
                format!("{{{ns}:{key}}}:c"),
                format!("{{{ns}:{key}}}:t"),
                budget,
            ],
            // An hour past the period's end: a replica whose clock is a little behind
            // still finds the count.
            budget_expiry: end.map_or(0, |end| end + 3600),
        }
    }

    /// The time decisions are made at, µs: the configured clock's, or `None` for the
    /// Redis server's.
    fn now_us(&self) -> Option<u64> {
        self.shared.clock.as_ref().map(|c| c.now_nanos() / 1000)
    }

    /// The time budget periods are named by, secs: the configured clock's, or the
    /// system's (a period's count is found by its end, so replicas must agree on the
    /// calendar day, not to the microsecond).
    fn now_secs(&self) -> u64 {
        match &self.shared.clock {
            Some(clock) => clock.now_nanos() / 1_000_000_000,
            None => SystemClock.now().as_unix_secs(),
        }
    }
}

/// A key's Redis keys.
struct Keys {
    names: [String; 4],
    budget_expiry: u64,
}

/// A decision of the Redis script, as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    outcome: i64,
    remaining: u32,
    reset_us: u64,
    retry_us: u64,
    now_us: u64,
    token_tat_us: u64,
    budget_used: u64,
}

/// Lua numbers are doubles: 2^52 µs (142 years) is far past any real span and keeps the
/// scripts' arithmetic exact.
const MAX_SPAN: u64 = 1 << 52;

/// A rate as the scripts take it: the emission interval and the burst's span, µs.
fn script_rate(rate: Option<super::Rate>) -> (u64, u64) {
    match rate {
        None => (0, 0),
        Some(rate) => {
            let t = (rate.interval_nanos() / 1000).clamp(1, MAX_SPAN);
            (t, t.saturating_mul(rate.burst().into()).min(MAX_SPAN))
        }
    }
}

impl Shared {
    async fn run_admit(
        &self,
        keys: &Keys,
        limits: &Limits,
        permit: &str,
        now_us: Option<u64>,
    ) -> Result<Decision, LimiterError> {
        let (interval, tau) = script_rate(limits.rate());
        let (token_interval, token_tau) = script_rate(limits.tokens());
        let budget = limits.budget().map_or(-1, |b| {
            i64::try_from(b.tokens().min(MAX_SPAN)).unwrap_or(i64::MAX)
        });
        let mut invocation = self.admit.prepare_invoke();
        for name in &keys.names {
            invocation.key(name);
        }
        invocation
            .arg(interval)
            .arg(tau)
            .arg(limits.max_concurrent().map_or(-1, i64::from))
            .arg(permit)
            .arg(u64::try_from(self.lease.as_micros()).unwrap_or(u64::MAX))
            .arg(now_us.map(|n| n.to_string()).unwrap_or_default())
            .arg(token_interval)
            .arg(token_tau)
            .arg(budget);
        let answer = self.run(invocation).await?;
        let field = |i: usize| answer.get(i).copied().unwrap_or_default().max(0) as u64;
        Ok(Decision {
            outcome: answer.first().copied().unwrap_or(-1),
            remaining: u32::try_from(field(1)).unwrap_or(u32::MAX),
            reset_us: field(2),
            retry_us: field(3),
            now_us: field(4),
            token_tat_us: field(5),
            budget_used: field(6),
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

    /// Notes that Redis failed (logging the first failure of an outage).
    fn failed(&self, error: &LimiterError) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "tower_gateway_auth::limit", %error, policy = ?self.when_unavailable, "the rate limiter cannot reach Redis");
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
    let now = d.now_us.saturating_mul(1000);
    let tokens = || {
        judge_tokens(
            d.token_tat_us.saturating_mul(1000),
            d.budget_used,
            now,
            limits,
        )
    };
    // The quota told is computed as the memory limiter computes it; the verdict is the
    // script's (they agree but for sub-µs rounding, which the script's side wins).
    let token_quota = |v: TokenVerdict| match v {
        TokenVerdict::Pass(q) => q,
        TokenVerdict::Rate(q, _) | TokenVerdict::Budget(q, _) => Some(q),
    };
    match (d.outcome, quota) {
        (0, quota) => Ok(Admission::Allowed {
            permit,
            quota,
            tokens: if limits.counts_tokens() {
                token_quota(tokens())
            } else {
                None
            },
        }),
        (1, Some(quota)) => Ok(Admission::RateLimited {
            quota,
            retry_after: Duration::from_micros(d.retry_us),
        }),
        (2, _) => Ok(Admission::ConcurrencyLimited {
            max: limits.max_concurrent().unwrap_or_default(),
        }),
        (3, _) => {
            let verdict = tokens();
            let retry_after = match verdict {
                TokenVerdict::Rate(_, retry) => retry,
                _ => Duration::from_micros(1),
            };
            let mut quota = token_quota(verdict).expect("a token rate refused");
            quota.remaining = 0;
            Ok(Admission::TokensLimited {
                tokens: quota,
                retry_after,
            })
        }
        // The script's test (`used >= budget`) is `judge_tokens`' own, on the same count.
        (4, _) => match tokens() {
            TokenVerdict::Budget(tokens, retry_after) => Ok(Admission::BudgetExhausted {
                tokens,
                retry_after,
            }),
            _ => Err(LimiterError(
                "the Redis limiter script and the budget disagree".into(),
            )),
        },
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
            let keys = this.keys(key, &limits, this.now_secs());
            let id = limits
                .max_concurrent()
                .map(|_| format!("{:016x}", getrandom::u64().unwrap_or_default()))
                .unwrap_or_default();
            let shared = &this.shared;
            match shared.run_admit(&keys, &limits, &id, this.now_us()).await {
                Ok(decision) => {
                    shared.note(true);
                    let permit =
                        (decision.outcome == 0 && limits.max_concurrent().is_some()).then(|| {
                            RedisPermit(Held::Shared {
                                shared: this.shared.clone(),
                                set: keys.names[1].clone(),
                                id,
                            })
                        });
                    admission(decision, &limits, permit)
                }
                Err(error) => {
                    shared.failed(&error);
                    match shared.when_unavailable {
                        WhenUnavailable::Refuse => Err(error),
                        WhenUnavailable::Allow => Ok(Admission::Allowed {
                            permit: None,
                            quota: None,
                            tokens: None,
                        }),
                        WhenUnavailable::Local => {
                            Ok(map_local(shared.local.admit(key, &limits).await?))
                        }
                    }
                }
            }
        })
    }

    fn charge(&self, key: KeyId, limits: &Limits, tokens: u64) {
        if !limits.counts_tokens() || tokens == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(target: "tower_gateway_auth::limit", key_id = %key, tokens, "no runtime to charge tokens to Redis on; not counted");
            return;
        };
        let limits = *limits;
        let this = self.clone();
        runtime.spawn(async move {
            let keys = this.keys(key, &limits, this.now_secs());
            let shared = &this.shared;
            let (interval, _) = script_rate(limits.tokens());
            let mut invocation = shared.charge.prepare_invoke();
            invocation
                .key(&keys.names[2])
                .key(&keys.names[3])
                .arg(interval)
                .arg(tokens.min(MAX_SPAN))
                .arg(if limits.budget().is_some() { "1" } else { "0" })
                .arg(keys.budget_expiry)
                .arg(this.now_us().map(|n| n.to_string()).unwrap_or_default());
            match shared.run(invocation).await {
                Ok(_) => shared.note(true),
                Err(error) => {
                    shared.failed(&error);
                    tracing::warn!(target: "tower_gateway_auth::limit", key_id = %key, tokens, %error, "tokens not charged to Redis");
                    if shared.when_unavailable == WhenUnavailable::Local {
                        shared.local.charge(key, &limits, tokens);
                    }
                }
            }
        });
    }

    fn usage(&self, key: KeyId, limits: &Limits) -> super::UsageFuture {
        let limits = *limits;
        let this = self.clone();
        Box::pin(async move {
            let keys = this.keys(key, &limits, this.now_secs());
            let shared = &this.shared;
            let mut invocation = shared.peek.prepare_invoke();
            for name in &keys.names {
                invocation.key(name);
            }
            invocation.arg(this.now_us().map(|n| n.to_string()).unwrap_or_default());
            let answer = shared.run(invocation).await?;
            let field = |i: usize| answer.get(i).copied().unwrap_or_default().max(0) as u64;
            let now = field(2).saturating_mul(1000);
            Ok(Usage::at(
                field(0).saturating_mul(1000),
                now,
                u32::try_from(field(1)).unwrap_or(u32::MAX),
                &limits,
            )
            .with_tokens(field(3).saturating_mul(1000), field(4), now, &limits))
        })
    }
}

fn map_local(admission: Admission<MemoryPermit>) -> Admission<RedisPermit> {
    match admission {
        Admission::Allowed {
            permit,
            quota,
            tokens,
        } => Admission::Allowed {
            permit: permit.map(|p| RedisPermit(Held::Local(p))),
            quota,
            tokens,
        },
        Admission::RateLimited { quota, retry_after } => {
            Admission::RateLimited { quota, retry_after }
        }
        Admission::ConcurrencyLimited { max } => Admission::ConcurrencyLimited { max },
        Admission::TokensLimited {
            tokens,
            retry_after,
        } => Admission::TokensLimited {
            tokens,
            retry_after,
        },
        Admission::BudgetExhausted {
            tokens,
            retry_after,
        } => Admission::BudgetExhausted {
            tokens,
            retry_after,
        },
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
