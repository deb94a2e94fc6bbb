//! Jobs and their tasks, and a job's state recomputed from its tasks.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, from_json, to_json};
use crate::domain::{JobSpec, JobSummary, RunConfig, RunSummary, TaskInfo};
use crate::error::{Error, Result};
use crate::store::{JobStore, NewJob};

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

impl SqlStore {
    /// Recomputes a job's state from its tasks (a cancelled job stays cancelled). The job's row is
    /// locked first and its tasks counted after, in a statement of their own: under READ COMMITTED two
    /// transactions that finish a job's last two tasks would otherwise each count the other's task as
    /// still running, and the job would never end.
    pub(super) async fn refresh_job(
        &self,
        tx: &mut Transaction<'static, Any>,
        job_id: &str,
        now: i64,
    ) -> Result<()> {
        let lock = format!("SELECT state FROM jobs WHERE id = $1{}", self.for_update());
        let Some(job) = sqlx::query(&lock)
            .bind(job_id)
            .fetch_optional(&mut **tx)
            .await?
        else {
            return Ok(());
        };
        let state: String = job.try_get(0)?;
        if state == "cancelled" {
            return Ok(());
        }
        let row = sqlx::query(
            "SELECT \
             CAST(COALESCE(SUM(CASE WHEN t.state IN ('pending', 'running') THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.state = 'running' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.state = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN t.state IN ('succeeded', 'failed', 'cancelled') THEN 1 ELSE 0 END), 0) AS BIGINT) \
             FROM tasks t WHERE t.job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
        let open: i64 = row.try_get(0)?;
        let running: i64 = row.try_get(1)?;
        let failed: i64 = row.try_get(2)?;
        let done: i64 = row.try_get(3)?;
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
}

#[async_trait]
impl JobStore for SqlStore {
    async fn create_job(&self, job: &NewJob, now: i64) -> Result<()> {
        let (_writer, mut tx) = self.begin().await?;
        sqlx::query("INSERT INTO jobs (id, model, name, spec_json, state, created_at) VALUES ($1, $2, $3, $4, 'queued', $5)")
            .bind(&job.id)
            .bind(&job.spec.model)
            .bind(&job.spec.name)
            .bind(to_json("job spec", &job.spec)?)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        for t in &job.tasks {
            sqlx::query(
                "INSERT INTO tasks (id, job_id, seq, model, variant, platform_id, host_id, target_agent_id, config_json, \
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
            .bind(to_json("task config", &t.config)?)
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

    async fn task_counts(&self) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM tasks GROUP BY state ORDER BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect()
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
        let spec_row = sqlx::query("SELECT spec_json FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await?;
        Ok((
            summary,
            from_json("jobs.spec_json", &spec_row.try_get::<String, _>(0)?)?,
        ))
    }

    async fn job_tasks(&self, job_id: &str) -> Result<Vec<TaskInfo>> {
        let rows = sqlx::query(
            "SELECT t.id, t.variant, COALESCE(ta.name, ''), COALESCE(a.name, ''), t.platform_id, COALESCE(p.name, ''), \
             t.state, t.attempt, t.error, t.config_json, COALESCE(r.progress_queries, 0), r.summary_json \
             FROM tasks t LEFT JOIN agents ta ON ta.id = t.target_agent_id LEFT JOIN agents a ON a.id = t.agent_id \
             LEFT JOIN platforms p ON p.id = t.platform_id LEFT JOIN runs r ON r.id = t.run_id \
             WHERE t.job_id = $1 ORDER BY t.seq",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let config: RunConfig =
                    from_json("tasks.config_json", &row.try_get::<String, _>(9)?)?;
                let summary: Option<String> = row.try_get(11)?;
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
                    config,
                    progress_queries: row.try_get::<i64, _>(10)? as u64,
                    run: summary
                        .map(|s| from_json::<RunSummary>("runs.summary_json", &s))
                        .transpose()?,
                })
            })
            .collect()
    }

    async fn cancel_job(&self, job_id: &str, now: i64) -> Result<Vec<(String, String)>> {
        let (_writer, mut tx) = self.begin().await?;
        // Tasks before the job, as everywhere (see `lock_rows`).
        if self.backend == super::Backend::Postgres {
            sqlx::query(
                "SELECT id FROM tasks WHERE job_id = $1 AND state IN ('pending', 'running') ORDER BY id FOR UPDATE",
            )
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
        }
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

    async fn delete_job(&self, job_id: &str) -> Result<u64> {
        let (_writer, mut tx) = self.begin().await?;
        let sql = format!("SELECT state FROM jobs WHERE id = $1{}", self.for_update());
        let state: String = sqlx::query(&sql)
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no job {job_id}")))?
            .try_get(0)?;
        let running: i64 = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE job_id = $1 AND state IN ('pending', 'running')",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        if matches!(state.as_str(), "queued" | "running") || running > 0 {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} is {state}{}; cancel it first (fleetbench jobs cancel {job_id}) and delete it \
                 once its runs have stopped",
                if running > 0 && !matches!(state.as_str(), "queued" | "running") {
                    format!(" and {running} of its tasks are still running")
                } else {
                    String::new()
                }
            )));
        }
        sqlx::query("DELETE FROM windows WHERE run_id IN (SELECT id FROM runs WHERE job_id = $1)")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        let runs = sqlx::query("DELETE FROM runs WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM tasks WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(runs)
    }
}
