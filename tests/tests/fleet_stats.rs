//! Fleet statistics through the real binaries: three agents of one platform (each pinned to one
//! core), one of them sharing its core with a CPU-burning process, which halves its throughput. The
//! ranking flags that host by the stated rule and shows the spread across hosts; `rank --history`
//! lists the runs in time order.
//!
//! This file holds one test so no other test of this binary competes for the cores while it measures.

use std::process::Command;
use std::time::Duration;

use fleetbench_cli::commands::{jobs, rank};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_cli::output::Format;
use fleetbench_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_hosts_slowed_by_a_cpu_burner_is_flagged_as_noisy() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    // Agents on one host run one at a time, so a and b never share core 1; c shares core 0 with the
    // burner for its whole run.
    let _burner = cpu_burner(0);
    let _a = pinned_agent(&coord, "a", 1, dir.path());
    let _b = pinned_agent(&coord, "b", 1, dir.path());
    let _c = pinned_agent(&coord, "c", 0, dir.path());
    wait_online(&client, 3).await;
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            duration_s: Some(2.0),
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

    let resp = rank::fetch(
        &client,
        &rank::RankArgs {
            output: Format::Json,
            history: true,
            ..rank::RankArgs::for_model("digits")
        },
    )
    .await
    .unwrap();
    assert_eq!(
        resp.rows.len(),
        1,
        "one platform, one variant: {:?}",
        resp.rows
    );
    let row = &resp.rows[0];
    let hosts = row.hosts.expect("three agents ran the row");
    assert_eq!(hosts.agents, 3);
    assert!(hosts.throughput_cv > 0.15, "{hosts:?}");
    // By the statistical rule only c stands out; a or b may still be flagged for a disturbed run
    // (steal, a frequency dip) on a busy machine, which is the rule's other half doing its work.
    let by_rule: Vec<&str> = row
        .noisy_hosts
        .iter()
        .filter(|n| n.reason.contains("median"))
        .map(|n| n.agent.as_str())
        .collect();
    assert_eq!(by_rule, ["c"], "{:?}\n{:?}", row.noisy_hosts, row.history);
    let c = row.noisy_hosts.iter().find(|n| n.agent == "c").unwrap();
    assert!(
        c.throughput_ratio < 0.75 && c.reason.contains("throughput"),
        "sharing its core costs c about half its throughput: {c:?}"
    );
    assert_eq!(row.history.len(), 3);
    assert!(
        row.history
            .windows(2)
            .all(|w| w[0].started_at_ms <= w[1].started_at_ms)
    );

    // The table says it in words, and the history prints.
    let out = Command::new(built_bin("fleetbench"))
        .args(["--coordinator", &coord.url, "rank", "digits", "--history"])
        .env("FLEETBENCH_TOKEN", &coord.tokens.admin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("! noisy host c on "), "{text}");
    assert!(
        text.contains("history of ") && text.contains("(3 runs)"),
        "{text}"
    );
}
