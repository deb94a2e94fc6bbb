//! `fleetbench-agent`: the daemon that runs on each fleet machine.

use std::path::PathBuf;

use clap::Parser;
use fleetbench_agent::{AgentConfig, inventory};
use serde::Serialize;

/// Runs assigned model variants with ONNX Runtime and streams telemetry to a coordinator.
///
/// Settings come from defaults, then --config FILE (TOML), then FLEETBENCH_* variables, then flags.
#[derive(Debug, Parser, Serialize)]
#[command(name = "fleetbench-agent", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Log lines as text (the default) or json (one object per line, with the span fields).
    #[arg(long, env = "FLEETBENCH_LOG_FORMAT", default_value = "text")]
    #[serde(skip)]
    log_format: fleetbench_common::logging::LogFormat,
    /// Coordinator address; repeat (or separate with commas) to give replicas to fail over to.
    #[arg(long, env = "FLEETBENCH_COORDINATOR", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    coordinator: Vec<String>,
    /// Agent name, unique in the fleet (default: host name).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// Label key=value; repeatable (e.g. --label tier=edge --label cost_per_hour=0.05).
    #[arg(long = "label")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    labels: Vec<String>,
    /// Pin the agent to these CPUs, e.g. 0 or 0-3 or 0,2.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cpus: Option<String>,
    /// Directory for the agent id and the artifact cache.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
    /// ONNX Runtime library (default: $ORT_DYLIB_PATH).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ort_lib: Option<PathBuf>,
    /// Host id override (agents sharing one never run at the same time).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    host_id: Option<String>,
    /// Size budget of the artifact cache in bytes; least recently used artifacts are evicted to stay
    /// under it, never those of a running task (default 0: only the free disk limits it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_max_bytes: Option<u64>,
    /// The coordinator's CA certificate (PEM; ca.pem in its data directory), for https:// addresses.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_cert: Option<PathBuf>,
    /// Join token (`fleetbench-coordinator init` prints one), used once to get this agent's own
    /// credential. Prefer FLEETBENCH_JOIN_TOKEN or the config file: a flag shows in `ps`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    join_token: Option<String>,
    /// Probe target NAME=HOST:PORT, a TCP echo (`fleetbench-agent probe-server` or any echo) where
    /// users of the fleet are; repeatable. The agent measures its path to each, and to its
    /// coordinator, between tasks; `fleetbench rank --client NAME` ranks by it.
    #[arg(long = "probe")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    probe: Vec<String>,
    /// Bytes of each throughput probe, each way (default 32768; small for edge links).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    network_probe_bytes: Option<u64>,
    /// Round trips timed per target (default 5).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    network_probe_samples: Option<u32>,
    /// Seconds between network measurements, taken only between tasks (default 600; 0: never).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    network_probe_interval_s: Option<u64>,
    /// Put ONNX Runtime's memory (the loaded weights) on transparent huge pages for generate tasks,
    /// where the kernel has them (default true). false: small pages for the whole agent, even where
    /// the kernel's mode is `always`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    huge_pages: Option<bool>,
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
}

/// Other things the binary does.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Serve a TCP echo for other agents' network probes (`--probe NAME=HOST:PORT`); prints the
    /// address it listens on, then echoes every connection's bytes back until stopped.
    ProbeServer {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "0.0.0.0:7701")]
        listen: String,
        /// Most connections served at once; more are closed at once.
        #[arg(long, default_value_t = 64)]
        max_connections: usize,
    },
}

fn probe_server(listen: &str, max_connections: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("listen: cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr()?;
        // The first line of output is the address, for scripts that asked for port 0.
        println!("listening on {addr}");
        tracing::info!(%addr, "Serving TCP echo for network probes.");
        tokio::select! {
            r = fleetbench_agent::netprobe::serve_echo(listener, max_connections) => r?,
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fleetbench_common::logging::init(args.log_format, "info,ort=warn,h2=warn");
    if let Some(Command::ProbeServer {
        listen,
        max_connections,
    }) = &args.command
    {
        return probe_server(listen, *max_connections);
    }
    let config = AgentConfig::load(args.config.as_deref(), &args)?;
    // Pin before any thread starts, so the runtime's threads and ONNX Runtime's pools inherit the mask.
    if let Some(cpus) = config.cpu_list()? {
        let allowed = inventory::affinity();
        if let Some(bad) = cpus.iter().find(|c| !allowed.contains(c)) {
            anyhow::bail!(
                "cpus: CPU {bad} is not available to this process (it may use {allowed:?})"
            );
        }
        inventory::pin_process(&cpus)
            .map_err(|e| anyhow::anyhow!("cpus: cannot pin to {cpus:?}: {e}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(true);
        });
        fleetbench_agent::run(config, rx).await
    })?;
    Ok(())
}
