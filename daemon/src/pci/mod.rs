//! PCI configuration space: the guest's virtual view of a device.
//!
//! [`ConfigSpace`] holds the bytes the guest reads plus per-byte write, write-1-to-clear and
//! emulated masks, so a guest write only changes the bits the model allows and never reaches a
//! device through an emulated bit. [`CapabilityChain`] walks the standard and extended
//! capability lists defensively; `vfud probe` uses it on what a server reports, so it must
//! survive any bytes. [`policy`] decides which of ATS, PASID and PRI a guest sees, and
//! [`virtual_config`] rebuilds a device's config space accordingly.

pub mod caps;
pub mod config;
pub mod policy;
pub mod virtual_config;

pub use caps::{CapabilityChain, CapabilityEntry, WalkError};
pub use config::{ConfigSpace, ConfigSpaceBuilder, DeviceWrite};
pub use policy::{
    HostIommuCaps, IommuSource, ManagedCapability, PolicyDecision, PolicyError,
    ResolvedCapabilities,
};
pub use virtual_config::{
    CapabilityControls, PolicyRequest, VirtualConfigError, VirtualConfigSpace,
};
