//! `fleetbench report`: a real fleet's job written as HTML by the real CLI, then opened in headless
//! Chromium (Debian's /usr/bin/chromium, driven by playwright-core; `scripts/ensure-browser.sh`
//! installs both): no console error, nothing fetched, every chart drawn with its data.

use std::process::Command;
use std::time::Duration;

use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_tests::*;

fn cli(coord: &TestCoordinator, args: &[&str]) -> std::process::Output {
    Command::new(built_bin("fleetbench"))
        .args(["--coordinator", &coord.url])
        .args(args)
        .env("FLEETBENCH_TOKEN", &coord.tokens.admin)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_html_report_opens_offline_in_chromium_with_every_chart_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _agent = TestAgent::start(coord.agent("priced", &["cost_per_hour=0.5"], dir.path()));
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["all".into()],
            batch_size: vec![1, 8],
            iterations: Some(300),
            warmup: Some(20),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(180)).await;
    assert_eq!(s.state, "succeeded", "{:?}", job_detail(&client, &id).await);

    let html = dir.path().join("report.html");
    let out = cli(
        &coord,
        &[
            "report",
            "digits",
            "--job",
            &id,
            "-o",
            html.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("src=") && !page.contains("href="),
        "nothing to load from anywhere"
    );
    assert!(page.contains("<svg"), "charts are inline SVG");

    let node = Command::new("node")
        .arg(repo().join("tests/browser/check_report.mjs"))
        .arg(&html)
        .output()
        .expect("node (scripts/ensure-browser.sh installs it with chromium and playwright-core)");
    assert!(
        node.status.success(),
        "Chromium could not open the report: {}",
        String::from_utf8_lossy(&node.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&node.stdout).unwrap();
    assert_eq!(
        seen["errors"],
        serde_json::json!([]),
        "console errors: {seen}"
    );
    assert_eq!(seen["requests"], serde_json::json!([]), "fetches: {seen}");
    assert!(
        seen["answer"].as_str().unwrap().starts_with("Deploy "),
        "the recommendation leads: {seen}"
    );
    let charts = seen["charts"].as_array().unwrap();
    let ids: Vec<&str> = charts.iter().map(|c| c["id"].as_str().unwrap()).collect();
    // Two variants × two batch sizes: a CDF of four rows, accuracy against cost (the agent has a
    // price), throughput against batch size.
    for want in ["cdf", "pareto", "batch"] {
        assert!(ids.contains(&want), "chart {want} missing: {ids:?}");
    }
    for c in charts {
        let points = c["points"].as_u64().unwrap();
        assert!(points > 0, "{c}");
        assert!(
            c["width"].as_f64().unwrap() > 100.0 && c["height"].as_f64().unwrap() > 100.0,
            "{c}"
        );
        let drawn = c["line_points"].as_u64().unwrap() + c["markers"].as_u64().unwrap();
        assert!(
            drawn >= points,
            "chart {} drew {drawn} marks for {points} points: {c}",
            c["id"]
        );
    }
    let cdf = charts.iter().find(|c| c["id"] == "cdf").unwrap();
    assert!(cdf["lines"].as_u64().unwrap() >= 4, "a line per row: {cdf}");

    // The other formats carry the same rows.
    let json = dir.path().join("report.json");
    let out = cli(
        &coord,
        &[
            "report",
            "digits",
            "--job",
            &id,
            "-o",
            json.to_str().unwrap(),
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["sections"][0]["rows"].as_array().unwrap().len(), 4, "{v}");
    assert_eq!(v["runs"].as_array().unwrap().len(), 4);
    assert!(
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["valid"] == true)
    );
    let csv = dir.path().join("report.csv");
    assert!(
        cli(
            &coord,
            &[
                "report",
                "digits",
                "-o",
                csv.to_str().unwrap(),
                "--format",
                "csv"
            ]
        )
        .status
        .success()
    );
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 5);

    // A model without runs: an error that says so, and no file.
    let none = dir.path().join("none.html");
    let out = cli(&coord, &["report", "nosuch", "-o", none.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown model 'nosuch'"),
        "{out:?}"
    );
    assert!(!none.exists());
}
