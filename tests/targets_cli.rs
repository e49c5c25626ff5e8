//! `cap-host targets`: the built-in device profiles, a user folder that adds and
//! overrides, and clean errors for a bad folder or file.

mod common;

use common::{assert_clean_failure, cap_host};
use serde_json::Value;

fn targets(args: &[&str]) -> Value {
    let mut all = vec!["targets", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = cap_host(&all);
    assert_eq!(code, 0, "targets failed: {err}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn lists_the_builtin_boards_with_usable_memory() {
    let v = targets(&[]);
    let names: Vec<&str> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in [
        "jetson-orin-nano-4gb",
        "jetson-orin-nano-8gb",
        "jetson-orin-nx-16gb",
        "jetson-agx-orin-64gb",
        "jetson-xavier-nx-8gb",
        "raspberry-pi-5-8gb",
        "raspberry-pi-4-4gb",
        "host",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for t in v["targets"].as_array().unwrap() {
        let (total, reserved) = (
            t["total_memory_bytes"].as_u64().unwrap(),
            t["reserved_bytes"].as_u64().unwrap(),
        );
        assert_eq!(t["usable_bytes"].as_u64().unwrap(), total - reserved);
    }
}

#[test]
fn a_user_folder_adds_boards_and_bad_ones_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let board = r#"
name = "tiny-board"
description = "a test board"
total_memory_bytes = 268435456
reserved_bytes = 67108864
memory_bandwidth_gbps = 4.0
cpu_arch = "aarch64"
cpu_cores = 1
cpu_model = "Arm Cortex-A53"
cpu_features = ["neon"]
rust_target = "aarch64-unknown-linux-gnu"
preferred_dtype = "f16"
"#;
    std::fs::write(d.path().join("tiny-board.toml"), board).unwrap();
    let v = targets(&["--targets-dir", d.path().to_str().unwrap()]);
    let tiny = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "tiny-board")
        .expect("user board listed");
    assert_eq!(tiny["usable_bytes"].as_u64(), Some(201_326_592));

    std::fs::write(
        d.path().join("broken.toml"),
        board
            .replace("tiny-board", "broken")
            .replace("268435456", "1"),
    )
    .unwrap();
    assert_clean_failure(
        &["targets", "--targets-dir", d.path().to_str().unwrap()],
        &["broken.toml"],
    );

    let (code, _out, err) = cap_host(&["targets", "--targets-dir", "/no/such/dir"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/no/such/dir"), "{err}");
}
