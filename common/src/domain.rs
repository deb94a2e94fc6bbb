//! The shared domain model: how a run is configured, what a job asks for, and what an agent's machine
//! is. These are the types the coordinator stores, the agent runs and the CLI builds; protobuf messages
//! appear only on the wire, converted in [`crate::convert`]. Their serde form is the stored form (JSON),
//! so every field has a default: a value stored by an older version reads back with the new fields at
//! their defaults.

use serde::{Deserialize, Serialize};

use crate::labels::Labels;

/// Load pattern of a benchmark run, after MLPerf LoadGen's scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One query at a time; the next is issued when the previous completes.
    #[default]
    SingleStream,
    /// All queries issued as fast as the runtime takes them, from `concurrency` streams.
    Offline,
    /// Poisson arrivals at `target_qps` from a pre-generated seeded schedule; latency from the
    /// scheduled time.
    Server,
    /// Bisection over server runs for the highest QPS whose p99 meets `latency_bound_ms`.
    MaxQps,
    /// Token generation with a decoder model: requests of prompt and output lengths, in a closed loop
    /// of `concurrency` streams or an open loop at [`GenerateConfig::request_rate`].
    Generate,
}

/// Token counts of a generate run: fixed (`min == max`) or drawn uniformly from `[min, max]` per
/// request, seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenLengths {
    /// Smallest length, >= 1.
    pub min: u32,
    /// Largest length, >= min.
    pub max: u32,
}

impl TokenLengths {
    /// One fixed length.
    pub fn fixed(n: u32) -> Self {
        Self { min: n, max: n }
    }
}

/// Parameters of the generate scenario. Zero means unset (an SLO term of 0 is not part of the SLO).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateConfig {
    /// Prompt tokens per request.
    pub prompt_tokens: TokenLengths,
    /// Output tokens per request; every request produces exactly this many.
    pub output_tokens: TokenLengths,
    /// Open loop: requests per second from a seeded Poisson schedule; 0: closed loop.
    pub request_rate: f64,
    /// Sampling temperature; 0 picks greedily.
    pub temperature: f64,
    /// Sample among the k most likely tokens; 0: all.
    pub top_k: u32,
    /// SLO: p99 time to first token, ms.
    pub slo_ttft_ms: f64,
    /// SLO: p99 time per output token, ms.
    pub slo_tpot_ms: f64,
    /// SLO: p99 end-to-end latency, ms.
    pub slo_e2e_ms: f64,
    /// Open loop at the highest request rate whose p99s meet the SLO (bisection, as max-qps).
    pub max_rate: bool,
}

impl GenerateConfig {
    /// True for an open loop: at a given request rate, or at the highest one the SLO allows.
    pub fn open_loop(&self) -> bool {
        self.request_rate > 0.0 || self.max_rate
    }

    /// True when any SLO term is set.
    pub fn has_slo(&self) -> bool {
        self.slo_ttft_ms > 0.0 || self.slo_tpot_ms > 0.0 || self.slo_e2e_ms > 0.0
    }
}

/// Graph optimization level passed to ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GraphOptimization {
    /// No graph optimizations.
    Disabled,
    /// Basic optimizations (constant folding, redundant node elimination).
    Basic,
    /// Extended optimizations (complex node fusions).
    Extended,
    /// All optimizations including layout optimizations (ONNX Runtime's default).
    #[default]
    All,
}

/// Concrete shape for one input whose dimensions are symbolic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InputShape {
    /// Graph input name.
    pub name: String,
    /// Concrete dimensions, all > 0.
    pub dims: Vec<i64>,
}

/// How one task runs a model variant: session options, load pattern and stopping rules. A zero (or
/// empty) value means "unset"; [`crate::config::with_defaults`] fills those in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    /// Samples per inference (the batch dimension). A batch of 8 counts as 8 samples.
    pub batch_size: u32,
    /// Intra-op threads of the session; 0 means the number of CPUs available to the agent.
    pub intra_op_threads: u32,
    /// Graph optimization level.
    pub graph_optimization: GraphOptimization,
    /// Execution provider, e.g. "cpu" or "cuda"; empty means "cpu".
    pub execution_provider: String,
    /// Exact number of timed queries to run; 0 when the run is bounded by duration instead.
    pub iterations: u64,
    /// Length of the timed phase in milliseconds when iterations is 0.
    pub duration_ms: u64,
    /// Untimed queries before the timed phase.
    pub warmup_iterations: u64,
    /// Seed for random inputs and arrival schedules.
    pub seed: u64,
    /// Concrete shapes for inputs with symbolic dimensions beyond the batch dimension.
    pub shapes: Vec<InputShape>,
    /// sha256 of an uploaded .npz that maps input names to arrays; empty for random inputs.
    pub input_data_sha256: String,
    /// Length of one telemetry window in milliseconds.
    pub window_ms: u32,
    /// Minimum queries in one telemetry window.
    pub window_min_queries: u32,
    /// Load pattern.
    pub scenario: Scenario,
    /// Concurrent sessions issuing queries (offline, server, max-qps); 0 means 1.
    pub concurrency: u32,
    /// Target queries per second (server scenario).
    pub target_qps: f64,
    /// Latency bound in milliseconds (server pass/fail and max-QPS search).
    pub latency_bound_ms: f64,
    /// Minimum duration of the timed phase in milliseconds for a VALID run.
    pub min_duration_ms: u64,
    /// Minimum number of timed queries for a VALID run.
    pub min_queries: u64,
    /// Maximum duration of the timed phase in milliseconds; a run still going then is stopped.
    pub max_duration_ms: u64,
    /// Stop once the run is VALID and the last windows are stable (only when iterations is 0).
    pub early_stop: bool,
    /// Stability threshold: max/min over the last `stability_windows` windows must be <= this.
    pub stability_ratio: f64,
    /// Number of trailing windows the stability rule looks at.
    pub stability_windows: u32,
    /// Most queries outstanding at once in the server scenario; queries beyond it are dropped.
    pub max_outstanding: u32,
    /// Skip the untimed accuracy pass over the eval set.
    pub skip_accuracy: bool,
    /// Resource sampling period in milliseconds.
    pub sample_ms: u32,
    /// Parameters of the generate scenario; None for the other scenarios.
    pub generate: Option<GenerateConfig>,
}

/// Values to sweep; every combination becomes its own task. Empty lists mean "the base value only".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sweep {
    /// Batch sizes.
    pub batch_sizes: Vec<u32>,
    /// Concurrent sessions.
    pub concurrency: Vec<u32>,
    /// Intra-op thread counts (0 = all CPUs of the agent).
    pub intra_op_threads: Vec<u32>,
    /// Graph optimization levels.
    pub graph_optimizations: Vec<GraphOptimization>,
    /// Execution providers, e.g. "cpu", "cuda".
    pub execution_providers: Vec<String>,
}

/// What to benchmark, where and how.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobSpec {
    /// Model name.
    pub model: String,
    /// Variant names; empty or ["all"] for every variant of the model.
    pub variants: Vec<String>,
    /// Label selector: an agent matches when it has every key with the given value.
    pub selector: Labels,
    /// Base run configuration.
    pub config: RunConfig,
    /// Values to sweep over the base configuration.
    pub sweep: Sweep,
    /// Free-form job name for people.
    pub name: String,
}

/// An accelerator visible to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Accelerator {
    /// Kind of accelerator, e.g. "nvidia-gpu".
    pub kind: String,
    /// Product name, e.g. "NVIDIA H200".
    pub name: String,
    /// Device memory in bytes, 0 when unknown.
    pub memory_bytes: u64,
}

/// What an agent knows about the machine it runs on and the runtime it loaded.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Inventory {
    /// Host name as the OS reports it (shown, not part of the platform fingerprint).
    pub hostname: String,
    /// Identifier of the host; agents that share one never run benchmarks at the same time.
    pub host_id: String,
    /// Operating system name.
    pub os_name: String,
    /// Operating system version.
    pub os_version: String,
    /// Kernel version.
    pub kernel_version: String,
    /// CPU architecture.
    pub arch: String,
    /// CPU brand string.
    pub cpu_brand: String,
    /// Physical cores of the host.
    pub physical_cores: u32,
    /// Logical CPUs of the host.
    pub logical_cores: u32,
    /// Logical CPUs this agent may use, sorted.
    pub cpu_set: Vec<u32>,
    /// Total memory of the host in bytes.
    pub memory_bytes: u64,
    /// ONNX Runtime version string of the loaded library.
    pub ort_version: String,
    /// Execution providers the loaded ONNX Runtime library offers.
    pub execution_providers: Vec<String>,
    /// Accelerators found on the host.
    pub accelerators: Vec<Accelerator>,
    /// Version of fleetbench-agent.
    pub agent_version: String,
    /// ONNX Runtime build information string.
    pub ort_build_info: String,
}

/// Latency statistics read from an HDR histogram, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencyStats {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 97th percentile.
    pub p97_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Standard deviation.
    pub stddev_ms: f64,
    /// Minimum.
    pub min_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// 95 % confidence interval of the median, lower bound.
    pub p50_ci_low_ms: f64,
    /// 95 % confidence interval of the median, upper bound.
    pub p50_ci_high_ms: f64,
    /// 95 % confidence interval of the 99th percentile, lower bound.
    pub p99_ci_low_ms: f64,
    /// 95 % confidence interval of the 99th percentile, upper bound.
    pub p99_ci_high_ms: f64,
    /// 95 % confidence interval of the 90th percentile, lower bound (0 when stored before it was kept).
    pub p90_ci_low_ms: f64,
    /// 95 % confidence interval of the 90th percentile, upper bound.
    pub p90_ci_high_ms: f64,
    /// 95 % confidence interval of the 95th percentile, lower bound.
    pub p95_ci_low_ms: f64,
    /// 95 % confidence interval of the 95th percentile, upper bound.
    pub p95_ci_high_ms: f64,
}

/// Shape of one tensor input or output of a model, as declared in the graph.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TensorInfo {
    /// Name of the graph input or output.
    pub name: String,
    /// ONNX element type name, e.g. "float32", "int64".
    pub element_type: String,
    /// Dimensions; -1 for a symbolic or unknown dimension.
    pub dims: Vec<i64>,
    /// Symbolic dimension names, same length as dims; empty where fixed or unnamed.
    pub dim_names: Vec<String>,
}
