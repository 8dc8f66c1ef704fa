//! The reference gateway, composed from the crate's layers:
//!
//! ```text
//! client ─► Probes ─► StripHopByHopLayer ─► Routes ─► CorsLayer ─► InboundApiKeyLayer ─► RequireScopesLayer ─► RateLimitLayer ─► ModelAccessLayer ─► UpstreamAuthLayer ─► HeaderInjectLayer ─► Forward ─► provider
//! ```
//!
//! A route with `cors` answers preflights in its `CorsLayer`, before any key is asked for;
//! every route relays WebSockets (`[route.websocket]` sets their limits), the socket's key
//! checked again every `recheck_ms` while it is open.
//!
//! One such stack per `[[route]]`, so that every rejection speaks the route's dialect; the
//! management API at `/admin` sits behind its own inbound layer on the same store. Each
//! route's stack (and the router for everything else, as route `-`) is wrapped in the
//! access log and the metrics layer, outermost, named for the route (`/openai` → `openai`);
//! `telemetry.rs` serves the metrics (`metrics_listen`) and sets up the log (`log_format`).
//! `Probes` answers `/healthz` and `/readyz` before any of them (see `probes.rs`).

pub mod config;
pub mod echo;
pub mod probes;
pub mod ready;
pub mod routes;
pub mod serve;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use tower::ServiceBuilder;
use tower::util::{Either, MapResponseLayer};
use tower_gateway_auth::access_log::{AccessLogLayer, CountingBody};
use tower_gateway_auth::inbound::{DEFAULT_SOCKET_RECHECK, KeySource};
use tower_gateway_auth::inject::RequestId;
use tower_gateway_auth::keys::{
    Actor, ApiKey, AuditEvent, AuditFile, AuditSink, KeyManager, LastUsed, NewKey,
};
use tower_gateway_auth::limit::{
    Limiter, MemoryLimiter, ModelAccessLayer, RateLimitLayer, RedisLimiter,
};
use tower_gateway_auth::metrics::MetricsLayer;
use tower_gateway_auth::proxy::{Forward, StripHopByHopLayer};
use tower_gateway_auth::rejection::{ErrorFormat, RejectionKind};
use tower_gateway_auth::response::ResponseBody;
use tower_gateway_auth::store::listen_for_invalidations;
use tower_gateway_auth::store::{CachedStore, FileStore, KeyAdmin, MemoryStore, RedisStore};
use tower_gateway_auth::upstream::UpstreamAuthLayer;
use tower_gateway_auth::{
    HeaderInjectLayer, InboundApiKeyLayer, ManagementApi, Rejection, RejectionLayer,
    RequireScopesLayer,
};

pub use config::{Config, ConfigError, Plan};
use config::{Keys, LimiterPlan, RouteCredential, Upstream};
pub use probes::Readiness;
pub use serve::{Limits, Serving, serve};
use tower_gateway_auth::jwt::Accept;
use tower_gateway_auth::upstream::{
    ClientCredentials, Credential, CredentialSource, RefreshFuture, RefreshingToken,
};

/// The gateway as one service, whatever its key store.
pub type GatewayService = tower::util::BoxCloneSyncService<
    http::Request<axum::body::Body>,
    http::Response<axum::body::Body>,
    std::convert::Infallible,
>;

/// A gateway ready to serve.
pub struct Gateway {
    /// The whole gateway as one service; [`serve`] it with [`Gateway::serving`] for the
    /// connection limits.
    pub service: GatewayService,
    pub listen: SocketAddr,
    /// The limits on client connections, from `[server]`.
    pub limits: Limits,
    /// The gateway's default dialect and realm, for answers no route speaks for.
    pub responder: RejectionLayer,
    /// The key made at start-up when no keys file is configured (shown once).
    pub first_key: Option<ApiKey>,
    /// The built-in echo upstream's address, when a route uses it.
    pub echo: Option<SocketAddr>,
    /// What `/readyz` answers; [`serve`] marks it at shutdown.
    pub readiness: Readiness,
    /// Where `GET /metrics` is served, when `metrics_listen` is set.
    pub metrics: Option<SocketAddr>,
    /// When each key was last used, noted by every inbound layer; flush it at shutdown.
    pub last_used: LastUsed,
    /// Background work (expired ephemeral keys purge) that ends with the gateway.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// What [`serve`] needs: the service, the limits, the dialect.
    pub fn serving(&self) -> Serving {
        Serving {
            service: self.service.clone(),
            limits: self.limits.clone(),
            responder: self.responder.clone(),
            readiness: self.readiness.clone(),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Checks `config` and builds the gateway. Must run inside a tokio runtime.
pub async fn build(
    config: Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Gateway, ConfigError> {
    let plan = config.plan(env)?;
    let failed = |field: &str, e: &dyn std::fmt::Display| ConfigError {
        field: field.into(),
        message: e.to_string(),
    };
    let audit = match &plan.audit_file {
        Some(path) => Some(Arc::new(
            AuditFile::open(path).map_err(|e| failed("audit_file", &e))?,
        )),
        None => None,
    };
    match &plan.keys {
        Keys::File(path) => {
            let store = FileStore::builder(path)
                .hasher(plan.hasher.clone())
                .reload_every(Some(plan.reload))
                .open()
                .map_err(|e| failed("keys_file", &e))?;
            let limiter = Arc::new(MemoryLimiter::new());
            compose(Arc::new(store), limiter, plan, audit, None, None).await
        }
        Keys::Redis { url, namespace } => {
            let redis = RedisStore::builder(url)
                .namespace(namespace)
                .hasher(plan.hasher.clone())
                .connect()
                .await
                .map_err(|e| failed("redis_url", &e))?;
            let store = CachedStore::new(redis);
            // Keys are served only once revocations announced by other replicas reach this
            // one; until then `/readyz` says why not (see `probes.rs`).
            let subscribed = Some(listen_for_invalidations(&store).subscription());
            let store = Arc::new(store);
            match plan.limiter.clone() {
                LimiterPlan::Memory => {
                    let limiter = Arc::new(MemoryLimiter::new());
                    compose(store, limiter, plan, audit, None, subscribed).await
                }
                LimiterPlan::Redis {
                    url,
                    namespace,
                    on_error,
                    timeout,
                    lease,
                } => {
                    let limiter = RedisLimiter::builder(url)
                        .namespace(namespace)
                        .when_unavailable(on_error)
                        .timeout(timeout)
                        .permit_lease(lease)
                        .connect()
                        .await
                        .map_err(|e| failed("limiter", &e))?;
                    compose(store, Arc::new(limiter), plan, audit, None, subscribed).await
                }
            }
        }
        Keys::Memory => {
            let store = Arc::new(MemoryStore::with_hasher(plan.hasher.clone()));
            let scopes = ["admin".to_owned()]
                .into_iter()
                .chain(plan.routes.iter().filter_map(|r| r.scope.clone()));
            let first = key_manager(store.clone(), &plan, &audit)
                .acting_as(Actor::named("gateway"))
                .issue(NewKey::named("first-key").scopes(scopes))
                .await
                .map_err(|e| failed("keys", &e))?;
            let limiter = Arc::new(MemoryLimiter::new());
            compose(store, limiter, plan, audit, Some(first.key), None).await
        }
    }
}

/// The key manager of the management API (and of the demo's first key), writing its audit
/// trail to the log and, when configured, the audit file.
fn key_manager<S: KeyAdmin>(
    store: Arc<S>,
    plan: &Plan,
    audit: &Option<Arc<AuditFile>>,
) -> KeyManager<S> {
    let manager = KeyManager::new(store)
        .key_format(plan.key_format.clone())
        .max_live_ephemeral(plan.max_ephemeral_per_key);
    match audit.clone() {
        Some(file) => manager.audit_to(move |event: &AuditEvent| file.record(event)),
        None => manager,
    }
}

async fn compose<S, L>(
    store: Arc<S>,
    limiter: Arc<L>,
    plan: Plan,
    audit: Option<Arc<AuditFile>>,
    first_key: Option<ApiKey>,
    subscribed: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<Gateway, ConfigError>
where
    S: KeyAdmin,
    L: Limiter,
{
    let manager = key_manager(store.clone(), &plan, &audit);
    let last_used = LastUsed::new(store.clone());
    // Keys only for the management API; a route takes user tokens too when `[jwt]` is set.
    let inbound = |accept: Option<Accept>, sources: &[KeySource], recheck: Duration| {
        let layer = InboundApiKeyLayer::from_shared(store.clone())
            .last_used(&last_used)
            .sources(sources.iter().cloned())
            .key_formats([plan.key_format.clone()])
            .recheck_sockets_every(recheck);
        let layer = match &plan.identity_header {
            Some(name) => layer.identity_header(name.clone()),
            None => layer,
        };
        match (&plan.jwt, accept) {
            (Some(verifier), Some(accept)) => layer.tokens(verifier.clone()).accept(accept),
            _ => layer,
        }
    };
    // Every refusal of a route, whichever layer makes it, in the route's dialect; one realm.
    let responder = |format: &ErrorFormat| {
        RejectionLayer::new()
            .error_format(format.clone())
            .realm("gateway")
    };

    // Outermost of a route: the access log sees the final status and every body byte, the
    // metrics count the outcome whichever layer decided it.
    let telemetry = |route: &str| {
        let metrics = MetricsLayer::new().route(route);
        let metrics = match plan.metrics_key_labels {
            Some(limit) => metrics.per_key_labels(limit),
            None => metrics,
        };
        ServiceBuilder::new()
            .layer(AccessLogLayer::new().route(route))
            .layer(metrics)
    };
    let mut tasks = Vec::new();
    let metrics = match plan.metrics_listen {
        None => None,
        Some(addr) => {
            let handle = telemetry::prometheus().map_err(|e| ConfigError {
                field: "metrics_listen".into(),
                message: e,
            })?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ConfigError {
                    field: "metrics_listen".into(),
                    message: format!("cannot listen on {addr}: {e}"),
                })?;
            let bound = listener.local_addr().map_err(|e| ConfigError {
                field: "metrics_listen".into(),
                message: e.to_string(),
            })?;
            tasks.push(tokio::spawn(telemetry::serve_metrics(listener, handle)));
            Some(bound)
        }
    };

    let mut echo = None;
    // One limiter for every route: a key's allowance is its own, wherever it spends it
    // (each request is judged by the limits of its key, or else of its route).
    let mut routes = Vec::new();
    for route in plan.routes {
        let url = match route.upstream {
            Upstream::Url(url) => url,
            Upstream::Echo => {
                let addr = match echo {
                    Some(addr) => addr,
                    None => {
                        let addr = echo::spawn().await.map_err(|e| ConfigError {
                            field: "echo".into(),
                            message: e.to_string(),
                        })?;
                        echo = Some(addr);
                        addr
                    }
                };
                format!("http://{addr}")
            }
        };
        let forward = Forward::builder(&url)
            .expect("checked by the config")
            .connect_timeout(route.connect_timeout)
            .response_timeout(route.timeout)
            .socket_idle_timeout(route.socket.idle)
            .socket_max_lifetime(route.socket.lifetime)
            .socket_max_message_size(route.socket.max_message)
            .build();
        let inbound = inbound(Some(route.accept), &route.sources, route.socket.recheck);
        // One stack type for every route: without `cors`, a layer that only gives the
        // response the same body type.
        let cors = match route.cors {
            Some(cors) => Either::Left(cors),
            None => Either::Right(MapResponseLayer::new(|response: http::Response<_>| {
                response.map(ResponseBody::inner)
            })),
        };
        let credential = match route.credential {
            RouteCredential::Static(credential) => RouteSource::Static(credential),
            RouteCredential::OAuth2(fetcher) => RouteSource::OAuth2(
                RefreshingToken::builder(*fetcher)
                    .name(route.prefix.trim_start_matches('/').to_owned())
                    .build(),
            ),
        };
        let upstream = UpstreamAuthLayer::new(route.provider, credential).strip_inbound(&inbound);
        let inject = route.headers.into_iter().fold(
            HeaderInjectLayer::new().request_id(
                RequestId::new()
                    .keep_client_id(plan.keep_client_request_id)
                    .echo(true),
            ),
            |layer, (name, value)| layer.overwrite(name, value),
        );
        let scopes = RequireScopesLayer::new(route.scope);
        let rate = RateLimitLayer::shared(limiter.clone()).default_limits(route.limits);
        let models = match route.models {
            Some(list) => ModelAccessLayer::new().default_models(list),
            None => ModelAccessLayer::new(),
        };
        let responder = responder(&route.error_format);
        let stack = ServiceBuilder::new()
            .layer(telemetry(route.prefix.trim_start_matches('/')))
            .layer(responder.clone())
            .layer(cors)
            .layer(inbound)
            .layer(scopes)
            .layer(rate)
            .layer(models)
            .layer(upstream)
            .layer(inject)
            .service(forward);
        routes.push(routes::Route {
            prefix: route.prefix,
            responder,
            stack,
        });
    }

    let mut router = Router::new();
    if let Some(scope) = plan.admin_scope {
        let api = ManagementApi::new(manager.clone())
            .admin_scope(scope)
            .usage_from(limiter.clone());
        // The page loads without a key (it asks for one); the API behind it needs one.
        router = router.merge(api.page("/admin")).nest(
            "/admin",
            api.router()
                .layer(inbound(None, &plan.sources, DEFAULT_SOCKET_RECHECK)),
        );
    }
    let default_responder = responder(&plan.error_format);
    let router = router
        .fallback(|uri: http::Uri| async move {
            Rejection::new(
                RejectionKind::NotFound,
                format!("No route for {}.", uri.path()),
            )
        })
        .layer(default_responder.clone())
        .layer(
            // The router's own services take axum's body: the counted one is turned back.
            telemetry("-").map_request(|req: http::Request<CountingBody<axum::body::Body>>| {
                req.map(axum::body::Body::new)
            }),
        );
    tasks.push(manager.spawn_purge(std::time::Duration::from_secs(60)));
    let readiness = Readiness::new(subscribed);
    // The headers a client names in `Connection` go before any layer runs, so it cannot
    // name away what the layers set (the credential, the organization).
    let routed = ServiceBuilder::new()
        .layer(StripHopByHopLayer::new())
        .service(routes::Routes::new(
            routes,
            router,
            default_responder.clone(),
        ));
    Ok(Gateway {
        // Outermost: a probe is answered before any layer (and any count of refusals) sees it.
        service: GatewayService::new(probes::Probes {
            inner: routed,
            readiness: readiness.clone(),
            responder: default_responder.clone(),
        }),
        listen: plan.listen,
        limits: plan.limits,
        responder: default_responder,
        first_key,
        last_used,
        echo,
        readiness,
        metrics,
        tasks,
    })
}

/// A route's upstream credential: fixed, or OAuth2 tokens refreshed ahead of expiry. One
/// type, so that every route's stack is of one type.
enum RouteSource {
    Static(Credential),
    OAuth2(RefreshingToken<ClientCredentials>),
}

/// The future of [`RouteSource`]'s credential.
enum RouteSourceFuture {
    Static(<Credential as CredentialSource>::Future),
    OAuth2(RefreshFuture),
}

impl std::future::Future for RouteSourceFuture {
    type Output = Result<Credential, Rejection>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut *self {
            RouteSourceFuture::Static(f) => std::pin::Pin::new(f).poll(cx),
            RouteSourceFuture::OAuth2(f) => std::pin::Pin::new(f).poll(cx),
        }
    }
}

impl CredentialSource for RouteSource {
    type Future = RouteSourceFuture;

    fn credential(&self, identity: Option<&tower_gateway_auth::Identity>) -> Self::Future {
        match self {
            RouteSource::Static(c) => RouteSourceFuture::Static(c.credential(identity)),
            RouteSource::OAuth2(t) => RouteSourceFuture::OAuth2(t.credential(identity)),
        }
    }

    fn label(&self) -> &str {
        match self {
            RouteSource::Static(c) => c.label(),
            RouteSource::OAuth2(t) => t.label(),
        }
    }
}
