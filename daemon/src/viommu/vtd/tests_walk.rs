//! Table-driven tests of every page-table format and level, large pages, permissions,
//! canonical-address and address-width checks, nested translation and A/D maintenance.

use super::tests_harness::*;
use super::*;

const SID: u16 = 0x0010; // 00:02.0
const PASID: u32 = 9;
const DID: u16 = 4;
const OUT: u64 = 0x1_4000_0000; // 1 GiB aligned, below 2^48, outside the interrupt range

fn cfg57() -> VtdConfig {
    VtdConfig {
        aw_bits: 57,
        fs5lp: true,
        ..VtdConfig::default()
    }
}

/// A scalable guest whose (SID, PASID) uses `entry`; returns it enabled.
fn guest_with(cfg: VtdConfig, entry: PasidEntry) -> Guest {
    let mut g = Guest::new(cfg);
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, entry);
    g
}

fn dma(g: &mut Guest, addr: u64, write: bool) -> Result<DmaTranslation, DmaFault> {
    g.dma(SID, Some(PASID), addr, write)
}

fn priv_dma(g: &mut Guest, addr: u64, write: bool) -> Result<DmaTranslation, DmaFault> {
    let req = DmaRequest {
        sid: SID,
        pasid: Some(PASID),
        addr,
        write,
        privileged: true,
    };
    g.vtd.translate_dma(&mut g.t.mem, &req)
}

#[test]
fn second_stage_every_level_count_and_page_size() {
    // (config, AW field, levels, IOVA inside the width)
    let formats = [
        (VtdConfig::default(), 1u64, 3u8, 0x40_1234_5000u64),
        (VtdConfig::default(), 2, 4, 0xa012_3456_7000),
        (cfg57(), 3, 5, 0x01a3_4012_3456_7000),
    ];
    for (cfg, aw, levels, iova) in formats {
        for leaf_level in 1..=3u8 {
            let mut g = Guest::new(cfg.clone());
            let root = g.t.page();
            g.scalable_context(SID, ScalableCtx::default());
            g.pasid_entry(SID, PASID, PasidEntry::second_stage(DID, root, aw));
            g.t.map(
                root,
                levels,
                iova,
                leaf_level,
                OUT | pte::R | pte::W,
                pte::R | pte::W,
            );
            g.enable();
            let size_log2 = 12 + 9 * (leaf_level - 1);
            let mask = (1u64 << size_log2) - 1;
            let t = dma(&mut g, iova + 0x123, true)
                .unwrap_or_else(|f| panic!("{levels}-level, leaf {leaf_level}: {f:?}"));
            assert_eq!(t.size_log2, size_log2, "{levels}-level, leaf {leaf_level}");
            assert_eq!(t.iova_base, iova & !mask);
            assert_eq!(
                t.translate(iova + 0x123),
                Some(OUT + ((iova + 0x123) & mask))
            );
            assert_eq!(t.translate((iova & !mask) + (1 << size_log2)), None);
            // The same through ATS (legacy-free: PASID request, DTE set).
            let a = g.ats(SID, Some(PASID), iova, 1, false).unwrap()[0];
            assert_eq!(
                (a.untranslated_base, a.size_log2, a.translated, a.r, a.w),
                (iova & !mask, size_log2, OUT, true, true)
            );
        }
    }
}

#[test]
fn first_stage_every_level_count_and_page_size() {
    let formats = [
        (VtdConfig::default(), false, 4u8, 0x7f12_3456_7000u64),
        (VtdConfig::default(), false, 4, 0xffff_8000_4012_3000), // canonical upper half
        (cfg57(), true, 5, 0x00ab_cdef_4012_3000),
        (cfg57(), true, 5, 0xff12_3456_4012_3000),
    ];
    for (cfg, five, levels, iova) in formats {
        for leaf_level in 1..=3u8 {
            let mut g = Guest::new(cfg.clone());
            let root = g.t.page();
            let e = PasidEntry {
                fs_5level: five,
                ..PasidEntry::first_stage(DID, root)
            };
            g.scalable_context(SID, ScalableCtx::default());
            g.pasid_entry(SID, PASID, e);
            let flags = pte::P | pte::RW | pte::US;
            g.t.map(root, levels, iova, leaf_level, OUT | flags, flags);
            g.enable();
            let size_log2 = 12 + 9 * (leaf_level - 1);
            let mask = (1u64 << size_log2) - 1;
            let t = dma(&mut g, iova + 0x40, false)
                .unwrap_or_else(|f| panic!("{iova:#x} leaf {leaf_level}: {f:?}"));
            assert_eq!(
                (t.size_log2, t.iova_base),
                (size_log2, iova & !mask),
                "{iova:#x} leaf {leaf_level}"
            );
            assert_eq!(t.translate(iova + 0x40), Some(OUT + ((iova + 0x40) & mask)));
        }
    }
}

#[test]
fn large_pages_need_their_capability() {
    // Second stage without 2 MiB / 1 GiB support: PS is reserved.
    for (leaf_level, cfg) in [
        (
            2u8,
            VtdConfig {
                ss_2m: false,
                ..VtdConfig::default()
            },
        ),
        (
            3,
            VtdConfig {
                ss_1g: false,
                ..VtdConfig::default()
            },
        ),
    ] {
        let mut g = Guest::new(cfg);
        let root = g.t.page();
        g.scalable_context(SID, ScalableCtx::default());
        g.pasid_entry(SID, PASID, PasidEntry::second_stage(DID, root, 2));
        g.t.map(root, 4, 0, leaf_level, OUT | pte::R, pte::R);
        g.enable();
        assert_eq!(
            dma(&mut g, 0, false).unwrap_err().reason,
            FaultReason::PagingEntryReserved
        );
        assert_eq!(g.vtd.pending_faults()[0].reason, 0x0c);
    }
    // First stage 1 GiB without FS1GP.
    let mut g = Guest::new(VtdConfig {
        fs1gp: false,
        ..VtdConfig::default()
    });
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, root));
    let f = pte::P | pte::RW | pte::US;
    g.t.map(root, 4, 0, 3, OUT | f, f);
    g.enable();
    assert_eq!(
        dma(&mut g, 0, false).unwrap_err().reason,
        FaultReason::FsEntryReserved
    );
    assert_eq!(g.vtd.read64(CAP) & (1 << 56), 0);
    // PS in a PML4 entry is always reserved; misaligned large-page address bits too.
    for (level, leaf) in [(4u8, OUT | f), (2, (OUT + 0x2000) | f)] {
        let mut g = Guest::new(VtdConfig::default());
        let root = g.t.page();
        g.scalable_context(SID, ScalableCtx::default());
        g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, root));
        g.t.map(root, 4, 0, level, leaf, f);
        g.enable();
        assert_eq!(
            dma(&mut g, 0, false).unwrap_err().reason,
            FaultReason::FsEntryReserved,
            "level {level}"
        );
    }
}

struct FsPerm {
    leaf: u64,
    tables: u64,
    privileged: bool,
    sre: bool,
    wpe: bool,
    write: bool,
    expect: Result<bool, FaultReason>,
}

#[test]
fn first_stage_permission_combinations() {
    use FaultReason::*;
    let all = pte::P | pte::RW | pte::US;
    let p = |leaf, tables, privileged, sre, wpe, write, expect| FsPerm {
        leaf,
        tables,
        privileged,
        sre,
        wpe,
        write,
        expect,
    };
    let cases = [
        p(all, all, false, false, false, false, Ok(true)),
        p(all, all, false, false, false, true, Ok(true)),
        p(pte::P | pte::US, all, false, false, false, false, Ok(false)),
        p(
            pte::P | pte::US,
            all,
            false,
            false,
            false,
            true,
            Err(FsWrite),
        ),
        p(
            all,
            pte::P | pte::US,
            false,
            false,
            false,
            true,
            Err(FsWrite),
        ), // R/W cleared above the leaf
        p(
            pte::P | pte::RW,
            all,
            false,
            false,
            false,
            false,
            Err(Privilege),
        ), // supervisor page
        p(
            all,
            pte::P | pte::RW,
            false,
            false,
            false,
            false,
            Err(Privilege),
        ), // U/S cleared above
        p(pte::P | pte::RW, all, true, true, false, true, Ok(true)),
        p(pte::P, all, true, true, false, true, Ok(true)), // no WPE: supervisor may write RO
        p(pte::P, all, true, true, true, true, Err(FsWrite)), // WPE: it may not
        p(all, all, true, false, false, false, Err(Privilege)), // SRE clear
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut g = Guest::new(VtdConfig::default());
        let root = g.t.page();
        g.scalable_context(SID, ScalableCtx::default());
        g.pasid_entry(
            SID,
            PASID,
            PasidEntry {
                sre: c.sre,
                wpe: c.wpe,
                ..PasidEntry::first_stage(DID, root)
            },
        );
        g.t.map(root, 4, 0x5000, 1, OUT | c.leaf, c.tables);
        g.enable();
        let got = if c.privileged {
            priv_dma(&mut g, 0x5000, c.write)
        } else {
            dma(&mut g, 0x5000, c.write)
        };
        match c.expect {
            Ok(writable) => assert_eq!(got.map(|t| t.writable), Ok(writable), "case {i}"),
            Err(r) => {
                assert_eq!(got.unwrap_err().reason, r, "case {i}");
                assert_eq!(g.vtd.pending_faults()[0].reason, r.code(), "case {i}");
            }
        }
    }
}

#[test]
fn second_stage_permission_combinations() {
    use FaultReason::*;
    // (leaf bits, table bits, write, expected)
    let rw = pte::R | pte::W;
    let cases = [
        (rw, rw, false, Ok(())),
        (rw, rw, true, Ok(())),
        (pte::R, rw, true, Err(Write)),
        (pte::W, rw, false, Err(Read)),
        (pte::W, rw, true, Ok(())),
        (rw, pte::R, true, Err(Write)),
        (0, rw, false, Err(Read)), // not present
        (0, rw, true, Err(Write)),
    ];
    for (i, (leaf, tables, write, expect)) in cases.into_iter().enumerate() {
        let mut g = Guest::new(VtdConfig::default());
        let root = g.t.page();
        g.scalable_context(SID, ScalableCtx::default());
        g.pasid_entry(SID, PASID, PasidEntry::second_stage(DID, root, 2));
        g.t.map(root, 4, 0x5000, 1, OUT | leaf, tables);
        g.enable();
        let got = dma(&mut g, 0x5000, write).map(|_| ()).map_err(|f| f.reason);
        assert_eq!(got, expect, "case {i}");
    }
}

#[test]
fn ats_reports_rights_and_hole_sizes() {
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(
        SID,
        PASID,
        PasidEntry {
            ere: true,
            ..PasidEntry::first_stage(DID, root)
        },
    );
    let f = pte::P | pte::RW | pte::US;
    g.t.map(root, 4, 0x20_0000, 1, OUT | pte::P | pte::US | pte::XD, f); // read-only 4K
    g.t.map(root, 4, 0x20_1000, 1, (OUT + 0x1000) | f | pte::XD, f); // RW, no execute
    g.t.map(root, 4, 0x20_2000, 1, (OUT + 0x2000) | f, f); // RW + execute
    g.enable();
    let req = AtsRequest {
        sid: SID,
        pasid: Some(PASID),
        addr: 0x20_0000,
        len: 0x4000,
        no_write: false,
        exec: true,
        privileged: false,
        max_entries: 16,
        stu_log2: 12,
    };
    let r = g.vtd.translation_request(&mut g.t.mem, &req).unwrap();
    let rights: Vec<_> = r
        .iter()
        .map(|e| (e.untranslated_base, e.size_log2, e.r, e.w, e.x))
        .collect();
    assert_eq!(
        rights,
        vec![
            (0x20_0000, 12, true, false, false),
            (0x20_1000, 12, true, true, false),
            (0x20_2000, 12, true, true, true),
            (0x20_3000, 12, false, false, false), // hole inside a present page table
        ]
    );
    // A hole at the PDPT level reports its full 1 GiB size, a hole in an empty PML4 slot 512 GiB.
    let r = g.ats(SID, Some(PASID), 0x4000_0000, 1, false).unwrap();
    assert_eq!(
        (r[0].untranslated_base, r[0].size_log2, r[0].r, r[0].w),
        (0x4000_0000, 30, false, false)
    );
    let r = g.ats(SID, Some(PASID), 0x80_0000_0000, 1, false).unwrap();
    assert_eq!((r[0].size_log2, r[0].r), (39, false));
    // No-Write never returns W.
    let r = g.ats(SID, Some(PASID), 0x20_1000, 1, true).unwrap();
    assert_eq!((r[0].r, r[0].w), (true, false));
    // Recoverable conditions record nothing; max_entries bounds the answer.
    assert!(g.vtd.pending_faults().is_empty());
    let req = AtsRequest {
        len: 1 << 40,
        max_entries: 3,
        stu_log2: 12,
        ..req
    };
    assert_eq!(
        g.vtd.translation_request(&mut g.t.mem, &req).unwrap().len(),
        3
    );
}

#[test]
fn canonical_and_address_width_faults() {
    use FaultReason::*;
    // First stage: non-canonical inputs.
    for (cfg, five, iova) in [
        (VtdConfig::default(), false, 0x0000_8000_0000_0000u64),
        (VtdConfig::default(), false, 0xfff0_0000_0000_0000),
        (cfg57(), true, 0x0100_0000_0000_0000),
    ] {
        let mut g = guest_with(
            cfg,
            PasidEntry {
                fs_5level: five,
                ..PasidEntry::first_stage(DID, 0x20_0000)
            },
        );
        g.enable();
        assert_eq!(
            dma(&mut g, iova, false).unwrap_err().reason,
            NonCanonical,
            "{iova:#x}"
        );
        assert_eq!(g.vtd.pending_faults()[0].reason, 0x80);
        // Through ATS: a hole, not a recorded fault.
        let r = g.ats(SID, Some(PASID), iova, 1, false).unwrap();
        assert!(!r[0].r && !r[0].w);
        assert_eq!(g.vtd.pending_faults().len(), 1);
    }
    // Second stage: input above the AGAW.
    for (aw, iova) in [(1u64, 1u64 << 39), (2, 1 << 48)] {
        let mut g = guest_with(
            VtdConfig::default(),
            PasidEntry::second_stage(DID, 0x20_0000, aw),
        );
        g.enable();
        assert_eq!(
            dma(&mut g, iova, false).unwrap_err().reason,
            AddressBeyondWidth
        );
        assert_eq!(g.vtd.pending_faults()[0].reason, 4);
    }
    // AGAW not in SAGAW: PASID entry invalid / legacy context invalid.
    let mut g = guest_with(
        VtdConfig::default(),
        PasidEntry::second_stage(DID, 0x20_0000, 3),
    );
    g.enable();
    assert_eq!(dma(&mut g, 0, false).unwrap_err().reason, PasidEntryInvalid);
    let legacy = VtdConfig {
        scalable_mode: false,
        first_stage: false,
        nested: false,
        pasid_bits: 0,
        ..VtdConfig::default()
    };
    let mut g = Guest::new(legacy);
    g.legacy_context(SID, 0, 3, DID, 0x20_0000);
    g.enable();
    assert_eq!(
        g.dma(SID, None, 0, false).unwrap_err().reason,
        ContextInvalid
    );
    // 5-level first stage without FS5LP.
    let mut g = guest_with(
        VtdConfig::default(),
        PasidEntry {
            fs_5level: true,
            ..PasidEntry::first_stage(DID, 0x20_0000)
        },
    );
    g.enable();
    assert_eq!(dma(&mut g, 0, false).unwrap_err().reason, PasidEntryInvalid);
    // Output and table addresses above the host address width are reserved bits.
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, root));
    let f = pte::P | pte::RW | pte::US;
    g.t.map(root, 4, 0x1000, 1, (1 << 48) | f, f);
    let ss_root = g.t.page();
    g.pasid_entry(SID, PASID + 1, PasidEntry::second_stage(DID, ss_root, 2));
    g.t.map(ss_root, 4, 0x1000, 1, (1 << 50) | pte::R, pte::R);
    g.enable();
    assert_eq!(
        dma(&mut g, 0x1000, false).unwrap_err().reason,
        FsEntryReserved
    );
    assert_eq!(
        g.dma(SID, Some(PASID + 1), 0x1000, false)
            .unwrap_err()
            .reason,
        PagingEntryReserved
    );
}

#[test]
fn nested_first_stage_over_second_stage() {
    let mut g = Guest::new(VtdConfig::default());
    let ss_root = g.t.page();
    let fs_root = g.t.page();
    // Second stage: identity 2 MiB pages over the table memory, one 4 KiB page GPA 0x4000_0000
    // → 0x2_0000_0000, and one 1 GiB identity page at 0x8000_0000.
    for gpa in (0..MEM_SIZE as u64).step_by(1 << 21) {
        g.t.map(ss_root, 4, gpa, 2, gpa | pte::R | pte::W, pte::R | pte::W);
    }
    g.t.map(
        ss_root,
        4,
        0x4000_0000,
        1,
        0x2_0000_0000 | pte::R | pte::W,
        pte::R | pte::W,
    );
    g.t.map(
        ss_root,
        4,
        0x8000_0000,
        3,
        0x8000_0000 | pte::R,
        pte::R | pte::W,
    );
    g.scalable_context(SID, ScalableCtx::default());
    let e = PasidEntry {
        pgtt: PGTT_NESTED,
        ss_root,
        ss_aw: 2,
        ..PasidEntry::first_stage(DID, fs_root)
    };
    g.pasid_entry(SID, PASID, e);
    let f = pte::P | pte::RW | pte::US;
    g.t.map(fs_root, 4, 0x1000, 1, 0x4000_0000 | f, f); // 4K FS over 4K SS
    g.t.map(fs_root, 4, 0x20_0000, 2, 0x8000_0000 | f, f); // 2M FS over 1G SS (read-only)
    g.t.map(fs_root, 4, 0x40_0000, 1, 0x5000_0000 | f, f); // GPA without SS mapping
    g.enable();
    let t = dma(&mut g, 0x1234, true).unwrap();
    assert_eq!(
        (t.translate(0x1234), t.size_log2),
        (Some(0x2_0000_0234), 12)
    );
    let t = dma(&mut g, 0x20_1234, false).unwrap();
    assert_eq!(
        (t.translate(0x20_1234), t.size_log2, t.writable),
        (Some(0x8000_1234), 21, false)
    );
    // Write to a page the second stage maps read-only: second-stage write fault.
    assert_eq!(
        dma(&mut g, 0x20_0000, true).unwrap_err().reason,
        FaultReason::Write
    );
    // ATS: read-only answer from the second stage, hole where the second stage is empty.
    let r = g.ats(SID, Some(PASID), 0x20_0000, 1, false).unwrap();
    assert_eq!((r[0].r, r[0].w, r[0].size_log2), (true, false, 21));
    let r = g.ats(SID, Some(PASID), 0x40_0000, 1, false).unwrap();
    assert_eq!((r[0].r, r[0].w), (false, false));
    // First-stage tables themselves must be reachable through the second stage: unmap the
    // 2 MiB identity page holding the FS root and the walk faults on the table fetch.
    g.t.map(ss_root, 4, fs_root & !0x1f_ffff, 2, 0, pte::R | pte::W);
    g.submit(&[piotlb_pasid(DID, PASID), iotlb_global()]);
    assert_eq!(
        dma(&mut g, 0x1234, false).unwrap_err().reason,
        FaultReason::Read
    );
}

#[test]
fn accessed_and_dirty_bits() {
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, root));
    let f = pte::P | pte::RW | pte::US;
    let leaf = g.t.map(root, 4, 0x3000, 1, OUT | f, f);
    let ss_root = g.t.page();
    g.pasid_entry(
        SID,
        PASID + 1,
        PasidEntry {
            ssade: true,
            ..PasidEntry::second_stage(DID + 1, ss_root, 2)
        },
    );
    let ss_leaf = g.t.map(
        ss_root,
        4,
        0x3000,
        1,
        OUT | pte::R | pte::W,
        pte::R | pte::W,
    );
    g.enable();
    dma(&mut g, 0x3000, false).unwrap();
    assert_eq!(g.t.get(leaf) & (pte::A | pte::D), pte::A);
    assert_ne!(g.t.get(root) & pte::A, 0, "A on the PML4 entry");
    // A cached read translation does not satisfy a write: the walk runs again and sets D.
    dma(&mut g, 0x3000, true).unwrap();
    assert_eq!(g.t.get(leaf) & (pte::A | pte::D), pte::A | pte::D);
    // Second stage with SSADE.
    g.dma(SID, Some(PASID + 1), 0x3000, true).unwrap();
    assert_eq!(g.t.get(ss_leaf) & (pte::SA | pte::SD), pte::SA | pte::SD);
    // A/D write-back failure.
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, root));
    let leaf = g.t.map(root, 4, 0x3000, 1, OUT | f, f);
    g.enable();
    g.t.mem
        .set_read_only(leaf & !0xfff, (leaf & !0xfff) + 0x1000);
    assert_eq!(
        dma(&mut g, 0x3000, false).unwrap_err().reason,
        FaultReason::AdUpdateFailed
    );
    assert_eq!(g.vtd.pending_faults()[0].reason, 0x91);
}

#[test]
fn structure_faults_have_their_reason_codes() {
    use FaultReason::*;
    let mut g = Guest::new(VtdConfig::default());
    g.scalable_context(
        SID,
        ScalableCtx {
            pdts: 0,
            ..ScalableCtx::default()
        },
    );
    g.enable();
    // Unprogrammed bus / device.
    assert_eq!(
        g.dma(0x0500, None, 0, false).unwrap_err().reason,
        RootNotPresent
    );
    assert_eq!(
        g.dma(SID + 1, None, 0, false).unwrap_err().reason,
        ContextNotPresent
    );
    // PASID beyond a 128-entry directory (PDTS 0 → 2^7 entries × 64 PASIDs).
    assert_eq!(dma_pasid(&mut g, 128 * 64), PasidDirNotPresent);
    assert_eq!(dma_pasid(&mut g, PASID), PasidDirNotPresent);
    g.pasid_entry(
        SID,
        PASID,
        PasidEntry {
            pgtt: 0,
            ..PasidEntry::first_stage(DID, 0)
        },
    );
    assert_eq!(dma_pasid(&mut g, PASID + 1), PasidEntryNotPresent);
    g.submit(&[pasid_cache(DID, PASID)]);
    assert_eq!(dma_pasid(&mut g, PASID), PasidEntryInvalid);
    // Reserved bit in a root entry (bit 1) and a context entry (QW2).
    let mut g = Guest::new(VtdConfig::default());
    g.scalable_context(SID, ScalableCtx::default());
    g.t.put(g.root, g.t.get(g.root) | 2);
    g.enable();
    assert_eq!(g.dma(SID, None, 0, false).unwrap_err().reason, RootReserved);
    let mut g = Guest::new(VtdConfig::default());
    g.scalable_context(SID, ScalableCtx::default());
    let ctx = g.t.get(g.root) & !0xfff;
    g.t.put(ctx + u64::from(SID & 0x7f) * 32 + 16, 1);
    g.enable();
    assert_eq!(
        g.dma(SID, None, 0, false).unwrap_err().reason,
        ContextReserved
    );
    // Root table outside guest memory, invalid TTM.
    let mut g = Guest::new(VtdConfig::default());
    g.enable();
    g.w64(RTADDR, (1 << 40) | (1 << 10));
    g.w32(GCMD, GCMD_SRTP | GCMD_TE | GCMD_QIE);
    assert_eq!(
        g.dma(SID, None, 0, false).unwrap_err().reason,
        RootTableAccess
    );
    g.w64(RTADDR, g.root | (3 << 10));
    g.w32(GCMD, GCMD_SRTP | GCMD_TE | GCMD_QIE);
    assert_eq!(g.dma(SID, None, 0, false).unwrap_err().reason, InvalidTtm);
}

fn dma_pasid(g: &mut Guest, pasid: u32) -> FaultReason {
    g.dma(SID, Some(pasid), 0, false).unwrap_err().reason
}

#[test]
fn translation_disabled_passes_through() {
    let mut g = Guest::new(VtdConfig::default());
    let t = g.dma(SID, None, 0x1234_5678, true).unwrap();
    assert_eq!(t.translate(0x1234_5678), Some(0x1234_5678));
    assert_eq!(
        g.ats(SID, None, 0, 1, false),
        Err(AtsRejection::UnsupportedRequest)
    );
}

#[test]
fn non_global_pasid_invalidation_spares_global_leaves() {
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::first_stage(DID, root));
    let f = pte::P | pte::RW | pte::US;
    let global = g.t.map(root, 4, 0x1000, 1, OUT | f | pte::G, f);
    let local = g.t.map(root, 4, 0x2000, 1, OUT | f, f);
    g.enable();
    dma(&mut g, 0x1000, false).unwrap();
    dma(&mut g, 0x2000, false).unwrap();
    g.t.put(global, 0);
    g.t.put(local, 0);
    // PASID-IOTLB "all non-global in PASID" (G=2) keeps the global leaf cached...
    g.submit(&[piotlb_pasid(DID, PASID)]);
    assert!(dma(&mut g, 0x1000, false).is_ok());
    assert!(dma(&mut g, 0x2000, false).is_err());
    // ...a page-selective one within the PASID drops it.
    g.submit(&[piotlb_psi(DID, PASID, 0x1000, 0)]);
    assert!(dma(&mut g, 0x1000, false).is_err());
}

#[test]
fn second_stage_execute_with_ssee() {
    for (ssee, leaf, expect) in [
        (true, pte::R | pte::X, true),
        (true, pte::R, false),
        (false, pte::R | pte::X, false),
    ] {
        let mut g = Guest::new(VtdConfig::default());
        let root = g.t.page();
        g.scalable_context(SID, ScalableCtx::default());
        g.pasid_entry(
            SID,
            PASID,
            PasidEntry {
                ssee,
                ..PasidEntry::second_stage(DID, root, 2)
            },
        );
        g.t.map(root, 4, 0x1000, 1, OUT | leaf, pte::R | pte::W | pte::X);
        g.enable();
        let req = AtsRequest {
            sid: SID,
            pasid: Some(PASID),
            addr: 0x1000,
            len: 1,
            no_write: true,
            exec: true,
            privileged: false,
            max_entries: 1,
            stu_log2: 12,
        };
        let e = g.vtd.translation_request(&mut g.t.mem, &req).unwrap()[0];
        assert_eq!((e.r, e.x), (true, expect), "SSEE={ssee} leaf={leaf:#x}");
    }
}

#[test]
fn iotlb_stays_bounded() {
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::second_stage(DID, root, 2));
    // One page table with 512 4 KiB leaves, referenced from 10 page-directory slots.
    let pd_entry = g.t.map(root, 4, 0, 1, OUT | pte::R, pte::R | pte::W) & !0xfff;
    for i in 0..512u64 {
        g.t.put(pd_entry + 8 * i, (OUT + (i << 12)) | pte::R);
    }
    let pd = g.t.get(g.t.get(root) & !0xfff) & !0xfff;
    let pt = g.t.get(pd) & !0xfff;
    for slot in 1..10u64 {
        g.t.put(pd + 8 * slot, pt | pte::R | pte::W);
    }
    g.enable();
    for page in 0..(10 * 512u64) {
        dma(&mut g, page << 12, false).unwrap();
        assert!(g.vtd.caches.iotlb_len() <= super::cache::CACHE_CAPACITY);
    }
}

#[test]
fn ats_answers_cover_the_smallest_translation_unit() {
    let mut g = Guest::new(VtdConfig::default());
    let root = g.t.page();
    g.scalable_context(SID, ScalableCtx::default());
    g.pasid_entry(SID, PASID, PasidEntry::second_stage(DID, root, 2));
    let rw = pte::R | pte::W;
    // 0x10000..0x18000: eight contiguous 4 KiB pages; 0x20000..: two swapped pages;
    // 0x30000: a 16 KiB block with a read-only page; 0x200000: a 2 MiB leaf.
    for i in 0..8u64 {
        g.t.map(root, 4, 0x1_0000 + (i << 12), 1, (OUT + (i << 12)) | rw, rw);
    }
    g.t.map(root, 4, 0x2_0000, 1, (OUT + 0x1000) | rw, rw);
    g.t.map(root, 4, 0x2_1000, 1, OUT | rw, rw);
    for i in 0..4u64 {
        let leaf = if i == 2 { pte::R } else { rw };
        g.t.map(
            root,
            4,
            0x3_0000 + (i << 12),
            1,
            (OUT + (i << 12)) | leaf,
            rw,
        );
    }
    g.t.map(root, 4, 0x20_0000, 2, OUT | rw, rw);
    g.enable();
    let ask = |g: &mut Guest, addr: u64, len: u64, stu_log2: u8| {
        let req = AtsRequest {
            sid: SID,
            pasid: Some(PASID),
            addr,
            len,
            no_write: false,
            exec: false,
            privileged: false,
            max_entries: 8,
            stu_log2,
        };
        g.vtd.translation_request(&mut g.t.mem, &req).unwrap()
    };
    let e = ask(&mut g, 0x1_2000, 1, 14);
    assert_eq!(e.len(), 1);
    assert_eq!(
        (
            e[0].untranslated_base,
            e[0].size_log2,
            e[0].translated,
            e[0].r,
            e[0].w
        ),
        (0x1_0000, 14, OUT, true, true)
    );
    let e = ask(&mut g, 0x2_0000, 1, 13);
    assert_eq!(
        (e[0].untranslated_base, e[0].size_log2, e[0].r, e[0].w),
        (0x2_0000, 13, false, false),
        "not contiguous"
    );
    let e = ask(&mut g, 0x3_0000, 1, 14);
    assert_eq!(
        (e[0].size_log2, e[0].r, e[0].w),
        (14, false, false),
        "mixed rights"
    );
    let e = ask(&mut g, 0x20_0000, 1, 21);
    assert_eq!((e[0].size_log2, e[0].translated), (21, OUT));
    // Two STU blocks in one request: consecutive, each 16 KiB.
    let e = ask(&mut g, 0x1_0000, 0x8000, 14);
    let got: Vec<_> = e
        .iter()
        .map(|e| (e.untranslated_base, e.size_log2, e.translated))
        .collect();
    assert_eq!(got, vec![(0x1_0000, 14, OUT), (0x1_4000, 14, OUT + 0x4000)]);
    assert!(g.vtd.pending_faults().is_empty());
}
