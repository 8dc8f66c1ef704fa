//! [`RateLimitLayer`]: request rate and requests in flight, per key.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body::LimitBody;
use super::{Admission, Limiter, LimiterError, Limits, Quota};
use crate::identity::Identity;
use crate::keys::KeyId;
use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;

/// Limits each key's request rate and requests in flight, by the [`Limits`] on its record
/// or the layer's defaults, deciding with a [`Limiter`].
///
/// Place it inside [`InboundApiKeyLayer`](crate::InboundApiKeyLayer): it reads the
/// [`Identity`] from the request extensions. A request with none (anonymous pass-through)
/// is not limited here. A refusal is 429 (`rate_limit_exceeded` with `Retry-After`, or
/// `concurrency_limit_exceeded`), rendered in the route's dialect by a
/// [`RejectionLayer`](crate::RejectionLayer); a limiter fault is 503 and the inner service
/// is not called. Every answer to a key with a rate carries the rate-limit headers of
/// OpenAI and Anthropic ([module docs](crate::limit#headers)).
///
/// ```
/// use std::convert::Infallible;
/// use std::sync::Arc;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::{Identity, RateLimitLayer};
/// use tower_gateway_auth::keys::{KeyHasher, KeyId, KeyRecord};
/// use tower_gateway_auth::limit::{Limits, MemoryLimiter, Rate};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let mut service = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(MemoryLimiter::new()))
///     .service_fn(|_req: http::Request<()>| async {
///         Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
///     });
/// let record = KeyRecord::new(KeyId::random(), KeyHasher::sha256().digest(b"k"))
///     .with_limits(Limits::new().with_rate(Rate::per_minute(1)));
/// let who = Identity::new(Arc::new(record));
/// let request = || {
///     let mut req = http::Request::new(());
///     req.extensions_mut().insert(who.clone());
///     req
/// };
/// let first = service.ready().await.unwrap().call(request()).await.unwrap();
/// assert_eq!(first.status(), 200);
/// assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "0");
/// let second = service.ready().await.unwrap().call(request()).await.unwrap();
/// assert_eq!(second.status(), 429);
/// assert_eq!(second.headers()["retry-after"], "60");
/// # });
/// ```
pub struct RateLimitLayer<L> {
    limiter: Arc<L>,
    defaults: Limits,
}

impl<L: Limiter> RateLimitLayer<L> {
    /// Limits keys with `limiter`; keys without limits of their own are not limited until
    /// [`default_limits`](Self::default_limits) says otherwise.
    pub fn new(limiter: L) -> Self {
        Self::shared(Arc::new(limiter))
    }

    /// Like [`new`](Self::new), sharing a limiter with other layers (routes that share one
    /// allowance).
    pub fn shared(limiter: Arc<L>) -> Self {
        RateLimitLayer {
            limiter,
            defaults: Limits::new(),
        }
    }

    /// The limits of keys whose record sets none, field by field: a key with only a rate
    /// of its own gets the default concurrency limit.
    pub fn default_limits(mut self, defaults: Limits) -> Self {
        self.defaults = defaults;
        self
    }

    /// The limiter.
    pub fn limiter(&self) -> &Arc<L> {
        &self.limiter
    }
}

impl<L> Clone for RateLimitLayer<L> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiter: self.limiter.clone(),
            defaults: self.defaults,
        }
    }
}

impl<L> fmt::Debug for RateLimitLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl<S, L> Layer<S> for RateLimitLayer<L> {
    type Service = RateLimit<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] wraps around an inner service.
pub struct RateLimit<S, L> {
    inner: S,
    layer: RateLimitLayer<L>,
}

impl<S, L> RateLimit<S, L> {
    define_inner_service_accessors!();
}

impl<S: Clone, L> Clone for RateLimit<S, L> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, L> fmt::Debug for RateLimit<S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, L, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    L: Limiter,
{
    type Response = Response<ResponseBody<LimitBody<ResBody, L::Permit>>>;
    type Error = S::Error;
    type Future = RateLimitFuture<S, L, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(who) = req.extensions().get::<Identity>() else {
            return RateLimitFuture::called(self.inner.call(req), None, None);
        };
        let limits = who
            .limits()
            .copied()
            .unwrap_or_default()
            .or(&self.layer.defaults);
        if limits.is_empty() {
            return RateLimitFuture::called(self.inner.call(req), None, None);
        }
        // Ephemeral keys and rotated successors spend their line's one allowance.
        let key = who.origin();
        let mut admit = self.layer.limiter.admit(key, &limits);
        match Pin::new(&mut admit).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => RateLimitFuture::decide(result, key, &mut self.inner, req),
            Poll::Pending => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                RateLimitFuture {
                    state: State::Waiting {
                        admit,
                        key,
                        parked: Some(Box::new((inner, req))),
                    },
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`RateLimit`].
    pub struct RateLimitFuture<S, L, B>
    where
        S: Service<Request<B>>,
        L: Limiter,
    {
        #[pin]
        state: State<S, L, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, L, B>
    where
        S: Service<Request<B>>,
        L: Limiter,
    {
        Waiting {
            admit: L::Future,
            key: KeyId,
            parked: Option<Box<(S, Request<B>)>>,
        },
        Called {
            #[pin]
            future: S::Future,
            permit: Option<L::Permit>,
            quota: Option<Quota>,
        },
        Rejected {
            response: Option<Response<Bytes>>,
        },
    }
}

impl<S, L, B> RateLimitFuture<S, L, B>
where
    S: Service<Request<B>>,
    L: Limiter,
{
    fn called(future: S::Future, permit: Option<L::Permit>, quota: Option<Quota>) -> Self {
        RateLimitFuture {
            state: State::Called {
                future,
                permit,
                quota,
            },
        }
    }

    fn decide(
        result: Result<Admission<L::Permit>, LimiterError>,
        key: KeyId,
        inner: &mut S,
        req: Request<B>,
    ) -> Self {
        match admitted(result, key, req.headers()) {
            Verdict::Go(permit, quota) => Self::called(inner.call(req), permit, quota),
            Verdict::Refuse(response) => RateLimitFuture {
                state: State::Rejected {
                    response: Some(response),
                },
            },
        }
    }
}

/// What a decision means for the request.
enum Verdict<P> {
    /// Go on, holding this permit, telling this quota.
    Go(Option<P>, Option<Quota>),
    /// Answer with this.
    Refuse(Response<Bytes>),
}

fn admitted<P>(
    result: Result<Admission<P>, LimiterError>,
    key: KeyId,
    headers: &HeaderMap,
) -> Verdict<P> {
    let (rejection, quota) = match result {
        Ok(Admission::Allowed { permit, quota }) => return Verdict::Go(permit, quota),
        Ok(Admission::RateLimited { quota, retry_after }) => {
            tracing::info!(target: "tower_gateway_auth::limit", key_id = %key, reason = "rate_limited", "request refused");
            let secs = retry_after.as_nanos().div_ceil(1_000_000_000);
            let rejection = Rejection::new(
                RejectionKind::RateLimited,
                format!(
                    "Rate limit reached for requests: limit {}, remaining 0. Please try again in {}.",
                    quota.limit,
                    go_duration(retry_after)
                ),
            )
            .with_retry_after(Duration::from_secs(u64::try_from(secs).unwrap_or(u64::MAX)));
            (rejection, Some(quota))
        }
        Ok(Admission::ConcurrencyLimited { max }) => {
            tracing::info!(target: "tower_gateway_auth::limit", key_id = %key, reason = "concurrency_limited", "request refused");
            let rejection = Rejection::new(
                RejectionKind::ConcurrencyLimited,
                format!(
                    "Concurrency limit reached: at most {max} requests in flight for this API key. Please try again when one has finished."
                ),
            )
            .with_retry_after(Duration::from_secs(1));
            (rejection, None)
        }
        Err(error) => {
            tracing::warn!(target: "tower_gateway_auth::limit", key_id = %key, %error, "rate limiter failed; request refused");
            let rejection = Rejection::new(
                RejectionKind::LimiterUnavailable,
                "The rate limiter is unavailable. Please try again later.",
            );
            (rejection, None)
        }
    };
    let mut response = rejection.to_response(headers);
    if let Some(quota) = quota {
        quota_headers(response.headers_mut(), &quota);
    }
    Verdict::Refuse(response)
}

impl<S, L, B, ResBody> Future for RateLimitFuture<S, L, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    L: Limiter,
{
    type Output = Result<Response<ResponseBody<LimitBody<ResBody, L::Permit>>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Called {
                    future,
                    permit,
                    quota,
                } => {
                    let response = ready!(future.poll(cx))?;
                    let (mut parts, body) = response.into_parts();
                    if let Some(quota) = quota {
                        quota_headers(&mut parts.headers, quota);
                    }
                    let body = LimitBody::new(body, permit.take());
                    return Poll::Ready(Ok(Response::from_parts(parts, ResponseBody::inner(body))));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::full)));
                }
                StateProj::Waiting { admit, key, parked } => {
                    let result = ready!(Pin::new(admit).poll(cx));
                    let (mut inner, req) = *parked.take().expect("polled after completion");
                    match admitted(result, *key, req.headers()) {
                        Verdict::Go(permit, quota) => State::Called {
                            future: inner.call(req),
                            permit,
                            quota,
                        },
                        Verdict::Refuse(response) => State::Rejected {
                            response: Some(response),
                        },
                    }
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S, L, B> fmt::Debug for RateLimitFuture<S, L, B>
where
    S: Service<Request<B>>,
    L: Limiter,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.state {
            State::Waiting { .. } => "RateLimitFuture::Waiting",
            State::Called { .. } => "RateLimitFuture::Called",
            State::Rejected { .. } => "RateLimitFuture::Rejected",
        })
    }
}

static OPENAI_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static OPENAI_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static OPENAI_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static ANTHROPIC_LIMIT: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-limit");
static ANTHROPIC_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-remaining");
static ANTHROPIC_RESET: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-reset");

/// Both providers' request-quota headers.
fn quota_headers(headers: &mut HeaderMap, quota: &Quota) {
    let limit = HeaderValue::from(quota.limit);
    let remaining = HeaderValue::from(quota.remaining);
    headers.insert(OPENAI_LIMIT.clone(), limit.clone());
    headers.insert(OPENAI_REMAINING.clone(), remaining.clone());
    if let Ok(reset) = HeaderValue::try_from(go_duration(quota.reset)) {
        headers.insert(OPENAI_RESET.clone(), reset);
    }
    headers.insert(ANTHROPIC_LIMIT.clone(), limit);
    headers.insert(ANTHROPIC_REMAINING.clone(), remaining);
    if let Ok(reset) = HeaderValue::try_from(quota.reset_at.to_string()) {
        headers.insert(ANTHROPIC_RESET.clone(), reset);
    }
}

/// A duration as Go prints it, the way OpenAI's reset headers are written (`1s`, `6m0s`,
/// `1h2m3s`, `250ms`, `1.5s`), rounded up to the millisecond so it never promises too early.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (secs, frac) = (ms / 1000, ms % 1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut s = if frac == 0 {
        s.to_string()
    } else {
        format!("{s}.{frac:03}").trim_end_matches('0').to_owned()
    };
    s.push('s');
    match (h, m) {
        (0, 0) => s,
        (0, m) => format!("{m}m{s}"),
        (h, m) => format!("{h}h{m}m{s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_writes_them() {
        let ms = Duration::from_millis;
        for (d, text) in [
            (ms(0), "0ms"),
            (Duration::from_nanos(1), "1ms"),
            (ms(250), "250ms"),
            (ms(1000), "1s"),
            (ms(1500), "1.5s"),
            (ms(12_345), "12.345s"),
            (ms(360_000), "6m0s"),
            (ms(3_723_000), "1h2m3s"),
        ] {
            assert_eq!(go_duration(d), text, "{d:?}");
        }
    }
}
