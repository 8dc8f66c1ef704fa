//! Serving the gateway to clients over HTTP/1.1, with the limits a public listener needs.
//!
//! Without them, 200 connections that each send half a request line are held forever, and
//! with them a file descriptor and a task apiece. What bounds a client here:
//!
//! - **header read timeout**: from a request's first byte to the end of its head;
//! - **idle timeout**: a keep-alive connection with no request in progress and no byte of a
//!   next one (also from accept to the first byte);
//! - **stalled body timeout**: no request-body bytes for that long while the gateway waits
//!   for them: the request is answered 408 and the connection closed (a slow body that keeps
//!   coming is not stalled);
//! - **send timeout**: a response write that makes no progress for that long (a client
//!   that stopped reading) closes the connection;
//! - **maximum connections**: past it, new connections are not accepted; they wait in the
//!   listen backlog until a connection ends (a burst is served late, not refused);
//! - **header size and count**: past them hyper answers 431 and closes the connection.
//!
//! hyper has a header read timeout of its own, but its timer runs from the moment a
//! connection is ready for a request, so it bounds idle time and head time as one sum. The
//! two are kept apart here (see [`Activity`]), by one timer per connection that is moved
//! only when a deadline comes nearer (see [`watchdog`]); hyper's is off, as it would start
//! and box a timer of its own for every request. A request being served (the upstream
//! thinking, a response streaming) is not idle: no limit here cuts a long answer short.
//!
//! At shutdown the listener closes (new connections are refused), idle keep-alive
//! connections close at once, and requests in progress (streams too) have the shutdown
//! grace period to finish; then the connections still open are closed.
//!
//! WebSockets: a connection upgraded by a `101` leaves hyper (and the limits above, which
//! are about HTTP) and is relayed by `Forward` until either side closes, with limits of
//! its own (`[route.websocket]`). It still counts against **maximum connections** (the
//! socket's lease holds the connection's slot), and at shutdown it is closed with 1001
//! "going away" at once (a client reconnects elsewhere) and waited for within the grace
//! period like any connection.
//!
//! HTTP/1.1 only: h2c (cleartext HTTP/2 with prior knowledge) is not served, as its streams
//! need limits of their own; put a TLS terminator in front for HTTP/2.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower_gateway_auth::rejection::RejectionKind;
use tower_gateway_auth::socket::{CloseReason, SocketLease, is_websocket_upgrade};
use tower_gateway_auth::{Rejection, RejectionLayer};

use super::GatewayService;
use super::ready::{CallNow, call_now};

/// The number of headers hyper takes when not told another.
const HYPER_MAX_HEADERS: usize = 100;

/// Where hyper stops growing a connection's read or write buffer, past the request head's
/// own limit (its last growth can overshoot up to twice). A connection keeps what its
/// buffers grew to for its life, and hyper's default is ~400 KiB.
const BUFFER_PAST_HEAD: usize = 48 * 1024;

/// What a client connection may take; see the module docs.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub send_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// How long requests in progress may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            max_headers: HYPER_MAX_HEADERS,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Everything [`serve`] needs from a built gateway.
pub struct Serving {
    pub service: GatewayService,
    pub limits: Limits,
    /// The dialect and realm of the server's own answers (408 for a stalled body).
    pub responder: RejectionLayer,
    /// Told when shutdown begins, so that `/readyz` answers 503 from then on.
    pub readiness: super::Readiness,
}

/// Serves `serving` on `listener` until `shutdown` completes; then stops accepting, lets
/// every connection finish the request it is serving (idle ones close at once) within the
/// shutdown grace period, closes the connections still open after it, and returns.
pub async fn serve(
    listener: TcpListener,
    serving: Serving,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let Serving {
        service,
        limits,
        responder,
        readiness,
    } = serving;
    let limits = Arc::new(limits);
    let responder = Arc::new(responder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // One signal for both steps of shutdown, so that a connection waits on one channel
    // (each is polled whenever the connection is). Dropping the sender when `serve`
    // returns cuts what is left.
    let (stage, staged) = tokio::sync::watch::channel(Stage::Serving);
    // Every connection task and every open WebSocket holds a sender: all are gone once
    // `alive.recv()` answers `None`.
    let (alive, mut gone) = tokio::sync::mpsc::channel::<()>(1);
    let mut http = http1::Builder::new();
    http.max_header_size(limits.max_header_bytes);
    // Each body chunk is copied into the connection's one write buffer and sent with one
    // `write`: for the small chunks a stream is made of, hyper's queue of chunks costs more
    // than the copy (about 1,080 of the ~12,700 user-space instructions an SSE event cost
    // here). A write buffer keeps what it grew to, hence the bound on both buffers.
    http.writev(false);
    http.max_buf_size(limits.max_header_bytes + BUFFER_PAST_HEAD);
    // hyper's own limit is 100 headers; told any number, even 100, it builds its buffer of
    // header positions element by element on every request (about 2,400 instructions of
    // ~58,000 a proxied request costs here), where its default is set up in place.
    if limits.max_headers != HYPER_MAX_HEADERS {
        http.max_headers(limits.max_headers);
    }
    let mut shutdown = pin!(shutdown);
    loop {
        // A slot first, then `accept`: connections past the cap stay in the backlog.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached: new connections wait until one ends"
                );
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: retrying at once would spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let slot = Arc::new(slot);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            stream,
            activity: activity.clone(),
        });
        let service = Tracked {
            inner: RefCell::new(service.clone()),
            activity: activity.clone(),
            body_timeout: limits.body_timeout,
            responder: responder.clone(),
            socket: SocketHold {
                slot: slot.clone(),
                alive: alive.clone(),
                stage: staged.clone(),
            },
        };
        let conn = drained(
            http.serve_connection(io, service).with_upgrades(),
            staged.clone(),
        );
        let limits = limits.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let ended = watchdog(conn, &activity, &limits)
                .await
                .and_then(|ended| ended);
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
                Err(why) => tracing::debug!(%peer, why, "connection closed"),
            }
            drop(slot);
            drop(alive);
        });
    }
    readiness.shutting_down();
    drop(listener);
    tracing::info!(
        grace_secs = limits.shutdown_grace.as_secs(),
        "shutting down: no new connections; requests in progress may finish"
    );
    stage.send_replace(Stage::Draining);
    drop(alive);
    if tokio::time::timeout(limits.shutdown_grace, gone.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = limits.shutdown_grace.as_secs(),
            "shutdown grace period over: closing the connections still open"
        );
        stage.send_replace(Stage::Cut);
    }
    Ok(())
}

/// The server connection of one client: HTTP/1.1 with upgrades.
type ClientConnection =
    hyper::server::conn::http1::UpgradeableConnection<TokioIo<Watched>, Tracked>;

/// How far shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Serving,
    /// Connections finish what they serve and close; WebSockets are closed with 1001.
    Draining,
    /// The grace period is over: every connection still open is dropped.
    Cut,
}

/// Drives `conn`; once shutdown begins, tells it to finish the request it serves and close
/// (an idle keep-alive connection closes at once), and drops it when the grace period is
/// over. What hyper-util's `GracefulShutdown` does, for the upgradeable connection it does
/// not take.
async fn drained(
    conn: ClientConnection,
    mut stage: tokio::sync::watch::Receiver<Stage>,
) -> Result<Result<(), hyper::Error>, &'static str> {
    let mut conn = pin!(conn);
    // (A closed channel means `serve` is gone: as good as cut.)
    tokio::select! {
        biased;
        ended = conn.as_mut() => return Ok(ended),
        _ = stage.wait_for(|s| *s >= Stage::Draining) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        biased;
        ended = conn.as_mut() => Ok(ended),
        _ = stage.wait_for(|s| *s == Stage::Cut) => Err("shutdown grace period over"),
    }
}

/// What an upgraded connection keeps from its server connection: the connection slot,
/// the count of open connections, and the shutdown signal that closes it.
struct SocketHold {
    slot: Arc<tokio::sync::OwnedSemaphorePermit>,
    alive: tokio::sync::mpsc::Sender<()>,
    stage: tokio::sync::watch::Receiver<Stage>,
}

impl SocketHold {
    /// Ties a WebSocket upgrade to this server: the slot and the count live as long as the
    /// socket, and shutdown closes it.
    fn lend(&self, req: &mut Request<Incoming>) {
        let lease = SocketLease::of(req);
        lease.hold(self.slot.clone());
        lease.hold(self.alive.clone());
        let mut stage = self.stage.clone();
        lease.close_when(async move {
            let _ = stage.wait_for(|s| *s >= Stage::Draining).await;
            CloseReason::going_away("the gateway is shutting down")
        });
    }
}

/// Where a connection is between requests, as the timeouts see it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress, no byte of the next one since this instant.
    Idle(Instant),
    /// The first byte of a request head came at this instant; the head is not complete.
    Head(Instant),
    /// This many requests are being served (the service called, its response not yet
    /// fully sent).
    Busy(u64),
}

/// A connection's [`Phase`], and since when a write to the client has been blocked;
/// updated by its socket ([`Watched`]) and its service ([`Tracked`]), all polled from the
/// connection's own task.
///
/// Both are kept in atomics, as offsets from the connection's opening: they are read and
/// written on every read and write of the socket, where a lock costs more than the rest.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// [`Phase`], packed: the kind in the top two bits, the instant (nanoseconds since
    /// `opened`) or the count below.
    phase: AtomicU64,
    /// Nanoseconds since `opened`, plus one, of the first write that could not go through;
    /// 0 while writes go through.
    blocked: AtomicU64,
    /// Whether the request body being read stalled (HTTP/1.1 reads one body at a time).
    stalled: AtomicBool,
}

const KIND: u64 = 0b11 << 62;
const IDLE: u64 = 0;
const HEAD: u64 = 1 << 62;
const BUSY: u64 = 2 << 62;

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            phase: AtomicU64::new(IDLE),
            blocked: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    /// `Instant::now()` as an offset from `opened`.
    fn now(&self) -> u64 {
        let nanos = self.opened.elapsed().as_nanos();
        // 2^62 ns is 146 years.
        u64::try_from(nanos).unwrap_or(u64::MAX) & !KIND
    }

    fn at(&self, offset: u64) -> Instant {
        self.opened + Duration::from_nanos(offset)
    }

    fn phase(&self) -> Phase {
        let packed = self.phase.load(Ordering::Relaxed);
        let value = packed & !KIND;
        match packed & KIND {
            IDLE => Phase::Idle(self.at(value)),
            HEAD => Phase::Head(self.at(value)),
            _ => Phase::Busy(value),
        }
    }

    fn set(&self, kind: u64, value: u64) {
        self.phase.store(kind | value, Ordering::Relaxed);
    }

    fn write_blocked(&self, blocked: bool) {
        let since = self.blocked.load(Ordering::Relaxed);
        match (blocked, since) {
            (true, 0) => self.blocked.store(self.now() + 1, Ordering::Relaxed),
            (false, 1..) => self.blocked.store(0, Ordering::Relaxed),
            _ => {}
        }
    }

    fn bytes_read(&self) {
        if self.phase.load(Ordering::Relaxed) & KIND == IDLE {
            self.set(HEAD, self.now());
        }
    }

    fn request_started(&self) {
        self.stalled.store(false, Ordering::Relaxed);
        match self.phase() {
            Phase::Busy(n) => self.set(BUSY, n + 1),
            _ => self.set(BUSY, 1),
        }
    }

    fn request_ended(&self) {
        match self.phase() {
            Phase::Busy(n) if n > 1 => self.set(BUSY, n - 1),
            _ => self.set(IDLE, self.now()),
        }
    }

    /// When the connection is to be closed if nothing changes, and why.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        match self.phase() {
            Phase::Idle(since) => Some((since + limits.idle_timeout, "idle timeout")),
            Phase::Head(since) => Some((since + limits.header_read_timeout, "header read timeout")),
            Phase::Busy(_) => match self.blocked.load(Ordering::Relaxed) {
                0 => None,
                since => Some((self.at(since - 1) + limits.send_timeout, "send timeout")),
            },
        }
    }
}

/// Drives `conn` until it ends, or until its [`Activity`] deadline passes (then `Err`, and
/// dropping `conn` closes the socket).
///
/// Every phase change happens while `conn` is polled (a read, a service call, a response
/// body ending), so the deadline is recomputed after each poll of it and nothing is missed.
/// The timer is moved only when the deadline comes nearer than where it is set: a later
/// deadline (each request pushes the idle one on) waits for the timer to go off early,
/// which then sets it again. A busy connection moves it about once per timeout, not twice
/// per request.
async fn watchdog<C: Future>(
    conn: C,
    activity: &Activity,
    limits: &Limits,
) -> Result<C::Output, &'static str> {
    let mut conn = pin!(conn);
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut armed = None;
    poll_fn(|cx| {
        if let Poll::Ready(output) = conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        loop {
            let Some((at, why)) = activity.deadline(limits) else {
                // Busy and sending: the timer may stay where it is and go off for nothing.
                return Poll::Pending;
            };
            if armed.is_none_or(|armed| at < armed) {
                timer.as_mut().reset(at);
                armed = Some(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= at {
                return Poll::Ready(Err(why));
            }
            // Early: the deadline moved on since the timer was set.
            timer.as_mut().reset(at);
            armed = Some(at);
        }
    })
    .await
}

/// The client's socket, telling its [`Activity`] when request bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.activity.write_blocked(written.is_pending());
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.activity.write_blocked(written.is_pending());
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The gateway's service on one connection: marks the connection busy from the call until
/// the response body is sent or dropped, and times out a stalled request body.
struct Tracked {
    /// Borrowed mutably for the length of `call_now` in `call`, never across an await, so
    /// the borrow cannot clash; it lets the connection call its service in place instead of
    /// cloning it (a boxed clone) for every request.
    inner: RefCell<GatewayService>,
    activity: Arc<Activity>,
    body_timeout: Duration,
    responder: Arc<RejectionLayer>,
    socket: SocketHold,
}

/// Ends the request's busy phase when dropped: with the response body, or with the
/// response future if the client went away first.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Sending>;
    type Error = std::convert::Infallible;
    type Future = TrackedFuture;

    fn call(&self, mut req: Request<Incoming>) -> TrackedFuture {
        if is_websocket_upgrade(&req) {
            self.socket.lend(&mut req);
        }
        self.activity.request_started();
        let busy = Busy(self.activity.clone());
        let req = req.map(|body| {
            Body::new(Stall {
                body,
                timeout: self.body_timeout,
                timer: None,
                activity: self.activity.clone(),
            })
        });
        TrackedFuture {
            answer: call_now(&mut self.inner.borrow_mut(), req),
            busy: Some(busy),
            responder: self.responder.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`Tracked`]: the gateway's answer (or a 408 if the request
    /// body stalled), with a body that ends the request's busy phase.
    struct TrackedFuture {
        #[pin]
        answer: CallNow<GatewayService, Request<Body>>,
        busy: Option<Busy>,
        responder: Arc<RejectionLayer>,
    }
}

impl Future for TrackedFuture {
    type Output = Result<Response<Sending>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.answer.poll(cx))?;
        let busy = this
            .busy
            .take()
            .expect("TrackedFuture polled after completion");
        let response = if busy.0.stalled.load(Ordering::Relaxed) {
            stalled_body(this.responder)
        } else {
            response
        };
        // Handed to hyper as it is: boxed again into a `Body`, it would cost an allocation
        // and a wrapper around every frame.
        Poll::Ready(Ok(response.map(|body| Sending {
            body,
            busy: Some(busy),
        })))
    }
}

/// 408 for a request whose body stopped coming; whatever the stack answered was about a
/// request it never saw whole.
fn stalled_body(responder: &RejectionLayer) -> Response<Body> {
    tracing::info!("request refused: its body stalled");
    let rejection = Rejection::new(
        RejectionKind::RequestBodyTimeout,
        "The request body stopped arriving.",
    );
    let mut response = responder
        .render(&rejection, &http::HeaderMap::new())
        .map(Body::from);
    // The rest of the body may still come: the connection cannot be reused.
    response
        .headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

pin_project! {
    /// A request body that fails once no bytes came for `timeout` while it was waited on,
    /// and notes that it did, so that the answer can say so.
    ///
    /// (tower-http's `TimeoutBody` does the timing, but hides the body's size hint and end:
    /// a sized body would then look unsized to the proxy.)
    struct Stall {
        #[pin]
        body: Incoming,
        timeout: Duration,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        activity: Arc<Activity>,
    }
}

/// The error of a [`Stall`] body that timed out.
#[derive(Debug)]
struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body stalled")
    }
}

impl std::error::Error for Stalled {}

impl http_body::Body for Stall {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        // The body first: bytes that are there win over a timer that just ran out.
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            this.timer.set(None);
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.timeout)));
        }
        let timer = this.timer.as_pin_mut().expect("set above");
        ready!(timer.poll(cx));
        this.activity.stalled.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(Stalled.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that ends its request's busy phase when it ends or is dropped.
struct Sending {
    body: Body,
    busy: Option<Busy>,
}

impl http_body::Body for Sending {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.busy = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
