//! Guest memory for the embedded vIOMMU models: the `viommu` device's own DMA map table.
//!
//! The models walk tables and process queues synchronously, so they can only reach memory the
//! client shared by file descriptor ([`GuestMemory::read_now`]); a region mapped without an fd
//! (message DMA) makes the access fail, which the model turns into its architectural abort
//! (a VT-d fault, an SMMUv3 F_WALK_EABT / GERROR.CMDQ_ABT). Unifying the models' two memory
//! traits would touch both models' generic code; two small adapters over one type cost less.

use crate::dma::GuestMemory;

use super::{smmuv3, vtd};

/// The memory a model call may use: the client's, or none while no client is attached (every
/// access fails).
#[derive(Debug, Clone, Copy)]
pub struct ModelMemory<'a>(pub Option<&'a GuestMemory>);

impl ModelMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.0.is_some_and(|m| m.read_now(addr, buf).is_ok())
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.0.is_some_and(|m| m.write_now(addr, data).is_ok())
    }
}

impl vtd::GuestMemoryAccess for ModelMemory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vtd::GuestMemoryError> {
        if ModelMemory::read(self, gpa, buf) {
            return Ok(());
        }
        Err(vtd::GuestMemoryError {
            gpa,
            len: buf.len() as u64,
        })
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), vtd::GuestMemoryError> {
        if ModelMemory::write(self, gpa, data) {
            return Ok(());
        }
        Err(vtd::GuestMemoryError {
            gpa,
            len: data.len() as u64,
        })
    }
}

impl smmuv3::GuestMemory for ModelMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), smmuv3::GuestMemoryError> {
        if ModelMemory::read(self, addr, buf) {
            return Ok(());
        }
        Err(smmuv3::GuestMemoryError::Unmapped {
            addr,
            len: buf.len(),
        })
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), smmuv3::GuestMemoryError> {
        if ModelMemory::write(self, addr, data) {
            return Ok(());
        }
        Err(smmuv3::GuestMemoryError::Unmapped {
            addr,
            len: data.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dma::{DmaBacking, DmaProt, DmaRegion};

    #[test]
    fn fd_backed_memory_is_reached_and_message_memory_fails() {
        let memory = Arc::new(GuestMemory::new(8));
        let fd = nix::sys::memfd::memfd_create(
            c"model-memory",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, 0x2000).unwrap();
        let rw = DmaProt {
            read: true,
            write: true,
        };
        memory.with_table(|t| {
            let region = t.map_fd(0x10_0000, 0x2000, rw, &fd, 0).unwrap();
            t.insert(region).unwrap();
            t.insert(DmaRegion::new(0x20_0000, 0x1000, rw, DmaBacking::Message))
                .unwrap();
        });
        let mut m = ModelMemory(Some(&memory));
        vtd::GuestMemoryAccess::write(&mut m, 0x10_1ff8, &7u64.to_le_bytes()).unwrap();
        assert_eq!(vtd::read_u64(&m, 0x10_1ff8), Ok(7));
        let mut b = [0u8; 8];
        smmuv3::GuestMemory::read(&m, 0x10_1ff8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 7);
        // Past the end, message-backed, and without a client: all fail.
        assert!(smmuv3::GuestMemory::read(&m, 0x10_1ffc, &mut b).is_err());
        assert!(smmuv3::GuestMemory::read(&m, 0x20_0000, &mut b).is_err());
        assert!(smmuv3::GuestMemory::write(&m, 0x20_0000, &b).is_err());
        assert!(smmuv3::GuestMemory::read(&ModelMemory(None), 0x10_0000, &mut b).is_err());
    }
}
