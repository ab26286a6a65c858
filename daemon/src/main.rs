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
    /// Validate configuration files and list every problem found.
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

async fn serve(configs: Vec<DeviceConfig>) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for cfg in &configs {
        let device = vfud::device::create(cfg)?;
        let server = DeviceServer::bind(&cfg.name, &cfg.socket, device, ServerLimits::default())
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("device {}: cannot serve", cfg.name))
            })?;
        servers.push(server);
    }
    for (cfg, server) in configs.iter().zip(&servers) {
        let model = match &cfg.device {
            vfu_config::DeviceSpec::Emulated(_) => "emulated ats-dma".to_string(),
        };
        tracing::info!(device = %cfg.name, socket = %server.socket().display(), %model, "listening");
        tracing::info!(
            device = %cfg.name,
            "attach with QEMU >= 10.1: {} (guest RAM must be fd-backed for DMA, e.g. -object memory-backend-memfd,id=mem,size=1G -machine memory-backend=mem)",
            qemu_argument(server.socket())
        );
    }
    let tasks: Vec<_> = servers
        .into_iter()
        .map(|s| tokio::spawn(s.serve(shutdown_rx.clone())))
        .collect();
    tracing::info!(devices = tasks.len(), "ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
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
        Command::CheckConfig { paths } => match vfu_config::load_paths(&paths) {
            Ok(configs) => {
                for c in configs {
                    println!("ok: {} -> {}", c.name, c.socket.display());
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("vfud: {} problem(s) found", errors.len());
                ExitCode::FAILURE
            }
        },
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
