//! The daemon's main loop: starts the devices, reports readiness, then reacts to signals,
//! control requests, device failures and the watchdog until asked to stop.
//!
//! Signals: SIGTERM and SIGINT stop the daemon (each device finishes its client's in-flight
//! message, closes the connection, resets and removes its socket; then the process exits 0);
//! SIGHUP reloads the configuration ([`Supervisor::reload`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::unistd::Gid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use vfu_config::DeviceConfig;
use vfu_protocol::negotiate::ServerLimits;

use crate::ops::control::{ControlCall, ControlRequest, ControlResponse, ControlServer};
use crate::ops::notify::Notifier;
use crate::ops::status::DaemonStatus;
use crate::server::supervisor::{error_chain, ReloadReport, Supervisor};

/// What to serve and how to be reached.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Configuration files and directories, re-read on reload.
    pub sources: Vec<PathBuf>,
    /// Served when `sources` is empty: the embedded default device.
    pub fallback: Option<DeviceConfig>,
    /// Where the control socket goes; None disables it.
    pub control_socket: Option<PathBuf>,
    /// The group allowed to use the control socket besides root, by name and id.
    pub control_group: Option<(String, Gid)>,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no device could be started ({failed} failed, {invalid} invalid configuration file(s)); see the errors above, or run `vfud check-config`")]
    StartDevices { failed: usize, invalid: usize },
    #[error("cannot install the signal handlers")]
    InstallSignals(#[source] std::io::Error),
}

fn status_line(sup: &Supervisor, control: bool) -> String {
    let mut line = format!("serving {} device(s)", sup.running());
    if sup.failed() > 0 {
        line.push_str(&format!(", {} failed", sup.failed()));
    }
    if !sup.invalid_files().is_empty() {
        line.push_str(&format!(
            ", {} invalid configuration file(s)",
            sup.invalid_files().len()
        ));
    }
    if !control {
        line.push_str(", control socket unavailable");
    }
    line
}

fn daemon_status(sup: &Supervisor, started: Instant) -> DaemonStatus {
    DaemonStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: started.elapsed().as_secs_f64(),
        log_level: crate::ops::logging::current_level(),
        devices: sup.status(),
        invalid_files: sup.invalid_files().to_vec(),
    }
}

async fn reload(sup: &mut Supervisor, notifier: &Notifier, control: bool) -> ReloadReport {
    notifier.reloading();
    let report = sup.reload().await;
    notifier.ready(&status_line(sup, control));
    report
}

/// Runs the daemon until SIGTERM or SIGINT; see the module documentation.
pub async fn run(options: ServiceOptions) -> Result<(), ServiceError> {
    let started = Instant::now();
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!("not notifying the service manager: {}", error_chain(&e));
        Notifier::disabled()
    });
    let mut term = signal(SignalKind::terminate()).map_err(ServiceError::InstallSignals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServiceError::InstallSignals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ServiceError::InstallSignals)?;

    let (mut sup, mut ended) = Supervisor::new(options.sources.clone(), ServerLimits::default());
    if options.sources.is_empty() {
        if let Some(config) = options.fallback.clone() {
            let _ = sup.start_unfiled(config);
        }
    } else {
        sup.reload().await;
    }
    if sup.running() == 0 {
        return Err(ServiceError::StartDevices {
            failed: sup.failed(),
            invalid: sup.invalid_files().len(),
        });
    }

    let (calls_tx, mut calls) = mpsc::channel::<ControlCall>(16);
    let (control_stop, control_stop_rx) = watch::channel(false);
    let mut control_task = None;
    if let Some(path) = &options.control_socket {
        let group = options
            .control_group
            .as_ref()
            .map(|(name, gid)| (name.as_str(), *gid));
        match ControlServer::bind(path, group) {
            Ok(server) => {
                tracing::info!(socket = %server.path().display(), "control socket listening");
                control_task = Some(tokio::spawn(server.serve(calls_tx, control_stop_rx)));
            }
            Err(e) => tracing::error!(
                "control socket unavailable, devices are served without it: {}",
                error_chain(&e)
            ),
        }
    }
    let control = control_task.is_some();

    notifier.ready(&status_line(&sup, control));
    tracing::info!(devices = sup.running(), refused = sup.failed(), "ready");

    let watchdog_period = notifier.watchdog_interval();
    if let Some(p) = watchdog_period {
        tracing::info!(
            interval_ms = p.as_millis() as u64,
            "pinging the service manager's watchdog"
        );
    }
    let mut watchdog = tokio::time::interval(watchdog_period.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received, shutting down");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received, shutting down");
                break;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received, reloading the configuration");
                reload(&mut sup, &notifier, control).await;
            }
            Some(e) = ended.recv() => {
                sup.device_ended(e).await;
                notifier.status(&status_line(&sup, control));
            }
            Some((request, reply)) = calls.recv() => {
                let response = match request {
                    ControlRequest::Status => ControlResponse {
                        status: Some(daemon_status(&sup, started)),
                        ..ControlResponse::ok()
                    },
                    ControlRequest::Device { name } => match sup.device_status(&name) {
                        Some(d) => ControlResponse { device: Some(d), ..ControlResponse::ok() },
                        None => ControlResponse::error(format!("no device named {name:?}; `vfud status` lists them")),
                    },
                    ControlRequest::Reload => {
                        tracing::info!("reload requested on the control socket");
                        let report = reload(&mut sup, &notifier, control).await;
                        ControlResponse { reload: Some(report), ..ControlResponse::ok() }
                    }
                    ControlRequest::SetLogLevel { level } => match crate::ops::logging::set_level(&level) {
                        Ok(()) => {
                            tracing::info!(%level, "log level changed");
                            ControlResponse { log_level: Some(level), ..ControlResponse::ok() }
                        }
                        Err(e) => ControlResponse::error(e),
                    },
                    ControlRequest::Metrics => match crate::ops::metrics::render(&daemon_status(&sup, started)) {
                        Ok(text) => ControlResponse { metrics: Some(text), ..ControlResponse::ok() },
                        Err(_) => ControlResponse::error("encoding the metrics failed"),
                    },
                };
                let _ = reply.send(response);
            }
            _ = watchdog.tick(), if watchdog_period.is_some() => notifier.watchdog(),
        }
    }

    notifier.stopping();
    let _ = control_stop.send(true);
    sup.shutdown().await;
    if let Some(task) = control_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}
