//! One client connection: a reader task, an in-order command dispatcher, and a requester for
//! server-initiated DMA_READ / DMA_WRITE.
//!
//! The reader owns the receive side. Commands go, in arrival order, through a bounded queue to
//! the dispatcher, which executes one at a time (pipelining is allowed, reordering is not).
//! Replies to our own DMA requests are routed straight to the waiting requester, so a device DMA
//! that needs the client's answer never waits behind the command queue. The dispatcher and the
//! requester share one writer, so messages never interleave on the wire.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use vfu_protocol::command::Command;
use vfu_protocol::dma::{self, DmaLayout};
use vfu_protocol::fdio::{self, FdIoError};
use vfu_protocol::frame::{self, Decoded, Frame, FrameDecoder, FrameLimits, Rejection};
use vfu_protocol::negotiate::{self, Negotiated, ServerLimits};
use vfu_protocol::reply::{self, RegionDescription};
use vfu_protocol::request::{MultiWrite, Request};
use vfu_protocol::wire::{
    self, Header, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY, HEADER_SIZE,
};
use zerocopy::IntoBytes;

use crate::device::{check_region_access, Device};
use crate::dma::{DmaBacking, DmaProt, DmaRegion, GuestMemory, MessageDmaRequest};
use crate::server::stats::DeviceStats;
use crate::viommu::ats::{AtcInvalidation, InvalidationRange, RequesterId};

/// Regions looked at per device; vfio-user devices have 9 (PCI) plus a few device-specific.
const MAX_REGIONS: u32 = 64;

/// Commands queued between the reader and the dispatcher; the reader stops reading when full,
/// which bounds what one client can make us buffer to this many maximum-size messages.
const COMMAND_QUEUE: usize = 32;
/// How long a server-initiated DMA request waits for the client's reply.
const MESSAGE_DMA_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reply may wait for the client to drain its socket before we give up on it.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    ClientClosed,
    Truncated,
    Unframable(String),
    Socket(String),
    Shutdown,
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::ClientClosed => f.write_str("client closed the connection"),
            EndReason::Truncated => f.write_str("client closed the connection mid-message"),
            EndReason::Unframable(why) => write!(f, "stream could not be framed: {why}"),
            EndReason::Socket(why) => write!(f, "socket error: {why}"),
            EndReason::Shutdown => f.write_str("daemon shutting down"),
        }
    }
}

/// Counters of one finished connection, for the disconnect log line.
#[derive(Debug, Clone)]
pub struct ConnectionSummary {
    pub messages: u64,
    pub error_replies: u64,
    pub end: EndReason,
}

enum Inbound {
    Command(Frame),
    Rejected(Header, Rejection),
    End(EndReason),
}

type Pending = Arc<Mutex<HashMap<u16, oneshot::Sender<Frame>>>>;

fn lock_pending(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u16, oneshot::Sender<Frame>>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

struct Writer {
    stream: Arc<UnixStream>,
    lock: tokio::sync::Mutex<()>,
}

impl Writer {
    async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let _guard = self.lock.lock().await;
        let work = async {
            let mut sent = 0;
            while sent < bytes.len() {
                let attach: &[BorrowedFd<'_>] = if sent == 0 { fds } else { &[] };
                let n = self
                    .stream
                    .async_io(Interest::WRITABLE, || {
                        fdio::send_with_fds(
                            self.stream.as_fd(),
                            &[IoSlice::new(&bytes[sent..])],
                            attach,
                        )
                        .map_err(|FdIoError::Socket(e)| e)
                    })
                    .await?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                sent += n;
            }
            Ok(())
        };
        let result = tokio::time::timeout(SEND_TIMEOUT, work)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))
            .and_then(|r| r);
        if result.is_err() {
            // A message may be half on the wire; nothing sent after it could be framed by the
            // client. End the connection instead of desynchronizing it.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*self.stream),
                nix::sys::socket::Shutdown::Both,
            );
        }
        result
    }
}

async fn read_loop(
    stream: Arc<UnixStream>,
    limits: FrameLimits,
    queue: mpsc::Sender<Inbound>,
    pending: Pending,
) {
    let mut decoder = FrameDecoder::new(limits);
    let end = loop {
        let mut fds = Vec::new();
        let max_fds = limits.max_fds;
        let buf = decoder.read_buf();
        let received = stream
            .async_io(Interest::READABLE, || {
                fdio::recv_with_fds(stream.as_fd(), buf, &mut fds, max_fds)
                    .map_err(|FdIoError::Socket(e)| e)
            })
            .await;
        let received = match received {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                break if decoder.is_idle() {
                    EndReason::ClientClosed
                } else {
                    EndReason::Truncated
                }
            }
            Err(e) => break EndReason::Socket(e.to_string()),
        };
        if received.bytes == 0 {
            break if decoder.is_idle() {
                EndReason::ClientClosed
            } else {
                EndReason::Truncated
            };
        }
        if received.fds_truncated {
            decoder.reject_fds();
        }
        let inbound = match decoder.advance(received.bytes, fds) {
            Ok(Decoded::Pending) => continue,
            Ok(Decoded::Frame(f)) if f.is_reply() => {
                match lock_pending(&pending).remove(&f.header.msg_id) {
                    Some(tx) => {
                        let _ = tx.send(f);
                    }
                    // Debug, not warn: a client could otherwise flood the log.
                    None => tracing::debug!(
                        msg_id = f.header.msg_id,
                        "dropping a reply to no outstanding request"
                    ),
                }
                continue;
            }
            Ok(Decoded::Frame(f)) => Inbound::Command(f),
            Ok(Decoded::Rejected(h, why)) if h.flags & wire::FLAG_TYPE_MASK == FLAG_TYPE_REPLY => {
                // Never answer a reply. If it was for one of our requests, fail that request
                // now instead of letting it wait for its timeout.
                let waiting = lock_pending(&pending).remove(&h.msg_id).is_some();
                tracing::warn!(
                    msg_id = h.msg_id,
                    ?why,
                    waiting,
                    "dropping a reply refused while framing"
                );
                continue;
            }
            Ok(Decoded::Rejected(h, why)) => Inbound::Rejected(h, why),
            Err(e) => break EndReason::Unframable(e.to_string()),
        };
        if queue.send(inbound).await.is_err() {
            return;
        }
    };
    let _ = queue.send(Inbound::End(end)).await;
}

/// Sends one server-initiated request and waits (bounded) for the client's reply to it.
async fn exchange(
    writer: &Writer,
    pending: &Pending,
    next_id: &AtomicU16,
    command: Command,
    payload: &[u8],
) -> Result<Frame, Errno> {
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    lock_pending(pending).insert(id, tx);
    let bytes = frame::encode(id, command as u16, FLAG_TYPE_COMMAND, 0, &[payload]);
    let outcome = async {
        writer.send(&bytes, &[]).await.map_err(|_| Errno::EPIPE)?;
        let f = tokio::time::timeout(MESSAGE_DMA_TIMEOUT, rx)
            .await
            .map_err(|_| Errno::ETIMEDOUT)?
            .map_err(|_| Errno::EPIPE)?;
        if f.header.command != command as u16 {
            return Err(Errno::EPROTO);
        }
        Ok(f)
    }
    .await;
    lock_pending(pending).remove(&id);
    outcome
}

/// The errno of an error reply (EIO if the client sent none).
fn reply_errno(f: &Frame) -> Option<Errno> {
    f.error().map(|e| {
        if e == 0 {
            Errno::EIO
        } else {
            Errno::from_raw(e as i32)
        }
    })
}

/// Sends our DMA_READ / DMA_WRITE requests for fd-less maps and hands back the client's answer.
///
/// Before the first one it learns how the client lays these messages out
/// ([`vfu_protocol::dma`]): the specification's layout, or QEMU 10.1's, whose DMA_READ replies
/// can parse as the specification's with the data shifted by four bytes. The answer holds for
/// the whole connection.
async fn message_dma_loop(
    name: String,
    mut port: mpsc::Receiver<MessageDmaRequest>,
    writer: Arc<Writer>,
    pending: Pending,
    next_id: Arc<AtomicU16>,
) {
    let mut layout: Option<DmaLayout> = None;
    while let Some(req) = port.recv().await {
        let (command, address, count) = match &req {
            MessageDmaRequest::Read { iova, len, .. } => (Command::DmaRead, *iova, u64::from(*len)),
            MessageDmaRequest::Write { iova, data, .. } => {
                (Command::DmaWrite, *iova, data.len() as u64)
            }
        };
        let outcome: Result<Vec<u8>, Errno> = async {
            let layout = match layout {
                Some(l) => l,
                None => {
                    let probe = dma::probe_request(address);
                    let f = exchange(&writer, &pending, &next_id, Command::DmaWrite, &probe).await?;
                    let answer = if f.error().is_some() {
                        None
                    } else {
                        Some(&f.payload[..])
                    };
                    let l = dma::classify_probe_reply(address, answer).map_err(|e| {
                        tracing::warn!(device = %name, error = %e, "unrecognized answer to the DMA layout probe");
                        Errno::EPROTO
                    })?;
                    if l == DmaLayout::Spec {
                        tracing::info!(device = %name, layout = %l, "client's DMA_READ/DMA_WRITE layout");
                    } else {
                        tracing::warn!(device = %name, layout = %l, "client uses QEMU 10.1's DMA_READ/DMA_WRITE layout, not the specification's; adapting");
                    }
                    *layout.insert(l)
                }
            };
            let payload = match &req {
                MessageDmaRequest::Read { iova, len, .. } => dma::read_request(*iova, *len),
                MessageDmaRequest::Write { iova, data, .. } => layout.write_request(*iova, data),
            };
            let f = exchange(&writer, &pending, &next_id, command, &payload).await?;
            if let Some(e) = reply_errno(&f) {
                return Err(e);
            }
            let checked = match command {
                Command::DmaRead => layout
                    .read_reply_data(&f.payload, address, count)
                    .map(<[u8]>::to_vec),
                _ => layout
                    .check_write_reply(&f.payload, address, count)
                    .map(|()| Vec::new()),
            };
            checked.map_err(|e| {
                tracing::warn!(device = %name, %command, error = %e, "malformed reply to message DMA");
                Errno::EPROTO
            })
        }
        .await;
        if let Err(e) = &outcome {
            tracing::warn!(device = %name, %command, iova = format_args!("{address:#x}"), error = %e, "message DMA failed");
        }
        match req {
            MessageDmaRequest::Read { reply, .. } => {
                let _ = reply.send(outcome);
            }
            MessageDmaRequest::Write { reply, .. } => {
                let _ = reply.send(outcome.map(|_| ()));
            }
        }
    }
}

/// What a successful command answers.
enum Answer {
    /// A payload and at most one fd.
    Payload {
        payload: Vec<u8>,
        fd: Option<Arc<std::os::fd::OwnedFd>>,
    },
    /// The payload is already in the dispatcher's reply buffer, after room for the header:
    /// the small REGION_READ / REGION_WRITE replies of the MMIO hot path, built without
    /// allocating.
    Buffered,
}

impl Answer {
    fn empty() -> Answer {
        Answer::bytes(Vec::new())
    }
    fn bytes(payload: Vec<u8>) -> Answer {
        Answer::Payload { payload, fd: None }
    }
}

/// Largest reply buffer kept between messages; a bigger one (a large REGION_READ) is freed
/// after its reply so an idle connection does not hold megabytes.
const KEPT_REPLY_BUFFER: usize = 64 * 1024;

struct Dispatcher {
    name: String,
    device: Arc<dyn Device>,
    limits: ServerLimits,
    negotiated: Option<Negotiated>,
    memory: Option<Arc<GuestMemory>>,
    writer: Arc<Writer>,
    pending: Pending,
    next_id: Arc<AtomicU16>,
    dma_task: Option<tokio::task::JoinHandle<()>>,
    messages: u64,
    error_replies: u64,
    stats: Arc<DeviceStats>,
    /// The device's regions, read once: regions do not change while a device is served, and
    /// every REGION_READ / REGION_WRITE checks against them.
    regions: Vec<Option<RegionDescription>>,
    /// Reply buffer reused across messages (see [`Answer::Buffered`]).
    out: Vec<u8>,
}

impl Dispatcher {
    async fn reply(&mut self, header: &Header, outcome: Result<Answer, Errno>) -> io::Result<()> {
        if header.flags & FLAG_NO_REPLY != 0 {
            if let Err(e) = outcome {
                self.stats.count_error(header.command);
                tracing::debug!(device = %self.name, command = header.command, error = %e, "posted command failed");
            }
            return Ok(());
        }
        match outcome {
            Ok(Answer::Payload { payload, fd }) => {
                let bytes = reply::ok(header, &[&payload]);
                match &fd {
                    Some(fd) => self.writer.send(&bytes, &[fd.as_fd()]).await,
                    None => self.writer.send(&bytes, &[]).await,
                }
            }
            Ok(Answer::Buffered) => {
                let reply_header = Header {
                    msg_id: header.msg_id,
                    command: header.command,
                    msg_size: self.out.len() as u32,
                    flags: FLAG_TYPE_REPLY,
                    error: 0,
                };
                self.out[..HEADER_SIZE].copy_from_slice(reply_header.as_bytes());
                let sent = self.writer.send(&self.out, &[]).await;
                if self.out.capacity() > KEPT_REPLY_BUFFER {
                    self.out = Vec::new();
                }
                sent
            }
            Err(e) => {
                self.error_replies += 1;
                self.stats.count_error(header.command);
                self.writer
                    .send(&frame::encode_error_reply(header, e as i32), &[])
                    .await
            }
        }
    }

    /// The description of region `index`, if the device has it.
    fn region_description(&self, index: u32) -> Result<&RegionDescription, Errno> {
        self.regions
            .get(index as usize)
            .and_then(Option::as_ref)
            .ok_or(Errno::EINVAL)
    }

    /// Starts a buffered reply of `payload_len` bytes; returns the payload part to fill.
    fn buffered_payload(&mut self, payload_len: usize) -> &mut [u8] {
        self.out.clear();
        self.out.resize(HEADER_SIZE + payload_len, 0);
        &mut self.out[HEADER_SIZE..]
    }

    async fn handle(&mut self, f: Frame) -> io::Result<()> {
        self.messages += 1;
        self.stats.count_message(f.header.command);
        let header = f.header;
        tracing::debug!(
            msg_id = header.msg_id,
            command = Command::from_u16(header.command).map_or("unknown", Command::name),
            size = header.msg_size,
            fds = f.fds.len(),
            "message"
        );
        let outcome = if f.kind() != FLAG_TYPE_COMMAND && f.kind() != FLAG_TYPE_REPLY {
            Err(Errno::EINVAL)
        } else {
            let max_xfer = self.limits.max_data_xfer_size;
            match Request::parse(f, max_xfer) {
                Ok(req) => self.execute(req, &header).await,
                Err(e) => {
                    tracing::debug!(device = %self.name, msg_id = header.msg_id, error = %e, "rejected a malformed command");
                    Err(e.errno())
                }
            }
        };
        self.reply(&header, outcome).await
    }

    fn memory(&self) -> Result<&Arc<GuestMemory>, Errno> {
        self.memory.as_ref().ok_or(Errno::EINVAL)
    }

    async fn execute(&mut self, req: Request, header: &Header) -> Result<Answer, Errno> {
        let command = req.command();
        if self.negotiated.is_none() && command != Command::Version {
            tracing::debug!(device = %self.name, %command, "command before VERSION");
            return Err(Errno::EINVAL);
        }
        match req {
            Request::Version(offer) => {
                if self.negotiated.is_some() {
                    tracing::debug!(device = %self.name, "second VERSION rejected");
                    return Err(Errno::EINVAL);
                }
                let n = negotiate::negotiate(&offer, &self.limits).map_err(|e| {
                    tracing::warn!(device = %self.name, error = %e, "VERSION rejected");
                    Errno::EINVAL
                })?;
                let memory = Arc::new(GuestMemory::new(n.max_dma_maps as usize));
                let (tx, rx) = mpsc::channel(16);
                memory.set_message_port(Some((
                    tx,
                    n.client_max_data_xfer_size
                        .min(self.limits.max_data_xfer_size),
                )));
                self.dma_task = Some(tokio::spawn(
                    message_dma_loop(
                        self.name.clone(),
                        rx,
                        Arc::clone(&self.writer),
                        Arc::clone(&self.pending),
                        Arc::clone(&self.next_id),
                    )
                    .in_current_span(),
                ));
                self.device.attach(Arc::clone(&memory));
                self.stats.client_memory(&memory);
                self.memory = Some(memory);
                tracing::info!(
                    device = %self.name,
                    version = format_args!("{}.{}", n.reply.major, n.reply.minor),
                    client_max_msg_fds = n.client_max_msg_fds,
                    client_max_data_xfer_size = n.client_max_data_xfer_size,
                    max_dma_maps = n.max_dma_maps,
                    write_multiple = n.write_multiple,
                    "negotiated"
                );
                let payload = n.reply.encode();
                self.negotiated = Some(n);
                Ok(Answer::bytes(payload))
            }
            Request::DmaMap { map, fd } => {
                tracing::debug!(
                    device = %self.name,
                    iova = format_args!("{:#x}", map.address),
                    size = format_args!("{:#x}", map.size),
                    flags = map.flags,
                    backing = if fd.is_some() { "fd" } else { "message" },
                    "DMA_MAP"
                );
                let prot = DmaProt::from_map_flags(map.flags);
                if !prot.read && !prot.write {
                    return Err(Errno::EINVAL);
                }
                let memory = Arc::clone(self.memory()?);
                let region = match fd {
                    Some(fd) => memory
                        .with_table(|t| t.map_fd(map.address, map.size, prot, &fd, map.offset)),
                    None => Ok(DmaRegion::new(
                        map.address,
                        map.size,
                        prot,
                        DmaBacking::Message,
                    )),
                }
                .map_err(|e| {
                    tracing::debug!(device = %self.name, error = %e, "DMA_MAP failed");
                    e.errno()
                })?;
                let (iova, size) = (map.address, map.size);
                let replaced = memory.with_table(|t| t.insert(region)).map_err(|e| {
                    tracing::debug!(device = %self.name, error = %e, "DMA_MAP rejected");
                    e.errno()
                })?;
                if let Some(old) = replaced {
                    self.invalidate_atc(std::slice::from_ref(&old), false).await;
                    old.drained().await;
                    self.device.dma_unmapped(&old).map_err(|e| e.errno())?;
                }
                let added = memory.with_table(|t| t.get(iova)).ok_or(Errno::EIO)?;
                if let Err(e) = self.device.dma_mapped(&added) {
                    tracing::warn!(device = %self.name, iova = format_args!("{iova:#x}"), size, error = %e, "device refused a DMA map");
                    if let Ok(r) = memory.with_table(|t| t.remove(iova, size)) {
                        self.invalidate_atc(std::slice::from_ref(&r), false).await;
                        r.drained().await;
                    }
                    return Err(e.errno());
                }
                Ok(Answer::empty())
            }
            Request::DmaUnmap(unmap) => {
                let memory = Arc::clone(self.memory()?);
                let removed = if unmap.flags & wire::DMA_UNMAP_FLAG_ALL != 0 {
                    memory.with_table(|t| t.remove_all())
                } else {
                    vec![memory
                        .with_table(|t| t.remove(unmap.address, unmap.size))
                        .map_err(|e| {
                            tracing::debug!(device = %self.name, error = %e, "DMA_UNMAP rejected");
                            e.errno()
                        })?]
                };
                // The spec requires every reference, in-flight DMA included, gone before the reply.
                // The removed maps are the device-TLB invalidation of shadow mode: the device's
                // ATC drops its translations of them and completes once DMA using them ended.
                let all = unmap.flags & wire::DMA_UNMAP_FLAG_ALL != 0;
                self.invalidate_atc(&removed, all).await;
                let mut failed = None;
                for r in removed {
                    r.drained().await;
                    if let Err(e) = self.device.dma_unmapped(&r) {
                        failed.get_or_insert(e.errno());
                    }
                }
                if let Some(errno) = failed {
                    return Err(errno);
                }
                Ok(Answer::bytes(unmap.as_bytes().to_vec()))
            }
            Request::DeviceGetInfo { argsz } => {
                if argsz < 16 {
                    return Err(Errno::EINVAL);
                }
                let info = self.device.info();
                Ok(Answer::bytes(
                    wire::DeviceInfo {
                        argsz: 16,
                        flags: info.flags,
                        num_regions: info.num_regions,
                        num_irqs: info.num_irqs,
                    }
                    .as_bytes()
                    .to_vec(),
                ))
            }
            Request::DeviceGetRegionInfo { argsz, index } => {
                if argsz < 32 {
                    return Err(Errno::EINVAL);
                }
                let spec = self.device.region(index).ok_or(Errno::EINVAL)?;
                let mut description = spec.description;
                let takes_fds = self
                    .negotiated
                    .as_ref()
                    .is_some_and(|n| n.client_max_msg_fds >= 1);
                if !takes_fds && description.flags & wire::REGION_FLAG_MMAP != 0 {
                    // A client that accepts no fds cannot mmap: describe the region as trapped.
                    description.flags &= !wire::REGION_FLAG_MMAP;
                    description
                        .caps
                        .retain(|c| !matches!(c, reply::RegionCap::SparseMmap(_)));
                }
                let (payload, with_caps) = reply::region_info(argsz, &description);
                let fd = if with_caps && description.flags & wire::REGION_FLAG_MMAP != 0 {
                    spec.fd
                } else {
                    None
                };
                Ok(Answer::Payload { payload, fd })
            }
            Request::DeviceGetRegionIoFds { argsz, index } => {
                if argsz < 16 {
                    return Err(Errno::EINVAL);
                }
                self.device.region(index).ok_or(Errno::EINVAL)?;
                Ok(Answer::bytes(
                    wire::RegionIoFds {
                        argsz: 16,
                        flags: 0,
                        index,
                        count: 0,
                    }
                    .as_bytes()
                    .to_vec(),
                ))
            }
            Request::DeviceGetIrqInfo { argsz, index } => {
                if argsz < 16 {
                    return Err(Errno::EINVAL);
                }
                let (flags, count) = self.device.irq_info(index).ok_or(Errno::EINVAL)?;
                Ok(Answer::bytes(
                    wire::IrqInfo {
                        argsz: 16,
                        flags,
                        index,
                        count,
                    }
                    .as_bytes()
                    .to_vec(),
                ))
            }
            Request::DeviceSetIrqs(req) => {
                self.device.set_irqs(req).map_err(|e| {
                    tracing::debug!(device = %self.name, error = %e, "SET_IRQS rejected");
                    e.errno()
                })?;
                Ok(Answer::empty())
            }
            Request::RegionRead {
                region,
                offset,
                count,
            } => {
                let description = self.region_description(region)?;
                check_region_access(description, offset, count as usize, false).map_err(|e| {
                    tracing::debug!(device = %self.name, error = %e, "REGION_READ rejected");
                    e.errno()
                })?;
                let prefix = wire::RegionAccess {
                    offset,
                    region,
                    count,
                };
                let device = Arc::clone(&self.device);
                let payload =
                    self.buffered_payload(size_of::<wire::RegionAccess>() + count as usize);
                let (head, data) = payload.split_at_mut(size_of::<wire::RegionAccess>());
                head.copy_from_slice(prefix.as_bytes());
                device
                    .region_read(region, offset, data)
                    .map_err(|e| e.errno())?;
                Ok(Answer::Buffered)
            }
            Request::RegionWrite {
                region,
                offset,
                data,
            } => {
                self.region_write(region, offset, &data)?;
                let prefix = wire::RegionAccess {
                    offset,
                    region,
                    count: data.len() as u32,
                };
                self.buffered_payload(size_of::<wire::RegionAccess>())
                    .copy_from_slice(prefix.as_bytes());
                Ok(Answer::Buffered)
            }
            Request::DeviceReset => {
                // Reset may wait for the device's running job to stop; that job needs a worker
                // thread to be cancelled on, so the wait must not occupy one.
                let device = Arc::clone(&self.device);
                tokio::task::spawn_blocking(move || device.reset())
                    .await
                    .map_err(|_| Errno::EIO)?
                    .map_err(|e| {
                        tracing::warn!(device = %self.name, error = %e, "reset failed");
                        e.errno()
                    })?;
                tracing::info!(device = %self.name, "device reset");
                Ok(Answer::empty())
            }
            Request::RegionWriteMulti(writes) => {
                if !self.negotiated.as_ref().is_some_and(|n| n.write_multiple) {
                    return Err(Errno::EINVAL);
                }
                let done = self.write_multi(&writes)?;
                Ok(Answer::bytes(done.as_bytes().to_vec()))
            }
            Request::DeviceFeature { flags, .. } => {
                tracing::debug!(device = %self.name, feature = flags & wire::DEVICE_FEATURE_MASK, "DEVICE_FEATURE not supported");
                let _ = header;
                Err(Errno::ENOTSUP)
            }
            Request::MigDataRead { .. } | Request::MigDataWrite { .. } => Err(Errno::ENOTSUP),
        }
    }

    /// Invalidates the device's ATC for maps that left the table (everything for UNMAP_ALL)
    /// and waits for the device's completion.
    async fn invalidate_atc(&self, removed: &[Arc<DmaRegion>], all: bool) {
        let requester = RequesterId::default();
        let invalidations: Vec<_> = if all {
            vec![AtcInvalidation::all(requester)]
        } else {
            removed
                .iter()
                .map(|r| AtcInvalidation::range(requester, InvalidationRange::new(r.iova, r.size)))
                .collect()
        };
        for invalidation in invalidations {
            let done = self.device.invalidate_atc(&invalidation).await;
            if done.entries_removed > 0 || done.waited_for_dma {
                tracing::debug!(
                    device = %self.name,
                    first = format_args!("{:#x}", invalidation.range.first),
                    last = format_args!("{:#x}", invalidation.range.last),
                    entries = done.entries_removed,
                    waited_for_dma = done.waited_for_dma,
                    "ATC invalidated"
                );
            }
        }
    }

    fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let description = self.region_description(region)?;
        check_region_access(description, offset, data.len(), true).map_err(|e| {
            tracing::debug!(device = %self.name, error = %e, "REGION_WRITE rejected");
            e.errno()
        })?;
        self.device
            .region_write(region, offset, data)
            .map_err(|e| e.errno())
    }

    /// Applies writes in order and stops at the first failure; a failure before any write
    /// succeeded is an error reply, otherwise the count done is the answer.
    fn write_multi(&self, writes: &[MultiWrite]) -> Result<u64, Errno> {
        let mut done = 0u64;
        for w in writes {
            match self.region_write(w.region, w.offset, &w.data) {
                Ok(()) => done += 1,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    /// Detaches the device off the worker threads, for the same reason as reset.
    async fn detach_device(&self) {
        let device = Arc::clone(&self.device);
        if tokio::task::spawn_blocking(move || device.detach())
            .await
            .is_err()
        {
            tracing::error!(device = %self.name, "detaching the device panicked");
        }
    }

    /// Drops everything the client gave us; the device keeps its own state.
    async fn teardown(&mut self) {
        if let Some(memory) = self.memory.take() {
            memory.set_message_port(None);
            if let Some(t) = self.dma_task.take() {
                t.abort();
                let _ = t.await;
            }
            lock_pending(&self.pending).clear();
            let regions = memory.with_table(|t| t.remove_all());
            let count = regions.len();
            for r in regions {
                if tokio::time::timeout(Duration::from_secs(5), r.drained())
                    .await
                    .is_err()
                {
                    tracing::error!(device = %self.name, iova = format_args!("{:#x}", r.iova), "in-flight DMA did not drain within 5 s");
                }
                // A failure is logged by the device, which unmaps everything on detach.
                let _ = self.device.dma_unmapped(&r);
            }
            self.detach_device().await;
            tracing::debug!(device = %self.name, maps = count, "DMA maps released");
        } else {
            self.detach_device().await;
        }
    }
}

/// Serves one client until it leaves, the stream breaks, or the daemon shuts down.
pub async fn serve(
    name: &str,
    stream: UnixStream,
    device: Arc<dyn Device>,
    limits: &ServerLimits,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<DeviceStats>,
) -> ConnectionSummary {
    let stream = Arc::new(stream);
    let regions = (0..device.info().num_regions.min(MAX_REGIONS))
        .map(|i| device.region(i).map(|spec| spec.description))
        .collect();
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let (queue_tx, mut queue) = mpsc::channel(COMMAND_QUEUE);
    let frame_limits = FrameLimits::for_xfer_size(limits.max_data_xfer_size, limits.max_msg_fds);
    let reader = tokio::spawn(read_loop(
        Arc::clone(&stream),
        frame_limits,
        queue_tx,
        Arc::clone(&pending),
    ));
    let mut d = Dispatcher {
        name: name.to_string(),
        device,
        limits: limits.clone(),
        negotiated: None,
        memory: None,
        writer: Arc::new(Writer {
            stream: Arc::clone(&stream),
            lock: tokio::sync::Mutex::new(()),
        }),
        pending,
        next_id: Arc::new(AtomicU16::new(0)),
        dma_task: None,
        messages: 0,
        error_replies: 0,
        stats,
        regions,
        out: Vec::new(),
    };
    let end = loop {
        let inbound = tokio::select! {
            i = queue.recv() => i,
            _ = shutdown.wait_for(|s| *s) => break EndReason::Shutdown,
        };
        let result = match inbound {
            None => break EndReason::ClientClosed,
            Some(Inbound::End(why)) => break why,
            Some(Inbound::Command(f)) => d.handle(f).await,
            Some(Inbound::Rejected(h, why)) => {
                d.messages += 1;
                d.stats.count_message(h.command);
                tracing::debug!(device = %d.name, msg_id = h.msg_id, command = h.command, size = h.msg_size, ?why, "rejected while framing");
                d.reply(&h, Err(why.errno())).await
            }
        };
        if let Err(e) = result {
            break EndReason::Socket(e.to_string());
        }
    };
    reader.abort();
    let _ = reader.await;
    d.teardown().await;
    ConnectionSummary {
        messages: d.messages,
        error_replies: d.error_replies,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceError, DeviceInfo, RegionSpec};
    use vfu_protocol::client::{Client, ClientOptions};
    use vfu_protocol::request::SetIrqsRequest;

    /// Records DMA notifications and refuses maps at [`REFUSED_IOVA`].
    #[derive(Default)]
    struct FakeDevice {
        events: Mutex<Vec<String>>,
    }

    const REFUSED_IOVA: u64 = 0xbad000;

    impl FakeDevice {
        fn log(&self, e: String) {
            self.events.lock().unwrap().push(e);
        }
    }

    impl Device for FakeDevice {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                flags: wire::DEVICE_FLAG_PCI,
                num_regions: 9,
                num_irqs: 5,
            }
        }
        fn region(&self, _index: u32) -> Option<RegionSpec> {
            None
        }
        fn region_read(&self, index: u32, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Err(DeviceError::CheckRegion { index })
        }
        fn region_write(&self, index: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Err(DeviceError::CheckRegion { index })
        }
        fn irq_info(&self, _index: u32) -> Option<(u32, u32)> {
            None
        }
        fn set_irqs(&self, _request: SetIrqsRequest) -> Result<(), DeviceError> {
            Err(DeviceError::Unsupported)
        }
        fn reset(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn attach(&self, _memory: Arc<GuestMemory>) {
            self.log("attach".into());
        }
        fn detach(&self) {
            self.log("detach".into());
        }
        fn dma_mapped(&self, region: &DmaRegion) -> Result<(), DeviceError> {
            if region.iova == REFUSED_IOVA {
                return Err(DeviceError::Unsupported);
            }
            self.log(format!("map {:#x}", region.iova));
            Ok(())
        }
        fn dma_unmapped(&self, region: &DmaRegion) -> Result<(), DeviceError> {
            self.log(format!("unmap {:#x}", region.iova));
            Ok(())
        }
    }

    #[test]
    fn dma_notifications_roll_back_refused_maps_and_follow_the_client() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let device = Arc::new(FakeDevice::default());
        let served = Arc::clone(&device);
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                theirs.set_nonblocking(true).unwrap();
                let stream = UnixStream::from_std(theirs).unwrap();
                let (_tx, rx) = watch::channel(false);
                let stats = Arc::new(DeviceStats::new());
                serve("fake", stream, served, &ServerLimits::default(), rx, stats).await
            })
        });
        let mut c = Client::from_stream(ours, ClientOptions::default()).unwrap();
        c.negotiate().unwrap();
        let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
        c.dma_map(0x1000, 0x1000, rw, None).unwrap();
        let refused = c.dma_map(REFUSED_IOVA, 0x1000, rw, None).unwrap_err();
        assert_eq!(refused.server_errno(), Some(Errno::ENOTSUP));
        // The refused map was rolled back: it cannot be unmapped, and the range is free again.
        assert_eq!(
            c.dma_unmap(REFUSED_IOVA, 0x1000, 0)
                .unwrap_err()
                .server_errno(),
            Some(Errno::ENOENT)
        );
        c.dma_map(0x2000, 0x1000, rw, None).unwrap();
        c.dma_unmap(0x1000, 0x1000, 0).unwrap();
        drop(c);
        let summary = server.join().unwrap();
        assert_eq!(summary.end, EndReason::ClientClosed);
        let events = device.events.lock().unwrap().clone();
        assert_eq!(
            events,
            [
                "attach",
                "map 0x1000",
                "map 0x2000",
                "unmap 0x1000",
                "unmap 0x2000",
                "detach"
            ]
        );
    }
    /// Serves `messages` small REGION_READs and posted REGION_WRITEs on one connection, with the
    /// whole server (reader and dispatcher) on one thread; returns the heap allocations that
    /// thread made, connection setup and teardown included.
    fn server_allocations(messages: usize) -> u64 {
        use crate::device::emulated::ats_dma::regs::PATTERN;
        use crate::device::emulated::AtsDma;
        use crate::pci::PolicyRequest;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let device: Arc<dyn Device> = Arc::new(AtsDma::new(&PolicyRequest::new("alloc")).unwrap());
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            allocation_counter::measure(|| {
                rt.block_on(async move {
                    theirs.set_nonblocking(true).unwrap();
                    let stream = UnixStream::from_std(theirs).unwrap();
                    let (_tx, rx) = watch::channel(false);
                    let stats = Arc::new(DeviceStats::new());
                    serve("alloc", stream, device, &ServerLimits::default(), rx, stats).await;
                })
            })
            .count_total
        });
        let mut c = Client::from_stream(ours, ClientOptions::default()).unwrap();
        c.negotiate().unwrap();
        for i in 0..messages {
            // Config space (region 7) and a BAR0 register without side effects (PATTERN).
            c.read_u32(7, 0).unwrap();
            c.region_write_posted(0, PATTERN, &(i as u32).to_le_bytes())
                .unwrap();
        }
        c.read_u32(0, PATTERN).unwrap();
        drop(c);
        server.join().unwrap()
    }

    #[test]
    fn small_region_reads_and_writes_do_not_allocate_per_message() {
        // The same connection twice, with 10,000 more messages the second time: whatever the
        // difference is, it was spent on those messages.
        let base = server_allocations(500);
        let more = server_allocations(10_500);
        let per_message = more.saturating_sub(base) as f64 / 20_000.0;
        assert!(
            per_message < 0.01,
            "{per_message} heap allocations per small REGION_READ / REGION_WRITE \
             ({base} for 1,000 messages, {more} for 21,000)"
        );
    }
}
