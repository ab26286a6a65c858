//! A fake [`HostKernel`] for unit tests: a PCIe device with ATS at 0x100, MSI-X in BAR4 and a
//! readable BAR4, an IOAS that records maps, and injectable failures. Never opens /dev.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::kernel::{HostHwInfo, HostIommuHwInfo, HostKernel, KernelRegion};
use super::vfio_sys::*;

/// Region `i` lives at `i << 40` in the device fd, like vfio-pci.
pub fn region_offset(index: u32) -> u64 {
    u64::from(index) << 40
}

pub const BAR4_SIZE: u64 = 0x4000;

/// What the fake saw and will answer.
#[derive(Debug)]
pub struct FakeState {
    pub fail_bind: Option<Errno>,
    pub hw_info: Result<HostHwInfo, Errno>,
    pub fail_map_file: Option<Errno>,
    pub fail_map_user: Option<Errno>,
    pub fail_unmap: Option<Errno>,
    pub msix_mappable: bool,
    pub sparse_areas: Option<Vec<(u64, u64)>>,
    /// Device-fd bytes per region base.
    pub memory: BTreeMap<u64, Vec<u8>>,
    /// (how, iova, length, flags) of every successful map.
    pub maps: Vec<(&'static str, u64, u64, u32)>,
    /// (iova, length) of every unmap.
    pub unmaps: Vec<(u64, u64)>,
    /// (flags, index, start, count, data) of every SET_IRQS.
    pub set_irqs: Vec<(u32, u32, u32, u32, Vec<u8>)>,
    pub resets: usize,
    /// Config-space writes: (offset, bytes).
    pub config_writes: Vec<(u64, Vec<u8>)>,
}

/// A device config space: a PCIe endpoint with MSI-X (table in BAR4 at 0x3000, PBA at
/// 0x3800) and ATS as the first extended capability.
pub fn device_config() -> Vec<u8> {
    let mut c = vec![0u8; 4096];
    c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x1041u16.to_le_bytes());
    c[6] = 0x10; // status: capability list
    c[0x34] = 0x40;
    // PCIe capability at 0x40 (endpoint, version 2), next 0x80.
    c[0x40] = 0x10;
    c[0x41] = 0x80;
    c[0x42] = 0x02;
    // MSI-X at 0x80: 1 vector, table BIR 4 offset 0x3000, PBA BIR 4 offset 0x3800.
    c[0x80] = 0x11;
    c[0x81] = 0x00;
    c[0x84..0x88].copy_from_slice(&(0x3000u32 | 4).to_le_bytes());
    c[0x88..0x8c].copy_from_slice(&(0x3800u32 | 4).to_le_bytes());
    // ATS at 0x100, version 1, end of chain.
    c[0x100..0x104].copy_from_slice(&(0x000fu32 | 1 << 16).to_le_bytes());
    c
}

impl Default for FakeState {
    fn default() -> FakeState {
        let mut memory = BTreeMap::new();
        memory.insert(region_offset(VFIO_PCI_CONFIG_REGION_INDEX), device_config());
        memory.insert(region_offset(4), (0..BAR4_SIZE).map(|i| i as u8).collect());
        FakeState {
            fail_bind: None,
            hw_info: Ok(HostHwInfo {
                capabilities: 0,
                max_pasid_log2: 0,
                iommu: HostIommuHwInfo::IntelVtd {
                    flags: 0,
                    cap_reg: 0x00d2_008c_2226_0206,
                    ecap_reg: 0x00f0_0f5e,
                },
            }),
            fail_map_file: None,
            fail_map_user: None,
            fail_unmap: None,
            msix_mappable: false,
            sparse_areas: None,
            memory,
            maps: Vec::new(),
            unmaps: Vec::new(),
            set_irqs: Vec::new(),
            resets: 0,
            config_writes: Vec::new(),
        }
    }
}

/// The fake kernel; tests keep a clone of `state` to inspect and steer it.
#[derive(Debug, Clone)]
pub struct FakeKernel {
    pub state: Arc<Mutex<FakeState>>,
    fd: Arc<OwnedFd>,
}

impl FakeKernel {
    pub fn new(state: FakeState) -> FakeKernel {
        FakeKernel {
            state: Arc::new(Mutex::new(state)),
            fd: Arc::new(
                memfd_create(c"vfud-fake-vfio", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd"),
            ),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().expect("fake state"))
    }

    fn locate(s: &FakeState, offset: u64, len: usize) -> Result<(u64, usize), Errno> {
        let (&base, bytes) = s.memory.range(..=offset).next_back().ok_or(Errno::EINVAL)?;
        let at = (offset - base) as usize;
        if at + len > bytes.len() {
            return Err(Errno::EINVAL);
        }
        Ok((base, at))
    }
}

impl HostKernel for FakeKernel {
    fn bind(&self) -> Result<u32, Errno> {
        self.with(|s| s.fail_bind.map_or(Ok(7), Err))
    }

    fn alloc_ioas(&self) -> Result<u32, Errno> {
        Ok(2)
    }

    fn attach(&self, ioas_id: u32) -> Result<(), Errno> {
        assert_eq!(ioas_id, 2, "attach to the allocated IOAS");
        Ok(())
    }

    fn hw_info(&self, dev_id: u32) -> Result<HostHwInfo, Errno> {
        assert_eq!(dev_id, 7, "hw_info of the bound device");
        self.with(|s| s.hw_info)
    }

    fn device_info(&self) -> Result<(u32, u32, u32), Errno> {
        Ok((VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET, 9, 5))
    }

    fn region_info(&self, index: u32) -> Result<KernelRegion, Errno> {
        self.with(|s| match index {
            4 => Ok(KernelRegion {
                flags: VFIO_REGION_INFO_FLAG_READ
                    | VFIO_REGION_INFO_FLAG_WRITE
                    | VFIO_REGION_INFO_FLAG_MMAP,
                size: BAR4_SIZE,
                offset: region_offset(4),
                sparse_areas: s.sparse_areas.clone(),
                msix_mappable: s.msix_mappable,
            }),
            VFIO_PCI_CONFIG_REGION_INDEX => Ok(KernelRegion {
                flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                size: 4096,
                offset: region_offset(index),
                ..Default::default()
            }),
            8 => Err(Errno::EINVAL),
            _ => Ok(KernelRegion {
                offset: region_offset(index),
                ..Default::default()
            }),
        })
    }

    fn irq_info(&self, index: u32) -> Result<(u32, u32), Errno> {
        Ok(match index {
            0 => (1 | 2 | 4, 1),
            2 => (1 | 8, 1),
            3 | 4 => (1, 1),
            _ => (1, 0),
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.with(|s| {
            let (base, at) = Self::locate(s, offset, buf.len())?;
            buf.copy_from_slice(&s.memory[&base][at..at + buf.len()]);
            Ok(())
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.with(|s| {
            let (base, at) = Self::locate(s, offset, data.len())?;
            if base == region_offset(VFIO_PCI_CONFIG_REGION_INDEX) {
                s.config_writes.push((at as u64, data.to_vec()));
            }
            s.memory.get_mut(&base).expect("located")[at..at + data.len()].copy_from_slice(data);
            Ok(())
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
        self.with(|s| s.set_irqs.push((flags, index, start, count, data.to_vec())));
        Ok(())
    }

    fn reset(&self) -> Result<(), Errno> {
        self.with(|s| s.resets += 1);
        Ok(())
    }

    fn map_file(
        &self,
        _ioas_id: u32,
        fd: BorrowedFd<'_>,
        _start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        assert!(fd.as_raw_fd() >= 0);
        self.with(|s| match s.fail_map_file {
            Some(e) => Err(e),
            None => {
                s.maps.push(("file", iova, length, flags));
                Ok(())
            }
        })
    }

    fn map_user(
        &self,
        _ioas_id: u32,
        user_va: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        assert_ne!(user_va, 0);
        self.with(|s| match s.fail_map_user {
            Some(e) => Err(e),
            None => {
                s.maps.push(("user", iova, length, flags));
                Ok(())
            }
        })
    }

    fn unmap(&self, _ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        if let Some(errno) = self.with(|s| s.fail_unmap) {
            return Err(errno);
        }
        self.with(|s| s.unmaps.push((iova, length)));
        Ok(length)
    }

    fn mmap_fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.fd)
    }
}
