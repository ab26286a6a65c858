//! One test per QEMU VT-d gap listed in the vIOMMU reference (§6.7 and the §1.7 matrix),
//! each proving this model handles the case as the VT-d / PCIe ATS specifications require.

use super::tests_harness::*;
use super::*;

const SID: u16 = 0x0318; // 03:03.0
const PASID: u32 = 0x22;
const DID: u16 = 7;
const IOVA: u64 = 0x60_0000;
const OUT: u64 = 0x3_0000_0000;

fn legacy_cfg() -> VtdConfig {
    VtdConfig {
        scalable_mode: false,
        first_stage: false,
        nested: false,
        pasid_bits: 0,
        ..VtdConfig::default()
    }
}

fn scalable(ctx: ScalableCtx, entry: impl FnOnce(&mut Guest) -> PasidEntry) -> Guest {
    let mut g = Guest::new(VtdConfig::default());
    g.scalable_context(SID, ctx);
    let e = entry(&mut g);
    g.pasid_entry(SID, PASID, e);
    g
}

fn fs_entry(g: &mut Guest) -> PasidEntry {
    let root = g.t.page();
    let f = pte::P | pte::RW | pte::US;
    g.t.map(root, 4, IOVA, 1, OUT | f, f);
    PasidEntry::first_stage(DID, root)
}

fn translated(g: &mut Guest, pasid: Option<u32>, addr: u64) -> Result<u64, DmaFault> {
    let req = DmaRequest {
        sid: SID,
        pasid,
        addr,
        write: true,
        privileged: false,
    };
    g.vtd.translated_dma(&mut g.t.mem, &req)
}

/// QEMU does not check the scalable-mode context DTE before answering translation requests
/// or accepting translated requests.
#[test]
fn scalable_dte_gates_translation_and_translated_requests() {
    let mut g = scalable(
        ScalableCtx {
            dte: false,
            ..ScalableCtx::default()
        },
        fs_entry,
    );
    g.enable();
    assert!(
        g.dma(SID, Some(PASID), IOVA, true).is_ok(),
        "untranslated DMA is still allowed"
    );
    assert_eq!(
        g.ats(SID, Some(PASID), IOVA, 1, false),
        Err(AtsRejection::UnsupportedRequest)
    );
    let f = translated(&mut g, Some(PASID), OUT).unwrap_err();
    assert_eq!(f.reason, FaultReason::TranslationBlocked);
    let recs = g.vtd.pending_faults();
    assert_eq!(
        recs.iter().map(|r| (r.reason, r.at)).collect::<Vec<_>>(),
        vec![(0x0d, 1), (0x0d, 2)]
    );
    // With DTE set both work, translated requests with PASID included (QEMU rejects those).
    let mut g = scalable(ScalableCtx::default(), fs_entry);
    g.enable();
    assert!(g.ats(SID, Some(PASID), IOVA, 1, false).unwrap()[0].r);
    assert_eq!(translated(&mut g, Some(PASID), OUT), Ok(OUT));
    assert_eq!(translated(&mut g, None, OUT), Ok(OUT));
}

/// QEMU defines fault 0xD but never raises it: legacy TT=00 and TT=10 must block
/// translation and translated requests; TT=01 allows them (and translated requests are not
/// re-translated).
#[test]
fn legacy_tt_blocks_ats_with_fault_0xd() {
    for (tt, ats_allowed) in [(0u64, false), (1, true), (2, false)] {
        let mut g = Guest::new(legacy_cfg());
        let root = g.t.page();
        g.legacy_context(SID, tt, 2, DID, root);
        g.t.map(root, 4, IOVA, 1, OUT | pte::R | pte::W, pte::R | pte::W);
        g.enable();
        let ats = g.ats(SID, None, IOVA, 1, false);
        let tr = translated(&mut g, None, OUT);
        if ats_allowed {
            assert_eq!(ats.unwrap()[0].translated, OUT, "TT={tt}");
            assert_eq!(
                tr,
                Ok(OUT),
                "TT={tt}: translated address must pass unchanged"
            );
            assert!(g.vtd.pending_faults().is_empty());
        } else {
            assert_eq!(ats, Err(AtsRejection::UnsupportedRequest), "TT={tt}");
            assert_eq!(
                tr.unwrap_err().reason,
                FaultReason::TranslationBlocked,
                "TT={tt}"
            );
            assert!(g.vtd.pending_faults().iter().all(|r| r.reason == 0x0d));
            assert_eq!(g.vtd.pending_faults().len(), 2, "TT={tt}");
        }
    }
}

/// QEMU delivers a type-3 (no PASID) device-TLB invalidation only to the device's no-PASID
/// ATC space; an ATS invalidation without PASID prefix hits every PASID's entries. The model
/// says so with `pasid: None` (meaning "all"), and decodes the size encoding.
#[test]
fn type3_invalidation_targets_all_pasids_and_decodes_ranges() {
    let mut g = scalable(ScalableCtx::default(), fs_entry);
    g.enable();
    g.submit(&[
        dev_tlb(SID, 0x1234_5000, 12),
        dev_tlb(SID, 0x1234_5000, 21),
        dev_tlb(SID, 0, 64),
    ]);
    let inv = atc_invalidations(&g.vtd.take_events());
    let got: Vec<_> = inv
        .iter()
        .map(|i| (i.sid, i.pasid, i.base, i.size_log2))
        .collect();
    assert_eq!(
        got,
        vec![
            (SID, None, 0x1234_5000, 12),
            (SID, None, 0x1220_0000, 21),
            (SID, None, 0, 64)
        ]
    );
    // Type 8 with G: the PASID plus global entries of all PASIDs.
    g.submit(&[pasid_dev_tlb(SID, PASID, 0x8000, 13, true)]);
    let inv = atc_invalidations(&g.vtd.take_events());
    assert_eq!(
        (inv[0].pasid, inv[0].global, inv[0].base, inv[0].size_log2),
        (Some(PASID), true, 0x8000, 13)
    );
}

/// QEMU's second-stage walk faults on a missing W even for translation requests, so a
/// read-only page answers R=W=0; it must answer R=1, W=0 (and record nothing).
#[test]
fn second_stage_read_only_page_answers_read_only() {
    let mut g = scalable(ScalableCtx::default(), |g| {
        let root = g.t.page();
        g.t.map(root, 4, IOVA, 1, OUT | pte::R, pte::R | pte::W);
        PasidEntry::second_stage(DID, root, 2)
    });
    g.enable();
    let e = g.ats(SID, Some(PASID), IOVA, 1, false).unwrap()[0];
    assert_eq!(
        (e.r, e.w, e.translated, e.size_log2),
        (true, false, OUT, 12)
    );
    assert!(g.vtd.pending_faults().is_empty());
}

/// QEMU answers translation requests for the interrupt range with an error and records an
/// interrupt-remapping fault. The range is reachable only with untranslated writes: the
/// completion says R=0, W=1, U=1 [spec-recall, VT-d 4.1 §4.2.3]. A DMA whose *output* lands
/// in the range is blocked with fault 0x87 (scalable mode).
#[test]
fn interrupt_range_translation_request_is_untranslated_only() {
    let mut g = scalable(ScalableCtx::default(), |g| {
        let root = g.t.page();
        g.t.map(
            root,
            4,
            IOVA,
            1,
            0xfee0_0000 | pte::R | pte::W,
            pte::R | pte::W,
        );
        PasidEntry::second_stage(DID, root, 2)
    });
    g.enable();
    let e = g.ats(SID, None, 0xfee0_1000, 4, false).unwrap()[0];
    assert_eq!(
        (
            e.untranslated_base,
            e.size_log2,
            e.r,
            e.w,
            e.untranslated_only
        ),
        (0xfee0_0000, 20, false, true, true)
    );
    assert!(g.vtd.pending_faults().is_empty());
    let f = g.dma(SID, Some(PASID), IOVA, true).unwrap_err();
    assert_eq!(f.reason, FaultReason::SmInterruptAddress);
    assert_eq!(g.vtd.pending_faults()[0].reason, 0x87);
}

/// QEMU limits PASIDs to 8 bits (`MemTxAttrs.pid`); the model handles 20-bit PASIDs end to
/// end (PSS = 19).
#[test]
fn twenty_bit_pasids_work_end_to_end() {
    const BIG: u32 = 0xa_bcde;
    let mut g = Guest::new(VtdConfig::default());
    assert_eq!((g.vtd.read64(ECAP) >> 35) & 0x1f, 19);
    g.scalable_context(SID, ScalableCtx::default());
    let e = fs_entry(&mut g);
    g.pasid_entry(SID, BIG, e);
    g.enable();
    assert_eq!(
        g.dma(SID, Some(BIG), IOVA, false).unwrap().translated_base,
        OUT
    );
    assert!(g.ats(SID, Some(BIG), IOVA, 1, false).unwrap()[0].r);
    g.submit(&[pasid_dev_tlb(SID, BIG, IOVA, 12, false)]);
    assert_eq!(atc_invalidations(&g.vtd.take_events())[0].pasid, Some(BIG));
    assert_eq!(
        g.dma(SID, Some(BIG - 1), IOVA, false).unwrap_err().reason,
        FaultReason::PasidEntryNotPresent
    );
    assert_eq!(g.vtd.pending_faults()[0].pasid, Some(BIG - 1));
}

/// QEMU has exactly one fault recording register; the model has CAP.NFR+1 and fills them in
/// order, FRI naming the first pending one.
#[test]
fn several_fault_records() {
    let cfg = VtdConfig {
        fault_records: 4,
        ..VtdConfig::default()
    };
    let mut g = Guest::new(cfg);
    assert_eq!((g.vtd.read64(CAP) >> 40) & 0xff, 3);
    g.enable();
    for i in 0..4u16 {
        let _ = g.dma(0x0400 + i, None, u64::from(i) << 12, false);
    }
    let recs = g.vtd.pending_faults();
    assert_eq!(
        recs.iter().map(|r| (r.sid, r.addr)).collect::<Vec<_>>(),
        (0..4u16)
            .map(|i| (0x0400 + i, u64::from(i) << 12))
            .collect::<Vec<_>>()
    );
    assert_eq!((g.vtd.read32(FSTS) >> 8) & 0xff, 0);
    assert_eq!(g.vtd.read32(FSTS) & FSTS_PFO, 0);
}

/// QEMU never raises ITE or ICE (its invalidations are synchronous); the model does.
#[test]
fn invalidation_timeout_and_completion_errors_are_reported() {
    let mut g = scalable(ScalableCtx::default(), fs_entry);
    g.enable();
    g.submit(&[dev_tlb(SID, IOVA, 12), wait_sw(g.status_addr(50), 1)]);
    let tag = atc_invalidations(&g.vtd.take_events())[0].tag;
    g.vtd.atc_invalidation_timeout();
    assert_ne!(g.vtd.read32(FSTS) & FSTS_ITE, 0);
    assert_eq!((g.vtd.read64(IQER) >> 32) & 0xffff, u64::from(SID));
    assert_eq!(g.status(50), 0);
    g.vtd.ack_atc_invalidation(&mut g.t.mem, tag);
    assert_ne!(g.vtd.read32(FSTS) & FSTS_ICE, 0);
}

/// QEMU aborts on privileged (supervisor) translation requests when SRS is set; the model
/// answers them per the PASID entry's SRE.
#[test]
fn supervisor_translation_requests() {
    for (sre, rights) in [(true, true), (false, false)] {
        let mut g = scalable(ScalableCtx::default(), |g| {
            let root = g.t.page();
            let f = pte::P | pte::RW; // supervisor-only page
            g.t.map(root, 4, IOVA, 1, OUT | f, f);
            PasidEntry {
                sre,
                ..PasidEntry::first_stage(DID, root)
            }
        });
        g.enable();
        let req = AtsRequest {
            sid: SID,
            pasid: Some(PASID),
            addr: IOVA,
            len: 1,
            no_write: false,
            exec: false,
            privileged: true,
            max_entries: 1,
            stu_log2: 12,
        };
        let e = g.vtd.translation_request(&mut g.t.mem, &req).unwrap()[0];
        assert_eq!(
            (e.r, e.w, e.privileged),
            (rights, rights, true),
            "SRE={sre}"
        );
        assert!(g.vtd.pending_faults().is_empty());
        // A user-mode request to the supervisor page gets a hole, not a fault record.
        let e = g.ats(SID, Some(PASID), IOVA, 1, false).unwrap()[0];
        assert_eq!((e.r, e.w, e.privileged), (false, false, false));
    }
}

/// QEMU performs no execute checks; the model honours ERS, ERE and XD.
#[test]
fn execute_permission() {
    for (ere, xd, expect) in [
        (true, false, true),
        (true, true, false),
        (false, false, false),
    ] {
        let mut g = scalable(ScalableCtx::default(), |g| {
            let root = g.t.page();
            let f = pte::P | pte::RW | pte::US;
            g.t.map(root, 4, IOVA, 1, OUT | f | if xd { pte::XD } else { 0 }, f);
            PasidEntry {
                ere,
                ..PasidEntry::first_stage(DID, root)
            }
        });
        g.enable();
        let req = AtsRequest {
            sid: SID,
            pasid: Some(PASID),
            addr: IOVA,
            len: 1,
            no_write: true,
            exec: true,
            privileged: false,
            max_entries: 1,
            stu_log2: 12,
        };
        let e = g.vtd.translation_request(&mut g.t.mem, &req).unwrap()[0];
        assert_eq!((e.r, e.x), (true, expect), "ERE={ere} XD={xd}");
    }
}

/// QEMU assumes RID_PASID = 0; the model uses the context entry's RID_PASID (ECAP.RPS) for
/// requests without PASID, and RID_PRIV makes them privileged.
#[test]
fn rid_pasid_selects_the_pasid_entry_for_requests_without_pasid() {
    let mut g = scalable(
        ScalableCtx {
            rid_pasid: PASID,
            ..ScalableCtx::default()
        },
        fs_entry,
    );
    assert_ne!(g.vtd.read64(ECAP) & (1 << 49), 0);
    g.enable();
    assert_eq!(g.dma(SID, None, IOVA, false).unwrap().translated_base, OUT);
    // RID_PRIV: the same request is privileged, which SRE=0 forbids.
    let mut g = scalable(
        ScalableCtx {
            rid_pasid: PASID,
            rid_priv: true,
            ..ScalableCtx::default()
        },
        fs_entry,
    );
    g.enable();
    assert_eq!(
        g.dma(SID, None, IOVA, false).unwrap_err().reason,
        FaultReason::Privilege
    );
}

/// QEMU's hole answer is the level where the walk stopped; the model's too, including for
/// second-stage-only domains (a 1 GiB hole under an empty PDPT slot).
#[test]
fn holes_report_the_size_of_the_missing_level() {
    let mut g = scalable(ScalableCtx::default(), |g| {
        let root = g.t.page();
        g.t.map(root, 4, 0, 1, OUT | pte::R | pte::W, pte::R | pte::W);
        PasidEntry::second_stage(DID, root, 2)
    });
    g.enable();
    let got: Vec<_> = [0x1000u64, 0x20_0000, 0x4000_0000, 0x80_0000_0000]
        .iter()
        .map(|&a| {
            let e = g.ats(SID, Some(PASID), a, 1, false).unwrap()[0];
            (e.untranslated_base, e.size_log2, e.r || e.w)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0x1000, 12, false),
            (0x20_0000, 21, false),
            (0x4000_0000, 30, false),
            (0x80_0000_0000, 39, false)
        ]
    );
}
