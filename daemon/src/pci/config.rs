//! The virtual config space a guest sees, with per-byte write masks.

use super::caps::{CAPABILITY_LIST, CONFIG_SPACE_SIZE, EXT_CAP_START, STATUS_CAP_LIST};

/// Why a config-space access was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigSpaceError {
    #[error("config access of {len} bytes at {offset:#x} is outside the {size}-byte config space")]
    CheckRange {
        offset: u64,
        len: usize,
        size: usize,
    },
}

/// A 4 KiB PCI Express config space.
///
/// Invariant: a guest write changes only bits set in `wmask` (or clears bits set in `w1c`);
/// every other bit keeps the value the model put there, so read-only registers and capability
/// headers cannot be forged by the guest.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    reset_bytes: Vec<u8>,
}

impl ConfigSpace {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a config space has at least its header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// All bytes, as the guest would read them.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, ConfigSpaceError> {
        let err = ConfigSpaceError::CheckRange {
            offset,
            len,
            size: self.bytes.len(),
        };
        let start = usize::try_from(offset).map_err(|_| err.clone())?;
        match start.checked_add(len) {
            Some(end) if end <= self.bytes.len() => Ok(start),
            _ => Err(err),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ConfigSpaceError> {
        let start = self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }

    /// Applies a guest write through the masks.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigSpaceError> {
        let start = self.check(offset, data.len())?;
        for (i, &v) in data.iter().enumerate() {
            let at = start + i;
            let m = self.wmask[at];
            let c = self.w1c[at];
            self.bytes[at] = ((self.bytes[at] & !m) | (v & m)) & !(v & c);
        }
        Ok(())
    }

    /// Little-endian u16 at `offset` (0 if out of range).
    pub fn u16_at(&self, offset: usize) -> u16 {
        self.bytes
            .get(offset..offset + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// Little-endian u32 at `offset` (0 if out of range).
    pub fn u32_at(&self, offset: usize) -> u32 {
        self.bytes
            .get(offset..offset + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Sets a register from the model side (not masked), e.g. a status bit the device raises.
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        if let Some(b) = self.bytes.get_mut(offset..offset + 2) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Restores the values the space had when it was built (device reset).
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.reset_bytes);
    }
}

/// Builds a [`ConfigSpace`]: header fields, BARs, and capabilities linked into their chains.
#[derive(Debug)]
pub struct ConfigSpaceBuilder {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    last_standard: Option<usize>,
    next_standard: usize,
    last_extended: Option<usize>,
    next_extended: usize,
}

impl ConfigSpaceBuilder {
    /// A type-0 header with ids and class code; command register bits (I/O, memory, bus master,
    /// INTx disable) and the interrupt line are guest-writable.
    pub fn new(vendor: u16, device: u16, class_code: u32, revision: u8) -> ConfigSpaceBuilder {
        let mut b = ConfigSpaceBuilder {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            wmask: vec![0; CONFIG_SPACE_SIZE],
            w1c: vec![0; CONFIG_SPACE_SIZE],
            last_standard: None,
            next_standard: 0x40,
            last_extended: None,
            next_extended: EXT_CAP_START,
        };
        b.put(0x00, &vendor.to_le_bytes());
        b.put(0x02, &device.to_le_bytes());
        b.put(0x08, &[revision]);
        b.put(0x09, &class_code.to_le_bytes()[..3]);
        b.put(0x2c, &vendor.to_le_bytes());
        b.put(0x2e, &device.to_le_bytes());
        b.writable(0x04, &0x0407u16.to_le_bytes());
        b.w1c_bits(0x06, &0xf900u16.to_le_bytes());
        b.writable(0x3c, &[0xff]);
        b
    }

    fn put(&mut self, at: usize, data: &[u8]) {
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    /// Marks bits guest-writable.
    pub fn writable(&mut self, at: usize, mask: &[u8]) -> &mut Self {
        for (i, m) in mask.iter().enumerate() {
            self.wmask[at + i] |= m;
        }
        self
    }

    /// Marks bits write-1-to-clear.
    pub fn w1c_bits(&mut self, at: usize, mask: &[u8]) -> &mut Self {
        for (i, m) in mask.iter().enumerate() {
            self.w1c[at + i] |= m;
        }
        self
    }

    /// Sets the interrupt pin (1 = INTA).
    pub fn interrupt_pin(&mut self, pin: u8) -> &mut Self {
        self.put(0x3d, &[pin]);
        self
    }

    /// A 32-bit non-prefetchable memory BAR of `size` bytes (a power of two >= 16). The address
    /// bits above the size are writable, so the guest's sizing probe reads back `!(size-1)`.
    pub fn memory_bar32(&mut self, bar: usize, size: u32) -> &mut Self {
        let at = 0x10 + 4 * bar;
        let mask = !(size.max(16) - 1);
        self.writable(at, &mask.to_le_bytes());
        self
    }

    /// Appends a standard capability with `body` (bytes after id/next), returning its offset.
    pub fn standard_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let at = self.next_standard;
        self.put(at, &[id, 0]);
        self.put(at + 2, body);
        match self.last_standard {
            None => {
                self.put(CAPABILITY_LIST, &[at as u8]);
                let status = u16::from_le_bytes([self.bytes[6], self.bytes[7]]) | STATUS_CAP_LIST;
                self.put(0x06, &status.to_le_bytes());
            }
            Some(prev) => self.bytes[prev + 1] = at as u8,
        }
        self.last_standard = Some(at);
        self.next_standard = (at + 2 + body.len() + 3) & !3;
        at
    }

    /// Appends an extended capability with `body` (bytes after the 4-byte header).
    pub fn extended_capability(&mut self, id: u16, version: u8, body: &[u8]) -> usize {
        let at = self.next_extended;
        let header = u32::from(id) | u32::from(version & 0xf) << 16;
        self.put(at, &header.to_le_bytes());
        self.put(at + 4, body);
        if let Some(prev) = self.last_extended {
            let h = u32::from_le_bytes([
                self.bytes[prev],
                self.bytes[prev + 1],
                self.bytes[prev + 2],
                self.bytes[prev + 3],
            ]) | (at as u32) << 20;
            self.put(prev, &h.to_le_bytes());
        }
        self.last_extended = Some(at);
        self.next_extended = (at + 4 + body.len() + 3) & !3;
        at
    }

    /// Finishes the space; its current contents become the reset values.
    pub fn build(self) -> ConfigSpace {
        ConfigSpace {
            reset_bytes: self.bytes.clone(),
            bytes: self.bytes,
            wmask: self.wmask,
            w1c: self.w1c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::caps::{CapabilityChain, CAP_ID_MSI, EXT_CAP_ID_ATS, EXT_CAP_ID_PRI};
    use super::*;

    #[test]
    fn masks_protect_read_only_bits_and_bars_size() {
        let mut b = ConfigSpaceBuilder::new(0x1234, 0x5678, 0x088000, 1);
        b.memory_bar32(0, 0x4000);
        let msi = b.standard_capability(CAP_ID_MSI, &[0; 12]);
        b.extended_capability(EXT_CAP_ID_ATS, 1, &[0; 4]);
        b.extended_capability(EXT_CAP_ID_PRI, 1, &[0; 12]);
        let mut cs = b.build();
        cs.write(0, &[0xff; 4]).unwrap();
        assert_eq!(cs.u16_at(0), 0x1234, "vendor id is read-only");
        cs.write(0x10, &[0xff; 4]).unwrap();
        assert_eq!(cs.u32_at(0x10), !0x3fffu32);
        cs.write(0x04, &[0xff, 0xff]).unwrap();
        assert_eq!(cs.u16_at(0x04), 0x0407);
        let chain = CapabilityChain::walk(cs.bytes());
        assert_eq!(chain.find_standard(CAP_ID_MSI), Some(msi));
        assert_eq!(chain.extended.len(), 2);
        assert!(cs.write(4094, &[0; 4]).is_err());
        assert!(cs.read(u64::MAX, &mut [0; 4]).is_err());
        cs.reset();
        assert_eq!(cs.u16_at(0x04), 0);
    }
}
