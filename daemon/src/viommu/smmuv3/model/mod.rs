//! The SMMUv3 model: register file, translation core with its three entry points, command
//! queue, event queue and PRI queue.
//!
//! Everything is synchronous and driven by the caller: an MMIO access, a device transaction,
//! or an ATC-invalidation acknowledgement. The only work that outlives a call is a CMD_SYNC
//! waiting for device ATC invalidations, which resumes on [`Smmuv3::ack_atc_invalidation`]
//! or fails on [`Smmuv3::atc_invalidation_timeout`].
//!
//! This file holds the state, the register file, interrupts, GERROR and the event queue;
//! `translate` the translation core and its entry points; `commands` the command and PRI
//! queues.

mod commands;
mod translate;

use std::collections::BTreeSet;

use super::events::Event;
use super::memory::GuestMemory;
use super::props::{PropertiesError, Smmuv3Properties};
use super::regs::*;
use super::tlb::{ConfigCache, Tlb};
use super::types::*;

/// Most commands consumed per call; the rest wait for the next call to
/// [`Smmuv3::process_commands`]. Bounds the work one guest PROD write can cause.
pub const COMMAND_BUDGET: usize = 1024;
/// Most device ATC invalidations in flight; an ATC_INV beyond it waits for acknowledgements.
pub const MAX_OUTSTANDING_ATC_INVALIDATIONS: usize = 256;
/// Most undrained outputs; command processing pauses until [`Smmuv3::take_outputs`].
pub const OUTPUT_CAPACITY: usize = 4096;
/// Most ATS translations returned for one request.
pub const MAX_ATS_ENTRIES: usize = 512;

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
}
