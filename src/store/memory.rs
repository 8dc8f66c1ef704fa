//! The in-process store: a sharded hash table from digest to record.

use std::collections::HashSet;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::HashTable;

use crate::key::{KeyDigest, KeyHasher};
use crate::record::{KeyId, KeyRecord, Scopes};
use crate::store::{KeyAdmin, KeyStore, LookupResult, StoreError, Write, WriteError};

/// Shards keep writers from stalling every reader, and keep each rehash small.
const SHARDS: usize = 16;

type Shard = RwLock<HashTable<Arc<KeyRecord>>>;

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
    shards: Box<[Shard]>,
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
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            hasher,
            scope_sets: Mutex::new(HashSet::new()),
        }
    }

    fn shard(&self, digest: &KeyDigest) -> &Shard {
        &self.shards[shard_index(digest)]
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
        let mut table = self
            .shard(record.digest())
            .write()
            .unwrap_or_else(|e| e.into_inner());
        put(&mut table, record.clone());
        record
    }

    /// The record with public id `id`. This scans the store: it is for management, not for
    /// the request path.
    pub fn by_id(&self, id: KeyId) -> Option<Arc<KeyRecord>> {
        self.shards.iter().find_map(|shard| {
            let table = shard.read().unwrap_or_else(|e| e.into_inner());
            table.iter().find(|r| r.id() == id).cloned()
        })
    }

    /// Removes the record with id `id`; returns it.
    pub fn remove(&self, id: KeyId) -> Option<Arc<KeyRecord>> {
        let mut removed = None;
        for shard in self.shards.iter() {
            shard
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|r| {
                    if r.id() == id && removed.is_none() {
                        removed = Some(r.clone());
                        false
                    } else {
                        true
                    }
                });
            if removed.is_some() {
                break;
            }
        }
        removed
    }

    /// Keeps only the records for which `keep` is true.
    pub fn retain(&self, mut keep: impl FnMut(&KeyRecord) -> bool) {
        for shard in self.shards.iter() {
            shard
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|r| keep(r));
        }
    }

    /// Every record, in no particular order.
    pub fn records(&self) -> Vec<Arc<KeyRecord>> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(
                shard
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned(),
            );
        }
        all
    }

    /// Replaces the whole content with `records` at once (used when reloading from a file).
    pub fn replace_all(&self, records: impl IntoIterator<Item = Arc<KeyRecord>>) {
        let mut tables: Vec<HashTable<Arc<KeyRecord>>> =
            (0..SHARDS).map(|_| HashTable::new()).collect();
        for mut record in records {
            if let Some(unique) = Arc::get_mut(&mut record) {
                self.intern(unique);
            }
            put(&mut tables[shard_index(record.digest())], record);
        }
        for (shard, table) in self.shards.iter().zip(tables) {
            *shard.write().unwrap_or_else(|e| e.into_inner()) = table;
        }
    }

    /// How many records the store holds.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record for `digest`, synchronously.
    pub fn lookup_now(&self, digest: &KeyDigest) -> Option<Arc<KeyRecord>> {
        let table = self.shard(digest).read().unwrap_or_else(|e| e.into_inner());
        table
            .find(digest.table_hash(), |r| r.digest() == digest)
            .cloned()
    }
}

impl MemoryStore {
    /// Applies `writes` atomically: every shard is locked (in order, so writers cannot
    /// deadlock), every write is checked, then all are applied.
    pub fn apply_now(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let mut tables: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.write().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let stored = |tables: &[std::sync::RwLockWriteGuard<'_, HashTable<Arc<KeyRecord>>>],
                      digest: &KeyDigest| {
            tables[shard_index(digest)]
                .find(digest.table_hash(), |r| r.digest() == digest)
                .cloned()
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
                    put(&mut tables[shard_index(new.digest())], Arc::new(new));
                }
                Write::Remove(old) => {
                    let digest = old.digest();
                    if let Ok(entry) = tables[shard_index(digest)]
                        .find_entry(digest.table_hash(), |r| r.digest() == digest)
                    {
                        entry.remove();
                    }
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

fn shard_index(digest: &KeyDigest) -> usize {
    // Byte 8 is past the bytes `table_hash` uses, so shard and bucket choice stay independent.
    usize::from(digest.as_bytes()[8]) % SHARDS
}

/// Inserts `record`, replacing the one with the same digest.
fn put(table: &mut HashTable<Arc<KeyRecord>>, record: Arc<KeyRecord>) {
    let digest = *record.digest();
    match table.entry(
        digest.table_hash(),
        |r| *r.digest() == digest,
        |r| r.digest().table_hash(),
    ) {
        hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = record,
        hashbrown::hash_table::Entry::Vacant(e) => {
            e.insert(record);
        }
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
