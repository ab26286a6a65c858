//! Logging with `tracing`: journald under systemd, plain or JSON lines elsewhere, and a filter
//! that can be changed while running (`vfud set-log-level`).
//!
//! Levels: `info` is quiet (devices starting and stopping, clients connecting, policy
//! decisions, errors); `debug` adds a line per vfio-user message. Device and connection spans
//! make every line name its device.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// How log lines are written when not under journald.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Whether stderr is the journal stream systemd connected us to. `JOURNAL_STREAM` is
/// inherited by children whose stderr may be elsewhere, so it must name stderr itself.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr())) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))
}

/// Installs the global subscriber. `level` (e.g. "debug" or "vfud=trace,info") wins over
/// `RUST_LOG`; with neither, the level is `info`. Under journald, entries go to the journal
/// natively (priority and fields kept); otherwise lines go to stderr in `format`.
pub fn init(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    let (filter, text) = match level {
        Some(l) => (parse_filter(l)?, l.to_string()),
        None => match std::env::var("RUST_LOG") {
            Ok(env) if !env.is_empty() => (parse_filter(&env)?, env),
            _ => (EnvFilter::new("info"), "info".to_string()),
        },
    };
    let (filter, handle) = reload::Layer::new(filter);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let journal = if stderr_is_journal() {
        tracing_journald::layer().ok()
    } else {
        None
    };
    let output: Box<dyn Layer<_> + Send + Sync> = match (journal, format) {
        (Some(j), _) => j.boxed(),
        (None, LogFormat::Json) => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        (None, LogFormat::Plain) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal; files and pipes get plain text.
            .with_ansi(terminal)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|e| e.to_string())?;
    let _ = CONTROL.set(Control {
        handle,
        current: Mutex::new(text),
    });
    Ok(())
}

/// Replaces the filter of the running daemon.
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = parse_filter(level)?;
    let control = CONTROL
        .get()
        .ok_or_else(|| "logging is not initialized".to_string())?;
    control
        .handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log level: {e}"))?;
    *control.current.lock().unwrap_or_else(|e| e.into_inner()) = level.to_string();
    Ok(())
}

/// The filter in force, as it was given.
pub fn current_level() -> String {
    CONTROL.get().map_or_else(
        || "info".to_string(),
        |c| c.current.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    )
}
