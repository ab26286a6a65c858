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
        GCMD_SRTP, GCMD_TE, GSTS, IECTL, IQA, IQA_DW, IQH, IQT, RTADDR,
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
