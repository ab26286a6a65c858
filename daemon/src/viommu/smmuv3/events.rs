//! Event records (32 bytes) written to the event queue.

/// Event type codes (the record's `dw0[7:0]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventType {
    /// Unsupported upstream transaction.
    FUut = 0x01,
    /// StreamID beyond the stream table.
    CBadStreamId = 0x02,
    /// External abort fetching an STE (or L1 descriptor).
    FSteFetch = 0x03,
    /// Invalid or illegal STE.
    CBadSte = 0x04,
    /// ATS translation request where the STE does not allow ATS.
    FBadAtsTreq = 0x05,
    /// Non-substream traffic on a stream whose S1DSS terminates it.
    FStreamDisabled = 0x06,
    /// Translated transaction where the STE does not allow ATS.
    FTranslForbidden = 0x07,
    /// Substream ID out of range or not allowed.
    CBadSubstreamId = 0x08,
    /// External abort fetching a CD (or L1 CD descriptor).
    FCdFetch = 0x09,
    /// Invalid or illegal CD.
    CBadCd = 0x0A,
    /// External abort on a translation-table fetch.
    FWalkEabt = 0x0B,
    /// Translation fault.
    FTranslation = 0x10,
    /// Address-size fault.
    FAddrSize = 0x11,
    /// Access-flag fault.
    FAccess = 0x12,
    /// Permission fault.
    FPermission = 0x13,
}

/// Which part of a walk a stage-2 fault happened on (event dw1 CLASS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// Fetching a CD through stage 2.
    Cd = 0,
    /// Fetching a stage-1 translation table through stage 2.
    TranslationTable = 1,
    /// The input address itself.
    Input = 2,
}

/// One event, before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Type.
    pub kind: EventType,
    /// StreamID.
    pub sid: u32,
    /// SubstreamID, if the transaction had one.
    pub ssid: Option<u32>,
    /// Privileged transaction (PnU).
    pub privileged: bool,
    /// Instruction fetch (InD).
    pub instruction: bool,
    /// Read (RnW).
    pub read: bool,
    /// The fault came from stage 2 (S2).
    pub stage2: bool,
    /// CLASS for stage-2 faults.
    pub class: FaultClass,
    /// Input address of the transaction (dw2).
    pub input_addr: u64,
    /// dw3: the IPA for stage-2 faults, the fetch address for F_*_FETCH/F_WALK_EABT.
    pub aux_addr: u64,
}

impl Event {
    /// A configuration event (C_*, F_STE_FETCH, ...) for `sid`/`ssid`, other fields zero.
    pub(crate) fn config(kind: EventType, sid: u32, ssid: Option<u32>) -> Self {
        Self {
            kind,
            sid,
            ssid,
            privileged: false,
            instruction: false,
            read: false,
            stage2: false,
            class: FaultClass::Input,
            input_addr: 0,
            aux_addr: 0,
        }
    }

    /// The 32-byte little-endian record.
    pub fn encode(&self) -> [u8; 32] {
        let dw0 = self.kind as u64
            | u64::from(self.ssid.is_some()) << 11
            | u64::from(self.ssid.unwrap_or(0) & 0xf_ffff) << 12
            | u64::from(self.sid) << 32;
        let dw1 = u64::from(self.privileged) << 33
            | u64::from(self.instruction) << 34
            | u64::from(self.read) << 35
            | u64::from(self.stage2) << 39
            | (self.class as u64) << 40;
        let mut out = [0u8; 32];
        for (i, w) in [dw0, dw1, self.input_addr, self.aux_addr]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decode a record written by [`Event::encode`] (for tests and diagnostics); `None` for an
    /// unknown type code.
    pub fn decode(bytes: &[u8; 32]) -> Option<Self> {
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (dw0, dw1) = (w(0), w(1));
        let kind = match dw0 & 0xff {
            0x01 => EventType::FUut,
            0x02 => EventType::CBadStreamId,
            0x03 => EventType::FSteFetch,
            0x04 => EventType::CBadSte,
            0x05 => EventType::FBadAtsTreq,
            0x06 => EventType::FStreamDisabled,
            0x07 => EventType::FTranslForbidden,
            0x08 => EventType::CBadSubstreamId,
            0x09 => EventType::FCdFetch,
            0x0A => EventType::CBadCd,
            0x0B => EventType::FWalkEabt,
            0x10 => EventType::FTranslation,
            0x11 => EventType::FAddrSize,
            0x12 => EventType::FAccess,
            0x13 => EventType::FPermission,
            _ => return None,
        };
        let class = match (dw1 >> 40) & 3 {
            0 => FaultClass::Cd,
            1 => FaultClass::TranslationTable,
            _ => FaultClass::Input,
        };
        Some(Self {
            kind,
            sid: (dw0 >> 32) as u32,
            ssid: (dw0 >> 11 & 1 == 1).then_some((dw0 >> 12 & 0xf_ffff) as u32),
            privileged: dw1 >> 33 & 1 == 1,
            instruction: dw1 >> 34 & 1 == 1,
            read: dw1 >> 35 & 1 == 1,
            stage2: dw1 >> 39 & 1 == 1,
            class,
            input_addr: w(2),
            aux_addr: w(3),
        })
    }
}
