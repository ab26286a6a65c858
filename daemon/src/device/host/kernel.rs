//! The narrow interface between the host-device backend and the kernel: one VFIO device bound to
//! one iommufd. [`HostKernel`] has the real implementation [`CdevKernel`] (the VFIO character
//! device plus `/dev/iommu`, through [`super::vfio_sys`] and [`super::iommufd_sys`]) and a fake
//! in the unit tests, so every decision above it is tested without /dev.
//!
//! Results are bare errnos: the backend knows what it was doing and words the error.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::uio::{pread, pwrite};
use zerocopy::FromBytes;

use super::iommufd_sys as iommufd;
use super::vfio_sys as vfio;

/// What IOMMU_GET_HW_INFO reported for the device, as plain data: the policy inputs
/// (`capabilities`, `max_pasid_log2`) and the raw type-specific registers, which a vIOMMU
/// model resolves its `auto` properties from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostHwInfo {
    /// `out_capabilities` (`IOMMU_HW_CAP_*`).
    pub capabilities: u64,
    /// `out_max_pasid_log2`; 0 = no PASID.
    pub max_pasid_log2: u8,
    /// The type-specific data.
    pub iommu: HostIommuHwInfo,
}

/// The type-specific part of IOMMU_GET_HW_INFO, raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostIommuHwInfo {
    /// `IOMMU_HW_INFO_TYPE_INTEL_VTD`: the VT-d capability and extended capability registers.
    IntelVtd {
        /// `iommu_hw_info_vtd.flags` (errata).
        flags: u32,
        /// CAP_REG.
        cap_reg: u64,
        /// ECAP_REG.
        ecap_reg: u64,
    },
    /// `IOMMU_HW_INFO_TYPE_ARM_SMMUV3`: the SMMUv3 ID registers.
    ArmSmmuv3 {
        /// `iommu_hw_info_arm_smmuv3.flags` (errata).
        flags: u32,
        /// IDR0..IDR5.
        idr: [u32; 6],
        /// IIDR.
        iidr: u32,
        /// AIDR.
        aidr: u32,
    },
    /// A type vfud does not decode (`IOMMU_HW_INFO_TYPE_NONE`, AMD, ...), with its number.
    Other {
        /// `out_data_type`.
        data_type: u32,
    },
}

impl HostIommuHwInfo {
    /// Decodes the type-specific data of GET_HW_INFO; short data decodes as `Other`.
    pub fn decode(data_type: u32, data: &[u8]) -> HostIommuHwInfo {
        match data_type {
            iommufd::IOMMU_HW_INFO_TYPE_INTEL_VTD => {
                match iommufd::IommuHwInfoVtd::read_from_prefix(data) {
                    Ok((v, _)) => HostIommuHwInfo::IntelVtd {
                        flags: v.flags,
                        cap_reg: v.cap_reg,
                        ecap_reg: v.ecap_reg,
                    },
                    Err(_) => HostIommuHwInfo::Other { data_type },
                }
            }
            iommufd::IOMMU_HW_INFO_TYPE_ARM_SMMUV3 => {
                match iommufd::IommuHwInfoArmSmmuv3::read_from_prefix(data) {
                    Ok((s, _)) => HostIommuHwInfo::ArmSmmuv3 {
                        flags: s.flags,
                        idr: s.idr,
                        iidr: s.iidr,
                        aidr: s.aidr,
                    },
                    Err(_) => HostIommuHwInfo::Other { data_type },
                }
            }
            _ => HostIommuHwInfo::Other { data_type },
        }
    }
}

/// One VFIO region as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelRegion {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
    /// The sparse-mmap areas, when the kernel restricts mmap to them (offsets relative to the
    /// region).
    pub sparse_areas: Option<Vec<(u64, u64)>>,
    /// The kernel allows mmap of the MSI-X table (`VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`).
    pub msix_mappable: bool,
}

impl KernelRegion {
    /// Parses a VFIO_DEVICE_GET_REGION_INFO reply with its capability chain; every offset in
    /// the chain is checked against the reply, and a cycle ends the walk.
    pub fn parse(reply: &[u8]) -> Result<KernelRegion, Errno> {
        let (info, _) = vfio::VfioRegionInfo::read_from_prefix(reply).map_err(|_| Errno::EIO)?;
        let mut region = KernelRegion {
            flags: info.flags,
            size: info.size,
            offset: info.offset,
            sparse_areas: None,
            msix_mappable: false,
        };
        if info.flags & vfio::VFIO_REGION_INFO_FLAG_CAPS == 0 {
            return Ok(region);
        }
        let mut at = info.cap_offset as usize;
        let mut seen = 0;
        while at != 0 && seen < 16 {
            seen += 1;
            let Some((header, body)) = reply
                .get(at..)
                .and_then(|b| vfio::VfioInfoCapHeader::read_from_prefix(b).ok())
            else {
                return Err(Errno::EIO);
            };
            match header.id {
                vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                    let (nr, rest) = u32::read_from_prefix(body).map_err(|_| Errno::EIO)?;
                    let areas_bytes = rest.get(4..).ok_or(Errno::EIO)?;
                    let (areas, _) =
                        <[vfio::VfioRegionSparseMmapArea]>::ref_from_prefix_with_elems(
                            areas_bytes,
                            nr as usize,
                        )
                        .map_err(|_| Errno::EIO)?;
                    region.sparse_areas = Some(areas.iter().map(|a| (a.offset, a.size)).collect());
                }
                vfio::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => region.msix_mappable = true,
                _ => {}
            }
            at = header.next as usize;
        }
        Ok(region)
    }
}

/// The kernel operations on one VFIO device and its iommufd. Offsets of `read_at`/`write_at`
/// are device-fd offsets (a region's `offset` plus the offset inside it).
pub trait HostKernel: Send + Sync + std::fmt::Debug + 'static {
    /// VFIO_DEVICE_BIND_IOMMUFD; returns the device id.
    fn bind(&self) -> Result<u32, Errno>;
    /// IOMMU_IOAS_ALLOC.
    fn alloc_ioas(&self) -> Result<u32, Errno>;
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT to `ioas_id`.
    fn attach(&self, ioas_id: u32) -> Result<(), Errno>;
    /// IOMMU_GET_HW_INFO for `dev_id`.
    fn hw_info(&self, dev_id: u32) -> Result<HostHwInfo, Errno>;
    /// VFIO_DEVICE_GET_INFO: (flags, num_regions, num_irqs).
    fn device_info(&self) -> Result<(u32, u32, u32), Errno>;
    /// VFIO_DEVICE_GET_REGION_INFO.
    fn region_info(&self, index: u32) -> Result<KernelRegion, Errno>;
    /// VFIO_DEVICE_GET_IRQ_INFO: (flags, count).
    fn irq_info(&self, index: u32) -> Result<(u32, u32), Errno>;
    /// Reads exactly `buf.len()` bytes; a short read is `EIO`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Writes exactly `data.len()` bytes; a short write is `EIO`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Errno>;
    /// VFIO_DEVICE_SET_IRQS with the raw data after the header.
    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
    ) -> Result<(), Errno>;
    /// VFIO_DEVICE_RESET.
    fn reset(&self) -> Result<(), Errno>;
    /// IOMMU_IOAS_MAP_FILE.
    fn map_file(
        &self,
        ioas_id: u32,
        fd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno>;
    /// IOMMU_IOAS_MAP of this process's memory at `user_va`.
    fn map_user(
        &self,
        ioas_id: u32,
        user_va: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno>;
    /// IOMMU_IOAS_UNMAP; returns the bytes unmapped.
    fn unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno>;
    /// The fd a client mmaps the device's regions from (the VFIO device fd).
    fn mmap_fd(&self) -> Arc<OwnedFd>;
}

/// The real kernel: a VFIO character device and an iommufd, both open.
#[derive(Debug)]
pub struct CdevKernel {
    device: Arc<OwnedFd>,
    iommufd: File,
}

impl CdevKernel {
    /// Wraps the opened VFIO cdev and iommufd; nothing is bound yet.
    pub fn new(device: File, iommufd: File) -> CdevKernel {
        CdevKernel {
            device: Arc::new(OwnedFd::from(device)),
            iommufd,
        }
    }

    fn dev(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}

/// Positioned I/O until every byte moved: VFIO may return fewer bytes than asked (the
/// rust-vmm region helpers ignore that); zero bytes means the region ended early, `EIO`.
fn exact_io(
    len: usize,
    offset: u64,
    mut step: impl FnMut(usize, i64) -> Result<usize, Errno>,
) -> Result<(), Errno> {
    let mut done = 0;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| i64::try_from(o).ok())
            .ok_or(Errno::EINVAL)?;
        match step(done, at) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl HostKernel for CdevKernel {
    fn bind(&self) -> Result<u32, Errno> {
        vfio::bind_iommufd(self.dev(), self.iommufd.as_fd())
    }

    fn alloc_ioas(&self) -> Result<u32, Errno> {
        iommufd::ioas_alloc(self.iommufd.as_fd())
    }

    fn attach(&self, ioas_id: u32) -> Result<(), Errno> {
        vfio::attach_iommufd_pt(self.dev(), ioas_id).map(drop)
    }

    fn hw_info(&self, dev_id: u32) -> Result<HostHwInfo, Errno> {
        let (info, data) = iommufd::get_hw_info(self.iommufd.as_fd(), dev_id)?;
        Ok(HostHwInfo {
            capabilities: info.out_capabilities,
            max_pasid_log2: info.out_max_pasid_log2,
            iommu: HostIommuHwInfo::decode(info.out_data_type, &data),
        })
    }

    fn device_info(&self) -> Result<(u32, u32, u32), Errno> {
        let info = vfio::device_info(self.dev())?;
        Ok((info.flags, info.num_regions, info.num_irqs))
    }

    fn region_info(&self, index: u32) -> Result<KernelRegion, Errno> {
        KernelRegion::parse(&vfio::region_info(self.dev(), index)?)
    }

    fn irq_info(&self, index: u32) -> Result<(u32, u32), Errno> {
        let info = vfio::irq_info(self.dev(), index)?;
        Ok((info.flags, info.count))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let len = buf.len();
        exact_io(len, offset, |done, at| {
            pread(self.dev(), &mut buf[done..], at)
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        exact_io(data.len(), offset, |done, at| {
            pwrite(self.dev(), &data[done..], at)
        })
    }

    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
    ) -> Result<(), Errno> {
        vfio::set_irqs(self.dev(), flags, index, start, count, data)
    }

    fn reset(&self) -> Result<(), Errno> {
        vfio::reset(self.dev())
    }

    fn map_file(
        &self,
        ioas_id: u32,
        fd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        iommufd::ioas_map_file(
            self.iommufd.as_fd(),
            ioas_id,
            fd,
            start,
            length,
            iova,
            flags,
        )
    }

    fn map_user(
        &self,
        ioas_id: u32,
        user_va: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        iommufd::ioas_map_user(self.iommufd.as_fd(), ioas_id, user_va, length, iova, flags)
    }

    fn unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        iommufd::ioas_unmap(self.iommufd.as_fd(), ioas_id, iova, length)
    }

    fn mmap_fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn region_reply(flags: u32, caps: &[u8]) -> Vec<u8> {
        let info = vfio::VfioRegionInfo {
            argsz: (32 + caps.len()) as u32,
            flags,
            index: 4,
            cap_offset: if caps.is_empty() { 0 } else { 32 },
            size: 0x4000,
            offset: 0x40000000000,
        };
        let mut out = info.as_bytes().to_vec();
        out.extend_from_slice(caps);
        out
    }

    #[test]
    fn region_caps_are_parsed_and_bounded() {
        let mut caps = Vec::new();
        caps.extend_from_slice(
            vfio::VfioInfoCapHeader {
                id: 1,
                version: 1,
                next: 32 + 48,
            }
            .as_bytes(),
        );
        caps.extend_from_slice(&2u32.to_le_bytes());
        caps.extend_from_slice(&0u32.to_le_bytes());
        caps.extend_from_slice(
            vfio::VfioRegionSparseMmapArea {
                offset: 0,
                size: 0x1000,
            }
            .as_bytes(),
        );
        caps.extend_from_slice(
            vfio::VfioRegionSparseMmapArea {
                offset: 0x3000,
                size: 0x1000,
            }
            .as_bytes(),
        );
        caps.extend_from_slice(
            vfio::VfioInfoCapHeader {
                id: 3,
                version: 1,
                next: 0,
            }
            .as_bytes(),
        );
        let flags = vfio::VFIO_REGION_INFO_FLAG_CAPS | vfio::VFIO_REGION_INFO_FLAG_MMAP;
        let r = KernelRegion::parse(&region_reply(flags, &caps)).expect("parse");
        assert_eq!(r.sparse_areas, Some(vec![(0, 0x1000), (0x3000, 0x1000)]));
        assert!(r.msix_mappable);
        assert_eq!(r.offset, 0x40000000000);

        // A count past the end and a pointer past the end are errors, a self-loop ends.
        let mut bad = caps.clone();
        bad[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            KernelRegion::parse(&region_reply(flags, &bad)),
            Err(Errno::EIO)
        );
        let mut bad = caps.clone();
        bad[4..8].copy_from_slice(&5000u32.to_le_bytes());
        assert_eq!(
            KernelRegion::parse(&region_reply(flags, &bad)),
            Err(Errno::EIO)
        );
        let mut looped = caps;
        looped[4..8].copy_from_slice(&32u32.to_le_bytes());
        assert!(KernelRegion::parse(&region_reply(flags, &looped)).is_ok());
    }

    #[test]
    fn hw_info_decodes_vtd_and_smmuv3_raw_registers() {
        let vtd = iommufd::IommuHwInfoVtd {
            flags: 1,
            reserved: 0,
            cap_reg: 0xd2008c22260206,
            ecap_reg: 0xf00f5e,
        };
        assert_eq!(
            HostIommuHwInfo::decode(1, vtd.as_bytes()),
            HostIommuHwInfo::IntelVtd {
                flags: 1,
                cap_reg: 0xd2008c22260206,
                ecap_reg: 0xf00f5e
            }
        );
        let smmu = iommufd::IommuHwInfoArmSmmuv3 {
            flags: 0,
            reserved: 0,
            idr: [1, 2, 3, 4, 5, 6],
            iidr: 7,
            aidr: 8,
        };
        assert_eq!(
            HostIommuHwInfo::decode(2, smmu.as_bytes()),
            HostIommuHwInfo::ArmSmmuv3 {
                flags: 0,
                idr: [1, 2, 3, 4, 5, 6],
                iidr: 7,
                aidr: 8
            }
        );
        assert_eq!(
            HostIommuHwInfo::decode(1, &[0; 8]),
            HostIommuHwInfo::Other { data_type: 1 }
        );
        assert_eq!(
            HostIommuHwInfo::decode(4, &[0; 16]),
            HostIommuHwInfo::Other { data_type: 4 }
        );
    }
}
