//! A blocking vfio-user client: what the tests, `vfud probe` and the benchmarks speak.
//!
//! It negotiates, sends typed commands, supports pipelining (send now, wait later) and No_reply
//! posted writes, and services the server's DMA_READ / DMA_WRITE requests through a
//! [`DmaHandler`] while it waits for a reply. Every wait is bounded by the socket read timeout,
//! so a misbehaving server yields [`ClientError::Timeout`], never a hang.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use zerocopy::{FromBytes, IntoBytes};

use crate::command::Command;
use crate::dma::DmaLayout;
use crate::fdio::{self, FdIoError};
use crate::frame::{self, Decoded, Frame, FrameDecoder, FrameError, FrameLimits};
use crate::negotiate::{self, Capabilities, NegotiateError, VersionPayload};
use crate::reply::{self, RegionCapError, RegionDescription};
use crate::request::MultiWrite;
use crate::wire::{self, Header, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to the vfio-user socket")]
    Connect(#[source] io::Error),
    #[error("could not configure the socket")]
    Configure(#[source] io::Error),
    #[error("sending a message failed")]
    Send(#[source] FdIoError),
    #[error("receiving a message failed")]
    Receive(#[source] FdIoError),
    #[error("the server closed the connection")]
    Closed,
    #[error("the server closed the connection in the middle of a message")]
    Truncated,
    #[error("no reply within the timeout")]
    Timeout,
    #[error("the server's byte stream cannot be framed")]
    Frame(#[from] FrameError),
    #[error("the server sent a message beyond the negotiated size or fd limits")]
    Oversized,
    #[error("{command} failed on the server: {errno}")]
    Server { command: Command, errno: Errno },
    #[error("the server's VERSION reply is not acceptable")]
    Negotiate(#[source] NegotiateError),
    #[error("the {command} reply is malformed: {why}")]
    CheckReply { command: Command, why: String },
    #[error("the region-info reply's capability chain is malformed")]
    ParseRegionCaps(#[from] RegionCapError),
}

impl ClientError {
    /// The server's errno if this is an error reply.
    pub fn server_errno(&self) -> Option<Errno> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Services the server's DMA_READ / DMA_WRITE requests for ranges mapped without an fd.
pub trait DmaHandler: Send {
    /// Returns `len` bytes of guest memory at `address`.
    fn dma_read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, Errno>;
    /// Stores `data` at `address`.
    fn dma_write(&mut self, address: u64, data: &[u8]) -> Result<(), Errno>;
}

/// Connection options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// What we offer in VERSION.
    pub caps: Capabilities,
    /// Minor version we propose.
    pub minor: u16,
    /// Bound on every wait for a message.
    pub timeout: Duration,
    /// How we lay out our answers to the server's DMA_READ / DMA_WRITE (the specification's
    /// unless a test plays an older QEMU).
    pub dma_layout: DmaLayout,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            caps: Capabilities {
                max_msg_fds: 16,
                write_multiple: true,
                ..Capabilities::default()
            },
            minor: negotiate::MINOR,
            timeout: Duration::from_secs(10),
            dma_layout: DmaLayout::Spec,
        }
    }
}

/// A reply as received: header, payload and any fds.
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A blocking vfio-user client; see the module documentation.
pub struct Client {
    sock: UnixStream,
    decoder: FrameDecoder,
    next_id: u16,
    opts: ClientOptions,
    server: Option<VersionPayload>,
    dma: Option<Box<dyn DmaHandler>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("next_id", &self.next_id)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and negotiates with default options.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects and negotiates.
    pub fn connect_with(path: &Path, opts: ClientOptions) -> Result<Client, ClientError> {
        let mut c = Client::connect_raw(path, opts)?;
        c.negotiate()?;
        Ok(c)
    }

    /// Connects without negotiating, for tests that send VERSION themselves or misbehave.
    pub fn connect_raw(path: &Path, opts: ClientOptions) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path).map_err(ClientError::Connect)?;
        Client::from_stream(sock, opts)
    }

    /// Wraps an already connected socket (e.g. one end of a socketpair) without negotiating.
    pub fn from_stream(sock: UnixStream, opts: ClientOptions) -> Result<Client, ClientError> {
        sock.set_read_timeout(Some(opts.timeout))
            .map_err(ClientError::Configure)?;
        sock.set_write_timeout(Some(opts.timeout))
            .map_err(ClientError::Configure)?;
        let limits =
            FrameLimits::for_xfer_size(opts.caps.max_data_xfer_size, opts.caps.max_msg_fds);
        Ok(Client {
            sock,
            decoder: FrameDecoder::new(limits),
            next_id: 0,
            opts,
            server: None,
            dma: None,
        })
    }

    /// Sends VERSION and validates the reply against the protocol's rules.
    pub fn negotiate(&mut self) -> Result<&VersionPayload, ClientError> {
        let offer = VersionPayload {
            major: negotiate::MAJOR,
            minor: self.opts.minor,
            caps: self.opts.caps.clone(),
        };
        let reply = self.call(Command::Version, &[&offer.encode()], &[])?;
        if !reply.fds.is_empty() {
            return Err(ClientError::CheckReply {
                command: Command::Version,
                why: "file descriptors attached although no twin socket was offered".into(),
            });
        }
        let got = VersionPayload::parse(&reply.payload).map_err(ClientError::Negotiate)?;
        if got.major != offer.major || got.minor > offer.minor {
            return Err(ClientError::CheckReply {
                command: Command::Version,
                why: format!(
                    "version {}.{} does not answer {}.{}",
                    got.major, got.minor, offer.major, offer.minor
                ),
            });
        }
        if got.caps.write_multiple && !offer.caps.write_multiple {
            return Err(ClientError::CheckReply {
                command: Command::Version,
                why: "write_multiple granted without being offered".into(),
            });
        }
        Ok(self.server.insert(got))
    }

    /// The server's VERSION reply, once negotiated.
    pub fn server(&self) -> Option<&VersionPayload> {
        self.server.as_ref()
    }

    /// Installs the handler for the server's DMA_READ / DMA_WRITE.
    pub fn set_dma_handler(&mut self, handler: Box<dyn DmaHandler>) {
        self.dma = Some(handler);
    }

    /// The underlying socket (for tests that poke at it).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    fn alloc_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends a command without waiting; returns its msg_id.
    pub fn send(
        &mut self,
        command: Command,
        no_reply: bool,
        payload: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u16, ClientError> {
        let id = self.alloc_id();
        let flags = FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 };
        let bytes = frame::encode(id, command as u16, flags, 0, payload);
        self.send_raw(&bytes, fds)?;
        Ok(id)
    }

    /// Sends arbitrary bytes, for negative tests.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        fdio::send_all_blocking(self.sock.as_fd(), bytes, fds).map_err(ClientError::Send)
    }

    /// Receives the next message, whatever it is.
    pub fn recv_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            let mut fds = Vec::new();
            let max_fds = self.decoder.limits().max_fds;
            let buf = self.decoder.read_buf();
            let n = match fdio::recv_with_fds(self.sock.as_fd(), buf, &mut fds, max_fds) {
                Ok(r) => {
                    if r.fds_truncated {
                        self.decoder.reject_fds();
                    }
                    r.bytes
                }
                Err(FdIoError::Socket(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(FdIoError::Socket(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(FdIoError::Socket(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(ClientError::Receive(e)),
            };
            if n == 0 {
                return Err(if self.decoder.is_idle() {
                    ClientError::Closed
                } else {
                    ClientError::Truncated
                });
            }
            match self.decoder.advance(n, fds)? {
                Decoded::Pending => {}
                Decoded::Frame(f) => return Ok(f),
                Decoded::Rejected(..) => return Err(ClientError::Oversized),
            }
        }
    }

    /// Waits for the reply to `msg_id`, servicing server requests meanwhile.
    pub fn wait_reply(&mut self, msg_id: u16, command: Command) -> Result<Reply, ClientError> {
        loop {
            let f = self.recv_frame()?;
            if f.is_command() {
                self.serve_server_request(f)?;
                continue;
            }
            if !f.is_reply() || f.header.msg_id != msg_id || f.header.command != command as u16 {
                return Err(ClientError::CheckReply {
                    command,
                    why: format!(
                        "expected the reply to message {msg_id}, got command {} id {} flags {:#x}",
                        f.header.command, f.header.msg_id, f.header.flags
                    ),
                });
            }
            if let Some(errno) = f.error() {
                if !f.payload.is_empty() {
                    return Err(ClientError::CheckReply {
                        command,
                        why: "an error reply must carry only the header".into(),
                    });
                }
                return Err(ClientError::Server {
                    command,
                    errno: Errno::from_raw(errno as i32),
                });
            }
            return Ok(Reply {
                header: f.header,
                payload: f.payload.into_vec(),
                fds: f.fds,
            });
        }
    }

    /// Sends a command and waits for its reply.
    pub fn call(
        &mut self,
        command: Command,
        payload: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ClientError> {
        let id = self.send(command, false, payload, fds)?;
        self.wait_reply(id, command)
    }

    /// Answers one DMA_READ / DMA_WRITE from the server.
    fn serve_server_request(&mut self, f: Frame) -> Result<(), ClientError> {
        let max = self.opts.caps.max_data_xfer_size as u64;
        let cmd = Command::from_u16(f.header.command);
        let result: Result<Vec<u8>, Errno> = (|| {
            if !f.fds.is_empty() {
                return Err(Errno::EINVAL);
            }
            let layout = self.opts.dma_layout;
            let (address, count, data) = layout
                .parse_request(&f.payload)
                .map_err(|_| Errno::EINVAL)?;
            if count > max {
                return Err(Errno::E2BIG);
            }
            let handler = self.dma.as_mut().ok_or(Errno::ENOTSUP)?;
            match cmd {
                Some(Command::DmaRead) => {
                    if layout == DmaLayout::Spec && !data.is_empty() {
                        return Err(Errno::EINVAL);
                    }
                    // A zero-length access touches no memory; the handler never sees it.
                    let bytes = if count == 0 {
                        Vec::new()
                    } else {
                        handler.dma_read(address, count as usize)?
                    };
                    Ok(layout.read_reply(address, &bytes))
                }
                Some(Command::DmaWrite) => {
                    if data.len() as u64 != count {
                        return Err(Errno::EINVAL);
                    }
                    if count > 0 {
                        handler.dma_write(address, data)?;
                    }
                    Ok(layout.write_reply(address, count))
                }
                _ => Err(Errno::ENOSYS),
            }
        })();
        if f.no_reply() {
            return Ok(());
        }
        let bytes = match result {
            Ok(payload) => frame::encode(
                f.header.msg_id,
                f.header.command,
                FLAG_TYPE_REPLY,
                0,
                &[&payload],
            ),
            Err(e) => frame::encode_error_reply(&f.header, e as i32),
        };
        self.send_raw(&bytes, &[])
    }

    fn exact_reply<T: FromBytes>(command: Command, reply: &Reply) -> Result<T, ClientError> {
        T::read_from_bytes(&reply.payload).map_err(|_| ClientError::CheckReply {
            command,
            why: format!(
                "payload is {} bytes, expected {}",
                reply.payload.len(),
                core::mem::size_of::<T>()
            ),
        })
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<wire::DeviceInfo, ClientError> {
        let req = wire::DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        let r = self.call(Command::DeviceGetInfo, &[req.as_bytes()], &[])?;
        Self::exact_reply(Command::DeviceGetInfo, &r)
    }

    /// DEVICE_GET_REGION_INFO with one retry at the argsz the server asks for, as QEMU does.
    /// Returns the description and the region's fd, if the server sent one.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> Result<(RegionDescription, Option<OwnedFd>), ClientError> {
        let mut argsz = 32u32;
        for _ in 0..2 {
            let req = wire::RegionInfo {
                argsz,
                index,
                ..Default::default()
            };
            let mut r = self.call(Command::DeviceGetRegionInfo, &[req.as_bytes()], &[])?;
            if r.fds.len() > 1 {
                return Err(ClientError::CheckReply {
                    command: Command::DeviceGetRegionInfo,
                    why: format!("{} fds attached, at most 1 allowed", r.fds.len()),
                });
            }
            let (info, _) = wire::RegionInfo::read_from_prefix(&r.payload).map_err(|_| {
                ClientError::CheckReply {
                    command: Command::DeviceGetRegionInfo,
                    why: "shorter than 32 bytes".into(),
                }
            })?;
            if info.argsz > argsz && argsz == 32 {
                argsz = info.argsz.min(64 * 1024);
                continue;
            }
            if r.payload.len() > argsz as usize {
                return Err(ClientError::CheckReply {
                    command: Command::DeviceGetRegionInfo,
                    why: "larger than the argsz requested".into(),
                });
            }
            return Ok((reply::parse_region_info(&r.payload)?, r.fds.pop()));
        }
        Err(ClientError::CheckReply {
            command: Command::DeviceGetRegionInfo,
            why: "argsz kept growing".into(),
        })
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<wire::IrqInfo, ClientError> {
        let req = wire::IrqInfo {
            argsz: 16,
            index,
            ..Default::default()
        };
        let r = self.call(Command::DeviceGetIrqInfo, &[req.as_bytes()], &[])?;
        Self::exact_reply(Command::DeviceGetIrqInfo, &r)
    }

    /// REGION_READ of `count` bytes.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count,
        };
        let r = self.call(Command::RegionRead, &[req.as_bytes()], &[])?;
        let (got, data) = wire::RegionAccess::read_from_prefix(&r.payload).map_err(|_| {
            ClientError::CheckReply {
                command: Command::RegionRead,
                why: "shorter than 16 bytes".into(),
            }
        })?;
        if got.count > count || data.len() != got.count as usize {
            return Err(ClientError::CheckReply {
                command: Command::RegionRead,
                why: format!(
                    "count {} with {} data bytes for a {count}-byte read",
                    got.count,
                    data.len()
                ),
            });
        }
        Ok(data.to_vec())
    }

    /// REGION_WRITE, waiting for the reply.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let r = self.call(Command::RegionWrite, &[req.as_bytes(), data], &[])?;
        let _: wire::RegionAccess = Self::exact_reply(Command::RegionWrite, &r)?;
        Ok(())
    }

    /// REGION_WRITE with No_reply, as QEMU posts MMIO writes.
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.send(Command::RegionWrite, true, &[req.as_bytes(), data], &[])?;
        Ok(())
    }

    /// Reads a little-endian u32 register.
    pub fn read_u32(&mut self, region: u32, offset: u64) -> Result<u32, ClientError> {
        let d = self.region_read(region, offset, 4)?;
        let bytes: [u8; 4] = d
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::CheckReply {
                command: Command::RegionRead,
                why: format!("a 4-byte register read returned {} bytes", d.len()),
            })?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Writes a little-endian u32 register.
    pub fn write_u32(&mut self, region: u32, offset: u64, value: u32) -> Result<(), ClientError> {
        self.region_write(region, offset, &value.to_le_bytes())
    }

    /// DMA_MAP; `fd` is the backing file and the offset of `iova` in it.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        flags: u32,
        fd: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<(), ClientError> {
        let req = wire::DmaMap {
            argsz: 32,
            flags,
            offset: fd.map(|f| f.1).unwrap_or(0),
            address: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.map(|f| f.0).into_iter().collect();
        let r = self.call(Command::DmaMap, &[req.as_bytes()], &fds)?;
        if !r.payload.is_empty() {
            return Err(ClientError::CheckReply {
                command: Command::DmaMap,
                why: "the reply must carry only the header".into(),
            });
        }
        Ok(())
    }

    /// DMA_UNMAP; returns the echoed entry.
    pub fn dma_unmap(
        &mut self,
        iova: u64,
        size: u64,
        flags: u32,
    ) -> Result<wire::DmaUnmap, ClientError> {
        let req = wire::DmaUnmap {
            argsz: 24,
            flags,
            address: iova,
            size,
        };
        let r = self.call(Command::DmaUnmap, &[req.as_bytes()], &[])?;
        Self::exact_reply(Command::DmaUnmap, &r)
    }

    /// DEVICE_SET_IRQS.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = wire::SetIrqs {
            argsz: (20 + data.len()) as u32,
            flags,
            index,
            start,
            count,
        };
        self.call(Command::DeviceSetIrqs, &[req.as_bytes(), data], fds)?;
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.call(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    /// REGION_WRITE_MULTI; returns the number of writes the server completed.
    pub fn write_multi(&mut self, writes: &[MultiWrite]) -> Result<u64, ClientError> {
        let mut payload = (writes.len() as u64).as_bytes().to_vec();
        for w in writes {
            let mut data = [0u8; 8];
            let n = w.data.len().min(8);
            data[..n].copy_from_slice(&w.data[..n]);
            payload.extend_from_slice(
                wire::WriteMultiEntry {
                    offset: w.offset,
                    region: w.region,
                    count: n as u32,
                    data,
                }
                .as_bytes(),
            );
        }
        let r = self.call(Command::RegionWriteMulti, &[&payload], &[])?;
        Self::exact_reply::<u64>(Command::RegionWriteMulti, &r)
    }

    /// DEVICE_FEATURE with raw data.
    pub fn device_feature(&mut self, flags: u32, data: &[u8]) -> Result<Reply, ClientError> {
        let req = wire::DeviceFeature {
            argsz: (8 + data.len()) as u32,
            flags,
        };
        self.call(Command::DeviceFeature, &[req.as_bytes(), data], &[])
    }
}
