//! An emulated Intel VT-d remapping unit (VT-d spec 4.1), as a pure library.
//!
//! The guest programs it through its register window ([`Vtd::mmio_write`]); devices use it
//! through three entry points: [`Vtd::translate_dma`] (untranslated DMA, faults recorded),
//! [`Vtd::translation_request`] (ATS, answered with [`AtsTranslation`] entries) and
//! [`Vtd::translated_dma`] (pre-translated DMA, allowed only where ATS is). Device-TLB
//! invalidations come out as [`VtdEvent::InvalidateDeviceAtc`] and must be acknowledged with
//! [`Vtd::ack_atc_invalidation`] (or timed out with [`Vtd::atc_invalidation_timeout`]) before
//! the wait descriptor behind them completes. Guest memory is reached only through
//! [`GuestMemoryAccess`]; there is no I/O, no async and no unsafe code here.
//!
//! Scope: DMA remapping in legacy and scalable mode, first/second/nested stages, queued and
//! register-based invalidation, primary fault logging. Not modelled: interrupt remapping,
//! page requests (PRS), advanced fault logging, protected memory regions, performance
//! monitoring; their registers read as zero and their descriptors are rejected with IQE.

mod cache;
mod fault;
mod memory;
mod model;
mod queue;
mod regs;
mod tables;
mod translate;
mod walk;

pub use fault::{AddressType, FaultReason, FaultRecord};
pub use memory::{read_u64, GuestMemoryAccess, GuestMemoryError, VecGuestMemory};
pub use model::{
    AtcInvalidation, InterruptSource, Vtd, VtdEvent, VtdMmioError, MAX_BUFFERED_EVENTS,
};
pub use queue::{ats_range, MAX_DESCRIPTORS_PER_KICK, MAX_OUTSTANDING_ATC};
pub use regs::*;
pub use translate::{
    AtsRejection, AtsRequest, AtsTranslation, DmaFault, DmaRequest, DmaTranslation,
    INTERRUPT_RANGE_LOG2, INTERRUPT_RANGE_START, MAX_ATS_ENTRIES, MAX_ATS_PAGE_WALKS,
    MAX_MERGED_STU_LOG2,
};
pub use walk::MAX_GUEST_ACCESSES_PER_PAGE;

#[cfg(test)]
mod tests_driver;
#[cfg(test)]
mod tests_fuzz;
#[cfg(test)]
mod tests_gaps;
#[cfg(test)]
mod tests_harness;
#[cfg(test)]
mod tests_walk;
