//! `fleetbench compare` as a release gate, through the real binaries: an agent pinned to one core
//! runs the same job three times — once more as is, once sharing its core with a CPU-burning process
//! — and the CLI's exit status tells a plain re-run (0) from a regression (1) and from an error (2).
//!
//! This file holds one test so no other test of this binary competes for the cores while it measures.

use std::process::Command;
use std::time::Duration;

use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_exits_1_on_a_slowed_rerun_0_on_a_plain_one_and_2_on_a_missing_job() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _agent = pinned_agent(&coord, "pinned", 0, dir.path());
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let job = || async {
        let id = jobs::submit(
            &client,
            &JobArgs {
                model: Some("digits".into()),
                duration_s: Some(3.0),
                window_ms: Some(250),
                threads: vec![1],
                warmup: Some(200),
                skip_accuracy: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let s = wait_job(&client, &id, Duration::from_secs(120)).await;
        assert_eq!(s.state, "succeeded", "{:?}", job_detail(&client, &id).await);
        id
    };
    let baseline = job().await;
    let rerun = job().await;
    let slowed = {
        let _burner = cpu_burner(0);
        job().await
    };

    let compare = |a: &str, b: &str, extra: &[&str]| {
        let out = Command::new(built_bin("fleetbench"))
            .args(["--coordinator", &coord.url, "compare", a, b])
            .args(["--metrics", "p50,throughput", "--threshold", "20%"])
            .args(extra)
            .env("FLEETBENCH_TOKEN", &coord.tokens.admin)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = compare(&baseline, &rerun, &[]);
    assert_eq!(
        code,
        Some(0),
        "a plain re-run is no regression:\n{out}{err}"
    );
    assert!(out.contains("0 regressed"), "{out}");

    let (code, out, err) = compare(&baseline, &slowed, &[]);
    assert_eq!(
        code,
        Some(1),
        "sharing the agent's core halves its throughput:\n{out}{err}"
    );
    assert!(out.contains("REGRESSED"), "{out}");

    // Saved rankings compare as the jobs do.
    let save = |job: &str, file: &str| {
        let out = Command::new(built_bin("fleetbench"))
            .args([
                "--coordinator",
                &coord.url,
                "rank",
                "digits",
                "--output",
                "json",
            ])
            .args(["--job", job])
            .env("FLEETBENCH_TOKEN", &coord.tokens.admin)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let path = dir.path().join(file);
        std::fs::write(&path, out.stdout).unwrap();
        path.to_string_lossy().to_string()
    };
    let (base_file, slowed_file) = (save(&baseline, "base.json"), save(&slowed, "slow.json"));
    let (code, out, err) = compare(&base_file, &slowed_file, &["--output", "json"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let throughput = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metric"] == "throughput")
        .unwrap();
    assert_eq!(throughput["verdict"], "regressed", "{throughput}");
    assert!(
        throughput["change"].as_f64().unwrap() < -0.3,
        "throughput falls by about half: {throughput}"
    );

    // Output into a closed pipe (`fleetbench compare … | head -0`) ends the CLI as SIGPIPE ends other
    // Unix tools: no panic, no exit status 101 that a gate would misread.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(built_bin("fleetbench"))
        .args([
            "--coordinator",
            &coord.url,
            "compare",
            &base_file,
            &slowed_file,
        ])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && out.status.code() != Some(101),
        "{:?}: {err}",
        out.status
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);

    // Errors are 2, whatever the comparison would say.
    let (code, _, err) = compare(&baseline, "no-such-job", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("candidate: no file 'no-such-job'"), "{err}");
    let (code, _, err) = compare(&baseline, &rerun, &["--threshold", "lots"]);
    assert_eq!(code, Some(2), "{err}");
}
