//! Guest memory reached with `pread`/`pwrite` on the client's fd instead of a mapping.
//!
//! Why: a client can shrink an fd it handed us (`ftruncate`) at any time. Touching a mapping of
//! the truncated part raises SIGBUS and would kill the daemon with every device in it, while
//! `pread`/`pwrite` just come up short. So an fd is only accessed through a mapping when it is
//! sealed against shrinking (`F_SEAL_SHRINK`, which QEMU's memfd backend sets); any other fd is
//! accessed through this type.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;

use super::table::DmaProt;

/// Why a file-backed access failed.
#[derive(Debug, thiserror::Error)]
pub enum FileRegionError {
    #[error("duplicating the DMA fd failed")]
    Dup(#[source] Errno),
    #[error("querying the DMA fd's size failed")]
    Stat(#[source] Errno),
    #[error("range {offset:#x}+{len:#x} is beyond the end of the {file_size:#x}-byte file")]
    BeyondEndOfFile {
        offset: u64,
        len: u64,
        file_size: u64,
    },
    #[error("{len:#x}-byte access at {offset:#x} is outside the {size:#x}-byte region")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("the region does not allow {0}")]
    AccessDenied(&'static str),
    #[error("reading or writing the DMA fd failed")]
    Io(#[source] Errno),
    #[error("the client shrank the file under a live DMA map")]
    Shrunk,
}

/// `[offset, offset + len)` of a file, accessed with positioned reads and writes.
#[derive(Debug)]
pub struct FileRegion {
    fd: OwnedFd,
    offset: u64,
    len: u64,
    prot: DmaProt,
}

impl FileRegion {
    /// Checks the range against the file's current size and keeps a duplicate of the fd.
    pub fn new(
        fd: impl AsFd,
        offset: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<FileRegion, FileRegionError> {
        let fd = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| FileRegionError::Dup(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(FileRegionError::Stat)?;
        let file_size = u64::try_from(st.st_size).unwrap_or(0);
        let is_regular = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG;
        let end = offset.checked_add(len);
        if is_regular && end.is_none_or(|e| e > file_size) {
            return Err(FileRegionError::BeyondEndOfFile {
                offset,
                len,
                file_size,
            });
        }
        Ok(FileRegion {
            fd,
            offset,
            len,
            prot,
        })
    }

    fn position(&self, at: u64, n: usize) -> Result<i64, FileRegionError> {
        let n = n as u64;
        match at.checked_add(n) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(FileRegionError::OutOfBounds {
                    offset: at,
                    len: n,
                    size: self.len,
                })
            }
        }
        i64::try_from(self.offset + at).map_err(|_| FileRegionError::Io(Errno::EOVERFLOW))
    }

    /// Reads `buf.len()` bytes at `at` (relative to the region).
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<(), FileRegionError> {
        if !self.prot.read {
            return Err(FileRegionError::AccessDenied("reads"));
        }
        let mut pos = self.position(at, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match nix::sys::uio::pread(&self.fd, &mut buf[done..], pos) {
                Ok(0) => return Err(FileRegionError::Shrunk),
                Ok(n) => {
                    done += n;
                    pos += n as i64;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(FileRegionError::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes `data` at `at` (relative to the region). Never grows the file: a write that
    /// would land past the current end is refused as [`FileRegionError::Shrunk`].
    pub fn write_at(&self, at: u64, data: &[u8]) -> Result<(), FileRegionError> {
        if !self.prot.write {
            return Err(FileRegionError::AccessDenied("writes"));
        }
        let mut pos = self.position(at, data.len())?;
        let st = nix::sys::stat::fstat(self.fd.as_raw_fd()).map_err(FileRegionError::Stat)?;
        let is_regular = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG;
        if is_regular
            && (pos as u64).saturating_add(data.len() as u64)
                > u64::try_from(st.st_size).unwrap_or(0)
        {
            return Err(FileRegionError::Shrunk);
        }
        let mut done = 0;
        while done < data.len() {
            match nix::sys::uio::pwrite(&self.fd, &data[done..], pos) {
                Ok(0) => return Err(FileRegionError::Shrunk),
                Ok(n) => {
                    done += n;
                    pos += n as i64;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(FileRegionError::Io(e)),
            }
        }
        Ok(())
    }

    /// Length of the region.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: zero-length maps are refused before one is built.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Whether the fd is sealed against shrinking, so a mapping of it can never SIGBUS.
pub fn sealed_against_shrink(fd: impl AsFd) -> bool {
    use std::os::fd::AsRawFd;
    nix::fcntl::fcntl(fd.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
        .map(|s| {
            nix::fcntl::SealFlag::from_bits_truncate(s)
                .contains(nix::fcntl::SealFlag::F_SEAL_SHRINK)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    const RW: DmaProt = DmaProt {
        read: true,
        write: true,
    };

    #[test]
    fn shrinking_the_file_fails_accesses_instead_of_faulting() {
        let fd = memfd_create(c"t", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, 0x2000).unwrap();
        assert!(!sealed_against_shrink(&fd));
        let r = FileRegion::new(&fd, 0x1000, 0x1000, RW).unwrap();
        r.write_at(0x10, b"abc").unwrap();
        let mut b = [0u8; 3];
        r.read_at(0x10, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        nix::unistd::ftruncate(&fd, 0).unwrap();
        assert!(matches!(
            r.read_at(0x10, &mut b),
            Err(FileRegionError::Shrunk)
        ));
        assert!(matches!(
            r.write_at(0x10, b"abc"),
            Err(FileRegionError::Shrunk)
        ));
        assert_eq!(
            nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_size,
            0,
            "a write must not regrow the file"
        );
        assert!(
            FileRegion::new(&fd, 0, 0x1000, RW).is_err(),
            "beyond the end at map time"
        );
        assert!(matches!(
            r.read_at(0xfff, &mut b),
            Err(FileRegionError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn seal_detection() {
        let fd = memfd_create(c"t", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap();
        use std::os::fd::AsRawFd;
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK),
        )
        .unwrap();
        assert!(sealed_against_shrink(&fd));
    }
}
