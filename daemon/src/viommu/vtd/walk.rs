//! First-stage (IA-32e, 4/5-level), second-stage (3/4/5-level) and nested page walks, and the
//! permission rules that turn a walked leaf into access rights (VT-d spec 4.1 §3.6–3.8).
//!
//! Bounded by construction: every walk descends a fixed number of levels (no loops over
//! guest-controlled counts); [`MAX_GUEST_ACCESSES_PER_PAGE`] states the bound.

use super::fault::FaultReason;
use super::memory::{read_u64, GuestMemoryAccess};
use super::regs::VtdConfig;
use super::tables::{Domain, FsTable, SsTable, Stage, ADDR_MASK};

/// Guest-memory accesses translating one page may need at most: root (2 qword reads),
/// context (4), PASID directory (1) and PASID entry (8); then the walk. A second-stage walk
/// touches at most 5 entries, each one read plus one accessed/dirty compare-exchange (a read
/// and a write): 15. A first-stage level costs one entry read, a compare-exchange and, when
/// nested, two second-stage walks (fetch, then A/D write-back): 33; five levels plus the
/// final second-stage walk of the output: 5 × 33 + 15.
pub const MAX_GUEST_ACCESSES_PER_PAGE: u64 = 15 + 5 * 33 + 15;

/// Which stage a non-present entry was found in (selects the fault code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StageKind {
    First,
    Second,
}

/// Why a walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalkError {
    /// A non-present entry; `hole_log2` is the size of the range it covers in the input space.
    NotPresent { stage: StageKind, hole_log2: u8 },
    /// Any other condition.
    Fault(FaultReason),
}

/// The rights and geometry of one translated page, independent of the request that walked
/// it; cached in the IOTLB and checked against each request by [`grant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub iova_base: u64,
    pub out_base: u64,
    pub size_log2: u8,
    /// First stage in use; the `fs_*` fields are meaningful only then.
    pub has_fs: bool,
    pub fs_rw: bool,
    pub fs_us: bool,
    pub fs_xd: bool,
    pub fs_global: bool,
    /// Second stage in use; the `ss_*` fields are meaningful only then.
    pub has_ss: bool,
    pub ss_r: bool,
    pub ss_w: bool,
    pub ss_x: bool,
    /// Every dirty bit a write through this leaf needs is already set.
    pub dirty: bool,
}

/// The request attributes the rights depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    pub write: bool,
    pub exec: bool,
    pub privileged: bool,
}

/// Effective rights of a request on a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rights {
    pub r: bool,
    pub w: bool,
    pub x: bool,
    /// Which condition denies a write, for the DMA fault code.
    pub write_fault: FaultReason,
    /// Which condition denies a read.
    pub read_fault: FaultReason,
}

/// Rights of `access` on `leaf` under `domain`; `Err` when the request is not allowed to use
/// the translation at all (privilege).
pub(crate) fn grant(
    cfg: &VtdConfig,
    domain: &Domain,
    leaf: &Leaf,
    access: Access,
) -> Result<Rights, FaultReason> {
    let fs_stage = matches!(domain.stage, Stage::First(_) | Stage::Nested(..));
    if access.privileged && !(cfg.supervisor_requests && (domain.sre || !fs_stage)) {
        return Err(FaultReason::Privilege);
    }
    let (mut r, mut w, mut x) = (true, true, access.exec && cfg.execute_requests);
    let mut write_fault = FaultReason::Write;
    if leaf.has_fs {
        if !access.privileged && !leaf.fs_us {
            return Err(FaultReason::Privilege);
        }
        let fs_w = leaf.fs_rw || (access.privileged && !domain.wpe);
        if !fs_w {
            write_fault = FaultReason::FsWrite;
        }
        w &= fs_w;
        x &= domain.ere && !leaf.fs_xd;
    }
    if leaf.has_ss {
        r &= leaf.ss_r;
        w &= leaf.ss_w;
        x &= leaf.ss_x;
    }
    if !leaf.has_fs && !leaf.has_ss {
        // Pass-through: execute only where the architecture can express it (scalable mode).
        x &= domain.scalable;
    }
    Ok(Rights {
        r,
        w,
        x,
        write_fault,
        read_fault: FaultReason::Read,
    })
}

/// Result of a second-stage walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SsLeaf {
    in_base: u64,
    out_base: u64,
    size_log2: u8,
    r: bool,
    w: bool,
    x: bool,
    dirty: bool,
}

fn level_shift(level: u8) -> u8 {
    12 + 9 * (level - 1)
}

/// Set `bits` in the entry at `gpa` (accessed/dirty maintenance). A concurrent change of the
/// entry is not an error: the next walk sees the new entry.
fn set_bits<M: GuestMemoryAccess + ?Sized>(
    mem: &mut M,
    gpa: u64,
    entry: u64,
    bits: u64,
) -> Result<(), WalkError> {
    if entry & bits == bits {
        return Ok(());
    }
    mem.compare_exchange_u64(gpa, entry, entry | bits)
        .map(|_| ())
        .map_err(|_| WalkError::Fault(FaultReason::AdUpdateFailed))
}

fn ss_walk<M: GuestMemoryAccess + ?Sized>(
    mem: &mut M,
    cfg: &VtdConfig,
    t: &SsTable,
    addr: u64,
    set_dirty: bool,
) -> Result<SsLeaf, WalkError> {
    if t.width < 64 && addr >> t.width != 0 {
        return Err(WalkError::Fault(FaultReason::AddressBeyondWidth));
    }
    let haw_rsvd = !cfg.haw_mask() & ADDR_MASK;
    let (mut r, mut w, mut x) = (true, true, true);
    let mut table = t.root;
    let mut level = t.levels;
    loop {
        let shift = level_shift(level);
        let gpa = table + ((addr >> shift) & 0x1ff) * 8;
        let e = read_u64(mem, gpa).map_err(|_| WalkError::Fault(FaultReason::PagingEntryAccess))?;
        if e & 3 == 0 {
            return Err(WalkError::NotPresent {
                stage: StageKind::Second,
                hole_log2: shift,
            });
        }
        r &= e & 1 != 0;
        w &= e & 2 != 0;
        x &= !t.exec || e & 4 != 0;
        let ps = e & (1 << 7) != 0;
        let leaf = level == 1 || ps;
        let mut rsvd = haw_rsvd;
        if ps {
            let allowed = match level {
                2 => cfg.ss_2m,
                3 => cfg.ss_1g,
                _ => false,
            };
            if !allowed {
                return Err(WalkError::Fault(FaultReason::PagingEntryReserved));
            }
            rsvd |= ((1u64 << shift) - 1) & ADDR_MASK;
        }
        if e & rsvd != 0 {
            return Err(WalkError::Fault(FaultReason::PagingEntryReserved));
        }
        let mut bits = 0;
        if t.ad {
            bits |= 1 << 8;
            if leaf && set_dirty && w {
                bits |= 1 << 9;
            }
        }
        set_bits(mem, gpa, e, bits)?;
        if leaf {
            let mask = (1u64 << shift) - 1;
            return Ok(SsLeaf {
                in_base: addr & !mask,
                out_base: e & ADDR_MASK & !mask,
                size_log2: shift,
                r,
                w,
                x: x && t.exec,
                dirty: !t.ad || e & (1 << 9) != 0 || bits & (1 << 9) != 0,
            });
        }
        table = e & ADDR_MASK;
        level -= 1;
    }
}

/// Translate a first-stage structure address through the second stage (nested), requiring
/// read access, and write access when an A/D update will be written there.
fn nested_table_addr<M: GuestMemoryAccess + ?Sized>(
    mem: &mut M,
    cfg: &VtdConfig,
    ss: Option<&SsTable>,
    gpa: u64,
    for_update: bool,
) -> Result<u64, WalkError> {
    let Some(ss) = ss else { return Ok(gpa) };
    let leaf = match ss_walk(mem, cfg, ss, gpa, for_update) {
        Ok(l) => l,
        Err(WalkError::NotPresent { .. }) => {
            return Err(WalkError::Fault(if for_update {
                FaultReason::Write
            } else {
                FaultReason::Read
            }))
        }
        Err(e) => return Err(e),
    };
    if !leaf.r {
        return Err(WalkError::Fault(FaultReason::Read));
    }
    if for_update && !leaf.w {
        return Err(WalkError::Fault(FaultReason::Write));
    }
    Ok(leaf.out_base + (gpa - leaf.in_base))
}

/// Whether `iova` is canonical for a first stage of `levels` levels.
pub(crate) fn canonical(iova: u64, levels: u8) -> bool {
    let bits = if levels == 5 { 57 } else { 48 };
    let shift = 64 - bits;
    (((iova << shift) as i64) >> shift) as u64 == iova
}

/// The dirty-bit policy of a first-stage walk: D is set only when the request writes and the
/// leaf grants it the write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirtyPolicy {
    pub write: bool,
    pub privileged: bool,
    pub wpe: bool,
}

fn fs_walk<M: GuestMemoryAccess + ?Sized>(
    mem: &mut M,
    cfg: &VtdConfig,
    t: &FsTable,
    ss: Option<&SsTable>,
    iova: u64,
    dirty: DirtyPolicy,
) -> Result<Leaf, WalkError> {
    if !canonical(iova, t.levels) {
        return Err(WalkError::Fault(FaultReason::NonCanonical));
    }
    let haw_rsvd = !cfg.haw_mask() & ADDR_MASK;
    let (mut rw, mut us, mut xd) = (true, true, false);
    let mut table = t.root;
    let mut level = t.levels;
    loop {
        let shift = level_shift(level);
        let entry_gpa = table + ((iova >> shift) & 0x1ff) * 8;
        let hpa = nested_table_addr(mem, cfg, ss, entry_gpa, false)?;
        let e = read_u64(mem, hpa).map_err(|_| WalkError::Fault(FaultReason::FsEntryAccess))?;
        if e & 1 == 0 {
            return Err(WalkError::NotPresent {
                stage: StageKind::First,
                hole_log2: shift,
            });
        }
        rw &= e & 2 != 0;
        us &= e & 4 != 0;
        xd |= e >> 63 != 0;
        let ps = e & (1 << 7) != 0;
        let leaf = level == 1 || ps;
        let mut rsvd = haw_rsvd;
        if ps {
            let allowed = match level {
                2 => true,
                3 => cfg.fs1gp,
                _ => false,
            };
            if !allowed {
                return Err(WalkError::Fault(FaultReason::FsEntryReserved));
            }
            // Bit 12 is PAT in a large-page entry; the offset bits above it are reserved.
            rsvd |= ((1u64 << shift) - 1) & ADDR_MASK & !(1 << 12);
        }
        if e & rsvd != 0 {
            return Err(WalkError::Fault(FaultReason::FsEntryReserved));
        }
        let mut bits = 1 << 5;
        if leaf {
            let write_ok = (rw && (us || dirty.privileged)) || (dirty.privileged && !dirty.wpe);
            if dirty.write && write_ok {
                bits |= 1 << 6;
            }
        }
        if e & bits != bits {
            let hpa = nested_table_addr(mem, cfg, ss, entry_gpa, true)?;
            set_bits(mem, hpa, e, bits)?;
        }
        if leaf {
            let mask = (1u64 << shift) - 1;
            let mut out = Leaf {
                iova_base: iova & !mask,
                out_base: e & ADDR_MASK & !mask & !(if ps { 1 << 12 } else { 0 }),
                size_log2: shift,
                has_fs: true,
                fs_rw: rw,
                fs_us: us,
                fs_xd: xd,
                fs_global: e & (1 << 8) != 0,
                has_ss: false,
                ss_r: true,
                ss_w: true,
                ss_x: true,
                dirty: e & (1 << 6) != 0 || bits & (1 << 6) != 0,
            };
            if let Some(ss) = ss {
                let gpa = out.out_base + (iova & mask);
                let s = match ss_walk(mem, cfg, ss, gpa, dirty.write) {
                    Err(WalkError::NotPresent { .. }) => {
                        // The hole is in the guest-physical space; report the smallest page.
                        return Err(WalkError::NotPresent {
                            stage: StageKind::Second,
                            hole_log2: 12,
                        });
                    }
                    other => other?,
                };
                let size_log2 = out.size_log2.min(s.size_log2);
                let m = (1u64 << size_log2) - 1;
                let hpa = s.out_base + (gpa - s.in_base);
                out.iova_base = iova & !m;
                out.out_base = hpa & !m;
                out.size_log2 = size_log2;
                out.has_ss = true;
                out.ss_r = s.r;
                out.ss_w = s.w;
                out.ss_x = !ss.exec || s.x;
                out.dirty &= s.dirty;
            }
            return Ok(out);
        }
        table = e & ADDR_MASK;
        level -= 1;
    }
}

/// Walk the domain's tables for `iova`. Pass-through yields a 4 KiB identity leaf.
pub(crate) fn walk<M: GuestMemoryAccess + ?Sized>(
    mem: &mut M,
    cfg: &VtdConfig,
    domain: &Domain,
    iova: u64,
    dirty: DirtyPolicy,
) -> Result<Leaf, WalkError> {
    let none = Leaf {
        iova_base: iova & !0xfff,
        out_base: iova & !0xfff,
        size_log2: 12,
        has_fs: false,
        fs_rw: true,
        fs_us: true,
        fs_xd: false,
        fs_global: false,
        has_ss: false,
        ss_r: true,
        ss_w: true,
        ss_x: true,
        dirty: true,
    };
    match &domain.stage {
        Stage::PassThrough => {
            if iova >> cfg.aw_bits != 0 {
                return Err(WalkError::Fault(FaultReason::AddressBeyondWidth));
            }
            Ok(none)
        }
        Stage::Second(t) => {
            let s = ss_walk(mem, cfg, t, iova, dirty.write)?;
            Ok(Leaf {
                iova_base: s.in_base,
                out_base: s.out_base,
                size_log2: s.size_log2,
                has_ss: true,
                ss_r: s.r,
                ss_w: s.w,
                ss_x: s.x,
                dirty: s.dirty,
                ..none
            })
        }
        Stage::First(t) => fs_walk(mem, cfg, t, None, iova, dirty),
        Stage::Nested(f, s) => fs_walk(mem, cfg, f, Some(s), iova, dirty),
    }
}
