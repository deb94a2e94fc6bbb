//! The coordinator's domain model: what it stores and reasons about. The store seam and the domain
//! modules speak these types; protobuf messages stay at the gRPC edge and are converted in
//! [`crate::convert`]. The serde form of a type is its stored form (JSON columns), so every struct has
//! defaults for fields an older version did not write.

use serde::{Deserialize, Serialize};

pub use fleetbench_common::domain::{
    Accelerator, GenerateConfig, GraphOptimization, InputShape, Inventory, JobSpec, LatencyStats,
    RunConfig, Scenario, Sweep, TensorInfo,
};
use fleetbench_common::labels::Labels;

/// A stored variant of a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Variant {
    /// Model name.
    pub model: String,
    /// Variant name.
    pub variant: String,
    /// sha256 of the artifact set (see [`fleetbench_common::artifact`]).
    pub artifact_sha256: String,
    /// Total size of the set's files, bytes.
    pub size_bytes: u64,
    /// Variant this one derives from; empty for the base.
    pub variant_of: String,
    /// How it was derived; empty for the base.
    pub technique: String,
    /// Recipe and parameters as JSON.
    pub recipe_json: String,
    /// sha256 of the eval inputs in effect (own or inherited); empty when none.
    pub eval_inputs_sha256: String,
    /// sha256 of the eval labels in effect (own or inherited); empty when none.
    pub eval_labels_sha256: String,
    /// Graph inputs.
    pub inputs: Vec<TensorInfo>,
    /// Graph outputs.
    pub outputs: Vec<TensorInfo>,
    /// Registration time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Number of graph nodes.
    pub node_count: u32,
    /// Opset of the default ONNX domain.
    pub opset: i64,
    /// ONNX IR version; 0 for variants registered before it was recorded.
    pub ir_version: i64,
    /// Files in the artifact set; 0 for variants registered before sets existed (one file).
    pub file_count: u32,
    /// Decoders: the position limit the model's metadata states (`max_position_embeddings`).
    pub max_positions: Option<i64>,
}

/// A request to register an uploaded artifact as a variant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VariantRegistration {
    /// Model name; created on first use.
    pub model: String,
    /// Variant name; empty to derive it from the weights' type.
    pub variant: String,
    /// sha256 of the uploaded artifact.
    pub artifact_sha256: String,
    /// Variant this one derives from; empty for the model's base.
    pub variant_of: String,
    /// How it was derived.
    pub technique: String,
    /// Recipe and parameters as JSON.
    pub recipe_json: String,
    /// sha256 of uploaded eval inputs; empty to inherit.
    pub eval_inputs_sha256: String,
    /// sha256 of uploaded eval labels; empty to inherit.
    pub eval_labels_sha256: String,
}

/// An agent's request to join the fleet.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Registration {
    /// Id from an earlier registration, if the agent has one.
    pub agent_id: Option<String>,
    /// Operator-given name.
    pub name: String,
    /// Operator-given labels, as sent.
    pub labels: Vec<(String, String)>,
    /// Hardware and runtime inventory.
    pub inventory: Inventory,
    /// The fleetbench protocol version the agent speaks.
    pub protocol_version: u32,
}

/// What a registration returns to the agent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Registered {
    /// The agent's id.
    pub agent_id: String,
    /// Platform id the agent was pooled into.
    pub platform_id: String,
    /// Readable platform name.
    pub platform_name: String,
    /// Heartbeat interval the agent must keep, milliseconds.
    pub heartbeat_interval_ms: u32,
    /// The protocol version the coordinator speaks.
    pub protocol_version: u32,
    /// A new credential for the agent, when it joined with a join token.
    pub agent_credential: fleetbench_common::token::Secret,
}

/// Job state and task counts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobSummary {
    /// Job id.
    pub job_id: String,
    /// Model name.
    pub model: String,
    /// Job name.
    pub name: String,
    /// queued, running, succeeded, failed or cancelled.
    pub state: String,
    /// Tasks in total.
    pub tasks_total: u32,
    /// Tasks waiting for an agent.
    pub tasks_pending: u32,
    /// Tasks running.
    pub tasks_running: u32,
    /// Tasks that succeeded.
    pub tasks_succeeded: u32,
    /// Tasks that failed.
    pub tasks_failed: u32,
    /// Tasks cancelled.
    pub tasks_cancelled: u32,
    /// Submission time, Unix milliseconds.
    pub created_at_ms: i64,
    /// End time, Unix milliseconds; 0 while not ended.
    pub finished_at_ms: i64,
}

/// One task of a job with its progress and finished run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskInfo {
    /// Task id.
    pub task_id: String,
    /// Variant name.
    pub variant: String,
    /// Agent the task was expanded for.
    pub target_agent: String,
    /// Agent running or last running it; empty when never leased.
    pub agent: String,
    /// Platform id.
    pub platform_id: String,
    /// Readable platform name.
    pub platform_name: String,
    /// pending, running, succeeded, failed or cancelled.
    pub state: String,
    /// Attempts so far.
    pub attempt: u32,
    /// Failure reason when failed.
    pub error: String,
    /// Configuration of this task.
    pub config: RunConfig,
    /// Queries completed so far in the current run.
    pub progress_queries: u64,
    /// Queries the task asks for; 0 when bounded by time.
    pub target_queries: u64,
    /// Summary of the finished run, when the task succeeded.
    pub run: Option<RunSummary>,
}

/// A job with its tasks (also a progress snapshot).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobDetail {
    /// State and counts.
    pub summary: JobSummary,
    /// The submitted spec.
    pub spec: JobSpec,
    /// Tasks in expansion order.
    pub tasks: Vec<TaskInfo>,
}

/// Resource use over a run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceSummary {
    /// Mean process CPU (user), percent of one CPU.
    pub cpu_user_pct: f64,
    /// Mean process CPU (system), percent of one CPU.
    pub cpu_system_pct: f64,
    /// Mean RSS, bytes.
    pub rss_mean_bytes: u64,
    /// Peak RSS, bytes.
    pub rss_peak_bytes: u64,
    /// Mean system memory in use, bytes.
    pub system_memory_used_bytes: u64,
    /// Mean 1-minute load average.
    pub load_average_1m: f64,
    /// Mean CPU frequency, MHz; 0 when unreadable.
    pub cpu_frequency_mhz: f64,
    /// Mean CPU steal percent; negative when not reported.
    pub cpu_steal_pct: f64,
    /// Mean GPU utilisation percent; negative when no GPU.
    pub gpu_utilization_pct: f64,
    /// Peak GPU memory in use, bytes.
    pub gpu_memory_peak_bytes: u64,
    /// Reasons the run's figures may be disturbed (steal, throttling).
    pub flags: Vec<String>,
}

/// Figures of one finished run, read from its merged windows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Agent that ran it.
    pub agent: String,
    /// Platform id.
    pub platform_id: String,
    /// Variant name.
    pub variant: String,
    /// Effective configuration.
    pub config: RunConfig,
    /// True when the run met its rules (minimum duration and queries, maximum duration, bound).
    pub valid: bool,
    /// Why the run is INVALID; empty when VALID.
    pub invalid_reason: String,
    /// Latency statistics, milliseconds.
    pub latency: LatencyStats,
    /// Samples per second over the timed phase.
    pub throughput_per_s: f64,
    /// 95 % interval of the throughput, a bootstrap over the run's windows
    /// ([`fleetbench_common::intervals::bootstrap_throughput`]); absent with one window, or for runs
    /// stored before fleetbench kept it.
    pub throughput_ci_per_s: Option<(f64, f64)>,
    /// Timed queries.
    pub queries: u64,
    /// Timed samples.
    pub samples: u64,
    /// Top-1 accuracy in [0, 1], absent when unknown.
    pub accuracy: Option<f64>,
    /// Session creation time, milliseconds.
    pub session_create_ms: f64,
    /// First inference time, milliseconds.
    pub first_inference_ms: f64,
    /// Resource summary over the run.
    pub resources: ResourceSummary,
    /// Reproducibility record as JSON.
    pub record_json: String,
    /// Whether the last windows met the stability rule.
    pub stable: bool,
    /// Duration of the timed phase, milliseconds.
    pub duration_ms: f64,
    /// Queries issued late (server scenario).
    pub late_queries: u64,
    /// Queries dropped (server scenario).
    pub dropped_queries: u64,
    /// Scenario-specific figures as JSON.
    pub scenario_json: String,
    /// Start, Unix milliseconds.
    pub started_at_ms: i64,
    /// End, Unix milliseconds.
    pub finished_at_ms: i64,
    /// Telemetry windows stored for the run.
    pub windows: u64,
    /// Hourly cost of the agent's platform, absent when none.
    pub cost_per_hour: Option<f64>,
    /// Quality of the outputs as JSON (fleetbench_common::quality::Quality); empty when not measured.
    pub quality_json: String,
    /// Generate runs: token figures.
    pub generation: Option<GenerationSummary>,
}

/// Resource figures sampled during one window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceSample {
    /// Process CPU time in user mode during the window, percent of one CPU.
    pub process_cpu_user_pct: f64,
    /// Process CPU time in kernel mode during the window, percent of one CPU.
    pub process_cpu_system_pct: f64,
    /// Mean resident set size of the agent process, bytes.
    pub rss_mean_bytes: u64,
    /// Peak resident set size during the window, bytes.
    pub rss_peak_bytes: u64,
    /// System memory in use, bytes.
    pub system_memory_used_bytes: u64,
    /// 1-minute load average.
    pub load_average_1m: f64,
    /// Mean CPU frequency, MHz; 0 when unreadable.
    pub cpu_frequency_mhz: f64,
    /// CPU steal time during the window, percent; negative when not reported.
    pub cpu_steal_pct: f64,
    /// GPU utilisation percent; negative when no GPU.
    pub gpu_utilization_pct: f64,
    /// GPU memory in use, bytes.
    pub gpu_memory_used_bytes: u64,
    /// Number of samples folded into this record.
    pub samples: u32,
}

/// Measurements of one telemetry window of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Window {
    /// Run id.
    pub run_id: String,
    /// Sequence number within the run, from 0.
    pub seq: u64,
    /// Window start, nanoseconds since the start of the timed phase.
    pub start_offset_ns: u64,
    /// Window end, nanoseconds since the start of the timed phase.
    pub end_offset_ns: u64,
    /// Queries completed in the window.
    pub queries: u64,
    /// Samples completed in the window.
    pub samples: u64,
    /// HdrHistogram (V2) of query latency, nanoseconds.
    pub latency_histogram: Vec<u8>,
    /// Resource figures, when sampled.
    pub resources: Option<ResourceSample>,
    /// Queries issued later than scheduled by more than 1 ms.
    pub late_queries: u64,
    /// Queries not issued because too many were outstanding.
    pub dropped_queries: u64,
    /// HdrHistogram of issue delays, nanoseconds; may be empty.
    pub issue_delay_histogram: Vec<u8>,
    /// Unix ms when the window closed.
    pub closed_at_ms: i64,
    /// Generate runs: the token figures of the requests completed in the window.
    pub generation: Option<WindowGeneration>,
}

/// Token figures of the requests one window of a generate run completed. Histograms are HdrHistogram
/// (V2) bytes in nanoseconds, stored hex-encoded.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WindowGeneration {
    /// Time to first token.
    #[serde(with = "hex_bytes")]
    pub ttft_histogram: Vec<u8>,
    /// Time per output token.
    #[serde(with = "hex_bytes")]
    pub tpot_histogram: Vec<u8>,
    /// Every gap between consecutive output tokens.
    #[serde(with = "hex_bytes")]
    pub itl_histogram: Vec<u8>,
    /// Prompt tokens of the requests.
    pub prompt_tokens: u64,
    /// Output tokens of the requests.
    pub output_tokens: u64,
    /// Requests that met every SLO term.
    pub good_requests: u64,
}

/// Token figures of a generate run, or of runs pooled into one ranking row.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationSummary {
    /// Time to first token, ms.
    pub ttft: LatencyStats,
    /// Time per output token, ms.
    pub tpot: LatencyStats,
    /// Inter-token latency, ms.
    pub itl: LatencyStats,
    /// Requests completed.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Output tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt tokens per second.
    pub prompt_tokens_per_s: f64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Requests per second that met every SLO term.
    pub goodput_per_s: f64,
    /// Requests that met every SLO term.
    pub good_requests: u64,
    /// KV-cache bytes per token.
    pub kv_bytes_per_token: u64,
    /// Cost per million output tokens, in the unit of cost_per_hour.
    pub cost_per_million_tokens: Option<f64>,
    /// The merged histograms (ns), kept so rankings pool runs exactly.
    pub histograms: WindowGeneration,
    /// 95 % interval of `output_tokens_per_s` (block bootstrap over windows; pooled by run time).
    pub output_tokens_ci_per_s: Option<(f64, f64)>,
    /// 95 % interval of `goodput_per_s`, the same way.
    pub goodput_ci_per_s: Option<(f64, f64)>,
}

/// Serde for bytes as a hex string.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// What the agent measured besides the windows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunReport {
    /// Timed queries completed.
    pub queries: u64,
    /// Timed samples completed.
    pub samples: u64,
    /// Wall time of the timed phase, nanoseconds.
    pub elapsed_ns: u64,
    /// Session creation time, nanoseconds.
    pub session_create_ns: u64,
    /// First inference time, nanoseconds.
    pub first_inference_ns: u64,
    /// Top-1 accuracy in [0, 1], when measured.
    pub accuracy: Option<f64>,
    /// Eval samples behind accuracy.
    pub eval_samples: u64,
    /// Reproducibility record as JSON.
    pub record_json: String,
    /// Effective configuration, when the agent reported it.
    pub effective_config: Option<RunConfig>,
    /// Queries issued late.
    pub late_queries: u64,
    /// Queries dropped.
    pub dropped_queries: u64,
    /// Scenario figures as JSON.
    pub scenario_json: String,
    /// Quality as JSON.
    pub quality_json: String,
}

/// The outcome of a run, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunResult {
    /// Run id.
    pub run_id: String,
    /// Number of windows the agent sent.
    pub window_count: u64,
    /// Present when the run completed.
    pub report: Option<RunReport>,
    /// The failure reason when it failed.
    pub error: String,
    /// True when it stopped because it was cancelled.
    pub cancelled: bool,
    /// True when the agent was stopped before the run finished; the task goes back to the queue.
    pub agent_stopping: bool,
    /// The agent's spans of the run, to export in the job's trace.
    pub spans: Vec<AgentSpan>,
}

/// One span of an agent's work on a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentSpan {
    /// Name.
    pub name: String,
    /// Span id.
    pub span_id: u64,
    /// Parent span id.
    pub parent_span_id: u64,
    /// Start, Unix ns.
    pub start_unix_ns: i64,
    /// End, Unix ns.
    pub end_unix_ns: i64,
    /// Attributes.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Why the work failed; empty when it did not.
    pub error: String,
}

/// An agent as the fleet listing shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentInfo {
    /// Agent id.
    pub agent_id: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// Inventory.
    pub inventory: Inventory,
    /// Platform id.
    pub platform_id: String,
    /// Readable platform name.
    pub platform_name: String,
    /// Live session with a coordinator.
    pub online: bool,
    /// Task it runs, empty when idle.
    pub current_task_id: String,
    /// Last heartbeat, Unix ms.
    pub last_seen_ms: i64,
    /// Latest network measurements, one per target.
    pub network: Vec<fleetbench_common::network::NetworkPath>,
}

/// What a ranking asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RankQuery {
    /// Model name.
    pub model: String,
    /// Objective name; empty means p99.
    pub objective: String,
    /// Only rows with p99 at most this, ms.
    pub max_p99_ms: Option<f64>,
    /// Only rows with throughput at least this, samples/s.
    pub min_throughput: Option<f64>,
    /// Only rows at most this many points below the base variant.
    pub max_accuracy_drop: Option<f64>,
    /// Only rows with at least this top-1 accuracy (a fraction).
    pub min_accuracy: Option<f64>,
    /// Only rows whose peak RSS is at most this, bytes.
    pub max_rss_bytes: Option<u64>,
    /// Include INVALID runs.
    pub include_invalid: bool,
    /// Keep only the best configuration per (platform, variant).
    pub best_config_only: bool,
    /// Only runs of this job (id or prefix); empty for all.
    pub job_id: String,
    /// Include each row's history.
    pub history: bool,
    /// Rank by end-to-end time for a client at this network target; empty for none.
    pub client: String,
    /// With `client`: bytes of one request.
    pub request_bytes: u64,
    /// With `client`: bytes of one response.
    pub response_bytes: u64,
}

/// One request's network time from a client to a row's platform (see `RankQuery::client`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkTime {
    /// The client target.
    pub client: String,
    /// Network time of one request, ms.
    pub network_ms: f64,
    /// Round trip used (median over agents), ms.
    pub rtt_ms: f64,
    /// Towards the platform (median over agents), bytes/s.
    pub down_bytes_per_s: f64,
    /// From the platform (median over agents), bytes/s.
    pub up_bytes_per_s: f64,
    /// Agents whose measurements were used.
    pub agents: u32,
}

/// Coefficients of variation of the figures of runs pooled into one row.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunSpread {
    /// Of the runs' medians.
    pub p50_cv: f64,
    /// Of the runs' 99th percentiles.
    pub p99_cv: f64,
    /// Of the runs' throughputs.
    pub throughput_cv: f64,
}

/// The spread of a row's figures across agents.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostSpread {
    /// Agents.
    pub agents: u32,
    /// CV of the agents' mean p50.
    pub p50_cv: f64,
    /// CV of the agents' mean throughput.
    pub throughput_cv: f64,
}

/// An agent flagged on a row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NoisyHost {
    /// Agent name.
    pub agent: String,
    /// Mean p50 over the peers' median.
    pub p50_ratio: f64,
    /// Mean throughput over the peers' median.
    pub throughput_ratio: f64,
    /// Why.
    pub reason: String,
}

/// One run in a row's history.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryPoint {
    /// Run id.
    pub run_id: String,
    /// Start, Unix ms.
    pub started_at_ms: i64,
    /// Agent.
    pub agent: String,
    /// Median, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// Samples/s.
    pub throughput_per_s: f64,
    /// A new level starts here.
    pub change_point: bool,
}

/// One ranked (platform, variant, configuration) with its pooled figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RankRow {
    /// 1-based rank; rows tied with their group's leader share its rank.
    pub rank: u32,
    /// True when the row's confidence interval of the objective overlaps its group leader's.
    pub tied: bool,
    /// Platform id.
    pub platform_id: String,
    /// Readable platform name.
    pub platform: String,
    /// Variant name.
    pub variant: String,
    /// Configuration label.
    pub config: String,
    /// Pooled latency statistics.
    pub latency: LatencyStats,
    /// Pooled throughput, samples per second.
    pub throughput_per_s: f64,
    /// 95 % interval of the throughput ([`fleetbench_common::intervals::pool_throughput`]).
    pub throughput_ci: Option<(f64, f64)>,
    /// Mean accuracy, absent when unknown.
    pub accuracy: Option<f64>,
    /// 95 % Wilson interval of the accuracy.
    pub accuracy_ci: Option<(f64, f64)>,
    /// 95 % interval of the cost per million, from the throughput interval.
    pub cost_ci: Option<(f64, f64)>,
    /// Spread of the pooled runs' figures; absent with one run.
    pub spread: Option<RunSpread>,
    /// Spread across the agents that ran the row; absent with one agent.
    pub hosts: Option<HostSpread>,
    /// Agents whose figures stand apart from their peers', or whose runs were disturbed.
    pub noisy_hosts: Vec<NoisyHost>,
    /// The runs in time order with change points (when asked for).
    pub history: Vec<HistoryPoint>,
    /// Accuracy minus the base variant's, points.
    pub accuracy_delta_pts: Option<f64>,
    /// Mean top-1 agreement with the base variant.
    pub agreement: Option<f64>,
    /// Mean cosine similarity to the base variant.
    pub fidelity_cosine: Option<f64>,
    /// Cost per million samples.
    pub cost_per_million: Option<f64>,
    /// Number of runs pooled.
    pub runs: u32,
    /// Their ids.
    pub run_ids: Vec<String>,
    /// Peak RSS across the runs, bytes.
    pub rss_peak_bytes: u64,
    /// Artifact size, bytes.
    pub size_bytes: u64,
    /// Effective configuration.
    pub run_config: RunConfig,
    /// Reproducibility key of the pooled runs.
    pub record_key: String,
    /// The runs were stored before pooling keys existed: they pool only with each other.
    pub legacy: bool,
    /// The pooling key of the row's runs (JSON; `legacy:…` for old runs).
    pub pool_key: String,
    /// Generate runs: pooled token figures.
    pub generation: Option<GenerationSummary>,
    /// With `RankQuery::client`: one request's network time; None when no agent of the row measured
    /// the client's path.
    pub network: Option<NetworkTime>,
}

/// A ranking.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ranking {
    /// Rows, best first.
    pub rows: Vec<RankRow>,
    /// Objective used.
    pub objective: String,
}
