//! The systemd notification protocol (`sd_notify`): readiness, status text, reload, stopping
//! and watchdog pings as datagrams to `$NOTIFY_SOCKET`.
//!
//! The protocol is one `KEY=VALUE\n...` datagram per notification to a unix datagram socket
//! whose path is in `$NOTIFY_SOCKET` (a leading `@` names an abstract socket). Without the
//! variable every call is a no-op, so the daemon runs the same outside systemd.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {path:?} is not a usable socket address")]
    Address {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot send to NOTIFY_SOCKET {path:?}")]
    Send {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Where notifications go, read once from the environment at start.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(String, SocketAddr, UnixDatagram)>,
    watchdog: Option<Duration>,
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    // WATCHDOG_PID, when set, names the process that must ping; a child must not.
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

fn socket_addr(path: &str) -> io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(path),
    }
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let watchdog = parse_watchdog(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let Some(path) = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty())
        else {
            return Ok(Notifier {
                target: None,
                watchdog,
            });
        };
        let address = |source| NotifyError::Address {
            path: path.clone(),
            source,
        };
        let addr = socket_addr(&path).map_err(address)?;
        let socket = UnixDatagram::unbound().map_err(address)?;
        Ok(Notifier {
            target: Some((path, addr, socket)),
            watchdog,
        })
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to ping the watchdog: half the manager's timeout, as systemd recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends one notification; `state` is newline-separated `KEY=VALUE` assignments.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some((path, addr, socket)) = &self.target else {
            return Ok(());
        };
        socket
            .send_to_addr(state.as_bytes(), addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                path: path.clone(),
                source,
            })
    }

    /// Sends and logs a failure instead of returning it: a manager that stopped listening
    /// must not stop the devices.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(
                "sd_notify failed: {}",
                crate::server::supervisor::error_chain(&e)
            );
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `STATUS=` alone.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// `RELOADING=1` with the monotonic timestamp systemd requires alongside it.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading the configuration"
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: finishing messages, resetting devices");
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_needs_a_positive_timeout_and_our_pid() {
        assert_eq!(
            parse_watchdog(Some("2000000"), None, 5),
            Some(Duration::from_secs(2))
        );
        assert_eq!(parse_watchdog(Some("0"), None, 5), None);
        assert_eq!(parse_watchdog(Some("x"), None, 5), None);
        assert_eq!(parse_watchdog(None, Some("5"), 5), None);
        assert_eq!(parse_watchdog(Some("1000"), Some("6"), 5), None);
        assert!(parse_watchdog(Some("1000"), Some("5"), 5).is_some());
    }

    #[test]
    fn abstract_and_path_addresses() {
        use std::os::linux::net::SocketAddrExt;
        let a = socket_addr("@vfud-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"vfud-test"[..]));
        let p = socket_addr("/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
    }
}
