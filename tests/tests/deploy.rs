//! The units and example configurations in deploy/: systemd accepts the units (with ExecStart pointed at
//! the built binaries) without a warning, they keep their sandbox, and the example configurations load.

use fleetbench_tests::repo;

#[derive(serde::Serialize)]
struct NoFlags {}

fn verify(unit: &str, binary: &str) {
    let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
    for must in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "StateDirectory=",
        "User=",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(text.contains(must), "{unit} lacks {must:?}");
    }
    let built = repo().join("target/release").join(binary);
    assert!(
        built.exists(),
        "{} is missing: build the binaries first",
        built.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(unit);
    let installed = format!("/usr/local/bin/{binary}");
    assert!(
        text.contains(&installed),
        "{unit}: ExecStart is not {installed}"
    );
    std::fs::write(
        &copy,
        text.replace(&installed, &built.display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{unit}: {stderr}");
    // systemd ignores a setting it cannot parse, with only a warning: none may appear.
    assert!(stderr.trim().is_empty(), "{unit}: {stderr}");
}

#[test]
fn the_systemd_units_verify_and_keep_their_sandbox() {
    verify("fleetbench-coordinator.service", "fleetbench-coordinator");
    verify("fleetbench-agent.service", "fleetbench-agent");
}

#[test]
fn the_example_configurations_load() {
    let c = fleetbench_coordinator::CoordinatorConfig::load(
        Some(&repo().join("deploy/coordinator.toml")),
        &NoFlags {},
    )
    .unwrap();
    assert_eq!(c.listen, "0.0.0.0:7700");
    assert_eq!(c.data_dir, "/var/lib/fleetbench");
    // The agent's names a CA certificate, which must exist: point it at one.
    let dir = tempfile::tempdir().unwrap();
    let files = fleetbench_coordinator::tls::TlsFiles::under(dir.path());
    fleetbench_coordinator::tls::init(&files, &[]).unwrap();
    let text = std::fs::read_to_string(repo().join("deploy/agent.toml")).unwrap();
    assert!(text.contains("/etc/fleetbench/ca.pem"));
    let copy = dir.path().join("agent.toml");
    std::fs::write(
        &copy,
        text.replace(
            "/etc/fleetbench/ca.pem",
            &files.ca_cert().display().to_string(),
        ),
    )
    .unwrap();
    let a = fleetbench_agent::AgentConfig::load(Some(&copy), &NoFlags {}).unwrap();
    assert_eq!(a.coordinator, ["https://coord.example.net:7700"]);
    assert_eq!(a.cache_max_bytes, 50 << 30);
    assert_eq!(a.network().unwrap().targets[0].name, "office");
}
