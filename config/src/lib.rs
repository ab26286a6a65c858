//! Per-device JSON configuration for vfud.
//!
//! Each device the daemon serves is described by one JSON file:
//!
//! ```json
//! {"version": 1, "name": "demo0", "socket": "/run/vfud/demo0.sock",
//!  "device": {"type": "emulated", "model": "ats-dma"}}
//! ```
//!
//! A device may also carry a capability policy: `"ats"`, `"pasid"` and
//! `"pri"` (`"on"`, `"off"` or `"auto"`, see [`CapabilityPolicy`]), a
//! `"compat"` level that pins older defaults ([`CompatLevel`]), and for an
//! emulated device an `"iommu"` block describing the IOMMU it sits behind
//! ([`IommuSpec`]), and a `"viommu"` block naming the vIOMMU model in front of it
//! ([`ViommuSpec`]). All are optional, so every version-1 file stays valid.
//!
//! A host PCI device bound to vfio-pci is `{"type": "host", "pci": "0000:01:00.0"}` (or
//! `"cdev": "/dev/vfio/devices/vfio0"`), optionally with `"iommufd"` ([`HostDevice`]).
//!
//! The schema is strict (unknown fields are errors, so typos are caught
//! instead of silently ignored) and versioned. Errors name the file, the
//! JSON path of the offending value and what was expected, so an operator
//! can fix a configuration from the message alone. [`load_paths`] reports
//! every problem across all files at once rather than one per restart.

mod error;
mod json_schema;
mod load;
mod parse;
mod policy;
mod schema;
mod viommu;

pub use error::{ConfigError, ConfigErrors, Origin};
pub use json_schema::device_config_schema;
pub use load::{
    check_viommu_links, config_files, load_file, load_paths, parse_str, MAX_CONFIG_BYTES,
};
pub use parse::MAX_SOCKET_PATH_LEN;
pub use policy::{
    CapabilityPolicies, CapabilityPolicy, CompatLevel, IommuSpec, PasidCapOffset, PolicyOrigin,
    PolicySetting, EXT_CAP_MIN_OFFSET, MAX_PASID_WIDTH, PASID_CAP_MAX_OFFSET,
};
pub use schema::{
    embedded_default, DeviceConfig, DeviceSpec, EmulatedDevice, EmulatedModel, HostDevice,
    CONFIG_VERSION, MAX_NAME_LEN,
};
pub use viommu::{
    Auto, RawRegister, RequesterIdSpec, Smmuv3HostRegisters, ViommuAttachment, ViommuSpec,
    VtdHostRegisters, MAX_VIOMMU_PASID_BITS, SMMUV3_OAS_BITS,
};

#[cfg(test)]
mod tests;
