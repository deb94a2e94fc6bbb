//! Ingest: telemetry windows and run results are written in arrival order by one writer task, in
//! batches (one transaction per batch); each window is acknowledged only after its batch is durably
//! stored. If the database fails, the writer retries the same batch and acknowledges nothing meanwhile,
//! so agents keep the windows and nothing is lost. Heartbeats go through their own batcher
//! ([`crate::heartbeat`]), so that a slow or absent database never stalls liveness.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetbench_common::now_ms;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::batch::next_batch;
use crate::context::Context;
use crate::domain::{RunResult, Window};
use crate::error::{Error, Result};
use crate::registry::{self, Ack, AgentLink};
use crate::store::{FinishedRun, WindowOutcome};
use crate::summary;

/// Something to write, with the session to acknowledge on. Windows are nearly every item, so they are
/// kept inline (no allocation per window); the rare, larger result is boxed.
#[allow(clippy::large_enum_variant)]
pub enum IngestItem {
    /// A telemetry window (already checked by [`check_window`]).
    Window {
        /// The window.
        window: Window,
        /// Agent that sent it.
        agent_id: String,
        /// Where to send the ack.
        reply: AgentLink,
        /// When it arrived, for the ack latency.
        received: std::time::Instant,
        /// Its latencies in the exported histogram's buckets, counted while it was checked; None
        /// when metrics go nowhere.
        latency: Option<Box<crate::otel::hist::Counts>>,
    },
    /// A run's result.
    Result {
        /// The result (boxed: it is much larger than a window's entry).
        result: Box<RunResult>,
        /// Agent that sent it.
        agent_id: String,
        /// Where to send the ack.
        reply: AgentLink,
    },
}

/// Sender side of the ingest writer.
pub type IngestHandle = mpsc::Sender<IngestItem>;

/// Why a window is refused on arrival, or None when it can be stored: its run id must be an id, its
/// histograms must decode, the latency histogram must hold one value per query, and its offsets and
/// counts must make sense. A bad window is refused alone; the rest of its batch goes on. The
/// histograms are read without being built (as `hist::decode` would refuse them), and `latency` is
/// handed each (HDR bucket midpoint ns, count) of the latency histogram on the way.
pub fn check_window(w: &Window, mut latency: impl FnMut(u64, u64)) -> Option<String> {
    if let Err(e) = fleetbench_common::ids::check("run_id", &w.run_id) {
        return Some(e.to_string());
    }
    let mut held = 0u64;
    if let Err(e) = fleetbench_common::hist::for_each_recorded(&w.latency_histogram, |ns, n| {
        held = held.saturating_add(n);
        latency(ns, n);
    }) {
        return Some(format!("latency_histogram: {e}"));
    }
    if held != w.queries {
        return Some(format!(
            "latency_histogram: holds {held} latencies, the window says {} queries",
            w.queries
        ));
    }
    if let Err(e) = fleetbench_common::hist::check_count(&w.issue_delay_histogram) {
        return Some(format!("issue_delay_histogram: {e}"));
    }
    if let Some(g) = &w.generation {
        for (name, bytes) in [
            ("generation.ttft_histogram", &g.ttft_histogram),
            ("generation.tpot_histogram", &g.tpot_histogram),
            ("generation.itl_histogram", &g.itl_histogram),
        ] {
            if let Err(e) = fleetbench_common::hist::check_count(bytes) {
                return Some(format!("{name}: {e}"));
            }
        }
        if g.output_tokens < w.queries || g.good_requests > w.queries {
            return Some(format!(
                "generation: {} output tokens and {} good requests do not fit {} requests",
                g.output_tokens, g.good_requests, w.queries
            ));
        }
    }
    if w.end_offset_ns < w.start_offset_ns {
        return Some(format!(
            "end_offset_ns {} is before start_offset_ns {}",
            w.end_offset_ns, w.start_offset_ns
        ));
    }
    if w.samples < w.queries {
        return Some(format!(
            "samples {} < queries {}: a query holds at least one sample",
            w.samples, w.queries
        ));
    }
    None
}

/// How an attempt to store something ended.
enum Stored<T> {
    /// Stored.
    Done(T),
    /// Failed in a way retrying cannot heal.
    Failed(Error),
    /// The coordinator is stopping.
    Stopping,
}

/// Runs `op`, retrying with capped exponential backoff while its errors can heal (the database away,
/// busy or full, a transaction that lost a race); an error that cannot heal is returned at once. Only
/// connection trouble marks the store as in trouble (which holds back lease expiry).
async fn until_stored<T, F, Fut>(
    ctx: &Context,
    what: &str,
    shutdown: &tokio::sync::watch::Receiver<bool>,
    mut op: F,
) -> Stored<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Stored::Done(v),
            Err(e) if e.is_transient() => {
                if e.is_connection() {
                    ctx.store_trouble();
                }
                if *shutdown.borrow() {
                    return Stored::Stopping;
                }
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Could not store {what}; holding acknowledgements and retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                warn!(error = %e, "Could not store {what}, and retrying cannot help.");
                return Stored::Failed(e);
            }
        }
    }
}

/// A window waiting in a batch.
struct Incoming {
    window: Window,
    agent_id: String,
    reply: AgentLink,
    received: std::time::Instant,
    latency: Option<Box<crate::otel::hist::Counts>>,
}

/// The ingest writer loop.
pub async fn run_writer(
    ctx: Arc<Context>,
    mut rx: mpsc::Receiver<IngestItem>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let max = ctx.config.ingest_batch;
    let linger = Duration::from_millis(ctx.config.ingest_linger_ms);
    // Summarising a run reads all its windows; a few run side by side, off the windows' path, so that a
    // burst of finishing runs does not hold up the acknowledgements of runs still streaming.
    let finishers = Arc::new(tokio::sync::Semaphore::new(4));
    while let Some(batch) = next_batch(&mut rx, max, linger).await {
        let mut windows: Vec<Incoming> = Vec::new();
        for item in batch {
            match item {
                IngestItem::Window {
                    window,
                    agent_id,
                    reply,
                    received,
                    latency,
                } => windows.push(Incoming {
                    window,
                    agent_id,
                    reply,
                    received,
                    latency,
                }),
                IngestItem::Result {
                    result,
                    agent_id,
                    reply,
                } => {
                    // Every window sent before the result is stored before the result is read.
                    if !flush_windows(&ctx, &mut windows, &shutdown).await {
                        return;
                    }
                    let Ok(permit) = finishers.clone().acquire_owned().await else {
                        return;
                    };
                    let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        finish_and_ack(&ctx, &result, &agent_id, &reply, &shutdown).await;
                    });
                }
            }
        }
        if !flush_windows(&ctx, &mut windows, &shutdown).await {
            return;
        }
    }
}

/// Stores a batch of windows and acknowledges each; false when the coordinator is stopping.
async fn flush_windows(
    ctx: &Context,
    windows: &mut Vec<Incoming>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> bool {
    if windows.is_empty() {
        return true;
    }
    let batch = std::mem::take(windows);
    let mut rows: Vec<(String, Window)> = batch
        .iter()
        .map(|i| (i.agent_id.clone(), i.window.clone()))
        .collect();
    let mut jobs: Vec<String> = Vec::new();
    let inst = &ctx.telemetry.inst;
    let outcomes = match until_stored(ctx, "telemetry windows", shutdown, || {
        inst.store_op("store_windows", ctx.store.store_windows(&rows, now_ms()))
    })
    .await
    {
        Stored::Done(o) => {
            jobs = o.jobs;
            o.outcomes
        }
        Stored::Stopping => return false,
        // Something in the batch cannot be stored: store the windows one by one, so only that one
        // is refused.
        Stored::Failed(_) => {
            let mut each = Vec::with_capacity(rows.len());
            for row in &rows {
                match until_stored(ctx, "a telemetry window", shutdown, || {
                    inst.store_op(
                        "store_windows",
                        ctx.store.store_windows(std::slice::from_ref(row), now_ms()),
                    )
                })
                .await
                {
                    Stored::Done(o) => {
                        jobs.extend(o.jobs);
                        each.push(o.outcomes[0])
                    }
                    Stored::Failed(_) => each.push(WindowOutcome::Refused),
                    Stored::Stopping => return false,
                }
            }
            each
        }
    };
    // Acks of consecutive windows from one session go out as one message.
    let mut cancelled: Vec<&str> = Vec::new();
    let mut pending: Vec<Ack> = Vec::new();
    for (i, (item, outcome)) in batch.iter().zip(&outcomes).enumerate() {
        let w = &item.window;
        let discarded = !matches!(outcome, WindowOutcome::Stored | WindowOutcome::Duplicate);
        pending.push(Ack {
            run_id: w.run_id.clone(),
            seq: w.seq,
            discarded,
        });
        match outcome {
            WindowOutcome::Inactive if !cancelled.contains(&w.run_id.as_str()) => {
                cancelled.push(&w.run_id);
                item.reply
                    .deliver(registry::window_acks(std::mem::take(&mut pending)))
                    .await;
                item.reply.try_send(registry::cancel(
                    &w.run_id,
                    "the run is no longer active on the coordinator",
                ));
                continue;
            }
            WindowOutcome::Foreign => {
                ctx.stats.foreign_windows.fetch_add(1, Ordering::Relaxed);
                warn!(agent = %item.agent_id, run = %w.run_id, seq = w.seq, "Discarded a window for a run leased to another agent.");
            }
            WindowOutcome::Refused => {
                ctx.stats.refused_windows.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let next_same = batch.get(i + 1).is_some_and(|n| n.reply.same(&item.reply));
        if !next_same {
            item.reply
                .deliver(registry::window_acks(std::mem::take(&mut pending)))
                .await;
        }
    }
    // Only the watchers of the jobs that changed wake up.
    ctx.jobs_changed(jobs.iter().map(String::as_str));
    // Metrics, after the acknowledgements: counted here, measured by the recorder's task.
    for ((item, outcome), (_, window)) in batch.into_iter().zip(&outcomes).zip(rows.drain(..)) {
        inst.windows.add(
            1,
            &[opentelemetry::KeyValue::new("outcome", outcome.as_str())],
        );
        inst.ack.record(item.received.elapsed().as_secs_f64(), &[]);
        if matches!(outcome, WindowOutcome::Stored) && !ctx.recorder.stored(window, item.latency) {
            inst.dropped.add(1, &[]);
        }
    }
    true
}

/// Summarises and stores a finished run and acknowledges its result. A result that cannot be
/// summarised (its stored telemetry cannot be read) ends the run as failed with the reason; the agent
/// always hears back, so it is never left busy.
async fn finish_and_ack(
    ctx: &Context,
    result: &RunResult,
    agent_id: &str,
    reply: &AgentLink,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) {
    let refusal = match until_stored(ctx, "a run result", shutdown, || {
        finish(ctx, result, agent_id)
    })
    .await
    {
        Stored::Done(refusal) => refusal,
        Stored::Stopping => return,
        Stored::Failed(e) => {
            let failed = FinishedRun::failed(
                &result.run_id,
                format!("the coordinator could not summarise the run: {e}"),
            );
            match until_stored(ctx, "a failed run", shutdown, || {
                ctx.store.finish_run(&failed, now_ms())
            })
            .await
            {
                Stored::Done(()) => None,
                Stored::Failed(e) => Some(format!("the coordinator cannot store this result: {e}")),
                Stored::Stopping => return,
            }
        }
    };
    let (discarded, reason) = match &refusal {
        Some(r) => (true, r.as_str()),
        None => (false, ""),
    };
    reply
        .deliver(registry::result_ack(&result.run_id, discarded, reason))
        .await;
    ctx.run_ended(agent_id, &result.run_id);
}

/// Summarises and stores a finished run; returns why the result was refused, or None when it was
/// taken.
async fn finish(ctx: &Context, result: &RunResult, agent_id: &str) -> Result<Option<String>> {
    if result.agent_stopping && result.run_id.is_empty() {
        // An idle agent saying it is stopping (the session already took note): nothing to store.
        return Ok(None);
    }
    let Some(run) = ctx.store.run_context(&result.run_id).await? else {
        return Ok(Some(format!("unknown run {}", result.run_id)));
    };
    if run.agent_id != agent_id {
        return Ok(Some(format!(
            "run {} belongs to another agent",
            result.run_id
        )));
    }
    if run.state != "running" {
        return Ok(Some(format!(
            "run {} is {}, not running",
            result.run_id, run.state
        )));
    }
    if result.agent_stopping {
        // Its operator stopped the agent: the task goes back to the queue now, not after a lease
        // timeout, and the attempt does not count.
        ctx.store
            .release_run(
                &result.run_id,
                &format!(
                    "agent '{}' was stopped before the run finished",
                    run.agent_name
                ),
                now_ms(),
                ctx.config.max_attempts,
                true,
            )
            .await?;
        ctx.jobs_changed([run.job_id.as_str()]);
        info!(run = %result.run_id, agent = %run.agent_name, "The agent stopped mid-run; its task is back in the queue.");
        return Ok(None);
    }
    let summary_started = std::time::SystemTime::now();
    let finished = summary::finish_run(&run, result)?;
    ctx.telemetry
        .inst
        .store_op("finish_run", ctx.store.finish_run(&finished, now_ms()))
        .await?;
    ctx.recorder.run_ended(
        &result.run_id,
        finished.summary.as_ref().and_then(|s| s.accuracy),
    );
    ctx.telemetry
        .traces
        .task_finished(&crate::otel::traces::FinishedTask {
            job_id: &run.job_id,
            task_id: &run.task_id,
            run_id: &result.run_id,
            agent: &run.agent_name,
            platform_id: &run.platform_id,
            variant: &run.variant,
            leased_at_ms: run.started_at,
            state: finished.state.as_str(),
            error: &finished.error,
            agent_spans: &result.spans,
            summary_started,
        });
    ctx.jobs_changed([run.job_id.as_str()]);
    info!(
        run = %result.run_id,
        job = %run.job_id,
        trace_id = %run.job_id,
        agent = %run.agent_name,
        variant = %run.variant,
        state = finished.state.as_str(),
        error = %finished.error,
        "Run finished."
    );
    Ok(None)
}
