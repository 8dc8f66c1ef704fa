//! Key lifecycle on any [`KeyAdmin`] store: issue keys (shown once), import keys issued
//! elsewhere, revoke, disable, rotate with a grace period, mint short-lived ephemeral keys,
//! and clean expired ephemeral keys up.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::identity::Identity;
use crate::keys::audit::{self, Actor, AuditAction, AuditEvent, AuditOutcome, AuditSink};
use crate::keys::format::{ApiKey, KeyFormat};
use crate::keys::record::{KeyId, KeyRecord, KeyStatus, KeyUnusable, Metadata, Scopes};
use crate::limit::{Limits, ModelList};
use crate::store::{KeyAdmin, StoreError, Write, WriteError};

/// How long a generated key lives unless told otherwise: 90 days.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// How long an ephemeral key lives unless told otherwise: 60 seconds.
pub const DEFAULT_EPHEMERAL_TTL: Duration = Duration::from_secs(60);

/// The longest an ephemeral key may live by default: one hour.
pub const DEFAULT_MAX_EPHEMERAL_TTL: Duration = Duration::from_secs(60 * 60);

/// How many live ephemeral keys one key may have at a time unless configured otherwise.
pub const DEFAULT_MAX_LIVE_EPHEMERAL: usize = 100;

/// How many times a write that lost a race is retried before giving up.
const RETRIES: usize = 8;

/// When a new key stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Lifetime {
    /// The manager's default (90 days unless configured otherwise).
    #[default]
    Default,
    /// Never.
    Never,
    /// This long after it is issued.
    For(Duration),
    /// At this time.
    Until(Timestamp),
}

/// What to issue: a name, scopes, a lifetime, a not-before time, metadata, limits and models.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::keys::NewKey;
///
/// let spec = NewKey::named("ci-runner")
///     .scopes(["openai"])
///     .expires_in(Duration::from_secs(7 * 24 * 3600))
///     .metadata("tenant", "acme");
/// ```
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    name: String,
    scopes: Scopes,
    lifetime: Lifetime,
    not_before: Option<Timestamp>,
    metadata: Metadata,
    limits: Option<Limits>,
    models: Option<ModelList>,
}

impl NewKey {
    /// A key called `name`, with no scopes and the default lifetime.
    pub fn named(name: impl Into<String>) -> Self {
        NewKey {
            name: name.into(),
            ..NewKey::default()
        }
    }

    /// Sets the scopes.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Scopes::new(scopes);
        self
    }

    /// Sets the lifetime.
    pub fn lifetime(mut self, lifetime: Lifetime) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Expires `ttl` after issuing.
    pub fn expires_in(self, ttl: Duration) -> Self {
        self.lifetime(Lifetime::For(ttl))
    }

    /// Never expires.
    pub fn never_expires(self) -> Self {
        self.lifetime(Lifetime::Never)
    }

    /// Not usable before `t`.
    pub fn not_before(mut self, t: Timestamp) -> Self {
        self.not_before = Some(t);
        self
    }

    /// Adds one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Replaces all metadata.
    pub fn metadata_map(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the key's own limits (see [`KeyRecord::with_limits`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Restricts the key to `models` (see [`KeyRecord::with_models`]).
    pub fn models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = Some(ModelList::new(models));
        self
    }
}

/// What an ephemeral key may do, for [`KeyManager::mint_ephemeral`]: by default its
/// parent's scopes and models, for [`DEFAULT_EPHEMERAL_TTL`].
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::keys::{Ephemeral, Scopes};
///
/// let spec = Ephemeral::new()
///     .scopes(Scopes::new(["realtime"]))
///     .ttl(Duration::from_secs(120))
///     .models(["gpt-4o-mini"]);
/// # let _ = spec;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Ephemeral {
    scopes: Option<Scopes>,
    ttl: Option<Duration>,
    models: Option<ModelList>,
}

impl Ephemeral {
    /// The parent's scopes and models, the default lifetime.
    pub fn new() -> Self {
        Ephemeral::default()
    }

    /// Only these scopes (a subset of the parent's).
    pub fn scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = Some(scopes);
        self
    }

    /// Lives `ttl` (at most [`KeyManager::max_ephemeral_ttl`], never past the parent).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Only these models: each name or glob must be within the parent's list
    /// ([`ModelList::covers`]), when the parent has one.
    pub fn models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = Some(ModelList::new(models));
        self
    }
}

/// A change to a key's [`Limits`] and [`ModelList`], for [`KeyManager::change_access`]:
/// each field left `None` stays as it is; `Some(None)` removes it.
///
/// ```
/// use tower_gateway_auth::keys::AccessChange;
/// use tower_gateway_auth::limit::{Limits, Rate};
///
/// let change = AccessChange::new()
///     .limits(Some(Limits::new().with_rate(Rate::per_minute(30))))
///     .models(None); // any model again
/// # let _ = change;
/// ```
#[derive(Debug, Clone, Default)]
pub struct AccessChange {
    limits: Option<Option<Limits>>,
    models: Option<Option<ModelList>>,
}

impl AccessChange {
    /// Changes nothing.
    pub fn new() -> Self {
        AccessChange::default()
    }

    /// Sets the key's own limits (`None`: the route's defaults again).
    pub fn limits(mut self, limits: Option<Limits>) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Sets the key's models (`None`: any model).
    pub fn models(mut self, models: Option<ModelList>) -> Self {
        self.models = Some(models);
        self
    }

    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        self.limits.is_none() && self.models.is_none()
    }
}

/// A key just issued: the key itself, shown this once, and its record.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    /// The key. It is not stored anywhere: hand it to its owner now.
    pub key: ApiKey,
    /// What the store keeps.
    pub record: Arc<KeyRecord>,
}

/// Why a lifecycle operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ManageError {
    /// No key has this id.
    NotFound(KeyId),
    /// The request makes no sense (e.g. ephemeral scopes beyond the parent's).
    Invalid(String),
    /// The key asking may not do this (an ephemeral key minting or rotating).
    Forbidden(String),
    /// The key asking (or being acted on) is not usable now: revoked, disabled, expired,
    /// not yet valid, or gone since it was verified.
    Unusable(KeyId, KeyUnusable),
    /// The parent has this many live ephemeral keys already.
    TooManyEphemeral {
        /// The limit ([`KeyManager::max_live_ephemeral`]).
        limit: usize,
    },
    /// The key kept changing under us; try again.
    Conflict,
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for ManageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManageError::NotFound(id) => write!(f, "no key has id {id}"),
            ManageError::Invalid(why) | ManageError::Forbidden(why) => f.write_str(why),
            ManageError::Unusable(id, why) => write!(f, "key {id} is {why}"),
            ManageError::TooManyEphemeral { limit } => write!(
                f,
                "this key has {limit} live ephemeral keys already, the most it may have; revoke one or wait until one expires"
            ),
            ManageError::Conflict => f.write_str("the key changed concurrently; try again"),
            ManageError::Store(e) => write!(f, "key store failed: {e}"),
        }
    }
}

impl std::error::Error for ManageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ManageError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for ManageError {
    fn from(e: StoreError) -> Self {
        ManageError::Store(e)
    }
}

/// Issues and manages keys on a [`KeyAdmin`] store.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tower_gateway_auth::keys::{KeyManager, NewKey};
/// use tower_gateway_auth::store::MemoryStore;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let manager = KeyManager::new(Arc::new(MemoryStore::new()));
/// let issued = manager.issue(NewKey::named("alice").scopes(["chat"])).await.unwrap();
/// println!("your key, shown once: {}", issued.key.expose());
///
/// let next = manager.rotate(issued.record.id(), Duration::from_secs(3600)).await.unwrap();
/// manager.revoke(next.record.id()).await.unwrap();
/// # });
/// ```
pub struct KeyManager<A> {
    store: Arc<A>,
    format: KeyFormat,
    clock: Arc<dyn Clock>,
    default_ttl: Option<Duration>,
    max_ephemeral_ttl: Duration,
    max_live_ephemeral: usize,
    actor: Actor,
    sinks: Vec<Arc<dyn AuditSink>>,
}

/// One round of a compare-and-swap change: done without writing, or these writes, after
/// which the change answers `T`.
enum Attempt<T> {
    Done(T),
    Write(Vec<Write>, T),
}

impl<A> Clone for KeyManager<A> {
    fn clone(&self) -> Self {
        KeyManager {
            store: self.store.clone(),
            format: self.format.clone(),
            clock: self.clock.clone(),
            default_ttl: self.default_ttl,
            max_ephemeral_ttl: self.max_ephemeral_ttl,
            max_live_ephemeral: self.max_live_ephemeral,
            actor: self.actor.clone(),
            sinks: self.sinks.clone(),
        }
    }
}

impl<A> fmt::Debug for KeyManager<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManager")
            .field("format", &self.format)
            .field("default_ttl", &self.default_ttl)
            .field("actor", &self.actor)
            .field("audit_sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl<A: KeyAdmin> KeyManager<A> {
    /// A manager issuing `gw_` keys that live 90 days, on the system clock.
    pub fn new(store: Arc<A>) -> Self {
        KeyManager {
            store,
            format: KeyFormat::new("gw").expect("`gw` is a valid prefix"),
            clock: Arc::new(SystemClock),
            default_ttl: Some(DEFAULT_TTL),
            max_ephemeral_ttl: DEFAULT_MAX_EPHEMERAL_TTL,
            max_live_ephemeral: DEFAULT_MAX_LIVE_EPHEMERAL,
            actor: Actor::Unknown,
            sinks: Vec::new(),
        }
    }

    /// Hands every audit event to `sink` as well as to the log (see [`AuditSink`]).
    pub fn audit_to(mut self, sink: impl AuditSink) -> Self {
        self.sinks.push(Arc::new(sink));
        self
    }

    /// This manager, with its changes attributed to `actor` in the audit trail.
    pub fn acting_as(&self, actor: Actor) -> Self {
        KeyManager {
            actor,
            ..self.clone()
        }
    }

    /// Records one attempt in the audit trail.
    fn audit<T>(
        &self,
        action: AuditAction,
        target: Option<KeyId>,
        successor: Option<KeyId>,
        result: &Result<T, ManageError>,
    ) {
        let outcome = AuditOutcome::of(result);
        self.audit_by(self.actor.clone(), action, target, successor, outcome);
    }

    /// Records an attempt refused before it reached the manager (by the management API's
    /// own rules).
    #[cfg(feature = "axum")]
    pub(crate) fn audit_refusal(&self, action: AuditAction, refusal: &ManageError) {
        self.audit_by(
            self.actor.clone(),
            action,
            None,
            None,
            AuditOutcome::of_error(refusal),
        );
    }

    fn audit_by(
        &self,
        actor: Actor,
        action: AuditAction,
        target: Option<KeyId>,
        successor: Option<KeyId>,
        outcome: AuditOutcome,
    ) {
        let event = AuditEvent {
            time: self.clock.now(),
            actor,
            action,
            target,
            successor,
            outcome,
        };
        audit::log(&event);
        for sink in &self.sinks {
            sink.record(&event);
        }
    }

    /// Issues keys of this format (prefix).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// Reads time from `clock`.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The lifetime of keys issued with [`Lifetime::Default`]; `None` never expires.
    pub fn default_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// The longest lifetime an ephemeral key may ask for.
    pub fn max_ephemeral_ttl(mut self, ttl: Duration) -> Self {
        self.max_ephemeral_ttl = ttl;
        self
    }

    /// How many live (neither revoked nor expired) ephemeral keys one key may have at a
    /// time (default: 100). Past it, minting fails with
    /// [`ManageError::TooManyEphemeral`] (429 in the management API), so that a key cannot
    /// flood the store.
    pub fn max_live_ephemeral(mut self, max: usize) -> Self {
        self.max_live_ephemeral = max;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<A> {
        &self.store
    }

    /// The format of issued keys.
    pub fn format(&self) -> &KeyFormat {
        &self.format
    }

    fn expiry(&self, lifetime: Lifetime, now: Timestamp) -> Option<Timestamp> {
        match lifetime {
            Lifetime::Default => self.default_ttl.map(|ttl| now + ttl),
            Lifetime::Never => None,
            Lifetime::For(ttl) => Some(now + ttl),
            Lifetime::Until(t) => Some(t),
        }
    }

    fn record(&self, key: &ApiKey, hint: String, spec: NewKey, now: Timestamp) -> KeyRecord {
        let digest = self.store.hasher().digest(key.expose().as_bytes());
        KeyRecord::new(KeyId::random(), digest)
            .with_name(spec.name)
            .with_hint(hint)
            .with_created_at(now)
            .with_expires_at(self.expiry(spec.lifetime, now))
            .with_not_before(spec.not_before)
            .with_scope_set(spec.scopes)
            .with_metadata(spec.metadata)
            .with_limits(spec.limits)
            .with_models(spec.models)
    }

    /// A fresh key and its record, not yet stored.
    fn generate(&self, spec: NewKey, now: Timestamp) -> (ApiKey, KeyRecord) {
        let key = self.format.generate();
        let hint = self.format.hint(&key);
        let record = self.record(&key, hint, spec, now);
        (key, record)
    }

    /// Issues a new key. The key is returned once and never stored.
    pub async fn issue(&self, spec: NewKey) -> Result<IssuedKey, ManageError> {
        let now = self.clock.now();
        let (key, record) = self.generate(spec, now);
        let result = self.insert(record).await;
        let target = result.as_ref().ok().map(|r| r.id());
        self.audit(AuditAction::Issue, target, None, &result);
        Ok(IssuedKey {
            key,
            record: result?,
        })
    }

    /// Stores a key issued elsewhere (any shape), by digest. Its hint is its first four
    /// characters when it is long enough for that to be harmless.
    pub async fn import(&self, key: &ApiKey, spec: NewKey) -> Result<Arc<KeyRecord>, ManageError> {
        let hint = key.expose().get(..4).filter(|_| key.expose().len() >= 20);
        let record = self.record(key, hint.unwrap_or("").to_owned(), spec, self.clock.now());
        let result = self.insert(record).await;
        let target = result.as_ref().ok().map(|r| r.id());
        self.audit(AuditAction::Import, target, None, &result);
        result
    }

    async fn insert(&self, record: KeyRecord) -> Result<Arc<KeyRecord>, ManageError> {
        let stored = Arc::new(record.clone());
        match self.store.apply(vec![Write::Insert(record)]).await {
            Ok(()) => Ok(stored),
            Err(WriteError::Conflict | WriteError::TooManyChildren { .. }) => {
                Err(ManageError::Invalid("this key exists already".into()))
            }
            Err(WriteError::Store(e)) => Err(e.into()),
        }
    }

    /// The record with id `id`.
    pub async fn get(&self, id: KeyId) -> Result<Arc<KeyRecord>, ManageError> {
        self.store.get(id).await?.ok_or(ManageError::NotFound(id))
    }

    /// When each of `ids` was last used, to the minute, as [`LastUsed`](crate::keys::LastUsed)
    /// wrote it (`None`: never).
    pub async fn last_used(&self, ids: Vec<KeyId>) -> Result<Vec<Option<Timestamp>>, ManageError> {
        self.store.last_used(ids).await.map_err(ManageError::Store)
    }

    /// Every record, oldest first.
    pub async fn list(&self) -> Result<Vec<Arc<KeyRecord>>, ManageError> {
        let mut all = self.store.list().await?;
        all.sort_by_key(|r| (r.created_at(), r.id()));
        Ok(all)
    }

    /// Revokes the key for good, and every ephemeral key minted from it. (A key minted
    /// while this runs is refused anyway: the inbound layer checks every key's parent.)
    pub async fn revoke(&self, id: KeyId) -> Result<Arc<KeyRecord>, ManageError> {
        let result = self
            .retry(async || {
                let (target, family) = self.family(id).await?;
                let revoked = Arc::new((*target).clone().with_status(KeyStatus::Revoked));
                let writes: Vec<Write> = family
                    .iter()
                    .filter(|r| r.status() != KeyStatus::Revoked)
                    .map(|r| Write::Replace {
                        old: r.clone(),
                        new: (**r).clone().with_status(KeyStatus::Revoked),
                    })
                    .collect();
                Ok(if writes.is_empty() {
                    Attempt::Done(revoked)
                } else {
                    Attempt::Write(writes, revoked)
                })
            })
            .await;
        self.audit(AuditAction::Revoke, Some(id), None, &result);
        result
    }

    /// Key `id` and its family (itself and the ephemeral keys minted from it), read in one
    /// listing.
    async fn family(
        &self,
        id: KeyId,
    ) -> Result<(Arc<KeyRecord>, Vec<Arc<KeyRecord>>), ManageError> {
        let all = self.store.list().await?;
        let target = all
            .iter()
            .find(|r| r.id() == id)
            .cloned()
            .ok_or(ManageError::NotFound(id))?;
        let family = all
            .into_iter()
            .filter(|r| r.id() == id || r.parent() == Some(id))
            .collect();
        Ok((target, family))
    }

    /// Removes the key's record, and those of the ephemeral keys minted from it. Prefer
    /// [`revoke`](Self::revoke), which keeps the record for the audit trail.
    pub async fn delete(&self, id: KeyId) -> Result<Arc<KeyRecord>, ManageError> {
        let result = self
            .retry(async || {
                let (target, family) = self.family(id).await?;
                let writes = family.into_iter().map(Write::Remove).collect();
                Ok(Attempt::Write(writes, target))
            })
            .await;
        self.audit(AuditAction::Delete, Some(id), None, &result);
        result
    }

    /// Disables (`false`) or re-enables (`true`) a key. A revoked key stays revoked.
    pub async fn set_enabled(
        &self,
        id: KeyId,
        enabled: bool,
    ) -> Result<Arc<KeyRecord>, ManageError> {
        let result = self
            .change(id, |r| {
                if r.status() == KeyStatus::Revoked {
                    return Err(ManageError::Invalid(format!("key {id} is revoked")));
                }
                let status = if enabled {
                    KeyStatus::Active
                } else {
                    KeyStatus::Disabled
                };
                Ok(r.clone().with_status(status))
            })
            .await;
        let action = if enabled {
            AuditAction::Enable
        } else {
            AuditAction::Disable
        };
        self.audit(action, Some(id), None, &result);
        result
    }

    /// Changes key `id`'s own limits and models, and its ephemeral keys' with it, in
    /// one atomic write: a child's limits become the parent's new ones, and a child's model
    /// list keeps only what the parent's new list still covers (the parent's list when the
    /// child had none; its own when the parent's is removed: a child is never widened).
    /// Ephemeral keys cannot be changed by themselves
    /// ([`ManageError::Forbidden`]); a revoked key cannot be changed.
    pub async fn change_access(
        &self,
        id: KeyId,
        change: AccessChange,
    ) -> Result<Arc<KeyRecord>, ManageError> {
        let change = &change;
        let result = self
            .retry(async || {
                let (target, family) = self.family(id).await?;
                if target.parent().is_some() {
                    return Err(ManageError::Forbidden(format!(
                        "key {id} is ephemeral: its limits and models are its parent's"
                    )));
                }
                if target.status() == KeyStatus::Revoked {
                    return Err(ManageError::Invalid(format!("key {id} is revoked")));
                }
                let limits = change.limits.unwrap_or_else(|| target.limits().copied());
                let models = change
                    .models
                    .clone()
                    .unwrap_or_else(|| target.models().cloned());
                let changed = |r: &KeyRecord| {
                    let models = match (r.parent(), r.models(), &models) {
                        (None, ..) | (Some(_), None, _) => models.clone(),
                        // A child's own list is never widened by its parent's.
                        (Some(_), Some(own), None) => Some(own.clone()),
                        (Some(_), Some(own), Some(allowed)) => {
                            Some(ModelList::new(own.iter().filter(|m| allowed.covers(m))))
                        }
                    };
                    r.clone().with_limits(limits).with_models(models)
                };
                let updated = Arc::new(changed(&target));
                let writes = family
                    .iter()
                    .filter(|r| r.status() != KeyStatus::Revoked || r.id() == id)
                    .map(|r| Write::Replace {
                        old: r.clone(),
                        new: changed(r),
                    })
                    .filter(|w| match w {
                        Write::Replace { old, new } => **old != *new,
                        _ => true,
                    })
                    .collect::<Vec<_>>();
                Ok(if writes.is_empty() {
                    Attempt::Done(updated)
                } else {
                    Attempt::Write(writes, updated)
                })
            })
            .await;
        self.audit(AuditAction::ChangeAccess, Some(id), None, &result);
        result
    }

    /// Issues a successor to key `id` with the same name, scopes, metadata, status and
    /// lifetime length, and keeps the old key working for `grace` more (never longer than
    /// it would have anyway). After that the old key is rejected as expired. A disabled
    /// key's successor is disabled too; revoked and ephemeral keys cannot be rotated. The
    /// successor continues the old key's line ([`KeyRecord::origin`]).
    pub async fn rotate(&self, id: KeyId, grace: Duration) -> Result<IssuedKey, ManageError> {
        let result = self
            .retry(async || {
                let old = self.get(id).await?;
                if old.parent().is_some() {
                    return Err(ManageError::Forbidden(format!(
                        "key {id} is ephemeral: ephemeral keys cannot be rotated"
                    )));
                }
                if old.status() == KeyStatus::Revoked {
                    return Err(ManageError::Invalid(format!(
                        "key {id} cannot be rotated: it is revoked"
                    )));
                }
                let now = self.clock.now();
                let lifetime = match old.expires_at() {
                    None => Lifetime::Never,
                    Some(end) => Lifetime::For(Duration::from_secs(
                        end.as_unix_secs()
                            .saturating_sub(old.created_at().as_unix_secs()),
                    )),
                };
                let spec = NewKey {
                    name: old.name().to_owned(),
                    scopes: old.scopes().clone(),
                    lifetime,
                    not_before: None,
                    metadata: old.metadata().clone(),
                    limits: old.limits().copied(),
                    models: old.models().cloned(),
                };
                let (key, successor) = self.generate(spec, now);
                let successor = successor
                    .with_status(old.status())
                    .with_origin(old.origin());
                let grace_end = now + grace;
                let old_end = old.expires_at().map_or(grace_end, |t| t.min(grace_end));
                let retired = (*old).clone().with_expires_at(Some(old_end));
                let record = Arc::new(successor.clone());
                let writes = vec![
                    Write::Replace { old, new: retired },
                    Write::Insert(successor),
                ];
                Ok(Attempt::Write(writes, IssuedKey { key, record }))
            })
            .await;
        let successor = result.as_ref().ok().map(|issued| issued.record.id());
        self.audit(AuditAction::Rotate, Some(id), successor, &result);
        result
    }

    /// Mints a short-lived key for `parent` (an authenticated caller): `scopes` must be a
    /// subset of the parent's (all of them when `None`), it lives `ttl` (default 60 s, at
    /// most the configured maximum and never beyond the parent's expiry), and it carries the
    /// parent's metadata.
    ///
    /// The parent is read again here, not trusted from `parent`: a key revoked, disabled or
    /// expired since it was verified mints nothing ([`ManageError::Unusable`]), and the
    /// store checks, in the same atomic write as the insert, that the parent is still what
    /// was read and has fewer than [`max_live_ephemeral`](Self::max_live_ephemeral) live
    /// ephemeral keys. Ephemeral keys cannot mint ([`ManageError::Forbidden`]).
    pub async fn mint_ephemeral(
        &self,
        parent: &Identity,
        spec: Ephemeral,
    ) -> Result<IssuedKey, ManageError> {
        let result = self.mint(parent.id(), spec).await;
        // The parent is the caller by definition, when the manager was not told otherwise.
        let actor = match &self.actor {
            Actor::Unknown => Actor::Key(parent.id()),
            named => named.clone(),
        };
        let target = result.as_ref().ok().map(|issued| issued.record.id());
        self.audit_by(
            actor,
            AuditAction::MintEphemeral,
            target,
            None,
            AuditOutcome::of(&result),
        );
        result
    }

    async fn mint(&self, parent_id: KeyId, spec: Ephemeral) -> Result<IssuedKey, ManageError> {
        let Ephemeral {
            scopes,
            ttl,
            models,
        } = spec;
        let ttl = ttl.unwrap_or(DEFAULT_EPHEMERAL_TTL);
        if ttl.is_zero() || ttl > self.max_ephemeral_ttl {
            return Err(ManageError::Invalid(format!(
                "an ephemeral key lives between 1 and {} seconds",
                self.max_ephemeral_ttl.as_secs()
            )));
        }
        let issued = self
            .retry(async || {
                let now = self.clock.now();
                let current = self
                    .store
                    .get(parent_id)
                    .await?
                    .ok_or(ManageError::Unusable(parent_id, KeyUnusable::Revoked))?;
                if current.parent().is_some() {
                    return Err(ManageError::Forbidden(
                        "an ephemeral key cannot mint another key".into(),
                    ));
                }
                current
                    .usable_at(now)
                    .map_err(|why| ManageError::Unusable(parent_id, why))?;
                let scopes = scopes.clone().unwrap_or_else(|| current.scopes().clone());
                if !scopes.is_subset_of(current.scopes()) {
                    let extra: Vec<&str> = scopes
                        .iter()
                        .filter(|s| !current.scopes().contains(s))
                        .collect();
                    return Err(ManageError::Invalid(format!(
                        "an ephemeral key cannot have scopes its parent lacks: {}",
                        extra.join(" ")
                    )));
                }
                let models = match (&models, current.models()) {
                    (None, inherited) => inherited.cloned(),
                    (Some(asked), None) => Some(asked.clone()),
                    (Some(asked), Some(allowed)) => {
                        let extra: Vec<&str> =
                            asked.iter().filter(|m| !allowed.covers(m)).collect();
                        if !extra.is_empty() {
                            return Err(ManageError::Invalid(format!(
                                "an ephemeral key cannot have models its parent may not use: {}",
                                extra.join(" ")
                            )));
                        }
                        Some(asked.clone())
                    }
                };
                let end = current.expires_at().map_or(now + ttl, |t| t.min(now + ttl));
                let spec = NewKey {
                    name: format!("ephemeral:{}", current.name()),
                    scopes,
                    lifetime: Lifetime::Until(end),
                    not_before: None,
                    metadata: current.metadata().clone(),
                    // Copied, so the child is never allowed more than its parent; it spends
                    // its parent's allowance too (the rate limit keys on the origin).
                    limits: current.limits().copied(),
                    models,
                };
                let (key, child) = self.generate(spec, now);
                let child = child.with_parent(&current);
                let record = Arc::new(child.clone());
                let mint = Write::Mint {
                    child,
                    parent: current,
                    max_live: self.max_live_ephemeral,
                    now,
                };
                Ok(Attempt::Write(vec![mint], IssuedKey { key, record }))
            })
            .await?;
        Ok(issued)
    }

    /// Removes ephemeral keys whose expiry has passed; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, ManageError> {
        let now = self.clock.now();
        let n = self
            .retry(async || {
                let writes: Vec<Write> = self
                    .store
                    .list()
                    .await?
                    .into_iter()
                    .filter(|r| r.parent().is_some() && r.expires_at().is_some_and(|t| t <= now))
                    .map(Write::Remove)
                    .collect();
                let n = writes.len();
                Ok(if n == 0 {
                    Attempt::Done(0)
                } else {
                    Attempt::Write(writes, n)
                })
            })
            .await?;
        if n > 0 {
            tracing::debug!(target: "tower_gateway_auth::lifecycle", removed = n, "expired ephemeral keys purged");
        }
        Ok(n)
    }

    /// Purges expired ephemeral keys every `every`, on the current tokio runtime, until the
    /// returned handle is aborted.
    pub fn spawn_purge(&self, every: Duration) -> tokio::task::JoinHandle<()>
    where
        A: 'static,
    {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(error) = manager.purge_expired().await {
                    tracing::warn!(target: "tower_gateway_auth::lifecycle", %error, "purging expired ephemeral keys failed");
                }
            }
        })
    }

    /// Replaces record `id` by `change(record)`, retrying when it changed concurrently.
    async fn change(
        &self,
        id: KeyId,
        change: impl Fn(&KeyRecord) -> Result<KeyRecord, ManageError>,
    ) -> Result<Arc<KeyRecord>, ManageError> {
        let change = &change;
        self.retry(move || async move {
            let old = self.get(id).await?;
            let new = change(&old)?;
            let shared = Arc::new(new.clone());
            Ok(Attempt::Write(vec![Write::Replace { old, new }], shared))
        })
        .await
    }

    /// Reads, decides and writes until a write lands on what was read: the one
    /// compare-and-swap loop every change goes through.
    async fn retry<T, F>(&self, mut attempt: impl FnMut() -> F) -> Result<T, ManageError>
    where
        F: Future<Output = Result<Attempt<T>, ManageError>>,
    {
        for _ in 0..RETRIES {
            let (writes, answer) = match attempt().await? {
                Attempt::Done(answer) => return Ok(answer),
                Attempt::Write(writes, answer) => (writes, answer),
            };
            match self.store.apply(writes).await {
                Ok(()) => return Ok(answer),
                Err(WriteError::Conflict) => continue,
                Err(WriteError::TooManyChildren { max_live }) => {
                    return Err(ManageError::TooManyEphemeral { limit: max_live });
                }
                Err(WriteError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ManageError::Conflict)
    }
}
