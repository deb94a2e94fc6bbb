//! The network path, through the real binaries: one agent runs in a network namespace and reaches the
//! coordinator only through a link the test runs that adds 50 ms each way and carries 2 MB/s; the
//! other reaches it directly, but reaches the probe target `hq` (a real `fleetbench-agent
//! probe-server`) through a second such link, which the first reaches directly. Each agent's
//! measurements must show the link it is behind, and `rank --client` must move each platform by its
//! own path.
//!
//! This file holds one test: it needs root for the namespace, and no other test competes with it
//! for the cores while links are timed.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_tests::*;

/// One way of each test link.
const DELAY: Duration = Duration::from_millis(50);
/// The coordinator link's rate, bytes/s.
const FAR_RATE: f64 = 2e6;
/// The `hq` link's rate, bytes/s.
const HQ_RATE: f64 = 4e6;
/// Bytes of each throughput probe.
const PROBE_BYTES: u64 = 48 * 1024;

fn agent(
    program: Command,
    coordinator: &str,
    name: &str,
    hq: &str,
    coord: &TestCoordinator,
    dir: &std::path::Path,
) -> Killed {
    let mut c = agent_command(program, coordinator, name, coord, dir);
    c.args(["--label", &format!("site={name}")])
        .args(["--probe", &format!("hq={hq}")])
        .args(["--network-probe-bytes", &PROBE_BYTES.to_string()]);
    Killed(c.spawn().expect("start the agent"))
}

fn cli(coord: &TestCoordinator, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(built_bin("fleetbench"))
        .args(["--coordinator", &coord.url])
        .args(args)
        .env("FLEETBENCH_TOKEN", &coord.tokens.admin)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn rank(coord: &TestCoordinator, client: &str, payload: u64) -> Vec<serde_json::Value> {
    let (ok, out, err) = cli(
        coord,
        &[
            "rank",
            "digits",
            "--objective",
            "p50",
            "--client",
            client,
            "--payload-bytes",
            &payload.to_string(),
            "--output",
            "json",
        ],
    );
    assert!(ok, "rank --client {client}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Rows of `site` (its platform's name carries the label) come after every row of the other site.
fn all_after(rows: &[serde_json::Value], late: &str) -> bool {
    let is_late = |r: &serde_json::Value| {
        r["platform"]
            .as_str()
            .unwrap()
            .contains(&format!("site={late}"))
    };
    let last_early = rows.iter().rposition(|r| !is_late(r));
    let first_late = rows.iter().position(is_late);
    matches!((last_early, first_late), (Some(e), Some(l)) if e < l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_a_slow_link_measures_it_and_the_end_to_end_ranking_moves() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let ns = Netns::create();
    let host = IpAddr::V4(ns.host_ip);
    let far_link = SlowLink::start(host, coord.addr, DELAY, Some(FAR_RATE)).await;
    let (_probe_server, hq) = probe_server(&format!("{host}:0"));
    let hq_link = SlowLink::start(IpAddr::V4(Ipv4Addr::LOCALHOST), hq, DELAY, Some(HQ_RATE)).await;
    let _near = agent(
        Command::new(built_bin("fleetbench-agent")),
        &coord.url,
        "near",
        &hq_link.addr.to_string(),
        &coord,
        dir.path(),
    );
    let _far = agent(
        ns.command(&built_bin("fleetbench-agent")),
        &format!("http://{}", far_link.addr),
        "far",
        &hq.to_string(),
        &coord,
        dir.path(),
    );
    wait_online(&client, 2).await;

    // Both agents measure at registration; wait for both reports.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let agents = loop {
        let agents = list_agents(&client).await;
        if agents.len() == 2 && agents.iter().all(|a| a.network.len() == 2) {
            break agents;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no network reports within 60 s: {agents:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let path = |agent: &str, target: &str| {
        agents
            .iter()
            .find(|a| a.name == agent)
            .and_then(|a| a.network.iter().find(|p| p.target == target))
            .unwrap_or_else(|| panic!("{agent} has no path to {target}: {agents:#?}"))
            .clone()
    };
    for (agent, target) in [
        ("near", "coordinator"),
        ("near", "hq"),
        ("far", "coordinator"),
        ("far", "hq"),
    ] {
        let p = path(agent, target);
        assert!(p.error.is_empty(), "{agent} → {target}: {p:?}");
        assert_eq!(p.probe_bytes, PROBE_BYTES);
        eprintln!(
            "{agent} → {target}: rtt {:.1} ms (min {:.1}), down {:.0} B/s, up {:.0} B/s",
            p.rtt_ms, p.rtt_min_ms, p.down_bytes_per_s, p.up_bytes_per_s
        );
    }
    // The slow paths show the link: 2 × 50 ms, and its rate.
    for (agent, target, rate) in [("far", "coordinator", FAR_RATE), ("near", "hq", HQ_RATE)] {
        let p = path(agent, target);
        assert!(
            (95.0..200.0).contains(&p.rtt_ms),
            "{agent} → {target} crosses a 100 ms round trip: {p:?}"
        );
        for bw in [p.down_bytes_per_s, p.up_bytes_per_s] {
            assert!(
                (0.4 * rate..1.6 * rate).contains(&bw),
                "{agent} → {target} crosses a {rate} B/s link: {p:?}"
            );
        }
    }
    // The direct paths are loopback-fast.
    for (agent, target) in [("near", "coordinator"), ("far", "hq")] {
        let p = path(agent, target);
        assert!(p.rtt_ms < 20.0, "{agent} → {target} is direct: {p:?}");
        assert!(p.down_bytes_per_s > 2.0 * HQ_RATE, "{p:?}");
    }

    // `agents list` shows them.
    let (ok, out, err) = cli(&coord, &["agents", "list"]);
    assert!(ok, "{err}");
    eprintln!("{out}");
    assert!(out.contains("network paths"), "{out}");
    let far_line = out
        .lines()
        .find(|l| {
            l.contains("far") && l.contains("coordinator") && l.contains(&far_link.addr.to_string())
        })
        .unwrap_or_else(|| panic!("no line for far's coordinator path:\n{out}"));
    assert!(far_line.contains("ms"), "{far_line}");

    // One job on both platforms.
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            duration_s: Some(1.0),
            window_ms: Some(250),
            threads: vec![1],
            warmup: Some(100),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(180)).await;
    assert_eq!(s.state, "succeeded", "{:?}", job_detail(&client, &id).await);

    // For a client at the coordinator, the far platform pays 100 ms and 100 kB at 2 MB/s (50 ms).
    let payload = 100_000u64;
    let rows = rank(&coord, "coordinator", payload);
    assert_eq!(rows.len(), 4, "two variants on two platforms: {rows:#?}");
    assert!(
        all_after(&rows, "far"),
        "for a client at the coordinator, every far row ranks after every near row: {rows:#?}"
    );
    let far_p = path("far", "coordinator");
    for r in &rows {
        let n = &r["network"];
        let net = n["network_ms"].as_f64().unwrap();
        let expected = n["rtt_ms"].as_f64().unwrap()
            + payload as f64 / n["down_bytes_per_s"].as_f64().unwrap() * 1e3;
        assert!((net - expected).abs() < 1e-6, "{r:#?}");
        let e2e = n["e2e_p50_ms"].as_f64().unwrap() - r["p50_ms"].as_f64().unwrap();
        assert!((e2e - net).abs() < 1e-6, "{r:#?}");
        if r["platform"].as_str().unwrap().contains("site=far") {
            assert!((n["rtt_ms"].as_f64().unwrap() - far_p.rtt_ms).abs() < 1e-9);
            assert!(
                (120.0..400.0).contains(&net),
                "100 ms round trip + 100 kB at 2 MB/s: {r:#?}"
            );
        }
    }
    // For a client at hq, it is the other way round.
    let rows = rank(&coord, "hq", payload);
    assert!(
        all_after(&rows, "near"),
        "for a client at hq, every near row ranks after every far row: {rows:#?}"
    );
    // The table says what it adds.
    let (ok, out, err) = cli(
        &coord,
        &[
            "rank",
            "digits",
            "--client",
            "hq",
            "--payload-bytes",
            "100000",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("E2E P99") && out.contains("from 'hq'"),
        "{out}"
    );

    // Bad requests are named.
    let (ok, _, err) = cli(&coord, &["rank", "digits", "--client", "nowhere"]);
    assert!(!ok);
    assert!(
        err.contains("no agent has measured a path to 'nowhere'")
            && err.contains("coordinator, hq"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &coord,
        &[
            "rank",
            "digits",
            "--client",
            "hq",
            "--objective",
            "throughput",
        ],
    );
    assert!(!ok);
    assert!(err.contains("adds to latency"), "{err}");
}
