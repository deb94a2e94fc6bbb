//! The README's main job, as a user runs it: `fleetbench quickstart` starts a coordinator and two agents
//! as separate processes (one pinned to one core), makes quantized and pruned variants of the bundled
//! model, pushes its distilled student, benchmarks them all and prints a ranking; then the bundled
//! decoder generates on both agents and is ranked by tokens per second.

use std::process::Command;

#[test]
fn quickstart_prints_a_ranking_of_both_platforms() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetbench"))
        .current_dir(repo)
        // Settings a user exported for a real fleet (as the README's "Across real machines" does)
        // must not reach the local one.
        .env("FLEETBENCH_CA_CERT", "/nonexistent/ca.pem")
        .env("FLEETBENCH_COORDINATOR", "https://coord.example.net:7700")
        .env(
            "FLEETBENCH_TOKEN",
            "fbt1.0000000000000000.not-a-real-secret",
        )
        .env(
            "FLEETBENCH_JOIN_TOKEN",
            "fbjoin1::fbt1.0000000000000000.not-a-real-secret",
        )
        .args(["quickstart", "--iterations", "500", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run fleetbench quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let (digits, llm) = stdout
        .split_once("ranking of 'tiny-llama'")
        .unwrap_or_else(|| panic!("a ranking of the bundled decoder:\n{stdout}"));
    // Table rows (the recommendation's sentence names a platform too).
    let rows: Vec<&str> = digits
        .lines()
        .filter(|l| l.starts_with('│') && l.contains("tier="))
        .collect();
    // The decoder generated on both platforms, ranked by tokens per second.
    let llm_rows: Vec<&str> = llm
        .lines()
        .filter(|l| l.starts_with('│') && l.contains("tier="))
        .collect();
    assert_eq!(llm_rows.len(), 2, "tiny-llama on both platforms:\n{stdout}");
    assert!(
        llm_rows
            .iter()
            .all(|r| r.contains("generate") && r.contains("p128 o64")),
        "{stdout}"
    );
    assert!(
        llm.contains("TOKENS/S") && llm.contains("TTFT P99"),
        "{stdout}"
    );
    assert_eq!(
        rows.len(),
        8,
        "two platforms x four variants (fp32, distilled student, int8-dynamic, pruned-s50):\n{stdout}"
    );
    for v in ["fp32", "student", "int8-dynamic", "pruned-s50"] {
        assert_eq!(
            rows.iter()
                .filter(|r| r.contains(&format!(" {v} ")))
                .count(),
            2,
            "{v} on both platforms:\n{stdout}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.contains("tier=edge") && r.contains("1 core")),
        "{stdout}"
    );
    assert!(rows.iter().any(|r| r.contains("tier=cloud")), "{stdout}");
    assert!(
        digits
            .contains("recommendation (fleetbench recommend digits --min-accuracy 0.95):\nDeploy "),
        "{stdout}"
    );
    assert!(
        rows.iter().all(|r| r.contains(" %")),
        "accuracy on every row:\n{stdout}"
    );
    // The agents were separate processes with their own logs, and the edge one was pinned.
    let report = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(
        report.contains("<svg") && report.contains("Deploy "),
        "the quickstart writes a report with charts and the answer"
    );
    assert!(stdout.contains("report.html"), "{stdout}");
    let edge_log = std::fs::read_to_string(dir.path().join("edge-1.log")).unwrap();
    assert!(edge_log.contains("Connected"), "{edge_log}");
    // Secure as a real fleet: TLS, and tokens (the agents joined with the join token `init` made,
    // and keep credentials of their own, readable by their owner only).
    assert!(stderr.contains("listening on https://"), "{stderr}");
    let coordinator_log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(coordinator_log.contains("tls=true"), "{coordinator_log}");
    assert_eq!(
        coordinator_log.matches("action=\"agent joined\"").count(),
        2,
        "{coordinator_log}"
    );
    for f in [
        "edge-1/credential",
        "cloud-1/credential",
        "admin.token",
        "join.token",
    ] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{f}"
        );
    }
}

#[test]
fn bad_arguments_fail_before_any_network_use() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetbench"))
        .args([
            "--coordinator",
            "http://127.0.0.1:9",
            "jobs",
            "submit",
            "--model",
            "digits",
            "--iterations",
            "-5",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("iterations: must be > 0 (got -5)"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_coordinator_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetbench"))
        .args(["--coordinator", "http://127.0.0.1:9", "agents", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator at http://127.0.0.1:9"),
        "{stderr}"
    );
}
