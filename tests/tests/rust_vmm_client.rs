//! Interop: an independent client implementation, the rust-vmm `vfio_user` crate (the one
//! cloud-hypervisor uses), drives vfud through the happy path.
//!
//! That client reads fixed-size replies and does not check the Error flag, so any size or
//! layout mistake on our side shows up here as a hang (bounded by the socket timeout set below)
//! or as garbage values.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_user::Client;
use vfu_protocol::command::{irq, region};
use vfud::device::emulated::ats_dma::{BAR0_SIZE, BAR2_SIZE};
use vfud_tests::ats_dma::*;
use vfud_tests::{eventfd, wait_eventfd, Daemon, GuestRam};

fn read_u32(c: &mut Client, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn write_u32(c: &mut Client, offset: u64, v: u32) {
    c.region_write(0, offset, &v.to_le_bytes()).unwrap();
}

#[test]
fn rust_vmm_client_happy_path() {
    let d = Daemon::start();
    // Bound every blocking read of the foreign client: connect through a watchdog thread that
    // fails the test instead of hanging CI if the daemon ever stops answering.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            eprintln!("rust-vmm client test hung for 60 s");
            std::process::exit(101);
        }
    });

    let mut c = Client::new(&d.socket).expect("rust-vmm client connects and enumerates");
    let bar0 = c.region(0).expect("BAR0 reported");
    assert_eq!(bar0.size, BAR0_SIZE);
    let bar2 = c.region(2).expect("BAR2 reported");
    assert_eq!(bar2.size, BAR2_SIZE);
    assert_ne!(bar2.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(
        bar2.file_offset.is_some(),
        "the BAR2 fd reaches this client too"
    );
    assert_eq!(bar2.sparse_areas.len(), 1);
    assert_eq!(c.region(region::CONFIG).unwrap().size, 4096);

    let mut id = [0u8; 4];
    c.region_read(region::CONFIG, 0, &mut id).unwrap();
    assert_eq!(id, [0x36, 0x1b, 0xfd, 0x00]);
    assert_eq!(c.get_irq_info(irq::MSIX).unwrap().count, 4);

    let ram = GuestRam::new(0x100000);
    ram.write(0x100, b"independent client");
    c.dma_map(0, 0x2000_0000, ram.size, ram.fd().as_raw_fd())
        .unwrap();

    let ev = eventfd();
    c.set_irqs(
        irq::MSIX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[ev.as_fd().as_raw_fd()],
    )
    .unwrap();

    write_u32(&mut c, SRC_LO, 0x2000_0100);
    write_u32(&mut c, SRC_HI, 0);
    write_u32(&mut c, DST_LO, 0x2008_0000);
    write_u32(&mut c, DST_HI, 0);
    write_u32(&mut c, LEN, 18);
    write_u32(&mut c, CMD, OP_COPY | CMD_IRQ);
    assert_eq!(wait_eventfd(&ev, Duration::from_secs(10)), 1);
    assert_eq!(read_u32(&mut c, STATUS), STATUS_DONE);
    assert_eq!(ram.read(0x80000, 18), b"independent client");

    c.dma_unmap(0x2000_0000, ram.size).unwrap();
    c.reset().unwrap();
    assert_eq!(read_u32(&mut c, SRC_LO), 0);
    c.shutdown().unwrap();
    drop(c);
    let _ = done_tx.send(());
    watchdog.join().unwrap();
}
