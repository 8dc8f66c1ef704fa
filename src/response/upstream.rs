//! [`UpstreamOutcome`]: what the upstream answered, riding in the response's extensions.

use std::time::Duration;

use http::StatusCode;

/// What the upstream did with a request: the status it answered with, or that it could not
/// be reached or timed out, and how long that took.
///
/// [`Forward`](crate::proxy::Forward) puts one into the extensions of every response it
/// makes, answered or failed (a request refused before it, or a dot-segment path it refuses
/// itself, has none), so that the layers outside can tell the upstream's status from the
/// gateway's own: the [`AccessLogLayer`](crate::access_log::AccessLogLayer) logs it and
/// `MetricsLayer` counts it by class. A proxy of your own can insert one too.
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use tower_gateway_auth::response::UpstreamOutcome;
///
/// let answered = UpstreamOutcome::answered(StatusCode::TOO_MANY_REQUESTS, None);
/// assert_eq!(answered.class(), "4xx");
/// let failed = UpstreamOutcome::failed(Some(Duration::from_secs(5)));
/// assert_eq!((failed.status(), failed.class()), (None, "error"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamOutcome {
    status: Option<StatusCode>,
    elapsed: Option<Duration>,
}

impl UpstreamOutcome {
    /// The upstream answered with `status` (its response head came) after `elapsed`, if
    /// measured.
    pub fn answered(status: StatusCode, elapsed: Option<Duration>) -> Self {
        UpstreamOutcome {
            status: Some(status),
            elapsed,
        }
    }

    /// The upstream could not be reached, failed to answer, or timed out.
    pub fn failed(elapsed: Option<Duration>) -> Self {
        UpstreamOutcome {
            status: None,
            elapsed,
        }
    }

    /// The upstream's status; `None` when it did not answer.
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// From sending the request to the upstream's response head (or the failure), when it
    /// was measured. `Forward` measures it when feature `metrics` is on or its debug log is
    /// enabled: two clock reads a request are otherwise not worth paying.
    pub fn elapsed(&self) -> Option<Duration> {
        self.elapsed
    }

    /// `1xx` … `5xx`, or `error` when the upstream did not answer.
    pub fn class(&self) -> &'static str {
        match self.status.map(|s| s.as_u16() / 100) {
            None => "error",
            Some(1) => "1xx",
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(_) => "5xx",
        }
    }
}
