//! The version-1 configuration schema as plain serde types.
//!
//! These types only describe the *shape* of a configuration. Rules that
//! serde cannot express (the version number, the name alphabet, resolving a
//! relative socket path against the file that names it) are enforced by
//! [`crate::parse_str`], [`crate::load_file`] and [`crate::load_paths`];
//! deserializing a [`DeviceConfig`] directly skips them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::{CapabilityPolicies, CapabilityPolicy, CompatLevel, IommuSpec, PasidCapOffset};
use crate::viommu::{RequesterIdSpec, ViommuAttachment, ViommuSpec};

/// The only configuration schema version this crate understands.
///
/// A file with any other `version` is rejected before the rest of it is
/// interpreted, because a later schema may give the same field names a
/// different meaning.
pub const CONFIG_VERSION: u32 = 1;

/// Longest accepted device [`name`](DeviceConfig::name), in characters.
///
/// Names end up in log lines and default socket file names, so they are kept
/// short and restricted to `[A-Za-z0-9_.-]`.
pub const MAX_NAME_LEN: usize = 64;

/// One device served by the daemon, as read from one JSON file.
///
/// Invariants after loading through this crate: `version` is
/// [`CONFIG_VERSION`], `name` is a valid device name (see [`MAX_NAME_LEN`]),
/// and `socket` is an absolute path (relative paths in the file have been
/// resolved against the file's directory).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Schema version; always [`CONFIG_VERSION`] once loaded.
    pub version: u32,
    /// Short identifier used in logs and default socket names; unique among
    /// the devices loaded together.
    pub name: String,
    /// Path of the vfio-user listening socket; unique among the devices
    /// loaded together.
    pub socket: PathBuf,
    /// What the daemon exposes on this socket.
    pub device: DeviceSpec,
}

/// The kind of device behind a socket, selected by the JSON field `"type"`.
///
/// Internally tagged so that new kinds (for example
/// `{"type": "host", "pci": "0000:01:00.0"}`) can be added as new variants
/// without changing existing files. When adding a variant, also add it to
/// `DeviceType` in `parse.rs` so that errors inside it get a precise JSON
/// path (the compiler points there through `device_type_of` in the tests).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceSpec {
    /// A device implemented entirely in software by the daemon.
    Emulated(EmulatedDevice),
    /// An embedded vIOMMU model (`"model": "vtd"` or `"smmuv3"`, with its properties) served
    /// as its own PCI function: its register window is BAR0 and its interrupts are MSI-X
    /// vectors. Emulated devices attach to it with `"viommu": "<this device's name>"`.
    Viommu(ViommuSpec),
    /// A real PCI device, opened through Linux iommufd and the VFIO character device.
    Host(HostDevice),
}

/// A host PCI device, bound to vfio-pci, served through iommufd.
///
/// Exactly one of `pci` and `cdev` names the device (checked when loading). The capability
/// fields (`ats`, `pasid`, `pri`, `compat`, `pasid_cap_offset`) mean the same as for an emulated
/// device; what the host IOMMU supports comes from the kernel (`IOMMU_GET_HW_INFO`), not from
/// configuration.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDevice {
    /// PCI address (`DDDD:BB:DD.F`, e.g. `0000:01:00.0`); vfud finds the device's VFIO
    /// character device through `/sys/bus/pci/devices/<pci>/vfio-dev/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
    /// The VFIO character device itself (`/dev/vfio/devices/vfioN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdev: Option<PathBuf>,
    /// The iommufd device; `None` means `/dev/iommu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd: Option<PathBuf>,
    /// Policy for the ATS capability; `None` takes the compat level's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ats: Option<CapabilityPolicy>,
    /// Policy for the PASID capability; `None` takes the compat level's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasid: Option<CapabilityPolicy>,
    /// Policy for the PRI capability; `None` takes the compat level's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pri: Option<CapabilityPolicy>,
    /// Compatibility level whose defaults apply to unset policies.
    #[serde(default, skip_serializing_if = "CompatLevel::is_current")]
    pub compat: CompatLevel,
    /// Where a synthesized PASID capability goes; `None` picks a free offset at the end of
    /// config space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasid_cap_offset: Option<PasidCapOffset>,
    /// The vIOMMU model the VM puts in front of the device. Its `auto` properties resolve from
    /// what the kernel reports for this device's IOMMU (so `host` registers are not given),
    /// frozen at the first device that names a model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viommu: Option<ViommuSpec>,
    /// Whether BARs are handed to the client as mmap-able areas (default `true`). Mapping a
    /// BAR needs the VFIO device fd itself, and a client holding it can issue VFIO ioctls on
    /// the device and keep it after it disconnects; `false` traps every BAR access through
    /// vfud instead (slower MMIO, but the client never holds the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bar_mmap: Option<bool>,
}

impl HostDevice {
    /// The iommufd device used when `iommufd` is not set.
    pub const DEFAULT_IOMMUFD: &'static str = "/dev/iommu";

    /// A host device at PCI address `pci` with every optional setting at its default.
    pub fn at_pci(pci: &str) -> HostDevice {
        HostDevice {
            pci: Some(pci.to_owned()),
            cdev: None,
            iommufd: None,
            ats: None,
            pasid: None,
            pri: None,
            compat: CompatLevel::CURRENT,
            pasid_cap_offset: None,
            viommu: None,
            bar_mmap: None,
        }
    }

    /// The effective `ats`/`pasid`/`pri` policies: explicit values over the compat level's
    /// defaults.
    pub fn capability_policies(&self) -> CapabilityPolicies {
        self.compat.resolve(self.ats, self.pasid, self.pri)
    }

    /// The iommufd device in force.
    pub fn iommufd_or_default(&self) -> PathBuf {
        self.iommufd
            .clone()
            .unwrap_or_else(|| PathBuf::from(Self::DEFAULT_IOMMUFD))
    }
}

/// Settings of a software-emulated device.
///
/// New optional settings (capability policy, vIOMMU, compatibility knobs)
/// should be added with `#[serde(default)]` so version-1 files stay valid.
/// The capability fields (`ats`, `pasid`, `pri`, `compat`) have the same
/// names and meaning for every kind of device; read them through
/// [`EmulatedDevice::capability_policies`].
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatedDevice {
    /// Which emulated device model to instantiate.
    pub model: EmulatedModel,
    /// Policy for the ATS capability; `None` takes the compat level's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ats: Option<CapabilityPolicy>,
    /// Policy for the PASID capability; `None` takes the compat level's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasid: Option<CapabilityPolicy>,
    /// Policy for the PRI capability; `None` takes the compat level's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pri: Option<CapabilityPolicy>,
    /// Compatibility level whose defaults apply to unset policies.
    #[serde(default, skip_serializing_if = "CompatLevel::is_current")]
    pub compat: CompatLevel,
    /// The IOMMU the device sits behind; `None` means one that supports everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<IommuSpec>,
    /// Where a synthesized PASID capability goes; `None` picks a free offset at the end of
    /// config space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasid_cap_offset: Option<PasidCapOffset>,
    /// Builds the model's own config space without its PASID capability, the way the
    /// kernel's vfio-pci shows a host device (it hides PASID). The device still supports
    /// PASID, so the policy synthesizes the capability from the `iommu` block, as it does for
    /// host devices. Exists to exercise and demonstrate that path on any machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pasid_cap_hidden: bool,
    /// The vIOMMU model in front of the device and, for `auto`, the host IOMMU's registers
    /// (an object); or the name of a `"type": "viommu"` device to sit behind (a string, with
    /// `requester_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viommu: Option<ViommuAttachment>,
    /// The device's requester id behind the `"viommu"` device it names: `"00:03.0"` or an
    /// integer. Required with, and only allowed with, a string `viommu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_id: Option<RequesterIdSpec>,
}

impl EmulatedDevice {
    /// A device of `model` with every optional setting at its default.
    pub fn new(model: EmulatedModel) -> EmulatedDevice {
        EmulatedDevice {
            model,
            ats: None,
            pasid: None,
            pri: None,
            compat: CompatLevel::CURRENT,
            iommu: None,
            pasid_cap_offset: None,
            pasid_cap_hidden: false,
            viommu: None,
            requester_id: None,
        }
    }

    /// The `viommu` model block, if the field holds one (not a device name).
    pub fn viommu_spec(&self) -> Option<&ViommuSpec> {
        self.viommu.as_ref().and_then(ViommuAttachment::spec)
    }

    /// The named `"type": "viommu"` device and the requester id behind it, if the device is
    /// attached to one (both are present once loaded through this crate).
    pub fn viommu_device(&self) -> Option<(&str, RequesterIdSpec)> {
        let name = self.viommu.as_ref().and_then(ViommuAttachment::device)?;
        Some((name, self.requester_id.unwrap_or(RequesterIdSpec(0))))
    }

    /// The effective `ats`/`pasid`/`pri` policies: explicit values over the compat level's
    /// defaults.
    pub fn capability_policies(&self) -> CapabilityPolicies {
        self.compat.resolve(self.ats, self.pasid, self.pri)
    }

    /// The IOMMU description in force (the default one when the block is absent).
    pub fn iommu_or_default(&self) -> IommuSpec {
        self.iommu.unwrap_or_default()
    }
}

/// The emulated device models the daemon can instantiate.
///
/// Spelled in kebab-case in JSON (`"ats-dma"`).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmulatedModel {
    /// DMA test device that exercises ATS address translation.
    AtsDma,
}

/// The configuration used when no configuration file is given.
///
/// Serves one emulated `ats-dma` device named `demo0` on
/// `socket_dir/demo0.sock`, so the daemon is usable out of the box. The
/// caller chooses `socket_dir` (typically the runtime directory); it is
/// used as given, so pass an absolute path to keep the invariant of
/// [`DeviceConfig::socket`].
pub fn embedded_default(socket_dir: &Path) -> DeviceConfig {
    DeviceConfig {
        version: CONFIG_VERSION,
        name: "demo0".to_owned(),
        socket: socket_dir.join("demo0.sock"),
        device: DeviceSpec::Emulated(EmulatedDevice::new(EmulatedModel::AtsDma)),
    }
}
