//! The translation core: configuration lookup (STE, CD), walks through the TLB, and the
//! three entry points (untranslated DMA, ATS translation requests, translated DMA).

use super::{Smmuv3, MAX_ATS_ENTRIES};
use crate::viommu::smmuv3::config::{
    decode_cd, decode_ste, Cd, CdTableFormat, Eats, Illegal, S1Dss, Stage1Config, Stage2Config, Ste,
};
use crate::viommu::smmuv3::events::{Event, EventType, FaultClass};
use crate::viommu::smmuv3::memory::{read_u64, read_words, GuestMemory};
use crate::viommu::smmuv3::regs::*;
use crate::viommu::smmuv3::tlb::{TlbEntry, TlbKind};
use crate::viommu::smmuv3::types::*;
use crate::viommu::smmuv3::walk::{walk, Fault, FaultKind, Perms, Stage};

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

fn event_kind(kind: FaultKind) -> EventType {
    match kind {
        FaultKind::Translation => EventType::FTranslation,
        FaultKind::AddrSize => EventType::FAddrSize,
        FaultKind::Access => EventType::FAccess,
        FaultKind::Permission => EventType::FPermission,
        FaultKind::WalkEabt => EventType::FWalkEabt,
    }
}

impl Smmuv3 {
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
