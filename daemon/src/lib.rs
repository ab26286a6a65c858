//! vfud: a vfio-user device server.
//!
//! The library holds everything the binary runs, so that tests and benchmarks drive the same
//! code: the [`server`] (sockets and connections), the [`device`] trait and models, the [`pci`]
//! config-space model and the [`dma`] map table.

pub mod device;
pub mod dma;
pub mod ops;
pub mod pci;
pub mod probe;
pub mod server;
pub mod viommu;
