//! Reading configuration files and directories, and the checks that span
//! several files.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{ConfigError, ConfigErrors, Origin};
use crate::parse::parse_bytes;
use crate::schema::{DeviceConfig, DeviceSpec};

/// Largest configuration file read, in bytes. Real configurations are a few
/// hundred bytes; the cap keeps a wrong path (say `/dev/zero`) from
/// exhausting memory.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Parses and validates a configuration text.
///
/// `origin` is the file the text came from: it names the source in errors
/// (`<inline>` when `None`) and is the base for a relative `socket` path.
/// Without an origin a relative `socket` is an error, since there is no
/// directory to resolve it against. When several rules are broken, the
/// first problem is returned; [`load_paths`] reports all of them.
pub fn parse_str(text: &str, origin: Option<&Path>) -> Result<DeviceConfig, ConfigError> {
    let origin = match origin {
        Some(path) => Origin::File(path.to_path_buf()),
        None => Origin::Inline,
    };
    parse_bytes(text.as_bytes(), &origin).map_err(|errors| errors.first)
}

/// Reads, parses and validates one configuration file.
///
/// A relative `socket` in the file is resolved against the file's
/// directory. Returns the first problem found; use [`load_paths`] to get
/// all of them.
pub fn load_file(path: &Path) -> Result<DeviceConfig, ConfigError> {
    let bytes = read_config(path)?;
    parse_bytes(&bytes, &Origin::File(path.to_path_buf())).map_err(|errors| errors.first)
}

/// Loads every configuration named by `paths` and checks them together.
///
/// Each path is a file or a directory. A directory contributes its `*.json`
/// files (not recursively, sorted by file name; hidden files, i.e. names
/// starting with `.`, and non-regular files are skipped, as a shell glob
/// would); a directory without any is an error. A file reached twice (for
/// example listed and also inside a listed directory) is loaded once.
///
/// All problems are collected rather than stopping at the first: per-file
/// read, syntax and validation errors, and across files two devices with
/// the same name or the same socket path (compared after resolution,
/// component by component, without following symlinks). On success the
/// configurations are returned in load order.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<DeviceConfig>, ConfigErrors> {
    if paths.is_empty() {
        return Err(ConfigError::NoPaths.into());
    }
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut loaded: Vec<(PathBuf, DeviceConfig)> = Vec::new();

    for path in paths {
        let files = match fs::metadata(path) {
            Err(source) => {
                errors.push(ConfigError::ReadFile {
                    file: path.clone(),
                    source,
                });
                continue;
            }
            Ok(meta) if meta.is_dir() => match list_json(path) {
                Err(err) => {
                    errors.push(err);
                    continue;
                }
                Ok(files) if files.is_empty() => {
                    errors.push(ConfigError::NoConfigs { dir: path.clone() });
                    continue;
                }
                Ok(files) => files,
            },
            Ok(_) => vec![path.clone()],
        };
        for file in files {
            let identity = fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            if !seen.insert(identity) {
                continue;
            }
            let parsed = read_config(&file)
                .map_err(Into::into)
                .and_then(|bytes| parse_bytes(&bytes, &Origin::File(file.clone())));
            match parsed {
                Ok(config) => loaded.push((file, config)),
                Err(file_errors) => errors.extend(file_errors),
            }
        }
    }

    check_unique(&loaded, &mut errors);
    errors.extend(check_viommu_links(&loaded));
    if errors.is_empty() {
        Ok(loaded.into_iter().map(|(_, config)| config).collect())
    } else {
        Err(ConfigErrors::new(errors))
    }
}

/// The configuration files `paths` name, as [`load_paths`] would read them (directories
/// expanded to their `*.json` files, a file reached twice listed once), without reading them.
///
/// For a daemon that re-reads its configuration and handles each file on its own, so that one
/// broken file does not stop the others. A path that cannot be listed, or a directory without
/// configurations, is an error for that path only; the files of the other paths are returned.
pub fn config_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for path in paths {
        let listed = match fs::metadata(path) {
            Err(source) => Err(ConfigError::ReadFile {
                file: path.clone(),
                source,
            }),
            Ok(meta) if meta.is_dir() => match list_json(path) {
                Ok(found) if found.is_empty() => Err(ConfigError::NoConfigs { dir: path.clone() }),
                other => other,
            },
            Ok(_) => Ok(vec![path.clone()]),
        };
        match listed {
            Ok(found) => {
                for file in found {
                    let identity = fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
                    if seen.insert(identity) {
                        files.push(file);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (files, errors)
}

/// Reports devices whose name or socket repeats one loaded earlier; the
/// earlier file is treated as the owner.
fn check_unique(loaded: &[(PathBuf, DeviceConfig)], errors: &mut Vec<ConfigError>) {
    let mut names: HashMap<&str, &Path> = HashMap::new();
    let mut sockets: HashMap<&Path, &Path> = HashMap::new();
    for (file, config) in loaded {
        if let Some(first) = names.get(config.name.as_str()) {
            errors.push(ConfigError::DuplicateName {
                name: config.name.clone(),
                first: first.to_path_buf(),
                second: file.clone(),
            });
        } else {
            names.insert(&config.name, file);
        }
        if let Some(first) = sockets.get(config.socket.as_path()) {
            errors.push(ConfigError::DuplicateSocket {
                socket: config.socket.clone(),
                first: first.to_path_buf(),
                second: file.clone(),
            });
        } else {
            sockets.insert(&config.socket, file);
        }
    }
}

/// The `*.json` entries of `dir` that may be configurations, sorted by file
/// name. Entries whose type cannot be determined (e.g. dangling symlinks)
/// are kept so that reading them reports the problem.
fn list_json(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_dir_error = |source| ConfigError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let name = entry.file_name();
        let path = Path::new(&name);
        let hidden = name.as_encoded_bytes().starts_with(b".");
        let is_json = path.extension().is_some_and(|ext| ext == "json");
        if hidden || !is_json {
            continue;
        }
        let regular_or_unknown = fs::metadata(entry.path()).map_or(true, |meta| meta.is_file());
        if regular_or_unknown {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().map(|name| dir.join(name)).collect())
}

/// Reads a whole configuration file, refusing files over
/// [`MAX_CONFIG_BYTES`].
fn read_config(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let read_error = |source| ConfigError::ReadFile {
        file: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::ReadTooLarge {
            file: path.to_path_buf(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    Ok(bytes)
}

/// Checks the devices that name a `"type": "viommu"` device (`"viommu": "<name>"`) against the
/// devices loaded together: the name must exist and be a vIOMMU device, and no two devices
/// behind one vIOMMU may share a requester id. Returns one error per offending file, naming
/// the field and the fix; the caller decides what to do with the files (the daemon serves the
/// others).
pub fn check_viommu_links(loaded: &[(PathBuf, DeviceConfig)]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let by_name: HashMap<&str, (&Path, &DeviceConfig)> = loaded
        .iter()
        .map(|(file, c)| (c.name.as_str(), (file.as_path(), c)))
        .collect();
    let viommus: Vec<&str> = loaded
        .iter()
        .filter(|(_, c)| matches!(c.device, DeviceSpec::Viommu(_)))
        .map(|(_, c)| c.name.as_str())
        .collect();
    let mut used: HashMap<(&str, u16), (&str, &Path)> = HashMap::new();
    for (file, config) in loaded {
        let DeviceSpec::Emulated(e) = &config.device else {
            continue;
        };
        let Some((target, rid)) = e.viommu_device() else {
            continue;
        };
        let fail = |path: &str, reason: String| ConfigError::ValidateField {
            origin: Origin::File(file.clone()),
            path: path.to_owned(),
            reason,
        };
        match by_name.get(target) {
            None => {
                let known = if viommus.is_empty() {
                    "none is configured; add a device of \"type\": \"viommu\"".to_owned()
                } else {
                    format!("configured vIOMMU devices: {}", viommus.join(", "))
                };
                errors.push(fail(
                    "device.viommu",
                    format!("no device named \"{target}\" is configured; name a device of \"type\": \"viommu\" ({known})"),
                ));
                continue;
            }
            Some((other, c)) if !matches!(c.device, DeviceSpec::Viommu(_)) => {
                errors.push(fail(
                    "device.viommu",
                    format!(
                        "device \"{target}\" ({}) is not a vIOMMU; name a device of \"type\": \"viommu\", or give a model block such as {{\"model\": \"vtd\"}}",
                        other.display()
                    ),
                ));
                continue;
            }
            Some(_) => {}
        }
        match used.get(&(target, rid.0)) {
            Some((first, first_file)) => errors.push(fail(
                "device.requester_id",
                format!(
                    "requester id {rid} behind vIOMMU \"{target}\" is already used by device \"{first}\" ({}); give each device its own requester id",
                    first_file.display()
                ),
            )),
            None => {
                used.insert((target, rid.0), (config.name.as_str(), file.as_path()));
            }
        }
    }
    errors
}
