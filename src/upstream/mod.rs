//! [`UpstreamAuthLayer`]: strip every client credential, then give the request the
//! provider's.
//!
//! The gateway's client key must never reach the provider, and the provider's key must
//! never reach the client. The data path of one request, top to bottom:
//!
//! 1. a request without an [`Identity`] (let through by the inbound layer as a preflight or
//!    anonymously) is refused with 401 unless
//!    [`credential_without_identity`](UpstreamAuthLayer::credential_without_identity) says
//!    otherwise: no credential for a caller without a key;
//! 2. ask the [`CredentialSource`] for this caller's credential (the [`Identity`] the
//!    inbound layer put in the extensions selects it); a refusal (401) or an unavailable
//!    credential (503) is answered here and the request goes no further;
//! 3. remove every client credential: the `Authorization`, `x-api-key`, `api-key` and
//!    `x-goog-api-key` headers, the `key` query parameter and the
//!    `openai-insecure-api-key.` entries of `Sec-WebSocket-Protocol`, the names the inbound
//!    layer reads ([`strip_inbound`](UpstreamAuthLayer::strip_inbound)) and any added with
//!    [`strip_header`](UpstreamAuthLayer::strip_header) /
//!    [`strip_query`](UpstreamAuthLayer::strip_query) /
//!    [`strip_subprotocol`](UpstreamAuthLayer::strip_subprotocol) — whether or not the
//!    inbound layer hid them. Other query parameters are kept byte for byte, other
//!    subprotocols (`realtime`) in order;
//! 4. apply the [`Provider`]'s header rules and query parameters;
//! 5. place the credential as the provider wants it ([`Placement`]) and call the inner
//!    service.
//!
//! Credentials are sensitive header values throughout; logs name the provider, the source
//! and the credential's [`Fingerprint`](crate::keys::Fingerprint), never the credential.

#[cfg(feature = "jwt")]
mod client_credentials;
mod credential;
mod per_identity;
mod pool;
pub(crate) mod provider;
mod refresh;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::{HeaderName, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::identity::Identity;
use crate::inbound::InboundApiKeyLayer;
use crate::query_string;
use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;
use crate::wait_then_call::{Next, Resumable, Resume};

#[cfg(feature = "jwt")]
pub use client_credentials::{ClientAuth, ClientCredentials, ClientCredentialsBuilder};
pub use credential::{Credential, CredentialError, CredentialSource};
pub use per_identity::{PerIdentity, PerIdentityFuture};
pub use pool::KeyPool;
pub use provider::{
    ANTHROPIC_BETA, ANTHROPIC_VERSION, DEFAULT_ANTHROPIC_VERSION, OPENAI_ORGANIZATION,
    OPENAI_PROJECT, ParseProviderError, Placement, Provider,
};
pub use refresh::{
    DEFAULT_FETCH_TIMEOUT, DEFAULT_REFRESH_MARGIN, DEFAULT_RETRY_BACKOFF, FetchError,
    RefreshFuture, RefreshingToken, RefreshingTokenBuilder, Token, TokenFetcher,
};

/// The client-credential headers removed from every request.
pub const DEFAULT_STRIPPED_HEADERS: [HeaderName; 4] = [
    AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
];

/// The client-credential query parameters removed from every request.
pub const DEFAULT_STRIPPED_QUERY: [&str; 1] = ["key"];

/// The prefixes of the client-credential `Sec-WebSocket-Protocol` entries removed from every
/// request (the other subprotocols stay).
pub const DEFAULT_STRIPPED_SUBPROTOCOLS: [&str; 1] = [crate::inbound::DEFAULT_SUBPROTOCOL_PREFIX];

/// A layer that replaces the client's credentials with the provider's.
///
/// Defaults: the headers in [`DEFAULT_STRIPPED_HEADERS`] and the query parameters in
/// [`DEFAULT_STRIPPED_QUERY`] are stripped, and a request without an [`Identity`] is refused (see
/// [`credential_without_identity`](Self::credential_without_identity)).
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::{InboundApiKeyLayer, UpstreamAuthLayer};
/// use tower_gateway_auth::store::MemoryStore;
/// use tower_gateway_auth::upstream::{Credential, Provider};
/// # use std::sync::Arc;
/// # use tower_gateway_auth::{Identity, keys::KeyHasher, keys::KeyId, keys::KeyRecord};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let inbound = InboundApiKeyLayer::new(MemoryStore::new());
/// let upstream = UpstreamAuthLayer::new(Provider::anthropic(), Credential::new("sk-ant-upstream").unwrap())
///     .strip_inbound(&inbound);
///
/// let service = ServiceBuilder::new()
///     .layer(upstream)
///     .service_fn(|req: Request<()>| async move {
///         assert_eq!(req.headers()["x-api-key"], "sk-ant-upstream");
///         assert_eq!(req.headers()["anthropic-version"], "2023-06-01");
///         assert!(req.headers().get("authorization").is_none());
///         assert_eq!(req.uri(), "/v1/messages?beta=true");
///         Ok::<_, Infallible>(Response::new(()))
///     });
///
/// let mut req = Request::post("/v1/messages?key=gw_client&beta=true")
///     .header("authorization", "Bearer gw_client")
///     .body(())
///     .unwrap();
/// // The caller the inbound layer verified (set here by hand).
/// # let record = KeyRecord::new(KeyId::random(), KeyHasher::sha256().digest(b"gw_client"));
/// req.extensions_mut().insert(Identity::new(Arc::new(record)));
/// assert_eq!(service.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
///
/// // No identity, no provider credential: refused, the inner service is not called.
/// let anonymous = Request::post("/v1/messages").body(()).unwrap();
/// assert_eq!(service.oneshot(anonymous).await.unwrap().status(), StatusCode::UNAUTHORIZED);
/// # });
/// ```
pub struct UpstreamAuthLayer<C> {
    config: Arc<Config<C>>,
}

struct Config<C> {
    provider: Provider,
    source: Arc<C>,
    strip_headers: Vec<HeaderName>,
    strip_query: Vec<Arc<str>>,
    strip_subprotocols: Vec<Arc<str>>,
    /// Whether a request with no `Identity` still gets the credential (off: it is refused).
    without_identity: bool,
    /// Derived from `provider` and `strip_headers` by `derive`, and only there: what every
    /// request loses in one pass.
    removed: Vec<HeaderName>,
    /// The provider's rules left to apply one by one after that pass.
    rules_from: usize,
}

impl<C> Clone for Config<C> {
    fn clone(&self) -> Self {
        Config {
            provider: self.provider.clone(),
            source: self.source.clone(),
            strip_headers: self.strip_headers.clone(),
            strip_query: self.strip_query.clone(),
            strip_subprotocols: self.strip_subprotocols.clone(),
            without_identity: self.without_identity,
            removed: self.removed.clone(),
            rules_from: self.rules_from,
        }
    }
}

impl<C> Config<C> {
    /// Computes the state derived from the settings: the strip list less the header the
    /// credential is written into (overwritten anyway), and the provider's leading removals
    /// (OpenAI's organization and project headers): removing commutes with removing, so all
    /// go in one pass. Called when the config is made and, through [`ConfigMut`], after every
    /// change: no setter computes derived state itself.
    fn derive(&mut self) {
        let placed = match self.provider.placement() {
            Placement::Bearer => Some(&AUTHORIZATION),
            Placement::Header(name) => Some(name),
            Placement::Query(_) => None,
        };
        let rules = self.provider.header_rules();
        self.rules_from = rules.iter().take_while(|r| r.removed().is_some()).count();
        self.removed = self
            .strip_headers
            .iter()
            .filter(|&n| Some(n) != placed)
            .chain(rules[..self.rules_from].iter().filter_map(|r| r.removed()))
            .cloned()
            .collect();
    }
}

impl<C: CredentialSource> UpstreamAuthLayer<C> {
    /// A layer giving requests `provider`'s credential from `source`.
    pub fn new(provider: Provider, source: C) -> Self {
        Self::from_shared(provider, Arc::new(source))
    }

    /// A layer using a source shared with other parts of the program (e.g. one token
    /// source for several routes).
    pub fn from_shared(provider: Provider, source: Arc<C>) -> Self {
        let mut config = Config {
            provider,
            source,
            strip_headers: DEFAULT_STRIPPED_HEADERS.to_vec(),
            strip_query: DEFAULT_STRIPPED_QUERY.iter().map(|&n| n.into()).collect(),
            strip_subprotocols: DEFAULT_STRIPPED_SUBPROTOCOLS
                .iter()
                .map(|&p| p.into())
                .collect(),
            without_identity: false,
            removed: Vec::new(),
            rules_from: 0,
        };
        config.derive();
        UpstreamAuthLayer {
            config: Arc::new(config),
        }
    }

    /// The only way to change the settings: the derived state is recomputed once the
    /// change is made, so no setter has to remember to.
    fn config_mut(&mut self) -> ConfigMut<'_, C> {
        ConfigMut(Arc::make_mut(&mut self.config))
    }

    /// Also strips every header and query parameter `inbound` reads keys from, whether or
    /// not it hides them itself.
    pub fn strip_inbound<K>(mut self, inbound: &InboundApiKeyLayer<K>) -> Self
    where
        K: crate::store::KeyStore,
    {
        for source in inbound.key_sources() {
            if let Some(name) = source.header_name() {
                self = self.strip_header(name.clone());
            }
            if let Some(name) = source.query_name() {
                self = self.strip_query(name);
            }
            if let Some(prefix) = source.subprotocol_prefix() {
                self = self.strip_subprotocol(prefix);
            }
        }
        self
    }

    /// Also strips header `name` (every value).
    pub fn strip_header(mut self, name: HeaderName) -> Self {
        let mut config = self.config_mut();
        if !config.strip_headers.contains(&name) {
            config.strip_headers.push(name);
        }
        drop(config);
        self
    }

    /// Also strips query parameter `name` (every occurrence, its name compared
    /// percent-decoded).
    pub fn strip_query(mut self, name: &str) -> Self {
        let mut config = self.config_mut();
        if !config.strip_query.iter().any(|n| &**n == name) {
            config.strip_query.push(name.into());
        }
        drop(config);
        self
    }

    /// Also strips the `Sec-WebSocket-Protocol` entries that start with `prefix` (a key sent
    /// as a subprotocol); the other entries stay, in order.
    pub fn strip_subprotocol(mut self, prefix: &str) -> Self {
        let mut config = self.config_mut();
        if !config.strip_subprotocols.iter().any(|p| &**p == prefix) {
            config.strip_subprotocols.push(prefix.into());
        }
        drop(config);
        self
    }

    /// Whether a request that carries no [`Identity`] still gets the provider's credential
    /// (default: no).
    ///
    /// The inbound layer lets some requests through without an identity: CORS preflights
    /// ([`allow_preflight`](InboundApiKeyLayer::allow_preflight)) and keyless requests
    /// ([`allow_anonymous`](InboundApiKeyLayer::allow_anonymous)). By default such a request
    /// is refused here with 401 and never reaches the inner service, so that no one without
    /// a key spends the provider account. Turn this on only for a route meant to be public
    /// on the gateway's account; the credential source is then asked with no identity
    /// ([`PerIdentity`] answers with its fallback).
    pub fn credential_without_identity(mut self, allow: bool) -> Self {
        self.config_mut().without_identity = allow;
        self
    }

    /// The provider.
    pub fn provider(&self) -> &Provider {
        &self.config.provider
    }

    /// The credential source.
    pub fn source(&self) -> &Arc<C> {
        &self.config.source
    }

    /// The headers stripped from every request.
    pub fn stripped_headers(&self) -> &[HeaderName] {
        &self.config.strip_headers
    }

    /// The query parameters stripped from every request.
    pub fn stripped_query(&self) -> impl Iterator<Item = &str> {
        self.config.strip_query.iter().map(|n| &**n)
    }
}

/// A change to a layer's [`Config`]; dropping it brings the derived state up to date.
struct ConfigMut<'a, C>(&'a mut Config<C>);

impl<C> std::ops::Deref for ConfigMut<'_, C> {
    type Target = Config<C>;

    fn deref(&self) -> &Config<C> {
        self.0
    }
}

impl<C> std::ops::DerefMut for ConfigMut<'_, C> {
    fn deref_mut(&mut self) -> &mut Config<C> {
        self.0
    }
}

impl<C> Drop for ConfigMut<'_, C> {
    fn drop(&mut self) {
        self.0.derive();
    }
}

impl<C> Clone for UpstreamAuthLayer<C> {
    fn clone(&self) -> Self {
        UpstreamAuthLayer {
            config: self.config.clone(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for UpstreamAuthLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt("UpstreamAuthLayer", f)
    }
}

impl<C: fmt::Debug> Config<C> {
    fn fmt(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("provider", &self.provider)
            .field("source", &self.source)
            .field("strip_headers", &self.strip_headers)
            .field("strip_query", &self.strip_query)
            .field("strip_subprotocols", &self.strip_subprotocols)
            .finish_non_exhaustive()
    }
}

impl<S, C> Layer<S> for UpstreamAuthLayer<C> {
    type Service = UpstreamAuth<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamAuth {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`UpstreamAuthLayer`] wraps around an inner service.
pub struct UpstreamAuth<S, C> {
    inner: S,
    config: Arc<Config<C>>,
}

impl<S, C> UpstreamAuth<S, C> {
    define_inner_service_accessors!();
}

impl<S: Clone, C> Clone for UpstreamAuth<S, C> {
    fn clone(&self) -> Self {
        UpstreamAuth {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for UpstreamAuth<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("inner", &self.inner)
            .field("provider", &self.config.provider.name())
            .finish_non_exhaustive()
    }
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for UpstreamAuth<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    C: CredentialSource,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, C, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let identity = req.extensions().get::<Identity>();
        if identity.is_none() && !self.config.without_identity {
            // Nothing is forwarded, so the client's credentials go nowhere either.
            tracing::info!(target: "tower_gateway_auth::upstream", provider = self.config.provider.name(), "request refused: no identity, so no upstream credential");
            let rejection = Rejection::new(
                RejectionKind::MissingKey,
                "An API key is required for this route.",
            );
            let response = rejection.to_response(req.headers());
            return ResponseFuture {
                inner: Resumable::decided(crate::response::ResponseFuture::rejected(response)),
            };
        }
        let credential = self.config.source.credential(identity);
        ResponseFuture {
            inner: Resumable::start(credential, &mut self.inner, req, &self.config),
        }
    }
}

impl<C: CredentialSource, B> Resume<B> for Config<C> {
    type Wait = C::Future;

    /// Rewrites the request with the credential, or answers the rejection.
    fn resume(
        &self,
        credential: Result<Credential, Rejection>,
        req: &mut Request<B>,
    ) -> Next<C::Future> {
        let provider = self.provider.name();
        let source = self.source.label();
        match credential {
            Ok(credential) => {
                tracing::debug!(target: "tower_gateway_auth::upstream", provider, source, fingerprint = %credential.fingerprint(), "upstream credential placed");
                self.rewrite(req, &credential);
                Next::Call
            }
            Err(rejection) => {
                tracing::info!(target: "tower_gateway_auth::upstream", provider, source, reason = rejection.code(), "request refused: no upstream credential");
                Next::Respond(rejection.to_response(req.headers()))
            }
        }
    }
}

impl<C: CredentialSource> Config<C> {
    /// Steps 3–5 of the data path: strip, apply the provider's extras, place.
    fn rewrite<B>(&self, req: &mut Request<B>, credential: &Credential) {
        crate::remove_headers::remove_all(req.headers_mut(), &self.removed);
        crate::inbound::strip_subprotocols(req.headers_mut(), &self.strip_subprotocols);
        if let Some(uri) = self.rewrite_query(req.uri(), credential) {
            *req.uri_mut() = uri;
        }
        for rule in &self.provider.header_rules()[self.rules_from..] {
            rule.apply(req);
        }
        match self.provider.placement() {
            Placement::Bearer => {
                req.headers_mut()
                    .insert(AUTHORIZATION, credential.bearer().clone());
            }
            Placement::Header(name) => {
                req.headers_mut()
                    .insert(name.clone(), credential.value().clone());
            }
            Placement::Query(_) => {}
        }
    }

    /// The URI with the client's credentials taken out of the query and the provider's
    /// parameters (and credential, for a query placement) put in; `None` when there is
    /// nothing to change.
    fn rewrite_query(&self, uri: &Uri, credential: &Credential) -> Option<Uri> {
        let original = uri.query();
        let mut query = original.and_then(|q| query_string::without(q, &self.strip_query));
        let params = self
            .provider
            .query_params()
            .iter()
            .map(|(name, value)| (&**name, value.as_bytes()));
        let placed = match self.provider.placement() {
            Placement::Query(name) => Some((&**name, credential.value().as_bytes())),
            _ => None,
        };
        for (name, value) in params.chain(placed) {
            let current = query.as_deref().or(original).unwrap_or("");
            query = Some(query_string::with_param(current, name, value));
        }
        query.map(|query| query_string::set_query(uri, &query))
    }
}

pin_project! {
    /// The response future of [`UpstreamAuth`].
    pub struct ResponseFuture<S, C, B>
    where
        S: Service<Request<B>>,
        C: CredentialSource,
    {
        #[pin]
        inner: Resumable<C::Future, S, Config<C>, B>,
    }
}

impl<S, C, B, ResBody> Future for ResponseFuture<S, C, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    C: CredentialSource,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(provider: Provider, uri: &str) -> Uri {
        let layer = UpstreamAuthLayer::new(provider, Credential::new("up&key").unwrap())
            .strip_query("api_key");
        let uri: Uri = uri.parse().unwrap();
        layer
            .config
            .rewrite_query(&uri, &Credential::new("up&key").unwrap())
            .unwrap_or(uri)
    }

    #[test]
    fn derived_removals_follow_every_change() {
        let extra = HeaderName::from_static("x-extra");
        let layer = UpstreamAuthLayer::new(
            Provider::header(HeaderName::from_static("x-api-key")),
            Credential::new("k").unwrap(),
        );
        let before = layer.clone();
        let layer = layer.strip_header(extra.clone()).strip_query("token");
        assert!(layer.config.removed.contains(&extra));
        // The header the credential goes into is overwritten, not removed first.
        assert!(!layer.config.removed.iter().any(|n| n == "x-api-key"));
        // A clone taken before the change keeps its own, consistent, state.
        assert!(!before.config.removed.contains(&extra));
        assert!(before.config.removed.contains(&AUTHORIZATION));
    }

    #[test]
    fn query_rewrites() {
        // Nothing to strip, nothing to add: the very same URI.
        assert_eq!(
            rewritten(Provider::openai(), "/v1/x?a=%2f&b"),
            "/v1/x?a=%2f&b"
        );
        assert_eq!(rewritten(Provider::openai(), "/v1/x"), "/v1/x");
        assert_eq!(
            rewritten(Provider::openai(), "/v1/x?key=a&a=%2f&api_key=b&b"),
            "/v1/x?a=%2f&b"
        );
        assert_eq!(rewritten(Provider::openai(), "/v1/x?key=a"), "/v1/x");
        assert_eq!(
            rewritten(Provider::gemini_query(), "/v1/x?key=a&alt=sse&key=b"),
            "/v1/x?alt=sse&key=up%26key"
        );
        assert_eq!(
            rewritten(Provider::gemini_query(), "/v1/x"),
            "/v1/x?key=up%26key"
        );
        assert_eq!(
            rewritten(
                Provider::azure().api_version("2024-10-21"),
                "/d/chat?api-version=2023-05-15&key=gw&x=1"
            ),
            "/d/chat?x=1&api-version=2024-10-21"
        );
        assert_eq!(
            rewritten(
                Provider::query("token").api_version("v1"),
                "/p?token=client"
            ),
            "/p?api-version=v1&token=up%26key"
        );
    }
}
