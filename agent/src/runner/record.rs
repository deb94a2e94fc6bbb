//! The reproducibility record of a run: agent and runtime versions, the execution provider asked for
//! and the providers that actually ran the graph's nodes (from one profiled run, so a silent fallback to
//! CPU shows), every session option, the model, seed, scenario settings and host.

use std::collections::{BTreeMap, BTreeSet};

use fleetbench_common::config::{graph_optimization_name, scenario_name};
use fleetbench_common::domain::RunConfig;
use fleetbench_runtime::memory::{HugePages, MemoryState};
use ort::session::SessionInputValue;
use ort::value::DynValue;

use super::{OrtRunner, PreparedTask, builder_error, session_count};
use crate::error::{AgentError, Result};

impl OrtRunner {
    /// Which execution providers ran the graph's nodes: one profiled run of a separate session, its
    /// kernel events counted per provider. ONNX Runtime may fall back to CPU silently; this says so.
    pub(crate) fn providers_used(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        values: &[DynValue],
    ) -> Result<BTreeMap<String, u64>> {
        self.providers_used_by(task, c, &mut |session| {
            let views: Vec<SessionInputValue<'_>> = values.iter().map(Into::into).collect();
            session.run(views.as_slice())?;
            Ok(())
        })
    }

    /// [`OrtRunner::providers_used`] with `run` doing the profiled work on the session.
    pub(crate) fn providers_used_by(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        run: &mut dyn FnMut(&mut ort::session::Session) -> Result<()>,
    ) -> Result<BTreeMap<String, u64>> {
        let prefix =
            std::env::temp_dir().join(format!("fleetbench-profile-{}", task.assignment.run_id));
        let mut session = self
            .builder(c)?
            .with_profiling(&prefix)
            .map_err(builder_error)?
            .commit_from_file(&task.model_path)
            .map_err(|e| AgentError::Task(format!("profiling session: {e}")))?;
        run(&mut session)?;
        let file = session.end_profiling()?;
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        Ok(count_kernels(&text))
    }

    /// The record as JSON.
    pub(crate) fn record(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        used: &BTreeMap<String, u64>,
        (memory, pages): (&MemoryState, Option<&HugePages>),
        started_at_ms: i64,
    ) -> serde_json::Value {
        let asked = canonical_provider(&c.execution_provider);
        let fell_back = used.keys().any(|p| p != asked);
        serde_json::json!({
            "agent_version": fleetbench_common::VERSION,
            "ort_version": self.runtime.version,
            "ort_build_info": self.runtime.build_info,
            "ort_library": self.runtime.path.display().to_string(),
            "execution_provider": c.execution_provider,
            "available_providers": self.runtime.providers,
            "providers_used": used,
            "fell_back_to_other_providers": fell_back,
            "session_options": {
                "intra_op_threads": c.intra_op_threads,
                "inter_op_threads": 1,
                "execution_mode": "sequential",
                "graph_optimization": graph_optimization_name(c.graph_optimization),
                "sessions": session_count(c),
            },
            "model_sha256": task.assignment.variant.as_ref().map(|v| v.artifact_sha256.clone()).unwrap_or_default(),
            "seed": c.seed,
            "scenario": scenario_name(c.scenario),
            "scenario_settings": {
                "batch_size": c.batch_size,
                "concurrency": session_count(c),
                "iterations": c.iterations,
                "duration_ms": c.duration_ms,
                "min_duration_ms": c.min_duration_ms,
                "max_duration_ms": c.max_duration_ms,
                "min_queries": c.min_queries,
                "early_stop": c.early_stop,
                "stability_ratio": c.stability_ratio,
                "stability_windows": c.stability_windows,
                "window_ms": c.window_ms,
                "target_qps": c.target_qps,
                "latency_bound_ms": c.latency_bound_ms,
                "max_outstanding": c.max_outstanding,
                "warmup_iterations": c.warmup_iterations,
                "sample_ms": c.sample_ms,
                "generate": c.generate,
            },
            // Huge pages: whether the run's memory went onto them (asked for, and some of it moved);
            // how much, once the sessions were loaded; and how much of the process was on them after
            // the timed phase.
            "memory": {
                "transparent_huge_pages": memory.thp_mode,
                "huge_pages": pages.is_some_and(|p| p.collapsed_bytes > 0),
                "huge_pages_collapsed_bytes": pages.map(|p| p.collapsed_bytes),
                "huge_pages_note": pages.and_then(|p| p.note.clone()),
                "anon_huge_pages_bytes": memory.anon_huge_pages_bytes,
            },
            "cpus": task.cpus,
            "host_id": task.host_id,
            "started_at_ms": started_at_ms,
            "ended_at_ms": fleetbench_common::now_ms(),
        })
    }
}

/// Distinct nodes per execution provider in an ONNX Runtime profile.
pub fn count_kernels(profile_json: &str) -> BTreeMap<String, u64> {
    let events: Vec<serde_json::Value> = serde_json::from_str(profile_json).unwrap_or_default();
    let mut nodes: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for e in &events {
        let name = e.get("name").and_then(|n| n.as_str()).unwrap_or("");
        if e.get("cat").and_then(|c| c.as_str()) == Some("Node")
            && name.ends_with("_kernel_time")
            && let Some(p) = e.pointer("/args/provider").and_then(|p| p.as_str())
        {
            nodes.entry(p.to_string()).or_default().insert(name);
        }
    }
    nodes
        .into_iter()
        .map(|(p, n)| (p, n.len() as u64))
        .collect()
}

/// ONNX Runtime's name of a fleetbench provider name.
pub fn canonical_provider(name: &str) -> &'static str {
    match name {
        "cuda" => "CUDAExecutionProvider",
        "tensorrt" => "TensorrtExecutionProvider",
        "openvino" => "OpenVINOExecutionProvider",
        "rocm" => "ROCMExecutionProvider",
        "xnnpack" => "XnnpackExecutionProvider",
        _ => "CPUExecutionProvider",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernels_are_counted_per_provider() {
        let profile = r#"[
            {"cat":"Session","name":"model_run","args":{}},
            {"cat":"Node","name":"fc0/MatMul_kernel_time","args":{"provider":"CUDAExecutionProvider"}},
            {"cat":"Node","name":"fc0/MatMul_fence_before","args":{"provider":"CUDAExecutionProvider"}},
            {"cat":"Node","name":"fc0/Add_kernel_time","args":{"provider":"CUDAExecutionProvider"}},
            {"cat":"Node","name":"argmax_kernel_time","args":{"provider":"CPUExecutionProvider"}}
        ]"#;
        let counts = super::count_kernels(profile);
        assert_eq!(counts.get("CUDAExecutionProvider"), Some(&2));
        assert_eq!(counts.get("CPUExecutionProvider"), Some(&1));
    }
}
