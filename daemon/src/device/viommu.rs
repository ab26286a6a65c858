//! `type: viommu`: an embedded vIOMMU model (VT-d or SMMUv3) served as its own PCI function,
//! and the link through which emulated devices sit behind it.
//!
//! The function: BAR0 is the model's register window (trapped; 4- and 8-byte accesses, others
//! read 0 / are ignored); BAR2 holds the MSI-X table (at 0) and PBA (at 0x800). The guest
//! programs the model's own MSI address/data registers as the driver does, but the model's
//! interrupts are delivered to this function's MSI-X vectors, one per interrupt source
//! ([`vector_of_vtd`], [`vector_of_smmuv3`]); the address/data the guest wrote are not used.
//! Guest memory for table walks and queues is this function's DMA map table, guest-physical,
//! and must be fd-backed ([`crate::viommu::guest`]).
//!
//! The link: every `viommu` device owns a [`ViommuSlot`] in the daemon's [`ViommuRegistry`],
//! found by name. A device that names it (`"viommu": "<name>"`, `"requester_id"`) registers
//! there as an endpoint and gets a [`ViommuPort`]: its ATS translation requests, untranslated
//! DMA and translated DMA go through the model with its requester id. Either side may start,
//! stop or lose its client in any order: a port whose model is gone or has no client fails
//! the access ([`ViommuPort`] never waits for it); a device-TLB invalidation for an endpoint
//! that is gone completes at once (nothing cached there).
//!
//! Device-TLB invalidations from the model go to the endpoint's [`Device::invalidate_atc`];
//! the model is acknowledged only when that completes, or times out after
//! [`ATC_INVALIDATION_TIMEOUT`] (VT-d ITE, SMMUv3 CERROR_ATC_INV_SYNC). No lock is held across
//! an await; every register write does bounded model work, and queue processing left over
//! continues in a task that yields between rounds.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use vfu_config::ViommuSpec;
use vfu_protocol::command::{irq, region};
use vfu_protocol::reply::RegionDescription;
use vfu_protocol::request::SetIrqsRequest;
use vfu_protocol::wire::{DEVICE_FLAG_PCI, DEVICE_FLAG_RESET, REGION_FLAG_READ, REGION_FLAG_WRITE};

use crate::device::irq::IrqTable;
use crate::device::{Device, DeviceError, DeviceInfo, RegionSpec};
use crate::dma::GuestMemory;
use crate::pci::caps::{CAP_ID_EXP, CAP_ID_MSIX};
use crate::pci::{ConfigSpace, ConfigSpaceBuilder, HostIommuCaps};
use crate::viommu::ats::{
    check_completions, AtcInvalidation, AtsRange, InvalidationRange, Pasid, RequesterId,
    TranslatedSpace, TranslationCompletion, TranslationError, TranslationFuture,
    TranslationRequest, TranslationSource, MAX_COMPLETIONS,
};
use crate::viommu::guest::ModelMemory;
use crate::viommu::resolve::{resolve, HostIommuInfo, ResolveError, ResolvedViommu};
use crate::viommu::{smmuv3, vtd};

/// PCI vendor id (Red Hat, Inc., the QEMU emulated-device vendor), as for ats-dma.
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device id of the embedded vIOMMU function.
pub const DEVICE_ID: u16 = 0x00fe;
/// Class code: base system peripheral, IOMMU.
pub const CLASS_CODE: u32 = 0x08_06_00;
/// MSI-X vectors: one per interrupt source of either model.
pub const MSIX_VECTORS: u32 = 4;
/// Size of BAR2, which holds the MSI-X table and PBA.
pub const BAR2_SIZE: u64 = 0x1000;
/// Offset of the MSI-X table in BAR2.
pub const MSIX_TABLE_OFFSET: u64 = 0;
/// Offset of the MSI-X PBA in BAR2.
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// How long an endpoint may take to complete a device-TLB invalidation before the model
/// records the time-out (VT-d ITE, SMMUv3 CERROR_ATC_INV_SYNC).
pub const ATC_INVALIDATION_TIMEOUT: Duration = Duration::from_secs(1);

/// VT-d: MSI-X vector 0 = fault event (FECTL/FEDATA/FEADDR), 1 = invalidation completion
/// event (IECTL/IEDATA/IEADDR).
pub fn vector_of_vtd(source: vtd::InterruptSource) -> u32 {
    match source {
        vtd::InterruptSource::Fault => 0,
        vtd::InterruptSource::InvalidationCompletion => 1,
    }
}

/// SMMUv3: MSI-X vector 0 = event queue, 1 = GERROR, 2 = PRI queue, 3 = CMD_SYNC completion
/// (CS = IRQ).
pub fn vector_of_smmuv3(source: smmuv3::InterruptSource) -> u32 {
    match source {
        smmuv3::InterruptSource::EventQueue => 0,
        smmuv3::InterruptSource::GlobalError => 1,
        smmuv3::InterruptSource::PriQueue => 2,
        smmuv3::InterruptSource::CmdSync => 3,
    }
}

/// Why a `viommu` device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ViommuDeviceError {
    /// The model's `auto` properties cannot be resolved.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The resolved VT-d properties are not a valid unit.
    #[error("device {name}: the resolved VT-d properties are not a valid unit: {reason}")]
    CreateVtd { name: String, reason: String },
    /// The resolved SMMUv3 properties are not a valid unit.
    #[error("device {name}: the resolved SMMUv3 properties are not a valid unit")]
    CreateSmmuv3 {
        name: String,
        #[source]
        source: smmuv3::PropertiesError,
    },
}

/// The model behind the function.
#[derive(Debug)]
enum Model {
    Vtd(Box<vtd::Vtd>),
    Smmuv3(Box<smmuv3::Smmuv3>),
}

/// Builds the model a resolved property set describes.
fn build_model(name: &str, resolved: &ResolvedViommu) -> Result<Model, ViommuDeviceError> {
    match resolved {
        ResolvedViommu::Vtd(m) => {
            let cfg = vtd::VtdConfig {
                device_iotlb: m.device_iotlb,
                pasid_bits: m.pasid_bits,
                fs1gp: m.fs1gp,
                ..vtd::VtdConfig::default()
            };
            vtd::Vtd::new(cfg)
                .map(|v| Model::Vtd(Box::new(v)))
                .map_err(|e| ViommuDeviceError::CreateVtd {
                    name: name.to_owned(),
                    reason: e.to_string(),
                })
        }
        ResolvedViommu::Smmuv3(m) => {
            let mut props = smmuv3::Smmuv3Properties {
                ats: m.ats,
                ril: m.ril,
                ssid_bits: m.ssidsize,
                oas: if m.oas_bits >= 48 {
                    smmuv3::Oas::Bits48
                } else {
                    smmuv3::Oas::Bits44
                },
                ..smmuv3::Smmuv3Properties::default()
            };
            if let Some(f) = m.host_formats {
                props.two_level_stream_table = f.st_level >= 1;
                [props.gran4k, props.gran16k, props.gran64k] = f.granules;
            }
            smmuv3::Smmuv3::new(props)
                .map(|s| Model::Smmuv3(Box::new(s)))
                .map_err(|source| ViommuDeviceError::CreateSmmuv3 {
                    name: name.to_owned(),
                    source,
                })
        }
    }
}

impl Model {
    fn window_size(&self) -> u64 {
        match self {
            Model::Vtd(v) => v.window_size(),
            Model::Smmuv3(_) => smmuv3::REGISTER_WINDOW_SIZE,
        }
    }

    fn reset(&mut self) {
        match self {
            Model::Vtd(v) => v.reset(),
            Model::Smmuv3(s) => s.reset(),
        }
    }
}

/// Resolves a `viommu` device's properties: `auto` from its `host` registers, against a host
/// IOMMU that refuses nothing (there is no host device behind an embedded model).
pub fn resolve_spec(name: &str, spec: &ViommuSpec) -> Result<ResolvedViommu, ResolveError> {
    let host = HostIommuInfo::from_config(
        &HostIommuCaps::from_spec(&vfu_config::IommuSpec::default()),
        spec,
    );
    resolve(name, spec, &host)
}

/// The daemon's `viommu` devices by name, and the devices behind each. Shared by everything
/// the supervisor creates, so a device and its vIOMMU find each other whatever their start
/// order.
#[derive(Debug, Default)]
pub struct ViommuRegistry {
    slots: Mutex<HashMap<String, Arc<ViommuSlot>>>,
}

impl ViommuRegistry {
    /// The slot of the vIOMMU device `name` (created empty on first use).
    pub fn slot(&self, name: &str) -> Arc<ViommuSlot> {
        let mut slots = lock(&self.slots);
        Arc::clone(slots.entry(name.to_owned()).or_default())
    }
}

/// One vIOMMU device's meeting point: the running unit, if any, and its endpoints.
#[derive(Debug, Default)]
pub struct ViommuSlot {
    unit: Mutex<Option<Weak<ViommuUnit>>>,
    endpoints: Mutex<HashMap<u16, Weak<dyn Device>>>,
}

impl ViommuSlot {
    fn unit(&self) -> Option<Arc<ViommuUnit>> {
        lock(&self.unit).as_ref().and_then(Weak::upgrade)
    }

    fn endpoint(&self, rid: u16) -> Option<Arc<dyn Device>> {
        lock(&self.endpoints).get(&rid).and_then(Weak::upgrade)
    }

    /// A port for requester id `rid`, before the endpoint device exists (it registers with
    /// [`Self::set_endpoint`] once created).
    pub fn port(self: &Arc<Self>, rid: u16) -> ViommuPort {
        ViommuPort {
            slot: Arc::clone(self),
            rid,
        }
    }

    /// Registers the endpoint device with requester id `rid`, replacing a stopped one.
    pub fn set_endpoint(&self, rid: u16, device: Weak<dyn Device>) {
        lock(&self.endpoints).insert(rid, device);
    }
}

/// Why an access through the vIOMMU failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemapError {
    /// The vIOMMU device is not running or has no client (no guest memory to walk).
    #[error("the vIOMMU device is not running or has no client")]
    Unavailable,
    /// The model refused the access (fault recorded unless the guest suppressed it).
    #[error("the vIOMMU refused the access: {0}")]
    Fault(String),
}

/// What an access through the vIOMMU resolves to: the guest-physical address (in the
/// endpoint's own DMA map table) and how many bytes from it are contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remapped {
    pub address: u64,
    pub contiguous: u64,
}

/// One requester's way into a vIOMMU model: its ATS [`TranslationSource`] and its untranslated
/// and translated DMA checks.
#[derive(Debug, Clone)]
pub struct ViommuPort {
    slot: Arc<ViommuSlot>,
    rid: u16,
}

impl ViommuPort {
    /// The requester id this port tags its requests with.
    pub fn requester(&self) -> RequesterId {
        RequesterId(self.rid)
    }

    /// Untranslated DMA at `addr` (AT = 00): translated by the model, which records a fault
    /// when it refuses.
    pub fn untranslated(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        write: bool,
        privileged: bool,
    ) -> Result<Remapped, RemapError> {
        let unit = self.slot.unit().ok_or(RemapError::Unavailable)?;
        unit.access(self.rid, pasid, addr, write, privileged, false)
    }

    /// Translated DMA at `addr` (AT = 10): allowed only where the model permits ATS for this
    /// requester.
    pub fn translated(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        write: bool,
        privileged: bool,
    ) -> Result<Remapped, RemapError> {
        let unit = self.slot.unit().ok_or(RemapError::Unavailable)?;
        unit.access(self.rid, pasid, addr, write, privileged, true)
    }
}

impl TranslationSource for ViommuPort {
    fn translate(&self, request: &TranslationRequest) -> TranslationFuture<'_> {
        let answer = match self.slot.unit() {
            Some(unit) => unit.translation_request(self.rid, request),
            None => Err(TranslationError::Unavailable),
        };
        Box::pin(std::future::ready(answer))
    }

    fn translated_space(&self) -> TranslatedSpace {
        TranslatedSpace::MapTable
    }
}

/// The running model and the function state around it.
#[derive(Debug)]
struct UnitState {
    model: Model,
    config: ConfigSpace,
    msix_table: Vec<u8>,
    irqs: IrqTable,
    memory: Option<Arc<GuestMemory>>,
    /// Tags of device-TLB invalidations delivered and neither acknowledged nor timed out.
    pending_atc: BTreeSet<u64>,
    /// Bumped by reset and time-outs so that a late completion acknowledges nothing.
    atc_epoch: u64,
    /// A task continues queue processing.
    service_scheduled: bool,
}

/// A device-TLB invalidation to deliver once the unit's lock is released.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    tag: u64,
    epoch: u64,
    invalidation: AtcInvalidation,
}

/// The shared part of a `viommu` device: what endpoints and tasks reach.
#[derive(Debug)]
pub struct ViommuUnit {
    name: String,
    state: Mutex<UnitState>,
    slot: Arc<ViommuSlot>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pasid_of(p: Option<u32>) -> Option<Pasid> {
    p.and_then(|v| Pasid::new(v).ok())
}

/// The naturally aligned range of 2^`size_log2` bytes around `base` (at least a page; the
/// whole space from 64 bits on).
fn range_of(base: u64, size_log2: u32) -> InvalidationRange {
    let log2 = size_log2.clamp(12, 64) as u8;
    let aligned = base
        & !1u64
            .checked_shl(u32::from(log2))
            .map_or(u64::MAX, |s| s - 1);
    AtsRange::new(aligned, log2)
        .unwrap_or(AtsRange::everything())
        .into()
}

/// One ATS answer entry: (untranslated base, log2 size, translated, [R, W, X, Priv, Global,
/// U]).
type Part = (u64, u8, u64, [bool; 6]);

/// Makes consecutive per-page answers conform to the requester's STU (2^`stu` bytes; every
/// entry must be at least that large): entries of at least the STU pass; the smaller ones of
/// one STU unit become one entry when they cover the unit contiguously in both spaces with
/// equal rights, a hole when they are all holes, and otherwise an untranslated-only (U=1)
/// entry, so the device uses untranslated requests there (which the model translates). A unit
/// the answer stops inside (the entry limit) ends the answer, or is answered U=1 when it is
/// the first.
fn merge_to_stu(parts: &[Part], stu: u8) -> Vec<Part> {
    let unit = 1u64 << stu.min(63);
    let mut out = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let (base, log2, _, _) = parts[i];
        if log2 >= stu {
            out.push(parts[i]);
            i += 1;
            continue;
        }
        let ubase = base & !(unit - 1);
        let mut j = i;
        while j < parts.len() && parts[j].0 & !(unit - 1) == ubase && parts[j].1 < stu {
            j += 1;
        }
        let group = &parts[i..j];
        let size = |p: &Part| 1u64.checked_shl(u32::from(p.1)).unwrap_or(u64::MAX);
        let covered: u64 = group.iter().map(size).fold(0, u64::saturating_add);
        let (_, _, first_t, first_f) = group[0];
        let hole = |f: &[bool; 6]| !f[0] && !f[1];
        let complete = base == ubase && covered >= unit;
        if !complete && j == parts.len() && !out.is_empty() {
            break;
        }
        let same_rights = group.iter().all(|p| p.3 == first_f);
        let contiguous = group
            .iter()
            .all(|p| hole(&p.3) || p.2 == first_t.wrapping_add(p.0 - ubase))
            && first_t & (unit - 1) == 0;
        if complete && same_rights && (hole(&first_f) || contiguous) {
            let translated = if hole(&first_f) { 0 } else { first_t };
            out.push((ubase, stu, translated, first_f));
        } else {
            let any = |k: usize| group.iter().any(|p| p.3[k]);
            let flags = [any(0), any(1), any(2), any(3), false, true];
            out.push((ubase, stu, 0, flags));
        }
        i = j;
    }
    out
}

/// A VT-d device-TLB invalidation (type 3 / 8) as the ATS contract's invalidation.
fn from_vtd(i: &vtd::AtcInvalidation) -> AtcInvalidation {
    AtcInvalidation {
        requester: RequesterId(i.sid),
        pasid: pasid_of(i.pasid),
        global: i.global,
        range: range_of(i.base, u32::from(i.size_log2)),
    }
}

/// An SMMUv3 ATC_INV as the ATS contract's invalidation. StreamIDs above 16 bits name no
/// requester vfud serves; they are truncated (and then reach nothing or an unrelated id whose
/// ATC merely loses entries, which is always safe).
fn from_smmuv3(i: &smmuv3::AtcInvalidation) -> AtcInvalidation {
    AtcInvalidation {
        requester: RequesterId(i.sid as u16),
        pasid: pasid_of(i.ssid),
        global: i.global,
        range: range_of(i.start, i.size_log2),
    }
}

impl ViommuUnit {
    /// Collects the model's outputs: interrupts are signalled now, invalidations returned for
    /// delivery after the lock is released.
    fn drain(&self, st: &mut UnitState) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        let mut vectors = Vec::new();
        match &mut st.model {
            Model::Vtd(v) => {
                for e in v.take_events() {
                    match e {
                        vtd::VtdEvent::Interrupt { source, .. } => {
                            vectors.push(vector_of_vtd(source))
                        }
                        vtd::VtdEvent::InvalidateDeviceAtc(i) => deliveries.push(Delivery {
                            tag: i.tag,
                            epoch: st.atc_epoch,
                            invalidation: from_vtd(&i),
                        }),
                    }
                }
            }
            Model::Smmuv3(s) => {
                for o in s.take_outputs() {
                    match o {
                        smmuv3::Smmuv3Output::Interrupt(i) => {
                            vectors.push(vector_of_smmuv3(i.source))
                        }
                        smmuv3::Smmuv3Output::AtcInvalidate(i) => deliveries.push(Delivery {
                            tag: i.id,
                            epoch: st.atc_epoch,
                            invalidation: from_smmuv3(&i),
                        }),
                        smmuv3::Smmuv3Output::PriResponse(r) => {
                            tracing::debug!(device = %self.name, sid = r.sid, prgi = r.prgi, "PRI response without a PRI-capable endpoint; dropped");
                        }
                        smmuv3::Smmuv3Output::SendEvent => {}
                    }
                }
            }
        }
        for vector in vectors {
            if let Err(e) = st.irqs.trigger(irq::MSIX, vector) {
                tracing::warn!(device = %self.name, vector, error = %e, "vIOMMU interrupt failed");
            }
        }
        for d in &deliveries {
            st.pending_atc.insert(d.tag);
        }
        deliveries
    }

    /// Empties the ATC of every endpoint behind the unit: after a reset or when the client
    /// is gone, no translation the guest gave may outlive the tables it came from. The entries
    /// go at once; the completions (waiting for DMA in flight) are not awaited. Called without
    /// the unit's lock.
    fn flush_endpoints(&self) {
        let endpoints: Vec<(u16, Arc<dyn Device>)> = lock(&self.slot.endpoints)
            .iter()
            .filter_map(|(rid, w)| Some((*rid, w.upgrade()?)))
            .collect();
        for (rid, device) in endpoints {
            drop(device.invalidate_atc(&AtcInvalidation::all(RequesterId(rid))));
        }
    }

    fn needs_service(st: &UnitState) -> bool {
        match &st.model {
            Model::Vtd(v) => v.queue_needs_service(),
            Model::Smmuv3(s) => s.commands_pending(),
        }
    }

    /// After a model call: delivers the invalidations it raised and continues queue
    /// processing in a task if the call's budget ran out. Called without the lock.
    fn follow_up(self: &Arc<Self>, deliveries: Vec<Delivery>, schedule: bool) {
        for d in deliveries {
            self.deliver(d);
        }
        if schedule {
            self.schedule_service();
        }
    }

    /// Runs `f` on the model with the lock held, then drains and follows up.
    fn with_model<R>(self: &Arc<Self>, f: impl FnOnce(&mut UnitState) -> R) -> R {
        let (r, deliveries, schedule) = {
            let mut st = lock(&self.state);
            let r = f(&mut st);
            let deliveries = self.drain(&mut st);
            let schedule = Self::needs_service(&st) && !st.service_scheduled;
            if schedule {
                st.service_scheduled = true;
            }
            (r, deliveries, schedule)
        };
        self.follow_up(deliveries, schedule);
        r
    }

    fn schedule_service(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            lock(&self.state).service_scheduled = false;
            return;
        };
        let unit = Arc::clone(self);
        rt.spawn(async move {
            loop {
                tokio::task::yield_now().await;
                let (deliveries, again) = {
                    let mut st = lock(&unit.state);
                    let memory = st.memory.clone();
                    let mut mem = ModelMemory(memory.as_deref());
                    match &mut st.model {
                        Model::Vtd(v) => v.service_queue(&mut mem),
                        Model::Smmuv3(s) => {
                            s.process_commands(&mem);
                        }
                    }
                    let deliveries = unit.drain(&mut st);
                    let again = Self::needs_service(&st);
                    st.service_scheduled = again;
                    (deliveries, again)
                };
                unit.follow_up(deliveries, false);
                if !again {
                    return;
                }
            }
        });
    }

    /// Hands one invalidation to its endpoint and acknowledges the model when the endpoint
    /// completes it, or records the time-out.
    fn deliver(self: &Arc<Self>, d: Delivery) {
        let endpoint = self.slot.endpoint(d.invalidation.requester.0);
        let future = endpoint.map(|e| e.invalidate_atc(&d.invalidation));
        let Some(future) = future else {
            // Nothing is behind that requester id: no ATC holds its translations.
            self.finish_invalidation(d, true);
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.finish_invalidation(d, true);
            return;
        };
        let unit = Arc::clone(self);
        rt.spawn(async move {
            let done = tokio::time::timeout(ATC_INVALIDATION_TIMEOUT, future)
                .await
                .is_ok();
            if !done {
                tracing::warn!(device = %unit.name, requester = d.invalidation.requester.0, "a device-TLB invalidation was not completed within 1 s");
            }
            unit.finish_invalidation(d, done);
        });
    }

    fn finish_invalidation(self: &Arc<Self>, d: Delivery, done: bool) {
        self.with_model(|st| {
            if st.atc_epoch != d.epoch || !st.pending_atc.remove(&d.tag) {
                return;
            }
            let memory = st.memory.clone();
            let mut mem = ModelMemory(memory.as_deref());
            if done {
                match &mut st.model {
                    Model::Vtd(v) => v.ack_atc_invalidation(&mut mem, d.tag),
                    Model::Smmuv3(s) => {
                        s.ack_atc_invalidation(&mem, d.tag);
                    }
                }
            } else {
                match &mut st.model {
                    Model::Vtd(v) => v.atc_invalidation_timeout(),
                    Model::Smmuv3(s) => {
                        s.atc_invalidation_timeout();
                    }
                }
                st.pending_atc.clear();
                st.atc_epoch = st.atc_epoch.wrapping_add(1);
            }
        })
    }

    fn translation_request(
        self: &Arc<Self>,
        rid: u16,
        request: &TranslationRequest,
    ) -> Result<Vec<TranslationCompletion>, TranslationError> {
        let refused = TranslationError::CheckAllowed { requester: rid };
        let answer = self.with_model(|st| {
            let memory = st.memory.clone().ok_or(TranslationError::Unavailable)?;
            let mut mem = ModelMemory(Some(&memory));
            let pasid = request.pasid.map(Pasid::get);
            let entries: Vec<(u64, u8, u64, [bool; 6])> = match &mut st.model {
                Model::Vtd(v) => v
                    .translation_request(
                        &mut mem,
                        &vtd::AtsRequest {
                            sid: rid,
                            pasid,
                            addr: request.address,
                            len: request.length,
                            no_write: request.no_write,
                            exec: request.exec,
                            privileged: request.privileged,
                            max_entries: MAX_COMPLETIONS,
                            stu_log2: request.stu_log2,
                        },
                    )
                    .map_err(|_| refused.clone())?
                    .into_iter()
                    .map(|t| {
                        let flags = [t.r, t.w, t.x, t.privileged, t.global, t.untranslated_only];
                        (t.untranslated_base, t.size_log2, t.translated, flags)
                    })
                    .collect(),
                Model::Smmuv3(s) => {
                    // SMMUv3 answers per page; the whole STU units around the request are
                    // asked for and merged (see `merge_to_stu`).
                    let stu = request.stu_log2.clamp(12, 63);
                    let unit = 1u64 << stu;
                    let start = request.address & !(unit - 1);
                    let end = request.address.saturating_add(request.length.max(1));
                    let length = (end - start).div_ceil(unit).saturating_mul(unit);
                    let parts: Vec<(u64, u8, u64, [bool; 6])> = s
                        .translate_ats(
                            &mem,
                            &smmuv3::AtsRequest {
                                sid: u32::from(rid),
                                ssid: pasid,
                                address: start,
                                length,
                                no_write: request.no_write,
                                exec: request.exec,
                                privileged: request.privileged,
                            },
                            MAX_COMPLETIONS,
                        )
                        .map_err(|_| refused.clone())?
                        .into_iter()
                        .map(|t| {
                            let w = t.w && !request.no_write;
                            let flags = [t.r, w, t.x, t.privileged, t.global, t.untranslated_only];
                            (t.untranslated, t.size_log2, t.translated, flags)
                        })
                        .collect();
                    merge_to_stu(&parts, stu)
                }
            };
            Ok::<_, TranslationError>(entries)
        })?;
        let mut out = Vec::with_capacity(answer.len());
        for (base, size_log2, translated, [r, w, x, p, g, u]) in answer {
            // SMMUv3 may grant W to a No-Write request (the page is writable); the ATS
            // contract answers what was asked, so W is dropped there (the device asks again
            // for a write).
            let w = w && !request.no_write;
            let range = AtsRange::new(base, size_log2).map_err(TranslationError::CheckAnswer)?;
            out.push(TranslationCompletion {
                range,
                translated: if r || w { translated } else { 0 },
                read: r,
                write: w,
                exec: x,
                privileged: p,
                global: g,
                untranslated_only: u,
                no_snoop: false,
            });
        }
        check_completions(request, &out).map_err(TranslationError::CheckAnswer)?;
        Ok(out)
    }

    fn access(
        self: &Arc<Self>,
        rid: u16,
        pasid: Option<Pasid>,
        addr: u64,
        write: bool,
        privileged: bool,
        translated: bool,
    ) -> Result<Remapped, RemapError> {
        self.with_model(|st| {
            let memory = st.memory.clone().ok_or(RemapError::Unavailable)?;
            let mut mem = ModelMemory(Some(&memory));
            let pasid = pasid.map(Pasid::get);
            match &mut st.model {
                Model::Vtd(v) => {
                    let req = vtd::DmaRequest {
                        sid: rid,
                        pasid,
                        addr,
                        write,
                        privileged,
                    };
                    if translated {
                        return v
                            .translated_dma(&mut mem, &req)
                            .map(|address| Remapped {
                                address,
                                contiguous: 0x1000 - (address & 0xfff),
                            })
                            .map_err(|f| RemapError::Fault(format!("{:?}", f.reason)));
                    }
                    let t = v
                        .translate_dma(&mut mem, &req)
                        .map_err(|f| RemapError::Fault(format!("{:?}", f.reason)))?;
                    let address = t
                        .translate(addr)
                        .ok_or_else(|| RemapError::Fault("no translation".into()))?;
                    let end = 1u64
                        .checked_shl(u32::from(t.size_log2))
                        .and_then(|size| t.iova_base.checked_add(size));
                    let contiguous = end.map_or(u64::MAX, |e| e.saturating_sub(addr)).max(1);
                    Ok(Remapped {
                        address,
                        contiguous,
                    })
                }
                Model::Smmuv3(s) => {
                    let req = smmuv3::DmaRequest {
                        sid: u32::from(rid),
                        ssid: pasid,
                        address: addr,
                        access: smmuv3::Access {
                            write,
                            exec: false,
                            privileged,
                        },
                    };
                    let result = if translated {
                        s.translated_dma(&mem, &req)
                    } else {
                        s.translate_dma(&mem, &req)
                    };
                    result
                        .map(|t| Remapped {
                            address: t.address,
                            contiguous: t.contiguous.max(1),
                        })
                        .map_err(|f| RemapError::Fault(f.to_string()))
                }
            }
        })
    }
}

/// A `viommu` device: see the module documentation.
#[derive(Debug)]
pub struct ViommuDevice {
    unit: Arc<ViommuUnit>,
    bar0_size: u64,
}

fn build_config_space(bar0_size: u64) -> ConfigSpace {
    let mut b = ConfigSpaceBuilder::new(VENDOR_ID, DEVICE_ID, CLASS_CODE, 1);
    b.memory_bar32(0, bar0_size as u32);
    b.memory_bar32(2, BAR2_SIZE as u32);
    // PCI Express v2 root-complex integrated endpoint. `exp` is the body after the id/next
    // bytes, so register offset R of the capability is exp[R - 2].
    let mut exp = vec![0u8; 0x3a];
    let at = |r: usize| r - 2;
    exp[at(0x02)..at(0x04)].copy_from_slice(&0x0092u16.to_le_bytes());
    b.standard_capability(CAP_ID_EXP, &exp);
    // MSI-X: table in BAR2 at 0, PBA at 0x800.
    let mut msix = vec![0u8; 10];
    msix[0..2].copy_from_slice(&((MSIX_VECTORS - 1) as u16).to_le_bytes());
    msix[2..6].copy_from_slice(&((MSIX_TABLE_OFFSET as u32) | 2).to_le_bytes());
    msix[6..10].copy_from_slice(&((MSIX_PBA_OFFSET as u32) | 2).to_le_bytes());
    let msix_at = b.standard_capability(CAP_ID_MSIX, &msix);
    b.writable(msix_at + 3, &[0xc0]);
    b.build()
}

impl ViommuDevice {
    /// Creates the model `spec` describes (resolving `auto` from its `host` registers) and
    /// registers it in `slot`, replacing a stopped predecessor.
    pub fn new(
        name: &str,
        spec: &ViommuSpec,
        slot: Arc<ViommuSlot>,
    ) -> Result<ViommuDevice, ViommuDeviceError> {
        let resolved = resolve_spec(name, spec)?;
        let model = build_model(name, &resolved)?;
        let bar0_size = model.window_size().next_power_of_two().max(0x1000);
        tracing::info!(device = %name, "embedded vIOMMU: {resolved}");
        let unit = Arc::new(ViommuUnit {
            name: name.to_owned(),
            state: Mutex::new(UnitState {
                model,
                config: build_config_space(bar0_size),
                msix_table: vec![0; (MSIX_VECTORS * 16) as usize],
                irqs: IrqTable::new_pci(0, 0, MSIX_VECTORS),
                memory: None,
                pending_atc: BTreeSet::new(),
                atc_epoch: 0,
                service_scheduled: false,
            }),
            slot: Arc::clone(&slot),
        });
        *lock(&slot.unit) = Some(Arc::downgrade(&unit));
        Ok(ViommuDevice { unit, bar0_size })
    }

    fn bar0_read(&self, offset: u64, buf: &mut [u8]) {
        let st = lock(&self.unit.state);
        buf.fill(0);
        match &st.model {
            Model::Vtd(v) => {
                if v.mmio_read(offset, buf).is_err() {
                    buf.fill(0);
                }
            }
            Model::Smmuv3(s) => {
                if let Ok(size) = u8::try_from(buf.len()) {
                    if matches!(size, 4 | 8) {
                        let v = s.mmio_read(offset, size).to_le_bytes();
                        buf.copy_from_slice(&v[..buf.len()]);
                    }
                }
            }
        }
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) {
        let name = self.unit.name.clone();
        self.unit.with_model(|st| {
            let memory = st.memory.clone();
            let mut mem = ModelMemory(memory.as_deref());
            match &mut st.model {
                Model::Vtd(v) => {
                    if let Err(e) = v.mmio_write(&mut mem, offset, data) {
                        tracing::debug!(device = %name, error = %e, "register write ignored");
                    }
                }
                Model::Smmuv3(s) => {
                    let mut word = [0u8; 8];
                    if matches!(data.len(), 4 | 8) {
                        word[..data.len()].copy_from_slice(data);
                        s.mmio_write(&mem, offset, data.len() as u8, u64::from_le_bytes(word));
                    } else {
                        tracing::debug!(device = %name, offset, len = data.len(), "register write of an unsupported size ignored");
                    }
                }
            }
        })
    }
}

impl Drop for ViommuDevice {
    fn drop(&mut self) {
        let mut unit = lock(&self.unit.slot.unit);
        if unit
            .as_ref()
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.unit)))
        {
            *unit = None;
        }
    }
}

impl Device for ViommuDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DEVICE_FLAG_PCI | DEVICE_FLAG_RESET,
            num_regions: region::NUM_PCI,
            num_irqs: lock(&self.unit.state).irqs.num_indexes(),
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
            0 => Some(plain(self.bar0_size)),
            2 => Some(plain(BAR2_SIZE)),
            region::CONFIG => Some(plain(lock(&self.unit.state).config.len() as u64)),
            i if i < region::NUM_PCI => Some(plain(0)),
            _ => None,
        }
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        match index {
            0 => self.bar0_read(offset, buf),
            2 => {
                let st = lock(&self.unit.state);
                for (i, b) in buf.iter_mut().enumerate() {
                    let at = offset.saturating_add(i as u64);
                    *b = at
                        .checked_sub(MSIX_TABLE_OFFSET)
                        .and_then(|o| st.msix_table.get(usize::try_from(o).ok()?))
                        .copied()
                        .unwrap_or(0);
                }
            }
            region::CONFIG => {
                let st = lock(&self.unit.state);
                st.config
                    .read(offset, buf)
                    .map_err(|_| DeviceError::CheckRange {
                        index,
                        offset,
                        len: buf.len(),
                        size: st.config.len() as u64,
                    })?;
            }
            _ => return Err(DeviceError::CheckRegion { index }),
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match index {
            0 => self.bar0_write(offset, data),
            2 => {
                let mut st = lock(&self.unit.state);
                for (i, b) in data.iter().enumerate() {
                    let at = offset.saturating_add(i as u64);
                    if let Some(slot) = at
                        .checked_sub(MSIX_TABLE_OFFSET)
                        .and_then(|o| usize::try_from(o).ok())
                        .and_then(|o| st.msix_table.get_mut(o))
                    {
                        *slot = *b;
                    }
                }
            }
            region::CONFIG => {
                let mut st = lock(&self.unit.state);
                let size = st.config.len() as u64;
                st.config
                    .write(offset, data)
                    .map_err(|_| DeviceError::CheckRange {
                        index,
                        offset,
                        len: data.len(),
                        size,
                    })?;
            }
            _ => return Err(DeviceError::CheckRegion { index }),
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        lock(&self.unit.state).irqs.info(index)
    }

    fn wired_irqs(&self) -> Vec<u32> {
        lock(&self.unit.state).irqs.wired()
    }

    fn set_irqs(&self, request: SetIrqsRequest) -> Result<(), DeviceError> {
        lock(&self.unit.state).irqs.set(request)
    }

    fn reset(&self) -> Result<(), DeviceError> {
        {
            let mut st = lock(&self.unit.state);
            st.model.reset();
            st.pending_atc.clear();
            st.atc_epoch = st.atc_epoch.wrapping_add(1);
            st.config.reset();
            st.msix_table.fill(0);
        }
        self.unit.flush_endpoints();
        Ok(())
    }

    fn attach(&self, memory: Arc<GuestMemory>) {
        lock(&self.unit.state).memory = Some(memory);
    }

    /// The model keeps its registers for the next client, but its tables were the client's
    /// memory: the endpoints' ATCs are emptied and their DMA faults until a client is back.
    fn detach(&self) {
        {
            let mut st = lock(&self.unit.state);
            st.memory = None;
            st.irqs.clear();
        }
        self.unit.flush_endpoints();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_page_answers_are_merged_to_the_stu() {
        let rw = [true, true, false, false, false, false];
        let hole = [false; 6];
        let page = |i: u64, t: u64, f| (0x10_0000 + i * 0x1000, 12u8, t, f);
        // 16 contiguous pages with equal rights: one 64 KiB entry.
        let parts: Vec<Part> = (0..16)
            .map(|i| page(i, 0x8000_0000 + i * 0x1000, rw))
            .collect();
        assert_eq!(
            merge_to_stu(&parts, 16),
            vec![(0x10_0000, 16, 0x8000_0000, rw)]
        );
        // Not contiguous in the translated space: untranslated only.
        let mut scattered = parts.clone();
        scattered[3].2 = 0x9000_0000;
        let merged = merge_to_stu(&scattered, 16);
        assert_eq!(merged.len(), 1);
        assert!(merged[0].3[5], "untranslated only: {merged:?}");
        // All holes: one hole; entries at least the STU pass unchanged.
        let holes: Vec<Part> = (0..16).map(|i| page(i, 0, hole)).collect();
        assert_eq!(merge_to_stu(&holes, 16), vec![(0x10_0000, 16, 0, hole)]);
        let big = vec![(0x20_0000, 21u8, 0x4000_0000, rw)];
        assert_eq!(merge_to_stu(&big, 16), big);
        // The answer stops inside the second unit: it ends after the first.
        let mut two = parts.clone();
        two.extend((16..20).map(|i| page(i, 0x8000_0000 + i * 0x1000, rw)));
        assert_eq!(merge_to_stu(&two, 16).len(), 1);
        // STU of one page: unchanged.
        assert_eq!(merge_to_stu(&parts, 12), parts);
    }

    #[test]
    fn model_invalidations_keep_their_range_pasid_and_requester() {
        let v = from_vtd(&vtd::AtcInvalidation {
            tag: 1,
            sid: 0x18,
            pasid: Some(5),
            global: true,
            base: 0x1000_2000,
            size_log2: 13,
        });
        assert_eq!(v.requester, RequesterId(0x18));
        assert_eq!(v.pasid.map(Pasid::get), Some(5));
        assert!(v.global);
        assert_eq!((v.range.first, v.range.last), (0x1000_2000, 0x1000_3fff));
        let s = from_smmuv3(&smmuv3::AtcInvalidation {
            id: 2,
            sid: 0x18,
            ssid: None,
            global: false,
            start: 0x1000_0000,
            size_log2: 12,
        });
        assert_eq!((s.range.first, s.range.last), (0x1000_0000, 0x1000_0fff));
        assert_eq!(s.pasid, None);
        let all = from_smmuv3(&smmuv3::AtcInvalidation {
            size_log2: 64,
            ..smmuv3::AtcInvalidation {
                id: 3,
                sid: 1,
                ssid: None,
                global: false,
                start: 0,
                size_log2: 0,
            }
        });
        assert_eq!((all.range.first, all.range.last), (0, u64::MAX));
    }

    #[test]
    fn a_port_without_a_running_unit_fails_at_once_and_a_new_unit_takes_the_slot() {
        let registry = ViommuRegistry::default();
        let port = registry.slot("iommu0").port(0x18);
        assert_eq!(
            port.untranslated(None, 0x1000, false, false),
            Err(RemapError::Unavailable)
        );
        let spec: ViommuSpec = serde_json::from_str(
            r#"{"model": "vtd", "device_iotlb": true, "pasid_bits": 20, "fs1gp": true}"#,
        )
        .unwrap();
        let device = ViommuDevice::new("iommu0", &spec, registry.slot("iommu0")).unwrap();
        assert_eq!(device.region(0).unwrap().description.size, 0x1000);
        // Running but without a client: no memory to walk, the access fails without a fault.
        assert_eq!(
            port.untranslated(None, 0x1000, false, false),
            Err(RemapError::Unavailable)
        );
        let answer = ready_now(port.translate(&TranslationRequest {
            requester: RequesterId(0x18),
            pasid: None,
            address: 0x1000,
            length: 0x1000,
            no_write: false,
            exec: false,
            privileged: false,
            stu_log2: 12,
        }));
        assert_eq!(answer, Err(TranslationError::Unavailable));
        drop(device);
        assert!(registry.slot("iommu0").unit().is_none());
        let smmu: ViommuSpec = serde_json::from_str(
            r#"{"model": "smmuv3", "ats": true, "ril": true, "ssidsize": 20, "oas": 48}"#,
        )
        .unwrap();
        let device = ViommuDevice::new("iommu0", &smmu, registry.slot("iommu0")).unwrap();
        assert_eq!(
            device.region(0).unwrap().description.size,
            smmuv3::REGISTER_WINDOW_SIZE
        );
        assert!(registry.slot("iommu0").unit().is_some());
    }

    /// Polls a future that is ready at once (the port's answers are).
    fn ready_now(mut f: TranslationFuture<'_>) -> crate::viommu::ats::TranslationResult {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the port's answer is not immediate"),
        }
    }
}
