//! Tier 4, real kernel: vfud serves a real PCI device through Linux iommufd. A guest kernel
//! built with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV (`tests/vm/guest-kernel.sh`, from
//! Debian's linux-source) boots under TCG with an emulated VT-d (scalable mode) and a
//! `virtio-net-pci,ats=on` behind a PCIe root port. Its init (`tests/vm/guest/host-init`) binds
//! the device to vfio-pci, runs the host-built static `vfud` on it with host-device
//! configurations (ats auto, off, on), and drives each with `vfud-host-guest`, which prints one
//! line per check; these tests assert on those lines and on vfud's log, from the host side.
//!
//! Every test is `#[ignore]`d; `tests/scripts/run-all` runs them as tier 4 with `--ignored` and
//! provides: `VFUD_KERNEL_VM_ROOT` (the chroot with QEMU and the kernel source),
//! `VFUD_GUEST_KERNEL` (the bzImage) and `VFUD_GUEST_BIN_DIR` (statically linked `vfud` and
//! `vfud-host-guest`). One guest boot serves all tests; a boot failure or a guest timeout fails
//! every test with the guest's console attached.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use std::time::Duration;
use vfud_tests::vm::scripts;

/// From QEMU's start to the guest's power-off: the boot takes seconds, the checks under TCG
/// with a debug vfud a few minutes on a loaded machine.
const GUEST_DEADLINE: Duration = Duration::from_secs(900);

/// The runs of the guest: (tag, device config, whether the guest must see ATS, full checks).
const RUNS: &[(&str, &str, bool, bool)] = &[
    (
        "auto",
        r#"{"type": "host", "pci": "0000:01:00.0"}"#,
        true,
        true,
    ),
    (
        "off",
        r#"{"type": "host", "pci": "0000:01:00.0", "ats": "off"}"#,
        false,
        false,
    ),
    (
        "on",
        r#"{"type": "host", "cdev": "/dev/vfio/devices/vfio0", "ats": "on"}"#,
        true,
        false,
    ),
];

/// The checks of the full run, each of which must pass.
const FULL_CHECKS: &[&str] = &[
    "connect",
    "config-identity",
    "ats-policy",
    "device-info",
    "bar-virtio-features",
    "bar-mmap",
    "dma-ioas",
    "msix-eventfd",
    "intx-eventfd-unmask",
    "err-req-eventfds",
    "device-reset",
    "reconnect",
];

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| {
        panic!("{name} is not set; run tests/scripts/run-all (tier 4), which builds the guest kernel and the static binaries")
    }))
}

/// The finished guest: its console.
struct Guest {
    serial: String,
    qemu_stderr: String,
    timed_out: bool,
}

impl Guest {
    fn fail(&self, why: &str) -> ! {
        panic!(
            "{why}\n--- guest console ---\n{}\n--- QEMU stderr ---\n{}",
            self.serial, self.qemu_stderr
        );
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.serial.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// The detail of a passed check; fails the test if the check is missing or failed.
    fn passed(&self, tag: &str, name: &str) -> String {
        let prefix = format!("VFUD-GUEST CHECK {tag} {name} ");
        match self.lines().find_map(|l| l.strip_prefix(prefix.as_str())) {
            Some(rest) if rest.starts_with("PASS") => rest["PASS".len()..].trim().to_owned(),
            Some(rest) => self.fail(&format!("check {name} of run {tag} failed: {rest}")),
            None => self.fail(&format!(
                "the guest did not report check {name} of run {tag}"
            )),
        }
    }

    /// vfud's log lines of one run.
    fn vfud_log(&self, tag: &str) -> Vec<&str> {
        let prefix = format!("VFUD-LOG {tag} ");
        self.lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }
}

fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    let g = GUEST.get_or_init(boot);
    if g.timed_out {
        g.fail(&format!(
            "the guest did not finish within {} s",
            GUEST_DEADLINE.as_secs()
        ));
    }
    if !g.lines().any(|l| l == "VFUD-GUEST DONE") {
        g.fail("the guest did not finish its runs (no \"VFUD-GUEST DONE\")");
    }
    if let Some(fatal) = g.lines().find(|l| l.starts_with("VFUD-GUEST FATAL")) {
        g.fail(fatal);
    }
    g
}

fn boot() -> Guest {
    let root = env_path("VFUD_KERNEL_VM_ROOT");
    let kernel = env_path("VFUD_GUEST_KERNEL");
    let bins = env_path("VFUD_GUEST_BIN_DIR");
    let dir = std::env::temp_dir().join(format!("vfud-host-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("creating the share");
    for bin in ["vfud", "vfud-host-guest"] {
        std::fs::copy(bins.join(bin), share.join(bin))
            .unwrap_or_else(|e| panic!("copying {}: {e}", bins.join(bin).display()));
    }
    let mut runs = String::new();
    for (tag, device, ats, full) in RUNS {
        let config = format!(
            r#"{{"version": 1, "name": "{tag}", "socket": "/tmp/{tag}.sock", "device": {device}}}"#
        );
        std::fs::write(share.join(format!("{tag}.json")), config).expect("writing a config");
        runs.push_str(&format!(
            "{tag} {} {}\n",
            if *ats { "yes" } else { "no" },
            if *full { "--full" } else { "" }
        ));
    }
    std::fs::write(share.join("runs"), runs).expect("writing the runs");
    std::fs::copy(&kernel, dir.join("bzImage")).expect("copying the kernel");
    let initrd = dir.join("initrd.gz");
    let status = Command::new(scripts().join("host-initramfs.sh"))
        .arg(&root)
        .arg(&initrd)
        .status()
        .expect("running tests/vm/host-initramfs.sh");
    assert!(status.success(), "tests/vm/host-initramfs.sh failed");

    let run = vfud_tests::vm::run_qemu(
        &root,
        &dir,
        qemu_args(&dir),
        &dir.join("serial.log"),
        &dir.join("qemu.log"),
        GUEST_DEADLINE,
    );
    let guest = Guest {
        serial: run.serial,
        qemu_stderr: run.stderr,
        timed_out: run.status.is_none(),
    };
    eprintln!("--- guest console ---\n{}", guest.serial);
    let _ = std::fs::remove_dir_all(&dir);
    guest
}

/// The issue's QEMU command line: TCG, q35, VT-d in scalable mode with device-TLB, a root port
/// with an ATS-capable virtio-net, the share read-only over 9p; the kernel command line adds
/// `iommufd.allow_unsafe_interrupts=1` to the issue's `intel_iommu=on,sm_on`.
fn qemu_args(dir: &Path) -> Vec<String> {
    let share = dir.join("share");
    [
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-cpu",
        "max",
        "-m",
        "1G",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-kernel",
        &dir.join("bzImage").display().to_string(),
        "-initrd",
        &dir.join("initrd.gz").display().to_string(),
        "-append",
        // intremap=off leaves MSI unisolated, which iommufd refuses to bind (EPERM) unless
        // told that this platform's interrupts are trusted.
        "console=ttyS0 intel_iommu=on,sm_on iommufd.allow_unsafe_interrupts=1 panic=-1",
        "-device",
        "intel-iommu,intremap=off,caching-mode=on,device-iotlb=on,scalable-mode=on,pasid-bits=20,fsts=on",
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        "-device",
        "virtio-net-pci,bus=rp1,ats=on,disable-legacy=on,romfile=,netdev=n0",
        "-netdev",
        "user,id=n0",
        "-virtfs",
        &format!(
            "local,path={},mount_tag=host,security_model=none,readonly=on",
            share.display()
        ),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn guest_binds_the_virtio_device_to_vfio_pci_with_iommufd() {
    let g = guest();
    let bound = g
        .lines()
        .find(|l| l.starts_with("VFUD-GUEST bound "))
        .unwrap_or_else(|| g.fail("the guest did not report binding the device"));
    for want in [
        "driver=vfio-pci",
        "vfio-dev=vfio0",
        "iommufd=/dev/iommu",
        "cdevs=vfio0",
    ] {
        if !bound.contains(want) {
            g.fail(&format!("after binding, expected {want}: {bound}"));
        }
    }
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn vfud_logs_the_host_iommus_hw_info() {
    let g = guest();
    let log = g.vfud_log("auto");
    let line = log
        .iter()
        .find(|l| l.contains("IOMMU_GET_HW_INFO: capabilities="))
        .unwrap_or_else(|| g.fail("vfud did not log IOMMU_GET_HW_INFO"));
    // QEMU's intel-iommu is VT-d: the raw registers are logged for the vIOMMU resolution.
    for want in [
        "type=intel-vtd",
        "cap_reg=0x",
        "ecap_reg=0x",
        "max_pasid_log2=",
    ] {
        if !line.contains(want) {
            g.fail(&format!("the hw_info line lacks {want}: {line}"));
        }
    }
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn ats_is_exposed_with_auto_masked_with_off_and_on_works() {
    let g = guest();
    for (tag, _, ats, _) in RUNS {
        g.passed(tag, "connect");
        g.passed(tag, "config-identity");
        let detail = g.passed(tag, "ats-policy");
        let want = if *ats { "ats=exposed" } else { "ats=masked" };
        if !detail.starts_with(want) {
            g.fail(&format!("run {tag}: {detail}, expected {want}"));
        }
    }
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn bar_reads_return_the_real_virtio_feature_bits() {
    let g = guest();
    g.passed("auto", "device-info");
    let detail = g.passed("auto", "bar-virtio-features");
    // The device's own feature bits, read from its BAR through VFIO: a modern virtio-net
    // offers VERSION_1 (bit 32) and MAC (bit 5); a BAR that reads as zeros or all-ones fails.
    let features = detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix("device_features=0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| g.fail(&format!("no feature bits reported: {detail}")));
    if features & (1 << 32) == 0 || features & (1 << 5) == 0 || features == u64::MAX {
        g.fail(&format!(
            "device features {features:#x} lack VERSION_1 or NET_F_MAC"
        ));
    }
    g.passed("auto", "bar-mmap");
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn dma_maps_of_a_memfd_land_in_the_ioas_and_unmap_succeeds() {
    let g = guest();
    g.passed("auto", "dma-ioas");
    let log = g.vfud_log("auto");
    if !log
        .iter()
        .any(|l| l.contains("DMA map mirrored into the IOAS") && l.contains("0x1000000"))
    {
        g.fail("vfud did not log mirroring the DMA map at 0x1000000 into the IOAS");
    }
    if !log
        .iter()
        .any(|l| l.contains("IOMMU_IOAS_UNMAP: DMA map removed") && l.contains("0x1000000"))
    {
        g.fail("vfud did not log unmapping 0x1000000 from the IOAS");
    }
    if !log
        .iter()
        .any(|l| l.contains("DMA map mirrored into the IOAS") && l.contains("0x3000000"))
    {
        g.fail("vfud did not mirror the control map of the page at 0x3000000");
    }
    if !log
        .iter()
        .any(|l| l.contains("0xfee00000") && l.contains("failed"))
    {
        g.fail("vfud did not log the kernel refusing a map of the interrupt window");
    }
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn device_reset_and_interrupt_eventfds_are_accepted_by_the_kernel() {
    let g = guest();
    g.passed("auto", "msix-eventfd");
    g.passed("auto", "intx-eventfd-unmask");
    g.passed("auto", "err-req-eventfds");
    g.passed("auto", "device-reset");
}

#[test]
#[ignore = "tier 4: needs the guest kernel and QEMU chroot; run by tests/scripts/run-all"]
fn a_client_can_disconnect_and_reconnect() {
    let g = guest();
    g.passed("auto", "reconnect");
    for check in FULL_CHECKS {
        g.passed("auto", check);
    }
    for (tag, ..) in RUNS {
        let exit = format!("VFUD-GUEST RUN {tag} EXIT 0");
        if !g.lines().any(|l| l == exit) {
            g.fail(&format!("run {tag} did not exit 0"));
        }
    }
}
