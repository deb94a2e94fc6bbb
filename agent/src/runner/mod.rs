//! Running a task: ONNX Runtime sessions built from the task's session options, warm-up, the timed
//! scenario with telemetry windows, an untimed accuracy pass over the eval set, and a reproducibility
//! record (including which execution providers actually ran the graph's nodes).
//!
//! [`OrtRunner::run`] goes through the steps in order: the effective configuration, the sessions (with
//! cold-start times), the inputs, the timed [`scenario`], the quality pass ([`eval`]) and the
//! [`record`].

pub mod eval;
pub mod generate;
pub mod record;
pub mod recorder;
pub mod scenario;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetbench_common::config::with_defaults;
use fleetbench_common::domain::{GraphOptimization, RunConfig, Scenario};
use fleetbench_proto::v1::{RunReport, TaskAssignment, TelemetryWindow};
use fleetbench_runtime::data::{self, HostArray};
use fleetbench_runtime::inputs::{self, InputSpec};
use fleetbench_runtime::memory::{self, HugePages, MemoryState};
use fleetbench_runtime::{Runtime, RuntimeError};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::DynValue;

use crate::error::{AgentError, Result};
use crate::sampler::Sampler;
pub use record::{canonical_provider, count_kernels};
use recorder::Recorder;
use scenario::{OrtQuery, QueryExec};

/// A task with its files fetched into the local cache.
#[derive(Debug, Clone)]
pub struct PreparedTask {
    /// The assignment as received.
    pub assignment: TaskAssignment,
    /// Its configuration, read from the assignment.
    pub config: RunConfig,
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
    /// Keeps the task's cached files from eviction while it runs.
    pub pins: std::sync::Arc<Vec<crate::cache::Pin>>,
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

impl From<RuntimeError> for RunError {
    fn from(e: RuntimeError) -> Self {
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
    /// Put the sessions' memory on transparent huge pages once they are loaded (the agent's
    /// `huge_pages`).
    pub huge_pages: bool,
}

fn opt_level(g: GraphOptimization) -> GraphOptimizationLevel {
    match g {
        GraphOptimization::Disabled => GraphOptimizationLevel::Disable,
        GraphOptimization::Basic => GraphOptimizationLevel::Level1,
        GraphOptimization::Extended => GraphOptimizationLevel::Level2,
        GraphOptimization::All => GraphOptimizationLevel::All,
    }
}

/// Number of sessions a configuration runs (one per concurrent stream in offline, server and max-qps).
pub fn session_count(c: &RunConfig) -> usize {
    match c.scenario {
        Scenario::SingleStream => 1,
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

pub(crate) fn builder_error(e: ort::Error<SessionBuilder>) -> AgentError {
    AgentError::from(ort::Error::<()>::from(e))
}

/// The sessions of a run, its inputs, and its cold-start times.
struct Sessions {
    sessions: Vec<Session>,
    specs: Vec<InputSpec>,
    values: Vec<DynValue>,
    session_create_ns: u64,
    first_inference_ns: u64,
}

/// What the timed phase measured besides its windows.
struct Timed {
    scenario_json: serde_json::Value,
    queries: u64,
    late: u64,
    dropped: u64,
    elapsed: Duration,
}

impl OrtRunner {
    /// Refuses, before any session, a model whose IR version or opset is newer than this agent's ONNX
    /// Runtime loads (read from the graph, not the weights).
    fn check_compatible(&self, task: &PreparedTask) -> std::result::Result<(), RunError> {
        let info = fleetbench_common::onnx::inspect_file(&task.model_path)
            .map_err(|e| RunError::Failed(format!("the model: {e}")))?;
        fleetbench_runtime::compat::check(info.ir_version, info.opset, &self.runtime.version)
            .map_err(RunError::Failed)
    }

    /// Once a task's sessions are loaded: their memory onto transparent huge pages, when the agent asks
    /// for them (`huge_pages`).
    fn onto_huge_pages(&self) -> Option<HugePages> {
        self.huge_pages.then(|| {
            let done = memory::back_with_huge_pages();
            tracing::debug!(?done, "Memory onto huge pages.");
            done
        })
    }

    /// A session builder with the configuration's options and execution provider.
    pub fn builder(&self, c: &RunConfig) -> Result<SessionBuilder> {
        let mut builder = Session::builder(&self.runtime.env)?
            .with_intra_threads(c.intra_op_threads as usize)
            .map_err(builder_error)?
            .with_inter_threads(1)
            .map_err(builder_error)?
            .with_optimization_level(opt_level(c.graph_optimization))
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

    /// Step 1: the first session (timed: session creation), the inputs, one cold query (timed: first
    /// inference), then the other sessions the scenario runs.
    fn open_sessions(&self, task: &PreparedTask, c: &RunConfig) -> Result<Sessions> {
        let t = Instant::now();
        let mut first = self.session(task, c)?;
        let session_create_ns = t.elapsed().as_nanos() as u64;
        let specs = inputs::input_specs(&first)?;
        let data = load_task_data(task, &specs)?;
        let batch = c.batch_size.max(1) as usize;
        let values = inputs::build_inputs(&specs, &c.shapes, batch, data.as_ref(), c.seed)?;
        let t = Instant::now();
        OrtQuery {
            session: &mut first,
            values: &values,
        }
        .run()
        .map_err(|e| match e {
            RunError::Failed(m) => AgentError::Task(m),
            RunError::Cancelled => AgentError::Task("cancelled".into()),
        })?;
        let first_inference_ns = t.elapsed().as_nanos() as u64;
        let mut sessions = vec![first];
        for _ in 1..session_count(c) {
            sessions.push(self.session(task, c)?);
        }
        Ok(Sessions {
            sessions,
            specs,
            values,
            session_create_ns,
            first_inference_ns,
        })
    }

    /// Step 2: warm-up, then the timed scenario with its windows and resource samples.
    fn timed_phase(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        s: &mut Sessions,
        emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
    ) -> std::result::Result<Timed, RunError> {
        let values = &s.values;
        let mut execs: Vec<Box<dyn QueryExec + '_>> = s
            .sessions
            .iter_mut()
            .map(|session| Box::new(OrtQuery { session, values }) as Box<dyn QueryExec + '_>)
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
            c.batch_size.max(1) as u64,
            Some(sampler),
            emit,
        );
        let scenario_json = match c.scenario {
            Scenario::SingleStream => {
                scenario::single_stream(execs[0].as_mut(), c, &mut rec, cancel)?
            }
            Scenario::Offline => scenario::offline(&mut execs, c, &mut rec, cancel)?,
            Scenario::Server => scenario::server_run(&mut execs, c, &mut rec, cancel)?,
            Scenario::MaxQps => scenario::max_qps(&mut execs, c, &mut rec, cancel)?,
            Scenario::Generate => {
                return Err(RunError::Failed(
                    "the generate scenario runs through run_generate".into(),
                ));
            }
        };
        let (_, elapsed) = rec.finish();
        Ok(Timed {
            scenario_json,
            queries: rec.queries,
            late: rec.late,
            dropped: rec.dropped,
            elapsed,
        })
    }

    /// Step 3: the untimed quality pass, beside the base variant when there is one.
    fn evaluate(
        &self,
        task: &PreparedTask,
        c: &RunConfig,
        s: &mut Sessions,
    ) -> Result<Option<fleetbench_common::quality::Quality>> {
        if c.skip_accuracy {
            return Ok(None);
        }
        let mut base = match &task.base_model_path {
            Some(p) => Some(self.builder(c)?.commit_from_file(p).map_err(|e| {
                AgentError::Task(format!("cannot load the base variant {}: {e}", p.display()))
            })?),
            None => None,
        };
        let eval_set = match &task.eval {
            Some((inputs_path, labels_path)) => {
                let first = s.specs.first().map(|s| s.name.clone()).unwrap_or_default();
                Some((
                    data::read_arrays(inputs_path, &first)?,
                    data::read_npy(labels_path)?,
                ))
            }
            None => None,
        };
        eval::quality(
            &mut s.sessions[0],
            base.as_mut(),
            &s.specs,
            eval_set.as_ref().map(|(x, y)| (x, y)),
            c,
        )
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
    Ok(task
        .input_data
        .as_deref()
        .map(|p| data::read_arrays(p, first))
        .transpose()?)
}

impl ModelRunner for OrtRunner {
    fn run(
        &self,
        task: &PreparedTask,
        emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
    ) -> std::result::Result<RunReport, RunError> {
        let c = effective_config(&task.config, &task.cpus);
        let started_at = fleetbench_common::now_ms();
        self.check_compatible(task)?;
        if c.scenario == Scenario::Generate {
            return self.run_generate(task, &c, emit, cancel, started_at);
        }
        let mut sessions = self.open_sessions(task, &c)?;
        let timed = self.timed_phase(task, &c, &mut sessions, emit, cancel)?;
        // While the sessions hold the weights.
        let memory = MemoryState::now();
        let quality = self.evaluate(task, &c, &mut sessions)?;
        let Sessions {
            sessions,
            values,
            session_create_ns,
            first_inference_ns,
            ..
        } = sessions;
        drop(sessions);
        // Step 4: the record, with the providers that actually ran the nodes.
        let used = self.providers_used(task, &c, &values)?;
        // No huge pages here: only generate tasks move memory (decoding streams the weights per
        // token); moving a small model's process made single-call latencies less repeatable.
        let record = self.record(task, &c, &used, (&memory, None), started_at);
        let accuracy = quality
            .as_ref()
            .and_then(|q| q.classification.as_ref())
            .map(|cl| (cl.top1, cl.samples));
        let batch = c.batch_size.max(1) as u64;
        Ok(RunReport {
            queries: timed.queries,
            samples: timed.queries * batch,
            elapsed_ns: timed.elapsed.as_nanos() as u64,
            session_create_ns,
            first_inference_ns,
            accuracy: accuracy.map(|a| a.0),
            eval_samples: accuracy.map(|a| a.1).unwrap_or(0),
            record_json: record.to_string(),
            effective_config: Some((&c).into()),
            late_queries: timed.late,
            dropped_queries: timed.dropped,
            scenario_json: timed.scenario_json.to_string(),
            quality_json: quality
                .map(|q| serde_json::to_string(&q).unwrap_or_default())
                .unwrap_or_default(),
        })
    }
}
