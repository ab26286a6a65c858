//! The guest side of the real-kernel tier: runs inside a busybox guest next to a `vfud` that
//! serves the guest's virtio-net device (bound to vfio-pci) through iommufd, drives it over the
//! socket with the protocol client, and prints one line per check on the console:
//!
//!   VFUD-GUEST CHECK <tag> <name> PASS|FAIL <detail>
//!
//! The host-side test (`tests/tests/host_vm.rs`) asserts on these lines. Usage:
//!
//!   vfud-host-guest SOCKET TAG --ats yes|no [--full]
//!
//! Without `--full` only the config-space checks run (the policy comparison); with it every
//! check of the issue runs. Built statically (`-C target-feature=+crt-static`) so it runs in a
//! busybox guest. Exits non-zero if any check failed.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vfu_protocol::client::{Client, ClientOptions};
use vfu_protocol::wire;

/// PCI region index of config space.
const CONFIG: u32 = 7;
const EXT_CAP_ID_ATS: u16 = 0x000f;
const CAP_ID_VENDOR: u8 = 0x09;
/// virtio_pci_cap.cfg_type of the common configuration.
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// VIRTIO_F_VERSION_1 is feature bit 32; VIRTIO_NET_F_MAC is bit 5.
const VIRTIO_F_VERSION_1_HIGH: u32 = 1 << 0;
const VIRTIO_NET_F_MAC: u32 = 1 << 5;
/// The IOMMU's interrupt window on x86: reserved in every IOAS a device is attached to.
const X86_MSI_WINDOW: u64 = 0xfee0_0000;
/// An ordinary IOVA for the control map of the same page.
const CONTROL_IOVA: u64 = 0x300_0000;

struct Checks {
    tag: String,
    failed: usize,
}

impl Checks {
    fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        match result {
            Ok(detail) => {
                println!("VFUD-GUEST CHECK {} {name} PASS {detail}", self.tag);
                true
            }
            Err(detail) => {
                println!("VFUD-GUEST CHECK {} {name} FAIL {detail}", self.tag);
                self.failed += 1;
                false
            }
        }
    }
}

fn connect(socket: &Path) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // A generous reply timeout: the guest runs under TCG on a loaded machine.
        let opts = ClientOptions {
            timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        match Client::connect_raw(socket, opts) {
            Ok(mut c) => {
                c.negotiate().map_err(|e| format!("negotiate: {e}"))?;
                return Ok(c);
            }
            Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
            Err(e) if server_exited() => return Err(format!("connect: {e}; vfud exited")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Whether the vfud named by `$VFUD_PID` has exited (gone, or a zombie), so waiting for its
/// socket is pointless.
fn server_exited() -> bool {
    let Some(pid) = std::env::var_os("VFUD_PID") else {
        return false;
    };
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat"));
    match stat {
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_config(c: &mut Client) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for off in (0..4096u64).step_by(1024) {
        out.extend(
            c.region_read(CONFIG, off, 1024)
                .map_err(|e| format!("config read at {off:#x}: {e}"))?,
        );
    }
    Ok(out)
}

/// Extended capability ids in chain order (bounded walk).
fn extended_ids(config: &[u8]) -> Vec<u16> {
    let mut ids = Vec::new();
    let mut at = 0x100usize;
    for _ in 0..64 {
        let header = u32_at(config, at);
        if header == 0 {
            break;
        }
        ids.push((header & 0xffff) as u16);
        at = ((header >> 20) & 0xffc) as usize;
        if at < 0x100 {
            break;
        }
    }
    ids
}

/// (BAR, offset) of the virtio common configuration, from the vendor capabilities.
fn common_cfg(config: &[u8]) -> Option<(u32, u64)> {
    let mut at = usize::from(config[0x34] & 0xfc);
    for _ in 0..48 {
        if at < 0x40 || at + 16 > 256 {
            return None;
        }
        if config[at] == CAP_ID_VENDOR && config[at + 3] == VIRTIO_PCI_CAP_COMMON_CFG {
            return Some((u32::from(config[at + 4]), u64::from(u32_at(config, at + 8))));
        }
        at = usize::from(config[at + 1] & 0xfc);
    }
    None
}

fn config_checks(checks: &mut Checks, c: &mut Client, want_ats: bool) -> Option<Vec<u8>> {
    let config = read_config(c);
    let ok = checks.check(
        "config-identity",
        config.as_ref().map_err(Clone::clone).and_then(|cfg| {
            let (vendor, device) = (u16_at(cfg, 0), u16_at(cfg, 2));
            if vendor == 0x1af4 && device == 0x1041 {
                Ok(format!("vendor={vendor:#06x} device={device:#06x}"))
            } else {
                Err(format!("vendor={vendor:#06x} device={device:#06x}, expected 0x1af4:0x1041 (virtio-net)"))
            }
        }),
    );
    let config = config.ok().filter(|_| ok)?;
    let ids = extended_ids(&config);
    let has_ats = ids.contains(&EXT_CAP_ID_ATS);
    checks.check(
        "ats-policy",
        if has_ats == want_ats {
            Ok(format!(
                "ats={} extended={ids:04x?}",
                if has_ats { "exposed" } else { "masked" }
            ))
        } else {
            Err(format!(
                "ATS {} but expected {}; extended={ids:04x?}",
                if has_ats { "exposed" } else { "masked" },
                if want_ats { "exposed" } else { "masked" }
            ))
        },
    );
    Some(config)
}

fn full_checks(checks: &mut Checks, mut client: Client, config: &[u8], socket: &Path) {
    let c = &mut client;
    checks.check(
        "device-info",
        c.device_info().map_err(|e| e.to_string()).and_then(|i| {
            if i.flags & wire::DEVICE_FLAG_PCI != 0 && i.num_regions >= 9 {
                Ok(format!(
                    "flags={:#x} regions={} irqs={}",
                    i.flags, i.num_regions, i.num_irqs
                ))
            } else {
                Err(format!("flags={:#x} regions={}", i.flags, i.num_regions))
            }
        }),
    );

    // BARs: enable memory decoding (a config write that reaches the device), then read the
    // virtio common configuration's device feature bits through REGION_READ.
    let common = common_cfg(config);
    let features = (|| -> Result<(u32, u64, u64), String> {
        let (bar, off) = common.ok_or("no virtio common-config capability")?;
        let command = u16_at(config, 4) | 0x2;
        c.region_write(CONFIG, 4, &command.to_le_bytes())
            .map_err(|e| format!("enabling memory decoding: {e}"))?;
        let mut words = [0u32; 2];
        for (select, word) in words.iter_mut().enumerate() {
            c.write_u32(bar, off, select as u32)
                .map_err(|e| format!("device_feature_select: {e}"))?;
            *word = c
                .read_u32(bar, off + 4)
                .map_err(|e| format!("device_feature: {e}"))?;
        }
        let features = u64::from(words[1]) << 32 | u64::from(words[0]);
        if words[1] & VIRTIO_F_VERSION_1_HIGH == 0 || words[0] & VIRTIO_NET_F_MAC == 0 {
            return Err(format!(
                "device features {features:#x} lack VERSION_1 or NET_F_MAC"
            ));
        }
        Ok((bar, off, features))
    })();
    checks.check(
        "bar-virtio-features",
        features
            .as_ref()
            .map(|(bar, off, f)| format!("bar={bar} common_cfg={off:#x} device_features={f:#x}"))
            .map_err(Clone::clone),
    );

    // The same BAR through the fd the server hands out: num_queues via mmap == via REGION_READ.
    if let Ok((bar, off, _)) = features {
        checks.check("bar-mmap", mmap_check(c, bar, off));
    }

    // DMA: a memfd-backed map lands in the real IOAS; overlap is refused; the interrupt window
    // (reserved by the kernel in the IOAS, not by vfud's table) is refused; unmap succeeds.
    let dma = (|| -> Result<String, String> {
        let size = 0x20_0000u64;
        let memfd = memfd_create(c"vfud-guest-dma", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| format!("memfd: {e}"))?;
        nix::unistd::ftruncate(&memfd, (size * 2) as i64).map_err(|e| format!("ftruncate: {e}"))?;
        let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
        c.dma_map(0x100_0000, size, rw, Some((memfd.as_fd(), 0)))
            .map_err(|e| format!("DMA_MAP at 0x1000000: {e}"))?;
        let overlap = c.dma_map(0x110_0000, size, rw, Some((memfd.as_fd(), 0)));
        let overlap_errno = match overlap {
            Ok(()) => return Err("an overlapping DMA_MAP was accepted".into()),
            Err(e) => e.server_errno().map_or(format!("{e}"), |n| n.to_string()),
        };
        // The same page at an ordinary IOVA maps: only the IOVA differs in the next map.
        c.dma_map(CONTROL_IOVA, 0x1000, rw, Some((memfd.as_fd(), size)))
            .map_err(|e| format!("DMA_MAP of one page at {CONTROL_IOVA:#x}: {e}"))?;
        c.dma_unmap(CONTROL_IOVA, 0x1000, 0)
            .map_err(|e| format!("DMA_UNMAP at {CONTROL_IOVA:#x}: {e}"))?;
        let reserved = c.dma_map(X86_MSI_WINDOW, 0x1000, rw, Some((memfd.as_fd(), size)));
        let reserved_errno = match reserved {
            Ok(()) => return Err(format!("DMA_MAP at {X86_MSI_WINDOW:#x} (the IOMMU's reserved interrupt window) was accepted: the map did not reach the IOAS")),
            Err(e) => e.server_errno().map_or(format!("{e}"), |n| n.to_string()),
        };
        c.dma_unmap(0x100_0000, size, 0)
            .map_err(|e| format!("DMA_UNMAP: {e}"))?;
        Ok(format!("mapped+unmapped 0x1000000; overlap refused ({overlap_errno}); a page that maps at {CONTROL_IOVA:#x} is refused by the kernel at the interrupt window {X86_MSI_WINDOW:#x} ({reserved_errno})"))
    })();
    checks.check("dma-ioas", dma);

    checks.check("msix-eventfd", irq_check(c, 2));
    checks.check("intx-eventfd-unmask", intx_check(c));
    // ERR (3) and REQ (4): the kernel's error and device-request notifications.
    checks.check(
        "err-req-eventfds",
        irq_check(c, 3)
            .and_then(|err| irq_check(c, 4).map(|req| format!("ERR: {err}; REQ: {req}"))),
    );
    checks.check(
        "device-reset",
        c.reset()
            .map(|()| "VFIO_DEVICE_RESET ok".to_owned())
            .map_err(|e| e.to_string()),
    );

    // Disconnect, then a new client sees the device again.
    drop(client);
    let again = (|| -> Result<String, String> {
        let mut c2 = connect(socket)?;
        let vendor = c2.region_read(CONFIG, 0, 4).map_err(|e| e.to_string())?;
        let features = match common {
            Some((bar, off)) => {
                // The reset and the detach left memory decoding off; enable it again.
                let cfg = c2.region_read(CONFIG, 4, 2).map_err(|e| e.to_string())?;
                let command = u16_at(&cfg, 0) | 0x2;
                c2.region_write(CONFIG, 4, &command.to_le_bytes())
                    .map_err(|e| e.to_string())?;
                c2.write_u32(bar, off, 1).map_err(|e| e.to_string())?;
                c2.read_u32(bar, off + 4).map_err(|e| e.to_string())?
            }
            None => 0,
        };
        if u16_at(&vendor, 0) == 0x1af4 && features & VIRTIO_F_VERSION_1_HIGH != 0 {
            Ok(format!(
                "reconnected: vendor={:#06x} features_hi={features:#x}",
                u16_at(&vendor, 0)
            ))
        } else {
            Err(format!(
                "after reconnect: vendor={:#06x} features_hi={features:#x}",
                u16_at(&vendor, 0)
            ))
        }
    })();
    checks.check("reconnect", again);
}

fn mmap_check(c: &mut Client, bar: u32, common: u64) -> Result<String, String> {
    let (desc, fd) = c
        .region_info(bar)
        .map_err(|e| format!("region info: {e}"))?;
    let fd = fd.ok_or("no fd with the BAR's region info")?;
    let areas = desc
        .caps
        .iter()
        .find_map(|cap| match cap {
            vfu_protocol::reply::RegionCap::SparseMmap(a) => Some(a.clone()),
            _ => None,
        })
        .ok_or("no sparse-mmap areas")?;
    let area = areas
        .iter()
        .find(|a| a.offset <= common && common + 0x14 <= a.offset + a.size)
        .ok_or_else(|| format!("common config {common:#x} is in no mmap area {areas:?}"))?;
    let len = std::num::NonZeroUsize::new(area.size as usize).ok_or("empty area")?;
    // SAFETY: a fresh shared read-only mapping of the device's BAR; only volatile loads inside
    // it are made below, and it is unmapped before returning.
    let base = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &fd,
            (desc.offset + area.offset) as i64,
        )
    }
    .map_err(|e| {
        format!(
            "mmap of the BAR at fd offset {:#x}: {e}",
            desc.offset + area.offset
        )
    })?;
    let at = (common + 0x12 - area.offset) as usize;
    let register = base.as_ptr().cast::<u8>().wrapping_add(at).cast::<u16>();
    // SAFETY: `register` is inside the live mapping (checked above) and 2-byte aligned (the
    // virtio common config is 4-byte aligned); a volatile load of the register's width.
    let via_mmap = unsafe { std::ptr::read_volatile(register) };
    // SAFETY: the mapping made above, unmapped once.
    let _ = unsafe { nix::sys::mman::munmap(base, len.get()) };
    let via_read = c
        .region_read(bar, common + 0x12, 2)
        .map_err(|e| e.to_string())?;
    let via_read = u16_at(&via_read, 0);
    if via_mmap == via_read && via_read > 0 {
        Ok(format!(
            "num_queues={via_read} via mmap of fd offset {:#x} and via REGION_READ",
            desc.offset
        ))
    } else {
        Err(format!(
            "num_queues via mmap {via_mmap} != via REGION_READ {via_read}"
        ))
    }
}

fn irq_check(c: &mut Client, index: u32) -> Result<String, String> {
    let info = c.irq_info(index).map_err(|e| format!("irq info: {e}"))?;
    if info.count == 0 {
        return Err(format!("index {index} has no vectors"));
    }
    let efd = nix::sys::eventfd::EventFd::new().map_err(|e| e.to_string())?;
    c.set_irqs(
        index,
        wire::IRQ_SET_ACTION_TRIGGER | wire::IRQ_SET_DATA_EVENTFD,
        0,
        1,
        &[efd.as_fd()],
        &[],
    )
    .map_err(|e| format!("SET_IRQS with an eventfd: {e}"))?;
    c.set_irqs(
        index,
        wire::IRQ_SET_ACTION_TRIGGER | wire::IRQ_SET_DATA_NONE,
        0,
        0,
        &[],
        &[],
    )
    .map_err(|e| format!("disabling: {e}"))?;
    Ok(format!(
        "{} vectors; vector 0 eventfd accepted and disabled",
        info.count
    ))
}

fn intx_check(c: &mut Client) -> Result<String, String> {
    let efd = nix::sys::eventfd::EventFd::new().map_err(|e| e.to_string())?;
    c.set_irqs(
        0,
        wire::IRQ_SET_ACTION_TRIGGER | wire::IRQ_SET_DATA_EVENTFD,
        0,
        1,
        &[efd.as_fd()],
        &[],
    )
    .map_err(|e| format!("INTx eventfd: {e}"))?;
    c.set_irqs(
        0,
        wire::IRQ_SET_ACTION_UNMASK | wire::IRQ_SET_DATA_NONE,
        0,
        1,
        &[],
        &[],
    )
    .map_err(|e| format!("INTx unmask: {e}"))?;
    c.set_irqs(
        0,
        wire::IRQ_SET_ACTION_TRIGGER | wire::IRQ_SET_DATA_NONE,
        0,
        0,
        &[],
        &[],
    )
    .map_err(|e| format!("INTx disable: {e}"))?;
    Ok("INTx eventfd accepted, unmasked, disabled".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: vfud-host-guest SOCKET TAG --ats yes|no [--full]";
    if args.len() < 5 || args[3] != "--ats" {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let socket = Path::new(&args[1]);
    let want_ats = match args[4].as_str() {
        "yes" => true,
        "no" => false,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let full = args.get(5).is_some_and(|a| a == "--full");
    let mut checks = Checks {
        tag: args[2].clone(),
        failed: 0,
    };
    match connect(socket) {
        Ok(mut c) => {
            checks.check("connect", Ok("negotiated".into()));
            if let Some(config) = config_checks(&mut checks, &mut c, want_ats) {
                if full {
                    full_checks(&mut checks, c, &config, socket);
                }
            }
        }
        Err(e) => {
            checks.check("connect", Err(e));
        }
    }
    println!("VFUD-GUEST CHECKS {} failed={}", checks.tag, checks.failed);
    std::process::exit(i32::from(checks.failed > 0));
}
