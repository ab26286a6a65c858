//! Memory-mapping wrapper for client-provided DMA file descriptors.
//!
//! This is the only file of the `dma` module that contains `unsafe` code, and only `mmap` and
//! `munmap` are unsafe here. The mapped memory is shared with the client process (the VMM and
//! its guest), which may modify it, or shrink the file under it, at any time. So we never touch
//! the mapping with loads and stores at all: every access is a `process_vm_readv` /
//! `process_vm_writev` on our own pid. The kernel copies through the page tables and answers
//! `EFAULT` where a load or store would have raised SIGBUS (a truncated memfd, a hole punched in a
//! hugetlbfs file), so no client can kill the daemon through its memory. It also works for every
//! file type (hugetlbfs refuses `pwrite`), and no Rust reference into the mapping ever exists.
//!
//! One [`MappedFile`] maps a whole backing file once per connection ([`MappingCache`]); each
//! DMA_MAP is a [`MappedRegion`] view into it. This bounds the mappings (and holds no fds: the
//! mapping keeps the file alive) however many DMA_MAPs a client sends, so one client cannot
//! exhaust the process's fd table or map count and take the other devices down. Only when the
//! device asks for it ([`MappingCache::set_keep_files`], a host device that hands files to
//! IOMMU_IOAS_MAP_FILE) does each mapped file keep one duplicate of the client's fd, still
//! bounded by the cache's file limit.

use std::collections::HashMap;
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock, Weak};

use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, SFlag};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::{sysconf, Pid, SysconfVar};

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
    /// The kernel refused the copy: the client shrank the file or punched a hole under a
    /// live map.
    #[error("copying {len:#x} bytes at offset {offset:#x} of the mapping failed")]
    Access {
        /// Offset of the access into the region.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Error returned by the kernel (EFAULT for vanished pages).
        #[source]
        source: Errno,
    },
    /// The connection already holds as many file mappings as allowed.
    #[error("the client already has {max} file mappings for DMA (distinct files, grown files and device files each count)")]
    TooManyFiles {
        /// The limit.
        max: usize,
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
            Self::Access { .. } => Errno::EFAULT,
            Self::TooManyFiles { .. } => Errno::ENOSPC,
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

/// One `MAP_SHARED` mapping of a file descriptor, from a granule-aligned file offset.
///
/// Invariants: `base` points to a live mapping of exactly `map_len` bytes owned by this value
/// (unmapped in `Drop`, nowhere else); it maps file offsets `[file_start, file_start + map_len)`;
/// it was created readable, and writable iff `writable`. Nothing ever loads from or stores to it
/// directly (see the module documentation).
#[derive(Debug)]
pub struct MappedFile {
    base: NonNull<c_void>,
    map_len: usize,
    file_start: u64,
    writable: bool,
    /// A duplicate of the mapped fd, kept only for caches that keep files (and None if
    /// duplicating failed: the fd table is full).
    fd: Option<std::os::fd::OwnedFd>,
}

// SAFETY: `MappedFile` exclusively owns its mapping (only `Drop` unmaps it) and the address is
// only handed to the kernel in process_vm_readv/writev; a process-wide mapping can be used and
// unmapped from any thread.
unsafe impl Send for MappedFile {}

// SAFETY: `&MappedFile` only allows kernel-mediated copies, which are safe to run concurrently
// (the other process races with them anyway, like a device with a CPU), and no reference into
// the mapping is ever formed.
unsafe impl Sync for MappedFile {}

/// Granule of `fd`'s mappings: the page size, or the fd's block size when that is a larger power
/// of two (hugetlbfs reports its huge page size there).
fn granule(stat: &nix::sys::stat::FileStat) -> u64 {
    let page = page_size();
    u64::try_from(stat.st_blksize)
        .ok()
        .filter(|b| b.is_power_of_two() && *b > page && *b <= MAX_GRANULE)
        .unwrap_or(page)
}

impl MappedFile {
    /// Maps file offsets `[offset, offset + len)` of `fd` (rounded out to the granule), writable
    /// if the fd allows it, else read-only.
    fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        granule: u64,
        keep_fd: bool,
    ) -> Result<MappedFile, MmapError> {
        let overflow = || MmapError::LengthOverflow { len, offset };
        if len == 0 {
            return Err(MmapError::ZeroLength);
        }
        let file_start = offset - offset % granule;
        let end = offset.checked_add(len).ok_or_else(overflow)?;
        let map_len = end
            .checked_next_multiple_of(granule)
            .map(|e| e - file_start)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|l| isize::try_from(*l).is_ok())
            .and_then(NonZeroUsize::new)
            .ok_or_else(overflow)?;
        let file_offset = i64::try_from(file_start).map_err(|_| overflow())?;
        let mut last = Errno::EINVAL;
        for writable in [true, false] {
            let prot = if writable {
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
            } else {
                ProtFlags::PROT_READ
            };
            // SAFETY: a fresh mapping at a kernel-chosen address (`addr` is None) replaces no
            // existing memory; the result is owned by the returned value and only ever used as
            // an address for process_vm_readv/writev.
            match unsafe { mmap(None, map_len, prot, MapFlags::MAP_SHARED, fd, file_offset) } {
                Ok(base) => {
                    return Ok(MappedFile {
                        base,
                        map_len: map_len.get(),
                        file_start,
                        writable,
                        fd: keep_fd.then(|| fd.try_clone_to_owned().ok()).flatten(),
                    })
                }
                // A read-only fd refuses a writable shared mapping; retry read-only.
                Err(Errno::EACCES) if writable => last = Errno::EACCES,
                Err(source) => {
                    return Err(MmapError::Map {
                        len,
                        offset,
                        source,
                    })
                }
            }
        }
        Err(MmapError::Map {
            len,
            offset,
            source: last,
        })
    }

    /// Whether file offsets `[offset, offset + len)` lie inside this mapping.
    fn covers(&self, offset: u64, len: u64) -> bool {
        offset >= self.file_start
            && offset
                .checked_add(len)
                .is_some_and(|end| end - self.file_start <= self.map_len as u64)
    }

    /// Address of file offset `offset` (which [`Self::covers`] accepted).
    fn address(&self, offset: u64) -> usize {
        self.base.as_ptr() as usize + (offset - self.file_start) as usize
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` describe the mapping created in `map`, owned by `self` and
        // unmapped only here; nothing holds its address any more (regions keep an Arc to us).
        if let Err(errno) = unsafe { munmap(self.base, self.map_len) } {
            tracing::warn!(%errno, len = self.map_len, "munmap of DMA region failed");
        }
    }
}

/// The mappings of one connection, one per backing file, so any number of DMA_MAPs of the same
/// file (QEMU sends several per RAM block) share one mapping and hold no fd.
#[derive(Debug)]
pub struct MappingCache {
    files: HashMap<(u64, u64), Weak<MappedFile>>,
    /// Every mapping still alive: the current one of each file, the older whole-file mappings
    /// of a file that grew (their regions keep them), and those of non-regular files. All of
    /// them count against `max_files`, so neither a growing memfd nor a stream of device fds
    /// can pile up mappings (and, with `keep_files`, fds) past the limit.
    live: Vec<Weak<MappedFile>>,
    max_files: usize,
    keep_files: bool,
}

impl MappingCache {
    /// A cache allowing at most `max_files` distinct backing files at once.
    pub fn new(max_files: usize) -> MappingCache {
        MappingCache {
            files: HashMap::new(),
            live: Vec::new(),
            max_files,
            keep_files: false,
        }
    }

    /// Refuses a new mapping when `max_files` are alive already.
    fn check_room(&mut self) -> Result<(), MmapError> {
        self.live.retain(|w| w.strong_count() > 0);
        if self.live.len() >= self.max_files {
            return Err(MmapError::TooManyFiles {
                max: self.max_files,
            });
        }
        Ok(())
    }

    fn track(&mut self, file: &Arc<MappedFile>) {
        self.live.push(Arc::downgrade(file));
    }

    /// From now on, each newly mapped file keeps a duplicate of its fd so that
    /// [`MappedRegion::backing_file`] can hand it out (to IOMMU_IOAS_MAP_FILE).
    pub fn set_keep_files(&mut self, keep: bool) {
        self.keep_files = keep;
    }

    /// Distinct backing files currently mapped.
    pub fn len(&self) -> usize {
        self.files.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Whether no file is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A DMA map: `len` bytes of a client file from file offset `offset`, as a view into a shared
/// [`MappedFile`], with the protection the client granted.
#[derive(Debug)]
pub struct MappedRegion {
    file: Arc<MappedFile>,
    offset: u64,
    len: u64,
    prot: DmaProt,
}

impl MappedRegion {
    /// Maps `len` bytes of `fd` from file offset `offset` (any alignment) on its own, without
    /// sharing. For regular files the range must lie within the current file size.
    pub fn map(fd: impl AsFd, offset: u64, len: u64, prot: DmaProt) -> Result<Self, MmapError> {
        let fd = fd.as_fd();
        let stat = Self::check(fd, offset, len, prot)?;
        let file = MappedFile::map(fd, offset, len, granule(&stat), false)?;
        Self::view(Arc::new(file), offset, len, prot)
    }

    /// Like [`Self::map`], but reuses the connection's mapping of the same file when it covers
    /// the range. A regular file is mapped whole, so every later map of it is a view.
    pub fn map_shared(
        cache: &mut MappingCache,
        fd: impl AsFd,
        offset: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<Self, MmapError> {
        let fd = fd.as_fd();
        let stat = Self::check(fd, offset, len, prot)?;
        let regular = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG;
        if !regular {
            cache.check_room()?;
            let file = Arc::new(MappedFile::map(
                fd,
                offset,
                len,
                granule(&stat),
                cache.keep_files,
            )?);
            cache.track(&file);
            return Self::view(file, offset, len, prot);
        }
        let key = (stat.st_dev, stat.st_ino);
        cache.files.retain(|_, w| w.strong_count() > 0);
        if let Some(file) = cache.files.get(&key).and_then(Weak::upgrade) {
            if file.covers(offset, len)
                && (file.writable || !prot.write)
                && (file.fd.is_some() || !cache.keep_files)
            {
                return Self::view(file, offset, len, prot);
            }
        } else if cache.files.len() >= cache.max_files {
            return Err(MmapError::TooManyFiles {
                max: cache.max_files,
            });
        }
        // New file, or one that grew past (or is more writable than) its current mapping:
        // map it whole. Regions of the old mapping keep it alive until they go.
        cache.check_room()?;
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        let file = Arc::new(MappedFile::map(
            fd,
            0,
            file_size,
            granule(&stat),
            cache.keep_files,
        )?);
        cache.files.insert(key, Arc::downgrade(&file));
        cache.track(&file);
        Self::view(file, offset, len, prot)
    }

    /// Validates arguments against the file: non-empty, no overflow, inside a regular file.
    fn check(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<nix::sys::stat::FileStat, MmapError> {
        let _ = prot;
        if len == 0 {
            return Err(MmapError::ZeroLength);
        }
        let end = offset
            .checked_add(len)
            .ok_or(MmapError::LengthOverflow { len, offset })?;
        if usize::try_from(len).is_err() {
            return Err(MmapError::LengthOverflow { len, offset });
        }
        let stat = fstat(fd.as_raw_fd()).map_err(MmapError::Stat)?;
        let regular = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG;
        if regular {
            let file_size = u64::try_from(stat.st_size).unwrap_or(0);
            if end > file_size {
                return Err(MmapError::BeyondEndOfFile {
                    len,
                    offset,
                    file_size,
                });
            }
        }
        Ok(stat)
    }

    fn view(
        file: Arc<MappedFile>,
        offset: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<Self, MmapError> {
        if prot.write && !file.writable {
            return Err(MmapError::AccessDenied { write: true });
        }
        Ok(MappedRegion {
            file,
            offset,
            len,
            prot,
        })
    }

    /// The backing file and the file offset of the region's first byte, for a host device
    /// that maps the file into its IOMMU (IOMMU_IOAS_MAP_FILE); None if no fd was kept.
    pub fn backing_file(&self) -> Option<(BorrowedFd<'_>, u64)> {
        self.file.fd.as_ref().map(|fd| (fd.as_fd(), self.offset))
    }

    /// The address of the region's first byte in this process: the mapping lives as long as
    /// `self`, so a host device may have the kernel pin it (IOMMU_IOAS_MAP) until it unmaps
    /// the region. Never dereferenced here.
    pub fn user_address(&self) -> u64 {
        self.file.address(self.offset) as u64
    }

    /// Length in bytes of the region (the `len` it was mapped with).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: zero-length maps are rejected.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks an access of `count` bytes at `at` (relative to the region) and returns the
    /// address of its first byte.
    fn checked_address(&self, at: u64, count: usize, write: bool) -> Result<usize, MmapError> {
        let allowed = if write {
            self.prot.write
        } else {
            self.prot.read
        };
        if !allowed {
            return Err(MmapError::AccessDenied { write });
        }
        let count64 = count as u64;
        let oob = MmapError::OutOfBounds {
            offset: at,
            len: count64,
            size: self.len,
        };
        match at.checked_add(count64) {
            Some(end) if end <= self.len => {}
            _ => return Err(oob),
        }
        // offset + len was checked against the file when mapping, so this cannot overflow.
        let file_offset = self.offset + at;
        if !self.file.covers(file_offset, count64) {
            return Err(oob);
        }
        Ok(self.file.address(file_offset))
    }

    /// Copies `buf.len()` bytes at `at` (relative to the region) out of guest memory.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<(), MmapError> {
        if buf.is_empty() {
            return self.checked_address(at, 0, false).map(|_| ());
        }
        let base = self.checked_address(at, buf.len(), false)?;
        let len = buf.len();
        let remote = [RemoteIoVec { base, len }];
        let mut local = [std::io::IoSliceMut::new(buf)];
        self.finish(at, len, process_vm_readv(Pid::this(), &mut local, &remote))
    }

    /// Copies `data` into guest memory at `at` (relative to the region).
    pub fn write_at(&self, at: u64, data: &[u8]) -> Result<(), MmapError> {
        if data.is_empty() {
            return self.checked_address(at, 0, true).map(|_| ());
        }
        let base = self.checked_address(at, data.len(), true)?;
        let remote = [RemoteIoVec {
            base,
            len: data.len(),
        }];
        let local = [std::io::IoSlice::new(data)];
        self.finish(
            at,
            data.len(),
            process_vm_writev(Pid::this(), &local, &remote),
        )
    }

    fn finish(&self, at: u64, len: usize, copied: Result<usize, Errno>) -> Result<(), MmapError> {
        match copied {
            Ok(n) if n == len => Ok(()),
            // A short copy means the pages after `n` vanished.
            Ok(_) => Err(MmapError::Access {
                offset: at,
                len: len as u64,
                source: Errno::EFAULT,
            }),
            Err(source) => Err(MmapError::Access {
                offset: at,
                len: len as u64,
                source,
            }),
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
    fn a_truncated_file_gives_efault_not_sigbus() {
        let fd = memfd(2 * 4096);
        let region = MappedRegion::map(&fd, 0, 2 * 4096, RW).expect("map");
        region
            .write_at(4096, b"x")
            .expect("write before truncation");
        ftruncate(&fd, 0).expect("truncate");
        let err = region.read_at(4096, &mut [0u8; 1]).unwrap_err();
        assert_eq!(err.errno(), Errno::EFAULT);
        assert!(matches!(
            region.write_at(0, b"y"),
            Err(MmapError::Access { .. })
        ));
    }

    #[test]
    fn maps_of_one_file_share_one_mapping_and_the_cache_is_bounded() {
        let fd = memfd(16 * 4096);
        let mut cache = MappingCache::new(2);
        let a = MappedRegion::map_shared(&mut cache, &fd, 0, 4096, RW).unwrap();
        let b = MappedRegion::map_shared(&mut cache, &fd, 5 * 4096 + 7, 100, RW).unwrap();
        assert!(Arc::ptr_eq(&a.file, &b.file));
        assert_eq!(cache.len(), 1);
        b.write_at(0, b"shared").unwrap();
        let mut back = [0u8; 6];
        pread(&fd, &mut back, 5 * 4096 + 7).unwrap();
        assert_eq!(&back, b"shared");
        let other = memfd(4096);
        let _c = MappedRegion::map_shared(&mut cache, &other, 0, 4096, RW).unwrap();
        let third = memfd(4096);
        let e = MappedRegion::map_shared(&mut cache, &third, 0, 4096, RW).unwrap_err();
        assert_eq!(e.errno(), Errno::ENOSPC);
        drop((a, b));
        assert_eq!(
            cache.len(),
            1,
            "dropping the last view releases the mapping"
        );
        MappedRegion::map_shared(&mut cache, &third, 0, 4096, RW).unwrap();
        // A file that grew gets a new mapping covering the new range.
        ftruncate(&fd, 32 * 4096).unwrap();
        let d = MappedRegion::map_shared(&mut cache, &fd, 20 * 4096, 4096, RW).unwrap();
        d.write_at(0, b"grown").unwrap();
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
