//! The vfio-user server: one listening socket per device, one client at a time per device.
//!
//! A device outlives its clients: when a client goes, its DMA maps are drained and dropped and
//! its IRQ eventfds closed ([`crate::device::Device::detach`]), and the next client is accepted on
//! the same socket. A connection that arrives while another is being served waits in the listen
//! backlog until the first one ends; vfio-user has one client per device.
//!
//! The [`supervisor`] starts, restarts and stops devices as the configuration changes, each
//! device in its own task, so one that fails never takes another down.

mod connection;
mod socket;
pub mod stats;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::Instrument;
use vfu_protocol::negotiate::ServerLimits;

use crate::device::Device;

pub use connection::ConnectionSummary;
pub use socket::SocketError;
pub use stats::DeviceStats;

pub(crate) use socket::{bind as bind_socket, remove as remove_socket, SocketIdentity};

/// How long a device reset at shutdown may take before the socket is removed anyway.
const STOP_RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// A device bound to its listening socket, ready to serve.
pub struct DeviceServer {
    name: String,
    socket: PathBuf,
    listener: UnixListener,
    identity: socket::SocketIdentity,
    device: Arc<dyn Device>,
    limits: ServerLimits,
}

impl std::fmt::Debug for DeviceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceServer")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl DeviceServer {
    /// Binds the device's socket now, so that the caller knows every socket is listening
    /// before it reports readiness. A stale socket left by a dead process is replaced; a live
    /// one, or a path that is not a socket, is an error.
    pub fn bind(
        name: &str,
        socket: &Path,
        device: Arc<dyn Device>,
        limits: ServerLimits,
    ) -> Result<DeviceServer, SocketError> {
        let (listener, identity) = socket::bind(socket)?;
        Ok(DeviceServer {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            listener,
            identity,
            device,
            limits,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves clients one after another until `shutdown` becomes true. Then the current
    /// client's in-flight message finishes, its connection is closed (it sees EOF), the device
    /// is reset so the next start finds it idle, and the socket is removed.
    ///
    /// Runs inside a span naming the device, and each client inside a span naming the
    /// connection, so every log line says which device and client it is about.
    pub async fn serve(self, shutdown: watch::Receiver<bool>, stats: Arc<DeviceStats>) {
        let span = tracing::info_span!("device", name = %self.name);
        self.serve_in_span(shutdown, stats).instrument(span).await;
    }

    async fn serve_in_span(self, mut shutdown: watch::Receiver<bool>, stats: Arc<DeviceStats>) {
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(device = %self.name, error = %e, "accepting a client failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let cred = stream.peer_cred().ok();
            let pid = cred.as_ref().and_then(|c| c.pid());
            let clients = stats.client_connected(pid, cred.as_ref().map(|c| c.uid()));
            let peer = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string());
            let span = tracing::info_span!("conn", n = clients, pid = %peer);
            tracing::info!(parent: &span, device = %self.name, client = clients, peer_pid = %peer, "client connected");
            let summary = connection::serve(
                &self.name,
                stream,
                Arc::clone(&self.device),
                &self.limits,
                shutdown.clone(),
                Arc::clone(&stats),
            )
            .instrument(span.clone())
            .await;
            stats.client_disconnected();
            tracing::info!(
                parent: &span,
                device = %self.name,
                client = clients,
                messages = summary.messages,
                errors = summary.error_replies,
                reason = %summary.end,
                "client disconnected; device state kept, waiting for the next client"
            );
            if *shutdown.borrow() {
                break;
            }
        }
        let device = Arc::clone(&self.device);
        let reset = tokio::time::timeout(
            STOP_RESET_TIMEOUT,
            tokio::task::spawn_blocking(move || device.reset()),
        )
        .await;
        match reset {
            Ok(Ok(Ok(()))) => tracing::debug!(device = %self.name, "device reset for stopping"),
            Ok(Ok(Err(e))) => {
                tracing::warn!(device = %self.name, error = %e, "resetting the device on stop failed")
            }
            Ok(Err(_)) => {
                tracing::error!(device = %self.name, "resetting the device on stop panicked")
            }
            Err(_) => {
                tracing::error!(device = %self.name, "resetting the device on stop took longer than {} s; stopping anyway", STOP_RESET_TIMEOUT.as_secs())
            }
        }
        drop(self.listener);
        socket::remove(&self.socket, &self.identity);
        tracing::info!(device = %self.name, socket = %self.socket.display(), "stopped serving");
    }
}
