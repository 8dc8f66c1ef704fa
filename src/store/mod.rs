//! Where keys are verified: the [`KeyStore`] trait and the stores that come with the crate.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::error_detail::ErrorDetail;
use crate::keys::KeyRecord;
use crate::keys::{KeyDigest, KeyHasher};

mod cached;
mod file;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod slots;
mod table;

pub use cached::{CachedLookup, CachedStore, CachedStoreBuilder};
pub use file::{FileStore, FileStoreBuilder};
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::{InvalidationListener, RedisStore, RedisStoreBuilder, listen_for_invalidations};

use crate::keys::KeyId;

/// What a lookup finds: the record, `None` for an unknown key, or a store fault.
pub type LookupResult = Result<Option<Arc<KeyRecord>>, StoreError>;

static SHA256: KeyHasher = KeyHasher::sha256();

/// A source of key records, found by the digest of the presented key.
///
/// The lookup is asynchronous and fallible so that remote stores (Redis, SQL) fit; an
/// unknown key is `Ok(None)`, distinct from a fault (`Err`), which the layer answers with 503.
/// A store keeps only digests; it never sees the key.
///
/// The lookup returns a named future so that the layer's future needs no allocation for
/// in-process stores; a remote store can set `type Lookup = BoxLookup` and box. The future
/// is `Unpin` (as [`CredentialSource::Future`](crate::upstream::CredentialSource::Future) is) so that
/// the layers can poll it in place; an `async` block becomes one with `Box::pin`.
///
/// ```
/// use std::future::{Ready, ready};
/// use std::sync::Arc;
/// use tower_gateway_auth::keys::{KeyDigest, KeyRecord};
/// use tower_gateway_auth::store::{KeyStore, LookupResult};
///
/// /// A store that knows exactly one key.
/// struct OneKey(Arc<KeyRecord>);
///
/// impl KeyStore for OneKey {
///     type Lookup = Ready<LookupResult>;
///     fn lookup(&self, digest: &KeyDigest) -> Self::Lookup {
///         ready(Ok((self.0.digest() == digest).then(|| self.0.clone())))
///     }
/// }
/// ```
pub trait KeyStore: Send + Sync + 'static {
    /// The future a lookup returns.
    type Lookup: Future<Output = LookupResult> + Send + Unpin + 'static;

    /// Finds the record whose digest is `digest`.
    fn lookup(&self, digest: &KeyDigest) -> Self::Lookup;

    /// How presented keys are turned into digests for this store: plain SHA-256 unless the
    /// store was built with a pepper.
    fn hasher(&self) -> &KeyHasher {
        &SHA256
    }
}

impl<T: KeyStore> KeyStore for Arc<T> {
    type Lookup = T::Lookup;

    fn lookup(&self, digest: &KeyDigest) -> Self::Lookup {
        (**self).lookup(digest)
    }

    fn hasher(&self) -> &KeyHasher {
        (**self).hasher()
    }
}

/// One change to a store, applied by [`KeyAdmin::apply`].
///
/// Changes to existing records are compare-and-swap: they name the record they expect to
/// find, so that two writers (two processes on one file, two replicas on one Redis) never
/// silently undo each other's work.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Write {
    /// Adds a record whose digest is not in the store yet.
    Insert(KeyRecord),
    /// Replaces `old` with `new` (same id and digest), if `old` is still what is stored.
    Replace {
        /// The record as it was read.
        old: Arc<KeyRecord>,
        /// Its replacement.
        new: KeyRecord,
    },
    /// Removes the record, if it is still what is stored.
    Remove(Arc<KeyRecord>),
    /// Adds `child`, a key minted from `parent` ([`KeyRecord::with_parent`]), if `parent` is
    /// still exactly what is stored and has fewer than `max_live` live children at `now`
    /// (children neither revoked nor expired). Checking the parent in the same atomic step
    /// as the insert is what keeps a revocation from being outrun by a mint.
    Mint {
        /// The new key.
        child: KeyRecord,
        /// The parent as it was read and judged usable.
        parent: Arc<KeyRecord>,
        /// The most live children the parent may have, this one included.
        max_live: usize,
        /// The time `max_live` counts at.
        now: Timestamp,
    },
}

impl Write {
    /// The record the write creates, changes or removes.
    pub fn record(&self) -> &KeyRecord {
        match self {
            Write::Insert(r) | Write::Replace { new: r, .. } | Write::Mint { child: r, .. } => r,
            Write::Remove(r) => r,
        }
    }
}

/// Why [`KeyAdmin::apply`] changed nothing.
#[derive(Debug)]
#[non_exhaustive]
pub enum WriteError {
    /// A record changed since it was read, or an inserted digest exists already: read again
    /// and retry.
    Conflict,
    /// A [`Write::Mint`]'s parent has `max_live` live children already.
    TooManyChildren {
        /// The limit.
        max_live: usize,
    },
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Conflict => f.write_str("the key changed concurrently"),
            WriteError::TooManyChildren { max_live } => {
                write!(f, "the key has {max_live} live ephemeral keys already")
            }
            WriteError::Store(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl Error for WriteError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            WriteError::Conflict | WriteError::TooManyChildren { .. } => None,
            WriteError::Store(e) => Some(e),
        }
    }
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        WriteError::Store(e)
    }
}

/// A store that can be managed: listed, read by id and changed. What
/// [`KeyManager`](crate::keys::KeyManager), the management API and the keygen example work on.
pub trait KeyAdmin: KeyStore {
    /// The record with public id `id`.
    fn get(
        &self,
        id: KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, StoreError>> + Send;

    /// Every record.
    fn list(&self) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, StoreError>> + Send;

    /// Applies every write, or none of them.
    fn apply(&self, writes: Vec<Write>) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Records when keys were used (written in batches by
    /// [`LastUsed`](crate::keys::LastUsed)): each time replaces the one stored for its key
    /// only if it is later; ids with no record are skipped. Last-used times are kept apart
    /// from the records: writing them changes no record, invalidates no cache and never
    /// conflicts with a key-management write.
    fn note_uses(
        &self,
        uses: Vec<(KeyId, Timestamp)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// When each of `ids` was last used, in the same order (`None`: never, as far as the
    /// store knows).
    fn last_used(
        &self,
        ids: Vec<KeyId>,
    ) -> impl Future<Output = Result<Vec<Option<Timestamp>>, StoreError>> + Send;
}

impl<T: KeyAdmin> KeyAdmin for Arc<T> {
    fn get(
        &self,
        id: KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, StoreError>> + Send {
        (**self).get(id)
    }

    fn list(&self) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, StoreError>> + Send {
        (**self).list()
    }

    fn apply(&self, writes: Vec<Write>) -> impl Future<Output = Result<(), WriteError>> + Send {
        (**self).apply(writes)
    }

    fn note_uses(
        &self,
        uses: Vec<(KeyId, Timestamp)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).note_uses(uses)
    }

    fn last_used(
        &self,
        ids: Vec<KeyId>,
    ) -> impl Future<Output = Result<Vec<Option<Timestamp>>, StoreError>> + Send {
        (**self).last_used(ids)
    }
}

/// A boxed lookup future, for stores whose lookups are `async` blocks.
pub type BoxLookup = std::pin::Pin<Box<dyn Future<Output = LookupResult> + Send + 'static>>;

/// A store fault: the store could not answer (unreachable, timed out, corrupt).
///
/// Its message must never contain a key or a digest; it may be logged.
pub struct StoreError(Box<ErrorDetail>);

impl StoreError {
    /// A fault described by `message`.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        StoreError(ErrorDetail::new(message, None))
    }

    /// A fault described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn Error + Send + Sync + 'static>>,
    ) -> Self {
        StoreError(ErrorDetail::new(message, Some(source.into())))
    }

    /// The description.
    pub fn message(&self) -> &str {
        self.0.message()
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.debug("StoreError", f)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}
