//! The in-process store: a sharded hash table from digest to record.

use std::collections::HashSet;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex};

use crate::key::{KeyDigest, KeyHasher};
use crate::record::{KeyId, KeyRecord, Scopes};
use crate::store::table::{self, Sharded, shard_index};
use crate::store::{KeyAdmin, KeyStore, LookupResult, StoreError, Write, WriteError};

/// An in-memory [`KeyStore`]: records found by digest in a sharded hash table.
///
/// A lookup is one hash-table probe under a read lock and an `Arc` clone; it never waits on
/// I/O, so its future is ready at once. It holds a million keys comfortably.
///
/// ```
/// use tower_gateway_auth::{KeyId, KeyRecord, KeyStore, MemoryStore};
///
/// let store = MemoryStore::new();
/// let digest = store.hasher().digest(b"gw_secret-key");
/// store.insert(KeyRecord::new(KeyId::random(), digest).with_name("alice"));
/// assert_eq!(store.len(), 1);
/// ```
pub struct MemoryStore {
    records: Sharded<Arc<KeyRecord>>,
    hasher: KeyHasher,
    /// One shared list per distinct scope set: a million keys usually have a handful.
    scope_sets: Mutex<HashSet<Scopes>>,
}

impl MemoryStore {
    /// An empty store hashing keys with plain SHA-256.
    pub fn new() -> Self {
        Self::with_hasher(KeyHasher::sha256())
    }

    /// An empty store hashing keys with `hasher` (e.g. peppered).
    pub fn with_hasher(hasher: KeyHasher) -> Self {
        MemoryStore {
            records: Sharded::new(),
            hasher,
            scope_sets: Mutex::new(HashSet::new()),
        }
    }

    /// Makes `record` share the store's copy of its scope list.
    fn intern(&self, record: &mut KeyRecord) {
        let mut sets = self.scope_sets.lock().unwrap_or_else(|e| e.into_inner());
        match sets.get(record.scopes()) {
            Some(shared) => record.share_scopes(shared),
            None => {
                sets.insert(record.scopes().clone());
            }
        }
    }

    /// Adds `record`, replacing any record with the same digest. Returns the shared record.
    pub fn insert(&self, mut record: KeyRecord) -> Arc<KeyRecord> {
        self.intern(&mut record);
        let record = Arc::new(record);
        table::put(&mut self.records.write(record.digest()), record.clone());
        record
    }

    /// The record with public id `id`. This scans the store: it is for management, not for
    /// the request path.
    pub fn by_id(&self, id: KeyId) -> Option<Arc<KeyRecord>> {
        self.records
            .read_each()
            .find_map(|shard| shard.iter().find(|r| r.id() == id).cloned())
    }

    /// Removes the record with id `id`; returns it.
    pub fn remove(&self, id: KeyId) -> Option<Arc<KeyRecord>> {
        let found = self.by_id(id)?;
        table::take(&mut self.records.write(found.digest()), found.digest())
    }

    /// Keeps only the records for which `keep` is true.
    pub fn retain(&self, mut keep: impl FnMut(&KeyRecord) -> bool) {
        for mut shard in self.records.write_each() {
            shard.retain(|r| keep(r));
        }
    }

    /// Every record, in no particular order.
    pub fn records(&self) -> Vec<Arc<KeyRecord>> {
        let mut all = Vec::new();
        for shard in self.records.read_each() {
            all.extend(shard.iter().cloned());
        }
        all
    }

    /// Replaces the whole content with `records` at once (used when reloading from a file).
    pub fn replace_all(&self, records: impl IntoIterator<Item = Arc<KeyRecord>>) {
        self.records
            .replace_all(records.into_iter().map(|mut record| {
                if let Some(unique) = Arc::get_mut(&mut record) {
                    self.intern(unique);
                }
                record
            }));
    }

    /// How many records the store holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record for `digest`, synchronously.
    pub fn lookup_now(&self, digest: &KeyDigest) -> Option<Arc<KeyRecord>> {
        table::find(&self.records.read(digest), digest).cloned()
    }
}

impl MemoryStore {
    /// Applies `writes` atomically: every shard is locked (in order, so writers cannot
    /// deadlock), every write is checked, then all are applied.
    pub fn apply_now(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let mut tables = self.records.write_all();
        let stored =
            |tables: &[std::sync::RwLockWriteGuard<'_, table::Shard<Arc<KeyRecord>>>],
             digest: &KeyDigest| {
                table::find(&tables[shard_index(digest)], digest).cloned()
            };
        for write in &writes {
            let holds = match write {
                Write::Insert(new) => stored(&tables, new.digest()).is_none(),
                Write::Replace { old, new } => {
                    new.id() == old.id()
                        && new.digest() == old.digest()
                        && stored(&tables, old.digest()).is_some_and(|s| *s == **old)
                }
                Write::Remove(old) => stored(&tables, old.digest()).is_some_and(|s| *s == **old),
            };
            if !holds {
                return Err(WriteError::Conflict);
            }
        }
        for write in writes {
            match write {
                Write::Insert(mut new) | Write::Replace { mut new, .. } => {
                    self.intern(&mut new);
                    table::put(&mut tables[shard_index(new.digest())], Arc::new(new));
                }
                Write::Remove(old) => {
                    table::take(&mut tables[shard_index(old.digest())], old.digest());
                }
            }
        }
        Ok(())
    }
}

impl KeyAdmin for MemoryStore {
    async fn get(&self, id: KeyId) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        Ok(self.by_id(id))
    }

    async fn list(&self) -> Result<Vec<Arc<KeyRecord>>, StoreError> {
        Ok(self.records())
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        self.apply_now(writes)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .field("hasher", &self.hasher)
            .finish()
    }
}

impl KeyStore for MemoryStore {
    type Lookup = Ready<LookupResult>;

    fn lookup(&self, digest: &KeyDigest) -> Self::Lookup {
        ready(Ok(self.lookup_now(digest)))
    }

    fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_with_equal_scopes_share_one_list() {
        let store = MemoryStore::new();
        let hasher = KeyHasher::sha256();
        let a = store
            .insert(KeyRecord::new(KeyId::random(), hasher.digest(b"a")).with_scopes(["x", "y"]));
        let b = store
            .insert(KeyRecord::new(KeyId::random(), hasher.digest(b"b")).with_scopes(["y", "x"]));
        let c =
            store.insert(KeyRecord::new(KeyId::random(), hasher.digest(b"c")).with_scopes(["x"]));
        assert!(a.scopes().same_list(b.scopes()));
        assert!(!a.scopes().same_list(c.scopes()));
        store.replace_all([Arc::new(
            KeyRecord::new(KeyId::random(), hasher.digest(b"d")).with_scopes(["x"]),
        )]);
        let d = store.lookup_now(&hasher.digest(b"d")).unwrap();
        assert!(d.scopes().same_list(c.scopes()));
    }
}
