//! The generic cell rate algorithm, as a pure function of one stored time.
//!
//! A key's state is its "theoretical arrival time" (TAT): the time at which its allowance
//! would be whole again if no more requests came. A request at `now` passes when the TAT
//! it would leave is at most `burst` emission intervals ahead of `now`; each request moves
//! the TAT one interval (`period / requests`) on. A TAT at or before `now` is the same as
//! no state at all, which is what lets idle entries be dropped without changing any answer.

use super::Rate;

/// The outcome of one request under one rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Whether the request passes.
    pub(crate) allowed: bool,
    /// The TAT to store (unchanged when refused).
    pub(crate) tat: u64,
    /// Requests that would pass now, after this one.
    pub(crate) remaining: u32,
    /// Nanoseconds until the allowance is whole again.
    pub(crate) reset: u64,
    /// Nanoseconds until one more request would pass (0 when allowed).
    pub(crate) retry_after: u64,
}

const NANOS: u64 = 1_000_000_000;

impl Rate {
    /// The emission interval in nanoseconds: the time one request's share takes to come
    /// back.
    #[inline]
    pub(crate) fn interval_nanos(&self) -> u64 {
        self.interval
    }
}

/// Decides on one request at `now` for a key whose stored TAT is `tat` (0 for none).
#[inline]
pub(crate) fn decide(tat: u64, now: u64, rate: &Rate) -> Gcra {
    if rate.requests == 0 {
        let period = u64::from(rate.period_secs) * NANOS;
        return Gcra {
            allowed: false,
            tat,
            remaining: 0,
            reset: period,
            retry_after: period,
        };
    }
    let t = rate.interval_nanos();
    // The furthest ahead of `now` the TAT may be left: the whole burst's worth.
    let tau = t.saturating_mul(u64::from(rate.burst.max(1)));
    let start = tat.max(now);
    let next = start.saturating_add(t);
    let ahead = next - now;
    if ahead <= tau {
        Gcra {
            allowed: true,
            tat: next,
            remaining: u32::try_from((tau - ahead) / t).unwrap_or(u32::MAX),
            reset: ahead,
            retry_after: 0,
        }
    } else {
        Gcra {
            allowed: false,
            tat,
            remaining: 0,
            reset: start - now,
            retry_after: ahead - tau,
        }
    }
}

/// Where a key whose stored TAT is `tat` stands at `now`, spending nothing: the requests
/// whose share has not come back yet, those that would pass now, and ns until the
/// allowance is whole.
pub(crate) fn peek(tat: u64, now: u64, rate: &Rate) -> (u32, u32, u64) {
    if rate.requests == 0 {
        return (0, 0, u64::from(rate.period_secs) * NANOS);
    }
    let t = rate.interval_nanos();
    let burst = u64::from(rate.burst.max(1));
    let ahead = tat.saturating_sub(now);
    let in_window = ahead.div_ceil(t).min(burst);
    let remaining = (t.saturating_mul(burst).saturating_sub(ahead)) / t;
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    (clamp(in_window), clamp(remaining), ahead)
}

/// Where a key whose token TAT is `tat` stands against a token `rate` at `now`: tokens it
/// may still use (0 in debt), ns until the allowance is whole, and ns until at least one
/// token is there again (0 when there is one now).
///
/// Tokens are charged after the response, when its usage is known ([`charge`]): a request
/// passes while at least one token is left, and may leave the key in debt, which later
/// requests wait out. One request can so overshoot the rate by its own usage.
pub(crate) fn tokens_at(tat: u64, now: u64, rate: &Rate) -> (u64, u64, u64) {
    if rate.requests == 0 {
        let period = u64::from(rate.period_secs) * NANOS;
        return (0, period, period);
    }
    let t = rate.interval_nanos();
    let tau = t.saturating_mul(u64::from(rate.burst.max(1)));
    let ahead = tat.saturating_sub(now);
    let remaining = tau.saturating_sub(ahead) / t;
    let retry = if remaining > 0 { 0 } else { ahead + t - tau };
    (remaining, ahead, retry)
}

/// The token TAT after `tokens` were used at `now`.
pub(crate) fn charge(tat: u64, now: u64, rate: &Rate, tokens: u64) -> u64 {
    tat.max(now)
        .saturating_add(rate.interval_nanos().saturating_mul(tokens))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let rate = Rate::per_minute(5);
        let now = 1_000 * NANOS;
        let mut tat = 0;
        let mut passed = 0;
        for _ in 0..8 {
            let d = decide(tat, now, &rate);
            if d.allowed {
                passed += 1;
                tat = d.tat;
                assert_eq!(d.remaining, 5 - passed);
            } else {
                assert_eq!(d.retry_after, 12 * NANOS);
            }
        }
        assert_eq!(passed, 5);
        assert!(!decide(tat, now + 12 * NANOS - 1, &rate).allowed);
        assert!(decide(tat, now + 12 * NANOS, &rate).allowed);
    }

    #[test]
    fn tokens_pass_while_one_is_left_and_debt_is_waited_out() {
        // 600 tokens a minute: one every 100 ms.
        let rate = Rate::per_minute(600);
        let now = 1_000 * NANOS;
        assert_eq!(tokens_at(0, now, &rate), (600, 0, 0));
        // A request that used 1,000 tokens: 400 in debt, so 40 s before one is back.
        let tat = charge(0, now, &rate, 1_000);
        let (remaining, reset, retry) = tokens_at(tat, now, &rate);
        assert_eq!((remaining, reset), (0, 100 * NANOS));
        assert_eq!(retry, 40 * NANOS + NANOS / 10);
        assert_eq!(tokens_at(tat, now + retry, &rate).0, 1);
        assert_eq!(tokens_at(tat, now + retry - 1, &rate).0, 0);
        assert_eq!(tokens_at(tat, now + 100 * NANOS, &rate), (600, 0, 0));
    }

    #[test]
    fn zero_requests_refuses_everything() {
        let d = decide(0, 5, &Rate::new(0, Duration::from_secs(10)));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, 10 * NANOS);
    }

    /// The reference: the continuous-state leaky bucket (ITU-T I.371's other form of the
    /// same algorithm): a level that drains one unit per nanosecond and fills one interval
    /// per request that passes; a request passes when the bucket can take it.
    fn reference(times: &[u64], rate: &Rate) -> Vec<bool> {
        let t = rate.interval_nanos();
        let capacity = t * u64::from(rate.burst);
        let (mut level, mut last) = (0u64, 0u64);
        times
            .iter()
            .map(|&now| {
                let drained = level.saturating_sub(now - last.min(now));
                let allowed = drained + t <= capacity;
                if allowed {
                    level = drained + t;
                    last = now;
                }
                allowed
            })
            .collect()
    }

    proptest! {
        #[test]
        fn agrees_with_a_queue_of_owed_requests(
            requests in 1u32..20,
            period in 1u32..120,
            burst in 1u32..10,
            gaps in proptest::collection::vec(0u64..5_000_000_000, 1..60),
        ) {
            let rate = Rate::new(requests, Duration::from_secs(period.into())).with_burst(burst);
            let mut now = 1_000 * NANOS;
            let times: Vec<u64> = gaps.iter().map(|g| { now += g; now }).collect();
            let expected = reference(&times, &rate);
            let mut tat = 0;
            for (i, &now) in times.iter().enumerate() {
                let d = decide(tat, now, &rate);
                prop_assert_eq!(d.allowed, expected[i], "request {}", i);
                tat = d.tat;
                // What is promised is kept: `remaining` more pass at the same instant…
                let mut probe = tat;
                for _ in 0..d.remaining {
                    let p = decide(probe, now, &rate);
                    prop_assert!(p.allowed);
                    probe = p.tat;
                }
                prop_assert!(!decide(probe, now, &rate).allowed);
                // …and a refused one passes after exactly `retry_after`.
                if !d.allowed {
                    prop_assert!(decide(tat, now + d.retry_after, &rate).allowed);
                    prop_assert!(!decide(tat, now + d.retry_after - 1, &rate).allowed);
                }
            }
        }
    }
}
