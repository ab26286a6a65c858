//! The `vfud` command line: run the daemon, check configurations, probe a socket, resolve vIOMMU properties, and talk to
//! a running daemon through its control socket (status, metrics, reload, set-log-level).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use vfud::ops::control::{ControlClient, ControlRequest, ControlResponse, CONTROL_SOCKET_NAME};
use vfud::ops::logging::LogFormat;
use vfud::ops::service::ServiceOptions;

/// vfud serves PCI devices to virtual machines over the vfio-user protocol.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter, e.g. `debug` or `vfud=trace,info` (overrides RUST_LOG).
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log line format on stderr (under systemd, logs go to the journal natively).
    #[arg(long, global = true, value_enum, default_value_t = Format::Plain)]
    log_format: Format,
    /// The daemon's control socket [default: $RUNTIME_DIRECTORY/control.sock, else
    /// $XDG_RUNTIME_DIR/vfud/control.sock, else /tmp/vfud-$UID/control.sock; client commands
    /// fall back to /run/vfud/control.sock when that one does not exist].
    #[arg(long, global = true, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve devices. Without --config, serves the embedded ats-dma device as `demo0`.
    /// SIGHUP re-reads the configuration; SIGTERM/SIGINT stop cleanly.
    Run {
        /// A device configuration file, or a directory of *.json files; repeatable.
        #[arg(long, value_name = "FILE_OR_DIR")]
        config: Vec<PathBuf>,
        /// Besides root (and the daemon's own user), members of this group may use the
        /// control socket; the socket is given to this group, mode 0660.
        #[arg(long, value_name = "GROUP")]
        control_group: Option<String>,
        /// Do not create the control socket.
        #[arg(long, conflicts_with = "control_group")]
        no_control_socket: bool,
    },
    /// Validate configuration files, show each device's ATS/PASID/PRI decisions, and list every
    /// problem found (including a required capability that cannot be provided).
    CheckConfig {
        /// Files or directories to check.
        #[arg(required = true, value_name = "FILE_OR_DIR")]
        paths: Vec<PathBuf>,
    },
    /// Resolve the vIOMMU model of the devices' `viommu` blocks (frozen at the first device in
    /// file order), check every later device against it, and print the QEMU argument.
    Resolve {
        /// Device configuration files or directories, in VM order.
        #[arg(long, required = true, value_name = "FILE_OR_DIR")]
        config: Vec<PathBuf>,
    },
    /// Connect to a vfio-user socket and print what a VMM would see.
    Probe {
        /// The vfio-user socket.
        socket: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show the running daemon's devices: state, client, capability policy, DMA maps, IRQs,
    /// message counters, ATS counters.
    Status {
        /// Only this device.
        device: Option<String>,
        /// Print the JSON the control socket answers.
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Print the running daemon's counters in the Prometheus text format.
    Metrics,
    /// Make the running daemon re-read its configuration (as SIGHUP does) and print what
    /// changed.
    Reload {
        /// Print the JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Change the running daemon's log filter, e.g. `debug` or `info`.
    SetLogLevel {
        /// The new filter.
        level: String,
    },
    /// Print the JSON Schema of a device configuration file.
    PrintSchema,
}

/// Where sockets go by default: `$RUNTIME_DIRECTORY` (systemd), else `$XDG_RUNTIME_DIR/vfud`,
/// else `/tmp/vfud-$UID`.
fn default_runtime_dir() -> PathBuf {
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

/// Where `vfud run` puts its control socket.
fn control_socket(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone()
        .unwrap_or_else(|| default_runtime_dir().join(CONTROL_SOCKET_NAME))
}

/// The control socket a client command talks to: the one `vfud run` would create in this
/// environment, else the system service's (so a control-group member's `vfud status` finds
/// `/run/vfud/control.sock` although their own runtime directory is elsewhere).
fn client_control_socket(cli: &Option<PathBuf>) -> PathBuf {
    if let Some(path) = cli {
        return path.clone();
    }
    let own = default_runtime_dir().join(CONTROL_SOCKET_NAME);
    let system = Path::new("/run/vfud").join(CONTROL_SOCKET_NAME);
    if !own.exists() && system.exists() {
        return system;
    }
    own
}

fn run(
    config: Vec<PathBuf>,
    control_socket: Option<PathBuf>,
    control_group: Option<String>,
) -> anyhow::Result<()> {
    let control_group = match control_group {
        Some(name) => {
            let gid = vfud::ops::control::lookup_group(&name)?;
            Some((name, gid))
        }
        None => None,
    };
    let options = ServiceOptions {
        fallback: config
            .is_empty()
            .then(|| vfu_config::embedded_default(&default_runtime_dir())),
        sources: config,
        control_socket,
        control_group,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(vfud::ops::service::run(options))?;
    Ok(())
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
                for decision in decisions.iter().flat_map(|d| d.iter()) {
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

const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

fn call(path: &Path, request: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let mut client = ControlClient::connect(path, CONTROL_TIMEOUT)?;
    Ok(client.call(request)?)
}

fn json_text<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

fn status(
    path: &Path,
    device: Option<String>,
    json: bool,
    watch: Option<f64>,
) -> anyhow::Result<()> {
    let request = match device {
        Some(name) => ControlRequest::Device { name },
        None => ControlRequest::Status,
    };
    let period = match watch {
        Some(s) if s.is_finite() && s >= 0.1 => Some(Duration::from_secs_f64(s.min(86400.0))),
        Some(_) => anyhow::bail!("--watch needs at least 0.1 seconds"),
        None => None,
    };
    let mut client = ControlClient::connect(path, CONTROL_TIMEOUT)?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let r = client.call(&request)?;
        let text = match (&r.status, &r.device, json) {
            (Some(s), _, true) => json_text(s)?,
            (Some(s), _, false) => s.to_string(),
            (_, Some(d), true) => json_text(d)?,
            (_, Some(d), false) => d.to_string(),
            _ => anyhow::bail!("the daemon answered without a status"),
        };
        let mut out = std::io::stdout().lock();
        if period.is_some() && terminal && !json {
            // Redraw in place, like watch(1).
            write!(out, "\x1b[H\x1b[2J")?;
        }
        writeln!(out, "{}", text.trim_end())?;
        out.flush()?;
        drop(out);
        match period {
            Some(p) => std::thread::sleep(p),
            None => return Ok(()),
        }
    }
}

fn client_command(command: Command, socket: &Path) -> anyhow::Result<()> {
    match command {
        Command::Status {
            device,
            json,
            watch,
        } => status(socket, device, json, watch),
        Command::Metrics => {
            let r = call(socket, &ControlRequest::Metrics)?;
            print!("{}", r.metrics.unwrap_or_default());
            Ok(())
        }
        Command::Reload { json } => {
            let r = call(socket, &ControlRequest::Reload)?;
            let report = r.reload.unwrap_or_default();
            if json {
                println!("{}", json_text(&report)?);
            } else {
                let list = |v: &[String]| {
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        v.join(", ")
                    }
                };
                println!("started:   {}", list(&report.started));
                println!("restarted: {}", list(&report.restarted));
                println!("stopped:   {}", list(&report.stopped));
                println!("unchanged: {}", list(&report.unchanged));
                for f in &report.failed {
                    println!("failed:    {}: {}", f.name, f.reason);
                }
                for i in &report.invalid {
                    println!("invalid:   {}", i.error);
                }
            }
            if report.failed.is_empty() && report.invalid.is_empty() {
                Ok(())
            } else {
                anyhow::bail!(
                    "{} device(s) failed, {} configuration file(s) invalid",
                    report.failed.len(),
                    report.invalid.len()
                )
            }
        }
        Command::SetLogLevel { level } => {
            let r = call(socket, &ControlRequest::SetLogLevel { level })?;
            println!("log level: {}", r.log_level.unwrap_or_default());
            Ok(())
        }
        _ => unreachable!("not a client command"),
    }
}

fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(&e);
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        Format::Plain => LogFormat::Plain,
        Format::Json => LogFormat::Json,
    };
    if let Err(e) = vfud::ops::logging::init(cli.log_level.as_deref(), format) {
        eprintln!("vfud: error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Run {
            config,
            control_group,
            no_control_socket,
        } => {
            let socket = (!no_control_socket).then(|| control_socket(&cli.control_socket));
            exit_with(run(config, socket, control_group))
        }
        Command::CheckConfig { paths } => check_config(&paths),
        Command::Resolve { config } => match vfu_config::load_paths(&config) {
            Ok(configs) => {
                let report = vfud::viommu::resolve::ResolveReport::for_configs(&configs);
                print!("{report}");
                if report.is_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(errors) => {
                eprintln!("{errors}");
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
        Command::PrintSchema => {
            match serde_json::to_string_pretty(&vfu_config::device_config_schema()) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => exit_with(Err(e.into())),
            }
        }
        command => exit_with(client_command(
            command,
            &client_control_socket(&cli.control_socket),
        )),
    }
}
