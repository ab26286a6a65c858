//! The [`Device`] trait: what the server needs from anything that backs a socket.
//!
//! The server validates every index, offset and length against what the device describes
//! before calling it; implementations still check defensively and return errors, never panic.
//! Host devices (iommufd) and emulated models implement the same trait.

pub mod emulated;
pub mod eventfd;
pub mod host;
pub mod irq;
pub mod viommu;

use std::sync::Arc;

use nix::errno::Errno;
use vfu_protocol::reply::RegionDescription;
use vfu_protocol::request::SetIrqsRequest;

use crate::dma::{DmaRegion, GuestMemory};
use crate::pci::virtual_config::{PolicyRequest, VirtualConfigError};
use crate::pci::{HostIommuCaps, IommuSource, ResolvedCapabilities};
use crate::viommu::ats::{
    AtcCounters, AtcInvalidation, AtcInvalidationCompletion, InvalidationFuture,
};
use crate::viommu::resolve::{resolve, HostIommuInfo, ResolveError, ResolvedViommu, Resolver};

/// Static facts about a device, answered to DEVICE_GET_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (PCI, RESET).
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// A region as the device exposes it, with the fd that backs its mmap-able areas.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    pub description: RegionDescription,
    /// Present iff the region has `REGION_FLAG_MMAP`; sent once per region-info reply.
    pub fd: Option<Arc<std::os::fd::OwnedFd>>,
}

/// What a device operation can fail with; each maps to the errno of the error reply.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("region {index} does not exist")]
    CheckRegion { index: u32 },
    #[error("{len}-byte access at {offset:#x} is outside region {index} ({size} bytes)")]
    CheckRange {
        index: u32,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("region {index} does not allow {access}")]
    CheckAccess { index: u32, access: &'static str },
    #[error("IRQ index {index} does not exist or has no vectors")]
    CheckIrqIndex { index: u32 },
    #[error(
        "IRQ range start {start} count {count} exceeds the {vectors} vectors of index {index}"
    )]
    CheckIrqRange {
        index: u32,
        start: u32,
        count: u32,
        vectors: u32,
    },
    #[error("the fd for IRQ index {index} vector {vector} is not an eventfd")]
    CheckIrqFd { index: u32, vector: u32 },
    #[error("IRQ index {index} does not support {what}")]
    CheckIrqAction { index: u32, what: &'static str },
    #[error("signalling an interrupt eventfd failed")]
    SignalIrq(#[source] Errno),
    #[error("clearing device memory on reset failed")]
    ClearMemory(#[source] Errno),
    #[error("the operation is not supported by this device")]
    Unsupported,
    /// A host device's kernel interface refused an operation.
    #[error("device {device}: the host kernel refused {op}")]
    HostKernel {
        device: String,
        op: &'static str,
        #[source]
        source: Errno,
    },
    /// A host device could not mirror a DMA map into its IOMMU; `hint` tells the operator what
    /// to change.
    #[error("mapping {size:#x} bytes at IOVA {iova:#x} into the host IOMMU failed: {hint}")]
    MapIommu {
        iova: u64,
        size: u64,
        hint: &'static str,
        #[source]
        source: Errno,
    },
}

impl DeviceError {
    /// The errno for the error reply.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::SignalIrq(e)
            | DeviceError::ClearMemory(e)
            | DeviceError::HostKernel { source: e, .. }
            | DeviceError::MapIommu { source: e, .. } => *e,
            DeviceError::Unsupported => Errno::ENOTSUP,
            _ => Errno::EINVAL,
        }
    }
}

/// A device served over vfio-user. See the module documentation for the checking contract.
pub trait Device: Send + Sync + 'static {
    /// DEVICE_GET_INFO.
    fn info(&self) -> DeviceInfo;

    /// The region with `index`, or None if it does not exist. Regions below `num_regions` that
    /// the device does not implement are reported with size 0.
    fn region(&self, index: u32) -> Option<RegionSpec>;

    /// Reads `buf.len()` bytes of region `index` at `offset` (already range-checked).
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `data` to region `index` at `offset` (already range-checked).
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// DEVICE_GET_IRQ_INFO: (flags, count), or None if the index does not exist.
    fn irq_info(&self, index: u32) -> Option<(u32, u32)>;

    /// DEVICE_SET_IRQS, already parsed; range checks against the vector count are the device's.
    fn set_irqs(&self, request: SetIrqsRequest) -> Result<(), DeviceError>;

    /// DEVICE_RESET. Must finish well inside QEMU's 5 s message timeout.
    fn reset(&self) -> Result<(), DeviceError>;

    /// A client connected: DMA from now on goes through `memory`.
    fn attach(&self, memory: Arc<GuestMemory>);

    /// The client is gone: drop its memory handle and close every IRQ eventfd; keep all other
    /// device state for the next client. Called after every map was unmapped.
    fn detach(&self);

    /// A DMA map was added to the table. A host device mirrors it into its IOMMU here; an
    /// error rolls the map back and fails the DMA_MAP with the error's errno.
    fn dma_mapped(&self, region: &DmaRegion) -> Result<(), DeviceError> {
        let _ = region;
        Ok(())
    }

    /// A DMA map was removed and every in-flight access to it has drained. A host device
    /// removes it from its IOMMU here; an error means the device may still reach the memory,
    /// and the DMA_UNMAP fails with the error's errno instead of promising otherwise.
    fn dma_unmapped(&self, region: &DmaRegion) -> Result<(), DeviceError> {
        let _ = region;
        Ok(())
    }

    /// How many vectors of each IRQ index (in index order) have an eventfd from the client, for
    /// status reports. A device without interrupts reports none.
    fn wired_irqs(&self) -> Vec<u32> {
        Vec::new()
    }

    /// Invalidate device ATC: removes every cached translation the invalidation hits and
    /// resolves (the Invalidate Completion) only once no DMA that used them is in flight. The
    /// server raises one for every DMA_UNMAP (shadow mode) before it replies; a vIOMMU model
    /// raises one for a device-TLB invalidation. A device without an ATC completes at once.
    fn invalidate_atc(&self, invalidation: &AtcInvalidation) -> InvalidationFuture {
        let _ = invalidation;
        Box::pin(std::future::ready(AtcInvalidationCompletion::default()))
    }

    /// The device's ATC counters (translation requests, hits, misses, invalidations, entries),
    /// or `None` if the device has no ATC or the guest does not see its ATS capability.
    fn ats_counters(&self) -> Option<AtcCounters> {
        None
    }

    /// The capability policy's decisions for this device (what the guest sees of ATS, PASID
    /// and PRI, with the reasons), for logs and `vfud status`; `None` for a device without a
    /// PCI capability policy.
    fn capabilities(&self) -> Option<ResolvedCapabilities> {
        None
    }
}

/// Checks an access against a region description; used by the server before calling a device.
pub fn check_region_access(
    region: &RegionDescription,
    offset: u64,
    len: usize,
    write: bool,
) -> Result<(), DeviceError> {
    use vfu_protocol::wire::{REGION_FLAG_READ, REGION_FLAG_WRITE};
    let needed = if write {
        REGION_FLAG_WRITE
    } else {
        REGION_FLAG_READ
    };
    if region.flags & needed == 0 {
        return Err(DeviceError::CheckAccess {
            index: region.index,
            access: if write { "writes" } else { "reads" },
        });
    }
    let in_range = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= region.size);
    if !in_range {
        return Err(DeviceError::CheckRange {
            index: region.index,
            offset,
            len,
            size: region.size,
        });
    }
    Ok(())
}

/// Why a configured device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateDeviceError {
    /// The ats-dma model could not be created.
    #[error("device {name}: creating the ats-dma model failed")]
    CreateAtsDma {
        /// The device.
        name: String,
        /// What failed.
        #[source]
        source: emulated::ats_dma::AtsDmaError,
    },
    /// The capability policy refuses the device; the message names the device, the property,
    /// the value and the fix.
    #[error(transparent)]
    ApplyPolicy(#[from] VirtualConfigError),
    /// The device's `viommu` block cannot be resolved against its host IOMMU.
    #[error(transparent)]
    ResolveViommu(#[from] ResolveError),
    /// The embedded vIOMMU model of a `viommu` device cannot be created.
    #[error(transparent)]
    CreateViommu(#[from] viommu::ViommuDeviceError),
    /// The host device could not be opened; the message names the device and the fix.
    #[error(transparent)]
    OpenHost(host::HostDeviceError),
    /// Resolving a host device's policy needs the device itself (its config space and what
    /// its IOMMU reports).
    #[error("device {name}: the capability policy of a host device is resolved from the device itself; it is decided (and logged) when `vfud run` opens it")]
    ResolveHost {
        /// The device.
        name: String,
    },
}

/// What the capability policy needs from the vIOMMU model a device sits behind: the model's
/// own flags, never the host's directly (the model is frozen across a VM's devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViommuPlacement {
    /// The model supports PASID.
    pub pasid: bool,
    /// The model lets this device use ATS.
    pub ats: bool,
}

impl ViommuPlacement {
    /// The placement of a device with IOMMU `host` behind `model`.
    pub fn of(model: &ResolvedViommu, host: &HostIommuInfo) -> ViommuPlacement {
        ViommuPlacement {
            pasid: model.flags().pasid_supported,
            ats: model.device_ats(host),
        }
    }
}

/// The vIOMMU model an emulated device's configuration resolves to on its own (`None` without
/// a `viommu` block): for `vfud check-config`. `vfud run` freezes one model across the
/// devices it serves with a [`Resolver`] (see [`create`]); `vfud resolve` reports it.
pub fn viommu_model(
    config: &vfu_config::DeviceConfig,
) -> Result<Option<(ResolvedViommu, HostIommuInfo)>, ResolveError> {
    match &config.device {
        vfu_config::DeviceSpec::Viommu(_) => Ok(None),
        vfu_config::DeviceSpec::Emulated(e) => {
            let Some(spec) = e.viommu_spec() else {
                return Ok(None);
            };
            let host =
                HostIommuInfo::from_config(&HostIommuCaps::from_spec(&e.iommu_or_default()), spec);
            Ok(Some((resolve(&config.name, spec, &host)?, host)))
        }
        // A host device's IOMMU is only known once the device is open.
        vfu_config::DeviceSpec::Host(_) => Ok(None),
    }
}

/// The capability-policy request a configuration describes; `viommu` is the placement behind
/// the device's vIOMMU model, whose flags decide whether PASID and ATS may be exposed.
pub fn policy_request(
    config: &vfu_config::DeviceConfig,
    viommu: Option<ViommuPlacement>,
) -> PolicyRequest<'_> {
    match &config.device {
        vfu_config::DeviceSpec::Emulated(e) => PolicyRequest {
            device_name: &config.name,
            policies: e.capability_policies(),
            host: HostIommuCaps::from_spec(&e.iommu_or_default()),
            iommu_source: IommuSource::ConfigBlock,
            viommu_pasid: viommu.map(|m| m.pasid),
            viommu_ats: viommu.map(|m| m.ats),
            pasid_cap_hidden: e.pasid_cap_hidden,
            pasid_cap_offset: e.pasid_cap_offset.map(vfu_config::PasidCapOffset::get),
        },
        // A vIOMMU function has no ATS, PASID or PRI capability: every policy is off.
        vfu_config::DeviceSpec::Viommu(_) => PolicyRequest {
            device_name: &config.name,
            policies: vfu_config::CompatLevel::CURRENT.resolve(
                Some(vfu_config::CapabilityPolicy::Off),
                Some(vfu_config::CapabilityPolicy::Off),
                Some(vfu_config::CapabilityPolicy::Off),
            ),
            host: HostIommuCaps::from_spec(&vfu_config::IommuSpec::default()),
            iommu_source: IommuSource::ConfigBlock,
            viommu_pasid: None,
            viommu_ats: None,
            pasid_cap_hidden: false,
            pasid_cap_offset: None,
        },
        // The real inputs come from the device when it is opened (host::HostPciDevice::open);
        // this is what is known without it.
        vfu_config::DeviceSpec::Host(h) => PolicyRequest {
            device_name: &config.name,
            policies: h.capability_policies(),
            host: HostIommuCaps::from_hw_info(0, 0),
            iommu_source: IommuSource::HostDevice {
                address: h
                    .pci
                    .clone()
                    .or_else(|| h.cdev.as_ref().map(|p| p.display().to_string()))
                    .unwrap_or_default(),
            },
            viommu_pasid: viommu.map(|m| m.pasid),
            viommu_ats: viommu.map(|m| m.ats),
            pasid_cap_hidden: false,
            pasid_cap_offset: h.pasid_cap_offset.map(vfu_config::PasidCapOffset::get),
        },
    }
}

/// What the capability policy decides for a configured device, without creating it (no file
/// descriptors, no sockets): for `vfud check-config`. Fails exactly when [`create`] would fail
/// for policy reasons (or, for a `viommu` device, when its properties do not resolve). `None`
/// for a device without managed capabilities (a `viommu` device).
pub fn resolve_capabilities(
    config: &vfu_config::DeviceConfig,
) -> Result<Option<ResolvedCapabilities>, CreateDeviceError> {
    let viommu = viommu_model(config)?.map(|(m, host)| ViommuPlacement::of(&m, &host));
    let request = policy_request(config, viommu);
    match &config.device {
        vfu_config::DeviceSpec::Emulated(e) => match e.model {
            vfu_config::EmulatedModel::AtsDma => {
                Ok(Some(emulated::ats_dma::plan(&request)?.decisions().clone()))
            }
        },
        vfu_config::DeviceSpec::Viommu(spec) => {
            viommu::resolve_spec(&config.name, spec)?;
            Ok(None)
        }
        vfu_config::DeviceSpec::Host(_) => Err(CreateDeviceError::ResolveHost {
            name: config.name.clone(),
        }),
    }
}

/// Creates the device a configuration describes, with its capability policy applied, on its
/// own: a `viommu` device or a device naming one is linked to nothing, and a vIOMMU model
/// block is resolved for this device alone (see [`create_in`]).
pub fn create(config: &vfu_config::DeviceConfig) -> Result<Arc<dyn Device>, CreateDeviceError> {
    create_in(
        config,
        &viommu::ViommuRegistry::default(),
        &mut Resolver::new(),
    )
}

/// Creates the device a configuration describes, with its capability policy applied.
///
/// A `viommu` device registers in `viommus` under its name; a device that names one
/// (`"viommu": "<name>"`) attaches to that name there, whether or not it runs yet. `resolver`
/// holds the vIOMMU model of the VM the devices belong to: the first device with a model
/// block resolves and freezes it, every later one must be compatible with it (or is refused
/// with the reason), and each device's ATS and PASID follow the frozen model.
pub fn create_in(
    config: &vfu_config::DeviceConfig,
    viommus: &viommu::ViommuRegistry,
    resolver: &mut Resolver,
) -> Result<Arc<dyn Device>, CreateDeviceError> {
    match &config.device {
        vfu_config::DeviceSpec::Emulated(e) => match e.model {
            vfu_config::EmulatedModel::AtsDma => {
                let placement = match e.viommu_spec() {
                    Some(spec) => {
                        let host = HostIommuInfo::from_config(
                            &HostIommuCaps::from_spec(&e.iommu_or_default()),
                            spec,
                        );
                        let model = resolver.add(&config.name, spec, &host)?;
                        Some(ViommuPlacement::of(&model, &host))
                    }
                    None => None,
                };
                let request = policy_request(config, placement);
                let port = e
                    .viommu_device()
                    .map(|(name, rid)| viommus.slot(name).port(rid.0));
                let device = match emulated::AtsDma::new(&request) {
                    Ok(d) => d,
                    Err(emulated::ats_dma::AtsDmaError::ApplyPolicy(e)) => return Err(e.into()),
                    Err(source) => {
                        return Err(CreateDeviceError::CreateAtsDma {
                            name: config.name.clone(),
                            source,
                        })
                    }
                };
                let Some(port) = port else {
                    return Ok(Arc::new(device));
                };
                let rid = port.requester().0;
                let slot_name = e.viommu_device().map(|(n, _)| n).unwrap_or_default();
                device.behind_viommu(port);
                let device: Arc<dyn Device> = Arc::new(device);
                viommus
                    .slot(slot_name)
                    .set_endpoint(rid, Arc::downgrade(&device));
                Ok(device)
            }
        },
        vfu_config::DeviceSpec::Viommu(spec) => Ok(Arc::new(viommu::ViommuDevice::new(
            &config.name,
            spec,
            viommus.slot(&config.name),
        )?)),
        vfu_config::DeviceSpec::Host(_) => match host::HostPciDevice::open(config, resolver) {
            Ok(d) => Ok(Arc::new(d)),
            Err(host::HostDeviceError::ApplyPolicy(e)) => Err(e.into()),
            Err(host::HostDeviceError::ResolveViommu(e)) => Err(e.into()),
            Err(e) => Err(CreateDeviceError::OpenHost(e)),
        },
    }
}
