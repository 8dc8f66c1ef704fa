//! [`InboundApiKeyLayer`]: find the client's key, verify it against a [`KeyStore`], hand the
//! identity to the inner service, or turn the request away.
//!
//! The data path of one request, top to bottom:
//!
//! 1. drop any client-supplied copy of the identity header (it could be spoofed);
//! 2. let CORS preflights through when allowed;
//! 3. read the key from the configured sources ([`KeySource`]); reject a malformed,
//!    oversized or ambiguous credential (400) or a missing one (401, unless anonymous
//!    requests are allowed);
//! 4. hash it with the store's [`KeyHasher`](crate::keys::KeyHasher) and remove it from the
//!    request;
//! 5. look the digest up; a store fault or timeout fails closed (503);
//! 6. compare digests in constant time, check status and validity window (401);
//! 7. for a key minted from another (ephemeral keys), look each ancestor up by the digest
//!    its record names and check that it is usable now as well (401): a key whose parent
//!    is revoked, disabled, expired, not yet valid or gone is not usable, whatever the
//!    cascading writes did or missed; then the scopes (403);
//! 8. put the [`Identity`] into the extensions (and the identity header, if configured) and
//!    call the inner service.
//!
//! # Which sources are weaker
//!
//! A key is a bearer secret: whoever sees it can use it. Headers (`X-API-Key`,
//! `Authorization`) are the strongest place for it, since proxies, servers and browsers
//! treat them as private and rarely log them. Two sources exist because browsers cannot use
//! a header everywhere, and both are weaker:
//!
//! - **the query string** ([`KeySource::Query`]) is part of the URL: access logs of every
//!   proxy and server on the way, browser history, `Referer` headers and monitoring tools
//!   record it;
//! - **a WebSocket subprotocol** ([`KeySource::Subprotocol`]), the only thing besides the URL
//!   a browser's `WebSocket` lets a page set, travels in `Sec-WebSocket-Protocol`, which
//!   load balancers and WAFs log more often than `Authorization` and which a server may
//!   echo back.
//!
//! Use them only for keys that are short-lived and narrow on their own:
//! [ephemeral keys](crate::keys::KeyManager::mint_ephemeral) minted for one browser
//! session, never a long-lived key. Offer them only on the routes that need them (the
//! gateway's `sources` per route). Both are removed from the request before it goes on:
//! here when credentials are hidden (the default), and by the
//! [`UpstreamAuthLayer`](crate::UpstreamAuthLayer) whatever this layer did (by default
//! `?key=` and `openai-insecure-api-key.` entries, with
//! [`strip_inbound`](crate::UpstreamAuthLayer::strip_inbound) every source this layer
//! reads); the query parameter byte for byte, the subprotocol entry alone with the other
//! subprotocols kept in order.
//!
//! # Open sockets
//!
//! A WebSocket upgrade ([`is_websocket_upgrade`](crate::socket::is_websocket_upgrade)) is
//! checked as above when it arrives, and then again every
//! [`recheck_sockets_every`](InboundApiKeyLayer::recheck_sockets_every) (default 10 s) for
//! as long as the socket is open: the same lookup and the same judgement of the key and its
//! ancestors (a user token: its verification again). The first check that fails closes the
//! socket through its [`SocketLease`](crate::socket::SocketLease): 1008 for a key revoked,
//! disabled, expired or gone, 1011 when the store cannot answer (fail closed, as for a
//! request). So a key revoked or expired while its sockets are open sees them closed
//! within one interval plus one lookup (at most the store timeout), counted from when the
//! store answers with the change (behind a [`CachedStore`](crate::store::CachedStore) that
//! is when the revocation reaches the cache: at once on the replica that made it, and
//! through invalidation on the others).

mod scope;
mod slot;
mod source;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

use crate::clock::{Clock, SystemClock};
use crate::identity::Identity;
use crate::keys::{Checksum, KeyDigest, KeyFormat};
use crate::keys::{KeyRecord, KeyUnusable, Scopes};
use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;
use crate::store::{KeyStore, LookupResult, StoreError};
use crate::wait_then_call::{Next, Resumable, Resume};

pub use scope::{RequireScopes, RequireScopesLayer};
pub use slot::KeyIdSlot;
pub(crate) use source::strip_subprotocols;
pub use source::{DEFAULT_SUBPROTOCOL_PREFIX, KeySource, ParseKeySourceError};

/// The longest key accepted by default, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 1024;

/// How long a store lookup may take by default before the request fails with 503.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the key of an open WebSocket is checked again by default.
pub const DEFAULT_SOCKET_RECHECK: Duration = Duration::from_secs(10);

/// A layer that authenticates requests by API key.
///
/// Defaults: keys from `X-API-Key` then `Authorization: Bearer`, credentials hidden from
/// the inner service, keys of at most 1 KiB, a 5-second store timeout, no preflight or
/// anonymous pass-through. Rejections are rendered in the default dialect (OpenAI, realm
/// `api`); a [`RejectionLayer`](crate::RejectionLayer) outside sets another.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::{Identity, InboundApiKeyLayer};
/// use tower_gateway_auth::keys::{KeyId, KeyRecord};
/// use tower_gateway_auth::store::{KeyStore, MemoryStore};
///
/// # tokio_test();
/// # fn tokio_test() { tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let digest = store.hasher().digest(b"gw_demo-key");
/// store.insert(KeyRecord::new(KeyId::random(), digest).with_name("demo"));
///
/// let service = ServiceBuilder::new()
///     .layer(InboundApiKeyLayer::new(store))
///     .service_fn(|req: Request<()>| async move {
///         let who = req.extensions().get::<Identity>().unwrap();
///         Ok::<_, Infallible>(Response::new(who.name().to_owned()))
///     });
///
/// let ok = Request::builder().header("x-api-key", "gw_demo-key").body(()).unwrap();
/// assert_eq!(service.clone().oneshot(ok).await.unwrap().status(), StatusCode::OK);
///
/// let bad = Request::builder().header("authorization", "Bearer nope").body(()).unwrap();
/// assert_eq!(service.oneshot(bad).await.unwrap().status(), StatusCode::UNAUTHORIZED);
/// # }) }
/// ```
pub struct InboundApiKeyLayer<K> {
    config: Arc<Config<K>>,
}

struct Config<K> {
    store: Arc<K>,
    sources: Vec<KeySource>,
    hide_credentials: bool,
    required_scopes: Scopes,
    identity_header: Option<HeaderName>,
    allow_preflight: bool,
    allow_anonymous: bool,
    max_key_len: usize,
    store_timeout: Option<Duration>,
    clock: Arc<dyn Clock>,
    formats: Vec<KeyFormat>,
    last_used: Option<crate::keys::LastUsed>,
    socket_recheck: Duration,
    #[cfg(feature = "jwt")]
    tokens: Option<crate::jwt::JwtVerifier>,
    #[cfg(feature = "jwt")]
    accept: crate::jwt::Accept,
}

impl<K> Clone for Config<K> {
    fn clone(&self) -> Self {
        Config {
            store: self.store.clone(),
            sources: self.sources.clone(),
            hide_credentials: self.hide_credentials,
            required_scopes: self.required_scopes.clone(),
            identity_header: self.identity_header.clone(),
            allow_preflight: self.allow_preflight,
            allow_anonymous: self.allow_anonymous,
            max_key_len: self.max_key_len,
            store_timeout: self.store_timeout,
            clock: self.clock.clone(),
            formats: self.formats.clone(),
            last_used: self.last_used.clone(),
            socket_recheck: self.socket_recheck,
            #[cfg(feature = "jwt")]
            tokens: self.tokens.clone(),
            #[cfg(feature = "jwt")]
            accept: self.accept,
        }
    }
}

impl<K: KeyStore> InboundApiKeyLayer<K> {
    /// A layer verifying keys against `store`, with the defaults above.
    pub fn new(store: K) -> Self {
        Self::from_shared(Arc::new(store))
    }

    /// A layer verifying keys against a store shared with other parts of the program (the
    /// management API, a reloader …).
    pub fn from_shared(store: Arc<K>) -> Self {
        InboundApiKeyLayer {
            config: Arc::new(Config {
                store,
                sources: vec![
                    KeySource::Header(HeaderName::from_static("x-api-key")),
                    KeySource::Bearer,
                ],
                hide_credentials: true,
                required_scopes: Scopes::empty(),
                identity_header: None,
                allow_preflight: false,
                allow_anonymous: false,
                max_key_len: DEFAULT_MAX_KEY_LEN,
                store_timeout: Some(DEFAULT_STORE_TIMEOUT),
                clock: Arc::new(SystemClock),
                formats: Vec::new(),
                last_used: None,
                socket_recheck: DEFAULT_SOCKET_RECHECK,
                #[cfg(feature = "jwt")]
                tokens: None,
                #[cfg(feature = "jwt")]
                accept: crate::jwt::Accept::Keys,
            }),
        }
    }

    /// Also verifies user tokens (JWTs) sent as `Authorization: Bearer`, with `verifier`
    /// (feature `jwt`): see [`crate::jwt`]. Takes both keys and tokens until
    /// [`accept`](Self::accept) says otherwise. The bearer source is added when the layer's
    /// sources lack it.
    #[cfg(feature = "jwt")]
    pub fn tokens(mut self, verifier: crate::jwt::JwtVerifier) -> Self {
        let config = self.config_mut();
        config.tokens = Some(verifier);
        config.accept = crate::jwt::Accept::Both;
        if !config.sources.contains(&KeySource::Bearer) {
            config.sources.push(KeySource::Bearer);
        }
        self
    }

    /// Which credentials the layer takes: keys, tokens or both (feature `jwt`; without a
    /// [`tokens`](Self::tokens) verifier only keys are taken whatever this says).
    #[cfg(feature = "jwt")]
    pub fn accept(mut self, accept: crate::jwt::Accept) -> Self {
        self.config_mut().accept = accept;
        self
    }

    fn config_mut(&mut self) -> &mut Config<K> {
        Arc::make_mut(&mut self.config)
    }

    /// Where to look for the key, tried in this order. Every source is read: two sources
    /// carrying different keys are rejected.
    ///
    /// # Panics
    /// When `sources` is empty or holds more than 32 sources.
    pub fn sources(mut self, sources: impl IntoIterator<Item = KeySource>) -> Self {
        let sources: Vec<KeySource> = sources.into_iter().collect();
        assert!(
            !sources.is_empty() && sources.len() <= source::MAX_SOURCES,
            "InboundApiKeyLayer takes between 1 and 32 key sources"
        );
        self.config_mut().sources = sources;
        self
    }

    /// Whether to remove the credential from the request before the inner service sees it
    /// (default: yes).
    pub fn hide_credentials(mut self, hide: bool) -> Self {
        self.config_mut().hide_credentials = hide;
        self
    }

    /// Scopes every key must have here; keys lacking one get 403 `insufficient_scope`. For
    /// per-route scopes, see [`RequireScopesLayer`].
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config_mut().required_scopes = Scopes::new(scopes);
        self
    }

    /// Sends the verified key's id to the inner service in this header (e.g.
    /// `x-consumer-id`). Any copy the client sent is removed first, on every request.
    pub fn identity_header(mut self, name: HeaderName) -> Self {
        self.config_mut().identity_header = Some(name);
        self
    }

    /// Lets CORS preflight requests (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) through without a key, so a CORS layer inside can
    /// answer them (default: no). Prefer a [`CorsLayer`](crate::cors::CorsLayer) outside
    /// this layer: it answers preflights itself, so none goes further; a preflight let
    /// through here reaches whatever is inside (the upstream layer refuses it without an
    /// identity, so it never carries the provider credential).
    pub fn allow_preflight(mut self, allow: bool) -> Self {
        self.config_mut().allow_preflight = allow;
        self
    }

    /// Lets requests that carry no key at all through without an [`Identity`]; a bad key is
    /// still rejected (default: no).
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.config_mut().allow_anonymous = allow;
        self
    }

    /// The longest key accepted, in bytes; longer credentials are rejected (400) before
    /// hashing or any store call (default: 1024).
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config_mut().max_key_len = max;
        self
    }

    /// How long a lookup may take before the request fails with 503; `None` waits forever
    /// (default: 5 s).
    pub fn store_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config_mut().store_timeout = timeout;
        self
    }

    /// The clock expiry and not-before are checked against (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.config_mut().clock = Arc::new(clock);
        self
    }

    /// The configured key sources, in order (e.g. for an upstream layer to strip them all).
    pub fn key_sources(&self) -> &[KeySource] {
        &self.config.sources
    }

    /// Key formats whose checksum is verified before any lookup: a key with one of these
    /// prefixes and a failing checksum is rejected as invalid without touching the store.
    /// Keys of other shapes (imported ones) are looked up as usual.
    pub fn key_formats(mut self, formats: impl IntoIterator<Item = KeyFormat>) -> Self {
        self.config_mut().formats = formats.into_iter().collect();
        self
    }

    /// Notes each accepted key's use in `uses`, which writes when each key was last used
    /// to its store, off the request path and at most once a minute per key (see
    /// [`LastUsed`](crate::keys::LastUsed)). Give every layer on one store the same one.
    pub fn last_used(mut self, uses: &crate::keys::LastUsed) -> Self {
        self.config_mut().last_used = Some(uses.clone());
        self
    }

    /// How often the key behind an open WebSocket is checked again; the socket is closed
    /// at the first check that fails (default: 10 s; at least 10 ms). See [Open
    /// sockets](self#open-sockets).
    pub fn recheck_sockets_every(mut self, interval: Duration) -> Self {
        self.config_mut().socket_recheck = interval.max(Duration::from_millis(10));
        self
    }

    /// The store keys are verified against.
    pub fn store(&self) -> &Arc<K> {
        &self.config.store
    }
}

impl<K> Clone for InboundApiKeyLayer<K> {
    fn clone(&self) -> Self {
        InboundApiKeyLayer {
            config: self.config.clone(),
        }
    }
}

impl<K> std::fmt::Debug for InboundApiKeyLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundApiKeyLayer")
            .field("sources", &self.config.sources)
            .field("hide_credentials", &self.config.hide_credentials)
            .field("required_scopes", &self.config.required_scopes)
            .finish_non_exhaustive()
    }
}

impl<S, K> Layer<S> for InboundApiKeyLayer<K> {
    type Service = InboundApiKey<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        InboundApiKey {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`InboundApiKeyLayer`] wraps around an inner service.
pub struct InboundApiKey<S, K> {
    inner: S,
    config: Arc<Config<K>>,
}

impl<S, K> InboundApiKey<S, K> {
    define_inner_service_accessors!();
}

impl<S: Clone, K> Clone for InboundApiKey<S, K> {
    fn clone(&self) -> Self {
        InboundApiKey {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: std::fmt::Debug, K> std::fmt::Debug for InboundApiKey<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundApiKey")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for InboundApiKey<S, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    K: KeyStore,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, K, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        if let Some(name) = &config.identity_header {
            req.headers_mut().remove(name);
        }
        if config.allow_preflight && is_preflight(&req) {
            tracing::debug!(target: "tower_gateway_auth::inbound", "CORS preflight let through without a key");
            return ResponseFuture::inner(self.inner.call(req));
        }

        let found = source::find(req.headers(), req.uri(), &config.sources, config.max_len());
        let presented = match found {
            Ok(Some(presented)) => presented,
            Ok(None) if config.allow_anonymous => {
                tracing::debug!(target: "tower_gateway_auth::inbound", "no API key: passed on anonymously");
                return ResponseFuture::inner(self.inner.call(req));
            }
            Ok(None) => {
                return ResponseFuture::rejected(config.refuse(&req, &missing(&config.sources)));
            }
            Err(rejection) => return ResponseFuture::rejected(config.refuse(&req, &rejection)),
        };
        #[cfg(feature = "jwt")]
        if let Some(verifier) = &config.tokens {
            match config.token_or_key(&presented) {
                Ok(false) => {}
                Ok(true) => {
                    let check = verifier.verify(presented.text());
                    let socket = crate::socket::is_websocket_upgrade(&req)
                        .then(|| presented.text().to_owned());
                    let carriers = presented.carriers;
                    if config.hide_credentials {
                        source::hide(&mut req, &config.sources, carriers);
                    }
                    if let Some(token) = socket {
                        let closer = token_recheck(verifier.clone(), token, config.socket_recheck);
                        crate::socket::SocketLease::of(&mut req).close_when(closer);
                    }
                    return ResponseFuture {
                        inner: Resumable::start(
                            Wait::Token(check),
                            &mut self.inner,
                            req,
                            &self.config,
                        ),
                    };
                }
                Err(rejection) => return ResponseFuture::rejected(config.refuse(&req, &rejection)),
            }
        }
        if presented.key.len() > config.max_key_len {
            let rejection = Rejection::new(
                RejectionKind::KeyTooLong,
                format!("The API key is longer than {} bytes.", config.max_key_len),
            );
            return ResponseFuture::rejected(config.refuse(&req, &rejection));
        }
        if config.fails_checksum(&presented) {
            let rejection = Rejection::new(RejectionKind::InvalidKey, "Invalid API key.");
            return ResponseFuture::rejected(config.refuse(&req, &rejection));
        }
        let digest = config.store.hasher().digest(&presented.key);
        let carriers = presented.carriers;
        if config.hide_credentials {
            source::hide(&mut req, &config.sources, carriers);
        }
        if crate::socket::is_websocket_upgrade(&req) {
            let closer = key_recheck(self.config.clone(), digest);
            crate::socket::SocketLease::of(&mut req).close_when(closer);
        }

        // An answer ready at once (an in-memory store, a cache hit) is judged right here,
        // and the inner service called in place; only a lookup that waits is timed and
        // parked (`Resumable`).
        let mut lookup = config.store.lookup(&digest);
        let wait = match Pin::new(&mut lookup).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Pending => Wait::Key(config.timed(lookup, digest, None)),
            Poll::Ready(found) => {
                let slot = req.extensions().get::<KeyIdSlot>();
                match config.judge_presented(found, &digest, slot) {
                    Ok(Judged::Usable(record)) => match config.accept(record, &mut req) {
                        Ok(()) => return ResponseFuture::inner(self.inner.call(req)),
                        Err(rejection) => {
                            return ResponseFuture::rejected(config.reject(&req, &rejection));
                        }
                    },
                    Ok(Judged::Parent(parent)) => Wait::Key(parent),
                    Err(rejection) => {
                        return ResponseFuture::rejected(config.reject(&req, &rejection));
                    }
                }
            }
        };
        ResponseFuture {
            inner: Resumable::start(wait, &mut self.inner, req, &self.config),
        }
    }
}

fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(http::header::ORIGIN)
        && req
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn missing(sources: &[KeySource]) -> Rejection {
    let list = sources.iter().map(ToString::to_string).collect::<Vec<_>>();
    let places = match list.as_slice() {
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
        [] => unreachable!("a layer has at least one source"),
    };
    Rejection::new(
        RejectionKind::MissingKey,
        format!("No API key was provided. Send one in {places}."),
    )
}

impl<K> Config<K> {
    /// The longest credential read: a token may be longer than a key.
    fn max_len(&self) -> usize {
        #[cfg(feature = "jwt")]
        if self.tokens.is_some() {
            return self.max_key_len.max(crate::jwt::MAX_TOKEN_LEN);
        }
        self.max_key_len
    }

    /// Whether `presented` is verified as a token (`true`) or as a key, or is refused
    /// because this layer does not take its kind.
    #[cfg(feature = "jwt")]
    fn token_or_key(&self, presented: &source::Presented<'_>) -> Result<bool, Rejection> {
        use crate::jwt::Accept;
        let by_bearer = self
            .sources
            .iter()
            .position(|s| *s == KeySource::Bearer)
            .is_some_and(|i| presented.carriers & (1 << i) != 0);
        let token = by_bearer && crate::jwt::looks_like_jwt(presented.text());
        match (self.accept, token) {
            (Accept::Keys, _) => Ok(false),
            (Accept::Both, token) => Ok(token),
            (Accept::Tokens, true) => Ok(true),
            (Accept::Tokens, false) => Err(Rejection::new(
                RejectionKind::InvalidToken,
                "This endpoint takes a user token (a JWT) in Authorization: Bearer.",
            )
            .with_description()),
        }
    }

    fn fails_checksum(&self, presented: &source::Presented<'_>) -> bool {
        !self.formats.is_empty()
            && self
                .formats
                .iter()
                .any(|f| f.check(presented.text()) == Checksum::Invalid)
    }
}

/// How many generations of parents a key may have. Ephemeral keys cannot mint, so one is
/// all the crate makes; records edited by hand get a bound, not a loop.
const MAX_ANCESTORS: u8 = 4;

impl<K: KeyStore> Config<K> {
    fn lookup(&self, digest: KeyDigest, lineage: Option<Lineage>) -> TimedLookup<K::Lookup> {
        self.timed(self.store.lookup(&digest), digest, lineage)
    }

    /// `lookup`, the store's lookup of `digest`, under the layer's timeout.
    fn timed(
        &self,
        lookup: K::Lookup,
        digest: KeyDigest,
        lineage: Option<Lineage>,
    ) -> TimedLookup<K::Lookup> {
        TimedLookup {
            #[cfg(feature = "metrics")]
            started: None,
            lookup,
            digest,
            limit: self.store_timeout,
            timer: None,
            lineage,
        }
    }

    /// Judges a lookup's result: the presented key's record, or one of its ancestors'.
    /// Once the key and all its ancestors are judged usable, the identity is put into the
    /// request.
    fn admit<B>(
        &self,
        answer: Checked,
        req: &mut Request<B>,
    ) -> Result<Next<Wait<K::Lookup>>, Rejection> {
        let slot = req.extensions().get::<KeyIdSlot>();
        match self.judge(answer, slot)? {
            Judged::Usable(key) => self.accept(key, req).map(|()| Next::Call),
            Judged::Parent(lookup) => Ok(Next::Wait(Wait::Key(lookup))),
        }
    }

    /// The presented key's record once it and every ancestor are judged usable, or the
    /// lookup of the next ancestor to judge.
    fn judge(
        &self,
        answer: Checked,
        slot: Option<&KeyIdSlot>,
    ) -> Result<Judged<K::Lookup>, Rejection> {
        let Checked {
            found,
            digest,
            lineage,
        } = answer;
        match lineage {
            None => self.judge_presented(found, &digest, slot),
            Some(Lineage { key, child, depth }) => {
                let ancestor = self.judge_ancestor(found, &digest, &key, &child)?;
                self.then_parent(key, ancestor, depth)
            }
        }
    }

    /// The presented key's lookup judged: the key usable (it has no parent), or its parent
    /// to look up next.
    fn judge_presented(
        &self,
        found: LookupResult,
        digest: &KeyDigest,
        slot: Option<&KeyIdSlot>,
    ) -> Result<Judged<K::Lookup>, Rejection> {
        let record = self.judge_key(found, digest, slot)?;
        if record.parent_digest().is_none() {
            return Ok(Judged::Usable(record));
        }
        self.then_parent(record.clone(), record, 0)
    }

    /// After `record` (the presented `key` or one of its ancestors, `depth` generations up)
    /// was judged usable: done if it has no parent, else the parent's lookup.
    fn then_parent(
        &self,
        key: Arc<KeyRecord>,
        record: Arc<KeyRecord>,
        depth: u8,
    ) -> Result<Judged<K::Lookup>, Rejection> {
        match record.parent_digest().map(|d| d.copied()) {
            None => Ok(Judged::Usable(key)),
            Some(_) if depth >= MAX_ANCESTORS => {
                tracing::warn!(target: "tower_gateway_auth::inbound", key_id = %key.id(), "API key rejected: too many generations of parent keys");
                Err(unusable(KeyUnusable::Revoked, true))
            }
            Some(parent) => self.parent_of(key, record, parent, depth + 1),
        }
    }

    /// The check of a request, made again for an open socket: the key and its ancestors
    /// usable now, and the layer's scopes still held.
    async fn recheck(&self, digest: KeyDigest) -> Result<(), Rejection> {
        let mut lookup = self.lookup(digest, None);
        loop {
            let answer = (&mut lookup).await;
            match self.judge(answer, None)? {
                Judged::Parent(next) => lookup = next,
                Judged::Usable(record) => {
                    if !self.required_scopes.is_empty()
                        && !self.required_scopes.is_subset_of(record.scopes())
                    {
                        return Err(Rejection::insufficient_scope(self.required_scopes.iter()));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The presented key's record, if it matches and is usable now.
    fn judge_key(
        &self,
        found: LookupResult,
        digest: &KeyDigest,
        slot: Option<&KeyIdSlot>,
    ) -> Result<Arc<KeyRecord>, Rejection> {
        let record = match found {
            Ok(Some(record)) if record.digest().ct_eq(digest) => record,
            Ok(_) => {
                tracing::info!(target: "tower_gateway_auth::inbound", fingerprint = %digest.fingerprint(), reason = "invalid_api_key", "API key rejected");
                return Err(Rejection::new(
                    RejectionKind::InvalidKey,
                    "Invalid API key.",
                ));
            }
            Err(error) => {
                tracing::warn!(target: "tower_gateway_auth::inbound", fingerprint = %digest.fingerprint(), %error, "key store failed: request refused");
                return Err(unavailable());
            }
        };
        if let Some(slot) = slot {
            slot.fill(record.id());
        }
        if let Err(why) = record.usable_at(self.clock.now()) {
            let rejection = unusable(why, false);
            tracing::info!(target: "tower_gateway_auth::inbound", key_id = %record.id(), reason = rejection.code(), "API key rejected");
            return Err(rejection);
        }
        Ok(record)
    }

    /// The parent of `child` (an ancestor of the presented `key`), if it is the record the
    /// child names and is usable now.
    fn judge_ancestor(
        &self,
        found: LookupResult,
        digest: &KeyDigest,
        key: &KeyRecord,
        child: &KeyRecord,
    ) -> Result<Arc<KeyRecord>, Rejection> {
        let why = match found {
            Ok(Some(parent))
                if parent.digest() == digest && Some(parent.id()) == child.parent() =>
            {
                match parent.usable_at(self.clock.now()) {
                    Ok(()) => return Ok(parent),
                    Err(why) => why,
                }
            }
            // Gone (deleted, or a different record under that digest): as good as revoked.
            Ok(_) => KeyUnusable::Revoked,
            Err(error) => {
                tracing::warn!(target: "tower_gateway_auth::inbound", key_id = %key.id(), parent = ?child.parent(), %error, "key store failed looking up a parent key: request refused");
                return Err(unavailable());
            }
        };
        let rejection = unusable(why, true);
        tracing::info!(target: "tower_gateway_auth::inbound", key_id = %key.id(), parent = ?child.parent(), reason = rejection.code(), "API key rejected: its parent key is not usable");
        Err(rejection)
    }

    /// Waits on the lookup of `child`'s parent next.
    fn parent_of(
        &self,
        key: Arc<KeyRecord>,
        child: Arc<KeyRecord>,
        parent: Option<KeyDigest>,
        depth: u8,
    ) -> Result<Judged<K::Lookup>, Rejection> {
        let Some(parent) = parent else {
            tracing::info!(target: "tower_gateway_auth::inbound", key_id = %key.id(), "API key rejected: its record does not say which key it was minted from");
            return Err(unusable(KeyUnusable::Revoked, true));
        };
        Ok(Judged::Parent(
            self.lookup(parent, Some(Lineage { key, child, depth })),
        ))
    }

    /// Checks the scopes of a usable key and hands its identity on.
    fn accept<B>(&self, record: Arc<KeyRecord>, req: &mut Request<B>) -> Result<(), Rejection> {
        // No scopes required (the usual case): the record's scope list is not read at all.
        if !self.required_scopes.is_empty() && !self.required_scopes.is_subset_of(record.scopes()) {
            let rejection = Rejection::insufficient_scope(self.required_scopes.iter());
            tracing::info!(target: "tower_gateway_auth::inbound", key_id = %record.id(), reason = rejection.code(), "API key rejected");
            return Err(rejection);
        }
        tracing::debug!(target: "tower_gateway_auth::inbound", key_id = %record.id(), "API key accepted");
        if let Some(name) = &self.identity_header {
            let id = HeaderValue::try_from(record.id().to_string()).expect("key ids are ASCII");
            req.headers_mut().insert(name.clone(), id);
        }
        if let Some(uses) = &self.last_used {
            uses.note(record.id());
        }
        req.extensions_mut().insert(Identity::new(record));
        Ok(())
    }

    /// The response for `rejection` (rendered in the stack's dialect by a
    /// [`RejectionLayer`](crate::RejectionLayer) outside, if there is one).
    fn reject<B>(&self, req: &Request<B>, rejection: &Rejection) -> Response<Bytes> {
        rejection.to_response(req.headers())
    }

    /// [`reject`](Self::reject) for a request turned away before any lookup (no key, a
    /// malformed one, a failed checksum): `admit` logs the others, naming the key.
    fn refuse<B>(&self, req: &Request<B>, rejection: &Rejection) -> Response<Bytes> {
        tracing::info!(target: "tower_gateway_auth::inbound", reason = rejection.code(), "request rejected before lookup");
        self.reject(req, rejection)
    }
}

/// What judging one lookup gives: the key usable, or its parent to look up next.
enum Judged<L> {
    Usable(Arc<KeyRecord>),
    Parent(TimedLookup<L>),
}

/// Closes an open socket once its key fails a check made every `config.socket_recheck`.
async fn key_recheck<K: KeyStore>(
    config: Arc<Config<K>>,
    digest: KeyDigest,
) -> crate::socket::CloseReason {
    loop {
        tokio::time::sleep(config.socket_recheck).await;
        if let Err(rejection) = config.recheck(digest).await {
            tracing::info!(target: "tower_gateway_auth::inbound", fingerprint = %digest.fingerprint(), reason = rejection.code(), "open WebSocket closed: its key failed a recheck");
            return socket_close(&rejection);
        }
    }
}

/// Closes an open socket once its user token fails a verification made every `every`.
#[cfg(feature = "jwt")]
async fn token_recheck(
    verifier: crate::jwt::JwtVerifier,
    token: String,
    every: Duration,
) -> crate::socket::CloseReason {
    loop {
        tokio::time::sleep(every).await;
        if let Err(rejection) = verifier.verify(&token).await {
            tracing::info!(target: "tower_gateway_auth::inbound", reason = rejection.code(), "open WebSocket closed: its user token failed a recheck");
            return socket_close(&rejection);
        }
    }
}

/// The close of a socket whose credential failed a recheck: 1011 when it could not be
/// checked, 1008 otherwise, with the rejection's message (never key material).
fn socket_close(rejection: &Rejection) -> crate::socket::CloseReason {
    let message = rejection.message().to_owned();
    if rejection.status().is_server_error() {
        crate::socket::CloseReason::internal(message)
    } else {
        crate::socket::CloseReason::policy(message)
    }
}

/// The rejection of a key that may not be used now, or whose parent (`inherited`) may not.
fn unusable(why: KeyUnusable, inherited: bool) -> Rejection {
    let message = match (why, inherited) {
        (KeyUnusable::Revoked, false) => "This API key has been revoked.",
        (KeyUnusable::Disabled, false) => "This API key is disabled.",
        (KeyUnusable::Expired, false) => "This API key has expired.",
        (KeyUnusable::NotYetValid, false) => "This API key is not valid yet.",
        (KeyUnusable::Revoked, true) => {
            "This API key is no longer valid: the key it was minted from has been revoked or deleted."
        }
        (KeyUnusable::Disabled, true) => {
            "This API key is disabled: the key it was minted from is disabled."
        }
        (KeyUnusable::Expired, true) => {
            "This API key has expired: the key it was minted from has expired."
        }
        (KeyUnusable::NotYetValid, true) => {
            "This API key is not valid yet: the key it was minted from is not valid yet."
        }
    };
    Rejection::new(RejectionKind::from(why), message)
}

fn unavailable() -> Rejection {
    Rejection::new(
        RejectionKind::StoreUnavailable,
        "API keys cannot be verified right now; try again shortly.",
    )
}

/// What a request waits on: a key's lookup, or a token's verification.
enum Wait<L> {
    Key(TimedLookup<L>),
    #[cfg(feature = "jwt")]
    Token(crate::jwt::TokenCheck),
}

/// What the wait brought.
enum Answer {
    Key(Checked),
    #[cfg(feature = "jwt")]
    Token(Result<Arc<KeyRecord>, Rejection>),
}

impl<L: Future<Output = LookupResult> + Unpin> Future for Wait<L> {
    type Output = Answer;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match &mut *self {
            Wait::Key(lookup) => Pin::new(lookup).poll(cx).map(Answer::Key),
            #[cfg(feature = "jwt")]
            Wait::Token(check) => Pin::new(check).poll(cx).map(Answer::Token),
        }
    }
}

impl<K: KeyStore, B> Resume<B> for Config<K> {
    type Wait = Wait<K::Lookup>;

    fn resume(&self, answer: Answer, req: &mut Request<B>) -> Next<Self::Wait> {
        let admitted = match answer {
            Answer::Key(checked) => self.admit(checked, req),
            #[cfg(feature = "jwt")]
            Answer::Token(Ok(record)) => {
                if let Some(slot) = req.extensions().get::<KeyIdSlot>() {
                    slot.fill(record.id());
                }
                self.accept(record, req).map(|()| Next::Call)
            }
            #[cfg(feature = "jwt")]
            Answer::Token(Err(rejection)) => {
                tracing::info!(target: "tower_gateway_auth::inbound", reason = rejection.code(), why = rejection.message(), "user token rejected");
                Err(rejection)
            }
        };
        match admitted {
            Ok(next) => next,
            Err(rejection) => Next::Respond(self.reject(req, &rejection)),
        }
    }
}

/// While a key's ancestors are checked: the presented key's record, the record whose
/// parent is being looked up, and how many generations up that is.
struct Lineage {
    key: Arc<KeyRecord>,
    child: Arc<KeyRecord>,
    depth: u8,
}

/// What a [`TimedLookup`] found, for which digest, and for whom.
struct Checked {
    found: LookupResult,
    digest: KeyDigest,
    lineage: Option<Lineage>,
}

/// A store lookup under the layer's timeout, carrying the digest it is for.
struct TimedLookup<L> {
    /// For `gateway_auth_store_lookup_seconds`: set when the lookup first has to wait.
    #[cfg(feature = "metrics")]
    started: Option<std::time::Instant>,
    lookup: L,
    digest: KeyDigest,
    limit: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Set when this is the lookup of a key's parent.
    lineage: Option<Lineage>,
}

impl<L: Future<Output = LookupResult> + Unpin> Future for TimedLookup<L> {
    type Output = Checked;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(found) = Pin::new(&mut this.lookup).poll(cx) {
            return Poll::Ready(this.checked(found));
        }
        // Only lookups that wait are timed: an answer ready at once (an in-memory store, a
        // cache hit) costs no clock read, and is counted by the cache's own events.
        #[cfg(feature = "metrics")]
        this.started.get_or_insert_with(std::time::Instant::now);
        let Some(limit) = this.limit else {
            return Poll::Pending;
        };
        // Only lookups that actually wait get a timer.
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        tracing::warn!(target: "tower_gateway_auth::inbound", fingerprint = %this.digest.fingerprint(), timeout = ?limit, "key store timed out: request refused");
        Poll::Ready(this.checked(Err(StoreError::new("lookup timed out"))))
    }
}

impl<L> TimedLookup<L> {
    fn checked(&mut self, found: LookupResult) -> Checked {
        #[cfg(feature = "metrics")]
        if let Some(started) = self.started {
            crate::metrics::store_lookup(
                started.elapsed(),
                match &found {
                    Ok(Some(_)) => "found",
                    Ok(None) => "unknown",
                    Err(_) => "error",
                },
            );
        }
        Checked {
            found,
            digest: self.digest,
            lineage: self.lineage.take(),
        }
    }
}

pin_project! {
    /// The response future of [`InboundApiKey`].
    pub struct ResponseFuture<S, K, B>
    where
        S: Service<Request<B>>,
        K: KeyStore,
    {
        #[pin]
        inner: Resumable<Wait<K::Lookup>, S, Config<K>, B>,
    }
}

impl<S, K, B> ResponseFuture<S, K, B>
where
    S: Service<Request<B>>,
    K: KeyStore,
{
    fn inner(future: S::Future) -> Self {
        ResponseFuture {
            inner: Resumable::decided(crate::response::ResponseFuture::inner(future)),
        }
    }

    fn rejected(response: Response<Bytes>) -> Self {
        ResponseFuture {
            inner: Resumable::decided(crate::response::ResponseFuture::rejected(response)),
        }
    }
}

impl<S, K, B, ResBody> Future for ResponseFuture<S, K, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    K: KeyStore,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
