//! Test harness: builds VT-d structures in a [`VecGuestMemory`] and programs the model the
//! way the Linux intel-iommu driver does (register order, descriptor encodings from Linux
//! `iommu.h`: `QI_*` macros).

use super::*;

/// Guest memory size of the harness (16 MiB at guest-physical 0).
pub const MEM_SIZE: usize = 16 << 20;

/// Page-table entry bits used by the tests.
pub mod pte {
    /// First stage: present.
    pub const P: u64 = 1;
    /// First stage: writable.
    pub const RW: u64 = 1 << 1;
    /// First stage: user.
    pub const US: u64 = 1 << 2;
    /// First stage: accessed.
    pub const A: u64 = 1 << 5;
    /// First stage: dirty.
    pub const D: u64 = 1 << 6;
    /// Page size (both stages).
    pub const PS: u64 = 1 << 7;
    /// First stage: global.
    pub const G: u64 = 1 << 8;
    /// First stage: execute disable.
    pub const XD: u64 = 1 << 63;
    /// Second stage: read.
    pub const R: u64 = 1;
    /// Second stage: write.
    pub const W: u64 = 1 << 1;
    /// Second stage: execute.
    pub const X: u64 = 1 << 2;
    /// Second stage: accessed (SSADE).
    pub const SA: u64 = 1 << 8;
    /// Second stage: dirty (SSADE).
    pub const SD: u64 = 1 << 9;
}

/// PASID-entry PGTT values.
pub const PGTT_FS: u64 = 1;
pub const PGTT_SS: u64 = 2;
pub const PGTT_NESTED: u64 = 3;
pub const PGTT_PT: u64 = 4;

/// Guest memory with a bump allocator for table pages.
pub struct Tables {
    pub mem: VecGuestMemory,
    next: u64,
}

impl Tables {
    pub fn new() -> Self {
        Self {
            mem: VecGuestMemory::new(0, MEM_SIZE),
            next: 0x10_0000,
        }
    }

    /// A fresh zeroed 4 KiB page.
    pub fn page(&mut self) -> u64 {
        let p = self.next;
        self.next += 0x1000;
        assert!(
            self.next as usize <= MEM_SIZE,
            "harness out of table memory"
        );
        p
    }

    pub fn put(&mut self, addr: u64, v: u64) {
        self.mem
            .put_u64(addr, v)
            .expect("harness write inside memory");
    }

    pub fn get(&self, addr: u64) -> u64 {
        self.mem.get_u64(addr).expect("harness read inside memory")
    }

    /// Map `iova` in a radix table (either stage) with a leaf at `leaf_level` (1 = 4 KiB,
    /// 2 = 2 MiB, 3 = 1 GiB). Intermediate entries get `table_flags`; the leaf is `leaf`
    /// (output address | flags; PS is added for large leaves). Returns the leaf entry address.
    /// `translate` maps table addresses written into entries (identity unless nested tests
    /// place first-stage tables behind a second stage).
    pub fn map(
        &mut self,
        root: u64,
        levels: u8,
        iova: u64,
        leaf_level: u8,
        leaf: u64,
        table_flags: u64,
    ) -> u64 {
        let mut table = root;
        let mut level = levels;
        loop {
            let shift = 12 + 9 * (u64::from(level) - 1);
            let at = table + ((iova >> shift) & 0x1ff) * 8;
            if level == leaf_level {
                let ps = if level > 1 { pte::PS } else { 0 };
                self.put(at, leaf | ps);
                return at;
            }
            let e = self.get(at);
            table = if e & 0x3 != 0 && e & 0x000f_ffff_ffff_f000 != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let p = self.page();
                self.put(at, p | table_flags);
                p
            };
            level -= 1;
        }
    }
}

/// A scalable-mode PASID entry description.
#[derive(Debug, Clone, Copy)]
pub struct PasidEntry {
    pub pgtt: u64,
    pub did: u16,
    pub fs_root: u64,
    pub fs_5level: bool,
    pub ss_root: u64,
    /// Second-stage AW field (1 = 3-level, 2 = 4-level, 3 = 5-level).
    pub ss_aw: u64,
    pub sre: bool,
    pub ere: bool,
    pub wpe: bool,
    pub ssee: bool,
    pub ssade: bool,
    pub fpd: bool,
}

impl PasidEntry {
    pub fn first_stage(did: u16, fs_root: u64) -> Self {
        Self {
            pgtt: PGTT_FS,
            did,
            fs_root,
            fs_5level: false,
            ss_root: 0,
            ss_aw: 2,
            sre: false,
            ere: false,
            wpe: false,
            ssee: false,
            ssade: false,
            fpd: false,
        }
    }

    pub fn second_stage(did: u16, ss_root: u64, ss_aw: u64) -> Self {
        Self {
            pgtt: PGTT_SS,
            ss_root,
            ss_aw,
            ..Self::first_stage(did, 0)
        }
    }

    pub fn encode(&self) -> [u64; 8] {
        let mut q = [0u64; 8];
        q[0] = 1 | (u64::from(self.fpd) << 1) | (self.ss_aw << 2) | (u64::from(self.ssee) << 5);
        q[0] |= (self.pgtt << 6) | (u64::from(self.ssade) << 9) | self.ss_root;
        q[1] = u64::from(self.did);
        q[2] = u64::from(self.sre) | (u64::from(self.ere) << 1) | (u64::from(self.fs_5level) << 2);
        q[2] |= (u64::from(self.wpe) << 4) | self.fs_root;
        q
    }
}

/// Scalable context entry options.
#[derive(Debug, Clone, Copy)]
pub struct ScalableCtx {
    pub dte: bool,
    pub paside: bool,
    pub rid_pasid: u32,
    pub rid_priv: bool,
    pub fpd: bool,
    /// PDTS: directory has 2^(pdts+7) entries.
    pub pdts: u64,
}

impl Default for ScalableCtx {
    fn default() -> Self {
        Self {
            dte: true,
            paside: true,
            rid_pasid: 0,
            rid_priv: false,
            fpd: false,
            pdts: 7,
        }
    }
}

/// The guest: memory, tables and the driver-side view of the invalidation queue.
pub struct Guest {
    pub vtd: Vtd,
    pub t: Tables,
    pub root: u64,
    /// Context table per bus (scalable: lower half only in these tests, devfn < 128 or upper).
    ctx_tables: std::collections::HashMap<(u8, bool), u64>,
    pasid_dirs: std::collections::HashMap<u16, u64>,
    pub queue_base: u64,
    pub tail: u64,
    pub wide: bool,
    /// The shadow of persistent GCMD bits, as Linux keeps `iommu->gcmd`.
    gcmd: u32,
    pub status_page: u64,
}

/// MSI address/data the tests program for the fault and completion events.
pub const FAULT_MSI: (u32, u32) = (0xfee0_1000, 0x41);
pub const COMPLETION_MSI: (u32, u32) = (0xfee0_2000, 0x42);

impl Guest {
    /// Allocate the root table and invalidation queue; program nothing yet.
    pub fn new(cfg: VtdConfig) -> Self {
        let vtd = Vtd::new(cfg).expect("valid test config");
        let mut t = Tables::new();
        let root = t.page();
        // Two pages: Linux uses QS=1 (8 KiB) with 256-bit descriptors.
        let queue_base = t.page();
        t.page();
        let status_page = t.page();
        let wide = vtd.config().scalable_mode;
        Self {
            vtd,
            t,
            root,
            ctx_tables: Default::default(),
            pasid_dirs: Default::default(),
            queue_base,
            tail: 0,
            wide,
            gcmd: 0,
            status_page,
        }
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.vtd
            .write32(&mut self.t.mem, off, v)
            .expect("aligned register write");
    }

    pub fn w64(&mut self, off: u64, v: u64) {
        self.vtd
            .write64(&mut self.t.mem, off, v)
            .expect("aligned register write");
    }

    fn ctx_table(&mut self, bus: u8, upper: bool) -> u64 {
        if let Some(&t) = self.ctx_tables.get(&(bus, upper)) {
            return t;
        }
        let page = self.t.page();
        let at = self.root + u64::from(bus) * 16 + if upper { 8 } else { 0 };
        self.t.put(at, page | 1);
        self.ctx_tables.insert((bus, upper), page);
        page
    }

    /// Legacy context entry for `sid`: TT, AW, DID, second-stage root.
    pub fn legacy_context(&mut self, sid: u16, tt: u64, aw: u64, did: u16, ss_root: u64) {
        let table = self.ctx_table((sid >> 8) as u8, false);
        let at = table + u64::from(sid & 0xff) * 16;
        self.t.put(at, 1 | (tt << 2) | ss_root);
        self.t.put(at + 8, aw | (u64::from(did) << 8));
    }

    /// Scalable context entry for `sid` with its PASID directory (allocated once).
    pub fn scalable_context(&mut self, sid: u16, c: ScalableCtx) -> u64 {
        let devfn = sid & 0xff;
        let table = self.ctx_table((sid >> 8) as u8, devfn >= 128);
        let dir = match self.pasid_dirs.get(&sid) {
            Some(&d) => d,
            None => {
                let d = self.t.page();
                self.pasid_dirs.insert(sid, d);
                d
            }
        };
        let at = table + u64::from(devfn & 0x7f) * 32;
        let q0 = 1
            | (u64::from(c.fpd) << 1)
            | (u64::from(c.dte) << 2)
            | (u64::from(c.paside) << 3)
            | (c.pdts << 9)
            | dir;
        self.t.put(at, q0);
        self.t.put(
            at + 8,
            u64::from(c.rid_pasid) | (u64::from(c.rid_priv) << 20),
        );
        dir
    }

    /// PASID entry for (`sid`, `pasid`); the scalable context must exist.
    pub fn pasid_entry(&mut self, sid: u16, pasid: u32, e: PasidEntry) -> u64 {
        let dir = self.pasid_dirs[&sid];
        let dir_at = dir + u64::from(pasid >> 6) * 8;
        let pde = self.t.get(dir_at);
        let table = if pde & 1 != 0 {
            pde & !0xfff
        } else {
            let p = self.t.page();
            self.t.put(dir_at, p | 1);
            p
        };
        let at = table + u64::from(pasid & 0x3f) * 64;
        for (i, q) in e.encode().iter().enumerate() {
            self.t.put(at + 8 * i as u64, *q);
        }
        at
    }

    fn gcmd(&mut self, bit: u32) {
        // Linux: writel(iommu->gcmd | cmd) for one-shot bits, `iommu->gcmd |= bit` for the
        // persistent ones, then polls GSTS for the status bit.
        let v = self.gcmd | bit;
        self.w32(GCMD, v);
        assert_eq!(
            self.vtd.read32(GSTS) & v,
            v,
            "GSTS did not acknowledge GCMD {v:#x}"
        );
    }

    /// Program the unit as Linux does: fault event MSI, root table (SRTP), queued
    /// invalidation, global context/IOTLB flush through the queue, then translation.
    pub fn enable(&mut self) {
        self.w32(FEDATA, FAULT_MSI.1);
        self.w32(FEADDR, FAULT_MSI.0);
        self.w32(FEUADDR, 0);
        self.w32(FECTL, 0);
        self.w32(IEDATA, COMPLETION_MSI.1);
        self.w32(IEADDR, COMPLETION_MSI.0);
        self.w32(IECTL, 0);
        // Queued invalidation: tail 0, queue address with DW for 256-bit descriptors, QIE.
        // Linux `__dmar_enable_qi`: writel(0, IQT); dmar_writeq(IQA, base | DW | QS).
        self.w32(IQT, 0);
        let dw_qs = if self.wide { IQA_DW | 1 } else { 0 };
        self.w64(IQA, self.queue_base | dw_qs);
        self.gcmd |= GCMD_QIE;
        self.gcmd(0);
        assert_ne!(self.vtd.read32(GSTS) & GCMD_QIE, 0);
        let ttm = if self.vtd.config().scalable_mode {
            1 << 10
        } else {
            0
        };
        self.w64(RTADDR, self.root | ttm);
        self.gcmd(GCMD_SRTP);
        // Global context-cache and IOTLB flush, then wait.
        self.submit(&[cc_global(), iotlb_global()]);
        self.wait_sync(1);
        self.gcmd |= GCMD_TE;
        self.gcmd(0);
        assert!(self.vtd.translation_enabled());
        self.vtd.take_events();
    }

    /// Write descriptors at the tail and move IQT (one register write, like `qi_submit_sync`).
    pub fn submit(&mut self, descs: &[[u64; 4]]) {
        let size = if self.wide { 32 } else { 16 };
        let entries = self.queue_entries();
        for d in descs {
            let at = self.queue_base + self.tail * size;
            let n = if self.wide { 4 } else { 2 };
            for (i, q) in d.iter().take(n).enumerate() {
                self.t.put(at + 8 * i as u64, *q);
            }
            self.tail = (self.tail + 1) % entries;
        }
        // Linux `qi_submit_sync`: writel(free_head << shift, IQT) — a 32-bit write.
        let v = self.tail * size;
        self.w32(IQT, v as u32);
    }

    /// Descriptors in the queue: 256 either way (8 KiB of 256-bit descriptors with QS=1, or
    /// 4 KiB of 128-bit ones with QS=0).
    pub fn queue_entries(&self) -> u64 {
        256
    }

    /// The status word address used by wait descriptor number `n`.
    pub fn status_addr(&self, n: u32) -> u64 {
        self.status_page + 4 * u64::from(n % 1024)
    }

    pub fn status(&self, n: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t
            .mem
            .read(self.status_addr(n), &mut b)
            .expect("status inside memory");
        u32::from_le_bytes(b)
    }

    /// Submit a wait with status write and assert it completed.
    pub fn wait_sync(&mut self, n: u32) {
        self.submit(&[wait_sw(self.status_addr(n), 0x600d_0000 | n)]);
        assert_eq!(
            self.status(n),
            0x600d_0000 | n,
            "wait descriptor {n} did not complete"
        );
    }

    pub fn head(&self) -> u64 {
        self.vtd.read64(IQH) / if self.wide { 32 } else { 16 }
    }

    pub fn ats(
        &mut self,
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
        len: u64,
        no_write: bool,
    ) -> Result<Vec<AtsTranslation>, AtsRejection> {
        let req = AtsRequest {
            sid,
            pasid,
            addr,
            len,
            no_write,
            exec: false,
            privileged: false,
            max_entries: 64,
            stu_log2: 12,
        };
        self.vtd.translation_request(&mut self.t.mem, &req)
    }

    pub fn dma(
        &mut self,
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
        write: bool,
    ) -> Result<DmaTranslation, DmaFault> {
        let req = DmaRequest {
            sid,
            pasid,
            addr,
            write,
            privileged: false,
        };
        self.vtd.translate_dma(&mut self.t.mem, &req)
    }
}

// Descriptor encoders (Linux `QI_*` layouts).

pub fn cc_global() -> [u64; 4] {
    [1 | (1 << 4), 0, 0, 0]
}

pub fn iotlb_global() -> [u64; 4] {
    [2 | (1 << 4), 0, 0, 0]
}

pub fn iotlb_psi(did: u16, addr: u64, am: u64) -> [u64; 4] {
    [2 | (3 << 4) | (u64::from(did) << 16), addr | am, 0, 0]
}

pub fn piotlb_psi(did: u16, pasid: u32, addr: u64, am: u64) -> [u64; 4] {
    [
        6 | (3 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
        addr | am,
        0,
        0,
    ]
}

pub fn piotlb_pasid(did: u16, pasid: u32) -> [u64; 4] {
    [
        6 | (2 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
        0,
        0,
        0,
    ]
}

pub fn pasid_cache(did: u16, pasid: u32) -> [u64; 4] {
    [
        7 | (1 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
        0,
        0,
        0,
    ]
}

/// Type 3: device-TLB invalidation; `size_log2` 12 uses S=0, larger uses the ATS encoding.
pub fn dev_tlb(sid: u16, addr: u64, size_log2: u8) -> [u64; 4] {
    [3 | (u64::from(sid) << 32), ats_addr(addr, size_log2), 0, 0]
}

/// Type 8: PASID-based device-TLB invalidation (S at bit 11 of QW1).
pub fn pasid_dev_tlb(sid: u16, pasid: u32, addr: u64, size_log2: u8, global: bool) -> [u64; 4] {
    let a = ats_addr(addr, size_log2);
    let s = a & 1;
    [
        8 | (u64::from(sid) << 16) | (u64::from(pasid) << 32),
        (a & !1) | (s << 11) | u64::from(global),
        0,
        0,
    ]
}

/// ATS size encoding with S in bit 0 (Linux `qi_flush_dev_iotlb`).
fn ats_addr(addr: u64, size_log2: u8) -> u64 {
    if size_log2 <= 12 {
        return addr & !0xfff;
    }
    if size_log2 >= 64 {
        return 0x7fff_ffff_ffff_f000 | 1;
    }
    let ones = (1u64 << (size_log2 - 1)) - 1;
    ((addr & !((1u64 << size_log2) - 1)) | (ones & !0xfff)) | 1
}

pub fn wait_sw(status_addr: u64, data: u32) -> [u64; 4] {
    [5 | (1 << 5) | (u64::from(data) << 32), status_addr, 0, 0]
}

pub fn wait_if() -> [u64; 4] {
    [5 | (1 << 4), 0, 0, 0]
}

/// The ATC invalidation events among `events`.
pub fn atc_invalidations(events: &[VtdEvent]) -> Vec<AtcInvalidation> {
    events
        .iter()
        .filter_map(|e| match e {
            VtdEvent::InvalidateDeviceAtc(i) => Some(*i),
            _ => None,
        })
        .collect()
}

/// The interrupts among `events`.
pub fn interrupts(events: &[VtdEvent]) -> Vec<(InterruptSource, u64, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            VtdEvent::Interrupt {
                source,
                address,
                data,
            } => Some((*source, *address, *data)),
            _ => None,
        })
        .collect()
}
