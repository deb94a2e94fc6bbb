//! Running a task: ONNX Runtime sessions built from the task's session options, warm-up, the timed
//! scenario with telemetry windows, an untimed accuracy pass over the eval set, and a reproducibility
//! record (including which execution providers actually ran the graph's nodes).

pub mod data;
pub mod eval;
pub mod inputs;
pub mod recorder;
pub mod scenario;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetbench_common::config::{graph_optimization_name, scenario_name, with_defaults};
use fleetbench_proto::v1::{
    GraphOptimization, RunConfig, RunReport, Scenario, TaskAssignment, TelemetryWindow,
};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::DynValue;

use crate::error::{AgentError, Result};
use crate::runtime::Runtime;
use crate::sampler::Sampler;
use data::HostArray;
use inputs::InputSpec;
use recorder::Recorder;
use scenario::{OrtQuery, QueryExec};

/// A task with its files fetched into the local cache.
#[derive(Debug, Clone)]
pub struct PreparedTask {
    /// The assignment as received.
    pub assignment: TaskAssignment,
    /// Local path of the ONNX artifact.
    pub model_path: PathBuf,
    /// Local paths of the eval inputs and labels, when the variant has an eval set.
    pub eval: Option<(PathBuf, PathBuf)>,
    /// Local path of the base variant's artifact, when this variant derives from one.
    pub base_model_path: Option<PathBuf>,
    /// Local path of the .npz input data, when the task asks for real inputs.
    pub input_data: Option<PathBuf>,
    /// CPUs the agent may use.
    pub cpus: Vec<u32>,
    /// Host id, for the reproducibility record.
    pub host_id: String,
}

/// How a run ended without a report.
#[derive(Debug)]
pub enum RunError {
    /// Stopped by a cancellation.
    Cancelled,
    /// Could not run; the reason.
    Failed(String),
}

impl From<AgentError> for RunError {
    fn from(e: AgentError) -> Self {
        RunError::Failed(e.to_string())
    }
}

impl From<ort::Error> for RunError {
    fn from(e: ort::Error) -> Self {
        RunError::Failed(format!("onnxruntime: {e}"))
    }
}

/// Runs prepared tasks (the seam between the agent's uplink and the inference runtime).
pub trait ModelRunner: Send + Sync + 'static {
    /// Runs one task to the end, handing windows to `emit`; checks `cancel` between queries.
    fn run(
        &self,
        task: &PreparedTask,
        emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
    ) -> std::result::Result<RunReport, RunError>;
}

/// The runner on ONNX Runtime.
pub struct OrtRunner {
    /// The loaded runtime.
    pub runtime: &'static Runtime,
}

fn opt_level(g: GraphOptimization) -> GraphOptimizationLevel {
    match g {
        GraphOptimization::Disabled => GraphOptimizationLevel::Disable,
        GraphOptimization::Basic => GraphOptimizationLevel::Level1,
        GraphOptimization::Extended => GraphOptimizationLevel::Level2,
        GraphOptimization::All | GraphOptimization::Unspecified => GraphOptimizationLevel::All,
    }
}

/// Number of sessions a configuration runs (one per concurrent stream in offline, server and max-qps).
pub fn session_count(c: &RunConfig) -> usize {
    match Scenario::try_from(c.scenario).unwrap_or(Scenario::SingleStream) {
        Scenario::SingleStream | Scenario::Unspecified => 1,
        _ => c.concurrency.max(1) as usize,
    }
}

/// Resolves defaults that depend on the agent: intra-op threads default to the CPUs available to the
/// agent, shared among the sessions that run at once.
pub fn effective_config(config: &RunConfig, cpus: &[u32]) -> RunConfig {
    let mut c = with_defaults(config.clone());
    if c.intra_op_threads == 0 {
        c.intra_op_threads = (cpus.len().max(1) / session_count(&c)).max(1) as u32;
    }
    c
}

fn builder_error(e: ort::Error<SessionBuilder>) -> AgentError {
    AgentError::from(ort::Error::<()>::from(e))
}

impl OrtRunner {
    /// A session builder with the configuration's options and execution provider.
    pub fn builder(&self, c: &RunConfig) -> Result<SessionBuilder> {
        let mut builder = Session::builder(&self.runtime.env)?
            .with_intra_threads(c.intra_op_threads as usize)
            .map_err(builder_error)?
            .with_inter_threads(1)
            .map_err(builder_error)?
            .with_optimization_level(opt_level(
                GraphOptimization::try_from(c.graph_optimization).unwrap_or_default(),
            ))
            .map_err(builder_error)?;
        if !matches!(c.execution_provider.as_str(), "" | "cpu") {
            let dispatch = execution_provider(&c.execution_provider, &self.runtime.providers)?;
            builder = builder
                .with_execution_providers([dispatch])
                .map_err(builder_error)?;
        }
        Ok(builder)
    }

    /// A session of the task's model with the configuration's options.
    pub fn session(&self, task: &PreparedTask, c: &RunConfig) -> Result<Session> {
        self.builder(c)?
            .commit_from_file(&task.model_path)
            .map_err(|e| {
                AgentError::Task(format!(
                    "cannot load {} into ONNX Runtime: {e}",
                    task.model_path.display()
                ))
            })
    }

    /// Which execution providers ran the graph's nodes: one profiled run of a separate session, its
    /// kernel events counted per provider. ONNX Runtime may fall back to CPU silently; this says so.
    fn providers_used(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        values: &[DynValue],
    ) -> Result<BTreeMap<String, u64>> {
        let prefix =
            std::env::temp_dir().join(format!("fleetbench-profile-{}", task.assignment.run_id));
        let mut session = self
            .builder(c)?
            .with_profiling(&prefix)
            .map_err(builder_error)?
            .commit_from_file(&task.model_path)
            .map_err(|e| AgentError::Task(format!("profiling session: {e}")))?;
        {
            let views: Vec<SessionInputValue<'_>> = values.iter().map(Into::into).collect();
            session.run(views.as_slice())?;
        }
        let file = session.end_profiling()?;
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        Ok(count_kernels(&text))
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

/// The execution provider for a name, refused when the loaded runtime does not offer it.
fn execution_provider(
    name: &str,
    available: &[String],
) -> Result<ort::ep::ExecutionProviderDispatch> {
    use ort::ep;
    let dispatch = match name {
        "cuda" => ep::CUDA::default().build(),
        "tensorrt" => ep::TensorRT::default().build(),
        "openvino" => ep::OpenVINO::default().build(),
        "rocm" => ep::ROCm::default().build(),
        "xnnpack" => ep::XNNPACK::default().build(),
        other => {
            return Err(AgentError::Task(format!(
                "execution_provider: unknown provider '{other}'"
            )));
        }
    };
    let canonical = canonical_provider(name);
    if !available.iter().any(|p| p == canonical) {
        return Err(AgentError::Task(format!(
            "execution_provider: this agent's ONNX Runtime does not offer {canonical} (it has: {})",
            available.join(", ")
        )));
    }
    Ok(dispatch.error_on_failure())
}

fn load_task_data(
    task: &PreparedTask,
    specs: &[InputSpec],
) -> Result<Option<HashMap<String, HostArray>>> {
    let first = specs.first().map(|s| s.name.as_str()).unwrap_or("input");
    task.input_data
        .as_deref()
        .map(|p| data::read_arrays(p, first))
        .transpose()
}

impl ModelRunner for OrtRunner {
    fn run(
        &self,
        task: &PreparedTask,
        emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
    ) -> std::result::Result<RunReport, RunError> {
        let config = task
            .assignment
            .config
            .as_ref()
            .ok_or(RunError::Failed("task has no config".into()))?;
        let c = effective_config(config, &task.cpus);
        let started_at = fleetbench_common::now_ms();

        let t = Instant::now();
        let mut sessions = vec![self.session(task, &c)?];
        let session_create_ns = t.elapsed().as_nanos() as u64;
        let specs = inputs::input_specs(&sessions[0])?;
        let data = load_task_data(task, &specs)?;
        let batch = c.batch_size.max(1) as usize;
        let values = inputs::build_inputs(&specs, &c, batch, data.as_ref(), c.seed)?;
        let t = Instant::now();
        OrtQuery {
            session: &mut sessions[0],
            values: &values,
        }
        .run()?;
        let first_inference_ns = t.elapsed().as_nanos() as u64;
        for _ in 1..session_count(&c) {
            sessions.push(self.session(task, &c)?);
        }

        let scenario = Scenario::try_from(c.scenario).unwrap_or(Scenario::SingleStream);
        let (outcome, queries, late, dropped, elapsed) = {
            let mut execs: Vec<Box<dyn QueryExec + '_>> = sessions
                .iter_mut()
                .map(|session| {
                    Box::new(OrtQuery {
                        session,
                        values: &values,
                    }) as Box<dyn QueryExec + '_>
                })
                .collect();
            scenario::warm_up(&mut execs, c.warmup_iterations, cancel)?;
            let sampler = Sampler::start(
                Duration::from_millis(c.sample_ms.max(10) as u64),
                task.cpus.clone(),
            );
            let mut rec = Recorder::new(
                &task.assignment.run_id,
                Duration::from_millis(c.window_ms as u64),
                c.window_min_queries as u64,
                batch as u64,
                Some(sampler),
                emit,
            );
            let outcome = match scenario {
                Scenario::SingleStream | Scenario::Unspecified => {
                    scenario::single_stream(execs[0].as_mut(), &c, &mut rec, cancel)?
                }
                Scenario::Offline => scenario::offline(&mut execs, &c, &mut rec, cancel)?,
                Scenario::Server => scenario::server_run(&mut execs, &c, &mut rec, cancel)?,
                Scenario::MaxQps => scenario::max_qps(&mut execs, &c, &mut rec, cancel)?,
            };
            let (_, elapsed) = rec.finish();
            (outcome, rec.queries, rec.late, rec.dropped, elapsed)
        };

        let quality = if c.skip_accuracy {
            None
        } else {
            let mut base = match &task.base_model_path {
                Some(p) => Some(self.builder(&c)?.commit_from_file(p).map_err(|e| {
                    AgentError::Task(format!("cannot load the base variant {}: {e}", p.display()))
                })?),
                None => None,
            };
            let eval_set = match &task.eval {
                Some((inputs_path, labels_path)) => {
                    let first = specs.first().map(|s| s.name.clone()).unwrap_or_default();
                    Some((
                        data::read_arrays(inputs_path, &first)?,
                        data::read_npy(labels_path)?,
                    ))
                }
                None => None,
            };
            eval::quality(
                &mut sessions[0],
                base.as_mut(),
                &specs,
                eval_set.as_ref().map(|(x, y)| (x, y)),
                &c,
            )?
        };
        let accuracy = quality
            .as_ref()
            .and_then(|q| q.classification.as_ref())
            .map(|cl| (cl.top1, cl.samples));
        drop(sessions);
        let used = self.providers_used(task, &c, &values)?;
        let asked = canonical_provider(&c.execution_provider);
        let fell_back = used.keys().any(|p| p != asked);
        let record = serde_json::json!({
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
                "graph_optimization": graph_optimization_name(GraphOptimization::try_from(c.graph_optimization).unwrap_or_default()),
                "sessions": session_count(&c),
            },
            "model_sha256": task.assignment.variant.as_ref().map(|v| v.artifact_sha256.clone()).unwrap_or_default(),
            "seed": c.seed,
            "scenario": scenario_name(scenario),
            "scenario_settings": {
                "batch_size": c.batch_size,
                "concurrency": session_count(&c),
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
            },
            "cpus": task.cpus,
            "host_id": task.host_id,
            "started_at_ms": started_at,
            "ended_at_ms": fleetbench_common::now_ms(),
        });
        Ok(RunReport {
            queries,
            samples: queries * batch as u64,
            elapsed_ns: elapsed.as_nanos() as u64,
            session_create_ns,
            first_inference_ns,
            accuracy: accuracy.map(|a| a.0),
            eval_samples: accuracy.map(|a| a.1).unwrap_or(0),
            record_json: record.to_string(),
            effective_config: Some(c.clone()),
            late_queries: late,
            dropped_queries: dropped,
            scenario_json: outcome.to_string(),
            quality_json: quality
                .map(|q| serde_json::to_string(&q).unwrap_or_default())
                .unwrap_or_default(),
        })
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
