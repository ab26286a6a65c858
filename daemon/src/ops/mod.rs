//! Operations: running as a service (systemd notification, signals, reload), the control
//! socket, status reports and metrics, logging.

pub mod control;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod service;
pub mod status;
