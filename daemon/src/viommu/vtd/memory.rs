//! Guest-physical memory as the VT-d model sees it.
//!
//! The model reads the guest's root/context/PASID tables, page tables and invalidation queue,
//! and writes accessed/dirty bits and wait-descriptor status words. It does so through this
//! narrow, synchronous, fallible trait so that it stays pure logic: the daemon adapts its DMA
//! map table to it, unit tests use [`VecGuestMemory`].

use std::cell::Cell;

use thiserror::Error;

/// A guest-physical access the backing memory could not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("Guest-physical range {gpa:#x}+{len:#x} is not accessible.")]
pub struct GuestMemoryError {
    /// First guest-physical address of the failed access.
    pub gpa: u64,
    /// Length of the failed access in bytes.
    pub len: u64,
}

/// Byte access to guest-physical memory. Implementations must never panic on any address or
/// length; an unbacked or overflowing range is an error.
pub trait GuestMemoryAccess {
    /// Read `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Write `data` at `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError>;

    /// Replace the little-endian u64 at `gpa` with `new` if it still holds `expected`;
    /// returns whether it did. Used for accessed/dirty-bit updates, which hardware performs
    /// atomically; the default is a plain read-modify-write, adequate when nothing else writes
    /// the guest's tables concurrently (an adapter over shared memory should override it).
    fn compare_exchange_u64(
        &mut self,
        gpa: u64,
        expected: u64,
        new: u64,
    ) -> Result<bool, GuestMemoryError> {
        if read_u64(self, gpa)? != expected {
            return Ok(false);
        }
        self.write(gpa, &new.to_le_bytes())?;
        Ok(true)
    }
}

/// Read a little-endian u64 (all VT-d structures are little-endian).
pub fn read_u64<M: GuestMemoryAccess + ?Sized>(mem: &M, gpa: u64) -> Result<u64, GuestMemoryError> {
    let mut b = [0u8; 8];
    mem.read(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Read `N` consecutive little-endian u64 words starting at `gpa`.
pub fn read_qwords<M: GuestMemoryAccess + ?Sized, const N: usize>(
    mem: &M,
    gpa: u64,
) -> Result<[u64; N], GuestMemoryError> {
    let mut out = [0u64; N];
    let mut b = [0u8; 8];
    for (i, q) in out.iter_mut().enumerate() {
        // i < N <= 8, so the offset cannot overflow beyond what checked_add catches.
        let at = gpa.checked_add(8 * i as u64).ok_or(GuestMemoryError {
            gpa,
            len: 8 * N as u64,
        })?;
        mem.read(at, &mut b)?;
        *q = u64::from_le_bytes(b);
    }
    Ok(out)
}

/// A flat, Vec-backed guest memory starting at `base`, for unit tests and the fuzz-style
/// property tests. It counts accesses so tests can prove that every operation does a bounded
/// amount of work, and can refuse writes to one range to exercise write-back failures.
#[derive(Debug, Clone)]
pub struct VecGuestMemory {
    base: u64,
    bytes: Vec<u8>,
    read_only: Option<(u64, u64)>,
    accesses: Cell<u64>,
}

impl VecGuestMemory {
    /// `size` zeroed bytes at guest-physical `base`.
    pub fn new(base: u64, size: usize) -> Self {
        Self {
            base,
            bytes: vec![0; size],
            read_only: None,
            accesses: Cell::new(0),
        }
    }

    /// Memory at `base` holding exactly `bytes`.
    pub fn from_bytes(base: u64, bytes: Vec<u8>) -> Self {
        Self {
            base,
            bytes,
            read_only: None,
            accesses: Cell::new(0),
        }
    }

    /// Make writes into `[start, end)` fail (reads still succeed).
    pub fn set_read_only(&mut self, start: u64, end: u64) {
        self.read_only = Some((start, end));
    }

    /// Number of read and write calls served or refused so far.
    pub fn accesses(&self) -> u64 {
        self.accesses.get()
    }

    /// Read a u64 directly (test convenience; panics are not possible, errors are returned).
    pub fn get_u64(&self, gpa: u64) -> Result<u64, GuestMemoryError> {
        read_u64(self, gpa)
    }

    /// Write a u64 directly.
    pub fn put_u64(&mut self, gpa: u64, v: u64) -> Result<(), GuestMemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, GuestMemoryError> {
        let err = GuestMemoryError {
            gpa,
            len: len as u64,
        };
        let start = gpa.checked_sub(self.base).ok_or(err)?;
        let start = usize::try_from(start).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > self.bytes.len() {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl GuestMemoryAccess for VecGuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.accesses.set(self.accesses.get().saturating_add(1));
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.accesses.set(self.accesses.get().saturating_add(1));
        let err = GuestMemoryError {
            gpa,
            len: data.len() as u64,
        };
        if let Some((s, e)) = self.read_only {
            let end = gpa.saturating_add(data.len() as u64);
            if gpa < e && end > s {
                return Err(err);
            }
        }
        let r = self.range(gpa, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}
