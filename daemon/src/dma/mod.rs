//! Guest memory access for DMA by emulated devices.
//!
//! The client (VMM) describes guest memory with DMA_MAP/DMA_UNMAP; regions
//! come with an fd (we `mmap` it, [`MappedRegion`]) or without one (every
//! access becomes a DMA_READ/DMA_WRITE message, [`MessageDmaRequest`]).
//!
//! Ownership model:
//! - [`DmaMapTable`] owns one `Arc<DmaRegion>` per mapped region, keyed by
//!   IOVA; regions never overlap.
//! - A device access resolves its IOVA range into [`DmaSegment`]s under the
//!   table lock. Each segment holds its own `Arc<DmaRegion>` (keeping the
//!   mapping alive) and counts as in-flight on that region until dropped.
//! - DMA_UNMAP removes the region from the table (so no new segments can be
//!   created), then awaits [`DmaRegion::drained`] before replying: once it
//!   resolves, no device access touches the region any more, and dropping the
//!   last `Arc` munmaps it. An identical re-map and UNMAP_ALL return the old
//!   regions, which are drained the same way.
//! - [`GuestMemory`] wraps the table in a mutex that is never held across an
//!   `.await`, plus the channel to the connection task for message DMA.

mod guest;
mod mmap;
mod table;

pub use guest::{GuestMemory, MessageDmaPort, MessageDmaRequest};
pub use mmap::{MappedFile, MappedRegion, MappingCache, MmapError};
pub use table::{
    DmaBacking, DmaError, DmaMapTable, DmaProt, DmaRegion, DmaSegment, SHADOW_ALIGN_LOG2,
};
