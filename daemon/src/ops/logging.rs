//! Logging with `tracing`: a `RUST_LOG`-style filter, overridable by `--log-level`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` (e.g. "debug" or "vfud=trace,info") wins over
/// `RUST_LOG`; with neither, the level is `info`. Under journald (stderr is not a terminal and
/// `JOURNAL_STREAM` is set) timestamps are left to the journal.
pub fn init(level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // Colour only for a person at a terminal; files and pipes get plain text.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    let result = if journald {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| e.to_string())
}
