//! Replays every committed fuzz input (the seed corpus and the regression inputs of crashes
//! found and fixed) through the fuzz target bodies, so they run on every `cargo test`, with
//! the stable toolchain and without cargo-fuzz.

use std::path::{Path, PathBuf};

use vfud_tests::fuzz;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["seeds", "regressions"] {
        if let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) {
            files.extend(dir.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    files.sort();
    files
}

fn replay(target: &str, body: fn(&[u8]) -> bool) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no committed inputs for fuzz target {target}"
    );
    let mut deep = 0;
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        eprintln!("{target}: {}", f.display());
        deep += usize::from(body(&data));
    }
    assert!(
        deep > 0,
        "no {target} seed gets past the first parser: the seeds have rotted"
    );
}

#[test]
fn message_stream_corpus() {
    replay("message_stream", fuzz::message_stream);
}

#[test]
fn config_space_corpus() {
    replay("config_space", fuzz::config_space);
}

#[test]
fn config_json_corpus() {
    replay("config_json", fuzz::config_json);
}

#[test]
fn viommu_vtd_corpus() {
    replay("viommu_vtd", fuzz::viommu_vtd);
}

#[test]
fn viommu_smmuv3_corpus() {
    replay("viommu_smmuv3", fuzz::viommu_smmuv3);
}
