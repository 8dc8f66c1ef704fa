//! [`Forward`]: the last service of a gateway, sending each request on to an upstream over
//! HTTP or HTTPS (rustls) and streaming both bodies (feature `proxy`).

mod hop;
mod http1;
mod path;
#[cfg(feature = "websocket")]
mod websocket;

pub use hop::{StripHopByHop, StripHopByHopLayer};
pub use http1::UpstreamBody;
pub use path::has_dot_segment;
#[cfg(feature = "websocket")]
pub use websocket::CLOSE_WAIT;

use hop::drop_hop_by_hop;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::rejection::{Rejection, RejectionKind};
use crate::response::{ResponseBody, UpstreamOutcome};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type OutBody = UnsyncBoxBody<Bytes, BoxError>;

/// A forwarding proxy to one upstream base URL.
///
/// - The request's path and query are appended to the upstream's base URL, the query byte
///   for byte: `https://api.openai.com` and `/v1/chat/completions?x=1` make
///   `https://api.openai.com/v1/chat/completions?x=1`. Mounted with axum's
///   `nest_service("/openai", forward)`, the prefix is stripped first.
/// - A path with a dot segment (`.` or `..`, raw or percent-encoded; see
///   [`has_dot_segment`]) is refused with 400 `invalid_path` and sent nowhere: a request
///   never reaches a path outside the base.
/// - Request and response bodies stream: a server-sent-events answer reaches the client event
///   by event.
/// - Hop-by-hop headers (`Connection`, `Keep-Alive`, `Proxy-Connection`,
///   `Proxy-Authorization`, `TE` other than `trailers`, `Trailer`, `Transfer-Encoding`,
///   `Upgrade`) are dropped both ways; `Host` becomes the upstream's. A WebSocket upgrade
///   ([`is_websocket_upgrade`](crate::socket::is_websocket_upgrade)) then gets
///   `Connection: upgrade` and `Upgrade: websocket` again, set here: with feature
///   `websocket` it is relayed (see [WebSockets](#websockets)); without it the upstream sees
///   a plain `GET`. The headers an
///   upstream's `Connection` names are dropped from its response, but a request's
///   `Connection` list is not read here: nothing a layer set is removed by the proxy. Put
///   [`StripHopByHopLayer`] outermost to drop the headers a client names on entry.
/// - `http://` upstreams are spoken to in HTTP/1.1 over pooled keep-alive connections, each
///   driven by the request using it (no connection task, no hand-over per request), whose
///   read buffer stops growing at 64 KiB (an upstream's response head must fit in it);
///   `https://` upstreams go through hyper-util's client, HTTP/2 when the upstream offers it
///   over ALPN.
/// - Every response it makes carries an [`UpstreamOutcome`] in its extensions (the
///   upstream's status, or that it failed), for the access log and metrics outside.
/// - Upstream answers, errors included, come back as they are. An unreachable upstream gives
///   502 and one that does not answer within the response timeout 504, as a
///   [`Rejection`] (rendered in the stack's dialect by a
///   [`RejectionLayer`](crate::RejectionLayer) around it). That body names neither the upstream nor the error (both
///   are logged at `warn`, with the request id); it quotes the request's `x-request-id`
///   ([`request_id_header`](ForwardBuilder::request_id_header)) for the client to report.
///
///
/// # WebSockets
///
/// With feature `websocket`, a WebSocket upgrade (`GET`, `Upgrade: websocket`) is sent to
/// the upstream on a fresh HTTP/1.1 connection (TLS without `h2` in ALPN for `https://` or
/// `wss://` upstreams), with the headers the layers above set (the provider credential)
/// like any request. The upstream's `101` is relayed and then every message both ways until
/// either side closes; the upstream's answer to the handshake (`Sec-WebSocket-Accept`, the
/// subprotocol it selects) reaches the client unchanged. Limits, each socket's own:
/// [`socket_max_message_size`](ForwardBuilder::socket_max_message_size) (default 16 MiB;
/// larger closes with 1009), [`socket_idle_timeout`](ForwardBuilder::socket_idle_timeout)
/// (default 5 minutes without a message either way) and
/// [`socket_max_lifetime`](ForwardBuilder::socket_max_lifetime) (default 1 hour; both close
/// with 1001). The request's [`SocketLease`](crate::socket::SocketLease) is held until the
/// socket is closed, and its closes (a revoked key, a shutdown) close the socket on both
/// sides. The upgrade request is sent in HTTP/1.1 only: a client reaching the gateway over
/// HTTP/2 is answered 400.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::proxy::Forward;
///
/// let forward = Forward::builder("https://api.openai.com")
///     .unwrap()
///     .connect_timeout(Duration::from_secs(5))
///     .response_timeout(Duration::from_secs(60))
///     .build();
/// # let _ = forward;
/// ```
#[derive(Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header requests on connections of their own carry.
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))]
    host: HeaderValue,
    base_path: String,
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))]
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    request_id_header: HeaderName,
    /// Connects WebSocket upgrades: HTTP/1.1 only, plain or TLS.
    #[cfg(feature = "websocket")]
    sockets: HttpsConnector<HttpConnector>,
    #[cfg(feature = "websocket")]
    socket_limits: websocket::SocketLimits,
}

enum Transport {
    /// `http://`: this crate's HTTP/1.1 pool, and the `Host` header to send.
    Http1(Arc<http1::Pool>, HeaderValue),
    /// `https://`: hyper-util's client with rustls.
    Client(Box<Client<HttpsConnector<HttpConnector>, OutBody>>),
}

/// The error when an upstream is not an absolute `http://` or `https://` URL, or carries a
/// `user:password@`. Its text shows the URL with any such credentials left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUpstream(String);

impl InvalidUpstream {
    fn new(upstream: &str) -> Self {
        // What sits between `//` and the last `@` before the path is a credential.
        let shown = match upstream.split_once("//") {
            Some((scheme, rest)) => {
                let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                match rest[..authority_end].rfind('@') {
                    Some(at) => format!("{scheme}//<credentials>{}", &rest[at..]),
                    None => upstream.to_owned(),
                }
            }
            None => upstream.to_owned(),
        };
        InvalidUpstream(shown)
    }
}

impl fmt::Display for InvalidUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid upstream `{}`: expected http://host[:port][/base] or https://…, with no \
             query and no user:password@ (the upstream credential belongs to UpstreamAuthLayer)",
            self.0
        )
    }
}

impl std::error::Error for InvalidUpstream {}

/// Options for [`Forward`].
#[derive(Debug)]
pub struct ForwardBuilder {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    request_id_header: HeaderName,
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    max_idle: usize,
    #[cfg(feature = "websocket")]
    socket_limits: websocket::SocketLimits,
}

/// How long an idle upstream connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

impl ForwardBuilder {
    /// How long connecting (TCP and TLS) may take (default: 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long the upstream may take to send its response head (default: 300 s). Bodies are
    /// not limited: a long stream is not cut off.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = Some(timeout);
        self
    }

    /// The request header whose value a 502/504 body quotes, so that a client can report
    /// the failure and the operator find it in the log (default: `x-request-id`, the one
    /// [`RequestId`](crate::inject::RequestId) sets).
    pub fn request_id_header(mut self, name: HeaderName) -> Self {
        self.request_id_header = name;
        self
    }

    /// How many idle keep-alive connections to the upstream are kept open (default: 256).
    pub fn max_idle_connections(mut self, max: usize) -> Self {
        self.max_idle = max;
        self
    }

    /// How long a relayed WebSocket may go without a message either way before it is closed
    /// with 1001 (default: 5 minutes; feature `websocket`). Pings count: each hop answers
    /// its own.
    #[cfg(feature = "websocket")]
    pub fn socket_idle_timeout(mut self, idle: Duration) -> Self {
        self.socket_limits.idle = idle;
        self
    }

    /// How long a relayed WebSocket may stay open at all before it is closed with 1001
    /// (default: 1 hour; feature `websocket`). Behind a
    /// [`RedisLimiter`](crate::limit::RedisLimiter), keep it below the permit lease, or a
    /// socket older than the lease stops counting as in flight.
    #[cfg(feature = "websocket")]
    pub fn socket_max_lifetime(mut self, lifetime: Duration) -> Self {
        self.socket_limits.lifetime = lifetime;
        self
    }

    /// The largest WebSocket message (and frame) relayed, in bytes, either way; a larger one
    /// closes the socket with 1009 on both sides before it is read whole (default: 16 MiB;
    /// feature `websocket`).
    #[cfg(feature = "websocket")]
    pub fn socket_max_message_size(mut self, bytes: usize) -> Self {
        self.socket_limits.max_message = bytes.max(1);
        self
    }

    /// Also trusts `certificate` (DER), besides the Mozilla roots: for an upstream behind a
    /// private CA.
    pub fn add_root_certificate(
        mut self,
        certificate: impl Into<rustls::pki_types::CertificateDer<'static>>,
    ) -> Self {
        self.extra_roots.push(certificate.into());
        self
    }

    /// The proxy.
    ///
    /// # Panics
    /// When a certificate given to [`add_root_certificate`](Self::add_root_certificate) is
    /// not a valid trust anchor.
    pub fn build(self) -> Forward {
        let host = HeaderValue::from_str(self.authority.as_str())
            .expect("an authority is a valid header value");
        let transport = if self.scheme == Scheme::HTTP {
            let port = self.authority.port_u16().unwrap_or(80);
            let address = format!("{}:{port}", self.authority.host());
            let pool = http1::Pool::new(address, self.max_idle, IDLE_TIMEOUT, self.connect_timeout);
            Transport::Http1(Arc::new(pool), host.clone())
        } else {
            Transport::Client(Box::new(self.https_client()))
        };
        Forward {
            inner: Arc::new(Inner {
                transport,
                #[cfg(feature = "websocket")]
                sockets: self.connector(false),
                #[cfg(feature = "websocket")]
                socket_limits: self.socket_limits,
                scheme: self.scheme,
                authority: self.authority,
                host,
                base_path: self.base_path,
                connect_timeout: self.connect_timeout,
                response_timeout: self.response_timeout,
                request_id_header: self.request_id_header,
            }),
        }
    }

    fn https_client(&self) -> Client<HttpsConnector<HttpConnector>, OutBody> {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(self.max_idle)
            .build(self.connector(true))
    }

    /// A connector for this upstream: HTTP/1.1 and (`http2`) HTTP/2 over ALPN.
    fn connector(&self, http2: bool) -> HttpsConnector<HttpConnector> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(self.connect_timeout);
        http.set_nodelay(true);
        let https = crate::https_client::connector_builder(&self.extra_roots);
        if http2 {
            https.enable_http2().wrap_connector(http)
        } else {
            https.wrap_connector(http)
        }
    }
}

impl Forward {
    /// Options for a proxy to `upstream`, e.g. `https://api.anthropic.com` or
    /// `http://127.0.0.1:9000/base`. `ws://` and `wss://` name the same upstreams as
    /// `http://` and `https://` (every request goes there, WebSocket or not).
    pub fn builder(upstream: &str) -> Result<ForwardBuilder, InvalidUpstream> {
        let bad = || InvalidUpstream::new(upstream);
        let uri: Uri = upstream.parse().map_err(|_| bad())?;
        let scheme = match uri.scheme_str() {
            Some("http" | "ws") => Scheme::HTTP,
            Some("https" | "wss") => Scheme::HTTPS,
            _ => return Err(bad()),
        };
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        // Credentials in the URL would show in logs, `Debug` and the 502/504 bodies, which
        // name the upstream's authority.
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(bad());
        }
        Ok(ForwardBuilder {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            connect_timeout: Some(Duration::from_secs(10)),
            response_timeout: Some(Duration::from_secs(300)),
            request_id_header: crate::inject::X_REQUEST_ID,
            extra_roots: Vec::new(),
            max_idle: 256,
            #[cfg(feature = "websocket")]
            socket_limits: websocket::SocketLimits::default(),
        })
    }

    /// A proxy to `upstream` with default options.
    pub fn new(upstream: &str) -> Result<Self, InvalidUpstream> {
        Ok(Self::builder(upstream)?.build())
    }

    /// The URI this request goes upstream with: origin-form (`/base/path?query`) on a pooled
    /// HTTP/1.1 connection or one of its own (`origin_form`), absolute for hyper-util's
    /// client.
    fn target(&self, uri: &Uri, origin_form: bool) -> Uri {
        let inner = &self.inner;
        let path_and_query = match uri.path_and_query() {
            Some(pq) if inner.base_path.is_empty() && pq.as_str().starts_with('/') => pq.clone(),
            pq => {
                let pq = pq.map_or("/", |pq| pq.as_str());
                let slash = if pq.starts_with('/') { "" } else { "/" };
                // Sized exactly: `format!` grows the string as it goes, and `Bytes` takes a
                // string with spare capacity only by allocating again.
                let mut joined =
                    String::with_capacity(inner.base_path.len() + slash.len() + pq.len());
                joined.push_str(&inner.base_path);
                joined.push_str(slash);
                joined.push_str(pq);
                PathAndQuery::try_from(joined)
                    .expect("a valid base path and a valid path make a valid path")
            }
        };
        let mut parts = http::uri::Parts::default();
        if let (Transport::Client(_), false) = (&inner.transport, origin_form) {
            parts.scheme = Some(inner.scheme.clone());
            parts.authority = Some(inner.authority.clone());
        }
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).expect("parts of valid URIs make a valid URI")
    }
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field(
                "upstream",
                &format_args!(
                    "{}://{}{}",
                    self.inner.scheme, self.inner.authority, self.inner.base_path
                ),
            )
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for Forward
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<UpstreamBody>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pools open connections as needed and the client queues requests itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Checked here too, not only by a router in front: joined to the base path, a dot
        // segment would take the request (and the credential it carries) outside it.
        if has_dot_segment(req.uri().path()) {
            tracing::info!(target: "tower_gateway_auth::proxy", upstream = %self.inner.authority, "request refused: dot segment in the path");
            let response = Rejection::new(
                RejectionKind::InvalidPath,
                "The request path must not contain `.` or `..` segments.",
            )
            .to_response(req.headers());
            return Box::pin(std::future::ready(Ok(response.map(ResponseBody::full))));
        }
        let (mut parts, body) = req.into_parts();
        #[cfg(feature = "websocket")]
        let websocket =
            crate::socket::wants_websocket(&parts.method, parts.version, &parts.headers);
        #[cfg(not(feature = "websocket"))]
        let websocket = false;
        parts.uri = self.target(&parts.uri, websocket);
        // Only the fixed names: the headers a client lists in `Connection` went on entry
        // (`StripHopByHopLayer`), and what the layers set since stays.
        drop_hop_by_hop(&mut parts.headers, false);
        // Kept for a 502/504: the client is told the request id, never the upstream's
        // address or the error, which go to the log.
        // A clone of the value is a reference count; whether it is text is asked only on a
        // failure (`shown`).
        let request_id = parts
            .headers
            .get(&self.inner.request_id_header)
            .filter(|id| id.len() <= MAX_SHOWN_REQUEST_ID)
            .cloned();
        #[cfg(feature = "websocket")]
        if websocket {
            let body = body.map_err(Into::into).boxed_unsync();
            let inner = self.inner.clone();
            return Box::pin(
                async move { Ok(websocket::open(inner, parts, body, request_id).await) },
            );
        }
        match &self.inner.transport {
            Transport::Http1(_, host) => parts.headers.insert(header::HOST, host.clone()),
            // The client sets it from the URI.
            Transport::Client(_) => parts.headers.remove(header::HOST),
        };
        let outgoing = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        let inner = self.inner.clone();
        Box::pin(async move {
            // Reading the clock twice a request is measurable here: only when it is logged
            // or measured.
            let started = (cfg!(feature = "metrics")
                || tracing::enabled!(target: "tower_gateway_auth::proxy", tracing::Level::DEBUG))
            .then(Instant::now);
            let elapsed = || started.map(|s| s.elapsed());
            let sent = async {
                match &inner.transport {
                    Transport::Http1(pool, _) => pool.send(outgoing).await.map_err(|e| Failure {
                        connect: matches!(e, http1::SendError::Connect(_)),
                        error: e.to_string(),
                    }),
                    Transport::Client(client) => client
                        .request(outgoing)
                        .await
                        .map(|r| r.map(UpstreamBody::plain))
                        .map_err(|e| Failure {
                            connect: e.is_connect(),
                            error: e.to_string(),
                        }),
                }
            };
            let result = match inner.response_timeout {
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| limit),
                None => Ok(sent.await),
            };
            let response = match result {
                Ok(Ok(mut response)) => {
                    drop_hop_by_hop(response.headers_mut(), true);
                    let outcome = UpstreamOutcome::answered(response.status(), elapsed());
                    tracing::debug!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, status = response.status().as_u16(), elapsed = ?outcome.elapsed().unwrap_or_default(), "forwarded");
                    response.extensions_mut().insert(outcome);
                    return Ok(response.map(ResponseBody::inner));
                }
                Ok(Err(Failure { connect, error })) => {
                    tracing::warn!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, request_id = shown(&request_id), %error, "upstream request failed");
                    let message = if connect {
                        "The upstream could not be reached."
                    } else {
                        "The upstream failed to answer."
                    };
                    Rejection::new(
                        RejectionKind::UpstreamUnreachable,
                        with_request_id(message, shown(&request_id)),
                    )
                }
                Err(limit) => {
                    tracing::warn!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, request_id = shown(&request_id), timeout = ?limit, "upstream timed out");
                    Rejection::new(
                        RejectionKind::UpstreamTimeout,
                        with_request_id("The upstream did not answer in time.", shown(&request_id)),
                    )
                }
            };
            Ok(failure(response, elapsed()))
        })
    }
}

/// The response to a failed exchange (502, 504), rendered in the default dialect, with the
/// outcome for the layers outside.
fn failure(
    rejection: Rejection,
    elapsed: Option<Duration>,
) -> Response<ResponseBody<UpstreamBody>> {
    let mut response = rejection.to_response(&HeaderMap::new());
    response
        .extensions_mut()
        .insert(UpstreamOutcome::failed(elapsed));
    response.map(ResponseBody::full)
}

/// Request ids longer than this are not repeated in an error body.
const MAX_SHOWN_REQUEST_ID: usize = 128;

/// The request id kept for a failure's log line and body, when it is text.
fn shown(id: &Option<HeaderValue>) -> Option<&str> {
    id.as_ref().and_then(|id| id.to_str().ok())
}

/// `message`, and the request id the client can quote to the operator.
fn with_request_id(message: &str, request_id: Option<&str>) -> String {
    match request_id {
        Some(id) => format!("{message} Request id: {id}."),
        None => message.to_owned(),
    }
}

/// Why an upstream exchange failed, as the log tells it.
struct Failure {
    connect: bool,
    error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_join_base_and_keep_the_query() {
        let f = Forward::new("http://127.0.0.1:9/base/").unwrap();
        let uri: Uri = "/v1/chat?x=%2F&&y".parse().unwrap();
        assert_eq!(f.target(&uri, false), "/base/v1/chat?x=%2F&&y");
        let f = Forward::new("http://127.0.0.1:9").unwrap();
        assert_eq!(f.target(&uri, false), "/v1/chat?x=%2F&&y");
        let f = Forward::new("https://api.openai.com").unwrap();
        assert_eq!(
            f.target(&"/v1/models".parse().unwrap(), false),
            "https://api.openai.com/v1/models"
        );
        assert_eq!(
            f.target(&"/v1/realtime?model=m".parse().unwrap(), true),
            "/v1/realtime?model=m"
        );
        let f = Forward::new("wss://api.openai.com/v1").unwrap();
        assert_eq!(
            f.target(&"/realtime".parse().unwrap(), false),
            "https://api.openai.com/v1/realtime"
        );
        for bad in ["api.openai.com", "ftp://x", "/relative", "http://h/?q=1"] {
            assert!(Forward::new(bad).is_err(), "{bad}");
        }
        let err = Forward::new("https://user:s3cret@example.com/v1")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("s3cret") && err.contains("https://<credentials>@example.com/v1"),
            "{err}"
        );
    }
}
