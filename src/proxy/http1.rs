//! Plain-HTTP/1.1 upstream connections, pooled and driven by the request that holds them.
//!
//! hyper-util's pooled client gives every connection its own task: each request is handed to
//! that task through a channel and its response handed back, two task wake-ups per request on
//! top of the pool's bookkeeping. An HTTP/1.1 connection carries one exchange at a time, so
//! here the request that leases a connection polls it itself: the response head and then the
//! response body advance the connection as they are polled, and the connection goes back to
//! the pool when the body has been read to its end. A body dropped half-read closes its
//! connection: what is left of it on the wire cannot be skipped safely.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{BoxError, OutBody};
use crate::clock::{Clock, SystemClock, Timestamp};

type Conn = Connection<TokioIo<TcpStream>, OutBody>;

/// Where hyper stops growing a connection's read buffer (its last growth can overshoot up to
/// twice). A pooled connection keeps what its buffers grew to, and hyper's default is
/// ~400 KiB; 64 KiB still reads a large response in few calls.
const MAX_BUFFER: usize = 64 * 1024;

/// One open connection: the handle requests are sent on, and the connection state machine
/// that has to be polled for them to make progress.
struct Lease {
    send: SendRequest<OutBody>,
    conn: Conn,
}

impl Lease {
    /// Advances the connection; `true` once it has ended (closed by either side, or failed).
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(&mut self.conn).poll(cx).is_ready()
    }
}

struct Idle {
    lease: Box<Lease>,
    since: Timestamp,
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub(super) enum SendError {
    /// No connection could be opened.
    Connect(BoxError),
    /// The connection failed or closed before the response head came.
    Exchange(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "cannot connect: {e}"),
            SendError::Exchange(e) => write!(f, "{e}"),
        }
    }
}

/// The idle connections to one upstream address.
pub(super) struct Pool {
    /// `host:port`, as it is connected to.
    address: String,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Option<Duration>,
}

impl Pool {
    pub(super) fn new(
        address: String,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Option<Duration>,
    ) -> Self {
        Pool {
            address,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) and waits for the response head.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut request: Request<OutBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (mut lease, reused) = match self.checkout() {
                Some(lease) => (lease, true),
                None => (self.connect().await?, false),
            };
            let sent = lease.send.try_send_request(request);
            let mut sent = std::pin::pin!(sent);
            let mut lease = Some(lease);
            // Both the connection and the response are polled here: the connection does the
            // writing and reading, the response future only collects what it parsed.
            let answer = std::future::poll_fn(|cx| {
                if lease.as_mut().is_some_and(|l| l.poll_conn(cx)) {
                    lease = None;
                }
                sent.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(response) => {
                    return Ok(response.map(|body| UpstreamBody {
                        body,
                        lease: lease.map(|lease| (lease, Arc::clone(self))),
                    }));
                }
                // A pooled connection the upstream closed just as the request went out: the
                // request was not sent, so it is safe to send it again on a new connection.
                Err(mut failed) if reused => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Exchange(failed.into_error())),
                },
                Err(failed) => return Err(SendError::Exchange(failed.into_error())),
            }
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Box<Lease>> {
        let now = SystemClock.now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(Idle { mut lease, since }) = idle.pop() {
            if now.saturating_sub(self.idle_timeout) > since {
                continue;
            }
            // Polled with a no-op waker, it picks up a close the upstream sent while the
            // connection was idle, and gets ready for the next request. Nothing is left
            // registered that would wake the request which used it last.
            if lease.poll_conn(&mut Context::from_waker(Waker::noop())) || !lease.send.is_ready() {
                continue;
            }
            return Some(lease);
        }
        None
    }

    fn checkin(&self, lease: Box<Lease>) {
        if lease.send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                lease,
                since: SystemClock.now(),
            });
        }
    }

    async fn connect(&self) -> Result<Box<Lease>, SendError> {
        let connecting = async {
            let stream = TcpStream::connect(self.address.as_str()).await?;
            stream.set_nodelay(true)?;
            let (send, conn) = http1::Builder::new()
                .max_buf_size(MAX_BUFFER)
                .handshake(TokioIo::new(stream))
                .await?;
            Ok::<_, BoxError>(Box::new(Lease { send, conn }))
        };
        match self.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, connecting)
                .await
                .map_err(|_| SendError::Connect(format!("timed out after {limit:?}").into()))?,
            None => connecting.await,
        }
        .map_err(SendError::Connect)
    }
}

/// The body of an upstream response, streamed as it arrives.
///
/// On a pooled HTTP/1.1 connection, reading the body drives the connection, and reading it to
/// the end hands the connection back to the pool.
pub struct UpstreamBody {
    body: Incoming,
    /// Boxed once per connection: a connection's state is large, and bodies are moved.
    lease: Option<(Box<Lease>, Arc<Pool>)>,
}

impl UpstreamBody {
    /// A body on a connection this module does not manage (hyper-util's client).
    pub(super) fn plain(body: Incoming) -> Self {
        UpstreamBody { body, lease: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.lease.as_mut().is_some_and(|(l, _)| l.poll_conn(cx)) {
            this.lease = None;
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                if let Some((lease, pool)) = this.lease.take() {
                    pool.checkin(lease);
                }
            }
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        frame
    }

    delegate_body_hints!();
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A server stops polling a body that reports its end (its `Content-Length` all read)
        // and drops it: that is a complete exchange too.
        if let Some((lease, pool)) = self.lease.take()
            && self.body.is_end_stream()
        {
            pool.checkin(lease);
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}
