//! Command-queue consumption (with CMD_SYNC waiting for device ATC invalidations) and the
//! PRI queue.

use super::{CmdqWait, Smmuv3, COMMAND_BUDGET, MAX_OUTSTANDING_ATC_INVALIDATIONS, OUTPUT_CAPACITY};
use crate::viommu::smmuv3::cmdq::{self, Command, SyncSignal};
use crate::viommu::smmuv3::memory::{read_words, GuestMemory};
use crate::viommu::smmuv3::regs::*;
use crate::viommu::smmuv3::types::*;

impl Smmuv3 {
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
