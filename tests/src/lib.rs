//! Harness for vfud's end-to-end tests: starts the real `vfud` binary on a private socket and
//! gives tests what a VMM has: fd-backed guest RAM, a handler for message DMA, eventfds.
//!
//! Every wait has a deadline; a daemon that stops answering fails the test instead of hanging it.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vfu_protocol::client::{Client, ClientOptions, DmaHandler};

pub mod fuzz;

/// The `vfud` binary: `$VFUD_BIN`, else next to the test executable's `deps/` directory, built
/// with cargo if it is not there yet.
pub fn vfud_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VFUD_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile directory");
        let bin = dir.join("vfud");
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "vfud", "--bin", "vfud"])
                .status()
                .expect("running cargo build -p vfud");
            assert!(status.success(), "cargo build -p vfud failed");
        }
        bin
    })
    .clone()
}

fn unique_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vfud-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the test directory");
    dir
}

/// A running `vfud run` serving one ats-dma device, stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts vfud with a config file for device `demo0` and waits until its socket accepts.
    pub fn start() -> Daemon {
        Daemon::start_with_configs(&[("demo0", r#"{"type":"emulated","model":"ats-dma"}"#)])
    }

    /// Starts vfud serving several devices, one configuration file each: `devices` holds
    /// `(name, device)` pairs where `device` is the JSON object of the `"device"` field, e.g.
    /// `("demo0", r#"{"type":"emulated","model":"ats-dma","ats":"off"}"#)`. Device `name`
    /// listens on `<dir>/<name>.sock` ([`Daemon::socket_of`]); `socket` is the first one's.
    ///
    /// Returns once the daemon has started every device it can: it logs `ready` after binding
    /// each accepted device's socket and logging each refusal. Panics (with the log) if vfud
    /// exits first, e.g. because it refused every device.
    pub fn start_with_configs(devices: &[(&str, &str)]) -> Daemon {
        Daemon::start_logging(devices, "debug")
    }

    /// [`Daemon::start_with_configs`] at another log level; benchmarks use `info` so that
    /// per-message debug lines do not dominate what they measure.
    pub fn start_logging(devices: &[(&str, &str)], log_level: &str) -> Daemon {
        assert!(!devices.is_empty(), "start_with_configs needs a device");
        let dir = unique_dir();
        let mut command = Command::new(vfud_bin());
        command.args(["--log-level", log_level, "run"]);
        // Each daemon its own control socket, so parallel tests do not compete for the default.
        command
            .arg("--control-socket")
            .arg(dir.join("control.sock"));
        for (name, device) in devices {
            let config = dir.join(format!("{name}.json"));
            let socket = dir.join(format!("{name}.sock"));
            std::fs::write(
                &config,
                format!(
                    r#"{{"version":1,"name":"{name}","socket":"{}","device":{device}}}"#,
                    socket.display()
                ),
            )
            .expect("writing a device config");
            command.arg("--config").arg(&config);
        }
        let log = dir.join("vfud.log");
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning vfud");
        let socket = dir.join(format!("{}.sock", devices[0].0));
        let mut d = Daemon {
            child,
            dir,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.log_plain().lines().any(|l| l.contains(" ready ")) {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!(
                    "vfud exited with {status} before it was ready:\n{}",
                    d.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "vfud did not report ready:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The socket of device `name` of a daemon started with [`Daemon::start_with_configs`].
    pub fn socket_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// A negotiated client of device `name`.
    pub fn client_of(&self, name: &str) -> Client {
        Client::connect(&self.socket_of(name))
            .unwrap_or_else(|e| panic!("connecting to {name}: {e:?}\n{}", self.log_text()))
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's log so far without terminal colour sequences, for searching.
    pub fn log_plain(&self) -> String {
        strip_ansi(&self.log_text())
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A negotiated client with a 10 s bound on every wait.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connecting to vfud: {e:?}\n{}", self.log_text()))
    }

    /// A connected client that has not negotiated.
    pub fn raw_client(&self) -> Client {
        Client::connect_raw(&self.socket, ClientOptions::default()).expect("connecting to vfud")
    }

    /// Asserts that the daemon is alive and serves a fresh client end to end.
    pub fn assert_serving(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("vfud died ({status}):\n{}", self.log_text());
        }
        let mut c = self.client();
        let info = c
            .device_info()
            .expect("DEVICE_GET_INFO on a fresh connection");
        assert_eq!(info.num_regions, 9);
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size of the daemon in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Whether RSS bounds mean anything for the daemon under test: not when it was built with a
/// sanitizer (`VFUD_SANITIZER` set by `tests/scripts/hardening`), whose shadow memory and
/// quarantine inflate RSS; there LeakSanitizer checks for leaks instead.
pub fn rss_bounds_apply() -> bool {
    std::env::var_os("VFUD_SANITIZER").is_none()
}

/// `text` without ANSI escape sequences (ESC `[` ... final byte).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("vfud log ({}):\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Guest RAM backed by a memfd, as QEMU's memory-backend-memfd provides it.
#[derive(Debug)]
pub struct GuestRam {
    pub fd: OwnedFd,
    pub size: u64,
}

impl GuestRam {
    pub fn new(size: u64) -> GuestRam {
        let fd =
            memfd_create(c"vfud-test-ram", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd_create");
        nix::unistd::ftruncate(&fd, size as i64).expect("ftruncate");
        GuestRam { fd, size }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        let n = nix::sys::uio::pwrite(&self.fd, data, offset as i64).expect("pwrite");
        assert_eq!(n, data.len());
    }

    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let n = nix::sys::uio::pread(&self.fd, &mut buf, offset as i64).expect("pread");
        assert_eq!(n, len);
        buf
    }
}

/// Guest memory that only the client can touch: serves the server's DMA_READ / DMA_WRITE.
/// Cloning shares the memory, so a test can inspect it while the client owns the handler.
#[derive(Debug, Clone, Default)]
pub struct MessageRam {
    pages: Arc<Mutex<BTreeMap<u64, u8>>>,
    pub reads: Arc<AtomicU32>,
    pub writes: Arc<AtomicU32>,
}

impl MessageRam {
    pub fn store(&self, addr: u64, data: &[u8]) {
        let mut p = self.pages.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            p.insert(addr + i as u64, *b);
        }
    }

    pub fn load(&self, addr: u64, len: usize) -> Vec<u8> {
        let p = self.pages.lock().unwrap();
        (0..len as u64)
            .map(|i| *p.get(&(addr + i)).unwrap_or(&0))
            .collect()
    }
}

impl DmaHandler for MessageRam {
    fn dma_read(&mut self, address: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(self.load(address, len))
    }

    fn dma_write(&mut self, address: u64, data: &[u8]) -> Result<(), Errno> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.store(address, data);
        Ok(())
    }
}

/// A non-blocking eventfd, as a VMM hands to SET_IRQS.
pub fn eventfd() -> EventFd {
    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).expect("eventfd")
}

/// Waits up to `timeout` for the eventfd to fire; returns the counter (0 on timeout).
pub fn wait_eventfd(e: &EventFd, timeout: Duration) -> u64 {
    let mut fds = [PollFd::new(e.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) if n > 0 => e.read().unwrap_or(0),
        _ => 0,
    }
}

/// Whether the fd has data (or EOF) within `timeout`.
pub fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// ats-dma register helpers shared by the tests.
pub mod ats_dma {
    use std::time::{Duration, Instant};
    use vfu_protocol::client::Client;
    pub use vfud::device::emulated::ats_dma::regs::*;

    /// Programs and starts one command.
    pub fn start(c: &mut Client, op: u32, src: u64, dst: u64, len: u32, pattern: u32, irq: bool) {
        c.write_u32(0, SRC_LO, src as u32).unwrap();
        c.write_u32(0, SRC_HI, (src >> 32) as u32).unwrap();
        c.write_u32(0, DST_LO, dst as u32).unwrap();
        c.write_u32(0, DST_HI, (dst >> 32) as u32).unwrap();
        c.write_u32(0, LEN, len).unwrap();
        c.write_u32(0, PATTERN, pattern).unwrap();
        c.write_u32(0, CMD, op | if irq { CMD_IRQ } else { 0 })
            .unwrap();
    }

    /// Config-space offset of ats-dma's ATS Control register with the default policy (ATS at
    /// 0x100).
    pub const ATS_CONTROL: u64 = 0x106;

    /// Sets ATS Enable and the Smallest Translation Unit in config space, as a guest driver does.
    pub fn enable_ats(c: &mut Client, stu: u8) {
        let control = 0x8000u16 | u16::from(stu & 0x1f);
        c.region_write(
            vfu_protocol::command::region::CONFIG,
            ATS_CONTROL,
            &control.to_le_bytes(),
        )
        .unwrap();
        assert_ne!(
            c.read_u32(0, CAP_CONTROL).unwrap() & CAP_CONTROL_ATS_ENABLE,
            0,
            "the engine sees ATS Enable"
        );
    }

    /// The config-space offset of extended capability `id`, found by walking the chain from
    /// 0x100 as a driver does (`pci_find_ext_capability`).
    pub fn find_ext_cap(c: &mut Client, id: u16) -> Option<u64> {
        let mut at = 0x100u64;
        for _ in 0..64 {
            let header = c
                .read_u32(vfu_protocol::command::region::CONFIG, at)
                .unwrap();
            if header == 0 || header == 0xffff_ffff {
                return None;
            }
            if header & 0xffff == u32::from(id) {
                return Some(at);
            }
            at = u64::from(header >> 20) & 0xffc;
            if at < 0x100 {
                return None;
            }
        }
        None
    }

    /// Sets PASID Enable in the PASID capability and tags the engine's requests with `pasid`
    /// (BAR0 PASID register).
    pub fn enable_pasid(c: &mut Client, pasid: u32) {
        let cap = find_ext_cap(c, 0x1b).expect("a PASID capability");
        c.region_write(
            vfu_protocol::command::region::CONFIG,
            cap + 6,
            &1u16.to_le_bytes(),
        )
        .unwrap();
        assert_ne!(
            c.read_u32(0, CAP_CONTROL).unwrap() & CAP_CONTROL_PASID_ENABLE,
            0,
            "the engine sees PASID Enable"
        );
        c.write_u32(0, PASID, PASID_VALID | pasid).unwrap();
    }

    /// Sets or clears ATS Enable (STU 0) in the ATS capability found by walking the chain.
    pub fn set_ats(c: &mut Client, enabled: bool) {
        let cap = find_ext_cap(c, 0x0f).expect("an ATS capability");
        let control: u16 = if enabled { 0x8000 } else { 0 };
        c.region_write(
            vfu_protocol::command::region::CONFIG,
            cap + 6,
            &control.to_le_bytes(),
        )
        .unwrap();
        assert_eq!(
            c.read_u32(0, CAP_CONTROL).unwrap() & CAP_CONTROL_ATS_ENABLE != 0,
            enabled
        );
    }

    /// The ATC counters in BAR0.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct AtcCounters {
        pub requests: u32,
        pub hits: u32,
        pub misses: u32,
        pub invalidations: u32,
        pub entries: u32,
    }

    /// Reads the ATC counters from BAR0.
    pub fn atc_counters(c: &mut Client) -> AtcCounters {
        AtcCounters {
            requests: c.read_u32(0, ATS_REQUESTS).unwrap(),
            hits: c.read_u32(0, ATC_HITS).unwrap(),
            misses: c.read_u32(0, ATC_MISSES).unwrap(),
            invalidations: c.read_u32(0, ATC_INVALIDATIONS).unwrap(),
            entries: c.read_u32(0, ATC_ENTRIES).unwrap(),
        }
    }

    /// FAULT_ADDR: the address of the last translation fault.
    pub fn fault_addr(c: &mut Client) -> u64 {
        u64::from(c.read_u32(0, FAULT_ADDR_LO).unwrap())
            | u64::from(c.read_u32(0, FAULT_ADDR_HI).unwrap()) << 32
    }

    /// Reads STATUS until the command leaves BUSY (servicing message DMA meanwhile, since each
    /// read waits for its reply); returns (STATUS, ERROR). Fails after 20 s.
    pub fn wait_idle(c: &mut Client) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = c.read_u32(0, STATUS).unwrap();
            if s != STATUS_BUSY {
                return (s, c.read_u32(0, ERROR).unwrap());
            }
            assert!(Instant::now() < deadline, "ats-dma stayed busy");
            std::thread::yield_now();
        }
    }
}

/// Running QEMU guests for the VM tiers (`tests/tests/qemu.rs`, `tests/tests/host_vm.rs`):
/// the scripts under `tests/vm/`, run as root, and a bounded wait for QEMU to exit.
pub mod vm {
    use std::ffi::OsStr;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus, Stdio};
    use std::time::{Duration, Instant};

    /// `tests/vm/`.
    pub fn scripts() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("vm")
    }

    /// `script` run as root: directly when we are root, else through `sudo -n` (which fails
    /// instead of prompting).
    pub fn privileged(script: &Path) -> Command {
        if nix::unistd::geteuid().is_root() {
            Command::new(script)
        } else {
            let mut c = Command::new("sudo");
            c.arg("-n").arg(script);
            c
        }
    }

    /// A finished QEMU: its exit status (`None` when it was killed at the deadline), the
    /// guest's serial console and QEMU's own stderr.
    #[derive(Debug)]
    pub struct QemuRun {
        pub status: Option<ExitStatus>,
        pub serial: String,
        pub stderr: String,
    }

    /// Runs `qemu-system-x86_64 args` inside the chroot `root` with `bind` bind-mounted, the
    /// console to `serial_path` and stderr to `stderr_path`, and waits until QEMU exits or
    /// `deadline` passes; then the whole process group (helper, shell, QEMU) is killed.
    pub fn run_qemu<I, S>(
        root: &Path,
        bind: &Path,
        args: I,
        serial_path: &Path,
        stderr_path: &Path,
        deadline: Duration,
    ) -> QemuRun
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = privileged(&scripts().join("chroot-run.sh"))
            .arg(root)
            .arg("--bind")
            .arg(bind)
            .arg("--")
            .arg("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(serial_path).expect("serial log"))
            .stderr(std::fs::File::create(stderr_path).expect("QEMU log"))
            .process_group(0)
            .spawn()
            .expect("starting QEMU");
        let deadline = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for QEMU") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into();
        QemuRun {
            status,
            serial: read(serial_path),
            stderr: read(stderr_path),
        }
    }
}
