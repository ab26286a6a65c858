//! Model properties and the ID registers derived from them.
//!
//! The guest learns what the model implements only through IDR0–IDR5, so every behaviour that
//! depends on a feature checks the property here, never a constant: a command or STE field
//! for an unadvertised feature is treated the way the architecture says (CERROR_ILL, C_BAD_STE,
//! ignored), not silently honoured.

/// Output address size (IDR5.OAS). 52-bit is not modelled: descriptors are decoded with the
/// 48-bit output-address layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oas {
    /// 32 bits.
    Bits32,
    /// 36 bits.
    Bits36,
    /// 40 bits.
    Bits40,
    /// 42 bits.
    Bits42,
    /// 44 bits (QEMU's default).
    Bits44,
    /// 48 bits.
    Bits48,
}

impl Oas {
    /// The IDR5.OAS / CD.IPS / STE.S2PS encoding.
    pub fn encoding(self) -> u64 {
        match self {
            Oas::Bits32 => 0,
            Oas::Bits36 => 1,
            Oas::Bits40 => 2,
            Oas::Bits42 => 3,
            Oas::Bits44 => 4,
            Oas::Bits48 => 5,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u32 {
        pa_bits(self.encoding())
    }
}

/// Width in bits of a 3-bit IPS/PS/OAS encoding; 52-bit (6) and reserved values are handled
/// by the caller clamping to the model's OAS first.
pub(crate) fn pa_bits(enc: u64) -> u32 {
    match enc {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// What the model implements. Validated once by [`Smmuv3Properties::validate`]; the model
/// refuses to start with an invalid set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smmuv3Properties {
    /// Stage-1 translation (IDR0.S1P).
    pub stage1: bool,
    /// Stage-2 translation (IDR0.S2P); with `stage1` also nested.
    pub stage2: bool,
    /// PCIe ATS (IDR0.ATS): translation requests, translated transactions, CMD_ATC_INV.
    pub ats: bool,
    /// PRI queue and CMD_PRI_RESP (IDR0.PRI).
    pub pri: bool,
    /// Range invalidation in TLBI commands (IDR3.RIL).
    pub ril: bool,
    /// Substream-ID bits (IDR1.SSIDSIZE), 0..=20; 0 means no PASID support.
    pub ssid_bits: u8,
    /// Stream-ID bits (IDR1.SIDSIZE), 1..=32.
    pub sid_bits: u8,
    /// Output address size.
    pub oas: Oas,
    /// 4 KiB translation granule (IDR5.GRAN4K).
    pub gran4k: bool,
    /// 16 KiB translation granule (IDR5.GRAN16K).
    pub gran16k: bool,
    /// 64 KiB translation granule (IDR5.GRAN64K).
    pub gran64k: bool,
    /// 2-level stream tables (IDR0.ST_LEVEL = 1).
    pub two_level_stream_table: bool,
    /// 2-level context-descriptor tables (IDR0.CD2L).
    pub two_level_cd: bool,
    /// MSI writes for CMD_SYNC and MSI configuration registers (IDR0.MSI).
    pub msi: bool,
    /// CMD_SYNC CS=SEV (IDR0.SEV).
    pub sev: bool,
    /// 16-bit ASIDs (IDR0.ASID16).
    pub asid16: bool,
    /// 16-bit VMIDs (IDR0.VMID16).
    pub vmid16: bool,
    /// log2 of the largest command queue (IDR1.CMDQS), 0..=19.
    pub cmdq_log2: u8,
    /// log2 of the largest event queue (IDR1.EVENTQS), 0..=19.
    pub eventq_log2: u8,
    /// log2 of the largest PRI queue (IDR1.PRIQS), 0..=19.
    pub priq_log2: u8,
}

impl Default for Smmuv3Properties {
    /// An ATS- and PASID-capable SMMU with every granule, 16-bit SIDs and 48-bit OAS: what an
    /// `ats-dma` device behind it needs.
    fn default() -> Self {
        Self {
            stage1: true,
            stage2: true,
            ats: true,
            pri: true,
            ril: true,
            ssid_bits: 20,
            sid_bits: 16,
            oas: Oas::Bits48,
            gran4k: true,
            gran16k: true,
            gran64k: true,
            two_level_stream_table: true,
            two_level_cd: true,
            msi: true,
            sev: true,
            asid16: true,
            vmid16: true,
            cmdq_log2: 10,
            eventq_log2: 10,
            priq_log2: 10,
        }
    }
}

/// An invalid property set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertiesError {
    /// Neither stage is implemented.
    #[error("smmuv3: at least one of the properties stage1 and stage2 must be enabled")]
    NoStage,
    /// No granule is implemented.
    #[error("smmuv3: at least one translation granule (gran4k, gran16k, gran64k) must be enabled")]
    NoGranule,
    /// A width is out of its architectural range.
    #[error("smmuv3: property {name} = {value} is out of range {min}..={max}")]
    OutOfRange {
        /// Property name.
        name: &'static str,
        /// Value given.
        value: u8,
        /// Smallest allowed value.
        min: u8,
        /// Largest allowed value.
        max: u8,
    },
    /// PASIDs without a stage 1 to translate them.
    #[error("smmuv3: ssid_bits > 0 needs stage1; disable PASIDs or enable stage1")]
    SsidWithoutStage1,
}

impl Smmuv3Properties {
    /// Check every property against its architectural range.
    pub fn validate(&self) -> Result<(), PropertiesError> {
        if !self.stage1 && !self.stage2 {
            return Err(PropertiesError::NoStage);
        }
        if !self.gran4k && !self.gran16k && !self.gran64k {
            return Err(PropertiesError::NoGranule);
        }
        let check = |name, value: u8, min, max| {
            if value < min || value > max {
                Err(PropertiesError::OutOfRange {
                    name,
                    value,
                    min,
                    max,
                })
            } else {
                Ok(())
            }
        };
        check("ssid_bits", self.ssid_bits, 0, 20)?;
        check("sid_bits", self.sid_bits, 1, 32)?;
        check("cmdq_log2", self.cmdq_log2, 0, 19)?;
        check("eventq_log2", self.eventq_log2, 0, 19)?;
        check("priq_log2", self.priq_log2, 0, 19)?;
        if self.ssid_bits > 0 && !self.stage1 {
            return Err(PropertiesError::SsidWithoutStage1);
        }
        Ok(())
    }

    /// Whether translation granule `2^log2` is implemented.
    pub(crate) fn granule_supported(&self, log2: u32) -> bool {
        match log2 {
            12 => self.gran4k,
            14 => self.gran16k,
            16 => self.gran64k,
            _ => false,
        }
    }

    /// IDR0.
    pub fn idr0(&self) -> u32 {
        let mut v = 0u32;
        v |= u32::from(self.stage2);
        v |= u32::from(self.stage1) << 1;
        v |= 2 << 2; // TTF: AArch64 tables only
        v |= 1 << 4; // COHACC: table walks and queues are coherent (they read guest RAM)
        v |= u32::from(self.ats) << 10;
        v |= u32::from(self.asid16) << 12;
        v |= u32::from(self.msi) << 13;
        v |= u32::from(self.sev) << 14;
        v |= u32::from(self.pri) << 16;
        v |= u32::from(self.vmid16) << 18;
        v |= u32::from(self.two_level_cd) << 19;
        v |= 2 << 21; // TTENDIAN: little-endian only
        v |= u32::from(self.ats) << 23; // ATSRECERR: CR2.REC_CFG_ATS
        v |= 1 << 24; // STALL_MODEL: stall not supported
        v |= 1 << 26; // TERM_MODEL: terminated transactions may abort or RAZ/WI (CD.A)
        v |= u32::from(self.two_level_stream_table) << 27;
        v
    }

    /// IDR1.
    pub fn idr1(&self) -> u32 {
        u32::from(self.sid_bits)
            | u32::from(self.ssid_bits) << 6
            | u32::from(self.priq_log2) << 11
            | u32::from(self.eventq_log2) << 16
            | u32::from(self.cmdq_log2) << 21
    }

    /// IDR3: RIL, plus STT (TxSZ up to 48) so every start level of every granule is reachable.
    pub fn idr3(&self) -> u32 {
        u32::from(self.ril) << 10 | 1 << 9
    }

    /// IDR5.
    pub fn idr5(&self) -> u32 {
        self.oas.encoding() as u32
            | u32::from(self.gran4k) << 4
            | u32::from(self.gran16k) << 5
            | u32::from(self.gran64k) << 6
    }
}
