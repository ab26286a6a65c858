//! Property tests standing in for the fuzz target: random guest memory plus random register
//! writes, requests, acknowledgements and time-outs never panic, and every call does a
//! bounded amount of guest-memory work.

use proptest::prelude::*;

use super::tests_harness::*;
use super::*;

/// Guest memory of the property tests: 1 MiB at 0, filled from a seed.
const FUZZ_MEM: usize = 1 << 20;

/// Guest-memory accesses one translated page may need at most: root (2 reads), context (4),
/// PASID directory (1) and PASID entry (8), then up to 35 entry reads plus accessed/dirty
/// compare-exchanges (2 accesses each) on every first- and second-stage entry touched.
const MAX_ACCESSES_PER_PAGE: u64 = 15 + 35 * 3;
/// Per register write: every descriptor of one kick (up to 4 reads and a status write).
const MAX_ACCESSES_PER_WRITE: u64 = MAX_DESCRIPTORS_PER_KICK as u64 * 5;

fn fill(seed: u64) -> VecGuestMemory {
    let mut x = seed | 1;
    let mut bytes = vec![0u8; FUZZ_MEM];
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Bias entries towards small, in-memory pointers with low flag bits set, so walks go
        // deep instead of stopping at the first garbage entry.
        let v = if x % 4 == 0 {
            x
        } else {
            (x & 0xf_f000) | (x >> 52)
        };
        chunk.copy_from_slice(&v.to_le_bytes());
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
        3 => (0u16..0x300, pasid(), addr(), 0u64..(1 << 24), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(sid, pasid, addr, len, no_write, exec, privileged)| Op::Ats { sid, pasid, addr, len, no_write, exec, privileged }),
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
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut mem = fill(seed);
        let mut vtd = Vtd::new(cfg).unwrap();
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
                Op::Ats { sid, pasid, addr, len, no_write, exec, privileged } => {
                    let req = AtsRequest { sid, pasid, addr, len, no_write, exec, privileged, max_entries: 16 };
                    if let Ok(v) = vtd.translation_request(&mut mem, &req) {
                        prop_assert!(!v.is_empty() && v.len() <= 16);
                        for e in &v {
                            prop_assert!(e.size_log2 >= 12 && e.size_log2 <= 63);
                            prop_assert_eq!(e.untranslated_base & ((1u64 << e.size_log2) - 1), 0);
                            prop_assert!(!e.global);
                        }
                    }
                    16 * MAX_ACCESSES_PER_PAGE
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
