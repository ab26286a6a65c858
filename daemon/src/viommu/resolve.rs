//! Resolution of a vIOMMU model's `auto` properties from the host IOMMU, frozen at the first
//! device, and the compatibility check every later device's host must pass.
//!
//! Inputs are plain values, as `IOMMU_GET_HW_INFO` reports them ([`HostIommuInfo`]): the
//! `out_capabilities` flags, `out_max_pasid_log2`, and the raw VT-d CAP/ECAP or SMMUv3
//! IDR0..IDR5. For a host device they come from the kernel; for an emulated device from its
//! configuration (`viommu.host` and the `iommu` block).
//!
//! * SMMUv3 (QEMU `arm-smmuv3,accel=on`): `ats` from the device's
//!   `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED` (the kernel says ATS is per device, not host
//!   IDR0.ATS), `ril` from IDR3.RIL, `ssidsize` from IDR1.SSIDSIZE, `oas` from IDR5.OAS (48 if
//!   the host has at least 48 bits, else 44: the two sizes QEMU takes). The stream-table
//!   format (ST_LEVEL), table format (TTF), endianness (TTENDIAN) and granules are frozen from
//!   the first host too: later hosts must match them (QEMU's smmuv3-accel rules), have at least
//!   16 SID bits, at least the frozen SSIDSIZE and OAS, and RIL if it was frozen on.
//! * VT-d (QEMU `intel-iommu`): `device_iotlb` from ECAP.DT, `pasid_bits` from ECAP.PSS + 1
//!   (0 without ECAP.PASID), `fs1gp` from CAP.FS1GP; later hosts must offer whatever was
//!   frozen on and at least the frozen PASID width.
//!
//! The flags the model reports to devices ([`ViommuFlags`]) derive from the resolved model
//! only, never from a host directly, so every device of the VM and a migration target see the
//! same. An SMMUv3 model never asks for `IOMMU_HWPT_ALLOC_PASID` on its nesting parent (the Arm
//! driver refuses PASID together with NEST_PARENT); VT-d does when it has PASIDs.

use std::fmt;

use vfu_config::{Auto, ViommuSpec};

use crate::pci::HostIommuCaps;

/// `IOMMU_HWPT_ALLOC_NEST_PARENT`.
pub const HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
/// `IOMMU_HWPT_ALLOC_PASID`.
pub const HWPT_ALLOC_PASID: u32 = 1 << 3;
/// SIDSIZE QEMU's SMMUv3 gives the guest; a host must have at least as many SID bits.
pub const GUEST_SIDSIZE: u8 = 16;

/// The host IOMMU's own registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostIommuHw {
    /// `struct iommu_hw_info_vtd`.
    Vtd {
        /// CAP_REG.
        cap: u64,
        /// ECAP_REG.
        ecap: u64,
    },
    /// `struct iommu_hw_info_arm_smmuv3`: IDR0..IDR5.
    Smmuv3 {
        /// The ID registers.
        idr: [u32; 6],
    },
}

/// What `IOMMU_GET_HW_INFO` reports for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostIommuInfo {
    /// `out_capabilities` (`IOMMU_HW_CAP_*`).
    pub out_capabilities: u64,
    /// `out_max_pasid_log2`.
    pub max_pasid_log2: u8,
    /// The registers; `None` when an emulated device's configuration gives none.
    pub hw: Option<HostIommuHw>,
}

impl HostIommuInfo {
    /// From an emulated device's `iommu` capabilities and `viommu.host` registers.
    pub fn from_config(caps: &HostIommuCaps, spec: &ViommuSpec) -> HostIommuInfo {
        let mut out_capabilities = 0;
        if caps.ats_not_supported {
            out_capabilities |= HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED;
        }
        if caps.pasid_exec {
            out_capabilities |= HostIommuCaps::HW_CAP_PCI_PASID_EXEC;
        }
        if caps.pasid_priv {
            out_capabilities |= HostIommuCaps::HW_CAP_PCI_PASID_PRIV;
        }
        let hw = match spec {
            ViommuSpec::Smmuv3 { host, .. } => host.map(|h| HostIommuHw::Smmuv3 {
                idr: h.idr.map(|r| r.0 as u32),
            }),
            ViommuSpec::Vtd { host, .. } => host.map(|h| HostIommuHw::Vtd {
                cap: h.cap.0,
                ecap: h.ecap.0,
            }),
        };
        HostIommuInfo {
            out_capabilities,
            max_pasid_log2: caps.max_pasid_log2,
            hw,
        }
    }

    fn ats_supported(&self) -> bool {
        self.out_capabilities & HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED == 0
    }
}

/// Decoded SMMUv3 ID register fields that resolution and compatibility use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smmuv3Idr {
    /// IDR0.ST_LEVEL: 0 linear, 1 two-level stream table.
    pub st_level: u8,
    /// IDR0.TTF: 1 AArch32, 2 AArch64, 3 both.
    pub ttf: u8,
    /// IDR0.TTENDIAN: 0 mixed, 2 little, 3 big endian.
    pub ttendian: u8,
    /// IDR0.ATS.
    pub ats: bool,
    /// IDR1.SIDSIZE.
    pub sidsize: u8,
    /// IDR1.SSIDSIZE.
    pub ssidsize: u8,
    /// IDR3.RIL.
    pub ril: bool,
    /// IDR5.OAS in bits.
    pub oas_bits: u8,
    /// IDR5.GRAN4K, GRAN16K, GRAN64K.
    pub granules: [bool; 3],
}

impl Smmuv3Idr {
    /// Decodes the fields from IDR0..IDR5.
    pub fn decode(idr: &[u32; 6]) -> Smmuv3Idr {
        let bits = |v: u32, lo: u32, width: u32| ((v >> lo) & ((1 << width) - 1)) as u8;
        let oas_bits = match idr[5] & 7 {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            _ => 52,
        };
        Smmuv3Idr {
            st_level: bits(idr[0], 27, 2),
            ttf: bits(idr[0], 2, 2),
            ttendian: bits(idr[0], 21, 2),
            ats: idr[0] & (1 << 10) != 0,
            sidsize: bits(idr[1], 0, 6),
            ssidsize: bits(idr[1], 6, 5),
            ril: idr[3] & (1 << 10) != 0,
            oas_bits,
            granules: [
                idr[5] & (1 << 4) != 0,
                idr[5] & (1 << 5) != 0,
                idr[5] & (1 << 6) != 0,
            ],
        }
    }
}

/// VT-d CAP.FS1GP.
const VTD_CAP_FS1GP: u64 = 1 << 56;
/// VT-d ECAP.DT.
const VTD_ECAP_DT: u64 = 1 << 2;
/// VT-d ECAP.PASID.
const VTD_ECAP_PASID: u64 = 1 << 40;

/// Decoded VT-d capability fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdCaps {
    /// ECAP.DT.
    pub device_iotlb: bool,
    /// ECAP.PSS + 1 when ECAP.PASID, else 0.
    pub pasid_bits: u8,
    /// CAP.FS1GP.
    pub fs1gp: bool,
}

impl VtdCaps {
    /// Decodes CAP and ECAP.
    pub fn decode(cap: u64, ecap: u64) -> VtdCaps {
        let pss = ((ecap >> 35) & 0x1f) as u8;
        VtdCaps {
            device_iotlb: ecap & VTD_ECAP_DT != 0,
            pasid_bits: if ecap & VTD_ECAP_PASID != 0 {
                pss + 1
            } else {
                0
            },
            fs1gp: cap & VTD_CAP_FS1GP != 0,
        }
    }
}

/// A resolved SMMUv3 model: the guest-visible values, frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smmuv3Model {
    /// IDR0.ATS.
    pub ats: bool,
    /// IDR3.RIL.
    pub ril: bool,
    /// IDR1.SSIDSIZE.
    pub ssidsize: u8,
    /// IDR5.OAS in bits (44 or 48).
    pub oas_bits: u8,
    /// The host table formats the guest was given; `None` without host registers.
    pub host_formats: Option<Smmuv3Formats>,
}

/// SMMUv3 formats frozen from the first host: later hosts must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smmuv3Formats {
    /// IDR0.ST_LEVEL.
    pub st_level: u8,
    /// IDR0.TTF.
    pub ttf: u8,
    /// IDR0.TTENDIAN.
    pub ttendian: u8,
    /// IDR5 GRAN4K/16K/64K.
    pub granules: [bool; 3],
}

/// A resolved VT-d model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdModel {
    /// ECAP.DT.
    pub device_iotlb: bool,
    /// PASID bits (ECAP.PSS + 1), 0 for none.
    pub pasid_bits: u8,
    /// CAP.FS1GP.
    pub fs1gp: bool,
}

/// A vIOMMU model with every property resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedViommu {
    /// SMMUv3.
    Smmuv3(Smmuv3Model),
    /// VT-d.
    Vtd(VtdModel),
}

/// The flags a model reports to devices (QEMU's `get_viommu_flags`), from its own properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViommuFlags {
    /// Devices may expose PASID.
    pub pasid_supported: bool,
    /// Host devices' stage-2 HWPT must be a nesting parent.
    pub want_nesting_parent: bool,
    /// Host devices attach per-PASID HWPTs, so the nesting parent needs
    /// `IOMMU_HWPT_ALLOC_PASID`.
    pub want_pasid_attach: bool,
}

impl ResolvedViommu {
    /// The model's name in configuration.
    pub fn model(&self) -> &'static str {
        match self {
            ResolvedViommu::Smmuv3(_) => "smmuv3",
            ResolvedViommu::Vtd(_) => "vtd",
        }
    }

    /// The flags for devices.
    pub fn flags(&self) -> ViommuFlags {
        match self {
            ResolvedViommu::Smmuv3(m) => ViommuFlags {
                pasid_supported: m.ssidsize > 0,
                want_nesting_parent: true,
                want_pasid_attach: false,
            },
            ResolvedViommu::Vtd(m) => ViommuFlags {
                pasid_supported: m.pasid_bits > 0,
                want_nesting_parent: true,
                want_pasid_attach: m.pasid_bits > 0,
            },
        }
    }

    /// `IOMMU_HWPT_ALLOC` flags for a host device's nesting parent: NEST_PARENT, plus PASID
    /// only when the model attaches per PASID and the host device has PASIDs.
    pub fn nesting_parent_alloc_flags(&self, host_max_pasid_log2: u8) -> u32 {
        let flags = self.flags();
        let mut out = 0;
        if flags.want_nesting_parent {
            out |= HWPT_ALLOC_NEST_PARENT;
        }
        if flags.want_pasid_attach && host_max_pasid_log2 > 0 {
            out |= HWPT_ALLOC_PASID;
        }
        out
    }

    /// Whether a device behind this model may use ATS: the model offers it and the device's
    /// host does not refuse it.
    pub fn device_ats(&self, host: &HostIommuInfo) -> bool {
        let offered = match self {
            ResolvedViommu::Smmuv3(m) => m.ats,
            ResolvedViommu::Vtd(m) => m.device_iotlb,
        };
        offered && host.ats_supported()
    }

    /// The matching QEMU device argument.
    pub fn qemu_argument(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        match self {
            ResolvedViommu::Smmuv3(m) => format!(
                "-device arm-smmuv3,accel=on,ats={},ril={},ssidsize={},oas={}",
                on(m.ats),
                on(m.ril),
                m.ssidsize,
                m.oas_bits
            ),
            ResolvedViommu::Vtd(m) => {
                let mut s = format!(
                    "-device intel-iommu,intremap=on,caching-mode=on,device-iotlb={}",
                    on(m.device_iotlb)
                );
                if m.pasid_bits > 0 || m.fs1gp {
                    s.push_str(",scalable-mode=on");
                }
                if m.pasid_bits > 0 {
                    s.push_str(&format!(",pasid-bits={}", m.pasid_bits));
                }
                s.push_str(&format!(",fs1gp={}", on(m.fs1gp)));
                s
            }
        }
    }
}

impl fmt::Display for ResolvedViommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "true" } else { "false" };
        match self {
            ResolvedViommu::Smmuv3(m) => write!(
                f,
                "model=smmuv3 ats={} ril={} ssidsize={} oas={}",
                on(m.ats),
                on(m.ril),
                m.ssidsize,
                m.oas_bits
            ),
            ResolvedViommu::Vtd(m) => write!(
                f,
                "model=vtd device_iotlb={} pasid_bits={} fs1gp={}",
                on(m.device_iotlb),
                m.pasid_bits,
                m.fs1gp
            ),
        }
    }
}

/// Why a model cannot be resolved for a device, or a device's host cannot honour it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// An `auto` property and no host registers to resolve it from.
    #[error("device {device}: viommu.{property} is \"auto\" but the configuration gives no host IOMMU registers; add viommu.host ({hint}) or set viommu.{property}")]
    ResolveWithoutHost {
        /// The device.
        device: String,
        /// The first auto property.
        property: &'static str,
        /// What to add.
        hint: &'static str,
    },
    /// The host registers are of the other IOMMU architecture.
    #[error("device {device}: viommu.model={model} but the host IOMMU is {host}; use the model of the host's IOMMU")]
    CheckHostKind {
        /// The device.
        device: String,
        /// The configured model.
        model: &'static str,
        /// The host's kind.
        host: &'static str,
    },
    /// An explicit value the device's host cannot provide.
    #[error("device {device}: viommu.{property}={value} but {reason}; use viommu.{property}=\"auto\" or a value the host supports")]
    RequireHostFeature {
        /// The device.
        device: String,
        /// The property.
        property: &'static str,
        /// The configured value.
        value: String,
        /// What the host lacks.
        reason: String,
    },
    /// A later device's host cannot honour what the first device froze.
    #[error("device {device}: its host IOMMU cannot honour the vIOMMU frozen at device {first}: {reason}; serve the device to another VM, or move it to a host IOMMU like {first}'s")]
    CheckCompatible {
        /// The device.
        device: String,
        /// The device that froze the model.
        first: String,
        /// The incompatibility.
        reason: String,
    },
    /// Devices of one VM name different vIOMMU blocks.
    #[error("device {device}: its viommu block ({got}) differs from device {first}'s ({frozen}); one VM has one vIOMMU, so give every device the same model and properties")]
    CheckSameModel {
        /// The device.
        device: String,
        /// The first device.
        first: String,
        /// Its block.
        got: String,
        /// The first device's block.
        frozen: String,
    },
}

/// Resolves `spec` for the first device, whose host is `host`.
pub fn resolve(
    device: &str,
    spec: &ViommuSpec,
    host: &HostIommuInfo,
) -> Result<ResolvedViommu, ResolveError> {
    let need = |property: &'static str, hint: &'static str| ResolveError::ResolveWithoutHost {
        device: device.to_owned(),
        property,
        hint,
    };
    let require =
        |property: &'static str, value: String, reason: String| ResolveError::RequireHostFeature {
            device: device.to_owned(),
            property,
            value,
            reason,
        };
    match *spec {
        ViommuSpec::Smmuv3 {
            ats,
            ril,
            ssidsize,
            oas,
            ..
        } => {
            const HINT: &str = "\"host\": {\"idr\": [IDR0, ..., IDR5]}";
            let idr = match host.hw {
                Some(HostIommuHw::Smmuv3 { idr }) => Some(Smmuv3Idr::decode(&idr)),
                Some(HostIommuHw::Vtd { .. }) => {
                    return Err(ResolveError::CheckHostKind {
                        device: device.to_owned(),
                        model: "smmuv3",
                        host: "Intel VT-d",
                    })
                }
                None => None,
            };
            let pick = |v: Auto<u8>, property, from: fn(&Smmuv3Idr) -> u8| match (v, &idr) {
                (Auto::Value(x), _) => Ok(x),
                (Auto::Auto, Some(h)) => Ok(from(h)),
                (Auto::Auto, None) => Err(need(property, HINT)),
            };
            let ril = match (ril, &idr) {
                (Auto::Value(x), _) => x,
                (Auto::Auto, Some(h)) => h.ril,
                (Auto::Auto, None) => return Err(need("ril", HINT)),
            };
            let ssidsize = pick(ssidsize, "ssidsize", |h| h.ssidsize.min(20))?;
            let oas_bits = pick(oas, "oas", |h| if h.oas_bits >= 48 { 48 } else { 44 })?;
            let ats = match ats {
                Auto::Value(x) => x,
                Auto::Auto => host.ats_supported(),
            };
            if ats && !host.ats_supported() {
                return Err(require(
                    "ats",
                    "true".into(),
                    "the host IOMMU reports ATS not supported for the device (IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED)".into(),
                ));
            }
            let model = Smmuv3Model {
                ats,
                ril,
                ssidsize,
                oas_bits,
                host_formats: idr.map(|h| Smmuv3Formats {
                    st_level: h.st_level,
                    ttf: h.ttf,
                    ttendian: h.ttendian,
                    granules: h.granules,
                }),
            };
            if let Some(h) = idr {
                if ril && !h.ril {
                    return Err(require(
                        "ril",
                        "true".into(),
                        "the host SMMUv3 has no range invalidation (IDR3.RIL=0)".into(),
                    ));
                }
                if ssidsize > h.ssidsize {
                    return Err(require(
                        "ssidsize",
                        ssidsize.to_string(),
                        format!(
                            "the host SMMUv3 has {} SubstreamID bits (IDR1.SSIDSIZE)",
                            h.ssidsize
                        ),
                    ));
                }
                if oas_bits > h.oas_bits {
                    return Err(require(
                        "oas",
                        oas_bits.to_string(),
                        format!(
                            "the host SMMUv3 outputs {} address bits (IDR5.OAS)",
                            h.oas_bits
                        ),
                    ));
                }
                if let Some(reason) = smmuv3_format_problem(&model, &h) {
                    return Err(require("model", "smmuv3".into(), reason));
                }
            }
            Ok(ResolvedViommu::Smmuv3(model))
        }
        ViommuSpec::Vtd {
            device_iotlb,
            pasid_bits,
            fs1gp,
            ..
        } => {
            const HINT: &str = "\"host\": {\"cap\": CAP_REG, \"ecap\": ECAP_REG}";
            let caps = match host.hw {
                Some(HostIommuHw::Vtd { cap, ecap }) => Some(VtdCaps::decode(cap, ecap)),
                Some(HostIommuHw::Smmuv3 { .. }) => {
                    return Err(ResolveError::CheckHostKind {
                        device: device.to_owned(),
                        model: "vtd",
                        host: "Arm SMMUv3",
                    })
                }
                None => None,
            };
            let flag = |v: Auto<bool>, property, from: fn(&VtdCaps) -> bool| match (v, &caps) {
                (Auto::Value(x), _) => Ok(x),
                (Auto::Auto, Some(c)) => Ok(from(c)),
                (Auto::Auto, None) => Err(need(property, HINT)),
            };
            let device_iotlb = flag(device_iotlb, "device_iotlb", |c| c.device_iotlb)?;
            let fs1gp = flag(fs1gp, "fs1gp", |c| c.fs1gp)?;
            let pasid_bits = match (pasid_bits, &caps) {
                (Auto::Value(x), _) => x,
                (Auto::Auto, Some(c)) => c.pasid_bits.min(20),
                (Auto::Auto, None) => return Err(need("pasid_bits", HINT)),
            };
            let model = VtdModel {
                device_iotlb,
                pasid_bits,
                fs1gp,
            };
            if let Some(c) = caps {
                if let Some((property, value, reason)) = vtd_problem(&model, &c) {
                    return Err(require(property, value, reason));
                }
            }
            Ok(ResolvedViommu::Vtd(model))
        }
    }
}

/// Where a host's SMMUv3 formats differ from the frozen ones (QEMU smmuv3-accel rules).
fn smmuv3_format_problem(model: &Smmuv3Model, h: &Smmuv3Idr) -> Option<String> {
    if h.sidsize < GUEST_SIDSIZE {
        return Some(format!(
            "the host SMMUv3 has {} StreamID bits (IDR1.SIDSIZE), fewer than the guest's {GUEST_SIDSIZE}",
            h.sidsize
        ));
    }
    if h.ttf & 2 == 0 {
        return Some(format!(
            "the host SMMUv3 has no AArch64 table format (IDR0.TTF={})",
            h.ttf
        ));
    }
    if h.ttendian == 3 {
        return Some("the host SMMUv3 walks big-endian tables only (IDR0.TTENDIAN=3); the guest's are little-endian".into());
    }
    let f = model.host_formats?;
    let granules = |g: [bool; 3]| {
        let names: Vec<_> = ["4K", "16K", "64K"]
            .iter()
            .zip(g)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join("+")
        }
    };
    if h.st_level != f.st_level {
        return Some(format!(
            "IDR0.ST_LEVEL is {} on this host but {} was frozen",
            h.st_level, f.st_level
        ));
    }
    if h.ttf != f.ttf {
        return Some(format!(
            "IDR0.TTF is {} on this host but {} was frozen",
            h.ttf, f.ttf
        ));
    }
    if h.ttendian != f.ttendian && h.ttendian != 0 {
        return Some(format!(
            "IDR0.TTENDIAN is {} on this host but {} was frozen",
            h.ttendian, f.ttendian
        ));
    }
    if h.granules != f.granules {
        return Some(format!(
            "the host's page granules are {} but {} were frozen (IDR5.GRAN*)",
            granules(h.granules),
            granules(f.granules)
        ));
    }
    None
}

/// Where a host's VT-d cannot provide a model's properties: (property, value, reason).
fn vtd_problem(model: &VtdModel, c: &VtdCaps) -> Option<(&'static str, String, String)> {
    if model.device_iotlb && !c.device_iotlb {
        return Some((
            "device_iotlb",
            "true".into(),
            "the host VT-d has no device-TLB (ECAP.DT=0)".into(),
        ));
    }
    if model.pasid_bits > c.pasid_bits {
        return Some((
            "pasid_bits",
            model.pasid_bits.to_string(),
            format!(
                "the host VT-d supports {} PASID bits (ECAP.PASID, ECAP.PSS + 1)",
                c.pasid_bits
            ),
        ));
    }
    if model.fs1gp && !c.fs1gp {
        return Some((
            "fs1gp",
            "true".into(),
            "the host VT-d has no 1 GiB first-stage pages (CAP.FS1GP=0)".into(),
        ));
    }
    None
}

/// Checks that a later device's host can honour the frozen model.
pub fn check_compatible(
    device: &str,
    first: &str,
    model: &ResolvedViommu,
    host: &HostIommuInfo,
) -> Result<(), ResolveError> {
    let incompatible = |reason: String| ResolveError::CheckCompatible {
        device: device.to_owned(),
        first: first.to_owned(),
        reason,
    };
    match (model, host.hw) {
        (_, None) => Ok(()),
        (ResolvedViommu::Smmuv3(m), Some(HostIommuHw::Smmuv3 { idr })) => {
            let h = Smmuv3Idr::decode(&idr);
            if let Some(reason) = smmuv3_format_problem(m, &h) {
                return Err(incompatible(reason));
            }
            if m.ril && !h.ril {
                return Err(incompatible(
                    "ril=true was frozen but this host has no range invalidation (IDR3.RIL=0)"
                        .into(),
                ));
            }
            if m.ssidsize > h.ssidsize {
                return Err(incompatible(format!(
                    "ssidsize={} was frozen but this host has {} SubstreamID bits (IDR1.SSIDSIZE)",
                    m.ssidsize, h.ssidsize
                )));
            }
            if m.oas_bits > h.oas_bits {
                return Err(incompatible(format!(
                    "oas={} was frozen but this host outputs {} address bits (IDR5.OAS)",
                    m.oas_bits, h.oas_bits
                )));
            }
            Ok(())
        }
        (ResolvedViommu::Vtd(m), Some(HostIommuHw::Vtd { cap, ecap })) => {
            match vtd_problem(m, &VtdCaps::decode(cap, ecap)) {
                Some((property, value, reason)) => Err(incompatible(format!(
                    "{property}={value} was frozen but {}",
                    reason.replacen("the host VT-d", "this host", 1)
                ))),
                None => Ok(()),
            }
        }
        (model, Some(_)) => Err(incompatible(format!(
            "the vIOMMU is {} but this host's IOMMU is of the other architecture",
            model.model()
        ))),
    }
}

/// Resolution across the devices of one VM, in file order: the first device with a `viommu`
/// block resolves and freezes the model; every later one must name the same block and have a
/// host that honours it.
#[derive(Debug, Default)]
pub struct Resolver {
    frozen: Option<Frozen>,
}

#[derive(Debug)]
struct Frozen {
    device: String,
    spec: ViommuSpec,
    model: ResolvedViommu,
}

impl Resolver {
    /// A resolver that has seen no device.
    pub fn new() -> Resolver {
        Resolver::default()
    }

    /// Adds a device; returns the (frozen) model it sits behind.
    pub fn add(
        &mut self,
        device: &str,
        spec: &ViommuSpec,
        host: &HostIommuInfo,
    ) -> Result<ResolvedViommu, ResolveError> {
        match &self.frozen {
            None => {
                let model = resolve(device, spec, host)?;
                self.frozen = Some(Frozen {
                    device: device.to_owned(),
                    spec: spec.model_properties(),
                    model,
                });
                Ok(model)
            }
            Some(f) => {
                if f.spec != spec.model_properties() {
                    let json = |s: &ViommuSpec| {
                        serde_json::to_string(&s.model_properties()).unwrap_or_default()
                    };
                    return Err(ResolveError::CheckSameModel {
                        device: device.to_owned(),
                        first: f.device.clone(),
                        got: json(spec),
                        frozen: json(&f.spec),
                    });
                }
                check_compatible(device, &f.device, &f.model, host)?;
                Ok(f.model)
            }
        }
    }

    /// The frozen model and the device that froze it.
    pub fn frozen(&self) -> Option<(&str, &ResolvedViommu)> {
        self.frozen.as_ref().map(|f| (f.device.as_str(), &f.model))
    }
}

/// What `vfud resolve` found for a set of device configurations, in file order.
#[derive(Debug)]
pub struct ResolveReport {
    /// The frozen model and the device that froze it.
    pub frozen: Option<(String, ResolvedViommu)>,
    /// Per device: its name and the outcome.
    pub devices: Vec<(String, DeviceOutcome)>,
}

/// One device's outcome in a [`ResolveReport`].
#[derive(Debug)]
pub enum DeviceOutcome {
    /// The device has no `viommu` block.
    NoViommu,
    /// A host device with a `viommu` block: its IOMMU's registers are known only once
    /// `vfud run` opens it, which resolves (or checks it against the frozen model) then.
    AtOpen,
    /// The device is served behind the frozen model.
    Accepted {
        /// Whether the device may use ATS behind the model.
        ats: bool,
        /// The `IOMMU_HWPT_ALLOC` flags of a host device's nesting parent.
        hwpt_alloc_flags: u32,
    },
    /// The device is refused.
    Refused(ResolveError),
}

impl ResolveReport {
    /// Resolves the `viommu` blocks of `configs` in order, freezing at the first.
    pub fn for_configs(configs: &[vfu_config::DeviceConfig]) -> ResolveReport {
        let mut resolver = Resolver::new();
        let mut devices = Vec::new();
        for c in configs {
            let outcome = match &c.device {
                vfu_config::DeviceSpec::Viommu(_) => DeviceOutcome::NoViommu,
                vfu_config::DeviceSpec::Emulated(e) => match e.viommu_spec() {
                    None => DeviceOutcome::NoViommu,
                    Some(spec) => {
                        let host = HostIommuInfo::from_config(
                            &HostIommuCaps::from_spec(&e.iommu_or_default()),
                            spec,
                        );
                        match resolver.add(&c.name, spec, &host) {
                            Ok(model) => DeviceOutcome::Accepted {
                                ats: model.device_ats(&host),
                                hwpt_alloc_flags: model
                                    .nesting_parent_alloc_flags(host.max_pasid_log2),
                            },
                            Err(e) => DeviceOutcome::Refused(e),
                        }
                    }
                },
                // A host device reports its IOMMU only when it is opened.
                vfu_config::DeviceSpec::Host(h) => match h.viommu {
                    None => DeviceOutcome::NoViommu,
                    Some(_) => DeviceOutcome::AtOpen,
                },
            };
            devices.push((c.name.clone(), outcome));
        }
        ResolveReport {
            frozen: resolver.frozen().map(|(d, m)| (d.to_owned(), *m)),
            devices,
        }
    }

    /// Whether every device with a `viommu` block is accepted and at least one has one.
    pub fn is_ok(&self) -> bool {
        self.frozen.is_some()
            && !self
                .devices
                .iter()
                .any(|(_, o)| matches!(o, DeviceOutcome::Refused(_)))
    }
}

impl fmt::Display for ResolveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.frozen {
            Some((device, model)) => {
                let flags = model.flags();
                writeln!(f, "viommu: {model} (frozen at device {device})")?;
                writeln!(
                    f,
                    "flags: pasid_supported={} want_nesting_parent={} want_pasid_attach={}",
                    flags.pasid_supported, flags.want_nesting_parent, flags.want_pasid_attach
                )?;
                writeln!(f, "qemu: {}", model.qemu_argument())?;
            }
            None => writeln!(f, "viommu: none resolved")?,
        }
        for (name, outcome) in &self.devices {
            match outcome {
                DeviceOutcome::NoViommu => writeln!(f, "{name}: no viommu block")?,
                DeviceOutcome::AtOpen => writeln!(
                    f,
                    "{name}: host device, resolved from its IOMMU_GET_HW_INFO when `vfud run` opens it"
                )?,
                DeviceOutcome::Accepted {
                    ats,
                    hwpt_alloc_flags,
                } => {
                    let mut hwpt = Vec::new();
                    if hwpt_alloc_flags & HWPT_ALLOC_NEST_PARENT != 0 {
                        hwpt.push("NEST_PARENT");
                    }
                    if hwpt_alloc_flags & HWPT_ALLOC_PASID != 0 {
                        hwpt.push("PASID");
                    }
                    writeln!(
                        f,
                        "{name}: ok, ats={} nesting-parent hwpt flags={}",
                        if *ats { "on" } else { "off" },
                        hwpt.join("|")
                    )?
                }
                DeviceOutcome::Refused(e) => writeln!(f, "{name}: refused: {e}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Grace-like SMMUv3 (values modelled on an NVIDIA Grace host as Linux reports them):
    /// 2-level stream table, AArch64 tables, mixed endian, ATS, 32 SID bits, 20 SSID bits, RIL,
    /// 48-bit OAS, 4K and 64K granules.
    const GRACE_IDR: [u32; 6] = [
        (1 << 27) | (2 << 21) | (1 << 10) | (2 << 2) | 1 | 2, // ST_LEVEL=1, TTENDIAN=LE, ATS, TTF=AArch64, S1P, S2P
        (20 << 6) | 32,                                       // SSIDSIZE=20, SIDSIZE=32
        0,
        1 << 10, // RIL
        0,
        (1 << 6) | (1 << 4) | 5, // GRAN64K, GRAN4K, OAS=48
    ];
    /// The same SMMUv3 without range invalidation.
    const NO_RIL_IDR: [u32; 6] = [GRACE_IDR[0], GRACE_IDR[1], 0, 0, 0, GRACE_IDR[5]];
    /// A VT-d with device-TLB, 20 PASID bits and FS1GP (Sapphire-Rapids-like values).
    const VTD_CAP: u64 = 0x19ed_008c_4078_0c66 | VTD_CAP_FS1GP;
    const VTD_ECAP: u64 = VTD_ECAP_DT | VTD_ECAP_PASID | (19 << 35) | 0xf0_0000;
    /// The same VT-d without DT, and without PASID.
    const VTD_ECAP_NO_DT: u64 = VTD_ECAP & !VTD_ECAP_DT & !VTD_ECAP_PASID;

    fn smmu_host(idr: [u32; 6], ats: bool) -> HostIommuInfo {
        HostIommuInfo {
            out_capabilities: if ats {
                0
            } else {
                HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED
            },
            max_pasid_log2: 20,
            hw: Some(HostIommuHw::Smmuv3 { idr }),
        }
    }

    fn vtd_host(cap: u64, ecap: u64) -> HostIommuInfo {
        HostIommuInfo {
            out_capabilities: 0,
            max_pasid_log2: 20,
            hw: Some(HostIommuHw::Vtd { cap, ecap }),
        }
    }

    fn smmu_auto() -> ViommuSpec {
        ViommuSpec::Smmuv3 {
            ats: Auto::Auto,
            ril: Auto::Auto,
            ssidsize: Auto::Auto,
            oas: Auto::Auto,
            host: None,
        }
    }

    fn vtd_auto() -> ViommuSpec {
        ViommuSpec::Vtd {
            device_iotlb: Auto::Auto,
            pasid_bits: Auto::Auto,
            fs1gp: Auto::Auto,
            host: None,
        }
    }

    fn spec(json: &str) -> ViommuSpec {
        serde_json::from_str(json).unwrap()
    }

    fn smmu(r: &ResolvedViommu) -> Smmuv3Model {
        match r {
            ResolvedViommu::Smmuv3(m) => *m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn grace_like_smmuv3_resolves_every_auto_property() {
        let r = resolve("d0", &smmu_auto(), &smmu_host(GRACE_IDR, true)).unwrap();
        let m = smmu(&r);
        assert!(m.ats && m.ril);
        assert_eq!((m.ssidsize, m.oas_bits), (20, 48));
        assert_eq!(
            r.to_string(),
            "model=smmuv3 ats=true ril=true ssidsize=20 oas=48"
        );
        assert_eq!(
            r.qemu_argument(),
            "-device arm-smmuv3,accel=on,ats=on,ril=on,ssidsize=20,oas=48"
        );
        assert_eq!(
            r.flags(),
            ViommuFlags {
                pasid_supported: true,
                want_nesting_parent: true,
                want_pasid_attach: false
            }
        );
        assert_eq!(
            r.nesting_parent_alloc_flags(20),
            HWPT_ALLOC_NEST_PARENT,
            "never PASID together with NEST_PARENT on SMMUv3"
        );
        // ATS follows the device's ATS_NOT_SUPPORTED, not the host's IDR0.ATS.
        let r = resolve("d0", &smmu_auto(), &smmu_host(GRACE_IDR, false)).unwrap();
        assert!(!smmu(&r).ats);
        assert!(!r.device_ats(&smmu_host(GRACE_IDR, false)));
    }

    #[test]
    fn smmuv3_without_ril_and_small_oas() {
        let mut idr = NO_RIL_IDR;
        idr[5] = (idr[5] & !7) | 4; // OAS 44 bits
        idr[1] &= !(0x1f << 6); // SSIDSIZE 0
        let r = resolve("d0", &smmu_auto(), &smmu_host(idr, true)).unwrap();
        let m = smmu(&r);
        assert!(!m.ril);
        assert_eq!((m.ssidsize, m.oas_bits), (0, 44));
        assert!(!r.flags().pasid_supported);
        // Below 44 bits QEMU's SMMUv3 has no output size the host can back.
        let mut narrow = idr;
        narrow[5] = (narrow[5] & !7) | 3;
        let e = resolve("d0", &smmu_auto(), &smmu_host(narrow, true)).unwrap_err();
        assert!(
            e.to_string()
                .contains("viommu.oas=44 but the host SMMUv3 outputs 42 address bits"),
            "{e}"
        );
        // Explicit values the host cannot honour are refused with the property named.
        for (spec, property) in [
            (spec(r#"{"model":"smmuv3","ril":true}"#), "viommu.ril=true"),
            (
                spec(r#"{"model":"smmuv3","ssidsize":8}"#),
                "viommu.ssidsize=8",
            ),
        ] {
            let e = resolve("d0", &spec, &smmu_host(idr, true)).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("device d0: {property} but")),
                "{e}"
            );
        }
        let e = resolve(
            "d0",
            &spec(r#"{"model":"smmuv3","oas":48}"#),
            &smmu_host(GRACE_IDR, true),
        );
        assert!(e.is_ok(), "48 bits fit a 48-bit host");
        let e = resolve(
            "d0",
            &spec(r#"{"model":"smmuv3","ats":true}"#),
            &smmu_host(GRACE_IDR, false),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ATS not supported"), "{e}");
    }

    #[test]
    fn vtd_with_and_without_device_tlb() {
        let r = resolve("d0", &vtd_auto(), &vtd_host(VTD_CAP, VTD_ECAP)).unwrap();
        assert_eq!(
            r,
            ResolvedViommu::Vtd(VtdModel {
                device_iotlb: true,
                pasid_bits: 20,
                fs1gp: true
            })
        );
        assert_eq!(
            r.qemu_argument(),
            "-device intel-iommu,intremap=on,caching-mode=on,device-iotlb=on,scalable-mode=on,pasid-bits=20,fs1gp=on"
        );
        assert_eq!(
            r.nesting_parent_alloc_flags(20),
            HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_PASID
        );
        assert_eq!(r.nesting_parent_alloc_flags(0), HWPT_ALLOC_NEST_PARENT);
        assert!(r.device_ats(&vtd_host(VTD_CAP, VTD_ECAP)));

        let no_dt = vtd_host(VTD_CAP & !VTD_CAP_FS1GP, VTD_ECAP_NO_DT);
        let r = resolve("d0", &vtd_auto(), &no_dt).unwrap();
        assert_eq!(
            r,
            ResolvedViommu::Vtd(VtdModel {
                device_iotlb: false,
                pasid_bits: 0,
                fs1gp: false
            })
        );
        assert!(!r.flags().pasid_supported && !r.device_ats(&no_dt));
        assert_eq!(
            r.qemu_argument(),
            "-device intel-iommu,intremap=on,caching-mode=on,device-iotlb=off,fs1gp=off"
        );
        for (spec, message) in [
            (
                spec(r#"{"model":"vtd","device_iotlb":true}"#),
                "device d0: viommu.device_iotlb=true but the host VT-d has no device-TLB (ECAP.DT=0)",
            ),
            (
                spec(r#"{"model":"vtd","pasid_bits":8}"#),
                "device d0: viommu.pasid_bits=8 but the host VT-d supports 0 PASID bits",
            ),
            (
                spec(r#"{"model":"vtd","fs1gp":true}"#),
                "device d0: viommu.fs1gp=true but the host VT-d has no 1 GiB first-stage pages",
            ),
        ] {
            let e = resolve("d0", &spec, &no_dt).unwrap_err().to_string();
            assert!(e.starts_with(message), "{e}");
        }
    }

    #[test]
    fn auto_without_host_registers_and_the_wrong_architecture_are_errors() {
        let bare = HostIommuInfo {
            out_capabilities: 0,
            max_pasid_log2: 20,
            hw: None,
        };
        let e = resolve("d0", &smmu_auto(), &bare).unwrap_err().to_string();
        assert!(e.starts_with("device d0: viommu.ril is \"auto\" but the configuration gives no host IOMMU registers"), "{e}");
        let explicit = ViommuSpec::Vtd {
            device_iotlb: Auto::Value(true),
            pasid_bits: Auto::Value(8),
            fs1gp: Auto::Value(false),
            host: None,
        };
        assert!(resolve("d0", &explicit, &bare).is_ok());
        let e = resolve("d0", &smmu_auto(), &vtd_host(VTD_CAP, VTD_ECAP))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("viommu.model=smmuv3 but the host IOMMU is Intel VT-d"),
            "{e}"
        );
    }

    #[test]
    fn later_devices_must_honour_the_frozen_smmuv3() {
        let mut r = Resolver::new();
        let first = r
            .add("gpu0", &smmu_auto(), &smmu_host(GRACE_IDR, true))
            .unwrap();
        // Same host: fine, and the answer is the frozen one.
        assert_eq!(
            r.add("gpu1", &smmu_auto(), &smmu_host(GRACE_IDR, true))
                .unwrap(),
            first
        );
        let variant = |f: &dyn Fn(&mut [u32; 6])| {
            let mut idr = GRACE_IDR;
            f(&mut idr);
            smmu_host(idr, true)
        };
        type Change<'a> = &'a dyn Fn(&mut [u32; 6]);
        let cases: [(Change<'_>, &str); 8] = [
            (
                &|i| i[0] &= !(3 << 27),
                "IDR0.ST_LEVEL is 0 on this host but 1 was frozen",
            ),
            (
                &|i| i[0] |= 3 << 2,
                "IDR0.TTF is 3 on this host but 2 was frozen",
            ),
            (
                &|i| i[0] = (i[0] & !(3 << 2)) | (1 << 2),
                "no AArch64 table format",
            ),
            (&|i| i[0] |= 3 << 21, "big-endian"),
            (
                &|i| i[5] |= 1 << 5,
                "page granules are 4K+16K+64K but 4K+64K were frozen",
            ),
            (
                &|i| i[1] = (i[1] & !0x3f) | 8,
                "8 StreamID bits (IDR1.SIDSIZE), fewer than the guest's 16",
            ),
            (
                &|i| i[3] = 0,
                "ril=true was frozen but this host has no range invalidation",
            ),
            (
                &|i| i[1] &= !(0x1f << 6),
                "ssidsize=20 was frozen but this host has 0 SubstreamID bits",
            ),
        ];
        for (change, reason) in cases {
            let e = r
                .add("gpu2", &smmu_auto(), &variant(change))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(
                    "device gpu2: its host IOMMU cannot honour the vIOMMU frozen at device gpu0: "
                ),
                "{e}"
            );
            assert!(e.contains(reason), "{e} lacks {reason}");
        }
        let e = r
            .add("gpu2", &smmu_auto(), &variant(&|i| i[5] = (i[5] & !7) | 4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("oas=48 was frozen but this host outputs 44 address bits"),
            "{e}"
        );
        // Mixed-endian hosts can walk the frozen little-endian tables.
        assert!(r
            .add("gpu3", &smmu_auto(), &variant(&|i| i[0] &= !(3 << 21)))
            .is_ok());
        // A host with ATS not supported only loses ATS for that device.
        let no_ats = smmu_host(GRACE_IDR, false);
        assert!(!r
            .add("nic0", &smmu_auto(), &no_ats)
            .unwrap()
            .device_ats(&no_ats));
        // A different block is refused.
        let other = spec(r#"{"model":"smmuv3","ssidsize":0}"#);
        let e = r
            .add("gpu4", &other, &smmu_host(GRACE_IDR, true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs from device gpu0's"), "{e}");
        let e = r
            .add("gpu5", &smmu_auto(), &vtd_host(VTD_CAP, VTD_ECAP))
            .unwrap_err()
            .to_string();
        assert!(e.contains("other architecture"), "{e}");
        assert_eq!(r.frozen().map(|(d, _)| d), Some("gpu0"));
    }

    #[test]
    fn later_devices_must_honour_the_frozen_vtd() {
        let mut r = Resolver::new();
        r.add("a", &vtd_auto(), &vtd_host(VTD_CAP, VTD_ECAP))
            .unwrap();
        for (host, reason) in [
            (
                vtd_host(VTD_CAP, VTD_ECAP & !VTD_ECAP_DT),
                "device_iotlb=true was frozen but this host has no device-TLB",
            ),
            (
                vtd_host(VTD_CAP, (VTD_ECAP & !(0x1f << 35)) | (7 << 35)),
                "pasid_bits=20 was frozen but this host supports 8 PASID bits",
            ),
            (
                vtd_host(VTD_CAP & !VTD_CAP_FS1GP, VTD_ECAP),
                "fs1gp=true was frozen but this host has no 1 GiB first-stage pages",
            ),
        ] {
            let e = r.add("b", &vtd_auto(), &host).unwrap_err().to_string();
            assert!(e.contains(reason), "{e}");
        }
        assert!(r
            .add("c", &vtd_auto(), &vtd_host(VTD_CAP, VTD_ECAP))
            .is_ok());
    }

    #[test]
    fn configuration_registers_become_host_info() {
        let idr: Vec<String> = GRACE_IDR.iter().map(|v| format!("\"{v:#x}\"")).collect();
        let spec = spec(&format!(
            r#"{{"model":"smmuv3","host":{{"idr":[{}]}}}}"#,
            idr.join(",")
        ));
        let caps = HostIommuCaps {
            ats_not_supported: true,
            max_pasid_log2: 16,
            pasid_exec: false,
            pasid_priv: true,
        };
        let info = HostIommuInfo::from_config(&caps, &spec);
        assert_eq!(info.hw, Some(HostIommuHw::Smmuv3 { idr: GRACE_IDR }));
        assert_eq!(
            info.out_capabilities,
            HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED | HostIommuCaps::HW_CAP_PCI_PASID_PRIV
        );
        assert_eq!(info.max_pasid_log2, 16);
    }
}
