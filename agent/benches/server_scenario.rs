//! Server scenario accuracy: achieved QPS against target while the model keeps up, and latency from the
//! schedule growing with the backlog when arrivals outpace the model (no coordinated omission).
//!
//! `cargo bench -p fleetbench-agent --bench server_scenario [-- --seconds 10]`

mod support;

use fleetbench_common::config::with_defaults;
use fleetbench_common::domain::{RunConfig, Scenario};

fn server(
    runner: &fleetbench_agent::runner::OrtRunner,
    qps: f64,
    duration_ms: u64,
) -> serde_json::Value {
    let config = with_defaults(RunConfig {
        scenario: Scenario::Server,
        target_qps: qps,
        duration_ms,
        warmup_iterations: 500,
        intra_op_threads: 1,
        max_outstanding: 1_000_000,
        skip_accuracy: true,
        ..Default::default()
    });
    let (report, merged, _) = support::run(runner, &support::digits(), config);
    let mut v: serde_json::Value = serde_json::from_str(&report.scenario_json).unwrap();
    v["p50_ms"] = (merged.value_at_quantile(0.5) as f64 / 1e6).into();
    v
}

fn main() {
    let seconds: u64 = support::arg("--seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let runner = support::runner();
    // Capacity of one stream with one thread, from a short single-stream run.
    let probe = with_defaults(RunConfig {
        iterations: 5000,
        warmup_iterations: 500,
        intra_op_threads: 1,
        skip_accuracy: true,
        ..Default::default()
    });
    let (_, h, _) = support::run(&runner, &support::digits(), probe);
    let capacity = 1e9 / h.mean();
    println!(
        "server scenario on digits fp32, 1 stream, 1 intra-op thread; capacity ~{capacity:.0} queries/s"
    );

    println!("\nwhile the model keeps up ({seconds} s each):");
    println!(
        "{:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>14}",
        "target", "scheduled", "achieved", "err %", "p50 ms", "p99 ms", "issue p99 ms"
    );
    for frac in [0.25, 0.5] {
        let target = (capacity * frac).round();
        let v = server(&runner, target, seconds * 1000);
        let achieved = v["achieved_qps"].as_f64().unwrap();
        println!(
            "{:>10.0} {:>12.1} {:>12.1} {:>9.2} {:>9.3} {:>9.3} {:>14.3}",
            target,
            v["scheduled_qps"].as_f64().unwrap(),
            achieved,
            100.0 * (achieved - target) / target,
            v["p50_ms"].as_f64().unwrap(),
            v["p99_ms"].as_f64().unwrap(),
            v["issue_delay_ms"]["p99"].as_f64().unwrap()
        );
    }

    println!(
        "\narrivals at 2x capacity: the backlog grows, and so does latency from the schedule:"
    );
    println!(
        "{:>10} {:>10} {:>12} {:>12} {:>16}",
        "target", "run s", "achieved", "p99 ms", "service p99 ms"
    );
    let target = (capacity * 2.0).round();
    for s in [1u64, 2, 4] {
        let v = server(&runner, target, s * 1000);
        println!(
            "{:>10.0} {:>10} {:>12.1} {:>12.1} {:>16.3}",
            target,
            s,
            v["achieved_qps"].as_f64().unwrap(),
            v["p99_ms"].as_f64().unwrap(),
            v["service_p99_ms"].as_f64().unwrap()
        );
    }
}
