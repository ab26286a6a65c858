//! Protocol tier, happy path: the real `vfud` binary driven over its socket by the
//! `vfu-protocol` client, the way a VMM uses a device.

use std::os::fd::AsFd;
use std::time::Duration;

use vfu_protocol::client::{Client, ClientOptions};
use vfu_protocol::command::{irq, region, Command};
use vfu_protocol::dma::DmaLayout;
use vfu_protocol::negotiate::{Capabilities, VersionPayload};
use vfu_protocol::reply::RegionCap;
use vfu_protocol::request::MultiWrite;
use vfu_protocol::wire::{self, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud::dma::{DmaProt, MappedRegion};
use vfud::pci::caps::{
    CapabilityChain, CAP_ID_EXP, CAP_ID_MSI, CAP_ID_MSIX, EXT_CAP_ID_ATS, EXT_CAP_ID_PASID,
    EXT_CAP_ID_PRI,
};
use vfud_tests::ats_dma::*;
use vfud_tests::{eventfd, wait_eventfd, Daemon, GuestRam, MessageRam};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// The capabilities string QEMU 10.1 sends, byte for byte.
const QEMU_CAPS: &str = "{\"capabilities\": {\"max_msg_fds\": 16, \"max_data_xfer_size\": 1048576, \"pgsizes\": 4096, \"max_dma_maps\": 65535, \"migration\": {\"pgsize\": 4096, \"max_bitmap_size\": 268435456}, \"write_multiple\": true}}";

#[test]
fn negotiation_answers_qemu_within_its_receive_buffer() {
    let d = Daemon::start();
    let mut c = d.raw_client();
    let mut payload = vec![0u8, 0, 0, 0];
    payload.extend_from_slice(QEMU_CAPS.as_bytes());
    payload.push(0);
    let request_size = 16 + payload.len();
    assert_eq!(request_size, 214);
    let r = c.call(Command::Version, &[&payload], &[]).unwrap();
    assert!(r.fds.is_empty(), "VERSION reply must carry no fds");
    assert!(
        16 + r.payload.len() <= request_size,
        "reply of {} bytes exceeds QEMU's buffer",
        16 + r.payload.len()
    );
    let v = VersionPayload::parse(&r.payload).unwrap();
    assert_eq!(
        (v.major, v.minor),
        (0, 0),
        "QEMU proposes 0.0 and rejects a higher minor"
    );
    assert!(v.caps.max_msg_fds <= 16);
    assert!(v.caps.max_dma_maps <= 65535);
    assert!(v.caps.write_multiple, "offered by QEMU and implemented");
    assert_eq!(v.caps.pgsizes & 0xfff, 0);
    let json = std::str::from_utf8(&r.payload[4..r.payload.len() - 1]).unwrap();
    assert!(!json.contains(' '), "compact JSON expected: {json}");

    // A client that offers nothing (SPDK sends no JSON) gets defaults and no write_multiple.
    // One client at a time per device: the first must leave before the next is served.
    drop(c);
    let mut c = d.raw_client();
    let r = c.call(Command::Version, &[&[0, 0, 2, 0]], &[]).unwrap();
    let v = VersionPayload::parse(&r.payload).unwrap();
    assert_eq!(v.minor, 2);
    assert!(!v.caps.write_multiple);
}

#[test]
fn device_info_regions_and_irqs() {
    let d = Daemon::start();
    let mut c = d.client();
    let info = c.device_info().unwrap();
    assert_eq!(info.argsz, 16);
    assert_eq!(info.flags, wire::DEVICE_FLAG_PCI | wire::DEVICE_FLAG_RESET);
    assert_eq!(info.num_regions, 9);
    assert_eq!(info.num_irqs, 5);

    for index in 0..info.num_regions {
        let (desc, fd) = c.region_info(index).unwrap();
        assert_eq!(desc.index, index);
        match index {
            0 => {
                assert_eq!(desc.size, BAR0_SIZE);
                assert_eq!(
                    desc.flags & wire::REGION_FLAG_MMAP,
                    0,
                    "BAR0 traps: it has doorbells"
                );
                assert!(fd.is_none());
            }
            2 => {
                assert_eq!(desc.size, BAR2_SIZE);
                assert_ne!(desc.flags & wire::REGION_FLAG_MMAP, 0);
                assert_eq!(
                    desc.caps,
                    vec![RegionCap::SparseMmap(vec![wire::SparseMmapArea {
                        offset: 0,
                        size: BAR2_SIZE
                    }])]
                );
                assert!(
                    fd.is_some(),
                    "the mappable region's fd comes with the caps reply"
                );
            }
            region::CONFIG => assert_eq!(desc.size, 4096),
            _ => {
                assert_eq!(desc.size, 0);
                assert!(fd.is_none());
            }
        }
    }
    let expected = [
        (irq::INTX, 1),
        (irq::MSI, 1),
        (irq::MSIX, MSIX_VECTORS),
        (irq::ERR, 1),
        (irq::REQ, 0),
    ];
    for (index, count) in expected {
        let i = c.irq_info(index).unwrap();
        assert_eq!((i.argsz, i.index, i.count), (16, index, count));
        assert_ne!(i.flags & wire::IRQ_INFO_EVENTFD, 0);
    }
}

use vfud::device::emulated::ats_dma::{BAR0_SIZE, BAR2_SIZE, MSIX_VECTORS};

#[test]
fn short_region_info_carries_no_fd_and_reports_the_full_size() {
    let d = Daemon::start();
    let mut c = d.client();
    let req = wire::RegionInfo {
        argsz: 32,
        index: 2,
        ..Default::default()
    };
    use zerocopy::IntoBytes;
    let r = c
        .call(Command::DeviceGetRegionInfo, &[req.as_bytes()], &[])
        .unwrap();
    assert_eq!(r.payload.len(), 32);
    assert!(
        r.fds.is_empty(),
        "QEMU closes an fd received with a short reply"
    );
    let argsz = u32::from_ne_bytes(r.payload[0..4].try_into().unwrap());
    assert_eq!(argsz, 32 + 8 + 8 + 16);
}

#[test]
fn bar2_fd_is_the_device_memory() {
    let d = Daemon::start();
    let mut c = d.client();
    let (desc, fd) = c.region_info(2).unwrap();
    let fd = fd.unwrap();
    c.region_write(2, 0x100, b"through the socket").unwrap();
    let map = MappedRegion::map(
        &fd,
        desc.offset,
        desc.size,
        DmaProt {
            read: true,
            write: true,
        },
    )
    .unwrap();
    let mut seen = [0u8; 18];
    map.read_at(0x100, &mut seen).unwrap();
    map.write_at(0x200, b"mmap").unwrap();
    assert_eq!(&seen, b"through the socket");
    // Sealed at its size: a client cannot shrink it under the next client's mapping.
    assert_eq!(
        nix::unistd::ftruncate(&fd, 0),
        Err(nix::errno::Errno::EPERM)
    );
    assert_eq!(c.region_read(2, 0x200, 4).unwrap(), b"mmap");
}

#[test]
fn full_config_space_read_shows_every_capability() {
    let d = Daemon::start();
    let mut c = d.client();
    let cs = c.region_read(region::CONFIG, 0, 4096).unwrap();
    assert_eq!(cs.len(), 4096);
    assert_eq!(u16::from_le_bytes([cs[0], cs[1]]), 0x1b36);
    let chain = CapabilityChain::walk(&cs);
    assert!(chain.standard_error.is_none() && chain.extended_error.is_none());
    for id in [CAP_ID_MSI, CAP_ID_EXP, CAP_ID_MSIX] {
        assert!(
            chain.find_standard(id).is_some(),
            "standard capability {id:#x}"
        );
    }
    for id in [EXT_CAP_ID_ATS, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI] {
        assert!(
            chain.find_extended(id).is_some(),
            "extended capability {id:#x}"
        );
    }
    // Read-only identity, writable command register, BAR sizing.
    c.region_write(region::CONFIG, 0, &[0xff; 4]).unwrap();
    assert_eq!(
        c.region_read(region::CONFIG, 0, 2).unwrap(),
        vec![0x36, 0x1b]
    );
    c.region_write(region::CONFIG, 0x10, &[0xff; 4]).unwrap();
    assert_eq!(
        c.region_read(region::CONFIG, 0x10, 4).unwrap(),
        (!(BAR0_SIZE as u32 - 1)).to_le_bytes()
    );
    // ATS control is emulated: Enable and STU stick, the capability register does not move.
    let ats = chain.find_extended(EXT_CAP_ID_ATS).unwrap() as u64;
    c.region_write(region::CONFIG, ats + 4, &[0xff, 0xff, 0x05, 0x80])
        .unwrap();
    assert_eq!(
        c.region_read(region::CONFIG, ats + 4, 4).unwrap(),
        vec![0x20, 0x00, 0x05, 0x80]
    );
}

#[test]
fn dma_through_an_fd_map_and_msix_interrupt() {
    let d = Daemon::start();
    let mut c = d.client();
    let ram = GuestRam::new(1 << 20);
    c.dma_map(0x1000_0000, ram.size, RW, Some((ram.fd(), 0)))
        .unwrap();
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.write(0x1000, &pattern);

    let ev = eventfd();
    c.set_irqs(
        irq::MSIX,
        wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[ev.as_fd()],
        &[],
    )
    .unwrap();
    start(&mut c, OP_COPY, 0x1000_1000, 0x1000_8000, 8192, 0, true);
    assert_eq!(
        wait_eventfd(&ev, Duration::from_secs(10)),
        1,
        "completion interrupt on MSI-X vector 0"
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.read(0x8000, 8192), pattern);

    start(&mut c, OP_CHECKSUM, 0x1000_1000, 0, 8192, 0, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(c.read_u32(0, RESULT).unwrap(), crc32fast::hash(&pattern));

    start(&mut c, OP_FILL, 0, 0x1000_4001, 5, 0xa1b2_c3d4, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(
        ram.read(0x4000, 7),
        vec![0, 0xd4, 0xc3, 0xb2, 0xa1, 0xd4, 0]
    );
    assert_eq!(c.read_u32(0, COMPLETED).unwrap(), 3);
    assert_eq!(c.read_u32(0, IRQ_STATUS).unwrap(), 1);

    // Outside the map: a DMA fault, reported, not a crash.
    start(&mut c, OP_COPY, 0x1000_0000, 0x2000_0000, 16, 0, false);
    assert_eq!(wait_idle(&mut c), (STATUS_ERROR, ERR_DMA_FAULT));
    // Unmapped memory is no longer reachable.
    c.dma_unmap(0x1000_0000, ram.size, 0).unwrap();
    start(&mut c, OP_FILL, 0, 0x1000_0000, 16, 1, false);
    assert_eq!(wait_idle(&mut c), (STATUS_ERROR, ERR_DMA_FAULT));
}

#[test]
fn dma_through_an_fd_less_map_uses_dma_read_and_dma_write() {
    let d = Daemon::start();
    let mut c = d.client();
    let ram = MessageRam::default();
    c.set_dma_handler(Box::new(ram.clone()));
    c.dma_map(0x4000_0000, 0x40000, RW, None).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i ^ (i >> 8)) as u8).collect();
    ram.store(0x4000_0000, &data);
    start(
        &mut c,
        OP_COPY,
        0x4000_0000,
        0x4002_0000,
        data.len() as u32,
        0,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.load(0x4002_0000, data.len()), data);
    // 100 000 bytes in 64 KiB engine chunks: 2 reads and 2 writes.
    assert_eq!(ram.reads.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(ram.writes.load(std::sync::atomic::Ordering::Relaxed), 2);
    // The zero-length layout probe came first and found the specification's layout.
    assert!(
        d.log_plain().contains("client's DMA_READ/DMA_WRITE layout")
            && d.log_plain().contains("specification"),
        "{}",
        d.log_text()
    );
}

/// QEMU's vfio-user client as first merged (QEMU 10.1) lays DMA_READ/DMA_WRITE out with a u32
/// count and data at payload offset 12, and answers DMA_WRITE with a bare header. vfud probes
/// the layout once per connection and adapts; without that, a DMA_READ reply whose data starts
/// with four zero bytes would be taken as the specification's layout, shifted by four bytes.
#[test]
fn message_dma_adapts_to_the_qemu_10_1_layout() {
    let d = Daemon::start();
    let opts = ClientOptions {
        dma_layout: DmaLayout::QemuLegacy,
        ..Default::default()
    };
    let mut c = Client::connect_with(&d.socket, opts).unwrap();
    let ram = MessageRam::default();
    c.set_dma_handler(Box::new(ram.clone()));
    c.dma_map(0x4000_0000, 0x40000, RW, None).unwrap();
    let mut data = vec![0u8; 4];
    data.extend((0..70_000u32).map(|i| (i.wrapping_mul(7) + 1) as u8));
    ram.store(0x4000_0000, &data);
    start(
        &mut c,
        OP_COPY,
        0x4000_0000,
        0x4002_0000,
        data.len() as u32,
        0,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.load(0x4002_0000, data.len()), data);
    start(
        &mut c,
        OP_CHECKSUM,
        0x4000_0000,
        0,
        data.len() as u32,
        0,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(c.read_u32(0, RESULT).unwrap(), crc32fast::hash(&data));
    start(&mut c, OP_FILL, 0, 0x4003_0000, 4096, 0x0403_0201, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.load(0x4003_0000, 8), [1, 2, 3, 4, 1, 2, 3, 4]);
    assert!(
        d.log_plain()
            .contains("QEMU 10.1's DMA_READ/DMA_WRITE layout"),
        "{}",
        d.log_text()
    );
}

#[test]
fn msi_and_intx_interrupts_and_intx_masking() {
    let d = Daemon::start();
    let mut c = d.client();
    let ram = GuestRam::new(0x10000);
    c.dma_map(0, ram.size, RW, Some((ram.fd(), 0))).unwrap();
    let intx = eventfd();
    c.set_irqs(
        irq::INTX,
        wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[intx.as_fd()],
        &[],
    )
    .unwrap();
    start(&mut c, OP_FILL, 0, 0, 64, 7, true);
    assert_eq!(wait_eventfd(&intx, Duration::from_secs(10)), 1);
    assert_eq!(wait_idle(&mut c).0, STATUS_DONE);
    // INTx masked itself; the next completion stays pending until UNMASK.
    start(&mut c, OP_FILL, 0, 0, 64, 7, true);
    assert_eq!(wait_idle(&mut c).0, STATUS_DONE);
    assert_eq!(wait_eventfd(&intx, Duration::from_millis(0)), 0);
    c.set_irqs(
        irq::INTX,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(wait_eventfd(&intx, Duration::from_secs(10)), 1);

    // MSI takes precedence over INTx once enabled.
    let msi = eventfd();
    c.set_irqs(
        irq::MSI,
        wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[msi.as_fd()],
        &[],
    )
    .unwrap();
    start(&mut c, OP_FILL, 0, 0, 64, 7, true);
    assert_eq!(wait_eventfd(&msi, Duration::from_secs(10)), 1);
    // DATA_BOOL trigger fires the assigned eventfd (loopback test of the vector).
    c.set_irqs(
        irq::MSI,
        wire::IRQ_SET_DATA_BOOL | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[],
        &[1],
    )
    .unwrap();
    assert_eq!(wait_eventfd(&msi, Duration::from_secs(10)), 1);
    // Disabling the whole MSI index falls back to INTx.
    c.set_irqs(
        irq::MSI,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
        &[],
    )
    .unwrap();
    start(&mut c, OP_FILL, 0, 0, 64, 7, true);
    assert_eq!(wait_idle(&mut c).0, STATUS_DONE);
    assert_eq!(wait_eventfd(&msi, Duration::from_millis(0)), 0);
}

#[test]
fn reset_restores_registers_and_device_memory() {
    let d = Daemon::start();
    let mut c = d.client();
    c.write_u32(0, SRC_LO, 0xdead_beef).unwrap();
    c.region_write(2, 0, b"state").unwrap();
    c.region_write(region::CONFIG, 4, &[0x06, 0x00]).unwrap();
    c.reset().unwrap();
    assert_eq!(c.read_u32(0, SRC_LO).unwrap(), 0);
    assert_eq!(c.region_read(2, 0, 5).unwrap(), vec![0; 5]);
    assert_eq!(c.region_read(region::CONFIG, 4, 2).unwrap(), vec![0, 0]);
}

#[test]
fn pipelined_and_posted_commands_are_answered_in_order() {
    let d = Daemon::start();
    let mut c = d.client();
    use zerocopy::IntoBytes;
    let mut ids = Vec::new();
    for i in 0..50u32 {
        let w = wire::RegionAccess {
            offset: PATTERN,
            region: 0,
            count: 4,
        };
        c.send(
            Command::RegionWrite,
            true,
            &[w.as_bytes(), &i.to_le_bytes()],
            &[],
        )
        .unwrap();
        let r = wire::RegionAccess {
            offset: PATTERN,
            region: 0,
            count: 4,
        };
        ids.push(
            c.send(Command::RegionRead, false, &[r.as_bytes()], &[])
                .unwrap(),
        );
    }
    for (i, id) in ids.into_iter().enumerate() {
        let f = c.recv_frame().unwrap();
        assert_eq!(
            f.header.msg_id, id,
            "replies come in order, none for posted writes"
        );
        assert_eq!(&f.payload[16..], &(i as u32).to_le_bytes());
    }
}

#[test]
fn write_multiple_applies_every_write() {
    let d = Daemon::start();
    let mut c = d.client();
    let writes = vec![
        MultiWrite {
            region: 0,
            offset: SRC_LO,
            data: 0x1111_2222u32.to_le_bytes().to_vec(),
        },
        MultiWrite {
            region: 0,
            offset: DST_LO,
            data: 0x3333_4444u32.to_le_bytes().to_vec(),
        },
        MultiWrite {
            region: 2,
            offset: 8,
            data: vec![9; 8],
        },
    ];
    assert_eq!(c.write_multi(&writes).unwrap(), 3);
    assert_eq!(c.read_u32(0, SRC_LO).unwrap(), 0x1111_2222);
    assert_eq!(c.read_u32(0, DST_LO).unwrap(), 0x3333_4444);
    assert_eq!(c.region_read(2, 8, 8).unwrap(), vec![9; 8]);
}

#[test]
fn write_multiple_is_refused_when_not_negotiated() {
    let d = Daemon::start();
    let opts = vfu_protocol::client::ClientOptions {
        caps: Capabilities {
            max_msg_fds: 16,
            ..Capabilities::default()
        },
        ..Default::default()
    };
    let mut c = vfu_protocol::client::Client::connect_with(&d.socket, opts).unwrap();
    let w = MultiWrite {
        region: 0,
        offset: SRC_LO,
        data: vec![1, 2, 3, 4],
    };
    assert_eq!(
        c.write_multi(&[w]).unwrap_err().server_errno(),
        Some(nix::errno::Errno::EINVAL)
    );
}

#[test]
fn next_client_finds_device_state_but_not_the_previous_maps_or_irqs() {
    let d = Daemon::start();
    let ram = GuestRam::new(0x10000);
    let ev = eventfd();
    {
        let mut c = d.client();
        c.dma_map(0x8000_0000, ram.size, RW, Some((ram.fd(), 0)))
            .unwrap();
        c.set_irqs(
            irq::MSIX,
            wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[ev.as_fd()],
            &[],
        )
        .unwrap();
        c.write_u32(0, PATTERN, 0x5a5a_5a5a).unwrap();
    }
    let mut c = d.client();
    assert_eq!(
        c.read_u32(0, PATTERN).unwrap(),
        0x5a5a_5a5a,
        "device state survives the client"
    );
    start(&mut c, OP_FILL, 0, 0x8000_0000, 16, 1, true);
    assert_eq!(
        wait_idle(&mut c),
        (STATUS_ERROR, ERR_DMA_FAULT),
        "maps die with the client"
    );
    assert_eq!(
        wait_eventfd(&ev, Duration::from_millis(0)),
        0,
        "IRQ eventfds die with the client"
    );
    assert_eq!(ram.read(0, 16), vec![0; 16]);
}

#[test]
fn reset_stops_a_running_job_before_it_replies() {
    use zerocopy::{FromBytes, IntoBytes};
    let d = Daemon::start();
    let mut c = d.client();
    let dst = GuestRam::new(0x40000);
    c.dma_map(0x2000_0000, dst.size, RW, Some((dst.fd(), 0)))
        .unwrap();
    c.dma_map(0x1000_0000, 0x40000, RW, None).unwrap();
    // The copy's first read goes to us as a DMA_READ, which we leave unanswered for now.
    start(&mut c, OP_COPY, 0x1000_0000, 0x2000_0000, 0x40000, 0, false);
    let reset_id = c.send(Command::DeviceReset, false, &[], &[]).unwrap();
    let mut stalled = Vec::new();
    loop {
        let f = c.recv_frame().unwrap();
        if f.is_command() {
            // The layout probe (a zero-length DMA_WRITE) and the copy's DMA_READ.
            stalled.push(f);
            continue;
        }
        assert_eq!(
            (f.header.msg_id, f.header.command),
            (reset_id, Command::DeviceReset as u16)
        );
        assert!(f.error().is_none());
        break;
    }
    // Answer the stalled read now, after the reset: the aborted job must not use it.
    for f in stalled {
        let (acc, _) = wire::DmaAccess::read_from_prefix(&f.payload).unwrap();
        let read = f.header.command == Command::DmaRead as u16;
        let data = vec![0xee; if read { acc.count as usize } else { 0 }];
        let reply = vfu_protocol::frame::encode(
            f.header.msg_id,
            f.header.command,
            wire::FLAG_TYPE_REPLY,
            0,
            &[acc.as_bytes(), &data],
        );
        c.send_raw(&reply, &[]).unwrap();
    }
    assert_eq!(c.read_u32(0, STATUS).unwrap(), STATUS_IDLE);
    assert_eq!(c.read_u32(0, COMPLETED).unwrap(), 0);
    // The engine is free again and the destination was never written.
    start(&mut c, OP_FILL, 0, 0x2000_0000, 4, 0x0a0b_0c0d, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(dst.read(0, 4), vec![0x0d, 0x0c, 0x0b, 0x0a]);
    assert!(
        dst.read(4, 0x40000 - 4).iter().all(|b| *b == 0),
        "the reset job wrote after the reset"
    );
    assert!(
        !d.log_text().contains("did not stop"),
        "reset waited for the job to time out"
    );
}

#[test]
fn intx_resample_eventfd_unmasks_the_line_as_kvm_expects() {
    let d = Daemon::start();
    let mut c = d.client();
    let ram = GuestRam::new(0x10000);
    c.dma_map(0, ram.size, RW, Some((ram.fd(), 0))).unwrap();
    let trigger = eventfd();
    let resample = eventfd();
    let eventfd_trigger = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER;
    let eventfd_unmask = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_UNMASK;
    c.set_irqs(irq::INTX, eventfd_trigger, 0, 1, &[trigger.as_fd()], &[])
        .unwrap();
    // QEMU with KVM registers the resample eventfd as INTx's unmask trigger.
    c.set_irqs(irq::INTX, eventfd_unmask, 0, 1, &[resample.as_fd()], &[])
        .unwrap();
    start(&mut c, OP_FILL, 0, 0, 64, 7, true);
    assert_eq!(wait_eventfd(&trigger, Duration::from_secs(10)), 1);
    assert_eq!(wait_idle(&mut c).0, STATUS_DONE);
    // INTx masked itself and the line stays asserted (IRQ_STATUS not acknowledged). On the
    // guest's EOI KVM signals the resample eventfd and sends no UNMASK message: vfud must unmask
    // and, the line still being asserted, signal it again.
    resample.write(1).unwrap();
    assert_eq!(wait_eventfd(&trigger, Duration::from_secs(10)), 1);
    // Masking through an eventfd is not defined by VFIO.
    let mask = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_MASK;
    let e = c
        .set_irqs(irq::INTX, mask, 0, 1, &[resample.as_fd()], &[])
        .unwrap_err();
    assert_eq!(e.server_errno(), Some(nix::errno::Errno::EINVAL));
}
