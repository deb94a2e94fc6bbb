//! Durable state of the coordinator behind one [`Store`] trait. Everything the scheduler needs to resume
//! after a restart (jobs, tasks, leases, runs, windows) lives here, never only in memory.
//!
//! One SQL body ([`sql::SqlStore`]) serves both backends through sqlx's `Any` driver with `$N`
//! placeholders, which SQLite and Postgres both accept; what differs per backend (connection setup,
//! pragmas, migrations, the concurrency-safe lease statement) lives in [`sqlite`] and [`postgres`].

pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use fleetbench_common::labels::Labels;
use fleetbench_proto::v1::{
    Inventory, JobSpec, JobSummary, ModelVariant, RunConfig, RunSummary, TaskInfo, TelemetryWindow,
};

use crate::error::{Error, Result};

/// Outcome of registering a variant.
#[derive(Debug, Clone, PartialEq)]
pub enum VariantInsert {
    /// Stored as new.
    Created,
    /// The same (model, variant) with the same artifact was already stored; nothing changed.
    Unchanged,
}

/// An agent's registration.
#[derive(Debug, Clone)]
pub struct AgentRegistration {
    /// Id from an earlier registration, if the agent has one.
    pub agent_id: Option<String>,
    /// Operator-given name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// Inventory.
    pub inventory: Inventory,
    /// Platform fingerprint.
    pub platform_id: String,
    /// Readable platform name.
    pub platform_name: String,
    /// An agent seen after this time (Unix ms) with an open session counts as online, and its name
    /// cannot be taken over by another registration.
    pub alive_since: i64,
}

/// A registered agent as stored.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// Agent id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Platform id.
    pub platform_id: String,
    /// Readable platform name.
    pub platform_name: String,
    /// Host id.
    pub host_id: String,
    /// Labels.
    pub labels: Labels,
    /// Inventory.
    pub inventory: Inventory,
    /// Whether a session is open (as last recorded).
    pub connected: bool,
    /// Last heartbeat, Unix ms.
    pub last_seen_at: i64,
    /// Task running on the agent, if any.
    pub current_task_id: Option<String>,
}

/// A task to create.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Task id.
    pub id: String,
    /// Position in the job.
    pub seq: i64,
    /// Variant name.
    pub variant: String,
    /// Platform of the target agent.
    pub platform_id: String,
    /// Host of the target agent.
    pub host_id: String,
    /// Agent the task was expanded for.
    pub target_agent_id: String,
    /// Configuration.
    pub config: RunConfig,
}

/// A job to create with its tasks.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Job id.
    pub id: String,
    /// The spec as submitted.
    pub spec: JobSpec,
    /// Its tasks.
    pub tasks: Vec<NewTask>,
}

/// Who asks for a lease.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// Agent id.
    pub agent_id: String,
    /// Its platform.
    pub platform_id: String,
    /// Its host.
    pub host_id: String,
    /// Run id to give the new attempt.
    pub run_id: String,
    /// Lease end, Unix ms.
    pub lease_until: i64,
    /// Agents not seen since this time (Unix ms) count as gone, so their tasks may go to a peer.
    pub alive_since: i64,
}

/// A task leased to an agent.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Task id.
    pub task_id: String,
    /// Run id of this attempt.
    pub run_id: String,
    /// Job id.
    pub job_id: String,
    /// Attempt number (1 for the first).
    pub attempt: u32,
    /// Model name.
    pub model: String,
    /// Variant name.
    pub variant: String,
    /// Configuration.
    pub config: RunConfig,
}

/// A lease that ran out.
#[derive(Debug, Clone)]
pub struct ExpiredLease {
    /// Task id.
    pub task_id: String,
    /// Run that was abandoned.
    pub run_id: String,
    /// Agent that held it.
    pub agent_id: String,
    /// True when the task went back to the queue, false when it failed for good.
    pub requeued: bool,
}

/// What happened to one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowOutcome {
    /// Stored now.
    Stored,
    /// Already stored earlier (a resend); nothing changed.
    Duplicate,
    /// Not stored: its run is not active any more.
    Inactive,
}

/// What a finished run needs from the store to be summarised.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Run state (running, succeeded, ...).
    pub state: String,
    /// Task id.
    pub task_id: String,
    /// Job id.
    pub job_id: String,
    /// Agent id.
    pub agent_id: String,
    /// Agent name.
    pub agent_name: String,
    /// Agent labels (for cost).
    pub agent_labels: Labels,
    /// Platform id.
    pub platform_id: String,
    /// Variant.
    pub variant: String,
    /// Task configuration.
    pub config: RunConfig,
    /// Stored windows in sequence order.
    pub windows: Vec<TelemetryWindow>,
    /// Start, Unix ms.
    pub started_at: i64,
}

/// Final state of a run, computed by the ingest path.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    /// Run id.
    pub run_id: String,
    /// succeeded, failed or cancelled.
    pub state: RunState,
    /// Summary (for succeeded runs).
    pub summary: Option<RunSummary>,
    /// Merged latency histogram, V2-encoded.
    pub histogram: Vec<u8>,
    /// Failure reason.
    pub error: String,
    /// Config label used to group runs in rankings.
    pub config_key: String,
}

/// Terminal states of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Completed; the summary is valid data (VALID or INVALID by its rules).
    Succeeded,
    /// The agent could not run it.
    Failed,
    /// Stopped by a cancellation.
    Cancelled,
}

impl RunState {
    /// Name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }
}

/// A stored, successful run with what rankings need.
#[derive(Debug, Clone)]
pub struct StoredRun {
    /// Run id.
    pub run_id: String,
    /// Job id.
    pub job_id: String,
    /// Platform id.
    pub platform_id: String,
    /// Readable platform name.
    pub platform_name: String,
    /// Variant.
    pub variant: String,
    /// Config label.
    pub config_key: String,
    /// Summary.
    pub summary: RunSummary,
    /// Merged latency histogram, V2-encoded.
    pub histogram: Vec<u8>,
}

/// A heartbeat to record.
#[derive(Debug, Clone)]
pub struct HeartbeatRecord {
    /// Agent id.
    pub agent_id: String,
    /// The run the agent says it is executing, if any.
    pub run_id: Option<String>,
}

/// Durable state of the coordinator.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name: "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    /// Stores a blob (idempotent by hash).
    async fn put_blob(&self, sha256: &str, data: &[u8]) -> Result<()>;
    /// Size and chunk count of a blob, if stored.
    async fn blob_meta(&self, sha256: &str) -> Result<Option<(u64, u64)>>;
    /// One chunk of a blob.
    async fn blob_chunk(&self, sha256: &str, idx: u64) -> Result<Vec<u8>>;

    /// Stores a variant; refuses a different artifact under an existing (model, variant).
    async fn insert_variant(&self, v: &ModelVariant) -> Result<VariantInsert>;
    /// Variants of one model, or of all when `model` is None, oldest first.
    async fn list_variants(&self, model: Option<&str>) -> Result<Vec<ModelVariant>>;

    /// Records a platform (idempotent).
    async fn upsert_platform(&self, id: &str, name: &str, descriptor: &[u8]) -> Result<()>;
    /// Registers an agent; returns its id.
    async fn register_agent(&self, reg: &AgentRegistration, now: i64) -> Result<String>;
    /// One agent.
    async fn get_agent(&self, agent_id: &str) -> Result<Option<AgentRecord>>;
    /// All agents by name.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Marks an agent's session open or closed.
    async fn set_connected(&self, agent_id: &str, connected: bool, now: i64) -> Result<()>;
    /// Records heartbeats and extends the leases of the runs they name until `lease_until`.
    /// Returns, per heartbeat, whether its run is still active (None when it names no run).
    async fn heartbeats(
        &self,
        beats: &[HeartbeatRecord],
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<Option<bool>>>;

    /// Creates a job and its tasks in one transaction.
    async fn create_job(&self, job: &NewJob, now: i64) -> Result<()>;
    /// Full job id from an id or unique prefix.
    async fn resolve_job_id(&self, id_or_prefix: &str) -> Result<String>;
    /// Jobs, newest first.
    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobSummary>>;
    /// One job's summary and spec.
    async fn get_job(&self, job_id: &str) -> Result<(JobSummary, JobSpec)>;
    /// A job's tasks with progress and finished runs.
    async fn job_tasks(&self, job_id: &str) -> Result<Vec<TaskInfo>>;
    /// Cancels a job; returns (run id, agent id) of runs that were executing.
    async fn cancel_job(&self, job_id: &str, now: i64) -> Result<Vec<(String, String)>>;

    /// Leases the next eligible task to an agent, if any, creating its run.
    async fn lease_task(&self, req: &LeaseRequest, now: i64) -> Result<Option<Lease>>;
    /// The run an agent holds a live lease on, if any.
    async fn active_run_of_agent(&self, agent_id: &str) -> Result<Option<String>>;
    /// Puts tasks whose lease ran out back in the queue (or fails them after `max_attempts`).
    async fn expire_leases(&self, now: i64, max_attempts: u32) -> Result<Vec<ExpiredLease>>;
    /// Releases one running run at once, as if its lease had expired (its agent lost it, e.g. by
    /// restarting); returns what happened, or None when the run was not running.
    async fn release_run(
        &self,
        run_id: &str,
        reason: &str,
        now: i64,
        max_attempts: u32,
    ) -> Result<Option<ExpiredLease>>;

    /// Stores windows in one transaction.
    async fn store_windows(
        &self,
        windows: &[TelemetryWindow],
        now: i64,
    ) -> Result<Vec<WindowOutcome>>;
    /// What a result needs to be summarised; None when the run is unknown.
    async fn run_context(&self, run_id: &str) -> Result<Option<RunContext>>;
    /// Stores a run's final state, and updates its task and job.
    async fn finish_run(&self, run: &FinishedRun, now: i64) -> Result<()>;
    /// Successful runs of a model (optionally of one job).
    async fn runs_for_model(&self, model: &str, job_id: Option<&str>) -> Result<Vec<StoredRun>>;
}

/// Opens the store named by a database URL (`sqlite://...` or `postgres://...`), creating the SQLite
/// file when missing, and applies migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "sqlite" => Ok(Arc::new(sqlite::open(url).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(postgres::open(url).await?)),
        _ => Err(Error::InvalidArgument(format!(
            "database URL '{}' must start with sqlite:// or postgres://",
            redact_url(url)
        ))),
    }
}

/// A database URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://bob:s3cret@db:5432/fleet"),
            "postgres://bob:***@db:5432/fleet"
        );
        assert_eq!(
            super::redact_url("postgres://bob@db/fleet"),
            "postgres://bob@db/fleet"
        );
        assert_eq!(
            super::redact_url("sqlite://./fleet.db"),
            "sqlite://./fleet.db"
        );
    }
}
