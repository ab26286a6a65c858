//! VT-d register offsets, bit fields and the capability registers built from the model's
//! properties (VT-d spec 4.1, chapter 11; offsets cross-checked with Linux `iommu.h`).

use thiserror::Error;

/// Version register (32 bit).
pub const VER: u64 = 0x000;
/// Capability register (64 bit, RO).
pub const CAP: u64 = 0x008;
/// Extended capability register (64 bit, RO).
pub const ECAP: u64 = 0x010;
/// Global command (32 bit, WO; reads 0).
pub const GCMD: u64 = 0x018;
/// Global status (32 bit, RO).
pub const GSTS: u64 = 0x01c;
/// Root table address (64 bit).
pub const RTADDR: u64 = 0x020;
/// Register-based context command (64 bit).
pub const CCMD: u64 = 0x028;
/// Fault status (32 bit).
pub const FSTS: u64 = 0x034;
/// Fault event control (32 bit).
pub const FECTL: u64 = 0x038;
/// Fault event data (32 bit).
pub const FEDATA: u64 = 0x03c;
/// Fault event address (32 bit).
pub const FEADDR: u64 = 0x040;
/// Fault event upper address (32 bit; only with ECAP.EIM).
pub const FEUADDR: u64 = 0x044;
/// Invalidation queue head (64 bit, RO).
pub const IQH: u64 = 0x080;
/// Invalidation queue tail (64 bit).
pub const IQT: u64 = 0x088;
/// Invalidation queue address (64 bit).
pub const IQA: u64 = 0x090;
/// Invalidation completion status (32 bit).
pub const ICS: u64 = 0x09c;
/// Invalidation event control (32 bit).
pub const IECTL: u64 = 0x0a0;
/// Invalidation event data (32 bit).
pub const IEDATA: u64 = 0x0a4;
/// Invalidation event address (32 bit).
pub const IEADDR: u64 = 0x0a8;
/// Invalidation event upper address (32 bit).
pub const IEUADDR: u64 = 0x0ac;
/// Invalidation queue error record (64 bit, RO).
pub const IQER: u64 = 0x0b0;
/// IOTLB registers offset / 16 (ECAP.IRO): IVA at 0xF0, IOTLB at 0xF8.
pub const IRO: u64 = 0x0f;
/// Invalidate address register.
pub const IVA: u64 = IRO * 16;
/// IOTLB invalidate register.
pub const IOTLB_REG: u64 = IRO * 16 + 8;
/// Fault recording registers offset / 16 (CAP.FRO): records start at 0x220.
pub const FRO: u64 = 0x22;
/// First fault recording register.
pub const FRCD: u64 = FRO * 16;

/// GCMD/GSTS: translation enable / status.
pub const GCMD_TE: u32 = 1 << 31;
/// GCMD: set root table pointer; GSTS: root table pointer status.
pub const GCMD_SRTP: u32 = 1 << 30;
/// GCMD/GSTS: queued invalidation enable / status.
pub const GCMD_QIE: u32 = 1 << 26;

/// FSTS: primary fault overflow (RW1C).
pub const FSTS_PFO: u32 = 1 << 0;
/// FSTS: primary pending fault (RO, OR of the F bits).
pub const FSTS_PPF: u32 = 1 << 1;
/// FSTS: invalidation queue error (RW1C).
pub const FSTS_IQE: u32 = 1 << 4;
/// FSTS: invalidation completion error (RW1C).
pub const FSTS_ICE: u32 = 1 << 5;
/// FSTS: invalidation time-out error (RW1C).
pub const FSTS_ITE: u32 = 1 << 6;
/// Event control registers: interrupt mask.
pub const EVT_IM: u32 = 1 << 31;
/// Event control registers: interrupt pending.
pub const EVT_IP: u32 = 1 << 30;
/// ICS: invalidation wait descriptor complete (RW1C).
pub const ICS_IWC: u32 = 1;

/// IQA: 256-bit descriptor width.
pub const IQA_DW: u64 = 1 << 11;

/// IQER error codes (IQEI, bits 3:0). Numbering is from memory of the spec (4.1 §11.4.9.6);
/// verify before relying on exact values.
pub mod iqei {
    /// Tail pointer not aligned to a 256-bit descriptor.
    pub const TAIL_MISALIGNED: u8 = 1;
    /// The descriptor could not be fetched from guest memory.
    pub const FETCH_ERROR: u8 = 2;
    /// Unknown or unsupported descriptor type.
    pub const INVALID_TYPE: u8 = 3;
    /// Non-zero reserved field or invalid granularity.
    pub const RESERVED_FIELD: u8 = 4;
    /// Descriptor type not allowed with the queue's descriptor width.
    pub const INVALID_WIDTH: u8 = 5;
    /// Tail beyond the end of the queue.
    pub const TAIL_BEYOND_QUEUE: u8 = 6;
}

/// Model properties that become guest-visible capability bits. Frozen for the life of the
/// model (resolution of `auto` values happens before construction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtdConfig {
    /// Host/guest address width (MGAW+1 and the HAW used for table pointers): 39, 48 or 57.
    pub aw_bits: u8,
    /// Scalable mode (ECAP.SMTS): RTADDR.TTM=01, PASID tables.
    pub scalable_mode: bool,
    /// First-stage translation (ECAP.FSTS); requires scalable mode.
    pub first_stage: bool,
    /// Second-stage translation (ECAP.SSTS in scalable mode; legacy mode always has it).
    pub second_stage: bool,
    /// Nested translation (ECAP.NEST); requires first and second stage.
    pub nested: bool,
    /// Pass-through (ECAP.PT).
    pub pass_through: bool,
    /// Device-TLB / ATS support (ECAP.DT).
    pub device_iotlb: bool,
    /// PASID width in bits; 0 = no PASID support (ECAP.PASID/PSS). At most 20.
    pub pasid_bits: u8,
    /// First-stage 1 GiB pages (CAP.FS1GP).
    pub fs1gp: bool,
    /// First-stage 5-level paging (CAP.FS5LP).
    pub fs5lp: bool,
    /// Second-stage 2 MiB pages (CAP.SSLPS bit 0).
    pub ss_2m: bool,
    /// Second-stage 1 GiB pages (CAP.SSLPS bit 1).
    pub ss_1g: bool,
    /// Supervisor (privileged) requests (ECAP.SRS).
    pub supervisor_requests: bool,
    /// Execute requests (ECAP.ERS).
    pub execute_requests: bool,
    /// Number of fault recording registers, 1..=256 (CAP.NFR+1).
    pub fault_records: u16,
}

impl Default for VtdConfig {
    /// A scalable-mode unit comparable to QEMU's `intel-iommu,x-scalable-mode=on,x-flts=on,
    /// device-iotlb=on,pasid-bits=20,aw-bits=48` plus nesting and 8 fault records.
    fn default() -> Self {
        Self {
            aw_bits: 48,
            scalable_mode: true,
            first_stage: true,
            second_stage: true,
            nested: true,
            pass_through: true,
            device_iotlb: true,
            pasid_bits: 20,
            fs1gp: true,
            fs5lp: false,
            ss_2m: true,
            ss_1g: true,
            supervisor_requests: true,
            execute_requests: true,
            fault_records: 8,
        }
    }
}

/// A model property combination the VT-d architecture cannot express.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VtdConfigError {
    /// `aw_bits` is not 39, 48 or 57.
    #[error("VT-d address width {0} is not supported; use 39, 48 or 57.")]
    AddressWidth(u8),
    /// `pasid_bits` above 20.
    #[error("VT-d PASID width {0} exceeds 20 bits.")]
    PasidBits(u8),
    /// A scalable-mode-only feature without scalable mode.
    #[error("VT-d {0} needs scalable mode; enable scalable_mode or turn it off.")]
    NeedsScalableMode(&'static str),
    /// Nested without both stages.
    #[error("VT-d nested translation needs both first- and second-stage support.")]
    NestedNeedsBothStages,
    /// Neither stage nor pass-through.
    #[error("VT-d needs at least one translation stage.")]
    NoTranslation,
    /// Fault record count outside 1..=256.
    #[error("VT-d fault record count {0} is outside 1..=256.")]
    FaultRecords(u16),
    /// 5-level first stage needs 57-bit addresses.
    #[error("VT-d 5-level first-stage paging needs aw_bits 57.")]
    Fs5lpNeeds57Bits,
}

impl VtdConfig {
    /// Check that the properties form a valid unit.
    pub fn validate(&self) -> Result<(), VtdConfigError> {
        if !matches!(self.aw_bits, 39 | 48 | 57) {
            return Err(VtdConfigError::AddressWidth(self.aw_bits));
        }
        if self.pasid_bits > 20 {
            return Err(VtdConfigError::PasidBits(self.pasid_bits));
        }
        if !self.scalable_mode {
            for (on, name) in [
                (self.first_stage, "first-stage translation"),
                (self.nested, "nested translation"),
                (self.pasid_bits > 0, "PASID support"),
            ] {
                if on {
                    return Err(VtdConfigError::NeedsScalableMode(name));
                }
            }
        }
        if self.nested && !(self.first_stage && self.second_stage) {
            return Err(VtdConfigError::NestedNeedsBothStages);
        }
        if !self.first_stage && !self.second_stage {
            return Err(VtdConfigError::NoTranslation);
        }
        if !(1..=256).contains(&self.fault_records) {
            return Err(VtdConfigError::FaultRecords(self.fault_records));
        }
        if self.fs5lp && self.aw_bits != 57 {
            return Err(VtdConfigError::Fs5lpNeeds57Bits);
        }
        Ok(())
    }

    /// SAGAW bits: every second-stage level count whose width fits in `aw_bits`.
    pub fn sagaw(&self) -> u64 {
        match self.aw_bits {
            39 => 0b0010,
            48 => 0b0110,
            _ => 0b1110,
        }
    }

    /// CAP_REG value.
    pub fn cap(&self) -> u64 {
        let mut cap = 0u64;
        cap |= 6; // ND = 6: 16-bit domain ids
        cap |= self.sagaw() << 8;
        cap |= u64::from(self.aw_bits - 1) << 16; // MGAW
        cap |= FRO << 24;
        let mut sslps = 0u64;
        if self.ss_2m {
            sslps |= 1;
        }
        if self.ss_1g {
            sslps |= 2;
        }
        cap |= sslps << 34;
        cap |= 1 << 39; // PSI
        cap |= u64::from(self.fault_records - 1) << 40; // NFR
        cap |= 18 << 48; // MAMV
        cap |= (1 << 54) | (1 << 55); // DWD, DRD (drains are accepted and are no-ops)
        if self.fs1gp && self.first_stage {
            cap |= 1 << 56;
        }
        if self.fs5lp && self.first_stage {
            cap |= 1 << 60;
        }
        cap |= 1 << 63; // ESRTPS: SRTP also flushes every cache
        cap
    }

    /// ECAP_REG value.
    pub fn ecap(&self) -> u64 {
        let mut e = 0u64;
        e |= 1 << 1; // QI
        if self.device_iotlb {
            e |= 1 << 2; // DT
        }
        if self.pass_through {
            e |= 1 << 6;
        }
        e |= 1 << 7; // SC: snoop control (SNP bit accepted)
        e |= IRO << 8;
        if self.nested {
            e |= 1 << 26;
        }
        if self.execute_requests {
            e |= 1 << 30;
        }
        if self.supervisor_requests {
            e |= 1 << 31;
        }
        if self.pasid_bits > 0 {
            e |= u64::from(self.pasid_bits - 1) << 35; // PSS
            e |= 1 << 40; // PASID
        }
        if self.scalable_mode {
            e |= 1 << 43; // SMTS
            e |= 1 << 49; // RPS: RID_PASID honoured
            if self.second_stage {
                e |= 1 << 46; // SSTS
                e |= 1 << 45; // SSADS: second-stage A/D with SSADE
            }
            if self.first_stage {
                e |= 1 << 47; // FSTS
            }
        }
        e
    }

    /// Size of the MMIO window: the fault recording registers end it.
    pub fn window_size(&self) -> u64 {
        let end = FRCD + 16 * u64::from(self.fault_records);
        end.next_power_of_two().max(0x1000)
    }

    /// Host address width mask: bits a table pointer or output address may use.
    pub fn haw_mask(&self) -> u64 {
        (1u64 << self.aw_bits) - 1
    }
}
