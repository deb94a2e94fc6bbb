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
    /// Folder for what is not in the database: on SQLite, blob files (models, eval sets) and uploads in
    /// progress. Empty: the SQLite file's folder. Postgres keeps blobs in the database (replicas share
    /// them) and ignores it.
    pub data_dir: String,
    /// Largest upload accepted, bytes: a whole artifact set (a model and its external data) or one
    /// blob. The default, 256 GiB, fits a 120-billion-parameter model in fp16; the disk is the real
    /// limit, and an upload that would not fit in the data directory's free space is refused at its
    /// start. (`max_blob_bytes`, its former name, is read too.)
    #[serde(alias = "max_blob_bytes")]
    pub max_upload_bytes: u64,
    /// An upload not continued for this long is collected with its partial bytes, hours.
    pub upload_expiry_hours: u64,
    /// Raw telemetry windows of runs finished longer ago than this are dropped, days; run summaries and
    /// histograms stay, so rankings do not change. 0 keeps them for ever.
    pub window_retention_days: u64,
    /// How often the scheduler looks for work and expired leases even without events, milliseconds.
    pub scheduler_tick_ms: u64,
    /// Most windows written in one database transaction.
    pub ingest_batch: usize,
    /// How long the ingest writer waits for more windows before writing a batch, milliseconds.
    pub ingest_linger_ms: u64,
    /// OTLP collector to export metrics and traces to, e.g. `http://collector:4318` (http/protobuf)
    /// or `http://collector:4317` (gRPC): the base address, without `/v1/metrics`. Empty: the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (and `_METRICS_` / `_TRACES_` variants) when set, else no export.
    pub otlp_endpoint: String,
    /// OTLP transport: `http/protobuf` or `grpc`. Empty: `OTEL_EXPORTER_OTLP_PROTOCOL`, else
    /// `http/protobuf`.
    pub otlp_protocol: String,
    /// How often metrics are exported over OTLP, milliseconds.
    pub otlp_interval_ms: u64,
    /// How long one OTLP export may take before it is abandoned (a collector that hangs), milliseconds.
    /// Metrics are cumulative, so the next export carries what an abandoned one held.
    pub otlp_timeout_ms: u64,
    /// Address to serve Prometheus `/metrics` on, e.g. `127.0.0.1:9464` (port 0 picks one). Empty:
    /// not served.
    pub metrics_listen: String,
    /// File to write the bound `/metrics` address to (useful with port 0).
    pub metrics_addr_file: String,
    /// Most distinct configuration labels on window metrics; runs beyond it are labelled `other`, so a
    /// sweep of many configurations cannot grow the metric series without bound.
    pub metrics_max_configs: usize,
    /// How often fleet gauges (agents online, tasks by state) are read from the database, milliseconds.
    pub metrics_refresh_ms: u64,
    /// File to write the bound address to once listening (useful with port 0).
    pub addr_file: String,
    /// Server certificate (PEM) to serve TLS with, from a CA of your own; with `tls_key`. Empty: the
    /// certificate `fleetbench-coordinator init` made in the data directory, if there is one.
    pub tls_cert: String,
    /// The server certificate's private key (PEM).
    pub tls_key: String,
    /// How often the coordinator looks at its certificate files, milliseconds: a changed file (a
    /// certificate your own tooling renewed) is served from the next connection on, and a certificate
    /// `init` made is renewed from the CA when less than a third of its validity is left. No restart.
    pub tls_reload_interval_ms: u64,
    /// How long an agent's credential is valid, milliseconds (0: until revoked). An agent registering
    /// in the second half of that time is given a new one, and an agent whose session outlives that
    /// half is asked to reconnect for it: agents renew without a new join.
    pub agent_credential_ttl_ms: u64,
    /// Serve without TLS on an address other machines can reach. Without it, the coordinator refuses
    /// to start on a non-loopback address unless it has a certificate. Only on a network you trust.
    pub insecure: bool,
    /// Most concurrent streams (sessions) one run may ask for.
    pub max_concurrency: u32,
    /// Largest batch size.
    pub max_batch_size: u32,
    /// Most timed queries one run may ask for (`iterations`, `min_queries`).
    pub max_iterations: u64,
    /// Longest timed phase a run may ask for, milliseconds (`duration`, `min_duration`, `max_duration`).
    pub max_run_duration_ms: u64,
    /// Most untimed warm-up queries.
    pub max_warmup_iterations: u64,
    /// Highest target QPS of the server scenario.
    pub max_target_qps: f64,
    /// Largest outstanding-query cap of the server scenario (`max_outstanding`).
    pub max_queries_outstanding: u32,
    /// Most values one input tensor of one query may hold (batch times the other dimensions).
    pub max_input_elements: u64,
    /// Submit and push requests (submit, start an upload, upload a blob, register a variant) one token
    /// may make per second, with bursts of twice that; 0: no limit. Counted per coordinator process.
    pub max_requests_per_second_per_token: u32,
    /// Uploads one token may stream at once; 0: no limit. Counted per coordinator process.
    pub max_uploads_per_token: u32,
    /// HTTP/2 keepalive: how often the server pings a quiet connection, milliseconds.
    pub keepalive_interval_ms: u64,
    /// HTTP/2 keepalive: how long a ping may go unanswered before the connection (and its session) is
    /// closed, milliseconds. Half-open connections end this way instead of holding leases.
    pub keepalive_timeout_ms: u64,
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
            data_dir: String::new(),
            max_upload_bytes: 256 << 30,
            upload_expiry_hours: 24,
            window_retention_days: 0,
            scheduler_tick_ms: 500,
            ingest_batch: 1024,
            ingest_linger_ms: 5,
            otlp_endpoint: String::new(),
            otlp_protocol: String::new(),
            otlp_interval_ms: 10_000,
            otlp_timeout_ms: 10_000,
            metrics_listen: String::new(),
            metrics_addr_file: String::new(),
            metrics_max_configs: 100,
            metrics_refresh_ms: 5_000,
            addr_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_reload_interval_ms: 60_000,
            agent_credential_ttl_ms: 30 * 24 * 3600 * 1000,
            insecure: false,
            max_concurrency: 256,
            max_batch_size: 4096,
            max_iterations: 100_000_000,
            max_run_duration_ms: 24 * 3600 * 1000,
            max_warmup_iterations: 1_000_000,
            max_target_qps: 1_000_000.0,
            max_queries_outstanding: 1_000_000,
            max_input_elements: 1 << 28,
            max_requests_per_second_per_token: 20,
            max_uploads_per_token: 16,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 20_000,
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
        if self.agent_credential_ttl_ms != 0 && self.agent_credential_ttl_ms < 10_000 {
            return Err(Error::InvalidArgument(format!(
                "agent_credential_ttl_ms: {} is too short for agents to reconnect and renew in time; \
                 give at least 10000, or 0 for credentials that last until revoked",
                self.agent_credential_ttl_ms
            )));
        }
        if self.keepalive_interval_ms == 0 || self.keepalive_timeout_ms == 0 {
            return Err(Error::InvalidArgument(
                "keepalive_interval_ms, keepalive_timeout_ms: must be > 0".into(),
            ));
        }
        if self.upload_expiry_hours == 0 {
            return Err(Error::InvalidArgument(
                "upload_expiry_hours: must be > 0".into(),
            ));
        }
        if self.ingest_batch == 0 {
            return Err(Error::InvalidArgument("ingest_batch: must be > 0".into()));
        }
        crate::otel::OtlpSettings::from_config(self)?;
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(Error::InvalidArgument(format!(
                "metrics_listen: '{}' is not an IP:port address",
                self.metrics_listen
            )));
        }
        if self.otlp_interval_ms == 0 || self.otlp_timeout_ms == 0 || self.metrics_refresh_ms == 0 {
            return Err(Error::InvalidArgument(
                "otlp_interval_ms, otlp_timeout_ms, metrics_refresh_ms: must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Environment keys read (FLEETBENCH_ + upper case); others, such as FLEETBENCH_COORDINATOR for the CLI,
/// belong to other programs.
const ENV_KEYS: [&str; 40] = [
    "listen",
    "database",
    "heartbeat_interval_ms",
    "lease_timeout_ms",
    "max_attempts",
    "max_tasks_per_job",
    "data_dir",
    "max_upload_bytes",
    "max_blob_bytes",
    "upload_expiry_hours",
    "window_retention_days",
    "scheduler_tick_ms",
    "ingest_batch",
    "ingest_linger_ms",
    "otlp_endpoint",
    "otlp_protocol",
    "otlp_interval_ms",
    "otlp_timeout_ms",
    "metrics_listen",
    "metrics_addr_file",
    "metrics_max_configs",
    "metrics_refresh_ms",
    "addr_file",
    "tls_cert",
    "tls_key",
    "tls_reload_interval_ms",
    "agent_credential_ttl_ms",
    "insecure",
    "max_concurrency",
    "max_batch_size",
    "max_iterations",
    "max_run_duration_ms",
    "max_warmup_iterations",
    "max_target_qps",
    "max_queries_outstanding",
    "max_input_elements",
    "max_requests_per_second_per_token",
    "max_uploads_per_token",
    "keepalive_interval_ms",
    "keepalive_timeout_ms",
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
