//! The `vfud` command line: run, check-config, probe.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use vfu_config::DeviceConfig;
use vfu_protocol::negotiate::ServerLimits;
use vfud::server::DeviceServer;

/// vfud serves PCI devices to virtual machines over the vfio-user protocol.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter, e.g. `debug` or `vfud=trace,info` (overrides RUST_LOG).
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve devices. Without --config, serves the embedded ats-dma device as `demo0`.
    Run {
        /// A device configuration file, or a directory of *.json files; repeatable.
        #[arg(long, value_name = "FILE_OR_DIR")]
        config: Vec<PathBuf>,
    },
    /// Validate configuration files, show each device's ATS/PASID/PRI decisions, and list every
    /// problem found (including a required capability that cannot be provided).
    CheckConfig {
        /// Files or directories to check.
        #[arg(required = true, value_name = "FILE_OR_DIR")]
        paths: Vec<PathBuf>,
    },
    /// Connect to a vfio-user socket and print what a VMM would see.
    Probe {
        /// The vfio-user socket.
        socket: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where the embedded default device's socket goes: `$RUNTIME_DIRECTORY` (systemd),
/// else `$XDG_RUNTIME_DIR/vfud`, else `/tmp/vfud-$UID`.
fn default_socket_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        return PathBuf::from(first);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&dir).join("vfud");
    }
    PathBuf::from(format!("/tmp/vfud-{}", nix::unistd::getuid()))
}

fn qemu_argument(socket: &Path) -> String {
    let device = serde_json::json!({
        "driver": "vfio-user-pci",
        "socket": {"path": socket.display().to_string(), "type": "unix"},
    });
    format!("-device '{device}'")
}

/// Creates and binds one configured device, logging what the capability policy decided.
fn start_device(cfg: &DeviceConfig) -> anyhow::Result<DeviceServer> {
    let device = vfud::device::create(cfg)?;
    let server = DeviceServer::bind(&cfg.name, &cfg.socket, device, ServerLimits::default())
        .map_err(|e| anyhow::Error::new(e).context(format!("device {}: cannot serve", cfg.name)))?;
    // Pure and deterministic, so this is what `create` just applied.
    if let Ok(decisions) = vfud::device::resolve_capabilities(cfg) {
        for decision in decisions.iter() {
            tracing::info!(device = %cfg.name, "{decision}");
        }
    }
    Ok(server)
}

/// Serves every device that can be started. A device that fails (a capability policy it
/// cannot meet, a socket path in use) is logged and skipped, so one bad device does not take
/// the others down; only when none can be started is that an error.
async fn serve(configs: Vec<DeviceConfig>) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let mut refused = 0usize;
    for cfg in &configs {
        match start_device(cfg) {
            Ok(server) => servers.push((cfg, server)),
            Err(e) => {
                refused += 1;
                tracing::error!(device = %cfg.name, "device not started: {e:#}");
            }
        }
    }
    if servers.is_empty() {
        anyhow::bail!(
            "no device could be started ({refused} refused); see the errors above, or run `vfud check-config`"
        );
    }
    for (cfg, server) in &servers {
        let model = match &cfg.device {
            vfu_config::DeviceSpec::Emulated(_) => "emulated ats-dma".to_string(),
            vfu_config::DeviceSpec::Host(h) => format!(
                "host {}",
                h.pci
                    .clone()
                    .or_else(|| h.cdev.as_ref().map(|p| p.display().to_string()))
                    .unwrap_or_default()
            ),
        };
        tracing::info!(device = %cfg.name, socket = %server.socket().display(), %model, "listening");
        tracing::info!(
            device = %cfg.name,
            "attach with QEMU >= 10.1: {} (guest RAM must be fd-backed for DMA, e.g. -object memory-backend-memfd,id=mem,size=1G -machine memory-backend=mem)",
            qemu_argument(server.socket())
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    for (cfg, server) in servers {
        let id = tasks.spawn(server.serve(shutdown_rx.clone())).id();
        names.insert(id, cfg.name.clone());
    }
    tracing::info!(devices = tasks.len(), refused, "ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT received, shutting down");
                break;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM received, shutting down");
                break;
            }
            Some(ended) = tasks.join_next_with_id() => {
                // A device's server only returns on shutdown; anything else is a bug. The other
                // devices keep serving; with none left the daemon exits non-zero to be restarted.
                let (id, why) = match ended {
                    Ok((id, ())) => (id, "stopped unexpectedly".to_string()),
                    Err(e) => (e.id(), if e.is_panic() { "panicked".into() } else { e.to_string() }),
                };
                let name = names.get(&id).map_or("?", String::as_str);
                tracing::error!(device = %name, "the device's server {why}; it no longer serves");
                if tasks.is_empty() {
                    anyhow::bail!("no device is being served any more");
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn run(config: Vec<PathBuf>) -> anyhow::Result<()> {
    let configs = if config.is_empty() {
        vec![vfu_config::embedded_default(&default_socket_dir())]
    } else {
        vfu_config::load_paths(&config)
            .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(configs))
}

/// `vfud check-config`: validates the files, then resolves each device's capability policy
/// and prints every decision with its reason; an `on` that cannot be met is a problem.
fn check_config(paths: &[PathBuf]) -> ExitCode {
    let configs = match vfu_config::load_paths(paths) {
        Ok(configs) => configs,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("vfud: {} problem(s) found", errors.len());
            return ExitCode::FAILURE;
        }
    };
    let mut problems = 0usize;
    for c in &configs {
        match vfud::device::resolve_capabilities(c) {
            Ok(decisions) => {
                println!("ok: {} -> {}", c.name, c.socket.display());
                for decision in decisions.iter() {
                    println!("{}: {decision}", c.name);
                }
            }
            // Valid; the policy needs the device itself and is decided when it is opened.
            Err(e @ vfud::device::CreateDeviceError::ResolveHost { .. }) => {
                println!("ok: {} -> {}", c.name, c.socket.display());
                println!("{}: {e}", c.name);
            }
            Err(e) => {
                problems += 1;
                eprintln!("{:#}", anyhow::Error::new(e));
            }
        }
    }
    if problems > 0 {
        eprintln!("vfud: {problems} problem(s) found");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn print_chain(e: &anyhow::Error) {
    eprintln!("vfud: error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = vfud::ops::logging::init(cli.log_level.as_deref()) {
        eprintln!("vfud: error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                print_chain(&e);
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { paths } => check_config(&paths),
        Command::Probe { socket, json } => match vfud::probe::probe(&socket) {
            Ok(report) => {
                if json {
                    match serde_json::to_string_pretty(&report) {
                        Ok(s) => println!("{s}"),
                        Err(e) => {
                            eprintln!("vfud: error: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    println!("{report}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                print_chain(&anyhow::Error::new(e));
                ExitCode::FAILURE
            }
        },
    }
}
