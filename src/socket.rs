//! Upgraded connections (WebSockets): what one holds while it is open ([`SocketLease`]),
//! and why it is closed ([`CloseReason`]).
//!
//! An HTTP request ends with its response body; a WebSocket goes on after its `101`
//! response for as long as either side keeps it open. What the layers tie to a request's
//! lifetime must then be tied to the socket's instead, and some of it must be able to end
//! the socket early. A [`SocketLease`] in the upgrade request's extensions carries both:
//!
//! - values [held](SocketLease::hold) for as long as the socket is open:
//!   [`RateLimitLayer`](crate::RateLimitLayer) puts the request's concurrency permit there,
//!   so that an open socket counts as one request in flight; a server can put its
//!   connection slot there;
//! - futures that [close](SocketLease::close_when) the socket when they complete, with a
//!   [`CloseReason`]: [`InboundApiKeyLayer`](crate::InboundApiKeyLayer) re-checks the key
//!   periodically and closes the socket once it is revoked or expired; a server closes its
//!   sockets when it shuts down.
//!
//! Whoever serves the socket takes the lease out of the request and keeps it until the
//! socket is closed, closing it when [`SocketLease::closed`] completes:
//! [`proxy::Forward`](crate::proxy::Forward) does so (feature `websocket`). A request whose
//! lease nobody takes drops it with the request, and with it what it holds: an upgrade
//! served by a handler that ignores the lease counts as in flight only until the handler
//! returns its `101`.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderMap, Method, Request, Version};

type Closer = Pin<Box<dyn Future<Output = CloseReason> + Send>>;

/// What an upgraded connection holds while it is open, and the futures that close it; see
/// [the module docs](self). Cheap to clone: clones share one lease.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::socket::{CloseReason, SocketLease};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let mut upgrade = http::Request::get("/v1/realtime").body(()).unwrap();
/// // A layer on the way in:
/// let lease = SocketLease::of(&mut upgrade);
/// lease.hold("a permit, released when the socket closes");
/// lease.close_when(async {
///     tokio::time::sleep(Duration::from_millis(10)).await;
///     CloseReason::policy("This API key has been revoked.")
/// });
///
/// // Whoever serves the socket:
/// let lease = upgrade.extensions_mut().remove::<SocketLease>().unwrap();
/// let why = lease.closed().await;
/// assert_eq!(why.code(), 1008);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct SocketLease {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    held: Mutex<Vec<Box<dyn Send>>>,
    closers: Mutex<Vec<Closer>>,
}

impl SocketLease {
    /// A lease of no request yet (see [`of`](Self::of) for the usual way to get one).
    pub fn new() -> Self {
        Self::default()
    }

    /// The lease of `req`, put into its extensions by the first caller; every later call
    /// returns a handle to the same lease.
    pub fn of<B>(req: &mut Request<B>) -> SocketLease {
        req.extensions_mut()
            .get_or_insert_with(SocketLease::default)
            .clone()
    }

    /// Keeps `value` until the socket is closed (or, if no one serves it, until the lease is
    /// dropped with its request), then drops it.
    pub fn hold(&self, value: impl Send + 'static) {
        lock(&self.shared.held).push(Box::new(value));
    }

    /// Closes the socket with the reason `reason` gives, if it completes while the socket is
    /// open. It is polled only by whoever serves the socket, from the moment it does.
    pub fn close_when(&self, reason: impl Future<Output = CloseReason> + Send + 'static) {
        lock(&self.shared.closers).push(Box::pin(reason));
    }

    /// Completes with the reason of the first future given to
    /// [`close_when`](Self::close_when) that completes; never, if none does.
    pub fn closed(&self) -> impl Future<Output = CloseReason> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_closed(cx))
    }

    /// Polls the futures given to [`close_when`](Self::close_when); `Ready` with the reason
    /// of the first that completes.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let mut closers = lock(&self.shared.closers);
        for closer in closers.iter_mut() {
            if let Poll::Ready(reason) = closer.as_mut().poll(cx) {
                return Poll::Ready(reason);
            }
        }
        Poll::Pending
    }

    /// How many values the lease holds.
    pub fn held(&self) -> usize {
        lock(&self.shared.held).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for SocketLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketLease")
            .field("held", &self.held())
            .field("closers", &lock(&self.shared.closers).len())
            .finish()
    }
}

/// Why a socket is closed: the code and reason of the WebSocket close frame sent to both
/// sides (RFC 6455 §7.4).
///
/// | code | constructor | used for |
/// |---|---|---|
/// | 1001 | [`going_away`](Self::going_away) | the gateway shuts down; idle or lifetime limit reached |
/// | 1008 | [`policy`](Self::policy) | the key was revoked, expired or disabled |
/// | 1009 | [`too_big`](Self::too_big) | a message larger than the relay takes |
/// | 1011 | [`internal`](Self::internal) | the key could not be re-checked (store down); the other side failed |
#[derive(Clone, PartialEq, Eq)]
pub struct CloseReason {
    code: u16,
    reason: Cow<'static, str>,
}

/// The most bytes a close frame's reason may have (125 bytes of payload, 2 of them the code).
pub const MAX_CLOSE_REASON: usize = 123;

impl CloseReason {
    /// A close with `code` and `reason`, the reason cut (at a character boundary) to
    /// [`MAX_CLOSE_REASON`] bytes.
    ///
    /// # Panics
    /// When `code` may not be sent in a close frame (below 1000, 1004–1006, 1015, 1016–2999
    /// other than the defined codes, or above 4999).
    pub fn new(code: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        assert!(
            matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
            "{code} is not a close code an endpoint may send"
        );
        let mut reason = reason.into();
        if reason.len() > MAX_CLOSE_REASON {
            let mut end = MAX_CLOSE_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason = Cow::Owned(reason[..end].to_owned());
        }
        CloseReason { code, reason }
    }

    /// 1001: the endpoint goes away (shutdown, an idle or lifetime limit).
    pub fn going_away(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(1001, reason)
    }

    /// 1008: a policy says no more (a revoked or expired key).
    pub fn policy(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(1008, reason)
    }

    /// 1009: a message too big to take.
    pub fn too_big(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(1009, reason)
    }

    /// 1011: something failed on the way (a store that cannot answer, an upstream gone).
    pub fn internal(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(1011, reason)
    }

    /// The close code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The reason text.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Debug for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloseReason({} {:?})", self.code, self.reason)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.reason)
    }
}

/// Whether `req` asks to become a WebSocket (RFC 6455 §4.1): an HTTP/1.1 `GET` with
/// `Upgrade: websocket`, `upgrade` among the `Connection` options, and a
/// `Sec-WebSocket-Key`. Names and tokens are compared case-insensitively.
///
/// ```
/// use tower_gateway_auth::socket::is_websocket_upgrade;
///
/// let upgrade = http::Request::get("/v1/realtime")
///     .header("connection", "keep-alive, Upgrade")
///     .header("upgrade", "WebSocket")
///     .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
///     .body(())
///     .unwrap();
/// assert!(is_websocket_upgrade(&upgrade));
/// let h2c = http::Request::get("/").header("connection", "upgrade").header("upgrade", "h2c").body(()).unwrap();
/// assert!(!is_websocket_upgrade(&h2c));
/// ```
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    wants_websocket(req.method(), req.version(), req.headers())
}

/// [`is_websocket_upgrade`] on a request's parts.
pub(crate) fn wants_websocket(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    method == Method::GET
        && version == Version::HTTP_11
        && headers.contains_key(SEC_WEBSOCKET_KEY)
        && has_token(headers, &UPGRADE, "websocket")
        && has_token(headers, &CONNECTION, "upgrade")
}

/// Whether a comma-separated header (any of its values) lists `token`, case-insensitively.
pub(crate) fn has_token(headers: &HeaderMap, name: &http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_bounded() {
        let long = "é".repeat(100);
        let reason = CloseReason::policy(long);
        assert!(reason.reason().len() <= MAX_CLOSE_REASON);
        assert_eq!(reason.code(), 1008);
        assert!(std::panic::catch_unwind(|| CloseReason::new(1006, "")).is_err());
        assert!(std::panic::catch_unwind(|| CloseReason::new(999, "")).is_err());
        assert_eq!(CloseReason::new(4000, "app").code(), 4000);
    }

    #[test]
    fn upgrades_need_every_part() {
        let base = || {
            Request::get("/")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "k")
        };
        assert!(is_websocket_upgrade(&base().body(()).unwrap()));
        let post = base().method("POST").body(()).unwrap();
        assert!(!is_websocket_upgrade(&post));
        let old = base().version(Version::HTTP_10).body(()).unwrap();
        assert!(!is_websocket_upgrade(&old));
        let no_key = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_websocket_upgrade(&no_key));
        let no_connection = Request::get("/")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "k")
            .body(())
            .unwrap();
        assert!(!is_websocket_upgrade(&no_connection));
        let upgrades = Request::get("/")
            .header("connection", "upgradeX")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "k")
            .body(())
            .unwrap();
        assert!(!is_websocket_upgrade(&upgrades));
    }

    #[tokio::test]
    async fn a_lease_drops_what_it_holds_with_its_last_handle() {
        let held = Arc::new(());
        let lease = SocketLease::new();
        lease.hold(held.clone());
        let other = lease.clone();
        drop(lease);
        assert_eq!(Arc::strong_count(&held), 2);
        drop(other);
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
