//! The vfio-user protocol, natively in Rust: message layouts, framing with limits, SCM_RIGHTS fd
//! passing, VERSION negotiation, typed client commands and reply encoders, and a blocking client.
//!
//! The crate knows bytes and limits, not devices: the server (crate `vfud`) turns a parsed
//! [`request::Request`] into device operations and uses [`reply`] to answer.

pub mod client;
pub mod command;
pub mod dma;
pub mod fdio;
pub mod frame;
pub mod negotiate;
pub mod reply;
pub mod request;
pub mod wire;

pub use command::Command;
