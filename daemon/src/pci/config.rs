//! The virtual config space a guest sees, with per-byte write masks and an emulated mask.

use super::caps::{CAPABILITY_LIST, CONFIG_SPACE_SIZE, EXT_CAP_START, STATUS_CAP_LIST};

/// Why a config-space access was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigSpaceError {
    /// The access does not fit in the config space.
    #[error("config access of {len} bytes at {offset:#x} is outside the {size}-byte config space")]
    CheckRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the config space.
        size: usize,
    },
    /// The device bytes handed to [`ConfigSpace::read_merged`] or the mask handed to
    /// [`ConfigSpace::write_masked`] do not match the access length (a caller bug, reported
    /// rather than panicking).
    #[error("config access of {len} bytes came with {other} bytes of device data or mask")]
    CheckLength {
        /// Length of the access.
        len: usize,
        /// Length of the accompanying buffer.
        other: usize,
    },
}

/// The part of a guest write that belongs to the device behind a virtual config space: the
/// bits of `data` selected by `mask` are to be written to the device at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceWrite {
    /// Offset of the first byte.
    pub offset: u64,
    /// The guest's data.
    pub data: Vec<u8>,
    /// Per byte, the bits the device owns (the non-emulated bits).
    pub mask: Vec<u8>,
}

/// A 4 KiB PCI Express config space.
///
/// Invariant: a guest write changes only bits set in `wmask` (or clears bits set in `w1c`);
/// every other bit keeps the value the model put there, so read-only registers and capability
/// headers cannot be forged by the guest.
///
/// Each bit is either *emulated* (its value lives here, in the virtual copy) or belongs to a
/// device behind this space (a host device, or a model's own config space that a capability
/// policy was applied to). Spaces built by [`ConfigSpaceBuilder`] are fully emulated: the model
/// is the device. For the others, [`ConfigSpace::read_merged`] and [`ConfigSpace::write_split`]
/// keep the invariant that writes to emulated bits never reach the device and reads of emulated
/// bits come from the virtual copy.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    emulated: Vec<u8>,
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

    /// Applies a guest write through the masks to every bit, emulated or not: for a fully
    /// emulated space, or for the device side of a [`DeviceWrite`].
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigSpaceError> {
        let start = self.check(offset, data.len())?;
        for (i, &v) in data.iter().enumerate() {
            self.write_byte(start + i, v, 0xff);
        }
        Ok(())
    }

    /// Like [`ConfigSpace::write`], but changes only the bits set in `mask` (which has one
    /// byte per data byte); how a device applies the [`DeviceWrite`] of a space in front of it.
    pub fn write_masked(
        &mut self,
        offset: u64,
        data: &[u8],
        mask: &[u8],
    ) -> Result<(), ConfigSpaceError> {
        let start = self.check(offset, data.len())?;
        if mask.len() != data.len() {
            return Err(ConfigSpaceError::CheckLength {
                len: data.len(),
                other: mask.len(),
            });
        }
        for (i, (&v, &m)) in data.iter().zip(mask).enumerate() {
            self.write_byte(start + i, v, m);
        }
        Ok(())
    }

    /// Applies a guest write to the emulated bits (through the write masks) and returns the
    /// rest for the device, or `None` if the write touches no device bits.
    pub fn write_split(
        &mut self,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<DeviceWrite>, ConfigSpaceError> {
        let start = self.check(offset, data.len())?;
        for (i, &v) in data.iter().enumerate() {
            let emulated = self.emulated[start + i];
            self.write_byte(start + i, v, emulated);
        }
        let mask: Vec<u8> = self.emulated[start..start + data.len()]
            .iter()
            .map(|e| !e)
            .collect();
        if mask.iter().all(|m| *m == 0) {
            return Ok(None);
        }
        Ok(Some(DeviceWrite {
            offset,
            data: data.to_vec(),
            mask,
        }))
    }

    /// Reads what the guest sees at `offset`: emulated bits from the virtual copy, the others
    /// from `device`, the device's bytes for the same range (same length as `buf`).
    pub fn read_merged(
        &self,
        offset: u64,
        device: &[u8],
        buf: &mut [u8],
    ) -> Result<(), ConfigSpaceError> {
        let start = self.check(offset, buf.len())?;
        if device.len() != buf.len() {
            return Err(ConfigSpaceError::CheckLength {
                len: buf.len(),
                other: device.len(),
            });
        }
        for (i, (out, dev)) in buf.iter_mut().zip(device).enumerate() {
            let at = start + i;
            let e = self.emulated[at];
            *out = (self.bytes[at] & e) | (dev & !e);
        }
        Ok(())
    }

    /// The emulated-bit mask, one byte per config-space byte.
    pub fn emulated_mask(&self) -> &[u8] {
        &self.emulated
    }

    fn write_byte(&mut self, at: usize, value: u8, mask: u8) {
        let m = self.wmask[at] & mask;
        let c = self.w1c[at] & mask;
        self.bytes[at] = ((self.bytes[at] & !m) | (value & m)) & !(value & c);
    }

    /// A space in front of a device whose config space is `device`: a copy of its bytes with
    /// nothing emulated and nothing writable yet; the caller marks what it emulates with
    /// [`ConfigSpace::emulate`] and then calls [`ConfigSpace::commit_reset_values`].
    pub(super) fn in_front_of(device: &[u8]) -> ConfigSpace {
        let len = device.len();
        ConfigSpace {
            bytes: device.to_vec(),
            wmask: vec![0; len],
            w1c: vec![0; len],
            emulated: vec![0; len],
            reset_bytes: device.to_vec(),
        }
    }

    /// Makes the bytes at `at` fully emulated with `value` and the given write and
    /// write-1-to-clear masks (each as long as `value`). Out-of-range parts are ignored; the
    /// callers place only ranges they have checked.
    pub(super) fn emulate(&mut self, at: usize, value: &[u8], wmask: &[u8], w1c: &[u8]) {
        for (i, v) in value.iter().enumerate() {
            let Some(byte) = self.bytes.get_mut(at + i) else {
                return;
            };
            *byte = *v;
            self.emulated[at + i] = 0xff;
            self.wmask[at + i] = wmask.get(i).copied().unwrap_or(0);
            self.w1c[at + i] = w1c.get(i).copied().unwrap_or(0);
        }
    }

    /// Sets emulated bytes from the model side, bypassing the write masks (e.g. a status bit
    /// the emulation raises). Out-of-range parts are ignored.
    pub(super) fn set_bytes(&mut self, at: usize, value: &[u8]) {
        if let Some(b) = self.bytes.get_mut(at..at + value.len()) {
            b.copy_from_slice(value);
        }
    }

    /// Records the current contents as the values [`ConfigSpace::reset`] restores.
    pub(super) fn commit_reset_values(&mut self) {
        self.reset_bytes.copy_from_slice(&self.bytes);
    }

    /// Little-endian u16 at `offset` (0 if out of range).
    pub fn u16_at(&self, offset: usize) -> u16 {
        super::caps::u16_at(&self.bytes, offset)
    }

    /// Little-endian u32 at `offset` (0 if out of range).
    pub fn u32_at(&self, offset: usize) -> u32 {
        super::caps::u32_at(&self.bytes, offset)
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

    /// Finishes the space, fully emulated; its current contents become the reset values.
    pub fn build(self) -> ConfigSpace {
        ConfigSpace {
            reset_bytes: self.bytes.clone(),
            emulated: vec![0xff; self.bytes.len()],
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

    #[test]
    fn split_writes_and_merged_reads_respect_the_emulated_mask() {
        let mut device = ConfigSpaceBuilder::new(0x1234, 0x5678, 0x088000, 1).build();
        assert!(
            device.emulated_mask().iter().all(|m| *m == 0xff),
            "builder spaces are fully emulated"
        );
        let mut view = ConfigSpace::in_front_of(device.bytes());
        assert!(view.emulated_mask().iter().all(|m| *m == 0));
        // Emulate the low nibble of byte 0x40 (writable) and all of byte 0x41 (read-only).
        view.emulate(0x40, &[0x0a, 0x55], &[0x0f, 0x00], &[0, 0]);
        view.emulated[0x40] = 0x0f;
        view.commit_reset_values();

        let forwarded = view
            .write_split(0x40, &[0xf3, 0xff])
            .unwrap()
            .expect("device bits");
        assert_eq!(forwarded.offset, 0x40);
        assert_eq!(
            forwarded.mask,
            [0xf0, 0x00],
            "only the non-emulated bits go to the device"
        );
        assert_eq!(
            view.write_split(0x41, &[0xff]).unwrap(),
            None,
            "fully emulated byte"
        );
        device
            .write_masked(0x40, &forwarded.data, &forwarded.mask)
            .unwrap();
        assert_eq!(
            device.bytes()[0x40],
            0,
            "the device's own mask still applies"
        );

        let mut buf = [0u8; 2];
        view.read_merged(0x40, &[0xa0, 0xee], &mut buf).unwrap();
        assert_eq!(
            buf,
            [0xa3, 0x55],
            "emulated bits from the view, the rest from the device"
        );
        view.reset();
        view.read_merged(0x40, &[0xa0, 0xee], &mut buf).unwrap();
        assert_eq!(buf, [0xaa, 0x55]);

        assert!(matches!(
            view.read_merged(0x40, &[0; 3], &mut buf),
            Err(ConfigSpaceError::CheckLength { len: 2, other: 3 })
        ));
        assert!(matches!(
            device.write_masked(0x40, &[0; 2], &[0; 1]),
            Err(ConfigSpaceError::CheckLength { .. })
        ));
        assert!(view.write_split(4095, &[0; 2]).is_err());
        assert!(view.read_merged(u64::MAX, &[0; 2], &mut buf).is_err());
    }
}
