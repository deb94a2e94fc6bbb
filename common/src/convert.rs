//! Protobuf <-> domain conversions of the shared domain model. Domain to wire never fails; wire to
//! domain rejects what the domain cannot hold (an unknown enum value, a missing message) with an error
//! that names the field.

use crate::config::ConfigError;
use crate::domain::{
    Accelerator, GenerateConfig, GraphOptimization, InputShape, Inventory, JobSpec, LatencyStats,
    RunConfig, Scenario, Sweep, TensorInfo, TokenLengths,
};
use crate::proto::v1 as pb;

/// A message that must be present, or an error naming its field.
pub fn required<T>(field: &str, v: Option<T>) -> Result<T, ConfigError> {
    v.ok_or_else(|| ConfigError::new(field, "missing"))
}

impl From<Scenario> for pb::Scenario {
    fn from(s: Scenario) -> Self {
        match s {
            Scenario::SingleStream => pb::Scenario::SingleStream,
            Scenario::Offline => pb::Scenario::Offline,
            Scenario::Server => pb::Scenario::Server,
            Scenario::MaxQps => pb::Scenario::MaxQps,
            Scenario::Generate => pb::Scenario::Generate,
        }
    }
}

/// The scenario of a wire value (unspecified reads as single-stream).
pub fn scenario_from_wire(field: &str, v: i32) -> Result<Scenario, ConfigError> {
    match pb::Scenario::try_from(v) {
        Ok(pb::Scenario::Unspecified | pb::Scenario::SingleStream) => Ok(Scenario::SingleStream),
        Ok(pb::Scenario::Offline) => Ok(Scenario::Offline),
        Ok(pb::Scenario::Server) => Ok(Scenario::Server),
        Ok(pb::Scenario::MaxQps) => Ok(Scenario::MaxQps),
        Ok(pb::Scenario::Generate) => Ok(Scenario::Generate),
        Err(_) => Err(ConfigError::new(
            field,
            format!("unknown scenario value {v} (a newer fleetbench's; upgrade this one)"),
        )),
    }
}

impl From<GraphOptimization> for pb::GraphOptimization {
    fn from(g: GraphOptimization) -> Self {
        match g {
            GraphOptimization::Disabled => pb::GraphOptimization::Disabled,
            GraphOptimization::Basic => pb::GraphOptimization::Basic,
            GraphOptimization::Extended => pb::GraphOptimization::Extended,
            GraphOptimization::All => pb::GraphOptimization::All,
        }
    }
}

/// The graph optimization level of a wire value (unspecified reads as all).
pub fn graph_optimization_from_wire(field: &str, v: i32) -> Result<GraphOptimization, ConfigError> {
    match pb::GraphOptimization::try_from(v) {
        Ok(pb::GraphOptimization::Unspecified | pb::GraphOptimization::All) => {
            Ok(GraphOptimization::All)
        }
        Ok(pb::GraphOptimization::Disabled) => Ok(GraphOptimization::Disabled),
        Ok(pb::GraphOptimization::Basic) => Ok(GraphOptimization::Basic),
        Ok(pb::GraphOptimization::Extended) => Ok(GraphOptimization::Extended),
        Err(_) => Err(ConfigError::new(field, format!("unknown level value {v}"))),
    }
}

impl From<&InputShape> for pb::InputShape {
    fn from(s: &InputShape) -> Self {
        pb::InputShape {
            name: s.name.clone(),
            dims: s.dims.clone(),
        }
    }
}

impl From<pb::InputShape> for InputShape {
    fn from(s: pb::InputShape) -> Self {
        InputShape {
            name: s.name,
            dims: s.dims,
        }
    }
}

impl From<&RunConfig> for pb::RunConfig {
    fn from(c: &RunConfig) -> Self {
        pb::RunConfig {
            batch_size: c.batch_size,
            intra_op_threads: c.intra_op_threads,
            graph_optimization: pb::GraphOptimization::from(c.graph_optimization) as i32,
            execution_provider: c.execution_provider.clone(),
            iterations: c.iterations,
            duration_ms: c.duration_ms,
            warmup_iterations: c.warmup_iterations,
            seed: c.seed,
            shapes: c.shapes.iter().map(Into::into).collect(),
            input_data_sha256: c.input_data_sha256.clone(),
            window_ms: c.window_ms,
            window_min_queries: c.window_min_queries,
            scenario: pb::Scenario::from(c.scenario) as i32,
            concurrency: c.concurrency,
            target_qps: c.target_qps,
            latency_bound_ms: c.latency_bound_ms,
            min_duration_ms: c.min_duration_ms,
            min_queries: c.min_queries,
            max_duration_ms: c.max_duration_ms,
            early_stop: c.early_stop,
            stability_ratio: c.stability_ratio,
            stability_windows: c.stability_windows,
            max_outstanding: c.max_outstanding,
            skip_accuracy: c.skip_accuracy,
            sample_ms: c.sample_ms,
            generate: c.generate.as_ref().map(Into::into),
        }
    }
}

impl From<&TokenLengths> for pb::TokenLengths {
    fn from(t: &TokenLengths) -> Self {
        pb::TokenLengths {
            min: t.min,
            max: t.max,
        }
    }
}

impl From<&GenerateConfig> for pb::GenerateConfig {
    fn from(g: &GenerateConfig) -> Self {
        pb::GenerateConfig {
            prompt_tokens: Some((&g.prompt_tokens).into()),
            output_tokens: Some((&g.output_tokens).into()),
            request_rate: g.request_rate,
            temperature: g.temperature,
            top_k: g.top_k,
            slo_ttft_ms: g.slo_ttft_ms,
            slo_tpot_ms: g.slo_tpot_ms,
            slo_e2e_ms: g.slo_e2e_ms,
            max_rate: g.max_rate,
        }
    }
}

impl From<pb::GenerateConfig> for GenerateConfig {
    fn from(g: pb::GenerateConfig) -> Self {
        let lengths = |t: Option<pb::TokenLengths>| {
            t.map(|t| TokenLengths {
                min: t.min,
                max: t.max,
            })
            .unwrap_or_default()
        };
        GenerateConfig {
            prompt_tokens: lengths(g.prompt_tokens),
            output_tokens: lengths(g.output_tokens),
            request_rate: g.request_rate,
            temperature: g.temperature,
            top_k: g.top_k,
            slo_ttft_ms: g.slo_ttft_ms,
            slo_tpot_ms: g.slo_tpot_ms,
            slo_e2e_ms: g.slo_e2e_ms,
            max_rate: g.max_rate,
        }
    }
}

impl TryFrom<pb::RunConfig> for RunConfig {
    type Error = ConfigError;

    fn try_from(c: pb::RunConfig) -> Result<Self, ConfigError> {
        Ok(RunConfig {
            batch_size: c.batch_size,
            intra_op_threads: c.intra_op_threads,
            graph_optimization: graph_optimization_from_wire(
                "graph_optimization",
                c.graph_optimization,
            )?,
            execution_provider: c.execution_provider,
            iterations: c.iterations,
            duration_ms: c.duration_ms,
            warmup_iterations: c.warmup_iterations,
            seed: c.seed,
            shapes: c.shapes.into_iter().map(Into::into).collect(),
            input_data_sha256: c.input_data_sha256,
            window_ms: c.window_ms,
            window_min_queries: c.window_min_queries,
            scenario: scenario_from_wire("scenario", c.scenario)?,
            concurrency: c.concurrency,
            target_qps: c.target_qps,
            latency_bound_ms: c.latency_bound_ms,
            min_duration_ms: c.min_duration_ms,
            min_queries: c.min_queries,
            max_duration_ms: c.max_duration_ms,
            early_stop: c.early_stop,
            stability_ratio: c.stability_ratio,
            stability_windows: c.stability_windows,
            max_outstanding: c.max_outstanding,
            skip_accuracy: c.skip_accuracy,
            sample_ms: c.sample_ms,
            generate: c.generate.map(Into::into),
        })
    }
}

impl From<&Sweep> for pb::Sweep {
    fn from(s: &Sweep) -> Self {
        pb::Sweep {
            batch_sizes: s.batch_sizes.clone(),
            concurrency: s.concurrency.clone(),
            intra_op_threads: s.intra_op_threads.clone(),
            graph_optimizations: s
                .graph_optimizations
                .iter()
                .map(|g| pb::GraphOptimization::from(*g) as i32)
                .collect(),
            execution_providers: s.execution_providers.clone(),
        }
    }
}

impl TryFrom<pb::Sweep> for Sweep {
    type Error = ConfigError;

    fn try_from(s: pb::Sweep) -> Result<Self, ConfigError> {
        Ok(Sweep {
            batch_sizes: s.batch_sizes,
            concurrency: s.concurrency,
            intra_op_threads: s.intra_op_threads,
            graph_optimizations: s
                .graph_optimizations
                .into_iter()
                .map(|g| graph_optimization_from_wire("sweep.graph_optimizations", g))
                .collect::<Result<_, _>>()?,
            execution_providers: s.execution_providers,
        })
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(s: &JobSpec) -> Self {
        pb::JobSpec {
            model: s.model.clone(),
            variants: s.variants.clone(),
            selector: s
                .selector
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            config: Some((&s.config).into()),
            sweep: Some((&s.sweep).into()),
            name: s.name.clone(),
        }
    }
}

impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = ConfigError;

    fn try_from(s: pb::JobSpec) -> Result<Self, ConfigError> {
        Ok(JobSpec {
            model: s.model,
            variants: s.variants,
            selector: s.selector.into_iter().collect(),
            // Fields of the configuration are named as the CLI and job files spell them.
            config: required("config", s.config)?.try_into()?,
            // No sweep is a sweep of nothing: the base configuration only.
            sweep: s.sweep.unwrap_or_default().try_into()?,
            name: s.name,
        })
    }
}

impl From<&Accelerator> for pb::Accelerator {
    fn from(a: &Accelerator) -> Self {
        pb::Accelerator {
            kind: a.kind.clone(),
            name: a.name.clone(),
            memory_bytes: a.memory_bytes,
        }
    }
}

impl From<pb::Accelerator> for Accelerator {
    fn from(a: pb::Accelerator) -> Self {
        Accelerator {
            kind: a.kind,
            name: a.name,
            memory_bytes: a.memory_bytes,
        }
    }
}

impl From<&Inventory> for pb::Inventory {
    fn from(i: &Inventory) -> Self {
        pb::Inventory {
            hostname: i.hostname.clone(),
            host_id: i.host_id.clone(),
            os_name: i.os_name.clone(),
            os_version: i.os_version.clone(),
            kernel_version: i.kernel_version.clone(),
            arch: i.arch.clone(),
            cpu_brand: i.cpu_brand.clone(),
            physical_cores: i.physical_cores,
            logical_cores: i.logical_cores,
            cpu_set: i.cpu_set.clone(),
            memory_bytes: i.memory_bytes,
            ort_version: i.ort_version.clone(),
            execution_providers: i.execution_providers.clone(),
            accelerators: i.accelerators.iter().map(Into::into).collect(),
            agent_version: i.agent_version.clone(),
            ort_build_info: i.ort_build_info.clone(),
        }
    }
}

impl From<pb::Inventory> for Inventory {
    fn from(i: pb::Inventory) -> Self {
        Inventory {
            hostname: i.hostname,
            host_id: i.host_id,
            os_name: i.os_name,
            os_version: i.os_version,
            kernel_version: i.kernel_version,
            arch: i.arch,
            cpu_brand: i.cpu_brand,
            physical_cores: i.physical_cores,
            logical_cores: i.logical_cores,
            cpu_set: i.cpu_set,
            memory_bytes: i.memory_bytes,
            ort_version: i.ort_version,
            execution_providers: i.execution_providers,
            accelerators: i.accelerators.into_iter().map(Into::into).collect(),
            agent_version: i.agent_version,
            ort_build_info: i.ort_build_info,
        }
    }
}

impl From<&LatencyStats> for pb::LatencyStats {
    fn from(l: &LatencyStats) -> Self {
        pb::LatencyStats {
            p50_ms: l.p50_ms,
            p90_ms: l.p90_ms,
            p95_ms: l.p95_ms,
            p97_ms: l.p97_ms,
            p99_ms: l.p99_ms,
            p999_ms: l.p999_ms,
            mean_ms: l.mean_ms,
            stddev_ms: l.stddev_ms,
            min_ms: l.min_ms,
            max_ms: l.max_ms,
            p50_ci_low_ms: l.p50_ci_low_ms,
            p50_ci_high_ms: l.p50_ci_high_ms,
            p99_ci_low_ms: l.p99_ci_low_ms,
            p99_ci_high_ms: l.p99_ci_high_ms,
            p90_ci_low_ms: l.p90_ci_low_ms,
            p90_ci_high_ms: l.p90_ci_high_ms,
            p95_ci_low_ms: l.p95_ci_low_ms,
            p95_ci_high_ms: l.p95_ci_high_ms,
        }
    }
}

impl From<pb::LatencyStats> for LatencyStats {
    fn from(l: pb::LatencyStats) -> Self {
        LatencyStats {
            p50_ms: l.p50_ms,
            p90_ms: l.p90_ms,
            p95_ms: l.p95_ms,
            p97_ms: l.p97_ms,
            p99_ms: l.p99_ms,
            p999_ms: l.p999_ms,
            mean_ms: l.mean_ms,
            stddev_ms: l.stddev_ms,
            min_ms: l.min_ms,
            max_ms: l.max_ms,
            p50_ci_low_ms: l.p50_ci_low_ms,
            p50_ci_high_ms: l.p50_ci_high_ms,
            p99_ci_low_ms: l.p99_ci_low_ms,
            p99_ci_high_ms: l.p99_ci_high_ms,
            p90_ci_low_ms: l.p90_ci_low_ms,
            p90_ci_high_ms: l.p90_ci_high_ms,
            p95_ci_low_ms: l.p95_ci_low_ms,
            p95_ci_high_ms: l.p95_ci_high_ms,
        }
    }
}

impl From<&TensorInfo> for pb::TensorInfo {
    fn from(t: &TensorInfo) -> Self {
        pb::TensorInfo {
            name: t.name.clone(),
            element_type: t.element_type.clone(),
            dims: t.dims.clone(),
            dim_names: t.dim_names.clone(),
        }
    }
}

impl From<pb::TensorInfo> for TensorInfo {
    fn from(t: pb::TensorInfo) -> Self {
        TensorInfo {
            name: t.name,
            element_type: t.element_type,
            dims: t.dims,
            dim_names: t.dim_names,
        }
    }
}

impl From<&crate::artifact::ArtifactSet> for pb::ArtifactSet {
    fn from(s: &crate::artifact::ArtifactSet) -> Self {
        pb::ArtifactSet {
            sha256: s.id(),
            model_path: s.model_path.clone(),
            files: s
                .files
                .iter()
                .map(|f| pb::ArtifactFile {
                    path: f.path.clone(),
                    size_bytes: f.size_bytes,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            total_bytes: s.total_bytes(),
        }
    }
}

impl From<pb::ArtifactSet> for crate::artifact::ArtifactSet {
    /// The set as sent, not yet checked (see [`crate::artifact::ArtifactSet::normalised`]).
    fn from(s: pb::ArtifactSet) -> Self {
        crate::artifact::ArtifactSet {
            model_path: s.model_path,
            files: s
                .files
                .into_iter()
                .map(|f| crate::artifact::ArtifactFile {
                    path: f.path,
                    size_bytes: f.size_bytes,
                    sha256: f.sha256,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_configs_round_trip_and_unknown_enums_are_named() {
        let c = RunConfig {
            batch_size: 8,
            scenario: Scenario::Server,
            graph_optimization: GraphOptimization::Basic,
            target_qps: 100.0,
            shapes: vec![InputShape {
                name: "x".into(),
                dims: vec![1, 3],
            }],
            ..Default::default()
        };
        let wire = pb::RunConfig::from(&c);
        assert_eq!(RunConfig::try_from(wire.clone()).unwrap(), c);
        let bad = pb::RunConfig {
            scenario: 42,
            ..wire
        };
        assert_eq!(RunConfig::try_from(bad).unwrap_err().field, "scenario");
        let spec = pb::JobSpec {
            model: "m".into(),
            ..Default::default()
        };
        assert_eq!(JobSpec::try_from(spec).unwrap_err().field, "config");
    }
}
