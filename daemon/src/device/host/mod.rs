//! A host PCI device served through Linux iommufd and the VFIO character device.
//!
//! Opening: find the device's cdev (`/sys/bus/pci/devices/<bdf>/vfio-dev/vfioN`), open it and
//! the iommufd, VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC, VFIO_DEVICE_ATTACH_IOMMUFD_PT, then
//! IOMMU_GET_HW_INFO for the capability policy. Every failure names the device and the fix.
//!
//! Serving: config space goes through the virtual config-space layer with the policy applied;
//! BARs are described with the VFIO device fd and its region offsets so the client mmaps them
//! (around the MSI-X table unless the kernel allows mapping it), and pread/pwrite serve the
//! rest; SET_IRQS goes straight to VFIO_DEVICE_SET_IRQS with the client's eventfds; DMA maps
//! are mirrored into the IOAS at the client's IOVA (IOMMU_IOAS_MAP_FILE of the client's file,
//! IOMMU_IOAS_MAP of our mapping of it as the fallback); a detach unmaps everything, disables
//! every interrupt and resets the device.

pub mod iommufd_sys;
pub mod kernel;
pub mod locate;
pub mod vfio_sys;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use vfu_protocol::reply::{RegionCap, RegionDescription};
use vfu_protocol::request::{IrqAction, IrqData, SetIrqsRequest};
use vfu_protocol::wire::{self, SparseMmapArea};

use crate::device::ViommuPlacement;
use crate::device::{Device, DeviceError, DeviceInfo, RegionSpec};
use crate::dma::{DmaBacking, DmaRegion, GuestMemory};
use crate::pci::caps::CapabilityChain;
use crate::pci::virtual_config::{self, PolicyRequest, VirtualConfigError, VirtualConfigSpace};
use crate::pci::{HostIommuCaps, IommuSource};
use crate::viommu::resolve::{HostIommuHw, HostIommuInfo, ResolveError, Resolver};

pub use kernel::{CdevKernel, HostHwInfo, HostIommuHwInfo, HostKernel, KernelRegion};
pub use locate::{HostDeviceLocation, LocateError};

use vfio_sys::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

/// PCI capability id of MSI-X.
const CAP_ID_MSIX: u8 = 0x11;
/// Page granule of sparse mmap areas around the MSI-X table.
const PAGE: u64 = 4096;
/// Largest config space vfud reads from a device.
const MAX_CONFIG: u64 = 4096;
/// Most IRQ indexes vfud serves (INTx, MSI, MSI-X, ERR, REQ).
const MAX_IRQ_INDEXES: u32 = 5;

/// Why a host device could not be opened; each message names the device and the fix.
#[derive(Debug, thiserror::Error)]
pub enum HostDeviceError {
    /// Finding the device's VFIO character device failed.
    #[error(transparent)]
    Locate(#[from] LocateError),
    /// The device's `viommu` block cannot be met by what its host IOMMU reports, or the model
    /// frozen at an earlier device cannot be honoured.
    #[error(transparent)]
    ResolveViommu(ResolveError),
    /// VFIO_DEVICE_BIND_IOMMUFD failed.
    #[error("device {device}: binding {cdev} to the iommufd failed{}", bind_hint(*.source))]
    Bind {
        device: String,
        cdev: String,
        #[source]
        source: Errno,
    },
    /// IOMMU_IOAS_ALLOC failed.
    #[error("device {device}: allocating an IOMMU address space (IOMMU_IOAS_ALLOC) failed; check that the iommufd in use is /dev/iommu of a kernel with CONFIG_IOMMUFD and that the system is not out of memory")]
    AllocIoas {
        device: String,
        #[source]
        source: Errno,
    },
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT failed.
    #[error("device {device}: attaching the device to its IOMMU address space failed{}", busy_hint(*.source))]
    Attach {
        device: String,
        #[source]
        source: Errno,
    },
    /// IOMMU_GET_HW_INFO failed for a reason other than an old kernel.
    #[error("device {device}: querying the host IOMMU (IOMMU_GET_HW_INFO) failed; the device's IOMMU driver refused a query every iommufd kernel answers, so check the kernel log for IOMMU errors")]
    HwInfo {
        device: String,
        #[source]
        source: Errno,
    },
    /// VFIO_DEVICE_GET_INFO failed or describes something vfud cannot serve.
    #[error("device {device}: {what}")]
    DeviceInfo {
        device: String,
        what: String,
        #[source]
        source: Option<Errno>,
    },
    /// VFIO_DEVICE_GET_REGION_INFO failed for a region the device must have.
    #[error("device {device}: reading the description of region {index} failed; the device may have been removed or reset by another user, so check `lspci` and the kernel log, then restart the device")]
    RegionInfo {
        device: String,
        index: u32,
        #[source]
        source: Errno,
    },
    /// Reading the config space failed.
    #[error("device {device}: reading its config space failed; the device may be in a low-power state or gone, so check `lspci -vv` and the kernel log, then restart the device")]
    ReadConfig {
        device: String,
        #[source]
        source: Errno,
    },
    /// The capability policy refuses the device.
    #[error(transparent)]
    ApplyPolicy(#[from] VirtualConfigError),
}

fn bind_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EBUSY => "; the device is in use (another vfud, a VMM, or a legacy /dev/vfio group user holds it): stop that user first",
        Errno::ENOTTY | Errno::EINVAL => "; the kernel does not support binding VFIO devices to iommufd: it needs CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV",
        Errno::EPERM => "; the platform cannot isolate the device's MSI interrupts (no interrupt remapping): enable interrupt remapping (e.g. intel_iommu=on with a VT-d that has it), or, if this host's interrupts are trusted, boot with iommufd.allow_unsafe_interrupts=1",
        Errno::EACCES => "; run vfud with access to /dev/iommu and the device's /dev/vfio/devices node",
        _ => "",
    }
}

fn busy_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EBUSY => "; the device or a sibling in its IOMMU group is being reset or used; retry, or stop the other user",
        _ => "",
    }
}

/// One region as served: the client's description and where it lives in the device fd.
#[derive(Debug, Clone)]
struct ServedRegion {
    description: RegionDescription,
    /// Offset of the region in the VFIO device fd.
    kernel_offset: u64,
}

/// A host PCI device behind iommufd, served over vfio-user.
#[derive(Debug)]
pub struct HostPciDevice {
    name: String,
    kernel: Box<dyn HostKernel>,
    ioas_id: u32,
    hw_info: Option<HostHwInfo>,
    info: DeviceInfo,
    regions: Vec<ServedRegion>,
    irqs: Vec<(u32, u32)>,
    config: Mutex<VirtualConfigSpace>,
    /// Maps mirrored into the IOAS: iova -> size. Only these are unmapped again.
    mirrored: Mutex<BTreeMap<u64, u64>>,
    /// IOMMU_IOAS_MAP_FILE failed with "unsupported" once; go straight to IOMMU_IOAS_MAP.
    map_file_unsupported: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HostPciDevice {
    /// Opens the configured host device and applies its capability policy; a `viommu` block
    /// resolves against (or freezes) `resolver` with what the kernel reports.
    pub fn open(
        config: &vfu_config::DeviceConfig,
        resolver: &mut Resolver,
    ) -> Result<HostPciDevice, HostDeviceError> {
        let vfu_config::DeviceSpec::Host(host) = &config.device else {
            return Err(HostDeviceError::DeviceInfo {
                device: config.name.clone(),
                what: "the configuration does not describe a host device".into(),
                source: None,
            });
        };
        let location = locate::locate(&config.name, host, &locate::SystemPaths::default())?;
        let (device, iommufd) = location.open(&config.name)?;
        let kernel = CdevKernel::new(device, iommufd);
        HostPciDevice::with_kernel(config, &location.label, Box::new(kernel), resolver)
    }

    /// Brings up a device over an opened kernel interface: bind, IOAS, attach, hw_info,
    /// regions, IRQs, config space with the policy applied. `label` names the device in
    /// messages (its PCI address or cdev path).
    pub fn with_kernel(
        config: &vfu_config::DeviceConfig,
        label: &str,
        kernel: Box<dyn HostKernel>,
        resolver: &mut Resolver,
    ) -> Result<HostPciDevice, HostDeviceError> {
        let name = config.name.clone();
        let vfu_config::DeviceSpec::Host(host) = &config.device else {
            return Err(HostDeviceError::DeviceInfo {
                device: name,
                what: "the configuration does not describe a host device".into(),
                source: None,
            });
        };
        let dev_id = kernel.bind().map_err(|source| HostDeviceError::Bind {
            device: name.clone(),
            cdev: label.to_owned(),
            source,
        })?;
        let ioas_id = kernel
            .alloc_ioas()
            .map_err(|source| HostDeviceError::AllocIoas {
                device: name.clone(),
                source,
            })?;
        kernel
            .attach(ioas_id)
            .map_err(|source| HostDeviceError::Attach {
                device: name.clone(),
                source,
            })?;
        let hw_info = match kernel.hw_info(dev_id) {
            Ok(info) => {
                tracing::info!(device = %name, host = %label, "IOMMU_GET_HW_INFO: {}", describe_hw_info(&info));
                Some(info)
            }
            // Kernels without the ioctl (ENOTTY) or without hw_info for this IOMMU
            // (EOPNOTSUPP): nothing is reported unusable, as the uAPI's negative flags intend.
            Err(Errno::ENOTTY | Errno::EOPNOTSUPP) => {
                tracing::info!(device = %name, host = %label, "IOMMU_GET_HW_INFO is not supported by this kernel or IOMMU: ATS is treated as not reported unusable, PASID as absent");
                None
            }
            Err(source) => {
                return Err(HostDeviceError::HwInfo {
                    device: name,
                    source,
                })
            }
        };
        let (flags, num_regions, num_irqs) =
            kernel
                .device_info()
                .map_err(|source| HostDeviceError::DeviceInfo {
                    device: name.clone(),
                    what: "reading the device description (VFIO_DEVICE_GET_INFO) failed".into(),
                    source: Some(source),
                })?;
        if flags & VFIO_DEVICE_FLAGS_PCI == 0 || num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
            return Err(HostDeviceError::DeviceInfo {
                device: name,
                what: format!("{label} is not a PCI device (VFIO flags {flags:#x}, {num_regions} regions); vfud serves PCI devices only"),
                source: None,
            });
        }

        // Config space first: the MSI-X table location decides the BARs' mmap areas.
        let config_region = kernel
            .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|source| HostDeviceError::RegionInfo {
                device: name.clone(),
                index: VFIO_PCI_CONFIG_REGION_INDEX,
                source,
            })?;
        let config_len = config_region.size.min(MAX_CONFIG) as usize;
        let mut raw_config = vec![0u8; config_len];
        kernel
            .read_at(config_region.offset, &mut raw_config)
            .map_err(|source| HostDeviceError::ReadConfig {
                device: name.clone(),
                source,
            })?;
        let caps = hw_info.map_or(HostIommuCaps::from_hw_info(0, 0), |h| {
            HostIommuCaps::from_hw_info(h.capabilities, h.max_pasid_log2)
        });
        let viommu = match &host.viommu {
            Some(spec) => {
                let info = iommu_info(hw_info.as_ref());
                let model = resolver
                    .add(&name, spec, &info)
                    .map_err(HostDeviceError::ResolveViommu)?;
                Some(ViommuPlacement::of(&model, &info))
            }
            None => None,
        };
        let request = PolicyRequest {
            device_name: &name,
            policies: host.capability_policies(),
            host: caps,
            iommu_source: IommuSource::HostDevice {
                address: label.to_owned(),
            },
            viommu_pasid: viommu.map(|v| v.pasid),
            viommu_ats: viommu.map(|v| v.ats),
            // The kernel hides PASID from VFIO users; a non-zero width means the device and
            // the IOMMU both support it and the kernel enabled it.
            pasid_cap_hidden: caps.max_pasid_log2 > 0,
            pasid_cap_offset: host.pasid_cap_offset.map(vfu_config::PasidCapOffset::get),
        };
        let view = virtual_config::build(&raw_config, &request)?;
        for decision in view.decisions().iter() {
            tracing::info!(device = %name, "{decision}");
        }
        let msix = msix_location(&raw_config);

        let served_regions = num_regions.min(VFIO_PCI_NUM_REGIONS);
        let mut regions = Vec::with_capacity(served_regions as usize);
        for index in 0..served_regions {
            let served = if index == VFIO_PCI_CONFIG_REGION_INDEX {
                ServedRegion {
                    description: RegionDescription {
                        index,
                        flags: wire::REGION_FLAG_READ | wire::REGION_FLAG_WRITE,
                        size: view.len() as u64,
                        offset: 0,
                        caps: Vec::new(),
                    },
                    kernel_offset: config_region.offset,
                }
            } else {
                match kernel.region_info(index) {
                    Ok(region) => serve_region(index, &region, msix, host.bar_mmap != Some(false)),
                    // Optional regions (VGA, a missing ROM) may not exist: size 0.
                    Err(Errno::EINVAL) => ServedRegion {
                        description: RegionDescription {
                            index,
                            ..Default::default()
                        },
                        kernel_offset: 0,
                    },
                    Err(source) => {
                        return Err(HostDeviceError::RegionInfo {
                            device: name,
                            index,
                            source,
                        })
                    }
                }
            };
            regions.push(served);
        }
        let irqs = (0..num_irqs.min(MAX_IRQ_INDEXES))
            .map(|index| kernel.irq_info(index).unwrap_or((0, 0)))
            .collect::<Vec<_>>();
        let info = DeviceInfo {
            flags: wire::DEVICE_FLAG_PCI
                | if flags & VFIO_DEVICE_FLAGS_RESET != 0 {
                    wire::DEVICE_FLAG_RESET
                } else {
                    0
                },
            num_regions: served_regions,
            num_irqs: irqs.len() as u32,
        };
        tracing::info!(device = %name, host = %label, dev_id, ioas_id, regions = served_regions, irq_indexes = irqs.len(), "host device bound to iommufd and attached");
        Ok(HostPciDevice {
            name,
            kernel,
            ioas_id,
            hw_info,
            info,
            regions,
            irqs,
            config: Mutex::new(view),
            mirrored: Mutex::new(BTreeMap::new()),
            map_file_unsupported: AtomicBool::new(false),
        })
    }

    /// What IOMMU_GET_HW_INFO reported, None when the kernel does not support it.
    pub fn hw_info(&self) -> Option<HostHwInfo> {
        self.hw_info
    }

    /// The policy decisions, for `check-config`-style reporting.
    pub fn decisions(&self) -> crate::pci::ResolvedCapabilities {
        lock(&self.config).decisions().clone()
    }

    fn served(&self, index: u32) -> Result<&ServedRegion, DeviceError> {
        self.regions
            .get(index as usize)
            .filter(|r| r.description.size > 0)
            .ok_or(DeviceError::CheckRegion { index })
    }

    fn checked_offset(&self, index: u32, offset: u64, len: usize) -> Result<u64, DeviceError> {
        let r = self.served(index)?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > r.description.size) {
            return Err(DeviceError::CheckRange {
                index,
                offset,
                len,
                size: r.description.size,
            });
        }
        r.kernel_offset
            .checked_add(offset)
            .ok_or(DeviceError::CheckRange {
                index,
                offset,
                len,
                size: r.description.size,
            })
    }

    fn kernel_error(&self, op: &'static str, source: Errno) -> DeviceError {
        DeviceError::HostKernel {
            device: self.name.clone(),
            op,
            source,
        }
    }

    /// Applies the device's part of a guest config write: whole bytes directly, partly owned
    /// bytes by read-modify-write, never a byte the device does not own.
    fn write_config_device(
        &self,
        base: u64,
        w: &virtual_config_write::Owned,
    ) -> Result<(), DeviceError> {
        for run in w.runs() {
            let at = base + run.offset;
            let mut bytes = run.data.clone();
            if run.partial {
                let mut current = vec![0u8; bytes.len()];
                self.kernel
                    .read_at(at, &mut current)
                    .map_err(|e| self.kernel_error("config read", e))?;
                for ((b, c), m) in bytes.iter_mut().zip(current).zip(&run.mask) {
                    *b = (*b & m) | (c & !m);
                }
            }
            self.kernel
                .write_at(at, &bytes)
                .map_err(|e| self.kernel_error("config write", e))?;
        }
        Ok(())
    }

    fn unmap_everything(&self) {
        lock(&self.mirrored).clear();
        match self.kernel.unmap(self.ioas_id, 0, u64::MAX) {
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(errno) => {
                tracing::warn!(device = %self.name, %errno, "unmapping the whole IOAS failed")
            }
        }
    }
}

mod virtual_config_write {
    //! Splitting a [`crate::pci::DeviceWrite`] into runs a device can apply.

    /// A run of consecutive device-owned bytes.
    #[derive(Debug)]
    pub struct Run {
        pub offset: u64,
        pub data: Vec<u8>,
        pub mask: Vec<u8>,
        /// Some byte is only partly owned: read-modify-write.
        pub partial: bool,
    }

    /// The owned part of a guest write.
    #[derive(Debug)]
    pub struct Owned(pub crate::pci::DeviceWrite);

    impl Owned {
        /// Runs of bytes with a non-zero mask.
        pub fn runs(&self) -> Vec<Run> {
            let w = &self.0;
            let mut runs: Vec<Run> = Vec::new();
            for (i, (&d, &m)) in w.data.iter().zip(&w.mask).enumerate() {
                if m == 0 {
                    continue;
                }
                let offset = w.offset + i as u64;
                match runs.last_mut() {
                    Some(r) if r.offset + r.data.len() as u64 == offset => {
                        r.data.push(d);
                        r.mask.push(m);
                        r.partial |= m != 0xff;
                    }
                    _ => runs.push(Run {
                        offset,
                        data: vec![d],
                        mask: vec![m],
                        partial: m != 0xff,
                    }),
                }
            }
            runs
        }
    }
}

/// Where the MSI-X table and PBA live: (BAR, offset, size) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsixLocation {
    table: (u32, u64, u64),
    pba: (u32, u64, u64),
}

fn msix_location(config: &[u8]) -> Option<MsixLocation> {
    let chain = CapabilityChain::walk(config);
    let at = chain.find_standard(CAP_ID_MSIX)?;
    let control = u16::from_le_bytes([*config.get(at + 2)?, *config.get(at + 3)?]);
    let table = u32::from_le_bytes(config.get(at + 4..at + 8)?.try_into().ok()?);
    let pba = u32::from_le_bytes(config.get(at + 8..at + 12)?.try_into().ok()?);
    let vectors = u64::from(control & 0x7ff) + 1;
    Some(MsixLocation {
        table: (table & 7, u64::from(table & !7), vectors * 16),
        pba: (pba & 7, u64::from(pba & !7), vectors.div_ceil(64) * 8),
    })
}

/// The client's description of a kernel region: same flags and size, the device fd's offset,
/// and, when `mmap` allows handing out the device fd, the areas the client may mmap.
fn serve_region(
    index: u32,
    region: &KernelRegion,
    msix: Option<MsixLocation>,
    mmap: bool,
) -> ServedRegion {
    let mut flags = 0;
    if region.flags & VFIO_REGION_INFO_FLAG_READ != 0 {
        flags |= wire::REGION_FLAG_READ;
    }
    if region.flags & VFIO_REGION_INFO_FLAG_WRITE != 0 {
        flags |= wire::REGION_FLAG_WRITE;
    }
    let mut caps = Vec::new();
    if mmap && region.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && region.size > 0 {
        let areas = mmap_areas(index, region, msix);
        if !areas.is_empty() {
            flags |= wire::REGION_FLAG_MMAP;
            caps.push(RegionCap::SparseMmap(
                areas
                    .into_iter()
                    .map(|(offset, size)| SparseMmapArea { offset, size })
                    .collect(),
            ));
        }
    }
    ServedRegion {
        description: RegionDescription {
            index,
            flags,
            size: region.size,
            offset: region.offset,
            caps,
        },
        kernel_offset: region.offset,
    }
}

/// The mmap-able areas of a BAR: the kernel's sparse areas when it gives them; otherwise the
/// whole BAR, minus the pages of the MSI-X table unless the kernel reports them mappable.
/// Areas outside the region are dropped.
fn mmap_areas(index: u32, region: &KernelRegion, msix: Option<MsixLocation>) -> Vec<(u64, u64)> {
    let inside = |&(o, s): &(u64, u64)| s > 0 && o.checked_add(s).is_some_and(|e| e <= region.size);
    if let Some(areas) = &region.sparse_areas {
        return areas.iter().copied().filter(inside).collect();
    }
    let whole = vec![(0, region.size)];
    let Some(m) = msix.filter(|m| m.table.0 == index && !region.msix_mappable) else {
        return whole;
    };
    let start = m.table.1 / PAGE * PAGE;
    let end = (m.table.1.saturating_add(m.table.2))
        .div_ceil(PAGE)
        .saturating_mul(PAGE)
        .min(region.size);
    [(0, start), (end, region.size.saturating_sub(end))]
        .into_iter()
        .filter(inside)
        .collect()
}

/// One line for the log: the policy inputs and the raw registers.
pub fn describe_hw_info(info: &HostHwInfo) -> String {
    let raw = match info.iommu {
        HostIommuHwInfo::IntelVtd {
            flags,
            cap_reg,
            ecap_reg,
        } => format!("type=intel-vtd flags={flags:#x} cap_reg={cap_reg:#x} ecap_reg={ecap_reg:#x}"),
        HostIommuHwInfo::ArmSmmuv3 {
            flags,
            idr,
            iidr,
            aidr,
        } => format!(
            "type=arm-smmuv3 flags={flags:#x} idr0={:#x} idr1={:#x} idr2={:#x} idr3={:#x} idr4={:#x} idr5={:#x} iidr={iidr:#x} aidr={aidr:#x}",
            idr[0], idr[1], idr[2], idr[3], idr[4], idr[5]
        ),
        HostIommuHwInfo::Other { data_type } => format!("type={data_type}"),
    };
    format!(
        "capabilities={:#x} max_pasid_log2={} {raw}",
        info.capabilities, info.max_pasid_log2
    )
}

/// The error a failed pin gets: the operator must raise the locked-memory limit.
fn map_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOMEM | Errno::EPERM => "the kernel could not pin the guest memory: raise vfud's locked-memory limit (RLIMIT_MEMLOCK; LimitMEMLOCK= in the systemd unit, e.g. LimitMEMLOCK=infinity) to cover guest RAM, or grant CAP_IPC_LOCK",
        Errno::EEXIST | Errno::EADDRINUSE => "the IOVA range is already mapped or reserved by the host IOMMU (e.g. the interrupt window)",
        Errno::EINVAL => "the kernel refused the range (misaligned, or it overlaps an IOVA range the host IOMMU reserves, e.g. the interrupt window)",
        _ => "the kernel refused the map",
    }
}

impl Device for HostPciDevice {
    fn capabilities(&self) -> Option<crate::pci::ResolvedCapabilities> {
        Some(lock(&self.config).decisions().clone())
    }

    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn region(&self, index: u32) -> Option<RegionSpec> {
        let r = self.regions.get(index as usize)?;
        let fd = (r.description.flags & wire::REGION_FLAG_MMAP != 0).then(|| self.kernel.mmap_fd());
        Some(RegionSpec {
            description: r.description.clone(),
            fd,
        })
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let at = self.checked_offset(index, offset, buf.len())?;
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            // The device's bytes for the range; on the stack for the small accesses config
            // cycles are, so they cost no allocation.
            let mut small = [0u8; 64];
            let mut large = Vec::new();
            let device = if buf.len() <= small.len() {
                &mut small[..buf.len()]
            } else {
                large.resize(buf.len(), 0);
                &mut large[..]
            };
            self.kernel
                .read_at(at, device)
                .map_err(|e| self.kernel_error("config read", e))?;
            return lock(&self.config).read(offset, device, buf).map_err(|_| {
                DeviceError::CheckRange {
                    index,
                    offset,
                    len: buf.len(),
                    size: self.regions[index as usize].description.size,
                }
            });
        }
        self.kernel
            .read_at(at, buf)
            .map_err(|e| self.kernel_error("region read", e))
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let at = self.checked_offset(index, offset, data.len())?;
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            let forwarded =
                lock(&self.config)
                    .write(offset, data)
                    .map_err(|_| DeviceError::CheckRange {
                        index,
                        offset,
                        len: data.len(),
                        size: self.regions[index as usize].description.size,
                    })?;
            if let Some(w) = forwarded {
                let base = at - offset;
                self.write_config_device(base, &virtual_config_write::Owned(w))?;
            }
            return Ok(());
        }
        self.kernel
            .write_at(at, data)
            .map_err(|e| self.kernel_error("region write", e))
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        self.irqs.get(index as usize).copied()
    }

    fn set_irqs(&self, request: SetIrqsRequest) -> Result<(), DeviceError> {
        let (_, vectors) =
            *self
                .irqs
                .get(request.index as usize)
                .ok_or(DeviceError::CheckIrqIndex {
                    index: request.index,
                })?;
        let disable = request.count == 0;
        let in_range = request
            .start
            .checked_add(request.count)
            .is_some_and(|end| end <= vectors);
        if !disable && !in_range {
            return Err(DeviceError::CheckIrqRange {
                index: request.index,
                start: request.start,
                count: request.count,
                vectors,
            });
        }
        let action = match request.action {
            IrqAction::Mask => wire::IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => wire::IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => wire::IRQ_SET_ACTION_TRIGGER,
        };
        // The fds stay open until the ioctl returned; the kernel takes its own references.
        let (data_flag, data) = match &request.data {
            IrqData::None => (wire::IRQ_SET_DATA_NONE, Vec::new()),
            IrqData::Bool(flags) => (
                wire::IRQ_SET_DATA_BOOL,
                flags.iter().map(|&b| u8::from(b)).collect(),
            ),
            IrqData::Eventfds(fds) if fds.is_empty() => (
                wire::IRQ_SET_DATA_EVENTFD,
                (0..request.count)
                    .flat_map(|_| (-1i32).to_ne_bytes())
                    .collect(),
            ),
            IrqData::Eventfds(fds) => {
                if fds.len() != request.count as usize {
                    return Err(DeviceError::CheckIrqRange {
                        index: request.index,
                        start: request.start,
                        count: fds.len() as u32,
                        vectors: request.count,
                    });
                }
                (
                    wire::IRQ_SET_DATA_EVENTFD,
                    fds.iter()
                        .flat_map(|fd| std::os::fd::AsRawFd::as_raw_fd(fd).to_ne_bytes())
                        .collect(),
                )
            }
        };
        self.kernel
            .set_irqs(
                data_flag | action,
                request.index,
                request.start,
                request.count,
                &data,
            )
            .map_err(|e| self.kernel_error("VFIO_DEVICE_SET_IRQS", e))
    }

    fn reset(&self) -> Result<(), DeviceError> {
        if self.info.flags & wire::DEVICE_FLAG_RESET == 0 {
            return Err(DeviceError::Unsupported);
        }
        self.kernel
            .reset()
            .map_err(|e| self.kernel_error("VFIO_DEVICE_RESET", e))?;
        lock(&self.config).reset();
        Ok(())
    }

    fn attach(&self, memory: Arc<GuestMemory>) {
        // The device reaches guest memory through the IOAS, fed by dma_mapped, which hands the
        // client's files to IOMMU_IOAS_MAP_FILE: the table must keep them.
        memory.with_table(|t| t.set_keep_backing_files(true));
    }

    fn detach(&self) {
        // The server unmapped every region first; anything left is dropped wholesale.
        self.unmap_everything();
        for (index, &(flags, count)) in self.irqs.iter().enumerate() {
            if count == 0 || flags & wire::IRQ_INFO_EVENTFD == 0 {
                continue;
            }
            if let Err(errno) = self.kernel.set_irqs(
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                index as u32,
                0,
                0,
                &[],
            ) {
                tracing::debug!(device = %self.name, index, %errno, "disabling an IRQ index on detach failed");
            }
        }
        if self.info.flags & wire::DEVICE_FLAG_RESET != 0 {
            if let Err(errno) = self.kernel.reset() {
                tracing::warn!(device = %self.name, %errno, "resetting the device on detach failed");
            }
        }
        lock(&self.config).reset();
    }

    fn dma_mapped(&self, region: &DmaRegion) -> Result<(), DeviceError> {
        let DmaBacking::Mapped(mapped) = &region.backing else {
            // No fd: the physical device cannot reach this memory. The map is kept (a VMM maps
            // such regions for emulated devices too); device DMA there faults in the IOMMU.
            tracing::warn!(device = %self.name, iova = format_args!("{:#x}", region.iova), size = region.size, "DMA map without an fd is not mirrored into the IOMMU; the host device cannot DMA there");
            return Ok(());
        };
        let flags = iommufd_sys::map_flags(region.prot.read, region.prot.write);
        let by_address = || {
            self.kernel.map_user(
                self.ioas_id,
                mapped.user_address(),
                region.size,
                region.iova,
                flags,
            )
        };
        let file = if self.map_file_unsupported.load(Ordering::Relaxed) {
            None
        } else {
            mapped.backing_file()
        };
        let (how, result) = match file {
            Some((fd, start)) => {
                match self
                    .kernel
                    .map_file(self.ioas_id, fd, start, region.size, region.iova, flags)
                {
                    // A kernel before 6.13 (no MAP_FILE), or a file MAP_FILE cannot pin.
                    Err(errno @ (Errno::ENOTTY | Errno::EOPNOTSUPP)) => {
                        if errno == Errno::ENOTTY {
                            self.map_file_unsupported.store(true, Ordering::Relaxed);
                        }
                        ("IOMMU_IOAS_MAP", by_address())
                    }
                    result => ("IOMMU_IOAS_MAP_FILE", result),
                }
            }
            None => ("IOMMU_IOAS_MAP", by_address()),
        };
        match result {
            Ok(()) => {
                lock(&self.mirrored).insert(region.iova, region.size);
                tracing::info!(device = %self.name, iova = format_args!("{:#x}", region.iova), size = format_args!("{:#x}", region.size), read = region.prot.read, write = region.prot.write, "{how}: DMA map mirrored into the IOAS");
                Ok(())
            }
            Err(source) => {
                tracing::warn!(device = %self.name, iova = format_args!("{:#x}", region.iova), size = format_args!("{:#x}", region.size), errno = %source, "{how} failed: {}", map_hint(source));
                Err(DeviceError::MapIommu {
                    iova: region.iova,
                    size: region.size,
                    hint: map_hint(source),
                    source,
                })
            }
        }
    }

    fn dma_unmapped(&self, region: &DmaRegion) -> Result<(), DeviceError> {
        if lock(&self.mirrored).remove(&region.iova) != Some(region.size) {
            return Ok(());
        }
        let iova = format_args!("{:#x}", region.iova);
        match self.kernel.unmap(self.ioas_id, region.iova, region.size) {
            Ok(n) if n == region.size => {
                tracing::info!(device = %self.name, %iova, size = format_args!("{:#x}", region.size), "IOMMU_IOAS_UNMAP: DMA map removed from the IOAS");
                Ok(())
            }
            // The IOAS may still map (part of) the range: the client must not be told it is
            // gone. The whole IOAS is unmapped when the client disconnects.
            Ok(n) => {
                tracing::error!(device = %self.name, %iova, size = region.size, unmapped = n, "IOMMU_IOAS_UNMAP removed a different length than mapped");
                Err(DeviceError::HostKernel {
                    device: self.name.clone(),
                    op: "IOMMU_IOAS_UNMAP (short unmap)",
                    source: Errno::EIO,
                })
            }
            Err(errno) => {
                tracing::error!(device = %self.name, %iova, size = region.size, %errno, "IOMMU_IOAS_UNMAP failed");
                Err(DeviceError::HostKernel {
                    device: self.name.clone(),
                    op: "IOMMU_IOAS_UNMAP",
                    source: errno,
                })
            }
        }
    }
}

/// What `IOMMU_GET_HW_INFO` reported, as vIOMMU resolution reads it (nothing reported: no
/// capabilities, no PASID, no registers).
fn iommu_info(hw: Option<&HostHwInfo>) -> HostIommuInfo {
    HostIommuInfo {
        out_capabilities: hw.map_or(0, |h| h.capabilities),
        max_pasid_log2: hw.map_or(0, |h| h.max_pasid_log2),
        hw: hw.and_then(|h| match h.iommu {
            HostIommuHwInfo::IntelVtd {
                cap_reg, ecap_reg, ..
            } => Some(HostIommuHw::Vtd {
                cap: cap_reg,
                ecap: ecap_reg,
            }),
            HostIommuHwInfo::ArmSmmuv3 { idr, .. } => Some(HostIommuHw::Smmuv3 { idr }),
            HostIommuHwInfo::Other { .. } => None,
        }),
    }
}
