//! Heartbeats and lease renewal. Heartbeats of every session go through one batcher, two statements
//! per batch whatever its size: agents' last-seen times, then the leases of the runs they name. A run
//! that is no longer the agent's (job cancelled, lease expired) is cancelled on its session. Liveness
//! never waits on ingest: a slow database delays heartbeats, not windows, and the other way round.

use std::sync::Arc;
use std::time::Duration;

use fleetbench_common::now_ms;
use tokio::sync::mpsc;
use tracing::warn;

use crate::batch::next_batch;
use crate::context::Context;
use crate::registry::{self, AgentLink};
use crate::store::HeartbeatRecord;

/// A heartbeat with the session to answer on.
pub struct HeartbeatItem {
    /// The heartbeat.
    pub record: HeartbeatRecord,
    /// Where to send a cancellation when its run is no longer active.
    pub reply: AgentLink,
    /// A heartbeat, or a change of the session's state.
    pub kind: Kind,
}

/// What a [`HeartbeatItem`] carries. The two that are not heartbeats mark the agent disconnected
/// here, after every heartbeat its session queued before, so that none of them marks it connected
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A heartbeat.
    Beat,
    /// The session ended.
    Closed,
    /// The agent said it is stopping (see [`crate::registry::Registry::leaving`]): it hangs up once
    /// its results are acknowledged. Marked disconnected at once, a task expanded for it (which waits
    /// for its agent while that agent is connected) goes to a peer of its platform without waiting
    /// for the hang-up.
    Leaving,
}

/// Sender side of the heartbeat batcher.
pub type HeartbeatHandle = mpsc::Sender<HeartbeatItem>;

/// The heartbeat batcher loop: records liveness, extends leases, and tells agents to stop runs that are
/// no longer theirs (cancelled jobs, expired leases).
pub async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<HeartbeatItem>) {
    while let Some(batch) = next_batch(&mut rx, 4096, Duration::from_millis(50)).await {
        let (marks, beats): (Vec<HeartbeatItem>, Vec<HeartbeatItem>) =
            batch.into_iter().partition(|b| b.kind != Kind::Beat);
        if !beats.is_empty() {
            record(&ctx, &beats).await;
        }
        for item in marks {
            // A new session of the same agent may have opened here meanwhile: it stays connected.
            let agent = &item.record.agent_id;
            let gone = match item.kind {
                Kind::Closed => !ctx.registry.is_attached(agent),
                Kind::Leaving => ctx.registry.is_leaving(agent, &item.reply),
                Kind::Beat => false,
            };
            if gone {
                mark_disconnected(&ctx, agent).await;
            }
        }
    }
}

/// Records a batch of heartbeats and cancels the runs they name that are no longer active.
async fn record(ctx: &Context, beats: &[HeartbeatItem]) {
    let records: Vec<HeartbeatRecord> = beats.iter().map(|b| b.record.clone()).collect();
    let now = now_ms();
    let lease_until = now + ctx.config.lease_timeout_ms as i64;
    match ctx
        .telemetry
        .inst
        .store_op(
            "heartbeats",
            ctx.store
                .heartbeats(&records, now, lease_until, &ctx.replica_id),
        )
        .await
    {
        Ok(active) => {
            for (item, active) in beats.iter().zip(active) {
                if let (Some(false), Some(run)) = (active, &item.record.run_id) {
                    let _ = item.reply.try_send(registry::cancel(
                        run,
                        "the run is no longer active (job cancelled or lease expired)",
                    ));
                }
            }
        }
        Err(e) => {
            if e.is_connection() {
                ctx.store_trouble();
            }
            warn!(error = %e, beats = records.len(), "Could not record heartbeats; agents stay connected.")
        }
    }
}

/// Marks an agent whose session ended disconnected (when that fails, it shows offline once it has
/// been silent for a lease timeout).
pub async fn mark_disconnected(ctx: &Context, agent_id: &str) {
    if let Err(e) = ctx.store.set_connected(agent_id, false, now_ms()).await {
        warn!(error = %e, agent = %agent_id, "Could not mark the agent disconnected.");
    }
    ctx.changed();
}
