//! The key-management HTTP API, as an axum [`Router`] (feature `axum`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::identity::Identity;
use crate::inbound::RequireScopesLayer;
use crate::keys::audit::{Actor, AuditAction};
use crate::keys::manager::{
    AccessChange, Ephemeral, IssuedKey, KeyManager, Lifetime, ManageError, NewKey,
};
use crate::keys::record::{KeyId, KeyRecord, KeyStatus, KeyUnusable, Metadata, Scopes};
use crate::limit::{Limiter, Limits, ModelList, Usage, UsageFuture};
use crate::rejection::{Rejection, RejectionKind};
use crate::store::KeyAdmin;

/// The key-management API: JSON in and out; every error a [`Rejection`], rendered in the
/// dialect of the [`RejectionLayer`](crate::RejectionLayer) around it (OpenAI's without one).
///
/// | route | who | does |
/// |---|---|---|
/// | `POST /keys` | admin | issues a key; the answer holds the key, once |
/// | `GET /keys` | admin | lists keys (hints only, never keys) |
/// | `GET /keys/{id}` | admin | one key, with its current usage when the API has a limiter ([`usage_from`](Self::usage_from)) |
/// | `PATCH /keys/{id}` | admin | changes its `limits` and `models` (and its ephemeral keys') |
/// | `POST /keys/{id}/revoke` | admin | revokes it, and its ephemeral keys |
/// | `POST /keys/{id}/disable`, `/enable` | admin | switches it off or on |
/// | `POST /keys/{id}/rotate` | admin | issues a successor; the old key works `grace_seconds` more |
/// | `DELETE /keys/{id}` | admin | removes the record |
/// | `POST /ephemeral` | any key | mints a short-lived key with a subset of the caller's scopes |
///
/// "admin" means a key with the admin scope (default `admin`) that is not ephemeral: an
/// ephemeral key never manages keys, whatever scopes it holds (403), never mints another
/// key (403), and is never given the admin scope (asking for it is a 403; with no scopes
/// asked, a child gets its parent's scopes less the admin scope). A key has at most
/// [`KeyManager::max_live_ephemeral`] live ephemeral keys; past that `/ephemeral` answers
/// 429 `too_many_ephemeral_keys` with `Retry-After`. The router must sit behind an
/// [`InboundApiKeyLayer`](crate::InboundApiKeyLayer) on the same store; without one every
/// route answers 401, never 200.
///
/// Request bodies: `POST /keys` takes `{"name", "scopes"?, "ttl_days"? | "ttl_seconds"? |
/// "never_expires"?, "not_before"?, "metadata"?}`; `rotate` takes `{"grace_seconds"?}`
/// (default 3600); `/ephemeral` takes `{"scopes"?, "ttl_seconds"?, "models"?}` (default 60
/// seconds; `models` only within the caller's own list); `PATCH /keys/{id}` takes
/// `{"limits"?, "models"?}`, where a field left out stays and `null` removes it.
///
/// `GET /keys/{id}` shows `usage` when the API was given the limiter the routes use:
/// `{"in_flight", "requests_in_window"?, "remaining_requests"?, "reset_seconds"?}` (the
/// last three when the key has a rate of its own), with token limits of its own also
/// `"tokens_remaining"` (of the token rate) and `"budget_used"`, `"budget_remaining"`,
/// `"budget_resets_at"` (of the budget's current period), counted for the key's line
/// ([`origin`](crate::keys::KeyRecord::origin)), as the limiter counts it.
///
/// Times are RFC 3339 strings: answers show `created_at`, `expires_at` and `not_before` in
/// UTC (`"2030-01-01T00:00:00Z"`); `not_before` may be sent with any offset
/// (`"2030-01-01T01:00:00+01:00"`), or as Unix seconds, as earlier versions took it.
///
/// ```
/// use std::sync::Arc;
/// use axum::Router;
/// use tower_gateway_auth::{InboundApiKeyLayer, ManagementApi};
/// use tower_gateway_auth::keys::KeyManager;
/// use tower_gateway_auth::store::MemoryStore;
///
/// let store = Arc::new(MemoryStore::new());
/// let app: Router = Router::new()
///     .nest("/admin", ManagementApi::new(KeyManager::new(store.clone())).router())
///     .layer(InboundApiKeyLayer::from_shared(store));
/// ```
pub struct ManagementApi<A> {
    manager: KeyManager<A>,
    admin_scope: String,
    clock: Arc<dyn Clock>,
    usage: Option<UsageReader>,
}

/// A limiter's [`Limiter::usage`], with the limiter's type erased.
type UsageReader = Arc<dyn Fn(KeyId, &Limits) -> UsageFuture + Send + Sync>;

impl<A> std::fmt::Debug for ManagementApi<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementApi")
            .field("manager", &self.manager)
            .field("admin_scope", &self.admin_scope)
            .finish_non_exhaustive()
    }
}

impl<A: KeyAdmin> ManagementApi<A> {
    /// The API over `manager`, with admin scope `admin`.
    pub fn new(manager: KeyManager<A>) -> Self {
        ManagementApi {
            manager,
            admin_scope: "admin".to_owned(),
            clock: Arc::new(SystemClock),
            usage: None,
        }
    }

    /// Shows each key's usage in `GET /keys/{id}`, read from `limiter` (the one the routes'
    /// [`RateLimitLayer`](crate::RateLimitLayer)s share).
    pub fn usage_from<L: Limiter>(mut self, limiter: Arc<L>) -> Self {
        self.usage = Some(Arc::new(move |key, limits| limiter.usage(key, limits)));
        self
    }

    /// The scope admin routes require.
    pub fn admin_scope(mut self, scope: impl Into<String>) -> Self {
        self.admin_scope = scope.into();
        self
    }

    /// The clock key states (`expired` …) are shown against; use the manager's.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The key-management web page (feature `admin-ui`) for this API nested at `at`
    /// (e.g. `/admin`): `{at}/` serves it, `{at}` redirects there. Serve it **outside** the
    /// [`InboundApiKeyLayer`](crate::InboundApiKeyLayer): a browser loads the page without
    /// a key; the page then asks for the admin key and sends it with each API call (kept in
    /// the tab's `sessionStorage` only). Every answer carries a strict
    /// `Content-Security-Policy` (`default-src 'self'`, no inline script, Trusted Types),
    /// `X-Frame-Options: DENY` and `Cache-Control: no-store`. The page holds no key but the
    /// one just issued, shown once.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use axum::Router;
    /// use tower_gateway_auth::{InboundApiKeyLayer, ManagementApi};
    /// use tower_gateway_auth::keys::KeyManager;
    /// use tower_gateway_auth::store::MemoryStore;
    ///
    /// let store = Arc::new(MemoryStore::new());
    /// let api = ManagementApi::new(KeyManager::new(store.clone()));
    /// let app: Router = Router::new()
    ///     .merge(api.page("/admin"))
    ///     .merge(
    ///         Router::new()
    ///             .nest("/admin", api.router())
    ///             .layer(InboundApiKeyLayer::from_shared(store)),
    ///     );
    /// ```
    #[cfg(feature = "admin-ui")]
    #[cfg_attr(docsrs, doc(cfg(feature = "admin-ui")))]
    pub fn page(&self, at: &str) -> Router {
        crate::keys::page::routes(at)
    }

    /// The routes.
    pub fn router(self) -> Router {
        let state = Arc::new(ApiState {
            manager: self.manager,
            clock: self.clock,
            admin_scope: self.admin_scope.clone(),
            usage: self.usage,
        });
        let admin = Router::new()
            .route("/keys", post(create::<A>).get(list::<A>))
            .route(
                "/keys/{id}",
                get(show::<A>).delete(delete::<A>).patch(patch::<A>),
            )
            .route("/keys/{id}/revoke", post(revoke::<A>))
            .route("/keys/{id}/disable", post(set_enabled::<A, false>))
            .route("/keys/{id}/enable", post(set_enabled::<A, true>))
            .route("/keys/{id}/rotate", post(rotate::<A>))
            .route_layer(RequireScopesLayer::new([self.admin_scope]).refuse_ephemeral(true));
        Router::new()
            .route("/ephemeral", post(ephemeral::<A>))
            .merge(admin)
            .with_state(state)
    }
}

struct ApiState<A> {
    manager: KeyManager<A>,
    clock: Arc<dyn Clock>,
    admin_scope: String,
    usage: Option<UsageReader>,
}

type Shared<A> = State<Arc<ApiState<A>>>;

/// What the API shows of a key: never the key, never its digest.
#[derive(Serialize)]
struct KeyView {
    id: KeyId,
    name: String,
    hint: String,
    scopes: Scopes,
    /// The stored status (`active`, `disabled`, `revoked`).
    status: KeyStatus,
    /// Whether it works now, and if not why: `usable`, `expired`, `not_yet_valid`, … (for an
    /// ephemeral key, its parent's state when that is what stops it).
    state: &'static str,
    /// RFC 3339, as are the two below.
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_before: Option<String>,
    /// When the key was last used, to the minute (RFC 3339), if it has been.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used_at: Option<String>,
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    metadata: Metadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<KeyId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<ModelList>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageView>,
}

/// A key's [`Usage`], as `GET /keys/{id}` shows it.
#[derive(Serialize)]
struct UsageView {
    in_flight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_in_window: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_resets_at: Option<String>,
}

impl From<Usage> for UsageView {
    fn from(u: Usage) -> Self {
        UsageView {
            in_flight: u.in_flight,
            requests_in_window: u.in_window,
            remaining_requests: u.remaining,
            reset_seconds: u.reset.map(|d| (d.as_secs_f64() * 1000.0).ceil() / 1000.0),
            tokens_remaining: u.tokens_remaining,
            budget_used: u.budget_used,
            budget_remaining: u.budget_remaining,
            budget_resets_at: u.budget_resets_at.map(|t| t.to_string()),
        }
    }
}

/// Whether `r`'s parent, found as `parent` (`None`: gone), lets it be used at `now`.
fn inherited(r: &KeyRecord, parent: Option<&KeyRecord>, now: Timestamp) -> Result<(), KeyUnusable> {
    match (r.parent(), parent) {
        (None, _) => Ok(()),
        (Some(id), Some(parent)) if parent.id() == id => parent.usable_at(now),
        (Some(_), _) => Err(KeyUnusable::Revoked),
    }
}

impl KeyView {
    /// The view of `r`; `inherited` says whether its parent, if it has one, is usable.
    fn of(r: &KeyRecord, inherited: Result<(), KeyUnusable>, now: Timestamp) -> Self {
        let state = match r.usable_at(now).and(inherited) {
            Ok(()) => "usable",
            Err(KeyUnusable::Revoked) => "revoked",
            Err(KeyUnusable::Disabled) => "disabled",
            Err(KeyUnusable::Expired) => "expired",
            Err(KeyUnusable::NotYetValid) => "not_yet_valid",
        };
        KeyView {
            id: r.id(),
            name: r.name().to_owned(),
            hint: r.hint().to_owned(),
            scopes: r.scopes().clone(),
            status: r.status(),
            state,
            created_at: r.created_at().to_string(),
            expires_at: r.expires_at().map(|t| t.to_string()),
            not_before: r.not_before().map(|t| t.to_string()),
            last_used_at: None,
            metadata: r.metadata().clone(),
            parent: r.parent(),
            limits: r.limits().cloned(),
            models: r.models().cloned(),
            usage: None,
        }
    }
}

/// A freshly issued key with its view: the only answer that ever holds a key.
#[derive(Serialize)]
struct IssuedView {
    key: String,
    #[serde(flatten)]
    view: KeyView,
}

/// What a client told to come back later waits: an ephemeral key's default lifetime, by
/// which the oldest of a parent's default-lived children has expired.
const RETRY_AFTER: Duration = crate::keys::manager::DEFAULT_EPHEMERAL_TTL;

type Answer = Result<Response, Rejection>;

impl<A> ApiState<A> {
    /// The manager, acting for the caller (in the audit trail).
    fn by(&self, who: &Option<Identity>) -> KeyManager<A>
    where
        A: KeyAdmin,
    {
        self.manager.acting_as(Actor::of(who.as_ref()))
    }

    fn fail(&self, e: ManageError) -> Rejection {
        let message = e.to_string();
        match e {
            ManageError::NotFound(_) => Rejection::new(RejectionKind::KeyNotFound, message),
            ManageError::Invalid(why) => Rejection::new(RejectionKind::InvalidRequest, why),
            ManageError::Forbidden(why) => Rejection::new(RejectionKind::Forbidden, why),
            ManageError::Unusable(_, why) => Rejection::new(RejectionKind::from(why), message),
            ManageError::TooManyEphemeral { .. } => {
                Rejection::new(RejectionKind::TooManyEphemeralKeys, message)
                    .with_retry_after(RETRY_AFTER)
            }
            ManageError::Conflict => Rejection::new(RejectionKind::Conflict, message),
            ManageError::Store(error) => {
                tracing::warn!(target: "tower_gateway_auth::admin", %error, "key store failed");
                Rejection::new(
                    RejectionKind::StoreUnavailable,
                    "The key store is unavailable; try again shortly.",
                )
            }
        }
    }

    async fn view(&self, r: &KeyRecord) -> Response
    where
        A: KeyAdmin,
    {
        axum::Json(self.view_of(r).await).into_response()
    }

    async fn view_of(&self, r: &KeyRecord) -> KeyView
    where
        A: KeyAdmin,
    {
        let parent = match r.parent() {
            Some(id) => self.manager.get(id).await.ok(),
            None => None,
        };
        let now = self.clock.now();
        let mut view = KeyView::of(r, inherited(r, parent.as_deref(), now), now);
        view.last_used_at = self.last_used(vec![r.id()]).await[0].map(|t| t.to_string());
        view
    }

    /// When each key was last used; a store that cannot say now shows none (logged), rather
    /// than failing the listing.
    async fn last_used(&self, ids: Vec<KeyId>) -> Vec<Option<Timestamp>>
    where
        A: KeyAdmin,
    {
        let count = ids.len();
        match self.manager.last_used(ids).await {
            Ok(times) if times.len() == count => times,
            Ok(_) => vec![None; count],
            Err(error) => {
                tracing::warn!(target: "tower_gateway_auth::admin", %error, "cannot read when keys were last used");
                vec![None; count]
            }
        }
    }

    fn issued(&self, issued: IssuedKey) -> Response {
        let body = IssuedView {
            key: issued.key.expose().to_owned(),
            // A key just issued or minted: its parent was usable a moment ago.
            view: KeyView::of(&issued.record, Ok(()), self.clock.now()),
        };
        let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
        // A key is in this body: no cache may keep it.
        response.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        response
    }

    /// Parses a JSON body (empty means `{}`), answering 400 in the dialect when it is bad.
    fn parse<T: DeserializeOwned>(&self, body: &Bytes) -> Result<T, Rejection> {
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            body
        };
        serde_json::from_slice(body).map_err(|e| {
            Rejection::new(
                RejectionKind::InvalidJson,
                format!("Invalid request body: {e}"),
            )
        })
    }

    fn id(&self, raw: &str) -> Result<KeyId, Rejection> {
        raw.parse()
            .map_err(|e: crate::keys::record::ParseKeyIdError| {
                Rejection::new(RejectionKind::KeyNotFound, e.to_string())
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    ttl_days: Option<u64>,
    ttl_seconds: Option<u64>,
    #[serde(default)]
    never_expires: bool,
    not_before: Option<TimeInput>,
    #[serde(default)]
    metadata: Metadata,
    /// The stored form: `{"requests_per_period", "period", "burst", "max_concurrent"}`.
    limits: Option<Limits>,
    /// Exact names and `*` globs.
    models: Option<Vec<String>>,
}

/// A time in a request body: RFC 3339, or Unix seconds (what earlier versions took).
#[derive(Deserialize)]
#[serde(untagged)]
enum TimeInput {
    Rfc3339(String),
    UnixSecs(u64),
}

impl TimeInput {
    fn timestamp(&self) -> Option<Timestamp> {
        match self {
            TimeInput::Rfc3339(text) => Timestamp::parse_rfc3339(text),
            TimeInput::UnixSecs(secs) => Some(Timestamp::from_unix_secs(*secs)),
        }
    }
}

async fn create<A: KeyAdmin>(State(s): Shared<A>, who: Option<Identity>, body: Bytes) -> Answer {
    let body: CreateBody = s.parse(&body)?;
    let not_before = match &body.not_before {
        None => None,
        Some(t) => Some(t.timestamp().ok_or_else(|| {
            Rejection::new(
                RejectionKind::InvalidRequest,
                "not_before must be an RFC 3339 time, such as 2030-01-01T00:00:00Z.",
            )
        })?),
    };
    let lifetime = match (body.ttl_days, body.ttl_seconds, body.never_expires) {
        (None, None, false) => Lifetime::Default,
        (None, None, true) => Lifetime::Never,
        (Some(days), None, false) if days > 0 => {
            Lifetime::For(Duration::from_secs(days.saturating_mul(86_400)))
        }
        (None, Some(secs), false) if secs > 0 => Lifetime::For(Duration::from_secs(secs)),
        _ => {
            return Err(Rejection::new(
                RejectionKind::InvalidRequest,
                "Give at most one of ttl_days, ttl_seconds (both positive) or never_expires.",
            ));
        }
    };
    if body.name.trim().is_empty() || body.name.len() > 200 {
        return Err(Rejection::new(
            RejectionKind::InvalidRequest,
            "A key needs a name of 1 to 200 characters.",
        ));
    }
    let mut spec = NewKey::named(body.name)
        .scopes(body.scopes)
        .lifetime(lifetime)
        .metadata_map(body.metadata);
    if let Some(t) = not_before {
        spec = spec.not_before(t);
    }
    if let Some(limits) = body.limits {
        spec = spec.limits(limits);
    }
    if let Some(models) = body.models {
        spec = spec.models(models);
    }
    let issued = s.by(&who).issue(spec).await.map_err(|e| s.fail(e))?;
    Ok(s.issued(issued))
}

#[derive(Serialize)]
struct ListView {
    keys: Vec<KeyView>,
}

async fn list<A: KeyAdmin>(State(s): Shared<A>) -> Answer {
    let all = s.manager.list().await.map_err(|e| s.fail(e))?;
    let now = s.clock.now();
    let by_id: std::collections::HashMap<KeyId, &KeyRecord> =
        all.iter().map(|r| (r.id(), &**r)).collect();
    let used = s.last_used(all.iter().map(|r| r.id()).collect()).await;
    let keys = all
        .iter()
        .zip(used)
        .map(|(r, used)| {
            let parent = r.parent().and_then(|p| by_id.get(&p).copied());
            let mut view = KeyView::of(r, inherited(r, parent, now), now);
            view.last_used_at = used.map(|t| t.to_string());
            view
        })
        .collect();
    Ok(axum::Json(ListView { keys }).into_response())
}

async fn show<A: KeyAdmin>(State(s): Shared<A>, Path(id): Path<String>) -> Answer {
    let record = s.manager.get(s.id(&id)?).await.map_err(|e| s.fail(e))?;
    let mut view = s.view_of(&record).await;
    if let Some(read) = &s.usage {
        let limits = record.limits().copied().unwrap_or_default();
        match read(record.origin(), &limits).await {
            Ok(usage) => view.usage = Some(usage.into()),
            // The key is still shown; its usage is not known now.
            Err(error) => {
                tracing::warn!(target: "tower_gateway_auth::admin", %error, "cannot read a key's usage")
            }
        }
    }
    Ok(axum::Json(view).into_response())
}

/// `PATCH /keys/{id}`: a field left out stays, `null` removes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default, deserialize_with = "present")]
    limits: Option<Option<Limits>>,
    #[serde(default, deserialize_with = "present")]
    models: Option<Option<Vec<String>>>,
}

/// A field that is present: `Some(None)` for `null`, `Some(Some(_))` for a value.
fn present<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

async fn patch<A: KeyAdmin>(
    State(s): Shared<A>,
    who: Option<Identity>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let id = s.id(&id)?;
    let body: PatchBody = s.parse(&body)?;
    let mut change = AccessChange::new();
    if let Some(limits) = body.limits {
        change = change.limits(limits);
    }
    if let Some(models) = body.models {
        change = change.models(models.map(ModelList::new));
    }
    if change.is_empty() {
        return Err(Rejection::new(
            RejectionKind::InvalidRequest,
            "Give limits or models (null removes them).",
        ));
    }
    let record = s
        .by(&who)
        .change_access(id, change)
        .await
        .map_err(|e| s.fail(e))?;
    Ok(s.view(&record).await)
}

async fn revoke<A: KeyAdmin>(
    State(s): Shared<A>,
    who: Option<Identity>,
    Path(id): Path<String>,
) -> Answer {
    let record = s.by(&who).revoke(s.id(&id)?).await.map_err(|e| s.fail(e))?;
    Ok(s.view(&record).await)
}

async fn delete<A: KeyAdmin>(
    State(s): Shared<A>,
    who: Option<Identity>,
    Path(id): Path<String>,
) -> Answer {
    s.by(&who).delete(s.id(&id)?).await.map_err(|e| s.fail(e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /keys/{id}/enable` (`ENABLE`) and `/disable`.
async fn set_enabled<A: KeyAdmin, const ENABLE: bool>(
    State(s): Shared<A>,
    who: Option<Identity>,
    Path(id): Path<String>,
) -> Answer {
    let record = s
        .by(&who)
        .set_enabled(s.id(&id)?, ENABLE)
        .await
        .map_err(|e| s.fail(e))?;
    Ok(s.view(&record).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default = "default_grace")]
    grace_seconds: u64,
}

fn default_grace() -> u64 {
    3600
}

async fn rotate<A: KeyAdmin>(
    State(s): Shared<A>,
    who: Option<Identity>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let id = s.id(&id)?;
    let body: RotateBody = s.parse(&body)?;
    let grace = Duration::from_secs(body.grace_seconds);
    let issued = s.by(&who).rotate(id, grace).await.map_err(|e| s.fail(e))?;
    Ok(s.issued(issued))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EphemeralBody {
    scopes: Option<Vec<String>>,
    ttl_seconds: Option<u64>,
    models: Option<Vec<String>>,
}

async fn ephemeral<A: KeyAdmin>(State(s): Shared<A>, who: Option<Identity>, body: Bytes) -> Answer {
    let Some(who) = who else {
        return Err(Rejection::new(
            RejectionKind::MissingKey,
            "This endpoint requires an API key.",
        ));
    };
    let manager = s.by(&Some(who.clone()));
    let refuse = |why: String| {
        let refusal = ManageError::Forbidden(why);
        manager.audit_refusal(AuditAction::MintEphemeral, &refusal);
        s.fail(refusal)
    };
    if who.parent().is_some() {
        return Err(refuse("An ephemeral key cannot mint another key.".into()));
    }
    let body: EphemeralBody = s.parse(&body)?;
    if body
        .scopes
        .iter()
        .flatten()
        .any(|scope| *scope == s.admin_scope)
    {
        return Err(refuse(format!(
            "An ephemeral key cannot have the {} scope: ephemeral keys never manage keys.",
            s.admin_scope
        )));
    }
    let mut spec = Ephemeral::new().scopes(match body.scopes {
        Some(asked) => Scopes::new(asked),
        None => Scopes::new(who.scopes().iter().filter(|scope| *scope != s.admin_scope)),
    });
    if let Some(ttl) = body.ttl_seconds {
        spec = spec.ttl(Duration::from_secs(ttl));
    }
    if let Some(models) = body.models {
        spec = spec.models(models);
    }
    let issued = manager
        .mint_ephemeral(&who, spec)
        .await
        .map_err(|e| s.fail(e))?;
    Ok(s.issued(issued))
}
