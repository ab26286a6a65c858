//! The guest's view of a device's config space, with the capability policy applied.
//!
//! [`build`] takes a device's own config space (a host device's as VFIO shows it, or an
//! emulated model's as it builds it), walks both capability chains strictly, resolves the
//! ATS/PASID/PRI policy and produces a [`VirtualConfigSpace`]:
//!
//! * a masked capability is unlinked: the previous capability's next pointer skips it, its bytes
//!   read as zero and guest writes to them are dropped. If it was the first extended capability,
//!   0x100 becomes a null capability (id 0, version 0) that links on to the rest, as the kernel
//!   and QEMU do. The guest never finds a dangling pointer or the masked id in the chain;
//! * PASID, when exposed but absent from the chain (the kernel hides it from VFIO users), is
//!   synthesized at a free, 4-byte-aligned offset at the end of config space (or where the
//!   configuration says) and linked at the tail of the extended chain;
//! * the control registers of exposed capabilities are emulated: guest writes never reach the
//!   device (the kernel drops them anyway) and their values are available to the device model
//!   through [`VirtualConfigSpace::controls`].
//!
//! Everything else passes through to the device.

use super::caps::{
    CapabilityChain, CapabilityEntry, WalkError, CONFIG_SPACE_SIZE, EXT_CAP_ID_NULL, EXT_CAP_START,
    PASID_CAP_LEN,
};
use super::config::{ConfigSpace, ConfigSpaceError, DeviceWrite};
use super::policy::{
    resolve, CapabilityPolicies, CapabilityPolicy, DeviceCapabilities, DevicePasid, HostIommuCaps,
    IommuSource, ManagedCapability, PasidFeatures, PolicyError, PolicyInputs, ResolvedCapabilities,
};

/// ATS Control: Enable (bit 15) and Smallest Translation Unit (bits 4:0).
const ATS_CONTROL_WMASK: u16 = 0x801f;
/// PASID Control: Enable.
const PASID_CONTROL_ENABLE: u16 = 0x0001;
/// PASID Control: Execute Permission Enable.
const PASID_CONTROL_EXEC: u16 = 0x0002;
/// PASID Control: Privileged Mode Enable.
const PASID_CONTROL_PRIV: u16 = 0x0004;
/// PRI Control: Enable.
const PRI_CONTROL_ENABLE: u16 = 0x0001;
/// PRI Control: Reset (write-only; reads 0).
const PRI_CONTROL_RESET: u16 = 0x0002;
/// PRI Status: Response Failure and Unexpected PRG Index (write 1 to clear).
const PRI_STATUS_ERRORS: u16 = 0x0003;
/// PRI Status: Stopped.
const PRI_STATUS_STOPPED: u16 = 0x0100;
/// Version of a synthesized PASID capability.
const PASID_CAP_VERSION: u32 = 1;

/// What the policy layer needs besides the device's config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest<'a> {
    /// Device name, for messages.
    pub device_name: &'a str,
    /// Effective `ats`/`pasid`/`pri` policies.
    pub policies: CapabilityPolicies,
    /// What the IOMMU in front of the device reports.
    pub host: HostIommuCaps,
    /// Where `host` came from.
    pub iommu_source: IommuSource,
    /// PASID support of the vIOMMU model, `None` without one.
    pub viommu_pasid: Option<bool>,
    /// Whether the vIOMMU model lets the device use ATS, `None` without one.
    pub viommu_ats: Option<bool>,
    /// The device supports PASID although its config space has no PASID capability (the
    /// kernel hides it from VFIO users).
    pub pasid_cap_hidden: bool,
    /// Where to put a synthesized PASID capability; `None` picks a free offset at the end.
    pub pasid_cap_offset: Option<u16>,
}

impl<'a> PolicyRequest<'a> {
    /// A request with the default policies (everything `auto`) behind an IOMMU that supports
    /// everything, described by configuration.
    pub fn new(device_name: &'a str) -> PolicyRequest<'a> {
        PolicyRequest {
            device_name,
            policies: CapabilityPolicies::default(),
            host: HostIommuCaps::from_spec(&Default::default()),
            iommu_source: IommuSource::ConfigBlock,
            viommu_pasid: None,
            viommu_ats: None,
            pasid_cap_hidden: false,
            pasid_cap_offset: None,
        }
    }
}

/// Why the policy could not be applied to a device; the device must not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtualConfigError {
    /// The device's config space is not 64 bytes to 4 KiB long.
    #[error("device {device}: its config space is {len} bytes long, but vfud serves 64 to 4096 bytes (256 for conventional PCI, 4096 for PCI Express); the device cannot be served")]
    CheckSize {
        /// The device.
        device: String,
        /// The length found.
        len: usize,
    },
    /// A capability chain of the device is malformed.
    #[error("device {device}: its config space has a malformed capability chain, so the capability policy cannot be applied; the device is refused rather than shown half-walked")]
    ParseChains {
        /// The device.
        device: String,
        /// What is wrong with the chain.
        #[source]
        source: WalkError,
    },
    /// The device has a managed capability twice.
    #[error("device {device}: its config space has two {} capabilities, at {first:#x} and {second:#x}; the policy cannot tell which one a guest would use, so the device is refused", .capability.name())]
    CheckDuplicate {
        /// The device.
        device: String,
        /// The capability found twice.
        capability: ManagedCapability,
        /// The first offset.
        first: usize,
        /// The second offset.
        second: usize,
    },
    /// An `on` cannot be met.
    #[error(transparent)]
    Resolve(#[from] PolicyError),
    /// A synthesized PASID capability has no place to go.
    #[error("device {device}: the PASID capability cannot be synthesized: {reason}")]
    PlacePasid {
        /// The device.
        device: String,
        /// What is in the way, and the fix.
        reason: String,
    },
}

/// Offsets of the managed capabilities the guest sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExposedOffsets {
    /// ATS, if exposed.
    pub ats: Option<usize>,
    /// PASID, if exposed (the device's own or a synthesized one).
    pub pasid: Option<usize>,
    /// Whether the PASID capability was synthesized by vfud.
    pub pasid_synthesized: bool,
    /// PRI, if exposed.
    pub pri: Option<usize>,
}

/// ATS Control as the guest last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsControl {
    /// Enable (bit 15): the device may issue translation requests and cache translations.
    pub enabled: bool,
    /// Smallest Translation Unit (bits 4:0): translations cover at least 2^(STU+12) bytes.
    pub stu: u8,
}

impl AtsControl {
    /// The smallest translation unit in bytes, 2^(STU+12).
    pub fn smallest_translation_unit(self) -> u64 {
        1u64 << (12 + u32::from(self.stu & 0x1f))
    }
}

/// PASID Control as the guest last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidControl {
    /// PASID Enable.
    pub enabled: bool,
    /// Execute Permission Enable.
    pub exec_enabled: bool,
    /// Privileged Mode Enable.
    pub privileged_enabled: bool,
}

/// PRI Control and Allocation as the guest last wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriControl {
    /// Enable.
    pub enabled: bool,
    /// Outstanding Page Request Allocation.
    pub outstanding_allocation: u32,
}

/// A snapshot of the emulated control registers, for the device model. `None` for a
/// capability the guest does not see (so the model must not use it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilityControls {
    /// ATS Control.
    pub ats: Option<AtsControl>,
    /// PASID Control.
    pub pasid: Option<PasidControl>,
    /// PRI Control.
    pub pri: Option<PriControl>,
}

/// A device's config space as the guest sees it.
///
/// Invariants: both chains are well-formed (the strict walk of the merged view succeeds), the
/// extended chain holds exactly the device's capabilities minus the masked ones plus a
/// synthesized PASID if any, and every byte vfud manages (rewritten headers, masked
/// capabilities, synthesized PASID, control registers of exposed capabilities) is emulated, so
/// guest writes to them never reach the device.
#[derive(Debug, Clone)]
pub struct VirtualConfigSpace {
    space: ConfigSpace,
    decisions: ResolvedCapabilities,
    exposed: ExposedOffsets,
}

use super::caps::{u16_at, u32_at};

/// Applies the policy of `request` to `device`, the device's own config space.
pub fn build(
    device: &[u8],
    request: &PolicyRequest<'_>,
) -> Result<VirtualConfigSpace, VirtualConfigError> {
    let name = request.device_name;
    if device.len() < 0x40 || device.len() > CONFIG_SPACE_SIZE {
        return Err(VirtualConfigError::CheckSize {
            device: name.to_owned(),
            len: device.len(),
        });
    }
    let chain =
        CapabilityChain::parse(device).map_err(|source| VirtualConfigError::ParseChains {
            device: name.to_owned(),
            source,
        })?;
    let find =
        |capability: ManagedCapability| -> Result<Option<CapabilityEntry>, VirtualConfigError> {
            let mut found = chain
                .extended
                .iter()
                .filter(|e| e.id == capability.ext_cap_id());
            let first = found.next().copied();
            match (first, found.next()) {
                (Some(first), Some(second)) => Err(VirtualConfigError::CheckDuplicate {
                    device: name.to_owned(),
                    capability,
                    first: first.offset,
                    second: second.offset,
                }),
                _ => Ok(first),
            }
        };
    let ats = find(ManagedCapability::Ats)?;
    let pasid = find(ManagedCapability::Pasid)?;
    let pri = find(ManagedCapability::Pri)?;

    let device_pasid = match pasid {
        Some(e) => {
            DevicePasid::InConfigSpace(PasidFeatures::from_register(u16_at(device, e.offset + 4)))
        }
        None if request.pasid_cap_hidden => DevicePasid::HiddenByKernel,
        None => DevicePasid::Absent,
    };
    let inputs = PolicyInputs {
        device_name: name,
        policies: request.policies,
        device: DeviceCapabilities {
            ats: ats.is_some(),
            pasid: device_pasid,
            pri: pri.is_some(),
        },
        host: request.host,
        iommu_source: &request.iommu_source,
        viommu_pasid: request.viommu_pasid,
        viommu_ats: request.viommu_ats,
    };
    let mut decisions = resolve(&inputs)?;

    let mut synthesized = None;
    if decisions.pasid.exposed && pasid.is_none() {
        match place_pasid(device, &chain, request)? {
            Some(offset) => {
                decisions
                    .pasid
                    .reason
                    .push_str(&format!("; synthesized at {offset:#x}"));
                synthesized = Some(offset);
            }
            None if decisions.pasid.setting.value == CapabilityPolicy::On => {
                return Err(VirtualConfigError::PlacePasid {
                    device: name.to_owned(),
                    reason: no_room_reason(device),
                });
            }
            None => {
                decisions.pasid.exposed = false;
                decisions.pasid.reason =
                    format!("{}, but {}", decisions.pasid.reason, no_room_reason(device));
                decisions.pasid_features = None;
            }
        }
    }

    let exposed_id = |id: u16| {
        ManagedCapability::ALL
            .into_iter()
            .find(|c| c.ext_cap_id() == id)
            .is_none_or(|c| decisions.get(c).exposed)
    };
    let (kept, dropped): (Vec<CapabilityEntry>, Vec<CapabilityEntry>) = chain
        .extended
        .iter()
        .partition(|e| e.id != EXT_CAP_ID_NULL && exposed_id(e.id));
    let mut links: Vec<(usize, u32)> = kept
        .iter()
        .map(|e| (e.offset, u32::from(e.id) | u32::from(e.version) << 16))
        .collect();
    if let Some(offset) = synthesized {
        links.push((
            offset,
            u32::from(ManagedCapability::Pasid.ext_cap_id()) | PASID_CAP_VERSION << 16,
        ));
    }

    let mut space = ConfigSpace::in_front_of(device);
    // Masked (and placeholder) capabilities read as zero and ignore writes.
    for e in &dropped {
        let zeros = vec![0u8; e.len];
        space.emulate(e.offset, &zeros, &zeros, &zeros);
    }
    // Relink: every header the guest follows is emulated and read-only.
    let no_mask = [0u8; 4];
    let first = links.first().map(|(offset, _)| *offset);
    if first != Some(EXT_CAP_START) && (!chain.extended.is_empty() || first.is_some()) {
        let null_header = (first.unwrap_or(0) as u32) << 20;
        space.emulate(
            EXT_CAP_START,
            &null_header.to_le_bytes(),
            &no_mask,
            &no_mask,
        );
    }
    for (i, (offset, id_version)) in links.iter().enumerate() {
        let next = links.get(i + 1).map_or(0, |(next, _)| *next as u32);
        let header = id_version | next << 20;
        space.emulate(*offset, &header.to_le_bytes(), &no_mask, &no_mask);
    }

    let mut exposed = ExposedOffsets::default();
    if let Some(e) = ats.filter(|_| decisions.ats.exposed) {
        let control = u16_at(device, e.offset + 6) & ATS_CONTROL_WMASK;
        space.emulate(
            e.offset + 6,
            &control.to_le_bytes(),
            &ATS_CONTROL_WMASK.to_le_bytes(),
            &[0; 2],
        );
        exposed.ats = Some(e.offset);
    }
    if let Some(features) = decisions.pasid_features.filter(|_| decisions.pasid.exposed) {
        if let Some(offset) = pasid.map(|e| e.offset).or(synthesized) {
            let wmask = PASID_CONTROL_ENABLE
                | if features.exec { PASID_CONTROL_EXEC } else { 0 }
                | if features.privileged {
                    PASID_CONTROL_PRIV
                } else {
                    0
                };
            let control = if synthesized.is_some() {
                0
            } else {
                u16_at(device, offset + 6) & wmask
            };
            let mut body = [0u8; 4];
            body[..2].copy_from_slice(&features.register().to_le_bytes());
            body[2..].copy_from_slice(&control.to_le_bytes());
            let mut body_wmask = [0u8; 4];
            body_wmask[2..].copy_from_slice(&wmask.to_le_bytes());
            space.emulate(offset + 4, &body, &body_wmask, &[0; 4]);
            exposed.pasid = Some(offset);
            exposed.pasid_synthesized = synthesized.is_some();
        }
    }
    if let Some(e) = pri.filter(|_| decisions.pri.exposed) {
        let control = u16_at(device, e.offset + 4) & PRI_CONTROL_ENABLE;
        space.emulate(
            e.offset + 4,
            &control.to_le_bytes(),
            &PRI_CONTROL_ENABLE.to_le_bytes(),
            &[0; 2],
        );
        let status = u16_at(device, e.offset + 6);
        space.emulate(
            e.offset + 6,
            &status.to_le_bytes(),
            &[0; 2],
            &PRI_STATUS_ERRORS.to_le_bytes(),
        );
        let allocation = u32_at(device, e.offset + 12);
        space.emulate(
            e.offset + 12,
            &allocation.to_le_bytes(),
            &[0xff; 4],
            &[0; 4],
        );
        exposed.pri = Some(e.offset);
    }
    space.commit_reset_values();
    Ok(VirtualConfigSpace {
        space,
        decisions,
        exposed,
    })
}

fn no_room_reason(device: &[u8]) -> String {
    if device.len() < CONFIG_SPACE_SIZE {
        "the device has no PCI Express extended config space to put it in; use pasid=off".to_owned()
    } else {
        "there are no 8 free bytes at the end of the extended config space; set pasid_cap_offset to a free 4-byte-aligned offset, or use pasid=off".to_owned()
    }
}

/// Where a synthesized PASID capability goes: the configured offset (checked to be free of
/// every capability of the device), or the highest 4-byte-aligned offset whose 8 bytes are in
/// no capability and read as zero from the device (devices sometimes keep registers in
/// unlinked config space; zero bytes are the best evidence that nothing lives there). `None`
/// when the automatic search finds nothing.
fn place_pasid(
    device: &[u8],
    chain: &CapabilityChain,
    request: &PolicyRequest<'_>,
) -> Result<Option<usize>, VirtualConfigError> {
    let place_error = |reason: String| VirtualConfigError::PlacePasid {
        device: request.device_name.to_owned(),
        reason,
    };
    let taken = |offset: usize| {
        let end = offset + PASID_CAP_LEN;
        chain
            .extended
            .iter()
            .find(|e| e.offset < end && offset < e.end())
    };
    if device.len() < CONFIG_SPACE_SIZE {
        return Ok(None);
    }
    if let Some(offset) = request.pasid_cap_offset.map(usize::from) {
        if offset < EXT_CAP_START || offset + PASID_CAP_LEN > device.len() || offset % 4 != 0 {
            return Err(place_error(format!(
                "pasid_cap_offset={offset:#x} is not a 4-byte-aligned offset from {EXT_CAP_START:#x} to {:#x}; choose one in that range",
                device.len() - PASID_CAP_LEN
            )));
        }
        if let Some(e) = taken(offset) {
            return Err(place_error(format!(
                "pasid_cap_offset={offset:#x} overlaps the device's {} capability at {:#x}..{:#x}; set pasid_cap_offset to a free 4-byte-aligned offset, or remove it to let vfud pick one",
                super::caps::extended_name(e.id),
                e.offset,
                e.end()
            )));
        }
        return Ok(Some(offset));
    }
    let mut offset = device.len() - PASID_CAP_LEN;
    // 0x100 itself is the chain head, which the guest always reaches first.
    while offset > EXT_CAP_START {
        let zero = device[offset..offset + PASID_CAP_LEN]
            .iter()
            .all(|b| *b == 0);
        if zero && taken(offset).is_none() {
            return Ok(Some(offset));
        }
        offset -= 4;
    }
    Ok(None)
}

impl VirtualConfigSpace {
    /// Size in bytes (the device's config space size).
    pub fn len(&self) -> usize {
        self.space.len()
    }

    /// Always false: a config space has at least its header.
    pub fn is_empty(&self) -> bool {
        self.space.is_empty()
    }

    /// What the policy decided, with reasons.
    pub fn decisions(&self) -> &ResolvedCapabilities {
        &self.decisions
    }

    /// Where the exposed managed capabilities are.
    pub fn exposed(&self) -> ExposedOffsets {
        self.exposed
    }

    /// The emulated space (virtual copy and masks).
    pub fn space(&self) -> &ConfigSpace {
        &self.space
    }

    /// Reads what the guest sees; `device` holds the device's bytes for the same range.
    pub fn read(&self, offset: u64, device: &[u8], buf: &mut [u8]) -> Result<(), ConfigSpaceError> {
        self.space.read_merged(offset, device, buf)
    }

    /// The whole guest view, given the device's whole config space.
    pub fn guest_bytes(&self, device: &[u8]) -> Result<Vec<u8>, ConfigSpaceError> {
        let mut out = vec![0u8; self.space.len()];
        self.space.read_merged(0, device, &mut out)?;
        Ok(out)
    }

    /// Applies a guest write; returns the part that belongs to the device (never any
    /// emulated bit), or `None`.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<DeviceWrite>, ConfigSpaceError> {
        let forwarded = self.space.write_split(offset, data)?;
        if let Some(pri) = self.exposed.pri {
            let control = pri + 4;
            let written = usize::try_from(offset)
                .ok()
                .and_then(|start| control.checked_sub(start))
                .and_then(|i| data.get(i).copied());
            if let Some(byte) = written {
                self.after_pri_control_write(pri, u16::from(byte));
            }
        }
        Ok(forwarded)
    }

    /// PRI Reset (write-only) clears the error status when the interface is disabled, and
    /// Stopped follows Enable: with no page requests in flight, a disabled interface is
    /// stopped at once.
    fn after_pri_control_write(&mut self, pri: usize, written: u16) {
        let enabled = self.space.u16_at(pri + 4) & PRI_CONTROL_ENABLE != 0;
        let mut status = self.space.u16_at(pri + 6);
        if written & PRI_CONTROL_RESET != 0 && !enabled {
            status &= !PRI_STATUS_ERRORS;
        }
        if enabled {
            status &= !PRI_STATUS_STOPPED;
        } else {
            status |= PRI_STATUS_STOPPED;
        }
        self.space.set_bytes(pri + 6, &status.to_le_bytes());
    }

    /// The emulated control registers, for the device model.
    pub fn controls(&self) -> CapabilityControls {
        let s = &self.space;
        CapabilityControls {
            ats: self.exposed.ats.map(|at| {
                let control = s.u16_at(at + 6);
                AtsControl {
                    enabled: control & 0x8000 != 0,
                    stu: (control & 0x1f) as u8,
                }
            }),
            pasid: self.exposed.pasid.map(|at| {
                let control = s.u16_at(at + 6);
                PasidControl {
                    enabled: control & PASID_CONTROL_ENABLE != 0,
                    exec_enabled: control & PASID_CONTROL_EXEC != 0,
                    privileged_enabled: control & PASID_CONTROL_PRIV != 0,
                }
            }),
            pri: self.exposed.pri.map(|at| PriControl {
                enabled: s.u16_at(at + 4) & PRI_CONTROL_ENABLE != 0,
                outstanding_allocation: s.u32_at(at + 12),
            }),
        }
    }

    /// Returns every emulated register to its value when the view was built (device reset).
    pub fn reset(&mut self) {
        self.space.reset();
    }
}

#[cfg(test)]
#[path = "virtual_config_tests.rs"]
mod tests;
