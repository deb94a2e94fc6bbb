//! Run summaries: a finished run's windows are merged into one histogram, read into percentiles, and
//! judged VALID or INVALID by the run's own rules (minimum duration and queries, maximum duration,
//! latency bound), with stability over the last windows.

use fleetbench_common::config::{config_label, with_defaults};
use fleetbench_common::hist::{self, is_stable};
use fleetbench_common::labels::cost_per_hour;
use fleetbench_proto::v1::{
    ResourceSummary, RunConfig, RunResult, RunSummary, Scenario, TelemetryWindow,
};

use crate::error::Result;
use crate::store::{FinishedRun, RunContext, RunState};

/// Builds the final state of a run from its stored windows and the agent's result.
pub fn finish_run(ctx: &RunContext, result: &RunResult) -> Result<FinishedRun> {
    let config = with_defaults(
        result
            .report
            .as_ref()
            .and_then(|r| r.effective_config.clone())
            .unwrap_or_else(|| ctx.config.clone()),
    );
    let base = FinishedRun {
        run_id: result.run_id.clone(),
        state: RunState::Failed,
        summary: None,
        histogram: Vec::new(),
        error: String::new(),
        config_key: config_label(&config),
    };
    if result.cancelled {
        return Ok(FinishedRun {
            state: RunState::Cancelled,
            error: "cancelled".into(),
            ..base
        });
    }
    if !result.error.is_empty() {
        return Ok(FinishedRun {
            error: result.error.clone(),
            ..base
        });
    }
    let Some(report) = &result.report else {
        return Ok(FinishedRun {
            error: "the agent sent a result without a report".into(),
            ..base
        });
    };
    if (ctx.windows.len() as u64) < result.window_count {
        return Ok(FinishedRun {
            error: format!(
                "the coordinator holds {} of the {} telemetry windows the agent sent",
                ctx.windows.len(),
                result.window_count
            ),
            ..base
        });
    }
    let mut merged = hist::new_histogram();
    let mut window_throughput = Vec::with_capacity(ctx.windows.len());
    let mut window_p99 = Vec::with_capacity(ctx.windows.len());
    for w in &ctx.windows {
        let h = hist::decode(&w.latency_histogram)?;
        hist::merge(&mut merged, &h)?;
        let secs = (w.end_offset_ns.saturating_sub(w.start_offset_ns)) as f64 / 1e9;
        if secs > 0.0 && w.samples > 0 {
            window_throughput.push(w.samples as f64 / secs);
            window_p99.push(h.value_at_quantile(0.99) as f64);
        }
    }
    let stats = hist::stats(&merged);
    let elapsed_s = report.elapsed_ns as f64 / 1e9;
    let throughput = if elapsed_s > 0.0 {
        report.samples as f64 / elapsed_s
    } else {
        0.0
    };
    let stable = is_stable(
        &window_throughput,
        config.stability_windows as usize,
        config.stability_ratio,
    ) && is_stable(
        &window_p99,
        config.stability_windows as usize,
        config.stability_ratio,
    );
    let invalid_reason = validity(
        &config,
        report.queries,
        report.elapsed_ns,
        stats.p99 / 1e6,
        report.dropped_queries,
    );
    let summary = RunSummary {
        run_id: result.run_id.clone(),
        agent: ctx.agent_name.clone(),
        platform_id: ctx.platform_id.clone(),
        variant: ctx.variant.clone(),
        config: Some(config.clone()),
        valid: invalid_reason.is_none(),
        invalid_reason: invalid_reason.unwrap_or_default(),
        latency: Some(stats.to_proto_ms()),
        throughput_per_s: throughput,
        queries: report.queries,
        samples: report.samples,
        accuracy: report.accuracy,
        session_create_ms: report.session_create_ns as f64 / 1e6,
        first_inference_ms: report.first_inference_ns as f64 / 1e6,
        resources: Some(resource_summary(&ctx.windows)),
        record_json: report.record_json.clone(),
        stable,
        duration_ms: report.elapsed_ns as f64 / 1e6,
        late_queries: report.late_queries,
        dropped_queries: report.dropped_queries,
        scenario_json: report.scenario_json.clone(),
        started_at_ms: ctx.started_at,
        finished_at_ms: fleetbench_common::now_ms(),
        windows: ctx.windows.len() as u64,
        cost_per_hour: cost_per_hour(&ctx.agent_labels),
        quality_json: report.quality_json.clone(),
    };
    Ok(FinishedRun {
        state: RunState::Succeeded,
        summary: Some(summary),
        histogram: hist::encode(&merged),
        ..base
    })
}

/// Why a run is INVALID, or None when it is VALID.
pub fn validity(
    c: &RunConfig,
    queries: u64,
    elapsed_ns: u64,
    p99_ms: f64,
    dropped: u64,
) -> Option<String> {
    let elapsed_ms = elapsed_ns / 1_000_000;
    let mut reasons = Vec::new();
    if queries == 0 {
        reasons.push("no queries completed".to_string());
    }
    if c.iterations > 0 && queries < c.iterations {
        reasons.push(format!(
            "completed {queries} of {} iterations",
            c.iterations
        ));
    }
    if c.min_queries > 0 && queries < c.min_queries {
        reasons.push(format!("{queries} queries < min_queries {}", c.min_queries));
    }
    if c.min_duration_ms > 0 && elapsed_ms < c.min_duration_ms {
        reasons.push(format!(
            "ran {elapsed_ms} ms < min_duration {} ms",
            c.min_duration_ms
        ));
    }
    if c.max_duration_ms > 0 && elapsed_ms > c.max_duration_ms + c.window_ms as u64 {
        reasons.push(format!(
            "ran {elapsed_ms} ms > max_duration {} ms",
            c.max_duration_ms
        ));
    }
    let scenario = Scenario::try_from(c.scenario).unwrap_or(Scenario::SingleStream);
    if scenario == Scenario::Server && c.latency_bound_ms > 0.0 && p99_ms > c.latency_bound_ms {
        reasons.push(format!(
            "p99 {p99_ms:.3} ms > latency bound {} ms",
            c.latency_bound_ms
        ));
    }
    if scenario == Scenario::Server && dropped > 0 {
        reasons.push(format!("{dropped} queries dropped (too many outstanding)"));
    }
    if reasons.is_empty() {
        None
    } else {
        Some(reasons.join("; "))
    }
}

/// Folds per-window resource samples into a run summary.
pub fn resource_summary(windows: &[TelemetryWindow]) -> ResourceSummary {
    let samples: Vec<_> = windows
        .iter()
        .filter_map(|w| w.resources.as_ref())
        .filter(|r| r.samples > 0)
        .collect();
    if samples.is_empty() {
        return ResourceSummary {
            cpu_steal_pct: -1.0,
            gpu_utilization_pct: -1.0,
            ..Default::default()
        };
    }
    let n = samples.len() as f64;
    let mean = |f: &dyn Fn(&&fleetbench_proto::v1::ResourceSample) -> f64| {
        samples.iter().map(f).sum::<f64>() / n
    };
    let steal: Vec<f64> = samples
        .iter()
        .map(|r| r.cpu_steal_pct)
        .filter(|v| *v >= 0.0)
        .collect();
    let gpu: Vec<f64> = samples
        .iter()
        .map(|r| r.gpu_utilization_pct)
        .filter(|v| *v >= 0.0)
        .collect();
    let cpu_steal_pct = if steal.is_empty() {
        -1.0
    } else {
        steal.iter().sum::<f64>() / steal.len() as f64
    };
    let mut flags = Vec::new();
    if cpu_steal_pct > 5.0 {
        flags.push(format!("cpu steal {cpu_steal_pct:.1} % (noisy neighbours)"));
    }
    let freqs: Vec<f64> = samples
        .iter()
        .map(|r| r.cpu_frequency_mhz)
        .filter(|f| *f > 0.0)
        .collect();
    if let (Some(max), Some(min)) = (
        freqs.iter().copied().reduce(f64::max),
        freqs.iter().copied().reduce(f64::min),
    ) && max > 0.0
        && min / max < 0.8
    {
        flags.push(format!(
            "cpu frequency fell to {:.0} % of its peak (throttling)",
            100.0 * min / max
        ));
    }
    ResourceSummary {
        cpu_user_pct: mean(&|r| r.process_cpu_user_pct),
        cpu_system_pct: mean(&|r| r.process_cpu_system_pct),
        rss_mean_bytes: mean(&|r| r.rss_mean_bytes as f64) as u64,
        rss_peak_bytes: samples.iter().map(|r| r.rss_peak_bytes).max().unwrap_or(0),
        system_memory_used_bytes: mean(&|r| r.system_memory_used_bytes as f64) as u64,
        load_average_1m: mean(&|r| r.load_average_1m),
        cpu_frequency_mhz: if freqs.is_empty() {
            0.0
        } else {
            freqs.iter().sum::<f64>() / freqs.len() as f64
        },
        cpu_steal_pct,
        gpu_utilization_pct: if gpu.is_empty() {
            -1.0
        } else {
            gpu.iter().sum::<f64>() / gpu.len() as f64
        },
        gpu_memory_peak_bytes: samples
            .iter()
            .map(|r| r.gpu_memory_used_bytes)
            .max()
            .unwrap_or(0),
        flags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        with_defaults(RunConfig {
            iterations: 100,
            min_queries: 50,
            min_duration_ms: 1000,
            ..Default::default()
        })
    }

    #[test]
    fn validity_rules() {
        assert_eq!(validity(&cfg(), 100, 2_000_000_000, 1.0, 0), None);
        assert!(
            validity(&cfg(), 10, 2_000_000_000, 1.0, 0)
                .unwrap()
                .contains("min_queries")
        );
        assert!(
            validity(&cfg(), 100, 500_000_000, 1.0, 0)
                .unwrap()
                .contains("min_duration")
        );
        let mut server = cfg();
        server.scenario = Scenario::Server as i32;
        server.target_qps = 100.0;
        server.latency_bound_ms = 2.0;
        assert!(
            validity(&server, 100, 2_000_000_000, 3.0, 0)
                .unwrap()
                .contains("latency bound")
        );
        assert!(
            validity(&server, 100, 2_000_000_000, 1.0, 4)
                .unwrap()
                .contains("dropped")
        );
        assert_eq!(validity(&server, 100, 2_000_000_000, 1.0, 0), None);
    }
}
