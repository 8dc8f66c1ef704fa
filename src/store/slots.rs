//! The memory store's table: records found by digest in buckets of one cache line each, the
//! tag that rejects a stranger in the same line as the pointer that finds the record.
//!
//! A `hashbrown` table keeps its control bytes and its slots in two arrays, so a lookup in a
//! table far larger than the cache reads a control group, then a slot, then the record: three
//! misses one after the other. Here a bucket is one 64-byte line holding six 16-bit tags (from
//! digest bytes that neither the shard nor the bucket choice uses) and the six record
//! pointers they belong to. An unknown digest costs the one line (a tag matches by chance once
//! in 65,535 occupied slots); a known one, that line and the record, which the caller reads
//! anyway (the `Arc` count of the record it takes, its status and validity window, and the
//! whole digest it compares in constant time, all in the record's first 72 bytes).
//!
//! Why not the record's hot fields themselves in the slot: the lookup hands out an
//! `Arc<KeyRecord>`, whose count is in the record, so a pass touches the record whatever the
//! slot holds; and 48 more bytes per slot would take the store from about 140 to over
//! 200 bytes per key. Pointer and tag in one line give the same two misses for a pass (the
//! floor's count: a control group and a slot) at 16 bytes per slot.
//!
//! Buckets overflow into the next one (linear probing by bucket). A bucket that ever
//! overflowed says so, and only then does a lookup that misses in it look on; removals leave
//! the mark (a rebuild clears it). The bucket count is any number (the hash is mapped onto it
//! by multiplication), so the load is held between [`MIN_LOAD`] and [`MAX_LOAD`].

use std::sync::Arc;

use crate::keys::{KeyDigest, KeyRecord};

/// Slots per bucket: six pointers and six tags fill a 64-byte line.
const SLOTS: usize = 6;

/// A table grows when more than this share of its slots is taken...
const MAX_LOAD: f64 = 0.625;
/// ...to this share.
const MIN_LOAD: f64 = 0.5;

/// One cache line.
#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    /// `0` for an empty slot, else the record's tag (never `0`).
    tags: [u16; SLOTS],
    /// Whether an insert ever found this bucket full and went on to the next.
    overflowed: bool,
    records: [Option<Arc<KeyRecord>>; SLOTS],
}

/// Digest bytes 10 and 11, never `0`. The bucket uses bytes 0 to 7 and the shard byte 8.
#[inline]
fn tag(digest: &KeyDigest) -> u16 {
    let b = digest.as_bytes();
    u16::from_le_bytes([b[10], b[11]]) | 1
}

/// The bucket `digest` belongs in, of `n`.
#[inline]
fn home(digest: &KeyDigest, n: usize) -> usize {
    ((u128::from(digest.table_hash()) * n as u128) >> 64) as usize
}

/// The records of one shard.
#[derive(Default)]
pub(crate) struct Slots {
    buckets: Box<[Bucket]>,
    len: usize,
}

impl Slots {
    /// A table that holds `n` records without growing.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Slots {
            buckets: buckets_for(n),
            len: 0,
        }
    }

    /// The record for `digest`.
    #[inline]
    pub(crate) fn get(&self, digest: &KeyDigest) -> Option<&Arc<KeyRecord>> {
        let (b, s) = self.position(digest)?;
        self.buckets[b].records[s].as_ref()
    }

    /// Where the record for `digest` is: bucket and slot.
    #[inline]
    fn position(&self, digest: &KeyDigest) -> Option<(usize, usize)> {
        let n = self.buckets.len();
        if n == 0 {
            return None;
        }
        let tag = tag(digest);
        let mut i = home(digest, n);
        for _ in 0..n {
            let bucket = &self.buckets[i];
            for s in 0..SLOTS {
                if bucket.tags[s] == tag
                    && let Some(record) = &bucket.records[s]
                    && record.digest() == digest
                {
                    return Some((i, s));
                }
            }
            if !bucket.overflowed {
                return None;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        None
    }

    /// Adds `record`, replacing the one with the same digest; returns that one.
    pub(crate) fn insert(&mut self, record: Arc<KeyRecord>) -> Option<Arc<KeyRecord>> {
        if let Some((b, s)) = self.position(record.digest()) {
            return self.buckets[b].records[s].replace(record);
        }
        if (self.len + 1) as f64 > (self.buckets.len() * SLOTS) as f64 * MAX_LOAD {
            self.grow(self.len + 1);
        }
        self.place(record);
        self.len += 1;
        None
    }

    /// Puts `record` (not in the table) into the first free slot from its home bucket on,
    /// marking the full buckets passed. There is one: the load is below one.
    fn place(&mut self, record: Arc<KeyRecord>) {
        let n = self.buckets.len();
        let tag = tag(record.digest());
        let mut i = home(record.digest(), n);
        loop {
            let bucket = &mut self.buckets[i];
            if let Some(s) = bucket.tags.iter().position(|&t| t == 0) {
                bucket.tags[s] = tag;
                bucket.records[s] = Some(record);
                return;
            }
            bucket.overflowed = true;
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    /// Rebuilds the table for `n` records at [`MIN_LOAD`].
    fn grow(&mut self, n: usize) {
        let old = std::mem::replace(&mut self.buckets, buckets_for(n));
        for bucket in old.into_vec() {
            for record in bucket.records.into_iter().flatten() {
                self.place(record);
            }
        }
    }

    /// Removes the record for `digest`; returns it.
    pub(crate) fn remove(&mut self, digest: &KeyDigest) -> Option<Arc<KeyRecord>> {
        let (b, s) = self.position(digest)?;
        let bucket = &mut self.buckets[b];
        bucket.tags[s] = 0;
        self.len -= 1;
        bucket.records[s].take()
    }

    /// Keeps only the records for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Arc<KeyRecord>) -> bool) {
        for bucket in self.buckets.iter_mut() {
            for s in 0..SLOTS {
                if bucket.records[s].as_ref().is_some_and(|r| !keep(r)) {
                    bucket.records[s] = None;
                    bucket.tags[s] = 0;
                    self.len -= 1;
                }
            }
        }
    }

    /// Every record, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<KeyRecord>> + '_ {
        self.buckets.iter().flat_map(|b| b.records.iter().flatten())
    }
}

impl super::table::Table for Slots {
    type Entry = Arc<KeyRecord>;
    fn digest_of(record: &Arc<KeyRecord>) -> &KeyDigest {
        record.digest()
    }
    fn with_capacity(n: usize) -> Self {
        Slots::with_capacity(n)
    }
    fn put(&mut self, record: Arc<KeyRecord>) {
        self.insert(record);
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Enough buckets for `n` records at [`MIN_LOAD`] (none for none).
fn buckets_for(n: usize) -> Box<[Bucket]> {
    let count = (n as f64 / (SLOTS as f64 * MIN_LOAD)).ceil() as usize;
    (0..count).map(|_| Bucket::default()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyHasher, KeyId};
    use crate::store::table::Table;

    fn record(i: u32) -> Arc<KeyRecord> {
        let digest = KeyHasher::sha256().digest(&i.to_le_bytes());
        Arc::new(KeyRecord::new(KeyId::random(), digest))
    }

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn inserts_lookups_removals_and_overflow_agree_with_a_map() {
        use std::collections::HashMap;
        let mut slots = Slots::default();
        let mut model: HashMap<KeyDigest, Arc<KeyRecord>> = HashMap::new();
        let records: Vec<_> = (0..5_000).map(record).collect();
        // Inserts, replacements and removals interleaved, checked against the model.
        for (step, r) in records.iter().enumerate() {
            assert_eq!(
                slots.insert(r.clone()).is_some(),
                model.insert(*r.digest(), r.clone()).is_some()
            );
            if step % 3 == 0 {
                let again = Arc::new(KeyRecord::new(KeyId::random(), *r.digest()));
                let old = slots.insert(again.clone()).unwrap();
                assert!(Arc::ptr_eq(
                    &old,
                    &model.insert(*r.digest(), again).unwrap()
                ));
            }
            if step % 5 == 0 {
                let gone = &records[step / 2];
                assert_eq!(
                    slots.remove(gone.digest()).map(|r| r.id()),
                    model.remove(gone.digest()).map(|r| r.id())
                );
            }
            assert_eq!(slots.len(), model.len());
        }
        for r in &records {
            assert_eq!(
                slots.get(r.digest()).map(|r| r.id()),
                model.get(r.digest()).map(|r| r.id())
            );
        }
        assert!(slots.get(record(1_000_000).digest()).is_none());
        assert_eq!(slots.iter().count(), model.len());
        // A full table of a few buckets: every record is still found through overflows.
        let mut small = Slots::with_capacity(3);
        for r in &records[..200] {
            small.insert(r.clone());
        }
        assert!(
            records[..200]
                .iter()
                .all(|r| small.get(r.digest()).is_some())
        );
        small.retain(|r| r.digest().as_bytes()[0] % 2 == 0);
        for r in &records[..200] {
            assert_eq!(
                small.get(r.digest()).is_some(),
                r.digest().as_bytes()[0] % 2 == 0
            );
        }
        assert_eq!(small.len(), small.iter().count());
    }
}
