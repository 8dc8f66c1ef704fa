//! Hop-by-hop headers (RFC 9110 §7.6.1): the ones that describe one connection, not the
//! message, and so must not be forwarded.
//!
//! A client's `Connection` header may name any header as hop-by-hop, `Authorization`
//! included. Honoring that list at the proxy, after the layers ran, would let a client delete
//! what the layers set (the provider credential, the billed organization, the request id).
//! So the client's list is honored on entry, by [`StripHopByHopLayer`], before any layer
//! runs; [`Forward`](super::Forward) then drops only the fixed hop-by-hop names from a request.
//!
//! A WebSocket upgrade ([`is_websocket_upgrade`](crate::socket::is_websocket_upgrade)) is
//! the one request whose `Connection: upgrade` and `Upgrade: websocket` must reach the next
//! hop. They are not kept from the client: like every hop-by-hop header they are dropped
//! (and the other headers the client's `Connection` names with them), and then set again,
//! exactly those two values, by this layer and by `Forward`. So keeping the upgrade reopens
//! nothing: a client still cannot name away a header a layer sets.

use std::task::{Context, Poll};

use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tower_layer::Layer;
use tower_service::Service;

/// Headers that are hop-by-hop whatever `Connection` says. (A `static`: a `const` array
/// would be built and dropped at every use.)
static FIXED: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Drops the fixed hop-by-hop headers, `TE` unless it is `trailers` (how gRPC says it wants
/// trailers), and, with `named`, the headers the `Connection` header lists.
pub(super) fn drop_hop_by_hop(headers: &mut HeaderMap, named: bool) {
    let te_is_trailers = headers
        .get(header::TE)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !named || !headers.contains_key(header::CONNECTION) {
        // Usually there are none: one pass over the names says so (see `remove_headers::remove_all`).
        crate::remove_headers::remove_all(headers, &FIXED);
    } else {
        // Taken out first, so that the names can be removed while read; a single value
        // (nearly every message: `keep-alive` or `close`) without building a list.
        let mut connection = headers.get_all(header::CONNECTION).iter();
        let several = connection.next().is_some() && connection.next().is_some();
        if several {
            let listed: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            for value in &listed {
                remove_listed(headers, value);
            }
        } else if let Some(value) = headers.remove(header::CONNECTION) {
            remove_listed(headers, &value);
        }
        crate::remove_headers::remove_all(headers, &FIXED);
    }
    if !te_is_trailers {
        headers.remove(header::TE);
    }
}

/// Removes the headers a `Connection` value names (a name that is not a header name names
/// nothing).
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(listed) = connection.to_str() else {
        return;
    };
    for name in listed.split(',') {
        headers.remove(name.trim());
    }
}

/// Sets the two headers of a WebSocket upgrade on a request whose hop-by-hop headers were
/// dropped: `Connection: upgrade` and `Upgrade: websocket`, whatever the client spelled.
pub(super) fn set_websocket_upgrade(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// A layer that removes hop-by-hop headers on entry: `Connection`, every header it names,
/// and the fixed ones (`Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`, `TE` other
/// than `trailers`, `Trailer`, `Transfer-Encoding`, `Upgrade`).
///
/// Place it outermost, before the inbound layer: the headers a client names in `Connection`
/// are then gone before any layer looks at the request, and nothing a layer sets later can
/// be removed by the client's list. [`Forward`](super::Forward) no longer reads `Connection`
/// on requests, so without this layer the headers a client names there are forwarded.
///
/// A WebSocket upgrade keeps its upgrade: it leaves with exactly `Connection: upgrade` and
/// `Upgrade: websocket` (set here, not the client's values), and the other headers its
/// `Connection` named are gone as for any request. Other upgrades (`h2c`, …) are dropped.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::proxy::StripHopByHopLayer;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(StripHopByHopLayer::new())
///     // .layer(inbound).layer(upstream).layer(inject)
///     .service_fn(|req: Request<()>| async move {
///         assert!(req.headers().get("x-next-hop-only").is_none());
///         assert!(req.headers().get("connection").is_none());
///         assert_eq!(req.headers()["x-end-to-end"], "kept");
///         Ok::<_, Infallible>(Response::new(()))
///     });
/// let req = Request::get("/v1/models")
///     .header("connection", "keep-alive, x-next-hop-only")
///     .header("x-next-hop-only", "1")
///     .header("x-end-to-end", "kept")
///     .body(())
///     .unwrap();
/// service.oneshot(req).await.unwrap();
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct StripHopByHopLayer {
    _private: (),
}

impl StripHopByHopLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for StripHopByHopLayer {
    type Service = StripHopByHop<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StripHopByHop { inner }
    }
}

/// The service [`StripHopByHopLayer`] wraps around an inner service.
#[derive(Debug, Clone)]
pub struct StripHopByHop<S> {
    inner: S,
}

impl<S> StripHopByHop<S> {
    define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for StripHopByHop<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let websocket = crate::socket::is_websocket_upgrade(&req);
        drop_hop_by_hop(req.headers_mut(), true);
        if websocket {
            set_websocket_upgrade(req.headers_mut());
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn on_entry_the_named_headers_go_too() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("connection", "Authorization"),
            ("x-private", "1"),
            ("authorization", "Bearer client"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "1"),
        ]);
        drop_hop_by_hop(&mut h, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    /// One `Connection` value (the usual case, taken without building a list): names in
    /// any case and spacing go, empty entries and non-names name nothing.
    #[test]
    fn a_single_connection_value_names_its_headers() {
        let mut h = headers(&[
            ("connection", " X-Private ,, not a name, close,Keep-Alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "1"),
        ]);
        drop_hop_by_hop(&mut h, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let mut h = headers(&[("connection", "é"), ("x-kept", "1")]);
        drop_hop_by_hop(&mut h, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn a_websocket_upgrade_keeps_exactly_its_upgrade() {
        use tower::ServiceExt;
        let service =
            StripHopByHopLayer::new().layer(tower::service_fn(|req: Request<()>| async move {
                Ok::<_, std::convert::Infallible>(req)
            }));
        let req = Request::get("/v1/realtime")
            .header(
                "connection",
                "keep-alive, Upgrade, authorization, x-private",
            )
            .header("upgrade", "WebSocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("authorization", "Bearer client")
            .header("x-private", "1")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        let seen = futures_executor(service.oneshot(req)).unwrap();
        let mut left: Vec<_> = seen
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "connection: upgrade",
                "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
                "upgrade: websocket",
                "x-kept: 1"
            ]
        );
        // Not a WebSocket upgrade (no key): the upgrade goes like any hop-by-hop header.
        let req = Request::get("/")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let seen = futures_executor(
            StripHopByHopLayer::new()
                .layer(tower::service_fn(|req: Request<()>| async move {
                    Ok::<_, std::convert::Infallible>(req)
                }))
                .oneshot(req),
        )
        .unwrap();
        assert!(seen.headers().is_empty());
    }

    fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn at_the_proxy_only_the_fixed_names_go() {
        let mut h = headers(&[
            ("connection", "authorization, x-request-id"),
            ("authorization", "Bearer provider"),
            ("x-request-id", "req-1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
        ]);
        drop_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "te", "x-request-id"]);
    }
}
