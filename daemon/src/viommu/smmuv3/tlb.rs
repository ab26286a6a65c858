//! The model's caches: a TLB tagged by VMID/ASID and a configuration cache of decoded STEs and
//! CDs. Both are bounded; when full they are emptied, which is always architecturally allowed
//! (a cache may drop entries at any time). Invalidation is conservative: a command may drop
//! more than it names, never less.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::config::{Cd, Ste};
use super::walk::Perms;

/// Largest number of TLB entries kept.
pub(crate) const TLB_CAPACITY: usize = 512;
/// Largest number of cached STEs and of cached CDs.
pub(crate) const CONFIG_CACHE_CAPACITY: usize = 1024;

/// Which translation an entry holds, so stage-specific invalidations find their entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TlbKind {
    /// Stage 1 only: VA → PA.
    Stage1,
    /// Stage 2 only: IPA → PA.
    Stage2,
    /// Both stages combined: VA → PA.
    Nested,
    /// Stage 1 of a nested configuration: VA → IPA (split-stage ATS answers).
    Stage1OfNested,
}

impl TlbKind {
    fn has_stage1(self) -> bool {
        !matches!(self, TlbKind::Stage2)
    }
    fn has_stage2(self) -> bool {
        matches!(self, TlbKind::Stage2 | TlbKind::Nested)
    }
}

/// A cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TlbEntry {
    pub kind: TlbKind,
    pub vmid: u16,
    /// Ignored for stage-2 entries.
    pub asid: u16,
    /// Stage-1 nG clear: matches every ASID.
    pub global: bool,
    pub in_base: u64,
    pub size_log2: u32,
    pub out_base: u64,
    /// IPA of `in_base` (stage-2 permission fault records); equal to `out_base` for stage 1.
    pub ipa_base: u64,
    pub perms_s1: Perms,
    pub perms_s2: Perms,
}

impl TlbEntry {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        let last = self.in_base.saturating_add((1u64 << self.size_log2) - 1);
        self.in_base < end && last >= start
    }
}

/// Where an entry is found: the regime, the ASID (`None` for stage-2 and global entries, which
/// match every ASID), the page size and the page number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TlbKey {
    kind: TlbKind,
    vmid: u16,
    asid: Option<u16>,
    size_log2: u32,
    page: u64,
}

impl TlbKey {
    fn of(e: &TlbEntry) -> TlbKey {
        TlbKey {
            kind: e.kind,
            vmid: e.vmid,
            asid: (e.kind != TlbKind::Stage2 && !e.global).then_some(e.asid),
            size_log2: e.size_log2,
            page: e.in_base.checked_shr(e.size_log2).unwrap_or(0),
        }
    }
}

/// The TLB, indexed so a lookup costs one hash probe per page size in use (at most a few)
/// instead of a scan of every entry.
#[derive(Debug, Default)]
pub(crate) struct Tlb {
    entries: HashMap<TlbKey, TlbEntry>,
    /// Insertion order, for first-in first-out eviction; may still name entries invalidated
    /// since, which eviction skips. Compacted when it grows past a multiple of the capacity.
    order: VecDeque<TlbKey>,
    /// Entries per page size, so lookups probe only the sizes present.
    sizes: BTreeMap<u32, usize>,
}

impl Tlb {
    pub fn lookup(&self, kind: TlbKind, vmid: u16, asid: u16, addr: u64) -> Option<TlbEntry> {
        let asids: &[Option<u16>] = if kind == TlbKind::Stage2 {
            &[None]
        } else {
            &[Some(asid), None]
        };
        self.sizes.keys().find_map(|&size_log2| {
            asids.iter().find_map(|&asid| {
                let key = TlbKey {
                    kind,
                    vmid,
                    asid,
                    size_log2,
                    page: addr.checked_shr(size_log2).unwrap_or(0),
                };
                self.entries.get(&key).copied()
            })
        })
    }

    pub fn insert(&mut self, entry: TlbEntry) {
        let key = TlbKey::of(&entry);
        if self.entries.insert(key, entry).is_none() {
            *self.sizes.entry(entry.size_log2).or_default() += 1;
            self.order.push_back(key);
        }
        while self.entries.len() > TLB_CAPACITY {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.forget_size(gone.size_log2);
            }
        }
        if self.order.len() > 4 * TLB_CAPACITY {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }

    fn forget_size(&mut self, size_log2: u32) {
        if let Some(n) = self.sizes.get_mut(&size_log2) {
            *n -= 1;
            if *n == 0 {
                self.sizes.remove(&size_log2);
            }
        }
    }

    /// Keeps the entries `keep` accepts; invalidations are rare next to lookups, so the size
    /// census is simply recounted.
    fn retain(&mut self, mut keep: impl FnMut(&TlbEntry) -> bool) {
        self.entries.retain(|_, e| keep(e));
        self.sizes.clear();
        for e in self.entries.values() {
            *self.sizes.entry(e.size_log2).or_default() += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.sizes.clear();
    }

    /// TLBI_NH_ALL: every stage-1 (and nested) entry of `vmid`.
    pub fn invalidate_nh_all(&mut self, vmid: u16) {
        self.retain(|e| !(e.kind.has_stage1() && e.vmid == vmid));
    }

    /// TLBI_NH_ASID: non-global stage-1 entries of `vmid`/`asid`.
    pub fn invalidate_nh_asid(&mut self, vmid: u16, asid: u16) {
        self.retain(|e| !(e.kind.has_stage1() && e.vmid == vmid && !e.global && e.asid == asid));
    }

    /// TLBI_NH_VA (`asid` = Some) / TLBI_NH_VAA (`asid` = None): stage-1 entries overlapping
    /// `[start, end)`; NH_VA also hits global entries.
    pub fn invalidate_nh_va(&mut self, vmid: u16, asid: Option<u16>, start: u64, end: u64) {
        self.retain(|e| {
            let hit = e.kind.has_stage1()
                && e.vmid == vmid
                && asid.is_none_or(|a| e.global || e.asid == a)
                && e.overlaps(start, end);
            !hit
        });
    }

    /// TLBI_S12_VMALL: everything of `vmid`.
    pub fn invalidate_vmid(&mut self, vmid: u16) {
        self.retain(|e| e.vmid != vmid);
    }

    /// TLBI_S2_IPA: stage-2 entries overlapping `[start, end)`; combined entries of the VMID
    /// are dropped too since their IPA is not recorded.
    pub fn invalidate_s2_ipa(&mut self, vmid: u16, start: u64, end: u64) {
        self.retain(|e| {
            let hit = e.vmid == vmid
                && e.kind.has_stage2()
                && (e.kind == TlbKind::Nested || e.overlaps(start, end));
            !hit
        });
    }
}

/// Decoded STEs by SID and CDs by (SID, SSID).
#[derive(Debug, Default)]
pub(crate) struct ConfigCache {
    stes: HashMap<u32, Ste>,
    cds: HashMap<(u32, u32), Cd>,
}

impl ConfigCache {
    pub fn ste(&self, sid: u32) -> Option<Ste> {
        self.stes.get(&sid).copied()
    }

    pub fn insert_ste(&mut self, sid: u32, ste: Ste) {
        if self.stes.len() >= CONFIG_CACHE_CAPACITY {
            self.stes.clear();
        }
        self.stes.insert(sid, ste);
    }

    pub fn cd(&self, sid: u32, ssid: u32) -> Option<Cd> {
        self.cds.get(&(sid, ssid)).copied()
    }

    pub fn insert_cd(&mut self, sid: u32, ssid: u32, cd: Cd) {
        if self.cds.len() >= CONFIG_CACHE_CAPACITY {
            self.cds.clear();
        }
        self.cds.insert((sid, ssid), cd);
    }

    /// CFGI_STE / CFGI_STE_RANGE: STEs in `[first, first + count)` and their CDs (a CD is
    /// found through its STE, so it cannot outlive it).
    pub fn invalidate_stes(&mut self, first: u32, count: u64) {
        let hit = |sid: u32| u64::from(sid).wrapping_sub(u64::from(first)) < count;
        self.stes.retain(|&sid, _| !hit(sid));
        self.cds.retain(|&(sid, _), _| !hit(sid));
    }

    /// CFGI_CD.
    pub fn invalidate_cd(&mut self, sid: u32, ssid: u32) {
        self.cds.remove(&(sid, ssid));
    }

    /// CFGI_CD_ALL.
    pub fn invalidate_cds(&mut self, sid: u32) {
        self.cds.retain(|&(s, _), _| s != sid);
    }

    pub fn clear(&mut self) {
        self.stes.clear();
        self.cds.clear();
    }
}
