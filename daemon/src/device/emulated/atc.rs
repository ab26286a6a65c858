//! A device's Address Translation Cache: the translations an ATS-capable device model got from
//! its translation source, per PASID and of every page size.
//!
//! Invariants: entries of one PASID never overlap (inserting one removes any it overlaps, so a
//! lookup finds at most one); no hole (R=W=0) and no untranslated-only (U=1) answer is cached;
//! at most `capacity` entries, the least recently used going first.

use std::collections::BTreeMap;

use crate::viommu::ats::{AtcInvalidation, Pasid, TranslationCompletion};

/// Default number of entries.
pub const ATC_CAPACITY: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Cached {
    completion: TranslationCompletion,
    last_used: u64,
}

/// The cache. Keys are (PASID or none, untranslated base).
#[derive(Debug)]
pub struct Atc {
    entries: BTreeMap<(Option<Pasid>, u64), Cached>,
    capacity: usize,
    clock: u64,
}

impl Atc {
    /// An empty cache of at most `capacity` (at least 1) entries.
    pub fn new(capacity: usize) -> Atc {
        Atc {
            entries: BTreeMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached translation of `addr` for `pasid`, marking it used.
    pub fn lookup(&mut self, pasid: Option<Pasid>, addr: u64) -> Option<TranslationCompletion> {
        self.clock += 1;
        let clock = self.clock;
        let (_, cached) = self
            .entries
            .range_mut((pasid, 0)..=(pasid, addr))
            .next_back()?;
        if !cached.completion.range.contains(addr) {
            return None;
        }
        cached.last_used = clock;
        Some(cached.completion)
    }

    /// Caches a completion for `pasid`; holes and U=1 answers are not translations and are
    /// ignored. Returns whether it was cached.
    pub fn insert(&mut self, pasid: Option<Pasid>, completion: TranslationCompletion) -> bool {
        if completion.is_hole() || completion.untranslated_only {
            return false;
        }
        let (first, last) = (completion.range.base(), completion.range.last());
        let overlapping: Vec<_> = self
            .entries
            .range((pasid, 0)..=(pasid, last))
            .filter(|(_, c)| c.completion.range.last() >= first)
            .map(|(k, _)| *k)
            .collect();
        for k in overlapping {
            self.entries.remove(&k);
        }
        while self.entries.len() >= self.capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.clock += 1;
        self.entries.insert(
            (pasid, first),
            Cached {
                completion,
                last_used: self.clock,
            },
        );
        true
    }

    /// Removes every entry the invalidation hits; returns how many.
    pub fn invalidate(&mut self, invalidation: &AtcInvalidation) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(pasid, _), c| {
            let r = c.completion.range;
            !invalidation.hits(*pasid, c.completion.global, r.base(), r.last())
        });
        before - self.entries.len()
    }

    /// Removes everything; returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viommu::ats::{AtsRange, InvalidationRange, RequesterId};

    fn entry(base: u64, log2: u8) -> TranslationCompletion {
        TranslationCompletion {
            translated: 0x1_0000_0000 + base,
            read: true,
            write: true,
            ..TranslationCompletion::hole(AtsRange::new(base, log2).unwrap())
        }
    }

    fn pasid(v: u32) -> Option<Pasid> {
        Some(Pasid::new(v).unwrap())
    }

    #[test]
    fn lookups_find_every_page_size_per_pasid() {
        let mut atc = Atc::new(8);
        assert!(atc.insert(None, entry(0x20_0000, 21)));
        assert!(atc.insert(None, entry(0x1000, 12)));
        assert!(atc.insert(pasid(3), entry(0x4000_0000, 30)));
        assert_eq!(atc.lookup(None, 0x3f_ffff).unwrap().range.size_log2(), 21);
        assert_eq!(atc.lookup(None, 0x1fff).unwrap().range.base(), 0x1000);
        assert!(atc.lookup(None, 0x2000).is_none());
        assert!(atc.lookup(None, 0x4000_1000).is_none(), "other PASID");
        assert!(atc.lookup(pasid(3), 0x7fff_ffff).is_some());
        assert!(atc.lookup(pasid(4), 0x4000_0000).is_none());
        // Holes and U=1 answers are not cached.
        assert!(!atc.insert(
            None,
            TranslationCompletion::hole(AtsRange::new(0, 12).unwrap())
        ));
        let u = TranslationCompletion {
            untranslated_only: true,
            ..entry(0x8000, 12)
        };
        assert!(!atc.insert(None, u));
        assert_eq!(atc.len(), 3);
    }

    #[test]
    fn an_insert_replaces_what_it_overlaps() {
        let mut atc = Atc::new(8);
        atc.insert(None, entry(0x1000, 12));
        atc.insert(None, entry(0x3000, 12));
        atc.insert(None, entry(0x0, 14));
        assert_eq!(atc.len(), 1);
        atc.insert(None, entry(0x2000, 12));
        assert_eq!(atc.len(), 1, "the 16 KiB entry went");
        assert!(atc.lookup(None, 0x0).is_none());
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted() {
        let mut atc = Atc::new(2);
        atc.insert(None, entry(0x1000, 12));
        atc.insert(None, entry(0x2000, 12));
        atc.lookup(None, 0x1000);
        atc.insert(None, entry(0x3000, 12));
        assert!(atc.lookup(None, 0x1000).is_some());
        assert!(atc.lookup(None, 0x2000).is_none());
        assert_eq!(atc.len(), 2);
    }

    #[test]
    fn invalidation_follows_pasid_and_global_rules() {
        let mut atc = Atc::new(16);
        let global = TranslationCompletion {
            global: true,
            ..entry(0x1000, 12)
        };
        atc.insert(None, entry(0x1000, 12));
        atc.insert(pasid(1), entry(0x1000, 12));
        atc.insert(pasid(2), global);
        atc.insert(pasid(2), entry(0x8000, 12));
        let range = InvalidationRange::new(0x1800, 1);
        let p1 = AtcInvalidation {
            pasid: pasid(1),
            global: false,
            ..AtcInvalidation::range(RequesterId(0), range)
        };
        assert_eq!(atc.invalidate(&p1), 1);
        let p1_global = AtcInvalidation { global: true, ..p1 };
        assert_eq!(atc.invalidate(&p1_global), 1, "PASID 2's global entry");
        assert_eq!(atc.len(), 2);
        // Without a PASID: every PASID in range.
        atc.insert(pasid(5), entry(0x1000, 12));
        assert_eq!(
            atc.invalidate(&AtcInvalidation::range(RequesterId(0), range)),
            2
        );
        assert_eq!(atc.invalidate(&AtcInvalidation::all(RequesterId(0))), 1);
        assert!(atc.is_empty());
    }
}
