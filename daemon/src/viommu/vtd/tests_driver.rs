//! Driver-sequence tests: the model programmed the way Linux intel-iommu programs hardware.

use super::tests_harness::*;
use super::*;

const SID: u16 = 0x0108; // 01:01.0
const PASID: u32 = 5;
const DID: u16 = 3;
const IOVA: u64 = 0x40_0000;
const GPA: u64 = 0x7_2000;

/// Scalable mode, first-stage table for (SID, PASID) mapping IOVA → GPA read/write/user.
fn scalable_guest() -> (Guest, u64) {
    let mut g = Guest::new(VtdConfig::default());
    g.scalable_context(SID, ScalableCtx::default());
    let fs_root = g.t.page();
    g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, fs_root));
    let leaf = g.t.map(
        fs_root,
        4,
        IOVA,
        1,
        GPA | pte::P | pte::RW | pte::US,
        pte::P | pte::RW | pte::US,
    );
    g.enable();
    (g, leaf)
}

#[test]
fn capability_registers_reflect_properties() {
    let cfg = VtdConfig {
        pasid_bits: 20,
        fault_records: 8,
        ..VtdConfig::default()
    };
    let g = Guest::new(cfg);
    let cap = g.vtd.read64(CAP);
    let ecap = g.vtd.read64(ECAP);
    assert_eq!((cap >> 16) & 0x3f, 47, "MGAW");
    assert_eq!((cap >> 8) & 0x1f, 0b0110, "SAGAW 39+48");
    assert_eq!((cap >> 40) & 0xff, 7, "NFR");
    assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD, "FRO");
    assert_ne!(cap & (1 << 56), 0, "FS1GP");
    assert_ne!(ecap & (1 << 2), 0, "DT");
    assert_eq!((ecap >> 35) & 0x1f, 19, "PSS");
    assert_ne!(ecap & (1 << 43), 0, "SMTS");
    assert_eq!(((ecap >> 8) & 0x3ff) * 16, IVA, "IRO");
    let legacy = Vtd::new(VtdConfig {
        scalable_mode: false,
        first_stage: false,
        nested: false,
        pasid_bits: 0,
        device_iotlb: false,
        ..VtdConfig::default()
    })
    .unwrap();
    let ecap = legacy.read64(ECAP);
    assert_eq!(ecap & ((1 << 2) | (1 << 40) | (1 << 43) | (1 << 47)), 0);
    assert!(Vtd::new(VtdConfig {
        aw_bits: 52,
        ..VtdConfig::default()
    })
    .is_err());
    assert!(Vtd::new(VtdConfig {
        pasid_bits: 21,
        ..VtdConfig::default()
    })
    .is_err());
}

#[test]
fn ats_with_pasid_then_invalidation_handshake_then_dma_faults() {
    let (mut g, leaf) = scalable_guest();

    let r = g.ats(SID, Some(PASID), IOVA + 0x10, 8, false).unwrap();
    assert_eq!(r.len(), 1);
    let e = r[0];
    assert_eq!(
        (e.untranslated_base, e.size_log2, e.translated),
        (IOVA, 12, GPA)
    );
    assert!(e.r && e.w && !e.x && !e.privileged && !e.global && !e.untranslated_only);
    // Hardware maintains A on every level and D on the leaf for a write-capable request.
    assert_eq!(g.t.get(leaf) & (pte::A | pte::D), pte::A | pte::D);
    assert!(g.vtd.pending_faults().is_empty());

    // The guest unmaps: clear the PTE, PASID-IOTLB page invalidation, PASID device-TLB
    // invalidation, wait with status write (Linux `qi_flush_piotlb` + `qi_flush_dev_iotlb_pasid`).
    g.t.put(leaf, 0);
    g.submit(&[
        piotlb_psi(DID, PASID, IOVA, 0),
        pasid_dev_tlb(SID, PASID, IOVA, 12, false),
        wait_sw(g.status_addr(7), 0xabcd),
    ]);
    let events = g.vtd.take_events();
    let inv = atc_invalidations(&events);
    assert_eq!(inv.len(), 1);
    assert_eq!(
        (
            inv[0].sid,
            inv[0].pasid,
            inv[0].global,
            inv[0].base,
            inv[0].size_log2
        ),
        (SID, Some(PASID), false, IOVA, 12)
    );
    assert_eq!(
        g.status(7),
        0,
        "wait completed before the device acknowledged"
    );
    assert_eq!(
        g.head(),
        g.tail - 1,
        "head must hold at the wait descriptor"
    );
    assert_eq!(g.vtd.outstanding_atc_invalidations(), 1);

    g.vtd.ack_atc_invalidation(&mut g.t.mem, inv[0].tag);
    assert_eq!(g.status(7), 0xabcd);
    assert_eq!(g.head(), g.tail);

    // The next untranslated DMA faults with a first-stage not-present record.
    let f = g.dma(SID, Some(PASID), IOVA + 0x20, false).unwrap_err();
    assert_eq!(f.reason, FaultReason::FsEntryNotPresent);
    let recs = g.vtd.pending_faults();
    assert_eq!(recs.len(), 1);
    let rec = recs[0];
    assert_eq!(
        (rec.sid, rec.pasid, rec.addr, rec.reason, rec.read, rec.at),
        (SID, Some(PASID), IOVA, 0x71, true, 0)
    );
    let fsts = g.vtd.read32(FSTS);
    assert_ne!(fsts & FSTS_PPF, 0);
    assert_eq!((fsts >> 8) & 0xff, 0, "FRI");
    let irqs = interrupts(&g.vtd.take_events());
    assert_eq!(
        irqs,
        vec![(InterruptSource::Fault, u64::from(FAULT_MSI.0), FAULT_MSI.1)]
    );

    // An ATS request for the hole answers R=W=0 with the hole size and records nothing more.
    let r = g.ats(SID, Some(PASID), IOVA, 0x1000, false).unwrap();
    assert_eq!((r[0].r, r[0].w, r[0].size_log2), (false, false, 12));
    assert_eq!(g.vtd.pending_faults().len(), 1);

    // Software clears the record (RW1C on F), PPF drops.
    let hi = g.vtd.read64(FRCD + 8);
    g.w64(FRCD + 8, hi);
    assert_eq!(g.vtd.read32(FSTS) & FSTS_PPF, 0);
}

#[test]
fn iotlb_is_tagged_by_domain_and_pasid() {
    let (mut g, leaf) = scalable_guest();
    assert!(g.ats(SID, Some(PASID), IOVA, 1, true).unwrap()[0].r);
    g.t.put(leaf, 0);
    // Without an IOTLB invalidation the cached translation may still be used.
    assert!(
        g.ats(SID, Some(PASID), IOVA, 1, true).unwrap()[0].r,
        "expected a cached translation"
    );
    // A different PASID or domain does not drop it.
    g.submit(&[
        piotlb_pasid(DID, PASID + 1),
        piotlb_pasid(DID + 1, PASID),
        iotlb_psi(DID + 1, IOVA, 0),
    ]);
    assert!(g.ats(SID, Some(PASID), IOVA, 1, true).unwrap()[0].r);
    // The right one does.
    g.submit(&[piotlb_pasid(DID, PASID)]);
    assert!(!g.ats(SID, Some(PASID), IOVA, 1, true).unwrap()[0].r);
}

#[test]
fn pasid_cache_invalidation_rereads_the_pasid_entry() {
    let (mut g, _) = scalable_guest();
    assert!(g.dma(SID, Some(PASID), IOVA, true).is_ok());
    // Turn the PASID into pass-through; until the PASID cache is invalidated the old entry
    // is used, afterwards the new one.
    g.pasid_entry(
        SID,
        PASID,
        PasidEntry {
            pgtt: PGTT_PT,
            ..PasidEntry::first_stage(DID, 0)
        },
    );
    assert_eq!(
        g.dma(SID, Some(PASID), 0x9000, false).unwrap_err().reason,
        FaultReason::FsEntryNotPresent
    );
    g.submit(&[pasid_cache(DID, PASID), piotlb_pasid(DID, PASID)]);
    assert_eq!(
        g.dma(SID, Some(PASID), 0x9000, false)
            .unwrap()
            .translated_base,
        0x9000
    );
}

#[test]
fn malformed_descriptors_set_iqe_and_stop_the_head() {
    let cases: Vec<(&str, [u64; 4], u8)> = vec![
        (
            "reserved bit in a wait",
            [5 | (1 << 5) | (1 << 8), 0, 0, 0],
            iqei::RESERVED_FIELD,
        ),
        ("unknown type 0xf", [0xf, 0, 0, 0], iqei::INVALID_TYPE),
        (
            "interrupt entry cache without IR",
            [4, 0, 0, 0],
            iqei::INVALID_TYPE,
        ),
        ("IOTLB granularity 0", [2, 0, 0, 0], iqei::RESERVED_FIELD),
        (
            "PASID-IOTLB granularity 1",
            [6 | (1 << 4), 0, 0, 0],
            iqei::RESERVED_FIELD,
        ),
        (
            "PASID-cache granularity 2",
            [7 | (2 << 4), 0, 0, 0],
            iqei::RESERVED_FIELD,
        ),
        (
            "device-TLB reserved QW1 bit",
            [3, 1 << 4, 0, 0],
            iqei::RESERVED_FIELD,
        ),
        (
            "non-zero upper half of a 256-bit descriptor",
            [5, 0, 1, 0],
            iqei::RESERVED_FIELD,
        ),
    ];
    for (what, bad, code) in cases {
        let (mut g, _) = scalable_guest();
        let before = g.tail;
        g.submit(&[
            wait_sw(g.status_addr(1), 1),
            bad,
            wait_sw(g.status_addr(2), 2),
        ]);
        assert_ne!(g.vtd.read32(FSTS) & FSTS_IQE, 0, "{what}: IQE not set");
        assert_eq!(g.vtd.read64(IQER) & 0xf, u64::from(code), "{what}: IQEI");
        assert_eq!(
            g.head(),
            before + 1,
            "{what}: head must stop at the bad descriptor"
        );
        assert_eq!((g.status(1), g.status(2)), (1, 0), "{what}");
        let irqs = interrupts(&g.vtd.take_events());
        assert_eq!(irqs.len(), 1, "{what}: one fault event");
        // Software replaces the descriptor and clears IQE: processing resumes.
        let at = g.queue_base + (before + 1) * 32;
        for (i, q) in [5u64, 0, 0, 0].iter().enumerate() {
            g.t.put(at + 8 * i as u64, *q);
        }
        g.w32(FSTS, FSTS_IQE);
        assert_eq!(g.status(2), 2, "{what}: queue did not resume");
        assert_eq!(g.head(), g.tail);
    }
}

#[test]
fn queue_width_and_tail_errors() {
    // PASID descriptors in a 128-bit queue.
    let cfg = VtdConfig::default();
    let mut g = Guest::new(cfg);
    g.wide = false;
    g.enable();
    g.submit(&[piotlb_pasid(1, 1)]);
    assert_eq!(g.vtd.read64(IQER) & 0xf, u64::from(iqei::INVALID_WIDTH));

    // A tail with bit 4 set in a 256-bit queue.
    let (mut g, _) = scalable_guest();
    g.w64(IQT, 0x10);
    assert_ne!(g.vtd.read32(FSTS) & FSTS_IQE, 0);
    assert_eq!(g.vtd.read64(IQER) & 0xf, u64::from(iqei::TAIL_MISALIGNED));

    // A tail beyond the 8 KiB queue of 256 256-bit descriptors.
    let (mut g, _) = scalable_guest();
    g.w64(IQT, g.queue_entries() * 32);
    assert_eq!(g.vtd.read64(IQER) & 0xf, u64::from(iqei::TAIL_BEYOND_QUEUE));
}

#[test]
fn wait_with_interrupt_flag_sets_iwc_and_honours_the_mask() {
    let (mut g, _) = scalable_guest();
    g.submit(&[wait_if()]);
    assert_eq!(g.vtd.read32(ICS) & ICS_IWC, 1);
    let irqs = interrupts(&g.vtd.take_events());
    assert_eq!(
        irqs,
        vec![(
            InterruptSource::InvalidationCompletion,
            u64::from(COMPLETION_MSI.0),
            COMPLETION_MSI.1
        )]
    );
    // Masked: pending until unmasked; IWC must be cleared first for a new event.
    g.w32(ICS, ICS_IWC);
    g.w32(IECTL, EVT_IM);
    g.submit(&[wait_if()]);
    assert!(interrupts(&g.vtd.take_events()).is_empty());
    assert_ne!(g.vtd.read32(IECTL) & EVT_IP, 0);
    g.w32(IECTL, 0);
    assert_eq!(interrupts(&g.vtd.take_events()).len(), 1);
    assert_eq!(g.vtd.read32(IECTL) & EVT_IP, 0);
}

#[test]
fn device_tlb_timeout_sets_ite_aborts_the_wait_and_late_ack_sets_ice() {
    let (mut g, _) = scalable_guest();
    g.submit(&[
        pasid_dev_tlb(SID, PASID, IOVA, 12, false),
        wait_sw(g.status_addr(3), 3),
        wait_sw(g.status_addr(4), 4),
    ]);
    let inv = atc_invalidations(&g.vtd.take_events());
    assert_eq!(inv.len(), 1);
    let wait_index = g.tail - 2;
    assert_eq!(g.head(), wait_index);
    g.vtd.atc_invalidation_timeout();
    let fsts = g.vtd.read32(FSTS);
    assert_ne!(fsts & FSTS_ITE, 0);
    assert_eq!(
        (g.vtd.read64(IQER) >> 32) & 0xffff,
        u64::from(SID),
        "ITESID"
    );
    assert_eq!(g.head(), wait_index + 1, "the aborted wait is consumed");
    assert_eq!(
        (g.status(3), g.status(4)),
        (0, 0),
        "aborted wait wrote status / queue ran on"
    );
    assert_eq!(interrupts(&g.vtd.take_events()).len(), 1);
    // A late acknowledgement is an unexpected completion.
    g.vtd.ack_atc_invalidation(&mut g.t.mem, inv[0].tag);
    assert_ne!(g.vtd.read32(FSTS) & FSTS_ICE, 0);
    // Clearing ITE resumes the queue.
    g.w32(FSTS, FSTS_ITE | FSTS_ICE);
    assert_eq!(g.status(4), 4);
}

#[test]
fn outstanding_atc_invalidations_are_bounded() {
    let (mut g, _) = scalable_guest();
    let descs: Vec<_> = (0..MAX_OUTSTANDING_ATC as u64 + 5)
        .map(|i| pasid_dev_tlb(SID, PASID, i << 12, 12, false))
        .collect();
    g.submit(&descs);
    let inv = atc_invalidations(&g.vtd.take_events());
    assert_eq!(inv.len(), MAX_OUTSTANDING_ATC);
    g.vtd.ack_atc_invalidation(&mut g.t.mem, inv[0].tag);
    // A freed slot is used when the queue is serviced again.
    g.vtd.service_queue(&mut g.t.mem);
    assert_eq!(atc_invalidations(&g.vtd.take_events()).len(), 1);
}

#[test]
fn work_per_register_write_is_bounded() {
    let (mut g, _) = scalable_guest();
    let n = 100u32;
    let descs: Vec<_> = (0..n).map(|i| wait_sw(g.status_addr(10 + i), 1)).collect();
    let start = g.head();
    g.submit(&descs);
    assert_eq!(g.head() - start, MAX_DESCRIPTORS_PER_KICK as u64);
    assert!(g.vtd.queue_needs_service());
    g.vtd.service_queue(&mut g.t.mem);
    assert_eq!(g.head(), g.tail);
    assert!(!g.vtd.queue_needs_service());
}

#[test]
fn fault_records_fill_then_overflow() {
    let (mut g, _) = scalable_guest();
    let n = g.vtd.config().fault_records;
    for i in 0..n {
        // Unprogrammed requesters on bus 2: context not present.
        let f = g.dma(0x0200 + i, None, 0x1000, true).unwrap_err();
        assert_eq!(f.reason, FaultReason::RootNotPresent);
    }
    assert_eq!(g.vtd.pending_faults().len(), usize::from(n));
    assert_eq!(g.vtd.read32(FSTS) & FSTS_PFO, 0);
    let _ = g.dma(0x0300, None, 0x1000, true);
    assert_ne!(g.vtd.read32(FSTS) & FSTS_PFO, 0, "overflow");
    // Only the first fault raised an event; overflow raises none while IP... (IM clear: sent).
    let recs = g.vtd.pending_faults();
    assert!(recs.iter().all(|r| !r.read && r.reason == 1));
}

#[test]
fn fault_processing_disable_suppresses_records() {
    let mut g = Guest::new(VtdConfig::default());
    g.scalable_context(
        SID,
        ScalableCtx {
            fpd: true,
            ..ScalableCtx::default()
        },
    );
    g.enable();
    let f = g.dma(SID, Some(PASID), IOVA, false).unwrap_err();
    assert_eq!(f.reason, FaultReason::PasidDirNotPresent);
    assert!(!f.recorded);
    assert!(g.vtd.pending_faults().is_empty());
}

#[test]
fn legacy_mode_sequence_with_device_tlb() {
    let cfg = VtdConfig {
        scalable_mode: false,
        first_stage: false,
        nested: false,
        pasid_bits: 0,
        ..VtdConfig::default()
    };
    let mut g = Guest::new(cfg);
    let ss_root = g.t.page();
    g.legacy_context(SID, 1, 2, DID, ss_root);
    let leaf =
        g.t.map(ss_root, 4, IOVA, 1, GPA | pte::R | pte::W, pte::R | pte::W);
    g.enable();
    let r = g.ats(SID, None, IOVA, 0x1000, false).unwrap();
    assert_eq!((r[0].translated, r[0].r, r[0].w), (GPA, true, true));
    assert_eq!(
        g.dma(SID, None, IOVA + 8, true)
            .unwrap()
            .translate(IOVA + 8),
        Some(GPA + 8)
    );
    g.t.put(leaf, 0);
    g.submit(&[
        iotlb_psi(DID, IOVA, 0),
        dev_tlb(SID, IOVA, 12),
        wait_sw(g.status_addr(9), 9),
    ]);
    let inv = atc_invalidations(&g.vtd.take_events());
    assert_eq!((inv[0].sid, inv[0].pasid), (SID, None));
    assert_eq!(g.status(9), 0);
    g.vtd.ack_atc_invalidation(&mut g.t.mem, inv[0].tag);
    assert_eq!(g.status(9), 9);
    let f = g.dma(SID, None, IOVA, true).unwrap_err();
    assert_eq!(f.reason, FaultReason::Write);
    assert_eq!(g.vtd.pending_faults()[0].reason, 5);
}

#[test]
fn register_based_invalidation_and_masks() {
    let (mut g, leaf) = scalable_guest();
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    g.t.put(leaf, 0);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok(), "cached");
    // Global IOTLB invalidation through IOTLB_REG: IVT clears, IAIG reports global.
    g.w64(IOTLB_REG, (1 << 63) | (1 << 60));
    let v = g.vtd.read64(IOTLB_REG);
    assert_eq!(v >> 63, 0);
    assert_eq!((v >> 57) & 3, 1);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_err());
    // Read-only registers ignore writes; GCMD reads as zero.
    let cap = g.vtd.read64(CAP);
    g.w64(CAP, !cap);
    assert_eq!(g.vtd.read64(CAP), cap);
    assert_eq!(g.vtd.read32(GCMD), 0);
    // Misaligned or odd-sized accesses are refused without effect.
    assert!(g.vtd.mmio_write(&mut g.t.mem, 0x1a, &[0; 4]).is_err());
    assert!(g.vtd.mmio_write(&mut g.t.mem, 0x18, &[0; 2]).is_err());
    assert!(g
        .vtd
        .mmio_write(&mut g.t.mem, g.vtd.window_size(), &[0; 4])
        .is_err());
    // 64-bit registers accept two 32-bit halves (high half first does not trigger commands).
    g.w32(RTADDR + 4, 0);
    g.w32(RTADDR, (g.root as u32) | (1 << 10));
    assert_eq!(g.vtd.read64(RTADDR), g.root | (1 << 10));
}

#[test]
fn page_selective_invalidations_cover_their_range_and_large_masks_widen() {
    let (mut g, leaf) = scalable_guest();
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    g.t.put(leaf, 0);
    // A 2-page PSI that does not contain IOVA leaves it cached; one that does drops it.
    g.submit(&[piotlb_psi(DID, PASID, IOVA + 0x2000, 1)]);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    g.submit(&[piotlb_psi(DID, PASID, IOVA, 1)]);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_err());
    // AM above MAMV (Linux does not clamp it for PASID-based IOTLB): no IQE, whole PASID.
    g.t.put(leaf, GPA | pte::P | pte::RW | pte::US);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    g.t.put(leaf, 0);
    g.submit(&[
        piotlb_psi(DID, PASID, 0, 40),
        wait_sw(g.status_addr(60), 60),
    ]);
    assert_eq!(g.vtd.read32(FSTS) & FSTS_IQE, 0);
    assert_eq!(g.status(60), 60);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_err());
}

#[test]
fn reset_returns_to_the_power_on_state() {
    let (mut g, _) = scalable_guest();
    let _ = g.dma(0x0700, None, 0, false);
    assert!(!g.vtd.pending_faults().is_empty());
    g.vtd.reset();
    let fresh = Vtd::new(VtdConfig::default()).unwrap();
    for off in (0..fresh.window_size()).step_by(8) {
        assert_eq!(g.vtd.read64(off), fresh.read64(off), "register at {off:#x}");
    }
    // Translation is off again: DMA passes through, nothing is recorded.
    assert_eq!(
        g.dma(SID, Some(PASID), IOVA, false)
            .unwrap()
            .translated_base,
        IOVA
    );
    assert!(g.vtd.pending_faults().is_empty());
}

#[test]
fn fault_event_masking_and_pending() {
    let (mut g, _) = scalable_guest();
    g.w32(FECTL, EVT_IM);
    let _ = g.dma(0x0600, None, 0, false);
    assert!(interrupts(&g.vtd.take_events()).is_empty(), "masked");
    assert_ne!(g.vtd.read32(FECTL) & EVT_IP, 0, "pending");
    // Unmasking delivers the pending event once.
    g.w32(FECTL, 0);
    assert_eq!(interrupts(&g.vtd.take_events()).len(), 1);
    assert_eq!(g.vtd.read32(FECTL) & EVT_IP, 0);
    // Masked again: servicing every fault condition clears IP without an interrupt.
    let hi = g.vtd.read64(FRCD + 8);
    g.w64(FRCD + 8, hi);
    g.w32(FECTL, EVT_IM);
    let _ = g.dma(0x0601, None, 0, false);
    assert_ne!(g.vtd.read32(FECTL) & EVT_IP, 0);
    let hi = g.vtd.read64(FRCD + 16 + 8);
    g.w64(FRCD + 16 + 8, hi);
    g.w32(FSTS, FSTS_PFO);
    assert_eq!(g.vtd.read32(FECTL) & EVT_IP, 0);
    g.w32(FECTL, 0);
    assert!(interrupts(&g.vtd.take_events()).is_empty());
}

#[test]
fn register_based_context_invalidation() {
    let (mut g, _) = scalable_guest();
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    // Remove the context entry; the cached context (and its translations) stay until a
    // device-selective CCMD invalidation for the requester with a function mask.
    let ctx = g.t.get(g.root + 8 * 2) & !0xfff; // bus 1, lower half
    g.t.put(ctx + u64::from(SID & 0x7f) * 32, 0);
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    let other = u64::from(SID ^ 0x08); // another device: no effect
    g.w64(CCMD, (1 << 63) | (3 << 61) | (other << 16));
    assert!(g.dma(SID, Some(PASID), IOVA, false).is_ok());
    // FM=3 ignores the function bits: SID|7 covers SID.
    g.w64(
        CCMD,
        (1 << 63) | (3 << 61) | (3 << 32) | (u64::from(SID | 7) << 16),
    );
    let v = g.vtd.read64(CCMD);
    assert_eq!(
        (v >> 63, (v >> 59) & 3),
        (0, 3),
        "ICC cleared, CAIG = device"
    );
    assert_eq!(
        g.dma(SID, Some(PASID), IOVA, false).unwrap_err().reason,
        FaultReason::ContextNotPresent
    );
}

/// The daemon keeps the model inside a device task: it must be movable across threads.
#[test]
fn model_is_send() {
    fn send<T: Send + 'static>() {}
    send::<Vtd>();
    send::<VtdEvent>();
}
