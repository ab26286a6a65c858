//! The data the model exchanges with its embedding: device transactions and their results,
//! and the outputs (ATC invalidations, PRG responses, interrupts).

use super::cmdq::PriResponseCode;
use super::events::EventType;

/// How a transaction accesses memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Write (else read).
    pub write: bool,
    /// Instruction fetch.
    pub exec: bool,
    /// Privileged (PnU = 1).
    pub privileged: bool,
}

/// An untranslated or translated DMA transaction from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRequest {
    /// StreamID (the requester id, as the VMM's IORT/DT maps it).
    pub sid: u32,
    /// SubstreamID (PASID), if the transaction carries one.
    pub ssid: Option<u32>,
    /// Input address: IOVA (untranslated) or the translated address (translated DMA).
    pub address: u64,
    /// Access type.
    pub access: Access,
}

/// Where a successful DMA goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaTranslation {
    /// Guest-physical address for `DmaRequest::address`.
    pub address: u64,
    /// Bytes from `address` that are translated contiguously with the same permissions (at
    /// least 1; the device splits larger transfers).
    pub contiguous: u64,
}

/// A terminated DMA transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("smmuv3 terminated the transaction (event {event:?}, raz_wi {raz_wi})")]
pub struct DmaFault {
    /// The event recorded in the event queue (if the queue accepted it); `None` for silent
    /// aborts (STE abort config, GBPA abort) and unrecorded faults (CD.R / STE.S2R clear).
    pub event: Option<EventType>,
    /// CD.A = 0: reads return zero and writes are ignored instead of aborting.
    pub raz_wi: bool,
}

/// A PCIe ATS translation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsRequest {
    /// StreamID.
    pub sid: u32,
    /// PASID from the TLP prefix.
    pub ssid: Option<u32>,
    /// First untranslated address.
    pub address: u64,
    /// Bytes requested (0 is treated as 1).
    pub length: u64,
    /// NW: the device will not write through the answer, so W is reported 0.
    pub no_write: bool,
    /// Execute Requested.
    pub exec: bool,
    /// Privileged Mode Requested.
    pub privileged: bool,
}

/// One entry of an ATS translation completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsTranslation {
    /// Naturally aligned untranslated base of the range the entry describes.
    pub untranslated: u64,
    /// log2 of the range size (>= 12).
    pub size_log2: u8,
    /// Translated base (0 for a hole).
    pub translated: u64,
    /// Read permitted.
    pub r: bool,
    /// Write permitted.
    pub w: bool,
    /// Execute permitted (only when requested).
    pub x: bool,
    /// The answer is for privileged mode (echoes the request).
    pub privileged: bool,
    /// Valid for every PASID (stage-1 nG clear, request with PASID).
    pub global: bool,
    /// U: the device must use untranslated requests for this range (never set by this model).
    pub untranslated_only: bool,
}

/// A rejected ATS translation request (the completion status, not data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AtsError {
    /// UR: ATS not allowed for the stream, SMMU disabled, or a bad configuration.
    #[error("smmuv3 rejected the ATS translation request (event {event:?})")]
    UnsupportedRequest {
        /// The event recorded, if any.
        event: Option<EventType>,
    },
    /// CA: an external abort reading the translation tables.
    #[error("smmuv3 aborted the ATS translation request on a table-walk abort")]
    CompleterAbort,
}

/// A PCIe page request (PRI) from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// StreamID.
    pub sid: u32,
    /// PASID.
    pub ssid: Option<u32>,
    /// Page address (bits below 12 ignored).
    pub address: u64,
    /// Page Request Group index (9 bits).
    pub prgi: u16,
    /// Last request of the group.
    pub last: bool,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Execute requested.
    pub exec: bool,
    /// Privileged mode requested.
    pub privileged: bool,
}

/// A page request that could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PriError {
    /// The model does not implement PRI.
    #[error("smmuv3 does not implement PRI")]
    NotSupported,
    /// PRIQEN or SMMUEN is clear.
    #[error("smmuv3 PRI queue is disabled")]
    QueueDisabled,
    /// The queue is full (PRIQ_PROD.OVFLG is set); the device should treat it as a failed
    /// request.
    #[error("smmuv3 PRI queue overflowed")]
    Overflow,
}

/// A device-ATC invalidation the device with `sid` must perform and then acknowledge with
/// [`Smmuv3::ack_atc_invalidation`](super::Smmuv3::ack_atc_invalidation) (`id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtcInvalidation {
    /// Token for the acknowledgement.
    pub id: u64,
    /// StreamID of the device.
    pub sid: u32,
    /// `Some`: entries of this PASID only. `None` (SSV = 0): every entry in the range,
    /// PASID-tagged or not — an ATS Invalidate Request without a PASID prefix.
    pub ssid: Option<u32>,
    /// Also global entries of every PASID (only with `ssid`).
    pub global: bool,
    /// First address of the naturally aligned range.
    pub start: u64,
    /// log2 of the range size; 64 means the whole address space.
    pub size_log2: u32,
}

/// A page-request group response for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriResponse {
    /// StreamID.
    pub sid: u32,
    /// PASID (when the response needs one).
    pub ssid: Option<u32>,
    /// Page Request Group index.
    pub prgi: u16,
    /// Response code.
    pub code: PriResponseCode,
}

/// An interrupt source of the SMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptSource {
    /// New event-queue records.
    EventQueue,
    /// A GERROR bit became active.
    GlobalError,
    /// New PRI-queue entries.
    PriQueue,
    /// A CMD_SYNC with CS = IRQ completed and the model has no MSI (IDR0.MSI = 0).
    CmdSync,
}

/// An MSI message programmed in the *_IRQ_CFG registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// *_IRQ_CFG0 address.
    pub address: u64,
    /// *_IRQ_CFG1 data.
    pub data: u32,
}

/// An interrupt to deliver; `msi` is the guest's MSI configuration when IDR0.MSI and the
/// address is non-zero (the embedding decides whether to write it or use its own vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupt {
    /// Which interrupt.
    pub source: InterruptSource,
    /// Programmed MSI, if any.
    pub msi: Option<MsiMessage>,
}

/// What the model asks its embedding to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Smmuv3Output {
    /// Invalidate a device ATC, then acknowledge.
    AtcInvalidate(AtcInvalidation),
    /// Deliver a PRG response to a device.
    PriResponse(PriResponse),
    /// Raise an interrupt.
    Interrupt(Interrupt),
    /// CMD_SYNC with CS = SEV completed: send a wake-up event.
    SendEvent,
}
