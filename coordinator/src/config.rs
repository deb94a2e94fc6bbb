//! Coordinator configuration, layered: defaults, then a TOML file, then `FLEETBENCH_*` environment
//! variables, then command-line flags; then [`CoordinatorConfig::validate`].

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Settings of one coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on, e.g. `127.0.0.1:7700` (port 0 picks a free port).
    pub listen: String,
    /// Database URL: `sqlite://PATH` or `postgres://USER@HOST/DB`.
    pub database: String,
    /// How often agents send heartbeats, milliseconds.
    pub heartbeat_interval_ms: u32,
    /// A running task whose agent has not been heard from for this long goes back to the queue.
    pub lease_timeout_ms: u64,
    /// Attempts per task before it fails for good.
    pub max_attempts: u32,
    /// Most tasks one job may expand into.
    pub max_tasks_per_job: usize,
    /// Largest blob (model, eval set) accepted, bytes.
    pub max_blob_bytes: u64,
    /// How often the scheduler looks for work and expired leases even without events, milliseconds.
    pub scheduler_tick_ms: u64,
    /// Most windows written in one database transaction.
    pub ingest_batch: usize,
    /// How long the ingest writer waits for more windows before writing a batch, milliseconds.
    pub ingest_linger_ms: u64,
    /// OTLP/gRPC endpoint to export metrics to, e.g. `http://127.0.0.1:4317`; empty to disable.
    pub otlp_endpoint: String,
    /// File to write the bound address to once listening (useful with port 0).
    pub addr_file: String,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".into(),
            database: "sqlite://./fleetbench.db".into(),
            heartbeat_interval_ms: 1000,
            lease_timeout_ms: 15_000,
            max_attempts: 3,
            max_tasks_per_job: fleetbench_common::config::DEFAULT_MAX_TASKS,
            max_blob_bytes: 2 << 30,
            scheduler_tick_ms: 500,
            ingest_batch: 1024,
            ingest_linger_ms: 5,
            otlp_endpoint: String::new(),
            addr_file: String::new(),
        }
    }
}

impl CoordinatorConfig {
    /// Layers defaults, `file` (when given), `FLEETBENCH_*` variables and `overrides` (flags; None fields
    /// are skipped), then validates.
    pub fn load<T: Serialize>(file: Option<&Path>, overrides: &T) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(CoordinatorConfig::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(Error::InvalidArgument(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        let cfg: CoordinatorConfig = fig
            .merge(Env::prefixed("FLEETBENCH_").only(&ENV_KEYS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| Error::InvalidArgument(format!("configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that would make the coordinator misbehave.
    pub fn validate(&self) -> Result<()> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::InvalidArgument(format!(
                "listen: '{}' is not an IP:port address",
                self.listen
            )));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(Error::InvalidArgument(
                "heartbeat_interval_ms: must be > 0".into(),
            ));
        }
        if self.lease_timeout_ms < 2 * self.heartbeat_interval_ms as u64 {
            return Err(Error::InvalidArgument(format!(
                "lease_timeout_ms: must be at least twice heartbeat_interval_ms ({} < 2 x {})",
                self.lease_timeout_ms, self.heartbeat_interval_ms
            )));
        }
        if self.max_attempts == 0 {
            return Err(Error::InvalidArgument("max_attempts: must be > 0".into()));
        }
        if self.max_tasks_per_job == 0 {
            return Err(Error::InvalidArgument(
                "max_tasks_per_job: must be > 0".into(),
            ));
        }
        if self.ingest_batch == 0 {
            return Err(Error::InvalidArgument("ingest_batch: must be > 0".into()));
        }
        Ok(())
    }
}

/// Environment keys read (FLEETBENCH_ + upper case); others, such as FLEETBENCH_COORDINATOR for the CLI,
/// belong to other programs.
const ENV_KEYS: [&str; 12] = [
    "listen",
    "database",
    "heartbeat_interval_ms",
    "lease_timeout_ms",
    "max_attempts",
    "max_tasks_per_job",
    "max_blob_bytes",
    "scheduler_tick_ms",
    "ingest_batch",
    "ingest_linger_ms",
    "otlp_endpoint",
    "addr_file",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        lease_timeout_ms: Option<u64>,
    }

    #[test]
    fn layers_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lease_timeout_ms = 9000\nmax_attempts = 5\n").unwrap();
        let cfg = CoordinatorConfig::load(Some(&file), &Flags::default()).unwrap();
        assert_eq!((cfg.lease_timeout_ms, cfg.max_attempts), (9000, 5));
        let cfg = CoordinatorConfig::load(
            Some(&file),
            &Flags {
                lease_timeout_ms: Some(4000),
            },
        )
        .unwrap();
        assert_eq!((cfg.lease_timeout_ms, cfg.max_attempts), (4000, 5));
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = CoordinatorConfig::load(
            None,
            &Flags {
                lease_timeout_ms: Some(10),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("lease_timeout_ms"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lease_timout_ms = 9000\n").unwrap();
        let err = CoordinatorConfig::load(Some(&file), &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("lease_timout_ms"), "{err}");
    }
}
