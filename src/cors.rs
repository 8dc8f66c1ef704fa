//! [`CorsLayer`]: CORS answered by the gateway, so that a page on an allowed origin can call
//! a route from the browser.
//!
//! A browser sends a *preflight* (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) before a cross-origin request that carries a key
//! header, and the preflight carries no key. This layer answers it itself, before the
//! inbound layer: it is never forwarded, so it can neither be refused for lacking a key nor
//! reach the provider (with or without its credential). The real request then goes through
//! the stack as any other, and its answer, a 401 or a 429 included, gets the CORS headers
//! for an allowed origin, so that the page can read why it was refused.
//!
//! - **Origins** are exact (`https://app.example`, compared as browsers serialize them) or
//!   `*`; `*` never goes with credentials ([`build`](CorsBuilder::build) refuses it). A
//!   request from an origin not on the list gets no CORS header at all, preflight or not
//!   (the browser then refuses to hand the answer to the page); its preflight is still
//!   answered here and goes no further.
//! - **A plain `OPTIONS`** (no `Origin`, or no `Access-Control-Request-Method`) is not a
//!   preflight: it goes through the stack like any request.
//! - **WebSockets** have no CORS: a browser opens a socket to any origin and only says
//!   where the page came from, in `Origin`. An upgrade whose `Origin` is not on the list is
//!   refused here with 403; one without `Origin` (not a browser) passes.
//! - `Vary: Origin` is on every answer when the list is not `*`, so that a cache never
//!   serves one origin's answer to another.
//!
//! Why not tower-http's `CorsLayer`: it takes every `OPTIONS` for a preflight (a plain one
//! never reaches the route), sends its method, header and max-age lists to origins it does
//! not allow, and checks `*` with credentials only by panicking when first polled. Fixing
//! those around it left little of it to use, so this is its own small layer, with no
//! dependency.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_gateway_auth::cors::CorsLayer;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cors = CorsLayer::builder()
//!     .allow_origins(["https://app.example"])
//!     .build()
//!     .unwrap();
//! let service = ServiceBuilder::new()
//!     .layer(cors)
//!     // .layer(inbound) …
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("from the route")))
//!     });
//!
//! let preflight = Request::options("/v1/chat/completions")
//!     .header("origin", "https://app.example")
//!     .header("access-control-request-method", "POST")
//!     .header("access-control-request-headers", "authorization, content-type")
//!     .body(())
//!     .unwrap();
//! let answer = service.clone().oneshot(preflight).await.unwrap();
//! assert_eq!(answer.status(), StatusCode::NO_CONTENT);
//! assert_eq!(answer.headers()["access-control-allow-origin"], "https://app.example");
//! assert!(answer.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
//!
//! let elsewhere = Request::options("/v1/chat/completions")
//!     .header("origin", "https://evil.example")
//!     .header("access-control-request-method", "POST")
//!     .body(())
//!     .unwrap();
//! let answer = service.oneshot(elsewhere).await.unwrap();
//! assert!(answer.headers().keys().all(|name| !name.as_str().starts_with("access-control-")));
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;

/// The request headers a page may send by default: the credential headers, the providers'
/// headers and the ones their SDKs add (OpenAI's and Anthropic's JavaScript SDKs send the
/// `x-stainless-*` family).
pub const DEFAULT_ALLOWED_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "content-type",
    "accept",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-retry-count",
    "x-stainless-timeout",
    "x-stainless-helper-method",
];

/// The response headers a page may read by default: the request id and the rate-limit
/// headers (a 429's `Retry-After` among them), which SDKs read to back off.
pub const DEFAULT_EXPOSED_HEADERS: &[&str] = &[
    "x-request-id",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
];

/// The methods a page may use by default.
pub const DEFAULT_ALLOWED_METHODS: &[Method] = &[
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// How long a browser may cache a preflight's answer by default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);

/// A layer that answers CORS preflights and adds the CORS headers to the answers of the
/// layers inside it; see [the module docs](self).
#[derive(Clone)]
pub struct CorsLayer {
    policy: Arc<Policy>,
}

struct Policy {
    /// `None`: any origin (`*`).
    origins: Option<Vec<HeaderValue>>,
    credentials: bool,
    methods: HeaderValue,
    headers: HeaderValue,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
}

impl CorsLayer {
    /// Options for the layer; at least one origin must be given.
    pub fn builder() -> CorsBuilder {
        CorsBuilder {
            origins: Vec::new(),
            credentials: false,
            methods: DEFAULT_ALLOWED_METHODS.to_vec(),
            headers: DEFAULT_ALLOWED_HEADERS
                .iter()
                .map(|&h| h.to_owned())
                .collect(),
            expose: DEFAULT_EXPOSED_HEADERS
                .iter()
                .map(|&h| h.to_owned())
                .collect(),
            max_age: DEFAULT_MAX_AGE,
        }
    }

    /// Whether `origin` (an `Origin` header's value) may read this layer's answers.
    pub fn allows(&self, origin: &HeaderValue) -> bool {
        self.policy.allows(origin)
    }
}

impl Policy {
    fn allows(&self, origin: &HeaderValue) -> bool {
        match &self.origins {
            None => true,
            Some(list) => list
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes())),
        }
    }

    /// `Access-Control-Allow-Origin` (and credentials) for an allowed `origin`.
    fn allow(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        let value = match &self.origins {
            None if !self.credentials => HeaderValue::from_static("*"),
            _ => origin.clone(),
        };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// `Vary`, appended: what a cache must key this answer by.
    fn vary(&self, headers: &mut HeaderMap, preflight: bool) {
        if preflight {
            headers.append(
                VARY,
                HeaderValue::from_static(
                    "origin, access-control-request-method, access-control-request-headers",
                ),
            );
        } else if self.origins.is_some() || self.credentials {
            headers.append(VARY, HeaderValue::from_static("origin"));
        }
    }

    fn preflight(&self, origin: &HeaderValue) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        self.vary(headers, true);
        if self.allows(origin) {
            self.allow(origin, headers);
            headers.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, self.headers.clone());
            headers.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        }
        response
    }
}

impl fmt::Debug for CorsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let policy = &self.policy;
        f.debug_struct("CorsLayer")
            .field("origins", &policy.origins)
            .field("credentials", &policy.credentials)
            .field("methods", &policy.methods)
            .field("max_age", &policy.max_age)
            .finish_non_exhaustive()
    }
}

/// Options for a [`CorsLayer`].
#[derive(Debug, Clone)]
pub struct CorsBuilder {
    origins: Vec<String>,
    credentials: bool,
    methods: Vec<Method>,
    headers: Vec<String>,
    expose: Vec<String>,
    max_age: Duration,
}

impl CorsBuilder {
    /// The origins whose pages may call the routes: each exactly as a browser sends it
    /// (`https://app.example`, `http://localhost:5173`: a scheme, a host, a port if not
    /// the default, nothing else), or `*` alone for any origin.
    pub fn allow_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.origins.extend(origins.into_iter().map(Into::into));
        self
    }

    /// Whether the page may send cookies or HTTP authentication with its requests
    /// (`Access-Control-Allow-Credentials: true`; default: no). An API key in a header
    /// needs no credentials mode. Not with `*`.
    pub fn allow_credentials(mut self, allow: bool) -> Self {
        self.credentials = allow;
        self
    }

    /// The methods a page may use (default: [`DEFAULT_ALLOWED_METHODS`]).
    pub fn allow_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The request headers a page may send (default: [`DEFAULT_ALLOWED_HEADERS`]); these
    /// replace the defaults. `*` does not cover `Authorization` in browsers, so name it.
    pub fn allow_headers<I, S>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.headers = headers.into_iter().map(Into::into).collect();
        self
    }

    /// Adds request headers a page may send to those already allowed.
    pub fn also_allow_headers<I, S>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.headers.extend(headers.into_iter().map(Into::into));
        self
    }

    /// The response headers a page may read besides the safelisted ones (default:
    /// [`DEFAULT_EXPOSED_HEADERS`]); these replace the defaults.
    pub fn expose_headers<I, S>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.expose = headers.into_iter().map(Into::into).collect();
        self
    }

    /// How long a browser may cache a preflight's answer (default: 10 minutes; browsers
    /// cap it, Chromium at 2 hours). Whole seconds.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The layer, or why these options make none.
    pub fn build(self) -> Result<CorsLayer, InvalidCors> {
        if self.origins.is_empty() {
            return Err(InvalidCors("name at least one origin (or `*`)".into()));
        }
        let any = self.origins.iter().any(|o| o == "*");
        let origins = if any {
            if self.origins.len() > 1 {
                return Err(InvalidCors(
                    "`*` allows every origin: give it alone, not in a list".into(),
                ));
            }
            if self.credentials {
                return Err(InvalidCors(
                    "`*` cannot go with credentials: browsers refuse it; list the origins".into(),
                ));
            }
            None
        } else {
            let mut list = Vec::new();
            for origin in &self.origins {
                list.push(origin_value(origin)?);
            }
            Some(list)
        };
        if self.methods.is_empty() {
            return Err(InvalidCors("name at least one method".into()));
        }
        let methods = join(self.methods.iter().map(Method::as_str), "methods")?;
        let headers = names(&self.headers, "allowed headers")?;
        let headers = join(headers.iter().map(HeaderName::as_str), "allowed headers")?;
        let expose = names(&self.expose, "exposed headers")?;
        let expose = if expose.is_empty() {
            None
        } else {
            Some(join(
                expose.iter().map(HeaderName::as_str),
                "exposed headers",
            )?)
        };
        let max_age = HeaderValue::from(self.max_age.as_secs());
        Ok(CorsLayer {
            policy: Arc::new(Policy {
                origins,
                credentials: self.credentials,
                methods,
                headers,
                expose,
                max_age,
            }),
        })
    }
}

/// `origin` checked to be a serialized origin (RFC 6454): `scheme://host[:port]`.
fn origin_value(origin: &str) -> Result<HeaderValue, InvalidCors> {
    let bad = |why: &str| InvalidCors(format!("`{origin}` is not an origin: {why}"));
    if origin == "null" {
        return Err(bad(
            "`null` is what sandboxed and local pages send; any of them could claim it",
        ));
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err(bad(
            "write it as scheme://host[:port], e.g. https://app.example",
        ));
    };
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return Err(bad("the scheme is not one"));
    }
    if rest.is_empty() {
        return Err(bad("there is no host"));
    }
    if rest.ends_with('/') {
        return Err(bad(
            "an origin has no path, not even `/`: drop the trailing slash",
        ));
    }
    if rest.contains(['/', '?', '#', '@', '*']) || rest.contains(char::is_whitespace) {
        return Err(bad(
            "an origin is a scheme, a host and a port only (no path, query, user or wildcard)",
        ));
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("browsers send origins in lower case"));
    }
    HeaderValue::from_str(origin).map_err(|_| bad("it holds characters a header cannot"))
}

fn names(names: &[String], what: &str) -> Result<Vec<HeaderName>, InvalidCors> {
    let mut out: Vec<HeaderName> = Vec::new();
    for name in names {
        let parsed = HeaderName::try_from(name.as_str())
            .map_err(|_| InvalidCors(format!("{what}: `{name}` is not a header name")))?;
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

fn join<'a>(items: impl Iterator<Item = &'a str>, what: &str) -> Result<HeaderValue, InvalidCors> {
    let joined = items.collect::<Vec<_>>().join(", ");
    HeaderValue::try_from(joined).map_err(|_| InvalidCors(format!("{what}: not a header value")))
}

/// Why a [`CorsBuilder`] makes no layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidCors(String);

impl fmt::Display for InvalidCors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidCors {}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cors {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`CorsLayer`] wraps around an inner service.
#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> Cors<S> {
    define_inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for Cors<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cors")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Whether `req` is a CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`. A plain `OPTIONS` is not one.
pub fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(ORIGIN)
        && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = CorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let policy = &self.policy;
        let origin = req.headers().get(ORIGIN).cloned();
        if is_preflight(&req) {
            let origin = origin.expect("a preflight has an Origin");
            let allowed = policy.allows(&origin);
            tracing::debug!(target: "tower_gateway_auth::cors", allowed, "CORS preflight answered");
            return CorsFuture::ready(policy.preflight(&origin));
        }
        let Some(origin) = origin else {
            let mut added = HeaderMap::new();
            policy.vary(&mut added, false);
            return CorsFuture::inner(self.inner.call(req), added);
        };
        let allowed = policy.allows(&origin);
        if !allowed && crate::socket::is_websocket_upgrade(&req) {
            tracing::info!(target: "tower_gateway_auth::cors", "WebSocket refused: its Origin is not allowed");
            let rejection = Rejection::new(
                RejectionKind::Forbidden,
                "WebSockets from this origin are not allowed.",
            );
            return CorsFuture::ready(rejection.to_response(req.headers()));
        }
        let mut added = HeaderMap::new();
        policy.vary(&mut added, false);
        if allowed {
            policy.allow(&origin, &mut added);
            if let Some(expose) = &policy.expose {
                added.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
            }
        }
        CorsFuture::inner(self.inner.call(req), added)
    }
}

pin_project! {
    /// The response future of [`Cors`].
    pub struct CorsFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner {
            #[pin]
            future: F,
            added: HeaderMap,
        },
        Ready {
            response: Option<Response<Bytes>>,
        },
    }
}

impl<F> CorsFuture<F> {
    fn inner(future: F, added: HeaderMap) -> Self {
        CorsFuture {
            kind: Kind::Inner { future, added },
        }
    }

    fn ready(response: Response<Bytes>) -> Self {
        CorsFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }
}

impl<F> fmt::Debug for CorsFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Inner { .. } => "CorsFuture::Inner",
            Kind::Ready { .. } => "CorsFuture::Ready",
        })
    }
}

impl<F, B, E> Future for CorsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future, added } => {
                let mut response = ready!(future.poll(cx))?;
                let headers = response.headers_mut();
                // What the route answered wins over nothing: the CORS headers are this
                // layer's, and a route's own copies would only disagree with them.
                for name in [
                    ACCESS_CONTROL_ALLOW_ORIGIN,
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    ACCESS_CONTROL_EXPOSE_HEADERS,
                ] {
                    headers.remove(name);
                }
                for (name, value) in std::mem::take(added) {
                    match name {
                        Some(name) if name == VARY => {
                            headers.append(name, value);
                        }
                        Some(name) => {
                            headers.insert(name, value);
                        }
                        None => {}
                    }
                }
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("CorsFuture polled after completion")
                .map(ResponseBody::full))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_be_origins() {
        let build = |origins: &[&str], credentials: bool| {
            CorsLayer::builder()
                .allow_origins(origins.iter().copied())
                .allow_credentials(credentials)
                .build()
                .map(|_| ())
        };
        assert_eq!(build(&["https://app.example"], true), Ok(()));
        assert_eq!(
            build(&["http://localhost:5173", "https://a.example"], false),
            Ok(())
        );
        assert_eq!(build(&["*"], false), Ok(()));
        for bad in [
            &["*"][..],
            &["*", "https://a.example"],
            &[],
            &["https://app.example/"],
            &["https://app.example/path"],
            &["app.example"],
            &["https://*.example"],
            &["null"],
            &["https://App.example"],
            &["https://user@app.example"],
        ] {
            let credentials = bad == ["*"];
            assert!(build(bad, credentials).is_err(), "{bad:?}");
        }
        let error = build(&["*"], true).unwrap_err().to_string();
        assert!(error.contains("credentials"), "{error}");
    }
}
