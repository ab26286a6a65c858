//! One test per QEMU SMMUv3 gap listed in the vIOMMU reference (§2.6, §6.7), each showing
//! that vfud's model does what the architecture asks; plus the SMMUv3 ATS response rules
//! (§3.9.1.2/§3.9.1.3 of the architecture) that QEMU never implemented.

use super::events::EventType;
use super::regs::*;
use super::tests_support::*;
use super::*;

const SID: u32 = 0x10;

fn ats(ssid: Option<u32>, address: u64) -> AtsRequest {
    AtsRequest {
        sid: SID,
        ssid,
        address,
        length: 1,
        no_write: false,
        exec: false,
        privileged: false,
    }
}

fn dma(ssid: Option<u32>, address: u64) -> DmaRequest {
    DmaRequest {
        sid: SID,
        ssid,
        address,
        access: Access::default(),
    }
}

/// A PASID stream (20 SSID bits, 2-level CD table) with two address spaces: PASID 1 maps
/// 0x1000 → 0x9000_1000, PASID 0xf_ffff maps 0x1000 → 0x9000_2000 read-only.
fn two_pasids() -> (Driver, PageTables, PageTables) {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::TwoLevel);
    let (t, _) = d.s1_stream(SID, 20);
    let a = PageTables::stage1(&d.guest, 12, 16);
    let b = PageTables::stage1(&d.guest, 12, 16);
    // nG, as Linux io-pgtable and SVA map: otherwise the entries are global and shared by
    // every ASID, which the TLB honours.
    a.map(&d.guest, 0x1000, 0x9000_1000, 12, AF | AP_EL0 | NG);
    b.map(&d.guest, 0x1000, 0x9000_2000, 12, AF | AP_EL0 | AP_RO | NG);
    d.install_cd(&t, SID, 1, cd_words(&a, 5, 11));
    d.install_cd(&t, SID, 0xf_ffff, cd_words(&b, 5, 12));
    (d, a, b)
}

#[test]
fn gap_ats_translation_for_emulated_endpoints() {
    // QEMU: IDR0.ATS = 0 and no ats_request_translation for emulated devices.
    let (mut d, _, _) = two_pasids();
    assert_eq!(d.r32(IDR0) >> 10 & 1, 1);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(Some(1), 0x1000), 1)
        .unwrap();
    assert_eq!((e[0].translated, e[0].r, e[0].w), (0x9000_1000, true, true));
}

#[test]
fn gap_substream_selects_its_own_cd() {
    // QEMU: the CD index is always 0 for emulated devices.
    let (mut d, _, _) = two_pasids();
    let one = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(Some(1), 0x1000))
        .unwrap();
    let max = d
        .smmu
        .translate_dma(&d.guest.mem, &dma(Some(0xf_ffff), 0x1000))
        .unwrap();
    assert_eq!((one.address, max.address), (0x9000_1000, 0x9000_2000));
    // Requests without a PASID use CD 0 (S1DSS = SSID0), which maps nothing here.
    assert!(d
        .smmu
        .translate_dma(&d.guest.mem, &dma(None, 0x1000))
        .is_err());
}

#[test]
fn gap_pasids_are_not_limited_to_8_bits() {
    // QEMU (VT-d): MemTxAttrs.pid is 8 bits. The model takes 20-bit SSIDs.
    let (mut d, _, _) = two_pasids();
    assert_eq!(d.r32(IDR1) >> 6 & 0x1f, 20);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(Some(0xf_ffff), 0x1000), 1)
        .unwrap();
    assert_eq!(e[0].translated, 0x9000_2000);
}

#[test]
fn gap_read_only_page_answers_r1_w0() {
    // QEMU (VT-d second stage): a missing W fails the whole ATS request. Here a read-only page
    // is granted read, at stage 1 and at stage 2.
    let (mut d, _, _) = two_pasids();
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(Some(0xf_ffff), 0x1000), 1)
        .unwrap();
    assert_eq!((e[0].r, e[0].w), (true, false));
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 12, 39, 1);
    let (w2, ttb) = s2_words(&s2, 1, 5, 1);
    d.install_ste(SID, [1 | STE_CFG_S2 << 1, 1 << 28, w2, ttb, 0, 0, 0, 0]);
    s2.map(&d.guest, 0x3000, 0x9000_3000, 12, AF | S2AP_R);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0x3000), 1)
        .unwrap();
    assert_eq!(
        (e[0].translated, e[0].r, e[0].w),
        (0x9000_3000, true, false)
    );
    assert!(d.events().is_empty());
}

#[test]
fn gap_holes_report_their_size() {
    // A non-present 2 MiB / 1 GiB region answers with its size, so the device can skip it.
    let (mut d, a, _) = two_pasids();
    a.map(&d.guest, 0x4000_0000, 0x9000_0000, 12, AF | AP_EL0);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(Some(1), 0x4020_0000), 1)
        .unwrap();
    assert_eq!(
        (e[0].untranslated, e[0].size_log2, e[0].r, e[0].w),
        (0x4020_0000, 21, false, false)
    );
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(Some(1), 0x8000_0000), 1)
        .unwrap();
    assert_eq!((e[0].untranslated, e[0].size_log2), (0x8000_0000, 30));
    // A multi-page request gets consecutive 2 MiB holes.
    let req = AtsRequest {
        length: 0x4000,
        ..ats(Some(1), 0x3f_e000)
    };
    let e = d.smmu.translate_ats(&d.guest.mem, &req, 8).unwrap();
    let got: Vec<_> = e
        .iter()
        .map(|e| (e.untranslated, e.size_log2, e.r))
        .collect();
    assert_eq!(got, vec![(0x20_0000, 21, false), (0x40_0000, 21, false)]);
    assert!(d.events().is_empty());
}

#[test]
fn gap_privileged_and_execute_requests() {
    // QEMU (VT-d) aborts on privileged ATS requests and never checks execute permission.
    let (mut d, a, _) = two_pasids();
    a.map(&d.guest, 0x5000, 0x9000_5000, 12, AF | AP_RO | UXN); // privileged-only, RO, X
    let req = AtsRequest {
        privileged: true,
        exec: true,
        ..ats(Some(1), 0x5000)
    };
    let e = d.smmu.translate_ats(&d.guest.mem, &req, 1).unwrap();
    assert_eq!(
        (e[0].r, e[0].w, e[0].x, e[0].privileged),
        (true, false, true, true)
    );
    let req = AtsRequest {
        privileged: false,
        exec: true,
        ..req
    };
    let e = d.smmu.translate_ats(&d.guest.mem, &req, 1).unwrap();
    assert_eq!(
        (e[0].r, e[0].w, e[0].x, e[0].privileged),
        (false, false, false, false)
    );
    // Without a PASID, Priv and Exe are not part of the request.
    let req = AtsRequest {
        ssid: None,
        privileged: true,
        exec: true,
        ..ats(None, 0x5000)
    };
    let e = d.smmu.translate_ats(&d.guest.mem, &req, 1).unwrap();
    assert!(!e[0].privileged && !e[0].x);
}

#[test]
fn gap_pri_queue_and_pri_resp() {
    // QEMU: "PRI not yet supported", PRI_RESP ignored.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    assert_eq!(d.r32(IDR0) >> 16 & 1, 1);
    let pr = PageRequest {
        sid: SID,
        ssid: Some(3),
        address: 0x7000,
        prgi: 5,
        last: true,
        read: true,
        write: false,
        exec: false,
        privileged: false,
    };
    d.smmu.page_request(&d.guest.mem, &pr).unwrap();
    assert_eq!(d.guest.r64(d.priq) & 0xffff_ffff, u64::from(SID));
    d.outputs();
    d.submit(&[cmd::pri_resp(SID, 3, 5, 0)]);
    assert_eq!(
        d.outputs(),
        vec![Smmuv3Output::PriResponse(PriResponse {
            sid: SID,
            ssid: Some(3),
            prgi: 5,
            code: PriResponseCode::Deny
        })]
    );
}

#[test]
fn gap_cmd_sync_msi_write() {
    // QEMU: CMD_SYNC only pulses a wired IRQ; IDR0.MSI = 0. Linux MSIPOLL needs the write.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    assert_eq!(d.r32(IDR0) >> 13 & 1, 1);
    let slot = d.submit_sync();
    assert_eq!(d.guest.r32(slot), 0);
}

#[test]
fn gap_bad_ats_treq_is_an_event() {
    // QEMU asserts on F_BAD_ATS_TREQ. Here: UR plus the event.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let t = d.alloc_cd_table(0);
    let pt = PageTables::stage1(&d.guest, 12, 16);
    d.install_cd(&t, SID, 0, cd_words(&pt, 5, 1));
    d.install_ste(SID, ste_s1(t.base, 0, 0, 0, 0));
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0), 1)
        .unwrap_err();
    assert_eq!(
        e,
        AtsError::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq)
        }
    );
    assert_eq!(d.events()[0].kind, EventType::FBadAtsTreq);
}

#[test]
fn gap_translated_requests_checked_against_eats() {
    // QEMU (VT-d): no check that the requester may use translated requests.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.install_ste(SID, [1 | STE_CFG_BYPASS << 1, 0, 0, 0, 0, 0, 0, 0]);
    let f = d
        .smmu
        .translated_dma(&d.guest.mem, &dma(None, 0x9000_0000))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FTranslForbidden));
    let t = d.alloc_cd_table(0);
    let pt = PageTables::stage1(&d.guest, 12, 16);
    d.install_cd(&t, SID, 0, cd_words(&pt, 5, 1));
    d.install_ste(SID, ste_s1(t.base, 0, 0, 0, 0));
    let f = d
        .smmu
        .translated_dma(&d.guest.mem, &dma(None, 0x9000_0000))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FTranslForbidden));
    d.install_ste(SID, ste_s1(t.base, 0, 0, 0, 1));
    assert!(d
        .smmu
        .translated_dma(&d.guest.mem, &dma(None, 0x9000_0000))
        .is_ok());
    // A translated address beyond the OAS is aborted without an event.
    let f = d
        .smmu
        .translated_dma(&d.guest.mem, &dma(None, 1 << 48))
        .unwrap_err();
    assert_eq!(
        f,
        DmaFault {
            event: None,
            raz_wi: false
        }
    );
    // SMMUEN = 0: translated traffic is forbidden (GBPA does not apply).
    d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN);
    let f = d
        .smmu
        .translated_dma(&d.guest.mem, &dma(None, 0x9000_0000))
        .unwrap_err();
    assert_eq!(f.event, Some(EventType::FTranslForbidden));
}

#[test]
fn gap_atc_inv_without_ssv_reaches_every_pasid() {
    // QEMU (VT-d type 3): a non-PASID invalidation only reaches the no-PASID ATC space. An
    // ATS Invalidate without PASID hits every entry in the range; the output says "all".
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.submit(&[cmd::atc_inv(SID, None, 0x4000, 2)]);
    let out = d.outputs();
    let Smmuv3Output::AtcInvalidate(a) = out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (a.sid, a.ssid, a.global, a.start, a.size_log2),
        (SID, None, false, 0x4000, 14)
    );
}

#[test]
fn gap_sync_waits_for_device_acknowledgement() {
    // QEMU's notifications are synchronous; there is no ATC_INV_SYNC error. Here the SYNC
    // completes only after the acknowledgement, and a timeout is CERROR_ATC_INV_SYNC.
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.submit(&[cmd::atc_inv(SID, Some(1), 0, 0)]);
    let slot = d.submit_sync();
    assert_ne!(d.guest.r32(slot), 0);
    let id = match d.outputs()[0] {
        Smmuv3Output::AtcInvalidate(a) => a.id,
        ref o => panic!("{o:?}"),
    };
    d.smmu.ack_atc_invalidation(&d.guest.mem, id);
    assert_eq!(d.guest.r32(slot), 0);
    d.submit(&[cmd::atc_inv(SID, Some(1), 0, 0)]);
    d.submit_sync();
    assert!(d.smmu.atc_invalidation_timeout());
    assert_eq!(d.cons() >> CMDQ_CONS_ERR_SHIFT, CERROR_ATC_INV_SYNC);
}

#[test]
fn gap_cfgi_all_is_ste_range_31() {
    // QEMU's enum puts a "CFGI_ALL" at 0x07; architecturally it is CFGI_STE_RANGE, Range 31.
    let (mut d, _, _) = two_pasids();
    let req = dma(Some(1), 0x1000);
    d.smmu.translate_dma(&d.guest.mem, &req).unwrap();
    let addr = d.ste_addr(SID);
    d.guest.w64(addr, 0);
    d.submit(&[cmd::cfgi_all()]);
    d.sync();
    assert_eq!(
        d.smmu.translate_dma(&d.guest.mem, &req).unwrap_err().event,
        Some(EventType::CBadSte)
    );
    d.submit(&[[0x07, 0]]);
    assert_eq!(d.cons() >> CMDQ_CONS_ERR_SHIFT, CERROR_ILL);
}

// ---- SMMUv3 ATS response rules ------------------------------------------------------------

#[test]
fn ats_on_a_bypass_ste_is_rejected_but_s1dss_bypass_is_identity() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.install_ste(SID, [1 | STE_CFG_BYPASS << 1, 1 << 28, 0, 0, 0, 0, 0, 0]);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0x1234_5000), 1)
        .unwrap_err();
    assert_eq!(
        e,
        AtsError::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq)
        }
    );
    // Stage-1 STE whose S1DSS skips stage 1 for non-PASID traffic: identity, R = W = 1.
    let t = d.alloc_cd_table(2);
    let pt = PageTables::stage1(&d.guest, 12, 16);
    d.install_cd(&t, SID, 1, cd_words(&pt, 5, 1));
    d.install_ste(SID, ste_s1(t.base, 0, 2, 1, 1));
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0x1234_5000), 1)
        .unwrap();
    assert_eq!(
        (e[0].translated, e[0].r, e[0].w),
        (0x1234_5000 & !((1 << 30) - 1), true, true)
    );
    assert_eq!(e[0].untranslated, e[0].translated);
    // Abort STE: UR without an event.
    d.install_ste(SID, [1, 0, 0, 0, 0, 0, 0, 0]);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0), 1)
        .unwrap_err();
    assert_eq!(e, AtsError::UnsupportedRequest { event: None });
}

#[test]
fn ats_configuration_errors_are_completer_abort() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.ste_addr(SID);
    // Without CR2.REC_CFG_ATS: CA, no event.
    assert_eq!(
        d.smmu.translate_ats(&d.guest.mem, &ats(None, 0), 1),
        Err(AtsError::CompleterAbort)
    );
    assert!(d.events().is_empty());
    // With it (SMMUEN must be 0 to write CR2): CA and C_BAD_STE.
    d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN);
    d.w32(CR2, CR2_RECINVSID | CR2_REC_CFG_ATS);
    d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN | CR0_SMMUEN);
    assert_eq!(
        d.smmu.translate_ats(&d.guest.mem, &ats(None, 0), 1),
        Err(AtsError::CompleterAbort)
    );
    assert_eq!(d.events()[0].kind, EventType::CBadSte);
    // CR2 is read-only while SMMUEN = 1.
    d.w32(CR2, 0);
    assert_eq!(d.r32(CR2), CR2_RECINVSID | CR2_REC_CFG_ATS);
}

#[test]
fn split_stage_ats_needs_atschk() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 12, 39, 1);
    let t = d.alloc_cd_table(0);
    let s1 = PageTables::stage1(&d.guest, 12, 25);
    s2.map(&d.guest, RAM_BASE, RAM_BASE, 30, AF | S2AP_R | S2AP_W);
    d.install_cd(&t, SID, 0, cd_words(&s1, 5, 1));
    let (w2, ttb) = s2_words(&s2, 1, 5, 2);
    let mut ste = ste_s1(t.base, 0, 0, 0, 2);
    ste[0] = ste[0] & !0xe | STE_CFG_NESTED << 1;
    ste[2] = w2;
    ste[3] = ttb;
    d.install_ste(SID, ste);
    s1.map(&d.guest, 0x1000, 0x4000_0000, 12, AF | AP_EL0);
    assert!(d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0x1000), 1)
        .is_ok());
    d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN | CR0_SMMUEN);
    let e = d
        .smmu
        .translate_ats(&d.guest.mem, &ats(None, 0x1000), 1)
        .unwrap_err();
    assert_eq!(
        e,
        AtsError::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq)
        }
    );
}

#[test]
fn bad_stream_id_is_recorded_only_with_recinvsid() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN);
    d.w32(CR2, 0);
    d.w32(CR0, CR0_EVENTQEN | CR0_CMDQEN | CR0_SMMUEN);
    let big = DmaRequest {
        sid: 1 << 20,
        ..dma(None, 0)
    };
    assert_eq!(
        d.smmu.translate_dma(&d.guest.mem, &big).unwrap_err().event,
        None
    );
    assert!(d.events().is_empty());
    // The Linux driver sets RECINVSID (as the test driver does by default).
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let f = d.smmu.translate_dma(&d.guest.mem, &big).unwrap_err();
    assert_eq!(f.event, Some(EventType::CBadStreamId));
}
