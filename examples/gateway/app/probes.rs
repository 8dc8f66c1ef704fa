//! The health probes, answered before anything else sees the request: no key is asked
//! for, and a probe never counts as a refusal, an upstream call or a routed request.
//!
//! - `GET /healthz`: 200 `{"status":"ok"}` while the process serves (liveness);
//! - `GET /readyz`: 200 `{"status":"ok"}` once the key store is loaded and, with Redis, the
//!   invalidation listener has subscribed; 503 `{"status":"not ready","reason":"…"}`
//!   before that and from the first shutdown signal on (readiness);
//! - any other method on those paths: 405 with `Allow: GET, HEAD`.
//!
//! Every answer has `Cache-Control: no-store`: a cached "ok" would hide an outage.
//!
//! Until the store is ready, other requests are refused 503 in the gateway's dialect: a
//! key revoked on another replica before the listener subscribed must not be served from
//! this one. Readiness does not go back to 503 when a subscribed listener loses Redis: it
//! reconnects and empties the cache by itself, and a shared Redis outage would otherwise
//! pull every replica out of the load balancer at once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use tower::Service;
use tower_gateway_auth::rejection::RejectionKind;
use tower_gateway_auth::{Rejection, RejectionLayer};

pub const HEALTHZ: &str = "/healthz";
pub const READYZ: &str = "/readyz";

/// What `/readyz` reports; shared by every connection, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<State>);

#[derive(Debug, Default)]
struct State {
    /// With Redis: turns `true` once the invalidation listener has subscribed.
    subscribed: Option<tokio::sync::watch::Receiver<bool>>,
    shutting_down: AtomicBool,
}

impl Readiness {
    /// Ready once `subscribed` is `true` (at once without it), until [`shutting_down`].
    ///
    /// [`shutting_down`]: Self::shutting_down
    pub fn new(subscribed: Option<tokio::sync::watch::Receiver<bool>>) -> Self {
        Readiness(Arc::new(State {
            subscribed,
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// From now on `/readyz` answers 503, so that load balancers stop sending new requests.
    pub fn shutting_down(&self) {
        self.0.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Whether requests may be routed: the store is ready.
    pub fn store_ready(&self) -> bool {
        self.0.subscribed.as_ref().is_none_or(|s| *s.borrow())
    }

    /// Why `/readyz` is not 200, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.0.shutting_down.load(Ordering::Relaxed) {
            Some("shutting down")
        } else if !self.store_ready() {
            Some("redis invalidation listener not subscribed")
        } else {
            None
        }
    }
}

/// The probes in front of the gateway's service `inner`.
#[derive(Clone)]
pub struct Probes<S> {
    pub inner: S,
    pub readiness: Readiness,
    /// The dialect of the 503 for requests that come before the store is ready.
    pub responder: RejectionLayer,
}

fn probe_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer to a probe of `path` with `method`.
fn probe(readiness: &Readiness, path: &str, method: &Method) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = probe_response(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"status":"method not allowed"}"#.to_owned(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let not_ready = (path == READYZ).then(|| readiness.not_ready()).flatten();
    match not_ready {
        None => probe_response(StatusCode::OK, r#"{"status":"ok"}"#.to_owned()),
        Some(reason) => probe_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reason": reason}).to_string(),
        ),
    }
}

impl<S> Service<Request<Body>> for Probes<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ProbesFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // `inner`'s readiness is this one's, so that `call` can call it in place (no clone,
        // no `Oneshot`); a probe answered here leaves it unused, which is allowed.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path();
        if path == HEALTHZ || path == READYZ {
            return ProbesFuture::Answered {
                response: Some(probe(&self.readiness, path, req.method())),
            };
        }
        if !self.readiness.store_ready() {
            tracing::info!("request refused: the key store is not ready yet");
            let rejection = Rejection::new(
                RejectionKind::StoreUnavailable,
                "The gateway is starting; try again shortly.",
            );
            let response = self
                .responder
                .render(&rejection, req.headers())
                .map(Body::from);
            return ProbesFuture::Answered {
                response: Some(response),
            };
        }
        ProbesFuture::Inner {
            future: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`Probes`].
    #[project = ProbesProj]
    pub enum ProbesFuture<S>
    where
        S: Service<Request<Body>>,
    {
        Inner { #[pin] future: S::Future },
        Answered { response: Option<Response<Body>> },
    }
}

impl<S> Future for ProbesFuture<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ProbesProj::Inner { future } => future.poll(cx),
            ProbesProj::Answered { response } => Poll::Ready(Ok(response
                .take()
                .expect("ProbesFuture polled after completion"))),
        }
    }
}
