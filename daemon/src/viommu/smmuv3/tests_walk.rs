//! Table-driven walk tests: every granule and start level, blocks, permissions, access flag,
//! address-size and input-range faults, stage 2 with concatenation, nested.

use super::events::EventType;
use super::tests_support::*;
use super::*;

const SID: u32 = 1;

fn access(write: bool, exec: bool, privileged: bool) -> Access {
    Access {
        write,
        exec,
        privileged,
    }
}

fn dma_at(d: &mut Driver, address: u64, a: Access) -> Result<DmaTranslation, DmaFault> {
    d.smmu.translate_dma(
        &d.guest.mem,
        &DmaRequest {
            sid: SID,
            ssid: d.pasid,
            address,
            access: a,
        },
    )
}

fn ats_at(d: &mut Driver, address: u64, exec: bool, privileged: bool) -> Vec<AtsTranslation> {
    let req = AtsRequest {
        sid: SID,
        ssid: d.pasid,
        address,
        length: 1,
        no_write: false,
        exec,
        privileged,
    };
    d.smmu.translate_ats(&d.guest.mem, &req, 4).unwrap()
}

/// A stage-1-only stream whose SSIDs 0 and 1 share one CD built from `pt` (after `tweak`
/// edits the CD words); the tests send PASID 1 so that privilege and execute count.
fn s1_env(
    props: Smmuv3Properties,
    granule_log2: u32,
    tsz: u32,
    tweak: impl Fn(&mut [u64; 8]),
) -> (Driver, PageTables) {
    let mut d = Driver::new(props, StreamTable::Linear);
    let t = d.alloc_cd_table(1);
    let pt = PageTables::stage1(&d.guest, granule_log2, tsz);
    let mut cd = cd_words(&pt, 5, 1);
    tweak(&mut cd);
    d.install_cd(&t, SID, 0, cd);
    d.install_cd(&t, SID, 1, cd);
    d.install_ste(SID, ste_s1(t.base, 0, 1, 2, 1));
    d.pasid = Some(1);
    (d, pt)
}

/// (granule, T0SZ, start level the architecture derives).
const S1_LAYOUTS: [(u32, u32, u32); 11] = [
    (12, 16, 0),
    (12, 25, 1),
    (12, 34, 2),
    (12, 43, 3),
    (14, 16, 0),
    (14, 17, 1),
    (14, 28, 2),
    (14, 39, 3),
    (16, 16, 1),
    (16, 22, 2),
    (16, 35, 3),
];

#[test]
fn stage1_every_granule_and_start_level() {
    for (g, tsz, start) in S1_LAYOUTS {
        let (mut d, pt) = s1_env(Smmuv3Properties::default(), g, tsz, |_| {});
        assert_eq!(pt.start_level, start, "builder layout {g}/{tsz}");
        let input = 64 - tsz;
        let va = 1u64 << (input - 1) | 3 << g;
        let pa = 0x9000_0000 + (5 << g);
        pt.map(&d.guest, va, pa, g, AF | AP_EL0);
        let name = format!("granule 2^{g} T0SZ {tsz}");
        let t = dma_at(&mut d, va + 0x18, access(true, false, false)).unwrap();
        assert_eq!(t.address, pa + 0x18, "{name}");
        assert_eq!(t.contiguous, (1 << g) - 0x18, "{name}");
        let e = ats_at(&mut d, va, false, false);
        assert_eq!(
            (e[0].untranslated, e[0].size_log2, e[0].translated),
            (va, g as u8, pa),
            "{name}"
        );
        // An unmapped start-level slot: the hole is that level's block size, proving the
        // model walked from the same start level.
        let hole = ats_at(&mut d, 0, false, false);
        assert_eq!(hole[0].size_log2 as u32, pt.shift(start), "{name}");
        assert!(!hole[0].r && !hole[0].w);
        // Beyond the input range: translation fault.
        if input < 48 {
            let f = dma_at(&mut d, 1 << input, access(false, false, false)).unwrap_err();
            assert_eq!(f.event, Some(EventType::FTranslation), "{name}");
        }
        assert!(d.events().iter().all(|e| e.kind == EventType::FTranslation));
    }
}

#[test]
fn stage1_block_mappings() {
    // (granule, T0SZ, block size log2)
    for (g, tsz, size) in [
        (12, 16, 30),
        (12, 25, 21),
        (14, 16, 25),
        (16, 16, 29),
        (16, 22, 29),
    ] {
        let (mut d, pt) = s1_env(Smmuv3Properties::default(), g, tsz, |_| {});
        let va = 3u64 << size;
        let pa = 1u64 << 36 | 5 << size;
        pt.map(&d.guest, va, pa, size, AF | AP_EL0);
        let off = (1 << size) - 8;
        let t = dma_at(&mut d, va + off, access(false, false, false)).unwrap();
        assert_eq!(
            t,
            DmaTranslation {
                address: pa + off,
                contiguous: 8
            },
            "block 2^{size} / {g}"
        );
        let e = ats_at(&mut d, va + 0x5000, false, false);
        assert_eq!(
            (e[0].untranslated, e[0].size_log2, e[0].translated),
            (va, size as u8, pa)
        );
    }
}

#[test]
fn illegal_block_and_page_descriptors_are_translation_faults() {
    // (granule, T0SZ, level, descriptor type bits)
    let cases = [
        (12, 16, 0, 1), // no level-0 blocks with 4K
        (14, 16, 1, 1), // no level-1 blocks with 16K (48-bit OA)
        (16, 16, 1, 1), // no level-1 blocks with 64K (48-bit OA)
        (12, 16, 3, 1), // 0b01 at level 3 is reserved
        (12, 16, 2, 2), // valid bit clear
    ];
    for (g, tsz, level, kind) in cases {
        let (mut d, pt) = s1_env(Smmuv3Properties::default(), g, tsz, |_| {});
        let va = 0x4000_0000u64;
        pt.set_raw(
            &d.guest,
            va,
            level,
            0x9000_0000 & !((1u64 << pt.shift(level)) - 1) | AF | kind,
        );
        let f = dma_at(&mut d, va, access(false, false, true)).unwrap_err();
        assert_eq!(f.event, Some(EventType::FTranslation), "{g}/{level}/{kind}");
        let e = ats_at(&mut d, va, false, true);
        assert!(!e[0].r, "{g}/{level}/{kind}");
        assert_eq!(e[0].size_log2 as u32, pt.shift(level));
    }
}

/// Expected (read, write, exec) for unprivileged and privileged requests.
type Rwx = (bool, bool, bool);

#[test]
fn stage1_permission_combinations() {
    const T: bool = true;
    const F: bool = false;
    // (name, leaf attrs, table attrs, unprivileged rwx, privileged rwx)
    let cases: [(&str, u64, u64, Rwx, Rwx); 12] = [
        ("EL0 RW", AP_EL0, 0, (T, T, T), (T, T, F)),
        ("EL0 RO", AP_EL0 | AP_RO, 0, (T, F, T), (T, F, T)),
        ("EL1 RW", 0, 0, (F, F, F), (T, T, T)),
        ("EL1 RO", AP_RO, 0, (F, F, F), (T, F, T)),
        ("EL0 RO UXN", AP_EL0 | AP_RO | UXN, 0, (T, F, F), (T, F, T)),
        ("EL0 RO PXN", AP_EL0 | AP_RO | PXN, 0, (T, F, T), (T, F, F)),
        ("EL1 RW PXN", PXN, 0, (F, F, F), (T, T, F)),
        // EL0-writable means writable at EL0 after APTable: then privileged execute is allowed.
        ("APTable RO", AP_EL0, AP_TABLE_RO, (T, F, T), (T, F, T)),
        (
            "APTable no EL0",
            AP_EL0,
            AP_TABLE_NO_EL0,
            (F, F, F),
            (T, T, T),
        ),
        ("UXNTable", AP_EL0 | AP_RO, UXN_TABLE, (T, F, F), (T, F, T)),
        ("PXNTable", AP_RO, PXN_TABLE, (F, F, F), (T, F, F)),
        ("EL0 RW UXN", AP_EL0 | UXN, 0, (T, T, F), (T, T, F)),
    ];
    for (name, leaf, table, user, privileged) in cases {
        let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |_| {});
        let va = 0x2000_0000u64;
        pt.map_with(&d.guest, va, 0x9000_0000, 12, AF | leaf, table);
        for (priv_, (r, w, x)) in [(false, user), (true, privileged)] {
            for (write, exec, want) in [(false, false, r), (true, false, w), (false, true, x && r)]
            {
                let got = dma_at(&mut d, va, access(write, exec, priv_));
                assert_eq!(
                    got.is_ok(),
                    want,
                    "{name} priv {priv_} write {write} exec {exec}"
                );
                if let Err(f) = got {
                    assert_eq!(f.event, Some(EventType::FPermission), "{name}");
                }
            }
            let e = ats_at(&mut d, va, true, priv_);
            assert_eq!(
                (e[0].r, e[0].w, e[0].x),
                (r, w, x && r),
                "{name} ATS priv {priv_}"
            );
            assert_eq!(e[0].privileged, priv_);
        }
        let ev = d.events();
        assert!(
            ev.iter()
                .all(|e| e.kind == EventType::FPermission && !e.stage2),
            "{name}"
        );
    }
}

#[test]
fn wxn_makes_writable_memory_non_executable() {
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |cd| cd[0] |= 1 << 36);
    pt.map(&d.guest, 0x1000, 0x9000_0000, 12, AF);
    pt.map(&d.guest, 0x2000, 0x9000_1000, 12, AF | AP_RO);
    assert!(dma_at(&mut d, 0x1000, access(false, true, true)).is_err());
    assert!(dma_at(&mut d, 0x2000, access(false, true, true)).is_ok());
}

#[test]
fn access_flag_policy() {
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |_| {});
    pt.map(&d.guest, 0x1000, 0x9000_0000, 12, AP_EL0);
    let f = dma_at(&mut d, 0x1000, access(false, false, false)).unwrap_err();
    assert_eq!(f.event, Some(EventType::FAccess));
    // ATS: a hole, not an event.
    assert!(!ats_at(&mut d, 0x1000, false, false)[0].r);
    assert_eq!(d.events().len(), 1);
    // CD.AFFD disables access-flag faults.
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |cd| cd[0] |= 1 << 35);
    pt.map(&d.guest, 0x1000, 0x9000_0000, 12, AP_EL0);
    assert!(dma_at(&mut d, 0x1000, access(false, false, false)).is_ok());
}

#[test]
fn unrecorded_and_raz_wi_faults() {
    // CD.R = 0: no event; CD.A = 0: RAZ/WI instead of abort.
    let (mut d, _) = s1_env(Smmuv3Properties::default(), 12, 25, |cd| {
        cd[0] &= !(1 << 45 | 1 << 46)
    });
    let f = dma_at(&mut d, 0x1000, access(false, false, false)).unwrap_err();
    assert_eq!(
        f,
        DmaFault {
            event: None,
            raz_wi: true
        }
    );
    assert!(d.events().is_empty());
}

#[test]
fn address_size_faults() {
    // IPS = 32 bits: an output address at 4 GiB is an address-size fault.
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |cd| {
        cd[0] &= !(7 << 32)
    });
    pt.map(&d.guest, 0x1000, 0x1_0000_0000, 12, AF | AP_EL0);
    pt.map(&d.guest, 0x2000, 0xffff_f000, 12, AF | AP_EL0);
    assert_eq!(
        dma_at(&mut d, 0x1000, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FAddrSize)
    );
    assert!(dma_at(&mut d, 0x2000, access(false, false, false)).is_ok());
    let e = ats_at(&mut d, 0x1000, false, false);
    assert!(!e[0].r && !e[0].w, "ATS: hole without an event");
    assert_eq!(d.events().len(), 1);
    // A table descriptor beyond IPS.
    pt.set_raw(&d.guest, 0x4000_0000, 2, 0x1_0000_0000 | 3);
    let f = dma_at(&mut d, 0x4000_0000, access(false, false, false)).unwrap_err();
    assert_eq!(f.event, Some(EventType::FAddrSize));
    // TTB0 beyond IPS.
    let (mut d, _) = s1_env(Smmuv3Properties::default(), 12, 25, |cd| {
        cd[0] &= !(7 << 32);
        cd[1] = 0x1_0000_0000;
    });
    assert_eq!(
        dma_at(&mut d, 0, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FAddrSize)
    );
    // CD.IPS above the model's OAS is limited to OAS.
    let props = Smmuv3Properties {
        oas: Oas::Bits40,
        ..Smmuv3Properties::default()
    };
    let (mut d, pt) = s1_env(props, 12, 25, |_| {});
    pt.map(&d.guest, 0x1000, 1 << 41, 12, AF | AP_EL0);
    pt.map(&d.guest, 0x2000, 1 << 39, 12, AF | AP_EL0);
    assert_eq!(
        dma_at(&mut d, 0x1000, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FAddrSize)
    );
    assert!(dma_at(&mut d, 0x2000, access(false, false, false)).is_ok());
    // Descriptor address bits [51:48] with a 48-bit output size.
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |_| {});
    pt.map(&d.guest, 0x1000, 1 << 48, 12, AF | AP_EL0);
    assert_eq!(
        dma_at(&mut d, 0x1000, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FAddrSize)
    );
}

#[test]
fn input_range_ttb1_and_tbi() {
    // TTB1 enabled (T1SZ = 16, TG1 = 4K), EPD1 clear.
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 16, |_| {});
    let hi_pt = PageTables::stage1(&d.guest, 12, 16);
    let va_hi = 0xffff_8000_0000_3000u64;
    hi_pt.map(&d.guest, va_hi, 0x9000_0000, 12, AF | AP_EL0);
    pt.map(&d.guest, 0x3000, 0x9100_0000, 12, AF | AP_EL0);
    // With EPD1 (Linux's layout) the upper half faults.
    assert_eq!(
        dma_at(&mut d, va_hi, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FTranslation)
    );
    // Non-canonical addresses fault.
    assert_eq!(
        dma_at(&mut d, 0x0100_0000_0000_3000, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FTranslation)
    );
    // A CD with TTB1 enabled and TBI0.
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 16, |_| {});
    let hi_pt = PageTables::stage1(&d.guest, 12, 16);
    hi_pt.map(&d.guest, va_hi, 0x9000_0000, 12, AF | AP_EL0);
    pt.map(&d.guest, 0x3000, 0x9100_0000, 12, AF | AP_EL0);
    let t = d.alloc_cd_table(0);
    let mut cd = cd_words(&pt, 5, 1);
    cd[0] = cd[0] & !(1 << 30) | 16 << 16 | 2 << 22 | 1 << 38;
    cd[2] = hi_pt.root;
    d.install_cd(&t, SID, 0, cd);
    d.install_ste(SID, ste_s1(t.base, 0, 0, 0, 1));
    d.pasid = None;
    assert_eq!(
        dma_at(&mut d, va_hi + 4, access(false, false, false))
            .unwrap()
            .address,
        0x9000_0004
    );
    assert_eq!(
        dma_at(&mut d, 0xab00_0000_0000_3008, access(false, false, false))
            .unwrap()
            .address,
        0x9100_0008
    );
    // TBI1 is clear: a tagged upper address faults.
    assert!(dma_at(&mut d, 0x12ff_8000_0000_3000, access(false, false, false)).is_err());
}

#[test]
fn table_walk_abort_is_f_walk_eabt() {
    let (mut d, pt) = s1_env(Smmuv3Properties::default(), 12, 25, |_| {});
    pt.set_raw(&d.guest, 0x4000_0000, 1, 0x10_0000_0000 | 3);
    let f = dma_at(&mut d, 0x4000_0000, access(false, false, false)).unwrap_err();
    assert_eq!(f.event, Some(EventType::FWalkEabt));
    assert_eq!(d.events()[0].aux_addr, 0x10_0000_0000);
    let req = AtsRequest {
        sid: SID,
        ssid: None,
        address: 0x4000_0000,
        length: 1,
        no_write: true,
        exec: false,
        privileged: false,
    };
    assert_eq!(
        d.smmu.translate_ats(&d.guest.mem, &req, 1),
        Err(AtsError::CompleterAbort)
    );
}

/// A stage-2-only stream for `s2` with SL0 `sl0` and `eats`.
fn s2_env(d: &mut Driver, s2: &PageTables, sl0: u64, eats: u64) {
    let (w2, ttb) = s2_words(s2, sl0, 5, 4);
    d.install_ste(SID, [1 | STE_CFG_S2 << 1, eats << 28, w2, ttb, 0, 0, 0, 0]);
}

#[test]
fn stage2_every_granule_start_level_and_concatenation() {
    // (granule, T0SZ, start level, valid)
    let cases = [
        (12, 16, 0, true),
        (12, 25, 1, true),
        (12, 24, 1, true), // 2 concatenated level-1 tables
        (12, 39, 2, true),
        (12, 32, 2, true),  // 4 concatenated level-2 tables
        (12, 16, 1, false), // would need 512 concatenated tables
        (12, 43, 2, false), // start level resolves no bit
        (14, 16, 1, true),  // 2 concatenated level-1 tables
        (14, 17, 1, true),
        (14, 28, 2, true),
        (14, 39, 3, true),
        (16, 22, 2, true),
        (16, 20, 2, true), // 4 concatenated level-2 tables
        (16, 35, 3, true),
        (16, 16, 2, false),
    ];
    for (g, tsz, start, valid) in cases {
        let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
        let input = 64 - tsz;
        let s2 = if valid {
            PageTables::new(&d.guest, g, input, start)
        } else {
            PageTables {
                granule_log2: g,
                input_bits: input,
                start_level: start,
                root: d.guest.alloc(4096, 4096),
            }
        };
        s2_env(&mut d, &s2, sl0_for(g, start), 1);
        let name = format!("S2 granule 2^{g} T0SZ {tsz} level {start}");
        let ipa = 1u64 << (input - 1) | 7 << g;
        if !valid {
            let f = dma_at(&mut d, ipa, access(false, false, false)).unwrap_err();
            assert_eq!(f.event, Some(EventType::CBadSte), "{name}");
            continue;
        }
        s2.map(
            &d.guest,
            ipa,
            0x9000_0000 + (1 << g),
            g,
            AF | S2AP_R | S2AP_W,
        );
        assert_eq!(
            dma_at(&mut d, ipa + 4, access(true, false, false))
                .unwrap()
                .address,
            0x9000_0004 + (1 << g),
            "{name}"
        );
        let e = ats_at(&mut d, ipa, false, false);
        assert_eq!(
            (e[0].size_log2 as u32, e[0].r, e[0].w),
            (g, true, true),
            "{name}"
        );
        let hole = ats_at(&mut d, 0, false, false);
        assert_eq!(hole[0].size_log2 as u32, s2.shift(start), "{name}");
    }
}

#[test]
fn stage2_bad_configurations() {
    let mut bad = Vec::new();
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 12, 39, 1);
    let (w2, ttb) = s2_words(&s2, 1, 5, 4);
    bad.push(("S2AA64 clear", w2 & !(1 << 51)));
    bad.push(("S2ENDI set", w2 | 1 << 52));
    bad.push(("S2TG reserved", w2 | 3 << 46));
    bad.push(("SL0 reserved for 4K", w2 | 3 << 38));
    bad.push(("S2T0SZ too small", w2 & !(0x3f << 32) | 8 << 32));
    for (name, w2) in bad {
        d.install_ste(SID, [1 | STE_CFG_S2 << 1, 0, w2, ttb, 0, 0, 0, 0]);
        let f = dma_at(&mut d, 0, access(false, false, false)).unwrap_err();
        assert_eq!(f.event, Some(EventType::CBadSte), "{name}");
    }
    // Stage 2 on a model without stage 2; 16K tables on a model without the 16K granule.
    let props = Smmuv3Properties {
        stage2: false,
        ..Smmuv3Properties::default()
    };
    let mut d = Driver::new(props, StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 12, 39, 1);
    s2_env(&mut d, &s2, 1, 0);
    assert_eq!(
        dma_at(&mut d, 0, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::CBadSte)
    );
    let props = Smmuv3Properties {
        gran16k: false,
        ..Smmuv3Properties::default()
    };
    let (mut d, _) = s1_env(props, 14, 28, |_| {});
    assert_eq!(
        dma_at(&mut d, 0, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::CBadCd)
    );
}

#[test]
fn stage2_permission_combinations() {
    // (S2AP/XN attrs, read, write)
    let cases: [(u64, bool, bool); 6] = [
        (0, false, false),
        (S2AP_R, true, false),
        (S2AP_W, false, true),
        (S2AP_R | S2AP_W, true, true),
        (S2AP_R | S2_XN, true, false),
        (S2AP_R | S2AP_W | S2_XN, true, true),
    ];
    for (attrs, r, w) in cases {
        let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
        let s2 = PageTables::new(&d.guest, 12, 39, 1);
        s2_env(&mut d, &s2, 1, 1);
        s2.map(&d.guest, 0x5000, 0x9000_0000, 12, AF | attrs);
        // A stage-2-only stream takes no PASID: every request is unprivileged data, so an
        // execute request is checked as a read and ATS never grants Exe.
        for privileged in [false, true] {
            let ok = |d: &mut Driver, write, exec| {
                dma_at(d, 0x5000, access(write, exec, privileged)).is_ok()
            };
            assert_eq!(ok(&mut d, false, false), r, "{attrs:#x}");
            assert_eq!(ok(&mut d, true, false), w, "{attrs:#x}");
            assert_eq!(ok(&mut d, false, true), r, "{attrs:#x}");
            let e = ats_at(&mut d, 0x5000, true, privileged);
            assert_eq!(
                (e[0].r, e[0].w, e[0].x, e[0].privileged),
                (r, w, false, false)
            );
        }
        for ev in d.events() {
            assert_eq!(ev.kind, EventType::FPermission);
            assert!(ev.stage2);
            assert_eq!(ev.aux_addr, 0x5000, "the IPA");
        }
    }
}

#[test]
fn stage2_execute_never_applies_to_pasid_requests() {
    let (mut d, s1, s2) = nested_env(1);
    s2.map(&d.guest, 0x4001_0000, 0xa001_0000, 16, AF | S2AP_R | S2_XN);
    s1.map(&d.guest, 0x8000, 0x4001_0000, 12, AF | AP_EL0 | AP_RO);
    assert!(dma_at(&mut d, 0x8000, access(false, false, false)).is_ok());
    let f = dma_at(&mut d, 0x8000, access(false, true, false)).unwrap_err();
    assert_eq!(f.event, Some(EventType::FPermission));
    assert!(d.events()[0].stage2);
    let e = ats_at(&mut d, 0x8000, true, false);
    assert_eq!((e[0].r, e[0].w, e[0].x), (true, false, false));
    // Without XN the same request is executable.
    s1.map(&d.guest, 0x9000, 0x4000_3000, 12, AF | AP_EL0 | AP_RO);
    let e = ats_at(&mut d, 0x9000, true, false);
    assert_eq!((e[0].r, e[0].w, e[0].x), (true, false, true));
}

#[test]
fn stage2_access_flag_and_output_size() {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 12, 39, 1);
    let (w2, ttb) = s2_words(&s2, 1, 0, 4); // S2PS = 32 bits
    d.install_ste(SID, [1 | STE_CFG_S2 << 1, 1 << 28, w2, ttb, 0, 0, 0, 0]);
    s2.map(&d.guest, 0x1000, 0x9000_0000, 12, S2AP_R);
    s2.map(&d.guest, 0x2000, 0x1_0000_0000, 12, AF | S2AP_R);
    assert_eq!(
        dma_at(&mut d, 0x1000, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FAccess)
    );
    assert_eq!(
        dma_at(&mut d, 0x2000, access(false, false, false))
            .unwrap_err()
            .event,
        Some(EventType::FAddrSize)
    );
    assert!(d.events().iter().all(|e| e.stage2));
    // S2AFFD.
    d.install_ste(
        SID,
        [1 | STE_CFG_S2 << 1, 1 << 28, w2 | 1 << 53, ttb, 0, 0, 0, 0],
    );
    assert!(dma_at(&mut d, 0x1000, access(false, false, false)).is_ok());
    // S2R clear: faults are not recorded.
    d.install_ste(
        SID,
        [
            1 | STE_CFG_S2 << 1,
            1 << 28,
            w2 & !(1 << 58),
            ttb,
            0,
            0,
            0,
            0,
        ],
    );
    assert_eq!(
        dma_at(&mut d, 0x3000, access(false, false, false))
            .unwrap_err()
            .event,
        None
    );
}

/// Nested: stage 1 (4K, 39-bit) over stage 2 (64K, 40-bit) identity-mapping guest RAM.
fn nested_env(eats: u64) -> (Driver, PageTables, PageTables) {
    let mut d = Driver::new(Smmuv3Properties::default(), StreamTable::Linear);
    let s2 = PageTables::new(&d.guest, 16, 40, 2);
    // IPA → PA: guest RAM identity at 512 MiB blocks; IPA 0x4000_0000 → PA 0xa000_0000.
    s2.map(&d.guest, RAM_BASE, RAM_BASE, 29, AF | S2AP_R | S2AP_W);
    s2.map(&d.guest, 0x4000_0000, 0xa000_0000, 16, AF | S2AP_R);
    let t = d.alloc_cd_table(1);
    let s1 = PageTables::stage1(&d.guest, 12, 25);
    d.install_cd(&t, SID, 0, cd_words(&s1, 5, 3));
    d.install_cd(&t, SID, 1, cd_words(&s1, 5, 3));
    d.pasid = Some(1);
    let (w2, ttb) = s2_words(&s2, 1, 2, 6);
    let mut ste = ste_s1(t.base, 0, 1, 2, eats);
    ste[0] = ste[0] & !0xe | STE_CFG_NESTED << 1;
    ste[2] = w2;
    ste[3] = ttb;
    d.install_ste(SID, ste);
    (d, s1, s2)
}

#[test]
fn nested_translation_and_split_stage_ats() {
    let (mut d, s1, _) = nested_env(1);
    s1.map(&d.guest, 0x7000, 0x4000_3000, 12, AF | AP_EL0);
    // VA → IPA 0x4000_3000 → PA 0xa000_3000; stage 2 is read-only.
    assert_eq!(
        dma_at(&mut d, 0x7010, access(false, false, false))
            .unwrap()
            .address,
        0xa000_3010
    );
    let f = dma_at(&mut d, 0x7010, access(true, false, false)).unwrap_err();
    assert_eq!(f.event, Some(EventType::FPermission));
    let ev = d.events();
    assert!(ev[0].stage2);
    assert_eq!(ev[0].aux_addr, 0x4000_3000);
    // Full ATS answers the PA with the combined permissions: read-only, not a hole.
    let e = ats_at(&mut d, 0x7000, false, false);
    assert_eq!(
        (e[0].translated, e[0].r, e[0].w),
        (0xa000_3000, true, false)
    );
    // Translated DMA with EATS = full is not translated again.
    let tr = d.smmu.translated_dma(
        &d.guest.mem,
        &DmaRequest {
            sid: SID,
            ssid: None,
            address: 0xa000_3000,
            access: access(false, false, false),
        },
    );
    assert_eq!(tr.unwrap().address, 0xa000_3000);

    // Split stage: ATS answers the IPA; translated DMA goes through stage 2.
    let (mut d, s1, _) = nested_env(2);
    s1.map(&d.guest, 0x7000, 0x4000_3000, 12, AF | AP_EL0);
    let e = ats_at(&mut d, 0x7000, false, false);
    assert_eq!((e[0].translated, e[0].r, e[0].w), (0x4000_3000, true, true));
    let req = |write| DmaRequest {
        sid: SID,
        ssid: None,
        address: 0x4000_3008,
        access: access(write, false, false),
    };
    assert_eq!(
        d.smmu
            .translated_dma(&d.guest.mem, &req(false))
            .unwrap()
            .address,
        0xa000_3008
    );
    let f = d.smmu.translated_dma(&d.guest.mem, &req(true)).unwrap_err();
    assert_eq!(f.event, Some(EventType::FPermission));
}

#[test]
fn tlbi_s2_ipa_drops_stage2_and_nested_entries() {
    let (mut d, s1, s2) = nested_env(1);
    s1.map(&d.guest, 0x7000, 0x4000_3000, 12, AF | AP_EL0);
    assert!(dma_at(&mut d, 0x7000, access(false, false, false)).is_ok());
    s2.unmap(&d.guest, 0x4000_0000, 3);
    assert!(
        dma_at(&mut d, 0x7000, access(false, false, false)).is_ok(),
        "cached"
    );
    d.submit(&[cmd::tlbi_s2_ipa(6, 0x4000_3000)]);
    d.sync();
    assert!(dma_at(&mut d, 0x7000, access(false, false, false)).is_err());
}
