//! Creating and removing a device's listening socket.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

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
    #[error("{} exists and is not a socket; remove it or choose another socket path", .path.display())]
    CheckNotSocket { path: PathBuf },
    #[error("{} is in use by another running server; stop it or choose another socket path", .path.display())]
    CheckInUse { path: PathBuf },
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

/// Binds a listening socket at `path`, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::CheckNotSocket {
                path: path.to_path_buf(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
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
    let listener = match UnixListener::bind(&tmp) {
        Ok(l) => l,
        // The longer temporary name may not fit in sun_path; bind the real name directly.
        Err(_) => {
            return UnixListener::bind(path).map_err(|source| SocketError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(SocketError::Bind {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(listener)
}

/// Removes the socket file; a missing file is fine.
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(socket = %path.display(), error = %e, "could not remove the socket");
        }
    }
}
