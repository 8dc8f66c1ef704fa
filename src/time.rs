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
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::Timestamp;
///
/// let t = Timestamp::from_unix_secs(1_700_000_000);
/// assert_eq!((t + Duration::from_secs(60)).as_unix_secs(), 1_700_000_060);
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

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Where the current time comes from.
///
/// The layers and stores read time only through a clock so that tests can move it.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock, read cheaply.
///
/// Reading the system clock costs tens of nanoseconds on some machines, a noticeable part of
/// verifying a key. This clock instead reads a cached second that a background thread
/// (started on first use, one per process) refreshes four times a second, so a time is at
/// most a quarter of a second old: far finer than key lifetimes, which count in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Timestamp {
        cached::now()
    }
}

mod cached {
    use std::sync::Once;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use super::Timestamp;

    const REFRESH: Duration = Duration::from_millis(250);

    static SECS: AtomicU64 = AtomicU64::new(0);
    /// False when no refresher thread could be started: then every read asks the system.
    static CACHED: AtomicBool = AtomicBool::new(false);
    static START: Once = Once::new();

    #[inline]
    pub(super) fn now() -> Timestamp {
        START.call_once(|| {
            SECS.store(Timestamp::now().as_unix_secs(), Ordering::Relaxed);
            let started = std::thread::Builder::new()
                .name("tower-gateway-auth-clock".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(REFRESH);
                        SECS.store(Timestamp::now().as_unix_secs(), Ordering::Relaxed);
                    }
                });
            CACHED.store(started.is_ok(), Ordering::Relaxed);
        });
        if CACHED.load(Ordering::Relaxed) {
            Timestamp::from_unix_secs(SECS.load(Ordering::Relaxed))
        } else {
            Timestamp::now()
        }
    }
}

/// A clock that stands still until told to move; clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_unix_secs(100));
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), Timestamp::from_unix_secs(105));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    secs: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            secs: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Show `t` from now on.
    pub fn set(&self, t: Timestamp) {
        self.secs.store(t.0, Ordering::SeqCst);
    }

    /// Move forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.secs.fetch_add(d.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.secs.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_clock_follows_the_system_clock() {
        let before = Timestamp::now();
        let cached = SystemClock.now();
        let after = Timestamp::now();
        // At most one refresh period (well under a second) behind.
        assert!(
            cached.as_unix_secs() + 1 >= before.as_unix_secs() && cached <= after,
            "{cached:?} {before:?} {after:?}"
        );
    }
}
