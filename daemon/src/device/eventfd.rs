//! Waiting on a client's eventfd from async code (a kernel interface: epoll through tokio).
//!
//! The only `unsafe` here is tokio's fd registration, which needs the fd to stay open and
//! unchanged for as long as it is registered; [`EventfdWatch`] owns a reference to the fd for
//! exactly that long.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An fd kept alive by the registration that uses it.
struct Registered(Arc<OwnedFd>);

impl AsRawFd for Registered {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Waits for an eventfd to be signalled and consumes its count.
pub struct EventfdWatch {
    fd: AsyncFd<Registered>,
}

impl std::fmt::Debug for EventfdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventfdWatch")
            .field("fd", &self.fd.get_ref().0)
            .finish()
    }
}

impl EventfdWatch {
    /// Registers `fd` with the current tokio runtime.
    pub fn new(fd: Arc<OwnedFd>) -> std::io::Result<EventfdWatch> {
        // SAFETY: `Registered` holds an `Arc<OwnedFd>`, so the fd stays open (its number cannot
        // be reused) for the whole life of the `AsyncFd`, which deregisters it on drop.
        let fd = unsafe { AsyncFd::register_with_interest(Registered(fd), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(EventfdWatch { fd })
    }

    /// Resolves once the eventfd has been signalled, after consuming its count.
    pub async fn signalled(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            // Poll before reading: the client owns the fd and may have made it blocking, and a
            // read of a zero count would then block.
            let inner = &self.fd.get_ref().0;
            let mut pending = [PollFd::new(inner.as_fd(), PollFlags::POLLIN)];
            let has_count = matches!(poll(&mut pending, PollTimeout::ZERO), Ok(n) if n > 0);
            if has_count {
                let _ = nix::unistd::read(inner.as_raw_fd(), &mut [0u8; 8]);
            }
            ready.clear_ready();
            if has_count {
                return Ok(());
            }
        }
    }
}
