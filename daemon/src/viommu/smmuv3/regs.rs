//! Register offsets, field masks and queue-pointer arithmetic.
//!
//! The register window is 128 KiB: page 0 at 0x0 and page 1 at 0x10000. Page 1 holds
//! EVENTQ_PROD/CONS and PRIQ_PROD/CONS; the model also answers them at their page-0 alias
//! (offset & !0x10000), as QEMU does, because some drivers use the page-0 only layout.

/// Size of the MMIO window the model decodes (two 64 KiB pages).
pub const REGISTER_WINDOW_SIZE: u64 = 0x20000;

/// IDR0 offset.
pub const IDR0: u64 = 0x00;
/// IDR1 offset.
pub const IDR1: u64 = 0x04;
/// IDR2 offset.
pub const IDR2: u64 = 0x08;
/// IDR3 offset.
pub const IDR3: u64 = 0x0C;
/// IDR4 offset.
pub const IDR4: u64 = 0x10;
/// IDR5 offset.
pub const IDR5: u64 = 0x14;
/// IIDR offset.
pub const IIDR: u64 = 0x18;
/// AIDR offset.
pub const AIDR: u64 = 0x1C;
/// CR0 offset.
pub const CR0: u64 = 0x20;
/// CR0ACK offset.
pub const CR0ACK: u64 = 0x24;
/// CR1 offset.
pub const CR1: u64 = 0x28;
/// CR2 offset.
pub const CR2: u64 = 0x2C;
/// STATUSR offset.
pub const STATUSR: u64 = 0x40;
/// GBPA offset.
pub const GBPA: u64 = 0x44;
/// IRQ_CTRL offset.
pub const IRQ_CTRL: u64 = 0x50;
/// IRQ_CTRLACK offset.
pub const IRQ_CTRLACK: u64 = 0x54;
/// GERROR offset.
pub const GERROR: u64 = 0x60;
/// GERRORN offset.
pub const GERRORN: u64 = 0x64;
/// GERROR_IRQ_CFG0 (64-bit MSI address) offset.
pub const GERROR_IRQ_CFG0: u64 = 0x68;
/// GERROR_IRQ_CFG1 (MSI data) offset.
pub const GERROR_IRQ_CFG1: u64 = 0x70;
/// GERROR_IRQ_CFG2 (MSI attributes) offset.
pub const GERROR_IRQ_CFG2: u64 = 0x74;
/// STRTAB_BASE offset.
pub const STRTAB_BASE: u64 = 0x80;
/// STRTAB_BASE_CFG offset.
pub const STRTAB_BASE_CFG: u64 = 0x88;
/// CMDQ_BASE offset.
pub const CMDQ_BASE: u64 = 0x90;
/// CMDQ_PROD offset.
pub const CMDQ_PROD: u64 = 0x98;
/// CMDQ_CONS offset.
pub const CMDQ_CONS: u64 = 0x9C;
/// EVENTQ_BASE offset.
pub const EVENTQ_BASE: u64 = 0xA0;
/// EVENTQ_PROD offset (page 1; page-0 alias 0xA8).
pub const EVENTQ_PROD: u64 = 0x100A8;
/// EVENTQ_CONS offset (page 1; page-0 alias 0xAC).
pub const EVENTQ_CONS: u64 = 0x100AC;
/// EVENTQ_IRQ_CFG0 offset.
pub const EVENTQ_IRQ_CFG0: u64 = 0xB0;
/// EVENTQ_IRQ_CFG1 offset.
pub const EVENTQ_IRQ_CFG1: u64 = 0xB8;
/// EVENTQ_IRQ_CFG2 offset.
pub const EVENTQ_IRQ_CFG2: u64 = 0xBC;
/// PRIQ_BASE offset.
pub const PRIQ_BASE: u64 = 0xC0;
/// PRIQ_PROD offset (page 1; page-0 alias 0xC8).
pub const PRIQ_PROD: u64 = 0x100C8;
/// PRIQ_CONS offset (page 1; page-0 alias 0xCC).
pub const PRIQ_CONS: u64 = 0x100CC;
/// PRIQ_IRQ_CFG0 offset.
pub const PRIQ_IRQ_CFG0: u64 = 0xD0;
/// PRIQ_IRQ_CFG1 offset.
pub const PRIQ_IRQ_CFG1: u64 = 0xD8;
/// PRIQ_IRQ_CFG2 offset.
pub const PRIQ_IRQ_CFG2: u64 = 0xDC;

/// CR0.SMMUEN.
pub const CR0_SMMUEN: u32 = 1 << 0;
/// CR0.PRIQEN.
pub const CR0_PRIQEN: u32 = 1 << 1;
/// CR0.EVENTQEN.
pub const CR0_EVENTQEN: u32 = 1 << 2;
/// CR0.CMDQEN.
pub const CR0_CMDQEN: u32 = 1 << 3;
/// CR0.ATSCHK.
pub const CR0_ATSCHK: u32 = 1 << 4;
/// Writable CR0 bits (VMW is not implemented).
pub(crate) const CR0_MASK: u32 = 0x1f;

/// CR2.RECINVSID: record C_BAD_STREAMID.
pub const CR2_RECINVSID: u32 = 1 << 1;
/// CR2.REC_CFG_ATS: record configuration errors of ATS requests and translated traffic
/// (implemented when IDR0.ATSRECERR, i.e. with ATS).
pub const CR2_REC_CFG_ATS: u32 = 1 << 3;

/// GBPA.ABORT: incoming transactions abort while SMMUEN = 0.
pub const GBPA_ABORT: u32 = 1 << 20;
/// GBPA.UPDATE: a write only takes effect with this bit set; reads as 0 once applied.
pub const GBPA_UPDATE: u32 = 1 << 31;
/// GBPA fields that are stored (attribute overrides are kept but not acted on).
pub(crate) const GBPA_FIELDS: u32 = 0x3ff_fff;
/// GBPA reset value (QEMU's "use incoming" attributes, abort clear).
pub(crate) const GBPA_RESET: u32 = 0x1000;

/// IRQ_CTRL.GERROR_IRQEN.
pub const IRQ_CTRL_GERROR_IRQEN: u32 = 1 << 0;
/// IRQ_CTRL.PRIQ_IRQEN.
pub const IRQ_CTRL_PRIQ_IRQEN: u32 = 1 << 1;
/// IRQ_CTRL.EVENTQ_IRQEN.
pub const IRQ_CTRL_EVENTQ_IRQEN: u32 = 1 << 2;

/// GERROR.CMDQ_ERR.
pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
/// GERROR.EVENTQ_ABT_ERR.
pub const GERROR_EVENTQ_ABT_ERR: u32 = 1 << 2;
/// GERROR.PRIQ_ABT_ERR.
pub const GERROR_PRIQ_ABT_ERR: u32 = 1 << 3;
/// GERROR.MSI_CMDQ_ABT_ERR.
pub const GERROR_MSI_CMDQ_ABT_ERR: u32 = 1 << 4;
/// Bits GERROR can hold.
pub(crate) const GERROR_MASK: u32 = 0x1fd;

/// CMDQ_CONS.ERR values (CERROR_*).
pub const CERROR_NONE: u32 = 0;
/// Illegal command.
pub const CERROR_ILL: u32 = 1;
/// Abort fetching a command.
pub const CERROR_ABT: u32 = 2;
/// A CMD_SYNC could not complete earlier ATC invalidations.
pub const CERROR_ATC_INV_SYNC: u32 = 3;
/// CMDQ_CONS.ERR field shift.
pub const CMDQ_CONS_ERR_SHIFT: u32 = 24;

/// EVENTQ_PROD.OVFLG / PRIQ_PROD.OVFLG.
pub const Q_OVFLG: u32 = 1 << 31;

/// Address bits [51:6] of STRTAB_BASE plus RA.
pub(crate) const STRTAB_BASE_MASK: u64 = 0x000f_ffff_ffff_ffc0 | 1 << 62;
/// LOG2SIZE, SPLIT and FMT of STRTAB_BASE_CFG.
pub(crate) const STRTAB_BASE_CFG_MASK: u32 = 0x3_07ff;
/// Queue base registers: RWA/WA bit 62, ADDR[51:5], LOG2SIZE[4:0].
pub(crate) const Q_BASE_MASK: u64 = 0x000f_ffff_ffff_ffe0 | 0x1f | 1 << 62;
/// MSI address registers: ADDR[51:2].
pub(crate) const IRQ_CFG0_MASK: u64 = 0x000f_ffff_ffff_fffc;

/// A queue's geometry: base address and log2 of its entry count (clamped to the IDR limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueGeometry {
    pub base: u64,
    pub log2: u32,
    pub entry_size: u64,
}

impl QueueGeometry {
    /// Decode a *_BASE register; `max_log2` is the IDR1 limit.
    pub fn from_base(reg: u64, max_log2: u8, entry_size: u64) -> Self {
        let log2 = ((reg & 0x1f) as u32).min(u32::from(max_log2));
        // The base must be aligned to the queue size; low bits are treated as zero.
        let bytes = entry_size << log2;
        let base = reg & 0x000f_ffff_ffff_ffe0 & !(bytes - 1);
        Self {
            base,
            log2,
            entry_size,
        }
    }

    /// Index plus wrap bit of a PROD/CONS value.
    pub fn pos(&self, reg: u32) -> u32 {
        reg & ((2u32 << self.log2) - 1)
    }

    /// Slot index of a PROD/CONS value.
    pub fn index(&self, reg: u32) -> u32 {
        reg & ((1u32 << self.log2) - 1)
    }

    /// The position after `reg` (index + 1, wrap toggled on overflow).
    pub fn next(&self, reg: u32) -> u32 {
        (self.pos(reg) + 1) & ((2u32 << self.log2) - 1)
    }

    /// No entries between `cons` and `prod`.
    pub fn is_empty(&self, prod: u32, cons: u32) -> bool {
        self.pos(prod) == self.pos(cons)
    }

    /// Every slot holds an entry.
    pub fn is_full(&self, prod: u32, cons: u32) -> bool {
        self.index(prod) == self.index(cons) && self.pos(prod) != self.pos(cons)
    }

    /// Guest-physical address of slot `index(reg)`.
    pub fn slot_addr(&self, reg: u32) -> u64 {
        self.base + u64::from(self.index(reg)) * self.entry_size
    }
}
