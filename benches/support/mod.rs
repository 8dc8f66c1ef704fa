//! What the benches share: an inner service as cheap as a service can be, and a way to drive
//! a request through a stack that answers without waiting.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use tower::Service;

/// The inner service: answers at once, as cheaply as a service can (an empty body, which
/// the access log needs to be a `Body`; any request body, which the layers wrap).
#[derive(Clone, Copy)]
pub struct Bare;

impl<B> Service<Request<B>> for Bare {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Empty<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        black_box(&req);
        ready(Ok(Response::new(Empty::new())))
    }
}

/// Polls a future that must be ready at once.
pub fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the benchmarked code did not complete synchronously"),
    }
}

/// Drives one request through `svc` and returns the status.
pub fn serve<S, B>(svc: &mut S, req: Request<()>) -> http::StatusCode
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    now(std::future::poll_fn(|cx| svc.poll_ready(cx))).unwrap();
    now(svc.call(req)).unwrap().status()
}
