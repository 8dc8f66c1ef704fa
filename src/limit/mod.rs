//! Per-key limits: request rate, requests in flight, tokens and model access.
//!
//! A [`KeyRecord`](crate::keys::KeyRecord) may carry [`Limits`] (a [`Rate`], a maximum of
//! concurrent requests, a token rate and a token [`Budget`]) and a [`ModelList`]; a layer
//! may set defaults for keys that carry none. Two layers enforce them, both inside the
//! inbound layer (they read the [`Identity`](crate::Identity) it leaves in the request
//! extensions):
//!
//! 1. [`RateLimitLayer`]: GCRA per key (one "theoretical arrival time" per key, as the
//!    `governor` crate does, no background task) and a count of requests in flight, whose
//!    permit is held until the response body has ended or been dropped, so that a stream
//!    counts until it finishes or the client leaves. Tokens are judged in the same
//!    decision (a token rate is a GCRA whose cost, the response's usage, is charged when
//!    the response ends; a budget is a count per calendar period) and charged from the
//!    usage read as the response streams through ([`crate::tokens`]). A refusal is 429 with
//!    `Retry-After`; every answer carries the provider's rate-limit headers (see below).
//! 2. [`ModelAccessLayer`]: reads the model from the path (Gemini, Azure) or from the
//!    top-level `"model"` of a JSON body, buffering at most a bound and passing the body on
//!    byte for byte, and refuses a model the key may not use with 403 `model_not_allowed`.
//!
//! Put the rate limit outside the model check: a client past its rate then costs no body
//! buffering.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_gateway_auth::{InboundApiKeyLayer, RateLimitLayer};
//! use tower_gateway_auth::limit::{Limits, MemoryLimiter, ModelAccessLayer, Rate};
//! use tower_gateway_auth::store::MemoryStore;
//!
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "ok" }))
//!     .layer(ModelAccessLayer::new())
//!     .layer(
//!         RateLimitLayer::new(MemoryLimiter::new())
//!             .default_limits(Limits::new().with_rate(Rate::per_minute(60)).with_max_concurrent(4)),
//!     )
//!     .layer(InboundApiKeyLayer::new(MemoryStore::new()));
//! ```
//!
//! # Whose allowance a request uses
//!
//! Requests count against the key's [`origin`](crate::Identity::origin): an ephemeral key
//! uses its parent's allowance (a browser key must not multiply it), and a rotated key's
//! successor continues its predecessor's. An ephemeral key is minted with copies of its
//! parent's limits and models, so it can never be allowed more than its parent had at
//! that time; a later change to the parent reaches children minted after it (children live
//! a minute by default).
//!
//! # Headers
//!
//! Both families are sent on every answer of a rate-limited key, whatever the route's
//! dialect: clients read the family they know and ignore the other, and a gateway fronting
//! several providers then needs no setting for it.
//!
//! | header | value |
//! |---|---|
//! | `x-ratelimit-limit-requests`, `anthropic-ratelimit-requests-limit` | requests per period |
//! | `x-ratelimit-remaining-requests`, `anthropic-ratelimit-requests-remaining` | requests that would pass now |
//! | `x-ratelimit-reset-requests` | time until the allowance is whole again, as a Go duration (`1s`, `6m0s`) |
//! | `anthropic-ratelimit-requests-reset` | the same as an RFC 3339 time |
//! | `Retry-After` (429 only) | whole seconds, rounded up |
//! | `x-ratelimit-limit-tokens`, `anthropic-ratelimit-tokens-limit` | tokens per period (of the token rate, or the budget: whichever leaves fewer) |
//! | `x-ratelimit-remaining-tokens`, `anthropic-ratelimit-tokens-remaining` | tokens left before this request |
//! | `x-ratelimit-reset-tokens`, `anthropic-ratelimit-tokens-reset` | until that allowance is whole again (the budget period's end), Go duration / RFC 3339 |
//!
//! # Tokens
//!
//! A request is refused for tokens only before it starts (its usage is known once its
//! response has streamed), so one request may overshoot what was left by its own usage, and
//! requests in flight together by theirs: bound that with a concurrency limit. A spent
//! token rate is 429 `rate_limit_exceeded` (OpenAI type `tokens`), a spent budget 429
//! `insufficient_quota` with `Retry-After` until the period ends. For keys whose tokens
//! count, [`ModelAccessLayer`] asks streamed OpenAI completions for their usage
//! ([`ModelAccessLayer::include_usage`]), and the request's `Accept-Encoding` becomes
//! `identity` (a compressed answer would hide its usage).
//!
//! # Backends
//!
//! A [`Limiter`] decides. [`MemoryLimiter`] is exact within one process and answers at
//! once with a ready future, so the hot path neither boxes nor waits. `RedisLimiter`
//! (feature `redis`) is shared by replicas: one atomic Lua script per decision over
//! hash-tagged keys (`{ns:key_id}`), so that it runs on Redis Cluster too, with a choice of
//! what happens while Redis is down (`WhenUnavailable`).

mod access;
mod body;
mod budget;
mod gcra;
mod layer;
mod memory;
mod model;
#[cfg(feature = "redis")]
mod redis;
mod scan;

pub use access::{
    BoxError, DEFAULT_MAX_BUFFER, DEFAULT_USAGE_BUFFER, ModelAccess, ModelAccessFuture,
    ModelAccessLayer, ReplayBody, UnknownModel,
};
pub use body::{LimitBody, Metered};
pub use budget::{Budget, BudgetPeriod};
pub use layer::{Charge, RateLimit, RateLimitBody, RateLimitFuture, RateLimitLayer};
pub use memory::{MemoryLimiter, MemoryPermit};
pub use model::ModelList;
#[cfg(feature = "redis")]
pub use redis::{RedisLimiter, RedisLimiterBuilder, RedisPermit, WhenUnavailable};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::Timestamp;
use crate::keys::KeyId;

/// A request rate: `requests` per `period`, with up to `burst` at one instant.
///
/// Periods are whole seconds (they are stored so); the burst defaults to `requests`, so a
/// fresh key may spend its whole allowance at once and then one request per
/// `period / requests`.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::limit::Rate;
///
/// let rate = Rate::per_minute(60).with_burst(10);
/// assert_eq!(rate.requests(), 60);
/// assert_eq!(rate.period(), Duration::from_secs(60));
/// assert_eq!(rate.burst(), 10);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    requests: u32,
    period_secs: u32,
    burst: u32,
    /// The emission interval in ns, derived from the two above and kept: it saves a
    /// division on every decision.
    interval: u64,
}

impl Rate {
    /// `requests` per `period` (rounded up to whole seconds, at least one). A rate of 0
    /// requests refuses every request.
    pub fn new(requests: u32, period: Duration) -> Self {
        let secs = period.as_secs() + u64::from(period.subsec_nanos() > 0);
        let period_secs = u32::try_from(secs.max(1)).unwrap_or(u32::MAX);
        // Rounded down (at least 1 ns), so rounding never makes a limit stricter.
        let interval = (u64::from(period_secs) * 1_000_000_000 / u64::from(requests.max(1))).max(1);
        Rate {
            requests,
            period_secs,
            burst: requests,
            interval,
        }
    }

    /// `requests` per second.
    pub fn per_second(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(1))
    }

    /// `requests` per minute.
    pub fn per_minute(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(60))
    }

    /// `requests` per hour.
    pub fn per_hour(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(3600))
    }

    /// At most `burst` requests at one instant (at least one).
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// Requests per period.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_secs(self.period_secs.into())
    }

    /// The most requests at one instant.
    pub fn burst(&self) -> u32 {
        self.burst
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Rate({}/{}s, burst {})",
            self.requests, self.period_secs, self.burst
        )
    }
}

/// What a key may spend: a request [`Rate`], a maximum of requests in flight, a token rate
/// and a token [`Budget`], each optional. A field a key leaves unset falls back to the
/// layer's default.
///
/// Stored (key files, Redis) as
/// `{"requests_per_period":60,"period":60,"burst":10,"max_concurrent":2}`, `period` in
/// seconds (default 60), `burst` defaulting to `requests_per_period`; the token limits as
/// `"tokens_per_period":100000,"token_period":60` (`token_burst` defaulting to
/// `tokens_per_period`) and `"token_budget":1000000,"budget_period":"month"` (`day`,
/// `week`, `month`, the default, or `never`).
///
/// ```
/// use tower_gateway_auth::limit::{Limits, Rate};
///
/// let limits = Limits::new().with_rate(Rate::per_minute(60)).with_max_concurrent(2);
/// let json = serde_json::to_string(&limits).unwrap();
/// assert_eq!(json, r#"{"requests_per_period":60,"period":60,"burst":60,"max_concurrent":2}"#);
/// assert_eq!(serde_json::from_str::<Limits>(r#"{"requests_per_period":60}"#).unwrap().rate(),
///            Some(Rate::per_minute(60)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    rate: Option<Rate>,
    max_concurrent: Option<u32>,
    tokens: Option<Rate>,
    budget: Option<Budget>,
}

impl Limits {
    /// No limits.
    pub const fn new() -> Self {
        Limits {
            rate: None,
            max_concurrent: None,
            tokens: None,
            budget: None,
        }
    }

    /// Sets the token rate: [`Rate::requests`] counts tokens here (e.g.
    /// `Rate::per_minute(100_000)` for 100k tokens a minute).
    pub fn with_tokens(mut self, tokens: Rate) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Sets the token budget.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The token rate, if limited.
    pub fn tokens(&self) -> Option<Rate> {
        self.tokens
    }

    /// The token budget, if any.
    pub fn budget(&self) -> Option<Budget> {
        self.budget
    }

    /// Whether tokens are limited (a rate or a budget): the responses must then be read
    /// for their usage.
    pub fn counts_tokens(&self) -> bool {
        self.tokens.is_some() || self.budget.is_some()
    }

    /// Sets the request rate.
    pub fn with_rate(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Sets the most requests in flight at once (0 refuses every request).
    pub fn with_max_concurrent(mut self, max: u32) -> Self {
        self.max_concurrent = Some(max);
        self
    }

    /// The request rate, if limited.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// The most requests in flight, if limited.
    pub fn max_concurrent(&self) -> Option<u32> {
        self.max_concurrent
    }

    /// Whether nothing is limited.
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.max_concurrent.is_none() && !self.counts_tokens()
    }

    /// Each limit of `self`, or `defaults`' where `self` has none.
    pub fn or(self, defaults: &Limits) -> Limits {
        Limits {
            rate: self.rate.or(defaults.rate),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
            tokens: self.tokens.or(defaults.tokens),
            budget: self.budget.or(defaults.budget),
        }
    }
}

/// Unknown fields are refused: a misspelt limit (`rpm`) must not silently mean no limit.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsForm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    requests_per_period: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens_per_period: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_period: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_budget: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget_period: Option<BudgetPeriod>,
}

impl Serialize for Limits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        LimitsForm {
            requests_per_period: self.rate.map(|r| r.requests),
            period: self.rate.map(|r| r.period_secs),
            burst: self.rate.map(|r| r.burst),
            max_concurrent: self.max_concurrent,
            tokens_per_period: self.tokens.map(|r| r.requests),
            token_period: self.tokens.map(|r| r.period_secs),
            token_burst: self.tokens.map(|r| r.burst),
            token_budget: self.budget.map(|b| b.tokens()),
            budget_period: self.budget.map(|b| b.period()),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let form = LimitsForm::deserialize(d)?;
        let rate = |n: Option<u32>, period: Option<u32>, burst: Option<u32>| {
            n.map(|n| {
                let rate = Rate::new(n, Duration::from_secs(period.unwrap_or(60).into()));
                burst.map_or(rate, |b| rate.with_burst(b))
            })
        };
        if form.budget_period.is_some() && form.token_budget.is_none() {
            return Err(serde::de::Error::custom(
                "budget_period needs a token_budget",
            ));
        }
        Ok(Limits {
            rate: rate(form.requests_per_period, form.period, form.burst),
            max_concurrent: form.max_concurrent,
            tokens: rate(form.tokens_per_period, form.token_period, form.token_burst),
            budget: form
                .token_budget
                .map(|n| Budget::new(n, form.budget_period.unwrap_or_default())),
        })
    }
}

/// Where a key stands against its rate, for the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period.
    pub limit: u32,
    /// Requests that would pass now.
    pub remaining: u32,
    /// How long until the allowance is whole again.
    pub reset: Duration,
    /// When the allowance is whole again, by the limiter's clock (rounded up).
    pub reset_at: Timestamp,
}

/// Where a key stands against its tokens, for the token headers: its token rate, or its
/// budget, whichever leaves fewer tokens (the one that will refuse first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenQuota {
    /// Tokens per period (of the rate, or of the budget).
    pub limit: u64,
    /// Tokens left now (before this request's usage, which is known only when its
    /// response ends).
    pub remaining: u64,
    /// How long until the allowance is whole again (the rate's refill, or the budget
    /// period's end); `None` for a budget that never starts again.
    pub reset: Option<Duration>,
    /// When, by the limiter's clock (rounded up).
    pub reset_at: Option<Timestamp>,
}

/// The token side of a decision, from a key's stored token state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenVerdict {
    Pass(Option<TokenQuota>),
    Rate(TokenQuota, Duration),
    Budget(TokenQuota, Option<Duration>),
}

/// Judges a key whose token TAT is `tat` (ns) and whose budget has `used` tokens spent in
/// the current period, at `now` (ns). The Redis script makes the same two tests.
pub(crate) fn judge_tokens(tat: u64, used: u64, now: u64, limits: &Limits) -> TokenVerdict {
    let secs = |ns: u64| Timestamp::from_unix_secs(ns.div_ceil(1_000_000_000));
    let rate = limits.tokens.map(|rate| {
        let (remaining, reset, retry) = gcra::tokens_at(tat, now, &rate);
        let quota = TokenQuota {
            limit: rate.requests().into(),
            remaining,
            reset: Some(Duration::from_nanos(reset)),
            reset_at: Some(secs(now.saturating_add(reset))),
        };
        (quota, retry)
    });
    let budget = limits.budget.map(|budget| {
        let end = budget.period().end_after(now / 1_000_000_000);
        let reset = end.map(|end| Duration::from_nanos((end * 1_000_000_000).saturating_sub(now)));
        TokenQuota {
            limit: budget.tokens(),
            remaining: budget.tokens().saturating_sub(used),
            reset,
            reset_at: end.map(Timestamp::from_unix_secs),
        }
    });
    if let Some(quota) = budget
        && quota.remaining == 0
    {
        return TokenVerdict::Budget(quota, quota.reset);
    }
    if let Some((quota, retry)) = rate
        && quota.remaining == 0
    {
        return TokenVerdict::Rate(quota, Duration::from_nanos(retry));
    }
    TokenVerdict::Pass(match (rate, budget) {
        (Some((r, _)), Some(b)) => Some(if b.remaining < r.remaining { b } else { r }),
        (Some((r, _)), None) => Some(r),
        (None, b) => b,
    })
}

/// A limiter's decision on one request.
#[derive(Debug)]
#[non_exhaustive]
pub enum Admission<P> {
    /// The request may go on. `permit` (when the key has a concurrency limit) is held until
    /// the response body has ended or been dropped; `quota` (when it has a rate) and
    /// `tokens` (when it has token limits) are told to the client.
    Allowed {
        /// Released on drop.
        permit: Option<P>,
        /// Where the key stands after this request.
        quota: Option<Quota>,
        /// Where the key stands against its tokens before this request's usage.
        tokens: Option<TokenQuota>,
    },
    /// The key's token rate is used up: try again after `retry_after`.
    TokensLimited {
        /// Where the key stands.
        tokens: TokenQuota,
        /// How long until a token is there again.
        retry_after: Duration,
    },
    /// The key's token budget for the period is spent.
    BudgetExhausted {
        /// Where the key stands.
        tokens: TokenQuota,
        /// How long until the period ends; `None` for a budget that never starts again.
        retry_after: Option<Duration>,
    },
    /// The key's rate is used up: try again after `retry_after`.
    RateLimited {
        /// Where the key stands.
        quota: Quota,
        /// How long until one more request would pass.
        retry_after: Duration,
    },
    /// The key has `max` requests in flight already.
    ConcurrencyLimited {
        /// The key's maximum.
        max: u32,
    },
}

/// Where a key stands now, read without spending anything (for `GET /keys/{id}` of the
/// management API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Usage {
    /// Requests in flight now.
    pub in_flight: u32,
    /// With a rate: the requests counted in the window now, those whose share of the
    /// allowance has not come back yet.
    pub in_window: Option<u32>,
    /// With a rate: requests that would pass now.
    pub remaining: Option<u32>,
    /// With a rate: how long until the allowance is whole again.
    pub reset: Option<Duration>,
    /// With a token rate: tokens that may still be used now.
    pub tokens_remaining: Option<u64>,
    /// With a budget: tokens used in the current period.
    pub budget_used: Option<u64>,
    /// With a budget: tokens left in the current period.
    pub budget_remaining: Option<u64>,
    /// With a budget that starts again: when.
    pub budget_resets_at: Option<Timestamp>,
}

impl Usage {
    /// The usage of a key whose stored GCRA time is `tat` (ns, 0 for none) at `now` (ns),
    /// with `in_flight` requests under way.
    pub(crate) fn at(tat: u64, now: u64, in_flight: u32, limits: &Limits) -> Self {
        let mut usage = Usage {
            in_flight,
            ..Usage::default()
        };
        if let Some(rate) = limits.rate() {
            let (in_window, remaining, reset) = gcra::peek(tat, now, &rate);
            usage.in_window = Some(in_window);
            usage.remaining = Some(remaining);
            usage.reset = Some(Duration::from_nanos(reset));
        }
        usage
    }

    /// Adds the token side: token TAT `tat` (ns) and `used` budget tokens at `now` (ns).
    pub(crate) fn with_tokens(mut self, tat: u64, used: u64, now: u64, limits: &Limits) -> Self {
        if let Some(rate) = limits.tokens() {
            self.tokens_remaining = Some(gcra::tokens_at(tat, now, &rate).0);
        }
        if let Some(budget) = limits.budget() {
            self.budget_used = Some(used);
            self.budget_remaining = Some(budget.tokens().saturating_sub(used));
            self.budget_resets_at = budget
                .period()
                .end_after(now / 1_000_000_000)
                .map(Timestamp::from_unix_secs);
        }
        self
    }
}

/// The future of [`Limiter::usage`]: boxed, since it is not on the request path.
pub type UsageFuture = Pin<Box<dyn Future<Output = Result<Usage, LimiterError>> + Send>>;

/// A limiter backend failed; the request is refused (503), not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterError(pub String);

impl fmt::Display for LimiterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limiter unavailable: {}", self.0)
    }
}

impl std::error::Error for LimiterError {}

/// Decides whether a key's request may go on, against its [`Limits`].
///
/// The decision is a future so that a shared backend (Redis) can wait on the network; an
/// in-process backend returns a ready one (`std::future::Ready`) that the layer resolves in
/// place, with no allocation and no clone of the inner service. Rate and concurrency are
/// one decision, so that a shared backend decides both in one round trip: a request refused
/// for concurrency spends no rate, and one refused for rate holds no permit.
pub trait Limiter: Send + Sync + 'static {
    /// Held while the request is in flight; releases its slot when dropped.
    type Permit: Send + Sync + 'static;
    /// The decision.
    type Future: Future<Output = Result<Admission<Self::Permit>, LimiterError>>
        + Send
        + Unpin
        + 'static;

    /// Decides on one request of the key `key` under `limits` (not empty).
    fn admit(&self, key: KeyId, limits: &Limits) -> Self::Future;

    /// Charges `tokens` used by one of `key`'s requests to its token rate and budget (a
    /// no-op for limits without them). Called when the response has ended; a shared
    /// backend sends it without waiting on it.
    fn charge(&self, key: KeyId, limits: &Limits, tokens: u64);

    /// Where the key `key` stands under `limits`, without spending anything.
    fn usage(&self, key: KeyId, limits: &Limits) -> UsageFuture;
}

impl<L: Limiter> Limiter for std::sync::Arc<L> {
    type Permit = L::Permit;
    type Future = L::Future;

    #[inline]
    fn admit(&self, key: KeyId, limits: &Limits) -> Self::Future {
        (**self).admit(key, limits)
    }

    fn usage(&self, key: KeyId, limits: &Limits) -> UsageFuture {
        (**self).usage(key, limits)
    }

    fn charge(&self, key: KeyId, limits: &Limits, tokens: u64) {
        (**self).charge(key, limits, tokens)
    }
}
