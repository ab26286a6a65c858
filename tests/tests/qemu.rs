//! Tier 3, VMM interop: real QEMU (`-device vfio-user-pci`, QEMU >= 10.1 from Debian
//! trixie-backports) boots a Linux guest under TCG that finds and drives vfud's ats-dma device.
//!
//! QEMU, the guest kernel and busybox come from the cached Debian chroot that
//! `tests/vm/chroot.sh` builds (`$VFUD_VM_ROOT` names a ready one); QEMU runs inside it through
//! `tests/vm/chroot-run.sh`, with the daemon's directory (its socket) bind-mounted. The guest is
//! the chroot's kernel plus an initramfs from `tests/vm/initramfs.sh` whose test program
//! (`tests/vm/guest/ats-dma-test.c`) reports every check on the serial console; these tests
//! assert on that output, QEMU's exit status and vfud's log, from the host side.
//!
//! Every test is `#[ignore]`d so that the protocol tier (`cargo test --tests`) skips it:
//! `tests/scripts/run-all` runs them as tier 3 with `--ignored`. They need root for the chroot
//! (or password-less sudo), gcc with a static libc, cpio, and the Debian mirror the first time.
//! Every wait has a deadline; on failure the serial console, QEMU's stderr and vfud's log are
//! printed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vfud_tests::vm::{privileged, scripts};
use vfud_tests::Daemon;

/// How long one guest may take from QEMU's start to its exit (a boot takes seconds).
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// How long vfud may take to log a disconnect after QEMU exited.
const DISCONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// The device configuration (the `"device"` object of a vfud config file) of the default runs.
const ATS_AUTO: &str = r#"{"type":"emulated","model":"ats-dma"}"#;

/// The capability-policy comparison: device configurations, each with whether the guest must
/// find ATS (extended capability 0x000f). Add policies to compare here.
const POLICY_RUNS: &[(&str, &str, bool)] = &[
    ("ats=auto", ATS_AUTO, true),
    (
        "ats=off",
        r#"{"type":"emulated","model":"ats-dma","ats":"off"}"#,
        false,
    ),
];

const EXT_CAP_ID_ATS: u16 = 0x000f;

/// The chroot with QEMU and the guest's kernel, and the guest's initramfs.
struct Vm {
    root: PathBuf,
    /// The kernel, as a path inside the chroot.
    kernel: PathBuf,
    initrd: PathBuf,
}

fn vm() -> &'static Vm {
    static VM: OnceLock<Vm> = OnceLock::new();
    VM.get_or_init(|| {
        let root = match std::env::var_os("VFUD_VM_ROOT") {
            Some(r) => PathBuf::from(r),
            None => {
                let out = privileged(&scripts().join("chroot.sh"))
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("running tests/vm/chroot.sh");
                assert!(out.status.success(), "tests/vm/chroot.sh failed");
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        let info = std::fs::read_to_string(root.join(".vfud-chroot-info"))
            .unwrap_or_else(|e| panic!("{} is not a vfud chroot: {e}", root.display()));
        eprintln!("VM chroot {}:\n{info}", root.display());
        let mut kernels: Vec<String> = std::fs::read_dir(root.join("boot"))
            .expect("the chroot's /boot")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("vmlinuz-"))
            .collect();
        kernels.sort();
        let kernel = Path::new("/boot").join(kernels.last().expect("a kernel in the chroot"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vfud-qemu");
        std::fs::create_dir_all(&dir).expect("creating the initramfs directory");
        let initrd = dir.join("initrd.gz");
        let status = Command::new(scripts().join("initramfs.sh"))
            .arg(&root)
            .arg(&initrd)
            .status()
            .expect("running tests/vm/initramfs.sh");
        assert!(status.success(), "tests/vm/initramfs.sh failed");
        Vm {
            root,
            kernel,
            initrd,
        }
    })
}

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ram {
    /// `memory-backend-memfd`: QEMU passes an fd with every DMA_MAP; vfud maps guest RAM.
    Memfd,
    /// Plain anonymous RAM: DMA_MAP comes without fds; vfud's DMA goes through
    /// DMA_READ / DMA_WRITE messages that QEMU services.
    Anonymous,
}

/// The QEMU arguments of a guest attached to `socket`; the README's command line.
fn qemu_args(socket: &Path, ram: Ram, vm: &Vm, initrd: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["-accel", "tcg", "-nographic", "-no-reboot", "-nodefaults"]
        .map(String::from)
        .to_vec();
    match ram {
        Ram::Memfd => args.extend(
            [
                "-machine",
                "q35,memory-backend=mem",
                "-object",
                "memory-backend-memfd,id=mem,size=512M",
            ]
            .map(String::from),
        ),
        Ram::Anonymous => args.extend(["-machine", "q35", "-m", "512M"].map(String::from)),
    }
    args.extend(
        [
            "-serial",
            "stdio",
            "-kernel",
            &vm.kernel.display().to_string(),
            "-initrd",
            &initrd.display().to_string(),
            "-append",
            "console=ttyS0 panic=-1",
            "-device",
            "pcie-root-port,id=rp0,chassis=1",
            "-device",
        ]
        .map(String::from),
    );
    args.push(
        serde_json::json!({
            "driver": "vfio-user-pci",
            "socket": {"path": socket, "type": "unix"},
            "bus": "rp0",
        })
        .to_string(),
    );
    args
}

/// One finished guest.
struct Boot {
    tag: String,
    status: ExitStatus,
    serial: String,
    stderr: String,
}

impl Boot {
    /// Panics with everything a reader needs: the console, QEMU's stderr (vfud's log is
    /// printed by the daemon when the panic unwinds through it).
    fn fail(&self, why: &str) -> ! {
        panic!(
            "{}: {why}\n--- serial console ---\n{}\n--- QEMU stderr ---\n{}",
            self.tag, self.serial, self.stderr
        );
    }

    /// The guest's report lines, without the "VFUD-GUEST " prefix.
    fn report(&self) -> Vec<&str> {
        self.serial
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("VFUD-GUEST "))
            .collect()
    }

    fn line(&self, prefix: &str) -> &str {
        self.report()
            .into_iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| self.fail(&format!("the guest did not report \"{prefix}\"")))
    }
}

/// Boots a guest attached to `daemon`'s device socket and waits (bounded) for QEMU to exit.
fn boot(daemon: &Daemon, ram: Ram, tag: &str) -> Boot {
    let vm = vm();
    // The initramfs goes next to the socket: one bind mount, inside the chroot's /tmp tmpfs.
    let initrd = daemon.dir.join("initrd.gz");
    std::fs::copy(&vm.initrd, &initrd).expect("copying the initramfs");
    let serial_path = daemon.dir.join(format!("{tag}.serial.log"));
    let stderr_path = daemon.dir.join(format!("{tag}.qemu.log"));
    let run = vfud_tests::vm::run_qemu(
        &vm.root,
        &daemon.dir,
        qemu_args(&daemon.socket, ram, vm, &initrd),
        &serial_path,
        &stderr_path,
        BOOT_DEADLINE,
    );
    let status = run.status;
    let b = Boot {
        tag: tag.to_string(),
        status: status.unwrap_or_default(),
        serial: run.serial,
        stderr: run.stderr,
    };
    if status.is_none() {
        b.fail(&format!(
            "QEMU did not exit within {} s",
            BOOT_DEADLINE.as_secs()
        ));
    }
    b
}

/// The capability IDs the guest found: (standard, extended).
struct Caps {
    standard: BTreeSet<u16>,
    extended: BTreeSet<u16>,
}

fn parse_ids(list: &str) -> BTreeSet<u16> {
    list.split(',')
        .filter(|s| *s != "-" && !s.is_empty())
        .map(|s| u16::from_str_radix(s, 16).unwrap_or(u16::MAX))
        .collect()
}

/// Asserts everything the guest reports for a passing run and returns the capabilities it saw.
fn assert_guest_passed(b: &Boot) -> Caps {
    if !b.status.success() {
        b.fail(&format!("QEMU exited with {}", b.status));
    }
    // A panic or a missed poweroff also ends QEMU with 0 (-no-reboot); the markers decide.
    if !b.report().contains(&"RESULT PASS") || !b.report().contains(&"EXIT 0") {
        b.fail("the guest did not report RESULT PASS and EXIT 0");
    }
    let device = b.line("device ");
    if !device.contains("vendor=0x1b36 device=0x00fd") {
        b.fail("the device's IDs are not ats-dma's");
    }
    if !b.line("bar0 ").contains("id=0x414d4441") {
        b.fail("BAR0's ID register is wrong");
    }
    for check in [
        "dma fill ok",
        "dma copy ok",
        "dma checksum ok",
        "driver uio_pci_generic bound",
        "irq round 1 ok",
        "irq round 2 ok",
    ] {
        b.line(check);
    }
    // Interrupts were counted by the guest kernel, not only seen by the test program.
    for round in ["irq round 1 ok", "irq round 2 ok"] {
        let line = b.line(round);
        let counts = line
            .split_once("proc_interrupts=")
            .and_then(|(_, c)| c.split_once("->"))
            .and_then(|(a, z)| Some((a.parse::<i64>().ok()?, z.trim().parse::<i64>().ok()?)));
        match counts {
            Some((before, after)) if after > before => {}
            _ => b.fail(&format!("{round}: /proc/interrupts did not rise: {line}")),
        }
    }
    for line in b.stderr.lines() {
        let l = line.to_ascii_lowercase();
        if l.contains("vfio") && (l.contains("warning") || l.contains("error")) {
            b.fail(&format!("QEMU complained about the device: {line}"));
        }
    }
    let caps = b.line("caps ");
    let field = |name: &str| {
        caps.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(parse_ids)
            .unwrap_or_else(|| b.fail(&format!("no {name} in \"{caps}\"")))
    };
    let found = Caps {
        standard: field("std="),
        extended: field("ext="),
    };
    eprintln!("{}: QEMU {}; guest: {device}; {caps}", b.tag, b.status);
    // PM, MSI, PCI Express, MSI-X.
    for id in [0x01, 0x05, 0x10, 0x11] {
        if !found.standard.contains(&id) {
            b.fail(&format!("standard capability {id:#04x} missing: {caps}"));
        }
    }
    // Where the guest sees ATS it enabled it and DMA went through the device's ATC.
    if found.extended.contains(&EXT_CAP_ID_ATS) {
        eprintln!("{}: {}", b.tag, b.line("ats ok "));
    } else {
        b.line("ats absent");
    }
    found
}

/// Waits until vfud has logged `n` disconnects of clients that closed their connection.
fn wait_for_disconnects(d: &Daemon, n: usize) {
    let deadline = Instant::now() + DISCONNECT_DEADLINE;
    loop {
        let seen = d
            .log_plain()
            .lines()
            .filter(|l| {
                l.contains("client disconnected") && l.contains("client closed the connection")
            })
            .count();
        if seen >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vfud logged {seen} of {n} client disconnects:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// vfud's log of its `n`th client (1-based): from its "client connected" line to the next.
fn client_log(d: &Daemon, n: usize) -> String {
    let log = d.log_plain();
    let marker = format!("client={n} ");
    let mut lines = log
        .lines()
        .skip_while(|l| !(l.contains("client connected") && l.contains(&marker)));
    let mut out: Vec<&str> = lines.next().into_iter().collect();
    out.extend(lines.take_while(|l| !l.contains("client connected")));
    out.join("\n")
}

/// Guest RAM as vfud saw it mapped in a client's session: (RAM maps with an fd, without).
/// RAM is what is 16 MiB or larger; QEMU also maps small ranges, among them the device's own
/// mmapped BAR2 (for peer-to-peer DMA), which never come with an fd.
fn ram_maps(session: &str) -> (usize, usize) {
    let ram: Vec<&str> = session
        .lines()
        .filter(|l| l.contains(" DMA_MAP "))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("size=0x"))
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .is_some_and(|size| size >= 16 << 20)
        })
        .collect();
    let fd = ram.iter().filter(|l| l.contains("backing=\"fd\"")).count();
    (fd, ram.len() - fd)
}

#[test]
#[ignore = "tier 3 (QEMU): run by tests/scripts/run-all with --ignored"]
fn guest_drives_ats_dma_over_fd_backed_ram_and_a_second_qemu_reconnects() {
    let d = Daemon::start_with_configs(&[("qemu0", ATS_AUTO)]);
    for (n, tag) in [(1, "first"), (2, "second")] {
        let b = boot(&d, Ram::Memfd, tag);
        let caps = assert_guest_passed(&b);
        if !caps.extended.contains(&EXT_CAP_ID_ATS) {
            b.fail("ATS is missing with the default policy");
        }
        // The same vfud served this QEMU, saw it leave, released its memory, and kept serving.
        wait_for_disconnects(&d, n);
        let session = client_log(&d, n);
        let (with_fd, without) = ram_maps(&session);
        assert!(
            with_fd > 0 && without == 0,
            "{tag}: memfd-backed RAM should be mapped with fds ({with_fd} with, {without} without):\n{session}"
        );
        assert!(
            session.contains("DMA maps released"),
            "{tag}: no cleanup logged:\n{session}"
        );
    }
}

#[test]
#[ignore = "tier 3 (QEMU): run by tests/scripts/run-all with --ignored"]
fn guest_drives_ats_dma_through_dma_read_and_dma_write_without_fd_backed_ram() {
    let d = Daemon::start_with_configs(&[("qemu0", ATS_AUTO)]);
    let b = boot(&d, Ram::Anonymous, "message-dma");
    assert_guest_passed(&b);
    wait_for_disconnects(&d, 1);
    let session = client_log(&d, 1);
    let (with_fd, without) = ram_maps(&session);
    assert!(
        with_fd == 0 && without > 0,
        "anonymous RAM should be mapped without fds ({with_fd} with, {without} without):\n{session}"
    );
    // vfud probed QEMU's DMA_READ/DMA_WRITE layout and QEMU answered as the spec says.
    assert!(
        session.contains("client's DMA_READ/DMA_WRITE layout") && session.contains("specification"),
        "no DMA layout probe result in the log:\n{session}"
    );
    assert!(
        !session.contains("message DMA failed"),
        "message DMA failed:\n{session}"
    );
}

#[test]
#[ignore = "tier 3 (QEMU): run by tests/scripts/run-all with --ignored"]
fn guest_sees_the_capabilities_the_ats_policy_exposes() {
    let mut seen = Vec::new();
    for (tag, device, ats) in POLICY_RUNS {
        let d = Daemon::start_with_configs(&[("qemu0", device)]);
        let b = boot(&d, Ram::Memfd, &tag.replace('=', "-"));
        let caps = assert_guest_passed(&b);
        if caps.extended.contains(&EXT_CAP_ID_ATS) != *ats {
            b.fail(&format!(
                "with {tag} the guest should {}find ATS (0x000f)",
                if *ats { "" } else { "not " }
            ));
        }
        seen.push((tag, caps));
    }
    // Only the extended chain differs between policies; the standard one is the device's.
    let (first_tag, first) = &seen[0];
    for (tag, caps) in &seen[1..] {
        assert_eq!(
            caps.standard, first.standard,
            "standard capabilities differ between {first_tag} and {tag}"
        );
    }
}
