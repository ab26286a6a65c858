//! The table of DMA regions the client has mapped, keyed by IOVA.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use tokio::sync::Notify;

use super::mmap::MappingCache;

use super::mmap::{MappedRegion, MmapError};

/// Errors of DMA region bookkeeping and guest memory access.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The range is empty or its end does not fit in 64 bits, or a mapped
    /// backing does not have the region's size.
    #[error("invalid DMA range of {size:#x} bytes at iova {iova:#x}")]
    InvalidRange {
        /// Start of the range.
        iova: u64,
        /// Size of the range.
        size: u64,
    },
    /// A DMA_MAP overlaps an existing region without being identical to it.
    #[error("mapping {size:#x} bytes at iova {iova:#x} overlaps the existing region of {existing_size:#x} bytes at iova {existing_iova:#x}")]
    MapOverlaps {
        /// Start of the rejected mapping.
        iova: u64,
        /// Size of the rejected mapping.
        size: u64,
        /// Start of the region it overlaps.
        existing_iova: u64,
        /// Size of the region it overlaps.
        existing_size: u64,
    },
    /// A DMA_MAP would exceed the negotiated maximum number of regions.
    #[error("cannot map more than {max} DMA regions")]
    TooManyMaps {
        /// The configured maximum.
        max: usize,
    },
    /// A DMA_UNMAP does not exactly match a mapped region.
    #[error("no DMA region of exactly {size:#x} bytes is mapped at iova {iova:#x}")]
    UnmapNotFound {
        /// Requested start.
        iova: u64,
        /// Requested size.
        size: u64,
    },
    /// Mapping the client's file descriptor failed.
    #[error("failed to map the file descriptor for {size:#x} bytes at iova {iova:#x}")]
    Mmap {
        /// Start of the region being mapped.
        iova: u64,
        /// Size of the region being mapped.
        size: u64,
        /// The mapping failure.
        #[source]
        source: MmapError,
    },
    /// Part of a device access is not covered by any DMA region.
    #[error("DMA access of {len:#x} bytes at iova {iova:#x} touches unmapped memory")]
    Unmapped {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: u64,
    },
    /// vfud's shadow translated address space has no room left for another region (only after
    /// about 2^34 maps on one connection).
    #[error("no room in the translated address space for {size:#x} bytes at iova {iova:#x}")]
    TranslatedSpaceFull {
        /// Start of the region.
        iova: u64,
        /// Size of the region.
        size: u64,
    },
    /// A device access needs a permission the region was not mapped with.
    #[error("DMA {} of {len:#x} bytes at iova {iova:#x} is not permitted by the region's protection", if *write { "write" } else { "read" })]
    AccessDenied {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: u64,
        /// Whether the access was a write.
        write: bool,
    },
    /// Copying to or from a mapped region failed (an internal invariant
    /// violation; regions are validated on insertion).
    #[error("failed to access mapped guest memory for {len:#x} bytes at iova {iova:#x}")]
    MappedAccess {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: u64,
        /// The access failure.
        #[source]
        source: MmapError,
    },
    /// A range without fd needs message-based DMA but no connection can
    /// carry it (no port set, port closed, or the request was dropped).
    #[error("message-based DMA of {len:#x} bytes at iova {iova:#x} is unavailable")]
    MessageDmaUnavailable {
        /// Start of the chunk.
        iova: u64,
        /// Length of the chunk.
        len: u64,
    },
    /// A synchronous access (an embedded vIOMMU walking its tables) reached a region the
    /// client mapped without an fd; only fd-backed memory can be read without waiting for the
    /// client.
    #[error("{len:#x} bytes at iova {iova:#x} were mapped without a file descriptor; share guest RAM by fd")]
    RequireFdBacked {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: u64,
    },
    /// The client failed a DMA_READ/DMA_WRITE or answered with a payload of
    /// the wrong size (reported as `EIO`).
    #[error("the client failed message-based DMA at iova {iova:#x}")]
    MessageDmaFailed {
        /// Start of the failing chunk.
        iova: u64,
        /// Error reported by the client.
        #[source]
        errno: Errno,
    },
}

impl DmaError {
    /// The errno to put into the vfio-user error reply for this failure.
    pub fn errno(&self) -> Errno {
        match self {
            Self::InvalidRange { .. } => Errno::EINVAL,
            Self::MapOverlaps { .. } => Errno::EEXIST,
            Self::TooManyMaps { .. } | Self::TranslatedSpaceFull { .. } => Errno::ENOSPC,
            Self::UnmapNotFound { .. } => Errno::ENOENT,
            Self::Mmap { source, .. } => source.errno(),
            Self::Unmapped { .. } | Self::MappedAccess { .. } | Self::RequireFdBacked { .. } => {
                Errno::EFAULT
            }
            Self::AccessDenied { .. } => Errno::EPERM,
            Self::MessageDmaUnavailable { .. } | Self::MessageDmaFailed { .. } => Errno::EIO,
        }
    }
}

/// Access permissions of a DMA region, from the DMA_MAP flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmaProt {
    /// The device may read the region (DMA_MAP flag bit 0).
    pub read: bool,
    /// The device may write the region (DMA_MAP flag bit 1).
    pub write: bool,
}

impl DmaProt {
    /// Decode the protection bits of DMA_MAP flags; other bits are ignored
    /// (the caller validates unknown flags).
    pub fn from_map_flags(flags: u32) -> Self {
        Self {
            read: flags & vfu_protocol::wire::DMA_MAP_FLAG_READ != 0,
            write: flags & vfu_protocol::wire::DMA_MAP_FLAG_WRITE != 0,
        }
    }
}

/// How the bytes of a region are reached.
#[derive(Debug)]
pub enum DmaBacking {
    /// The client passed an fd; we access its memory through a shared mapping.
    Mapped(MappedRegion),
    /// No fd: every access becomes a DMA_READ/DMA_WRITE message to the client.
    Message,
}

/// Count of live [`DmaSegment`]s of one region plus a wakeup for `drained`.
#[derive(Debug, Default)]
struct InFlight {
    count: AtomicUsize,
    notify: Notify,
}

/// Set once the region leaves its table, with a wakeup for accesses waiting on the client.
#[derive(Debug, Default)]
struct Removal {
    done: std::sync::atomic::AtomicBool,
    notify: Notify,
}

/// One client DMA mapping `[iova, iova + size)`.
///
/// Invariants (checked by [`DmaMapTable::insert`]): `size > 0`,
/// `iova + size - 1` does not overflow, and a [`DmaBacking::Mapped`] backing
/// is exactly `size` bytes long.
///
/// Regions are shared as `Arc<DmaRegion>`: the table holds one reference while
/// the region is mapped, and every [`DmaSegment`] holds one (and counts as
/// in-flight) while a device access uses it.
#[derive(Debug)]
pub struct DmaRegion {
    /// First IOVA of the region.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Permitted device accesses.
    pub prot: DmaProt,
    /// Where the bytes live.
    pub backing: DmaBacking,
    /// First address of the region in vfud's shadow translated space; assigned by
    /// [`DmaMapTable::insert`], 0 before.
    translated: u64,
    in_flight: InFlight,
    removal: Removal,
}

impl DmaRegion {
    /// Build a region from parts; validated when inserted into a table.
    pub fn new(iova: u64, size: u64, prot: DmaProt, backing: DmaBacking) -> Self {
        Self {
            iova,
            size,
            prot,
            backing,
            translated: 0,
            in_flight: InFlight::default(),
            removal: Removal::default(),
        }
    }

    /// First address of the region in vfud's shadow translated space (see
    /// [`DmaMapTable::resolve_translated`]); stable while the region is mapped, never shared
    /// with another region mapped at the same time.
    pub fn translated_base(&self) -> u64 {
        self.translated
    }

    /// Records that the region left its table and wakes accesses waiting in [`Self::removed`].
    fn mark_removed(&self) {
        self.removal.done.store(true, Ordering::Release);
        self.removal.notify.notify_waiters();
    }

    /// Whether the region has been unmapped.
    pub fn is_removed(&self) -> bool {
        self.removal.done.load(Ordering::Acquire)
    }

    /// Resolves once the region has been unmapped.
    ///
    /// Why: an access to an fd-less region waits for the client's DMA_READ/DMA_WRITE reply, and
    /// the unmap that drains the region must not depend on the client answering (QEMU cannot
    /// while it waits for our DMA_UNMAP reply). Such an access races its reply against this and
    /// fails as unmapped, releasing the region.
    pub async fn removed(&self) {
        let mut notified = pin!(self.removal.notify.notified());
        notified.as_mut().enable();
        if self.is_removed() {
            return;
        }
        notified.await;
    }

    /// Inclusive last IOVA; valid for regions that passed validation.
    fn last(&self) -> u64 {
        self.iova.saturating_add(self.size.saturating_sub(1))
    }

    /// Number of live [`DmaSegment`]s referring to this region.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::Acquire)
    }

    /// Resolve once no [`DmaSegment`] of this region is alive.
    ///
    /// Why: before replying to DMA_UNMAP the server must be sure no device
    /// access still uses the region. Call it after removing the region from
    /// the table (so no new segments can be created); completion then
    /// guarantees all accesses have finished (their effects happen-before
    /// the return).
    pub async fn drained(&self) {
        loop {
            let mut notified = pin!(self.in_flight.notify.notified());
            // Register for `notify_waiters` before checking the counter, so a
            // guard dropping to zero in between cannot be missed.
            notified.as_mut().enable();
            if self.in_flight.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Marks one in-flight use of a region; decrements its counter on drop.
#[derive(Debug)]
struct InFlightGuard {
    region: Arc<DmaRegion>,
}

impl InFlightGuard {
    fn new(region: &Arc<DmaRegion>) -> Self {
        region.in_flight.count.fetch_add(1, Ordering::Relaxed);
        Self {
            region: Arc::clone(region),
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let in_flight = &self.region.in_flight;
        if in_flight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            in_flight.notify.notify_waiters();
        }
    }
}

/// A piece of a device access that falls into a single region.
///
/// While it is alive the region counts as in-flight, so
/// [`DmaRegion::drained`] waits for it. Drop it as soon as the access is done.
#[derive(Debug)]
pub struct DmaSegment {
    /// The region the bytes belong to.
    pub region: Arc<DmaRegion>,
    /// Offset of the segment from the region's start.
    pub offset: u64,
    /// Length of the segment in bytes (non-zero).
    pub len: u64,
    /// IOVA of the segment's first byte.
    pub iova: u64,
    _guard: InFlightGuard,
}

/// Inclusive last address of `[iova, iova + size)`, or `None` when the range
/// is empty or runs past the end of the 64-bit IOVA space.
fn last_of(iova: u64, size: u64) -> Option<u64> {
    size.checked_sub(1).and_then(|s| iova.checked_add(s))
}

/// The client's DMA mappings, non-overlapping, keyed by start IOVA.
///
/// Why a `BTreeMap`: map, unmap and lookups are `O(log n)` via range queries,
/// and adjacent regions can be walked in order to serve accesses that span
/// them. Invariants: no two regions overlap, every region satisfies the
/// [`DmaRegion`] invariants, and there are at most `max_maps` regions.
#[derive(Debug)]
pub struct DmaMapTable {
    regions: BTreeMap<u64, Arc<DmaRegion>>,
    /// The same regions keyed by their shadow translated base.
    translated: BTreeMap<u64, Arc<DmaRegion>>,
    /// Where the next shadow translated base is searched from.
    next_translated: u64,
    max_maps: usize,
    mappings: MappingCache,
}

/// The shadow translated space keeps an address's offset within 1 GiB, so ATS pages up to
/// 1 GiB are naturally aligned in both spaces.
pub const SHADOW_ALIGN_LOG2: u32 = 30;
/// Lowest shadow translated address: 0 is never a valid translation.
const SHADOW_START: u64 = 1 << SHADOW_ALIGN_LOG2;

/// Most distinct backing files one connection may map at once; QEMU uses one per RAM block.
pub const MAX_BACKING_FILES: usize = 1024;

impl DmaMapTable {
    /// An empty table accepting at most `max_maps` regions.
    pub fn new(max_maps: usize) -> Self {
        Self {
            regions: BTreeMap::new(),
            translated: BTreeMap::new(),
            next_translated: SHADOW_START,
            max_maps,
            mappings: MappingCache::new(MAX_BACKING_FILES),
        }
    }

    /// Builds a region backed by `size` bytes of `fd` at file `offset` (a DMA_MAP with an fd),
    /// sharing this table's mapping of the same file. The fd may be closed afterwards. The
    /// region is not inserted; call [`Self::insert`].
    pub fn map_fd(
        &mut self,
        iova: u64,
        size: u64,
        prot: DmaProt,
        fd: impl AsFd,
        offset: u64,
    ) -> Result<DmaRegion, DmaError> {
        last_of(iova, size).ok_or(DmaError::InvalidRange { iova, size })?;
        let mapped = MappedRegion::map_shared(&mut self.mappings, fd, offset, size, prot)
            .map_err(|source| DmaError::Mmap { iova, size, source })?;
        Ok(DmaRegion::new(iova, size, prot, DmaBacking::Mapped(mapped)))
    }

    /// Keep one duplicate fd per mapped backing file, for a device that hands the files to
    /// its IOMMU (see [`MappingCache::set_keep_files`]).
    pub fn set_keep_backing_files(&mut self, keep: bool) {
        self.mappings.set_keep_files(keep);
    }

    /// Distinct backing files mapped by this table's regions.
    pub fn backing_files(&self) -> usize {
        self.mappings.len()
    }

    /// Add a region (DMA_MAP).
    ///
    /// Returns `Ok(None)` for a new region. An identical re-map (same iova,
    /// size and protection) replaces the old region and returns it, so the
    /// caller can await its [`DmaRegion::drained`]. Any other overlap is
    /// rejected with [`DmaError::MapOverlaps`] (vfio-user requires `EEXIST`).
    pub fn insert(&mut self, region: DmaRegion) -> Result<Option<Arc<DmaRegion>>, DmaError> {
        let (iova, size) = (region.iova, region.size);
        let last = last_of(iova, size).ok_or(DmaError::InvalidRange { iova, size })?;
        let backing_len = match &region.backing {
            DmaBacking::Mapped(mapped) => Some(mapped.len()),
            DmaBacking::Message => None,
        };
        if backing_len.is_some_and(|l| l != size) {
            return Err(DmaError::InvalidRange { iova, size });
        }

        let mut region = region;
        if let Some(existing) = self.regions.get(&iova) {
            if existing.size == size && existing.prot == region.prot {
                let old = Arc::clone(existing);
                self.translated.remove(&old.translated);
                match self.allocate_translated(iova, size) {
                    Ok(base) => region.translated = base,
                    Err(e) => {
                        self.translated.insert(old.translated, old);
                        return Err(e);
                    }
                }
                let new = Arc::new(region);
                self.translated.insert(new.translated, Arc::clone(&new));
                self.regions.insert(iova, new);
                old.mark_removed();
                return Ok(Some(old));
            }
        }

        // Regions are disjoint, so only the last one starting at or before
        // `last` can overlap: all earlier ones end before it starts.
        if let Some((_, prev)) = self.regions.range(..=last).next_back() {
            if prev.last() >= iova {
                return Err(DmaError::MapOverlaps {
                    iova,
                    size,
                    existing_iova: prev.iova,
                    existing_size: prev.size,
                });
            }
        }

        if self.regions.len() >= self.max_maps {
            return Err(DmaError::TooManyMaps { max: self.max_maps });
        }
        region.translated = self.allocate_translated(iova, size)?;
        let region = Arc::new(region);
        self.translated
            .insert(region.translated, Arc::clone(&region));
        self.regions.insert(iova, region);
        Ok(None)
    }

    /// A shadow translated base for `[iova, iova + size)`: congruent to `iova` modulo 1 GiB,
    /// above every base handed out before on this table (so a stale translation never reaches
    /// a later mapping) until the space runs out, then the first free gap from the bottom.
    fn allocate_translated(&mut self, iova: u64, size: u64) -> Result<u64, DmaError> {
        let found = self
            .translated_gap(self.next_translated, iova, size)
            .or_else(|| self.translated_gap(SHADOW_START, iova, size))
            .ok_or(DmaError::TranslatedSpaceFull { iova, size })?;
        self.next_translated = found.saturating_add(size);
        Ok(found)
    }

    /// The first base at or above `from` that keeps `iova`'s offset within 1 GiB and overlaps
    /// no region's translated range.
    fn translated_gap(&self, from: u64, iova: u64, size: u64) -> Option<u64> {
        let align = 1u64 << SHADOW_ALIGN_LOG2;
        let offset = iova & (align - 1);
        let mut candidate = (from.checked_add(align - 1)? & !(align - 1)).checked_add(offset)?;
        // Each step passes one region, so this ends after at most `max_maps` steps.
        loop {
            let last = last_of(candidate, size)?;
            match self.translated.range(..=last).next_back() {
                Some((&base, r)) if base.saturating_add(r.size - 1) >= candidate => {
                    let after = base.checked_add(r.size)?;
                    candidate =
                        (after.checked_add(align - 1)? & !(align - 1)).checked_add(offset)?;
                }
                _ => return Some(candidate),
            }
        }
    }

    /// Remove the region that exactly matches `[iova, iova + size)`
    /// (DMA_UNMAP). The caller must await [`DmaRegion::drained`] on the result
    /// before replying.
    pub fn remove(&mut self, iova: u64, size: u64) -> Result<Arc<DmaRegion>, DmaError> {
        match self.regions.get(&iova) {
            Some(region) if region.size == size => {}
            _ => return Err(DmaError::UnmapNotFound { iova, size }),
        }
        let region = self
            .regions
            .remove(&iova)
            .ok_or(DmaError::UnmapNotFound { iova, size })?;
        self.translated.remove(&region.translated);
        region.mark_removed();
        Ok(region)
    }

    /// Remove every region (DMA_UNMAP with UNMAP_ALL, or disconnect), in IOVA
    /// order. The caller must drain each before replying.
    pub fn remove_all(&mut self) -> Vec<Arc<DmaRegion>> {
        self.translated.clear();
        let all: Vec<_> = std::mem::take(&mut self.regions).into_values().collect();
        for r in &all {
            r.mark_removed();
        }
        all
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The mapped regions in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<DmaRegion>> {
        self.regions.values()
    }

    /// The region that starts exactly at `iova`, O(log n).
    pub fn get(&self, iova: u64) -> Option<Arc<DmaRegion>> {
        self.regions.get(&iova).cloned()
    }

    /// The region containing `iova`, O(log n).
    pub fn region_containing(&self, iova: u64) -> Option<Arc<DmaRegion>> {
        self.regions
            .range(..=iova)
            .next_back()
            .filter(|(_, r)| r.last() >= iova)
            .map(|(_, r)| Arc::clone(r))
    }

    /// The first region starting after `iova`, O(log n): where a hole at `iova` ends.
    pub fn region_after(&self, iova: u64) -> Option<Arc<DmaRegion>> {
        let next = iova.checked_add(1)?;
        self.regions
            .range(next..)
            .next()
            .map(|(_, r)| Arc::clone(r))
    }

    /// Resolves a translated access `[taddr, taddr + len)` in the shadow translated space
    /// (see [`DmaRegion::translated_base`]) into one segment. Translated ranges of different
    /// regions are never adjacent, so an access that leaves its region is unmapped.
    pub fn resolve_translated(
        &self,
        taddr: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<DmaSegment>, DmaError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let unmapped = || DmaError::Unmapped { iova: taddr, len };
        last_of(taddr, len).ok_or_else(unmapped)?;
        let (base, region) = self
            .translated
            .range(..=taddr)
            .next_back()
            .ok_or_else(unmapped)?;
        let offset = taddr - base;
        if offset.checked_add(len).is_none_or(|end| end > region.size) {
            return Err(unmapped());
        }
        let permitted = if write {
            region.prot.write
        } else {
            region.prot.read
        };
        if !permitted {
            return Err(DmaError::AccessDenied {
                iova: taddr,
                len,
                write,
            });
        }
        Ok(vec![DmaSegment {
            region: Arc::clone(region),
            offset,
            len,
            iova: region.iova + offset,
            _guard: InFlightGuard::new(region),
        }])
    }

    /// Split the device access `[iova, iova + len)` into per-region segments,
    /// in `O(log n + segments)`.
    ///
    /// Adjacent regions are spanned; any hole (or a range running past the
    /// 64-bit IOVA space) fails with [`DmaError::Unmapped`], and a region
    /// lacking the needed permission with [`DmaError::AccessDenied`]. The
    /// segments cover the access exactly, in order, and each keeps its region
    /// alive and counted as in-flight. A zero-length access yields no
    /// segments.
    pub fn resolve(&self, iova: u64, len: u64, write: bool) -> Result<Vec<DmaSegment>, DmaError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let unmapped = || DmaError::Unmapped { iova, len };
        let last = last_of(iova, len).ok_or_else(unmapped)?;

        let first_start = match self.regions.range(..=iova).next_back() {
            Some((start, region)) if region.last() >= iova => *start,
            _ => return Err(unmapped()),
        };

        let mut segments = Vec::new();
        let mut cursor = iova;
        for region in self.regions.range(first_start..).map(|(_, r)| r) {
            if region.iova > cursor {
                return Err(unmapped());
            }
            let permitted = if write {
                region.prot.write
            } else {
                region.prot.read
            };
            if !permitted {
                return Err(DmaError::AccessDenied { iova, len, write });
            }
            let seg_last = region.last().min(last);
            segments.push(DmaSegment {
                region: Arc::clone(region),
                offset: cursor - region.iova,
                len: seg_last - cursor + 1,
                iova: cursor,
                _guard: InFlightGuard::new(region),
            });
            if seg_last == last {
                return Ok(segments);
            }
            // `seg_last < last <= u64::MAX`, so this cannot overflow.
            cursor = seg_last + 1;
        }
        Err(unmapped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    const RW: DmaProt = DmaProt {
        read: true,
        write: true,
    };
    const RO: DmaProt = DmaProt {
        read: true,
        write: false,
    };
    const WO: DmaProt = DmaProt {
        read: false,
        write: true,
    };

    fn msg(iova: u64, size: u64, prot: DmaProt) -> DmaRegion {
        DmaRegion::new(iova, size, prot, DmaBacking::Message)
    }

    fn table_with(regions: &[(u64, u64)]) -> DmaMapTable {
        let mut t = DmaMapTable::new(16);
        for &(iova, size) in regions {
            assert!(t.insert(msg(iova, size, RW)).unwrap().is_none());
        }
        t
    }

    fn assert_overlap(t: &mut DmaMapTable, iova: u64, size: u64, existing: (u64, u64)) {
        match t.insert(msg(iova, size, RW)) {
            Err(
                e @ DmaError::MapOverlaps {
                    existing_iova,
                    existing_size,
                    ..
                },
            ) => {
                assert_eq!((existing_iova, existing_size), existing);
                assert_eq!(e.errno(), Errno::EEXIST);
            }
            other => panic!("expected overlap for {iova:#x}+{size:#x}, got {other:?}"),
        }
    }

    #[test]
    fn translated_bases_keep_the_gib_offset_are_disjoint_and_not_reused() {
        let mut t = table_with(&[(0x1000, 0x1000), (0x4000_2000, 0x8000_0000)]);
        let a = t.get(0x1000).unwrap();
        let b = t.get(0x4000_2000).unwrap();
        let gib = 1u64 << SHADOW_ALIGN_LOG2;
        assert_eq!(a.translated_base() % gib, 0x1000);
        assert_eq!(b.translated_base() % gib, 0x2000);
        assert!(a.translated_base() >= gib);
        assert!(b.translated_base() >= a.translated_base() + a.size);
        // Translated access resolves to the region with the same offset.
        let segs = t
            .resolve_translated(b.translated_base() + 0x10, 8, true)
            .unwrap();
        assert_eq!((segs[0].iova, segs[0].offset), (0x4000_2010, 0x10));
        drop(segs);
        assert!(matches!(
            t.resolve_translated(a.translated_base() + 0xff8, 16, false),
            Err(DmaError::Unmapped { .. })
        ));
        // A re-map at the same IOVA gets a fresh base; the old one no longer resolves.
        let old = a.translated_base();
        t.remove(0x1000, 0x1000).unwrap();
        t.insert(msg(0x1000, 0x1000, RO)).unwrap();
        let again = t.get(0x1000).unwrap().translated_base();
        assert_ne!(again, old);
        assert!(t.resolve_translated(old, 4, false).is_err());
        assert!(matches!(
            t.resolve_translated(again, 4, true),
            Err(DmaError::AccessDenied { .. })
        ));
        // When the space above runs out, a free gap from the bottom is reused.
        t.next_translated = u64::MAX - 0x800;
        t.insert(msg(0x10_0000, 0x1000, RW)).unwrap();
        assert!(t.get(0x10_0000).unwrap().translated_base() < again);
        t.remove_all();
        assert!(t.translated.is_empty());
    }

    #[test]
    fn overlap_cases() {
        let mut t = table_with(&[(0x1000, 0x1000)]);
        assert_overlap(&mut t, 0x800, 0x1000, (0x1000, 0x1000)); // left
        assert_overlap(&mut t, 0x1800, 0x1000, (0x1000, 0x1000)); // right
        assert_overlap(&mut t, 0x1400, 0x100, (0x1000, 0x1000)); // inside
        assert_overlap(&mut t, 0x0, 0x10000, (0x1000, 0x1000)); // containing
        assert_overlap(&mut t, 0x1000, 0x800, (0x1000, 0x1000)); // same start, smaller
        assert_overlap(&mut t, 0x1000, 0x2000, (0x1000, 0x1000)); // same start, larger
        assert_overlap(&mut t, 0x1fff, 1, (0x1000, 0x1000)); // last byte
        match t.insert(msg(0x1000, 0x1000, RO)) {
            Err(DmaError::MapOverlaps { .. }) => {}
            other => panic!("different prot must overlap, got {other:?}"),
        }
        // Adjacent on both sides is fine.
        assert!(t.insert(msg(0x0, 0x1000, RW)).unwrap().is_none());
        assert!(t.insert(msg(0x2000, 0x1000, RW)).unwrap().is_none());
        assert_eq!(t.len(), 3);
        // A range over several regions reports the last one overlapping.
        assert_overlap(&mut t, 0x0, 0x4000, (0x2000, 0x1000));
        let starts: Vec<u64> = t.iter().map(|r| r.iova).collect();
        assert_eq!(starts, [0x0, 0x1000, 0x2000]);
    }

    #[test]
    fn identical_remap_replaces() {
        let mut t = table_with(&[(0x1000, 0x1000)]);
        let first = Arc::clone(t.iter().next().unwrap());
        let old = t
            .insert(msg(0x1000, 0x1000, RW))
            .unwrap()
            .expect("old region");
        assert!(Arc::ptr_eq(&old, &first));
        assert_eq!(t.len(), 1);
        assert!(!Arc::ptr_eq(t.iter().next().unwrap(), &first));
    }

    #[test]
    fn unmap_requires_exact_match() {
        let mut t = table_with(&[(0x1000, 0x1000), (0x3000, 0x1000)]);
        for (iova, size) in [(0x1000, 0x800), (0x1800, 0x800), (0x1000, 0x2000), (0, 0)] {
            let e = t.remove(iova, size).unwrap_err();
            assert!(matches!(e, DmaError::UnmapNotFound { .. }));
            assert_eq!(e.errno(), Errno::ENOENT);
        }
        let r = t.remove(0x1000, 0x1000).unwrap();
        assert_eq!((r.iova, r.size), (0x1000, 0x1000));
        assert!(t.remove(0x1000, 0x1000).is_err());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn remove_all_empties() {
        let mut t = table_with(&[(0x3000, 0x1000), (0x1000, 0x1000)]);
        let all = t.remove_all();
        assert_eq!(
            all.iter().map(|r| r.iova).collect::<Vec<_>>(),
            [0x1000, 0x3000]
        );
        assert!(t.is_empty());
        assert!(t.remove_all().is_empty());
    }

    #[test]
    fn max_maps_enforced() {
        let mut t = DmaMapTable::new(2);
        t.insert(msg(0x0, 0x1000, RW)).unwrap();
        t.insert(msg(0x1000, 0x1000, RW)).unwrap();
        let e = t.insert(msg(0x2000, 0x1000, RW)).unwrap_err();
        assert!(matches!(e, DmaError::TooManyMaps { max: 2 }));
        assert_eq!(e.errno(), Errno::ENOSPC);
        // An identical re-map does not count as an additional map.
        assert!(t.insert(msg(0x1000, 0x1000, RW)).unwrap().is_some());
        t.remove(0x0, 0x1000).unwrap();
        t.insert(msg(0x2000, 0x1000, RW)).unwrap();
    }

    #[test]
    fn range_validation() {
        let mut t = DmaMapTable::new(8);
        for (iova, size) in [(0x1000, 0), (u64::MAX, 2), (u64::MAX - 0xfff, 0x1001)] {
            let e = t.insert(msg(iova, size, RW)).unwrap_err();
            assert!(matches!(e, DmaError::InvalidRange { .. }), "{e:?}");
            assert_eq!(e.errno(), Errno::EINVAL);
        }
        // A region ending exactly at the top of the IOVA space is valid.
        t.insert(msg(u64::MAX - 0xfff, 0x1000, RW)).unwrap();
        assert_overlap(&mut t, u64::MAX, 1, (u64::MAX - 0xfff, 0x1000));
        let segs = t.resolve(u64::MAX - 3, 4, true).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!((segs[0].offset, segs[0].len), (0xffc, 4));
        // Accesses running past the end of the IOVA space fault.
        let e = t.resolve(u64::MAX - 3, 5, true).unwrap_err();
        assert!(matches!(e, DmaError::Unmapped { .. }));
        assert!(t.resolve(u64::MAX, u64::MAX, false).is_err());
    }

    #[test]
    fn resolve_spans_adjacent_regions() {
        let t = table_with(&[(0x1000, 0x1000), (0x2000, 0x1000), (0x3000, 0x1000)]);
        let segs = t.resolve(0x1ff0, 0x1020, false).unwrap();
        let got: Vec<_> = segs.iter().map(|s| (s.iova, s.offset, s.len)).collect();
        assert_eq!(
            got,
            [
                (0x1ff0, 0xff0, 0x10),
                (0x2000, 0, 0x1000),
                (0x3000, 0, 0x10)
            ]
        );
        assert_eq!(segs[1].region.iova, 0x2000);
        assert!(t.resolve(0x1000, 0, true).unwrap().is_empty());
        let whole = t.resolve(0x1000, 0x3000, true).unwrap();
        assert_eq!(whole.len(), 3);
    }

    #[test]
    fn resolve_hole_is_unmapped() {
        let t = table_with(&[(0x1000, 0x1000), (0x3000, 0x1000)]);
        for (iova, len) in [
            (0x1f00, 0x200),
            (0x0, 0x10),
            (0x2000, 1),
            (0x3ff0, 0x20),
            (0x5000, 1),
        ] {
            let e = t.resolve(iova, len, false).unwrap_err();
            assert!(matches!(e, DmaError::Unmapped { .. }), "{iova:#x}: {e:?}");
            assert_eq!(e.errno(), Errno::EFAULT);
        }
        // Failed resolves leave nothing in flight.
        assert!(t.iter().all(|r| r.in_flight() == 0));
    }

    #[test]
    fn resolve_checks_protection() {
        let mut t = DmaMapTable::new(8);
        t.insert(msg(0x1000, 0x1000, RW)).unwrap();
        t.insert(msg(0x2000, 0x1000, RO)).unwrap();
        t.insert(msg(0x3000, 0x1000, WO)).unwrap();
        let e = t.resolve(0x1ff0, 0x20, true).unwrap_err();
        assert!(matches!(e, DmaError::AccessDenied { write: true, .. }));
        assert_eq!(e.errno(), Errno::EPERM);
        assert!(t.resolve(0x1ff0, 0x20, false).is_ok());
        let e = t.resolve(0x3000, 1, false).unwrap_err();
        assert!(matches!(e, DmaError::AccessDenied { write: false, .. }));
        assert!(t.resolve(0x3000, 1, true).is_ok());
        assert!(t.iter().all(|r| r.in_flight() == 0));
    }

    #[test]
    fn mapped_backing_size_must_match() {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"vfud-table-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 0x2000).unwrap();
        let mapped = MappedRegion::map(&fd, 0, 0x1000, RW).unwrap();
        let mut t = DmaMapTable::new(4);
        let e = t
            .insert(DmaRegion::new(0x0, 0x2000, RW, DmaBacking::Mapped(mapped)))
            .unwrap_err();
        assert!(matches!(e, DmaError::InvalidRange { .. }));
        let region = t.map_fd(0x0, 0x2000, RW, &fd, 0).unwrap();
        t.insert(region).unwrap();
        let e = t.map_fd(0x0, 0x3000, RW, &fd, 0).unwrap_err();
        assert!(matches!(e, DmaError::Mmap { .. }));
        assert_eq!(e.errno(), Errno::EINVAL);
        // Many maps of one file share one mapping.
        let mut t = DmaMapTable::new(64);
        for i in 1..=32u64 {
            let r = t.map_fd(i * 0x10000, 0x1000, RW, &fd, 0x1000).unwrap();
            t.insert(r).unwrap();
        }
        assert_eq!(t.backing_files(), 1);
    }

    #[test]
    fn prot_from_flags() {
        assert_eq!(DmaProt::from_map_flags(0), DmaProt::default());
        assert_eq!(DmaProt::from_map_flags(1), RO);
        assert_eq!(DmaProt::from_map_flags(2), WO);
        assert_eq!(DmaProt::from_map_flags(3), RW);
    }

    #[test]
    fn drained_waits_for_segments() {
        let mut t = table_with(&[(0x1000, 0x1000), (0x2000, 0x1000)]);
        let mut cx = Context::from_waker(Waker::noop());

        // Without segments it resolves immediately.
        let idle = t.remove(0x2000, 0x1000).unwrap();
        assert_eq!(pin!(idle.drained()).poll(&mut cx), Poll::Ready(()));

        let segs = t.resolve(0x1000, 0x10, false).unwrap();
        let more = t.resolve(0x1100, 0x10, true).unwrap();
        let region = t.remove(0x1000, 0x1000).unwrap();
        assert_eq!(region.in_flight(), 2);

        let mut drained = pin!(region.drained());
        assert!(drained.as_mut().poll(&mut cx).is_pending());
        drop(segs);
        assert!(drained.as_mut().poll(&mut cx).is_pending());
        drop(more);
        assert_eq!(region.in_flight(), 0);
        assert_eq!(drained.as_mut().poll(&mut cx), Poll::Ready(()));
    }

    #[tokio::test]
    async fn drained_wakes_waiting_task() {
        let mut t = table_with(&[(0x1000, 0x1000)]);
        let segs = t.resolve(0x1000, 0x1000, true).unwrap();
        let region = t.remove(0x1000, 0x1000).unwrap();
        let waiter = {
            let region = Arc::clone(&region);
            tokio::spawn(async move { region.drained().await })
        };
        // Let the waiter register; it must still be pending.
        tokio::task::yield_now().await;
        {
            let mut check = pin!(region.drained());
            tokio::select! {
                biased;
                () = &mut check => panic!("drained while a segment is alive"),
                () = std::future::ready(()) => {}
            }
        }
        drop(segs);
        waiter.await.unwrap();
    }
}
