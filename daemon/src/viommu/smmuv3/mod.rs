//! Arm SMMUv3 model: the guest programs it through its register window exactly like a
//! hardware SMMU (stream table, context descriptors, AArch64 page tables in guest memory,
//! command/event/PRI queues), and vfud's device models send their DMA, ATS translation
//! requests and page requests through it.
//!
//! Pure logic: no I/O, no async, no `unsafe`. Guest memory comes in through
//! [`GuestMemory`] on every call; the model never holds it. Everything it asks of the
//! embedding (device ATC invalidations, PRG responses, interrupts) is collected as
//! [`Smmuv3Output`]s.
//!
//! Wiring:
//! * BAR: [`REGISTER_WINDOW_SIZE`] bytes; forward 32/64-bit accesses to
//!   [`Smmuv3::mmio_read`] / [`Smmuv3::mmio_write`], then drain [`Smmuv3::take_outputs`] and,
//!   while [`Smmuv3::commands_pending`], call [`Smmuv3::process_commands`] again later.
//! * Devices: [`Smmuv3::translate_dma`] (untranslated), [`Smmuv3::translate_ats`] (ATS
//!   translation requests), [`Smmuv3::translated_dma`] (AT = translated),
//!   [`Smmuv3::page_request`] (PRI).
//! * ATC invalidation: deliver each [`AtcInvalidation`] to the device with that StreamID and
//!   call [`Smmuv3::ack_atc_invalidation`] when it is done; if [`Smmuv3::waiting_for_atc`]
//!   stays true past the deadline, call [`Smmuv3::atc_invalidation_timeout`].
//!
//! Scope and deliberate choices:
//! * Non-secure programming interface only; AArch64 little-endian tables; 48-bit output
//!   formats (OAS up to 48 bits, no 52-bit/LPA2); no HTTU (CD.HA/HD ignored, so AF = 0 is an
//!   access fault or an ATS hole), no stall model, no broadcast TLB maintenance, no EL2/EL3
//!   streams (their TLBI commands are CERROR_ILL), no ECMDQ, VATOS or MPAM.
//! * Translated transactions are always checked against STE.EATS, as with CR0.ATSCHK = 1,
//!   whatever the guest wrote to ATSCHK: the devices behind the model are vfud's own.
//! * ATS holes (R = W = 0) report the block size of the level where the walk stopped, not the
//!   STU, so devices can skip whole unmapped regions.
//! * Every walk and every queue loop is bounded: a translation makes at most a few dozen
//!   guest-memory accesses, a command-consuming call at most [`COMMAND_BUDGET`] commands, an
//!   ATS request at most [`MAX_ATS_ENTRIES`] translations; caches and outputs are capped.

mod cmdq;
mod config;
mod events;
mod memory;
mod model;
mod props;
pub mod regs;
mod tlb;
mod types;
mod walk;

#[cfg(test)]
mod tests_driver;
#[cfg(test)]
mod tests_gaps;
#[cfg(test)]
mod tests_prop;
#[cfg(test)]
mod tests_support;
#[cfg(test)]
mod tests_walk;

pub use cmdq::{opcode, PriResponseCode, ATC_INV_SIZE_ALL};
pub use events::{Event, EventType, FaultClass};
pub use memory::{GuestMemory, GuestMemoryError, VecMemory};
pub use model::{
    Smmuv3, COMMAND_BUDGET, MAX_ATS_ENTRIES, MAX_OUTSTANDING_ATC_INVALIDATIONS, OUTPUT_CAPACITY,
};
pub use props::{Oas, PropertiesError, Smmuv3Properties};
pub use regs::REGISTER_WINDOW_SIZE;
pub use types::{
    Access, AtcInvalidation, AtsError, AtsRequest, AtsTranslation, DmaFault, DmaRequest,
    DmaTranslation, Interrupt, InterruptSource, MsiMessage, PageRequest, PriError, PriResponse,
    Smmuv3Output,
};
pub use walk::Perms;
