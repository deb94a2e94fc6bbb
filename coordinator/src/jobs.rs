//! Jobs: validation at submit (errors name the field), expansion into tasks (variant x matching agent x
//! configuration), listing, cancellation and progress.

use std::time::Duration;

use fleetbench_common::config::{decoder_io_error, position_limit_error, validate_job_spec};
use fleetbench_common::labels;
use fleetbench_common::now_ms;

use crate::context::{Context, stopped};
use crate::domain::{JobDetail, JobSpec, JobSummary, RunConfig, Scenario, Variant};
use crate::error::{Error, Result};
use crate::fleet::is_online;
use crate::limits;
use crate::registry;
use crate::store::{NewJob, NewTask};

/// Terminal job states.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// Checks that every symbolic dimension past the batch axis has a shape, and that shapes name inputs.
fn check_shapes(variant: &Variant, config: &RunConfig) -> Result<()> {
    for s in &config.shapes {
        if !variant.inputs.iter().any(|i| i.name == s.name) {
            let names: Vec<&str> = variant.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::InvalidArgument(format!(
                "shape: {}/{} has no input '{}' (inputs: {})",
                variant.model,
                variant.variant,
                s.name,
                names.join(", ")
            )));
        }
    }
    if !config.input_data_sha256.is_empty() {
        return Ok(());
    }
    for input in &variant.inputs {
        if config.shapes.iter().any(|s| s.name == input.name) {
            continue;
        }
        for (axis, dim) in input.dims.iter().enumerate().skip(1) {
            if *dim < 0 {
                let sym = input
                    .dim_names
                    .get(axis)
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .unwrap_or_else(|| "?".into());
                return Err(Error::InvalidArgument(format!(
                    "shape: input '{}' of {}/{} has symbolic dimension '{sym}' at axis {axis}; set it with --shape {}=1x...",
                    input.name, variant.model, variant.variant, input.name
                )));
            }
        }
    }
    Ok(())
}

/// A generate job needs a decoder whose position limit holds its longest request.
fn check_generate(variant: &Variant, config: &RunConfig) -> Result<()> {
    let Some(g) = config
        .generate
        .as_ref()
        .filter(|_| config.scenario == Scenario::Generate)
    else {
        return Ok(());
    };
    let named = |e: String| {
        Error::InvalidArgument(format!("model: {}/{}: {e}", variant.model, variant.variant))
    };
    if let Some(e) = decoder_io_error(&variant.inputs, &variant.outputs) {
        return Err(named(e));
    }
    if let Some(e) = position_limit_error(g, variant.max_positions) {
        return Err(Error::InvalidArgument(format!(
            "{e} of {}/{}",
            variant.model, variant.variant
        )));
    }
    Ok(())
}

/// Validates and stores a job; returns (job id, task count).
pub async fn submit(coord: &Context, spec: JobSpec) -> Result<(String, u32)> {
    let started = std::time::SystemTime::now();
    let configs = validate_job_spec(&spec, coord.config.max_tasks_per_job)?;
    let all = coord.store.list_variants(Some(&spec.model)).await?;
    if all.is_empty() {
        let mut known: Vec<String> = coord
            .store
            .list_variants(None)
            .await?
            .into_iter()
            .map(|v| v.model)
            .collect();
        known.dedup();
        return Err(Error::NotFound(format!(
            "model: unknown model '{}' (known: {})",
            spec.model,
            if known.is_empty() {
                "none; push one with `fleetbench models push`".into()
            } else {
                known.join(", ")
            }
        )));
    }
    let wanted: Vec<&String> = spec
        .variants
        .iter()
        .filter(|v| !v.trim().is_empty())
        .collect();
    let variants: Vec<&Variant> = if wanted.is_empty() || wanted.iter().any(|v| v.as_str() == "all")
    {
        all.iter().collect()
    } else {
        let mut out = Vec::new();
        for name in wanted {
            match all.iter().find(|v| &v.variant == name) {
                Some(v) => out.push(v),
                None => {
                    let names: Vec<&str> = all.iter().map(|v| v.variant.as_str()).collect();
                    return Err(Error::NotFound(format!(
                        "variants: model '{}' has no variant '{name}' (has: {})",
                        spec.model,
                        names.join(", ")
                    )));
                }
            }
        }
        out
    };
    for c in &configs {
        limits::check(c, &coord.config)?;
    }
    let data = &spec.config.input_data_sha256;
    if !data.is_empty() && coord.store.blob_size(data).await?.is_none() {
        return Err(Error::NotFound(format!(
            "input_data_sha256: blob {data} was not uploaded; upload the .npz first"
        )));
    }
    for v in &variants {
        for c in &configs {
            if c.scenario == Scenario::Generate {
                // The decoding loop shapes every call's inputs itself.
                check_generate(v, c)?;
                continue;
            }
            check_shapes(v, c)?;
            limits::check_inputs(v, c, &coord.config)?;
        }
    }
    let selector = &spec.selector;
    let now = now_ms();
    let agents = coord.store.list_agents().await?;
    let online: Vec<_> = agents.iter().filter(|a| is_online(coord, a, now)).collect();
    let matched: Vec<_> = online
        .iter()
        .filter(|a| labels::matches(selector, &a.labels))
        .collect();
    if matched.is_empty() {
        let listing: Vec<String> = online
            .iter()
            .map(|a| format!("{} [{}]", a.name, labels::render(&a.labels)))
            .collect();
        return Err(Error::FailedPrecondition(format!(
            "selector: '{}' matches no online agent (online: {})",
            labels::render(selector),
            if listing.is_empty() {
                "none".to_string()
            } else {
                listing.join("; ")
            }
        )));
    }
    let total = configs.len() * variants.len() * matched.len();
    if total > coord.config.max_tasks_per_job {
        return Err(Error::InvalidArgument(format!(
            "sweep: the job expands into {total} tasks, more than the cap of {}",
            coord.config.max_tasks_per_job
        )));
    }
    let mut tasks = Vec::with_capacity(total);
    for config in &configs {
        for v in &variants {
            for a in &matched {
                tasks.push(NewTask {
                    id: uuid::Uuid::new_v4().simple().to_string(),
                    seq: tasks.len() as i64,
                    variant: v.variant.clone(),
                    platform_id: a.platform_id.clone(),
                    host_id: a.host_id.clone(),
                    target_agent_id: a.id.clone(),
                    config: config.clone(),
                });
            }
        }
    }
    let job = NewJob {
        id: uuid::Uuid::new_v4().simple().to_string(),
        spec,
        tasks,
    };
    coord.store.create_job(&job, now).await?;
    coord
        .telemetry
        .traces
        .job_submitted(&job.id, &job.spec.model, total as u32, started);
    tracing::info!(job = %job.id, trace_id = %job.id, model = %job.spec.model, tasks = job.tasks.len(), "Job submitted.");
    coord.changed();
    Ok((job.id, total as u32))
}

/// A job with its tasks.
pub async fn detail(coord: &Context, id_or_prefix: &str) -> Result<JobDetail> {
    let id = coord.store.resolve_job_id(id_or_prefix).await?;
    snapshot(coord, &id).await
}

async fn snapshot(coord: &Context, id: &str) -> Result<JobDetail> {
    let (summary, spec) = coord.store.get_job(id).await?;
    let tasks = coord.store.job_tasks(id).await?;
    Ok(JobDetail {
        summary,
        spec,
        tasks,
    })
}

/// Jobs, newest first.
pub async fn list(coord: &Context, limit: u32) -> Result<Vec<JobSummary>> {
    coord
        .store
        .list_jobs(if limit == 0 { 50 } else { limit.min(1000) })
        .await
}

/// Cancels a job and tells agents running its tasks to stop.
pub async fn cancel(coord: &Context, id_or_prefix: &str) -> Result<JobSummary> {
    let id = coord.store.resolve_job_id(id_or_prefix).await?;
    let running = coord.store.cancel_job(&id, now_ms()).await?;
    for (run_id, agent_id) in &running {
        // Agents connected to other replicas learn it from their next heartbeat.
        coord
            .registry
            .send(agent_id, registry::cancel(run_id, "job cancelled"));
    }
    tracing::info!(job = %id, running = running.len(), "Job cancelled.");
    coord.changed();
    Ok(coord.store.get_job(&id).await?.0)
}

/// Deletes a finished job with its runs; returns its full id and how many runs went.
pub async fn delete(coord: &Context, id_or_prefix: &str) -> Result<(String, u64)> {
    let id = coord.store.resolve_job_id(id_or_prefix).await?;
    let runs = coord.store.delete_job(&id).await?;
    tracing::info!(job = %id, runs, "Job deleted.");
    coord.notify_watchers();
    Ok((id, runs))
}

/// Streams progress snapshots of a job until it ends: one now, then one after every change.
pub fn watch(
    coord: std::sync::Arc<Context>,
    id_or_prefix: String,
) -> impl futures::Stream<Item = Result<JobDetail>> + Send + 'static {
    async_stream(move |tx| async move {
        let id = match coord.store.resolve_job_id(&id_or_prefix).await {
            Ok(id) => id,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut changes = coord.watch_changes();
        let mut job_changes = coord.watch_job(&id);
        let mut stopping = coord.stopping.clone();
        let mut last: Option<JobDetail> = None;
        loop {
            match snapshot(&coord, &id).await {
                Ok(p) => {
                    let terminal = is_terminal(&p.summary.state);
                    if last.as_ref() != Some(&p) {
                        if tx.send(Ok(p.clone())).await.is_err() {
                            return;
                        }
                        last = Some(p);
                    }
                    if terminal {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            // Local changes wake us at once; changes made by other replicas show within a second.
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()) => {}
                _ = job_changes.changed() => {}
                _ = stopped(&mut stopping) => {
                    let _ = tx.send(Err(Error::Unavailable("the coordinator is shutting down; watch again".into()))).await;
                    return;
                }
            }
        }
    })
}

/// A stream fed by a task through a channel.
fn async_stream<T, F, Fut>(f: F) -> impl futures::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
