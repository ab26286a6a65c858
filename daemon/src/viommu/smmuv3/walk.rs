//! AArch64 VMSAv8-64 translation-table walks (stage 1 and stage 2, 4K/16K/64K granules).
//!
//! Bounded by construction: a walk visits at most the four levels from its start level to 3,
//! reading one descriptor per level; a nested walk calls the stage-2 walker once per stage-1
//! level plus once for the output, so it reads at most 4 + 4 * 5 descriptors.

use super::events::FaultClass;

/// Which translation regime a walk belongs to: it decides how table and leaf attribute bits
/// are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    One,
    Two,
}

/// Everything a walk needs, validated by the STE/CD decoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalkConfig {
    pub stage: Stage,
    /// 12, 14 or 16.
    pub granule_log2: u32,
    /// Input address bits (64 - TxSZ).
    pub input_bits: u32,
    /// 0..=3.
    pub start_level: u32,
    /// Base of the start-level table (possibly concatenated at stage 2).
    pub ttb: u64,
    /// Output (or intermediate, for stage 1 in a nested config) address bits.
    pub out_bits: u32,
    /// Access-flag faults disabled.
    pub affd: bool,
}

impl WalkConfig {
    pub fn stride(&self) -> u32 {
        self.granule_log2 - 3
    }

    pub fn level_shift(&self, level: u32) -> u32 {
        self.granule_log2 + (3 - level) * self.stride()
    }

    /// Bits resolved at the start level, more than `stride` when stage-2 tables are
    /// concatenated.
    pub fn start_bits(&self) -> u32 {
        self.input_bits - self.level_shift(self.start_level)
    }

    /// Whether a block descriptor is legal at `level` (48-bit output formats only).
    fn block_allowed(&self, level: u32) -> bool {
        match self.granule_log2 {
            12 => level == 1 || level == 2,
            _ => level == 2,
        }
    }
}

/// Stage-1 start level for an input size: the level whose table resolves the top bits.
pub(crate) fn stage1_start_level(granule_log2: u32, input_bits: u32) -> u32 {
    let stride = granule_log2 - 3;
    let levels = (input_bits - granule_log2).div_ceil(stride);
    4 - levels
}

/// Access rights of a translation, for each privilege level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms {
    /// Unprivileged read.
    pub r_user: bool,
    /// Unprivileged write.
    pub w_user: bool,
    /// Unprivileged execute.
    pub x_user: bool,
    /// Privileged read.
    pub r_priv: bool,
    /// Privileged write.
    pub w_priv: bool,
    /// Privileged execute.
    pub x_priv: bool,
}

impl Perms {
    pub const ALL: Perms = Perms {
        r_user: true,
        w_user: true,
        x_user: true,
        r_priv: true,
        w_priv: true,
        x_priv: true,
    };

    pub fn intersect(self, o: Perms) -> Perms {
        Perms {
            r_user: self.r_user && o.r_user,
            w_user: self.w_user && o.w_user,
            x_user: self.x_user && o.x_user,
            r_priv: self.r_priv && o.r_priv,
            w_priv: self.w_priv && o.w_priv,
            x_priv: self.x_priv && o.x_priv,
        }
    }

    /// (read, write, execute) for one privilege level.
    pub fn at(self, privileged: bool) -> (bool, bool, bool) {
        if privileged {
            (self.r_priv, self.w_priv, self.x_priv)
        } else {
            (self.r_user, self.w_user, self.x_user)
        }
    }
}

/// Why a walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    Translation,
    AddrSize,
    Access,
    Permission,
    WalkEabt,
}

/// A walk fault, with what the event record and an ATS hole need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    pub kind: FaultKind,
    /// Raised by stage 2 (possibly while fetching stage-1 tables or a CD).
    pub stage2: bool,
    pub class: FaultClass,
    /// The IPA being translated when stage 2 faulted.
    pub ipa: u64,
    /// The address of the failed fetch for F_WALK_EABT.
    pub fetch: u64,
    /// log2 of the input region the fault applies to (the level's block size), for ATS holes.
    pub hole_log2: u32,
}

impl Fault {
    pub fn new(kind: FaultKind, stage: Stage, hole_log2: u32) -> Self {
        Fault {
            kind,
            stage2: stage == Stage::Two,
            class: FaultClass::Input,
            ipa: 0,
            fetch: 0,
            hole_log2,
        }
    }
}

/// The leaf a walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub in_base: u64,
    pub out_base: u64,
    pub size_log2: u32,
    pub perms: Perms,
    /// Stage 1 nG clear.
    pub global: bool,
}

/// Bits [51:12] of a descriptor: the output/next-table address field of every format the
/// model decodes.
const DESC_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Walk `cfg` for `addr`. `read` fetches one descriptor at a table address (for a nested
/// stage 1 it translates the IPA through stage 2 first); `wxn` is the CD's WXN bit.
pub(crate) fn walk(
    cfg: &WalkConfig,
    addr: u64,
    wxn: bool,
    read: &mut dyn FnMut(u64) -> Result<u64, Fault>,
) -> Result<Leaf, Fault> {
    let start_bits = cfg.start_bits();
    let mut level = cfg.start_level;
    let table_bytes = 8u64 << start_bits;
    let mut table = cfg.ttb & !(table_bytes - 1);
    let start_hole = cfg.level_shift(level);
    if table >> cfg.out_bits != 0 {
        return Err(Fault::new(FaultKind::AddrSize, cfg.stage, start_hole));
    }
    // Hierarchical attributes (stage 1 only): APTable[1:0], UXNTable, PXNTable.
    let (mut ap_table, mut uxn_table, mut pxn_table) = (0u64, false, false);
    loop {
        let shift = cfg.level_shift(level);
        let bits = if level == cfg.start_level {
            start_bits
        } else {
            cfg.stride()
        };
        let index = (addr >> shift) & ((1u64 << bits) - 1);
        let desc = read(table + index * 8)?;
        if desc & 1 == 0 {
            return Err(Fault::new(FaultKind::Translation, cfg.stage, shift));
        }
        let is_table = desc & 2 != 0 && level < 3;
        if level == 3 && desc & 2 == 0 {
            return Err(Fault::new(FaultKind::Translation, cfg.stage, shift));
        }
        if !is_table && level < 3 && !cfg.block_allowed(level) {
            return Err(Fault::new(FaultKind::Translation, cfg.stage, shift));
        }
        let align = if is_table { cfg.granule_log2 } else { shift };
        let out = desc & DESC_ADDR_MASK & !((1u64 << align) - 1);
        if out >> cfg.out_bits != 0 {
            return Err(Fault::new(FaultKind::AddrSize, cfg.stage, shift));
        }
        if is_table {
            if cfg.stage == Stage::One {
                ap_table |= desc >> 61 & 3;
                uxn_table |= desc >> 60 & 1 == 1;
                pxn_table |= desc >> 59 & 1 == 1;
            }
            table = out;
            level += 1;
            continue;
        }
        if desc >> 10 & 1 == 0 && !cfg.affd {
            return Err(Fault::new(FaultKind::Access, cfg.stage, shift));
        }
        let perms = match cfg.stage {
            Stage::One => stage1_perms(desc, ap_table, uxn_table, pxn_table, wxn),
            Stage::Two => stage2_perms(desc),
        };
        return Ok(Leaf {
            in_base: addr & !((1u64 << shift) - 1),
            out_base: out,
            size_log2: shift,
            perms,
            global: cfg.stage == Stage::One && desc >> 11 & 1 == 0,
        });
    }
}

/// Stage-1 leaf permissions: AP[2] (bit 7) read-only, AP[1] (bit 6) EL0 access, UXN (54),
/// PXN (53), narrowed by APTable/UXNTable/PXNTable; memory writable at EL0 is never privileged-
/// executable, and WXN makes writable memory non-executable.
fn stage1_perms(desc: u64, ap_table: u64, uxn_table: bool, pxn_table: bool, wxn: bool) -> Perms {
    let el0 = desc >> 6 & 1 == 1;
    let read_only = desc >> 7 & 1 == 1;
    let no_el0 = ap_table & 1 == 1;
    let no_write = ap_table >> 1 & 1 == 1;
    let r_user = el0 && !no_el0;
    let w_user = r_user && !read_only && !no_write;
    let w_priv = !read_only && !no_write;
    let uxn = desc >> 54 & 1 == 1 || uxn_table;
    let pxn = desc >> 53 & 1 == 1 || pxn_table;
    // "Writable at EL0" is the effective permission, after APTable.
    let el0_writable = w_user;
    Perms {
        r_user,
        w_user,
        x_user: r_user && !uxn && !(wxn && w_user),
        r_priv: true,
        w_priv,
        x_priv: !(pxn || el0_writable || (wxn && w_priv)),
    }
}

/// Stage-2 leaf permissions: S2AP[0] (bit 6) read, S2AP[1] (bit 7) write, XN (bit 54); the
/// same for both privilege levels.
fn stage2_perms(desc: u64) -> Perms {
    let r = desc >> 6 & 1 == 1;
    let w = desc >> 7 & 1 == 1;
    let x = r && desc >> 54 & 1 == 0;
    Perms {
        r_user: r,
        w_user: w,
        x_user: x,
        r_priv: r,
        w_priv: w,
        x_priv: x,
    }
}
