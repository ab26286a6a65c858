//! Test scaffolding: a guest-memory allocator, translation-table and STE/CD builders, command
//! encoders, and a driver that programs the model the way Linux's arm-smmu-v3 does.

use super::events::Event;
use super::memory::{GuestMemory, GuestMemoryError, VecMemory};
use super::regs::*;
use super::{Smmuv3, Smmuv3Output, Smmuv3Properties};
use std::cell::Cell;

/// Guest RAM used by the tests.
pub const RAM_BASE: u64 = 0x8000_0000;
pub const RAM_SIZE: usize = 16 << 20;

// Stage-1 leaf attribute bits.
pub const AF: u64 = 1 << 10;
pub const AP_EL0: u64 = 1 << 6;
pub const AP_RO: u64 = 1 << 7;
pub const NG: u64 = 1 << 11;
pub const PXN: u64 = 1 << 53;
pub const UXN: u64 = 1 << 54;
// Stage-1 table attribute bits.
pub const PXN_TABLE: u64 = 1 << 59;
pub const UXN_TABLE: u64 = 1 << 60;
pub const AP_TABLE_NO_EL0: u64 = 1 << 61;
pub const AP_TABLE_RO: u64 = 1 << 62;
// Stage-2 leaf attribute bits.
pub const S2AP_R: u64 = 1 << 6;
pub const S2AP_W: u64 = 1 << 7;
pub const S2_XN: u64 = 1 << 54;

/// Guest memory with a bump allocator.
pub struct Guest {
    pub mem: VecMemory,
    next: Cell<u64>,
}

impl Guest {
    pub fn new() -> Self {
        Guest {
            mem: VecMemory::new(RAM_BASE, RAM_SIZE),
            next: Cell::new(RAM_BASE),
        }
    }

    /// Zeroed, `align`-aligned guest memory.
    pub fn alloc(&self, size: u64, align: u64) -> u64 {
        let addr = self.next.get().next_multiple_of(align);
        self.next.set(addr + size);
        assert!(
            addr + size <= RAM_BASE + RAM_SIZE as u64,
            "test guest RAM exhausted"
        );
        addr
    }

    pub fn w64(&self, addr: u64, v: u64) {
        self.mem.write_u64(addr, v).unwrap();
    }

    pub fn r64(&self, addr: u64) -> u64 {
        self.mem.read_u64(addr).unwrap()
    }

    pub fn r32(&self, addr: u64) -> u32 {
        self.mem.read_u32(addr).unwrap()
    }
}

/// An AArch64 translation table tree in guest memory.
pub struct PageTables {
    pub granule_log2: u32,
    pub input_bits: u32,
    pub start_level: u32,
    pub root: u64,
}

impl PageTables {
    /// A tree for `input_bits` starting at `start_level` (for stage 2 possibly with
    /// concatenated start tables).
    pub fn new(guest: &Guest, granule_log2: u32, input_bits: u32, start_level: u32) -> Self {
        let t = PageTables {
            granule_log2,
            input_bits,
            start_level,
            root: 0,
        };
        let bits = input_bits - t.shift(start_level);
        let bytes = (8u64 << bits).max(64);
        PageTables {
            root: guest.alloc(bytes, bytes),
            ..t
        }
    }

    /// Stage-1 layout for a TxSZ (start level as the architecture derives it).
    pub fn stage1(guest: &Guest, granule_log2: u32, tsz: u32) -> Self {
        let input = 64 - tsz;
        let stride = granule_log2 - 3;
        let levels = (input - granule_log2).div_ceil(stride);
        Self::new(guest, granule_log2, input, 4 - levels)
    }

    pub fn shift(&self, level: u32) -> u32 {
        self.granule_log2 + (3 - level) * (self.granule_log2 - 3)
    }

    fn index(&self, va: u64, level: u32) -> u64 {
        let bits = if level == self.start_level {
            self.input_bits - self.shift(level)
        } else {
            self.granule_log2 - 3
        };
        (va >> self.shift(level)) & ((1 << bits) - 1)
    }

    /// Address of the descriptor for `va` at `level`, creating tables on the way with
    /// `table_attrs` on every table descriptor.
    pub fn slot(&self, guest: &Guest, va: u64, level: u32, table_attrs: u64) -> u64 {
        let mut table = self.root;
        for l in self.start_level..level {
            let slot = table + self.index(va, l) * 8;
            let desc = guest.r64(slot);
            let next = if desc & 3 == 3 {
                desc & 0x000f_ffff_ffff_f000
            } else {
                let t = guest.alloc(1 << self.granule_log2, 1 << self.granule_log2);
                guest.w64(slot, t | 3 | table_attrs);
                t
            };
            table = next;
        }
        table + self.index(va, level) * 8
    }

    /// Map `va` → `pa` with a leaf of `2^size_log2` bytes and `attrs`.
    pub fn map(&self, guest: &Guest, va: u64, pa: u64, size_log2: u32, attrs: u64) {
        self.map_with(guest, va, pa, size_log2, attrs, 0);
    }

    pub fn map_with(
        &self,
        guest: &Guest,
        va: u64,
        pa: u64,
        size_log2: u32,
        attrs: u64,
        table_attrs: u64,
    ) {
        let level = (0..=3)
            .find(|&l| self.shift(l) == size_log2)
            .expect("size is a level size");
        let slot = self.slot(guest, va, level, table_attrs);
        let kind = if level == 3 { 3 } else { 1 };
        guest.w64(slot, pa | attrs | kind);
    }

    /// Write a raw descriptor for `va` at `level`.
    pub fn set_raw(&self, guest: &Guest, va: u64, level: u32, desc: u64) {
        let slot = self.slot(guest, va, level, 0);
        guest.w64(slot, desc);
    }

    /// Clear the leaf for `va` at `level`.
    pub fn unmap(&self, guest: &Guest, va: u64, level: u32) {
        self.set_raw(guest, va, level, 0);
    }
}

/// TG0 encoding of a granule.
pub fn tg0(granule_log2: u32) -> u64 {
    match granule_log2 {
        12 => 0,
        16 => 1,
        _ => 2,
    }
}

/// Stage-2 TG encoding (same as TG0).
pub fn s2tg(granule_log2: u32) -> u64 {
    tg0(granule_log2)
}

/// A Linux-style stage-1 CD: V, AA64, R, A, EPD1, IPS, ASID, TTB0.
pub fn cd_words(pt: &PageTables, ips: u64, asid: u16) -> [u64; 8] {
    let d0 = u64::from(64 - pt.input_bits)
        | tg0(pt.granule_log2) << 6
        | 1 << 30 // EPD1
        | 1 << 31 // V
        | ips << 32
        | 1 << 41 // AA64
        | 1 << 45 // R
        | 1 << 46 // A
        | u64::from(asid) << 48;
    [d0, pt.root, 0, 0, 0, 0, 0, 0]
}

pub const STE_CFG_ABORT: u64 = 0;
pub const STE_CFG_BYPASS: u64 = 4;
pub const STE_CFG_S1: u64 = 5;
pub const STE_CFG_S2: u64 = 6;
pub const STE_CFG_NESTED: u64 = 7;

/// STE dw0/dw1 for a stage-1 stream: `fmt` S1Fmt, `cd_max` SSID bits, `dss` S1DSS, `eats`.
pub fn ste_s1(ctx: u64, fmt: u64, cd_max: u64, dss: u64, eats: u64) -> [u64; 8] {
    [
        1 | STE_CFG_S1 << 1 | fmt << 4 | ctx | cd_max << 59,
        dss | eats << 28,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// STE words for stage 2: VMID, S2T0SZ from `pt`, SL0, TG, PS, AA64, S2R, S2TTB.
pub fn s2_words(pt: &PageTables, sl0: u64, ps: u64, vmid: u16) -> (u64, u64) {
    let vtcr = u64::from(64 - pt.input_bits) | sl0 << 6 | s2tg(pt.granule_log2) << 14 | ps << 16;
    (u64::from(vmid) | vtcr << 32 | 1 << 51 | 1 << 58, pt.root)
}

/// SL0 for a stage-2 start level.
pub fn sl0_for(granule_log2: u32, start_level: u32) -> u64 {
    match (granule_log2, start_level) {
        (12, 2) => 0,
        (12, 1) => 1,
        (12, 0) => 2,
        (_, 3) => 0,
        (_, 2) => 1,
        (14, 1) => 2,
        _ => 3,
    }
}

pub mod cmd {
    //! Command encoders (the Linux `arm_smmu_cmdq_build_cmd` field layout).
    use super::super::opcode::*;

    pub fn cfgi_ste(sid: u32) -> [u64; 2] {
        [u64::from(CFGI_STE) | u64::from(sid) << 32, 1]
    }
    pub fn cfgi_all() -> [u64; 2] {
        [u64::from(CFGI_STE_RANGE), 31]
    }
    pub fn cfgi_cd(sid: u32, ssid: u32) -> [u64; 2] {
        [
            u64::from(CFGI_CD) | u64::from(ssid) << 12 | u64::from(sid) << 32,
            1,
        ]
    }
    pub fn cfgi_cd_all(sid: u32) -> [u64; 2] {
        [u64::from(CFGI_CD_ALL) | u64::from(sid) << 32, 0]
    }
    pub fn tlbi_nsnh_all() -> [u64; 2] {
        [u64::from(TLBI_NSNH_ALL), 0]
    }
    pub fn tlbi_nh_asid(asid: u16) -> [u64; 2] {
        [u64::from(TLBI_NH_ASID) | u64::from(asid) << 48, 0]
    }
    pub fn tlbi_nh_va(asid: u16, va: u64) -> [u64; 2] {
        [
            u64::from(TLBI_NH_VA) | u64::from(asid) << 48,
            va & !0xfff | 1,
        ]
    }
    pub fn tlbi_nh_va_range(asid: u16, va: u64, tg: u64, num: u64, scale: u64) -> [u64; 2] {
        [
            u64::from(TLBI_NH_VA) | num << 12 | scale << 20 | u64::from(asid) << 48,
            va & !0xfff | tg << 10,
        ]
    }
    pub fn tlbi_nh_vaa(va: u64) -> [u64; 2] {
        [u64::from(TLBI_NH_VAA), va & !0xfff]
    }
    pub fn tlbi_nh_all() -> [u64; 2] {
        [u64::from(TLBI_NH_ALL), 0]
    }
    pub fn tlbi_s12_vmall(vmid: u16) -> [u64; 2] {
        [u64::from(TLBI_S12_VMALL) | u64::from(vmid) << 32, 0]
    }
    pub fn tlbi_s2_ipa(vmid: u16, ipa: u64) -> [u64; 2] {
        [u64::from(TLBI_S2_IPA) | u64::from(vmid) << 32, ipa & !0xfff]
    }
    pub fn atc_inv(sid: u32, ssid: Option<u32>, addr: u64, size: u64) -> [u64; 2] {
        let ssv = ssid.map_or(0, |s| 1 << 11 | u64::from(s) << 12);
        [
            u64::from(ATC_INV) | ssv | u64::from(sid) << 32,
            addr & !0xfff | size,
        ]
    }
    pub fn pri_resp(sid: u32, ssid: u32, prgi: u16, resp: u64) -> [u64; 2] {
        [
            u64::from(PRI_RESP) | 1 << 11 | u64::from(ssid) << 12 | u64::from(sid) << 32,
            u64::from(prgi) | resp << 12,
        ]
    }
    /// CMD_SYNC with CS = IRQ and an MSI write of `data` to `addr` (Linux MSIPOLL).
    pub fn sync_msi(addr: u64, data: u32) -> [u64; 2] {
        [u64::from(SYNC) | 1 << 12 | u64::from(data) << 32, addr]
    }
    pub fn sync_none() -> [u64; 2] {
        [u64::from(SYNC), 0]
    }
    pub fn sync_sev() -> [u64; 2] {
        [u64::from(SYNC) | 2 << 12, 0]
    }
}

/// How the driver lays out the stream table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTable {
    Linear,
    TwoLevel,
}

/// The model as a Linux guest drives it.
pub struct Driver {
    pub smmu: Smmuv3,
    pub guest: Guest,
    pub cmdq: u64,
    pub cmdq_log2: u32,
    pub evtq: u64,
    pub evtq_log2: u32,
    pub priq: u64,
    pub strtab: u64,
    pub st: StreamTable,
    /// PASID the walk tests send with their transactions (privilege and execute only count
    /// with a PASID).
    pub pasid: Option<u32>,
    prod: u32,
    evt_cons: u32,
}

pub const SPLIT: u32 = 8;

impl Driver {
    pub fn new(props: Smmuv3Properties, st: StreamTable) -> Self {
        Self::with_queues(props, st, 8, 8)
    }

    /// Probe and reset in the order of `arm_smmu_device_hw_probe` + `arm_smmu_device_reset`.
    pub fn with_queues(
        props: Smmuv3Properties,
        st: StreamTable,
        cmdq_log2: u32,
        evtq_log2: u32,
    ) -> Self {
        let guest = Guest::new();
        let smmu = Smmuv3::new(props).unwrap();
        let mut d = Driver {
            smmu,
            guest,
            cmdq: 0,
            cmdq_log2,
            evtq: 0,
            evtq_log2,
            priq: 0,
            strtab: 0,
            st,
            pasid: None,
            prod: 0,
            evt_cons: 0,
        };
        // Probe: the features Linux requires.
        let idr0 = d.r32(IDR0);
        assert_eq!(idr0 >> 2 & 3, 2, "AArch64 tables");
        let idr1 = d.r32(IDR1);
        assert_eq!(idr1 >> 28 & 7, 0, "no preset tables/queues, REL clear");
        let sid_bits = idr1 & 0x3f;
        let cmdq_log2 = cmdq_log2.min(idr1 >> 21 & 0x1f);
        let evtq_log2 = evtq_log2.min(idr1 >> 16 & 0x1f);
        d.cmdq_log2 = cmdq_log2;
        d.evtq_log2 = evtq_log2;
        // Allocate queues and the stream table.
        d.cmdq = d.guest.alloc(16 << cmdq_log2, 16 << cmdq_log2);
        d.evtq = d.guest.alloc(32 << evtq_log2, 32 << evtq_log2);
        d.priq = d.guest.alloc(16 << 8, 16 << 8);
        let (base_cfg, strtab) = match st {
            StreamTable::Linear => {
                let log2 = sid_bits.min(12);
                (log2, d.guest.alloc(64 << log2, 64 << log2))
            }
            StreamTable::TwoLevel => {
                let l1 = 1u64 << (sid_bits - SPLIT);
                (sid_bits | SPLIT << 6 | 1 << 16, d.guest.alloc(l1 * 8, 64))
            }
        };
        d.strtab = strtab;
        // Reset: disable, CR1/CR2, tables, command queue, CMDQEN.
        d.w32(CR0, 0);
        assert_eq!(d.r32(CR0ACK), 0);
        d.w32(CR1, 0x3f);
        d.w32(CR2, 0b110);
        d.w64(STRTAB_BASE, strtab | 1 << 62);
        d.w32(STRTAB_BASE_CFG, base_cfg);
        d.w64(CMDQ_BASE, d.cmdq | 1 << 62 | u64::from(cmdq_log2));
        d.w32(CMDQ_PROD, 0);
        d.w32(CMDQ_CONS, 0);
        d.enable(CR0_CMDQEN);
        d.submit(&[cmd::cfgi_all()]);
        d.sync();
        d.submit(&[cmd::tlbi_nsnh_all()]);
        d.sync();
        // Event queue and PRI queue.
        d.w64(EVENTQ_BASE, d.evtq | 1 << 62 | u64::from(evtq_log2));
        d.w32(EVENTQ_PROD, 0);
        d.w32(EVENTQ_CONS, 0);
        d.enable(CR0_EVENTQEN);
        if idr0 >> 16 & 1 == 1 {
            d.w64(PRIQ_BASE, d.priq | 8);
            d.w32(PRIQ_PROD, 0);
            d.w32(PRIQ_CONS, 0);
            d.enable(CR0_PRIQEN);
        }
        if idr0 >> 10 & 1 == 1 {
            d.enable(CR0_ATSCHK);
        }
        d.w32(IRQ_CTRL, 0);
        d.w32(
            IRQ_CTRL,
            IRQ_CTRL_GERROR_IRQEN | IRQ_CTRL_EVENTQ_IRQEN | IRQ_CTRL_PRIQ_IRQEN,
        );
        assert_eq!(d.r32(IRQ_CTRLACK), 7);
        d.enable(CR0_SMMUEN);
        d
    }

    fn enable(&mut self, bit: u32) {
        let v = self.r32(CR0) | bit;
        self.w32(CR0, v);
        assert_eq!(self.r32(CR0ACK), v, "CR0ACK follows CR0");
    }

    pub fn r32(&self, off: u64) -> u32 {
        self.smmu.mmio_read(off, 4) as u32
    }
    pub fn w32(&mut self, off: u64, v: u32) {
        self.smmu.mmio_write(&self.guest.mem, off, 4, u64::from(v));
    }
    pub fn w64(&mut self, off: u64, v: u64) {
        self.smmu.mmio_write(&self.guest.mem, off, 8, v);
    }

    /// Write commands at PROD and publish them.
    pub fn submit(&mut self, cmds: &[[u64; 2]]) -> u64 {
        let mut slot = 0;
        for c in cmds {
            let idx = u64::from(self.prod & ((1 << self.cmdq_log2) - 1));
            slot = self.cmdq + idx * 16;
            self.guest.w64(slot, c[0]);
            self.guest.w64(slot + 8, c[1]);
            self.prod = (self.prod + 1) & ((2 << self.cmdq_log2) - 1);
        }
        self.w32(CMDQ_PROD, self.prod);
        slot
    }

    /// Linux MSIPOLL CMD_SYNC: MSI data 0 to the SYNC's own slot. Returns the slot.
    pub fn submit_sync(&mut self) -> u64 {
        let idx = u64::from(self.prod & ((1 << self.cmdq_log2) - 1));
        let slot = self.cmdq + idx * 16;
        self.submit(&[cmd::sync_msi(slot, 0)])
    }

    /// Submit a SYNC and require it to complete at once.
    pub fn sync(&mut self) {
        if !self.smmu.properties().msi {
            // Linux without MSI polls CONS past a CS = NONE/SEV sync.
            self.submit(&[cmd::sync_none()]);
            assert_eq!(self.r32(CMDQ_CONS) & 0xfffff, self.prod, "queue consumed");
            return;
        }
        let slot = self.submit_sync();
        assert_eq!(
            self.guest.r32(slot),
            0,
            "CMD_SYNC completed (MSI wrote 0 over the command)"
        );
        assert_eq!(self.r32(CMDQ_CONS) & 0xfffff, self.prod, "queue consumed");
    }

    pub fn cons(&self) -> u32 {
        self.r32(CMDQ_CONS)
    }

    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Address of the STE for `sid`, allocating the level-2 table like
    /// `arm_smmu_init_l2_strtab` (SPAN = SPLIT + 1).
    pub fn ste_addr(&mut self, sid: u32) -> u64 {
        match self.st {
            StreamTable::Linear => self.strtab + u64::from(sid) * 64,
            StreamTable::TwoLevel => {
                let l1 = self.strtab + u64::from(sid >> SPLIT) * 8;
                let mut desc = self.guest.r64(l1);
                if desc & 0x1f == 0 {
                    let l2 = self.guest.alloc(64 << SPLIT, 64 << SPLIT);
                    desc = l2 | u64::from(SPLIT + 1);
                    self.guest.w64(l1, desc);
                }
                (desc & 0x000f_ffff_ffff_ffc0) + u64::from(sid & ((1 << SPLIT) - 1)) * 64
            }
        }
    }

    /// Write an STE, then CFGI_STE + SYNC.
    pub fn install_ste(&mut self, sid: u32, words: [u64; 8]) {
        let addr = self.ste_addr(sid);
        // Linux writes dw1.. first and the V bit last.
        for (i, w) in words.iter().enumerate().skip(1) {
            self.guest.w64(addr + 8 * i as u64, *w);
        }
        self.guest.w64(addr, words[0]);
        self.submit(&[cmd::cfgi_ste(sid)]);
        self.sync();
    }

    /// New events since the last call (advancing EVENTQ_CONS).
    pub fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let mask = (2u32 << self.evtq_log2) - 1;
        let prod = self.r32(EVENTQ_PROD);
        while self.evt_cons & mask != prod & mask {
            let idx = u64::from(self.evt_cons & ((1 << self.evtq_log2) - 1));
            let mut rec = [0u8; 32];
            self.guest.mem.read(self.evtq + idx * 32, &mut rec).unwrap();
            out.push(Event::decode(&rec).expect("known event type"));
            self.evt_cons = (self.evt_cons + 1) & mask;
        }
        let ovf = prod & Q_OVFLG;
        self.w32(EVENTQ_CONS, self.evt_cons | ovf);
        out
    }

    pub fn outputs(&mut self) -> Vec<Smmuv3Output> {
        self.smmu.take_outputs()
    }
}

/// A memory wrapper counting accesses, for the bounded-work checks.
pub struct CountingMemory<'a> {
    pub inner: &'a VecMemory,
    pub accesses: Cell<u64>,
}

impl GuestMemory for CountingMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.accesses.set(self.accesses.get() + 1);
        self.inner.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.accesses.set(self.accesses.get() + 1);
        self.inner.write(addr, data)
    }
}

/// A context-descriptor table laid out like Linux `arm_smmu_alloc_cd_tables`.
#[derive(Debug, Clone, Copy)]
pub struct CdTable {
    pub base: u64,
    /// S1Fmt.
    pub fmt: u64,
}

/// Linux's CTXDESC_SPLIT (64 KiB leaf tables).
pub const CD_SPLIT: u32 = 10;

impl Driver {
    /// Linear when it fits one leaf (2^cd_max <= 1024), else 2-level with 64 KiB leaves.
    pub fn alloc_cd_table(&mut self, cd_max: u32) -> CdTable {
        if cd_max <= CD_SPLIT {
            let bytes = 64u64 << cd_max;
            CdTable {
                base: self.guest.alloc(bytes, bytes.max(64)),
                fmt: 0,
            }
        } else {
            let l1 = 8u64 << (cd_max - CD_SPLIT);
            CdTable {
                base: self.guest.alloc(l1, l1.max(64)),
                fmt: 2,
            }
        }
    }

    pub fn cd_addr(&mut self, t: &CdTable, ssid: u32) -> u64 {
        if t.fmt == 0 {
            return t.base + u64::from(ssid) * 64;
        }
        let l1 = t.base + u64::from(ssid >> CD_SPLIT) * 8;
        let mut desc = self.guest.r64(l1);
        if desc & 1 == 0 {
            let l2 = self.guest.alloc(64 << CD_SPLIT, 64 << CD_SPLIT);
            desc = l2 | 1;
            self.guest.w64(l1, desc);
        }
        (desc & 0x000f_ffff_ffff_f000) + u64::from(ssid & ((1 << CD_SPLIT) - 1)) * 64
    }

    /// Write a CD (V last), then CFGI_CD + SYNC.
    pub fn install_cd(&mut self, t: &CdTable, sid: u32, ssid: u32, words: [u64; 8]) {
        let addr = self.cd_addr(t, ssid);
        for (i, w) in words.iter().enumerate().skip(1) {
            self.guest.w64(addr + 8 * i as u64, *w);
        }
        self.guest.w64(addr, words[0]);
        self.submit(&[cmd::cfgi_cd(sid, ssid)]);
        self.sync();
    }

    /// A stage-1 stream `sid` with a 4 KiB / 48-bit address space per SSID, the way Linux
    /// sets up an SVA-capable master: CD table with `cd_max` SSID bits, S1DSS = SSID0,
    /// EATS = 1. Returns the CD table and the page tables of SSID 0.
    pub fn s1_stream(&mut self, sid: u32, cd_max: u32) -> (CdTable, PageTables) {
        let t = self.alloc_cd_table(cd_max);
        let pt = PageTables::stage1(&self.guest, 12, 16);
        self.install_cd(&t, sid, 0, cd_words(&pt, 5, 1));
        self.install_ste(sid, ste_s1(t.base, t.fmt, u64::from(cd_max), 2, 1));
        (t, pt)
    }
}
