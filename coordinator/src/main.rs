//! `fleetbench-coordinator`: the daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fleetbench_coordinator::CoordinatorConfig;
use serde::Serialize;

/// Accepts models and jobs, leases tasks to agents, stores telemetry, ranks platforms.
///
/// Settings come from defaults, then --config FILE (TOML), then FLEETBENCH_* variables, then flags.
#[derive(Debug, Parser, Serialize)]
#[command(name = "fleetbench-coordinator", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7700 (port 0 picks a free one).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    /// Heartbeat interval agents must keep, milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval_ms: Option<u32>,
    /// Silence after which a running task returns to the queue, milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_timeout_ms: Option<u64>,
    /// Attempts per task before it fails.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    /// Most tasks one job may expand into.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tasks_per_job: Option<usize>,
    /// OTLP/gRPC endpoint for metrics, e.g. http://127.0.0.1:4317.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    addr_file: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,h2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = CoordinatorConfig::load(args.config.as_deref(), &args)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    fleetbench_coordinator::serve(config, listener, shutdown).await?;
    Ok(())
}
