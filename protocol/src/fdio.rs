//! SCM_RIGHTS file-descriptor passing on AF_UNIX stream sockets.
//!
//! One `recvmsg` never crosses a message boundary in our readers (they ask for exactly the bytes
//! of the header, then of the payload), so every fd received belongs to the message being read.
//! Received fds are created close-on-exec. A message that carried more fds than our buffer holds
//! is reported through [`Received::fds_truncated`]: the kernel has already closed the excess,
//! so the message cannot be served faithfully, but its bytes were consumed and the stream stays
//! in sync; the reader rejects that one message.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// Hard ceiling on fds accepted in one message, whatever was negotiated.
pub const MAX_FDS_PER_MESSAGE: usize = 1024;

/// The kernel's limit on fds in one SCM_RIGHTS message (`SCM_MAX_FD`). The control buffer is
/// always sized for it, so the kernel never truncates (truncated fds would be installed in our
/// table but unreachable, i.e. leaked); a message over our own limit is refused after receipt.
const SCM_MAX_FD: usize = 253;

thread_local! {
    /// The control-message buffer of [`recv_with_fds`], one per thread and allocated once: it
    /// is sized for [`SCM_MAX_FD`] fds, and allocating that on every read would put a heap
    /// allocation on every message. `recvmsg` uses its capacity, not its contents.
    static CMSG_BUFFER: RefCell<Vec<u8>> =
        RefCell::new(vec![0u8; nix::sys::socket::cmsg_space::<RawFd>() * SCM_MAX_FD + 64]);
}

/// Why a send or receive failed.
#[derive(Debug, thiserror::Error)]
pub enum FdIoError {
    #[error("the socket operation failed")]
    Socket(#[source] io::Error),
}

/// The outcome of one successful `recvmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes read; 0 means end of stream.
    pub bytes: usize,
    /// The peer attached more fds than allowed; the excess was discarded by the kernel.
    pub fds_truncated: bool,
}

/// Receives up to `buf.len()` bytes and appends any fds that came with them to `fds`.
///
/// Returns 0 at end of stream. `WouldBlock` is passed through for non-blocking sockets.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> Result<Received, FdIoError> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    CMSG_BUFFER.with_borrow_mut(|cmsg| {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| FdIoError::Socket(io::Error::from(e)))?;
        let bytes = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut received = 0usize;
        for c in msg
            .cmsgs()
            .map_err(|e| FdIoError::Socket(io::Error::from(e)))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in our table for this SCM_RIGHTS
                    // message; nothing else refers to it, so taking sole ownership is sound.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    received += 1;
                }
            }
        }
        let fds_truncated = truncated || received > max_fds;
        if fds_truncated {
            fds.clear();
        }
        Ok(Received {
            bytes,
            fds_truncated,
        })
    })
}

/// Sends as much of `bufs` as the socket takes in one call, with `fds` attached to it.
///
/// Callers loop on partial writes and pass the fds only on the first call.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, FdIoError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    socket::sendmsg::<()>(sock.as_raw_fd(), bufs, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| FdIoError::Socket(io::Error::from(e)))
}

/// Blocking helper: sends all of `bytes`, with `fds` attached to the first chunk.
pub fn send_all_blocking(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdIoError> {
    let mut sent = 0;
    let mut first = true;
    while sent < bytes.len() || (first && !fds.is_empty()) {
        let attach = if first { fds } else { &[] };
        match send_with_fds(sock, &[IoSlice::new(&bytes[sent..])], attach) {
            Ok(0) => {
                return Err(FdIoError::Socket(io::Error::from(io::ErrorKind::WriteZero)));
            }
            Ok(n) => {
                sent += n;
                first = false;
            }
            Err(FdIoError::Socket(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
