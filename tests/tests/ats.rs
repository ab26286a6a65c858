//! Protocol tier, ATS: the real `vfud` binary with a guest that enables ATS in the ats-dma
//! device's config space. The engine then translates through its ATC and the shadow source
//! (the client's DMA maps); a DMA_UNMAP is the device-TLB invalidation.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use vfu_protocol::client::DmaHandler;
use vfu_protocol::wire::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL};
use vfud_tests::ats_dma::*;
use vfud_tests::{Daemon, GuestRam, MessageRam};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
/// Guest RAM IOVA, 2 MiB aligned so the shadow source can answer with 2 MiB translations.
const RAM: u64 = 0x4000_0000;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
        .collect()
}

#[test]
fn ats_dma_misses_then_hits_on_a_repeat_and_untranslated_dma_is_unchanged() {
    let d = Daemon::start();
    let mut c = d.client();
    let ram = GuestRam::new(4 << 20);
    c.dma_map(RAM, ram.size, RW, Some((ram.fd(), 0))).unwrap();
    let data = pattern(128 << 10, 7);
    ram.write(0x1000, &data);

    // ATS disabled: untranslated DMA, no ATC activity at all.
    start(
        &mut c,
        OP_COPY,
        RAM + 0x1000,
        RAM + 0x20_0000,
        1 << 17,
        0,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.read(0x20_0000, data.len()), data);
    let idle = atc_counters(&mut c);
    assert_eq!(
        (idle.requests, idle.hits, idle.misses, idle.entries),
        (0, 0, 0, 0)
    );

    enable_ats(&mut c, 0);
    let data = pattern(128 << 10, 9);
    ram.write(0x1000, &data);
    start(
        &mut c,
        OP_COPY,
        RAM + 0x1000,
        RAM + 0x30_0000,
        1 << 17,
        0,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(ram.read(0x30_0000, data.len()), data);
    let first = atc_counters(&mut c);
    assert!(first.misses >= 1 && first.requests >= 1, "{first:?}");
    assert!(first.entries >= 1, "{first:?}");

    start(
        &mut c,
        OP_COPY,
        RAM + 0x1000,
        RAM + 0x30_0000,
        1 << 17,
        0,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    let again = atc_counters(&mut c);
    assert_eq!(
        (again.misses, again.requests),
        (first.misses, first.requests),
        "the repeat is served from the ATC: {again:?}"
    );
    assert!(again.hits > first.hits, "{again:?}");

    // CHECKSUM through the ATC reads what is there.
    start(&mut c, OP_CHECKSUM, RAM + 0x30_0000, 0, 1 << 17, 0, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(c.read_u32(0, RESULT).unwrap(), crc32fast::hash(&data));
}

#[test]
fn a_read_only_map_translates_for_reads_and_faults_writes() {
    let d = Daemon::start();
    let mut c = d.client();
    let ro = GuestRam::new(1 << 20);
    let rw = GuestRam::new(1 << 20);
    c.dma_map(RAM, ro.size, DMA_MAP_FLAG_READ, Some((ro.fd(), 0)))
        .unwrap();
    c.dma_map(RAM + (1 << 20), rw.size, RW, Some((rw.fd(), 0)))
        .unwrap();
    let data = pattern(8192, 3);
    ro.write(0, &data);
    enable_ats(&mut c, 0);
    start(&mut c, OP_COPY, RAM, RAM + (1 << 20), 8192, 0, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(rw.read(0, 8192), data);
    start(&mut c, OP_FILL, 0, RAM + 0x4000, 16, 0x55, false);
    assert_eq!(wait_idle(&mut c), (STATUS_ERROR, ERR_TRANSLATION));
    assert_eq!(fault_addr(&mut c), RAM + 0x4000);
    assert_eq!(ro.read(0x4000, 16), vec![0; 16], "nothing written");
}

/// Answers no DMA request; counts them. Installed once the test must see the device idle.
#[derive(Debug, Clone, Default)]
struct Refusing(Arc<AtomicU32>);

impl DmaHandler for Refusing {
    fn dma_read(&mut self, _: u64, _: usize) -> Result<Vec<u8>, Errno> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Err(Errno::EIO)
    }
    fn dma_write(&mut self, _: u64, _: &[u8]) -> Result<(), Errno> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Err(Errno::EIO)
    }
}

/// A 1 MiB COPY from fd-less memory (every 64 KiB chunk needs the client's DMA_READ answer,
/// which the test client gives only while it waits for a reply) into two 512 KiB maps; the
/// second is unmapped while the command is still in the first. Without waiting, DMA_UNMAP
/// would reply with the command several client round trips from its end. It must reply after
/// the command ended: at reply time COMPLETED has moved, the first map holds the whole first
/// half, and the device asks the client for nothing more.
#[test]
fn dma_unmap_replies_after_the_running_ats_command_ended_and_the_range_then_faults() {
    let d = Daemon::start();
    let mut c = d.client();
    let src = MessageRam::default();
    c.set_dma_handler(Box::new(src.clone()));
    const SRC: u64 = 0x8000_0000;
    const LEN: u32 = 1 << 20;
    const HALF: u64 = 1 << 19;
    c.dma_map(SRC, u64::from(LEN), RW, None).unwrap();
    let data = pattern(LEN as usize, 5);
    src.store(SRC, &data);
    let first = GuestRam::new(HALF);
    let second = GuestRam::new(HALF);
    c.dma_map(RAM, HALF, RW, Some((first.fd(), 0))).unwrap();
    c.dma_map(RAM + HALF, HALF, RW, Some((second.fd(), 0)))
        .unwrap();
    enable_ats(&mut c, 0);
    assert_eq!(c.read_u32(0, COMPLETED).unwrap(), 0);

    start(&mut c, OP_COPY, SRC, RAM, LEN, 0, false);
    c.dma_unmap(RAM + HALF, HALF, 0).unwrap();
    // State at reply time. From here on the client answers no DMA request.
    let first_at_reply = first.read(0, HALF as usize);
    let second_at_reply = second.read(0, HALF as usize);
    let late = Refusing::default();
    c.set_dma_handler(Box::new(late.clone()));
    assert_eq!(
        c.read_u32(0, COMPLETED).unwrap(),
        1,
        "the command ended before DMA_UNMAP replied"
    );
    assert_eq!(
        first_at_reply,
        data[..HALF as usize],
        "the command ran to the unmapped range before the reply"
    );
    assert_eq!(second_at_reply, vec![0; HALF as usize]);
    assert_eq!(
        (
            c.read_u32(0, STATUS).unwrap(),
            c.read_u32(0, ERROR).unwrap()
        ),
        (STATUS_ERROR, ERR_TRANSLATION)
    );
    assert_eq!(fault_addr(&mut c), RAM + HALF);
    let counters = atc_counters(&mut c);
    assert!(counters.invalidations >= 1, "{counters:?}");

    // The next command on the range finds no translation, reports it, writes nothing.
    start(
        &mut c,
        OP_FILL,
        0,
        RAM + HALF + 0x100,
        64,
        0xdead_beef,
        false,
    );
    assert_eq!(wait_idle(&mut c), (STATUS_ERROR, ERR_TRANSLATION));
    assert_eq!(fault_addr(&mut c), RAM + HALF + 0x100);
    assert_eq!(c.read_u32(0, COMPLETED).unwrap(), 2);
    assert_eq!(second.read(0, HALF as usize), vec![0; HALF as usize]);
    assert_eq!(first.read(0, HALF as usize), first_at_reply);
    assert_eq!(late.0.load(Ordering::Relaxed), 0, "no DMA after the reply");
    // The daemon is fine and the source still works.
    c.set_dma_handler(Box::new(src.clone()));
    start(&mut c, OP_CHECKSUM, SRC, 0, 4096, 0, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(
        c.read_u32(0, RESULT).unwrap(),
        crc32fast::hash(&data[..4096])
    );
}

#[test]
fn unmap_all_empties_the_atc() {
    let d = Daemon::start();
    let mut c = d.client();
    let a = GuestRam::new(1 << 20);
    let b = GuestRam::new(1 << 20);
    c.dma_map(RAM, a.size, RW, Some((a.fd(), 0))).unwrap();
    c.dma_map(RAM + (4 << 20), b.size, RW, Some((b.fd(), 0)))
        .unwrap();
    enable_ats(&mut c, 0);
    start(&mut c, OP_COPY, RAM, RAM + (4 << 20), 8192, 0, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    let before = atc_counters(&mut c);
    assert!(before.entries >= 2, "{before:?}");

    c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    let after = atc_counters(&mut c);
    assert_eq!(after.entries, 0, "{after:?}");
    assert!(after.invalidations > before.invalidations);
    start(&mut c, OP_FILL, 0, RAM + (4 << 20), 16, 1, false);
    assert_eq!(wait_idle(&mut c), (STATUS_ERROR, ERR_TRANSLATION));
    assert_eq!(b.read(0, 16), vec![0; 16]);

    // A fresh map at the same IOVA is translated again, to the new memory.
    let fresh = GuestRam::new(1 << 20);
    c.dma_map(RAM + (4 << 20), fresh.size, RW, Some((fresh.fd(), 0)))
        .unwrap();
    start(&mut c, OP_FILL, 0, RAM + (4 << 20), 16, 0x0101_0101, false);
    assert_eq!(wait_idle(&mut c), (STATUS_DONE, ERR_NONE));
    assert_eq!(fresh.read(0, 16), vec![1; 16]);
    assert_eq!(b.read(0, 16), vec![0; 16]);
}

/// `vfud resolve`: the first device in file order freezes the model; a later device whose host
/// cannot honour it is refused with the reason; the QEMU argument matches the frozen values.
#[test]
fn vfud_resolve_freezes_at_the_first_device_and_refuses_an_incompatible_one() {
    let dir = std::env::temp_dir().join(format!("vfud-resolve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Grace-like host: 2-level stream table, AArch64, little-endian, ATS, 32 SID bits,
    // 20 SSID bits, RIL, 48-bit OAS, 4K+64K granules.
    const GRACE: &str = r#"["0x08400409", "0x520", "0x0", "0x400", "0x0", "0x55"]"#;
    const NO_RIL: &str = r#"["0x08400409", "0x520", "0x0", "0x0", "0x0", "0x55"]"#;
    let write = |name: &str, idr: &str, extra: &str| {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(
            &path,
            format!(
                r#"{{"version":1,"name":"{name}","socket":"{}/{name}.sock","device":{{"type":"emulated","model":"ats-dma"{extra},"viommu":{{"model":"smmuv3","host":{{"idr":{idr}}}}}}}}}"#,
                dir.display()
            ),
        )
        .unwrap();
        path
    };
    let gpu0 = write("gpu0", GRACE, "");
    let gpu1 = write("gpu1", GRACE, r#","iommu":{"ats_supported":false}"#);
    let gpu2 = write("gpu2", NO_RIL, "");
    let run = |files: &[&std::path::Path]| {
        let mut cmd = std::process::Command::new(vfud_tests::vfud_bin());
        cmd.arg("resolve");
        for f in files {
            cmd.arg("--config").arg(f);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = run(&[&gpu0, &gpu1]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "viommu: model=smmuv3 ats=true ril=true ssidsize=20 oas=48 (frozen at device gpu0)"
        ),
        "{out}"
    );
    assert!(
        out.contains("qemu: -device arm-smmuv3,accel=on,ats=on,ril=on,ssidsize=20,oas=48"),
        "{out}"
    );
    assert!(
        out.contains("gpu0: ok, ats=on nesting-parent hwpt flags=NEST_PARENT\n"),
        "{out}"
    );
    assert!(
        out.contains("gpu1: ok, ats=off"),
        "ATS is per device: {out}"
    );

    let (ok, out) = run(&[&gpu0, &gpu2]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("gpu2: refused: device gpu2: its host IOMMU cannot honour the vIOMMU frozen at device gpu0: ril=true was frozen but this host has no range invalidation (IDR3.RIL=0)"),
        "{out}"
    );
    // In the other order the RIL-less host freezes ril=false and both are served.
    let (ok, out) = run(&[&gpu2, &gpu0]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ril=false") && out.contains("ril=off"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vfud run` freezes the vIOMMU model at the first device that names one: a later device
/// whose host cannot honour it is refused (the others serve), and each device's ATS follows
/// the frozen model and its own host.
#[test]
fn vfud_run_freezes_the_viommu_at_the_first_device_and_refuses_an_incompatible_one() {
    const GRACE: &str = r#"["0x08400409", "0x520", "0x0", "0x400", "0x0", "0x55"]"#;
    const NO_RIL: &str = r#"["0x08400409", "0x520", "0x0", "0x0", "0x0", "0x55"]"#;
    let device = |idr: &str, extra: &str| {
        format!(
            r#"{{"type":"emulated","model":"ats-dma"{extra},"viommu":{{"model":"smmuv3","host":{{"idr":{idr}}}}}}}"#
        )
    };
    let gpu0 = device(GRACE, "");
    let gpu1 = device(GRACE, r#","iommu":{"ats_supported":false}"#);
    let gpu2 = device(NO_RIL, "");
    let d = Daemon::start_with_configs(&[("gpu0", &gpu0), ("gpu1", &gpu1), ("gpu2", &gpu2)]);

    let guest_ats = |name: &str| {
        let mut c = d.client_of(name);
        let config = c
            .region_read(vfu_protocol::command::region::CONFIG, 0, 4096)
            .expect("config space");
        vfud::pci::CapabilityChain::parse(&config)
            .expect("the guest's chains")
            .find_extended(0x000f)
            .is_some()
    };
    assert!(
        guest_ats("gpu0"),
        "the frozen model offers ATS and gpu0's host allows it"
    );
    assert!(
        !guest_ats("gpu1"),
        "gpu1's host reports ATS unusable, so the model gives it none"
    );
    assert!(
        !d.socket_of("gpu2").exists(),
        "gpu2 cannot honour ril=true frozen at gpu0 and must not serve"
    );
    let log = d.log_plain();
    assert!(
        log.lines()
            .any(|l| l.contains("gpu2") && l.contains("frozen at device gpu0")),
        "{log}"
    );
}
