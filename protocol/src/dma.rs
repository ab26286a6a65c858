//! DMA_READ / DMA_WRITE payloads (server to client) in the two layouts a server may meet.
//!
//! * [`DmaLayout::Spec`], the specification's: `address u64, count u64`, data at payload offset
//!   16; the DMA_WRITE reply echoes address and count. QEMU 11.1 (checked against 11.1.3 by the
//!   QEMU interop tier) speaks this.
//! * [`DmaLayout::QemuLegacy`], QEMU's vfio-user client as merged upstream in 2025 (the series
//!   first released in QEMU 10.1), read from its source (`VFIOUserDMARW`): `count` is a u32 at
//!   payload offset 8 and data starts at offset 12; the struct's alignment padding makes every
//!   request and DMA_READ reply 4 bytes longer than its data (the same total size as the
//!   specification's), and DMA_WRITE is answered with a bare header. Which releases behave like
//!   this was not checked against binaries.
//!
//! DMA_READ *requests* mean the same in both (a u64 count below 2^32 has its value in the low
//! u32), and so do the reply sizes, so a DMA_READ reply alone does not say which layout the
//! client used: one whose data starts with four zero bytes parses either way. A server asks once
//! per connection instead: [`probe_request`] is a zero-length DMA_WRITE, valid in both layouts
//! and touching no memory, and [`classify_probe_reply`] reads the layout off the answer (an echo
//! of address and count, or a bare header).

use zerocopy::{FromBytes, IntoBytes};

use crate::wire::DmaAccess;

/// How a client lays out DMA_READ / DMA_WRITE; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaLayout {
    /// The specification's layout.
    #[default]
    Spec,
    /// QEMU 10.1's: u32 count at offset 8, data at offset 12, 4 bytes of padding at the end,
    /// header-only DMA_WRITE replies.
    QemuLegacy,
}

impl std::fmt::Display for DmaLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DmaLayout::Spec => "specification (u64 count, data at payload offset 16)",
            DmaLayout::QemuLegacy => "QEMU 10.1 (u32 count, data at payload offset 12)",
        })
    }
}

/// Why a DMA_READ / DMA_WRITE message does not fit its layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaMessageError {
    /// Shorter than its layout's prefix plus the data it announces.
    #[error("{len}-byte payload is too short for {count} bytes of data")]
    CheckLength { len: usize, count: u64 },
    /// The reply is for another address or size than the request.
    #[error("reply for {got_address:#x}+{got_count} does not match request {address:#x}+{count}")]
    CheckEcho {
        address: u64,
        count: u64,
        got_address: u64,
        got_count: u64,
    },
}

/// Payload offset of the data in the legacy layout.
const LEGACY_DATA: usize = 12;
/// Bytes of trailing padding in legacy requests and DMA_READ replies.
const LEGACY_PAD: usize = 4;

fn legacy_prefix(address: u64, count: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&address.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap_or([0; 4]))
}

/// A DMA_READ request payload (the same in both layouts).
pub fn read_request(address: u64, count: u32) -> Vec<u8> {
    DmaAccess {
        address,
        count: u64::from(count),
    }
    .as_bytes()
    .to_vec()
}

/// The layout probe: a zero-length DMA_WRITE at `address`.
pub fn probe_request(address: u64) -> Vec<u8> {
    DmaAccess { address, count: 0 }.as_bytes().to_vec()
}

/// Reads the client's layout off its answer to [`probe_request`]: `None` for an error reply
/// (only a specification client refuses a zero-length write), else the reply payload.
pub fn classify_probe_reply(
    address: u64,
    reply: Option<&[u8]>,
) -> Result<DmaLayout, DmaMessageError> {
    match reply {
        None => Ok(DmaLayout::Spec),
        Some([]) => Ok(DmaLayout::QemuLegacy),
        Some(payload) => DmaLayout::Spec
            .check_write_reply(payload, address, 0)
            .map(|()| DmaLayout::Spec),
    }
}

impl DmaLayout {
    /// A DMA_WRITE request payload carrying `data` for `address`.
    pub fn write_request(self, address: u64, data: &[u8]) -> Vec<u8> {
        match self {
            DmaLayout::Spec => {
                let mut out = DmaAccess {
                    address,
                    count: data.len() as u64,
                }
                .as_bytes()
                .to_vec();
                out.extend_from_slice(data);
                out
            }
            DmaLayout::QemuLegacy => {
                let mut out = legacy_prefix(address, data.len() as u32);
                out.extend_from_slice(data);
                out.extend_from_slice(&[0; LEGACY_PAD]);
                out
            }
        }
    }

    /// The data of a DMA_READ reply to a request for `count` bytes at `address`.
    pub fn read_reply_data(
        self,
        payload: &[u8],
        address: u64,
        count: u64,
    ) -> Result<&[u8], DmaMessageError> {
        let short = DmaMessageError::CheckLength {
            len: payload.len(),
            count,
        };
        let n = usize::try_from(count).map_err(|_| short.clone())?;
        let (got_address, got_count, data) = match self {
            DmaLayout::Spec => {
                let (acc, rest) =
                    DmaAccess::read_from_prefix(payload).map_err(|_| short.clone())?;
                if rest.len() != n {
                    return Err(short);
                }
                (acc.address, acc.count, rest)
            }
            DmaLayout::QemuLegacy => {
                let end = LEGACY_DATA.checked_add(n).ok_or(short.clone())?;
                if payload.len() != end && payload.len() != end + LEGACY_PAD {
                    return Err(short);
                }
                (
                    le_u64(payload),
                    u64::from(le_u32(&payload[8..])),
                    &payload[LEGACY_DATA..end],
                )
            }
        };
        if (got_address, got_count) != (address, count) {
            return Err(DmaMessageError::CheckEcho {
                address,
                count,
                got_address,
                got_count,
            });
        }
        Ok(data)
    }

    /// Checks a DMA_WRITE reply to a request for `count` bytes at `address`. A legacy client
    /// answers with a bare header; an echo of address and count is accepted from either.
    pub fn check_write_reply(
        self,
        payload: &[u8],
        address: u64,
        count: u64,
    ) -> Result<(), DmaMessageError> {
        if self == DmaLayout::QemuLegacy && payload.is_empty() {
            return Ok(());
        }
        let acc =
            DmaAccess::read_from_bytes(payload).map_err(|_| DmaMessageError::CheckLength {
                len: payload.len(),
                count: 0,
            })?;
        if (acc.address, acc.count) != (address, count) {
            return Err(DmaMessageError::CheckEcho {
                address,
                count,
                got_address: acc.address,
                got_count: acc.count,
            });
        }
        Ok(())
    }

    /// Client side: (address, count, data) of a DMA_READ (no data) or DMA_WRITE request. The
    /// data is what the message carries, at most `count` bytes; a DMA_WRITE whose data is
    /// shorter than its count is the caller's to refuse.
    pub fn parse_request(self, payload: &[u8]) -> Result<(u64, u64, &[u8]), DmaMessageError> {
        match self {
            DmaLayout::Spec => {
                let (acc, data) = DmaAccess::read_from_prefix(payload).map_err(|_| {
                    DmaMessageError::CheckLength {
                        len: payload.len(),
                        count: 0,
                    }
                })?;
                Ok((acc.address, acc.count, data))
            }
            DmaLayout::QemuLegacy => {
                // QEMU checks the message against the size of its padded struct.
                if payload.len() < LEGACY_DATA + LEGACY_PAD {
                    return Err(DmaMessageError::CheckLength {
                        len: payload.len(),
                        count: 0,
                    });
                }
                let count = u64::from(le_u32(&payload[8..]));
                let body = &payload[LEGACY_DATA..payload.len() - LEGACY_PAD];
                let n = usize::try_from(count).unwrap_or(usize::MAX);
                Ok((le_u64(payload), count, &body[..n.min(body.len())]))
            }
        }
    }

    /// Client side: the DMA_READ reply payload for `data` read at `address`.
    pub fn read_reply(self, address: u64, data: &[u8]) -> Vec<u8> {
        // A legacy reply has the request's shape: the same bytes as a legacy write request.
        self.write_request(address, data)
    }

    /// Client side: the DMA_WRITE reply payload for `count` bytes written at `address`.
    pub fn write_reply(self, address: u64, count: u64) -> Vec<u8> {
        match self {
            DmaLayout::Spec => DmaAccess { address, count }.as_bytes().to_vec(),
            DmaLayout::QemuLegacy => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &[u8] = &[0, 0, 0, 0, 0xa5, 0x5a, 1, 2, 3];

    #[test]
    fn both_layouts_round_trip_and_differ_on_the_wire() {
        for layout in [DmaLayout::Spec, DmaLayout::QemuLegacy] {
            let req = layout.write_request(0x1000, DATA);
            assert_eq!(req.len(), 16 + DATA.len(), "{layout}: same total size");
            assert_eq!(layout.parse_request(&req).unwrap(), (0x1000, 9, DATA));
            let reply = layout.read_reply(0x1000, DATA);
            assert_eq!(layout.read_reply_data(&reply, 0x1000, 9).unwrap(), DATA);
            let ack = layout.write_reply(0x1000, 9);
            layout.check_write_reply(&ack, 0x1000, 9).unwrap();
        }
        let spec = DmaLayout::Spec.write_request(0x1000, DATA);
        let legacy = DmaLayout::QemuLegacy.write_request(0x1000, DATA);
        assert_eq!(&spec[8..16], &9u64.to_le_bytes());
        assert_eq!(&legacy[8..12], &9u32.to_le_bytes());
        assert_eq!(&legacy[12..21], DATA);
        assert_eq!(&legacy[21..], &[0; 4]);
    }

    #[test]
    fn a_legacy_read_reply_starting_with_zeros_parses_either_way_so_layout_must_be_known() {
        // The trap that makes the probe necessary: read as the specification's layout, this
        // legacy reply has a plausible count and yields data shifted by four bytes.
        let reply = DmaLayout::QemuLegacy.read_reply(0x2000, DATA);
        let misread = DmaLayout::Spec.read_reply_data(&reply, 0x2000, 9).unwrap();
        assert_ne!(misread, DATA);
        assert_eq!(&misread[..5], &DATA[4..]);
        // With nonzero leading data the mismatch is at least detected.
        let reply = DmaLayout::QemuLegacy.read_reply(0x2000, b"abcdefgh");
        assert!(matches!(
            DmaLayout::Spec.read_reply_data(&reply, 0x2000, 8),
            Err(DmaMessageError::CheckEcho { .. })
        ));
    }

    #[test]
    fn the_probe_tells_the_layouts_apart() {
        let probe = probe_request(0x3000);
        for layout in [DmaLayout::Spec, DmaLayout::QemuLegacy] {
            // Both kinds of client accept the probe as a zero-length write...
            let (address, count, data) = layout.parse_request(&probe).unwrap();
            assert_eq!((address, count, data), (0x3000, 0, &[][..]));
            // ...and their answers classify them.
            let answer = layout.write_reply(address, count);
            assert_eq!(classify_probe_reply(0x3000, Some(&answer)).unwrap(), layout);
        }
        assert_eq!(classify_probe_reply(0x3000, None).unwrap(), DmaLayout::Spec);
        assert!(classify_probe_reply(0x3000, Some(&[1, 2, 3])).is_err());
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for layout in [DmaLayout::Spec, DmaLayout::QemuLegacy] {
            for len in 0..24 {
                let junk = vec![0xffu8; len];
                let _ = layout.parse_request(&junk);
                let _ = layout.read_reply_data(&junk, 0, 4);
                let _ = layout.check_write_reply(&junk, 0, 4);
            }
            assert!(layout.read_reply_data(&[0; 20], 0, u64::MAX).is_err());
        }
        let mut short = DmaLayout::QemuLegacy.read_reply(0, b"abcd");
        short.truncate(14);
        assert!(DmaLayout::QemuLegacy.read_reply_data(&short, 0, 4).is_err());
    }
}
