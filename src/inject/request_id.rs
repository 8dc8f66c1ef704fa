//! Request ids: the client's, when allowed and well formed, or a fresh UUID v4.

use http::{HeaderName, HeaderValue};

/// The header a [`RequestId`] uses unless told otherwise.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How a [`HeaderInjectLayer`](super::HeaderInjectLayer) gives each request an id.
///
/// Default: header `x-request-id`, always a fresh UUID v4 (a client's id is replaced, so
/// clients cannot plant ids in the gateway's logs), not echoed on the response.
///
/// ```
/// use http::HeaderName;
/// use tower_gateway_auth::inject::RequestId;
///
/// let ids = RequestId::new()
///     .header(HeaderName::from_static("x-correlation-id"))
///     .keep_client_id(true)
///     .echo(true);
/// # let _ = ids;
/// ```
#[derive(Debug, Clone)]
pub struct RequestId {
    pub(super) header: HeaderName,
    keep_client_id: bool,
    echo: bool,
}

/// The longest client-sent id kept; a longer one is replaced.
pub(super) const MAX_CLIENT_ID_LEN: usize = 128;

impl RequestId {
    /// The defaults above.
    pub fn new() -> Self {
        RequestId {
            header: X_REQUEST_ID,
            keep_client_id: false,
            echo: false,
        }
    }

    /// The header carrying the id (default `x-request-id`).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Keeps an id the client sent, when it is one value of at most 128 visible ASCII
    /// characters; otherwise a fresh one replaces it (default: always replace).
    pub fn keep_client_id(mut self, keep: bool) -> Self {
        self.keep_client_id = keep;
        self
    }

    /// Sets the id on the response too, replacing any value the inner service put there
    /// (default: no). Use a header name of your own to keep an upstream's id as well.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Sets the request's id (or keeps the client's); returns it when it is to be echoed.
    pub(super) fn assign(&self, headers: &mut http::HeaderMap) -> Option<HeaderValue> {
        if self.keep_client_id {
            let mut sent = headers.get_all(&self.header).iter();
            if let (Some(id), None) = (sent.next(), sent.next())
                && is_acceptable_id(id)
            {
                return self.echo.then(|| id.clone());
            }
        }
        let id = new_request_id();
        // Two values rather than a clone: a clone of a fresh value makes it shared (one more
        // allocation, and reference counting on every clone and drop after that).
        let value = || {
            HeaderValue::from_bytes(&id).expect("hex digits and dashes are a valid header value")
        };
        let echoed = self.echo.then(value);
        headers.insert(self.header.clone(), value());
        echoed
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

fn is_acceptable_id(id: &HeaderValue) -> bool {
    let id = id.as_bytes();
    !id.is_empty() && id.len() <= MAX_CLIENT_ID_LEN && id.iter().all(u8::is_ascii_graphic)
}

/// A random-looking (version 4) UUID, lower-case hex, formatted by the `uuid` crate.
///
/// `Uuid::new_v4()` asks the operating system for 16 random bytes, a system call per
/// request (`cargo bench --bench primitives`, group `request_id`, measures it against this),
/// so the bytes are instead a keyed hash (SipHash, keyed from the OS once per process by
/// `RandomState`) of a counter: unique, and unpredictable without the key.
pub(super) fn new_request_id() -> [u8; 36] {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static KEY: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.hash_one((n, 0u8)).to_le_bytes());
    bytes[8..].copy_from_slice(&key.hash_one((n, 1u8)).to_le_bytes());
    let mut text = [0u8; 36];
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    text
}
