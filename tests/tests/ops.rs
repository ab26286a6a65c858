//! Operations tier: the real `vfud` binary run as a service: reload on SIGHUP, clean stop on
//! SIGTERM, the control socket and its access check, `vfud status`, `vfud metrics`, sd_notify.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use vfu_protocol::client::Client;
use vfu_protocol::command::{irq, region};
use vfu_protocol::wire::{self, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_tests::ats_dma::*;
use vfud_tests::{eventfd, readable_within, strip_ansi, vfud_bin, GuestRam};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const ATS_DMA: &str = r#"{"type":"emulated","model":"ats-dma"}"#;
const DEADLINE: Duration = Duration::from_secs(30);

/// A `vfud run --config <dir>/devices` with its control socket at `<dir>/control.sock`.
struct Service {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

fn unique_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vfud-ops-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("devices")).unwrap();
    // Other users must reach the control socket for the access tests.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Waits for `cond` with a deadline; panics with `what` and the log on timeout.
fn wait_until(what: &str, service: &Service, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Service {
    fn write_config(dir: &Path, name: &str, device: &str) {
        let socket = dir.join(format!("{name}.sock"));
        std::fs::write(
            dir.join("devices").join(format!("{name}.json")),
            format!(
                r#"{{"version":1,"name":"{name}","socket":"{}","device":{device}}}"#,
                socket.display()
            ),
        )
        .unwrap();
    }

    /// Starts the daemon over `devices` ((name, device JSON) pairs) and waits for `ready`.
    fn start(
        tag: &str,
        devices: &[(&str, &str)],
        setup: impl FnOnce(&Path, &mut Command),
    ) -> Service {
        Service::start_at("info,vfud=debug", tag, devices, setup)
    }

    /// [`Service::start`] with the log filter `level`.
    fn start_at(
        level: &str,
        tag: &str,
        devices: &[(&str, &str)],
        setup: impl FnOnce(&Path, &mut Command),
    ) -> Service {
        let dir = unique_dir(tag);
        for (name, device) in devices {
            Service::write_config(&dir, name, device);
        }
        let log = dir.join("vfud.log");
        let mut command = Command::new(vfud_bin());
        command
            .args(["--log-level", level, "run", "--config"])
            .arg(dir.join("devices"))
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        setup(&dir, &mut command);
        let child = command.spawn().expect("spawning vfud");
        let mut s = Service {
            child: Some(child),
            dir,
            log,
        };
        let deadline = Instant::now() + DEADLINE;
        while !s.log_text().lines().any(|l| l.contains(" ready ")) {
            if let Ok(Some(status)) = s.child().try_wait() {
                panic!("vfud exited with {status} before ready:\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "vfud not ready:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon running")
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("daemon running").id() as i32)
    }

    fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn client(&self, name: &str) -> Client {
        Client::connect(&self.socket(name))
            .unwrap_or_else(|e| panic!("connecting to {name}: {e:?}\n{}", self.log_text()))
    }

    /// Runs `vfud <args> --control-socket <ours>`.
    fn vfud(&self, args: &[&str]) -> Output {
        Command::new(vfud_bin())
            .args(args)
            .arg("--control-socket")
            .arg(self.control())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// `vfud status --json`, parsed; devices by name.
    fn status(&self) -> (Value, BTreeMap<String, Value>) {
        let out = self.vfud(&["status", "--json"]);
        assert!(
            out.status.success(),
            "vfud status failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
        let devices = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["name"].as_str().unwrap().to_string(), d.clone()))
            .collect();
        (v, devices)
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vfud did not exit after SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("vfud log:\n{}", self.log_text());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether the peer closed the connection: readable with nothing to read.
fn sees_eof(c: &Client) -> bool {
    if !readable_within(c.socket().as_fd(), DEADLINE) {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(c.socket()),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT
        ),
        Ok(0)
    )
}

fn device_json(name: &str, devices: &BTreeMap<String, Value>) -> Value {
    devices
        .get(name)
        .unwrap_or_else(|| panic!("no device {name} in {devices:?}"))
        .clone()
}

fn command_count(device: &Value, command: &str) -> (u64, u64) {
    device["messages"]["by_command"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["command"] == command)
        .map_or((0, 0), |c| {
            (
                c["messages"].as_u64().unwrap(),
                c["errors"].as_u64().unwrap(),
            )
        })
}

#[test]
fn reload_adds_removes_restarts_and_ignores_invalid_files_without_disturbing_others() {
    let s = Service::start(
        "reload",
        &[
            ("keep0", ATS_DMA),
            ("gone0", ATS_DMA),
            ("change0", ATS_DMA),
            ("stay0", ATS_DMA),
        ],
        |_, _| {},
    );
    // A client with DMA maps and a wired interrupt on the device that does not change.
    let mut keep = s.client("keep0");
    let ram = GuestRam::new(0x10000);
    keep.dma_map(0x1000_0000, 0x8000, RW, Some((ram.fd(), 0)))
        .unwrap();
    keep.dma_map(0x2000_0000, 0x8000, RW, Some((ram.fd(), 0x8000)))
        .unwrap();
    let msix = eventfd();
    keep.set_irqs(
        irq::MSIX,
        wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[msix.as_fd()],
        &[],
    )
    .unwrap();
    let mut changed_client = s.client("change0");
    changed_client.device_info().unwrap();
    let (_, before) = s.status();
    assert_eq!(device_json("keep0", &before)["dma"]["maps"], 2);
    assert_eq!(
        device_json("change0", &before)["capabilities"][0]["exposed"],
        true
    );

    // Add one, remove one, change one, break one.
    Service::write_config(&s.dir, "add0", ATS_DMA);
    std::fs::remove_file(s.dir.join("devices/gone0.json")).unwrap();
    Service::write_config(
        &s.dir,
        "change0",
        r#"{"type":"emulated","model":"ats-dma","ats":"off","pri":"off"}"#,
    );
    std::fs::write(s.dir.join("devices/stay0.json"), "{ this is not json").unwrap();
    kill(s.pid(), Signal::SIGHUP).unwrap();
    wait_until("the reload to apply", &s, || {
        let (_, d) = s.status();
        d.contains_key("add0") && !d.contains_key("gone0")
    });

    let (v, after) = s.status();
    // Added and serving.
    assert_eq!(device_json("add0", &after)["state"], "listening");
    s.client("add0").device_info().unwrap();
    // Removed: socket gone.
    assert!(
        !s.socket("gone0").exists(),
        "a removed device's socket is unlinked"
    );
    // Changed: restarted with the new policy; its old client was disconnected.
    let change0 = device_json("change0", &after);
    assert_eq!(change0["capabilities"][0]["capability"], "ats");
    assert_eq!(change0["capabilities"][0]["exposed"], false);
    assert_eq!(
        change0["connections"], 0,
        "a restarted device starts afresh"
    );
    assert!(
        sees_eof(&changed_client),
        "the changed device's client sees EOF"
    );
    // Invalid: reported, and the device keeps running with its old configuration.
    let stay0 = device_json("stay0", &after);
    assert_eq!(stay0["state"], "listening");
    assert_eq!(stay0["capabilities"][0]["exposed"], true);
    let invalid = v["invalid_files"].as_array().unwrap();
    assert_eq!(invalid.len(), 1, "{v}");
    assert!(invalid[0]["file"].as_str().unwrap().ends_with("stay0.json"));
    assert!(invalid[0]["error"]
        .as_str()
        .unwrap()
        .contains("invalid JSON"));
    s.client("stay0").device_info().unwrap();

    // Unchanged: same connection, maps and interrupt intact, and it still works.
    let keep0 = device_json("keep0", &after);
    assert_eq!(keep0["state"], "connected");
    assert_eq!(keep0["client"]["connection"], 1);
    assert_eq!(keep0["client"]["pid"], std::process::id());
    assert_eq!(keep0["dma"]["maps"], 2);
    assert_eq!(keep0["dma"]["bytes"], 0x10000);
    start(&mut keep, OP_FILL, 0, 0x2000_0010, 8, 0x5566_7788, true);
    assert_eq!(wait_idle(&mut keep), (STATUS_DONE, ERR_NONE));
    assert_eq!(
        ram.read(0x8010, 8),
        [0x88, 0x77, 0x66, 0x55, 0x88, 0x77, 0x66, 0x55]
    );
    assert_eq!(
        vfud_tests::wait_eventfd(&msix, DEADLINE),
        1,
        "MSI-X still wired"
    );
    let (_, later) = s.status();
    let keep0 = device_json("keep0", &later);
    assert_eq!(keep0["client"]["connection"], 1);
    assert_eq!(keep0["dma"]["maps"], 2);
    assert!(command_count(&keep0, "REGION_WRITE").0 >= 6);

    // The control socket's reload reports the same file as invalid and changes nothing.
    let out = s.vfud(&["reload", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an invalid file makes `vfud reload` fail"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut unchanged: Vec<&str> = report["unchanged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    unchanged.sort();
    assert_eq!(unchanged, ["add0", "change0", "keep0", "stay0"]);
    assert!(report["started"].as_array().unwrap().is_empty());
    assert_eq!(report["invalid"].as_array().unwrap().len(), 1);
    assert_eq!(
        device_json("keep0", &s.status().1)["client"]["connection"],
        1
    );
}

#[test]
fn sigterm_with_a_connected_client_exits_0_unlinks_sockets_and_the_client_sees_eof() {
    let mut s = Service::start("term", &[("d0", ATS_DMA), ("d1", ATS_DMA)], |_, _| {});
    let mut c = s.client("d0");
    let ram = GuestRam::new(0x4000);
    c.dma_map(0, ram.size, RW, Some((ram.fd(), 0))).unwrap();
    c.write_u32(region::BAR0, LEN, 64).unwrap();
    assert!(s.control().exists());
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "clean exit:\n{}", s.log_text());
    assert!(sees_eof(&c), "the client sees EOF");
    for path in [s.socket("d0"), s.socket("d1"), s.control()] {
        assert!(!path.exists(), "{} was not unlinked", path.display());
    }
    let log = s.log_text();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("device reset for stopping"), "{log}");
}

/// `vfud status` run as `uid`/`gid` with no supplementary groups.
fn status_as(s: &Service, uid: u32, gid: u32) -> Output {
    Command::new(vfud_bin())
        .args(["status", "--control-socket"])
        .arg(s.control())
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap()
}

#[test]
fn control_socket_admits_root_and_the_group_and_refuses_others() {
    // nogroup (65534) exists on every Debian system; its members may use the socket.
    let s = Service::start("access", &[("d0", ATS_DMA)], |_, cmd| {
        cmd.args(["--control-group", "65534"]);
    });
    let meta = std::fs::metadata(s.control()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);

    let member = status_as(&s, 65534, 65534);
    assert!(
        member.status.success(),
        "a group member is admitted: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert!(String::from_utf8_lossy(&member.stdout).contains("d0 (emulated ats-dma): listening"));

    // Outside the group the file mode already stops the connect.
    let outsider = status_as(&s, 65534, 65533);
    assert_eq!(outsider.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&outsider.stderr).contains("cannot connect"));

    // With the mode loosened, the peer-credential check still refuses.
    std::fs::set_permissions(s.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let outsider = status_as(&s, 65534, 65533);
    assert_eq!(outsider.status.code(), Some(1));
    let err = String::from_utf8_lossy(&outsider.stderr);
    assert!(
        err.contains(
            "permission denied: uid 65534 is neither root nor a member of the control group"
        ),
        "{err}"
    );
    assert!(s.log_text().contains("control connection refused"));
    // And the daemon still answers root.
    assert!(s.vfud(&["status"]).status.success());
}

/// Drives a client through a known sequence: 2 maps (0x3000 bytes), 3 MSI-X vectors,
/// 4 REGION_READs, one failing DMA_UNMAP.
fn known_activity(s: &Service, name: &str) -> (Client, GuestRam, Vec<nix::sys::eventfd::EventFd>) {
    let mut c = s.client(name);
    let ram = GuestRam::new(0x4000);
    c.dma_map(0x1000, 0x1000, RW, Some((ram.fd(), 0))).unwrap();
    c.dma_map(0x10_0000, 0x2000, RW, Some((ram.fd(), 0x2000)))
        .unwrap();
    let fds = vec![eventfd(), eventfd(), eventfd()];
    let borrowed: Vec<_> = fds.iter().map(|e| e.as_fd()).collect();
    c.set_irqs(
        irq::MSIX,
        wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        3,
        &borrowed,
        &[],
    )
    .unwrap();
    for _ in 0..4 {
        c.region_read(region::CONFIG, 0, 4).unwrap();
    }
    assert!(c.dma_unmap(0x9000_0000, 0x1000, 0).is_err());
    (c, ram, fds)
}

#[test]
fn status_json_matches_what_the_client_did() {
    let s = Service::start(
        "status",
        &[("d0", ATS_DMA), ("idle0", ATS_DMA)],
        |dir, _| {
            // A device that cannot start: its socket path is a regular file.
            std::fs::write(dir.join("bad0.sock"), "not a socket").unwrap();
            Service::write_config(dir, "bad0", ATS_DMA);
        },
    );
    let (_c, _ram, _fds) = known_activity(&s, "d0");
    let (v, devices) = s.status();
    assert_eq!(v["pid"], s.pid().as_raw());
    let d0 = device_json("d0", &devices);
    assert_eq!(d0["state"], "connected");
    assert_eq!(d0["client"]["pid"], std::process::id());
    assert_eq!(d0["dma"], serde_json::json!({"maps": 2, "bytes": 0x3000}));
    let msix = d0["irqs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "msix")
        .unwrap();
    assert_eq!(msix["wired"], 3);
    assert_eq!(command_count(&d0, "VERSION"), (1, 0));
    assert_eq!(command_count(&d0, "DMA_MAP"), (2, 0));
    assert_eq!(command_count(&d0, "DEVICE_SET_IRQS"), (1, 0));
    assert_eq!(command_count(&d0, "REGION_READ"), (4, 0));
    assert_eq!(command_count(&d0, "DMA_UNMAP"), (1, 1));
    assert_eq!(d0["messages"]["total"], 9);
    assert_eq!(d0["messages"]["errors"], 1);
    let caps: Vec<&str> = d0["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["capability"].as_str().unwrap())
        .collect();
    assert_eq!(caps, ["ats", "pasid", "pri"]);
    match &d0["ats"] {
        Value::Null => {}
        ats => {
            for k in ["requests", "hits", "misses", "invalidations"] {
                assert!(ats[k].is_u64(), "ats.{k} in {ats}");
            }
        }
    }
    // Another device is untouched by this client; a failed one says why, the rest serve.
    let idle = device_json("idle0", &devices);
    assert_eq!(idle["state"], "listening");
    assert_eq!(idle["messages"]["total"], 0);
    let bad = device_json("bad0", &devices);
    assert_eq!(bad["state"], "failed");
    assert!(
        bad["reason"].as_str().unwrap().contains("is not a socket"),
        "{bad}"
    );

    // One device by name, and the text form.
    let one = s.vfud(&["status", "d0", "--json"]);
    assert!(one.status.success());
    let one: Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(one["dma"]["maps"], 2);
    let text = s.vfud(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("d0 (emulated ats-dma): connected"), "{text}");
    assert!(text.contains("bad0 (emulated ats-dma): failed"), "{text}");
    assert!(text.contains("2 map(s), 12.0 KiB"), "{text}");
    let missing = s.vfud(&["status", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no device named \"nope\""));
}

/// One sample of the OpenMetrics/Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser for the subset prometheus-client writes: `# HELP`, `# TYPE`, `# UNIT`
/// lines, samples `name{k="v",...} value`, and a final `# EOF`. Panics on anything else.
fn parse_exposition(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, ch)| {
                ch.is_ascii_alphabetic() || ch == '_' || ch == ':' || (i > 0 && ch.is_ascii_digit())
            })
    };
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "exposition must end with # EOF"
    );
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().expect("metadata names a metric");
            assert!(valid_name(name), "bad metric name in {line:?}");
            match kind {
                "TYPE" => {
                    let t = parts.next().expect("TYPE has a type");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&t),
                        "{line:?}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "TYPE twice: {line:?}"
                    );
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown metadata line {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                let mut labels = BTreeMap::new();
                for pair in body.split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label: {line:?}"));
                    assert!(valid_name(k), "bad label name: {line:?}");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label value: {line:?}"));
                    assert!(!v.contains('"') && !v.contains('\\'), "{line:?}");
                    labels.insert(k.to_string(), v.to_string());
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad sample name: {line:?}");
        let family = types
            .keys()
            .filter(|f| {
                name == f.as_str() || name.strip_prefix(f.as_str()).is_some_and(|s| s == "_total")
            })
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample without a TYPE: {line:?}"));
        if types[family] == "counter" {
            assert_eq!(
                name,
                format!("{family}_total"),
                "counters end in _total: {line:?}"
            );
            assert!(value >= 0.0);
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    (types, samples)
}

fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == wanted)
        .collect();
    assert_eq!(found.len(), 1, "{name}{wanted:?} in {samples:#?}");
    found[0].value
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_the_client_did() {
    let s = Service::start("metrics", &[("d0", ATS_DMA), ("d1", ATS_DMA)], |_, _| {});
    let (_c, _ram, _fds) = known_activity(&s, "d0");
    let out = s.vfud(&["metrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (types, samples) = parse_exposition(&text);
    assert_eq!(types["vfud_messages"], "counter");
    assert_eq!(types["vfud_dma_maps"], "gauge");
    let d0 = [("device", "d0")];
    assert_eq!(metric(&samples, "vfud_dma_maps", &d0), 2.0);
    assert_eq!(metric(&samples, "vfud_dma_mapped_bytes", &d0), 12288.0);
    assert_eq!(metric(&samples, "vfud_device_connections_total", &d0), 1.0);
    assert_eq!(
        metric(
            &samples,
            "vfud_device_state",
            &[("device", "d0"), ("state", "connected")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &samples,
            "vfud_device_state",
            &[("device", "d1"), ("state", "listening")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &samples,
            "vfud_irqs_wired",
            &[("device", "d0"), ("index", "msix")]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &samples,
            "vfud_messages_total",
            &[("device", "d0"), ("command", "REGION_READ")]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &samples,
            "vfud_message_errors_total",
            &[("device", "d0"), ("command", "DMA_UNMAP")]
        ),
        1.0
    );
    assert_eq!(metric(&samples, "vfud_dma_maps", &[("device", "d1")]), 0.0);
}

/// Collects the datagrams a NOTIFY_SOCKET receives.
struct NotifySocket {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    /// Waits until a datagram satisfies `pred`; returns its index in `seen`.
    fn wait_for(
        &mut self,
        s: &Service,
        what: &str,
        from: usize,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.seen.iter().skip(from).position(|m| pred(m)) {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} among {:?}; log:\n{}",
                self.seen,
                s.log_text()
            );
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

#[test]
fn sd_notify_ready_status_watchdog_reloading_and_stopping() {
    let mut notify: Option<UnixDatagram> = None;
    let mut s = Service::start("notify", &[("d0", ATS_DMA), ("d1", ATS_DMA)], |dir, cmd| {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        notify = Some(socket);
        // 200 ms: vfud pings every 100 ms.
        cmd.env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "200000");
    });
    let mut n = NotifySocket {
        socket: notify.unwrap(),
        seen: Vec::new(),
    };
    let ready = n.wait_for(&s, "READY=1", 0, |m| m.lines().any(|l| l == "READY=1"));
    assert!(
        n.seen[ready].contains("STATUS=serving 2 device(s)"),
        "{:?}",
        n.seen[ready]
    );
    // The devices were listening when READY was sent.
    s.client("d0").device_info().unwrap();
    let first = n.wait_for(&s, "WATCHDOG=1", ready, |m| m == "WATCHDOG=1");
    n.wait_for(&s, "a second WATCHDOG=1", first + 1, |m| m == "WATCHDOG=1");

    Service::write_config(&s.dir, "d2", ATS_DMA);
    kill(s.pid(), Signal::SIGHUP).unwrap();
    let reloading = n.wait_for(&s, "RELOADING=1", ready + 1, |m| {
        m.lines().any(|l| l == "RELOADING=1") && m.lines().any(|l| l.starts_with("MONOTONIC_USEC="))
    });
    let again = n.wait_for(&s, "READY=1 after the reload", reloading, |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(
        n.seen[again].contains("STATUS=serving 3 device(s)"),
        "{:?}",
        n.seen[again]
    );

    assert_eq!(s.terminate().code(), Some(0));
    let stopping = n.wait_for(&s, "STOPPING=1", again, |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    assert!(stopping > again);
}

#[test]
fn set_log_level_switches_per_message_debug_logging_at_runtime() {
    let s = Service::start_at("info", "loglevel", &[("d0", ATS_DMA)], |_, _| {});
    let mut c = s.client("d0");
    c.device_info().unwrap();
    assert!(!s.log_text().contains("DEVICE_GET_INFO"), "info is quiet");
    let out = s.vfud(&["set-log-level", "debug"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.device_info().unwrap();
    wait_until("a debug line per message", &s, || {
        s.log_text().lines().any(|l| {
            l.contains("DEBUG") && l.contains("command=\"DEVICE_GET_INFO\"") && l.contains("d0")
        })
    });
    let (v, _) = s.status();
    assert_eq!(v["log_level"], "debug");
    let bad = s.vfud(&["set-log-level", "no=such=filter"]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn print_schema_describes_the_device_configuration() {
    let out = Command::new(vfud_bin())
        .arg("print-schema")
        .output()
        .unwrap();
    assert!(out.status.success());
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "DeviceConfig");
    assert_eq!(schema["additionalProperties"], false);
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(required, ["device", "name", "socket", "version"]);
    assert!(out.stdout.windows(9).any(|w| w == b"\"ats-dma\""));
}

#[test]
fn status_watch_refreshes_until_interrupted() {
    let s = Service::start("watch", &[("d0", ATS_DMA)], |_, _| {});
    let mut watch = Command::new(vfud_bin())
        .args(["status", "--json", "--watch", "0.1", "--control-socket"])
        .arg(s.control())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let mut reports = serde_json::Deserializer::from_reader(stdout).into_iter::<Value>();
    let first = reports.next().unwrap().unwrap();
    assert_eq!(first["devices"][0]["state"], "listening");
    let _c = s.client("d0");
    // A later report sees the client that connected after the first one; 300 reports at
    // 0.1 s bound the wait.
    let connected = reports
        .take(300)
        .any(|r| r.unwrap()["devices"][0]["state"] == "connected");
    assert!(connected);
    let _ = watch.kill();
    let _ = watch.wait();
}

/// Every property name anywhere in a JSON Schema.
fn schema_properties(schema: &Value, names: &mut std::collections::BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                names.extend(props.keys().cloned());
            }
            for v in map.values() {
                schema_properties(v, names);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| schema_properties(v, names)),
        _ => {}
    }
}

#[test]
fn readme_documents_every_configuration_field_and_its_examples_parse() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let out = Command::new(vfud_bin())
        .arg("print-schema")
        .output()
        .unwrap();
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names = std::collections::BTreeSet::new();
    schema_properties(&schema, &mut names);
    assert!(names.contains("max_pasid_log2"), "{names:?}");
    let undocumented: Vec<&String> = names
        .iter()
        .filter(|n| !readme.contains(&format!("{n}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "configuration fields missing from README's table (write them as `device.field`): {undocumented:?}"
    );

    // Every configuration example in the README is accepted by the parser.
    let mut examples = 0;
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```json") {
        let body = &rest[start + 7..];
        let end = body.find("```").expect("closed code block");
        let block: String = body[..end]
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n");
        rest = &body[end + 3..];
        if !block.contains("\"version\"") {
            continue;
        }
        examples += 1;
        if let Err(e) = vfu_config::parse_str(&block, None) {
            panic!("README example does not parse: {e}\n{block}");
        }
    }
    assert!(examples >= 3, "found {examples} configuration examples");
}
