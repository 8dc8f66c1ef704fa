//! [`HeaderInjectLayer`]: set, append, default or remove request headers on the way to the
//! provider, give each request an id, and add the provider headers a gateway usually needs.
//!
//! The data path of one request, top to bottom:
//!
//! 1. the request id, if configured: the client's kept (when allowed and well formed) or a
//!    fresh UUID v4, so the rules below can read it;
//! 2. every [`HeaderRule`], in the order given;
//! 3. the inner service; on the way back, the request id is echoed on the response when
//!    configured.
//!
//! The same [`HeaderRule`]s carry the extra headers of the provider presets
//! ([`Provider`](crate::upstream::Provider)), so both layers treat headers alike.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::upstream::provider::{anthropic_rules, openai_rules};

/// The header a [`RequestId`] uses unless told otherwise.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

type MakeFn = dyn Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync;

/// A request's head as a header maker sees it: everything but the body, borrowed.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a http::Method,
    /// The URI.
    pub uri: &'a http::Uri,
    /// The headers, as the rules before this one left them.
    pub headers: &'a http::HeaderMap,
    /// The extensions, e.g. the caller's [`Identity`](crate::Identity).
    pub extensions: &'a http::Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// One thing to do to one request header.
///
/// A value is either static or made per request from the request's head (method, URI,
/// headers, extensions — e.g. the caller's [`Identity`](crate::Identity)). A maker that
/// returns `None` leaves the request as it is.
///
/// ```
/// use http::{HeaderName, HeaderValue};
/// use tower_gateway_auth::{HeaderRule, Identity};
///
/// let rules = [
///     HeaderRule::overwrite(HeaderName::from_static("x-gateway"), HeaderValue::from_static("1")),
///     HeaderRule::if_absent(HeaderName::from_static("accept"), HeaderValue::from_static("application/json")),
///     HeaderRule::remove(HeaderName::from_static("cookie")),
///     HeaderRule::overwrite_with(HeaderName::from_static("x-caller"), |req| {
///         let who = req.extensions.get::<Identity>()?;
///         HeaderValue::try_from(who.id().to_string()).ok()
///     }),
/// ];
/// assert_eq!(rules[2].name(), "cookie");
/// ```
#[derive(Clone)]
pub struct HeaderRule {
    name: HeaderName,
    action: Action,
}

#[derive(Clone)]
enum Action {
    Set { mode: Mode, value: Value },
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Replace every value the request had.
    Overwrite,
    /// Add a value, keeping the ones there.
    Append,
    /// Set only when the request has none.
    IfAbsent,
}

#[derive(Clone)]
enum Value {
    Static(HeaderValue),
    Made(Arc<MakeFn>),
}

impl HeaderRule {
    fn set(name: HeaderName, mode: Mode, value: Value) -> Self {
        HeaderRule {
            name,
            action: Action::Set { mode, value },
        }
    }

    /// Sets `name` to `value`, replacing whatever the request carried.
    pub fn overwrite(name: HeaderName, value: HeaderValue) -> Self {
        Self::set(name, Mode::Overwrite, Value::Static(value))
    }

    /// Adds `value` to `name`, keeping the values already there.
    pub fn append(name: HeaderName, value: HeaderValue) -> Self {
        Self::set(name, Mode::Append, Value::Static(value))
    }

    /// Sets `name` to `value` only when the request carries no `name` at all.
    pub fn if_absent(name: HeaderName, value: HeaderValue) -> Self {
        Self::set(name, Mode::IfAbsent, Value::Static(value))
    }

    /// Removes every `name` header.
    pub fn remove(name: HeaderName) -> Self {
        HeaderRule {
            name,
            action: Action::Remove,
        }
    }

    /// [`overwrite`](Self::overwrite) with a value made from each request.
    pub fn overwrite_with<F>(name: HeaderName, make: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync + 'static,
    {
        Self::set(name, Mode::Overwrite, Value::Made(Arc::new(make)))
    }

    /// [`append`](Self::append) with a value made from each request.
    pub fn append_with<F>(name: HeaderName, make: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync + 'static,
    {
        Self::set(name, Mode::Append, Value::Made(Arc::new(make)))
    }

    /// [`if_absent`](Self::if_absent) with a value made from each request; the maker is
    /// called only when the header is absent.
    pub fn if_absent_with<F>(name: HeaderName, make: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync + 'static,
    {
        Self::set(name, Mode::IfAbsent, Value::Made(Arc::new(make)))
    }

    /// The header this rule acts on.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The header this rule removes, when that is all it does.
    pub(crate) fn removed(&self) -> Option<&HeaderName> {
        matches!(self.action, Action::Remove).then_some(&self.name)
    }

    /// Applies the rule to a request, in place (a request is never taken apart and rebuilt:
    /// moving it costs time on every request).
    pub(crate) fn apply<B>(&self, req: &mut Request<B>) {
        let (mode, value) = match &self.action {
            Action::Remove => {
                req.headers_mut().remove(&self.name);
                return;
            }
            Action::Set { mode, value } => (*mode, value),
        };
        if mode == Mode::IfAbsent && req.headers().contains_key(&self.name) {
            return;
        }
        let value = match value {
            Value::Static(value) => value.clone(),
            Value::Made(make) => match make(&RequestHead::of(req)) {
                Some(value) => value,
                None => return,
            },
        };
        match mode {
            Mode::Overwrite | Mode::IfAbsent => {
                req.headers_mut().insert(self.name.clone(), value);
            }
            Mode::Append => {
                req.headers_mut().append(self.name.clone(), value);
            }
        }
    }
}

/// Values are left out: a static value may well be a secret.
impl fmt::Debug for HeaderRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match &self.action {
            Action::Remove => "remove",
            Action::Set { mode, value } => match (mode, value) {
                (Mode::Overwrite, Value::Static(_)) => "overwrite",
                (Mode::Append, Value::Static(_)) => "append",
                (Mode::IfAbsent, Value::Static(_)) => "if_absent",
                (Mode::Overwrite, Value::Made(_)) => "overwrite_with",
                (Mode::Append, Value::Made(_)) => "append_with",
                (Mode::IfAbsent, Value::Made(_)) => "if_absent_with",
            },
        };
        write!(f, "{action}({})", self.name)
    }
}

/// How a [`HeaderInjectLayer`] gives each request an id.
///
/// Default: header `x-request-id`, always a fresh UUID v4 (a client's id is replaced, so
/// clients cannot plant ids in the gateway's logs), not echoed on the response.
///
/// ```
/// use http::HeaderName;
/// use tower_gateway_auth::RequestId;
///
/// let ids = RequestId::new()
///     .header(HeaderName::from_static("x-correlation-id"))
///     .keep_client_id(true)
///     .echo(true);
/// # let _ = ids;
/// ```
#[derive(Debug, Clone)]
pub struct RequestId {
    header: HeaderName,
    keep_client_id: bool,
    echo: bool,
}

/// The longest client-sent id kept; a longer one is replaced.
const MAX_CLIENT_ID_LEN: usize = 128;

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
    fn assign(&self, headers: &mut http::HeaderMap) -> Option<HeaderValue> {
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
fn new_request_id() -> [u8; 36] {
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

/// A layer that edits request headers on their way to the inner service.
///
/// ```
/// use std::convert::Infallible;
/// use http::{HeaderName, HeaderValue, Request, Response};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::{HeaderInjectLayer, RequestId};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(
///         HeaderInjectLayer::new()
///             .anthropic(HeaderValue::from_static("2023-06-01"), Some(HeaderValue::from_static("tools-2024-04-04")))
///             .remove(HeaderName::from_static("cookie"))
///             .request_id(RequestId::new().echo(true)),
///     )
///     .service_fn(|req: Request<()>| async move {
///         assert_eq!(req.headers()["anthropic-version"], "2023-06-01");
///         assert!(req.headers().get("cookie").is_none());
///         Ok::<_, Infallible>(Response::new(()))
///     });
///
/// let req = Request::builder().header("cookie", "session=1").body(()).unwrap();
/// let response = service.oneshot(req).await.unwrap();
/// assert_eq!(response.headers()["x-request-id"].len(), 36);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct HeaderInjectLayer {
    config: Arc<InjectConfig>,
}

#[derive(Clone, Default)]
struct InjectConfig {
    rules: Vec<HeaderRule>,
    request_id: Option<RequestId>,
}

impl HeaderInjectLayer {
    /// A layer that changes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn config_mut(&mut self) -> &mut InjectConfig {
        Arc::make_mut(&mut self.config)
    }

    /// Adds a rule; rules run in the order they were added.
    pub fn rule(mut self, rule: HeaderRule) -> Self {
        self.config_mut().rules.push(rule);
        self
    }

    /// Adds several rules, in order.
    pub fn rules(mut self, rules: impl IntoIterator<Item = HeaderRule>) -> Self {
        self.config_mut().rules.extend(rules);
        self
    }

    /// Sets `name` to `value`, replacing the client's. See [`HeaderRule::overwrite`].
    pub fn overwrite(self, name: HeaderName, value: HeaderValue) -> Self {
        self.rule(HeaderRule::overwrite(name, value))
    }

    /// Adds `value` to `name`. See [`HeaderRule::append`].
    pub fn append(self, name: HeaderName, value: HeaderValue) -> Self {
        self.rule(HeaderRule::append(name, value))
    }

    /// Sets `name` when the client sent none. See [`HeaderRule::if_absent`].
    pub fn if_absent(self, name: HeaderName, value: HeaderValue) -> Self {
        self.rule(HeaderRule::if_absent(name, value))
    }

    /// Removes `name`. See [`HeaderRule::remove`].
    pub fn remove(self, name: HeaderName) -> Self {
        self.rule(HeaderRule::remove(name))
    }

    /// Gives every request an id, as `ids` says.
    pub fn request_id(mut self, ids: RequestId) -> Self {
        self.config_mut().request_id = Some(ids);
        self
    }

    /// Anthropic's headers: `anthropic-version: version` when the client sent none, and the
    /// `beta` features added to the client's `anthropic-beta` list.
    pub fn anthropic(self, version: HeaderValue, beta: Option<HeaderValue>) -> Self {
        self.rules(anthropic_rules(version, beta))
    }

    /// OpenAI's `OpenAI-Organization` and `OpenAI-Project`, each set (replacing the client's)
    /// when given.
    pub fn openai(self, organization: Option<HeaderValue>, project: Option<HeaderValue>) -> Self {
        self.rules(openai_rules(organization, project))
    }
}

impl fmt::Debug for HeaderInjectLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderInjectLayer")
            .field("rules", &self.config.rules)
            .field("request_id", &self.config.request_id)
            .finish()
    }
}

impl<S> Layer<S> for HeaderInjectLayer {
    type Service = HeaderInject<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HeaderInject {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`HeaderInjectLayer`] wraps around an inner service.
#[derive(Clone)]
pub struct HeaderInject<S> {
    inner: S,
    config: Arc<InjectConfig>,
}

impl<S> HeaderInject<S> {
    define_inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for HeaderInject<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderInject")
            .field("inner", &self.inner)
            .field("rules", &self.config.rules)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HeaderInject<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let echo = self.config.request_id.as_ref().and_then(|ids| {
            let id = ids.assign(req.headers_mut())?;
            Some((ids.header.clone(), id))
        });
        for rule in &self.config.rules {
            rule.apply(&mut req);
        }
        ResponseFuture {
            inner: self.inner.call(req),
            echo,
        }
    }
}

pin_project! {
    /// The response future of [`HeaderInject`]: the inner future, with the request id set on
    /// its response when echoing.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        echo: Option<(HeaderName, HeaderValue)>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some((name, id)) = this.echo.take() {
            response.headers_mut().insert(name, id);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    fn values(req: &Request<()>, name: &str) -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn each_mode_does_what_it_says() {
        let n = HeaderName::from_static("x-n");
        let v = HeaderValue::from_static("gw");
        let cases: [(HeaderRule, &[&str]); 4] = [
            (HeaderRule::overwrite(n.clone(), v.clone()), &["gw"]),
            (HeaderRule::append(n.clone(), v.clone()), &["a", "b", "gw"]),
            (HeaderRule::if_absent(n.clone(), v.clone()), &["a", "b"]),
            (HeaderRule::remove(n.clone()), &[]),
        ];
        for (rule, expected) in cases {
            let mut p = parts(&[("x-n", "a"), ("x-n", "b"), ("x-other", "1")]);
            rule.apply(&mut p);
            assert_eq!(values(&p, "x-n"), expected, "{rule:?}");
            assert_eq!(values(&p, "x-other"), ["1"]);
        }
        let mut p = parts(&[]);
        HeaderRule::if_absent(n.clone(), v).apply(&mut p);
        assert_eq!(values(&p, "x-n"), ["gw"]);
    }

    #[test]
    fn makers_see_the_request_and_none_changes_nothing() {
        let rule = HeaderRule::overwrite_with(HeaderName::from_static("x-path"), |req| {
            (req.uri.path() != "/skip").then(|| HeaderValue::try_from(req.uri.path()).unwrap())
        });
        let mut p = Request::get("/v1/chat").body(()).unwrap();
        rule.apply(&mut p);
        assert_eq!(values(&p, "x-path"), ["/v1/chat"]);
        let mut p = Request::get("/skip")
            .header("x-path", "client")
            .body(())
            .unwrap();
        rule.apply(&mut p);
        assert_eq!(values(&p, "x-path"), ["client"]);

        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let lazy = HeaderRule::if_absent_with(HeaderName::from_static("x-n"), move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(HeaderValue::from_static("made"))
        });
        let mut p = parts(&[("x-n", "client")]);
        lazy.apply(&mut p);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn anthropic_beta_list_is_merged_not_replaced() {
        use crate::upstream::provider::{DEFAULT_ANTHROPIC_VERSION, anthropic_rules};
        let rules = anthropic_rules(
            HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
            Some(HeaderValue::from_static("b2, b3")),
        );
        let mut p = parts(&[("anthropic-beta", "b1,b2"), ("anthropic-beta", " b4 ")]);
        for rule in &rules {
            rule.apply(&mut p);
        }
        assert_eq!(values(&p, "anthropic-beta"), ["b1,b2,b4,b3"]);
        assert_eq!(values(&p, "anthropic-version"), ["2023-06-01"]);

        let mut p = parts(&[("anthropic-version", "2024-01-01")]);
        for rule in &rules {
            rule.apply(&mut p);
        }
        assert_eq!(values(&p, "anthropic-beta"), ["b2,b3"]);
        assert_eq!(values(&p, "anthropic-version"), ["2024-01-01"]);
    }

    #[test]
    fn request_ids_are_uuid_v4_and_client_ids_are_checked() {
        let id = new_request_id();
        let text = std::str::from_utf8(&id).unwrap();
        assert_eq!(text.len(), 36);
        assert_eq!(text.as_bytes()[14], b'4');
        assert!(matches!(text.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
        assert!(text.split('-').map(str::len).eq([8, 4, 4, 4, 12]));
        assert!(text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        let many: std::collections::HashSet<[u8; 36]> =
            (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(many.len(), 1000, "ids repeat");

        let keep = RequestId::new().keep_client_id(true).echo(true);
        let mut p = parts(&[("x-request-id", "client-1")]);
        assert_eq!(keep.assign(p.headers_mut()).unwrap(), "client-1");
        for bad in [
            &[("x-request-id", "a b")][..],
            &[("x-request-id", "a"), ("x-request-id", "b")],
        ] {
            let mut p = parts(bad);
            let id = keep.assign(p.headers_mut()).unwrap();
            assert_eq!(id.len(), 36);
            assert_eq!(values(&p, "x-request-id"), [id.to_str().unwrap()]);
        }
        let long = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        let mut p = parts(&[("x-request-id", &long)]);
        assert_eq!(keep.assign(p.headers_mut()).unwrap().len(), 36);

        let replace = RequestId::new();
        let mut p = parts(&[("x-request-id", "client-1")]);
        assert_eq!(replace.assign(p.headers_mut()), None, "not echoed");
        assert_ne!(values(&p, "x-request-id"), ["client-1"]);
        assert_eq!(values(&p, "x-request-id")[0].len(), 36);
    }

    #[test]
    fn debug_names_headers_but_never_values() {
        let layer = HeaderInjectLayer::new()
            .overwrite(
                HeaderName::from_static("x-secret"),
                HeaderValue::from_static("s3cr3t"),
            )
            .openai(Some(HeaderValue::from_static("org-hidden")), None);
        let text = format!("{layer:?}");
        assert!(text.contains("overwrite(x-secret)"), "{text}");
        assert!(text.contains("overwrite(openai-organization)"), "{text}");
        assert!(
            !text.contains("s3cr3t") && !text.contains("org-hidden"),
            "{text}"
        );
    }
}
