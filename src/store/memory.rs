//! The in-process store: a sharded table from digest to record, of cache-line buckets.

use std::collections::{HashMap, HashSet};
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex};

use crate::clock::Timestamp;
use crate::keys::{KeyDigest, KeyHasher};
use crate::keys::{KeyId, KeyRecord, Scopes};
use crate::store::slots::Slots;
use crate::store::table::{Sharded, shard_index};
use crate::store::{KeyAdmin, KeyStore, LookupResult, StoreError, Write, WriteError};

/// An in-memory [`KeyStore`]: records found by digest in a sharded hash table.
///
/// A lookup is one probe under a read lock and an `Arc` clone; it never waits on I/O, so its
/// future is ready at once. An unknown digest reads one cache line of the table, a known one
/// that line and the record's first. It holds a million keys in about 140 bytes each.
///
/// ```
/// use tower_gateway_auth::keys::{KeyId, KeyRecord};
/// use tower_gateway_auth::store::{KeyStore, MemoryStore};
///
/// let store = MemoryStore::new();
/// let digest = store.hasher().digest(b"gw_secret-key");
/// store.insert(KeyRecord::new(KeyId::random(), digest).with_name("alice"));
/// assert_eq!(store.len(), 1);
/// ```
pub struct MemoryStore {
    records: Sharded<Slots>,
    hasher: KeyHasher,
    /// One shared list per distinct scope set: a million keys usually have a handful.
    scope_sets: Mutex<Interned>,
    /// The digests of the keys minted from each parent, so that a mint counts its parent's
    /// live children without scanning the store. Locked after the tables, never before.
    children: Mutex<HashMap<KeyId, Vec<KeyDigest>>>,
    /// When each key was last used ([`KeyAdmin::note_uses`]), apart from the records.
    uses: Mutex<HashMap<KeyId, Timestamp>>,
}

/// The interned scope sets, and the size past which sets no record uses any more are
/// dropped: keys created and deleted with ever new scopes cannot grow it without bound.
struct Interned {
    sets: HashSet<Scopes>,
    prune_at: usize,
}

/// The interned sets are pruned no earlier than at this many.
const MIN_PRUNE_AT: usize = 64;

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
            scope_sets: Mutex::new(Interned {
                sets: HashSet::new(),
                prune_at: MIN_PRUNE_AT,
            }),
            children: Mutex::new(HashMap::new()),
            uses: Mutex::new(HashMap::new()),
        }
    }

    /// Makes `record` share the store's copy of its scope list.
    fn intern(&self, record: &mut KeyRecord) {
        let mut interned = self.scope_sets.lock().unwrap_or_else(|e| e.into_inner());
        match interned.sets.get(record.scopes()) {
            Some(shared) => record.share_scopes(shared),
            None => {
                interned.sets.insert(record.scopes().clone());
                if interned.sets.len() > interned.prune_at {
                    // Sets held only here belong to no record any more.
                    interned
                        .sets
                        .retain(|s| s.is_shared() || s == record.scopes());
                    interned.prune_at = (interned.sets.len() * 2).max(MIN_PRUNE_AT);
                }
            }
        }
    }

    /// How many distinct scope sets are interned (for tests of the bound).
    #[cfg(test)]
    fn interned(&self) -> usize {
        self.scope_sets.lock().unwrap().sets.len()
    }

    /// Notes that `record` is stored (`true`) or gone (`false`) in the children index.
    fn index(&self, record: &KeyRecord, stored: bool) {
        let Some(parent) = record.parent() else {
            return;
        };
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let list = children.entry(parent).or_default();
        list.retain(|d| d != record.digest());
        if stored {
            list.push(*record.digest());
        } else if list.is_empty() {
            children.remove(&parent);
        }
    }

    /// Rebuilds the children index from every record (after bulk changes).
    fn reindex(&self) {
        let mut fresh: HashMap<KeyId, Vec<KeyDigest>> = HashMap::new();
        for shard in self.records.read_each() {
            for r in shard.iter() {
                if let Some(parent) = r.parent() {
                    fresh.entry(parent).or_default().push(*r.digest());
                }
            }
        }
        *self.children.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    /// Adds `record`, replacing any record with the same digest. Returns the shared record.
    pub fn insert(&self, mut record: KeyRecord) -> Arc<KeyRecord> {
        self.intern(&mut record);
        let record = Arc::new(record);
        let mut shard = self.records.write(record.digest());
        if let Some(old) = shard.insert(record.clone()) {
            self.index(&old, false);
        }
        self.index(&record, true);
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
        let taken = self.records.write(found.digest()).remove(found.digest())?;
        self.index(&taken, false);
        self.forget_use(id);
        Some(taken)
    }

    /// Keeps only the records for which `keep` is true.
    pub fn retain(&self, mut keep: impl FnMut(&KeyRecord) -> bool) {
        for mut shard in self.records.write_each() {
            shard.retain(|r| keep(r));
        }
        self.reindex();
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
        self.reindex();
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
        self.records.read(digest).get(digest).cloned()
    }
}

impl MemoryStore {
    /// Applies `writes` atomically: every shard is locked (in order, so writers cannot
    /// deadlock), every write is checked, then all are applied.
    pub fn apply_now(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let mut tables = self.records.write_all();
        let stored = |tables: &[std::sync::RwLockWriteGuard<'_, Slots>], digest: &KeyDigest| {
            tables[shard_index(digest)].get(digest).cloned()
        };
        let unchanged = |tables: &[_], old: &Arc<KeyRecord>| {
            stored(tables, old.digest()).is_some_and(|s| *s == **old)
        };
        for write in &writes {
            let holds = match write {
                Write::Insert(new) => stored(&tables, new.digest()).is_none(),
                Write::Replace { old, new } => {
                    new.id() == old.id() && new.digest() == old.digest() && unchanged(&tables, old)
                }
                Write::Remove(old) => unchanged(&tables, old),
                Write::Mint {
                    child,
                    parent,
                    max_live,
                    now,
                } => {
                    if stored(&tables, child.digest()).is_none() && unchanged(&tables, parent) {
                        let live = self.live_children(&tables, parent.id(), *now);
                        if live >= *max_live {
                            return Err(WriteError::TooManyChildren {
                                max_live: *max_live,
                            });
                        }
                        true
                    } else {
                        false
                    }
                }
            };
            if !holds {
                return Err(WriteError::Conflict);
            }
        }
        for write in writes {
            match write {
                Write::Insert(mut new)
                | Write::Replace { mut new, .. }
                | Write::Mint { child: mut new, .. } => {
                    self.intern(&mut new);
                    let new = Arc::new(new);
                    tables[shard_index(new.digest())].insert(new.clone());
                    self.index(&new, true);
                }
                Write::Remove(old) => {
                    tables[shard_index(old.digest())].remove(old.digest());
                    self.index(&old, false);
                    self.forget_use(old.id());
                }
            }
        }
        Ok(())
    }

    /// How many children of `parent` are live at `now`, from the index.
    fn live_children(
        &self,
        tables: &[std::sync::RwLockWriteGuard<'_, Slots>],
        parent: KeyId,
        now: Timestamp,
    ) -> usize {
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.get(&parent).map_or(0, |digests| {
            digests
                .iter()
                .filter_map(|d| tables[shard_index(d)].get(d))
                .filter(|r| r.is_live_at(now))
                .count()
        })
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

    async fn note_uses(&self, uses: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        self.note_uses_now(uses);
        Ok(())
    }

    async fn last_used(&self, ids: Vec<KeyId>) -> Result<Vec<Option<Timestamp>>, StoreError> {
        Ok(self.last_used_now(&ids))
    }
}

impl MemoryStore {
    /// [`KeyAdmin::note_uses`], at once.
    pub(crate) fn note_uses_now(&self, uses: impl IntoIterator<Item = (KeyId, Timestamp)>) {
        let noted = {
            let mut known = self.uses.lock().unwrap_or_else(|e| e.into_inner());
            for (id, at) in uses {
                let stored = known.entry(id).or_insert(at);
                *stored = (*stored).max(at);
            }
            known.len()
        };
        // Deletes drop their key's time; uses noted just after a delete, or for ids never
        // stored, go once they could be a noticeable share. (The tables are read with the
        // times unlocked: writes lock them in the other order.)
        if noted > 1024 && noted > 2 * self.len() {
            let ids: HashSet<KeyId> = self.records().iter().map(|r| r.id()).collect();
            let mut known = self.uses.lock().unwrap_or_else(|e| e.into_inner());
            known.retain(|id, _| ids.contains(id));
        }
    }

    fn forget_use(&self, id: KeyId) {
        self.uses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// [`KeyAdmin::last_used`], at once.
    pub(crate) fn last_used_now(&self, ids: &[KeyId]) -> Vec<Option<Timestamp>> {
        let known = self.uses.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().map(|id| known.get(id).copied()).collect()
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

    #[test]
    fn interned_scope_sets_of_records_gone_do_not_pile_up() {
        let store = MemoryStore::new();
        let hasher = KeyHasher::sha256();
        let keep = store
            .insert(KeyRecord::new(KeyId::random(), hasher.digest(b"keep")).with_scopes(["kept"]));
        for i in 0..10_000 {
            let r = store.insert(
                KeyRecord::new(KeyId::random(), hasher.digest(format!("k{i}").as_bytes()))
                    .with_scopes([format!("scope-{i}")]),
            );
            store.remove(r.id()).unwrap();
        }
        assert!(
            store.interned() <= 2 * MIN_PRUNE_AT,
            "{} sets interned",
            store.interned()
        );
        // The sets still in use are still shared.
        let again = store
            .insert(KeyRecord::new(KeyId::random(), hasher.digest(b"again")).with_scopes(["kept"]));
        assert!(again.scopes().same_list(keep.scopes()));
    }
}
