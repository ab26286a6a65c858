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

mod cmdq;
mod config;
mod events;
mod memory;
mod model;
mod props;
pub mod regs;
mod tlb;
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
    Access, AtcInvalidation, AtsError, AtsRequest, AtsTranslation, DmaFault, DmaRequest,
    DmaTranslation, Interrupt, InterruptSource, MsiMessage, PageRequest, PriError, PriResponse,
    Smmuv3, Smmuv3Output, COMMAND_BUDGET, MAX_ATS_ENTRIES, MAX_OUTSTANDING_ATC_INVALIDATIONS,
    OUTPUT_CAPACITY,
};
pub use props::{Oas, PropertiesError, Smmuv3Properties};
pub use regs::REGISTER_WINDOW_SIZE;
pub use walk::Perms;
