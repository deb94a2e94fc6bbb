//! Max-QPS search: bisection over short server runs for the highest QPS whose p99 meets the latency
//! bound without drops, then a server run at that QPS whose windows are the run's telemetry.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetbench_common::config::slo_label;
use fleetbench_common::domain::{GenerateConfig, RunConfig};
use serde_json::json;

use super::server::server;
use super::{QueryExec, RequestTiming, check};
use crate::runner::RunError;
use crate::runner::recorder::{Recorder, TokenRecorder};

/// Requests a probe of a max-rate search expects at its rate (it lasts at least that long).
pub const SLO_PROBE_REQUESTS: u64 = 12;

/// An open-loop probe that completes less than this share of the rate it was offered has fallen
/// behind (a generate request's TPOT does not show a queue; its throughput does).
const KEEPS_UP: f64 = 0.85;

/// The search never offers more than this many times the capacity estimated from unloaded queries.
const MAX_OVER_CAPACITY: f64 = 8.0;

/// What a probe of the search must meet.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Single calls: p99 latency within this many ms.
    LatencyBound(f64),
    /// Generate requests: every SLO term's p99 (TTFT, TPOT, E2E).
    Slo(&'a GenerateConfig),
}

/// What a search found.
#[derive(Debug, Clone)]
pub struct Found {
    /// The highest rate that passed.
    pub rate: f64,
    /// Capacity estimated from back-to-back queries.
    pub capacity: f64,
    /// Every probe, in order.
    pub steps: Vec<serde_json::Value>,
}

/// Max-QPS search: the highest server QPS whose p99 meets the latency bound without drops.
pub fn max_qps(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let found = find_rate(execs, c, cancel, Target::LatencyBound(c.latency_bound_ms))?;
    let stats = server(execs, &final_config(c, found.rate), found.rate, rec, cancel)?;
    let mut report = stats.to_json(c.latency_bound_ms);
    report["scenario"] = json!("max-qps");
    report["max_qps"] = json!(found.rate);
    report["capacity_estimate_qps"] = json!(found.capacity);
    report["search"] = json!(found.steps);
    Ok(report)
}

/// The configuration of the run at the rate a search found.
pub fn final_config(c: &RunConfig, rate: f64) -> RunConfig {
    let mut f = c.clone();
    f.target_qps = rate;
    if f.iterations == 0 && f.duration_ms == 0 && f.max_duration_ms == 0 {
        f.duration_ms = probe_ms(c);
    }
    f
}

fn probe_ms(c: &RunConfig) -> u64 {
    if c.duration_ms > 0 {
        c.duration_ms
    } else {
        1000
    }
}

/// The longest of `timings`' TTFT, TPOT and E2E against `g`'s SLO: why even unloaded requests miss
/// it, or None.
fn unloaded_miss(g: &GenerateConfig, timings: &[RequestTiming]) -> Option<String> {
    let ms = |ns: u64| ns as f64 / 1e6;
    let worst = |f: &dyn Fn(&RequestTiming) -> Option<f64>| {
        timings.iter().filter_map(f).fold(0.0, f64::max)
    };
    let ttft = worst(&|t| t.token_ready_ns.first().map(|&v| ms(v)));
    let e2e = worst(&|t| t.token_ready_ns.last().map(|&v| ms(v)));
    let tpot = worst(&|t| {
        let n = t.token_ready_ns.len();
        (n > 1).then(|| ms(t.token_ready_ns[n - 1] - t.token_ready_ns[0]) / (n - 1) as f64)
    });
    [
        ("ttft", ttft, g.slo_ttft_ms),
        ("tpot", tpot, g.slo_tpot_ms),
        ("e2e", e2e, g.slo_e2e_ms),
    ]
    .iter()
    .find(|(_, v, bound)| *bound > 0.0 && v > bound)
    .map(|(name, v, bound)| {
        format!(
            "max rate: requests alone, without load, miss the SLO: {name} {v:.3} ms > {bound} ms"
        )
    })
}

/// Bisection over short open-loop runs for the highest rate whose probe meets `target` without
/// drops (and, for generate requests, keeps up with the rate it is offered). Never offers more than
/// eight times the capacity estimate, and stops at the configuration's maximum duration with the
/// best rate so far.
pub fn find_rate(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    cancel: &AtomicBool,
    target: Target<'_>,
) -> Result<Found, RunError> {
    let started = Instant::now();
    let deadline =
        (c.max_duration_ms > 0).then(|| started + Duration::from_millis(c.max_duration_ms));
    let late = || deadline.is_some_and(|d| Instant::now() >= d);
    let probe_ms = probe_ms(c);
    // Capacity estimate from back-to-back queries (a generate request is many calls: a few do, and
    // they must meet the SLO on their own, or no rate can).
    let n = match target {
        Target::LatencyBound(_) => 50u64,
        Target::Slo(_) => 3,
    };
    let t = Instant::now();
    let mut unloaded = Vec::new();
    for _ in 0..n {
        check(cancel)?;
        unloaded.extend(execs[0].run_request()?);
    }
    let mean = t.elapsed().as_secs_f64() / n as f64;
    if let Target::Slo(g) = target
        && let Some(why) = unloaded_miss(g, &unloaded)
    {
        return Err(RunError::Failed(why));
    }
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
        let mut cfg = probe_cfg.clone();
        if let Target::Slo(_) = target {
            // Long enough for a dozen requests at this rate, so a slow rate is judged on as many
            // requests as a fast one, and a backlog has time to show.
            cfg.duration_ms = cfg
                .duration_ms
                .max((SLO_PROBE_REQUESTS as f64 / qps * 1e3).ceil() as u64);
        }
        let mut sink = |_: fleetbench_proto::v1::TelemetryWindow| {};
        let mut scratch = Recorder::new(
            "probe",
            Duration::from_millis(cfg.duration_ms),
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
        let s = server(execs, &cfg, qps, &mut scratch, cancel)?;
        let step = match target {
            Target::LatencyBound(bound) => {
                let pass = s.p99_ms <= bound && s.dropped == 0;
                json!({ "qps": qps, "p99_ms": s.p99_ms, "dropped": s.dropped, "achieved_qps": s.achieved_qps, "pass": pass })
            }
            Target::Slo(g) => {
                let tokens = scratch.tokens.as_ref().expect("set above");
                let p99 = |h: &fleetbench_common::hist::LatencyHistogram| {
                    h.value_at_quantile(0.99) as f64 / 1e6
                };
                let (ttft, tpot) = (p99(&tokens.total_ttft), p99(&tokens.total_tpot));
                let meets = |bound: f64, v: f64| bound <= 0.0 || v <= bound;
                let keeps_up = s.achieved_qps >= KEEPS_UP * s.scheduled_qps;
                let pass = meets(g.slo_ttft_ms, ttft)
                    && meets(g.slo_tpot_ms, tpot)
                    && meets(g.slo_e2e_ms, s.p99_ms)
                    && keeps_up
                    && s.dropped == 0
                    && scratch.queries > 0;
                json!({
                    "rate": qps, "ttft_p99_ms": ttft, "tpot_p99_ms": tpot, "e2e_p99_ms": s.p99_ms,
                    "scheduled": s.scheduled_qps, "achieved": s.achieved_qps, "keeps_up": keeps_up,
                    "dropped": s.dropped, "pass": pass,
                })
            }
        };
        let pass = step["pass"] == true;
        steps.push(step);
        Ok(pass)
    };
    let what = match target {
        Target::LatencyBound(bound) => format!("the latency bound of {bound} ms"),
        Target::Slo(g) => format!("the SLO {}", slo_label(g)),
    };
    let mut lo = capacity * 0.25;
    while !probe(lo)? {
        lo /= 2.0;
        if lo < capacity * 1e-3 || late() {
            return Err(RunError::Failed(format!(
                "max rate: even {lo:.3}/s misses {what}"
            )));
        }
    }
    let mut hi = capacity * 1.25;
    while hi <= capacity * MAX_OVER_CAPACITY && !late() && probe(hi)? {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..8 {
        if hi / lo <= 1.03 || late() {
            break;
        }
        let mid = (lo * hi).sqrt();
        if probe(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Found {
        rate: lo,
        capacity,
        steps,
    })
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
