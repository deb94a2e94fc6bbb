//! Harness overhead: the agent's single-stream p50 on the bundled digits model (batch 1, one
//! intra-op thread) beside a bare ort loop timed in the same process, and beside a Python onnxruntime
//! loop with the same model and thread settings, in alternating rounds.
//!
//! `cargo bench -p fleetbench-agent --bench harness_overhead [-- --iterations 20000 --rounds 5]`
//! (after `eval "$(scripts/dev.sh env)"`).

mod support;

use std::process::Command;
use std::time::Instant;

use fleetbench_common::config::with_defaults;
use fleetbench_common::domain::{RunConfig, Scenario};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

fn bare_ort_p50(
    runner: &fleetbench_agent::runner::OrtRunner,
    iterations: usize,
    warmup: usize,
) -> f64 {
    let mut session = Session::builder(&runner.runtime.env)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .with_optimization_level(GraphOptimizationLevel::All)
        .unwrap()
        .commit_from_file(support::digits())
        .unwrap();
    let input = Tensor::from_array(([1usize, 64], vec![0.5f32; 64])).unwrap();
    for _ in 0..warmup {
        session.run(ort::inputs![&input]).unwrap();
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let out = session.run(ort::inputs![&input]).unwrap();
        drop(out);
        times.push(t.elapsed().as_nanos() as f64);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

fn agent_p50(runner: &fleetbench_agent::runner::OrtRunner, iterations: u64, warmup: u64) -> f64 {
    let config = with_defaults(RunConfig {
        scenario: Scenario::SingleStream,
        iterations,
        warmup_iterations: warmup,
        intra_op_threads: 1,
        skip_accuracy: true,
        ..Default::default()
    });
    let (report, merged, _) = support::run(runner, &support::digits(), config);
    assert_eq!(report.queries, iterations);
    merged.value_at_quantile(0.5) as f64
}

fn python_p50(iterations: usize, warmup: usize) -> Option<f64> {
    let script = support::repo().join("agent/benches/ort_python_loop.py");
    let out = Command::new(support::python())
        .arg(script)
        .arg(support::digits())
        .args([
            "--threads",
            "1",
            "--iterations",
            &iterations.to_string(),
            "--warmup",
            &warmup.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "python loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["p50_ns"].as_f64()
}

fn main() {
    let iterations: usize = support::arg("--iterations")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rounds: usize = support::arg("--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let warmup = 1000;
    let runner = support::runner();
    println!(
        "harness overhead: digits fp32 (MLP 64-512-512-10), batch 1, 1 intra-op thread, {iterations} queries x {rounds} rounds"
    );
    println!(
        "{:>5} {:>14} {:>14} {:>14}",
        "round", "bare ort µs", "agent µs", "python µs"
    );
    let (mut bare, mut agent, mut py) = (Vec::new(), Vec::new(), Vec::new());
    for r in 1..=rounds {
        let b = bare_ort_p50(&runner, iterations, warmup);
        let a = agent_p50(&runner, iterations as u64, warmup as u64);
        let p = python_p50(iterations, warmup);
        println!(
            "{r:>5} {:>14.2} {:>14.2} {:>14}",
            b / 1e3,
            a / 1e3,
            p.map(|p| format!("{:.2}", p / 1e3))
                .unwrap_or_else(|| "n/a".into())
        );
        bare.push(b);
        agent.push(a);
        if let Some(p) = p {
            py.push(p);
        }
    }
    let (b, a) = (support::median(bare), support::median(agent));
    let diff = a - b;
    let allowed = (0.05 * b).max(2000.0);
    println!(
        "median p50: bare ort {:.2} µs, agent {:.2} µs, difference {:+.2} µs ({:+.2} %)",
        b / 1e3,
        a / 1e3,
        diff / 1e3,
        100.0 * diff / b
    );
    println!(
        "agent within max(5 %, 2 µs) = {:.2} µs of bare ort: {}",
        allowed / 1e3,
        if diff.abs() <= allowed { "yes" } else { "NO" }
    );
    if !py.is_empty() {
        let p = support::median(py);
        println!(
            "python onnxruntime p50 {:.2} µs; agent not slower than python: {}",
            p / 1e3,
            if a <= p { "yes" } else { "NO" }
        );
    }
}
