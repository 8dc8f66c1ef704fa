//! The sharded tables keyed by digest that the memory store (of [`Slots`](super::slots::Slots))
//! and the cache (of `hashbrown` tables) are made of.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::keys::KeyDigest;
use crate::keys::KeyRecord;

/// Shards keep writers from stalling every reader, and keep each rehash small.
pub(crate) const SHARDS: usize = 16;

/// What a table holds: something that knows the digest it is found by.
pub(crate) trait Keyed {
    fn digest(&self) -> &KeyDigest;
}

/// A record knows its own digest, so a table of records is a table of pointers.
impl Keyed for Arc<KeyRecord> {
    fn digest(&self) -> &KeyDigest {
        KeyRecord::digest(self)
    }
}

pub(crate) type Shard<E> = HashTable<E>;

/// What one shard of a [`Sharded`] is: a table of entries found by digest.
pub(crate) trait Table: Default {
    type Entry;
    /// The digest `entry` is found by.
    fn digest_of(entry: &Self::Entry) -> &KeyDigest;
    /// A table that holds `n` entries without growing.
    fn with_capacity(n: usize) -> Self;
    /// Inserts `entry`, replacing the one with the same digest.
    fn put(&mut self, entry: Self::Entry);
    fn len(&self) -> usize;
}

impl<E: Keyed> Table for HashTable<E> {
    type Entry = E;
    fn digest_of(entry: &E) -> &KeyDigest {
        entry.digest()
    }
    fn with_capacity(n: usize) -> Self {
        HashTable::with_capacity(n)
    }
    fn put(&mut self, entry: E) {
        put(self, entry);
    }
    fn len(&self) -> usize {
        HashTable::len(self)
    }
}

/// Sixteen `RwLock`ed tables, the digest choosing the table (and, in it, the bucket).
pub(crate) struct Sharded<T> {
    shards: Box<[RwLock<T>]>,
}

/// The shard for `digest`. Byte 8 is past the bytes `table_hash` uses, so shard and bucket
/// choice stay independent.
pub(crate) fn shard_index(digest: &KeyDigest) -> usize {
    usize::from(digest.as_bytes()[8]) % SHARDS
}

/// The entry for `digest` in one shard.
#[inline]
pub(crate) fn find<'t, E: Keyed>(shard: &'t Shard<E>, digest: &KeyDigest) -> Option<&'t E> {
    shard.find(digest.table_hash(), |e| e.digest() == digest)
}

/// Inserts `entry` into one shard, replacing the one with the same digest.
pub(crate) fn put<E: Keyed>(shard: &mut Shard<E>, entry: E) {
    let digest = *entry.digest();
    match shard.entry(
        digest.table_hash(),
        |e| *e.digest() == digest,
        |e| e.digest().table_hash(),
    ) {
        Entry::Occupied(mut e) => *e.get_mut() = entry,
        Entry::Vacant(e) => {
            e.insert(entry);
        }
    }
}

/// Removes the entry for `digest` from one shard.
pub(crate) fn take<E: Keyed>(shard: &mut Shard<E>, digest: &KeyDigest) -> Option<E> {
    shard
        .find_entry(digest.table_hash(), |e| e.digest() == digest)
        .ok()
        .map(|e| e.remove().0)
}

impl<T: Table> Sharded<T> {
    pub(crate) fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| RwLock::new(T::default())).collect(),
        }
    }

    /// The shard for `digest`, locked for reading. A poisoned lock still guards a consistent
    /// table (nothing panics mid-update), so it is used as is.
    #[inline]
    pub(crate) fn read(&self, digest: &KeyDigest) -> RwLockReadGuard<'_, T> {
        self.shards[shard_index(digest)]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The shard for `digest`, locked for writing.
    pub(crate) fn write(&self, digest: &KeyDigest) -> RwLockWriteGuard<'_, T> {
        self.shards[shard_index(digest)]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard in turn, locked for reading.
    pub(crate) fn read_each(&self) -> impl Iterator<Item = RwLockReadGuard<'_, T>> {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every shard in turn, locked for writing.
    pub(crate) fn write_each(&self) -> impl Iterator<Item = RwLockWriteGuard<'_, T>> {
        self.shards
            .iter()
            .map(|s| s.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every shard locked for writing at once (in order, so writers cannot deadlock), indexed
    /// by [`shard_index`].
    pub(crate) fn write_all(&self) -> Vec<RwLockWriteGuard<'_, T>> {
        self.write_each().collect()
    }

    /// Replaces the whole content with `entries` at once, each table sized for what it holds.
    pub(crate) fn replace_all(&self, entries: impl IntoIterator<Item = T::Entry>) {
        let mut split: Vec<Vec<T::Entry>> = (0..SHARDS).map(|_| Vec::new()).collect();
        for entry in entries {
            split[shard_index(T::digest_of(&entry))].push(entry);
        }
        let fresh = split.into_iter().map(|entries| {
            let mut table = T::with_capacity(entries.len());
            for entry in entries {
                table.put(entry);
            }
            table
        });
        for (mut shard, table) in self.write_each().zip(fresh) {
            *shard = table;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.read_each().map(|s| s.len()).sum()
    }
}
