//! Interrupt state of an emulated device: eventfds per index and vector, masks, pending bits.
//!
//! Implements the DEVICE_SET_IRQS semantics (assign / de-assign eventfds over a sub-range,
//! trigger, mask and unmask) once, for every emulated model. The vector counts are fixed by the
//! model, so a client can never grow these tables.
//!
//! INTx is a level-triggered line, as on real PCI, presented the way vfio presents it: the
//! device asserts or deasserts its line ([`IrqTable::set_intx_level`]); the line is signalled
//! (the INTx eventfd written) when it becomes asserted while the guest has not set INTx Disable
//! (PCI Command bit 10, [`IrqTable::set_intx_disabled`]); the vector then masks itself
//! (AUTOMASKED), and an UNMASK while the line is still asserted signals it again. Config-space
//! Status bit 3 (Interrupt Status) reads as the line state ([`IrqTable::intx_status`]) whatever
//! INTx Disable says. Guest drivers that share or mask INTx in software (Linux's
//! `pci_check_and_mask_intx`, used by uio_pci_generic and vfio-pci) depend on both bits.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

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

/// PCI Command register bit 10: INTx Disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// PCI Status register bit 3: Interrupt Status (the device's INTx line is asserted).
pub const PCI_STATUS_INTERRUPT: u16 = 1 << 3;

/// The device side of the INTx line.
#[derive(Debug, Default, Clone, Copy)]
struct IntxLine {
    /// The device asserts its interrupt (Status.Interrupt Status).
    asserted: bool,
    /// The guest set Command.INTx Disable: the line must not be signalled.
    disabled: bool,
}

impl IntxLine {
    /// Whether the line is asserted towards the interrupt controller.
    fn effective(self) -> bool {
        self.asserted && !self.disabled
    }
}

/// The interrupt tables of one device.
#[derive(Debug)]
pub struct IrqTable {
    indexes: Vec<Index>,
    intx: IntxLine,
    /// INTx unmask trigger (KVM's resample eventfd): signalling it unmasks INTx, as if the
    /// client had sent UNMASK. The device model watches it; see [`IrqTable::intx_unmask_fd`].
    intx_unmask_fd: Option<Arc<OwnedFd>>,
}

/// Writes 1 to an eventfd, the way the kernel signals an interrupt.
///
/// Never blocks, whatever the client did to the fd: the client owns the file description and
/// may have made it blocking and filled the counter. A counter that cannot take another 1 means
/// an interrupt is pending already, so skipping the write loses nothing.
pub fn signal_eventfd(fd: &OwnedFd) -> Result<(), Errno> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut ready = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut ready, PollTimeout::ZERO) {
        Ok(0) => return Ok(()),
        Ok(_) => {}
        Err(e) => return Err(e),
    }
    match nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes()) {
        Ok(_) | Err(Errno::EAGAIN) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `fd` is an eventfd. Anything else (a pipe, a socket, a FUSE file) could make our
/// writes block or mean something else entirely, so SET_IRQS refuses it. Without /proc the
/// check cannot be made and the fd is accepted; [`signal_eventfd`] still never blocks.
fn is_eventfd(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(target) => target.as_os_str() == "anon_inode:[eventfd]",
        Err(_) => !std::path::Path::new("/proc/self/fd").exists(),
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
            intx: IntxLine::default(),
            intx_unmask_fd: None,
        }
    }

    /// Gives the ERR index one vector, as vfio-pci does for PCI Express functions: QEMU then
    /// wires its error notifier (and warns "Could not enable error recovery" without it). The
    /// vector is only ever signalled for an unrecoverable device error.
    pub fn with_err_notifier(mut self) -> IrqTable {
        if let Some(err) = self.indexes.get_mut(irq::ERR as usize) {
            err.vectors = vec![Vector::default()];
        }
        self
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

    /// How many vectors of each index have an eventfd, in index order.
    pub fn wired(&self) -> Vec<u32> {
        self.indexes
            .iter()
            .map(|i| i.vectors.iter().filter(|v| v.eventfd.is_some()).count() as u32)
            .collect()
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
                    if let Some(at) = fds.iter().position(|fd| !is_eventfd(fd)) {
                        return Err(DeviceError::CheckIrqFd {
                            index,
                            vector: req.start + at as u32,
                        });
                    }
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
            (IrqAction::Unmask, IrqData::Eventfds(fds)) if maskable && index == irq::INTX => {
                // An unmask trigger (KVM's INTx resample eventfd), not an unmask now: QEMU sends
                // the actual UNMASK separately. No fd de-registers it.
                match fds.into_iter().next() {
                    None => self.intx_unmask_fd = None,
                    Some(fd) => {
                        if !is_eventfd(&fd) {
                            return Err(DeviceError::CheckIrqFd { index, vector: 0 });
                        }
                        self.intx_unmask_fd = Some(Arc::new(fd));
                    }
                }
                Ok(())
            }
            (IrqAction::Mask | IrqAction::Unmask, IrqData::Eventfds(_)) => {
                Err(DeviceError::CheckIrqAction {
                    index,
                    what: "masking or unmasking through eventfds (only the INTx unmask trigger)",
                })
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
                    _ => vec![true; range.len()],
                };
                // An INTx line that is still asserted when unmasked is signalled again, as vfio
                // does: the client may have deasserted its side on a guest EOI.
                let intx_asserted = index == irq::INTX && self.intx.effective();
                let mut to_fire = Vec::new();
                for (i, a) in range.zip(apply) {
                    if !a {
                        continue;
                    }
                    let v = &mut entry.vectors[i];
                    v.masked = action == IrqAction::Mask;
                    if !v.masked && (v.pending || intx_asserted) {
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
    /// MSI-X vector 0, else MSI vector 0 (edges), else the INTx line, which stays asserted
    /// until the device deasserts it ([`IrqTable::set_intx_level`]). Returns the index used.
    pub fn raise_completion(&mut self) -> Result<u32, DeviceError> {
        for index in [irq::MSIX, irq::MSI] {
            if self.has_eventfd(index, 0) {
                self.trigger(index, 0)?;
                return Ok(index);
            }
        }
        self.set_intx_level(true)?;
        Ok(irq::INTX)
    }

    /// Asserts or deasserts the device's INTx line. A rising line that INTx Disable does not
    /// suppress is signalled (or left pending if masked); a falling one drops anything pending.
    /// Returns whether the eventfd was signalled.
    pub fn set_intx_level(&mut self, asserted: bool) -> Result<bool, DeviceError> {
        let was = self.intx.effective();
        self.intx.asserted = asserted;
        self.intx_changed(was)
    }

    /// Follows the guest's Command.INTx Disable bit: while set the line is never signalled;
    /// clearing it while the line is asserted signals it. Returns whether it signalled.
    pub fn set_intx_disabled(&mut self, disabled: bool) -> Result<bool, DeviceError> {
        let was = self.intx.effective();
        self.intx.disabled = disabled;
        self.intx_changed(was)
    }

    fn intx_changed(&mut self, was: bool) -> Result<bool, DeviceError> {
        let now = self.intx.effective();
        if now && !was && self.has_vector(irq::INTX, 0) {
            return self.trigger(irq::INTX, 0);
        }
        if !now {
            if let Some(v) = self.vector_mut(irq::INTX, 0) {
                v.pending = false;
            }
        }
        Ok(false)
    }

    /// The device's INTx line (Status.Interrupt Status), regardless of INTx Disable.
    pub fn intx_status(&self) -> bool {
        self.intx.asserted
    }

    /// Applies the INTx bits to a config-space Command/Status pair: reads INTx Disable from
    /// `command`, and returns `status` with Interrupt Status set to the line state. Returns
    /// whether the line was signalled because INTx Disable was cleared.
    pub fn sync_config(&mut self, command: u16, status: u16) -> Result<(u16, bool), DeviceError> {
        let fired = self.set_intx_disabled(command & PCI_COMMAND_INTX_DISABLE != 0)?;
        let status = if self.intx.asserted {
            status | PCI_STATUS_INTERRUPT
        } else {
            status & !PCI_STATUS_INTERRUPT
        };
        Ok((status, fired))
    }

    fn has_vector(&self, index: u32, vector: u32) -> bool {
        self.vector(index, vector).is_some()
    }

    fn vector_mut(&mut self, index: u32, vector: u32) -> Option<&mut Vector> {
        self.indexes
            .get_mut(index as usize)?
            .vectors
            .get_mut(vector as usize)
    }

    /// Closes every eventfd and clears masks (the client is gone). The INTx line is device
    /// state and survives.
    pub fn clear(&mut self) {
        self.intx_unmask_fd = None;
        for i in &mut self.indexes {
            for v in &mut i.vectors {
                *v = Vector::default();
            }
        }
    }

    /// The INTx unmask trigger the client registered, if any. Whoever owns the table watches
    /// it and calls [`Self::unmask_intx`] each time it is signalled.
    pub fn intx_unmask_fd(&self) -> Option<Arc<OwnedFd>> {
        self.intx_unmask_fd.clone()
    }

    /// Unmasks INTx as an UNMASK message would: a line still asserted is signalled again.
    pub fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        self.set(SetIrqsRequest {
            index: irq::INTX,
            start: 0,
            count: 1,
            action: IrqAction::Unmask,
            data: IrqData::None,
        })
    }

    /// Device reset: the line is deasserted and INTx Disable cleared (Command resets to 0).
    /// Eventfds and masks belong to the client and are left alone.
    pub fn reset_intx(&mut self) {
        self.intx = IntxLine::default();
        if let Some(v) = self.vector_mut(irq::INTX, 0) {
            v.pending = false;
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
        assert_eq!(t.raise_completion().unwrap(), irq::INTX);
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
        assert_eq!(t.raise_completion().unwrap(), irq::MSIX);
        assert_eq!(count(&m_ev), 1);
    }

    #[test]
    fn intx_is_a_level_line_that_intx_disable_gates() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        let (fd, ev) = eventfd();
        assign(&mut t, irq::INTX, 0, vec![fd]).unwrap();
        assert!(!t.intx_status());

        // The guest set INTx Disable: the line is asserted (Interrupt Status) but not signalled.
        assert!(!t.set_intx_disabled(true).unwrap());
        assert!(!t.set_intx_level(true).unwrap());
        assert!(t.intx_status(), "Interrupt Status ignores INTx Disable");
        assert_eq!(count(&ev), 0);
        // Clearing INTx Disable while the line is asserted signals it, and automasks.
        assert!(t.set_intx_disabled(false).unwrap());
        assert_eq!(count(&ev), 1);
        // Still asserted: an UNMASK (the client's EOI) signals again, as vfio does.
        t.unmask_intx().unwrap();
        assert_eq!(count(&ev), 1);
        // Deasserted while masked: nothing is left pending for the unmask.
        t.set_intx_level(false).unwrap();
        t.unmask_intx().unwrap();
        assert_eq!(count(&ev), 0);
        assert!(!t.intx_status());
        // A new rising edge on an unmasked line signals at once.
        assert!(t.set_intx_level(true).unwrap());
        assert_eq!(count(&ev), 1);
        // Asserting an asserted line is not a new edge.
        t.unmask_intx().unwrap();
        assert_eq!(count(&ev), 1);
        assert!(!t.set_intx_level(true).unwrap());
        assert_eq!(count(&ev), 0);
    }

    #[test]
    fn intx_disable_while_masked_drops_the_pending_signal() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        let (fd, ev) = eventfd();
        assign(&mut t, irq::INTX, 0, vec![fd]).unwrap();
        t.set_intx_level(true).unwrap();
        assert_eq!(count(&ev), 1);
        // Masked now. The guest's handler sets INTx Disable, the client unmasks on EOI: the
        // line is asserted but disabled, so nothing is signalled.
        t.set_intx_disabled(true).unwrap();
        t.unmask_intx().unwrap();
        assert_eq!(count(&ev), 0);
        // The guest acknowledges in the device, then re-enables INTx: still quiet.
        t.set_intx_level(false).unwrap();
        t.set_intx_disabled(false).unwrap();
        assert_eq!(count(&ev), 0);
    }

    #[test]
    fn sync_config_mirrors_the_line_into_status_bit_3() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        let (status, fired) = t.sync_config(0, 0x0010).unwrap();
        assert_eq!((status, fired), (0x0010, false));
        t.set_intx_level(true).unwrap();
        let (status, _) = t.sync_config(PCI_COMMAND_INTX_DISABLE, 0x0010).unwrap();
        assert_eq!(status, 0x0010 | PCI_STATUS_INTERRUPT);
        t.set_intx_level(false).unwrap();
        let (status, _) = t.sync_config(0, 0x0010 | PCI_STATUS_INTERRUPT).unwrap();
        assert_eq!(status, 0x0010);
        t.set_intx_level(true).unwrap();
        t.reset_intx();
        assert!(!t.intx_status());
    }

    #[test]
    fn completion_prefers_msix_then_msi_and_otherwise_asserts_intx_without_an_eventfd() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        // No eventfd anywhere: INTx is the PCI fallback; the line is asserted all the same.
        assert_eq!(t.raise_completion().unwrap(), irq::INTX);
        assert!(t.intx_status());
        let (m_fd, m_ev) = eventfd();
        assign(&mut t, irq::MSI, 0, vec![m_fd]).unwrap();
        assert_eq!(t.raise_completion().unwrap(), irq::MSI);
        assert_eq!(count(&m_ev), 1);
    }

    #[test]
    fn the_err_notifier_vector_exists_only_when_asked_for() {
        assert_eq!(IrqTable::new_pci(1, 1, 4).info(irq::ERR).unwrap().1, 0);
        let mut t = IrqTable::new_pci(1, 1, 4).with_err_notifier();
        assert_eq!(t.info(irq::ERR), Some((IRQ_INFO_EVENTFD, 1)));
        assert_eq!(t.info(irq::REQ).unwrap().1, 0);
        let (fd, _ev) = eventfd();
        assign(&mut t, irq::ERR, 0, vec![fd]).unwrap();
        assert!(t.has_eventfd(irq::ERR, 0));
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

    #[test]
    fn only_eventfds_are_accepted_and_a_full_counter_never_blocks() {
        let mut t = IrqTable::new_pci(1, 1, 4);
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let err = assign(&mut t, irq::MSIX, 0, vec![write_end]).unwrap_err();
        assert!(matches!(
            err,
            DeviceError::CheckIrqFd {
                index: 2,
                vector: 0
            }
        ));
        assert_eq!(err.errno(), Errno::EINVAL);
        drop(read_end);

        // A blocking eventfd whose counter is at its maximum: a plain write would block forever.
        let full = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap();
        full.write(u64::MAX - 1).unwrap();
        let fd = full.as_fd().try_clone_to_owned().unwrap();
        assign(&mut t, irq::MSIX, 0, vec![fd]).unwrap();
        t.trigger(irq::MSIX, 0).unwrap();
        assert_eq!(
            full.read().unwrap(),
            u64::MAX - 1,
            "nothing was added, nothing blocked"
        );
    }
}
