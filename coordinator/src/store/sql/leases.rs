//! Leases: a task leased to an agent, kept alive by its heartbeats, released when the agent goes
//! silent (or loses the run), and the per-host rule that two agents of one host never run at once.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{Backend, ROWS_PER_INSERT, SqlStore, from_json};
use crate::error::Result;
use crate::store::{ExpiredLease, HeartbeatRecord, Lease, LeaseRequest, LeaseStore};

impl SqlStore {
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
        refund_attempt: bool,
    ) -> Result<Option<ExpiredLease>> {
        let (_writer, mut tx) = self.begin().await?;
        // The task first (locked), then its job's state read after the lock is held, so a cancel
        // that committed meanwhile is seen; see `lock_rows` for the order.
        let select = format!(
            "SELECT id, agent_id, attempt, job_id, lease_expires_at FROM tasks \
             WHERE run_id = $1 AND state = 'running'{}",
            self.for_update()
        );
        let row = sqlx::query(&select)
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let task_id: String = row.try_get(0)?;
        let agent_id: String = row.try_get(1)?;
        let attempt = row.try_get::<i64, _>(2)? as u32;
        let job_id: String = row.try_get(3)?;
        let lease_expires_at: i64 = row.try_get(4)?;
        if only_expired && lease_expires_at >= now {
            return Ok(None);
        }
        let job = sqlx::query(
            "SELECT j.state, COALESCE(a.name, '') FROM jobs j LEFT JOIN agents a ON a.id = $2 WHERE j.id = $1",
        )
        .bind(&job_id)
        .bind(&agent_id)
        .fetch_one(&mut *tx)
        .await?;
        let job_state: String = job.try_get(0)?;
        let agent_name: String = job.try_get(1)?;
        let (state, requeued) = if job_state == "cancelled" {
            ("cancelled", false)
        } else if refund_attempt {
            ("pending", true)
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
        // The lease is checked again in the update itself: a heartbeat that extended it after the
        // read above wins, and nothing is released.
        let released = sqlx::query(
            "UPDATE tasks SET state = $1, error = $2, lease_expires_at = 0, run_id = $3, finished_at = $4, \
             attempt = attempt - $9 \
             WHERE id = $5 AND run_id = $6 AND state = 'running' AND ($7 = 0 OR lease_expires_at < $8)",
        )
        .bind(state)
        .bind(&reason)
        .bind(new_run_id)
        .bind(finished_at)
        .bind(&task_id)
        .bind(run_id)
        .bind(only_expired as i64)
        .bind(now)
        .bind((refund_attempt && requeued) as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if released == 0 {
            return Ok(None);
        }
        sqlx::query("UPDATE runs SET state = 'abandoned', error = $1, finished_at = $2 WHERE id = $3 AND state = 'running'")
            .bind(&reason)
            .bind(now)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        self.refresh_job(&mut tx, &job_id, now).await?;
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
             lease_expires_at = $3, host_id = $5, renewed_by = $7 \
             WHERE id = (SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job_id \
               WHERE t.state = 'pending' AND t.platform_id = $4 AND j.state IN ('queued', 'running') \
               AND (t.target_agent_id = $1 OR NOT EXISTS (SELECT 1 FROM agents a WHERE a.id = t.target_agent_id \
                    AND a.connected = 1 AND a.last_seen_at > $6)) \
               AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.state = 'running' AND r.host_id = $5) \
               ORDER BY CASE WHEN t.target_agent_id = $1 THEN 0 ELSE 1 END, j.created_at, t.seq \
               LIMIT 1 {lock}) \
             RETURNING {LEASE_COLUMNS}"
        );
        Ok(sqlx::query(&sql)
            .bind(&req.agent_id)
            .bind(&req.run_id)
            .bind(req.lease_until)
            .bind(&req.platform_id)
            .bind(&req.host_id)
            .bind(req.alive_since)
            .bind(&req.replica)
            .fetch_optional(&mut **tx)
            .await?)
    }
}

/// The task columns a [`Lease`] is read from, in [`lease_of`]'s order.
const LEASE_COLUMNS: &str = "id, job_id, attempt, model, variant, config_json, run_id";

fn lease_of(row: &AnyRow) -> Result<Lease> {
    Ok(Lease {
        task_id: row.try_get(0)?,
        job_id: row.try_get(1)?,
        attempt: row.try_get::<i64, _>(2)? as u32,
        model: row.try_get(3)?,
        variant: row.try_get(4)?,
        config: from_json("tasks.config_json", &row.try_get::<String, _>(5)?)?,
        run_id: row.try_get(6)?,
    })
}

#[async_trait]
impl LeaseStore for SqlStore {
    async fn lease_task(&self, req: &LeaseRequest, now: i64) -> Result<Option<Lease>> {
        let (_writer, mut tx) = self.begin().await?;
        let Some(row) = self.lease_statement(&mut tx, req).await? else {
            return Ok(None);
        };
        let lease = lease_of(&row)?;
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
        // The only change a lease makes to its job: queued becomes running.
        sqlx::query("UPDATE jobs SET state = 'running' WHERE id = $1 AND state = 'queued'")
            .bind(&lease.job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(lease))
    }

    async fn active_lease_of_agent(&self, agent_id: &str) -> Result<Option<Lease>> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM tasks WHERE agent_id = $1 AND state = 'running' LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lease_of).transpose()
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

    async fn replica_seen(&self, replica: &str, now: i64, trouble_at: i64) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query(
            "INSERT INTO replicas (id, started_at, seen_at, trouble_at) VALUES ($1, $2, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, trouble_at = excluded.trouble_at",
        )
        .bind(replica)
        .bind(now)
        .bind(trouble_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn expire_leases(
        &self,
        now: i64,
        max_attempts: u32,
        replica: &str,
        lease_timeout_ms: i64,
    ) -> Result<Vec<ExpiredLease>> {
        let rows = sqlx::query(
            "SELECT t.run_id FROM tasks t LEFT JOIN replicas r ON r.id = t.renewed_by \
             WHERE t.state = 'running' AND t.lease_expires_at < $1 \
             AND (t.renewed_by = '' OR t.renewed_by = $2 OR r.id IS NULL \
                  OR (r.seen_at > t.lease_expires_at AND r.trouble_at < $1 - $3) \
                  OR r.seen_at < $1 - 3 * $3)",
        )
        .bind(now)
        .bind(replica)
        .bind(lease_timeout_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let run_id: String = row.try_get(0)?;
            if let Some(e) = self
                .release(&run_id, None, now, max_attempts, true, false)
                .await?
            {
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
        refund_attempt: bool,
    ) -> Result<Option<ExpiredLease>> {
        self.release(
            run_id,
            Some(reason),
            now,
            max_attempts,
            false,
            refund_attempt,
        )
        .await
    }

    async fn heartbeats(
        &self,
        beats: &[HeartbeatRecord],
        now: i64,
        lease_until: i64,
        replica: &str,
    ) -> Result<Vec<Option<bool>>> {
        // Two statements per batch, whatever its size: last-seen times, then leases of the runs named.
        let (_writer, mut tx) = self.begin().await?;
        let mut agents: Vec<&str> = beats.iter().map(|b| b.agent_id.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        self.lock_rows(&mut tx, "agents", "id", &agents).await?;
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
        let mut run_ids: Vec<&str> = runs.iter().filter_map(|b| b.run_id.as_deref()).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        self.lock_rows(&mut tx, "tasks", "run_id", &run_ids).await?;
        let mut active = std::collections::HashSet::new();
        for chunk in runs.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| self.backend.placeholders(i * 2 + 3, 2))
                .collect();
            let sql = format!(
                "UPDATE tasks SET lease_expires_at = {}, renewed_by = {} FROM (VALUES {}) AS v \
                 WHERE tasks.run_id = v.column1 AND tasks.agent_id = v.column2 AND tasks.state = 'running' \
                 AND (SELECT state FROM jobs WHERE jobs.id = tasks.job_id) <> 'cancelled' \
                 RETURNING tasks.run_id",
                self.backend.param(1),
                self.backend.param(2),
                values.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(lease_until).bind(replica);
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
}
