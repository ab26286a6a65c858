//! Finding and opening a host device's VFIO character device and the iommufd, with errors that
//! say what is wrong and how to fix it (absent device, wrong driver, missing kernel support,
//! permissions, device in use). The filesystem roots are parameters so tests use a fake sysfs.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Where sysfs and /dev are (the real ones unless a test says otherwise).
#[derive(Debug, Clone)]
pub struct SystemPaths {
    /// `/sys`.
    pub sys: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> SystemPaths {
        SystemPaths {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// The files a host device is served through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDeviceLocation {
    /// How messages name the device: its PCI address, or the cdev path.
    pub label: String,
    /// `/dev/vfio/devices/vfioN`.
    pub cdev: PathBuf,
    /// `/dev/iommu` (or the configured iommufd).
    pub iommufd: PathBuf,
}

/// Why the device's files could not be found or opened.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// No PCI device at the address.
    #[error("device {device}: there is no PCI device {address} ({path} does not exist); check the address with `lspci -D`")]
    FindDevice {
        device: String,
        address: String,
        path: String,
    },
    /// The device is not bound to vfio-pci.
    #[error("device {device}: {address} is {}, not vfio-pci; bind it with: {}", driver_text(.driver), bind_commands(.address, .driver.is_some()))]
    CheckDriver {
        device: String,
        address: String,
        driver: Option<String>,
    },
    /// Bound to vfio-pci, but the kernel offers no VFIO character device.
    #[error("device {device}: {address} is bound to vfio-pci but has no VFIO character device ({path} is missing); this kernel lacks CONFIG_VFIO_DEVICE_CDEV (and CONFIG_IOMMUFD): use a kernel built with both")]
    FindCdev {
        device: String,
        address: String,
        path: String,
    },
    /// Opening the VFIO character device failed.
    #[error("device {device}: opening {path} failed{}", open_hint(*.kind, "the VFIO character device"))]
    OpenCdev {
        device: String,
        path: String,
        kind: ErrorKind,
        #[source]
        source: std::io::Error,
    },
    /// Opening the iommufd failed.
    #[error("device {device}: opening {path} failed{}", iommufd_hint(*.kind))]
    OpenIommufd {
        device: String,
        path: String,
        kind: ErrorKind,
        #[source]
        source: std::io::Error,
    },
}

fn driver_text(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("bound to the {d} driver"),
        None => "bound to no driver".to_owned(),
    }
}

/// The commands that hand `address` to vfio-pci.
pub fn bind_commands(address: &str, has_driver: bool) -> String {
    let unbind = if has_driver {
        format!("echo {address} > /sys/bus/pci/devices/{address}/driver/unbind; ")
    } else {
        String::new()
    };
    format!(
        "`modprobe vfio-pci; {unbind}echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override; echo {address} > /sys/bus/pci/drivers_probe`"
    )
}

fn open_hint(kind: ErrorKind, what: &str) -> String {
    match kind {
        ErrorKind::PermissionDenied => format!(
            "; vfud needs read-write access to {what}: run it as root, or give its user the device node (e.g. a udev rule with OWNER=\"vfud\" for vfio devices)"
        ),
        ErrorKind::NotFound => format!(
            "; {what} does not exist: the kernel needs CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD, and /dev must be devtmpfs"
        ),
        ErrorKind::ResourceBusy => "; the device is in use by another process (another vfud or a VMM); stop it first".to_owned(),
        _ => String::new(),
    }
}

fn iommufd_hint(kind: ErrorKind) -> String {
    match kind {
        ErrorKind::NotFound => "; this kernel has no iommufd: load it with `modprobe iommufd`, or use a kernel built with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV (Debian's kernels leave them off)".to_owned(),
        _ => open_hint(kind, "/dev/iommu"),
    }
}

/// Resolves the configured device to its files: a `cdev` is taken as is; a `pci` address is
/// looked up in sysfs (present, bound to vfio-pci, with a `vfio-dev/vfioN` entry).
pub fn locate(
    name: &str,
    host: &vfu_config::HostDevice,
    paths: &SystemPaths,
) -> Result<HostDeviceLocation, LocateError> {
    let iommufd = host
        .iommufd
        .clone()
        .unwrap_or_else(|| paths.dev.join("iommu"));
    if let Some(cdev) = &host.cdev {
        return Ok(HostDeviceLocation {
            label: cdev.display().to_string(),
            cdev: cdev.clone(),
            iommufd,
        });
    }
    let address = host.pci.clone().unwrap_or_default();
    let device_dir = paths.sys.join("bus/pci/devices").join(&address);
    if !device_dir.exists() {
        return Err(LocateError::FindDevice {
            device: name.to_owned(),
            address,
            path: device_dir.display().to_string(),
        });
    }
    let driver = std::fs::read_link(device_dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(LocateError::CheckDriver {
            device: name.to_owned(),
            address,
            driver,
        });
    }
    let vfio_dev = device_dir.join("vfio-dev");
    let node = std::fs::read_dir(&vfio_dev).ok().and_then(|entries| {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("vfio"))
            .collect();
        names.sort();
        names.into_iter().next()
    });
    let Some(node) = node else {
        return Err(LocateError::FindCdev {
            device: name.to_owned(),
            address,
            path: vfio_dev.display().to_string(),
        });
    };
    Ok(HostDeviceLocation {
        label: address,
        cdev: paths.dev.join("vfio/devices").join(node),
        iommufd,
    })
}

impl HostDeviceLocation {
    /// Opens the cdev and the iommufd read-write, close-on-exec.
    pub fn open(&self, name: &str) -> Result<(File, File), LocateError> {
        let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let device = open(&self.cdev).map_err(|source| LocateError::OpenCdev {
            device: name.to_owned(),
            path: self.cdev.display().to_string(),
            kind: source.kind(),
            source,
        })?;
        let iommufd = open(&self.iommufd).map_err(|source| LocateError::OpenIommufd {
            device: name.to_owned(),
            path: self.iommufd.display().to_string(),
            kind: source.kind(),
            source,
        })?;
        Ok((device, iommufd))
    }
}
