//! The SQL shared by both backends, on sqlx's `Any` driver. Placeholders are `$N`, types are TEXT,
//! BIGINT, DOUBLE PRECISION and BLOB/BYTEA, and aggregates are cast to BIGINT, so each statement means
//! the same on SQLite and Postgres. Protobuf messages are stored encoded in BLOB columns.

use async_trait::async_trait;
use fleetbench_common::labels::Labels;
use fleetbench_proto::v1::{
    Inventory, JobSpec, JobSummary, ModelVariant, RunConfig, RunSummary, TaskInfo, TelemetryWindow,
};
use prost::Message;
use sqlx::AnyPool;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{
    AgentRecord, AgentRegistration, ExpiredLease, FinishedRun, HeartbeatRecord, Lease,
    LeaseRequest, NewJob, RunContext, Store, StoredRun, VariantInsert, WindowOutcome,
};
use crate::error::{Error, Result};

/// Size of one stored blob chunk.
pub const BLOB_CHUNK_BYTES: usize = 1 << 20;

/// Most rows in one multi-row INSERT (SQLite allows 32766 bound values).
const ROWS_PER_INSERT: usize = 400;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one writer at a time; statements are atomic on their own.
    Sqlite,
    /// Postgres: concurrent writers; leases use row locks and a per-host advisory lock.
    Postgres,
}

/// The store over either backend.
pub struct SqlStore {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// Serialises writers in this process (SQLite).
    pub(crate) write_lock: Option<tokio::sync::Mutex<()>>,
}

pub(crate) fn enc<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

pub(crate) fn dec<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    Ok(M::decode(bytes)?)
}

fn labels_from_json(s: &str) -> Result<Labels> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("agent labels: {e}")))
}

impl Backend {
    /// A parenthesised list of `n` placeholders, the first being parameter `first`. SQLite gets
    /// positional `?` (its lookup of numbered parameters by name is linear, which makes binding a
    /// statement with thousands of `$N` quadratic); Postgres gets `$N`.
    fn placeholders(self, first: usize, n: usize) -> String {
        let items: Vec<String> = match self {
            Backend::Sqlite => vec!["?".to_string(); n],
            Backend::Postgres => (first..first + n).map(|i| format!("${i}")).collect(),
        };
        format!("({})", items.join(", "))
    }

    /// Parameter number `n` written as this backend takes it in a statement whose other parameters
    /// are all positional too.
    fn param(self, n: usize) -> String {
        match self {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${n}"),
        }
    }
}

const JOB_SUMMARY_SELECT: &str = "SELECT j.id, j.model, j.name, j.state, j.created_at, j.finished_at, \
     CAST(COUNT(t.id) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN t.state = 'pending' THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN t.state = 'running' THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN t.state = 'succeeded' THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN t.state = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN t.state = 'cancelled' THEN 1 ELSE 0 END), 0) AS BIGINT) \
     FROM jobs j LEFT JOIN tasks t ON t.job_id = j.id";

fn job_summary(row: &AnyRow) -> Result<JobSummary> {
    Ok(JobSummary {
        job_id: row.try_get(0)?,
        model: row.try_get(1)?,
        name: row.try_get(2)?,
        state: row.try_get(3)?,
        created_at_ms: row.try_get(4)?,
        finished_at_ms: row.try_get(5)?,
        tasks_total: row.try_get::<i64, _>(6)? as u32,
        tasks_pending: row.try_get::<i64, _>(7)? as u32,
        tasks_running: row.try_get::<i64, _>(8)? as u32,
        tasks_succeeded: row.try_get::<i64, _>(9)? as u32,
        tasks_failed: row.try_get::<i64, _>(10)? as u32,
        tasks_cancelled: row.try_get::<i64, _>(11)? as u32,
    })
}

const AGENT_SELECT: &str = "SELECT a.id, a.name, a.platform_id, COALESCE(p.name, ''), a.host_id, a.labels_json, \
     a.inventory, a.connected, a.last_seen_at, \
     COALESCE((SELECT t.id FROM tasks t WHERE t.agent_id = a.id AND t.state = 'running' LIMIT 1), '') \
     FROM agents a LEFT JOIN platforms p ON p.id = a.platform_id";

fn agent_record(row: &AnyRow) -> Result<AgentRecord> {
    let current: String = row.try_get(9)?;
    Ok(AgentRecord {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        platform_id: row.try_get(2)?,
        platform_name: row.try_get(3)?,
        host_id: row.try_get(4)?,
        labels: labels_from_json(&row.try_get::<String, _>(5)?)?,
        inventory: dec::<Inventory>(&row.try_get::<Vec<u8>, _>(6)?)?,
        connected: row.try_get::<i64, _>(7)? != 0,
        last_seen_at: row.try_get(8)?,
        current_task_id: (!current.is_empty()).then_some(current),
    })
}

impl SqlStore {
    /// Takes the in-process writer lock (SQLite only): SQLite has one writer at a time, and queueing
    /// writers here, in order, beats its busy handler, which sleeps and polls with growing delays.
    pub(crate) async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }

    /// Starts a write transaction, holding the writer lock until the returned guard drops. On SQLite
    /// it also takes the database's write lock up front (BEGIN IMMEDIATE), so a transaction that reads
    /// before it writes never fails with SQLITE_BUSY.
    async fn begin(
        &self,
    ) -> Result<(
        Option<tokio::sync::MutexGuard<'_, ()>>,
        Transaction<'static, Any>,
    )> {
        let guard = self.writer().await;
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok((guard, tx))
    }

    /// Recomputes a job's state from its tasks (a cancelled job stays cancelled).
    async fn refresh_job(tx: &mut Transaction<'static, Any>, job_id: &str, now: i64) -> Result<()> {
        let row = sqlx::query(
            "SELECT j.state, \
             CAST(COALESCE(SUM(CASE WHEN t.state IN ('pending', 'running') THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.state = 'running' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.state = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.state IN ('succeeded', 'failed', 'cancelled') THEN 1 ELSE 0 END), 0) AS BIGINT) \
             FROM jobs j LEFT JOIN tasks t ON t.job_id = j.id WHERE j.id = $1 GROUP BY j.state",
        )
        .bind(job_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(()) };
        let state: String = row.try_get(0)?;
        if state == "cancelled" {
            return Ok(());
        }
        let open: i64 = row.try_get(1)?;
        let running: i64 = row.try_get(2)?;
        let failed: i64 = row.try_get(3)?;
        let done: i64 = row.try_get(4)?;
        let (new_state, finished) = if open == 0 {
            (if failed > 0 { "failed" } else { "succeeded" }, now)
        } else if running > 0 || done > 0 {
            ("running", 0)
        } else {
            ("queued", 0)
        };
        if new_state != state {
            sqlx::query("UPDATE jobs SET state = $1, finished_at = $2 WHERE id = $3")
                .bind(new_state)
                .bind(finished)
                .bind(job_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Ends a running run without a result: its task goes back to the queue, or fails after
    /// `max_attempts`, or is cancelled when its job was. With `only_expired`, a lease extended meanwhile
    /// is left alone.
    async fn release(
        &self,
        run_id: &str,
        reason: Option<&str>,
        now: i64,
        max_attempts: u32,
        only_expired: bool,
    ) -> Result<Option<ExpiredLease>> {
        let (_writer, mut tx) = self.begin().await?;
        let row = sqlx::query(
            "SELECT t.id, t.agent_id, t.attempt, t.job_id, j.state, COALESCE(a.name, ''), t.lease_expires_at \
             FROM tasks t JOIN jobs j ON j.id = t.job_id LEFT JOIN agents a ON a.id = t.agent_id \
             WHERE t.run_id = $1 AND t.state = 'running'",
        )
        .bind(run_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let task_id: String = row.try_get(0)?;
        let agent_id: String = row.try_get(1)?;
        let attempt = row.try_get::<i64, _>(2)? as u32;
        let job_id: String = row.try_get(3)?;
        let job_state: String = row.try_get(4)?;
        let agent_name: String = row.try_get(5)?;
        let lease_expires_at: i64 = row.try_get(6)?;
        if only_expired && lease_expires_at >= now {
            return Ok(None);
        }
        let (state, requeued) = if job_state == "cancelled" {
            ("cancelled", false)
        } else if attempt >= max_attempts {
            ("failed", false)
        } else {
            ("pending", true)
        };
        let reason = match reason {
            Some(r) => format!("{r} (attempt {attempt} of {max_attempts})"),
            None => format!(
                "lease expired: agent '{agent_name}' went silent (attempt {attempt} of {max_attempts})"
            ),
        };
        let (new_run_id, finished_at) = if requeued { ("", 0) } else { (run_id, now) };
        sqlx::query(
            "UPDATE tasks SET state = $1, error = $2, lease_expires_at = 0, run_id = $3, finished_at = $4 \
             WHERE id = $5 AND run_id = $6 AND state = 'running'",
        )
        .bind(state)
        .bind(&reason)
        .bind(new_run_id)
        .bind(finished_at)
        .bind(&task_id)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE runs SET state = 'abandoned', error = $1, finished_at = $2 WHERE id = $3 AND state = 'running'")
            .bind(&reason)
            .bind(now)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        Self::refresh_job(&mut tx, &job_id, now).await?;
        tx.commit().await?;
        Ok(Some(ExpiredLease {
            task_id,
            run_id: run_id.to_string(),
            agent_id,
            requeued,
        }))
    }

    async fn lease_statement(
        &self,
        tx: &mut Transaction<'static, Any>,
        req: &LeaseRequest,
    ) -> Result<Option<AnyRow>> {
        if self.backend == Backend::Postgres {
            // Serialize leases per host across replicas, so the one-task-per-host rule holds.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1)::BIGINT)")
                .bind(&req.host_id)
                .execute(&mut **tx)
                .await?;
        }
        let lock = if self.backend == Backend::Postgres {
            "FOR UPDATE OF t SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, agent_id = $1, run_id = $2, \
             lease_expires_at = $3, host_id = $5 \
             WHERE id = (SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job_id \
               WHERE t.state = 'pending' AND t.platform_id = $4 AND j.state IN ('queued', 'running') \
               AND (t.target_agent_id = $1 OR NOT EXISTS (SELECT 1 FROM agents a WHERE a.id = t.target_agent_id \
                    AND a.connected = 1 AND a.last_seen_at > $6)) \
               AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.state = 'running' AND r.host_id = $5) \
               ORDER BY CASE WHEN t.target_agent_id = $1 THEN 0 ELSE 1 END, j.created_at, t.seq \
               LIMIT 1 {lock}) \
             RETURNING id, job_id, attempt, model, variant, config"
        );
        Ok(sqlx::query(&sql)
            .bind(&req.agent_id)
            .bind(&req.run_id)
            .bind(req.lease_until)
            .bind(&req.platform_id)
            .bind(&req.host_id)
            .bind(req.alive_since)
            .fetch_optional(&mut **tx)
            .await?)
    }
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn put_blob(&self, sha256: &str, data: &[u8]) -> Result<()> {
        if self.blob_meta(sha256).await?.is_some() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[][..]]
        } else {
            data.chunks(BLOB_CHUNK_BYTES).collect()
        };
        let (_writer, mut tx) = self.begin().await?;
        for (i, chunk) in chunks.iter().enumerate() {
            sqlx::query("INSERT INTO blob_chunks (sha256, idx, data) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(sha256)
                .bind(i as i64)
                .bind(chunk.to_vec())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO blobs (sha256, size_bytes, chunk_count, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(sha256)
        .bind(data.len() as i64)
        .bind(chunks.len() as i64)
        .bind(fleetbench_common::now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn blob_meta(&self, sha256: &str) -> Result<Option<(u64, u64)>> {
        let row = sqlx::query("SELECT size_bytes, chunk_count FROM blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((
                r.try_get::<i64, _>(0)? as u64,
                r.try_get::<i64, _>(1)? as u64,
            )),
            None => None,
        })
    }

    async fn blob_chunk(&self, sha256: &str, idx: u64) -> Result<Vec<u8>> {
        let row = sqlx::query("SELECT data FROM blob_chunks WHERE sha256 = $1 AND idx = $2")
            .bind(sha256)
            .bind(idx as i64)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("blob {sha256} has no chunk {idx}")))?;
        Ok(row.try_get(0)?)
    }

    async fn insert_variant(&self, v: &ModelVariant) -> Result<VariantInsert> {
        let _writer = self.writer().await;
        let existing = sqlx::query(
            "SELECT artifact_sha256 FROM model_variants WHERE model = $1 AND variant = $2",
        )
        .bind(&v.model)
        .bind(&v.variant)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = existing {
            let sha: String = row.try_get(0)?;
            if sha == v.artifact_sha256 {
                return Ok(VariantInsert::Unchanged);
            }
            return Err(Error::AlreadyExists(format!(
                "variant '{}' of model '{}' already exists with another artifact (sha256 {}); \
                 push this file under a different --variant",
                v.variant,
                v.model,
                &sha[..12.min(sha.len())]
            )));
        }
        sqlx::query(
            "INSERT INTO model_variants (model, variant, artifact_sha256, size_bytes, variant_of, technique, \
             recipe_json, eval_inputs_sha256, eval_labels_sha256, info, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&v.model)
        .bind(&v.variant)
        .bind(&v.artifact_sha256)
        .bind(v.size_bytes as i64)
        .bind(&v.variant_of)
        .bind(&v.technique)
        .bind(&v.recipe_json)
        .bind(&v.eval_inputs_sha256)
        .bind(&v.eval_labels_sha256)
        .bind(enc(v))
        .bind(v.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => Error::AlreadyExists(format!(
                "variant '{}' of model '{}' was registered concurrently; retry",
                v.variant, v.model
            )),
            _ => Error::Database(e),
        })?;
        Ok(VariantInsert::Created)
    }

    async fn list_variants(&self, model: Option<&str>) -> Result<Vec<ModelVariant>> {
        let rows = match model {
            Some(m) => {
                sqlx::query(
                    "SELECT info FROM model_variants WHERE model = $1 ORDER BY created_at, variant",
                )
                .bind(m)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT info FROM model_variants ORDER BY model, created_at, variant")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| dec::<ModelVariant>(&r.try_get::<Vec<u8>, _>(0)?))
            .collect()
    }

    async fn upsert_platform(&self, id: &str, name: &str, descriptor: &[u8]) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query(
            "INSERT INTO platforms (id, name, descriptor, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        )
        .bind(id)
        .bind(name)
        .bind(descriptor.to_vec())
        .bind(fleetbench_common::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn register_agent(&self, reg: &AgentRegistration, now: i64) -> Result<String> {
        let (_writer, mut tx) = self.begin().await?;
        let by_name = sqlx::query("SELECT id, connected, last_seen_at FROM agents WHERE name = $1")
            .bind(&reg.name)
            .fetch_optional(&mut *tx)
            .await?;
        let by_id = match &reg.agent_id {
            Some(id) => {
                sqlx::query("SELECT id FROM agents WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            None => None,
        };
        let mut id = match (&reg.agent_id, by_id.is_some()) {
            (Some(id), true) => Some(id.clone()),
            _ => None,
        };
        if let Some(row) = by_name {
            let holder: String = row.try_get(0)?;
            let online =
                row.try_get::<i64, _>(1)? != 0 && row.try_get::<i64, _>(2)? > reg.alive_since;
            if id.as_deref() != Some(holder.as_str()) {
                if online {
                    return Err(Error::AlreadyExists(format!(
                        "agent name '{}' is in use by an online agent (id {holder}); start this agent with another --name",
                        reg.name
                    )));
                }
                match &id {
                    // This agent has its own id: the stale holder of the name steps aside.
                    Some(_) => {
                        sqlx::query("UPDATE agents SET name = $1 WHERE id = $2")
                            .bind(format!("{}~{}", reg.name, &holder[..8.min(holder.len())]))
                            .bind(&holder)
                            .execute(&mut *tx)
                            .await?;
                    }
                    // A fresh state directory under a known name: take over the old identity.
                    None => id = Some(holder),
                }
            }
        }
        let labels_json =
            serde_json::to_string(&reg.labels).map_err(|e| Error::Internal(e.to_string()))?;
        let inventory = enc(&reg.inventory);
        let id = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE agents SET name = $1, platform_id = $2, host_id = $3, labels_json = $4, inventory = $5, \
                     last_seen_at = $6 WHERE id = $7",
                )
                .bind(&reg.name)
                .bind(&reg.platform_id)
                .bind(&reg.inventory.host_id)
                .bind(&labels_json)
                .bind(inventory)
                .bind(now)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                id
            }
            None => {
                let id = reg
                    .agent_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                sqlx::query(
                    "INSERT INTO agents (id, name, platform_id, host_id, labels_json, inventory, connected, \
                     registered_at, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7)",
                )
                .bind(&id)
                .bind(&reg.name)
                .bind(&reg.platform_id)
                .bind(&reg.inventory.host_id)
                .bind(&labels_json)
                .bind(inventory)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                id
            }
        };
        tx.commit().await?;
        Ok(id)
    }

    async fn get_agent(&self, agent_id: &str) -> Result<Option<AgentRecord>> {
        let sql = format!("{AGENT_SELECT} WHERE a.id = $1");
        let row = sqlx::query(&sql)
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_record).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let sql = format!("{AGENT_SELECT} ORDER BY a.name");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(agent_record).collect()
    }

    async fn set_connected(&self, agent_id: &str, connected: bool, now: i64) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query("UPDATE agents SET connected = $1, last_seen_at = $2 WHERE id = $3")
            .bind(connected as i64)
            .bind(now)
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn heartbeats(
        &self,
        beats: &[HeartbeatRecord],
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<Option<bool>>> {
        // Two statements per batch, whatever its size: last-seen times, then leases of the runs named.
        let (_writer, mut tx) = self.begin().await?;
        let mut agents: Vec<&str> = beats.iter().map(|b| b.agent_id.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        for ids in agents.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "UPDATE agents SET last_seen_at = {}, connected = 1 WHERE id IN {}",
                self.backend.param(1),
                self.backend.placeholders(2, ids.len())
            );
            let mut q = sqlx::query(&sql).bind(now);
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(&mut *tx).await?;
        }
        let runs: Vec<&HeartbeatRecord> = beats.iter().filter(|b| b.run_id.is_some()).collect();
        let mut active = std::collections::HashSet::new();
        for chunk in runs.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| self.backend.placeholders(i * 2 + 2, 2))
                .collect();
            let sql = format!(
                "UPDATE tasks SET lease_expires_at = {} FROM (VALUES {}) AS v \
                 WHERE tasks.run_id = v.column1 AND tasks.agent_id = v.column2 AND tasks.state = 'running' \
                 AND (SELECT state FROM jobs WHERE jobs.id = tasks.job_id) <> 'cancelled' \
                 RETURNING tasks.run_id",
                self.backend.param(1),
                values.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(lease_until);
            for b in chunk {
                q = q
                    .bind(b.run_id.as_deref().unwrap_or_default())
                    .bind(b.agent_id.as_str());
            }
            for row in q.fetch_all(&mut *tx).await? {
                active.insert(row.try_get::<String, _>(0)?);
            }
        }
        tx.commit().await?;
        Ok(beats
            .iter()
            .map(|b| b.run_id.as_ref().map(|r| active.contains(r)))
            .collect())
    }

    async fn create_job(&self, job: &NewJob, now: i64) -> Result<()> {
        let (_writer, mut tx) = self.begin().await?;
        sqlx::query("INSERT INTO jobs (id, model, name, spec, state, created_at) VALUES ($1, $2, $3, $4, 'queued', $5)")
            .bind(&job.id)
            .bind(&job.spec.model)
            .bind(&job.spec.name)
            .bind(enc(&job.spec))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        for t in &job.tasks {
            sqlx::query(
                "INSERT INTO tasks (id, job_id, seq, model, variant, platform_id, host_id, target_agent_id, config, \
                 state, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10)",
            )
            .bind(&t.id)
            .bind(&job.id)
            .bind(t.seq)
            .bind(&job.spec.model)
            .bind(&t.variant)
            .bind(&t.platform_id)
            .bind(&t.host_id)
            .bind(&t.target_agent_id)
            .bind(enc(&t.config))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn resolve_job_id(&self, id_or_prefix: &str) -> Result<String> {
        let prefix = id_or_prefix.trim();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "job id '{id_or_prefix}' is not a job id (hex digits)"
            )));
        }
        let rows = sqlx::query("SELECT id FROM jobs WHERE id LIKE $1 ORDER BY id LIMIT 2")
            .bind(format!("{}%", prefix.to_ascii_lowercase()))
            .fetch_all(&self.pool)
            .await?;
        match rows.len() {
            0 => Err(Error::NotFound(format!("no job with id '{id_or_prefix}'"))),
            1 => Ok(rows[0].try_get(0)?),
            _ => Err(Error::InvalidArgument(format!(
                "job id prefix '{id_or_prefix}' is ambiguous; give more digits"
            ))),
        }
    }

    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobSummary>> {
        let sql = format!(
            "{JOB_SUMMARY_SELECT} GROUP BY j.id, j.model, j.name, j.state, j.created_at, j.finished_at \
             ORDER BY j.created_at DESC, j.id LIMIT $1"
        );
        let rows = sqlx::query(&sql)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_summary).collect()
    }

    async fn get_job(&self, job_id: &str) -> Result<(JobSummary, JobSpec)> {
        let sql = format!(
            "{JOB_SUMMARY_SELECT} WHERE j.id = $1 GROUP BY j.id, j.model, j.name, j.state, j.created_at, j.finished_at"
        );
        let row = sqlx::query(&sql)
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no job with id '{job_id}'")))?;
        let summary = job_summary(&row)?;
        let spec_row = sqlx::query("SELECT spec FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await?;
        Ok((summary, dec(&spec_row.try_get::<Vec<u8>, _>(0)?)?))
    }

    async fn job_tasks(&self, job_id: &str) -> Result<Vec<TaskInfo>> {
        let rows = sqlx::query(
            "SELECT t.id, t.variant, COALESCE(ta.name, ''), COALESCE(a.name, ''), t.platform_id, COALESCE(p.name, ''), \
             t.state, t.attempt, t.error, t.config, COALESCE(r.progress_queries, 0), r.summary \
             FROM tasks t LEFT JOIN agents ta ON ta.id = t.target_agent_id LEFT JOIN agents a ON a.id = t.agent_id \
             LEFT JOIN platforms p ON p.id = t.platform_id LEFT JOIN runs r ON r.id = t.run_id \
             WHERE t.job_id = $1 ORDER BY t.seq",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let config: RunConfig = dec(&row.try_get::<Vec<u8>, _>(9)?)?;
                let summary: Option<Vec<u8>> = row.try_get(11)?;
                Ok(TaskInfo {
                    task_id: row.try_get(0)?,
                    variant: row.try_get(1)?,
                    target_agent: row.try_get(2)?,
                    agent: row.try_get(3)?,
                    platform_id: row.try_get(4)?,
                    platform_name: row.try_get(5)?,
                    state: row.try_get(6)?,
                    attempt: row.try_get::<i64, _>(7)? as u32,
                    error: row.try_get(8)?,
                    target_queries: config.iterations,
                    config: Some(config),
                    progress_queries: row.try_get::<i64, _>(10)? as u64,
                    run: summary
                        .map(|s: Vec<u8>| dec::<RunSummary>(&s))
                        .transpose()?,
                })
            })
            .collect()
    }

    async fn cancel_job(&self, job_id: &str, now: i64) -> Result<Vec<(String, String)>> {
        let (_writer, mut tx) = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = $1 WHERE id = $2 AND state IN ('queued', 'running')",
        )
        .bind(now)
        .bind(job_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            let state = sqlx::query("SELECT state FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?;
            return match state {
                None => Err(Error::NotFound(format!("no job with id '{job_id}'"))),
                Some(r) => Err(Error::FailedPrecondition(format!(
                    "job {job_id} has already ended ({}); nothing to cancel",
                    r.try_get::<String, _>(0)?
                ))),
            };
        }
        sqlx::query("UPDATE tasks SET state = 'cancelled', finished_at = $1 WHERE job_id = $2 AND state = 'pending'")
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT run_id, agent_id FROM tasks WHERE job_id = $1 AND state = 'running'",
        )
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn lease_task(&self, req: &LeaseRequest, now: i64) -> Result<Option<Lease>> {
        let (_writer, mut tx) = self.begin().await?;
        let Some(row) = self.lease_statement(&mut tx, req).await? else {
            return Ok(None);
        };
        let lease = Lease {
            task_id: row.try_get(0)?,
            job_id: row.try_get(1)?,
            attempt: row.try_get::<i64, _>(2)? as u32,
            model: row.try_get(3)?,
            variant: row.try_get(4)?,
            config: dec(&row.try_get::<Vec<u8>, _>(5)?)?,
            run_id: req.run_id.clone(),
        };
        sqlx::query(
            "INSERT INTO runs (id, task_id, job_id, agent_id, platform_id, model, variant, attempt, state, started_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', $9)",
        )
        .bind(&lease.run_id)
        .bind(&lease.task_id)
        .bind(&lease.job_id)
        .bind(&req.agent_id)
        .bind(&req.platform_id)
        .bind(&lease.model)
        .bind(&lease.variant)
        .bind(lease.attempt as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::refresh_job(&mut tx, &lease.job_id, now).await?;
        tx.commit().await?;
        Ok(Some(lease))
    }

    async fn active_run_of_agent(&self, agent_id: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT run_id FROM tasks WHERE agent_id = $1 AND state = 'running' LIMIT 1",
        )
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    async fn expire_leases(&self, now: i64, max_attempts: u32) -> Result<Vec<ExpiredLease>> {
        let rows = sqlx::query(
            "SELECT run_id FROM tasks WHERE state = 'running' AND lease_expires_at < $1",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let run_id: String = row.try_get(0)?;
            if let Some(e) = self.release(&run_id, None, now, max_attempts, true).await? {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn release_run(
        &self,
        run_id: &str,
        reason: &str,
        now: i64,
        max_attempts: u32,
    ) -> Result<Option<ExpiredLease>> {
        self.release(run_id, Some(reason), now, max_attempts, false)
            .await
    }

    async fn store_windows(
        &self,
        windows: &[TelemetryWindow],
        now: i64,
    ) -> Result<Vec<WindowOutcome>> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let (_writer, mut tx) = self.begin().await?;
        let mut run_ids: Vec<&str> = windows.iter().map(|w| w.run_id.as_str()).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        let mut active = std::collections::HashSet::new();
        for ids in run_ids.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "SELECT id FROM runs WHERE state = 'running' AND id IN {}",
                self.backend.placeholders(1, ids.len())
            );
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&mut *tx).await? {
                active.insert(row.try_get::<String, _>(0)?);
            }
        }
        let live: Vec<&TelemetryWindow> = windows
            .iter()
            .filter(|w| active.contains(&w.run_id))
            .collect();
        // Windows of this batch carry a random tag; when fewer rows were inserted than offered (a resend
        // met its stored original), the tag tells which ones are new.
        let tag = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
        let mut inserted = 0u64;
        for rows in live.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..rows.len())
                .map(|i| self.backend.placeholders(i * 8 + 1, 8))
                .collect();
            let sql = format!(
                "INSERT INTO windows (run_id, seq, queries, samples, end_offset_ns, body, stored_at, ingest_batch) \
                 VALUES {} ON CONFLICT DO NOTHING",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for w in rows {
                q = q
                    .bind(w.run_id.as_str())
                    .bind(w.seq as i64)
                    .bind(w.queries as i64)
                    .bind(w.samples as i64)
                    .bind(w.end_offset_ns as i64)
                    .bind(enc(*w))
                    .bind(now)
                    .bind(tag);
            }
            inserted += q.execute(&mut *tx).await?.rows_affected();
        }
        let mut stored: std::collections::HashSet<(String, u64)> = std::collections::HashSet::new();
        if inserted == live.len() as u64 {
            stored.extend(live.iter().map(|w| (w.run_id.clone(), w.seq)));
        } else {
            let mut runs: Vec<&str> = live.iter().map(|w| w.run_id.as_str()).collect();
            runs.sort_unstable();
            runs.dedup();
            for ids in runs.chunks(ROWS_PER_INSERT) {
                let tag_param = self.backend.param(1);
                let sql = format!(
                    "SELECT run_id, seq FROM windows WHERE ingest_batch = {tag_param} AND run_id IN {}",
                    self.backend.placeholders(2, ids.len())
                );
                let mut q = sqlx::query(&sql).bind(tag);
                for id in ids {
                    q = q.bind(*id);
                }
                for row in q.fetch_all(&mut *tx).await? {
                    stored.insert((
                        row.try_get::<String, _>(0)?,
                        row.try_get::<i64, _>(1)? as u64,
                    ));
                }
            }
        }
        let mut progress: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
        for w in &live {
            if stored.contains(&(w.run_id.clone(), w.seq)) {
                let p = progress.entry(w.run_id.as_str()).or_default();
                p.0 += w.queries as i64;
                p.1 += 1;
            }
        }
        // One statement updates the progress of every run in the batch.
        let progress: Vec<(&str, (i64, i64))> = progress.into_iter().collect();
        for chunk in progress.chunks(ROWS_PER_INSERT) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p = self.backend.placeholders(i * 3 + 1, 3);
                    // (id, CAST(q AS BIGINT), CAST(n AS BIGINT)): Postgres needs the types spelled out.
                    let parts: Vec<&str> = p
                        .trim_matches(|c| c == '(' || c == ')')
                        .split(", ")
                        .collect();
                    format!(
                        "({}, CAST({} AS BIGINT), CAST({} AS BIGINT))",
                        parts[0], parts[1], parts[2]
                    )
                })
                .collect();
            let sql = format!(
                "UPDATE runs SET progress_queries = progress_queries + v.column2, windows = windows + v.column3 \
                 FROM (VALUES {}) AS v WHERE runs.id = v.column1",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (run, (queries, count)) in chunk {
                q = q.bind(*run).bind(*queries).bind(*count);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(windows
            .iter()
            .map(|w| {
                if !active.contains(&w.run_id) {
                    WindowOutcome::Inactive
                } else if stored.contains(&(w.run_id.clone(), w.seq)) {
                    WindowOutcome::Stored
                } else {
                    WindowOutcome::Duplicate
                }
            })
            .collect())
    }

    async fn run_context(&self, run_id: &str) -> Result<Option<RunContext>> {
        let row = sqlx::query(
            "SELECT r.state, r.task_id, r.job_id, r.agent_id, COALESCE(a.name, ''), COALESCE(a.labels_json, '{}'), \
             r.platform_id, r.variant, t.config, r.started_at \
             FROM runs r JOIN tasks t ON t.id = r.task_id LEFT JOIN agents a ON a.id = r.agent_id WHERE r.id = $1",
        )
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let windows = sqlx::query("SELECT body FROM windows WHERE run_id = $1 ORDER BY seq")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| dec::<TelemetryWindow>(&r.try_get::<Vec<u8>, _>(0)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(RunContext {
            state: row.try_get(0)?,
            task_id: row.try_get(1)?,
            job_id: row.try_get(2)?,
            agent_id: row.try_get(3)?,
            agent_name: row.try_get(4)?,
            agent_labels: labels_from_json(&row.try_get::<String, _>(5)?)?,
            platform_id: row.try_get(6)?,
            variant: row.try_get(7)?,
            config: dec(&row.try_get::<Vec<u8>, _>(8)?)?,
            windows,
            started_at: row.try_get(9)?,
        }))
    }

    async fn finish_run(&self, run: &FinishedRun, now: i64) -> Result<()> {
        let (_writer, mut tx) = self.begin().await?;
        let valid = run.summary.as_ref().is_some_and(|s| s.valid);
        let changed = sqlx::query(
            "UPDATE runs SET state = $1, valid = $2, summary = $3, histogram = $4, error = $5, config_key = $6, \
             finished_at = $7 WHERE id = $8 AND state = 'running'",
        )
        .bind(run.state.as_str())
        .bind(valid as i64)
        .bind(run.summary.as_ref().map(enc))
        .bind(run.histogram.clone())
        .bind(&run.error)
        .bind(&run.config_key)
        .bind(now)
        .bind(&run.run_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(()); // already finished: results are idempotent
        }
        let job = sqlx::query(
            "UPDATE tasks SET state = $1, error = $2, finished_at = $3, lease_expires_at = 0 \
             WHERE run_id = $4 AND state = 'running' RETURNING job_id",
        )
        .bind(run.state.as_str())
        .bind(&run.error)
        .bind(now)
        .bind(&run.run_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(job) = job {
            Self::refresh_job(&mut tx, &job.try_get::<String, _>(0)?, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn runs_for_model(&self, model: &str, job_id: Option<&str>) -> Result<Vec<StoredRun>> {
        let base = "SELECT r.id, r.job_id, r.platform_id, COALESCE(p.name, r.platform_id), r.variant, r.config_key, \
                    r.summary, r.histogram FROM runs r LEFT JOIN platforms p ON p.id = r.platform_id \
                    WHERE r.model = $1 AND r.state = 'succeeded'";
        let rows = match job_id {
            Some(j) => {
                let sql = format!("{base} AND r.job_id = $2 ORDER BY r.started_at");
                sqlx::query(&sql)
                    .bind(model)
                    .bind(j)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql = format!("{base} ORDER BY r.started_at");
                sqlx::query(&sql).bind(model).fetch_all(&self.pool).await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(StoredRun {
                    run_id: row.try_get(0)?,
                    job_id: row.try_get(1)?,
                    platform_id: row.try_get(2)?,
                    platform_name: row.try_get(3)?,
                    variant: row.try_get(4)?,
                    config_key: row.try_get(5)?,
                    summary: dec(&row.try_get::<Option<Vec<u8>>, _>(6)?.unwrap_or_default())?,
                    histogram: row.try_get::<Option<Vec<u8>>, _>(7)?.unwrap_or_default(),
                })
            })
            .collect()
    }
}

/// Migrations embedded in the binary: (version, description, SQL).
pub(crate) type EmbeddedMigrations = &'static [(i64, &'static str, &'static str)];

#[derive(Debug)]
struct Embedded(EmbeddedMigrations);

impl<'s> sqlx::migrate::MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> futures::future::BoxFuture<
        's,
        Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>,
    > {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    sqlx::migrate::Migration::new(
                        *version,
                        std::borrow::Cow::Borrowed(*description),
                        sqlx::migrate::MigrationType::Simple,
                        std::borrow::Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Applies embedded migrations that the database has not seen yet.
pub(crate) async fn migrate(pool: &AnyPool, migrations: EmbeddedMigrations) -> Result<()> {
    let migrator = sqlx::migrate::Migrator::new(Embedded(migrations)).await?;
    migrator.run(pool).await?;
    Ok(())
}
