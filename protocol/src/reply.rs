//! Reply encoders for the server, and the region-info capability chain (both directions).
//!
//! Reply sizes follow what QEMU's client requires: GET_INFO and IRQ_INFO exactly 32 bytes,
//! header-only replies for DMA_MAP, SET_IRQS and RESET, a 24-byte echo for DMA_UNMAP, and a region
//! info whose caps (and fd) are only included when the client's argsz has room for them.

use zerocopy::{FromBytes, IntoBytes};

use crate::frame::encode;
use crate::wire::{self, Header, FLAG_TYPE_REPLY};

/// Encodes a successful reply to `request` with the given payload parts.
pub fn ok(request: &Header, payload: &[&[u8]]) -> Vec<u8> {
    encode(request.msg_id, request.command, FLAG_TYPE_REPLY, 0, payload)
}

/// A capability of a region-info reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionCap {
    /// mmap-able areas, offsets relative to the region's `offset`.
    SparseMmap(Vec<wire::SparseMmapArea>),
    /// Device-specific region type.
    Type { type_: u32, subtype: u32 },
}

impl RegionCap {
    fn encoded_len(&self) -> usize {
        match self {
            RegionCap::SparseMmap(areas) => 8 + 8 + 16 * areas.len(),
            RegionCap::Type { .. } => 8 + 8,
        }
    }
}

/// What the device says about a region, before argsz rules are applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionDescription {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// mmap offset into the region's fd.
    pub offset: u64,
    pub caps: Vec<RegionCap>,
}

/// Encodes a region-info reply payload for a request with `argsz`. Returns the payload and
/// whether the caps were included (the caller attaches the region's fd only then, so the client
/// gets exactly one fd, in the reply it keeps).
pub fn region_info(argsz: u32, region: &RegionDescription) -> (Vec<u8>, bool) {
    let base = core::mem::size_of::<wire::RegionInfo>();
    let caps_len: usize = region.caps.iter().map(RegionCap::encoded_len).sum();
    let full = base + caps_len;
    let include = !region.caps.is_empty() && argsz as usize >= full;
    let mut info = wire::RegionInfo {
        argsz: u32::try_from(full).unwrap_or(u32::MAX),
        flags: region.flags & !wire::REGION_FLAG_CAPS,
        index: region.index,
        cap_offset: 0,
        size: region.size,
        offset: region.offset,
    };
    if !include {
        return (info.as_bytes().to_vec(), false);
    }
    info.flags |= wire::REGION_FLAG_CAPS;
    info.cap_offset = base as u32;
    let mut out = info.as_bytes().to_vec();
    let mut at = base;
    for (i, cap) in region.caps.iter().enumerate() {
        let next = if i + 1 == region.caps.len() {
            0
        } else {
            (at + cap.encoded_len()) as u32
        };
        match cap {
            RegionCap::SparseMmap(areas) => {
                out.extend_from_slice(
                    wire::InfoCapHeader {
                        id: wire::REGION_CAP_SPARSE_MMAP,
                        version: 1,
                        next,
                    }
                    .as_bytes(),
                );
                out.extend_from_slice(
                    wire::SparseMmapHeader {
                        nr_areas: areas.len() as u32,
                        reserved: 0,
                    }
                    .as_bytes(),
                );
                for a in areas {
                    out.extend_from_slice(a.as_bytes());
                }
            }
            RegionCap::Type { type_, subtype } => {
                out.extend_from_slice(
                    wire::InfoCapHeader {
                        id: wire::REGION_CAP_TYPE,
                        version: 1,
                        next,
                    }
                    .as_bytes(),
                );
                out.extend_from_slice(
                    wire::RegionTypeCap {
                        type_: *type_,
                        subtype: *subtype,
                    }
                    .as_bytes(),
                );
            }
        }
        at += cap.encoded_len();
    }
    (out, true)
}

/// Why a region-info reply's capability chain could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionCapError {
    #[error("the region info is shorter than 32 bytes")]
    ParseInfo,
    #[error("capability offset {0} is outside the reply or does not advance")]
    CheckOffset(u32),
    #[error("capability at offset {0} is truncated")]
    ParseCap(u32),
}

/// Parses a region-info reply payload (the client side of [`region_info`]), defensively: every
/// offset must lie inside the reply and the chain must move forward.
pub fn parse_region_info(payload: &[u8]) -> Result<RegionDescription, RegionCapError> {
    let (info, _) =
        wire::RegionInfo::read_from_prefix(payload).map_err(|_| RegionCapError::ParseInfo)?;
    let mut out = RegionDescription {
        index: info.index,
        flags: info.flags,
        size: info.size,
        offset: info.offset,
        caps: Vec::new(),
    };
    if info.flags & wire::REGION_FLAG_CAPS == 0 {
        return Ok(out);
    }
    let mut next = info.cap_offset;
    let mut last = 0u32;
    while next != 0 {
        if next <= last || (next as usize) < core::mem::size_of::<wire::RegionInfo>() {
            return Err(RegionCapError::CheckOffset(next));
        }
        let at = next as usize;
        let body = payload.get(at..).ok_or(RegionCapError::CheckOffset(next))?;
        let (hdr, rest) = wire::InfoCapHeader::read_from_prefix(body)
            .map_err(|_| RegionCapError::ParseCap(next))?;
        match hdr.id {
            wire::REGION_CAP_SPARSE_MMAP => {
                let (sh, mut rest) = wire::SparseMmapHeader::read_from_prefix(rest)
                    .map_err(|_| RegionCapError::ParseCap(next))?;
                let mut areas = Vec::new();
                for _ in 0..sh.nr_areas {
                    let (a, r) = wire::SparseMmapArea::read_from_prefix(rest)
                        .map_err(|_| RegionCapError::ParseCap(next))?;
                    areas.push(a);
                    rest = r;
                }
                out.caps.push(RegionCap::SparseMmap(areas));
            }
            wire::REGION_CAP_TYPE => {
                let (t, _) = wire::RegionTypeCap::read_from_prefix(rest)
                    .map_err(|_| RegionCapError::ParseCap(next))?;
                out.caps.push(RegionCap::Type {
                    type_: t.type_,
                    subtype: t.subtype,
                });
            }
            _ => {}
        }
        last = next;
        next = hdr.next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mappable() -> RegionDescription {
        RegionDescription {
            index: 2,
            flags: wire::REGION_FLAG_READ | wire::REGION_FLAG_WRITE | wire::REGION_FLAG_MMAP,
            size: 0x10000,
            offset: 0,
            caps: vec![
                RegionCap::SparseMmap(vec![wire::SparseMmapArea {
                    offset: 0,
                    size: 0x10000,
                }]),
                RegionCap::Type {
                    type_: 1,
                    subtype: 2,
                },
            ],
        }
    }

    #[test]
    fn short_argsz_gets_the_full_size_and_no_caps() {
        let (p, caps) = region_info(32, &mappable());
        assert!(!caps);
        assert_eq!(p.len(), 32);
        let info = wire::RegionInfo::read_from_bytes(&p).unwrap();
        assert_eq!(info.argsz, 32 + 32 + 16);
        assert_eq!(info.cap_offset, 0);
        assert_eq!(info.flags & wire::REGION_FLAG_CAPS, 0);
    }

    #[test]
    fn full_argsz_round_trips() {
        let (p, caps) = region_info(1024, &mappable());
        assert!(caps);
        assert_eq!(p.len(), 80);
        let parsed = parse_region_info(&p).unwrap();
        assert_eq!(parsed.caps, mappable().caps);
    }

    #[test]
    fn hostile_cap_chains_are_rejected() {
        let (mut p, _) = region_info(1024, &mappable());
        // Point the second capability's `next` back at the first: a loop.
        p[32 + 4..32 + 8].copy_from_slice(&32u32.to_ne_bytes());
        let (mut q, _) = region_info(1024, &mappable());
        q[32 + 4..32 + 8].copy_from_slice(&32u32.to_ne_bytes());
        assert!(parse_region_info(&q).is_err());
        let (mut r, _) = region_info(1024, &mappable());
        r[12..16].copy_from_slice(&4000u32.to_ne_bytes());
        assert_eq!(
            parse_region_info(&r),
            Err(RegionCapError::CheckOffset(4000))
        );
        p.truncate(40);
        assert!(parse_region_info(&p).is_err());
    }
}
