//! The ATS contract between a device (its ATC) and whatever translates for it: a translation
//! source (the shadow source today, the embedded VT-d and SMMUv3 models later).
//!
//! * A [`TranslationRequest`] is what a PCIe Translation Request carries: requester id, PASID or
//!   none, the untranslated address and length, No-Write, Execute-Requested and
//!   Privileged-Mode-Requested, plus the device's Smallest Translation Unit (from its ATS
//!   Control), since every answer must cover at least that much.
//! * The answer is a list of [`TranslationCompletion`]s covering consecutive, naturally aligned
//!   power-of-two ranges starting at the one that contains the requested address
//!   ([`check_completions`] states and checks the rules). A hole is still an entry: it reports
//!   its size with R=W=0, so the device can skip it (or page-request it) without asking again
//!   per page. A read-only mapping asked for by a write-capable request answers R=1, W=0; it is
//!   not a failure.
//! * Invalidation is one operation, [`AtcInvalidation`] {requester, PASID or all, global,
//!   range}; the device reports its completion only after DMA that used the removed entries
//!   has finished.
//!
//! The PCIe size encoding shared by completions and invalidations ("S bit") is implemented by
//! [`AtsRange::encode`] / [`AtsRange::decode`] and [`TranslationCompletion::to_entry`] /
//! [`TranslationCompletion::from_entry`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// Smallest page ATS describes: 4 KiB.
pub const PAGE_LOG2: u8 = 12;
/// The S bit in an address field (Translation Completion entry, Invalidate Request body).
pub const S_BIT: u64 = 1 << 11;
/// Completion entry: Read permission.
pub const ENTRY_R: u64 = 1 << 0;
/// Completion entry: Write permission.
pub const ENTRY_W: u64 = 1 << 1;
/// Completion entry: Untranslated access only.
pub const ENTRY_U: u64 = 1 << 2;
/// Completion entry: Execute permission.
pub const ENTRY_EXE: u64 = 1 << 3;
/// Completion entry: the permissions are for privileged mode.
pub const ENTRY_PRIV: u64 = 1 << 4;
/// Completion entry: Global mapping (valid for every PASID).
pub const ENTRY_GLOBAL: u64 = 1 << 5;
/// Completion entry: accesses may use No-Snoop.
pub const ENTRY_N: u64 = 1 << 10;
/// Largest number of completions one request may produce; bounds what a source can make a
/// device allocate.
pub const MAX_COMPLETIONS: usize = 64;
/// Widest PASID, in bits.
pub const PASID_BITS: u32 = 20;

/// What the contract refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtsError {
    /// A range size that is not a power of two from 4 KiB to 2^64 bytes.
    #[error("a range of 2^{size_log2} bytes cannot be expressed in ATS; sizes are 2^12 to 2^64")]
    CheckSize {
        /// log2 of the size.
        size_log2: u8,
    },
    /// A base address not aligned to its range size.
    #[error("address {base:#x} is not aligned to its 2^{size_log2}-byte range")]
    CheckAlignment {
        /// The base.
        base: u64,
        /// log2 of the size.
        size_log2: u8,
    },
    /// An S-bit encoded field whose address bits 63:12 are all ones: no size is encoded.
    #[error("the S-bit encoded address field {field:#x} encodes no size (bits 63:12 all ones)")]
    DecodeSize {
        /// The field.
        field: u64,
    },
    /// A PASID wider than 20 bits.
    #[error("PASID {value:#x} is wider than 20 bits")]
    CheckPasid {
        /// The value.
        value: u32,
    },
    /// A source answered outside the contract; the device must not use the answer.
    #[error("the translation source broke the ATS contract: {what}")]
    CheckCompletions {
        /// The rule broken.
        what: String,
    },
}

/// A PCIe requester id (bus << 8 | device << 3 | function). vfio-user does not tell a device
/// its own bus number, so a device served over vfio-user uses 0 and the caller routes
/// invalidations to it by connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequesterId(pub u16);

/// A Process Address Space ID: at most 20 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pasid(u32);

impl Pasid {
    /// Checks the width.
    pub fn new(value: u32) -> Result<Pasid, AtsError> {
        if value >> PASID_BITS != 0 {
            return Err(AtsError::CheckPasid { value });
        }
        Ok(Pasid(value))
    }

    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Pasid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A naturally aligned power-of-two range of the untranslated (or translated) address space,
/// as ATS sizes everything.
///
/// Invariant: `PAGE_LOG2 <= size_log2 <= 64` and `base` is a multiple of `2^size_log2`
/// (`size_log2 == 64` is the whole address space, base 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AtsRange {
    base: u64,
    size_log2: u8,
}

impl AtsRange {
    /// Checks size and alignment.
    pub fn new(base: u64, size_log2: u8) -> Result<AtsRange, AtsError> {
        if !(PAGE_LOG2..=64).contains(&size_log2) {
            return Err(AtsError::CheckSize { size_log2 });
        }
        if base & low_mask(size_log2) != 0 {
            return Err(AtsError::CheckAlignment { base, size_log2 });
        }
        Ok(AtsRange { base, size_log2 })
    }

    /// The whole 64-bit address space.
    pub fn everything() -> AtsRange {
        AtsRange {
            base: 0,
            size_log2: 64,
        }
    }

    /// The smallest naturally aligned power-of-two range (at least 4 KiB) containing
    /// `[start, start + len)`; `len` 0 counts as 1. What an invalidation of an arbitrary range
    /// rounds up to when it has to go on the wire (the Linux approach).
    pub fn covering(start: u64, len: u64) -> AtsRange {
        let last = start.saturating_add(len.max(1) - 1);
        let differing = 64 - (start ^ last).leading_zeros();
        let size_log2 = (differing as u8).max(PAGE_LOG2);
        AtsRange {
            base: start & !low_mask(size_log2),
            size_log2,
        }
    }

    /// First address.
    pub fn base(self) -> u64 {
        self.base
    }

    /// log2 of the size.
    pub fn size_log2(self) -> u8 {
        self.size_log2
    }

    /// Last address (inclusive).
    pub fn last(self) -> u64 {
        self.base | low_mask(self.size_log2)
    }

    /// The size in bytes, saturated at `u64::MAX` for the whole address space.
    pub fn size(self) -> u64 {
        1u64.checked_shl(u32::from(self.size_log2))
            .unwrap_or(u64::MAX)
    }

    /// Whether `addr` falls in the range.
    pub fn contains(self, addr: u64) -> bool {
        addr & !low_mask(self.size_log2) == self.base
    }

    /// The S-bit encoding of this range as an address field (bits 63:12 and S at bit 11; bits
    /// 10:0 are zero for the caller's flags): S=0 for 4 KiB; otherwise the lowest zero in bits
    /// 63:12 is at bit `size_log2 - 1` and every bit below it, down to 12, is one. The whole
    /// address space is bits 62:12 all ones and bit 63 zero.
    pub fn encode(self) -> u64 {
        if self.size_log2 == PAGE_LOG2 {
            return self.base;
        }
        // Ones in bits [size_log2 - 2 : 12], bit size_log2 - 1 stays zero (the base is aligned).
        let ones = low_mask(self.size_log2 - 1) & !low_mask(PAGE_LOG2);
        self.base | ones | S_BIT
    }

    /// Decodes an S-bit encoded address field; bits 10:0 (flags) are ignored.
    pub fn decode(field: u64) -> Result<AtsRange, AtsError> {
        let address = field & !low_mask(PAGE_LOG2);
        if field & S_BIT == 0 {
            return Ok(AtsRange {
                base: address,
                size_log2: PAGE_LOG2,
            });
        }
        let ones = (address >> PAGE_LOG2).trailing_ones();
        if ones >= 52 {
            return Err(AtsError::DecodeSize { field });
        }
        let size_log2 = (u32::from(PAGE_LOG2) + 1 + ones) as u8;
        Ok(AtsRange {
            base: address & !low_mask(size_log2),
            size_log2,
        })
    }
}

/// Bits below `log2` set (all bits for 64).
fn low_mask(log2: u8) -> u64 {
    1u64.checked_shl(u32::from(log2))
        .map_or(u64::MAX, |v| v - 1)
}

/// A PCIe Translation Request, with the device's Smallest Translation Unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslationRequest {
    /// Who asks.
    pub requester: RequesterId,
    /// The PASID prefix, if any.
    pub pasid: Option<Pasid>,
    /// Untranslated address; the answer starts at the STU-aligned range containing it.
    pub address: u64,
    /// Bytes the device wants translated from `address` (at least 1); the answer may stop
    /// earlier (at a hole, or after [`MAX_COMPLETIONS`] entries).
    pub length: u64,
    /// No-Write: the device only reads, so the answer must not grant W.
    pub no_write: bool,
    /// Execute Requested.
    pub exec: bool,
    /// Privileged Mode Requested.
    pub privileged: bool,
    /// log2 of the device's Smallest Translation Unit: ATS Control STU + 12.
    pub stu_log2: u8,
}

/// One entry of a Translation Completion.
///
/// Invariant (checked by [`check_completions`] for a whole answer): `range` is naturally
/// aligned, `translated` is aligned to the same size, and a hole (R=W=0) has `translated` 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslationCompletion {
    /// The untranslated range the entry applies to.
    pub range: AtsRange,
    /// Translated base address of the range (0 for a hole).
    pub translated: u64,
    /// R: reads permitted.
    pub read: bool,
    /// W: writes permitted.
    pub write: bool,
    /// Exe: execute permitted.
    pub exec: bool,
    /// Priv: the permissions are for privileged mode.
    pub privileged: bool,
    /// Global: valid for every PASID.
    pub global: bool,
    /// U: the device must use untranslated requests for this range (the answer is valid but
    /// not cacheable as a translation).
    pub untranslated_only: bool,
    /// N: accesses may be No-Snoop.
    pub no_snoop: bool,
}

impl TranslationCompletion {
    /// A hole of `range`: no access permitted; its size tells the device how far it extends.
    pub fn hole(range: AtsRange) -> TranslationCompletion {
        TranslationCompletion {
            range,
            translated: 0,
            read: false,
            write: false,
            exec: false,
            privileged: false,
            global: false,
            untranslated_only: false,
            no_snoop: false,
        }
    }

    /// R=W=0: the range is not accessible (the device may page-request it).
    pub fn is_hole(&self) -> bool {
        !self.read && !self.write
    }

    /// Whether an access of this kind may use the entry's translation.
    pub fn permits(&self, write: bool) -> bool {
        !self.untranslated_only && if write { self.write } else { self.read }
    }

    /// The translated address of `addr`, which must lie in the range.
    pub fn translate(&self, addr: u64) -> u64 {
        self.translated | (addr & low_mask(self.range.size_log2))
    }

    /// The 8-byte completion entry: translated address bits 63:12 in the S-bit encoding of the
    /// entry's size, then the flag bits.
    pub fn to_entry(&self) -> u64 {
        let translated = AtsRange {
            base: self.translated & !low_mask(self.range.size_log2),
            size_log2: self.range.size_log2,
        };
        let mut entry = translated.encode();
        for (on, bit) in [
            (self.read, ENTRY_R),
            (self.write, ENTRY_W),
            (self.untranslated_only, ENTRY_U),
            (self.exec, ENTRY_EXE),
            (self.privileged, ENTRY_PRIV),
            (self.global, ENTRY_GLOBAL),
            (self.no_snoop, ENTRY_N),
        ] {
            if on {
                entry |= bit;
            }
        }
        entry
    }

    /// Decodes a completion entry for the untranslated address `untranslated` (any address in
    /// the range; the entry itself does not carry it).
    pub fn from_entry(untranslated: u64, entry: u64) -> Result<TranslationCompletion, AtsError> {
        let translated = AtsRange::decode(entry)?;
        let size_log2 = translated.size_log2;
        Ok(TranslationCompletion {
            range: AtsRange {
                base: untranslated & !low_mask(size_log2),
                size_log2,
            },
            translated: translated.base,
            read: entry & ENTRY_R != 0,
            write: entry & ENTRY_W != 0,
            exec: entry & ENTRY_EXE != 0,
            privileged: entry & ENTRY_PRIV != 0,
            global: entry & ENTRY_GLOBAL != 0,
            untranslated_only: entry & ENTRY_U != 0,
            no_snoop: entry & ENTRY_N != 0,
        })
    }
}

/// Checks an answer against the contract, so a device never caches a malformed translation:
/// 1 to [`MAX_COMPLETIONS`] entries; the first contains `request.address`; each starts where
/// the previous ended; every entry is at least the STU; translated bases are aligned to their
/// entry's size; a hole has translated address 0; no entry grants W to a No-Write request.
pub fn check_completions(
    request: &TranslationRequest,
    completions: &[TranslationCompletion],
) -> Result<(), AtsError> {
    let broken = |what: String| Err(AtsError::CheckCompletions { what });
    let Some(first) = completions.first() else {
        return broken("the answer has no entry".into());
    };
    if completions.len() > MAX_COMPLETIONS {
        return broken(format!(
            "{} entries, more than {MAX_COMPLETIONS}",
            completions.len()
        ));
    }
    if !first.range.contains(request.address) {
        return broken(format!(
            "the first entry {:#x}+2^{} does not contain the requested address {:#x}",
            first.range.base, first.range.size_log2, request.address
        ));
    }
    let mut next = Some(first.range.base);
    for c in completions {
        if next != Some(c.range.base) {
            return broken(format!(
                "entry at {:#x} does not follow the previous one",
                c.range.base
            ));
        }
        if c.range.size_log2 < request.stu_log2.max(PAGE_LOG2) {
            return broken(format!(
                "entry at {:#x} is 2^{} bytes, below the STU of 2^{}",
                c.range.base, c.range.size_log2, request.stu_log2
            ));
        }
        if c.translated & low_mask(c.range.size_log2) != 0 {
            return broken(format!(
                "translated address {:#x} is not aligned to its 2^{}-byte entry",
                c.translated, c.range.size_log2
            ));
        }
        if c.is_hole() && c.translated != 0 {
            return broken(format!(
                "hole at {:#x} has a translated address",
                c.range.base
            ));
        }
        if request.no_write && c.write {
            return broken(format!(
                "entry at {:#x} grants W to a No-Write request",
                c.range.base
            ));
        }
        next = c.range.last().checked_add(1);
    }
    Ok(())
}

/// Why a source refused a request as a whole (a PCIe Unsupported Request / Completer Abort),
/// as opposed to answering holes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslationError {
    /// ATS is not allowed for this requester (VT-d context TT/DTE, SMMUv3 STE.EATS).
    #[error("translation requests are not allowed for requester {requester:#06x}")]
    CheckAllowed {
        /// The requester.
        requester: u16,
    },
    /// The source is gone (the client disconnected).
    #[error("the translation source is no longer available")]
    Unavailable,
    /// The model's answer does not satisfy the ATS contract ([`check_completions`]).
    #[error("the translation source's answer is malformed")]
    CheckAnswer(#[source] AtsError),
}

/// The answer to one translation request.
pub type TranslationResult = Result<Vec<TranslationCompletion>, TranslationError>;

/// A pending translation answer. Boxed so that sources are usable as trait objects; a source
/// that has to read guest memory (a vIOMMU walking page tables) may wait on the client.
pub type TranslationFuture<'a> = Pin<Box<dyn Future<Output = TranslationResult> + Send + 'a>>;

/// Which address space translated requests (and the translated addresses of completions) live
/// in, so the device knows how to reach memory with a translated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranslatedSpace {
    /// vfud's own shadow space of the client's DMA maps ([`crate::dma::GuestMemory::read_translated`]):
    /// the shadow source, where the map table holds IOVAs a VMM-side vIOMMU owns.
    Shadow,
    /// The client's DMA map table itself (guest-physical addresses): an embedded vIOMMU
    /// translates IOVAs to the GPAs the client mapped.
    MapTable,
}

/// Anything that answers translation requests: the shadow source, a vIOMMU model.
///
/// Contract: an `Ok` answer satisfies [`check_completions`]; translations stay valid until the
/// source raises an [`AtcInvalidation`] covering them, and the source does not consider the
/// invalidation done before the device's completion of it.
pub trait TranslationSource: Send + Sync + fmt::Debug {
    /// Answers one translation request.
    fn translate(&self, request: &TranslationRequest) -> TranslationFuture<'_>;

    /// Where translated addresses point.
    fn translated_space(&self) -> TranslatedSpace;
}

/// An exact range of untranslated addresses to invalidate, inclusive of `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidationRange {
    /// First address.
    pub first: u64,
    /// Last address (inclusive).
    pub last: u64,
}

impl InvalidationRange {
    /// `[start, start + len)`, clamped at the end of the address space; `len` 0 counts as 1.
    pub fn new(start: u64, len: u64) -> InvalidationRange {
        InvalidationRange {
            first: start,
            last: start.saturating_add(len.max(1) - 1),
        }
    }

    /// Whether the ranges share an address.
    pub fn overlaps(self, first: u64, last: u64) -> bool {
        self.first <= last && first <= self.last
    }
}

impl From<AtsRange> for InvalidationRange {
    fn from(r: AtsRange) -> Self {
        InvalidationRange {
            first: r.base,
            last: r.last(),
        }
    }
}

/// "Invalidate device ATC": what a VT-d device-TLB descriptor (types 3 and 8), an SMMUv3
/// CMD_ATC_INV or a DMA_UNMAP in shadow mode becomes.
///
/// Semantics: without a PASID every entry in the range goes, whatever its PASID (an ATS
/// Invalidate Request without PASID prefix); with a PASID, the entries of that PASID go, and
/// with `global` also global entries of every PASID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtcInvalidation {
    /// The device addressed.
    pub requester: RequesterId,
    /// The PASID, or `None` for all PASIDs and requests without PASID.
    pub pasid: Option<Pasid>,
    /// Global Invalidate: with a PASID, also global entries of every PASID.
    pub global: bool,
    /// The untranslated range.
    pub range: InvalidationRange,
}

impl AtcInvalidation {
    /// Every entry of every PASID in `range`.
    pub fn range(requester: RequesterId, range: InvalidationRange) -> AtcInvalidation {
        AtcInvalidation {
            requester,
            pasid: None,
            global: true,
            range,
        }
    }

    /// Everything.
    pub fn all(requester: RequesterId) -> AtcInvalidation {
        AtcInvalidation::range(requester, AtsRange::everything().into())
    }

    /// Whether an entry of `pasid` (global or not) over `[first, last]` is hit.
    pub fn hits(&self, pasid: Option<Pasid>, global: bool, first: u64, last: u64) -> bool {
        if !self.range.overlaps(first, last) {
            return false;
        }
        match self.pasid {
            None => true,
            Some(p) => pasid == Some(p) || (self.global && global),
        }
    }
}

/// The device's Invalidate Completion: sent once no DMA using the removed entries is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AtcInvalidationCompletion {
    /// Entries removed from the ATC.
    pub entries_removed: usize,
    /// Whether in-flight DMA had to finish first.
    pub waited_for_dma: bool,
}

/// A pending invalidation completion.
pub type InvalidationFuture = Pin<Box<dyn Future<Output = AtcInvalidationCompletion> + Send>>;

/// ATC counters of a device, for BAR0 registers and `vfud status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AtcCounters {
    /// Translation requests sent to the source.
    pub requests: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that needed a translation request.
    pub misses: u64,
    /// Invalidations received.
    pub invalidations: u64,
    /// Entries cached now.
    pub entries: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aligned_range() -> impl Strategy<Value = AtsRange> {
        (PAGE_LOG2..=64u8, any::<u64>()).prop_map(|(log2, addr)| AtsRange {
            base: addr & !low_mask(log2),
            size_log2: log2,
        })
    }

    proptest! {
        #[test]
        fn range_encoding_round_trips(r in aligned_range(), flags in 0u64..0x800) {
            let field = r.encode();
            prop_assert_eq!(field & 0x7ff, 0, "flag bits stay free");
            prop_assert_eq!(AtsRange::decode(field | flags), Ok(r));
        }

        #[test]
        fn every_decodable_field_re_encodes_to_itself(field in any::<u64>()) {
            match AtsRange::decode(field) {
                Ok(r) => {
                    prop_assert_eq!(r.encode(), field & !0x7ff);
                    prop_assert!(r.contains(field & !0xfff) || r.size_log2 > PAGE_LOG2);
                }
                Err(e) => {
                    prop_assert_eq!(e, AtsError::DecodeSize { field });
                    prop_assert_eq!(field | 0xfff, u64::MAX);
                }
            }
        }

        #[test]
        fn completion_entries_round_trip(
            r in aligned_range(),
            translated in any::<u64>(),
            flags in any::<[bool; 7]>(),
            offset in any::<u64>(),
        ) {
            let c = TranslationCompletion {
                range: r,
                translated: translated & !low_mask(r.size_log2),
                read: flags[0],
                write: flags[1],
                exec: flags[2],
                privileged: flags[3],
                global: flags[4],
                untranslated_only: flags[5],
                no_snoop: flags[6],
            };
            let inside = r.base | (offset & low_mask(r.size_log2));
            prop_assert_eq!(TranslationCompletion::from_entry(inside, c.to_entry()), Ok(c));
        }

        #[test]
        fn covering_is_the_smallest_aligned_power_of_two(start in any::<u64>(), len in 1u64..1 << 40) {
            let r = AtsRange::covering(start, len);
            let last = start.saturating_add(len - 1);
            prop_assert!(r.contains(start) && r.contains(last));
            prop_assert_eq!(AtsRange::new(r.base(), r.size_log2()), Ok(r));
            if r.size_log2() > PAGE_LOG2 {
                // Half the size would split the range.
                let half = r.size_log2() - 1;
                prop_assert_ne!(start >> half, last >> half);
            }
        }
    }

    #[test]
    fn encodings_match_the_table_in_the_specification() {
        let enc = |base, log2| AtsRange::new(base, log2).unwrap().encode();
        assert_eq!(enc(0x1234_5000, 12), 0x1234_5000);
        assert_eq!(enc(0x1234_4000, 13), 0x1234_4000 | S_BIT);
        assert_eq!(enc(0x1234_4000, 14), 0x1234_5000 | S_BIT);
        assert_eq!(enc(0x1234_0000, 15), 0x1234_3000 | S_BIT);
        assert_eq!(enc(0x1234_0000, 16), 0x1234_7000 | S_BIT);
        assert_eq!(enc(0x4000_0000, 30), 0x4000_0000 | 0x1fff_f000 | S_BIT);
        assert_eq!(
            AtsRange::everything().encode(),
            0x7fff_ffff_ffff_f000 | S_BIT
        );
        assert_eq!(
            AtsRange::decode(u64::MAX).unwrap_err(),
            AtsError::DecodeSize { field: u64::MAX }
        );
        assert!(AtsRange::new(0x1000, 13).is_err());
        assert!(AtsRange::new(0, 11).is_err());
        assert!(AtsRange::new(0, 65).is_err());
        assert_eq!(AtsRange::everything().size(), u64::MAX);
    }

    #[test]
    fn pasids_are_20_bits() {
        assert_eq!(Pasid::new(0xf_ffff).unwrap().get(), 0xf_ffff);
        assert!(Pasid::new(0x10_0000).is_err());
    }

    fn request(address: u64, length: u64) -> TranslationRequest {
        TranslationRequest {
            requester: RequesterId(0),
            pasid: None,
            address,
            length,
            no_write: false,
            exec: false,
            privileged: false,
            stu_log2: 12,
        }
    }

    fn page(base: u64, log2: u8, translated: u64) -> TranslationCompletion {
        TranslationCompletion {
            translated,
            read: true,
            write: true,
            ..TranslationCompletion::hole(AtsRange::new(base, log2).unwrap())
        }
    }

    #[test]
    fn the_checker_enforces_every_rule() {
        let r = request(0x1800, 0x2000);
        assert!(
            check_completions(&r, &[page(0x1000, 12, 0x9000), page(0x2000, 13, 0x4000)]).is_ok()
        );
        let err = |c: &[TranslationCompletion], r: &TranslationRequest| {
            check_completions(r, c).unwrap_err().to_string()
        };
        assert!(err(&[], &r).contains("no entry"));
        assert!(err(&[page(0x2000, 12, 0)], &r).contains("does not contain"));
        assert!(err(&[page(0x1000, 12, 0), page(0x3000, 12, 0)], &r).contains("follow"));
        assert!(err(&[page(0x1000, 12, 0x1800)], &r).contains("not aligned"));
        let mut hole = TranslationCompletion::hole(AtsRange::new(0x1000, 12).unwrap());
        assert!(check_completions(&r, &[hole]).is_ok());
        hole.translated = 0x5000;
        assert!(err(&[hole], &r).contains("hole"));
        let stu = TranslationRequest { stu_log2: 16, ..r };
        assert!(err(&[page(0x1000, 12, 0)], &stu).contains("STU"));
        let nw = TranslationRequest {
            no_write: true,
            ..r
        };
        assert!(err(&[page(0x1000, 12, 0)], &nw).contains("No-Write"));
        let many: Vec<_> = (0..65).map(|i| page(i << 12, 12, 0)).collect();
        assert!(err(&many, &request(0, 1 << 20)).contains("more than"));
    }

    #[test]
    fn invalidations_hit_by_pasid_and_global() {
        let p1 = Pasid::new(1).ok();
        let p2 = Pasid::new(2).ok();
        let range = InvalidationRange::new(0x1000, 0x1000);
        let all = AtcInvalidation::range(RequesterId(0), range);
        assert!(all.hits(None, false, 0x1000, 0x1fff));
        assert!(all.hits(p2, false, 0x0, 0x1000));
        assert!(!all.hits(p2, false, 0x2000, 0x2fff));
        let one = AtcInvalidation {
            pasid: p1,
            global: false,
            ..all
        };
        assert!(one.hits(p1, false, 0x1000, 0x1fff));
        assert!(!one.hits(p2, true, 0x1000, 0x1fff));
        assert!(!one.hits(None, false, 0x1000, 0x1fff));
        let global = AtcInvalidation {
            global: true,
            ..one
        };
        assert!(global.hits(p2, true, 0x1000, 0x1fff));
        assert!(!global.hits(p2, false, 0x1000, 0x1fff));
        assert_eq!(
            InvalidationRange::from(AtsRange::everything()),
            InvalidationRange {
                first: 0,
                last: u64::MAX
            }
        );
    }
}
