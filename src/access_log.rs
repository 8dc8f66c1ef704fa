//! [`AccessLogLayer`]: one structured `tracing` event per request, at target
//! `gateway_auth::access`, level `INFO`, when its response body ends.
//!
//! # When a request is logged
//!
//! When the response body has been sent to its end, or is dropped before (the client went
//! away, the connection broke): a streamed answer is logged when it finishes, with the
//! bytes that actually went out, and `complete=false` if it did not reach its end. A
//! service that fails (`Err`) is logged at once. Bytes in are the request-body bytes the
//! stack read by then: an upstream that answers without reading the whole body shows fewer.
//!
//! # The fields
//!
//! | field | value |
//! |---|---|
//! | `request_id` | the response's request-id header (`x-request-id`, as [`RequestId`](crate::inject::RequestId) with `echo` sets it), else the request's, else `-` |
//! | `route` | the name given to [`AccessLogLayer::route`] (`-` when none) |
//! | `key_id` | the id of the key the request presented, when it matched a record (accepted or not): [`KeyId`](crate::keys::KeyId)'s display form, else `-` |
//! | `method`, `path` | the request's method and path as this layer saw them; never the query, which may carry a key |
//! | `outcome` | `allowed`, [`RejectionKind::outcome`](crate::rejection::RejectionKind::outcome) of the refusal, or `error` |
//! | `reason` | the refusal's [`code`](crate::Rejection::code) (`invalid_api_key` …), else `-` |
//! | `status` | the status sent to the client (absent when the service failed and none was) |
//! | `upstream_status` | what the upstream answered ([`UpstreamOutcome`]): its status, `error` when it was unreachable or timed out, `-` when the request never reached it |
//! | `duration_ms` | from the request reaching this layer to the end of its response body |
//! | `bytes_in`, `bytes_out` | request and response body bytes, counted as they stream |
//! | `complete` | whether the response body reached its end |
//!
//! No field ever holds a key, a digest or a credential: the key is named by its id only,
//! and the query string is left out.
//!
//! With the event's target disabled (`gateway_auth::access` filtered out), the layer
//! measures and allocates nothing; it still wraps both bodies, as their types say.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::inbound::KeyIdSlot;
use crate::rejection::Rejection;
use crate::response::UpstreamOutcome;

/// The `tracing` target of the access log.
pub const TARGET: &str = "gateway_auth::access";

/// Logs every request that goes through the stack inside it; see the [module docs](self)
/// for when and with which fields.
///
/// Put it outermost of a route's stack (outside the
/// [`RejectionLayer`](crate::RejectionLayer)), so that it sees every refusal and the final
/// status. The inner service gets the request with its body wrapped in a [`CountingBody`]
/// (an axum `Router` inside wants `.map_request(|r| r.map(axum::body::Body::new))`).
///
/// ```
/// use std::convert::Infallible;
/// use http_body_util::{BodyExt, Full};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::InboundApiKeyLayer;
/// use tower_gateway_auth::access_log::AccessLogLayer;
/// use tower_gateway_auth::store::MemoryStore;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(AccessLogLayer::new().route("chat"))
///     .layer(InboundApiKeyLayer::new(MemoryStore::new()))
///     .service_fn(|_req| async {
///         Ok::<_, Infallible>(http::Response::new(Full::new(bytes::Bytes::from("hi"))))
///     });
/// let response = service.oneshot(http::Request::new(Full::new(bytes::Bytes::new()))).await.unwrap();
/// // Logged here, as the body ends: route=chat key_id=- outcome=missing status=401 …
/// response.into_body().collect().await.unwrap();
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    route: Arc<str>,
    request_id_header: HeaderName,
}

impl Default for AccessLogLayer {
    fn default() -> Self {
        AccessLogLayer {
            config: Arc::new(Config {
                route: Arc::from("-"),
                request_id_header: crate::inject::X_REQUEST_ID,
            }),
        }
    }
}

impl AccessLogLayer {
    /// A layer with no route name, reading request ids from `x-request-id`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `route` field of this stack's lines (default: `-`).
    pub fn route(mut self, name: &str) -> Self {
        Arc::make_mut(&mut self.config).route = Arc::from(name);
        self
    }

    /// The header the request id is read from, on the response first, then on the request
    /// (default: `x-request-id`).
    pub fn request_id_header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).request_id_header = name;
        self
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`AccessLogLayer`] wraps around the stack.
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> AccessLog<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AccessLog<S>
where
    S: Service<Request<CountingBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            let future = self
                .inner
                .call(req.map(|body| CountingBody { body, read: None }));
            return AccessLogFuture {
                future,
                started: None,
            };
        }
        let (mut parts, body) = req.into_parts();
        let read = Arc::new(AtomicU64::new(0));
        let started = Started {
            at: Instant::now(),
            config: self.config.clone(),
            method: parts.method.clone(),
            path: parts.uri.path().into(),
            request_id: parts.headers.get(&self.config.request_id_header).cloned(),
            slot: KeyIdSlot::attach(&mut parts.extensions),
            read: read.clone(),
        };
        let body = CountingBody {
            body,
            read: Some(read),
        };
        AccessLogFuture {
            future: self.inner.call(Request::from_parts(parts, body)),
            started: Some(started),
        }
    }
}

/// What is known of a request when it arrives.
struct Started {
    at: Instant,
    config: Arc<Config>,
    method: Method,
    path: Box<str>,
    request_id: Option<HeaderValue>,
    slot: KeyIdSlot,
    read: Arc<AtomicU64>,
}

pin_project! {
    /// The response future of [`AccessLog`].
    pub struct AccessLogFuture<F> {
        #[pin]
        future: F,
        started: Option<Started>,
    }
}

impl<F> fmt::Debug for AccessLogFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx));
        let Some(started) = this.started.take() else {
            return Poll::Ready(result.map(|r| r.map(LoggedBody::unlogged)));
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                drop(Entry {
                    started,
                    status: None,
                    outcome: "error",
                    reason: "-",
                    upstream: None,
                    request_id: None,
                    written: 0,
                    complete: false,
                });
                return Poll::Ready(Err(error));
            }
        };
        let rejection = response.extensions().get::<Rejection>();
        let entry = Entry {
            status: Some(response.status()),
            outcome: rejection.map_or("allowed", |r| r.kind().outcome()),
            reason: rejection.map_or("-", Rejection::code),
            upstream: response.extensions().get::<UpstreamOutcome>().copied(),
            request_id: response
                .headers()
                .get(&started.config.request_id_header)
                .cloned(),
            started,
            written: 0,
            // An empty body may never be polled: it ended before it began.
            complete: response.body().is_end_stream(),
        };
        Poll::Ready(Ok(response.map(|body| LoggedBody {
            body,
            entry: Some(entry),
        })))
    }
}

/// One line of the access log, written when it is dropped: at the end of the response
/// body, or when the body is dropped before.
struct Entry {
    started: Started,
    status: Option<StatusCode>,
    outcome: &'static str,
    reason: &'static str,
    upstream: Option<UpstreamOutcome>,
    /// The response's request id, which wins over the request's.
    request_id: Option<HeaderValue>,
    written: u64,
    complete: bool,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let started = &self.started;
        let request_id = self
            .request_id
            .as_ref()
            .or(started.request_id.as_ref())
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-");
        let key_id = started.slot.get();
        tracing::info!(
            target: TARGET,
            request_id,
            route = &*started.config.route,
            key_id = %Dash(key_id),
            method = %started.method,
            path = &*started.path,
            outcome = self.outcome,
            reason = self.reason,
            status = self.status.map(|s| s.as_u16()),
            upstream_status = %Upstream(self.upstream),
            duration_ms = started.at.elapsed().as_secs_f64() * 1000.0,
            bytes_in = started.read.load(Ordering::Relaxed),
            bytes_out = self.written,
            complete = self.complete,
            "request"
        );
    }
}

/// A value, or `-`.
struct Dash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The upstream's status, `error`, or `-`.
struct Upstream(Option<UpstreamOutcome>);

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("-"),
            Some(outcome) => match outcome.status() {
                Some(status) => write!(f, "{}", status.as_u16()),
                None => f.write_str("error"),
            },
        }
    }
}

pin_project! {
    /// The request body as the stack inside an [`AccessLogLayer`] gets it: the client's,
    /// with its bytes counted as they are read.
    pub struct CountingBody<B> {
        #[pin]
        body: B,
        read: Option<Arc<AtomicU64>>,
    }
}

impl<B> CountingBody<B> {
    /// The body, uncounted.
    pub fn into_inner(self) -> B {
        self.body
    }
}

impl<B: Body<Data = Bytes>> Body for CountingBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if let (Some(read), Some(Ok(frame))) = (this.read.as_ref(), &frame)
            && let Some(data) = frame.data_ref()
        {
            read.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    delegate_body_hints!();
}

impl<B> fmt::Debug for CountingBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingBody").finish_non_exhaustive()
    }
}

pin_project! {
    /// The response body out of an [`AccessLogLayer`]: the stack's, counted, logging the
    /// request when it ends or is dropped.
    pub struct LoggedBody<B> {
        #[pin]
        body: B,
        entry: Option<Entry>,
    }
}

impl<B> LoggedBody<B> {
    fn unlogged(body: B) -> Self {
        LoggedBody { body, entry: None }
    }
}

impl<B: Body<Data = Bytes>> Body for LoggedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.body.as_mut().poll_frame(cx));
        if let Some(entry) = this.entry {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        entry.written += data.len() as u64;
                    }
                    // hyper stops at `is_end_stream` and drops the body unpolled.
                    if this.body.is_end_stream() {
                        entry.complete = true;
                        *this.entry = None;
                    }
                }
                None => {
                    entry.complete = true;
                    // Logged now, not when the server gets round to dropping the body.
                    *this.entry = None;
                }
                // A broken stream: logged as incomplete.
                Some(Err(_)) => *this.entry = None,
            }
        }
        Poll::Ready(frame)
    }

    delegate_body_hints!();
}

impl<B> fmt::Debug for LoggedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoggedBody").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full};
    use tower::{ServiceBuilder, ServiceExt};

    use crate::InboundApiKeyLayer;
    use crate::keys::{KeyId, KeyRecord};
    use crate::store::{KeyStore, MemoryStore};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every event of this thread as JSON lines, while the guard lives.
    fn json_lines() -> (Lines, tracing::subscriber::DefaultGuard) {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        (lines, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn one_line_at_body_end_with_key_id_outcome_upstream_and_bytes() {
        let (lines, _guard) = json_lines();

        let store = MemoryStore::new();
        let id = KeyId::random();
        store.insert(KeyRecord::new(id, store.hasher().digest(b"gw_log-key")));
        let service = ServiceBuilder::new()
            .layer(AccessLogLayer::new().route("chat"))
            .layer(InboundApiKeyLayer::new(store))
            .service_fn(|req: Request<CountingBody<Full<Bytes>>>| async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let answer = format!("answer: {}", String::from_utf8_lossy(&body));
                let mut response = Response::new(Full::new(Bytes::from(answer)));
                response
                    .extensions_mut()
                    .insert(UpstreamOutcome::answered(StatusCode::CREATED, None));
                response
                    .headers_mut()
                    .insert("x-request-id", HeaderValue::from_static("rid-1"));
                Ok::<_, Infallible>(response)
            });
        let req = Request::builder()
            .method("POST")
            .uri("/v1/chat?key=gw_log-key")
            .header("x-api-key", "gw_log-key")
            .body(Full::new(Bytes::from("12345")))
            .unwrap();
        let response = service.clone().oneshot(req).await.unwrap();
        assert!(
            lines.0.lock().unwrap().is_empty(),
            "logged before the body ended"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "answer: 12345");
        let refused = service
            .oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        drop(refused);

        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["target"] == TARGET)
            .map(|e| e["fields"].clone())
            .collect();
        assert_eq!(events.len(), 2, "{text}");
        let ok = &events[0];
        assert_eq!(ok["request_id"], "rid-1");
        assert_eq!(ok["route"], "chat");
        assert_eq!(ok["key_id"], id.to_string());
        assert_eq!(ok["method"], "POST");
        assert_eq!(ok["path"], "/v1/chat");
        assert_eq!(ok["outcome"], "allowed");
        assert_eq!(ok["status"], 200);
        assert_eq!(ok["upstream_status"], "201");
        assert_eq!(ok["bytes_in"], 5);
        assert_eq!(ok["bytes_out"], 13);
        assert_eq!(ok["complete"], true);
        let refused = &events[1];
        assert_eq!(
            (&refused["key_id"], &refused["outcome"], &refused["reason"]),
            (&"-".into(), &"missing".into(), &"missing_api_key".into())
        );
        assert_eq!(refused["status"], 401);
        assert_eq!(refused["upstream_status"], "-");
        assert_eq!(refused["request_id"], "-");
        assert_eq!(refused["complete"], false, "dropped unread");
        assert!(!text.contains("gw_log-key"), "{text}");
    }

    #[tokio::test]
    async fn a_stream_is_logged_when_it_ends_with_every_byte_that_went_out() {
        use http_body_util::channel::Channel;

        let (lines, _guard) = json_lines();
        let logged = || {
            String::from_utf8(lines.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .filter(|l| l.contains(TARGET))
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
                .collect::<Vec<_>>()
        };

        let (mut sender, body) = Channel::<Bytes, Infallible>::new(4);
        let body = Mutex::new(Some(body));
        let service = AccessLogLayer::new().route("sse").layer(tower::service_fn(
            move |_req: Request<CountingBody<Full<Bytes>>>| {
                let body = body.lock().unwrap().take().unwrap();
                async move { Ok::<_, Infallible>(Response::new(body)) }
            },
        ));
        let response = service
            .oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        let mut body = response.into_body();
        sender.send_data(Bytes::from("data: 1\n\n")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "data: 1\n\n");
        assert!(logged().is_empty(), "logged while the stream runs");
        sender.send_data(Bytes::from("data: 22\n\n")).await.unwrap();
        drop(sender);
        while body.frame().await.is_some() {}
        let events = logged();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["route"], "sse");
        assert_eq!(events[0]["bytes_out"], 19);
        assert_eq!(events[0]["complete"], true);
        drop(body);
        assert_eq!(logged().len(), 1, "logged once");
    }
}
