//! PCI configuration space: the guest's virtual view of a device.
//!
//! [`ConfigSpace`] holds the bytes the guest reads plus per-byte write masks, so a guest write
//! only changes the bits the model allows. [`CapabilityChain`] walks the standard and extended
//! capability lists defensively; `vfud probe` uses it on what a server reports, so it must
//! survive any bytes.

pub mod caps;
pub mod config;

pub use caps::{CapabilityChain, CapabilityEntry, WalkError};
pub use config::{ConfigSpace, ConfigSpaceBuilder};
