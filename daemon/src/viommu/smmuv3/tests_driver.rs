//! Driver-sequence tests: the model programmed the way Linux arm-smmu-v3 programs hardware.

use super::events::{EventType, FaultClass};
use super::regs::*;
use super::tests_support::*;
use super::*;

const SID: u32 = 0x0108;
const SSID: u32 = 5;
const ASID: u16 = 7;
const VA: u64 = 0x1234_5000;
const PA: u64 = 0x9010_0000;

fn ats(sid: u32, ssid: Option<u32>, address: u64, length: u64) -> AtsRequest {
    AtsRequest {
        sid,
        ssid,
        address,
        length,
        no_write: false,
        exec: false,
        privileged: false,
    }
}

fn dma(sid: u32, ssid: Option<u32>, address: u64, write: bool) -> DmaRequest {
    DmaRequest {
        sid,
        ssid,
        address,
        access: Access {
            write,
            ..Access::default()
        },
    }
}

/// A 2-level stream table with a PASID-capable stage-1 stream; SSID 5 maps VA → PA.
fn pasid_setup() -> (Driver, CdTable, PageTables) {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::TwoLevel);
    let (t, _) = d.s1_stream(SID, 20);
    let pt = PageTables::stage1(&d.guest, 12, 16);
    pt.map(&d.guest, VA, PA, 12, AF | AP_EL0 | NG);
    d.install_cd(&t, SID, SSID, cd_words(&pt, 5, ASID));
    (d, t, pt)
}

fn atc_invalidations(outputs: &[Smmuv3Output]) -> Vec<AtcInvalidation> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Smmuv3Output::AtcInvalidate(a) => Some(*a),
            _ => None,
        })
        .collect()
}

#[test]
fn linux_sequence_ats_with_pasid_then_invalidate_and_fault() {
    let (mut d, _, pt) = pasid_setup();

    // ATS translation with the PASID succeeds.
    let got = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(SID, Some(SSID), VA + 0x678, 0x100), 8)
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].untranslated, got[0].size_log2, got[0].translated),
        (VA, 12, PA)
    );
    assert!(got[0].r && got[0].w && !got[0].x && !got[0].global);
    // So does the DMA path, and nothing was reported.
    let t = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(SID, Some(SSID), VA + 0x10, true))
        .unwrap();
    assert_eq!(
        t,
        DmaTranslation {
            address: PA + 0x10,
            contiguous: 0xff0
        }
    );
    assert!(d.events().is_empty());
    d.outputs();

    // Unmap: clear the PTE, then TLBI by VA + ATC_INV + CMD_SYNC (arm_smmu_tlb_inv_range_asid
    // followed by arm_smmu_atc_inv_domain).
    pt.unmap(&d.guest, VA, 3);
    d.submit(&[
        cmd::tlbi_nh_va(ASID, VA),
        cmd::atc_inv(SID, Some(SSID), VA, 0),
    ]);
    let sync_slot = d.submit_sync();

    // The invalidation went to the device; the SYNC waits for it.
    let inv = atc_invalidations(&d.outputs());
    assert_eq!(
        inv,
        vec![AtcInvalidation {
            id: inv[0].id,
            sid: SID,
            ssid: Some(SSID),
            global: false,
            start: VA,
            size_log2: 12
        }]
    );
    assert!(d.smmu.waiting_for_atc());
    assert_ne!(
        d.guest.r32(sync_slot),
        0,
        "SYNC must not complete before the ATC acknowledged"
    );
    assert_eq!(d.cons(), d.prod() - 1, "CONS stays at the CMD_SYNC");

    // The device acknowledges: SYNC completes with the MSI write.
    assert!(d.smmu.ack_atc_invalidation(&d.guest.mem, inv[0].id));
    assert_eq!(d.guest.r32(sync_slot), 0);
    assert_eq!(d.cons(), d.prod());
    assert!(!d.smmu.waiting_for_atc());

    // ATS now answers a hole without an event; DMA faults with F_TRANSLATION.
    let got = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(SID, Some(SSID), VA, 0x1000), 8)
        .unwrap();
    assert_eq!(got.len(), 1);
    assert!(!got[0].r && !got[0].w);
    assert_eq!((got[0].untranslated, got[0].size_log2), (VA, 12));
    assert!(d.events().is_empty(), "ATS misses are not recorded");
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(SID, Some(SSID), VA + 0x20, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FTranslation));
    let ev = d.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventType::FTranslation);
    assert_eq!(
        (ev[0].sid, ev[0].ssid, ev[0].input_addr),
        (SID, Some(SSID), VA + 0x20)
    );
    assert!(ev[0].read && !ev[0].stage2);
    assert!(d.outputs().iter().any(|o| matches!(
        o,
        Smmuv3Output::Interrupt(Interrupt {
            source: InterruptSource::EventQueue,
            ..
        })
    )));
}

#[test]
fn the_tlb_caches_until_invalidated() {
    let (mut d, _, pt) = pasid_setup();
    let req = dma(SID, Some(SSID), VA, false);
    d.smmu.translate_dma(&d.guest.mem, &req).unwrap();
    pt.unmap(&d.guest, VA, 3);
    // Without a TLBI the cached translation is still used (as on hardware).
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_ok());
    d.submit(&[cmd::tlbi_nh_asid(ASID)]);
    d.sync();
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_err());
}

#[test]
fn each_tlbi_form_drops_the_entry() {
    let forms: Vec<(&str, [u64; 2])> = vec![
        ("NH_VA", cmd::tlbi_nh_va(ASID, VA)),
        ("NH_VAA", cmd::tlbi_nh_vaa(VA)),
        ("NH_ASID", cmd::tlbi_nh_asid(ASID)),
        ("NH_ALL", cmd::tlbi_nh_all()),
        ("S12_VMALL", cmd::tlbi_s12_vmall(0)),
        ("NSNH_ALL", cmd::tlbi_nsnh_all()),
        (
            "NH_VA range",
            cmd::tlbi_nh_va_range(ASID, VA - 0x3000, 1, 3, 0),
        ),
    ];
    for (name, c) in forms {
        let (mut d, _, pt) = pasid_setup();
        let req = dma(SID, Some(SSID), VA, false);
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap();
        pt.unmap(&d.guest, VA, 3);
        d.submit(&[c]);
        d.sync();
        assert!(
            d.smmu.translate_dma(&d.guest.mem, &req).is_err(),
            "{name} left the entry"
        );
    }
    // Non-matching invalidations keep it.
    let misses: Vec<(&str, [u64; 2])> = vec![
        ("NH_VA other asid", cmd::tlbi_nh_va(ASID + 1, VA)),
        ("NH_VA other page", cmd::tlbi_nh_va(ASID, VA + 0x1000)),
        ("NH_ASID other", cmd::tlbi_nh_asid(ASID + 1)),
        ("S12_VMALL other vmid", cmd::tlbi_s12_vmall(3)),
        (
            "NH_VA range below",
            cmd::tlbi_nh_va_range(ASID, VA - 0x3000, 1, 2, 0),
        ),
    ];
    for (name, c) in misses {
        let (mut d, _, pt) = pasid_setup();
        let req = dma(SID, Some(SSID), VA, false);
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap();
        pt.unmap(&d.guest, VA, 3);
        d.submit(&[c]);
        d.sync();
        assert!(
            d.smmu.translate_dma(&d.guest.mem, &req).is_ok(),
            "{name} dropped the entry"
        );
    }
}

#[test]
fn range_tlbi_needs_ril() {
    // Without RIL the TG/NUM/SCALE fields are ignored: only the page at the address goes.
    let props = Smmuv3Properties {
        ril: false,
        ..Smmuv3Properties::default()
    };
    let mut d = Driver::new(props, StreamTable::Linear);
    let (t, _) = d.s1_stream(3, 4);
    let pt = PageTables::stage1(&d.guest, 12, 16);
    pt.map(&d.guest, VA, PA, 12, AF | AP_EL0);
    d.install_cd(&t, 3, 1, cd_words(&pt, 5, ASID));
    let req = dma(3, Some(1), VA, false);
    d.smmu.translate_dma(&d.guest.mem, &req).unwrap();
    pt.unmap(&d.guest, VA, 3);
    d.submit(&[cmd::tlbi_nh_va_range(ASID, VA - 0x3000, 1, 3, 0)]);
    d.sync();
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_ok());
    assert_eq!(d.r32(IDR3) >> 10 & 1, 0);
}

#[test]
fn ste_changes_need_cfgi() {
    let (mut d, t, _) = pasid_setup();
    let req = dma(SID, Some(SSID), VA, false);
    d.smmu.translate_dma(&d.guest.mem, &req).unwrap();
    // Turn the STE into abort without CFGI: the cached config still translates.
    let addr = d.ste_addr(SID);
    d.guest.w64(addr, 1 | STE_CFG_ABORT << 1);
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_ok());
    d.submit(&[cmd::cfgi_ste(SID)]);
    d.sync();
    let f = d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err();
    assert_eq!(
        f,
        DmaFault {
            event: None,
            raz_wi: false
        },
        "abort config is silent"
    );
    // Same for CDs: CFGI_CD_ALL picks up a changed CD.
    d.guest.w64(addr, ste_s1(t.base, t.fmt, 20, 2, 1)[0]);
    d.submit(&[cmd::cfgi_all()]);
    d.sync();
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_ok());
    let cd = d.cd_addr(&t, SSID);
    d.guest.w64(cd, 0);
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_ok());
    d.submit(&[cmd::cfgi_cd_all(SID)]);
    d.sync();
    assert_eq!(
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err().event,
        Some(EventType::CBadCd)
    );
}

#[test]
fn malformed_command_sets_cmdq_err_and_stops() {
    let (mut d, _, _) = pasid_setup();
    let before = d.cons();
    d.submit(&[[0x7f, 0], cmd::cfgi_all()]);
    let sync_slot = d.submit_sync();
    assert_eq!(d.r32(GERROR) ^ d.r32(GERRORN), GERROR_CMDQ_ERR);
    let cons = d.cons();
    assert_eq!(cons >> CMDQ_CONS_ERR_SHIFT & 0x7f, CERROR_ILL);
    assert_eq!(cons & 0xfffff, before, "CONS points at the illegal command");
    assert_ne!(d.guest.r32(sync_slot), 0, "later commands are not consumed");
    assert!(d.outputs().iter().any(|o| matches!(
        o,
        Smmuv3Output::Interrupt(Interrupt {
            source: InterruptSource::GlobalError,
            ..
        })
    )));
    // Linux arm_smmu_cmdq_skip_err: overwrite the bad command with a SYNC, ack GERRORN.
    let bad = d.cmdq + u64::from(before) * 16;
    let s = cmd::sync_none();
    d.guest.w64(bad, s[0]);
    d.guest.w64(bad + 8, s[1]);
    let gerror = d.r32(GERROR);
    d.w32(GERRORN, gerror);
    assert_eq!(
        d.guest.r32(sync_slot),
        0,
        "processing resumed after the acknowledgement"
    );
    assert_eq!(d.cons() & 0xfffff, d.prod());
}

#[test]
fn illegal_command_encodings() {
    let cases: Vec<(&str, [u64; 2])> = vec![
        ("unknown opcode", [0x7f, 0]),
        ("QEMU's CFGI_ALL value 0x07", [0x07, 0]),
        (
            "SSEC on the non-secure queue",
            [u64::from(opcode::CFGI_STE) | 1 << 10, 0],
        ),
        ("ATC_INV size 53", cmd::atc_inv(1, None, 0, 53)),
        ("SYNC CS=3", [u64::from(opcode::SYNC) | 3 << 12, 0]),
        ("PRI_RESP resp=3", cmd::pri_resp(1, 1, 1, 3)),
        ("TLBI_EL2_ALL without HYP", [0x20, 0]),
        ("TLBI_EL3_ALL", [0x18, 0]),
    ];
    for (name, c) in cases {
        let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
        d.submit(&[c]);
        assert_eq!(d.r32(GERROR) ^ d.r32(GERRORN), GERROR_CMDQ_ERR, "{name}");
        assert_eq!(d.cons() >> CMDQ_CONS_ERR_SHIFT, CERROR_ILL, "{name}");
    }
    // Commands for unadvertised features are illegal too.
    let props = Smmuv3Properties {
        ats: false,
        pri: false,
        sev: false,
        ..Smmuv3Properties::default()
    };
    for c in [
        cmd::atc_inv(1, None, 0, 0),
        cmd::pri_resp(1, 1, 1, 2),
        cmd::sync_sev(),
    ] {
        let mut d = Driver::new(props.clone(), StreamTable::Linear);
        d.submit(&[c]);
        assert_eq!(d.cons() >> CMDQ_CONS_ERR_SHIFT, CERROR_ILL, "{c:x?}");
    }
}

#[test]
fn command_fetch_abort_is_cerror_abt() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    // Point the (disabled) queue outside guest memory, re-enable, publish a command.
    d.w32(CR0, CR0_EVENTQEN | CR0_SMMUEN);
    d.w64(CMDQ_BASE, 0x10_0000_0000 | 4);
    d.w32(CMDQ_CONS, 0);
    d.w32(CR0, CR0_EVENTQEN | CR0_SMMUEN | CR0_CMDQEN);
    d.w32(CMDQ_PROD, 1);
    assert_eq!(d.cons() >> CMDQ_CONS_ERR_SHIFT, CERROR_ABT);
    assert_eq!(d.r32(GERROR) ^ d.r32(GERRORN), GERROR_CMDQ_ERR);
}

#[test]
fn atc_sync_timeout_sets_cerror_atc_inv_sync() {
    let (mut d, _, _) = pasid_setup();
    d.submit(&[cmd::atc_inv(SID, None, 0, 52)]);
    let slot = d.submit_sync();
    let inv = atc_invalidations(&d.outputs());
    assert_eq!((inv[0].ssid, inv[0].start, inv[0].size_log2), (None, 0, 64));
    assert!(d.smmu.atc_invalidation_timeout());
    assert_eq!(d.cons() >> CMDQ_CONS_ERR_SHIFT, CERROR_ATC_INV_SYNC);
    assert_eq!(d.cons() & 0xfffff, d.prod() - 1, "CONS stays at the SYNC");
    assert_eq!(d.r32(GERROR) ^ d.r32(GERRORN), GERROR_CMDQ_ERR);
    assert_ne!(d.guest.r32(slot), 0);
    // A late acknowledgement is ignored.
    assert!(!d.smmu.ack_atc_invalidation(&d.guest.mem, inv[0].id));
    // Linux retries the SYNC by acknowledging the error.
    let g = d.r32(GERROR);
    d.w32(GERRORN, g);
    assert_eq!(d.guest.r32(slot), 0);
    assert_eq!(d.cons() & 0xfffff, d.prod());
    assert!(!d.smmu.atc_invalidation_timeout(), "nothing waits any more");
}

#[test]
fn sync_waits_for_every_outstanding_invalidation() {
    let (mut d, _, _) = pasid_setup();
    d.submit(&[
        cmd::atc_inv(SID, Some(1), 0x1000, 0),
        cmd::atc_inv(SID, Some(2), 0x2000, 0),
    ]);
    let slot = d.submit_sync();
    let inv = atc_invalidations(&d.outputs());
    assert_eq!(inv.len(), 2);
    assert!(d.smmu.ack_atc_invalidation(&d.guest.mem, inv[1].id));
    assert_ne!(d.guest.r32(slot), 0);
    // Commands queued behind the waiting SYNC are not consumed either.
    d.submit(&[cmd::cfgi_all()]);
    assert_eq!(d.cons() & 0xfffff, d.prod() - 2);
    assert!(d.smmu.ack_atc_invalidation(&d.guest.mem, inv[0].id));
    assert_eq!(d.guest.r32(slot), 0);
    assert_eq!(d.cons() & 0xfffff, d.prod());
}

#[test]
fn outstanding_invalidations_are_bounded() {
    let mut d = Driver::with_queues(Smmuv3Properties::default(), StreamTable::Linear, 10, 8);
    let n = MAX_OUTSTANDING_ATC_INVALIDATIONS + 10;
    let cmds: Vec<_> = (0..n)
        .map(|i| cmd::atc_inv(1, None, (i as u64) << 12, 0))
        .collect();
    d.submit(&cmds);
    let inv = atc_invalidations(&d.outputs());
    assert_eq!(inv.len(), MAX_OUTSTANDING_ATC_INVALIDATIONS);
    assert!(d.smmu.waiting_for_atc());
    for a in &inv {
        d.smmu.ack_atc_invalidation(&d.guest.mem, a.id);
    }
    assert_eq!(atc_invalidations(&d.outputs()).len(), 10);
    assert_eq!(d.cons() & 0xfffff, d.prod());
}

#[test]
fn atc_inv_size_encoding() {
    let cases = [
        // (address, size, expected start, expected log2)
        (0x1234_5000u64, 0u64, 0x1234_5000u64, 12u32),
        (0x1234_5000, 1, 0x1234_4000, 13),
        (0x1234_5000, 9, 0x1220_0000, 21),
        (0xffff_f000, 16, 0xf000_0000, 28),
        (0xffff_f000, 20, 0, 32),
        (0xdead_0000, 52, 0, 64),
    ];
    for (addr, size, start, log2) in cases {
        let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
        d.submit(&[cmd::atc_inv(9, Some(3), addr, size)]);
        let inv = atc_invalidations(&d.outputs());
        assert_eq!(
            (inv[0].start, inv[0].size_log2),
            (start, log2),
            "size {size}"
        );
        assert_eq!((inv[0].sid, inv[0].ssid), (9, Some(3)));
    }
    // Global only counts with SSV.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let mut c = cmd::atc_inv(9, Some(3), 0, 0);
    c[0] |= 1 << 9;
    let mut c2 = cmd::atc_inv(9, None, 0, 0);
    c2[0] |= 1 << 9;
    d.submit(&[c, c2]);
    let inv = atc_invalidations(&d.outputs());
    assert!(inv[0].global);
    assert!(!inv[1].global);
}

#[test]
fn event_queue_overflow_sets_ovflg_until_acknowledged() {
    let mut d = Driver::with_queues(Smmuv3Properties::default(), StreamTable::Linear, 8, 1);
    // SID 5 has no valid STE: every DMA is C_BAD_STE.
    let req = dma(5, None, 0, false);
    for _ in 0..2 {
        assert_eq!(
            d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err().event,
            Some(EventType::CBadSte)
        );
    }
    let f = d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err();
    assert_eq!(f.event, None, "the queue is full; the event is lost");
    assert_eq!(d.r32(EVENTQ_PROD) & Q_OVFLG, Q_OVFLG);
    // A second overflow does not toggle again.
    d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err();
    assert_eq!(d.r32(EVENTQ_PROD) & Q_OVFLG, Q_OVFLG);
    // Consume and acknowledge; recording resumes.
    assert_eq!(d.events().len(), 2);
    assert_eq!(d.r32(EVENTQ_CONS) & Q_OVFLG, Q_OVFLG);
    assert_eq!(
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err().event,
        Some(EventType::CBadSte)
    );
}

#[test]
fn event_write_abort_sets_gerror() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.w32(CR0, CR0_CMDQEN | CR0_SMMUEN);
    d.w64(EVENTQ_BASE, 0x10_0000_0000 | 2);
    d.w32(CR0, CR0_CMDQEN | CR0_SMMUEN | CR0_EVENTQEN);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(5, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, None);
    assert_eq!(d.r32(GERROR) & GERROR_EVENTQ_ABT_ERR, GERROR_EVENTQ_ABT_ERR);
}

#[test]
fn configuration_errors_are_reported() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::TwoLevel);
    // L1 descriptor with SPAN 0 (no level-2 table).
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(0x300, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadStreamId));
    // SID beyond SIDSIZE.
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1 << 16, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadStreamId));
    // V = 0.
    d.ste_addr(0x301);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(0x301, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSte));
    // Reserved Config 0b001.
    d.install_ste(0x302, [1 | 1 << 1, 0, 0, 0, 0, 0, 0, 0]);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(0x302, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSte));
    // S1CDMax above SSIDSIZE.
    let t = d.alloc_cd_table(4);
    d.install_ste(0x303, ste_s1(t.base, 0, 21, 2, 0));
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(0x303, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSte));
    // EATS split-stage without stage 2.
    d.install_ste(0x304, ste_s1(t.base, 0, 4, 2, 2));
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(0x304, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSte));
    let ev = d.events();
    assert_eq!(
        ev.iter().map(|e| e.sid).collect::<Vec<_>>(),
        vec![0x300, 1 << 16, 0x301, 0x302, 0x303, 0x304]
    );
}

#[test]
fn substream_rules() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let (t, pt) = d.s1_stream(1, 4);
    pt.map(&d.guest, VA, PA, 12, AF | AP_EL0);
    // No SSID → CD 0 (S1DSS = SSID0).
    assert_eq!(
        d.smmu
            .translate_dma(&d.guest.mem, &dma(1, None, VA, false))
            .unwrap()
            .address,
        PA
    );
    // SSID 0 is illegal with S1DSS = SSID0; SSID beyond S1CDMax is illegal.
    for ssid in [0, 16, 0xf_ffff] {
        let f = d
            .smmu
            .translate_dma(&d.guest.mem, &dma(1, Some(ssid), VA, false))
            .unwrap_err();
        assert_eq!(f.event, Some(EventType::CBadSubstreamId), "ssid {ssid}");
    }
    // An SSID whose CD is not valid: C_BAD_CD.
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1, Some(3), VA, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadCd));
    // S1DSS = terminate: non-substream traffic is F_STREAM_DISABLED.
    d.install_ste(2, ste_s1(t.base, t.fmt, 4, 0, 1));
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(2, None, VA, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FStreamDisabled));
    // S1DSS = bypass: non-substream traffic skips stage 1.
    d.install_ste(3, ste_s1(t.base, t.fmt, 4, 1, 1));
    assert_eq!(
        d.smmu
            .translate_dma(&d.guest.mem, &dma(3, None, VA, false))
            .unwrap()
            .address,
        VA
    );
    // An SSID on a stream without substreams (S1CDMax = 0) or without stage 1.
    d.install_ste(4, ste_s1(t.base, t.fmt, 0, 0, 1));
    assert_eq!(
        d.smmu
            .translate_dma(&d.guest.mem, &dma(4, None, VA, false))
            .unwrap()
            .address,
        PA
    );
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(4, Some(1), VA, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSubstreamId));
    d.install_ste(5, [1 | STE_CFG_BYPASS << 1, 0, 0, 0, 0, 0, 0, 0]);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(5, Some(1), VA, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSubstreamId));
    assert_eq!(
        d.smmu
            .translate_dma(&d.guest.mem, &dma(5, None, VA, false))
            .unwrap()
            .address,
        VA
    );
}

#[test]
fn cd_fetch_abort_and_ste_fetch_abort() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::TwoLevel);
    d.install_ste(1, ste_s1(0x10_0000_0000, 0, 0, 0, 0));
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FCdFetch));
    // An L1 descriptor pointing outside memory.
    d.guest.w64(d.strtab + 8 * 5, 0x10_0000_0000 | 9);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(5 << SPLIT, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FSteFetch));
    let ev = d.events();
    assert_eq!(ev[0].aux_addr, 0x10_0000_0000);
    assert_eq!(ev[1].aux_addr, 0x10_0000_0000);
}

#[test]
fn ats_not_enabled_in_ste_is_bad_ats_treq() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let t = d.alloc_cd_table(0);
    let pt = PageTables::stage1(&d.guest, 12, 16);
    pt.map(&d.guest, VA, PA, 12, AF | AP_EL0);
    d.install_cd(&t, 1, 0, cd_words(&pt, 5, 1));
    d.install_ste(1, ste_s1(t.base, 0, 0, 0, 0));
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(1, None, VA, 0x1000), 4)
        .unwrap_err();
    assert_eq!(
        e,
        AtsError::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq)
        }
    );
    let ev = d.events();
    assert_eq!(
        (ev[0].kind, ev[0].sid, ev[0].input_addr),
        (EventType::FBadAtsTreq, 1, VA)
    );
    // Untranslated DMA still works; translated DMA is forbidden.
    assert!(d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1, None, VA, false))
        .is_ok());
    let f = d
        .smmu
        .translated_dma(&d.guest.mem, &dma(1, None, PA, true))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FTranslForbidden));
    // EATS = 1: translated DMA passes through unchanged.
    d.install_ste(1, ste_s1(t.base, 0, 0, 0, 1));
    assert_eq!(
        d.smmu
            .translated_dma(&d.guest.mem, &dma(1, None, PA, true))
            .unwrap()
            .address,
        PA
    );
    assert_eq!(
        d.smmu
            .translate_ats(&d.guest.mem, &ats(1, None, VA, 0x1000), 4)
            .unwrap()[0]
            .translated,
        PA
    );
}

#[test]
fn smmu_disabled_follows_gbpa() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.w32(CR0, 0);
    let req = dma(1, None, 0x4000, true);
    assert_eq!(
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap().address,
        0x4000
    );
    // Without UPDATE a GBPA write is ignored.
    d.w32(GBPA, GBPA_ABORT);
    assert!(d.smmu.translate_dma(&d.guest.mem, &req).is_ok());
    d.w32(GBPA, GBPA_ABORT | GBPA_UPDATE);
    assert_eq!(
        d.r32(GBPA),
        GBPA_ABORT,
        "UPDATE reads back as 0 once applied"
    );
    assert_eq!(
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err(),
        DmaFault {
            event: None,
            raz_wi: false
        }
    );
    assert!(d.smmu.translated_dma(&d.guest.mem, &req).is_err());
    // ATS requests are rejected while disabled.
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(1, None, 0, 1), 1)
        .unwrap_err();
    assert_eq!(e, AtsError::UnsupportedRequest { event: None });
}

#[test]
fn pri_queue_and_pri_resp() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let pr = PageRequest {
        sid: 7,
        ssid: Some(0x12345),
        address: 0xabcd_e123,
        prgi: 0x1a5,
        last: true,
        read: true,
        write: true,
        exec: false,
        privileged: true,
    };
    d.smmu.page_request(&d.guest.mem, &pr).unwrap();
    assert_eq!(d.r32(PRIQ_PROD), 1);
    let dw0 = d.guest.r64(d.priq);
    let dw1 = d.guest.r64(d.priq + 8);
    assert_eq!(dw0 & 0xffff_ffff, 7);
    assert_eq!(dw0 >> 32 & 0xf_ffff, 0x12345);
    assert_eq!(dw0 >> 58, 0b111101, "SSV, Last, Write, Read, !Exec, Priv");
    assert_eq!(dw1, 0xabcd_e000 | 0x1a5);
    assert!(d.outputs().iter().any(|o| matches!(
        o,
        Smmuv3Output::Interrupt(Interrupt {
            source: InterruptSource::PriQueue,
            ..
        })
    )));
    // The guest answers with CMD_PRI_RESP (Success).
    d.submit(&[cmd::pri_resp(7, 0x12345, 0x1a5, 2)]);
    assert_eq!(
        d.outputs(),
        vec![Smmuv3Output::PriResponse(PriResponse {
            sid: 7,
            ssid: Some(0x12345),
            prgi: 0x1a5,
            code: PriResponseCode::Success
        })]
    );
    // Filling the 256-entry queue overflows.
    for _ in 1..256 {
        d.smmu.page_request(&d.guest.mem, &pr).unwrap();
    }
    assert_eq!(
        d.smmu.page_request(&d.guest.mem, &pr),
        Err(PriError::Overflow)
    );
    assert_eq!(d.r32(PRIQ_PROD) & Q_OVFLG, Q_OVFLG);
}

#[test]
fn sync_completion_signals() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.outputs();
    d.submit(&[cmd::sync_sev()]);
    assert_eq!(d.outputs(), vec![Smmuv3Output::SendEvent]);
    // MSI write to an arbitrary address with data.
    let flag = d.guest.alloc(8, 8);
    d.submit(&[cmd::sync_msi(flag, 0xfeed_f00d)]);
    assert_eq!(d.guest.r32(flag), 0xfeed_f00d);
    // MSI write that aborts: GERROR.MSI_CMDQ_ABT_ERR, queue continues.
    d.submit(&[cmd::sync_msi(0x10_0000_0000, 1), cmd::sync_msi(flag, 2)]);
    assert_eq!(
        d.r32(GERROR) & GERROR_MSI_CMDQ_ABT_ERR,
        GERROR_MSI_CMDQ_ABT_ERR
    );
    assert_eq!(d.guest.r32(flag), 2);
    // Without IDR0.MSI, CS = IRQ raises the (wired) CMD_SYNC interrupt.
    let props = Smmuv3Properties {
        msi: false,
        ..Smmuv3Properties::default()
    };
    let mut d = Driver::new(props, StreamTable::Linear);
    d.outputs();
    d.submit(&[cmd::sync_msi(0, 0)]);
    assert_eq!(
        d.outputs(),
        vec![Smmuv3Output::Interrupt(Interrupt {
            source: InterruptSource::CmdSync,
            msi: None
        })]
    );
}

#[test]
fn interrupt_msi_configuration_is_reported() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.w64(EVENTQ_IRQ_CFG0, 0x0800_0040);
    d.w32(EVENTQ_IRQ_CFG1, 33);
    d.outputs();
    d.smmu
        .translate_dma(&d.guest.mem, &dma(9, None, 0, false))
        .unwrap_err();
    assert_eq!(
        d.outputs(),
        vec![Smmuv3Output::Interrupt(Interrupt {
            source: InterruptSource::EventQueue,
            msi: Some(MsiMessage {
                address: 0x0800_0040,
                data: 33
            })
        })]
    );
    // With EVENTQ_IRQEN clear, no interrupt.
    d.w32(IRQ_CTRL, IRQ_CTRL_GERROR_IRQEN);
    d.smmu
        .translate_dma(&d.guest.mem, &dma(9, None, 0, false))
        .unwrap_err();
    assert!(d.outputs().is_empty());
}

#[test]
fn register_file_basics() {
    let props = Smmuv3Properties {
        ssid_bits: 8,
        sid_bits: 12,
        oas: Oas::Bits44,
        gran16k: false,
        two_level_cd: false,
        ..Smmuv3Properties::default()
    };
    let mut d = Driver::new(props, StreamTable::Linear);
    let idr0 = d.r32(IDR0);
    assert_eq!(idr0 & 3, 3, "S1P and S2P");
    assert_eq!(idr0 >> 10 & 1, 1, "ATS");
    assert_eq!(idr0 >> 16 & 1, 1, "PRI");
    assert_eq!(idr0 >> 19 & 1, 0, "CD2L");
    assert_eq!(idr0 >> 27 & 3, 1, "2-level stream tables");
    assert_eq!(idr0 >> 21 & 3, 2, "little-endian tables");
    let idr1 = d.r32(IDR1);
    assert_eq!((idr1 & 0x3f, idr1 >> 6 & 0x1f), (12, 8));
    assert_eq!(d.r32(IDR5), 4 | 1 << 4 | 1 << 6);
    assert_eq!(d.r32(IDR3) >> 10 & 1, 1);
    // 64-bit and 32-bit views agree; page-1 registers alias page 0.
    d.w32(CR0, 0);
    d.w64(EVENTQ_BASE, 0x1234_5678_9ac0 | 3);
    assert_eq!(d.smmu.mmio_read(EVENTQ_BASE, 8), 0x1234_5678_9ac0 | 3);
    assert_eq!(d.r32(EVENTQ_BASE + 4), 0x1234);
    assert_eq!(d.r32(EVENTQ_BASE), 0x5678_9ac3);
    d.w32(CR0, CR0_EVENTQEN);
    d.w64(EVENTQ_BASE, 0x4000);
    assert_eq!(
        d.smmu.mmio_read(EVENTQ_BASE, 8),
        0x1234_5678_9ac0 | 3,
        "ignored while enabled"
    );
    d.w32(EVENTQ_CONS, 5);
    assert_eq!(d.r32(EVENTQ_CONS & !0x10000), 5);
    // Bases are read-only while in use.
    d.w32(CR0, CR0_SMMUEN | CR0_CMDQEN);
    let base = d.smmu.mmio_read(STRTAB_BASE, 8);
    d.w64(STRTAB_BASE, 0x4000);
    assert_eq!(d.smmu.mmio_read(STRTAB_BASE, 8), base);
    let cq = d.smmu.mmio_read(CMDQ_BASE, 8);
    d.w64(CMDQ_BASE, 0x4000);
    assert_eq!(d.smmu.mmio_read(CMDQ_BASE, 8), cq);
    // Unknown offsets, odd sizes and unaligned accesses read zero and are ignored.
    assert_eq!(d.smmu.mmio_read(0x300, 4), 0);
    assert_eq!(d.smmu.mmio_read(CR0, 2), 0);
    assert_eq!(d.smmu.mmio_read(CR0 + 1, 4), 0);
    assert_eq!(d.smmu.mmio_read(REGISTER_WINDOW_SIZE, 4), 0);
    // GERROR is read-only.
    d.w32(GERROR, 0xff);
    assert_eq!(d.r32(GERROR), 0);
}

#[test]
fn invalid_properties_are_refused() {
    let bad = [
        Smmuv3Properties {
            stage1: false,
            stage2: false,
            ..Smmuv3Properties::default()
        },
        Smmuv3Properties {
            gran4k: false,
            gran16k: false,
            gran64k: false,
            ..Smmuv3Properties::default()
        },
        Smmuv3Properties {
            ssid_bits: 21,
            ..Smmuv3Properties::default()
        },
        Smmuv3Properties {
            sid_bits: 0,
            ..Smmuv3Properties::default()
        },
        Smmuv3Properties {
            cmdq_log2: 20,
            ..Smmuv3Properties::default()
        },
        Smmuv3Properties {
            stage1: false,
            ssid_bits: 4,
            ..Smmuv3Properties::default()
        },
    ];
    for p in bad {
        assert!(Smmuv3::new(p.clone()).is_err(), "{p:?}");
    }
}

#[test]
fn stage2_fault_event_carries_ipa_and_class() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 12, 40, 1);
    // Identity-map the stage-1 tables and CD in stage 2 except the page holding the
    // stage-1 root, so the stage-1 walk faults in stage 2 (CLASS = TT).
    let t = d.alloc_cd_table(0);
    let s1 = PageTables::stage1(&d.guest, 12, 16);
    s2.map(
        &d.guest,
        t.base & !0xfff,
        t.base & !0xfff,
        12,
        AF | S2AP_R | S2AP_W,
    );
    d.install_cd(&t, 1, 0, cd_words(&s1, 5, 1));
    let (w2, ttb) = s2_words(&s2, 1, 2, 9);
    let mut ste = ste_s1(t.base, 0, 0, 0, 1);
    ste[0] = ste[0] & !0xe | STE_CFG_NESTED << 1;
    ste[2] = w2;
    ste[3] = ttb;
    d.install_ste(1, ste);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1, None, VA, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FTranslation));
    let ev = d.events();
    assert!(ev[0].stage2);
    assert_eq!(ev[0].class, FaultClass::TranslationTable);
    assert_eq!(ev[0].aux_addr, s1.root);
    assert_eq!(ev[0].input_addr, VA);
}

#[test]
fn cfgi_ste_range_covers_its_aligned_span_only() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    for sid in [4, 7, 8] {
        d.install_ste(sid, [1 | STE_CFG_BYPASS << 1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(d
            .smmu
            .translate_dma(&d.guest.mem, &dma(sid, None, 0, false))
            .is_ok());
        let addr = d.ste_addr(sid);
        d.guest.w64(addr, 0);
    }
    // Range 1: 4 SIDs from 4 & !3 = 4, i.e. 4..=7.
    d.submit(&[[u64::from(opcode::CFGI_STE_RANGE) | 5 << 32, 1]]);
    d.sync();
    for (sid, cached) in [(4, false), (7, false), (8, true)] {
        let r = d
            .smmu
            .translate_dma(&d.guest.mem, &dma(sid, None, 0, false));
        assert_eq!(r.is_ok(), cached, "sid {sid}");
    }
}

#[test]
fn cd_table_formats() {
    // (S1Fmt, S1CDMax, split)
    for (fmt, cd_max, split) in [(0u64, 4u32, 0u32), (1, 8, 6), (2, 12, 10)] {
        let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
        let pt = PageTables::stage1(&d.guest, 12, 16);
        pt.map(&d.guest, VA, PA, 12, AF | AP_EL0 | NG);
        let ssid = (1u32 << cd_max) - 1;
        let cd_addr = if fmt == 0 {
            let base = d.guest.alloc(64 << cd_max, 64 << cd_max);
            d.install_ste(1, ste_s1(base, 0, u64::from(cd_max), 2, 1));
            base + u64::from(ssid) * 64
        } else {
            let l1 = d.guest.alloc(8 << (cd_max - split), 64);
            let leaf = d.guest.alloc(64 << split, 1 << 16);
            d.guest.w64(l1 + u64::from(ssid >> split) * 8, leaf | 1);
            d.install_ste(1, ste_s1(l1, fmt, u64::from(cd_max), 2, 1));
            leaf + u64::from(ssid & ((1 << split) - 1)) * 64
        };
        for (i, w) in cd_words(&pt, 5, 9).iter().enumerate() {
            d.guest.w64(cd_addr + 8 * i as u64, *w);
        }
        let t = d
            .smmu
            .translate_dma(&d.guest.mem, &dma(1, Some(ssid), VA, false))
            .unwrap();
        assert_eq!(t.address, PA, "S1Fmt {fmt}");
        if fmt != 0 {
            // An SSID whose L1 descriptor is invalid.
            let f = d
                .smmu
                .translate_dma(&d.guest.mem, &dma(1, Some(1), VA, false))
                .unwrap_err();
            assert_eq!(f.event, Some(EventType::CBadSubstreamId), "S1Fmt {fmt}");
        }
    }
    // 2-level CD tables without IDR0.CD2L are an illegal STE.
    let props = Smmuv3Properties {
        two_level_cd: false,
        ..Smmuv3Properties::default()
    };
    let mut d = Driver::new(props, StreamTable::Linear);
    d.install_ste(1, ste_s1(0x8000_0000, 2, 12, 2, 1));
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1, Some(3), VA, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadSte));
}

#[test]
fn stream_table_geometry() {
    // Linear: SIDs at or beyond 2^LOG2SIZE are C_BAD_STREAMID.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let f = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(1 << 12, None, 0, false))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadStreamId));
    // 2-level with SPLIT 6 and 10, and a SPAN smaller than SPLIT + 1.
    for split in [6u64, 10] {
        let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
        let l1 = d.guest.alloc(8 << (16 - split), 64);
        d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN);
        d.w64(STRTAB_BASE, l1);
        d.w32(STRTAB_BASE_CFG, (16 | split << 6 | 1 << 16) as u32);
        d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN | CR0_SMMUEN | CR0_ATSCHK);
        let l2 = d.guest.alloc(64 << 2, 64);
        let sid = (3u32 << split) | 2;
        d.guest.w64(l1 + 3 * 8, l2 | 3); // SPAN 3: 4 STEs
        d.guest.w64(l2 + 2 * 64, 1 | STE_CFG_BYPASS << 1);
        assert!(d
            .smmu
            .translate_dma(&d.guest.mem, &dma(sid, None, 0x1000, false))
            .is_ok());
        let f = d
            .smmu
            .translate_dma(&d.guest.mem, &dma(sid + 2, None, 0, false))
            .unwrap_err();
        assert_eq!(
            f.event,
            Some(EventType::CBadStreamId),
            "beyond SPAN, split {split}"
        );
    }
}

#[test]
fn disabling_the_queue_abandons_a_waiting_sync_but_not_the_invalidation() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.submit(&[cmd::atc_inv(1, None, 0, 0)]);
    let slot = d.submit_sync();
    let inv = atc_invalidations(&d.outputs());
    assert!(d.smmu.waiting_for_atc());
    let cr0 = d.r32(CR0);
    d.w32(CR0, cr0 & !CR0_CMDQEN);
    assert!(!d.smmu.waiting_for_atc());
    // Re-enabled, the SYNC runs again and still waits for the device.
    d.w32(CR0, cr0);
    assert!(d.smmu.waiting_for_atc());
    assert_ne!(d.guest.r32(slot), 0);
    d.smmu.ack_atc_invalidation(&d.guest.mem, inv[0].id);
    assert_eq!(d.guest.r32(slot), 0);
    // CR0 bits for features the model lacks do not stick.
    let props = Smmuv3Properties {
        ats: false,
        pri: false,
        ..Smmuv3Properties::default()
    };
    let mut d = Driver::new(props, StreamTable::Linear);
    d.w32(CR0, 0x1f);
    assert_eq!(d.r32(CR0ACK), CR0_SMMUEN | CR0_EVENTQEN | CR0_CMDQEN);
}
