//! Hostile clients against the real `vfud` binary: floods, clients that stop reading, fd spam,
//! reconnect storms and map exhaustion. Each test asserts from /proc that the daemon stays
//! within bounded memory and file descriptors, that another device of the same daemon keeps
//! being served meanwhile, and that the attacked device recovers once the client is gone.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use vfu_protocol::frame;
use vfu_protocol::wire::{RegionAccess, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, FLAG_TYPE_COMMAND};
use vfu_protocol::Command;
use vfud_tests::{rss_bounds_apply, Daemon, GuestRam};
use zerocopy::IntoBytes;

const ATS_DMA: &str = r#"{"type":"emulated","model":"ats-dma"}"#;
const BAR2: u32 = 2;
const BAR2_SIZE: usize = 0x10000;
const CONFIG: u32 = 7;
/// The server's advertised limits.
const MAX_DATA_XFER: usize = 1 << 20;
const MAX_MSG_FDS: usize = 16;
const MAX_DMA_MAPS: u64 = 65535;
const DMA_RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
/// What a flood may cost the daemon at most: its command queue holds 32 frames of at most
/// 1 MiB, plus decoder and reply buffers. A daemon that buffers without bound blows past it.
const FLOOD_RSS_BOUND_KIB: u64 = 96 * 1024;

fn start_pair() -> Daemon {
    Daemon::start_logging(&[("target", ATS_DMA), ("bystander", ATS_DMA)], "info")
}

/// Runs `attack` on a thread while the bystander device is driven with round trips on this one;
/// returns the attack's result and the daemon's peak RSS growth over the attack.
fn while_bystander_is_served<T: Send>(d: &Daemon, attack: impl FnOnce() -> T + Send) -> (T, u64) {
    let base = d.rss_kib();
    let mut bystander = d.client_of("bystander");
    let done = AtomicBool::new(false);
    let mut peak = base;
    let mut served = 0u64;
    let result = thread::scope(|s| {
        let attacker = s.spawn(|| {
            let r = attack();
            done.store(true, Ordering::Release);
            r
        });
        while !done.load(Ordering::Acquire) {
            // Each read waits at most the client's 10 s timeout: a stalled daemon fails here.
            let id = bystander
                .read_u32(CONFIG, 0)
                .expect("the bystander device must be served during the attack");
            assert_ne!(id, 0xffff_ffff);
            served += 1;
            peak = peak.max(d.rss_kib());
        }
        attacker.join().expect("attack thread")
    });
    assert!(served > 0, "the bystander was never served");
    (result, peak.saturating_sub(base))
}

/// Waits until the daemon's fd count is back to `want` (connections are torn down
/// asynchronously after the peer closes).
fn wait_fd_count(d: &Daemon, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.fd_count() != want {
        assert!(
            Instant::now() < deadline,
            "daemon holds {} fds, expected {want}\n{}",
            d.fd_count(),
            d.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn raw_read_request(msg_id: u16, region: u32, offset: u64, count: u32) -> Vec<u8> {
    let access = RegionAccess {
        offset,
        region,
        count,
    };
    frame::encode(
        msg_id,
        Command::RegionRead as u16,
        FLAG_TYPE_COMMAND,
        0,
        &[access.as_bytes()],
    )
}

#[test]
fn max_size_message_flood_stays_bounded_while_other_devices_are_served() {
    let mut d = start_pair();
    let target = d.socket_of("target");
    let rounds = 150usize;
    let ((), growth) = while_bystander_is_served(&d, || {
        let mut c = vfu_protocol::client::Client::connect(&target).expect("flood client");
        let huge = vec![0xa5u8; MAX_DATA_XFER];
        for i in 0..rounds {
            // A maximum-size write the device refuses (BAR2 is 64 KiB), and a valid one that
            // records the round in BAR2: the final read proves every message was handled in order.
            c.region_write_posted(BAR2, 0, &huge)
                .expect("posted max-size write");
            let stamp = vec![i as u8; BAR2_SIZE];
            c.region_write_posted(BAR2, 0, &stamp)
                .expect("posted write");
        }
        let last = c.region_read(BAR2, 0, BAR2_SIZE as u32).expect("read");
        assert!(last.iter().all(|b| *b == (rounds - 1) as u8));
    });
    eprintln!("flood of {rounds} MiB: daemon RSS grew by {growth} KiB");
    assert!(
        !rss_bounds_apply() || growth < FLOOD_RSS_BOUND_KIB,
        "daemon RSS grew by {growth} KiB during a {} MiB flood",
        rounds
    );
    d.assert_serving();
}

#[test]
fn client_that_stops_reading_replies_is_held_by_backpressure_then_released() {
    let mut d = start_pair();
    let target = d.socket_of("target");
    let idle_fds = d.fd_count();
    let (sent, growth) = while_bystander_is_served(&d, || {
        let c = vfu_protocol::client::Client::connect(&target).expect("client");
        let mut sock: UnixStream = c.socket().try_clone().expect("dup");
        sock.set_write_timeout(Some(Duration::from_secs(3)))
            .expect("write timeout");
        // 64 KiB replies that are never read; 16 Ki requests would be 1 GiB of replies.
        let mut sent = 0u32;
        while sent < 16 * 1024 {
            let req = raw_read_request(sent as u16, BAR2, 0, BAR2_SIZE as u32);
            match sock.write_all(&req) {
                Ok(()) => sent += 1,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("request {sent}: {e}"),
            }
        }
        // Hang up without reading anything.
        drop(c);
        drop(sock);
        sent
    });
    eprintln!("{sent} requests sent before backpressure; daemon RSS grew by {growth} KiB");
    assert!(
        sent < 16 * 1024,
        "vfud kept reading requests whose replies nobody read: it must apply backpressure"
    );
    assert!(
        !rss_bounds_apply() || growth < FLOOD_RSS_BOUND_KIB,
        "daemon RSS grew by {growth} KiB while a client ignored {sent} replies"
    );
    // Released: the connection's resources go, and the device serves the next client.
    let mut next = d.client_of("target");
    next.device_info().expect("the target device serves again");
    drop(next);
    wait_fd_count(&d, idle_fds);
    d.assert_serving();
}

#[test]
fn fds_sent_with_commands_that_take_none_are_all_closed() {
    let mut d = start_pair();
    let mut c = d.client_of("target");
    let before = d.fd_count();
    let ram = GuestRam::new(0x1000);
    let fds: Vec<BorrowedFd<'_>> = (0..MAX_MSG_FDS).map(|_| ram.fd()).collect();
    let req = RegionAccess {
        offset: 0,
        region: CONFIG,
        count: 4,
    };
    for _ in 0..500 {
        let id = c
            .send(Command::RegionRead, false, &[req.as_bytes()], &fds)
            .expect("send with fds");
        let r = c.wait_reply(id, Command::RegionRead);
        assert_eq!(
            r.expect_err("fds on REGION_READ must be refused")
                .server_errno(),
            Some(Errno::EINVAL)
        );
    }
    assert_eq!(
        d.fd_count(),
        before,
        "the daemon kept some of 8000 unwanted fds"
    );
    drop(c);
    d.assert_serving();
}

#[test]
fn reconnect_storm_leaves_no_fds_or_memory_behind() {
    let mut d = start_pair();
    let idle_fds = d.fd_count();
    let base_rss = d.rss_kib();
    let target = d.socket_of("target");
    let ram = GuestRam::new(0x10000);
    for i in 0..2000u32 {
        if i % 20 == 0 {
            // Now and then a full client that maps memory and vanishes without unmapping.
            let mut c = vfu_protocol::client::Client::connect(&target).expect("client");
            c.dma_map(0x10000, 0x10000, DMA_RW, Some((ram.fd(), 0)))
                .expect("DMA_MAP");
        } else {
            // Mostly a connect and an immediate hang-up, some mid-header.
            let mut s = UnixStream::connect(&target).expect("connect");
            if i % 2 == 0 {
                let _ = s.write_all(&[1, 0, 1]);
            }
        }
    }
    // The last connection's teardown may still be running.
    wait_fd_count(&d, idle_fds);
    let growth = d.rss_kib().saturating_sub(base_rss);
    assert!(
        !rss_bounds_apply() || growth < 16 * 1024,
        "daemon RSS grew by {growth} KiB over 2000 connections"
    );
    d.assert_serving();
}

#[test]
fn dma_maps_up_to_the_protocol_limit_then_enospc_and_all_freed_on_disconnect() {
    let mut d = start_pair();
    let idle_fds = d.fd_count();
    let base_rss = d.rss_kib();
    let ram = GuestRam::new(0x10000);
    {
        let mut c = d.client_of("target");
        for i in 0..MAX_DMA_MAPS {
            c.dma_map(
                i * 0x2000,
                0x1000,
                DMA_RW,
                Some((ram.fd(), (i % 16) * 0x1000)),
            )
            .unwrap_or_else(|e| panic!("DMA_MAP {i}: {e:?}"));
        }
        let over = c.dma_map(MAX_DMA_MAPS * 0x2000, 0x1000, DMA_RW, Some((ram.fd(), 0)));
        assert_eq!(
            over.expect_err("map 65536 must be refused").server_errno(),
            Some(Errno::ENOSPC)
        );
        let growth = d.rss_kib().saturating_sub(base_rss);
        assert!(
            !rss_bounds_apply() || growth < 64 * 1024,
            "65535 maps of one file cost {growth} KiB of daemon RSS"
        );
    }
    // A fresh client starts with an empty table: a map at a previously used IOVA succeeds.
    let mut c = d.client_of("target");
    c.dma_map(0, 0x1000, DMA_RW, Some((ram.fd(), 0)))
        .expect("the previous client's maps are gone");
    drop(c);
    wait_fd_count(&d, idle_fds);
    d.assert_serving();
}

#[test]
fn flood_from_one_connection_does_not_starve_its_own_replies() {
    // Pipelined reads without waiting are answered in order and completely; a client may
    // queue more than the daemon's command queue holds.
    let d = start_pair();
    let c = d.client_of("target");
    let mut sock = c.socket().try_clone().expect("dup");
    let n = 2000u16;
    let writer = {
        let mut sock = sock.try_clone().expect("dup");
        thread::spawn(move || {
            for id in 0..n {
                sock.write_all(&raw_read_request(id, CONFIG, 0, 4))
                    .expect("pipelined request");
            }
        })
    };
    let mut buf = vec![0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    for want in 0..n {
        let size = read_frame(&mut sock, &mut buf);
        let id = u16::from_le_bytes([buf[0], buf[1]]);
        assert_eq!(id, want, "replies must come in order");
        assert_eq!(size, 16 + 16 + 4);
    }
    writer.join().expect("writer");
    drop(c);
}

fn read_frame(sock: &mut UnixStream, buf: &mut [u8]) -> usize {
    use std::io::Read;
    sock.read_exact(&mut buf[..16]).expect("reply header");
    let size = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    sock.read_exact(&mut buf[16..size]).expect("reply body");
    size
}

#[test]
fn growing_memfds_and_device_fds_cannot_pile_up_mappings() {
    let mut d = start_pair();
    let idle_fds = d.fd_count();
    let mut c = d.client_of("target");
    // One memfd that grows before every map: each map needs a new whole-file mapping while
    // the older ones stay alive through their regions.
    let ram = GuestRam::new(0x1000);
    let mut refused = None;
    for i in 0..1100u64 {
        nix::unistd::ftruncate(&ram.fd, ((i + 2) * 0x1000) as i64).expect("grow the memfd");
        if let Err(e) = c.dma_map(
            i * 0x2000,
            0x1000,
            DMA_RW,
            Some((ram.fd(), (i + 1) * 0x1000)),
        ) {
            refused = Some((i, e.server_errno()));
            break;
        }
    }
    assert_eq!(
        refused,
        Some((1024, Some(Errno::ENOSPC))),
        "a growing memfd"
    );
    c.dma_unmap(0, 0, vfu_protocol::wire::DMA_UNMAP_FLAG_ALL)
        .expect("UNMAP_ALL");
    // Character-device fds are not regular files: each map is its own mapping.
    let zero = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/zero")
        .expect("/dev/zero");
    let mut refused = None;
    for i in 0..1100u64 {
        if let Err(e) = c.dma_map(i * 0x2000, 0x1000, DMA_RW, Some((zero.as_fd(), 0))) {
            refused = Some((i, e.server_errno()));
            break;
        }
    }
    assert_eq!(refused, Some((1024, Some(Errno::ENOSPC))), "device fds");
    drop(c);
    wait_fd_count(&d, idle_fds);
    d.assert_serving();
}
