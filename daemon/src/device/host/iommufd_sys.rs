//! The iommufd uAPI (`include/uapi/linux/iommufd.h`): the structs vfud uses, their ioctl
//! numbers, and one safe function per ioctl.
//!
//! Every ioctl is `_IO(';', 0x80 + n)`; each struct starts with `size`, the caller's size, and
//! the kernel rejects unknown non-zero trailing bytes, so the structs are exactly the sizes of
//! the first kernel that had them (asserted below).

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const IOMMUFD_TYPE: u32 = b';' as u32;

const fn iommufd_io(nr: u32) -> u32 {
    (IOMMUFD_TYPE << 8) | nr
}

pub const IOMMU_IOAS_ALLOC: u32 = iommufd_io(0x81);
pub const IOMMU_IOAS_MAP: u32 = iommufd_io(0x85);
pub const IOMMU_IOAS_UNMAP: u32 = iommufd_io(0x86);
pub const IOMMU_GET_HW_INFO: u32 = iommufd_io(0x8a);
pub const IOMMU_IOAS_MAP_FILE: u32 = iommufd_io(0x8f);

/// `iommufd_ioas_map_flags`.
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

/// `iommu_hw_info_type`.
pub const IOMMU_HW_INFO_TYPE_NONE: u32 = 0;
pub const IOMMU_HW_INFO_TYPE_INTEL_VTD: u32 = 1;
pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = 2;

/// Room for the largest type-specific hw_info vfud parses (SMMUv3, 40 bytes) and then some.
pub const HW_INFO_DATA_LEN: usize = 64;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuIoasMap {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub reserved: u32,
    pub user_va: u64,
    pub length: u64,
    pub iova: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuIoasMapFile {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub fd: i32,
    pub start: u64,
    pub length: u64,
    pub iova: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuHwInfo {
    pub size: u32,
    pub flags: u32,
    pub dev_id: u32,
    pub data_len: u32,
    pub data_uptr: u64,
    pub out_data_type: u32,
    pub out_max_pasid_log2: u8,
    pub reserved: [u8; 3],
    pub out_capabilities: u64,
}

/// `iommu_hw_info_vtd`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuHwInfoVtd {
    pub flags: u32,
    pub reserved: u32,
    pub cap_reg: u64,
    pub ecap_reg: u64,
}

/// `iommu_hw_info_arm_smmuv3`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IommuHwInfoArmSmmuv3 {
    pub flags: u32,
    pub reserved: u32,
    pub idr: [u32; 6],
    pub iidr: u32,
    pub aidr: u32,
}

const _: () = assert!(core::mem::size_of::<IommuIoasAlloc>() == 12);
const _: () = assert!(core::mem::size_of::<IommuIoasMap>() == 40);
const _: () = assert!(core::mem::size_of::<IommuIoasMapFile>() == 40);
const _: () = assert!(core::mem::size_of::<IommuIoasUnmap>() == 24);
const _: () = assert!(core::mem::size_of::<IommuHwInfo>() == 40);
const _: () = assert!(core::mem::size_of::<IommuHwInfoVtd>() == 24);
const _: () = assert!(core::mem::size_of::<IommuHwInfoArmSmmuv3>() == 40);

/// Issues `request` on the iommufd with `arg` as its in/out struct.
fn ioctl_struct<T: IntoBytes + FromBytes>(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: &mut T,
) -> Result<(), Errno> {
    // SAFETY: each iommufd ioctl reads and writes at most `size` bytes of its argument; every
    // caller sets `size` to `size_of::<T>()`, and `arg` is a live exclusive borrow of a T. Any
    // user pointer inside (`data_uptr`, `user_va`) is checked by the kernel, and the callers
    // only pass buffers that outlive the call (or, for a DMA map, memory the kernel pins).
    let rc = unsafe {
        nix::libc::ioctl(
            fd.as_raw_fd(),
            request as _,
            arg.as_mut_bytes().as_mut_ptr(),
        )
    };
    Errno::result(rc).map(drop)
}

/// IOMMU_IOAS_ALLOC: a new, empty IOAS.
pub fn ioas_alloc(iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut alloc = IommuIoasAlloc {
        size: 12,
        ..Default::default()
    };
    ioctl_struct(iommufd, IOMMU_IOAS_ALLOC, &mut alloc)?;
    Ok(alloc.out_ioas_id)
}

/// The `iommufd_ioas_map_flags` for a fixed-IOVA map with the given permissions.
pub fn map_flags(read: bool, write: bool) -> u32 {
    IOMMU_IOAS_MAP_FIXED_IOVA
        | if read { IOMMU_IOAS_MAP_READABLE } else { 0 }
        | if write { IOMMU_IOAS_MAP_WRITEABLE } else { 0 }
}

/// IOMMU_IOAS_MAP_FILE: maps `length` bytes of `fd` from `start` at `iova`.
pub fn ioas_map_file(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    fd: BorrowedFd<'_>,
    start: u64,
    length: u64,
    iova: u64,
    flags: u32,
) -> Result<(), Errno> {
    let mut map = IommuIoasMapFile {
        size: 40,
        flags,
        ioas_id,
        fd: fd.as_raw_fd(),
        start,
        length,
        iova,
    };
    ioctl_struct(iommufd, IOMMU_IOAS_MAP_FILE, &mut map)
}

/// IOMMU_IOAS_MAP: maps `length` bytes of this process's memory at `user_va` to `iova`. The
/// kernel pins the pages; the caller keeps the mapping alive until the matching unmap.
pub fn ioas_map_user(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    user_va: u64,
    length: u64,
    iova: u64,
    flags: u32,
) -> Result<(), Errno> {
    let mut map = IommuIoasMap {
        size: 40,
        flags,
        ioas_id,
        reserved: 0,
        user_va,
        length,
        iova,
    };
    ioctl_struct(iommufd, IOMMU_IOAS_MAP, &mut map)
}

/// IOMMU_IOAS_UNMAP: unmaps every mapping inside `[iova, iova + length)`; returns the bytes
/// unmapped. `iova = 0, length = u64::MAX` unmaps everything.
pub fn ioas_unmap(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    iova: u64,
    length: u64,
) -> Result<u64, Errno> {
    let mut unmap = IommuIoasUnmap {
        size: 24,
        ioas_id,
        iova,
        length,
    };
    ioctl_struct(iommufd, IOMMU_IOAS_UNMAP, &mut unmap)?;
    Ok(unmap.length)
}

/// IOMMU_GET_HW_INFO for `dev_id`: the fixed part, and the type-specific data the kernel wrote
/// (at most [`HW_INFO_DATA_LEN`] bytes).
pub fn get_hw_info(iommufd: BorrowedFd<'_>, dev_id: u32) -> Result<(IommuHwInfo, Vec<u8>), Errno> {
    let mut data = vec![0u8; HW_INFO_DATA_LEN];
    let mut info = IommuHwInfo {
        size: 40,
        dev_id,
        data_len: HW_INFO_DATA_LEN as u32,
        data_uptr: data.as_mut_ptr() as u64,
        ..Default::default()
    };
    ioctl_struct(iommufd, IOMMU_GET_HW_INFO, &mut info)?;
    data.truncate((info.data_len as usize).min(HW_INFO_DATA_LEN));
    Ok((info, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
    }
}
