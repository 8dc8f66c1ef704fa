//! Request ids: the client's, when allowed and well formed, or a fresh UUID v4.

use http::{HeaderName, HeaderValue};

/// The header a [`RequestId`] uses unless told otherwise.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How a [`HeaderInjectLayer`](super::HeaderInjectLayer) gives each request an id.
///
/// Default: header `x-request-id`, always a fresh UUID v4 (a client's id is replaced, so
/// clients cannot plant ids in the gateway's logs), not echoed on the response.
///
/// With [`keep_client_id`](Self::keep_client_id), a client's id is kept when it is
/// *well formed*: exactly one value of 1 to 128 characters, each an ASCII letter, digit,
/// `.`, `_`, `:` or `-` (a UUID, a ULID, `req_abc:42` all pass). Anything else (spaces,
/// quotes, `/`, non-ASCII, two values, too long) is replaced by a fresh id and never passed
/// on: what is kept can go into a log line or a header as it is.
///
/// Whichever id the request ends up with is also put in the request's extensions, and the
/// response's, as a [`RequestIdValue`]: a `TraceLayer`, a handler or an access log reads it
/// there.
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

    /// Keeps an id the client sent when it is well formed (see above); otherwise a fresh
    /// one replaces it (default: always replace).
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

    /// Sets the request's id (or keeps the client's) and returns it.
    pub(super) fn assign(&self, headers: &mut http::HeaderMap) -> RequestIdValue {
        if self.keep_client_id {
            let mut sent = headers.get_all(&self.header).iter();
            if let (Some(id), None) = (sent.next(), sent.next())
                && is_acceptable_id(id)
            {
                return RequestIdValue(id.clone());
            }
        }
        let id = RequestIdValue::fresh();
        headers.insert(self.header.clone(), id.to_header_value());
        id
    }

    /// Whether the id is to be set on the response.
    pub(super) fn echoes(&self) -> bool {
        self.echo
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

/// The well-formed ids of [`RequestId`]'s docs: no character that means something in a
/// log line, a header list, a URL or JSON, so a kept id needs no escaping anywhere.
fn is_acceptable_id(id: &HeaderValue) -> bool {
    let id = id.as_bytes();
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The id a request was given by a [`RequestId`]: the client's, kept, or a fresh UUID v4.
///
/// [`HeaderInjectLayer`](super::HeaderInjectLayer) puts it in the request's extensions, for
/// the layers and the handler inside it. Layers outside it (a `TraceLayer`, an access log)
/// read the id the response echoes ([`RequestId::echo`]): putting it in every response's
/// extensions too would cost each request an extensions map of its own. Always 1 to 128
/// characters from `[A-Za-z0-9._:-]`.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::HeaderInjectLayer;
/// use tower_gateway_auth::inject::{RequestId, RequestIdValue};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(HeaderInjectLayer::new().request_id(RequestId::new().keep_client_id(true)))
///     .service_fn(|req: Request<()>| async move {
///         let id = req.extensions().get::<RequestIdValue>().unwrap();
///         assert_eq!(id.as_str(), "req-42");
///         Ok::<_, Infallible>(Response::new(()))
///     });
/// let req = Request::builder().header("x-request-id", "req-42").body(()).unwrap();
/// let response = service.oneshot(req).await.unwrap();
/// assert!(response.extensions().get::<RequestIdValue>().is_none());
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct RequestIdValue(HeaderValue);

impl RequestIdValue {
    /// A fresh id. Its text lives in one shared allocation, so the request header, the
    /// echoed response header and this value are reference counts on it.
    fn fresh() -> Self {
        let text = bytes::Bytes::from_owner(new_request_id());
        RequestIdValue(
            HeaderValue::from_maybe_shared(text)
                .expect("hex digits and dashes are a valid header value"),
        )
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII ever gets in (see `is_acceptable_id` and `new_request_id`).
        self.0.to_str().unwrap_or_default()
    }

    /// The id as the header value it travels in.
    pub fn to_header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl PartialEq for RequestIdValue {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RequestIdValue {}

impl std::hash::Hash for RequestIdValue {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Display for RequestIdValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A random-looking (version 4) UUID, lower-case hex, formatted by the `uuid` crate.
///
/// `Uuid::new_v4()` asks the operating system for 16 random bytes, a system call per
/// request (`cargo bench --bench primitives`, group `request_id`, measures it against this),
/// so the bytes are instead a keyed hash (SipHash, keyed from the OS once per process by
/// `RandomState`) of a counter: unique, and unpredictable without the key.
pub(super) fn new_request_id() -> [u8; 36] {
    use std::hash::{BuildHasher, Hasher, RandomState};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static KEY: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Two outputs of one keyed state: the hash of `n`, then of `n` followed by one more
    // byte (two distinct messages). The counter is absorbed once.
    let mut hasher = key.build_hasher();
    hasher.write_u64(n);
    let low = hasher.finish();
    hasher.write_u8(1);
    let high = hasher.finish();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&low.to_le_bytes());
    bytes[8..].copy_from_slice(&high.to_le_bytes());
    let mut text = [0u8; 36];
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    text
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::HeaderInjectLayer;

    #[test]
    fn fresh_ids_are_distinct_version_4_uuids_in_lower_case() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let text = new_request_id();
            let text = std::str::from_utf8(&text).unwrap();
            let id = uuid::Uuid::parse_str(text).unwrap();
            assert_eq!(id.get_version_num(), 4, "{text}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{text}");
            assert_eq!(text, id.hyphenated().to_string(), "lower case, hyphenated");
            assert!(seen.insert(id), "{text} repeated");
        }
    }

    /// What the inner service saw: the `x-request-id` values and the extension.
    type Seen = Arc<Mutex<Option<(Vec<HeaderValue>, Option<RequestIdValue>)>>>;

    /// One request with `sent` as its `x-request-id` values through a layer with `ids`;
    /// what the inner service saw, and the response.
    async fn through(
        ids: RequestId,
        sent: &[HeaderValue],
    ) -> (Vec<HeaderValue>, RequestIdValue, Response<()>) {
        let seen: Seen = Arc::default();
        let recorder = seen.clone();
        let service = ServiceBuilder::new()
            .layer(HeaderInjectLayer::new().request_id(ids))
            .service_fn(move |req: Request<()>| {
                let ids = req
                    .headers()
                    .get_all(X_REQUEST_ID)
                    .iter()
                    .cloned()
                    .collect();
                let ext = req.extensions().get::<RequestIdValue>().cloned();
                *recorder.lock().unwrap() = Some((ids, ext));
                async { Ok::<_, Infallible>(Response::new(())) }
            });
        let mut req = Request::new(());
        for value in sent {
            req.headers_mut().append(X_REQUEST_ID, value.clone());
        }
        let response = service.oneshot(req).await.unwrap();
        let (headers, ext) = seen
            .lock()
            .unwrap()
            .take()
            .expect("the inner service was called");
        (
            headers,
            ext.expect("the id is in the request's extensions"),
            response,
        )
    }

    fn is_fresh(id: &str) -> bool {
        id.len() == 36 && id.as_bytes()[14] == b'4'
    }

    #[tokio::test]
    async fn a_well_formed_client_id_is_kept_passed_on_echoed_and_in_both_extensions() {
        let keep = || RequestId::new().keep_client_id(true).echo(true);
        for id in [
            "req_01HZX:7.a-b",
            "a",
            "0f0e0d0c-0b0a-4908-8706-050403020100",
            &"x".repeat(128),
        ] {
            let (upstream, ext, response) =
                through(keep(), &[HeaderValue::from_str(id).unwrap()]).await;
            assert_eq!(upstream, [id], "the inner service got another id");
            assert_eq!(ext.as_str(), id);
            assert_eq!(ext.to_string(), id);
            assert_eq!(
                response
                    .headers()
                    .get_all(X_REQUEST_ID)
                    .iter()
                    .collect::<Vec<_>>(),
                [id]
            );
            assert!(response.extensions().get::<RequestIdValue>().is_none());
        }
    }

    #[tokio::test]
    async fn a_malformed_or_oversized_client_id_is_replaced_and_never_passed_on() {
        let long = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        let cases: Vec<Vec<HeaderValue>> = [
            "",
            "two words",
            "a/b",
            "a\"b",
            "a,b",
            "a;b",
            "a=b",
            "a\tb",
            "%41",
            long.as_str(),
        ]
        .iter()
        .map(|s| vec![HeaderValue::from_str(s).unwrap()])
        .chain([
            vec![HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()],
            vec![HeaderValue::from_static("a"), HeaderValue::from_static("b")],
        ])
        .collect();
        for sent in cases {
            let (upstream, ext, response) =
                through(RequestId::new().keep_client_id(true).echo(true), &sent).await;
            assert_eq!(upstream.len(), 1, "{sent:?}: one id goes on");
            assert!(is_fresh(ext.as_str()), "{sent:?} was kept as {ext}");
            assert_eq!(upstream[0], ext.as_str());
            assert!(!sent.contains(&upstream[0]), "{sent:?} passed on");
            assert_eq!(response.headers()[X_REQUEST_ID], ext.as_str());
        }
    }

    #[tokio::test]
    async fn by_default_the_client_id_is_replaced_not_echoed_but_still_in_the_extensions() {
        let (upstream, ext, response) =
            through(RequestId::new(), &[HeaderValue::from_static("client-1")]).await;
        assert!(is_fresh(ext.as_str()), "{ext}");
        assert_eq!(upstream, [ext.as_str()]);
        assert!(response.headers().get(X_REQUEST_ID).is_none());
    }
}
