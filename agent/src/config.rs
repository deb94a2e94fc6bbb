//! Agent configuration, layered: defaults, then a TOML file, then `FLEETBENCH_*` environment variables,
//! then command-line flags; then [`AgentConfig::validate`].

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use fleetbench_common::labels::{Labels, parse_labels};
use fleetbench_common::network::{self, ProbeTarget};
use fleetbench_common::token::{JoinToken, Secret};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// Settings of one agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Coordinator addresses, tried in turn, e.g. `http://127.0.0.1:7700`.
    pub coordinator: Vec<String>,
    /// Agent name, unique in the fleet; defaults to the host name.
    pub name: String,
    /// Labels, `key=value`.
    pub labels: Vec<String>,
    /// CPUs to pin the agent to, e.g. `0` or `0-3`; empty for all CPUs it may use.
    pub cpus: String,
    /// Directory for the agent id and the artifact cache.
    pub state_dir: PathBuf,
    /// ONNX Runtime library; empty to use ORT_DYLIB_PATH.
    pub ort_lib: PathBuf,
    /// Host id override (agents with the same host id never run at the same time); empty: /etc/machine-id.
    pub host_id: String,
    /// Longest wait between reconnection attempts, milliseconds.
    pub max_backoff_ms: u64,
    /// Size budget of the artifact cache, bytes; the least recently used artifacts are evicted to stay
    /// under it (never those of a running task). 0: no budget, only the free disk limits the cache.
    pub cache_max_bytes: u64,
    /// The coordinator's CA certificate (PEM file; `ca.pem` in its data directory), which https://
    /// addresses are verified against.
    pub ca_cert: PathBuf,
    /// Join token (`fbjoin1:...`, from `fleetbench-coordinator init` or `fleetbench admin tokens
    /// create --role agent-join`), used once: the coordinator gives the agent a credential of its own,
    /// kept in the state directory (mode 0600) and used from then on.
    pub join_token: Secret,
    /// Probe targets, `NAME=HOST:PORT` of a TCP echo (`fleetbench-agent probe-server`, or any echo):
    /// the agent measures its path to each, and `fleetbench rank --client NAME` ranks by it.
    pub probe: Vec<String>,
    /// Bytes of each throughput probe (each way). Small by default, for edge links; on fast links a
    /// larger probe reads throughput more truly.
    pub network_probe_bytes: u64,
    /// Round trips timed per target.
    pub network_probe_samples: u32,
    /// Seconds between measurements of the network paths, taken only between tasks (never during
    /// one); the first when the agent registers. 0: never measure.
    pub network_probe_interval_s: u64,
    /// Put ONNX Runtime's memory (the loaded weights) on transparent huge pages where the kernel has
    /// them, once a generate task's sessions are loaded (`fleetbench_runtime::memory`): decoding a large model
    /// runs several percent faster. Every run's record says what was in effect. false: small pages for
    /// the whole agent process, even where the kernel's mode is `always` (`PR_SET_THP_DISABLE`).
    pub huge_pages: bool,
}

/// Settings of the agent's network measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSettings {
    /// Operator-named targets.
    pub targets: Vec<ProbeTarget>,
    /// Bytes of each throughput probe.
    pub probe_bytes: u64,
    /// Round trips timed per target.
    pub samples: u32,
    /// Time between measurements; None: never measure.
    pub interval: Option<std::time::Duration>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            coordinator: vec!["http://127.0.0.1:7700".into()],
            name: sysinfo::System::host_name().unwrap_or_else(|| "agent".into()),
            labels: Vec::new(),
            cpus: String::new(),
            state_dir: PathBuf::from("./fleetbench-agent"),
            ort_lib: PathBuf::new(),
            host_id: String::new(),
            max_backoff_ms: 10_000,
            cache_max_bytes: 0,
            ca_cert: PathBuf::new(),
            join_token: Secret::default(),
            probe: Vec::new(),
            network_probe_bytes: 32 * 1024,
            network_probe_samples: 5,
            network_probe_interval_s: 600,
            huge_pages: true,
        }
    }
}

/// Environment keys read (FLEETBENCH_ + upper case).
const ENV_KEYS: [&str; 14] = [
    "coordinator",
    "name",
    "cpus",
    "state_dir",
    "ort_lib",
    "host_id",
    "max_backoff_ms",
    "cache_max_bytes",
    "ca_cert",
    "join_token",
    "network_probe_bytes",
    "network_probe_samples",
    "network_probe_interval_s",
    "huge_pages",
];

impl AgentConfig {
    /// Layers defaults, `file`, `FLEETBENCH_*` variables and `overrides`, then validates.
    pub fn load<T: Serialize>(file: Option<&Path>, overrides: &T) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(AgentConfig::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(AgentError::Config(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        let mut cfg: AgentConfig = fig
            .merge(Env::prefixed("FLEETBENCH_").only(&ENV_KEYS).split("__"))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| AgentError::Config(format!("configuration: {e}")))?;
        cfg.coordinator = cfg
            .coordinator
            .iter()
            .flat_map(|c| c.split(',').map(|s| s.trim().to_string()))
            .filter(|s| !s.is_empty())
            .collect();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.coordinator.is_empty() {
            return Err(AgentError::Config(
                "coordinator: at least one coordinator address is needed".into(),
            ));
        }
        let tls = self
            .coordinator
            .iter()
            .filter(|c| c.starts_with("https://"))
            .count();
        if tls > 0 && tls < self.coordinator.len() {
            return Err(AgentError::Config(format!(
                "coordinator: {} mixes https:// and http:// addresses; replicas of one fleet are \
                 reached the same way, and an agent that verifies one must not talk in clear to another",
                self.coordinator.join(", ")
            )));
        }
        for c in &self.coordinator {
            if !(c.starts_with("http://") || c.starts_with("https://")) {
                return Err(AgentError::Config(format!(
                    "coordinator: '{c}' must start with http:// or https://"
                )));
            }
            let pinned = self.join()?.is_some_and(|j| !j.ca_sha256.is_empty())
                || crate::uplink::pinned_ca_file(&self.state_dir).exists();
            if c.starts_with("https://") && self.ca_cert.as_os_str().is_empty() && !pinned {
                return Err(AgentError::Config(format!(
                    "ca_cert: '{c}' is served with TLS; give the coordinator's CA certificate \
                     (--ca-cert, or FLEETBENCH_CA_CERT; ca.pem in its data directory), or a join \
                     token that pins it (fbjoin1:<CA SHA-256>:...)"
                )));
            }
        }
        let ca = self.ca_pem()?;
        if let (Some(join), Some(pem)) = (self.join()?, &ca) {
            let have = fleetbench_common::token::ca_fingerprint(pem)
                .map_err(|e| AgentError::Config(format!("ca_cert: {e}")))?;
            if !join.ca_sha256.is_empty() && have != join.ca_sha256 {
                return Err(AgentError::Config(format!(
                    "join_token: it pins the CA certificate with SHA-256 {}, but ca_cert {} has \
                     {have}: one of the two belongs to another coordinator",
                    join.ca_sha256,
                    self.ca_cert.display()
                )));
            }
        }
        if self.name.trim().is_empty() {
            return Err(AgentError::Config("name: must not be empty".into()));
        }
        self.labels()?;
        self.cpu_list()?;
        self.network()?;
        Ok(())
    }

    /// The network measurement settings, checked.
    pub fn network(&self) -> Result<NetworkSettings> {
        let mut targets: Vec<ProbeTarget> = Vec::new();
        for p in &self.probe {
            let t: ProbeTarget = p
                .parse()
                .map_err(|e| AgentError::Config(format!("probe: {e}")))?;
            if targets.iter().any(|o| o.name == t.name) {
                return Err(AgentError::Config(format!(
                    "probe: target '{}' is named twice",
                    t.name
                )));
            }
            targets.push(t);
        }
        if targets.len() >= network::MAX_PATHS {
            return Err(AgentError::Config(format!(
                "probe: {} targets; at most {}",
                targets.len(),
                network::MAX_PATHS - 1
            )));
        }
        if !(1..=network::MAX_PROBE_BYTES).contains(&self.network_probe_bytes) {
            return Err(AgentError::Config(format!(
                "network_probe_bytes: {} is out of range (1 to {})",
                self.network_probe_bytes,
                network::MAX_PROBE_BYTES
            )));
        }
        if !(1..=100).contains(&self.network_probe_samples) {
            return Err(AgentError::Config(format!(
                "network_probe_samples: {} is out of range (1 to 100)",
                self.network_probe_samples
            )));
        }
        Ok(NetworkSettings {
            targets,
            probe_bytes: self.network_probe_bytes,
            samples: self.network_probe_samples,
            interval: (self.network_probe_interval_s > 0)
                .then(|| std::time::Duration::from_secs(self.network_probe_interval_s)),
        })
    }

    /// The parsed join token, when one is set.
    pub fn join(&self) -> Result<Option<JoinToken>> {
        if self.join_token.is_empty() {
            return Ok(None);
        }
        JoinToken::parse(self.join_token.expose())
            .map(Some)
            .map_err(|e| AgentError::Config(format!("join_token: {e}")))
    }

    /// The CA certificate's text, when one is set.
    pub fn ca_pem(&self) -> Result<Option<String>> {
        if self.ca_cert.as_os_str().is_empty() {
            return Ok(None);
        }
        fleetbench_proto::connect::read_ca(&self.ca_cert)
            .map(Some)
            .map_err(|e| AgentError::Config(format!("ca_cert: {e}")))
    }

    /// Parsed labels.
    pub fn labels(&self) -> Result<Labels> {
        parse_labels(&self.labels).map_err(|e| AgentError::Config(format!("label: {e}")))
    }

    /// Parsed CPU list; None when not pinned.
    pub fn cpu_list(&self) -> Result<Option<Vec<u32>>> {
        if self.cpus.trim().is_empty() {
            return Ok(None);
        }
        crate::inventory::parse_cpu_list(&self.cpus)
            .map(Some)
            .map_err(AgentError::Config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_reached_in_clear_and_over_tls_at_once_are_refused() {
        let config = AgentConfig {
            coordinator: vec![
                "https://a.example.net:7700".into(),
                "http://b.example.net:7700".into(),
            ],
            ca_cert: "/etc/fleetbench/ca.pem".into(),
            ..Default::default()
        };
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("mixes https:// and http://"), "{e}");
    }

    #[test]
    fn probe_settings_are_checked_and_name_the_setting() {
        let ok = AgentConfig {
            probe: vec!["office=10.0.0.5:7701".into()],
            ..Default::default()
        };
        let n = ok.network().unwrap();
        assert_eq!(n.targets[0].name, "office");
        assert_eq!(n.interval, Some(std::time::Duration::from_secs(600)));
        for (config, says) in [
            (
                AgentConfig {
                    probe: vec!["a=h:1".into(), "a=h:2".into()],
                    ..Default::default()
                },
                "probe: target 'a' is named twice",
            ),
            (
                AgentConfig {
                    probe: vec!["office".into()],
                    ..Default::default()
                },
                "probe: 'office' is not NAME=HOST:PORT",
            ),
            (
                AgentConfig {
                    network_probe_bytes: 0,
                    ..Default::default()
                },
                "network_probe_bytes: 0 is out of range",
            ),
            (
                AgentConfig {
                    network_probe_samples: 0,
                    ..Default::default()
                },
                "network_probe_samples: 0",
            ),
        ] {
            let e = config.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let off = AgentConfig {
            network_probe_interval_s: 0,
            ..Default::default()
        };
        assert_eq!(off.network().unwrap().interval, None);
    }
}
