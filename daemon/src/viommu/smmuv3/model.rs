//! The SMMUv3 model: register file, translation core with its three entry points, command
//! queue, event queue and PRI queue.
//!
//! Everything is synchronous and driven by the caller: an MMIO access, a device transaction,
//! or an ATC-invalidation acknowledgement. The only work that outlives a call is a CMD_SYNC
//! waiting for device ATC invalidations, which resumes on [`Smmuv3::ack_atc_invalidation`]
//! or fails on [`Smmuv3::atc_invalidation_timeout`].

use std::collections::BTreeSet;

use super::cmdq::{self, Command, PriResponseCode, SyncSignal};
use super::config::{
    decode_cd, decode_ste, Cd, CdTableFormat, Eats, Illegal, S1Dss, Stage1Config, Stage2Config, Ste,
};
use super::events::{Event, EventType, FaultClass};
use super::memory::{read_u64, read_words, GuestMemory};
use super::props::{PropertiesError, Smmuv3Properties};
use super::regs::*;
use super::tlb::{ConfigCache, Tlb, TlbEntry, TlbKind};
use super::walk::{walk, Fault, FaultKind, Perms, Stage};

/// Most commands consumed per call; the rest wait for the next call to
/// [`Smmuv3::process_commands`]. Bounds the work one guest PROD write can cause.
pub const COMMAND_BUDGET: usize = 1024;
/// Most device ATC invalidations in flight; an ATC_INV beyond it waits for acknowledgements.
pub const MAX_OUTSTANDING_ATC_INVALIDATIONS: usize = 256;
/// Most undrained outputs; command processing pauses until [`Smmuv3::take_outputs`].
pub const OUTPUT_CAPACITY: usize = 4096;
/// Most ATS translations returned for one request.
pub const MAX_ATS_ENTRIES: usize = 512;

/// How a transaction accesses memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Write (else read).
    pub write: bool,
    /// Instruction fetch.
    pub exec: bool,
    /// Privileged (PnU = 1).
    pub privileged: bool,
}

/// An untranslated or translated DMA transaction from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRequest {
    /// StreamID (the requester id, as the VMM's IORT/DT maps it).
    pub sid: u32,
    /// SubstreamID (PASID), if the transaction carries one.
    pub ssid: Option<u32>,
    /// Input address: IOVA (untranslated) or the translated address (translated DMA).
    pub address: u64,
    /// Access type.
    pub access: Access,
}

/// Where a successful DMA goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaTranslation {
    /// Guest-physical address for `DmaRequest::address`.
    pub address: u64,
    /// Bytes from `address` that are translated contiguously with the same permissions (at
    /// least 1; the device splits larger transfers).
    pub contiguous: u64,
}

/// A terminated DMA transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("smmuv3 terminated the transaction (event {event:?}, raz_wi {raz_wi})")]
pub struct DmaFault {
    /// The event recorded in the event queue (if the queue accepted it); `None` for silent
    /// aborts (STE abort config, GBPA abort) and unrecorded faults (CD.R / STE.S2R clear).
    pub event: Option<EventType>,
    /// CD.A = 0: reads return zero and writes are ignored instead of aborting.
    pub raz_wi: bool,
}

/// A PCIe ATS translation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsRequest {
    /// StreamID.
    pub sid: u32,
    /// PASID from the TLP prefix.
    pub ssid: Option<u32>,
    /// First untranslated address.
    pub address: u64,
    /// Bytes requested (0 is treated as 1).
    pub length: u64,
    /// NW: the device will not write through the answer, so W is reported 0.
    pub no_write: bool,
    /// Execute Requested.
    pub exec: bool,
    /// Privileged Mode Requested.
    pub privileged: bool,
}

/// One entry of an ATS translation completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsTranslation {
    /// Naturally aligned untranslated base of the range the entry describes.
    pub untranslated: u64,
    /// log2 of the range size (>= 12).
    pub size_log2: u8,
    /// Translated base (0 for a hole).
    pub translated: u64,
    /// Read permitted.
    pub r: bool,
    /// Write permitted.
    pub w: bool,
    /// Execute permitted (only when requested).
    pub x: bool,
    /// The answer is for privileged mode (echoes the request).
    pub privileged: bool,
    /// Valid for every PASID (stage-1 nG clear, request with PASID).
    pub global: bool,
    /// U: the device must use untranslated requests for this range (never set by this model).
    pub untranslated_only: bool,
}

/// A rejected ATS translation request (the completion status, not data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AtsError {
    /// UR: ATS not allowed for the stream, SMMU disabled, or a bad configuration.
    #[error("smmuv3 rejected the ATS translation request (event {event:?})")]
    UnsupportedRequest {
        /// The event recorded, if any.
        event: Option<EventType>,
    },
    /// CA: an external abort reading the translation tables.
    #[error("smmuv3 aborted the ATS translation request on a table-walk abort")]
    CompleterAbort,
}

/// A PCIe page request (PRI) from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// StreamID.
    pub sid: u32,
    /// PASID.
    pub ssid: Option<u32>,
    /// Page address (bits below 12 ignored).
    pub address: u64,
    /// Page Request Group index (9 bits).
    pub prgi: u16,
    /// Last request of the group.
    pub last: bool,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Execute requested.
    pub exec: bool,
    /// Privileged mode requested.
    pub privileged: bool,
}

/// A page request that could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PriError {
    /// The model does not implement PRI.
    #[error("smmuv3 does not implement PRI")]
    NotSupported,
    /// PRIQEN or SMMUEN is clear.
    #[error("smmuv3 PRI queue is disabled")]
    QueueDisabled,
    /// The queue is full (PRIQ_PROD.OVFLG is set); the device should treat it as a failed
    /// request.
    #[error("smmuv3 PRI queue overflowed")]
    Overflow,
}

/// A device-ATC invalidation the device with `sid` must perform and then acknowledge with
/// [`Smmuv3::ack_atc_invalidation`] (`id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtcInvalidation {
    /// Token for the acknowledgement.
    pub id: u64,
    /// StreamID of the device.
    pub sid: u32,
    /// `Some`: entries of this PASID only. `None` (SSV = 0): every entry in the range,
    /// PASID-tagged or not — an ATS Invalidate Request without a PASID prefix.
    pub ssid: Option<u32>,
    /// Also global entries of every PASID (only with `ssid`).
    pub global: bool,
    /// First address of the naturally aligned range.
    pub start: u64,
    /// log2 of the range size; 64 means the whole address space.
    pub size_log2: u32,
}

/// A page-request group response for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriResponse {
    /// StreamID.
    pub sid: u32,
    /// PASID (when the response needs one).
    pub ssid: Option<u32>,
    /// Page Request Group index.
    pub prgi: u16,
    /// Response code.
    pub code: PriResponseCode,
}

/// An interrupt source of the SMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptSource {
    /// New event-queue records.
    EventQueue,
    /// A GERROR bit became active.
    GlobalError,
    /// New PRI-queue entries.
    PriQueue,
    /// A CMD_SYNC with CS = IRQ completed and the model has no MSI (IDR0.MSI = 0).
    CmdSync,
}

/// An MSI message programmed in the *_IRQ_CFG registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// *_IRQ_CFG0 address.
    pub address: u64,
    /// *_IRQ_CFG1 data.
    pub data: u32,
}

/// An interrupt to deliver; `msi` is the guest's MSI configuration when IDR0.MSI and the
/// address is non-zero (the embedding decides whether to write it or use its own vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupt {
    /// Which interrupt.
    pub source: InterruptSource,
    /// Programmed MSI, if any.
    pub msi: Option<MsiMessage>,
}

/// What the model asks its embedding to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Smmuv3Output {
    /// Invalidate a device ATC, then acknowledge.
    AtcInvalidate(AtcInvalidation),
    /// Deliver a PRG response to a device.
    PriResponse(PriResponse),
    /// Raise an interrupt.
    Interrupt(Interrupt),
    /// CMD_SYNC with CS = SEV completed: send a wake-up event.
    SendEvent,
}

/// Why a translation did not produce an address.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Configuration error: the event is always recorded.
    Config(Event),
    /// Silent abort.
    Abort,
    /// A walk fault.
    Walk {
        fault: Fault,
        record: bool,
        raz_wi: bool,
    },
}

/// The configuration a transaction resolved to.
#[derive(Debug, Clone, Copy)]
enum Context {
    Abort,
    Translate {
        eats: Eats,
        vmid: u16,
        cd: Option<Cd>,
        s2: Option<Stage2Config>,
    },
}

/// A successful translation (before the permission check).
#[derive(Debug, Clone, Copy)]
struct Translation {
    in_base: u64,
    size_log2: u32,
    out_base: u64,
    ipa_base: u64,
    s1: Perms,
    s2: Perms,
    global: bool,
}

impl Translation {
    fn identity(addr: u64) -> Self {
        Translation {
            in_base: addr & !((1 << 30) - 1),
            size_log2: 30,
            out_base: addr & !((1 << 30) - 1),
            ipa_base: addr & !((1 << 30) - 1),
            s1: Perms::ALL,
            s2: Perms::ALL,
            global: false,
        }
    }

    fn output(&self, addr: u64) -> u64 {
        self.out_base + (addr - self.in_base)
    }

    fn contiguous(&self, addr: u64) -> u64 {
        let last = self.in_base.wrapping_add((1u64 << self.size_log2) - 1);
        last.wrapping_sub(addr).saturating_add(1)
    }
}

#[derive(Debug, Default, Clone)]
struct Registers {
    cr0: u32,
    cr1: u32,
    cr2: u32,
    gbpa: u32,
    irq_ctrl: u32,
    gerror: u32,
    gerrorn: u32,
    gerror_irq_cfg0: u64,
    gerror_irq_cfg1: u32,
    gerror_irq_cfg2: u32,
    strtab_base: u64,
    strtab_base_cfg: u32,
    cmdq_base: u64,
    cmdq_prod: u32,
    cmdq_cons: u32,
    eventq_base: u64,
    eventq_prod: u32,
    eventq_cons: u32,
    eventq_irq_cfg0: u64,
    eventq_irq_cfg1: u32,
    eventq_irq_cfg2: u32,
    priq_base: u64,
    priq_prod: u32,
    priq_cons: u32,
    priq_irq_cfg0: u64,
    priq_irq_cfg1: u32,
    priq_irq_cfg2: u32,
}

/// Why command consumption is paused (besides a GERROR.CMDQ_ERR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmdqWait {
    Running,
    /// CONS points at a CMD_SYNC that waits for outstanding ATC invalidations.
    Sync,
    /// CONS points at an ATC_INV that waits for room among outstanding invalidations.
    AtcCapacity,
}

/// An Arm SMMUv3 (non-secure, AArch64 tables, no stall) with ATS, PASID and PRI.
#[derive(Debug)]
pub struct Smmuv3 {
    props: Smmuv3Properties,
    regs: Registers,
    tlb: Tlb,
    cache: ConfigCache,
    outputs: Vec<Smmuv3Output>,
    outstanding_atc: BTreeSet<u64>,
    next_atc_id: u64,
    wait: CmdqWait,
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

fn set_half(reg: &mut u64, high: bool, v: u32, mask: u64) {
    let v = u64::from(v);
    *reg = if high {
        (*reg & 0xffff_ffff) | v << 32
    } else {
        (*reg & !0xffff_ffff) | v
    } & mask;
}

fn event_kind(kind: FaultKind) -> EventType {
    match kind {
        FaultKind::Translation => EventType::FTranslation,
        FaultKind::AddrSize => EventType::FAddrSize,
        FaultKind::Access => EventType::FAccess,
        FaultKind::Permission => EventType::FPermission,
        FaultKind::WalkEabt => EventType::FWalkEabt,
    }
}

/// Queue PROD/CONS bits software may write: index and wrap of the largest queue (2^19).
const Q_POS_MASK: u32 = 0xf_ffff;

impl Smmuv3 {
    /// A model in its reset state.
    pub fn new(props: Smmuv3Properties) -> Result<Self, PropertiesError> {
        props.validate()?;
        let mut s = Smmuv3 {
            props,
            regs: Registers::default(),
            tlb: Tlb::default(),
            cache: ConfigCache::default(),
            outputs: Vec::new(),
            outstanding_atc: BTreeSet::new(),
            next_atc_id: 1,
            wait: CmdqWait::Running,
        };
        s.reset();
        Ok(s)
    }

    /// The properties the model was built with.
    pub fn properties(&self) -> &Smmuv3Properties {
        &self.props
    }

    /// Back to the reset state: registers, caches, pending work and outputs.
    pub fn reset(&mut self) {
        self.regs = Registers {
            gbpa: GBPA_RESET,
            ..Registers::default()
        };
        self.tlb.clear();
        self.cache.clear();
        self.outputs.clear();
        self.outstanding_atc.clear();
        self.wait = CmdqWait::Running;
    }

    fn enabled(&self) -> bool {
        self.regs.cr0 & CR0_SMMUEN != 0
    }

    // ----------------------------------------------------------------------------------------
    // Register file
    // ----------------------------------------------------------------------------------------

    /// MMIO read of `size` (4 or 8) bytes at `offset` in the register window. Unaligned,
    /// other-sized and unknown accesses read as zero.
    pub fn mmio_read(&self, offset: u64, size: u8) -> u64 {
        if offset >= REGISTER_WINDOW_SIZE || offset % u64::from(size.max(1)) != 0 {
            return 0;
        }
        match size {
            4 => u64::from(self.read32(offset)),
            8 => u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32,
            _ => 0,
        }
    }

    /// MMIO write of `size` (4 or 8) bytes at `offset`. A 64-bit access is two 32-bit
    /// accesses, low word first. May consume commands (bounded by [`COMMAND_BUDGET`]).
    pub fn mmio_write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        offset: u64,
        size: u8,
        value: u64,
    ) {
        if offset >= REGISTER_WINDOW_SIZE || offset % u64::from(size.max(1)) != 0 {
            return;
        }
        match size {
            4 => self.write32(offset, value as u32),
            8 => {
                self.write32(offset, value as u32);
                self.write32(offset + 4, (value >> 32) as u32);
            }
            _ => return,
        }
        self.process_commands(mem);
    }

    fn read32(&self, offset: u64) -> u32 {
        let r = &self.regs;
        match offset & !0x10000 {
            IDR0 => self.props.idr0(),
            IDR1 => self.props.idr1(),
            IDR3 => self.props.idr3(),
            IDR5 => self.props.idr5(),
            // SMMUv3.2: range invalidation and STT are v3.2 features.
            AIDR => 0x02,
            CR0 | CR0ACK => r.cr0,
            CR1 => r.cr1,
            CR2 => r.cr2,
            GBPA => r.gbpa,
            IRQ_CTRL | IRQ_CTRLACK => r.irq_ctrl,
            GERROR => r.gerror,
            GERRORN => r.gerrorn,
            GERROR_IRQ_CFG0 => lo(r.gerror_irq_cfg0),
            0x6C => hi(r.gerror_irq_cfg0),
            GERROR_IRQ_CFG1 => r.gerror_irq_cfg1,
            GERROR_IRQ_CFG2 => r.gerror_irq_cfg2,
            STRTAB_BASE => lo(r.strtab_base),
            0x84 => hi(r.strtab_base),
            STRTAB_BASE_CFG => r.strtab_base_cfg,
            CMDQ_BASE => lo(r.cmdq_base),
            0x94 => hi(r.cmdq_base),
            CMDQ_PROD => r.cmdq_prod,
            CMDQ_CONS => r.cmdq_cons,
            EVENTQ_BASE => lo(r.eventq_base),
            0xA4 => hi(r.eventq_base),
            0xA8 => r.eventq_prod,
            0xAC => r.eventq_cons,
            EVENTQ_IRQ_CFG0 => lo(r.eventq_irq_cfg0),
            0xB4 => hi(r.eventq_irq_cfg0),
            EVENTQ_IRQ_CFG1 => r.eventq_irq_cfg1,
            EVENTQ_IRQ_CFG2 => r.eventq_irq_cfg2,
            PRIQ_BASE => lo(r.priq_base),
            0xC4 => hi(r.priq_base),
            0xC8 => r.priq_prod,
            0xCC => r.priq_cons,
            PRIQ_IRQ_CFG0 => lo(r.priq_irq_cfg0),
            0xD4 => hi(r.priq_irq_cfg0),
            PRIQ_IRQ_CFG1 => r.priq_irq_cfg1,
            PRIQ_IRQ_CFG2 => r.priq_irq_cfg2,
            // IDR2 (no VATOS), IDR4, IIDR, STATUSR and unimplemented registers.
            _ => 0,
        }
    }

    fn write32(&mut self, offset: u64, v: u32) {
        let cmdq_on = self.regs.cr0 & CR0_CMDQEN != 0;
        let evtq_on = self.regs.cr0 & CR0_EVENTQEN != 0;
        let priq_on = self.regs.cr0 & CR0_PRIQEN != 0;
        let smmu_on = self.enabled();
        let cr2_mask = CR2_RECINVSID | if self.props.ats { CR2_REC_CFG_ATS } else { 0 };
        let mut cr0_mask = CR0_MASK;
        if !self.props.ats {
            cr0_mask &= !CR0_ATSCHK;
        }
        if !self.props.pri {
            cr0_mask &= !CR0_PRIQEN;
        }
        let r = &mut self.regs;
        match offset & !0x10000 {
            CR0 => r.cr0 = v & cr0_mask,
            // CR1 and CR2 are read-only while SMMUEN = 1.
            CR1 if !smmu_on => r.cr1 = v & 0x3f,
            CR2 if !smmu_on => r.cr2 = v & cr2_mask,
            GBPA if v & GBPA_UPDATE != 0 => r.gbpa = v & GBPA_FIELDS,
            IRQ_CTRL => r.irq_ctrl = v & 0x7,
            GERRORN => r.gerrorn = v & GERROR_MASK,
            GERROR_IRQ_CFG0 => set_half(&mut r.gerror_irq_cfg0, false, v, IRQ_CFG0_MASK),
            0x6C => set_half(&mut r.gerror_irq_cfg0, true, v, IRQ_CFG0_MASK),
            GERROR_IRQ_CFG1 => r.gerror_irq_cfg1 = v,
            GERROR_IRQ_CFG2 => r.gerror_irq_cfg2 = v & 0x3f,
            // Table and queue bases are ignored while the structure is in use.
            STRTAB_BASE if !smmu_on => set_half(&mut r.strtab_base, false, v, STRTAB_BASE_MASK),
            0x84 if !smmu_on => set_half(&mut r.strtab_base, true, v, STRTAB_BASE_MASK),
            STRTAB_BASE_CFG if !smmu_on => r.strtab_base_cfg = v & STRTAB_BASE_CFG_MASK,
            CMDQ_BASE if !cmdq_on => set_half(&mut r.cmdq_base, false, v, Q_BASE_MASK),
            0x94 if !cmdq_on => set_half(&mut r.cmdq_base, true, v, Q_BASE_MASK),
            CMDQ_PROD => r.cmdq_prod = v & Q_POS_MASK,
            CMDQ_CONS if !cmdq_on => {
                r.cmdq_cons = (v & Q_POS_MASK) | (r.cmdq_cons & (0x7f << CMDQ_CONS_ERR_SHIFT));
            }
            EVENTQ_BASE if !evtq_on => set_half(&mut r.eventq_base, false, v, Q_BASE_MASK),
            0xA4 if !evtq_on => set_half(&mut r.eventq_base, true, v, Q_BASE_MASK),
            0xA8 if !evtq_on => r.eventq_prod = v & (Q_POS_MASK | Q_OVFLG),
            0xAC => r.eventq_cons = v & (Q_POS_MASK | Q_OVFLG),
            EVENTQ_IRQ_CFG0 => set_half(&mut r.eventq_irq_cfg0, false, v, IRQ_CFG0_MASK),
            0xB4 => set_half(&mut r.eventq_irq_cfg0, true, v, IRQ_CFG0_MASK),
            EVENTQ_IRQ_CFG1 => r.eventq_irq_cfg1 = v,
            EVENTQ_IRQ_CFG2 => r.eventq_irq_cfg2 = v & 0x3f,
            PRIQ_BASE if !priq_on => set_half(&mut r.priq_base, false, v, Q_BASE_MASK),
            0xC4 if !priq_on => set_half(&mut r.priq_base, true, v, Q_BASE_MASK),
            0xC8 if !priq_on => r.priq_prod = v & (Q_POS_MASK | Q_OVFLG),
            0xCC => r.priq_cons = v & (Q_POS_MASK | Q_OVFLG),
            PRIQ_IRQ_CFG0 => set_half(&mut r.priq_irq_cfg0, false, v, IRQ_CFG0_MASK),
            0xD4 => set_half(&mut r.priq_irq_cfg0, true, v, IRQ_CFG0_MASK),
            PRIQ_IRQ_CFG1 => r.priq_irq_cfg1 = v,
            PRIQ_IRQ_CFG2 => r.priq_irq_cfg2 = v & 0x3f,
            _ => {}
        }
        if cmdq_on && self.regs.cr0 & CR0_CMDQEN == 0 {
            // Disabling the queue abandons a waiting CMD_SYNC; software may rewrite CONS.
            // Outstanding invalidations stay outstanding for the next CMD_SYNC.
            self.wait = CmdqWait::Running;
        }
    }

    fn cmdq_geometry(&self) -> QueueGeometry {
        QueueGeometry::from_base(self.regs.cmdq_base, self.props.cmdq_log2, 16)
    }

    fn eventq_geometry(&self) -> QueueGeometry {
        QueueGeometry::from_base(self.regs.eventq_base, self.props.eventq_log2, 32)
    }

    fn priq_geometry(&self) -> QueueGeometry {
        QueueGeometry::from_base(self.regs.priq_base, self.props.priq_log2, 16)
    }

    // ----------------------------------------------------------------------------------------
    // Outputs, interrupts, global errors
    // ----------------------------------------------------------------------------------------

    /// Everything the model asked for since the last call. Drain after every call that can
    /// produce output (MMIO writes, acknowledgements, transactions); command processing pauses
    /// at [`OUTPUT_CAPACITY`] undrained outputs.
    pub fn take_outputs(&mut self) -> Vec<Smmuv3Output> {
        std::mem::take(&mut self.outputs)
    }

    fn interrupt(&mut self, source: InterruptSource) {
        let (cfg0, cfg1) = match source {
            InterruptSource::EventQueue => (self.regs.eventq_irq_cfg0, self.regs.eventq_irq_cfg1),
            InterruptSource::GlobalError => (self.regs.gerror_irq_cfg0, self.regs.gerror_irq_cfg1),
            InterruptSource::PriQueue => (self.regs.priq_irq_cfg0, self.regs.priq_irq_cfg1),
            InterruptSource::CmdSync => (0, 0),
        };
        let msi = (self.props.msi && cfg0 != 0).then_some(MsiMessage {
            address: cfg0,
            data: cfg1,
        });
        let out = Smmuv3Output::Interrupt(Interrupt { source, msi });
        // Interrupts are edge-like: one pending instance is enough until drained.
        if !self.outputs.contains(&out) {
            self.outputs.push(out);
        }
    }

    fn gerror_active(&self, bit: u32) -> bool {
        (self.regs.gerror ^ self.regs.gerrorn) & bit != 0
    }

    fn raise_gerror(&mut self, bit: u32) {
        if !self.gerror_active(bit) {
            self.regs.gerror ^= bit;
            if self.regs.irq_ctrl & IRQ_CTRL_GERROR_IRQEN != 0 {
                self.interrupt(InterruptSource::GlobalError);
            }
        }
    }

    /// Write one event record (or note the overflow). Events are only recorded while the
    /// event queue is enabled.
    fn record_event<M: GuestMemory + ?Sized>(&mut self, mem: &M, ev: &Event) -> bool {
        if self.regs.cr0 & CR0_EVENTQEN == 0 || self.gerror_active(GERROR_EVENTQ_ABT_ERR) {
            return false;
        }
        let q = self.eventq_geometry();
        let (prod, cons) = (self.regs.eventq_prod, self.regs.eventq_cons);
        if q.is_full(prod, cons) {
            // Overflow: toggle OVFLG once until software acknowledges with OVACKFLG.
            if (prod ^ cons) & Q_OVFLG == 0 {
                self.regs.eventq_prod ^= Q_OVFLG;
            }
            return false;
        }
        if mem.write(q.slot_addr(prod), &ev.encode()).is_err() {
            self.raise_gerror(GERROR_EVENTQ_ABT_ERR);
            return false;
        }
        self.regs.eventq_prod = q.next(prod) | (prod & Q_OVFLG);
        if self.regs.irq_ctrl & IRQ_CTRL_EVENTQ_IRQEN != 0 {
            self.interrupt(InterruptSource::EventQueue);
        }
        true
    }

    // ----------------------------------------------------------------------------------------
    // Configuration: stream table and context descriptors
    // ----------------------------------------------------------------------------------------

    fn fetch_ste<M: GuestMemory + ?Sized>(&mut self, mem: &M, sid: u32) -> Result<Ste, Event> {
        if let Some(ste) = self.cache.ste(sid) {
            return Ok(ste);
        }
        let cfg = self.regs.strtab_base_cfg;
        let base = self.regs.strtab_base & 0x000f_ffff_ffff_ffc0;
        let log2size = (cfg & 0x3f).min(u32::from(self.props.sid_bits));
        let bad_sid = Event::config(EventType::CBadStreamId, sid, None);
        if u64::from(sid) >> log2size != 0 {
            return Err(bad_sid);
        }
        let two_level = self.props.two_level_stream_table && cfg >> 16 & 3 == 1;
        let addr = if two_level {
            let split = match cfg >> 6 & 0x1f {
                0..=6 => 6,
                7..=8 => 8,
                _ => 10,
            }
            .min(log2size);
            let l1_addr = base + (u64::from(sid) >> split) * 8;
            let l1 = read_u64(mem, l1_addr).map_err(|_| Event {
                aux_addr: l1_addr,
                ..Event::config(EventType::FSteFetch, sid, None)
            })?;
            let span = (l1 & 0x1f) as u32;
            if span == 0 {
                return Err(bad_sid);
            }
            let span = span.min(split + 1);
            let l2_index = u64::from(sid) & ((1u64 << split) - 1);
            if l2_index >> (span - 1) != 0 {
                return Err(bad_sid);
            }
            (l1 & 0x000f_ffff_ffff_ffc0) + l2_index * 64
        } else {
            base + u64::from(sid) * 64
        };
        let words: [u64; 8] = read_words(mem, addr).map_err(|_| Event {
            aux_addr: addr,
            ..Event::config(EventType::FSteFetch, sid, None)
        })?;
        let ste = decode_ste(&words, &self.props)
            .map_err(|Illegal| Event::config(EventType::CBadSte, sid, None))?;
        self.cache.insert_ste(sid, ste);
        Ok(ste)
    }

    /// Read a word of a CD table: at an IPA through stage 2 when the stream has one.
    fn read_cd_word<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        s2: Option<&Stage2Config>,
        addr: u64,
        sid: u32,
        ssid: u32,
        nwords: usize,
    ) -> Result<[u64; 4], Stop> {
        let pa = match s2 {
            Some(s2) => {
                stage2_fetch(mem, s2, addr, FaultClass::Cd).map_err(|fault| Stop::Walk {
                    fault,
                    record: s2.record,
                    raz_wi: false,
                })?
            }
            None => addr,
        };
        let fetch_err = |_| {
            Stop::Config(Event {
                aux_addr: pa,
                ..Event::config(EventType::FCdFetch, sid, Some(ssid))
            })
        };
        let mut out = [0u64; 4];
        for (i, w) in out.iter_mut().enumerate().take(nwords) {
            *w = read_u64(mem, pa + 8 * i as u64).map_err(fetch_err)?;
        }
        Ok(out)
    }

    fn fetch_cd<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        sid: u32,
        s1: &Stage1Config,
        s2: Option<&Stage2Config>,
        ssid: u32,
    ) -> Result<Cd, Stop> {
        if let Some(cd) = self.cache.cd(sid, ssid) {
            return Ok(cd);
        }
        let index = u64::from(ssid);
        let addr = match s1.fmt {
            CdTableFormat::Linear => s1.ctx_ptr + index * 64,
            CdTableFormat::TwoLevel { split } => {
                let l1 =
                    self.read_cd_word(mem, s2, s1.ctx_ptr + (index >> split) * 8, sid, ssid, 1)?[0];
                if l1 & 1 == 0 {
                    return Err(Stop::Config(Event::config(
                        EventType::CBadSubstreamId,
                        sid,
                        Some(ssid),
                    )));
                }
                (l1 & 0x000f_ffff_ffff_f000) + (index & ((1 << split) - 1)) * 64
            }
        };
        let words = self.read_cd_word(mem, s2, addr, sid, ssid, 4)?;
        let cd = decode_cd(&words, &self.props)
            .map_err(|Illegal| Stop::Config(Event::config(EventType::CBadCd, sid, Some(ssid))))?;
        self.cache.insert_cd(sid, ssid, cd);
        Ok(cd)
    }

    /// STE and (if stage 1 applies to this transaction) CD for `sid`/`ssid`.
    fn context<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        sid: u32,
        ssid: Option<u32>,
    ) -> Result<Context, Stop> {
        let ste = self.fetch_ste(mem, sid).map_err(Stop::Config)?;
        let Ste::Translate { s1, s2, eats, vmid } = ste else {
            return Ok(Context::Abort);
        };
        let bad_ssid = || Stop::Config(Event::config(EventType::CBadSubstreamId, sid, ssid));
        let cd_index = match (s1, ssid) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad_ssid()),
            (Some(s1), Some(ssid)) => {
                if s1.cd_max == 0
                    || u64::from(ssid) >> s1.cd_max != 0
                    || (s1.dss == S1Dss::Substream0 && ssid == 0)
                {
                    return Err(bad_ssid());
                }
                Some(ssid)
            }
            (Some(s1), None) if s1.cd_max == 0 => Some(0),
            (Some(s1), None) => match s1.dss {
                S1Dss::Terminate => {
                    return Err(Stop::Config(Event::config(
                        EventType::FStreamDisabled,
                        sid,
                        None,
                    )))
                }
                S1Dss::Bypass => None,
                S1Dss::Substream0 => Some(0),
            },
        };
        let cd = match (s1, cd_index) {
            (Some(s1), Some(index)) => Some(self.fetch_cd(mem, sid, &s1, s2.as_ref(), index)?),
            _ => None,
        };
        Ok(Context::Translate { eats, vmid, cd, s2 })
    }

    // ----------------------------------------------------------------------------------------
    // Translation core
    // ----------------------------------------------------------------------------------------

    /// Translate `addr` with the stages of `cd`/`s2` (stage 2 skipped when `stage1_only`),
    /// through the TLB.
    fn translate_addr<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        vmid: u16,
        cd: Option<&Cd>,
        s2: Option<&Stage2Config>,
        stage1_only: bool,
        addr: u64,
    ) -> Result<Translation, Stop> {
        let s2 = if stage1_only { None } else { s2 };
        let kind = match (cd.is_some(), s2.is_some(), stage1_only) {
            (true, _, true) => TlbKind::Stage1OfNested,
            (true, false, false) => TlbKind::Stage1,
            (false, true, _) => TlbKind::Stage2,
            (true, true, false) => TlbKind::Nested,
            (false, false, _) => return Ok(Translation::identity(addr)),
        };
        let asid = cd.map_or(0, |cd| cd.asid);
        if let Some(e) = self.tlb.lookup(kind, vmid, asid, addr) {
            return Ok(Translation {
                in_base: e.in_base,
                size_log2: e.size_log2,
                out_base: e.out_base,
                ipa_base: e.ipa_base,
                s1: e.perms_s1,
                s2: e.perms_s2,
                global: e.global,
            });
        }
        let t = match cd {
            Some(cd) => self.walk_stage1(mem, cd, s2, addr)?,
            None => {
                let s2 = s2.ok_or(Stop::Abort)?;
                let leaf = walk(&s2.walk, addr, false, &mut |a| {
                    read_desc(mem, a, Stage::Two)
                })
                .map_err(|fault| Stop::Walk {
                    fault: with_ipa(fault, addr),
                    record: s2.record,
                    raz_wi: false,
                })?;
                Translation {
                    in_base: leaf.in_base,
                    size_log2: leaf.size_log2,
                    out_base: leaf.out_base,
                    ipa_base: leaf.in_base,
                    s1: Perms::ALL,
                    s2: leaf.perms,
                    global: false,
                }
            }
        };
        self.tlb.insert(TlbEntry {
            kind,
            vmid,
            asid,
            global: t.global,
            in_base: t.in_base,
            size_log2: t.size_log2,
            out_base: t.out_base,
            ipa_base: t.ipa_base,
            perms_s1: t.s1,
            perms_s2: t.s2,
        });
        Ok(t)
    }

    fn walk_stage1<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        cd: &Cd,
        s2: Option<&Stage2Config>,
        addr: u64,
    ) -> Result<Translation, Stop> {
        let s1_stop = |fault| Stop::Walk {
            fault,
            record: cd.record,
            raz_wi: !cd.abort,
        };
        let s2_stop = |fault, record| Stop::Walk {
            fault,
            record,
            raz_wi: false,
        };
        let region = cd
            .region_for(addr)
            .ok_or_else(|| s1_stop(Fault::new(FaultKind::Translation, Stage::One, 12)))?;
        let leaf = match s2 {
            None => walk(&region.walk, addr, cd.wxn, &mut |a| {
                read_desc(mem, a, Stage::One)
            }),
            Some(s2) => walk(&region.walk, addr, cd.wxn, &mut |ipa| {
                let pa = stage2_fetch(mem, s2, ipa, FaultClass::TranslationTable)?;
                read_desc(mem, pa, Stage::One)
            }),
        }
        .map_err(|fault| {
            if fault.stage2 {
                s2_stop(fault, s2.is_some_and(|s| s.record))
            } else {
                s1_stop(fault)
            }
        })?;
        let Some(s2) = s2 else {
            return Ok(Translation {
                in_base: leaf.in_base,
                size_log2: leaf.size_log2,
                out_base: leaf.out_base,
                ipa_base: leaf.out_base,
                s1: leaf.perms,
                s2: Perms::ALL,
                global: leaf.global,
            });
        };
        let ipa = leaf.out_base + (addr - leaf.in_base);
        let leaf2 =
            walk(&s2.walk, ipa, false, &mut |a| read_desc(mem, a, Stage::Two)).map_err(|f| {
                let mut f = with_ipa(f, ipa);
                f.hole_log2 = f.hole_log2.min(leaf.size_log2);
                s2_stop(f, s2.record)
            })?;
        let size_log2 = leaf.size_log2.min(leaf2.size_log2);
        let mask = !((1u64 << size_log2) - 1);
        let pa = leaf2.out_base + (ipa - leaf2.in_base);
        Ok(Translation {
            in_base: addr & mask,
            size_log2,
            out_base: pa & mask,
            ipa_base: ipa & mask,
            s1: leaf.perms,
            s2: leaf2.perms,
            global: leaf.global,
        })
    }

    fn walk_event(&self, txn: &DmaRequest, fault: &Fault) -> Event {
        Event {
            kind: event_kind(fault.kind),
            sid: txn.sid,
            ssid: txn.ssid,
            privileged: txn.access.privileged,
            instruction: txn.access.exec,
            read: !txn.access.write,
            stage2: fault.stage2,
            class: fault.class,
            input_addr: txn.address,
            aux_addr: if fault.kind == FaultKind::WalkEabt {
                fault.fetch
            } else {
                fault.ipa
            },
        }
    }

    /// Turn a stop into the DMA result, recording its event. `ats_related` applies the
    /// SMMUv3 rule for translation requests and translated transactions: configuration errors
    /// are only recorded with CR2.REC_CFG_ATS. C_BAD_STREAMID additionally needs
    /// CR2.RECINVSID.
    fn terminate<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        txn: &DmaRequest,
        stop: Stop,
        ats_related: bool,
    ) -> DmaFault {
        match stop {
            Stop::Abort => DmaFault {
                event: None,
                raz_wi: false,
            },
            Stop::Config(ev) => {
                let ev = Event {
                    privileged: txn.access.privileged,
                    instruction: txn.access.exec,
                    read: !txn.access.write,
                    input_addr: txn.address,
                    ssid: ev.ssid.or(txn.ssid),
                    ..ev
                };
                let always = matches!(
                    ev.kind,
                    EventType::FBadAtsTreq | EventType::FTranslForbidden
                );
                let mut record = always || !ats_related || self.regs.cr2 & CR2_REC_CFG_ATS != 0;
                if ev.kind == EventType::CBadStreamId && self.regs.cr2 & CR2_RECINVSID == 0 {
                    record = false;
                }
                let recorded = record && self.record_event(mem, &ev);
                DmaFault {
                    event: recorded.then_some(ev.kind),
                    raz_wi: false,
                }
            }
            Stop::Walk {
                fault,
                record,
                raz_wi,
            } => {
                let ev = self.walk_event(txn, &fault);
                let record = if fault.kind == FaultKind::WalkEabt {
                    !ats_related || self.regs.cr2 & CR2_REC_CFG_ATS != 0
                } else {
                    record
                };
                let recorded = record && self.record_event(mem, &ev);
                DmaFault {
                    event: recorded.then_some(ev.kind),
                    raz_wi,
                }
            }
        }
    }

    /// Check the access against a translation; `Err` is the permission fault.
    fn check_access(
        t: &Translation,
        access: &Access,
        s1_record: bool,
        s1_raz_wi: bool,
        s2_record: bool,
    ) -> Result<(), Stop> {
        let allowed = |p: Perms| {
            let (r, w, x) = p.at(access.privileged);
            (if access.write { w } else { r }) && (!access.exec || x)
        };
        let mut fault = Fault::new(FaultKind::Permission, Stage::One, t.size_log2);
        if !allowed(t.s1) {
            return Err(Stop::Walk {
                fault,
                record: s1_record,
                raz_wi: s1_raz_wi,
            });
        }
        if !allowed(t.s2) {
            fault.stage2 = true;
            fault.ipa = t.ipa_base;
            return Err(Stop::Walk {
                fault,
                record: s2_record,
                raz_wi: false,
            });
        }
        Ok(())
    }

    /// Untranslated DMA: translate `req.address` for the access, recording faults as events.
    /// A transaction without a PASID is treated as data, unprivileged (SMMUv3 §13.7), whatever
    /// `req.access` says about privilege and execution.
    pub fn translate_dma<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        req: &DmaRequest,
    ) -> Result<DmaTranslation, DmaFault> {
        let req = &pcie_attributes(req);
        if !self.enabled() {
            if self.regs.gbpa & GBPA_ABORT != 0 {
                return Err(DmaFault {
                    event: None,
                    raz_wi: false,
                });
            }
            return Ok(identity(req.address));
        }
        let result = self
            .context(mem, req.sid, req.ssid)
            .and_then(|ctx| match ctx {
                Context::Abort => Err(Stop::Abort),
                Context::Translate { vmid, cd, s2, .. } => {
                    let t = self.translate_addr(
                        mem,
                        vmid,
                        cd.as_ref(),
                        s2.as_ref(),
                        false,
                        req.address,
                    )?;
                    let (s1_rec, s1_raz) = cd.map_or((true, false), |cd| (cd.record, !cd.abort));
                    let s2_rec = s2.is_some_and(|s| s.record);
                    Self::check_access(&t, &req.access, s1_rec, s1_raz, s2_rec)?;
                    Ok(DmaTranslation {
                        address: t.output(req.address),
                        contiguous: t.contiguous(req.address),
                    })
                }
            });
        result.map_err(|stop| self.terminate(mem, req, stop, false))
    }

    /// Translated DMA (AT = translated). vfud always checks the STE, as CR0.ATSCHK = 1 would:
    /// a device only reaches memory through translated requests when its STE enables ATS
    /// (EATS != 0). With full ATS the address is physical (and must fit the OAS); with
    /// split-stage ATS it is an IPA and goes through stage 2 like an ordinary transaction.
    /// With SMMUEN = 0, a bypass STE or EATS = 0 the transaction aborts with F_TRANSL_FORBIDDEN.
    pub fn translated_dma<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        req: &DmaRequest,
    ) -> Result<DmaTranslation, DmaFault> {
        let req = &pcie_attributes(req);
        let forbidden = Stop::Config(Event::config(
            EventType::FTranslForbidden,
            req.sid,
            req.ssid,
        ));
        if !self.enabled() {
            return Err(self.terminate(mem, req, forbidden, true));
        }
        let oas = self.props.oas.bits();
        let result = self
            .fetch_ste(mem, req.sid)
            .map_err(Stop::Config)
            .and_then(|ste| match ste {
                Ste::Abort => Err(Stop::Abort),
                Ste::Translate {
                    eats: Eats::Disabled,
                    ..
                }
                | Ste::Translate {
                    s1: None, s2: None, ..
                } => Err(forbidden),
                Ste::Translate {
                    eats: Eats::Full, ..
                } => {
                    if req.address >> oas != 0 {
                        return Err(Stop::Abort);
                    }
                    Ok(identity(req.address))
                }
                Ste::Translate {
                    eats: Eats::SplitStage,
                    s2,
                    vmid,
                    ..
                } => {
                    let t =
                        self.translate_addr(mem, vmid, None, s2.as_ref(), false, req.address)?;
                    let rec = s2.is_some_and(|s| s.record);
                    Self::check_access(&t, &req.access, rec, false, rec)?;
                    Ok(DmaTranslation {
                        address: t.output(req.address),
                        contiguous: t.contiguous(req.address),
                    })
                }
            });
        result.map_err(|stop| {
            // Only the stage-2 walk of split-stage ATS is an ordinary translation.
            let ats_related = !matches!(stop, Stop::Walk { .. });
            self.terminate(mem, req, stop, ats_related)
        })
    }

    /// ATS translation request (SMMUv3 §3.9.1.2): the translations covering
    /// `[address, address + length)`, at most `max_entries` (capped at [`MAX_ATS_ENTRIES`]),
    /// one per page or block, naturally aligned and consecutive.
    ///
    /// * UR with F_BAD_ATS_TREQ: SMMUEN = 0, a bypass STE, or an STE whose effective EATS is
    ///   0 (split-stage counts as 0 while CR0.ATSCHK = 0). UR without an event: abort STE.
    /// * CA: configuration errors (bad SID/STE/SSID/CD, fetch aborts, table-walk aborts);
    ///   their events are recorded only with CR2.REC_CFG_ATS.
    /// * Success with R = W = 0 for translation, access-flag and address-size faults at either
    ///   stage, never recorded: the device is expected to use PRI. The entry covers the block
    ///   of the level where the walk stopped, so the device learns the size of the hole.
    /// * Otherwise the permissions granted to the requested privilege: W whenever the page is
    ///   writable (permitted with NW = 1), Exe only when requested and readable, Global always 0.
    ///   A request without a PASID is unprivileged data.
    pub fn translate_ats<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        req: &AtsRequest,
        max_entries: usize,
    ) -> Result<Vec<AtsTranslation>, AtsError> {
        let (exec, privileged) = match req.ssid {
            Some(_) => (req.exec, req.privileged),
            None => (false, false),
        };
        let txn = DmaRequest {
            sid: req.sid,
            ssid: req.ssid,
            address: req.address,
            access: Access {
                write: !req.no_write,
                exec,
                privileged,
            },
        };
        let bad_treq = Stop::Config(Event::config(EventType::FBadAtsTreq, req.sid, req.ssid));
        if !self.enabled() {
            let f = self.terminate(mem, &txn, bad_treq, true);
            return Err(AtsError::UnsupportedRequest { event: f.event });
        }
        let ctx = match self.context(mem, req.sid, req.ssid) {
            Ok(ctx) => ctx,
            Err(Stop::Walk { fault, .. }) if fault.kind != FaultKind::WalkEabt => {
                // A stage-2 fault fetching the CD: the whole request is a hole.
                return Ok(vec![hole(req.address, fault.hole_log2, privileged)]);
            }
            Err(stop) => {
                self.terminate(mem, &txn, stop, true);
                return Err(AtsError::CompleterAbort);
            }
        };
        let Context::Translate { eats, vmid, cd, s2 } = ctx else {
            return Err(AtsError::UnsupportedRequest { event: None });
        };
        let atschk = self.regs.cr0 & CR0_ATSCHK != 0;
        let stream_bypass = cd.is_none() && s2.is_none() && !self.stage1_skipped(mem, req.sid);
        if eats == Eats::Disabled || (eats == Eats::SplitStage && !atschk) || stream_bypass {
            let f = self.terminate(mem, &txn, bad_treq, true);
            return Err(AtsError::UnsupportedRequest { event: f.event });
        }
        let split = eats == Eats::SplitStage;
        let max = max_entries.min(MAX_ATS_ENTRIES);
        let end = req.address.saturating_add(req.length.max(1));
        let mut addr = req.address & !0xfff;
        let mut out = Vec::new();
        while addr < end && out.len() < max {
            let entry = match self.translate_addr(mem, vmid, cd.as_ref(), s2.as_ref(), split, addr)
            {
                Ok(t) => {
                    let (r, w, x) = t.s1.intersect(t.s2).at(privileged);
                    AtsTranslation {
                        untranslated: t.in_base,
                        size_log2: t.size_log2 as u8,
                        translated: t.out_base,
                        r,
                        w,
                        x: x && r && exec,
                        privileged,
                        global: false,
                        untranslated_only: false,
                    }
                }
                Err(Stop::Walk { fault, .. }) if fault.kind != FaultKind::WalkEabt => {
                    hole(addr, fault.hole_log2, privileged)
                }
                Err(stop) => {
                    self.terminate(
                        mem,
                        &DmaRequest {
                            address: addr,
                            ..txn
                        },
                        stop,
                        true,
                    );
                    return Err(AtsError::CompleterAbort);
                }
            };
            out.push(entry);
            match entry.untranslated.checked_add(1u64 << entry.size_log2) {
                Some(next) => addr = next,
                None => break,
            }
        }
        Ok(out)
    }

    /// Whether the STE of `sid` is a stage-1 configuration whose S1DSS skipped stage 1 (as
    /// opposed to an STE that bypasses both stages).
    fn stage1_skipped<M: GuestMemory + ?Sized>(&mut self, mem: &M, sid: u32) -> bool {
        matches!(
            self.fetch_ste(mem, sid),
            Ok(Ste::Translate { s1: Some(_), .. })
        )
    }

    /// Queue a PRI page request in the PRI queue.
    pub fn page_request<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        req: &PageRequest,
    ) -> Result<(), PriError> {
        if !self.props.pri {
            return Err(PriError::NotSupported);
        }
        if !self.enabled()
            || self.regs.cr0 & CR0_PRIQEN == 0
            || self.gerror_active(GERROR_PRIQ_ABT_ERR)
        {
            return Err(PriError::QueueDisabled);
        }
        let q = self.priq_geometry();
        let (prod, cons) = (self.regs.priq_prod, self.regs.priq_cons);
        if q.is_full(prod, cons) || (prod ^ cons) & Q_OVFLG != 0 {
            if (prod ^ cons) & Q_OVFLG == 0 {
                self.regs.priq_prod ^= Q_OVFLG;
            }
            return Err(PriError::Overflow);
        }
        let dw0 = u64::from(req.sid)
            | u64::from(req.ssid.unwrap_or(0) & 0xf_ffff) << 32
            | u64::from(req.privileged) << 58
            | u64::from(req.exec) << 59
            | u64::from(req.read) << 60
            | u64::from(req.write) << 61
            | u64::from(req.last) << 62
            | u64::from(req.ssid.is_some()) << 63;
        let dw1 = u64::from(req.prgi & 0x1ff) | (req.address & !0xfff);
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&dw0.to_le_bytes());
        entry[8..].copy_from_slice(&dw1.to_le_bytes());
        if mem.write(q.slot_addr(prod), &entry).is_err() {
            self.raise_gerror(GERROR_PRIQ_ABT_ERR);
            return Err(PriError::QueueDisabled);
        }
        self.regs.priq_prod = q.next(prod) | (prod & Q_OVFLG);
        if self.regs.irq_ctrl & IRQ_CTRL_PRIQ_IRQEN != 0 {
            self.interrupt(InterruptSource::PriQueue);
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Command queue
    // ----------------------------------------------------------------------------------------

    /// Whether unconsumed commands remain that another [`Smmuv3::process_commands`] call would
    /// make progress on (budget exhausted or outputs drained since).
    pub fn commands_pending(&self) -> bool {
        let q = self.cmdq_geometry();
        self.regs.cr0 & CR0_CMDQEN != 0
            && !self.gerror_active(GERROR_CMDQ_ERR)
            && self.wait == CmdqWait::Running
            && !q.is_empty(self.regs.cmdq_prod, self.regs.cmdq_cons)
    }

    /// Whether a CMD_SYNC is waiting for device ATC invalidations (the embedding runs its
    /// timeout while this holds).
    pub fn waiting_for_atc(&self) -> bool {
        self.wait != CmdqWait::Running
    }

    /// Consume commands from CONS towards PROD: at most [`COMMAND_BUDGET`], stopping at an
    /// error, a CMD_SYNC that must wait, or a full output buffer. Returns whether commands
    /// remain that a further call would consume.
    pub fn process_commands<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> bool {
        for _ in 0..COMMAND_BUDGET {
            if !self.commands_pending() {
                return false;
            }
            if self.outputs.len() >= OUTPUT_CAPACITY {
                return true;
            }
            let q = self.cmdq_geometry();
            let cons = self.regs.cmdq_cons;
            let addr = q.slot_addr(cons);
            let Ok([dw0, dw1]) = read_words::<M, 2>(mem, addr) else {
                self.command_error(CERROR_ABT);
                return false;
            };
            let Ok(cmd) = cmdq::decode(dw0, dw1, &self.props) else {
                self.command_error(CERROR_ILL);
                return false;
            };
            if !self.execute(mem, cmd) {
                return false;
            }
            self.regs.cmdq_cons = q.next(cons) | (cons & (0x7f << CMDQ_CONS_ERR_SHIFT));
        }
        self.commands_pending()
    }

    fn command_error(&mut self, cerror: u32) {
        self.regs.cmdq_cons =
            (self.regs.cmdq_cons & !(0x7f << CMDQ_CONS_ERR_SHIFT)) | cerror << CMDQ_CONS_ERR_SHIFT;
        self.raise_gerror(GERROR_CMDQ_ERR);
    }

    /// Run one command; `false` leaves CONS at it (the queue waits).
    fn execute<M: GuestMemory + ?Sized>(&mut self, mem: &M, cmd: Command) -> bool {
        match cmd {
            Command::Nop => {}
            Command::CfgiSte { sid, count } => self.cache.invalidate_stes(sid, count),
            Command::CfgiCd { sid, ssid } => self.cache.invalidate_cd(sid, ssid),
            Command::CfgiCdAll { sid } => self.cache.invalidate_cds(sid),
            Command::TlbiNhAll { vmid } => self.tlb.invalidate_nh_all(vmid),
            Command::TlbiNhAsid { vmid, asid } => self.tlb.invalidate_nh_asid(vmid, asid),
            Command::TlbiNhVa {
                vmid,
                asid,
                start,
                end,
            } => self.tlb.invalidate_nh_va(vmid, asid, start, end),
            Command::TlbiS12Vmall { vmid } => self.tlb.invalidate_vmid(vmid),
            Command::TlbiS2Ipa { vmid, start, end } => self.tlb.invalidate_s2_ipa(vmid, start, end),
            Command::TlbiNsnhAll => self.tlb.clear(),
            Command::AtcInv {
                sid,
                ssid,
                global,
                start,
                size_log2,
            } => {
                if self.outstanding_atc.len() >= MAX_OUTSTANDING_ATC_INVALIDATIONS {
                    self.wait = CmdqWait::AtcCapacity;
                    return false;
                }
                let id = self.next_atc_id;
                self.next_atc_id += 1;
                self.outstanding_atc.insert(id);
                self.outputs
                    .push(Smmuv3Output::AtcInvalidate(AtcInvalidation {
                        id,
                        sid,
                        ssid,
                        global,
                        start,
                        size_log2,
                    }));
            }
            Command::PriResp {
                sid,
                ssid,
                prgi,
                code,
            } => {
                self.outputs.push(Smmuv3Output::PriResponse(PriResponse {
                    sid,
                    ssid,
                    prgi,
                    code,
                }));
            }
            Command::Sync {
                signal,
                msi_data,
                msi_addr,
            } => {
                if !self.outstanding_atc.is_empty() {
                    self.wait = CmdqWait::Sync;
                    return false;
                }
                match signal {
                    SyncSignal::None => {}
                    SyncSignal::Irq if self.props.msi => {
                        if msi_addr != 0 && mem.write(msi_addr, &msi_data.to_le_bytes()).is_err() {
                            self.raise_gerror(GERROR_MSI_CMDQ_ABT_ERR);
                        }
                    }
                    SyncSignal::Irq => self.interrupt(InterruptSource::CmdSync),
                    SyncSignal::Sev => self.outputs.push(Smmuv3Output::SendEvent),
                }
            }
        }
        true
    }

    /// Number of device ATC invalidations issued and not yet acknowledged.
    pub fn outstanding_atc_invalidations(&self) -> usize {
        self.outstanding_atc.len()
    }

    /// A device finished the invalidation `id`. Resumes a waiting CMD_SYNC when it was the
    /// last one. Unknown ids (late acknowledgements after a timeout) are ignored; returns
    /// whether the id was outstanding.
    pub fn ack_atc_invalidation<M: GuestMemory + ?Sized>(&mut self, mem: &M, id: u64) -> bool {
        if !self.outstanding_atc.remove(&id) {
            return false;
        }
        let resume = match self.wait {
            CmdqWait::Sync => self.outstanding_atc.is_empty(),
            CmdqWait::AtcCapacity => true,
            CmdqWait::Running => false,
        };
        if resume {
            self.wait = CmdqWait::Running;
            self.process_commands(mem);
        }
        true
    }

    /// The embedding's deadline for the outstanding invalidations passed while a CMD_SYNC was
    /// waiting: the SYNC fails with CERROR_ATC_INV_SYNC (CONS stays at it, GERROR.CMDQ_ERR),
    /// and the outstanding invalidations are abandoned so that the retried SYNC completes once
    /// software acknowledges the error. Returns whether a SYNC was failed.
    pub fn atc_invalidation_timeout(&mut self) -> bool {
        if self.wait == CmdqWait::Running {
            return false;
        }
        self.outstanding_atc.clear();
        self.wait = CmdqWait::Running;
        self.command_error(CERROR_ATC_INV_SYNC);
        true
    }

    /// Number of cached translations (for tests and metrics).
    pub fn tlb_entries(&self) -> usize {
        self.tlb.len()
    }
}

/// PCIe: a transaction without a PASID is data and unprivileged.
fn pcie_attributes(req: &DmaRequest) -> DmaRequest {
    let mut req = *req;
    if req.ssid.is_none() {
        req.access.exec = false;
        req.access.privileged = false;
    }
    req
}

/// Identity translation (bypass), valid to the end of its 1 GiB block.
fn identity(addr: u64) -> DmaTranslation {
    let t = Translation::identity(addr);
    DmaTranslation {
        address: addr,
        contiguous: t.contiguous(addr),
    }
}

fn hole(addr: u64, size_log2: u32, privileged: bool) -> AtsTranslation {
    let size_log2 = size_log2.clamp(12, 63);
    AtsTranslation {
        untranslated: addr & !((1u64 << size_log2) - 1),
        size_log2: size_log2 as u8,
        translated: 0,
        r: false,
        w: false,
        x: false,
        privileged,
        global: false,
        untranslated_only: false,
    }
}

fn with_ipa(mut f: Fault, ipa: u64) -> Fault {
    if f.stage2 && f.class == FaultClass::Input {
        f.ipa = ipa;
    }
    f
}

/// One descriptor read; an abort is F_WALK_EABT at the fetch address.
fn read_desc<M: GuestMemory + ?Sized>(mem: &M, addr: u64, stage: Stage) -> Result<u64, Fault> {
    read_u64(mem, addr).map_err(|_| Fault {
        fetch: addr,
        ..Fault::new(FaultKind::WalkEabt, stage, 12)
    })
}

/// Translate a stage-1 table or CD address (an IPA) through stage 2; the fetch needs stage-2
/// read permission. Faults carry `class` and the IPA.
fn stage2_fetch<M: GuestMemory + ?Sized>(
    mem: &M,
    s2: &Stage2Config,
    ipa: u64,
    class: FaultClass,
) -> Result<u64, Fault> {
    let tag = |mut f: Fault| {
        f.stage2 = true;
        f.class = class;
        f.ipa = ipa;
        // A fault fetching a table says nothing about the size of the input hole.
        f.hole_log2 = 12;
        f
    };
    let leaf = walk(&s2.walk, ipa, false, &mut |a| read_desc(mem, a, Stage::Two)).map_err(tag)?;
    if !leaf.perms.r_priv {
        return Err(tag(Fault::new(FaultKind::Permission, Stage::Two, 12)));
    }
    Ok(leaf.out_base + (ipa - leaf.in_base))
}
