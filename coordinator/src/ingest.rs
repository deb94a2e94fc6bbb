//! Ingest: telemetry windows and run results are written in arrival order by one writer task, in
//! batches (one transaction per batch); each window is acknowledged only after its batch is durably
//! stored. If the database fails, the writer retries the same batch and acknowledges nothing meanwhile,
//! so agents keep the windows and nothing is lost. Heartbeats go through their own batcher, so that a
//! slow or absent database never stalls liveness.

use std::sync::Arc;
use std::time::Duration;

use fleetbench_common::now_ms;
use fleetbench_proto::v1::{
    ResultAck, RunResult, TelemetryWindow, WindowAck, WindowAckBatch, coordinator_message::Body,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::Coordinator;
use crate::error::Result;
use crate::scheduler::{SessionTx, cancel_msg, msg};
use crate::store::{HeartbeatRecord, WindowOutcome};
use crate::summary;

/// Something to write, with the session to acknowledge on.
pub enum IngestItem {
    /// A telemetry window.
    Window {
        /// The window.
        window: TelemetryWindow,
        /// Where to send the ack.
        reply: SessionTx,
    },
    /// A run's result.
    Result {
        /// The result (boxed: it is much larger than a window's entry).
        result: Box<RunResult>,
        /// Agent that sent it.
        agent_id: String,
        /// Where to send the ack.
        reply: SessionTx,
    },
}

/// Sender side of the ingest writer.
pub type IngestHandle = mpsc::Sender<IngestItem>;

/// A heartbeat with the session to answer on.
pub struct HeartbeatItem {
    /// The heartbeat.
    pub record: HeartbeatRecord,
    /// Where to send a cancellation when its run is no longer active.
    pub reply: SessionTx,
}

/// Sender side of the heartbeat batcher.
pub type HeartbeatHandle = mpsc::Sender<HeartbeatItem>;

/// Takes the first item, then whatever else arrives within `linger`, up to `max`: a few milliseconds
/// of waiting turns a trickle from many agents into one transaction instead of dozens.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, max: usize, linger: Duration) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    _ => break,
                }
            }
        }
    }
    Some(batch)
}

/// Retries `op` with capped exponential backoff until it succeeds or `shutdown` fires.
async fn until_stored<T, F, Fut>(
    coord: &Coordinator,
    what: &str,
    shutdown: &tokio::sync::watch::Receiver<bool>,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                coord.store_trouble();
                if *shutdown.borrow() {
                    return None;
                }
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Could not store {what}; holding acknowledgements and retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The ingest writer loop.
pub async fn run_writer(
    coord: Arc<Coordinator>,
    mut rx: mpsc::Receiver<IngestItem>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let max = coord.config.ingest_batch;
    let linger = Duration::from_millis(coord.config.ingest_linger_ms);
    // Summarising a run reads all its windows; a few run side by side, off the windows' path, so that a
    // burst of finishing runs does not hold up the acknowledgements of runs still streaming.
    let finishers = Arc::new(tokio::sync::Semaphore::new(4));
    while let Some(batch) = next_batch(&mut rx, max, linger).await {
        let mut windows: Vec<(TelemetryWindow, SessionTx)> = Vec::new();
        for item in batch {
            match item {
                IngestItem::Window { window, reply } => windows.push((window, reply)),
                IngestItem::Result {
                    result,
                    agent_id,
                    reply,
                } => {
                    // Every window sent before the result is stored before the result is read.
                    if !flush_windows(&coord, &mut windows, &shutdown).await {
                        return;
                    }
                    let Ok(permit) = finishers.clone().acquire_owned().await else {
                        return;
                    };
                    let (coord, shutdown) = (coord.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let ack = until_stored(&coord, "a run result", &shutdown, || {
                            finish(&coord, &result, &agent_id)
                        })
                        .await;
                        if let Some(ack) = ack {
                            let _ = reply.try_send(Ok(msg(Body::ResultAck(ack))));
                            coord.hub.run_ended(&agent_id, &result.run_id);
                            coord.changed();
                        }
                    });
                }
            }
        }
        if !flush_windows(&coord, &mut windows, &shutdown).await {
            return;
        }
    }
}

async fn flush_windows(
    coord: &Coordinator,
    windows: &mut Vec<(TelemetryWindow, SessionTx)>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> bool {
    if windows.is_empty() {
        return true;
    }
    let (batch, replies): (Vec<TelemetryWindow>, Vec<SessionTx>) =
        std::mem::take(windows).into_iter().unzip();
    let Some(outcomes) = until_stored(coord, "telemetry windows", shutdown, || {
        coord.store.store_windows(&batch, now_ms())
    })
    .await
    else {
        return false;
    };
    // Acks of consecutive windows from one session go out as one message.
    let mut cancelled: Vec<&str> = Vec::new();
    let mut pending: Vec<WindowAck> = Vec::new();
    let send = |reply: &SessionTx, acks: &mut Vec<WindowAck>| {
        let body = if acks.len() == 1 {
            Body::WindowAck(acks.pop().expect("one ack"))
        } else {
            Body::WindowAcks(WindowAckBatch {
                acks: std::mem::take(acks),
            })
        };
        let _ = reply.try_send(Ok(msg(body)));
    };
    for (i, ((w, reply), outcome)) in batch.iter().zip(&replies).zip(outcomes).enumerate() {
        let discarded = outcome == WindowOutcome::Inactive;
        pending.push(WindowAck {
            run_id: w.run_id.clone(),
            seq: w.seq,
            discarded,
        });
        if discarded && !cancelled.contains(&w.run_id.as_str()) {
            cancelled.push(&w.run_id);
            send(reply, &mut pending);
            let _ = reply.try_send(Ok(cancel_msg(
                &w.run_id,
                "the run is no longer active on the coordinator",
            )));
            continue;
        }
        let next_same = replies.get(i + 1).is_some_and(|r| r.same_channel(reply));
        if !next_same {
            send(reply, &mut pending);
        }
    }
    coord.changes.send_modify(|v| *v = v.wrapping_add(1));
    true
}

/// Summarises and stores a finished run; the ack says whether it was taken.
async fn finish(coord: &Coordinator, result: &RunResult, agent_id: &str) -> Result<ResultAck> {
    let refuse = |reason: String| ResultAck {
        run_id: result.run_id.clone(),
        discarded: true,
        reason,
    };
    let Some(ctx) = coord.store.run_context(&result.run_id).await? else {
        return Ok(refuse(format!("unknown run {}", result.run_id)));
    };
    if ctx.agent_id != agent_id {
        return Ok(refuse(format!(
            "run {} belongs to another agent",
            result.run_id
        )));
    }
    if ctx.state != "running" {
        return Ok(refuse(format!(
            "run {} is {}, not running",
            result.run_id, ctx.state
        )));
    }
    let finished = summary::finish_run(&ctx, result)?;
    coord.store.finish_run(&finished, now_ms()).await?;
    info!(
        run = %result.run_id,
        agent = %ctx.agent_name,
        variant = %ctx.variant,
        state = finished.state.as_str(),
        error = %finished.error,
        "Run finished."
    );
    Ok(ResultAck {
        run_id: result.run_id.clone(),
        discarded: false,
        reason: String::new(),
    })
}

/// The heartbeat batcher loop: records liveness, extends leases, and tells agents to stop runs that are
/// no longer theirs (cancelled jobs, expired leases).
pub async fn run_heartbeats(coord: Arc<Coordinator>, mut rx: mpsc::Receiver<HeartbeatItem>) {
    while let Some(batch) = next_batch(&mut rx, 4096, Duration::from_millis(50)).await {
        let records: Vec<HeartbeatRecord> = batch.iter().map(|b| b.record.clone()).collect();
        let now = now_ms();
        let lease_until = now + coord.config.lease_timeout_ms as i64;
        match coord.store.heartbeats(&records, now, lease_until).await {
            Ok(active) => {
                for (item, active) in batch.iter().zip(active) {
                    if let (Some(false), Some(run)) = (active, &item.record.run_id) {
                        let _ = item.reply.try_send(Ok(cancel_msg(
                            run,
                            "the run is no longer active (job cancelled or lease expired)",
                        )));
                    }
                }
            }
            Err(e) => {
                coord.store_trouble();
                warn!(error = %e, beats = records.len(), "Could not record heartbeats; agents stay connected.")
            }
        }
    }
}
