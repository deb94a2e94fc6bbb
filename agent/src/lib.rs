//! The fleetbench agent: reports its machine and runtime, runs assigned model variants with ONNX
//! Runtime, and streams telemetry to its coordinator.
//!
//! Layout: [`uplink`] (connection, reconnect, acks), [`runner`] (ort sessions, scenarios, accuracy),
//! [`sampler`] (resource telemetry), [`inventory`] (host and runtime fingerprint), [`cache`]
//! (artifacts), [`config`]. Loading ONNX Runtime and building inputs live in `fleetbench-runtime`.

pub mod cache;
pub mod config;
pub mod error;
pub mod gpu;
pub mod inventory;
pub mod netprobe;
pub mod runner;
pub mod sampler;
pub mod spans;
pub mod uplink;

use std::sync::Arc;
use std::time::Duration;

pub use config::AgentConfig;
pub use error::{AgentError, Result};

/// Loads ONNX Runtime, collects the inventory and serves until `shutdown` fires. Pinning (`--cpus`)
/// is done by the binary before any thread starts; here the CPU list is only reported and used for
/// thread counts.
pub async fn run(config: AgentConfig, shutdown: tokio::sync::watch::Receiver<bool>) -> Result<()> {
    if !config.huge_pages
        && let Err(e) = fleetbench_runtime::memory::keep_small_pages()
    {
        tracing::warn!(error = %e, "Cannot keep this process off huge pages.");
    }
    let runtime = fleetbench_runtime::load(Some(&config.ort_lib))?;
    tracing::info!(version = %runtime.version, providers = ?runtime.providers, library = %runtime.path.display(), "ONNX Runtime loaded.");
    let runner = Arc::new(runner::OrtRunner {
        runtime,
        huge_pages: config.huge_pages,
    });
    run_with_runner(config, runner, runtime, Arc::default(), shutdown).await
}

/// As [`run`], with a given runner (tests use this to slow a runner down on purpose) and counters of
/// the link's activity.
pub async fn run_with_runner(
    config: AgentConfig,
    runner: Arc<dyn runner::ModelRunner>,
    runtime: &fleetbench_runtime::Runtime,
    stats: Arc<uplink::UplinkStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let cpus = match config.cpu_list()? {
        Some(list) => list,
        None => inventory::affinity(),
    };
    let host_override = (!config.host_id.is_empty()).then_some(config.host_id.as_str());
    let identity = uplink::Identity {
        name: config.name.clone(),
        labels: config.labels()?,
        inventory: inventory::collect(runtime, &cpus, host_override),
        state_dir: config.state_dir.clone(),
        cache_max_bytes: config.cache_max_bytes,
        ca_pem: config.ca_pem()?,
        join_token: config.join()?,
        network: config.network()?,
    };
    uplink::run(
        config.coordinator.clone(),
        identity,
        runner,
        Duration::from_millis(config.max_backoff_ms),
        stats,
        shutdown,
    )
    .await
}
