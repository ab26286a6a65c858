//! Memory-mapping wrapper for client-provided DMA file descriptors.
//!
//! This is the only file of the `dma` module that contains `unsafe` code. The
//! mapped memory is shared with the client process (the VMM and its guest),
//! which may modify it at any time. We therefore never create Rust references
//! (`&[u8]` / `&mut [u8]`) into the mapping: every access is a raw byte copy
//! between the mapping and a buffer owned by the caller. Concurrent
//! modification by the other side can only produce "torn" data, exactly like a
//! real device racing with the CPU on guest RAM.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, SFlag};
use nix::unistd::{sysconf, SysconfVar};

use super::table::DmaProt;

/// Fallback when `sysconf(_SC_PAGE_SIZE)` is unavailable; a wrong guess only
/// makes `mmap` fail with `EINVAL`, it cannot cause unsound accesses.
const FALLBACK_PAGE_SIZE: u64 = 4096;

/// Largest fd block size we honour as mapping granule (hugetlbfs reports its
/// huge page size here; 1 GiB is the largest common huge page size).
const MAX_GRANULE: u64 = 1 << 30;

/// Errors of [`MappedRegion`].
#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    /// The `mmap` system call failed.
    #[error("failed to map {len:#x} bytes at file offset {offset:#x}")]
    Map {
        /// Requested length.
        len: u64,
        /// Requested (unaligned) file offset.
        offset: u64,
        /// Error returned by the kernel.
        #[source]
        source: Errno,
    },
    /// Inspecting the file descriptor with `fstat` failed.
    #[error("failed to inspect the file descriptor to be mapped")]
    Stat(#[source] Errno),
    /// The requested range extends past the end of the (regular) file;
    /// touching such pages would raise `SIGBUS`.
    #[error("range of {len:#x} bytes at file offset {offset:#x} extends past the end of the file ({file_size:#x} bytes)")]
    BeyondEndOfFile {
        /// Requested length.
        len: u64,
        /// Requested file offset.
        offset: u64,
        /// Size of the file at mapping time.
        file_size: u64,
    },
    /// An access falls (partly) outside the mapped range.
    #[error(
        "access of {len:#x} bytes at offset {offset:#x} is outside the {size:#x}-byte mapping"
    )]
    OutOfBounds {
        /// Offset of the access into the mapping.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Length of the mapping.
        size: u64,
    },
    /// The access needs a permission the mapping was not created with.
    #[error("{} access is not permitted by the mapping's protection", if *write { "write" } else { "read" })]
    AccessDenied {
        /// Whether a write (rather than a read) was attempted.
        write: bool,
    },
    /// A zero-length mapping was requested.
    #[error("cannot map zero bytes")]
    ZeroLength,
    /// Offset or length do not fit the address space after page alignment.
    #[error("length {len:#x} at file offset {offset:#x} overflows after page alignment")]
    LengthOverflow {
        /// Requested length.
        len: u64,
        /// Requested file offset.
        offset: u64,
    },
}

impl MmapError {
    /// The errno to report to the client for this failure.
    pub fn errno(&self) -> Errno {
        match self {
            Self::Map { source, .. } | Self::Stat(source) => *source,
            Self::OutOfBounds { .. } => Errno::EFAULT,
            Self::AccessDenied { .. } => Errno::EPERM,
            Self::BeyondEndOfFile { .. } | Self::ZeroLength | Self::LengthOverflow { .. } => {
                Errno::EINVAL
            }
        }
    }
}

/// System page size, cached.
fn page_size() -> u64 {
    static PAGE_SIZE: OnceLock<u64> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) => u64::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .unwrap_or(FALLBACK_PAGE_SIZE),
        _ => FALLBACK_PAGE_SIZE,
    })
}

/// A `MAP_SHARED` mapping of `len` bytes of a file descriptor starting at an
/// arbitrary file offset.
///
/// Why: DMA_MAP hands us an fd plus an offset that need not be page aligned;
/// the kernel only maps at granule-aligned offsets, so we map from the
/// aligned-down offset and remember the `delta` to the requested start.
///
/// Invariants:
/// - `base` points to a live mapping of exactly `map_len` bytes owned by this
///   value (unmapped in `Drop`, nowhere else);
/// - `delta + len <= map_len`, so `[delta, delta + len)` is inside it;
/// - the mapping was created with at least the protection in `prot`, and
///   accesses are only performed if `prot` allows them;
/// - no Rust reference into the mapping is ever created (raw copies only).
///
/// The mapping stays valid after the caller closes the fd.
#[derive(Debug)]
pub struct MappedRegion {
    base: NonNull<c_void>,
    map_len: usize,
    delta: usize,
    len: u64,
    prot: DmaProt,
}

// SAFETY: `MappedRegion` exclusively owns its mapping (nothing else unmaps it)
// and the pointer is only used for raw byte copies, never to form references.
// A process-wide mapping can be accessed and unmapped from any thread.
unsafe impl Send for MappedRegion {}

// SAFETY: `&MappedRegion` only permits raw copies in and out of the mapping.
// The mapping is shared with another process that may write it concurrently
// anyway, so concurrent copies from several threads add no new hazard: they
// can at worst observe torn bytes, as documented, and never create aliasing
// Rust references.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Map `len` bytes of `fd` starting at file offset `offset` with the
    /// protection `prot`.
    ///
    /// The offset is aligned down to the mapping granule (the system page
    /// size, or the fd's block size if that is a larger power of two, e.g.
    /// hugetlbfs). For regular files the range must lie within the current
    /// file size, because touching pages past end-of-file raises `SIGBUS`.
    /// (A client that shrinks the file afterwards can still cause that; this
    /// is inherent to sharing memory via files.)
    pub fn map(fd: impl AsFd, offset: u64, len: u64, prot: DmaProt) -> Result<Self, MmapError> {
        let fd = fd.as_fd();
        let overflow = || MmapError::LengthOverflow { len, offset };
        let len_nz = NonZeroUsize::new(usize::try_from(len).map_err(|_| overflow())?)
            .ok_or(MmapError::ZeroLength)?;

        let stat = fstat(fd.as_raw_fd()).map_err(MmapError::Stat)?;
        let page = page_size();
        let granule = u64::try_from(stat.st_blksize)
            .ok()
            .filter(|b| b.is_power_of_two() && *b > page && *b <= MAX_GRANULE)
            .unwrap_or(page);

        let file_type = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if file_type == SFlag::S_IFREG {
            let file_size = u64::try_from(stat.st_size).unwrap_or(0);
            let end = offset.checked_add(len).ok_or_else(overflow)?;
            if end > file_size {
                return Err(MmapError::BeyondEndOfFile {
                    len,
                    offset,
                    file_size,
                });
            }
        }

        let delta64 = offset % granule;
        let aligned_offset = offset - delta64;
        let file_offset = i64::try_from(aligned_offset).map_err(|_| overflow())?;
        let delta = usize::try_from(delta64).map_err(|_| overflow())?;
        let unrounded = delta.checked_add(len_nz.get()).ok_or_else(overflow)?;
        let granule_usize = usize::try_from(granule).map_err(|_| overflow())?;
        let map_len = unrounded
            .checked_next_multiple_of(granule_usize)
            .filter(|l| isize::try_from(*l).is_ok())
            .and_then(NonZeroUsize::new)
            .ok_or_else(overflow)?;

        let mut prot_flags = ProtFlags::PROT_NONE;
        if prot.read {
            prot_flags |= ProtFlags::PROT_READ;
        }
        if prot.write {
            prot_flags |= ProtFlags::PROT_WRITE;
        }

        // SAFETY: we request a fresh mapping at a kernel-chosen address
        // (`addr` is `None`), so no existing memory is replaced. The result is
        // owned by the returned `MappedRegion` and only accessed via raw
        // copies within `[delta, delta + len)`, which lies inside `map_len`.
        let base = unsafe {
            mmap(
                None,
                map_len,
                prot_flags,
                MapFlags::MAP_SHARED,
                fd,
                file_offset,
            )
        }
        .map_err(|source| MmapError::Map {
            len,
            offset,
            source,
        })?;

        Ok(Self {
            base,
            map_len: map_len.get(),
            delta,
            len,
            prot,
        })
    }

    /// Length in bytes of the usable range (the `len` passed to [`Self::map`]).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: zero-length mappings are rejected by [`Self::map`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Validate an access of `count` bytes at `offset` and return a pointer
    /// to its first byte inside the mapping.
    fn checked_ptr(&self, offset: u64, count: usize, write: bool) -> Result<*mut u8, MmapError> {
        let allowed = if write {
            self.prot.write
        } else {
            self.prot.read
        };
        if !allowed {
            return Err(MmapError::AccessDenied { write });
        }
        let count64 = u64::try_from(count).unwrap_or(u64::MAX);
        let oob = MmapError::OutOfBounds {
            offset,
            len: count64,
            size: self.len,
        };
        match offset.checked_add(count64) {
            Some(end) if end <= self.len => {}
            _ => return Err(oob),
        }
        // `offset < len <= map_len - delta`, so this stays inside the mapping
        // and fits usize (the mapping size does).
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(self.delta))
            .ok_or(oob)?;
        Ok(self.base.as_ptr().cast::<u8>().wrapping_add(start))
    }

    /// Copy `buf.len()` bytes starting at `offset` (relative to the
    /// requested file offset) out of the mapping.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MmapError> {
        let src = self.checked_ptr(offset, buf.len(), false)?;
        // SAFETY: `checked_ptr` verified that `[src, src + buf.len())` lies
        // inside our live, readable mapping; `buf` is a distinct allocation
        // owned by the caller, so the ranges do not overlap. No reference to
        // the mapped memory is created.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copy `data` into the mapping starting at `offset` (relative to the
    /// requested file offset).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), MmapError> {
        let dst = self.checked_ptr(offset, data.len(), true)?;
        // SAFETY: `checked_ptr` verified that `[dst, dst + data.len())` lies
        // inside our live, writable mapping; `data` is a distinct allocation
        // owned by the caller, so the ranges do not overlap. No reference to
        // the mapped memory is created.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` describe the mapping created in `map`,
        // which is owned by `self` and unmapped only here; no references into
        // it exist (we only ever made raw copies).
        if let Err(errno) = unsafe { munmap(self.base, self.map_len) } {
            tracing::warn!(%errno, len = self.map_len, "munmap of DMA region failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use nix::sys::uio::{pread, pwrite};
    use nix::unistd::ftruncate;
    use std::os::fd::OwnedFd;

    const RW: DmaProt = DmaProt {
        read: true,
        write: true,
    };

    fn memfd(size: i64) -> OwnedFd {
        let fd = memfd_create(c"vfud-dma-test", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
        ftruncate(&fd, size).expect("ftruncate");
        fd
    }

    #[test]
    fn round_trip_unaligned_offset() {
        let fd = memfd(3 * 4096);
        let offset = 4096 + 123;
        let region = MappedRegion::map(&fd, offset, 1000, RW).expect("map");
        assert_eq!(region.len(), 1000);

        region.write_at(10, b"hello dma").expect("write");
        let mut back = [0u8; 9];
        let n = pread(&fd, &mut back, i64::try_from(offset).unwrap() + 10).expect("pread");
        assert_eq!(n, 9);
        assert_eq!(&back, b"hello dma");

        pwrite(&fd, b"from file", i64::try_from(offset).unwrap() + 500).expect("pwrite");
        let mut buf = [0u8; 9];
        region.read_at(500, &mut buf).expect("read");
        assert_eq!(&buf, b"from file");

        // Last byte is accessible, one past is not.
        region.write_at(999, &[7]).expect("last byte");
        assert!(matches!(
            region.write_at(999, &[7, 7]),
            Err(MmapError::OutOfBounds { .. })
        ));
        assert!(matches!(
            region.read_at(u64::MAX, &mut [0u8; 2]),
            Err(MmapError::OutOfBounds { .. })
        ));
        // Empty accesses at the end are fine.
        region.read_at(1000, &mut []).expect("empty read");
    }

    #[test]
    fn rejects_bad_arguments() {
        let fd = memfd(4096);
        assert!(matches!(
            MappedRegion::map(&fd, 0, 0, RW),
            Err(MmapError::ZeroLength)
        ));
        assert!(matches!(
            MappedRegion::map(&fd, u64::MAX, 2, RW),
            Err(MmapError::LengthOverflow { .. })
        ));
        assert!(matches!(
            MappedRegion::map(&fd, 100, 4096, RW),
            Err(MmapError::BeyondEndOfFile { .. })
        ));
        assert_eq!(
            MappedRegion::map(&fd, 100, 4096, RW).unwrap_err().errno(),
            Errno::EINVAL
        );
    }

    #[test]
    fn enforces_protection() {
        let fd = memfd(4096);
        let ro = DmaProt {
            read: true,
            write: false,
        };
        let region = MappedRegion::map(&fd, 0, 4096, ro).expect("map");
        let mut buf = [0u8; 4];
        region.read_at(0, &mut buf).expect("read");
        assert!(matches!(
            region.write_at(0, &buf),
            Err(MmapError::AccessDenied { write: true })
        ));
    }
}
