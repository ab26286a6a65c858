//! Stream table entries and context descriptors: decoding and validation.
//!
//! Decoding happens once per fetch; the result is cached until CFGI_*. Every field the model
//! acts on is checked here against the properties, so the walkers only see consistent
//! configurations (an inconsistent one is C_BAD_STE / C_BAD_CD, never a panic or an
//! out-of-range shift).

use super::props::{pa_bits, Smmuv3Properties};
use super::walk::{stage1_start_level, Stage, WalkConfig};

/// An ILLEGAL structure (the architecture's word): the STE or CD cannot be used and the
/// transaction is terminated with C_BAD_STE / C_BAD_CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Illegal;

/// STE.EATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eats {
    /// ATS disabled: translation requests F_BAD_ATS_TREQ, translated traffic forbidden.
    Disabled,
    /// Full ATS: completions carry the final (PA) translation; translated traffic bypasses.
    Full,
    /// Split stage: completions carry stage 1 only (IPA); translated traffic goes through
    /// stage 2.
    SplitStage,
}

/// STE.S1DSS: what non-substream traffic does when the stream has substreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum S1Dss {
    Terminate,
    Bypass,
    Substream0,
}

/// STE.S1Fmt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CdTableFormat {
    Linear,
    /// Two levels; the leaf table covers 2^split substreams (6 for 4 KiB, 10 for 64 KiB).
    TwoLevel {
        split: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stage1Config {
    pub ctx_ptr: u64,
    pub fmt: CdTableFormat,
    /// Number of SSID bits (S1CDMax).
    pub cd_max: u32,
    pub dss: S1Dss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stage2Config {
    pub walk: WalkConfig,
    /// S2R: record stage-2 faults.
    pub record: bool,
}

/// A decoded, valid STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ste {
    /// Config = 0b000: abort without an event.
    Abort,
    /// Translate with the stages present; both `None` is bypass.
    Translate {
        s1: Option<Stage1Config>,
        s2: Option<Stage2Config>,
        eats: Eats,
        vmid: u16,
    },
}

/// Decode the 8 words of an STE. `Err` means C_BAD_STE.
pub(crate) fn decode_ste(w: &[u64; 8], props: &Smmuv3Properties) -> Result<Ste, Illegal> {
    if w[0] & 1 == 0 {
        return Err(Illegal);
    }
    let config = (w[0] >> 1 & 7) as u8;
    if config == 0 {
        return Ok(Ste::Abort);
    }
    if config & 4 == 0 {
        return Err(Illegal);
    }
    let s1_on = config & 1 != 0;
    let s2_on = config & 2 != 0;
    if (s1_on && !props.stage1) || (s2_on && !props.stage2) {
        return Err(Illegal);
    }
    let eats = if !props.ats {
        Eats::Disabled
    } else {
        match w[1] >> 28 & 3 {
            0 => Eats::Disabled,
            1 => Eats::Full,
            2 if s1_on && s2_on => Eats::SplitStage,
            _ => return Err(Illegal),
        }
    };
    let vmid_mask = if props.vmid16 { 0xffff } else { 0xff };
    let vmid = (w[2] & vmid_mask) as u16;
    let s1 = if s1_on {
        let fmt = match w[0] >> 4 & 3 {
            0 => CdTableFormat::Linear,
            1 if props.two_level_cd => CdTableFormat::TwoLevel { split: 6 },
            2 if props.two_level_cd => CdTableFormat::TwoLevel { split: 10 },
            _ => return Err(Illegal),
        };
        let cd_max = (w[0] >> 59) as u32;
        if cd_max > u32::from(props.ssid_bits) {
            return Err(Illegal);
        }
        let dss = match w[1] & 3 {
            0 => S1Dss::Terminate,
            1 => S1Dss::Bypass,
            2 => S1Dss::Substream0,
            _ => return Err(Illegal),
        };
        Some(Stage1Config {
            ctx_ptr: w[0] & 0x000f_ffff_ffff_ffc0,
            fmt,
            cd_max,
            dss,
        })
    } else {
        None
    };
    let s2 = if s2_on {
        Some(decode_s2(w, props)?)
    } else {
        None
    };
    Ok(Ste::Translate { s1, s2, eats, vmid })
}

fn decode_s2(w: &[u64; 8], props: &Smmuv3Properties) -> Result<Stage2Config, Illegal> {
    let vtcr = w[2] >> 32;
    let t0sz = (vtcr & 0x3f) as u32;
    let sl0 = (vtcr >> 6 & 3) as u32;
    let granule_log2 = match vtcr >> 14 & 3 {
        0 => 12,
        1 => 16,
        2 => 14,
        _ => return Err(Illegal),
    };
    let ps = vtcr >> 16 & 7;
    let aa64 = w[2] >> 51 & 1 == 1;
    let endi = w[2] >> 52 & 1 == 1;
    if !aa64 || endi || !props.granule_supported(granule_log2) {
        return Err(Illegal);
    }
    let max_t0sz = if granule_log2 == 16 { 47 } else { 48 };
    if !(16..=max_t0sz).contains(&t0sz) {
        return Err(Illegal);
    }
    let oas = props.oas.bits();
    let input_bits = 64 - t0sz;
    if input_bits > oas {
        return Err(Illegal);
    }
    let start_level = match (granule_log2, sl0) {
        (12, 0) => 2,
        (12, 1) => 1,
        (12, 2) => 0,
        (14, 0) => 3,
        (14, 1) => 2,
        (14, 2) => 1,
        (16, 0) => 3,
        (16, 1) => 2,
        _ => return Err(Illegal),
    };
    let walk = WalkConfig {
        stage: Stage::Two,
        granule_log2,
        input_bits,
        start_level,
        ttb: w[3] & 0x000f_ffff_ffff_fff0,
        out_bits: pa_bits(ps).min(oas),
        affd: w[2] >> 53 & 1 == 1,
    };
    // The start level must resolve at least one bit and at most 16 concatenated tables.
    if input_bits <= walk.level_shift(start_level) || walk.start_bits() > walk.stride() + 4 {
        return Err(Illegal);
    }
    Ok(Stage2Config {
        walk,
        record: w[2] >> 58 & 1 == 1,
    })
}

/// One translation-table region of a CD (TTB0 or TTB1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub walk: WalkConfig,
    /// TBI for this region: the top byte is ignored when selecting and range-checking.
    pub tbi: bool,
}

/// A decoded, valid CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cd {
    /// `None` when EPDx = 1 (walks of that half fault).
    pub ttb0: Option<Region>,
    pub ttb1: Option<Region>,
    pub asid: u16,
    pub wxn: bool,
    /// CD.R: record stage-1 faults.
    pub record: bool,
    /// CD.A: terminated transactions abort (else RAZ/WI).
    pub abort: bool,
}

/// Decode the first words of a CD. `Err` means C_BAD_CD.
pub(crate) fn decode_cd(w: &[u64; 4], props: &Smmuv3Properties) -> Result<Cd, Illegal> {
    let d0 = w[0];
    if d0 >> 31 & 1 == 0 || d0 >> 41 & 1 == 0 || d0 >> 15 & 1 == 1 {
        // V clear, AArch32 tables, or big-endian tables: none is supported.
        return Err(Illegal);
    }
    let out_bits = pa_bits(d0 >> 32 & 7).min(props.oas.bits());
    let affd = d0 >> 35 & 1 == 1;
    let tbi = d0 >> 38 & 3;
    let region = |tsz: u32, tg: Option<u32>, ttb: u64, tbi: bool| -> Result<Region, Illegal> {
        let granule_log2 = tg.ok_or(Illegal)?;
        if !props.granule_supported(granule_log2) {
            return Err(Illegal);
        }
        let max_tsz = if granule_log2 == 16 { 47 } else { 48 };
        if !(16..=max_tsz).contains(&tsz) {
            return Err(Illegal);
        }
        let input_bits = 64 - tsz;
        Ok(Region {
            walk: WalkConfig {
                stage: Stage::One,
                granule_log2,
                input_bits,
                start_level: stage1_start_level(granule_log2, input_bits),
                ttb: ttb & 0x000f_ffff_ffff_fff0,
                out_bits,
                affd,
            },
            tbi,
        })
    };
    let tg0 = match d0 >> 6 & 3 {
        0 => Some(12),
        1 => Some(16),
        2 => Some(14),
        _ => None,
    };
    let tg1 = match d0 >> 22 & 3 {
        1 => Some(14),
        2 => Some(12),
        3 => Some(16),
        _ => None,
    };
    let ttb0 = if d0 >> 14 & 1 == 1 {
        None
    } else {
        Some(region((d0 & 0x3f) as u32, tg0, w[1], tbi & 1 == 1)?)
    };
    let ttb1 = if d0 >> 30 & 1 == 1 {
        None
    } else {
        Some(region((d0 >> 16 & 0x3f) as u32, tg1, w[2], tbi & 2 == 2)?)
    };
    let asid_mask = if props.asid16 { 0xffff } else { 0xff };
    Ok(Cd {
        ttb0,
        ttb1,
        asid: (d0 >> 48 & asid_mask) as u16,
        wxn: d0 >> 36 & 1 == 1,
        record: d0 >> 45 & 1 == 1,
        abort: d0 >> 46 & 1 == 1,
    })
}

impl Cd {
    /// Pick the region for `addr` and check the address is inside it: bit 55 selects TTB0/TTB1;
    /// every bit from the region's input size up to bit 63 (bit 55 with TBI) must equal it.
    pub fn region_for(&self, addr: u64) -> Option<&Region> {
        let upper = addr >> 55 & 1 == 1;
        let region = if upper {
            self.ttb1.as_ref()?
        } else {
            self.ttb0.as_ref()?
        };
        let top = if region.tbi { 56 } else { 64 };
        let check_bits = top - region.walk.input_bits;
        let field = (addr << (64 - top)) >> (64 - top) >> region.walk.input_bits;
        let expect = if upper { (1u64 << check_bits) - 1 } else { 0 };
        (field == expect).then_some(region)
    }
}
