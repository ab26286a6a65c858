//! Turning one configuration text into a validated [`DeviceConfig`].
//!
//! Decoding happens in stages so that each problem is reported at the most
//! useful place:
//! 1. parse into a [`Value`] — syntax errors (and nesting beyond
//!    serde_json's recursion limit) get a line and column;
//! 2. check that the root is an object and `version` is exactly
//!    [`CONFIG_VERSION`] before interpreting anything else;
//! 3. decode the typed schema with JSON-path tracking (this also rejects
//!    unknown and duplicate fields);
//! 4. check the rules serde cannot express (name alphabet, socket path,
//!    value ranges inside the device).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use serde_path_to_error::Segment;

use crate::error::{ConfigError, Origin};
use crate::policy::MAX_PASID_WIDTH;
use crate::schema::{
    DeviceConfig, DeviceSpec, EmulatedDevice, HostDevice, CONFIG_VERSION, MAX_NAME_LEN,
};

/// Longest socket path accepted, in bytes: `sun_path` holds 108 bytes
/// including the terminating NUL, and a longer path only fails later, at
/// bind time, with a less helpful message.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Mirror of the `"type"` tags of [`crate::DeviceSpec`].
///
/// serde decodes internally tagged enums from a buffered copy, which loses
/// the JSON path inside the variant; [`diagnose_device`] uses this mirror to
/// re-decode the variant's fields directly and report e.g. `device.model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DeviceType {
    Emulated,
    Viommu,
    Host,
}

/// Every problem found in one configuration text; non-empty by
/// construction.
#[derive(Debug)]
pub(crate) struct FileErrors {
    pub(crate) first: ConfigError,
    pub(crate) more: Vec<ConfigError>,
}

impl From<ConfigError> for FileErrors {
    fn from(first: ConfigError) -> Self {
        Self {
            first,
            more: Vec::new(),
        }
    }
}

impl IntoIterator for FileErrors {
    type Item = ConfigError;
    type IntoIter = std::iter::Chain<std::iter::Once<ConfigError>, std::vec::IntoIter<ConfigError>>;

    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(self.first).chain(self.more)
    }
}

/// Parses and validates one configuration text, returning every problem
/// found in it.
///
/// Serde stops at the first schema problem, so several errors are only
/// reported when the schema decodes and more than one rule is broken.
pub(crate) fn parse_bytes(bytes: &[u8], origin: &Origin) -> Result<DeviceConfig, FileErrors> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);

    // Stage 1: well-formed JSON.
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| FileErrors::from(syntax_error(&err, origin)))?;

    // Stage 2: an object of the version we understand.
    let root = match &value {
        Value::Object(map) => map,
        other => {
            return Err(FileErrors::from(field_error(
                origin,
                "$",
                format!(
                    "expected a JSON object such as {{\"version\": 1, \"name\": \"demo0\", \"socket\": \"/run/vfud/demo0.sock\", \"device\": {{\"type\": \"emulated\", \"model\": \"ats-dma\"}}}}, found {}",
                    describe(other)
                ),
            )))
        }
    };
    match root.get("version") {
        None => {
            return Err(FileErrors::from(field_error(
                origin,
                "version",
                format!("missing, expected {CONFIG_VERSION}; add \"version\": {CONFIG_VERSION}"),
            )))
        }
        Some(v) if v.as_u64() == Some(u64::from(CONFIG_VERSION)) => {}
        Some(v) => {
            return Err(FileErrors::from(field_error(
                origin,
                "version",
                format!(
                    "unsupported configuration version: found {}, expected {CONFIG_VERSION}",
                    describe(v)
                ),
            )))
        }
    }

    // Stage 3: the typed schema. Decoding from the text rather than from
    // `value` also catches duplicate keys, which `Value` silently merges.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut config: DeviceConfig = match serde_path_to_error::deserialize(&mut de) {
        Ok(config) => config,
        Err(err) => {
            let path = format_path(err.path().iter());
            let in_device = matches!(
                err.path().iter().next(),
                Some(Segment::Map { key }) if key == "device"
            );
            let refined = if in_device {
                root.get("device").and_then(diagnose_device)
            } else {
                None
            };
            let (path, reason) = refined.unwrap_or_else(|| (path, data_reason(&err.into_inner())));
            return Err(FileErrors::from(field_error(origin, &path, reason)));
        }
    };

    // Stage 4: rules serde cannot express.
    let mut errors = Vec::new();
    if let Err(reason) = check_name(&config.name) {
        errors.push(field_error(origin, "name", reason));
    }
    match resolve_socket(&config.socket, origin) {
        Ok(socket) => config.socket = socket,
        Err(reason) => errors.push(field_error(origin, "socket", reason)),
    }
    for (path, reason) in check_device(&config.device) {
        errors.push(field_error(origin, path, reason));
    }
    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(config),
        Some(first) => Err(FileErrors {
            first,
            more: errors.collect(),
        }),
    }
}

fn field_error(origin: &Origin, path: &str, reason: String) -> ConfigError {
    ConfigError::ValidateField {
        origin: origin.clone(),
        path: path.to_owned(),
        reason,
    }
}

/// Converts a serde_json parse error into a [`ConfigError::ParseJson`],
/// moving the position out of the message into fields.
fn syntax_error(err: &serde_json::Error, origin: &Origin) -> ConfigError {
    let mut reason = without_position(err);
    if reason.starts_with("recursion limit exceeded") {
        reason.push_str(" (arrays/objects nested too deeply)");
    }
    ConfigError::ParseJson {
        origin: origin.clone(),
        line: err.line(),
        column: err.column(),
        reason,
    }
}

/// serde_json appends " at line L column C" to messages when it knows the
/// position; strip it, since the caller reports the position separately.
fn without_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    if err.line() == 0 {
        return text;
    }
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&suffix) {
        Some(stripped) => stripped.to_owned(),
        None => text,
    }
}

/// Message of a schema (data) error, with serde's backtick quoting turned
/// into the JSON-style double quotes users see in their files.
fn data_reason(err: &serde_json::Error) -> String {
    without_position(err).replace('`', "\"")
}

/// Formats a serde_path_to_error path as `a.b[0].c`, `$` for the root;
/// keys that are not plain identifiers are written as `["key"]`.
fn format_path<'a>(segments: impl Iterator<Item = &'a Segment>) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => push_key(&mut out, key),
            Segment::Enum { variant } => push_key(&mut out, variant),
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    if out.is_empty() {
        "$".to_owned()
    } else {
        out
    }
}

fn push_key(out: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    } else {
        out.push('[');
        out.push_str(&Value::String(key.to_owned()).to_string());
        out.push(']');
    }
}

/// Re-decodes the `device` object variant by variant to find the precise
/// path of a problem that serde reported only as "somewhere in `device`".
///
/// Returns `None` when it finds nothing wrong (e.g. the problem was a
/// duplicate key, which `Value` cannot see); the caller then keeps serde's
/// original report.
fn diagnose_device(device: &Value) -> Option<(String, String)> {
    let Value::Object(map) = device else {
        return Some((
            "device".to_owned(),
            format!(
                "expected an object such as {{\"type\": \"emulated\", \"model\": \"ats-dma\"}}, found {}",
                describe(device)
            ),
        ));
    };
    let Some(tag) = map.get("type") else {
        return Some((
            "device".to_owned(),
            "missing field \"type\", which selects the kind of device, e.g. \"type\": \"emulated\""
                .to_owned(),
        ));
    };
    let kind = match DeviceType::deserialize(tag) {
        Ok(kind) => kind,
        Err(err) => return Some(("device.type".to_owned(), data_reason(&err))),
    };
    let mut fields = map.clone();
    fields.remove("type");
    let fields = Value::Object(fields);
    match kind {
        DeviceType::Emulated => first_error::<EmulatedDevice>(&fields, "device"),
        DeviceType::Viommu => first_error::<crate::viommu::ViommuSpec>(&fields, "device"),
        DeviceType::Host => first_error::<HostDevice>(&fields, "device"),
    }
}

/// Decodes `value` as `T` with path tracking and returns the first error,
/// its path prefixed with `prefix`.
fn first_error<T: DeserializeOwned>(value: &Value, prefix: &str) -> Option<(String, String)> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(_) => None,
        Err(err) => {
            let inner = format_path(err.path().iter());
            let path = if inner == "$" {
                prefix.to_owned()
            } else if inner.starts_with('[') {
                format!("{prefix}{inner}")
            } else {
                format!("{prefix}.{inner}")
            };
            Some((path, data_reason(&err.into_inner())))
        }
    }
}

/// Short description of a JSON value for "found ..." messages; scalars are
/// shown (long strings truncated), containers only by kind.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) if s.chars().count() <= 40 => Value::String(s.clone()).to_string(),
        Value::String(s) => {
            let head: String = s.chars().take(40).collect();
            format!("{}...", Value::String(head))
        }
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// Checks the device name rules: 1..=[`MAX_NAME_LEN`] characters from
/// `[A-Za-z0-9_.-]`, not starting with `.` or `-` (so it is never a hidden
/// file name nor mistaken for a command-line option).
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    const ALLOWED: &str = "use only letters, digits, '_', '.' and '-'";
    if name.is_empty() {
        return Err(format!(
            "the device name is empty; give it 1 to {MAX_NAME_LEN} characters ({ALLOWED})"
        ));
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(format!(
            "the device name is {len} characters long; shorten it to at most {MAX_NAME_LEN}"
        ));
    }
    if let Some((pos, bad)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "the device name {name:?} contains {bad:?} at position {}; {ALLOWED}",
            pos + 1
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!(
            "the device name {name:?} starts with '{}'; it must start with a letter, digit or '_'",
            name.chars().next().unwrap_or('.')
        ));
    }
    Ok(())
}

/// Checks the device rules serde cannot express; returns (JSON path, reason) per problem.
fn check_device(device: &DeviceSpec) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    match device {
        DeviceSpec::Emulated(emulated) => {
            if let Some(iommu) = &emulated.iommu {
                if iommu.max_pasid_log2 > MAX_PASID_WIDTH {
                    problems.push((
                        "device.iommu.max_pasid_log2",
                        format!(
                            "a PASID width of {} bits is more than the {MAX_PASID_WIDTH} bits PCI Express allows; use 0 (no PASID) to {MAX_PASID_WIDTH}",
                            iommu.max_pasid_log2
                        ),
                    ));
                }
            }
            if let Some(viommu) = emulated.viommu_spec() {
                problems.extend(viommu.problems());
            }
            match (emulated.viommu_device(), emulated.requester_id) {
                (Some(_), None) => problems.push((
                    "device.requester_id",
                    "missing: a device behind a \"viommu\" device needs its requester id, e.g. \"requester_id\": \"00:03.0\"".to_owned(),
                )),
                (None, Some(_)) => problems.push((
                    "device.requester_id",
                    "only applies to a device that names a \"viommu\" device (\"viommu\": \"<name>\"); remove it or name the vIOMMU device".to_owned(),
                )),
                _ => {}
            }
        }
        DeviceSpec::Viommu(spec) => {
            for (path, reason) in spec.problems() {
                // The properties sit directly in `device` here, not in `device.viommu`.
                let path = match path {
                    "device.viommu.ssidsize" => "device.ssidsize",
                    "device.viommu.oas" => "device.oas",
                    "device.viommu.pasid_bits" => "device.pasid_bits",
                    other => other,
                };
                problems.push((path, reason));
            }
        }
        DeviceSpec::Host(host) => {
            problems.extend(check_host(host));
            if let Some(viommu) = &host.viommu {
                problems.extend(viommu.problems());
                if viommu.has_host_registers() {
                    problems.push((
                        "device.viommu.host",
                        "a host device's IOMMU registers come from the kernel (IOMMU_GET_HW_INFO); remove \"host\" from the viommu block".into(),
                    ));
                }
            }
        }
    }
    problems
}

/// Checks that exactly one of `pci` and `cdev` names the device, and that each is well formed.
fn check_host(host: &HostDevice) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    match (&host.pci, &host.cdev) {
        (None, None) => problems.push((
            "device",
            "a host device needs \"pci\" (its PCI address, e.g. \"0000:01:00.0\") or \"cdev\" (its VFIO character device, e.g. \"/dev/vfio/devices/vfio0\")".to_owned(),
        )),
        (Some(_), Some(_)) => problems.push((
            "device.cdev",
            "\"pci\" and \"cdev\" both name the device; keep only one".to_owned(),
        )),
        _ => {}
    }
    if let Some(pci) = &host.pci {
        if !is_pci_address(pci) {
            problems.push((
                "device.pci",
                format!(
                    "{} is not a PCI address; write it as domain:bus:device.function in hex, e.g. \"0000:01:00.0\" (see lspci -D)",
                    describe(&Value::String(pci.clone()))
                ),
            ));
        }
    }
    if let Some(cdev) = &host.cdev {
        if !cdev.is_absolute() {
            problems.push((
                "device.cdev",
                format!(
                    "the VFIO character device path \"{}\" is not absolute; use e.g. \"/dev/vfio/devices/vfio0\"",
                    cdev.display()
                ),
            ));
        }
    }
    if let Some(iommufd) = &host.iommufd {
        if !iommufd.is_absolute() {
            problems.push((
                "device.iommufd",
                format!(
                    "the iommufd path \"{}\" is not absolute; use \"/dev/iommu\"",
                    iommufd.display()
                ),
            ));
        }
    }
    problems
}

/// `DDDD:BB:DD.F` in hex, lower or upper case, with device <= 0x1f and function <= 7: the
/// spelling of `/sys/bus/pci/devices/` entries.
pub(crate) fn is_pci_address(text: &str) -> bool {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let Some((domain, rest)) = text.split_once(':') else {
        return false;
    };
    let Some((bus, rest)) = rest.split_once(':') else {
        return false;
    };
    let Some((device, function)) = rest.split_once('.') else {
        return false;
    };
    hex(domain, 4)
        && hex(bus, 2)
        && hex(device, 2)
        && u8::from_str_radix(device, 16).is_ok_and(|d| d <= 0x1f)
        && function.len() == 1
        && matches!(function.as_bytes()[0], b'0'..=b'7')
}

/// Validates the socket path and makes it absolute: a relative path is
/// taken relative to the directory of the configuration file, so the
/// result does not depend on the daemon's working directory.
fn resolve_socket(socket: &Path, origin: &Origin) -> Result<PathBuf, String> {
    let raw = socket.as_os_str().as_encoded_bytes();
    if raw.is_empty() {
        return Err(
            "the socket path is empty; use an absolute path such as \"/run/vfud/demo0.sock\""
                .to_owned(),
        );
    }
    if raw.contains(&0) {
        return Err(
            "the socket path contains a NUL character, which no file path can hold".to_owned(),
        );
    }
    if raw.ends_with(b"/") {
        return Err(format!(
            "the socket path {} names a directory; add a file name, e.g. \"{}demo0.sock\"",
            socket.display(),
            socket.display()
        ));
    }
    let resolved = if socket.is_absolute() {
        socket.to_path_buf()
    } else {
        let Origin::File(file) = origin else {
            return Err(format!(
                "the relative socket path \"{}\" cannot be resolved because this configuration was not read from a file; use an absolute path",
                socket.display()
            ));
        };
        let joined = file.parent().unwrap_or(Path::new("")).join(socket);
        // Only fails if the working directory is unavailable; the joined
        // path is still correct relative to it then.
        std::path::absolute(&joined).unwrap_or(joined)
    };
    let len = resolved.as_os_str().len();
    if len > MAX_SOCKET_PATH_LEN {
        return Err(format!(
            "the socket path {} is {len} bytes long, but Unix socket paths are limited to {MAX_SOCKET_PATH_LEN} bytes; use a shorter path",
            resolved.display()
        ));
    }
    Ok(resolved)
}
