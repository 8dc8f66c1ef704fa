//! Instructions per request of the stacks `benches/overhead.rs` times, for callgrind:
//! `scripts/instructions.sh` runs `instructions MODE N` for each mode and subtracts `bare`.
//! Instruction counts are the same run after run whatever else the machine does, so two
//! versions can be compared where criterion's times are too noisy to tell them apart.
//!
//! Modes: `bare` (the inner service alone), `inbound`, `full` (inbound, upstream, inject) and
//! `route` (`full` inside the gateway's `RejectionLayer`), over 10,000 keys.
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use tower::{Layer, Service, ServiceBuilder};
use tower_gateway_auth::inject::RequestId;
use tower_gateway_auth::keys::{KeyFormat, KeyHasher, KeyId, KeyRecord};
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::upstream::{Credential, Provider};
use tower_gateway_auth::{
    HeaderInjectLayer, InboundApiKeyLayer, RejectionLayer, UpstreamAuthLayer,
};

#[derive(Clone, Copy)]
struct Bare;
impl Service<Request<()>> for Bare {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<()>) -> Self::Future {
        black_box(&req);
        ready(Ok(Response::new(())))
    }
}
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("not synchronous"),
    }
}
fn serve<S, B>(svc: &mut S, req: Request<()>) -> http::StatusCode
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    now(std::future::poll_fn(|cx| svc.poll_ready(cx))).unwrap();
    now(svc.call(req)).unwrap().status()
}
fn run<S, B>(mut svc: S, requests: &[(Uri, HeaderMap)], n: usize)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        let (uri, headers) = &requests[i % requests.len()];
        let mut req = Request::new(());
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        assert_eq!(serve(&mut svc, req), 200);
    }
}
fn main() {
    let mode = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let format = KeyFormat::new("gw").unwrap();
    let store = std::sync::Arc::new(MemoryStore::new());
    let hasher = KeyHasher::sha256();
    let uri: Uri = "/v1/chat/completions".parse().unwrap();
    let requests: Vec<(Uri, HeaderMap)> = (0..10_000)
        .map(|i| {
            let key = format.generate().expose().to_owned();
            store.insert(
                KeyRecord::new(KeyId::random(), hasher.digest(key.as_bytes()))
                    .with_name(format!("active-{i}")),
            );
            let mut headers = HeaderMap::new();
            headers.insert(
                AUTHORIZATION,
                HeaderValue::try_from(format!("Bearer {key}")).unwrap(),
            );
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            (uri.clone(), headers)
        })
        .collect();
    let inbound = InboundApiKeyLayer::from_shared(store.clone());
    let upstream = UpstreamAuthLayer::new(
        Provider::openai(),
        Credential::new("sk-upstream-credential").unwrap(),
    )
    .strip_inbound(&inbound);
    let inject = HeaderInjectLayer::new()
        .request_id(RequestId::new())
        .overwrite(
            HeaderName::from_static("openai-organization"),
            HeaderValue::from_static("org-bench"),
        );
    let stack = ServiceBuilder::new()
        .layer(inbound.clone())
        .layer(upstream)
        .layer(inject)
        .service(Bare);
    match mode.as_str() {
        "bare" => run(Bare, &requests, n),
        "inbound" => run(inbound.layer(Bare), &requests, n),
        "full" => run(stack, &requests, n),
        "route" => run(
            RejectionLayer::new().realm("gateway").layer(stack),
            &requests,
            n,
        ),
        _ => panic!("mode"),
    }
}
