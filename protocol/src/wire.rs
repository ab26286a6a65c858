//! Byte layouts of every vfio-user message, as `zerocopy` structs.
//!
//! All fields are host-endian, as the protocol requires. Each struct's size is checked at compile
//! time against the layout in the specification; parsing happens once, in [`crate::request`] and
//! [`crate::client`], and nothing past that boundary sees raw offsets.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The 16-byte header that starts every request and every reply.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    /// Whole message size, header included.
    pub msg_size: u32,
    pub flags: u32,
    /// errno, meaningful only in a reply with [`FLAG_ERROR`].
    pub error: u32,
}

/// Size of [`Header`] on the wire.
pub const HEADER_SIZE: usize = 16;

/// Low four flag bits: message type.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Message type: command.
pub const FLAG_TYPE_COMMAND: u32 = 0x0;
/// Message type: reply.
pub const FLAG_TYPE_REPLY: u32 = 0x1;
/// The sender wants no reply to this command.
pub const FLAG_NO_REPLY: u32 = 0x10;
/// The reply reports an error; `error` holds the errno.
pub const FLAG_ERROR: u32 = 0x20;

/// VERSION payload prefix; the NUL-terminated JSON capabilities follow.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

/// DMA_MAP payload.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset into the attached file descriptor.
    pub offset: u64,
    /// IOVA of the mapping.
    pub address: u64,
    pub size: u64,
}

/// DMA_MAP flag: the device may read the range.
pub const DMA_MAP_FLAG_READ: u32 = 1;
/// DMA_MAP flag: the device may write the range.
pub const DMA_MAP_FLAG_WRITE: u32 = 2;

/// DMA_UNMAP payload, echoed in the reply.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

/// DMA_UNMAP flag (`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`); dirty tracking is not offered.
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1;
/// DMA_UNMAP flag (`VFIO_DMA_UNMAP_FLAG_ALL`): address and size are 0 and every map goes.
pub const DMA_UNMAP_FLAG_ALL: u32 = 2;

/// DEVICE_GET_INFO payload (request and reply).
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// `VFIO_DEVICE_FLAGS_RESET`.
pub const DEVICE_FLAG_RESET: u32 = 1;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const DEVICE_FLAG_PCI: u32 = 2;

/// `struct vfio_region_info`, DEVICE_GET_REGION_INFO request and reply.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    /// Offset of the first capability, from the start of this struct; 0 if none.
    pub cap_offset: u32,
    pub size: u64,
    /// mmap offset into the fd sent with the reply; base for sparse areas.
    pub offset: u64,
}

/// Region flag: readable.
pub const REGION_FLAG_READ: u32 = 1;
/// Region flag: writable.
pub const REGION_FLAG_WRITE: u32 = 2;
/// Region flag: mmap-able through the fd in the reply.
pub const REGION_FLAG_MMAP: u32 = 4;
/// Region flag: a capability chain follows.
pub const REGION_FLAG_CAPS: u32 = 8;

/// `struct vfio_info_cap_header`.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct InfoCapHeader {
    pub id: u16,
    pub version: u16,
    /// Offset of the next capability from the start of the region info; 0 ends the chain.
    pub next: u32,
}

/// Capability id of the sparse mmap capability.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Capability id of the region type capability.
pub const REGION_CAP_TYPE: u16 = 2;

/// Sparse mmap capability body after the header.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SparseMmapHeader {
    pub nr_areas: u32,
    pub reserved: u32,
}

/// One sparse mmap area, relative to `RegionInfo::offset`.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SparseMmapArea {
    pub offset: u64,
    pub size: u64,
}

/// Region type capability body after the header.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RegionTypeCap {
    pub type_: u32,
    pub subtype: u32,
}

/// DEVICE_GET_REGION_IO_FDS payload prefix (request and reply).
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RegionIoFds {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// One ioeventfd sub-region in a DEVICE_GET_REGION_IO_FDS reply, in the 48-byte layout that
/// libvfio-user sends (the spec's 40-byte table omits the shadow fields).
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SubRegionIoEventFd {
    pub offset: u64,
    pub size: u64,
    pub fd_index: u32,
    pub type_: u32,
    pub flags: u32,
    pub shadow_mem_fd_index: u32,
    pub shadow_offset: u64,
    pub datamatch: u64,
}

/// DEVICE_GET_IRQ_INFO payload (request and reply).
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// IRQ info flag: eventfd signalling.
pub const IRQ_INFO_EVENTFD: u32 = 1;
/// IRQ info flag: maskable.
pub const IRQ_INFO_MASKABLE: u32 = 2;
/// IRQ info flag: masked automatically when it fires (INTx).
pub const IRQ_INFO_AUTOMASKED: u32 = 4;
/// IRQ info flag: the vector count cannot change.
pub const IRQ_INFO_NORESIZE: u32 = 8;

/// DEVICE_SET_IRQS payload prefix; bool bytes follow for DATA_BOOL.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SetIrqs {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// SET_IRQS data type: none.
pub const IRQ_SET_DATA_NONE: u32 = 1;
/// SET_IRQS data type: one bool byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 2;
/// SET_IRQS data type: one eventfd per vector (or none: de-assign).
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 8;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 0x10;
/// SET_IRQS action: trigger (or assign the trigger eventfds).
pub const IRQ_SET_ACTION_TRIGGER: u32 = 0x20;

/// REGION_READ / REGION_WRITE payload prefix; data follows in REGION_WRITE requests and
/// REGION_READ replies.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// DMA_READ / DMA_WRITE payload prefix (server to client); data follows in DMA_WRITE requests and
/// DMA_READ replies.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DmaAccess {
    pub address: u64,
    pub count: u64,
}

/// One entry of REGION_WRITE_MULTI.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct WriteMultiEntry {
    pub offset: u64,
    pub region: u32,
    /// Bytes of `data` that are valid, at most 8.
    pub count: u32,
    pub data: [u8; 8],
}

/// DEVICE_FEATURE payload prefix.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DeviceFeature {
    pub argsz: u32,
    pub flags: u32,
}

/// DEVICE_FEATURE: mask of the feature index.
pub const DEVICE_FEATURE_MASK: u32 = 0xffff;
/// DEVICE_FEATURE: get the feature's data.
pub const DEVICE_FEATURE_GET: u32 = 1 << 16;
/// DEVICE_FEATURE: set the feature's data.
pub const DEVICE_FEATURE_SET: u32 = 1 << 17;
/// DEVICE_FEATURE: ask whether the feature is supported.
pub const DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// MIG_DATA_READ / MIG_DATA_WRITE payload prefix.
#[repr(C)]
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MigData {
    pub argsz: u32,
    pub size: u32,
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Header>() == HEADER_SIZE);
    assert!(size_of::<Version>() == 4);
    assert!(size_of::<DmaMap>() == 32);
    assert!(size_of::<DmaUnmap>() == 24);
    assert!(size_of::<DeviceInfo>() == 16);
    assert!(size_of::<RegionInfo>() == 32);
    assert!(size_of::<InfoCapHeader>() == 8);
    assert!(size_of::<SparseMmapHeader>() == 8);
    assert!(size_of::<SparseMmapArea>() == 16);
    assert!(size_of::<RegionTypeCap>() == 8);
    assert!(size_of::<RegionIoFds>() == 16);
    assert!(size_of::<SubRegionIoEventFd>() == 48);
    assert!(size_of::<IrqInfo>() == 16);
    assert!(size_of::<SetIrqs>() == 20);
    assert!(size_of::<RegionAccess>() == 16);
    assert!(size_of::<DmaAccess>() == 16);
    assert!(size_of::<WriteMultiEntry>() == 24);
    assert!(size_of::<DeviceFeature>() == 8);
    assert!(size_of::<MigData>() == 8);
};
