//! The vfio-user server: one listening socket per device, one client at a time per device.
//!
//! A device outlives its clients: when a client goes, its DMA maps are drained and dropped and
//! its IRQ eventfds closed ([`crate::device::Device::detach`]), and the next client is accepted on
//! the same socket. A connection that arrives while another is being served waits in the listen
//! backlog until the first one ends; vfio-user has one client per device.

mod connection;
mod socket;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::watch;
use vfu_protocol::negotiate::ServerLimits;

use crate::device::Device;

pub use connection::ConnectionSummary;
pub use socket::SocketError;

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

    /// Serves clients one after another until `shutdown` becomes true, then removes the socket.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let mut clients = 0u64;
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
            clients += 1;
            let peer = stream
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .map_or_else(|| "unknown".to_string(), |p| p.to_string());
            tracing::info!(device = %self.name, client = clients, peer_pid = %peer, "client connected");
            let summary = connection::serve(
                &self.name,
                stream,
                Arc::clone(&self.device),
                &self.limits,
                shutdown.clone(),
            )
            .await;
            tracing::info!(
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
        socket::remove(&self.socket, &self.identity);
        tracing::info!(device = %self.name, socket = %self.socket.display(), "stopped serving");
    }
}
