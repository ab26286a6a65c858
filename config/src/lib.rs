//! Per-device JSON configuration for vfud.
//!
//! Each device the daemon serves is described by one JSON file:
//!
//! ```json
//! {"version": 1, "name": "demo0", "socket": "/run/vfud/demo0.sock",
//!  "device": {"type": "emulated", "model": "ats-dma"}}
//! ```
//!
//! The schema is strict (unknown fields are errors, so typos are caught
//! instead of silently ignored) and versioned. Errors name the file, the
//! JSON path of the offending value and what was expected, so an operator
//! can fix a configuration from the message alone. [`load_paths`] reports
//! every problem across all files at once rather than one per restart.

mod error;
mod load;
mod parse;
mod schema;

pub use error::{ConfigError, ConfigErrors, Origin};
pub use load::{load_file, load_paths, parse_str, MAX_CONFIG_BYTES};
pub use parse::MAX_SOCKET_PATH_LEN;
pub use schema::{
    embedded_default, DeviceConfig, DeviceSpec, EmulatedDevice, EmulatedModel, CONFIG_VERSION,
    MAX_NAME_LEN,
};

#[cfg(test)]
mod tests;
