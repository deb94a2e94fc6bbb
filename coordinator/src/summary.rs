//! Run summaries: a finished run's windows are merged into one histogram, read into percentiles, and
//! judged VALID or INVALID by the run's own rules (minimum duration and queries, maximum duration,
//! latency bound), with stability over the last windows.

use fleetbench_common::config::{config_label, with_defaults};
use fleetbench_common::hist::{self, is_stable};
use fleetbench_common::intervals;
use fleetbench_common::labels::cost_per_hour;

#[cfg(test)]
use crate::domain::RunReport;
use crate::domain::{
    ResourceSample, ResourceSummary, RunConfig, RunResult, RunSummary, Scenario, Window,
};
use crate::error::Result;
use crate::generation::{TokenTotals, slo_misses};
use crate::pooling::PoolKey;
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
        pool_key: PoolKey::of(
            &config,
            result
                .report
                .as_ref()
                .map(|r| r.record_json.as_str())
                .unwrap_or_default(),
        )
        .encode(),
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
    let mut window_sizes = Vec::with_capacity(ctx.windows.len());
    let whole_window_ns = u64::from(config.window_ms) * 1_000_000;
    for w in &ctx.windows {
        let h = hist::decode(&w.latency_histogram)?;
        hist::merge(&mut merged, &h)?;
        let ns = w.end_offset_ns.saturating_sub(w.start_offset_ns);
        window_sizes.push((w.samples, ns as f64 / 1e9));
        // Stability is judged on whole windows, as the agent's early stop judges it: the short
        // window a run ends with counts in every figure but this one.
        if ns > 0 && ns >= whole_window_ns && w.samples > 0 {
            window_throughput.push(w.samples as f64 / (ns as f64 / 1e9));
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
    let generation = if config.scenario == Scenario::Generate {
        let mut totals = TokenTotals::default();
        for w in &ctx.windows {
            if let Some(g) = &w.generation {
                totals.add(g)?;
            }
        }
        let scenario: serde_json::Value =
            serde_json::from_str(&report.scenario_json).unwrap_or_default();
        let mut g = totals.summary(
            report.queries,
            elapsed_s,
            scenario["kv_bytes_per_token"].as_u64().unwrap_or(0),
            cost_per_hour(&ctx.agent_labels),
        );
        // Token and good-request rates get the throughput's interval: a block bootstrap over windows.
        let per_window = |f: fn(&crate::domain::WindowGeneration) -> u64| {
            intervals::bootstrap_throughput(
                &ctx.windows
                    .iter()
                    .map(|w| {
                        let ns = w.end_offset_ns.saturating_sub(w.start_offset_ns);
                        (w.generation.as_ref().map_or(0, f), ns as f64 / 1e9)
                    })
                    .collect::<Vec<_>>(),
            )
        };
        g.output_tokens_ci_per_s = per_window(|g| g.output_tokens);
        g.goodput_ci_per_s = per_window(|g| g.good_requests);
        Some(g)
    } else {
        None
    };
    let mut invalid_reason = validity(
        &config,
        report.queries,
        report.elapsed_ns,
        stats.p99 / 1e6,
        report.dropped_queries,
    );
    if let (Some(g), Some(s)) = (&config.generate, &generation) {
        let misses = slo_misses(g, s, stats.p99 / 1e6);
        if !misses.is_empty() {
            let mut reasons: Vec<String> = invalid_reason.into_iter().collect();
            reasons.extend(misses);
            invalid_reason = Some(reasons.join("; "));
        }
    }
    let summary = RunSummary {
        run_id: result.run_id.clone(),
        agent: ctx.agent_name.clone(),
        platform_id: ctx.platform_id.clone(),
        variant: ctx.variant.clone(),
        config: config.clone(),
        valid: invalid_reason.is_none(),
        invalid_reason: invalid_reason.unwrap_or_default(),
        latency: stats.to_ms(),
        throughput_per_s: throughput,
        throughput_ci_per_s: intervals::bootstrap_throughput(&window_sizes),
        queries: report.queries,
        samples: report.samples,
        accuracy: report.accuracy,
        session_create_ms: report.session_create_ns as f64 / 1e6,
        first_inference_ms: report.first_inference_ns as f64 / 1e6,
        resources: resource_summary(&ctx.windows),
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
        generation,
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
    if !reasons.is_empty() && c.max_duration_ms > 0 && elapsed_ms >= c.max_duration_ms {
        reasons.push(format!(
            "stopped at max_duration {} ms before its minimums held",
            c.max_duration_ms
        ));
    }
    // A max-qps run's timed phase is its final server run, judged as a server run is; an open-loop
    // generate run drops requests as a server run drops queries.
    let open_loop =
        c.scenario == Scenario::Generate && c.generate.as_ref().is_some_and(|g| g.open_loop());
    if open_loop && dropped > 0 {
        reasons.push(format!("{dropped} requests dropped (too many outstanding)"));
    }
    let loaded = matches!(c.scenario, Scenario::Server | Scenario::MaxQps);
    if loaded && c.latency_bound_ms > 0.0 && p99_ms > c.latency_bound_ms {
        reasons.push(format!(
            "p99 {p99_ms:.3} ms > latency bound {} ms",
            c.latency_bound_ms
        ));
    }
    if loaded && dropped > 0 {
        reasons.push(format!("{dropped} queries dropped (too many outstanding)"));
    }
    if reasons.is_empty() {
        None
    } else {
        Some(reasons.join("; "))
    }
}

/// Folds per-window resource samples into a run summary.
/// Means over windows are weighted by each window's length: a window closes after its time or its
/// query count, whichever comes later, so windows differ in length and an unweighted mean would let a
/// short window count as much as a long one.
pub fn resource_summary(windows: &[Window]) -> ResourceSummary {
    let sampled: Vec<(&ResourceSample, f64)> = windows
        .iter()
        .filter_map(|w| {
            let r = w.resources.as_ref().filter(|r| r.samples > 0)?;
            Some((r, w.end_offset_ns.saturating_sub(w.start_offset_ns) as f64))
        })
        .collect();
    let equal = sampled.iter().all(|(_, len)| *len <= 0.0);
    let weighted: Vec<(&ResourceSample, f64)> = sampled
        .iter()
        .map(|(r, len)| (*r, if equal { 1.0 } else { len.max(0.0) }))
        .collect();
    let samples: Vec<&ResourceSample> = weighted.iter().map(|(r, _)| *r).collect();
    if samples.is_empty() {
        return ResourceSummary {
            cpu_steal_pct: -1.0,
            gpu_utilization_pct: -1.0,
            ..Default::default()
        };
    }
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    let mean = |f: &dyn Fn(&&ResourceSample) -> f64| {
        weighted.iter().map(|(r, w)| f(r) * w).sum::<f64>() / total
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
    fn resource_means_are_weighted_by_window_length() {
        let window = |start_s: u64, end_s: u64, cpu: f64| Window {
            start_offset_ns: start_s * 1_000_000_000,
            end_offset_ns: end_s * 1_000_000_000,
            resources: Some(ResourceSample {
                process_cpu_user_pct: cpu,
                samples: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        // 9 s at 100 % and 1 s at 0 %: 90 %, not the 50 % of an unweighted mean.
        let r = resource_summary(&[window(0, 9, 100.0), window(9, 10, 0.0)]);
        assert!((r.cpu_user_pct - 90.0).abs() < 1e-9, "{r:?}");
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
        server.scenario = Scenario::Server;
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
        let mut max_qps = cfg();
        max_qps.scenario = Scenario::MaxQps;
        max_qps.latency_bound_ms = 2.0;
        assert!(
            validity(&max_qps, 100, 2_000_000_000, 3.0, 0)
                .unwrap()
                .contains("latency bound"),
            "a max-qps run's final server run is judged against its bound"
        );
        assert!(
            validity(&max_qps, 100, 2_000_000_000, 1.0, 2)
                .unwrap()
                .contains("dropped")
        );
        let mut capped = cfg();
        capped.iterations = 0;
        capped.min_duration_ms = 10_000;
        capped.max_duration_ms = 5_000;
        let why = validity(&capped, 100, 5_100_000_000, 1.0, 0).unwrap();
        assert!(
            why.contains("min_duration") && why.contains("stopped at max_duration 5000 ms"),
            "{why}"
        );
    }

    /// A run of agent `a` on platform `p` with `windows` stored.
    fn running(config: &RunConfig, windows: Vec<Window>) -> RunContext {
        RunContext {
            state: "running".into(),
            task_id: "t".into(),
            job_id: "j".into(),
            agent_id: "a".into(),
            agent_name: "a".into(),
            agent_labels: Default::default(),
            platform_id: "p".into(),
            variant: "fp32".into(),
            config: config.clone(),
            windows,
            started_at: 0,
        }
    }

    #[test]
    fn stability_is_judged_on_whole_windows_not_the_short_one_a_run_ends_with() {
        let config = with_defaults(RunConfig {
            scenario: Scenario::SingleStream,
            window_ms: 200,
            min_queries: 10,
            min_duration_ms: 500,
            stability_windows: 3,
            stability_ratio: 1.1,
            ..Default::default()
        });
        let window = |seq: u64, start_ms: u64, end_ms: u64, queries: u64, latency_ns: u64| {
            let mut h = hist::new_histogram();
            for _ in 0..queries {
                hist::record_ns(&mut h, latency_ns);
            }
            Window {
                seq,
                start_offset_ns: start_ms * 1_000_000,
                end_offset_ns: end_ms * 1_000_000,
                queries,
                samples: queries,
                latency_histogram: hist::encode(&h),
                ..Default::default()
            }
        };
        // Three whole, alike windows, then 3 ms with two slow queries: a run stopped at its
        // planned duration in mid-window.
        let windows = vec![
            window(0, 0, 200, 1000, 200_000),
            window(1, 200, 400, 1000, 200_000),
            window(2, 400, 600, 1000, 200_000),
            window(3, 600, 603, 2, 1_500_000),
        ];
        let ctx = running(&config, windows);
        let result = RunResult {
            run_id: "r".into(),
            window_count: 4,
            report: Some(RunReport {
                queries: 3002,
                samples: 3002,
                elapsed_ns: 603_000_000,
                effective_config: Some(config),
                ..Default::default()
            }),
            ..Default::default()
        };
        let run = finish_run(&ctx, &result).unwrap();
        let summary = run.summary.expect("a summary");
        assert_eq!(summary.queries, 3002, "the short window still counts");
        assert!(summary.stable, "{summary:?}");
    }

    #[test]
    fn a_generate_runs_token_rates_get_bootstrap_intervals_over_its_windows() {
        let config = with_defaults(RunConfig {
            scenario: Scenario::Generate,
            window_ms: 1000,
            generate: Some(Default::default()),
            ..Default::default()
        });
        // Ten one-second windows of 90 to 110 output tokens, 9 to 11 good requests.
        let windows: Vec<Window> = (0..10u64)
            .map(|i| {
                let tokens = 90 + (i * 7) % 21;
                let mut h = hist::new_histogram();
                hist::record_ns(&mut h, 1_000_000);
                Window {
                    seq: i,
                    start_offset_ns: i * 1_000_000_000,
                    end_offset_ns: (i + 1) * 1_000_000_000,
                    queries: 10,
                    samples: 10,
                    latency_histogram: hist::encode(&h),
                    generation: Some(crate::domain::WindowGeneration {
                        output_tokens: tokens,
                        good_requests: tokens / 10,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect();
        let ctx = running(&config, windows);
        let result = RunResult {
            run_id: "r".into(),
            window_count: 10,
            report: Some(RunReport {
                queries: 100,
                samples: 100,
                elapsed_ns: 10_000_000_000,
                effective_config: Some(config),
                ..Default::default()
            }),
            ..Default::default()
        };
        let summary = finish_run(&ctx, &result).unwrap().summary.unwrap();
        let g = summary.generation.expect("token figures");
        let (lo, hi) = g.output_tokens_ci_per_s.expect("a tokens/s interval");
        assert!(
            lo < g.output_tokens_per_s && g.output_tokens_per_s < hi,
            "{lo} {hi} {g:?}"
        );
        assert!(
            lo > 90.0 && hi < 110.0,
            "within the windows' range: {lo} {hi}"
        );
        let (lo, hi) = g.goodput_ci_per_s.expect("a goodput interval");
        assert!(
            lo <= g.goodput_per_s && g.goodput_per_s <= hi,
            "{lo} {hi} {g:?}"
        );
    }
}
