//! The control socket: status, per-device status, reload, log level and metrics as
//! line-delimited JSON over a unix stream socket.
//!
//! One request per line, one response line each, any number per connection:
//!
//! ```text
//! {"request":"status"}                        -> {"ok":true,"status":{...}}
//! {"request":"device","name":"demo0"}         -> {"ok":true,"device":{...}}
//! {"request":"reload"}                        -> {"ok":true,"reload":{...}}
//! {"request":"set-log-level","level":"debug"} -> {"ok":true,"log_level":"debug"}
//! {"request":"metrics"}                       -> {"ok":true,"metrics":"# HELP ..."}
//! anything that fails                         -> {"ok":false,"error":"..."}
//! ```
//!
//! Access: the socket is mode 0660 (group: the configured control group), and every peer's
//! credentials (SO_PEERCRED) are checked as well, so a socket whose mode was loosened still
//! only answers root, the daemon's own user, and members of the control group.

use std::io::{self, BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::ops::status::{DaemonStatus, DeviceStatus};
use crate::server::supervisor::ReloadReport;

/// Longest request line accepted; real ones are well under 200 bytes.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Control connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 16;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The control socket's file name in the runtime directory.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Every device.
    Status,
    /// One device by name.
    Device { name: String },
    /// Re-read the configuration, as SIGHUP does.
    Reload,
    /// Replace the log filter (`info`, `debug`, `vfud=trace,info`, ...).
    SetLogLevel { level: String },
    /// The counters in Prometheus text format.
    Metrics,
}

/// One response: `ok` and exactly one of the other fields.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl ControlResponse {
    /// A failure with a message for the operator.
    pub fn error(message: impl Into<String>) -> ControlResponse {
        ControlResponse {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }

    /// A success; fill in the field that answers the request.
    pub fn ok() -> ControlResponse {
        ControlResponse {
            ok: true,
            ..Default::default()
        }
    }
}

/// A request on its way to the daemon's main loop, with where to send the answer.
pub type ControlCall = (ControlRequest, oneshot::Sender<ControlResponse>);

/// Why the control socket could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket")]
    Bind(#[source] crate::server::SocketError),
    #[error("cannot set the mode of the control socket {}", .path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot give the control socket {} to group {group}; the daemon must be a member of it (systemd: SupplementaryGroups={group})", .path.display())]
    Chown {
        path: PathBuf,
        group: String,
        #[source]
        source: nix::Error,
    },
    #[error("control group {0:?} does not exist; create it or fix --control-group")]
    LookupGroup(String),
    #[error("cannot connect to the control socket {}; is vfud running, and may you use it (root or the control group)?", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the control socket {} did not answer", .path.display())]
    Exchange {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon's answer is not a control response")]
    Decode(#[source] serde_json::Error),
    #[error("{0}")]
    Refused(String),
}

/// Resolves a group name (or a number) to its id.
pub fn lookup_group(group: &str) -> Result<Gid, ControlError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(ControlError::LookupGroup(group.to_string())),
    }
}

/// The supplementary groups of a process, from /proc (SO_PEERCRED only has the primary one).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Who may use the control socket.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// The daemon's own user (root under systemd).
    pub owner: Uid,
    /// The configured control group, if any.
    pub group: Option<Gid>,
}

impl Access {
    /// Whether a peer may talk to us; on refusal, the reason for the peer and the log.
    fn check(&self, uid: u32, gid: u32, pid: Option<i32>) -> Result<(), String> {
        if uid == 0 || uid == self.owner.as_raw() {
            return Ok(());
        }
        if let Some(group) = self.group {
            let g = group.as_raw();
            if gid == g || pid.is_some_and(|p| supplementary_groups(p).contains(&g)) {
                return Ok(());
            }
            return Err(format!(
                "permission denied: uid {uid} is neither root nor a member of the control group (gid {g})"
            ));
        }
        Err(format!(
            "permission denied: uid {uid} is not root (no control group is configured; see --control-group)"
        ))
    }
}

/// The bound control socket.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    identity: crate::server::SocketIdentity,
    access: Access,
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0660 and, with a group, gives it to that group.
    pub fn bind(path: &Path, group: Option<(&str, Gid)>) -> Result<ControlServer, ControlError> {
        let (listener, identity) = crate::server::bind_socket(path).map_err(ControlError::Bind)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(
            |source| ControlError::Chmod {
                path: path.to_path_buf(),
                source,
            },
        )?;
        if let Some((name, gid)) = group {
            nix::unistd::chown(path, None, Some(gid)).map_err(|source| ControlError::Chown {
                path: path.to_path_buf(),
                group: name.to_string(),
                source,
            })?;
        }
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            identity,
            access: Access {
                owner: nix::unistd::geteuid(),
                group: group.map(|(_, g)| g),
            },
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts control connections until `shutdown`, forwarding each request to `calls`;
    /// then removes the socket.
    pub async fn serve(
        self,
        calls: mpsc::Sender<ControlCall>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let access = self.access;
            let calls = calls.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let _permit = permit;
                serve_connection(stream, access, calls, shutdown).await;
            });
            while connections.try_join_next().is_some() {}
        }
        connections.abort_all();
        crate::server::remove_socket(&self.path, &self.identity);
    }
}

async fn write_response(stream: &mut UnixStream, response: &ControlResponse) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn serve_connection(
    mut stream: UnixStream,
    access: Access,
    calls: mpsc::Sender<ControlCall>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control peer credentials unavailable; refusing");
            return;
        }
    };
    if let Err(why) = access.check(cred.uid(), cred.gid(), cred.pid()) {
        tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "control connection refused: {why}");
        let _ = write_response(&mut stream, &ControlResponse::error(why)).await;
        return;
    }
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read.take(0));
    loop {
        // Each line may be at most MAX_REQUEST_BYTES; the limit is renewed per request.
        reader.get_mut().set_limit(MAX_REQUEST_BYTES + 1);
        let mut line = String::new();
        let read = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, reader.read_line(&mut line)) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let response = if n as u64 > MAX_REQUEST_BYTES {
            ControlResponse::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        } else {
            match serde_json::from_str::<ControlRequest>(&line) {
                Err(e) => ControlResponse::error(format!(
                    "not a control request ({e}); send one JSON object per line, e.g. {{\"request\":\"status\"}}"
                )),
                Ok(request) => {
                    tracing::debug!(?request, pid = ?cred.pid(), "control request");
                    let (tx, rx) = oneshot::channel();
                    if calls.send((request, tx)).await.is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            }
        };
        let mut out = match serde_json::to_vec(&response) {
            Ok(v) => v,
            Err(_) => return,
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || n as u64 > MAX_REQUEST_BYTES {
            return;
        }
    }
}

/// A blocking client of the control socket, for the `vfud status`/`metrics`/... commands.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    reader: io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl ControlClient {
    /// Connects; every exchange is bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<ControlClient, ControlError> {
        let connect = |source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(connect)?;
        stream.set_read_timeout(Some(timeout)).map_err(connect)?;
        stream.set_write_timeout(Some(timeout)).map_err(connect)?;
        let writer = stream.try_clone().map_err(connect)?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: io::BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and returns the daemon's answer; a refusal is an error.
    pub fn call(&mut self, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
        let exchange = |source| ControlError::Exchange {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(request).map_err(ControlError::Decode)?;
        line.push(b'\n');
        // A refused peer gets its answer before the daemon reads anything, and the write may
        // then fail; the answer is still worth reading.
        let sent = self.writer.write_all(&line);
        let mut answer = String::new();
        let read = io::Read::take(&mut self.reader, 64 << 20)
            .read_line(&mut answer)
            .map_err(exchange)?;
        if read == 0 {
            return Err(exchange(sent.err().unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
            })));
        }
        let response: ControlResponse =
            serde_json::from_str(&answer).map_err(ControlError::Decode)?;
        if !response.ok {
            return Err(ControlError::Refused(
                response.error.unwrap_or_else(|| "request failed".into()),
            ));
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let cases = [
            (ControlRequest::Status, r#"{"request":"status"}"#),
            (
                ControlRequest::Device { name: "d0".into() },
                r#"{"request":"device","name":"d0"}"#,
            ),
            (ControlRequest::Reload, r#"{"request":"reload"}"#),
            (
                ControlRequest::SetLogLevel {
                    level: "debug".into(),
                },
                r#"{"request":"set-log-level","level":"debug"}"#,
            ),
            (ControlRequest::Metrics, r#"{"request":"metrics"}"#),
        ];
        for (request, text) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), text);
            assert_eq!(
                serde_json::from_str::<ControlRequest>(text).unwrap(),
                request
            );
        }
        assert!(
            serde_json::from_str::<ControlRequest>(r#"{"request":"device","name":"a","x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"request":"format-disk"}"#).is_err());
    }

    #[test]
    fn access_is_root_owner_or_group() {
        let a = Access {
            owner: Uid::from_raw(0),
            group: Some(Gid::from_raw(500)),
        };
        assert!(a.check(0, 0, None).is_ok());
        assert!(a.check(1000, 500, None).is_ok());
        let refused = a.check(1000, 1000, None).unwrap_err();
        assert!(
            refused.contains("uid 1000") && refused.contains("gid 500"),
            "{refused}"
        );
        let no_group = Access {
            owner: Uid::from_raw(0),
            group: None,
        };
        assert!(no_group.check(1000, 500, None).is_err());
        let own = Access {
            owner: Uid::from_raw(1000),
            group: None,
        };
        assert!(own.check(1000, 1000, None).is_ok());
    }
}
