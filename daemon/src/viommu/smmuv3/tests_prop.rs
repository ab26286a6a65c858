//! Random guest memory, random register writes and random device transactions: the model
//! never panics and every call does bounded work (counted in guest-memory accesses).

use std::cell::Cell;

use proptest::prelude::*;

use super::regs::*;
use super::tests_support::CountingMemory;
use super::*;

const MEM_SIZE: usize = 0x10000;

/// Most guest-memory accesses one translation may make: STE (L1 + 8 words), CD through
/// stage 2 (two stage-2 walks + L1 + 4 words), a nested stage-1 walk (4 levels, each behind a
/// stage-2 walk), the final stage-2 walk and one event record.
const PER_TRANSLATION: u64 = 64;
/// Most accesses one command-consuming call may make: two reads and one MSI write per command.
const PER_COMMAND_CALL: u64 = 3 * COMMAND_BUDGET as u64 + 4;

const OFFSETS: [u64; 40] = [
    IDR0,
    IDR1,
    IDR5,
    CR0,
    CR0ACK,
    CR1,
    CR2,
    GBPA,
    IRQ_CTRL,
    GERROR,
    GERRORN,
    GERROR_IRQ_CFG0,
    GERROR_IRQ_CFG1,
    STRTAB_BASE,
    0x84,
    STRTAB_BASE_CFG,
    CMDQ_BASE,
    0x94,
    CMDQ_PROD,
    CMDQ_CONS,
    EVENTQ_BASE,
    EVENTQ_PROD,
    EVENTQ_CONS,
    0xA8,
    0xAC,
    EVENTQ_IRQ_CFG0,
    EVENTQ_IRQ_CFG1,
    PRIQ_BASE,
    PRIQ_PROD,
    PRIQ_CONS,
    PRIQ_IRQ_CFG0,
    0xC8,
    CMDQ_PROD,
    CMDQ_PROD,
    CR0,
    CR0,
    GERRORN,
    0x1000,
    0x1fffc,
    0x10000,
];

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        size: u8,
        value: u64,
    },
    Read {
        offset: u64,
        size: u8,
    },
    Dma {
        sid: u32,
        ssid: Option<u32>,
        address: u64,
        access: Access,
        translated: bool,
    },
    Ats {
        sid: u32,
        ssid: Option<u32>,
        address: u64,
        length: u64,
        max: usize,
        flags: u8,
    },
    Pri {
        sid: u32,
        ssid: Option<u32>,
        address: u64,
    },
    Ack {
        nth: usize,
    },
    Timeout,
    Process,
    Reset,
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..MEM_SIZE as u64,
        (0u64..MEM_SIZE as u64).prop_map(|a| a | 4),
        0u64..32,
        Just(0x1f),
        Just(0x1_0008),
    ]
}

fn sid() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..8, any::<u32>()]
}

fn ssid() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        (0u32..4).prop_map(Some),
        any::<u32>().prop_map(Some)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop::sample::select(OFFSETS.to_vec()), prop_oneof![Just(4u8), Just(8u8)], value())
            .prop_map(|(offset, size, value)| Op::Write { offset, size, value }),
        1 => (0u64..REGISTER_WINDOW_SIZE + 8, prop_oneof![Just(4u8), Just(8u8), Just(2u8)])
            .prop_map(|(offset, size)| Op::Read { offset, size }),
        1 => (0u64..REGISTER_WINDOW_SIZE, any::<u8>(), any::<u64>())
            .prop_map(|(offset, size, value)| Op::Write { offset, size, value }),
        3 => (sid(), ssid(), any::<u64>(), any::<(bool, bool, bool, bool)>()).prop_map(
            |(sid, ssid, address, (write, exec, privileged, translated))| Op::Dma {
                sid,
                ssid,
                address,
                access: Access { write, exec, privileged },
                translated,
            }
        ),
        2 => (sid(), ssid(), any::<u64>(), prop_oneof![0u64..0x10000, any::<u64>()], 0usize..600, any::<u8>())
            .prop_map(|(sid, ssid, address, length, max, flags)| Op::Ats { sid, ssid, address, length, max, flags }),
        1 => (sid(), ssid(), any::<u64>()).prop_map(|(sid, ssid, address)| Op::Pri { sid, ssid, address }),
        1 => (0usize..8).prop_map(|nth| Op::Ack { nth }),
        1 => Just(Op::Timeout),
        1 => Just(Op::Process),
        1 => Just(Op::Reset),
    ]
}

fn props() -> impl Strategy<Value = Smmuv3Properties> {
    (any::<[bool; 8]>(), 0u8..=20, 1u8..=32, 0u8..=12).prop_map(|(b, ssid_bits, sid_bits, q)| {
        let stage1 = b[0] || ssid_bits > 0;
        let p = Smmuv3Properties {
            stage1,
            stage2: b[1] || !stage1,
            ats: b[2],
            pri: b[3],
            ril: b[4],
            ssid_bits,
            sid_bits,
            gran16k: b[5],
            gran64k: b[6],
            two_level_stream_table: b[7],
            cmdq_log2: q,
            eventq_log2: q,
            priq_log2: q,
            ..Smmuv3Properties::default()
        };
        assert!(p.validate().is_ok());
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn random_memory_and_registers_never_panic_and_stay_bounded(
        bytes in prop::collection::vec(any::<u8>(), MEM_SIZE),
        props in props(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mem = VecMemory::from_bytes(0, bytes);
        let counting = CountingMemory { inner: &mem, accesses: Cell::new(0) };
        let mut smmu = Smmuv3::new(props).unwrap();
        let mut atc_ids = Vec::new();
        for op in ops {
            counting.accesses.set(0);
            let bound = match op {
                Op::Write { offset, size, value } => {
                    smmu.mmio_write(&counting, offset, size, value);
                    PER_COMMAND_CALL
                }
                Op::Read { offset, size } => {
                    smmu.mmio_read(offset, size);
                    0
                }
                Op::Dma { sid, ssid, address, access, translated } => {
                    let req = DmaRequest { sid, ssid, address, access };
                    let r = if translated {
                        smmu.translated_dma(&counting, &req)
                    } else {
                        smmu.translate_dma(&counting, &req)
                    };
                    if let Ok(t) = r {
                        prop_assert!(t.contiguous >= 1);
                    }
                    PER_TRANSLATION
                }
                Op::Ats { sid, ssid, address, length, max, flags } => {
                    let req = AtsRequest {
                        sid,
                        ssid,
                        address,
                        length,
                        no_write: flags & 1 != 0,
                        exec: flags & 2 != 0,
                        privileged: flags & 4 != 0,
                    };
                    match smmu.translate_ats(&counting, &req, max) {
                        Ok(entries) => {
                            prop_assert!(entries.len() <= max.min(MAX_ATS_ENTRIES));
                            let mut next = None;
                            for e in &entries {
                                prop_assert!(e.size_log2 >= 12 && e.size_log2 < 64);
                                let size = 1u64 << e.size_log2;
                                prop_assert_eq!(e.untranslated % size, 0, "naturally aligned");
                                prop_assert_eq!(e.translated % size, 0, "naturally aligned");
                                prop_assert!(!e.global, "Global is never set");
                                prop_assert!(!e.x || e.r, "Exe implies R");
                                if let Some(n) = next {
                                    prop_assert_eq!(e.untranslated, n, "consecutive ranges");
                                }
                                next = e.untranslated.checked_add(size);
                            }
                            PER_TRANSLATION * (entries.len() as u64 + 1)
                        }
                        Err(_) => PER_TRANSLATION,
                    }
                }
                Op::Pri { sid, ssid, address } => {
                    let req = PageRequest {
                        sid, ssid, address, prgi: 1, last: true, read: true, write: false,
                        exec: false, privileged: false,
                    };
                    let _ = smmu.page_request(&counting, &req);
                    2
                }
                Op::Ack { nth } => {
                    if !atc_ids.is_empty() {
                        let id = atc_ids.remove(nth % atc_ids.len());
                        smmu.ack_atc_invalidation(&counting, id);
                    }
                    PER_COMMAND_CALL
                }
                Op::Timeout => {
                    smmu.atc_invalidation_timeout();
                    0
                }
                Op::Process => {
                    smmu.process_commands(&counting);
                    PER_COMMAND_CALL
                }
                Op::Reset => {
                    smmu.reset();
                    atc_ids.clear();
                    0
                }
            };
            prop_assert!(counting.accesses.get() <= bound, "{} accesses > bound {}", counting.accesses.get(), bound);
            for out in smmu.take_outputs() {
                if let Smmuv3Output::AtcInvalidate(a) = out {
                    prop_assert!(a.size_log2 >= 12 && a.size_log2 <= 64);
                    atc_ids.push(a.id);
                }
            }
            prop_assert!(smmu.outstanding_atc_invalidations() <= MAX_OUTSTANDING_ATC_INVALIDATIONS);
            prop_assert!(smmu.tlb_entries() <= 512);
        }
    }

    #[test]
    fn random_command_queue_contents(
        cmds in prop::collection::vec((any::<u8>(), any::<u64>(), any::<u64>()), 1..1024),
    ) {
        // A full 1024-entry queue of random (mostly opcode-valid) commands: each PROD write
        // consumes at most COMMAND_BUDGET and the queue either drains, waits, or errors.
        let mem = VecMemory::new(0, MEM_SIZE + 0x4000);
        for (i, (op, dw0, dw1)) in cmds.iter().enumerate() {
            let dw0 = dw0 & !0xff | u64::from(op % 0x48);
            mem.write_u64(0x4000 + i as u64 * 16, dw0).unwrap();
            mem.write_u64(0x4000 + i as u64 * 16 + 8, *dw1).unwrap();
        }
        let counting = CountingMemory { inner: &mem, accesses: Cell::new(0) };
        let mut smmu = Smmuv3::new(Smmuv3Properties::default()).unwrap();
        smmu.mmio_write(&counting, CMDQ_BASE, 8, 0x4000 | 10);
        smmu.mmio_write(&counting, CR0, 4, u64::from(CR0_CMDQEN | CR0_SMMUEN));
        counting.accesses.set(0);
        smmu.mmio_write(&counting, CMDQ_PROD, 4, cmds.len() as u64);
        prop_assert!(counting.accesses.get() <= PER_COMMAND_CALL);
        let cons = smmu.mmio_read(CMDQ_CONS, 4) as u32 & 0xfffff;
        let stopped = smmu.waiting_for_atc()
            || (smmu.mmio_read(GERROR, 4) ^ smmu.mmio_read(GERRORN, 4)) & 1 == 1
            || smmu.take_outputs().len() >= OUTPUT_CAPACITY;
        prop_assert!(cons as usize == cmds.len() || stopped);
    }
}
