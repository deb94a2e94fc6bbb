//! Leasing and assignment. On every kick or tick the scheduler expires leases whose agents went
//! silent, then offers each idle session the next eligible task (same platform, preferably expanded for
//! this very agent, never while another agent of its host runs one) and hands it over.

use std::sync::Arc;
use std::time::Duration;

use fleetbench_common::now_ms;
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::domain::Variant;
use crate::error::Result;
use crate::registry::{self, IdleSession};
use crate::store::{Lease, LeaseRequest};

/// Runs the scheduler until `shutdown` fires: on every kick or tick, expires leases and offers work to
/// idle sessions.
pub async fn run(ctx: Arc<Context>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let tick = Duration::from_millis(ctx.config.scheduler_tick_ms.max(10));
    loop {
        tokio::select! {
            _ = ctx.kicked() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = schedule_once(&ctx).await {
            if e.is_connection() {
                ctx.store_trouble();
            }
            warn!(error = %e, "Scheduling pass failed; retrying on the next tick.");
        }
    }
}

/// One pass: expire leases, then lease tasks to idle sessions.
pub async fn schedule_once(ctx: &Context) -> Result<()> {
    let now = now_ms();
    if expire(ctx, now).await? {
        ctx.notify_watchers();
    }
    for session in ctx.registry.idle() {
        offer(ctx, &session, now).await?;
    }
    debug!(
        connected = ctx.registry.connected(),
        "Scheduling pass done."
    );
    Ok(())
}

/// Returns the tasks of silent agents to the queue. Heartbeats could not renew leases while the
/// database was away: leases expire only once it has worked for a whole lease timeout again, so that
/// an outage does not requeue running tasks. Returns whether any lease expired.
async fn expire(ctx: &Context, now: i64) -> Result<bool> {
    // Other replicas read from here whether this one reaches the database and is healthy.
    ctx.store
        .replica_seen(&ctx.replica_id, now, ctx.trouble_at())
        .await?;
    if !ctx.store_settled(now) {
        return Ok(false);
    }
    let expired = ctx
        .telemetry
        .inst
        .store_op(
            "expire_leases",
            ctx.store.expire_leases(
                now,
                ctx.config.max_attempts,
                &ctx.replica_id,
                ctx.config.lease_timeout_ms as i64,
            ),
        )
        .await?;
    for e in &expired {
        let outcome = if e.requeued { "requeued" } else { "failed" };
        ctx.telemetry
            .inst
            .leases_expired
            .add(1, &[opentelemetry::KeyValue::new("outcome", outcome)]);
        info!(task = %e.task_id, run = %e.run_id, requeued = e.requeued, "Lease expired; the agent went silent.");
        ctx.registry
            .send(&e.agent_id, registry::cancel(&e.run_id, "lease expired"));
        // A silent session may be half-open: it is closed rather than offered the next task (an alive
        // agent reconnects at once).
        ctx.registry.close(&e.agent_id);
        ctx.run_ended(&e.agent_id, &e.run_id);
    }
    Ok(!expired.is_empty())
}

/// The root of a variant's lineage, when it is not the variant itself (its artifact is what the
/// variant's fidelity is measured against).
pub(crate) fn lineage_root<'a>(
    variants: &'a [Variant],
    variant: &'a Variant,
) -> Option<&'a Variant> {
    let mut root = variant;
    for _ in 0..variants.len() {
        match variants
            .iter()
            .find(|v| !root.variant_of.is_empty() && v.variant == root.variant_of)
        {
            Some(parent) => root = parent,
            None => break,
        }
    }
    (root.variant != variant.variant).then_some(root)
}

/// Leases the next eligible task to one idle session and sends it; returns whether one was leased.
async fn offer(ctx: &Context, session: &IdleSession, now: i64) -> Result<bool> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let req = LeaseRequest {
        agent_id: session.agent_id.clone(),
        platform_id: session.platform_id.clone(),
        host_id: session.host_id.clone(),
        run_id: run_id.clone(),
        lease_until: now + ctx.config.lease_timeout_ms as i64,
        alive_since: now - ctx.config.lease_timeout_ms as i64,
        replica: ctx.replica_id.clone(),
    };
    let Some(lease) = ctx
        .telemetry
        .inst
        .store_op("lease_task", ctx.store.lease_task(&req, now))
        .await?
    else {
        return Ok(false);
    };
    assign(ctx, session, &lease, now).await?;
    ctx.jobs_changed([lease.job_id.as_str()]);
    Ok(true)
}

/// Hands a lease to its session, or gives the task back when the session went away meanwhile.
async fn assign(ctx: &Context, session: &IdleSession, lease: &Lease, now: i64) -> Result<()> {
    let variants = ctx.store.list_variants(Some(&lease.model)).await?;
    let variant = variants.iter().find(|v| v.variant == lease.variant);
    let base_sha256 = variant
        .and_then(|v| lineage_root(&variants, v))
        .map(|r| r.artifact_sha256.clone())
        .unwrap_or_default();
    let delivered = ctx.registry.assign(
        &session.agent_id,
        session.session_id,
        &lease.run_id,
        registry::assignment(lease, variant, &base_sha256),
    );
    if !delivered {
        // The session went away between the snapshot and the lease: give the task back now.
        ctx.store
            .release_run(
                &lease.run_id,
                "agent disconnected before the task reached it",
                now,
                ctx.config.max_attempts,
                true,
            )
            .await?;
        ctx.run_ended(&session.agent_id, &lease.run_id);
        return Ok(());
    }
    info!(agent = %session.agent_id, task = %lease.task_id, run = %lease.run_id, variant = %lease.variant, attempt = lease.attempt, "Task leased.");
    Ok(())
}
