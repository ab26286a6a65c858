//! Root, context and PASID structures: from a requester id (and PASID) to the translation
//! domain that applies (VT-d spec 4.1 §9.1–9.6).
//!
//! Every function reads a fixed number of entries (root, context, PASID directory, PASID
//! table), so resolution is bounded regardless of guest memory contents.

use super::fault::FaultReason;
use super::memory::{read_qwords, GuestMemoryAccess};
use super::regs::VtdConfig;

/// Address bits [51:12] of a table pointer or page-table entry.
pub(crate) const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A failed structure lookup: the reason and whether fault reporting is disabled (FPD) by an
/// entry that was already read successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFault {
    pub reason: FaultReason,
    pub fpd: bool,
}

impl TableFault {
    fn new(reason: FaultReason) -> Self {
        Self { reason, fpd: false }
    }
    fn fpd(reason: FaultReason, fpd: bool) -> Self {
        Self { reason, fpd }
    }
}

/// The latched root table pointer (RTADDR at the last SRTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RootPointer {
    pub addr: u64,
    pub ttm: u8,
}

/// Second-stage table of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SsTable {
    /// Guest-physical address of the top-level table.
    pub root: u64,
    /// 3, 4 or 5.
    pub levels: u8,
    /// Input address width: min(AGAW, MGAW).
    pub width: u8,
    /// SSADE: maintain accessed/dirty bits.
    pub ad: bool,
    /// SSEE: honour the execute bit.
    pub exec: bool,
}

/// First-stage table of a PASID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsTable {
    /// Address of the top-level table (guest-physical; second-stage input when nested).
    pub root: u64,
    /// 4 or 5.
    pub levels: u8,
}

/// What translates requests of one (requester, PASID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    PassThrough,
    Second(SsTable),
    First(FsTable),
    Nested(FsTable, SsTable),
}

/// A resolved translation domain for one (requester, PASID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Domain {
    pub did: u16,
    /// Fault processing disabled by the context, PASID directory or PASID entry.
    pub fpd: bool,
    /// Translation requests and translated requests allowed (legacy TT=01, scalable DTE=1).
    pub ats: bool,
    pub stage: Stage,
    /// PASID entry SRE (supervisor requests enabled).
    pub sre: bool,
    /// PASID entry WPE (write protect for supervisor requests).
    pub wpe: bool,
    /// PASID entry ERE (execute requests enabled).
    pub ere: bool,
    /// Scalable mode (selects fault codes).
    pub scalable: bool,
}

/// Per-requester context: complete in legacy mode, the PASID directory in scalable mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContextInfo {
    Legacy(Domain),
    Scalable(ScalableContext),
}

/// A present scalable-mode context entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScalableContext {
    pub pasid_dir: u64,
    /// Number of PASID directory entries (2^(PDTS+7)).
    pub dir_entries: u32,
    pub fpd: bool,
    pub dte: bool,
    pub paside: bool,
    /// PASID used for requests without PASID (RID_PASID).
    pub rid_pasid: u32,
    /// Requests without PASID are privileged (RID_PRIV).
    pub rid_priv: bool,
}

fn ss_table(cfg: &VtdConfig, root: u64, aw: u64) -> Option<SsTable> {
    if aw > 3 || cfg.sagaw() & (1 << aw) == 0 {
        return None;
    }
    let levels = aw as u8 + 2;
    let width = (30 + 9 * aw as u8).min(cfg.aw_bits);
    Some(SsTable {
        root,
        levels,
        width,
        ad: false,
        exec: false,
    })
}

/// Read the context for `sid` under the latched root pointer.
pub(crate) fn read_context<M: GuestMemoryAccess + ?Sized>(
    mem: &M,
    cfg: &VtdConfig,
    root: RootPointer,
    sid: u16,
) -> Result<ContextInfo, TableFault> {
    let scalable = match root.ttm {
        0 => false,
        1 if cfg.scalable_mode => true,
        _ => return Err(TableFault::new(FaultReason::InvalidTtm)),
    };
    let bus = u64::from(sid >> 8);
    let devfn = u64::from(sid & 0xff);
    let haw_rsvd = !cfg.haw_mask() & ADDR_MASK;
    let [lo, hi] = read_qwords::<_, 2>(mem, root.addr + bus * 16)
        .map_err(|_| TableFault::new(FaultReason::RootTableAccess))?;
    if !scalable {
        if lo & 1 == 0 {
            return Err(TableFault::new(FaultReason::RootNotPresent));
        }
        if lo & (0xffe | haw_rsvd | !ADDR_MASK & !0xfff) != 0 || hi != 0 {
            return Err(TableFault::new(FaultReason::RootReserved));
        }
        let [clo, chi] = read_qwords::<_, 2>(mem, (lo & ADDR_MASK) + devfn * 16)
            .map_err(|_| TableFault::new(FaultReason::ContextTableAccess))?;
        return legacy_context(cfg, clo, chi).map(ContextInfo::Legacy);
    }
    let half = if devfn < 128 { lo } else { hi };
    if half & 1 == 0 {
        return Err(TableFault::new(FaultReason::RootNotPresent));
    }
    if half & (0xffe | haw_rsvd | !ADDR_MASK & !0xfff) != 0 {
        return Err(TableFault::new(FaultReason::RootReserved));
    }
    let ce = read_qwords::<_, 4>(mem, (half & ADDR_MASK) + (devfn & 0x7f) * 32)
        .map_err(|_| TableFault::new(FaultReason::ContextTableAccess))?;
    scalable_context(cfg, ce).map(ContextInfo::Scalable)
}

fn legacy_context(cfg: &VtdConfig, lo: u64, hi: u64) -> Result<Domain, TableFault> {
    if lo & 1 == 0 {
        return Err(TableFault::new(FaultReason::ContextNotPresent));
    }
    let fpd = lo & 2 != 0;
    let rsvd_lo = 0xff0 | (!cfg.haw_mask() & ADDR_MASK) | (!ADDR_MASK & !0xfff);
    if lo & rsvd_lo != 0 || hi & 0xffff_ffff_ff00_0080 != 0 {
        return Err(TableFault::fpd(FaultReason::ContextReserved, fpd));
    }
    let tt = (lo >> 2) & 3;
    let did = ((hi >> 8) & 0xffff) as u16;
    let invalid = TableFault::fpd(FaultReason::ContextInvalid, fpd);
    let (stage, ats) = match tt {
        0 | 1 => {
            if tt == 1 && !cfg.device_iotlb {
                return Err(invalid);
            }
            let t = ss_table(cfg, lo & ADDR_MASK, hi & 7).ok_or(invalid)?;
            (Stage::Second(t), tt == 1)
        }
        2 if cfg.pass_through => (Stage::PassThrough, false),
        _ => return Err(invalid),
    };
    Ok(Domain {
        did,
        fpd,
        ats,
        stage,
        sre: false,
        wpe: false,
        ere: false,
        scalable: false,
    })
}

fn scalable_context(cfg: &VtdConfig, ce: [u64; 4]) -> Result<ScalableContext, TableFault> {
    let [q0, q1, q2, q3] = ce;
    if q0 & 1 == 0 {
        return Err(TableFault::new(FaultReason::ContextNotPresent));
    }
    let fpd = q0 & 2 != 0;
    // PRE (bit 4) is reserved: the model does not advertise page requests (ECAP.PRS).
    let rsvd0 = 0x1f0 | (!cfg.haw_mask() & ADDR_MASK) | (!ADDR_MASK & !0xfff);
    if q0 & rsvd0 != 0 || q1 & !0x1f_ffff != 0 || q2 != 0 || q3 != 0 {
        return Err(TableFault::fpd(FaultReason::ContextReserved, fpd));
    }
    let dte = q0 & 4 != 0;
    if dte && !cfg.device_iotlb {
        return Err(TableFault::fpd(FaultReason::ContextInvalid, fpd));
    }
    let pdts = (q0 >> 9) & 7;
    Ok(ScalableContext {
        pasid_dir: q0 & ADDR_MASK,
        dir_entries: 1 << (pdts + 7),
        fpd,
        dte,
        paside: q0 & 8 != 0,
        rid_pasid: (q1 & 0xf_ffff) as u32,
        rid_priv: q1 & (1 << 20) != 0,
    })
}

/// Read the PASID directory and PASID table entry of `pasid` under a scalable context.
pub(crate) fn read_pasid_entry<M: GuestMemoryAccess + ?Sized>(
    mem: &M,
    cfg: &VtdConfig,
    ctx: &ScalableContext,
    pasid: u32,
) -> Result<Domain, TableFault> {
    let mut fpd = ctx.fpd;
    let dir_index = pasid >> 6;
    let pasid_limit = if cfg.pasid_bits == 0 {
        1
    } else {
        1u64 << cfg.pasid_bits
    };
    if dir_index >= ctx.dir_entries || u64::from(pasid) >= pasid_limit {
        return Err(TableFault::fpd(FaultReason::PasidDirNotPresent, fpd));
    }
    let [pde] = read_qwords::<_, 1>(mem, ctx.pasid_dir + u64::from(dir_index) * 8)
        .map_err(|_| TableFault::fpd(FaultReason::PasidDirAccess, fpd))?;
    if pde & 1 == 0 {
        return Err(TableFault::fpd(FaultReason::PasidDirNotPresent, fpd));
    }
    fpd |= pde & 2 != 0;
    let table = pde & ADDR_MASK;
    let pe = read_qwords::<_, 8>(mem, table + u64::from(pasid & 0x3f) * 64)
        .map_err(|_| TableFault::fpd(FaultReason::PasidTableAccess, fpd))?;
    if pe[0] & 1 == 0 {
        return Err(TableFault::fpd(FaultReason::PasidEntryNotPresent, fpd));
    }
    fpd |= pe[0] & 2 != 0;
    pasid_entry(cfg, ctx, pe, fpd)
}

fn pasid_entry(
    cfg: &VtdConfig,
    ctx: &ScalableContext,
    pe: [u64; 8],
    fpd: bool,
) -> Result<Domain, TableFault> {
    let invalid = TableFault::fpd(FaultReason::PasidEntryInvalid, fpd);
    let haw_rsvd = !cfg.haw_mask() & ADDR_MASK;
    let pgtt = (pe[0] >> 6) & 7;
    let did = (pe[1] & 0xffff) as u16;
    let sre = pe[2] & 1 != 0;
    let ere = pe[2] & 2 != 0;
    let wpe = pe[2] & (1 << 4) != 0;
    if pe[4..].iter().any(|&q| q != 0) {
        return Err(invalid);
    }
    let ss = |pe0: u64| -> Result<SsTable, TableFault> {
        if pe0 & haw_rsvd != 0 || pe0 >> 52 != 0 {
            return Err(invalid);
        }
        let mut t = ss_table(cfg, pe0 & ADDR_MASK, (pe0 >> 2) & 7).ok_or(invalid)?;
        t.exec = pe0 & (1 << 5) != 0;
        t.ad = pe0 & (1 << 9) != 0;
        Ok(t)
    };
    let fs = |pe2: u64| -> Result<FsTable, TableFault> {
        let levels = match (pe2 >> 2) & 3 {
            0 => 4,
            1 if cfg.fs5lp => 5,
            _ => return Err(invalid),
        };
        if pe2 & haw_rsvd != 0 || pe2 >> 52 != 0 {
            return Err(TableFault::fpd(FaultReason::FsptptrInvalid, fpd));
        }
        Ok(FsTable {
            root: pe2 & ADDR_MASK,
            levels,
        })
    };
    let stage = match pgtt {
        1 if cfg.first_stage => Stage::First(fs(pe[2])?),
        2 if cfg.second_stage => Stage::Second(ss(pe[0])?),
        3 if cfg.nested => Stage::Nested(fs(pe[2])?, ss(pe[0])?),
        4 if cfg.pass_through => Stage::PassThrough,
        _ => return Err(invalid),
    };
    Ok(Domain {
        did,
        fpd,
        ats: ctx.dte,
        stage,
        sre,
        wpe,
        ere,
        scalable: true,
    })
}
