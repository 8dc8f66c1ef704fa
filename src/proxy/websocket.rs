//! WebSocket upgrades through [`Forward`](super::Forward) (feature `websocket`): the upgrade
//! request sent on a connection of its own, the upstream's `101` relayed, then a
//! frame-aware relay between the two sockets until either side closes.
//!
//! - **The handshake** is the upstream's: the client's `Sec-WebSocket-Key` goes upstream
//!   and the upstream's `Sec-WebSocket-Accept` comes back, so the client checks the upstream's
//!   answer to its own key. `Sec-WebSocket-Extensions` is not forwarded: the relay reads and
//!   writes frames and speaks no extension (`permessage-deflate` would need both sides'
//!   compression state). A `101` that selects an extension anyway, or a subprotocol the
//!   request did not offer, or that does not upgrade to `websocket`, is answered 502.
//! - **An upstream that refuses** the upgrade (401, 404, 426 …) is answered as any other
//!   response, body streamed.
//! - **The relay** reads whole messages on each side (tokio-tungstenite) and writes them to
//!   the other: text and binary messages pass unchanged; pings are answered on each hop
//!   (each side's pongs are its own hop's), and a close from one side is sent on to the
//!   other with its code and reason.
//! - **Limits**: a message (or frame) larger than
//!   [`socket_max_message_size`](super::ForwardBuilder::socket_max_message_size) closes the
//!   socket with 1009 on both sides, before the message is read whole; no message either
//!   way for [`socket_idle_timeout`](super::ForwardBuilder::socket_idle_timeout), or the
//!   socket open for [`socket_max_lifetime`](super::ForwardBuilder::socket_max_lifetime),
//!   closes it with 1001. A [`SocketLease`] close (a revoked key, a shutdown) closes both
//!   sides with its reason. After sending its close frame the relay waits
//!   [`CLOSE_WAIT`] for the other end's, then drops the connection.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tower_service::Service;

use super::hop::{drop_hop_by_hop, set_websocket_upgrade};
use super::{Inner, OutBody, UpstreamBody, failure, shown, with_request_id};
use crate::rejection::{Rejection, RejectionKind};
use crate::response::{ResponseBody, UpstreamOutcome};
use crate::socket::{CloseReason, SocketLease, has_token};

/// How long the relay waits for the other end's close frame after sending its own.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The limits of every socket one [`Forward`](super::Forward) relays.
#[derive(Debug, Clone, Copy)]
pub(super) struct SocketLimits {
    pub(super) idle: Duration,
    pub(super) lifetime: Duration,
    pub(super) max_message: usize,
}

impl Default for SocketLimits {
    fn default() -> Self {
        SocketLimits {
            idle: Duration::from_secs(300),
            lifetime: Duration::from_secs(3600),
            max_message: 16 << 20,
        }
    }
}

type Answer = Response<ResponseBody<UpstreamBody>>;

/// Forwards the upgrade request `parts` (hop-by-hop headers already dropped, origin-form
/// URI) and, when the upstream switches protocols, relays the two sockets on a task of its
/// own.
pub(super) async fn open(
    inner: Arc<Inner>,
    mut parts: Parts,
    body: OutBody,
    request_id: Option<http::HeaderValue>,
) -> Answer {
    let started = Instant::now();
    let Some(client) = parts.extensions.remove::<OnUpgrade>() else {
        // A server that cannot hand its connection over (HTTP/2, or no upgrade support):
        // nothing is sent upstream.
        tracing::info!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, "WebSocket refused: this server connection cannot be upgraded");
        let rejection = Rejection::new(
            RejectionKind::InvalidRequest,
            "This connection cannot be upgraded to a WebSocket; send the upgrade over HTTP/1.1.",
        );
        return rejection
            .to_response(&parts.headers)
            .map(ResponseBody::full);
    };
    let lease = parts.extensions.remove::<SocketLease>().unwrap_or_default();
    set_websocket_upgrade(&mut parts.headers);
    parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    parts.headers.insert(header::HOST, inner.host.clone());
    let offered = offered_protocols(&parts.headers);
    let request = Request::from_parts(parts, body);
    let elapsed = || Some(started.elapsed());

    let exchange = async {
        let mut send = connect(&inner).await.map_err(|error| (true, error))?;
        send.send_request(request)
            .await
            .map_err(|e| (false, e.to_string()))
    };
    let answer = match inner.response_timeout {
        Some(limit) => tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| limit),
        None => Ok(exchange.await),
    };
    let mut response = match answer {
        Ok(Ok(response)) => response,
        Ok(Err((connect, error))) => {
            tracing::warn!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, request_id = shown(&request_id), %error, "WebSocket upgrade failed upstream");
            let message = if connect {
                "The upstream could not be reached."
            } else {
                "The upstream failed to answer."
            };
            return failure(
                Rejection::new(
                    RejectionKind::UpstreamUnreachable,
                    with_request_id(message, shown(&request_id)),
                ),
                elapsed(),
            );
        }
        Err(limit) => {
            tracing::warn!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, request_id = shown(&request_id), timeout = ?limit, "upstream timed out answering a WebSocket upgrade");
            return failure(
                Rejection::new(
                    RejectionKind::UpstreamTimeout,
                    with_request_id("The upstream did not answer in time.", shown(&request_id)),
                ),
                elapsed(),
            );
        }
    };
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Refused upstream: its answer, as any other. The lease goes with the request.
        tracing::debug!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, status = status.as_u16(), "WebSocket upgrade refused by the upstream");
        drop_hop_by_hop(response.headers_mut(), true);
        response
            .extensions_mut()
            .insert(UpstreamOutcome::answered(status, elapsed()));
        return response.map(|body| ResponseBody::inner(UpstreamBody::plain(body)));
    }
    if let Err(why) = check_switch(response.headers(), &offered) {
        tracing::warn!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, request_id = shown(&request_id), why, "WebSocket upgrade refused: the upstream's 101 does not fit the request");
        return failure(
            Rejection::new(
                RejectionKind::UpstreamUnreachable,
                with_request_id("The upstream failed to answer.", shown(&request_id)),
            ),
            elapsed(),
        );
    }
    let upstream = hyper::upgrade::on(&mut response);
    let (mut head, _) = response.into_parts();
    drop_hop_by_hop(&mut head.headers, true);
    set_websocket_upgrade(&mut head.headers);
    head.extensions = http::Extensions::new();
    head.extensions
        .insert(UpstreamOutcome::answered(status, elapsed()));
    tracing::debug!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, "WebSocket upgraded upstream");
    tokio::spawn(relay(client, upstream, lease, inner.clone()));
    Response::from_parts(head, ResponseBody::full(Bytes::new()))
}

/// A fresh HTTP/1.1 connection to the upstream (over TLS for `https`, no `h2` offered in ALPN),
/// driven by a task of its own that hands it over once upgraded.
async fn connect(
    inner: &Inner,
) -> Result<hyper::client::conn::http1::SendRequest<OutBody>, String> {
    let mut connector = inner.sockets.clone();
    let target = http::Uri::builder()
        .scheme(inner.scheme.clone())
        .authority(inner.authority.clone())
        .path_and_query("/")
        .build()
        .expect("a scheme and an authority make a URI");
    let connecting = async {
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| e.to_string())?;
        connector.call(target).await.map_err(|e| e.to_string())
    };
    let io = match inner.connect_timeout {
        Some(limit) => tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| format!("cannot connect: timed out after {limit:?}"))?,
        None => connecting.await,
    }
    .map_err(|e| format!("cannot connect: {e}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// The subprotocols a request offers, in order.
fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Why an upstream's `101` cannot be relayed, if it cannot.
fn check_switch(headers: &HeaderMap, offered: &[String]) -> Result<(), &'static str> {
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return Err("no Upgrade: websocket");
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err("an extension the request did not offer");
    }
    let mut selected = headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter();
    match (selected.next(), selected.next()) {
        (None, _) => Ok(()),
        (Some(one), None) => {
            let one = one.to_str().map(str::trim).unwrap_or_default();
            if offered.iter().any(|p| p == one) {
                Ok(())
            } else {
                Err("a subprotocol the request did not offer")
            }
        }
        (Some(_), Some(_)) => Err("more than one subprotocol"),
    }
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// What woke the relay loop.
enum Event {
    Read(Side, Option<Result<Message, WsError>>),
    Cut(CloseReason),
}

/// How the relay loop ended.
enum Ended {
    /// This side sent a close frame (forwarded to the other).
    Closed(Side, Option<CloseFrame>),
    /// This side's connection ended or failed without a close frame.
    Lost(Side, Option<WsError>),
    /// This side sent a message larger than the limit.
    TooBig(Side),
    /// A limit or a [`SocketLease`] close.
    Cut(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

fn config(limits: &SocketLimits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_message))
}

/// Relays the two sockets once both are upgraded; the lease is held until the end.
async fn relay(client: OnUpgrade, upstream: OnUpgrade, lease: SocketLease, inner: Arc<Inner>) {
    let limits = inner.socket_limits;
    let (client, upstream) = match futures_util::future::try_join(client, upstream).await {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, %error, "WebSocket not relayed: an upgrade did not complete");
            return;
        }
    };
    let config = config(&limits);
    let mut client =
        WebSocketStream::from_raw_socket(TokioIo::new(client), Role::Server, Some(config)).await;
    let mut upstream =
        WebSocketStream::from_raw_socket(TokioIo::new(upstream), Role::Client, Some(config)).await;
    let opened = Instant::now();
    tracing::info!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, "WebSocket open");
    let (mut to_upstream, mut to_client) = (0u64, 0u64);

    let mut idle = std::pin::pin!(tokio::time::sleep(limits.idle));
    let mut lifetime = std::pin::pin!(tokio::time::sleep(limits.lifetime));
    // Which side is read first next time: they take turns, so that a side that never
    // stops sending cannot starve the other.
    let mut client_first = true;
    let ended = loop {
        let event = std::future::poll_fn(|cx: &mut Context<'_>| {
            client_first = !client_first;
            let sides = if client_first {
                [Side::Client, Side::Upstream]
            } else {
                [Side::Upstream, Side::Client]
            };
            for side in sides {
                let socket = match side {
                    Side::Client => &mut client,
                    Side::Upstream => &mut upstream,
                };
                if let Poll::Ready(message) = socket.poll_next_unpin(cx) {
                    return Poll::Ready(Event::Read(side, message));
                }
            }
            if idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Cut(CloseReason::going_away("idle timeout")));
            }
            if lifetime.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Cut(CloseReason::going_away(
                    "the socket's lifetime limit was reached",
                )));
            }
            lease.poll_closed(cx).map(Event::Cut)
        })
        .await;
        let (from, message) = match event {
            Event::Read(side, message) => (side, message),
            Event::Cut(reason) => break Ended::Cut(reason),
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + limits.idle);
        let to = match from {
            Side::Client => &mut upstream,
            Side::Upstream => &mut client,
        };
        match pass(message, from, to).await {
            Some(ended) => break ended,
            None if from == Side::Client => to_upstream += 1,
            None => to_client += 1,
        }
    };
    let (to_client_close, to_upstream_close, why) = match ended {
        Ended::Closed(Side::Client, frame) => (None, frame, "client closed".to_owned()),
        Ended::Closed(Side::Upstream, frame) => (frame, None, "upstream closed".to_owned()),
        Ended::Lost(side, error) => {
            let frame = match side {
                Side::Client => frame(&CloseReason::going_away("the client went away")),
                Side::Upstream => frame(&CloseReason::internal("the upstream connection was lost")),
            };
            let why = match error {
                Some(error) => format!("{} failed: {error}", side.name()),
                None => format!("{} connection ended", side.name()),
            };
            match side {
                Side::Client => (None, frame, why),
                Side::Upstream => (frame, None, why),
            }
        }
        Ended::TooBig(side) => {
            let reason =
                CloseReason::too_big(format!("message larger than {} bytes", limits.max_message));
            (
                frame(&reason),
                frame(&reason),
                format!("{} sent a message too big", side.name()),
            )
        }
        Ended::Cut(reason) => (frame(&reason), frame(&reason), reason.to_string()),
    };
    futures_util::future::join(
        finish(&mut client, to_client_close),
        finish(&mut upstream, to_upstream_close),
    )
    .await;
    tracing::info!(target: "tower_gateway_auth::proxy", upstream = %inner.authority, why, to_upstream, to_client, open_for = ?opened.elapsed(), "WebSocket closed");
    drop(lease);
}

/// Passes one read from `from` on to `to`: `None` to go on, or how the relay ends.
async fn pass(
    message: Option<Result<Message, WsError>>,
    from: Side,
    to: &mut Socket,
) -> Option<Ended> {
    match message {
        Some(Ok(Message::Close(frame))) => Some(Ended::Closed(from, frame)),
        // Answered (pings) or taken (pongs) on their own hop.
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
        Some(Ok(message)) => match to.send(message).await {
            Ok(()) => None,
            Err(error) => Some(Ended::Lost(other(from), Some(error))),
        },
        Some(Err(WsError::Capacity(_))) => Some(Ended::TooBig(from)),
        Some(Err(error)) => Some(Ended::Lost(from, Some(error))),
        None => Some(Ended::Lost(from, None)),
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    }
}

fn frame(reason: &CloseReason) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.reason().to_owned().into(),
    })
}

/// Sends `close` (or, when the other end closed first, the reply already queued) and waits
/// up to [`CLOSE_WAIT`] for the end of the connection.
async fn finish(socket: &mut Socket, close: Option<CloseFrame>) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let _ = socket.close(close).await;
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_switch_must_fit_the_offer() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let offered = vec!["realtime".to_owned()];
        assert_eq!(check_switch(&h, &offered), Ok(()));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
        assert_eq!(check_switch(&h, &offered), Ok(()));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("other"),
        );
        assert!(check_switch(&h, &offered).is_err());
        h.remove(header::SEC_WEBSOCKET_PROTOCOL);
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        assert!(check_switch(&h, &offered).is_err());
        h.remove(header::SEC_WEBSOCKET_EXTENSIONS);
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(check_switch(&h, &offered).is_err());
    }

    #[test]
    fn offers_are_read_in_order() {
        let mut h = HeaderMap::new();
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime , openai-beta.realtime-v1"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("x"),
        );
        assert_eq!(
            offered_protocols(&h),
            ["realtime", "openai-beta.realtime-v1", "x"]
        );
    }
}
