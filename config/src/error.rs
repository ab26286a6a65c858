//! Errors reported while loading device configurations.
//!
//! Every message starts with where the problem is (a file path or
//! `<inline>`), so that a list of them printed one per line is actionable
//! without further context.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where a configuration text came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Text passed to [`crate::parse_str`] without a file; displayed as
    /// `<inline>`.
    Inline,
    /// Text read from (or attributed to) this file.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Inline => f.write_str("<inline>"),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One problem with the device configuration.
///
/// Messages never repeat the text of a `#[source]` error; print the source
/// chain (e.g. with `anyhow`'s `{:#}`) for the operating system's wording.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file (or a path given on the command line) could not
    /// be opened, inspected or read.
    #[error("{}: cannot read the device configuration: {}", file.display(), io_reason(source))]
    ReadFile {
        /// The file that could not be read.
        file: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
    /// A configuration directory could not be listed.
    #[error("{}: cannot list the configuration directory: {}", dir.display(), io_reason(source))]
    ReadDir {
        /// The directory that could not be listed.
        dir: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
    /// A configuration file is larger than any sensible configuration; it
    /// is refused rather than read into memory.
    #[error("{}: the file is larger than {limit} bytes, which no device configuration needs; check that this is the right file", file.display())]
    ReadTooLarge {
        /// The oversized file.
        file: PathBuf,
        /// The size limit in bytes.
        limit: u64,
    },
    /// The text is not well-formed JSON (or nests deeper than the parser
    /// allows). `line` and `column` are 1-based.
    #[error("{origin}:{line}:{column}: invalid JSON: {reason}")]
    ParseJson {
        /// Where the text came from.
        origin: Origin,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What is wrong, without the position.
        reason: String,
    },
    /// The JSON is well-formed but a value does not match the schema or
    /// breaks a rule. `path` is a JSON path such as `device.model`, or `$`
    /// for the document root.
    #[error("{origin}: at {path}: {reason}")]
    ValidateField {
        /// Where the text came from.
        origin: Origin,
        /// JSON path of the offending value.
        path: String,
        /// What is wrong, what was expected and, where obvious, the fix.
        reason: String,
    },
    /// Two configuration files use the same device name.
    #[error("{}: device name \"{name}\" is already used by {}; give each device a unique name", second.display(), first.display())]
    DuplicateName {
        /// The shared name.
        name: String,
        /// The file loaded first.
        first: PathBuf,
        /// The file loaded later, which is reported as the culprit.
        second: PathBuf,
    },
    /// Two configuration files use the same socket path.
    #[error("{}: socket {} is already used by {}; give each device its own socket path", second.display(), socket.display(), first.display())]
    DuplicateSocket {
        /// The shared (resolved) socket path.
        socket: PathBuf,
        /// The file loaded first.
        first: PathBuf,
        /// The file loaded later, which is reported as the culprit.
        second: PathBuf,
    },
    /// A configuration directory contains no `*.json` file.
    #[error("no device configuration found in {}; add a *.json file, see README", dir.display())]
    NoConfigs {
        /// The directory that was searched.
        dir: PathBuf,
    },
    /// [`crate::load_paths`] was called with no paths at all.
    #[error("no device configuration given; pass a *.json file or a directory containing them, see README")]
    NoPaths,
}

/// Explains an I/O failure in words that add to, rather than repeat, the
/// operating system's message (which stays available as the source).
fn io_reason(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => "it does not exist; check the path",
        io::ErrorKind::PermissionDenied => {
            "access was denied; make it readable by the user running vfud"
        }
        io::ErrorKind::IsADirectory => "it is a directory, not a file",
        io::ErrorKind::NotADirectory => "a parent component is not a directory; check the path",
        io::ErrorKind::InvalidData => "its contents could not be read",
        _ => "the operating system reported an error",
    }
}

/// All problems found while loading a set of configurations.
///
/// Never empty when returned by this crate. Displays one problem per line
/// (no trailing newline), so it can be logged or printed as is.
#[derive(Debug)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// Wraps a list of problems; `errors` should not be empty.
    pub fn new(errors: Vec<ConfigError>) -> Self {
        Self(errors)
    }

    /// The individual problems, in the order they were found.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// Takes the individual problems out.
    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no problems (never true for values returned by
    /// this crate).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(err: ConfigError) -> Self {
        Self(vec![err])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
