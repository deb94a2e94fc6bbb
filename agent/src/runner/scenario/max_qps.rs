//! Max-QPS search: bisection over short server runs for the highest QPS whose p99 meets the latency
//! bound without drops, then a server run at that QPS whose windows are the run's telemetry.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetbench_common::config::slo_label;
use fleetbench_common::domain::{GenerateConfig, RunConfig};
use serde_json::json;

use super::server::{ServerStats, server};
use super::{QueryExec, check};
use crate::runner::RunError;
use crate::runner::recorder::{Recorder, TokenRecorder};

/// Requests in each probe of a max-rate search.
pub const SLO_PROBE_REQUESTS: u64 = 12;

/// What a probe of the search must meet.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Single calls: p99 latency within this many ms.
    LatencyBound(f64),
    /// Generate requests: every SLO term's p99 (TTFT, TPOT, E2E).
    Slo(&'a GenerateConfig),
}

/// Max-QPS search: the highest server QPS whose p99 meets the latency bound without drops.
pub fn max_qps(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let (rate, stats, report) = search(
        execs,
        c,
        rec,
        cancel,
        Target::LatencyBound(c.latency_bound_ms),
    )?;
    let mut out = stats.to_json(c.latency_bound_ms);
    out["scenario"] = json!("max-qps");
    out["max_qps"] = json!(rate);
    out["capacity_estimate_qps"] = report["capacity_estimate"].clone();
    out["search"] = report["search"].clone();
    Ok(out)
}

/// Bisection over short open-loop runs for the highest rate whose probe meets `target` without
/// drops, then an open-loop run at that rate into `rec`. Returns the rate, the final run's figures,
/// and the search (`capacity_estimate`, `search` steps) as JSON.
pub fn search(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
    target: Target<'_>,
) -> Result<(f64, ServerStats, serde_json::Value), RunError> {
    let probe_ms = if c.duration_ms > 0 {
        c.duration_ms
    } else {
        1000
    };
    // Capacity estimate from back-to-back queries (a generate request is many calls: a few do).
    let n = match target {
        Target::LatencyBound(_) => 50u64,
        Target::Slo(_) => 3,
    };
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
    if let Target::Slo(_) = target {
        // A generate request takes many calls: a probe is a fixed number of requests, whatever the
        // rate, so that slow rates are judged on as many requests as fast ones.
        probe_cfg.iterations = SLO_PROBE_REQUESTS;
        probe_cfg.duration_ms = 0;
    }
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
        if let Target::Slo(g) = target {
            scratch.tokens = Some(TokenRecorder::new(
                g.slo_ttft_ms,
                g.slo_tpot_ms,
                g.slo_e2e_ms,
            ));
        }
        let s = server(execs, &probe_cfg, qps, &mut scratch, cancel)?;
        let (pass, figures) = match target {
            Target::LatencyBound(bound) => (s.p99_ms <= bound, json!({ "p99_ms": s.p99_ms })),
            Target::Slo(g) => {
                let tokens = scratch.tokens.as_ref().expect("set above");
                let p99 = |h: &fleetbench_common::hist::LatencyHistogram| {
                    h.value_at_quantile(0.99) as f64 / 1e6
                };
                let (ttft, tpot) = (p99(&tokens.total_ttft), p99(&tokens.total_tpot));
                let meets = |bound: f64, v: f64| bound <= 0.0 || v <= bound;
                (
                    meets(g.slo_ttft_ms, ttft)
                        && meets(g.slo_tpot_ms, tpot)
                        && meets(g.slo_e2e_ms, s.p99_ms),
                    json!({ "ttft_p99_ms": ttft, "tpot_p99_ms": tpot, "e2e_p99_ms": s.p99_ms }),
                )
            }
        };
        let pass = pass && s.dropped == 0 && scratch.queries > 0;
        steps.push(json!({ "rate": qps, "figures": figures, "dropped": s.dropped, "achieved": s.achieved_qps, "pass": pass }));
        Ok(pass)
    };
    let what = match target {
        Target::LatencyBound(bound) => format!("the latency bound of {bound} ms"),
        Target::Slo(g) => format!("the SLO {}", slo_label(g)),
    };
    let mut lo = capacity * 0.25;
    while !probe(lo)? {
        lo /= 2.0;
        if lo < capacity * 1e-3 || lo < 0.01 {
            return Err(RunError::Failed(format!(
                "max rate: even {lo:.3}/s misses {what}"
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
    Ok((
        lo,
        stats,
        json!({ "capacity_estimate": capacity, "search": steps }),
    ))
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
