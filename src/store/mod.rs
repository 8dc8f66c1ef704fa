//! Where keys are verified: the [`KeyStore`] trait and the stores that come with the crate.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::key::{KeyDigest, KeyHasher};
use crate::record::KeyRecord;

mod memory;

pub use memory::MemoryStore;

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
/// in-process stores; a remote store can set `type Lookup = BoxLookup` and box.
///
/// ```
/// use std::future::{Ready, ready};
/// use std::sync::Arc;
/// use tower_gateway_auth::{KeyDigest, KeyRecord, KeyStore, LookupResult};
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
    type Lookup: Future<Output = LookupResult> + Send + 'static;

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

/// A boxed lookup future, for stores whose lookups are `async` blocks.
pub type BoxLookup = std::pin::Pin<Box<dyn Future<Output = LookupResult> + Send + 'static>>;

/// A store fault: the store could not answer (unreachable, timed out, corrupt).
///
/// Its message must never contain a key or a digest; it may be logged.
pub struct StoreError {
    message: Cow<'static, str>,
    source: Option<Box<dyn Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// A fault described by `message`.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        StoreError {
            message: message.into(),
            source: None,
        }
    }

    /// A fault described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn Error + Send + Sync + 'static>>,
    ) -> Self {
        StoreError {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The description.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}
