//! The shadow translation source: ATS answers from the client's DMA map table.
//!
//! Works with every vfio-user VMM today. With a VMM-side vIOMMU (QEMU's `intel-iommu` in front
//! of `vfio-user-pci`) the client's DMA_MAP/DMA_UNMAP carry IOVAs as the guest maps and unmaps;
//! without one they carry guest-physical addresses. Either way the map table is the device's
//! untranslated address space, and a DMA_UNMAP is the device-TLB invalidation: the connection
//! removes the map, invalidates the ATC of its device and waits for the device's completion
//! before it replies.
//!
//! Translated addresses are vfud's own ([`TranslatedSpace::Shadow`]): every mapped region has a
//! base in a private space ([`crate::dma::DmaRegion::translated_base`]), stable for the life
//! of the mapping and never reused while it is mapped, congruent to its IOVA modulo 1 GiB so
//! translations up to 1 GiB are naturally aligned in both spaces. A translation that outlives
//! its mapping therefore points nowhere instead of into whatever is mapped next.
//!
//! Answers:
//! * a mapped address: the largest naturally aligned block (STU to 1 GiB) around it that lies
//!   inside its region, R and W from the map's protection (W=0 for a No-Write request, and for
//!   a read-only map: R=1, W=0 rather than a failure), Exe=0, Priv as requested;
//! * a region smaller than the STU around the address: the STU unit with U=1 (use untranslated
//!   requests), since no translation of that size exists;
//! * an unmapped address: a hole (R=W=0) as large as the naturally aligned unmapped block
//!   around it;
//! * a request with a PASID: a hole over the whole address space, since vfio-user maps carry no
//!   PASID.

use std::sync::Arc;

use crate::dma::{DmaMapTable, GuestMemory, SHADOW_ALIGN_LOG2};

use super::ats::{
    AtsRange, TranslatedSpace, TranslationCompletion, TranslationFuture, TranslationRequest,
    TranslationSource, MAX_COMPLETIONS, PAGE_LOG2,
};

/// Translations from one connection's DMA map table.
#[derive(Debug, Clone)]
pub struct ShadowSource {
    memory: Arc<GuestMemory>,
}

impl ShadowSource {
    /// The source for the connection whose guest memory is `memory`.
    pub fn new(memory: Arc<GuestMemory>) -> ShadowSource {
        ShadowSource { memory }
    }
}

impl TranslationSource for ShadowSource {
    fn translate(&self, request: &TranslationRequest) -> TranslationFuture<'_> {
        let answer = self.memory.with_table(|t| answer(t, request));
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn translated_space(&self) -> TranslatedSpace {
        TranslatedSpace::Shadow
    }
}

/// The completions for `request` against `table`; always at least one entry, consecutive,
/// stopping after the first hole, at the end of the requested range, or at
/// [`MAX_COMPLETIONS`].
pub fn answer(table: &DmaMapTable, request: &TranslationRequest) -> Vec<TranslationCompletion> {
    if request.pasid.is_some() {
        return vec![TranslationCompletion::hole(AtsRange::everything())];
    }
    let stu = request.stu_log2.clamp(PAGE_LOG2, 63);
    let last = request.address.saturating_add(request.length.max(1) - 1);
    let mut addr = request.address & !mask(stu);
    let mut out = Vec::new();
    while out.len() < MAX_COMPLETIONS {
        let entry = unit_at(table, addr, stu, request);
        out.push(entry);
        match entry.range.last().checked_add(1) {
            Some(next) if !entry.is_hole() && entry.range.last() < last => addr = next,
            _ => break,
        }
    }
    out
}

/// Bits below `log2`.
fn mask(log2: u8) -> u64 {
    1u64.checked_shl(u32::from(log2))
        .map_or(u64::MAX, |v| v - 1)
}

/// The naturally aligned block of 2^log2 bytes containing `addr`, as (first, last).
fn block(addr: u64, log2: u8) -> (u64, u64) {
    let first = addr & !mask(log2);
    (first, first | mask(log2))
}

/// The entry for the STU-aligned unit starting at `addr`.
fn unit_at(
    table: &DmaMapTable,
    addr: u64,
    stu: u8,
    request: &TranslationRequest,
) -> TranslationCompletion {
    let Some(region) = table.region_containing(addr) else {
        return hole_at(table, addr, stu);
    };
    let region_last = region.iova + (region.size - 1);
    let read = region.prot.read;
    let write = region.prot.write && !request.no_write;
    let largest = (stu..=SHADOW_ALIGN_LOG2 as u8).rev().find(|&k| {
        let (first, last) = block(addr, k);
        first >= region.iova && last <= region_last
    });
    match largest {
        Some(k) => {
            let (first, _) = block(addr, k);
            TranslationCompletion {
                translated: region.translated_base() + (first - region.iova),
                read,
                write,
                privileged: request.privileged,
                ..hole(first, k)
            }
        }
        None => TranslationCompletion {
            read,
            write,
            privileged: request.privileged,
            untranslated_only: true,
            ..hole(addr & !mask(stu), stu)
        },
    }
}

/// The largest naturally aligned unmapped block (at least the STU) around `addr`; the STU unit
/// itself when part of it is mapped.
fn hole_at(table: &DmaMapTable, addr: u64, stu: u8) -> TranslationCompletion {
    let free = |k: u8| {
        let (first, last) = block(addr, k);
        table.region_containing(first).is_none()
            && table.region_after(first).is_none_or(|r| r.iova > last)
    };
    let size = (stu..=64).take_while(|&k| free(k)).last().unwrap_or(stu);
    hole(addr & !mask(size), size)
}

fn hole(base: u64, log2: u8) -> TranslationCompletion {
    // `base` is aligned by construction, `log2` in 12..=64.
    let range = AtsRange::new(base, log2).unwrap_or_else(|_| AtsRange::everything());
    TranslationCompletion::hole(range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaBacking, DmaProt, DmaRegion};
    use crate::viommu::ats::{check_completions, Pasid, RequesterId};

    const RW: DmaProt = DmaProt {
        read: true,
        write: true,
    };
    const RO: DmaProt = DmaProt {
        read: true,
        write: false,
    };

    fn table(maps: &[(u64, u64, DmaProt)]) -> DmaMapTable {
        let mut t = DmaMapTable::new(16);
        for &(iova, size, prot) in maps {
            t.insert(DmaRegion::new(iova, size, prot, DmaBacking::Message))
                .unwrap();
        }
        t
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

    fn checked(t: &DmaMapTable, r: &TranslationRequest) -> Vec<TranslationCompletion> {
        let a = answer(t, r);
        check_completions(r, &a).unwrap();
        a
    }

    #[test]
    fn mapped_ranges_get_the_largest_aligned_blocks_then_stop_at_a_hole() {
        // 2 MiB + 8 KiB at 0x20_0000: one 2 MiB block, then 8 KiB; then a hole.
        let t = table(&[(0x20_0000, 0x20_2000, RW)]);
        let a = checked(&t, &request(0x20_1000, 0x40_0000));
        let base = t.get(0x20_0000).unwrap().translated_base();
        let sizes: Vec<_> = a.iter().map(|c| c.range.size_log2()).collect();
        assert_eq!(sizes, [21, 13, 13]);
        assert_eq!(a[0].range.base(), 0x20_0000);
        assert_eq!(a[0].translated, base);
        assert!(a[0].read && a[0].write && !a[0].untranslated_only);
        assert_eq!(a[1].translated, base + 0x20_0000);
        assert!(a[2].is_hole(), "{:?}", a[2]);
        assert_eq!(a[2].range.base(), 0x40_2000);
        assert_eq!(a[0].translate(0x20_1234), base + 0x1234);
    }

    #[test]
    fn read_only_maps_answer_r_without_w_and_no_write_drops_w() {
        let t = table(&[(0x1000, 0x1000, RO), (0x2000, 0x1000, RW)]);
        let a = checked(&t, &request(0x1000, 0x2000));
        assert_eq!(a.len(), 2);
        assert!(
            a[0].read && !a[0].write,
            "read-only: R=1, W=0, not a failure"
        );
        assert!(a[1].read && a[1].write);
        let nw = TranslationRequest {
            no_write: true,
            ..request(0x2000, 1)
        };
        let a = checked(&t, &nw);
        assert!(a[0].read && !a[0].write);
    }

    #[test]
    fn holes_report_their_aligned_size() {
        let t = table(&[(0x10_0000, 0x1000, RW)]);
        // 0x0..0x10_0000 is free: a 1 MiB hole around 0x5000.
        let a = checked(&t, &request(0x5000, 1));
        assert_eq!(a.len(), 1);
        assert!(a[0].is_hole());
        assert_eq!((a[0].range.base(), a[0].range.size_log2()), (0, 20));
        // Nothing mapped at all: the whole space.
        let a = checked(&table(&[]), &request(0x5000, 1));
        assert_eq!(a[0].range, AtsRange::everything());
    }

    #[test]
    fn a_region_smaller_than_the_stu_answers_untranslated_only() {
        let t = table(&[(0x1_0000, 0x1000, RW)]);
        let r = TranslationRequest {
            stu_log2: 16,
            ..request(0x1_0000, 0x1000)
        };
        let a = checked(&t, &r);
        assert_eq!(a.len(), 1);
        assert!(a[0].untranslated_only && a[0].read);
        assert_eq!(a[0].range.size_log2(), 16);
        assert!(!a[0].permits(false), "U=1 is never used as a translation");
    }

    #[test]
    fn requests_with_a_pasid_find_nothing() {
        let t = table(&[(0x1000, 0x1000, RW)]);
        let r = TranslationRequest {
            pasid: Some(Pasid::new(5).unwrap()),
            ..request(0x1000, 1)
        };
        let a = checked(&t, &r);
        assert!(a[0].is_hole());
    }

    #[test]
    fn answers_are_bounded() {
        // 128 separate 4 KiB maps, each in its own 8 KiB slot: every entry is 4 KiB.
        let maps: Vec<_> = (0..16)
            .map(|i| (i * 0x1000, 0x1000, if i % 2 == 0 { RW } else { RO }))
            .collect();
        let mut t = DmaMapTable::new(256);
        for &(iova, size, prot) in &maps {
            t.insert(DmaRegion::new(iova, size, prot, DmaBacking::Message))
                .unwrap();
        }
        for i in 16..200u64 {
            t.insert(DmaRegion::new(i * 0x1000, 0x1000, RW, DmaBacking::Message))
                .unwrap();
        }
        let a = checked(&t, &request(0, 200 * 0x1000));
        assert_eq!(a.len(), MAX_COMPLETIONS);
    }
}
