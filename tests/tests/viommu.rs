//! Protocol tier, embedded vIOMMU: the real `vfud` binary serving a `type: viommu` device
//! (VT-d or SMMUv3) and an ats-dma device behind it (`"viommu": "<name>"`). The test is the
//! guest: it programs the model through the viommu device's BAR0 the way the Linux
//! intel-iommu / arm-smmu-v3 drivers do, with every table and queue in one memfd that both
//! devices DMA_MAP at the same guest-physical address, and drives ats-dma with PASID and ATS.

use std::time::{Duration, Instant};

use vfu_protocol::client::Client;
use vfu_protocol::command::irq;
use vfu_protocol::wire::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
};
use vfud_tests::ats_dma::*;
use vfud_tests::{eventfd, wait_eventfd, Daemon, GuestRam, MessageRam};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
/// Guest RAM: 16 MiB at this guest-physical address, shared by fd with both devices.
const RAM_BASE: u64 = 0x8000_0000;
const RAM_SIZE: u64 = 16 << 20;
/// A page the ats-dma client maps without an fd: DMA to it waits for the client.
const MSG_GPA: u64 = 0x9000_0000;
/// The device's I/O virtual addresses (PASID address space) and where they map.
const SRC: u64 = 0x1000_0000;
const DST: u64 = 0x1000_1000;
const DST_MSG: u64 = 0x1000_2000;
const SRC_GPA: u64 = RAM_BASE + 0x80_0000;
const DST_GPA: u64 = RAM_BASE + 0x80_1000;
const PASID: u32 = 5;
/// ats-dma's requester id 00:03.0.
const RID: u16 = 0x18;
const LEN: u32 = 0x1000;

/// Guest RAM with a bump allocator for table pages, addressed guest-physically.
struct Guest {
    ram: GuestRam,
    next: u64,
}

impl Guest {
    fn new() -> Guest {
        Guest {
            ram: GuestRam::new(RAM_SIZE),
            next: RAM_BASE + 0x10_0000,
        }
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let at = self.next.next_multiple_of(size.max(0x1000));
        self.next = at + size;
        assert!(self.next <= RAM_BASE + 0x80_0000, "table memory exhausted");
        at
    }

    fn w64(&self, gpa: u64, v: u64) {
        self.ram.write(gpa - RAM_BASE, &v.to_le_bytes());
    }

    fn r64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.ram.read(gpa - RAM_BASE, 8).try_into().unwrap())
    }

    fn r32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.ram.read(gpa - RAM_BASE, 4).try_into().unwrap())
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.ram.write(gpa - RAM_BASE, data);
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.ram.read(gpa - RAM_BASE, len)
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..LEN).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// Waits for `cond` with a generous deadline (the machine may be loaded).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn w32(c: &mut Client, off: u64, v: u32) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn w64(c: &mut Client, off: u64, v: u64) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn r32(c: &mut Client, off: u64) -> u32 {
    c.read_u32(0, off).unwrap()
}

fn r64(c: &mut Client, off: u64) -> u64 {
    u64::from_le_bytes(c.region_read(0, off, 8).unwrap().try_into().unwrap())
}

/// The viommu device's MSI-X vectors wired to fresh eventfds.
fn wire_msix(c: &mut Client) -> Vec<nix::sys::eventfd::EventFd> {
    let fds: Vec<_> = (0..4).map(|_| eventfd()).collect();
    let borrowed: Vec<_> = fds.iter().map(|e| std::os::fd::AsFd::as_fd(e)).collect();
    c.set_irqs(
        irq::MSIX,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        0,
        4,
        &borrowed,
        &[],
    )
    .unwrap();
    fds
}

/// Starts vfud with the viommu device `iommu0` described by `viommu` and ats-dma `dma0`
/// behind it at 00:03.0; maps the guest RAM into both, and a message-DMA page into dma0.
fn setup(viommu: &str) -> (Daemon, Client, Client, Guest, MessageRam) {
    let d = Daemon::start_with_configs(&[
        ("iommu0", viommu),
        (
            "dma0",
            r#"{"type":"emulated","model":"ats-dma","viommu":"iommu0","requester_id":"00:03.0"}"#,
        ),
    ]);
    let guest = Guest::new();
    let mut iommu = d.client_of("iommu0");
    iommu
        .dma_map(RAM_BASE, RAM_SIZE, RW, Some((guest.ram.fd(), 0)))
        .unwrap();
    let mut dev = d.client_of("dma0");
    dev.dma_map(RAM_BASE, RAM_SIZE, RW, Some((guest.ram.fd(), 0)))
        .unwrap();
    let msg = MessageRam::default();
    dev.set_dma_handler(Box::new(msg.clone()));
    dev.dma_map(MSG_GPA, 0x1000, RW, None).unwrap();
    (d, iommu, dev, guest, msg)
}

/// The ATS part every model shares: PASID + ATS on, a copy that misses then hits, then a copy
/// to message memory that stays blocked (so an invalidation of SRC must wait for it).
fn copy_misses_then_hits(dev: &mut Client, guest: &Guest) {
    enable_pasid(dev, PASID);
    set_ats(dev, true);
    let data = pattern(1);
    guest.write(SRC_GPA, &data);
    start(dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(dev), (STATUS_DONE, ERR_NONE));
    assert_eq!(guest.read(DST_GPA, LEN as usize), data);
    let first = atc_counters(dev);
    assert!(first.misses >= 2 && first.entries >= 2, "{first:?}");
    start(dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(dev), (STATUS_DONE, ERR_NONE));
    let again = atc_counters(dev);
    assert_eq!(
        again.misses, first.misses,
        "the repeat hits the ATC: {again:?}"
    );
    assert!(again.hits >= first.hits + 2, "{again:?}");
}

mod vtd {
    //! VT-d descriptor and structure encodings (VT-d spec 4.1; Linux `QI_*` layouts).
    pub use vfud::viommu::vtd::{
        FaultRecord, FEADDR, FECTL, FEDATA, FRCD, FSTS, FSTS_IQE, FSTS_PPF, GCMD, GCMD_QIE,
        GCMD_SRTP, GCMD_TE, GSTS, IECTL, IQA, IQA_DW, IQER, IQH, IQT, RTADDR,
    };

    pub const P: u64 = 1;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;

    pub fn cc_global() -> [u64; 4] {
        [1 | (1 << 4), 0, 0, 0]
    }
    pub fn iotlb_global() -> [u64; 4] {
        [2 | (1 << 4), 0, 0, 0]
    }
    /// PASID-based IOTLB invalidation of one page.
    pub fn piotlb_page(did: u16, pasid: u32, addr: u64) -> [u64; 4] {
        [
            6 | (3 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
            addr,
            0,
            0,
        ]
    }
    /// Type 8, PASID-based device-TLB invalidation of one 4 KiB page.
    pub fn pasid_dev_tlb(sid: u16, pasid: u32, addr: u64) -> [u64; 4] {
        [
            8 | (u64::from(sid) << 16) | (u64::from(pasid) << 32),
            addr & !0xfff,
            0,
            0,
        ]
    }
    /// Wait descriptor with status write.
    pub fn wait_sw(status: u64, data: u32) -> [u64; 4] {
        [5 | (1 << 5) | (u64::from(data) << 32), status, 0, 0]
    }
}

/// The VT-d guest driver's state.
struct VtdDriver {
    queue: u64,
    tail: u64,
    status: u64,
    gcmd: u32,
}

impl VtdDriver {
    fn gcmd(&mut self, c: &mut Client, bit: u32) {
        let v = self.gcmd | bit;
        w32(c, vtd::GCMD, v);
        assert_eq!(r32(c, vtd::GSTS) & v, v, "GSTS acknowledges {v:#x}");
    }

    /// Writes 256-bit descriptors at the tail and publishes them with one IQT write.
    fn submit(&mut self, c: &mut Client, guest: &Guest, descs: &[[u64; 4]]) {
        for d in descs {
            for (i, q) in d.iter().enumerate() {
                guest.w64(self.queue + self.tail * 32 + 8 * i as u64, *q);
            }
            self.tail = (self.tail + 1) % 256;
        }
        w32(c, vtd::IQT, (self.tail * 32) as u32);
    }
}

/// Programs VT-d like intel-iommu: scalable-mode root and context tables, a PASID directory
/// and table with a first-stage (4-level) entry for PASID, the invalidation queue, SRTP, a
/// global flush, TE. Maps SRC, DST and DST_MSG for the PASID. Returns the driver and the
/// address of SRC's leaf PTE.
fn program_vtd(c: &mut Client, guest: &mut Guest) -> (VtdDriver, u64) {
    let root = guest.alloc(0x1000);
    let ctx = guest.alloc(0x1000);
    let dir = guest.alloc(0x1000);
    let pasid_table = guest.alloc(0x1000);
    let fs_root = guest.alloc(0x1000);
    let queue = guest.alloc(0x2000);
    let status = guest.alloc(0x1000);
    // Root entry of bus 0 (lower context table), scalable context entry of devfn 0x18:
    // present, DTE, PASIDE, PDTS = 7, the PASID directory.
    guest.w64(root, ctx | 1);
    let devfn = u64::from(RID & 0xff);
    guest.w64(ctx + devfn * 32, 1 | 1 << 2 | 1 << 3 | 7 << 9 | dir);
    guest.w64(dir + u64::from(PASID >> 6) * 8, pasid_table | 1);
    // PASID entry: present, SSAW 4-level, PGTT first stage, DID 1, FSPTPTR.
    let entry = pasid_table + u64::from(PASID & 0x3f) * 64;
    guest.w64(entry, 1 | 2 << 2 | 1 << 6);
    guest.w64(entry + 8, 1);
    guest.w64(entry + 16, fs_root);
    // First-stage tables.
    let mut src_pte = 0;
    for (iova, gpa) in [(SRC, SRC_GPA), (DST, DST_GPA), (DST_MSG, MSG_GPA)] {
        let mut table = fs_root;
        for level in (2..=4u32).rev() {
            let at = table + ((iova >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            let e = guest.r64(at);
            table = if e & 1 != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let t = guest.alloc(0x1000);
                guest.w64(at, t | vtd::P | vtd::RW | vtd::US | vtd::A);
                t
            };
        }
        let leaf = table + ((iova >> 12) & 0x1ff) * 8;
        guest.w64(leaf, gpa | vtd::P | vtd::RW | vtd::US | vtd::A | vtd::D);
        if iova == SRC {
            src_pte = leaf;
        }
    }
    let mut drv = VtdDriver {
        queue,
        tail: 0,
        status,
        gcmd: 0,
    };
    // Fault and completion events unmasked (their MSI goes to MSI-X vectors 0 and 1).
    w32(c, vtd::FEDATA, 0x41);
    w32(c, vtd::FEADDR, 0xfee0_1000);
    w32(c, vtd::FECTL, 0);
    w32(c, vtd::IECTL, 0);
    // Queued invalidation (Linux __dmar_enable_qi): IQT = 0, IQA with DW and QS = 1, QIE.
    w32(c, vtd::IQT, 0);
    w64(c, vtd::IQA, queue | vtd::IQA_DW | 1);
    drv.gcmd |= vtd::GCMD_QIE;
    drv.gcmd(c, 0);
    // Root table (scalable mode, TTM = 01), SRTP.
    w64(c, vtd::RTADDR, root | 1 << 10);
    drv.gcmd(c, vtd::GCMD_SRTP);
    drv.submit(
        c,
        guest,
        &[
            vtd::cc_global(),
            vtd::iotlb_global(),
            vtd::wait_sw(status, 1),
        ],
    );
    wait_for("the global flush's wait descriptor", || {
        guest.r32(status) == 1
    });
    drv.gcmd |= vtd::GCMD_TE;
    drv.gcmd(c, 0);
    (drv, src_pte)
}

#[test]
fn vtd_ats_dma_with_pasid_device_tlb_invalidation_faults_and_queue_errors() {
    let (d, mut iommu, mut dev, mut guest, msg) = setup(
        r#"{"type":"viommu","model":"vtd","device_iotlb":true,"pasid_bits":20,"fs1gp":true}"#,
    );
    assert_eq!(
        iommu.region_info(0).unwrap().0.size,
        0x1000,
        "BAR0 is the VT-d register window"
    );
    let irqs = wire_msix(&mut iommu);
    let (mut drv, src_pte) = program_vtd(&mut iommu, &mut guest);

    copy_misses_then_hits(&mut dev, &guest);

    // A copy into message memory: it holds a (still valid) translation of SRC and cannot end
    // before the client answers its DMA_WRITE, which this client only does inside a call.
    guest.w64(src_pte, 0);
    start(&mut dev, OP_COPY, SRC, DST_MSG, LEN, 0, false);

    // The guest unmaps SRC: PASID-based IOTLB + PASID-based device-TLB invalidation + wait.
    let before = {
        let status = drv.status + 4;
        drv.submit(
            &mut iommu,
            &guest,
            &[
                vtd::piotlb_page(1, PASID, SRC),
                vtd::pasid_dev_tlb(RID, PASID, SRC),
                vtd::wait_sw(status, 0x600d),
            ],
        );
        // The wait is held: the device has not acknowledged (its command is still running).
        assert_eq!(
            guest.r32(status),
            0,
            "wait completed before the device acknowledged"
        );
        assert_eq!(r32(&mut iommu, vtd::FSTS) & (vtd::FSTS_IQE | 1 << 6), 0);
        status
    };
    // Servicing the DMA_WRITE lets the command end; then the device acknowledges.
    assert_eq!(wait_idle(&mut dev), (STATUS_DONE, ERR_NONE));
    assert_eq!(msg.load(MSG_GPA, LEN as usize), pattern(1));
    wait_for("the wait descriptor's status write", || {
        guest.r32(before) == 0x600d
    });
    let counters = atc_counters(&mut dev);
    assert!(counters.invalidations >= 1, "{counters:?}");
    // Exactly SRC's entry went: DST's and DST_MSG's stay.
    assert_eq!(counters.entries, 2, "{counters:?}");

    // The next ATS command misses (the entry is gone; a stale hit would succeed) and finds a
    // hole: no usable translation, and ATS records no fault.
    let misses = counters.misses;
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));
    assert_eq!(fault_addr(&mut dev), SRC);
    assert!(atc_counters(&mut dev).misses > misses);
    assert_eq!(r32(&mut iommu, vtd::FSTS) & vtd::FSTS_PPF, 0);

    // Untranslated DMA with the PASID faults in the model: FRCD holds a first-stage
    // not-present record for 00:03.0 / PASID 5 / SRC, and the fault event fires.
    set_ats(&mut dev, false);
    while wait_eventfd(&irqs[0], Duration::ZERO) != 0 {}
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));
    assert_ne!(r32(&mut iommu, vtd::FSTS) & vtd::FSTS_PPF, 0);
    let record =
        vtd::FaultRecord::decode(r64(&mut iommu, vtd::FRCD), r64(&mut iommu, vtd::FRCD + 8))
            .expect("a recorded fault");
    assert_eq!(
        (
            record.sid,
            record.pasid,
            record.addr,
            record.reason,
            record.read
        ),
        (RID, Some(PASID), SRC, 0x71, true),
        "{record:?}"
    );
    assert_eq!(
        wait_eventfd(&irqs[0], Duration::from_secs(10)),
        1,
        "fault event on MSI-X 0"
    );

    // Clear the record as Linux does (F is write-1-to-clear), then a malformed descriptor
    // (type 0xf) stops the queue at it with IQE and another fault event.
    w32(&mut iommu, vtd::FRCD + 12, 1 << 31);
    assert_eq!(r32(&mut iommu, vtd::FSTS) & vtd::FSTS_PPF, 0);
    let bad_at = drv.tail;
    drv.submit(&mut iommu, &guest, &[[0xf, 0, 0, 0]]);
    assert_ne!(r32(&mut iommu, vtd::FSTS) & vtd::FSTS_IQE, 0);
    assert_eq!(
        r64(&mut iommu, vtd::IQH),
        bad_at * 32,
        "the head stops at the bad descriptor"
    );
    assert_eq!(
        wait_eventfd(&irqs[0], Duration::from_secs(10)),
        1,
        "IQE fault event"
    );
    drop(d);
}

mod smmu {
    //! SMMUv3 command and structure encodings (Arm IHI 0070; Linux arm-smmu-v3 layouts).
    pub use vfud::viommu::smmuv3::opcode::*;
    pub use vfud::viommu::smmuv3::regs::*;
    pub use vfud::viommu::smmuv3::{Event, EventType};

    /// Stage-1 descriptors: table/page (0b11), access flag, EL0 access.
    pub const TABLE: u64 = 3;
    pub const AF: u64 = 1 << 10;
    pub const AP_EL0: u64 = 1 << 6;
    pub const CD_MAX: u64 = 6;

    pub fn cfgi_all() -> [u64; 2] {
        [u64::from(CFGI_STE_RANGE), 31]
    }
    pub fn cfgi_ste(sid: u32) -> [u64; 2] {
        [u64::from(CFGI_STE) | u64::from(sid) << 32, 1]
    }
    pub fn cfgi_cd(sid: u32, ssid: u32) -> [u64; 2] {
        [
            u64::from(CFGI_CD) | u64::from(ssid) << 12 | u64::from(sid) << 32,
            1,
        ]
    }
    pub fn tlbi_nsnh_all() -> [u64; 2] {
        [u64::from(TLBI_NSNH_ALL), 0]
    }
    pub fn tlbi_nh_va(asid: u16, va: u64) -> [u64; 2] {
        [
            u64::from(TLBI_NH_VA) | u64::from(asid) << 48,
            va & !0xfff | 1,
        ]
    }
    /// ATC_INV of one 4 KiB page for (sid, ssid).
    pub fn atc_inv(sid: u32, ssid: u32, addr: u64) -> [u64; 2] {
        [
            u64::from(ATC_INV) | 1 << 11 | u64::from(ssid) << 12 | u64::from(sid) << 32,
            addr & !0xfff,
        ]
    }
    /// CMD_SYNC, CS = IRQ with an MSI write of `data` to `addr` (Linux MSIPOLL).
    pub fn sync_msi(addr: u64, data: u32) -> [u64; 2] {
        [u64::from(SYNC) | 1 << 12 | u64::from(data) << 32, addr]
    }
}

/// The arm-smmu-v3 guest driver's state.
struct SmmuDriver {
    cmdq: u64,
    prod: u32,
    evtq: u64,
    status: u64,
    syncs: u32,
}

const Q_LOG2: u32 = 8;

impl SmmuDriver {
    fn enable(c: &mut Client, bit: u32) {
        let v = r32(c, smmu::CR0) | bit;
        w32(c, smmu::CR0, v);
        assert_eq!(r32(c, smmu::CR0ACK), v, "CR0ACK follows CR0");
    }

    /// Writes commands at PROD and publishes them.
    fn submit(&mut self, c: &mut Client, guest: &Guest, cmds: &[[u64; 2]]) {
        for cmd in cmds {
            let slot = self.cmdq + u64::from(self.prod & ((1 << Q_LOG2) - 1)) * 16;
            guest.w64(slot, cmd[0]);
            guest.w64(slot + 8, cmd[1]);
            self.prod = (self.prod + 1) & ((2 << Q_LOG2) - 1);
        }
        w32(c, smmu::CMDQ_PROD, self.prod);
    }

    /// `cmds` followed by a CMD_SYNC whose MSI writes a fresh value; returns where and what.
    fn submit_with_sync(&mut self, c: &mut Client, guest: &Guest, cmds: &[[u64; 2]]) -> (u64, u32) {
        self.syncs += 1;
        let (at, data) = (
            self.status + 4 * u64::from(self.syncs),
            0x600d_0000 | self.syncs,
        );
        let mut all = cmds.to_vec();
        all.push(smmu::sync_msi(at, data));
        self.submit(c, guest, &all);
        (at, data)
    }

    fn sync(&mut self, c: &mut Client, guest: &Guest, cmds: &[[u64; 2]]) {
        let (at, data) = self.submit_with_sync(c, guest, cmds);
        wait_for("CMD_SYNC", || guest.r32(at) == data);
    }
}

/// Programs the SMMU like arm-smmu-v3 (`arm_smmu_device_reset`): linear stream table, command
/// queue, CFGI_ALL + TLBI_NSNH_ALL, event queue, ATSCHK, IRQs, SMMUEN; then a stage-1 stream
/// for 00:03.0 with a CD table (SSID bits 6, S1DSS = SSID0, EATS = 1) and a CD for PASID
/// whose 4-level, 4 KiB-granule tables map SRC, DST and DST_MSG. Returns the driver and the
/// address of SRC's leaf descriptor.
fn program_smmu(c: &mut Client, guest: &mut Guest) -> (SmmuDriver, u64) {
    let idr0 = r32(c, smmu::IDR0);
    assert_eq!(idr0 >> 2 & 3, 2, "AArch64 tables");
    assert_ne!(idr0 & 1 << 10, 0, "ATS");
    let cmdq = guest.alloc(16 << Q_LOG2);
    let evtq = guest.alloc(32 << Q_LOG2);
    let strtab = guest.alloc(64 << 8);
    let status = guest.alloc(0x1000);
    let mut drv = SmmuDriver {
        cmdq,
        prod: 0,
        evtq,
        status,
        syncs: 0,
    };
    w32(c, smmu::CR0, 0);
    assert_eq!(r32(c, smmu::CR0ACK), 0);
    w32(c, smmu::CR1, 0x3f);
    w32(c, smmu::CR2, 0b110);
    w64(c, smmu::STRTAB_BASE, strtab | 1 << 62);
    w32(c, smmu::STRTAB_BASE_CFG, 8);
    w64(c, smmu::CMDQ_BASE, cmdq | 1 << 62 | u64::from(Q_LOG2));
    w32(c, smmu::CMDQ_PROD, 0);
    w32(c, smmu::CMDQ_CONS, 0);
    SmmuDriver::enable(c, smmu::CR0_CMDQEN);
    drv.sync(c, guest, &[smmu::cfgi_all()]);
    drv.sync(c, guest, &[smmu::tlbi_nsnh_all()]);
    w64(c, smmu::EVENTQ_BASE, evtq | 1 << 62 | u64::from(Q_LOG2));
    w32(c, smmu::EVENTQ_PROD, 0);
    w32(c, smmu::EVENTQ_CONS, 0);
    SmmuDriver::enable(c, smmu::CR0_EVENTQEN);
    SmmuDriver::enable(c, smmu::CR0_ATSCHK);
    // MSI configuration as Linux writes it; delivery is to MSI-X vectors 0 (EVTQ) and 1.
    w64(c, smmu::EVENTQ_IRQ_CFG0, 0xfee0_0000);
    w32(c, smmu::EVENTQ_IRQ_CFG1, 0x41);
    w64(c, smmu::GERROR_IRQ_CFG0, 0xfee0_0000);
    w32(c, smmu::GERROR_IRQ_CFG1, 0x42);
    w32(c, smmu::IRQ_CTRL, 0);
    w32(
        c,
        smmu::IRQ_CTRL,
        smmu::IRQ_CTRL_GERROR_IRQEN | smmu::IRQ_CTRL_EVENTQ_IRQEN,
    );
    assert_eq!(r32(c, smmu::IRQ_CTRLACK), 5);
    SmmuDriver::enable(c, smmu::CR0_SMMUEN);

    // Stage-1 tables: 48-bit input (T0SZ 16), 4 KiB granule, levels 0..3.
    let root = guest.alloc(0x1000);
    let mut src_pte = 0;
    for (va, pa) in [(SRC, SRC_GPA), (DST, DST_GPA), (DST_MSG, MSG_GPA)] {
        let mut table = root;
        for level in 0..3u32 {
            let at = table + ((va >> (39 - 9 * level)) & 0x1ff) * 8;
            let desc = guest.r64(at);
            table = if desc & 3 == 3 {
                desc & 0x000f_ffff_ffff_f000
            } else {
                let t = guest.alloc(0x1000);
                guest.w64(at, t | smmu::TABLE);
                t
            };
        }
        let leaf = table + ((va >> 12) & 0x1ff) * 8;
        guest.w64(leaf, pa | smmu::AF | smmu::AP_EL0 | smmu::TABLE);
        if va == SRC {
            src_pte = leaf;
        }
    }
    // CD table (linear, 2^6 CDs) with the CD of PASID: T0SZ, TG0 4K, EPD1, V, IPS 48 bits,
    // AA64, R, A, ASID 1, TTB0; V written last.
    let cds = guest.alloc(64 << smmu::CD_MAX);
    let cd = cds + 64 * u64::from(PASID);
    guest.w64(cd + 8, root);
    guest.w64(
        cd,
        16 | 1 << 30 | 1 << 31 | 5 << 32 | 1 << 41 | 1 << 45 | 1 << 46 | 1 << 48,
    );
    // STE: V, Config = S1 translate, S1Fmt linear, S1ContextPtr, S1CDMax; S1DSS = SSID0,
    // EATS = 1; dw0 written last.
    let ste = strtab + 64 * u64::from(RID);
    guest.w64(ste + 8, 2 | 1 << 28);
    guest.w64(ste, 1 | 5 << 1 | cds | smmu::CD_MAX << 59);
    drv.sync(c, guest, &[smmu::cfgi_ste(u32::from(RID))]);
    drv.sync(c, guest, &[smmu::cfgi_cd(u32::from(RID), PASID)]);
    (drv, src_pte)
}

#[test]
fn smmuv3_ats_dma_with_pasid_atc_invalidation_events_and_command_errors() {
    let (d, mut iommu, mut dev, mut guest, msg) =
        setup(r#"{"type":"viommu","model":"smmuv3","ats":true,"ril":true,"ssidsize":20,"oas":48}"#);
    assert_eq!(
        iommu.region_info(0).unwrap().0.size,
        smmu::REGISTER_WINDOW_SIZE,
        "BAR0 is the SMMUv3 register window (two 64 KiB pages)"
    );
    let irqs = wire_msix(&mut iommu);
    let (mut drv, src_pte) = program_smmu(&mut iommu, &mut guest);

    copy_misses_then_hits(&mut dev, &guest);

    // A copy into message memory holds SRC's translation until the client answers.
    guest.w64(src_pte, 0);
    start(&mut dev, OP_COPY, SRC, DST_MSG, LEN, 0, false);
    // The guest unmaps SRC: TLBI_NH_VA + ATC_INV (SSV, PASID) + CMD_SYNC with an MSI write.
    let (at, data) = drv.submit_with_sync(
        &mut iommu,
        &guest,
        &[
            smmu::tlbi_nh_va(1, SRC),
            smmu::atc_inv(u32::from(RID), PASID, SRC),
        ],
    );
    assert_eq!(
        guest.r32(at),
        0,
        "CMD_SYNC completed before the device acknowledged"
    );
    assert_eq!(r32(&mut iommu, smmu::GERROR), 0);
    assert_eq!(wait_idle(&mut dev), (STATUS_DONE, ERR_NONE));
    assert_eq!(msg.load(MSG_GPA, LEN as usize), pattern(1));
    wait_for("the CMD_SYNC MSI write", || guest.r32(at) == data);
    let counters = atc_counters(&mut dev);
    assert!(counters.invalidations >= 1, "{counters:?}");
    // Exactly SRC's entry went: DST's and DST_MSG's stay.
    assert_eq!(counters.entries, 2, "{counters:?}");

    // The next ATS command misses and finds a hole; ATS records no event.
    let misses = counters.misses;
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));
    assert_eq!(fault_addr(&mut dev), SRC);
    assert!(atc_counters(&mut dev).misses > misses);
    assert_eq!(
        r32(&mut iommu, smmu::EVENTQ_PROD),
        0,
        "no event for an ATS hole"
    );

    // Untranslated DMA with the PASID: F_TRANSLATION in the event queue, EVTQ MSI-X vector.
    set_ats(&mut dev, false);
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));
    assert_eq!(r32(&mut iommu, smmu::EVENTQ_PROD), 1);
    let record: [u8; 32] = guest.read(drv.evtq, 32).try_into().unwrap();
    let event = smmu::Event::decode(&record).expect("a known event");
    assert_eq!(
        (
            event.kind,
            event.sid,
            event.ssid,
            event.input_addr,
            event.read
        ),
        (
            smmu::EventType::FTranslation,
            u32::from(RID),
            Some(PASID),
            SRC,
            true
        ),
        "{event:?}"
    );
    assert_eq!(
        wait_eventfd(&irqs[0], Duration::from_secs(10)),
        1,
        "EVTQ interrupt on MSI-X 0"
    );
    w32(&mut iommu, smmu::EVENTQ_CONS, 1);

    // An unknown opcode: CONS stops at it with CERROR_ILL, GERROR.CMDQ_ERR, GERROR interrupt.
    let bad = drv.prod;
    drv.submit(&mut iommu, &guest, &[[0xff, 0]]);
    assert_ne!(r32(&mut iommu, smmu::GERROR) & smmu::GERROR_CMDQ_ERR, 0);
    let cons = r32(&mut iommu, smmu::CMDQ_CONS);
    assert_eq!(cons & 0xfffff, bad, "CONS stays at the bad command");
    assert_eq!(cons >> 24 & 0x7f, smmu::CERROR_ILL);
    assert_eq!(
        wait_eventfd(&irqs[1], Duration::from_secs(10)),
        1,
        "GERROR interrupt on MSI-X 1"
    );
    drop(d);
}

#[test]
fn an_endpoint_that_does_not_complete_an_invalidation_in_time_sets_ite_and_atc_inv_sync() {
    // VT-d: the device's command holds the translation and its client does not answer its
    // DMA, so the invalidation cannot complete: ITE with the requester in IQER, no status.
    let (d, mut iommu, mut dev, mut guest, _msg) = setup(
        r#"{"type":"viommu","model":"vtd","device_iotlb":true,"pasid_bits":20,"fs1gp":true}"#,
    );
    let (mut drv, _) = program_vtd(&mut iommu, &mut guest);
    copy_misses_then_hits(&mut dev, &guest);
    start(&mut dev, OP_COPY, SRC, DST_MSG, LEN, 0, false);
    let status = drv.status + 8;
    drv.submit(
        &mut iommu,
        &guest,
        &[
            vtd::pasid_dev_tlb(RID, PASID, SRC),
            vtd::wait_sw(status, 0x600d),
        ],
    );
    wait_for("FSTS.ITE", || r32(&mut iommu, vtd::FSTS) & 1 << 6 != 0);
    assert_eq!(r64(&mut iommu, vtd::IQER) >> 32 & 0xffff, u64::from(RID));
    assert_eq!(guest.r32(status), 0, "the timed-out wait writes no status");
    assert_eq!(wait_idle(&mut dev), (STATUS_DONE, ERR_NONE));
    drop(d);

    // SMMUv3: the CMD_SYNC behind the ATC_INV fails with CERROR_ATC_INV_SYNC.
    let (d, mut iommu, mut dev, mut guest, _msg) =
        setup(r#"{"type":"viommu","model":"smmuv3","ats":true,"ril":true,"ssidsize":20,"oas":48}"#);
    let (mut drv, _) = program_smmu(&mut iommu, &mut guest);
    copy_misses_then_hits(&mut dev, &guest);
    start(&mut dev, OP_COPY, SRC, DST_MSG, LEN, 0, false);
    let (at, _) = drv.submit_with_sync(
        &mut iommu,
        &guest,
        &[smmu::atc_inv(u32::from(RID), PASID, SRC)],
    );
    wait_for("GERROR.CMDQ_ERR", || {
        r32(&mut iommu, smmu::GERROR) & smmu::GERROR_CMDQ_ERR != 0
    });
    assert_eq!(
        r32(&mut iommu, smmu::CMDQ_CONS) >> 24 & 0x7f,
        smmu::CERROR_ATC_INV_SYNC
    );
    assert_eq!(guest.r32(at), 0, "the failed CMD_SYNC writes no MSI");
    assert_eq!(wait_idle(&mut dev), (STATUS_DONE, ERR_NONE));
    drop(d);
}

#[test]
fn a_device_behind_a_viommu_without_a_client_faults_and_recovers_when_it_returns() {
    let d = Daemon::start_with_configs(&[
        (
            "iommu0",
            r#"{"type":"viommu","model":"vtd","device_iotlb":true,"pasid_bits":20,"fs1gp":true}"#,
        ),
        (
            "dma0",
            r#"{"type":"emulated","model":"ats-dma","viommu":"iommu0","requester_id":"00:03.0"}"#,
        ),
    ]);
    let mut guest = Guest::new();
    let mut dev = d.client_of("dma0");
    dev.dma_map(RAM_BASE, RAM_SIZE, RW, Some((guest.ram.fd(), 0)))
        .unwrap();
    enable_pasid(&mut dev, PASID);
    guest.write(SRC_GPA, &pattern(3));
    // No vIOMMU client: no tables to walk. ATS and untranslated DMA fail, promptly.
    set_ats(&mut dev, true);
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));
    set_ats(&mut dev, false);
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));

    // The vIOMMU's client arrives and programs it: DMA works.
    let mut iommu = d.client_of("iommu0");
    iommu
        .dma_map(RAM_BASE, RAM_SIZE, RW, Some((guest.ram.fd(), 0)))
        .unwrap();
    program_vtd(&mut iommu, &mut guest);
    set_ats(&mut dev, true);
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_DONE, ERR_NONE));
    assert_eq!(guest.read(DST_GPA, LEN as usize), pattern(3));
    assert!(atc_counters(&mut dev).entries >= 2);

    // It leaves: the device's ATC is emptied and its DMA faults again.
    drop(iommu);
    wait_for("the ATC to be emptied", || {
        atc_counters(&mut dev).entries == 0
    });
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_ERROR, ERR_TRANSLATION));
    drop(d);
}

#[test]
fn check_config_names_the_file_field_and_fix_of_a_bad_viommu_link() {
    let dir = std::env::temp_dir().join(format!("vfud-viommu-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, device: &str| {
        std::fs::write(
            dir.join(format!("{name}.json")),
            format!(r#"{{"version":1,"name":"{name}","socket":"{name}.sock","device":{device}}}"#),
        )
        .unwrap();
    };
    write(
        "iommu0",
        r#"{"type":"viommu","model":"smmuv3","ats":true,"ril":true,"ssidsize":20,"oas":48}"#,
    );
    write(
        "dma0",
        r#"{"type":"emulated","model":"ats-dma","viommu":"iommu1","requester_id":"00:03.0"}"#,
    );
    let out = std::process::Command::new(vfud_tests::vfud_bin())
        .arg("check-config")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("dma0.json: at device.viommu: no device named \"iommu1\"")
            && stderr.contains("configured vIOMMU devices: iommu0"),
        "{stderr}"
    );
    write(
        "dma0",
        r#"{"type":"emulated","model":"ats-dma","viommu":"iommu0","requester_id":"00:03.0"}"#,
    );
    let out = std::process::Command::new(vfud_tests::vfud_bin())
        .arg("check-config")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smmuv3_answers_respect_a_64k_stu_and_scattered_pages_go_untranslated() {
    let (d, mut iommu, mut dev, mut guest, _msg) =
        setup(r#"{"type":"viommu","model":"smmuv3","ats":true,"ril":true,"ssidsize":20,"oas":48}"#);
    program_smmu(&mut iommu, &mut guest);
    enable_pasid(&mut dev, PASID);
    // ATS Enable with STU = 4 (64 KiB), as a 64 KiB-page guest sets it.
    let cap = find_ext_cap(&mut dev, 0x0f).unwrap();
    dev.region_write(
        vfu_protocol::command::region::CONFIG,
        cap + 6,
        &(0x8000u16 | 4).to_le_bytes(),
    )
    .unwrap();
    let data = pattern(9);
    guest.write(SRC_GPA, &data);
    // SRC's 64 KiB unit holds pages mapped to scattered addresses and unmapped ones: no
    // 64 KiB translation exists, so the answer says "untranslated only" and the engine's
    // untranslated requests go through the model.
    start(&mut dev, OP_COPY, SRC, DST, LEN, 0, false);
    assert_eq!(wait_idle(&mut dev), (STATUS_DONE, ERR_NONE));
    assert_eq!(guest.read(DST_GPA, LEN as usize), data);
    let c = atc_counters(&mut dev);
    assert!(c.requests >= 1, "{c:?}");
    assert_eq!(
        c.entries, 0,
        "untranslated-only answers are not cached: {c:?}"
    );
    drop(d);
}
