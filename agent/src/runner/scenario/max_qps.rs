//! Max-QPS search: bisection over short server runs for the highest QPS whose p99 meets the latency
//! bound without drops, then a server run at that QPS whose windows are the run's telemetry.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetbench_common::domain::RunConfig;
use serde_json::json;

use super::server::server;
use super::{QueryExec, check};
use crate::runner::RunError;
use crate::runner::recorder::Recorder;

/// Max-QPS search: the highest server QPS whose p99 meets the latency bound without drops.
pub fn max_qps(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let bound_ms = c.latency_bound_ms;
    let probe_ms = if c.duration_ms > 0 {
        c.duration_ms
    } else {
        1000
    };
    // Capacity estimate from back-to-back queries.
    let n = 50u64;
    let t = Instant::now();
    for _ in 0..n {
        check(cancel)?;
        execs[0].run()?;
    }
    let mean = t.elapsed().as_secs_f64() / n as f64;
    let capacity = execs.len() as f64 / mean.max(1e-9);
    let mut probe_cfg = c.clone();
    probe_cfg.iterations = 0;
    probe_cfg.duration_ms = probe_ms;
    probe_cfg.max_duration_ms = 0;
    probe_cfg.early_stop = false;
    // The job's minimums are for the final run, not for each probe.
    probe_cfg.min_duration_ms = 0;
    probe_cfg.min_queries = 0;
    let mut steps = Vec::new();
    let mut probe = |qps: f64| -> Result<bool, RunError> {
        let mut sink = |_: fleetbench_proto::v1::TelemetryWindow| {};
        let mut scratch = Recorder::new(
            "probe",
            Duration::from_millis(probe_ms),
            0,
            1,
            None,
            &mut sink,
        );
        let s = server(execs, &probe_cfg, qps, &mut scratch, cancel)?;
        let pass = s.p99_ms <= bound_ms && s.dropped == 0;
        steps.push(json!({ "qps": qps, "p99_ms": s.p99_ms, "dropped": s.dropped, "achieved_qps": s.achieved_qps, "pass": pass }));
        Ok(pass)
    };
    let mut lo = capacity * 0.25;
    while !probe(lo)? {
        lo /= 2.0;
        if lo < 1.0 {
            return Err(RunError::Failed(format!(
                "max-qps: even {lo:.2} QPS misses the latency bound of {bound_ms} ms"
            )));
        }
    }
    let mut hi = capacity * 1.25;
    while probe(hi)? {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..8 {
        if hi / lo <= 1.03 {
            break;
        }
        let mid = (lo * hi).sqrt();
        if probe(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut final_cfg = c.clone();
    final_cfg.target_qps = lo;
    if final_cfg.iterations == 0 && final_cfg.duration_ms == 0 && final_cfg.max_duration_ms == 0 {
        final_cfg.duration_ms = probe_ms;
    }
    let stats = server(execs, &final_cfg, lo, rec, cancel)?;
    let mut report = stats.to_json(bound_ms);
    report["scenario"] = json!("max-qps");
    report["max_qps"] = json!(lo);
    report["capacity_estimate_qps"] = json!(capacity);
    report["search"] = json!(steps);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::scenario::testing::{Fixed, timing};
    use fleetbench_common::domain::Scenario;

    #[test]
    fn max_qps_finds_the_knee() {
        let _t = timing();
        // One stream at 1 ms per query: capacity 1000/s; a 20 ms p99 bound allows most of it.
        let c = fleetbench_common::config::with_defaults(RunConfig {
            scenario: Scenario::MaxQps,
            latency_bound_ms: 20.0,
            duration_ms: 400,
            window_ms: 100,
            ..Default::default()
        });
        let mut sink = |_: fleetbench_proto::v1::TelemetryWindow| {};
        let mut rec = Recorder::new("t", Duration::from_millis(100), 0, 1, None, &mut sink);
        let mut execs: Vec<Box<dyn QueryExec>> = vec![Box::new(Fixed(Duration::from_millis(1)))];
        let report = max_qps(&mut execs, &c, &mut rec, &AtomicBool::new(false)).unwrap();
        let max = report["max_qps"].as_f64().unwrap();
        assert!((200.0..=1100.0).contains(&max), "{report}");
        assert!(report["search"].as_array().unwrap().len() >= 3, "{report}");
    }
}
