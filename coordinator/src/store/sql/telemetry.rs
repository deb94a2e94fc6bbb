//! Telemetry windows (stored once, however often resent) and finished runs with their summaries.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::agents::labels_from_json;
use super::{ROWS_PER_INSERT, SqlStore, from_json, to_json};
use crate::domain::Window;
use crate::error::Result;
use crate::store::{
    FinishedRun, RunContext, RunLabels, StoredRun, StoredWindows, TelemetryStore, WindowOutcome,
};

/// Values bound per window in the multi-row INSERT.
const WINDOW_COLUMNS: usize = 15;

/// A window row as stored (columns of `run_context`'s query, in order).
fn window(row: &AnyRow) -> Result<Window> {
    let resources: Option<String> = row.try_get(7)?;
    Ok(Window {
        run_id: row.try_get(0)?,
        seq: row.try_get::<i64, _>(1)? as u64,
        start_offset_ns: row.try_get::<i64, _>(2)? as u64,
        end_offset_ns: row.try_get::<i64, _>(3)? as u64,
        queries: row.try_get::<i64, _>(4)? as u64,
        samples: row.try_get::<i64, _>(5)? as u64,
        latency_histogram: row.try_get(6)?,
        resources: resources
            .map(|r| from_json("windows.resources_json", &r))
            .transpose()?,
        late_queries: row.try_get::<i64, _>(8)? as u64,
        dropped_queries: row.try_get::<i64, _>(9)? as u64,
        issue_delay_histogram: row.try_get(10)?,
        closed_at_ms: row.try_get(11)?,
        generation: row
            .try_get::<Option<String>, _>(12)?
            .map(|g| from_json("windows.generation_json", &g))
            .transpose()?,
    })
}

#[async_trait]
impl TelemetryStore for SqlStore {
    async fn store_windows(&self, batch: &[(String, Window)], now: i64) -> Result<StoredWindows> {
        if batch.is_empty() {
            return Ok(StoredWindows::default());
        }
        let (_writer, mut tx) = self.begin().await?;
        let mut run_ids: Vec<&str> = batch.iter().map(|(_, w)| w.run_id.as_str()).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        // Running runs of the batch, with the agent each is leased to.
        let mut active: std::collections::HashMap<String, String> = Default::default();
        let mut job_of: std::collections::HashMap<String, String> = Default::default();
        for ids in run_ids.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "SELECT id, agent_id, job_id FROM runs WHERE state = 'running' AND id IN {}",
                self.backend.placeholders(1, ids.len())
            );
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&mut *tx).await? {
                let id: String = row.try_get(0)?;
                job_of.insert(id.clone(), row.try_get(2)?);
                active.insert(id, row.try_get(1)?);
            }
        }
        let outcome_of = |agent: &str, w: &Window| match active.get(&w.run_id) {
            None => Some(WindowOutcome::Inactive),
            Some(holder) if holder != agent => Some(WindowOutcome::Foreign),
            Some(_) => None,
        };
        // A window sent twice in one batch is stored (and counted) once.
        let mut seen = std::collections::HashSet::new();
        let live: Vec<&Window> = batch
            .iter()
            .filter(|(agent, w)| outcome_of(agent, w).is_none())
            .map(|(_, w)| w)
            .filter(|w| seen.insert((w.run_id.as_str(), w.seq)))
            .collect();
        // Windows of this batch carry a random tag; when fewer rows were inserted than offered (a resend
        // met its stored original), the tag tells which ones are new.
        let tag = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
        let mut inserted = 0u64;
        for rows in live.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..rows.len())
                .map(|i| {
                    self.backend
                        .placeholders(i * WINDOW_COLUMNS + 1, WINDOW_COLUMNS)
                })
                .collect();
            let sql = format!(
                "INSERT INTO windows (run_id, seq, queries, samples, start_offset_ns, end_offset_ns, histogram, \
                 issue_delay_histogram, resources_json, late_queries, dropped_queries, closed_at, stored_at, \
                 ingest_batch, generation_json) VALUES {} ON CONFLICT DO NOTHING",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for w in rows {
                let resources = match &w.resources {
                    Some(r) => Some(to_json("window resources", r)?),
                    None => None,
                };
                let generation = match &w.generation {
                    Some(g) => Some(to_json("window generation", g)?),
                    None => None,
                };
                q = q
                    .bind(w.run_id.as_str())
                    .bind(w.seq as i64)
                    .bind(w.queries as i64)
                    .bind(w.samples as i64)
                    .bind(w.start_offset_ns as i64)
                    .bind(w.end_offset_ns as i64)
                    .bind(w.latency_histogram.as_slice())
                    .bind(w.issue_delay_histogram.as_slice())
                    .bind(resources)
                    .bind(w.late_queries as i64)
                    .bind(w.dropped_queries as i64)
                    .bind(w.closed_at_ms)
                    .bind(now)
                    .bind(tag)
                    .bind(generation);
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
        let mut jobs: Vec<String> = progress
            .iter()
            .filter_map(|(run, _)| job_of.get(*run).cloned())
            .collect();
        jobs.sort();
        jobs.dedup();
        // The first occurrence of a newly stored window is Stored; any other copy is a Duplicate.
        let mut reported = std::collections::HashSet::new();
        let outcomes = batch
            .iter()
            .map(|(agent, w)| {
                if let Some(o) = outcome_of(agent, w) {
                    o
                } else if stored.contains(&(w.run_id.clone(), w.seq))
                    && reported.insert((w.run_id.as_str(), w.seq))
                {
                    WindowOutcome::Stored
                } else {
                    WindowOutcome::Duplicate
                }
            })
            .collect();
        Ok(StoredWindows { outcomes, jobs })
    }

    async fn run_context(&self, run_id: &str) -> Result<Option<RunContext>> {
        let row = sqlx::query(
            "SELECT r.state, r.task_id, r.job_id, r.agent_id, COALESCE(a.name, ''), COALESCE(a.labels_json, '{}'), \
             r.platform_id, r.variant, t.config_json, r.started_at \
             FROM runs r JOIN tasks t ON t.id = r.task_id LEFT JOIN agents a ON a.id = r.agent_id WHERE r.id = $1",
        )
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let windows = sqlx::query(
            "SELECT run_id, seq, start_offset_ns, end_offset_ns, queries, samples, histogram, resources_json, \
             late_queries, dropped_queries, issue_delay_histogram, closed_at, generation_json FROM windows WHERE run_id = $1 \
             ORDER BY seq",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(window)
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
            config: from_json("tasks.config_json", &row.try_get::<String, _>(8)?)?,
            windows,
            started_at: row.try_get(9)?,
        }))
    }

    async fn run_labels(&self, run_id: &str) -> Result<Option<RunLabels>> {
        let row = sqlx::query(
            "SELECT r.model, r.variant, COALESCE(p.name, ''), COALESCE(a.name, ''), t.config_json \
             FROM runs r JOIN tasks t ON t.id = r.task_id LEFT JOIN agents a ON a.id = r.agent_id \
             LEFT JOIN platforms p ON p.id = r.platform_id WHERE r.id = $1",
        )
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let config: crate::domain::RunConfig =
            from_json("tasks.config_json", &row.try_get::<String, _>(4)?)?;
        Ok(Some(RunLabels {
            model: row.try_get(0)?,
            variant: row.try_get(1)?,
            platform: row.try_get(2)?,
            agent: row.try_get(3)?,
            scenario: serde_json::to_value(config.scenario)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            config: crate::pooling::base_label(&config),
        }))
    }

    async fn finish_run(&self, run: &FinishedRun, now: i64) -> Result<()> {
        let valid = run.summary.as_ref().is_some_and(|s| s.valid);
        let summary = match &run.summary {
            Some(s) => Some(to_json("run summary", s)?),
            None => None,
        };
        let (_writer, mut tx) = self.begin().await?;
        // Task, then run, then job (see `lock_rows`).
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
        let Some(job) = job else {
            return Ok(()); // already finished or released: results are idempotent
        };
        sqlx::query(
            "UPDATE runs SET state = $1, valid = $2, summary_json = $3, histogram = $4, error = $5, config_key = $6, \
             pool_key = $7, finished_at = $8 WHERE id = $9 AND state = 'running'",
        )
        .bind(run.state.as_str())
        .bind(valid as i64)
        .bind(summary)
        .bind(run.histogram.clone())
        .bind(&run.error)
        .bind(&run.config_key)
        .bind(&run.pool_key)
        .bind(now)
        .bind(&run.run_id)
        .execute(&mut *tx)
        .await?;
        self.refresh_job(&mut tx, &job.try_get::<String, _>(0)?, now)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn runs_for_model(&self, model: &str, job_id: Option<&str>) -> Result<Vec<StoredRun>> {
        let base = "SELECT r.id, r.job_id, r.platform_id, COALESCE(p.name, r.platform_id), r.variant, r.config_key, \
                    r.summary_json, r.histogram, r.pool_key FROM runs r LEFT JOIN platforms p ON p.id = r.platform_id \
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
                    summary: from_json(
                        "runs.summary_json",
                        &row.try_get::<Option<String>, _>(6)?.unwrap_or_default(),
                    )?,
                    histogram: row.try_get::<Option<Vec<u8>>, _>(7)?.unwrap_or_default(),
                    pool_key: row.try_get(8)?,
                })
            })
            .collect()
    }

    async fn drop_windows(&self, finished_before: i64, limit: u32) -> Result<u64> {
        let runs = sqlx::query(
            "SELECT r.id FROM runs r WHERE r.state IN ('succeeded', 'failed', 'cancelled') \
             AND r.finished_at > 0 AND r.finished_at < $1 \
             AND EXISTS (SELECT 1 FROM windows w WHERE w.run_id = r.id) ORDER BY r.finished_at LIMIT $2",
        )
        .bind(finished_before)
        .bind(i64::from(limit.clamp(1, 1000)))
        .fetch_all(&self.pool)
        .await?;
        let mut dropped = 0;
        for r in runs {
            let run: String = r.try_get(0)?;
            let (_writer, mut tx) = self.begin().await?;
            dropped += sqlx::query("DELETE FROM windows WHERE run_id = $1")
                .bind(&run)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
        }
        Ok(dropped)
    }

    async fn window_count(&self, run_id: &str) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM windows WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    async fn claim(&self, name: &str, holder: &str, now: i64, until: i64) -> Result<bool> {
        let _writer = self.writer().await;
        sqlx::query(
            "INSERT INTO maintenance (name, holder, until_ms) VALUES ($1, '', 0) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .execute(&self.pool)
        .await?;
        // One statement: of two replicas claiming at once, one updates the row and the other then
        // finds the claim current.
        let claimed = sqlx::query(
            "UPDATE maintenance SET holder = $2, until_ms = $3 WHERE name = $1 AND (until_ms < $4 OR holder = $2)",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(claimed == 1)
    }
}
