//! [`RejectionLayer`]: the one place a stack's rejections get their dialect and realm.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{ErrorFormat, Realm, Rejection, is_grpc};
use crate::response::ResponseBody;

/// Renders every [`Rejection`] that the layers inside it (and the service at the bottom)
/// answer with in one dialect and realm: set them here, once per route.
///
/// A layer that refuses a request answers with the rejection rendered in the default
/// dialect and the rejection itself in the response's extensions; on the way out this layer
/// renders it again with its own [`ErrorFormat`] and [`Realm`], keeping the status, the
/// other headers (rate-limit headers, a request id …) and the rejection in the extensions.
/// Responses without a rejection, and gRPC statuses (which have no dialect), pass as they
/// are, so the happy path costs one look into empty response extensions.
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::{InboundApiKeyLayer, Rejection, RejectionLayer};
/// use tower_gateway_auth::rejection::ErrorFormat;
/// use tower_gateway_auth::store::MemoryStore;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(RejectionLayer::new().error_format(ErrorFormat::Anthropic).realm("gateway"))
///     .layer(InboundApiKeyLayer::new(MemoryStore::new()))
///     .service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     });
/// let refused = service.oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(refused.status(), 401);
/// assert_eq!(refused.headers()["www-authenticate"], "Bearer realm=\"gateway\"");
/// let why = refused.extensions().get::<Rejection>().unwrap();
/// assert_eq!(why.code(), "missing_api_key");
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct RejectionLayer {
    responder: Arc<Responder>,
}

#[derive(Debug, Clone, Default)]
struct Responder {
    format: ErrorFormat,
    realm: Realm,
}

impl RejectionLayer {
    /// OpenAI-style bodies and realm `api`, the defaults every layer renders in anyway.
    pub fn new() -> Self {
        Self::default()
    }

    /// The dialect of rejection bodies (default: OpenAI).
    pub fn error_format(mut self, format: ErrorFormat) -> Self {
        Arc::make_mut(&mut self.responder).format = format;
        self
    }

    /// The realm in `WWW-Authenticate` (default: `api`).
    pub fn realm(mut self, realm: &str) -> Self {
        Arc::make_mut(&mut self.responder).realm = Realm::new(realm);
        self
    }

    /// The dialect set.
    pub fn format(&self) -> &ErrorFormat {
        &self.responder.format
    }

    /// `rejection` as this layer renders it, for a request with `request_headers`: for
    /// refusals made outside any layer (a router's 404, a server's 408).
    pub fn render(
        &self,
        rejection: &Rejection,
        request_headers: &http::HeaderMap,
    ) -> Response<bytes::Bytes> {
        self.responder
            .format
            .respond(rejection, &self.responder.realm, request_headers)
    }
}

impl<S> Layer<S> for RejectionLayer {
    type Service = Rejections<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rejections {
            inner,
            responder: self.responder.clone(),
        }
    }
}

/// The service [`RejectionLayer`] wraps around the stack.
#[derive(Debug, Clone)]
pub struct Rejections<S> {
    inner: S,
    responder: Arc<Responder>,
}

impl<S> Rejections<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Rejections<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = RejectionResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        RejectionResponse {
            future: self.inner.call(req),
            responder: self.responder.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`Rejections`].
    pub struct RejectionResponse<F> {
        #[pin]
        future: F,
        responder: Arc<Responder>,
    }
}

impl<F> std::fmt::Debug for RejectionResponse<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectionResponse").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for RejectionResponse<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let rejection = match response.extensions().get::<Rejection>() {
            Some(rejection) if !is_grpc(response.headers()) => rejection.clone(),
            _ => return Poll::Ready(Ok(response.map(ResponseBody::inner))),
        };
        let (mut parts, _default_body) = response.into_parts();
        let rendered = this.responder.format.respond(
            &rejection,
            &this.responder.realm,
            &http::HeaderMap::new(),
        );
        let (mut fresh, body) = rendered.into_parts();
        // What the default rendering wrote goes; whatever else the layers set stays.
        for name in [CONTENT_TYPE, CONTENT_LENGTH, WWW_AUTHENTICATE] {
            parts.headers.remove(name);
        }
        for name in parts.headers.keys() {
            if !fresh.headers.contains_key(name) {
                for value in parts.headers.get_all(name) {
                    fresh.headers.append(name.clone(), value.clone());
                }
            }
        }
        fresh.extensions.extend(parts.extensions);
        Poll::Ready(Ok(Response::from_parts(fresh, ResponseBody::full(body))))
    }
}
