//! The translation core and its three entry points: untranslated DMA, ATS translation
//! requests and translated DMA (VT-d spec 4.1 §3, §4.2).

use super::cache::NO_PASID;
use super::fault::{AddressType, FaultReason, FaultRecord};
use super::memory::GuestMemoryAccess;
use super::model::Vtd;
use super::tables::{
    read_context, read_pasid_entry, ContextInfo, Domain, RootPointer, Stage, TableFault,
};
use super::walk::{grant, walk, Access, DirtyPolicy, Leaf, Rights, StageKind, WalkError};

/// First address of the interrupt range (0xFEEx_xxxx).
pub const INTERRUPT_RANGE_START: u64 = 0xfee0_0000;
/// log2 of the interrupt range size (1 MiB).
pub const INTERRUPT_RANGE_LOG2: u8 = 20;

/// Most entries one translation request may return (the caller may ask for fewer).
pub const MAX_ATS_ENTRIES: usize = 512;

/// Largest STU the model merges smaller pages for (2 MiB: at most 512 pages per block);
/// above it, an STU block not covered by one leaf is answered as a hole.
pub const MAX_MERGED_STU_LOG2: u8 = 21;

/// Page translations one translation request may perform at most (STU merging multiplies
/// them); when spent, the completion ends early (the first entry is always complete).
pub const MAX_ATS_PAGE_WALKS: usize = 1024;

/// A DMA request from an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRequest {
    /// Requester id (bus << 8 | devfn).
    pub sid: u16,
    /// PASID of a request-with-PASID.
    pub pasid: Option<u32>,
    /// Address (untranslated, or translated for [`Vtd::translated_dma`]).
    pub addr: u64,
    /// Write (true) or read (false).
    pub write: bool,
    /// Privileged-mode request (PASID prefix PMR).
    pub privileged: bool,
}

/// Where an untranslated DMA goes: the page containing the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaTranslation {
    /// First untranslated address of the page.
    pub iova_base: u64,
    /// First output (host-of-the-guest physical) address of the page.
    pub translated_base: u64,
    /// log2 of the page size.
    pub size_log2: u8,
    /// The page is writable by this requester. A later write must still be translated as a
    /// write: that is what sets the dirty bit.
    pub writable: bool,
}

impl DmaTranslation {
    /// Output address for `addr`; `None` when `addr` lies outside the page.
    pub fn translate(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.iova_base)?;
        (off >> self.size_log2 == 0).then(|| self.translated_base + off)
    }
}

/// A blocked DMA. `recorded` says whether a fault record was written (not when fault
/// processing is disabled by FPD, or the records overflowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    /// Why it was blocked.
    pub reason: FaultReason,
    /// A fault record was attempted (FPD clear).
    pub recorded: bool,
}

/// An ATS translation request (PCIe AT=01).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsRequest {
    /// Requester id.
    pub sid: u16,
    /// PASID prefix, if any.
    pub pasid: Option<u32>,
    /// First untranslated address.
    pub addr: u64,
    /// Bytes to cover (0 is treated as 1).
    pub len: u64,
    /// No-Write: the device wants read-only translations.
    pub no_write: bool,
    /// Execute Requested.
    pub exec: bool,
    /// Privileged Mode Requested.
    pub privileged: bool,
    /// Entries the requester can accept (clamped to 1..=[`MAX_ATS_ENTRIES`]).
    pub max_entries: usize,
    /// log2 of the requester's Smallest Translation Unit (ATS Control STU + 12); every entry
    /// covers at least this much. Pages smaller than the STU are merged when they are
    /// contiguous with equal rights, otherwise the STU block is answered as a hole.
    pub stu_log2: u8,
}

/// One entry of a translation completion: a naturally aligned power-of-two range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsTranslation {
    /// First untranslated address the entry applies to.
    pub untranslated_base: u64,
    /// log2 of the range size (≥ 12).
    pub size_log2: u8,
    /// Translated address of `untranslated_base` (0 when R=W=0).
    pub translated: u64,
    /// Read permitted.
    pub r: bool,
    /// Write permitted.
    pub w: bool,
    /// Execute permitted.
    pub x: bool,
    /// Permissions are for privileged-mode accesses.
    pub privileged: bool,
    /// Global mapping (never set by VT-d).
    pub global: bool,
    /// Untranslated access only (the interrupt range): the device must not use `translated`.
    pub untranslated_only: bool,
}

impl AtsTranslation {
    fn hole(base: u64, size_log2: u8, privileged: bool) -> Self {
        let size_log2 = size_log2.clamp(12, 63);
        Self {
            untranslated_base: base & !((1u64 << size_log2) - 1),
            size_log2,
            translated: 0,
            r: false,
            w: false,
            x: false,
            privileged,
            global: false,
            untranslated_only: false,
        }
    }
}

/// A translation request refused as a whole (completion status UR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtsRejection {
    /// Translation is disabled, the unit has no device-TLB support, or the requester's context
    /// does not allow translation requests (legacy TT≠01, scalable DTE=0) or is unusable.
    UnsupportedRequest,
}

/// Why translating one page failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Miss {
    reason: FaultReason,
    hole_log2: u8,
    fpd: bool,
}

/// The translation of one page for one request.
struct Hit {
    domain: Domain,
    leaf: Leaf,
    rights: Rights,
    privileged: bool,
}

fn in_interrupt_range(base: u64, size_log2: u8) -> bool {
    let end = base.saturating_add((1u64 << size_log2.min(63)) - 1);
    base < INTERRUPT_RANGE_START + (1 << INTERRUPT_RANGE_LOG2) && end >= INTERRUPT_RANGE_START
}

impl Vtd {
    fn context_for<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &M,
        sid: u16,
    ) -> Result<ContextInfo, TableFault> {
        if let Some(c) = self.caches.context(sid) {
            return Ok(c);
        }
        let root = self.root.unwrap_or(RootPointer { addr: 0, ttm: 0 });
        let c = read_context(mem, &self.cfg, root, sid)?;
        self.caches.put_context(sid, c);
        Ok(c)
    }

    /// Whether the requester's context lets it use ATS (translation requests and translated
    /// requests), with the context's FPD and mode. Depends on the context entry only.
    fn context_allows_ats<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &M,
        sid: u16,
        pasid: Option<u32>,
    ) -> Result<(bool, bool, bool), TableFault> {
        Ok(match self.context_for(mem, sid)? {
            ContextInfo::Legacy(d) => (d.ats && pasid.is_none(), d.fpd, false),
            ContextInfo::Scalable(sc) => (sc.dte && (pasid.is_none() || sc.paside), sc.fpd, true),
        })
    }

    /// The domain translating `(sid, pasid)`, the PASID tag for the IOTLB and whether
    /// requests without PASID are privileged (RID_PRIV).
    fn domain_for<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &M,
        sid: u16,
        pasid: Option<u32>,
    ) -> Result<(Domain, u32, bool), TableFault> {
        match self.context_for(mem, sid)? {
            ContextInfo::Legacy(d) => match pasid {
                None => Ok((d, NO_PASID, false)),
                Some(_) => Err(TableFault {
                    reason: FaultReason::ContextInvalid,
                    fpd: d.fpd,
                }),
            },
            ContextInfo::Scalable(sc) => {
                if pasid.is_some() && !sc.paside {
                    return Err(TableFault {
                        reason: FaultReason::ContextInvalid,
                        fpd: sc.fpd,
                    });
                }
                let p = pasid.unwrap_or(sc.rid_pasid);
                let d = match self.caches.domain(sid, p) {
                    Some(d) => d,
                    None => {
                        let d = read_pasid_entry(mem, &self.cfg, &sc, p)?;
                        self.caches.put_domain(sid, p, d);
                        d
                    }
                };
                Ok((d, p, pasid.is_none() && sc.rid_priv))
            }
        }
    }

    fn translate_page<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        sid: u16,
        pasid: Option<u32>,
        iova: u64,
        access: Access,
    ) -> Result<Hit, Miss> {
        let (domain, tag, rid_priv) = self.domain_for(mem, sid, pasid).map_err(|f| Miss {
            reason: f.reason,
            hole_log2: 12,
            fpd: f.fpd,
        })?;
        let access = Access {
            privileged: access.privileged || rid_priv,
            ..access
        };
        let miss = |reason, hole_log2| Miss {
            reason,
            hole_log2,
            fpd: domain.fpd,
        };
        let cached = self
            .caches
            .lookup(sid, tag, iova)
            .filter(|l| !access.write || l.dirty);
        let leaf = match cached {
            Some(l) => l,
            None => {
                let dirty = DirtyPolicy {
                    write: access.write,
                    privileged: access.privileged,
                    wpe: domain.wpe,
                };
                let leaf = walk(mem, &self.cfg, &domain, iova, dirty).map_err(|e| match e {
                    WalkError::NotPresent {
                        stage: StageKind::First,
                        hole_log2,
                    } => miss(FaultReason::FsEntryNotPresent, hole_log2),
                    WalkError::NotPresent {
                        stage: StageKind::Second,
                        hole_log2,
                    } => miss(
                        if access.write {
                            FaultReason::Write
                        } else {
                            FaultReason::Read
                        },
                        hole_log2,
                    ),
                    WalkError::Fault(r) => miss(r, 12),
                })?;
                if !matches!(domain.stage, Stage::PassThrough) {
                    self.caches.insert(sid, tag, domain.did, leaf);
                }
                leaf
            }
        };
        let rights =
            grant(&self.cfg, &domain, &leaf, access).map_err(|r| miss(r, leaf.size_log2))?;
        Ok(Hit {
            domain,
            leaf,
            rights,
            privileged: access.privileged,
        })
    }

    fn fault(
        &mut self,
        req: &DmaRequest,
        reason: FaultReason,
        at: AddressType,
        exec: bool,
        fpd: bool,
    ) -> DmaFault {
        if !fpd {
            self.record_fault(FaultRecord {
                sid: req.sid,
                pasid: req.pasid,
                addr: req.addr & !0xfff,
                reason: reason.code(),
                read: !req.write,
                at: at as u8,
                privileged: req.privileged,
                exec,
            });
        }
        DmaFault {
            reason,
            recorded: !fpd,
        }
    }

    /// Untranslated DMA (AT=00): translate `req.addr`, recording a fault on failure. With
    /// translation disabled the address passes through.
    pub fn translate_dma<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        req: &DmaRequest,
    ) -> Result<DmaTranslation, DmaFault> {
        if !self.translation_enabled() {
            let base = req.addr & !0xfff;
            return Ok(DmaTranslation {
                iova_base: base,
                translated_base: base,
                size_log2: 12,
                writable: true,
            });
        }
        let access = Access {
            write: req.write,
            exec: false,
            privileged: req.privileged,
        };
        let hit = match self.translate_page(mem, req.sid, req.pasid, req.addr, access) {
            Ok(h) => h,
            Err(m) => {
                return Err(self.fault(req, m.reason, AddressType::Untranslated, false, m.fpd))
            }
        };
        let fpd = hit.domain.fpd;
        if req.write && !hit.rights.w {
            return Err(self.fault(
                req,
                hit.rights.write_fault,
                AddressType::Untranslated,
                false,
                fpd,
            ));
        }
        if !req.write && !hit.rights.r {
            return Err(self.fault(
                req,
                hit.rights.read_fault,
                AddressType::Untranslated,
                false,
                fpd,
            ));
        }
        if in_interrupt_range(hit.leaf.out_base, hit.leaf.size_log2) {
            let reason = if hit.domain.scalable {
                FaultReason::SmInterruptAddress
            } else {
                FaultReason::InterruptAddress
            };
            return Err(self.fault(req, reason, AddressType::Untranslated, false, fpd));
        }
        Ok(DmaTranslation {
            iova_base: hit.leaf.iova_base,
            translated_base: hit.leaf.out_base,
            size_log2: hit.leaf.size_log2,
            writable: hit.rights.w,
        })
    }

    /// Translated DMA (AT=10): allowed only when the requester's context permits ATS (legacy
    /// TT=01, scalable DTE=1, with PASIDE for requests with PASID); otherwise blocked with
    /// fault 0xD. Only the context entry is consulted (a translated address needs no walk).
    /// Returns the address to access (unchanged).
    pub fn translated_dma<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        req: &DmaRequest,
    ) -> Result<u64, DmaFault> {
        if !self.translation_enabled() || !self.cfg.device_iotlb {
            return Err(self.fault(
                req,
                FaultReason::TranslationBlocked,
                AddressType::Translated,
                false,
                false,
            ));
        }
        let (allowed, fpd, scalable) = match self.context_allows_ats(mem, req.sid, req.pasid) {
            Ok(c) => c,
            Err(f) => return Err(self.fault(req, f.reason, AddressType::Translated, false, f.fpd)),
        };
        if !allowed {
            return Err(self.fault(
                req,
                FaultReason::TranslationBlocked,
                AddressType::Translated,
                false,
                fpd,
            ));
        }
        if req.write && in_interrupt_range(req.addr & !0xfff, 12) {
            let reason = if scalable {
                FaultReason::SmInterruptAddress
            } else {
                FaultReason::InterruptAddress
            };
            return Err(self.fault(req, reason, AddressType::Translated, false, fpd));
        }
        Ok(req.addr)
    }

    /// ATS translation request (AT=01): one entry per naturally aligned page from `req.addr`
    /// until `req.len` is covered or `max_entries` are produced. Not-present and permission
    /// conditions answer R=W=0 for the size of the hole without recording a fault; a
    /// read-only page answers R=1, W=0; other conditions are recorded and end the completion
    /// with a 4 KiB R=W=0 entry. The request is rejected as a whole (UR) when translation is
    /// off, the unit lacks device-TLB support, or the requester's context entry is missing,
    /// malformed or does not allow ATS (recorded; fault 0xD for the latter).
    pub fn translation_request<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        req: &AtsRequest,
    ) -> Result<Vec<AtsTranslation>, AtsRejection> {
        let as_dma = DmaRequest {
            sid: req.sid,
            pasid: req.pasid,
            addr: req.addr,
            write: !req.no_write,
            privileged: req.privileged,
        };
        if !self.translation_enabled() || !self.cfg.device_iotlb {
            return Err(AtsRejection::UnsupportedRequest);
        }
        let at = AddressType::TranslationRequest;
        match self.context_allows_ats(mem, req.sid, req.pasid) {
            Ok((true, _, _)) => {}
            Ok((false, fpd, _)) => {
                self.fault(&as_dma, FaultReason::TranslationBlocked, at, req.exec, fpd);
                return Err(AtsRejection::UnsupportedRequest);
            }
            Err(f) => {
                self.fault(&as_dma, f.reason, at, req.exec, f.fpd);
                return Err(AtsRejection::UnsupportedRequest);
            }
        }
        let limit = req.max_entries.clamp(1, MAX_ATS_ENTRIES);
        let end = req.addr.saturating_add(req.len.max(1));
        let mut addr = req.addr & !0xfff;
        let mut out = Vec::new();
        let access = Access {
            write: !req.no_write,
            exec: req.exec,
            privileged: req.privileged,
        };
        let mut budget = MAX_ATS_PAGE_WALKS;
        while addr < end && out.len() < limit && (out.is_empty() || budget >= 1 << 9) {
            let entry = self.translate_block(mem, req, addr, access, &mut budget);
            let stop = entry.is_err();
            let e = entry.unwrap_or_else(|e| e);
            out.push(e);
            let next = e.untranslated_base.checked_add(1u64 << e.size_log2);
            match next {
                Some(n) if !stop && n > addr => addr = n,
                _ => break,
            }
        }
        Ok(out)
    }

    /// One completion entry of at least the STU containing `addr`; `Err` carries the final
    /// entry after a recorded fault. Spends at most 2^(STU-12) ≤ 512 page translations of
    /// `budget`.
    fn translate_block<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        req: &AtsRequest,
        addr: u64,
        access: Access,
        budget: &mut usize,
    ) -> Result<AtsTranslation, AtsTranslation> {
        *budget = budget.saturating_sub(1);
        let stu = req.stu_log2.clamp(12, 63);
        // A recorded fault ends the completion with a hole, widened to the STU.
        let widen = |e: AtsTranslation| {
            AtsTranslation::hole(e.untranslated_base, e.size_log2.max(stu), false)
        };
        let first = self.translate_one(mem, req, addr, access).map_err(widen)?;
        if first.size_log2 >= stu {
            return Ok(first);
        }
        let block_log2 = stu;
        let block = addr & !((1u64 << block_log2) - 1);
        let hole = AtsTranslation::hole(block, block_log2, false);
        if block_log2 > MAX_MERGED_STU_LOG2 {
            return Ok(hole);
        }
        // Merge: every piece of the block must continue the first piece's translation with
        // the same rights.
        let head = if block == first.untranslated_base {
            first
        } else {
            self.translate_one(mem, req, block, access).map_err(widen)?
        };
        let mut cursor = block;
        let mut piece = head;
        loop {
            let same_rights = (
                piece.r,
                piece.w,
                piece.x,
                piece.privileged,
                piece.untranslated_only,
            ) == (
                head.r,
                head.w,
                head.x,
                head.privileged,
                head.untranslated_only,
            );
            let any = head.r || head.w || head.x;
            let expected = head.translated + (cursor - block);
            let contiguous =
                !any || piece.translated + (cursor - piece.untranslated_base) == expected;
            if !same_rights || !contiguous {
                return Ok(hole);
            }
            cursor = piece
                .untranslated_base
                .saturating_add(1u64 << piece.size_log2);
            if cursor >= block + (1u64 << block_log2) {
                break;
            }
            if *budget == 0 {
                return Ok(hole);
            }
            *budget -= 1;
            piece = self
                .translate_one(mem, req, cursor, access)
                .map_err(widen)?;
        }
        if head.translated & ((1u64 << block_log2) - 1) != 0 {
            return Ok(hole);
        }
        Ok(AtsTranslation {
            untranslated_base: block,
            size_log2: block_log2,
            ..head
        })
    }

    /// One completion entry; `Err` carries the final entry after a recorded fault.
    fn translate_one<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &mut M,
        req: &AtsRequest,
        addr: u64,
        access: Access,
    ) -> Result<AtsTranslation, AtsTranslation> {
        if req.pasid.is_none() && in_interrupt_range(addr, 12) {
            // Spec 4.1 §4.2.3 [spec-recall]: the interrupt range is reachable only with
            // untranslated writes.
            return Ok(AtsTranslation {
                untranslated_base: INTERRUPT_RANGE_START,
                size_log2: INTERRUPT_RANGE_LOG2,
                translated: 0,
                r: false,
                w: true,
                x: false,
                privileged: false,
                global: false,
                untranslated_only: true,
            });
        }
        let as_dma = DmaRequest {
            sid: req.sid,
            pasid: req.pasid,
            addr,
            write: access.write,
            privileged: req.privileged,
        };
        let at = AddressType::TranslationRequest;
        match self.translate_page(mem, req.sid, req.pasid, addr, access) {
            Ok(hit) => {
                if in_interrupt_range(hit.leaf.out_base, hit.leaf.size_log2) {
                    let reason = if hit.domain.scalable {
                        FaultReason::SmInterruptAddress
                    } else {
                        FaultReason::InterruptAddress
                    };
                    self.fault(&as_dma, reason, at, req.exec, hit.domain.fpd);
                    return Err(AtsTranslation::hole(addr, 12, false));
                }
                let Rights { r, w, x, .. } = hit.rights;
                let any = r || w || x;
                Ok(AtsTranslation {
                    untranslated_base: hit.leaf.iova_base,
                    size_log2: hit.leaf.size_log2,
                    translated: if any { hit.leaf.out_base } else { 0 },
                    r,
                    w: w && !req.no_write,
                    x,
                    privileged: hit.privileged,
                    global: false,
                    untranslated_only: false,
                })
            }
            Err(m) if m.reason.recoverable() => Ok(AtsTranslation::hole(
                addr,
                m.hole_log2,
                req.privileged && m.reason == FaultReason::Privilege,
            )),
            Err(m) => {
                self.fault(&as_dma, m.reason, at, req.exec, m.fpd);
                Err(AtsTranslation::hole(addr, 12, false))
            }
        }
    }
}
