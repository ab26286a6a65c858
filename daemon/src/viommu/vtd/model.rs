//! The VT-d remapping unit: register file, fault recording and event interrupts.
//!
//! Everything the guest can reach goes through [`Vtd::mmio_write`] / [`Vtd::mmio_read`] and the
//! request entry points in `translate.rs`; nothing here blocks, allocates without a bound, or
//! panics on guest-controlled values.

use thiserror::Error;

use super::cache::Caches;
use super::fault::FaultRecord;
use super::memory::GuestMemoryAccess;
use super::queue::QueueState;
use super::regs::*;
use super::tables::RootPointer;

/// Something the embedding code must deliver on the model's behalf. Drain with
/// [`Vtd::take_events`] after every call into the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VtdEvent {
    /// Send an MSI (from FEADDR/FEDATA or IEADDR/IEDATA).
    Interrupt {
        /// Which event register set produced it.
        source: InterruptSource,
        /// MSI address (upper half from the *UADDR register).
        address: u64,
        /// MSI data.
        data: u32,
    },
    /// Invalidate the device's ATC, then call [`Vtd::ack_atc_invalidation`] with `tag`.
    InvalidateDeviceAtc(AtcInvalidation),
}

/// The event register set an interrupt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptSource {
    /// Fault event (FECTL/FEDATA/FEADDR): faults, IQE, ITE, ICE.
    Fault,
    /// Invalidation completion event (IECTL/IEDATA/IEADDR): wait descriptor with IF.
    InvalidationCompletion,
}

/// "Invalidate device ATC": what a device-TLB (type 3) or PASID-based device-TLB (type 8)
/// descriptor asks of the endpoint `sid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtcInvalidation {
    /// Identifies this request in [`Vtd::ack_atc_invalidation`].
    pub tag: u64,
    /// Requester id of the endpoint.
    pub sid: u16,
    /// `None`: entries of every PASID and of no PASID (an ATS invalidation without PASID
    /// prefix, type 3). `Some(p)`: entries tagged with PASID `p` (type 8).
    pub pasid: Option<u32>,
    /// Also drop global entries of every PASID (type 8 G bit).
    pub global: bool,
    /// First untranslated address of the range (aligned to its size).
    pub base: u64,
    /// log2 of the range size; 64 means the whole address space.
    pub size_log2: u8,
}

/// A register access the model refuses (the caller treats it as a no-op / reads zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VtdMmioError {
    /// Not 4 or 8 bytes, misaligned, or outside the register window.
    #[error("VT-d register access of {len} bytes at offset {offset:#x} is not a naturally aligned 32- or 64-bit access inside the window.")]
    BadAccess {
        /// Offset in the register window.
        offset: u64,
        /// Access size in bytes.
        len: usize,
    },
}

/// Most events buffered between two [`Vtd::take_events`] calls; interrupts beyond it are
/// dropped (their pending state stays visible in the registers), ATC invalidations cannot
/// exceed it because at most [`super::queue::MAX_OUTSTANDING_ATC`] are outstanding.
pub const MAX_BUFFERED_EVENTS: usize = 256;

/// An emulated VT-d remapping hardware unit.
#[derive(Debug)]
pub struct Vtd {
    pub(crate) cfg: VtdConfig,
    regs: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    pub(crate) root: Option<RootPointer>,
    pub(crate) caches: Caches,
    pub(crate) queue: QueueState,
    next_fault: u16,
    events: Vec<VtdEvent>,
}

impl Vtd {
    /// A unit in its reset state.
    pub fn new(cfg: VtdConfig) -> Result<Self, VtdConfigError> {
        cfg.validate()?;
        let size = cfg.window_size() as usize;
        let mut v = Self {
            cfg,
            regs: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
            root: None,
            caches: Caches::default(),
            queue: QueueState::default(),
            next_fault: 0,
            events: Vec::new(),
        };
        v.reset_registers();
        Ok(v)
    }

    /// Return to the reset state (device reset): registers, latched root pointer, caches,
    /// queue progress and fault index. Outstanding ATC invalidations are forgotten; a late
    /// acknowledgement of one is an unexpected completion (FSTS.ICE).
    pub fn reset(&mut self) {
        self.regs.fill(0);
        self.root = None;
        self.caches = Caches::default();
        self.queue = QueueState::default();
        self.next_fault = 0;
        self.events.clear();
        self.reset_registers();
    }

    fn reset_registers(&mut self) {
        let haw = self.cfg.haw_mask() & !0xfff;
        self.init(VER, 4, 0x10, 0, 0); // version 1.0
        self.init(CAP, 8, self.cfg.cap(), 0, 0);
        self.init(ECAP, 8, self.cfg.ecap(), 0, 0);
        self.init(RTADDR, 8, 0, haw | 0xc00, 0);
        self.init(CCMD, 8, 0, 0xe000_0003_ffff_ffff, 0);
        self.init(
            FSTS,
            4,
            0,
            0,
            u64::from(FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE),
        );
        self.init(FECTL, 4, u64::from(EVT_IM), u64::from(EVT_IM), 0);
        self.init(FEDATA, 4, 0, 0xffff_ffff, 0);
        self.init(FEADDR, 4, 0, 0xffff_fffc, 0);
        self.init(IQT, 8, 0, 0x7fff0, 0);
        let dw = if self.cfg.scalable_mode { IQA_DW } else { 0 };
        self.init(IQA, 8, 0, haw | dw | 7, 0);
        self.init(ICS, 4, 0, 0, u64::from(ICS_IWC));
        self.init(IECTL, 4, u64::from(EVT_IM), u64::from(EVT_IM), 0);
        self.init(IEDATA, 4, 0, 0xffff_ffff, 0);
        self.init(IEADDR, 4, 0, 0xffff_fffc, 0);
        self.init(IVA, 8, 0, !0xfff_u64 & self.cfg.haw_mask() | 0x7f, 0);
        self.init(IOTLB_REG, 8, 0, 0xb003_ffff_0000_0000, 0);
        for i in 0..u64::from(self.cfg.fault_records) {
            self.init(FRCD + 16 * i + 8, 8, 0, 0, 1 << 63);
        }
    }

    fn init(&mut self, off: u64, len: usize, val: u64, wmask: u64, w1c: u64) {
        let o = off as usize;
        self.regs[o..o + len].copy_from_slice(&val.to_le_bytes()[..len]);
        self.wmask[o..o + len].copy_from_slice(&wmask.to_le_bytes()[..len]);
        self.w1c[o..o + len].copy_from_slice(&w1c.to_le_bytes()[..len]);
    }

    /// The properties this unit was built from.
    pub fn config(&self) -> &VtdConfig {
        &self.cfg
    }

    /// Size of the register window (BAR size).
    pub fn window_size(&self) -> u64 {
        self.regs.len() as u64
    }

    pub(crate) fn reg32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes([
            self.regs[o],
            self.regs[o + 1],
            self.regs[o + 2],
            self.regs[o + 3],
        ])
    }

    pub(crate) fn reg64(&self, off: u64) -> u64 {
        u64::from(self.reg32(off)) | (u64::from(self.reg32(off + 4)) << 32)
    }

    pub(crate) fn set_reg32(&mut self, off: u64, v: u32) {
        let o = off as usize;
        self.regs[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn set_reg64(&mut self, off: u64, v: u64) {
        self.set_reg32(off, v as u32);
        self.set_reg32(off + 4, (v >> 32) as u32);
    }

    fn check_access(&self, offset: u64, len: usize) -> Result<usize, VtdMmioError> {
        let bad = VtdMmioError::BadAccess { offset, len };
        if !(len == 4 || len == 8) || offset % len as u64 != 0 {
            return Err(bad);
        }
        let end = offset.checked_add(len as u64).ok_or(bad)?;
        if end > self.regs.len() as u64 {
            return Err(bad);
        }
        Ok(offset as usize)
    }

    /// Read a register (32- or 64-bit, naturally aligned). Unimplemented offsets read 0.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) -> Result<(), VtdMmioError> {
        let o = self.check_access(offset, data.len())?;
        data.copy_from_slice(&self.regs[o..o + data.len()]);
        Ok(())
    }

    /// Write a register (32- or 64-bit, naturally aligned) and run its side effects: commands,
    /// invalidations, queue processing (bounded per call; see [`Vtd::service_queue`]).
    pub fn mmio_write<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VtdMmioError> {
        let o = self.check_access(offset, data.len())?;
        let old_fsts = self.reg32(FSTS);
        let old_fectl = self.reg32(FECTL);
        let old_iectl = self.reg32(IECTL);
        for (i, &b) in data.iter().enumerate() {
            let (w, c) = (self.wmask[o + i], self.w1c[o + i]);
            let mut v = (self.regs[o + i] & !w) | (b & w);
            v &= !(b & c);
            self.regs[o + i] = v;
        }
        let (start, end) = (offset, offset + data.len() as u64);
        let hits = |reg: u64, len: u64| start < reg + len && reg < end;
        if hits(GCMD, 4) {
            let lo = GCMD.saturating_sub(start) as usize;
            if let Some(&[a, b, c, d]) = data.get(lo..lo + 4) {
                self.global_command(mem, u32::from_le_bytes([a, b, c, d]));
            }
        }
        if hits(CCMD + 4, 4) {
            self.context_command();
        }
        if hits(IOTLB_REG + 4, 4) {
            self.iotlb_command();
        }
        if hits(FSTS, 4) {
            self.after_fsts_write(mem, old_fsts);
        }
        if hits(FECTL, 4) {
            self.after_event_control_write(FECTL, old_fectl, InterruptSource::Fault);
        }
        if hits(IECTL, 4) {
            self.after_event_control_write(
                IECTL,
                old_iectl,
                InterruptSource::InvalidationCompletion,
            );
        }
        if hits(ICS, 4) && self.reg32(ICS) & ICS_IWC == 0 {
            let v = self.reg32(IECTL) & !EVT_IP;
            self.set_reg32(IECTL, v);
        }
        let frcd_end = FRCD + 16 * u64::from(self.cfg.fault_records);
        if start < frcd_end && FRCD < end {
            self.refresh_ppf();
        }
        if hits(IQT, 8) {
            self.service_queue(mem);
        }
        Ok(())
    }

    /// Convenience: 32-bit register read.
    pub fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        match self.mmio_read(offset, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    /// Convenience: 64-bit register read.
    pub fn read64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        match self.mmio_read(offset, &mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    /// Convenience: 32-bit register write.
    pub fn write32<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        offset: u64,
        v: u32,
    ) -> Result<(), VtdMmioError> {
        self.mmio_write(mem, offset, &v.to_le_bytes())
    }

    /// Convenience: 64-bit register write.
    pub fn write64<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        offset: u64,
        v: u64,
    ) -> Result<(), VtdMmioError> {
        self.mmio_write(mem, offset, &v.to_le_bytes())
    }

    /// Events produced since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<VtdEvent> {
        std::mem::take(&mut self.events)
    }

    pub(crate) fn push_event(&mut self, e: VtdEvent) {
        if self.events.len() < MAX_BUFFERED_EVENTS {
            self.events.push(e);
        }
    }

    /// Whether DMA remapping is enabled (GSTS.TES).
    pub fn translation_enabled(&self) -> bool {
        self.reg32(GSTS) & GCMD_TE != 0
    }

    fn global_command<M: GuestMemoryAccess + ?Sized>(&mut self, mem: &mut M, cmd: u32) {
        let mut sts = self.reg32(GSTS);
        if cmd & GCMD_SRTP != 0 {
            let rta = self.reg64(RTADDR);
            self.root = Some(RootPointer {
                addr: rta & self.cfg.haw_mask() & !0xfff,
                ttm: ((rta >> 10) & 3) as u8,
            });
            // ESRTPS: latching a root table also drops every cached translation.
            self.caches.flush_all();
            sts |= GCMD_SRTP;
        }
        sts = (sts & !GCMD_TE) | (cmd & GCMD_TE);
        let qie_was = sts & GCMD_QIE != 0;
        let qie = cmd & GCMD_QIE != 0;
        sts = (sts & !GCMD_QIE) | (cmd & GCMD_QIE);
        self.set_reg32(GSTS, sts);
        if qie != qie_was {
            // Enabling or disabling queued invalidation restarts the queue at its first entry.
            self.set_reg64(IQH, 0);
            self.queue = QueueState::default();
            if qie {
                self.service_queue(mem);
            }
        }
    }

    /// Register-based context-cache invalidation (CCMD.ICC).
    fn context_command(&mut self) {
        let v = self.reg64(CCMD);
        if v >> 63 == 0 {
            return;
        }
        let cirg = (v >> 61) & 3;
        match cirg {
            3 => {
                let sid = ((v >> 16) & 0xffff) as u16;
                let mask = function_mask((v >> 32) & 3);
                self.caches.flush_requesters(mask, sid & mask);
            }
            _ => self.caches.flush_all(),
        }
        // Clear ICC, report the granularity performed in CAIG.
        let v = (v & !(1 << 63) & !(3 << 59)) | (cirg.max(1) << 59);
        self.set_reg64(CCMD, v);
    }

    /// Register-based IOTLB invalidation (IOTLB_REG.IVT with IVA).
    fn iotlb_command(&mut self) {
        let v = self.reg64(IOTLB_REG);
        if v >> 63 == 0 {
            return;
        }
        let iirg = (v >> 60) & 3;
        let did = ((v >> 32) & 0xffff) as u16;
        let iva = self.reg64(IVA);
        match iirg {
            2 => self.caches.flush_iotlb(Some(did), None, None, false),
            3 => {
                let am = iva & 0x3f;
                let range = (am <= 18).then(|| {
                    let log2 = 12 + am as u8;
                    (iva & !((1u64 << log2) - 1), log2)
                });
                self.caches.flush_iotlb(Some(did), None, range, false);
            }
            _ => self.caches.flush_iotlb(None, None, None, false),
        }
        let v = (v & !(1 << 63) & !(3 << 57)) | (iirg.max(1) << 57);
        self.set_reg64(IOTLB_REG, v);
    }

    fn after_fsts_write<M: GuestMemoryAccess + ?Sized>(&mut self, mem: &mut M, old: u32) {
        let now = self.reg32(FSTS);
        if now & (FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE) == 0 {
            let v = self.reg32(FECTL) & !EVT_IP;
            self.set_reg32(FECTL, v);
        }
        let cleared = old & !now;
        if cleared & (FSTS_IQE | FSTS_ITE) != 0 {
            // Software fixed the queue (or gave up on the timed-out device): resume fetching.
            self.service_queue(mem);
        }
    }

    fn after_event_control_write(&mut self, reg: u64, old: u32, source: InterruptSource) {
        let now = self.reg32(reg);
        if old & EVT_IM != 0 && now & EVT_IM == 0 && now & EVT_IP != 0 {
            self.set_reg32(reg, now & !EVT_IP);
            self.send_interrupt(source);
        }
    }

    fn send_interrupt(&mut self, source: InterruptSource) {
        let (addr, uaddr, data) = match source {
            InterruptSource::Fault => (FEADDR, FEUADDR, FEDATA),
            InterruptSource::InvalidationCompletion => (IEADDR, IEUADDR, IEDATA),
        };
        let address = u64::from(self.reg32(addr)) | (u64::from(self.reg32(uaddr)) << 32);
        let data = self.reg32(data);
        self.push_event(VtdEvent::Interrupt {
            source,
            address,
            data,
        });
    }

    /// Raise an interrupt condition on an event register set: pending until unmasked.
    pub(crate) fn raise(&mut self, source: InterruptSource) {
        let reg = match source {
            InterruptSource::Fault => FECTL,
            InterruptSource::InvalidationCompletion => IECTL,
        };
        let ctl = self.reg32(reg);
        if ctl & EVT_IP != 0 {
            return;
        }
        if ctl & EVT_IM != 0 {
            self.set_reg32(reg, ctl | EVT_IP);
        } else {
            self.send_interrupt(source);
        }
    }

    /// Set FSTS bits (IQE/ICE/ITE/PFO) and raise a fault event if any was newly set.
    pub(crate) fn set_fault_status(&mut self, bits: u32) {
        let fsts = self.reg32(FSTS);
        if fsts & bits != bits {
            self.set_reg32(FSTS, fsts | bits);
            self.raise(InterruptSource::Fault);
        }
    }

    fn refresh_ppf(&mut self) {
        let pending = (0..u64::from(self.cfg.fault_records))
            .any(|i| self.reg64(FRCD + 16 * i + 8) >> 63 != 0);
        let fsts = self.reg32(FSTS);
        let v = if pending {
            fsts | FSTS_PPF
        } else {
            fsts & !FSTS_PPF
        };
        self.set_reg32(FSTS, v);
    }

    /// Record a primary fault (spec 7.2.1): overflow when the next record is still pending.
    pub(crate) fn record_fault(&mut self, rec: FaultRecord) {
        let fsts = self.reg32(FSTS);
        if fsts & FSTS_PFO != 0 {
            return;
        }
        let idx = u64::from(self.next_fault);
        let at = FRCD + 16 * idx;
        if self.reg64(at + 8) >> 63 != 0 {
            self.set_fault_status(FSTS_PFO);
            return;
        }
        let (lo, hi) = rec.encode();
        self.set_reg64(at, lo);
        self.set_reg64(at + 8, hi);
        self.next_fault = ((idx + 1) % u64::from(self.cfg.fault_records)) as u16;
        if fsts & FSTS_PPF == 0 {
            let v = (fsts & !0xff00) | FSTS_PPF | ((idx as u32 & 0xff) << 8);
            self.set_reg32(FSTS, v);
            self.raise(InterruptSource::Fault);
        }
    }

    /// The pending fault records, in register order (diagnostics and tests).
    pub fn pending_faults(&self) -> Vec<FaultRecord> {
        (0..u64::from(self.cfg.fault_records))
            .filter_map(|i| {
                FaultRecord::decode(self.reg64(FRCD + 16 * i), self.reg64(FRCD + 16 * i + 8))
            })
            .collect()
    }
}

/// Requester-id mask for a context invalidation function mask (FM: 0 none, 1..3 ignore the
/// low 1..3 function bits).
pub(crate) fn function_mask(fm: u64) -> u16 {
    match fm {
        1 => !0b100,
        2 => !0b110,
        3 => !0b111,
        _ => 0xffff,
    }
}
