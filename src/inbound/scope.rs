//! [`RequireScopesLayer`]: per-route scope requirements on top of [`InboundApiKeyLayer`].
//!
//! [`InboundApiKeyLayer`]: super::InboundApiKeyLayer

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::identity::Identity;
use crate::keys::Scopes;
use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;
use crate::response::ResponseFuture;

/// Requires the [`Identity`] put in place by
/// [`InboundApiKeyLayer`](super::InboundApiKeyLayer) to hold every one of some scopes: a key
/// lacking one gets 403 `insufficient_scope`, a request with no identity 401.
///
/// Put it on the routes that need it, inside the inbound layer, so each key is verified once.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_gateway_auth::{InboundApiKeyLayer, RequireScopesLayer};
/// use tower_gateway_auth::store::MemoryStore;
///
/// let app: Router = Router::new()
///     .route("/v1/chat/completions", post(|| async { "ok" }))
///     .route_layer(RequireScopesLayer::new(["openai"]))
///     .layer(InboundApiKeyLayer::new(MemoryStore::new()));
/// ```
#[derive(Debug, Clone)]
pub struct RequireScopesLayer {
    // Shared: the service is cloned per request by routers and hyper.
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    scopes: Scopes,
    refuse_ephemeral: bool,
}

impl RequireScopesLayer {
    /// Requires every scope in `scopes`.
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RequireScopesLayer {
            config: Arc::new(Config {
                scopes: Scopes::new(scopes),
                refuse_ephemeral: false,
            }),
        }
    }

    /// Refuses ephemeral keys (those minted from another key) here with 403, whatever
    /// scopes they hold (default: no). The management API uses this for its admin routes.
    pub fn refuse_ephemeral(mut self, refuse: bool) -> Self {
        Arc::make_mut(&mut self.config).refuse_ephemeral = refuse;
        self
    }
}

impl<S> Layer<S> for RequireScopesLayer {
    type Service = RequireScopes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopes {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RequireScopesLayer`] wraps around an inner service.
#[derive(Debug, Clone)]
pub struct RequireScopes<S> {
    inner: S,
    layer: RequireScopesLayer,
}

impl<S> RequireScopes<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireScopes<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.layer.config;
        let rejection = match req.extensions().get::<Identity>() {
            Some(who) if config.refuse_ephemeral && who.parent().is_some() => {
                tracing::info!(target: "tower_gateway_auth::inbound", key_id = %who.id(), reason = "ephemeral_key", "API key rejected");
                Rejection::new(
                    RejectionKind::InsufficientScope,
                    "Ephemeral keys cannot use this endpoint.",
                )
            }
            Some(who) if config.scopes.is_subset_of(who.scopes()) => {
                return ResponseFuture::inner(self.inner.call(req));
            }
            Some(who) => {
                tracing::info!(target: "tower_gateway_auth::inbound", key_id = %who.id(), reason = "insufficient_scope", "API key rejected");
                Rejection::insufficient_scope(self.layer.config.scopes.iter())
            }
            None => {
                tracing::info!(target: "tower_gateway_auth::inbound", reason = "missing_api_key", "request rejected");
                Rejection::new(
                    RejectionKind::MissingKey,
                    "This endpoint requires an API key.",
                )
            }
        };
        let response = rejection.to_response(req.headers());
        ResponseFuture::rejected(response)
    }
}
