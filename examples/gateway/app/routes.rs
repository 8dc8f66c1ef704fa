//! The gateway's front door: a request goes to the route whose prefix its path starts with
//! (the longest such prefix), with that prefix stripped, as axum's `nest_service` would do;
//! anything else (the management API, unknown paths) goes to an axum `Router`.
//!
//! A path with a dot segment (`..`, `.`, raw or percent-encoded) is refused with 400 before
//! any of that, in the dialect of the route its raw path names (else the gateway's): once
//! resolved it would reach another route, or a path outside the route's upstream base,
//! with this route's credential. `Forward` refuses them too; this answers first, in the
//! client's dialect.
//!
//! Every route's stack is of one type, so the table holds them as they are: dispatching is
//! a prefix comparison and a clone of reference-counted handles. Going through axum's
//! router instead (a boxed service per route, cloned per request, and the nest's own URI
//! rewrite) cost about 0.7 µs a request under load, most of the gateway's own work beside
//! the key check.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::body::Body;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use pin_project_lite::pin_project;
use tower::Service;
use tower_gateway_auth::proxy::has_dot_segment;
use tower_gateway_auth::rejection::RejectionKind;
use tower_gateway_auth::{Rejection, RejectionLayer};

use super::ready::{CallNow, call_now};

/// The routes and the router for everything else; cheap to clone (hyper clones the service
/// it is given once per request).
pub struct Routes<S> {
    table: Arc<Table<S>>,
}

struct Table<S> {
    /// Longest prefix first, so that `/v1/beta` wins over `/v1`.
    routes: Vec<Route<S>>,
    other: Router,
    /// The dialect and realm of a refusal no route speaks for.
    responder: RejectionLayer,
}

/// One route: its prefix (`/name`, no trailing slash), dialect and stack.
pub struct Route<S> {
    pub prefix: String,
    /// The route's dialect and realm (also around `stack`).
    pub responder: RejectionLayer,
    pub stack: S,
}

impl<S> Clone for Routes<S> {
    fn clone(&self) -> Self {
        Routes {
            table: self.table.clone(),
        }
    }
}

impl<S> Routes<S> {
    /// `routes`, then `other` for every other path; `responder` for refusals of paths no
    /// route matches.
    pub fn new(mut routes: Vec<Route<S>>, other: Router, responder: RejectionLayer) -> Self {
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        Routes {
            table: Arc::new(Table {
                routes,
                other,
                responder,
            }),
        }
    }
}

impl<S> Table<S> {
    /// The route whose prefix is a whole-segment prefix of `path`.
    fn route(&self, path: &str) -> Option<&Route<S>> {
        self.routes.iter().find(|route| {
            path.strip_prefix(route.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// `uri` without its first `prefix_len` bytes of path: `/v1/chat?x` less `/v1` is `/chat?x`,
/// and `/v1` alone becomes `/`.
fn strip(uri: &Uri, prefix_len: usize) -> Uri {
    let rest = &uri.path()[prefix_len..];
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
        None => PathAndQuery::try_from(path),
    }
    .expect("a part of a valid path is a valid path");
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).expect("a valid URI with a shorter path is valid")
}

impl<S, B> Service<Request<Body>> for Routes<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RoutesFuture<S>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is asked of the chosen service, by `call_now`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let chosen = self.table.route(path);
        if has_dot_segment(path) {
            let responder = chosen.map_or(&self.table.responder, |r| &r.responder);
            tracing::info!(
                prefix = chosen.map(|r| r.prefix.as_str()),
                "request refused: dot segment in the path"
            );
            let rejection = Rejection::new(
                RejectionKind::InvalidPath,
                "The request path must not contain `.` or `..` segments.",
            );
            let response = responder.render(&rejection, req.headers()).map(Body::from);
            return RoutesFuture::Refused {
                response: Some(response),
            };
        }
        match chosen {
            Some(route) => {
                *req.uri_mut() = strip(req.uri(), route.prefix.len());
                RoutesFuture::Route {
                    future: call_now(&mut route.stack.clone(), req),
                }
            }
            None => RoutesFuture::Other {
                future: call_now(&mut self.table.other.clone(), req),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Routes`].
    #[project = RoutesProj]
    pub enum RoutesFuture<S>
    where
        S: Service<Request<Body>>,
    {
        Route { #[pin] future: CallNow<S, Request<Body>> },
        Other { #[pin] future: CallNow<Router, Request<Body>> },
        Refused { response: Option<Response<Body>> },
    }
}

impl<S, B> Future for RoutesFuture<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RoutesProj::Route { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(Body::new)))
            }
            RoutesProj::Other { future } => future.poll(cx),
            RoutesProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("RoutesFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped_with_the_query_kept() {
        let uri: Uri = "/v1/chat/completions?model=x&y".parse().unwrap();
        assert_eq!(strip(&uri, 3), "/chat/completions?model=x&y");
        assert_eq!(strip(&"/v1".parse().unwrap(), 3), "/");
        assert_eq!(strip(&"/v1?q".parse().unwrap(), 3), "/?q");
    }
}
