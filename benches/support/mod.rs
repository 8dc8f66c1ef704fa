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

/// The headers of a chat request an SDK sends with `key` as its Bearer token, on
/// `/v1/chat/completions`.
pub fn bearer_request(key: &str) -> (http::Uri, http::HeaderMap) {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::try_from(format!("Bearer {key}")).unwrap(),
    );
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    ("/v1/chat/completions".parse().unwrap(), headers)
}

/// The floor's digests: the key check's unavoidable work when keys are hashed at rest is
/// SHA-256 of the presented key and one lookup by digest, here in a plain `HashMap`.
pub type FloorMap = std::collections::HashMap<[u8; 32], u32>;

/// The floor's work for one request: the bearer key read, hashed and looked up. Both the
/// overhead bench's `floor` and the instruction count's use it, so they measure one thing.
#[inline]
pub fn floor_check(map: &FloorMap, req: &Request<()>) {
    use sha2::{Digest, Sha256};
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .unwrap()
        .as_bytes();
    let key = header.strip_prefix(b"Bearer ").unwrap();
    let digest: [u8; 32] = Sha256::digest(key).into();
    black_box(map.get(&digest)).expect("every active key is in the map");
}

/// A fresh request, cycling over the pre-built ones (built outside the measurement).
pub fn next(requests: &[(http::Uri, http::HeaderMap)], i: &mut usize) -> Request<()> {
    let (uri, headers) = &requests[*i % requests.len()];
    *i += 1;
    let mut req = Request::new(());
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}

/// The reference gateway's route stack on `store`, around `Bare`: the inbound layer, then
/// `UpstreamAuthLayer` (OpenAI preset, a fixed credential), then `HeaderInjectLayer` (a
/// request id, echoed on the response as the gateway does, and an organization header). One
/// definition, so that every bench and the instruction count measure the same stack.
pub fn full_stack<K>(
    store: std::sync::Arc<K>,
) -> impl Service<Request<()>, Response = Response<impl http_body::Body>, Error = Infallible> + Clone
where
    K: tower_gateway_auth::store::KeyStore,
{
    full_stack_echoing(store, true)
}

/// [`full_stack`], with the request id echoed on the response or not. Without the echo it
/// is the stack 5e8137a's bench measured (it could not echo): the before-and-after of
/// issue 12 compares the two on the same job.
pub fn full_stack_echoing<K>(
    store: std::sync::Arc<K>,
    echo: bool,
) -> impl Service<Request<()>, Response = Response<impl http_body::Body>, Error = Infallible> + Clone
where
    K: tower_gateway_auth::store::KeyStore,
{
    use tower::ServiceBuilder;
    use tower_gateway_auth::inject::RequestId;
    use tower_gateway_auth::upstream::{Credential, Provider};
    use tower_gateway_auth::{HeaderInjectLayer, InboundApiKeyLayer, UpstreamAuthLayer};

    let inbound = InboundApiKeyLayer::from_shared(store);
    let upstream = UpstreamAuthLayer::new(
        Provider::openai(),
        Credential::new("sk-upstream-credential").unwrap(),
    )
    .strip_inbound(&inbound);
    let inject = HeaderInjectLayer::new()
        .request_id(RequestId::new().echo(echo))
        .overwrite(
            http::HeaderName::from_static("openai-organization"),
            http::HeaderValue::from_static("org-bench"),
        );
    ServiceBuilder::new()
        .layer(inbound)
        .layer(upstream)
        .layer(inject)
        .service(Bare)
}

/// tower-http's own layers doing `full_stack`'s header work after the key check, around
/// `Bare`: `authorization` overridden with the provider credential, `openai-organization`
/// set, a UUID request id set and propagated to the response. The peer the rest of the
/// stack is measured against (`full_stack − inbound_1m` against this one `− bare`).
pub fn tower_http_same_job()
-> impl Service<Request<()>, Response = Response<impl http_body::Body>, Error = Infallible> + Clone
{
    use http::{HeaderName, HeaderValue};
    use tower::ServiceBuilder;
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::set_header::SetRequestHeaderLayer;

    let mut credential = HeaderValue::from_static("Bearer sk-upstream-credential");
    credential.set_sensitive(true);
    let request_id = HeaderName::from_static("x-request-id");
    ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(
            http::header::AUTHORIZATION,
            credential,
        ))
        .layer(SetRequestHeaderLayer::overriding(
            HeaderName::from_static("openai-organization"),
            HeaderValue::from_static("org-bench"),
        ))
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(request_id))
        .service(Bare)
}

/// A throwaway `redis-server` on a free port, unless `REDIS_URL` points to one.
pub fn redis() -> Option<(String, Option<std::process::Child>)> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some((url, None));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((format!("redis://127.0.0.1:{port}"), Some(child)));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}
