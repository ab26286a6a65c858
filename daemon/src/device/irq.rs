//! Interrupt state of an emulated device: eventfds per index and vector, masks, pending bits.
//!
//! Implements the DEVICE_SET_IRQS semantics (assign / de-assign eventfds over a sub-range,
//! trigger, mask and unmask) once, for every emulated model. The vector counts are fixed by the
//! model, so a client can never grow these tables.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use vfu_protocol::command::irq;
use vfu_protocol::request::{IrqAction, IrqData, SetIrqsRequest};
use vfu_protocol::wire::{
    IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
};

use super::DeviceError;

#[derive(Debug, Default)]
struct Vector {
    eventfd: Option<OwnedFd>,
    masked: bool,
    pending: bool,
}

#[derive(Debug)]
struct Index {
    flags: u32,
    vectors: Vec<Vector>,
}

/// The interrupt tables of one device.
#[derive(Debug)]
pub struct IrqTable {
    indexes: Vec<Index>,
}

/// Writes 1 to an eventfd, the way the kernel signals an interrupt.
pub fn signal_eventfd(fd: &OwnedFd) -> Result<(), Errno> {
    match nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes()) {
        Ok(_) | Err(Errno::EAGAIN) => Ok(()),
        Err(e) => Err(e),
    }
}

impl IrqTable {
    /// A PCI device's five indexes with the given vector counts (ERR and REQ get none).
    pub fn new_pci(intx: u32, msi: u32, msix: u32) -> IrqTable {
        let index = |flags, n: u32| Index {
            flags,
            vectors: (0..n).map(|_| Vector::default()).collect(),
        };
        IrqTable {
            indexes: vec![
                index(
                    IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                    intx,
                ),
                index(IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE, msi),
                index(
                    IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
                    msix,
                ),
                index(IRQ_INFO_EVENTFD, 0),
                index(IRQ_INFO_EVENTFD, 0),
            ],
        }
    }

    /// Number of indexes (reported as `num_irqs`).
    pub fn num_indexes(&self) -> u32 {
        self.indexes.len() as u32
    }

    /// (flags, count) for DEVICE_GET_IRQ_INFO.
    pub fn info(&self, index: u32) -> Option<(u32, u32)> {
        self.indexes
            .get(index as usize)
            .map(|i| (i.flags, i.vectors.len() as u32))
    }

    /// Whether `vector` of `index` has an eventfd.
    pub fn has_eventfd(&self, index: u32, vector: u32) -> bool {
        self.vector(index, vector)
            .is_some_and(|v| v.eventfd.is_some())
    }

    fn vector(&self, index: u32, vector: u32) -> Option<&Vector> {
        self.indexes
            .get(index as usize)?
            .vectors
            .get(vector as usize)
    }

    /// Applies a SET_IRQS request.
    pub fn set(&mut self, req: SetIrqsRequest) -> Result<(), DeviceError> {
        let index = req.index;
        let entry = self
            .indexes
            .get_mut(index as usize)
            .ok_or(DeviceError::CheckIrqIndex { index })?;
        let vectors = entry.vectors.len() as u32;
        let maskable = entry.flags & IRQ_INFO_MASKABLE != 0;
        if req.count == 0 {
            // Parsed as DATA_NONE | TRIGGER with start 0: disable the whole index.
            for v in &mut entry.vectors {
                *v = Vector::default();
            }
            return Ok(());
        }
        let end = req.start.saturating_add(req.count);
        if end > vectors {
            return Err(DeviceError::CheckIrqRange {
                index,
                start: req.start,
                count: req.count,
                vectors,
            });
        }
        let range = req.start as usize..end as usize;
        match (req.action, req.data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                if fds.is_empty() {
                    for v in &mut entry.vectors[range] {
                        v.eventfd = None;
                        v.pending = false;
                    }
                } else {
                    for (v, fd) in entry.vectors[range].iter_mut().zip(fds) {
                        v.eventfd = Some(fd);
                    }
                }
                Ok(())
            }
            (IrqAction::Trigger, data) => {
                let fire: Vec<bool> = match data {
                    IrqData::Bool(b) => b,
                    _ => vec![true; range.len()],
                };
                for (i, f) in range.zip(fire) {
                    if f {
                        self.trigger(index, i as u32)?;
                    }
                }
                Ok(())
            }
            (action @ (IrqAction::Mask | IrqAction::Unmask), data) => {
                if !maskable {
                    return Err(DeviceError::CheckIrqAction {
                        index,
                        what: "masking",
                    });
                }
                let apply: Vec<bool> = match data {
                    IrqData::Bool(b) => b,
                    IrqData::None => vec![true; range.len()],
                    // Resample/mask eventfds (KVM irqfd resampling) are not used by emulated
                    // devices; accept them as "apply" so QEMU's INTx setup succeeds.
                    IrqData::Eventfds(_) => vec![true; range.len()],
                };
                let mut to_fire = Vec::new();
                for (i, a) in range.zip(apply) {
                    if !a {
                        continue;
                    }
                    let v = &mut entry.vectors[i];
                    v.masked = action == IrqAction::Mask;
                    if !v.masked && v.pending {
                        to_fire.push(i as u32);
                    }
                }
                for i in to_fire {
                    self.trigger(index, i)?;
                }
                Ok(())
            }
        }
    }

    /// Raises `vector` of `index`: signals its eventfd unless masked (then it stays pending).
    /// Returns whether an eventfd was signalled. INTx masks itself when it fires.
    pub fn trigger(&mut self, index: u32, vector: u32) -> Result<bool, DeviceError> {
        let Some(entry) = self.indexes.get_mut(index as usize) else {
            return Err(DeviceError::CheckIrqIndex { index });
        };
        let automask = entry.flags & IRQ_INFO_AUTOMASKED != 0;
        let Some(v) = entry.vectors.get_mut(vector as usize) else {
            return Err(DeviceError::CheckIrqIndex { index });
        };
        if v.masked {
            v.pending = true;
            return Ok(false);
        }
        let Some(fd) = &v.eventfd else {
            return Ok(false);
        };
        signal_eventfd(fd).map_err(DeviceError::SignalIrq)?;
        v.pending = false;
        if automask {
            v.masked = true;
        }
        Ok(true)
    }

    /// Raises the device's completion interrupt on whichever mechanism the client enabled:
    /// MSI-X vector 0, else MSI vector 0, else INTx. Returns the index used, if any.
    pub fn raise_completion(&mut self) -> Result<Option<u32>, DeviceError> {
        for index in [irq::MSIX, irq::MSI, irq::INTX] {
            if self.has_eventfd(index, 0) {
                self.trigger(index, 0)?;
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// Closes every eventfd and clears masks (the client is gone).
    pub fn clear(&mut self) {
        for i in &mut self.indexes {
            for v in &mut i.vectors {
                *v = Vector::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::eventfd::{EfdFlags, EventFd};

    fn eventfd() -> (OwnedFd, EventFd) {
        let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let dup = e.as_fd().try_clone_to_owned().unwrap();
        (dup, e)
    }

    fn count(e: &EventFd) -> u64 {
        e.read().unwrap_or(0)
    }

    fn assign(
        t: &mut IrqTable,
        index: u32,
        start: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        t.set(SetIrqsRequest {
            index,
            start,
            count: fds.len() as u32,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(fds),
        })
    }

    #[test]
    fn msix_preferred_then_msi_then_intx() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        let (i_fd, i_ev) = eventfd();
        assign(&mut t, irq::INTX, 0, vec![i_fd]).unwrap();
        assert_eq!(t.raise_completion().unwrap(), Some(irq::INTX));
        assert_eq!(count(&i_ev), 1);
        // INTx automasked: a second raise stays pending until unmasked.
        t.raise_completion().unwrap();
        assert_eq!(count(&i_ev), 0);
        t.set(SetIrqsRequest {
            index: 0,
            start: 0,
            count: 1,
            action: IrqAction::Unmask,
            data: IrqData::None,
        })
        .unwrap();
        assert_eq!(count(&i_ev), 1);
        let (m_fd, m_ev) = eventfd();
        assign(&mut t, irq::MSIX, 0, vec![m_fd]).unwrap();
        assert_eq!(t.raise_completion().unwrap(), Some(irq::MSIX));
        assert_eq!(count(&m_ev), 1);
    }

    #[test]
    fn ranges_are_checked_and_deassign_works() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        let (a, _ea) = eventfd();
        assert!(assign(&mut t, irq::MSIX, 4, vec![a]).is_err());
        let (a, _ea) = eventfd();
        let (b, _eb) = eventfd();
        assign(&mut t, irq::MSIX, 2, vec![a, b]).unwrap();
        assert!(t.has_eventfd(irq::MSIX, 3));
        t.set(SetIrqsRequest {
            index: 2,
            start: 3,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(vec![]),
        })
        .unwrap();
        assert!(t.has_eventfd(irq::MSIX, 2) && !t.has_eventfd(irq::MSIX, 3));
        assert!(assign(&mut t, 9, 0, vec![]).is_err());
        let err = t.set(SetIrqsRequest {
            index: irq::MSI,
            start: 0,
            count: 1,
            action: IrqAction::Mask,
            data: IrqData::None,
        });
        assert!(err.is_err(), "MSI is not maskable");
        t.set(SetIrqsRequest {
            index: 2,
            start: 0,
            count: 0,
            action: IrqAction::Trigger,
            data: IrqData::None,
        })
        .unwrap();
        assert!(!t.has_eventfd(irq::MSIX, 2));
    }
}
