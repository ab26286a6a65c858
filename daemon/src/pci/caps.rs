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

/// Extended capability: Address Translation Services.
pub const EXT_CAP_ID_ATS: u16 = 0x000f;
/// Extended capability: Page Request Interface.
pub const EXT_CAP_ID_PRI: u16 = 0x0013;
/// Extended capability: Process Address Space ID.
pub const EXT_CAP_ID_PASID: u16 = 0x001b;

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
    pub extended: bool,
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

/// Why a capability chain walk stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("capability pointer {pointer:#x} at {at:#x} points outside the {limit:#x}-byte {list} list area")]
    CheckPointer {
        list: &'static str,
        at: usize,
        pointer: usize,
        limit: usize,
    },
    #[error("capability pointer {pointer:#x} at {at:#x} is not dword-aligned")]
    CheckAlignment { at: usize, pointer: usize },
    #[error("the {list} capability list loops back to {pointer:#x}")]
    CheckLoop { list: &'static str, pointer: usize },
}

/// The capabilities found in both lists, plus the first problem met in each (the entries
/// before a problem are still reported).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityChain {
    pub standard: Vec<CapabilityEntry>,
    pub extended: Vec<CapabilityEntry>,
    pub standard_error: Option<WalkError>,
    pub extended_error: Option<WalkError>,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    match bytes.get(at..at + 2) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]),
        None => 0,
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    match bytes.get(at..at + 4) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

impl CapabilityChain {
    /// Walks both lists of `bytes` (256 or 4096 bytes; shorter input just ends the walk).
    /// Never follows more entries than could fit, so it terminates on any input.
    pub fn walk(bytes: &[u8]) -> CapabilityChain {
        let mut out = CapabilityChain::default();
        let status = u16_at(bytes, 0x06);
        if status & STATUS_CAP_LIST != 0 {
            let limit = bytes.len().min(LEGACY_CONFIG_SPACE_SIZE);
            let mut seen = [false; LEGACY_CONFIG_SPACE_SIZE];
            let mut at = CAPABILITY_LIST;
            let mut ptr = bytes.get(CAPABILITY_LIST).copied().unwrap_or(0) as usize & !0x3;
            while ptr != 0 {
                if ptr < 0x40 || ptr + 2 > limit {
                    out.standard_error = Some(WalkError::CheckPointer {
                        list: "standard",
                        at,
                        pointer: ptr,
                        limit,
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
                out.standard.push(CapabilityEntry {
                    offset: ptr,
                    id: u16::from(bytes[ptr]),
                    version: 0,
                    extended: false,
                });
                at = ptr + 1;
                ptr = bytes[ptr + 1] as usize & !0x3;
            }
        }
        if bytes.len() > EXT_CAP_START {
            let limit = bytes.len().min(CONFIG_SPACE_SIZE);
            let mut seen = vec![false; CONFIG_SPACE_SIZE];
            let mut ptr = EXT_CAP_START;
            let mut at = EXT_CAP_START;
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
                out.extended.push(CapabilityEntry {
                    offset: ptr,
                    id: (header & 0xffff) as u16,
                    version: ((header >> 16) & 0xf) as u8,
                    extended: true,
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
                        limit,
                    });
                    break;
                }
                at = ptr;
                ptr = next;
            }
            let _ = at;
        }
        out
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
