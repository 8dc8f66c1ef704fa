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

use super::body::{LimitBody, Metered};
use super::{Admission, Limiter, LimiterError, Limits, Quota, TokenQuota};
use crate::identity::Identity;
use crate::keys::KeyId;
use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;
use crate::tokens::{CountsTokens, Framing, TokenUsage, UsageBody, UsageSink};

/// Limits each key's request rate, requests in flight and tokens, by the [`Limits`] on its
/// record or the layer's defaults, deciding with a [`Limiter`].
///
/// Place it inside [`InboundApiKeyLayer`](crate::InboundApiKeyLayer): it reads the
/// [`Identity`] from the request extensions. A request with none (anonymous pass-through)
/// is not limited here. A refusal is 429 (`rate_limit_exceeded` with `Retry-After`, or
/// `concurrency_limit_exceeded`), rendered in the route's dialect by a
/// [`RejectionLayer`](crate::RejectionLayer); a limiter fault is 503 and the inner service
/// is not called. A WebSocket upgrade's permit is held by its
/// [`SocketLease`](crate::socket::SocketLease) instead of its response body: an open socket
/// counts as one request in flight until it is closed. Every answer to a key with a rate carries the rate-limit headers of
/// OpenAI and Anthropic ([module docs](crate::limit#headers)). For a key with token limits
/// the response body is read for its usage as it streams ([`UsageBody`]) and charged when
/// it ends ([`Limiter::charge`]); see [the module docs](crate::limit#tokens).
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

/// The response body of [`RateLimit`]: the inner service's, holding the request's
/// concurrency permit until it ends and, when the key's tokens count, read for its usage.
pub type RateLimitBody<B, L> =
    ResponseBody<LimitBody<Metered<B, Charge<L>>, <L as Limiter>::Permit>>;

/// Where a response's token usage goes when its body ends: the key's token rate and budget
/// ([`Limiter::charge`]) and, under a [`MetricsLayer`](crate::metrics::MetricsLayer), the
/// route's token counters.
pub struct Charge<L> {
    limiter: Arc<L>,
    key: KeyId,
    limits: Limits,
    #[cfg(feature = "metrics")]
    tally: crate::metrics::TokenTally,
}

impl<L: Limiter> UsageSink for Charge<L> {
    fn report(self, usage: Option<TokenUsage>) {
        let Some(usage) = usage else {
            tracing::debug!(target: "tower_gateway_auth::limit", key_id = %self.key, "the response reported no token usage; nothing charged");
            return;
        };
        self.limiter.charge(self.key, &self.limits, usage.total());
        #[cfg(feature = "metrics")]
        self.tally.count(&usage);
    }
}

impl<L> fmt::Debug for Charge<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// What the response of an admitted request needs: its permit, the quotas to tell, and
/// where its token usage goes.
struct Admitted<L: Limiter> {
    permit: Option<L::Permit>,
    quota: Option<Quota>,
    tokens: Option<TokenQuota>,
    charge: Option<(Charge<L>, CountsTokens)>,
}

impl<S, L, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    L: Limiter,
    ResBody: http_body::Body,
{
    type Response = Response<RateLimitBody<ResBody, L>>;
    type Error = S::Error;
    type Future = RateLimitFuture<S, L, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(who) = req.extensions().get::<Identity>() else {
            return RateLimitFuture::called(self.inner.call(req), Admitted::none());
        };
        let limits = who
            .limits()
            .copied()
            .unwrap_or_default()
            .or(&self.layer.defaults);
        if limits.is_empty() {
            return RateLimitFuture::called(self.inner.call(req), Admitted::none());
        }
        // Ephemeral keys and rotated successors spend their line's one allowance.
        let key = who.origin();
        let mut admit = self.layer.limiter.admit(key, &limits);
        let charge = limits.counts_tokens().then(|| {
            let charge = Charge {
                limiter: self.layer.limiter.clone(),
                key,
                limits,
                #[cfg(feature = "metrics")]
                tally: Default::default(),
            };
            (charge, CountsTokens::default())
        });
        match Pin::new(&mut admit).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => {
                RateLimitFuture::decide(result, key, charge, &mut self.inner, req)
            }
            Poll::Pending => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                RateLimitFuture {
                    state: State::Waiting {
                        admit,
                        key,
                        parked: Some(Box::new((inner, req, charge))),
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
            parked: Option<Box<(S, Request<B>, Option<(Charge<L>, CountsTokens)>)>>,
        },
        Called {
            #[pin]
            future: S::Future,
            admitted: Admitted<L>,
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
    fn called(future: S::Future, admitted: Admitted<L>) -> Self {
        RateLimitFuture {
            state: State::Called { future, admitted },
        }
    }

    fn decide(
        result: Result<Admission<L::Permit>, LimiterError>,
        key: KeyId,
        charge: Option<(Charge<L>, CountsTokens)>,
        inner: &mut S,
        req: Request<B>,
    ) -> Self {
        match admitted(result, key, req.headers()) {
            Verdict::Go(permit, quota, tokens) => {
                let (req, admitted) = Admitted::go(req, permit, quota, tokens, charge);
                Self::called(inner.call(req), admitted)
            }
            Verdict::Refuse(response) => RateLimitFuture {
                state: State::Rejected {
                    response: Some(response),
                },
            },
        }
    }
}

impl<L: Limiter> Admitted<L> {
    fn none() -> Self {
        Admitted {
            permit: None,
            quota: None,
            tokens: None,
            charge: None,
        }
    }

    /// The request as it goes on (told, when its tokens count, so that a layer inside may
    /// ask the upstream for a stream's usage), and what its response needs.
    fn go<B>(
        mut req: Request<B>,
        permit: Option<L::Permit>,
        quota: Option<Quota>,
        tokens: Option<TokenQuota>,
        charge: Option<(Charge<L>, CountsTokens)>,
    ) -> (Request<B>, Self) {
        if let Some((_, counts)) = &charge {
            req.extensions_mut().insert(counts.clone());
            // Usage is read from the response's bytes: a compressed answer would hide it,
            // and a client must not be able to dodge its token limits by asking for one.
            req.headers_mut().insert(
                http::header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        // An open socket is one request in flight for as long as it is open: its permit goes
        // to the socket's lease, which whoever serves the socket holds until it closes.
        let permit = match permit {
            Some(permit) if crate::socket::is_websocket_upgrade(&req) => {
                crate::socket::SocketLease::of(&mut req).hold(permit);
                None
            }
            permit => permit,
        };
        let admitted = Admitted {
            permit,
            quota,
            tokens,
            charge,
        };
        (req, admitted)
    }

    /// The response, with its quota headers, its body holding the permit and, when tokens
    /// count, read for its usage.
    fn respond<ResBody: http_body::Body>(
        &mut self,
        response: Response<ResBody>,
    ) -> Response<RateLimitBody<ResBody, L>> {
        let (mut parts, body) = response.into_parts();
        if let Some(quota) = &self.quota {
            quota_headers(&mut parts.headers, quota);
        }
        if let Some(tokens) = &self.tokens {
            token_headers(&mut parts.headers, tokens);
        }
        let body = match self.charge.take() {
            None => Metered::plain(body),
            Some((charge, counts)) => {
                #[cfg(feature = "metrics")]
                parts.extensions.insert(charge.tally.clone());
                // The client did not ask for the usage-only chunk the upstream was asked
                // for: it is counted, and kept from the client.
                let hide = counts.usage_added();
                if hide {
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                }
                let framing = Framing::from_headers(&parts.headers);
                Metered::read(UsageBody::new(body, framing, charge).hide_usage_chunk(hide))
            }
        };
        let body = LimitBody::new(body, self.permit.take());
        Response::from_parts(parts, ResponseBody::inner(body))
    }
}

/// What a decision means for the request.
enum Verdict<P> {
    /// Go on, holding this permit, telling these quotas.
    Go(Option<P>, Option<Quota>, Option<TokenQuota>),
    /// Answer with this.
    Refuse(Response<Bytes>),
}

fn admitted<P>(
    result: Result<Admission<P>, LimiterError>,
    key: KeyId,
    headers: &HeaderMap,
) -> Verdict<P> {
    let mut tokens = None;
    let (rejection, quota) = match result {
        Ok(Admission::Allowed {
            permit,
            quota,
            tokens,
        }) => return Verdict::Go(permit, quota, tokens),
        Ok(Admission::TokensLimited {
            tokens: quota,
            retry_after,
        }) => {
            tracing::info!(target: "tower_gateway_auth::limit", key_id = %key, reason = "tokens_limited", "request refused");
            let rejection = Rejection::new(
                RejectionKind::TokensLimited,
                format!(
                    "Rate limit reached for tokens: limit {}, remaining 0. Please try again in {}.",
                    quota.limit,
                    go_duration(retry_after)
                ),
            )
            .with_retry_after(whole_seconds(retry_after));
            tokens = Some(quota);
            (rejection, None)
        }
        Ok(Admission::BudgetExhausted {
            tokens: quota,
            retry_after,
        }) => {
            tracing::info!(target: "tower_gateway_auth::limit", key_id = %key, reason = "budget_exhausted", "request refused");
            let when = match quota.reset_at {
                Some(at) => format!("It starts again at {at}."),
                None => "It does not start again.".to_owned(),
            };
            let mut rejection = Rejection::new(
                RejectionKind::BudgetExhausted,
                format!(
                    "You exceeded your current quota: this API key's budget of {} tokens is spent. {when}",
                    quota.limit
                ),
            );
            if let Some(retry_after) = retry_after {
                rejection = rejection.with_retry_after(whole_seconds(retry_after));
            }
            tokens = Some(quota);
            (rejection, None)
        }
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
    if let Some(tokens) = tokens {
        token_headers(response.headers_mut(), &tokens);
    }
    Verdict::Refuse(response)
}

/// Whole seconds, rounded up, for `Retry-After`.
fn whole_seconds(d: Duration) -> Duration {
    let secs = d.as_nanos().div_ceil(1_000_000_000);
    Duration::from_secs(u64::try_from(secs).unwrap_or(u64::MAX))
}

impl<S, L, B, ResBody> Future for RateLimitFuture<S, L, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    L: Limiter,
    ResBody: http_body::Body,
{
    type Output = Result<Response<RateLimitBody<ResBody, L>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Called { future, admitted } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(admitted.respond(response)));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::full)));
                }
                StateProj::Waiting { admit, key, parked } => {
                    let result = ready!(Pin::new(admit).poll(cx));
                    let (mut inner, req, charge) = *parked.take().expect("polled after completion");
                    match admitted(result, *key, req.headers()) {
                        Verdict::Go(permit, quota, tokens) => {
                            let (req, admitted) = Admitted::go(req, permit, quota, tokens, charge);
                            State::Called {
                                future: inner.call(req),
                                admitted,
                            }
                        }
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

static OPENAI_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static OPENAI_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
static OPENAI_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
static ANTHROPIC_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-limit");
static ANTHROPIC_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
static ANTHROPIC_RESET_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-reset");

/// Both providers' token-quota headers.
fn token_headers(headers: &mut HeaderMap, quota: &TokenQuota) {
    let limit = HeaderValue::from(quota.limit);
    let remaining = HeaderValue::from(quota.remaining);
    headers.insert(OPENAI_LIMIT_TOKENS.clone(), limit.clone());
    headers.insert(OPENAI_REMAINING_TOKENS.clone(), remaining.clone());
    headers.insert(ANTHROPIC_LIMIT_TOKENS.clone(), limit);
    headers.insert(ANTHROPIC_REMAINING_TOKENS.clone(), remaining);
    if let Some(reset) = quota.reset
        && let Ok(reset) = HeaderValue::try_from(go_duration(reset))
    {
        headers.insert(OPENAI_RESET_TOKENS.clone(), reset);
    }
    if let Some(at) = quota.reset_at
        && let Ok(at) = HeaderValue::try_from(at.to_string())
    {
        headers.insert(ANTHROPIC_RESET_TOKENS.clone(), at);
    }
}

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
