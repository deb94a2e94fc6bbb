//! Durable state of the coordinator behind one [`Store`] trait. Everything the scheduler needs to resume
//! after a restart (jobs, tasks, leases, runs, windows) lives here, never only in memory.
//!
//! The seam speaks the coordinator's domain types ([`crate::domain`]), never protobuf, and is cut by
//! aggregate: [`BlobStore`], [`VariantStore`], [`AgentStore`], [`JobStore`], [`LeaseStore`] and
//! [`TelemetryStore`]; [`Store`] is all of them. One SQL body ([`sql::SqlStore`]) serves both backends
//! through sqlx's `Any` driver; what differs per backend (connection setup, pragmas, migrations, the
//! concurrency-safe lease statement) lives in [`sqlite`] and [`postgres`].

pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use fleetbench_common::labels::Labels;

pub use sql::BLOB_CHUNK_BYTES;

use fleetbench_common::artifact::ArtifactSet;

use crate::domain::{
    Inventory, JobSpec, JobSummary, RunConfig, RunSummary, TaskInfo, Variant, Window,
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
    /// The agent's latest network measurements, one per target.
    pub network: Vec<fleetbench_common::network::NetworkPath>,
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
    /// The coordinator replica that leases (and will renew) it.
    pub replica: String,
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
    /// Not stored: its run is leased to another agent than the one that sent it.
    Foreign,
    /// Not stored: the database refused it for good.
    Refused,
}

impl WindowOutcome {
    /// The outcome's name, as metrics label it.
    pub fn as_str(&self) -> &'static str {
        match self {
            WindowOutcome::Stored => "stored",
            WindowOutcome::Duplicate => "duplicate",
            WindowOutcome::Inactive => "inactive",
            WindowOutcome::Foreign => "foreign",
            WindowOutcome::Refused => "refused",
        }
    }
}

/// What became of a batch of windows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredWindows {
    /// One outcome per window, in order.
    pub outcomes: Vec<WindowOutcome>,
    /// The jobs whose runs got new windows (for their watchers).
    pub jobs: Vec<String>,
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
    pub windows: Vec<Window>,
    /// Start, Unix ms.
    pub started_at: i64,
}

/// What a run's metrics are labelled with.
#[derive(Debug, Clone, PartialEq)]
pub struct RunLabels {
    /// Model name.
    pub model: String,
    /// Variant name.
    pub variant: String,
    /// Platform name.
    pub platform: String,
    /// Agent name.
    pub agent: String,
    /// Scenario, as jobs name it.
    pub scenario: String,
    /// The configuration label `jobs show` prints.
    pub config: String,
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
    /// Configuration label, as shown.
    pub config_key: String,
    /// Pooling key: runs with the same platform, variant and key pool in rankings.
    pub pool_key: String,
}

impl FinishedRun {
    /// A run that ends as failed with `error`.
    pub fn failed(run_id: &str, error: String) -> Self {
        FinishedRun {
            run_id: run_id.to_string(),
            state: RunState::Failed,
            summary: None,
            histogram: Vec::new(),
            error,
            config_key: String::new(),
            pool_key: String::new(),
        }
    }
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
    /// Configuration label, as shown.
    pub config_key: String,
    /// Pooling key (see `crate::pooling`).
    pub pool_key: String,
    /// Summary.
    pub summary: RunSummary,
    /// Merged latency histogram, V2-encoded.
    pub histogram: Vec<u8>,
}

/// An upload in progress: one client's resumable upload of one artifact set.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// Id (derived from the owner and the set's hash, so the same client resumes the same upload).
    pub id: String,
    /// Who started it.
    pub owner: String,
    /// The set's hash.
    pub set_sha256: String,
    /// The set.
    pub set: ArtifactSet,
    /// Start, Unix ms.
    pub created_at: i64,
    /// Last activity, Unix ms.
    pub updated_at: i64,
}

/// What a deletion removed (or would remove).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deletion {
    /// Variants, as MODEL/VARIANT.
    pub variants: Vec<String>,
    /// Runs deleted with them.
    pub runs: u64,
    /// Jobs left without tasks, deleted too.
    pub jobs: u64,
    /// Bytes of blobs collected.
    pub bytes_freed: u64,
}

/// A heartbeat to record.
#[derive(Debug, Clone)]
pub struct HeartbeatRecord {
    /// Agent id.
    pub agent_id: String,
    /// The run the agent says it is executing, if any.
    pub run_id: Option<String>,
}

/// Content-addressed blobs: model files, eval sets, input data, set manifests. Where the bytes live is
/// the backend's business: files under the data directory (SQLite) or chunks in the database
/// (Postgres, so replicas share them). Bytes arrive through a *stage*: a named, resumable partial blob
/// that becomes a blob, under the hash its writer checked, only when committed.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Size of a stored blob.
    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>>;
    /// Up to `max_len` bytes of a blob from `offset` (fewer at its end, none past it).
    async fn read_blob(&self, sha256: &str, offset: u64, max_len: usize) -> Result<Vec<u8>>;
    /// Bytes staged under `stage` that can be continued from: a multiple of [`BLOB_CHUNK_BYTES`]
    /// (a stage cut in the middle of a chunk continues from the chunk's start).
    async fn staged_len(&self, stage: &str) -> Result<u64>;
    /// Up to `max_len` staged bytes from `offset`.
    async fn read_staged(&self, stage: &str, offset: u64, max_len: usize) -> Result<Vec<u8>>;
    /// Writes one chunk at `offset`, which must be a multiple of [`BLOB_CHUNK_BYTES`] no larger than
    /// what is staged; anything staged after it is dropped. A chunk is [`BLOB_CHUNK_BYTES`] long except
    /// the last of a blob.
    async fn stage_chunk(&self, stage: &str, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes the staged bytes (`size` of them, hashed by the caller to `sha256`) the blob `sha256`,
    /// durably, and drops the stage. A blob already stored under that hash stays as it is.
    async fn commit_staged(&self, stage: &str, sha256: &str, size: u64) -> Result<()>;
    /// Drops a stage and its bytes (nothing when there is none).
    async fn discard_staged(&self, stage: &str) -> Result<()>;
    /// Bytes free where blobs are written, when the backend can tell (SQLite's data directory).
    fn free_bytes(&self) -> Option<u64>;
    /// Stores a small blob whole (idempotent by hash).
    async fn put_blob(&self, sha256: &str, data: &[u8]) -> Result<()> {
        let stage = format!("put-{}", uuid::Uuid::new_v4().simple());
        let mut offset = 0usize;
        for chunk in data.chunks(BLOB_CHUNK_BYTES) {
            self.stage_chunk(&stage, offset as u64, chunk).await?;
            offset += chunk.len();
        }
        if data.is_empty() {
            self.stage_chunk(&stage, 0, &[]).await?;
        }
        self.commit_staged(&stage, sha256, data.len() as u64).await
    }
}

/// Artifact sets and the uploads that bring them.
#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// Records a set whose files (and, for several files, whose manifest blob) are stored (idempotent).
    async fn put_set(&self, sha256: &str, set: &ArtifactSet, now: i64) -> Result<()>;
    /// A stored set.
    async fn get_set(&self, sha256: &str) -> Result<Option<ArtifactSet>>;
    /// Records an upload, or touches the one with its id; returns what is stored.
    async fn put_upload(&self, upload: &Upload) -> Result<Upload>;
    /// One upload.
    async fn get_upload(&self, id: &str) -> Result<Option<Upload>>;
    /// Forgets an upload (its stages are the caller's to drop).
    async fn delete_upload(&self, id: &str) -> Result<()>;
    /// Uploads not touched since `before` (Unix ms).
    async fn stale_uploads(&self, before: i64) -> Result<Vec<Upload>>;
}

/// Models and their variants.
#[async_trait]
pub trait VariantStore: Send + Sync {
    /// Stores a variant; refuses a different artifact under an existing (model, variant).
    async fn insert_variant(&self, v: &Variant) -> Result<VariantInsert>;
    /// Variants of one model, or of all when `model` is None, oldest first.
    async fn list_variants(&self, model: Option<&str>) -> Result<Vec<Variant>>;
    /// Deletes variants of a model with their tasks, runs and windows, in one transaction, then the
    /// blobs nothing references any more. Refused (nothing changes) while a queued or running job has
    /// a task on one of them. With `dry_run`, only counts.
    async fn delete_variants(
        &self,
        model: &str,
        variants: &[String],
        dry_run: bool,
    ) -> Result<Deletion>;
}

/// Platforms and agents.
#[async_trait]
pub trait AgentStore: Send + Sync {
    /// Records a platform (idempotent).
    async fn upsert_platform(&self, id: &str, name: &str, descriptor: &Inventory) -> Result<()>;
    /// Registers an agent; returns its id.
    async fn register_agent(&self, reg: &AgentRegistration, now: i64) -> Result<String>;
    /// One agent.
    async fn get_agent(&self, agent_id: &str) -> Result<Option<AgentRecord>>;
    /// All agents by name.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Marks an agent's session open or closed.
    async fn set_connected(&self, agent_id: &str, connected: bool, now: i64) -> Result<()>;
    /// Replaces the agent's network measurements with its latest report.
    async fn set_network(
        &self,
        agent_id: &str,
        paths: &[fleetbench_common::network::NetworkPath],
    ) -> Result<()>;
}

/// Jobs and their tasks.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Creates a job and its tasks in one transaction.
    async fn create_job(&self, job: &NewJob, now: i64) -> Result<()>;
    /// Full job id from an id or unique prefix.
    async fn resolve_job_id(&self, id_or_prefix: &str) -> Result<String>;
    /// Jobs, newest first.
    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobSummary>>;
    /// Tasks of all jobs, counted by state.
    async fn task_counts(&self) -> Result<Vec<(String, u64)>>;
    /// One job's summary and spec.
    async fn get_job(&self, job_id: &str) -> Result<(JobSummary, JobSpec)>;
    /// A job's tasks with progress and finished runs.
    async fn job_tasks(&self, job_id: &str) -> Result<Vec<TaskInfo>>;
    /// Cancels a job; returns (run id, agent id) of runs that were executing.
    async fn cancel_job(&self, job_id: &str, now: i64) -> Result<Vec<(String, String)>>;
    /// Deletes a finished job with its tasks, runs and windows in one transaction; returns how many
    /// runs went. A queued or running job is refused.
    async fn delete_job(&self, job_id: &str) -> Result<u64>;
}

/// Leases: which agent runs which task, kept alive by heartbeats.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Leases the next eligible task to an agent, if any, creating its run.
    async fn lease_task(&self, req: &LeaseRequest, now: i64) -> Result<Option<Lease>>;
    /// The run an agent holds a live lease on, if any.
    async fn active_run_of_agent(&self, agent_id: &str) -> Result<Option<String>>;
    /// The lease of the task an agent is running, if any.
    async fn active_lease_of_agent(&self, agent_id: &str) -> Result<Option<Lease>>;
    /// Records that `replica` reached the database at `now`, and when it last had trouble with it.
    async fn replica_seen(&self, replica: &str, now: i64, trouble_at: i64) -> Result<()>;
    /// Puts tasks whose lease ran out back in the queue (or fails them after `max_attempts`). A lease
    /// last renewed by another replica expires only when that replica has reached the database since
    /// it ran out and has been healthy for `lease_timeout_ms`, or has been gone for three lease
    /// timeouts: a replica cut off from the database keeps its agents' leases.
    async fn expire_leases(
        &self,
        now: i64,
        max_attempts: u32,
        replica: &str,
        lease_timeout_ms: i64,
    ) -> Result<Vec<ExpiredLease>>;
    /// Releases one running run at once, as if its lease had expired (its agent lost it, e.g. by
    /// restarting); returns what happened, or None when the run was not running. With
    /// `refund_attempt` the attempt does not count (the task never reached its agent, or its agent was
    /// stopped by its operator): the task goes back to the queue with the attempt it had before.
    async fn release_run(
        &self,
        run_id: &str,
        reason: &str,
        now: i64,
        max_attempts: u32,
        refund_attempt: bool,
    ) -> Result<Option<ExpiredLease>>;
    /// Records heartbeats and extends the leases of the runs they name until `lease_until`.
    /// Returns, per heartbeat, whether its run is still active (None when it names no run).
    async fn heartbeats(
        &self,
        beats: &[HeartbeatRecord],
        now: i64,
        lease_until: i64,
        replica: &str,
    ) -> Result<Vec<Option<bool>>>;
}

/// Telemetry windows and finished runs.
#[async_trait]
pub trait TelemetryStore: Send + Sync {
    /// Stores windows, each with the id of the agent that sent it, in one transaction. A window is
    /// stored only when its run is running and leased to that agent.
    async fn store_windows(&self, windows: &[(String, Window)], now: i64) -> Result<StoredWindows>;
    /// What a result needs to be summarised; None when the run is unknown.
    async fn run_context(&self, run_id: &str) -> Result<Option<RunContext>>;
    /// What a run's metrics are labelled with; None for an unknown run.
    async fn run_labels(&self, run_id: &str) -> Result<Option<RunLabels>>;
    /// Stores a run's final state, and updates its task and job.
    async fn finish_run(&self, run: &FinishedRun, now: i64) -> Result<()>;
    /// Successful runs of a model (optionally of one job).
    async fn runs_for_model(&self, model: &str, job_id: Option<&str>) -> Result<Vec<StoredRun>>;
    /// Drops up to `limit` raw windows of runs that finished before `finished_before` (Unix ms); run
    /// summaries and histograms stay. Returns how many went.
    async fn drop_windows(&self, finished_before: i64, limit: u32) -> Result<u64>;
    /// Windows stored for a run.
    async fn window_count(&self, run_id: &str) -> Result<u64>;
    /// Claims background work `name` for `holder` until `until` (Unix ms) unless another holder's
    /// claim is still current: one replica at a time does it.
    async fn claim(&self, name: &str, holder: &str, now: i64, until: i64) -> Result<bool>;
}

/// A stored token: an API token, a join token or an agent's credential (see [`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenRecord {
    /// Id, the middle part of the token.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// viewer, submitter, admin, agent-join or agent.
    pub role: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// For an agent's credential, its agent.
    pub agent_id: String,
    /// For a join token, joins left; -1: no limit.
    pub uses_left: i64,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; 0: never.
    pub expires_at: i64,
    /// Unix ms; 0: not revoked.
    pub revoked_at: i64,
    /// Unix ms; 0: never (written at most once a minute).
    pub last_used_at: i64,
    /// For an agent's credential being renewed, the hex SHA-256 of the new secret it was offered;
    /// empty otherwise.
    pub next_secret_sha256: String,
}

/// Tokens and credentials.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync {
    /// Adds a token; ALREADY_EXISTS when its name is taken.
    async fn insert_token(&self, t: &TokenRecord) -> Result<()>;
    /// A token by id.
    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>>;
    /// A token by name.
    async fn token_by_name(&self, name: &str) -> Result<Option<TokenRecord>>;
    /// Every token, by name.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Marks a token revoked (kept for the record).
    async fn revoke_token(&self, id: &str, now: i64) -> Result<()>;
    /// Replaces a token's secret hash (rotation).
    async fn set_token_secret(&self, id: &str, secret_sha256: &str) -> Result<()>;
    /// Records a use; with `consume`, takes one of a join token's uses, false when none is left.
    async fn use_token(&self, id: &str, now: i64, consume: bool) -> Result<bool>;
    /// Stores an agent's new credential in place of any earlier one.
    async fn replace_agent_credential(&self, t: &TokenRecord) -> Result<()>;
    /// Offers a token a new secret (by hash), which works alongside the current one until used.
    async fn offer_token_secret(&self, id: &str, next_sha256: &str) -> Result<()>;
    /// Makes the offered secret `next_sha256` the token's only one, valid until `expires_at`; false
    /// when it is no longer the one on offer, or the token was revoked or had expired by `now`.
    async fn promote_token_secret(
        &self,
        id: &str,
        next_sha256: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool>;
    /// Revokes an agent's credentials; returns how many.
    async fn revoke_agent_credentials(&self, agent_id: &str, now: i64) -> Result<u64>;
}

/// Durable state of the coordinator: every aggregate.
#[async_trait::async_trait]
pub trait Store:
    BlobStore
    + ArtifactStore
    + VariantStore
    + AgentStore
    + JobStore
    + LeaseStore
    + TelemetryStore
    + TokenStore
    + 'static
{
    /// Backend name: "sqlite" or "postgres".
    fn backend(&self) -> &'static str;
    /// Asks the database for nothing, to learn that it answers (health checks).
    async fn ping(&self) -> Result<()>;
}

/// Opens the store named by a database URL (`sqlite://...` or `postgres://...`), creating the SQLite
/// file when missing, and applies migrations. SQLite's blob files live beside the database file.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, None).await
}

/// [`open`], with SQLite's blob files under `data_dir` (Postgres keeps blobs in the database).
pub async fn open_with(url: &str, data_dir: Option<&std::path::Path>) -> Result<Arc<dyn Store>> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "sqlite" => Ok(Arc::new(sqlite::open(url, data_dir).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(postgres::open(url).await?)),
        _ => Err(Error::InvalidArgument(format!(
            "database URL '{}' must start with sqlite:// or postgres://",
            redact_url(url)
        ))),
    }
}

/// A database URL without its password, for messages and logs (the one redaction, shared with the
/// tools and tests).
pub fn redact_url(url: &str) -> String {
    fleetbench_common::redact::url(url)
}
