//! Starting, restarting and stopping the configured devices; reloading the configuration.
//!
//! Each device runs in its own task with its own stop signal. A reload re-reads every
//! configuration file and compares each device's new configuration with the running one: only
//! devices whose configuration changed are restarted, so the clients of the others never
//! notice. A file that cannot be used is reported and leaves its device (if any) as it was. A
//! device that cannot start, or whose task ends on its own, is recorded as failed with the
//! reason and retried at the next reload; the other devices are never touched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vfu_config::{ConfigError, DeviceConfig};
use vfu_protocol::negotiate::ServerLimits;

use crate::device::{CreateDeviceError, Device};
use crate::ops::status::{
    irq_index_name, AtsStatus, CapabilityStatus, ClientStatus, CommandStatus, DeviceState,
    DeviceStatus, DmaStatus, InvalidFile, IrqStatus, MessageStatus,
};
use crate::pci::ResolvedCapabilities;
use crate::server::{DeviceServer, DeviceStats, SocketError};
use crate::viommu::resolve::Resolver;

/// Why a device could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("device {name}: cannot create the device")]
    Create {
        name: String,
        #[source]
        source: Box<CreateDeviceError>,
    },
    #[error("device {name}: cannot serve")]
    Bind {
        name: String,
        #[source]
        source: SocketError,
    },
}

/// An error and its causes on one line, `a: b: c`, for status reports.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A device task ended; sent from inside the task (also when it panics).
#[derive(Debug)]
pub struct Ended {
    name: String,
    generation: u64,
}

struct EndedGuard {
    tx: mpsc::UnboundedSender<Ended>,
    name: String,
    generation: u64,
}

impl Drop for EndedGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Ended {
            name: std::mem::take(&mut self.name),
            generation: self.generation,
        });
    }
}

struct Running {
    generation: u64,
    device: Arc<dyn Device>,
    stats: Arc<DeviceStats>,
    capabilities: Option<ResolvedCapabilities>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

enum Slot {
    Running(Running),
    Failed(String),
}

struct Managed {
    config: DeviceConfig,
    file: Option<PathBuf>,
    slot: Slot,
}

/// What a reload did, by device name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// New devices now serving.
    pub started: Vec<String>,
    /// Devices whose configuration changed (or that had failed) and were started again.
    pub restarted: Vec<String>,
    /// Devices whose file went away.
    pub stopped: Vec<String>,
    /// Devices left exactly as they were.
    pub unchanged: Vec<String>,
    /// Devices that could not be started, with the reason.
    pub failed: Vec<FailedDevice>,
    /// Files that could not be used; the device they described keeps its old configuration.
    pub invalid: Vec<InvalidFile>,
}

/// A device that could not be started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedDevice {
    pub name: String,
    pub reason: String,
}

/// How long stopping one device (finishing its client's message, reset, socket removal) may
/// take before its task is abandoned.
pub const DEVICE_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The set of devices the daemon serves; see the module documentation.
pub struct Supervisor {
    sources: Vec<PathBuf>,
    limits: ServerLimits,
    devices: BTreeMap<String, Managed>,
    invalid: Vec<InvalidFile>,
    ended_tx: mpsc::UnboundedSender<Ended>,
    next_generation: u64,
    /// Where `viommu` devices and the devices behind them find each other.
    viommus: crate::device::viommu::ViommuRegistry,
    /// The vIOMMU model of the VM these devices serve, frozen at the first device that names
    /// one and kept across reloads (a migrated or re-plugged device must see the same model).
    viommu: Resolver,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("sources", &self.sources)
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn model_of(cfg: &DeviceConfig) -> String {
    match &cfg.device {
        vfu_config::DeviceSpec::Emulated(e) => match e.model {
            vfu_config::EmulatedModel::AtsDma => "emulated ats-dma".into(),
        },
        vfu_config::DeviceSpec::Viommu(spec) => match spec {
            vfu_config::ViommuSpec::Vtd { .. } => "embedded vIOMMU vtd".into(),
            vfu_config::ViommuSpec::Smmuv3 { .. } => "embedded vIOMMU smmuv3".into(),
        },
        vfu_config::DeviceSpec::Host(h) => format!(
            "host {}",
            h.pci
                .clone()
                .or_else(|| h.cdev.as_ref().map(|p| p.display().to_string()))
                .unwrap_or_default()
        ),
    }
}

fn qemu_argument(socket: &Path) -> String {
    let device = serde_json::json!({
        "driver": "vfio-user-pci",
        "socket": {"path": socket.display().to_string(), "type": "unix"},
    });
    format!("-device '{device}'")
}

impl Supervisor {
    /// A supervisor for the configuration files and directories `sources` (re-read on every
    /// [`Supervisor::reload`]). The receiver yields an [`Ended`] whenever a device task ends;
    /// pass each to [`Supervisor::device_ended`].
    pub fn new(
        sources: Vec<PathBuf>,
        limits: ServerLimits,
    ) -> (Supervisor, mpsc::UnboundedReceiver<Ended>) {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        (
            Supervisor {
                sources,
                limits,
                devices: BTreeMap::new(),
                invalid: Vec::new(),
                ended_tx,
                next_generation: 1,
                viommus: Default::default(),
                viommu: Resolver::new(),
            },
            ended_rx,
        )
    }

    /// Devices serving now.
    pub fn running(&self) -> usize {
        self.devices
            .values()
            .filter(|m| matches!(m.slot, Slot::Running(_)))
            .count()
    }

    /// Devices configured but not serving.
    pub fn failed(&self) -> usize {
        self.devices.len() - self.running()
    }

    /// Starts a device that has no configuration file (the embedded default).
    pub fn start_unfiled(&mut self, config: DeviceConfig) -> Result<(), String> {
        self.start(config, None)
    }

    /// Creates, binds and spawns one device; records it as failed if any step fails.
    fn start(&mut self, config: DeviceConfig, file: Option<PathBuf>) -> Result<(), String> {
        let name = config.name.clone();
        let result = (|| {
            let device = crate::device::create_in(&config, &self.viommus, &mut self.viommu)
                .map_err(|source| StartError::Create {
                    name: name.clone(),
                    source: Box::new(source),
                })?;
            let server = DeviceServer::bind(
                &config.name,
                &config.socket,
                Arc::clone(&device),
                self.limits.clone(),
            )
            .map_err(|source| StartError::Bind {
                name: name.clone(),
                source,
            })?;
            Ok::<_, StartError>((device, server))
        })();
        let slot = match result {
            Ok((device, server)) => {
                let capabilities = device.capabilities();
                if let Some(c) = &capabilities {
                    for decision in c.iter() {
                        tracing::info!(device = %name, "{decision}");
                    }
                }
                tracing::info!(device = %name, socket = %config.socket.display(), model = %model_of(&config), "listening");
                tracing::info!(
                    device = %name,
                    "attach with QEMU >= 10.1: {} (guest RAM must be fd-backed for DMA, e.g. -object memory-backend-memfd,id=mem,size=1G -machine memory-backend=mem)",
                    qemu_argument(&config.socket)
                );
                let generation = self.next_generation;
                self.next_generation += 1;
                let stats = Arc::new(DeviceStats::new());
                let (stop, stop_rx) = watch::channel(false);
                let guard = EndedGuard {
                    tx: self.ended_tx.clone(),
                    name: name.clone(),
                    generation,
                };
                let task_stats = Arc::clone(&stats);
                let task = tokio::spawn(async move {
                    let _guard = guard;
                    server.serve(stop_rx, task_stats).await;
                });
                Slot::Running(Running {
                    generation,
                    device,
                    stats,
                    capabilities,
                    stop,
                    task,
                })
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::error!(device = %name, "device not started: {reason}");
                Slot::Failed(reason)
            }
        };
        let outcome = match &slot {
            Slot::Running(_) => Ok(()),
            Slot::Failed(r) => Err(r.clone()),
        };
        self.devices.insert(name, Managed { config, file, slot });
        outcome
    }

    /// Stops a device: its client's in-flight message finishes, the client sees EOF, the
    /// device is reset and its socket removed. Bounded by [`DEVICE_STOP_TIMEOUT`].
    async fn stop(name: &str, managed: Managed) {
        let Slot::Running(r) = managed.slot else {
            return;
        };
        let _ = r.stop.send(true);
        let mut task = r.task;
        match tokio::time::timeout(DEVICE_STOP_TIMEOUT, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => {
                tracing::error!(device = %name, "the device's server panicked while stopping")
            }
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::error!(device = %name, "the device did not stop within {} s; abandoning it", DEVICE_STOP_TIMEOUT.as_secs());
                task.abort();
            }
        }
    }

    /// A device task ended. If the supervisor did not ask for it, the device is recorded as
    /// failed; the others keep serving.
    pub async fn device_ended(&mut self, ended: Ended) {
        let Some(managed) = self.devices.get_mut(&ended.name) else {
            return;
        };
        let Slot::Running(r) = &mut managed.slot else {
            return;
        };
        if r.generation != ended.generation {
            return;
        }
        let why = match (&mut r.task).await {
            Ok(()) => "the device's server stopped unexpectedly".to_string(),
            Err(e) if e.is_panic() => "the device's server panicked".to_string(),
            Err(e) => format!("the device's server ended: {e}"),
        };
        tracing::error!(device = %ended.name, "{why}; it no longer serves, the other devices are unaffected");
        managed.slot = Slot::Failed(why);
    }

    /// Re-reads every configuration file and applies the differences; see the module
    /// documentation. Devices are stopped before new ones start, so a socket path can move
    /// from one device to another in one reload.
    pub async fn reload(&mut self) -> ReloadReport {
        let mut report = ReloadReport::default();
        if self.sources.is_empty() {
            report.unchanged = self.devices.keys().cloned().collect();
            return report;
        }
        let (files, list_errors) = vfu_config::config_files(&self.sources);
        // A directory emptied of configurations means "no devices", not an error.
        let list_errors: Vec<ConfigError> = list_errors
            .into_iter()
            .filter(|e| !matches!(e, ConfigError::NoConfigs { .. }))
            .collect();
        if !list_errors.is_empty() {
            // Without the full list of files we cannot tell a removed device from an unreadable
            // one; change nothing.
            for e in list_errors {
                report.invalid.push(InvalidFile {
                    file: match &e {
                        ConfigError::ReadFile { file, .. } => file.display().to_string(),
                        ConfigError::ReadDir { dir, .. } => dir.display().to_string(),
                        _ => String::new(),
                    },
                    error: e.to_string(),
                });
            }
            tracing::error!(
                "reload refused, no device changed: {}",
                report
                    .invalid
                    .iter()
                    .map(|i| i.error.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            report.unchanged = self.devices.keys().cloned().collect();
            self.invalid = report.invalid.clone();
            return report;
        }

        // Read each file on its own; check names and sockets across the good ones.
        let mut wanted: BTreeMap<String, (DeviceConfig, PathBuf)> = BTreeMap::new();
        let mut sockets: HashMap<PathBuf, PathBuf> = HashMap::new();
        let mut invalid_files: Vec<PathBuf> = Vec::new();
        for file in files {
            let problem = match vfu_config::load_file(&file) {
                Err(e) => Some(e),
                Ok(cfg) => {
                    if let Some((_, first)) = wanted.get(&cfg.name) {
                        Some(ConfigError::DuplicateName {
                            name: cfg.name.clone(),
                            first: first.clone(),
                            second: file.clone(),
                        })
                    } else if let Some(first) = sockets.get(&cfg.socket) {
                        Some(ConfigError::DuplicateSocket {
                            socket: cfg.socket.clone(),
                            first: first.clone(),
                            second: file.clone(),
                        })
                    } else {
                        sockets.insert(cfg.socket.clone(), file.clone());
                        wanted.insert(cfg.name.clone(), (cfg, file.clone()));
                        None
                    }
                }
            };
            if let Some(e) = problem {
                tracing::error!("configuration file ignored, its device (if any) keeps its previous configuration: {e}");
                report.invalid.push(InvalidFile {
                    file: file.display().to_string(),
                    error: e.to_string(),
                });
                invalid_files.push(file);
            }
        }

        // Devices naming a `viommu` device: the name must be a vIOMMU among the good files,
        // and requester ids unique behind it. An offending file is invalid like any other.
        let loaded: Vec<(PathBuf, DeviceConfig)> = wanted
            .values()
            .map(|(cfg, file)| (file.clone(), cfg.clone()))
            .collect();
        for e in vfu_config::check_viommu_links(&loaded) {
            let ConfigError::ValidateField {
                origin: vfu_config::Origin::File(file),
                ..
            } = &e
            else {
                continue;
            };
            tracing::error!("configuration file ignored, its device (if any) keeps its previous configuration: {e}");
            wanted.retain(|_, (_, f)| f != file);
            report.invalid.push(InvalidFile {
                file: file.display().to_string(),
                error: e.to_string(),
            });
            invalid_files.push(file.clone());
        }

        // Decide per running device: keep, restart or stop.
        let mut to_stop = Vec::new();
        let mut to_start = Vec::new();
        for (name, managed) in &self.devices {
            let kept_by_invalid_file = managed
                .file
                .as_ref()
                .is_some_and(|f| invalid_files.contains(f));
            match wanted.get(name) {
                Some((cfg, _)) if *cfg == managed.config => {
                    if matches!(managed.slot, Slot::Failed(_)) {
                        to_stop.push(name.clone());
                        to_start.push((name.clone(), true));
                    } else {
                        report.unchanged.push(name.clone());
                    }
                }
                Some(_) => {
                    to_stop.push(name.clone());
                    to_start.push((name.clone(), true));
                }
                None if kept_by_invalid_file || managed.file.is_none() => {
                    report.unchanged.push(name.clone());
                }
                None => {
                    to_stop.push(name.clone());
                    report.stopped.push(name.clone());
                }
            }
        }
        for name in wanted.keys() {
            if !self.devices.contains_key(name) {
                to_start.push((name.clone(), false));
            }
        }
        // Concurrently, so a reload takes one device's stop time at most.
        let mut stopping = tokio::task::JoinSet::new();
        for name in to_stop {
            if let Some(managed) = self.devices.remove(&name) {
                tracing::info!(device = %name, "stopping for the new configuration");
                stopping.spawn(async move { Supervisor::stop(&name, managed).await });
            }
        }
        while stopping.join_next().await.is_some() {}
        for (name, again) in to_start {
            let Some((cfg, file)) = wanted.remove(&name) else {
                continue;
            };
            match self.start(cfg, Some(file)) {
                Ok(()) if again => report.restarted.push(name),
                Ok(()) => report.started.push(name),
                Err(reason) => report.failed.push(FailedDevice { name, reason }),
            }
        }
        self.invalid = report.invalid.clone();
        tracing::info!(
            started = report.started.len(),
            restarted = report.restarted.len(),
            stopped = report.stopped.len(),
            unchanged = report.unchanged.len(),
            failed = report.failed.len(),
            invalid = report.invalid.len(),
            "configuration loaded"
        );
        report
    }

    /// Stops every device, concurrently, each bounded by [`DEVICE_STOP_TIMEOUT`].
    pub async fn shutdown(&mut self) {
        let mut stopping = tokio::task::JoinSet::new();
        for (name, managed) in std::mem::take(&mut self.devices) {
            stopping.spawn(async move { Supervisor::stop(&name, managed).await });
        }
        while stopping.join_next().await.is_some() {}
    }

    /// Invalid configuration files of the last (re)load.
    pub fn invalid_files(&self) -> &[InvalidFile] {
        &self.invalid
    }

    /// The status of one device.
    pub fn device_status(&self, name: &str) -> Option<DeviceStatus> {
        self.devices.get(name).map(|m| status_of(name, m))
    }

    /// The status of every device, by name.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .map(|(name, m)| status_of(name, m))
            .collect()
    }
}

fn status_of(name: &str, m: &Managed) -> DeviceStatus {
    let mut status = DeviceStatus {
        name: name.to_string(),
        socket: m.config.socket.display().to_string(),
        config_file: m.file.as_ref().map(|f| f.display().to_string()),
        kind: model_of(&m.config),
        state: DeviceState::Failed,
        reason: None,
        uptime_seconds: 0.0,
        client: None,
        connections: 0,
        capabilities: Vec::new(),
        dma: DmaStatus::default(),
        irqs: Vec::new(),
        messages: MessageStatus::default(),
        ats: None,
    };
    let r = match &m.slot {
        Slot::Failed(reason) => {
            status.reason = Some(reason.clone());
            return status;
        }
        Slot::Running(r) => r,
    };
    let snap = r.stats.snapshot();
    status.state = if snap.client.is_some() {
        DeviceState::Connected
    } else {
        DeviceState::Listening
    };
    status.uptime_seconds = snap.uptime.as_secs_f64();
    status.connections = snap.connections;
    status.client = snap.client.as_ref().map(|c| ClientStatus {
        pid: c.pid,
        uid: c.uid,
        connection: c.number,
        connected_seconds: c.since.elapsed().as_secs_f64(),
    });
    status.capabilities = r
        .capabilities
        .iter()
        .flat_map(|c| c.iter())
        .map(|d| CapabilityStatus {
            capability: d.capability.property().to_string(),
            policy: d.setting.to_string(),
            exposed: d.exposed,
            reason: d.reason.clone(),
        })
        .collect();
    status.dma = DmaStatus {
        maps: snap.dma.maps,
        bytes: snap.dma.bytes,
    };
    status.irqs = r
        .device
        .wired_irqs()
        .into_iter()
        .enumerate()
        .map(|(index, wired)| IrqStatus {
            index: index as u32,
            name: irq_index_name(index as u32),
            wired,
        })
        .collect();
    status.messages = MessageStatus {
        total: snap.per_command.iter().map(|c| c.messages).sum(),
        errors: snap.per_command.iter().map(|c| c.errors).sum(),
        by_command: snap
            .per_command
            .into_iter()
            .map(|c| CommandStatus {
                command: c.command,
                messages: c.messages,
                errors: c.errors,
            })
            .collect(),
    };
    status.ats = r.device.ats_counters().map(|a| AtsStatus {
        requests: a.requests,
        hits: a.hits,
        misses: a.misses,
        invalidations: a.invalidations,
    });
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfud-sup-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, name: &str) {
        std::fs::write(
            dir.join(format!("{name}.json")),
            format!(
                r#"{{"version":1,"name":"{name}","socket":"{}","device":{{"type":"emulated","model":"ats-dma"}}}}"#,
                dir.join(format!("{name}.sock")).display()
            ),
        )
        .unwrap();
    }

    #[tokio::test]
    async fn a_device_whose_server_dies_is_failed_alone_and_retried_at_reload() {
        let dir = config_dir("ended");
        write(&dir, "a0");
        write(&dir, "b0");
        let (mut sup, mut ended) = Supervisor::new(vec![dir.clone()], ServerLimits::default());
        let report = sup.reload().await;
        assert_eq!(report.started, ["a0", "b0"]);
        // Kill a0's server task as a panic would end it.
        let Slot::Running(r) = &sup.devices["a0"].slot else {
            panic!("a0 not running");
        };
        r.task.abort();
        let e = tokio::time::timeout(Duration::from_secs(10), ended.recv())
            .await
            .unwrap()
            .unwrap();
        sup.device_ended(e).await;
        let a0 = sup.device_status("a0").unwrap();
        assert_eq!(a0.state, DeviceState::Failed);
        assert!(a0.reason.unwrap().contains("ended"));
        assert_eq!(
            sup.device_status("b0").unwrap().state,
            DeviceState::Listening
        );
        assert_eq!((sup.running(), sup.failed()), (1, 1));
        // The stale socket a0 left behind is replaced when the reload retries it.
        let report = sup.reload().await;
        assert_eq!(report.restarted, ["a0"]);
        assert_eq!(report.unchanged, ["b0"]);
        assert_eq!(sup.running(), 2);
        sup.shutdown().await;
        assert!(!dir.join("a0.sock").exists() && !dir.join("b0.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unreadable_configuration_directory_changes_nothing() {
        let dir = config_dir("unreadable");
        write(&dir, "a0");
        let (mut sup, _ended) = Supervisor::new(vec![dir.clone()], ServerLimits::default());
        sup.reload().await;
        std::fs::remove_dir_all(&dir).unwrap();
        let report = sup.reload().await;
        assert_eq!(report.unchanged, ["a0"]);
        assert!(report.stopped.is_empty());
        assert_eq!(report.invalid.len(), 1);
        assert_eq!(sup.running(), 1);
        sup.shutdown().await;
    }
}
