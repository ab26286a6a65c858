use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::parse::DeviceType;
use crate::*;

const MINIMAL: &str = r#"{"version": 1, "name": "demo0", "socket": "/run/vfud/demo0.sock",
 "device": {"type": "emulated", "model": "ats-dma"}}"#;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vfu-config-{}-{test}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(name: &str, socket: &str) -> String {
    format!(
        r#"{{"version": 1, "name": "{name}", "socket": "{socket}", "device": {{"type": "emulated", "model": "ats-dma"}}}}"#
    )
}

/// Returns (path, message) of a ValidateField error, panicking otherwise.
fn field_err(result: Result<DeviceConfig, ConfigError>) -> (String, String) {
    match result {
        Err(ConfigError::ValidateField { path, reason, .. }) => (path, reason),
        other => panic!("expected a ValidateField error, got {other:?}"),
    }
}

fn inline(text: &str) -> Result<DeviceConfig, ConfigError> {
    parse_str(text, None)
}

/// Keeps `DeviceType` in step with `DeviceSpec`: adding a `DeviceSpec`
/// variant breaks this match until the mirror is extended.
fn device_type_of(spec: &DeviceSpec) -> DeviceType {
    match spec {
        DeviceSpec::Emulated(_) => DeviceType::Emulated,
        DeviceSpec::Viommu(_) => DeviceType::Viommu,
        DeviceSpec::Host(_) => DeviceType::Host,
    }
}

#[test]
fn minimal_example_parses() {
    let config = inline(MINIMAL).expect("minimal example");
    assert_eq!(config, embedded_default(Path::new("/run/vfud")));
    assert_eq!(config.version, 1);
    assert_eq!(config.name, "demo0");
    assert_eq!(config.socket, PathBuf::from("/run/vfud/demo0.sock"));
    assert_eq!(
        config.device,
        DeviceSpec::Emulated(EmulatedDevice::new(EmulatedModel::AtsDma))
    );
}

#[test]
fn serialization_round_trips() {
    let config = embedded_default(Path::new("/run/vfud"));
    let text = serde_json::to_string(&config).expect("serialize");
    assert!(text.contains(r#""type":"emulated""#), "{text}");
    assert!(text.contains(r#""model":"ats-dma""#), "{text}");
    assert_eq!(inline(&text).expect("reparse"), config);
}

#[test]
fn device_type_mirror_matches_spec() {
    let spec = embedded_default(Path::new("/x")).device;
    let value = serde_json::to_value(&spec).expect("serialize");
    let tag: DeviceType = serde_json::from_value(value["type"].clone()).expect("tag decodes");
    assert_eq!(tag, device_type_of(&spec));
}

#[test]
fn utf8_bom_is_accepted() {
    let text = format!("\u{feff}{MINIMAL}");
    assert!(inline(&text).is_ok());
}

#[test]
fn unknown_field_at_root_is_named() {
    let text = MINIMAL.replacen("\"version\": 1,", "\"version\": 1, \"colour\": 3,", 1);
    let err = inline(&text).expect_err("unknown field");
    let shown = err.to_string();
    let (path, reason) = field_err(Err(err));
    assert_eq!(path, "colour", "{shown}");
    assert!(reason.contains("unknown field \"colour\""), "{shown}");
    assert!(
        reason.contains("\"socket\""),
        "lists expected fields: {shown}"
    );
    assert!(shown.starts_with("<inline>: at colour: "), "{shown}");
}

#[test]
fn unknown_field_inside_device_is_named() {
    let text = MINIMAL.replace(
        "\"model\": \"ats-dma\"",
        "\"model\": \"ats-dma\", \"speed\": 5",
    );
    let (path, reason) = field_err(inline(&text));
    assert_eq!(path, "device.speed");
    assert!(reason.contains("unknown field \"speed\""), "{reason}");
}

#[test]
fn unknown_model_is_reported_at_device_model() {
    let text = MINIMAL.replace("ats-dma", "foo");
    let err =
        parse_str(&text, Some(Path::new("/etc/vfud/devices/nic0.json"))).expect_err("bad model");
    assert_eq!(
        err.to_string(),
        "/etc/vfud/devices/nic0.json: at device.model: unknown variant \"foo\", expected \"ats-dma\""
    );
}

#[test]
fn device_problems_have_precise_paths() {
    let cases = [
        (r#""device": 5"#, "device", "expected an object"),
        (
            r#""device": {"model": "ats-dma"}"#,
            "device",
            "missing field \"type\"",
        ),
        (
            r#""device": {"type": "vdpa", "model": "ats-dma"}"#,
            "device.type",
            "unknown variant \"vdpa\"",
        ),
        (
            r#""device": {"type": 7, "model": "ats-dma"}"#,
            "device.type",
            "expected",
        ),
        (
            r#""device": {"type": "emulated"}"#,
            "device",
            "missing field \"model\"",
        ),
        (
            r#""device": {"type": "emulated", "model": 1}"#,
            "device.model",
            "invalid type",
        ),
        (
            r#""device": {"type": "emulated", "model": "ats-dma", "a b": 1}"#,
            "device[\"a b\"]",
            "unknown field",
        ),
    ];
    for (device, want_path, want_reason) in cases {
        let text = format!(r#"{{"version": 1, "name": "d", "socket": "/s", {device}}}"#);
        let (path, reason) = field_err(inline(&text));
        assert_eq!(path, want_path, "{device}: {reason}");
        assert!(reason.contains(want_reason), "{device}: {reason}");
    }
}

#[test]
fn duplicate_keys_are_rejected() {
    let text = MINIMAL.replace("\"name\": \"demo0\"", "\"name\": \"a\", \"name\": \"b\"");
    let (_, reason) = field_err(inline(&text));
    assert!(reason.contains("duplicate field \"name\""), "{reason}");

    let text = MINIMAL.replace(
        "\"model\": \"ats-dma\"",
        "\"model\": \"ats-dma\", \"model\": \"ats-dma\"",
    );
    let (path, reason) = field_err(inline(&text));
    assert!(path.starts_with("device"), "{path}");
    assert!(reason.contains("duplicate field \"model\""), "{reason}");
}

#[test]
fn wrong_version_is_rejected() {
    for (version, found) in [
        ("2", "found 2"),
        ("0", "found 0"),
        ("-1", "found -1"),
        ("1.0", "found 1.0"),
        ("\"1\"", "found \"1\""),
        ("null", "found null"),
        ("[1]", "found an array"),
    ] {
        let text = MINIMAL.replace("\"version\": 1", &format!("\"version\": {version}"));
        let (path, reason) = field_err(inline(&text));
        assert_eq!(path, "version", "{version}");
        assert!(reason.contains(found), "{version}: {reason}");
        assert!(reason.contains("expected 1"), "{version}: {reason}");
    }
    let text = MINIMAL.replace("\"version\": 1,", "");
    let (path, reason) = field_err(inline(&text));
    assert_eq!(path, "version");
    assert!(reason.contains("expected 1"), "{reason}");
}

#[test]
fn version_is_checked_before_the_rest() {
    let text = r#"{"version": 2, "whatever": true}"#;
    let (path, _) = field_err(inline(text));
    assert_eq!(path, "version");
}

#[test]
fn missing_field_is_reported_at_root() {
    let text =
        r#"{"version": 1, "socket": "/s", "device": {"type": "emulated", "model": "ats-dma"}}"#;
    let err = inline(text).expect_err("missing name");
    assert_eq!(err.to_string(), "<inline>: at $: missing field \"name\"");
}

#[test]
fn bad_names_are_rejected() {
    let long = "a".repeat(MAX_NAME_LEN + 1);
    for name in [
        "",
        ".hidden",
        "-opt",
        "a b",
        "a/b",
        "nic\\u00e9",
        "x\\ny",
        long.as_str(),
    ] {
        let (path, reason) = field_err(inline(&config(name, "/s")));
        assert_eq!(path, "name", "{name}: {reason}");
    }
    let max = "a".repeat(MAX_NAME_LEN);
    for name in ["a", "_x", "nic0.eth-1_A", "0", max.as_str()] {
        assert!(inline(&config(name, "/s")).is_ok(), "{name}");
    }
    let (_, reason) = field_err(inline(&config("a b", "/s")));
    assert!(
        reason.contains("' '") && reason.contains("position 2"),
        "{reason}"
    );
}

#[test]
fn bad_sockets_are_rejected() {
    let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH_LEN));
    for socket in ["", "/run/vfud/", "dir/", "/a\\u0000b", long.as_str()] {
        let (path, reason) = field_err(parse_str(
            &config("d", socket),
            Some(Path::new("/etc/vfud/d.json")),
        ));
        assert_eq!(path, "socket", "{socket:?}: {reason}");
    }
    let (_, reason) = field_err(inline(&config("d", "/run/vfud/")));
    assert!(reason.contains("demo0.sock"), "suggests a fix: {reason}");
}

#[test]
fn relative_socket_resolves_against_file_dir() {
    let config = parse_str(
        &config("d", "d.sock"),
        Some(Path::new("/etc/vfud/devices/d.json")),
    )
    .expect("valid");
    assert_eq!(config.socket, PathBuf::from("/etc/vfud/devices/d.sock"));

    let config = parse_str(
        &config_text_socket("../run/d.sock"),
        Some(Path::new("/etc/vfud/d.json")),
    )
    .expect("valid");
    assert_eq!(config.socket, PathBuf::from("/etc/vfud/../run/d.sock"));

    let tmp = TempDir::new("relative");
    let file = tmp.write("r.json", &config_text_socket("sub/r.sock"));
    let config = load_file(&file).expect("valid");
    assert_eq!(config.socket, tmp.0.join("sub/r.sock"));
    assert!(config.socket.is_absolute());
}

#[test]
fn relative_socket_from_relative_origin_becomes_absolute() {
    let config =
        parse_str(&config_text_socket("x.sock"), Some(Path::new("d.json"))).expect("valid");
    assert!(config.socket.is_absolute(), "{}", config.socket.display());
    assert!(config.socket.ends_with("x.sock"));
}

fn config_text_socket(socket: &str) -> String {
    config("d", socket)
}

#[test]
fn relative_socket_without_origin_is_rejected() {
    let err = inline(&config("d", "d.sock")).expect_err("relative without origin");
    let shown = err.to_string();
    let (path, reason) = field_err(Err(err));
    assert_eq!(path, "socket");
    assert!(reason.contains("absolute"), "{reason}");
    assert!(shown.starts_with("<inline>: at socket: "), "{shown}");
}

#[test]
fn syntax_errors_have_line_and_column() {
    let text = "{\n  \"version\": 1,\n  \"name\": \"a\" \"socket\": \"/s\"\n}";
    match inline(text) {
        Err(ConfigError::ParseJson {
            origin,
            line,
            column,
            reason,
        }) => {
            assert_eq!(origin, Origin::Inline);
            assert_eq!(line, 3);
            assert!(column > 1);
            assert!(!reason.contains("line"), "position not repeated: {reason}");
        }
        other => panic!("expected ParseJson, got {other:?}"),
    }
    let err = parse_str("{,", Some(Path::new("/etc/x.json"))).expect_err("syntax");
    assert!(
        err.to_string()
            .starts_with("/etc/x.json:1:2: invalid JSON: "),
        "{err}"
    );
}

#[test]
fn non_object_root_is_rejected() {
    for text in ["[]", "null", "1", "\"x\"", "true"] {
        let (path, reason) = field_err(inline(text));
        assert_eq!(path, "$", "{text}");
        assert!(
            reason.contains("expected a JSON object"),
            "{text}: {reason}"
        );
    }
}

#[test]
fn weird_input_never_panics() {
    let deep_array = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_open = "[".repeat(10_000);
    let deep_in_field = format!(
        r#"{{"version": 1, "x": {}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_objects = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let cases: Vec<&str> = vec![
        "",
        " ",
        "[]",
        "{}",
        "null",
        "{\"version\":1e999}",
        "{\"version\":18446744073709551617}",
        "{\"version\":1",
        "{\"version\":1}",
        "{\"version\":1}}",
        "{\"version\":1} x",
        "\"\\ud800\"",
        "{\"version\":1,\"name\":\"\\u0000\",\"socket\":\"\\u0000\",\"device\":{}}",
        "{\"version\":1,\"device\":{\"type\":null}}",
        "\u{feff}",
        &deep_array,
        &deep_open,
        &deep_in_field,
        &deep_objects,
    ];
    for text in cases {
        let result = std::panic::catch_unwind(|| inline(text));
        let result = result.unwrap_or_else(|_| panic!("panicked on {:.40}", text));
        let err = result.expect_err("all cases are invalid");
        assert!(!err.to_string().is_empty());
    }
    let err = inline(&deep_array).expect_err("too deep");
    assert!(matches!(err, ConfigError::ParseJson { .. }), "{err}");
    assert!(err.to_string().contains("recursion limit"), "{err}");
}

#[test]
fn directory_loading_picks_only_json_sorted() {
    let tmp = TempDir::new("dir");
    tmp.write("b.json", &config("bravo", "/run/vfud/b.sock"));
    tmp.write("a.json", &config("alpha", "/run/vfud/a.sock"));
    tmp.write("c.json.bak", "not json");
    tmp.write("README", "not json");
    tmp.write(".hidden.json", "not json");
    tmp.write("json", "not json");
    fs::create_dir(tmp.0.join("sub.json")).expect("mkdir");
    fs::create_dir(tmp.0.join("nested")).expect("mkdir");
    tmp.write("nested/z.json", "not json");

    let configs = load_paths(std::slice::from_ref(&tmp.0)).expect("loads");
    let names: Vec<_> = configs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["alpha", "bravo"]);

    // Listing a file of the directory again does not count as a duplicate.
    let configs = load_paths(&[tmp.0.clone(), tmp.0.join("a.json")]).expect("loads");
    assert_eq!(configs.len(), 2);
}

#[test]
fn empty_directory_is_an_error() {
    let tmp = TempDir::new("empty");
    tmp.write("notes.txt", "hello");
    let errors = load_paths(std::slice::from_ref(&tmp.0)).expect_err("no configs");
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors.errors()[0], ConfigError::NoConfigs { .. }));
    assert_eq!(
        errors.to_string(),
        format!(
            "no device configuration found in {}; add a *.json file, see README",
            tmp.0.display()
        )
    );
    let errors = load_paths(&[]).expect_err("no paths");
    assert!(matches!(errors.errors()[0], ConfigError::NoPaths));
}

#[test]
fn duplicates_across_files_name_both_files() {
    let tmp = TempDir::new("dups");
    let a = tmp.write("a.json", &config("same", "/run/vfud/x.sock"));
    let b = tmp.write("b.json", &config("same", "/run/vfud//x.sock"));
    tmp.write("c.json", &config("other", "/run/vfud/c.sock"));
    let errors = load_paths(std::slice::from_ref(&tmp.0)).expect_err("duplicates");
    assert_eq!(errors.len(), 2, "{errors}");
    match &errors.errors()[0] {
        ConfigError::DuplicateName {
            name,
            first,
            second,
        } => {
            assert_eq!(name, "same");
            assert_eq!(first, &a);
            assert_eq!(second, &b);
        }
        other => panic!("expected DuplicateName, got {other:?}"),
    }
    assert!(matches!(
        errors.errors()[1],
        ConfigError::DuplicateSocket { .. }
    ));
    let shown = errors.to_string();
    let lines: Vec<_> = shown.lines().collect();
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert!(line.contains(&*a.to_string_lossy()), "{line}");
        assert!(line.contains(&*b.to_string_lossy()), "{line}");
    }
}

#[test]
fn relative_sockets_in_different_dirs_do_not_clash() {
    let tmp = TempDir::new("reldirs");
    fs::create_dir(tmp.0.join("one")).expect("mkdir");
    fs::create_dir(tmp.0.join("two")).expect("mkdir");
    let a = tmp.write("one/a.json", &config("a", "dev.sock"));
    let b = tmp.write("two/b.json", &config("b", "dev.sock"));
    let configs = load_paths(&[a, b]).expect("distinct sockets");
    assert_ne!(configs[0].socket, configs[1].socket);
}

#[test]
fn all_errors_are_collected() {
    let tmp = TempDir::new("many");
    tmp.write("1-syntax.json", "{");
    tmp.write("2-model.json", &MINIMAL.replace("ats-dma", "foo"));
    tmp.write("3-rules.json", &config(".bad", "/run/vfud/"));
    tmp.write("4-good.json", &config("good", "/run/vfud/good.sock"));
    let missing = tmp.0.join("missing.json");
    let errors = load_paths(&[tmp.0.clone(), missing.clone()]).expect_err("errors");
    let shown = errors.to_string();
    assert_eq!(errors.len(), 5, "{shown}");
    let errs = errors.errors();
    assert!(
        matches!(errs[0], ConfigError::ParseJson { line: 1, .. }),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("2-model.json: at device.model:")),
        "{shown}"
    );
    assert!(
        matches!(&errs[2], ConfigError::ValidateField { path, .. } if path == "name"),
        "{shown}"
    );
    assert!(
        matches!(&errs[3], ConfigError::ValidateField { path, .. } if path == "socket"),
        "{shown}"
    );
    match &errs[4] {
        ConfigError::ReadFile { file, source } => {
            assert_eq!(file, &missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            let text = errs[4].to_string();
            assert!(
                !text.contains(&source.to_string()),
                "source not repeated: {text}"
            );
            assert!(text.contains("does not exist"), "{text}");
        }
        other => panic!("expected ReadFile, got {other:?}"),
    }
    assert_eq!(shown.lines().count(), 5);
}

#[test]
fn load_file_reports_read_problems() {
    let tmp = TempDir::new("read");
    let err = load_file(&tmp.0.join("nope.json")).expect_err("missing");
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some());

    let err = load_file(&tmp.0).expect_err("directory");
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");

    let big = tmp.write("big.json", &" ".repeat(MAX_CONFIG_BYTES as usize + 1));
    let err = load_file(&big).expect_err("too large");
    assert!(matches!(err, ConfigError::ReadTooLarge { .. }), "{err}");

    let bad_utf8 = tmp.0.join("latin1.json");
    fs::write(&bad_utf8, b"{\"version\": 1, \"name\": \"caf\xe9\"}").expect("write");
    let err = load_file(&bad_utf8).expect_err("bad utf-8");
    assert!(matches!(err, ConfigError::ParseJson { .. }), "{err}");

    let good = tmp.write("good.json", MINIMAL);
    assert_eq!(load_file(&good).expect("valid").name, "demo0");
}

#[test]
fn embedded_default_is_valid() {
    let config = embedded_default(Path::new("/run/vfud"));
    assert_eq!(config.name, "demo0");
    assert_eq!(config.socket, PathBuf::from("/run/vfud/demo0.sock"));
    let text = serde_json::to_string(&config).expect("serialize");
    assert_eq!(inline(&text).expect("valid"), config);
}

/// A configuration whose device object carries `extra` fields after the model.
fn with_device_fields(extra: &str) -> String {
    format!(
        r#"{{"version": 1, "name": "d", "socket": "/s", "device": {{"type": "emulated", "model": "ats-dma", {extra}}}}}"#
    )
}

fn emulated(config: &DeviceConfig) -> &EmulatedDevice {
    match &config.device {
        DeviceSpec::Emulated(e) => e,
        other => panic!("not an emulated device: {other:?}"),
    }
}

#[test]
fn capability_settings_default_to_the_current_level() {
    let config = inline(MINIMAL).expect("minimal");
    let device = emulated(&config);
    let policies = device.capability_policies();
    for setting in [policies.ats, policies.pasid, policies.pri] {
        assert_eq!(setting.value, CapabilityPolicy::Auto);
        assert_eq!(setting.origin, PolicyOrigin::Compat(CompatLevel::CURRENT));
        assert_eq!(setting.to_string(), "auto");
    }
    assert_eq!(device.iommu, None);
    assert_eq!(device.iommu_or_default(), IommuSpec::default());
    assert_eq!(IommuSpec::default().max_pasid_log2, 20);
    assert!(IommuSpec::default().ats_supported);
    assert_eq!(CompatLevel::CURRENT.as_str(), "1");
}

#[test]
fn every_capability_field_parses() {
    let text = with_device_fields(
        r#""ats": "on", "pasid": "off", "pri": "auto", "compat": "1",
           "iommu": {"ats_supported": false, "max_pasid_log2": 8, "pasid_exec": false, "pasid_priv": true},
           "pasid_cap_offset": "0xff0", "pasid_cap_hidden": true"#,
    );
    let config = inline(&text).expect("valid");
    let device = emulated(&config);
    assert_eq!(device.ats, Some(CapabilityPolicy::On));
    assert_eq!(device.pasid, Some(CapabilityPolicy::Off));
    assert_eq!(device.pri, Some(CapabilityPolicy::Auto));
    assert_eq!(
        device.iommu,
        Some(IommuSpec {
            ats_supported: false,
            max_pasid_log2: 8,
            pasid_exec: false,
            pasid_priv: true
        })
    );
    assert_eq!(
        device.pasid_cap_offset.map(PasidCapOffset::get),
        Some(0xff0)
    );
    assert!(device.pasid_cap_hidden);
    let policies = device.capability_policies();
    assert_eq!(policies.ats, PolicySetting::explicit(CapabilityPolicy::On));

    // Serialization round-trips, with the offset in hexadecimal.
    let text = serde_json::to_string(&config).expect("serialize");
    assert!(text.contains(r#""pasid_cap_offset":"0xff0""#), "{text}");
    assert_eq!(inline(&text).expect("reparse"), config);
}

#[test]
fn partial_iommu_block_defaults_the_rest_to_supported() {
    let config = inline(&with_device_fields(r#""iommu": {"max_pasid_log2": 0}"#)).expect("valid");
    let iommu = emulated(&config).iommu_or_default();
    assert_eq!(iommu.max_pasid_log2, 0);
    assert!(iommu.ats_supported && iommu.pasid_exec && iommu.pasid_priv);
}

#[test]
fn compat_level_0_pins_pass_through_defaults_and_explicit_values_win() {
    let config = inline(&with_device_fields(r#""compat": "0""#)).expect("valid");
    let policies = emulated(&config).capability_policies();
    let from_level_0 = PolicyOrigin::Compat(CompatLevel::Level0);
    assert_eq!(
        (policies.ats.value, policies.pasid.value, policies.pri.value),
        (
            CapabilityPolicy::On,
            CapabilityPolicy::Off,
            CapabilityPolicy::On
        )
    );
    assert_eq!(policies.ats.origin, from_level_0);
    assert_eq!(
        policies.ats.to_string(),
        "on (the default of compat level 0)"
    );

    let config = inline(&with_device_fields(r#""compat": 0, "ats": "auto""#)).expect("valid");
    let policies = emulated(&config).capability_policies();
    assert_eq!(
        policies.ats,
        PolicySetting::explicit(CapabilityPolicy::Auto)
    );
    assert_eq!(policies.pri.value, CapabilityPolicy::On);
    assert_eq!(policies.pri.origin, from_level_0);
}

#[test]
fn capability_setting_problems_have_precise_paths() {
    let cases = [
        (
            r#""compat": "7""#,
            "device.compat",
            "unknown compat level \"7\"",
        ),
        (r#""compat": 2"#, "device.compat", "known levels are \"0\""),
        (
            r#""compat": -1"#,
            "device.compat",
            "unknown compat level -1",
        ),
        (
            r#""compat": true"#,
            "device.compat",
            "a compat level such as",
        ),
        (r#""ats": "yes""#, "device.ats", "unknown variant \"yes\""),
        (r#""pri": 1"#, "device.pri", "invalid type"),
        (
            r#""iommu": {"ats": true}"#,
            "device.iommu.ats",
            "unknown field \"ats\"",
        ),
        (r#""iommu": 5"#, "device.iommu", "invalid type"),
        (
            r#""iommu": {"max_pasid_log2": 300}"#,
            "device.iommu.max_pasid_log2",
            "invalid value",
        ),
        (
            r#""iommu": {"max_pasid_log2": 21}"#,
            "device.iommu.max_pasid_log2",
            "more than the 20 bits",
        ),
        (
            r#""pasid_cap_offset": "0xffc""#,
            "device.pasid_cap_offset",
            "leaves no room",
        ),
        (
            r#""pasid_cap_offset": 258"#,
            "device.pasid_cap_offset",
            "not 4-byte aligned",
        ),
        (
            r#""pasid_cap_offset": "0x80""#,
            "device.pasid_cap_offset",
            "below the extended",
        ),
        (
            r#""pasid_cap_offset": -4"#,
            "device.pasid_cap_offset",
            "negative",
        ),
        (
            r#""pasid_cap_offset": "end""#,
            "device.pasid_cap_offset",
            "is not an offset",
        ),
        (
            r#""pasid_cap_offset": 1.5"#,
            "device.pasid_cap_offset",
            "config-space offset",
        ),
        (
            r#""pasid_cap_hidden": "yes""#,
            "device.pasid_cap_hidden",
            "invalid type",
        ),
    ];
    for (fields, want_path, want_reason) in cases {
        let (path, reason) = field_err(inline(&with_device_fields(fields)));
        assert_eq!(path, want_path, "{fields}: {reason}");
        assert!(reason.contains(want_reason), "{fields}: {reason}");
    }
    let (_, reason) = field_err(inline(&with_device_fields(r#""compat": "7""#)));
    assert!(
        reason.contains("\"0\"") && reason.contains("\"1\""),
        "names every known level: {reason}"
    );
}

#[test]
fn pasid_cap_offset_accepts_every_spelling_of_a_valid_offset() {
    for (spelling, want) in [
        ("\"0xff8\"", 0xff8),
        ("\"0XFF8\"", 0xff8),
        ("4088", 0xff8),
        ("\"4088\"", 0xff8),
        ("\"0x100\"", 0x100),
    ] {
        let text = with_device_fields(&format!("\"pasid_cap_offset\": {spelling}"));
        let config = inline(&text).unwrap_or_else(|e| panic!("{spelling}: {e}"));
        assert_eq!(
            emulated(&config).pasid_cap_offset.map(PasidCapOffset::get),
            Some(want),
            "{spelling}"
        );
    }
}

mod json_schema {
    use crate::device_config_schema;

    #[test]
    fn schema_describes_every_top_level_field_and_the_device_kinds() {
        let s = device_config_schema();
        let props = s["properties"].as_object().unwrap();
        let mut keys: Vec<&str> = props.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["device", "name", "socket", "version"]);
        assert_eq!(s["properties"]["version"]["const"], 1);
        assert_eq!(s["additionalProperties"], false);
        let text = s.to_string();
        for field in [
            "\"emulated\"",
            "\"ats-dma\"",
            "\"ats\"",
            "\"pasid\"",
            "\"pri\"",
            "\"compat\"",
            "\"iommu\"",
            "\"max_pasid_log2\"",
            "\"pasid_cap_offset\"",
            "\"pasid_cap_hidden\"",
        ] {
            assert!(
                text.contains(field),
                "{field} missing from the schema: {text}"
            );
        }
    }
}

#[test]
fn viommu_blocks_parse_and_report_problems() {
    let with = |viommu: &str| {
        format!(
            r#"{{"version": 1, "name": "d", "socket": "/s", "device": {{"type": "emulated", "model": "ats-dma", "viommu": {viommu}}}}}"#
        )
    };
    let parsed = inline(&with(
        r#"{"model": "smmuv3", "ats": true, "ssidsize": "auto", "oas": 48, "host": {"idr": ["0x1", 2, "0X3", "0x4", "0x5", "0x6"]}}"#,
    ))
    .unwrap();
    let DeviceSpec::Emulated(e) = &parsed.device else {
        panic!("an emulated device");
    };
    let Some(ViommuSpec::Smmuv3 {
        ats,
        ril,
        ssidsize,
        oas,
        host: Some(host),
    }) = e.viommu_spec().copied()
    else {
        panic!("{:?}", e.viommu);
    };
    assert_eq!(
        (ats, ril, ssidsize, oas),
        (Auto::Value(true), Auto::Auto, Auto::Auto, Auto::Value(48))
    );
    assert_eq!(host.idr.map(|r| r.0), [1, 2, 3, 4, 5, 6]);
    // Serialization round-trips, with registers as hexadecimal strings.
    let text = serde_json::to_string(&parsed).unwrap();
    assert!(
        text.contains(r#""ril":"auto""#) && text.contains(r#""0x6""#),
        "{text}"
    );
    assert_eq!(inline(&text).unwrap(), parsed);
    let vtd = inline(&with(
        r#"{"model": "vtd", "host": {"cap": "0x19ed008c40780c66", "ecap": 4}}"#,
    ))
    .unwrap();
    let DeviceSpec::Emulated(e) = &vtd.device else {
        panic!("an emulated device");
    };
    assert!(
        matches!(e.viommu_spec().copied(), Some(ViommuSpec::Vtd { device_iotlb: Auto::Auto, host: Some(h), .. }) if h.cap.0 == 0x19ed_008c_4078_0c66)
    );

    for (viommu, want_path, want_reason) in [
        (
            r#"{"model": "smmuv3", "oas": 40}"#,
            "device.viommu.oas",
            "44 or 48 bits, not 40",
        ),
        (
            r#"{"model": "smmuv3", "ssidsize": 21}"#,
            "device.viommu.ssidsize",
            "21 bits is more than the 20",
        ),
        (
            r#"{"model": "vtd", "pasid_bits": 32}"#,
            "device.viommu.pasid_bits",
            "32 bits",
        ),
        (
            r#"{"model": "vtd", "ril": true}"#,
            "device.viommu",
            "unknown field",
        ),
        (
            r#"{"model": "amd"}"#,
            "device.viommu.model",
            "unknown variant",
        ),
        (
            r#"{"model": "vtd", "fs1gp": "maybe"}"#,
            "device.viommu",
            "expected \"auto\" or a value",
        ),
        (
            r#"{"model": "vtd", "host": {"cap": "0xzz", "ecap": 0}}"#,
            "device.viommu",
            "not a register value",
        ),
    ] {
        let (path, reason) = field_err(inline(&with(viommu)));
        assert_eq!(path, want_path, "{viommu}: {reason}");
        assert!(reason.contains(want_reason), "{viommu}: {reason}");
    }
}

#[test]
fn a_viommu_device_carries_its_model_properties() {
    let c = inline(
        r#"{"version": 1, "name": "iommu0", "socket": "/s", "device": {"type": "viommu", "model": "vtd", "pasid_bits": 20, "host": {"cap": "0x1", "ecap": 2}}}"#,
    )
    .unwrap();
    assert!(
        matches!(
            c.device,
            DeviceSpec::Viommu(ViommuSpec::Vtd {
                pasid_bits: Auto::Value(20),
                host: Some(_),
                ..
            })
        ),
        "{c:?}"
    );
    let text = serde_json::to_string(&c).unwrap();
    assert_eq!(inline(&text).unwrap(), c, "{text}");
    for (device, want_path, want_reason) in [
        (
            r#"{"type": "viommu", "model": "smmuv3", "oas": 40}"#,
            "device.oas",
            "not 40",
        ),
        (
            r#"{"type": "viommu", "model": "vtd", "pasid_bits": 21}"#,
            "device.pasid_bits",
            "21 bits",
        ),
        (
            r#"{"type": "viommu", "model": "vtd", "ats": true}"#,
            "device",
            "unknown field",
        ),
        (
            r#"{"type": "viommu", "model": "amd"}"#,
            "device.model",
            "unknown variant",
        ),
    ] {
        let text = format!(r#"{{"version": 1, "name": "i", "socket": "/s", "device": {device}}}"#);
        let (path, reason) = field_err(inline(&text));
        assert_eq!(path, want_path, "{device}: {reason}");
        assert!(reason.contains(want_reason), "{device}: {reason}");
    }
}

#[test]
fn a_device_names_its_viommu_device_with_a_requester_id() {
    for (rid, want) in [
        (r#""00:03.0""#, 0x18),
        (r#""0000:01:1f.7""#, 0x1ff),
        ("24", 24),
    ] {
        let c = inline(&with_device_fields(&format!(
            r#""viommu": "iommu0", "requester_id": {rid}"#
        )))
        .unwrap();
        let e = emulated(&c);
        assert_eq!(
            e.viommu_device(),
            Some(("iommu0", crate::RequesterIdSpec(want))),
            "{rid}"
        );
        assert_eq!(e.viommu_spec(), None);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(inline(&text).unwrap(), c, "{text}");
    }
    for (fields, want_path, want_reason) in [
        (r#""viommu": "iommu0""#, "device.requester_id", "missing"),
        (
            r#""requester_id": "00:03.0""#,
            "device.requester_id",
            "only applies",
        ),
        (
            r#""viommu": "iommu0", "requester_id": "00:20.0""#,
            "device.requester_id",
            "not a requester id",
        ),
        (
            r#""viommu": "iommu0", "requester_id": "0001:00:03.0""#,
            "device.requester_id",
            "segment",
        ),
        (
            r#""viommu": "iommu0", "requester_id": 65536"#,
            "device.requester_id",
            "16 bits",
        ),
        (r#""viommu": 5"#, "device.viommu", "name of a device"),
    ] {
        let (path, reason) = field_err(inline(&with_device_fields(fields)));
        assert_eq!(path, want_path, "{fields}: {reason}");
        assert!(reason.contains(want_reason), "{fields}: {reason}");
    }
}

#[test]
fn viommu_links_are_checked_across_files() {
    let dir = std::env::temp_dir().join(format!("vfu-config-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |file: &str, name: &str, device: &str| {
        std::fs::write(
            dir.join(file),
            format!(
                r#"{{"version": 1, "name": "{name}", "socket": "{name}.sock", "device": {device}}}"#
            ),
        )
        .unwrap();
    };
    write("a.json", "iommu0", r#"{"type": "viommu", "model": "vtd"}"#);
    write(
        "b.json",
        "dma0",
        r#"{"type": "emulated", "model": "ats-dma", "viommu": "iommu0", "requester_id": "00:03.0"}"#,
    );
    assert!(load_paths(std::slice::from_ref(&dir)).is_ok());
    write(
        "c.json",
        "dma1",
        r#"{"type": "emulated", "model": "ats-dma", "viommu": "iommu0", "requester_id": 24}"#,
    );
    write(
        "d.json",
        "dma2",
        r#"{"type": "emulated", "model": "ats-dma", "viommu": "nope", "requester_id": 1}"#,
    );
    write(
        "e.json",
        "dma3",
        r#"{"type": "emulated", "model": "ats-dma", "viommu": "dma0", "requester_id": 2}"#,
    );
    let errors = load_paths(std::slice::from_ref(&dir))
        .unwrap_err()
        .into_vec();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 3, "{text:#?}");
    assert!(text[0].contains("c.json: at device.requester_id: requester id 00:03.0 behind vIOMMU \"iommu0\" is already used by device \"dma0\""), "{text:#?}");
    assert!(
        text[1].contains("d.json: at device.viommu: no device named \"nope\"")
            && text[1].contains("iommu0"),
        "{text:#?}"
    );
    assert!(
        text[2].contains("e.json: at device.viommu: device \"dma0\"")
            && text[2].contains("is not a vIOMMU"),
        "{text:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
#[test]
fn host_device_by_pci_address_parses_with_defaults() {
    let config = inline(
        r#"{"version": 1, "name": "nic0", "socket": "/run/vfud/nic0.sock",
            "device": {"type": "host", "pci": "0000:01:00.0", "ats": "off"}}"#,
    )
    .expect("host config");
    let DeviceSpec::Host(host) = &config.device else {
        panic!("not a host device: {:?}", config.device)
    };
    assert_eq!(host.pci.as_deref(), Some("0000:01:00.0"));
    assert_eq!(host.cdev, None);
    assert_eq!(host.iommufd_or_default(), PathBuf::from("/dev/iommu"));
    assert_eq!(host.capability_policies().ats.value, CapabilityPolicy::Off);
    assert_eq!(
        host.capability_policies().pasid.value,
        CapabilityPolicy::Auto
    );
    let text = serde_json::to_string(&config).expect("serialize");
    assert_eq!(inline(&text).expect("reparse"), config);
}

#[test]
fn host_device_by_cdev_with_iommufd_parses() {
    let config = inline(
        r#"{"version": 1, "name": "nic0", "socket": "/run/vfud/nic0.sock",
            "device": {"type": "host", "cdev": "/dev/vfio/devices/vfio3", "iommufd": "/dev/iommu"}}"#,
    )
    .expect("host config");
    let DeviceSpec::Host(host) = &config.device else {
        panic!("not a host device")
    };
    assert_eq!(host.cdev, Some(PathBuf::from("/dev/vfio/devices/vfio3")));
    assert_eq!(host.pci, None);
}

#[test]
fn host_device_errors_name_the_field_and_the_fix() {
    let cases = [
        (r#"{"type": "host"}"#, "device", "needs \"pci\""),
        (
            r#"{"type": "host", "pci": "0000:01:00.0", "cdev": "/dev/vfio/devices/vfio0"}"#,
            "device.cdev",
            "keep only one",
        ),
        (
            r#"{"type": "host", "pci": "01:00.0"}"#,
            "device.pci",
            "0000:01:00.0",
        ),
        (
            r#"{"type": "host", "pci": "0000:01:20.0"}"#,
            "device.pci",
            "not a PCI address",
        ),
        (
            r#"{"type": "host", "pci": "0000:01:00.8"}"#,
            "device.pci",
            "not a PCI address",
        ),
        (
            r#"{"type": "host", "cdev": "vfio0"}"#,
            "device.cdev",
            "not absolute",
        ),
        (
            r#"{"type": "host", "pci": "0000:01:00.0", "iommufd": "iommu"}"#,
            "device.iommufd",
            "not absolute",
        ),
        (
            r#"{"type": "host", "pci": "0000:01:00.0", "bdf": "x"}"#,
            "device.bdf",
            "unknown field",
        ),
        (
            r#"{"type": "host", "pci": "0000:01:00.0", "ats": "maybe"}"#,
            "device.ats",
            "maybe",
        ),
    ];
    for (device, path, needle) in cases {
        let text = format!(
            r#"{{"version": 1, "name": "nic0", "socket": "/run/vfud/nic0.sock", "device": {device}}}"#
        );
        let err = inline(&text).expect_err(device).to_string();
        assert!(
            err.contains(&format!("{path}:")) || err.contains(&format!("{path} ")),
            "{device}: {err}"
        );
        assert!(err.contains(needle), "{device}: {err}");
    }
}
