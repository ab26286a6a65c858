//! Capability ids, register offsets and a defensive walker over both capability lists.

use std::fmt;

/// Standard capability: power management.
pub const CAP_ID_PM: u8 = 0x01;
/// Standard capability: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Standard capability: PCI Express.
pub const CAP_ID_EXP: u8 = 0x10;
/// Standard capability: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// Extended capability id 0: the null capability. The kernel and QEMU leave it at 0x100 when
/// they hide the first extended capability, so the list still starts there and links on.
pub const EXT_CAP_ID_NULL: u16 = 0x0000;
/// Extended capability: Address Translation Services.
pub const EXT_CAP_ID_ATS: u16 = 0x000f;
/// Extended capability: Page Request Interface.
pub const EXT_CAP_ID_PRI: u16 = 0x0013;
/// Extended capability: Process Address Space ID.
pub const EXT_CAP_ID_PASID: u16 = 0x001b;

/// Size of the ATS extended capability.
pub const ATS_CAP_LEN: usize = 8;
/// Size of the PASID extended capability.
pub const PASID_CAP_LEN: usize = 8;
/// Size of the PRI extended capability.
pub const PRI_CAP_LEN: usize = 16;

/// Offset of the capabilities pointer in the type-0 header.
pub const CAPABILITY_LIST: usize = 0x34;
/// Status register bit: a capability list is present.
pub const STATUS_CAP_LIST: u16 = 0x10;
/// First extended capability.
pub const EXT_CAP_START: usize = 0x100;
/// Size of PCI Express configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of conventional PCI configuration space.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

/// The human name of a standard capability id.
pub fn standard_name(id: u8) -> &'static str {
    match id {
        CAP_ID_PM => "Power Management",
        0x03 => "VPD",
        CAP_ID_MSI => "MSI",
        0x09 => "Vendor Specific",
        CAP_ID_EXP => "PCI Express",
        CAP_ID_MSIX => "MSI-X",
        0x12 => "SATA",
        0x13 => "Advanced Features",
        _ => "unknown",
    }
}

/// The human name of an extended capability id.
pub fn extended_name(id: u16) -> &'static str {
    match id {
        EXT_CAP_ID_NULL => "Null",
        0x0001 => "Advanced Error Reporting",
        0x0003 => "Device Serial Number",
        0x000b => "Vendor Specific",
        0x000d => "ACS",
        0x000e => "ARI",
        EXT_CAP_ID_ATS => "ATS",
        0x0010 => "SR-IOV",
        EXT_CAP_ID_PRI => "PRI",
        0x0015 => "Resizable BAR",
        EXT_CAP_ID_PASID => "PASID",
        _ => "unknown",
    }
}

/// One capability found in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityEntry {
    /// Offset in config space.
    pub offset: usize,
    /// Capability id (8 bits for standard, 16 for extended).
    pub id: u16,
    /// Version (extended capabilities only).
    pub version: u8,
    /// Whether the capability is in the extended list (from 0x100).
    pub extended: bool,
    /// Bytes the capability occupies: the full layout for capabilities whose size is known
    /// (see [`standard_len`] and [`extended_len`]), else just the header.
    pub len: usize,
}

impl CapabilityEntry {
    /// One past the last byte of the capability.
    pub fn end(&self) -> usize {
        self.offset + self.len
    }
}

/// Size of a standard capability at `offset`, from its id (and, for MSI and PCI Express, its
/// flags); 2 (id and next pointer) for capabilities whose layout vfud does not know.
pub fn standard_len(bytes: &[u8], offset: usize, id: u8) -> usize {
    match id {
        CAP_ID_PM => 8,
        CAP_ID_MSI => {
            let control = u16_at(bytes, offset + 2);
            let address64 = if control & 0x0080 != 0 { 4 } else { 0 };
            let per_vector_mask = if control & 0x0100 != 0 { 10 } else { 0 };
            10 + address64 + per_vector_mask
        }
        CAP_ID_EXP => {
            if u16_at(bytes, offset + 2) & 0xf >= 2 {
                0x3c
            } else {
                0x14
            }
        }
        CAP_ID_MSIX => 12,
        _ => 2,
    }
}

/// Size of an extended capability; 4 (the header) for capabilities whose layout vfud does not
/// know.
pub fn extended_len(id: u16) -> usize {
    match id {
        EXT_CAP_ID_ATS => ATS_CAP_LEN,
        EXT_CAP_ID_PASID => PASID_CAP_LEN,
        EXT_CAP_ID_PRI => PRI_CAP_LEN,
        _ => 4,
    }
}

impl fmt::Display for CapabilityEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.extended {
            write!(
                f,
                "[{:#05x}] {} (id {:#06x}, v{})",
                self.offset,
                extended_name(self.id),
                self.id,
                self.version
            )
        } else {
            write!(
                f,
                "[{:#04x}] {} (id {:#04x})",
                self.offset,
                standard_name(self.id as u8),
                self.id
            )
        }
    }
}

/// Why a capability chain is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// A pointer leads into the header (below 0x40 for the standard list, below 0x100 for the
    /// extended one) or past the end of the list's area.
    #[error("capability pointer {pointer:#x} at {at:#x} points outside the {list} list area {start:#x}..{limit:#x}")]
    CheckPointer {
        /// "standard" or "extended".
        list: &'static str,
        /// Where the pointer was read.
        at: usize,
        /// The pointer.
        pointer: usize,
        /// First valid offset of the list's area.
        start: usize,
        /// End of the list's area.
        limit: usize,
    },
    /// An extended capability's next pointer has its reserved low bits set.
    #[error("capability pointer {pointer:#x} at {at:#x} is not dword-aligned")]
    CheckAlignment {
        /// Where the pointer was read.
        at: usize,
        /// The pointer.
        pointer: usize,
    },
    /// A pointer leads back to a capability already visited.
    #[error("the {list} capability list loops back to {pointer:#x}")]
    CheckLoop {
        /// "standard" or "extended".
        list: &'static str,
        /// The capability visited twice.
        pointer: usize,
    },
    /// A next pointer leads to an empty (all-zero or all-one) extended capability header.
    #[error("the extended capability at {at:#x} links to {pointer:#x}, where there is no capability header")]
    CheckLink {
        /// The capability whose next pointer dangles.
        at: usize,
        /// Where it points.
        pointer: usize,
    },
    /// A capability runs past the end of its list's area.
    #[error("the {list} capability {id:#x} at {offset:#x} is {len} bytes long and runs past the end of the list area at {limit:#x}")]
    CheckLength {
        /// "standard" or "extended".
        list: &'static str,
        /// The capability's offset.
        offset: usize,
        /// Its id.
        id: u16,
        /// Its size.
        len: usize,
        /// End of the list's area.
        limit: usize,
    },
    /// Two capabilities share bytes.
    #[error("the {list} capabilities at {first:#x} ({first_len} bytes) and {second:#x} overlap")]
    CheckOverlap {
        /// "standard" or "extended".
        list: &'static str,
        /// The lower capability's offset.
        first: usize,
        /// Its size.
        first_len: usize,
        /// The higher capability's offset.
        second: usize,
    },
}

/// The capabilities found in both lists, plus the first problem met in each (the entries
/// before a problem are still reported).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityChain {
    /// The standard list in chain order.
    pub standard: Vec<CapabilityEntry>,
    /// The extended list in chain order, including a null capability (id 0) at 0x100.
    pub extended: Vec<CapabilityEntry>,
    /// The first problem in the standard list.
    pub standard_error: Option<WalkError>,
    /// The first problem in the extended list.
    pub extended_error: Option<WalkError>,
}

/// The little-endian u16 at `at` of config-space bytes; 0 when it does not fit, which is what
/// reading past the end of config space yields on the bus.
pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    at.checked_add(2)
        .and_then(|end| bytes.get(at..end))
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

/// The little-endian u32 at `at` of config-space bytes; 0 when it does not fit.
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    at.checked_add(4)
        .and_then(|end| bytes.get(at..end))
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl CapabilityChain {
    /// Walks both lists of `bytes` (256 or 4096 bytes; shorter input just ends the walk),
    /// then checks that no capability runs past its area or overlaps another. Never follows
    /// more entries than could fit, so it terminates on any input.
    pub fn walk(bytes: &[u8]) -> CapabilityChain {
        let mut out = CapabilityChain::default();
        let status = u16_at(bytes, 0x06);
        let standard_limit = bytes.len().min(LEGACY_CONFIG_SPACE_SIZE);
        if status & STATUS_CAP_LIST != 0 {
            let mut seen = [false; LEGACY_CONFIG_SPACE_SIZE];
            let mut at = CAPABILITY_LIST;
            let mut ptr = bytes.get(CAPABILITY_LIST).copied().unwrap_or(0) as usize & !0x3;
            while ptr != 0 {
                if ptr < 0x40 || ptr + 2 > standard_limit {
                    out.standard_error = Some(WalkError::CheckPointer {
                        list: "standard",
                        at,
                        pointer: ptr,
                        start: 0x40,
                        limit: standard_limit,
                    });
                    break;
                }
                if seen[ptr] {
                    out.standard_error = Some(WalkError::CheckLoop {
                        list: "standard",
                        pointer: ptr,
                    });
                    break;
                }
                seen[ptr] = true;
                let id = bytes[ptr];
                out.standard.push(CapabilityEntry {
                    offset: ptr,
                    id: u16::from(id),
                    version: 0,
                    extended: false,
                    len: standard_len(bytes, ptr, id),
                });
                at = ptr + 1;
                ptr = bytes[ptr + 1] as usize & !0x3;
            }
            if out.standard_error.is_none() {
                out.standard_error = check_spans("standard", &out.standard, standard_limit);
            }
        }
        if bytes.len() > EXT_CAP_START {
            let limit = bytes.len().min(CONFIG_SPACE_SIZE);
            let mut seen = vec![false; CONFIG_SPACE_SIZE];
            let mut ptr = EXT_CAP_START;
            loop {
                let header = u32_at(bytes, ptr);
                if header == 0 || header == 0xffff_ffff {
                    break;
                }
                if seen[ptr] {
                    out.extended_error = Some(WalkError::CheckLoop {
                        list: "extended",
                        pointer: ptr,
                    });
                    break;
                }
                seen[ptr] = true;
                let id = (header & 0xffff) as u16;
                out.extended.push(CapabilityEntry {
                    offset: ptr,
                    id,
                    version: ((header >> 16) & 0xf) as u8,
                    extended: true,
                    len: extended_len(id),
                });
                let next = (header >> 20) as usize;
                if next == 0 {
                    break;
                }
                if next & 0x3 != 0 {
                    out.extended_error = Some(WalkError::CheckAlignment {
                        at: ptr,
                        pointer: next,
                    });
                    break;
                }
                if next < EXT_CAP_START || next + 4 > limit {
                    out.extended_error = Some(WalkError::CheckPointer {
                        list: "extended",
                        at: ptr,
                        pointer: next,
                        start: EXT_CAP_START,
                        limit,
                    });
                    break;
                }
                if matches!(u32_at(bytes, next), 0 | 0xffff_ffff) {
                    out.extended_error = Some(WalkError::CheckLink {
                        at: ptr,
                        pointer: next,
                    });
                    break;
                }
                ptr = next;
            }
            if out.extended_error.is_none() {
                out.extended_error = check_spans("extended", &out.extended, limit);
            }
        }
        out
    }

    /// Walks both lists and insists that they are well-formed: the first problem in either
    /// list is returned as the error. For config spaces vfud rebuilds, where following a
    /// broken chain "as far as it goes" could hide a capability the policy must see.
    pub fn parse(bytes: &[u8]) -> Result<CapabilityChain, WalkError> {
        let chain = CapabilityChain::walk(bytes);
        match chain
            .standard_error
            .clone()
            .or(chain.extended_error.clone())
        {
            Some(err) => Err(err),
            None => Ok(chain),
        }
    }

    /// The first standard capability with `id`.
    pub fn find_standard(&self, id: u8) -> Option<usize> {
        self.standard
            .iter()
            .find(|c| c.id == u16::from(id))
            .map(|c| c.offset)
    }

    /// The first extended capability with `id`.
    pub fn find_extended(&self, id: u16) -> Option<usize> {
        self.extended.iter().find(|c| c.id == id).map(|c| c.offset)
    }
}

/// The first capability that runs past `limit` or overlaps another one of the same list.
fn check_spans(list: &'static str, caps: &[CapabilityEntry], limit: usize) -> Option<WalkError> {
    if let Some(c) = caps.iter().find(|c| c.end() > limit) {
        return Some(WalkError::CheckLength {
            list,
            offset: c.offset,
            id: c.id,
            len: c.len,
            limit,
        });
    }
    let mut sorted: Vec<&CapabilityEntry> = caps.iter().collect();
    sorted.sort_by_key(|c| c.offset);
    sorted.windows(2).find_map(|pair| {
        (pair[0].end() > pair[1].offset).then(|| WalkError::CheckOverlap {
            list,
            first: pair[0].offset,
            first_len: pair[0].len,
            second: pair[1].offset,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<u8> {
        let mut b = vec![0u8; CONFIG_SPACE_SIZE];
        b[0x06] = STATUS_CAP_LIST as u8;
        b
    }

    #[test]
    fn walks_both_lists() {
        let mut b = base();
        b[0x34] = 0x40;
        b[0x40] = CAP_ID_MSI;
        b[0x41] = 0x50;
        b[0x50] = CAP_ID_EXP;
        b[0x51] = 0;
        b[0x100..0x104]
            .copy_from_slice(&(u32::from(EXT_CAP_ID_ATS) | 1 << 16 | 0x110 << 20).to_le_bytes());
        b[0x110..0x114].copy_from_slice(&(u32::from(EXT_CAP_ID_PASID) | 1 << 16).to_le_bytes());
        let c = CapabilityChain::walk(&b);
        assert_eq!(c.standard.len(), 2);
        assert_eq!(c.find_standard(CAP_ID_EXP), Some(0x50));
        assert_eq!(c.find_extended(EXT_CAP_ID_PASID), Some(0x110));
        assert!(c.standard_error.is_none() && c.extended_error.is_none());
    }

    #[test]
    fn loops_and_wild_pointers_terminate_with_an_error() {
        let mut b = base();
        b[0x34] = 0x40;
        b[0x40] = CAP_ID_MSI;
        b[0x41] = 0x40;
        b[0x100..0x104].copy_from_slice(&(0x0001u32 | 0x100 << 20).to_le_bytes());
        let c = CapabilityChain::walk(&b);
        assert_eq!(c.standard.len(), 1);
        assert!(matches!(
            c.standard_error,
            Some(WalkError::CheckLoop { .. })
        ));
        assert!(matches!(
            c.extended_error,
            Some(WalkError::CheckLoop { .. })
        ));

        let mut b = base();
        b[0x34] = 0x10;
        b[0x100..0x104].copy_from_slice(&(0x0001u32 | 0x080 << 20).to_le_bytes());
        let c = CapabilityChain::walk(&b);
        assert!(matches!(
            c.standard_error,
            Some(WalkError::CheckPointer { .. })
        ));
        assert!(matches!(
            c.extended_error,
            Some(WalkError::CheckPointer { .. })
        ));
    }

    #[test]
    fn dangling_links_truncation_and_overlaps_are_named() {
        let header = |id: u16, next: u32| (u32::from(id) | 1 << 16 | next << 20).to_le_bytes();
        let mut b = base();
        b[0x100..0x104].copy_from_slice(&header(EXT_CAP_ID_ATS, 0x200));
        let c = CapabilityChain::walk(&b);
        assert_eq!(c.extended.len(), 1, "entries before the problem are kept");
        assert_eq!(
            c.extended_error,
            Some(WalkError::CheckLink {
                at: 0x100,
                pointer: 0x200
            })
        );

        let mut b = base();
        b[0x100..0x104].copy_from_slice(&header(EXT_CAP_ID_ATS, 0x104));
        b[0x104..0x108].copy_from_slice(&header(EXT_CAP_ID_PASID, 0));
        assert!(matches!(
            CapabilityChain::parse(&b),
            Err(WalkError::CheckOverlap {
                first: 0x100,
                first_len: 8,
                second: 0x104,
                ..
            })
        ));

        let mut b = base();
        b[0x100..0x104].copy_from_slice(&header(0x0003, 0xffc));
        b[0xffc..0x1000].copy_from_slice(&header(EXT_CAP_ID_PRI, 0));
        assert!(matches!(
            CapabilityChain::parse(&b),
            Err(WalkError::CheckLength {
                offset: 0xffc,
                len: PRI_CAP_LEN,
                ..
            })
        ));

        let mut b = base();
        b[0x34] = 0xf8;
        b[0xf8] = CAP_ID_MSIX;
        assert!(matches!(
            CapabilityChain::parse(&b),
            Err(WalkError::CheckLength {
                list: "standard",
                offset: 0xf8,
                len: 12,
                ..
            })
        ));

        // A null capability at 0x100 is part of the list and links on.
        let mut b = base();
        b[0x100..0x104].copy_from_slice(&(0x108u32 << 20).to_le_bytes());
        b[0x108..0x10c].copy_from_slice(&header(EXT_CAP_ID_PASID, 0));
        let c = CapabilityChain::parse(&b).unwrap();
        let ids: Vec<u16> = c.extended.iter().map(|e| e.id).collect();
        assert_eq!(ids, [EXT_CAP_ID_NULL, EXT_CAP_ID_PASID]);
        assert_eq!(extended_name(EXT_CAP_ID_NULL), "Null");
    }

    #[test]
    fn any_bytes_terminate() {
        let mut seed = 0x1234_5678u32;
        for _ in 0..200 {
            let b: Vec<u8> = (0..CONFIG_SPACE_SIZE)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let c = CapabilityChain::walk(&b);
            assert!(c.standard.len() <= 64 && c.extended.len() <= 1024);
        }
        let _ = CapabilityChain::walk(&[]);
        let _ = CapabilityChain::walk(&[0xff; 7]);
    }
}
