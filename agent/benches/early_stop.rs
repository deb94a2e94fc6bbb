//! Early stopping: the time to a stable, VALID single-stream result on the bundled digits model, beside
//! a fixed-length LoadGen-style run (600 s by default) on the same model and settings.
//!
//! `cargo bench -p fleetbench-agent --bench early_stop [-- --fixed-s 600]`

mod support;

use std::time::Instant;

use fleetbench_common::config::with_defaults;
use fleetbench_common::domain::{RunConfig, Scenario};

fn main() {
    let fixed_s: u64 = support::arg("--fixed-s")
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let runner = support::runner();
    let base = RunConfig {
        scenario: Scenario::SingleStream,
        warmup_iterations: 1000,
        intra_op_threads: 1,
        window_ms: 1000,
        skip_accuracy: true,
        ..Default::default()
    };
    let early = with_defaults(RunConfig {
        duration_ms: fixed_s * 1000,
        min_duration_ms: 2000,
        min_queries: 10_000,
        early_stop: true,
        ..base.clone()
    });
    let fixed = with_defaults(RunConfig {
        duration_ms: fixed_s * 1000,
        ..base
    });
    println!(
        "early stopping on digits fp32, single-stream, batch 1, 1 intra-op thread, 1 s windows"
    );
    println!(
        "rule: VALID (>= 2 s, >= 10000 queries) and stable (max/min of throughput and p99 over the last 3 windows <= 1.10)"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "run", "wall s", "queries", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for (name, config) in [
        ("early stop", early),
        (&*format!("fixed {fixed_s} s"), fixed),
    ] {
        let t = Instant::now();
        let (report, h, windows) = support::run(&runner, &support::digits(), config);
        println!(
            "{:<22} {:>10.1} {:>10} {:>10.2} {:>10.2} {:>10.2}   ({windows} windows)",
            name,
            t.elapsed().as_secs_f64(),
            report.queries,
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.value_at_quantile(0.999) as f64 / 1e3
        );
    }
}
