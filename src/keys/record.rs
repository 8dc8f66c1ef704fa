//! What a store knows about a key: its public id, name, validity window, state, scopes and
//! metadata, and the digest it is found by. Never the key.

use std::collections::BTreeMap;

use compact_str::CompactString;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::Timestamp;
use crate::keys::format::{KeyDigest, base62_fixed, base62_parse};
use crate::limit::{Limits, ModelList};

/// A key's public id, safe to log and to show: `key_` and 11 base62 digits.
///
/// It is random and says nothing about the key itself.
///
/// ```
/// use tower_gateway_auth::keys::KeyId;
///
/// let id = KeyId::random();
/// let shown = id.to_string();
/// assert!(shown.starts_with("key_"));
/// assert_eq!(shown.parse::<KeyId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(u64);

impl KeyId {
    const PREFIX: &'static str = "key_";
    const DIGITS: usize = 11;

    /// A fresh random id from the operating system's generator (never `key_00000000000`).
    pub fn random() -> Self {
        loop {
            let n = getrandom::u64().expect("the OS random number generator failed");
            if n != 0 {
                return KeyId(n);
            }
        }
    }

    /// The id's number, e.g. to key a database row.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The id with this number.
    pub const fn from_u64(n: u64) -> Self {
        KeyId(n)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(Self::PREFIX.len() + Self::DIGITS);
        s.push_str(Self::PREFIX);
        base62_fixed(u128::from(self.0), Self::DIGITS, &mut s);
        f.write_str(&s)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The error when a string is not a [`KeyId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseKeyIdError;

impl fmt::Display for ParseKeyIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a key id: expected `key_` followed by 11 base62 digits")
    }
}

impl std::error::Error for ParseKeyIdError {}

impl FromStr for KeyId {
    type Err = ParseKeyIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix(Self::PREFIX).ok_or(ParseKeyIdError)?;
        if digits.len() != Self::DIGITS {
            return Err(ParseKeyIdError);
        }
        let n = base62_parse(digits).ok_or(ParseKeyIdError)?;
        u64::try_from(n).map(KeyId).map_err(|_| ParseKeyIdError)
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether a key may be used at all, apart from its validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyStatus {
    /// Usable within its validity window.
    #[default]
    Active,
    /// Switched off for now; may be enabled again.
    Disabled,
    /// Withdrawn for good.
    Revoked,
}

/// A set of scope names (e.g. `openai`, `admin`). Cheap to clone.
///
/// ```
/// use tower_gateway_auth::keys::Scopes;
///
/// let s = Scopes::new(["chat", "admin", "chat"]);
/// assert!(s.contains("admin"));
/// assert_eq!(s.iter().collect::<Vec<_>>(), ["admin", "chat"]);
/// assert!(Scopes::new(["chat"]).is_subset_of(&s));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Scopes(Arc<ScopeList>);

/// The sorted names behind a thin pointer: a record spends 8 bytes on its scopes, and
/// records with the same scopes share one list (see `MemoryStore`).
#[derive(PartialEq, Eq, Hash)]
struct ScopeList(Box<[Box<str>]>);

impl Scopes {
    /// The given scopes, sorted and without duplicates.
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v: Vec<Box<str>> = scopes.into_iter().map(|s| s.into().into()).collect();
        v.sort_unstable();
        v.dedup();
        Scopes(Arc::new(ScopeList(v.into())))
    }

    /// No scopes.
    pub fn empty() -> Self {
        static EMPTY: std::sync::OnceLock<Scopes> = std::sync::OnceLock::new();
        EMPTY
            .get_or_init(|| Scopes(Arc::new(ScopeList(Box::new([])))))
            .clone()
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.0.binary_search_by(|s| (**s).cmp(scope)).is_ok()
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset_of(&self, other: &Scopes) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.iter().all(|s| other.contains(s))
    }

    /// The scopes, in sorted order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.0.0.iter().map(|s| &**s)
    }

    /// How many scopes there are.
    pub fn len(&self) -> usize {
        self.0.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.0.is_empty()
    }

    /// Whether both share one list (so interning found them equal).
    pub(crate) fn same_list(&self, other: &Scopes) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether anything but this handle holds the list.
    pub(crate) fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

impl Default for Scopes {
    fn default() -> Self {
        Scopes::empty()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Scopes::new(Vec::<String>::deserialize(d)?))
    }
}

/// Free-form string metadata attached to a key (tenant, plan, owner …). Never secret.
pub type Metadata = BTreeMap<String, String>;

static NO_METADATA: Metadata = BTreeMap::new();

/// Why a known key may not be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyUnusable {
    /// The key was revoked.
    Revoked,
    /// The key is disabled.
    Disabled,
    /// The key's expiry has passed.
    Expired,
    /// The key's not-before time has not come yet.
    NotYetValid,
}

impl fmt::Display for KeyUnusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyUnusable::Revoked => "revoked",
            KeyUnusable::Disabled => "disabled",
            KeyUnusable::Expired => "expired",
            KeyUnusable::NotYetValid => "not valid yet",
        })
    }
}

/// Everything a store knows about one key.
///
/// Records are immutable once shared; the `with_*` methods build a changed copy.
///
/// ```
/// use tower_gateway_auth::clock::Timestamp;
/// use tower_gateway_auth::keys::{KeyHasher, KeyId, KeyRecord};
///
/// let digest = KeyHasher::sha256().digest(b"gw_example-key");
/// let record = KeyRecord::new(KeyId::random(), digest)
///     .with_name("ci-runner")
///     .with_scopes(["openai"])
///     .with_expires_at(Some(Timestamp::from_unix_secs(2_000_000_000)));
/// assert!(record.usable_at(Timestamp::from_unix_secs(1_900_000_000)).is_ok());
/// assert!(record.usable_at(Timestamp::from_unix_secs(2_000_000_000)).is_err());
/// ```
///
/// Records are laid out for a store of millions: about 120 bytes each, with no allocation of
/// their own for names up to 24 bytes. Times are kept to the second up to the year 2106; a
/// later expiry counts as never.
#[derive(Clone, PartialEq, Eq)]
#[repr(C)]
pub struct KeyRecord {
    // What every verification reads comes first, to share cache lines with the `Arc` count:
    // with it, the first 80 bytes of the allocation hold all a key check reads (the digest,
    // the status and window, whether there is a parent, the id).
    digest: KeyDigest,
    expires: u32,
    not_before: u32,
    status: KeyStatus,
    created: u32,
    /// What few keys have: where the key comes from (ephemeral keys and rotated
    /// successors) and limits of its own. Boxed, so that other keys pay one pointer for it.
    rare: Option<Box<Rare>>,
    id: KeyId,
    scopes: Scopes,
    name: CompactString,
    hint: Hint,
    metadata: Option<Box<Metadata>>,
}

/// The parts of a record most keys lack.
#[derive(Clone, PartialEq, Eq, Default)]
struct Rare {
    lineage: Lineage,
    access: Access,
}

/// A key's own limits and models.
#[derive(Clone, PartialEq, Eq, Default)]
struct Access {
    limits: Option<Limits>,
    models: Option<ModelList>,
}

/// A key's ancestry.
#[derive(Clone, PartialEq, Eq, Default)]
struct Lineage {
    /// The key this one was minted from (ephemeral keys): its id, and its digest, by which
    /// the inbound layer looks the parent up on every request. `None` as the digest is a
    /// record written before digests were kept: such a child is never usable.
    parent: Option<(KeyId, Option<KeyDigest>)>,
    /// The first key of the line this one continues (through rotations and minting).
    origin: Option<KeyId>,
}

/// `expires` when the key never expires.
const NEVER: u32 = u32::MAX;

/// Seconds since the epoch in 32 bits: up to 2106, later times clamp to `max`.
fn pack(t: Timestamp, max: u32) -> u32 {
    u32::try_from(t.as_unix_secs()).map_or(max, |s| s.min(max))
}

/// The display hint, inline: at most 15 bytes (prefixes are at most 10 characters).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Hint {
    len: u8,
    bytes: [u8; 15],
}

impl Hint {
    fn new(hint: &str) -> Self {
        let mut end = hint.len().min(15);
        while !hint.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 15];
        bytes[..end].copy_from_slice(&hint.as_bytes()[..end]);
        Hint {
            len: end as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("cut at a char boundary")
    }
}

impl KeyRecord {
    /// An active record for the key with this digest, created now, with no name, scopes,
    /// expiry or metadata.
    pub fn new(id: KeyId, digest: KeyDigest) -> Self {
        KeyRecord {
            digest,
            expires: NEVER,
            not_before: 0,
            status: KeyStatus::Active,
            created: pack(Timestamp::now(), NEVER - 1),
            id,
            scopes: Scopes::empty(),
            name: CompactString::default(),
            hint: Hint::new(""),
            metadata: None,
            rare: None,
        }
    }

    /// Sets the human-readable name.
    pub fn with_name(mut self, name: impl AsRef<str>) -> Self {
        self.name = CompactString::new(name);
        self
    }

    /// Sets the display hint (the key's prefix and first characters, e.g. `gw_AbC4`); only
    /// its first 15 bytes are kept.
    pub fn with_hint(mut self, hint: impl AsRef<str>) -> Self {
        self.hint = Hint::new(hint.as_ref());
        self
    }

    /// Sets the creation time.
    pub fn with_created_at(mut self, t: Timestamp) -> Self {
        self.created = pack(t, NEVER - 1);
        self
    }

    /// Sets the expiry: the key is rejected from this second on. `None` never expires.
    pub fn with_expires_at(mut self, t: Option<Timestamp>) -> Self {
        self.expires = t.map_or(NEVER, |t| pack(t, NEVER));
        self
    }

    /// Sets the not-before time: the key is rejected before this second.
    pub fn with_not_before(mut self, t: Option<Timestamp>) -> Self {
        self.not_before = t.map_or(0, |t| pack(t, NEVER - 1));
        self
    }

    /// Sets the status.
    pub fn with_status(mut self, status: KeyStatus) -> Self {
        self.status = status;
        self
    }

    /// Sets the scopes.
    pub fn with_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Scopes::new(scopes);
        self
    }

    /// Sets the scopes from an existing set (shares it).
    pub fn with_scope_set(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = (!metadata.is_empty()).then(|| Box::new(metadata));
        self
    }

    /// Records the key this one was minted from (ephemeral keys): the inbound layer then
    /// accepts this key only while `parent` (looked up by its digest) is usable too. The
    /// key continues the parent's line ([`origin`](Self::origin)).
    pub fn with_parent(mut self, parent: &KeyRecord) -> Self {
        let lineage = self.lineage_mut();
        lineage.parent = Some((parent.id(), Some(*parent.digest())));
        lineage.origin = Some(parent.origin());
        self
    }

    /// Records that this key continues the line of key `origin` (a rotated successor
    /// continues its predecessor's [`origin`](Self::origin)).
    pub fn with_origin(mut self, origin: KeyId) -> Self {
        self.lineage_mut().origin = (origin != self.id).then_some(origin);
        self.drop_empty_rare();
        self
    }

    /// Sets the key's own limits ([`RateLimitLayer`](crate::RateLimitLayer)); `None`, or a
    /// field left unset, takes the layer's default.
    ///
    /// ```
    /// use tower_gateway_auth::keys::{KeyHasher, KeyId, KeyRecord};
    /// use tower_gateway_auth::limit::{Limits, ModelList, Rate};
    ///
    /// let record = KeyRecord::new(KeyId::random(), KeyHasher::sha256().digest(b"k"))
    ///     .with_limits(Some(Limits::new().with_rate(Rate::per_minute(60).with_burst(10))))
    ///     .with_models(Some(ModelList::new(["gpt-4o*"])));
    /// assert_eq!(record.limits().unwrap().rate().unwrap().burst(), 10);
    /// assert!(record.models().unwrap().allows("gpt-4o-mini"));
    /// ```
    pub fn with_limits(mut self, limits: impl Into<Option<Limits>>) -> Self {
        self.access_mut().limits = limits.into();
        self.drop_empty_rare();
        self
    }

    /// Sets the models the key may use ([`ModelAccessLayer`](crate::limit::ModelAccessLayer)):
    /// `None` takes the layer's default (by default any model), an empty list allows none.
    pub fn with_models(mut self, models: impl Into<Option<ModelList>>) -> Self {
        self.access_mut().models = models.into();
        self.drop_empty_rare();
        self
    }

    fn access_mut(&mut self) -> &mut Access {
        &mut self.rare.get_or_insert_with(Box::default).access
    }

    fn drop_empty_rare(&mut self) {
        if self.rare.as_deref() == Some(&Rare::default()) {
            self.rare = None;
        }
    }

    /// The key's own limits, if it has any.
    pub fn limits(&self) -> Option<&Limits> {
        self.rare.as_ref()?.access.limits.as_ref()
    }

    /// The models the key may use, if it is restricted to some.
    pub fn models(&self) -> Option<&ModelList> {
        self.rare.as_ref()?.access.models.as_ref()
    }

    fn lineage(&self) -> Option<&Lineage> {
        self.rare.as_ref().map(|r| &r.lineage)
    }

    fn lineage_mut(&mut self) -> &mut Lineage {
        &mut self.rare.get_or_insert_with(Box::default).lineage
    }

    /// Shares `scopes` when it holds the same names as this record's (interning).
    pub(crate) fn share_scopes(&mut self, scopes: &Scopes) {
        if self.scopes == *scopes && !self.scopes.same_list(scopes) {
            self.scopes = scopes.clone();
        }
    }

    /// The public id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The digest the store finds this record by.
    pub fn digest(&self) -> &KeyDigest {
        &self.digest
    }

    /// The human-readable name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The display hint, empty when none was recorded.
    pub fn hint(&self) -> &str {
        self.hint.as_str()
    }

    /// When the key was created.
    pub fn created_at(&self) -> Timestamp {
        Timestamp::from_unix_secs(self.created.into())
    }

    /// When the key stops working, if ever.
    pub fn expires_at(&self) -> Option<Timestamp> {
        (self.expires != NEVER).then(|| Timestamp::from_unix_secs(self.expires.into()))
    }

    /// When the key starts working, if not at once.
    pub fn not_before(&self) -> Option<Timestamp> {
        (self.not_before != 0).then(|| Timestamp::from_unix_secs(self.not_before.into()))
    }

    /// The status.
    pub fn status(&self) -> KeyStatus {
        self.status
    }

    /// The scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        self.metadata.as_deref().unwrap_or(&NO_METADATA)
    }

    /// The key this one was minted from, for ephemeral keys.
    pub fn parent(&self) -> Option<KeyId> {
        self.lineage()?.parent.map(|(id, _)| id)
    }

    /// The digest of the key this one was minted from: `Some(None)` for a child whose
    /// record predates parent digests (never usable), `None` for a key with no parent.
    pub(crate) fn parent_digest(&self) -> Option<Option<&KeyDigest>> {
        let (_, digest) = self.lineage()?.parent.as_ref()?;
        Some(digest.as_ref())
    }

    /// The first key of the line this key continues: its parent's origin for an ephemeral
    /// key, its predecessor's for a rotated successor, its own id otherwise. Per-caller
    /// choices (such as [`PerIdentity`](crate::upstream::PerIdentity)'s bring-your-own-key) made for
    /// a key follow it through rotations and to the keys it mints.
    pub fn origin(&self) -> KeyId {
        self.lineage().and_then(|l| l.origin).unwrap_or(self.id)
    }

    /// Whether the key still takes up one of its parent's ephemeral slots at `now`: it is
    /// neither revoked nor expired (a disabled key may be enabled again, so it counts).
    pub(crate) fn is_live_at(&self, now: Timestamp) -> bool {
        self.status != KeyStatus::Revoked
            && (self.expires == NEVER || now.as_unix_secs() < u64::from(self.expires))
    }

    /// Whether the key may be used at `now`, and if not, why.
    pub fn usable_at(&self, now: Timestamp) -> Result<(), KeyUnusable> {
        match self.status {
            KeyStatus::Revoked => return Err(KeyUnusable::Revoked),
            KeyStatus::Disabled => return Err(KeyUnusable::Disabled),
            KeyStatus::Active => {}
        }
        let now = now.as_unix_secs();
        if now >= u64::from(self.expires) && self.expires != NEVER {
            return Err(KeyUnusable::Expired);
        }
        if now < u64::from(self.not_before) {
            return Err(KeyUnusable::NotYetValid);
        }
        Ok(())
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("hint", &self.hint())
            .field("created_at", &self.created_at())
            .field("expires_at", &self.expires_at())
            .field("not_before", &self.not_before())
            .field("status", &self.status)
            .field("scopes", &self.scopes)
            .field("metadata", self.metadata())
            .field("parent", &self.parent())
            .field("origin", &self.origin())
            .field("limits", &self.limits())
            .field("models", &self.models())
            .finish_non_exhaustive()
    }
}

/// The stored form of a record (the file store's JSON, Redis values): the same fields with
/// plain types, so the compact layout above is free to change.
#[derive(Serialize)]
struct RecordOut<'a> {
    id: KeyId,
    #[serde(with = "digest_hex")]
    digest: &'a KeyDigest,
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    hint: &'a str,
    created_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_before: Option<Timestamp>,
    status: KeyStatus,
    scopes: &'a Scopes,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Metadata>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<KeyId>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_digest_hex")]
    parent_digest: Option<&'a KeyDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<KeyId>,
    // Last, and left out when unset, so that a record without them is written byte for
    // byte as before (Redis writes compare the stored JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<&'a Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<&'a ModelList>,
}

#[derive(Deserialize)]
struct RecordIn {
    id: KeyId,
    #[serde(deserialize_with = "digest_hex::deserialize")]
    digest: KeyDigest,
    #[serde(default)]
    name: String,
    #[serde(default)]
    hint: String,
    created_at: Timestamp,
    #[serde(default)]
    expires_at: Option<Timestamp>,
    #[serde(default)]
    not_before: Option<Timestamp>,
    #[serde(default)]
    status: KeyStatus,
    #[serde(default)]
    scopes: Scopes,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    parent: Option<KeyId>,
    #[serde(default, deserialize_with = "opt_digest_hex::deserialize")]
    parent_digest: Option<KeyDigest>,
    #[serde(default)]
    origin: Option<KeyId>,
    #[serde(default)]
    limits: Option<Limits>,
    #[serde(default)]
    models: Option<ModelList>,
}

impl Serialize for KeyRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RecordOut {
            id: self.id,
            digest: &self.digest,
            name: &self.name,
            hint: self.hint(),
            created_at: self.created_at(),
            expires_at: self.expires_at(),
            not_before: self.not_before(),
            status: self.status,
            scopes: &self.scopes,
            metadata: self.metadata.as_deref(),
            parent: self.parent(),
            parent_digest: self.parent_digest().flatten(),
            origin: self.lineage().and_then(|l| l.origin),
            limits: self.limits(),
            models: self.models(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for KeyRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RecordIn::deserialize(d)?;
        Ok(KeyRecord::new(r.id, r.digest)
            .with_name(r.name)
            .with_hint(r.hint)
            .with_created_at(r.created_at)
            .with_expires_at(r.expires_at)
            .with_not_before(r.not_before)
            .with_status(r.status)
            .with_scope_set(r.scopes)
            .with_metadata(r.metadata)
            .with_lineage(r.parent.map(|id| (id, r.parent_digest)), r.origin)
            .with_limits(r.limits)
            .with_models(r.models))
    }
}

impl KeyRecord {
    fn with_lineage(
        mut self,
        parent: Option<(KeyId, Option<KeyDigest>)>,
        origin: Option<KeyId>,
    ) -> Self {
        let lineage = Lineage {
            parent,
            origin: origin.filter(|o| *o != self.id),
        };
        *self.lineage_mut() = lineage;
        self.drop_empty_rare();
        self
    }
}

mod opt_digest_hex {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        d: &Option<&KeyDigest>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.to_hex()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<KeyDigest>, D::Error> {
        Option::<std::borrow::Cow<'de, str>>::deserialize(d)?
            .map(|s| {
                KeyDigest::from_hex(&s)
                    .ok_or_else(|| serde::de::Error::custom("digest must be 64 hex digits"))
            })
            .transpose()
    }
}

mod digest_hex {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &&KeyDigest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyDigest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyDigest::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("digest must be 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::format::KeyHasher;

    fn record() -> KeyRecord {
        KeyRecord::new(KeyId::from_u64(7), KeyHasher::sha256().digest(b"k"))
    }

    #[test]
    fn key_id_round_trips_and_rejects_junk() {
        for n in [0, 1, u64::MAX] {
            let id = KeyId::from_u64(n);
            assert_eq!(id.to_string().len(), 15);
            assert_eq!(id.to_string().parse::<KeyId>(), Ok(id));
        }
        for bad in [
            "",
            "key_",
            "key_123",
            "kez_00000000000",
            "key_0000000000!",
            "key_zzzzzzzzzzz",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validity_window_and_status() {
        let t = Timestamp::from_unix_secs;
        let r = record()
            .with_not_before(Some(t(10)))
            .with_expires_at(Some(t(20)));
        assert_eq!(r.usable_at(t(9)), Err(KeyUnusable::NotYetValid));
        assert_eq!(r.usable_at(t(10)), Ok(()));
        assert_eq!(r.usable_at(t(19)), Ok(()));
        assert_eq!(r.usable_at(t(20)), Err(KeyUnusable::Expired));
        let r = r.with_status(KeyStatus::Disabled);
        assert_eq!(r.usable_at(t(15)), Err(KeyUnusable::Disabled));
        let r = r.with_status(KeyStatus::Revoked);
        assert_eq!(r.usable_at(t(15)), Err(KeyUnusable::Revoked));
    }

    #[test]
    fn the_compact_layout_keeps_every_value() {
        assert!(
            std::mem::size_of::<KeyRecord>() <= 120,
            "{}",
            std::mem::size_of::<KeyRecord>()
        );
        let t = Timestamp::from_unix_secs;
        let r = record()
            .with_created_at(t(1_700_000_000))
            .with_expires_at(Some(t(1_800_000_000)))
            .with_not_before(Some(t(1_700_000_100)))
            .with_parent(&KeyRecord::new(
                KeyId::from_u64(42),
                KeyHasher::sha256().digest(b"p"),
            ))
            .with_hint("prefix1234_abcdefgh");
        assert_eq!(r.created_at(), t(1_700_000_000));
        assert_eq!(r.expires_at(), Some(t(1_800_000_000)));
        assert_eq!(r.not_before(), Some(t(1_700_000_100)));
        assert_eq!(r.parent(), Some(KeyId::from_u64(42)));
        assert_eq!(r.origin(), KeyId::from_u64(42));
        assert_eq!(
            r.parent_digest(),
            Some(Some(&KeyHasher::sha256().digest(b"p")))
        );
        assert_eq!(r.hint(), "prefix1234_abcd", "hints keep 15 bytes");
        assert_eq!(record().with_hint("gw_ä€").hint(), "gw_ä€");
        assert_eq!(
            record().with_hint("gw_abcdefghijk€").hint(),
            "gw_abcdefghijk",
            "cut at a char boundary"
        );
        // Beyond 2106 an expiry is as good as never; an earlier one is exact.
        let far = record().with_expires_at(Some(t(u64::from(u32::MAX) + 10)));
        assert_eq!(far.expires_at(), None);
        assert_eq!(record().with_expires_at(None).expires_at(), None);
        let json = serde_json::to_string(&r).unwrap();
        let back: KeyRecord = serde_json::from_str(&json).unwrap();
        assert!(back == r, "{json}");
    }

    #[test]
    fn limits_and_models_round_trip_and_old_records_keep_their_bytes() {
        use crate::limit::Rate;
        let plain = record()
            .with_name("n")
            .with_created_at(Timestamp::from_unix_secs(5));
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("limits") && !json.contains("models"),
            "{json}"
        );
        // A record written before limits existed loads, and is written back unchanged.
        let back: KeyRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.limits(), None);
        let limited = plain
            .clone()
            .with_limits(Limits::new().with_rate(Rate::per_minute(60).with_burst(10)))
            .with_models(ModelList::new(["gpt-4o*"]));
        let json = serde_json::to_string(&limited).unwrap();
        assert!(
            json.ends_with(r#""limits":{"requests_per_period":60,"period":60,"burst":10},"models":["gpt-4o*"]}"#),
            "{json}"
        );
        let back: KeyRecord = serde_json::from_str(&json).unwrap();
        assert!(back == limited);
        // Clearing both leaves the record as it was.
        assert!(limited.with_limits(None).with_models(None) == plain);
        assert!(std::mem::size_of::<KeyRecord>() <= 120);
    }

    #[test]
    fn debug_and_json_never_hold_more_than_the_digest() {
        let r = record().with_name("n");
        let debug = format!("{r:?}");
        assert!(!debug.contains(&r.digest().to_hex()));
        let json = serde_json::to_string(&r).unwrap();
        let back: KeyRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.digest(), r.digest());
        assert_eq!(back.id(), r.id());
        assert_eq!(back.name(), "n");
    }
}
