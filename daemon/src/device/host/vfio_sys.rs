//! The VFIO device character-device uAPI (`include/uapi/linux/vfio.h`): the structs vfud uses,
//! their ioctl numbers, and one safe function per ioctl.
//!
//! Every ioctl is `_IO(';', 100 + n)`: no size is encoded in the number; each struct starts
//! with `argsz`, the caller's size. Layouts were checked against the 7.2/7.3 headers (sizes are
//! asserted below). This is the only place besides [`super::iommufd_sys`] that calls `ioctl`.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const fn vfio_io(n: u32) -> u32 {
    (VFIO_TYPE << 8) | (VFIO_BASE + n)
}

pub const VFIO_DEVICE_GET_INFO: u32 = vfio_io(7);
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = vfio_io(9);
pub const VFIO_DEVICE_SET_IRQS: u32 = vfio_io(10);
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = vfio_io(18);
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = vfio_io(19);

/// `vfio_device_info.flags`: the device supports VFIO_DEVICE_RESET.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `vfio_device_info.flags`: a PCI device.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `vfio_region_info.flags`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// Region capability ids.
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
pub const VFIO_REGION_INFO_CAP_TYPE: u16 = 2;
pub const VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: u16 = 3;

/// PCI region and IRQ indexes.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// `vfio_irq_set.flags`.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// Largest region-info reply (with its capability chain) vfud accepts from the kernel.
const MAX_REGION_INFO: usize = 64 * 1024;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioDeviceBindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioDeviceAttachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
    pub pasid: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioDeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioInfoCapHeader {
    pub id: u16,
    pub version: u16,
    pub next: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioRegionSparseMmapArea {
    pub offset: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioIrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VfioIrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

const _: () = assert!(core::mem::size_of::<VfioDeviceBindIommufd>() == 16);
const _: () = assert!(core::mem::size_of::<VfioDeviceAttachIommufdPt>() == 16);
const _: () = assert!(core::mem::size_of::<VfioDeviceInfo>() == 24);
const _: () = assert!(core::mem::size_of::<VfioRegionInfo>() == 32);
const _: () = assert!(core::mem::size_of::<VfioInfoCapHeader>() == 8);
const _: () = assert!(core::mem::size_of::<VfioRegionSparseMmapArea>() == 16);
const _: () = assert!(core::mem::size_of::<VfioIrqInfo>() == 16);
const _: () = assert!(core::mem::size_of::<VfioIrqSet>() == 20);

/// Issues `request` on `fd` with `arg` as its in/out buffer.
fn ioctl_buf(fd: BorrowedFd<'_>, request: u32, arg: &mut [u8]) -> Result<(), Errno> {
    // SAFETY: every VFIO ioctl used here reads and writes at most `argsz` bytes of its argument,
    // and each caller puts `argsz <= arg.len()` at the start of `arg`, a live, exclusively
    // borrowed buffer; the fd is borrowed, so it stays open for the call.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), request as _, arg.as_mut_ptr()) };
    Errno::result(rc).map(drop)
}

/// Issues `request` on `fd` with a struct argument.
fn ioctl_struct<T: IntoBytes + FromBytes>(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: &mut T,
) -> Result<(), Errno> {
    ioctl_buf(fd, request, arg.as_mut_bytes())
}

/// VFIO_DEVICE_BIND_IOMMUFD: binds the device to `iommufd`; returns the device id.
pub fn bind_iommufd(device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut bind = VfioDeviceBindIommufd {
        argsz: 16,
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
    };
    ioctl_struct(device, VFIO_DEVICE_BIND_IOMMUFD, &mut bind)?;
    Ok(bind.out_devid)
}

/// VFIO_DEVICE_ATTACH_IOMMUFD_PT: attaches the device's RID to `pt_id` (an IOAS or HWPT);
/// returns the HWPT the kernel attached.
pub fn attach_iommufd_pt(device: BorrowedFd<'_>, pt_id: u32) -> Result<u32, Errno> {
    let mut attach = VfioDeviceAttachIommufdPt {
        // Kernels before 6.15 know only the first 12 bytes and accept a larger argsz.
        argsz: 16,
        flags: 0,
        pt_id,
        pasid: 0,
    };
    ioctl_struct(device, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut attach)?;
    Ok(attach.pt_id)
}

/// VFIO_DEVICE_GET_INFO.
pub fn device_info(device: BorrowedFd<'_>) -> Result<VfioDeviceInfo, Errno> {
    let mut info = VfioDeviceInfo {
        argsz: 24,
        ..Default::default()
    };
    ioctl_struct(device, VFIO_DEVICE_GET_INFO, &mut info)?;
    Ok(info)
}

/// VFIO_DEVICE_GET_REGION_INFO with its capability chain: the whole reply (the struct first),
/// re-issued once with the size the kernel asks for.
pub fn region_info(device: BorrowedFd<'_>, index: u32) -> Result<Vec<u8>, Errno> {
    let mut len = core::mem::size_of::<VfioRegionInfo>();
    loop {
        let mut buf = vec![0u8; len];
        let head = VfioRegionInfo {
            argsz: len as u32,
            index,
            ..Default::default()
        };
        buf[..32].copy_from_slice(head.as_bytes());
        ioctl_buf(device, VFIO_DEVICE_GET_REGION_INFO, &mut buf)?;
        let (got, _) = VfioRegionInfo::read_from_prefix(&buf).map_err(|_| Errno::EIO)?;
        let wanted = got.argsz as usize;
        if wanted <= len {
            return Ok(buf);
        }
        if wanted > MAX_REGION_INFO || len != 32 {
            return Err(Errno::E2BIG);
        }
        len = wanted;
    }
}

/// VFIO_DEVICE_GET_IRQ_INFO.
pub fn irq_info(device: BorrowedFd<'_>, index: u32) -> Result<VfioIrqInfo, Errno> {
    let mut info = VfioIrqInfo {
        argsz: 16,
        index,
        ..Default::default()
    };
    ioctl_struct(device, VFIO_DEVICE_GET_IRQ_INFO, &mut info)?;
    Ok(info)
}

/// VFIO_DEVICE_SET_IRQS with `data` (bools, eventfd numbers or nothing) after the header.
pub fn set_irqs(
    device: BorrowedFd<'_>,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: &[u8],
) -> Result<(), Errno> {
    let header = VfioIrqSet {
        argsz: u32::try_from(20 + data.len()).map_err(|_| Errno::E2BIG)?,
        flags,
        index,
        start,
        count,
    };
    let mut buf = header.as_bytes().to_vec();
    buf.extend_from_slice(data);
    ioctl_buf(device, VFIO_DEVICE_SET_IRQS, &mut buf)
}

/// VFIO_DEVICE_RESET.
pub fn reset(device: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is borrowed for the call.
    let rc = unsafe { nix::libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_RESET as _) };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
    }
}
