//! The `fleetbench-agent` binary: bad settings fail at start with errors that name what is wrong.

use std::process::{Command, Stdio};

fn fails_with(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetbench-agent"))
        .args(args)
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("FLEETBENCH_COORDINATOR")
        .stdin(Stdio::null())
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(
        stderr.contains(needle),
        "stderr for {args:?} lacks '{needle}':\n{stderr}"
    );
}

#[test]
fn bad_settings_are_named() {
    fails_with(&["--cpus", "4096"], "cpus: CPU 4096 is not available");
    fails_with(&["--cpus", "a-b"], "cpus: 'a-b' is not a CPU list");
    fails_with(
        &["--coordinator", "ftp://x"],
        "coordinator: 'ftp://x' must start with http://",
    );
    fails_with(
        &["--label", "tier"],
        "label 'tier' is not of the form key=value",
    );
    fails_with(
        &["--label", "cost_per_hour=cheap"],
        "cost_per_hour='cheap' is not a non-negative number",
    );
}

#[test]
fn a_missing_runtime_library_is_named() {
    fails_with(
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
        "ONNX Runtime library /nonexistent/libonnxruntime.so does not exist",
    );
}
