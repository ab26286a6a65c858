//! Property tests standing in for the fuzz target: random guest memory plus random register
//! writes, requests, acknowledgements and time-outs never panic, and every call does a
//! bounded amount of guest-memory work.

use proptest::prelude::*;

use super::tests_harness::*;
use super::*;

/// Guest memory of the property tests: 1 MiB at 0, filled from a seed.
const FUZZ_MEM: usize = 1 << 20;

/// Guest-memory accesses one translated page may need at most (see the walk module).
const MAX_ACCESSES_PER_PAGE: u64 = super::walk::MAX_GUEST_ACCESSES_PER_PAGE;
/// Per register write: every descriptor of one kick (up to 4 reads and a status write).
const MAX_ACCESSES_PER_WRITE: u64 = MAX_DESCRIPTORS_PER_KICK as u64 * 5;

/// Seeded pseudo-random guest memory, structure-aware so that walks get deep: page `i` holds
/// entries of kind `i % 8` (root, legacy context, scalable context, PASID directory, PASID
/// table, first-stage table, second-stage table, noise) whose pointers mostly lead to a page
/// of the next kind; one qword in sixteen gets a random bit flipped (reserved bits, bad
/// types, wrong levels), one in ten is replaced by noise.
fn fill(seed: u64) -> VecGuestMemory {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pages = (FUZZ_MEM / 0x1000) as u64;
    let mut bytes = vec![0u8; FUZZ_MEM];
    for page in 0..pages {
        let page_of = |kind: u64, r: u64| (((r >> 20) % (pages / 8)) * 8 + kind) << 12;
        for q in 0..512u64 {
            let r = next();
            let v = match (page % 8, q) {
                // Root: lo → legacy or scalable context page, hi → scalable context or 0.
                (0, q) if q % 2 == 0 => page_of(1 + (r & 1), r) | 1,
                (0, _) => {
                    if r & 1 == 0 {
                        0
                    } else {
                        page_of(2, r) | 1
                    }
                }
                // Legacy context: lo P | TT, hi AW 1..3 | DID.
                (1, q) if q % 2 == 0 => page_of(6, r) | 1 | ((r & 3) << 2),
                (1, _) => (1 + r % 3) | ((r >> 8) & 0xff) << 8,
                // Scalable context (4 qwords): P | DTE | PASIDE | PDTS, RID_PASID, 0, 0.
                (2, q) if q % 4 == 0 => page_of(3, r) | 0xd | ((r & 7) << 9),
                (2, q) if q % 4 == 1 => (r >> 40) & 0x3f,
                (2, _) => 0,
                // PASID directory: P.
                (3, _) => page_of(4, r) | 1,
                // PASID entry (8 qwords): P | AW | PGTT | SSPTPTR, DID, FSPTPTR, 0...
                (4, q) if q % 8 == 0 => page_of(6, r) | 1 | (2 << 2) | ((1 + r % 4) << 6),
                (4, q) if q % 8 == 1 => r & 0xffff,
                (4, q) if q % 8 == 2 => page_of(5, r) | ((r >> 8) & 0x13),
                (4, _) => 0,
                // First stage: P | RW | US, sometimes PS, XD, G.
                (5, _) => page_of(5, r) | 7 | (r & 0x8000_0000_0000_01a0),
                // Second stage: R | W | X, sometimes PS.
                (6, _) => page_of(6, r) | (1 + r % 7) | (r & 0x80),
                _ => r,
            };
            let v = match next() % 160 {
                0..=9 => v ^ (1 << (next() % 64)),
                10..=25 => next(),
                _ => v,
            };
            let at = (page * 0x1000 + q * 8) as usize;
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    VecGuestMemory::from_bytes(0, bytes)
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        wide: bool,
        value: u64,
    },
    Dma {
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
        write: bool,
        privileged: bool,
    },
    Ats {
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
        len: u64,
        no_write: bool,
        exec: bool,
        privileged: bool,
        stu_log2: u8,
    },
    Translated {
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
    },
    Ack {
        tag: u64,
    },
    Timeout,
    Service,
}

fn offsets() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            GCMD, RTADDR, RTADDR + 4, CCMD, CCMD + 4, FSTS, FECTL, FEDATA, FEADDR, IQT, IQA, ICS,
            IECTL, IVA, IOTLB_REG, IOTLB_REG + 4, FRCD, FRCD + 8, FRCD + 16 + 8,
        ]),
        1 => (0u64..0x1100).prop_map(|o| o & !3),
        1 => any::<u64>(),
    ]
}

fn pasid() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        (0u32..64).prop_map(Some),
        any::<u32>().prop_map(Some)
    ]
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..(4 << 20), any::<u64>(), Just(0xfee0_0000)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (offsets(), any::<bool>(), prop_oneof![(0u64..FUZZ_MEM as u64), any::<u64>(), Just(u64::from(GCMD_TE | GCMD_SRTP | GCMD_QIE))])
            .prop_map(|(offset, wide, value)| Op::Write { offset, wide, value }),
        3 => (0u16..0x300, pasid(), addr(), any::<bool>(), any::<bool>())
            .prop_map(|(sid, pasid, addr, write, privileged)| Op::Dma { sid, pasid, addr, write, privileged }),
        3 => (0u16..0x300, pasid(), addr(), 0u64..(1 << 24), any::<bool>(), any::<bool>(), any::<bool>(), prop_oneof![3 => Just(12u8), 1 => 12u8..=32])
            .prop_map(|(sid, pasid, addr, len, no_write, exec, privileged, stu_log2)| Op::Ats { sid, pasid, addr, len, no_write, exec, privileged, stu_log2 }),
        1 => (0u16..0x300, pasid(), addr()).prop_map(|(sid, pasid, addr)| Op::Translated { sid, pasid, addr }),
        1 => (0u64..40).prop_map(|tag| Op::Ack { tag }),
        1 => Just(Op::Timeout),
        1 => Just(Op::Service),
    ]
}

fn config() -> impl Strategy<Value = VtdConfig> {
    (
        any::<bool>(),
        prop::sample::select(vec![39u8, 48, 57]),
        1u16..=16,
    )
        .prop_map(|(scalable, aw, nfr)| {
            if scalable {
                VtdConfig {
                    aw_bits: aw,
                    fs5lp: aw == 57,
                    fault_records: nfr,
                    ..VtdConfig::default()
                }
            } else {
                VtdConfig {
                    aw_bits: aw,
                    scalable_mode: false,
                    first_stage: false,
                    nested: false,
                    pasid_bits: 0,
                    fault_records: nfr,
                    ..VtdConfig::default()
                }
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_memory_and_register_writes_never_panic_and_stay_bounded(
                seed in any::<u64>(),
        cfg in config(),
        preamble in prop::option::of(0u64..4),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut mem = fill(seed);
        let mut vtd = Vtd::new(cfg).unwrap();
        if let Some(ttm) = preamble {
            // Translation on, root table at 0 (random contents) in mode `ttm`, a queue at
            // 512 KiB, fault events unmasked.
            let _ = vtd.write32(&mut mem, FECTL, 0);
            let _ = vtd.write64(&mut mem, IQA, 0x8_0000 | IQA_DW);
            let _ = vtd.write64(&mut mem, RTADDR, ttm << 10);
            let _ = vtd.write32(&mut mem, GCMD, GCMD_TE | GCMD_SRTP | GCMD_QIE);
        }
        let mut events = 0usize;
        for op in ops {
            let before = mem.accesses();
            let bound = match op {
                Op::Write { offset, wide, value } => {
                    let _ = if wide { vtd.write64(&mut mem, offset, value) } else { vtd.write32(&mut mem, offset, value as u32) };
                    MAX_ACCESSES_PER_WRITE
                }
                Op::Dma { sid, pasid, addr, write, privileged } => {
                    let _ = vtd.translate_dma(&mut mem, &DmaRequest { sid, pasid, addr, write, privileged });
                    MAX_ACCESSES_PER_PAGE
                }
                Op::Ats { sid, pasid, addr, len, no_write, exec, privileged, stu_log2 } => {
                    let req = AtsRequest { sid, pasid, addr, len, no_write, exec, privileged, max_entries: 16, stu_log2 };
                    if let Ok(v) = vtd.translation_request(&mut mem, &req) {
                        prop_assert!(!v.is_empty() && v.len() <= 16);
                        for e in &v {
                            prop_assert!(e.size_log2 >= stu_log2 && e.size_log2 <= 63);
                            prop_assert_eq!(e.untranslated_base & ((1u64 << e.size_log2) - 1), 0);
                            prop_assert!(!e.global);
                        }
                    }
                    MAX_ATS_PAGE_WALKS as u64 * MAX_ACCESSES_PER_PAGE
                }
                Op::Translated { sid, pasid, addr } => {
                    let _ = vtd.translated_dma(&mut mem, &DmaRequest { sid, pasid, addr, write: true, privileged: false });
                    MAX_ACCESSES_PER_PAGE
                }
                Op::Ack { tag } => {
                    vtd.ack_atc_invalidation(&mut mem, tag);
                    MAX_ACCESSES_PER_WRITE
                }
                Op::Timeout => {
                    vtd.atc_invalidation_timeout();
                    0
                }
                Op::Service => {
                    vtd.service_queue(&mut mem);
                    MAX_ACCESSES_PER_WRITE
                }
            };
            let used = mem.accesses() - before;
            prop_assert!(used <= bound, "{used} guest-memory accesses for one call (bound {bound})");
            prop_assert!(vtd.outstanding_atc_invalidations() <= MAX_OUTSTANDING_ATC);
            let ev = vtd.take_events();
            prop_assert!(ev.len() <= MAX_BUFFERED_EVENTS);
            events += ev.len();
        }
        let _ = events;
    }

    /// A programmed unit under random page-table corruption: walks of every stage over
    /// arbitrary entries stay bounded and never panic.
    #[test]
    fn corrupted_tables_never_panic(seed in any::<u64>(), pgtt in 1u64..=4, iovas in prop::collection::vec(any::<u64>(), 1..32)) {
        let mut g = Guest::new(VtdConfig::default());
        g.scalable_context(0x10, ScalableCtx::default());
        let fs = g.t.page();
        let ss = g.t.page();
        let e = PasidEntry { pgtt, ss_root: ss, ssade: true, ..PasidEntry::first_stage(1, fs) };
        g.pasid_entry(0x10, 1, e);
        g.enable();
        // Fill both top-level tables and a few more pages with seeded garbage.
        let mut x = seed | 1;
        for page in [fs, ss] {
            for i in 0..512u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                g.t.put(page + 8 * i, (x & 0xfff) | (fs + ((x >> 12) % 4) * 0x1000) | (x & (1 << 63)));
            }
        }
        for iova in iovas {
            let before = g.t.mem.accesses();
            let _ = g.dma(0x10, Some(1), iova, iova & 1 == 0);
            prop_assert!(g.t.mem.accesses() - before <= MAX_ACCESSES_PER_PAGE);
            let _ = g.ats(0x10, Some(1), iova, 0x10_0000, false);
        }
    }
}

/// The random memory of the property tests must actually reach page walks (else the bound
/// checks above would only ever see root/context faults).
#[test]
fn random_memory_reaches_page_walks() {
    use std::collections::BTreeMap;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 0..300u64 {
        let mut mem = fill(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut vtd = Vtd::new(VtdConfig::default()).unwrap();
        let _ = vtd.write64(&mut mem, RTADDR, (seed & 1) << 10);
        let _ = vtd.write32(&mut mem, GCMD, GCMD_TE | GCMD_SRTP);
        for i in 0..64u64 {
            let sid = ((seed * 131 + i * 7) % 0x300) as u16;
            let pasid = (i % 3 == 0).then_some((i * 5) as u32 % 64);
            let addr = (seed ^ (i << 14)) & 0xf_ffff;
            let k = match vtd.translate_dma(
                &mut mem,
                &DmaRequest {
                    sid,
                    pasid,
                    addr,
                    write: i & 1 == 0,
                    privileged: false,
                },
            ) {
                Ok(_) => "ok".to_string(),
                Err(f) => format!("{:?}", f.reason),
            };
            *outcomes.entry(k).or_default() += 1;
        }
    }
    assert!(outcomes.get("ok").copied().unwrap_or(0) > 0, "{outcomes:?}");
    let walk_level = [
        "PagingEntryReserved",
        "Read",
        "Write",
        "FsEntryNotPresent",
        "FsEntryReserved",
        "NonCanonical",
    ];
    let reached = walk_level
        .iter()
        .filter(|r| outcomes.contains_key(**r))
        .count();
    assert!(reached >= 4, "{outcomes:?}");
}
