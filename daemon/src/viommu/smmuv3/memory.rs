//! Guest-physical memory as the SMMU sees it.
//!
//! The model reads stream tables, context descriptors, page tables and command-queue entries,
//! and writes event-queue records and CMD_SYNC MSI words, all by guest-physical address. The
//! narrow trait keeps the model free of any mapping or socket code; the daemon adapts its DMA
//! map table to it.

use std::cell::RefCell;

/// A failed guest-memory access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestMemoryError {
    /// The range is not backed by guest memory (or wraps the address space).
    #[error("guest-physical range {addr:#x}+{len:#x} is not backed by guest memory")]
    Unmapped {
        /// First byte of the access.
        addr: u64,
        /// Length of the access.
        len: usize,
    },
}

/// Read and write guest-physical bytes.
///
/// Both methods take `&self` so an implementation with interior mutability (the daemon's
/// DMA map table) fits without a borrow dance. An access either completes entirely or fails:
/// the model turns a failure into the architectural abort for what it was doing (F_STE_FETCH,
/// F_WALK_EABT, GERROR.EVENTQ_ABT_ERR, ...), never into a panic.
pub trait GuestMemory {
    /// Fill `buf` from guest-physical `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Store `data` at guest-physical `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), GuestMemoryError>;
}

/// Read one little-endian 64-bit word (all SMMU structures are little-endian; the model
/// advertises IDR0.TTENDIAN = little-endian only).
pub(crate) fn read_u64<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
) -> Result<u64, GuestMemoryError> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Read `N` consecutive little-endian 64-bit words.
pub(crate) fn read_words<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    addr: u64,
) -> Result<[u64; N], GuestMemoryError> {
    let mut out = [0u64; N];
    for (i, w) in out.iter_mut().enumerate() {
        *w = read_u64(mem, addr.wrapping_add(8 * i as u64))?;
    }
    Ok(out)
}

/// A flat, zero-filled guest memory window `[base, base + len)` backed by a `Vec`; anything
/// outside it fails. For unit tests and fuzzing.
#[derive(Debug, Clone)]
pub struct VecMemory {
    base: u64,
    bytes: RefCell<Vec<u8>>,
}

impl VecMemory {
    /// A zeroed window of `len` bytes at guest-physical `base`.
    pub fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            bytes: RefCell::new(vec![0; len]),
        }
    }

    /// A window whose initial contents are `bytes`.
    pub fn from_bytes(base: u64, bytes: Vec<u8>) -> Self {
        Self {
            base,
            bytes: RefCell::new(bytes),
        }
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, GuestMemoryError> {
        let err = GuestMemoryError::Unmapped { addr, len };
        let off = addr.checked_sub(self.base).ok_or(err.clone())?;
        let off = usize::try_from(off).map_err(|_| err.clone())?;
        let end = off.checked_add(len).ok_or(err.clone())?;
        if end > self.bytes.borrow().len() {
            return Err(err);
        }
        Ok(off..end)
    }

    /// Store a little-endian 64-bit word (test helper for building tables).
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), GuestMemoryError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Load a little-endian 64-bit word.
    pub fn read_u64(&self, addr: u64) -> Result<u64, GuestMemoryError> {
        read_u64(self, addr)
    }

    /// Load a little-endian 32-bit word.
    pub fn read_u32(&self, addr: u64) -> Result<u32, GuestMemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let r = self.range(addr, data.len())?;
        self.bytes.borrow_mut()[r].copy_from_slice(data);
        Ok(())
    }
}
