//! Counters and histograms through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): the application installs whichever exporter it likes (Prometheus, StatsD,
//! OpenTelemetry …); without one, every record is a no-op.
//!
//! Two kinds of sources feed them:
//!
//! - [`MetricsLayer`], placed outside a stack (next to the
//!   [`RejectionLayer`](crate::RejectionLayer)), counts every request by route and outcome
//!   when its response head comes out of the stack. It reads why a request was refused from
//!   the [`Rejection`] in the response's extensions (never from the body), the upstream's
//!   answer from the [`UpstreamOutcome`] that [`Forward`](crate::proxy::Forward) puts there,
//!   and, with per-key labels, the caller's key id from a [`KeyIdSlot`] the inbound layer
//!   fills. It records nothing at body end: a streamed answer counts when its head is
//!   produced, whatever happens to the stream after.
//! - The crate's own parts record where the event happens: the inbound layer times each
//!   store lookup that has to wait, [`CachedStore`](crate::store::CachedStore) counts its
//!   hits, misses, stale serves and invalidations,
//!   [`RefreshingToken`](crate::upstream::RefreshingToken) its fetches.
//!
//! With the feature off none of this code exists: no clock reads, no label building, no
//! extensions lookups for metrics. (The inbound layer's look for a [`KeyIdSlot`] stays,
//! since the access log uses it too: one failed extensions lookup a request when no outer
//! layer asked for the key id; and `Forward` always records its [`UpstreamOutcome`], one
//! small extensions insert per forwarded request.)
//!
//! # The metrics
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `gateway_auth_requests_total` | counter | `route`, `outcome` | requests through a [`MetricsLayer`], at their response head; `outcome` is `allowed`, [`RejectionKind::outcome`] for a refusal, or `error` when the service failed |
//! | `gateway_auth_key_requests_total` | counter | `route`, `key`, `outcome` | the same, by key id, for requests whose key matched a record; only with [`per_key_labels`](MetricsLayer::per_key_labels) |
//! | `gateway_auth_upstream_responses_total` | counter | `route`, `class` | what the upstream answered: `class` is `1xx` … `5xx`, or `error` (unreachable, timed out) |
//! | `gateway_auth_upstream_seconds` | histogram | `route` | from sending a request upstream to its response head (or failure) |
//! | `gateway_auth_store_lookup_seconds` | histogram | `result` | one key-store lookup of the inbound layer that had to wait (a store a network hop away, a cache miss); answers ready at once (an in-memory store, a cache hit) are not timed, and show as cache hits; `result` is `found`, `unknown` or `error` (failed or timed out) |
//! | `gateway_auth_cache_events_total` | counter | `event` | [`CachedStore`](crate::store::CachedStore): `hit`, `negative_hit` (a cached unknown key), `miss` (the store is asked, or a call under way joined), `stale` (a held record served while the store fails), `invalidation` (one digest or all) |
//! | `gateway_auth_tokens_total` | counter | `route`, `kind` | tokens the responses of keys with token limits reported, `kind` `prompt` (input, cached included) or `completion` (output, reasoning included), counted when the response body ends |
//! | `gateway_auth_credential_refreshes_total` | counter | `source`, `result` | token fetches of a [`RefreshingToken`](crate::upstream::RefreshingToken) named `source`; `result` is `ok` or `error` |
//!
//! `route` is the name given to [`MetricsLayer::route`] (empty, which Prometheus reads as
//! absent, when none is). Label values never hold a key, a digest or a credential: a key
//! appears only as its id ([`KeyId`]'s display form, `key_…`), and only on
//! `gateway_auth_key_requests_total`.
//!
//! # Per-key labels, bounded
//!
//! A label per key id makes one series per key, and a gateway with a million keys would
//! make an exporter hold a million series. [`per_key_labels(limit)`](MetricsLayer::per_key_labels)
//! bounds that: the first `limit` distinct key ids a layer sees get their own label, every
//! later one is counted under `key="other"`. The set is per layer (clones share it) and is
//! never emptied: the keys that show are the first ones seen since start-up.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_gateway_auth::{InboundApiKeyLayer, RejectionLayer};
//! use tower_gateway_auth::metrics::MetricsLayer;
//! use tower_gateway_auth::store::MemoryStore;
//!
//! let service = ServiceBuilder::new()
//!     .layer(MetricsLayer::new().route("openai").per_key_labels(100))
//!     .layer(RejectionLayer::new())
//!     .layer(InboundApiKeyLayer::new(MemoryStore::new()))
//!     .service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     });
//! # let _ = service;
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ::metrics::{Counter, Histogram, SharedString};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::inbound::KeyIdSlot;
use crate::keys::KeyId;
use crate::rejection::{Rejection, RejectionKind};
use crate::response::UpstreamOutcome;

/// `gateway_auth_requests_total{route,outcome}`, counter.
pub const REQUESTS_TOTAL: &str = "gateway_auth_requests_total";
/// `gateway_auth_key_requests_total{route,key,outcome}`, counter.
pub const KEY_REQUESTS_TOTAL: &str = "gateway_auth_key_requests_total";
/// `gateway_auth_upstream_responses_total{route,class}`, counter.
pub const UPSTREAM_RESPONSES_TOTAL: &str = "gateway_auth_upstream_responses_total";
/// `gateway_auth_upstream_seconds{route}`, histogram.
pub const UPSTREAM_SECONDS: &str = "gateway_auth_upstream_seconds";
/// `gateway_auth_store_lookup_seconds{result}`, histogram.
pub const STORE_LOOKUP_SECONDS: &str = "gateway_auth_store_lookup_seconds";
/// `gateway_auth_cache_events_total{event}`, counter.
pub const CACHE_EVENTS_TOTAL: &str = "gateway_auth_cache_events_total";
/// `gateway_auth_credential_refreshes_total{source,result}`, counter.
pub const CREDENTIAL_REFRESHES_TOTAL: &str = "gateway_auth_credential_refreshes_total";
/// The name of the counter of tokens used, by route and kind.
pub const TOKENS_TOTAL: &str = "gateway_auth_tokens_total";

/// A response's token counters: bound to its route by the [`MetricsLayer`] when the
/// response head passes it, counted when the body ends ([`RateLimitLayer`](crate::RateLimitLayer)
/// puts one in the extensions of responses whose key's tokens count).
#[derive(Clone, Default)]
pub(crate) struct TokenTally(Arc<OnceLock<[Counter; 2]>>);

impl TokenTally {
    fn bind(&self, route: &SharedString) {
        self.0.get_or_init(|| {
            ["prompt", "completion"].map(
                |kind| ::metrics::counter!(TOKENS_TOTAL, "route" => route.clone(), "kind" => kind),
            )
        });
    }

    /// Counts `usage`, when a metrics layer bound the counters.
    pub(crate) fn count(&self, usage: &crate::tokens::TokenUsage) {
        if let Some([prompt, completion]) = self.0.get() {
            prompt.increment(usage.prompt());
            completion.increment(usage.completion());
        }
    }
}

/// The `key` label of the ids past the [`per_key_labels`](MetricsLayer::per_key_labels)
/// bound.
pub const OTHER_KEYS: &str = "other";

/// Counts the requests through the stack inside it, by route and outcome, and what the
/// upstream answered; see the [module docs](self) for every metric.
///
/// Place it outside the stack, where the response of every layer passes (next to the
/// [`RejectionLayer`](crate::RejectionLayer), either side). Cheap to clone; clones share
/// the per-key label set.
///
/// A layer registers each of its series with the recorder once, at the first request that
/// needs it, and keeps the handle: install the recorder (exporter) before serving, or
/// build the layer inside [`metrics::with_local_recorder`]
/// when testing.
///
/// ```
/// use std::convert::Infallible;
/// use metrics_util::debugging::DebuggingRecorder;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::InboundApiKeyLayer;
/// use tower_gateway_auth::metrics::MetricsLayer;
/// use tower_gateway_auth::store::MemoryStore;
///
/// let recorder = DebuggingRecorder::new();
/// let snapshots = recorder.snapshotter();
/// ::metrics::with_local_recorder(&recorder, || {
///     let service = ServiceBuilder::new()
///         .layer(MetricsLayer::new().route("chat"))
///         .layer(InboundApiKeyLayer::new(MemoryStore::new()))
///         .service_fn(|_req: http::Request<()>| async {
///             Ok::<_, Infallible>(http::Response::new(String::new()))
///         });
///     let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
///     runtime.block_on(service.oneshot(http::Request::new(()))).unwrap();
/// });
/// let (key, _, _, _) = snapshots.snapshot().into_vec().remove(0);
/// assert_eq!(key.key().name(), "gateway_auth_requests_total");
/// let labels: Vec<_> = key.key().labels().map(|l| (l.key(), l.value())).collect();
/// assert_eq!(labels, [("route", "chat"), ("outcome", "missing")]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MetricsLayer {
    config: Arc<Config>,
}

#[derive(Debug, Clone, Default)]
struct Config {
    route: SharedString,
    keys: Option<Arc<KeyLabels>>,
    handles: Arc<Handles>,
}

/// Every `outcome` label, each with a slot for its counter.
const OUTCOMES: [&str; 20] = [
    "allowed",
    "error",
    "missing",
    "malformed",
    "invalid",
    "expired",
    "not_yet_valid",
    "revoked",
    "disabled",
    "forbidden",
    "rate_limited",
    "budget_exhausted",
    "store_unavailable",
    "upstream_credential",
    "upstream_error",
    "upstream_timeout",
    "bad_request",
    "not_found",
    "conflict",
    "request_timeout",
];

/// Every upstream `class` label.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// One counter per label value, registered on first use and kept: looking a counter up in
/// the recorder (building its label list, hashing name and labels) costs more than the rest
/// of a request's accounting, so a layer does it once per series, not once per request.
/// The handles belong to the recorder in force when they were registered.
struct Slots<const N: usize>([OnceLock<Counter>; N]);

impl<const N: usize> Default for Slots<N> {
    fn default() -> Self {
        Slots(std::array::from_fn(|_| OnceLock::new()))
    }
}

impl<const N: usize> Slots<N> {
    /// Increments the counter of `value` (one of `values`), registering it with `register`
    /// the first time; a value not in `values` is looked up every time.
    fn increment(&self, values: &[&str; N], value: &'static str, register: impl Fn() -> Counter) {
        match values.iter().position(|v| *v == value) {
            Some(i) => self.0[i].get_or_init(&register).increment(1),
            None => register().increment(1),
        }
    }
}

/// The handles of one layer's series.
#[derive(Default)]
struct Handles {
    requests: Slots<{ OUTCOMES.len() }>,
    upstream: Slots<{ CLASSES.len() }>,
    upstream_seconds: OnceLock<Histogram>,
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handles").finish_non_exhaustive()
    }
}

impl MetricsLayer {
    /// A layer with no route name and no per-key labels.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `route` label of this stack's metrics (default: empty).
    pub fn route(mut self, name: impl Into<String>) -> Self {
        let config = Arc::make_mut(&mut self.config);
        config.route = SharedString::from_owned(name.into());
        config.handles = Arc::default();
        self
    }

    /// Also counts requests by key id (`gateway_auth_key_requests_total`), for at most
    /// `limit` distinct ids; later ones are counted as `key="other"`. See the
    /// [module docs](self#per-key-labels-bounded).
    pub fn per_key_labels(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.config).keys = Some(Arc::new(KeyLabels::new(limit)));
        self
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metrics {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around the stack.
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Metrics<S> {
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let slot = self
            .config
            .keys
            .is_some()
            .then(|| KeyIdSlot::attach(req.extensions_mut()));
        MetricsFuture {
            future: self.inner.call(req),
            config: self.config.clone(),
            slot,
        }
    }
}

pin_project! {
    /// The response future of [`Metrics`].
    pub struct MetricsFuture<F> {
        #[pin]
        future: F,
        config: Arc<Config>,
        slot: Option<KeyIdSlot>,
    }
}

impl<F> std::fmt::Debug for MetricsFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx));
        let config = &**this.config;
        let outcome = match &result {
            Ok(response) => {
                if let Some(upstream) = response.extensions().get::<UpstreamOutcome>() {
                    config.record_upstream(upstream);
                }
                if let Some(tally) = response.extensions().get::<TokenTally>() {
                    tally.bind(&config.route);
                }
                outcome(
                    response
                        .extensions()
                        .get::<Rejection>()
                        .map(Rejection::kind),
                )
            }
            Err(_) => "error",
        };
        let route = &config.route;
        config.handles.requests.increment(
            &OUTCOMES,
            outcome,
            || ::metrics::counter!(REQUESTS_TOTAL, "route" => route.clone(), "outcome" => outcome),
        );
        if let (Some(keys), Some(id)) = (&config.keys, this.slot.as_ref().and_then(KeyIdSlot::get))
        {
            let key = keys.counters(id);
            key.requests.increment(&OUTCOMES, outcome, || {
                ::metrics::counter!(
                    KEY_REQUESTS_TOTAL,
                    "route" => route.clone(),
                    "key" => key.label.clone(),
                    "outcome" => outcome,
                )
            });
        }
        Poll::Ready(result)
    }
}

/// `allowed` for a request no layer refused, else the refusal's outcome.
fn outcome(rejection: Option<RejectionKind>) -> &'static str {
    rejection.map_or("allowed", RejectionKind::outcome)
}

impl Config {
    fn record_upstream(&self, upstream: &UpstreamOutcome) {
        let route = &self.route;
        let class = upstream.class();
        self.handles.upstream.increment(&CLASSES, class, || {
            ::metrics::counter!(UPSTREAM_RESPONSES_TOTAL, "route" => route.clone(), "class" => class)
        });
        if let Some(elapsed) = upstream.elapsed() {
            self.handles
                .upstream_seconds
                .get_or_init(|| ::metrics::histogram!(UPSTREAM_SECONDS, "route" => route.clone()))
                .record(elapsed);
        }
    }
}

/// The key ids that have a label of their own, at most `limit` of them, and their counters.
#[derive(Debug)]
struct KeyLabels {
    limit: usize,
    seen: RwLock<HashMap<KeyId, Arc<KeyCounters>>>,
    other: Arc<KeyCounters>,
}

/// One `key` label's counters, by outcome.
struct KeyCounters {
    label: SharedString,
    requests: Slots<{ OUTCOMES.len() }>,
}

impl std::fmt::Debug for KeyCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCounters")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl KeyCounters {
    fn new(label: SharedString) -> Arc<Self> {
        Arc::new(KeyCounters {
            label,
            requests: Slots::default(),
        })
    }
}

impl KeyLabels {
    fn new(limit: usize) -> Self {
        KeyLabels {
            limit,
            seen: RwLock::new(HashMap::new()),
            other: KeyCounters::new(SharedString::const_str(OTHER_KEYS)),
        }
    }

    /// `id`'s counters, or those of [`OTHER_KEYS`] once `limit` other ids have their own.
    fn counters(&self, id: KeyId) -> Arc<KeyCounters> {
        // A key seen before costs a read lock and a reference count, not a formatting of
        // its id or a recorder lookup.
        if let Some(counters) = self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return counters.clone();
        }
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(counters) = seen.get(&id) {
            return counters.clone();
        }
        if seen.len() >= self.limit {
            return self.other.clone();
        }
        let counters = KeyCounters::new(SharedString::from(Arc::<str>::from(id.to_string())));
        seen.insert(id, counters.clone());
        counters
    }
}

/// A [`CachedStore`](crate::store::CachedStore) event.
pub(crate) fn cache_event(event: &'static str) {
    ::metrics::counter!(CACHE_EVENTS_TOTAL, "event" => event).increment(1);
}

/// One store lookup of the inbound layer.
pub(crate) fn store_lookup(elapsed: Duration, result: &'static str) {
    ::metrics::histogram!(STORE_LOOKUP_SECONDS, "result" => result).record(elapsed);
}

/// One token fetch of a `RefreshingToken`.
// The `Cow` itself, so that a borrowed name (the usual, `'static` one) becomes a label
// without a copy.
#[allow(clippy::ptr_arg)]
pub(crate) fn credential_refresh(source: &Cow<'static, str>, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    ::metrics::counter!(CREDENTIAL_REFRESHES_TOTAL, "source" => source.clone(), "result" => result)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower::{ServiceBuilder, ServiceExt};

    use crate::InboundApiKeyLayer;
    use crate::keys::{KeyRecord, KeyStatus};
    use crate::store::{KeyStore, MemoryStore};

    /// Every counter recorded while `run` ran, as `name{label=value,…}` (labels in the order
    /// recorded) → count.
    fn counters(run: impl AsyncFnOnce()) -> HashMap<String, u64> {
        let recorder = DebuggingRecorder::new();
        let snapshots = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(run());
        });
        snapshots
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(n) => {
                    let key = key.key();
                    let labels: Vec<String> = key
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect();
                    Some((format!("{}{{{}}}", key.name(), labels.join(",")), n))
                }
                _ => None,
            })
            .collect()
    }

    fn ok_service()
    -> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send> + Clone
    {
        tower::service_fn(|_req: Request<()>| async { Ok(Response::new(String::new())) })
    }

    fn with_key(key: &str) -> Request<()> {
        Request::builder()
            .header("x-api-key", key)
            .body(())
            .unwrap()
    }

    #[test]
    fn every_outcome_comes_from_the_rejection_in_the_extensions() {
        let counted = counters(async || {
            let store = MemoryStore::new();
            let digest = |k: &str| store.hasher().digest(k.as_bytes());
            store.insert(KeyRecord::new(KeyId::random(), digest("gw_good")));
            store.insert(
                KeyRecord::new(KeyId::random(), digest("gw_revoked"))
                    .with_status(KeyStatus::Revoked),
            );
            store.insert(
                KeyRecord::new(KeyId::random(), digest("gw_disabled"))
                    .with_status(KeyStatus::Disabled),
            );
            store.insert(KeyRecord::new(KeyId::random(), digest("gw_unscoped")));
            store
                .insert(KeyRecord::new(KeyId::random(), digest("gw_scoped")).with_scopes(["chat"]));
            let service = ServiceBuilder::new()
                .layer(MetricsLayer::new().route("r"))
                .layer(crate::RejectionLayer::new())
                .layer(InboundApiKeyLayer::new(store))
                .layer(crate::RequireScopesLayer::new(Some("chat".to_owned())))
                .service(ok_service());
            for req in [
                Request::new(()),
                with_key("gw_unknown"),
                with_key("gw_unknown"),
                with_key("gw_revoked"),
                with_key("gw_disabled"),
                with_key("gw_unscoped"),
                with_key("gw_scoped"),
                with_key("gw_scoped"),
                with_key(&"x".repeat(2000)),
            ] {
                service.clone().oneshot(req).await.unwrap();
            }
            // A refusal made by the service at the bottom counts by its kind too.
            let refusing = MetricsLayer::new().route("r").layer(tower::service_fn(
                |req: Request<()>| async move {
                    let rejection = Rejection::new(RejectionKind::StoreUnavailable, "down");
                    Ok::<_, Infallible>(rejection.to_response(req.headers()))
                },
            ));
            refusing.oneshot(Request::new(())).await.unwrap();
        });
        let expected: HashMap<String, u64> = [
            ("missing", 1),
            ("invalid", 2),
            ("revoked", 1),
            ("disabled", 1),
            ("forbidden", 1),
            ("allowed", 2),
            ("malformed", 1),
            ("store_unavailable", 1),
        ]
        .into_iter()
        .map(|(outcome, n)| (format!("{REQUESTS_TOTAL}{{route=r,outcome={outcome}}}"), n))
        .collect();
        assert_eq!(counted, expected);
    }

    #[test]
    fn every_kind_has_an_outcome_label_of_its_own_or_shared() {
        use RejectionKind::*;
        for (kind, label) in [
            (MissingKey, "missing"),
            (InvalidKey, "invalid"),
            (ExpiredKey, "expired"),
            (RevokedKey, "revoked"),
            (DisabledKey, "disabled"),
            (InsufficientScope, "forbidden"),
            (Forbidden, "forbidden"),
            (TooManyEphemeralKeys, "rate_limited"),
            (StoreUnavailable, "store_unavailable"),
            (UpstreamUnreachable, "upstream_error"),
            (UpstreamTimeout, "upstream_timeout"),
            (UpstreamCredentialUnavailable, "upstream_credential"),
        ] {
            assert_eq!(outcome(Some(kind)), label, "{kind:?}");
        }
        assert_eq!(outcome(None), "allowed");
        // Every outcome has a counter slot of its own (else it is looked up per request).
        let every_kind = [
            MissingKey,
            MalformedKey,
            AmbiguousKey,
            KeyTooLong,
            InvalidKey,
            ExpiredKey,
            KeyNotYetValid,
            RevokedKey,
            DisabledKey,
            InsufficientScope,
            StoreUnavailable,
            NoUpstreamCredential,
            UpstreamCredentialUnavailable,
            InvalidPath,
            UpstreamUnreachable,
            UpstreamTimeout,
            NotFound,
            KeyNotFound,
            InvalidJson,
            InvalidRequest,
            Forbidden,
            Conflict,
            TooManyEphemeralKeys,
            RequestBodyTimeout,
            RateLimited,
            ConcurrencyLimited,
            ModelNotAllowed,
            LimiterUnavailable,
            TokensLimited,
            BudgetExhausted,
            RequestTooLarge,
            InvalidToken,
            TokenTooLong,
        ];
        for kind in every_kind {
            assert!(OUTCOMES.contains(&kind.outcome()), "{kind:?}");
        }
        let labels: std::collections::HashSet<_> = every_kind.iter().map(|k| k.outcome()).collect();
        assert_eq!(
            labels.len() + 2,
            OUTCOMES.len(),
            "allowed and error besides"
        );
    }

    #[test]
    fn past_the_bound_key_labels_fold_into_other() {
        const BOUND: usize = 3;
        let mut ids = Vec::new();
        let counted = counters(async || {
            let store = MemoryStore::new();
            let keys: Vec<String> = (0..=BOUND).map(|i| format!("gw_key-{i}")).collect();
            for key in &keys {
                let id = KeyId::random();
                ids.push(id);
                store.insert(KeyRecord::new(id, store.hasher().digest(key.as_bytes())));
            }
            let service = ServiceBuilder::new()
                .layer(MetricsLayer::new().route("r").per_key_labels(BOUND))
                .layer(InboundApiKeyLayer::new(store))
                .service(ok_service());
            // Every key twice: the ones seen first keep their label the second time too.
            for key in keys.iter().chain(&keys) {
                service.clone().oneshot(with_key(key)).await.unwrap();
            }
            // No record matched: nothing by key.
            service
                .clone()
                .oneshot(with_key("gw_nobody"))
                .await
                .unwrap();
        });
        let by_key: HashMap<&str, u64> = counted
            .iter()
            .filter(|(name, _)| name.starts_with(KEY_REQUESTS_TOTAL))
            .map(|(name, n)| (name.as_str(), *n))
            .collect();
        let mut expected: HashMap<String, u64> = ids[..BOUND]
            .iter()
            .map(|id| {
                (
                    format!("{KEY_REQUESTS_TOTAL}{{route=r,key={id},outcome=allowed}}"),
                    2,
                )
            })
            .collect();
        expected.insert(
            format!("{KEY_REQUESTS_TOTAL}{{route=r,key=other,outcome=allowed}}"),
            2,
        );
        let expected: HashMap<&str, u64> = expected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(by_key, expected);
        assert_eq!(by_key.len(), BOUND + 1);
        assert_eq!(
            counted[&format!("{REQUESTS_TOTAL}{{route=r,outcome=invalid}}")],
            1
        );
    }

    #[test]
    fn upstream_answers_count_by_class() {
        let counted = counters(async || {
            let upstream = |outcome: UpstreamOutcome| {
                MetricsLayer::new().route("u").layer(tower::service_fn(
                    move |_req: Request<()>| async move {
                        let mut response = Response::new(());
                        response.extensions_mut().insert(outcome);
                        Ok::<_, Infallible>(response)
                    },
                ))
            };
            for status in [200, 201, 404, 503] {
                let status = http::StatusCode::from_u16(status).unwrap();
                upstream(UpstreamOutcome::answered(
                    status,
                    Some(Duration::from_millis(3)),
                ))
                .oneshot(Request::new(()))
                .await
                .unwrap();
            }
            upstream(UpstreamOutcome::failed(None))
                .oneshot(Request::new(()))
                .await
                .unwrap();
        });
        for (class, n) in [("2xx", 2), ("4xx", 1), ("5xx", 1), ("error", 1)] {
            assert_eq!(
                counted[&format!("{UPSTREAM_RESPONSES_TOTAL}{{route=u,class={class}}}")],
                n,
                "{class}"
            );
        }
    }

    #[test]
    fn the_cache_and_token_refreshes_count_their_events() {
        use crate::store::CachedStore;
        use crate::upstream::{Credential, CredentialSource, FetchError, RefreshingToken, Token};

        let counted = counters(async || {
            let backing = MemoryStore::new();
            let known = backing.hasher().digest(b"gw_known");
            let unknown = backing.hasher().digest(b"gw_unknown");
            backing.insert(KeyRecord::new(KeyId::random(), known));
            let cache = CachedStore::new(backing);
            for digest in [known, known, known, unknown, unknown] {
                cache.lookup(&digest).await.unwrap();
            }
            cache.invalidate(&known);
            cache.lookup(&known).await.unwrap();

            let token = RefreshingToken::builder(|| async {
                Ok(Token::new(
                    Credential::new("tok")?,
                    Duration::from_secs(3600),
                ))
            })
            .name("idp")
            .build();
            token.credential(None).await.unwrap();
            token.credential(None).await.unwrap();
            let down =
                RefreshingToken::builder(|| async { Err::<Token, _>(FetchError::new("down")) })
                    .name("down-idp")
                    .build();
            assert!(down.credential(None).await.is_err());
        });
        let event = |e: &str| {
            counted
                .get(&format!("{CACHE_EVENTS_TOTAL}{{event={e}}}"))
                .copied()
        };
        assert_eq!(event("miss"), Some(3));
        assert_eq!(event("hit"), Some(2));
        assert_eq!(event("negative_hit"), Some(1));
        assert_eq!(event("invalidation"), Some(1));
        assert_eq!(event("stale"), None);
        let refresh = |source: &str, result: &str| {
            counted
                .get(&format!(
                    "{CREDENTIAL_REFRESHES_TOTAL}{{source={source},result={result}}}"
                ))
                .copied()
        };
        assert_eq!(refresh("idp", "ok"), Some(1), "one fetch serves both");
        assert_eq!(refresh("down-idp", "error"), Some(1));
    }
}
