//! Time as key validity sees it: whole seconds since the Unix epoch, read from an injectable
//! [`Clock`] so that expiry can be tested without waiting.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time, in whole seconds since the Unix epoch (UTC).
///
/// Seconds are fine-grained enough for key validity (the shortest lifetime is an ephemeral
/// key's 60 seconds) and keep records small.
///
/// It is *displayed* as RFC 3339 in UTC (what the management API answers and keygen lists),
/// and *stored* (serde: key files, Redis records) as a number of seconds. The stored form
/// stays a number on purpose: Redis writes compare a record's JSON byte for byte, and
/// replicas of different versions share the records, so a change of that format would turn
/// every write on an existing record into a conflict.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::clock::Timestamp;
///
/// let t = Timestamp::from_unix_secs(1_700_000_000);
/// assert_eq!((t + Duration::from_secs(60)).as_unix_secs(), 1_700_000_060);
/// assert_eq!(t.to_string(), "2023-11-14T22:13:20Z");
/// assert_eq!(serde_json::to_string(&t).unwrap(), "1700000000");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `secs` seconds after the Unix epoch.
    pub const fn from_unix_secs(secs: u64) -> Self {
        Timestamp(secs)
    }

    /// Seconds since the Unix epoch.
    pub const fn as_unix_secs(self) -> u64 {
        self.0
    }

    /// The system's wall-clock time, truncated to the second.
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Timestamp(secs)
    }

    /// `self + d`, saturating at the far future instead of overflowing.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_secs()))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(d.as_secs()))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.0)
    }
}

/// The latest time RFC 3339 can write (its years have four digits).
const LAST_RFC3339: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z

impl Timestamp {
    /// Parses an RFC 3339 time (`2030-01-01T00:00:00Z`, `2030-01-01T01:00:00+01:00`);
    /// fractions of a second are dropped. `None` for anything else, or a time before the
    /// epoch.
    #[cfg(any(test, feature = "axum"))]
    pub(crate) fn parse_rfc3339(text: &str) -> Option<Self> {
        let t =
            ::time::OffsetDateTime::parse(text, &::time::format_description::well_known::Rfc3339)
                .ok()?;
        u64::try_from(t.unix_timestamp()).ok().map(Timestamp)
    }
}

/// RFC 3339 in UTC, whole seconds: `2023-11-14T22:13:20Z`. Times after
/// `9999-12-31T23:59:59Z`, which RFC 3339 cannot write (a saturated "far future"), are shown
/// as that.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = i64::try_from(self.0.min(LAST_RFC3339)).unwrap_or_default();
        let t = ::time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| fmt::Error)?;
        let mut buf = [0u8; 20];
        let mut out = &mut buf[..];
        t.format_into(&mut out, &::time::format_description::well_known::Rfc3339)
            .map_err(|_| fmt::Error)?;
        let written = 20 - out.len();
        f.pad(std::str::from_utf8(&buf[..written]).map_err(|_| fmt::Error)?)
    }
}

/// Where the current time comes from.
///
/// The layers and stores read time only through a clock so that tests can move it.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// The current time in nanoseconds since the Unix epoch, for what needs more than
    /// seconds (rate limits). The default is [`now`](Self::now) in whole seconds; the
    /// clocks here give finer reads.
    fn now_nanos(&self) -> u64 {
        self.now().as_unix_secs().saturating_mul(1_000_000_000)
    }
}

/// The system's wall clock, read cheaply and with no thread of the crate's own.
///
/// On Linux, Android and FreeBSD a read is `CLOCK_REALTIME_COARSE`: the time the kernel
/// keeps at each timer tick, read from the vDSO without a system call, at most one tick
/// (a few milliseconds) behind the precise time, which is far finer than key lifetimes,
/// which count in seconds. It costs a few nanoseconds, where `SystemTime::now()` costs tens
/// (`cargo bench --bench primitives`, group `clock`). Elsewhere a read is
/// `SystemTime::now()`. Either way a read follows the system clock when it is set, and is
/// never older than a tick.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Timestamp {
        Timestamp(coarse_now_nanos() / 1_000_000_000)
    }

    #[inline]
    fn now_nanos(&self) -> u64 {
        coarse_now_nanos()
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
#[inline]
fn coarse_now_nanos() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
#[inline]
fn coarse_now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A clock that stands still until told to move; clones share the same time.
///
/// It keeps nanoseconds, so that rate limits can be tested at sub-second steps: moves
/// shorter than a second add up (two of 500 ms move [`now`](Clock::now) by one second).
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::clock::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_unix_secs(100));
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), Timestamp::from_unix_secs(105));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(start.0.saturating_mul(1_000_000_000))),
        }
    }

    /// Show `t` from now on.
    pub fn set(&self, t: Timestamp) {
        self.nanos
            .store(t.0.saturating_mul(1_000_000_000), Ordering::SeqCst);
    }

    /// Move forward by `d`.
    pub fn advance(&self, d: Duration) {
        let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(d, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::SeqCst) / 1_000_000_000)
    }

    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_both_ways() {
        let t = Timestamp::from_unix_secs(1_700_000_000);
        assert_eq!(t.to_string(), "2023-11-14T22:13:20Z");
        assert_eq!(Timestamp::EPOCH.to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp::from_unix_secs(u64::MAX).to_string(),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(format!("{t:>22}"), "  2023-11-14T22:13:20Z");
        assert_eq!(Timestamp::parse_rfc3339("2023-11-14T22:13:20Z"), Some(t));
        assert_eq!(
            Timestamp::parse_rfc3339("2023-11-14T23:13:20.75+01:00"),
            Some(t)
        );
        for bad in ["1700000000", "2023-11-14", "1969-12-31T23:59:59Z", ""] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_system_clock_is_the_system_time() {
        for _ in 0..1_000 {
            let before = Timestamp::now();
            let read = SystemClock.now();
            let after = Timestamp::now();
            // The coarse clock is at most a tick behind: within a second of the precise one.
            assert!(
                before.as_unix_secs() <= read.as_unix_secs() + 1 && read <= after,
                "{read:?} {before:?} {after:?}"
            );
        }
    }
}
