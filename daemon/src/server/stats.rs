//! Live counters of one device, shared by its server, its connections and the status reports.
//!
//! Writers only bump atomics or swap the client record, so the hot path never waits on a
//! status request. The DMA map table is not mirrored here: the status asks the connection's
//! [`GuestMemory`] directly (through a weak handle), so the numbers cannot drift from the table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use vfu_protocol::command::Command;

use crate::dma::GuestMemory;

/// Counter slots: one per command number below this, the last one for anything else.
const SLOTS: usize = 20;

/// The client currently connected to a device.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    /// Connection number on this device, from 1.
    pub number: u64,
    /// SO_PEERCRED of the client, when the kernel gave it.
    pub pid: Option<i32>,
    pub uid: Option<u32>,
    /// When it connected.
    pub since: Instant,
    /// The connection's guest memory once VERSION was negotiated.
    memory: Option<Weak<GuestMemory>>,
}

/// DMA maps of the current connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmaUsage {
    pub maps: u64,
    pub bytes: u64,
}

/// Per-device counters; see the module documentation.
#[derive(Debug)]
pub struct DeviceStats {
    started: Instant,
    connections: AtomicU64,
    messages: [AtomicU64; SLOTS],
    errors: [AtomicU64; SLOTS],
    client: Mutex<Option<ClientRecord>>,
}

fn slot(command: u16) -> usize {
    usize::from(command).min(SLOTS - 1)
}

/// The name of a counter slot: the command's, `OTHER` for the catch-all, None for numbers that
/// are not commands (they are still counted under their number).
fn slot_name(slot: usize) -> String {
    if slot == SLOTS - 1 {
        return "OTHER".into();
    }
    match Command::from_u16(slot as u16) {
        Some(c) => c.name().into(),
        None => format!("COMMAND_{slot}"),
    }
}

impl Default for DeviceStats {
    fn default() -> Self {
        DeviceStats::new()
    }
}

impl DeviceStats {
    /// Counters of a device that starts now.
    pub fn new() -> DeviceStats {
        DeviceStats {
            started: Instant::now(),
            connections: AtomicU64::new(0),
            messages: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            client: Mutex::new(None),
        }
    }

    fn client_lock(&self) -> std::sync::MutexGuard<'_, Option<ClientRecord>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message with header `command` arrived (counted before it is executed).
    pub fn count_message(&self, command: u16) {
        self.messages[slot(command)].fetch_add(1, Ordering::Relaxed);
    }

    /// A message with header `command` failed (error reply, or a posted command that failed).
    pub fn count_error(&self, command: u16) {
        self.errors[slot(command)].fetch_add(1, Ordering::Relaxed);
    }

    /// A client connected; returns its connection number.
    pub fn client_connected(&self, pid: Option<i32>, uid: Option<u32>) -> u64 {
        let number = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        *self.client_lock() = Some(ClientRecord {
            number,
            pid,
            uid,
            since: Instant::now(),
            memory: None,
        });
        number
    }

    /// The connection negotiated and its DMA maps now live in `memory`.
    pub fn client_memory(&self, memory: &Arc<GuestMemory>) {
        if let Some(c) = self.client_lock().as_mut() {
            c.memory = Some(Arc::downgrade(memory));
        }
    }

    /// The client is gone.
    pub fn client_disconnected(&self) {
        *self.client_lock() = None;
    }

    /// A consistent copy of everything, for one status report or metrics scrape.
    pub fn snapshot(&self) -> StatsSnapshot {
        let client = self.client_lock().clone();
        let dma = client
            .as_ref()
            .and_then(|c| c.memory.as_ref())
            .and_then(Weak::upgrade)
            .map(|m| {
                m.with_table(|t| DmaUsage {
                    maps: t.len() as u64,
                    bytes: t.iter().map(|r| r.size).sum(),
                })
            })
            .unwrap_or_default();
        let per_command = (0..SLOTS)
            .filter_map(|s| {
                let messages = self.messages[s].load(Ordering::Relaxed);
                let errors = self.errors[s].load(Ordering::Relaxed);
                (messages > 0 || errors > 0).then(|| CommandCounters {
                    command: slot_name(s),
                    messages,
                    errors,
                })
            })
            .collect();
        StatsSnapshot {
            uptime: self.started.elapsed(),
            connections: self.connections.load(Ordering::Relaxed),
            client,
            dma,
            per_command,
        }
    }
}

/// Messages and failures of one command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CommandCounters {
    pub command: String,
    pub messages: u64,
    pub errors: u64,
}

/// See [`DeviceStats::snapshot`].
#[derive(Debug, Clone)]
pub struct StatsSnapshot {
    pub uptime: std::time::Duration,
    pub connections: u64,
    pub client: Option<ClientRecord>,
    pub dma: DmaUsage,
    /// Commands seen at least once, in number order.
    pub per_command: Vec<CommandCounters>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaBacking, DmaProt, DmaRegion};

    #[test]
    fn counts_commands_and_reads_maps_from_the_live_table() {
        let s = DeviceStats::new();
        s.count_message(Command::Version as u16);
        s.count_message(Command::DmaMap as u16);
        s.count_message(Command::DmaMap as u16);
        s.count_error(Command::DmaMap as u16);
        s.count_message(0xffff);
        assert_eq!(s.client_connected(Some(7), Some(0)), 1);
        let memory = Arc::new(GuestMemory::new(8));
        s.client_memory(&memory);
        let prot = DmaProt::from_map_flags(3);
        memory
            .with_table(|t| t.insert(DmaRegion::new(0x1000, 0x3000, prot, DmaBacking::Message)))
            .unwrap();
        let snap = s.snapshot();
        assert_eq!(
            snap.dma,
            DmaUsage {
                maps: 1,
                bytes: 0x3000
            }
        );
        assert_eq!(snap.client.as_ref().unwrap().pid, Some(7));
        let names: Vec<_> = snap
            .per_command
            .iter()
            .map(|c| c.command.as_str())
            .collect();
        assert_eq!(names, ["VERSION", "DMA_MAP", "OTHER"]);
        assert_eq!(snap.per_command[1].errors, 1);
        drop(memory);
        assert_eq!(
            s.snapshot().dma,
            DmaUsage::default(),
            "a gone table has no maps"
        );
        s.client_disconnected();
        assert!(s.snapshot().client.is_none());
        assert_eq!(s.snapshot().connections, 1);
    }
}
