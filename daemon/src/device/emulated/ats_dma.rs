//! `ats-dma`: the reference emulated device, a PCIe DMA engine with ATS, PASID and PRI
//! capabilities.
//!
//! The guest programs source, destination and length in BAR0 and writes a command; the engine
//! runs asynchronously (like hardware behind a doorbell), moves data through [`GuestMemory`]
//! (directly for fd-backed maps, by DMA_READ/DMA_WRITE messages otherwise), then updates
//! STATUS and raises the completion interrupt on MSI-X vector 0, MSI or INTx, whichever the
//! client enabled. The register map is documented in `docs/ats-dma.md`.
//!
//! ATS: while the guest has ATS Enable set in the ATS Control register, the engine translates
//! every address it touches before the DMA: it looks the address up in its ATC
//! ([`super::atc::Atc`], per PASID, every page size, bounded, LRU eviction), sends a
//! translation request to its [`TranslationSource`] on a miss, caches the answer and issues a
//! translated access with the cached translation. A hole or a missing permission ends the
//! command with `ERR_TRANSLATION`. The source is the connection's shadow source
//! ([`crate::viommu::shadow`]). An invalidation ([`Device::invalidate_atc`]) removes the
//! entries it hits and completes only once a running command that may use them has ended, so
//! no DMA with a stale translation outlives the invalidation. With ATS disabled the engine
//! issues untranslated DMA, as before.
//!
//! Config space has two layers, as for a host device: the model's own config space (all its
//! capabilities, as the hardware would have them) and the guest's view of it, which the
//! capability policy builds ([`crate::pci::virtual_config`]): masked capabilities unlinked,
//! PASID synthesized where the policy says so, and the ATS/PASID/PRI control registers
//! emulated there. The engine reads those controls from the view
//! ([`AtsDma::capability_controls`]); guest writes to them never reach the model's own space.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vfu_protocol::command::region;
use vfu_protocol::reply::{RegionCap, RegionDescription};
use vfu_protocol::request::SetIrqsRequest;
use vfu_protocol::wire::{
    SparseMmapArea, DEVICE_FLAG_PCI, DEVICE_FLAG_RESET, REGION_FLAG_MMAP, REGION_FLAG_READ,
    REGION_FLAG_WRITE,
};

use super::atc::{Atc, ATC_CAPACITY};
use crate::device::eventfd::EventfdWatch;
use crate::device::irq::IrqTable;
use crate::device::viommu::{RemapError, Remapped, ViommuPort};
use crate::dma::DmaError;
use crate::viommu::ats::TranslatedSpace;
use crate::viommu::ats::{
    check_completions, AtcCounters, AtcInvalidation, AtcInvalidationCompletion, InvalidationFuture,
    Pasid, RequesterId, TranslationCompletion, TranslationRequest, TranslationSource,
};
use crate::viommu::shadow::ShadowSource;

/// Config-space offsets of the Command and Status registers (INTx Disable, Interrupt Status).
const PCI_COMMAND: usize = 0x04;
const PCI_STATUS: usize = 0x06;
use crate::device::{Device, DeviceError, DeviceInfo, RegionSpec};
use crate::dma::GuestMemory;
use crate::pci::caps::{
    CAP_ID_EXP, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PM, EXT_CAP_ID_ATS, EXT_CAP_ID_PASID,
    EXT_CAP_ID_PRI,
};
use crate::pci::virtual_config::{self, CapabilityControls, PolicyRequest, VirtualConfigError};
use crate::pci::{ConfigSpace, ConfigSpaceBuilder, ResolvedCapabilities, VirtualConfigSpace};

/// PCI vendor id (Red Hat, Inc., the QEMU emulated-device vendor).
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id of ats-dma (not used by any QEMU device).
pub const DEVICE_ID: u16 = 0x00fd;
/// Class code: system peripheral, DMA controller, generic.
pub const CLASS_CODE: u32 = 0x08_01_00;

/// BAR0 size: registers, MSI-X table and PBA.
pub const BAR0_SIZE: u64 = 0x4000;
/// BAR2 size: device-local memory the client may mmap.
pub const BAR2_SIZE: u64 = 0x10000;
/// MSI-X vectors.
pub const MSIX_VECTORS: u32 = 4;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u64 = 0x2000;
/// Offset of the MSI-X PBA in BAR0.
pub const MSIX_PBA_OFFSET: u64 = 0x3000;
/// Largest transfer one command may move.
pub const MAX_TRANSFER: u32 = 16 << 20;
/// Chunk the engine moves per guest-memory access.
const CHUNK: usize = 64 * 1024;

/// BAR0 register offsets (all 32-bit, little-endian).
pub mod regs {
    /// RO: "ADMA" (0x414d4441).
    pub const ID: u64 = 0x00;
    /// RO: major << 16 | minor.
    pub const VERSION: u64 = 0x04;
    pub const SRC_LO: u64 = 0x08;
    pub const SRC_HI: u64 = 0x0c;
    pub const DST_LO: u64 = 0x10;
    pub const DST_HI: u64 = 0x14;
    /// Transfer length in bytes, 1..=MAX_LEN.
    pub const LEN: u64 = 0x18;
    /// Fill pattern (FILL repeats these 4 bytes).
    pub const PATTERN: u64 = 0x1c;
    /// WO doorbell: opcode in bits 3:0, [`CMD_IRQ`] requests a completion interrupt.
    pub const CMD: u64 = 0x20;
    /// RO: [`STATUS_IDLE`], [`STATUS_BUSY`], [`STATUS_DONE`] or [`STATUS_ERROR`].
    pub const STATUS: u64 = 0x24;
    /// RO: error code of the last command ([`ERR_NONE`] ...).
    pub const ERROR: u64 = 0x28;
    /// RO: CRC-32 (IEEE) computed by CHECKSUM.
    pub const RESULT: u64 = 0x2c;
    /// RO: commands completed (done or error) since reset.
    pub const COMPLETED: u64 = 0x30;
    /// RW1C: bit 0 set when a command completes.
    pub const IRQ_STATUS: u64 = 0x34;
    /// RO: largest LEN accepted.
    pub const MAX_LEN: u64 = 0x38;
    /// RO: doorbells rejected because the engine was busy.
    pub const REJECTED: u64 = 0x3c;
    /// RO: the capability controls the engine works with, as the guest set them in config
    /// space: [`CAP_CONTROL_ATS_ENABLE`], ATS STU in bits 12:8 ([`CAP_CONTROL_ATS_STU_SHIFT`]),
    /// [`CAP_CONTROL_PASID_ENABLE`] ... Bits of capabilities the guest does not see read 0.
    pub const CAP_CONTROL: u64 = 0x40;

    /// RW: PASID the engine tags its requests with: bits 19:0 the PASID, [`PASID_VALID`] to use
    /// it (only while PASID Enable is set in config space), [`PASID_PRIV`] for privileged
    /// requests (only while PASID Privileged Mode Enable is set).
    pub const PASID: u64 = 0x44;
    /// RO: translation requests sent (low 32 bits; wraps).
    pub const ATS_REQUESTS: u64 = 0x48;
    /// RO: ATC lookups answered from the cache (low 32 bits; wraps).
    pub const ATC_HITS: u64 = 0x4c;
    /// RO: ATC lookups that needed a translation request (low 32 bits; wraps).
    pub const ATC_MISSES: u64 = 0x50;
    /// RO: invalidations received (low 32 bits; wraps).
    pub const ATC_INVALIDATIONS: u64 = 0x54;
    /// RO: entries in the ATC now.
    pub const ATC_ENTRIES: u64 = 0x58;
    /// RO: untranslated address of the last translation fault, bits 31:0.
    pub const FAULT_ADDR_LO: u64 = 0x5c;
    /// RO: untranslated address of the last translation fault, bits 63:32.
    pub const FAULT_ADDR_HI: u64 = 0x60;

    /// PASID: use the PASID in bits 19:0.
    pub const PASID_VALID: u32 = 1 << 31;
    /// PASID: privileged-mode requests.
    pub const PASID_PRIV: u32 = 1 << 30;

    /// CAP_CONTROL: ATS Enable.
    pub const CAP_CONTROL_ATS_ENABLE: u32 = 1 << 0;
    /// CAP_CONTROL: PASID Enable.
    pub const CAP_CONTROL_PASID_ENABLE: u32 = 1 << 1;
    /// CAP_CONTROL: PASID Execute Permission Enable.
    pub const CAP_CONTROL_PASID_EXEC: u32 = 1 << 2;
    /// CAP_CONTROL: PASID Privileged Mode Enable.
    pub const CAP_CONTROL_PASID_PRIV: u32 = 1 << 3;
    /// CAP_CONTROL: PRI Enable.
    pub const CAP_CONTROL_PRI_ENABLE: u32 = 1 << 4;
    /// CAP_CONTROL: position of the 5-bit ATS Smallest Translation Unit.
    pub const CAP_CONTROL_ATS_STU_SHIFT: u32 = 8;

    pub const OP_COPY: u32 = 1;
    pub const OP_FILL: u32 = 2;
    pub const OP_CHECKSUM: u32 = 3;
    pub const CMD_IRQ: u32 = 1 << 8;

    pub const STATUS_IDLE: u32 = 0;
    pub const STATUS_BUSY: u32 = 1;
    pub const STATUS_DONE: u32 = 2;
    pub const STATUS_ERROR: u32 = 3;

    pub const ERR_NONE: u32 = 0;
    pub const ERR_OPCODE: u32 = 1;
    pub const ERR_LENGTH: u32 = 2;
    pub const ERR_DMA_FAULT: u32 = 3;
    pub const ERR_NO_CLIENT: u32 = 4;
    /// ATS is enabled and an address had no usable translation (a hole, a missing permission
    /// or a refused request); FAULT_ADDR holds the address.
    pub const ERR_TRANSLATION: u32 = 5;
}

use regs::*;

#[derive(Debug, Default, Clone, Copy)]
struct Registers {
    src: u64,
    dst: u64,
    len: u32,
    pattern: u32,
    status: u32,
    error: u32,
    result: u32,
    completed: u32,
    irq_status: u32,
    rejected: u32,
    pasid: u32,
    fault_addr: u64,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    op: u32,
    src: u64,
    dst: u64,
    len: u32,
    pattern: u32,
    irq: bool,
    generation: u64,
    /// Set when the command runs with ATS.
    ats: Option<AtsSetup>,
    /// The PASID and privilege its requests carry (with or without ATS).
    tag: RequestTag,
}

/// What a command's requests are tagged with, fixed when it starts.
#[derive(Debug, Clone, Copy, Default)]
struct RequestTag {
    pasid: Option<Pasid>,
    privileged: bool,
}

/// How a command tags its translation requests, fixed when it starts.
#[derive(Debug, Clone, Copy)]
struct AtsSetup {
    stu_log2: u8,
    pasid: Option<Pasid>,
    privileged: bool,
}

impl Job {
    /// The untranslated ranges (first, last) the command touches.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let span = |start: u64| (start, start.saturating_add(u64::from(self.len.max(1)) - 1));
        match self.op {
            OP_COPY => vec![span(self.src), span(self.dst)],
            OP_FILL => vec![span(self.dst)],
            _ => vec![span(self.src)],
        }
    }
}

#[derive(Debug)]
struct State {
    /// The model's own config space, with every capability it implements.
    config: ConfigSpace,
    /// What the guest sees: `config` with the capability policy applied.
    view: VirtualConfigSpace,
    regs: Registers,
    msix_table: Vec<u8>,
    irqs: IrqTable,
    memory: Option<Arc<GuestMemory>>,
    /// Bumped by reset and detach so a job that started before completes into nothing.
    generation: u64,
    /// The job the engine is running, if any.
    job: Option<RunningJob>,
    /// The task watching the client's INTx unmask trigger, if one is registered.
    unmask_watch: Option<UnmaskWatch>,
    /// Cached translations.
    atc: Atc,
    /// The STU the ATC was filled with; a change empties it.
    atc_stu: Option<u8>,
    /// Bumped by every invalidation, so an answer requested before one is not cached after it.
    atc_epoch: u64,
    /// ATS counters since reset (`entries` is read from the ATC).
    counters: AtcCounters,
    /// Where translations come from while a client is attached.
    source: Option<Arc<dyn TranslationSource>>,
    /// The embedded vIOMMU the device sits behind (`"viommu": "<name>"`), fixed at creation:
    /// then its translations, untranslated and translated DMA all go through the model.
    viommu: Option<Arc<ViommuPort>>,
}

/// A task that unmasks INTx whenever the client's unmask trigger (KVM's resample eventfd, which
/// KVM signals on the guest's EOI) fires.
#[derive(Debug)]
struct UnmaskWatch {
    fd: Arc<OwnedFd>,
    task: tokio::task::AbortHandle,
}

/// A spawned job: how to stop it and how to learn that it stopped.
#[derive(Debug)]
struct RunningJob {
    abort: tokio::task::AbortHandle,
    stopped: Arc<JobStopped>,
    /// With ATS: the PASID and untranslated ranges whose translations the job may use, so an
    /// invalidation knows whether to wait for it.
    ats: Option<AtsFootprint>,
}

/// What an ATS command may have translated: its PASID and untranslated (first, last) ranges.
#[derive(Debug)]
struct AtsFootprint {
    pasid: Option<Pasid>,
    ranges: Vec<(u64, u64)>,
}

/// Set when a job's task ends, whether it completed or was aborted.
#[derive(Debug, Default)]
struct JobStopped {
    done: Mutex<bool>,
    cv: std::sync::Condvar,
    notify: tokio::sync::Notify,
}

impl JobStopped {
    fn is_done(&self) -> bool {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once the job's task has ended.
    async fn ended(&self) {
        let mut notified = std::pin::pin!(self.notify.notified());
        notified.as_mut().enable();
        if self.is_done() {
            return;
        }
        notified.await;
    }
}

/// Marks the job stopped when dropped, which also happens when its task is aborted.
struct StoppedOnDrop(Arc<JobStopped>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        *self.0.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0.cv.notify_all();
        self.0.notify.notify_waiters();
    }
}

/// How long reset and detach wait for a cancelled job to stop. A job stops at its next await,
/// after at most one 64 KiB copy, so this is only reached if the runtime is wedged.
const JOB_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long an ATC invalidation waits for a running command that may use the removed entries.
/// The command ends at its next translation (which misses now), so this is only reached when a
/// client leaves message DMA unanswered; the DMA map drain still keeps unmapped memory safe.
const INVALIDATION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A translation answer is requested again at most this often when invalidations keep
/// overtaking it.
const TRANSLATION_RETRIES: usize = 4;

impl RunningJob {
    /// Aborts the job and waits until its task has ended, so that it touches guest memory no
    /// more. Must be called without the device lock: a finishing job takes it.
    fn stop(self, device: &str) {
        self.abort.abort();
        let done = self.stopped.done.lock().unwrap_or_else(|p| p.into_inner());
        let (done, timeout) = self
            .stopped
            .cv
            .wait_timeout_while(done, JOB_STOP_TIMEOUT, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
        if !*done && timeout.timed_out() {
            tracing::error!(device, "a cancelled DMA job did not stop within 2 s");
        }
    }
}

/// The ats-dma device model.
#[derive(Debug)]
pub struct AtsDma {
    name: String,
    state: Arc<Mutex<State>>,
    bar2: Arc<OwnedFd>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the model could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AtsDmaError {
    /// The memfd behind BAR2 could not be created or sized.
    #[error("creating the memfd that backs BAR2 failed")]
    CreateBar2(#[source] nix::errno::Errno),
    /// The capability policy refuses the device (for example `ats=on` behind an IOMMU without
    /// ATS); the message is the policy's own.
    #[error(transparent)]
    ApplyPolicy(#[from] VirtualConfigError),
}

/// The guest's view of ats-dma's config space under `request`, without creating the device:
/// what `vfud check-config` shows and what [`AtsDma::new`] serves. With
/// `request.pasid_cap_hidden` the model's own config space lacks its PASID capability, the way
/// the kernel shows a host device, so the policy synthesizes one.
pub fn plan(request: &PolicyRequest<'_>) -> Result<VirtualConfigSpace, VirtualConfigError> {
    let own = build_config_space(!request.pasid_cap_hidden);
    virtual_config::build(own.bytes(), request)
}

fn build_config_space(with_pasid: bool) -> ConfigSpace {
    let mut b = ConfigSpaceBuilder::new(VENDOR_ID, DEVICE_ID, CLASS_CODE, 1);
    b.interrupt_pin(1);
    b.memory_bar32(0, BAR0_SIZE as u32);
    b.memory_bar32(2, BAR2_SIZE as u32);
    // Power management v3, D0 only.
    let pm = b.standard_capability(CAP_ID_PM, &[0x03, 0x00, 0, 0, 0, 0]);
    b.writable(pm + 4, &[0x03]);
    // MSI: 64-bit, 1 vector. Control enable bit and address/data are guest-writable.
    let msi = b.standard_capability(CAP_ID_MSI, &[0x80, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    b.writable(msi + 2, &[0x01]);
    b.writable(
        msi + 4,
        &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    );
    // PCI Express v2 endpoint, max payload 256, a 2.5 GT/s x1 link that is up. `exp` is the
    // body after the id/next bytes, so register offset R of the capability is exp[R - 2].
    let mut exp = vec![0u8; 0x3a];
    let at = |r: usize| r - 2;
    exp[at(0x02)..at(0x04)].copy_from_slice(&0x0002u16.to_le_bytes());
    exp[at(0x04)..at(0x08)].copy_from_slice(&0x0000_8001u32.to_le_bytes());
    exp[at(0x0c)..at(0x10)].copy_from_slice(&0x0041_0411u32.to_le_bytes());
    exp[at(0x12)..at(0x14)].copy_from_slice(&0x0011u16.to_le_bytes());
    let pcie = b.standard_capability(CAP_ID_EXP, &exp);
    b.writable(pcie + 8, &0x7cffu16.to_le_bytes());
    b.writable(pcie + 0x10, &0x01c3u16.to_le_bytes());
    b.writable(pcie + 0x28, &0x040fu16.to_le_bytes());
    // MSI-X: table in BAR0 at 0x2000, PBA at 0x3000.
    let mut msix = vec![0u8; 10];
    msix[0..2].copy_from_slice(&((MSIX_VECTORS - 1) as u16).to_le_bytes());
    msix[2..6].copy_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
    msix[6..10].copy_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
    let msix_at = b.standard_capability(CAP_ID_MSIX, &msix);
    b.writable(msix_at + 3, &[0xc0]);
    // ATS: invalidate queue depth 0 (32), page aligned requests; control: enable + STU.
    let ats = b.extended_capability(EXT_CAP_ID_ATS, 1, &[0x20, 0x00, 0x00, 0x00]);
    b.writable(ats + 6, &0x801fu16.to_le_bytes());
    // PASID: exec + priv supported, 20-bit max width; control: enable, exec, priv.
    if with_pasid {
        let pasid = b.extended_capability(EXT_CAP_ID_PASID, 1, &[0x06, 0x14, 0x00, 0x00]);
        b.writable(pasid + 6, &0x0007u16.to_le_bytes());
    }
    // PRI: control (enable, reset), status (stopped), 32 outstanding requests capacity.
    let pri = b.extended_capability(
        EXT_CAP_ID_PRI,
        1,
        &[0x00, 0x00, 0x00, 0x01, 0x20, 0, 0, 0, 0, 0, 0, 0],
    );
    b.writable(pri + 4, &[0x01]);
    b.writable(pri + 12, &0xffff_ffffu32.to_le_bytes());
    b.w1c_bits(pri + 6, &[0x03]);
    b.build()
}

impl AtsDma {
    /// Creates the model with the capability policy of `request`; its device name is used in
    /// logs and messages. Fails with [`AtsDmaError::ApplyPolicy`] when the policy refuses the
    /// device.
    pub fn new(request: &PolicyRequest<'_>) -> Result<AtsDma, AtsDmaError> {
        let config = build_config_space(!request.pasid_cap_hidden);
        let view = virtual_config::build(config.bytes(), request)?;
        // Sealed at its size: clients mmap it, and one that could shrink it would make the
        // next client's (or our own) accesses fault.
        let bar2 = memfd_create(
            c"vfud-ats-dma-bar2",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(AtsDmaError::CreateBar2)?;
        nix::unistd::ftruncate(&bar2, BAR2_SIZE as i64).map_err(AtsDmaError::CreateBar2)?;
        let seals = nix::fcntl::SealFlag::F_SEAL_SHRINK
            | nix::fcntl::SealFlag::F_SEAL_GROW
            | nix::fcntl::SealFlag::F_SEAL_SEAL;
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&bar2),
            nix::fcntl::FcntlArg::F_ADD_SEALS(seals),
        )
        .map_err(AtsDmaError::CreateBar2)?;
        Ok(AtsDma {
            name: request.device_name.to_string(),
            state: Arc::new(Mutex::new(State {
                config,
                view,
                regs: Registers::default(),
                msix_table: vec![0; (MSIX_VECTORS * 16) as usize],
                irqs: IrqTable::new_pci(1, 1, MSIX_VECTORS).with_err_notifier(),
                memory: None,
                generation: 0,
                job: None,
                unmask_watch: None,
                atc: Atc::new(ATC_CAPACITY),
                atc_stu: None,
                atc_epoch: 0,
                counters: AtcCounters::default(),
                source: None,
                viommu: None,
            })),
            bar2: Arc::new(bar2),
        })
    }

    /// Replaces the translation source the engine asks on an ATC miss (by default the
    /// connection's shadow source, installed on attach) and empties the ATC: an embedded
    /// vIOMMU model installs itself here after attach. The source's translated addresses must
    /// be in the space it names ([`TranslationSource::translated_space`]).
    pub fn set_translation_source(&self, source: Arc<dyn TranslationSource>) {
        let mut st = lock(&self.state);
        st.source = Some(source);
        st.atc.clear();
        st.atc_epoch = st.atc_epoch.wrapping_add(1);
    }

    /// Puts the device behind an embedded vIOMMU model: from the next client on, translation
    /// requests go to `port` (translated addresses are guest-physical, in this device's own DMA
    /// map table), untranslated DMA is translated by the model, and translated DMA is checked
    /// by it. Called once, at creation.
    pub fn behind_viommu(&self, port: ViommuPort) {
        let mut st = lock(&self.state);
        let port = Arc::new(port);
        if st.memory.is_some() {
            st.source = Some(Arc::clone(&port) as Arc<dyn TranslationSource>);
        }
        st.viommu = Some(port);
        st.atc.clear();
        st.atc_epoch = st.atc_epoch.wrapping_add(1);
    }

    /// The ATS, PASID and PRI controls as the guest last set them; `None` for a capability
    /// the guest does not see. The ATS path takes Enable and STU from here.
    pub fn capability_controls(&self) -> CapabilityControls {
        lock(&self.state).view.controls()
    }

    /// What the capability policy decided for this device.
    pub fn capability_decisions(&self) -> ResolvedCapabilities {
        lock(&self.state).view.decisions().clone()
    }

    /// CAP_CONTROL: the controls packed into one register.
    fn cap_control(controls: &CapabilityControls) -> u32 {
        let mut v = 0;
        if let Some(ats) = controls.ats {
            if ats.enabled {
                v |= CAP_CONTROL_ATS_ENABLE;
            }
            v |= u32::from(ats.stu) << CAP_CONTROL_ATS_STU_SHIFT;
        }
        if let Some(pasid) = controls.pasid {
            for (on, bit) in [
                (pasid.enabled, CAP_CONTROL_PASID_ENABLE),
                (pasid.exec_enabled, CAP_CONTROL_PASID_EXEC),
                (pasid.privileged_enabled, CAP_CONTROL_PASID_PRIV),
            ] {
                if on {
                    v |= bit;
                }
            }
        }
        if controls.pri.is_some_and(|pri| pri.enabled) {
            v |= CAP_CONTROL_PRI_ENABLE;
        }
        v
    }

    fn read_register(st: &State, offset: u64) -> u32 {
        let r = &st.regs;
        match offset {
            ID => u32::from_le_bytes(*b"ADMA"),
            VERSION => 1 << 16,
            SRC_LO => r.src as u32,
            SRC_HI => (r.src >> 32) as u32,
            DST_LO => r.dst as u32,
            DST_HI => (r.dst >> 32) as u32,
            LEN => r.len,
            PATTERN => r.pattern,
            STATUS => r.status,
            ERROR => r.error,
            RESULT => r.result,
            COMPLETED => r.completed,
            IRQ_STATUS => r.irq_status,
            MAX_LEN => MAX_TRANSFER,
            REJECTED => r.rejected,
            CAP_CONTROL => Self::cap_control(&st.view.controls()),
            PASID => r.pasid,
            ATS_REQUESTS => st.counters.requests as u32,
            ATC_HITS => st.counters.hits as u32,
            ATC_MISSES => st.counters.misses as u32,
            ATC_INVALIDATIONS => st.counters.invalidations as u32,
            ATC_ENTRIES => st.atc.len() as u32,
            FAULT_ADDR_LO => r.fault_addr as u32,
            FAULT_ADDR_HI => (r.fault_addr >> 32) as u32,
            _ => 0,
        }
    }

    fn bar0_read(st: &State, offset: u64, buf: &mut [u8]) {
        if offset >= MSIX_TABLE_OFFSET {
            let table = MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + st.msix_table.len() as u64;
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = if table.contains(&at) {
                    st.msix_table[(at - MSIX_TABLE_OFFSET) as usize]
                } else {
                    0 // PBA and reserved space: nothing pending is ever latched here.
                };
            }
            return;
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            let reg = Self::read_register(st, at & !3);
            *b = reg.to_le_bytes()[(at & 3) as usize];
        }
    }

    fn write_register(&self, st: &mut State, reg: u64, value: u32, mask: u32) {
        let merge = |old: u32| (old & !mask) | (value & mask);
        let r = &mut st.regs;
        match reg {
            SRC_LO => r.src = (r.src & !0xffff_ffff) | u64::from(merge(r.src as u32)),
            SRC_HI => r.src = (r.src & 0xffff_ffff) | u64::from(merge((r.src >> 32) as u32)) << 32,
            DST_LO => r.dst = (r.dst & !0xffff_ffff) | u64::from(merge(r.dst as u32)),
            DST_HI => r.dst = (r.dst & 0xffff_ffff) | u64::from(merge((r.dst >> 32) as u32)) << 32,
            LEN => r.len = merge(r.len),
            PATTERN => r.pattern = merge(r.pattern),
            PASID => r.pasid = merge(r.pasid) & (PASID_VALID | PASID_PRIV | 0xf_ffff),
            IRQ_STATUS => {
                r.irq_status &= !(value & mask);
                if r.irq_status & 1 == 0 {
                    // Acknowledged: the completion no longer asserts INTx.
                    if let Err(e) = st.irqs.set_intx_level(false) {
                        tracing::warn!(device = %self.name, error = %e, "deasserting INTx failed");
                    }
                    Self::sync_intx(st, &self.name);
                }
            }
            CMD => self.doorbell(st, merge(0)),
            _ => {}
        }
    }

    fn bar0_write(&self, st: &mut State, offset: u64, data: &[u8]) {
        if offset >= MSIX_TABLE_OFFSET {
            let len = st.msix_table.len() as u64;
            for (i, b) in data.iter().enumerate() {
                let at = offset + i as u64;
                if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + len).contains(&at) {
                    st.msix_table[(at - MSIX_TABLE_OFFSET) as usize] = *b;
                }
            }
            return;
        }
        // Split into per-register pieces so unaligned or 8-byte writes behave like bytes lanes.
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let reg = at & !3;
            let lane = (at & 3) as usize;
            let n = (4 - lane).min(rest.len());
            let mut bytes = [0u8; 4];
            let mut mask = [0u8; 4];
            bytes[lane..lane + n].copy_from_slice(&rest[..n]);
            mask[lane..lane + n].fill(0xff);
            self.write_register(st, reg, u32::from_le_bytes(bytes), u32::from_le_bytes(mask));
            at += n as u64;
            rest = &rest[n..];
        }
    }

    fn finish(st: &mut State, job: &Job, error: u32, result: Option<u32>, name: &str) {
        if job.generation != st.generation {
            return;
        }
        st.regs.status = if error == ERR_NONE {
            STATUS_DONE
        } else {
            STATUS_ERROR
        };
        st.regs.error = error;
        if let Some(r) = result {
            st.regs.result = r;
        }
        st.regs.completed = st.regs.completed.wrapping_add(1);
        st.regs.irq_status |= 1;
        if job.irq {
            match st.irqs.raise_completion() {
                Ok(index) => tracing::trace!(device = name, index, "completion interrupt"),
                Err(e) => tracing::warn!(device = name, error = %e, "completion interrupt failed"),
            }
            Self::sync_intx(st, name);
        }
    }

    /// Keeps the INTx bits of config space and the IRQ table in step: the guest's INTx Disable
    /// (Command bit 10) gates the line, and Interrupt Status (Status bit 3) shows it. Called
    /// after anything that changes either side.
    fn sync_intx(st: &mut State, name: &str) {
        let command = st.config.u16_at(PCI_COMMAND);
        let status = st.config.u16_at(PCI_STATUS);
        match st.irqs.sync_config(command, status) {
            Ok((status, fired)) => {
                st.config.set_u16(PCI_STATUS, status);
                if fired {
                    tracing::trace!(device = name, "INTx signalled on INTx Disable clear");
                }
            }
            Err(e) => tracing::warn!(device = name, error = %e, "INTx update failed"),
        }
    }

    /// Starts, replaces or stops the task watching the INTx unmask trigger so that it follows
    /// what the client registered.
    fn watch_unmask_fd(&self, st: &mut State) {
        let wanted = st.irqs.intx_unmask_fd();
        let unchanged = match (&st.unmask_watch, &wanted) {
            (Some(w), Some(fd)) => Arc::ptr_eq(&w.fd, fd),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        if let Some(old) = st.unmask_watch.take() {
            old.task.abort();
        }
        let Some(fd) = wanted else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(device = %self.name, "no runtime to watch the INTx unmask trigger");
            return;
        };
        let state = Arc::clone(&self.state);
        let name = self.name.clone();
        let watched = Arc::clone(&fd);
        let task = rt.spawn(async move {
            let watch = match EventfdWatch::new(watched) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(device = %name, error = %e, "cannot watch the INTx unmask trigger");
                    return;
                }
            };
            while watch.signalled().await.is_ok() {
                let mut st = lock(&state);
                if let Err(e) = st.irqs.unmask_intx() {
                    tracing::warn!(device = %name, error = %e, "INTx unmask on resample failed");
                }
            }
        });
        st.unmask_watch = Some(UnmaskWatch {
            fd,
            task: task.abort_handle(),
        });
    }

    /// What the next command does about ATS: `None` while ATS Enable is clear (untranslated
    /// DMA). Empties the ATC when ATS was turned off or the STU changed, since its entries were
    /// sized for the old STU.
    fn ats_setup(st: &mut State) -> Option<AtsSetup> {
        let controls = st.view.controls();
        let ats = controls.ats.filter(|a| a.enabled);
        let stu_log2 = ats.map(|a| (a.stu & 0x1f) + 12);
        if st.atc_stu != stu_log2 {
            st.atc.clear();
            st.atc_stu = stu_log2;
        }
        let tag = Self::request_tag(st);
        stu_log2.map(|stu_log2| AtsSetup {
            stu_log2,
            pasid: tag.pasid,
            privileged: tag.privileged,
        })
    }

    /// The PASID (while PASID Enable is set and the PASID register is valid) and privilege
    /// the next command's requests carry.
    fn request_tag(st: &State) -> RequestTag {
        let controls = st.view.controls();
        let pasid_control = controls.pasid.filter(|p| p.enabled);
        let tagged = pasid_control.is_some() && st.regs.pasid & PASID_VALID != 0;
        let pasid = tagged
            .then(|| Pasid::new(st.regs.pasid & 0xf_ffff).ok())
            .flatten();
        let privileged = tagged
            && pasid_control.is_some_and(|p| p.privileged_enabled)
            && st.regs.pasid & PASID_PRIV != 0;
        RequestTag { pasid, privileged }
    }

    fn doorbell(&self, st: &mut State, cmd: u32) {
        if st.regs.status == STATUS_BUSY {
            st.regs.rejected = st.regs.rejected.wrapping_add(1);
            return;
        }
        let ats = Self::ats_setup(st);
        let job = Job {
            op: cmd & 0xf,
            src: st.regs.src,
            dst: st.regs.dst,
            len: st.regs.len,
            pattern: st.regs.pattern,
            irq: cmd & CMD_IRQ != 0,
            generation: st.generation,
            ats,
            tag: Self::request_tag(st),
        };
        st.regs.status = STATUS_BUSY;
        st.regs.error = ERR_NONE;
        let check = if !matches!(job.op, OP_COPY | OP_FILL | OP_CHECKSUM) {
            ERR_OPCODE
        } else if job.len == 0 || job.len > MAX_TRANSFER {
            ERR_LENGTH
        } else {
            ERR_NONE
        };
        let memory = st.memory.clone();
        let (check, memory) = match (check, memory) {
            (ERR_NONE, None) => (ERR_NO_CLIENT, None),
            (c, m) => (c, m),
        };
        if check != ERR_NONE {
            Self::finish(st, &job, check, None, &self.name);
            return;
        }
        let Some(memory) = memory else { return };
        let path = match (job.ats, st.source.clone()) {
            (None, _) => None,
            (Some(setup), Some(source)) => Some(TranslatedPath {
                state: Arc::clone(&self.state),
                source,
                setup,
                requester: st.viommu.as_ref().map_or(RequesterId(0), |p| p.requester()),
            }),
            (Some(_), None) => {
                Self::finish(st, &job, ERR_NO_CLIENT, None, &self.name);
                return;
            }
        };
        let state = Arc::clone(&self.state);
        let name = self.name.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            Self::finish(st, &job, ERR_NO_CLIENT, None, &self.name);
            return;
        };
        let viommu = st.viommu.clone();
        let stopped = Arc::new(JobStopped::default());
        let on_drop = StoppedOnDrop(Arc::clone(&stopped));
        let task = rt.spawn(async move {
            let _stopped = on_drop;
            let dma = JobDma {
                memory: &memory,
                path: path.as_ref(),
                viommu: viommu.as_deref(),
                tag: job.tag,
            };
            let outcome = run_job(&dma, &job).await;
            let mut st = lock(&state);
            match outcome {
                Ok(result) => Self::finish(&mut st, &job, ERR_NONE, result, &name),
                Err(JobError::Translate { addr, reason }) => {
                    tracing::debug!(device = %name, addr = format_args!("{addr:#x}"), %reason, "DMA command found no usable translation");
                    if job.generation == st.generation {
                        st.regs.fault_addr = addr;
                    }
                    Self::finish(&mut st, &job, ERR_TRANSLATION, None, &name)
                }
                Err(JobError::Access(e)) => {
                    tracing::debug!(device = %name, error = %e, "DMA command failed");
                    Self::finish(&mut st, &job, ERR_DMA_FAULT, None, &name)
                }
            }
        });
        st.job = Some(RunningJob {
            abort: task.abort_handle(),
            stopped,
            ats: job.ats.map(|a| AtsFootprint {
                pasid: a.pasid,
                ranges: job.ranges(),
            }),
        });
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// A guest-memory access failed.
    #[error("a DMA access failed")]
    Access(#[from] DmaError),
    /// ATS is on and `addr` has no usable translation.
    #[error("no usable translation for {addr:#x}: {reason}")]
    Translate { addr: u64, reason: String },
}

/// ATS for one command: the ATC in the device state and the source to ask on a miss.
struct TranslatedPath {
    state: Arc<Mutex<State>>,
    source: Arc<dyn TranslationSource>,
    setup: AtsSetup,
    requester: RequesterId,
}

impl TranslatedPath {
    /// The translation of `addr` for an access of kind `write`, from the ATC or, on a miss,
    /// from the source (asking for `want` bytes from `addr`, so one request can cover the rest
    /// of the command). An entry that lacks the needed permission counts as a miss: the
    /// device asks again, as for a write to a page it translated with No-Write.
    async fn entry(
        &self,
        addr: u64,
        want: u64,
        write: bool,
    ) -> Result<TranslationCompletion, JobError> {
        let pasid = self.setup.pasid;
        for _ in 0..TRANSLATION_RETRIES {
            let epoch = {
                let mut st = lock(&self.state);
                if let Some(c) = st.atc.lookup(pasid, addr) {
                    if c.permits(write) {
                        st.counters.hits += 1;
                        return Ok(c);
                    }
                }
                st.counters.misses += 1;
                st.counters.requests += 1;
                st.atc_epoch
            };
            let request = TranslationRequest {
                requester: self.requester,
                pasid,
                address: addr,
                length: want.max(1),
                no_write: !write,
                exec: false,
                privileged: self.setup.privileged,
                stu_log2: self.setup.stu_log2,
            };
            let answer =
                self.source
                    .translate(&request)
                    .await
                    .map_err(|e| JobError::Translate {
                        addr,
                        reason: crate::server::supervisor::error_chain(&e),
                    })?;
            check_completions(&request, &answer).map_err(|e| JobError::Translate {
                addr,
                reason: e.to_string(),
            })?;
            let mut st = lock(&self.state);
            if st.atc_epoch != epoch {
                // An invalidation overtook the answer: it may describe what was just removed.
                continue;
            }
            for c in &answer {
                st.atc.insert(pasid, *c);
            }
            return Ok(answer[0]);
        }
        Err(JobError::Translate {
            addr,
            reason: "invalidations kept overtaking the translation request".into(),
        })
    }
}

/// How one command reaches memory: untranslated, or through the ATC; behind an embedded
/// vIOMMU every access is also translated or checked by the model.
struct JobDma<'a> {
    memory: &'a GuestMemory,
    path: Option<&'a TranslatedPath>,
    viommu: Option<&'a ViommuPort>,
    tag: RequestTag,
}

/// Where one piece of an access goes.
enum Target {
    /// An address of the map table (untranslated, or guest-physical behind a vIOMMU).
    Untranslated(u64),
    /// A translated address in the source's translated space.
    Translated(TranslatedSpace, u64),
}

impl JobDma<'_> {
    fn remap_failed(addr: u64, e: RemapError) -> JobError {
        JobError::Translate {
            addr,
            reason: e.to_string(),
        }
    }

    /// The target of the piece at `at` (at most `n` bytes) and how many bytes it covers.
    async fn target(
        &self,
        addr: u64,
        done: usize,
        want: u64,
        total: usize,
        write: bool,
    ) -> Result<(Target, usize), JobError> {
        let at = addr.checked_add(done as u64).ok_or(JobError::Translate {
            addr,
            reason: "the access runs past the end of the address space".into(),
        })?;
        let (target, n) = match self.path {
            None => (Target::Untranslated(at), total - done),
            Some(path) => {
                let (at, n, entry) = self.piece(path, addr, done, want, total, write).await?;
                if entry.untranslated_only {
                    (Target::Untranslated(at), n)
                } else {
                    let space = path.source.translated_space();
                    (Target::Translated(space, entry.translate(at)), n)
                }
            }
        };
        let Some(port) = self.viommu else {
            return Ok((target, n));
        };
        let (pasid, privileged) = (self.tag.pasid, self.tag.privileged);
        let (target, remapped) = match target {
            Target::Untranslated(a) => {
                let r: Remapped = port
                    .untranslated(pasid, a, write, privileged)
                    .map_err(|e| Self::remap_failed(a, e))?;
                (Target::Untranslated(r.address), r)
            }
            Target::Translated(space, t) => {
                let r = port
                    .translated(pasid, t, write, privileged)
                    .map_err(|e| Self::remap_failed(at, e))?;
                (Target::Translated(space, r.address), r)
            }
        };
        let n = n.min(
            usize::try_from(remapped.contiguous)
                .unwrap_or(usize::MAX)
                .max(1),
        );
        Ok((target, n))
    }

    /// Reads `buf` at untranslated `addr`; `want` is what the command still has to read from
    /// there.
    async fn read(&self, addr: u64, want: u64, buf: &mut [u8]) -> Result<(), JobError> {
        if self.path.is_none() && self.viommu.is_none() {
            return Ok(self.memory.read(addr, buf).await?);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let (target, n) = self.target(addr, done, want, buf.len(), false).await?;
            let piece = &mut buf[done..done + n];
            match target {
                Target::Untranslated(a) => self.memory.read(a, piece).await?,
                Target::Translated(space, t) => {
                    self.memory.read_translated(space, t, piece).await?
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at untranslated `addr`; `want` as for [`Self::read`].
    async fn write(&self, addr: u64, want: u64, data: &[u8]) -> Result<(), JobError> {
        if self.path.is_none() && self.viommu.is_none() {
            return Ok(self.memory.write(addr, data).await?);
        }
        let mut done = 0usize;
        while done < data.len() {
            let (target, n) = self.target(addr, done, want, data.len(), true).await?;
            let piece = &data[done..done + n];
            match target {
                Target::Untranslated(a) => self.memory.write(a, piece).await?,
                Target::Translated(space, t) => {
                    self.memory.write_translated(space, t, piece).await?
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The next piece of an access: its address, length (up to the end of its translation)
    /// and translation.
    async fn piece(
        &self,
        path: &TranslatedPath,
        addr: u64,
        done: usize,
        want: u64,
        total: usize,
        write: bool,
    ) -> Result<(u64, usize, TranslationCompletion), JobError> {
        let at = addr.checked_add(done as u64).ok_or(JobError::Translate {
            addr,
            reason: "the access runs past the end of the address space".into(),
        })?;
        let entry = path
            .entry(at, want.saturating_sub(done as u64), write)
            .await?;
        if !entry.untranslated_only && !entry.permits(write) {
            let what = if entry.is_hole() {
                "the address is not mapped".to_string()
            } else {
                format!(
                    "the translation does not permit {}",
                    if write { "writes" } else { "reads" }
                )
            };
            return Err(JobError::Translate {
                addr: at,
                reason: what,
            });
        }
        let left_in_entry = entry.range.last() - at;
        let n = (total - done).min(
            usize::try_from(left_in_entry)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
        );
        Ok((at, n, entry))
    }
}

async fn run_job(dma: &JobDma<'_>, job: &Job) -> Result<Option<u32>, JobError> {
    let len = job.len as usize;
    let mut buf = vec![0u8; CHUNK.min(len)];
    let mut done = 0usize;
    let mut crc = crc32fast::Hasher::new();
    while done < len {
        let n = CHUNK.min(len - done);
        let chunk = &mut buf[..n];
        let off = done as u64;
        let want = (len - done) as u64;
        match job.op {
            OP_COPY => {
                dma.read(job.src.wrapping_add(off), want, chunk).await?;
                dma.write(job.dst.wrapping_add(off), want, chunk).await?;
            }
            OP_FILL => {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = job.pattern.to_le_bytes()[(done + i) % 4];
                }
                dma.write(job.dst.wrapping_add(off), want, chunk).await?;
            }
            _ => {
                dma.read(job.src.wrapping_add(off), want, chunk).await?;
                crc.update(chunk);
            }
        }
        done += n;
    }
    Ok((job.op == OP_CHECKSUM).then(|| crc.finalize()))
}

impl Device for AtsDma {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DEVICE_FLAG_PCI | DEVICE_FLAG_RESET,
            num_regions: region::NUM_PCI,
            num_irqs: lock(&self.state).irqs.num_indexes(),
        }
    }

    fn region(&self, index: u32) -> Option<RegionSpec> {
        let rw = REGION_FLAG_READ | REGION_FLAG_WRITE;
        let plain = |size| RegionSpec {
            description: RegionDescription {
                index,
                flags: if size > 0 { rw } else { 0 },
                size,
                offset: 0,
                caps: Vec::new(),
            },
            fd: None,
        };
        match index {
            0 => Some(plain(BAR0_SIZE)),
            2 => Some(RegionSpec {
                description: RegionDescription {
                    index,
                    flags: rw | REGION_FLAG_MMAP,
                    size: BAR2_SIZE,
                    offset: 0,
                    caps: vec![RegionCap::SparseMmap(vec![SparseMmapArea {
                        offset: 0,
                        size: BAR2_SIZE,
                    }])],
                },
                fd: Some(Arc::clone(&self.bar2)),
            }),
            region::CONFIG => Some(plain(lock(&self.state).view.len() as u64)),
            i if i < region::NUM_PCI => Some(plain(0)),
            _ => None,
        }
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let st = lock(&self.state);
        match index {
            0 => Self::bar0_read(&st, offset, buf),
            2 => nix::sys::uio::pread(&*self.bar2, buf, offset as i64)
                .map(|_| ())
                .map_err(|_| DeviceError::CheckRange {
                    index,
                    offset,
                    len: buf.len(),
                    size: BAR2_SIZE,
                })?,
            region::CONFIG => {
                let (len, size) = (buf.len(), st.view.len() as u64);
                let range_error = |_| DeviceError::CheckRange {
                    index,
                    offset,
                    len,
                    size,
                };
                // The device's own bytes for the range; on the stack for the small accesses
                // config cycles are, so they cost no allocation.
                let mut small = [0u8; 64];
                let mut large = Vec::new();
                let own = if len <= small.len() {
                    &mut small[..len]
                } else {
                    large.resize(len, 0);
                    &mut large[..]
                };
                st.config.read(offset, own).map_err(range_error)?;
                st.view.read(offset, own, buf).map_err(range_error)?;
            }
            _ => return Err(DeviceError::CheckRegion { index }),
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut st = lock(&self.state);
        match index {
            0 => self.bar0_write(&mut st, offset, data),
            2 => {
                nix::sys::uio::pwrite(&*self.bar2, data, offset as i64).map_err(|_| {
                    DeviceError::CheckRange {
                        index,
                        offset,
                        len: data.len(),
                        size: BAR2_SIZE,
                    }
                })?;
            }
            region::CONFIG => {
                let size = st.view.len() as u64;
                let range_error = |_| DeviceError::CheckRange {
                    index,
                    offset,
                    len: data.len(),
                    size,
                };
                // Emulated bits (chain links, ATS/PASID/PRI controls) stay in the view; only
                // the rest reaches the model's own config space.
                if let Some(own) = st.view.write(offset, data).map_err(range_error)? {
                    st.config
                        .write_masked(own.offset, &own.data, &own.mask)
                        .map_err(range_error)?;
                }
                Self::sync_intx(&mut st, &self.name);
            }
            _ => return Err(DeviceError::CheckRegion { index }),
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        lock(&self.state).irqs.info(index)
    }

    fn wired_irqs(&self) -> Vec<u32> {
        lock(&self.state).irqs.wired()
    }

    fn set_irqs(&self, request: SetIrqsRequest) -> Result<(), DeviceError> {
        let mut st = lock(&self.state);
        st.irqs.set(request)?;
        self.watch_unmask_fd(&mut st);
        Ok(())
    }

    fn reset(&self) -> Result<(), DeviceError> {
        let mut st = lock(&self.state);
        st.generation = st.generation.wrapping_add(1);
        if let Some(job) = st.job.take() {
            drop(st);
            job.stop(&self.name);
            st = lock(&self.state);
        }
        st.regs = Registers::default();
        st.atc.clear();
        st.atc_stu = None;
        st.atc_epoch = st.atc_epoch.wrapping_add(1);
        st.counters = AtcCounters::default();
        st.config.reset();
        st.view.reset();
        st.irqs.reset_intx();
        Self::sync_intx(&mut st, &self.name);
        st.msix_table.fill(0);
        drop(st);
        let zero = vec![0u8; BAR2_SIZE as usize];
        nix::sys::uio::pwrite(&*self.bar2, &zero, 0).map_err(DeviceError::ClearMemory)?;
        Ok(())
    }

    fn attach(&self, memory: Arc<GuestMemory>) {
        let mut st = lock(&self.state);
        st.source = Some(match &st.viommu {
            Some(port) => Arc::clone(port) as Arc<dyn TranslationSource>,
            None => Arc::new(ShadowSource::new(Arc::clone(&memory))),
        });
        st.memory = Some(memory);
    }

    fn detach(&self) {
        let mut st = lock(&self.state);
        if let Some(job) = st.job.take() {
            drop(st);
            job.stop(&self.name);
            st = lock(&self.state);
        }
        st.memory = None;
        st.source = None;
        // The translations were the client's; the next client starts with an empty ATC.
        st.atc.clear();
        st.atc_epoch = st.atc_epoch.wrapping_add(1);
        st.irqs.clear();
        if let Some(watch) = st.unmask_watch.take() {
            watch.task.abort();
        }
        if st.regs.status == STATUS_BUSY {
            // The job's memory is being torn down; it cannot complete for anyone.
            st.generation = st.generation.wrapping_add(1);
            st.regs.status = STATUS_ERROR;
            st.regs.error = ERR_NO_CLIENT;
        }
    }

    fn invalidate_atc(&self, invalidation: &AtcInvalidation) -> InvalidationFuture {
        let mut st = lock(&self.state);
        let entries_removed = st.atc.invalidate(invalidation);
        st.atc_epoch = st.atc_epoch.wrapping_add(1);
        st.counters.invalidations += 1;
        // The running command may hold a translation the invalidation removed (or be about to
        // cache one): the completion waits until it has ended.
        let running = st.job.as_ref().filter(|job| {
            job.ats.as_ref().is_some_and(|f| {
                f.ranges
                    .iter()
                    .any(|&(first, last)| invalidation.hits(f.pasid, true, first, last))
            }) && !job.stopped.is_done()
        });
        let wait = running.map(|job| Arc::clone(&job.stopped));
        drop(st);
        let name = self.name.clone();
        Box::pin(async move {
            let waited_for_dma = wait.is_some();
            if let Some(stopped) = wait {
                if tokio::time::timeout(INVALIDATION_WAIT, stopped.ended())
                    .await
                    .is_err()
                {
                    tracing::error!(device = %name, "a command using invalidated translations did not end within 5 s");
                }
            }
            AtcInvalidationCompletion {
                entries_removed,
                waited_for_dma,
            }
        })
    }

    fn capabilities(&self) -> Option<crate::pci::ResolvedCapabilities> {
        Some(lock(&self.state).view.decisions().clone())
    }

    fn ats_counters(&self) -> Option<AtcCounters> {
        let st = lock(&self.state);
        st.view.controls().ats.map(|_| AtcCounters {
            entries: st.atc.len() as u64,
            ..st.counters
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::caps::CapabilityChain;

    #[test]
    fn config_space_has_every_capability_in_well_formed_chains() {
        let cs = build_config_space(true);
        let chain = CapabilityChain::walk(cs.bytes());
        assert!(chain.standard_error.is_none() && chain.extended_error.is_none());
        for id in [CAP_ID_PM, CAP_ID_MSI, CAP_ID_EXP, CAP_ID_MSIX] {
            assert!(chain.find_standard(id).is_some(), "standard cap {id:#x}");
        }
        for id in [EXT_CAP_ID_ATS, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI] {
            assert!(chain.find_extended(id).is_some(), "extended cap {id:#x}");
        }
        assert_eq!(cs.u16_at(0), VENDOR_ID);
        let exp = chain.find_standard(CAP_ID_EXP).unwrap();
        assert_eq!(
            cs.u16_at(exp + 0x10),
            0,
            "Link Control: link enabled, nothing set"
        );
        assert_eq!(cs.u16_at(exp + 0x12), 0x0011, "Link Status: 2.5 GT/s, x1");
        assert_eq!(
            cs.u16_at(exp + 0x02) & 0xf0,
            0,
            "port type: PCI Express endpoint"
        );
    }

    #[tokio::test]
    async fn errors_without_a_client_and_for_bad_commands() {
        let d = AtsDma::new(&PolicyRequest::new("t")).unwrap();
        let w = |off: u64, v: u32| d.region_write(0, off, &v.to_le_bytes()).unwrap();
        let r = |off: u64| {
            let mut b = [0u8; 4];
            d.region_read(0, off, &mut b).unwrap();
            u32::from_le_bytes(b)
        };
        assert_eq!(r(ID), 0x414d_4441);
        w(LEN, 16);
        w(CMD, OP_COPY);
        assert_eq!((r(STATUS), r(ERROR)), (STATUS_ERROR, ERR_NO_CLIENT));
        d.attach(Arc::new(GuestMemory::new(8)));
        w(CMD, 9);
        assert_eq!(r(ERROR), ERR_OPCODE);
        w(LEN, MAX_TRANSFER + 1);
        w(CMD, OP_FILL);
        assert_eq!(r(ERROR), ERR_LENGTH);
        assert_eq!(r(COMPLETED), 3);
        w(IRQ_STATUS, 1);
        assert_eq!(r(IRQ_STATUS), 0);
        // Byte-lane writes compose a 64-bit address.
        d.region_write(0, SRC_LO, &0x1122_3344_5566_7788u64.to_le_bytes())
            .unwrap();
        assert_eq!((r(SRC_LO), r(SRC_HI)), (0x5566_7788, 0x1122_3344));
    }

    /// What Linux's `pci_check_and_mask_intx` (uio_pci_generic, vfio-pci in a guest) needs:
    /// Interrupt Status (Status bit 3) shows the INTx line, and INTx Disable (Command bit 10)
    /// holds the line back without hiding it.
    #[tokio::test]
    async fn intx_follows_irq_status_and_intx_disable_through_config_space() {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        use std::os::fd::AsFd;
        use std::time::{Duration, Instant};
        use vfu_protocol::command::irq;
        use vfu_protocol::request::{IrqAction, IrqData};

        let d = AtsDma::new(&PolicyRequest::new("t")).unwrap();
        let ram = memfd_create(c"t", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&ram, 0x1000).unwrap();
        let memory = Arc::new(GuestMemory::new(8));
        memory.with_table(|t| {
            let rw = crate::dma::DmaProt {
                read: true,
                write: true,
            };
            let region = t.map_fd(0, 0x1000, rw, &ram, 0).unwrap();
            t.insert(region).unwrap();
        });
        d.attach(memory);
        let ev = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        d.set_irqs(SetIrqsRequest {
            index: irq::INTX,
            start: 0,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(vec![ev.as_fd().try_clone_to_owned().unwrap()]),
        })
        .unwrap();
        let signals = || ev.read().unwrap_or(0);
        let w = |off: u64, v: u32| d.region_write(0, off, &v.to_le_bytes()).unwrap();
        let cfg16 = |off: u64| {
            let mut b = [0u8; 2];
            d.region_read(region::CONFIG, off, &mut b).unwrap();
            u16::from_le_bytes(b)
        };
        let set_command = |v: u16| {
            d.region_write(region::CONFIG, PCI_COMMAND as u64, &v.to_le_bytes())
                .unwrap()
        };
        let interrupt_status = || cfg16(PCI_STATUS as u64) & 0x0008 != 0;
        let fill_with_irq = || async {
            w(LEN, 64);
            w(CMD, OP_FILL | CMD_IRQ);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut b = [0u8; 4];
                d.region_read(0, STATUS, &mut b).unwrap();
                if u32::from_le_bytes(b) != STATUS_BUSY {
                    break u32::from_le_bytes(b);
                }
                assert!(Instant::now() < deadline, "the FILL did not finish");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };

        // The guest set INTx Disable: the completion asserts the line without signalling it.
        set_command(0x0406);
        assert_eq!(fill_with_irq().await, STATUS_DONE);
        assert!(
            interrupt_status(),
            "Interrupt Status shows the asserted line"
        );
        assert_eq!(signals(), 0, "INTx Disable holds the line back");
        // Clearing INTx Disable while the line is asserted delivers it.
        set_command(0x0006);
        assert_eq!(signals(), 1);
        assert_eq!(cfg16(PCI_COMMAND as u64), 0x0006);
        // Acknowledging in the device (IRQ_STATUS is W1C) drops the line.
        w(IRQ_STATUS, 1);
        assert!(!interrupt_status());
        // The vector automasked when it fired; unmask as the client does on EOI. The next
        // completion signals at once, and a reset deasserts the line.
        d.set_irqs(SetIrqsRequest {
            index: irq::INTX,
            start: 0,
            count: 1,
            action: IrqAction::Unmask,
            data: IrqData::None,
        })
        .unwrap();
        assert_eq!(signals(), 0, "nothing asserted, nothing re-signalled");
        assert_eq!(fill_with_irq().await, STATUS_DONE);
        assert_eq!(signals(), 1);
        assert!(interrupt_status());
        d.reset().unwrap();
        assert!(!interrupt_status());
        assert_eq!(cfg16(PCI_COMMAND as u64), 0);
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::pci::caps::{CapabilityChain, EXT_CAP_ID_NULL};
    use crate::pci::policy::{
        CapabilityPolicy, CompatLevel, HostIommuCaps, IommuSpec, PolicySetting,
    };

    fn config_read(d: &AtsDma, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        d.region_read(region::CONFIG, offset, &mut buf).unwrap();
        buf
    }

    fn guest_chain(d: &AtsDma) -> CapabilityChain {
        CapabilityChain::parse(&config_read(d, 0, 4096)).expect("well-formed chains")
    }

    fn extended_ids(d: &AtsDma) -> Vec<u16> {
        guest_chain(d).extended.iter().map(|e| e.id).collect()
    }

    fn bar0(d: &AtsDma, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.region_read(0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn default_policy_exposes_everything_in_place() {
        let d = AtsDma::new(&PolicyRequest::new("t")).unwrap();
        assert_eq!(
            extended_ids(&d),
            [EXT_CAP_ID_ATS, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI]
        );
        let decisions = d.capability_decisions();
        assert!(decisions.iter().all(|x| x.exposed), "{decisions:?}");
        let controls = d.capability_controls();
        assert_eq!(controls.ats.map(|a| a.enabled), Some(false));
        assert!(controls.pasid.is_some() && controls.pri.is_some());
    }

    #[test]
    fn ats_off_leaves_a_null_capability_at_0x100() {
        let mut request = PolicyRequest::new("t");
        request.policies.ats = PolicySetting::explicit(CapabilityPolicy::Off);
        // PRI needs ATS; auto follows it.
        let d = AtsDma::new(&request).unwrap();
        assert_eq!(extended_ids(&d), [EXT_CAP_ID_NULL, EXT_CAP_ID_PASID]);
        assert_eq!(
            config_read(&d, 0x100, 4),
            [0, 0, 0x80, 0x10],
            "ID 0, v0, next 0x108"
        );
        let controls = d.capability_controls();
        assert!(controls.ats.is_none() && controls.pri.is_none());
        // The masked ATS Control is not guest-writable and the engine does not see it.
        d.region_write(region::CONFIG, 0x106, &[0x1f, 0x80])
            .unwrap();
        assert_eq!(config_read(&d, 0x104, 4), [0; 4]);
        assert_eq!(bar0(&d, CAP_CONTROL) & CAP_CONTROL_ATS_ENABLE, 0);
    }

    #[test]
    fn ats_control_writes_reach_the_model_but_not_its_own_config_space() {
        let d = AtsDma::new(&PolicyRequest::new("t")).unwrap();
        // Enable + STU 5, plus a try at the read-only ATS Capability register.
        d.region_write(region::CONFIG, 0x104, &[0xff, 0xff, 0xe5, 0xff])
            .unwrap();
        assert_eq!(config_read(&d, 0x104, 4), [0x20, 0x00, 0x05, 0x80]);
        let ats = d.capability_controls().ats.unwrap();
        assert!(ats.enabled);
        assert_eq!(ats.stu, 5);
        assert_eq!(ats.smallest_translation_unit(), 1 << 17);
        assert_eq!(
            bar0(&d, CAP_CONTROL),
            CAP_CONTROL_ATS_ENABLE | 5 << CAP_CONTROL_ATS_STU_SHIFT
        );
        let st = lock(&d.state);
        assert_eq!(st.config.u16_at(0x106), 0, "the write stayed in the view");
        drop(st);
        // The command register is not emulated: it reaches the model's own space.
        d.region_write(region::CONFIG, 0x04, &[0x06, 0x00]).unwrap();
        assert_eq!(lock(&d.state).config.u16_at(0x04), 0x0006);
        // Reset clears the emulated controls too.
        d.reset().unwrap();
        assert!(!d.capability_controls().ats.unwrap().enabled);
        assert_eq!(bar0(&d, CAP_CONTROL), 0);
    }

    #[test]
    fn pasid_and_pri_controls_are_emulated() {
        let mut request = PolicyRequest::new("t");
        request.host = HostIommuCaps::from_spec(&IommuSpec {
            pasid_exec: false,
            ..IommuSpec::default()
        });
        let d = AtsDma::new(&request).unwrap();
        // PASID: Exec Enable is not writable when Exec is not supported.
        d.region_write(region::CONFIG, 0x10e, &[0x07, 0x00])
            .unwrap();
        assert_eq!(config_read(&d, 0x10c, 4), [0x04, 0x14, 0x05, 0x00]);
        let pasid = d.capability_controls().pasid.unwrap();
        assert!(pasid.enabled && !pasid.exec_enabled && pasid.privileged_enabled);
        // PRI: Enable sticks, Reset reads back 0, Stopped follows Enable.
        d.region_write(region::CONFIG, 0x114, &[0x03, 0x00])
            .unwrap();
        assert_eq!(config_read(&d, 0x114, 4), [0x01, 0x00, 0x00, 0x00]);
        d.region_write(region::CONFIG, 0x11c, &[0x10, 0, 0, 0])
            .unwrap();
        let pri = d.capability_controls().pri.unwrap();
        assert!(pri.enabled);
        assert_eq!(pri.outstanding_allocation, 0x10);
        d.region_write(region::CONFIG, 0x114, &[0x00, 0x00])
            .unwrap();
        assert_eq!(config_read(&d, 0x116, 2), [0x00, 0x01], "stopped again");
        assert_eq!(
            bar0(&d, CAP_CONTROL),
            CAP_CONTROL_PASID_ENABLE | CAP_CONTROL_PASID_PRIV
        );
    }

    #[test]
    fn hidden_pasid_is_synthesized_with_the_iommu_width() {
        let mut request = PolicyRequest::new("t");
        request.pasid_cap_hidden = true;
        request.host = HostIommuCaps::from_spec(&IommuSpec {
            max_pasid_log2: 16,
            pasid_priv: false,
            ..IommuSpec::default()
        });
        let d = AtsDma::new(&request).unwrap();
        let chain = guest_chain(&d);
        assert_eq!(chain.find_extended(EXT_CAP_ID_PASID), Some(0xff8));
        assert_eq!(
            extended_ids(&d),
            [EXT_CAP_ID_ATS, EXT_CAP_ID_PRI, EXT_CAP_ID_PASID]
        );
        assert_eq!(config_read(&d, 0xffc, 4), [0x02, 0x10, 0x00, 0x00]);
        let decisions = d.capability_decisions();
        assert!(
            decisions.pasid.reason.contains("synthesized at 0xff8"),
            "{}",
            decisions.pasid
        );
    }

    #[test]
    fn a_refused_policy_is_reported_with_the_policy_message() {
        let mut request = PolicyRequest::new("demo0");
        request.policies = CompatLevel::CURRENT.resolve(Some(CapabilityPolicy::On), None, None);
        request.host = HostIommuCaps::from_spec(&IommuSpec {
            ats_supported: false,
            ..IommuSpec::default()
        });
        let err = AtsDma::new(&request).unwrap_err();
        assert!(matches!(err, AtsDmaError::ApplyPolicy(_)));
        assert_eq!(
            err.to_string(),
            "device demo0: ats=on but the IOMMU reports ATS not supported (iommu.ats_supported=false); use ats=auto or ats=off"
        );
        assert!(plan(&request).is_err(), "plan agrees with new");
    }
}

#[cfg(test)]
mod ats_tests {
    use super::*;
    use crate::dma::{DmaBacking, DmaProt, DmaRegion, MessageDmaRequest};
    use crate::viommu::ats::{AtsRange, TranslatedSpace, TranslationFuture, TranslationRequest};
    use std::task::{Context, Poll, Waker};

    const RW: DmaProt = DmaProt {
        read: true,
        write: true,
    };

    /// Translates 4 KiB pages to the map table's own addresses, PASID p shifted by p * 64 KiB,
    /// so that where a command lands shows which PASID it was translated for.
    #[derive(Debug)]
    struct PasidShift;

    impl TranslationSource for PasidShift {
        fn translate(&self, r: &TranslationRequest) -> TranslationFuture<'_> {
            let base = r.address & !0xfff;
            let shift = r.pasid.map_or(0, |p| u64::from(p.get()) << 16);
            let range = AtsRange::new(base, 12).unwrap();
            Box::pin(std::future::ready(Ok(vec![TranslationCompletion {
                translated: base + shift,
                read: true,
                write: !r.no_write,
                ..TranslationCompletion::hole(range)
            }])))
        }

        fn translated_space(&self) -> TranslatedSpace {
            TranslatedSpace::MapTable
        }
    }

    fn bar0(d: &AtsDma, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.region_read(0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn w(d: &AtsDma, offset: u64, v: u32) {
        d.region_write(0, offset, &v.to_le_bytes()).unwrap();
    }

    async fn idle(d: &AtsDma) -> (u32, u32) {
        for _ in 0..10_000 {
            if bar0(d, STATUS) != STATUS_BUSY {
                return (bar0(d, STATUS), bar0(d, ERROR));
            }
            tokio::task::yield_now().await;
        }
        panic!("the command did not finish");
    }

    fn enable_ats_and_pasid(d: &AtsDma) {
        d.region_write(region::CONFIG, 0x106, &[0x00, 0x80])
            .unwrap();
        d.region_write(region::CONFIG, 0x10e, &[0x01, 0x00])
            .unwrap();
    }

    #[tokio::test]
    async fn the_atc_caches_per_pasid_and_invalidates_by_pasid() {
        let d = AtsDma::new(&PolicyRequest::new("t")).unwrap();
        let ram = memfd_create(c"t", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&ram, 0x4_0000).unwrap();
        let memory = Arc::new(GuestMemory::new(8));
        memory.with_table(|t| {
            let region = t.map_fd(0, 0x4_0000, RW, &ram, 0).unwrap();
            t.insert(region).unwrap();
        });
        d.attach(memory);
        d.set_translation_source(Arc::new(PasidShift));
        enable_ats_and_pasid(&d);
        for pasid in [1u32, 2] {
            w(&d, PASID, PASID_VALID | pasid);
            w(&d, DST_LO, 0x1000);
            w(&d, LEN, 16);
            w(&d, PATTERN, 0x1111_1111 * pasid);
            w(&d, CMD, OP_FILL);
            assert_eq!(idle(&d).await, (STATUS_DONE, ERR_NONE));
            let mut got = [0u8; 16];
            nix::sys::uio::pread(&ram, &mut got, 0x1000 + (i64::from(pasid) << 16)).unwrap();
            assert_eq!(got, [0x11 * pasid as u8; 16], "PASID {pasid}'s translation");
        }
        assert_eq!(bar0(&d, ATC_ENTRIES), 2, "one entry per PASID");
        assert_eq!((bar0(&d, ATC_MISSES), bar0(&d, ATC_HITS)), (2, 0));
        // PASID 1 again: a hit, and still PASID 1's page.
        w(&d, PASID, PASID_VALID | 1);
        w(&d, CMD, OP_FILL);
        assert_eq!(idle(&d).await, (STATUS_DONE, ERR_NONE));
        assert_eq!(bar0(&d, ATC_HITS), 1);
        // An invalidation for PASID 2 leaves PASID 1's entry.
        let two = AtcInvalidation {
            pasid: Pasid::new(2).ok(),
            global: false,
            ..AtcInvalidation::all(RequesterId(0))
        };
        let done = d.invalidate_atc(&two).await;
        assert_eq!(done.entries_removed, 1);
        assert!(!done.waited_for_dma, "nothing was running");
        assert_eq!(bar0(&d, ATC_ENTRIES), 1);
        assert_eq!(d.ats_counters().unwrap().invalidations, 1);
        // PASID Enable off: the PASID register is ignored, requests go without PASID.
        d.region_write(region::CONFIG, 0x10e, &[0x00, 0x00])
            .unwrap();
        w(&d, PATTERN, 0x7777_7777);
        w(&d, CMD, OP_FILL);
        assert_eq!(idle(&d).await, (STATUS_DONE, ERR_NONE));
        let mut got = [0u8; 16];
        nix::sys::uio::pread(&ram, &mut got, 0x1000).unwrap();
        assert_eq!(got, [0x77; 16]);
        // ATS off: the ATC is emptied and DMA is untranslated again.
        d.region_write(region::CONFIG, 0x106, &[0x00, 0x00])
            .unwrap();
        w(&d, CMD, OP_FILL);
        assert_eq!(idle(&d).await, (STATUS_DONE, ERR_NONE));
        assert_eq!(bar0(&d, ATC_ENTRIES), 0);
    }

    #[tokio::test]
    async fn an_invalidation_completes_only_after_the_command_using_it_ended() {
        let d = AtsDma::new(&PolicyRequest::new("t")).unwrap();
        let memory = Arc::new(GuestMemory::new(8));
        memory
            .with_table(|t| t.insert(DmaRegion::new(0x10_0000, 0x1000, RW, DmaBacking::Message)))
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        memory.set_message_port(Some((tx, 4096)));
        d.attach(Arc::clone(&memory));
        d.set_translation_source(Arc::new(PasidShift));
        enable_ats_and_pasid(&d);
        w(&d, SRC_LO, 0x10_0000);
        w(&d, LEN, 16);
        w(&d, CMD, OP_CHECKSUM);
        // The command waits for the client's DMA_READ answer.
        let Some(MessageDmaRequest::Read { reply, .. }) = rx.recv().await else {
            panic!("expected a DMA_READ");
        };
        let mut invalidation = d.invalidate_atc(&AtcInvalidation::all(RequesterId(0)));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            invalidation.as_mut().poll(&mut cx).is_pending(),
            "the command still uses its translation"
        );
        assert_eq!(bar0(&d, COMPLETED), 0);
        reply.send(Ok(vec![7; 16])).unwrap();
        let done = invalidation.await;
        assert!(done.waited_for_dma);
        assert_eq!(
            bar0(&d, COMPLETED),
            1,
            "the command ended before the completion"
        );
        assert_eq!((bar0(&d, STATUS), bar0(&d, ERROR)), (STATUS_DONE, ERR_NONE));
        assert_eq!(bar0(&d, RESULT), crc32fast::hash(&[7; 16]));
        // An invalidation that misses the command's ranges does not wait for it.
        w(&d, CMD, OP_CHECKSUM);
        let _pending = rx.recv().await.unwrap();
        let elsewhere = AtcInvalidation::range(
            RequesterId(0),
            crate::viommu::ats::InvalidationRange::new(0x20_0000, 0x1000),
        );
        let mut other = d.invalidate_atc(&elsewhere);
        assert!(matches!(other.as_mut().poll(&mut cx), Poll::Ready(c) if !c.waited_for_dma));
    }
}
