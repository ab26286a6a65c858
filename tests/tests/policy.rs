//! Protocol tier for the capability policy: the real `vfud` binary serving ats-dma devices with
//! `ats`/`pasid`/`pri` policies, compat levels and `iommu` blocks, checked the way a VMM sees
//! them (`vfud probe`, raw config-space reads and writes over the socket) and the way an
//! operator does (`vfud check-config`, the daemon log).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vfu_protocol::client::Client;
use vfu_protocol::command::region;
use vfud::pci::caps::{
    CapabilityChain, EXT_CAP_ID_ATS, EXT_CAP_ID_NULL, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI,
};
use vfud_tests::ats_dma::*;
use vfud_tests::{strip_ansi, vfud_bin, Daemon};

const ATS_DMA: &str = r#"{"type":"emulated","model":"ats-dma"}"#;

/// An ats-dma device object with extra fields, e.g. `ats_dma(r#""ats":"off""#)`.
fn ats_dma(fields: &str) -> String {
    format!(r#"{{"type":"emulated","model":"ats-dma",{fields}}}"#)
}

/// `vfud probe --json` of a socket.
fn probe(socket: &Path) -> Value {
    let out = Command::new(vfud_bin())
        .arg("probe")
        .arg(socket)
        .arg("--json")
        .output()
        .expect("running vfud probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("probe prints JSON")
}

/// (offset, name) of each extended capability in a probe report.
fn probed_extended(report: &Value) -> Vec<(u64, String)> {
    assert_eq!(
        report["capability_errors"],
        serde_json::json!([]),
        "the guest sees well-formed chains"
    );
    report["extended_capabilities"]
        .as_array()
        .expect("extended capabilities")
        .iter()
        .map(|c| {
            (
                c["offset"].as_u64().unwrap(),
                c["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The value of register `key` of the probed extended capability `name`.
fn probed_register(report: &Value, name: &str, key: &str) -> String {
    let cap = report["extended_capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} capability in {report}"));
    cap["registers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv[0] == key)
        .and_then(|kv| kv[1].as_str())
        .unwrap_or_else(|| panic!("no {key} in {cap}"))
        .to_owned()
}

/// The whole config space as the guest reads it, and its chains, which must be well-formed.
fn config_space(c: &mut Client) -> (Vec<u8>, CapabilityChain) {
    let cs = c.region_read(region::CONFIG, 0, 4096).unwrap();
    assert_eq!(cs.len(), 4096);
    let chain = CapabilityChain::parse(&cs).unwrap_or_else(|e| panic!("malformed chain: {e}"));
    (cs, chain)
}

fn config_u16(c: &mut Client, offset: u64) -> u16 {
    let b = c.region_read(region::CONFIG, offset, 2).unwrap();
    u16::from_le_bytes([b[0], b[1]])
}

/// No dword of the extended config space looks like a capability header with `id` (any
/// version, so that stale bytes of a masked capability would be caught too).
fn assert_no_header_anywhere(cs: &[u8], id: u16) {
    for at in (0x100..cs.len()).step_by(4) {
        let header = u32::from_le_bytes([cs[at], cs[at + 1], cs[at + 2], cs[at + 3]]);
        assert!(
            header & 0xffff != u32::from(id) || header >> 16 == 0,
            "a header with id {id:#x} remains at {at:#x}: {header:#010x}"
        );
    }
}

#[test]
fn ats_off_leaves_no_ats_capability_and_no_dangling_link() {
    let d = Daemon::start_with_configs(&[("demo0", &ats_dma(r#""ats":"off""#))]);
    let report = probe(&d.socket);
    // ATS was first: 0x100 becomes a null capability linking on; PRI needs ATS, so `auto`
    // masks it too.
    assert_eq!(
        probed_extended(&report),
        [(0x100, "Null".to_owned()), (0x108, "PASID".to_owned())]
    );
    assert!(
        probed_register(&report, "Null", "note").contains("continues at 0x108"),
        "{report}"
    );

    let mut c = d.client();
    let (cs, chain) = config_space(&mut c);
    let ids: Vec<u16> = chain.extended.iter().map(|e| e.id).collect();
    assert_eq!(ids, [EXT_CAP_ID_NULL, EXT_CAP_ID_PASID]);
    assert_eq!(
        &cs[0x100..0x104],
        &[0x00, 0x00, 0x80, 0x10],
        "ID 0, v0, next 0x108"
    );
    assert!(chain.find_extended(EXT_CAP_ID_ATS).is_none());
    assert_no_header_anywhere(&cs, EXT_CAP_ID_ATS);
    assert_no_header_anywhere(&cs, EXT_CAP_ID_PRI);
    assert!(cs[0x104..0x108].iter().all(|b| *b == 0), "ATS body hidden");
    assert!(cs[0x110..0x120].iter().all(|b| *b == 0), "PRI body hidden");
    // Every link the guest can follow lands on a header: the last one ends the chain.
    let last = chain.extended.last().unwrap();
    assert_eq!(
        u32::from_le_bytes(cs[last.offset..last.offset + 4].try_into().unwrap()) >> 20,
        0
    );

    // The masked ATS Control cannot be switched on behind the guest's back.
    c.region_write(region::CONFIG, 0x106, &[0x1f, 0x80])
        .unwrap();
    assert_eq!(config_u16(&mut c, 0x106), 0);
    assert_eq!(
        c.read_u32(0, CAP_CONTROL).unwrap() & CAP_CONTROL_ATS_ENABLE,
        0
    );

    // One client at a time: leave before probing again.
    drop(c);
    let out = Command::new(vfud_bin())
        .arg("probe")
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[0x100] Null (id 0x0)"), "{text}");
    assert!(
        text.contains("placeholder for a hidden capability"),
        "{text}"
    );
}

#[test]
fn ats_on_behind_an_iommu_without_ats_is_refused_while_another_device_serves() {
    let refused = ats_dma(r#""ats":"on","iommu":{"ats_supported":false}"#);
    let mut d = Daemon::start_with_configs(&[("bad0", &refused), ("good0", ATS_DMA)]);
    let log = d.log_plain();
    assert!(
        log.contains(
            "device bad0: ats=on but the IOMMU reports ATS not supported (iommu.ats_supported=false); use ats=auto or ats=off"
        ),
        "{log}"
    );
    assert!(
        !d.socket_of("bad0").exists(),
        "a refused device gets no socket"
    );
    let mut c = d.client_of("good0");
    assert_eq!(c.device_info().unwrap().num_regions, 9);
    let (_, chain) = config_space(&mut c);
    assert!(chain.find_extended(EXT_CAP_ID_ATS).is_some());
    drop(c);
    // The daemon keeps serving after the refusal.
    d.socket = d.socket_of("good0");
    d.assert_serving();
}

#[test]
fn run_fails_only_when_no_device_can_start() {
    let dir = std::env::temp_dir().join(format!("vfud-policy-none-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad0.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"version":1,"name":"bad0","socket":"{}","device":{}}}"#,
            dir.join("bad0.sock").display(),
            ats_dma(r#""pasid":"on","iommu":{"max_pasid_log2":0}"#)
        ),
    )
    .unwrap();
    let mut child = Command::new(vfud_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vfud kept running with no device to serve");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let err = strip_ansi(&err);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "device bad0: pasid=on but the IOMMU reports no PASID support (iommu.max_pasid_log2=0); use pasid=auto or pasid=off"
        ),
        "{err}"
    );
    assert!(err.contains("no device could be started"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn auto_follows_the_iommu_block() {
    let d = Daemon::start_with_configs(&[
        ("all", ATS_DMA),
        ("no-ats", &ats_dma(r#""iommu":{"ats_supported":false}"#)),
        ("no-pasid", &ats_dma(r#""iommu":{"max_pasid_log2":0}"#)),
        (
            "narrow",
            &ats_dma(r#""iommu":{"max_pasid_log2":8,"pasid_exec":false}"#),
        ),
        ("old", &ats_dma(r#""compat":"0""#)),
    ]);
    let names = |socket: &str| -> Vec<String> {
        probed_extended(&probe(&d.socket_of(socket)))
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    };
    assert_eq!(names("all"), ["ATS", "PASID", "PRI"]);
    assert_eq!(names("no-ats"), ["Null", "PASID"], "PRI follows ATS");
    assert_eq!(
        names("no-pasid"),
        ["ATS", "PRI"],
        "a middle capability unlinked"
    );
    assert_eq!(names("old"), ["ATS", "PRI"], "compat level 0: pasid=off");
    let narrow = probe(&d.socket_of("narrow"));
    assert_eq!(probed_register(&narrow, "PASID", "max_pasid_width"), "8");
    assert_eq!(probed_register(&narrow, "PASID", "exec_supported"), "0");
    assert_eq!(probed_register(&narrow, "PASID", "priv_supported"), "1");
    // The decisions are logged with their reasons.
    let log = d.log_plain();
    assert!(
        log.contains(
            "ats: masked (auto: the IOMMU reports ATS not supported (iommu.ats_supported=false))"
        ),
        "{log}"
    );
    assert!(
        log.contains("pri: masked (auto: PRI requires ATS, which is masked)"),
        "{log}"
    );
}

#[test]
fn pasid_is_synthesized_with_the_host_width() {
    let d = Daemon::start_with_configs(&[
        (
            "synth",
            &ats_dma(r#""pasid_cap_hidden":true,"iommu":{"max_pasid_log2":12,"pasid_priv":false}"#),
        ),
        (
            "placed",
            &ats_dma(r#""pasid_cap_hidden":true,"pasid_cap_offset":"0x400""#),
        ),
        (
            "hidden-off",
            &ats_dma(r#""pasid_cap_hidden":true,"pasid":"off""#),
        ),
    ]);
    let report = probe(&d.socket_of("synth"));
    assert_eq!(
        probed_extended(&report),
        [
            (0x100, "ATS".to_owned()),
            (0x108, "PRI".to_owned()),
            (0xff8, "PASID".to_owned())
        ]
    );
    assert_eq!(probed_register(&report, "PASID", "max_pasid_width"), "12");
    assert_eq!(probed_register(&report, "PASID", "exec_supported"), "1");
    assert_eq!(probed_register(&report, "PASID", "priv_supported"), "0");

    let report = probe(&d.socket_of("placed"));
    assert_eq!(probed_extended(&report)[2], (0x400, "PASID".to_owned()));
    assert_eq!(probed_register(&report, "PASID", "max_pasid_width"), "20");

    // The synthesized capability's control register is emulated like a real one.
    let mut c = d.client_of("synth");
    c.region_write(region::CONFIG, 0xffe, &[0xff, 0xff])
        .unwrap();
    assert_eq!(
        config_u16(&mut c, 0xffe),
        0x0003,
        "Enable + Exec; Priv unsupported"
    );
    assert_eq!(
        c.read_u32(0, CAP_CONTROL).unwrap(),
        CAP_CONTROL_PASID_ENABLE | CAP_CONTROL_PASID_EXEC
    );
    // Header and capability register are read-only.
    c.region_write(region::CONFIG, 0xff8, &[0xff; 6]).unwrap();
    let (cs, chain) = config_space(&mut c);
    assert_eq!(
        &cs[0xff8..0x1000],
        &[0x1b, 0x00, 0x01, 0x00, 0x02, 0x0c, 0x03, 0x00]
    );
    assert_eq!(chain.find_extended(EXT_CAP_ID_PASID), Some(0xff8));

    assert_eq!(
        probed_extended(&probe(&d.socket_of("hidden-off"))),
        [(0x100, "ATS".to_owned()), (0x108, "PRI".to_owned())]
    );
}

#[test]
fn ats_control_writes_read_back_and_reach_the_model_and_read_only_bits_do_not_stick() {
    let d = Daemon::start_with_configs(&[("demo0", ATS_DMA)]);
    let mut c = d.client();
    let (_, chain) = config_space(&mut c);
    let ats = chain.find_extended(EXT_CAP_ID_ATS).unwrap() as u64;
    assert_eq!(c.read_u32(0, CAP_CONTROL).unwrap(), 0);

    // Enable + STU 5 read back and reach the engine.
    c.region_write(region::CONFIG, ats + 6, &[0x05, 0x80])
        .unwrap();
    assert_eq!(config_u16(&mut c, ats + 6), 0x8005);
    assert_eq!(
        c.read_u32(0, CAP_CONTROL).unwrap(),
        CAP_CONTROL_ATS_ENABLE | 5 << CAP_CONTROL_ATS_STU_SHIFT
    );
    // Reserved control bits 14:5, the capability register and the header do not stick.
    c.region_write(region::CONFIG, ats, &[0xff; 8]).unwrap();
    assert_eq!(
        c.region_read(region::CONFIG, ats, 8).unwrap(),
        [0x0f, 0x00, 0x81, 0x10, 0x20, 0x00, 0x1f, 0x80]
    );
    assert_eq!(
        c.read_u32(0, CAP_CONTROL).unwrap(),
        CAP_CONTROL_ATS_ENABLE | 0x1f << CAP_CONTROL_ATS_STU_SHIFT
    );
    // Disable: the engine sees it at once.
    c.region_write(region::CONFIG, ats + 7, &[0x00]).unwrap();
    assert_eq!(
        c.read_u32(0, CAP_CONTROL).unwrap() & CAP_CONTROL_ATS_ENABLE,
        0
    );

    // PASID and PRI controls: only their defined bits stick; PRI Reset reads 0.
    let pasid = chain.find_extended(EXT_CAP_ID_PASID).unwrap() as u64;
    c.region_write(region::CONFIG, pasid + 4, &[0xff; 4])
        .unwrap();
    assert_eq!(
        c.region_read(region::CONFIG, pasid + 4, 4).unwrap(),
        [0x06, 0x14, 0x07, 0x00]
    );
    let pri = chain.find_extended(EXT_CAP_ID_PRI).unwrap() as u64;
    c.region_write(region::CONFIG, pri + 4, &[0x03, 0xff])
        .unwrap();
    assert_eq!(config_u16(&mut c, pri + 4), 0x0001);
    c.region_write(region::CONFIG, pri + 8, &[0xff; 4]).unwrap();
    assert_eq!(
        c.read_u32(region::CONFIG, pri + 8).unwrap(),
        32,
        "capacity is RO"
    );
    let all = CAP_CONTROL_PASID_ENABLE
        | CAP_CONTROL_PASID_EXEC
        | CAP_CONTROL_PASID_PRIV
        | CAP_CONTROL_PRI_ENABLE;
    assert_eq!(c.read_u32(0, CAP_CONTROL).unwrap() & all, all);
    // The chain survived all of it.
    let (_, after) = config_space(&mut c);
    assert_eq!(after.extended, chain.extended);

    // DEVICE_RESET returns the emulated controls to their reset values.
    c.reset().unwrap();
    assert_eq!(config_u16(&mut c, ats + 6), 0);
    assert_eq!(c.read_u32(0, CAP_CONTROL).unwrap(), 0);
}

/// A directory of device configurations for `vfud check-config`.
fn check_config(devices: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = std::env::temp_dir().join(format!(
        "vfud-policy-check-{}-{}",
        std::process::id(),
        devices[0].0
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, device) in devices {
        std::fs::write(
            dir.join(format!("{name}.json")),
            format!(r#"{{"version":1,"name":"{name}","socket":"{name}.sock","device":{device}}}"#),
        )
        .unwrap();
    }
    let out = Command::new(vfud_bin())
        .arg("check-config")
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_every_decision_with_its_reason() {
    let (code, out, err) = check_config(&[
        ("a-demo0", ATS_DMA),
        (
            "b-nopasid",
            &ats_dma(r#""iommu":{"max_pasid_log2":0},"pri":"off""#),
        ),
    ]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "a-demo0: ats: exposed (auto: the IOMMU reports ATS usable)",
        "a-demo0: pasid: exposed (auto: the IOMMU supports 20-bit PASIDs)",
        "a-demo0: pri: exposed (auto: ATS is exposed)",
        "b-nopasid: pasid: masked (auto: the IOMMU reports no PASID support (iommu.max_pasid_log2=0))",
        "b-nopasid: pri: masked (off: hidden by the configuration)",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn check_config_reports_an_unmet_on_as_a_problem() {
    let (code, out, err) = check_config(&[
        ("a-good", ATS_DMA),
        (
            "b-old",
            &ats_dma(r#""compat":"0","iommu":{"ats_supported":false}"#),
        ),
        ("c-pri", &ats_dma(r#""ats":"off","pri":"on""#)),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains(
            "device b-old: ats=on (the default of compat level 0) but the IOMMU reports ATS not supported (iommu.ats_supported=false); use ats=auto or ats=off"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "device c-pri: pri=on but PRI requires ATS, which is masked; use pri=auto or pri=off"
        ),
        "{err}"
    );
    assert!(err.contains("2 problem(s) found"), "{err}");
    assert!(
        out.contains("a-good: ats: exposed"),
        "good devices still listed: {out}"
    );
}
