//! The model's translation caches: context cache (per requester), PASID cache (per requester
//! and PASID) and IOTLB (per requester, PASID and page), each tagged with the domain id so
//! the invalidation descriptors can select entries the way the spec defines.
//!
//! Caching is architecturally visible (a guest that changes a table without invalidating may
//! keep seeing the old translation), and the model relies on it only as an optimisation:
//! every cache is bounded and simply emptied when full, which is always a legal behaviour.

use std::collections::HashMap;

use super::tables::{ContextInfo, Domain};
use super::walk::Leaf;

/// PASID tag used for legacy-mode requests (no PASID exists there).
pub(crate) const NO_PASID: u32 = u32::MAX;

/// Page sizes a leaf can have (4 KiB, 2 MiB, 1 GiB); the lookup probes each.
const LEAF_SIZES: [u8; 3] = [12, 21, 30];

/// Upper bound on entries per cache.
pub(crate) const CACHE_CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IotlbKey {
    sid: u16,
    pasid: u32,
    size_log2: u8,
    page: u64,
}

#[derive(Debug, Clone, Copy)]
struct IotlbEntry {
    did: u16,
    leaf: Leaf,
}

/// All three caches.
#[derive(Debug, Default)]
pub(crate) struct Caches {
    context: HashMap<u16, ContextInfo>,
    pasid: HashMap<(u16, u32), Domain>,
    iotlb: HashMap<IotlbKey, IotlbEntry>,
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= CACHE_CAPACITY {
        map.clear();
    }
    map.insert(k, v);
}

fn overlaps(a_base: u64, a_log2: u8, b_base: u64, b_log2: u8) -> bool {
    let a_end = a_base.saturating_add((1u64 << a_log2.min(63)) - 1);
    let b_end = b_base.saturating_add((1u64 << b_log2.min(63)) - 1);
    a_base <= b_end && b_base <= a_end
}

impl Caches {
    pub fn context(&self, sid: u16) -> Option<ContextInfo> {
        self.context.get(&sid).copied()
    }
    pub fn put_context(&mut self, sid: u16, c: ContextInfo) {
        bounded_insert(&mut self.context, sid, c);
    }
    pub fn domain(&self, sid: u16, pasid: u32) -> Option<Domain> {
        self.pasid.get(&(sid, pasid)).copied()
    }
    pub fn put_domain(&mut self, sid: u16, pasid: u32, d: Domain) {
        bounded_insert(&mut self.pasid, (sid, pasid), d);
    }

    pub fn lookup(&self, sid: u16, pasid: u32, iova: u64) -> Option<Leaf> {
        LEAF_SIZES.iter().find_map(|&size_log2| {
            let key = IotlbKey {
                sid,
                pasid,
                size_log2,
                page: iova >> size_log2,
            };
            self.iotlb.get(&key).map(|e| e.leaf)
        })
    }
    pub fn insert(&mut self, sid: u16, pasid: u32, did: u16, leaf: Leaf) {
        if !LEAF_SIZES.contains(&leaf.size_log2) {
            return;
        }
        let key = IotlbKey {
            sid,
            pasid,
            size_log2: leaf.size_log2,
            page: leaf.iova_base >> leaf.size_log2,
        };
        bounded_insert(&mut self.iotlb, key, IotlbEntry { did, leaf });
    }

    /// Everything (SRTP, global invalidations).
    pub fn flush_all(&mut self) {
        self.context.clear();
        self.pasid.clear();
        self.iotlb.clear();
    }

    /// Context-cache invalidation for the requesters `sid & mask == want`; their PASID-cache
    /// and IOTLB entries go too, since they were derived from the old context.
    pub fn flush_requesters(&mut self, mask: u16, want: u16) {
        self.context.retain(|sid, _| sid & mask != want);
        self.pasid.retain(|(sid, _), _| sid & mask != want);
        self.iotlb.retain(|k, _| k.sid & mask != want);
    }

    /// PASID-cache invalidation: by domain, optionally one PASID.
    pub fn flush_pasid_entries(&mut self, did: u16, pasid: Option<u32>) {
        let hit = |d: &Domain, p: u32| d.did == did && pasid.is_none_or(|x| x == p);
        self.pasid.retain(|(_, p), d| !hit(d, *p));
        self.iotlb
            .retain(|k, e| !(e.did == did && pasid.is_none_or(|x| x == k.pasid)));
    }

    /// IOTLB invalidation by domain, optionally restricted to one PASID and/or an address
    /// range (`base`, 2^`size_log2`); `keep_global` spares first-stage global leaves.
    pub fn flush_iotlb(
        &mut self,
        did: Option<u16>,
        pasid: Option<u32>,
        range: Option<(u64, u8)>,
        keep_global: bool,
    ) {
        self.iotlb.retain(|k, e| {
            let hit = did.is_none_or(|d| d == e.did)
                && pasid.is_none_or(|p| p == k.pasid)
                && range.is_none_or(|(b, l)| overlaps(b, l, e.leaf.iova_base, e.leaf.size_log2))
                && !(keep_global && e.leaf.fs_global);
            !hit
        });
    }

    #[cfg(test)]
    pub fn iotlb_len(&self) -> usize {
        self.iotlb.len()
    }
}
