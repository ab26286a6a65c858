//! Creating and removing a device's listening socket.
//!
//! The socket's directory decides who can impersonate the device: anyone who can write there can
//! swap our socket for theirs, and a VMM that attaches to an impostor hands it guest memory
//! through DMA_READ/DMA_WRITE. So the directory must belong to us (or root) and must not be
//! writable by others unless it is sticky, like /tmp itself.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use tokio::net::UnixListener;

/// Why a device socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the socket directory {}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the socket directory {} {why}; fix its ownership or mode, or choose another socket path", .dir.display())]
    CheckDir { dir: PathBuf, why: String },
    #[error("{} exists and is not a socket; remove it or choose another socket path", .path.display())]
    CheckNotSocket { path: PathBuf },
    #[error("{} is in use by another running server; stop it or choose another socket path", .path.display())]
    CheckInUse { path: PathBuf },
    #[error("cannot tell whether {} is still in use; remove it if no server owns it", .path.display())]
    ProbeExisting {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot remove the stale socket {}", .path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The socket file we created, so that we only ever remove our own. Holding an `O_PATH` fd to
/// it pins the inode, so its number cannot be reused by another file while we compare.
#[derive(Debug)]
pub struct SocketIdentity {
    pinned: std::os::fd::OwnedFd,
}

impl SocketIdentity {
    fn pin(path: &Path) -> io::Result<SocketIdentity> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
            .open(path)?;
        Ok(SocketIdentity {
            pinned: file.into(),
        })
    }

    fn is(&self, meta: &std::fs::Metadata) -> bool {
        let Ok(st) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&self.pinned)) else {
            return false;
        };
        st.st_dev == meta.dev() && st.st_ino == meta.ino()
    }
}

/// Creates `dir` (mode 0700) if missing and checks that nobody else can replace files in it.
fn prepare_dir(dir: &Path) -> Result<(), SocketError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| SocketError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
    }
    let meta = std::fs::metadata(dir).map_err(|source| SocketError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let fail = |why: String| SocketError::CheckDir {
        dir: dir.to_path_buf(),
        why,
    };
    if !meta.is_dir() {
        return Err(fail("is not a directory".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(fail(format!(
            "belongs to uid {}, not to us (uid {euid}) or root",
            meta.uid()
        )));
    }
    let sticky = meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o022 != 0 && !sticky {
        return Err(fail(format!(
            "is writable by others (mode {:o}) and not sticky",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Whether a server accepts connections at `path`. Only ECONNREFUSED means "stale": a full
/// backlog (EAGAIN) is a live server, and anything else is not ours to decide.
fn probe_existing(path: &Path) -> Result<bool, SocketError> {
    let probe_err = |source| SocketError::ProbeExisting {
        path: path.to_path_buf(),
        source,
    };
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(probe_err)?;
    let addr = UnixAddr::new(path).map_err(probe_err)?;
    match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED) | Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(probe_err(e)),
    }
}

/// Binds a listening socket at `path`, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketIdentity), SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::CheckNotSocket {
                path: path.to_path_buf(),
            });
        }
        if probe_existing(path)? {
            return Err(SocketError::CheckInUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
        tracing::info!(socket = %path.display(), "replaced a stale socket");
    }
    // Bind and listen under a temporary name, then rename into place: a client that polls for
    // the path never finds a socket that is not listening yet.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let bind_err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = match UnixListener::bind(&tmp) {
        Ok(l) => {
            if let Err(source) = std::fs::rename(&tmp, path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(bind_err(source));
            }
            l
        }
        // The longer temporary name may not fit in sun_path; bind the real name directly.
        Err(_) => UnixListener::bind(path).map_err(bind_err)?,
    };
    let identity = SocketIdentity::pin(path).map_err(bind_err)?;
    Ok((listener, identity))
}

/// Removes the socket file if it is still the one we created (another instance may have
/// replaced a socket it considered stale); a missing file is fine.
pub fn remove(path: &Path, ours: &SocketIdentity) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if ours.is(&meta) => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "could not remove the socket");
            }
        }
        Ok(_) => {
            tracing::warn!(socket = %path.display(), "socket was replaced by someone else; leaving it")
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vfud-socket-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn creates_a_private_directory_and_refuses_a_writable_one() {
        let d = dir("private");
        let (_l, _id) = bind(&d.join("sub/a.sock")).unwrap();
        let mode = std::fs::metadata(d.join("sub"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let open = d.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&open.join("a.sock")).unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        bind(&open.join("a.sock")).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn live_sockets_are_kept_stale_ones_replaced_and_only_ours_removed() {
        let d = dir("stale");
        let path = d.join("a.sock");
        let (live, id) = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(SocketError::CheckInUse { .. })));
        drop(live);
        let (_again, id2) = bind(&path).unwrap();
        remove(&path, &id);
        assert!(path.exists(), "a socket that is not ours any more stays");
        remove(&path, &id2);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
