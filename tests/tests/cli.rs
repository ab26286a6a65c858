//! The `vfud` command line: check-config and probe, run as a user would.

use std::process::Command;

use vfud_tests::{vfud_bin, Daemon};

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vfud-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let dir = tempdir("bad");
    std::fs::write(
        dir.join("a.json"),
        r#"{"version":1,"name":"a","socket":"a.sock","device":{"type":"emulated","model":"nope"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("b.json"), r#"{"version":2,"name":"b"}"#).unwrap();
    std::fs::write(dir.join("c.json"), "{ not json").unwrap();
    let out = Command::new(vfud_bin())
        .arg("check-config")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a.json: at device.model"), "{err}");
    assert!(err.contains("b.json: at version"), "{err}");
    assert!(
        err.contains("c.json:1:"),
        "syntax errors carry line and column: {err}"
    );
    assert!(err.contains("3 problem(s) found"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_accepts_a_valid_directory() {
    let dir = tempdir("good");
    std::fs::write(
        dir.join("demo0.json"),
        r#"{"version":1,"name":"demo0","socket":"demo0.sock","device":{"type":"emulated","model":"ats-dma"}}"#,
    )
    .unwrap();
    let out = Command::new(vfud_bin())
        .arg("check-config")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "ok: demo0 -> {}",
            dir.join("demo0.sock").display()
        )),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn probe_reports_what_a_vmm_sees() {
    let d = Daemon::start();
    let out = Command::new(vfud_bin())
        .arg("probe")
        .arg(&d.socket)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["vendor_id"], 0x1b36);
    assert_eq!(r["device_flags"], serde_json::json!(["reset", "pci"]));
    assert_eq!(r["regions"].as_array().unwrap().len(), 9);
    assert_eq!(r["regions"][2]["fd"], true);
    assert_eq!(r["irqs"][2]["count"], 4);
    let ext: Vec<&str> = r["extended_capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(ext, ["ATS", "PASID", "PRI"]);
    let pasid = &r["extended_capabilities"][1]["registers"];
    assert!(pasid
        .as_array()
        .unwrap()
        .iter()
        .any(|kv| kv[0] == "max_pasid_width" && kv[1] == "20"));
    assert!(r["capability_errors"].as_array().unwrap().is_empty());

    let text = Command::new(vfud_bin())
        .arg("probe")
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ATS") && text.contains("stu"), "{text}");
}

#[test]
fn probe_of_a_missing_socket_fails_with_the_path() {
    let out = Command::new(vfud_bin())
        .args(["probe", "/nonexistent/vfud.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vfud.sock"), "{err}");
}

#[test]
fn run_refuses_a_socket_path_that_is_a_regular_file() {
    let dir = tempdir("notsock");
    let sock = dir.join("x.sock");
    std::fs::write(&sock, "not a socket").unwrap();
    let cfg = dir.join("x.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"version":1,"name":"x","socket":"{}","device":{{"type":"emulated","model":"ats-dma"}}}}"#, sock.display()),
    )
    .unwrap();
    let out = Command::new(vfud_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("device x") && err.contains("is not a socket"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&sock).unwrap(),
        "not a socket",
        "never deletes a non-socket"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
