//! Negative end-to-end tests: a hostile or broken client against the real `vfud` binary.
//!
//! Every test does one hostile thing and asserts the exact outcome: an error reply with a
//! specific errno (after which the same connection must still be in sync), or a clean close of
//! that connection. Every test ends with [`Daemon::assert_serving`], which proves the daemon
//! survived and serves a fresh client. The daemon serves one client at a time, so each test
//! drops its clients before that final check.
//!
//! Messages the typed client cannot produce are built with [`frame::encode`] and sent with
//! [`Client::send_raw`]; their msg_ids start at [`RAW_ID`], far from the client's own ids.

use std::fmt::Debug;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use vfu_protocol::client::{Client, ClientError, ClientOptions};
use vfu_protocol::command::irq;
use vfu_protocol::frame::{self, Frame};
use vfu_protocol::negotiate::{Capabilities, VersionPayload};
use vfu_protocol::wire::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, FLAG_ERROR, FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND, FLAG_TYPE_MASK, FLAG_TYPE_REPLY, HEADER_SIZE, IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use vfu_protocol::Command;
use vfud_tests::ats_dma::{
    self, ERR_DMA_FAULT, ERR_NONE, ERR_NO_CLIENT, OP_FILL, STATUS_DONE, STATUS_ERROR,
};
use vfud_tests::{eventfd, readable_within, wait_eventfd, Daemon, GuestRam};

/// BAR0 of ats-dma: registers, MSI-X table and PBA.
const BAR0: u32 = 0;
const BAR0_SIZE: u64 = 0x4000;
/// MSI-X vectors of ats-dma.
const MSIX_VECTORS: u32 = 4;
/// The server's advertised limits.
const MAX_DATA_XFER: u32 = 1 << 20;
const MAX_MSG_FDS: usize = 16;
const DMA_RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const ASSIGN_EVENTFDS: u32 = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
/// First msg_id of hand-built messages.
const RAW_ID: u16 = 0x8000;

// ---------------------------------------------------------------------------------------------
// Payload builders (host-endian, as the protocol requires).

/// REGION_READ / REGION_WRITE prefix.
fn access(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend(region.to_ne_bytes());
    p.extend(count.to_ne_bytes());
    p
}

/// DMA_MAP request.
fn dma_map_payload(iova: u64, size: u64, flags: u32, offset: u64) -> Vec<u8> {
    let mut p = 32u32.to_ne_bytes().to_vec();
    p.extend(flags.to_ne_bytes());
    p.extend(offset.to_ne_bytes());
    p.extend(iova.to_ne_bytes());
    p.extend(size.to_ne_bytes());
    p
}

/// DEVICE_GET_INFO request.
fn get_info_payload() -> Vec<u8> {
    let mut p = 16u32.to_ne_bytes().to_vec();
    p.extend([0u8; 12]);
    p
}

/// A header-only command with a chosen msg_size, which may lie about the payload.
fn header(msg_id: u16, command: u16, msg_size: u32) -> Vec<u8> {
    let mut h = frame::encode(msg_id, command, FLAG_TYPE_COMMAND, 0, &[]);
    h[4..8].copy_from_slice(&msg_size.to_ne_bytes());
    h
}

// ---------------------------------------------------------------------------------------------
// Daemon and assertions.

/// Asserts that `r` is the server's error reply carrying `errno`.
#[track_caller]
fn expect_errno<T: Debug>(r: Result<T, ClientError>, errno: Errno) {
    match r {
        Err(e) => assert_eq!(
            e.server_errno(),
            Some(errno),
            "expected an error reply with {errno}, got {e:?}"
        ),
        Ok(v) => panic!("expected an error reply with {errno}, got success: {v:?}"),
    }
}

/// Receives the next frame and asserts it is a reply to (`msg_id`, `command`).
#[track_caller]
fn next_reply(c: &mut Client, msg_id: u16, command: u16) -> Frame {
    let f = c
        .recv_frame()
        .unwrap_or_else(|e| panic!("waiting for the reply to message {msg_id}: {e:?}"));
    assert!(f.is_reply(), "expected a reply, got {:?}", f.header);
    assert_eq!(
        (f.header.msg_id, f.header.command),
        (msg_id, command),
        "the next frame answers another message: {:?}",
        f.header
    );
    f
}

/// Receives the next frame and asserts it is the header-only error reply to (`msg_id`,
/// `command`) with `errno`; for messages the typed client cannot wait for (unknown commands).
#[track_caller]
fn expect_error_frame(c: &mut Client, msg_id: u16, command: u16, errno: Errno) {
    let f = next_reply(c, msg_id, command);
    assert_eq!(f.error(), Some(errno as u32), "reply {:?}", f.header);
    assert!(f.payload.is_empty(), "an error reply must be header-only");
    assert!(f.fds.is_empty());
}

/// Asserts that the connection is in sync: a GET_INFO sent now is answered successfully by the
/// very next frame.
#[track_caller]
fn assert_in_sync(c: &mut Client) {
    let id = c
        .send(Command::DeviceGetInfo, false, &[&get_info_payload()], &[])
        .expect("sending DEVICE_GET_INFO");
    let f = next_reply(c, id, Command::DeviceGetInfo as u16);
    assert_eq!(f.error(), None, "DEVICE_GET_INFO failed: {:?}", f.header);
    assert_eq!(f.payload.len(), 16);
    let num_regions = u32::from_ne_bytes(f.payload[8..12].try_into().unwrap());
    assert_eq!(num_regions, 9);
}

/// Asserts that the server closed the connection without sending anything more.
#[track_caller]
fn expect_closed(c: &mut Client) {
    match c.recv_frame() {
        Err(ClientError::Closed) => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

/// Asserts that the daemon log contains `needle` (call after `assert_serving`, which orders the
/// previous connection's log lines before it).
#[track_caller]
fn assert_logged(d: &Daemon, needle: &str) {
    let log = d.log_text();
    assert!(
        log.contains(needle),
        "the daemon log lacks {needle:?}:\n{log}"
    );
}

/// Deterministic pseudo-random bytes (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Framing and command numbers.

#[test]
fn unknown_commands_get_enosys_and_the_connection_survives() {
    let mut d = Daemon::start();
    let mut c = d.client();
    // 14 is the removed DIRTY_PAGES; 0 and 0xffff are not commands either.
    let cases: [(u16, &[u8]); 5] = [
        (99, &[]),
        (99, &[1, 2, 3, 4, 5, 6, 7, 8]),
        (14, &[]),
        (0, &[]),
        (0xffff, &[0; 32]),
    ];
    for (i, (command, payload)) in cases.into_iter().enumerate() {
        let id = RAW_ID + i as u16;
        c.send_raw(
            &frame::encode(id, command, FLAG_TYPE_COMMAND, 0, &[payload]),
            &[],
        )
        .unwrap();
        expect_error_frame(&mut c, id, command, Errno::ENOSYS);
        assert_in_sync(&mut c);
    }
    drop(c);
    d.assert_serving();
}

#[test]
fn msg_size_below_the_header_closes_the_connection() {
    let mut d = Daemon::start();
    for size in [0u32, 8, 15] {
        let mut c = d.client();
        c.send_raw(&header(RAW_ID, Command::DeviceGetInfo as u16, size), &[])
            .unwrap();
        expect_closed(&mut c);
        drop(c);
        d.assert_serving();
    }
    assert_logged(&d, "smaller than the 16-byte header");
}

#[test]
fn message_beyond_the_negotiated_maximum_gets_e2big_and_the_stream_stays_in_sync() {
    let mut d = Daemon::start();
    let mut c = d.client();
    // The whole oversized payload is really sent: the server must read and discard it.
    let data = vec![0xa5u8; (2 << 20) + 8];
    let bytes = frame::encode(
        RAW_ID,
        Command::RegionWrite as u16,
        FLAG_TYPE_COMMAND,
        0,
        &[&access(BAR0, 0, data.len() as u32), &data],
    );
    c.send_raw(&bytes, &[]).unwrap();
    expect_error_frame(&mut c, RAW_ID, Command::RegionWrite as u16, Errno::E2BIG);
    assert_in_sync(&mut c);

    // At the data-count boundary: one byte over the maximum frames fine but is E2BIG; exactly
    // the maximum is accepted as a size and fails only the range check of the 16 KiB BAR.
    let over = vec![0u8; MAX_DATA_XFER as usize + 1];
    expect_errno(c.region_write(BAR0, 0, &over), Errno::E2BIG);
    assert_in_sync(&mut c);
    expect_errno(
        c.region_write(BAR0, 0, &over[..MAX_DATA_XFER as usize]),
        Errno::EINVAL,
    );
    assert_in_sync(&mut c);
    drop(c);
    d.assert_serving();
}

#[test]
fn truncated_message_then_close_is_survived() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let bytes = frame::encode(
        RAW_ID,
        Command::RegionWrite as u16,
        FLAG_TYPE_COMMAND,
        0,
        &[&[0u8; 84]],
    );
    assert_eq!(bytes.len(), 100);
    c.send_raw(&bytes[..10], &[]).unwrap();
    drop(c);
    d.assert_serving();
    assert_logged(&d, "mid-message");
}

// ---------------------------------------------------------------------------------------------
// Negotiation and reply discipline.

#[test]
fn version_is_required_first_and_only_once() {
    let mut d = Daemon::start();
    let mut c = d.client();
    expect_errno(c.negotiate().map(|_| ()), Errno::EINVAL);
    assert_in_sync(&mut c);
    drop(c);

    let mut c = d.raw_client();
    expect_errno(
        c.call(Command::DeviceGetInfo, &[&get_info_payload()], &[]),
        Errno::EINVAL,
    );
    // A rejected VERSION does not count as negotiated either.
    let bad = VersionPayload {
        major: 1,
        minor: 0,
        caps: Capabilities::default(),
    };
    expect_errno(
        c.call(Command::Version, &[&bad.encode()], &[]),
        Errno::EINVAL,
    );
    expect_errno(
        c.call(Command::DeviceGetInfo, &[&get_info_payload()], &[]),
        Errno::EINVAL,
    );
    c.negotiate().expect("VERSION after the rejected commands");
    assert_in_sync(&mut c);
    drop(c);
    d.assert_serving();
}

#[test]
fn no_reply_commands_get_no_reply_even_when_they_fail() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let value = 0xdead_beef_u32;
    c.region_write_posted(BAR0, ats_dma::SRC_LO, &value.to_le_bytes())
        .unwrap();
    let id = c
        .send(
            Command::RegionRead,
            false,
            &[&access(BAR0, ats_dma::SRC_LO, 4)],
            &[],
        )
        .unwrap();
    let f = next_reply(&mut c, id, Command::RegionRead as u16);
    assert_eq!(f.error(), None);
    assert_eq!(f.payload.len(), 16 + 4);
    assert_eq!(f.payload[16..], value.to_le_bytes());

    // Failing posted commands: a read past the end, a count of 0, an unknown command.
    c.send(
        Command::RegionRead,
        true,
        &[&access(BAR0, BAR0_SIZE - 2, 4)],
        &[],
    )
    .unwrap();
    c.send(
        Command::RegionWrite,
        true,
        &[&access(BAR0, ats_dma::SRC_LO, 0)],
        &[],
    )
    .unwrap();
    c.send_raw(
        &frame::encode(RAW_ID, 99, FLAG_TYPE_COMMAND | FLAG_NO_REPLY, 0, &[]),
        &[],
    )
    .unwrap();
    assert_in_sync(&mut c);
    assert_eq!(
        c.read_u32(BAR0, ats_dma::SRC_LO).unwrap(),
        value,
        "a failed posted write changed the register"
    );
    drop(c);
    d.assert_serving();
    assert_logged(&d, "posted command failed");
}

#[test]
fn unsolicited_reply_from_the_client_is_ignored() {
    let mut d = Daemon::start();
    let mut c = d.client();
    c.send_raw(
        &frame::encode(
            RAW_ID,
            Command::DmaRead as u16,
            FLAG_TYPE_REPLY,
            0,
            &[&[0u8; 16]],
        ),
        &[],
    )
    .unwrap();
    c.send_raw(
        &frame::encode(
            RAW_ID + 1,
            Command::RegionRead as u16,
            FLAG_TYPE_REPLY | FLAG_ERROR,
            Errno::EIO as u32,
            &[],
        ),
        &[],
    )
    .unwrap();
    assert_in_sync(&mut c);
    drop(c);
    d.assert_serving();
    assert_logged(&d, "dropping a reply to no outstanding request");
}

#[test]
fn unsolicited_reply_refused_while_framing_gets_no_reply_either() {
    let mut d = Daemon::start();
    let mut c = d.client();
    // Too large for the negotiated maximum, and more fds than advertised: both are refused
    // while framing, but a reply must never be answered.
    let data = vec![0u8; MAX_DATA_XFER as usize + 1024];
    c.send_raw(
        &frame::encode(
            RAW_ID,
            Command::DmaRead as u16,
            FLAG_TYPE_REPLY,
            0,
            &[&[0u8; 16], &data],
        ),
        &[],
    )
    .unwrap();
    let ev = eventfd();
    c.send_raw(
        &frame::encode(
            RAW_ID + 1,
            Command::DmaWrite as u16,
            FLAG_TYPE_REPLY,
            0,
            &[&[0u8; 16]],
        ),
        &[ev.as_fd(); MAX_MSG_FDS + 1],
    )
    .unwrap();
    assert_in_sync(&mut c);
    drop(c);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Region accesses and indexes.

#[test]
fn region_read_past_the_region_end_is_einval() {
    let mut d = Daemon::start();
    let mut c = d.client();
    // The last word is readable: the rejections below are about the range, nothing else.
    c.region_read(BAR0, BAR0_SIZE - 4, 4).unwrap();
    for (offset, count) in [
        (BAR0_SIZE - 2, 4),
        (BAR0_SIZE, 1),
        (u64::MAX, 4),
        (u64::MAX - 1, 4),
    ] {
        expect_errno(c.region_read(BAR0, offset, count), Errno::EINVAL);
        assert_in_sync(&mut c);
    }
    drop(c);
    d.assert_serving();
}

#[test]
fn region_access_with_count_zero_is_einval() {
    let mut d = Daemon::start();
    let mut c = d.client();
    expect_errno(c.region_read(BAR0, 0, 0), Errno::EINVAL);
    assert_in_sync(&mut c);
    expect_errno(c.region_write(BAR0, ats_dma::SRC_LO, &[]), Errno::EINVAL);
    assert_in_sync(&mut c);
    drop(c);
    d.assert_serving();
}

#[test]
fn region_read_of_4_gib_is_e2big_without_allocating_it() {
    let mut d = Daemon::start();
    let mut c = d.client();
    for count in [u32::MAX, MAX_DATA_XFER + 1] {
        expect_errno(c.region_read(BAR0, 0, count), Errno::E2BIG);
        assert_in_sync(&mut c);
    }
    let rss = d.rss_kib();
    assert!(rss < 200 * 1024, "daemon RSS is {rss} KiB");
    drop(c);
    d.assert_serving();
}

#[test]
fn region_write_whose_data_does_not_match_count_is_einval() {
    let mut d = Daemon::start();
    let mut c = d.client();
    c.write_u32(BAR0, ats_dma::SRC_LO, 0x1111_1111).unwrap();
    for data_len in [0usize, 3, 5, 8] {
        let data = vec![0x77u8; data_len];
        let id = c
            .send(
                Command::RegionWrite,
                false,
                &[&access(BAR0, ats_dma::SRC_LO, 4), &data],
                &[],
            )
            .unwrap();
        expect_errno(c.wait_reply(id, Command::RegionWrite), Errno::EINVAL);
        assert_in_sync(&mut c);
    }
    // None of the rejected writes reached the register.
    assert_eq!(c.read_u32(BAR0, ats_dma::SRC_LO).unwrap(), 0x1111_1111);
    drop(c);
    d.assert_serving();
}

#[test]
fn nonexistent_regions_and_irq_indexes_are_einval() {
    let mut d = Daemon::start();
    let mut c = d.client();
    // Region 1 exists with size 0 and no access; 9 and beyond do not exist.
    for region in [1, 9, u32::MAX] {
        expect_errno(c.region_read(region, 0, 4), Errno::EINVAL);
        expect_errno(c.region_write(region, 0, &[0; 4]), Errno::EINVAL);
        assert_in_sync(&mut c);
    }
    expect_errno(c.region_info(9), Errno::EINVAL);
    expect_errno(c.irq_info(irq::NUM_PCI), Errno::EINVAL);
    let ev = eventfd();
    for (index, start, count) in [
        (irq::NUM_PCI, 0, 1), // no such index
        (irq::MSI, 0, 2),     // MSI has one vector
        (irq::REQ, 0, 1),     // REQ has none
        (irq::ERR, 0, 2),     // ERR has one
    ] {
        let fds = vec![ev.as_fd(); count as usize];
        expect_errno(
            c.set_irqs(index, ASSIGN_EVENTFDS, start, count, &fds, &[]),
            Errno::EINVAL,
        );
        assert_in_sync(&mut c);
    }
    // MSI is not maskable.
    expect_errno(
        c.set_irqs(
            irq::MSI,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK,
            0,
            1,
            &[],
            &[],
        ),
        Errno::EINVAL,
    );
    assert_in_sync(&mut c);
    drop(c);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// DMA map table.

#[test]
fn overlapping_dma_map_is_eexist_and_adjacent_maps_succeed() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let ram = GuestRam::new(0x40000);
    let at = |offset: u64| Some((ram.fd(), offset));
    c.dma_map(0x10000, 0x10000, DMA_RW, at(0x10000)).unwrap();
    for (iova, size) in [
        (0x18000, 0x10000), // overlaps the tail
        (0x0, 0x20000),     // covers it
        (0x10000, 0x1000),  // same start, smaller
        (0x14000, 0x1000),  // inside
        (0x8000, 0x8001),   // one byte into the head
    ] {
        expect_errno(c.dma_map(iova, size, DMA_RW, at(iova)), Errno::EEXIST);
        assert_in_sync(&mut c);
    }
    c.dma_map(0x20000, 0x1000, DMA_RW, at(0x20000)).unwrap();
    c.dma_map(0xf000, 0x1000, DMA_RW, at(0xf000)).unwrap();

    // A backing file smaller than offset + size must be refused, not mapped (touching the
    // missing pages would SIGBUS the daemon).
    let small = GuestRam::new(0x1000);
    for (size, offset) in [(0x10000, 0), (0x1000, 0x1000)] {
        let r = c.dma_map(0x100000, size, DMA_RW, Some((small.fd(), offset)));
        assert!(
            r.as_ref()
                .err()
                .and_then(ClientError::server_errno)
                .is_some(),
            "mapping {size:#x} bytes at offset {offset:#x} of a 4 KiB memfd: {r:?}"
        );
        assert_in_sync(&mut c);
    }
    // Invalid arguments: no access, undefined flag bits, empty or wrapping ranges, and a file
    // offset that overflows.
    for (iova, size, flags, offset) in [
        (0x200000, 0x1000, 0, 0),
        (0x200000, 0x1000, DMA_RW | 4, 0),
        (0x200000, 0, DMA_RW, 0),
        (u64::MAX - 0xfff, 0x2000, DMA_RW, 0),
        (0x200000, 0x1000, DMA_RW, u64::MAX - 0xfff),
    ] {
        expect_errno(
            c.dma_map(iova, size, flags, Some((ram.fd(), offset))),
            Errno::EINVAL,
        );
        assert_in_sync(&mut c);
    }
    let id = c
        .send(
            Command::DmaMap,
            false,
            &[&dma_map_payload(0x200000, 0x1000, DMA_RW, 0)],
            &[ram.fd(), ram.fd()],
        )
        .unwrap();
    expect_errno(c.wait_reply(id, Command::DmaMap), Errno::EINVAL);
    assert_in_sync(&mut c);
    // The failed maps left nothing behind at that IOVA, and the first map is intact.
    c.dma_map(0x100000, 0x1000, DMA_RW, Some((small.fd(), 0)))
        .unwrap();
    c.dma_unmap(0x10000, 0x10000, 0).unwrap();
    drop(c);
    d.assert_serving();
}

#[test]
fn dma_unmap_of_anything_but_an_exact_map_is_enoent() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let ram = GuestRam::new(0x40000);
    c.dma_map(0x10000, 0x10000, DMA_RW, Some((ram.fd(), 0)))
        .unwrap();
    c.dma_map(0x30000, 0x1000, DMA_RW, Some((ram.fd(), 0x30000)))
        .unwrap();
    for (iova, size) in [
        (0x40000, 0x1000),  // nothing there
        (0x10000, 0x8000),  // same start, different size
        (0x10000, 0x20000), // same start, larger
        (0x18000, 0x8000),  // the tail
    ] {
        expect_errno(c.dma_unmap(iova, size, 0), Errno::ENOENT);
        assert_in_sync(&mut c);
    }
    // Dirty bitmaps are not offered, UNMAP_ALL takes no range, other flags are undefined.
    for (iova, size, flags) in [
        (0x10000, 0x10000, 1),
        (0x10000, 0x10000, DMA_UNMAP_FLAG_ALL),
        (0, 0, 4),
    ] {
        expect_errno(c.dma_unmap(iova, size, flags), Errno::EINVAL);
        assert_in_sync(&mut c);
    }
    // Both maps survived every rejected unmap; UNMAP_ALL removes them.
    let echoed = c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    assert_eq!(
        (echoed.flags, echoed.address, echoed.size),
        (DMA_UNMAP_FLAG_ALL, 0, 0)
    );
    expect_errno(c.dma_unmap(0x10000, 0x10000, 0), Errno::ENOENT);
    expect_errno(c.dma_unmap(0x30000, 0x1000, 0), Errno::ENOENT);
    // Gone from the table, so the range maps again.
    c.dma_map(0x18000, 0x10000, DMA_RW, Some((ram.fd(), 0)))
        .unwrap();
    drop(c);
    d.assert_serving();
}

#[test]
fn client_shrinking_a_mapped_memfd_does_not_kill_the_daemon() {
    let mut d = Daemon::start();
    const IOVA: u64 = 0x100000;
    let ram = GuestRam::new(0x10000);
    let mut c = d.client();
    c.dma_map(IOVA, 0x10000, DMA_RW, Some((ram.fd(), 0)))
        .unwrap();
    nix::unistd::ftruncate(&ram.fd, 0).unwrap();
    ats_dma::start(&mut c, OP_FILL, 0, IOVA, 0x1000, 0x5555_5555, false);
    assert_eq!(ats_dma::wait_idle(&mut c), (STATUS_ERROR, ERR_DMA_FAULT));
    drop(c);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// File descriptors.

#[test]
fn fds_attached_to_a_command_that_takes_none_are_einval_and_closed() {
    let mut d = Daemon::start();
    let mut c = d.client();
    // CLOEXEC: a vfud spawned meanwhile by another test must not inherit the write end.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let id = c
        .send(
            Command::DeviceGetInfo,
            false,
            &[&get_info_payload()],
            &[write_end.as_fd()],
        )
        .unwrap();
    drop(write_end);
    expect_errno(c.wait_reply(id, Command::DeviceGetInfo), Errno::EINVAL);
    assert_in_sync(&mut c);
    // Only the server's copy of the write end is left; EOF proves it closed it.
    assert!(
        readable_within(read_end.as_fd(), Duration::from_secs(5)),
        "the server kept the fd it rejected"
    );
    let mut buf = [0u8; 1];
    assert_eq!(std::fs::File::from(read_end).read(&mut buf).unwrap(), 0);
    drop(c);
    d.assert_serving();
}

#[test]
fn set_irqs_with_too_many_or_mismatched_fds_or_vectors_is_einval() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let events: Vec<_> = (0..=MAX_MSG_FDS).map(|_| eventfd()).collect();
    let fds: Vec<BorrowedFd<'_>> = events.iter().map(|e| e.as_fd()).collect();
    assert_eq!(fds.len(), 17);

    let before = d.fd_count();
    expect_errno(
        c.set_irqs(irq::MSIX, ASSIGN_EVENTFDS, 0, 17, &fds, &[]),
        Errno::EINVAL,
    );
    assert_in_sync(&mut c);
    assert_eq!(d.fd_count(), before, "the server kept some of the 17 fds");

    // fd count != count, and ranges beyond the 4 vectors.
    for (start, count, nfds) in [(0, 2, 1), (0, 1, 2), (3, 2, 2), (MSIX_VECTORS, 1, 1)] {
        expect_errno(
            c.set_irqs(irq::MSIX, ASSIGN_EVENTFDS, start, count, &fds[..nfds], &[]),
            Errno::EINVAL,
        );
        assert_in_sync(&mut c);
    }

    // The rejections left the index usable: assign all 4 and fire vector 0.
    c.set_irqs(irq::MSIX, ASSIGN_EVENTFDS, 0, MSIX_VECTORS, &fds[..4], &[])
        .unwrap();
    c.set_irqs(
        irq::MSIX,
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(wait_eventfd(&events[0], Duration::from_secs(5)), 1);
    drop(c);
    d.assert_serving();
    // The 17-fd message was refused while framing, not by the range check.
    assert_logged(&d, "TooManyFds");
}

#[test]
fn fds_beyond_the_servers_control_buffer_are_einval_and_not_leaked() {
    let mut d = Daemon::start();
    let probe = d.client();
    let baseline = d.fd_count();
    drop(probe);

    // 200 fds (the kernel allows 253) overflow the server's control buffer, sized for 16, so
    // its recvmsg reports MSG_CTRUNC after installing the fds that fit.
    let mut c = d.client();
    let ev = eventfd();
    let many = vec![ev.as_fd(); 200];
    let r = c.set_irqs(irq::MSIX, ASSIGN_EVENTFDS, 0, 200, &many, &[]);
    let answered = matches!(&r, Err(e) if e.server_errno() == Some(Errno::EINVAL));
    if answered {
        assert_in_sync(&mut c);
    }
    drop(c);
    let probe = d.client();
    let after = d.fd_count();
    drop(probe);
    assert!(
        answered && after == baseline,
        "SET_IRQS with 200 fds answered {r:?} (expected EINVAL and the connection kept); \
         daemon fds {baseline} -> {after}"
    );
    d.assert_serving();
}

#[test]
fn client_that_takes_no_fds_is_sent_none() {
    let mut d = Daemon::start();
    let mut opts = ClientOptions::default();
    opts.caps.max_msg_fds = 0;
    let mut c = Client::connect_with(&d.socket, opts).unwrap();
    // BAR2 is mmap-able, so its region info normally carries the memfd.
    match c.region_info(2) {
        Ok((_, fd)) => assert!(fd.is_none(), "the server attached an fd"),
        Err(e) => panic!("DEVICE_GET_REGION_INFO for BAR2 with max_msg_fds 0: {e:?}"),
    }
    drop(c);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Clients that vanish.

#[test]
fn client_vanishing_mid_message_or_with_maps_leaves_nothing_behind() {
    let mut d = Daemon::start();
    const IOVA: u64 = 0x100000;
    const LEN: u32 = 0x1000;
    let ram = GuestRam::new(0x10000);

    let mut c = d.client();
    c.dma_map(IOVA, 0x10000, DMA_RW, Some((ram.fd(), 0)))
        .unwrap();
    // The map works while its client is there...
    ats_dma::start(&mut c, OP_FILL, 0, IOVA, LEN, 0x1111_1111, false);
    assert_eq!(ats_dma::wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.read(0, LEN as usize), vec![0x11; LEN as usize]);
    // ...which then vanishes without unmapping, in the middle of a 4 KiB REGION_WRITE.
    c.send_raw(
        &header(
            RAW_ID,
            Command::RegionWrite as u16,
            (HEADER_SIZE + 16 + 4096) as u32,
        ),
        &[],
    )
    .unwrap();
    drop(c);

    let mut c = d.client();
    ats_dma::start(&mut c, OP_FILL, 0, IOVA, LEN, 0x2222_2222, false);
    assert_eq!(ats_dma::wait_idle(&mut c), (STATUS_ERROR, ERR_DMA_FAULT));
    assert_eq!(
        ram.read(0, LEN as usize),
        vec![0x11; LEN as usize],
        "the new client's DMA reached the old client's memory"
    );
    drop(c);
    d.assert_serving();
    assert_logged(&d, "mid-message");
}

#[test]
fn client_vanishing_during_message_dma_does_not_wedge_the_device() {
    let mut d = Daemon::start();
    const IOVA: u64 = 0x100000;
    const LEN: u32 = 0x10000;

    // Guest memory without an fd: the FILL becomes DMA_WRITE messages that nobody answers.
    let mut c = d.client();
    c.dma_map(IOVA, LEN as u64, DMA_RW, None).unwrap();
    for (reg, value) in [
        (ats_dma::DST_LO, IOVA as u32),
        (ats_dma::DST_HI, 0),
        (ats_dma::LEN, LEN),
        (ats_dma::PATTERN, 0x3333_3333),
    ] {
        c.write_u32(BAR0, reg, value).unwrap();
    }
    // Posted, so that the next frame is the engine's request, not a reply that would make the
    // client answer the request itself.
    c.region_write_posted(BAR0, ats_dma::CMD, &OP_FILL.to_le_bytes())
        .unwrap();
    let f = c.recv_frame().expect("the engine's first DMA_WRITE");
    assert!(
        f.is_command() && f.header.command == Command::DmaWrite as u16,
        "{:?}",
        f.header
    );
    let vanished = Instant::now();
    drop(c);

    let mut c = d.client();
    // Teardown must cut the outstanding request short, not wait out the server's 3 s timeout.
    let reconnected = vanished.elapsed();
    assert!(reconnected < Duration::from_millis(2500), "{reconnected:?}");
    // Whether the job or the detach noticed first, the command failed and the engine is idle.
    let (status, error) = ats_dma::wait_idle(&mut c);
    assert_eq!(status, STATUS_ERROR);
    assert!(
        [ERR_DMA_FAULT, ERR_NO_CLIENT].contains(&error),
        "ERROR register {error}"
    );
    let ram = GuestRam::new(LEN as u64);
    c.dma_map(IOVA, LEN as u64, DMA_RW, Some((ram.fd(), 0)))
        .unwrap();
    ats_dma::start(&mut c, OP_FILL, 0, IOVA, LEN, 0x4444_4444, false);
    assert_eq!(ats_dma::wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.read(0, LEN as usize), vec![0x44; LEN as usize]);
    drop(c);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Resource use and robustness.

#[test]
fn connect_disconnect_churn_leaks_no_fds_or_memory() {
    let mut d = Daemon::start();
    let cycle = |d: &Daemon| {
        let mut c = d.client();
        let ram = GuestRam::new(0x10000);
        c.dma_map(0x10000, 0x10000, DMA_RW, Some((ram.fd(), 0)))
            .unwrap();
        let ev = eventfd();
        c.set_irqs(irq::MSIX, ASSIGN_EVENTFDS, 0, 1, &[ev.as_fd()], &[])
            .unwrap();
    };
    for _ in 0..5 {
        cycle(&d);
    }
    // Measured with one negotiated client connected; the server serves one client at a time,
    // so its accept proves the previous client's teardown finished.
    let probe = d.client();
    let (fds_before, rss_before) = (d.fd_count(), d.rss_kib());
    drop(probe);

    for _ in 0..200 {
        cycle(&d);
    }
    drop(d.client());
    let probe = d.client();
    let (fds_after, rss_after) = (d.fd_count(), d.rss_kib());
    drop(probe);

    assert_eq!(
        fds_after, fds_before,
        "daemon fd count changed over 200 clients"
    );
    assert!(
        !vfud_tests::rss_bounds_apply() || rss_after < rss_before + 8 * 1024,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB over 200 clients"
    );
    d.assert_serving();
}

#[test]
fn garbage_after_negotiation_gets_replies_or_a_close_never_a_hang() {
    let mut d = Daemon::start();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);

    // Well-framed garbage: random command numbers, flags and payloads. Every message that is
    // neither a reply nor No_reply gets exactly one reply, in order.
    let mut c = d.client();
    for batch in 0..20u16 {
        let mut expected = Vec::new();
        for i in 0..100u16 {
            let id = RAW_ID + batch * 100 + i;
            let command = rng.below(20) as u16;
            let kind = if rng.below(4) == 0 {
                rng.below(16) as u32
            } else {
                FLAG_TYPE_COMMAND
            };
            let flags = kind | (rng.next() as u32 & (FLAG_NO_REPLY | FLAG_ERROR));
            let len = rng.below(49) as usize;
            let payload = rng.bytes(len);
            c.send_raw(&frame::encode(id, command, flags, 0, &[&payload]), &[])
                .unwrap();
            if kind != FLAG_TYPE_REPLY && flags & FLAG_NO_REPLY == 0 {
                expected.push((id, command));
            }
        }
        for (id, command) in expected {
            next_reply(&mut c, id, command);
        }
        assert_in_sync(&mut c);
    }
    drop(c);

    // Raw garbage: a random "header" almost always announces a message far beyond the limit,
    // which the server discards until the stream ends. The half-close supplies that end, so the
    // outcome is a close, not a wait. Sending may fail if the server closed the stream first.
    let mut c = d.client();
    let garbage = rng.bytes(64 * 1024);
    let _ = c.send_raw(&garbage, &[]);
    let _ = c.socket().shutdown(Shutdown::Write);
    let mut replies = 0;
    loop {
        match c.recv_frame() {
            Ok(f) => {
                assert_eq!(
                    (f.header.flags & FLAG_TYPE_MASK, f.header.flags & FLAG_ERROR),
                    (FLAG_TYPE_REPLY, FLAG_ERROR),
                    "garbage got a non-error answer: {:?}",
                    f.header
                );
                replies += 1;
                assert!(replies <= garbage.len() / HEADER_SIZE);
            }
            Err(ClientError::Closed | ClientError::Truncated) => break,
            Err(e) => panic!("after garbage: {e:?}"),
        }
    }
    drop(c);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Process-wide resources a client must not be able to exhaust.

#[test]
fn thousands_of_maps_of_one_file_hold_no_fds() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let before = d.fd_count();
    let ram = GuestRam::new(0x10000);
    for i in 0..3000u64 {
        c.dma_map(
            0x1_0000_0000 + i * 0x10000,
            0x1000,
            DMA_RW,
            Some((ram.fd(), (i % 16) * 0x1000)),
        )
        .unwrap();
    }
    assert_eq!(d.fd_count(), before, "DMA maps must not keep one fd each");
    // They all work: DMA into the last one lands in the file.
    let last = 0x1_0000_0000 + 2999 * 0x10000;
    ats_dma::start(&mut c, OP_FILL, 0, last, 4, 0x0102_0304, false);
    assert_eq!(ats_dma::wait_idle(&mut c), (STATUS_DONE, 0));
    assert_eq!(ram.read((2999 % 16) * 0x1000, 4), vec![4, 3, 2, 1]);
    drop(c);
    d.assert_serving();
}

#[test]
fn distinct_backing_files_are_capped_with_enospc() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let mut rams = Vec::new();
    let mut refused = None;
    for i in 0..1100u64 {
        let ram = GuestRam::new(0x1000);
        match c.dma_map(i * 0x1000, 0x1000, DMA_RW, Some((ram.fd(), 0))) {
            Ok(()) => rams.push(ram),
            Err(e) => {
                refused = Some((i, e.server_errno()));
                break;
            }
        }
    }
    assert_eq!(refused, Some((1024, Some(Errno::ENOSPC))));
    // Unmapping one frees a slot.
    c.dma_unmap(0, 0x1000, 0).unwrap();
    let ram = GuestRam::new(0x1000);
    c.dma_map(0x1_0000_0000, 0x1000, DMA_RW, Some((ram.fd(), 0)))
        .unwrap();
    drop(c);
    d.assert_serving();
}
