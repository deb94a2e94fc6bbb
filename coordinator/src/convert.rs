//! Protobuf <-> domain conversions of the coordinator, in one place. Wire to domain is `TryFrom` and
//! rejects a missing message or an unknown enum value by the field's name; domain to wire never fails.
//! The store also decodes rows that older versions wrote as protobuf through these conversions.

use fleetbench_common::config::ConfigError;
use fleetbench_common::convert::required;
use fleetbench_proto::v1 as pb;

use crate::domain::GenerationSummary;
use crate::domain::{
    AgentInfo, AgentSpan, JobDetail, JobSummary, RankQuery, RankRow, Ranking, Registered,
    Registration, ResourceSample, ResourceSummary, RunConfig, RunReport, RunResult, RunSummary,
    TaskInfo, Variant, VariantRegistration, Window, WindowGeneration,
};

impl From<&Variant> for pb::ModelVariant {
    fn from(v: &Variant) -> Self {
        pb::ModelVariant {
            model: v.model.clone(),
            variant: v.variant.clone(),
            artifact_sha256: v.artifact_sha256.clone(),
            size_bytes: v.size_bytes,
            variant_of: v.variant_of.clone(),
            technique: v.technique.clone(),
            recipe_json: v.recipe_json.clone(),
            eval_inputs_sha256: v.eval_inputs_sha256.clone(),
            eval_labels_sha256: v.eval_labels_sha256.clone(),
            inputs: v.inputs.iter().map(Into::into).collect(),
            outputs: v.outputs.iter().map(Into::into).collect(),
            created_at_ms: v.created_at_ms,
            node_count: v.node_count,
            opset: v.opset,
            ir_version: v.ir_version,
            file_count: v.file_count.max(1),
            max_positions: v.max_positions,
        }
    }
}

impl From<pb::ModelVariant> for Variant {
    fn from(v: pb::ModelVariant) -> Self {
        Variant {
            model: v.model,
            variant: v.variant,
            artifact_sha256: v.artifact_sha256,
            size_bytes: v.size_bytes,
            variant_of: v.variant_of,
            technique: v.technique,
            recipe_json: v.recipe_json,
            eval_inputs_sha256: v.eval_inputs_sha256,
            eval_labels_sha256: v.eval_labels_sha256,
            inputs: v.inputs.into_iter().map(Into::into).collect(),
            outputs: v.outputs.into_iter().map(Into::into).collect(),
            created_at_ms: v.created_at_ms,
            node_count: v.node_count,
            opset: v.opset,
            ir_version: v.ir_version,
            file_count: v.file_count,
            max_positions: v.max_positions,
        }
    }
}

impl From<pb::RegisterVariantRequest> for VariantRegistration {
    fn from(r: pb::RegisterVariantRequest) -> Self {
        VariantRegistration {
            model: r.model,
            variant: r.variant,
            artifact_sha256: r.artifact_sha256,
            variant_of: r.variant_of,
            technique: r.technique,
            recipe_json: r.recipe_json,
            eval_inputs_sha256: r.eval_inputs_sha256,
            eval_labels_sha256: r.eval_labels_sha256,
        }
    }
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = ConfigError;

    fn try_from(r: pb::RegisterRequest) -> Result<Self, ConfigError> {
        Ok(Registration {
            agent_id: (!r.agent_id.is_empty()).then_some(r.agent_id),
            name: r.name,
            labels: r.labels.into_iter().collect(),
            inventory: required("inventory", r.inventory)?.into(),
            protocol_version: r.protocol_version,
        })
    }
}

impl From<&Registered> for pb::RegisterResponse {
    fn from(r: &Registered) -> Self {
        pb::RegisterResponse {
            agent_id: r.agent_id.clone(),
            platform_id: r.platform_id.clone(),
            platform_name: r.platform_name.clone(),
            heartbeat_interval_ms: r.heartbeat_interval_ms,
            protocol_version: r.protocol_version,
            agent_credential: r.agent_credential.expose().to_string(),
        }
    }
}

impl From<&JobSummary> for pb::JobSummary {
    fn from(j: &JobSummary) -> Self {
        pb::JobSummary {
            job_id: j.job_id.clone(),
            model: j.model.clone(),
            state: j.state.clone(),
            tasks_total: j.tasks_total,
            tasks_pending: j.tasks_pending,
            tasks_running: j.tasks_running,
            tasks_succeeded: j.tasks_succeeded,
            tasks_failed: j.tasks_failed,
            tasks_cancelled: j.tasks_cancelled,
            created_at_ms: j.created_at_ms,
            finished_at_ms: j.finished_at_ms,
            name: j.name.clone(),
            trace_id: crate::otel::traces::trace_id_of(&j.job_id)
                .map(|t| t.to_string())
                .unwrap_or_default(),
        }
    }
}

impl From<&ResourceSummary> for pb::ResourceSummary {
    fn from(r: &ResourceSummary) -> Self {
        pb::ResourceSummary {
            cpu_user_pct: r.cpu_user_pct,
            cpu_system_pct: r.cpu_system_pct,
            rss_mean_bytes: r.rss_mean_bytes,
            rss_peak_bytes: r.rss_peak_bytes,
            system_memory_used_bytes: r.system_memory_used_bytes,
            load_average_1m: r.load_average_1m,
            cpu_frequency_mhz: r.cpu_frequency_mhz,
            cpu_steal_pct: r.cpu_steal_pct,
            gpu_utilization_pct: r.gpu_utilization_pct,
            gpu_memory_peak_bytes: r.gpu_memory_peak_bytes,
            flags: r.flags.clone(),
        }
    }
}

impl From<pb::ResourceSummary> for ResourceSummary {
    fn from(r: pb::ResourceSummary) -> Self {
        ResourceSummary {
            cpu_user_pct: r.cpu_user_pct,
            cpu_system_pct: r.cpu_system_pct,
            rss_mean_bytes: r.rss_mean_bytes,
            rss_peak_bytes: r.rss_peak_bytes,
            system_memory_used_bytes: r.system_memory_used_bytes,
            load_average_1m: r.load_average_1m,
            cpu_frequency_mhz: r.cpu_frequency_mhz,
            cpu_steal_pct: r.cpu_steal_pct,
            gpu_utilization_pct: r.gpu_utilization_pct,
            gpu_memory_peak_bytes: r.gpu_memory_peak_bytes,
            flags: r.flags,
        }
    }
}

impl From<&RunSummary> for pb::RunSummary {
    fn from(s: &RunSummary) -> Self {
        pb::RunSummary {
            run_id: s.run_id.clone(),
            agent: s.agent.clone(),
            platform_id: s.platform_id.clone(),
            variant: s.variant.clone(),
            config: Some((&s.config).into()),
            valid: s.valid,
            invalid_reason: s.invalid_reason.clone(),
            latency: Some((&s.latency).into()),
            throughput_per_s: s.throughput_per_s,
            queries: s.queries,
            samples: s.samples,
            accuracy: s.accuracy,
            session_create_ms: s.session_create_ms,
            first_inference_ms: s.first_inference_ms,
            resources: Some((&s.resources).into()),
            record_json: s.record_json.clone(),
            stable: s.stable,
            duration_ms: s.duration_ms,
            late_queries: s.late_queries,
            dropped_queries: s.dropped_queries,
            scenario_json: s.scenario_json.clone(),
            started_at_ms: s.started_at_ms,
            finished_at_ms: s.finished_at_ms,
            windows: s.windows,
            cost_per_hour: s.cost_per_hour,
            quality_json: s.quality_json.clone(),
            generation: s.generation.as_ref().map(Into::into),
            throughput_ci_per_s: s.throughput_ci_per_s.map(interval),
        }
    }
}

impl From<&GenerationSummary> for pb::GenerationStats {
    fn from(g: &GenerationSummary) -> Self {
        pb::GenerationStats {
            ttft: Some((&g.ttft).into()),
            tpot: Some((&g.tpot).into()),
            itl: Some((&g.itl).into()),
            requests: g.requests,
            prompt_tokens: g.prompt_tokens,
            output_tokens: g.output_tokens,
            output_tokens_per_s: g.output_tokens_per_s,
            prompt_tokens_per_s: g.prompt_tokens_per_s,
            requests_per_s: g.requests_per_s,
            goodput_per_s: g.goodput_per_s,
            good_requests: g.good_requests,
            kv_bytes_per_token: g.kv_bytes_per_token,
            cost_per_million_tokens: g.cost_per_million_tokens,
            output_tokens_ci_per_s: g.output_tokens_ci_per_s.map(interval),
            goodput_ci_per_s: g.goodput_ci_per_s.map(interval),
        }
    }
}

/// The wire form carries no histograms: they stay in the coordinator.
impl From<pb::GenerationStats> for GenerationSummary {
    fn from(g: pb::GenerationStats) -> Self {
        GenerationSummary {
            ttft: g.ttft.map(Into::into).unwrap_or_default(),
            tpot: g.tpot.map(Into::into).unwrap_or_default(),
            itl: g.itl.map(Into::into).unwrap_or_default(),
            requests: g.requests,
            prompt_tokens: g.prompt_tokens,
            output_tokens: g.output_tokens,
            output_tokens_per_s: g.output_tokens_per_s,
            prompt_tokens_per_s: g.prompt_tokens_per_s,
            requests_per_s: g.requests_per_s,
            goodput_per_s: g.goodput_per_s,
            good_requests: g.good_requests,
            kv_bytes_per_token: g.kv_bytes_per_token,
            cost_per_million_tokens: g.cost_per_million_tokens,
            output_tokens_ci_per_s: g.output_tokens_ci_per_s.map(|i| (i.low, i.high)),
            goodput_ci_per_s: g.goodput_ci_per_s.map(|i| (i.low, i.high)),
            histograms: Default::default(),
        }
    }
}

impl TryFrom<pb::RunSummary> for RunSummary {
    type Error = ConfigError;

    fn try_from(s: pb::RunSummary) -> Result<Self, ConfigError> {
        Ok(RunSummary {
            run_id: s.run_id,
            agent: s.agent,
            platform_id: s.platform_id,
            variant: s.variant,
            config: required("config", s.config)?
                .try_into()
                .map_err(|e: ConfigError| e.within("config"))?,
            valid: s.valid,
            invalid_reason: s.invalid_reason,
            latency: required("latency", s.latency)?.into(),
            throughput_per_s: s.throughput_per_s,
            queries: s.queries,
            samples: s.samples,
            accuracy: s.accuracy,
            session_create_ms: s.session_create_ms,
            first_inference_ms: s.first_inference_ms,
            resources: required("resources", s.resources)?.into(),
            record_json: s.record_json,
            stable: s.stable,
            duration_ms: s.duration_ms,
            late_queries: s.late_queries,
            dropped_queries: s.dropped_queries,
            scenario_json: s.scenario_json,
            started_at_ms: s.started_at_ms,
            finished_at_ms: s.finished_at_ms,
            windows: s.windows,
            cost_per_hour: s.cost_per_hour,
            quality_json: s.quality_json,
            generation: s.generation.map(Into::into),
            throughput_ci_per_s: s.throughput_ci_per_s.map(|i| (i.low, i.high)),
        })
    }
}

impl From<&TaskInfo> for pb::TaskInfo {
    fn from(t: &TaskInfo) -> Self {
        pb::TaskInfo {
            task_id: t.task_id.clone(),
            variant: t.variant.clone(),
            target_agent: t.target_agent.clone(),
            agent: t.agent.clone(),
            platform_id: t.platform_id.clone(),
            platform_name: t.platform_name.clone(),
            state: t.state.clone(),
            attempt: t.attempt,
            error: t.error.clone(),
            config: Some((&t.config).into()),
            progress_queries: t.progress_queries,
            target_queries: t.target_queries,
            run: t.run.as_ref().map(Into::into),
        }
    }
}

impl From<&JobDetail> for pb::JobDetail {
    fn from(d: &JobDetail) -> Self {
        pb::JobDetail {
            summary: Some((&d.summary).into()),
            spec: Some((&d.spec).into()),
            tasks: d.tasks.iter().map(Into::into).collect(),
        }
    }
}

impl From<&JobDetail> for pb::JobProgress {
    fn from(d: &JobDetail) -> Self {
        pb::JobProgress {
            summary: Some((&d.summary).into()),
            tasks: d.tasks.iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::ResourceSample> for ResourceSample {
    fn from(r: pb::ResourceSample) -> Self {
        ResourceSample {
            process_cpu_user_pct: r.process_cpu_user_pct,
            process_cpu_system_pct: r.process_cpu_system_pct,
            rss_mean_bytes: r.rss_mean_bytes,
            rss_peak_bytes: r.rss_peak_bytes,
            system_memory_used_bytes: r.system_memory_used_bytes,
            load_average_1m: r.load_average_1m,
            cpu_frequency_mhz: r.cpu_frequency_mhz,
            cpu_steal_pct: r.cpu_steal_pct,
            gpu_utilization_pct: r.gpu_utilization_pct,
            gpu_memory_used_bytes: r.gpu_memory_used_bytes,
            samples: r.samples,
        }
    }
}

impl From<pb::TelemetryWindow> for Window {
    fn from(w: pb::TelemetryWindow) -> Self {
        Window {
            run_id: w.run_id,
            seq: w.seq,
            start_offset_ns: w.start_offset_ns,
            end_offset_ns: w.end_offset_ns,
            queries: w.queries,
            samples: w.samples,
            latency_histogram: w.latency_histogram,
            resources: w.resources.map(Into::into),
            late_queries: w.late_queries,
            dropped_queries: w.dropped_queries,
            issue_delay_histogram: w.issue_delay_histogram,
            closed_at_ms: w.closed_at_ms,
            generation: w.generation.map(|g| WindowGeneration {
                ttft_histogram: g.ttft_histogram,
                tpot_histogram: g.tpot_histogram,
                itl_histogram: g.itl_histogram,
                prompt_tokens: g.prompt_tokens,
                output_tokens: g.output_tokens,
                good_requests: g.good_requests,
            }),
        }
    }
}

impl TryFrom<pb::RunReport> for RunReport {
    type Error = ConfigError;

    fn try_from(r: pb::RunReport) -> Result<Self, ConfigError> {
        Ok(RunReport {
            queries: r.queries,
            samples: r.samples,
            elapsed_ns: r.elapsed_ns,
            session_create_ns: r.session_create_ns,
            first_inference_ns: r.first_inference_ns,
            accuracy: r.accuracy,
            eval_samples: r.eval_samples,
            record_json: r.record_json,
            effective_config: r
                .effective_config
                .map(RunConfig::try_from)
                .transpose()
                .map_err(|e: ConfigError| e.within("effective_config"))?,
            late_queries: r.late_queries,
            dropped_queries: r.dropped_queries,
            scenario_json: r.scenario_json,
            quality_json: r.quality_json,
        })
    }
}

impl TryFrom<pb::RunResult> for RunResult {
    type Error = ConfigError;

    fn try_from(r: pb::RunResult) -> Result<Self, ConfigError> {
        Ok(RunResult {
            run_id: r.run_id,
            window_count: r.window_count,
            report: r
                .report
                .map(RunReport::try_from)
                .transpose()
                .map_err(|e: ConfigError| e.within("report"))?,
            error: r.error,
            cancelled: r.cancelled,
            agent_stopping: r.agent_stopping,
            spans: r
                .spans
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let id = |field: &str, v: &str| {
                        u64::from_str_radix(v, 16)
                            .ok()
                            .filter(|&n| n != 0 && v.len() == 16)
                            .ok_or_else(|| {
                                ConfigError::new(
                                    &format!("spans[{i}].{field}"),
                                    format!("'{v}' is not 16 hex digits (and not zero)"),
                                )
                            })
                    };
                    Ok(AgentSpan {
                        span_id: id("span_id", &s.span_id)?,
                        parent_span_id: id("parent_span_id", &s.parent_span_id)?,
                        name: s.name,
                        start_unix_ns: s.start_unix_ns,
                        end_unix_ns: s.end_unix_ns,
                        attributes: s.attributes.into_iter().collect(),
                        error: s.error,
                    })
                })
                .collect::<Result<_, ConfigError>>()?,
        })
    }
}

impl From<&AgentInfo> for pb::AgentInfo {
    fn from(a: &AgentInfo) -> Self {
        pb::AgentInfo {
            agent_id: a.agent_id.clone(),
            name: a.name.clone(),
            labels: a
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            inventory: Some((&a.inventory).into()),
            platform_id: a.platform_id.clone(),
            platform_name: a.platform_name.clone(),
            online: a.online,
            current_task_id: a.current_task_id.clone(),
            last_seen_ms: a.last_seen_ms,
            network: a.network.iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::RankRequest> for RankQuery {
    fn from(r: pb::RankRequest) -> Self {
        RankQuery {
            model: r.model,
            objective: r.objective,
            max_p99_ms: r.max_p99_ms,
            min_throughput: r.min_throughput,
            max_accuracy_drop: r.max_accuracy_drop,
            min_accuracy: r.min_accuracy,
            max_rss_bytes: r.max_rss_bytes,
            include_invalid: r.include_invalid,
            best_config_only: r.best_config_only,
            job_id: r.job_id,
            history: r.history,
            client: r.client,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
        }
    }
}

fn interval((low, high): (f64, f64)) -> pb::Interval {
    pb::Interval { low, high }
}

impl From<&RankRow> for pb::RankRow {
    fn from(r: &RankRow) -> Self {
        pb::RankRow {
            rank: r.rank,
            platform_id: r.platform_id.clone(),
            platform: r.platform.clone(),
            variant: r.variant.clone(),
            config: r.config.clone(),
            latency: Some((&r.latency).into()),
            throughput_per_s: r.throughput_per_s,
            accuracy: r.accuracy,
            accuracy_delta_pts: r.accuracy_delta_pts,
            cost_per_million: r.cost_per_million,
            runs: r.runs,
            run_ids: r.run_ids.clone(),
            rss_peak_bytes: r.rss_peak_bytes,
            size_bytes: r.size_bytes,
            run_config: Some((&r.run_config).into()),
            record_key: r.record_key.clone(),
            agreement: r.agreement,
            fidelity_cosine: r.fidelity_cosine,
            legacy: r.legacy,
            pool_key: r.pool_key.clone(),
            generation: r.generation.as_ref().map(Into::into),
            tied: r.tied,
            throughput_ci_per_s: r.throughput_ci.map(interval),
            cost_ci: r.cost_ci.map(interval),
            accuracy_ci: r.accuracy_ci.map(interval),
            spread: r.spread.map(|s| pb::RunSpread {
                p50_cv: s.p50_cv,
                p99_cv: s.p99_cv,
                throughput_cv: s.throughput_cv,
            }),
            hosts: r.hosts.map(|h| pb::HostSpread {
                agents: h.agents,
                p50_cv: h.p50_cv,
                throughput_cv: h.throughput_cv,
            }),
            noisy_hosts: r
                .noisy_hosts
                .iter()
                .map(|n| pb::NoisyHost {
                    agent: n.agent.clone(),
                    p50_ratio: n.p50_ratio,
                    throughput_ratio: n.throughput_ratio,
                    reason: n.reason.clone(),
                })
                .collect(),
            history: r
                .history
                .iter()
                .map(|h| pb::HistoryPoint {
                    run_id: h.run_id.clone(),
                    started_at_ms: h.started_at_ms,
                    agent: h.agent.clone(),
                    p50_ms: h.p50_ms,
                    p99_ms: h.p99_ms,
                    throughput_per_s: h.throughput_per_s,
                    change_point: h.change_point,
                })
                .collect(),
            network: r.network.as_ref().map(|n| {
                let l = &r.latency;
                pb::NetworkTime {
                    client: n.client.clone(),
                    network_ms: n.network_ms,
                    rtt_ms: n.rtt_ms,
                    down_bytes_per_s: n.down_bytes_per_s,
                    up_bytes_per_s: n.up_bytes_per_s,
                    agents: n.agents,
                    e2e_p50_ms: l.p50_ms + n.network_ms,
                    e2e_p99_ms: l.p99_ms + n.network_ms,
                    e2e_p50_ci_low_ms: l.p50_ci_low_ms + n.network_ms,
                    e2e_p50_ci_high_ms: l.p50_ci_high_ms + n.network_ms,
                    e2e_p99_ci_low_ms: l.p99_ci_low_ms + n.network_ms,
                    e2e_p99_ci_high_ms: l.p99_ci_high_ms + n.network_ms,
                }
            }),
        }
    }
}

impl From<&Ranking> for pb::RankResponse {
    fn from(r: &Ranking) -> Self {
        pb::RankResponse {
            rows: r.rows.iter().map(Into::into).collect(),
            objective: r.objective.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_are_named() {
        let err = Registration::try_from(pb::RegisterRequest::default()).unwrap_err();
        assert_eq!(err.field, "inventory");
        let err = RunSummary::try_from(pb::RunSummary::default()).unwrap_err();
        assert_eq!(err.field, "config");
        let bad = pb::RunResult {
            report: Some(pb::RunReport {
                effective_config: Some(pb::RunConfig {
                    scenario: 77,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = RunResult::try_from(bad).unwrap_err();
        assert_eq!(err.field, "report.effective_config.scenario");
    }

    #[test]
    fn summaries_round_trip() {
        let s = RunSummary {
            run_id: "r".into(),
            accuracy: Some(0.5),
            cost_per_hour: None,
            ..Default::default()
        };
        assert_eq!(RunSummary::try_from(pb::RunSummary::from(&s)).unwrap(), s);
    }
}
