//! Queued invalidation (VT-d spec 4.1 §6.5.2): descriptor decoding, cache invalidation, and
//! the device-TLB invalidation handshake.
//!
//! The queue is resumable. Device-TLB descriptors (types 3 and 8) become
//! [`VtdEvent::InvalidateDeviceAtc`] requests; a wait descriptor behind them holds the head
//! until every request is acknowledged ([`Vtd::ack_atc_invalidation`]) or declared timed out
//! ([`Vtd::atc_invalidation_timeout`], which sets FSTS.ITE and aborts the wait as hardware
//! does). Work per call is bounded by [`MAX_DESCRIPTORS_PER_KICK`]; a guest that queues more
//! is served by further [`Vtd::service_queue`] calls (see [`Vtd::queue_needs_service`]).

use super::memory::{read_qwords, GuestMemoryAccess};
use super::model::{AtcInvalidation, InterruptSource, Vtd, VtdEvent};
use super::regs::*;
use super::tables::ADDR_MASK;

/// Descriptors processed per register write or service call at most.
pub const MAX_DESCRIPTORS_PER_KICK: usize = 64;

/// Device-ATC invalidations outstanding at most; a further device-TLB descriptor waits at the
/// head until acknowledgements free a slot (hardware throttles the same way with MIP/QDEP).
pub const MAX_OUTSTANDING_ATC: usize = 32;

/// Maximum AM of page-selective invalidations (CAP.MAMV).
const MAMV: u64 = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outstanding {
    tag: u64,
    sid: u16,
}

/// Progress of the invalidation queue between calls.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Head, in descriptors.
    head: u64,
    outstanding: Vec<Outstanding>,
    next_tag: u64,
    /// The head is a wait descriptor held for outstanding ATC invalidations.
    held_at_wait: bool,
}

/// What one descriptor did.
enum Step {
    /// Consumed; advance the head.
    Done,
    /// Cannot complete yet; keep the head here and stop.
    Hold,
    /// Malformed; IQE with this IQEI code.
    Error(u8),
}

/// The range of a page-selective (PASID-)IOTLB invalidation: ADDR aligned down to 2^AM
/// pages. An AM above CAP.MAMV widens to the whole domain / PASID (`None`): over-invalidating
/// is always allowed, and Linux sends large AMs in PASID-based IOTLB descriptors without
/// checking MAMV.
fn psi_range(q1: u64) -> Option<(u64, u8)> {
    let am = q1 & 0x3f;
    if am > MAMV {
        return None;
    }
    let log2 = 12 + am as u8;
    Some((q1 & !((1u64 << log2) - 1), log2))
}

/// Decode the ATS range encoding (S bit + address with trailing ones): (base, log2 size).
pub fn ats_range(addr_field: u64, s: bool) -> (u64, u8) {
    let addr = addr_field & !0xfff;
    if !s {
        return (addr, 12);
    }
    let ones = (addr >> 12).trailing_ones() as u8;
    if ones >= 51 {
        return (0, 64);
    }
    let log2 = 13 + ones;
    (addr & !((1u64 << log2) - 1), log2)
}

impl Vtd {
    /// Descriptors still queued and processable now (the caller should call
    /// [`Vtd::service_queue`] again, e.g. after yielding).
    pub fn queue_needs_service(&self) -> bool {
        let ok = self.reg32(GSTS) & GCMD_QIE != 0
            && self.reg32(FSTS) & (FSTS_IQE | FSTS_ITE) == 0
            && !self.queue.held_at_wait;
        ok && self.tail().is_ok_and(|t| t != self.queue.head)
    }

    /// Device-ATC invalidations sent and not yet acknowledged.
    pub fn outstanding_atc_invalidations(&self) -> usize {
        self.queue.outstanding.len()
    }

    fn desc_size(&self) -> u64 {
        if self.cfg.scalable_mode && self.reg64(IQA) & IQA_DW != 0 {
            32
        } else {
            16
        }
    }

    fn queue_entries(&self) -> u64 {
        let qs = self.reg64(IQA) & 7;
        (1u64 << (qs + 12)) / self.desc_size()
    }

    fn tail(&self) -> Result<u64, u8> {
        let iqt = self.reg64(IQT);
        let size = self.desc_size();
        if size == 32 && iqt & 0x10 != 0 {
            return Err(iqei::TAIL_MISALIGNED);
        }
        let tail = (iqt & 0x7fff0) / size;
        if tail >= self.queue_entries() {
            return Err(iqei::TAIL_BEYOND_QUEUE);
        }
        Ok(tail)
    }

    fn set_head(&mut self, head: u64) {
        self.queue.head = head;
        let v = head * self.desc_size();
        self.set_reg64(IQH, v);
    }

    fn queue_error(&mut self, code: u8) {
        let v = (self.reg64(IQER) & !0xf) | u64::from(code & 0xf);
        self.set_reg64(IQER, v);
        self.set_fault_status(FSTS_IQE);
    }

    /// Process queued descriptors, at most [`MAX_DESCRIPTORS_PER_KICK`].
    pub fn service_queue<M: GuestMemoryAccess + ?Sized>(&mut self, mem: &mut M) {
        for _ in 0..MAX_DESCRIPTORS_PER_KICK {
            if self.reg32(GSTS) & GCMD_QIE == 0 || self.reg32(FSTS) & (FSTS_IQE | FSTS_ITE) != 0 {
                return;
            }
            let tail = match self.tail() {
                Ok(t) => t,
                Err(code) => return self.queue_error(code),
            };
            let mut head = self.queue.head;
            if head >= self.queue_entries() {
                // IQA shrank under an enabled queue (undefined by the spec): restart at 0.
                head = 0;
                self.set_head(0);
            }
            if head == tail {
                return;
            }
            let size = self.desc_size();
            let base = self.reg64(IQA) & ADDR_MASK & self.cfg.haw_mask();
            let at = base + head * size;
            let fetched = if size == 32 {
                read_qwords::<_, 4>(mem, at)
            } else {
                read_qwords::<_, 2>(mem, at).map(|[a, b]| [a, b, 0, 0])
            };
            let Ok(d) = fetched else {
                return self.queue_error(iqei::FETCH_ERROR);
            };
            match self.descriptor(mem, d, size == 32) {
                Step::Done => {
                    self.queue.held_at_wait = false;
                    let next = (head + 1) % self.queue_entries();
                    self.set_head(next);
                }
                Step::Hold => return,
                Step::Error(code) => return self.queue_error(code),
            }
        }
    }

    fn descriptor<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        d: [u64; 4],
        wide: bool,
    ) -> Step {
        let [q0, q1, q2, q3] = d;
        if q2 != 0 || q3 != 0 {
            return Step::Error(iqei::RESERVED_FIELD);
        }
        let ty = (q0 & 0xf) | (((q0 >> 9) & 7) << 4);
        let g = (q0 >> 4) & 3;
        let pasid_desc = matches!(ty, 6..=8);
        if pasid_desc && !wide {
            return Step::Error(iqei::INVALID_WIDTH);
        }
        if pasid_desc && self.cfg.pasid_bits == 0 || matches!(ty, 3 | 8) && !self.cfg.device_iotlb {
            return Step::Error(iqei::INVALID_TYPE);
        }
        let rsvd = |lo: u64, hi: u64| q0 & lo != 0 || q1 & hi != 0;
        match ty {
            1 => {
                if rsvd(0xfffc_0000_0000_f1c0, !0) || g == 0 {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                if g == 3 {
                    let mask = super::model::function_mask((q0 >> 48) & 3);
                    let sid = ((q0 >> 32) & 0xffff) as u16;
                    self.caches.flush_requesters(mask, sid & mask);
                } else {
                    self.caches.flush_all();
                }
                Step::Done
            }
            2 => {
                if rsvd(0xffff_ffff_0000_f100, 0xf80) || g == 0 {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                let did = ((q0 >> 16) & 0xffff) as u16;
                match g {
                    1 => self.caches.flush_iotlb(None, None, None, false),
                    2 => self.caches.flush_iotlb(Some(did), None, None, false),
                    _ => {
                        let range = psi_range(q1);
                        self.caches.flush_iotlb(Some(did), None, range, false);
                    }
                }
                Step::Done
            }
            3 => {
                if rsvd(0xffff_0000_ffe0_f1f0, 0xffe) {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                let sid = ((q0 >> 32) & 0xffff) as u16;
                let (base, size_log2) = ats_range(q1, q1 & 1 != 0);
                self.send_atc_invalidation(sid, None, false, base, size_log2)
            }
            5 => {
                if rsvd(0xffff_f180, 3) {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                if !self.queue.outstanding.is_empty() {
                    self.queue.held_at_wait = true;
                    return Step::Hold;
                }
                if q0 & (1 << 5) != 0 {
                    let data = ((q0 >> 32) as u32).to_le_bytes();
                    if mem.write(q1 & !3, &data).is_err() {
                        return Step::Error(iqei::FETCH_ERROR);
                    }
                }
                if q0 & (1 << 4) != 0 {
                    let ics = self.reg32(ICS);
                    if ics & ICS_IWC == 0 {
                        self.set_reg32(ICS, ics | ICS_IWC);
                        self.raise(InterruptSource::InvalidationCompletion);
                    }
                }
                Step::Done
            }
            6 => {
                if rsvd(0xfff0_0000_0000_f1c0, 0xf80) || g < 2 {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                let did = ((q0 >> 16) & 0xffff) as u16;
                let pasid = ((q0 >> 32) & 0xf_ffff) as u32;
                if g == 2 {
                    self.caches.flush_iotlb(Some(did), Some(pasid), None, true);
                } else {
                    self.caches
                        .flush_iotlb(Some(did), Some(pasid), psi_range(q1), false);
                }
                Step::Done
            }
            7 => {
                if rsvd(0xfff0_0000_0000_f1c0, !0) || g == 2 {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                let did = ((q0 >> 16) & 0xffff) as u16;
                let pasid = ((q0 >> 32) & 0xf_ffff) as u32;
                match g {
                    0 => self.caches.flush_pasid_entries(did, None),
                    1 => self.caches.flush_pasid_entries(did, Some(pasid)),
                    _ => self.caches.flush_all(),
                }
                Step::Done
            }
            8 => {
                if rsvd(0xfff0_0000_0000_f000, 0x7fe) {
                    return Step::Error(iqei::RESERVED_FIELD);
                }
                let sid = ((q0 >> 16) & 0xffff) as u16;
                let pasid = ((q0 >> 32) & 0xf_ffff) as u32;
                let (base, size_log2) = ats_range(q1, q1 & (1 << 11) != 0);
                self.send_atc_invalidation(sid, Some(pasid), q1 & 1 != 0, base, size_log2)
            }
            _ => Step::Error(iqei::INVALID_TYPE),
        }
    }

    fn send_atc_invalidation(
        &mut self,
        sid: u16,
        pasid: Option<u32>,
        global: bool,
        base: u64,
        size_log2: u8,
    ) -> Step {
        if self.queue.outstanding.len() >= MAX_OUTSTANDING_ATC {
            return Step::Hold;
        }
        let tag = self.queue.next_tag;
        self.queue.next_tag = tag.wrapping_add(1);
        self.queue.outstanding.push(Outstanding { tag, sid });
        self.push_event(VtdEvent::InvalidateDeviceAtc(AtcInvalidation {
            tag,
            sid,
            pasid,
            global,
            base,
            size_log2,
        }));
        Step::Done
    }

    /// The device finished the ATC invalidation `tag` (and every access that used the stale
    /// translations). Resumes a held wait descriptor once nothing is outstanding. An unknown
    /// tag (e.g. after a time-out) is an unexpected completion: FSTS.ICE.
    pub fn ack_atc_invalidation<M: GuestMemoryAccess + ?Sized>(&mut self, mem: &mut M, tag: u64) {
        let Some(i) = self.queue.outstanding.iter().position(|o| o.tag == tag) else {
            self.set_fault_status(FSTS_ICE);
            return;
        };
        self.queue.outstanding.remove(i);
        if self.queue.outstanding.is_empty() && self.queue.held_at_wait {
            self.queue.held_at_wait = false;
            self.service_queue(mem);
        }
    }

    /// The embedding code's deadline for outstanding ATC invalidations expired: record ITE
    /// with the first unresponsive requester in IQER.ITESID, drop the outstanding requests,
    /// abort a held wait descriptor (no status write, no completion interrupt; the head moves
    /// past it) and stop fetching until software clears ITE.
    pub fn atc_invalidation_timeout(&mut self) {
        let Some(first) = self.queue.outstanding.first().copied() else {
            return;
        };
        self.queue.outstanding.clear();
        let iqer = (self.reg64(IQER) & !(0xffff << 32)) | (u64::from(first.sid) << 32);
        self.set_reg64(IQER, iqer);
        if self.queue.held_at_wait {
            self.queue.held_at_wait = false;
            let next = (self.queue.head + 1) % self.queue_entries();
            self.set_head(next);
        }
        self.set_fault_status(FSTS_ITE);
    }
}
