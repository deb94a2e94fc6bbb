//! Running a task: an ONNX Runtime session built from the task's session options, warm-up, the timed
//! scenario with telemetry windows, then an untimed accuracy pass over the eval set.

pub mod data;
pub mod eval;
pub mod inputs;
pub mod recorder;
pub mod scenario;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetbench_common::config::{graph_optimization_name, scenario_name, with_defaults};
use fleetbench_proto::v1::{
    GraphOptimization, RunConfig, RunReport, Scenario, TaskAssignment, TelemetryWindow,
};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::error::{AgentError, Result};
use crate::runtime::Runtime;
use crate::sampler::Sampler;
use data::HostArray;
use inputs::InputSpec;
use recorder::Recorder;

/// A task with its files fetched into the local cache.
#[derive(Debug, Clone)]
pub struct PreparedTask {
    /// The assignment as received.
    pub assignment: TaskAssignment,
    /// Local path of the ONNX artifact.
    pub model_path: PathBuf,
    /// Local paths of the eval inputs and labels, when the variant has an eval set.
    pub eval: Option<(PathBuf, PathBuf)>,
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

/// Resolves defaults that depend on the agent (intra-op threads = CPUs available).
pub fn effective_config(config: &RunConfig, cpus: &[u32]) -> RunConfig {
    let mut c = with_defaults(config.clone());
    if c.intra_op_threads == 0 {
        c.intra_op_threads = cpus.len().max(1) as u32;
    }
    c
}

impl OrtRunner {
    /// Builds a session with the configuration's options and execution provider.
    pub fn session(&self, task: &PreparedTask, c: &RunConfig) -> Result<Session> {
        let map = |e: ort::Error<ort::session::builder::SessionBuilder>| {
            AgentError::from(ort::Error::<()>::from(e))
        };
        let mut builder = Session::builder(&self.runtime.env)?
            .with_intra_threads(c.intra_op_threads as usize)
            .map_err(map)?
            .with_inter_threads(1)
            .map_err(map)?
            .with_optimization_level(opt_level(
                GraphOptimization::try_from(c.graph_optimization).unwrap_or_default(),
            ))
            .map_err(map)?;
        builder = match c.execution_provider.as_str() {
            "" | "cpu" => builder,
            ep => {
                let dispatch = execution_provider(ep, &self.runtime.providers)?;
                builder.with_execution_providers([dispatch]).map_err(map)?
            }
        };
        builder.commit_from_file(&task.model_path).map_err(|e| {
            AgentError::Task(format!(
                "cannot load {} into ONNX Runtime: {e}",
                task.model_path.display()
            ))
        })
    }
}

/// The execution provider for a name, refused when the loaded runtime does not offer it.
fn execution_provider(
    name: &str,
    available: &[String],
) -> Result<ort::ep::ExecutionProviderDispatch> {
    use ort::ep::{self, ExecutionProvider};
    let (canonical, dispatch) = match name {
        "cuda" => (ep::CUDA::NAME, ep::CUDA::default().build()),
        "tensorrt" => (ep::TensorRT::NAME, ep::TensorRT::default().build()),
        "openvino" => (ep::OpenVINO::NAME, ep::OpenVINO::default().build()),
        "rocm" => (ep::ROCm::NAME, ep::ROCm::default().build()),
        "xnnpack" => (ep::XNNPACK::NAME, ep::XNNPACK::default().build()),
        other => {
            return Err(AgentError::Task(format!(
                "execution_provider: unknown provider '{other}'"
            )));
        }
    };
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
        let c = effective_config(
            task.assignment
                .config
                .as_ref()
                .ok_or(RunError::Failed("task has no config".into()))?,
            &task.cpus,
        );
        let started_at = fleetbench_common::now_ms();
        let t = Instant::now();
        let mut session = self.session(task, &c)?;
        let session_create_ns = t.elapsed().as_nanos() as u64;
        let specs = inputs::input_specs(&session)?;
        let data = load_task_data(task, &specs)?;
        let batch = c.batch_size.max(1) as usize;
        let values = inputs::build_inputs(&specs, &c, batch, data.as_ref(), c.seed)?;

        let t = Instant::now();
        {
            let views: Vec<ort::session::SessionInputValue<'_>> =
                values.iter().map(Into::into).collect();
            session.run(views.as_slice())?;
        }
        let first_inference_ns = t.elapsed().as_nanos() as u64;

        let sampler = Sampler::start(
            Duration::from_millis(c.sample_ms.max(10) as u64),
            task.cpus.clone(),
        );
        let mut rec = Recorder::new(
            &task.assignment.run_id,
            Duration::from_millis(c.window_ms as u64),
            c.window_min_queries as u64,
            batch as u64,
            sampler,
            emit,
        );
        let scenario = Scenario::try_from(c.scenario).unwrap_or(Scenario::SingleStream);
        let outcome = match scenario {
            Scenario::SingleStream | Scenario::Unspecified => {
                scenario::single_stream(&mut session, &values, &c, &mut rec, cancel)?
            }
            other => {
                return Err(RunError::Failed(format!(
                    "scenario: {} is not supported yet",
                    scenario_name(other)
                )));
            }
        };
        let (windows, elapsed) = rec.finish();
        let _ = windows;

        let accuracy = match (&task.eval, c.skip_accuracy) {
            (Some((inputs_path, labels_path)), false) => {
                let first = specs.first().map(|s| s.name.clone()).unwrap_or_default();
                let eval_inputs = data::read_arrays(inputs_path, &first)?;
                let labels = data::read_npy(labels_path)?;
                Some(eval::top1_accuracy(
                    &mut session,
                    &specs,
                    &eval_inputs,
                    &labels,
                )?)
            }
            _ => None,
        };
        let record = serde_json::json!({
            "agent_version": fleetbench_common::VERSION,
            "ort_version": self.runtime.version,
            "ort_build_info": self.runtime.build_info,
            "ort_library": self.runtime.path.display().to_string(),
            "execution_provider": c.execution_provider,
            "available_providers": self.runtime.providers,
            "session_options": {
                "intra_op_threads": c.intra_op_threads,
                "inter_op_threads": 1,
                "execution_mode": "sequential",
                "graph_optimization": graph_optimization_name(GraphOptimization::try_from(c.graph_optimization).unwrap_or_default()),
            },
            "model_sha256": task.assignment.variant.as_ref().map(|v| v.artifact_sha256.clone()).unwrap_or_default(),
            "seed": c.seed,
            "scenario": scenario_name(scenario),
            "batch_size": c.batch_size,
            "warmup_iterations": c.warmup_iterations,
            "cpus": task.cpus,
            "host_id": task.host_id,
            "started_at_ms": started_at,
            "ended_at_ms": fleetbench_common::now_ms(),
        });
        Ok(RunReport {
            queries: rec.queries,
            samples: rec.queries * batch as u64,
            elapsed_ns: elapsed.as_nanos() as u64,
            session_create_ns,
            first_inference_ns,
            accuracy: accuracy.map(|a| a.0),
            eval_samples: accuracy.map(|a| a.1).unwrap_or(0),
            record_json: record.to_string(),
            effective_config: Some(c.clone()),
            late_queries: rec.late,
            dropped_queries: rec.dropped,
            scenario_json: outcome.to_string(),
        })
    }
}
