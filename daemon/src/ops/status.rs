//! The status report: what `vfud status` prints and what the metrics are made of.
//!
//! One serde schema serves the control socket, `vfud status --json` and the text rendering, so
//! the three cannot disagree. Fields are only ever added.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

/// The whole daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's process id.
    pub pid: u32,
    /// vfud's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The log filter in force.
    pub log_level: String,
    /// Every configured device, running or failed, by name.
    pub devices: Vec<DeviceStatus>,
    /// Configuration files that were refused at the last (re)load; a device they used to
    /// describe keeps running with its previous configuration.
    pub invalid_files: Vec<InvalidFile>,
}

/// A configuration file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidFile {
    pub file: String,
    /// Every problem, one per line, each naming the file and the JSON path.
    pub error: String,
}

/// What a device is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Serving its socket, no client.
    Listening,
    /// A client is attached.
    Connected,
    /// Not serving; `reason` says why.
    Failed,
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceState::Listening => "listening",
            DeviceState::Connected => "connected",
            DeviceState::Failed => "failed",
        })
    }
}

/// One device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub socket: String,
    /// The configuration file it came from (none for the embedded default device).
    pub config_file: Option<String>,
    /// What backs it, e.g. `emulated ats-dma`.
    pub kind: String,
    pub state: DeviceState,
    /// Why it failed, when `state` is `failed`.
    pub reason: Option<String>,
    /// Seconds since this device instance started (0 when failed).
    pub uptime_seconds: f64,
    /// The attached client, when `state` is `connected`.
    pub client: Option<ClientStatus>,
    /// Clients accepted since the device started.
    pub connections: u64,
    /// The capability policy as resolved at start.
    pub capabilities: Vec<CapabilityStatus>,
    /// DMA maps of the current client.
    pub dma: DmaStatus,
    /// Interrupt vectors wired to the client's eventfds, per IRQ index.
    pub irqs: Vec<IrqStatus>,
    /// vfio-user messages handled since the device started, over all clients.
    pub messages: MessageStatus,
    /// The device's ATS translation cache counters; absent for a device without an ATC.
    pub ats: Option<AtsStatus>,
}

/// The client of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientStatus {
    /// SO_PEERCRED pid (absent if the kernel did not report one).
    pub pid: Option<i32>,
    pub uid: Option<u32>,
    /// Connection number on this device, from 1.
    pub connection: u64,
    pub connected_seconds: f64,
}

/// One capability decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityStatus {
    /// `ats`, `pasid` or `pri`.
    pub capability: String,
    /// The policy applied (`on`, `off`, `auto`, possibly with its compat origin).
    pub policy: String,
    pub exposed: bool,
    pub reason: String,
}

/// DMA maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaStatus {
    pub maps: u64,
    pub bytes: u64,
}

/// Wired vectors of one IRQ index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqStatus {
    pub index: u32,
    /// `intx`, `msi`, `msix`, `err`, `req`, or the number for others.
    pub name: String,
    pub wired: u32,
}

/// Message counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    pub total: u64,
    /// Messages that failed (error replies and failed posted commands).
    pub errors: u64,
    /// Per command, for the commands seen.
    pub by_command: Vec<CommandStatus>,
}

/// Counters of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStatus {
    pub command: String,
    pub messages: u64,
    pub errors: u64,
}

/// ATS translation cache counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtsStatus {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
}

/// The vfio PCI name of an IRQ index.
pub fn irq_index_name(index: u32) -> String {
    match index {
        0 => "intx".into(),
        1 => "msi".into(),
        2 => "msix".into(),
        3 => "err".into(),
        4 => "req".into(),
        n => n.to_string(),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

impl fmt::Display for DaemonStatus {
    /// The text of `vfud status`: one block per device.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "vfud {} (pid {}), up {}, log level {}, {} device(s)",
            self.version,
            self.pid,
            human_duration(self.uptime_seconds),
            self.log_level,
            self.devices.len()
        )?;
        for d in &self.devices {
            writeln!(f)?;
            write!(f, "{}", d)?;
        }
        for i in &self.invalid_files {
            writeln!(f)?;
            writeln!(f, "invalid configuration file {}:", i.file)?;
            for line in i.error.lines() {
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut state = self.state.to_string();
        if let Some(reason) = &self.reason {
            let _ = write!(state, ": {reason}");
        }
        writeln!(f, "{} ({}): {state}", self.name, self.kind)?;
        writeln!(f, "  socket:       {}", self.socket)?;
        if let Some(file) = &self.config_file {
            writeln!(f, "  config:       {file}")?;
        }
        if self.state == DeviceState::Failed {
            return Ok(());
        }
        writeln!(
            f,
            "  uptime:       {} ({} connection(s))",
            human_duration(self.uptime_seconds),
            self.connections
        )?;
        if let Some(c) = &self.client {
            let pid = c.pid.map_or_else(|| "unknown".into(), |p| p.to_string());
            writeln!(
                f,
                "  client:       pid {pid}, connection {}, for {}",
                c.connection,
                human_duration(c.connected_seconds)
            )?;
        }
        for c in &self.capabilities {
            let shown = if c.exposed { "exposed" } else { "masked" };
            writeln!(
                f,
                "  {:<13} {shown} ({}: {})",
                format!("{}:", c.capability),
                c.policy,
                c.reason
            )?;
        }
        writeln!(
            f,
            "  dma:          {} map(s), {}",
            self.dma.maps,
            human_bytes(self.dma.bytes)
        )?;
        let wired: Vec<String> = self
            .irqs
            .iter()
            .filter(|i| i.wired > 0)
            .map(|i| format!("{} {}", i.name, i.wired))
            .collect();
        let wired = if wired.is_empty() {
            "none".to_string()
        } else {
            wired.join(", ")
        };
        writeln!(f, "  irqs wired:   {wired}")?;
        writeln!(
            f,
            "  messages:     {} ({} failed)",
            self.messages.total, self.messages.errors
        )?;
        for c in &self.messages.by_command {
            writeln!(
                f,
                "    {:<24} {:>10} {:>6} failed",
                c.command, c.messages, c.errors
            )?;
        }
        if let Some(a) = &self.ats {
            writeln!(
                f,
                "  ats:          {} requests, {} hits, {} misses, {} invalidations",
                a.requests, a.hits, a.misses, a.invalidations
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_readable() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_duration(59.9), "59s");
        assert_eq!(human_duration(3661.0), "1h01m");
    }
}
