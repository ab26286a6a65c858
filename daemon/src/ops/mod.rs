//! Operations: logging setup (systemd integration, control socket and metrics come later).

pub mod logging;
