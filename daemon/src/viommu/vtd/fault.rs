//! Fault reasons (VT-d spec 4.1 appendix "Non-recoverable fault reason encodings"; values as
//! used by QEMU and Linux) and the fault record the model writes into FRCD registers.

/// Why a request failed translation. The discriminant is the FR code recorded in FRCD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// Legacy root entry not present (also used for scalable root halves).
    RootNotPresent = 0x01,
    /// Context entry not present.
    ContextNotPresent = 0x02,
    /// Context entry programmed with an unsupported value (TT, AW, PASIDE use).
    ContextInvalid = 0x03,
    /// Input address above the domain's address width.
    AddressBeyondWidth = 0x04,
    /// Second-stage (or legacy) write without W.
    Write = 0x05,
    /// Second-stage (or legacy) read without R / non-present entry.
    Read = 0x06,
    /// Second-stage paging entry could not be read.
    PagingEntryAccess = 0x07,
    /// Root entry could not be read.
    RootTableAccess = 0x08,
    /// Context entry could not be read.
    ContextTableAccess = 0x09,
    /// Reserved bit set in a present root entry.
    RootReserved = 0x0a,
    /// Reserved bit set in a present context entry.
    ContextReserved = 0x0b,
    /// Reserved bit set in a present second-stage paging entry.
    PagingEntryReserved = 0x0c,
    /// Translation request or translated request blocked by context TT / DTE.
    TranslationBlocked = 0x0d,
    /// Legacy-mode output address in the interrupt range.
    InterruptAddress = 0x0e,
    /// RTADDR.TTM selects a mode the unit does not implement.
    InvalidTtm = 0x31,
    /// PASID directory entry could not be read.
    PasidDirAccess = 0x50,
    /// PASID directory entry not present (or PASID beyond the directory).
    PasidDirNotPresent = 0x51,
    /// PASID table entry could not be read.
    PasidTableAccess = 0x58,
    /// PASID table entry not present.
    PasidEntryNotPresent = 0x59,
    /// PASID table entry programmed with an unsupported value.
    PasidEntryInvalid = 0x5b,
    /// First-stage paging entry could not be read.
    FsEntryAccess = 0x70,
    /// First-stage paging entry not present.
    FsEntryNotPresent = 0x71,
    /// Reserved bit set in a present first-stage paging entry.
    FsEntryReserved = 0x72,
    /// FSPTPTR in the PASID entry unusable.
    FsptptrInvalid = 0x73,
    /// First-stage input address not canonical.
    NonCanonical = 0x80,
    /// Privilege violation: user request to a supervisor page, or a privileged request the
    /// PASID entry / ECAP.SRS does not allow.
    Privilege = 0x81,
    /// Scalable-mode first-stage write without write permission.
    FsWrite = 0x85,
    /// Scalable-mode output address in the interrupt range.
    SmInterruptAddress = 0x87,
    /// Accessed/dirty bit update failed.
    AdUpdateFailed = 0x91,
}

impl FaultReason {
    /// The FR code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Conditions a translation request reports in its completion (R=W=0) instead of recording
    /// a fault: the device may resolve them with a page request and retry. Only "not present"
    /// and "not permitted" conditions qualify; malformed tables and unreadable memory are
    /// programming errors and are recorded even for translation requests.
    pub fn recoverable(self) -> bool {
        use FaultReason::*;
        matches!(
            self,
            Write
                | Read
                | PasidDirNotPresent
                | PasidEntryNotPresent
                | FsEntryNotPresent
                | NonCanonical
                | Privilege
                | FsWrite
        )
    }
}

/// Address type of the faulting request, as recorded in FRCD.AT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    /// AT=00: untranslated DMA.
    Untranslated = 0,
    /// AT=01: ATS translation request.
    TranslationRequest = 1,
    /// AT=10: translated (pre-translated) DMA.
    Translated = 2,
}

/// One recorded fault, decoded from (or encoded into) a 128-bit FRCD register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// Requester id (bus << 8 | devfn).
    pub sid: u16,
    /// PASID of the request, if it had one.
    pub pasid: Option<u32>,
    /// Faulting page address (FI, 4 KiB aligned).
    pub addr: u64,
    /// Reason code.
    pub reason: u8,
    /// Read (true) or write (false) request (FRCD.T).
    pub read: bool,
    /// Address type of the request.
    pub at: u8,
    /// Privileged-mode request.
    pub privileged: bool,
    /// Execute request.
    pub exec: bool,
}

impl FaultRecord {
    /// Encode as FRCD (lo, hi) with F set.
    pub fn encode(&self) -> (u64, u64) {
        let lo = self.addr & !0xfff;
        let mut hi = u64::from(self.sid);
        hi |= u64::from(self.reason) << 32;
        if let Some(p) = self.pasid {
            hi |= 1 << 31;
            hi |= u64::from(p & 0xf_ffff) << 40;
        }
        if self.privileged {
            hi |= 1 << 29;
        }
        if self.exec {
            hi |= 1 << 30;
        }
        hi |= u64::from(self.at & 3) << 60;
        if self.read {
            hi |= 1 << 62;
        }
        hi |= 1 << 63;
        (lo, hi)
    }

    /// Decode a pending FRCD (lo, hi); `None` when F is clear.
    pub fn decode(lo: u64, hi: u64) -> Option<Self> {
        if hi >> 63 == 0 {
            return None;
        }
        Some(Self {
            sid: hi as u16,
            pasid: (hi & (1 << 31) != 0).then_some(((hi >> 40) & 0xf_ffff) as u32),
            addr: lo & !0xfff,
            reason: (hi >> 32) as u8,
            read: hi & (1 << 62) != 0,
            at: ((hi >> 60) & 3) as u8,
            privileged: hi & (1 << 29) != 0,
            exec: hi & (1 << 30) != 0,
        })
    }
}
