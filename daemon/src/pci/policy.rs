//! Deciding which of ATS, PASID and PRI a guest sees.
//!
//! The inputs are the effective `on | off | auto` policy of each capability (explicit values
//! over the compat level's defaults), what the device itself has, what the IOMMU in front of it
//! reports ([`HostIommuCaps`]), and, once a vIOMMU model exists, whether it supports PASID. The
//! output is one [`PolicyDecision`] per capability, or a [`PolicyError`] when an `on` cannot be
//! met: vfud never silently degrades a required capability.
//!
//! This module only decides; [`super::virtual_config`] rebuilds the config space accordingly.

use std::fmt;

pub use vfu_config::{
    CapabilityPolicies, CapabilityPolicy, CompatLevel, IommuSpec, PolicyOrigin, PolicySetting,
};

use super::caps::{EXT_CAP_ID_ATS, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI};

/// The capabilities the policy manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ManagedCapability {
    /// Address Translation Services.
    Ats,
    /// Process Address Space ID.
    Pasid,
    /// Page Request Interface.
    Pri,
}

impl ManagedCapability {
    /// All of them, in the order they are decided (PRI depends on ATS).
    pub const ALL: [ManagedCapability; 3] = [
        ManagedCapability::Ats,
        ManagedCapability::Pasid,
        ManagedCapability::Pri,
    ];

    /// The configuration property that sets its policy.
    pub fn property(self) -> &'static str {
        match self {
            ManagedCapability::Ats => "ats",
            ManagedCapability::Pasid => "pasid",
            ManagedCapability::Pri => "pri",
        }
    }

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ManagedCapability::Ats => "ATS",
            ManagedCapability::Pasid => "PASID",
            ManagedCapability::Pri => "PRI",
        }
    }

    /// The extended capability id.
    pub fn ext_cap_id(self) -> u16 {
        match self {
            ManagedCapability::Ats => EXT_CAP_ID_ATS,
            ManagedCapability::Pasid => EXT_CAP_ID_PASID,
            ManagedCapability::Pri => EXT_CAP_ID_PRI,
        }
    }
}

/// What the IOMMU in front of a device reports, in the terms of Linux `IOMMU_GET_HW_INFO`.
///
/// For a host device it comes from the kernel; for an emulated device from the `iommu` block
/// of its configuration, so that `auto` resolves the same way for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostIommuCaps {
    /// `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED`: ATS must not be enabled for this device. Negative
    /// on purpose, like the kernel flag: kernels before 7.1 report 0, "may be supported".
    pub ats_not_supported: bool,
    /// `out_max_pasid_log2`: the PASID width the IOMMU supports for the device; 0 = no PASID.
    pub max_pasid_log2: u8,
    /// `IOMMU_HW_CAP_PCI_PASID_EXEC`: execute-permission requests with PASID are supported.
    pub pasid_exec: bool,
    /// `IOMMU_HW_CAP_PCI_PASID_PRIV`: privileged-mode requests with PASID are supported.
    pub pasid_priv: bool,
}

impl HostIommuCaps {
    /// `IOMMU_HW_CAP_PCI_PASID_EXEC` in `out_capabilities`.
    pub const HW_CAP_PCI_PASID_EXEC: u64 = 1 << 1;
    /// `IOMMU_HW_CAP_PCI_PASID_PRIV` in `out_capabilities`.
    pub const HW_CAP_PCI_PASID_PRIV: u64 = 1 << 2;
    /// `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED` in `out_capabilities`.
    pub const HW_CAP_PCI_ATS_NOT_SUPPORTED: u64 = 1 << 3;

    /// From the `out_capabilities` and `out_max_pasid_log2` of `IOMMU_GET_HW_INFO`. The PASID
    /// flags are ignored when the width is 0, as the uAPI says.
    pub fn from_hw_info(out_capabilities: u64, out_max_pasid_log2: u8) -> HostIommuCaps {
        let pasid = out_max_pasid_log2 > 0;
        HostIommuCaps {
            ats_not_supported: out_capabilities & Self::HW_CAP_PCI_ATS_NOT_SUPPORTED != 0,
            max_pasid_log2: out_max_pasid_log2,
            pasid_exec: pasid && out_capabilities & Self::HW_CAP_PCI_PASID_EXEC != 0,
            pasid_priv: pasid && out_capabilities & Self::HW_CAP_PCI_PASID_PRIV != 0,
        }
    }

    /// From an emulated device's `iommu` configuration block.
    pub fn from_spec(spec: &IommuSpec) -> HostIommuCaps {
        let pasid = spec.max_pasid_log2 > 0;
        HostIommuCaps {
            ats_not_supported: !spec.ats_supported,
            max_pasid_log2: spec.max_pasid_log2,
            pasid_exec: pasid && spec.pasid_exec,
            pasid_priv: pasid && spec.pasid_priv,
        }
    }
}

/// Where [`HostIommuCaps`] came from, so that a message can tell the operator what to look at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IommuSource {
    /// The `iommu` block of an emulated device's configuration (or its default).
    ConfigBlock,
    /// `IOMMU_GET_HW_INFO` for the host device at this PCI address (e.g. `0000:06:00.0`).
    HostDevice {
        /// The device's PCI address.
        address: String,
    },
}

impl IommuSource {
    fn ats_not_supported(&self) -> String {
        match self {
            IommuSource::ConfigBlock => {
                "the IOMMU reports ATS not supported (iommu.ats_supported=false)".to_owned()
            }
            IommuSource::HostDevice { address } => format!(
                "the host IOMMU reports ATS not supported for {address} (IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED)"
            ),
        }
    }

    fn ats_usable(&self) -> String {
        match self {
            IommuSource::ConfigBlock => "the IOMMU reports ATS usable".to_owned(),
            IommuSource::HostDevice { address } => {
                format!("the host IOMMU reports ATS usable for {address}")
            }
        }
    }

    fn no_pasid(&self) -> String {
        match self {
            IommuSource::ConfigBlock => {
                "the IOMMU reports no PASID support (iommu.max_pasid_log2=0)".to_owned()
            }
            IommuSource::HostDevice { address } => format!(
                "the host IOMMU reports no PASID support for {address} (out_max_pasid_log2=0)"
            ),
        }
    }

    fn pasid_width(&self, width: u8) -> String {
        match self {
            IommuSource::ConfigBlock => format!("the IOMMU supports {width}-bit PASIDs"),
            IommuSource::HostDevice { address } => {
                format!("the host IOMMU supports {width}-bit PASIDs for {address}")
            }
        }
    }
}

/// The device's own PASID support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DevicePasid {
    /// The device does not support PASID.
    Absent,
    /// The device's config space has a PASID capability with these features.
    InConfigSpace(PasidFeatures),
    /// The device supports PASID but its capability is not in the config space vfud sees (the
    /// kernel's vfio-pci hides it); its features are what the host IOMMU reports, and vfud
    /// synthesizes the capability.
    HiddenByKernel,
}

/// What a device has, as far as the policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceCapabilities {
    /// An ATS capability is present.
    pub ats: bool,
    /// PASID support.
    pub pasid: DevicePasid,
    /// A PRI capability is present.
    pub pri: bool,
}

/// The PASID Capability register fields (PCIe: Exec Permission Supported bit 1, Privileged
/// Mode Supported bit 2, Max PASID Width bits 12:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasidFeatures {
    /// Max PASID Width in bits (0..=20 in practice; the field has 5 bits).
    pub max_width: u8,
    /// Execute Permission Supported.
    pub exec: bool,
    /// Privileged Mode Supported.
    pub privileged: bool,
}

impl PasidFeatures {
    /// Decodes the 16-bit PASID Capability register.
    pub fn from_register(value: u16) -> PasidFeatures {
        PasidFeatures {
            max_width: ((value >> 8) & 0x1f) as u8,
            exec: value & 0x0002 != 0,
            privileged: value & 0x0004 != 0,
        }
    }

    /// Encodes the 16-bit PASID Capability register.
    pub fn register(self) -> u16 {
        (u16::from(self.max_width & 0x1f) << 8)
            | if self.exec { 0x0002 } else { 0 }
            | if self.privileged { 0x0004 } else { 0 }
    }
}

/// Everything the resolver needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInputs<'a> {
    /// Device name, for messages.
    pub device_name: &'a str,
    /// Effective policies.
    pub policies: CapabilityPolicies,
    /// What the device has.
    pub device: DeviceCapabilities,
    /// What the IOMMU reports.
    pub host: HostIommuCaps,
    /// Where `host` came from.
    pub iommu_source: &'a IommuSource,
    /// PASID support of the vIOMMU model the device sits behind; `None` when there is no
    /// vIOMMU model (then only the host decides).
    pub viommu_pasid: Option<bool>,
    /// Whether the vIOMMU model the device sits behind lets it use ATS (SMMUv3 `ats`, VT-d
    /// `device_iotlb`); `None` when there is no vIOMMU model.
    pub viommu_ats: Option<bool>,
}

/// The outcome for one capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Which capability.
    pub capability: ManagedCapability,
    /// The policy that was applied.
    pub setting: PolicySetting,
    /// Whether the guest sees the capability.
    pub exposed: bool,
    /// Why, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for PolicyDecision {
    /// `ats: exposed (auto: the IOMMU reports ATS usable)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.exposed { "exposed" } else { "masked" };
        write!(
            f,
            "{}: {state} ({}",
            self.capability.property(),
            self.setting.value
        )?;
        if let PolicyOrigin::Compat(level) = self.setting.origin {
            if !level.is_current() {
                write!(f, ", compat level {level}")?;
            }
        }
        write!(f, ": {})", self.reason)
    }
}

/// The decisions for all managed capabilities of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCapabilities {
    /// ATS.
    pub ats: PolicyDecision,
    /// PASID.
    pub pasid: PolicyDecision,
    /// PRI.
    pub pri: PolicyDecision,
    /// The PASID Capability register the guest sees, when PASID is exposed: the device's
    /// features limited by the IOMMU's (or the IOMMU's alone when the kernel hides the
    /// device's capability).
    pub pasid_features: Option<PasidFeatures>,
}

impl ResolvedCapabilities {
    /// The decision for `capability`.
    pub fn get(&self, capability: ManagedCapability) -> &PolicyDecision {
        match capability {
            ManagedCapability::Ats => &self.ats,
            ManagedCapability::Pasid => &self.pasid,
            ManagedCapability::Pri => &self.pri,
        }
    }

    /// The three decisions in [`ManagedCapability::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = &PolicyDecision> {
        [&self.ats, &self.pasid, &self.pri].into_iter()
    }
}

/// A required capability that cannot be provided; the device must not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An `on` policy cannot be met.
    #[error("device {device}: {}={setting} but {reason}; use {}=auto or {}=off", .capability.property(), .capability.property(), .capability.property())]
    RequireCapability {
        /// The device.
        device: String,
        /// The capability.
        capability: ManagedCapability,
        /// The `on` setting, with its origin.
        setting: PolicySetting,
        /// Why it cannot be met.
        reason: String,
    },
}

/// One capability's outcome before it becomes a [`PolicyDecision`]: exposed with a reason, or
/// unavailable with a reason.
enum Availability {
    Available(String),
    Unavailable(Unavailable),
}

/// Why a capability cannot be exposed, and whether a compat-level `on` tolerates it.
struct Unavailable {
    reason: String,
    /// The device simply does not have it: a pass-through compat level exposes what the device
    /// has, so this is not an error for it (only an explicit `on` demands the capability).
    device_lacks: bool,
}

fn decide(
    inputs: &PolicyInputs<'_>,
    capability: ManagedCapability,
    setting: PolicySetting,
    availability: Availability,
) -> Result<PolicyDecision, PolicyError> {
    let decision = |exposed, reason: String| PolicyDecision {
        capability,
        setting,
        exposed,
        reason,
    };
    match (setting.value, availability) {
        (CapabilityPolicy::Off, _) => Ok(decision(false, "hidden by the configuration".into())),
        (CapabilityPolicy::Auto, Availability::Available(reason)) => Ok(decision(true, reason)),
        (CapabilityPolicy::On, Availability::Available(reason)) => {
            Ok(decision(true, format!("required, and {reason}")))
        }
        (CapabilityPolicy::Auto, Availability::Unavailable(u)) => Ok(decision(false, u.reason)),
        (CapabilityPolicy::On, Availability::Unavailable(u))
            if u.device_lacks && setting.origin != PolicyOrigin::Explicit =>
        {
            Ok(decision(
                false,
                format!("{}, so there is nothing to pass through", u.reason),
            ))
        }
        (CapabilityPolicy::On, Availability::Unavailable(u)) => {
            Err(PolicyError::RequireCapability {
                device: inputs.device_name.to_owned(),
                capability,
                setting,
                reason: u.reason,
            })
        }
    }
}

fn device_lacks(capability: ManagedCapability) -> Availability {
    Availability::Unavailable(Unavailable {
        reason: format!("the device has no {} capability", capability.name()),
        device_lacks: true,
    })
}

fn unusable(reason: String) -> Availability {
    Availability::Unavailable(Unavailable {
        reason,
        device_lacks: false,
    })
}

/// Decides ATS, then PASID, then PRI (which requires ATS to be exposed). Returns the first
/// `on` that cannot be met as the error.
pub fn resolve(inputs: &PolicyInputs<'_>) -> Result<ResolvedCapabilities, PolicyError> {
    let source = inputs.iommu_source;
    let host = &inputs.host;

    let ats_availability = if !inputs.device.ats {
        device_lacks(ManagedCapability::Ats)
    } else if host.ats_not_supported {
        unusable(source.ats_not_supported())
    } else if inputs.viommu_ats == Some(false) {
        unusable(
            "the vIOMMU model in front of the device offers no ATS (SMMUv3 ats / VT-d device_iotlb off)"
                .to_owned(),
        )
    } else {
        Availability::Available(source.ats_usable())
    };
    let ats = decide(
        inputs,
        ManagedCapability::Ats,
        inputs.policies.ats,
        ats_availability,
    )?;

    let device_pasid = match inputs.device.pasid {
        DevicePasid::Absent => None,
        DevicePasid::InConfigSpace(features) => Some(features),
        DevicePasid::HiddenByKernel => Some(PasidFeatures {
            max_width: host.max_pasid_log2,
            exec: host.pasid_exec,
            privileged: host.pasid_priv,
        }),
    };
    let pasid_availability = match device_pasid {
        None => device_lacks(ManagedCapability::Pasid),
        Some(_) if host.max_pasid_log2 == 0 => unusable(source.no_pasid()),
        Some(_) if inputs.viommu_pasid == Some(false) => {
            unusable("the vIOMMU model does not support PASID".to_owned())
        }
        Some(features) if features.max_width == 0 => {
            unusable("the device's PASID capability reports a Max PASID Width of 0".to_owned())
        }
        Some(features) => {
            let width = features.max_width.min(host.max_pasid_log2);
            let mut reason = source.pasid_width(host.max_pasid_log2);
            if width < features.max_width {
                reason.push_str(&format!(
                    ", so the guest sees {width} of the device's {} bits",
                    features.max_width
                ));
            }
            Availability::Available(reason)
        }
    };
    let pasid = decide(
        inputs,
        ManagedCapability::Pasid,
        inputs.policies.pasid,
        pasid_availability,
    )?;
    let pasid_features = match (pasid.exposed, device_pasid) {
        (true, Some(features)) => Some(PasidFeatures {
            max_width: features.max_width.min(host.max_pasid_log2),
            exec: features.exec && host.pasid_exec,
            privileged: features.privileged && host.pasid_priv,
        }),
        _ => None,
    };

    let pri_availability = if !inputs.device.pri {
        device_lacks(ManagedCapability::Pri)
    } else if !ats.exposed {
        unusable("PRI requires ATS, which is masked".to_owned())
    } else {
        Availability::Available("ATS is exposed".to_owned())
    };
    let pri = decide(
        inputs,
        ManagedCapability::Pri,
        inputs.policies.pri,
        pri_availability,
    )?;

    Ok(ResolvedCapabilities {
        ats,
        pasid,
        pri,
        pasid_features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: [CapabilityPolicy; 3] = [
        CapabilityPolicy::On,
        CapabilityPolicy::Off,
        CapabilityPolicy::Auto,
    ];

    fn all_supported() -> HostIommuCaps {
        HostIommuCaps::from_spec(&IommuSpec::default())
    }

    fn device(ats: bool, pasid: DevicePasid, pri: bool) -> DeviceCapabilities {
        DeviceCapabilities { ats, pasid, pri }
    }

    const FULL_PASID: DevicePasid = DevicePasid::InConfigSpace(PasidFeatures {
        max_width: 20,
        exec: true,
        privileged: true,
    });

    fn inputs<'a>(
        policies: CapabilityPolicies,
        device: DeviceCapabilities,
        host: HostIommuCaps,
        source: &'a IommuSource,
        viommu_pasid: Option<bool>,
    ) -> PolicyInputs<'a> {
        PolicyInputs {
            device_name: "demo0",
            policies,
            device,
            host,
            iommu_source: source,
            viommu_pasid,
            viommu_ats: None,
        }
    }

    fn explicit(
        ats: CapabilityPolicy,
        pasid: CapabilityPolicy,
        pri: CapabilityPolicy,
    ) -> CapabilityPolicies {
        CapabilityPolicies::explicit(ats, pasid, pri)
    }

    /// Every policy x device-has-ATS x host-supports-ATS combination, with the expected
    /// outcome spelled out independently of the resolver.
    #[test]
    fn ats_every_policy_presence_and_host_support() {
        let source = IommuSource::ConfigBlock;
        for policy in POLICIES {
            for present in [false, true] {
                for supported in [false, true] {
                    let mut host = all_supported();
                    host.ats_not_supported = !supported;
                    let device = device(present, DevicePasid::Absent, false);
                    let policies = explicit(policy, CapabilityPolicy::Off, CapabilityPolicy::Off);
                    let got = resolve(&inputs(policies, device, host, &source, None));
                    let case = format!("ats={policy} present={present} supported={supported}");
                    match (policy, present, supported) {
                        (CapabilityPolicy::Off, _, _) => {
                            let r = got.expect(&case);
                            assert!(!r.ats.exposed, "{case}");
                            assert_eq!(
                                r.ats.to_string(),
                                "ats: masked (off: hidden by the configuration)"
                            );
                        }
                        (CapabilityPolicy::Auto, true, true) => {
                            let r = got.expect(&case);
                            assert!(r.ats.exposed, "{case}");
                            assert_eq!(
                                r.ats.to_string(),
                                "ats: exposed (auto: the IOMMU reports ATS usable)"
                            );
                        }
                        (CapabilityPolicy::Auto, false, _) => {
                            let r = got.expect(&case);
                            assert!(!r.ats.exposed, "{case}");
                            assert!(r.ats.reason.contains("no ATS capability"), "{case}");
                        }
                        (CapabilityPolicy::Auto, true, false) => {
                            let r = got.expect(&case);
                            assert!(!r.ats.exposed, "{case}");
                            assert_eq!(
                                r.ats.to_string(),
                                "ats: masked (auto: the IOMMU reports ATS not supported (iommu.ats_supported=false))"
                            );
                        }
                        (CapabilityPolicy::On, true, true) => {
                            assert!(got.expect(&case).ats.exposed, "{case}");
                        }
                        (CapabilityPolicy::On, false, _) => {
                            let e = got.expect_err(&case);
                            assert_eq!(
                                e.to_string(),
                                "device demo0: ats=on but the device has no ATS capability; use ats=auto or ats=off"
                            );
                        }
                        (CapabilityPolicy::On, true, false) => {
                            let e = got.expect_err(&case);
                            assert_eq!(
                                e.to_string(),
                                "device demo0: ats=on but the IOMMU reports ATS not supported (iommu.ats_supported=false); use ats=auto or ats=off"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn host_device_messages_name_the_address_and_the_kernel_flag() {
        let source = IommuSource::HostDevice {
            address: "0000:06:00.0".into(),
        };
        let host = HostIommuCaps::from_hw_info(HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED, 0);
        let policies = explicit(
            CapabilityPolicy::On,
            CapabilityPolicy::Auto,
            CapabilityPolicy::Auto,
        );
        let device = device(true, DevicePasid::HiddenByKernel, true);
        let e = resolve(&inputs(policies, device, host, &source, None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device demo0: ats=on but the host IOMMU reports ATS not supported for 0000:06:00.0 (IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED); use ats=auto or ats=off"
        );
        let policies = explicit(
            CapabilityPolicy::Auto,
            CapabilityPolicy::Auto,
            CapabilityPolicy::Auto,
        );
        let r = resolve(&inputs(policies, device, host, &source, None)).unwrap();
        assert_eq!(
            r.pasid.to_string(),
            "pasid: masked (auto: the host IOMMU reports no PASID support for 0000:06:00.0 (out_max_pasid_log2=0))"
        );
    }

    #[test]
    fn hw_info_flags_decode_and_pasid_flags_need_a_width() {
        let all = HostIommuCaps::HW_CAP_PCI_PASID_EXEC
            | HostIommuCaps::HW_CAP_PCI_PASID_PRIV
            | HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED;
        let caps = HostIommuCaps::from_hw_info(all, 16);
        assert!(caps.ats_not_supported && caps.pasid_exec && caps.pasid_priv);
        assert_eq!(caps.max_pasid_log2, 16);
        let caps = HostIommuCaps::from_hw_info(all, 0);
        assert!(
            !caps.pasid_exec && !caps.pasid_priv,
            "ignored without PASID"
        );
        let caps = HostIommuCaps::from_hw_info(0, 20);
        assert!(!caps.ats_not_supported && !caps.pasid_exec);
    }

    /// Every policy x device PASID support x host width x vIOMMU combination.
    #[test]
    fn pasid_every_policy_presence_host_width_and_viommu() {
        let source = IommuSource::ConfigBlock;
        let presences = [DevicePasid::Absent, FULL_PASID, DevicePasid::HiddenByKernel];
        for policy in POLICIES {
            for presence in presences {
                for width in [0u8, 8, 20] {
                    for viommu in [None, Some(false), Some(true)] {
                        let mut host = all_supported();
                        host.max_pasid_log2 = width;
                        let policies =
                            explicit(CapabilityPolicy::Off, policy, CapabilityPolicy::Off);
                        let device = device(false, presence, false);
                        let got = resolve(&inputs(policies, device, host, &source, viommu));
                        let case =
                            format!("pasid={policy} {presence:?} width={width} viommu={viommu:?}");
                        let available =
                            presence != DevicePasid::Absent && width > 0 && viommu != Some(false);
                        match policy {
                            CapabilityPolicy::Off => {
                                let r = got.expect(&case);
                                assert!(!r.pasid.exposed && r.pasid_features.is_none(), "{case}");
                            }
                            CapabilityPolicy::Auto => {
                                let r = got.expect(&case);
                                assert_eq!(r.pasid.exposed, available, "{case}");
                                assert_eq!(r.pasid_features.is_some(), available, "{case}");
                            }
                            CapabilityPolicy::On if available => {
                                assert!(got.expect(&case).pasid.exposed, "{case}");
                            }
                            CapabilityPolicy::On => {
                                let e = got.expect_err(&case).to_string();
                                assert!(
                                    e.starts_with("device demo0: pasid=on but "),
                                    "{case}: {e}"
                                );
                                assert!(
                                    e.ends_with("; use pasid=auto or pasid=off"),
                                    "{case}: {e}"
                                );
                            }
                        }
                        if let Ok(r) = resolve(&inputs(policies, device, host, &source, viommu)) {
                            if let Some(f) = r.pasid_features {
                                assert_eq!(f.max_width, width.min(20), "{case}");
                            }
                        }
                    }
                }
            }
        }
        let mut host = all_supported();
        host.max_pasid_log2 = 0;
        let policies = explicit(
            CapabilityPolicy::Off,
            CapabilityPolicy::Auto,
            CapabilityPolicy::Off,
        );
        let r = resolve(&inputs(
            policies,
            device(false, FULL_PASID, false),
            host,
            &source,
            None,
        ))
        .unwrap();
        assert_eq!(
            r.pasid.to_string(),
            "pasid: masked (auto: the IOMMU reports no PASID support (iommu.max_pasid_log2=0))"
        );
    }

    #[test]
    fn pasid_features_are_the_device_limited_by_the_host() {
        let source = IommuSource::ConfigBlock;
        let host = HostIommuCaps {
            ats_not_supported: false,
            max_pasid_log2: 8,
            pasid_exec: false,
            pasid_priv: true,
        };
        let policies = explicit(
            CapabilityPolicy::Off,
            CapabilityPolicy::Auto,
            CapabilityPolicy::Off,
        );
        let r = resolve(&inputs(
            policies,
            device(false, FULL_PASID, false),
            host,
            &source,
            None,
        ))
        .unwrap();
        assert_eq!(
            r.pasid_features,
            Some(PasidFeatures {
                max_width: 8,
                exec: false,
                privileged: true
            })
        );
        assert!(
            r.pasid.reason.contains("8 of the device's 20 bits"),
            "{}",
            r.pasid
        );
        // Hidden by the kernel: the host's report is all there is.
        let r = resolve(&inputs(
            policies,
            device(false, DevicePasid::HiddenByKernel, false),
            host,
            &source,
            None,
        ))
        .unwrap();
        assert_eq!(
            r.pasid_features,
            Some(PasidFeatures {
                max_width: 8,
                exec: false,
                privileged: true
            })
        );
        assert_eq!(PasidFeatures::from_register(0x1406).register(), 0x1406);
        assert_eq!(PasidFeatures::from_register(0x1406).max_width, 20);
    }

    /// Every PRI policy x device-has-PRI x ATS-exposed combination: PRI requires ATS.
    #[test]
    fn pri_every_policy_presence_and_ats_state() {
        let source = IommuSource::ConfigBlock;
        for policy in POLICIES {
            for present in [false, true] {
                for ats_exposed in [false, true] {
                    let ats = if ats_exposed {
                        CapabilityPolicy::Auto
                    } else {
                        CapabilityPolicy::Off
                    };
                    let policies = explicit(ats, CapabilityPolicy::Off, policy);
                    let device = device(true, DevicePasid::Absent, present);
                    let got = resolve(&inputs(policies, device, all_supported(), &source, None));
                    let case = format!("pri={policy} present={present} ats_exposed={ats_exposed}");
                    match (policy, present && ats_exposed) {
                        (CapabilityPolicy::Off, _) => assert!(!got.expect(&case).pri.exposed),
                        (CapabilityPolicy::Auto, available) => {
                            assert_eq!(got.expect(&case).pri.exposed, available, "{case}")
                        }
                        (CapabilityPolicy::On, true) => assert!(got.expect(&case).pri.exposed),
                        (CapabilityPolicy::On, false) => {
                            let e = got.expect_err(&case).to_string();
                            let want = if present {
                                "device demo0: pri=on but PRI requires ATS, which is masked; use pri=auto or pri=off"
                            } else {
                                "device demo0: pri=on but the device has no PRI capability; use pri=auto or pri=off"
                            };
                            assert_eq!(e, want, "{case}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn compat_level_0_passes_through_what_the_device_has() {
        let source = IommuSource::ConfigBlock;
        let level0 = CompatLevel::Level0.resolve(None, None, None);
        // A device with everything: ATS and PRI exposed, PASID masked.
        let full = device(true, FULL_PASID, true);
        let r = resolve(&inputs(level0, full, all_supported(), &source, None)).unwrap();
        assert!(r.ats.exposed && r.pri.exposed && !r.pasid.exposed);
        assert_eq!(
            r.ats.to_string(),
            "ats: exposed (on, compat level 0: required, and the IOMMU reports ATS usable)"
        );
        // A device without ATS or PRI still starts: nothing to pass through.
        let bare = device(false, DevicePasid::Absent, false);
        let r = resolve(&inputs(level0, bare, all_supported(), &source, None)).unwrap();
        assert!(!r.ats.exposed && !r.pri.exposed);
        assert!(
            r.ats.reason.contains("nothing to pass through"),
            "{}",
            r.ats
        );
        // But an IOMMU that reports ATS unusable refuses it, naming the compat level.
        let mut host = all_supported();
        host.ats_not_supported = true;
        let e = resolve(&inputs(level0, full, host, &source, None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device demo0: ats=on (the default of compat level 0) but the IOMMU reports ATS not supported (iommu.ats_supported=false); use ats=auto or ats=off"
        );
        // Explicit values win over the level.
        let mixed = CompatLevel::Level0.resolve(
            Some(CapabilityPolicy::Auto),
            None,
            Some(CapabilityPolicy::Auto),
        );
        let r = resolve(&inputs(mixed, full, host, &source, None)).unwrap();
        assert!(!r.ats.exposed && !r.pri.exposed);
    }
}
